//! The return path: the destination's messages back to the source on the same socket.
//!
//! The source opens it with `OPEN_RETURN_PATH` (capability `return-path`), checks it with
//! `PING`, and at the end waits for the destination's `SHUT`; with `switchover-ack` it
//! does not switch over before `SWITCHOVER_ACK` arrived.
//!
//! In postcopy (`postcopy-ram`) the destination also asks for pages it faulted on
//! (`REQ_PAGES_ID`, `REQ_PAGES`); the reader queues them, with the block name resolved,
//! for the postcopy session to serve ([`ReturnPath::next_page_request`]). The queue is
//! bounded: a destination that floods it fails the migration.
//!
//! On a postcopy recovery's new connection ([`ReturnPath::spawn_for_recovery`]) the
//! destination also sends `RECV_BITMAP` (one received-pages bitmap per block the
//! source asked about) and `RESUME_ACK`.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmigrate_stream::recover::{RecvBitmap, RESUME_ACK_VALUE};
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
    /// No PONG came back before the preempt channel was to be opened.
    #[error("Timed out waiting for the destination to answer PING on the return path")]
    PongTimeout,
    /// The destination's `SHUT` carried a failure.
    #[error("Sibling indicated error {0}")]
    SiblingFailed(u32),
    #[error("return path closed without SHUT")]
    ClosedWithoutShut,
    /// A COLO secondary closed the return path instead of sending CHECKPOINT_READY.
    #[error("the secondary sent SHUT {0} instead of entering COLO")]
    ShutBeforeColo(u32),
    /// A COLO secondary sent CHECKPOINT_READY before it had the whole stream.
    #[error("the secondary sent COLO's CHECKPOINT_READY before the migration stream ended")]
    ColoReadyEarly,
    /// `REQ_PAGES` came before any `REQ_PAGES_ID` named a block.
    #[error("Page request at offset {0:#x} names no block (no REQ_PAGES_ID before it)")]
    RequestWithoutBlock(u64),
    /// A received-pages bitmap for a block the source does not have, or did not ask
    /// about.
    #[error("RECV_BITMAP for unknown RAM block '{0}'")]
    RecvBitmapUnknownBlock(String),
    /// A received-pages bitmap outside a recovery.
    #[error("RECV_BITMAP received outside a postcopy recovery")]
    RecvBitmapUnexpected,
    #[error("RESUME_ACK carried {0}, expected {RESUME_ACK_VALUE}")]
    BadResumeAck(u32),
    /// More page requests waited than [`MAX_QUEUED_PAGE_REQUESTS`].
    #[error("The destination has more than {MAX_QUEUED_PAGE_REQUESTS} page requests outstanding")]
    TooManyRequests,
}

/// Page requests that may wait for the postcopy session; a destination with one
/// outstanding fault per vCPU needs far fewer.
pub const MAX_QUEUED_PAGE_REQUESTS: usize = 4096;

/// A range of a block that the destination asked for, as received (not yet checked
/// against the block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    pub block: Arc<str>,
    pub start: u64,
    pub len: u32,
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
    /// Page requests not yet taken by the session (postcopy only).
    page_requests: VecDeque<PageRequest>,
    /// The block of the last `REQ_PAGES_ID`, for `REQ_PAGES`.
    last_block: Option<Arc<str>>,
    /// Recovery: the received-pages bitmaps that came, by block.
    bitmaps: HashMap<String, RecvBitmap>,
    /// Recovery: `RESUME_ACK` came.
    resume_acked: bool,
    /// COLO: the secondary's CHECKPOINT_READY came (and ended the return path).
    colo_ready: bool,
}

/// The source's view of the return path, filled by its reader thread.
#[derive(Debug, Default)]
pub struct ReturnPath {
    heard: Mutex<Heard>,
    changed: Condvar,
    /// Page requests are expected (postcopy); otherwise they are a protocol error.
    postcopy: bool,
    /// Set while page requests wait: a rate-limited writer stops waiting for its
    /// budget so that they are served at once (QEMU wakes its rate limit alike).
    requests_waiting: Arc<AtomicBool>,
    /// Recovery: the blocks a `RECV_BITMAP` may name, with their target pages (the
    /// bitmap's bits). Empty outside a recovery.
    bitmap_blocks: Vec<(String, u64)>,
    /// COLO primary: the secondary's first COLO message ends the return path.
    colo: bool,
}

impl ReturnPath {
    /// [`Self::spawn`] for a postcopy recovery's new connection: `RECV_BITMAP` may come
    /// for `blocks` (name, target pages), and `RESUME_ACK`.
    pub fn spawn_for_recovery(fd: OwnedFd, blocks: Vec<(String, u64)>) -> Arc<Self> {
        Self::start(
            Self {
                postcopy: true,
                bitmap_blocks: blocks,
                ..Self::default()
            },
            fd,
        )
    }

    /// Starts the reader thread on `fd` (a duplicate of the migration socket); page
    /// requests are queued when `postcopy`, and are an error otherwise.
    pub fn spawn(fd: OwnedFd, postcopy: bool) -> Arc<Self> {
        Self::start(
            Self {
                postcopy,
                ..Self::default()
            },
            fd,
        )
    }

    /// [`Self::spawn`] for a COLO primary (precopy): the messages end when the
    /// secondary's CHECKPOINT_READY comes on the same socket, which the reader takes
    /// and reports ([`Self::await_colo_ready`]); the COLO session reads what follows.
    pub fn spawn_for_colo(fd: OwnedFd) -> Arc<Self> {
        Self::start(
            Self {
                colo: true,
                ..Self::default()
            },
            fd,
        )
    }

    fn start(rp: Self, fd: OwnedFd) -> Arc<Self> {
        let rp = Arc::new(rp);
        let me = rp.clone();
        let _ = std::thread::Builder::new()
            .name("mig/src/rp".into())
            .spawn(move || me.read_loop(fd));
        rp
    }

    fn read_loop(&self, fd: OwnedFd) {
        let mut src = FdSource::new(fd, 0);
        loop {
            let msg = if self.colo {
                RpMessage::decode_before_colo(&mut src)
            } else {
                RpMessage::decode(&mut src).map(Some)
            };
            let mut h = self.heard.lock().unwrap_or_else(|e| e.into_inner());
            let msg = match msg {
                Ok(Some(m)) => Ok(m),
                Ok(None) => {
                    h.colo_ready = true;
                    h.closed = true;
                    drop(h);
                    self.changed.notify_all();
                    return;
                }
                Err(e) => Err(e),
            };
            match msg {
                Ok(RpMessage::Pong(v)) => h.pongs.push(v),
                Ok(RpMessage::SwitchoverAck) => h.switchover_acked = true,
                Ok(RpMessage::Shut(v)) => {
                    h.shut = Some(v);
                    h.closed = true;
                }
                Ok(RpMessage::ReqPagesId { start, len, block }) if self.postcopy => {
                    let block: Arc<str> = block.into();
                    h.last_block = Some(block.clone());
                    queue_request(&mut h, PageRequest { block, start, len });
                }
                Ok(RpMessage::ReqPages { start, len }) if self.postcopy => {
                    match h.last_block.clone() {
                        Some(block) => queue_request(&mut h, PageRequest { block, start, len }),
                        None => {
                            h.error = Some(ReturnPathError::RequestWithoutBlock(start));
                            h.closed = true;
                        }
                    }
                }
                Ok(m @ (RpMessage::ReqPages { .. } | RpMessage::ReqPagesId { .. })) => {
                    // Page requests belong to postcopy, which this session is not in.
                    h.error = Some(ReturnPathError::UnexpectedMessage(m.kind()));
                    h.closed = true;
                }
                Ok(RpMessage::RecvBitmap { block }) => {
                    // (The bitmap is read with the lock held: nobody else reads it
                    // before it is whole.)
                    match self.bitmap_blocks.iter().find(|(name, _)| *name == block) {
                        Some((_, pages)) => match RecvBitmap::decode_body(&mut src, &block, *pages)
                        {
                            Ok(bitmap) => {
                                h.bitmaps.insert(block, bitmap);
                            }
                            Err(e) => {
                                h.error = Some(ReturnPathError::Read(Arc::new(e)));
                                h.closed = true;
                            }
                        },
                        None => {
                            h.error = Some(if self.bitmap_blocks.is_empty() {
                                ReturnPathError::RecvBitmapUnexpected
                            } else {
                                ReturnPathError::RecvBitmapUnknownBlock(block)
                            });
                            h.closed = true;
                        }
                    }
                }
                Ok(RpMessage::ResumeAck(v)) if !self.bitmap_blocks.is_empty() => {
                    if v == RESUME_ACK_VALUE {
                        h.resume_acked = true;
                    } else {
                        h.error = Some(ReturnPathError::BadResumeAck(v));
                        h.closed = true;
                    }
                }
                Ok(m @ RpMessage::ResumeAck(_)) => {
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
            self.requests_waiting
                .store(!h.page_requests.is_empty(), Ordering::Release);
            let closed = h.closed;
            drop(h);
            self.changed.notify_all();
            if closed {
                return;
            }
        }
    }

    /// The oldest page request not yet served, if any.
    pub fn next_page_request(&self) -> Option<PageRequest> {
        let mut h = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        let next = h.page_requests.pop_front();
        self.requests_waiting
            .store(!h.page_requests.is_empty(), Ordering::Release);
        next
    }

    /// The flag that is set while page requests wait to be served.
    pub fn requests_waiting(&self) -> Arc<AtomicBool> {
        self.requests_waiting.clone()
    }

    pub fn switchover_acked(&self) -> bool {
        self.heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .switchover_acked
    }

    /// An error the return path reported, if any. Asked while the stream is being
    /// sent, a COLO secondary's CHECKPOINT_READY is one: it belongs after the stream.
    pub fn error(&self) -> Option<ReturnPathError> {
        let h = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        if h.colo_ready {
            return Some(ReturnPathError::ColoReadyEarly);
        }
        h.error.clone()
    }

    /// Waits until at least one PONG came back: the destination accepted the main
    /// channel and reads it (the postcopy preempt channel is opened only then, so that
    /// it is the second connection the destination accepts).
    pub fn await_pong(&self, timeout: Duration) -> Result<(), ReturnPathError> {
        let deadline = Instant::now() + timeout;
        let mut h = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        while h.pongs.is_empty() {
            if let Some(e) = &h.error {
                return Err(e.clone());
            }
            if h.closed {
                return Err(ReturnPathError::ClosedWithoutShut);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReturnPathError::PongTimeout);
            }
            h = self
                .changed
                .wait_timeout(h, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Recovery: waits for the received-pages bitmap of `block`.
    pub fn await_recv_bitmap(&self, block: &str) -> Result<RecvBitmap, ReturnPathError> {
        self.wait_for(|h| h.bitmaps.remove(block))
    }

    /// Recovery: waits for `RESUME_ACK`.
    pub fn await_resume_ack(&self) -> Result<(), ReturnPathError> {
        self.wait_for(|h| h.resume_acked.then_some(()))
    }

    /// Waits (without a time limit: `migrate-pause` or the network ends a wait that
    /// would never end) until `take` finds what it looks for, or the return path
    /// failed or closed.
    fn wait_for<T>(
        &self,
        mut take: impl FnMut(&mut Heard) -> Option<T>,
    ) -> Result<T, ReturnPathError> {
        let mut h = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(t) = take(&mut h) {
                return Ok(t);
            }
            if let Some(e) = &h.error {
                return Err(e.clone());
            }
            if h.closed {
                return Err(ReturnPathError::ClosedWithoutShut);
            }
            h = self.changed.wait(h).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits until the return path ended (or `timeout`) and gives what was heard.
    fn wait_closed(&self, timeout: Duration) -> Result<MutexGuard<'_, Heard>, ReturnPathError> {
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
        Ok(h)
    }

    /// Waits until the destination closes the return path (or `timeout`), and returns
    /// an error unless it said it loaded everything.
    pub fn await_close(&self, timeout: Duration) -> Result<(), ReturnPathError> {
        let h = self.wait_closed(timeout)?;
        match (h.shut, &h.error) {
            (Some(0), _) => Ok(()),
            (Some(v), _) => Err(ReturnPathError::SiblingFailed(v)),
            (None, Some(e)) => Err(e.clone()),
            (None, None) => Err(ReturnPathError::ClosedWithoutShut),
        }
    }
}

impl ReturnPath {
    /// COLO primary: waits until the secondary's CHECKPOINT_READY ended the return
    /// path (or `timeout`); an error if it ended otherwise.
    pub fn await_colo_ready(&self, timeout: Duration) -> Result<(), ReturnPathError> {
        let h = self.wait_closed(timeout)?;
        match (h.colo_ready, h.shut, &h.error) {
            (true, _, _) => Ok(()),
            (false, Some(v), _) => Err(ReturnPathError::ShutBeforeColo(v)),
            (false, None, Some(e)) => Err(e.clone()),
            (false, None, None) => Err(ReturnPathError::ClosedWithoutShut),
        }
    }
}

/// Queues `req`, or fails the return path when the queue is full.
fn queue_request(h: &mut Heard, req: PageRequest) {
    if h.page_requests.len() >= MAX_QUEUED_PAGE_REQUESTS {
        h.error = Some(ReturnPathError::TooManyRequests);
        h.closed = true;
    } else {
        h.page_requests.push_back(req);
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

    /// Writes bytes already encoded (a message with what follows it, as the
    /// received-pages bitmap after RECV_BITMAP).
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes)?;
        self.out.flush()
    }

    pub fn send(&mut self, msg: &RpMessage) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(8);
        msg.encode(&mut buf);
        self.out.write_all(&buf)?;
        self.out.flush()
    }
}
