//! The destination side of postcopy recovery.
//!
//! ```text
//! postcopy-active|postcopy-recover ──(a channel broke, migrate-pause)──▶ postcopy-paused
//!     every channel shut down; faults stay pending (postcopy.rs), the guest waits
//! migrate-recover URI: a new listener (migrator.rs; no status change, as QEMU 10.0)
//! the source connects ──▶ postcopy-recover; the new main stream has no header:
//!     RECV_BITMAP(block)  ─▶ RP RECV_BITMAP(block), be64 size, bitmap, end mark
//!     [postcopy-preempt: the next connection is the new preempt channel]
//!     POSTCOPY_RESUME     ─▶ RP RESUME_ACK(1) ──▶ postcopy-active, pending pages asked again
//! ```
//!
//! The listen thread (`load.rs`) reads the new main stream as it read the old one;
//! this module holds what it needs to pause and to answer the handshake; accepting
//! the new connection is `accept.rs`'s [`crate::incoming::accept::RecoveryAcceptor`].

use vmigrate_stream::return_path::RpMessage;

use crate::channels::return_path::ReturnPathWriter;
use crate::channels::transport::Channel;
use crate::incoming::postcopy::{PostcopyIncoming, SharedWriter};
use crate::status::StatusError;

/// Why a recovery handshake failed on the destination.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("RECV_BITMAP for unknown RAM block '{0}'")]
    UnknownBlock(String),
    /// A recovery command outside a recovery.
    #[error("illegal {0} received: postcopy is not being recovered")]
    NotRecovering(&'static str),
    #[error(transparent)]
    Status(#[from] StatusError),
}

/// What a paused listen thread needs from the migration around it.
pub trait PostcopyRecovery: Sync {
    /// A channel broke: postcopy pauses (`reason` becomes the error) and this waits
    /// for the main connection of a recovery (the status is `postcopy-recover` then).
    /// `None` when the migration cannot pause (it is not in postcopy any more).
    fn pause_and_accept(&self, reason: &str) -> Option<Channel>;
    /// POSTCOPY_RESUME was answered: back to `postcopy-active`.
    fn resumed(&self) -> Result<(), StatusError>;
}

/// The return path of a recovery's new connection replaces the broken one.
pub(crate) fn replace_writer(writer: &SharedWriter, fd: std::os::fd::OwnedFd) {
    *writer.lock().unwrap_or_else(|e| e.into_inner()) =
        ReturnPathWriter::new(Box::new(std::fs::File::from(fd)));
}

/// RECV_BITMAP(`block`): sends the pages this side holds of it, as one write.
pub(crate) fn answer_recv_bitmap(
    pc: &PostcopyIncoming,
    writer: &SharedWriter,
    block: &str,
) -> Result<(), RecoverError> {
    let bitmap = pc
        .received_bitmap(block)
        .ok_or_else(|| RecoverError::UnknownBlock(block.to_string()))?;
    let mut out = Vec::with_capacity(bitmap.pages() as usize / 8 + 32);
    RpMessage::RecvBitmap {
        block: block.to_string(),
    }
    .encode(&mut out);
    bitmap.encode_body(&mut out);
    // A write that fails is the network's: the listen thread sees the break next.
    let _ = writer
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send_raw(&out);
    Ok(())
}

/// POSTCOPY_RESUME: the status back to `postcopy-active`, RESUME_ACK(1), and every
/// pending page asked for again.
pub(crate) fn answer_resume(
    pc: &PostcopyIncoming,
    writer: &SharedWriter,
    recovery: &dyn PostcopyRecovery,
) -> Result<(), RecoverError> {
    recovery.resumed()?;
    let _ = writer
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(&RpMessage::ResumeAck(
            vmigrate_stream::recover::RESUME_ACK_VALUE,
        ));
    pc.resume();
    Ok(())
}
