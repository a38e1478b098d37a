"""Fault injection: each migration runs through `faultproxy.FaultProxy`, which cuts,
stalls or corrupts one connection (main channel, a multifd channel, the return path, a
TLS session, postcopy's main or preempt channel) at a chosen byte or marker, in each
phase: setup, iteration, switchover (`pause-before-switchover`), device state (the
`globalstate` section header) and the end (the last chunk held back, then cut).

Every cell checks: the source ends `failed` or `cancelled` within BOUND seconds and its
guest runs again with RAM intact (in postcopy: both sides pause, and a recovery
completes); the destination exits with a message within BOUND; a second migration
from the same source to a fresh destination completes with RAM equal.

The default matrix is the CI one (12 cells, about 20 s); VMIGRATE_FAULTS_FULL=1 runs
the larger one. The outcome of every cell is printed at the end of the module."""
import os
import sys
import time

import pytest

import faultproxy
import harness
from conftest import require
from faultproxy import Fault

MiB = harness.MiB
BOUND = 30          # seconds either side may take to notice a fault and end
FULL = os.environ.get("VMIGRATE_FAULTS_FULL") == "1"
MULTIFD_INIT = 64   # a multifd channel's handshake packet
# Markers with their length byte in front, as the stream counts its strings: guest RAM
# (the test image has text pages) may hold the bare words, which would put the fault
# into page data, where no stream can notice it.
GLOBALSTATE = b"\x0bglobalstate"   # the globalstate section's header: device state
BLOCK_LIST_M0 = b"\x02m0"          # the RAM block list of the setup section

RESULTS = []


class Cell:
    def __init__(self, name, fault, ci=True, caps=None, params=None, tls=False,
                 flow="plain", dst="exit"):
        self.name, self.fault, self.ci, self.tls, self.flow = name, fault, ci, tls, flow
        # What the destination does: "exit" (fails with a message and ends),
        # "listening" (a TLS handshake failed: it waits for another connection, as
        # QEMU's does), "completed" (it had the whole stream before the fault).
        self.dst = dst
        self.caps = {"return_path": True, **(caps or {})}
        self.params = params or {}


MF = {"multifd": True}
MF2 = {"multifd_channels": 2}
CELLS = [
    Cell("main/setup/cut", Fault(0, "c2s", "cut", at=40)),
    Cell("main/setup/corrupt-magic", Fault(0, "c2s", "corrupt", at=1), ci=False),
    Cell("main/setup/corrupt-block-name",
         Fault(0, "c2s", "corrupt", marker=BLOCK_LIST_M0), ci=False),
    Cell("main/iteration/cut", Fault(0, "c2s", "cut", at=4 * MiB), ci=False),
    Cell("main/iteration/stall", Fault(0, "c2s", "stall", at=4 * MiB), flow="cancel"),
    Cell("main/switchover/cut", Fault(0, "c2s", "cut", at=1 << 40),
         caps={"pause_before_switchover": True}, flow="switchover"),
    Cell("main/device/cut", Fault(0, "c2s", "cut", marker=GLOBALSTATE)),
    Cell("main/device/corrupt", Fault(0, "c2s", "corrupt", marker=GLOBALSTATE)),
    Cell("main/end/cut", Fault(0, "c2s", "cut", tail=True)),
    Cell("return-path/setup/corrupt", Fault(0, "s2c", "corrupt", at=1)),
    Cell("return-path/setup/cut", Fault(0, "s2c", "cut", at=0), ci=False),
    Cell("return-path/end/stall", Fault(0, "s2c", "stall", at=0), flow="cancel",
         ci=False, dst="completed"),
    Cell("multifd1/setup/cut", Fault(1, "c2s", "cut", at=10), caps=MF, params=MF2, ci=False),
    Cell("multifd1/setup/corrupt", Fault(1, "c2s", "corrupt", at=0), caps=MF, params=MF2,
         ci=False),
    Cell("multifd1/first-packet/corrupt", Fault(1, "c2s", "corrupt", at=MULTIFD_INIT),
         caps=MF, params=MF2),
    Cell("multifd2/iteration/cut", Fault(2, "c2s", "cut", at=2 * MiB), caps=MF, params=MF2),
    Cell("multifd2/iteration/stall", Fault(2, "c2s", "stall", at=2 * MiB), caps=MF,
         params=MF2, flow="cancel", ci=False),
    Cell("multifd/device/cut", Fault(0, "c2s", "cut", marker=GLOBALSTATE), caps=MF,
         params=MF2, ci=False),
    Cell("tls/setup/cut", Fault(0, "c2s", "cut", at=100), tls=True, dst="listening"),
    Cell("tls/iteration/corrupt", Fault(0, "c2s", "corrupt", at=4 * MiB), tls=True),
    Cell("tls/end/cut", Fault(0, "c2s", "cut", tail=True, after=MiB), tls=True, ci=False),
    Cell("tls-multifd2/iteration/cut", Fault(2, "c2s", "cut", at=2 * MiB), tls=True,
         caps=MF, params=MF2, ci=False),
    Cell("postcopy-main/postcopy/cut", Fault(0, "c2s", "cut", at=1 << 40),
         caps={"postcopy_ram": True}, flow="postcopy"),
    Cell("postcopy-preempt/postcopy/cut", Fault(1, "c2s", "cut", at=1 << 40),
         caps={"postcopy_ram": True, "postcopy_preempt": True}, flow="postcopy",
         ci=False),
]


@pytest.fixture(scope="module", autouse=True)
def matrix():
    yield
    if not RESULTS:
        return
    lines = ["", "fault-injection matrix (source / destination / second migration, "
             "seconds to the source's end):"]
    for name, fault, src, dst, again, secs in RESULTS:
        lines.append(f"  {name:30} {fault!r:46} {src:44} {dst:56} {again:10} {secs}")
    text = "\n".join(lines) + "\n"
    sys.__stderr__.write(text)
    out = os.environ.get("VMIGRATE_FAULTS_REPORT")
    if out:
        with open(out, "a") as f:
            f.write(text)


def creds(pki, endpoint):
    return (f"tls-creds-x509,id=tls0,dir={os.path.join(pki, endpoint)},"
            f"endpoint={endpoint},verify-peer=on")


def machine(ws, cell, pki, name, image=None, incoming=None):
    mib = 16
    objects = [creds(pki, "server" if incoming else "client")] if cell.tls else []
    m = ws.vm("vmigrate", name, mem_mib=mib, incoming=incoming, objects=objects).start()
    if image is not None:
        m.write_ram(image.data)
    m.set_caps(events=True, **cell.caps)
    params = dict(cell.params)
    if cell.tls:
        params["tls_creds"] = "tls0"
        if not incoming:
            params["tls_hostname"] = "localhost"
    if not incoming:
        # Slow enough that the byte and marker triggers land inside the phase
        # they name, fast enough for seconds per cell.
        params["max_bandwidth"] = 48 * MiB
        if cell.flow == "postcopy":
            params.update(max_bandwidth=4 * MiB, max_postcopy_bandwidth=8 * MiB)
    if params:
        m.set_params(**params)
    return m


def dst_outcome(dst, expect):
    """vmigrate ends the process on a failed incoming migration, with a message on
    its standard error; see Cell for the other expectations."""
    if expect == "exit":
        try:
            rc = dst.wait_exit(timeout=BOUND)
        except harness.HarnessError:
            raise AssertionError(f"destination still running {BOUND} s after the fault: "
                                 f"{dst.query_migrate()}")
        msg = dst.stderr_text().strip().splitlines()
        assert rc != 0 and msg, f"destination exit {rc}, stderr {msg}"
        return f"exit {rc}: {msg[-1].removeprefix('vmigrate: ')}"
    status = dst.query_migrate().get("status")
    if expect == "listening":
        assert dst.alive() and status in ("setup", "none", None), status
        return f"listening ({status})"
    di = dst.wait_migration(("completed", "failed"), timeout=BOUND)
    assert di["status"] == "completed", di
    return "completed"


def second_migration(ws, cell, pki, src, image, tag):
    dst2 = machine(ws, cell, pki, f"dst2{tag}", incoming="defer")
    if cell.flow == "switchover":
        dst2.set_caps(pause_before_switchover=False)
        src.set_caps(pause_before_switchover=False)
    if cell.flow == "postcopy":
        src.set_params(max_bandwidth=0)
    si, di = harness.migrate(ws, src, dst2, "tcp", timeout=60)
    assert si.get("status") == "completed", f"second migration, source: {si}"
    assert di.get("status") == "completed", f"second migration, destination: {di}"
    assert dst2.check_ram(image) is None, "second migration: destination RAM differs"
    return "completed"


def run_precopy(ws, cell, pki, image):
    src = machine(ws, cell, pki, "src", image=image)
    dst = machine(ws, cell, pki, "dst", incoming="defer")
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    proxy = faultproxy.FaultProxy(harness.socket_port(dst.query_migrate()), cell.fault)
    t0 = time.time()
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{proxy.port}")
    if cell.flow == "switchover":
        harness.wait_until_status(src, "pre-switchover", timeout=BOUND)
        proxy.cut_now()
        try:
            src.cmd("migrate-continue", state="pre-switchover")
        except harness.HarnessError:
            pass   # already failed: the cut reached it first
    elif cell.flow == "cancel":
        assert proxy.fired.wait(BOUND), "the stall never triggered"
        time.sleep(0.5)
        src.cmd("migrate_cancel")
    else:
        # (When the fault point is past the end, the proxy never fires and the
        # migration completes: the assertion below then fails.)
        proxy.fired.wait(BOUND)
    si = src.wait_migration(("completed", "failed", "cancelled"), timeout=BOUND)
    secs = round(time.time() - t0, 1)
    want = "cancelled" if cell.flow == "cancel" else "failed"
    assert proxy.fired.is_set(), f"the fault never triggered; source {si}"
    assert si["status"] == want, f"source: {si}\n{ws.diagnostics()}"
    assert si["status"] == "cancelled" or si.get("error-desc"), si
    assert src.wait_runstate("running", timeout=BOUND) == "running"
    assert src.check_ram(image) is None, "source RAM changed"
    # A stalled relay keeps the destination's socket open: the network breaks.
    proxy.close()
    dst_text = dst_outcome(dst, cell.dst)
    src_text = si["status"] + (f": {si['error-desc']}" if si.get("error-desc") else "")
    return src_text, dst_text, secs, src


def run_postcopy(ws, cell, pki, image):
    src = machine(ws, cell, pki, "src", image=image)
    dst = machine(ws, cell, pki, "dst", incoming="defer")
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    proxy = faultproxy.FaultProxy(harness.socket_port(dst.query_migrate()), cell.fault)
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{proxy.port}")
    harness.wait_until_status(src, "active", timeout=BOUND)
    src.cmd("migrate-start-postcopy")
    harness.wait_until_status(src, "postcopy-active", timeout=BOUND)
    harness.wait_until_status(dst, "postcopy-active", timeout=BOUND)
    t0 = time.time()
    proxy.cut_now()
    si = harness.wait_until_status(src, "postcopy-paused", timeout=BOUND)
    harness.wait_until_status(dst, "postcopy-paused", timeout=BOUND)
    secs = round(time.time() - t0, 1)
    assert si.get("error-desc"), si
    # Recovery over a direct connection completes the migration.
    dst.cmd("migrate-recover", uri="tcp:127.0.0.1:0")
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{harness.socket_port(dst.query_migrate())}",
            resume=True)
    si2 = src.wait_migration(("completed", "failed"), timeout=60)
    di2 = dst.wait_migration(("completed", "failed"), timeout=60)
    assert si2["status"] == di2["status"] == "completed", (si2, di2)
    assert dst.check_ram(image) is None, "destination RAM differs after recovery"
    return ("postcopy-paused", "postcopy-paused", secs, None)


@pytest.mark.vmigrate
@pytest.mark.parametrize("cell", [c for c in CELLS if FULL or c.ci], ids=lambda c: c.name)
def test_fault(ws, small_image, pki, cell):
    require("vmigrate")
    image = small_image
    try:
        if cell.flow == "postcopy":
            src_text, dst_text, secs, src = run_postcopy(ws, cell, pki, image)
            again = "recovered"
        else:
            src_text, dst_text, secs, src = run_precopy(ws, cell, pki, image)
            again = second_migration(ws, cell, pki, src, image, "")
    except Exception as e:
        RESULTS.append((cell.name, cell.fault, "FAIL", str(e)[:24], "-", "-"))
        raise
    RESULTS.append((cell.name, cell.fault, src_text[:44], dst_text[:56], again, secs))
