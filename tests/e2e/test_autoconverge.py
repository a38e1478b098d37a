"""auto-converge on a `soft` lab guest whose dirty rate outruns `max-bandwidth`: without
the capability the migration keeps iterating; with it the vCPUs are throttled step by
step (cpu-throttle-initial, then +cpu-throttle-increment), the migration converges, the
guest's self-check passes on the destination and the source's throttle is lifted."""
import time

import pytest

import harness
from test_lab import lab, start_incoming, wait_passes, workload

pytestmark = pytest.mark.vmigrate

MEM = 128
WORKLOAD = "hot=64M,verify"          # as fast as the vCPU can: several GB/s
BANDWIDTH = 64 << 20                 # 64 MiB/s: far below the dirty rate


def start_pair(ws, caps):
    src = lab(ws, "src", MEM, workload=WORKLOAD).start()
    wait_passes(src, 2)
    dst = lab(ws, "dst", MEM, workload=WORKLOAD, incoming="defer").start()
    for m in (src, dst):
        m.set_caps(**caps)
    src.set_params(max_bandwidth=BANDWIDTH, downtime_limit=300,
                   cpu_throttle_initial=30, cpu_throttle_increment=20)
    src.cmd("migrate", uri=start_incoming(dst))
    return src, dst


def test_does_not_converge_without_auto_converge(ws):
    src, dst = start_pair(ws, {})
    time.sleep(6)
    info = src.query_migrate()
    assert info["status"] == "active", info
    assert "cpu-throttle-percentage" not in info
    assert info["ram"]["dirty-sync-count"] >= 3, info
    src.cmd("migrate_cancel")
    assert src.wait_migration()["status"] == "cancelled"
    assert src.runstate() == "running"
    assert workload(src)["violations"] == 0


def test_converges_with_auto_converge(ws):
    src, dst = start_pair(ws, {"auto_converge": True})
    seen = []
    t0 = time.time()
    while time.time() - t0 < 90:
        info = src.query_migrate()
        if "cpu-throttle-percentage" in info:
            pct = info["cpu-throttle-percentage"]
            if not seen or seen[-1] != pct:
                seen.append(pct)
        if info.get("status") in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.05)
    assert info["status"] == "completed", f"{info}\nthrottle steps {seen}\n{ws.diagnostics()}"
    assert seen and seen[0] == 30, seen
    assert all(b > a for a, b in zip(seen, seen[1:])), seen
    assert all((b - a) == 20 or b == 99 for a, b in zip(seen, seen[1:])), seen
    assert dst.wait_migration()["status"] == "completed"
    wait_passes(dst, workload(dst)["passes"] + 1)
    assert workload(dst)["violations"] == 0
    w = workload(src)
    assert w.get("cpu-throttle-percentage", 0) == 0, w
