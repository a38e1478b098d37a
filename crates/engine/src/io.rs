//! Byte I/O around the codecs: a buffered [`Source`] over a descriptor for the loader,
//! and a gathering writer for the saver that sends guest pages without copying them.

use std::io::IoSlice;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmigrate_stream::{DecodeError, DecodeErrorKind, Source};

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

    /// Reads `len` bytes straight into `dst` (guest memory), bypassing the buffer for
    /// the bulk of large reads.
    ///
    /// # Safety
    ///
    /// `dst..dst+len` must be valid for writes for the duration of the call.
    pub unsafe fn fill_raw(
        &mut self,
        dst: *mut u8,
        len: usize,
        what: &'static str,
    ) -> Result<(), DecodeError> {
        let at = self.offset;
        let mut done = 0;
        while done < len {
            if self.start < self.end {
                let n = (self.end - self.start).min(len - done);
                // SAFETY: the caller guarantees dst..dst+len is writable; the buffer range
                // is inside `buf`, which cannot overlap guest memory.
                unsafe {
                    std::ptr::copy_nonoverlapping(self.buf[self.start..].as_ptr(), dst.add(done), n)
                };
                self.start += n;
                self.offset += n as u64;
                done += n;
                continue;
            }
            if len - done >= self.buf.len() / 4 && !self.eof {
                // SAFETY: as above; the slice covers the part not yet filled.
                let out = unsafe { std::slice::from_raw_parts_mut(dst.add(done), len - done) };
                match rustix::io::read(&self.fd, out) {
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

    /// Fills several destinations in order: what is buffered is copied, the rest is read
    /// straight into them with `readv` (multifd pages land in guest memory without a copy).
    ///
    /// # Safety
    ///
    /// Every `(ptr, len)` range must be valid for writes for the duration of the call and
    /// must not overlap this source's buffer.
    pub unsafe fn fill_scattered(
        &mut self,
        dsts: &[(*mut u8, usize)],
        what: &'static str,
    ) -> Result<(), DecodeError> {
        let at = self.offset;
        let total: usize = dsts.iter().map(|d| d.1).sum();
        let mut idx = 0;
        let mut done_in_first = 0;
        // Drain the buffer first.
        while idx < dsts.len() && self.start < self.end {
            let (ptr, len) = dsts[idx];
            let n = (self.end - self.start).min(len - done_in_first);
            // SAFETY: the caller guarantees the destination range; the buffer range is
            // inside `buf`.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.buf[self.start..].as_ptr(),
                    ptr.add(done_in_first),
                    n,
                )
            };
            self.start += n;
            self.offset += n as u64;
            done_in_first += n;
            if done_in_first == len {
                idx += 1;
                done_in_first = 0;
            }
        }
        while idx < dsts.len() {
            if self.eof {
                return Err(DecodeError::new(
                    at,
                    DecodeErrorKind::Truncated {
                        what,
                        needed: total,
                    },
                ));
            }
            let mut iov: Vec<std::io::IoSliceMut<'_>> = Vec::with_capacity(dsts.len() - idx);
            for (k, (ptr, len)) in dsts[idx..].iter().enumerate() {
                let skip = if k == 0 { done_in_first } else { 0 };
                // SAFETY: the caller guarantees each range is writable and unaliased for
                // this call.
                iov.push(std::io::IoSliceMut::new(unsafe {
                    std::slice::from_raw_parts_mut(ptr.add(skip), len - skip)
                }));
            }
            let n = match rustix::io::readv(&self.fd, &mut iov) {
                Ok(0) => {
                    self.eof = true;
                    continue;
                }
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(self.read_error(what, e)),
            };
            drop(iov);
            self.offset += n as u64;
            let mut left = n;
            while left > 0 {
                let room = dsts[idx].1 - done_in_first;
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
        // SAFETY: `buf` is a valid, exclusively borrowed Rust buffer.
        unsafe { self.fill_raw(buf.as_mut_ptr(), buf.len(), what) }
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
        self.used += bytes;
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
            if self.used < budget || cancel.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep((RATE_WINDOW - elapsed).min(Duration::from_millis(20)));
        }
    }
}

/// A gathering writer: small records go into a buffer, guest pages are referenced in
/// place, and everything leaves in `writev` batches.
#[derive(Debug)]
pub struct StreamWriter {
    fd: OwnedFd,
    buf: Vec<u8>,
    /// Segments in order: either a range of `buf` or a guest pointer.
    segs: Vec<Segment>,
    pending: usize,
    /// File position of the first pending byte (seekable targets; otherwise a count).
    position: u64,
    /// Bytes written so far (what `query-migrate` calls `transferred`).
    pub written: Arc<AtomicU64>,
    limiter: RateLimiter,
    cancel: Arc<AtomicBool>,
}

#[derive(Debug, Clone, Copy)]
enum Segment {
    Buf { start: usize, len: usize },
    Guest { ptr: *const u8, len: usize },
}

// SAFETY: guest pointers in pending segments refer to RAM blocks that outlive the writer
// (the engine holds Arc<RamBlock> for the whole migration).
unsafe impl Send for StreamWriter {}

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
}

impl StreamWriter {
    pub fn new(
        fd: OwnedFd,
        written: Arc<AtomicU64>,
        limit: Arc<AtomicU64>,
        cancel: Arc<AtomicBool>,
    ) -> Self {
        Self {
            fd,
            buf: Vec::with_capacity(256 << 10),
            segs: Vec::with_capacity(MAX_SEGMENTS),
            pending: 0,
            position: 0,
            written,
            limiter: RateLimiter::new(limit),
            cancel,
        }
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

    /// Appends `len` bytes of guest memory without copying them.
    ///
    /// # Safety
    ///
    /// `ptr..ptr+len` must stay mapped until the next flush.
    pub unsafe fn put_guest(&mut self, ptr: *const u8, len: usize) -> Result<(), WriteError> {
        self.segs.push(Segment::Guest { ptr, len });
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
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(self.segs.len());
        for s in &self.segs {
            match *s {
                Segment::Buf { start, len } => {
                    iov.push(IoSlice::new(&self.buf[start..start + len]))
                }
                // SAFETY: put_guest's contract keeps the range mapped until this flush.
                Segment::Guest { ptr, len } => iov.push(IoSlice::new(unsafe {
                    std::slice::from_raw_parts(ptr, len)
                })),
            }
        }
        let mut slices: &mut [IoSlice<'_>] = &mut iov;
        let total = self.pending;
        while !slices.is_empty() {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(WriteError::Cancelled);
            }
            match rustix::io::writev(self.fd.as_fd(), slices) {
                Ok(0) => return Err(WriteError::Io("write returned 0".into())),
                Ok(n) => IoSlice::advance_slices(&mut slices, n),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    if self.cancel.load(Ordering::Relaxed) {
                        return Err(WriteError::Cancelled);
                    }
                    let io: std::io::Error = e.into();
                    return Err(WriteError::Io(crate::errno::errno_text(&io)));
                }
            }
        }
        drop(iov);
        self.written.fetch_add(total as u64, Ordering::Relaxed);
        self.position += total as u64;
        self.buf.clear();
        self.segs.clear();
        self.pending = 0;
        self.limiter.account(total as u64, &self.cancel);
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

    pub fn into_fd(self) -> OwnedFd {
        self.fd
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
        (0..3u8).map(|i| vec![i + 1; 4096]).collect()
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
        let mut got: Vec<Vec<u8>> = vec![vec![0u8; 4096]; 3];
        let dsts: Vec<(*mut u8, usize)> = got.iter_mut().map(|p| (p.as_mut_ptr(), 4096)).collect();
        // SAFETY: three live, separate 4096-byte buffers.
        unsafe { src.fill_scattered(&dsts, "pages") }.unwrap();
        assert_eq!(got, want);
        assert_eq!(src.offset(), 100 + 3 * 4096);
        assert_eq!(src.peek_u8().unwrap(), None);
    }

    #[test]
    fn a_stream_cut_inside_the_pages_is_truncated_at_their_start() {
        let header = vec![7u8; 100];
        let mut src = stream(&header, &pages(), 10);
        let mut h = vec![0u8; 100];
        src.fill(&mut h, "header").unwrap();
        let mut got: Vec<Vec<u8>> = vec![vec![0u8; 4096]; 3];
        let dsts: Vec<(*mut u8, usize)> = got.iter_mut().map(|p| (p.as_mut_ptr(), 4096)).collect();
        // SAFETY: three live, separate 4096-byte buffers.
        let e = unsafe { src.fill_scattered(&dsts, "pages") }.unwrap_err();
        assert_eq!(e.offset, 100);
        assert!(
            matches!(e.kind, DecodeErrorKind::Truncated { what: "pages", needed } if needed == 3 * 4096),
            "{e:?}"
        );
    }
}
