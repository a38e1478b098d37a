"""Postcopy from QEMU 10.0.2 to a vmigrate destination: precopy is held back by a low
`max-bandwidth`, `migrate-start-postcopy` on QEMU switches over, and a `pmemsave` on
the vmigrate destination while postcopy runs faults on pages that have not arrived,
which vmigrate asks QEMU for (QEMU counts them as `postcopy-requests`). Both sides must
complete and the destination's RAM must equal the source image byte for byte, with
anonymous RAM and with RAM in a shared file on /dev/shm."""
import os
import time

import pytest

import harness
from harness import wait_until_status as wait_status
from conftest import require

pytestmark = pytest.mark.vmigrate

MEM_MIB = 64


@pytest.fixture(scope="module")
def image64(session_dir):
    return harness.Image(os.path.join(session_dir, "image64-pc.bin"), MEM_MIB * harness.MiB, 7)


@pytest.mark.parametrize("shared", [False, True], ids=["anonymous", "shm-file"])
def test_qemu_to_vmigrate_postcopy(ws, image64, shared):
    require("qemu", "vmigrate")
    src = ws.vm("qemu", "src", mem_mib=MEM_MIB, ram_id="ram").start()
    src.write_ram(image64.data)
    assert src.check_ram(image64) is None, "source RAM does not hold the image just written"

    dst = ws.vm("vmigrate", "dst", mem_mib=MEM_MIB, ram_id="ram", shared=shared,
                incoming="defer").start()
    assert dst.runstate() == "inmigrate"
    r = dst.raw("migrate-set-capabilities",
                capabilities=[{"capability": "postcopy-ram", "state": True}])
    if "error" in r and "userfaultfd" in r["error"]["desc"]:
        pytest.skip(f"no userfaultfd for this user: {r['error']['desc']}")
    assert "return" in r, r
    for m in (src, dst):
        m.set_caps(events=True, postcopy_ram=True)
    # Precopy at 4 MiB/s cannot finish 64 MiB before the switch; postcopy at 16 MiB/s
    # leaves time for the destination's faults to be asked for.
    src.set_params(max_bandwidth=4 * harness.MiB, max_postcopy_bandwidth=16 * harness.MiB)

    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = harness.socket_port(dst.query_migrate())
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    wait_status(src, "active")
    # Let precopy send a little, then switch.
    t0 = time.time()
    while src.query_migrate().get("ram", {}).get("transferred", 0) < 2 * harness.MiB:
        assert time.time() - t0 < 30, f"precopy does not move: {src.query_migrate()}"
        time.sleep(0.02)
    src.cmd("migrate-start-postcopy")

    info = wait_status(dst, "postcopy-active")
    assert "ram" not in info, f"a destination shows no ram statistics: {info}"
    # Not paused: migrate-recover is refused (QEMU's text), and postcopy goes on.
    r = dst.raw("migrate-recover", uri="tcp:127.0.0.1:0")
    assert r.get("error", {}).get("desc") == \
        "Migrate recover can only be run when postcopy is paused.", r
    # Reads of pages that have not arrived fault and are asked for.
    ram = dst.ram_pmemsave()
    assert len(ram) == image64.size
    diff = harness.first_difference(ram, image64.data)
    assert diff is None, f"pmemsave during postcopy differs from the source image: {diff}"

    si = src.wait_migration(timeout=120)
    di = dst.wait_migration(("completed", "failed"), timeout=120)
    assert si.get("status") == "completed", f"source: {si}\n{ws.diagnostics()}"
    assert di.get("status") == "completed", f"destination: {di}\n{ws.diagnostics()}"
    requests = si["ram"].get("postcopy-requests", 0)
    assert requests > 0, f"QEMU counted no postcopy requests: {si}"
    print(f"\npostcopy ({'shm' if shared else 'anonymous'}): QEMU postcopy-requests "
          f"{requests}, vmigrate requests {di.get('x-vmigrate-postcopy-requests')}, zero "
          f"faults {di.get('x-vmigrate-postcopy-zero-faults')}, requested-fault latency "
          f"{di.get('x-vmigrate-fault-latency-us')}")
    assert di.get("x-vmigrate-postcopy-requests") == requests, di
    assert di["x-vmigrate-fault-latency-us"]["count"] > 0, di

    # Events and run states: the destination went through postcopy-active and runs.
    assert dst.wait_event("MIGRATION:completed")
    names = dst.event_names()
    assert names.index("MIGRATION:postcopy-active") < names.index("MIGRATION:completed"), names
    assert dst.runstate() == "running"
    assert src.runstate() == "postmigrate"

    # RAM, byte for byte, once everything arrived.
    if shared:
        assert dst.check_ram(image64) is None
    assert dst.check_ram_pmemsave(image64) is None


def test_postcopy_host_check_matches_qemu(ws):
    """A destination whose RAM is a file outside tmpfs/hugetlbfs refuses postcopy-ram
    with QEMU's text; on /dev/shm both accept it."""
    require("qemu", "vmigrate")
    if os.statvfs("/tmp").f_fsid == os.statvfs("/dev/shm").f_fsid:
        pytest.skip("/tmp is the same filesystem as /dev/shm")
    replies = {}
    for where in ("tmp", "shm"):
        for impl in ("qemu", "vmigrate"):
            name = f"{impl}-{where}"
            path = ws.path(f"{name}.ram") if where == "tmp" else ws.shm_path(f"{name}.ram")
            m = ws.vm(impl, name, mem_mib=16, mem_file=path, incoming="defer").start()
            replies[(impl, where)] = m.raw(
                "migrate-set-capabilities",
                capabilities=[{"capability": "postcopy-ram", "state": True},
                              {"capability": "multifd", "state": True}])
            m.quit()
    want = {"error": {"class": "GenericError", "desc": "Postcopy is not supported: Host "
                      "backend files need to be TMPFS or HUGETLBFS only"}}
    assert replies[("qemu", "tmp")] == want, replies
    assert replies[("vmigrate", "tmp")] == want, replies
    # On tmpfs the host check passes and QEMU's next rule speaks, on both.
    assert replies[("vmigrate", "shm")] == replies[("qemu", "shm")], replies
    assert "multifd" in replies[("qemu", "shm")]["error"]["desc"], replies


def test_source_lost_during_postcopy_pauses_the_destination(ws, image64):
    """The source dies while postcopy runs: as QEMU, the destination pauses
    (`postcopy-paused`) and waits for a recovery that could bring the pages it lacks;
    its monitor keeps answering, and `migrate-recover` is taken."""
    require("qemu", "vmigrate")
    src = ws.vm("qemu", "src", mem_mib=MEM_MIB, ram_id="ram").start()
    src.write_ram(image64.data)
    dst = ws.vm("vmigrate", "dst", mem_mib=MEM_MIB, ram_id="ram", shared=False,
                incoming="defer").start()
    r = dst.raw("migrate-set-capabilities",
                capabilities=[{"capability": "postcopy-ram", "state": True}])
    if "error" in r and "userfaultfd" in r["error"]["desc"]:
        pytest.skip(f"no userfaultfd for this user: {r['error']['desc']}")
    dst.raw("migrate-incoming", uri="tcp:127.0.0.1:0", **{"exit-on-error": False})
    for m in (src, dst):
        m.set_caps(events=True, postcopy_ram=True)
    # Slow enough that postcopy is far from done when the source dies.
    src.set_params(max_bandwidth=4 * harness.MiB, max_postcopy_bandwidth=1 * harness.MiB)
    port = harness.socket_port(dst.query_migrate())
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    wait_status(src, "active")
    src.cmd("migrate-start-postcopy")
    wait_status(dst, "postcopy-active")
    src.kill9()

    di = wait_status(dst, "postcopy-paused", timeout=30)
    assert "error-desc" in di, di
    assert dst.wait_event("MIGRATION:postcopy-paused")
    # The monitor answers while the guest waits on its pages.
    t0 = time.time()
    assert dst.runstate() == "running"
    dst.cmd("migrate-recover", uri="tcp:127.0.0.1:0")
    assert dst.query_migrate()["status"] == "postcopy-paused"
    assert time.time() - t0 < 10
