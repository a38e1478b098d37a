"""x-ignore-shared between QEMU 10.0.2 and vmigrate.

* Both ends map guest RAM from the same shared file (QEMU `memory-backend-file,share=on`,
  vmigrate `--mem-path F --share`): the block list carries the block's guest address, no
  page of the block is sent, the destination runs with the source's RAM.
* RAM that is not in a shared file still migrates page by page with the capability on
  (the block list still carries the address).
"""
import pytest

import harness
from conftest import require

MIB = 16

PAIRS = [("qemu", "vmigrate"), ("vmigrate", "qemu"), ("vmigrate", "vmigrate")]
PAIR_IDS = [f"{s}-to-{d}" for s, d in PAIRS]


@pytest.fixture(scope="module")
def is_image(session_dir):
    return harness.Image(f"{session_dir}/image16-is.bin", MIB * harness.MiB, 31)


def set_ignore_shared(m):
    m.cmd("migrate-set-capabilities",
          capabilities=[{"capability": "x-ignore-shared", "state": True}])


@pytest.mark.parametrize("src_impl,dst_impl", PAIRS, ids=PAIR_IDS)
def test_shared_file_sends_no_pages(ws, is_image, src_impl, dst_impl):
    require("qemu")
    mem_file = ws.shm_path("shared.ram")
    # The destination maps the file first; the source then fills it (a destination must
    # not touch RAM before the migration ends, so it sees the filled file).
    dst = ws.vm(dst_impl, "dst", mem_mib=MIB, incoming="defer", mem_file=mem_file).start()
    src = ws.vm(src_impl, "src", mem_mib=MIB, mem_file=mem_file).start(prefill=is_image.data)
    for m in (src, dst):
        set_ignore_shared(m)
    si, di = harness.migrate(ws, src, dst, "tcp")
    assert si["status"] == "completed", si
    assert di["status"] == "completed", di
    ram = si["ram"]
    assert ram["normal"] == 0, ram
    assert ram["duplicate"] == 0, ram
    # The stream itself (header, configuration, block list, devices) is a few hundred
    # bytes; one page of RAM data would be 4 KiB.
    assert ram["transferred"] < harness.PAGE, ram
    dst.wait_runstate("running")
    assert dst.check_ram_pmemsave(is_image) is None
    assert src.runstate() == "postmigrate"


@pytest.mark.parametrize("src_impl,dst_impl", PAIRS, ids=PAIR_IDS)
def test_private_ram_still_migrates(ws, small_image, src_impl, dst_impl):
    """Anonymous RAM is not ignored: its pages go as usual, after a block list that
    carries the address."""
    require("qemu")
    size = small_image.size // harness.MiB
    src = ws.vm(src_impl, "src", mem_mib=size, ram_id="ram", shared=False).start()
    dst = ws.vm(dst_impl, "dst", mem_mib=size, ram_id="ram", shared=False,
                incoming="defer").start()
    # Private RAM cannot be filled from outside; every page is sent (as ZERO records),
    # which the destination can only parse if the block list's address field is right.
    for m in (src, dst):
        set_ignore_shared(m)
    si, di = harness.migrate(ws, src, dst, "tcp")
    assert si["status"] == "completed", si
    assert di["status"] == "completed", di
    assert si["ram"]["duplicate"] + si["ram"]["normal"] == size * harness.MiB // harness.PAGE, si
    dst.wait_runstate("running")
    assert dst.ram_pmemsave() == bytes(size * harness.MiB)
