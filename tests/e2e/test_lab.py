"""Live migration of running guests: the `lab` machine (vmigrate only).

soft guests are vCPU threads writing guest RAM with a self-check (`verify`): every page
is checked against the pass it must hold before it is rewritten, so a page the migration
failed to resend shows up as a violation on the destination.
"""
import fcntl
import hashlib
import os
import re
import subprocess
import time

import pytest

import harness
from harness import wait_passes, workload
from conftest import require

pytestmark = pytest.mark.vmigrate

MiB = harness.MiB


def lab(ws, name, mem_mib, accel="soft", workload="", cpus=1, serial=None, tracking=None,
        **kw):
    extra = ["--accel", accel, "--cpus", str(cpus)]
    if workload:
        extra += ["--workload", workload]
    if serial:
        extra += ["--serial", serial]
    if tracking:
        extra += ["--dirty-tracking", tracking]
    return ws.vm("vmigrate", name, mem_mib=mem_mib, machine="lab", extra=extra, **kw)


def sha(path, size):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left:
            b = f.read(min(left, 8 * MiB))
            if not b:
                break
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def start_incoming(dst):
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    return f"tcp:127.0.0.1:{harness.socket_port(dst.query_migrate())}"


def migrate_tracked_guest(src, dst, mem_mib, hot_mib, min_syncs, min_resent,
                          compare_ram=True):
    """Migrates the running `src` to the paused `dst` at 32 MiB/s, so the guest dirties
    pages during the transfer, and checks what dirty tracking must give: at least
    `min_syncs` syncs, more than `min_resent` times the hot set sent, the workload's
    counters (and with `compare_ram`, guest RAM) on arrival as at switchover, and no
    violation once the destination runs on. Returns the source's query-migrate, its
    workload at the end, the destination's on arrival and after three more passes."""
    src.set_params(max_bandwidth=32 * MiB)
    src.cmd("migrate", uri=start_incoming(dst))
    si = src.wait_migration(timeout=60)
    assert si["status"] == "completed", si
    assert si["ram"]["dirty-sync-count"] >= min_syncs, si["ram"]
    hot_pages = hot_mib * MiB // si["ram"]["page-size"]
    assert si["ram"]["normal"] > hot_pages * min_resent, \
        f"the guest dirtied too little during the migration to test tracking: {si['ram']}"
    assert dst.wait_migration(("completed", "failed"), timeout=25)["status"] == "completed"
    assert dst.runstate() == "paused"
    src_w = workload(src)
    arrived = workload(dst)
    assert arrived["passes"] == src_w["passes"]
    assert arrived["pages-written"] == src_w["pages-written"]
    if compare_ram:
        assert sha(dst.mem_file, mem_mib * MiB) == sha(src.mem_file, mem_mib * MiB), \
            "destination RAM differs from the source's at switchover"
    dst.cmd("cont")
    after = wait_passes(dst, arrived["passes"] + 3)
    assert after["violations"] == 0, after
    return si, src_w, arrived, after


def kvm_unusable_reason():
    """Why KVM guests cannot run here, or None."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm cannot be opened: {e}"
    try:
        if fcntl.ioctl(fd, 0xAE00) != 12:  # KVM_GET_API_VERSION
            return "/dev/kvm speaks an unknown KVM API version"
        vm = fcntl.ioctl(fd, 0xAE01, 0)  # KVM_CREATE_VM
        os.close(vm)
    except OSError as e:
        return f"/dev/kvm cannot create a VM: {e}"
    finally:
        os.close(fd)
    return None


KVM_CHECK_EXTENSION = 0xAE03
# Capability numbers from <linux/kvm.h>, and the --dirty-tracking modes that need them.
TRACKING_CAPS = {
    "log-clear": [("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", 168)],
    "ring": [("KVM_CAP_DIRTY_LOG_RING", 192), ("KVM_CAP_DIRTY_LOG_RING_ACQ_REL", 223)],
}


def kvm_tracking_unavailable_reason(mode):
    """Why a KVM guest cannot use dirty tracking MODE (`log`, `log-clear`, `ring`,
    `ring=N`) here, or None."""
    reason = kvm_unusable_reason()
    if reason:
        return reason
    caps = TRACKING_CAPS.get(mode.split("=")[0])
    if not caps:
        return None
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        if any(fcntl.ioctl(fd, KVM_CHECK_EXTENSION, number) > 0 for _, number in caps):
            return None
    finally:
        os.close(fd)
    return f"this host's KVM offers none of {', '.join(name for name, _ in caps)}"


def test_soft_guest_migrates_live_and_arrives_intact(ws):
    """A 64 MiB hot set dirtied at 150 MB/s, a link that outruns it: the migration
    converges, guest RAM at switchover equals the destination's, and the destination's
    self-check keeps passing with counts continuing from the source's."""
    require("vmigrate")
    spec = "hot=64M,rate=150M,verify"
    src = lab(ws, "src", 128, workload=spec).start()
    dst = lab(ws, "dst", 128, workload=spec, incoming="defer", start_paused=True).start()
    w0 = wait_passes(src, 2)
    assert w0["violations"] == 0 and w0["accel"] == "soft"
    time.sleep(0.6)
    rate = workload(src)["dirty-rate"]
    assert 60e6 < rate < 300e6, f"dirty rate {rate} B/s, asked for 150M"
    src.set_caps(pause_before_switchover=True)
    src.set_params(max_bandwidth=1024 * MiB)
    src.cmd("migrate", uri=start_incoming(dst))
    info = src.wait_migration(("pre-switchover", "failed", "cancelled"), timeout=25)
    assert info["status"] == "pre-switchover", info
    assert src.runstate() == "finish-migrate"
    at_switchover = workload(src)
    src_hash = sha(src.mem_file, 128 * MiB)
    time.sleep(0.2)
    assert workload(src)["pages-written"] == at_switchover["pages-written"], \
        "a vCPU wrote guest RAM while the VM was stopped"
    src.cmd("migrate-continue", state="pre-switchover")
    si = src.wait_migration(timeout=25)
    assert si["status"] == "completed", si
    di = dst.wait_migration(("completed", "failed"), timeout=25)
    assert di["status"] == "completed", di
    assert si["ram"]["dirty-sync-count"] >= 2
    assert dst.runstate() == "paused"
    assert sha(dst.mem_file, 128 * MiB) == src_hash, "destination RAM differs from the source's"
    arrived = workload(dst)
    assert arrived["passes"] == at_switchover["passes"]
    assert arrived["pages-written"] == at_switchover["pages-written"]
    dst.cmd("cont")
    after = wait_passes(dst, at_switchover["passes"] + 3)
    assert after["violations"] == 0, after
    assert src.runstate() == "postmigrate"


def test_pause_before_switchover_waits_for_continue(ws):
    require("vmigrate")
    src = lab(ws, "src", 32, workload="hot=16M,rate=50M,verify").start()
    dst = lab(ws, "dst", 32, workload="hot=16M,rate=50M,verify", incoming="defer").start()
    wait_passes(src, 1)
    src.set_caps(pause_before_switchover=True, events=True)
    src.set_params(max_bandwidth=0)
    src.cmd("migrate", uri=start_incoming(dst))
    info = src.wait_migration(("pre-switchover", "completed", "failed"), timeout=20)
    assert info["status"] == "pre-switchover", info
    frozen = workload(src)["pages-written"]
    time.sleep(1.0)
    assert src.query_migrate()["status"] == "pre-switchover"
    assert dst.query_migrate()["status"] == "active"
    assert workload(src)["pages-written"] == frozen
    src.cmd("migrate-continue", state="pre-switchover")
    assert src.wait_migration(timeout=20)["status"] == "completed"
    assert dst.wait_migration(("completed", "failed"), timeout=20)["status"] == "completed"
    dst.wait_runstate("running")
    after = wait_passes(dst, workload(dst)["passes"] + 2)
    assert after["violations"] == 0


def test_cancel_during_active_then_migrate_again(ws):
    """Cancelled while active, the source keeps running with its self-check intact; a
    second migration then completes and the guest carries on at the destination."""
    require("vmigrate")
    spec = "hot=64M,rate=150M,verify"
    src = lab(ws, "src", 128, workload=spec).start()
    dst1 = lab(ws, "dst1", 128, workload=spec, incoming="defer").start()
    wait_passes(src, 1)
    src.set_params(max_bandwidth=32 * MiB)
    src.cmd("migrate", uri=start_incoming(dst1))
    src.wait_migration(("active",), timeout=10)
    time.sleep(0.5)
    src.cmd("migrate_cancel")
    assert src.wait_migration(timeout=10)["status"] == "cancelled"
    assert src.runstate() == "running"
    before = workload(src)
    after = wait_passes(src, before["passes"] + 2)
    assert after["violations"] == 0, after
    dst1.destroy()

    dst2 = lab(ws, "dst2", 128, workload=spec, incoming="defer").start()
    src.set_params(max_bandwidth=0)
    src.cmd("migrate", uri=start_incoming(dst2))
    si = src.wait_migration(timeout=25)
    assert si["status"] == "completed", si
    assert dst2.wait_migration(("completed", "failed"), timeout=25)["status"] == "completed"
    dst2.wait_runstate("running")
    arrived = workload(dst2)
    final = wait_passes(dst2, arrived["passes"] + 3)
    assert final["violations"] == 0, final


PASS_LINE = re.compile(r"^pass ([0-9a-f]{8})$")


def test_kvm_guest_migrates_live_and_keeps_running(ws):
    """A KVM guest dirtying pages in a loop and printing a line per pass: migrated
    live, it keeps running on the destination, and the two serial logs joined together
    count every pass exactly once."""
    require("vmigrate")
    reason = kvm_unusable_reason()
    if reason:
        print(f"SKIP test_kvm_guest_migrates_live_and_keeps_running: {reason}")
        pytest.skip(reason)
    spec = "hot=1M,verify"
    src_log, dst_log = ws.path("src.serial"), ws.path("dst.serial")
    src = lab(ws, "src", 16, accel="kvm", workload=spec, serial=src_log).start()
    dst = lab(ws, "dst", 16, accel="kvm", workload=spec, serial=dst_log,
              incoming="defer").start()
    w0 = wait_passes(src, 3)
    assert w0["accel"] == "kvm" and w0["violations"] == 0
    src.set_params(max_bandwidth=0)
    src.cmd("migrate", uri=start_incoming(dst))
    si = src.wait_migration(timeout=25)
    assert si["status"] == "completed", si
    assert dst.wait_migration(("completed", "failed"), timeout=25)["status"] == "completed"
    dst.wait_runstate("running")
    arrived = workload(dst)
    after = wait_passes(dst, arrived["passes"] + 3)
    assert after["violations"] == 0, after
    src.quit()
    text = open(src_log).read() + open(dst_log).read()
    lines = text.split("\n")
    assert lines[0] == "lab guest: running", lines[:3]
    passes = [int(PASS_LINE.match(line).group(1), 16) for line in lines[1:-1]]
    assert passes == list(range(1, len(passes) + 1)), "serial output has a gap or a repeat"
    assert len(passes) >= after["passes"] - 1
    assert os.path.getsize(dst_log) > 0


def test_destination_killed_mid_migration_source_survives(ws):
    """The destination dies (SIGKILL) while the migration is active: the source ends
    `failed`, as QEMU does, keeps running with its self-check intact, and a second
    migration to a fresh destination completes with the self-check passing there."""
    require("vmigrate")
    spec = "hot=64M,rate=150M,verify"
    src = lab(ws, "src", 128, workload=spec).start()
    dst1 = lab(ws, "dst1", 128, workload=spec, incoming="defer").start()
    wait_passes(src, 1)
    src.set_caps(events=True)
    src.set_params(max_bandwidth=32 * MiB)
    src.cmd("migrate", uri=start_incoming(dst1))
    src.wait_migration(("active",), timeout=10)
    time.sleep(0.5)
    sent = src.query_migrate()["ram"]["transferred"]
    assert 0 < sent < 128 * MiB, f"not mid-migration: {sent} bytes sent"
    dst1.kill9()
    info = src.wait_migration(timeout=20)
    assert info["status"] == "failed", info
    assert info.get("error-desc"), info
    assert src.runstate() == "running"
    statuses = [e["data"]["status"] for e in src.events if e["event"] == "MIGRATION"]
    assert statuses[-1] == "failed", statuses
    before = workload(src)
    after = wait_passes(src, before["passes"] + 2)
    assert after["violations"] == 0, after
    assert after["pages-written"] > before["pages-written"]

    dst2 = lab(ws, "dst2", 128, workload=spec, incoming="defer").start()
    src.set_params(max_bandwidth=0)
    src.cmd("migrate", uri=start_incoming(dst2))
    si = src.wait_migration(timeout=25)
    assert si["status"] == "completed", si
    assert dst2.wait_migration(("completed", "failed"), timeout=25)["status"] == "completed"
    dst2.wait_runstate("running")
    arrived = workload(dst2)
    assert arrived["passes"] >= after["passes"]
    final = wait_passes(dst2, arrived["passes"] + 3)
    assert final["violations"] == 0, final
    assert src.runstate() == "postmigrate"


@pytest.mark.parametrize("tracking", ["log", "log-clear", "ring", "ring=256"])
def test_kvm_guest_migrates_live_with_each_dirty_tracking_mode(ws, tracking):
    """A KVM guest with its self-check on, migrated live at a bandwidth that lets it
    dirty pages during the transfer, under each dirty tracking mode; `ring=256` is a
    ring that fills between exits. RAM and counters arrive as they were at switchover,
    and the destination's self-check finds no stale page."""
    require("vmigrate")
    reason = kvm_tracking_unavailable_reason(tracking)
    if reason:
        print(f"SKIP test_kvm_guest_migrates_live_with_each_dirty_tracking_mode[{tracking}]: "
              f"{reason}")
        pytest.skip(reason)
    spec = "hot=2M,verify"
    src = lab(ws, "src", 16, accel="kvm", workload=spec, tracking=tracking).start()
    dst = lab(ws, "dst", 16, accel="kvm", workload=spec, incoming="defer",
              start_paused=True).start()
    w0 = wait_passes(src, 3)
    want = "ring=4096" if tracking == "ring" else tracking
    assert w0["accel"] == "kvm" and w0["dirty-tracking"] == want, w0
    assert w0["violations"] == 0
    # Zero pages cost next to nothing: the passes are over the hot set (2 MiB), which
    # at 32 MiB/s the guest partly rewrites during each pass, and which fits the
    # downtime limit.
    si, src_w, _, _ = migrate_tracked_guest(src, dst, mem_mib=16, hot_mib=2, min_syncs=2,
                                            min_resent=1.2)
    print(f"{tracking}: {si['ram']['dirty-sync-count']} syncs, "
          f"{si['ram']['transferred']} bytes, {si.get('total-time')} ms, "
          f"ring-full exits {src_w['dirty-ring-full-exits']}, "
          f"ring overflows {src_w['dirty-ring-overflows']}")


@pytest.mark.parametrize("shared", [True, False], ids=["shm-file", "anonymous"])
def test_soft_guest_migrates_live_with_uffd_wp_tracking(ws, shared):
    """A soft guest whose dirty pages the kernel tracks (userfaultfd asynchronous
    write-protection read with PAGEMAP_SCAN; the vCPU threads mark nothing), migrated
    live at a bandwidth that lets it dirty pages during the transfer, with guest RAM in
    a shared memory file or anonymous. RAM and counters arrive as they were at
    switchover, and the destination's self-check finds no stale page."""
    require("vmigrate")
    spec = "hot=16M,rate=16M,verify"
    kw = {} if shared else {"shared": False, "ram_id": "ram"}
    src = lab(ws, "src", 64, workload=spec, tracking="uffd-wp", **kw).start()
    dst = lab(ws, "dst", 64, workload=spec, tracking="uffd-wp", incoming="defer",
              start_paused=True, **kw).start()
    w0 = wait_passes(src, 2)
    assert w0["accel"] == "soft" and w0["dirty-tracking"] == "uffd-wp", w0
    assert w0["violations"] == 0
    # At 32 MiB/s the first pass over the hot set (16 MiB) takes half a second, during
    # which the guest rewrites half of it; each pass halves what is left until it fits
    # the downtime limit, so the passes send pages the kernel reported page by page.
    si, _, arrived, after = migrate_tracked_guest(src, dst, mem_mib=64, hot_mib=16,
                                                  min_syncs=3, min_resent=1.4,
                                                  compare_ram=shared)
    assert arrived["dirty-tracking"] == "uffd-wp"
    assert after["running"]
    print(f"uffd-wp ({'shm file' if shared else 'anonymous'}): "
          f"{si['ram']['dirty-sync-count']} syncs, {si['ram']['normal']} pages sent, "
          f"{si.get('total-time')} ms, downtime {si.get('downtime')} ms")


@pytest.mark.parametrize("argv,needle", [
    (["--machine", "lab", "--accel", "soft", "--dirty-tracking", "ring"],
     "--dirty-tracking ring is a mode of --accel kvm; --accel soft offers bitmap, uffd-wp"),
    (["--machine", "lab", "--accel", "soft", "--dirty-tracking", "log-clear"],
     "is a mode of --accel kvm"),
    (["--machine", "lab", "--accel", "kvm", "--dirty-tracking", "uffd-wp"],
     "--dirty-tracking uffd-wp is a mode of --accel soft; --accel kvm offers auto"),
    (["--machine", "lab", "--accel", "kvm", "--dirty-tracking", "bitmap"],
     "is a mode of --accel soft"),
    (["--machine", "none", "--dirty-tracking", "uffd-wp"], "--dirty-tracking needs --machine lab"),
    (["--machine", "lab", "--accel", "soft", "--dirty-tracking", "uffd"], "known modes:"),
], ids=["soft-ring", "soft-log-clear", "kvm-uffd-wp", "kvm-bitmap", "none", "unknown"])
def test_dirty_tracking_mode_of_the_other_accelerator_is_refused(argv, needle):
    require("vmigrate")
    r = subprocess.run([harness.vmigrate_bin(), "vm", *argv],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode != 0
    assert needle in r.stderr, r.stderr
