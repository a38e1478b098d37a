//! What an inspection found: the values the walk fills in, and small queries over them.

use vmigrate_stream::command::Command;
use vmigrate_stream::config::Configuration;
use vmigrate_stream::devices::{GlobalState, TimerState};

use crate::error::InspectError;

/// Everything the inspector learnt about one file, in stream order where order matters.
/// When the walk broke, `error` says where, and the other fields hold what came before.
#[derive(Debug)]
pub struct Report {
    /// Size of the whole file.
    pub file_len: u64,
    /// File offset of the stream's first byte (`file:PATH,offset=N`).
    pub stream_offset: u64,
    /// The stream was read without header and configuration.
    pub headerless: bool,
    /// Stream version from the header; `None` for headerless streams or a bad header.
    pub version: Option<u32>,
    pub configuration: Option<Configuration>,
    /// Target page size used to split RAM record words.
    pub page_size: u64,
    pub page_size_source: PageSizeSource,
    /// Top-level records, and the records of packaged streams (with `depth` > 0).
    pub records: Vec<RecordEntry>,
    /// Records walked but not kept, once `Options::max_records` was reached.
    pub records_omitted: u64,
    /// The `ram` section, when the stream has one.
    pub ram: Option<RamSummary>,
    /// The VMDESCRIPTION trailer, when one was found.
    pub vmdesc: Option<VmdescSummary>,
    /// File offset of the top-level EOF record.
    pub eof_offset: Option<u64>,
    /// Things that are legal but unusual, or that QEMU only warns about.
    pub notes: Vec<Note>,
    /// File offset where the walk stopped (the end of the file when it succeeded).
    pub end_offset: u64,
    /// Why the walk stopped early.
    pub error: Option<InspectError>,
}

impl Report {
    /// A file is complete when its stream reached EOF without an error.
    pub fn is_complete(&self) -> bool {
        self.error.is_none() && self.eof_offset.is_some()
    }

    /// The sections, in stream order, packaged ones included.
    pub fn sections(&self) -> impl Iterator<Item = (&RecordEntry, &SectionInfo)> {
        self.records.iter().filter_map(|r| match &r.record {
            RecordInfo::Section(s) => Some((r, s)),
            _ => None,
        })
    }

    /// The commands, in stream order, packaged ones included.
    pub fn commands(&self) -> impl Iterator<Item = (&RecordEntry, &Command)> {
        self.records.iter().filter_map(|r| match &r.record {
            RecordInfo::Command(c) => Some((r, c)),
            _ => None,
        })
    }

    /// The run state carried by the `globalstate` section, if the stream has one.
    pub fn runstate(&self) -> Option<&str> {
        self.sections().find_map(|(_, s)| match &s.body {
            BodyInfo::GlobalState(g) => Some(g.runstate.as_str()),
            _ => None,
        })
    }
}

/// Where the page size came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSizeSource {
    /// The `configuration/target-page-bits` subsection.
    Configuration,
    /// The `page_size` member of the vmdesc trailer.
    Vmdesc,
    /// Neither: the x86 target page size, which QEMU leaves implicit.
    Default,
}

impl PageSizeSource {
    pub fn name(self) -> &'static str {
        match self {
            PageSizeSource::Configuration => "configuration",
            PageSizeSource::Vmdesc => "vmdesc",
            PageSizeSource::Default => "default",
        }
    }
}

/// Something worth telling the reader that did not stop the walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub offset: u64,
    pub message: String,
}

/// One record and where it starts.
#[derive(Debug, Clone)]
pub struct RecordEntry {
    /// File offset of the record's tag byte.
    pub offset: u64,
    /// 0 at top level, 1 inside a PACKAGED stream, and so on.
    pub depth: u8,
    pub record: RecordInfo,
}

#[derive(Debug, Clone)]
pub enum RecordInfo {
    Section(SectionInfo),
    Command(Command),
    Eof,
    /// The VMDESCRIPTION trailer: its JSON length.
    Vmdesc {
        json_len: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    Start,
    Part,
    End,
    Full,
}

impl SectionKind {
    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Start => "START",
            SectionKind::Part => "PART",
            SectionKind::End => "END",
            SectionKind::Full => "FULL",
        }
    }
}

/// A section: its header (PART and END borrow idstr, instance and version from their
/// START), where its body lies, and what the body held.
#[derive(Debug, Clone)]
pub struct SectionInfo {
    pub kind: SectionKind,
    pub section_id: u32,
    pub idstr: String,
    pub instance_id: u32,
    pub version_id: u32,
    /// File offset of the first body byte.
    pub body_offset: u64,
    /// Bytes from the body's start to its footer; `None` when the body broke.
    pub body_len: Option<u64>,
    pub body: BodyInfo,
}

#[derive(Debug, Clone)]
pub enum BodyInfo {
    /// Records of the `ram` section body.
    Ram(RamCounts),
    Timer(TimerState),
    GlobalState(GlobalState),
    /// A body passed over using its vmdesc size.
    Skipped,
    /// The body could not be read.
    Unread,
}

/// The RAM records of one section body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RamCounts {
    /// MEM_SIZE total, when the body carried the block list.
    pub mem_size: Option<u64>,
    pub blocks_listed: u64,
    pub zero_pages: u64,
    pub normal_pages: u64,
    pub xbzrle_pages: u64,
    pub multifd_flushes: u64,
    pub eos: u64,
}

/// The `ram` section over the whole stream.
#[derive(Debug, Clone, Default)]
pub struct RamSummary {
    /// MEM_SIZE total of the (last) block list.
    pub mem_size: Option<u64>,
    /// Blocks in list order; blocks that pages name without a list come after.
    pub blocks: Vec<RamBlockInfo>,
    pub multifd_flushes: u64,
    pub eos: u64,
}

impl RamSummary {
    pub fn zero_pages(&self) -> u64 {
        self.blocks.iter().map(|b| b.zero_pages).sum()
    }

    pub fn normal_pages(&self) -> u64 {
        self.blocks.iter().map(|b| b.normal_pages).sum()
    }

    pub fn xbzrle_pages(&self) -> u64 {
        self.blocks.iter().map(|b| b.xbzrle_pages).sum()
    }

    pub fn block(&self, idstr: &str) -> Option<&RamBlockInfo> {
        self.blocks.iter().find(|b| b.idstr == idstr)
    }
}

/// One RAM block and the page records that named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlockInfo {
    pub idstr: String,
    /// From the block list; `None` for a block only page records named (headerless).
    pub used_length: Option<u64>,
    /// The x-ignore-shared guest address.
    pub mr_addr: Option<u64>,
    pub mapped_ram: Option<MappedRamInfo>,
    pub zero_pages: u64,
    pub normal_pages: u64,
    pub xbzrle_pages: u64,
}

/// A block's mapped-ram header and what its page bitmap says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedRamInfo {
    /// File offset of the 28-byte header.
    pub header_offset: u64,
    pub version: u32,
    pub page_size: u64,
    pub bitmap_offset: u64,
    pub bitmap_len: u64,
    pub pages_offset: u64,
    /// Pages of the block (`used_length / page_size`).
    pub pages: u64,
    /// Set bits of the bitmap: pages whose contents are in the file.
    pub pages_present: u64,
}

/// The VMDESCRIPTION trailer.
#[derive(Debug, Clone)]
pub struct VmdescSummary {
    /// File offset of the `0x06` tag.
    pub offset: u64,
    pub json_len: u32,
    pub page_size: Option<u64>,
    pub devices: Vec<VmdescDevice>,
    /// The whole JSON, for `--json` output.
    pub json: serde_json::Value,
}

/// One device of the trailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmdescDevice {
    pub name: String,
    pub instance_id: u32,
    pub vmsd_name: Option<String>,
    pub version: Option<u64>,
    /// Body size computed from the description; `None` when it is malformed.
    pub size: Option<u64>,
}
