//! Reads a migration file (QEMU's or vmigrate's) and reports what it holds: the header
//! and configuration, every top-level record in order, the RAM section's block list and
//! page counts, the `timer` and `globalstate` device state, and the vmdesc trailer.
//!
//! A damaged file still gives a report: everything read before the damage, plus an
//! error naming the problem and the byte offset where it broke.
//!
//! ```
//! let report = vmigrate_inspect::inspect(b"QEVM\0\0\0\x03\x07\0\0\0\x04none\0", 0);
//! assert!(report.is_complete());
//! assert_eq!(report.configuration.unwrap().machine, "none");
//! ```
//!
//! The walk reads the file in place: page contents are skipped, not copied, and no length
//! from the file sizes an allocation before it has been checked against the bytes left.
//!
//! Modules:
//!
//! - `walk`: the forward walk over records and bodies.
//! - `trailer`: finds the vmdesc trailer from the end of the file, before the walk, so
//!   that device bodies can be skipped by their described size.
//! - [`report`]: the values a walk produces; `text` and `json` render them.

mod commands;
pub mod error;
mod json;
pub mod report;
mod text;
mod trailer;
mod walk;

pub use commands::{advise, discard, Discard};
pub use error::{InspectError, InspectErrorKind};
pub use report::{
    BodyInfo, MappedRamInfo, Note, PageSizeSource, RamBlockInfo, RamCounts, RamSummary,
    RecordEntry, RecordInfo, Report, SectionInfo, SectionKind, VmdescDevice, VmdescSummary,
};

/// Records kept in a report by default; a file with more is still walked to its end.
pub const DEFAULT_MAX_RECORDS: usize = 100_000;

/// How to read the file.
#[derive(Debug, Clone)]
pub struct Options {
    /// File offset of the stream's first byte (`file:PATH,offset=N`).
    pub stream_offset: u64,
    /// The stream starts with records, without header or configuration (the new main
    /// channel after a postcopy recovery).
    pub headerless: bool,
    /// Section ids started before this stream, as (id, idstr), for headerless streams.
    /// When empty, PART/END of an unknown id in a headerless stream are read as `ram`.
    pub known_sections: Vec<(u32, String)>,
    /// Most records kept in [`Report::records`]; later ones are only counted.
    pub max_records: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            stream_offset: 0,
            headerless: false,
            known_sections: Vec::new(),
            max_records: DEFAULT_MAX_RECORDS,
        }
    }
}

/// Inspects a whole file whose stream starts at `stream_offset`.
pub fn inspect(data: &[u8], stream_offset: u64) -> Report {
    inspect_with(
        data,
        &Options {
            stream_offset,
            ..Options::default()
        },
    )
}

/// Inspects a whole file with explicit options.
pub fn inspect_with(data: &[u8], options: &Options) -> Report {
    walk::run(data, options)
}
