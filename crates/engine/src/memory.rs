//! Guest RAM blocks: a host mapping made once (anonymous, or a file), shared between the
//! guest, the VMM and the migration threads.
//!
//! The mappings are made and unmapped only here; other modules reach guest pages through
//! pointers this module hands out after checking the range. The mapping is valid for the
//! life of the block; its contents may change at any time (the guest writes while it runs), which is
//! why callers only get short-lived byte views and copies, and why a page read while the
//! guest writes it is simply sent again once the dirty log reports it.

use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::path::Path;
use std::ptr::NonNull;

/// Errors creating a RAM block.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot open memory file '{path}': {}", io_text(source))]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot size memory file '{path}' to {len} bytes: {}", io_text(source))]
    Resize {
        path: String,
        len: u64,
        source: std::io::Error,
    },
    #[error("cannot map {len} bytes of guest memory: {}", errno_text(source))]
    Map { len: u64, source: rustix::io::Errno },
    #[error("guest memory size must be a non-zero multiple of the page size {page_size}")]
    BadSize { page_size: u64 },
}

fn io_text(e: &std::io::Error) -> String {
    crate::errno::errno_text(e)
}

fn errno_text(e: &rustix::io::Errno) -> String {
    io_text(&std::io::Error::from(*e))
}

/// The host's base page size.
pub fn host_page_size() -> u64 {
    rustix::param::page_size() as u64
}

/// One RAM block: QEMU's `RAMBlock` (idstr, used length, page size, guest address).
#[derive(Debug)]
pub struct RamBlock {
    idstr: String,
    host: NonNull<u8>,
    len: u64,
    page_size: u64,
    gpa: u64,
    /// Whether every page is known to be zero: the block was created zero (a fresh
    /// anonymous mapping, or a file with no data) and nothing has written it since. A
    /// loader then need not touch pages that stay zero.
    pristine: std::sync::atomic::AtomicBool,
}

// SAFETY: the block owns a plain memory mapping that lives until drop; access goes
// through methods that copy in or out with raw pointers, and concurrent writers (guest,
// migration threads) write disjoint pages or tolerate racing contents by design.
unsafe impl Send for RamBlock {}
// SAFETY: as above; no method hands out a long-lived reference.
unsafe impl Sync for RamBlock {}

impl RamBlock {
    /// Anonymous private memory of `len` bytes.
    pub fn anonymous(idstr: &str, len: u64, gpa: u64) -> Result<Self, MemoryError> {
        let page_size = host_page_size();
        check_size(len, page_size)?;
        // SAFETY: a fresh anonymous mapping with no address hint cannot alias anything.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len as usize,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::NORESERVE,
            )
        }
        .map_err(|source| MemoryError::Map { len, source })?;
        Ok(Self::from_raw(idstr, ptr, len, page_size, gpa, true))
    }

    /// Memory backed by a file, shared (`MAP_SHARED`, other processes see the writes)
    /// or private. The file is created or extended to `len`.
    pub fn from_file(
        idstr: &str,
        path: &Path,
        len: u64,
        gpa: u64,
        shared: bool,
    ) -> Result<Self, MemoryError> {
        let page_size = host_page_size();
        check_size(len, page_size)?;
        let shown = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| MemoryError::Open {
                path: shown.clone(),
                source,
            })?;
        let cur = file
            .metadata()
            .map_err(|source| MemoryError::Open {
                path: shown.clone(),
                source,
            })?
            .len();
        if cur < len {
            file.set_len(len).map_err(|source| MemoryError::Resize {
                path: shown.clone(),
                len,
                source,
            })?;
        }
        let created_zero = matches!(
            rustix::fs::seek(&file, rustix::fs::SeekFrom::Data(0)),
            Err(rustix::io::Errno::NXIO)
        );
        let flags = if shared {
            rustix::mm::MapFlags::SHARED
        } else {
            rustix::mm::MapFlags::PRIVATE
        };
        // SAFETY: mapping a file we opened read-write, with no address hint; the mapping
        // stays valid after the descriptor is closed.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len as usize,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                flags,
                file.as_fd(),
                0,
            )
        }
        .map_err(|source| MemoryError::Map { len, source })?;
        Ok(Self::from_raw(
            idstr,
            ptr,
            len,
            page_size,
            gpa,
            created_zero,
        ))
    }

    fn from_raw(
        idstr: &str,
        ptr: *mut std::ffi::c_void,
        len: u64,
        page_size: u64,
        gpa: u64,
        created_zero: bool,
    ) -> Self {
        Self {
            idstr: idstr.to_string(),
            host: NonNull::new(ptr.cast()).expect("mmap returned null"),
            len,
            page_size,
            gpa,
            pristine: std::sync::atomic::AtomicBool::new(created_zero),
        }
    }

    pub fn idstr(&self) -> &str {
        &self.idstr
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn page_size(&self) -> u64 {
        self.page_size
    }
    pub fn pages(&self) -> usize {
        (self.len / self.page_size) as usize
    }
    pub fn gpa(&self) -> u64 {
        self.gpa
    }
    /// True while every page is known to be zero (see the field's comment).
    pub fn pristine(&self) -> bool {
        self.pristine.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records that something outside this type (a guest's vCPUs, a device model
    /// writing through [`RamBlock::ptr_at`]) may have written the block.
    pub fn note_external_writes(&self) {
        self.pristine
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    fn check(&self, offset: u64, len: usize) {
        assert!(
            offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= self.len),
            "guest memory access out of range"
        );
    }

    /// A raw pointer to `offset`, for I/O syscalls that read or write guest memory
    /// directly. The range `offset..offset+len` is checked.
    pub fn ptr_at(&self, offset: u64, len: usize) -> *mut u8 {
        self.check(offset, len);
        // SAFETY: offset + len is inside the mapping (checked above).
        unsafe { self.host.as_ptr().add(offset as usize) }
    }

    /// Calls `f` with a view of `len` bytes at `offset`. The bytes may change under the
    /// view while the guest runs; callers only copy or scan them.
    pub fn with_bytes<R>(&self, offset: u64, len: usize, f: impl FnOnce(&[u8]) -> R) -> R {
        let p = self.ptr_at(offset, len);
        // SAFETY: the range is inside the live mapping; the view does not outlive `f`.
        f(unsafe { std::slice::from_raw_parts(p, len) })
    }

    /// A view of guest memory that lives as long as the block borrow. The bytes may
    /// change under it while the guest runs; callers only copy or compress them, and a
    /// page changed meanwhile is dirty again and sent again.
    pub fn slice(&self, offset: u64, len: usize) -> &[u8] {
        let p = self.ptr_at(offset, len);
        // SAFETY: the range is inside the mapping, which lives as long as `self`.
        unsafe { std::slice::from_raw_parts(p, len) }
    }

    pub fn read(&self, offset: u64, out: &mut [u8]) {
        let p = self.ptr_at(offset, out.len());
        // SAFETY: the source range is inside the mapping and cannot overlap `out`, which
        // is a Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) }
    }

    pub fn write(&self, offset: u64, data: &[u8]) {
        self.note_external_writes();
        let p = self.ptr_at(offset, data.len());
        // SAFETY: the destination range is inside the mapping and cannot overlap `data`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) }
    }

    pub fn fill_zero(&self, offset: u64, len: usize) {
        self.note_external_writes();
        let p = self.ptr_at(offset, len);
        // SAFETY: the range is inside the mapping.
        unsafe { std::ptr::write_bytes(p, 0, len) }
    }

    /// Fills `len` bytes at `offset` with copies of `word` (native byte order): one
    /// store per word, how the `lab` machine's workload writes a whole page. `offset`
    /// and `len` must be multiples of 8.
    pub fn fill_u64(&self, offset: u64, len: usize, word: u64) {
        assert!(
            offset.is_multiple_of(8) && len.is_multiple_of(8),
            "fill_u64 needs 8-byte alignment"
        );
        let p = self.ptr_at(offset, len).cast::<u64>();
        for i in 0..len / 8 {
            // SAFETY: `offset..offset+len` is inside the mapping (checked by ptr_at), the
            // mapping is page aligned and `offset` a multiple of 8, so every word written
            // is in range and aligned; no Rust reference to guest memory is live.
            unsafe { p.add(i).write(word) }
        }
    }

    pub fn is_zero(&self, offset: u64, len: usize) -> bool {
        self.with_bytes(offset, len, buffer_is_zero)
    }

    /// Pre-faults a range for writing (`MADV_POPULATE_WRITE`); best effort.
    pub fn populate_write(&self, offset: u64, len: usize) {
        let p = self.ptr_at(offset, len);
        // SAFETY: advice on a range inside our own mapping; it does not change contents.
        let _ =
            unsafe { rustix::mm::madvise(p.cast(), len, rustix::mm::Advice::LinuxPopulateWrite) };
    }
}

impl Drop for RamBlock {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by this block with this length and nothing
        // borrows it past the block's life.
        let _ = unsafe { rustix::mm::munmap(self.host.as_ptr().cast(), self.len as usize) };
    }
}

/// A whole file mapped read-only, for tools that read migration files in place.
#[derive(Debug)]
pub struct MappedFile {
    ptr: *mut std::ffi::c_void,
    len: usize,
}

impl MappedFile {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len() as usize;
        if len == 0 {
            return Ok(Self {
                ptr: std::ptr::null_mut(),
                len: 0,
            });
        }
        // SAFETY: a private read-only mapping of a file we opened; nothing else in this
        // process maps it writable.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ,
                rustix::mm::MapFlags::PRIVATE,
                file.as_fd(),
                0,
            )
        }?;
        Ok(Self { ptr, len })
    }

    pub fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the mapping covers `len` readable bytes for the life of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.cast(), self.len) }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmapping our own mapping; `bytes()` borrows cannot outlive self.
            let _ = unsafe { rustix::mm::munmap(self.ptr, self.len) };
        }
    }
}

fn check_size(len: u64, page_size: u64) -> Result<(), MemoryError> {
    if len == 0 || !len.is_multiple_of(page_size) {
        return Err(MemoryError::BadSize { page_size });
    }
    Ok(())
}

/// Whether every byte is zero; scans in wide words so the compiler vectorises it.
pub fn buffer_is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().expect("8-byte chunk"));
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|b| *b == 0)
}

/// Maps a file path for checks in tests and tools.
pub fn path_display(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_scan() {
        let mut b = vec![0u8; 4096];
        assert!(buffer_is_zero(&b));
        b[4095] = 1;
        assert!(!buffer_is_zero(&b));
        b[4095] = 0;
        b[7] = 1;
        assert!(!buffer_is_zero(&b));
    }

    #[test]
    fn anonymous_block_reads_and_writes() {
        let ps = host_page_size();
        let b = RamBlock::anonymous("ram", 4 * ps, 0).unwrap();
        assert!(b.pristine());
        assert!(b.is_zero(0, (4 * ps) as usize));
        b.write(ps, b"hello");
        let mut out = [0u8; 5];
        b.read(ps, &mut out);
        assert_eq!(&out, b"hello");
        b.fill_zero(ps, ps as usize);
        assert!(b.is_zero(ps, ps as usize));
        b.fill_u64(2 * ps, ps as usize, 0x0102_0304_0506_0708);
        b.with_bytes(2 * ps, ps as usize, |v| {
            assert!(v
                .chunks(8)
                .all(|w| w == 0x0102_0304_0506_0708u64.to_ne_bytes()))
        });
        assert!(b.is_zero(3 * ps, ps as usize));
        assert!(RamBlock::anonymous("ram", ps + 1, 0).is_err());
    }

    #[test]
    fn file_block_knows_when_it_is_empty() {
        let dir = std::env::temp_dir().join(format!("vmigrate-mem-{}", std::process::id()));
        let ps = host_page_size();
        let _ = std::fs::remove_file(&dir);
        let b = RamBlock::from_file("m0", &dir, 2 * ps, 0, true).unwrap();
        assert!(b.pristine());
        b.write(0, b"x");
        assert!(!b.pristine());
        drop(b);
        let b = RamBlock::from_file("m0", &dir, 2 * ps, 0, true).unwrap();
        assert!(!b.pristine());
        let mut out = [0u8; 1];
        b.read(0, &mut out);
        assert_eq!(&out, b"x");
        let _ = std::fs::remove_file(&dir);
    }
}
