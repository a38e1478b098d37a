"""A loopback TCP relay that injects one fault into a migration's connections: it cuts,
stalls or corrupts connection number CONN (in the order it accepted them: the main
channel first, then multifd or preempt channels) in one direction ("c2s": source to
destination, "s2c": the return path), when that direction reaches byte AT, or when a
MARKER (bytes) first passes, or ("tail") when it has gone quiet with the last chunk
held back (the end of a stream).

    cut      both sockets of the connection are shut down and closed, as a broken network
    stall    nothing more is relayed in that direction (the sender's buffers fill up)
    corrupt  the byte at the trigger point is inverted; everything else is relayed
"""
import select
import socket
import threading
import time


class Fault:
    def __init__(self, conn=0, direction="c2s", action="cut", at=None, marker=None,
                 tail=False, idle=1.0, after=0):
        assert action in ("cut", "stall", "corrupt")
        assert (at is not None) + (marker is not None) + tail == 1
        self.conn, self.direction, self.action = conn, direction, action
        self.at, self.marker, self.tail, self.idle = at, marker, tail, idle
        # tail: held back only once AFTER bytes passed (a TLS handshake waits for
        # replies, and its quiet moments are not the end).
        self.after = after

    def __repr__(self):
        where = (f"byte {self.at}" if self.at is not None
                 else f"marker {self.marker!r}" if self.marker is not None else "tail")
        return f"{self.action} conn{self.conn} {self.direction} at {where}"


class FaultProxy:
    """The relay. With FAULT None it injects nothing by itself: `close` is then the
    network failure, at a moment of the test's choosing."""

    def __init__(self, target_port, fault=None):
        self.target = target_port
        self.fault = fault
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.conns = []          # [(client, server)] in accept order
        self.fired = threading.Event()
        self.fired_at = None     # (byte offset, time)
        self.relayed = {}        # (conn, direction) -> bytes relayed
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            try:
                s = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                c.close()
                continue
            with self.lock:
                if self.closed:
                    c.close()
                    s.close()
                    return
                n = len(self.conns)
                self.conns.append((c, s))
            for a, b, d in ((c, s, "c2s"), (s, c, "s2c")):
                threading.Thread(target=self._pump, args=(n, a, b, d), daemon=True).start()

    def _fire(self, offset):
        self.fired_at = (offset, time.time())
        self.fired.set()

    def _cut(self, n):
        for sock in self.conns[n]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _pump(self, n, a, b, d):
        f = self.fault
        mine = f is not None and f.conn == n and f.direction == d
        done = 0
        window = b""
        held = b""
        try:
            while True:
                if mine and f.tail and not self.fired.is_set() and done >= f.after:
                    r, _, _ = select.select([a], [], [], f.idle)
                    if not r and held:
                        # Quiet with a chunk held back: that chunk is the stream's end.
                        self._fire(done)
                        self._cut(n)
                        return
                data = a.recv(1 << 16)
                if not data:
                    break
                if mine and not self.fired.is_set():
                    pos = None
                    if f.at is not None and done + len(data) > f.at:
                        pos = f.at - done
                    elif f.marker is not None:
                        i = (window + data).find(f.marker)
                        if i >= 0:
                            pos = max(0, i - len(window))
                        window = (window + data)[-(len(f.marker) - 1):]
                    elif f.tail and done + len(data) > f.after:
                        if held:
                            b.sendall(held)
                        done += len(held)
                        held = data
                        continue
                    if pos is not None:
                        self._fire(done + pos)
                        if f.action == "corrupt":
                            data = data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:]
                        else:
                            b.sendall(data[:pos])
                            self._count(n, d, pos)
                            if f.action == "cut":
                                self._cut(n)
                                return
                            while not self.closed:   # stall: relay nothing more
                                time.sleep(0.05)
                            return
                b.sendall(data)
                done += len(data)
                self._count(n, d, len(data))
        except OSError:
            # One end is gone (a process exited, or the other pump cut): both sockets
            # close, so a writer blocked on the other end gets a reset, as it would
            # from the peer's host.
            self._cut(n)
            return
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _count(self, n, d, k):
        with self.lock:
            self.relayed[(n, d)] = self.relayed.get((n, d), 0) + k

    def cut_now(self, conn=None):
        """The fault now, by the test's clock (a moment rather than a byte): cuts
        connection CONN (the fault's own by default)."""
        n = self.fault.conn if conn is None else conn
        self._fire(self.relayed.get((n, self.fault.direction), 0))
        self._cut(n)

    def close(self):
        """Breaks every connection and stops listening."""
        with self.lock:
            self.closed = True
        try:
            self.listener.close()
        except OSError:
            pass
        for n in range(len(self.conns)):
            self._cut(n)
