"""A byte-level QMP client for the conformance tests: it sends exactly what it is given
(objects, or raw bytes that need not be JSON) and returns replies as parsed objects,
keeping events apart, so that the replies of QEMU and vmigrate can be compared."""
import json
import socket
import time


class RawQMP:
    def __init__(self, path, timeout=10, negotiate=True, enable=None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.events = []
        self.greeting = self.read_line()
        if negotiate:
            args = {"enable": enable} if enable else {}
            r = self.send({"execute": "qmp_capabilities", "arguments": args})
            # A QEMU monitor reached while QEMU starts up has been seen to greet a second
            # time in place of the reply: skip the repeat.
            while "QMP" in r:
                r = self.reply()
            assert r == {"return": {}}, r

    @classmethod
    def connect(cls, path, timeout=10, **kw):
        """Connects, retrying while the monitor socket is not there yet."""
        t0 = time.time()
        while True:
            try:
                return cls(path, **kw)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.time() - t0 > timeout:
                    raise
                time.sleep(0.02)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def read_line(self):
        """One line from the server, parsed; raises EOFError when the server closes."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError("monitor closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def reply(self):
        """The next reply that is not an event (events are kept in self.events)."""
        while True:
            msg = self.read_line()
            if "event" in msg and "timestamp" in msg:
                self.events.append(msg)
                continue
            return msg

    def write(self, data):
        if isinstance(data, (dict, list)):
            data = json.dumps(data).encode()
        elif isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def send(self, data):
        """Sends a message and returns its reply."""
        self.write(data)
        return self.reply()

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        return self.send(msg)

    def ok(self, name, **args):
        r = self.cmd(name, **args)
        assert "return" in r, f"{name} {args}: {r}"
        return r["return"]

    def hmp(self, line):
        r = self.cmd("human-monitor-command", **{"command-line": line})
        assert "return" in r, f"HMP {line!r}: {r}"
        return r["return"]

    def drain_events(self, wait=0.0):
        """Collects events that arrive within WAIT seconds."""
        self.sock.settimeout(max(wait, 0.001))
        try:
            while True:
                msg = self.read_line()
                self.events.append(msg)
        except (socket.timeout, BlockingIOError):
            pass
        finally:
            self.sock.settimeout(10)
        return self.events
