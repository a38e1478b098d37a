"""x509 credentials for the TLS tests, made with openssl in the layout QEMU's
tls-creds-x509 reads: DIR/ca-cert.pem, server-cert.pem, server-key.pem,
client-cert.pem, client-key.pem.

make_pki(root) gives a CA and, signed by it:
  server/  a server certificate for "localhost" and 127.0.0.1 (subjectAltName),
           with a client certificate whose DN is CLIENT_DN
  client/  the client side: ca-cert.pem, client-cert.pem, client-key.pem
  rogue/   a second, unrelated CA with its own server and client certificates, for
           handshakes that must fail
"""

import os
import subprocess

# The client's subject as tls-authz matches it: the names in certificate order
CLIENT_DN = "C=GB,O=vmigrate tests,CN=migration-client"
# openssl takes the subject in the order written, most significant first
CLIENT_SUBJ = "/C=GB/O=vmigrate tests/CN=migration-client"
SERVER_SUBJ = "/C=GB/O=vmigrate tests/CN=localhost"

_EXT = {
    "ca": "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
    "server": ("basicConstraints=critical,CA:FALSE\n"
               "keyUsage=critical,digitalSignature,keyEncipherment\n"
               "extendedKeyUsage=serverAuth\n"
               "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n"),
    "client": ("basicConstraints=critical,CA:FALSE\n"
               "keyUsage=critical,digitalSignature,keyEncipherment\n"
               "extendedKeyUsage=clientAuth\n"),
}


def _ssl(*args, cwd):
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {r.stderr.strip()}")


def _issue(d, name, subj, kind, ca="ca"):
    """Key NAME-key.pem and certificate NAME-cert.pem in D, signed by CA-cert/key."""
    ext = os.path.join(d, f"{name}.ext")
    with open(ext, "w") as f:
        f.write(_EXT[kind])
    _ssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem",
         "-subj", subj, "-out", f"{name}.csr", cwd=d)
    _ssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem", "-CAkey",
         f"{ca}-key.pem", "-CAcreateserial", "-days", "30", "-sha256", "-extfile", ext,
         "-out", f"{name}-cert.pem", cwd=d)


def _ca(d, subj):
    with open(os.path.join(d, "ca.ext"), "w") as f:
        f.write(_EXT["ca"])
    _ssl("req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
         "-sha256", "-subj", subj, "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _tidy(d):
    for n in os.listdir(d):
        if n.endswith((".csr", ".ext", ".srl")):
            os.unlink(os.path.join(d, n))


def make_pki(root):
    """Create the directories described above under ROOT; returns ROOT."""
    for sub in ("server", "client", "rogue"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    srv = os.path.join(root, "server")
    _ca(srv, "/C=GB/O=vmigrate tests/CN=vmigrate test CA")
    _issue(srv, "server", SERVER_SUBJ, "server")
    _issue(srv, "client", CLIENT_SUBJ, "client")
    cli = os.path.join(root, "client")
    for n in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
        os.link(os.path.join(srv, n), os.path.join(cli, n))
    rogue = os.path.join(root, "rogue")
    _ca(rogue, "/C=GB/O=elsewhere/CN=another CA")
    _issue(rogue, "server", SERVER_SUBJ, "server")
    _issue(rogue, "client", CLIENT_SUBJ, "client")
    for d in (srv, rogue):
        _tidy(d)
    return root
