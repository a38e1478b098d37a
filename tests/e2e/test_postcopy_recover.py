"""Postcopy pause and recovery: the migration's connection goes through a TCP proxy that
the test cuts during postcopy; both sides must reach `postcopy-paused` with nothing lost,
then `migrate-recover` on the destination and `migrate resume=true` on the source (through
a new proxy) bring them back to `postcopy-active`, and the migration completes with RAM
equal byte for byte. vmigrate to vmigrate is cut twice (with and without
postcopy-preempt); vmigrate and QEMU 10.0.2 recover with each other both ways; QEMU to
QEMU runs the same script as a check of the harness. `migrate-pause` forces the pause
from either side, and the commands' errors outside a paused postcopy are QEMU's."""
import os
import random
import time

import pytest

import harness
from faultproxy import FaultProxy
from conftest import require

MiB = harness.MiB
GUEST_MIB = 32


@pytest.fixture(scope="module")
def image32(session_dir):
    return harness.Image(os.path.join(session_dir, "image32.bin"), GUEST_MIB * MiB, 11)


def status(m):
    return m.query_migrate()["status"]


def wait_status(m, want, timeout=60):
    return harness.wait_until_status(m, want, timeout)


def migration_events(m):
    return [e.split(":", 1)[1] for e in m.event_names() if e.startswith("MIGRATION:")]


def start_pair(ws, image, src_impl, dst_impl, preempt=False, tls=None, faults=()):
    """Source and destination in postcopy-active, the connection through a proxy.
    TLS: (source objects, destination objects, source params, destination params)."""
    src_objects, dst_objects, src_params, dst_params = tls or ([], [], {}, {})
    src = ws.vm(src_impl, "src", mem_mib=GUEST_MIB, objects=src_objects).start()
    src.write_ram(image.data)
    dst = ws.vm(dst_impl, "dst", mem_mib=GUEST_MIB, incoming="defer",
                objects=dst_objects).start()
    for m in (src, dst):
        m.set_caps(events=True, postcopy_ram=True, postcopy_preempt=preempt)
    if dst_params:
        dst.set_params(**dst_params)
    # Precopy crawls; the push after the switch takes a few seconds, long enough to
    # be cut (twice) on a loaded machine.
    src.set_params(max_bandwidth=2 * MiB, max_postcopy_bandwidth=6 * MiB, **src_params)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    proxy = FaultProxy(harness.socket_port(dst.query_migrate()), *faults)
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{proxy.port}")
    wait_status(src, "active")
    src.cmd("migrate-start-postcopy")
    wait_status(src, "postcopy-active")
    wait_status(dst, "postcopy-active")
    assert dst.wait_runstate("running") == "running"
    return src, dst, proxy


def check_paused(src, dst):
    """Both sides paused; the source VM stays stopped."""
    si = wait_status(src, "postcopy-paused", timeout=30)
    wait_status(dst, "postcopy-paused", timeout=30)
    for key in ("error-desc", "total-time", "downtime", "ram"):
        assert key in si, si
    # (QEMU shows finish-migrate all through postcopy, vmigrate postmigrate.)
    assert src.runstate() in ("finish-migrate", "postmigrate")


def recover(src, dst):
    """migrate-recover on the destination, migrate resume=true on the source through a
    new proxy; returns once both are back in postcopy-active (or done)."""
    dst.cmd("migrate-recover", uri="tcp:127.0.0.1:0")
    proxy = FaultProxy(harness.socket_port(dst.query_migrate()))
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{proxy.port}", resume=True)
    src.wait_migration(("postcopy-active", "completed", "failed"), timeout=30)
    return proxy


def finish(ws, src, dst, image):
    si = src.wait_migration(timeout=120)
    di = dst.wait_migration(("completed", "failed"), timeout=60)
    assert si["status"] == "completed", f"source: {si}\n{ws.diagnostics()}"
    assert di["status"] == "completed", f"destination: {di}\n{ws.diagnostics()}"
    diff = dst.check_ram(image)
    assert diff is None, f"destination RAM differs from the source image: {diff}"
    assert dst.runstate() == "running"
    assert src.runstate() == "postmigrate"


def cut_during_postcopy(src, proxy, rng):
    """Cuts PROXY at a random point while the source is still in postcopy-active."""
    time.sleep(rng.uniform(0.05, 0.5))
    assert status(src) == "postcopy-active", "the push ended before the cut"
    proxy.close()


RECOVERY_SRC = ["postcopy-active", "postcopy-paused", "postcopy-recover-setup",
                "postcopy-recover", "postcopy-active"]
RECOVERY_DST = ["postcopy-active", "postcopy-paused", "postcopy-recover", "postcopy-active"]


def assert_recovered(m, expected, times):
    """M's MIGRATION events contain the recovery sequence EXPECTED TIMES times."""
    ev = migration_events(m)
    first = ev.index("postcopy-active")
    seq = ev[first:]
    assert seq[-1] == "completed", ev
    body = seq[:-1]
    want = expected[:1] + expected[1:] * times
    assert body == want, f"{m.impl} {m.name}: {ev}"


PAIRS = [
    pytest.param("vmigrate", "vmigrate", 2, False, marks=pytest.mark.vmigrate,
                 id="vmigrate-to-vmigrate-cut-twice"),
    pytest.param("vmigrate", "vmigrate", 2, True, marks=pytest.mark.vmigrate,
                 id="vmigrate-to-vmigrate-preempt-cut-twice"),
    pytest.param("vmigrate", "qemu", 1, False, marks=pytest.mark.vmigrate,
                 id="vmigrate-to-qemu"),
    pytest.param("qemu", "vmigrate", 1, False, marks=pytest.mark.vmigrate,
                 id="qemu-to-vmigrate"),
    pytest.param("vmigrate", "qemu", 1, True, marks=pytest.mark.vmigrate,
                 id="vmigrate-to-qemu-preempt"),
    pytest.param("qemu", "vmigrate", 1, True, marks=pytest.mark.vmigrate,
                 id="qemu-to-vmigrate-preempt"),
    pytest.param("qemu", "qemu", 1, False, marks=pytest.mark.harness_check,
                 id="harness_check-qemu-to-qemu"),
]


@pytest.mark.parametrize("src_impl,dst_impl,cuts,preempt", PAIRS)
def test_cut_and_recover(ws, image32, src_impl, dst_impl, cuts, preempt):
    require(src_impl, dst_impl)
    rng = random.Random()
    src, dst, proxy = start_pair(ws, image32, src_impl, dst_impl, preempt)
    # Outside a paused postcopy, neither recovery command is taken.
    with pytest.raises(harness.HarnessError,
                       match="Migrate recover can only be run when postcopy is paused"):
        dst.cmd("migrate-recover", uri="tcp:127.0.0.1:0")
    with pytest.raises(harness.HarnessError,
                       match="Cannot resume if there is no paused migration"):
        src.cmd("migrate", uri="tcp:127.0.0.1:1", resume=True)
    # Pages the push has not reached are asked for before the first cut.
    tail = GUEST_MIB * MiB - MiB
    assert dst.ram_pmemsave(tail, 64 * 1024) == image32.data[tail:tail + 64 * 1024]
    for _ in range(cuts):
        cut_during_postcopy(src, proxy, rng)
        check_paused(src, dst)
        proxy = recover(src, dst)
    finish(ws, src, dst, image32)
    assert_recovered(src, RECOVERY_SRC, cuts)
    assert_recovered(dst, RECOVERY_DST, cuts)


SIDES = [
    pytest.param("vmigrate", "source", marks=pytest.mark.vmigrate, id="vmigrate-source"),
    pytest.param("vmigrate", "destination", marks=pytest.mark.vmigrate,
                 id="vmigrate-destination"),
    pytest.param("qemu", "source", marks=pytest.mark.harness_check,
                 id="harness_check-qemu-source"),
]


@pytest.mark.parametrize("impl,side", SIDES)
def test_migrate_pause_then_recover(ws, image32, impl, side):
    require(impl)
    src, dst, _proxy = start_pair(ws, image32, impl, impl)
    (src if side == "source" else dst).cmd("migrate-pause")
    check_paused(src, dst)
    if side == "source":
        assert src.query_migrate()["error-desc"] == "Postcopy migration is paused by the user"
    # Paused already: a second pause is refused.
    with pytest.raises(harness.HarnessError, match="migrate-pause is currently only supported"):
        src.cmd("migrate-pause")
    recover(src, dst)
    finish(ws, src, dst, image32)


@pytest.mark.parametrize("impl", [pytest.param("vmigrate", marks=pytest.mark.vmigrate),
                                  pytest.param("qemu", marks=pytest.mark.harness_check)])
def test_recovery_commands_outside_postcopy_fail_as_in_qemu(ws, impl):
    require(impl)
    m = ws.vm(impl, "idle", mem_mib=16).start()
    d = ws.vm(impl, "waiting", mem_mib=16, incoming="defer").start()
    errors = {}
    for name, machine, cmd, args in [
        ("pause", m, "migrate-pause", {}),
        ("recover", d, "migrate-recover", {"uri": "tcp:127.0.0.1:0"}),
        ("resume", m, "migrate", {"uri": "tcp:127.0.0.1:1", "resume": True}),
    ]:
        with pytest.raises(harness.HarnessError) as e:
            machine.cmd(cmd, **args)
        errors[name] = str(e.value)
    assert "migrate-pause is currently only supported during postcopy-active or " \
           "postcopy-recover state" in errors["pause"], errors
    assert "Migrate recover can only be run when postcopy is paused." in errors["recover"]
    assert "Cannot resume if there is no paused migration" in errors["resume"], errors


@pytest.mark.parametrize("impl", [pytest.param("vmigrate", marks=pytest.mark.vmigrate),
                                  pytest.param("qemu", marks=pytest.mark.harness_check)])
def test_a_cut_before_the_switch_is_an_ordinary_precopy_failure(ws, image32, impl):
    """With postcopy-ram on but precopy still running, a broken connection does not
    pause anything: the source fails and its VM runs on."""
    require(impl)
    src = ws.vm(impl, "src", mem_mib=GUEST_MIB).start()
    src.write_ram(image32.data)
    dst = ws.vm(impl, "dst", mem_mib=GUEST_MIB, incoming="defer").start()
    for m in (src, dst):
        m.set_caps(events=True, postcopy_ram=True)
    src.set_params(max_bandwidth=2 * MiB)
    dst.raw("migrate-incoming", uri="tcp:127.0.0.1:0", **{"exit-on-error": False})
    proxy = FaultProxy(harness.socket_port(dst.query_migrate()))
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{proxy.port}")
    wait_status(src, "active")
    time.sleep(0.2)
    proxy.close()
    si = src.wait_migration(timeout=30)
    assert si["status"] == "failed", si
    assert src.wait_runstate("running") == "running"
    di = dst.wait_migration(("failed", "completed"), timeout=30)
    assert di["status"] == "failed", di
    assert "postcopy-paused" not in migration_events(src)


@pytest.mark.vmigrate
def test_lab_guest_survives_two_cuts_with_its_self_check_clean(ws):
    """A `lab` guest (soft vCPUs writing and checking their pages) runs on the
    destination while postcopy is cut twice and recovered: its self-check finds no page
    lost or stale."""
    require("vmigrate")
    from test_lab import lab, wait_passes, workload
    spec = "hot=16M,verify"
    src = lab(ws, "src", 64, workload=spec, cpus=2).start()
    dst = lab(ws, "dst", 64, workload=spec, cpus=2, incoming="defer").start()
    wait_passes(src, 2)
    for m in (src, dst):
        m.set_caps(events=True, postcopy_ram=True)
    # The destination's guest pulls its hot set by request, which ignores the bandwidth
    # limit and can be over within a second. 12 MiB of data the guest never touches, above
    # its hot set, keep the push going at 2 MiB/s through two cuts and their recoveries.
    cold_at, cold = 40 * MiB, os.urandom(12 * MiB)
    src.write_ram(cold, cold_at)
    src.set_params(max_bandwidth=4 * MiB, max_postcopy_bandwidth=2 * MiB)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    proxy = FaultProxy(harness.socket_port(dst.query_migrate()))
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{proxy.port}")
    wait_status(src, "active")
    src.cmd("migrate-start-postcopy")
    wait_status(src, "postcopy-active")
    wait_status(dst, "postcopy-active")
    rng = random.Random()
    for _ in range(2):
        cut_during_postcopy(src, proxy, rng)
        check_paused(src, dst)
        proxy = recover(src, dst)
    si = src.wait_migration(timeout=120)
    di = dst.wait_migration(("completed", "failed"), timeout=60)
    assert si["status"] == "completed", f"source: {si}\n{ws.diagnostics()}"
    assert di["status"] == "completed", f"destination: {di}\n{ws.diagnostics()}"
    assert harness.read_file(dst.mem_file, cold_at, len(cold)) == cold, \
        "the pages pushed across the cuts differ"
    arrived = workload(dst)
    after = wait_passes(dst, arrived["passes"] + 3, timeout=30)
    assert after["violations"] == 0, after
    assert_recovered(src, RECOVERY_SRC, 2)
    print(f"\nlab: {after}, postcopy-requests={si['ram']['postcopy-requests']}, "
          f"total={si['total-time']}ms")
