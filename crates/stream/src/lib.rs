//! Pure codecs for QEMU 10.0's migration stream.
//!
//! Everything here turns bytes into values or values into bytes; nothing opens a socket,
//! starts a thread or reads a clock. The engine drives I/O around these functions.
//!
//! Layers, in stream order:
//!
//! - [`header`]: the `QEVM` magic and version.
//! - [`config`]: the configuration record and its subsections.
//! - [`section`]: section headers (START/PART/END/FULL), footers, EOF.
//! - [`command`]: `QEMU_VM_COMMAND` records.
//! - [`colo`]: COLO's checkpoint messages.
//! - [`postcopy`]: the payloads of POSTCOPY_ADVISE and POSTCOPY_RAM_DISCARD.
//! - [`ram`]: the `ram` section's records (MEM_SIZE, ZERO, PAGE, EOS, MULTIFD_FLUSH).
//! - [`vmstate`]: field encoding for device bodies, and the device descriptions.
//! - [`devices`]: the bodies of the `timer` and `globalstate` sections.
//! - [`vmdesc`]: the JSON trailer.
//! - [`xbzrle`]: the XBZRLE page encoding.
//!
//! Decoding reads from a [`Source`], which knows its byte offset so that every error can
//! say where the stream broke.

pub mod colo;
pub mod command;
pub mod config;
pub mod devices;
pub mod error;
pub mod header;
pub mod multifd;
pub mod postcopy;
pub mod preempt;
pub mod ram;
pub mod recover;
pub mod return_path;
pub mod section;
pub mod source;
pub mod vmdesc;
pub mod vmstate;
pub mod xbzrle;

pub use error::{DecodeError, DecodeErrorKind};
pub use source::{SliceSource, Source};

/// Longest counted string the format can carry.
pub const MAX_COUNTED_STRING: usize = 255;

/// Appends a counted string (`u8 len` + bytes). Names longer than 255 bytes are a caller
/// bug: every name the engine writes comes from a bounded identifier.
pub fn put_counted(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let len = u8::try_from(bytes.len()).expect("counted string longer than 255 bytes");
    out.push(len);
    out.extend_from_slice(bytes);
}
