"""XBZRLE: pages sent again go as their difference from the copy the destination holds.

A running guest that keeps rewriting a few bytes of its pages migrates live with the
`xbzrle` capability; the source's `query-migrate` shows XBZRLE pages sent, and the
destination ends with the source's RAM byte for byte. Hostile XBZRLE records fail with
what was wrong. Speed is for scripts/bench.py, not for these tests.
"""
import os
import struct
import time

import pytest

import harness
from harness import wait_passes, workload
from conftest import require

pytestmark = pytest.mark.vmigrate

MiB = harness.MiB
# The writers put a tag (pass << 32 | page) in every word: from one pass to the next
# one byte of each word changes, which XBZRLE encodes in 3 bytes of 8.
LOAD = ["--workload", "hot=8M,rate=32M", "--cpus", "2"]


def start_incoming(dst):
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    return f"tcp:127.0.0.1:{harness.socket_port(dst.query_migrate())}"


def written_once(m, pages=2048, timeout=20):
    """Waits until the writers of M wrote PAGES pages (the 8 MiB hot set once)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if m.cmd("query-workload")["pages-written"] >= pages:
            return
        time.sleep(0.05)
    raise harness.HarnessError(f"{m.name}: the writers wrote too little in {timeout}s")


def migrate_until_xbzrle(src, uri, min_pages=50, timeout=60):
    """Starts a migration that cannot converge (1 ms downtime limit) and lets it run
    until the source sent MIN_PAGES XBZRLE pages, then lets it converge. Returns the
    source's query-migrate at the end."""
    written_once(src)
    src.set_caps(xbzrle=True)
    src.set_params(max_bandwidth=16 * MiB, downtime_limit=1)
    src.cmd("migrate", uri=uri)
    t0 = time.time()
    seen = {}
    while time.time() - t0 < timeout:
        info = src.query_migrate()
        seen = info.get("xbzrle-cache", {})
        if info["status"] in ("completed", "failed", "cancelled"):
            break
        if seen.get("pages", 0) >= min_pages:
            break
        time.sleep(0.05)
    assert seen.get("pages", 0) >= min_pages, \
        f"no XBZRLE pages after {timeout}s: {src.query_migrate()}"
    src.set_params(downtime_limit=2000, max_bandwidth=1024 * MiB)
    si = src.wait_migration(timeout=timeout)
    assert si["status"] == "completed", si
    return si


def check_figures(si):
    xb = si["xbzrle-cache"]
    assert xb["cache-size"] == 64 * MiB
    assert xb["pages"] > 0 and xb["bytes"] > 0, xb
    # Encoded pages carry less than a page each: the figures must say so.
    encoded = xb["pages"] - xb["overflow"]
    assert xb["bytes"] < encoded * 4096 + xb["overflow"] * 4096, xb
    assert set(xb) == {"cache-size", "bytes", "pages", "cache-miss", "cache-miss-rate",
                       "encoding-rate", "overflow"}


@pytest.mark.parametrize("dst_impl", ["qemu", "vmigrate"])
def test_a_loaded_none_vm_migrates_live_with_xbzrle(ws, dst_impl):
    require("vmigrate", dst_impl)
    src = ws.vm("vmigrate", "src", mem_mib=32, extra=LOAD).start()
    dst = ws.vm(dst_impl, "dst", mem_mib=32, incoming="defer").start()
    si = migrate_until_xbzrle(src, start_incoming(dst))
    di = dst.wait_migration(("completed", "failed"), timeout=30)
    assert di["status"] == "completed", f"{di}\n{src.stderr_tail()}\n{dst.stderr_tail()}"
    check_figures(si)
    assert src.runstate() == "postmigrate"
    first = harness.first_difference(src.ram(), dst.ram_pmemsave())
    assert first is None, f"RAM differs from byte {first}"
    text = src.cmd("human-monitor-command", **{"command-line": "info migrate"})
    assert "xbzrle pages:" in text and "xbzrle cache miss rate:" in text, text


def test_a_lab_guest_migrates_live_with_xbzrle_and_keeps_its_check(ws):
    require("vmigrate")
    spec = "hot=8M,rate=32M,verify"
    extra = ["--accel", "soft", "--cpus", "1", "--workload", spec]
    src = ws.vm("vmigrate", "src", mem_mib=32, machine="lab", extra=extra).start()
    dst = ws.vm("vmigrate", "dst", mem_mib=32, machine="lab", extra=extra,
                incoming="defer", start_paused=True).start()
    wait_passes(src, 2)
    si = migrate_until_xbzrle(src, start_incoming(dst))
    check_figures(si)
    assert dst.wait_migration(("completed", "failed"), timeout=30)["status"] == "completed"
    at_switchover = workload(src)
    arrived = workload(dst)
    assert arrived["pages-written"] == at_switchover["pages-written"]
    assert harness.first_difference(src.ram(), dst.ram()) is None
    dst.cmd("cont")
    after = wait_passes(dst, arrived["passes"] + 3)
    assert after["violations"] == 0, after


def test_xbzrle_cache_size_changes_during_the_migration(ws):
    """The new size shows at once in query-migrate; the migration goes on with a new
    cache and still arrives whole."""
    require("vmigrate")
    src = ws.vm("vmigrate", "src", mem_mib=32, extra=LOAD).start()
    dst = ws.vm("vmigrate", "dst", mem_mib=32, incoming="defer").start()
    written_once(src)
    src.set_caps(xbzrle=True)
    src.set_params(max_bandwidth=16 * MiB, downtime_limit=1)
    src.cmd("migrate", uri=start_incoming(dst))
    time.sleep(0.5)
    src.set_params(xbzrle_cache_size=1 * MiB)
    assert src.query_migrate()["xbzrle-cache"]["cache-size"] == 1 * MiB
    r = src.raw("migrate-set-parameters", **{"xbzrle-cache-size": 3 * 4096})
    assert "power of two" in r["error"]["desc"], r
    time.sleep(0.5)
    src.set_params(downtime_limit=2000, max_bandwidth=1024 * MiB)
    si = src.wait_migration(timeout=60)
    assert si["status"] == "completed", si
    assert dst.wait_migration(("completed", "failed"), timeout=30)["status"] == "completed"
    assert harness.first_difference(src.ram(), dst.ram_pmemsave()) is None


# ---- hostile records

def xbzrle_stream(body, cut=False):
    """A stream for a 1 MiB `-M none` destination: page 1 of m0 sent whole (0x11
    bytes), then BODY (XBZRLE records), EOS, END and EOF; with CUT the stream ends
    right after BODY."""
    out = bytearray(b"QEVM" + struct.pack(">I", 3))
    out += b"\x07" + struct.pack(">I", 4) + b"none"
    out += b"\x01" + struct.pack(">I", 100) + b"\x03ram" + struct.pack(">II", 0, 4)
    out += struct.pack(">Q", (1 << 20) | 0x04) + b"\x02m0" + struct.pack(">Q", 1 << 20)
    out += struct.pack(">Q", 0x10) + b"\x7e" + struct.pack(">I", 100)
    out += b"\x02" + struct.pack(">I", 100)
    out += struct.pack(">Q", 0x1000 | 0x08) + b"\x02m0" + b"\x11" * 4096
    out += body
    if cut:
        return bytes(out)
    out += struct.pack(">Q", 0x10) + b"\x7e" + struct.pack(">I", 100)
    out += b"\x03" + struct.pack(">I", 100) + struct.pack(">Q", 0x10)
    out += b"\x7e" + struct.pack(">I", 100) + b"\x00"
    return bytes(out)


def record(offset, encoded, kind=1, length=None):
    length = len(encoded) if length is None else length
    return (struct.pack(">Q", offset | 0x40 | 0x20) + bytes([kind])
            + struct.pack(">H", length) + encoded)


@pytest.mark.parametrize("body,needle", [
    (record(0x1000, bytes([0xFF, 0x1F, 0x02, 0xAA, 0xBB])), "runs past the page"),
    (record(0x1000, bytes([0x00, 0x01, 0xAA, 0x05])), "truncated at byte 3"),
    (record(0x1000, bytes([0x00, 0x05, 0xAA])), "needs 5 bytes"),
    (record(0x1000, b"", length=4097), "encoded length 4097 is beyond the page size"),
    (record(0x1000, bytes([0x00, 0x01]), length=3), "stream ended early"),
    (record(0x1000, bytes([0x00, 0x01, 0xAA]), kind=2), "wrong compression 2"),
    (record(0x2000, bytes([0x00, 0x01, 0xAA])), "never sent in full"),
])
def test_hostile_xbzrle_records_fail_with_what_was_wrong(ws, body, needle):
    require("vmigrate")
    path = ws.path("hostile.bin")
    with open(path, "wb") as f:
        f.write(xbzrle_stream(body, cut="ended early" in needle))
    r = harness.load_stream(ws, "vmigrate", f"file:{path}", 1)
    assert r.outcome == "failed", r
    assert needle in r.error_desc + r.stderr, r


def test_a_valid_xbzrle_record_loads(ws):
    """The same stream with a valid record: the page holds the old bytes with the
    change applied (the control for the hostile cases)."""
    require("vmigrate")
    path = ws.path("valid.bin")
    with open(path, "wb") as f:
        f.write(xbzrle_stream(record(0x1000, bytes([0x05, 0x02, 0xAA, 0xBB]))))
    r = harness.load_stream(ws, "vmigrate", f"file:{path}", 1)
    assert r.outcome == "completed", r
    page = r.machine.ram_pmemsave(0x1000, 4096)
    assert page == b"\x11" * 5 + b"\xAA\xBB" + b"\x11" * (4096 - 7)
    assert os.path.getsize(path) > 4096


def test_qemus_xbzrle_capture_agrees_with_the_oracle_dissector():
    """Every XBZRLE record of QEMU's capture is decoded by the inspector (a broken one
    would stop it), and its count per RAM section is the oracle dissector's."""
    require("vmigrate")
    import json
    import re
    import subprocess
    import sys
    capture = harness.ORACLE_DIR / "captures" / "xbzrle.bin"
    oracle = subprocess.run([sys.executable, str(harness.ORACLE_DIR / "parse_stream.py"),
                             str(capture)], capture_output=True, text=True, timeout=60,
                            check=True).stdout
    want, section = {}, None
    for line in oracle.splitlines():
        m = re.match(r"@0x([0-9a-f]+) SECTION_(PART|END)", line)
        if m:
            section = int(m.group(1), 16)
        elif re.match(r"\s+@0x[0-9a-f]+ XBZRLE block='pc.ram' off=0x[0-9a-f]+ enc=1 len=\d+",
                      line):
            want[section] = want.get(section, 0) + 1
    assert sum(want.values()) == 696, "the oracle sees another capture"
    r = subprocess.run([harness.vmigrate_bin(), "inspect", "--json", str(capture)],
                       capture_output=True, text=True, timeout=60, check=True)
    report = json.loads(r.stdout)
    assert report["complete"], report["error"]
    got = {rec["offset"]: rec["body"]["xbzrle_pages"] for rec in report["records"]
           if rec.get("type") == "section" and rec.get("kind") in ("PART", "END")
           and rec["body"].get("xbzrle_pages")}
    assert got == want
