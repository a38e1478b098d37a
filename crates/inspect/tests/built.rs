//! Streams built with the stream crate's encoders, as vmigrate writes them: cases no
//! capture holds (other page sizes, subsections, nested packages, malformed records).

use serde_json::json;
use vmigrate_inspect::{inspect, inspect_with, BodyInfo, InspectErrorKind, Options, Report};
use vmigrate_stream::command::Command;
use vmigrate_stream::config::Configuration;
use vmigrate_stream::devices::{GlobalState, TimerState};
use vmigrate_stream::header::encode_header;
use vmigrate_stream::ram::{self, BlockEntry};
use vmigrate_stream::section::{encode_footer, Record, SectionId, SUBSECTION};
use vmigrate_stream::{put_counted, vmdesc};

const RAM_ID: u32 = 2;

fn start(out: &mut Vec<u8>, cfg: &Configuration) {
    encode_header(out);
    cfg.encode(out);
}

fn none_config() -> Configuration {
    Configuration {
        machine: "none".into(),
        ..Default::default()
    }
}

fn section(out: &mut Vec<u8>, full: bool, id: u32, idstr: &str, version: u32, body: &[u8]) {
    let s = SectionId {
        section_id: id,
        idstr: idstr.into(),
        instance_id: 0,
        version_id: version,
    };
    if full {
        Record::Full(s).encode(out);
    } else {
        Record::Start(s).encode(out);
    }
    out.extend_from_slice(body);
    encode_footer(out, id);
}

fn ram_start(out: &mut Vec<u8>, block: &str, len: u64) {
    let mut body = Vec::new();
    ram::put_mem_size(&mut body, len);
    BlockEntry {
        idstr: block.into(),
        used_length: len,
        page_size: None,
        mr_addr: None,
    }
    .encode(&mut body);
    ram::put_eos(&mut body);
    section(out, false, RAM_ID, "ram", 4, &body);
}

fn ram_part(out: &mut Vec<u8>, body: &[u8]) {
    Record::Part(RAM_ID).encode(out);
    out.extend_from_slice(body);
    encode_footer(out, RAM_ID);
}

fn error_of(r: &Report) -> (u64, &InspectErrorKind) {
    let e = r.error.as_ref().expect("an error");
    (e.offset, &e.kind)
}

#[test]
fn page_size_from_the_configuration() {
    const PAGE: u64 = 1 << 16;
    let cfg = Configuration {
        target_page_bits: Some(16),
        ..none_config()
    };
    let mut s = Vec::new();
    start(&mut s, &cfg);
    ram_start(&mut s, "ram", 4 * PAGE);
    let mut body = Vec::new();
    ram::put_page_header(&mut body, 0, ram::FLAG_PAGE, Some("ram"));
    body.resize(body.len() + PAGE as usize, 0xAA);
    ram::put_zero_page(&mut body, PAGE, None);
    ram::put_zero_page(&mut body, 3 * PAGE, None);
    ram::put_multifd_flush(&mut body);
    ram::put_eos(&mut body);
    ram_part(&mut s, &body);
    Record::Eof.encode(&mut s);

    let r = inspect(&s, 0);
    assert!(r.is_complete(), "{}", r.to_text());
    assert_eq!(r.page_size, PAGE);
    assert_eq!(r.page_size_source.name(), "configuration");
    let ram = r.ram.unwrap();
    assert_eq!((ram.normal_pages(), ram.zero_pages()), (1, 2));
    assert_eq!(ram.multifd_flushes, 1);

    // Bits out of range are refused where the configuration starts.
    let mut bad = Vec::new();
    start(
        &mut bad,
        &Configuration {
            target_page_bits: Some(40),
            ..none_config()
        },
    );
    let r = inspect(&bad, 0);
    assert_eq!(error_of(&r).0, 8);
    assert!(matches!(error_of(&r).1, InspectErrorKind::BadPageBits(40)));
}

/// A `timer` with a `timer/icount` subsection (as with `-icount`): decoded from its
/// fields and the subsection skipped when the trailer describes it; an error otherwise.
#[test]
fn timer_subsections() {
    let timer = TimerState {
        cpu_ticks_offset: -5,
        cpu_clock_offset: 7,
    };
    let mut body = timer.encode();
    body.push(SUBSECTION);
    put_counted(&mut body, "timer/icount");
    body.extend_from_slice(&1u32.to_be_bytes());
    body.extend_from_slice(&[0; 16]);

    let mut s = Vec::new();
    start(&mut s, &none_config());
    ram_start(&mut s, "ram", 0x1000);
    section(&mut s, true, 0, "timer", 2, &body);
    let timer_at = s.len() as u64;
    Record::Eof.encode(&mut s);
    let without_trailer = s.clone();

    let mut desc = TimerState::describe();
    desc["subsections"] = json!([{"vmsd_name": "timer/icount", "version": 1, "fields": [
        {"name": "icount_bias", "type": "int64", "size": 8},
        {"name": "icount", "type": "int64", "size": 8}]}]);
    vmdesc::encode(&mut s, &vmdesc::build(None, 4096, vec![desc]));

    let r = inspect(&s, 0);
    assert!(r.is_complete(), "{}", r.to_text());
    assert!(r
        .sections()
        .any(|(_, sec)| matches!(sec.body, BodyInfo::Timer(t) if t == timer)));
    assert!(r
        .notes
        .iter()
        .any(|n| n.message == "34 bytes of 'timer' subsections skipped using vmdesc"));
    assert_eq!(r.vmdesc.as_ref().unwrap().devices[0].size, Some(24 + 34));

    let r = inspect(&without_trailer, 0);
    let (at, kind) = error_of(&r);
    assert_eq!(at, timer_at - 5 - 34);
    assert_eq!(kind.to_string(), "Subsection 'timer/icount' is not known");
}

#[test]
fn globalstate_and_unknown_devices_by_description() {
    let gs = GlobalState {
        runstate: "suspended".into(),
        vm_was_suspended: true,
    };
    let mut s = Vec::new();
    start(&mut s, &none_config());
    ram_start(&mut s, "ram", 0x1000);
    section(&mut s, true, 5, "globalstate", 1, &gs.encode());
    section(&mut s, true, 6, "0000:00:02.0/widget", 3, &[1, 2, 3, 4, 5]);
    Record::Eof.encode(&mut s);
    let widget = json!({"name": "0000:00:02.0/widget", "instance_id": 0,
        "vmsd_name": "widget", "version": 3, "fields": [
        {"name": "regs", "array_len": 5, "type": "uint8", "size": 1}]});
    vmdesc::encode(
        &mut s,
        &vmdesc::build(None, 4096, vec![GlobalState::describe(), widget]),
    );
    let r = inspect(&s, 0);
    assert!(r.is_complete(), "{}", r.to_text());
    assert_eq!(r.runstate(), Some("suspended"));
    let text = r.to_text();
    assert!(text.contains("runstate suspended (was suspended)"));
    assert!(text.contains("'0000:00:02.0/widget' instance 0 version 3, body 5 bytes (skipped"));
    assert!(text.contains("'0000:00:02.0/widget' instance 0 vmsd 'widget' version 3 size 5"));
}

#[test]
fn nested_packages_are_bounded() {
    let mut inner = Vec::new();
    Command::Ping(9).encode(&mut inner);
    for _ in 0..6 {
        let mut outer = Vec::new();
        Command::Packaged(inner.len() as u32).encode(&mut outer);
        outer.extend_from_slice(&inner);
        inner = outer;
    }
    let mut s = Vec::new();
    start(&mut s, &none_config());
    let first = s.len() as u64;
    s.extend_from_slice(&inner);
    Record::Eof.encode(&mut s);
    let r = inspect(&s, 0);
    let (at, kind) = error_of(&r);
    assert!(matches!(kind, InspectErrorKind::PackageTooDeep(4)));
    // Each level adds a 9-byte PACKAGED command.
    assert_eq!(at, first + 4 * 9);
    assert_eq!(r.records.last().unwrap().depth, 4);
}

#[test]
fn a_package_ends_at_postcopy_run() {
    let mut pkg = Vec::new();
    Command::PostcopyListen.encode(&mut pkg);
    Command::PostcopyRun.encode(&mut pkg);
    pkg.extend_from_slice(&[0xEE; 3]);
    let mut s = Vec::new();
    start(&mut s, &none_config());
    Command::Packaged(pkg.len() as u32).encode(&mut s);
    s.extend_from_slice(&pkg);
    Command::Ping(4).encode(&mut s);
    Record::Eof.encode(&mut s);
    let r = inspect(&s, 0);
    assert!(r.is_complete(), "{}", r.to_text());
    let names: Vec<(&str, u8)> = r.commands().map(|(e, c)| (c.name(), e.depth)).collect();
    assert_eq!(
        names,
        [
            ("PACKAGED", 0),
            ("POSTCOPY_LISTEN", 1),
            ("POSTCOPY_RUN", 1),
            ("PING", 0)
        ]
    );
    assert!(r
        .notes
        .iter()
        .any(|n| n.message == "3 bytes after POSTCOPY_RUN in the package are ignored"));
    assert!(r
        .notes
        .iter()
        .any(|n| n.message.contains("as after every postcopy")));
}

#[test]
fn malformed_page_records() {
    let cases: [(&[u8], u64, &str); 5] = [
        // XBZRLE with an unknown encoding byte.
        (&[2, 0, 3], 0, "XBZRLE page: unknown encoding 2"),
        // XBZRLE longer than a page.
        (
            &[1, 0x10, 0x01],
            1,
            "encoded length 4097 exceeds the page size 4096",
        ),
        // An encoding whose run goes past the page (skip 4095, run 2).
        (
            &[1, 0, 5, 0xFF, 0x1F, 0x02, 0xAA, 0xBB],
            3,
            "XBZRLE page: count at byte 2 runs past the page",
        ),
        // An encoding with a byte left over after its last run.
        (&[1, 0, 4, 0x00, 0x01, 0xAA, 0x07], 3, "truncated at byte 3"),
        // An RDMA hook.
        (&[], 0, "RDMA hook records cannot be decoded"),
    ];
    for (i, (tail, rel, text)) in cases.into_iter().enumerate() {
        let mut s = Vec::new();
        start(&mut s, &none_config());
        ram_start(&mut s, "ram", 0x2000);
        let mut body = Vec::new();
        let record_at;
        if i < 4 {
            ram::put_page_header(&mut body, 0x1000, ram::FLAG_XBZRLE, Some("ram"));
            record_at = body.len() as u64;
            body.extend_from_slice(tail);
        } else {
            record_at = 0;
            body.extend_from_slice(&ram::FLAG_HOOK.to_be_bytes());
        }
        ram::put_eos(&mut body);
        let part_body = s.len() as u64 + 5;
        ram_part(&mut s, &body);
        Record::Eof.encode(&mut s);
        let r = inspect(&s, 0);
        let (at, kind) = error_of(&r);
        assert_eq!(at, part_body + record_at + rel, "{text}");
        assert!(kind.to_string().contains(text), "{kind}");
    }
}

#[test]
fn headerless_with_known_sections() {
    let mut s = Vec::new();
    Record::Part(7).encode(&mut s);
    let r = inspect_with(
        &s,
        &Options {
            headerless: true,
            known_sections: vec![(1, "ram".into())],
            ..Options::default()
        },
    );
    let (at, kind) = error_of(&r);
    assert_eq!(at, 0);
    assert_eq!(kind.to_string(), "Unknown section id 7 in PART/END");
    assert!(r.to_text().contains("header: none (headerless stream)"));
}

#[test]
fn stream_at_an_offset_with_a_missing_configuration() {
    let mut s = vec![0u8; 100];
    encode_header(&mut s);
    Record::Eof.encode(&mut s);
    let r = inspect(&s, 100);
    assert!(r.is_complete());
    assert!(r.configuration.is_none());
    assert_eq!(r.eof_offset, Some(108));
    assert!(r
        .notes
        .iter()
        .any(|n| n.offset == 108 && n.message.starts_with("no configuration")));
}
