"""The `fd:` transport: a socket handed to the source with QMP `getfd` (SCM_RIGHTS), to a
vmigrate or QEMU destination listening on tcp; and `getfd` errors."""
import socket

import pytest

import harness
from conftest import require


@pytest.mark.parametrize("dst_impl", [
    pytest.param("vmigrate", marks=pytest.mark.vmigrate),
    pytest.param("qemu", marks=pytest.mark.vmigrate),
])
def test_migrate_over_getfd_socket(ws, small_image, dst_impl):
    require("vmigrate", dst_impl)
    mib = small_image.size >> 20
    src = ws.vm("vmigrate", "src", mem_mib=mib).start()
    src.write_ram(small_image.data)
    dst = ws.vm(dst_impl, "dst", mem_mib=mib, incoming="defer").start()
    src.set_params(max_bandwidth=0)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = harness.socket_port(dst.query_migrate())
    conn = socket.create_connection(("127.0.0.1", port))
    try:
        src.qmp.send_fd_scm(conn.fileno())
        r = src.raw("getfd", fdname="mig")
        assert "return" in r, r
    finally:
        conn.close()
    src.cmd("migrate", uri="fd:mig")
    si = src.wait_migration()
    di = dst.wait_migration()
    assert si["status"] == "completed", f"{si}\n{ws.diagnostics()}"
    assert di["status"] == "completed", di
    assert dst.check_ram(small_image) is None
    assert dst.runstate() == "running"


@pytest.mark.vmigrate
def test_fd_errors_match_qemu(ws):
    src = ws.vm("vmigrate", "src", mem_mib=16).start()
    r = src.raw("migrate", uri="fd:nosuch")
    assert r["error"]["desc"] == "File descriptor named 'nosuch' has not been found", r
    r = src.raw("getfd", fdname="x")
    assert "error" in r, r
