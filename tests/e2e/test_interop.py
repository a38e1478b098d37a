"""Live migration between QEMU 10.0.2 and vmigrate, both directions, every transport
the `none` machine supports, from a paused and from a running guest: 256 MiB of mixed
RAM must arrive byte for byte and both ends must end in QEMU's states."""
import pytest

import harness
from conftest import require

PAIRS = [("qemu", "vmigrate"), ("vmigrate", "qemu"), ("vmigrate", "vmigrate")]
CASES = [(t, "paused") for t in ("tcp", "unix", "exec", "file", "file-offset")] + \
        [(t, "running") for t in ("tcp", "tcp-cmdline", "unix", "exec", "file", "file-offset")]


def check_migration(ws, image, src_impl, dst_impl, transport, runstate):
    require(src_impl, dst_impl)
    src = ws.vm(src_impl, "src", mem_mib=image.size >> 20).start()
    src.write_ram(image.data)
    assert src.check_ram(image) is None, "source RAM does not hold the image just written"
    if runstate == "paused":
        src.cmd("stop")
    assert src.runstate() == runstate

    dst = ws.vm(dst_impl, "dst", mem_mib=image.size >> 20,
                incoming=harness.incoming_for(ws, transport)).start()
    assert dst.runstate() == "inmigrate"
    for m in (src, dst):
        m.set_caps(events=True)
    src.set_params(max_bandwidth=0)

    si, di = harness.migrate(ws, src, dst, transport)
    assert si.get("status") == "completed", f"source: {si}\n{ws.diagnostics()}"
    assert di.get("status") == "completed", f"destination: {di}\n{ws.diagnostics()}"

    if transport in ("file", "exec", "file-offset"):
        head = harness.read_file(ws.path("stream.bin"), 0, 4096 + 8)
        at = 4096 if transport == "file-offset" else 0
        if at:
            assert head[:4096] == bytes(4096), "file: bytes before offset=4096 are not zero"
        assert head[at:at + 8] == b"QEVM\x00\x00\x00\x03", \
            f"stream does not start with QEVM v3 at {at}: {head[at:at + 8].hex()}"

    # RAM arrived byte for byte
    diff = dst.check_ram(image)
    assert diff is None, f"destination RAM differs from the source image: {diff}"
    if dst_impl == "vmigrate" and transport == "tcp":
        diff = dst.check_ram_pmemsave(image)
        assert diff is None, f"destination pmemsave differs from the source image: {diff}"

    # run states: source postmigrate, destination takes the source's run state
    assert src.runstate() == "postmigrate"
    assert dst.runstate() == runstate
    assert src.query_migrate()["status"] == "completed"
    assert dst.query_migrate()["status"] == "completed"

    # source statistics: one pass over an idle guest sends each non-zero page once
    ram = si.get("ram")
    assert ram is not None, f"source query-migrate has no ram statistics: {si}"
    assert ram["total"] == image.size
    assert ram["remaining"] == 0
    assert ram["page-size"] == 4096
    assert ram["duplicate"] == image.zero_pages, ram
    assert ram["normal"] == image.nonzero_pages, ram
    assert ram["normal-bytes"] == image.nonzero_pages * 4096, ram
    assert ram["transferred"] >= image.nonzero_pages * 4096, ram

    # events (capability `events` on both sides)
    assert src.wait_event("MIGRATION:completed"), src.event_names()
    assert dst.wait_event("MIGRATION:completed"), dst.event_names()
    src_ev, dst_ev = src.event_names(), dst.event_names()
    if runstate == "running":
        assert "STOP" in src_ev, src_ev
        assert "RESUME" in dst_ev, dst_ev
    else:
        assert "RESUME" not in dst_ev, dst_ev
    assert src_ev.index("MIGRATION:setup") < src_ev.index("MIGRATION:active") \
        < src_ev.index("MIGRATION:completed"), src_ev
    if "MIGRATION:setup" in dst_ev:
        assert dst_ev.index("MIGRATION:setup") < dst_ev.index("MIGRATION:completed")

    src.quit()
    dst.quit()
    assert src.proc.returncode == 0 and dst.proc.returncode == 0, ws.diagnostics()


@pytest.mark.vmigrate
@pytest.mark.parametrize("transport,runstate", CASES, ids=[f"{t}-{r}" for t, r in CASES])
@pytest.mark.parametrize("src_impl,dst_impl", PAIRS, ids=[f"{s}-to-{d}" for s, d in PAIRS])
def test_migrate(ws, image, src_impl, dst_impl, transport, runstate):
    check_migration(ws, image, src_impl, dst_impl, transport, runstate)


@pytest.mark.harness_check
@pytest.mark.parametrize("transport,runstate", CASES, ids=[f"{t}-{r}" for t, r in CASES])
def test_harness_check_qemu_to_qemu(ws, image, transport, runstate):
    """QEMU to QEMU: checks the harness and the expectations themselves."""
    check_migration(ws, image, "qemu", "qemu", transport, runstate)


START_PAUSED_CASES = [
    # (source started paused, destination started paused, dst run state after migration)
    (False, True, "paused"),      # running guest, destination -S / --paused: stays paused
    (True, False, "prelaunch"),   # guest never started: globalstate carries "prelaunch"
]


@pytest.mark.parametrize("src_paused,dst_paused,dst_state", START_PAUSED_CASES,
                         ids=["dst-started-paused", "src-started-paused"])
@pytest.mark.parametrize("src_impl,dst_impl", [
    pytest.param("qemu", "vmigrate", marks=pytest.mark.vmigrate, id="qemu-to-vmigrate"),
    pytest.param("vmigrate", "qemu", marks=pytest.mark.vmigrate, id="vmigrate-to-qemu"),
    pytest.param("vmigrate", "vmigrate", marks=pytest.mark.vmigrate, id="vmigrate-to-vmigrate"),
    pytest.param("qemu", "qemu", marks=pytest.mark.harness_check, id="harness_check-qemu-to-qemu"),
])
def test_start_paused(ws, small_image, src_impl, dst_impl, src_paused, dst_paused, dst_state):
    """-S / --paused on either end: QEMU's run states before and after, and `cont`."""
    require(src_impl, dst_impl)
    mib = small_image.size >> 20
    src = ws.vm(src_impl, "src", mem_mib=mib, start_paused=src_paused).start()
    src.write_ram(small_image.data)
    want = "prelaunch" if src_paused else "running"
    assert src.runstate() == want, \
        f"a source started {'with -S/--paused' if src_paused else 'normally'} is {want!r} in QEMU"
    dst = ws.vm(dst_impl, "dst", mem_mib=mib, incoming="defer", start_paused=dst_paused).start()
    assert dst.runstate() == "inmigrate"
    for m in (src, dst):
        m.set_caps(events=True)
    si, di = harness.migrate(ws, src, dst, "unix")
    assert si["status"] == "completed" and di["status"] == "completed", (si, di)
    assert dst.check_ram(small_image) is None
    assert src.runstate() == "postmigrate"
    assert dst.runstate() == dst_state, (
        "QEMU: a destination started with -S stays 'paused' after a running guest arrives"
        if dst_paused else
        "QEMU: the globalstate of a never-started (-S) source is 'prelaunch', and the "
        "destination takes that run state")
    assert "RESUME" not in dst.event_names()
    dst.cmd("cont")
    assert dst.runstate() == "running"
    assert dst.wait_event("RESUME"), dst.event_names()
    # `cont` on a postmigrate source runs it again
    src.cmd("cont")
    assert src.runstate() == "running"
    assert src.wait_event("RESUME"), src.event_names()


@pytest.mark.parametrize("src_impl,dst_impl", [
    pytest.param("qemu", "vmigrate", marks=pytest.mark.vmigrate, id="qemu-to-vmigrate"),
    pytest.param("vmigrate", "qemu", marks=pytest.mark.vmigrate, id="vmigrate-to-qemu"),
    pytest.param("vmigrate", "vmigrate", marks=pytest.mark.vmigrate, id="vmigrate-to-vmigrate"),
    pytest.param("qemu", "qemu", marks=pytest.mark.harness_check, id="harness_check-qemu-to-qemu"),
])
def test_default_ram_block(ws, small_image, src_impl, dst_impl):
    """Block `ram`: the source's RAM is a shared file with the default block name
    (QEMU memory-backend-file id=ram; vmigrate --mem-path --share without --ram-id), the
    destination has plain RAM (QEMU -m; vmigrate without --mem-path), read back with
    pmemsave."""
    require(src_impl, dst_impl)
    mib = small_image.size >> 20
    src = ws.vm(src_impl, "src", mem_mib=mib, ram_id="ram").start()
    src.write_ram(small_image.data)
    dst = ws.vm(dst_impl, "dst", mem_mib=mib, ram_id="ram", shared=False,
                incoming="defer").start()
    src.set_params(max_bandwidth=0)
    si, di = harness.migrate(ws, src, dst, "tcp")
    assert si["status"] == "completed" and di["status"] == "completed", \
        f"{si}\n{di}\n{ws.diagnostics()}"
    diff = dst.check_ram_pmemsave(small_image)
    assert diff is None, f"destination RAM (pmemsave) differs: {diff}"
    assert dst.runstate() == "running"
    assert src.runstate() == "postmigrate"
