//! The source side of postcopy (`postcopy-ram`): the switch from precopy, and the
//! postcopy phase that pushes the rest of RAM while serving the destination's page
//! requests first.
//!
//! ```text
//! setup:   ... OPEN_RETURN_PATH, PING(1), POSTCOPY_ADVISE                (save.rs)
//! active:  ram PART sections, as precopy, until migrate-start-postcopy
//! device:  stop the VM, SWITCHOVER_START, final dirty sync,
//!          POSTCOPY_RAM_DISCARD per block (runs still dirty, ≤ 12 per command),
//!          PING(2), PACKAGED(len) { POSTCOPY_LISTEN, device FULL sections,
//!          globalstate, PING(3), POSTCOPY_RUN }, PING(4)
//! postcopy-active:
//!          ram PART sections: requested pages first (each naming its block, the
//!          background going on just after it), then the background push;
//!          ram END (EOS), EOF (no vmdesc); wait for SHUT(0)       ─▶ completed
//! ```
//!
//! With `postcopy-preempt` the requested pages go on a second connection instead, the
//! preempt channel (opened by `save.rs` before the switch, once a PONG showed that the
//! destination accepted the main channel): bare page records, the block named on the
//! first and whenever it changes, no header, no EOS; the background push stays on the
//! main channel, so a requested page never waits behind it in the socket buffers.
//!
//! Stopping the VM, the status changes and the bandwidth switch are in
//! `save.rs` (`run_postcopy`); this module writes the switch's commands and runs the
//! push.
//!
//! Failures: until the package is out the destination has not started the guest, so
//! a failure is an ordinary precopy failure and the source VM runs again. Once
//! POSTCOPY_RUN was sent the guest runs on the destination and the source holds pages
//! it does not have: the source VM stays stopped in `postmigrate` whatever happens. A
//! channel that breaks then pauses the migration (`postcopy-paused`) until a recovery
//! over a new connection ([`crate::outgoing::recover`]); a bad page request fails it.
//!
//! With `release-ram` the source frees each page once it is out (the VM never runs
//! here again): pages sent on a channel are noted in that channel's [`PageRelease`],
//! merged into contiguous runs, and freed through [`crate::memory::RamBlock::release`]
//! right after the channel's writer flushed them (the writer gathers guest memory at
//! flush time, so a page is never freed before its bytes left), at the latest every
//! [`RELEASE_BATCH`] bytes and at the end. Requested pages and pushed pages alike, zero
//! or not, as QEMU does. Pages precopy sent are not freed (QEMU does not either).
//!
//! Every page goes once: a page is taken off the dirty bitmap when it is sent, and a
//! request for a page already sent (in precopy and not dirtied since, or earlier in
//! postcopy) is skipped, as QEMU skips it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use vmigrate_stream::command::Command;
use vmigrate_stream::postcopy::{PostcopyAdvise, RamDiscard};
use vmigrate_stream::section::{encode_footer, Record};

use crate::channels::return_path::{PageRequest, ReturnPath, ReturnPathError};
use crate::channels::transport::{self, Address};
use crate::events::EventBus;
use crate::io::{StreamWriter, WriteError};
use crate::outgoing::ram_save::{RamSaver, SentPages, ITERATION_SLICE};
use crate::shared::Shared;
use crate::stats::Stats;

/// Why the postcopy phase failed: a page request the source refuses (not whole pages
/// of a block it has), or the stream or the return path broke.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    #[error("Page request for unknown RAM block '{0}'")]
    UnknownBlock(String),
    #[error(
        "Page request {start:#x}+{len:#x} is not whole pages inside RAM block '{block}' \
         ({block_len:#x} bytes, pages of {page_size:#x})"
    )]
    BadRange {
        block: String,
        start: u64,
        len: u64,
        block_len: u64,
        page_size: u64,
    },
    #[error("Postcopy needs the return path")]
    NoReturnPath,
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    ReturnPath(#[from] ReturnPathError),
    /// The recovery could not go on (the status moved under it).
    #[error("postcopy recovery: {0}")]
    Recovery(String),
}

/// POSTCOPY_ADVISE for `saver`'s blocks: their page sizes ORed together, and the
/// target page size (the blocks' smallest page, which vmigrate sends pages of).
pub(crate) fn advise(saver: &RamSaver) -> Command {
    let summary = (0..saver.block_count()).fold(0, |acc, i| acc | saver.block(i).page_size());
    Command::PostcopyAdvise(
        PostcopyAdvise {
            ram_pagesize_summary: summary,
            target_page_size: saver.page_size(),
        }
        .encode(),
    )
}

/// A checked page request: block index and the pages it covers.
fn check_request(
    saver: &RamSaver,
    req: &PageRequest,
) -> Result<(usize, std::ops::Range<usize>), PostcopyError> {
    let index = saver
        .block_index(&req.block)
        .ok_or_else(|| PostcopyError::UnknownBlock(req.block.to_string()))?;
    let block = saver.block(index);
    let (ps, block_len, len) = (block.page_size(), block.len(), u64::from(req.len));
    let fits = req
        .start
        .checked_add(len)
        .is_some_and(|end| end <= block_len);
    if len == 0 || !req.start.is_multiple_of(ps) || !len.is_multiple_of(ps) || !fits {
        return Err(PostcopyError::BadRange {
            block: req.block.to_string(),
            start: req.start,
            len,
            block_len,
            page_size: ps,
        });
    }
    let first = (req.start / ps) as usize;
    Ok((index, first..first + (len / ps) as usize))
}

/// The switch's commands, in QEMU's order, once the VM is stopped and the last dirty
/// sync ran: SWITCHOVER_START, POSTCOPY_RAM_DISCARD for every run still to be sent
/// (per block, at most 12 ranges per command), PING(2), PACKAGED with POSTCOPY_LISTEN,
/// `device_sections` (every FULL section, globalstate last), PING(3) and POSTCOPY_RUN,
/// then PING(4). The caller flushes.
pub(crate) fn write_switchover(
    w: &mut StreamWriter,
    saver: &RamSaver,
    device_sections: &[u8],
) -> Result<(), PostcopyError> {
    w.with_buf(|out| Command::SwitchoverStart.encode(out))?;
    for index in 0..saver.block_count() {
        let runs = saver.dirty_runs(index);
        for batch in RamDiscard::batches(saver.block(index).idstr(), &runs) {
            w.with_buf(|out| Command::PostcopyRamDiscard(batch.encode()).encode(out))?;
        }
    }
    let mut package = Vec::new();
    Command::PostcopyListen.encode(&mut package);
    package.extend_from_slice(device_sections);
    Command::Ping(3).encode(&mut package);
    Command::PostcopyRun.encode(&mut package);
    w.with_buf(|out| {
        Command::Ping(2).encode(out);
        Command::Packaged(package.len() as u32).encode(out);
        out.extend_from_slice(&package);
        Command::Ping(4).encode(out);
    })?;
    Ok(())
}

/// The source's end of the postcopy preempt channel.
pub(crate) struct PreemptChannel {
    writer: StreamWriter,
    /// The block of the last page record written on this channel (CONTINUE after it).
    last_block: Option<usize>,
    /// `release-ram`: pages written on this channel, freed after its flushes.
    release: PageRelease,
}

impl PreemptChannel {
    pub(crate) fn new(writer: StreamWriter) -> Self {
        Self {
            writer,
            last_block: None,
            release: PageRelease::default(),
        }
    }

    /// Shuts the channel down both ways (a pause: the destination drops it too).
    pub(crate) fn shutdown(mut self) {
        self.writer.shutdown();
    }
}

/// Connects a postcopy preempt channel to `addr`: a plain connection (TLS when
/// configured, as multifd channels), no handshake bytes, registered for cancel and
/// `migrate-pause`. Its writer has no rate limit: it carries only the pages the
/// destination waits for.
pub(crate) fn connect_preempt(
    shared: &Shared,
    addr: &Address,
) -> Result<PreemptChannel, PostcopyError> {
    let mut ch = transport::connect_outgoing(addr).map_err(|e| WriteError::Io(e.0))?;
    if let Some(setup) = shared.tls_client() {
        let cancel = shared.cancel_flag();
        crate::channels::tls::secure_outgoing(&mut ch, &setup, &cancel, "preempt")
            .map_err(|e| WriteError::Tls(e.0))?;
        if let Some(relay) = ch.tls_relay.take() {
            shared.add_tls_relay(relay);
        }
    }
    let fd = Arc::new(ch.fd);
    shared.register_cancel_fd(&fd);
    let unlimited = Arc::new(std::sync::atomic::AtomicU64::new(0));
    Ok(PreemptChannel::new(StreamWriter::new(
        fd,
        shared.stats().transferred.clone(),
        unlimited,
        shared.cancel_flag(),
    )))
}

/// `release-ram`: the bytes of sent pages a channel holds back before it flushes and
/// frees them.
pub(crate) const RELEASE_BATCH: u64 = 4 << 20;

/// `release-ram`: the pages written on one channel and not freed yet, as contiguous
/// runs (block index, offset, length in bytes).
#[derive(Debug, Default)]
pub(crate) struct PageRelease {
    runs: Vec<(usize, u64, u64)>,
    pending: u64,
    /// Set once a release failed: the rest of the migration frees nothing more (the
    /// pages are on the destination whatever happens here).
    failed: bool,
}

impl PageRelease {
    /// Notes that page `page` of block `index` was written on the channel.
    fn note(&mut self, saver: &RamSaver, index: usize, page: usize) {
        let ps = saver.block(index).page_size();
        let offset = page as u64 * ps;
        self.pending += ps;
        if let Some((bi, start, len)) = self.runs.last_mut() {
            if *bi == index && *start + *len == offset {
                *len += ps;
                return;
            }
        }
        self.runs.push((index, offset, ps));
    }

    /// Bytes noted and not freed yet.
    fn pending(&self) -> u64 {
        self.pending
    }

    /// Frees every run noted; the channel's writer must have flushed them. A failure
    /// does not fail the migration (QEMU only reports it either): it is reported once
    /// and releasing stops.
    fn release(&mut self, saver: &RamSaver, warnings: &EventBus) {
        for (index, offset, len) in self.runs.drain(..) {
            if self.failed {
                break;
            }
            let block = saver.block(index);
            if let Err(e) = block.release(offset, len) {
                warnings.warn(&format!(
                    "release-ram: freeing {offset:#x}+{len:#x} of RAM block '{}' failed: {e}",
                    block.idstr()
                ));
                self.failed = true;
            }
        }
        self.runs.clear();
        self.pending = 0;
    }
}

/// What the postcopy phase is told besides its channels.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PushOptions<'a> {
    /// The `ram` section's id.
    pub ram_id: u32,
    /// The byte count when the destination started (for `postcopy-bytes`).
    pub postcopy_start: u64,
    /// `release-ram`: free each page once it is out.
    pub release_ram: bool,
    /// Where a failure to free pages is reported (it does not fail the migration).
    pub warnings: &'a EventBus,
}

/// The postcopy phase: PART sections of the `ram` section until every page went,
/// serving requests first (on `preempt` when there is one), then END and EOF.
pub(crate) fn push_pages(
    stats: &Stats,
    w: &mut StreamWriter,
    saver: &mut RamSaver,
    rp: &ReturnPath,
    mut preempt: Option<&mut PreemptChannel>,
    options: &PushOptions<'_>,
) -> Result<(), PostcopyError> {
    let PushOptions {
        ram_id,
        postcopy_start,
        release_ram,
        warnings,
    } = *options;
    saver.forget_last_block();
    let mut release = PageRelease::default();
    let mut done = false;
    while !done {
        if let Some(e) = rp.error() {
            return Err(e.into());
        }
        w.with_buf(|out| Record::Part(ram_id).encode(out))?;
        let mut sent = SentPages::default();
        let deadline = Instant::now() + ITERATION_SLICE;
        let mut n = 0u32;
        loop {
            if let Some(req) = rp.next_page_request() {
                // Requests queued before the return path failed (a flood that hit the
                // cap, a bad message) are not served: the migration fails now.
                if let Some(e) = rp.error() {
                    return Err(e.into());
                }
                stats.postcopy_requests.fetch_add(1, Ordering::Relaxed);
                let (index, pages) = check_request(saver, &req)?;
                let mut any = false;
                for page in pages {
                    let went = match preempt.as_deref_mut() {
                        Some(p) => saver.send_requested_on(
                            &mut p.writer,
                            index,
                            page,
                            &mut sent,
                            &mut p.last_block,
                        )?,
                        None => saver.send_requested(w, index, page, &mut sent)?,
                    };
                    if went && release_ram {
                        match preempt.as_deref_mut() {
                            Some(p) => p.release.note(saver, index, page),
                            None => release.note(saver, index, page),
                        }
                    }
                    any |= went;
                }
                if any {
                    match preempt.as_deref_mut() {
                        Some(p) => {
                            p.writer.flush()?;
                            p.release.release(saver, warnings);
                        }
                        None => {
                            w.flush()?;
                            release.release(saver, warnings);
                        }
                    }
                }
                continue;
            }
            let Some((index, page)) = saver.send_next(w, &mut sent)? else {
                done = true;
                break;
            };
            if release_ram {
                release.note(saver, index, page);
                if release.pending() >= RELEASE_BATCH {
                    w.flush()?;
                    release.release(saver, warnings);
                }
            }
            n += 1;
            if n.is_multiple_of(64) && Instant::now() >= deadline {
                break;
            }
        }
        w.with_buf(|out| {
            vmigrate_stream::ram::put_eos(out);
            encode_footer(out, ram_id);
        })?;
        w.flush()?;
        release.release(saver, warnings);
        stats.duplicate.fetch_add(sent.zero, Ordering::Relaxed);
        stats.normal.fetch_add(sent.normal, Ordering::Relaxed);
        stats
            .remaining
            .store(saver.remaining_bytes(), Ordering::Relaxed);
        stats.postcopy_bytes.store(
            stats.transferred.load(Ordering::Relaxed) - postcopy_start,
            Ordering::Relaxed,
        );
    }
    w.with_buf(|out| {
        Record::End(ram_id).encode(out);
        vmigrate_stream::ram::put_eos(out);
        encode_footer(out, ram_id);
        Record::Eof.encode(out);
    })?;
    w.flush()?;
    stats.postcopy_bytes.store(
        stats.transferred.load(Ordering::Relaxed) - postcopy_start,
        Ordering::Relaxed,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::mpsc;
    use std::time::Duration;

    use serde_json::json;
    use vmigrate_stream::command::Command;
    use vmigrate_stream::ram::{RamRecordHeader, RamRecordKind};
    use vmigrate_stream::return_path::RpMessage;
    use vmigrate_stream::section::Record;
    use vmigrate_stream::Source;

    use crate::channels::transport::Address;
    use crate::io::FdSource;
    use crate::memory::host_page_size;
    use crate::migrator::Migrator;
    use crate::shared::IncomingMode;
    use crate::status::{MigrationStatus, RunState};
    use crate::test_support::{ended_events, recorded_migrator, temp_path, wait_for_end, FakeVmm};

    const LIMIT: Duration = Duration::from_secs(30);
    const PAGES: usize = 2048;

    /// What the test's destination saw, in stream order.
    #[derive(Debug, Clone, PartialEq)]
    enum Seen {
        Command(Command),
        /// The blob of a PACKAGED command.
        Package(Vec<u8>),
        Part,
        End,
        /// A page record: page index, whether it named its block, its first byte
        /// (`None` for ZERO).
        Page {
            page: usize,
            named: bool,
            first: Option<u8>,
        },
        Eof,
    }

    /// Reads the stream from `fd` and reports every record, until EOF or an error.
    fn read_stream(fd: OwnedFd, tx: mpsc::Sender<Seen>) {
        let mut src = FdSource::new(fd, 0);
        vmigrate_stream::header::decode_header(&mut src).unwrap();
        vmigrate_stream::config::Configuration::decode(&mut src).unwrap();
        read_records(&mut src, tx);
    }

    /// Reports every record of `src` (no header: a recovery's stream), until EOF or an
    /// error.
    fn read_records(mut src: &mut FdSource, tx: mpsc::Sender<Seen>) {
        let ps = host_page_size();
        loop {
            let Ok(rec) = Record::decode(&mut src) else {
                return;
            };
            match rec {
                Record::Eof => {
                    let _ = tx.send(Seen::Eof);
                    return;
                }
                Record::Command(Command::Packaged(len)) => {
                    let mut blob = vec![0; len as usize];
                    src.fill(&mut blob, "package").unwrap();
                    let _ = tx.send(Seen::Package(blob));
                }
                Record::Command(c) => {
                    let _ = tx.send(Seen::Command(c));
                }
                Record::Start(_) | Record::Part(_) | Record::End(_) => {
                    let _ = tx.send(match rec {
                        Record::End(_) => Seen::End,
                        _ => Seen::Part,
                    });
                    loop {
                        let h = RamRecordHeader::decode(&mut src, ps).unwrap();
                        let named = h.names_block();
                        if named {
                            assert_eq!(src.counted("block").unwrap(), "ram");
                        }
                        let page = (h.addr / ps) as usize;
                        match h.kind {
                            RamRecordKind::MemSize => {
                                src.counted("block").unwrap();
                                src.be64("used length").unwrap();
                            }
                            RamRecordKind::Zero => {
                                assert_eq!(src.u8("fill").unwrap(), 0);
                                let _ = tx.send(Seen::Page {
                                    page,
                                    named,
                                    first: None,
                                });
                            }
                            RamRecordKind::Page => {
                                let mut data = vec![0; ps as usize];
                                src.fill(&mut data, "page").unwrap();
                                let _ = tx.send(Seen::Page {
                                    page,
                                    named,
                                    first: Some(data[0]),
                                });
                            }
                            RamRecordKind::Eos => break,
                            other => panic!("unexpected RAM record {other:?}"),
                        }
                    }
                    src.u8("footer").unwrap();
                    src.be32("footer id").unwrap();
                }
                Record::Full(_) => panic!("FULL section outside the package"),
            }
        }
    }

    /// A postcopy migration of a guest whose every page is non-zero, to a unix socket
    /// whose other end the test holds.
    struct Run {
        vmm: std::sync::Arc<FakeVmm>,
        m: std::sync::Arc<Migrator>,
        seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
        rp: UnixStream,
        rx: mpsc::Receiver<Seen>,
        /// Pages received before the switch, in order.
        precopy: Vec<usize>,
    }

    impl Run {
        /// Starts the migration, lets precopy stall on a full socket, asks for
        /// postcopy and writes `redirty` meanwhile; returns once POSTCOPY_RUN's package
        /// and PING(4) were read.
        fn start(redirty: &[usize]) -> (Run, Vec<Seen>) {
            Run::start_with(redirty, None, false)
        }

        /// [`Run::start`], the switch asked for by `migrate-start-postcopy`, or (with
        /// `auto_after_ms`) left to `x-vmigrate-postcopy-after`, the stall lasting past it;
        /// `release_ram` turns that capability on too.
        fn start_with(
            redirty: &[usize],
            auto_after_ms: Option<u64>,
            release_ram: bool,
        ) -> (Run, Vec<Seen>) {
            let vmm = FakeVmm::new(PAGES, RunState::Running);
            for p in 0..PAGES {
                vmm.write_page(p, (p % 251) as u8 + 1);
            }
            let (m, seen) = recorded_migrator(vmm.clone(), IncomingMode::Disabled);
            m.set_capabilities(&json!([
                {"capability": "postcopy-ram", "state": true},
                {"capability": "release-ram", "state": release_ram}
            ]))
            .unwrap();
            m.set_parameters(
                json!({"max-bandwidth": 4 << 20, "max-postcopy-bandwidth": 8 << 20})
                    .as_object()
                    .unwrap(),
            )
            .unwrap();
            if let Some(ms) = auto_after_ms {
                m.set_parameters(
                    json!({ "x-vmigrate-postcopy-after": ms })
                        .as_object()
                        .unwrap(),
                )
                .unwrap();
            }
            let path = temp_path("postcopy.sock");
            let listener = UnixListener::bind(&path).unwrap();
            let addr = Address::parse_uri(&format!("unix:{}", path.display())).unwrap();
            m.migrate(addr, false, None).unwrap();
            let (conn, _) = listener.accept().unwrap();
            let _ = std::fs::remove_file(&path);
            // Nothing is read yet: precopy blocks on the full socket; the request
            // and the guest's writes happen while it is stuck in its first pass.
            wait_until(|| m.status() == MigrationStatus::Active);
            for &p in redirty {
                vmm.write_page(p, 0xee);
            }
            match auto_after_ms {
                None => m.start_postcopy().unwrap(),
                Some(ms) => std::thread::sleep(Duration::from_millis(ms + 50)),
            }
            let rp = conn.try_clone().unwrap();
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || read_stream(OwnedFd::from(conn), tx));
            let mut head = Vec::new();
            let mut precopy = Vec::new();
            loop {
                let s = rx.recv_timeout(LIMIT).expect("the stream goes on");
                if let Seen::Page { page, .. } = s {
                    precopy.push(page);
                }
                let done = s == Seen::Command(Command::Ping(4));
                head.push(s);
                if done {
                    break;
                }
            }
            (
                Run {
                    vmm,
                    m,
                    seen,
                    rp,
                    rx,
                    precopy,
                },
                head,
            )
        }

        fn send(&mut self, msg: RpMessage) {
            let mut buf = Vec::new();
            msg.encode(&mut buf);
            self.rp.write_all(&buf).unwrap();
        }

        /// Everything up to EOF.
        fn rest(&self) -> Vec<Seen> {
            let mut out = Vec::new();
            loop {
                let s = self.rx.recv_timeout(LIMIT).expect("the stream goes on");
                if s == Seen::Eof {
                    return out;
                }
                out.push(s);
            }
        }
    }

    fn wait_until(f: impl Fn() -> bool) {
        let t0 = std::time::Instant::now();
        while !f() {
            assert!(t0.elapsed() < LIMIT, "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn pages_of(seen: &[Seen]) -> Vec<usize> {
        seen.iter()
            .filter_map(|s| match s {
                Seen::Page { page, .. } => Some(*page),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn switch_sends_discards_package_and_every_page_once() {
        let (mut run, head) = Run::start(&[0, 1, 5]);
        // OPEN_RETURN_PATH, PING(1), ADVISE first.
        let ps = host_page_size();
        let advise = vmigrate_stream::postcopy::PostcopyAdvise {
            ram_pagesize_summary: ps,
            target_page_size: ps,
        };
        assert_eq!(
            head[..3],
            [
                Seen::Command(Command::OpenReturnPath),
                Seen::Command(Command::Ping(1)),
                Seen::Command(Command::PostcopyAdvise(advise.encode())),
            ]
        );
        // Then: switchover start, discards, PING(2), the package, PING(4).
        let at = head
            .iter()
            .position(|s| *s == Seen::Command(Command::SwitchoverStart))
            .expect("SWITCHOVER_START");
        let tail = &head[at + 1..];
        let n = tail.len();
        assert_eq!(tail[n - 3], Seen::Command(Command::Ping(2)));
        assert_eq!(tail[n - 1], Seen::Command(Command::Ping(4)));
        let mut discarded = vec![false; PAGES];
        for s in &tail[..n - 3] {
            let Seen::Command(Command::PostcopyRamDiscard(p)) = s else {
                panic!("expected only discards, got {s:?}");
            };
            let d = vmigrate_stream::postcopy::RamDiscard::decode(p, 0).unwrap();
            assert_eq!(d.block, "ram");
            assert!(!d.ranges.is_empty() && d.ranges.len() <= 12);
            for (start, len) in d.ranges {
                for page in start / ps..(start + len) / ps {
                    discarded[page as usize] = true;
                }
            }
        }
        // Discarded: exactly what precopy did not send, and the pages written again.
        let mut expected = vec![true; PAGES];
        for &p in &run.precopy {
            expected[p] = false;
        }
        for p in [0, 1, 5] {
            expected[p] = true;
        }
        assert_eq!(discarded, expected);
        assert!(run.precopy.len() < PAGES / 2, "precopy was to be stalled");
        // The package: LISTEN, globalstate `running`, PING(3), RUN.
        let mut package = Vec::new();
        Command::PostcopyListen.encode(&mut package);
        let ids = crate::shared::SectionIds::new(0);
        crate::outgoing::save::encode_device_sections(&mut package, &[], &ids, RunState::Running)
            .unwrap();
        Command::Ping(3).encode(&mut package);
        Command::PostcopyRun.encode(&mut package);
        assert_eq!(tail[n - 2], Seen::Package(package));
        assert_eq!(run.m.status(), MigrationStatus::PostcopyActive);
        assert_eq!(
            run.m.cancel().unwrap_err().0,
            "Postcopy migration in progress, cannot cancel."
        );
        let q = run.m.query_migrate();
        assert!(q.get("downtime").is_some() && q.get("expected-downtime").is_none());
        // Postcopy: every discarded page exactly once, the first one naming its block.
        let rest = run.rest();
        assert!(matches!(rest[0], Seen::Part));
        assert!(matches!(rest[1], Seen::Page { named: true, .. }));
        assert_eq!(rest.iter().filter(|s| **s == Seen::End).count(), 1);
        let mut sent = pages_of(&rest);
        sent.sort_unstable();
        let want: Vec<usize> = (0..PAGES).filter(|&p| expected[p]).collect();
        assert_eq!(sent, want);
        // Re-dirtied pages carry the guest's last write.
        assert!(
            rest.contains(&Seen::Page {
                page: 5,
                named: false,
                first: Some(0xee)
            }) || rest.contains(&Seen::Page {
                page: 5,
                named: true,
                first: Some(0xee)
            })
        );
        run.send(RpMessage::Shut(0));
        assert_eq!(wait_for_end(&run.m, LIMIT), MigrationStatus::Completed);
        let events = ended_events(&run.seen);
        assert_eq!(
            events,
            ["setup", "active", "device", "postcopy-active", "completed"]
        );
        let q = run.m.query_migrate();
        let ram = &q["ram"];
        assert!(ram["postcopy-bytes"].as_u64().unwrap() > 0);
        assert!(ram["precopy-bytes"].as_u64().unwrap() > 0);
        assert_eq!(ram["downtime-bytes"], json!(0));
        // The source never runs the guest again.
        let history = run.vmm.control.history();
        let stop = history
            .iter()
            .position(|s| *s == RunState::FinishMigrate)
            .unwrap();
        assert!(!history[stop..].contains(&RunState::Running));
        assert_eq!(history.last(), Some(&RunState::PostMigrate));
    }

    #[test]
    fn a_requested_page_is_sent_next_and_the_push_goes_on_after_it() {
        let (mut run, _) = Run::start(&[]);
        let sent_before: std::collections::HashSet<usize> = run.precopy.iter().copied().collect();
        // Far from where the push is, and not sent yet.
        let wanted = PAGES - 100;
        assert!(!sent_before.contains(&wanted));
        let ps = host_page_size();
        run.send(RpMessage::ReqPagesId {
            start: wanted as u64 * ps,
            len: ps as u32,
            block: "ram".into(),
        });
        // The same page again, and one precopy sent: neither is sent twice.
        run.send(RpMessage::ReqPages {
            start: wanted as u64 * ps,
            len: ps as u32,
        });
        run.send(RpMessage::ReqPages {
            start: run.precopy[0] as u64 * ps,
            len: ps as u32,
        });
        let rest = run.rest();
        let pages = pages_of(&rest);
        let at = pages.iter().position(|&p| p == wanted).unwrap();
        assert_eq!(pages.iter().filter(|&&p| p == wanted).count(), 1);
        assert!(rest.contains(&Seen::Page {
            page: wanted,
            named: true,
            first: Some((wanted % 251) as u8 + 1)
        }));
        // It jumped the queue: the push was before it, then goes on just after it.
        assert!(pages[..at].iter().all(|&p| p < wanted));
        assert!(at + 1 < pages.len());
        assert_eq!(pages[at + 1], wanted + 1);
        let mut sorted = pages.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), pages.len(), "a page went twice");
        assert!(!pages.contains(&run.precopy[0]));
        run.send(RpMessage::Shut(0));
        assert_eq!(wait_for_end(&run.m, LIMIT), MigrationStatus::Completed);
        assert_eq!(run.m.query_migrate()["ram"]["postcopy-requests"], json!(3));
    }

    /// Runs a postcopy migration (one page requested) with or without `release-ram`
    /// and checks what the source's RAM holds afterwards.
    fn release_ram_run(release_ram: bool) {
        let (mut run, _) = Run::start_with(&[], None, release_ram);
        let ps = host_page_size();
        let wanted = PAGES - 100;
        assert!(!run.precopy.contains(&wanted));
        run.send(RpMessage::ReqPagesId {
            start: wanted as u64 * ps,
            len: ps as u32,
            block: "ram".into(),
        });
        let rest = run.rest();
        // Every page went once, with the guest's bytes: none was freed before it went.
        for s in &rest {
            if let Seen::Page { page, first, .. } = s {
                assert_eq!(*first, Some((page % 251) as u8 + 1), "page {page}");
            }
        }
        let postcopy = pages_of(&rest);
        assert!(postcopy.contains(&wanted));
        let mut all = postcopy.clone();
        all.extend(&run.precopy);
        all.sort_unstable();
        assert_eq!(all, (0..PAGES).collect::<Vec<_>>());
        run.send(RpMessage::Shut(0));
        assert_eq!(wait_for_end(&run.m, LIMIT), MigrationStatus::Completed);
        // With release-ram, what postcopy sent reads as zero on the source now; what
        // precopy sent (while the VM still ran) is kept, as in QEMU. Without it, all
        // of RAM is as it was.
        let ram = run.vmm.ram();
        let page_bytes = |p: usize| &ram[p * ps as usize..(p + 1) * ps as usize];
        let original = |p: usize| vec![(p % 251) as u8 + 1; ps as usize];
        for &p in &postcopy {
            if release_ram {
                assert!(page_bytes(p).iter().all(|&b| b == 0), "page {p} kept");
            } else {
                assert_eq!(page_bytes(p), original(p), "page {p}");
            }
        }
        for &p in &run.precopy {
            assert_eq!(page_bytes(p), original(p), "page {p}");
        }
        assert!(postcopy.len() > PAGES / 2, "precopy was to be stalled");
    }

    #[test]
    fn with_release_ram_pages_sent_in_postcopy_are_freed_on_the_source() {
        release_ram_run(true);
    }

    #[test]
    fn without_release_ram_the_source_keeps_its_pages() {
        release_ram_run(false);
    }

    #[test]
    fn precopy_switches_by_itself_after_x_vmigrate_postcopy_after() {
        let started = std::time::Instant::now();
        let (run, head) = Run::start_with(&[], Some(200), false);
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(head.contains(&Seen::Command(Command::SwitchoverStart)));
        assert_eq!(run.m.status(), MigrationStatus::PostcopyActive);
        assert_eq!(
            run.m.query_parameters()["x-vmigrate-postcopy-after"],
            json!(200)
        );
        let mut sent = pages_of(&run.rest());
        sent.extend(&run.precopy);
        sent.sort_unstable();
        assert_eq!(sent, (0..PAGES).collect::<Vec<_>>());
        let mut run = run;
        run.send(RpMessage::Shut(0));
        assert_eq!(wait_for_end(&run.m, LIMIT), MigrationStatus::Completed);
        assert_eq!(
            ended_events(&run.seen),
            ["setup", "active", "device", "postcopy-active", "completed"]
        );
    }

    #[test]
    fn no_automatic_switch_without_postcopy_ram() {
        let vmm = FakeVmm::new(4, RunState::Running);
        let (m, events) = recorded_migrator(vmm, IncomingMode::Disabled);
        assert_eq!(m.query_parameters()["x-vmigrate-postcopy-after"], json!(0));
        m.set_parameters(
            json!({ "x-vmigrate-postcopy-after": 1 })
                .as_object()
                .unwrap(),
        )
        .unwrap();
        let path = temp_path("nopostcopy.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let addr = Address::parse_uri(&format!("unix:{}", path.display())).unwrap();
        m.migrate(addr, false, None).unwrap();
        let (conn, _) = listener.accept().unwrap();
        let _ = std::fs::remove_file(&path);
        // (Read whole, the precopy stream's end is not this reader's business.)
        std::thread::spawn(move || std::io::copy(&mut &conn, &mut std::io::sink()));
        assert_eq!(wait_for_end(&m, LIMIT), MigrationStatus::Completed);
        assert_eq!(
            ended_events(&events),
            ["setup", "active", "device", "completed"]
        );
    }

    fn bad_request_fails(msg: RpMessage, text: &str) {
        let (mut run, _) = Run::start(&[]);
        run.send(msg);
        assert_eq!(wait_for_end(&run.m, LIMIT), MigrationStatus::Failed);
        let q = run.m.query_migrate();
        let desc = q["error-desc"].as_str().unwrap();
        assert!(desc.contains(text), "{desc}");
        // The guest runs on the destination now: the source stays stopped.
        let history = run.vmm.control.history();
        let stop = history
            .iter()
            .position(|s| *s == RunState::FinishMigrate)
            .unwrap();
        assert!(!history[stop..].contains(&RunState::Running));
        assert_eq!(
            ended_events(&run.seen).last().map(String::as_str),
            Some("failed")
        );
    }

    /// The source VM never ran again after the switch.
    fn assert_source_stopped(run: &Run) {
        let history = run.vmm.control.history();
        let stop = history
            .iter()
            .position(|s| *s == RunState::FinishMigrate)
            .unwrap();
        assert!(!history[stop..].contains(&RunState::Running), "{history:?}");
        assert_eq!(history.last(), Some(&RunState::PostMigrate));
    }

    /// A recovery's destination end: the new connection and a reader of it.
    struct Recovering {
        conn: UnixStream,
        src: FdSource,
    }

    impl Recovering {
        /// Resumes `run`'s paused migration to a new socket and accepts it.
        fn start(run: &Run) -> Recovering {
            let path = temp_path("resume.sock");
            let listener = UnixListener::bind(&path).unwrap();
            let addr = Address::parse_uri(&format!("unix:{}", path.display())).unwrap();
            run.m.migrate(addr, true, None).unwrap();
            let (conn, _) = listener.accept().unwrap();
            let _ = std::fs::remove_file(&path);
            conn.set_read_timeout(Some(LIMIT)).unwrap();
            let src = FdSource::new(OwnedFd::from(conn.try_clone().unwrap()), 0);
            Recovering { conn, src }
        }

        fn next_command(&mut self) -> Command {
            match Record::decode(&mut self.src).unwrap() {
                Record::Command(c) => c,
                other => panic!("expected a command, got {other:?}"),
            }
        }

        fn send_bitmap(&mut self, block: &str, pages: u64, received: impl Fn(u64) -> bool) {
            let mut b = Vec::new();
            RpMessage::RecvBitmap {
                block: block.into(),
            }
            .encode(&mut b);
            vmigrate_stream::recover::RecvBitmap::from_fn(pages, received).encode_body(&mut b);
            self.conn.write_all(&b).unwrap();
        }

        fn send(&mut self, msg: RpMessage) {
            let mut b = Vec::new();
            msg.encode(&mut b);
            self.conn.write_all(&b).unwrap();
        }
    }

    fn pause_by_network(run: &Run) {
        run.rp.shutdown(std::net::Shutdown::Both).unwrap();
        wait_until(|| run.m.status() == MigrationStatus::PostcopyPaused);
        assert_source_stopped(run);
        assert!(run.m.query_migrate()["error-desc"].is_string());
    }

    #[test]
    fn a_network_failure_pauses_and_a_resume_sends_what_the_destination_lacks() {
        let (run, _) = Run::start(&[]);
        pause_by_network(&run);
        // Nothing to cancel, and a resume goes through recover-setup.
        assert_eq!(
            run.m.cancel().unwrap_err().0,
            "Postcopy migration in progress, cannot cancel."
        );
        let mut rec = Recovering::start(&run);
        assert_eq!(rec.next_command(), Command::RecvBitmap("ram".into()));
        wait_until(|| run.m.status() == MigrationStatus::PostcopyRecover);
        // This destination holds the even pages only.
        rec.send_bitmap("ram", PAGES as u64, |p| p % 2 == 0);
        assert_eq!(rec.next_command(), Command::PostcopyResume);
        rec.send(RpMessage::ResumeAck(1));
        let (tx, rx) = mpsc::channel();
        let mut src = std::mem::replace(
            &mut rec.src,
            FdSource::new(OwnedFd::from(rec.conn.try_clone().unwrap()), 0),
        );
        std::thread::spawn(move || read_records(&mut src, tx));
        let mut pages = Vec::new();
        loop {
            let s = rx.recv_timeout(LIMIT).expect("the stream goes on");
            match s {
                Seen::Eof => break,
                Seen::Page { page, first, .. } => {
                    assert_eq!(first, Some((page % 251) as u8 + 1), "page {page}");
                    pages.push(page);
                }
                _ => {}
            }
        }
        // Exactly the pages the destination lacked, each once.
        assert_eq!(pages.len(), PAGES / 2, "{pages:?}");
        pages.sort_unstable();
        assert!(pages.iter().enumerate().all(|(i, &p)| p == 2 * i + 1));
        rec.send(RpMessage::Shut(0));
        assert_eq!(wait_for_end(&run.m, LIMIT), MigrationStatus::Completed);
        let events = ended_events(&run.seen);
        assert_eq!(
            events[events.len() - 6..],
            [
                "postcopy-active",
                "postcopy-paused",
                "postcopy-recover-setup",
                "postcopy-recover",
                "postcopy-active",
                "completed"
            ]
        );
        assert_source_stopped(&run);
    }

    #[test]
    fn a_resume_to_nowhere_pauses_again_and_the_next_one_works() {
        let (run, _) = Run::start(&[]);
        pause_by_network(&run);
        let nowhere = Address::parse_uri(&format!(
            "unix:{}",
            temp_path("nobody-listens.sock").display()
        ))
        .unwrap();
        run.m.migrate(nowhere, true, None).unwrap();
        wait_until(|| {
            run.seen
                .lock()
                .unwrap()
                .iter()
                .filter(|s| *s == "postcopy-paused")
                .count()
                == 2
        });
        assert_eq!(run.m.status(), MigrationStatus::PostcopyPaused);
        let mut rec = Recovering::start(&run);
        assert_eq!(rec.next_command(), Command::RecvBitmap("ram".into()));
        rec.send_bitmap("ram", PAGES as u64, |_| true);
        assert_eq!(rec.next_command(), Command::PostcopyResume);
        rec.send(RpMessage::ResumeAck(1));
        // Everything is there: no page, only the end.
        let (tx, rx) = mpsc::channel();
        let mut src = std::mem::replace(
            &mut rec.src,
            FdSource::new(OwnedFd::from(rec.conn.try_clone().unwrap()), 0),
        );
        std::thread::spawn(move || read_records(&mut src, tx));
        loop {
            match rx.recv_timeout(LIMIT).expect("the stream goes on") {
                Seen::Eof => break,
                Seen::Page { page, .. } => panic!("page {page} sent again"),
                _ => {}
            }
        }
        rec.send(RpMessage::Shut(0));
        assert_eq!(wait_for_end(&run.m, LIMIT), MigrationStatus::Completed);
    }

    fn hostile_recovery_fails(answer: impl FnOnce(&mut Recovering), text: &str) {
        let (run, _) = Run::start(&[]);
        pause_by_network(&run);
        let mut rec = Recovering::start(&run);
        assert_eq!(rec.next_command(), Command::RecvBitmap("ram".into()));
        answer(&mut rec);
        assert_eq!(wait_for_end(&run.m, LIMIT), MigrationStatus::Failed);
        let q = run.m.query_migrate();
        let desc = q["error-desc"].as_str().unwrap();
        assert!(desc.contains(text), "{desc}");
        assert_source_stopped(&run);
    }

    #[test]
    fn a_bitmap_for_an_unknown_block_fails_the_migration() {
        hostile_recovery_fails(
            |rec| rec.send_bitmap("nope", PAGES as u64, |_| true),
            "RECV_BITMAP for unknown RAM block 'nope'",
        );
    }

    #[test]
    fn a_bitmap_of_the_wrong_size_fails_the_migration() {
        hostile_recovery_fails(
            |rec| rec.send_bitmap("ram", PAGES as u64 * 2, |_| true),
            "bitmap size mismatch (0x200 != 0x100)",
        );
    }

    #[test]
    fn a_resume_ack_out_of_place_fails_the_migration() {
        hostile_recovery_fails(
            |rec| rec.send(RpMessage::ResumeAck(7)),
            "RESUME_ACK carried 7, expected 1",
        );
    }

    #[test]
    fn migrate_pause_pauses_with_the_users_reason() {
        let (run, _) = Run::start(&[]);
        run.m.migrate_pause().unwrap();
        wait_until(|| run.m.status() == MigrationStatus::PostcopyPaused);
        assert_eq!(
            run.m.query_migrate()["error-desc"],
            json!("Postcopy migration is paused by the user")
        );
        assert_eq!(
            run.m.migrate_pause().unwrap_err().0,
            "migrate-pause is currently only supported during postcopy-active or postcopy-recover state"
        );
        assert_source_stopped(&run);
    }

    #[test]
    fn resume_and_pause_need_a_paused_or_running_postcopy() {
        let vmm = FakeVmm::new(4, RunState::Running);
        let (m, _) = recorded_migrator(vmm, IncomingMode::Disabled);
        let addr = Address::parse_uri("unix:/nonexistent.sock").unwrap();
        assert_eq!(
            m.migrate(addr, true, None).unwrap_err().0,
            "Cannot resume if there is no paused migration"
        );
        assert_eq!(
            m.migrate_pause().unwrap_err().0,
            "migrate-pause is currently only supported during postcopy-active or postcopy-recover state"
        );
        assert_eq!(
            m.recover_precheck().unwrap_err().0,
            "Migrate recover can only be run when postcopy is paused."
        );
    }

    #[test]
    fn a_request_for_an_unknown_block_fails_the_migration() {
        bad_request_fails(
            RpMessage::ReqPagesId {
                start: 0,
                len: host_page_size() as u32,
                block: "nope".into(),
            },
            "unknown RAM block 'nope'",
        );
    }

    #[test]
    fn a_misaligned_or_overlong_request_fails_the_migration() {
        let ps = host_page_size();
        bad_request_fails(
            RpMessage::ReqPagesId {
                start: 1,
                len: ps as u32,
                block: "ram".into(),
            },
            "is not whole pages inside RAM block 'ram'",
        );
        bad_request_fails(
            RpMessage::ReqPagesId {
                start: (PAGES as u64 - 1) * ps,
                len: 2 * ps as u32,
                block: "ram".into(),
            },
            "is not whole pages inside RAM block 'ram'",
        );
    }

    #[test]
    fn req_pages_without_a_block_fails_the_migration() {
        bad_request_fails(
            RpMessage::ReqPages {
                start: 0,
                len: host_page_size() as u32,
            },
            "names no block",
        );
    }

    #[test]
    fn start_postcopy_needs_the_capability_and_a_migration() {
        let vmm = FakeVmm::new(4, RunState::Running);
        let (m, _) = recorded_migrator(vmm, IncomingMode::Disabled);
        assert_eq!(
            m.start_postcopy().unwrap_err().0,
            "Enable postcopy with migrate_set_capability before the start of migration"
        );
        m.set_capabilities(&json!([{"capability": "postcopy-ram", "state": true}]))
            .unwrap();
        assert_eq!(
            m.start_postcopy().unwrap_err().0,
            "Postcopy must be started after migration has been started"
        );
    }

    #[test]
    fn with_preempt_requested_pages_go_on_the_preempt_channel() {
        use vmigrate_stream::preempt::{self, PreemptPageKind, PreemptRecord};
        let ps = host_page_size();
        let vmm = FakeVmm::new(PAGES, RunState::Running);
        for p in 0..PAGES {
            vmm.write_page(p, (p % 251) as u8 + 1);
        }
        let (m, _) = recorded_migrator(vmm.clone(), IncomingMode::Disabled);
        m.set_capabilities(&json!([
            {"capability": "postcopy-ram", "state": true},
            {"capability": "postcopy-preempt", "state": true}
        ]))
        .unwrap();
        m.set_parameters(
            json!({"max-bandwidth": 4 << 20, "max-postcopy-bandwidth": 8 << 20})
                .as_object()
                .unwrap(),
        )
        .unwrap();
        let path = temp_path("preempt.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let addr = Address::parse_uri(&format!("unix:{}", path.display())).unwrap();
        m.migrate(addr, false, None).unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        // The destination reads the main channel: PONG(1).
        let mut pong = Vec::new();
        RpMessage::Pong(1).encode(&mut pong);
        conn.write_all(&pong).unwrap();
        wait_until(|| m.status() == MigrationStatus::Active);
        m.start_postcopy().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = conn.try_clone().unwrap();
        std::thread::spawn(move || read_stream(OwnedFd::from(reader), tx));
        let mut precopy = Vec::new();
        loop {
            let s = rx.recv_timeout(LIMIT).expect("the stream goes on");
            if let Seen::Page { page, .. } = s {
                precopy.push(page);
            }
            if s == Seen::Command(Command::Ping(4)) {
                break;
            }
        }
        // The preempt channel connected before the switch; no bytes of its own.
        let (pre, _) = listener.accept().unwrap();
        let _ = std::fs::remove_file(&path);
        // Two pages far from the push and from each other (the push goes on just after
        // a requested page, so a neighbour could go on the main channel first).
        let wanted = PAGES - 100;
        let other = PAGES - 200;
        assert!(!precopy.contains(&wanted) && !precopy.contains(&other));
        for msg in [
            RpMessage::ReqPagesId {
                start: wanted as u64 * ps,
                len: ps as u32,
                block: "ram".into(),
            },
            RpMessage::ReqPages {
                start: other as u64 * ps,
                len: ps as u32,
            },
        ] {
            let mut b = Vec::new();
            msg.encode(&mut b);
            conn.write_all(&b).unwrap();
        }
        pre.set_read_timeout(Some(LIMIT)).unwrap();
        let mut psrc = FdSource::new(OwnedFd::from(pre), 0);
        for (i, page) in [wanted, other].into_iter().enumerate() {
            let rec = preempt::decode_record(&mut psrc, ps).unwrap();
            assert_eq!(
                rec,
                Some(PreemptRecord::Page {
                    block: (i == 0).then(|| "ram".to_string()),
                    offset: page as u64 * ps,
                    kind: PreemptPageKind::Data
                })
            );
            let mut data = vec![0; ps as usize];
            psrc.fill(&mut data, "page").unwrap();
            assert_eq!(data[0], (page % 251) as u8 + 1);
        }
        // The rest on the main channel: every page once, the requested ones not again.
        let mut rest = Vec::new();
        loop {
            let s = rx.recv_timeout(LIMIT).expect("the stream goes on");
            if s == Seen::Eof {
                break;
            }
            rest.push(s);
        }
        let mut all = pages_of(&rest);
        assert!(!all.contains(&wanted) && !all.contains(&other));
        all.extend(&precopy);
        all.extend([wanted, other]);
        all.sort_unstable();
        assert_eq!(all, (0..PAGES).collect::<Vec<_>>());
        let mut shut = Vec::new();
        RpMessage::Shut(0).encode(&mut shut);
        conn.write_all(&shut).unwrap();
        assert_eq!(wait_for_end(&m, LIMIT), MigrationStatus::Completed);
        // Closed once the destination finished, with no EOS.
        assert_eq!(preempt::decode_record(&mut psrc, ps).unwrap(), None);
        assert_eq!(m.query_migrate()["ram"]["postcopy-requests"], json!(2));
    }
}
