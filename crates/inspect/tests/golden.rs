//! Golden tests: every main-stream capture of QEMU 10.0.2 is dissected by the oracle
//! (`tests/qemu-oracle/parse_stream.py`) and by the inspector, and the facts must agree:
//! sections and their footers, commands, EOF, RAM blocks and page counts, mapped-ram
//! bitmaps, device state, configuration, the vmdesc trailer, and where a truncated
//! capture ends.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmigrate_inspect::{inspect_with, BodyInfo, Options, RecordInfo, Report};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn oracle_dir() -> PathBuf {
    repo_root().join("tests/qemu-oracle")
}

/// What the oracle printed, reduced to comparable facts.
#[derive(Debug, Default)]
struct OracleFacts {
    /// (offset, kind, section id, package depth)
    sections: Vec<(u64, String, u32, u8)>,
    footers: Vec<u64>,
    /// (offset, name, package depth)
    commands: Vec<(u64, String, u8)>,
    eofs: Vec<u64>,
    blocks: Vec<(String, u64)>,
    /// (header offset, bitmap offset, pages offset, bitmap bytes, pages present, pages)
    mapped: Vec<(u64, u64, u64, u64, u64, u64)>,
    /// block -> (zero, normal, xbzrle)
    per_block: BTreeMap<String, (u64, u64, u64)>,
    /// The final `stats:` line (not printed for headerless streams).
    stats: Option<BTreeMap<String, u64>>,
    eos: u64,
    /// (cpu_ticks_offset, cpu_clock_offset) as printed (two's complement hex)
    timers: Vec<(u64, u64)>,
    runstates: Vec<String>,
    machine: Option<String>,
    caps: Vec<String>,
    uuid: Option<String>,
    vmdesc: Option<(u64, u32)>,
    truncated_at: Option<u64>,
    parsed_whole: bool,
}

fn num(s: &str) -> u64 {
    let s = s.trim_end_matches(',');
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).unwrap_or_else(|_| panic!("bad hex {s}")),
        None => s.parse().unwrap_or_else(|_| panic!("bad number {s}")),
    }
}

/// The value after `key=`: up to the next space, or the quoted text.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("{key}=");
    let start = line
        .match_indices(&pat)
        .find(|(i, _)| *i == 0 || line.as_bytes()[i - 1] == b' ')?
        .0
        + pat.len();
    let rest = &line[start..];
    if let Some(q) = rest.strip_prefix('\'') {
        return Some(&q[..q.find('\'')?]);
    }
    Some(rest.split(' ').next().unwrap_or(rest))
}

fn parse_oracle(out: &str) -> OracleFacts {
    let mut f = OracleFacts::default();
    for raw in out.lines() {
        let indent = raw.len() - raw.trim_start().len();
        let line = raw.trim();
        if let Some(rest) = line.strip_prefix("@0x") {
            let (off, what) = rest.split_once(' ').unwrap_or((rest, ""));
            let off = u64::from_str_radix(off, 16).unwrap();
            // The oracle indents packaged records by two levels.
            let depth = (indent / 4) as u8;
            if let Some(s) = what.strip_prefix("SECTION_") {
                let kind = s.split(' ').next().unwrap().to_string();
                let id = num(field(s, "id").unwrap()) as u32;
                f.sections.push((off, kind, id, depth));
            } else if let Some(c) = what.strip_prefix("COMMAND ") {
                let name = c.split('(').next().unwrap().to_string();
                f.commands.push((off, name, depth));
            } else if what == "EOF" {
                f.eofs.push(off);
            } else if what.starts_with("FOOTER") {
                f.footers.push(off);
            } else if what.starts_with("block idstr=") {
                let name = field(what, "idstr").unwrap().to_string();
                f.blocks
                    .push((name, num(field(what, "used_length").unwrap())));
            } else if what.starts_with("MappedRamHeader") {
                f.mapped.push((
                    off,
                    num(field(what, "bitmap_offset").unwrap()),
                    num(field(what, "pages_offset").unwrap()),
                    0,
                    0,
                    0,
                ));
            } else if what.starts_with("XBZRLE") {
                let b = field(what, "block").unwrap().to_string();
                f.per_block.entry(b).or_default().2 += 1;
            } else if what == "EOS" {
                f.eos += 1;
            } else if let Some((n, run)) = what.split_once(" x ") {
                let b = field(run, "block").unwrap().to_string();
                let e = f.per_block.entry(b).or_default();
                if run.starts_with("ZERO") {
                    e.0 += num(n);
                } else if run.starts_with("PAGE") {
                    e.1 += num(n);
                }
            } else if let Some(v) = what.strip_prefix("VMDESCRIPTION len=") {
                f.vmdesc = Some((off, num(v.split(' ').next().unwrap()) as u32));
            }
        } else if let Some(b) = line.strip_prefix("bitmap: ") {
            // "256 bytes at 0x80, 6 of 2048 pages present; ..."
            let words: Vec<&str> = b.split(' ').collect();
            let m = f.mapped.last_mut().expect("bitmap line after its header");
            m.3 = num(words[0]);
            m.4 = num(words[4]);
            m.5 = num(words[6]);
        } else if line.starts_with("cpu_ticks_offset=") {
            f.timers.push((
                num(field(line, "cpu_ticks_offset").unwrap()),
                num(field(line, "cpu_clock_offset").unwrap()),
            ));
        } else if line.starts_with("size=") {
            f.runstates
                .push(field(line, "runstate").unwrap().to_string());
        } else if line.starts_with("len=") {
            f.machine = field(line, "machine").map(str::to_string);
        } else if line.contains("configuration/capabilities") {
            let list = line.split("caps=[").nth(1).unwrap().trim_end_matches(']');
            f.caps = list
                .split(", ")
                .map(|c| c.trim_matches('\'').to_string())
                .collect();
        } else if line.contains("configuration/uuid") {
            f.uuid = field(line, "uuid").map(str::to_string);
        } else if let Some(s) = line.strip_prefix("stats:") {
            let stats = f.stats.get_or_insert_with(BTreeMap::new);
            for kv in s.split(", ").map(str::trim).filter(|kv| !kv.is_empty()) {
                let (k, v) = kv.split_once('=').unwrap();
                stats.insert(k.to_string(), num(v));
            }
        } else if line.starts_with("!! stream ends early") {
            let at = line.split(" bytes at ").nth(1).unwrap();
            f.truncated_at = Some(num(at.split(',').next().unwrap()));
        } else if line.starts_with("parsed whole file") || line.starts_with("stopped at") {
            f.parsed_whole = true;
        }
    }
    f
}

/// Runs the oracle; `None` (after a SKIP line) when python3 is not there.
fn run_oracle(args: &[&str], file: &Path) -> Option<String> {
    let script = oracle_dir().join("parse_stream.py");
    let out = match Command::new("python3")
        .arg(&script)
        .args(args)
        .arg(file)
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("SKIP: python3 is not installed; golden test not run");
            return None;
        }
        Err(e) => panic!("cannot run the oracle: {e}"),
    };
    let status = out.status.code();
    assert!(
        matches!(status, Some(0) | Some(2)),
        "oracle failed on {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).expect("oracle output is UTF-8"))
}

fn golden(rel: &str, oracle_args: &[&str], options: Options) {
    let path = oracle_dir().join("captures").join(rel);
    let Some(out) = run_oracle(oracle_args, &path) else {
        return;
    };
    let data = std::fs::read(&path).unwrap();
    let report = inspect_with(&data, &options);
    let oracle = parse_oracle(&out);
    compare(rel, &report, &oracle);
}

fn compare(name: &str, r: &Report, o: &OracleFacts) {
    let ctx = |what: &str| format!("{name}: {what}\n{}", r.to_text());

    let sections: Vec<(u64, String, u32, u8)> = r
        .sections()
        .map(|(e, s)| (e.offset, s.kind.name().to_string(), s.section_id, e.depth))
        .collect();
    assert_eq!(sections, o.sections, "{}", ctx("sections"));
    assert!(!sections.is_empty(), "{name}: no sections");

    let footers: Vec<u64> = r
        .sections()
        .filter_map(|(_, s)| s.body_len.map(|len| s.body_offset + len))
        .collect();
    assert_eq!(footers, o.footers, "{}", ctx("footer offsets (body sizes)"));

    let commands: Vec<(u64, String, u8)> = r
        .commands()
        .map(|(e, c)| (e.offset, c.name().to_string(), e.depth))
        .collect();
    assert_eq!(commands, o.commands, "{}", ctx("commands"));

    let eofs: Vec<u64> = r
        .records
        .iter()
        .filter(|e| matches!(e.record, RecordInfo::Eof))
        .map(|e| e.offset)
        .collect();
    assert_eq!(eofs, o.eofs, "{}", ctx("EOF"));

    let ram = r.ram.as_ref().expect("every capture has a ram section");
    let blocks: Vec<(String, u64)> = ram
        .blocks
        .iter()
        .filter_map(|b| Some((b.idstr.clone(), b.used_length?)))
        .collect();
    assert_eq!(blocks, o.blocks, "{}", ctx("RAM blocks"));

    let mapped: Vec<_> = ram
        .blocks
        .iter()
        .filter_map(|b| b.mapped_ram)
        .map(|m| {
            (
                m.header_offset,
                m.bitmap_offset,
                m.pages_offset,
                m.bitmap_len,
                m.pages_present,
                m.pages,
            )
        })
        .collect();
    assert_eq!(mapped, o.mapped, "{}", ctx("mapped-ram"));

    let per_block: BTreeMap<String, (u64, u64, u64)> = ram
        .blocks
        .iter()
        .filter(|b| b.zero_pages + b.normal_pages + b.xbzrle_pages > 0)
        .map(|b| {
            (
                b.idstr.clone(),
                (b.zero_pages, b.normal_pages, b.xbzrle_pages),
            )
        })
        .collect();
    assert_eq!(per_block, o.per_block, "{}", ctx("pages per block"));
    if let Some(stats) = &o.stats {
        let stat = |k: &str| stats.get(k).copied().unwrap_or(0);
        assert_eq!(ram.zero_pages(), stat("zero_pages"), "{name}: zero pages");
        assert_eq!(
            ram.normal_pages(),
            stat("normal_pages"),
            "{name}: normal pages"
        );
        assert_eq!(
            ram.xbzrle_pages(),
            stat("xbzrle_pages"),
            "{name}: xbzrle pages"
        );
        assert_eq!(
            ram.multifd_flushes,
            stat("multifd_flush"),
            "{name}: flushes"
        );
    }
    assert_eq!(ram.eos, o.eos, "{}", ctx("EOS count"));

    let timers: Vec<(u64, u64)> = r
        .sections()
        .filter_map(|(_, s)| match &s.body {
            BodyInfo::Timer(t) => Some((t.cpu_ticks_offset as u64, t.cpu_clock_offset as u64)),
            _ => None,
        })
        .collect();
    assert_eq!(timers, o.timers, "{}", ctx("timer"));
    let runstates: Vec<String> = r
        .sections()
        .filter_map(|(_, s)| match &s.body {
            BodyInfo::GlobalState(g) => Some(g.runstate.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(runstates, o.runstates, "{}", ctx("globalstate"));

    let cfg = r.configuration.as_ref();
    assert_eq!(cfg.map(|c| c.machine.clone()), o.machine, "{name}: machine");
    let caps = cfg.map(|c| c.capabilities.clone()).unwrap_or_default();
    assert_eq!(caps, o.caps, "{name}: capabilities");
    let uuid = cfg
        .and_then(|c| c.uuid)
        .map(|u| u.iter().map(|b| format!("{b:02x}")).collect::<String>());
    assert_eq!(uuid, o.uuid, "{name}: uuid");

    let vmdesc = r.vmdesc.as_ref().map(|v| (v.offset, v.json_len));
    assert_eq!(vmdesc, o.vmdesc, "{}", ctx("vmdesc"));
    if let Some(v) = &r.vmdesc {
        // The trailer describes the FULL sections written at completion, in order.
        let fulls: Vec<(String, u32)> = r
            .sections()
            .filter(|(_, s)| s.kind == vmigrate_inspect::SectionKind::Full)
            .map(|(_, s)| (s.idstr.clone(), s.instance_id))
            .collect();
        let described: Vec<(String, u32)> = v
            .devices
            .iter()
            .map(|d| (d.name.clone(), d.instance_id))
            .collect();
        assert_eq!(fulls, described, "{name}: vmdesc devices");
        assert!(v.devices.iter().all(|d| d.size.is_some()), "{name}: sizes");
    }

    match o.truncated_at {
        Some(at) => {
            let e = r
                .error
                .as_ref()
                .unwrap_or_else(|| panic!("{}", ctx("no error")));
            assert_eq!(e.offset, at, "{}", ctx("truncation offset"));
            assert!(!r.is_complete());
        }
        None => {
            assert!(o.parsed_whole, "{name}: oracle did not finish");
            assert!(r.is_complete(), "{}", ctx("not complete"));
            assert_eq!(r.end_offset, r.file_len, "{name}: end offset");
        }
    }
}

fn plain(rel: &str) {
    golden(rel, &[], Options::default());
}

#[test]
fn none_bin() {
    plain("none.bin");
}

#[test]
fn none_slirp_bin() {
    plain("none_slirp.bin");
}

#[test]
fn base_bin() {
    plain("base.bin");
}

#[test]
fn uuid_is_bin() {
    plain("uuid_is.bin");
}

#[test]
fn xbzrle_bin() {
    plain("xbzrle.bin");
}

#[test]
fn mr_bin() {
    plain("mr.bin");
}

#[test]
fn mrmf_bin() {
    plain("mrmf.bin");
}

#[test]
fn mroff_bin() {
    golden(
        "mroff.bin",
        &["--offset", "4096"],
        Options {
            stream_offset: 4096,
            ..Options::default()
        },
    );
}

#[test]
fn socket_captures() {
    for dir in [
        "cap_mf",
        "cap_mf_persec",
        "cap_mf_uuid",
        "cap_mf_zlib",
        "cap_mf_zplegacy",
        "cap_mf_zstd",
        "cap_pc",
        "cap_pcp",
        "cap_rp",
    ] {
        plain(&format!("{dir}/conn0.c2s"));
    }
}

#[test]
fn truncated_recovery_capture() {
    plain("cap_rec/gen1/conn0.c2s");
}

#[test]
fn headerless_recovery_capture() {
    golden(
        "cap_rec/gen2/conn0.c2s",
        &["--no-header", "--sections", "1=ram"],
        Options {
            headerless: true,
            known_sections: vec![(1, "ram".to_string())],
            ..Options::default()
        },
    );
}

#[test]
fn oracle_output_parser() {
    let out = "@0x0 magic=0x5145564d (OK) version=3\n\
        @0x8 CONFIGURATION\n  len=4 machine='none'\n\
        @0x11 SECTION_START id=1 idstr='ram' instance=0 version=4\n\
        \x20 @0x47 4 x PAGE block='m0' offsets 0x0..0x3000\n\
        \x20 @0x406a 2044 x ZERO block='m0' offsets 0x4000..0x7ff000\n\
        \x20 @0x8846 EOS\n\
        @0x100920 COMMAND PACKAGED(7) len=4 payload=000000c9\n\
        \x20   @0x10092e SECTION_FULL id=0 idstr='timer' instance=0 version=2\n\
        stats: normal_pages=4, zero_pages=2044\n";
    let f = parse_oracle(out);
    assert_eq!(f.machine.as_deref(), Some("none"));
    assert_eq!(f.per_block["m0"], (2044, 4, 0));
    assert_eq!(f.sections[1], (0x10092e, "FULL".to_string(), 0, 1));
    assert_eq!(f.commands[0].2, 0);
    assert_eq!(f.stats.unwrap()["zero_pages"], 2044);
    assert_eq!(f.eos, 1);
}
