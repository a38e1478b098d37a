"""`vmigrate convert IN OUT --to mapped-ram|plain` on files real QEMU 10.0.2 wrote for a
`-M pc` guest with its default devices.

* A stopped `-M pc` guest is saved by QEMU to a plain file; the restore of that file is
  saved again by QEMU, with mapped-ram.
* The plain file converted to mapped-ram is restored by a fresh QEMU with mapped-ram and
  multifd; the mapped-ram files converted to plain are restored without them. Each
  restore's guest RAM (`pmemsave` of all of it) and CPU state (HMP `info registers`)
  equal those of a restore of QEMU's own plain file.
* Truncated and corrupted inputs fail with the byte offset of the damage, and the output
  file does not appear (no temporary file is left either).
"""
import json
import os
import re
import subprocess

import pytest

import harness
from conftest import require

MEM_MIB = 64
# Guest RAM of `-M pc -m 64M` below 4 GiB, and the BIOS mapped at the top of it.
RAM_RANGES = [(0, MEM_MIB * harness.MiB), (0xFFFE0000, 0x20000)]

pytestmark = pytest.mark.vmigrate


class PcQemu(harness.Machine):
    """QEMU `-M pc` with its default devices, TCG, anonymous RAM."""

    def __init__(self, ws, name, incoming=None):
        super().__init__(ws, "qemu", name, mem_mib=MEM_MIB, ram_id="ram", shared=False,
                         incoming=incoming)
        ws.machines.append(self)

    def argv(self):
        a = [harness.QEMU_BIN, "-M", "pc", "-accel", "tcg", "-m", f"{MEM_MIB}M",
             "-display", "none", "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if self.incoming:
            a += ["-incoming", self.incoming]
        return a

    def hmp(self, line):
        return self.cmd("human-monitor-command", **{"command-line": line})

    def state(self):
        """Guest RAM and CPU registers."""
        ram = b"".join(self.ram_pmemsave(addr, size) for addr, size in RAM_RANGES)
        return ram, self.hmp("info registers")


def run_vmigrate(*args):
    return subprocess.run([harness.vmigrate_bin(), *args], capture_output=True, text=True,
                          timeout=120)


def save(ws, name):
    """A QEMU `-M pc` guest that ran a moment, stopped and saved to a plain file."""
    src = PcQemu(ws, name).start()
    src.wait_runstate("running")
    # Let the firmware run a little so that RAM and registers are not the reset state.
    for _ in range(50):
        src.raw("query-status")
    src.cmd("stop")
    path = ws.path(f"{name}.mig")
    src.cmd("migrate", uri=f"file:{path}")
    info = src.wait_migration()
    assert info["status"] == "completed", info
    src.quit()
    return path


def restore(ws, name, path, mapped_ram, resave_mapped=None):
    """Restores PATH in a fresh QEMU; returns guest RAM and registers. With
    RESAVE_MAPPED, the restored (still paused) guest is then saved there by QEMU with
    mapped-ram."""
    dst = PcQemu(ws, name, incoming="defer").start()
    if mapped_ram:
        dst.set_caps(mapped_ram=True, multifd=True)
    dst.cmd("migrate-incoming", uri=f"file:{path}")
    info = dst.wait_migration()
    assert info["status"] == "completed", (info, dst.stderr_tail())
    state = dst.state()
    if resave_mapped:
        dst.set_caps(mapped_ram=True)
        dst.cmd("migrate", uri=f"file:{resave_mapped}")
        info = dst.wait_migration()
        assert info["status"] == "completed", info
    dst.quit()
    return state


def trailer(path):
    with open(path, "rb") as f:
        data = f.read()
    at = data.rindex(b"\x00\x06")
    return json.loads(data[at + 6:])


def configuration_caps(path):
    out = run_vmigrate("inspect", path, "--json")
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def pc_files():
    """QEMU's plain and mapped-ram saves of one stopped guest, and the state a restore
    of the plain one gives."""
    require("qemu", "vmigrate")
    ws = harness.Workspace("convert")
    try:
        plain = save(ws, "src")
        mapped = ws.path("qemu.mapped")
        reference = restore(ws, "reference", plain, mapped_ram=False, resave_mapped=mapped)
        ram, regs = reference
        assert ram.count(0) < len(ram) and "EIP=" in regs, "the reference state is empty"
        yield ws, plain, mapped, reference
    finally:
        ws.cleanup()


def assert_same_state(got, want):
    (ram, regs), (want_ram, want_regs) = got, want
    if ram != want_ram:
        diff = harness.first_difference(ram, want_ram)
        pytest.fail(f"guest RAM differs from the reference restore: {diff}")
    assert regs == want_regs


def test_plain_to_mapped_ram(pc_files):
    ws, plain, mapped, reference = pc_files
    out = ws.path("converted.mapped")
    r = run_vmigrate("convert", plain, out, "--to", "mapped-ram")
    assert r.returncode == 0, r.stderr
    assert "mapped-ram" in r.stdout
    assert '"mapped-ram"' in configuration_caps(out)
    # The trailer describes the new configuration record as QEMU's own mapped-ram file
    # does; the device descriptions are unchanged.
    assert trailer(out)["configuration"] == trailer(mapped)["configuration"]
    assert trailer(out)["devices"] == trailer(plain)["devices"]
    # Sparse: the file holds about as many blocks as the pages with contents need.
    st = os.stat(out)
    assert st.st_blocks * 512 < st.st_size
    assert_same_state(restore(ws, "frommapped", out, mapped_ram=True), reference)


def test_mapped_ram_to_plain(pc_files):
    ws, plain, mapped, reference = pc_files
    # QEMU's own mapped-ram file, and the round trip of its plain file.
    there = ws.path("there.mapped")
    r = run_vmigrate("convert", plain, there, "--to", "mapped-ram")
    assert r.returncode == 0, r.stderr
    for name, src in [("qemu-mapped", mapped), ("round-trip", there)]:
        out = ws.path(f"{name}.plain")
        r = run_vmigrate("convert", src, out, "--to", "plain")
        assert r.returncode == 0, r.stderr
        assert '"mapped-ram"' not in configuration_caps(out)
        assert trailer(out)["configuration"] == trailer(plain)["configuration"]
        assert_same_state(restore(ws, f"from-{name}", out, mapped_ram=False), reference)


def test_same_layout_refused(pc_files):
    ws, plain, _, _ = pc_files
    out = ws.path("same")
    r = run_vmigrate("convert", plain, out, "--to", "plain")
    assert r.returncode != 0
    assert "already a plain file" in r.stderr
    assert not os.path.exists(out)


def damaged_cases(data):
    """(name, bytes) of files damaged in ways the inspector names with an offset."""
    eof_tail = len(data) - data.rindex(b"\x00\x06")
    yield "truncated-header", data[:6]
    yield "truncated-ram", data[:len(data) // 2]
    yield "truncated-before-eof", data[:len(data) - eof_tail - 3]
    bad = bytearray(data)
    bad[0] = ord("X")
    yield "bad-magic", bytes(bad)
    # The first RAM record of the first PART: an unknown flag.
    part = data.index(b"\x02\x00\x00\x00")
    bad = bytearray(data)
    bad[part + 5 + 7] |= 0x01
    yield "bad-ram-flag", bytes(bad)


def test_damaged_inputs_fail_with_offset(pc_files):
    ws, plain, _, _ = pc_files
    with open(plain, "rb") as f:
        data = f.read()
    outdir = ws.path("damaged-out")
    os.mkdir(outdir)
    for name, bad in damaged_cases(data):
        src = ws.path(f"{name}.mig")
        with open(src, "wb") as f:
            f.write(bad)
        out = os.path.join(outdir, "out.mig")
        r = run_vmigrate("convert", src, out, "--to", "mapped-ram")
        assert r.returncode != 0, name
        m = re.search(r"byte offset (\d+)", r.stderr)
        assert m, (name, r.stderr)
        assert int(m.group(1)) <= len(bad), (name, r.stderr)
        assert "panicked" not in r.stderr, (name, r.stderr)
        assert os.listdir(outdir) == [], (name, os.listdir(outdir))
