"""TLS with x509 credentials between QEMU 10.0.2 and vmigrate, both directions:
`tls-creds-x509` objects from the command line and QMP, the host name check, a client
certificate checked against `tls-authz`, multifd channels and the return path inside
TLS; the bytes on the wire are checked to be ciphertext. Failures (missing or wrong
credentials, a name that does not match, an unknown CA, a refused client, a silent
peer) end with the same message QEMU gives, the destination keeps listening, and the
source keeps its guest."""
import os
import socket
import threading
import time

import pytest

import harness
import tls_certs
from conftest import require

MIB = 32
PAIRS = [
    pytest.param("vmigrate", "vmigrate", marks=pytest.mark.vmigrate, id="vmigrate-to-vmigrate"),
    pytest.param("qemu", "vmigrate", marks=pytest.mark.vmigrate, id="qemu-to-vmigrate"),
    pytest.param("vmigrate", "qemu", marks=pytest.mark.vmigrate, id="vmigrate-to-qemu"),
]
SOURCES = [
    pytest.param("qemu", marks=pytest.mark.harness_check, id="qemu"),
    pytest.param("vmigrate", marks=pytest.mark.vmigrate, id="vmigrate"),
]
DESTINATIONS = SOURCES


@pytest.fixture(scope="module")
def tls_image():
    return harness.make_image(MIB << 20, 23)[0]


def creds(pki, endpoint, which=None, verify_peer=True, ident="tls0"):
    which = which or endpoint
    return (f"tls-creds-x509,id={ident},dir={os.path.join(pki, which)},endpoint={endpoint},"
            f"verify-peer={'on' if verify_peer else 'off'}")


def esc(text):
    """A value inside -object / --object: commas doubled."""
    return text.replace(",", ",,")


AUTHZ_OK = f"authz-simple,id=az0,identity={esc(tls_certs.CLIENT_DN)}"


class Recorder:
    """A TCP relay that keeps every byte the source sends, for checking that what
    crosses the wire is not the plaintext stream."""

    def __init__(self, target_port):
        self.target = target_port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.sent = []
        self.connections = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            u = socket.create_connection(("127.0.0.1", self.target))
            buf = bytearray()
            self.sent.append(buf)
            threading.Thread(target=self._pump, args=(c, u, buf), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, None), daemon=True).start()

    @staticmethod
    def _pump(a, b, keep):
        try:
            while True:
                d = a.recv(1 << 16)
                if not d:
                    break
                if keep is not None:
                    keep += d
                b.sendall(d)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_WR if s is b else socket.SHUT_RD)
                except OSError:
                    pass

    def close(self):
        self._stop = True
        self.listener.close()


def start_pair(ws, pki, src_impl, dst_impl, data, dst_objects=None, src_objects=None):
    src = ws.vm(src_impl, "src", mem_mib=MIB,
                objects=src_objects if src_objects is not None else [creds(pki, "client")])
    src.start()
    src.write_ram(data)
    src.cmd("stop")
    dst = ws.vm(dst_impl, "dst", mem_mib=MIB, incoming="defer",
                objects=dst_objects if dst_objects is not None
                else [creds(pki, "server"), AUTHZ_OK]).start()
    return src, dst


@pytest.mark.parametrize("multifd", [False, True], ids=["main", "multifd3"])
@pytest.mark.parametrize("src_impl,dst_impl", PAIRS)
def test_tls_migration(ws, pki, tls_image, src_impl, dst_impl, multifd):
    """Migrate over TLS through a recording relay: completed both sides, RAM equal, the
    client certificate accepted by tls-authz, and no 4 KiB page of guest RAM, nor the
    stream's magic, visible in what crossed the wire."""
    require("qemu")
    src, dst = start_pair(ws, pki, src_impl, dst_impl, tls_image)
    for m in (src, dst):
        m.set_caps(events=True, **({"multifd": True, "return_path": True} if multifd else {}))
        m.set_params(tls_creds="tls0", **({"multifd_channels": 3} if multifd else {}))
    dst.set_params(tls_authz="az0")
    src.set_params(max_bandwidth=0, tls_hostname="localhost")
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    rec = Recorder(harness.socket_port(dst.query_migrate()))
    try:
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{rec.port}")
        si = src.wait_migration(timeout=120)
        di = dst.wait_migration(("completed", "failed"), timeout=60)
    finally:
        rec.close()
    assert si.get("status") == "completed", f"source: {si}\n{ws.diagnostics()}"
    assert di.get("status") == "completed", f"destination: {di}\n{ws.diagnostics()}"
    assert dst.ram() == tls_image, "destination RAM differs from the source"
    assert rec.connections == (4 if multifd else 1)
    wire = b"".join(bytes(b) for b in rec.sent)
    assert len(wire) > 0
    assert b"QEVM" not in wire, "the stream header crossed the wire in clear"
    page = harness.PAGE
    pages = [tls_image[i:i + page] for i in range(0, len(tls_image), page * 97)]
    distinct = [p for p in pages if len(set(p)) > 16]
    assert distinct, "the image has no distinctive pages to look for"
    for p in distinct:
        assert p[:64] not in wire, "guest RAM crossed the wire in clear"


def fail_source(ws, pki, src_impl, dst_impl, src_params, uri=None, dst_objects=None,
                src_objects=None, dst_params=None):
    """A migration that must fail at the source; returns (source info, dst)."""
    src, dst = start_pair(ws, pki, src_impl, dst_impl, bytes(MIB << 20),
                          dst_objects=dst_objects, src_objects=src_objects)
    dst.set_params(tls_creds="tls0", **(dst_params or {}))
    if uri is None:
        dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
        uri = f"tcp:127.0.0.1:{harness.socket_port(dst.query_migrate())}"
    else:
        dst.cmd("migrate-incoming", uri=uri)
    src.set_params(**src_params)
    src.cmd("migrate", uri=uri)
    si = src.wait_migration(("completed", "failed"), timeout=60)
    assert si["status"] == "failed", f"source: {si}\n{ws.diagnostics()}"
    assert src.runstate() == "paused", "the source's run state changed"
    return si, src, dst


SOURCE_ERRORS = [
    ("missing", {"tls_creds": "nosuch"}, None, "No TLS credentials with id 'nosuch'"),
    ("not-creds", {"tls_creds": "az0"}, None, "Object with id 'az0' is not TLS credentials"),
    ("wrong-endpoint", {"tls_creds": "srv0"}, None,
     "Expected TLS credentials for a client endpoint"),
    ("hostname", {"tls_creds": "tls0", "tls_hostname": "other.example"}, None,
     "Certificate does not match the hostname other.example"),
    ("unknown-ca", {"tls_creds": "tls0", "tls_hostname": "localhost"}, "rogue",
     "The certificate hasn't got a known issuer"),
    ("unix-no-hostname", {"tls_creds": "tls0"}, "unix",
     "No hostname for certificate validation"),
]


@pytest.mark.parametrize("case,params,variant,message", SOURCE_ERRORS,
                         ids=[c[0] for c in SOURCE_ERRORS])
@pytest.mark.parametrize("src_impl", SOURCES)
def test_source_errors_match_qemu(ws, pki, src_impl, case, params, variant, message):
    """Each source-side failure ends `failed` with QEMU's text, the guest unchanged."""
    require("qemu")
    src_objects = [creds(pki, "client"), creds(pki, "server", ident="srv0"),
                   "authz-simple,id=az0,identity=x"]
    dst_objects = [creds(pki, "server", which="rogue" if variant == "rogue" else "server")]
    uri = f"unix:{ws.path('tls.sock')}" if variant == "unix" else None
    si, src, dst = fail_source(ws, pki, src_impl, "qemu", params, uri=uri,
                               dst_objects=dst_objects, src_objects=src_objects)
    assert si.get("error-desc") == message, si


@pytest.mark.parametrize("dst_impl", DESTINATIONS)
def test_refused_client_leaves_destination_listening(ws, pki, dst_impl):
    """tls-authz refuses the client: the source fails, the destination reports the
    certificate's subject in QEMU's words and keeps waiting in `setup`, monitor up."""
    require("qemu")
    objs = [creds(pki, "server"), "authz-simple,id=az0,identity=CN=someone-else"]
    si, src, dst = fail_source(ws, pki, "vmigrate", dst_impl,
                               {"tls_creds": "tls0", "tls_hostname": "localhost"},
                               dst_objects=objs, dst_params={"tls_authz": "az0"})
    deadline = time.time() + 10
    want = f"TLS x509 authz check for {tls_certs.CLIENT_DN} is denied"
    while want not in dst.stderr_text() and time.time() < deadline:
        time.sleep(0.1)
    assert want in dst.stderr_text(), dst.stderr_text()
    assert dst.alive() and dst.query_migrate()["status"] == "setup"


@pytest.mark.parametrize("dst_impl", DESTINATIONS)
def test_client_without_certificate_is_refused(ws, pki, dst_impl):
    """verify-peer on the destination: a source with only the CA offers no certificate
    and is refused; the destination keeps listening."""
    require("qemu")
    ca_only = os.path.join(pki, "ca-only")
    os.makedirs(ca_only, exist_ok=True)
    if not os.path.exists(os.path.join(ca_only, "ca-cert.pem")):
        os.link(os.path.join(pki, "server", "ca-cert.pem"), os.path.join(ca_only, "ca-cert.pem"))
    si, src, dst = fail_source(ws, pki, "vmigrate", dst_impl,
                               {"tls_creds": "tls0", "tls_hostname": "localhost"},
                               src_objects=[creds(pki, "client", which="ca-only")],
                               dst_objects=[creds(pki, "server")])
    deadline = time.time() + 10
    while "Verify failed: No certificate was found." not in dst.stderr_text() \
            and time.time() < deadline:
        time.sleep(0.1)
    assert "Verify failed: No certificate was found." in dst.stderr_text()
    assert dst.alive() and dst.query_migrate()["status"] == "setup"


def object_cases(pki):
    client = os.path.join(pki, "client")
    return [
        {"qom-type": "tls-creds-x509", "id": "t1", "dir": "/nonexistent", "endpoint": "server"},
        {"qom-type": "tls-creds-x509", "id": "t2", "dir": client, "endpoint": "client"},
        {"qom-type": "tls-creds-x509", "id": "t2", "dir": client, "endpoint": "client"},
        {"qom-type": "tls-creds-x509", "id": "t3", "dir": client, "endpoint": "server"},
        {"qom-type": "tls-creds-x509", "id": "t4", "endpoint": "server"},
        {"qom-type": "tls-creds-x509", "id": "t5", "dir": client, "endpoint": "sideways"},
        {"qom-type": "tls-creds-x509", "id": "t6", "dir": client, "verify-peer": "on"},
        {"qom-type": "tls-creds-x509", "id": "t7", "dir": client, "bogus": 1},
        {"qom-type": "nosuch", "id": "x"},
        {"qom-type": "authz-simple"},
        {"qom-type": "authz-simple", "id": "1a", "identity": "x"},
        {"qom-type": "authz-simple", "id": "a"},
        {"qom-type": "authz-simple", "id": "a", "identity": "CN=x"},
        {"qom-type": "authz-list", "id": "l1", "rules": [{"match": "x"}]},
        {"qom-type": "authz-list", "id": "l2", "policy": "maybe"},
        {"qom-type": "authz-list", "id": "l3", "policy": "deny",
         "rules": [{"match": "CN=*", "policy": "allow", "format": "glob"}]},
        {"id": "x"},
    ]


def test_object_add_and_del_answer_as_qemu(ws, pki):
    """object-add and object-del over QMP: every reply, success or error, equal to
    QEMU's, for TLS credentials, authz objects and bad arguments."""
    require("qemu")
    replies = {}
    for impl in ("qemu", "vmigrate"):
        m = ws.vm(impl, impl, mem_mib=16).start()
        out = [m.raw("object-add", **c) for c in object_cases(pki)]
        out += [m.raw("object-del", id=i) for i in ("nosuch", "t2", "t2", "l3")]
        replies[impl] = out
    for case, q, v in zip(object_cases(pki) + ["del"] * 4, replies["qemu"], replies["vmigrate"]):
        assert q == v, f"{case}: QEMU {q}, vmigrate {v}"


def test_command_line_object_errors_name_the_object(ws, pki):
    """A bad --object stops vmigrate at startup with the reason and the object."""
    m = ws.vm("vmigrate", "bad", mem_mib=16,
              objects=[f"tls-creds-x509,id=tls0,dir={pki}/nonexistent,endpoint=server"])
    m.start(connect=False)
    rc = m.wait_exit(20)
    assert rc != 0
    err = m.stderr_text()
    assert "Unable to access credentials" in err and "ca-cert.pem" in err, err
    assert "--object tls-creds-x509,id=tls0" in err, err


@pytest.mark.parametrize("src_impl", SOURCES)
def test_tls_source_to_plain_destination(ws, pki, src_impl):
    """A TLS source meets a destination without TLS: the handshake fails with QEMU's
    text at the source, whose guest is unchanged."""
    require("qemu")
    src, dst = start_pair(ws, pki, src_impl, "vmigrate", bytes(MIB << 20), dst_objects=[])
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = harness.socket_port(dst.query_migrate())
    src.set_params(tls_creds="tls0", tls_hostname="localhost")
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    si = src.wait_migration(("completed", "failed"), timeout=30)
    assert si["status"] == "failed"
    assert si["error-desc"] == \
        "TLS handshake failed: The TLS connection was non-properly terminated.", si
    assert src.runstate() == "paused"


@pytest.mark.parametrize("dst_impl", DESTINATIONS)
def test_destination_outlives_a_plain_source_then_takes_a_tls_one(ws, pki, tls_image,
                                                                   dst_impl):
    """A source without TLS fails against a TLS destination, which reports the failed
    handshake and keeps listening: a TLS source then migrates into it."""
    require("qemu")
    plain = ws.vm("vmigrate", "plain", mem_mib=MIB).start()
    plain.cmd("stop")
    src, dst = start_pair(ws, pki, "vmigrate", dst_impl, tls_image)
    dst.set_params(tls_creds="tls0", tls_authz="az0")
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = harness.socket_port(dst.query_migrate())
    plain.set_params(max_bandwidth=0)
    plain.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    pi = plain.wait_migration(("completed", "failed"), timeout=30)
    assert pi["status"] == "failed", pi
    assert dst.alive() and dst.query_migrate()["status"] == "setup"
    src.set_params(tls_creds="tls0", tls_hostname="localhost", max_bandwidth=0)
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    si = src.wait_migration(timeout=60)
    di = dst.wait_migration(("completed", "failed"), timeout=60)
    assert si["status"] == "completed" and di["status"] == "completed", ws.diagnostics()
    assert dst.ram() == tls_image


@pytest.mark.parametrize("uri", ["file", "exec"])
def test_tls_needs_a_socket(ws, pki, uri):
    """tls-creds with a file: or exec: URI fails at once with a clear reason."""
    src = ws.vm("vmigrate", "src", mem_mib=16, objects=[creds(pki, "client")]).start()
    src.set_params(tls_creds="tls0", tls_hostname="localhost")
    out = ws.path("out.bin")
    src.cmd("migrate", uri=f"file:{out}" if uri == "file" else f"exec:cat > {out}")
    si = src.wait_migration(("completed", "failed"), timeout=30)
    assert si["status"] == "failed"
    assert si["error-desc"] == "TLS needs a socket transport (tcp:, unix: or a socket fd:)"
    assert src.runstate() == "running"


def silent_listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    return s


def test_silent_peer_can_be_cancelled(ws, pki):
    """A peer that accepts and never answers the handshake: the monitor keeps
    answering (QEMU's freezes) and migrate_cancel ends the migration at once."""
    src = ws.vm("vmigrate", "src", mem_mib=16, objects=[creds(pki, "client")]).start()
    src.set_params(tls_creds="tls0", tls_hostname="localhost")
    peer = silent_listener()
    try:
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{peer.getsockname()[1]}")
        time.sleep(0.5)
        assert src.query_migrate()["status"] == "setup"
        t0 = time.time()
        src.cmd("migrate_cancel")
        si = src.wait_migration(("cancelled", "failed", "completed"), timeout=10)
        assert si["status"] == "cancelled", si
        assert time.time() - t0 < 3
        assert src.runstate() == "running"
    finally:
        peer.close()


def test_silent_peer_times_out(ws, pki):
    """Left alone, a handshake with a silent peer fails after its deadline with a
    message that says so."""
    src = ws.vm("vmigrate", "src", mem_mib=16, objects=[creds(pki, "client")]).start()
    src.set_params(tls_creds="tls0", tls_hostname="localhost")
    peer = silent_listener()
    try:
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{peer.getsockname()[1]}")
        si = src.wait_migration(("cancelled", "failed", "completed"), timeout=30)
        assert si["status"] == "failed", si
        assert si["error-desc"] == "TLS handshake failed: the peer did not answer within 10 s"
        assert src.runstate() == "running"
    finally:
        peer.close()


@pytest.mark.parametrize("dst_impl", DESTINATIONS)
def test_cancel_during_a_tls_migration(ws, pki, tls_image, dst_impl):
    """migrate_cancel while pages flow over TLS (multifd, slowed by max-bandwidth):
    the source is `cancelled` within moments and running with its RAM, and a second
    TLS migration from it to a new destination completes."""
    require("qemu")
    src = ws.vm("vmigrate", "src", mem_mib=MIB, objects=[creds(pki, "client")]).start()
    src.write_ram(tls_image)
    dst = ws.vm(dst_impl, "dst", mem_mib=MIB, incoming="defer",
                objects=[creds(pki, "server")]).start()
    for m in (src, dst):
        m.set_caps(multifd=True)
        m.set_params(tls_creds="tls0", multifd_channels=2)
    src.set_params(tls_hostname="localhost", max_bandwidth=2 << 20)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{harness.socket_port(dst.query_migrate())}")
    deadline = time.time() + 20
    while src.query_migrate().get("ram", {}).get("transferred", 0) < (1 << 20):
        assert time.time() < deadline, src.query_migrate()
        time.sleep(0.05)
    t0 = time.time()
    src.cmd("migrate_cancel")
    si = src.wait_migration(("cancelled", "failed", "completed"), timeout=20)
    assert si["status"] == "cancelled", si
    assert time.time() - t0 < 3, f"cancel took {time.time() - t0:.1f} s"
    assert src.runstate() == "running"
    assert src.ram() == tls_image
    dst2 = ws.vm(dst_impl, "dst2", mem_mib=MIB, incoming="defer",
                 objects=[creds(pki, "server")]).start()
    dst2.set_caps(multifd=True)
    dst2.set_params(tls_creds="tls0", multifd_channels=2)
    dst2.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    src.cmd("stop")
    src.set_params(max_bandwidth=0)
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{harness.socket_port(dst2.query_migrate())}")
    si = src.wait_migration(timeout=60)
    di = dst2.wait_migration(("completed", "failed"), timeout=60)
    assert si["status"] == "completed" and di["status"] == "completed", ws.diagnostics()
    assert dst2.ram() == tls_image


@pytest.mark.parametrize("dst_impl", DESTINATIONS)
def test_tls_over_a_getfd_socket(ws, pki, tls_image, dst_impl):
    """TLS on an `fd:` socket handed over with getfd: no URI host, so tls-hostname
    names the peer."""
    require("qemu")
    src, dst = start_pair(ws, pki, "vmigrate", dst_impl, tls_image)
    dst.set_params(tls_creds="tls0", tls_authz="az0")
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    conn = socket.create_connection(("127.0.0.1", harness.socket_port(dst.query_migrate())))
    try:
        src.qmp.send_fd_scm(conn.fileno())
        assert "return" in src.raw("getfd", fdname="mig")
    finally:
        conn.close()
    src.set_params(tls_creds="tls0", tls_hostname="localhost", max_bandwidth=0)
    src.cmd("migrate", uri="fd:mig")
    si = src.wait_migration(timeout=60)
    di = dst.wait_migration(("completed", "failed"), timeout=60)
    assert si["status"] == "completed" and di["status"] == "completed", ws.diagnostics()
    assert dst.ram() == tls_image
