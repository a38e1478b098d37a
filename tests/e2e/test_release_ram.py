"""`release-ram` on a vmigrate postcopy source: once the switch has happened, every page
sent is freed on the source (a punched hole in its shared RAM file), so the file's
allocated blocks drop well below the guest's size, while the destination (QEMU 10.0.2
or vmigrate) ends with RAM equal to the image byte for byte."""
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
]


@pytest.fixture(scope="module")
def image64(session_dir):
    return harness.Image(os.path.join(session_dir, "image64-release.bin"), GUEST_MIB * MiB, 11)


def allocated_bytes(path):
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("src_impl,dst_impl", PAIRS)
def test_release_ram_frees_the_source_ram_file(ws, image64, src_impl, dst_impl):
    require(src_impl, dst_impl)
    src = ws.vm(src_impl, "src", mem_mib=GUEST_MIB).start()
    src.write_ram(image64.data)
    dst = ws.vm(dst_impl, "dst", mem_mib=GUEST_MIB, incoming="defer").start()
    src.set_caps(events=True, postcopy_ram=True, release_ram=True)
    dst.set_caps(events=True, postcopy_ram=True)
    caps = {c["capability"]: c["state"] for c in src.cmd("query-migrate-capabilities")}
    assert caps["release-ram"] is True
    # Precopy crawls (4 MiB/s) and postcopy starts at once: nearly all of RAM goes in
    # postcopy, at 32 MiB/s.
    src.set_params(max_bandwidth=4 * MiB, max_postcopy_bandwidth=32 * MiB)
    before = allocated_bytes(src.mem_file)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = harness.socket_port(dst.query_migrate())
    t0 = time.monotonic()
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src.wait_migration(("active", "completed", "failed", "cancelled"), timeout=60)
    assert info["status"] == "active", info
    src.cmd("migrate-start-postcopy")
    si = src.wait_migration(timeout=120)
    di = dst.wait_migration(("completed", "failed"), timeout=60)
    total = time.monotonic() - t0
    assert si["status"] == "completed", f"source: {si}\n{ws.diagnostics()}"
    assert di["status"] == "completed", f"destination: {di}\n{ws.diagnostics()}"
    after = allocated_bytes(src.mem_file)
    size = GUEST_MIB * MiB
    diff = dst.check_ram(image64)
    assert diff is None, f"destination RAM differs from the source image: {diff}"
    assert dst.runstate() == "running"
    assert src.runstate() == "postmigrate"
    # The file keeps its size; what precopy sent stays (the VM ran then), the rest is
    # freed.
    assert os.stat(src.mem_file).st_size == size
    ram = si["ram"]
    assert before >= size * 9 // 10, before
    assert after < size // 4, f"allocated after: {after} of {size}; {si}"
    assert after <= ram["precopy-bytes"] + 4 * MiB, (after, ram)
    print(f"\n{src_impl}->{dst_impl}: source RAM file allocated "
          f"{before // 512} blocks ({before / MiB:.1f} MiB) before, "
          f"{after // 512} blocks ({after / MiB:.1f} MiB) after; "
          f"precopy-bytes={ram['precopy-bytes']} postcopy-bytes={ram['postcopy-bytes']} "
          f"total={total:.1f}s")


@pytest.mark.vmigrate
def test_release_ram_capability_rules_match_qemu(ws):
    """release-ram alone is accepted; with background-snapshot it is refused, with
    QEMU's text."""
    require("qemu", "vmigrate")
    replies = {}
    for impl in ("qemu", "vmigrate"):
        m = ws.vm(impl, impl, mem_mib=16).start()
        seq = [m.raw("migrate-set-capabilities",
                     capabilities=[{"capability": "release-ram", "state": True}])]
        seq.append(m.raw("migrate-set-capabilities",
                         capabilities=[{"capability": "background-snapshot", "state": True}]))
        seq.append(m.raw("query-migrate-capabilities"))
        replies[impl] = seq
    assert replies["vmigrate"] == replies["qemu"]
    assert replies["qemu"][0] == {"return": {}}
    assert replies["qemu"][1]["error"]["desc"] in (
        "Background-snapshot is not compatible with release-ram",
        "Background-snapshot is not supported by host kernel",
    )
