//! Decode errors: what was wrong and at which byte offset of the stream.

use std::fmt;

/// A stream that could not be decoded, with the offset of the record that broke.
#[derive(Debug, thiserror::Error)]
#[error("{kind} (at byte offset {offset})")]
pub struct DecodeError {
    /// Offset from the start of the stream (or file) where the failing item starts.
    pub offset: u64,
    /// What was wrong.
    pub kind: DecodeErrorKind,
}

impl DecodeError {
    pub fn new(offset: u64, kind: DecodeErrorKind) -> Self {
        Self { offset, kind }
    }
}

/// The ways a stream can be wrong. Messages follow QEMU's texts where QEMU has one.
#[derive(Debug, thiserror::Error)]
pub enum DecodeErrorKind {
    #[error("stream ended early: needed {needed} bytes for {what}")]
    Truncated { what: &'static str, needed: usize },
    #[error("read failed while reading {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Guest memory could not take a page (the shared memory file is full, say).
    #[error("cannot write {what} into guest RAM: {source}")]
    GuestWrite {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("Not a migration stream")]
    BadMagic,
    #[error("SaveVM v2 format is obsolete and don't work anymore")]
    ObsoleteVersion,
    #[error("Unsupported migration stream version")]
    UnsupportedVersion(u32),
    #[error("Configuration section missing")]
    MissingConfiguration,
    #[error("Machine type name length {0} is out of range")]
    BadMachineNameLength(u32),
    #[error("Machine type received is '{received}' and local is '{local}'")]
    MachineMismatch { received: String, local: String },
    #[error("Unknown configuration subsection '{0}'")]
    UnknownConfigSubsection(String),
    #[error("Capability {name} is {local}, but received capability is {received}")]
    CapabilityMismatch {
        name: String,
        local: OnOff,
        received: OnOff,
    },
    #[error("Unknown capability '{0}' in configuration")]
    UnknownCapability(String),
    #[error("Capability count {0} is out of range")]
    BadCapabilityCount(u32),
    #[error("Received TARGET_PAGE_BITS is {received} but local is {local}")]
    PageBitsMismatch { received: u32, local: u32 },
    #[error("UUID received is {received} and local is {local}")]
    UuidMismatch { received: String, local: String },
    #[error("Unknown savevm section type {0}")]
    UnknownSectionType(u8),
    #[error("Unknown savevm section or instance '{idstr}' {instance}")]
    UnknownSection { idstr: String, instance: u32 },
    #[error("Unknown section id {0} in PART/END")]
    UnknownSectionId(u32),
    #[error("savevm: unsupported version {version} for '{idstr}' v{local}")]
    UnsupportedSectionVersion {
        idstr: String,
        version: u32,
        local: u32,
    },
    #[error("savevm: version {version} for '{idstr}' is older than the minimum {minimum}")]
    SectionVersionTooOld {
        idstr: String,
        version: u32,
        minimum: u32,
    },
    #[error("Missing section footer for {0}")]
    MissingFooter(String),
    #[error(
        "Mismatched section id in footer for {idstr} - read 0x{read:x} expected 0x{expected:x}"
    )]
    FooterMismatch {
        idstr: String,
        read: u32,
        expected: u32,
    },
    #[error("MIG_CMD 0x{cmd:x} unknown (len 0x{len:x})")]
    UnknownCommand { cmd: u16, len: u16 },
    #[error("{name} received with bad length - expecting {expected}, got {got}")]
    BadCommandLength {
        name: &'static str,
        expected: u16,
        got: u16,
    },
    #[error("Command {0} is not supported in a precopy stream")]
    UnsupportedCommand(&'static str),
    /// A command that the destination's phase does not allow (QEMU counts the phases
    /// of its `PostcopyState`: 0 none, 1 advise, 2 discard, 3 listening, 4 running, 5 end).
    #[error("CMD_{command} in wrong postcopy state ({phase})")]
    CommandInWrongPhase { command: &'static str, phase: u8 },
    #[error("Unknown combination of migration flags: 0x{0:x}")]
    UnknownRamFlags(u64),
    #[error("Unknown ramblock \"{0}\", cannot accept migration")]
    UnknownRamBlock(String),
    #[error("Can't find block {0}")]
    UnknownPageBlock(String),
    /// x-ignore-shared: the block both sides leave in shared memory is not at the same
    /// guest address (received first, then local, in decimal as QEMU prints them).
    #[error("Mismatched GPAs for block {idstr} {received}!= {local}")]
    MismatchedGpa {
        idstr: String,
        received: u64,
        local: u64,
    },
    /// x-ignore-shared: a page record for a block the destination leaves in shared memory.
    #[error("block {0} should not be migrated !")]
    IgnoredBlockPage(String),
    #[error("Size mismatch: {idstr}: 0x{received:x} != 0x{local:x}")]
    BlockSizeMismatch {
        idstr: String,
        received: u64,
        local: u64,
    },
    #[error("RAM block list lengths add up past the announced total 0x{total:x}")]
    BlockListOverrun { total: u64 },
    #[error("Ack, bad migration stream! (CONTINUE with no current block)")]
    ContinueWithoutBlock,
    #[error("Illegal RAM offset 0x{offset:x} in block {idstr} of 0x{len:x} bytes")]
    IllegalRamOffset {
        idstr: String,
        offset: u64,
        len: u64,
    },
    #[error("Found a zero page with value {0}")]
    NonZeroFill(u8),
    #[error("Empty counted string for {0}")]
    EmptyName(&'static str),
    #[error("Invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
    #[error("Unknown run state '{0}' in globalstate")]
    UnknownRunState(String),
    #[error("Subsection '{0}' is not known")]
    UnknownSubsection(String),
    #[error("Expected vmdescription section, but got {0}")]
    BadVmdescTag(u8),
    #[error("vmdesc JSON of {0} bytes is larger than the 16 MiB limit")]
    VmdescTooLarge(u32),
    #[error("vmdesc JSON is not valid: {0}")]
    VmdescJson(String),
}

/// A capability state as QEMU prints it in mismatch messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnOff {
    On,
    Off,
}

impl From<bool> for OnOff {
    fn from(b: bool) -> Self {
        if b {
            OnOff::On
        } else {
            OnOff::Off
        }
    }
}

impl fmt::Display for OnOff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnOff::On => "on",
            OnOff::Off => "off",
        })
    }
}
