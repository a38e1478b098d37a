"""Migration modes on vmigrate: blockers registered per mode (`vm --migration-blocker
MODE:TEXT`) and QEMU's `cpr-reboot` (the VM stops when the migration starts, is saved
to a file and loads into a new process started with `-incoming defer` in the same mode),
between vmigrate and QEMU 10.0.2 in both directions."""
import os
import time

import pytest

import harness
from conftest import require
from rawqmp import RawQMP

pytestmark = pytest.mark.vmigrate

CPR_RAM = ("Memory region ram is not compatible with CPR. share=on is required for "
           "memory-backend objects, and aux-ram-share=on is required.")


def blocked(c):
    return c.ok("query-migrate").get("blocked-reasons", [])


def set_mode(c, mode):
    c.ok("migrate-set-parameters", mode=mode)


def wait_status(c, want, timeout=30):
    t0 = time.time()
    info = {}
    while time.time() - t0 < timeout:
        info = c.ok("query-migrate")
        if info.get("status") in want:
            return info
        time.sleep(0.02)
    raise AssertionError(f"migration status {info.get('status')!r}, wanted {want}")


def test_blocker_blocks_only_its_mode(ws):
    require("vmigrate")
    reason = "Blocked for reboot: test device"
    m = ws.vm("vmigrate", "blk", mem_mib=16, ram_id="ram", shared=False,
              extra=["--migration-blocker", f"cpr-reboot:{reason}"]).start(connect=False)
    c = RawQMP.connect(m.qmp_path)
    out = ws.path("normal.bin")

    # mode normal: not blocked, not listed, and the migration runs
    assert "blocked-reasons" not in c.ok("query-migrate")
    assert "Outgoing migration blocked" not in c.hmp("info migrate")

    # mode cpr-reboot: listed, and it is migrate's error
    set_mode(c, "cpr-reboot")
    assert blocked(c) == [reason]
    assert f"Outgoing migration blocked:\r\n  {reason}\r\n" in c.hmp("info migrate")
    r = c.cmd("migrate", uri=f"file:{ws.path('reboot.bin')}")
    assert r == {"error": {"class": "GenericError", "desc": reason}}, r
    assert c.hmp(f"migrate file:{ws.path('reboot.bin')}") == f"Error: {reason}\r\n"
    assert not os.path.exists(ws.path("reboot.bin"))
    assert "status" not in c.ok("query-migrate")

    # mode cpr-transfer: only the RAM blocker QEMU registers for RAM that is not shared
    set_mode(c, "cpr-transfer")
    assert blocked(c) == [CPR_RAM]

    # back to normal: the blocker is gone from the list and does not block
    set_mode(c, "normal")
    assert "blocked-reasons" not in c.ok("query-migrate")
    c.ok("migrate", uri=f"file:{out}")
    info = wait_status(c, ("completed", "failed"))
    assert info["status"] == "completed", info
    assert "blocked-reasons" not in info
    assert c.ok("query-status")["status"] == "postmigrate"
    set_mode(c, "cpr-reboot")
    assert c.ok("query-migrate")["blocked-reasons"] == [reason]


def test_newest_blocker_is_reported(ws):
    require("vmigrate")
    m = ws.vm("vmigrate", "blk2", mem_mib=16, ram_id="m0", shared=True,
              extra=["--migration-blocker", "all:first",
                     "--migration-blocker", "cpr-reboot:second"]).start(connect=False)
    c = RawQMP.connect(m.qmp_path)
    assert blocked(c) == ["first"]
    assert c.cmd("migrate", uri="tcp:127.0.0.1:1")["error"]["desc"] == "first"
    set_mode(c, "cpr-reboot")
    # listed oldest first; migrate names the newest, as QEMU does
    assert blocked(c) == ["first", "second"]
    assert c.cmd("migrate", uri=f"file:{ws.path('x.bin')}")["error"]["desc"] == "second"
    # RAM in a shared file: no CPR blocker of its own
    set_mode(c, "cpr-transfer")
    assert blocked(c) == ["first"]


def test_bad_blocker_option_is_refused(ws):
    require("vmigrate")
    m = ws.vm("vmigrate", "blk3", mem_mib=16, ram_id="ram", shared=False,
              extra=["--migration-blocker", "cpr-exec:x"]).start(connect=False)
    assert m.proc.wait(timeout=20) != 0
    assert "unknown migration mode 'cpr-exec'" in m.stderr_text()


# ------------------------------------------------------------------------------------
# cpr-reboot


def save_cpr_reboot(ws, impl, image, name, running=True):
    """Saves a VM holding IMAGE in mode cpr-reboot to a file; returns (path, events,
    query-migrate, run state)."""
    src = ws.vm(impl, name, mem_mib=image.size >> 20).start(connect=False,
                                                             prefill=image.data)
    c = RawQMP.connect(src.qmp_path)
    if not running:
        c.ok("stop")
    c.ok("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    set_mode(c, "cpr-reboot")
    c.events.clear()
    path = ws.path(f"{name}.cpr")
    c.ok("migrate", uri=f"file:{path}")
    info = wait_status(c, ("completed", "failed", "cancelled"))
    events = []
    for e in c.drain_events(0.3):
        if e["event"] == "MIGRATION":
            events.append(e["data"]["status"])
        elif e["event"] in ("STOP", "RESUME"):
            events.append(e["event"])
    state = c.ok("query-status")["status"]
    # a saved VM cannot migrate again until it is continued
    r = c.cmd("migrate", uri=f"file:{path}.again")
    assert r["error"]["desc"] == \
        "Can't migrate the vm that was paused due to previous migration", r
    c.close()
    return path, events, info, state


def load_cpr_reboot(ws, impl, path, mem_mib, name):
    """Loads PATH into a new process started with incoming defer in mode cpr-reboot;
    returns (machine, query-migrate, run state)."""
    dst = ws.vm(impl, name, mem_mib=mem_mib, incoming="defer").start(connect=False)
    c = RawQMP.connect(dst.qmp_path)
    set_mode(c, "cpr-reboot")
    c.ok("migrate-incoming", uri=f"file:{path}", **{"exit-on-error": False})
    info = wait_status(c, ("completed", "failed"))
    state = c.ok("query-status")["status"]
    c.close()
    return dst, info, state


@pytest.mark.parametrize("running", [True, False], ids=["running", "paused"])
def test_cpr_reboot_save_stops_first_and_loads_everywhere(ws, small_image, running):
    require("qemu", "vmigrate")
    mib = small_image.size >> 20
    vpath, vevents, vinfo, vstate = save_cpr_reboot(ws, "vmigrate", small_image, "vsrc",
                                                    running)
    qpath, qevents, qinfo, qstate = save_cpr_reboot(ws, "qemu", small_image, "qsrc",
                                                    running)
    assert vinfo["status"] == "completed", vinfo
    assert qinfo["status"] == "completed", qinfo
    # the VM stops before the migration is active, and ends in postmigrate
    want = ["setup", "STOP", "active", "device", "completed"] if running else \
        ["setup", "active", "device", "completed"]
    assert qevents == want, qevents
    assert vevents == want, vevents
    assert vstate == qstate == "postmigrate"
    # the whole save counts as downtime, as in QEMU
    for info in (vinfo, qinfo):
        assert info["ram"]["precopy-bytes"] == 0, info
        assert abs(info["downtime"] - info["total-time"]) <= 5, info
        assert info["ram"]["total"] == small_image.size

    runstate = "running" if running else "paused"
    for src_impl, path in (("vmigrate", vpath), ("qemu", qpath)):
        for dst_impl in ("vmigrate", "qemu"):
            dst, info, state = load_cpr_reboot(ws, dst_impl, path, mib,
                                               f"{src_impl}to{dst_impl}")
            assert info["status"] == "completed", (src_impl, dst_impl, info,
                                                   dst.stderr_tail())
            assert state == runstate, (src_impl, dst_impl, state)
            diff = dst.check_ram(small_image)
            assert diff is None, f"{src_impl} -> {dst_impl}: {diff}"


def test_cpr_reboot_refusals(ws):
    require("vmigrate")
    m = ws.vm("vmigrate", "refuse", mem_mib=16, ram_id="ram", shared=False).start(
        connect=False)
    c = RawQMP.connect(m.qmp_path)
    set_mode(c, "cpr-reboot")
    # QEMU's transport rules still apply first
    r = c.cmd("migrate", uri="foo:bar")
    assert r["error"]["desc"] == "unknown migration protocol: foo:bar", r
    # postcopy-ram is taken, and `migrate` refuses it in this mode, as QEMU does
    c.ok("migrate-set-capabilities",
         capabilities=[{"capability": "postcopy-ram", "state": True}])
    r = c.cmd("migrate", uri=f"file:{ws.path('cpr.bin')}")
    assert r["error"]["desc"] == "Cannot use postcopy with CPR", r
    c.ok("migrate-set-capabilities",
         capabilities=[{"capability": "postcopy-ram", "state": False}])
    # background-snapshot is taken, and refused by the mode at `migrate`
    c.ok("migrate-set-capabilities",
         capabilities=[{"capability": "background-snapshot", "state": True}])
    r = c.cmd("migrate", uri=f"file:{ws.path('cpr.bin')}")
    assert r["error"]["desc"] == "Cannot use background snapshot with CPR", r
    c.ok("migrate-set-capabilities",
         capabilities=[{"capability": "background-snapshot", "state": False}])
    # x-colo is taken, and refused by the mode at `migrate`
    c.ok("migrate-set-capabilities",
         capabilities=[{"capability": "x-colo", "state": True}])
    r = c.cmd("migrate", uri=f"file:{ws.path('cpr.bin')}")
    assert r["error"]["desc"] == "Cannot use COLO with CPR", r
    c.ok("migrate-set-capabilities",
         capabilities=[{"capability": "x-colo", "state": False}])
    # dirty-bitmaps would be refused by the mode ("Cannot use postcopy with CPR"), but
    # vmigrate does not offer it
    r = c.cmd("migrate-set-capabilities",
              capabilities=[{"capability": "dirty-bitmaps", "state": True}])
    assert r["error"]["desc"] == \
        "Capability 'dirty-bitmaps' is not supported by vmigrate yet"
    assert c.ok("query-status")["status"] == "running"
    assert "status" not in c.ok("query-migrate")


def test_cpr_transfer_checks_as_qemu(ws):
    require("vmigrate")
    m = ws.vm("vmigrate", "xfer", mem_mib=16, ram_id="m0", shared=True).start(
        connect=False)
    c = RawQMP.connect(m.qmp_path)
    c.ok("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    set_mode(c, "cpr-transfer")
    unix = {"transport": "socket", "type": "unix", "path": ws.path("cpr.sock")}
    main = {"channel-type": "main", "addr": unix}
    assert c.cmd("migrate", uri="tcp:127.0.0.1:1")["error"]["desc"] == \
        "missing 'cpr' migration channel"
    assert c.cmd("migrate", uri=f"file:{ws.path('x')}")["error"]["desc"] == \
        "Migration requires streamable transport (eg unix)"
    c.events.clear()
    inet = {"transport": "socket", "type": "inet", "host": "127.0.0.1", "port": "1"}
    r = c.cmd("migrate", channels=[main, {"channel-type": "cpr", "addr": inet}])
    assert r["error"]["desc"] == "bad cpr channel address; must be unix", r
    assert c.ok("query-migrate") == {"status": "failed",
                                     "error-desc": "bad cpr channel address; must be unix"}
    statuses = [e["data"]["status"] for e in c.drain_events(0.2) if e["event"] == "MIGRATION"]
    assert statuses == ["setup", "failed"]
    # Nobody listens on the cpr socket: QEMU's connect error, at once, and `failed`.
    r = c.cmd("migrate", channels=[main, {"channel-type": "cpr", "addr": unix}])
    want = f"Failed to connect to '{unix['path']}': No such file or directory"
    assert r["error"]["desc"] == want, r
    assert c.ok("query-migrate") == {"status": "failed", "error-desc": want}
    assert c.ok("query-status")["status"] == "running"
