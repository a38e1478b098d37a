//! The return path: the destination's messages back to the source on the same socket.
//!
//! The source opens it with `OPEN_RETURN_PATH` (capability `return-path`), checks it with
//! `PING`, and at the end waits for the destination's `SHUT`; with `switchover-ack` it
//! does not switch over before `SWITCHOVER_ACK` arrived.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmigrate_stream::return_path::RpMessage;
use vmigrate_stream::DecodeError;

use crate::io::FdSource;

/// What went wrong on the return path, as the source sees it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReturnPathError {
    /// A message that has no place in precopy.
    #[error("Received return-path message type {0} that precopy does not use")]
    UnexpectedMessage(u16),
    /// Reading or decoding the next message failed before `SHUT`.
    #[error("return path: {0}")]
    Read(Arc<DecodeError>),
    #[error("Timed out waiting for the destination to close the return path")]
    CloseTimeout,
    /// The destination's `SHUT` carried a failure.
    #[error("Sibling indicated error {0}")]
    SiblingFailed(u32),
    #[error("return path closed without SHUT")]
    ClosedWithoutShut,
}

/// What the source has heard from the destination.
#[derive(Debug, Default)]
struct Heard {
    pongs: Vec<u32>,
    switchover_acked: bool,
    shut: Option<u32>,
    /// The return path ended: SHUT, end of stream or an error.
    closed: bool,
    error: Option<ReturnPathError>,
}

/// The source's view of the return path, filled by its reader thread.
#[derive(Debug, Default)]
pub struct ReturnPath {
    heard: Mutex<Heard>,
    changed: Condvar,
}

impl ReturnPath {
    /// Starts the reader thread on `fd` (a duplicate of the migration socket).
    pub fn spawn(fd: OwnedFd) -> Arc<Self> {
        let rp = Arc::new(Self::default());
        let me = rp.clone();
        let _ = std::thread::Builder::new()
            .name("mig/src/rp".into())
            .spawn(move || me.read_loop(fd));
        rp
    }

    fn read_loop(&self, fd: OwnedFd) {
        let mut src = FdSource::new(fd, 0);
        loop {
            let msg = RpMessage::decode(&mut src);
            let mut h = self.heard.lock().unwrap_or_else(|e| e.into_inner());
            match msg {
                Ok(RpMessage::Pong(v)) => h.pongs.push(v),
                Ok(RpMessage::SwitchoverAck) => h.switchover_acked = true,
                Ok(RpMessage::Shut(v)) => {
                    h.shut = Some(v);
                    h.closed = true;
                }
                Ok(m @ (RpMessage::ReqPages { .. } | RpMessage::ReqPagesId { .. })) => {
                    // Page requests belong to postcopy, which this session is not in.
                    h.error = Some(ReturnPathError::UnexpectedMessage(m.kind()));
                    h.closed = true;
                }
                Ok(RpMessage::Other { kind, .. }) => {
                    h.error = Some(ReturnPathError::UnexpectedMessage(kind));
                    h.closed = true;
                }
                Err(e) => {
                    if h.shut.is_none() {
                        h.error = Some(ReturnPathError::Read(Arc::new(e)));
                    }
                    h.closed = true;
                }
            }
            let closed = h.closed;
            drop(h);
            self.changed.notify_all();
            if closed {
                return;
            }
        }
    }

    pub fn switchover_acked(&self) -> bool {
        self.heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .switchover_acked
    }

    /// An error the return path reported, if any.
    pub fn error(&self) -> Option<ReturnPathError> {
        self.heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .error
            .clone()
    }

    /// Waits until the destination closes the return path (or `timeout`), and returns
    /// an error unless it said it loaded everything.
    pub fn await_close(&self, timeout: Duration) -> Result<(), ReturnPathError> {
        let deadline = Instant::now() + timeout;
        let mut h = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        while !h.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReturnPathError::CloseTimeout);
            }
            h = self
                .changed
                .wait_timeout(h, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        match (h.shut, &h.error) {
            (Some(0), _) => Ok(()),
            (Some(v), _) => Err(ReturnPathError::SiblingFailed(v)),
            (None, Some(e)) => Err(e.clone()),
            (None, None) => Err(ReturnPathError::ClosedWithoutShut),
        }
    }
}

/// The destination's side: writes messages to the source.
pub struct ReturnPathWriter {
    out: Box<dyn Write + Send>,
}

impl std::fmt::Debug for ReturnPathWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReturnPathWriter").finish_non_exhaustive()
    }
}

impl ReturnPathWriter {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self { out }
    }

    pub fn send(&mut self, msg: &RpMessage) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(8);
        msg.encode(&mut buf);
        self.out.write_all(&buf)?;
        self.out.flush()
    }
}
