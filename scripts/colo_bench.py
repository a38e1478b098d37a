#!/usr/bin/env python3
"""COLO checkpoint and failover figures.

For each hot-set size, a primary whose guest rewrites that many MiB once per
checkpoint period is put in COLO with a secondary; over a window the script reads the
primary's `x-vmigrate-colo` figures (time its VM was stopped per checkpoint, bytes per
checkpoint) and the secondary's (time it took to apply one), then kills the primary and
times the secondary's failover, from `x-colo-lost-heartbeat` to its RESUME event.

    scripts/colo_bench.py                       # 1, 8, 32, 64 MiB, 3 runs, vmigrate secondary
    scripts/colo_bench.py --hot 1,8,64 -n 2 --secondary qemu
    scripts/colo_bench.py --delay 100 --json out.json

With a vmigrate secondary both guests are `lab` soft guests with `verify`, and every
run checks that neither shows a violation. A QEMU 10.0 secondary (`-M none`) takes a
`none` primary whose workload writes without a self-check. QEMU's own primary cannot
be measured: it completes its first migration instead of entering COLO (see README).

Uses the end-to-end harness (tests/e2e/harness.py): `qemu.qmp`, /dev/shm, and
target/release/vmigrate (or VMIGRATE_BIN).
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "e2e"))
import harness  # noqa: E402

MiB = 1 << 20


def start(ws, secondary, hot_mib, rate, mem_mib):
    if secondary == "vmigrate":
        spec = f"hot={hot_mib}M,rate={rate},verify"
        extra = ["--accel", "soft", "--cpus", "1", "--workload", spec]
        src = ws.vm("vmigrate", "primary", mem_mib=mem_mib, machine="lab", extra=extra)
        dst = ws.vm("vmigrate", "secondary", mem_mib=mem_mib, machine="lab", extra=extra,
                    incoming="defer")
    else:
        src = ws.vm("vmigrate", "primary", mem_mib=mem_mib,
                    extra=["--workload", f"hot={hot_mib}M,rate={rate}"])
        dst = ws.vm("qemu", "secondary", mem_mib=mem_mib, incoming="defer")
    return src.start(), dst.start()


def figures(m):
    return m.query_migrate().get("x-vmigrate-colo",
                                 {"checkpoints": 0, "total-checkpoint-us": 0,
                                  "total-checkpoint-bytes": 0, "max-checkpoint-us": 0})


def run(secondary, hot_mib, delay_ms, mem_mib, window):
    rate = int(hot_mib * MiB * 1000 / delay_ms)
    ws = harness.Workspace("colo-bench")
    try:
        src, dst = start(ws, secondary, hot_mib, rate, mem_mib)
        lab = secondary == "vmigrate"
        if lab:
            harness.wait_passes(src, 1)
        for m in (src, dst):
            m.set_caps(x_colo=True, events=True)
        src.set_params(max_bandwidth=0, x_checkpoint_delay=delay_ms)
        dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
        port = harness.socket_port(dst.query_migrate())
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        harness.wait_until_status(dst, "colo", 30)
        time.sleep(1.0)
        a, da = figures(src), figures(dst)
        t0 = time.time()
        time.sleep(window)
        b, db = figures(src), figures(dst)
        elapsed = time.time() - t0
        n = b["checkpoints"] - a["checkpoints"]
        dn = db["checkpoints"] - da["checkpoints"]
        violations = harness.workload(src)["violations"] if lab else 0
        src.kill9()
        harness.wait_until_status(dst, "colo", 5)
        dst.event_names()
        asked = time.time()
        dst.cmd("x-colo-lost-heartbeat")
        dst.wait_runstate("running", 10)
        dst.event_names()
        ts = [e for e in dst.events if e["event"] == "RESUME"][-1]["timestamp"]
        failover_ms = (ts["seconds"] + ts["microseconds"] / 1e6 - asked) * 1000
        if lab:
            after = harness.wait_passes(dst, harness.workload(dst)["passes"] + 2)
            violations += after["violations"]
        return {
            "secondary": secondary, "hot_mib": hot_mib, "delay_ms": delay_ms,
            "checkpoints": n, "period_ms": elapsed * 1000 / n,
            "dirtied_mib": (b["total-checkpoint-bytes"] - a["total-checkpoint-bytes"]) / n / MiB,
            "stopped_ms": (b["total-checkpoint-us"] - a["total-checkpoint-us"]) / n / 1000,
            "max_stopped_ms": b["max-checkpoint-us"] / 1000,
            "apply_ms": ((db["total-checkpoint-us"] - da["total-checkpoint-us"]) / dn / 1000
                         if dn else None),
            "failover_ms": failover_ms,
            "violations": violations,
        }
    finally:
        ws.cleanup()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hot", default="1,8,32,64", help="hot-set sizes in MiB")
    ap.add_argument("-n", type=int, default=3, help="runs per size")
    ap.add_argument("--delay", type=int, default=200, help="x-checkpoint-delay in ms")
    ap.add_argument("--memory", type=int, default=256, help="guest RAM in MiB")
    ap.add_argument("--window", type=float, default=3.0, help="seconds measured")
    ap.add_argument("--secondary", choices=["vmigrate", "qemu"], default="vmigrate")
    ap.add_argument("--json", help="write every run's record here")
    args = ap.parse_args()
    if args.secondary == "qemu" and harness.qemu_missing_reason():
        print(f"colo_bench: {harness.qemu_missing_reason()}", file=sys.stderr)
        return 1
    records = []
    for hot in [int(x) for x in args.hot.split(",")]:
        for _ in range(args.n):
            r = run(args.secondary, hot, args.delay, args.memory, args.window)
            print(json.dumps(r), flush=True)
            records.append(r)
    print(f"\n{'hot MiB':>8} {'dirtied MiB':>12} {'stopped ms':>11} {'max ms':>8} "
          f"{'apply ms':>9} {'period ms':>10} {'failover ms':>12} {'violations':>10}")
    for hot in sorted({r["hot_mib"] for r in records}):
        rs = [r for r in records if r["hot_mib"] == hot]

        def med(k):
            vals = [r[k] for r in rs if r[k] is not None]
            return statistics.median(vals) if vals else float("nan")
        print(f"{hot:>8} {med('dirtied_mib'):>12.1f} {med('stopped_ms'):>11.1f} "
              f"{med('max_stopped_ms'):>8.1f} {med('apply_ms'):>9.1f} {med('period_ms'):>10.0f} "
              f"{med('failover_ms'):>12.2f} {sum(r['violations'] for r in rs):>10}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 1 if any(r["violations"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
