"""A `none` VM under load: `vmigrate vm --machine none --workload SPEC` runs writer
threads whose writes are dirty-tracked and whose state does not migrate, so the machine
still migrates live to and from QEMU's `-M none`. The source's RAM after switchover (it
stopped, nothing writes any more) must arrive byte for byte."""
import subprocess
import time

import pytest

import harness
from conftest import require

MEM_MIB = 64
LOAD = ["--workload", "hot=16M,rate=64M", "--cpus", "2"]


def dirtied(m, timeout=10):
    """Waits until the writers of M have written pages; returns query-workload."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        w = m.cmd("query-workload")
        if w["pages-written"] > 0:
            return w
        time.sleep(0.02)
    raise harness.HarnessError(f"{m.name}: the writers wrote nothing in {timeout}s")


@pytest.mark.vmigrate
@pytest.mark.parametrize("dst_impl", ["qemu", "vmigrate"])
def test_a_loaded_none_vm_migrates_live(ws, dst_impl):
    require("vmigrate", dst_impl)
    src = ws.vm("vmigrate", "src", mem_mib=MEM_MIB, extra=LOAD).start()
    before = dirtied(src)
    dst = ws.vm(dst_impl, "dst", mem_mib=MEM_MIB, incoming="defer").start()
    for m in (src, dst):
        m.set_caps(events=True)
    # Slow enough that the writers dirty pages between passes: several syncs.
    src.set_params(max_bandwidth=256 << 20, downtime_limit=300)
    si, di = harness.migrate(ws, src, dst, "tcp")
    assert si.get("status") == "completed", f"source: {si}\n{ws.diagnostics()}"
    assert di.get("status") == "completed", f"destination: {di}\n{ws.diagnostics()}"
    assert si["ram"]["dirty-sync-count"] >= 2, si
    after = src.cmd("query-workload")
    assert after["pages-written"] > before["pages-written"], "the writers stood still"
    # The source stopped at switchover: its RAM is what the destination must hold.
    assert src.runstate() == "postmigrate"
    first = harness.first_difference(src.ram(), dst.ram_pmemsave())
    assert first is None, f"RAM differs from byte {first}\n{ws.diagnostics()}"


@pytest.mark.vmigrate
def test_qemu_into_a_loaded_none_vm(ws, small_image):
    """QEMU's RAM arrives whole; the destination's writers start only once it runs."""
    require("qemu", "vmigrate")
    src = ws.vm("qemu", "src", mem_mib=small_image.size >> 20).start()
    src.write_ram(small_image.data)
    src.cmd("stop")
    dst = ws.vm("vmigrate", "dst", mem_mib=small_image.size >> 20, incoming="defer",
                start_paused=True, extra=LOAD).start()
    assert dst.cmd("query-workload")["pages-written"] == 0
    src.set_params(max_bandwidth=0)
    si, di = harness.migrate(ws, src, dst, "tcp")
    assert di.get("status") == "completed", f"destination: {di}\n{ws.diagnostics()}"
    assert dst.check_ram(small_image) is None
    assert dst.cmd("query-workload")["pages-written"] == 0, "writers ran while paused"
    dst.cmd("cont")
    dirtied(dst)


@pytest.mark.vmigrate
@pytest.mark.parametrize("argv,needle", [
    (["--workload", "hot=8M,verify"], "--workload verify needs --machine lab"),
    (["--accel", "soft"], "--accel needs --machine lab"),
    (["--cpus", "2"], "--cpus needs --machine lab or a --workload"),
])
def test_what_a_none_vm_refuses(argv, needle):
    require("vmigrate")
    r = subprocess.run([harness.vmigrate_bin(), "vm", "--machine", "none", *argv],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode != 0
    assert needle in r.stderr, r.stderr
