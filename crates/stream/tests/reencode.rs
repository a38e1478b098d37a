//! Golden tests: streams captured from QEMU 10.0.2 are decoded record by record with the
//! codecs, re-encoded with the encoders, and must give back the same bytes.

use std::path::PathBuf;

use vmigrate_stream::config::Configuration;
use vmigrate_stream::devices::{GlobalState, TimerState};
use vmigrate_stream::ram::{self, BlockEntry, RamRecordHeader, RamRecordKind};
use vmigrate_stream::section::{decode_footer, encode_footer, Record};
use vmigrate_stream::{header, vmdesc, SliceSource, Source};

fn capture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/qemu-oracle/captures")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Decodes a whole precopy stream of a `none` machine and re-encodes it.
fn reencode(data: &[u8]) -> Vec<u8> {
    let mut src = SliceSource::new(data);
    let mut out = Vec::new();
    header::decode_header(&mut src).unwrap();
    header::encode_header(&mut out);
    Configuration::decode(&mut src).unwrap().encode(&mut out);
    let mut ram_id = None;
    let mut current_block: Option<String>;
    loop {
        let rec = Record::decode(&mut src).unwrap();
        rec.encode(&mut out);
        let (id, idstr) = match &rec {
            Record::Eof => break,
            Record::Command(_) => continue,
            Record::Start(s) | Record::Full(s) => (s.section_id, s.idstr.clone()),
            Record::Part(id) | Record::End(id) => (*id, "ram".to_string()),
        };
        match idstr.as_str() {
            "ram" => {
                ram_id = Some(id);
                loop {
                    let h = RamRecordHeader::decode(&mut src, 4096).unwrap();
                    match h.kind {
                        RamRecordKind::MemSize => {
                            ram::put_mem_size(&mut out, h.addr);
                            let mut sum = 0;
                            while sum < h.addr {
                                let b = BlockEntry::decode_with(&mut src, false, false).unwrap();
                                sum += b.used_length;
                                b.encode(&mut out);
                            }
                        }
                        RamRecordKind::Zero | RamRecordKind::Page => {
                            let name = if h.names_block() {
                                current_block = Some(src.counted("block").unwrap());
                                current_block.as_deref()
                            } else {
                                None
                            };
                            if h.kind == RamRecordKind::Zero {
                                assert_eq!(src.u8("fill").unwrap(), 0);
                                ram::put_zero_page(&mut out, h.addr, name);
                            } else {
                                ram::put_page_header(&mut out, h.addr, ram::FLAG_PAGE, name);
                                out.extend_from_slice(src.take(4096, "page").unwrap());
                            }
                        }
                        RamRecordKind::MultifdFlush => ram::put_multifd_flush(&mut out),
                        RamRecordKind::Eos => {
                            ram::put_eos(&mut out);
                            break;
                        }
                        other => panic!("unexpected RAM record {other:?}"),
                    }
                }
            }
            "timer" => out.extend_from_slice(&TimerState::decode(&mut src, 2).unwrap().encode()),
            "globalstate" => {
                out.extend_from_slice(&GlobalState::decode(&mut src).unwrap().encode())
            }
            other => panic!("unexpected section {other}"),
        }
        decode_footer(&mut src, id, &idstr).unwrap();
        encode_footer(&mut out, id);
    }
    assert!(ram_id.is_some());
    let desc = vmdesc::decode(&mut src).unwrap().expect("vmdesc trailer");
    vmdesc::encode(&mut out, &desc);
    assert!(src.remaining().is_empty());
    out
}

#[test]
fn none_bin_reencodes_identically() {
    let data = capture("none.bin");
    assert_eq!(reencode(&data), data);
}

#[test]
fn base_bin_reencodes_identically() {
    let data = capture("base.bin");
    assert_eq!(reencode(&data), data);
}

#[test]
fn return_path_capture_reencodes_identically() {
    let data = capture("cap_rp/conn0.c2s");
    assert_eq!(reencode(&data), data);
}

#[test]
fn multifd_main_channel_reencodes_identically() {
    let data = capture("cap_mf/conn0.c2s");
    assert_eq!(reencode(&data), data);
}

/// The vmdesc JSON vmigrate writes for a `none` machine is byte for byte QEMU's.
#[test]
fn vmdesc_of_a_none_machine_matches_qemu() {
    let data = capture("none.bin");
    let pos = data.len() - 823 - 5;
    assert_eq!(data[pos], 6);
    let cfg = Configuration {
        machine: "none".into(),
        ..Default::default()
    };
    let desc = vmdesc::build(
        Some(cfg.describe()),
        4096,
        vec![TimerState::describe(), GlobalState::describe()],
    );
    let mut out = Vec::new();
    vmdesc::encode(&mut out, &desc);
    assert_eq!(out, &data[pos..]);
}

/// With capabilities and a UUID the configuration's description still matches.
#[test]
fn vmdesc_configuration_with_subsections_matches_qemu() {
    let data = capture("uuid_is.bin");
    let mut src = SliceSource::new(&data);
    header::decode_header(&mut src).unwrap();
    let cfg = Configuration::decode(&mut src).unwrap();
    assert_eq!(cfg.capabilities, ["x-ignore-shared"]);
    let text = String::from_utf8_lossy(&data);
    let at = text.find("{\"configuration\": ").unwrap();
    let qemu: serde_json::Value = serde_json::from_str(&text[at..]).unwrap();
    assert_eq!(qemu["configuration"], cfg.describe());
}

/// Page `i` of a capture's fill spec: byte `j` is `(i*7 + j) & 0xff`, then the first 4
/// bytes are `i` as be32 (captures/README.md).
fn fill_page(i: u64) -> Vec<u8> {
    let mut p: Vec<u8> = (0..4096u64).map(|j| ((i * 7 + j) & 0xff) as u8).collect();
    p[..4].copy_from_slice(&(i as u32).to_be_bytes());
    p
}

/// cap_pcp's preempt channel (`conn1.c2s`): the 16 pages the destination asked for
/// (0x1c0000..0x1cf000, fill [0-500]) as bare PAGE records, the block named on the first
/// only, no EOS; re-encoded to the same bytes.
#[test]
fn cap_pcp_preempt_channel_replays_and_reencodes() {
    use vmigrate_stream::preempt::{self, PreemptPageKind, PreemptRecord};
    let data = capture("cap_pcp/conn1.c2s");
    let mut src = SliceSource::new(&data);
    let mut out = Vec::new();
    let mut offsets = Vec::new();
    let mut current: Option<String> = None;
    while let Some(rec) = preempt::decode_record(&mut src, 4096).unwrap() {
        let PreemptRecord::Page {
            block,
            offset,
            kind,
        } = rec
        else {
            panic!("QEMU 10.0 writes no EOS on the preempt channel");
        };
        assert_eq!(kind, PreemptPageKind::Data);
        assert_eq!(
            block.is_some(),
            offsets.is_empty(),
            "named on the first only"
        );
        if block.is_some() {
            current = block.clone();
        }
        assert_eq!(current.as_deref(), Some("m0"));
        let page = src.take(4096, "page").unwrap().to_vec();
        assert_eq!(page, fill_page(offset / 4096), "page {offset:#x}");
        preempt::put_page(&mut out, offset, block.as_deref(), &page);
        offsets.push(offset);
    }
    let want: Vec<u64> = (0..16).map(|i| 0x1c0000 + i * 0x1000).collect();
    assert_eq!(offsets, want);
    assert_eq!(out, data);
}
