"""`background-snapshot`: RAM as it was when the snapshot started, saved to a file while
the VM keeps running (userfaultfd write-protection). Snapshots go both ways with QEMU
10.0.2 (RAM byte for byte); a running lab guest keeps making progress during the save,
the file holds no page newer than the snapshot's moment, and the restored guest's
self-check passes; QEMU's capability texts."""
import os
import socket
import struct
import re
import subprocess
import sys
import threading
import time

import pytest

import harness
from conftest import require
from harness import wait_passes, workload
from test_lab import kvm_unusable_reason, lab

MiB = harness.MiB
GUEST_MIB = 32


@pytest.fixture(scope="module")
def image32(session_dir):
    return harness.Image(os.path.join(session_dir, "image32-bgsnap.bin"), GUEST_MIB * MiB, 23)


def snapshot_to_file(m, out, timeout=60):
    m.set_caps(background_snapshot=True)
    m.cmd("migrate", uri=f"file:{out}")
    return m.wait_migration(timeout=timeout)


PAIRS = [
    pytest.param("vmigrate", "qemu", marks=pytest.mark.vmigrate, id="vmigrate-to-qemu"),
    pytest.param("qemu", "vmigrate", marks=pytest.mark.vmigrate, id="qemu-to-vmigrate"),
    pytest.param("vmigrate", "vmigrate", marks=pytest.mark.vmigrate, id="vmigrate-to-vmigrate"),
]


@pytest.mark.parametrize("src_impl,dst_impl", PAIRS)
def test_background_snapshot_to_file_loads(ws, image32, src_impl, dst_impl):
    """The `none` machine keeps running through the snapshot; the file loads in the
    other implementation with RAM equal to the image byte for byte."""
    require(src_impl, dst_impl)
    src = ws.vm(src_impl, "src", mem_mib=GUEST_MIB).start()
    src.write_ram(image32.data)
    out = ws.path("snap.bin")
    info = snapshot_to_file(src, out)
    assert info["status"] == "completed", f"{info}\n{ws.diagnostics()}"
    assert src.runstate() == "running", "the VM did not keep running"
    res = harness.load_stream(ws, dst_impl, f"file:{out}", GUEST_MIB)
    assert res.outcome == "completed", f"{res}\n{ws.diagnostics()}"
    diff = res.machine.check_ram(image32)
    assert diff is None, f"loaded RAM differs from the image: {diff}"
    # globalstate holds the run state from before the snapshot's stop: running.
    assert res.runstate == "running", res


class SlowReader:
    """A unix socket that takes one stream at about RATE bytes/s into a file: as in
    QEMU, max-bandwidth does not slow a background snapshot, a slow channel does."""

    def __init__(self, path, out, rate):
        self.path, self.out, self.rate = path, out, rate
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(1)
        self.sock.settimeout(30)
        self.error = None
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        try:
            conn, _ = self.sock.accept()
            conn.settimeout(30)
            chunk = 64 * 1024
            with conn, open(self.out, "wb") as f:
                while True:
                    data = conn.recv(chunk)
                    if not data:
                        break
                    f.write(data)
                    time.sleep(len(data) / self.rate)
        except OSError as e:
            self.error = e
        finally:
            self.sock.close()

    def join(self):
        self.thread.join(60)
        assert not self.thread.is_alive(), "the snapshot stream did not end"
        assert self.error is None, self.error


def tag_passes(data, hot):
    """The pass numbers held by the verify workload's tags in the first HOT bytes of
    guest RAM DATA (the first word of each page)."""
    return [struct.unpack_from("<Q", data, off)[0] >> 32 for off in range(0, hot, 4096)]


@pytest.mark.parametrize("accel,shared", [("soft", True), ("soft", False), ("kvm", True)],
                         ids=["soft-shared", "soft-anonymous", "kvm-shared"])
def test_lab_guest_runs_on_and_snapshot_holds_its_moment(ws, accel, shared):
    """A verify guest rewrites its 8 MiB hot set pass after pass while a 32 MiB
    snapshot crawls through a socket read at 8 MiB/s: the guest makes passes meanwhile, the file holds no
    page of a pass later than the snapshot's moment, and the guest loaded from it
    passes its self-check as it runs on."""
    require("vmigrate")
    if accel == "kvm":
        reason = kvm_unusable_reason()
        if reason:
            pytest.skip(reason)
    spec = "hot=8M,verify"
    kw = {} if shared else {"shared": False, "ram_id": "ram"}
    src = lab(ws, "src", GUEST_MIB, accel=accel, workload=spec, **kw).start()
    wait_passes(src, 2)
    out = ws.path("snap.bin")
    reader = SlowReader(ws.path("snap.sock"), out, 8 * MiB)
    src.set_caps(background_snapshot=True)
    src.cmd("migrate", uri=f"unix:{ws.path('snap.sock')}")
    info = src.wait_migration(("active", "completed", "failed"), timeout=20)
    assert info["status"] == "active", info
    at_start = workload(src)
    info = src.wait_migration(timeout=60)
    assert info["status"] == "completed", f"{info}\n{ws.diagnostics()}"
    at_end = workload(src)
    reader.join()
    assert src.runstate() == "running"
    assert at_end["violations"] == 0, at_end
    # The save took seconds; the guest went on passing through its hot set (a KVM guest
    # here runs at about a million instructions a second, so one pass is what it can
    # be asked for; a stopped guest makes none).
    progress = 3 if accel == "soft" else 1
    assert at_end["passes"] >= at_start["passes"] + progress, (at_start, at_end)
    # Paused after the load (the snapshot's globalstate says running): its passes are
    # read before the guest runs on.
    dst = lab(ws, "dst", GUEST_MIB, accel=accel, workload=spec, incoming="defer",
              start_paused=True, **kw).start()
    dst.cmd("migrate-incoming", uri=f"file:{out}")
    di = dst.wait_migration(("completed", "failed"), timeout=30)
    assert di["status"] == "completed", f"{di}\n{ws.diagnostics()}"
    arrived = workload(dst)
    assert arrived["passes"] <= at_start["passes"], (arrived, at_start)
    if accel == "soft":
        passes = tag_passes(dst.ram_pmemsave(0, 8 * MiB), 8 * MiB)
        assert max(passes) <= at_start["passes"] + 1, \
            f"a page of pass {max(passes)} in a snapshot taken at pass {at_start['passes']}"
    if dst.runstate() != "running":
        dst.cmd("cont")
    after = wait_passes(dst, arrived["passes"] + 3)
    assert after["violations"] == 0, after


CONFLICTS = [
    ("postcopy-ram", "postcopy-ram"), ("return-path", "return-path"),
    ("multifd", "multifd"), ("xbzrle", "xbzrle"), ("auto-converge", "auto-converge"),
    ("release-ram", "release-ram"), ("validate-uuid", "validate-uuid"),
    ("pause-before-switchover", "pause-before-switchover"),
]


@pytest.mark.parametrize("impl", [pytest.param("qemu"), pytest.param("vmigrate", marks=pytest.mark.vmigrate)])
def test_background_snapshot_capability_conflicts(ws, impl):
    """Each capability QEMU refuses next to background-snapshot, with its text; the
    capability alone is accepted."""
    require(impl)
    m = ws.vm(impl, "src", mem_mib=16).start()
    for cap, name in CONFLICTS:
        r = m.raw("migrate-set-capabilities", capabilities=[
            {"capability": "background-snapshot", "state": True},
            {"capability": cap, "state": True}])
        assert r.get("error", {}).get("desc") == \
            f"Background-snapshot is not compatible with {name}", (cap, r)
    m.set_caps(background_snapshot=True)
    caps = {c["capability"]: c["state"] for c in m.cmd("query-migrate-capabilities")}
    assert caps["background-snapshot"] is True
    r = m.raw("migrate-set-capabilities",
              capabilities=[{"capability": "multifd", "state": True}])
    assert r["error"]["desc"] == "Background-snapshot is not compatible with multifd", r


def test_cancel_mid_snapshot_frees_the_guest(ws):
    """migrate_cancel while the snapshot crawls through a slow socket: the snapshot
    ends cancelled, the guest runs on unhindered (no page stays protected), and a
    second snapshot completes."""
    require("vmigrate")
    spec = "hot=16M,verify"
    src = lab(ws, "src", 64, workload=spec).start()
    wait_passes(src, 2)
    reader = SlowReader(ws.path("slow.sock"), ws.path("partial.bin"), 2 * MiB)
    src.set_caps(background_snapshot=True)
    src.cmd("migrate", uri=f"unix:{ws.path('slow.sock')}")
    info = src.wait_migration(("active", "completed", "failed"), timeout=20)
    assert info["status"] == "active", info
    src.cmd("migrate_cancel")
    info = src.wait_migration(timeout=20)
    assert info["status"] == "cancelled", info
    reader.join()
    before = workload(src)
    after = wait_passes(src, before["passes"] + 20, timeout=20)
    assert after["violations"] == 0, after
    assert src.runstate() == "running"
    info = snapshot_to_file(src, ws.path("snap.bin"))
    assert info["status"] == "completed", info


@pytest.mark.parametrize("impl", [pytest.param("qemu"), pytest.param("vmigrate", marks=pytest.mark.vmigrate)])
def test_ram_on_a_disk_file_cannot_be_protected(ws, impl):
    """Shared RAM in a file of an ordinary disk filesystem (not tmpfs or hugetlbfs)
    cannot be write-protected with userfaultfd: QEMU's text."""
    require(impl)
    d = ws.path("")
    fs = subprocess.run(["stat", "-f", "-c", "%T", d], capture_output=True, text=True).stdout.strip()
    if fs in ("tmpfs", "hugetlbfs", ""):
        pytest.skip(f"{d} is on {fs or 'an unknown filesystem'}, which can be protected")
    m = ws.vm(impl, "src", mem_mib=16, mem_file=ws.path("disk.ram")).start()
    r = m.raw("migrate-set-capabilities",
              capabilities=[{"capability": "background-snapshot", "state": True}])
    assert r.get("error", {}).get("desc") == \
        "Background-snapshot is not compatible with guest memory configuration", r


def dissect_mapped_ram(path):
    """The oracle dissector's view of a mapped-ram file: its text, the pages its bitmap
    marks present and the RAM section kinds after the setup."""
    out = subprocess.run([sys.executable, str(harness.ORACLE_DIR / "parse_stream.py"), path],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    m = re.search(r"bitmap: \d+ bytes at 0x[0-9a-f]+, (\d+) of (\d+) pages present", out)
    assert m, f"no mapped-ram bitmap in the file:\n{out}"
    kinds = re.findall(r"SECTION_(PART|END) id=\d+ \(ram\)", out)
    return out, int(m.group(1)), kinds


def test_mapped_ram_snapshot_loads_in_both(ws, image32):
    """A running `none` VM snapshotted into a mapped-ram file: pages at their offsets,
    the bitmap written (one bit per non-zero page of the image), RAM PART sections with
    nothing but EOS, no ram END; the file loads in QEMU and in vmigrate with RAM equal to
    the image byte for byte."""
    require("vmigrate", "qemu")
    src = ws.vm("vmigrate", "src", mem_mib=GUEST_MIB).start()
    src.write_ram(image32.data)
    out = ws.path("snap-mr.bin")
    src.set_caps(mapped_ram=True)
    info = snapshot_to_file(src, out)
    assert info["status"] == "completed", f"{info}\n{ws.diagnostics()}"
    assert src.runstate() == "running", "the VM did not keep running"
    dissected, present, kinds = dissect_mapped_ram(out)
    assert present == image32.nonzero_pages, f"bitmap marks {present} pages\n{dissected}"
    assert kinds and set(kinds) == {"PART"}, f"RAM sections {kinds}\n{dissected}"
    assert "XBZRLE" not in dissected and " PAGE " not in dissected, dissected
    assert os.path.getsize(out) < (GUEST_MIB + 2) * MiB, "the file grew past RAM + metadata"
    for impl in ("qemu", "vmigrate"):
        res = harness.load_stream(ws, impl, f"file:{out}", GUEST_MIB, name=f"dst-{impl}",
                                  caps={"mapped_ram": True})
        assert res.outcome == "completed", f"{impl}: {res}\n{ws.diagnostics()}"
        diff = res.machine.check_ram(image32)
        assert diff is None, f"{impl} loaded RAM that differs from the image: {diff}"
        res.machine.quit()


def test_qemus_mapped_ram_snapshot_loads_as_qemu_loads_it(ws, image32):
    """QEMU 10.0.2 accepts background-snapshot with mapped-ram and writes its pages into
    the page area, but never writes the page bitmaps (they belong to the ram END section,
    which a background snapshot has not): the file loads, in QEMU as in vmigrate, with
    every page zero. vmigrate reads it exactly as QEMU does: same outcome, same RAM."""
    require("vmigrate", "qemu")
    src = ws.vm("qemu", "src", mem_mib=GUEST_MIB).start()
    src.write_ram(image32.data)
    out = ws.path("qemu-mr.bin")
    src.set_caps(mapped_ram=True)
    info = snapshot_to_file(src, out)
    assert info["status"] == "completed", f"{info}\n{ws.diagnostics()}"
    _, present, _ = dissect_mapped_ram(out)
    loaded = {}
    for impl in ("qemu", "vmigrate"):
        res = harness.load_stream(ws, impl, f"file:{out}", GUEST_MIB, name=f"dst-{impl}",
                                  caps={"mapped_ram": True})
        assert res.outcome == "completed", f"{impl}: {res}\n{ws.diagnostics()}"
        loaded[impl] = res.machine.ram_pmemsave(0, GUEST_MIB * MiB)
        res.machine.quit()
    assert loaded["vmigrate"] == loaded["qemu"], "vmigrate loaded QEMU's file differently"
    if present:
        # A QEMU that writes the bitmaps: then the RAM is the image.
        assert loaded["qemu"] == image32.data, "QEMU's own snapshot lost pages"


def test_lab_guest_mapped_ram_snapshot_holds_its_moment(ws):
    """A verify guest snapshotted into a mapped-ram file keeps running; the file's hot
    set holds no page of a pass later than the snapshot's own device state, the guest
    went on rewriting those pages during the save, and the guest restored from the file
    runs on with 0 violations."""
    require("vmigrate")
    mem = 256
    spec = "hot=8M,verify"
    src = lab(ws, "src", mem, workload=spec).start()
    wait_passes(src, 2)
    before = workload(src)
    out = ws.path("lab-mr.bin")
    # Every page written (no zero detection): the save lasts long enough for the guest
    # to rewrite its hot set many times over.
    src.set_params(zero_page_detection="none")
    src.set_caps(background_snapshot=True, mapped_ram=True)
    src.cmd("migrate", uri=f"file:{out}")
    info = src.wait_migration(timeout=60)
    assert info["status"] == "completed", f"{info}\n{ws.diagnostics()}"
    after = workload(src)
    assert src.runstate() == "running"
    assert after["violations"] == 0, after
    dst = lab(ws, "dst", mem, workload=spec, incoming="defer", start_paused=True).start()
    dst.set_caps(mapped_ram=True)
    dst.cmd("migrate-incoming", uri=f"file:{out}")
    di = dst.wait_migration(("completed", "failed"), timeout=30)
    assert di["status"] == "completed", f"{di}\n{ws.diagnostics()}"
    arrived = workload(dst)
    assert before["passes"] <= arrived["passes"] <= after["passes"], (before, arrived, after)
    assert after["passes"] >= arrived["passes"] + 3, ("the guest stalled", arrived, after)
    passes = tag_passes(dst.ram_pmemsave(0, 8 * MiB), 8 * MiB)
    assert max(passes) <= arrived["passes"] + 1, \
        f"a page of pass {max(passes)} in a snapshot taken at pass {arrived['passes']}"
    if dst.runstate() != "running":
        dst.cmd("cont")
    on = wait_passes(dst, arrived["passes"] + 3)
    assert on["violations"] == 0, on
