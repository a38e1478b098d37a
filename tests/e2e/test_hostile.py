"""Hostile input and interrupted migrations.

* every synthetic stream of tests/qemu-oracle/captures/synthetic loaded into a
  destination, once with QMP `migrate-incoming` (exit-on-error false) and once with the
  file URI on the command line;
* streams written by a real source, then truncated or patched;
* the destination killed, or the migration cancelled, in the middle of a migration.

Each test runs against vmigrate; the `qemu` variants run the same checks against QEMU
10.0.2 to prove the expectations (marked harness_check).  QEMU reports only a generic
error-desc ("load of migration failed: Invalid argument") and prints the reason on
stderr; vmigrate must put the reason into error-desc as well, with the byte offset in
the stream where it found the problem ("offset N").
"""
import os
import re
import struct
import time

import pytest

import harness
from harness import MiB
from conftest import require

SYNTHETIC = sorted(p[4:-4] for p in os.listdir(harness.SYNTHETIC_DIR)
                   if p.startswith("gen_") and p.endswith(".bin")) \
    if harness.SYNTHETIC_DIR.is_dir() else []

LOADERS = [pytest.param("vmigrate", marks=pytest.mark.vmigrate, id="vmigrate"),
           pytest.param("qemu", marks=pytest.mark.harness_check, id="harness_check-qemu")]

# (stream writer, loader)
WRITER_LOADER = [
    pytest.param("vmigrate", "vmigrate", marks=pytest.mark.vmigrate, id="vmigrate-to-vmigrate"),
    pytest.param("qemu", "vmigrate", marks=pytest.mark.vmigrate, id="qemu-to-vmigrate"),
    pytest.param("qemu", "qemu", marks=pytest.mark.harness_check, id="harness_check-qemu-to-qemu"),
]

TRUNCATION_RE = re.compile(r"(?i)(end of (the )?(stream|file|data|input)|\beof\b|truncat|"
                           r"short read|unexpected(ly)? end|ended|too short)")
QEMU_ERROR_DESC = re.compile(r"^load of migration failed: ")


def expect_rejection(res, impl, pattern, qemu_text, where=None):
    """Checks on a load that must fail.  WHERE: (lo, hi) range the mentioned offset
    must fall in, for vmigrate."""
    if impl == "qemu":
        if res.outcome == "failed":
            assert QEMU_ERROR_DESC.match(res.error_desc), res
        if qemu_text is not None:
            assert qemu_text in res.stderr, res
        return
    text = res.error_desc if res.outcome == "failed" else res.stderr
    assert re.search(pattern, text, re.I), \
        f"message does not name the problem (want /{pattern}/): {text!r}"
    offs = harness.mentioned_offsets(text)
    assert offs, f"message gives no byte offset ('offset N'): {text!r}"
    if where is not None:
        lo, hi = where
        assert any(lo <= o <= hi for o in offs), \
            f"offsets {offs} in {text!r} are not within the bad record [{lo}, {hi}]"


def check_synthetic_expectation(variant):
    if variant not in harness.SYNTHETIC_ACCEPTED and variant not in harness.SYNTHETIC_REJECTED:
        pytest.fail(f"no expected result recorded in harness.py for synthetic stream {variant}")


# --------------------------------------------------------------------------------------
# synthetic streams


@pytest.mark.parametrize("variant", SYNTHETIC)
@pytest.mark.parametrize("impl", LOADERS)
def test_synthetic_stream_qmp(ws, impl, variant):
    """migrate-incoming {"uri": "file:...", "exit-on-error": false}"""
    require(impl)
    check_synthetic_expectation(variant)
    path = harness.SYNTHETIC_DIR / f"gen_{variant}.bin"
    res = harness.load_stream(ws, impl, f"file:{path}", harness.SYNTH_MEM_MIB)
    m = res.machine
    if variant in harness.SYNTHETIC_ACCEPTED:
        assert res.outcome == "completed", res
        assert res.runstate == harness.SYNTHETIC_ACCEPTED[variant], res
        bad = harness.synthetic_ram_ok(m.ram())
        assert bad is None, bad
    else:
        assert res.outcome == "failed", res
        assert res.error_desc, f"failed without error-desc: {res}"
        pattern, qemu_text = harness.SYNTHETIC_REJECTED[variant]
        expect_rejection(res, impl, pattern, qemu_text)
        # the monitor keeps answering; the VM stays in inmigrate
        assert m.alive()
        assert m.runstate() == "inmigrate"
        assert m.query_migrate()["status"] == "failed"
        m.quit()
        assert m.proc.returncode == 0, m.describe()


@pytest.mark.parametrize("variant", SYNTHETIC)
@pytest.mark.parametrize("impl", LOADERS)
def test_synthetic_stream_cmdline(ws, impl, variant):
    """-incoming file:... (exit-on-error is true): a bad stream ends the process with
    status 1 and the reason on stderr."""
    require(impl)
    check_synthetic_expectation(variant)
    path = harness.SYNTHETIC_DIR / f"gen_{variant}.bin"
    res = harness.load_stream(ws, impl, f"file:{path}", harness.SYNTH_MEM_MIB, cmdline=True)
    if variant in harness.SYNTHETIC_ACCEPTED:
        assert res.outcome == "completed", res
        assert res.runstate == harness.SYNTHETIC_ACCEPTED[variant], res
        assert harness.synthetic_ram_ok(res.machine.ram()) is None
    else:
        assert res.outcome == "exited", res
        assert res.rc == 1, f"exit status {res.rc}, QEMU exits with 1: {res}"
        pattern, qemu_text = harness.SYNTHETIC_REJECTED[variant]
        expect_rejection(res, impl, pattern, qemu_text)


# --------------------------------------------------------------------------------------
# streams written by a real source, then damaged

STREAM_MIB = 16


def write_stream(ws, impl, image):
    """Save a paused 16 MiB guest holding IMAGE to a file; returns (path, bytes)."""
    src = ws.vm(impl, "writer", mem_mib=STREAM_MIB).start()
    src.write_ram(image.data)
    src.cmd("stop")
    path = ws.path("valid.bin")
    src.cmd("migrate", uri=f"file:{path}")
    info = src.wait_migration()
    assert info["status"] == "completed", f"{impl} could not write a stream: {info}"
    src.quit()
    return path, harness.read_file(path)


def records(data):
    recs = harness.walk_stream(data)
    kinds = [r.kind for r in recs]
    assert "eof" in kinds, f"could not walk the written stream; records found: {recs[-5:]}"
    return recs


def truncation_points(data, recs):
    """Cut lengths: every record boundary outside the page records, the first and last
    few page records, points inside records, and the first bytes of the stream."""
    pts = {0, 1, 3, 4, 5, 7, 9, 12, len(data) - 1}
    pages = [r for r in recs if r.kind in ("ram-page", "ram-zero")]
    for r in recs:
        if r.kind not in ("ram-page", "ram-zero"):
            pts.update((r.start, r.end, r.start + 1))
    for r in pages[:3] + pages[len(pages) // 2:len(pages) // 2 + 1] + pages[-2:]:
        pts.update((r.start + 1, r.start + 8, r.end - 1, r.end))
    vmdesc = [r for r in recs if r.kind == "vmdesc"]
    if vmdesc:
        pts.add((vmdesc[0].start + vmdesc[0].end) // 2)
    return sorted(p for p in pts if 0 <= p < len(data))


@pytest.mark.parametrize("writer,loader", WRITER_LOADER)
def test_truncated_stream(ws, small_image, writer, loader):
    """A valid stream cut short anywhere before its EOF marker must fail to load and
    name the place; cut after EOF (only the optional vmdesc trailer lost), it loads."""
    require(writer, loader)
    path, data = write_stream(ws, writer, small_image)
    recs = records(data)
    eof_end = [r for r in recs if r.kind == "eof"][0].end
    problems = []
    for n, cut in enumerate(truncation_points(data, recs)):
        cut_path = ws.path(f"cut{cut}.bin")
        with open(cut_path, "wb") as f:
            f.write(data[:cut])
        res = harness.load_stream(ws, loader, f"file:{cut_path}", STREAM_MIB, name=f"cut{n}")
        if cut >= eof_end:
            if res.outcome != "completed":
                problems.append(f"cut at {cut} (after EOF at {eof_end - 1}): {res}")
            elif res.machine.check_ram(small_image) is not None:
                problems.append(f"cut at {cut}: RAM differs after load")
        elif res.outcome != "failed":
            problems.append(f"cut at {cut} of {len(data)}: {res}")
        elif loader == "vmigrate":
            text = res.error_desc
            offs = harness.mentioned_offsets(text)
            # shorter than the 8-byte header, QEMU's own wording also fits
            header_words = cut < 8 and re.search(
                r"Not a migration stream|Unsupported migration stream version", text)
            if not TRUNCATION_RE.search(text) and not header_words:
                problems.append(f"cut at {cut}: error-desc does not say the stream ended: {text!r}")
            if not offs:
                problems.append(f"cut at {cut}: error-desc gives no offset: {text!r}")
            elif not any(o <= cut for o in offs):
                problems.append(f"cut at {cut}: error-desc offsets {offs} lie beyond the end")
        if res.machine.alive():
            try:
                res.machine.runstate()
            except harness.HarnessError as e:
                problems.append(f"cut at {cut}: monitor does not answer after the load: {e}")
        res.machine.destroy()
        os.unlink(cut_path)
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:40])


def patch_u64(data, at, value):
    b = bytearray(data)
    b[at:at + 8] = struct.pack(">Q", value)
    return bytes(b)


def patch_bytes(data, at, new):
    b = bytearray(data)
    b[at:at + len(new)] = new
    return bytes(b)


def corruptions(data, recs):
    """(name, damaged stream, pattern for vmigrate, QEMU's stderr text, record range)"""
    out = []
    out.append(("wrong_magic", patch_bytes(data, 0, b"QEVX"), r"Not a migration stream",
                "Not a migration stream", (0, 8)))
    blk = [r for r in recs if r.kind == "ram-block"][0]
    out.append(("block_length_2^63", patch_u64(data, blk.length_at, 1 << 63),
                r"Size mismatch: m0: 0x8000000000000000 != 0x1000000",
                "Size mismatch: m0: 0x8000000000000000 != 0x1000000", (blk.start, blk.end)))
    pages = [r for r in recs if r.kind == "ram-page" and r.name_at is None]
    pg = pages[len(pages) // 2]
    flags = struct.unpack_from(">Q", data, pg.start)[0] & 0xFFF
    out.append(("ram_offset_at_block_end", patch_u64(data, pg.start, (STREAM_MIB * MiB) | flags),
                r"Illegal RAM offset (0x)?1000000\b", "Illegal RAM offset 1000000", (pg.start, pg.end)))
    out.append(("ram_offset_far", patch_u64(data, pg.start, (1 << 40) | flags),
                r"Illegal RAM offset (0x)?10000000000\b", "Illegal RAM offset 10000000000",
                (pg.start, pg.end)))
    named = [r for r in recs if r.kind in ("ram-page", "ram-zero") and r.name_at is not None][0]
    ln = data[named.name_at]
    out.append(("unknown_block_in_page_record",
                patch_bytes(data, named.name_at + 1, b"z" * ln),
                "Can't find block " + "z" * ln, "Can't find block " + "z" * ln,
                (named.start, named.end)))
    timer = [r for r in recs if r.kind == "section-header" and r.idstr == "timer"][0]
    out.append(("unknown_section", patch_bytes(data, timer.idstr_at, b"timex"),
                r"Unknown savevm section or instance 'timex' 0",
                "Unknown savevm section or instance 'timex' 0", (timer.start, timer.end)))
    return out


@pytest.mark.parametrize("writer,loader", WRITER_LOADER)
def test_corrupted_stream(ws, small_image, writer, loader):
    """Wrong magic, absurd block length, RAM offset past the block, unknown block name,
    unknown section: each fails with its reason and the offset of the bad record; the
    monitor keeps answering."""
    require(writer, loader)
    path, data = write_stream(ws, writer, small_image)
    recs = records(data)
    problems = []
    for name, bad, pattern, qemu_text, where in corruptions(data, recs):
        p = ws.path(f"{name}.bin")
        with open(p, "wb") as f:
            f.write(bad)
        res = harness.load_stream(ws, loader, f"file:{p}", STREAM_MIB, name=name)
        try:
            assert res.outcome == "failed", res
            expect_rejection(res, loader, pattern, qemu_text, where)
            assert res.machine.runstate() == "inmigrate"
        except AssertionError as e:
            problems.append(f"{name}: {e}")
        res.machine.destroy()
        os.unlink(p)
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------
# interrupted migrations

INTERRUPT_PAIRS = [
    pytest.param("vmigrate", "vmigrate", marks=pytest.mark.vmigrate, id="vmigrate-to-vmigrate"),
    pytest.param("vmigrate", "qemu", marks=pytest.mark.vmigrate, id="vmigrate-to-qemu"),
    pytest.param("qemu", "vmigrate", marks=pytest.mark.vmigrate, id="qemu-to-vmigrate"),
    pytest.param("qemu", "qemu", marks=pytest.mark.harness_check, id="harness_check-qemu-to-qemu"),
]
SLOW_BW = 64 * MiB


def start_slow_migration(ws, image, src_impl, dst_impl):
    """A running 512 MiB source migrating over tcp at 64 MiB/s, caught while active."""
    src = ws.vm(src_impl, "src", mem_mib=image.size >> 20).start()
    src.write_ram(image.data)
    assert src.runstate() == "running"
    dst = ws.vm(dst_impl, "dst1", mem_mib=image.size >> 20, incoming="defer").start()
    for m in (src, dst):
        m.set_caps(events=True)
    src.set_params(max_bandwidth=SLOW_BW)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{harness.socket_port(dst.query_migrate())}")
    t0 = time.time()
    while True:
        info = src.query_migrate()
        if info.get("status") == "active":
            assert "ram" in info, f"source query-migrate has no ram statistics while active: {info}"
            if info["ram"]["transferred"] >= 24 * MiB:
                break
        assert info.get("status") in ("setup", "active"), \
            f"migration ended before it could be interrupted: {info}\n{ws.diagnostics()}"
        assert time.time() - t0 < 20, f"migration did not get going: {info}"
        time.sleep(0.02)
    return src, dst


def finish_on_fresh_destination(ws, image, src, dst_impl):
    """After an interrupted migration: the source still runs with its RAM intact, and
    a second migration to a new destination succeeds."""
    assert src.runstate() == "running"
    diff = src.check_ram(image)
    assert diff is None, f"source RAM changed by the interrupted migration: {diff}"
    src.set_params(max_bandwidth=0)
    dst2 = ws.vm(dst_impl, "dst2", mem_mib=image.size >> 20, incoming="defer").start()
    si, di = harness.migrate(ws, src, dst2, "tcp")
    assert si["status"] == "completed", f"second migration, source: {si}\n{ws.diagnostics()}"
    assert di["status"] == "completed", f"second migration, destination: {di}"
    diff = dst2.check_ram(image)
    assert diff is None, f"destination RAM after the second migration: {diff}"
    assert src.runstate() == "postmigrate"
    assert dst2.runstate() == "running"


@pytest.mark.parametrize("src_impl,dst_impl",
                         [p for p in INTERRUPT_PAIRS if p.id != "qemu-to-vmigrate"])
def test_destination_killed(ws, big_image, src_impl, dst_impl):
    require(src_impl, dst_impl)
    src, dst = start_slow_migration(ws, big_image, src_impl, dst_impl)
    dst.kill9()
    info = src.wait_migration(timeout=30)
    assert info["status"] == "failed", info
    assert info.get("error-desc"), f"failed without error-desc: {info}"
    assert "MIGRATION:failed" in src.event_names(), src.event_names()
    finish_on_fresh_destination(ws, big_image, src, dst_impl)


@pytest.mark.parametrize("src_impl,dst_impl", INTERRUPT_PAIRS)
def test_migrate_cancel(ws, big_image, src_impl, dst_impl):
    require(src_impl, dst_impl)
    src, dst = start_slow_migration(ws, big_image, src_impl, dst_impl)
    src.cmd("migrate_cancel")
    info = src.wait_migration(timeout=30)
    assert info["status"] == "cancelled", info
    ev = src.event_names()
    assert "MIGRATION:cancelling" in ev and "MIGRATION:cancelled" in ev, ev
    # the destination sees a broken stream; exit-on-error (default) ends it with status 1
    rc = dst.wait_exit(15)
    assert rc == 1, f"destination exit status {rc} (QEMU exits with 1): {dst.describe()}"
    finish_on_fresh_destination(ws, big_image, src, dst_impl)
