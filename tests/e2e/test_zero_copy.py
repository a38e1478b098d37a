"""zero-copy-send: multifd channels send guest pages with MSG_ZEROCOPY.

On loopback the kernel copies anyway (the receiving socket would otherwise see memory
the sender may still change), so every sync counts in `dirty-sync-missed-zero-copy`, on
QEMU as on vmigrate; RAM must still arrive byte for byte, both ways.
"""
import time

import pytest

import harness
from conftest import require

pytestmark = pytest.mark.vmigrate

MiB = harness.MiB
LOAD = ["--workload", "hot=8M,rate=32M", "--cpus", "2"]


def zero_copy_caps(m):
    m.set_caps(multifd=True, zero_copy_send=True)
    m.set_params(multifd_channels=2)


def start_incoming(dst):
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    return f"tcp:127.0.0.1:{harness.socket_port(dst.query_migrate())}"


@pytest.mark.parametrize("dst_impl", ["qemu", "vmigrate"])
def test_a_loaded_none_vm_migrates_with_zero_copy(ws, dst_impl):
    require("vmigrate", dst_impl)
    src = ws.vm("vmigrate", "src", mem_mib=32, extra=LOAD).start()
    dst = ws.vm(dst_impl, "dst", mem_mib=32, incoming="defer").start()
    for m in (src, dst):
        m.set_caps(multifd=True)
        m.set_params(multifd_channels=2)
    src.set_caps(zero_copy_send=True)
    t0 = time.time()
    while src.cmd("query-workload")["pages-written"] < 2048 and time.time() - t0 < 20:
        time.sleep(0.05)
    src.set_params(max_bandwidth=64 * MiB, downtime_limit=100)
    src.cmd("migrate", uri=start_incoming(dst))
    si = src.wait_migration(timeout=60)
    assert si["status"] == "completed", si
    di = dst.wait_migration(("completed", "failed"), timeout=30)
    assert di["status"] == "completed", f"{di}\n{dst.stderr_tail()}"
    ram = si["ram"]
    assert ram["multifd-bytes"] > 0, ram
    # Loopback: the kernel copied every send; one count per channel and sync.
    assert ram["dirty-sync-missed-zero-copy"] >= 2, ram
    first = harness.first_difference(src.ram(), dst.ram_pmemsave())
    assert first is None, f"RAM differs from byte {first}"


def test_qemu_with_zero_copy_into_vmigrate(ws, small_image):
    require("qemu", "vmigrate")
    mib = small_image.size >> 20
    src = ws.vm("qemu", "src", mem_mib=mib).start()
    src.write_ram(small_image.data)
    dst = ws.vm("vmigrate", "dst", mem_mib=mib, incoming="defer").start()
    for m in (src, dst):
        m.set_caps(multifd=True)
        m.set_params(multifd_channels=2)
    src.set_caps(zero_copy_send=True)
    src.set_params(max_bandwidth=0)
    src.cmd("migrate", uri=start_incoming(dst))
    si = src.wait_migration(timeout=60)
    assert si["status"] == "completed", si
    assert dst.wait_migration(("completed", "failed"), timeout=30)["status"] == "completed"
    assert si["ram"]["dirty-sync-missed-zero-copy"] >= 1, si["ram"]
    assert dst.check_ram_pmemsave(small_image) is None


def failure_text(m, uri):
    m.cmd("migrate", uri=uri)
    info = m.wait_migration(("failed", "completed", "cancelled"), timeout=30)
    return info["status"], info.get("error-desc", "")


@pytest.mark.parametrize("impl", ["qemu", "vmigrate"])
def test_zero_copy_rules_and_texts_match_qemu(ws, impl):
    """The capability's rules, and a channel that cannot send with MSG_ZEROCOPY (a unix
    socket): the same texts from both."""
    require(impl)
    m = ws.vm(impl, "src", mem_mib=16).start()
    r = m.raw("migrate-set-capabilities",
              capabilities=[{"capability": "zero-copy-send", "state": True}])
    assert r["error"]["desc"] == \
        "Zero copy only available for non-compressed non-TLS multifd migration", r
    zero_copy_caps(m)
    r = m.raw("migrate-set-parameters", **{"multifd-compression": "zlib"})
    assert "error" not in r or "Zero copy" in r["error"]["desc"], r
    m.set_params(multifd_compression="none")
    dst = ws.vm("vmigrate", "dst", mem_mib=16, incoming="defer").start()
    dst.set_caps(multifd=True)
    dst.set_params(multifd_channels=2)
    path = ws.path("zc.sock")
    dst.cmd("migrate-incoming", uri=f"unix:{path}")
    status, text = failure_text(m, f"unix:{path}")
    assert status == "failed", text
    assert text == "Zero copy send feature not detected in host kernel", text


@pytest.mark.parametrize("impl", ["qemu", "vmigrate"])
def test_a_low_locked_memory_limit_fails_with_qemus_text(ws, impl, small_image):
    """MSG_ZEROCOPY pins the pages in flight against RLIMIT_MEMLOCK (unless the process
    has CAP_IPC_LOCK): the source runs without that capability and with a 64 KiB limit."""
    require(impl, "vmigrate")
    import shutil
    if not (shutil.which("setpriv") and shutil.which("prlimit")):
        pytest.skip("setpriv and prlimit (util-linux) are needed to lower the limit")
    mib = small_image.size >> 20
    src = ws.vm(impl, "src", mem_mib=mib)
    base = src.argv
    src.argv = lambda: (["setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock",
                         "prlimit", "--memlock=65536:65536"] + base())
    src.start()
    src.write_ram(small_image.data)
    dst = ws.vm("vmigrate", "dst", mem_mib=mib, incoming="defer").start()
    for m in (src, dst):
        m.set_caps(multifd=True)
        m.set_params(multifd_channels=2)
    src.set_caps(zero_copy_send=True)
    src.set_params(max_bandwidth=0)
    status, text = failure_text(src, start_incoming(dst))
    assert status == "failed", text
    assert "Process can't lock enough memory for using MSG_ZEROCOPY" in text, text
    assert src.alive()
