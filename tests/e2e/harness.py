"""End-to-end harness: start QEMU 10.0.2 or vmigrate from one description, drive them
over QMP, generate guest-RAM images and compare guest RAM.

Environment:
  VMIGRATE_BIN   vmigrate binary to test (default: <repo>/target/release/vmigrate,
                 built with `cargo build --release` when missing or older than the
                 sources)
  QEMU_BIN       QEMU binary (default: $QEMU_ORACLE_QEMU or /usr/bin/qemu-system-x86_64)
  E2E_KEEP=1     keep each test's temporary directories (sockets, logs, streams, RAM)
"""
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import random
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ORACLE_DIR = REPO / "tests" / "qemu-oracle"
SYNTHETIC_DIR = ORACLE_DIR / "captures" / "synthetic"
QEMU_BIN = os.environ.get("QEMU_BIN") or os.environ.get("QEMU_ORACLE_QEMU") \
    or "/usr/bin/qemu-system-x86_64"
PAGE = 4096
MiB = 1 << 20
KEEP = os.environ.get("E2E_KEEP") == "1"

IMPLS = ("qemu", "vmigrate")


class HarnessError(Exception):
    pass


# --------------------------------------------------------------------------------------
# What is available on this machine


def qemu_missing_reason():
    """None when QEMU can be run, else why not."""
    if not (os.path.isfile(QEMU_BIN) and os.access(QEMU_BIN, os.X_OK)):
        return f"QEMU not found at {QEMU_BIN} (set QEMU_BIN)"
    return None


def shm_missing_reason():
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        return "no writable /dev/shm (guest-RAM files must live on tmpfs)"
    return None


def qmp_lib_missing_reason():
    try:
        import qemu.qmp.legacy  # noqa: F401
    except ImportError:
        return "Python package qemu.qmp is not installed (pip install qemu.qmp)"
    return None


_build_lock = threading.Lock()
_built = None
_build_error = None


def _newest_source_mtime():
    newest = 0.0
    for top in ("src", "crates"):
        for dirpath, _dirs, files in os.walk(REPO / top):
            for f in files:
                if f.endswith(".rs") or f == "Cargo.toml":
                    newest = max(newest, os.stat(os.path.join(dirpath, f)).st_mtime)
    for f in ("Cargo.toml", "Cargo.lock"):
        p = REPO / f
        if p.exists():
            newest = max(newest, p.stat().st_mtime)
    return newest


def vmigrate_bin():
    """Path of the vmigrate binary; builds it once per session when needed.
    Raises HarnessError (the test errors, it is not skipped) when it cannot be had."""
    global _built, _build_error
    with _build_lock:
        if _built:
            return _built
        if _build_error:
            raise HarnessError(_build_error)
        env_bin = os.environ.get("VMIGRATE_BIN")
        if env_bin:
            if not os.access(env_bin, os.X_OK):
                raise HarnessError(f"VMIGRATE_BIN={env_bin} is not an executable")
            _built = env_bin
            return _built
        path = REPO / "target" / "release" / "vmigrate"
        if not path.exists() or path.stat().st_mtime < _newest_source_mtime():
            cargo = shutil.which("cargo") or os.path.expanduser("~/.cargo/bin/cargo")
            r = subprocess.run([cargo, "build", "--release", "--bin", "vmigrate"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
            if r.returncode != 0 or not path.exists():
                _build_error = ("cargo build --release failed (not retried in this "
                                "session):\n" + r.stdout[-4000:])
                raise HarnessError(_build_error)
        _built = str(path)
        return _built


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------
# Guest-RAM images

_WORDS = ("the of and to in is that for it as was with be by on not he this are or his "
          "from at which but have an they you were her she there been one all we their "
          "migration stream page block section device memory guest host dirty bitmap "
          "socket channel vmstate footer header version machine ram timer globalstate "
          "kernel process thread buffer offset length record zero random text compare "
          "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor").split()


def make_image(size, seed):
    """Deterministic guest-RAM image of SIZE bytes: a mix of zero pages (~35%), random
    pages (~30%), text-like pages (~30%), nearly-zero pages (one non-zero byte at a random
    place, ~3%) and pages filled with one repeated non-zero byte (~2%).  The first and
    the last page are random.  Returns (image bytes, number of all-zero pages)."""
    assert size % PAGE == 0
    npages = size // PAGE
    rng = random.Random(seed)
    # text corpus: random words and line breaks, 2 MiB
    parts = []
    n = 0
    while n < 2 * MiB + PAGE:
        w = rng.choice(_WORDS)
        sep = "\n" if rng.random() < 0.08 else " "
        parts.append(w + sep)
        n += len(w) + 1
    text = "".join(parts).encode()
    kinds = []
    for i in range(npages):
        r = rng.random()
        if i in (0, npages - 1):
            kinds.append("R")
        elif r < 0.35:
            kinds.append("Z")
        elif r < 0.65:
            kinds.append("R")
        elif r < 0.95:
            kinds.append("T")
        elif r < 0.98:
            kinds.append("N")
        else:
            kinds.append("F")
    nrandom = kinds.count("R")
    rnd = rng.randbytes(nrandom * PAGE)
    zero = bytes(PAGE)
    out = []
    ri = 0
    nzero = 0
    for k in kinds:
        if k == "Z":
            out.append(zero)
            nzero += 1
        elif k == "R":
            out.append(rnd[ri:ri + PAGE])
            ri += PAGE
        elif k == "T":
            o = rng.randrange(0, 2 * MiB)
            out.append(text[o:o + PAGE])
        elif k == "N":
            p = rng.randrange(PAGE)
            out.append(bytes(p) + bytes([rng.randrange(1, 256)]) + bytes(PAGE - p - 1))
        else:
            out.append(bytes([rng.randrange(1, 256)]) * PAGE)
    img = b"".join(out)
    assert len(img) == size
    return img, nzero


class Image:
    """A guest-RAM image kept in memory and in a file (for fast copies)."""

    def __init__(self, path, size, seed):
        self.path = str(path)
        self.size = size
        self.data, self.zero_pages = make_image(size, seed)
        with open(self.path, "wb") as f:
            f.write(self.data)

    @property
    def pages(self):
        return self.size // PAGE

    @property
    def nonzero_pages(self):
        return self.pages - self.zero_pages


def first_difference(a, b, page=PAGE):
    """Human-readable description of where two byte strings differ (None if equal)."""
    if len(a) != len(b):
        return f"length {len(a)} != {len(b)}"
    if a == b:
        return None
    chunk = 1 * MiB
    for c in range(0, len(a), chunk):
        if a[c:c + chunk] != b[c:c + chunk]:
            for p in range(c, min(c + chunk, len(a)), page):
                if a[p:p + page] != b[p:p + page]:
                    bad = sum(1 for q in range(0, len(a), page) if a[q:q + page] != b[q:q + page])
                    got_zero = a[p:p + page] == bytes(page)
                    return (f"{bad} page(s) differ; first at guest address {p:#x} "
                            f"(page {p // page}){' which is all zero' if got_zero else ''}")
    return "differs"


def files_equal(a, b):
    """Whether two files have the same bytes (cmp(1) is much faster than reading them
    into Python here)."""
    r = subprocess.run(["cmp", "-s", str(a), str(b)])
    if r.returncode > 1:
        raise HarnessError(f"cmp {a} {b} failed with status {r.returncode}")
    return r.returncode == 0


def compare_ram_file(path, image, size=None):
    """None when the file at PATH holds IMAGE (a harness.Image), else what differs."""
    if files_equal(path, image.path):
        return None
    got = read_file(path)
    return first_difference(got, image.data) or "files differ"


def read_file(path, offset=0, size=None):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read() if size is None else f.read(size)


# --------------------------------------------------------------------------------------
# Per-test workspace and machines


class Workspace:
    """Temporary directories for one test and every process it starts; cleanup() kills
    whatever is still running and removes the directories."""

    def __init__(self, tag="t"):
        tag = re.sub(r"[^A-Za-z0-9_.-]", "_", tag)[:40]
        self.tmp = tempfile.mkdtemp(prefix=f"vme2e-{tag}-", dir="/tmp")
        self.shm = tempfile.mkdtemp(prefix=f"vme2e-{tag}-", dir="/dev/shm")
        self.machines = []
        self.children = []

    def path(self, name):
        return os.path.join(self.tmp, name)

    def shm_path(self, name):
        return os.path.join(self.shm, name)

    def vm(self, impl, name, **kw):
        m = Machine(self, impl, name, **kw)
        self.machines.append(m)
        return m

    def diagnostics(self):
        return "\n".join(m.describe() for m in self.machines)

    def cleanup(self):
        for m in self.machines:
            m.destroy()
        if not KEEP:
            shutil.rmtree(self.tmp, ignore_errors=True)
            shutil.rmtree(self.shm, ignore_errors=True)
        else:
            print(f"[e2e] kept {self.tmp} and {self.shm}", file=sys.stderr)


class MachineExited(HarnessError):
    pass


class Machine:
    """One QEMU or vmigrate process with the `none` machine and a QMP socket.

    impl        "qemu" or "vmigrate"
    mem_mib     guest RAM size
    ram_id      RAM block name ("m0" by default; "ram" is the name of plain -m RAM)
    shared      RAM in a shared file the harness can read and write (QEMU
                memory-backend-file id=RAM_ID,share=on / vmigrate --mem-path F --share);
                otherwise plain anonymous RAM, which needs ram_id "ram"
    incoming    None, "defer" or a URI
    start_paused  QEMU -S / vmigrate --paused
    machine     vmigrate's --machine ("none", or "lab" with EXTRA such as --accel,
                --cpus, --workload, --serial)
    globals     "DRIVER.PROPERTY=VALUE" settings, passed as QEMU's -global and
                vmigrate's --global
    objects     "TYPE,id=ID,..." objects, passed as QEMU's -object and vmigrate's --object
    """

    def __init__(self, ws, impl, name, mem_mib=256, ram_id="m0", incoming=None,
                 start_paused=False, shared=True, mem_file=None, machine="none",
                 extra=(), globals=(), objects=()):
        assert impl in IMPLS, impl
        self.ws = ws
        self.impl = impl
        self.name = name
        self.mem_mib = mem_mib
        self.ram_id = ram_id
        self.incoming = incoming
        self.start_paused = start_paused
        self.machine = machine
        self.extra = list(extra)
        self.globals = list(globals)
        self.objects = list(objects)
        assert impl == "vmigrate" or (machine == "none" and not extra), "lab is vmigrate's"
        self.qmp_path = ws.path(f"{name}.qmp")
        self.mem_file = None
        if shared:
            self.mem_file = mem_file or ws.shm_path(f"{name}.ram")
        elif ram_id != "ram":
            raise ValueError("RAM that is not in a shared file is always called 'ram'")
        self.stdout_path = ws.path(f"{name}.stdout")
        self.stderr_path = ws.path(f"{name}.stderr")
        self.proc = None
        self.qmp = None
        self.events = []
        self.greeting = None

    # ---- command line
    def argv(self):
        size = f"{self.mem_mib}M"
        if self.impl == "qemu":
            a = [QEMU_BIN, "-display", "none", "-nodefaults", "-m", size,
                 "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
            if self.mem_file:
                a += ["-object", f"memory-backend-file,id={self.ram_id},size={size},"
                                 f"mem-path={self.mem_file},share=on",
                      "-machine", f"none,memory-backend={self.ram_id}"]
            else:
                a += ["-machine", "none"]
            if self.incoming:
                a += ["-incoming", self.incoming]
            if self.start_paused:
                a += ["-S"]
            for g in self.globals:
                a += ["-global", g]
            for o in self.objects:
                a += ["-object", o]
        else:
            a = [vmigrate_bin(), "vm", "--machine", self.machine, "--memory", size,
                 "--qmp", f"unix:{self.qmp_path}"] + self.extra
            if self.mem_file:
                a += ["--mem-path", self.mem_file, "--share"]
            if self.ram_id != "ram":
                a += ["--ram-id", self.ram_id]
            if self.incoming:
                a += ["--incoming", self.incoming]
            if self.start_paused:
                a += ["--paused"]
            for g in self.globals:
                a += ["--global", g]
            for o in self.objects:
                a += ["--object", o]
        return a

    def describe(self):
        rc = None if self.proc is None else self.proc.poll()
        return (f"--- {self.impl} {self.name} (rc={rc}) argv: {' '.join(self.argv_used)}\n"
                f"    stderr: {self.stderr_tail(1500)!r}")

    argv_used = ()

    # ---- lifecycle
    def start(self, connect=True, prefill=None):
        """Start the process.  With a shared RAM file, the file is created first with
        the right size (PREFILL: bytes to put in it, else sparse zeros)."""
        if self.mem_file:
            with open(self.mem_file, "wb") as f:
                if prefill is not None:
                    f.write(prefill)
                f.truncate(self.mem_mib * MiB)
        self.argv_used = self.argv()
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(self.argv_used, stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=self._err,
                                     start_new_session=True)
        if connect:
            self.connect()
        return self

    def connect(self, timeout=20):
        from qemu.qmp.legacy import QEMUMonitorProtocol
        t0 = time.time()
        last = None
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise MachineExited(f"{self.impl} {self.name} exited with status "
                                    f"{self.proc.returncode} before QMP was up; stderr: "
                                    f"{self.stderr_tail()!r}")
            if os.path.exists(self.qmp_path):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    q = QEMUMonitorProtocol(self.qmp_path)
                # the client's connect has no timeout of its own: a server that accepts
                # but never greets is killed after `timeout`, which ends the wait
                hung = []

                def watchdog():
                    hung.append(True)
                    if self.alive():
                        os.kill(self.proc.pid, signal.SIGKILL)

                timer = threading.Timer(timeout, watchdog)
                timer.start()
                try:
                    self.greeting = q.connect(negotiate=True)
                    q.settimeout(30)
                    self.qmp = q
                    return self
                except Exception as e:  # not listening yet
                    last = e
                    try:
                        q.close()
                    except Exception:
                        pass
                    if hung:
                        raise HarnessError(f"{self.impl} {self.name}: QMP greeting or "
                                           f"qmp_capabilities did not complete in {timeout}s "
                                           f"(process killed): {e!r}")
                finally:
                    timer.cancel()
            time.sleep(0.02)
        raise HarnessError(f"{self.impl} {self.name}: no QMP on {self.qmp_path} after "
                           f"{timeout}s ({last!r}); stderr: {self.stderr_tail()!r}")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout=20):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise HarnessError(f"{self.impl} {self.name} still running after {timeout}s")

    def kill9(self):
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._close_qmp()

    def _close_qmp(self):
        if self.qmp is not None:
            try:
                self.qmp.close()
            except Exception:
                pass
            self.qmp = None

    def quit(self, timeout=10):
        """QMP quit and wait for the process to end (kill -9 if it does not)."""
        if self.alive() and self.qmp is not None:
            try:
                self.qmp.cmd_raw("quit")
            except Exception:
                pass
        self._close_qmp()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill9()

    def destroy(self):
        """Cleanup: never leaves the process behind."""
        if self.proc is None:
            return
        if self.alive():
            if self.qmp is not None:
                try:
                    self.qmp.settimeout(2)
                    self.qmp.cmd_raw("quit")
                except Exception:
                    pass
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait()
        self._close_qmp()
        for f in (getattr(self, "_out", None), getattr(self, "_err", None)):
            if f:
                f.close()

    def stderr_text(self):
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stderr_tail(self, n=800):
        return self.stderr_text()[-n:]

    # ---- QMP
    def _check_alive(self, what):
        if not self.alive():
            raise MachineExited(f"{self.impl} {self.name} exited (status "
                                f"{self.proc.returncode}) during {what}; stderr: "
                                f"{self.stderr_tail()!r}")

    def _drain(self):
        if self.qmp is not None:
            try:
                self.events += self.qmp.get_events(wait=False)
            except Exception:
                pass

    def raw(self, command, **args):
        """Full QMP response ({"return": ...} or {"error": ...})."""
        self._check_alive(command)
        try:
            r = self.qmp.cmd_raw(command, args or None)
        except Exception as e:
            # The socket closes a moment before an exiting process is gone.
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            self._check_alive(command)
            raise HarnessError(f"{self.impl} {self.name}: QMP {command} failed: {e!r}")
        self._drain()
        return r

    def cmd(self, command, **args):
        """Return value of a QMP command; raises HarnessError on a QMP error."""
        r = self.raw(command, **args)
        if "error" in r:
            raise HarnessError(f"{self.impl} {self.name}: {command} {args} -> {r['error']}")
        if "return" not in r:
            raise HarnessError(f"{self.impl} {self.name}: {command}: bad reply {r}")
        return r["return"]

    def runstate(self):
        return self.cmd("query-status")["status"]

    def query_migrate(self):
        return self.cmd("query-migrate")

    def set_caps(self, **caps):
        self.cmd("migrate-set-capabilities",
                 capabilities=[{"capability": k.replace("_", "-"), "state": v}
                               for k, v in caps.items()])

    def set_params(self, **params):
        self.cmd("migrate-set-parameters", **{k.replace("_", "-"): v for k, v in params.items()})

    def wait_migration(self, want=("completed", "failed", "cancelled"), timeout=120):
        """Poll query-migrate until its status is in WANT; returns the reply."""
        t0 = time.time()
        info = {}
        while time.time() - t0 < timeout:
            info = self.query_migrate()
            if info.get("status") in want:
                return info
            time.sleep(0.03)
        raise HarnessError(f"{self.impl} {self.name}: migration status still {info} "
                           f"after {timeout}s (wanted {want})")

    def wait_runstate(self, want, timeout=10):
        t0 = time.time()
        st = None
        while time.time() - t0 < timeout:
            st = self.runstate()
            if st == want:
                return st
            time.sleep(0.03)
        raise HarnessError(f"{self.impl} {self.name}: run state {st!r}, wanted {want!r}")

    def event_names(self):
        self._drain()
        return [e["event"] + ("" if e["event"] != "MIGRATION" else ":" + e["data"]["status"])
                for e in self.events]

    def wait_event(self, name, timeout=10):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if name in self.event_names():
                return True
            if not self.alive():
                return False
            try:
                self.raw("query-status")
            except HarnessError:
                return name in self.event_names()
            time.sleep(0.03)
        return name in self.event_names()

    # ---- guest RAM
    def write_ram(self, data, offset=0):
        """Write guest RAM through the shared backing file."""
        assert self.mem_file, "write_ram needs a shared RAM file"
        with open(self.mem_file, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def ram(self):
        """Guest RAM read from the shared backing file."""
        assert self.mem_file
        return read_file(self.mem_file, 0, self.mem_mib * MiB)

    def check_ram(self, image):
        """None when guest RAM (read through the shared file) equals IMAGE."""
        return compare_ram_file(self.mem_file, image)

    def check_ram_pmemsave(self, image):
        """None when guest RAM read with QMP pmemsave equals IMAGE."""
        out = self.ws.shm_path(f"{self.name}.pmemsave")
        self.cmd("pmemsave", val=0, size=image.size, filename=out)
        try:
            if not os.path.exists(out):
                return f"pmemsave did not create {out}"
            return compare_ram_file(out, image)
        finally:
            if os.path.exists(out):
                os.unlink(out)

    def ram_pmemsave(self, addr=0, size=None):
        """Guest RAM read with QMP pmemsave."""
        size = self.mem_mib * MiB if size is None else size
        out = self.ws.shm_path(f"{self.name}.pmemsave.{time.monotonic_ns()}")
        self.cmd("pmemsave", val=addr, size=size, filename=out)
        try:
            return read_file(out)
        finally:
            os.unlink(out)


def workload(m):
    """A `lab` VM's `query-workload`."""
    return m.cmd("query-workload")


def wait_passes(m, n, timeout=20):
    """Waits until the lab workload of M has made N passes; returns its last report."""
    t0 = time.time()
    w = workload(m)
    while time.time() - t0 < timeout:
        w = workload(m)
        if w["passes"] >= n:
            return w
        time.sleep(0.05)
    raise HarnessError(f"{m.name}: workload reached only {w} in {timeout}s")


def wait_until_status(m, want, timeout=60):
    """Polls query-migrate until its status is WANT; fails at once on an end state."""
    t0 = time.time()
    info = {}
    while time.time() - t0 < timeout:
        info = m.query_migrate()
        st = info.get("status")
        if st == want:
            return info
        if st in ("completed", "failed", "cancelled"):
            raise AssertionError(f"{m.impl} {m.name}: status {st} while waiting for {want}: "
                                 f"{info}")
        time.sleep(0.02)
    raise AssertionError(f"{m.impl} {m.name}: status still {info} after {timeout}s")


def socket_port(info):
    """TCP port from a destination's query-migrate socket-address."""
    addrs = info.get("socket-address") or []
    for a in addrs:
        if a.get("type") == "inet":
            return int(a["port"])
    raise HarnessError(f"no inet socket-address in query-migrate reply {info}")


# --------------------------------------------------------------------------------------
# Driving a migration between two machines

TRANSPORTS = ("tcp", "tcp-cmdline", "unix", "exec", "file", "file-offset")
SEQUENTIAL = ("exec", "file", "file-offset")   # source writes everything, then dst reads


def incoming_for(ws, transport):
    """What the destination is started with (-incoming / --incoming)."""
    if transport == "tcp-cmdline":
        return f"tcp:127.0.0.1:{free_port()}"
    return "defer"


def migrate(ws, src, dst, transport, timeout=120):
    """Migrate SRC to DST over TRANSPORT; returns (src query-migrate, dst query-migrate)
    once both have finished (completed, failed or cancelled)."""
    stream = ws.path("stream.bin")
    if transport == "tcp":
        dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
        info = dst.query_migrate()
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{socket_port(info)}")
    elif transport == "tcp-cmdline":
        info = dst.query_migrate()
        port = socket_port(info)
        if f":{port}" not in dst.incoming:
            raise HarnessError(f"destination reports port {port}, started with {dst.incoming}")
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    elif transport == "unix":
        path = ws.path("mig.sock")
        dst.cmd("migrate-incoming", uri=f"unix:{path}")
        src.cmd("migrate", uri=f"unix:{path}")
    elif transport in SEQUENTIAL:
        if transport == "exec":
            out_uri, in_uri = f"exec:cat > {stream}", f"exec:cat {stream}"
        elif transport == "file":
            out_uri = in_uri = f"file:{stream}"
        else:
            out_uri = in_uri = f"file:{stream},offset=4096"
        src.cmd("migrate", uri=out_uri)
        si = src.wait_migration(timeout=timeout)
        if si.get("status") != "completed":
            return si, dst.query_migrate()
        dst.cmd("migrate-incoming", uri=in_uri)
        return si, dst.wait_migration(("completed", "failed"), timeout=timeout)
    else:
        raise ValueError(transport)
    si = src.wait_migration(timeout=timeout)
    di = dst.wait_migration(("completed", "failed"), timeout=timeout)
    return si, di


class LoadResult:
    """Outcome of loading a stream into a destination.
    outcome: "completed", "failed" (process alive, query-migrate failed) or "exited"."""

    def __init__(self, machine, outcome, info=None, rc=None, runstate=None):
        self.machine, self.outcome, self.info, self.rc, self.runstate = \
            machine, outcome, info or {}, rc, runstate

    @property
    def error_desc(self):
        return self.info.get("error-desc", "")

    @property
    def stderr(self):
        return self.machine.stderr_text()

    def __repr__(self):
        return (f"LoadResult({self.outcome}, info={self.info}, rc={self.rc}, "
                f"runstate={self.runstate}, stderr={self.machine.stderr_tail(600)!r})")


def load_stream(ws, impl, uri, mem_mib, cmdline=False, name="dst", timeout=30,
                caps=None, params=None):
    """Load the stream at URI into a fresh destination.
    cmdline=False: started with incoming=defer, then QMP migrate-incoming with
                   exit-on-error false.
    cmdline=True:  started with the URI as -incoming / --incoming (exit-on-error is
                   then the default, true).
    caps, params:  capabilities and parameters ({name: value}) set before
                   migrate-incoming (cmdline=False only)."""
    if cmdline and (caps or params):
        raise ValueError("capabilities and parameters need migrate-incoming (cmdline=False)")
    m = ws.vm(impl, name, mem_mib=mem_mib, incoming=uri if cmdline else "defer")
    if not cmdline:
        m.start()
        if caps:
            m.set_caps(**caps)
        if params:
            m.set_params(**params)
        m.cmd("migrate-incoming", uri=uri, **{"exit-on-error": False})
        info = m.wait_migration(("completed", "failed"), timeout=timeout)
        return LoadResult(m, info["status"], info, runstate=m.runstate())
    m.start(connect=False)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if not m.alive():
            return LoadResult(m, "exited", rc=m.proc.returncode)
        try:
            if m.qmp is None:
                m.connect(timeout=timeout)
            info = m.query_migrate()
        except (MachineExited, HarnessError):
            # A process exiting on error closes its QMP socket a moment before it is
            # gone: a dropped connection means "wait for the exit", not "failed".
            try:
                return LoadResult(m, "exited", rc=m.wait_exit(10))
            except HarnessError:
                raise HarnessError(f"{impl} {name}: QMP connection lost while the "
                                   f"process kept running") from None
        st = info.get("status")
        if st == "completed":
            return LoadResult(m, "completed", info, runstate=m.runstate())
        if st == "failed":
            try:
                rc = m.wait_exit(10)
            except HarnessError:
                return LoadResult(m, "failed", info, runstate=m.runstate())
            return LoadResult(m, "exited", info, rc=rc)
        time.sleep(0.02)
    raise HarnessError(f"{impl} {name}: load of {uri} did not finish in {timeout}s")


def mentioned_offsets(text):
    """Byte offsets an error message mentions as `offset N`."""
    return [int(x) for x in OFFSET_RE.findall(text)]


# --------------------------------------------------------------------------------------
# Migration stream walker (record boundaries, for truncation and patching)

_QEMU_VM = {0: "EOF", 1: "START", 2: "PART", 3: "END", 4: "FULL", 5: "SUBSECTION",
            6: "VMDESC", 7: "CONFIGURATION", 8: "COMMAND"}
_CMD_LEN = {1: 0, 2: 4, 11: 0}
_FULL_SIZE = {"timer": 24, "globalstate": 104}
RAM_ZERO, RAM_MEM_SIZE, RAM_PAGE, RAM_EOS, RAM_CONT, RAM_MULTIFD_FLUSH = \
    0x2, 0x4, 0x8, 0x10, 0x20, 0x200


class Rec:
    """One record found in a stream: kind, start offset, end offset, details."""

    def __init__(self, kind, start, end, **kw):
        self.kind, self.start, self.end = kind, start, end
        self.__dict__.update(kw)

    def __repr__(self):
        extra = {k: v for k, v in self.__dict__.items() if k not in ("kind", "start", "end")}
        return f"Rec({self.kind} {self.start:#x}..{self.end:#x} {extra})"


def walk_stream(b, base=0):
    """Walk a precopy main stream for the `none` machine (header, configuration,
    sections with the ram record stream, timer/globalstate bodies, commands, EOF,
    vmdesc) and return the list of records with their offsets.  Offsets are relative
    to the start of B plus BASE.  Stops quietly at anything it does not know."""
    recs = []
    p = 0
    u8 = lambda: b[p]
    be16 = lambda o: struct.unpack_from(">H", b, o)[0]
    be32 = lambda o: struct.unpack_from(">I", b, o)[0]
    be64 = lambda o: struct.unpack_from(">Q", b, o)[0]

    def add(kind, s, e, **kw):
        recs.append(Rec(kind, base + s, base + e, **kw))

    if be32(0) != 0x5145564D:
        return recs
    add("header", 0, 8)
    p = 8
    ids = {}
    try:
        while p < len(b):
            t = u8()
            s = p
            if t == 7:  # configuration
                n = be32(p + 1)
                p += 5 + n
                while b[p] == 5:  # configuration subsections: skip known shapes only
                    return recs
                add("configuration", s, p)
            elif t in (1, 4):
                sid = be32(p + 1)
                ln = b[p + 5]
                idstr = b[p + 6:p + 6 + ln].decode()
                inst = be32(p + 6 + ln)
                ver = be32(p + 10 + ln)
                ids[sid] = idstr
                hdr_end = p + 14 + ln
                add("section-header", s, hdr_end, type=_QEMU_VM[t], sid=sid, idstr=idstr,
                    idstr_at=base + p + 6, version=ver)
                p = hdr_end
                if idstr == "ram":
                    p = _walk_ram(b, p, add)
                elif idstr in _FULL_SIZE:
                    add("body", p, p + _FULL_SIZE[idstr], idstr=idstr)
                    p += _FULL_SIZE[idstr]
                else:
                    return recs
                if b[p] != 0x7E:
                    return recs
                add("footer", p, p + 5, sid=sid)
                p += 5
            elif t in (2, 3):
                sid = be32(p + 1)
                add("section-header", s, p + 5, type=_QEMU_VM[t], sid=sid, idstr=ids.get(sid))
                p += 5
                if ids.get(sid) != "ram":
                    return recs
                p = _walk_ram(b, p, add)
                add("footer", p, p + 5, sid=sid)
                p += 5
            elif t == 8:
                cmd = be16(p + 1)
                ln = be16(p + 3)
                p += 5 + ln
                add("command", s, p, cmd=cmd)
            elif t == 0:
                p += 1
                add("eof", s, p)
            elif t == 6:
                n = be32(p + 1)
                p += 5 + n
                add("vmdesc", s, p)
            else:
                return recs
    except (IndexError, struct.error):
        pass
    return recs


def _walk_ram(b, p, add):
    be64 = lambda o: struct.unpack_from(">Q", b, o)[0]
    block = None
    while True:
        s = p
        hdr = be64(p)
        flags = hdr & (PAGE - 1)
        addr = hdr & ~(PAGE - 1)
        p += 8
        if flags & RAM_EOS:
            add("ram-eos", s, p)
            return p
        if flags & RAM_MEM_SIZE:
            add("ram-mem-size", s, p, total=addr)
            total = addr
            while total > 0:
                bs = p
                ln = b[p]
                name = b[p + 1:p + 1 + ln].decode()
                length = be64(p + 1 + ln)
                add("ram-block", bs, p + 9 + ln, name=name, length=length,
                    length_at=p + 1 + ln)
                p += 9 + ln
                total -= length
            continue
        if flags & RAM_MULTIFD_FLUSH:
            add("ram-flush", s, p)
            continue
        name_at = None
        if not flags & RAM_CONT:
            name_at = p
            ln = b[p]
            block = b[p + 1:p + 1 + ln].decode()
            p += 1 + ln
        if flags & RAM_ZERO:
            p += 1
            add("ram-zero", s, p, addr=addr, block=block, name_at=name_at)
        elif flags & RAM_PAGE:
            p += PAGE
            add("ram-page", s, p, addr=addr, block=block, name_at=name_at)
        else:
            raise IndexError("unknown ram flags")


# --------------------------------------------------------------------------------------
# Expected results for the synthetic streams of tests/qemu-oracle/captures/synthetic
# (from captures/README.md, checked against QEMU 10.0.2).
#
# accepted: variant -> run state after the load
# rejected: variant -> (pattern that vmigrate's error-desc must match (case-insensitive),
#                       text QEMU prints on stderr or None)

SYNTHETIC_ACCEPTED = {
    "ok": "paused",
    "same_ids_as_qemu": "paused",
    "gs_running": "running",
    "minimal": "running",
    "no_switchover_cmd": "paused",
    "machine_prefix": "paused",
    "bad_vmdesc_type": "paused",
}

SYNTHETIC_REJECTED = {
    "machine_longer": (r"Machine type received is 'nonesuch' and local is 'none'",
                       "Machine type received is 'nonesuch' and local is 'none'"),
    "wrong_machine": (r"Machine type received is 'pc-i440fx-10\.0' and local is 'none'",
                      "Machine type received is 'pc-i440fx-10.0' and local is 'none'"),
    "bad_magic": (r"Not a migration stream", "Not a migration stream"),
    "v2": (r"SaveVM v2 format is obsolete", "SaveVM v2 format is obsolete and don't work anymore"),
    "v4": (r"Unsupported migration stream version", "Unsupported migration stream version"),
    "unknown_cfg_subsection": (r"configuration/bogus", None),
    "caps_mapped_ram": (r"Capability mapped-ram is off, but received capability is on",
                        "Capability mapped-ram is off, but received capability is on"),
    "ram_v5": (r"unsupported version 5 for 'ram' v4", "savevm: unsupported version 5 for 'ram' v4"),
    "wrong_block_len": (r"Size mismatch: m0: 0x2000000 != 0x4000000",
                        "Size mismatch: m0: 0x2000000 != 0x4000000"),
    "unknown_block": (r"Unknown ramblock \"nosuch\"",
                      'Unknown ramblock "nosuch", cannot accept migration'),
    "bad_footer_id": (r"Mismatched section id in footer for ram - read 0x65 expected 0x64",
                      "Mismatched section id in footer for ram - read 0x65 expected 0x64"),
    "no_footer": (r"Missing section footer for ram", "Missing section footer for ram"),
    "zero_fill_nonzero": (r"Found a zero page with value 85", "Found a zero page with value 85"),
    "unknown_ram_flag": (r"Unknown combination of migration flags: 0x100",
                         "Unknown combination of migration flags: 0x100"),
    "bad_cmd_len": (r"PING received with bad length - expecting 4, got 3",
                    "PING received with bad length - expecting 4, got 3"),
    "unknown_cmd": (r"MIG_CMD 0xc unknown", "MIG_CMD 0xc unknown (len 0x0)"),
    "timer_v3": (r"unsupported version 3 for 'timer' v2", "savevm: unsupported version 3 for 'timer' v2"),
    "unknown_section": (r"Unknown savevm section or instance 'nosuchdev' 0",
                        "Unknown savevm section or instance 'nosuchdev' 0"),
    "unknown_toplevel": (r"Unknown savevm section type 9", "Unknown savevm section type 9"),
}

# vmigrate's error-desc must point at the place in the stream
OFFSET_RE = re.compile(r"offset (\d+)")

SYNTH_MEM_MIB = 64


def synthetic_pattern_page(i):
    """The page content the synthetic streams carry for pages 0-3 and 100."""
    b = bytearray(((i * 7 + j) & 0xFF) for j in range(PAGE))
    b[0:4] = struct.pack(">I", i)
    return bytes(b)


def synthetic_ram_ok(ram):
    """Whether RAM holds exactly what the synthetic streams put there."""
    for i in (0, 1, 2, 3, 100):
        if ram[i * PAGE:(i + 1) * PAGE] != synthetic_pattern_page(i):
            return f"page {i} does not hold the stream's data"
    for i in list(range(4, 16)) + [101, 16383]:
        if ram[i * PAGE:(i + 1) * PAGE] != bytes(PAGE):
            return f"page {i} is not zero"
    return None
