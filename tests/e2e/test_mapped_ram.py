"""mapped-ram (capability `mapped-ram`): guest RAM at fixed offsets of a seekable file,
between QEMU 10.0.2 and vmigrate.

* Stopped and running `none` guests saved by either side, without multifd and with 1, 2
  and 8 channels, at file offset 0 and with `file:...,offset=4096`. Every file is checked
  against the format (QEVM at the offset, `mapped-ram` in the configuration, the page
  area at a 1 MiB-aligned absolute offset, a bitmap with exactly the non-zero pages, the
  page area holding the image, no multifd packet anywhere) and loaded by the other side;
  a file saved with multifd loads without it and the reverse.
* direct-io (O_DIRECT for the page area) both ways, where the file system allows it, and
  a clear refusal where it does not.
* QEMU's own mapped-ram captures loaded into vmigrate.
* A live `lab` guest saved over several dirty passes: the file stays RAM-sized, and the
  restored guest's self-check keeps passing.
* QEMU's rules and error texts for mapped-ram, side by side with QEMU.
* Damaged files (header offsets, version, truncation, a page record in a section): each
  fails with a message naming the problem, the monitor keeps answering, no panic.
"""
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time

import pytest

import harness
from harness import MiB, PAGE, wait_passes, workload
from conftest import require
from test_conformance import ALL_CAPS_OFF, RESET_PARAMS, caps, cmd, normalise, start_pair

MIB = 32
MULTIFD_MAGIC = struct.pack(">I", 0x11223344)
HEADER_LEN = 28
PAGES_ALIGNMENT = MiB
CAPTURES = harness.ORACLE_DIR / "captures"

PAIRS = [("qemu", "vmigrate"), ("vmigrate", "qemu"), ("vmigrate", "vmigrate")]
PAIR_IDS = [f"{s}-to-{d}" for s, d in PAIRS]
CHANNELS = [0, 1, 2, 8]   # 0: capability multifd off


def channels_id(n):
    return "no-multifd" if n == 0 else f"multifd{n}"


def offset_id(offset):
    return f"offset{offset}" if offset else "offset0"


@pytest.fixture(scope="module")
def mr_image(session_dir):
    """32 MiB mixed guest-RAM image for the mapped-ram runs."""
    return harness.Image(os.path.join(session_dir, "image32-mr.bin"), MIB * MiB, 21)


# --------------------------------------------------------------------------------------
# Reading a mapped-ram file


class MappedBlock:
    def __init__(self, name, used_length, header_at, version, page_size, bitmap_offset,
                 pages_offset):
        self.name, self.used_length, self.header_at = name, used_length, header_at
        self.version, self.page_size = version, page_size
        self.bitmap_offset, self.pages_offset = bitmap_offset, pages_offset

    @property
    def pages(self):
        return self.used_length // self.page_size

    @property
    def bitmap_len(self):
        return (self.pages + 63) // 64 * 8

    @property
    def end(self):
        return self.pages_offset + self.used_length

    def __repr__(self):
        return (f"MappedBlock({self.name} len={self.used_length:#x} header@{self.header_at:#x} "
                f"v{self.version} ps={self.page_size} bitmap@{self.bitmap_offset:#x} "
                f"pages@{self.pages_offset:#x})")


class MappedFile:
    """The parts of a mapped-ram file up to the end of the ram setup section."""

    def __init__(self, machine, capabilities, ram_section_id, blocks, setup_end):
        self.machine, self.capabilities = machine, capabilities
        self.ram_section_id, self.blocks, self.setup_end = ram_section_id, blocks, setup_end


def read_mapped_file(path, at=0):
    """Parses header, configuration and the ram START section of the mapped-ram file at
    PATH whose stream starts at file offset AT (block entries, their MappedRamHeaders,
    the jump past each page area, EOS and footer).  Raises AssertionError on anything
    that does not fit the format."""
    with open(path, "rb") as f:
        pos = at

        def take(n, what):
            nonlocal pos
            f.seek(pos)
            b = f.read(n)
            assert len(b) == n, f"file ends at {pos + len(b)} inside {what}"
            pos += n
            return b

        def be32(what):
            return struct.unpack(">I", take(4, what))[0]

        def be64(what):
            return struct.unpack(">Q", take(8, what))[0]

        def u8(what):
            return take(1, what)[0]

        def counted(what):
            return take(u8(what), what).decode()

        magic = take(8, "file header")
        assert magic == b"QEVM\x00\x00\x00\x03", \
            f"no QEVM v3 header at file offset {at}: {magic.hex()}"
        assert u8("configuration tag") == 0x07, "the configuration does not follow the header"
        machine = take(be32("machine name length"), "machine name").decode()
        capabilities = []
        while True:
            f.seek(pos)
            if f.read(1) != b"\x05":
                break
            pos += 1
            name = counted("configuration subsection name")
            be32("subsection version")
            if name == "configuration/capabilities":
                capabilities += [counted("capability") for _ in range(be32("capability count"))]
            elif name == "configuration/uuid":
                take(16, "uuid")
            elif name == "configuration/target-page-bits":
                be32("target page bits")
            else:
                raise AssertionError(f"unknown configuration subsection {name!r}")
        assert u8("section type") == 0x01, "the ram START section does not follow"
        sid = be32("section id")
        assert counted("section idstr") == "ram"
        be32("instance id")
        assert be32("section version") == 4
        word = be64("MEM_SIZE record")
        assert word & (PAGE - 1) == harness.RAM_MEM_SIZE, f"first ram record {word:#x}"
        total = word & ~(PAGE - 1)
        blocks = []
        while total > 0:
            name = counted("block idstr")
            used_length = be64("block used_length")
            header_at = pos
            version, page_size, bitmap_offset, pages_offset = struct.unpack(
                ">IQQQ", take(HEADER_LEN, "MappedRamHeader"))
            b = MappedBlock(name, used_length, header_at, version, page_size, bitmap_offset,
                            pages_offset)
            blocks.append(b)
            assert used_length <= total, f"block list overruns MEM_SIZE: {blocks}"
            total -= used_length
            pos = b.end
        assert be64("setup EOS") == harness.RAM_EOS, f"no EOS after the page area ({blocks})"
        assert u8("footer") == 0x7E and be32("footer id") == sid, "no footer after setup"
        return MappedFile(machine, capabilities, sid, blocks, pos)


def nonzero_bitmap(data, page=PAGE):
    """The bitmap (QEMU's encoding: 64-bit little-endian words) of the non-zero pages."""
    pages = len(data) // page
    bits = bytearray((pages + 63) // 64 * 8)
    zero = bytes(page)
    for i in range(pages):
        if data[i * page:(i + 1) * page] != zero:
            bits[i // 8] |= 1 << (i % 8)
    return bytes(bits)


def popcount(b):
    return int.from_bytes(b, "little").bit_count()


def check_mapped_file(path, at, image):
    """The file at PATH (stream at offset AT) is a mapped-ram file of one block `m0`
    holding IMAGE, laid out as QEMU lays it out."""
    head = harness.read_file(path, 0, at)
    assert head == bytes(at), f"bytes before offset={at} are not zero"
    mf = read_mapped_file(path, at)
    assert mf.machine == "none", mf.machine
    assert mf.capabilities == ["mapped-ram"], \
        f"configuration capabilities {mf.capabilities}, QEMU lists exactly ['mapped-ram']"
    assert len(mf.blocks) == 1, mf.blocks
    b = mf.blocks[0]
    assert (b.name, b.used_length) == ("m0", image.size), b
    assert b.version == 1 and b.page_size == PAGE, b
    assert b.bitmap_offset == b.header_at + HEADER_LEN, \
        f"bitmap does not follow the header directly: {b}"
    assert b.pages_offset % PAGES_ALIGNMENT == 0, \
        f"page area at {b.pages_offset:#x}, not on an absolute 1 MiB boundary: {b}"
    assert b.pages_offset >= b.bitmap_offset + b.bitmap_len, b
    assert b.pages_offset == -(-(b.bitmap_offset + b.bitmap_len) // PAGES_ALIGNMENT) \
        * PAGES_ALIGNMENT, f"page area not at the first 1 MiB boundary after the bitmap: {b}"
    bitmap = harness.read_file(path, b.bitmap_offset, b.bitmap_len)
    assert popcount(bitmap) == image.nonzero_pages, \
        f"bitmap has {popcount(bitmap)} bits set, the image {image.nonzero_pages} non-zero pages"
    assert bitmap == nonzero_bitmap(image.data), "bitmap bits are not the image's non-zero pages"
    area = harness.read_file(path, b.pages_offset, b.used_length)
    diff = harness.first_difference(area, image.data)
    assert diff is None, f"page area differs from the image: {diff}"
    size = os.stat(path).st_size
    rest = harness.read_file(path, 0, b.pages_offset) + harness.read_file(path, b.end)
    assert MULTIFD_MAGIC not in rest, \
        f"multifd magic 11223344 at {rest.find(MULTIFD_MAGIC)} outside the page area"
    assert size - b.end < 64 * 1024, f"{size - b.end} bytes of stream after the page area"
    allocated = os.stat(path).st_blocks * 512
    data = image.nonzero_pages * PAGE
    assert allocated <= data + b.pages_offset + 64 * 1024, \
        f"{allocated} bytes allocated for {data} bytes of non-zero pages: zero pages were " \
        f"written, the file is not sparse"
    return mf


# --------------------------------------------------------------------------------------
# Saving and restoring


def file_uri(path, offset=0):
    return f"file:{path}" + (f",offset={offset}" if offset else "")


def mapped_ram_params(channels, direct_io=False):
    """(capabilities, parameters) for mapped-ram with CHANNELS multifd channels."""
    c = {"mapped-ram": True, "multifd": channels > 0}
    p = {}
    if channels:
        p["multifd-channels"] = channels
    if direct_io:
        p["direct-io"] = True
    return c, p


def use_mapped_ram(m, channels, direct_io=False):
    c, p = mapped_ram_params(channels, direct_io)
    m.set_caps(**c)
    if p:
        m.set_params(**p)


def save(ws, impl, image, channels, offset=0, running=False, direct_io=False, path=None):
    """Saves a `none` guest holding IMAGE with mapped-ram; returns (source, its
    query-migrate, file path)."""
    src = ws.vm(impl, "src", mem_mib=image.size >> 20).start()
    src.write_ram(image.data)
    if not running:
        src.cmd("stop")
    use_mapped_ram(src, channels, direct_io)
    src.set_params(max_bandwidth=0)
    path = path or ws.path("mapped.bin")
    src.cmd("migrate", uri=file_uri(path, offset))
    si = src.wait_migration(timeout=60)
    assert si.get("status") == "completed", \
        f"{impl} could not save with mapped-ram, {channels_id(channels)}: {si}\n{ws.diagnostics()}"
    return src, si, path


def restore(ws, impl, uri, mem_mib, channels, direct_io=False, name="dst", **kw):
    dst = ws.vm(impl, name, mem_mib=mem_mib, incoming="defer", **kw).start()
    use_mapped_ram(dst, channels, direct_io)
    dst.cmd("migrate-incoming", uri=uri, **{"exit-on-error": False})
    di = dst.wait_migration(("completed", "failed"), timeout=60)
    return dst, di


def round_trip(ws, image, src_impl, dst_impl, src_channels, dst_channels, offset=0,
               running=False, direct_io=False):
    src, si, path = save(ws, src_impl, image, src_channels, offset, running, direct_io)
    assert si["ram"]["total"] == image.size, si
    check_mapped_file(path, offset, image)
    dst, di = restore(ws, dst_impl, file_uri(path, offset), image.size >> 20, dst_channels,
                      direct_io)
    assert di.get("status") == "completed", f"destination: {di}\n{ws.diagnostics()}"
    diff = dst.check_ram(image)
    assert diff is None, f"destination RAM differs from the image: {diff}"
    assert src.runstate() == "postmigrate"
    assert dst.runstate() == ("running" if running else "paused"), \
        "QEMU: the destination takes the source's run state"
    return src, dst


# --------------------------------------------------------------------------------------
# 1. Interop, byte for byte


@pytest.mark.vmigrate
@pytest.mark.parametrize("offset", [0, 4096], ids=offset_id)
@pytest.mark.parametrize("channels", CHANNELS, ids=channels_id)
@pytest.mark.parametrize("src_impl,dst_impl", PAIRS, ids=PAIR_IDS)
def test_stopped_guest(ws, mr_image, src_impl, dst_impl, channels, offset):
    require(src_impl, dst_impl)
    round_trip(ws, mr_image, src_impl, dst_impl, channels, channels, offset)


@pytest.mark.vmigrate
@pytest.mark.parametrize("src_channels,dst_channels", [(4, 0), (0, 4)],
                         ids=["saved-multifd4-loaded-without", "saved-without-loaded-multifd4"])
@pytest.mark.parametrize("src_impl,dst_impl", PAIRS, ids=PAIR_IDS)
def test_multifd_is_not_in_the_file(ws, mr_image, src_impl, dst_impl, src_channels,
                                    dst_channels):
    """The file is the same with and without multifd, so either loads either way."""
    require(src_impl, dst_impl)
    round_trip(ws, mr_image, src_impl, dst_impl, src_channels, dst_channels)


@pytest.mark.vmigrate
@pytest.mark.parametrize("channels", [0, 2], ids=channels_id)
@pytest.mark.parametrize("src_impl,dst_impl", PAIRS, ids=PAIR_IDS)
def test_running_guest(ws, mr_image, src_impl, dst_impl, channels):
    require(src_impl, dst_impl)
    src, dst = round_trip(ws, mr_image, src_impl, dst_impl, channels, channels, running=True)
    dst.quit()
    src.quit()
    assert src.proc.returncode == 0 and dst.proc.returncode == 0, ws.diagnostics()


# --------------------------------------------------------------------------------------
# 2. direct-io


def odirect_refusal(directory):
    """None when a file in DIRECTORY can be opened with O_DIRECT, else the error."""
    fd, path = tempfile.mkstemp(prefix=".odirect-probe-", dir=directory)
    os.close(fd)
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        os.close(fd)
        return None
    except OSError as e:
        return e
    finally:
        os.unlink(path)


def odirect_refusing_dir():
    """A writable directory whose file system refuses O_DIRECT (EINVAL), or None; and
    what was probed."""
    candidates = [os.environ.get("E2E_NO_ODIRECT_DIR"), "/dev/shm",
                  f"/run/user/{os.getuid()}", "/run", "/var/tmp", "/tmp"]
    probed = []
    for d in candidates:
        if not d or not os.path.isdir(d) or not os.access(d, os.W_OK):
            continue
        try:
            err = odirect_refusal(d)
        except OSError as e:
            probed.append(f"{d}: cannot create a file ({e.strerror})")
            continue
        if err is not None and err.errno == 22:
            return d, probed
        probed.append(f"{d}: O_DIRECT {'accepted' if err is None else err.strerror}")
    return None, probed


@pytest.mark.vmigrate
@pytest.mark.parametrize("offset", [0, 4096], ids=offset_id)
@pytest.mark.parametrize("src_impl,dst_impl", PAIRS, ids=PAIR_IDS)
def test_direct_io(ws, mr_image, src_impl, dst_impl, offset):
    require(src_impl, dst_impl)
    err = odirect_refusal(ws.tmp)
    if err is not None:
        pytest.skip(f"the file system of {ws.tmp} refuses O_DIRECT ({err.strerror}): "
                    f"direct-io cannot be tested there")
    round_trip(ws, mr_image, src_impl, dst_impl, 2, 2, offset, direct_io=True)


@pytest.mark.vmigrate
def test_direct_io_refused_by_the_file_system(ws, mr_image):
    """Where O_DIRECT is refused, saving and loading with direct-io fail with a message
    naming direct-io / O_DIRECT; the source keeps running with its RAM intact."""
    require("vmigrate")
    where, probed = odirect_refusing_dir()
    if where is None:
        pytest.skip("no writable file system here refuses O_DIRECT (probed "
                    + "; ".join(probed) + "); set E2E_NO_ODIRECT_DIR to one that does")
    sub = tempfile.mkdtemp(prefix="vme2e-odirect-", dir=where)
    try:
        src = ws.vm("vmigrate", "src", mem_mib=MIB).start()
        src.write_ram(mr_image.data)
        use_mapped_ram(src, 2, direct_io=True)
        r = src.raw("migrate", uri=file_uri(os.path.join(sub, "save.bin")))
        if "error" in r:
            text = r["error"]["desc"]
        else:
            si = src.wait_migration(timeout=30)
            assert si["status"] == "failed", f"saving with direct-io on {where}: {si}"
            text = si.get("error-desc", "")
        assert re.search(r"direct-io|O_DIRECT", text), \
            f"the error does not name direct-io or O_DIRECT: {text!r}"
        assert src.runstate() == "running", "the source must survive a failed save"
        assert src.check_ram(mr_image) is None

        # loading: a valid QEMU file on that file system, read with direct-io
        copy = os.path.join(sub, "mrmf.bin")
        subprocess.run(["cp", "--sparse=always", str(CAPTURES / "mrmf.bin"), copy], check=True)
        c, p = mapped_ram_params(4, direct_io=True)
        res = harness.load_stream(ws, "vmigrate", file_uri(copy), 8, caps=c, params=p)
        assert res.outcome == "failed", res
        assert re.search(r"direct-io|O_DIRECT", res.error_desc), \
            f"the error does not name direct-io or O_DIRECT: {res.error_desc!r}"
        assert res.machine.runstate() == "inmigrate"
        assert "panicked" not in res.stderr
    finally:
        shutil.rmtree(sub, ignore_errors=True)


def small_tmpfs(parent, size_mib):
    """Mounts a SIZE_MIB MiB tmpfs on a new directory under PARENT; returns (the
    directory, None) or (None, why it could not)."""
    where = tempfile.mkdtemp(prefix="vme2e-full-", dir=parent)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "vme2e-full", where],
                       capture_output=True, text=True)
    if r.returncode != 0:
        os.rmdir(where)
        return None, (r.stderr.strip() or f"mount exited with status {r.returncode}")
    return where, None


@pytest.mark.vmigrate
@pytest.mark.parametrize("channels", [0, 2], ids=channels_id)
def test_full_file_system(ws, mr_image, channels):
    """A save to a file system with no room for the page area fails with ENOSPC's text,
    and the source keeps running with its RAM intact."""
    require("vmigrate")
    where, why = small_tmpfs(ws.tmp, 8)
    if where is None:
        pytest.skip(f"cannot mount a small tmpfs to fill up ({why})")
    try:
        src = ws.vm("vmigrate", "src", mem_mib=MIB).start()
        src.write_ram(mr_image.data)
        use_mapped_ram(src, channels)
        src.cmd("migrate", uri=file_uri(os.path.join(where, "save.bin")))
        si = src.wait_migration(timeout=30)
        assert si["status"] == "failed", f"saving {MIB} MiB into an 8 MiB file system: {si}"
        assert "No space left on device" in si.get("error-desc", ""), si
        assert src.proc.poll() is None, "the source process died"
        assert src.runstate() == "running", "the source must survive a failed save"
        assert src.check_ram(mr_image) is None
    finally:
        subprocess.run(["umount", "-l", where], capture_output=True)
        os.rmdir(where)


# --------------------------------------------------------------------------------------
# 3. QEMU's captures

# (file, multifd channels it was saved with, stream offset, fill spec, bits set)
CAPTURE_CASES = [
    ("mr.bin", 0, 0, "0-3,100,2047", 6),
    ("mrmf.bin", 4, 0, "0-3,100,200-260,2047", 67),
    ("mroff.bin", 2, 4096, "0-3", 4),
]
CAPTURE_MIB = 8


def fill_image(spec, mib):
    """Guest RAM as the captures' fill spec leaves it (captures/README.md)."""
    ram = bytearray(mib * MiB)
    for part in spec.split(","):
        lo, hi = map(int, part.split("-")) if "-" in part else (int(part), int(part))
        for i in range(lo, hi + 1):
            ram[i * PAGE:(i + 1) * PAGE] = harness.synthetic_pattern_page(i)
    return bytes(ram)


@pytest.mark.parametrize("name,channels,offset,spec,bits", CAPTURE_CASES,
                         ids=[c[0] for c in CAPTURE_CASES])
@pytest.mark.parametrize("impl", [
    pytest.param("vmigrate", marks=pytest.mark.vmigrate, id="vmigrate"),
    pytest.param("qemu", marks=pytest.mark.harness_check, id="harness_check-qemu"),
])
def test_qemu_capture_loads(ws, impl, name, channels, offset, spec, bits):
    require(impl)
    path = CAPTURES / name
    want = fill_image(spec, CAPTURE_MIB)
    mf = read_mapped_file(path, offset)
    b = mf.blocks[0]
    assert (b.name, b.used_length, b.pages_offset) == ("m0", CAPTURE_MIB * MiB, 0x100000), b
    assert b.bitmap_offset == offset + 0x80, b
    bitmap = harness.read_file(path, b.bitmap_offset, b.bitmap_len)
    assert popcount(bitmap) == bits and bitmap == nonzero_bitmap(want), \
        f"{name} is not what captures/README.md describes"
    c, p = mapped_ram_params(channels)
    res = harness.load_stream(ws, impl, file_uri(path, offset), CAPTURE_MIB, caps=c, params=p)
    assert res.outcome == "completed", res
    assert res.runstate == "paused", res
    diff = harness.first_difference(res.machine.ram(), want)
    assert diff is None, f"RAM after loading {name}: {diff}"


# --------------------------------------------------------------------------------------
# 4. A live guest saved over several passes


def lab(ws, name, mem_mib, spec, **kw):
    return ws.vm("vmigrate", name, mem_mib=mem_mib, machine="lab",
                 extra=["--accel", "soft", "--cpus", "1", "--workload", spec], **kw)


LAB_MIB = 64
LAB_SPEC = "hot=16M,rate=100M,verify"
HOT_PAGES = 16 * MiB // PAGE


def wait_dirty_syncs(m, n, timeout=30):
    """Waits, while the migration stays in setup/active, for N dirty syncs."""
    t0 = time.time()
    while True:
        info = m.query_migrate()
        assert info.get("status") in ("setup", "active"), \
            f"the save switched over or ended too early: {info}\n{m.describe()}"
        if info.get("ram", {}).get("dirty-sync-count", 0) >= n:
            return info
        assert time.time() - t0 < timeout, f"fewer than {n} dirty syncs after {timeout} s: {info}"
        time.sleep(0.02)


@pytest.mark.vmigrate
@pytest.mark.parametrize("channels", [0, 2], ids=channels_id)
def test_live_guest_to_file(ws, channels):
    """A soft guest rewriting a 16 MiB hot set at 100 MB/s, saved at 32 MiB/s with a
    1 ms downtime limit and a switchover bandwidth of 1 MiB/s: the save cannot switch
    over, so it makes pass after pass, rewriting pages in place. After three dirty
    syncs the limits are lifted and it completes. The file never grows past RAM plus
    metadata, and the guest restored from it keeps passing its self-check."""
    require("vmigrate")
    bound = LAB_MIB * MiB + LAB_MIB * MiB // 100 + 2 * MiB
    src = lab(ws, "src", LAB_MIB, LAB_SPEC).start()
    w0 = wait_passes(src, 2)
    assert w0["violations"] == 0 and w0["accel"] == "soft", w0
    use_mapped_ram(src, channels)
    src.set_params(max_bandwidth=32 * MiB, downtime_limit=1, avail_switchover_bandwidth=MiB)
    path = ws.path("live.bin")
    src.cmd("migrate", uri=file_uri(path))
    wait_dirty_syncs(src, 3)
    time.sleep(0.3)
    mid = os.stat(path).st_size
    assert mid <= bound, f"file is {mid} bytes mid-save, more than RAM + 1% + 2 MiB ({bound})"
    src.set_params(max_bandwidth=0, downtime_limit=300, avail_switchover_bandwidth=0)
    si = src.wait_migration(timeout=30)
    assert si["status"] == "completed", f"{si}\n{ws.diagnostics()}"
    ram = si["ram"]
    assert ram["dirty-sync-count"] >= 3, ram
    assert ram["normal"] > 2 * HOT_PAGES, \
        f"hot pages were not written again in later passes: {ram}"
    assert src.runstate() == "postmigrate"
    size = os.stat(path).st_size
    assert size <= bound, f"file is {size} bytes, more than RAM + 1% + 2 MiB ({bound})"
    at_end = workload(src)
    assert at_end["violations"] == 0, at_end

    dst, di = restore(ws, "vmigrate", file_uri(path), LAB_MIB, channels, name="dst",
                      machine="lab", start_paused=True,
                      extra=["--accel", "soft", "--cpus", "1", "--workload", LAB_SPEC])
    assert di["status"] == "completed", f"{di}\n{ws.diagnostics()}"
    assert dst.runstate() == "paused"
    diff = harness.first_difference(dst.ram(), src.ram())
    assert diff is None, f"restored RAM differs from the source's at switchover: {diff}"
    arrived = workload(dst)
    assert (arrived["passes"], arrived["pages-written"]) == \
        (at_end["passes"], at_end["pages-written"]), (arrived, at_end)
    dst.cmd("cont")
    after = wait_passes(dst, arrived["passes"] + 3)
    assert after["violations"] == 0, after


# --------------------------------------------------------------------------------------
# 5. QEMU's rules and texts, side by side


SEEKABLE = "Migration requires seekable transport (e.g. file)"
MULTI_CHANNEL = "Migration requires multi-channel URIs (e.g. tcp)"
NO_COMPRESSION = "Cannot use compression with mapped-ram"
NO_TLS = "Cannot use TLS with mapped-ram"
TRAP = "Mapped-ram only available for non-compressed non-TLS multifd migration"
WITH_XBZRLE = "Mapped-ram migration is incompatible with xbzrle"
WITH_POSTCOPY = "Mapped-ram migration is incompatible with postcopy"
OK = None


def params(**p):
    return cmd("migrate-set-parameters", **{k.replace("_", "-"): v for k, v in p.items()})


def source_rules(d):
    """(command, QEMU's error text or OK) on a plain VM; D: a scratch directory."""
    return [
        (caps("mapped-ram"), OK),
        (cmd("migrate", uri="tcp:127.0.0.1:1"), SEEKABLE),
        (cmd("migrate", uri="exec:cat >/dev/null"), SEEKABLE),
        (caps("mapped-ram", "multifd"), OK),
        (cmd("migrate", uri="tcp:127.0.0.1:1"), SEEKABLE),
        (ALL_CAPS_OFF, OK),
        (caps("multifd"), OK),
        (cmd("migrate", uri=f"file:{d}/multifd.bin"), MULTI_CHANNEL),
        (cmd("migrate", uri=f"file:{d}/multifd.bin,offset=4096"), MULTI_CHANNEL),
        (ALL_CAPS_OFF, OK),
        (caps("mapped-ram", "xbzrle"), WITH_XBZRLE),
        (caps("xbzrle", "mapped-ram"), WITH_XBZRLE),
        (caps("mapped-ram", "postcopy-ram"), WITH_POSTCOPY),
        (caps("postcopy-ram", "mapped-ram"), WITH_POSTCOPY),
        (caps("mapped-ram"), OK),
        (caps("xbzrle"), WITH_XBZRLE),
        (caps("postcopy-ram"), WITH_POSTCOPY),
        (cmd("query-migrate-capabilities"), OK),
        # compression set while mapped-ram is on: accepted (the check reads the stored
        # value), then every parameter change is refused and migrate fails
        (caps("mapped-ram", "multifd"), OK),
        (params(multifd_compression="zlib"), OK),
        (params(multifd_compression="none"), TRAP),
        (params(downtime_limit=100), TRAP),
        (cmd("migrate", uri=f"file:{d}/zlib.bin"), NO_COMPRESSION),
        (ALL_CAPS_OFF, OK),
        (RESET_PARAMS, OK),
        # compression first, then mapped-ram: not checked until migrate
        (params(multifd_compression="zstd"), OK),
        (caps("mapped-ram"), OK),
        (cmd("migrate", uri=f"file:{d}/zstd.bin"), NO_COMPRESSION),
        (caps("mapped-ram", "multifd"), OK),
        (cmd("migrate", uri=f"file:{d}/zstd.bin"), NO_COMPRESSION),
        (ALL_CAPS_OFF, OK),
        (RESET_PARAMS, OK),
        (caps("mapped-ram"), OK),
        (params(tls_creds="tls0"), OK),
        (cmd("migrate", uri=f"file:{d}/tls.bin"), NO_TLS),
        (params(tls_creds=""), TRAP),
        (ALL_CAPS_OFF, OK),
        (RESET_PARAMS, OK),
        (cmd("query-migrate"), OK),
        (cmd("query-status"), OK),
    ]


def incoming_rules(d):
    """(command, QEMU's error text or OK) on a VM started with -incoming defer."""
    return [
        (caps("mapped-ram"), OK),
        (cmd("migrate-incoming", uri="tcp:127.0.0.1:0"), SEEKABLE),
        (caps("mapped-ram", "multifd"), OK),
        (cmd("migrate-incoming", uri="tcp:127.0.0.1:0"), SEEKABLE),
        (ALL_CAPS_OFF, OK),
        (caps("multifd"), OK),
        (cmd("migrate-incoming", uri=f"file:{d}/none.bin"), MULTI_CHANNEL),
        (ALL_CAPS_OFF, OK),
        (cmd("query-migrate"), OK),
        (cmd("query-status"), OK),
    ]


def run_rules(ws, tag, rules, **kw):
    _, _, q, v = start_pair(ws, tag, **kw)
    wrong, diffs = [], []
    for msg, qemu_text in rules:
        qr, vr = q.send(msg), v.send(msg)
        got = qr.get("error", {}).get("desc") if "error" in qr else None
        if got != qemu_text:
            wrong.append(f"{msg}\n    qemu: {qr}\n    expected: {qemu_text!r}")
        if normalise(qr) != normalise(vr):
            diffs.append(f"{msg}\n    qemu:     {qr}\n    vmigrate: {vr}")
    assert not wrong, "QEMU does not behave as recorded (harness check):\n" + "\n".join(wrong)
    assert not diffs, f"{len(diffs)} replies differ from QEMU's:\n" + "\n".join(diffs)


@pytest.mark.vmigrate
def test_rules_on_the_source(ws):
    require("qemu", "vmigrate")
    run_rules(ws, "src", source_rules(ws.tmp))


@pytest.mark.vmigrate
def test_rules_on_the_destination(ws):
    require("qemu", "vmigrate")
    run_rules(ws, "dst", incoming_rules(ws.tmp), incoming="defer")


CAP_MISMATCH = [
    # (file, destination mapped-ram, QEMU's text)
    ("mr.bin", False, "Capability mapped-ram is off, but received capability is on"),
    ("base.bin", True, "Capability mapped-ram is on, but received capability is off"),
]


@pytest.mark.parametrize("name,dst_mapped,text", CAP_MISMATCH,
                         ids=["file-on-destination-off", "file-off-destination-on"])
@pytest.mark.parametrize("impl", [
    pytest.param("vmigrate", marks=pytest.mark.vmigrate, id="vmigrate"),
    pytest.param("qemu", marks=pytest.mark.harness_check, id="harness_check-qemu"),
])
def test_capability_mismatch(ws, impl, name, dst_mapped, text):
    """QEMU prints the mismatch on stderr and reports a generic error-desc; vmigrate
    must give QEMU's text in error-desc. Either way the destination stays up."""
    require(impl)
    res = harness.load_stream(ws, impl, f"file:{CAPTURES / name}", CAPTURE_MIB,
                              caps={"mapped-ram": dst_mapped})
    assert res.outcome == "failed", res
    if impl == "qemu":
        assert text in res.stderr, res
    else:
        assert text in res.error_desc, f"error-desc does not give QEMU's text: {res.error_desc!r}"
        assert "panicked" not in res.stderr
    m = res.machine
    assert m.runstate() == "inmigrate"
    assert m.query_migrate()["status"] == "failed"
    m.quit()
    assert m.proc.returncode == 0, m.describe()


# --------------------------------------------------------------------------------------
# 6. Damaged files

HOSTILE_MIB = 16
TRUNCATED = re.compile(r"(?i)(truncat|end of (the )?(stream|file|data|input)|\beof\b|"
                       r"short read|unexpected(ly)? end|ended|too short|past the end)")


def be64(v):
    return struct.pack(">Q", v)


def stream_records_after(data, pos):
    """(tag, start) of the top-level records from POS on, as far as PART/END/commands
    go (enough to find the first ram PART or END after the setup section)."""
    out = []
    while pos < len(data):
        tag = data[pos]
        out.append((tag, pos))
        if tag in (2, 3):
            end = data.index(be64(harness.RAM_EOS), pos + 5) + 8
            pos = end + 5
        elif tag == 8:
            pos += 5 + struct.unpack_from(">H", data, pos + 3)[0]
        else:
            break
    return out


def damaged_files(data, mf):
    """(name, damaged bytes, error pattern, (lo, hi) range the mentioned offset must be
    in).  A block of a fixed machine size is a whole number of 64-page bitmap words, so
    a bit past the block's last page cannot be made; a bitmap that overlaps the page area
    and a header of the next version stand in for it."""
    b = mf.blocks[0]
    h = b.header_at
    at_header = (h, h + HEADER_LEN)
    size = len(data)
    beyond = (size + MiB) // MiB * MiB + MiB

    def patch(at, value):
        d = bytearray(data)
        d[at:at + len(value)] = value
        return bytes(d)

    out = [
        ("version_2", patch(h, struct.pack(">I", 2)), r"version 2", at_header),
        ("page_size_8k", patch(h + 4, be64(8192)), r"page size", at_header),
        ("bitmap_offset_past_eof", patch(h + 12, be64(beyond)),
         r"bitmap.*(past|beyond|end|truncat)", at_header),
        ("bitmap_offset_at_eof", patch(h + 12, be64(size - 8)),
         r"bitmap.*(past|beyond|end|truncat)", at_header),
        ("bitmap_offset_2^64-8", patch(h + 12, be64((1 << 64) - 8)), r"bitmap", at_header),
        ("bitmap_overlaps_page_area", patch(h + 12, be64(b.pages_offset + 16 * PAGE)),
         r"bitmap.*overlap", at_header),
        ("pages_offset_past_eof", patch(h + 20, be64(beyond)),
         r"pages offset.*(past|beyond|end)", at_header),
        ("pages_offset_2^64-page", patch(h + 20, be64((1 << 64) - PAGE)),
         r"pages offset", at_header),
        ("pages_offset_unaligned", patch(h + 20, be64(b.pages_offset + 0x800)),
         r"pages offset.*align", at_header),
    ]
    # cut inside the header
    out.append(("truncated_header", data[:h + 10], TRUNCATED.pattern, (0, h + 10)))
    # cut inside the page area, in the middle of the last page whose bit is set
    bitmap = data[b.bitmap_offset:b.bitmap_offset + b.bitmap_len]
    last = max(i for i in range(b.pages) if bitmap[i // 8] >> (i % 8) & 1)
    cut = b.pages_offset + last * PAGE + PAGE // 2
    out.append(("truncated_page_area", data[:cut],
                r"(?=.*(truncat|past the end|ended))(?=.*(page area|stream))", (0, cut)))
    # a PAGE record at the start of the first ram PART (QEMU writes PART{EOS}) or END
    recs = [r for r in stream_records_after(data, mf.setup_end) if r[0] in (2, 3)]
    assert recs, "no ram PART or END section after the setup section"
    ins = recs[0][1] + 5
    page_rec = be64(harness.RAM_PAGE) + b"\x02m0" + bytes(range(256)) * (PAGE // 256)
    out.append(("page_record_in_" + ("part" if recs[0][0] == 2 else "end"),
                data[:ins] + page_rec + data[ins:], r"Unexpected RAM flags",
                (ins, ins + len(page_rec))))
    return out


@pytest.mark.vmigrate
@pytest.mark.parametrize("loader_channels", [0, 4], ids=lambda n: "load-" + channels_id(n))
@pytest.mark.parametrize("writer", ["vmigrate", "qemu"], ids=["vmigrate-file", "qemu-file"])
def test_damaged_file(ws, small_image, writer, loader_channels):
    require(writer, "vmigrate")
    _, _, path = save(ws, writer, small_image, 0)
    data = harness.read_file(path)
    mf = read_mapped_file(path)
    problems = []
    for n, (name, bad, pattern, (lo, hi)) in enumerate(damaged_files(data, mf)):
        p = ws.path(f"{name}.bin")
        with open(p, "wb") as f:
            f.write(bad)
        c, prm = mapped_ram_params(loader_channels)
        res = harness.load_stream(ws, "vmigrate", file_uri(p), HOSTILE_MIB, name=f"d{n}",
                                  caps=c, params=prm)
        m = res.machine
        text = res.error_desc
        try:
            assert res.outcome == "failed", f"load did not fail: {res}"
            assert re.search(pattern, text, re.I), \
                f"error-desc does not name the problem (want /{pattern}/): {text!r}"
            offs = harness.mentioned_offsets(text)
            assert any(lo <= o <= hi for o in offs), \
                f"error-desc gives no offset in [{lo}, {hi}] ('offset N'): {text!r}"
            assert m.alive() and m.runstate() == "inmigrate", "the monitor does not answer"
            assert m.query_migrate()["status"] == "failed"
            assert "panicked" not in m.stderr_text(), m.stderr_tail()
            m.quit()
            assert m.proc.returncode == 0, m.describe()
        except (AssertionError, harness.HarnessError) as e:
            problems.append(f"{name}: {e}")
        m.destroy()
        os.unlink(p)
    assert not problems, f"{len(problems)} damaged file(s) mishandled:\n" + "\n".join(problems)
