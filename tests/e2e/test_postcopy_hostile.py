"""Hostile peers in postcopy.

* A hostile SOURCE, written here byte by byte, talking to a vmigrate destination: it
  enters postcopy (ADVISE, the `ram` START section, PACKAGED { LISTEN, RUN }) and then
  sends pages out of range, the same page twice, discards and recovery commands that
  name blocks the destination does not have, packages whose length lies, or closes the
  connection in the middle of a page. The destination must end `failed` with an
  error-desc that names what was wrong (and the byte offset), within a bound, with no
  panic and a monitor that keeps answering.
* A hostile DESTINATION, a socket here that swallows the stream and writes return-path
  messages, talking to a vmigrate source: requests past the end of a block, for an
  unknown block, at an unaligned offset, a flood of requests, a message type that does
  not exist, a length that lies. The source fails the migration with an error-desc that
  names the problem, its monitor answers, its memory stays bounded, and when the failure
  comes before the destination runs the guest, the source VM runs again. QEMU's source
  fails on these too (checked on a few cases, marked harness_check, with its texts),
  also in postcopy, where it pauses only for a broken connection. Two deliberate
  differences: QEMU queues page requests without a bound, vmigrate fails the migration
  past MAX_QUEUED_PAGE_REQUESTS (4096); and after a failure in postcopy QEMU runs the
  source VM again, vmigrate keeps it stopped since the guest ran on the destination.
"""
import os
import re
import socket
import struct
import threading
import time

import pytest

import harness
from harness import MiB
from conftest import require

pytestmark = pytest.mark.vmigrate

MEM_MIB = 16
PAGE = os.sysconf("SC_PAGE_SIZE")
BLOCK_LEN = MEM_MIB * MiB
RAM_SECTION = 2
# Every hostile input must be over within this many seconds.
BOUND_S = 20

# --------------------------------------------------------------------------------------
# stream encoding (reference: qemu-stream-format.md §2, §5, §9)

CMD_OPEN_RETURN_PATH, CMD_PING, CMD_POSTCOPY_ADVISE, CMD_POSTCOPY_LISTEN = 1, 2, 3, 4
CMD_POSTCOPY_RUN, CMD_POSTCOPY_RAM_DISCARD, CMD_PACKAGED = 5, 6, 7
CMD_POSTCOPY_RESUME, CMD_RECV_BITMAP = 9, 10
RAM_ZERO, RAM_MEM_SIZE, RAM_PAGE, RAM_EOS, RAM_CONTINUE = 0x2, 0x4, 0x8, 0x10, 0x20


def counted(s):
    b = s.encode()
    return bytes([len(b)]) + b


def command(cmd, payload=b""):
    return struct.pack(">BHH", 0x08, cmd, len(payload)) + payload


def packaged(blob, claimed=None):
    n = len(blob) if claimed is None else claimed
    return command(CMD_PACKAGED, struct.pack(">I", n)) + blob


def discard(block, ranges):
    body = bytes([0]) + counted(block) + b"\0"
    for start, length in ranges:
        body += struct.pack(">QQ", start, length)
    return command(CMD_POSTCOPY_RAM_DISCARD, body)


def footer(sid=RAM_SECTION):
    return struct.pack(">BI", 0x7E, sid)


def page(offset, data=None, block="ram"):
    """A PAGE record (data) or a ZERO record (None), naming BLOCK unless it is None."""
    flags = RAM_PAGE if data is not None else RAM_ZERO
    if block is None:
        flags |= RAM_CONTINUE
    rec = struct.pack(">Q", offset | flags) + (counted(block) if block is not None else b"")
    return rec + (data if data is not None else b"\0")


def part(records, sid=RAM_SECTION):
    return (struct.pack(">BI", 0x02, sid) + records + struct.pack(">Q", RAM_EOS)
            + footer(sid))


def precopy_head(block_len=BLOCK_LEN):
    """Header, configuration, return path, PING(1), ADVISE, the `ram` START section."""
    b = struct.pack(">II", 0x5145564D, 3)
    b += b"\x07" + struct.pack(">I", 4) + b"none"
    b += command(CMD_OPEN_RETURN_PATH) + command(CMD_PING, struct.pack(">I", 1))
    b += command(CMD_POSTCOPY_ADVISE, struct.pack(">QQ", PAGE, PAGE))
    b += struct.pack(">BI", 0x01, RAM_SECTION) + counted("ram") + struct.pack(">II", 0, 4)
    b += struct.pack(">Q", block_len | RAM_MEM_SIZE) + counted("ram") + struct.pack(">Q", block_len)
    b += struct.pack(">Q", RAM_EOS) + footer()
    return b


def listen_and_run():
    return packaged(command(CMD_POSTCOPY_LISTEN) + command(CMD_PING, struct.pack(">I", 3))
                    + command(CMD_POSTCOPY_RUN))


# --------------------------------------------------------------------------------------
# the hostile source against a vmigrate destination

def postcopy_destination(ws):
    dst = ws.vm("vmigrate", "dst", mem_mib=MEM_MIB, ram_id="ram", shared=False,
                incoming="defer").start()
    r = dst.raw("migrate-set-capabilities",
                capabilities=[{"capability": "postcopy-ram", "state": True},
                              {"capability": "events", "state": True}])
    if "error" in r and "userfaultfd" in r["error"]["desc"]:
        pytest.skip(f"no userfaultfd for this user: {r['error']['desc']}")
    assert "return" in r, r
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0", **{"exit-on-error": False})
    return dst


class HostileSource:
    """A connection to the destination; what it says back is read and kept."""

    def __init__(self, dst):
        port = harness.socket_port(dst.query_migrate())
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=BOUND_S)
        self.back = bytearray()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        try:
            while True:
                b = self.sock.recv(65536)
                if not b:
                    return
                self.back += b
        except OSError:
            return

    def send(self, data):
        try:
            self.sock.sendall(data)
        except OSError:
            pass  # the destination may close first: what it says is checked instead

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


    def shut(self, timeout=5):
        """The value of the destination's SHUT message, once it came (None if not)."""
        deadline = time.time() + timeout
        while True:
            b, at = bytes(self.back), 0
            while at + 4 <= len(b):
                kind, n = struct.unpack_from(">HH", b, at)
                if kind == 1 and n == 4 and at + 8 <= len(b):
                    return struct.unpack_from(">I", b, at + 4)[0]
                at += 4 + n
            if time.time() > deadline:
                return None
            time.sleep(0.02)


def expect_failed(dst, pattern, t0, src=None):
    """The destination ends `failed` within BOUND_S with an error-desc matching PATTERN
    and a byte offset; no panic; its monitor keeps answering. With SRC, the destination
    also told it on the return path (SHUT with a non-zero value)."""
    di = dst.wait_migration(("completed", "failed"), timeout=BOUND_S)
    took = time.time() - t0
    assert di["status"] == "failed", f"hostile stream accepted: {di}\n{dst.describe()}"
    text = di.get("error-desc", "")
    assert re.search(pattern, text), f"error-desc does not name the problem (/{pattern}/): {text!r}"
    assert harness.mentioned_offsets(text), f"error-desc gives no byte offset: {text!r}"
    assert took < BOUND_S, f"took {took:.1f} s"
    assert "panicked" not in dst.stderr_text(), dst.stderr_text()
    assert dst.alive(), dst.describe()
    assert dst.runstate() in ("inmigrate", "internal-error", "paused"), dst.runstate()
    if src is not None:
        v = src.shut()
        assert v not in (None, 0), f"return path ended without SHUT(failure): {bytes(src.back)[-64:].hex()}"
    return di


def start_postcopy(ws, dst, before_run=b""):
    """Connects and brings the destination into postcopy-active."""
    src = HostileSource(dst)
    src.send(precopy_head() + before_run + listen_and_run())
    harness.wait_until_status(dst, "postcopy-active", timeout=BOUND_S)
    return src


def test_page_past_the_end_of_the_block(ws):
    require()
    dst = postcopy_destination(ws)
    src = start_postcopy(ws, dst)
    t0 = time.time()
    src.send(part(page(BLOCK_LEN, b"\x55" * PAGE)))
    expect_failed(dst, rf"Illegal RAM offset (0x)?{BLOCK_LEN:x}\b", t0, src)
    # Nothing stays blocked on a page that will never come.
    assert len(dst.ram_pmemsave()) == BLOCK_LEN


def test_same_page_twice(ws):
    """QEMU places postcopy pages with UFFDIO_COPY, which fails with EEXIST on a page
    already in place, and the load fails: so here."""
    require()
    dst = postcopy_destination(ws)
    src = start_postcopy(ws, dst)
    t0 = time.time()
    src.send(part(page(PAGE, b"\x11" * PAGE) + page(PAGE, b"\x22" * PAGE, block=None)))
    expect_failed(dst, rf"page (0x)?{PAGE:x} of block 'ram' was already placed", t0, src)


def test_zero_page_then_same_page_again(ws):
    require()
    dst = postcopy_destination(ws)
    src = start_postcopy(ws, dst)
    t0 = time.time()
    src.send(part(page(3 * PAGE)) + part(page(3 * PAGE, b"\x33" * PAGE)))
    expect_failed(dst, rf"page (0x)?{3 * PAGE:x} of block 'ram' was already placed", t0, src)


@pytest.mark.parametrize("case", ["unknown-block", "past-the-end", "overflowing"])
def test_discard_that_lies(ws, case):
    require()
    dst = postcopy_destination(ws)
    src = HostileSource(dst)
    bad, pattern = {
        "unknown-block": (discard("nosuch", [(0, PAGE)]), r"Failed to find block 'nosuch'"),
        "past-the-end": (discard("ram", [(BLOCK_LEN - PAGE, 2 * PAGE)]), r"Overrun block 'ram'"),
        "overflowing": (discard("ram", [(PAGE, (1 << 64) - PAGE)]), r"Overrun block 'ram'"),
    }[case]
    t0 = time.time()
    src.send(precopy_head() + bad + listen_and_run())
    expect_failed(dst, pattern, t0, src)
    assert dst.runstate() == "inmigrate"


def test_recv_bitmap_for_an_unknown_block(ws):
    """QEMU: "CMD_RECV_BITMAP: RAM block 'nosuch' not found"."""
    require()
    dst = postcopy_destination(ws)
    src = start_postcopy(ws, dst)
    t0 = time.time()
    src.send(command(CMD_RECV_BITMAP, counted("nosuch")))
    expect_failed(dst, r"RECV_BITMAP.*RAM block 'nosuch' not found", t0, src)


def test_resume_outside_recovery(ws):
    """POSTCOPY_RESUME while postcopy runs normally: only a recovering destination may take
    it. QEMU only warns ("illegal resume received") and goes on; vmigrate refuses a
    stream that sends it, naming the command and its offset."""
    require()
    dst = postcopy_destination(ws)
    src = start_postcopy(ws, dst)
    t0 = time.time()
    src.send(command(CMD_POSTCOPY_RESUME))
    expect_failed(dst, r"illegal POSTCOPY_RESUME received: postcopy is not being recovered", t0, src)


@pytest.mark.parametrize("case", ["longer-than-the-stream", "over-the-cap", "shorter-than-its-commands"])
def test_package_whose_length_lies(ws, case):
    require()
    dst = postcopy_destination(ws)
    src = HostileSource(dst)
    inner = (command(CMD_POSTCOPY_LISTEN) + command(CMD_PING, struct.pack(">I", 3))
             + command(CMD_POSTCOPY_RUN))
    if case == "longer-than-the-stream":
        bad, pattern = packaged(inner, claimed=len(inner) + 1000), r"(?i)packaged stream"
    elif case == "over-the-cap":
        bad, pattern = packaged(inner, claimed=0xFFFFFFFF), r"Unreasonably large packaged state"
    else:
        # The package ends after LISTEN: PING and RUN come after it, on the main stream
        # that the listen thread now reads, where RUN has no place.
        bad, pattern = packaged(inner, claimed=5), r"package ends after POSTCOPY_LISTEN without POSTCOPY_RUN"
    t0 = time.time()
    src.send(precopy_head() + bad)
    src.close()
    expect_failed(dst, pattern, t0, src)


def test_stream_closed_in_the_middle_of_a_page(ws):
    require()
    dst = postcopy_destination(ws)
    src = start_postcopy(ws, dst)
    t0 = time.time()
    whole = part(page(7 * PAGE, b"\x77" * PAGE))
    src.send(whole[:5 + 8 + 4 + 100])  # PART header, record header, name, 100 bytes
    src.close()
    # Once the guest runs on the destination, a stream that breaks off is a network
    # failure as far as it can tell: it pauses to wait for a recovery, as QEMU does,
    # and says where the stream ended.
    di = harness.wait_until_status(dst, "postcopy-paused", timeout=BOUND_S)
    took = time.time() - t0
    text = di.get("error-desc", "")
    assert re.search(r"(?i)stream ended early", text), text
    assert harness.mentioned_offsets(text), f"error-desc gives no byte offset: {text!r}"
    assert took < BOUND_S, f"took {took:.1f} s"
    assert "panicked" not in dst.stderr_text(), dst.stderr_text()
    assert dst.alive(), dst.describe()
    assert dst.cmd("query-status")["status"], "monitor does not answer"


# --------------------------------------------------------------------------------------
# a hostile destination against a vmigrate source

RP_SHUT, RP_PONG, RP_REQ_PAGES_ID, RP_REQ_PAGES = 1, 2, 3, 4


def rp(kind, payload=b"", claimed=None):
    n = len(payload) if claimed is None else claimed
    return struct.pack(">HH", kind, n) + payload


def req_pages_id(start, length, block):
    return rp(RP_REQ_PAGES_ID, struct.pack(">QI", start, length) + counted(block))


def req_pages(start, length):
    return rp(RP_REQ_PAGES, struct.pack(">QI", start, length))


class HostileDestination:
    """Listens; swallows whatever the source sends; writes what it is told to."""

    def __init__(self):
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.received = 0
        self.conn = None
        self.accepted = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        self.lsock.settimeout(BOUND_S)
        try:
            self.conn, _ = self.lsock.accept()
        except OSError:
            return
        self.accepted.set()
        try:
            while True:
                b = self.conn.recv(1 << 20)
                if not b:
                    return
                self.received += len(b)
        except OSError:
            return

    def send(self, data):
        assert self.accepted.wait(BOUND_S), "the source never connected"
        try:
            self.conn.sendall(data)
        except OSError:
            pass

    def close(self):
        for s in (self.conn, self.lsock):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass


@pytest.fixture(scope="module")
def image16(session_dir):
    return harness.Image(os.path.join(session_dir, "image16-pch.bin"), MEM_MIB * MiB, 11)


def postcopy_source(ws, image, impl="vmigrate"):
    """A running source holding IMAGE, migrating with postcopy-ram to a hostile
    destination at 1 MiB/s (precopy cannot finish within the test)."""
    src = ws.vm(impl, "src", mem_mib=MEM_MIB).start()
    src.write_ram(image.data)
    src.set_caps(events=True, postcopy_ram=True)
    src.set_params(max_bandwidth=1 * MiB, max_postcopy_bandwidth=1 * MiB)
    hd = HostileDestination()
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{hd.port}")
    assert hd.accepted.wait(BOUND_S), "the source never connected"
    harness.wait_until_status(src, "active", timeout=BOUND_S)
    hd.send(rp(RP_PONG, struct.pack(">I", 1)))
    return src, hd


def rss_anon_kib(m):
    """Anonymous memory in use (guest RAM is a shared file, not counted)."""
    with open(f"/proc/{m.proc.pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/PID/status")


def expect_source_failed(src, pattern, t0, running):
    si = src.wait_migration(("completed", "failed", "cancelled"), timeout=BOUND_S)
    assert si["status"] == "failed", f"hostile return path accepted: {si}"
    text = si.get("error-desc", "")
    assert re.search(pattern, text), f"error-desc does not name the problem (/{pattern}/): {text!r}"
    assert time.time() - t0 < BOUND_S
    assert "panicked" not in src.stderr_text(), src.stderr_text()
    assert src.alive(), src.describe()
    want = "running" if running else "postmigrate"
    assert src.wait_runstate(want, timeout=5) == want
    return si


# case: (message, what vmigrate's error-desc says, what QEMU's says)
PRECOPY_CASES = {
    "unknown-type": (rp(99), r"(?i)unknown type 99",
                     r"Received invalid message 0x0063 length 0x0000"),
    "type-0": (rp(0), r"(?i)unknown type 0", r"Received invalid message 0x0000 length 0x0000"),
    # PONG is 4 bytes
    "pong-length-lies": (rp(RP_PONG, b"\0" * 9), r"(?i)type 2 with length 9, expected 4",
                         r"Received 'PONG' message \(0x0002\) with ?incorrect length 9 expecting 4"),
    # a length past what the source accepts (QEMU's buffer is 512 bytes)
    "length-over-512": (rp(RP_REQ_PAGES_ID, b"", claimed=0xFFFF), r"(?i)length 65535 exceeds 512",
                        r"incorrect length 65535"),
    # REQ_PAGES naming no block
    "req-pages-without-block": (req_pages(0, PAGE), r"names no block", r"no previous block"),
}

# QEMU's source as a check of the expectations, on a few cases (each takes it seconds).
QEMU_CHECKED = ("unknown-type", "req-pages-without-block", "unknown-block")


def source_cases(cases):
    out = []
    for case in sorted(cases):
        out.append(pytest.param(case, "vmigrate", id=f"{case}-vmigrate"))
        if case in QEMU_CHECKED:
            out.append(pytest.param(case, "qemu", marks=pytest.mark.harness_check,
                                    id=f"{case}-harness_check-qemu"))
    return out


@pytest.mark.parametrize("case,impl", source_cases(PRECOPY_CASES))
def test_hostile_return_path_before_postcopy(ws, image16, case, impl):
    """Before the switch the destination has not run the guest: the migration fails and
    the source VM goes on running, its RAM intact. QEMU's source fails alike."""
    require(impl)
    src, hd = postcopy_source(ws, image16, impl)
    bad, pattern, qemu_pattern = PRECOPY_CASES[case]
    t0 = time.time()
    hd.send(bad)
    expect_source_failed(src, pattern if impl == "vmigrate" else qemu_pattern, t0, running=True)
    assert src.check_ram(image16) is None
    hd.close()


def test_flood_of_requests_before_postcopy(ws, image16):
    """100 000 REQ_PAGES while precopy runs: the queue is capped, the migration fails
    with that reason, the source's memory does not grow with the flood, and its VM
    goes on running."""
    require()
    src, hd = postcopy_source(ws, image16)
    anon0 = rss_anon_kib(src)
    flood = req_pages_id(0, PAGE, "m0") + req_pages(PAGE, PAGE) * 100_000
    t0 = time.time()
    hd.send(flood)
    expect_source_failed(src, r"more than \d+ page requests outstanding", t0, running=True)
    assert rss_anon_kib(src) - anon0 < 16 * 1024, (anon0, rss_anon_kib(src))
    hd.close()


def switched(ws, image, impl="vmigrate"):
    """A source in postcopy-active (the destination 'runs' the guest)."""
    src, hd = postcopy_source(ws, image, impl)
    src.cmd("migrate-start-postcopy")
    harness.wait_until_status(src, "postcopy-active", timeout=BOUND_S)
    return src, hd


# case: (message, what vmigrate's error-desc says, what QEMU's says)
POSTCOPY_CASES = {
    "past-the-end": (req_pages_id(BLOCK_LEN, PAGE, "m0"),
                     r"Page request (0x)?1000000\+(0x)?1000 is not whole pages inside RAM block 'm0'",
                     r"MIG_RP_MSG_REQ_PAGES request overrun, start=1000000 len=1000"),
    "straddling-the-end": (req_pages_id(BLOCK_LEN - PAGE, 2 * PAGE, "m0"),
                           r"is not whole pages inside RAM block 'm0'",
                           r"MIG_RP_MSG_REQ_PAGES request overrun, start=fff000 len=2000"),
    "offset-overflows": (req_pages_id((1 << 64) - PAGE, PAGE, "m0"),
                         r"is not whole pages inside RAM block 'm0'",
                         r"MIG_RP_MSG_REQ_PAGES request overrun, start=fffffffffffff000"),
    "unknown-block": (req_pages_id(0, PAGE, "nosuch"), r"Page request for unknown RAM block 'nosuch'",
                      r"MIG_RP_MSG_REQ_PAGES has no block 'nosuch'"),
    "unaligned": (req_pages_id(PAGE + 1, PAGE, "m0"), r"is not whole pages inside RAM block 'm0'",
                  r"Misaligned page request, start:1001"),
    "zero-length": (req_pages_id(0, 0, "m0"), r"is not whole pages inside RAM block 'm0'",
                    r"MIG_RP_MSG_REQ_PAGES request overrun, start=0 len=0"),
    "unknown-type": (rp(99), r"(?i)unknown type 99", r"Received invalid message 0x0063 length 0x0000"),
    "length-lies": (rp(RP_REQ_PAGES, b"\0" * 8), r"(?i)type 4 with length 8, expected 12",
                    r"Received 'REQ_PAGES' message \(0x0004\) with ?incorrect length 8 expecting 12"),
}


@pytest.mark.parametrize("case,impl", source_cases(POSTCOPY_CASES))
def test_hostile_return_path_in_postcopy(ws, image16, case, impl):
    """After POSTCOPY_RUN the guest is the destination's: the source fails the migration
    (QEMU too: it pauses postcopy only when the connection breaks, not on a bad message);
    the monitor answers. vmigrate keeps its VM stopped (`postmigrate`): the guest ran on
    the destination since, so running it here again would fork it. QEMU 10.0.2 does run
    it again, as after any failure of a migration that started with the VM running."""
    require(impl)
    src, hd = switched(ws, image16, impl)
    bad, pattern, qemu_pattern = POSTCOPY_CASES[case]
    t0 = time.time()
    hd.send(bad)
    if impl == "vmigrate":
        expect_source_failed(src, pattern, t0, running=False)
    else:
        expect_source_failed(src, qemu_pattern, t0, running=True)
    hd.close()


def test_flood_of_requests_in_postcopy(ws, image16):
    """100 000 requests for valid pages while postcopy runs: more than the capped queue
    holds, so the migration fails with that reason, at once (the requests queued before
    are not served at the rate limit first); memory does not grow with the flood, and
    the monitor answers all along."""
    require()
    src, hd = switched(ws, image16)
    anon0 = rss_anon_kib(src)
    flood = req_pages_id(0, PAGE, "m0") + b"".join(
        req_pages((i % (MEM_MIB * MiB // PAGE)) * PAGE, PAGE) for i in range(100_000))
    t0 = time.time()
    sender = threading.Thread(target=hd.send, args=(flood,), daemon=True)
    sender.start()
    while True:
        st = src.query_migrate()["status"]
        if st != "postcopy-active":
            break
        assert time.time() - t0 < BOUND_S, "the flood did not end the migration"
        time.sleep(0.02)
    took = time.time() - t0
    si = expect_source_failed(src, r"more than \d+ page requests outstanding", t0, running=False)
    # 4096 queued requests at max-postcopy-bandwidth 1 MiB/s would take seconds.
    assert took < 5, f"the source failed {took:.1f} s after the flood: {si}"
    assert rss_anon_kib(src) - anon0 < 16 * 1024, (anon0, rss_anon_kib(src))
    hd.close()
