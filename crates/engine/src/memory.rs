//! Guest RAM blocks: a host mapping made once (anonymous, or a file), shared between the
//! guest, the VMM and the migration threads.
//!
//! The mappings are made and unmapped only here, and only here is guest memory read or
//! written: other modules name a range (block, offset, length) and say what to do with
//! it, and the methods below check the range and do it.
//!
//! - copy out or scan: [`RamBlock::read`], [`RamBlock::is_zero`];
//! - copy in or clear: [`RamBlock::write`], [`RamBlock::fill_zero`],
//!   [`RamBlock::fill_u64`], and for a loader, which tracks its own writes,
//!   [`RamBlock::load`] and [`RamBlock::load_zero`];
//! - move pages between guest memory and a descriptor with one syscall each, with no
//!   copy through a buffer: [`RamBlock::load_from_fd`] (`read`),
//!   [`RamBlock::load_pages_from_fd`] (`readv` into scattered pages),
//!   [`RamBlock::load_from_file_at`] (`pread`), [`RamBlock::save_to_file_at`] (`pwrite`)
//!   and [`write_gathered`] (`writev` of buffers and guest pages);
//! - fault in a run of pages about to be filled, with one call:
//!   [`RamBlock::populate_for_write`];
//! - hand pages to a compressor or decompressor in place: [`RamBlock::with_pages`] and
//!   [`RamBlock::with_pages_mut`], `unsafe` because they make Rust references into guest
//!   memory, as does [`RamBlock::with_bytes`].
//!
//! The mapping is valid for the life of the block; its contents may change at any time
//! (the guest writes while it runs). The safe methods therefore never make a Rust
//! reference into guest memory: they copy with raw pointers or let the kernel do the
//! access, and a page read while the guest writes it is simply sent again once the dirty
//! log reports it.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::ptr::NonNull;

use crate::uffd::{Placement, UffdError, Userfaultfd};

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
    /// What the mapping is made of.
    backing: Backing,
    file_writer: std::sync::Mutex<()>,
}

/// What backs a RAM block's mapping.
#[derive(Debug)]
pub enum Backing {
    Anonymous,
    File {
        /// Kept open so that discarded ranges can be punched out of it.
        file: std::fs::File,
        shared: bool,
        /// The filesystem's magic number (`statfs.f_type`).
        fs_type: u64,
    },
    /// A mapping the VMM made and owns (see [`RamBlock::from_external`]); the block
    /// keeps the VMM's handle to it alive and never unmaps it.
    External(ExternalMapping),
}

/// The VMM's handle that keeps an external mapping alive.
pub struct ExternalMapping(pub Box<dyn std::any::Any + Send + Sync>);

impl std::fmt::Debug for ExternalMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExternalMapping")
    }
}

/// Whether `MADV_POPULATE_WRITE` is worth asking for: cleared, for the life of the
/// process, the first time the kernel says it does not know it.
static POPULATE_WRITE_WORKS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(true);

/// As [`POPULATE_WRITE_WORKS`], for `MADV_POPULATE_READ`.
static POPULATE_READ_WORKS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(true);

/// `TMPFS_MAGIC` and `HUGETLBFS_MAGIC` of `<linux/magic.h>`.
const TMPFS_MAGIC: u64 = 0x0102_1994;
const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;

// SAFETY: the block owns a plain memory mapping that lives until drop; access goes
// through methods that copy in or out with raw pointers or hand the range to the kernel,
// and concurrent writers (guest, migration threads) write disjoint pages or tolerate
// racing contents by design.
unsafe impl Send for RamBlock {}
// SAFETY: as above; the only methods that make references into the mapping are `unsafe`
// and bound them to a closure call.
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
        Ok(Self::from_raw(
            idstr,
            ptr,
            len,
            page_size,
            gpa,
            true,
            Backing::Anonymous,
        ))
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
        let fs_type = rustix::fs::fstatfs(&file)
            .map(|s| s.f_type as u64)
            .unwrap_or(0);
        Ok(Self::from_raw(
            idstr,
            ptr,
            len,
            page_size,
            gpa,
            created_zero,
            Backing::File {
                file,
                shared,
                fs_type,
            },
        ))
    }

    /// A block over memory the VMM mapped itself (rust-vmm `vm-memory` regions, for
    /// one). `keep` is whatever keeps the mapping alive; the block holds it until it is
    /// dropped and does not unmap the memory itself.
    ///
    /// # Safety
    ///
    /// `host` must point to a readable and writable mapping of at least `len` bytes
    /// that stays mapped as long as `keep` lives, and that nothing else unmaps or
    /// remaps meanwhile.
    pub unsafe fn from_external(
        idstr: &str,
        host: *mut u8,
        len: u64,
        gpa: u64,
        keep: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<Self, MemoryError> {
        let page_size = host_page_size();
        check_size(len, page_size)?;
        if host.is_null() || !(host as u64).is_multiple_of(page_size) {
            return Err(MemoryError::BadSize { page_size });
        }
        Ok(Self::from_raw(
            idstr,
            host.cast(),
            len,
            page_size,
            gpa,
            false,
            Backing::External(ExternalMapping(keep)),
        ))
    }

    fn from_raw(
        idstr: &str,
        ptr: *mut std::ffi::c_void,
        len: u64,
        page_size: u64,
        gpa: u64,
        created_zero: bool,
        backing: Backing,
    ) -> Self {
        Self {
            idstr: idstr.to_string(),
            host: NonNull::new(ptr.cast()).expect("mmap returned null"),
            len,
            page_size,
            gpa,
            pristine: std::sync::atomic::AtomicBool::new(created_zero),
            backing,
            file_writer: std::sync::Mutex::new(()),
        }
    }

    /// What backs the mapping.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// QEMU's host check for a postcopy destination: a file-backed block must live on
    /// tmpfs or hugetlbfs, whose pages userfaultfd can place. The error is QEMU's text
    /// (after its `Postcopy is not supported: ` prefix).
    pub fn postcopy_host_check(&self) -> Result<(), String> {
        match &self.backing {
            Backing::Anonymous => Ok(()),
            Backing::File { fs_type, .. }
                if *fs_type == TMPFS_MAGIC || *fs_type == HUGETLBFS_MAGIC =>
            {
                Ok(())
            }
            Backing::File { .. } => {
                Err("Host backend files need to be TMPFS or HUGETLBFS only".into())
            }
            Backing::External(_) => {
                Err("Host memory mapped by the embedding VMM is not known to support it".into())
            }
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
    /// Whether x-ignore-shared leaves the block out of a migration: QEMU's rule is RAM
    /// mapped shared from a named file (a `memory-backend-file` with `share=on`), which a
    /// process on the same host can map again.
    pub fn is_shared_named_file(&self) -> bool {
        matches!(self.backing, Backing::File { shared: true, .. })
    }
    /// True while every page is known to be zero (see the field's comment).
    pub fn pristine(&self) -> bool {
        self.pristine.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records that something outside this type (a guest's vCPUs, a device model) may
    /// have written the block, or that a loader has filled pages with the `load_*`
    /// methods, which leave this to the loader.
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

    /// The host address of `offset`, after checking `offset..offset+len`. Only this
    /// module turns it into accesses.
    fn ptr_at(&self, offset: u64, len: usize) -> *mut u8 {
        self.check(offset, len);
        // SAFETY: offset + len is inside the mapping (checked above).
        unsafe { self.host.as_ptr().add(offset as usize) }
    }

    /// The mapping's host address, for kernel interfaces that take guest memory as an
    /// address range (KVM memory slots, userfaultfd). The kernel accesses the memory;
    /// this process does so only through the methods of this type.
    pub fn host_addr(&self) -> u64 {
        self.host.as_ptr() as u64
    }

    /// Copies `out.len()` bytes at `offset` out of guest memory.
    pub fn read(&self, offset: u64, out: &mut [u8]) {
        let p = self.ptr_at(offset, out.len());
        // SAFETY: the source range is inside the mapping and cannot overlap `out`, which
        // is a Rust buffer; no reference to guest memory is made.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) }
    }

    /// Copies `data` into guest memory at `offset`; the block is no longer pristine.
    pub fn write(&self, offset: u64, data: &[u8]) {
        self.note_external_writes();
        self.load(offset, data);
    }

    /// Zeroes `len` bytes at `offset`; the block is no longer pristine.
    pub fn fill_zero(&self, offset: u64, len: usize) {
        self.note_external_writes();
        self.load_zero(offset, len);
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

    /// Whether `len` bytes at `offset` are all zero. Scans in wide words through the
    /// pointer (no reference is made), so the compiler vectorises it as it does
    /// [`buffer_is_zero`].
    pub fn is_zero(&self, offset: u64, len: usize) -> bool {
        let p = self.ptr_at(offset, len);
        let mut at = 0;
        while at + 64 <= len {
            let mut acc = 0u64;
            for w in 0..8 {
                // SAFETY: `at + 8 * w + 8 <= len`, inside the range checked by ptr_at;
                // unaligned reads, so any offset works.
                acc |= unsafe { p.add(at + 8 * w).cast::<u64>().read_unaligned() };
            }
            if acc != 0 {
                return false;
            }
            at += 64;
        }
        // SAFETY: `at..len` is inside the checked range.
        (at..len).all(|i| unsafe { p.add(i).read() } == 0)
    }

    /// Pre-faults a range for writing (`MADV_POPULATE_WRITE`); best effort.
    pub fn populate_write(&self, offset: u64, len: usize) {
        self.populate_for_write(offset, len);
    }

    /// Maps `len` bytes at `offset` (whole pages) for reading with one
    /// `madvise(MADV_POPULATE_READ)`, before a saver reads them: one call instead of a
    /// fault per page (or per few pages), which is most of a saver's CPU when its RAM was
    /// not mapped in yet. Best effort, as [`Self::populate_for_write`]: a kernel without
    /// it is asked once, and on any failure the pages fault in when read.
    pub fn populate_for_read(&self, offset: u64, len: usize) -> bool {
        use std::sync::atomic::Ordering;
        let p = self.ptr_at(offset, len);
        if len == 0 || !POPULATE_READ_WORKS.load(Ordering::Relaxed) {
            return false;
        }
        // SAFETY: advice on a range inside our own mapping (checked by ptr_at); it maps
        // the pages for reading and changes nothing they read.
        match unsafe { rustix::mm::madvise(p.cast(), len, rustix::mm::Advice::LinuxPopulateRead) } {
            Ok(()) => true,
            Err(rustix::io::Errno::INVAL) => {
                POPULATE_READ_WORKS.store(false, Ordering::Relaxed);
                false
            }
            Err(_) => false,
        }
    }

    /// Faults in `len` bytes at `offset` (whole pages) for writing with one
    /// `madvise(MADV_POPULATE_WRITE)`, before a loader writes them: one call instead of
    /// a fault per page, for pages about to be filled anyway. Only the pages named are
    /// touched, so pages that stay zero stay unallocated. Best effort: on a kernel
    /// without it (before Linux 5.14, `EINVAL`) no later call tries again, and on any
    /// failure the pages simply fault in when written. Says whether the range was
    /// populated.
    pub fn populate_for_write(&self, offset: u64, len: usize) -> bool {
        use std::sync::atomic::Ordering;
        let p = self.ptr_at(offset, len);
        if len == 0 || !POPULATE_WRITE_WORKS.load(Ordering::Relaxed) {
            return false;
        }
        debug_assert!(
            offset.is_multiple_of(self.page_size),
            "populate from a page start"
        );
        // SAFETY: advice on a range inside our own mapping (checked by ptr_at); it
        // allocates the pages but does not change what they read.
        match unsafe { rustix::mm::madvise(p.cast(), len, rustix::mm::Advice::LinuxPopulateWrite) }
        {
            Ok(()) => true,
            Err(rustix::io::Errno::INVAL) => {
                POPULATE_WRITE_WORKS.store(false, Ordering::Relaxed);
                false
            }
            Err(_) => false,
        }
    }

    /// Which of the pages of `len` bytes at `offset` are resident (`mincore(2)`), for
    /// checks that a load left pages it had no data for untouched.
    pub fn resident_pages(&self, offset: u64, len: usize) -> std::io::Result<Vec<bool>> {
        let p = self.ptr_at(offset, len);
        let host_page = host_page_size() as usize;
        let mut vec = vec![0u8; len.div_ceil(host_page)];
        // SAFETY: the range is inside our own mapping; the kernel writes one byte per
        // host page of it into `vec`, which has exactly that many.
        let r = unsafe { libc::mincore(p.cast(), len, vec.as_mut_ptr()) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(vec.into_iter().map(|v| v & 1 != 0).collect())
    }

    /// Asks for base pages only (`MADV_NOHUGEPAGE`), so that write tracking reports
    /// single pages rather than a huge page; best effort.
    pub fn no_huge_pages(&self) {
        let p = self.ptr_at(0, self.len as usize);
        // SAFETY: advice on our own whole mapping; it does not change contents.
        let _ = unsafe {
            rustix::mm::madvise(
                p.cast(),
                self.len as usize,
                rustix::mm::Advice::LinuxNoHugepage,
            )
        };
    }

    /// Calls `f` with a view of `len` bytes at `offset`.
    ///
    /// # Safety
    ///
    /// Nothing may write the range while `f` runs: a guest's vCPUs must be stopped, or
    /// the caller must be the only writer of these pages (a vCPU thread of the `lab`
    /// workload reading back its own pages).
    pub unsafe fn with_bytes<R>(&self, offset: u64, len: usize, f: impl FnOnce(&[u8]) -> R) -> R {
        let p = self.ptr_at(offset, len);
        // SAFETY: the range is inside the live mapping; the view does not outlive `f`,
        // and the caller guarantees that no one writes it meanwhile.
        f(unsafe { std::slice::from_raw_parts(p, len) })
    }

    /// Calls `f` with a view of the `len` bytes at `offset` while the guest may write
    /// them.
    ///
    /// # Safety
    ///
    /// The race is accepted because a page changed meanwhile is dirty again and sent
    /// again. `f` must give a valid result whatever it reads, even when two reads of the
    /// same byte disagree, and must not keep what it read as the page's contents except
    /// by copying it out once (an encoder whose output is well formed by construction).
    pub unsafe fn with_live_bytes<R>(
        &self,
        offset: u64,
        len: usize,
        f: impl FnOnce(&[u8]) -> R,
    ) -> R {
        let p = self.ptr_at(offset, len);
        // SAFETY: inside the live mapping; the view lives only for `f`, under the
        // caller's contract.
        f(unsafe { std::slice::from_raw_parts(p, len) })
    }

    /// Calls `f` with views of the pages of `page_len` bytes at `offsets`, in order, to
    /// compress them in place.
    ///
    /// # Safety
    ///
    /// The guest may write these pages while the views live; the race is accepted
    /// because a page changed meanwhile is dirty again and sent again. `f` must
    /// therefore only read the views once through (copy, hash or compress them) and never
    /// rely on two reads of the same bytes agreeing.
    pub unsafe fn with_pages<R>(
        &self,
        offsets: &[u64],
        page_len: usize,
        f: impl FnOnce(&[&[u8]]) -> R,
    ) -> R {
        let pages: Vec<&[u8]> = offsets
            .iter()
            .map(|&o| {
                let p = self.ptr_at(o, page_len);
                // SAFETY: inside the live mapping; the views live only for `f`, under the
                // caller's contract.
                unsafe { std::slice::from_raw_parts(p, page_len) }
            })
            .collect();
        f(&pages)
    }

    // Loading. These methods fill pages without ending the block's pristine state: a
    // loader tracks the pages it filled (a zero page need only be cleared if the load
    // wrote it) and calls `note_external_writes` once it is done.

    /// Copies `data` into guest memory at `offset`.
    pub fn load(&self, offset: u64, data: &[u8]) {
        let p = self.ptr_at(offset, data.len());
        // SAFETY: the destination range is inside the mapping and cannot overlap `data`,
        // a Rust buffer; no reference to guest memory is made.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) }
    }

    /// Whether [`Self::load_pages`] writes through the block's file: shared memory on
    /// tmpfs. A `pwrite` there allocates each page without clearing it first (the data
    /// covers it) and without a page fault or a page-table entry per page, where a copy
    /// through the mapping pays all three; the pages are the same, and the guest (or
    /// another process mapping the file) maps them when it first touches them.
    pub fn loads_through_file(&self) -> bool {
        self.load_file().is_some()
    }

    /// Whether a load should go through the file now: it can, and no other thread is
    /// writing through it. The kernel lets one write into a file at a time; a loader
    /// thread that finds it taken fills its pages through the mapping instead, in
    /// parallel, rather than wait.
    pub fn file_load_free(&self) -> bool {
        self.loads_through_file() && self.file_writer.try_lock().is_ok()
    }

    fn load_file(&self) -> Option<&std::fs::File> {
        match &self.backing {
            Backing::File {
                file,
                shared: true,
                fs_type,
            } if *fs_type == TMPFS_MAGIC => Some(file),
            _ => None,
        }
    }

    /// Puts `data`, the pages of `page_len` bytes at `offsets` in order, into guest
    /// memory: through the file, one `pwrite` per run of consecutive pages, when
    /// [`Self::loads_through_file`], else by copying through the mapping. A file that
    /// cannot take them (tmpfs full) is an error here, where a write through the
    /// mapping would be a `SIGBUS`.
    pub fn load_pages(&self, offsets: &[u64], page_len: usize, data: &[u8]) -> std::io::Result<()> {
        assert_eq!(
            data.len(),
            offsets.len() * page_len,
            "one page of data per offset"
        );
        let Some(file) = self.load_file() else {
            for (o, page) in offsets.iter().zip(data.chunks_exact(page_len)) {
                self.load(*o, page);
            }
            return Ok(());
        };
        let mut i = 0;
        while i < offsets.len() {
            let start = offsets[i];
            let run = offsets[i..]
                .iter()
                .zip(0u64..)
                .take_while(|&(&o, k)| o == start + k * page_len as u64)
                .count();
            write_run(self, file, start, &data[i * page_len..(i + run) * page_len])?;
            i += run;
        }
        Ok(())
    }

    /// Writes `parts`, one after another, into the block's file at `offset` with one
    /// `pwritev` (more if the kernel takes less), for a block that
    /// [loads through its file](Self::loads_through_file); pages that follow each other
    /// in memory, from wherever their bytes lie.
    pub fn load_gathered(&self, offset: u64, parts: &[&[u8]]) -> std::io::Result<()> {
        let file = self.load_file().ok_or(std::io::ErrorKind::Unsupported)?;
        let total: usize = parts.iter().map(|p| p.len()).sum();
        self.check(offset, total);
        let mut slices: Vec<std::io::IoSlice<'_>> =
            parts.iter().map(|p| std::io::IoSlice::new(p)).collect();
        let mut rest = &mut slices[..];
        let mut at = offset;
        let _one = self.file_writer.lock().unwrap_or_else(|e| e.into_inner());
        while !rest.is_empty() {
            match rustix::io::pwritev(file, rest, at) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    at += n as u64;
                    std::io::IoSlice::advance_slices(&mut rest, n);
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Puts `data` into guest memory at `offset`, as [`Self::load_pages`] does.
    pub fn load_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        match self.load_file() {
            Some(file) => write_run(self, file, offset, data),
            None => {
                self.load(offset, data);
                Ok(())
            }
        }
    }

    /// Zeroes `len` bytes at `offset`.
    pub fn load_zero(&self, offset: u64, len: usize) {
        let p = self.ptr_at(offset, len);
        // SAFETY: the range is inside the mapping; no reference to guest memory is made.
        unsafe { std::ptr::write_bytes(p, 0, len) }
    }

    /// One `read(2)` from `fd` into `len` bytes at `offset`: the bytes read.
    pub fn load_from_fd(
        &self,
        fd: impl AsFd,
        offset: u64,
        len: usize,
    ) -> rustix::io::Result<usize> {
        let p = self.ptr_at(offset, len);
        // SAFETY: the kernel writes at most `len` bytes at `p`, inside the mapping.
        let n = unsafe { libc::read(fd.as_fd().as_raw_fd(), p.cast(), len) };
        syscall_result(n)
    }

    /// One `readv(2)` from `fd` into the pages of `page_len` bytes at `offsets`, in
    /// order, the first from byte `skip` on: the bytes read. This is how multifd pages
    /// go from the socket into guest memory without a copy.
    pub fn load_pages_from_fd(
        &self,
        fd: impl AsFd,
        offsets: &[u64],
        page_len: usize,
        skip: usize,
    ) -> rustix::io::Result<usize> {
        assert!(
            skip < page_len || offsets.is_empty(),
            "skip past the first page"
        );
        // Pages that follow each other in memory share one iovec: fewer for the kernel
        // to import on every call and to walk while it copies.
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(offsets.len());
        let mut next: Option<u64> = None;
        for (i, &o) in offsets.iter().enumerate() {
            let skip = if i == 0 { skip } else { 0 };
            let p = self.ptr_at(o, page_len);
            match iov.last_mut() {
                Some(last) if next == Some(o) => last.iov_len += page_len,
                _ => iov.push(libc::iovec {
                    // SAFETY: `skip < page_len`, so the address is inside the page.
                    iov_base: unsafe { p.add(skip) }.cast(),
                    iov_len: page_len - skip,
                }),
            }
            next = Some(o + page_len as u64);
        }
        // SAFETY: every iovec is a range inside the mapping; the kernel writes only
        // there. Pages listed twice are written twice, harmlessly: no Rust reference to
        // them exists.
        let n = unsafe { libc::readv(fd.as_fd().as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        syscall_result(n)
    }

    /// One `pread(2)` from `fd` at `file_offset` into `len` bytes at `offset`: the bytes
    /// read (mapped-ram).
    pub fn load_from_file_at(
        &self,
        fd: impl AsFd,
        offset: u64,
        len: usize,
        file_offset: u64,
    ) -> rustix::io::Result<usize> {
        let p = self.ptr_at(offset, len);
        // SAFETY: the kernel writes at most `len` bytes at `p`, inside the mapping.
        let n = unsafe {
            libc::pread(
                fd.as_fd().as_raw_fd(),
                p.cast(),
                len,
                file_offset as libc::off_t,
            )
        };
        syscall_result(n)
    }

    /// Calls `f` with writable views of the pages of `page_len` bytes at `offsets`, in
    /// order, to decompress into them in place.
    ///
    /// # Safety
    ///
    /// `offsets` must be distinct, and nothing else may read or write these pages while
    /// `f` runs (a destination's guest is not running while it loads them).
    pub unsafe fn with_pages_mut<R>(
        &self,
        offsets: &[u64],
        page_len: usize,
        f: impl FnOnce(&mut [&mut [u8]]) -> R,
    ) -> R {
        let mut pages: Vec<&mut [u8]> = offsets
            .iter()
            .map(|&o| {
                let p = self.ptr_at(o, page_len);
                // SAFETY: inside the live mapping; the pages are distinct and not accessed
                // elsewhere during `f` (the caller's contract), so the views do not alias.
                unsafe { std::slice::from_raw_parts_mut(p, page_len) }
            })
            .collect();
        f(&mut pages)
    }

    // Postcopy: pages are dropped, then placed atomically through a userfaultfd.

    /// Drops `len` bytes at `offset` (whole pages) so that they read as missing: the
    /// next access faults (`MADV_DONTNEED`, and for a shared file a punched hole).
    pub fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let p = self.ptr_at(offset, len as usize);
        if !offset.is_multiple_of(self.page_size) || !len.is_multiple_of(self.page_size) {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        if let Backing::File {
            file, shared: true, ..
        } = &self.backing
        {
            rustix::fs::fallocate(
                file,
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                offset,
                len,
            )?;
        }
        // SAFETY: advice on a range inside our own mapping; dropping pages changes
        // contents only as a discard means to (they read as missing or zero).
        unsafe { rustix::mm::madvise(p.cast(), len as usize, rustix::mm::Advice::LinuxDontNeed) }?;
        self.note_external_writes();
        Ok(())
    }

    /// The postcopy source with `release-ram`: frees `len` bytes at `offset` (whole
    /// pages) that were sent and will never be read again, as [`Self::discard`] does
    /// (`MADV_DONTNEED`; a punched hole, `KEEP_SIZE`, in a shared file). Anonymous RAM
    /// and a shared file's pages read as zero afterwards.
    pub fn release(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.discard(offset, len)
    }

    /// Registers the whole block with `uffd` for MISSING faults.
    pub fn register_missing(&self, uffd: &Userfaultfd) -> Result<(), UffdError> {
        uffd.register_missing(self.host_addr(), self.len)
    }

    /// Unregisters the whole block from `uffd`, waking any thread waiting on it.
    pub fn unregister_missing(&self, uffd: &Userfaultfd) -> Result<(), UffdError> {
        uffd.unregister(self.host_addr(), self.len)
    }

    /// Wakes threads waiting on the page at `offset` (placed meanwhile).
    pub fn wake_page(&self, uffd: &Userfaultfd, offset: u64) -> Result<(), UffdError> {
        let p = self.ptr_at(offset, self.page_size as usize);
        uffd.wake(p as u64, self.page_size)
    }

    /// Places `data` (one page) at `offset` atomically: a thread waiting on the page
    /// sees all of it or none. `AlreadyPresent` when the page was there already.
    pub fn place_page(
        &self,
        uffd: &Userfaultfd,
        offset: u64,
        data: &[u8],
    ) -> Result<Placement, UffdError> {
        assert_eq!(
            data.len() as u64,
            self.page_size,
            "place_page takes one page"
        );
        assert!(offset.is_multiple_of(self.page_size), "unaligned page");
        let p = self.ptr_at(offset, data.len());
        // SAFETY: `p..p+len` is one page inside this block's live mapping (checked
        // above), registered with `uffd` by `register_missing`; `data` is a Rust buffer
        // of that length. The kernel writes the page only if it is missing.
        unsafe { uffd.copy(p as u64, data.as_ptr(), self.page_size) }
    }

    /// Places a zero page at `offset` atomically (`UFFDIO_ZEROPAGE`, or a copy of
    /// zeroes where the memory kind has no zero page).
    pub fn place_zero_page(&self, uffd: &Userfaultfd, offset: u64) -> Result<Placement, UffdError> {
        assert!(offset.is_multiple_of(self.page_size), "unaligned page");
        let p = self.ptr_at(offset, self.page_size as usize);
        // SAFETY: as in `place_page`, for the one page at `p`.
        match unsafe { uffd.zeropage(p as u64, self.page_size) } {
            Err(UffdError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                let zeroes = vec![0u8; self.page_size as usize];
                self.place_page(uffd, offset, &zeroes)
            }
            other => other,
        }
    }

    // Saving straight from guest memory.

    /// One `pwrite(2)` of `len` bytes at `offset` to `fd` at `file_offset`: the bytes
    /// written (mapped-ram).
    pub fn save_to_file_at(
        &self,
        fd: impl AsFd,
        offset: u64,
        len: usize,
        file_offset: u64,
    ) -> rustix::io::Result<usize> {
        let p = self.ptr_at(offset, len);
        // SAFETY: the kernel reads at most `len` bytes at `p`, inside the mapping.
        let n = unsafe {
            libc::pwrite(
                fd.as_fd().as_raw_fd(),
                p.cast(),
                len,
                file_offset as libc::off_t,
            )
        };
        syscall_result(n)
    }
}

/// A piece of a gathered write: bytes of the VMM's own, or a run of guest memory.
#[derive(Debug, Clone, Copy)]
pub enum GatherPart<'a> {
    Bytes(&'a [u8]),
    Guest {
        block: &'a RamBlock,
        offset: u64,
        len: usize,
    },
}

impl GatherPart<'_> {
    fn len(&self) -> usize {
        match self {
            GatherPart::Bytes(b) => b.len(),
            GatherPart::Guest { len, .. } => *len,
        }
    }
}

/// One `writev(2)` of `parts` to `fd`, leaving out their first `skip` bytes (what
/// earlier calls wrote): the bytes written. Guest pages go to the socket without a copy.
pub fn write_gathered(
    fd: impl AsFd,
    parts: &[GatherPart<'_>],
    mut skip: usize,
) -> rustix::io::Result<usize> {
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(parts.len());
    for part in parts {
        let len = part.len();
        if skip >= len {
            skip -= len;
            continue;
        }
        let base: *const u8 = match *part {
            GatherPart::Bytes(b) => b.as_ptr(),
            GatherPart::Guest { block, offset, len } => block.ptr_at(offset, len),
        };
        iov.push(libc::iovec {
            // SAFETY: `skip < len`, so the address is inside the part.
            iov_base: unsafe { base.add(skip) }.cast_mut().cast(),
            iov_len: len - skip,
        });
        skip = 0;
    }
    if iov.is_empty() {
        return Ok(0);
    }
    // SAFETY: every iovec is a live Rust buffer borrowed for this call or a range inside
    // a guest mapping (checked by ptr_at); the kernel only reads them.
    let n = unsafe { libc::writev(fd.as_fd().as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
    syscall_result(n)
}

/// A byte count from a `read`/`write` family call, or its errno.
fn syscall_result(n: isize) -> rustix::io::Result<usize> {
    if n < 0 {
        Err(
            rustix::io::Errno::from_io_error(&std::io::Error::last_os_error())
                .unwrap_or(rustix::io::Errno::IO),
        )
    } else {
        Ok(n as usize)
    }
}

impl Drop for RamBlock {
    fn drop(&mut self) {
        if matches!(self.backing, Backing::External(_)) {
            // The VMM's mapping: its handle, dropped with the block, unmaps it.
            return;
        }
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

/// One write of `data` into `block`'s `file` at `offset`, one writer at a time (see
/// [`RamBlock::file_load_free`]).
fn write_run(
    block: &RamBlock,
    file: &std::fs::File,
    offset: u64,
    data: &[u8],
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    block.check(offset, data.len());
    let _one = block.file_writer.lock().unwrap_or_else(|e| e.into_inner());
    file.write_all_at(data, offset)
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
    use std::os::unix::fs::MetadataExt;

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
        let mut page = vec![0u8; ps as usize];
        b.read(2 * ps, &mut page);
        assert!(page
            .chunks(8)
            .all(|w| w == 0x0102_0304_0506_0708u64.to_ne_bytes()));
        assert!(b.is_zero(3 * ps, ps as usize));
        assert!(RamBlock::anonymous("ram", ps + 1, 0).is_err());
    }

    #[test]
    fn runs_go_to_a_file_and_back_without_ending_pristine() {
        let ps = host_page_size();
        let src = RamBlock::anonymous("ram", 2 * ps, 0).unwrap();
        src.fill_u64(ps, ps as usize, 0x1122_3344_5566_7788);
        let path = std::env::temp_dir().join(format!("vmigrate-mem-io-{}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            src.save_to_file_at(&file, ps, ps as usize, 100).unwrap(),
            ps as usize
        );
        let dst = RamBlock::anonymous("ram", 2 * ps, 0).unwrap();
        assert_eq!(
            dst.load_from_file_at(&file, 0, ps as usize, 100).unwrap(),
            ps as usize
        );
        assert!(dst.pristine(), "a loader's write ended pristine");
        let (mut a, mut b) = (vec![0u8; ps as usize], vec![0u8; ps as usize]);
        src.read(ps, &mut a);
        dst.read(0, &mut b);
        assert_eq!(a, b);
        assert!(dst.is_zero(ps, ps as usize));
    }

    #[test]
    fn gathered_writes_and_scattered_reads_resume_where_they_stopped() {
        let ps = host_page_size() as usize;
        let src = RamBlock::anonymous("ram", 2 * ps as u64, 0).unwrap();
        src.write(ps as u64, &vec![7u8; ps]);
        let (w, r) = std::os::unix::net::UnixStream::pair().unwrap();
        let parts = [
            GatherPart::Bytes(b"xy"),
            GatherPart::Guest {
                block: &src,
                offset: ps as u64,
                len: ps,
            },
            GatherPart::Bytes(&[9u8; 8]),
        ];
        // The first two bytes count as written by an earlier call.
        assert_eq!(write_gathered(&w, &parts, 2).unwrap(), ps + 8);
        let dst = RamBlock::anonymous("ram", 4 * ps as u64, 0).unwrap();
        let offsets = [3 * ps as u64, 0];
        let mut got = 0;
        while got < ps + 8 {
            got += dst
                .load_pages_from_fd(&r, &offsets[got / ps..], ps, got % ps)
                .unwrap();
        }
        let mut page = vec![0u8; ps];
        dst.read(3 * ps as u64, &mut page);
        assert_eq!(page, vec![7u8; ps]);
        dst.read(0, &mut page);
        assert_eq!(&page[..9], &[9, 9, 9, 9, 9, 9, 9, 9, 0]);
        assert!(dst.is_zero(ps as u64, 2 * ps));
    }

    #[test]
    fn contiguous_pages_are_read_in_one_piece_and_resume_mid_page() {
        let ps = host_page_size() as usize;
        let (w, r) = std::os::unix::net::UnixStream::pair().unwrap();
        let data: Vec<u8> = (0..3 * ps).map(|i| (i % 251) as u8 + 1).collect();
        let dst = RamBlock::anonymous("ram", 8 * ps as u64, 0).unwrap();
        // Pages 4 and 5 share an iovec, page 1 has its own; the data comes in two parts,
        // so the second read resumes 100 bytes into page 5.
        let offsets = [4 * ps as u64, 5 * ps as u64, ps as u64];
        std::io::Write::write_all(&mut &w, &data[..ps + 100]).unwrap();
        assert_eq!(
            dst.load_pages_from_fd(&r, &offsets, ps, 0).unwrap(),
            ps + 100
        );
        std::io::Write::write_all(&mut &w, &data[ps + 100..]).unwrap();
        assert_eq!(
            dst.load_pages_from_fd(&r, &offsets[1..], ps, 100).unwrap(),
            2 * ps - 100
        );
        let mut page = vec![0u8; ps];
        for (i, &o) in offsets.iter().enumerate() {
            dst.read(o, &mut page);
            assert_eq!(page, data[i * ps..(i + 1) * ps], "page at {o}");
        }
        assert!(dst.is_zero(0, ps) && dst.is_zero(2 * ps as u64, 2 * ps));
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

    /// Pages loaded through a shared tmpfs file read back through the mapping, only
    /// the pages written are allocated, and the block stays pristine for the loader.
    #[test]
    fn pages_load_through_a_tmpfs_file_by_the_run() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            println!("skipped: no /dev/shm");
            return;
        }
        let path = shm.join(format!("vmigrate-load-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let ps = host_page_size();
        let b = RamBlock::from_file("m0", &path, 16 * ps, 0, true).unwrap();
        assert!(b.loads_through_file(), "a shared file on /dev/shm is tmpfs");
        // Runs 2-4 and 9, and page 7 listed twice (the second copy wins).
        let offsets: Vec<u64> = [2, 3, 4, 9, 7, 7].iter().map(|p| p * ps).collect();
        let data: Vec<u8> = (0..offsets.len())
            .flat_map(|i| vec![i as u8 + 1; ps as usize])
            .collect();
        assert!(b.file_load_free());
        b.load_pages(&offsets, ps as usize, &data).unwrap();
        // (Before any read: a read through a shared mapping allocates a hole's page.)
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert_eq!(allocated, 5 * ps, "only the 5 pages written are allocated");
        let mut page = vec![0u8; ps as usize];
        for (p, want) in [(2, 1), (3, 2), (4, 3), (9, 4), (7, 6), (0, 0), (5, 0)] {
            b.read(p * ps, &mut page);
            assert!(page.iter().all(|&x| x == want), "page {p}");
        }
        assert!(b.pristine(), "a load tracks its own writes");
        b.load_at(12 * ps, &vec![9; 2 * ps as usize]).unwrap();
        b.read(13 * ps, &mut page);
        assert!(page.iter().all(|&x| x == 9));
        // Past the end of the block: refused before anything is written.
        let past = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            b.load_at(15 * ps, &vec![1; 2 * ps as usize])
        }));
        assert!(past.is_err());
        drop(b);
        let _ = std::fs::remove_file(&path);
        // Anonymous memory takes the same call through its mapping.
        let a = RamBlock::anonymous("ram", 4 * ps, 0).unwrap();
        assert!(!a.loads_through_file() && !a.file_load_free());
        a.load_pages(&[ps, 3 * ps], ps as usize, &data[..2 * ps as usize])
            .unwrap();
        a.read(3 * ps, &mut page);
        assert!(page.iter().all(|&x| x == 2));
    }
}
