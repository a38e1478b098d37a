//! mapped-ram: every RAM page at a fixed offset of a seekable file.
//!
//! ```text
//! block entry │ header (28 B) │ page bitmap │ hole up to 1 MiB │ page area (used_length) │ next entry …
//!                              ▲ written last (END)              ▲ page i at pages_offset + i × page size
//! ```
//!
//! The saver writes pages with positional writes, on the migration thread or on one
//! thread per multifd channel (at most one per core); a page dirtied again is rewritten
//! in place, so the file never grows past RAM plus metadata. Zero pages are never
//! written: their bit stays clear and the file keeps a hole. The loader reads each block's bitmap and fills guest
//! memory straight from the file with positional reads, split across as many threads
//! (again, at most one per core).

use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vmigrate_stream::ram::{MappedRamHeader, MAPPED_RAM_HEADER_LEN};

use crate::errno::{errno_code_text, errno_text};
use crate::io::{RateLimiter, WriteError};
use crate::memory::RamBlock;
use crate::stats::Stats;
use crate::vmm::AtomicBitmap;

/// The page area of every block starts on a multiple of this absolute file offset.
pub const PAGES_ALIGNMENT: u64 = 1 << 20;

/// The largest single positional read or write.
const IO_CHUNK_PAGES: usize = 256;

/// Pages handed to a writer thread at once.
const BATCH_PAGES: usize = 512;

/// Why a block's mapped-ram region could not be loaded: its header does not fit the
/// block or the file, its bitmap is wrong, or reading the file failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MappedRamError {
    #[error("cannot size the file: {0}")]
    FileSize(rustix::io::Errno),
    #[error(
        "mapped-ram version {version} is not supported (at most {})",
        MappedRamHeader::VERSION
    )]
    UnsupportedVersion { version: u32 },
    #[error("page size {file} differs from the block's {block}")]
    PageSizeMismatch { file: u64, block: u64 },
    #[error("pages offset 0x{pages_offset:x} is not aligned to the page size {page_size}")]
    UnalignedPages { pages_offset: u64, page_size: u64 },
    #[error(
        "bitmap of {len} bytes at 0x{offset:x} runs past the end of the file (0x{file_len:x} bytes)"
    )]
    BitmapPastEnd {
        len: u64,
        offset: u64,
        file_len: u64,
    },
    #[error("pages offset 0x{pages_offset:x} is past the end of the file (0x{file_len:x} bytes)")]
    PagesPastEnd { pages_offset: u64, file_len: u64 },
    #[error(
        "bitmap 0x{:x}..0x{:x} overlaps the page area 0x{:x}..0x{:x}",
        bitmap.start,
        bitmap.end,
        pages.start,
        pages.end
    )]
    Overlap {
        bitmap: Range<u64>,
        pages: Range<u64>,
    },
    #[error("the bitmap marks page {page}, past the block's {pages} pages")]
    BitmapPastBlock { page: usize, pages: usize },
    #[error("the bitmap is truncated")]
    BitmapTruncated,
    #[error("cannot read the bitmap: {}", errno_code_text(*.0))]
    BitmapRead(rustix::io::Errno),
    #[error(
        "the page area is truncated: page {page} of block '{block}' at file offset 0x{offset:x} \
         is past the end of the file"
    )]
    PagesTruncated {
        page: usize,
        block: String,
        offset: u64,
    },
    #[error(
        "cannot read page {page} of block '{block}' at file offset 0x{offset:x}: {}",
        errno_code_text(*.errno)
    )]
    PageRead {
        page: usize,
        block: String,
        offset: u64,
        errno: rustix::io::Errno,
    },
    #[error(transparent)]
    DirectIo(#[from] DirectIoError),
}

/// Why the migration file could not be opened a second time with O_DIRECT.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectIoError {
    #[error(
        "direct-io: the file system of the migration file does not support O_DIRECT \
         (Invalid argument)"
    )]
    Unsupported,
    #[error(
        "direct-io: cannot open the migration file with O_DIRECT: {}",
        errno_code_text(*.0)
    )]
    Open(rustix::io::Errno),
}

/// Why writing pages or bitmaps to the migration file failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappedRamWriteError {
    #[error("write returned 0")]
    WroteNothing,
    #[error("{}", errno_code_text(*.0))]
    Write(rustix::io::Errno),
    /// A writer thread found the migration cancelled before its batch.
    #[error("migration was cancelled")]
    Cancelled,
    #[error("a file writer thread stopped")]
    WriterStopped,
}

/// A mapped-ram write failure as the stream writer reports it: [`WriteError`] belongs
/// to the lower `io` layer, which does not know mapped-ram, so it carries the text.
impl From<MappedRamWriteError> for WriteError {
    fn from(e: MappedRamWriteError) -> Self {
        WriteError::File(format!("Unable to write to file: {e}"))
    }
}

impl From<DirectIoError> for WriteError {
    fn from(e: DirectIoError) -> Self {
        WriteError::File(e.to_string())
    }
}

/// Where one block's bitmap and pages live in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub bitmap_offset: u64,
    pub pages_offset: u64,
    pub page_size: u64,
    pub used_length: u64,
}

impl Region {
    /// The layout a writer gives a block whose mapped-ram header starts at `header_at`:
    /// the bitmap right after the header, the pages at the next 1 MiB boundary.
    pub fn plan(header_at: u64, used_length: u64, page_size: u64) -> Self {
        let bitmap_offset = header_at + MAPPED_RAM_HEADER_LEN as u64;
        let bitmap_len = bitmap_len(used_length / page_size);
        Self {
            bitmap_offset,
            pages_offset: (bitmap_offset + bitmap_len).next_multiple_of(PAGES_ALIGNMENT),
            page_size,
            used_length,
        }
    }

    /// Checks a header read from a file against the local block and the file's size.
    pub fn from_header(
        h: &MappedRamHeader,
        block: &RamBlock,
        file_len: u64,
    ) -> Result<Self, MappedRamError> {
        if h.version > MappedRamHeader::VERSION {
            return Err(MappedRamError::UnsupportedVersion { version: h.version });
        }
        if h.page_size != block.page_size() {
            return Err(MappedRamError::PageSizeMismatch {
                file: h.page_size,
                block: block.page_size(),
            });
        }
        let region = Self {
            bitmap_offset: h.bitmap_offset,
            pages_offset: h.pages_offset,
            page_size: h.page_size,
            used_length: block.len(),
        };
        if !h.pages_offset.is_multiple_of(h.page_size) {
            return Err(MappedRamError::UnalignedPages {
                pages_offset: h.pages_offset,
                page_size: h.page_size,
            });
        }
        let bitmap_end = h.bitmap_offset.checked_add(region.bitmap_len());
        if bitmap_end.is_none_or(|end| end > file_len) {
            return Err(MappedRamError::BitmapPastEnd {
                len: region.bitmap_len(),
                offset: h.bitmap_offset,
                file_len,
            });
        }
        if h.pages_offset.checked_add(block.len()).is_none() || h.pages_offset >= file_len {
            return Err(MappedRamError::PagesPastEnd {
                pages_offset: h.pages_offset,
                file_len,
            });
        }
        let pages = h.pages_offset..h.pages_offset + block.len();
        let bitmap = h.bitmap_offset..h.bitmap_offset + region.bitmap_len();
        if bitmap.start < pages.end && pages.start < bitmap.end {
            return Err(MappedRamError::Overlap { bitmap, pages });
        }
        Ok(region)
    }

    pub fn pages(&self) -> usize {
        (self.used_length / self.page_size) as usize
    }

    pub fn bitmap_len(&self) -> u64 {
        bitmap_len(self.used_length / self.page_size)
    }

    /// Where the main stream continues after this block.
    pub fn end(&self) -> u64 {
        self.pages_offset + self.used_length
    }

    pub fn header(&self) -> MappedRamHeader {
        MappedRamHeader {
            version: MappedRamHeader::VERSION,
            page_size: self.page_size,
            bitmap_offset: self.bitmap_offset,
            pages_offset: self.pages_offset,
        }
    }

    fn page_at(&self, page: usize) -> u64 {
        self.pages_offset + page as u64 * self.page_size
    }
}

/// Bytes of bitmap for `pages` pages: whole 64-bit words.
fn bitmap_len(pages: u64) -> u64 {
    pages.div_ceil(64) * 8
}

/// Runs of consecutive set bits in a file bitmap, as (first page, count), each at most
/// `max_run` long. Fails on a bit set at or past `pages`.
pub fn bitmap_runs(
    bytes: &[u8],
    pages: usize,
    max_run: usize,
) -> Result<Vec<(usize, usize)>, MappedRamError> {
    let mut runs = Vec::new();
    let mut open: Option<(usize, usize)> = None;
    for (wi, chunk) in bytes.chunks_exact(8).enumerate() {
        let mut word = u64::from_le_bytes(chunk.try_into().expect("8-byte chunk"));
        if word == 0 {
            if let Some(r) = open.take() {
                runs.push(r);
            }
            continue;
        }
        while word != 0 {
            let bit = word.trailing_zeros() as usize;
            let page = wi * 64 + bit;
            if page >= pages {
                return Err(MappedRamError::BitmapPastBlock { page, pages });
            }
            word &= word - 1;
            match &mut open {
                Some((first, n)) if *first + *n == page && *n < max_run => *n += 1,
                _ => {
                    if let Some(r) = open.replace((page, 1)) {
                        runs.push(r);
                    }
                }
            }
        }
    }
    runs.extend(open);
    Ok(runs)
}

/// Opens the file behind `fd` a second time with O_DIRECT, for the page area.
pub fn reopen_direct(fd: &OwnedFd, write: bool) -> Result<OwnedFd, DirectIoError> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let mode = if write {
        rustix::fs::OFlags::WRONLY
    } else {
        rustix::fs::OFlags::RDONLY
    };
    rustix::fs::open(
        path.as_str(),
        mode | rustix::fs::OFlags::DIRECT | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| {
        if e == rustix::io::Errno::INVAL {
            DirectIoError::Unsupported
        } else {
            DirectIoError::Open(e)
        }
    })
}

/// Repeats a positional write until `len` bytes are written: `pwrite(done)` writes
/// what is left from byte `done` on.
fn write_all_at(
    len: usize,
    mut pwrite: impl FnMut(usize) -> rustix::io::Result<usize>,
) -> Result<(), MappedRamWriteError> {
    let mut done = 0;
    while done < len {
        match pwrite(done) {
            Ok(0) => return Err(MappedRamWriteError::WroteNothing),
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(MappedRamWriteError::Write(e)),
        }
    }
    Ok(())
}

/// Threads worth running for file I/O: a mapped-ram file has no channels, only offsets,
/// so its writers and readers need not number `multifd-channels`; more threads than
/// cores only take turns (and take the CPU from the guest and the other threads).
fn usable_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The save side's shared state: the file, the layout, what each block's bitmap says.
struct WriterShared {
    blocks: Vec<Arc<RamBlock>>,
    regions: Vec<Region>,
    bitmaps: Vec<AtomicBitmap>,
    /// The buffered descriptor (bitmaps) and the one pages go through (O_DIRECT or not).
    meta_fd: OwnedFd,
    pages_fd: OwnedFd,
    detect_zero: bool,
    /// Whether writer threads stand for multifd channels (their bytes count as such).
    threaded: bool,
    stats: Arc<Stats>,
    cancel: Arc<AtomicBool>,
    /// Buffered writes to one file are serialized by the kernel (the inode lock, with
    /// spinning waiters); taking turns here instead leaves the CPU to the other writers'
    /// zero detection. O_DIRECT writes do not need it.
    turn: Option<Mutex<()>>,
    /// Batches handed out and not finished, and the first error.
    inflight: Mutex<(usize, Option<MappedRamWriteError>)>,
    idle: Condvar,
}

impl WriterShared {
    /// Writes one batch of pages of block `bi` (ascending page numbers): zero pages only
    /// clear their bit, runs of consecutive data pages go out in one write each.
    fn write_batch(
        &self,
        bi: usize,
        pages: &[usize],
        limiter: &mut RateLimiter,
    ) -> Result<(), MappedRamWriteError> {
        let block = &self.blocks[bi];
        let region = &self.regions[bi];
        let ps = block.page_size() as usize;
        let (mut zero, mut normal) = (0u64, 0u64);
        let mut run: Option<(usize, usize)> = None;
        let mut written = 0u64;
        let flush = |run: (usize, usize), written: &mut u64| -> Result<(), MappedRamWriteError> {
            let (first, n) = run;
            let len = n * ps;
            let (offset, file_offset) = (first as u64 * ps as u64, region.page_at(first));
            let _turn = self
                .turn
                .as_ref()
                .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()));
            // Guest writes racing with the write are caught by dirty tracking and the
            // page is written again.
            write_all_at(len, |done| {
                block.save_to_file_at(
                    &self.pages_fd,
                    offset + done as u64,
                    len - done,
                    file_offset + done as u64,
                )
            })?;
            *written += len as u64;
            Ok(())
        };
        for &page in pages {
            if self.detect_zero && block.is_zero(page as u64 * ps as u64, ps) {
                self.bitmaps[bi].put(page, false);
                zero += 1;
                continue;
            }
            self.bitmaps[bi].put(page, true);
            normal += 1;
            run = match run {
                Some((first, n)) if first + n == page && n < IO_CHUNK_PAGES => Some((first, n + 1)),
                Some(r) => {
                    flush(r, &mut written)?;
                    Some((page, 1))
                }
                None => Some((page, 1)),
            };
        }
        if let Some(r) = run {
            flush(r, &mut written)?;
        }
        self.stats.duplicate.fetch_add(zero, Ordering::Relaxed);
        self.stats.normal.fetch_add(normal, Ordering::Relaxed);
        self.stats.transferred.fetch_add(written, Ordering::Relaxed);
        if self.threaded {
            self.stats
                .multifd_bytes
                .fetch_add(written, Ordering::Relaxed);
        }
        limiter.account(written, &self.cancel);
        Ok(())
    }

    fn finish_batch(&self, result: Result<(), MappedRamWriteError>) {
        let mut g = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        g.0 -= 1;
        if let Err(e) = result {
            g.1.get_or_insert(e);
        }
        if g.0 == 0 {
            self.idle.notify_all();
        }
    }
}

/// Writes pages at their file offsets, on the calling thread or on writer threads.
pub struct MappedRamWriter {
    shared: Arc<WriterShared>,
    workers: Vec<SyncSender<(usize, Vec<usize>)>>,
    threads: Vec<JoinHandle<()>>,
    next: usize,
    batch: Option<(usize, Vec<usize>)>,
    limiter: RateLimiter,
}

impl std::fmt::Debug for MappedRamWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedRamWriter")
            .field("threads", &self.threads.len())
            .finish_non_exhaustive()
    }
}

/// How the saver writes the page area.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Writer threads (multifd channels, at most one per core); 0 writes on the
    /// migration thread.
    pub threads: usize,
    pub direct_io: bool,
    pub detect_zero: bool,
    pub limit: Arc<AtomicU64>,
}

impl MappedRamWriter {
    /// `fd` is the migration file; `regions` the layout chosen in the setup section.
    pub fn start(
        fd: &OwnedFd,
        blocks: Vec<Arc<RamBlock>>,
        regions: Vec<Region>,
        config: WriterConfig,
        stats: Arc<Stats>,
        cancel: Arc<AtomicBool>,
    ) -> Result<Self, WriteError> {
        let dup_error = |e: std::io::Error| {
            WriteError::File(format!(
                "cannot duplicate the file descriptor: {}",
                errno_text(&e)
            ))
        };
        let meta_fd = fd.try_clone().map_err(dup_error)?;
        let pages_fd = if config.direct_io {
            reopen_direct(fd, true)?
        } else {
            fd.try_clone().map_err(dup_error)?
        };
        let bitmaps = regions
            .iter()
            .map(|r| AtomicBitmap::new(r.pages()))
            .collect();
        let writers = config.threads.min(usable_cores());
        let shared = Arc::new(WriterShared {
            blocks,
            regions,
            bitmaps,
            meta_fd,
            pages_fd,
            detect_zero: config.detect_zero,
            threaded: config.threads > 0,
            turn: (writers > 1 && !config.direct_io).then(|| Mutex::new(())),
            stats,
            cancel,
            inflight: Mutex::new((0, None)),
            idle: Condvar::new(),
        });
        let share = writers.max(1) as u64;
        let mut workers = Vec::new();
        let mut threads = Vec::new();
        for id in 0..writers {
            let (tx, rx) = mpsc::sync_channel::<(usize, Vec<usize>)>(2);
            let sh = shared.clone();
            let mut limiter = RateLimiter::with_share(config.limit.clone(), share);
            let handle = std::thread::Builder::new()
                .name(format!("mig/src/file_{id}"))
                .spawn(move || {
                    for (bi, pages) in rx {
                        let r = if sh.cancel.load(Ordering::Relaxed) {
                            Err(MappedRamWriteError::Cancelled)
                        } else {
                            sh.write_batch(bi, &pages, &mut limiter)
                        };
                        sh.finish_batch(r);
                    }
                })
                .map_err(|e| WriteError::File(format!("cannot start a file writer thread: {e}")))?;
            workers.push(tx);
            threads.push(handle);
        }
        Ok(Self {
            shared,
            workers,
            threads,
            next: 0,
            batch: None,
            limiter: RateLimiter::with_share(config.limit, 1),
        })
    }

    /// Queues page `page` of block `bi`; pages of one block come in ascending order
    /// within a pass.
    pub fn queue(&mut self, bi: usize, page: usize) -> Result<(), WriteError> {
        if let Some((b, pages)) = &self.batch {
            let ascending = pages.last().is_none_or(|&last| last < page);
            if *b != bi || pages.len() >= BATCH_PAGES || !ascending {
                self.dispatch()?;
            }
        }
        self.batch
            .get_or_insert_with(|| (bi, Vec::with_capacity(BATCH_PAGES)))
            .1
            .push(page);
        Ok(())
    }

    fn dispatch(&mut self) -> Result<(), WriteError> {
        let Some((bi, pages)) = self.batch.take() else {
            return Ok(());
        };
        self.check_error()?;
        if self.workers.is_empty() {
            return self
                .shared
                .write_batch(bi, &pages, &mut self.limiter)
                .map_err(WriteError::from);
        }
        self.shared
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0 += 1;
        let n = self.workers.len();
        let tx = &self.workers[self.next % n];
        self.next = self.next.wrapping_add(1);
        if tx.send((bi, pages)).is_err() {
            self.shared
                .finish_batch(Err(MappedRamWriteError::WriterStopped));
        }
        Ok(())
    }

    fn check_error(&self) -> Result<(), WriteError> {
        if self.shared.cancel.load(Ordering::Relaxed) {
            return Err(WriteError::Cancelled);
        }
        let g = self
            .shared
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match &g.1 {
            Some(e) => Err(e.clone().into()),
            None => Ok(()),
        }
    }

    /// Waits until every queued page is in the file. Called at the end of each pass, so
    /// a page written again in a later pass can never be overtaken by an older write.
    pub fn drain(&mut self) -> Result<(), WriteError> {
        self.dispatch()?;
        let mut g = self
            .shared
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while g.0 > 0 {
            g = self.shared.idle.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        drop(g);
        self.check_error()
    }

    /// Drains, then writes every block's bitmap at its offset.
    pub fn write_bitmaps(&mut self) -> Result<(), WriteError> {
        self.drain()?;
        for (bitmap, region) in self.shared.bitmaps.iter().zip(&self.shared.regions) {
            let bytes = bitmap.to_le_bytes();
            write_all_at(bytes.len(), |done| {
                rustix::io::pwrite(
                    &self.shared.meta_fd,
                    &bytes[done..],
                    region.bitmap_offset + done as u64,
                )
            })
            .map_err(WriteError::from)?;
        }
        Ok(())
    }
}

impl Drop for MappedRamWriter {
    fn drop(&mut self) {
        self.workers.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Loads one block's pages: reads its bitmap, then every page whose bit is set, straight
/// into guest memory with `threads` parallel readers. Pages whose bit is clear are zero;
/// they are cleared only where the block may hold data already. Returns the pages read.
pub fn load_block(
    meta_fd: &OwnedFd,
    pages_fd: &OwnedFd,
    block: &RamBlock,
    region: &Region,
    threads: usize,
) -> Result<u64, MappedRamError> {
    let mut bitmap = vec![0u8; region.bitmap_len() as usize];
    let bitmap_len = bitmap.len();
    read_all_at(bitmap_len, |done| {
        rustix::io::pread(
            meta_fd,
            &mut bitmap[done..],
            region.bitmap_offset + done as u64,
        )
    })
    .map_err(|e| match e {
        ReadFail::Eof => MappedRamError::BitmapTruncated,
        ReadFail::Io(e) => MappedRamError::BitmapRead(e),
    })?;
    let runs = bitmap_runs(&bitmap, region.pages(), IO_CHUNK_PAGES)?;
    if !block.pristine() {
        clear_absent_pages(block, &bitmap, region.pages());
    }
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<MappedRamError>> = Mutex::new(None);
    let ps = region.page_size;
    let read_runs = || {
        loop {
            if failed.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                return;
            }
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&(first, n)) = runs.get(i) else {
                return;
            };
            let len = n * ps as usize;
            let (offset, file_offset) = (first as u64 * ps, region.page_at(first));
            // Runs are disjoint, so no two readers write the same bytes. The run is
            // faulted in with one call first, rather than page by page by the read.
            block.populate_for_write(offset, len);
            let read = read_all_at(len, |done| {
                block.load_from_file_at(
                    pages_fd,
                    offset + done as u64,
                    len - done,
                    file_offset + done as u64,
                )
            });
            if let Err(e) = read {
                let (block, offset) = (block.idstr().to_string(), region.page_at(first));
                let error = match e {
                    ReadFail::Eof => MappedRamError::PagesTruncated {
                        page: first,
                        block,
                        offset,
                    },
                    ReadFail::Io(errno) => MappedRamError::PageRead {
                        page: first,
                        block,
                        offset,
                        errno,
                    },
                };
                failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(error);
                return;
            }
        }
    };
    let threads = threads.min(usable_cores()).clamp(1, runs.len().max(1));
    std::thread::scope(|s| {
        for _ in 1..threads {
            s.spawn(read_runs);
        }
        read_runs();
    });
    if !runs.is_empty() {
        block.note_external_writes();
    }
    match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(runs.iter().map(|r| r.1 as u64).sum()),
    }
}

/// Zeroes the pages a file says are zero, where the block is not known to be zero.
fn clear_absent_pages(block: &RamBlock, bitmap: &[u8], pages: usize) {
    let ps = block.page_size() as usize;
    for page in 0..pages {
        if bitmap[page / 8] & (1 << (page % 8)) == 0 {
            let offset = page as u64 * ps as u64;
            if !block.is_zero(offset, ps) {
                block.fill_zero(offset, ps);
            }
        }
    }
}

enum ReadFail {
    Eof,
    Io(rustix::io::Errno),
}

/// Repeats a positional read until `len` bytes are read: `pread(done)` reads what is
/// left from byte `done` on.
fn read_all_at(
    len: usize,
    mut pread: impl FnMut(usize) -> rustix::io::Result<usize>,
) -> Result<(), ReadFail> {
    let mut done = 0;
    while done < len {
        match pread(done) {
            Ok(0) => return Err(ReadFail::Eof),
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(ReadFail::Io(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_qemus_file() {
        // A 64 MiB block whose entry ends at 0x64: header there, bitmap at 0x80 (2048
        // bytes), pages at 1 MiB, the stream resumes at 0x4100000.
        let r = Region::plan(0x64, 64 << 20, 4096);
        assert_eq!(r.bitmap_offset, 0x80);
        assert_eq!(r.bitmap_len(), 2048);
        assert_eq!(r.pages_offset, 0x100000);
        assert_eq!(r.end(), 0x4100000);
        // With offset=4096 the alignment stays absolute.
        let r = Region::plan(0x1064, 64 << 20, 4096);
        assert_eq!(r.pages_offset, 0x100000);
    }

    #[test]
    fn bitmap_bit_order() {
        let b = AtomicBitmap::new(16384);
        for p in [0, 1, 2, 3, 100, 16383] {
            b.put(p, true);
        }
        let bytes = b.to_le_bytes();
        assert_eq!(bytes.len(), 2048);
        assert_eq!(bytes[0], 0x0F);
        assert_eq!(bytes[12], 0x10);
        assert_eq!(bytes[2047], 0x80);
        let runs = bitmap_runs(&bytes, 16384, 256).unwrap();
        assert_eq!(runs, vec![(0, 4), (100, 1), (16383, 1)]);
    }

    #[test]
    fn runs_are_split_and_bounded() {
        let b = AtomicBitmap::new(1000);
        for p in 0..600 {
            b.put(p, true);
        }
        b.put(5, false);
        let runs = bitmap_runs(&b.to_le_bytes(), 1000, 256).unwrap();
        assert_eq!(runs, vec![(0, 5), (6, 256), (262, 256), (518, 82)]);
        // A bit past the block's last page is refused.
        let mut bytes = AtomicBitmap::new(100).to_le_bytes();
        bytes[12] |= 0x20; // page 101
        let e = bitmap_runs(&bytes, 100, 256).unwrap_err();
        assert!(
            matches!(
                e,
                MappedRamError::BitmapPastBlock {
                    page: 101,
                    pages: 100
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("page 101"), "{e}");
    }

    #[test]
    fn messages_keep_their_texts() {
        assert_eq!(
            DirectIoError::Unsupported.to_string(),
            "direct-io: the file system of the migration file does not support O_DIRECT \
             (Invalid argument)"
        );
        assert_eq!(
            DirectIoError::Open(rustix::io::Errno::ACCESS).to_string(),
            "direct-io: cannot open the migration file with O_DIRECT: Permission denied"
        );
        let write = WriteError::from(MappedRamWriteError::Write(rustix::io::Errno::NOSPC));
        assert_eq!(
            write.to_string(),
            "Unable to write to file: No space left on device"
        );
        let truncated = MappedRamError::PagesTruncated {
            page: 7,
            block: "pc.ram".into(),
            offset: 0x107000,
        };
        assert_eq!(
            truncated.to_string(),
            "the page area is truncated: page 7 of block 'pc.ram' at file offset 0x107000 is \
             past the end of the file"
        );
        let overlap = MappedRamError::Overlap {
            bitmap: 0x80..0x880,
            pages: 0x0..0x4000,
        };
        assert_eq!(
            overlap.to_string(),
            "bitmap 0x80..0x880 overlaps the page area 0x0..0x4000"
        );
    }
}
