"""Postcopy pause and recovery over TLS: both sides have x509 `tls-creds` (and the
destination a `tls-authz`), the main channel goes through a proxy that the test cuts
after the switch to postcopy, both sides reach `postcopy-paused`, and `migrate-recover`
with `migrate resume=true` bring them back over a new TLS session (through a relay that
records what crosses the wire: a TLS handshake at the start of every connection and no
guest page in clear), then the migration completes with RAM equal byte for byte.
vmigrate to vmigrate with and without postcopy-preempt, vmigrate and QEMU 10.0.2 both
ways, and QEMU to QEMU as a check of the harness."""
import os
import random

import pytest

import harness
from conftest import require
from faultproxy import Fault, FaultProxy
from test_postcopy_recover import start_pair as recover_pair
from test_postcopy_recover import (GUEST_MIB, RECOVERY_DST, RECOVERY_SRC, assert_recovered,
                                   check_paused, cut_during_postcopy, finish, wait_status)
from test_tls import AUTHZ_OK, Recorder, creds

MiB = harness.MiB

PAIRS = [
    pytest.param("vmigrate", "vmigrate", False, marks=pytest.mark.vmigrate,
                 id="vmigrate-to-vmigrate"),
    pytest.param("vmigrate", "vmigrate", True, marks=pytest.mark.vmigrate,
                 id="vmigrate-to-vmigrate-preempt"),
    pytest.param("vmigrate", "qemu", False, marks=pytest.mark.vmigrate,
                 id="vmigrate-to-qemu"),
    pytest.param("qemu", "vmigrate", False, marks=pytest.mark.vmigrate,
                 id="qemu-to-vmigrate"),
    pytest.param("vmigrate", "qemu", True, marks=pytest.mark.vmigrate,
                 id="vmigrate-to-qemu-preempt"),
    pytest.param("qemu", "vmigrate", True, marks=pytest.mark.vmigrate,
                 id="qemu-to-vmigrate-preempt"),
    pytest.param("qemu", "qemu", False, marks=pytest.mark.harness_check,
                 id="harness_check-qemu-to-qemu"),
]

# Far beyond any byte the stream reaches: the proxy injects nothing by itself, the test
# cuts the main channel when it chooses.
NEVER = 1 << 62


@pytest.fixture(scope="module")
def image(session_dir):
    return harness.Image(os.path.join(session_dir, "image32-tls.bin"), GUEST_MIB * MiB, 29)


def start_pair(ws, pki, image, src_impl, dst_impl, preempt):
    """Source and destination with TLS in postcopy-active, the connections through a
    proxy."""
    tls = ([creds(pki, "client")], [creds(pki, "server"), AUTHZ_OK],
           {"tls_creds": "tls0", "tls_hostname": "localhost"},
           {"tls_creds": "tls0", "tls_authz": "az0"})
    return recover_pair(ws, image, src_impl, dst_impl, preempt, tls=tls,
                        faults=[Fault(conn=0, at=NEVER)])


def recover_through_recorder(src, dst):
    dst.cmd("migrate-recover", uri="tcp:127.0.0.1:0")
    rec = Recorder(harness.socket_port(dst.query_migrate()))
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{rec.port}", resume=True)
    src.wait_migration(("postcopy-active", "completed", "failed"), timeout=30)
    return rec


@pytest.mark.parametrize("src_impl,dst_impl,preempt", PAIRS)
def test_tls_cut_and_recover(ws, pki, image, src_impl, dst_impl, preempt):
    require(src_impl, dst_impl)
    src, dst, proxy = start_pair(ws, pki, image, src_impl, dst_impl, preempt)
    # A page the push has not reached is asked for over TLS before the cut.
    tail = GUEST_MIB * MiB - MiB
    assert dst.ram_pmemsave(tail, 64 * 1024) == image.data[tail:tail + 64 * 1024]
    # The main channel only: with preempt, its channel is left for the source to drop.
    cut_during_postcopy(src, _MainChannel(proxy), random.Random())
    check_paused(src, dst)
    proxy.close()
    rec = recover_through_recorder(src, dst)
    try:
        finish(ws, src, dst, image)
    finally:
        rec.close()
    assert_recovered(src, RECOVERY_SRC, 1)
    assert_recovered(dst, RECOVERY_DST, 1)
    # The new session is TLS: every connection opens with a handshake record, and no
    # distinctive guest page crossed in clear.
    assert rec.connections == (2 if preempt else 1), rec.connections
    for conn in rec.sent:
        assert bytes(conn[:2]) == b"\x16\x03", f"not a TLS handshake: {bytes(conn[:16])!r}"
    wire = b"".join(bytes(b) for b in rec.sent)
    page = harness.PAGE
    pages = [image.data[i:i + page] for i in range(0, len(image.data), page * 97)]
    distinct = [p for p in pages if len(set(p)) > 16]
    assert distinct, "the image has no distinctive pages to look for"
    for p in distinct:
        assert p[:64] not in wire, "guest RAM crossed the recovered connection in clear"


class _MainChannel:
    """What cut_during_postcopy closes: the main channel of PROXY, not the others."""

    def __init__(self, proxy):
        self.proxy = proxy

    def close(self):
        self.proxy.cut_now(0)
