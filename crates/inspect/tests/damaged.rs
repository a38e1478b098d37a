//! Damaged copies of real captures: cut short anywhere, or with one field changed. Each
//! gives an error naming the problem at the byte offset where it broke, keeps what came
//! before, and never panics.

use std::path::{Path, PathBuf};

use vmigrate_inspect::{inspect, BodyInfo, InspectErrorKind, RecordInfo, Report, SectionKind};
use vmigrate_stream::DecodeErrorKind;

fn capture(rel: &str) -> Vec<u8> {
    let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/qemu-oracle/captures")
        .join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn error_of(r: &Report) -> (u64, String) {
    let e = r
        .error
        .as_ref()
        .unwrap_or_else(|| panic!("no error:\n{}", r.to_text()));
    (e.offset, e.kind.to_string())
}

fn section_at(r: &Report, offset: u64) -> &vmigrate_inspect::SectionInfo {
    r.sections()
        .find(|(e, _)| e.offset == offset)
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("no section at 0x{offset:x}"))
}

/// Offsets of interest in base.bin (see captures/README.md; the oracle's dissection).
const BASE_PART: u64 = 0x42;
const BASE_FIRST_PAGE: u64 = 0x47;
const BASE_FIRST_ZERO: u64 = 0x406a;
const BASE_PART_FOOTER: u64 = 0x884e;
const BASE_TIMER: u64 = 0x886a;
const BASE_GLOBALSTATE: u64 = 0x889a;
const BASE_EOF: u64 = 0x8920;

#[test]
fn base_bin_layout_is_as_expected() {
    let r = inspect(&capture("base.bin"), 0);
    assert!(r.is_complete());
    assert_eq!(section_at(&r, BASE_PART).kind, SectionKind::Part);
    assert_eq!(section_at(&r, BASE_TIMER).idstr, "timer");
    assert_eq!(section_at(&r, BASE_GLOBALSTATE).idstr, "globalstate");
    assert_eq!(r.eof_offset, Some(BASE_EOF));
}

/// Every place base.bin can be cut: each record boundary exactly, body and footer
/// boundaries, points just after them, and a stride through everything else.
#[test]
fn truncated_anywhere() {
    let full_data = capture("base.bin");
    let full = inspect(&full_data, 0);
    let len = full_data.len() as u64;
    let eof = full.eof_offset.unwrap();

    let mut cuts: Vec<u64> = (0..80).collect();
    let mut record_starts = Vec::new();
    for e in &full.records {
        record_starts.push(e.offset);
        cuts.extend([e.offset, e.offset + 1, e.offset + 3]);
        if let RecordInfo::Section(s) = &e.record {
            let footer = s.body_offset + s.body_len.unwrap();
            cuts.extend([s.body_offset, s.body_offset + 9, footer, footer + 2]);
        }
    }
    cuts.extend([BASE_FIRST_PAGE + 8 + 3 + 100, BASE_FIRST_ZERO + 8]);
    cuts.extend((0..len).step_by(37));
    cuts.retain(|c| *c < len);
    cuts.sort_unstable();
    cuts.dedup();
    assert!(cuts.len() > 1000);

    for cut in cuts {
        let r = inspect(&full_data[..cut as usize], 0);
        if cut == eof + 1 {
            // Cut right after EOF: only the trailer is missing, which QEMU accepts.
            assert!(r.is_complete(), "cut {cut}");
            assert!(r
                .notes
                .iter()
                .any(|n| n.message.contains("no VMDESCRIPTION")));
            continue;
        }
        let (at, msg) = error_of(&r);
        assert!(at <= cut, "cut {cut}: error at {at}: {msg}");
        // The error lies inside the record the cut falls into.
        let record = record_starts.iter().rev().find(|s| **s <= cut).copied();
        if let Some(start) = record {
            assert!(
                at >= start.min(cut),
                "cut {cut}: error at {at} before record {start}"
            );
        }
        if cut > eof {
            assert!(at > eof, "cut {cut} in the trailer: error at {at}: {msg}");
        }
        if record_starts.contains(&cut) && cut > 0x11 {
            // A cut at a boundary: everything before was whole.
            assert_eq!(at, cut, "cut {cut}: {msg}");
            assert!(
                msg == "stream ends without an EOF record" || cut > eof,
                "cut {cut}: {msg}"
            );
        } else {
            assert!(
                msg.contains("stream ended early") || msg.contains("without an EOF"),
                "cut {cut}: {msg}"
            );
        }
        // Records that lay wholly before the cut are all in the report, and nothing
        // from beyond it.
        let kept: Vec<u64> = r.records.iter().map(|e| e.offset).collect();
        let whole: Vec<u64> = record_starts
            .windows(2)
            .filter(|w| w[1] <= cut)
            .map(|w| w[0])
            .collect();
        assert!(kept.len() >= whole.len(), "cut {cut}: {kept:x?} {whole:x?}");
        assert_eq!(&kept[..whole.len()], &whole[..], "cut {cut}");
        assert!(kept.iter().all(|k| *k < cut), "cut {cut}");
        assert!(r.to_text().contains(&format!("(at byte offset {at})")));
    }
}

#[test]
fn truncated_inside_pages_keeps_the_counts() {
    let data = capture("base.bin");
    // Cut inside the third PAGE body: two pages were read whole.
    let cut = BASE_FIRST_PAGE + (8 + 3 + 4096) + (8 + 4096) + 8 + 10;
    let r = inspect(&data[..cut as usize], 0);
    let (at, msg) = error_of(&r);
    assert_eq!(at, cut - 10);
    assert_eq!(
        msg,
        "stream ended early: needed 4096 bytes for page contents"
    );
    let ram = r.ram.as_ref().unwrap();
    assert_eq!(ram.normal_pages(), 2);
    let part = section_at(&r, BASE_PART);
    assert_eq!(part.body_len, None);
    assert!(matches!(part.body, BodyInfo::Ram(c) if c.normal_pages == 2));
    assert!(r.to_text().contains("body broken"));
}

#[test]
fn bad_magic() {
    let mut data = capture("base.bin");
    data[0] ^= 0xFF;
    let r = inspect(&data, 0);
    assert_eq!(error_of(&r), (0, "Not a migration stream".to_string()));
    assert!(r.records.is_empty() && r.configuration.is_none());
}

#[test]
fn bad_versions() {
    let mut data = capture("base.bin");
    data[7] = 2;
    let (at, msg) = error_of(&inspect(&data, 0));
    assert_eq!(at, 4);
    assert!(msg.starts_with("SaveVM v2 format is obsolete"));
    data[7] = 4;
    let (at, msg) = error_of(&inspect(&data, 0));
    assert_eq!(
        (at, msg.as_str()),
        (4, "Unsupported migration stream version")
    );
}

#[test]
fn bad_footer_id() {
    let mut data = capture("base.bin");
    data[BASE_PART_FOOTER as usize + 4] = 7;
    let r = inspect(&data, 0);
    assert_eq!(
        error_of(&r),
        (
            BASE_PART_FOOTER,
            "Mismatched section id in footer for ram - read 0x7 expected 0x1".to_string()
        )
    );
    // The START before is whole, the PART's pages were all counted.
    assert!(section_at(&r, 0x11).body_len.is_some());
    let ram = r.ram.unwrap();
    assert_eq!((ram.normal_pages(), ram.zero_pages()), (4, 2044));
}

#[test]
fn missing_footer() {
    let mut data = capture("base.bin");
    data[BASE_PART_FOOTER as usize] = 0x02;
    let (at, msg) = error_of(&inspect(&data, 0));
    assert_eq!(
        (at, msg.as_str()),
        (BASE_PART_FOOTER, "Missing section footer for ram")
    );
}

#[test]
fn bad_section_types() {
    for (at, tag) in [(BASE_PART, 0x09u8), (BASE_TIMER, 0x05), (BASE_EOF, 0x7E)] {
        let mut data = capture("base.bin");
        data[at as usize] = tag;
        let r = inspect(&data, 0);
        assert_eq!(
            error_of(&r),
            (at, format!("Unknown savevm section type {tag}")),
            "tag {tag} at 0x{at:x}"
        );
        assert!(r.records.iter().all(|e| e.offset < at));
    }
}

#[test]
fn part_of_a_section_never_started() {
    let mut data = capture("base.bin");
    data[BASE_PART as usize + 4] = 9;
    let (at, msg) = error_of(&inspect(&data, 0));
    assert_eq!(
        (at, msg.as_str()),
        (BASE_PART, "Unknown section id 9 in PART/END")
    );
}

#[test]
fn bad_ram_records() {
    let data = capture("base.bin");
    // Flag 0x100 (compression, removed) on the first page record.
    let mut d = data.clone();
    d[BASE_FIRST_PAGE as usize + 6] |= 0x01;
    let (at, msg) = error_of(&inspect(&d, 0));
    assert_eq!(at, BASE_FIRST_PAGE);
    assert_eq!(msg, "Unknown combination of migration flags: 0x108");
    // A zero page whose fill byte is not zero.
    let mut d = data.clone();
    d[BASE_FIRST_ZERO as usize + 8] = 0x55;
    let (at, msg) = error_of(&inspect(&d, 0));
    assert_eq!(
        (at, msg.as_str()),
        (BASE_FIRST_ZERO + 8, "Found a zero page with value 85")
    );
    // A page past the end of its 8 MiB block.
    let mut d = data.clone();
    d[BASE_FIRST_ZERO as usize + 4] = 0x01;
    let (at, msg) = error_of(&inspect(&d, 0));
    assert_eq!(at, BASE_FIRST_ZERO);
    assert!(
        msg.starts_with("Illegal RAM offset 0x1004000 in block m0"),
        "{msg}"
    );
    // CONTINUE on the first page record, before any block was named.
    let mut d = data.clone();
    d[BASE_FIRST_PAGE as usize + 7] |= 0x20;
    let (at, msg) = error_of(&inspect(&d, 0));
    assert_eq!(at, BASE_FIRST_PAGE);
    assert!(msg.contains("CONTINUE with no current block"), "{msg}");
}

#[test]
fn bad_block_lists() {
    let data = capture("base.bin");
    // Block entry at 0x2a: 02 "m0", be64 length at 0x2d.
    let mut d = data.clone();
    d[0x2d + 4] = 0x01;
    let (at, msg) = error_of(&inspect(&d, 0));
    assert_eq!(at, 0x2a);
    assert_eq!(
        msg,
        "RAM block list lengths add up past the announced total 0x800000"
    );
    let mut d = data.clone();
    d[0x2d + 5] = 0x40;
    let (at, msg) = error_of(&inspect(&d, 0));
    assert_eq!(at, 0x35);
    assert!(msg.contains("blocks add up to 0x400000 of the MEM_SIZE total 0x800000"));
}

#[test]
fn bad_device_bodies() {
    let data = capture("base.bin");
    // A runstate QEMU does not know. The body starts 24 bytes after the section tag.
    let mut d = data.clone();
    let body = BASE_GLOBALSTATE as usize + 1 + 4 + 1 + 11 + 8;
    d[body + 4..body + 10].copy_from_slice(b"bogus!");
    let (at, msg) = error_of(&inspect(&d, 0));
    assert_eq!(
        (at, msg.as_str()),
        (body as u64, "Unknown run state 'bogus!' in globalstate")
    );
    // A device the trailer does not describe cannot be skipped.
    let mut d = data.clone();
    d[BASE_TIMER as usize + 10] = b'x';
    let r = inspect(&d, 0);
    let (at, msg) = error_of(&r);
    assert_eq!(at, BASE_TIMER + 19);
    assert!(msg.contains("no vmdesc description for section 'timex' instance 0"));
    assert!(matches!(
        r.error.unwrap().kind,
        InspectErrorKind::Undescribed { .. }
    ));
}

#[test]
fn damaged_trailer() {
    let data = capture("base.bin");
    let json = BASE_EOF as usize + 1 + 5;
    let mut d = data.clone();
    d[json + 1] = b'#';
    let (at, msg) = error_of(&inspect(&d, 0));
    assert_eq!(at, json as u64);
    assert!(msg.starts_with("vmdesc JSON is not valid"), "{msg}");
    // A length beyond the cap is refused before anything is read.
    let mut d = data.clone();
    d[BASE_EOF as usize + 2] = 0xFF;
    let r = inspect(&d, 0);
    let (at, msg) = error_of(&r);
    assert_eq!(at, BASE_EOF + 2);
    assert!(msg.contains("larger than the 16 MiB limit"));
    assert!(matches!(
        r.error.unwrap().kind,
        InspectErrorKind::Decode(DecodeErrorKind::VmdescTooLarge(_))
    ));
}

#[test]
fn mapped_ram_damage() {
    let data = capture("mr.bin");
    const HEADER: usize = 0x64;
    let cases: [(usize, &[u8], &str); 4] = [
        (HEADER, &[0, 0, 0, 2], "unsupported version 2"),
        (
            HEADER + 12,
            &[0, 0, 0, 0, 0xFF, 0, 0, 0],
            "runs past the end of the file",
        ),
        (HEADER + 20 + 6, &[0x00, 0x10], "is not page aligned"),
        (
            HEADER + 20 + 4,
            &[0x10, 0, 0, 0],
            "runs past the end of the file",
        ),
    ];
    for (at, bytes, text) in cases {
        let mut d = data.clone();
        d[at..at + bytes.len()].copy_from_slice(bytes);
        let r = inspect(&d, 0);
        let (err_at, msg) = error_of(&r);
        assert_eq!(err_at, HEADER as u64, "{text}");
        assert!(
            msg.contains("mapped-ram header of block 'm0'") && msg.contains(text),
            "{msg}"
        );
    }
    // The pages region may not loop back over the header.
    let mut d = data.clone();
    d[HEADER + 20..HEADER + 28].copy_from_slice(&0u64.to_be_bytes());
    let (_, msg) = error_of(&inspect(&d, 0));
    assert!(msg.contains("lies inside the bitmap"), "{msg}");
    // The file cut inside the page area.
    let r = inspect(&data[..0x200000], 0);
    let (at, msg) = error_of(&r);
    assert_eq!(at, HEADER as u64);
    assert!(
        msg.contains("page area 0x100000+0x800000 runs past the end"),
        "{msg}"
    );
}

#[test]
fn package_longer_than_the_file() {
    let data = capture("cap_pc/conn0.c2s");
    let r = inspect(&data, 0);
    let (pkg, _) = r.commands().find(|(_, c)| c.name() == "PACKAGED").unwrap();
    let at = pkg.offset as usize;
    let mut d = data.clone();
    d[at + 5..at + 9].copy_from_slice(&u32::MAX.to_be_bytes());
    let (err_at, msg) = error_of(&inspect(&d, 0));
    assert_eq!(err_at, pkg.offset + 9);
    assert_eq!(
        msg,
        format!(
            "stream ended early: needed {} bytes for packaged stream",
            u32::MAX
        )
    );
}

#[test]
fn stream_offset_past_the_end() {
    let r = inspect(b"QEVM", 10);
    assert_eq!(
        error_of(&r),
        (
            0,
            "stream offset 10 is past the end of the 4-byte file".to_string()
        )
    );
    let r = inspect(&[], 0);
    assert_eq!(error_of(&r).0, 0);
    // A stream read from the wrong offset is not a stream.
    let r = inspect(&capture("mroff.bin"), 0);
    assert_eq!(error_of(&r), (0, "Not a migration stream".to_string()));
}

/// Small deterministic generator for the mutation test.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// Random bytes changed in the headers and records of several captures: whatever the
/// result, no panic, an error offset inside the file, and output that renders.
#[test]
fn random_mutations_never_panic() {
    let mut rng = Lcg(0x5eed);
    for (name, offset) in [
        ("base.bin", 0u64),
        ("uuid_is.bin", 0),
        ("none_slirp.bin", 0),
        ("cap_pc/conn0.c2s", 0),
        ("mr.bin", 0),
    ] {
        let data = capture(name);
        let full = inspect(&data, offset);
        // Offsets worth hitting: record headers and the bytes around them, plus the
        // mapped-ram header and the trailer's head.
        let mut hot: Vec<u64> = full.records.iter().map(|e| e.offset).collect();
        hot.extend(full.sections().map(|(_, s)| s.body_offset));
        hot.extend([0x64, 0x70, 0x80]);
        let mut data = data;
        for round in 0..300 {
            let base = hot[(rng.next() as usize) % hot.len()];
            let at = (base + rng.next() % 24).min(data.len() as u64 - 1) as usize;
            let saved = data[at];
            data[at] = if round % 3 == 0 {
                0xFF
            } else {
                rng.next() as u8
            };
            let r = inspect(&data, offset);
            if let Some(e) = &r.error {
                assert!(e.offset <= data.len() as u64, "{name}: {e}");
            }
            assert!(!r.to_text().is_empty());
            assert!(r.to_json().is_object());
            data[at] = saved;
        }
    }
}
