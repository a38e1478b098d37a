#!/usr/bin/env python3
"""Side-by-side migration benchmark: QEMU 10.0 vs vmigrate (a benchmark, not a test).

Scenario `tcp-precopy` (the default): a stopped `none` VM whose RAM holds a fixed page mix
(40 % zero, 30 % random, 30 % log-text pages, in shuffled 64 KiB blocks, generated
deterministically into /dev/shm) is migrated over loopback TCP, single channel,
`max-bandwidth` 0 (unlimited). Every requested source->destination pair is run, alternating,
for N repetitions:

    qemu-qemu  vmigrate-vmigrate  qemu-vmigrate  vmigrate-qemu

so that the source and destination roles can be told apart. For each run it records the
wall time from `migrate` to the destination's MIGRATION `completed` event, throughput
(GiB/s of guest RAM, Gbit/s on the wire from the source's `ram.transferred`), CPU seconds
(user+sys of the whole process, all threads) of source and destination over the run, peak
RSS (VmHWM) of both, and checks the destination RAM file against the generated image
(per-16 MiB-chunk SHA-1). A run that does not verify is reported FAILED and not counted.

Scenario `live` (not in the default set): a running guest dirties a hot set at a set rate
while it is migrated over loopback TCP (precopy, `max-bandwidth` 0, `downtime-limit` 300 ms),
QEMU to QEMU and vmigrate to vmigrate. vmigrate runs its `lab` machine (`--accel soft
--workload hot=SIZE,rate=RATE`); QEMU runs a `pc` machine booting a tiny guest
(scripts/bench_guest/guest.S, assembled by this script with `as` and `ld`) that writes the
same hot set at the same rate, paced by the HPET. QEMU's accelerator is TCG or KVM, whichever
runs that guest faster here (probed once, flat out); if QEMU's guest cannot reach the asked
rate, the rate of both is lowered to what it reaches. Per engine it reports the guest's dirty
rate before and during the migration (page writes per second, measured the same way on
both), calc-dirty-rate, total time, downtime, bytes sent, passes (dirty-sync-count), and the
ratios vmigrate / QEMU, and says whether vmigrate's downtime and bytes are at most QEMU's at
an equal or higher dirty rate.

Scenarios `live-postcopy` and `live-postcopy-preempt` (not in the default set): the same
guests and hot set, but `max-bandwidth` (--postcopy-max-bandwidth, default 64 MiB/s) is well
below the dirty rate, so precopy cannot converge; both sides have `postcopy-ram` (and
`postcopy-preempt`), the destination `postcopy-blocktime`, `max-postcopy-bandwidth` is 0, and
`migrate-start-postcopy` is sent --postcopy-after seconds (default 2) after `migrate`, the
same for both engines. Per run: total time (migrate -> destination `completed`), downtime
(source STOP -> destination RESUME event timestamps), the source's `postcopy-requests`, the
destination's `postcopy-blocktime`, vmigrate's `x-vmigrate-fault-latency-us` (p50/p99/max),
bytes, CPU and peak RSS; a run counts only if the guest keeps writing pages on the
destination afterwards.

Scenarios `live-postcopy-tbf` and `live-postcopy-preempt-tbf`: the same over a real
rate-limited link instead of loopback. The script (as root) creates a network namespace
`vmigrate-bench-PID` and a veth pair into it (10.213.0.1/30 on the host, 10.213.0.2 inside,
refused if that /30 is already in use), shapes both ends with `tc qdisc add dev IF root tbf
rate RATE burst SIZE latency TIME` (--link tbf:RATE[,burst=SIZE][,latency=TIME], default
tbf:1gbit,burst=256kb,latency=20ms), starts the destination inside the namespace (`ip netns
exec NS ...`) and migrates to 10.213.0.2; no traffic goes anywhere else. The namespace and
the pair are deleted at exit, on failure and on interruption too (not after a SIGKILL of the
script: then `ip netns del vmigrate-bench-PID`). Run them together with the loopback ones
to compare in one run (same machine load).

Scenarios `background-snapshot` and `background-snapshot-mr` (not in the default set; qq and
vv only): the live guests of `live` (same hot set and rate, same QEMU accelerator choice) with
--size of RAM run while `migrate file:DIR/bench-PID.mig` saves them with `background-snapshot`
(and `mapped-ram` for -mr) into --file-dir. Per run: the guest's page-write rate idle (2 s
before) and during the snapshot (from `migrate` to the MIGRATION `completed` event), the
slowdown copy-before-write causes (1 - during / idle), total time, downtime, bytes, file size and
the source's CPU; the guest must still run and write afterwards.

File scenarios `file-plain`, `file-mr`, `file-mr2`, `file-mr4`, `file-mr-dio`, `file-mr2-dio`,
`file-mr4-dio` (group `file`; not in the default set): the stopped VM is saved with `migrate
file:DIR/bench-PID.mig` (plain sequential stream; mapped-ram; mapped-ram + multifd 2 or 4
channels; each mapped-ram variant also with direct-io) and restored into a fresh `-incoming
defer` VM with `migrate-incoming` of the same URI; the pair's source engine saves and its
destination engine restores. Per run: save time (to the source's `completed` event) and CPU,
the file's size and allocated bytes, restore time and CPU with the file in the page cache
(warm) and, with --file-cold, after `sync; echo 3 > /proc/sys/vm/drop_caches` (cold), and
`dd if=FILE of=/dev/null bs=1M` on the same file right after each restore. Both restores are
verified. The report compares QEMU's best configuration with vmigrate's best and with
vmigrate in the same configuration (target: QEMU-best time / vmigrate time >= 1.5 for save
and restore), and vmigrate's restore throughput with dd's (target >= 80 %).

The destination's floor (with every stopped scenario, unless --no-floor): scripts/floor.c,
compiled with `cc`, measures before and after the runs what it costs on this machine to fault
in and fill --size bytes of fresh memory, anonymous and a shared tmpfs file, from loopback TCP
(a writer process) and from a warm file, page by page and with MADV_POPULATE_WRITE per 512 KiB
chunk, and for tmpfs also through the file (each chunk read into a buffer and written with
pwrite, which allocates pages without clearing or mapping them). The floor of a path is the best of these rates for its source into tmpfs (where both
engines' destination RAM lives): the socket for tcp-*, the warm file for file-* restores. It
also fills tmpfs with two threads of one process at once, each its half (sources socket2, each
thread with its own connection and writer, and file2): the floor of a destination whose two or
more multifd channels share one memory file. Each receive path's data rate (the non-zero part
of RAM, which is all a destination must write, per second of its wall time) is reported as a
fraction of its floor, the two-thread one for paths with several channels (target >= 80 %).

Usage:
    scripts/bench.py                        # 4 GiB, 3 reps, all four pairs
    scripts/bench.py --size 512M -n 2       # quick check
    scripts/bench.py --pairs qq,qv --json /tmp/bench.json
    scripts/bench.py --vmigrate /path/to/vmigrate --scenario tcp-multifd2
    scripts/bench.py --list-scenarios
    scripts/bench.py --scenario live        # 256 MiB hot set at 512 MiB/s, 3 reps
    scripts/bench.py --scenario live --live-hot 128M --live-rate 1G -n 2 --live-accel tcg
    scripts/bench.py --scenario live-postcopy,live-postcopy-preempt -n 2
    scripts/bench.py --scenario live-postcopy,live-postcopy-preempt,live-postcopy-tbf,live-postcopy-preempt-tbf -n 3
    scripts/bench.py --scenario live-postcopy-tbf --link tbf:500mbit,burst=128kb
    scripts/bench.py --size 4G -n 2 --pairs qq,vv --scenario file    # all file scenarios
    scripts/bench.py --size 4G -n 2 --pairs qq,vv --scenario background-snapshot,background-snapshot-mr
    scripts/bench.py --scenario file-mr4,file-mr4-dio --file-dir /var/tmp --no-file-cold

Options (see --help): --size, -n/--reps, --pairs (qq,vv,qv,vq,bb or full names), --scenario,
--vmigrate PATH (default: target/release/vmigrate, built with `cargo build --release` if
missing), --vmigrate-before PATH (an older binary, pair `bb`, for before/after figures in one
run), --qemu PATH, --json OUT (raw per-run records), --prewarm GIB, --gate SECONDS,
--timeout SECONDS, --keep-image, --keep-logs, --shm DIR; for `live`: --live-hot, --live-memory,
--live-rate, --live-accel auto|tcg|kvm, --downtime-limit MS, --live-calc-ms (the postcopy
scenarios take the guest options too, plus --postcopy-max-bandwidth and --postcopy-after, and the
*-tbf ones --link); for the file
scenarios: --file-dir DIR (default /var/tmp when on the repository's file system, else
target/; not /dev/shm), --file-cold / --no-file-cold (default on when root and drop_caches is
writable).

Method notes:
  * Before every run a fresh, sparse destination RAM file is created and GIB of anonymous
    memory is touched and freed (`--prewarm`, default size + 1 GiB), the same for both
    engines: the first touch of a fresh page is the dominant destination cost on these
    machines and varies a lot, and this makes it less random. The prewarm rate is recorded.
  * `--gate` waits (up to that many seconds) for the machine to be less than half busy
    before each run; "foreign CPU s" is machine busy time during the run minus the two
    engines and this script, i.e. what other work took from the two engines.
  * Both sides get the `events` capability; the source gets `max-bandwidth` 0 (file
    scenarios: both sides, with the same capabilities and parameters).
  * File scenarios run the gate and the prewarm before every timed step (save, each restore,
    each dd); the file is fsynced after the save (time recorded, not counted) and deleted
    after the run.

Exit status: 0 when the benchmark ran (FAILED runs are results, reported in the tables),
1 on errors (the harness could not run: missing QEMU, no space, interrupted ...),
2 on bad arguments.

New scenarios: write a function `scenario_xxx(ctx, pair, rep) -> dict` (see
`tcp_migration` for the shape of the record) and add it to SCENARIOS. A scenario function
with the attribute `live = True` runs only qq and vv, gets ctx.live (see `live_migration`)
and is reported by report_live(); one with `file = True` (see `_file`) is reported by
report_file().
"""
import argparse
import asyncio
import collections
import contextlib
import copy
import ctypes
import hashlib
import json
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

try:
    from qemu.qmp import EventListener, ExecuteError, QMPClient
except ImportError:  # pragma: no cover
    sys.stderr.write("bench.py needs the qemu.qmp Python package (pip install qemu.qmp)\n")
    sys.exit(1)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CLK = os.sysconf("SC_CLK_TCK")
PAGE = 4096
GiB = 1 << 30
MiB = 1 << 20

BLOCK = 64 * 1024            # page-mix granule: 16 pages of one kind
CHUNK = 16 * MiB             # generation / verification unit
GEN_VERSION = 1              # bump when the generated content changes
MIX = (0.4, 0.3, 0.3)        # zero, random, text
RAM_ID = "m0"


class BenchError(Exception):
    """The harness cannot go on (as opposed to a run that failed)."""


class RunFailed(Exception):
    """One measured run failed; it is recorded and the benchmark continues."""


# --------------------------------------------------------------------------------------
# Cleanup registry: every process we start and every big file we create is recorded here
# and removed at exit, whatever happened.

_children = []      # subprocess.Popen objects started by this script
_temp_files = set()


def _set_pdeathsig():
    # Children die with us even if this script is SIGKILLed (Linux prctl PR_SET_PDEATHSIG).
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


def exit_status(p):
    """Exit status of a child without reaping it (None while it runs). Not reaping keeps its
    PID, and so its process group ID, ours until kill_proc() has cleaned up."""
    if p.returncode is not None:
        return p.returncode
    try:
        r = os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return p.poll()
    if r is None:
        return None
    return r.si_status if r.si_code == os.CLD_EXITED else -r.si_status


def kill_proc(p):
    """Kill one engine we started: the process group it leads (it was started in a session
    of its own, so the group holds it and only what it spawned), then reap it."""
    if p.returncode is None:  # not reaped yet: the group ID is still ours
        with contextlib.suppress(Exception):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            p.kill()
    with contextlib.suppress(Exception):
        p.wait(timeout=10)


def kill_children():
    for p in _children:
        kill_proc(p)


def remove_temp_files():
    for f in list(_temp_files):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f)
        _temp_files.discard(f)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------------------
# Sizes and small helpers

def parse_size(s):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", s, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (use e.g. 512M, 4G)")
    n = float(m.group(1)) * {"": 1, "K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}[m.group(2).upper()]
    n = int(n)
    if n < 16 * MiB or n % (2 * MiB):
        raise argparse.ArgumentTypeError(f"size {s!r} must be a multiple of 2 MiB, at least 16 MiB")
    return n


def parse_rate(s):
    """Bytes per second: a number with an optional K/M/G suffix (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?(?:/s)?\s*", s, re.I)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"bad rate {s!r} (use e.g. 512M for 512 MiB/s)")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": MiB, "G": GiB}[m.group(2).upper()])


def size_arg(n):
    """QEMU-style size string both engines accept."""
    return f"{n // GiB}G" if n % GiB == 0 else f"{n // MiB}M"


def human_size(n):
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / MiB:g} MiB"


def proc_cpu(pid):
    """user+sys seconds of the whole process (all threads, incl. exited ones)."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0])  # kB
    return out


def machine_busy():
    """Busy CPU seconds of the whole machine (all CPUs) from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK


def self_cpu():
    t = os.times()
    return t.user + t.system


def quiet_gate(max_wait, thresh=0.5, window=0.5):
    """Wait up to max_wait s until the machine is < thresh busy over a window."""
    if max_wait <= 0:
        return 0.0, None
    n = os.cpu_count() or 1
    t0 = time.monotonic()
    while True:
        b0 = machine_busy()
        time.sleep(window)
        frac = (machine_busy() - b0) / (window * n)
        if frac < thresh or time.monotonic() - t0 >= max_wait:
            return time.monotonic() - t0, frac


def prewarm(nbytes):
    """Touch and free nbytes of anonymous memory; returns (seconds, us per page)."""
    if nbytes <= 0:
        return None, None
    import mmap
    t0 = time.perf_counter()
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        try:
            m.madvise(23)  # MADV_POPULATE_WRITE (Linux >= 5.14): fault everything in at once
        except (OSError, ValueError):
            z = bytes(CHUNK)
            for off in range(0, nbytes - CHUNK + 1, CHUNK):
                m[off:off + CHUNK] = z
    finally:
        m.close()
    dt = time.perf_counter() - t0
    return dt, dt * 1e6 / (nbytes // PAGE)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    return "\n".join("    " + l for l in lines[-n:])


# --------------------------------------------------------------------------------------
# Guest RAM image: deterministic page mix, written in 16 MiB chunks by up to N processes.
# Each chunk's SHA-1 is kept, so a destination RAM file is verified chunk by chunk (also in
# parallel) and a mismatch can be located.

_WORDS = ("request response user session cache miss hit commit rollback connection timeout "
          "retry queue worker scheduler payload checksum index table update insert delete "
          "select lock acquired released GET POST PUT backend frontend shard replica leader "
          "follower flush compaction snapshot token refresh").split()
_LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR")
_COMPS = ("http", "db", "auth", "storage", "rpc", "gc", "net", "sched")

_G = {}  # per-process generator / verifier state (set before fork or in the initializer)


def _line_pool(seed, n=8000):
    r = random.Random(f"lines:{seed}")
    out = []
    for _ in range(n):
        msg = " ".join(r.choice(_WORDS) for _ in range(r.randint(3, 9)))
        out.append((f"2025-{r.randint(1, 12):02d}-{r.randint(1, 28):02d} {r.randint(0, 23):02d}:"
                    f"{r.randint(0, 59):02d}:{r.randint(0, 59):02d}.{r.randint(0, 999):03d} "
                    f"{r.choice(_LEVELS)} [{r.choice(_COMPS)}-{r.randint(0, 63)}] {msg} "
                    f"id={r.getrandbits(64):016x} uid={r.randint(1, 99999)} "
                    f"lat={r.randint(0, 5000)}ms path=/api/v1/{r.choice(_WORDS)}/{r.randint(0, 10**6)}\n"
                    ).encode())
    return out


def _block_kinds(size, seed):
    nblk = size // BLOCK
    nz = round(nblk * MIX[0])
    nr = round(nblk * MIX[1])
    kinds = [0] * nz + [1] * nr + [2] * (nblk - nz - nr)
    random.Random(f"kinds:{seed}").shuffle(kinds)
    return bytes(kinds)


def _gen_chunk(i):
    path, size, seed, kinds, lines = _G["path"], _G["size"], _G["seed"], _G["kinds"], _G["lines"]
    off = i * CHUNK
    n = min(CHUNK, size - off)
    buf = bytearray(n)  # zero blocks stay zero but are written, so the file is fully allocated
    r = random.Random(f"chunk:{seed}:{i}")
    b0 = off // BLOCK
    for j in range(n // BLOCK):
        k = kinds[b0 + j]
        o = j * BLOCK
        if k == 1:
            buf[o:o + BLOCK] = r.randbytes(BLOCK)
        elif k == 2:
            s = b"".join(r.choices(lines, k=470))
            while len(s) < BLOCK:
                s += b"".join(r.choices(lines, k=64))
            buf[o:o + BLOCK] = s[:BLOCK]
    fd = os.open(path, os.O_WRONLY)
    try:
        mv = memoryview(buf)
        done = 0
        while done < n:
            done += os.pwrite(fd, mv[done:], off + done)
    finally:
        os.close(fd)
    return i, hashlib.sha1(buf).hexdigest()


def _hash_chunk(args):
    path, size, i = args
    off = i * CHUNK
    n = min(CHUNK, size - off)
    with open(path, "rb") as f:
        f.seek(off)
        data = f.read(n)
    if len(data) < n:  # short file: missing tail reads as a mismatch
        return i, None
    return i, hashlib.sha1(data).hexdigest()


def _workers():
    return max(1, min(os.cpu_count() or 1, 4))


def _worker_init():
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and ends the pool


def _pool():
    return multiprocessing.get_context("fork").Pool(_workers(), initializer=_worker_init)


def image_meta(size, seed):
    return {"generator": GEN_VERSION, "size": size, "seed": seed, "block": BLOCK,
            "chunk": CHUNK, "mix_zero_random_text": MIX}


def make_image(path, size, seed, log):
    """Create (or reuse, if its sidecar metadata matches) the source RAM image."""
    meta_path = path + ".json"
    want = image_meta(size, seed)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if ({k: meta.get(k) for k in want} == json.loads(json.dumps(want))
                and os.path.getsize(path) == size):
            log(f"reusing RAM image {path} ({human_size(size)})")
            return meta
    except (OSError, ValueError):
        pass
    for p in (path, meta_path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    t0 = time.perf_counter()
    _G.update(path=path, size=size, seed=seed, kinds=_block_kinds(size, seed), lines=_line_pool(seed))
    with open(path, "wb") as f:
        f.truncate(size)
    nchunks = (size + CHUNK - 1) // CHUNK
    digests = [None] * nchunks
    if _workers() > 1:
        with _pool() as pool:
            for i, d in pool.imap_unordered(_gen_chunk, range(nchunks)):
                digests[i] = d
    else:
        for i in range(nchunks):
            digests[i] = _gen_chunk(i)[1]
    _G.clear()
    kinds = _block_kinds(size, seed)
    meta = dict(want, chunk_sha1=digests,
                blocks={"zero": kinds.count(0), "random": kinds.count(1), "text": kinds.count(2)},
                image_sha1=hashlib.sha1("".join(digests).encode()).hexdigest())
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    dt = time.perf_counter() - t0
    log(f"generated RAM image {path}: {human_size(size)} in {dt:.1f} s ({size / GiB / dt:.2f} GiB/s), "
        f"blocks zero/random/text = {meta['blocks']['zero']}/{meta['blocks']['random']}/{meta['blocks']['text']}")
    return meta


def verify_ram(path, meta):
    """Compare a RAM file with the image's chunk digests. Returns (ok, detail)."""
    size = meta["size"]
    try:
        actual = os.path.getsize(path)
    except OSError as e:
        return False, f"destination RAM file unreadable: {e}"
    if actual < size:
        return False, f"destination RAM file is {actual} bytes, expected {size}"
    nchunks = len(meta["chunk_sha1"])
    jobs = [(path, size, i) for i in range(nchunks)]
    if _workers() > 1:
        with _pool() as pool:
            got = dict(pool.imap_unordered(_hash_chunk, jobs, chunksize=4))
    else:
        got = dict(map(_hash_chunk, jobs))
    bad = [i for i in range(nchunks) if got[i] != meta["chunk_sha1"][i]]
    if not bad:
        return True, "ok"
    return False, (f"RAM differs in {len(bad)} of {nchunks} 16 MiB chunks, first at offset "
                   f"{bad[0] * CHUNK:#x}")


# --------------------------------------------------------------------------------------
# Engines and VM processes

class Engine:
    def __init__(self, name, binary):
        self.name = name
        self.binary = binary
        self.unavailable = None  # reason, if this engine cannot be run at all

    def argv(self, size, ram_path, qmp_sock, incoming, objects=()):
        raise NotImplementedError

    def live_argv(self, live, qmp_sock, serial, incoming, sparse=False):
        """A running guest that dirties live.hot bytes at live.rate (the `live` scenario);
        with SPARSE each write changes one byte of its page."""
        raise NotImplementedError


class QemuEngine(Engine):
    def argv(self, size, ram_path, qmp_sock, incoming, objects=()):
        a = [self.binary, "-nodefaults", "-display", "none",
             "-object", f"memory-backend-file,id={RAM_ID},size={size_arg(size)},mem-path={ram_path},share=on",
             "-machine", f"none,memory-backend={RAM_ID}",
             "-qmp", f"unix:{qmp_sock},server=on,wait=off"]
        for o in objects:
            a += ["-object", o]
        if incoming:
            a += ["-incoming", incoming]
        return a

    def live_argv(self, live, qmp_sock, serial, incoming, accel=None, image=None, sparse=False):
        # (QEMU's guest always changes one byte per page: SPARSE is what it does anyway.)
        a = [self.binary, "-nodefaults", "-display", "none", "-M", "pc",
             "-accel", accel or live.qemu_accel, "-m", size_arg(live.memory),
             "-drive", f"file={image or live.guest_image(incoming)},format=raw,if=ide",
             "-chardev", f"file,id=com1,path={serial}", "-serial", "chardev:com1",
             "-qmp", f"unix:{qmp_sock},server=on,wait=off"]
        if incoming:
            a += ["-incoming", incoming]
        return a


class VmigrateEngine(Engine):
    def argv(self, size, ram_path, qmp_sock, incoming, objects=()):
        a = [self.binary, "vm", "--machine", "none", "--memory", size_arg(size),
             "--mem-path", ram_path, "--share", "--ram-id", RAM_ID, "--qmp", f"unix:{qmp_sock}"]
        for o in objects:
            a += ["--object", o]
        if incoming:
            a += ["--incoming", incoming]
        return a

    def live_argv(self, live, qmp_sock, serial, incoming, sparse=False):
        spec = f"hot={live.hot},rate={live.vmigrate_rate}" + (",sparse" if sparse else "")
        a = [self.binary, "vm", "--machine", "lab", "--accel", "soft", "--cpus", "1",
             "--memory", size_arg(live.memory),
             "--workload", spec, "--qmp", f"unix:{qmp_sock}"]
        if incoming:
            a += ["--incoming", incoming]
        return a


class VM:
    """One engine process with a QMP connection and a MIGRATION event queue."""

    def __init__(self, engine, role, ctx):
        self.engine, self.role, self.ctx = engine, role, ctx
        self.label = f"{engine.name} {role}"
        self.sock = os.path.join(ctx.tmpdir, f"{role}.qmp")
        self.log = os.path.join(ctx.tmpdir, f"{role}-{engine.name}.log")
        self.proc = None
        self.qmp = None
        self.events = None
        self.objects = ()

    def fail(self, msg):
        extra = tail(self.log)
        rc = exit_status(self.proc) if self.proc else None
        if rc is not None:
            msg += f" ({self.label} exited with status {rc})"
        raise RunFailed(f"{self.label}: {msg}" + (f"\n  last output of {self.label}:\n{extra}" if extra else ""))

    async def start(self, ram_path=None, incoming=None, argv=None):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)
        if argv is None:
            argv = self.engine.argv(self.ctx.size, ram_path, self.sock, incoming, self.objects)
        with open(self.log, "w") as logf:
            logf.write("$ " + " ".join(argv) + "\n")
            logf.flush()
            try:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                             stderr=subprocess.STDOUT, preexec_fn=_set_pdeathsig,
                                             start_new_session=True)
            except OSError as e:
                raise RunFailed(f"{self.label}: cannot start {argv[0]}: {e}")
        _children.append(self.proc)
        deadline = time.monotonic() + 20
        while True:
            if exit_status(self.proc) is not None:
                self.fail("exited before its QMP socket accepted a connection")
            if os.path.exists(self.sock):
                qmp = QMPClient(f"{self.role}")
                try:
                    await qmp.connect(self.sock)
                    self.qmp = qmp
                    break
                except Exception:
                    with contextlib.suppress(Exception):
                        await qmp.disconnect()
            if time.monotonic() > deadline:
                self.fail("no QMP connection within 20 s")
            await asyncio.sleep(0.01)
        self.events = EventListener("MIGRATION")
        self.qmp.register_listener(self.events)

    async def cmd(self, name, **args):
        try:
            return await asyncio.wait_for(self.qmp.execute(name, args or None), 30)
        except ExecuteError as e:
            self.fail(f"QMP {name} failed: {e}")
        except asyncio.TimeoutError:
            self.fail(f"QMP {name}: no reply within 30 s")
        except Exception as e:
            self.fail(f"QMP {name}: {type(e).__name__}: {e}")

    async def try_cmd(self, name, **args):
        """Like cmd(), but an error only yields {"error": text} (for optional statistics)."""
        try:
            return await asyncio.wait_for(self.qmp.execute(name, args or None), 30)
        except Exception as e:
            return {"error": f"{type(e).__name__}: {e}"}

    async def set_caps(self, caps):
        if caps:
            await self.cmd("migrate-set-capabilities",
                           capabilities=[{"capability": k, "state": v} for k, v in caps.items()])

    async def set_params(self, params):
        if params:
            await self.cmd("migrate-set-parameters", **params)

    def cpu(self):
        try:
            return proc_cpu(self.proc.pid)
        except (OSError, ValueError, IndexError):
            return None

    def status(self):
        try:
            return proc_status(self.proc.pid)
        except (OSError, ValueError):
            return {}

    async def stop(self):
        """quit over QMP; the PID is killed if it does not exit within 10 s."""
        if self.proc is None:
            return
        if self.qmp is not None and exit_status(self.proc) is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), 5)
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.disconnect(), 5)
            self.qmp = None
        deadline = time.monotonic() + 10
        while exit_status(self.proc) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        kill_proc(self.proc)  # also ends anything it left behind in its process group
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)


TERMINAL = ("completed", "failed", "cancelled")


async def wait_migration(vm, deadline, t0):
    """Wait for a terminal MIGRATION status on vm: the event (timestamped by the engine, used
    when plausible) or, as a fallback, query-migrate polling every 0.5 s.
    Returns dict(status, t, how)."""
    next_poll = time.monotonic() + 0.5
    while True:
        now = time.monotonic()
        if now > deadline:
            return {"status": "timeout", "t": None, "how": None}
        try:
            ev = await asyncio.wait_for(vm.events.get(), min(0.1, max(0.01, deadline - now)))
        except asyncio.TimeoutError:
            ev = None
            if exit_status(vm.proc) is not None:  # only once its queued events are read
                return {"status": "exited", "t": None, "how": None}
        if ev is not None:
            st = ev.get("data", {}).get("status")
            if st in TERMINAL:
                recv = time.time()
                ts = ev.get("timestamp", {})
                t = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
                how = "event"
                if not (t0 - 0.5 <= t <= recv + 0.5):  # engine clock not usable: receipt time
                    t, how = recv, "event-recv"
                return {"status": st, "t": t, "how": how}
            continue
        if time.monotonic() >= next_poll:
            next_poll = time.monotonic() + 0.5
            try:
                q = await asyncio.wait_for(vm.qmp.execute("query-migrate"), 5)
            except Exception:
                q = {}
            if isinstance(q, dict) and q.get("status") in TERMINAL:
                # an event may have arrived meanwhile: prefer it
                with contextlib.suppress(asyncio.TimeoutError):
                    ev = await asyncio.wait_for(vm.events.get(), 0.05)
                    if ev.get("data", {}).get("status") in TERMINAL:
                        ts = ev.get("timestamp", {})
                        t = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
                        if t0 - 0.5 <= t <= time.time() + 0.5:
                            return {"status": ev["data"]["status"], "t": t, "how": "event"}
                return {"status": q["status"], "t": time.time(), "how": "poll"}


# --------------------------------------------------------------------------------------
# Scenarios. Each gets (ctx, pair, rep) and returns a record dict; raising RunFailed marks
# the run FAILED with that message. ctx.fresh_ram_file(), ctx.prepare_run(), VM(...) and
# ctx.verify() are the building blocks.

async def tcp_migration(ctx, pair, rep, caps=None, params=None):
    """Stopped VM, loopback TCP, source -> destination; caps/params set on both sides
    (plus events on both and max-bandwidth 0 on the source)."""
    src_engine, dst_engine = pair
    caps = dict(caps or {}, events=True)
    params = dict(params or {})
    rec = {}
    src = VM(src_engine, "src", ctx)
    dst = VM(dst_engine, "dst", ctx)
    if params.get("tls-creds"):
        pki = tls_pki(ctx)
        src.objects = [f"tls-creds-x509,id={params['tls-creds']},dir={pki}/client,endpoint=client"]
        dst.objects = [f"tls-creds-x509,id={params['tls-creds']},dir={pki}/server,endpoint=server"]
    port = ctx.args.port or free_port()
    uri = f"tcp:127.0.0.1:{port}"
    dst_ram = ctx.fresh_ram_file()
    try:
        await dst.start(dst_ram, incoming="defer")
        await src.start(ctx.image)
        await dst.set_caps(caps)
        await dst.set_params(params)
        await dst.cmd("migrate-incoming", uri=uri)
        await src.cmd("stop")
        await src.set_caps(caps)
        await src.set_params(dict(params, **{"max-bandwidth": 0}))
        rec.update(ctx.prepare_run())

        b0, me0 = machine_busy(), self_cpu()
        cs0, cd0 = src.cpu(), dst.cpu()
        t0 = time.time()
        await src.cmd("migrate", uri=uri)
        deadline = time.monotonic() + ctx.timeout
        wd = asyncio.ensure_future(wait_migration(dst, deadline, t0))
        ws = asyncio.ensure_future(wait_migration(src, deadline, t0))
        try:
            pending = {wd, ws}
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(t.result()["status"] != "completed" for t in done):
                    break
        finally:
            for t in (wd, ws):
                t.cancel()
            await asyncio.gather(wd, ws, return_exceptions=True)
        cs1, cd1 = src.cpu(), dst.cpu()
        b1, me1 = machine_busy(), self_cpu()
        if None in (cs0, cd0, cs1, cd1):
            cs0 = cs1 = cd0 = cd1 = 0.0  # only possible when a process died: the run fails below
        rs = ws.result() if ws.done() and not ws.cancelled() else {"status": "not finished", "t": None}
        rd = wd.result() if wd.done() and not wd.cancelled() else {"status": "not finished", "t": None}
        rec.update(src_status=rs["status"], dst_status=rd["status"], wall_how=rd.get("how"))
        if rs["status"] != "completed" or rd["status"] != "completed":
            parts, logs = [], []
            for vm, r in ((dst, rd), (src, rs)):
                q = None
                if exit_status(vm.proc) is None:
                    with contextlib.suppress(Exception):
                        q = await asyncio.wait_for(vm.qmp.execute("query-migrate"), 5)
                st = r["status"]
                if st == "timeout":
                    st = f"timeout after {ctx.timeout:g} s"
                elif st == "exited":
                    st = f"process exited with status {exit_status(vm.proc)}"
                why = f" ({q['error-desc']})" if isinstance(q, dict) and q.get("error-desc") else ""
                parts.append(f"{vm.label}: {st}{why}")
                if r["status"] != "completed" and r["status"] != "not finished":
                    t = tail(vm.log)
                    if t:
                        logs.append(f"  last output of {vm.label}:\n{t}")
            raise RunFailed("migration did not complete: " + "; ".join(parts)
                            + ("\n" + "\n".join(logs) if logs else ""), rec)
        rec["hwm_src_kib"] = src.status().get("VmHWM")
        rec["hwm_dst_kib"] = dst.status().get("VmHWM")
        rec["status_src"], rec["status_dst"] = src.status(), dst.status()
        qs = await src.try_cmd("query-migrate")
        qd = await dst.try_cmd("query-migrate")
        ram = (qs or {}).get("ram", {})
        wall = rd["t"] - t0
        rec.update(
            wall_s=wall, src_wall_s=rs["t"] - t0,
            total_time_ms=(qs or {}).get("total-time"),
            transferred=ram.get("transferred"),
            gib_per_s=ctx.size / GiB / wall,
            gbit_per_s=(ram["transferred"] * 8 / wall / 1e9) if ram.get("transferred") else None,
            cpu_src_s=cs1 - cs0, cpu_dst_s=cd1 - cd0,
            foreign_cpu_s=(b1 - b0) - (cs1 - cs0) - (cd1 - cd0) - (me1 - me0),
            query_migrate_src=qs, query_migrate_dst=qd)
        await asyncio.gather(src.stop(), dst.stop())
        ok, detail = ctx.verify(dst_ram)
        rec["verify"] = detail
        if not ok:
            raise RunFailed(f"verification: {detail}", rec)
        return rec
    finally:
        await asyncio.gather(src.stop(), dst.stop())
        ctx.remove_ram_file(dst_ram)


def tls_pki(ctx):
    """x509 credentials for the TLS scenarios (a CA, a server certificate for
    localhost, a client certificate), made once per invocation with openssl."""
    pki = os.path.join(ctx.tmpdir, "pki")
    if not os.path.exists(os.path.join(pki, "server", "server-cert.pem")):
        sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
        import tls_certs
        tls_certs.make_pki(pki)
    return pki


TLS = {"tls-creds": "tls0", "tls-hostname": "localhost"}


def _tcp(caps=None, params=None, doc=""):
    async def scenario(ctx, pair, rep):
        return await tcp_migration(ctx, pair, rep, caps, params)
    scenario.__doc__ = doc
    return scenario


# --------------------------------------------------------------------------------------
# Live scenario: a running guest dirties a hot set at a set rate while it is migrated.
#
# vmigrate runs its `lab` machine with the `soft` accelerator (a workload thread writing
# guest RAM). QEMU runs a `pc` machine booting scripts/bench_guest/guest.S, a boot sector
# that sweeps the same hot set at the same rate, under TCG or KVM, whichever reaches the
# higher dirty rate here (probed once per invocation). The guest paces itself by the HPET
# counter and halts until the next 1 kHz PIT tick when it is ahead.
#
# The dirty rate is measured the same way on both: pages the guest wrote per second times
# the page size (QEMU's guest writes one serial byte per MARK_PAGES pages, vmigrate reports
# `pages-written` in query-workload), before the migration and during it. calc-dirty-rate
# (page-sampling, same arguments on both) and query-migrate's dirty-pages-rate are recorded
# as the engines' own views.

GUEST_SRC = os.path.join(HERE, "bench_guest", "guest.S")
PIT_DIVISOR = 1193           # 1193182 Hz / 1193: a wake-up tick every ms
HPET_HZ = 100_000_000        # QEMU's HPET counter (the guest checks its period)
MARK_PAGES = 256             # guest pages written per serial byte
PROBE_RATE = 64 * GiB        # a pace no accelerator reaches: the probe guest runs flat out
GUEST_IMAGE_SIZE = MiB
LIVE_PAGE = 4096             # the x86 guest page both engines track
RATE_TOLERANCE = 0.05        # dirty rates within 5 % count as equal


def guest_pages_per_count(rate):
    """Pages per HPET count, as a 32.32 fixed-point number below 2^31."""
    return min((1 << 31) - 1, max(1, round(rate / LIVE_PAGE / HPET_HZ * (1 << 32))))


def guest_rate(rate):
    """The rate the paced guest actually runs at (its pace is quantised)."""
    return guest_pages_per_count(rate) * LIVE_PAGE * HPET_HZ / (1 << 32)


def build_guest(outdir, name, hot, rate):
    """Assemble guest.S for this hot set and rate into a 1 MiB boot disk image."""
    for tool in ("as", "ld"):
        if not shutil.which(tool):
            raise RunFailed(f"cannot build the QEMU guest: {tool} not found")
    defs = {"HOT_PAGES": hot // LIVE_PAGE,
            "PAGES_PER_COUNT_X2_32": guest_pages_per_count(rate),
            "MARK_PAGES": MARK_PAGES,
            "MAX_LAG_PAGES": max(MARK_PAGES, int(rate / LIVE_PAGE / 10)),  # 100 ms of backlog
            "PIT_DIVISOR": PIT_DIVISOR}
    obj, raw, img = (os.path.join(outdir, f"{name}.{ext}") for ext in ("o", "bin", "img"))
    steps = (["as", "--32"] + [a for k, v in defs.items() for a in ("--defsym", f"{k}={v}")]
             + [GUEST_SRC, "-o", obj],
             ["ld", "-m", "elf_i386", "-Ttext=0x7c00", "--oformat=binary", "-e", "_start", obj, "-o", raw])
    for argv in steps:
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise RunFailed(f"cannot build the QEMU guest: {' '.join(argv[:2])} ... failed:\n"
                            + (r.stderr or r.stdout).strip())
    with open(raw, "rb") as f:
        boot = f.read()
    if len(boot) != 512 or boot[510:] != b"\x55\xaa":
        raise RunFailed(f"cannot build the QEMU guest: {raw} is not a 512-byte boot sector")
    with open(img, "wb") as f:
        f.write(boot)
        f.truncate(GUEST_IMAGE_SIZE)
    return img


class LiveConfig:
    """What the live scenario runs; the QEMU accelerator and the final rate are settled
    by live_setup()."""

    def __init__(self, args, workdir):
        self.hot = args.live_hot
        self.memory = args.live_memory or self.hot + 256 * MiB
        self.requested_rate = args.live_rate
        self.rate = args.live_rate
        self.accel_request = args.live_accel
        self.downtime_limit = args.downtime_limit
        self.calc_ms = args.live_calc_ms or int(min(1000, max(50, 500 * self.hot / self.rate)))
        self.timeout = args.timeout or 120.0
        self.workdir = workdir
        self.qemu_accel = None
        self.qemu_unavailable = None
        self.probe = {}
        self.notes = []
        self._built = None
        self._images = {}

    @property
    def vmigrate_rate(self):
        return int(self.rate)

    @property
    def qemu_rate(self):
        return guest_rate(self.rate)

    def guest_image(self, incoming):
        """A copy of the paced guest's disk per role (no image locking between the two)."""
        role = "dst" if incoming else "src"
        if role not in self._images:
            if self._built is None:
                self._built = build_guest(self.workdir, "guest", self.hot, self.rate)
            path = os.path.join(self.workdir, f"guest-{role}.img")
            shutil.copyfile(self._built, path)
            self._images[role] = path
        return self._images[role]

    def describe(self):
        return {"hot": self.hot, "memory": self.memory, "requested_rate": self.requested_rate,
                "rate": self.rate, "qemu_guest_rate": self.qemu_rate, "vmigrate_rate": self.vmigrate_rate,
                "qemu_accel": self.qemu_accel, "accel_request": self.accel_request,
                "probe_unpaced_rate": self.probe, "downtime_limit_ms": self.downtime_limit,
                "calc_dirty_rate_ms": self.calc_ms, "timeout_s": self.timeout, "notes": self.notes}


class GuestMeter:
    """Pages a running guest has written: QEMU's guest counts them on its serial port,
    vmigrate's workload in query-workload."""

    def __init__(self, vm, serial=None):
        self.vm, self.serial = vm, serial

    async def pages(self):
        if self.serial is not None:
            try:
                return os.path.getsize(self.serial) * MARK_PAGES
            except FileNotFoundError:
                return 0
        w = await self.vm.cmd("query-workload")
        return w["pages-written"]

    async def wait_pages(self, n, timeout):
        deadline = time.monotonic() + timeout
        while True:
            got = await self.pages()
            if got >= n:
                return got
            if exit_status(self.vm.proc) is not None:
                self.vm.fail("exited while its guest was starting")
            if time.monotonic() > deadline:
                self.vm.fail(f"guest wrote {got} pages in {timeout:g} s, waited for {n}")
            await asyncio.sleep(0.05)

    async def rate(self, seconds):
        """Bytes of pages written per second over the next `seconds`."""
        p0, t0 = await self.pages(), time.monotonic()
        await asyncio.sleep(seconds)
        p1, t1 = await self.pages(), time.monotonic()
        return (p1 - p0) * LIVE_PAGE / (t1 - t0)


def kvm_usable():
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


async def live_setup(ctx, qemu, pairs, log):
    """Choose QEMU's accelerator (the one whose guest dirties fastest, running flat out)
    and lower the rate to what QEMU's guest reaches, if it reaches less than asked."""
    live = ctx.live
    log(f"live: hot set {human_size(live.hot)} of {human_size(live.memory)}, asked rate "
        f"{live.requested_rate / MiB:.0f} MiB/s, downtime-limit {live.downtime_limit} ms")
    if ("qemu", "qemu") not in pairs:
        return
    if qemu.unavailable:
        live.qemu_unavailable = qemu.unavailable
        return
    accels = ["tcg", "kvm"] if live.accel_request == "auto" else [live.accel_request]
    if live.accel_request == "auto" and not kvm_usable():
        live.probe["kvm"] = None
        live.notes.append("kvm not probed: /dev/kvm not usable")
        accels = ["tcg"]
    try:
        image = build_guest(live.workdir, "probe", live.hot, PROBE_RATE)
    except RunFailed as e:
        live.qemu_unavailable = str(e.args[0])
        log(f"live: {live.qemu_unavailable}")
        return
    for accel in accels:
        vm = VM(qemu, f"probe-{accel}", ctx)
        serial = os.path.join(ctx.tmpdir, f"probe-{accel}.serial")
        try:
            await vm.start(argv=qemu.live_argv(live, vm.sock, serial, None, accel=accel, image=image))
            meter = GuestMeter(vm, serial)
            await meter.wait_pages(MARK_PAGES, 30)
            await asyncio.sleep(0.5)
            live.probe[accel] = await meter.rate(2.0)
        except RunFailed as e:
            live.probe[accel] = None
            live.notes.append(f"{accel} probe failed: {str(e.args[0]).splitlines()[0]}")
        finally:
            await vm.stop()
    shown = ", ".join(f"{a} {r / MiB:.0f} MiB/s" if r else f"{a} –" for a, r in live.probe.items())
    usable = {a: r for a, r in live.probe.items() if r}
    if not usable:
        live.qemu_unavailable = "no accelerator ran the guest: " + "; ".join(live.notes)
        log(f"live: {live.qemu_unavailable}")
        return
    live.qemu_accel = max(usable, key=usable.get)
    best = usable[live.qemu_accel]
    log(f"live: QEMU accelerator {live.qemu_accel} (guest dirty rate running flat out: {shown})")
    if best < live.rate:
        live.rate = int(best // MiB * MiB) or int(best)
        live.notes.append(f"rate lowered from {live.requested_rate / MiB:.0f} to {live.rate / MiB:.0f} MiB/s, "
                          f"the most QEMU's guest reaches under {live.qemu_accel}")
        log(f"live: {live.notes[-1]}")
    log(f"live: guest rate QEMU {live.qemu_rate / MiB:.1f} MiB/s (paced by the HPET), vmigrate "
        f"{live.vmigrate_rate / MiB:.1f} MiB/s")


async def calc_dirty_rate(vm, ms):
    """calc-dirty-rate (page-sampling) over `ms`; bytes per second, or None."""
    r = await vm.try_cmd("calc-dirty-rate", **{"calc-time": ms, "calc-time-unit": "millisecond",
                                                "sample-pages": 16384, "mode": "page-sampling"})
    if isinstance(r, dict) and r.get("error"):
        return None
    deadline = time.monotonic() + ms / 1000 + 15
    while time.monotonic() < deadline:
        await asyncio.sleep(max(0.05, ms / 4000))
        q = await vm.try_cmd("query-dirty-rate")
        if isinstance(q, dict) and q.get("status") == "measured":
            return q["dirty-rate"] * MiB if q.get("dirty-rate") is not None else None
    return None


def thread_cpu(pid, tid):
    """CPU seconds of one thread, or None once it is gone: the scheduler's run time in
    nanoseconds (schedstat) where the kernel keeps it, else user+sys in clock ticks."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    fields = s[s.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK


async def sample_migration(vm, samples, t0, period=0.2, mig_cpu=None):
    """query-migrate every `period` s until cancelled. With MIG_CPU (a dict), the CPU
    seconds of each thread query-migrationthreads lists, the last value read per thread
    (the threads' CPU after the last sample is not seen)."""
    while True:
        await asyncio.sleep(period)
        if mig_cpu is not None:
            threads = await vm.try_cmd("query-migrationthreads")
            for t in threads if isinstance(threads, list) else []:
                c = thread_cpu(vm.proc.pid, t.get("thread-id"))
                if c is not None:
                    mig_cpu[t["thread-id"]] = c
        q = await vm.try_cmd("query-migrate")
        if not isinstance(q, dict) or "status" not in q:
            continue
        ram = q.get("ram", {})
        samples.append({"t": round(time.time() - t0, 3), "status": q.get("status"),
                        "dirty_sync_count": ram.get("dirty-sync-count"),
                        "dirty_pages_rate": ram.get("dirty-pages-rate"), "page_size": ram.get("page-size"),
                        "remaining": ram.get("remaining"), "transferred": ram.get("transferred"),
                        "mbps": ram.get("mbps"), "expected_downtime": q.get("expected-downtime")})


async def live_migration(ctx, pair, rep, caps=None, params=None, sparse=False):
    """running guest dirtying a hot set at a set rate, loopback TCP, precopy, unlimited bandwidth, downtime-limit (qq and vv only)"""
    live = ctx.live
    engine = pair[0]
    is_qemu = isinstance(engine, QemuEngine)
    if is_qemu and live.qemu_unavailable:
        raise RunFailed(f"QEMU live guest unavailable: {live.qemu_unavailable}")
    rec = {"engine": engine.name, "accel": live.qemu_accel if is_qemu else "soft",
           "hot": live.hot, "memory": live.memory,
           "guest_rate_set": live.qemu_rate if is_qemu else live.vmigrate_rate,
           "max_bandwidth": (params or {}).get("max-bandwidth", 0)}
    src, dst = VM(engine, "src", ctx), VM(engine, "dst", ctx)
    serial_src = os.path.join(ctx.tmpdir, f"src-{engine.name}.serial") if is_qemu else None
    serial_dst = os.path.join(ctx.tmpdir, f"dst-{engine.name}.serial") if is_qemu else None
    for p in (serial_src, serial_dst):
        if p:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
    port = ctx.args.port or free_port()
    uri = f"tcp:127.0.0.1:{port}"
    try:
        await src.start(argv=engine.live_argv(live, src.sock, serial_src, None, sparse=sparse))
        await dst.start(argv=engine.live_argv(live, dst.sock, serial_dst, "defer", sparse=sparse))
        for vm in (src, dst):
            await vm.set_caps({"events": True})
        await src.set_caps(caps)
        await src.set_params(dict({"max-bandwidth": 0, "downtime-limit": live.downtime_limit},
                                  **(params or {})))
        await dst.cmd("migrate-incoming", uri=uri)
        meter = GuestMeter(src, serial_src)
        await meter.wait_pages(live.hot // LIVE_PAGE, 60)  # the whole hot set written once
        gw, gl = quiet_gate(ctx.args.gate)
        pw_gib = ctx.args.prewarm if ctx.args.prewarm_given else live.memory / GiB + 1
        pw_s, pw_us = prewarm(int(pw_gib * GiB))
        rec.update(gate_wait_s=gw, gate_load=gl, prewarm_s=pw_s, prewarm_us_per_page=pw_us)
        rec["dirty_rate_before"] = await meter.rate(2.0)
        rec["calc_dirty_rate"] = await calc_dirty_rate(src, live.calc_ms)
        rec["calc_dirty_rate_ms"] = live.calc_ms

        samples = []
        b0, me0 = machine_busy(), self_cpu()
        cs0, cd0 = src.cpu(), dst.cpu()
        pages0 = await meter.pages()
        t0 = time.time()
        await src.cmd("migrate", uri=uri)
        mig_cpu = {}
        capped = caps is not None
        sampler = asyncio.ensure_future(sample_migration(src, samples, t0, period=0.05 if capped else 0.2,
                                                         mig_cpu=mig_cpu if capped else None))
        deadline = time.monotonic() + live.timeout
        ws = asyncio.ensure_future(wait_migration(src, deadline, t0))
        wd = asyncio.ensure_future(wait_migration(dst, deadline, t0))
        try:
            pending = {ws, wd}
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(t.result()["status"] != "completed" for t in done):
                    break
        finally:
            for t in (ws, wd, sampler):
                t.cancel()
            await asyncio.gather(ws, wd, sampler, return_exceptions=True)
        cs1, cd1 = src.cpu(), dst.cpu()
        b1, me1 = machine_busy(), self_cpu()
        rs = ws.result() if ws.done() and not ws.cancelled() else {"status": "not finished", "t": None}
        rd = wd.result() if wd.done() and not wd.cancelled() else {"status": "not finished", "t": None}
        rec["samples"] = samples
        rec.update(src_status=rs["status"], dst_status=rd["status"])
        rates = [s["dirty_pages_rate"] * (s["page_size"] or LIVE_PAGE) for s in samples
                 if s.get("dirty_pages_rate")]
        rec["dirty_pages_rate_max"] = max(rates) if rates else None
        if rs["status"] != "completed" or rd["status"] != "completed":
            q = await src.try_cmd("query-migrate") if exit_status(src.proc) is None else {}
            if isinstance(q, dict) and q.get("status") not in TERMINAL + (None,):
                await src.try_cmd("migrate_cancel")
            ram = (q or {}).get("ram", {})
            rec.update(transferred=ram.get("transferred"), dirty_sync_count=ram.get("dirty-sync-count"))
            why = f" ({q['error-desc']})" if isinstance(q, dict) and q.get("error-desc") else ""
            st = {"timeout": f"did not converge in {live.timeout:g} s"}
            raise RunFailed(f"migration did not complete: source {st.get(rs['status'], rs['status'])}{why}, "
                            f"destination {st.get(rd['status'], rd['status'])}; "
                            f"{ram.get('dirty-sync-count')} passes, "
                            f"{(ram.get('transferred') or 0) / MiB:.0f} MiB sent", rec)
        qs = await src.cmd("query-migrate")
        ram = qs.get("ram", {})
        pages1 = await meter.pages()  # the source guest stopped at switchover
        total_ms, downtime_ms = qs.get("total-time"), qs.get("downtime")
        active_s = ((total_ms or 0) - (downtime_ms or 0)) / 1000
        rec.update(
            wall_s=rd["t"] - t0, total_time_ms=total_ms, downtime_ms=downtime_ms,
            setup_time_ms=qs.get("setup-time"), transferred=ram.get("transferred"),
            dirty_sync_count=ram.get("dirty-sync-count"), normal_pages=ram.get("normal"),
            duplicate_pages=ram.get("duplicate"),
            pages_written_during=pages1 - pages0,
            dirty_rate_during=(pages1 - pages0) * LIVE_PAGE / active_s if active_s > 0 else None,
            cpu_src_s=(cs1 - cs0) if None not in (cs0, cs1) else None,
            cpu_dst_s=(cd1 - cd0) if None not in (cd0, cd1) else None,
            foreign_cpu_s=(b1 - b0) - ((cs1 or 0) - (cs0 or 0)) - ((cd1 or 0) - (cd0 or 0)) - (me1 - me0),
            mig_thread_cpu_s=sum(mig_cpu.values()) if mig_cpu else None,
            xbzrle_cache=qs.get("xbzrle-cache"),
            query_migrate_src=qs)
        # the guest goes on at the destination
        dmeter = GuestMeter(dst, serial_dst)
        d0 = await dmeter.pages()
        t_end = time.monotonic() + 5
        while time.monotonic() < t_end and await dmeter.pages() <= d0:
            await asyncio.sleep(0.05)
        rec["dst_guest_runs"] = await dmeter.pages() > d0
        if not rec["dst_guest_runs"]:
            raise RunFailed("the guest did not run on the destination after the migration", rec)
        return rec
    finally:
        await asyncio.gather(src.stop(), dst.stop())


live_migration.live = True


async def snapshot_migration(ctx, pair, rep, caps=None):
    """running guest writing its hot set, --size of RAM, saved with background-snapshot to a file while it runs (qq and vv only)"""
    live = copy.copy(ctx.live)
    live.memory = ctx.size
    engine = pair[0]
    is_qemu = isinstance(engine, QemuEngine)
    if is_qemu and live.qemu_unavailable:
        raise RunFailed(f"QEMU live guest unavailable: {live.qemu_unavailable}")
    rec = {"engine": engine.name, "accel": live.qemu_accel if is_qemu else "soft",
           "hot": live.hot, "memory": live.memory,
           "guest_rate_set": live.qemu_rate if is_qemu else live.vmigrate_rate}
    vm = VM(engine, "src", ctx)
    serial = os.path.join(ctx.tmpdir, f"snap-{engine.name}.serial") if is_qemu else None
    if serial:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(serial)
    out = ctx.mig_file()
    try:
        await vm.start(argv=engine.live_argv(live, vm.sock, serial, None))
        await vm.set_caps({"events": True})
        await vm.set_caps(dict({"background-snapshot": True}, **(caps or {})))
        meter = GuestMeter(vm, serial)
        await meter.wait_pages(live.hot // LIVE_PAGE, 60)  # the whole hot set written once
        gw, gl = quiet_gate(ctx.args.gate)
        rec.update(gate_wait_s=gw, gate_load=gl)
        rec["dirty_rate_before"] = await meter.rate(2.0)
        c0, b0, me0 = vm.cpu(), machine_busy(), self_cpu()
        pages0, t0 = await meter.pages(), time.time()
        await vm.cmd("migrate", uri=f"file:{out}")
        st = await wait_migration(vm, time.monotonic() + live.timeout, t0)
        pages1, t1 = await meter.pages(), time.time()
        c1, b1, me1 = vm.cpu(), machine_busy(), self_cpu()
        q = await vm.cmd("query-migrate")
        if st["status"] != "completed":
            if q.get("status") not in TERMINAL:
                await vm.try_cmd("migrate_cancel")
            why = f" ({q['error-desc']})" if q.get("error-desc") else ""
            raise RunFailed(f"snapshot did not complete: {st['status']}{why}", rec)
        ram = q.get("ram", {})
        wall = (st["t"] or t1) - t0
        rec.update(
            wall_s=wall, total_time_ms=q.get("total-time"), downtime_ms=q.get("downtime"),
            setup_time_ms=q.get("setup-time"), transferred=ram.get("transferred"),
            normal_pages=ram.get("normal"), duplicate_pages=ram.get("duplicate"),
            file_size=os.path.getsize(out), file_alloc=os.stat(out).st_blocks * 512,
            pages_written_during=pages1 - pages0,
            dirty_rate_during=(pages1 - pages0) * LIVE_PAGE / (t1 - t0) if t1 > t0 else None,
            cpu_src_s=(c1 - c0) if None not in (c0, c1) else None,
            foreign_cpu_s=(b1 - b0) - ((c1 or 0) - (c0 or 0)) - (me1 - me0))
        rec["slowdown"] = (1 - rec["dirty_rate_during"] / rec["dirty_rate_before"]
                           if rec["dirty_rate_during"] is not None and rec["dirty_rate_before"] else None)
        # The guest runs on after the snapshot.
        rec["dirty_rate_after"] = await meter.rate(1.0)
        if not rec["dirty_rate_after"]:
            raise RunFailed("the guest stopped writing after the snapshot", rec)
        if (await vm.cmd("query-status"))["status"] != "running":
            raise RunFailed("the VM is not running after the snapshot", rec)
        return rec
    finally:
        await vm.stop()
        ctx.remove_file(out)


snapshot_migration.live = True
snapshot_migration.snapshot = True


def is_snapshot(scenario):
    return getattr(SCENARIOS[scenario], "snapshot", False)


def report_snapshot(records):
    """The background-snapshot table: per engine, medians over the reps."""
    lines = []
    for sc in [s for s in SCENARIOS if is_snapshot(s)]:
        recs = [r for r in records if r["scenario"] == sc]
        if not recs:
            continue
        rows = []
        for name in ENGINE_NAMES:
            rs = [r for r in recs if r["src"] == name]
            ok = [r for r in rs if r["ok"]]
            if not rs:
                continue
            g = lambda k: [r.get(k) for r in ok]
            mib = lambda k: [v / MiB for v in g(k) if v is not None]
            accel = ",".join(sorted({r["accel"] for r in ok if r.get("accel")})) or "–"
            rows.append([name, accel, f"{len(ok)}/{len(rs)}", fmt(mib("guest_rate_set"), 0),
                         fmt(g("total_time_ms"), 0), fmt(g("downtime_ms"), 0), fmt(mib("transferred"), 0),
                         fmt(mib("file_alloc"), 0), fmt(mib("dirty_rate_before"), 0),
                         fmt(mib("dirty_rate_during"), 0),
                         fmt([100 * v for v in g("slowdown") if v is not None], 0), fmt(g("cpu_src_s"))])
        mem = recs[0].get("memory") or 0
        lines.append(f"\n### {sc}: {SCENARIOS[sc].__doc__}\n")
        lines.append(f"{human_size(mem)} guest RAM, hot set {human_size(recs[0].get('hot') or 0)} rewritten "
                     "pass after pass; `migrate file:` with background-snapshot. Guest rate = page writes × 4 KiB "
                     "per second, idle (2 s before) and during the snapshot (migrate → completed); slowdown = "
                     "1 − during / idle, what copy-before-write costs the guest. Median [min–max] of completed "
                     "runs.\n")
        lines.append(table(["engine", "accel", "ok/runs", "rate set MiB/s", "total time ms", "downtime ms",
                            "sent MiB", "file MiB allocated", "guest MiB/s idle", "guest MiB/s during", "slowdown %",
                            "CPU s"], rows))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# A real rate-limited link (--link, the `*-tbf` scenarios): a veth pair from the host into a
# network namespace this script creates, both ends shaped with tc tbf; the destination runs
# inside the namespace and the source migrates to its address. Nothing leaves the host: the
# pair is private and its /30 is checked to be unused. Removed at exit, whatever happened.

LINK_HOST_ADDR, LINK_NS_ADDR, LINK_PREFIX = "10.213.0.1", "10.213.0.2", 30
_links = []         # Link objects set up by this script, torn down at exit


def parse_link(s):
    """`tbf:RATE[,burst=SIZE][,latency=TIME]` (tc's units: 1gbit, 256kb, 20ms)."""
    kind, _, rest = s.partition(":")
    parts = [p for p in rest.split(",") if p]
    if kind != "tbf" or not parts or not re.fullmatch(r"\d+(\.\d+)?[kmgt]?(bit|bps)", parts[0], re.I):
        raise argparse.ArgumentTypeError(f"bad link {s!r} (use e.g. tbf:1gbit or tbf:1gbit,burst=256kb,latency=20ms)")
    spec = {"rate": parts[0], "burst": "256kb", "latency": "20ms"}
    for p in parts[1:]:
        k, _, v = p.partition("=")
        if k not in ("burst", "latency") or not re.fullmatch(r"\d+(\.\d+)?[a-z]*", v, re.I):
            raise argparse.ArgumentTypeError(f"bad link option {p!r} in {s!r} (burst=SIZE, latency=TIME)")
        spec[k] = v
    return spec


def _run(*argv, ns=None, check=True):
    """Runs a command (inside network namespace ns if given)."""
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
    if check and r.returncode != 0:
        raise BenchError(f"link setup: `{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip()}")
    return r


class Link:
    """veth pair host <-> namespace, tbf on both ends."""

    def __init__(self, spec):
        self.spec = spec
        tag = os.getpid() % 100000
        self.ns = f"vmigrate-bench-{os.getpid()}"
        self.host_if, self.ns_if = f"vmb{tag}h", f"vmb{tag}n"
        self.addr = LINK_NS_ADDR
        self.created = False

    def describe(self):
        s = self.spec
        return (f"veth {self.host_if} ({LINK_HOST_ADDR}/{LINK_PREFIX}) <-> {self.ns_if} ({LINK_NS_ADDR}) in "
                f"network namespace {self.ns}, tc tbf rate {s['rate']} burst {s['burst']} latency "
                f"{s['latency']} on both ends")

    def setup(self, log):
        if os.geteuid() != 0:
            raise BenchError("--link / the *-tbf scenarios need root (ip netns, tc)")
        if shutil.which("ip") is None or shutil.which("tc") is None:
            raise BenchError("--link / the *-tbf scenarios need `ip` and `tc` (iproute2)")
        used = _run("ip", "-o", "-4", "addr", "show").stdout
        if re.search(r"\binet 10\.213\.0\.\d+/", used):
            raise BenchError(f"{LINK_HOST_ADDR}/{LINK_PREFIX} is already in use on this host")
        if self.ns in _run("ip", "netns", "list").stdout.split():
            raise BenchError(f"network namespace {self.ns} exists already")
        _links.append(self)
        self.created = True
        s = self.spec
        tbf = ["root", "tbf", "rate", s["rate"], "burst", s["burst"], "latency", s["latency"]]
        _run("ip", "netns", "add", self.ns)
        _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _run("ip", "link", "set", self.ns_if, "netns", self.ns)
        _run("ip", "addr", "add", f"{LINK_HOST_ADDR}/{LINK_PREFIX}", "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        _run("ip", "link", "set", "lo", "up", ns=self.ns)
        _run("ip", "addr", "add", f"{LINK_NS_ADDR}/{LINK_PREFIX}", "dev", self.ns_if, ns=self.ns)
        _run("ip", "link", "set", self.ns_if, "up", ns=self.ns)
        _run("tc", "qdisc", "add", "dev", self.host_if, *tbf)
        _run("tc", "qdisc", "add", "dev", self.ns_if, *tbf, ns=self.ns)
        r = _run("ping", "-c", "1", "-W", "2", LINK_NS_ADDR, check=False) if shutil.which("ping") else None
        if r is not None and r.returncode != 0:
            raise BenchError(f"link setup: {LINK_NS_ADDR} does not answer ping: {r.stdout.strip()}")
        log(f"link: {self.describe()}")

    def wrap(self, argv):
        """argv run inside the namespace."""
        return ["ip", "netns", "exec", self.ns] + list(argv)

    def teardown(self):
        if not self.created:
            return
        # deleting the namespace (its processes are gone by now) deletes the pair with it
        _run("ip", "netns", "del", self.ns, check=False)
        if _run("ip", "link", "show", self.host_if, check=False).returncode == 0:
            _run("ip", "link", "del", self.host_if, check=False)
        self.created = False


def remove_links():
    for link in list(_links):
        with contextlib.suppress(Exception):
            link.teardown()
        _links.remove(link)


# --------------------------------------------------------------------------------------
# Postcopy scenarios: the live guest, but with max-bandwidth well below its dirty rate so
# that precopy cannot converge; after a fixed precopy time the source is switched to
# postcopy (migrate-start-postcopy) and the destination pulls what it still lacks.

def event_time(ev):
    ts = ev.get("timestamp", {})
    return ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6


def run_events(vm):
    """A listener for the run-state events (STOP / RESUME) of vm."""
    lst = EventListener(("STOP", "RESUME"))
    vm.qmp.register_listener(lst)
    return lst


async def drain_events(lst, name, t0, wait=0.0):
    """Timestamps (engine clock, host wall time) of the `name` events queued in lst since t0."""
    out = []
    deadline = time.monotonic() + wait
    while True:
        try:
            ev = await asyncio.wait_for(lst.get(), max(0.01, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            if out or time.monotonic() >= deadline:
                return out
            continue
        if ev.get("event") == name and event_time(ev) >= t0 - 0.5:
            out.append(event_time(ev))


async def postcopy_migration(ctx, pair, rep, preempt=False, link=False):
    live = ctx.live
    link = ctx.link if link else None
    engine = pair[0]
    is_qemu = isinstance(engine, QemuEngine)
    if is_qemu and live.qemu_unavailable:
        raise RunFailed(f"QEMU live guest unavailable: {live.qemu_unavailable}")
    pc = ctx.args
    bw = pc.postcopy_max_bandwidth
    rec = {"engine": engine.name, "accel": live.qemu_accel if is_qemu else "soft",
           "hot": live.hot, "memory": live.memory, "preempt": preempt,
           "guest_rate_set": live.qemu_rate if is_qemu else live.vmigrate_rate,
           "max_bandwidth": bw, "precopy_s": pc.postcopy_after,
           "link": link.describe() if link else "loopback"}
    src, dst = VM(engine, "src", ctx), VM(engine, "dst", ctx)
    serial_src = os.path.join(ctx.tmpdir, f"src-{engine.name}.serial") if is_qemu else None
    serial_dst = os.path.join(ctx.tmpdir, f"dst-{engine.name}.serial") if is_qemu else None
    for p in (serial_src, serial_dst):
        if p:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
    port = ctx.args.port or free_port()
    uri = f"tcp:{link.addr if link else '127.0.0.1'}:{port}"
    dst_argv = engine.live_argv(live, dst.sock, serial_dst, "defer")
    if link:
        dst_argv = link.wrap(dst_argv)  # the destination listens inside the namespace
    caps = {"events": True, "postcopy-ram": True}
    if preempt:
        caps["postcopy-preempt"] = True
    try:
        await src.start(argv=engine.live_argv(live, src.sock, serial_src, None))
        await dst.start(argv=dst_argv)
        await src.set_caps(caps)
        await dst.set_caps(dict(caps, **{"postcopy-blocktime": True}))
        await src.set_params({"max-bandwidth": bw, "max-postcopy-bandwidth": 0,
                              "downtime-limit": live.downtime_limit})
        await dst.cmd("migrate-incoming", uri=uri)
        meter = GuestMeter(src, serial_src)
        await meter.wait_pages(live.hot // LIVE_PAGE, 60)  # the whole hot set written once
        gw, gl = quiet_gate(ctx.args.gate)
        pw_gib = ctx.args.prewarm if ctx.args.prewarm_given else live.memory / GiB + 1
        pw_s, pw_us = prewarm(int(pw_gib * GiB))
        rec.update(gate_wait_s=gw, gate_load=gl, prewarm_s=pw_s, prewarm_us_per_page=pw_us)
        rec["dirty_rate_before"] = await meter.rate(1.0)
        ev_src, ev_dst = run_events(src), run_events(dst)

        samples = []
        b0, me0 = machine_busy(), self_cpu()
        cs0, cd0 = src.cpu(), dst.cpu()
        t0 = time.time()
        await src.cmd("migrate", uri=uri)
        sampler = asyncio.ensure_future(sample_migration(src, samples, t0))
        deadline = time.monotonic() + live.timeout
        ws = asyncio.ensure_future(wait_migration(src, deadline, t0))
        wd = asyncio.ensure_future(wait_migration(dst, deadline, t0))
        try:
            await asyncio.wait({ws, wd}, timeout=max(0.0, t0 + pc.postcopy_after - time.time()))
            if ws.done() or wd.done():
                raise RunFailed("migration ended before migrate-start-postcopy (precopy converged or "
                                f"failed): source {ws.result()['status'] if ws.done() else 'running'}", rec)
            q = await src.try_cmd("query-migrate")
            rec["precopy_transferred"] = (q.get("ram") or {}).get("transferred") if isinstance(q, dict) else None
            rec["precopy_status"] = q.get("status") if isinstance(q, dict) else None
            rec["t_start_postcopy_s"] = time.time() - t0
            await src.cmd("migrate-start-postcopy")
            pending = {ws, wd}
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(t.result()["status"] != "completed" for t in done):
                    break
        finally:
            for t in (ws, wd, sampler):
                t.cancel()
            await asyncio.gather(ws, wd, sampler, return_exceptions=True)
        cs1, cd1 = src.cpu(), dst.cpu()
        b1, me1 = machine_busy(), self_cpu()
        rs = ws.result() if ws.done() and not ws.cancelled() else {"status": "not finished", "t": None}
        rd = wd.result() if wd.done() and not wd.cancelled() else {"status": "not finished", "t": None}
        rec["samples"] = samples
        rec.update(src_status=rs["status"], dst_status=rd["status"])
        if rs["status"] != "completed" or rd["status"] != "completed":
            q = await src.try_cmd("query-migrate") if exit_status(src.proc) is None else {}
            why = f" ({q['error-desc']})" if isinstance(q, dict) and q.get("error-desc") else ""
            st = {"timeout": f"not completed in {live.timeout:g} s"}
            raise RunFailed(f"migration did not complete: source {st.get(rs['status'], rs['status'])}{why}, "
                            f"destination {st.get(rd['status'], rd['status'])}", rec)
        qs = await src.cmd("query-migrate")
        qd = await dst.cmd("query-migrate")
        ram = qs.get("ram", {})
        stops = await drain_events(ev_src, "STOP", t0, wait=1.0)
        resumes = await drain_events(ev_dst, "RESUME", t0, wait=1.0)
        lat = qd.get("x-vmigrate-fault-latency-us") or {}
        rec.update(
            total_s=rd["t"] - t0, total_how=rd["how"], postcopy_phase_s=rd["t"] - t0 - rec["t_start_postcopy_s"], src_total_time_ms=qs.get("total-time"),
            src_downtime_ms=qs.get("downtime"),
            stop_t=stops[0] if stops else None, resume_t=resumes[0] if resumes else None,
            downtime_ms=(resumes[0] - stops[0]) * 1000 if stops and resumes else None,
            transferred=ram.get("transferred"), postcopy_requests=ram.get("postcopy-requests"),
            dirty_sync_count=ram.get("dirty-sync-count"),
            postcopy_blocktime_ms=qd.get("postcopy-blocktime"),
            fault_count=lat.get("count"), fault_p50_us=lat.get("p50"), fault_p99_us=lat.get("p99"),
            fault_max_us=lat.get("max"),
            cpu_src_s=(cs1 - cs0) if None not in (cs0, cs1) else None,
            cpu_dst_s=(cd1 - cd0) if None not in (cd0, cd1) else None,
            hwm_src_kib=src.status().get("VmHWM"), hwm_dst_kib=dst.status().get("VmHWM"),
            foreign_cpu_s=(b1 - b0) - ((cs1 or 0) - (cs0 or 0)) - ((cd1 or 0) - (cd0 or 0)) - (me1 - me0),
            query_migrate_src=qs, query_migrate_dst=qd)
        if rec["downtime_ms"] is None:
            rec["downtime_note"] = (f"{'no' if not stops else len(stops)} STOP on the source, "
                                    f"{'no' if not resumes else len(resumes)} RESUME on the destination")
        # the guest goes on at the destination: its page count keeps growing
        dmeter = GuestMeter(dst, serial_dst)
        d0 = await dmeter.pages()
        rec["dst_rate_after"] = await dmeter.rate(1.0)
        rec["dst_guest_runs"] = await dmeter.pages() > d0
        if not rec["dst_guest_runs"]:
            raise RunFailed("the guest did not run on the destination after the migration", rec)
        return rec
    finally:
        await asyncio.gather(src.stop(), dst.stop())


def _postcopy(preempt, doc, link=False):
    async def scenario(ctx, pair, rep):
        return await postcopy_migration(ctx, pair, rep, preempt, link)
    scenario.__doc__ = doc
    scenario.live = True
    scenario.postcopy = True
    scenario.link = link
    return scenario


# --------------------------------------------------------------------------------------
# File scenarios: a stopped VM is saved with `migrate file:...` and restored into a fresh
# VM with `migrate-incoming file:...`. The pair's source engine saves, its destination
# engine restores. Right after the warm restore the same file is read with dd; with
# --file-cold the page cache is dropped before a second restore and before a second dd.
#
# "Warm" means the whole file was read once right before the timed step (a direct-io save
# leaves its pages out of the page cache, so the save alone does not make it warm);
# "cold" means `sync; echo 3 > /proc/sys/vm/drop_caches` right before it.

DROP_CACHES = "/proc/sys/vm/drop_caches"


def can_drop_caches():
    return os.geteuid() == 0 and os.access(DROP_CACHES, os.W_OK)


def drop_caches():
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("3\n")


def fs_type(path):
    """File system type of path as `stat -f` names it (e.g. ext2/ext3, tmpfs), or None."""
    with contextlib.suppress(Exception):
        r = subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True, timeout=10)
        if r.returncode == 0:
            return r.stdout.strip()
    return None


def default_file_dir():
    """/var/tmp (or the temp dir) when it is on the repository's file system, else target/."""
    with contextlib.suppress(OSError):
        repo_dev = os.stat(REPO).st_dev
        for d in ("/var/tmp", tempfile.gettempdir()):
            with contextlib.suppress(OSError):
                if os.stat(d).st_dev == repo_dev and os.access(d, os.W_OK):
                    return d
    return os.path.join(REPO, "target")


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dd_read(path, timeout):
    """Wall seconds of `dd if=path of=/dev/null bs=1M`."""
    argv = ["dd", f"if={path}", "of=/dev/null", "bs=1M"]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout, preexec_fn=_set_pdeathsig)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RunFailed(f"{' '.join(argv)}: {e}")
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RunFailed(f"{' '.join(argv)} failed (status {r.returncode}): {r.stderr.strip()}")
    return dt


def prefixed(prefix, d):
    return {prefix + k: v for k, v in d.items()}


async def timed_migration(vm, command, uri, ctx, rec, step):
    """Run `command` (migrate or migrate-incoming) to uri on vm and wait for its terminal
    MIGRATION status. Returns dict(s, cpu_s, foreign_cpu_s, how); RunFailed if it did not
    complete."""
    b0, me0 = machine_busy(), self_cpu()
    c0 = vm.cpu()
    t0 = time.time()
    await vm.cmd(command, uri=uri)
    r = await wait_migration(vm, time.monotonic() + ctx.timeout, t0)
    c1 = vm.cpu()
    b1, me1 = machine_busy(), self_cpu()
    if r["status"] != "completed":
        q = None
        if exit_status(vm.proc) is None:
            with contextlib.suppress(Exception):
                q = await asyncio.wait_for(vm.qmp.execute("query-migrate"), 5)
        st = r["status"]
        if st == "timeout":
            st = f"timeout after {ctx.timeout:g} s"
        elif st == "exited":
            st = f"process exited with status {exit_status(vm.proc)}"
        why = f" ({q['error-desc']})" if isinstance(q, dict) and q.get("error-desc") else ""
        out = tail(vm.log)
        raise RunFailed(f"{step} did not complete: {vm.label}: {st}{why}"
                        + (f"\n  last output of {vm.label}:\n{out}" if out else ""), rec)
    if None in (c0, c1):
        raise RunFailed(f"{step}: {vm.label}: CPU time unreadable", rec)
    return {"s": r["t"] - t0, "cpu_s": c1 - c0, "foreign_cpu_s": (b1 - b0) - (c1 - c0) - (me1 - me0),
            "how": r["how"]}


async def file_restore(ctx, engine, caps, params, uri, path, phase, rec):
    """Restore `path` into a fresh VM of `engine` (phase "warm" or "cold"), verify its RAM,
    and add restore_<phase>_* figures to rec."""
    dst = VM(engine, f"restore-{phase}", ctx)
    dst_ram = ctx.fresh_ram_file()
    p = f"restore_{phase}_"
    try:
        if phase == "cold":
            drop_caches()
        await dst.start(dst_ram, incoming="defer")
        await dst.set_caps(caps)
        await dst.set_params(params)
        rec.update(prefixed(p, ctx.prepare_run()))
        if phase == "warm":
            rec[p + "preread_s"] = dd_read(path, ctx.timeout)
        r = await timed_migration(dst, "migrate-incoming", uri, ctx, rec, f"{phase} restore")
        rec.update({p + "s": r["s"], "cpu_" + p + "s": r["cpu_s"], p + "foreign_cpu_s": r["foreign_cpu_s"],
                    p + "how": r["how"], p + "hwm_kib": dst.status().get("VmHWM"),
                    "query_migrate_" + p.rstrip("_"): await dst.try_cmd("query-migrate")})
        await dst.stop()
        ok, detail = ctx.verify(dst_ram)
        rec[p + "verify"] = detail
        if not ok:
            raise RunFailed(f"verification after the {phase} restore: {detail}", rec)
    finally:
        await dst.stop()
        ctx.remove_file(dst_ram)


async def file_save_restore(ctx, pair, rep, caps=None, params=None):
    """Stopped VM saved to a file by the pair's source engine, restored by its destination
    engine (warm, then cold when --file-cold), the file read with dd after each restore."""
    saver, restorer = pair
    caps = dict(caps or {}, events=True)
    params = dict(params or {}, **{"max-bandwidth": 0})
    path = ctx.mig_file()
    uri = f"file:{path}"
    rec = {"file": path, "file_caps": caps, "file_params": params}
    src = VM(saver, "save", ctx)
    try:
        await src.start(ctx.image)
        await src.cmd("stop")
        await src.set_caps(caps)
        await src.set_params(params)
        os.sync()
        rec.update(prefixed("save_", ctx.prepare_run()))
        r = await timed_migration(src, "migrate", uri, ctx, rec, "save")
        qs = await src.try_cmd("query-migrate")
        rec.update(save_s=r["s"], cpu_save_s=r["cpu_s"], save_foreign_cpu_s=r["foreign_cpu_s"], save_how=r["how"],
                   save_gib_per_s=ctx.size / GiB / r["s"], save_hwm_kib=src.status().get("VmHWM"),
                   save_total_time_ms=(qs or {}).get("total-time"), query_migrate_save=qs)
        await src.stop()
        t0 = time.perf_counter()
        fsync_path(path)
        rec["fsync_after_save_s"] = time.perf_counter() - t0
        st = os.stat(path)
        rec.update(file_size=st.st_size, file_alloc=st.st_blocks * 512)

        await file_restore(ctx, restorer, caps, params, uri, path, "warm", rec)
        rec.update(prefixed("dd_warm_", ctx.prepare_run()))
        rec["dd_warm_s"] = dd_read(path, ctx.timeout)
        if ctx.file_cold:
            await file_restore(ctx, restorer, caps, params, uri, path, "cold", rec)
            drop_caches()
            rec.update(prefixed("dd_cold_", ctx.prepare_run()))
            rec["dd_cold_s"] = dd_read(path, ctx.timeout)
        return rec
    finally:
        await src.stop()
        ctx.remove_file(path)


def _file(caps=None, params=None, doc=""):
    async def scenario(ctx, pair, rep):
        return await file_save_restore(ctx, pair, rep, caps, params)
    scenario.__doc__ = doc
    scenario.file = True
    return scenario


# --------------------------------------------------------------------------------------
# dirty-limit (the `dirtylimit` and `dirtylimit-ac` scenarios): one vCPU dirtying a small
# hot set flat out under KVM with a dirty ring on both engines (QEMU: -M pc -accel
# kvm,dirty-ring-size=4096 with the boot-sector guest; vmigrate: the KVM lab guest,
# --dirty-tracking ring). `dirtylimit` limits the vCPU to DL_LIMIT MiB/s and samples the
# guest's own count of pages written: the achieved rate against the limit and the time to
# settle within 25 %; then it migrates with the `dirty-limit` capability over a link held
# to DL_BANDWIDTH. `dirtylimit-ac` migrates the same guest over the same link with
# auto-converge instead. Both record the guest's progress during the migration.

DL_HOT = 16 * MiB
DL_MEMORY = 64 * MiB
DL_LIMIT = 32                  # MiB/s, set-vcpu-dirty-limit
DL_BANDWIDTH = 32 * MiB        # bytes/s: far below the guest's free rate
DL_MIGRATION_LIMIT = 16        # MiB/s, vcpu-dirty-limit: half the link
DL_SAMPLE_S = 0.5
DL_SETTLE_WINDOW_S = 10.0


def dl_argv(engine, ctx, sock, serial, incoming):
    if isinstance(engine, QemuEngine):
        img_dir = ctx.live.workdir
        role = "dst" if incoming else "src"
        path = os.path.join(img_dir, f"dl-guest-{role}.img")
        if not os.path.exists(path):
            built = os.path.join(img_dir, "dl-guest.img")
            if not os.path.exists(built):
                built = build_guest(img_dir, "dl-guest", DL_HOT, PROBE_RATE)
            shutil.copyfile(built, path)
        a = [engine.binary, "-nodefaults", "-display", "none", "-M", "pc",
             "-accel", "kvm,dirty-ring-size=4096", "-m", size_arg(DL_MEMORY),
             "-drive", f"file={path},format=raw,if=ide",
             "-chardev", f"file,id=com1,path={serial}", "-serial", "chardev:com1",
             "-qmp", f"unix:{sock},server=on,wait=off"]
    else:
        a = [engine.binary, "vm", "--machine", "lab", "--accel", "kvm", "--dirty-tracking", "ring",
             "--cpus", "1", "--memory", size_arg(DL_MEMORY), "--workload", f"hot={DL_HOT}",
             "--qmp", f"unix:{sock}"]
    if incoming:
        a += ["-incoming" if isinstance(engine, QemuEngine) else "--incoming", incoming]
    return a


def dl_settle(series, limit):
    """Seconds until every later sample is within 25 % of `limit` (None: never)."""
    for i, (t, _) in enumerate(series):
        if all(abs(r - limit) <= 0.25 * limit for _, r in series[i:]):
            return t
    return None


async def dl_migrate(ctx, engine, caps, params, rec):
    """A live migration of the dirty-limit guest with `caps`; fills `rec`."""
    is_qemu = isinstance(engine, QemuEngine)
    src, dst = VM(engine, "src", ctx), VM(engine, "dst", ctx)
    serials = [os.path.join(ctx.tmpdir, f"dl-{r}-{engine.name}.serial") if is_qemu else None
               for r in ("src", "dst")]
    for p in serials:
        if p:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
    uri = f"tcp:127.0.0.1:{free_port()}"
    try:
        await src.start(argv=dl_argv(engine, ctx, src.sock, serials[0], None))
        await dst.start(argv=dl_argv(engine, ctx, dst.sock, serials[1], "defer"))
        meter = GuestMeter(src, serials[0])
        await meter.wait_pages(DL_HOT // LIVE_PAGE, 60)
        rec["dirty_rate_before"] = await meter.rate(2.0)
        return await dl_run(ctx, src, dst, meter, uri, caps, params, rec)
    finally:
        await asyncio.gather(src.stop(), dst.stop())


async def dl_limit_accuracy(ctx, engine, rec):
    """set-vcpu-dirty-limit on a running guest: the rate it reaches and how fast."""
    is_qemu = isinstance(engine, QemuEngine)
    vm = VM(engine, "dl", ctx)
    serial = os.path.join(ctx.tmpdir, f"dl-{engine.name}.serial") if is_qemu else None
    if serial:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(serial)
    try:
        await vm.start(argv=dl_argv(engine, ctx, vm.sock, serial, None))
        meter = GuestMeter(vm, serial)
        await meter.wait_pages(DL_HOT // LIVE_PAGE, 60)
        rec["free_rate"] = await meter.rate(2.0)
        await vm.cmd("set-vcpu-dirty-limit", **{"dirty-rate": DL_LIMIT})
        t0 = time.monotonic()
        series = []
        while time.monotonic() - t0 < DL_SETTLE_WINDOW_S:
            r = await meter.rate(DL_SAMPLE_S)
            series.append((round(time.monotonic() - t0, 2), r / MiB))
        rec["limit_series"] = series
        tail = [r for t, r in series if t > DL_SETTLE_WINDOW_S - 4]
        rec["achieved_rate"] = sum(tail) / len(tail) * MiB if tail else None
        rec["settle_s"] = dl_settle(series, DL_LIMIT)
        rec["query_vcpu_dirty_limit"] = await vm.try_cmd("query-vcpu-dirty-limit")
        await vm.cmd("cancel-vcpu-dirty-limit")
    finally:
        await vm.stop()


async def dl_run(ctx, src, dst, meter, uri, caps, params, rec):
    for vm in (src, dst):
        await vm.set_caps(dict(caps, events=True))
    await src.set_params(dict(params, **{"max-bandwidth": DL_BANDWIDTH, "downtime-limit": 300}))
    await dst.cmd("migrate-incoming", uri=uri)
    pages0 = await meter.pages()
    t0 = time.time()
    await src.cmd("migrate", uri=uri)
    deadline = time.monotonic() + (ctx.args.timeout or 90.0)
    rs = await wait_migration(src, deadline, t0)
    if rs["status"] != "completed":
        q = await src.try_cmd("query-migrate")
        if isinstance(q, dict) and q.get("status") not in TERMINAL + (None,):
            await src.try_cmd("migrate_cancel")
        ram = (q or {}).get("ram", {}) if isinstance(q, dict) else {}
        rec.update(total_time_ms=None, transferred=ram.get("transferred"),
                   dirty_sync_count=ram.get("dirty-sync-count"))
        raise RunFailed(f"migration did not complete: {rs['status']}", rec)
    await wait_migration(dst, deadline, t0)
    qs = await src.cmd("query-migrate")
    pages1 = await meter.pages()
    ram = qs.get("ram", {})
    active_s = ((qs.get("total-time") or 0) - (qs.get("downtime") or 0)) / 1000
    rec.update(total_time_ms=qs.get("total-time"), downtime_ms=qs.get("downtime"),
               transferred=ram.get("transferred"), dirty_sync_count=ram.get("dirty-sync-count"),
               dirty_rate_during=(pages1 - pages0) * LIVE_PAGE / active_s if active_s > 0 else None)
    return rec


async def dirtylimit_scenario(ctx, pair, rep):
    """one vCPU under KVM with a dirty ring: set-vcpu-dirty-limit accuracy and settle time, then a live migration with dirty-limit (16 MiB/s) over a 32 MiB/s link (qq and vv only)"""
    engine = pair[0]
    rec = {"engine": engine.name, "accel": "kvm", "limit": DL_LIMIT, "bandwidth": DL_BANDWIDTH}
    if not kvm_usable():
        raise RunFailed("/dev/kvm not usable", rec)
    await dl_limit_accuracy(ctx, engine, rec)
    return await dl_migrate(ctx, engine, {"dirty-limit": True},
                            {"vcpu-dirty-limit": DL_MIGRATION_LIMIT}, rec)


async def dirtylimit_ac_scenario(ctx, pair, rep):
    """the dirtylimit guest and link, migrated with auto-converge instead of dirty-limit (qq and vv only)"""
    engine = pair[0]
    rec = {"engine": engine.name, "accel": "kvm", "limit": None, "bandwidth": DL_BANDWIDTH}
    if not kvm_usable():
        raise RunFailed("/dev/kvm not usable", rec)
    return await dl_migrate(ctx, engine, {"auto-converge": True}, {}, rec)


for _f in (dirtylimit_scenario, dirtylimit_ac_scenario):
    _f.live = True
    _f.dirtylimit = True


def is_dirtylimit(scenario):
    return getattr(SCENARIOS[scenario], "dirtylimit", False)


def report_dirtylimit(records):
    """The dirty-limit table: per engine, medians over the reps."""
    recs = [r for r in records if r["scenario"] in ("dirtylimit", "dirtylimit-ac")]
    if not recs:
        return ""
    med = lambda vals: statistics.median(vals) if vals else None
    f = lambda v, fmt: "–" if v is None else fmt.format(v)
    lines = ["", f"dirty-limit: one vCPU, KVM dirty ring (4096), hot set {DL_HOT // MiB} MiB, "
                 f"limit {DL_LIMIT} MiB/s; migrations over a {DL_BANDWIDTH // MiB} MiB/s link, "
                 f"vcpu-dirty-limit {DL_MIGRATION_LIMIT} MiB/s",
             "| engine | free rate | achieved (limit) | settle | converge dirty-limit | guest rate during"
             " dirty-limit | converge auto-converge | guest rate during auto-converge |",
             "|---|---|---|---|---|---|---|---|"]
    for name in ("qemu", "vmigrate"):
        dl = [r for r in recs if r["src"] == name and r["scenario"] == "dirtylimit"]
        ac = [r for r in recs if r["src"] == name and r["scenario"] == "dirtylimit-ac"]
        if not dl and not ac:
            continue
        g = lambda rs, k: [r[k] for r in rs if r.get(k) is not None]
        fails = [r.get("error", "")[:60] for r in dl + ac if not r["ok"]]
        lines.append(
            f"| {name} | {f(med([v / MiB for v in g(dl, 'free_rate')]), '{:.0f} MiB/s')}"
            f" | {f(med([v / MiB for v in g(dl, 'achieved_rate')]), '{:.1f}')} ({DL_LIMIT})"
            f" | {f(med(g(dl, 'settle_s')), '{:.1f} s')}"
            f" | {f(med([v / 1000 for v in g(dl, 'total_time_ms')]), '{:.1f} s')}"
            f" | {f(med([v / MiB for v in g(dl, 'dirty_rate_during')]), '{:.1f} MiB/s')}"
            f" | {f(med([v / 1000 for v in g(ac, 'total_time_ms')]), '{:.1f} s')}"
            f" | {f(med([v / MiB for v in g(ac, 'dirty_rate_during')]), '{:.1f} MiB/s')} |"
            + (f" failures: {'; '.join(fails)}" if fails else ""))
    return "\n".join(lines)


MAPPED_RAM = {"mapped-ram": True}
MAPPED_RAM_MULTIFD = {"mapped-ram": True, "multifd": True}


SCENARIOS = {
    "tcp-precopy": _tcp(doc="stopped VM, loopback TCP, precopy, one channel, unlimited bandwidth"),
    "tcp-multifd2": _tcp({"multifd": True}, {"multifd-channels": 2},
                         "stopped VM, loopback TCP, multifd 2 channels, no compression"),
    "tcp-multifd4": _tcp({"multifd": True}, {"multifd-channels": 4},
                         "stopped VM, loopback TCP, multifd 4 channels, no compression"),
    "tcp-multifd2-zstd": _tcp({"multifd": True}, {"multifd-channels": 2, "multifd-compression": "zstd",
                                                  "multifd-zstd-level": 1},
                              "stopped VM, loopback TCP, multifd 2 channels, zstd level 1"),
    "tcp-multifd4-zstd": _tcp({"multifd": True}, {"multifd-channels": 4, "multifd-compression": "zstd",
                                                  "multifd-zstd-level": 1},
                              "stopped VM, loopback TCP, multifd 4 channels, zstd level 1"),
    "tcp-multifd2-zlib": _tcp({"multifd": True}, {"multifd-channels": 2, "multifd-compression": "zlib",
                                                  "multifd-zlib-level": 1},
                              "stopped VM, loopback TCP, multifd 2 channels, zlib level 1"),
    "tcp-multifd4-zlib": _tcp({"multifd": True}, {"multifd-channels": 4, "multifd-compression": "zlib",
                                                  "multifd-zlib-level": 1},
                              "stopped VM, loopback TCP, multifd 4 channels, zlib level 1"),
    "tcp-tls": _tcp(None, TLS, "stopped VM, loopback TCP, TLS (x509, verify-peer), one channel"),
    "tcp-tls-multifd2": _tcp({"multifd": True}, dict(TLS, **{"multifd-channels": 2}),
                             "stopped VM, loopback TCP, TLS (x509, verify-peer), multifd 2 channels"),
    "live": live_migration,
    "dirtylimit": dirtylimit_scenario,
    "dirtylimit-ac": dirtylimit_ac_scenario,
    "live-postcopy": _postcopy(False, "running guest dirtying its hot set faster than max-bandwidth, loopback TCP, "
                                      "precopy then migrate-start-postcopy (qq and vv only)"),
    "live-postcopy-preempt": _postcopy(True, "as live-postcopy, with postcopy-preempt (qq and vv only)"),
    "live-postcopy-tbf": _postcopy(False, "as live-postcopy, over a veth pair into a network namespace shaped "
                                          "with tc tbf (--link, default tbf:1gbit)", link=True),
    "live-postcopy-preempt-tbf": _postcopy(True, "as live-postcopy-preempt, over the --link veth pair", link=True),
    "file-plain": _file(doc="stopped VM saved to / restored from a file, plain sequential stream"),
    "file-mr": _file(MAPPED_RAM, None, "stopped VM saved to / restored from a file, mapped-ram, no multifd"),
    "file-mr2": _file(MAPPED_RAM_MULTIFD, {"multifd-channels": 2},
                      "stopped VM saved to / restored from a file, mapped-ram, multifd 2 channels"),
    "file-mr4": _file(MAPPED_RAM_MULTIFD, {"multifd-channels": 4},
                      "stopped VM saved to / restored from a file, mapped-ram, multifd 4 channels"),
    "file-mr-dio": _file(MAPPED_RAM, {"direct-io": True},
                         "stopped VM saved to / restored from a file, mapped-ram, direct-io, no multifd"),
    "file-mr2-dio": _file(MAPPED_RAM_MULTIFD, {"multifd-channels": 2, "direct-io": True},
                          "stopped VM saved to / restored from a file, mapped-ram, multifd 2 channels, direct-io"),
    "file-mr4-dio": _file(MAPPED_RAM_MULTIFD, {"multifd-channels": 4, "direct-io": True},
                          "stopped VM saved to / restored from a file, mapped-ram, multifd 4 channels, direct-io"),
}


def _live_capped(xbzrle, doc):
    """The live guests, each write changing one byte of its page (QEMU's guest does that;
    vmigrate's lab workload with `sparse`), over a `max-bandwidth` cap (--capped-bandwidth)
    below the dirty rate, with or without `xbzrle`; downtime-limit as for live."""
    async def run(ctx, pair, rep):
        caps = {"xbzrle": True} if xbzrle else {}
        return await live_migration(ctx, pair, rep, caps=caps,
                                    params={"max-bandwidth": ctx.args.capped_bandwidth}, sparse=True)
    run.__doc__ = doc
    run.live = True
    run.capped = True
    return run


SCENARIOS["live-capped"] = _live_capped(
    False, "running guest changing one byte per page write, loopback TCP, precopy, --capped-bandwidth "
           "(qq and vv only)")
SCENARIOS["live-capped-xbzrle"] = _live_capped(True, "as live-capped, with the xbzrle capability")


async def cpr_transfer_migration(ctx, pair, rep):
    """Stopped VM handed to a new process on the same host (mode cpr-transfer): both map
    the image file shared; the destination is started with the main URI and the `cpr`
    channel and answers QMP only once the CPR state arrived."""
    src_engine, dst_engine = pair
    rec = {}
    src = VM(src_engine, "src", ctx)
    dst = VM(dst_engine, "dst", ctx)
    main_path = os.path.join(ctx.tmpdir, "main.sock")
    cpr_path = os.path.join(ctx.tmpdir, "cpr.sock")
    cpr = {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": cpr_path}}
    for p in (main_path, cpr_path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    flag = "-incoming" if isinstance(dst_engine, QemuEngine) else "--incoming"
    argv = dst_engine.argv(ctx.size, ctx.image, dst.sock, f"unix:{main_path}") + [flag, json.dumps(cpr)]
    dst_up = asyncio.ensure_future(dst.start(argv=argv))
    try:
        await src.start(ctx.image)
        deadline = time.monotonic() + 20
        while not os.path.exists(cpr_path):
            if dst.proc is not None and exit_status(dst.proc) is not None:
                dst.fail("exited before listening on the cpr channel")
            if time.monotonic() > deadline:
                dst.fail("no cpr channel within 20 s")
            await asyncio.sleep(0.005)
        await src.set_caps({"events": True})
        await src.set_params({"mode": "cpr-transfer"})
        rec.update(ctx.prepare_run())
        b0, me0 = machine_busy(), self_cpu()
        cs0, cd0 = src.cpu(), dst.cpu()
        t0 = time.time()
        await src.cmd("migrate", channels=[
            {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": main_path}}, cpr])
        rs = await wait_migration(src, time.monotonic() + ctx.timeout, t0)
        await dst_up
        qs = await src.try_cmd("query-migrate")
        deadline = time.monotonic() + 20
        while (await dst.cmd("query-status"))["status"] != "running":
            if time.monotonic() > deadline:
                dst.fail("destination not running 20 s after the migration")
            await asyncio.sleep(0.005)
        t_run = time.time() - t0
        cs1, cd1 = src.cpu(), dst.cpu()
        b1, me1 = machine_busy(), self_cpu()
        if None in (cs0, cd0, cs1, cd1):
            cs0 = cs1 = cd0 = cd1 = 0.0
        rec.update(src_status=rs["status"], dst_status="completed",
                   cpu_src_s=cs1 - cs0, cpu_dst_s=cd1 - cd0,
                   foreign_cpu_s=(b1 - b0) - (cs1 - cs0) - (cd1 - cd0) - (me1 - me0),
                   hwm_src_kib=src.status().get("VmHWM"), hwm_dst_kib=dst.status().get("VmHWM"),
                   gbit_per_s=None)
        if rs["status"] != "completed":
            raise RunFailed(f"migration did not complete: {qs}", rec)
        ram = (qs or {}).get("ram", {})
        rec.update(wall_s=t_run, src_wall_s=rs["t"] - t0, total_time_ms=qs.get("total-time"),
                   downtime_ms=qs.get("downtime"), transferred=ram.get("transferred"),
                   gib_per_s=ctx.size / GiB / t_run, query_migrate_src=qs)
        ok, detail = ctx.verify(ctx.image)
        rec["verify"] = detail
        if not ok:
            raise RunFailed(f"verification: {detail}", rec)
        return rec
    finally:
        dst_up.cancel()
        await asyncio.gather(dst_up, return_exceptions=True)
        await asyncio.gather(src.stop(), dst.stop())


cpr_transfer_migration.__doc__ = ("stopped VM handed over with mode cpr-transfer: CPR state on a unix socket, "
                                  "RAM left in the shared file, main stream without pages")
SCENARIOS["cpr-transfer"] = cpr_transfer_migration
SCENARIOS["background-snapshot"] = snapshot_migration


async def snapshot_mapped_ram(ctx, pair, rep):
    """as background-snapshot, into a mapped-ram file (qq and vv only)"""
    return await snapshot_migration(ctx, pair, rep, caps={"mapped-ram": True})


snapshot_mapped_ram.live = True
snapshot_mapped_ram.snapshot = True
SCENARIOS["background-snapshot-mr"] = snapshot_mapped_ram


def is_live(scenario):
    return getattr(SCENARIOS[scenario], "live", False)


def is_postcopy(scenario):
    return getattr(SCENARIOS[scenario], "postcopy", False)


def is_file(scenario):
    return getattr(SCENARIOS[scenario], "file", False)


def uses_link(scenario):
    return getattr(SCENARIOS[scenario], "link", False)


SCENARIO_GROUPS = {
    "file": [s for s in SCENARIOS if is_file(s)],
    "tcp": [s for s in SCENARIOS if s.startswith("tcp-")],
}


# --------------------------------------------------------------------------------------
# Run context

class Ctx:
    def __init__(self, args, image, meta, tmpdir):
        self.args = args
        self.size = args.size
        self.image = image
        self.meta = meta
        self.tmpdir = tmpdir
        self.timeout = args.timeout or max(120, 60 * args.size / GiB)
        self.live = None  # LiveConfig, when a live scenario runs
        self.link = None  # Link, when a scenario runs over --link
        self.file_dir = args.file_dir
        self.file_cold = args.file_cold
        self._n = 0
        self.harness_errors = 0

    def fresh_ram_file(self):
        """A new, sparse (untouched) RAM file of the VM's size in the shm dir."""
        self._n += 1
        path = os.path.join(self.args.shm, f"vmigrate-bench-dst-{os.getpid()}-{self._n}.ram")
        _temp_files.add(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, self.size)
        finally:
            os.close(fd)
        return path

    def mig_file(self):
        """Path of the migration file of a file scenario (in --file-dir; removed at exit)."""
        path = os.path.join(self.file_dir, f"bench-{os.getpid()}.mig")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        _temp_files.add(path)
        return path

    def remove_file(self, path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        _temp_files.discard(path)

    remove_ram_file = remove_file

    def prepare_run(self):
        """Called by a scenario right before its timed part: quiet gate + prewarm."""
        gw, gl = quiet_gate(self.args.gate)
        pw_s, pw_us = prewarm(int(self.args.prewarm * GiB))
        return {"gate_wait_s": gw, "gate_load": gl, "prewarm_s": pw_s, "prewarm_us_per_page": pw_us}

    def verify(self, path):
        return verify_ram(path, self.meta)


# --------------------------------------------------------------------------------------
# Reporting

PAIR_NAMES = {"qq": ("qemu", "qemu"), "vv": ("vmigrate", "vmigrate"),
              "qv": ("qemu", "vmigrate"), "vq": ("vmigrate", "qemu"),
              "bb": ("vmigrate-before", "vmigrate-before")}
# Engines in report order: --vmigrate-before (pair bb) is an older vmigrate binary run in the
# same benchmark, for before/after figures of a change.
ENGINE_NAMES = ("qemu", "vmigrate-before", "vmigrate")


def pair_label(p):
    return f"{p[0]}→{p[1]}"


def fmt(vals, prec=2):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    med = statistics.median(vals)
    if len(vals) == 1:
        return f"{med:.{prec}f}"
    return f"{med:.{prec}f} [{min(vals):.{prec}f}–{max(vals):.{prec}f}]"


def median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def report(records, size, scenarios, pairs):
    gib = size / GiB
    lines = []
    for sc in scenarios:
        rows = []
        for p in pairs:
            rs = [r for r in records if r["scenario"] == sc and (r["src"], r["dst"]) == p]
            ok = [r for r in rs if r["ok"]]
            g = lambda k: [r.get(k) for r in ok]
            per_gib = lambda k: [r[k] / gib for r in ok if r.get(k) is not None]
            mib = lambda k: [r[k] / 1024 for r in ok if r.get(k) is not None]
            rows.append([pair_label(p), f"{len(ok)}/{len(rs)}", fmt(g("wall_s")), fmt(g("gib_per_s")),
                         fmt(g("gbit_per_s"), 1), fmt([r["transferred"] / GiB for r in ok if r.get("transferred")], 3),
                         fmt(g("cpu_src_s")), fmt(g("cpu_dst_s")), fmt(per_gib("cpu_src_s")), fmt(per_gib("cpu_dst_s")),
                         fmt(mib("hwm_src_kib"), 0), fmt(mib("hwm_dst_kib"), 0), fmt(g("foreign_cpu_s"), 1),
                         fmt(g("prewarm_us_per_page"), 2)])
        lines.append(f"\n### {sc}: {SCENARIOS[sc].__doc__} — {human_size(size)} guest RAM; median [min–max] of verified runs\n")
        lines.append(table(["pair (src→dst)", "ok/runs", "wall s", "RAM GiB/s", "wire Gbit/s", "sent GiB",
                            "CPU src s", "CPU dst s", "CPU src s/GiB", "CPU dst s/GiB",
                            "peak RSS src MiB", "peak RSS dst MiB", "foreign CPU s", "prewarm µs/page"], rows))

        # ratios vmigrate / QEMU, from medians
        def m(pair, key, per=1.0):
            vals = [r[key] / per for r in records if r["scenario"] == sc and r["ok"]
                    and (r["src"], r["dst"]) == pair and r.get(key) is not None]
            return median(vals)

        def ratio(a, b):
            return f"{a / b:.2f}" if a is not None and b and b > 0 else "–"

        def num(v):
            return f"{v:.2f}" if v is not None else "–"

        Q, V = "qemu", "vmigrate"
        rrows = []
        for role, other, vpair, qpair, cpukey in (
                ("source", "dst " + Q, (V, Q), (Q, Q), "cpu_src_s"),
                ("source", "dst " + V, (V, V), (Q, V), "cpu_src_s"),
                ("destination", "src " + Q, (Q, V), (Q, Q), "cpu_dst_s"),
                ("destination", "src " + V, (V, V), (V, Q), "cpu_dst_s")):
            tv, tq = m(vpair, "gib_per_s"), m(qpair, "gib_per_s")
            cv, cq = m(vpair, cpukey, gib), m(qpair, cpukey, gib)
            if None in (tv, tq) and None in (cv, cq):
                continue
            rrows.append([role, other, f"{pair_label(vpair)} / {pair_label(qpair)}", ratio(tv, tq),
                          num(cv), num(cq), ratio(cv, cq)])
        tv, tq = m((V, V), "gib_per_s"), m((Q, Q), "gib_per_s")
        if tv is not None and tq is not None:
            cv = median([(r["cpu_src_s"] + r["cpu_dst_s"]) / gib for r in records
                         if r["scenario"] == sc and r["ok"] and (r["src"], r["dst"]) == (V, V)])
            cq = median([(r["cpu_src_s"] + r["cpu_dst_s"]) / gib for r in records
                         if r["scenario"] == sc and r["ok"] and (r["src"], r["dst"]) == (Q, Q)])
            rrows.append(["both", "–", f"{pair_label((V, V))} / {pair_label((Q, Q))}", ratio(tv, tq),
                          num(cv), num(cq), ratio(cv, cq)])
        lines.append("\nvmigrate / QEMU (throughput ratio > 1: vmigrate faster; CPU ratio < 1: vmigrate cheaper)\n")
        if rrows:
            lines.append(table(["role", "other side", "pairs compared", "throughput ratio",
                                "CPU s/GiB vmigrate", "CPU s/GiB QEMU", "CPU ratio"], rrows))
        else:
            lines.append("(no ratios: needs verified runs of both engines in the same role)")
        failed = [r for r in records if r["scenario"] == sc and not r["ok"]]
        if failed:
            lines.append("\nFAILED runs (not counted):")
            for r in failed:
                first = (r.get("error") or "").splitlines()[0] if r.get("error") else "?"
                lines.append(f"  {pair_label((r['src'], r['dst']))} rep {r['rep']}: {first}")
    return "\n".join(lines)


FLOOR_TARGET = 0.8           # a receive path's data rate / the floor of its source


def measure_floor(args, tmpdir, log):
    """Compiles scripts/floor.c (once) and runs it: a list of {kind, source, mode,
    seconds, gib_per_s}, or [] with a note when it cannot run."""
    exe = os.path.join(tmpdir, "floor")
    if not os.path.exists(exe):
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            log("note: no C compiler (cc): the destination floor is not measured")
            return []
        r = subprocess.run([cc, "-O2", "-pthread", "-o", exe, os.path.join(HERE, "floor.c")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            log(f"note: scripts/floor.c does not build, the floor is not measured: {r.stderr.strip()[:300]}")
            return []
    warm_dir = args.file_dir if os.path.isdir(args.file_dir) else tempfile.gettempdir()
    quiet_gate(args.gate)
    r = subprocess.run([exe, str(args.size), args.shm, warm_dir], capture_output=True, text=True,
                       timeout=max(120, 60 * args.size / GiB))
    if r.returncode != 0:
        log(f"note: the floor measurement failed: {r.stderr.strip()[:300]}")
        return []
    out = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    for f in out:
        f["start"] = time.time()
    log("floor: " + ", ".join(f"{f['kind']}/{f['source']}/{f['mode']} {f['gib_per_s']:.2f} GiB/s" for f in out))
    return out


def floor_rates(floor):
    """The floor per (kind, source): the best rate any mode reached in any measurement."""
    best = {}
    for f in floor:
        k = (f["kind"], f["source"])
        best[k] = max(best.get(k, 0.0), f["gib_per_s"])
    return best


def report_floor(records, floor, meta, size, scenarios, pairs):
    """Each receive path's data rate as a fraction of the floor of its source."""
    if not floor:
        return "\n(destination floor not measured)"
    rates = floor_rates(floor)
    modes = ("fault", "populate", "write")
    measured = collections.Counter((f["kind"], f["source"], f["mode"]) for f in floor)
    lines = ["\n## Destination floor — fault in and fill fresh memory, "
             f"{human_size(size)}, best of {max(measured.values())} measurement(s)\n"]
    rows = []
    for (kind, source), best in sorted(rates.items()):
        per_mode = {m: [f["gib_per_s"] for f in floor
                        if (f["kind"], f["source"], f["mode"]) == (kind, source, m)] for m in modes}
        rows.append([kind, source] + [fmt(per_mode[m]) if per_mode[m] else "–" for m in modes] + [f"{best:.2f}"])
    lines.append(table(["memory", "source", "page by page GiB/s", "populate per chunk GiB/s",
                        "pwrite per chunk GiB/s", "floor GiB/s"], rows))
    blocks = (meta or {}).get("blocks") or {}
    total = sum(blocks.values())
    nonzero = (blocks.get("random", 0) + blocks.get("text", 0)) / total if total else 1.0
    lines.append(f"\nReceive paths against the floor: data = the non-zero part of RAM ({nonzero:.0%}), the bytes a "
                 "destination must write; fraction = data GiB/s / floor GiB/s of the path's source into tmpfs "
                 f"(target >= {FLOOR_TARGET:.0%}); RAM GiB/s / floor in brackets.\n")
    rows = []
    for sc in scenarios:
        source = "file" if is_file(sc) else "socket"
        # Several receivers at once: the two-thread floor, where it was measured.
        if re.search(r"multifd\d|mr\d", sc) and ("tmpfs", source + "2") in rates:
            source += "2"
        floor_rate = rates.get(("tmpfs", source))
        for p in pairs:
            ok = [r for r in records if r["scenario"] == sc and (r["src"], r["dst"]) == p and r["ok"]]
            key = "restore_warm_s" if is_file(sc) else "wall_s"
            secs = [r[key] for r in ok if r.get(key)]
            if not secs or not floor_rate:
                continue
            ram = median([size / GiB / t for t in secs])
            data = ram * nonzero
            rows.append([sc + (" restore warm" if is_file(sc) else ""), pair_label(p), f"{ram:.2f}", f"{data:.2f}",
                         f"{floor_rate:.2f} ({source})", f"{data / floor_rate:.0%} ({ram / floor_rate:.0%})"])
    lines.append(table(["path", "pair (src→dst)", "RAM GiB/s", "data GiB/s", "floor GiB/s", "fraction"], rows)
                 if rows else "(no verified runs)")
    return "\n".join(lines)


FILE_SPEEDUP_TARGET = 1.5    # QEMU's best time / vmigrate's time, save and restore
FILE_DD_TARGET = 0.8         # vmigrate restore throughput / dd throughput on the same file


def _file_runs(records, sc, engine, role):
    """Verified runs of scenario sc where `engine` did the `role` ("save" or "restore").
    A save does not depend on who restores, so every pair it saved in counts; a restore
    counts from files its own engine saved, or, without such runs, from any."""
    ok = [r for r in records if r["scenario"] == sc and r["ok"]]
    if role == "save":
        return [r for r in ok if r["src"] == engine]
    own = [r for r in ok if r["dst"] == engine and r["src"] == engine]
    return own or [r for r in ok if r["dst"] == engine]


def _dd_fraction(r, phase):
    """Restore throughput as a fraction of dd's on the same file (dd time / restore time)."""
    rs, dd = r.get(f"restore_{phase}_s"), r.get(f"dd_{phase}_s")
    return dd / rs if rs and dd else None


def report_file(records, size, scenarios, pairs, cold):
    """Tables of the file scenarios: per scenario and pair, then QEMU's best configuration
    against vmigrate's, and vmigrate's restore against dd on the same file."""
    gib = size / GiB
    phases = ("warm", "cold") if cold else ("warm",)
    lines = [f"\n## File save/restore — {human_size(size)} guest RAM, stopped VM; median [min–max] of verified runs",
             "save: `migrate file:` to the source's `completed` event; restore: `migrate-incoming file:` in a fresh "
             "VM to its `completed` event (warm: the file was read once right before; cold: sync + drop_caches "
             "right before); dd: `dd if=FILE of=/dev/null bs=1M` on the same file right after the restore "
             "(warm, then cold after drop_caches); restore/dd = dd s / restore s (restore throughput as a "
             "fraction of dd's). CPU = user+sys of the engine process over the timed step."
             + ("" if cold else " Cold restore not measured (--no-file-cold, or not root).")]
    for sc in scenarios:
        rows = []
        for p in pairs:
            rs = [r for r in records if r["scenario"] == sc and (r["src"], r["dst"]) == p]
            if not rs:
                continue
            ok = [r for r in rs if r["ok"]]
            g = lambda k: [r.get(k) for r in ok]
            gi = lambda k: [r[k] / GiB for r in ok if r.get(k) is not None]
            size_alloc = (f"{fmt(gi('file_size'))} / {fmt(gi('file_alloc'))}" if ok else "–")
            row = [pair_label(p), f"{len(ok)}/{len(rs)}", fmt(g("save_s")), fmt(g("save_gib_per_s")),
                   fmt(g("restore_warm_s"))]
            if cold:
                row.append(fmt(g("restore_cold_s")))
            row += [fmt(g("cpu_save_s")), fmt(g("cpu_restore_warm_s"))]
            if cold:
                row.append(fmt(g("cpu_restore_cold_s")))
            row += [size_alloc, fmt(g("dd_warm_s"))]
            if cold:
                row.append(fmt(g("dd_cold_s")))
            row += [fmt([_dd_fraction(r, ph) for r in ok]) for ph in phases]
            row.append(" / ".join(fmt(g(k), 1) for k in
                                  ("save_foreign_cpu_s", "restore_warm_foreign_cpu_s")
                                  + (("restore_cold_foreign_cpu_s",) if cold else ())))
            rows.append(row)
        header = ["pair (save→restore)", "ok/runs", "save s", "save GiB/s", "restore warm s"]
        header += ["restore cold s"] if cold else []
        header += ["CPU save s", "CPU restore warm s"] + (["CPU restore cold s"] if cold else [])
        header += ["file GiB size / allocated", "dd warm s"] + (["dd cold s"] if cold else [])
        header += [f"restore/dd {ph}" for ph in phases]
        header += ["foreign CPU s save / warm" + (" / cold" if cold else "")]
        lines.append(f"\n### {sc}: {SCENARIOS[sc].__doc__}\n")
        lines.append(table(header, rows) if rows else "(no runs)")
        failed = [r for r in records if r["scenario"] == sc and not r["ok"]]
        if failed:
            lines.append("\nFAILED runs (not counted):")
            for r in failed:
                first = (r.get("error") or "").splitlines()[0] if r.get("error") else "?"
                lines.append(f"  {pair_label((r['src'], r['dst']))} rep {r['rep']}: {first}")

    def med(sc, engine, role, key):
        return median([r.get(key) for r in _file_runs(records, sc, engine, role)])

    def best(engine, role, key):
        got = [(med(sc, engine, role, key), sc) for sc in scenarios]
        got = [x for x in got if x[0] is not None]
        return min(got) if got else (None, None)

    def num(v):
        return f"{v:.2f}" if v is not None else "–"

    def ratio(a, b):
        return a / b if a is not None and b else None

    def verdict(v, target):
        return "–" if v is None else ("MET" if v >= target else "NOT MET")

    steps = [("save", "save", "save_s")] + [(f"restore {ph}", "restore", f"restore_{ph}_s") for ph in phases]
    rows, met_lines = [], []
    for label, role, key in steps:
        tq, cq = best("qemu", role, key)
        tv, cv = best("vmigrate", role, key)
        tvs = med(cq, "vmigrate", role, key) if cq else None
        r_best, r_same = ratio(tq, tv), ratio(tq, tvs)
        rows.append([label, cq or "–", num(tq), cv or "–", num(tv), num(tvs),
                     num(r_best), num(r_same), f"≥ {FILE_SPEEDUP_TARGET:g}"])
        met_lines.append(f"{label}: QEMU best ({cq or '–'}, {num(tq)} s) / vmigrate best ({cv or '–'}, {num(tv)} s) "
                         f"= {num(r_best)} (target ≥ {FILE_SPEEDUP_TARGET:g}): {verdict(r_best, FILE_SPEEDUP_TARGET)}")
        met_lines.append(f"{label}: QEMU best ({cq or '–'}, {num(tq)} s) / vmigrate in the same configuration "
                         f"({num(tvs)} s) = {num(r_same)} (target ≥ {FILE_SPEEDUP_TARGET:g}): "
                         f"{verdict(r_same, FILE_SPEEDUP_TARGET)}")
    lines.append(f"\n### File save/restore summary: QEMU's best configuration vs vmigrate — {human_size(size)}\n")
    lines.append(f"Best = lowest median time over the file scenarios measured ({', '.join(scenarios)}). "
                 "Save times count every run the engine saved in; restore times count restores of a file the "
                 "same engine saved (qq, vv; without such runs, any file). Ratio = QEMU-best time / vmigrate time (> 1: vmigrate faster).\n")
    lines.append(table(["step", "QEMU best config", "QEMU s", "vmigrate best config", "vmigrate s",
                        "vmigrate s in QEMU's best config", "QEMU best / vmigrate best",
                        "QEMU best / vmigrate same config", "target"], rows))

    rows = []
    for sc in scenarios:
        row = [sc]
        for ph in phases:
            for engine in ("vmigrate", "qemu"):
                rs = _file_runs(records, sc, engine, "restore")
                row += [num(median([r.get(f"restore_{ph}_s") for r in rs])),
                        num(median([r.get(f"dd_{ph}_s") for r in rs])),
                        num(median([_dd_fraction(r, ph) for r in rs]))]
        rows.append(row)
    header = ["config"]
    for ph in phases:
        header += [f"vmigrate restore {ph} s", f"dd {ph} s", f"vmigrate restore/dd {ph}",
                   f"QEMU restore {ph} s", f"dd {ph} s (QEMU runs)", f"QEMU restore/dd {ph}"]
    lines.append(f"\n### Restore vs dd on the same file (restore/dd = dd s / restore s, median of per-run "
                 f"ratios; target for vmigrate ≥ {FILE_DD_TARGET:.0%})\n")
    lines.append(table(header, rows))
    for ph in phases:
        key = f"restore_{ph}_s"
        tv, cv = best("vmigrate", "restore", key)
        if cv is None:
            met_lines.append(f"restore {ph} vs dd: not decided (no verified vmigrate restore)")
            continue
        frac = median([_dd_fraction(r, ph) for r in _file_runs(records, cv, "vmigrate", "restore")])
        per_cfg = [median([_dd_fraction(r, ph) for r in _file_runs(records, sc, "vmigrate", "restore")])
                   for sc in scenarios]
        per_cfg = [f for f in per_cfg if f is not None]
        n_met = sum(f >= FILE_DD_TARGET for f in per_cfg)
        shown = f"{frac:.0%}" if frac is not None else "–"
        met_lines.append(f"restore {ph} vs dd: vmigrate's best restore configuration ({cv}) reaches "
                         f"{shown} of dd's throughput on the same file (target ≥ {FILE_DD_TARGET:.0%}): "
                         f"{verdict(frac, FILE_DD_TARGET)}; {n_met} of {len(per_cfg)} configurations reach it")
    lines.append("")
    lines += met_lines
    return "\n".join(lines)


def capped_table(recs):
    """live-capped scenarios: what the source's migration threads did with the pages."""
    rows = []
    for name in ENGINE_NAMES:
        ok = [r for r in recs if r["src"] == name and r["ok"]]
        if not ok:
            continue
        xb = [r.get("xbzrle_cache") or {} for r in ok]
        pages = [(r.get("normal_pages") or 0) + x.get("pages", 0) for r, x in zip(ok, xb)]
        per_gib = [r["mig_thread_cpu_s"] / (p * 4096 / GiB) for r, p in zip(ok, pages)
                   if r.get("mig_thread_cpu_s") is not None and p]
        rows.append([pair_label((name, name)), fmt([r.get("transferred") / MiB for r in ok], 1),
                     fmt([r.get("total_time_ms") for r in ok], 0), fmt([r.get("downtime_ms") for r in ok], 0),
                     fmt([r.get("normal_pages") for r in ok], 0), fmt([x.get("pages") for x in xb], 0),
                     fmt([x["bytes"] / MiB for x in xb if "bytes" in x], 2),
                     fmt([x.get("overflow") for x in xb], 0), fmt([x.get("cache-miss") for x in xb], 0),
                     fmt([r.get("mig_thread_cpu_s") for r in ok], 2), fmt(per_gib, 2)])
    return ("\nPages and migration-thread CPU (threads of query-migrationthreads, run time from /proc/.../schedstat every "
            "50 ms while they run; pages handled = normal + XBZRLE pages):\n\n"
            + table(["engine", "sent MiB", "total ms", "downtime ms", "normal pages", "xbzrle pages",
                     "xbzrle MiB", "overflow", "cache miss", "mig thread CPU s", "CPU s / GiB handled"], rows))


def report_live(records, live):
    """Tables of the live scenario: per engine, then vmigrate / QEMU and the target."""
    lines = []
    for sc in [s for s in SCENARIOS if is_live(s) and not is_postcopy(s) and not is_dirtylimit(s)
               and not is_snapshot(s)]:
        recs = [r for r in records if r["scenario"] == sc]
        if not recs:
            continue
        mib = lambda vals: [v / MiB for v in vals if v is not None]
        rows = []
        for name in ENGINE_NAMES:
            rs = [r for r in recs if r["src"] == name]
            ok = [r for r in rs if r["ok"]]
            if not rs:
                continue
            g = lambda k: [r.get(k) for r in ok]
            accel = ",".join(sorted({r["accel"] for r in ok if r.get("accel")})) or "–"
            rows.append([f"{pair_label((name, name))}", accel, f"{len(ok)}/{len(rs)}",
                         fmt(mib(g("guest_rate_set")), 0), fmt(mib(g("dirty_rate_before")), 0),
                         fmt(mib(g("dirty_rate_during")), 0), fmt(mib(g("calc_dirty_rate")), 0),
                         fmt(mib(g("dirty_pages_rate_max")), 0),
                         fmt(g("total_time_ms"), 0), fmt(g("downtime_ms"), 0), fmt(mib(g("transferred")), 0),
                         fmt(g("dirty_sync_count"), 0), fmt(g("wall_s")), fmt(g("cpu_src_s")),
                         fmt(g("cpu_dst_s"))])
        probe = ", ".join(f"{a} {r / MiB:.0f} MiB/s" if r else f"{a} –" for a, r in live.probe.items())
        lines.append(f"\n### {sc}: {SCENARIOS[sc].__doc__}\n")
        lines.append(f"hot set {human_size(live.hot)} of {human_size(live.memory)} guest RAM; downtime-limit "
                     f"{live.downtime_limit} ms; max-bandwidth {human_size(recs[0].get('max_bandwidth') or 0)}/s "
                     f"(0: unlimited). QEMU guest: pc machine, accelerator "
                     f"{live.qemu_accel or '–'} (chosen by the higher flat-out guest dirty rate: {probe or 'not probed'}); "
                     f"vmigrate: lab machine, soft accelerator.")
        for n in live.notes:
            lines.append(f"note: {n}")
        lines.append("Dirty rate = guest page writes × 4 KiB per second (QEMU: serial marks, vmigrate: "
                     "query-workload pages-written), before and during the migration; calc-dirty-rate is "
                     f"page-sampling over {live.calc_ms} ms (distinct pages); dirty-pages-rate is the highest "
                     "query-migrate figure seen (sampled every 0.2 s; QEMU computes it over periods of at least "
                     "1 s, so a hot set rewritten faster counts once per period). Median [min–max] of completed "
                     "runs.\n")
        lines.append(table(["engine (src→dst)", "accel", "ok/runs", "rate set MiB/s", "dirty MiB/s before",
                            "dirty MiB/s during", "calc-dirty-rate MiB/s", "dirty-pages-rate MiB/s",
                            "total time ms", "downtime ms", "sent MiB", "passes", "wall s",
                            "CPU src s", "CPU dst s"], rows))
        if getattr(SCENARIOS[sc], "capped", False):
            lines.append(capped_table(recs))

        def m(name, key):
            return median([r.get(key) for r in recs if r["ok"] and r["src"] == name])

        def ratio(a, b):
            return f"{a / b:.2f}" if a is not None and b else "–"

        ratios = []
        for label, key in (("downtime", "downtime_ms"), ("sent bytes", "transferred"),
                           ("total time", "total_time_ms"), ("passes", "dirty_sync_count"),
                           ("dirty rate before", "dirty_rate_before"), ("dirty rate during", "dirty_rate_during")):
            ratios.append([label, ratio(m("vmigrate", key), m("qemu", key))])
        lines.append("\nvmigrate / QEMU (medians; < 1 for downtime, bytes and time: vmigrate better; "
                     "≥ 1 for dirty rates: vmigrate's guest dirtied at least as fast)\n")
        lines.append(table(["figure", "vmigrate / QEMU"], ratios))
        dv, dq = m("vmigrate", "downtime_ms"), m("qemu", "downtime_ms")
        bv, bq = m("vmigrate", "transferred"), m("qemu", "transferred")
        rv = [m("vmigrate", k) for k in ("dirty_rate_before", "dirty_rate_during")]
        rq = [m("qemu", k) for k in ("dirty_rate_before", "dirty_rate_during")]
        if None in (dv, dq, bv, bq) or None in rv or None in rq:
            lines.append("\ntarget: not decided (needs completed runs of both engines)")
        else:
            rate_ok = all(v >= q * (1 - RATE_TOLERANCE) for v, q in zip(rv, rq))
            met = dv <= dq and bv <= bq and rate_ok
            lines.append(f"\ntarget (vmigrate downtime and sent bytes at most QEMU's, at an equal or higher "
                         f"dirty rate, equal = within {RATE_TOLERANCE:.0%}): {'MET' if met else 'NOT MET'} — "
                         f"downtime {dv:.0f} vs {dq:.0f} ms, sent {bv / MiB:.0f} vs {bq / MiB:.0f} MiB, dirty rate "
                         f"before {rv[0] / MiB:.0f} vs {rq[0] / MiB:.0f} MiB/s, during {rv[1] / MiB:.0f} vs "
                         f"{rq[1] / MiB:.0f} MiB/s")
        failed = [r for r in recs if not r["ok"]]
        if failed:
            lines.append("\nFAILED runs (not counted):")
            for r in failed:
                first = (r.get("error") or "").splitlines()[0] if r.get("error") else "?"
                lines.append(f"  {pair_label((r['src'], r['dst']))} rep {r['rep']}: {first}")
    return "\n".join(lines)


def report_postcopy(records, live, args):
    """Tables of the postcopy scenarios: per engine, then vmigrate / QEMU."""
    lines = []
    for sc in [s for s in SCENARIOS if is_postcopy(s)]:
        recs = [r for r in records if r["scenario"] == sc]
        if not recs:
            continue
        mib = lambda vals: [v / MiB for v in vals if v is not None]
        rows = []
        for name in ("qemu", "vmigrate"):
            rs = [r for r in recs if r["src"] == name]
            ok = [r for r in rs if r["ok"]]
            if not rs:
                continue
            g = lambda k: [r.get(k) for r in ok]
            accel = ",".join(sorted({r["accel"] for r in ok if r.get("accel")})) or "–"
            rows.append([pair_label((name, name)), accel, f"{len(ok)}/{len(rs)}",
                         fmt(mib(g("dirty_rate_before")), 0), fmt(g("total_s")), fmt(g("postcopy_phase_s")),
                         fmt(g("downtime_ms"), 1), fmt(g("postcopy_requests"), 0), fmt(g("postcopy_blocktime_ms"), 0),
                         fmt(g("fault_p50_us"), 0), fmt(g("fault_p99_us"), 0), fmt(g("fault_max_us"), 0),
                         fmt(mib(g("precopy_transferred")), 0), fmt(mib(g("transferred")), 0),
                         fmt(g("cpu_src_s")), fmt(g("cpu_dst_s")),
                         fmt([v / 1024 for v in g("hwm_src_kib") if v is not None], 0),
                         fmt([v / 1024 for v in g("hwm_dst_kib") if v is not None], 0),
                         fmt(g("foreign_cpu_s"), 1)])
        probe = ", ".join(f"{a} {r / MiB:.0f} MiB/s" if r else f"{a} –" for a, r in live.probe.items())
        lines.append(f"\n### {sc}: {SCENARIOS[sc].__doc__}\n")
        lines.append(f"hot set {human_size(live.hot)} of {human_size(live.memory)} guest RAM dirtied at "
                     f"{live.rate / MiB:.0f} MiB/s; max-bandwidth {args.postcopy_max_bandwidth / MiB:.0f} MiB/s, "
                     f"migrate-start-postcopy {args.postcopy_after:g} s after migrate, max-postcopy-bandwidth 0; "
                     f"postcopy-blocktime on the destination. QEMU guest: pc machine, accelerator "
                     f"{live.qemu_accel or '–'} ({probe or 'not probed'}); vmigrate: lab machine, soft accelerator.")
        if live.qemu_unavailable:
            lines.append(f"QEMU's guest cannot run here, only the vmigrate pair ran: {live.qemu_unavailable}")
        lines.append(f"link: {recs[0].get('link') or 'loopback'}")
        for n in live.notes:
            lines.append(f"note: {n}")
        lines.append("total = migrate → destination MIGRATION completed, 'postcopy s' the part after "
                     "migrate-start-postcopy; downtime = source STOP → destination "
                     "RESUME (event timestamps, one host clock); postcopy-requests from the source, "
                     "postcopy-blocktime from the destination; fault latency = vmigrate destination's "
                     "x-vmigrate-fault-latency-us (QEMU has none); sent = source ram.transferred, of which "
                     "'precopy' before migrate-start-postcopy; CPU and peak RSS (VmHWM) of source and "
                     "destination. Every counted run's guest went on running on the destination. "
                     "Median [min–max] of completed runs.\n")
        lines.append(table(["engine (src→dst)", "accel", "ok/runs", "dirty MiB/s", "total s", "postcopy s",
                            "downtime ms", "postcopy-requests", "blocktime ms", "fault p50 µs", "fault p99 µs",
                            "fault max µs", "precopy MiB", "sent MiB", "CPU src s", "CPU dst s",
                            "RSS src MiB", "RSS dst MiB", "foreign CPU s"], rows))

        def m(name, key):
            return median([r.get(key) for r in recs if r["ok"] and r["src"] == name])

        def ratio(a, b):
            return f"{a / b:.2f}" if a is not None and b else "–"

        ratios = [[label, ratio(m("vmigrate", key), m("qemu", key))]
                  for label, key in (("total time", "total_s"), ("postcopy phase", "postcopy_phase_s"),
                                     ("downtime", "downtime_ms"),
                                     ("postcopy-requests", "postcopy_requests"),
                                     ("postcopy-blocktime", "postcopy_blocktime_ms"),
                                     ("sent bytes", "transferred"), ("CPU source", "cpu_src_s"),
                                     ("CPU destination", "cpu_dst_s"), ("peak RSS destination", "hwm_dst_kib"),
                                     ("dirty rate before", "dirty_rate_before"))]
        lines.append("\nvmigrate / QEMU (medians; < 1 for times, counts, bytes, CPU and RSS: vmigrate better; "
                     "dirty rate ≥ 1: vmigrate's guest dirtied at least as fast)\n")
        lines.append(table(["figure", "vmigrate / QEMU"], ratios))
        failed = [r for r in recs if not r["ok"]]
        if failed:
            lines.append("\nFAILED runs (not counted):")
            for r in failed:
                first = (r.get("error") or "").splitlines()[0] if r.get("error") else "?"
                lines.append(f"  {pair_label((r['src'], r['dst']))} rep {r['rep']}: {first}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Main

def newest_source(root):
    """(mtime, path) of the newest Rust source or manifest in the repository."""
    best = None
    for top in ("src", "crates", "Cargo.toml", "Cargo.lock"):
        start = os.path.join(root, top)
        if os.path.isfile(start):
            walk = [(root, [], [top])]
        else:
            walk = os.walk(start)
        for d, dirs, files in walk:
            dirs[:] = [x for x in dirs if x != "target"]
            for f in files:
                if f.endswith((".rs", ".toml", ".lock")):
                    fp = os.path.join(d, f)
                    with contextlib.suppress(OSError):
                        m = os.path.getmtime(fp)
                        if best is None or m > best[0]:
                            best = (m, fp)
    return best


def resolve_vmigrate(args, log):
    """Path of the vmigrate binary, or (None, reason)."""
    if args.vmigrate:
        p = os.path.abspath(args.vmigrate)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p, None
        return None, f"--vmigrate {args.vmigrate}: not an executable file"
    p = os.path.join(REPO, "target", "release", "vmigrate")
    if os.path.isfile(p) and os.access(p, os.X_OK) and not args.rebuild:
        newer = newest_source(REPO)
        if newer and newer[0] > os.path.getmtime(p):
            log(f"warning: {p} is older than {os.path.relpath(newer[1], REPO)}; "
                "pass --rebuild to run cargo build --release first")
        return p, None
    if args.no_build:
        return None, f"{p} missing (and --no-build)"
    cargo = shutil.which("cargo")
    if not cargo:
        return None, f"{p} missing and cargo not found"
    log(f"{'rebuilding' if os.path.exists(p) else p + ' missing'}: running cargo build --release in {REPO} ...")
    blog = os.path.join(tempfile.gettempdir(), f"vmigrate-bench-build-{os.getpid()}.log")
    t0 = time.monotonic()
    with open(blog, "w") as f:
        rc = subprocess.run([cargo, "build", "--release"], cwd=REPO, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    if rc == 0 and os.path.isfile(p):
        os.unlink(blog)
        log(f"built {p} in {time.monotonic() - t0:.0f} s")
        return p, None
    reason = f"cargo build --release failed (status {rc}); log: {blog}"
    if rc == 0:
        reason = f"cargo build --release succeeded but produced no {p}"
    log(reason + "\n" + tail(blog, 10))
    return None, reason


def parse_pairs(s):
    out = []
    for item in s.split(","):
        item = item.strip().lower()
        if item in PAIR_NAMES:
            p = PAIR_NAMES[item]
        else:
            parts = re.split(r"->|→|-|>|:", item)
            if len(parts) != 2 or any(x not in ("qemu", "vmigrate") for x in parts):
                raise argparse.ArgumentTypeError(f"bad pair {item!r} (use qq,vv,qv,vq,bb or qemu-vmigrate ...)")
            p = tuple(parts)
        if p not in out:
            out.append(p)
    return out


def host_info(qemu_bin, vmigrate_bin):
    info = {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version()}
    with contextlib.suppress(Exception):
        info["qemu_version"] = subprocess.run([qemu_bin, "--version"], capture_output=True, text=True,
                                              timeout=10).stdout.splitlines()[0]
    with contextlib.suppress(Exception):
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    with contextlib.suppress(Exception):
        rev = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        info["vmigrate_git"] = rev
    info["vmigrate_binary"] = vmigrate_bin
    return info


def postcopy_run_line(sc, rep, p, rec):
    def s(key, prec=0, scale=1):
        v = rec.get(key)
        return f"{v / scale:.{prec}f}" if v is not None else "–"
    return (f"[{sc} rep {rep}] {pair_label(p):18s} {rec['accel']:4s} total {s('total_s', 2)} s  downtime "
            f"{s('downtime_ms', 1)} ms  postcopy-requests {s('postcopy_requests')}  blocktime "
            f"{s('postcopy_blocktime_ms')} ms  faults p50/p99/max {s('fault_p50_us')}/{s('fault_p99_us')}/"
            f"{s('fault_max_us')} µs  sent {s('transferred', 0, MiB)} MiB  CPU {s('cpu_src_s', 2)}/"
            f"{s('cpu_dst_s', 2)} s  guest runs on dst ({s('dst_rate_after', 0, MiB)} MiB/s)")


def file_run_line(sc, rep, p, rec):
    def s(key):
        v = rec.get(key)
        return f"{v:.2f}" if v is not None else "–"
    cold = (f"  cold {s('restore_cold_s')} s (CPU {s('cpu_restore_cold_s')} s)"
            if rec.get("restore_cold_s") is not None else "")
    dd = s("dd_warm_s") + (f"/{s('dd_cold_s')}" if rec.get("dd_cold_s") is not None else "")
    foreign = "/".join(f"{rec[k]:.1f}" for k in ("save_foreign_cpu_s", "restore_warm_foreign_cpu_s",
                                                 "restore_cold_foreign_cpu_s") if rec.get(k) is not None)
    return (f"[{sc} rep {rep}] {pair_label(p):18s} save {s('save_s')} s ({rec['save_gib_per_s']:.2f} GiB/s, "
            f"CPU {s('cpu_save_s')} s)  restore warm {s('restore_warm_s')} s (CPU {s('cpu_restore_warm_s')} s){cold}"
            f"  dd {dd} s  file {rec['file_size'] / GiB:.2f}/{rec['file_alloc'] / GiB:.2f} GiB  "
            f"foreign {foreign} s  verified")


async def run_all(ctx, engines, pairs, scenarios, reps, records, log):
    if ctx.live is not None:
        await live_setup(ctx, engines["qemu"], pairs, log)
    for rep in range(reps):
        order = pairs[rep % len(pairs):] + pairs[:rep % len(pairs)]  # rotate: no fixed position
        for sc in scenarios:
            for p in order:
                if is_live(sc) and p[0] != p[1]:
                    continue  # a live guest migrates only between two VMs of one engine
                src, dst = engines[p[0]], engines[p[1]]
                rec = {"scenario": sc, "src": p[0], "dst": p[1], "rep": rep,
                       "size": ctx.live.memory if is_live(sc) else ctx.size, "start": time.time()}
                why = src.unavailable or dst.unavailable
                if why:
                    rec.update(ok=False, error=f"engine unavailable: {why}")
                else:
                    try:
                        rec.update(await SCENARIOS[sc](ctx, (src, dst), rep))
                        rec["ok"] = True
                    except RunFailed as e:
                        rec["ok"] = False
                        rec["error"] = str(e.args[0])
                        if len(e.args) > 1 and isinstance(e.args[1], dict):
                            rec.update({k: v for k, v in e.args[1].items() if k not in rec})
                    except Exception as e:  # a harness bug: record, go on, exit non-zero
                        rec["ok"] = False
                        rec["error"] = f"harness error: {type(e).__name__}: {e}"
                        ctx.harness_errors += 1
                        traceback.print_exc()
                records.append(rec)
                if rec["ok"] and is_dirtylimit(sc):
                    achieved = rec.get("achieved_rate")
                    log(f"[{sc} rep {rep}] {pair_label(p):18s} dirty {rec['dirty_rate_before'] / MiB:5.0f} MiB/s"
                        + (f", limited {achieved / MiB:.1f} MiB/s (limit {DL_LIMIT}), settle "
                           f"{rec['settle_s']} s" if achieved is not None else "")
                        + f"; migration {rec['total_time_ms']} ms, guest "
                        f"{(rec['dirty_rate_during'] or 0) / MiB:.1f} MiB/s during")
                elif rec["ok"] and is_snapshot(sc):
                    log(f"[{sc} rep {rep}] {pair_label(p):18s} {rec['accel']:4s} guest "
                        f"{rec['dirty_rate_before'] / MiB:5.0f} MiB/s idle, "
                        f"{(rec['dirty_rate_during'] or 0) / MiB:5.0f} during  total {rec['total_time_ms']} ms  "
                        f"downtime {rec['downtime_ms']} ms  sent {rec['transferred'] / MiB:.0f} MiB")
                elif rec["ok"] and is_postcopy(sc):
                    log(postcopy_run_line(sc, rep, p, rec))
                elif rec["ok"] and is_live(sc):
                    log(f"[{sc} rep {rep}] {pair_label(p):18s} {rec['accel']:4s} dirty "
                        f"{rec['dirty_rate_before'] / MiB:5.0f} MiB/s before, "
                        f"{(rec['dirty_rate_during'] or 0) / MiB:5.0f} during  total {rec['total_time_ms']} ms  "
                        f"downtime {rec['downtime_ms']} ms  sent {rec['transferred'] / MiB:.0f} MiB  "
                        f"passes {rec['dirty_sync_count']}")
                elif rec["ok"] and is_file(sc):
                    log(file_run_line(sc, rep, p, rec))
                elif rec["ok"]:
                    gb = f"{rec['gbit_per_s']:.1f}" if rec.get("gbit_per_s") else "–"
                    pw = f"{rec['prewarm_us_per_page']:.2f} µs/page" if rec.get("prewarm_us_per_page") else "off"
                    log(f"[{sc} rep {rep}] {pair_label(p):18s} {rec['wall_s']:7.2f} s "
                        f"{rec['gib_per_s']:5.2f} GiB/s {gb:>5} Gbit/s  CPU src {rec['cpu_src_s']:.2f} s "
                        f"dst {rec['cpu_dst_s']:.2f} s  RSS {rec['hwm_src_kib'] // 1024}/{rec['hwm_dst_kib'] // 1024} MiB"
                        f"  foreign {rec['foreign_cpu_s']:.1f} s  prewarm {pw}  verified")
                else:
                    log(f"[{sc} rep {rep}] {pair_label(p):18s} FAILED: {rec['error']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Pairs: qq=qemu-qemu vv=vmigrate-vmigrate qv=qemu-vmigrate vq=vmigrate-qemu")
    ap.add_argument("--size", type=parse_size, default=parse_size("4G"), help="guest RAM size (default 4G)")
    ap.add_argument("-n", "--reps", type=int, default=3, help="repetitions of every pair (default 3)")
    ap.add_argument("--pairs", type=parse_pairs, default=parse_pairs("qq,vv,qv,vq"),
                    help="comma list of src-dst pairs (default qq,vv,qv,vq)")
    ap.add_argument("--scenario", default="tcp-precopy",
                    help="comma list of scenarios (default tcp-precopy; see --list-scenarios)")
    ap.add_argument("--list-scenarios", action="store_true")
    ap.add_argument("--vmigrate", help="vmigrate binary (default: target/release/vmigrate, built if missing)")
    ap.add_argument("--vmigrate-before", help="an older vmigrate binary, run as pair bb (engine vmigrate-before) "
                                              "in the same benchmark for before/after figures")
    ap.add_argument("--no-build", action="store_true", help="never run cargo build")
    ap.add_argument("--rebuild", action="store_true",
                    help="run cargo build --release even if target/release/vmigrate exists")
    ap.add_argument("--qemu", default=os.environ.get("QEMU", "/usr/bin/qemu-system-x86_64"))
    ap.add_argument("--json", metavar="OUT", help="write raw per-run records (JSON) to OUT")
    ap.add_argument("--prewarm", type=float, help="GiB of memory to touch+free before each run (default size+1)")
    ap.add_argument("--gate", type=float, default=2.0,
                    help="wait up to this many seconds for a quiet machine before each run (0: off; default 2)")
    ap.add_argument("--timeout", type=float, help="per-migration timeout in s (default max(120, 60 per GiB))")
    ap.add_argument("--port", type=int, default=0, help="TCP port for the migration (default: a free one)")
    ap.add_argument("--seed", type=int, default=42, help="RAM image seed (default 42)")
    ap.add_argument("--shm", default="/dev/shm", help="directory for RAM files (default /dev/shm)")
    ap.add_argument("--keep-image", action="store_true",
                    help="keep the source RAM image (reused by the next run with the same size and seed)")
    ap.add_argument("--keep-logs", action="store_true", help="keep the engines' logs and QMP dir")
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                    help="measure the destination floor (scripts/floor.c) before and after the stopped "
                         "scenarios and report each receive path as a fraction of it (default on)")
    fl = ap.add_argument_group("file scenarios")
    fl.add_argument("--file-dir", help="directory of the migration file, on a disk file system (default: /var/tmp "
                                       "when it is on the repository's file system, else target/)")
    fl.add_argument("--file-cold", action=argparse.BooleanOptionalAction, default=None,
                    help="also restore and dd with a cold page cache (sync + drop_caches before each; needs "
                         "root; default on when /proc/sys/vm/drop_caches is writable)")
    live = ap.add_argument_group("live scenario")
    live.add_argument("--live-hot", type=parse_size, default=parse_size("256M"),
                      help="hot set the guest dirties (default 256M)")
    live.add_argument("--live-memory", type=parse_size,
                      help="guest RAM (default hot set + 256M; at most 3G)")
    live.add_argument("--live-rate", type=parse_rate, default=parse_rate("512M"),
                      help="guest dirty rate in bytes/s, e.g. 1G (default 512M = 512 MiB/s); lowered to what "
                           "QEMU's guest reaches if it reaches less")
    live.add_argument("--live-accel", choices=("auto", "tcg", "kvm"), default="auto",
                      help="QEMU accelerator for the guest (default auto: probe both, take the one "
                           "whose guest dirties fastest)")
    live.add_argument("--downtime-limit", type=int, default=300, help="downtime-limit in ms (default 300)")
    live.add_argument("--live-calc-ms", type=int,
                      help="calc-time of calc-dirty-rate in ms (default half a sweep of the hot set, 50-1000)")
    live.add_argument("--capped-bandwidth", type=parse_rate, default=parse_rate("32M"),
                      help="max-bandwidth of live-capped and live-capped-xbzrle in bytes/s (default 32M)")
    pcg = ap.add_argument_group("postcopy scenarios (live-postcopy, live-postcopy-preempt; guest as for live)")
    pcg.add_argument("--postcopy-max-bandwidth", type=parse_rate, default=parse_rate("64M"),
                     help="max-bandwidth of the precopy phase in bytes/s (default 64M = 64 MiB/s, well below "
                          "the guest's dirty rate); max-postcopy-bandwidth is 0")
    pcg.add_argument("--postcopy-after", type=float, default=2.0,
                     help="seconds of precopy from migrate to migrate-start-postcopy (default 2)")
    pcg.add_argument("--link", type=parse_link, default=parse_link("tbf:1gbit"),
                     help="the link of the *-tbf scenarios: tbf:RATE[,burst=SIZE][,latency=TIME] in tc's units "
                          "(default tbf:1gbit,burst=256kb,latency=20ms); needs root")
    args = ap.parse_args()

    if args.list_scenarios:
        for k, f in SCENARIOS.items():
            print(f"{k:20s} {f.__doc__}")
        for k, v in SCENARIO_GROUPS.items():
            print(f"{k:20s} group: {', '.join(v)}")
        return 0
    scenarios = []
    for s in (s.strip() for s in args.scenario.split(",")):
        if not s:
            continue
        if s not in SCENARIOS and s not in SCENARIO_GROUPS:
            ap.error(f"unknown scenario {s!r}; known: {', '.join(SCENARIOS)}; groups: {', '.join(SCENARIO_GROUPS)}")
        scenarios += [x for x in SCENARIO_GROUPS.get(s, [s]) if x not in scenarios]
    if args.file_cold is None:
        args.file_cold = can_drop_caches()
    elif args.file_cold and not can_drop_caches():
        ap.error(f"--file-cold needs root and a writable {DROP_CACHES}")
    args.file_dir = os.path.abspath(args.file_dir or default_file_dir())
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    live_memory = args.live_memory or args.live_hot + 256 * MiB
    if live_memory < args.live_hot + 16 * MiB or live_memory > 3 * GiB:
        ap.error("--live-memory must be at least the hot set + 16M and at most 3G")
    if args.downtime_limit < 1:
        ap.error("--downtime-limit must be >= 1")
    args.prewarm_given = args.prewarm is not None
    if args.prewarm is None:
        args.prewarm = args.size / GiB + 1
    with contextlib.suppress(Exception):
        sys.stdout.reconfigure(errors="replace", line_buffering=True)
        sys.stderr.reconfigure(errors="replace")

    def log(msg):
        print(msg, flush=True)

    signal.signal(signal.SIGTERM, _on_sigterm)
    records = []
    tmpdir = None
    image = os.path.join(args.shm, f"vmigrate-bench-src-{size_arg(args.size)}-{args.seed}.ram")
    try:
        if not (os.path.isfile(args.qemu) and os.access(args.qemu, os.X_OK)):
            raise BenchError(f"QEMU binary {args.qemu} not found")
        engines = {"qemu": QemuEngine("qemu", args.qemu)}
        vm_bin, why = None, None
        if any("vmigrate" in p for p in args.pairs):
            vm_bin, why = resolve_vmigrate(args, log)
        engines["vmigrate"] = VmigrateEngine("vmigrate", vm_bin)
        engines["vmigrate"].unavailable = why
        if why:
            log(f"note: vmigrate pairs will be reported FAILED: {why}")
        before = args.vmigrate_before
        engines["vmigrate-before"] = VmigrateEngine("vmigrate-before", before)
        engines["vmigrate-before"].unavailable = (
            None if before and os.access(before, os.X_OK) else f"--vmigrate-before {before!r}: not an executable")

        # space: image + one destination file (+ prewarm, which is anonymous memory)
        stopped = [s for s in scenarios if not is_live(s)]
        file_scenarios = [s for s in stopped if is_file(s)]
        tcp_scenarios = [s for s in stopped if not is_file(s)]
        file_fs = None
        if file_scenarios:
            if args.file_dir == os.path.join(REPO, "target"):
                os.makedirs(args.file_dir, exist_ok=True)
            if not os.path.isdir(args.file_dir) or not os.access(args.file_dir, os.W_OK):
                raise BenchError(f"--file-dir {args.file_dir}: not a writable directory")
            fst = os.statvfs(args.file_dir)
            if fst.f_bavail * fst.f_frsize < args.size + 256 * MiB:
                raise BenchError(f"{args.file_dir} has {fst.f_bavail * fst.f_frsize / GiB:.1f} GiB free, "
                                 f"needs {(args.size + 256 * MiB) / GiB:.1f} GiB")
            file_fs = fs_type(args.file_dir)
            if file_fs == "tmpfs":
                log(f"warning: --file-dir {args.file_dir} is on tmpfs, not a disk: cold restores mean nothing there")
        st = os.statvfs(args.shm)
        have_image = os.path.exists(image) and os.path.getsize(image) == args.size
        need = args.size * (1 if have_image else 2) if stopped else 0
        if stopped and st.f_bavail * st.f_frsize < need + 64 * MiB:
            raise BenchError(f"{args.shm} has {st.f_bavail * st.f_frsize / GiB:.1f} GiB free, "
                             f"needs {need / GiB:.1f} GiB")
        with open("/proc/meminfo") as f:
            avail = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable"))
        if avail < need + args.prewarm * GiB:
            log(f"warning: MemAvailable {avail / GiB:.1f} GiB is below image+destination+prewarm "
                f"({(need + args.prewarm * GiB) / GiB:.1f} GiB)")

        tmpdir = tempfile.mkdtemp(prefix="vmigrate-bench-")
        meta = None
        if stopped:
            if not args.keep_image:
                _temp_files.update((image, image + ".json"))
            meta = make_image(image, args.size, args.seed, log)
        ctx = Ctx(args, image, meta, tmpdir)
        if any(uses_link(s) for s in scenarios):
            ctx.link = Link(args.link)
            ctx.link.setup(log)
        if len(stopped) < len(scenarios):
            ctx.live = LiveConfig(args, tmpdir)
            if not any(p[0] == p[1] for p in args.pairs):
                log("note: the live scenario runs only qq and vv pairs, and none was asked for")
        info = host_info(args.qemu, vm_bin)
        if stopped:
            log(f"{human_size(args.size)} stopped 'none' VM, pairs {', '.join(pair_label(p) for p in args.pairs)}, "
                f"{args.reps} rep(s), scenarios {', '.join(scenarios)}; prewarm {args.prewarm:g} GiB, gate {args.gate:g} s")
        else:
            log(f"{args.reps} rep(s), scenarios {', '.join(scenarios)}; gate {args.gate:g} s")
        if file_scenarios:
            log(f"file scenarios: migration file {os.path.join(args.file_dir, f'bench-{os.getpid()}.mig')} "
                f"({file_fs or 'unknown file system'}), cold restore and dd "
                f"{'on' if args.file_cold else 'off'}")
        floor = []
        if stopped and args.floor:
            floor += measure_floor(args, tmpdir, log)
        try:
            asyncio.run(run_all(ctx, engines, args.pairs, scenarios, args.reps, records, log))
            if floor:
                floor += measure_floor(args, tmpdir, log)
        finally:
            if args.json and records:
                out = {"config": {"size": args.size, "reps": args.reps, "scenarios": scenarios,
                                  "pairs": [list(p) for p in args.pairs], "prewarm_gib": args.prewarm,
                                  "gate_s": args.gate, "seed": args.seed,
                                  "image": {k: v for k, v in (meta or {}).items() if k != "chunk_sha1"},
                                  "live": ctx.live.describe() if ctx.live else None,
                                  "file": {"dir": args.file_dir, "fs_type": file_fs, "cold": args.file_cold,
                                           "speedup_target": FILE_SPEEDUP_TARGET,
                                           "dd_target": FILE_DD_TARGET} if file_scenarios else None},
                       "host": info, "floor": floor, "runs": records}
                with open(args.json, "w") as f:
                    json.dump(out, f, indent=1)
                log(f"raw records: {args.json}")
        if tcp_scenarios:
            print(report(records, args.size, tcp_scenarios, args.pairs))
        if file_scenarios:
            print(report_file(records, args.size, file_scenarios, args.pairs, args.file_cold))
        if stopped and args.floor:
            print(report_floor(records, floor, meta, args.size, stopped, args.pairs))
        if ctx.live is not None:
            print(report_live(records, ctx.live))
            print(report_dirtylimit(records))
            print(report_snapshot(records))
            print(report_postcopy(records, ctx.live, args))
        if ctx.harness_errors:
            sys.stderr.write(f"bench.py: {ctx.harness_errors} run(s) hit a harness error (see above)\n")
            return 1
        return 0
    except BenchError as e:
        sys.stderr.write(f"bench.py: error: {e}\n")
        return 1
    except KeyboardInterrupt as e:
        sys.stderr.write(f"bench.py: interrupted ({str(e) or 'SIGINT'}); cleaning up\n")
        return 1
    finally:
        kill_children()
        remove_links()
        remove_temp_files()
        if tmpdir:
            if args.keep_logs:
                log(f"engine logs kept in {tmpdir}")
            else:
                shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
