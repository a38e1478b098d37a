"""Postcopy with `postcopy-preempt`: the pages a destination asks for travel on a second
connection (the preempt channel) while the background push stays on the main one.
vmigrate to QEMU 10.0.2, QEMU to vmigrate and vmigrate to vmigrate: precopy is held back
by a low `max-bandwidth`, `migrate-start-postcopy` switches, a `pmemsave` on the
destination during postcopy faults on pages that have not arrived, which are requested
(the source counts `postcopy-requests`); both sides complete and the destination's RAM
equals the source image byte for byte. QEMU to QEMU runs the same script as a check of
the harness. The vmigrate destination's fault latency (`x-vmigrate-fault-latency-us`) is
measured with and without preempt in the same run, and printed."""
import os
import time

import pytest

import harness
from harness import wait_until_status as wait_status
from conftest import require

MiB = harness.MiB
GUEST_MIB = 64

PAIRS = [
    pytest.param("vmigrate", "qemu", marks=pytest.mark.vmigrate, id="vmigrate-to-qemu"),
    pytest.param("qemu", "qemu", marks=pytest.mark.harness_check, id="harness_check-qemu-to-qemu"),
]


@pytest.fixture(scope="module")
def image64(session_dir):
    return harness.Image(os.path.join(session_dir, "image64-preempt.bin"), GUEST_MIB * MiB, 11)


def enable_postcopy(dst, preempt):
    """Postcopy (and preempt) on a destination before incoming starts; skips without
    userfaultfd."""
    caps = [{"capability": "postcopy-ram", "state": True}]
    if preempt:
        caps.append({"capability": "postcopy-preempt", "state": True})
    r = dst.raw("migrate-set-capabilities", capabilities=caps)
    if "error" in r and "userfaultfd" in r["error"]["desc"]:
        pytest.skip(f"no userfaultfd for this user: {r['error']['desc']}")
    assert "return" in r, r


def tls_creds(pki, endpoint):
    return (f"tls-creds-x509,id=tls0,dir={os.path.join(pki, endpoint)},endpoint={endpoint},"
            "verify-peer=on")


def migrate_in_postcopy(ws, image, src_impl, dst_impl, preempt, tag, pki=None, unix=False):
    """Runs one postcopy migration of IMAGE from SRC_IMPL to DST_IMPL (over TLS with the
    certificates in PKI, when given; over a unix socket with UNIX), reads the whole of the destination's RAM during
    postcopy and checks everything; returns the source's and the destination's last
    query-migrate."""
    src = ws.vm(src_impl, f"src-{tag}", mem_mib=GUEST_MIB, ram_id="ram",
                objects=[tls_creds(pki, "client")] if pki else ()).start()
    src.write_ram(image.data)
    assert src.runstate() == "running"
    dst = ws.vm(dst_impl, f"dst-{tag}", mem_mib=GUEST_MIB, ram_id="ram",
                incoming="defer", objects=[tls_creds(pki, "server")] if pki else ()).start()
    enable_postcopy(dst, preempt)
    for m in (src, dst):
        m.set_caps(events=True, postcopy_ram=True, postcopy_preempt=preempt)
        if pki:
            m.set_params(tls_creds="tls0")
    if pki:
        src.set_params(tls_hostname="localhost")
    # Precopy at 4 MiB/s cannot finish 64 MiB before the switch; the push at 8 MiB/s
    # leaves most of RAM to be faulted on and asked for.
    src.set_params(max_bandwidth=4 * MiB, max_postcopy_bandwidth=8 * MiB)
    if unix:
        uri = f"unix:{ws.path(f'mig-{tag}.sock')}"
        dst.cmd("migrate-incoming", uri=uri)
    else:
        dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
        uri = f"tcp:127.0.0.1:{harness.socket_port(dst.query_migrate())}"
    src.cmd("migrate", uri=uri)
    wait_status(src, "active")
    t0 = time.time()
    while src.query_migrate().get("ram", {}).get("transferred", 0) < 2 * MiB:
        assert time.time() - t0 < 30, f"precopy does not move: {src.query_migrate()}"
        time.sleep(0.02)
    src.cmd("migrate-start-postcopy")
    wait_status(src, "postcopy-active")
    wait_status(dst, "postcopy-active")
    assert dst.wait_runstate("running") == "running"
    # Reads of pages that have not arrived fault and are asked for.
    ram = dst.ram_pmemsave()
    diff = harness.first_difference(ram, image.data)
    assert diff is None, f"pmemsave during postcopy differs from the source image: {diff}"
    during = src.query_migrate()
    si = src.wait_migration(timeout=120)
    di = dst.wait_migration(("completed", "failed"), timeout=120)
    assert si.get("status") == "completed", f"source: {si}\n{ws.diagnostics()}"
    assert di.get("status") == "completed", f"destination: {di}\n{ws.diagnostics()}"
    requests = max(si["ram"]["postcopy-requests"],
                   during.get("ram", {}).get("postcopy-requests", 0))
    assert requests > 0, f"the source counted no postcopy requests: {si}"
    assert si["ram"]["postcopy-bytes"] > 0, si
    assert dst.runstate() == "running"
    assert src.runstate() == "postmigrate"
    names = dst.event_names()
    assert names.index("MIGRATION:postcopy-active") < names.index("MIGRATION:completed"), names
    assert dst.check_ram_pmemsave(image) is None
    src.quit()
    dst.quit()
    return si, di


@pytest.mark.parametrize("src_impl,dst_impl", PAIRS)
def test_postcopy_preempt_to(ws, image64, src_impl, dst_impl):
    require(src_impl, dst_impl)
    si, _ = migrate_in_postcopy(ws, image64, src_impl, dst_impl, True, "p")
    print(f"\n{src_impl}->{dst_impl} preempt: postcopy-requests="
          f"{si['ram']['postcopy-requests']} postcopy-bytes={si['ram']['postcopy-bytes']}")


@pytest.mark.vmigrate
@pytest.mark.parametrize("src_impl", ["qemu", "vmigrate"],
                         ids=["qemu-to-vmigrate", "vmigrate-to-vmigrate"])
def test_postcopy_preempt_into_vmigrate_and_fault_latency(ws, image64, src_impl):
    """The same migration into a vmigrate destination, without and then with preempt;
    the destination's requested-fault latency of both runs is printed."""
    require(src_impl, "vmigrate")
    latency = {}
    for preempt in (False, True):
        tag = "preempt" if preempt else "plain"
        si, di = migrate_in_postcopy(ws, image64, src_impl, "vmigrate", preempt, tag)
        lat = di["x-vmigrate-fault-latency-us"]
        assert lat["count"] > 0, di
        if src_impl == "qemu":
            # QEMU counts a request per page asked for, as vmigrate does.
            assert di.get("x-vmigrate-postcopy-requests") == si["ram"]["postcopy-requests"], \
                (si, di)
        latency[tag] = lat
    print(f"\n{src_impl}->vmigrate fault latency (us): "
          f"without preempt {latency['plain']}, with preempt {latency['preempt']}")


@pytest.mark.vmigrate
def test_postcopy_preempt_needs_a_multi_channel_uri(ws):
    """postcopy-preempt over a file is refused with QEMU's text, and the source runs on."""
    require("qemu", "vmigrate")
    replies = {}
    for impl in ("qemu", "vmigrate"):
        m = ws.vm(impl, f"uri-{impl}", mem_mib=16).start()
        m.set_caps(postcopy_ram=True, postcopy_preempt=True)
        replies[impl] = m.raw("migrate", uri=f"exec:cat > {ws.path(impl + '.bin')}")
        assert m.runstate() == "running"
        m.quit()
    assert replies["vmigrate"] == replies["qemu"], replies
    assert replies["qemu"]["error"]["desc"] == \
        "Migration requires multi-channel URIs (e.g. tcp)", replies


@pytest.mark.vmigrate
@pytest.mark.parametrize("src_impl,dst_impl", [("vmigrate", "vmigrate"), ("qemu", "vmigrate"),
                                               ("vmigrate", "qemu")],
                         ids=["vmigrate-to-vmigrate", "qemu-to-vmigrate", "vmigrate-to-qemu"])
def test_postcopy_preempt_over_tls(ws, image64, pki, src_impl, dst_impl):
    """The preempt channel is a TLS session too, like multifd channels."""
    require(src_impl, dst_impl)
    si, _ = migrate_in_postcopy(ws, image64, src_impl, dst_impl, True, "tls", pki=pki)
    print(f"\n{src_impl}->{dst_impl} preempt over TLS: postcopy-requests="
          f"{si['ram']['postcopy-requests']}")


@pytest.mark.vmigrate
@pytest.mark.parametrize("src_impl", ["qemu", "vmigrate"],
                         ids=["qemu-to-vmigrate", "vmigrate-to-vmigrate"])
def test_postcopy_preempt_over_a_unix_socket(ws, image64, src_impl):
    """Over a unix socket the destination keeps the socket's path until the preempt
    channel connected, then removes it."""
    require(src_impl, "vmigrate")
    migrate_in_postcopy(ws, image64, src_impl, "vmigrate", True, "unix", unix=True)
    assert not os.path.exists(ws.path("mig-unix.sock"))
