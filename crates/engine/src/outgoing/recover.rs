//! The source side of postcopy recovery: pausing when a channel breaks during
//! postcopy, and resuming over a new connection once `migrate` with `resume` says
//! where.
//!
//! ```text
//! postcopy-active|postcopy-recover ──(write or return path failed)──▶ postcopy-paused
//!     the VM stays stopped; the saver keeps its dirty bitmap
//! postcopy-paused ──migrate resume=true──▶ postcopy-recover-setup     (migrator.rs)
//!     connect (TLS when configured)   ──(failed)──▶ postcopy-paused
//! postcopy-recover: new main stream, no header:
//!     RECV_BITMAP(block) for every block          ─▶ RP RECV_BITMAP + bitmap each
//!     dirty bitmap := pages the destination did not receive
//!     [postcopy-preempt: a new preempt channel]
//!     POSTCOPY_RESUME                             ─▶ RP RESUME_ACK(1)
//! postcopy-active: the push and the page requests go on (postcopy.rs)
//! ```
//!
//! Nothing is lost: a page leaves the dirty bitmap when it is written, but after a
//! break the bitmap is rebuilt from what the destination says it holds, so a page
//! that was in flight (in a socket buffer, half written) goes again. Recovery can run
//! as many times as it takes; a failure during it pauses again. Errors that are not
//! the network's (a bad page request, a bitmap for an unknown block or of the wrong
//! size) fail the migration, with the source VM stopped as after any postcopy
//! failure.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use vmigrate_stream::command::Command;

use crate::channels::return_path::{ReturnPath, ReturnPathError};
use crate::channels::transport::{self, Address};
use crate::io::{StreamWriter, WriteError};
use crate::outgoing::postcopy::{PostcopyError, PreemptChannel};
use crate::outgoing::ram_save::RamSaver;
use crate::shared::Shared;
use crate::status::MigrationStatus;

/// The channels of a postcopy session after a recovery.
pub(crate) struct Resumed {
    pub writer: StreamWriter,
    pub rp: Arc<ReturnPath>,
    pub preempt: Option<PreemptChannel>,
    /// The new main socket, held until the session ends (cancel and `migrate-pause`
    /// hold it weakly).
    pub socket: Arc<OwnedFd>,
}

/// What a recovery needs from the session.
pub(crate) struct RecoverOptions<'a> {
    /// `postcopy-preempt`: a new preempt channel is opened to the resume address.
    pub preempt: bool,
    pub shared: &'a Shared,
}

/// Whether a postcopy failure is the network's (the migration pauses) rather than the
/// protocol's (it fails).
pub(crate) fn is_network_failure(e: &PostcopyError) -> bool {
    match e {
        PostcopyError::Write(w) => matches!(w, WriteError::Io(_) | WriteError::Tls(_)),
        PostcopyError::ReturnPath(rp) => is_network_rp_failure(rp),
        _ => false,
    }
}

/// A return-path failure that is the connection's: it broke or ended.
fn is_network_rp_failure(e: &ReturnPathError) -> bool {
    use vmigrate_stream::DecodeErrorKind;
    match e {
        ReturnPathError::ClosedWithoutShut => true,
        ReturnPathError::Read(d) => {
            matches!(
                d.kind,
                DecodeErrorKind::Io { .. } | DecodeErrorKind::Truncated { .. }
            )
        }
        _ => false,
    }
}

/// Pauses the session (from `from`, with `reason` as its error) and waits until a
/// recovery succeeds; returns the new channels. Only an error that is not the
/// network's ends it.
pub(crate) fn pause_and_resume(
    from: MigrationStatus,
    reason: &str,
    saver: &mut RamSaver,
    options: &RecoverOptions<'_>,
) -> Result<Resumed, PostcopyError> {
    let shared = options.shared;
    shared
        .pause_postcopy(from, reason)
        .map_err(|e| PostcopyError::Recovery(e.to_string()))?;
    loop {
        let addr = shared.wait_recovery(|r| r.resume_to.take());
        match resume(&addr, saver, options) {
            Ok(resumed) => return Ok(resumed),
            Err(Failure::Network(stage, reason)) => {
                shared
                    .pause_postcopy(stage, &reason)
                    .map_err(|e| PostcopyError::Recovery(e.to_string()))?;
            }
            Err(Failure::Fatal(e)) => return Err(e),
        }
    }
}

/// How one recovery attempt failed: the network's (pause again from the status it
/// reached) or for good.
enum Failure {
    Network(MigrationStatus, String),
    Fatal(PostcopyError),
}

impl Failure {
    fn at(stage: MigrationStatus, e: PostcopyError) -> Self {
        if is_network_failure(&e) {
            Failure::Network(stage, e.to_string())
        } else {
            Failure::Fatal(e)
        }
    }
}

/// One recovery attempt, from `postcopy-recover-setup`.
fn resume(
    addr: &Address,
    saver: &mut RamSaver,
    options: &RecoverOptions<'_>,
) -> Result<Resumed, Failure> {
    let shared = options.shared;
    let setup = MigrationStatus::PostcopyRecoverSetup;
    // The sessions of the broken connections (and of an attempt that failed) are over.
    shared.retire_tls_relays();
    let mut ch = transport::connect_outgoing(addr)
        .map_err(|e| Failure::Network(setup, format!("postcopy recovery: {}", e.0)))?;
    if let Some(tls) = shared.tls_client() {
        let cancel = shared.cancel_flag();
        crate::channels::tls::secure_outgoing(&mut ch, &tls, &cancel, "main")
            .map_err(|e| Failure::Network(setup, e.0))?;
        if let Some(relay) = ch.tls_relay.take() {
            shared.add_tls_relay(relay);
        }
    }
    let socket = Arc::new(ch.fd);
    shared.register_cancel_fd(&socket);
    let recover = MigrationStatus::PostcopyRecover;
    shared
        .transition(setup, recover)
        .map_err(|e| Failure::Fatal(PostcopyError::Recovery(e.to_string())))?;
    let back = socket
        .try_clone()
        .map_err(|e| Failure::at(recover, WriteError::Io(e.to_string()).into()))?;
    let blocks = (0..saver.block_count())
        .map(|i| (saver.block(i).idstr().to_string(), saver.target_pages(i)))
        .collect();
    let rp = ReturnPath::spawn_for_recovery(back, blocks);
    let stats = shared.stats();
    let mut w = StreamWriter::new(
        socket.clone(),
        stats.transferred.clone(),
        shared.max_bandwidth(),
        shared.cancel_flag(),
    );
    let handshake = |w: &mut StreamWriter, saver: &mut RamSaver| -> Result<(), PostcopyError> {
        // All the questions first, then the answers (the destination answers each
        // as it reads it).
        for i in 0..saver.block_count() {
            let name = saver.block(i).idstr().to_string();
            w.with_buf(|out| Command::RecvBitmap(name).encode(out))?;
        }
        w.flush()?;
        for i in 0..saver.block_count() {
            let bitmap = rp.await_recv_bitmap(saver.block(i).idstr())?;
            saver.reload_from_received(i, &bitmap);
        }
        stats.remaining.store(
            saver.remaining_bytes(),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(())
    };
    handshake(&mut w, saver).map_err(|e| Failure::at(recover, e))?;
    let preempt = if options.preempt {
        Some(
            crate::outgoing::postcopy::connect_preempt(shared, addr)
                .map_err(|e| Failure::at(recover, e))?,
        )
    } else {
        None
    };
    let finish = |w: &mut StreamWriter| -> Result<(), PostcopyError> {
        w.with_buf(|out| Command::PostcopyResume.encode(out))?;
        w.flush()?;
        rp.await_resume_ack()?;
        Ok(())
    };
    finish(&mut w).map_err(|e| Failure::at(recover, e))?;
    shared
        .transition(recover, MigrationStatus::PostcopyActive)
        .map_err(|e| Failure::Fatal(PostcopyError::Recovery(e.to_string())))?;
    Ok(Resumed {
        writer: w,
        rp,
        preempt,
        socket,
    })
}
