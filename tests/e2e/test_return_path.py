"""The return path in precopy: `return-path` and `switchover-ack` between QEMU 10.0.2
and vmigrate, both directions. The source opens the return path, the destination answers
PING with PONG, acknowledges switchover at once (no device holds the ack) and ends with
SHUT 0; the source completes only after that."""
import pytest

import harness
from conftest import require

PAIRS = [
    pytest.param("qemu", "vmigrate", marks=pytest.mark.vmigrate, id="qemu-to-vmigrate"),
    pytest.param("vmigrate", "qemu", marks=pytest.mark.vmigrate, id="vmigrate-to-qemu"),
    pytest.param("vmigrate", "vmigrate", marks=pytest.mark.vmigrate, id="vmigrate-to-vmigrate"),
    pytest.param("qemu", "qemu", marks=pytest.mark.harness_check, id="harness_check-qemu-to-qemu"),
]


@pytest.mark.parametrize("caps", [{"return_path": True},
                                  {"return_path": True, "switchover_ack": True}],
                         ids=["return-path", "switchover-ack"])
@pytest.mark.parametrize("src_impl,dst_impl", PAIRS)
@pytest.mark.parametrize("running", [False, True], ids=["paused", "running"])
def test_return_path(ws, small_image, src_impl, dst_impl, caps, running):
    require(src_impl, dst_impl)
    mib = small_image.size >> 20
    src = ws.vm(src_impl, "src", mem_mib=mib).start()
    src.write_ram(small_image.data)
    if not running:
        src.cmd("stop")
    dst = ws.vm(dst_impl, "dst", mem_mib=mib, incoming=harness.incoming_for(ws, "tcp")).start()
    for m in (src, dst):
        m.set_caps(events=True, **caps)
    src.set_params(max_bandwidth=0)
    si, di = harness.migrate(ws, src, dst, "tcp")
    assert si.get("status") == "completed", f"source: {si}\n{ws.diagnostics()}"
    assert di.get("status") == "completed", f"destination: {di}\n{ws.diagnostics()}"
    assert dst.check_ram(small_image) is None
    assert dst.runstate() == ("running" if running else "paused")
    assert src.runstate() == "postmigrate"


@pytest.mark.vmigrate
def test_return_path_on_file_fails_cleanly(ws, small_image):
    """A file has no way back: the source fails with QEMU's message and keeps running."""
    mib = small_image.size >> 20
    src = ws.vm("vmigrate", "src", mem_mib=mib).start()
    src.set_caps(return_path=True)
    src.cmd("migrate", uri=f"file:{ws.path('rp.bin')}")
    info = src.wait_migration()
    assert info["status"] == "failed", info
    assert "return-path" in info.get("error-desc", ""), info
    assert src.runstate() == "running"
