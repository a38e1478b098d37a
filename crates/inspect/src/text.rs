//! The human-readable report.

use std::fmt::Write;

use vmigrate_stream::command::Command;
use vmigrate_stream::config::format_uuid;

use crate::commands;
use crate::report::{BodyInfo, RamCounts, RecordInfo, Report, SectionInfo};

impl Report {
    /// The report as text, one fact per line; offsets are file offsets in hex.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        self.write_text(&mut out)
            .expect("writing to a String cannot fail");
        out
    }

    fn write_text(&self, out: &mut String) -> std::fmt::Result {
        write!(out, "file: {} bytes", self.file_len)?;
        if self.stream_offset != 0 {
            write!(out, ", stream at offset 0x{:x}", self.stream_offset)?;
        }
        writeln!(out)?;
        match self.version {
            Some(v) => writeln!(out, "header: QEVM version {v}")?,
            None if self.headerless => writeln!(out, "header: none (headerless stream)")?,
            None => writeln!(out, "header: not read")?,
        }
        if let Some(cfg) = &self.configuration {
            writeln!(out, "configuration: machine '{}'", cfg.machine)?;
            let caps = if cfg.capabilities.is_empty() {
                "(none)".to_string()
            } else {
                cfg.capabilities.join(", ")
            };
            writeln!(out, "  capabilities: {caps}")?;
            if let Some(u) = &cfg.uuid {
                writeln!(out, "  uuid: {}", format_uuid(u))?;
            }
            if let Some(bits) = cfg.target_page_bits {
                writeln!(out, "  target page bits: {bits}")?;
            }
        }
        writeln!(
            out,
            "page size: {} (from {})",
            self.page_size,
            self.page_size_source.name()
        )?;
        writeln!(out, "records:")?;
        for r in &self.records {
            let indent = "  ".repeat(usize::from(r.depth) + 1);
            write!(out, "{indent}0x{:08x}  ", r.offset)?;
            match &r.record {
                RecordInfo::Section(s) => write_section(out, s)?,
                RecordInfo::Command(c) => write_command(out, c)?,
                RecordInfo::Eof => write!(out, "EOF")?,
                RecordInfo::Vmdesc { json_len } => {
                    write!(out, "VMDESCRIPTION {json_len} bytes of JSON")?
                }
            }
            writeln!(out)?;
        }
        if self.records_omitted > 0 {
            writeln!(
                out,
                "  ... {} more records not listed",
                self.records_omitted
            )?;
        }
        self.write_ram(out)?;
        self.write_vmdesc(out)?;
        if !self.notes.is_empty() {
            writeln!(out, "notes:")?;
            for n in &self.notes {
                writeln!(out, "  0x{:08x}  {}", n.offset, n.message)?;
            }
        }
        match &self.error {
            Some(e) => writeln!(out, "error: {e}")?,
            None if self.eof_offset.is_some() => writeln!(
                out,
                "result: complete, read to byte offset {}",
                self.end_offset
            )?,
            None => writeln!(out, "result: read to byte offset {}", self.end_offset)?,
        }
        Ok(())
    }

    fn write_ram(&self, out: &mut String) -> std::fmt::Result {
        let Some(ram) = &self.ram else {
            return Ok(());
        };
        write!(out, "ram:")?;
        if let Some(total) = ram.mem_size {
            write!(out, " MEM_SIZE 0x{total:x},")?;
        }
        writeln!(
            out,
            " {}; pages: {} normal, {} zero, {} xbzrle; {} MULTIFD_FLUSH, {} EOS",
            plural(ram.blocks.len() as u64, "block"),
            ram.normal_pages(),
            ram.zero_pages(),
            ram.xbzrle_pages(),
            ram.multifd_flushes,
            ram.eos
        )?;
        for b in &ram.blocks {
            write!(out, "  block '{}'", b.idstr)?;
            match b.used_length {
                Some(len) => write!(out, " length 0x{len:x}")?,
                None => write!(out, " (not listed)")?,
            }
            if let Some(addr) = b.mr_addr {
                write!(out, " mr_addr 0x{addr:x}")?;
            }
            writeln!(
                out,
                ": {} normal, {} zero, {} xbzrle",
                b.normal_pages, b.zero_pages, b.xbzrle_pages
            )?;
            if let Some(m) = &b.mapped_ram {
                writeln!(
                    out,
                    "    mapped-ram: header v{} at 0x{:x}, page size {}, bitmap {} bytes at 0x{:x} \
                     ({} of {} pages present), pages at 0x{:x}",
                    m.version,
                    m.header_offset,
                    m.page_size,
                    m.bitmap_len,
                    m.bitmap_offset,
                    m.pages_present,
                    m.pages,
                    m.pages_offset
                )?;
            }
        }
        Ok(())
    }

    fn write_vmdesc(&self, out: &mut String) -> std::fmt::Result {
        let Some(v) = &self.vmdesc else {
            return Ok(());
        };
        write!(out, "vmdesc: {} bytes at 0x{:x}", v.json_len, v.offset)?;
        if let Some(ps) = v.page_size {
            write!(out, ", page size {ps}")?;
        }
        writeln!(out, ", {}", plural(v.devices.len() as u64, "device"))?;
        for d in &v.devices {
            write!(out, "  '{}' instance {}", d.name, d.instance_id)?;
            if let Some(vmsd) = &d.vmsd_name {
                write!(out, " vmsd '{vmsd}'")?;
            }
            if let Some(version) = d.version {
                write!(out, " version {version}")?;
            }
            match d.size {
                Some(size) => writeln!(out, " size {size}")?,
                None => writeln!(out, " size unknown")?,
            }
        }
        Ok(())
    }
}

fn write_section(out: &mut String, s: &SectionInfo) -> std::fmt::Result {
    write!(
        out,
        "{:<5} id={} '{}'",
        s.kind.name(),
        s.section_id,
        s.idstr
    )?;
    if matches!(
        s.kind,
        crate::report::SectionKind::Start | crate::report::SectionKind::Full
    ) {
        write!(out, " instance {} version {}", s.instance_id, s.version_id)?;
    }
    match s.body_len {
        Some(len) => write!(out, ", body {len} bytes")?,
        None => write!(out, ", body broken")?,
    }
    match &s.body {
        BodyInfo::Ram(c) => write!(out, ": {}", ram_counts(c))?,
        BodyInfo::Timer(t) => write!(
            out,
            ": cpu_ticks_offset={} cpu_clock_offset={}",
            t.cpu_ticks_offset, t.cpu_clock_offset
        )?,
        BodyInfo::GlobalState(g) => write!(
            out,
            ": runstate {}{}",
            g.runstate,
            if g.vm_was_suspended {
                " (was suspended)"
            } else {
                ""
            }
        )?,
        BodyInfo::Skipped => write!(out, " (skipped by vmdesc size)")?,
        BodyInfo::Unread => {}
    }
    Ok(())
}

fn ram_counts(c: &RamCounts) -> String {
    let mut parts = Vec::new();
    if let Some(total) = c.mem_size {
        parts.push(format!(
            "MEM_SIZE 0x{total:x} ({})",
            plural(c.blocks_listed, "block")
        ));
    }
    for (n, what) in [
        (c.normal_pages, "normal"),
        (c.zero_pages, "zero"),
        (c.xbzrle_pages, "xbzrle"),
        (c.multifd_flushes, "MULTIFD_FLUSH"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    if c.eos > 0 {
        parts.push("EOS".to_string());
    }
    if parts.is_empty() {
        parts.push("no records".to_string());
    }
    parts.join(", ")
}

fn write_command(out: &mut String, c: &Command) -> std::fmt::Result {
    write!(out, "COMMAND {}{}", c.name(), commands::detail(c))
}

fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}
