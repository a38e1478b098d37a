"""COLO (`x-colo`): after the first migration the primary checkpoints its running
guest to a paused secondary every `x-checkpoint-delay` ms; `x-colo-lost-heartbeat`
makes either side go on alone.

The guests are `lab` soft guests with the self-checking `verify` workload, so a
secondary that took over from a half-applied or stale checkpoint shows violations.
"""
import socket
import struct
import threading
import time

import pytest

import harness
from harness import wait_passes, workload
from conftest import require

pytestmark = pytest.mark.vmigrate

SPEC = "hot=16M,rate=64M,verify"


def lab(ws, name, **kw):
    return ws.vm("vmigrate", name, mem_mib=64, machine="lab",
                 extra=["--accel", "soft", "--cpus", "1", "--workload", SPEC], **kw)


def checkpoints(m):
    return m.query_migrate().get("x-vmigrate-colo", {}).get("checkpoints", 0)


def wait_checkpoints(m, n, timeout=30):
    t0 = time.time()
    while time.time() - t0 < timeout:
        c = checkpoints(m)
        if c >= n:
            return c
        time.sleep(0.05)
    raise AssertionError(f"{m.name}: only {checkpoints(m)} checkpoints in {timeout}s: "
                         f"{m.query_migrate()}")


def colo_exits(m):
    m.event_names()
    return [e["data"] for e in m.events if e["event"] == "COLO_EXIT"]


def wait_colo_exit(m, timeout=10):
    t0 = time.time()
    while time.time() - t0 < timeout:
        exits = colo_exits(m)
        if exits:
            return exits
        m.raw("query-status")
        time.sleep(0.03)
    raise AssertionError(f"{m.name}: no COLO_EXIT in {timeout}s: {m.event_names()}")


def start_pair(ws, delay_ms=100, **caps):
    """A running primary and a secondary in COLO, with x-checkpoint-delay DELAY_MS
    (and CAPS on both sides)."""
    src = lab(ws, "primary").start()
    dst = lab(ws, "secondary", incoming="defer").start()
    wait_passes(src, 1)
    for m in (src, dst):
        m.set_caps(x_colo=True, events=True, **caps)
    src.set_params(max_bandwidth=0, x_checkpoint_delay=delay_ms)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = harness.socket_port(dst.query_migrate())
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    harness.wait_until_status(src, "colo", timeout=30)
    harness.wait_until_status(dst, "colo", timeout=30)
    return src, dst


def test_checkpoints_then_the_secondary_takes_over_when_the_primary_dies(ws):
    require("vmigrate")
    src, dst = start_pair(ws, delay_ms=100)
    assert src.cmd("query-colo-status") == {"mode": "primary", "last-mode": "none",
                                            "reason": "none"}
    assert dst.cmd("query-colo-status") == {"mode": "secondary", "last-mode": "none",
                                            "reason": "none"}
    assert dst.runstate() == "colo"
    # x-colo cannot be switched off in COLO.
    r = src.raw("migrate-set-capabilities",
                capabilities=[{"capability": "x-colo", "state": False}])
    assert r["error"]["desc"] == "There's a migration process in progress", r
    wait_checkpoints(src, 20)
    assert wait_checkpoints(dst, 20) >= 20
    w = workload(src)
    assert w["violations"] == 0 and w["passes"] > 1, w
    # The secondary's guest does not run between checkpoints.
    assert dst.cmd("query-status") == {"running": False, "status": "colo"}
    src.kill9()
    # QEMU's secondary waits for the heartbeat's verdict; so does vmigrate's.
    assert wait_colo_exit(dst) == [{"mode": "secondary", "reason": "error"}]
    assert dst.query_migrate()["status"] == "colo"
    t0 = time.monotonic()
    dst.cmd("x-colo-lost-heartbeat")
    assert dst.wait_migration(("completed", "failed"), timeout=10)["status"] == "completed"
    dst.wait_runstate("running")
    took = time.monotonic() - t0
    assert took < 5, f"failover took {took:.2f}s"
    assert dst.cmd("query-colo-status") == {"mode": "none", "last-mode": "secondary",
                                            "reason": "request"}
    at = workload(dst)
    after = wait_passes(dst, at["passes"] + 3)
    assert after["violations"] == 0, after
    names = dst.event_names()
    assert names.index("MIGRATION:colo") < names.index("MIGRATION:completed") \
        < names.index("RESUME"), names
    r = dst.raw("x-colo-lost-heartbeat")
    assert r["error"]["desc"] == "VM is not in COLO mode", r


@pytest.mark.parametrize("caps", [
    {"return_path": True},
    {"return_path": True, "switchover_ack": True},
], ids=["return-path", "return-path-switchover-ack"])
def test_colo_with_the_return_path_on_both_sides(ws, caps):
    """With `return-path` (and `switchover-ack`, whose ACK comes on it) on both sides,
    the first migration's return-path messages come back, then the secondary's
    CHECKPOINT_READY on the same connection with no SHUT between: COLO checkpoints,
    and the secondary takes over with its guest's self-check clean."""
    require("vmigrate")
    src, dst = start_pair(ws, delay_ms=100, **caps)
    wait_checkpoints(src, 8)
    assert wait_checkpoints(dst, 8) >= 8
    w = workload(src)
    assert w["violations"] == 0 and w["passes"] > 1, w
    names = src.event_names()
    assert names.index("MIGRATION:device") < names.index("MIGRATION:colo"), names
    src.kill9()
    assert wait_colo_exit(dst) == [{"mode": "secondary", "reason": "error"}]
    dst.cmd("x-colo-lost-heartbeat")
    assert dst.wait_migration(("completed", "failed"), timeout=10)["status"] == "completed"
    dst.wait_runstate("running")
    at = workload(dst)
    after = wait_passes(dst, at["passes"] + 3)
    assert after["violations"] == 0, after


def test_the_primary_goes_on_alone_when_the_secondary_dies(ws):
    require("vmigrate")
    src, dst = start_pair(ws, delay_ms=100)
    wait_checkpoints(src, 5)
    dst.kill9()
    assert wait_colo_exit(src) == [{"mode": "primary", "reason": "error"}]
    assert src.query_migrate()["status"] == "colo"
    src.cmd("x-colo-lost-heartbeat")
    assert src.wait_migration(("completed", "failed"), timeout=10)["status"] == "completed"
    src.wait_runstate("running")
    assert src.cmd("query-colo-status") == {"mode": "none", "last-mode": "primary",
                                            "reason": "request"}
    at = workload(src)
    after = wait_passes(src, at["passes"] + 3)
    assert after["violations"] == 0, after
    assert "MIGRATION:completed" in src.event_names()


def test_a_heartbeat_lost_on_the_primary_ends_colo_on_request(ws):
    require("vmigrate")
    src, dst = start_pair(ws, delay_ms=100)
    wait_checkpoints(src, 3)
    src.cmd("x-colo-lost-heartbeat")
    r = src.raw("x-colo-lost-heartbeat")
    # Either the failover is still under way or COLO is over already.
    assert "error" in r and r["error"]["desc"] in (
        "COLO failover is already activated", "VM is not in COLO mode"), r
    assert src.wait_migration(("completed", "failed"), timeout=10)["status"] == "completed"
    assert wait_colo_exit(src) == [{"mode": "primary", "reason": "request"}]
    src.wait_runstate("running")
    # The secondary lost its primary and waits for its own verdict.
    assert wait_colo_exit(dst) == [{"mode": "secondary", "reason": "error"}]
    dst.cmd("x-colo-lost-heartbeat")
    assert dst.wait_migration(("completed", "failed"), timeout=10)["status"] == "completed"
    after = wait_passes(dst, workload(dst)["passes"] + 2)
    assert after["violations"] == 0, after


def test_checkpoint_delay_changes_take_effect_at_once(ws):
    require("vmigrate")
    src, dst = start_pair(ws, delay_ms=20000)
    time.sleep(0.5)
    c0 = checkpoints(src)
    assert c0 == 0, "a checkpoint came before the 20 s delay"
    src.set_params(x_checkpoint_delay=100)
    # At once: the change itself starts a checkpoint.
    wait_checkpoints(src, c0 + 1, timeout=2)
    c1 = checkpoints(src)
    time.sleep(2.0)
    fast = checkpoints(src) - c1
    src.set_params(x_checkpoint_delay=1000)
    c2 = checkpoints(src)
    time.sleep(3.0)
    slow = checkpoints(src) - c2
    # 100 ms: up to 20 in 2 s; 1000 ms: about 3 in 3 s (one at the change).
    assert fast >= 8, f"{fast} checkpoints in 2 s at 100 ms"
    assert slow <= 5, f"{slow} checkpoints in 3 s at 1000 ms"
    assert fast / 2.0 > 2 * (slow / 3.0), (fast, slow)
    assert dst.cmd("query-migrate-parameters")["x-checkpoint-delay"] == 20000
    assert src.cmd("query-migrate-parameters")["x-checkpoint-delay"] == 1000
    # As QEMU's, the secondary takes capability changes in COLO (its outgoing side is
    # idle); the primary does not.
    dst.set_caps(x_colo=False)
    r = src.raw("migrate-set-capabilities",
                capabilities=[{"capability": "x-colo", "state": False}])
    assert r["error"]["desc"] == "There's a migration process in progress", r
    dst.cmd("x-colo-lost-heartbeat")
    assert dst.wait_migration(("completed", "failed"), timeout=10)["status"] == "completed"


def test_texts_outside_colo_match_qemu(ws):
    require("vmigrate")
    vms = [ws.vm("vmigrate", "v", mem_mib=16).start()]
    if harness.qemu_missing_reason() is None:
        vms.append(ws.vm("qemu", "q", mem_mib=16).start())
    for m in vms:
        r = m.raw("x-colo-lost-heartbeat")
        assert r["error"]["desc"] == "VM is not in COLO mode", (m.impl, r)
        assert m.cmd("query-colo-status") == {"mode": "none", "last-mode": "none",
                                              "reason": "none"}, m.impl
        hmp = m.cmd("human-monitor-command", **{"command-line": "x_colo_lost_heartbeat"})
        assert hmp == "Error: VM is not in COLO mode\r\n", (m.impl, hmp)


def test_enable_colo_needs_x_colo_on_the_destination(ws):
    require("vmigrate")
    src = lab(ws, "primary").start()
    dst = lab(ws, "secondary", incoming="defer").start()
    src.set_caps(x_colo=True)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0", **{"exit-on-error": False})
    port = harness.socket_port(dst.query_migrate())
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = dst.wait_migration(("failed", "colo", "completed"), timeout=20)
    assert info["status"] == "failed", info
    assert "ENABLE_COLO command come in migration stream, but x-colo capability is not " \
           "set" in info["error-desc"], info
    # The stream broke before the primary's first migration was out: an ordinary
    # failed migration, the guest running on.
    assert src.wait_migration(timeout=20)["status"] == "failed"
    src.wait_runstate("running")
    assert colo_exits(src) == []
    assert workload(src)["violations"] == 0


def test_a_hostile_secondary_ends_colo_without_harming_the_primary(ws):
    """A fake secondary answers the first checkpoint request with a message that does
    not exist: the primary reports it, stays responsive and goes on alone on request."""
    require("vmigrate")
    src = lab(ws, "primary").start()
    wait_passes(src, 1)
    src.set_caps(x_colo=True, events=True)
    src.set_params(max_bandwidth=0, x_checkpoint_delay=50)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    got = bytearray()

    def fake_secondary():
        conn, _ = lsock.accept()
        conn.settimeout(10)
        with conn:
            # Read the first migration until the primary waits (nothing for 0.5 s).
            conn.settimeout(0.5)
            while True:
                try:
                    b = conn.recv(1 << 20)
                except socket.timeout:
                    break
                if not b:
                    return
                got.extend(b)
            conn.sendall(struct.pack(">I", 0))      # CHECKPOINT_READY
            conn.settimeout(10)
            req = conn.recv(4)
            got.extend(req)
            conn.sendall(struct.pack(">I", 99))     # no such message
            time.sleep(1)

    t = threading.Thread(target=fake_secondary, daemon=True)
    t.start()
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{lsock.getsockname()[1]}")
    assert wait_colo_exit(src, timeout=20) == [{"mode": "primary", "reason": "error"}]
    t.join(5)
    lsock.close()
    assert got[:4] == b"QEVM", bytes(got[:16])
    assert got[-4:] == struct.pack(">I", 1), "the last message was not CHECKPOINT_REQUEST"
    assert src.query_migrate()["status"] == "colo"
    assert "99 is not a COLO message" in src.stderr_text()
    src.cmd("x-colo-lost-heartbeat")
    assert src.wait_migration(timeout=10)["status"] == "completed"
    src.wait_runstate("running")
    after = wait_passes(src, workload(src)["passes"] + 2)
    assert after["violations"] == 0


def test_checkpoint_ready_before_the_stream_ends_fails_the_migration(ws):
    """With `return-path`, a fake secondary that sends CHECKPOINT_READY while the first
    migration is still streaming (slowly, by max-bandwidth) fails that migration with
    a reason naming it; the primary's guest runs on untouched."""
    require("vmigrate")
    src = lab(ws, "primary").start()
    wait_passes(src, 1)
    src.set_caps(x_colo=True, events=True, return_path=True)
    src.set_params(max_bandwidth=4 << 20, x_checkpoint_delay=50)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)

    def fake_secondary():
        conn, _ = lsock.accept()
        with conn:
            conn.settimeout(10)
            conn.recv(1 << 16)
            conn.sendall(struct.pack(">I", 0))      # CHECKPOINT_READY, too early
            try:
                while conn.recv(1 << 20):
                    pass
            except OSError:
                pass

    t = threading.Thread(target=fake_secondary, daemon=True)
    t.start()
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{lsock.getsockname()[1]}")
    info = src.wait_migration(timeout=30)
    t.join(5)
    lsock.close()
    assert info["status"] == "failed", info
    assert "CHECKPOINT_READY before the migration stream ended" in info["error-desc"], info
    assert src.wait_runstate("running") == "running"
    after = wait_passes(src, workload(src)["passes"] + 2)
    assert after["violations"] == 0, after


def bad_checkpoint(ram_id, page):
    """A checkpoint whose RAM part is whole (PAGE of RAM block m0 at 0, full of PAGE
    bytes) but whose device state names a device this machine lacks."""
    ram = struct.pack(">BI", 3, ram_id)                        # ram END section
    ram += struct.pack(">Q", 0x08) + bytes([2]) + b"m0" + page  # PAGE at 0, block m0
    ram += struct.pack(">Q", 0x10)                             # EOS
    ram += struct.pack(">BI", 0x7e, ram_id) + b"\x00"           # footer, EOF
    state = struct.pack(">BI", 4, 99) + bytes([5]) + b"bogus" + struct.pack(">II", 0, 1)
    state += b"\x00"
    return (struct.pack(">I", 3) + ram + struct.pack(">IQ", 4, len(state)) + state)


@pytest.mark.parametrize("fault", ["wrong-message", "bad-device-state"])
def test_a_bad_checkpoint_leaves_the_secondary_on_its_last_one(ws, fault):
    """A relay passes the first migration and one real checkpoint through, then cuts
    the primary off and sends the secondary a checkpoint request followed by the wrong
    message, or by a whole checkpoint whose device state does not load: the secondary
    names the fault, keeps its last complete checkpoint (guest RAM untouched) and runs
    from it with no violation."""
    require("vmigrate")
    src = lab(ws, "primary").start()
    dst = lab(ws, "secondary", incoming="defer").start()
    wait_passes(src, 1)
    for m in (src, dst):
        m.set_caps(x_colo=True, events=True)
    src.set_params(max_bandwidth=0, x_checkpoint_delay=200)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    dport = harness.socket_port(dst.query_migrate())
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    cut = threading.Event()
    state = {}

    def relay():
        a, _ = lsock.accept()
        b = socket.create_connection(("127.0.0.1", dport))
        state["dst"] = b
        state["head"] = bytearray()

        def forward(x, y):
            try:
                while not cut.is_set():
                    d = x.recv(1 << 20)
                    if not d or cut.is_set():
                        break
                    if len(state["head"]) < 4096:
                        state["head"].extend(d[:4096])
                    y.sendall(d)
            except OSError:
                pass

        t = threading.Thread(target=forward, args=(a, b), daemon=True)
        t.start()
        back = 0
        # Secondary → primary: READY, then REPLY, RECEIVED, LOADED for the first
        # checkpoint; cut after those 16 bytes.
        while back < 16:
            d = b.recv(16 - back)
            if not d:
                return
            a.sendall(d)
            back += len(d)
        cut.set()
        a.shutdown(socket.SHUT_RDWR)
        a.close()
        t.join(5)

    t = threading.Thread(target=relay, daemon=True)
    t.start()
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{lsock.getsockname()[1]}")
    t.join(30)
    lsock.close()
    assert cut.is_set(), "the relay never saw the first checkpoint through"
    harness.wait_until_status(dst, "colo", timeout=5)
    assert wait_checkpoints(dst, 1) == 1
    b = state["dst"]
    page0 = harness.read_file(dst.mem_file, 0, 4096)
    b.sendall(struct.pack(">I", 1))             # CHECKPOINT_REQUEST
    assert b.recv(4) == struct.pack(">I", 2)    # CHECKPOINT_REPLY
    if fault == "wrong-message":
        b.sendall(struct.pack(">I", 5))         # VMSTATE_RECEIVED: out of order
        text = "Unexpected COLO message 5, expected 3"
    else:
        # The ram section's id, from its START header in the first migration.
        head = bytes(state["head"])
        at = head.index(b"\x03ram\x00\x00\x00\x00\x00\x00\x00\x04")
        ram_id = struct.unpack(">I", head[at - 4:at])[0]
        b.sendall(bad_checkpoint(ram_id, b"\xab" * 4096))
        assert b.recv(4) == struct.pack(">I", 5)    # VMSTATE_RECEIVED, then no LOADED
        text = "Unknown savevm section or instance 'bogus' 0"
    assert wait_colo_exit(dst) == [{"mode": "secondary", "reason": "error"}]
    assert text in dst.stderr_text()
    assert dst.query_migrate()["status"] == "colo"
    assert harness.read_file(dst.mem_file, 0, 4096) == page0, \
        "guest RAM changed by a checkpoint that was not applied"
    dst.cmd("x-colo-lost-heartbeat")
    assert dst.wait_migration(("completed", "failed"), timeout=10)["status"] == "completed"
    after = wait_passes(dst, workload(dst)["passes"] + 3)
    assert after["violations"] == 0, after
    b.close()


def ram_sha(m):
    import hashlib
    return hashlib.sha256(m.ram()).hexdigest()


def test_vmigrate_primary_checkpoints_into_a_qemu_secondary(ws):
    """QEMU 10.0's secondary (`-M none`) takes vmigrate's checkpoints: its RAM after a
    checkpoint is the primary's, and it takes over on x-colo-lost-heartbeat."""
    require("vmigrate", "qemu")
    src = ws.vm("vmigrate", "primary", mem_mib=64,
                extra=["--workload", "hot=4M,rate=40M"]).start()
    dst = ws.vm("qemu", "secondary", mem_mib=64, incoming="defer").start()
    for m in (src, dst):
        m.set_caps(x_colo=True, events=True)
    src.set_params(max_bandwidth=0, x_checkpoint_delay=20000)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = harness.socket_port(dst.query_migrate())
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    harness.wait_until_status(src, "colo", timeout=30)
    harness.wait_until_status(dst, "colo", timeout=30)
    # A delay change checkpoints at once; a few of them, with the guest writing.
    for n in range(1, 4):
        src.set_params(x_checkpoint_delay=20000)
        wait_checkpoints(src, n, timeout=10)
        time.sleep(0.1)
    # Freeze the primary's RAM, then one more checkpoint carries the last writes.
    src.cmd("stop")
    frozen = ram_sha(src)
    src.set_params(x_checkpoint_delay=20000)
    wait_checkpoints(src, 4, timeout=10)
    assert ram_sha(dst) == frozen, "QEMU's secondary RAM differs from the checkpoint"
    assert dst.cmd("query-colo-status")["mode"] == "secondary"
    src.kill9()
    assert wait_colo_exit(dst) == [{"mode": "secondary", "reason": "error"}]
    dst.cmd("x-colo-lost-heartbeat")
    assert dst.wait_migration(("completed", "failed"), timeout=10)["status"] == "completed"
    dst.wait_runstate("running")
    assert ram_sha(dst) == frozen
    assert dst.cmd("query-colo-status") == {"mode": "none", "last-mode": "secondary",
                                            "reason": "request"}


def test_vmigrate_primary_with_return_path_checkpoints_into_a_qemu_secondary(ws):
    """As above with `return-path` and `switchover-ack` on both sides: QEMU's secondary
    answers on the return path (SWITCHOVER_ACK), then sends CHECKPOINT_READY on the
    same connection without SHUT; the checkpoints arrive and it takes over."""
    require("vmigrate", "qemu")
    src = ws.vm("vmigrate", "primary", mem_mib=64,
                extra=["--workload", "hot=4M,rate=40M"]).start()
    dst = ws.vm("qemu", "secondary", mem_mib=64, incoming="defer").start()
    for m in (src, dst):
        m.set_caps(x_colo=True, events=True, return_path=True, switchover_ack=True)
    src.set_params(max_bandwidth=0, x_checkpoint_delay=20000)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = harness.socket_port(dst.query_migrate())
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    harness.wait_until_status(src, "colo", timeout=30)
    harness.wait_until_status(dst, "colo", timeout=30)
    for n in range(1, 6):
        src.set_params(x_checkpoint_delay=20000)
        wait_checkpoints(src, n, timeout=10)
        time.sleep(0.05)
    src.cmd("stop")
    frozen = ram_sha(src)
    src.set_params(x_checkpoint_delay=20000)
    wait_checkpoints(src, 6, timeout=10)
    assert ram_sha(dst) == frozen, "QEMU's secondary RAM differs from the checkpoint"
    src.kill9()
    assert wait_colo_exit(dst) == [{"mode": "secondary", "reason": "error"}]
    dst.cmd("x-colo-lost-heartbeat")
    assert dst.wait_migration(("completed", "failed"), timeout=10)["status"] == "completed"
    dst.wait_runstate("running")
    assert ram_sha(dst) == frozen


def test_a_qemu_primary_completes_and_a_vmigrate_secondary_waits(ws):
    """QEMU 10.0's primary sends ENABLE_COLO but, on this build, completes its first
    migration instead of entering COLO (its status passes through `device`, which its
    COLO switch does not expect) and closes the connection. A vmigrate secondary does
    what QEMU's own does: it enters COLO, loses its primary (COLO_EXIT error), and runs
    the migrated guest once told."""
    require("vmigrate", "qemu")
    src = ws.vm("qemu", "primary", mem_mib=64).start()
    dst = ws.vm("vmigrate", "secondary", mem_mib=64, incoming="defer").start()
    src.write_ram(bytes(range(256)) * 4096, offset=1 << 20)
    for m in (src, dst):
        m.set_caps(x_colo=True, events=True)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = harness.socket_port(dst.query_migrate())
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration(timeout=30)["status"] == "completed"
    assert wait_colo_exit(dst) == [{"mode": "secondary", "reason": "error"}]
    assert dst.query_migrate()["status"] == "colo"
    assert dst.runstate() == "colo"
    dst.cmd("x-colo-lost-heartbeat")
    assert dst.wait_migration(("completed", "failed"), timeout=10)["status"] == "completed"
    dst.wait_runstate("running")
    assert ram_sha(dst) == ram_sha(src)


def test_a_qemu_primary_with_return_path_fails_on_checkpoint_ready(ws):
    """QEMU 10.0's primary with `return-path` reads the secondary's CHECKPOINT_READY
    (be32 0) on its return-path thread as a return-path message of type 0 and fails
    the migration; its guest runs on. The vmigrate secondary behaves as QEMU's does
    (no SHUT before COLO, CHECKPOINT_READY on the same connection), loses its
    primary, and runs the migrated guest once told."""
    require("vmigrate", "qemu")
    src = ws.vm("qemu", "primary", mem_mib=64).start()
    dst = ws.vm("vmigrate", "secondary", mem_mib=64, incoming="defer").start()
    src.write_ram(bytes(range(256)) * 4096, offset=1 << 20)
    for m in (src, dst):
        m.set_caps(x_colo=True, events=True, return_path=True)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = harness.socket_port(dst.query_migrate())
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    si = src.wait_migration(timeout=30)
    assert si["status"] == "failed", si
    assert si["error-desc"] == "Received invalid message 0x0000 length 0x0000", si
    assert src.wait_runstate("running") == "running"
    assert wait_colo_exit(dst) == [{"mode": "secondary", "reason": "error"}]
    dst.cmd("x-colo-lost-heartbeat")
    assert dst.wait_migration(("completed", "failed"), timeout=10)["status"] == "completed"
    dst.wait_runstate("running")
    assert ram_sha(dst) == ram_sha(src)
