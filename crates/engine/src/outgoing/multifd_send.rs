//! The multifd sender: N channel threads, each with its own connection, sending RAM
//! packets; the migration thread fills packets and places sync points.
//!
//! ```text
//! RamSaver ─queue(page)─▶ batch (one block, ≤ 128 pages) ─▶ next idle channel
//!                                                            │ zero detection,
//!                                                            │ compression, writev
//! sync(): every channel sends SYNC after its queued packets; once all have, the main
//!         stream gets the marker (MULTIFD_FLUSH, or per section the RAM EOS).
//! ```

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmigrate_stream::multifd::{page_slots, ChannelInit, PacketHeader};

use crate::compress::{Compressor, Method};
use crate::io::{StreamWriter, WriteError};
use crate::memory::RamBlock;
use crate::options::ZeroPageDetection;
use crate::stats::Stats;

/// How multifd treats zero pages (`zero-page-detection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroDetection {
    /// Every page is sent as data.
    None,
    /// The migration thread sends ZERO records on the main channel.
    Legacy,
    /// The channel threads detect zero pages and list them in the packet.
    InChannels,
}

impl From<ZeroPageDetection> for ZeroDetection {
    fn from(detection: ZeroPageDetection) -> Self {
        match detection {
            ZeroPageDetection::None => ZeroDetection::None,
            ZeroPageDetection::Legacy => ZeroDetection::Legacy,
            ZeroPageDetection::Multifd => ZeroDetection::InChannels,
        }
    }
}

/// Settings shared by every channel.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    pub method: Method,
    pub level: u32,
    pub zero: ZeroDetection,
    pub uuid: [u8; 16],
    pub page_size: u64,
    /// `zero-copy-send`: pages go out with `MSG_ZEROCOPY`.
    pub zero_copy: bool,
}

enum Job {
    Pages {
        block: usize,
        offsets: Vec<u64>,
        packet_num: u64,
    },
    Sync {
        packet_num: u64,
    },
}

enum ChannelEvent {
    Synced,
    Failed(WriteError),
}

/// The sender: channel threads and the packet being filled.
pub struct MultifdSender {
    jobs: Vec<SyncSender<Job>>,
    events: Receiver<ChannelEvent>,
    threads: Vec<JoinHandle<()>>,
    next: usize,
    packet_num: u64,
    slots: usize,
    batch: Option<(usize, Vec<u64>)>,
    zero: ZeroDetection,
}

impl std::fmt::Debug for MultifdSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultifdSender")
            .field("channels", &self.jobs.len())
            .finish_non_exhaustive()
    }
}

impl MultifdSender {
    /// Sends a new channel's init packet, before the next channel connects: a
    /// destination may read it before it accepts another connection (QEMU does, when
    /// TLS hides the first bytes from a peek).
    pub fn send_init(
        fd: &OwnedFd,
        uuid: [u8; 16],
        id: u8,
        stats: &Stats,
    ) -> Result<(), WriteError> {
        let init = ChannelInit { uuid, id }.encode();
        std::io::Write::write_all(&mut crate::channels::tls_relay::SocketIo(fd.as_fd()), &init)
            .map_err(|e| WriteError::Io(crate::errno::errno_text(&e)))?;
        stats
            .transferred
            .fetch_add(init.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Starts one thread per connection (each has sent its init packet).
    pub fn start(
        connections: Vec<Arc<OwnedFd>>,
        blocks: Vec<Arc<RamBlock>>,
        config: ChannelConfig,
        stats: Arc<Stats>,
        limit: Arc<AtomicU64>,
        cancel: Arc<AtomicBool>,
    ) -> Result<Self, WriteError> {
        let (ev_tx, ev_rx) = mpsc::channel();
        let n = connections.len() as u64;
        let mut jobs = Vec::new();
        let mut threads = Vec::new();
        for (id, fd) in connections.into_iter().enumerate() {
            let (tx, rx) = mpsc::sync_channel::<Job>(2);
            let mut writer =
                StreamWriter::new(fd, stats.transferred.clone(), limit.clone(), cancel.clone());
            writer.set_bandwidth_share(n);
            if config.zero_copy {
                writer.enable_zero_copy()?;
            }
            let worker = ChannelWorker {
                writer,
                blocks: blocks.clone(),
                compressor: Compressor::new(config.method, config.level)
                    .map_err(|e| WriteError::Io(e.to_string()))?,
                config: config.clone(),
                stats: stats.clone(),
                payload: Vec::new(),
            };
            let ev = ev_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("mig/src/send_{id}"))
                .spawn(move || worker.run(rx, ev))
                .map_err(|e| WriteError::Io(format!("cannot start a multifd thread: {e}")))?;
            jobs.push(tx);
            threads.push(handle);
        }
        Ok(Self {
            jobs,
            events: ev_rx,
            threads,
            next: 0,
            packet_num: 0,
            slots: page_slots(config.page_size),
            batch: None,
            zero: config.zero,
        })
    }

    pub fn zero_detection(&self) -> ZeroDetection {
        self.zero
    }

    /// Queues one page; a full packet, or a page of another block, sends the batch.
    pub fn queue(&mut self, block: usize, offset: u64) -> Result<(), WriteError> {
        if let Some((b, offs)) = &self.batch {
            if *b != block || offs.len() >= self.slots {
                self.dispatch()?;
            }
        }
        match &mut self.batch {
            Some((_, offs)) => offs.push(offset),
            None => self.batch = Some((block, vec![offset])),
        }
        Ok(())
    }

    fn take_packet_num(&mut self) -> u64 {
        let n = self.packet_num;
        self.packet_num += 1;
        n
    }

    /// Hands the batch to the next channel that has room, round robin.
    fn dispatch(&mut self) -> Result<(), WriteError> {
        let Some((block, offsets)) = self.batch.take() else {
            return Ok(());
        };
        let packet_num = self.take_packet_num();
        let mut job = Job::Pages {
            block,
            offsets,
            packet_num,
        };
        let n = self.jobs.len();
        for i in 0..n {
            let c = (self.next + i) % n;
            match self.jobs[c].try_send(job) {
                Ok(()) => {
                    self.next = (c + 1) % n;
                    return Ok(());
                }
                Err(TrySendError::Full(j)) => job = j,
                Err(TrySendError::Disconnected(_)) => return Err(self.channel_failure()),
            }
        }
        let c = self.next;
        self.next = (c + 1) % n;
        self.jobs[c].send(job).map_err(|_| self.channel_failure())
    }

    fn channel_failure(&self) -> WriteError {
        while let Ok(ev) = self.events.try_recv() {
            if let ChannelEvent::Failed(e) = ev {
                return e;
            }
        }
        WriteError::Io("a multifd channel stopped".into())
    }

    /// A sync point: everything queued so far is sent, then every channel sends a SYNC
    /// packet. Returns once all have; the caller then writes the main-stream marker.
    pub fn sync(&mut self) -> Result<(), WriteError> {
        self.dispatch()?;
        for c in 0..self.jobs.len() {
            let packet_num = self.take_packet_num();
            self.jobs[c]
                .send(Job::Sync { packet_num })
                .map_err(|_| self.channel_failure())?;
        }
        for _ in 0..self.jobs.len() {
            match self.events.recv() {
                Ok(ChannelEvent::Synced) => {}
                Ok(ChannelEvent::Failed(e)) => return Err(e),
                Err(_) => return Err(WriteError::Io("multifd channels stopped".into())),
            }
        }
        Ok(())
    }

    /// Ends the channels: they finish their queues and close their connections.
    pub fn finish(mut self) -> Result<(), WriteError> {
        let r = self.dispatch();
        self.jobs.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        r?;
        while let Ok(ev) = self.events.try_recv() {
            if let ChannelEvent::Failed(e) = ev {
                return Err(e);
            }
        }
        Ok(())
    }
}

struct ChannelWorker {
    writer: StreamWriter,
    blocks: Vec<Arc<RamBlock>>,
    compressor: Compressor,
    config: ChannelConfig,
    stats: Arc<Stats>,
    payload: Vec<u8>,
}

impl ChannelWorker {
    fn run(mut self, jobs: Receiver<Job>, events: mpsc::Sender<ChannelEvent>) {
        for job in jobs {
            let result = match job {
                Job::Pages {
                    block,
                    offsets,
                    packet_num,
                } => self.send_pages(block, offsets, packet_num),
                Job::Sync { packet_num } => self.send_sync(packet_num),
            };
            match result {
                Ok(synced) => {
                    if synced {
                        let _ = events.send(ChannelEvent::Synced);
                    }
                }
                Err(e) => {
                    let _ = events.send(ChannelEvent::Failed(e));
                    return;
                }
            }
        }
        let _ = self.writer.flush();
    }

    fn send_sync(&mut self, packet_num: u64) -> Result<bool, WriteError> {
        let ps = self.config.page_size;
        self.writer
            .with_buf(|out| PacketHeader::sync(packet_num).encode(out, ps))?;
        // With zero copy, everything sent so far must be complete at a sync point; a
        // sync where the kernel copied it all counts as missed.
        if self.writer.flush_zero_copy()? == Some(true) {
            self.stats
                .dirty_sync_missed_zero_copy
                .fetch_add(1, Ordering::Relaxed);
        }
        self.stats.multifd_bytes.fetch_add(
            vmigrate_stream::multifd::packet_len(ps) as u64,
            Ordering::Relaxed,
        );
        Ok(true)
    }

    fn send_pages(
        &mut self,
        bi: usize,
        mut offsets: Vec<u64>,
        packet_num: u64,
    ) -> Result<bool, WriteError> {
        let block = self.blocks[bi].clone();
        let ps = self.config.page_size;
        let mut normal = offsets.len();
        if self.config.zero == ZeroDetection::InChannels {
            // Normal pages first, zero pages after, partitioned in place.
            let mut i = 0;
            while i < normal {
                if block.is_zero(offsets[i], ps as usize) {
                    normal -= 1;
                    offsets.swap(i, normal);
                } else {
                    i += 1;
                }
            }
        }
        let zero = offsets.len() - normal;
        let compressed = self.config.method != Method::None;
        if compressed && normal > 0 {
            let (compressor, payload) = (&mut self.compressor, &mut self.payload);
            // SAFETY: the compressor reads each page once; a page the guest writes
            // meanwhile is dirty again and sent again.
            unsafe {
                block.with_pages(&offsets[..normal], ps as usize, |pages| {
                    compressor.compress_packet(pages, payload)
                })
            }
            .map_err(|e| WriteError::Io(e.to_string()))?;
        }
        let payload_len = if compressed {
            if normal > 0 {
                self.payload.len()
            } else {
                0
            }
        } else {
            normal * ps as usize
        };
        let header = PacketHeader {
            flags: self.config.method.flag(),
            pages_alloc: page_slots(ps) as u32,
            normal_pages: normal as u32,
            next_packet_size: payload_len as u32,
            packet_num,
            zero_pages: zero as u32,
            block: block.idstr().to_string(),
            offsets,
        };
        self.writer.with_buf(|out| header.encode(out, ps))?;
        if compressed {
            if normal > 0 {
                let payload = std::mem::take(&mut self.payload);
                self.writer.put(&payload)?;
                self.payload = payload;
            }
        } else {
            for o in &header.offsets[..normal] {
                self.writer.put_guest(&block, *o, ps as usize)?;
            }
        }
        self.writer.flush()?;
        let bytes = vmigrate_stream::multifd::packet_len(ps) + payload_len;
        self.stats
            .multifd_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.stats
            .normal
            .fetch_add(normal as u64, Ordering::Relaxed);
        self.stats
            .duplicate
            .fetch_add(zero as u64, Ordering::Relaxed);
        Ok(false)
    }
}
