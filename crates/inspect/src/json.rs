//! The machine-readable report.

use serde_json::{json, Map, Value};
use vmigrate_stream::command::Command;
use vmigrate_stream::config::format_uuid;

use crate::commands;
use crate::report::{
    BodyInfo, MappedRamInfo, RamBlockInfo, RamSummary, RecordEntry, RecordInfo, Report,
    VmdescSummary,
};

impl Report {
    /// The report as one JSON object. Offsets and sizes are numbers (file offsets).
    pub fn to_json(&self) -> Value {
        json!({
            "file_len": self.file_len,
            "stream_offset": self.stream_offset,
            "version": self.version,
            "configuration": self.configuration.as_ref().map(|c| json!({
                "machine": c.machine,
                "capabilities": c.capabilities,
                "uuid": c.uuid.as_ref().map(format_uuid),
                "target_page_bits": c.target_page_bits,
            })),
            "page_size": self.page_size,
            "page_size_source": self.page_size_source.name(),
            "records": self.records.iter().map(record).collect::<Vec<_>>(),
            "records_omitted": self.records_omitted,
            "ram": self.ram.as_ref().map(ram),
            "vmdesc": self.vmdesc.as_ref().map(vmdesc),
            "eof_offset": self.eof_offset,
            "notes": self.notes.iter().map(|n| json!({
                "offset": n.offset, "message": n.message,
            })).collect::<Vec<_>>(),
            "end_offset": self.end_offset,
            "complete": self.is_complete(),
            "error": self.error.as_ref().map(|e| json!({
                "offset": e.offset, "message": e.kind.to_string(),
            })),
        })
    }
}

fn record(r: &RecordEntry) -> Value {
    let mut m = Map::new();
    m.insert("offset".into(), json!(r.offset));
    m.insert("depth".into(), json!(r.depth));
    match &r.record {
        RecordInfo::Section(s) => {
            m.insert("type".into(), json!("section"));
            m.insert("kind".into(), json!(s.kind.name()));
            m.insert("section_id".into(), json!(s.section_id));
            m.insert("idstr".into(), json!(s.idstr));
            m.insert("instance_id".into(), json!(s.instance_id));
            m.insert("version_id".into(), json!(s.version_id));
            m.insert("body_offset".into(), json!(s.body_offset));
            m.insert("body_len".into(), json!(s.body_len));
            m.insert("body".into(), body(&s.body));
        }
        RecordInfo::Command(c) => {
            m.insert("type".into(), json!("command"));
            m.insert("name".into(), json!(c.name()));
            command_fields(&mut m, c);
        }
        RecordInfo::Eof => {
            m.insert("type".into(), json!("eof"));
        }
        RecordInfo::Vmdesc { json_len } => {
            m.insert("type".into(), json!("vmdesc"));
            m.insert("json_len".into(), json!(json_len));
        }
    }
    Value::Object(m)
}

fn body(b: &BodyInfo) -> Value {
    match b {
        BodyInfo::Ram(c) => json!({
            "type": "ram",
            "mem_size": c.mem_size,
            "blocks_listed": c.blocks_listed,
            "zero_pages": c.zero_pages,
            "normal_pages": c.normal_pages,
            "xbzrle_pages": c.xbzrle_pages,
            "multifd_flushes": c.multifd_flushes,
            "eos": c.eos,
        }),
        BodyInfo::Timer(t) => json!({
            "type": "timer",
            "cpu_ticks_offset": t.cpu_ticks_offset,
            "cpu_clock_offset": t.cpu_clock_offset,
        }),
        BodyInfo::GlobalState(g) => json!({
            "type": "globalstate",
            "runstate": g.runstate,
            "vm_was_suspended": g.vm_was_suspended,
        }),
        BodyInfo::Skipped => json!({"type": "skipped"}),
        BodyInfo::Unread => json!({"type": "unread"}),
    }
}

fn command_fields(m: &mut Map<String, Value>, c: &Command) {
    match c {
        Command::Ping(v) => {
            m.insert("value".into(), json!(v));
        }
        Command::Packaged(len) => {
            m.insert("package_len".into(), json!(len));
        }
        Command::PostcopyAdvise(p) => {
            if let Some((summary, target)) = commands::advise(p) {
                m.insert("ram_pagesize_summary".into(), json!(summary));
                m.insert("target_page_size".into(), json!(target));
            }
            m.insert("payload_len".into(), json!(p.len()));
        }
        Command::PostcopyRamDiscard(p) => {
            if let Some(d) = commands::discard(p) {
                m.insert("block".into(), json!(d.block));
                m.insert("ranges".into(), json!(d.ranges));
            }
            m.insert("payload_len".into(), json!(p.len()));
        }
        Command::RecvBitmap(block) => {
            m.insert("block".into(), json!(block));
        }
        _ => {}
    }
}

fn ram(r: &RamSummary) -> Value {
    json!({
        "mem_size": r.mem_size,
        "zero_pages": r.zero_pages(),
        "normal_pages": r.normal_pages(),
        "xbzrle_pages": r.xbzrle_pages(),
        "multifd_flushes": r.multifd_flushes,
        "eos": r.eos,
        "blocks": r.blocks.iter().map(block).collect::<Vec<_>>(),
    })
}

fn block(b: &RamBlockInfo) -> Value {
    json!({
        "idstr": b.idstr,
        "used_length": b.used_length,
        "mr_addr": b.mr_addr,
        "zero_pages": b.zero_pages,
        "normal_pages": b.normal_pages,
        "xbzrle_pages": b.xbzrle_pages,
        "mapped_ram": b.mapped_ram.as_ref().map(mapped_ram),
    })
}

fn mapped_ram(m: &MappedRamInfo) -> Value {
    json!({
        "header_offset": m.header_offset,
        "version": m.version,
        "page_size": m.page_size,
        "bitmap_offset": m.bitmap_offset,
        "bitmap_len": m.bitmap_len,
        "pages_offset": m.pages_offset,
        "pages": m.pages,
        "pages_present": m.pages_present,
    })
}

fn vmdesc(v: &VmdescSummary) -> Value {
    json!({
        "offset": v.offset,
        "json_len": v.json_len,
        "page_size": v.page_size,
        "devices": v.devices.iter().map(|d| json!({
            "name": d.name,
            "instance_id": d.instance_id,
            "vmsd_name": d.vmsd_name,
            "version": d.version,
            "size": d.size,
        })).collect::<Vec<_>>(),
        "description": v.json,
    })
}
