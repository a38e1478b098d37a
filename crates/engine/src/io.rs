//! Byte I/O around the codecs: a buffered [`Source`] over a descriptor for the loader,
//! and a gathering writer for the saver that sends guest pages without copying them.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmigrate_stream::{DecodeError, DecodeErrorKind, Source};

use crate::memory::{write_gathered, GatherPart, RamBlock};

/// Reads a migration stream from a descriptor, counting offsets from the stream start.
#[derive(Debug)]
pub struct FdSource {
    fd: OwnedFd,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Stream offset of `buf[start]`.
    offset: u64,
    eof: bool,
    /// Where pages bound for a block that loads through its file are read first.
    pages: Vec<u8>,
}

const READ_BUFFER: usize = 1 << 20;

impl FdSource {
    pub fn new(fd: OwnedFd, base_offset: u64) -> Self {
        Self::with_buffer(fd, base_offset, READ_BUFFER)
    }

    /// A source whose read-ahead is at most `capacity` bytes. A multifd channel uses its
    /// packet header's size: the header is all that is read ahead, so the pages after it
    /// go from the socket straight into guest memory instead of through the buffer.
    pub fn with_buffer(fd: OwnedFd, base_offset: u64, capacity: usize) -> Self {
        Self {
            fd,
            buf: vec![0u8; capacity.max(1)].into_boxed_slice(),
            start: 0,
            end: 0,
            offset: base_offset,
            eof: false,
            pages: Vec::new(),
        }
    }

    fn refill(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        if self.eof {
            return Ok(false);
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        loop {
            match rustix::io::read(&self.fd, &mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(true);
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(self.read_error(what, e)),
            }
        }
    }

    /// Fills `dst`: what is buffered is copied, and the bulk of a large read goes
    /// straight from the descriptor into `dst`, bypassing the buffer.
    fn fill_into(
        &mut self,
        dst: &mut impl FillTarget,
        what: &'static str,
    ) -> Result<(), DecodeError> {
        let at = self.offset;
        let len = dst.len();
        let mut done = 0;
        while done < len {
            if self.start < self.end {
                let n = (self.end - self.start).min(len - done);
                dst.copy_in(done, &self.buf[self.start..self.start + n]);
                self.start += n;
                self.offset += n as u64;
                done += n;
                continue;
            }
            if len - done >= self.buf.len() / 4 && !self.eof {
                match dst.read_from(self.fd.as_fd(), done) {
                    Ok(0) => self.eof = true,
                    Ok(n) => {
                        done += n;
                        self.offset += n as u64;
                    }
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(self.read_error(what, e)),
                }
                continue;
            }
            if !self.refill(what)? {
                return Err(DecodeError::new(
                    at,
                    DecodeErrorKind::Truncated { what, needed: len },
                ));
            }
        }
        Ok(())
    }

    /// Reads `len` bytes into guest memory at `offset` of `block` (a RAM page).
    pub fn fill_guest(
        &mut self,
        block: &RamBlock,
        offset: u64,
        len: usize,
        what: &'static str,
    ) -> Result<(), DecodeError> {
        self.fill_into(&mut GuestRange { block, offset, len }, what)
    }

    /// Fills the pages of `page_len` bytes at `offsets` of `block`, in order, through
    /// a buffer and [`RamBlock::load_pages`] (for a block that loads through its file).
    pub fn fill_guest_pages_buffered(
        &mut self,
        block: &RamBlock,
        offsets: &[u64],
        page_len: usize,
        what: &'static str,
    ) -> Result<(), DecodeError> {
        let at = self.offset;
        let mut pages = std::mem::take(&mut self.pages);
        pages.resize(offsets.len() * page_len, 0);
        let filled = self.fill(&mut pages, what).and_then(|()| {
            block
                .load_pages(offsets, page_len, &pages)
                .map_err(|source| {
                    DecodeError::new(at, DecodeErrorKind::GuestWrite { what, source })
                })
        });
        self.pages = pages;
        filled
    }

    /// Fills the pages of `page_len` bytes at `offsets` of `block`, in order: what is
    /// buffered is copied, the rest is read straight into them with one `readv` per
    /// batch (multifd pages land in guest memory without a copy).
    pub fn fill_guest_pages(
        &mut self,
        block: &RamBlock,
        offsets: &[u64],
        page_len: usize,
        what: &'static str,
    ) -> Result<(), DecodeError> {
        let at = self.offset;
        let total = offsets.len() * page_len;
        let mut idx = 0;
        let mut done_in_first = 0;
        // Drain the buffer first.
        while idx < offsets.len() && self.start < self.end {
            let n = (self.end - self.start).min(page_len - done_in_first);
            block.load(
                offsets[idx] + done_in_first as u64,
                &self.buf[self.start..self.start + n],
            );
            self.start += n;
            self.offset += n as u64;
            done_in_first += n;
            if done_in_first == page_len {
                idx += 1;
                done_in_first = 0;
            }
        }
        while idx < offsets.len() {
            if self.eof {
                return Err(DecodeError::new(
                    at,
                    DecodeErrorKind::Truncated {
                        what,
                        needed: total,
                    },
                ));
            }
            let n = match block.load_pages_from_fd(
                self.fd.as_fd(),
                &offsets[idx..],
                page_len,
                done_in_first,
            ) {
                Ok(0) => {
                    self.eof = true;
                    continue;
                }
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(self.read_error(what, e)),
            };
            self.offset += n as u64;
            let mut left = n;
            while left > 0 {
                let room = page_len - done_in_first;
                if left >= room {
                    left -= room;
                    idx += 1;
                    done_in_first = 0;
                } else {
                    done_in_first += left;
                    left = 0;
                }
            }
        }
        Ok(())
    }

    /// The bytes read ahead and not consumed yet, for a look at what comes next.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Consumes `n` of the [`buffered`](Self::buffered) bytes, taken by the caller.
    pub fn consume(&mut self, n: usize) {
        assert!(
            n <= self.end - self.start,
            "consume past the buffered bytes"
        );
        self.start += n;
        self.offset += n as u64;
    }

    /// A failed read at the current offset.
    fn read_error(&self, what: &'static str, e: rustix::io::Errno) -> DecodeError {
        DecodeError::new(
            self.offset,
            DecodeErrorKind::Io {
                what,
                source: e.into(),
            },
        )
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// The descriptor, for positional reads beside the stream (mapped-ram).
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Moves the stream to absolute file position `pos`, dropping what was buffered
    /// (mapped-ram: the stream resumes after a block's page area).
    pub fn seek_to(&mut self, pos: u64) -> Result<(), DecodeError> {
        rustix::fs::seek(&self.fd, rustix::fs::SeekFrom::Start(pos))
            .map_err(|e| self.read_error("stream position", e))?;
        self.start = 0;
        self.end = 0;
        self.offset = pos;
        self.eof = false;
        Ok(())
    }
}

impl Source for FdSource {
    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), DecodeError> {
        self.fill_into(&mut &mut *buf, what)
    }

    fn offset(&self) -> u64 {
        self.offset
    }

    fn peek_u8(&mut self) -> Result<Option<u8>, DecodeError> {
        if self.start == self.end && !self.refill("next record")? {
            return Ok(None);
        }
        Ok(Some(self.buf[self.start]))
    }
}

/// Where [`FdSource::fill_into`] puts bytes: a buffer of the VMM's, or guest memory.
trait FillTarget {
    fn len(&self) -> usize;
    /// Copies `bytes` in at `at`.
    fn copy_in(&mut self, at: usize, bytes: &[u8]);
    /// One read from `fd` into the target from `at` to its end.
    fn read_from(&mut self, fd: BorrowedFd<'_>, at: usize) -> rustix::io::Result<usize>;
}

impl FillTarget for &mut [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn copy_in(&mut self, at: usize, bytes: &[u8]) {
        self[at..at + bytes.len()].copy_from_slice(bytes);
    }
    fn read_from(&mut self, fd: BorrowedFd<'_>, at: usize) -> rustix::io::Result<usize> {
        rustix::io::read(fd, &mut self[at..])
    }
}

/// A range of guest memory being filled.
struct GuestRange<'a> {
    block: &'a RamBlock,
    offset: u64,
    len: usize,
}

impl FillTarget for GuestRange<'_> {
    fn len(&self) -> usize {
        self.len
    }
    fn copy_in(&mut self, at: usize, bytes: &[u8]) {
        self.block.load(self.offset + at as u64, bytes);
    }
    fn read_from(&mut self, fd: BorrowedFd<'_>, at: usize) -> rustix::io::Result<usize> {
        self.block
            .load_from_fd(fd, self.offset + at as u64, self.len - at)
    }
}

/// Enforces `max-bandwidth` in 100 ms windows, as QEMU does. The limit is read live so a
/// `migrate-set-parameters` during the migration takes effect at once.
#[derive(Debug)]
pub struct RateLimiter {
    limit: Arc<AtomicU64>,
    /// This limiter's share of the limit: 1 for the main channel alone, N when N
    /// channels split the bandwidth.
    share: u64,
    window_start: Instant,
    used: u64,
}

const RATE_WINDOW: Duration = Duration::from_millis(100);

impl RateLimiter {
    pub fn new(limit: Arc<AtomicU64>) -> Self {
        Self::with_share(limit, 1)
    }

    /// A limiter that uses `1/share` of the limit (one of `share` parallel writers).
    pub fn with_share(limit: Arc<AtomicU64>, share: u64) -> Self {
        Self {
            limit,
            share: share.max(1),
            window_start: Instant::now(),
            used: 0,
        }
    }

    /// Accounts `bytes` and sleeps once the window's budget is spent. A limit below
    /// 10 bytes/s leaves no budget per window and means unlimited, as in QEMU.
    pub fn account(&mut self, bytes: u64, cancel: &AtomicBool) {
        self.account_until(bytes, cancel, None);
    }

    /// [`Self::account`], but the sleep also ends as soon as `wake` is set (postcopy
    /// page requests waiting); the bytes stay accounted, so the next call waits for
    /// them.
    pub fn account_until(&mut self, bytes: u64, cancel: &AtomicBool, wake: Option<&AtomicBool>) {
        self.used += bytes;
        let step = if wake.is_some() {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(20)
        };
        loop {
            let budget = self.limit.load(Ordering::Relaxed) / 10 / self.share;
            if budget == 0 {
                self.used = 0;
                return;
            }
            let elapsed = self.window_start.elapsed();
            if elapsed >= RATE_WINDOW {
                self.window_start = Instant::now();
                self.used = self.used.saturating_sub(budget);
                continue;
            }
            if self.used < budget
                || cancel.load(Ordering::Relaxed)
                || wake.is_some_and(|w| w.load(Ordering::Acquire))
            {
                return;
            }
            std::thread::sleep((RATE_WINDOW - elapsed).min(step));
        }
    }
}

/// A gathering writer: small records go into a buffer, guest pages are referenced in
/// place, and everything leaves in `writev` batches.
#[derive(Debug)]
pub struct StreamWriter {
    /// Shared only with the cancel list, which holds it weakly (see
    /// `Shared::register_cancel_fd`): dropping the writer closes the descriptor.
    fd: Arc<OwnedFd>,
    buf: Vec<u8>,
    /// Segments in order: either a range of `buf` or a run of guest memory.
    segs: Vec<Segment>,
    pending: usize,
    /// File position of the first pending byte (seekable targets; otherwise a count).
    position: u64,
    /// Bytes written so far (what `query-migrate` calls `transferred`).
    pub written: Arc<AtomicU64>,
    limiter: RateLimiter,
    cancel: Arc<AtomicBool>,
    /// Ends the rate limit's wait early while set (postcopy page requests waiting).
    wake: Option<Arc<AtomicBool>>,
    /// `zero-copy-send`: guest memory goes out with `MSG_ZEROCOPY`.
    zero_copy: Option<crate::outgoing::zero_copy::ZeroCopy>,
}

#[derive(Debug, Clone)]
enum Segment {
    Buf {
        start: usize,
        len: usize,
    },
    Guest {
        block: Arc<RamBlock>,
        offset: u64,
        len: usize,
    },
}

const MAX_SEGMENTS: usize = 512;
const FLUSH_BYTES: usize = 1 << 20;

/// An error writing the stream.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("Unable to write to socket: {0}")]
    Io(String),
    /// A positional write to a migration file (mapped-ram), or opening it for one.
    #[error("{0}")]
    File(String),
    /// Securing a channel with TLS failed.
    #[error("{0}")]
    Tls(String),
    #[error("migration was cancelled")]
    Cancelled,
    /// `zero-copy-send` cannot work on this channel (QEMU's text).
    #[error("{0}")]
    ZeroCopy(&'static str),
}

/// One step of a zero-copy flush from byte `done`: the run of parts of one kind that
/// holds that byte, guest memory with `MSG_ZEROCOPY`, bytes (headers, whose buffer is
/// reused at once) with an ordinary write. Returns the bytes sent.
fn send_zero_copy(
    zc: &mut crate::outgoing::zero_copy::ZeroCopy,
    fd: std::os::fd::BorrowedFd<'_>,
    parts: &[GatherPart<'_>],
    done: usize,
) -> rustix::io::Result<usize> {
    use crate::outgoing::zero_copy::{GuestRun, MEMLOCK};
    let mut start = 0;
    let mut at = 0;
    let part_len = |p: &GatherPart<'_>| match *p {
        GatherPart::Bytes(b) => b.len(),
        GatherPart::Guest { len, .. } => len,
    };
    while at + part_len(&parts[start]) <= done {
        at += part_len(&parts[start]);
        start += 1;
    }
    let guest = matches!(parts[start], GatherPart::Guest { .. });
    let end = parts[start..]
        .iter()
        .position(|p| matches!(p, GatherPart::Guest { .. }) != guest)
        .map_or(parts.len(), |i| start + i);
    let skip = done - at;
    if !guest {
        return write_gathered(fd, &parts[start..end], skip);
    }
    let runs: Vec<GuestRun<'_>> = parts[start..end]
        .iter()
        .filter_map(|p| match *p {
            GatherPart::Guest { block, offset, len } => Some(GuestRun { block, offset, len }),
            GatherPart::Bytes(_) => None,
        })
        .collect();
    zc.send(fd, &runs, skip).map_err(|e| {
        if e.to_string() == MEMLOCK {
            rustix::io::Errno::NOBUFS
        } else {
            rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO)
        }
    })
}

impl StreamWriter {
    pub fn new(
        fd: impl Into<Arc<OwnedFd>>,
        written: Arc<AtomicU64>,
        limit: Arc<AtomicU64>,
        cancel: Arc<AtomicBool>,
    ) -> Self {
        Self {
            fd: fd.into(),
            buf: Vec::with_capacity(256 << 10),
            segs: Vec::with_capacity(MAX_SEGMENTS),
            pending: 0,
            position: 0,
            written,
            limiter: RateLimiter::new(limit),
            cancel,
            wake: None,
            zero_copy: None,
        }
    }

    /// Sends guest memory with `MSG_ZEROCOPY` from now on (a socket that cannot fails
    /// with QEMU's text).
    pub fn enable_zero_copy(&mut self) -> Result<(), WriteError> {
        use crate::outgoing::zero_copy;
        zero_copy::enable(self.fd.as_fd())
            .map_err(|_| WriteError::ZeroCopy(zero_copy::NOT_AVAILABLE))?;
        self.zero_copy = Some(zero_copy::ZeroCopy::default());
        Ok(())
    }

    /// Flushes, then waits for the kernel to complete every zero-copy send. Returns
    /// whether it copied all of them (`None` without zero copy).
    pub fn flush_zero_copy(&mut self) -> Result<Option<bool>, WriteError> {
        self.flush()?;
        let fd = self.fd.clone();
        match &mut self.zero_copy {
            Some(zc) => zc
                .flush(fd.as_fd())
                .map(Some)
                .map_err(|e| WriteError::Io(e.to_string())),
            None => Ok(None),
        }
    }

    /// From now on the rate limit's wait ends early while `flag` is set (see
    /// [`RateLimiter::account_until`]); `None` turns that off.
    pub fn wake_rate_limit_on(&mut self, flag: Option<Arc<AtomicBool>>) {
        self.wake = flag;
    }

    /// Appends small bytes (record headers, device bodies).
    pub fn put(&mut self, data: &[u8]) -> Result<(), WriteError> {
        self.with_buf(|b| b.extend_from_slice(data))
    }

    /// Appends bytes produced by an encoder.
    pub fn with_buf(&mut self, f: impl FnOnce(&mut Vec<u8>)) -> Result<(), WriteError> {
        let start = self.buf.len();
        f(&mut self.buf);
        let len = self.buf.len() - start;
        if len == 0 {
            return Ok(());
        }
        match self.segs.last_mut() {
            Some(Segment::Buf { start: s, len: l }) if *s + *l == start => *l += len,
            _ => self.segs.push(Segment::Buf { start, len }),
        }
        self.pending += len;
        self.maybe_flush()
    }

    /// Appends `len` bytes of guest memory at `offset` of `block` without copying them:
    /// they are read when the batch is written.
    pub fn put_guest(
        &mut self,
        block: &Arc<RamBlock>,
        offset: u64,
        len: usize,
    ) -> Result<(), WriteError> {
        self.segs.push(Segment::Guest {
            block: block.clone(),
            offset,
            len,
        });
        self.pending += len;
        self.maybe_flush()
    }

    fn maybe_flush(&mut self) -> Result<(), WriteError> {
        if self.segs.len() >= MAX_SEGMENTS || self.pending >= FLUSH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), WriteError> {
        let parts: Vec<GatherPart<'_>> = self
            .segs
            .iter()
            .map(|s| match s {
                Segment::Buf { start, len } => GatherPart::Bytes(&self.buf[*start..*start + *len]),
                Segment::Guest { block, offset, len } => GatherPart::Guest {
                    block,
                    offset: *offset,
                    len: *len,
                },
            })
            .collect();
        let total = self.pending;
        let mut done = 0;
        while done < total {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(WriteError::Cancelled);
            }
            let sent = match &mut self.zero_copy {
                Some(zc) => send_zero_copy(zc, self.fd.as_fd(), &parts, done),
                None => write_gathered(self.fd.as_fd(), &parts, done),
            };
            match sent {
                Ok(0) => return Err(WriteError::Io("write returned 0".into())),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    if self.cancel.load(Ordering::Relaxed) {
                        return Err(WriteError::Cancelled);
                    }
                    if e == rustix::io::Errno::NOBUFS && self.zero_copy.is_some() {
                        return Err(WriteError::ZeroCopy(crate::outgoing::zero_copy::MEMLOCK));
                    }
                    let io: std::io::Error = e.into();
                    return Err(WriteError::Io(crate::errno::errno_text(&io)));
                }
            }
        }
        drop(parts);
        self.written.fetch_add(total as u64, Ordering::Relaxed);
        self.position += total as u64;
        self.buf.clear();
        self.segs.clear();
        self.pending = 0;
        self.limiter
            .account_until(total as u64, &self.cancel, self.wake.as_deref());
        Ok(())
    }

    /// Says where in the file the stream starts (`file:…,offset=N`).
    pub fn set_position(&mut self, pos: u64) {
        self.position = pos;
    }

    /// The file position the next appended byte will have.
    pub fn position(&self) -> u64 {
        self.position + self.pending as u64
    }

    /// Flushes, then continues the stream at absolute file position `pos` (mapped-ram
    /// leaves room for each block's bitmap and pages).
    pub fn seek_to(&mut self, pos: u64) -> Result<(), WriteError> {
        self.flush()?;
        rustix::fs::seek(&self.fd, rustix::fs::SeekFrom::Start(pos))
            .map_err(|e| WriteError::Io(crate::errno::errno_text(&std::io::Error::from(e))))?;
        self.position = pos;
        Ok(())
    }

    /// Makes this writer use `1/share` of the bandwidth limit (multifd channels).
    pub fn set_bandwidth_share(&mut self, share: u64) {
        self.limiter.share = share.max(1);
    }

    /// Bytes queued but not written yet.
    pub fn pending(&self) -> usize {
        self.pending
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Shuts the socket down both ways (what is still queued is dropped): the peer
    /// sees the connection end.
    pub fn shutdown(&mut self) {
        self.buf.clear();
        self.segs.clear();
        self.pending = 0;
        let _ = rustix::net::shutdown(&*self.fd, rustix::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    /// A header then pages, all in the socket (and closed) before the first read, so a
    /// source that reads ahead further than it should has the pages at hand to take.
    fn stream(header: &[u8], pages: &[Vec<u8>], cut: usize) -> FdSource {
        let (mut w, r) = UnixStream::pair().unwrap();
        let mut all = header.to_vec();
        for p in pages {
            all.extend_from_slice(p);
        }
        all.truncate(all.len() - cut);
        w.write_all(&all).unwrap();
        drop(w);
        FdSource::with_buffer(OwnedFd::from(r), 0, header.len())
    }

    fn pages() -> Vec<Vec<u8>> {
        let ps = crate::memory::host_page_size() as usize;
        (0..3u8).map(|i| vec![i + 1; ps]).collect()
    }

    /// A block of four pages and the offsets of three of them, out of order.
    fn block_and_offsets() -> (RamBlock, Vec<u64>) {
        let ps = crate::memory::host_page_size();
        let block = RamBlock::anonymous("ram", 4 * ps, 0).unwrap();
        (block, vec![3 * ps, 0, 2 * ps])
    }

    #[test]
    fn a_header_sized_buffer_reads_ahead_no_further_than_the_header() {
        let header: Vec<u8> = (0..100).collect();
        let want = pages();
        let mut src = stream(&header, &want, 0);
        assert_eq!(src.peek_u8().unwrap(), Some(0));
        let mut got_header = vec![0u8; 100];
        src.fill(&mut got_header, "header").unwrap();
        assert_eq!(got_header, header);
        assert_eq!(src.end - src.start, 0, "page bytes were buffered");
        let (block, offsets) = block_and_offsets();
        let ps = block.page_size() as usize;
        src.fill_guest_pages(&block, &offsets, ps, "pages").unwrap();
        let got: Vec<Vec<u8>> = offsets
            .iter()
            .map(|o| {
                let mut page = vec![0u8; ps];
                block.read(*o, &mut page);
                page
            })
            .collect();
        assert_eq!(got, want);
        assert!(
            block.is_zero(ps as u64, ps),
            "a page not listed was written"
        );
        assert_eq!(src.offset(), 100 + 3 * ps as u64);
        assert_eq!(src.peek_u8().unwrap(), None);
    }

    #[test]
    fn guest_pages_written_in_place_are_read_back_in_place() {
        let ps = crate::memory::host_page_size();
        let src = Arc::new(RamBlock::anonymous("ram", 2 * ps, 0).unwrap());
        src.fill_u64(ps, ps as usize, 0xabcd);
        let (w, r) = UnixStream::pair().unwrap();
        let mut writer = StreamWriter::new(
            OwnedFd::from(w),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        writer.put(b"page:").unwrap();
        writer.put_guest(&src, ps, ps as usize).unwrap();
        writer.put(b"end").unwrap();
        writer.flush().unwrap();
        assert_eq!(writer.written.load(Ordering::Relaxed), 8 + ps);
        drop(writer);
        let dst = RamBlock::anonymous("ram", 2 * ps, 0).unwrap();
        let mut src_in = FdSource::with_buffer(OwnedFd::from(r), 0, 5);
        let mut head = [0u8; 5];
        src_in.fill(&mut head, "head").unwrap();
        assert_eq!(&head, b"page:");
        src_in.fill_guest(&dst, 0, ps as usize, "page").unwrap();
        let mut tail = [0u8; 3];
        src_in.fill(&mut tail, "tail").unwrap();
        assert_eq!(&tail, b"end");
        let (mut a, mut b) = (vec![0u8; ps as usize], vec![0u8; ps as usize]);
        src.read(ps, &mut a);
        dst.read(0, &mut b);
        assert_eq!(a, b);
        assert!(dst.pristine(), "a loader's write ended pristine");
    }

    #[test]
    fn a_stream_cut_inside_the_pages_is_truncated_at_their_start() {
        let header = vec![7u8; 100];
        let mut src = stream(&header, &pages(), 10);
        let mut h = vec![0u8; 100];
        src.fill(&mut h, "header").unwrap();
        let (block, offsets) = block_and_offsets();
        let ps = block.page_size() as usize;
        let e = src
            .fill_guest_pages(&block, &offsets, ps, "pages")
            .unwrap_err();
        assert_eq!(e.offset, 100);
        assert!(
            matches!(e.kind, DecodeErrorKind::Truncated { what: "pages", needed } if needed == 3 * ps),
            "{e:?}"
        );
    }
}
