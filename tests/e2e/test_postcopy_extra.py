"""Postcopy extras, vmigrate to vmigrate with soft `lab` guests that precopy cannot
converge: the automatic switch (`x-vmigrate-postcopy-after`, vmigrate's own parameter)
finishes the migration without `migrate-start-postcopy`, and the guest's self-check
(`verify`) finds no page lost or stale."""
import time

import pytest

import harness
from test_lab import lab, start_incoming, wait_passes, workload
from conftest import require

pytestmark = pytest.mark.vmigrate

MiB = harness.MiB
SPEC = "hot=64M,verify"             # as fast as a vCPU can write: GB/s


def pair(ws):
    src = lab(ws, "src", 128, workload=SPEC, cpus=2).start()
    dst = lab(ws, "dst", 128, workload=SPEC, cpus=2, incoming="defer").start()
    wait_passes(src, 2)
    return src, dst


def finish_and_verify(src, dst):
    si = src.wait_migration(timeout=60)
    assert si["status"] == "completed", si
    di = dst.wait_migration(("completed", "failed"), timeout=30)
    assert di["status"] == "completed", di
    assert src.runstate() == "postmigrate"
    assert dst.runstate() == "running"
    arrived = workload(dst)
    after = wait_passes(dst, arrived["passes"] + 3, timeout=30)
    assert after["violations"] == 0, after
    return si, di


def test_precopy_that_cannot_converge_switches_to_postcopy_by_itself(ws):
    require("vmigrate")
    src, dst = pair(ws)
    assert src.cmd("query-migrate-parameters")["x-vmigrate-postcopy-after"] == 0
    for m in (src, dst):
        m.set_caps(events=True, postcopy_ram=True)
    src.set_params(max_bandwidth=64 * MiB, downtime_limit=300)
    r = src.cmd("human-monitor-command",
                **{"command-line": "migrate_set_parameter x-vmigrate-postcopy-after 1500"})
    assert r == "", r
    assert src.cmd("query-migrate-parameters")["x-vmigrate-postcopy-after"] == 1500
    t0 = time.monotonic()
    src.cmd("migrate", uri=start_incoming(dst))
    # Still precopy well before the deadline.
    time.sleep(0.8)
    info = src.query_migrate()
    assert info["status"] == "active", info
    info = src.wait_migration(("postcopy-active", "completed", "failed"), timeout=30)
    switched = time.monotonic() - t0
    assert info["status"] in ("postcopy-active", "completed"), info
    assert switched >= 1.5, switched
    si, _ = finish_and_verify(src, dst)
    assert si["ram"]["postcopy-bytes"] > 0, si
    assert si["ram"]["dirty-sync-count"] >= 2, si
    print(f"\nauto-switch after {switched:.2f}s: total={si['total-time']}ms "
          f"postcopy-requests={si['ram']['postcopy-requests']}")


def test_destination_reports_postcopy_blocktime(ws):
    """postcopy-blocktime on the destination: per vCPU, the time from a vCPU's fault
    to its page being placed; overall, the time all vCPUs were blocked at once."""
    require("vmigrate")
    src, dst = pair(ws)
    for m in (src, dst):
        m.set_caps(events=True, postcopy_ram=True)
    dst.set_caps(postcopy_blocktime=True)
    src.set_params(max_bandwidth=64 * MiB, downtime_limit=300,
                   x_vmigrate_postcopy_after=1000)
    src.cmd("migrate", uri=start_incoming(dst))
    info = src.wait_migration(("postcopy-active", "completed", "failed"), timeout=30)
    assert info["status"] in ("postcopy-active", "completed"), info
    t_switch = time.monotonic()
    si, di = finish_and_verify(src, dst)
    postcopy_ms = (time.monotonic() - t_switch) * 1000 + 1000
    assert isinstance(di["postcopy-blocktime"], int), di
    per_vcpu = di["postcopy-vcpu-blocktime"]
    assert len(per_vcpu) == 2, di
    assert all(isinstance(x, int) and 0 <= x <= postcopy_ms for x in per_vcpu), di
    assert sum(per_vcpu) > 0, di
    assert di["postcopy-blocktime"] <= min(per_vcpu), di
    # vmigrate's own per-fault record stays.
    assert di["x-vmigrate-fault-latency-us"]["count"] > 0, di
    print(f"\nblocktime: overall={di['postcopy-blocktime']}ms per-vcpu={per_vcpu}ms "
          f"postcopy-requests={si['ram']['postcopy-requests']} "
          f"faults={di['x-vmigrate-fault-latency-us']}")
