//! The hand-built streams of `captures/synthetic/`: each gives what the captures README
//! says a real destination made of it — the same error at the byte where it breaks, or,
//! where the destination only complained about its own setup, the oddity in the report.

use std::path::{Path, PathBuf};

use vmigrate_inspect::{inspect, BodyInfo, Report};

fn synthetic(variant: &str) -> (Vec<u8>, Report) {
    let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/qemu-oracle/captures/synthetic")
        .join(format!("gen_{variant}.bin"));
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let report = inspect(&data, 0);
    (data, report)
}

/// Offsets in the synthetic streams (block `m0`, RAM section id 100):
/// header 8 + configuration `07 00000004 "none"` 9 bytes = START at 17; START header 17
/// bytes, so its body is at 34: MEM_SIZE 8, block entry 3 + 8, EOS 8; footer at 61;
/// PART at 66, body at 71; page records for pages 0-15 and 100, pages 0-3 and 100 PAGE.
const START_BODY: u64 = 34;
const BLOCK_ENTRY: u64 = START_BODY + 8;
const START_FOOTER: u64 = BLOCK_ENTRY + 11 + 8;
const PART_BODY: u64 = START_FOOTER + 5 + 5;
const PAGE: u64 = 4096;
/// Page 0 names its block (3 bytes); pages 1-3 continue; page 4 is the first ZERO.
const FIRST_ZERO: u64 = PART_BODY + (8 + 3 + PAGE) + 3 * (8 + PAGE);
/// 17 records: 5 PAGE, 12 ZERO (1 fill byte each), one block name.
const PART_EOS: u64 = PART_BODY + 17 * 8 + 3 + 5 * PAGE + 12;
const PART_FOOTER: u64 = PART_EOS + 8;
/// SWITCHOVER_START (5 bytes) follows the PART footer.
const AFTER_SWITCHOVER: u64 = PART_FOOTER + 5 + 5;

fn assert_error(variant: &str, offset: u64, message: &str) -> Report {
    let (_, r) = synthetic(variant);
    let e = r
        .error
        .as_ref()
        .unwrap_or_else(|| panic!("{variant}: no error\n{}", r.to_text()));
    assert_eq!(e.offset, offset, "{variant}: {e}");
    assert!(
        e.to_string().contains(message),
        "{variant}: '{e}' does not say '{message}'"
    );
    assert!(!r.is_complete());
    assert!(r.to_text().contains(&format!("error: {e}")));
    assert_eq!(r.to_json()["error"]["offset"], offset);
    r
}

fn assert_complete(variant: &str) -> Report {
    let (data, r) = synthetic(variant);
    assert!(r.is_complete(), "{variant}:\n{}", r.to_text());
    assert_eq!(r.end_offset, data.len() as u64);
    let ram = r.ram.as_ref().unwrap();
    assert_eq!(ram.normal_pages(), 5, "{variant}");
    assert_eq!(ram.zero_pages(), 12, "{variant}");
    r
}

fn has_note(r: &Report, text: &str) -> bool {
    r.notes.iter().any(|n| n.message.contains(text))
}

#[test]
fn accepted_streams() {
    for v in ["ok", "same_ids_as_qemu"] {
        let r = assert_complete(v);
        assert_eq!(r.runstate(), Some("paused"));
        assert!(r.notes.is_empty(), "{v}: {:?}", r.notes);
        assert!(r.vmdesc.as_ref().unwrap().devices.is_empty());
    }
    let r = assert_complete("gs_running");
    assert_eq!(r.runstate(), Some("running"));
    let ids: Vec<u32> = r.sections().map(|(_, s)| s.section_id).collect();
    assert_eq!(ids, [100, 100, 100, 7, 9]);
}

#[test]
fn accepted_with_a_missing_trailer() {
    let r = assert_complete("minimal");
    assert_eq!(r.runstate(), None);
    assert!(!r
        .sections()
        .any(|(_, s)| matches!(s.body, BodyInfo::Timer(_))));
    assert!(has_note(&r, "no VMDESCRIPTION trailer"));

    let r = assert_complete("no_switchover_cmd");
    assert!(r.commands().next().is_none());
    assert!(has_note(&r, "no VMDESCRIPTION trailer"));

    let r = assert_complete("machine_prefix");
    assert_eq!(r.configuration.as_ref().unwrap().machine, "no");

    let r = assert_complete("bad_vmdesc_type");
    assert!(has_note(&r, "Expected vmdescription section, but got 7"));
    assert!(r.vmdesc.is_none());
}

#[test]
fn machine_names_are_reported() {
    for (v, machine) in [
        ("machine_longer", "nonesuch"),
        ("wrong_machine", "pc-i440fx-10.0"),
    ] {
        let r = assert_complete(v);
        assert_eq!(r.configuration.as_ref().unwrap().machine, machine);
        assert!(r.to_text().contains(&format!("machine '{machine}'")));
    }
}

#[test]
fn versions_newer_than_qemu_are_noted() {
    let r = assert_complete("ram_v5");
    assert!(has_note(&r, "savevm: unsupported version 5 for 'ram' v4"));
    let r = assert_complete("timer_v3");
    assert!(has_note(&r, "savevm: unsupported version 3 for 'timer' v2"));
    assert!(r
        .sections()
        .any(|(_, s)| matches!(s.body, BodyInfo::Timer(t) if t.cpu_ticks_offset == 0x1000)));
}

#[test]
fn header_errors() {
    let r = assert_error("bad_magic", 0, "Not a migration stream");
    assert!(r.records.is_empty());
    assert_eq!(r.version, None);
    assert_error("v2", 4, "SaveVM v2 format is obsolete");
    assert_error("v4", 4, "Unsupported migration stream version");
    assert_error(
        "unknown_cfg_subsection",
        17,
        "Unknown configuration subsection 'configuration/bogus'",
    );
}

#[test]
fn configuration_claims_mapped_ram() {
    // The subsection adds 47 bytes; the header would follow the block entry.
    let r = assert_error(
        "caps_mapped_ram",
        BLOCK_ENTRY + 47 + 11,
        "mapped-ram header of block 'm0'",
    );
    assert_eq!(r.configuration.unwrap().capabilities, ["mapped-ram"]);
}

#[test]
fn block_list_errors() {
    assert_error(
        "wrong_block_len",
        BLOCK_ENTRY + 11,
        "blocks add up to 0x2000000 of the MEM_SIZE total 0x4000000",
    );
    // "nosuch" is 4 bytes longer than "m0"; the error names the page's block.
    let r = assert_error("unknown_block", PART_BODY + 4 + 8, "Can't find block m0");
    assert_eq!(r.ram.unwrap().blocks[0].idstr, "nosuch");
}

#[test]
fn footer_errors() {
    assert_error(
        "bad_footer_id",
        START_FOOTER,
        "Mismatched section id in footer for ram - read 0x65 expected 0x64",
    );
    let r = assert_error("no_footer", PART_FOOTER, "Missing section footer for ram");
    // The PART body was read before its footer was missed.
    let ram = r.ram.unwrap();
    assert_eq!((ram.normal_pages(), ram.zero_pages()), (5, 12));
}

#[test]
fn ram_record_errors() {
    assert_error(
        "zero_fill_nonzero",
        FIRST_ZERO + 8,
        "Found a zero page with value 85",
    );
    assert_error(
        "unknown_ram_flag",
        PART_EOS,
        "Unknown combination of migration flags: 0x100",
    );
}

#[test]
fn command_errors() {
    assert_error(
        "bad_cmd_len",
        AFTER_SWITCHOVER,
        "PING received with bad length - expecting 4, got 3",
    );
    assert_error(
        "unknown_cmd",
        AFTER_SWITCHOVER,
        "MIG_CMD 0xc unknown (len 0x0)",
    );
}

#[test]
fn unknown_section_and_tag() {
    let (_, r) = synthetic("unknown_section");
    let (entry, s) = r.sections().last().unwrap();
    assert_eq!(s.idstr, "nosuchdev");
    let body = entry.offset + 1 + 4 + 1 + 9 + 4 + 4;
    assert_error("unknown_section", body, "'nosuchdev' instance 0");
    // The stray 0x09 sits right before the final EOF byte.
    let (data, _) = synthetic("unknown_toplevel");
    assert_error(
        "unknown_toplevel",
        data.len() as u64 - 2,
        "Unknown savevm section type 9",
    );
}
