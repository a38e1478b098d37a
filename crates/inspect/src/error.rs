//! Why an inspection stopped early: what was wrong and the byte offset where it broke.

use vmigrate_stream::{DecodeError, DecodeErrorKind};

/// A file that could not be walked to its end. `offset` is a file offset (the stream
/// offset is already added in).
#[derive(Debug, thiserror::Error)]
#[error("{kind} (at byte offset {offset})")]
pub struct InspectError {
    /// File offset of the item that could not be read.
    pub offset: u64,
    /// What was wrong.
    pub kind: InspectErrorKind,
}

impl InspectError {
    pub fn new(offset: u64, kind: InspectErrorKind) -> Self {
        Self { offset, kind }
    }
}

impl From<DecodeError> for InspectError {
    fn from(e: DecodeError) -> Self {
        Self::new(e.offset, InspectErrorKind::Decode(e.kind))
    }
}

impl From<DecodeErrorKind> for InspectErrorKind {
    fn from(kind: DecodeErrorKind) -> Self {
        InspectErrorKind::Decode(kind)
    }
}

/// The ways a file can stop the inspector. Codec failures keep the codec's own message.
#[derive(Debug, thiserror::Error)]
pub enum InspectErrorKind {
    #[error(transparent)]
    Decode(DecodeErrorKind),
    #[error("stream offset {offset} is past the end of the {file_len}-byte file")]
    OffsetPastEnd { offset: u64, file_len: u64 },
    #[error("stream ends without an EOF record")]
    MissingEof,
    #[error(
        "no vmdesc description for section '{idstr}' instance {instance}, \
         so its body cannot be skipped"
    )]
    Undescribed { idstr: String, instance: u32 },
    #[error("the vmdesc description of '{idstr}' instance {instance} gives no usable size")]
    BadDescription { idstr: String, instance: u32 },
    #[error("body of iterative section '{0}' cannot be decoded (only 'ram' is known)")]
    UnknownIterative(String),
    #[error(
        "RAM block list ends early: blocks add up to 0x{listed:x} \
         of the MEM_SIZE total 0x{total:x}"
    )]
    BlockListShort { listed: u64, total: u64 },
    #[error("mapped-ram header of block '{block}': {detail}")]
    MappedRam { block: String, detail: String },
    #[error("XBZRLE page: {0}")]
    Xbzrle(String),
    #[error("RDMA hook records cannot be decoded")]
    RdmaHook,
    #[error("PACKAGED streams are nested more than {0} deep")]
    PackageTooDeep(u8),
    #[error("target page bits {0} are out of range")]
    BadPageBits(u32),
}
