//! The multifd receiver: one thread per channel reads RAM packets into guest memory; the
//! main loader waits at each sync point (MULTIFD_FLUSH, and per section every RAM EOS)
//! until every channel reached its SYNC.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmigrate_stream::multifd::{packet_len, ChannelInit, PacketHeader, INIT_LEN};
use vmigrate_stream::{DecodeError, DecodeErrorKind, Source};

use crate::compress::{CompressError, Decompressor, Method};
use crate::incoming::pages::{load_zero_page, prefault_pages, ReceivedPages};
use crate::io::FdSource;
use crate::memory::RamBlock;

/// How long a connected channel may take to send its init packet.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long channels may take to end after the main stream ended.
const FINISH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the main stream waits at a sync point for the channels' SYNC packets, and a
/// channel at its SYNC for the main stream to reach the sync point. The source writes
/// every SYNC just before the marker, so only data already in flight is awaited; a
/// longer wait means the two ends disagree on where sync points are.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// A multifd channel's failure, reported at main-stream offset `at`.
pub fn channel_error(at: u64, error: MultifdRecvError) -> DecodeError {
    DecodeError::new(
        at,
        DecodeErrorKind::Invalid {
            what: "multifd channel",
            detail: error.to_string(),
        },
    )
}

/// The likely cause of sync points that never match.
const SYNC_MISMATCH_HINT: &str = "do both sides set multifd-flush-after-each-section alike?";

/// Why a connection could not be taken as a multifd channel: its init packet.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MultifdHandshakeError {
    #[error("multifd channel closed before its handshake")]
    Closed,
    #[error("multifd channel sent no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    Timeout,
    #[error("multifd handshake: {0}")]
    Read(rustix::io::Errno),
    /// The init packet's magic or version is wrong.
    #[error(transparent)]
    Decode(Arc<DecodeErrorKind>),
    #[error(
        "multifd: received uuid '{}' and expected uuid '{}' for channel {id}",
        vmigrate_stream::config::format_uuid(received),
        vmigrate_stream::config::format_uuid(expected)
    )]
    UuidMismatch {
        received: [u8; 16],
        expected: [u8; 16],
        id: u8,
    },
    #[error("multifd: received channel id {id} is greater than number of channels {channels}")]
    ChannelIdOutOfRange { id: u8, channels: usize },
}

/// Why receiving over the multifd channels failed, on a channel or at a sync point.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MultifdRecvError {
    /// Setting up the channel's decompressor failed.
    #[error(transparent)]
    DecompressorSetup(CompressError),
    /// Reading the channel failed or it ended inside a packet.
    #[error(transparent)]
    Read(Arc<DecodeError>),
    /// A packet header is malformed; `at` is its offset in the channel.
    #[error("{} (at byte offset {at} of the channel)", .error.kind)]
    Packet { at: u64, error: Arc<DecodeError> },
    #[error("unknown ramblock \"{block}\" (at byte offset {at})")]
    UnknownRamBlock { block: String, at: u64 },
    #[error(
        "multifd: server offset 0x{offset:x} is out of range for block {block} of 0x{len:x} bytes (at byte offset {at})"
    )]
    Offset {
        offset: u64,
        block: String,
        len: u64,
        at: u64,
    },
    #[error("{error} (packet at byte offset {at})")]
    Decompress { at: u64, error: CompressError },
    #[error("packet without pages carries {0} payload bytes")]
    PayloadWithoutPages(u32),
    /// Every channel ended while the main stream waited at a sync point.
    #[error("multifd channels ended before a sync point ({})", SYNC_MISMATCH_HINT)]
    ChannelsEnded,
    /// The main stream waited too long at a sync point.
    #[error(
        "only {arrived} of {channels} multifd channels reached the sync point within {} s \
         ({})",
        SYNC_TIMEOUT.as_secs(),
        SYNC_MISMATCH_HINT
    )]
    SyncTimeout { arrived: usize, channels: usize },
    /// A channel waited too long at its SYNC packet.
    #[error(
        "a channel waited {} s at a SYNC packet for the main stream to reach its sync point \
         ({})",
        SYNC_TIMEOUT.as_secs(),
        SYNC_MISMATCH_HINT
    )]
    ChannelSyncTimeout,
    #[error("multifd channels did not end after the main stream")]
    FinishTimeout,
    /// The main stream ended while channels waited at a SYNC it never reached.
    #[error(
        "a multifd channel reached a SYNC packet after the main stream's last sync point ({})",
        SYNC_MISMATCH_HINT
    )]
    SyncAfterEnd,
    /// What ended channel `id`.
    #[error("multifd channel {id}: {error}")]
    Channel {
        id: usize,
        error: Box<MultifdRecvError>,
    },
    /// `MultifdReceiver::abort` was called with nothing failed before.
    #[error("aborted")]
    Aborted,
}

#[derive(Debug, Default)]
struct SyncState {
    /// Channels waiting at the current sync point.
    arrived: usize,
    generation: u64,
    finished: usize,
    failed: Option<MultifdRecvError>,
    /// The channels are being shut down after the last sync point: how their threads
    /// end no longer matters.
    closing: bool,
}

/// Shared by the channel threads and the main loader.
#[derive(Debug)]
pub struct MultifdReceiver {
    channels: usize,
    state: Mutex<SyncState>,
    changed: Condvar,
    threads: Mutex<Vec<JoinHandle<()>>>,
    sockets: Mutex<Vec<OwnedFd>>,
}

/// Everything a channel thread needs.
#[derive(Debug, Clone)]
pub struct ReceiveConfig {
    pub blocks: Vec<Arc<RamBlock>>,
    pub pristine: Vec<bool>,
    pub received: Arc<ReceivedPages>,
    pub method: Method,
    pub page_size: u64,
}

impl MultifdReceiver {
    /// Starts a thread per channel; `channels` is indexed by channel id.
    pub fn start(channels: Vec<OwnedFd>, config: ReceiveConfig) -> Arc<Self> {
        let me = Arc::new(Self {
            channels: channels.len(),
            state: Mutex::new(SyncState::default()),
            changed: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            sockets: Mutex::new(Vec::new()),
        });
        for (id, fd) in channels.into_iter().enumerate() {
            if let Ok(dup) = fd.try_clone() {
                me.sockets
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(dup);
            }
            let (r, cfg) = (me.clone(), config.clone());
            let t = std::thread::Builder::new()
                .name(format!("mig/dst/recv_{id}"))
                .spawn(move || {
                    let result = receive_channel(&r, fd, &cfg);
                    let mut st = r.lock();
                    st.finished += 1;
                    if let (Err(e), false) = (result, st.closing) {
                        st.failed.get_or_insert_with(|| MultifdRecvError::Channel {
                            id,
                            error: Box::new(e),
                        });
                    }
                    drop(st);
                    r.changed.notify_all();
                });
            if let Ok(t) = t {
                me.threads.lock().unwrap_or_else(|e| e.into_inner()).push(t);
            }
        }
        me
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every channel reached its next SYNC, then lets them go on.
    pub fn wait_sync(&self) -> Result<(), MultifdRecvError> {
        let deadline = Instant::now() + SYNC_TIMEOUT;
        let mut st = self.lock();
        loop {
            if let Some(e) = &st.failed {
                return Err(e.clone());
            }
            if st.arrived == self.channels {
                st.arrived = 0;
                st.generation += 1;
                drop(st);
                self.changed.notify_all();
                return Ok(());
            }
            if st.finished == self.channels {
                return Err(MultifdRecvError::ChannelsEnded);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let arrived = st.arrived;
                drop(st);
                self.abort();
                return Err(MultifdRecvError::SyncTimeout {
                    arrived,
                    channels: self.channels,
                });
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// After the main stream, when the source keeps its channels open until the return
    /// path's SHUT (QEMU closes them only once the migration is over): every page
    /// arrived before the last sync point, so the channels are shut down here rather
    /// than waited for. A failure seen before is still reported.
    pub fn close_after_last_sync(&self) -> Result<(), MultifdRecvError> {
        let failed = {
            let mut st = self.lock();
            if st.failed.is_none() {
                st.closing = true;
            }
            st.failed.clone()
        };
        self.shut_down_sockets();
        self.changed.notify_all();
        self.join_threads();
        failed.map_or(Ok(()), Err)
    }

    /// After the main stream: waits for every channel to end cleanly.
    pub fn finish(&self) -> Result<(), MultifdRecvError> {
        let deadline = Instant::now() + FINISH_TIMEOUT;
        let mut st = self.lock();
        while st.finished < self.channels && st.failed.is_none() {
            if st.arrived > 0 && st.arrived + st.finished == self.channels {
                // Waiting at a sync point the main stream, now over, never reached:
                // nothing can release them.
                st.failed = Some(MultifdRecvError::SyncAfterEnd);
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(st);
                self.abort();
                return Err(MultifdRecvError::FinishTimeout);
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let failed = st.failed.clone();
        drop(st);
        self.changed.notify_all();
        self.join_threads();
        failed.map_or(Ok(()), Err)
    }

    /// Why the channels stopped, if one failed (not counting [`abort`](Self::abort)).
    pub fn failure(&self) -> Option<MultifdRecvError> {
        self.lock()
            .failed
            .clone()
            .filter(|e| !matches!(e, MultifdRecvError::Aborted))
    }

    /// Unblocks every channel (the load failed elsewhere) and closes this receiver's
    /// copies of their sockets: once the channel threads have let go of theirs too, a
    /// source still writing gets a reset instead of a connection that stalls.
    pub fn abort(&self) {
        self.shut_down_sockets();
        self.lock().failed.get_or_insert(MultifdRecvError::Aborted);
        self.changed.notify_all();
    }

    /// Shuts down and closes this receiver's copies of the channel sockets.
    fn shut_down_sockets(&self) {
        let sockets = std::mem::take(&mut *self.sockets.lock().unwrap_or_else(|e| e.into_inner()));
        for s in &sockets {
            let _ = rustix::net::shutdown(s.as_fd(), rustix::net::Shutdown::Both);
        }
    }

    fn join_threads(&self) {
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }

    /// A channel reached a SYNC: waits to be released by the main loader, for at most
    /// [`SYNC_TIMEOUT`]; then the whole load fails, and every channel is shut down.
    fn arrive_and_wait(&self) -> Result<(), MultifdRecvError> {
        let deadline = Instant::now() + SYNC_TIMEOUT;
        let mut st = self.lock();
        st.arrived += 1;
        let generation = st.generation;
        self.changed.notify_all();
        while st.generation == generation {
            if let Some(e) = &st.failed {
                return Err(e.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let e = MultifdRecvError::ChannelSyncTimeout;
                st.failed.get_or_insert_with(|| e.clone());
                drop(st);
                self.abort();
                return Err(e);
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }
}

/// Reads and checks a channel's init packet. `uuid` is the destination's own (zero if
/// none was given), `channels` the configured count.
pub fn read_init(
    fd: &OwnedFd,
    uuid: [u8; 16],
    channels: usize,
) -> Result<u8, MultifdHandshakeError> {
    let mut buf = [0u8; INIT_LEN];
    let mut got = 0;
    while got < INIT_LEN {
        match rustix::io::read(fd, &mut buf[got..]) {
            Ok(0) => return Err(MultifdHandshakeError::Closed),
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => return Err(MultifdHandshakeError::Timeout),
            Err(e) => return Err(MultifdHandshakeError::Read(e)),
        }
    }
    let init = ChannelInit::decode(&buf).map_err(|e| MultifdHandshakeError::Decode(Arc::new(e)))?;
    if init.uuid != uuid {
        return Err(MultifdHandshakeError::UuidMismatch {
            received: init.uuid,
            expected: uuid,
            id: init.id,
        });
    }
    if usize::from(init.id) >= channels {
        return Err(MultifdHandshakeError::ChannelIdOutOfRange {
            id: init.id,
            channels,
        });
    }
    Ok(init.id)
}

fn receive_channel(
    r: &MultifdReceiver,
    fd: OwnedFd,
    cfg: &ReceiveConfig,
) -> Result<(), MultifdRecvError> {
    let ps = cfg.page_size;
    let mut src = FdSource::with_buffer(fd, 0, packet_len(ps));
    let mut header = vec![0u8; packet_len(ps)];
    let mut decompressor =
        Decompressor::new(cfg.method).map_err(MultifdRecvError::DecompressorSetup)?;
    let mut payload = Vec::new();
    let mut scratch = Vec::new();
    let mut last_block: Option<usize> = None;
    loop {
        if src.peek_u8().map_err(read_error)?.is_none() {
            return Ok(());
        }
        let at = src.offset();
        src.fill(&mut header, "multifd packet header")
            .map_err(read_error)?;
        let h = PacketHeader::decode(&header, ps, cfg.method.flag()).map_err(|e| {
            MultifdRecvError::Packet {
                at,
                error: Arc::new(e),
            }
        })?;
        let count = h.offsets.len();
        if count > 0 {
            let bi = match last_block {
                Some(b) if cfg.blocks[b].idstr() == h.block => b,
                _ => cfg
                    .blocks
                    .iter()
                    .position(|b| b.idstr() == h.block)
                    .ok_or_else(|| MultifdRecvError::UnknownRamBlock {
                        block: h.block.clone(),
                        at,
                    })?,
            };
            last_block = Some(bi);
            let block = &cfg.blocks[bi];
            for o in &h.offsets {
                if o % ps != 0 || *o > block.len() - ps {
                    return Err(MultifdRecvError::Offset {
                        offset: *o,
                        block: block.idstr().to_string(),
                        len: block.len(),
                        at,
                    });
                }
            }
            let normal = h.normal_pages as usize;
            let mut sorted = h.offsets[..normal].to_vec();
            sorted.sort_unstable();
            let repeats = sorted.windows(2).any(|w| w[0] == w[1]);
            if cfg.method == Method::None && repeats {
                // A page listed twice: one page at a time, so no two buffers alias.
                for o in &h.offsets[..normal] {
                    src.fill_guest(block, *o, ps as usize, "multifd page")
                        .map_err(read_error)?;
                    cfg.received.set(bi, (*o / ps) as usize);
                }
            } else if cfg.method == Method::None {
                let pages = &h.offsets[..normal];
                if block.file_load_free() {
                    src.fill_guest_pages_buffered(block, pages, ps as usize, "multifd pages")
                } else {
                    prefault_pages(block, &cfg.received, bi, pages);
                    src.fill_guest_pages(block, pages, ps as usize, "multifd pages")
                }
                .map_err(read_error)?;
                for o in &h.offsets[..normal] {
                    cfg.received.set(bi, (*o / ps) as usize);
                }
            } else if normal > 0 {
                payload.resize(h.next_packet_size as usize, 0);
                src.fill(&mut payload, "multifd payload")
                    .map_err(read_error)?;
                if repeats || block.file_load_free() {
                    // Decoded into a buffer, then put in place: through the file, or page
                    // by page in order when a page is listed twice (the last one wins).
                    scratch.resize(normal * ps as usize, 0);
                    decompressor
                        .decompress_packet(&payload, &mut scratch)
                        .map_err(|error| MultifdRecvError::Decompress { at, error })?;
                    block
                        .load_pages(&h.offsets[..normal], ps as usize, &scratch)
                        .map_err(|source| {
                            read_error(DecodeError::new(
                                at,
                                DecodeErrorKind::GuestWrite {
                                    what: "multifd pages",
                                    source,
                                },
                            ))
                        })?;
                } else {
                    prefault_pages(block, &cfg.received, bi, &h.offsets[..normal]);
                    // SAFETY: no page is listed twice in this packet (checked above), and
                    // the destination's guest does not run during the load. Another
                    // channel writes the same page only in a stream that lies, and then,
                    // as with the copies of the other paths, the page just holds garbage:
                    // guest memory is plain bytes that writers may race on (see
                    // `RamBlock`).
                    unsafe {
                        block.with_pages_mut(&h.offsets[..normal], ps as usize, |pages| {
                            decompressor.decompress_pages(&payload, pages)
                        })
                    }
                    .map_err(|error| MultifdRecvError::Decompress { at, error })?;
                }
                for o in &h.offsets[..normal] {
                    cfg.received.set(bi, (*o / ps) as usize);
                }
            }
            for o in &h.offsets[normal..] {
                load_zero_page(
                    block,
                    cfg.pristine[bi],
                    &cfg.received,
                    bi,
                    (*o / ps) as usize,
                );
            }
        } else if h.next_packet_size > 0 && !h.is_sync() {
            return Err(MultifdRecvError::PayloadWithoutPages(h.next_packet_size));
        }
        if h.is_sync() {
            r.arrive_and_wait()?;
        }
    }
}

/// A channel read that failed or ended early.
fn read_error(e: DecodeError) -> MultifdRecvError {
    MultifdRecvError::Read(Arc::new(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_keep_their_texts() {
        let uuid = MultifdHandshakeError::UuidMismatch {
            received: [0x11; 16],
            expected: [0; 16],
            id: 2,
        };
        assert_eq!(
            uuid.to_string(),
            "multifd: received uuid '11111111-1111-1111-1111-111111111111' and expected uuid \
             '00000000-0000-0000-0000-000000000000' for channel 2"
        );
        let id = MultifdHandshakeError::ChannelIdOutOfRange { id: 1, channels: 1 };
        assert_eq!(
            id.to_string(),
            "multifd: received channel id 1 is greater than number of channels 1"
        );
        assert_eq!(
            MultifdHandshakeError::Timeout.to_string(),
            "multifd channel sent no handshake within 10 s"
        );
        let offset = MultifdRecvError::Offset {
            offset: 0x5000,
            block: "pc.ram".into(),
            len: 0x4000,
            at: 8,
        };
        assert_eq!(
            offset.to_string(),
            "multifd: server offset 0x5000 is out of range for block pc.ram of 0x4000 bytes \
             (at byte offset 8)"
        );
        let unknown = MultifdRecvError::UnknownRamBlock {
            block: "x".into(),
            at: 0,
        };
        assert_eq!(
            unknown.to_string(),
            "unknown ramblock \"x\" (at byte offset 0)"
        );
        let sync = MultifdRecvError::SyncTimeout {
            arrived: 1,
            channels: 2,
        };
        assert_eq!(
            sync.to_string(),
            "only 1 of 2 multifd channels reached the sync point within 30 s (do both sides \
             set multifd-flush-after-each-section alike?)"
        );
        assert_eq!(
            MultifdRecvError::ChannelSyncTimeout.to_string(),
            "a channel waited 30 s at a SYNC packet for the main stream to reach its sync \
             point (do both sides set multifd-flush-after-each-section alike?)"
        );
        assert_eq!(
            MultifdRecvError::ChannelsEnded.to_string(),
            "multifd channels ended before a sync point (do both sides set \
             multifd-flush-after-each-section alike?)"
        );
        let channel = MultifdRecvError::Channel {
            id: 3,
            error: Box::new(MultifdRecvError::PayloadWithoutPages(16)),
        };
        assert_eq!(
            channel_error(100, channel).to_string(),
            "Invalid multifd channel: multifd channel 3: packet without pages carries 16 \
             payload bytes (at byte offset 100)"
        );
    }

    #[test]
    fn abort_is_not_a_failure() {
        let r = MultifdReceiver::start(
            Vec::new(),
            ReceiveConfig {
                blocks: Vec::new(),
                pristine: Vec::new(),
                received: Arc::new(ReceivedPages::new(&[])),
                method: Method::None,
                page_size: rustix::param::page_size() as u64,
            },
        );
        r.abort();
        assert!(r.failure().is_none());
        assert!(matches!(r.finish(), Err(MultifdRecvError::Aborted)));
    }

    /// Found by the `load_stream` fuzz target: a channel with one SYNC more than the
    /// main stream has sync points waited SYNC_TIMEOUT (30 s) after the main stream
    /// ended, although nothing could release it any more.
    #[test]
    fn a_sync_after_the_main_streams_end_fails_at_once() {
        let ps = rustix::param::page_size() as u64;
        let (rd, wr) = rustix::pipe::pipe().unwrap();
        let mut sync = Vec::new();
        PacketHeader::sync(1).encode(&mut sync, ps);
        rustix::io::write(&wr, &sync).unwrap();
        drop(wr);
        let r = MultifdReceiver::start(
            vec![rd],
            ReceiveConfig {
                blocks: Vec::new(),
                pristine: Vec::new(),
                received: Arc::new(ReceivedPages::new(&[])),
                method: Method::None,
                page_size: ps,
            },
        );
        let t0 = Instant::now();
        let e = r.finish().unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        assert_eq!(
            e.to_string(),
            "a multifd channel reached a SYNC packet after the main stream's last sync point \
             (do both sides set multifd-flush-after-each-section alike?)"
        );
    }
}
