use vmigrate_stream::header::encode_header;
use vmigrate_stream::section::{encode_footer, Record, SectionId, VMDESCRIPTION};

use super::*;

const PS: u64 = 4096;
const DEVICE_BODY: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

fn page(fill: u8) -> Vec<u8> {
    vec![fill; PS as usize]
}

fn section_id(id: u32, idstr: &str, version: u32) -> SectionId {
    SectionId {
        section_id: id,
        idstr: idstr.to_string(),
        instance_id: 0,
        version_id: version,
    }
}

/// A plain stream: block `b0` of 8 pages and `b1` of 2 pages; page 0 sent twice (the
/// second wins), page 1 sent then zeroed, page 2 zero, page 5 of b0 and page 1 of b1
/// with contents; a device section only the trailer describes.
fn plain_stream() -> Vec<u8> {
    let mut s = Vec::new();
    encode_header(&mut s);
    Configuration {
        machine: "pc-i440fx-10.0".into(),
        ..Default::default()
    }
    .encode(&mut s);
    Record::Start(section_id(3, "ram", 4)).encode(&mut s);
    put_mem_size(&mut s, 10 * PS);
    for (name, pages) in [("b0", 8), ("b1", 2)] {
        BlockEntry {
            idstr: name.into(),
            used_length: pages * PS,
            page_size: None,
            mr_addr: None,
        }
        .encode(&mut s);
    }
    put_eos(&mut s);
    encode_footer(&mut s, 3);
    Record::Part(3).encode(&mut s);
    put_page_header(&mut s, 0, FLAG_PAGE, Some("b0"));
    s.extend(page(0xA0));
    put_page_header(&mut s, PS, FLAG_PAGE, None);
    s.extend(page(0xA1));
    put_zero_page(&mut s, 2 * PS, None);
    put_page_header(&mut s, PS, FLAG_PAGE, Some("b1"));
    s.extend(page(0xB1));
    put_eos(&mut s);
    encode_footer(&mut s, 3);
    Record::End(3).encode(&mut s);
    put_page_header(&mut s, 0, FLAG_PAGE, Some("b0"));
    s.extend(page(0xC0));
    put_zero_page(&mut s, PS, None);
    put_page_header(&mut s, 5 * PS, FLAG_PAGE, None);
    s.extend(page(0xA5));
    put_eos(&mut s);
    encode_footer(&mut s, 3);
    Record::Full(section_id(9, "dev0", 1)).encode(&mut s);
    s.extend(DEVICE_BODY);
    encode_footer(&mut s, 9);
    Record::Eof.encode(&mut s);
    let json = r#"{"page_size": 4096, "devices": [{"name": "dev0", "instance_id": 0, "vmsd_name": "dev0", "version": 1, "fields": [{"name": "x", "type": "buffer", "size": 12}]}]}"#;
    s.push(VMDESCRIPTION);
    s.extend((json.len() as u32).to_be_bytes());
    s.extend(json.as_bytes());
    s
}

fn convert_to_vec(input: &[u8], to: Layout) -> Result<Vec<u8>, ConvertError> {
    let dir = std::env::temp_dir().join(format!("vmigrate-convert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{to}-{}", input.len()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let r = convert_bytes(input, &file, to);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    r.map(|_| bytes)
}

/// The guest RAM a fresh destination ends up with, per block, from the inspector's view
/// of the file and the page records or bitmaps.
fn loaded_ram(file: &[u8]) -> Vec<(String, Vec<u8>)> {
    let report = vmigrate_inspect::inspect(file, 0);
    assert!(report.is_complete(), "{:?}", report.error);
    let ram = report.ram.clone().unwrap();
    let mut out = Vec::new();
    for b in &ram.blocks {
        let len = b.used_length.unwrap() as usize;
        let mut mem = vec![0u8; len];
        if let Some(m) = b.mapped_ram {
            let bitmap = &file[m.bitmap_offset as usize..][..m.bitmap_len as usize];
            for p in 0..m.pages as usize {
                if bitmap[p / 8] & (1 << (p % 8)) != 0 {
                    let at = m.pages_offset as usize + p * PS as usize;
                    mem[p * PS as usize..][..PS as usize]
                        .copy_from_slice(&file[at..at + PS as usize]);
                }
            }
        }
        out.push((b.idstr.clone(), mem));
    }
    if ram.blocks.iter().all(|b| b.mapped_ram.is_none()) {
        replay_plain(file, &report, &mut out);
    }
    out
}

/// Applies the page records of a plain stream in order.
fn replay_plain(file: &[u8], report: &vmigrate_inspect::Report, out: &mut [(String, Vec<u8>)]) {
    let mut current = 0usize;
    for (_, s) in report.sections() {
        if s.idstr != "ram" || s.kind == SectionKind::Full {
            continue;
        }
        let mut src = SliceSource::new(file);
        src.seek_to(s.body_offset).unwrap();
        loop {
            let h = RamRecordHeader::decode(&mut src, PS).unwrap();
            if h.names_block() {
                let name = src.counted("name").unwrap();
                current = out.iter().position(|(n, _)| *n == name).unwrap();
            }
            let at = h.addr as usize;
            match h.kind {
                RamRecordKind::MemSize => {
                    let mut listed = 0;
                    while listed < h.addr {
                        listed += BlockEntry::decode_with(&mut src, false, false)
                            .unwrap()
                            .used_length;
                    }
                }
                RamRecordKind::Zero => {
                    src.u8("fill").unwrap();
                    out[current].1[at..at + PS as usize].fill(0);
                }
                RamRecordKind::Page => {
                    let data = src.take(PS as usize, "page").unwrap();
                    out[current].1[at..at + PS as usize].copy_from_slice(data);
                }
                RamRecordKind::Eos => break,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

fn expected_ram() -> Vec<(String, Vec<u8>)> {
    let mut b0 = vec![0u8; 8 * PS as usize];
    b0[..PS as usize].fill(0xC0);
    b0[5 * PS as usize..6 * PS as usize].fill(0xA5);
    let mut b1 = vec![0u8; 2 * PS as usize];
    b1[PS as usize..].fill(0xB1);
    vec![("b0".into(), b0), ("b1".into(), b1)]
}

#[test]
fn plain_to_mapped_ram_and_back() {
    let plain = plain_stream();
    assert_eq!(loaded_ram(&plain), expected_ram());

    let mapped = convert_to_vec(&plain, Layout::MappedRam).unwrap();
    let report = vmigrate_inspect::inspect(&mapped, 0);
    assert!(report.is_complete(), "{:?}", report.error);
    assert!(report
        .configuration
        .as_ref()
        .unwrap()
        .has_capability("mapped-ram"));
    let ram = report.ram.as_ref().unwrap();
    // The first page area starts on the 1 MiB boundary, as QEMU lays it out.
    assert_eq!(ram.blocks[0].mapped_ram.unwrap().pages_offset, 1 << 20);
    assert_eq!(ram.blocks[0].mapped_ram.unwrap().pages_present, 2);
    assert_eq!(ram.blocks[1].mapped_ram.unwrap().pages_present, 1);
    assert_eq!(ram.normal_pages() + ram.zero_pages(), 0);
    assert_eq!(loaded_ram(&mapped), expected_ram());
    // The device section and the trailer are carried unchanged.
    let tail = plain.len() - plain.windows(4).position(|w| w == b"dev0").unwrap();
    assert_eq!(mapped[mapped.len() - tail..], plain[plain.len() - tail..]);

    let back = convert_to_vec(&mapped, Layout::Plain).unwrap();
    let report = vmigrate_inspect::inspect(&back, 0);
    assert!(report.is_complete(), "{:?}", report.error);
    assert!(!report.configuration.unwrap().has_capability("mapped-ram"));
    let ram = report.ram.unwrap();
    assert_eq!(ram.normal_pages(), 3);
    assert_eq!(ram.zero_pages(), 7);
    assert_eq!(loaded_ram(&back), expected_ram());
    assert_eq!(back[back.len() - tail..], plain[plain.len() - tail..]);
}

#[test]
fn same_layout_is_refused() {
    let plain = plain_stream();
    assert!(matches!(
        convert_to_vec(&plain, Layout::Plain),
        Err(ConvertError::AlreadyThere(Layout::Plain))
    ));
}

#[test]
fn damage_is_reported_with_its_offset() {
    let plain = plain_stream();
    // Cut inside the END section's page.
    let cut = plain.len() - 200;
    let err = convert_to_vec(&plain[..cut], Layout::MappedRam).unwrap_err();
    assert!(matches!(err, ConvertError::Damaged(_)), "{err}");
    assert!(err.to_string().contains("byte offset"), "{err}");

    // A RAM record with an unknown flag, in the PART body.
    let mut bad = plain.clone();
    let part = bad.windows(5).position(|w| w == [2, 0, 0, 0, 3]).unwrap();
    bad[part + 5 + 7] = 0x01;
    let err = convert_to_vec(&bad, Layout::MappedRam).unwrap_err();
    let ConvertError::Damaged(e) = &err else {
        panic!("{err}")
    };
    assert_eq!(e.offset, part as u64 + 5);

    let mut bad = plain;
    bad[0] = b'X';
    let err = convert_to_vec(&bad, Layout::MappedRam).unwrap_err();
    assert!(err.to_string().contains("Not a migration stream"), "{err}");
}

#[test]
fn failed_conversion_leaves_no_output() {
    let dir = std::env::temp_dir().join(format!("vmigrate-convert-fail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in");
    let output = dir.join("out");
    let plain = plain_stream();
    std::fs::write(&input, &plain[..plain.len() / 2]).unwrap();
    assert!(convert_file(&input, &output, Layout::MappedRam).is_err());
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(left.len(), 1, "only the input remains");

    std::fs::write(&input, &plain).unwrap();
    let summary = convert_file(&input, &output, Layout::MappedRam).unwrap();
    assert_eq!(summary.pages_with_contents, 3);
    assert_eq!(summary.pages_total, 10);
    assert_eq!(
        std::fs::metadata(&output).unwrap().len(),
        summary.output_len
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
