"""Postcopy finishes what precopy cannot: `lab` guests whose dirty rate outruns the link
(soft vCPUs writing as fast as they can, and a KVM guest over a link slower than its
RAM takes to send) switch to postcopy with `migrate-start-postcopy`, run on the
destination while their missing pages are fetched on demand, and their self-check
(`verify`) finds no page lost or stale."""
import time

import pytest

import harness
from test_lab import kvm_unusable_reason, lab, start_incoming, wait_passes, workload
from conftest import require

pytestmark = pytest.mark.vmigrate

MiB = harness.MiB


def switch_to_postcopy_and_finish(src, dst):
    src.cmd("migrate-start-postcopy")
    si = src.wait_migration(timeout=60)
    assert si["status"] == "completed", si
    di = dst.wait_migration(("completed", "failed"), timeout=30)
    assert di["status"] == "completed", di
    assert src.runstate() == "postmigrate"
    assert dst.runstate() == "running"
    return si, di


def test_soft_guest_that_precopy_cannot_converge_finishes_in_postcopy(ws):
    require("vmigrate")
    spec = "hot=64M,verify"             # as fast as a vCPU can write: GB/s
    src = lab(ws, "src", 128, workload=spec, cpus=2).start()
    dst = lab(ws, "dst", 128, workload=spec, cpus=2, incoming="defer").start()
    wait_passes(src, 2)
    for m in (src, dst):
        m.set_caps(events=True, postcopy_ram=True)
    # 1 ms of downtime at 64 MiB/s is 16 pages: a guest writing its hot set leaves more
    # than that after every pass, even when a loaded machine slows its vCPUs.
    src.set_params(max_bandwidth=64 * MiB, downtime_limit=1)
    src.cmd("migrate", uri=start_incoming(dst))
    # Precopy does not converge: passes go by and the migration stays active.
    t0 = time.time()
    info = src.query_migrate()
    while info["ram"]["dirty-sync-count"] < 4 if "ram" in info else True:
        assert info["status"] in ("setup", "active"), info
        assert time.time() - t0 < 30, info
        time.sleep(0.1)
        info = src.query_migrate()
    assert info["status"] == "active", info
    si, di = switch_to_postcopy_and_finish(src, dst)
    arrived = workload(dst)
    after = wait_passes(dst, arrived["passes"] + 3, timeout=30)
    assert after["violations"] == 0, after
    assert si["ram"]["postcopy-requests"] > 0, si
    print(f"\nsoft: postcopy-requests={si['ram']['postcopy-requests']} "
          f"downtime={si['downtime']}ms total={si['total-time']}ms "
          f"faults={di.get('x-vmigrate-fault-latency-us')}")


def test_kvm_guest_finishes_in_postcopy(ws):
    require("vmigrate")
    reason = kvm_unusable_reason()
    if reason:
        print(f"SKIP test_kvm_guest_finishes_in_postcopy: {reason}")
        pytest.skip(reason)
    spec = "hot=1M,verify"
    src = lab(ws, "src", 16, accel="kvm", workload=spec).start()
    dst = lab(ws, "dst", 16, accel="kvm", workload=spec, incoming="defer").start()
    wait_passes(src, 2)
    for m in (src, dst):
        m.set_caps(events=True, postcopy_ram=True)
    # 16 MiB at 1 MiB/s: precopy is far from done when postcopy starts.
    src.set_params(max_bandwidth=1 * MiB)
    src.cmd("migrate", uri=start_incoming(dst))
    assert src.wait_migration(("active",), timeout=20)["status"] == "active"
    time.sleep(0.5)
    switch_to_postcopy_and_finish(src, dst)
    arrived = workload(dst)
    after = wait_passes(dst, arrived["passes"] + 3, timeout=60)
    assert after["violations"] == 0, after
