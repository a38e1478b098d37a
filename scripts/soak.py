#!/usr/bin/env python3
"""Soak runs of vmigrate (not a CI test; tests/e2e/test_soak.py runs a short version).

  scripts/soak.py chain N     a chain of N live migrations of one self-checking lab
                              guest, each hop to a fresh destination process; the
                              guest's self-check must count 0 violations at the end
  scripts/soak.py abort N     one long-lived source that starts N live migrations and
                              sees each end otherwise, in turn: cancelled at a random
                              moment, the destination killed, a refused TLS handshake;
                              QMP clients poll query-migrate throughout. Prints its
                              RSS, open descriptors and threads after attempts 1, 20
                              and N, the guest's self-check, and the longest
                              query-migrate answer time.

VMIGRATE_BIN names the binary (default target/release/vmigrate). --seed S fixes the
random moments. Exits non-zero when a check fails."""
import argparse
import os
import random
import socket
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
os.environ.setdefault("VMIGRATE_BIN", os.path.join(HERE, "..", "target", "release",
                                                   "vmigrate"))
import harness  # noqa: E402
import rawqmp  # noqa: E402
import tls_certs  # noqa: E402

MiB = harness.MiB
GUEST_MIB = 32
SPEC = "hot=16M,rate=60M,verify"


def lab(ws, name, incoming=None, objects=()):
    return ws.vm("vmigrate", name, mem_mib=GUEST_MIB, machine="lab", incoming=incoming,
                 extra=["--accel", "soft", "--cpus", "1", "--workload", SPEC],
                 objects=list(objects)).start()


def incoming(dst):
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    return f"tcp:127.0.0.1:{harness.socket_port(dst.query_migrate())}"


def proc_figures(pid):
    status = open(f"/proc/{pid}/status").read()
    field = {line.split(":")[0]: line.split(":")[1].strip() for line in status.splitlines()}
    return {"rss_kib": int(field["VmRSS"].split()[0]), "threads": int(field["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def chain(n, log=print):
    """N hops; returns the figures (violations, passes, seconds per hop)."""
    ws = harness.Workspace("soak-chain")
    try:
        src = lab(ws, "hop0")
        harness.wait_passes(src, 1)
        hop_secs = []
        for i in range(1, n + 1):
            dst = lab(ws, f"hop{i}", incoming="defer")
            t0 = time.time()
            src.set_params(max_bandwidth=0)
            src.cmd("migrate", uri=incoming(dst))
            si = src.wait_migration(timeout=60)
            di = dst.wait_migration(("completed", "failed"), timeout=60)
            if si["status"] != "completed" or di["status"] != "completed":
                raise AssertionError(f"hop {i}: source {si}, destination {di}\n"
                                     f"{ws.diagnostics()}")
            hop_secs.append(time.time() - t0)
            dst.wait_runstate("running")
            # The guest runs a whole pass (and checks it) at each stop.
            w = harness.wait_passes(dst, harness.workload(dst)["passes"] + 1)
            if w["violations"]:
                raise AssertionError(f"hop {i}: {w}")
            src.destroy()
            ws.machines.remove(src)
            src = dst
            if i % 20 == 0 or i == n:
                log(f"chain: hop {i}/{n}, {w['passes']} passes, "
                    f"{w['violations']} violations, last hop {hop_secs[-1]:.2f} s")
        final = harness.wait_passes(src, harness.workload(src)["passes"] + 2)
        return {"hops": n, "violations": final["violations"], "passes": final["passes"],
                "hop_s_max": max(hop_secs), "hop_s_mean": sum(hop_secs) / len(hop_secs)}
    finally:
        ws.cleanup()


class Poller(threading.Thread):
    """A QMP client that polls query-migrate until stopped; keeps the longest answer."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.q = rawqmp.RawQMP.connect(path, timeout=10)
        self.longest = 0.0
        self.count = 0
        self.error = None
        self.stop = False

    def run(self):
        try:
            while not self.stop:
                t0 = time.perf_counter()
                r = self.q.send({"execute": "query-migrate"})
                self.longest = max(self.longest, time.perf_counter() - t0)
                assert "return" in r, r
                self.count += 1
                time.sleep(0.01)
        except Exception as e:  # reported by the caller
            self.error = e


def refusing_listener():
    """A TCP listener that answers a TLS ClientHello with plain text and hangs up."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4)

    def serve():
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            try:
                c.recv(4096)
                c.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
            except OSError:
                pass
            c.close()
    threading.Thread(target=serve, daemon=True).start()
    return ls


def abort(n, seed=None, log=print, pki_dir=None):
    rng = random.Random(seed)
    ws = harness.Workspace("soak-abort")
    pollers = []
    try:
        pki = tls_certs.make_pki(pki_dir or ws.path("pki"))
        creds = (f"tls-creds-x509,id=tls0,dir={os.path.join(pki, 'client')},"
                 f"endpoint=client,verify-peer=on")
        src = lab(ws, "src", objects=[creds])
        harness.wait_passes(src, 1)
        pollers = [Poller(src.qmp_path) for _ in range(2)]
        for p in pollers:
            p.start()
        refuser = refusing_listener()
        figures = {}
        outcomes = {}
        for i in range(1, n + 1):
            kind = ("cancel", "kill-destination", "tls-refused")[i % 3]
            if kind == "tls-refused":
                src.set_params(tls_creds="tls0", tls_hostname="localhost",
                               max_bandwidth=32 * MiB)
                src.cmd("migrate", uri=f"tcp:127.0.0.1:{refuser.getsockname()[1]}")
                info = src.wait_migration(timeout=30)
                src.set_params(tls_creds="", tls_hostname="")
                dst = None
            else:
                dst = lab(ws, f"dst{i}", incoming="defer")
                src.set_params(max_bandwidth=32 * MiB)
                src.cmd("migrate", uri=incoming(dst))
                harness.wait_until_status(src, "active", timeout=30)
                time.sleep(rng.uniform(0.0, 0.6))
                if kind == "cancel":
                    src.cmd("migrate_cancel")
                else:
                    dst.kill9()
                info = src.wait_migration(timeout=30)
            outcomes[(kind, info["status"])] = outcomes.get((kind, info["status"]), 0) + 1
            if info["status"] == "completed":
                raise AssertionError(f"attempt {i} ({kind}) completed: the fault came late")
            src.wait_runstate("running", timeout=30)
            if dst is not None:
                dst.destroy()
                ws.machines.remove(dst)
            if i in (1, 20, n) or i % 50 == 0:
                figures[i] = proc_figures(src.proc.pid)
                log(f"abort: attempt {i}/{n}: {figures[i]}")
            for p in pollers:
                if p.error:
                    raise AssertionError(f"a query-migrate poller failed: {p.error!r}")
        w = harness.wait_passes(src, harness.workload(src)["passes"] + 2)
        return {"attempts": n, "figures": figures, "outcomes": outcomes,
                "violations": w["violations"],
                "polls": sum(p.count for p in pollers),
                "longest_query_migrate_ms": max(p.longest for p in pollers) * 1000}
    finally:
        for p in pollers:
            p.stop = True
        ws.cleanup()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["chain", "abort"])
    ap.add_argument("n", type=int)
    ap.add_argument("--seed", type=int)
    a = ap.parse_args()
    if a.mode == "chain":
        r = chain(a.n)
        print(f"chain: {r['hops']} hops, {r['violations']} violations, {r['passes']} "
              f"passes, hop mean {r['hop_s_mean']:.2f} s, max {r['hop_s_max']:.2f} s")
        return 1 if r["violations"] else 0
    r = abort(a.n, a.seed)
    print(f"abort: {r['attempts']} attempts, outcomes {r['outcomes']}")
    print(f"{'attempt':>8} {'RSS KiB':>10} {'fds':>5} {'threads':>8}")
    for i, f in sorted(r["figures"].items()):
        print(f"{i:>8} {f['rss_kib']:>10} {f['fds']:>5} {f['threads']:>8}")
    print(f"guest self-check: {r['violations']} violations; {r['polls']} query-migrate "
          f"polls, longest answer {r['longest_query_migrate_ms']:.1f} ms")
    return 1 if r["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
