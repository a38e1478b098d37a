"""A destination allocates only the pages it gets data for: after a mostly-zero guest is
migrated (precopy, multifd plain and compressed, a mapped-ram restore), the destination's
guest-RAM file on tmpfs holds about the non-zero part of RAM and no more. The destination
faults in each run of pages before their data lands; this checks that pages that stay zero
are never among them (the runs stop at zero pages, and a zero page in the middle of a run
of data pages stays a hole)."""
import os

import pytest

import harness
from harness import MiB, PAGE
from conftest import require

MEM_MIB = 64
RUNS = 64              # runs of data pages, one every RUN_STRIDE pages
RUN_PAGES = 16         # pages per run, page HOLE of each left zero
RUN_STRIDE = 256
HOLE = 8
LONE = 100             # a lone data page after each run
SLACK = 16 * PAGE      # less than RUNS holes: populating the holes must fail the test


def sparse_image():
    """A guest image whose non-zero pages are runs with a zero page in each, and lone
    pages; (bytes, non-zero pages)."""
    img = bytearray(MEM_MIB * MiB)
    nonzero = 0
    for r in range(RUNS):
        base = r * RUN_STRIDE
        for p in list(range(base, base + RUN_PAGES)) + [base + LONE]:
            if p == base + HOLE:
                continue
            img[p * PAGE:(p + 1) * PAGE] = bytes([(p % 251) + 1]) * PAGE
            nonzero += 1
    return bytes(img), nonzero


def allocated(path):
    return os.stat(path).st_blocks * 512


def check_footprint(ws, dst, data, nonzero):
    assert dst.ram() == data, "destination RAM differs from the source"
    got, want = allocated(dst.mem_file), nonzero * PAGE
    assert got <= want + SLACK, \
        f"the destination allocated {got} bytes of guest RAM for {want} bytes of non-zero " \
        f"pages: pages that stay zero were touched\n{ws.diagnostics()}"
    assert got >= want, f"{got} bytes allocated, fewer than the {want} bytes of data"


MODES = {
    "precopy": ({}, {}),
    "multifd2": ({"multifd": True}, {"multifd-channels": 2}),
    "multifd2-zstd": ({"multifd": True}, {"multifd-channels": 2, "multifd-compression": "zstd"}),
}


@pytest.mark.vmigrate
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("src_impl", ["vmigrate", "qemu"])
def test_socket_destination_leaves_zero_pages_untouched(ws, src_impl, mode):
    require(src_impl, "vmigrate")
    data, nonzero = sparse_image()
    caps, params = MODES[mode]
    src = ws.vm(src_impl, "src", mem_mib=MEM_MIB).start()
    src.write_ram(data)
    src.cmd("stop")
    dst = ws.vm("vmigrate", "dst", mem_mib=MEM_MIB, incoming="defer").start()
    for m in (src, dst):
        m.set_caps(events=True, **caps)
        if params:
            m.cmd("migrate-set-parameters", **params)
    src.set_params(max_bandwidth=0)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = harness.socket_port(dst.query_migrate())
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    si = src.wait_migration(timeout=60)
    di = dst.wait_migration(timeout=60)
    assert si.get("status") == "completed", f"source: {si}\n{ws.diagnostics()}"
    assert di.get("status") == "completed", f"destination: {di}\n{ws.diagnostics()}"
    check_footprint(ws, dst, data, nonzero)


@pytest.mark.vmigrate
@pytest.mark.parametrize("channels", [0, 2])
def test_mapped_ram_restore_leaves_zero_pages_untouched(ws, channels):
    require("vmigrate")
    data, nonzero = sparse_image()
    caps = {"mapped-ram": True, "multifd": channels > 0}
    params = {"multifd-channels": channels} if channels else {}
    src = ws.vm("vmigrate", "src", mem_mib=MEM_MIB).start()
    src.write_ram(data)
    src.cmd("stop")
    src.set_caps(**caps)
    src.set_params(max_bandwidth=0, **{k.replace("-", "_"): v for k, v in params.items()})
    path = ws.path("footprint.mig")
    src.cmd("migrate", uri=f"file:{path}")
    si = src.wait_migration(timeout=60)
    assert si.get("status") == "completed", f"save: {si}\n{ws.diagnostics()}"
    dst = ws.vm("vmigrate", "dst", mem_mib=MEM_MIB, incoming="defer").start()
    dst.set_caps(**caps)
    if params:
        dst.cmd("migrate-set-parameters", **params)
    dst.cmd("migrate-incoming", uri=f"file:{path}")
    di = dst.wait_migration(("completed", "failed"), timeout=60)
    assert di.get("status") == "completed", f"restore: {di}\n{ws.diagnostics()}"
    check_footprint(ws, dst, data, nonzero)
