"""`calc-dirty-rate` (page-sampling) on a live `lab` guest and on an idle `none` VM, and
its argument errors side by side with QEMU 10.0.2."""
import time

import pytest

from conftest import require
from test_lab import lab, wait_passes, workload

pytestmark = pytest.mark.vmigrate


def measure(m, **args):
    m.cmd("calc-dirty-rate", **args)
    t0 = time.time()
    while time.time() - t0 < 10:
        q = m.cmd("query-dirty-rate")
        if q["status"] == "measured":
            return q
        time.sleep(0.05)
    raise AssertionError(f"no measurement: {q}")


def test_live_guest_dirty_rate(ws):
    m = lab(ws, "src", 128, workload="hot=64M,rate=100M").start()
    wait_passes(m, 1)
    assert m.cmd("query-dirty-rate")["status"] == "unstarted"
    q = measure(m, **{"calc-time": 1})
    w = workload(m)
    # The workload rewrites its 64 MiB hot set at ~100 MB/s: sampling sees the hot half of
    # RAM change within the second, between a third and all of the written rate.
    assert 20 <= q["dirty-rate"] <= 160, (q, w)
    assert q["mode"] == "page-sampling" and q["sample-pages"] == 512
    assert q["calc-time"] == 1 and q["calc-time-unit"] == "second"


def test_idle_vm_dirty_rate_is_zero(ws):
    m = ws.vm("vmigrate", "idle", mem_mib=64).start()
    q = measure(m, **{"calc-time": 100, "calc-time-unit": "millisecond", "sample-pages": 1024})
    assert q["dirty-rate"] == 0, q
    assert q["calc-time"] == 0 and q["calc-time-unit"] == "second", q   # rounded down
    q = m.cmd("query-dirty-rate", **{"calc-time-unit": "millisecond"})
    assert q["calc-time"] == 100 and q["calc-time-unit"] == "millisecond", q


@pytest.mark.parametrize("args", [
    {"calc-time": 0},
    {"calc-time": 61},
    {"calc-time": 49, "calc-time-unit": "millisecond"},
    {"calc-time": 1, "sample-pages": 100},
    {"calc-time": 1, "sample-pages": 20000},
    {"calc-time": 1, "mode": "dirty-ring"},
    {"calc-time": 1, "mode": "dirty-bitmap", "sample-pages": 256},
    {"calc-time": "x"},
    {"calc-time": 1, "mode": "nope"},
])
def test_errors_match_qemu(ws, args):
    require("qemu", "vmigrate")
    q = ws.vm("qemu", "q", mem_mib=16).start()
    v = ws.vm("vmigrate", "v", mem_mib=16).start()
    qr, vr = q.raw("calc-dirty-rate", **args), v.raw("calc-dirty-rate", **args)
    assert qr.get("error") == vr.get("error"), (qr, vr)


def test_hmp_info_dirty_rate_matches_qemu(ws):
    """`info dirty_rate` before and after a measurement, in QEMU's text (the start time
    differs by when each ran, so it is masked)."""
    import re
    require("qemu", "vmigrate")
    outs = {}
    for impl in ("qemu", "vmigrate"):
        m = ws.vm(impl, impl, mem_mib=32).start()
        hmp = lambda: m.cmd("human-monitor-command", **{"command-line": "info dirty_rate"})
        before = hmp()
        measure(m, **{"calc-time": 100, "calc-time-unit": "millisecond"})
        after = re.sub(r"Start Time: \d+", "Start Time: T", hmp())
        outs[impl] = (before, after)
    assert outs["qemu"] == outs["vmigrate"], outs
