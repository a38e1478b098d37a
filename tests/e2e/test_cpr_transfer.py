"""cpr-transfer between QEMU 10.0.2 and vmigrate.

* The destination is started with two incoming options (the main URI and a JSON `cpr`
  channel on a unix socket) and waits for the CPR state before it maps guest RAM (its
  monitor is not up until then, as QEMU's is not). The source, in mode `cpr-transfer`,
  sends the CPR state on the `cpr` channel, waits for the destination to close it, then
  sends a main stream without RAM pages. Both ends map guest RAM from one shared file.
* Bad CPR state (a channel that closes early, a descriptor announced but not sent, a
  descriptor of the wrong size): the destination stops with a message naming it; a
  destination that drops the channel leaves the source failed and running.
"""
import array
import json
import os
import socket
import struct
import subprocess
import threading
import time

import pytest

import harness
from conftest import require

MIB = 16

PAIRS = [("qemu", "vmigrate"), ("vmigrate", "qemu"), ("vmigrate", "vmigrate")]
PAIR_IDS = [f"{s}-to-{d}" for s, d in PAIRS]


@pytest.fixture(scope="module")
def cpr_image(session_dir):
    return harness.Image(f"{session_dir}/image16-cpr.bin", MIB * harness.MiB, 41)


def cpr_channel(path):
    return {"channel-type": "cpr",
            "addr": {"transport": "socket", "type": "unix", "path": path}}


class CprMachine(harness.Machine):
    """A destination with a second incoming option: the `cpr` channel."""

    def __init__(self, ws, impl, name, cpr_path, **kw):
        super().__init__(ws, impl, name, **kw)
        self.cpr_path = cpr_path
        ws.machines.append(self)

    def argv(self):
        flag = "-incoming" if self.impl == "qemu" else "--incoming"
        return super().argv() + [flag, json.dumps(cpr_channel(self.cpr_path))]


def wait_listening(m, path, timeout=20):
    t0 = time.time()
    while not os.path.exists(path):
        assert m.proc.poll() is None and time.time() - t0 < timeout, m.describe()
        time.sleep(0.01)


def cpr_channels(main_path, cpr_path):
    """`migrate`'s channel list: the main stream and the cpr channel, both unix."""
    return [{"channel-type": "main",
             "addr": {"transport": "socket", "type": "unix", "path": main_path}},
            cpr_channel(cpr_path)]


def migrate_cpr(src, main_path, cpr_path):
    src.cmd("migrate-set-parameters", mode="cpr-transfer")
    src.cmd("migrate", channels=cpr_channels(main_path, cpr_path))
    return src.wait_migration(timeout=60)


@pytest.mark.parametrize("src_impl,dst_impl", PAIRS, ids=PAIR_IDS)
def test_cpr_transfer_hands_ram_over(ws, cpr_image, src_impl, dst_impl):
    require("qemu")
    mem_file = ws.shm_path("shared.ram")
    main_path, cpr_path = ws.path("main.sock"), ws.path("cpr.sock")
    # The destination maps the file first and then waits on the cpr channel.
    dst = CprMachine(ws, dst_impl, "dst", cpr_path, mem_mib=MIB,
                     incoming=f"unix:{main_path}", mem_file=mem_file)
    dst.start(connect=False)
    src = ws.vm(src_impl, "src", mem_mib=MIB, mem_file=mem_file).start(prefill=cpr_image.data)
    wait_listening(dst, cpr_path)
    si = migrate_cpr(src, main_path, cpr_path)
    assert si["status"] == "completed", si
    ram = si["ram"]
    assert ram["normal"] == 0 and ram["duplicate"] == 0, ram
    assert ram["transferred"] < harness.MiB, ram
    assert "downtime" in si, si
    dst.connect()
    dst.wait_runstate("running")
    assert dst.check_ram_pmemsave(cpr_image) is None
    assert src.runstate() == "postmigrate"


def test_source_fails_and_keeps_running_when_the_channel_is_dropped(ws):
    """A destination that accepts the cpr channel and closes it at once, with no main
    listener: the migration fails with a message, the guest keeps running."""
    require()
    cpr_path = ws.path("cpr.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(cpr_path)
    lst.listen(1)

    def drop():
        c, _ = lst.accept()
        c.close()
    t = threading.Thread(target=drop, daemon=True)
    t.start()
    src = ws.vm("vmigrate", "src", mem_mib=MIB).start()
    # As QEMU's, the CPR state is written before `migrate` returns: a close that beats
    # the write fails the command itself, a later one fails the migration. Either way
    # query-migrate ends `failed` with the reason.
    src.cmd("migrate-set-parameters", mode="cpr-transfer")
    r = src.raw("migrate", channels=cpr_channels(ws.path("nobody.sock"), cpr_path))
    if "error" in r:
        assert "cpr channel" in r["error"]["desc"], r
    si = src.wait_migration(timeout=60)
    t.join(5)
    lst.close()
    assert si["status"] == "failed", si
    assert si.get("error-desc"), si
    assert src.runstate() == "running"
    assert src.cmd("query-status")["running"] is True


def send_state(path, records, close_after=None):
    """Connects to a destination's cpr channel and sends a CPR state: RECORDS are
    (name, fd or None); CLOSE_AFTER cuts the byte stream short."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    head = struct.pack(">II", 0x51435052, 1)
    if close_after is not None:
        s.sendall(head[:close_after])
        s.close()
        return
    s.sendall(head)
    for name, fd in records:
        raw = name.encode() + b"\0"
        s.sendall(b"\x01" + struct.pack(">I", len(raw)) + raw + struct.pack(">i", 0))
        if fd is None:
            s.sendall(b" ")
        else:
            s.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    s.sendall(b"\x00")
    s.shutdown(socket.SHUT_WR)
    s.settimeout(10)
    try:
        s.recv(1)
    except OSError:
        pass
    s.close()


BAD_STATES = {
    "closes-early": (dict(close_after=6), "the state ends early"),
    "no-fd": (dict(fd=None), "no descriptor came with 'ram'"),
    "wrong-size": (dict(fd="small"), "is 4096 bytes, the block is"),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_destination_refuses_bad_state(ws, case):
    require()
    kw, want = BAD_STATES[case]
    cpr_path = ws.path("cpr.sock")
    dst = CprMachine(ws, "vmigrate", "dst", cpr_path, mem_mib=MIB, ram_id="ram",
                     shared=False, incoming=f"unix:{ws.path('main.sock')}")
    dst.start(connect=False)
    wait_listening(dst, cpr_path)
    if "close_after" in kw:
        send_state(cpr_path, [], close_after=kw["close_after"])
    elif kw["fd"] is None:
        send_state(cpr_path, [("ram", None)])
    else:
        small = os.memfd_create("cpr-small")
        os.ftruncate(small, 4096)
        try:
            send_state(cpr_path, [("ram", small)])
        finally:
            os.close(small)
    rc = dst.wait_exit(timeout=20)
    assert rc != 0, rc
    assert want in dst.stderr_text(), dst.stderr_text()


class FdMachine(CprMachine):
    """A destination whose guest RAM is not a file of its own: QEMU with a memfd backend
    (it maps the descriptor the CPR state names `m0`), vmigrate without --mem-path
    (it maps the descriptor it receives for its block)."""

    def argv(self):
        a = super().argv()
        if self.impl == "qemu":
            i = a.index("-machine")
            a[i:i + 2] = ["-object", f"memory-backend-memfd,id={self.ram_id},"
                                     f"size={self.mem_mib}M,share=on",
                          "-machine", f"none,memory-backend={self.ram_id}"]
        return a


@pytest.mark.parametrize("dst_impl", ["qemu", "vmigrate"])
def test_destination_maps_the_descriptor_it_receives(ws, cpr_image, dst_impl):
    """vmigrate's source hands over its RAM file by SCM_RIGHTS; a destination without a
    file of its own maps that descriptor and sees the source's RAM."""
    require("qemu")
    main_path, cpr_path = ws.path("main.sock"), ws.path("cpr.sock")
    dst = FdMachine(ws, dst_impl, "dst", cpr_path, mem_mib=MIB, ram_id="m0" if
                    dst_impl == "qemu" else "ram", shared=dst_impl == "qemu",
                    incoming=f"unix:{main_path}")
    if dst_impl == "qemu":
        dst.mem_file = None   # the memfd backend replaces the file
    dst.start(connect=False)
    wait_listening(dst, cpr_path)
    src = ws.vm("vmigrate", "src", mem_mib=MIB,
                ram_id="m0" if dst_impl == "qemu" else "ram").start(prefill=cpr_image.data)
    si = migrate_cpr(src, main_path, cpr_path)
    assert si["status"] == "completed", si
    assert si["ram"]["transferred"] < harness.MiB, si
    dst.connect()
    dst.wait_runstate("running")
    assert dst.check_ram_pmemsave(cpr_image) is None


def test_lab_guest_handed_over_keeps_its_self_check(ws):
    """A running soft lab guest with `verify`, handed to a new vmigrate process: the
    destination's guest goes on from the source's RAM and state with no violation."""
    require()
    mem_file = ws.shm_path("lab.ram")
    main_path, cpr_path = ws.path("main.sock"), ws.path("cpr.sock")
    spec = "hot=8M,rate=50M,verify"
    extra = ["--accel", "soft", "--cpus", "1", "--workload", spec]
    dst = CprMachine(ws, "vmigrate", "dst", cpr_path, mem_mib=MIB, machine="lab",
                     extra=extra, incoming=f"unix:{main_path}", mem_file=mem_file)
    dst.start(connect=False)
    wait_listening(dst, cpr_path)
    src = ws.vm("vmigrate", "src", mem_mib=MIB, machine="lab", extra=extra,
                mem_file=mem_file).start()
    before = harness.wait_passes(src, 2)
    assert before["violations"] == 0, before
    si = migrate_cpr(src, main_path, cpr_path)
    assert si["status"] == "completed", si
    assert si["ram"]["transferred"] < harness.MiB, si
    arrived_src = harness.workload(src)
    dst.connect()
    dst.wait_runstate("running")
    after = harness.wait_passes(dst, arrived_src["passes"] + 3)
    assert after["violations"] == 0, after
    assert after["pages-written"] > arrived_src["pages-written"], (arrived_src, after)


@pytest.mark.parametrize("dst_impl", ["qemu", "vmigrate"])
def test_pages_into_a_cpr_destination_are_refused(ws, dst_impl):
    """A destination that took its RAM with the CPR state takes no page of it: a plain
    precopy stream (mode normal) that carries pages fails the load with QEMU's text."""
    require("qemu")
    mem_file = ws.shm_path("shared.ram")
    main_path, cpr_path = ws.path("main.sock"), ws.path("cpr.sock")
    dst = CprMachine(ws, dst_impl, "dst", cpr_path, mem_mib=MIB,
                     incoming=f"unix:{main_path}", mem_file=mem_file)
    dst.start(connect=False)
    wait_listening(dst, cpr_path)
    send_state(cpr_path, [])
    src = ws.vm("vmigrate", "src", mem_mib=MIB, mem_file=ws.shm_path("other.ram")).start()
    t0 = time.time()
    while not os.path.exists(main_path):
        assert time.time() - t0 < 20, dst.describe()
        time.sleep(0.01)
    src.cmd("migrate", uri=f"unix:{main_path}")
    src.wait_migration(timeout=30)
    rc = dst.wait_exit(timeout=20)
    assert rc != 0, rc
    assert "block m0 should not be migrated !" in dst.stderr_text(), dst.stderr_text()


def test_cancel_while_waiting_for_the_destination(ws):
    """A destination that reads the CPR state but never closes the channel: the source
    waits in `setup`; migrate_cancel ends it `cancelled` and the guest keeps running."""
    require()
    cpr_path = ws.path("cpr.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(cpr_path)
    lst.listen(1)
    held = []
    t = threading.Thread(target=lambda: held.append(lst.accept()[0]), daemon=True)
    t.start()
    src = ws.vm("vmigrate", "src", mem_mib=MIB).start()
    src.cmd("migrate-set-parameters", mode="cpr-transfer")
    src.cmd("migrate", channels=cpr_channels(ws.path("main.sock"), cpr_path))
    time.sleep(0.3)
    assert src.query_migrate()["status"] == "setup"
    src.cmd("migrate_cancel")
    si = src.wait_migration(timeout=20)
    assert si["status"] == "cancelled", si
    assert src.runstate() == "running"
    for c in held:
        c.close()
    lst.close()
