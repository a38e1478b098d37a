//! The rendered reports: the text for a known capture line by line, the JSON shape, and
//! the options that change what is kept.

use std::path::{Path, PathBuf};

use vmigrate_inspect::{inspect, inspect_with, Options, RecordInfo};

fn capture(rel: &str) -> Vec<u8> {
    let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/qemu-oracle/captures")
        .join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

const BASE_TEXT: &str = "\
file: 35933 bytes
header: QEVM version 3
configuration: machine 'none'
  capabilities: (none)
page size: 4096 (from vmdesc)
records:
  0x00000011  START id=1 'ram' instance 0 version 4, body 27 bytes: MEM_SIZE 0x800000 (1 block), EOS
  0x00000042  PART  id=1 'ram', body 34823 bytes: 4 normal, 2044 zero, EOS
  0x00008853  COMMAND SWITCHOVER_START
  0x00008858  END   id=1 'ram', body 8 bytes: EOS
  0x0000886a  FULL  id=0 'timer' instance 0 version 2, body 24 bytes: cpu_ticks_offset=90754924 cpu_clock_offset=34959061
  0x0000889a  FULL  id=3 'globalstate' instance 0 version 1, body 104 bytes: runstate paused
  0x00008920  EOF
  0x00008921  VMDESCRIPTION 823 bytes of JSON
ram: MEM_SIZE 0x800000, 1 block; pages: 4 normal, 2044 zero, 0 xbzrle; 0 MULTIFD_FLUSH, 3 EOS
  block 'm0' length 0x800000: 4 normal, 2044 zero, 0 xbzrle
vmdesc: 823 bytes at 0x8921, page size 4096, 2 devices
  'timer' instance 0 vmsd 'timer' version 2 size 24
  'globalstate' instance 0 vmsd 'globalstate' version 1 size 104
result: complete, read to byte offset 35933
";

#[test]
fn base_bin_text() {
    let text = inspect(&capture("base.bin"), 0).to_text();
    for (got, want) in text.lines().zip(BASE_TEXT.lines()) {
        assert_eq!(got, want);
    }
    assert_eq!(text.lines().count(), BASE_TEXT.lines().count());
}

#[test]
fn text_shows_capabilities_uuid_and_mapped_ram() {
    let text = inspect(&capture("uuid_is.bin"), 0).to_text();
    assert!(text.contains("  capabilities: x-ignore-shared\n"));
    assert!(text.contains("  uuid: 12345678-9abc-def0-1122-334455667788\n"));
    assert!(text.contains("block 'm0' length 0x800000 mr_addr 0x0: 0 normal"));

    let text = inspect(&capture("mroff.bin"), 4096).to_text();
    assert!(text.starts_with("file: 9438450 bytes, stream at offset 0x1000\n"));
    assert!(text.contains(
        "    mapped-ram: header v1 at 0x1064, page size 4096, bitmap 256 bytes at 0x1080 \
         (4 of 2048 pages present), pages at 0x100000\n"
    ));
}

#[test]
fn text_shows_packaged_records_indented() {
    let text = inspect(&capture("cap_pc/conn0.c2s"), 0).to_text();
    assert!(text.contains(
        "  0x00100920  COMMAND PACKAGED 201 bytes\n    0x00100929  COMMAND POSTCOPY_LISTEN\n"
    ));
    assert!(text.contains("COMMAND POSTCOPY_RAM_DISCARD block 'm0' 0x100000+0x700000\n"));
    assert!(text
        .contains("COMMAND POSTCOPY_ADVISE ram_pagesize_summary=0x1000 target_page_size=4096\n"));
    assert!(text.contains("no VMDESCRIPTION trailer after EOF (as after every postcopy)"));
}

#[test]
fn json_shape() {
    let j = inspect(&capture("base.bin"), 0).to_json();
    assert_eq!(j["version"], 3);
    assert_eq!(j["configuration"]["machine"], "none");
    assert_eq!(j["complete"], true);
    assert!(j["error"].is_null());
    assert_eq!(j["records"].as_array().unwrap().len(), 8);
    let part = &j["records"][1];
    assert_eq!(part["kind"], "PART");
    assert_eq!(part["body"]["normal_pages"], 4);
    assert_eq!(part["body_len"], 34823);
    assert_eq!(j["records"][4]["body"]["type"], "timer");
    assert_eq!(j["records"][5]["body"]["runstate"], "paused");
    assert_eq!(j["ram"]["blocks"][0]["idstr"], "m0");
    assert_eq!(j["ram"]["zero_pages"], 2044);
    assert_eq!(j["vmdesc"]["devices"][1]["size"], 104);
    assert_eq!(j["vmdesc"]["description"]["page_size"], 4096);

    let j = inspect(&capture("mrmf.bin"), 0).to_json();
    let m = &j["ram"]["blocks"][0]["mapped_ram"];
    assert_eq!(m["pages_present"], 67);
    assert_eq!(m["bitmap_offset"], 0x80);
    assert_eq!(m["pages_offset"], 0x100000);

    let j = inspect(&capture("cap_rec/gen1/conn0.c2s"), 0).to_json();
    assert_eq!(j["complete"], false);
    assert_eq!(j["error"]["offset"], 0x160d2f);
    assert!(j["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("stream ended early"));
}

#[test]
fn record_cap_keeps_counting() {
    let data = capture("xbzrle.bin");
    let full = inspect(&data, 0);
    let capped = inspect_with(
        &data,
        &Options {
            max_records: 10,
            ..Options::default()
        },
    );
    assert!(capped.is_complete());
    assert_eq!(capped.records.len(), 10);
    assert_eq!(capped.records_omitted as usize + 10, full.records.len());
    let (c, f) = (capped.ram.as_ref().unwrap(), full.ram.as_ref().unwrap());
    assert_eq!(c.xbzrle_pages(), 696);
    assert_eq!(c.xbzrle_pages(), f.xbzrle_pages());
    assert!(capped.to_text().contains(&format!(
        "... {} more records not listed",
        capped.records_omitted
    )));
}

#[test]
fn headerless_without_known_sections() {
    let data = capture("cap_rec/gen2/conn0.c2s");
    let r = inspect_with(
        &data,
        &Options {
            headerless: true,
            ..Options::default()
        },
    );
    assert!(r.is_complete(), "{}", r.to_text());
    assert!(r
        .notes
        .iter()
        .any(|n| n.message == "section id 1 was never started here; taken to be 'ram'"));
    let ram = r.ram.unwrap();
    assert_eq!(ram.block("m0").unwrap().normal_pages, 149);
    assert_eq!(ram.block("m0").unwrap().used_length, None);
    assert!(matches!(r.records[0].record, RecordInfo::Command(_)));
    // Read as a normal stream, the same bytes are not a migration stream.
    let r = inspect(&data, 0);
    assert_eq!(
        r.error.unwrap().to_string(),
        "Not a migration stream (at byte offset 0)"
    );
}
