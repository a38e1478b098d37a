"""Postcopy with vmigrate as the source and QEMU 10.0.2 as the destination: precopy
runs slowly, `migrate-start-postcopy` switches, the destination runs the guest and reads
RAM the source has not pushed yet (`pmemsave`), which makes it request those pages; the
migration completes and the RAM arrives byte for byte. QEMU to QEMU runs the same script
as a check of the harness. The QMP errors of `migrate-start-postcopy` are compared with
QEMU's."""
import os
import time

import pytest

import harness
from conftest import require

MiB = harness.MiB
GUEST_MIB = 64

PAIRS = [
    pytest.param("vmigrate", "qemu", marks=pytest.mark.vmigrate, id="vmigrate-to-qemu"),
    pytest.param("vmigrate", "vmigrate", marks=pytest.mark.vmigrate, id="vmigrate-to-vmigrate"),
    pytest.param("qemu", "qemu", marks=pytest.mark.harness_check, id="harness_check-qemu-to-qemu"),
]


@pytest.fixture(scope="module")
def image64(session_dir):
    return harness.Image(os.path.join(session_dir, "image64.bin"), GUEST_MIB * MiB, 7)


def wait_status(m, want, timeout=60):
    """Polls query-migrate until its status is one of WANT (or the migration ended)."""
    return m.wait_migration(tuple(want) + ("completed", "failed", "cancelled"), timeout)


@pytest.mark.parametrize("src_impl,dst_impl", PAIRS)
def test_postcopy_with_page_requests(ws, image64, src_impl, dst_impl):
    require(src_impl, dst_impl)
    src = ws.vm(src_impl, "src", mem_mib=GUEST_MIB).start()
    src.write_ram(image64.data)
    assert src.runstate() == "running"
    dst = ws.vm(dst_impl, "dst", mem_mib=GUEST_MIB, incoming="defer").start()
    for m in (src, dst):
        m.set_caps(events=True, postcopy_ram=True)
    # Precopy at 4 MiB/s would take 16 s: it is still going when postcopy starts; the
    # background push then runs at 8 MiB/s, slow enough for pages to be requested.
    src.set_params(max_bandwidth=4 * MiB, max_postcopy_bandwidth=8 * MiB)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = harness.socket_port(dst.query_migrate())
    t0 = time.monotonic()
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = wait_status(src, ["active"])
    assert info["status"] == "active", info
    assert "expected-downtime" in info
    src.cmd("migrate-start-postcopy")
    info = wait_status(src, ["postcopy-active"])
    assert info["status"] == "postcopy-active", f"{info}\n{ws.diagnostics()}"
    assert "downtime" in info and "expected-downtime" not in info, info
    assert info["ram"]["remaining"] > 0, info
    # The destination runs the guest now; reading the end of RAM, which the push has
    # not reached, makes it fault and request those pages.
    di = wait_status(dst, ["postcopy-active"])
    assert di["status"] == "postcopy-active", di
    assert dst.wait_runstate("running") == "running"
    tail = GUEST_MIB * MiB - MiB
    got = dst.ram_pmemsave(tail, MiB)
    assert got == image64.data[tail:], "pages read during postcopy differ"
    during = src.query_migrate()
    si = src.wait_migration(timeout=120)
    di = dst.wait_migration(("completed", "failed"), timeout=60)
    total = time.monotonic() - t0
    assert si["status"] == "completed", f"source: {si}\n{ws.diagnostics()}"
    assert di["status"] == "completed", f"destination: {di}\n{ws.diagnostics()}"
    diff = dst.check_ram(image64)
    assert diff is None, f"destination RAM differs from the source image: {diff}"
    assert dst.runstate() == "running"
    assert src.runstate() == "postmigrate"
    ram = si["ram"]
    requests = max(ram["postcopy-requests"], during["ram"]["postcopy-requests"])
    assert requests > 0, si
    assert ram["postcopy-bytes"] > 0 and ram["precopy-bytes"] > 0, si
    # No RAM goes while neither side runs the guest.
    assert ram["downtime-bytes"] == 0, si
    assert ram["remaining"] == 0
    events = src.event_names()
    seq = [e for e in events if e.startswith("MIGRATION:")]
    assert seq[-3:] == ["MIGRATION:device", "MIGRATION:postcopy-active",
                        "MIGRATION:completed"], events
    print(f"\n{src_impl}->{dst_impl}: postcopy-requests={requests} "
          f"downtime={si.get('downtime')}ms total={total:.1f}s "
          f"precopy={ram['precopy-bytes']} downtime-bytes={ram['downtime-bytes']} "
          f"postcopy={ram['postcopy-bytes']}")


@pytest.mark.vmigrate
def test_start_postcopy_errors_match_qemu(ws):
    require("qemu", "vmigrate")
    replies = {}
    for impl in ("qemu", "vmigrate"):
        m = ws.vm(impl, impl, mem_mib=16).start()
        seq = [m.raw("migrate-start-postcopy")]
        m.set_caps(postcopy_ram=True)
        seq.append(m.raw("migrate-start-postcopy"))
        replies[impl] = [r.get("error") for r in seq]
    assert replies["vmigrate"] == replies["qemu"]
    assert replies["qemu"] == [
        {"class": "GenericError",
         "desc": "Enable postcopy with migrate_set_capability before the start of migration"},
        {"class": "GenericError",
         "desc": "Postcopy must be started after migration has been started"},
    ]


@pytest.mark.vmigrate
def test_postcopy_to_a_file_fails_cleanly(ws):
    """postcopy-ram needs the return path, which a file does not have: the source fails
    and keeps running. (QEMU 10.0.2 says `Unable to read from file: Bad file
    descriptor` when its return-path thread reads the file; vmigrate names the cause.)"""
    src = ws.vm("vmigrate", "src", mem_mib=16).start()
    src.set_caps(postcopy_ram=True)
    src.cmd("migrate", uri=f"file:{ws.path('pc.bin')}")
    info = src.wait_migration()
    assert info["status"] == "failed", info
    assert info.get("error-desc") == "Unable to open return-path for postcopy", info
    assert src.runstate() == "running"
