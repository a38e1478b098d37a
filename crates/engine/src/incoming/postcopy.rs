//! Postcopy on the destination: the pages precopy delivered, the discards, the
//! userfaultfd that guest RAM is registered with at POSTCOPY_LISTEN, and the fault
//! thread that asks the source for missing pages.
//!
//! ```text
//! ADVISE ─▶ new (pages precopy delivers are noted) ─▶ DISCARD* (dropped, noted gone)
//!        ─▶ LISTEN: RAM registered, fault thread started ─▶ pages placed (listen thread)
//!        ─▶ finish: fault thread stopped, RAM unregistered (success or failure alike)
//! ```
//!
//! A fault on a page that precopy delivered and no discard dropped is a zero page the
//! loader left untouched (a pristine block's zero pages are never written): it is
//! placed as zero at once. Any other fault is asked for once with REQ_PAGES_ID (when
//! the block differs from the last request's) or REQ_PAGES, and its waiters wake when
//! the listen thread places the page.
//!
//! With `postcopy-preempt` a preempt thread reads the second connection (the preempt
//! channel, handed over by the acceptor once the source opens it): bare page records
//! of requested pages, placed as the listen thread places the main stream's. Either
//! channel may deliver a page first; each page comes once. When the main stream ends,
//! the listen thread waits for every requested page still in flight on the preempt
//! channel before postcopy finishes.
//!
//! A channel that breaks (the main stream, the return path or the preempt channel)
//! pauses postcopy ([`PostcopyIncoming::pause`]): every channel is shut down, the
//! fault thread goes on reading faults and noting them as pending without asking, and
//! the vCPUs wait on their pages. A recovery ([`crate::incoming::recover`]) answers
//! the source's RECV_BITMAP with the pages this side holds, then
//! [`PostcopyIncoming::resume`] asks again for every page still pending. A page cut
//! short in flight was never placed, so it is not in the bitmap and comes again.
//!
//! Any other failure is final: the guest's pages are split between two hosts and
//! cannot be saved, so RAM is unregistered and no thread stays blocked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmigrate_stream::preempt::{self, PreemptPageKind, PreemptRecord};
use vmigrate_stream::return_path::RpMessage;
use vmigrate_stream::{DecodeError, DecodeErrorKind, Source};

use crate::channels::return_path::ReturnPathWriter;
use crate::channels::transport::Channel;
use crate::incoming::blocktime::Blocktime;
use crate::incoming::pages::ReceivedPages;
use crate::io::FdSource;
use crate::memory::RamBlock;
use crate::uffd::{Fault, Placement, UffdError, Userfaultfd};

/// How long the fault thread waits for a message before it looks at its stop flag.
const FAULT_POLL: Duration = Duration::from_millis(50);

/// How long the end of the main stream waits for requested pages still on their way
/// on the preempt channel.
const PREEMPT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// At most this many fault latencies are kept (the first ones).
const MAX_LATENCIES: usize = 1 << 20;

/// The return path's writer, shared by the threads that answer the source.
pub(crate) type SharedWriter = Arc<Mutex<ReturnPathWriter>>;

/// Why a postcopy step failed.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    #[error("ram_discard_range: Failed to find block '{0}'")]
    UnknownBlock(String),
    #[error("ram_discard_range: Overrun block '{block}' ({start:#x}+{len:#x} of {block_len:#x})")]
    DiscardOverrun {
        block: String,
        start: u64,
        len: u64,
        block_len: u64,
    },
    #[error("ram_discard_range: unaligned range {start:#x}+{len:#x} in block '{block}'")]
    DiscardUnaligned { block: String, start: u64, len: u64 },
    #[error("cannot discard {start:#x}+{len:#x} of block '{block}': {source}")]
    Discard {
        block: String,
        start: u64,
        len: u64,
        source: std::io::Error,
    },
    #[error("page {offset:#x} of block '{block}' was already placed in postcopy")]
    PlacedTwice { block: String, offset: u64 },
    #[error("cannot place page {offset:#x} of block '{block}': {source}")]
    Place {
        block: String,
        offset: u64,
        source: UffdError,
    },
    #[error("a RAM page arrived in postcopy before POSTCOPY_LISTEN")]
    NotListening,
    #[error("cannot register guest RAM for postcopy: {0}")]
    Register(UffdError),
    #[error("cannot start the postcopy fault thread: {0}")]
    Thread(std::io::Error),
}

/// How reading a preempt channel failed: the connection's fault (postcopy pauses) or
/// the stream's (postcopy fails).
#[derive(Debug)]
enum PreemptReadError {
    Network,
    Protocol(String),
}

impl From<DecodeError> for PreemptReadError {
    fn from(e: DecodeError) -> Self {
        if matches!(
            e.kind,
            DecodeErrorKind::Io { .. } | DecodeErrorKind::Truncated { .. }
        ) {
            Self::Network
        } else {
            Self::Protocol(e.to_string())
        }
    }
}

/// Latencies of faults whose page was asked of the source (fault message read to
/// page placed), in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LatencySummary {
    pub count: usize,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// One postcopy destination session.
#[derive(Debug)]
pub struct PostcopyIncoming {
    blocks: Vec<Arc<RamBlock>>,
    /// Pages precopy delivered (as data or as zero) that no discard dropped since.
    delivered: ReceivedPages,
    /// Pages placed through the userfaultfd (from the stream, or as zero on a fault).
    placed: ReceivedPages,
    /// Pages the stream placed: the source sends each page once.
    streamed: ReceivedPages,
    uffd: OnceLock<Arc<Userfaultfd>>,
    /// Pages asked for and not placed yet, with when their fault was read.
    requested: Mutex<HashMap<(usize, usize), Instant>>,
    latencies_us: Mutex<Vec<u64>>,
    requests: AtomicU64,
    /// Faults resolved at once with a zero page, without asking the source.
    zero_faults: AtomicU64,
    stop: AtomicBool,
    fault_thread: Mutex<Option<JoinHandle<()>>>,
    fault_error: Mutex<Option<String>>,
    writer: Option<SharedWriter>,
    finished: AtomicBool,
    /// `postcopy-blocktime`: the vCPUs' waits, and each vCPU's host thread id (by
    /// index) to tell its faults by. The lock is also held while a fault is checked
    /// against the pages placed, so a placement never slips between the two.
    blocktime: Option<(Mutex<Blocktime>, Vec<u32>)>,
    /// `postcopy-preempt`: a preempt thread was started.
    preempt_expected: AtomicBool,
    preempt_thread: Mutex<Option<JoinHandle<()>>>,
    /// The preempt channel once it connected, to shut down at the end.
    preempt_fd: Mutex<Option<std::os::fd::OwnedFd>>,
    /// The main channel the listen thread reads, for a pause to shut down.
    main_fd: Mutex<Option<std::os::fd::OwnedFd>>,
    /// Paused: a channel broke; page requests wait for the recovery.
    paused: AtomicBool,
    /// A pause happened: a page may come again (it was placed after the bitmap told
    /// the source it was missing), which is then skipped.
    ever_paused: AtomicBool,
    /// The block of the last page request (REQ_PAGES after REQ_PAGES_ID), held while
    /// a request is sent.
    last_block: Mutex<Option<usize>>,
}

impl PostcopyIncoming {
    /// `vcpu_threads`: with `postcopy-blocktime`, each vCPU's host thread id.
    pub(crate) fn new(
        blocks: Vec<Arc<RamBlock>>,
        writer: Option<SharedWriter>,
        vcpu_threads: Option<Vec<u32>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            delivered: ReceivedPages::new(&blocks),
            placed: ReceivedPages::new(&blocks),
            streamed: ReceivedPages::new(&blocks),
            blocks,
            uffd: OnceLock::new(),
            requested: Mutex::new(HashMap::new()),
            latencies_us: Mutex::new(Vec::new()),
            requests: AtomicU64::new(0),
            zero_faults: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            fault_thread: Mutex::new(None),
            fault_error: Mutex::new(None),
            writer,
            finished: AtomicBool::new(false),
            blocktime: vcpu_threads.map(|t| (Mutex::new(Blocktime::new(t.len())), t)),
            preempt_expected: AtomicBool::new(false),
            preempt_thread: Mutex::new(None),
            preempt_fd: Mutex::new(None),
            main_fd: Mutex::new(None),
            paused: AtomicBool::new(false),
            ever_paused: AtomicBool::new(false),
            last_block: Mutex::new(None),
        })
    }

    /// Whether this VM has a RAM block called `idstr`.
    pub(crate) fn has_block(&self, idstr: &str) -> bool {
        self.blocks.iter().any(|b| b.idstr() == idstr)
    }

    /// The main channel the listen thread reads now (a pause shuts it down).
    pub(crate) fn set_main_channel(&self, fd: &impl std::os::fd::AsFd) {
        let dup = fd.as_fd().try_clone_to_owned().ok();
        *self.main_fd.lock().unwrap_or_else(|e| e.into_inner()) = dup;
    }

    /// Pauses postcopy (a channel broke, or `migrate-pause`): shuts every channel down
    /// so that the listen and preempt threads stop reading, and keeps page requests
    /// pending until the recovery resumes it.
    pub fn pause(&self) {
        self.ever_paused.store(true, Ordering::Release);
        self.paused.store(true, Ordering::Release);
        self.shut_channels();
    }

    /// The end of the session, once SHUT went back: shuts the main and preempt
    /// channels down. After a recovery, their descriptors are held in several places
    /// (the return path's writer, this); a TLS session on them then ends at once
    /// instead of its peer waiting for it to close.
    pub(crate) fn end_channels(&self) {
        self.shut_channels();
    }

    fn shut_channels(&self) {
        for slot in [&self.main_fd, &self.preempt_fd] {
            if let Some(fd) = slot.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Both);
            }
        }
    }

    /// Recovery: the pages this side holds of block `name`, one bit per target page;
    /// `None` for a block it does not have.
    pub(crate) fn received_bitmap(
        &self,
        name: &str,
    ) -> Option<vmigrate_stream::recover::RecvBitmap> {
        let target = self.blocks.iter().map(|b| b.page_size()).min()?;
        let (bi, b) = self
            .blocks
            .iter()
            .enumerate()
            .find(|(_, b)| b.idstr() == name)?;
        let per_page = (b.page_size() / target).max(1);
        Some(vmigrate_stream::recover::RecvBitmap::from_fn(
            b.len() / target,
            |t| {
                let page = (t / per_page) as usize;
                self.placed.get(bi, page) || self.delivered.get(bi, page)
            },
        ))
    }

    /// Recovery done (RESUME_ACK sent on the new return path): asks again for every
    /// page still pending, the first naming its block, and lets new faults ask again.
    pub(crate) fn resume(&self) {
        let mut last = self.last_block.lock().unwrap_or_else(|e| e.into_inner());
        *last = None;
        self.paused.store(false, Ordering::Release);
        let mut pending: Vec<(usize, usize)> = self
            .requested
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .filter(|&(bi, page)| !self.placed.get(bi, page))
            .collect();
        pending.sort_unstable();
        for (bi, page) in pending {
            self.send_request(&mut last, bi, page);
        }
    }

    /// Asks the source for page `page` of block `bi` (`last`: the block of the previous
    /// request, updated). A return path that broke pauses postcopy; the page stays
    /// pending.
    fn send_request(&self, last: &mut Option<usize>, bi: usize, page: usize) {
        let b = &self.blocks[bi];
        let ps = b.page_size();
        let offset = page as u64 * ps;
        let msg = if *last == Some(bi) {
            RpMessage::ReqPages {
                start: offset,
                len: ps as u32,
            }
        } else {
            RpMessage::ReqPagesId {
                start: offset,
                len: ps as u32,
                block: b.idstr().to_string(),
            }
        };
        if let Some(w) = &self.writer {
            if w.lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(&msg)
                .is_err()
            {
                self.pause();
                return;
            }
        }
        *last = Some(bi);
    }

    /// Precopy delivered page `page` of block `bi` (data or zero).
    pub(crate) fn note_delivered(&self, bi: usize, page: usize) {
        self.delivered.set(bi, page);
    }

    /// POSTCOPY_RAM_DISCARD: drops byte ranges of `block`, each checked first.
    pub(crate) fn discard(&self, block: &str, ranges: &[(u64, u64)]) -> Result<(), PostcopyError> {
        let (bi, b) = self
            .blocks
            .iter()
            .enumerate()
            .find(|(_, b)| b.idstr() == block)
            .ok_or_else(|| PostcopyError::UnknownBlock(block.to_string()))?;
        let ps = b.page_size();
        for &(start, len) in ranges {
            if start.checked_add(len).is_none_or(|end| end > b.len()) {
                return Err(PostcopyError::DiscardOverrun {
                    block: block.to_string(),
                    start,
                    len,
                    block_len: b.len(),
                });
            }
            if !start.is_multiple_of(ps) || !len.is_multiple_of(ps) {
                return Err(PostcopyError::DiscardUnaligned {
                    block: block.to_string(),
                    start,
                    len,
                });
            }
        }
        for &(start, len) in ranges {
            if len == 0 {
                continue;
            }
            b.discard(start, len)
                .map_err(|source| PostcopyError::Discard {
                    block: block.to_string(),
                    start,
                    len,
                    source,
                })?;
            for page in (start / ps)..((start + len) / ps) {
                self.delivered.take(bi, page as usize);
            }
        }
        Ok(())
    }

    /// POSTCOPY_LISTEN: registers every block for MISSING faults and starts the fault
    /// thread.
    pub(crate) fn listen(self: &Arc<Self>) -> Result<(), PostcopyError> {
        use crate::memory::Backing;
        let shmem = self
            .blocks
            .iter()
            .any(|b| matches!(b.backing(), Backing::File { .. }));
        let uffd = Arc::new(
            Userfaultfd::open_with(shmem, false, self.blocktime.is_some())
                .map_err(PostcopyError::Register)?,
        );
        for (i, b) in self.blocks.iter().enumerate() {
            if let Err(e) = b.register_missing(&uffd) {
                for done in &self.blocks[..i] {
                    let _ = done.unregister_missing(&uffd);
                }
                return Err(PostcopyError::Register(e));
            }
        }
        let _ = self.uffd.set(uffd);
        let me = self.clone();
        let handle = std::thread::Builder::new()
            .name("mig/dst/fault".into())
            .spawn(move || me.fault_loop())
            .map_err(|e| {
                self.unregister_all();
                PostcopyError::Thread(e)
            })?;
        *self.fault_thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(())
    }

    fn uffd(&self) -> Result<&Arc<Userfaultfd>, PostcopyError> {
        self.uffd.get().ok_or(PostcopyError::NotListening)
    }

    /// Places a page the source sent in postcopy: `data`, or zeroes when `None`.
    pub(crate) fn place(
        &self,
        bi: usize,
        page: usize,
        data: Option<&[u8]>,
    ) -> Result<(), PostcopyError> {
        let uffd = self.uffd()?;
        let b = &self.blocks[bi];
        let offset = page as u64 * b.page_size();
        if self.streamed.put_once(bi, page) {
            if self.ever_paused.load(Ordering::Acquire) {
                // Sent again after a recovery: this side had it already.
                return Ok(());
            }
            return Err(PostcopyError::PlacedTwice {
                block: b.idstr().to_string(),
                offset,
            });
        }
        let placed = match data {
            Some(d) => b.place_page(uffd, offset, d),
            None => b.place_zero_page(uffd, offset),
        }
        .map_err(|source| PostcopyError::Place {
            block: b.idstr().to_string(),
            offset,
            source,
        })?;
        self.placed.set(bi, page);
        self.blocktime_placed(b.host_addr() + offset);
        if placed == Placement::Placed {
            self.note_resolved(bi, page);
        }
        Ok(())
    }

    fn blocktime_lock(&self) -> Option<std::sync::MutexGuard<'_, Blocktime>> {
        self.blocktime
            .as_ref()
            .map(|(b, _)| b.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The page at `addr` is in place: vCPUs blocked on it run again.
    fn blocktime_placed(&self, addr: u64) {
        if let Some(mut b) = self.blocktime_lock() {
            b.placed(addr, Instant::now());
        }
    }

    fn note_resolved(&self, bi: usize, page: usize) {
        let asked = self
            .requested
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(bi, page));
        if let Some(t) = asked {
            let mut l = self.latencies_us.lock().unwrap_or_else(|e| e.into_inner());
            if l.len() < MAX_LATENCIES {
                l.push(t.elapsed().as_micros() as u64);
            }
        }
    }

    /// `postcopy-preempt`: starts the preempt thread, which waits for the preempt
    /// channel on `channel` and places the pages read from it.
    pub(crate) fn start_preempt(
        self: &Arc<Self>,
        channel: std::sync::mpsc::Receiver<Channel>,
    ) -> Result<(), PostcopyError> {
        self.preempt_expected.store(true, Ordering::Release);
        let me = self.clone();
        let handle = std::thread::Builder::new()
            .name("mig/dst/preempt".into())
            .spawn(move || {
                if let Err(e) = me.preempt_thread(&channel) {
                    if !me.stop.load(Ordering::Acquire) {
                        me.fail(format!("postcopy preempt channel: {e}"));
                    }
                }
            })
            .map_err(PostcopyError::Thread)?;
        *self
            .preempt_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(())
    }

    /// Records a failure of postcopy (the first one wins) and unregisters RAM; the
    /// listen thread fails on it.
    fn fail(&self, msg: String) {
        self.fault_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(msg);
        self.unregister_all();
    }

    /// Reads each preempt channel it is handed until postcopy ends: a channel that
    /// breaks (or ends before postcopy does) pauses postcopy, and a recovery hands the
    /// next one.
    fn preempt_thread(&self, channel: &std::sync::mpsc::Receiver<Channel>) -> Result<(), String> {
        loop {
            let ch = loop {
                if self.stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                match channel.recv_timeout(FAULT_POLL) {
                    Ok(ch) => break ch,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
                }
            };
            let fd = ch.fd.try_clone().map_err(|e| e.to_string())?;
            {
                let mut slot = self.preempt_fd.lock().unwrap_or_else(|e| e.into_inner());
                if self.stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                *slot = Some(ch.fd.try_clone().map_err(|e| e.to_string())?);
            }
            let result = self.read_preempt(&mut FdSource::new(fd, 0));
            drop(ch);
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            match result {
                Ok(()) | Err(PreemptReadError::Network) => self.pause(),
                Err(PreemptReadError::Protocol(e)) => return Err(e),
            }
        }
    }

    /// Reads page records from the preempt channel until it ends, placing each page.
    fn read_preempt(&self, src: &mut FdSource) -> Result<(), PreemptReadError> {
        let page_size = self
            .blocks
            .iter()
            .map(|b| b.page_size())
            .min()
            .ok_or_else(|| PreemptReadError::Protocol("no RAM blocks".into()))?;
        let mut current: Option<usize> = None;
        let mut buf = Vec::new();
        loop {
            let at = src.offset();
            let rec = preempt::decode_record(src, page_size).map_err(PreemptReadError::from)?;
            let (block, offset, kind) = match rec {
                None => return Ok(()),
                Some(PreemptRecord::Eos) => continue,
                Some(PreemptRecord::Page {
                    block,
                    offset,
                    kind,
                }) => (block, offset, kind),
            };
            let bi = match block {
                Some(name) => self
                    .blocks
                    .iter()
                    .position(|b| b.idstr() == name)
                    .ok_or_else(|| {
                        PreemptReadError::from(DecodeError::new(
                            at,
                            DecodeErrorKind::UnknownPageBlock(name),
                        ))
                    })?,
                None => current.ok_or_else(|| {
                    PreemptReadError::from(DecodeError::new(
                        at,
                        DecodeErrorKind::ContinueWithoutBlock,
                    ))
                })?,
            };
            current = Some(bi);
            let b = &self.blocks[bi];
            if offset >= b.len() || !offset.is_multiple_of(b.page_size()) {
                return Err(DecodeError::new(
                    at,
                    DecodeErrorKind::IllegalRamOffset {
                        idstr: b.idstr().to_string(),
                        offset,
                        len: b.len(),
                    },
                )
                .into());
            }
            let page = (offset / b.page_size()) as usize;
            let data = match kind {
                PreemptPageKind::Zero => None,
                PreemptPageKind::Data => {
                    buf.resize(b.page_size() as usize, 0);
                    src.fill(&mut buf, "RAM page")
                        .map_err(PreemptReadError::from)?;
                    Some(&buf[..])
                }
            };
            self.place(bi, page, data)
                .map_err(|e| PreemptReadError::Protocol(format!("{e} (at byte offset {at})")))?;
        }
    }

    /// At the end of the main stream, with a preempt channel: waits until every page
    /// asked of the source was placed (the last ones may still be on the preempt
    /// channel).
    pub(crate) fn await_requested_pages(&self) -> Result<(), String> {
        if !self.preempt_expected.load(Ordering::Acquire) {
            return Ok(());
        }
        let deadline = Instant::now() + PREEMPT_DRAIN_TIMEOUT;
        loop {
            let missing = self
                .requested
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .filter(|&&(bi, page)| !self.placed.get(bi, page))
                .count();
            if missing == 0 {
                return Ok(());
            }
            if let Some(e) = self.fault_error() {
                return Err(e);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "postcopy preempt channel: {missing} requested pages had not arrived \
                     {}s after the main stream ended",
                    PREEMPT_DRAIN_TIMEOUT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Reads fault messages until told to stop; an error ends postcopy (recorded for
    /// the listen thread, which fails on it) after unregistering RAM.
    fn fault_loop(&self) {
        let Some(uffd) = self.uffd.get().cloned() else {
            return;
        };
        let mut faults = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            faults.clear();
            let r = uffd
                .read_faults_with_thread(FAULT_POLL, &mut faults)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    for &fault in &faults {
                        self.resolve_fault(&uffd, fault)?;
                    }
                    Ok(())
                });
            if let Err(e) = r {
                *self.fault_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                self.unregister_all();
                return;
            }
        }
    }

    fn resolve_fault(&self, uffd: &Userfaultfd, fault: Fault) -> Result<(), String> {
        let addr = fault.address;
        let Some((bi, b)) = self
            .blocks
            .iter()
            .enumerate()
            .find(|(_, b)| (b.host_addr()..b.host_addr() + b.len()).contains(&addr))
        else {
            return Ok(());
        };
        let ps = b.page_size();
        let offset = (addr - b.host_addr()) / ps * ps;
        let page = (offset / ps) as usize;
        let page_addr = b.host_addr() + offset;
        {
            let mut blocktime = self.blocktime_lock();
            if self.placed.get(bi, page) {
                // Placed between the fault and this read: the placement woke it
                // already, a wake more is harmless.
                drop(blocktime);
                return b.wake_page(uffd, offset).map_err(|e| e.to_string());
            }
            let vcpu = self.blocktime.as_ref().and_then(|(_, threads)| {
                threads.iter().position(|&t| t != 0 && t == fault.thread_id)
            });
            if let (Some(bt), Some(vcpu)) = (blocktime.as_mut(), vcpu) {
                bt.fault(vcpu, page_addr, Instant::now());
            }
        }
        if self.delivered.get(bi, page) {
            // A zero page precopy delivered and the loader left absent.
            let placed = b.place_zero_page(uffd, offset).map_err(|e| {
                format!("cannot place zero page {offset:#x} of '{}': {e}", b.idstr())
            })?;
            if placed == Placement::Placed {
                self.zero_faults.fetch_add(1, Ordering::Relaxed);
            }
            self.placed.set(bi, page);
            self.blocktime_placed(page_addr);
            return Ok(());
        }
        {
            let mut asked = self.requested.lock().unwrap_or_else(|e| e.into_inner());
            if asked.contains_key(&(bi, page)) {
                return Ok(());
            }
            asked.insert((bi, page), Instant::now());
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last_block.lock().unwrap_or_else(|e| e.into_inner());
        if self.paused.load(Ordering::Acquire) {
            // Asked for at the resume.
            return Ok(());
        }
        self.send_request(&mut last, bi, page);
        Ok(())
    }

    fn unregister_all(&self) {
        if let Some(uffd) = self.uffd.get() {
            for b in &self.blocks {
                let _ = b.unregister_missing(uffd);
            }
        }
    }

    /// Ends postcopy: stops the fault thread and unregisters RAM, waking any thread
    /// still waiting on a page. Returns the fault thread's error, if it had one.
    pub(crate) fn finish(&self) -> Option<String> {
        self.stop.store(true, Ordering::Release);
        if !self.finished.swap(true, Ordering::AcqRel) {
            // Unregister first: a waiter must not outlive postcopy even if the fault
            // thread is slow to notice the flag.
            self.unregister_all();
            let handle = self
                .fault_thread
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(h) = handle {
                let _ = h.join();
            }
            if let Some(fd) = self
                .preempt_fd
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
            {
                let _ = rustix::net::shutdown(&fd, rustix::net::Shutdown::Both);
            }
            let preempt = self
                .preempt_thread
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(h) = preempt {
                let _ = h.join();
            }
            for b in &self.blocks {
                b.note_external_writes();
            }
        }
        self.fault_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The fault thread's error, while postcopy runs.
    pub(crate) fn fault_error(&self) -> Option<String> {
        self.fault_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Pages asked of the source (QEMU's `postcopy-requests`, as the destination counts
    /// them).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Faults resolved with a zero page at once (precopy had sent the page as zero).
    pub fn zero_faults(&self) -> u64 {
        self.zero_faults.load(Ordering::Relaxed)
    }

    /// `postcopy-blocktime` and `postcopy-vcpu-blocktime` in milliseconds, when the
    /// capability was on.
    pub fn blocktime(&self) -> Option<(u32, Vec<u32>)> {
        self.blocktime_lock()
            .map(|b| (b.overall_ms(), b.per_vcpu_ms()))
    }

    /// Latencies of the faults whose page was asked of the source, so far.
    pub fn latency(&self) -> LatencySummary {
        let mut l = self
            .latencies_us
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if l.is_empty() {
            return LatencySummary::default();
        }
        l.sort_unstable();
        let at = |q: f64| l[((l.len() - 1) as f64 * q).round() as usize];
        LatencySummary {
            count: l.len(),
            p50_us: at(0.5),
            p99_us: at(0.99),
            max_us: *l.last().expect("not empty"),
        }
    }
}
