"""dirty-limit: each limited vCPU held to a dirty-page rate, measured per vCPU (the KVM
dirty ring of each vCPU, or what each `soft` vCPU thread marks) and re-tuned every
period; vCPUs without a limit untouched; the `dirty-limit` migration capability; and
the monitor's answers side by side with QEMU on a KVM VM with `dirty-ring-size` set.

Rates are checked against the workload's own per-vCPU count of pages written
(`query-workload`'s `vcpu-bytes-written`), averaged over a few seconds: a KVM vCPU
dirties in bursts of 256 pages between exits, so a short window sees whole bursts."""
import os
import subprocess
import time

import pytest

import harness
from conftest import require
from rawqmp import RawQMP
from test_lab import kvm_tracking_unavailable_reason, lab, start_incoming, wait_passes, workload

pytestmark = pytest.mark.vmigrate

MiB = 1 << 20


def need_kvm_ring():
    reason = kvm_tracking_unavailable_reason("ring")
    if reason:
        print(f"SKIP (KVM dirty ring): {reason}")
        pytest.skip(reason)


def vcpu_rates(m, seconds):
    """Each vCPU's dirty rate in MiB/s over SECONDS, from the workload's own counts."""
    a = workload(m)["vcpu-bytes-written"]
    t0 = time.time()
    time.sleep(seconds)
    b = workload(m)["vcpu-bytes-written"]
    dt = time.time() - t0
    return [(y - x) / dt / MiB for x, y in zip(a, b)]


def check_limit_holds(m, limit, settle):
    """vCPU 0 limited to LIMIT MiB/s, vCPU 1 free: the limit holds within 25 %, vCPU 1
    keeps its pace, and cancelling restores vCPU 0's free rate."""
    free = vcpu_rates(m, 1)
    assert min(free) > 4 * limit, f"the guest does not dirty far above the limit: {free}"
    m.cmd("set-vcpu-dirty-limit", **{"dirty-rate": limit, "cpu-index": 0})
    time.sleep(settle)
    # Over 3 s: the workload's own count, and the limiter's figure once a period (its
    # median is near the limit too: the same quantity, measured by the VMM).
    a = workload(m)["vcpu-bytes-written"]
    t0 = time.time()
    own = []
    for _ in range(3):
        time.sleep(1)
        q = m.cmd("query-vcpu-dirty-limit")
        own.append(q[0]["current-rate"])
    b = workload(m)["vcpu-bytes-written"]
    limited = [(y - x) / (time.time() - t0) / MiB for x, y in zip(a, b)]
    assert [e["cpu-index"] for e in q] == [0], q
    assert q[0]["limit-rate"] == limit, q
    assert abs(limited[0] - limit) <= 0.25 * limit, f"free {free}, limited {limited}, {q}"
    own.sort()
    assert abs(own[1] - limit) <= 0.35 * limit + 1, own
    assert limited[1] > 4 * limit, f"the vCPU without a limit was slowed: {limited}"
    assert m.cmd("human-monitor-command", **{"command-line": "info vcpu_dirty_limit"}) \
        .startswith(f"vcpu[0], limit rate {limit} (MB/s), current rate ")
    m.cmd("cancel-vcpu-dirty-limit")
    assert m.cmd("query-vcpu-dirty-limit") == []
    time.sleep(0.5)
    after = vcpu_rates(m, 1)
    assert after[0] > 4 * limit, f"cancel did not restore the free rate: {after}"


def test_soft_vcpu_held_to_its_limit(ws):
    m = lab(ws, "soft", 128, accel="soft", workload="hot=64M", cpus=2).start()
    check_limit_holds(m, 64, settle=3)
    assert workload(m)["violations"] == 0


def test_kvm_vcpu_held_to_its_limit_by_its_dirty_ring(ws):
    need_kvm_ring()
    # 20 MiB per vCPU: more than a limited vCPU writes in a period, so the ring's
    # distinct pages per period are its writes (a page rewritten within a period is
    # one dirty page to the ring, as for QEMU).
    m = lab(ws, "kvm", 48, accel="kvm", workload="hot=40M", cpus=2, tracking="ring").start()
    check_limit_holds(m, 16, settle=3)


def migrate_with_dirty_limit(src, dst, limit, bandwidth, timeout=90):
    for x in (src, dst):
        x.set_caps(dirty_limit=True)
    src.set_params(max_bandwidth=bandwidth, downtime_limit=300,
                   vcpu_dirty_limit=limit, x_vcpu_dirty_limit_period=500)
    src.cmd("migrate", uri=start_incoming(dst))
    seen_fields = seen_limits = None
    t0 = time.time()
    info = {}
    while time.time() - t0 < timeout:
        info = src.query_migrate()
        if "dirty-limit-ring-full-time" in info:
            seen_fields = info
        q = src.cmd("query-vcpu-dirty-limit")
        if q and seen_limits is None and info.get("status") == "active":
            # The migration owns the limits: the monitor may not change them (QEMU's
            # rule), but vcpu-dirty-limit set during the migration applies at once.
            r = src.raw("set-vcpu-dirty-limit", **{"dirty-rate": 100})
            assert r.get("error", {}).get("desc") in (
                "can't set dirty page rate limit while migration is running", None), r
            r = src.raw("cancel-vcpu-dirty-limit")
            assert r.get("error", {}).get("desc") in (
                "can't cancel dirty page rate limit while migration is running", None), r
            src.set_params(vcpu_dirty_limit=limit + 1)
            q = src.cmd("query-vcpu-dirty-limit")
            owned = src.query_migrate()["status"] == "active"
            if owned:
                assert "error" in r and all(e["limit-rate"] == limit + 1 for e in q), q
        if q:
            seen_limits = q
        if info.get("status") in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert info["status"] == "completed", f"{info}\n{src.ws.diagnostics()}"
    assert seen_limits and all(e["limit-rate"] in (limit, limit + 1) for e in seen_limits), \
        seen_limits
    assert seen_fields and "dirty-limit-throttle-time-per-round" in seen_fields, seen_fields
    # The limit is lifted when the migration ends.
    assert src.cmd("query-vcpu-dirty-limit") == []
    assert dst.wait_migration()["status"] == "completed"
    return info


def test_soft_migration_converges_with_dirty_limit(ws):
    # The same guest and link as test_autoconverge's, which do not converge without a
    # throttle (test_does_not_converge_without_auto_converge).
    src = lab(ws, "src", 128, workload="hot=64M,verify").start()
    wait_passes(src, 2)
    dst = lab(ws, "dst", 128, workload="hot=64M,verify", incoming="defer").start()
    migrate_with_dirty_limit(src, dst, limit=4, bandwidth=64 * MiB)
    wait_passes(dst, workload(dst)["passes"] + 1)
    assert workload(dst)["violations"] == 0


def test_kvm_migration_converges_with_dirty_limit(ws):
    need_kvm_ring()
    spec = "hot=40M,verify"
    src = lab(ws, "src", 48, accel="kvm", workload=spec, cpus=2, tracking="ring").start()
    wait_passes(src, 2)
    dst = lab(ws, "dst", 48, accel="kvm", workload=spec, cpus=2, tracking="ring",
              incoming="defer").start()
    # 32 MiB/s against a 40 MiB hot set rewritten several times a second: no pass ever
    # catches up without a throttle.
    src.set_params(max_bandwidth=32 * MiB, downtime_limit=300)
    src.cmd("migrate", uri=start_incoming(dst))
    t0 = time.time()
    while time.time() - t0 < 20:
        info = src.query_migrate()
        if info["status"] not in ("setup", "active") or \
                info.get("ram", {}).get("dirty-sync-count", 0) >= 3:
            break
        time.sleep(0.2)
    assert info["status"] == "active" and info["ram"]["dirty-sync-count"] >= 3, info
    src.cmd("migrate_cancel")
    assert src.wait_migration()["status"] == "cancelled"
    dst.destroy()
    dst = lab(ws, "dst2", 48, accel="kvm", workload=spec, cpus=2, tracking="ring",
              incoming="defer").start()
    # A KVM vCPU dirties 1 MiB between two exits (where it can sleep): limits of a few
    # MiB/s are as fine as it can be held.
    migrate_with_dirty_limit(src, dst, limit=4, bandwidth=32 * MiB)
    wait_passes(dst, workload(dst)["passes"] + 1)
    assert workload(dst)["violations"] == 0


# ------------------------------------------------------------------------------------
# Conformance with QEMU on a KVM VM with a dirty ring.

def conformance_script():
    """(kind, command, arguments): 'qmp' replies are compared whole except where the
    value is the guest's own (current-rate); 'hmp' texts too."""
    return [
        ("qmp", "query-vcpu-dirty-limit", {}),
        ("qmp", "set-vcpu-dirty-limit", {"dirty-rate": 10, "cpu-index": 5}),
        ("qmp", "set-vcpu-dirty-limit", {"dirty-rate": 10, "cpu-index": -1}),
        ("qmp", "cancel-vcpu-dirty-limit", {"cpu-index": 3}),
        ("qmp", "set-vcpu-dirty-limit", {"dirty-rate": 10}),
        ("qmp", "query-vcpu-dirty-limit", {}),
        ("qmp", "cancel-vcpu-dirty-limit", {"cpu-index": 0}),
        ("qmp", "query-vcpu-dirty-limit", {}),
        ("hmp", "info vcpu_dirty_limit", None),
        ("hmp", "set_vcpu_dirty_limit 20 0", None),
        ("hmp", "set_vcpu_dirty_limit -3", None),
        ("hmp", "set_vcpu_dirty_limit 20 7", None),
        ("hmp", "info vcpu_dirty_limit", None),
        ("hmp", "cancel_vcpu_dirty_limit", None),
        ("hmp", "info vcpu_dirty_limit", None),
        ("qmp", "set-vcpu-dirty-limit", {"dirty-rate": 0}),
        ("qmp", "query-vcpu-dirty-limit", {}),
        ("qmp", "migrate-set-capabilities",
         {"capabilities": [{"capability": "dirty-limit", "state": True}]}),
        ("qmp", "migrate-set-capabilities",
         {"capabilities": [{"capability": "auto-converge", "state": True}]}),
        ("qmp", "migrate-set-capabilities",
         {"capabilities": [{"capability": "dirty-limit", "state": False}]}),
        ("qmp", "migrate-set-capabilities",
         {"capabilities": [{"capability": "dirty-limit", "state": True},
                           {"capability": "auto-converge", "state": True}]}),
        ("qmp", "migrate-set-parameters", {"vcpu-dirty-limit": 0}),
        ("qmp", "migrate-set-parameters", {"x-vcpu-dirty-limit-period": 0}),
        ("qmp", "migrate-set-parameters", {"x-vcpu-dirty-limit-period": 1001}),
        ("qmp", "migrate-set-parameters", {"vcpu-dirty-limit": 5,
                                           "x-vcpu-dirty-limit-period": 500}),
        ("hmp", "info migrate_parameters", None),
    ]


def normalise(reply):
    """The guest's own figures (current rates) are not compared."""
    if isinstance(reply, dict) and isinstance(reply.get("return"), list):
        return {"return": [dict(e, **{"current-rate": "*"}) for e in reply["return"]]}
    if isinstance(reply, dict) and isinstance(reply.get("return"), str):
        text = reply["return"].replace("\r\n", "\n")
        lines = [ln.split(", current rate")[0] if ln.startswith("vcpu[") else ln
                 for ln in text.split("\n")]
        return {"return": "\n".join(lines)}
    return reply


def run_script(qmp):
    out = []
    for kind, name, args in conformance_script():
        if kind == "hmp":
            r = qmp.cmd("human-monitor-command", **{"command-line": name})
        else:
            r = qmp.cmd(name, **args)
        if kind == "qmp" and name == "set-vcpu-dirty-limit":
            time.sleep(1.2)   # a period, so both have a measured rate
        out.append(normalise(r))
    return out


def test_dirty_limit_monitor_conforms_to_qemu_on_a_kvm_ring_vm(ws):
    require("qemu", "vmigrate")
    need_kvm_ring()
    sock = ws.path("qemu-ring.qmp")
    qemu = subprocess.Popen(
        [harness.QEMU_BIN, "-M", "none", "-accel", "kvm,dirty-ring-size=4096",
         "-nodefaults", "-display", "none", "-m", "64M",
         "-qmp", f"unix:{sock},server=on,wait=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        q = RawQMP(sock)
        want = run_script(q)
        q.close()
    finally:
        qemu.kill()
        qemu.wait()
    # QEMU's `none` machine has one vCPU slot (index 0): so has this lab VM.
    m = lab(ws, "vm", 16, accel="kvm", workload="hot=64K", cpus=1, tracking="ring").start()
    v = RawQMP(m.qmp_path)
    got = run_script(v)
    v.close()
    for (kind, name, args), w, g in zip(conformance_script(), want, got):
        assert g == w, f"{kind} {name} {args}:\n qemu     {w}\n vmigrate {g}"


# ------------------------------------------------------------------------------------
# calc-dirty-rate in dirty-ring and dirty-bitmap modes against the workload's figures.

def measure(m, **args):
    m.cmd("calc-dirty-rate", **args)
    t0 = time.time()
    while time.time() - t0 < 10:
        q = m.cmd("query-dirty-rate")
        if q["status"] == "measured":
            return q
        time.sleep(0.05)
    raise AssertionError(f"no measurement: {q}")


def measure_with_workload(m, **args):
    """A measurement and the workload's own per-vCPU rates over the same second."""
    a = workload(m)["vcpu-bytes-written"]
    t0 = time.time()
    q = measure(m, **args)
    b = workload(m)["vcpu-bytes-written"]
    dt = time.time() - t0
    return q, [(y - x) / dt / MiB for x, y in zip(a, b)]


def test_soft_dirty_ring_and_dirty_bitmap_match_the_workload(ws):
    # Two vCPUs paced at 32 MiB/s each over 32 MiB slices: every page is written about
    # once a second, so a page count over a one-second period (the bitmap's distinct
    # pages, each vCPU's marks) is the bytes written.
    m = lab(ws, "soft", 128, accel="soft", workload="hot=64M,rate=64M", cpus=2).start()
    wait_passes(m, 0)
    time.sleep(1)
    q, own = measure_with_workload(m, **{"calc-time": 1, "mode": "dirty-ring"})
    assert q["mode"] == "dirty-ring" and q["sample-pages"] == 0, q
    ring = [v["dirty-rate"] for v in q["vcpu-dirty-rate"]]
    assert [v["id"] for v in q["vcpu-dirty-rate"]] == [0, 1], q
    for r, o in zip(ring, own):
        assert abs(r - o) <= 0.25 * o + 1, (q, own)
    assert q["dirty-rate"] == sum(ring), q
    q, own = measure_with_workload(m, **{"calc-time": 1000, "calc-time-unit": "millisecond",
                                         "mode": "dirty-bitmap"})
    assert q["mode"] == "dirty-bitmap" and "vcpu-dirty-rate" not in q, q
    assert abs(q["dirty-rate"] - sum(own)) <= 0.25 * sum(own), (q, own)
    text = m.cmd("human-monitor-command", **{"command-line": "info dirty_rate"})
    assert "Mode: dirty-bitmap" in text, text


def test_kvm_dirty_ring_matches_the_workload(ws):
    need_kvm_ring()
    m = lab(ws, "kvm", 48, accel="kvm", workload="hot=40M", cpus=2, tracking="ring").start()
    # vCPU 0 held to 16 MiB/s (each page of its 20 MiB slice written at most once a
    # second); vCPU 1 free, rewriting its slice many times a second.
    m.cmd("set-vcpu-dirty-limit", **{"dirty-rate": 16, "cpu-index": 0})
    time.sleep(3)
    q, own = measure_with_workload(m, **{"calc-time": 2, "mode": "dirty-ring"})
    ring = [v["dirty-rate"] for v in q["vcpu-dirty-rate"]]
    assert abs(ring[0] - own[0]) <= 0.25 * own[0] + 1, (q, own)
    # A ring counts a page once between two harvests (every 50 ms here): a vCPU that
    # rewrites its 20 MiB slice faster than that shows at most 400 MiB/s, never more
    # than it wrote.
    assert ring[1] <= own[1] * 1.1 and ring[1] >= 0.5 * min(own[1], 400), (q, own)
    # A VM on a dirty ring has no dirty bitmap to measure with (QEMU's answer).
    r = m.raw("calc-dirty-rate", **{"calc-time": 1, "mode": "dirty-bitmap"})
    assert r["error"]["desc"] == "mode dirty-bitmap is not enabled, use other method instead.", r
