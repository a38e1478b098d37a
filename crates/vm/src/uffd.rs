//! Dirty tracking by the kernel for `soft` guests: userfaultfd asynchronous
//! write-protection, read and re-armed with the `PAGEMAP_SCAN` ioctl of
//! `/proc/self/pagemap` (Linux 6.7).
//!
//! - `UFFDIO_API` with `UFFD_FEATURE_WP_ASYNC`: a write to a write-protected page of a
//!   range registered with `UFFDIO_REGISTER_MODE_WP` is resolved by the kernel itself.
//!   It drops the protection and lets the write go on: no message to read, no thread to
//!   wake. `UFFD_FEATURE_WP_UNPOPULATED` extends protection to pages never faulted in
//!   (the kernel leaves a marker in their page table entry), so a first write to them
//!   is seen too; `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` allows it for shared memory files.
//! - `UFFDIO_WRITEPROTECT` arms (or disarms) the whole block.
//! - `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING` returns the ranges whose pages are
//!   `PAGE_IS_WRITTEN` (not write-protected) and protects them again in the same walk,
//!   under the page table lock: a write lands either before, and this scan reports it,
//!   or after, and faults, and the next scan reports it. The caller's buffer holds a
//!   bounded number of ranges; the kernel says where it stopped (`walk_end`) and the
//!   scan goes on from there.
//!
//! Page life cycle while armed: protected ─write→ written ─scan→ protected.
//!
//! The writes the VMM itself makes still go to an [`AtomicDirtyLog`], ORed into every
//! sync, which also takes the pages a failed send puts back.
//!
//! The C headers of many hosts lack part of this ABI, so it is spelled out here from
//! the kernel's `<linux/userfaultfd.h>` and `<linux/fs.h>`. Every unsafe block of the
//! tracker is in this file.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use vmigrate_engine::uffd::abi::{
    self, ioc, UffdioApi, UffdioRange, UffdioRegister, IOC_READ_WRITE, UFFDIO, UFFDIO_API,
    UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFD_API,
};
use vmigrate_engine::{DirtyBitmap, DirtyTracker, RamBlock, VmmError};

use crate::dirty::AtomicDirtyLog;

/// `UFFD_FEATURE_*` bits of `uffdio_api.features`.
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

/// The features this tracker needs, with the names an error shows.
const FEATURE_NAMES: [(u64, &str); 3] = [
    (UFFD_FEATURE_WP_ASYNC, "UFFD_FEATURE_WP_ASYNC"),
    (UFFD_FEATURE_WP_UNPOPULATED, "UFFD_FEATURE_WP_UNPOPULATED"),
    (
        UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
        "UFFD_FEATURE_WP_HUGETLBFS_SHMEM",
    ),
];

/// `UFFDIO_REGISTER_MODE_WP`.
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`: protect (without it: unprotect).
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `_UFFDIO_WRITEPROTECT`, the bit of `uffdio_register.ioctls` that says the range can
/// be write-protected.
const UFFDIO_WRITEPROTECT_NR: u32 = 0x06;

/// `PM_SCAN_*` flags of `pm_scan_arg.flags`.
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// `PAGE_IS_WRITTEN`: written since it was last write-protected.
const PAGE_IS_WRITTEN: u64 = 1 << 1;

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    /// Where the walk stopped (written by the kernel); `end` when it finished.
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`: pages `start..end` (addresses) share `categories`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

const UFFDIO_WRITEPROTECT: libc::Ioctl = ioc(
    IOC_READ_WRITE,
    UFFDIO,
    UFFDIO_WRITEPROTECT_NR,
    std::mem::size_of::<UffdioWriteprotect>(),
);
/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::Ioctl = ioc(IOC_READ_WRITE, b'f', 16, std::mem::size_of::<PmScanArg>());

/// Ranges one `PAGEMAP_SCAN` call may return (24 KiB); a sync with more goes on
/// where the kernel stopped.
const SCAN_REGIONS: usize = 1024;

/// Errors setting up or driving userfaultfd write-protection.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error(
        "--dirty-tracking uffd-wp needs userfaultfd, which this kernel refuses (the \
         userfaultfd system call: {syscall}; /dev/userfaultfd: {device})"
    )]
    Open {
        syscall: std::io::Error,
        device: std::io::Error,
    },
    #[error("--dirty-tracking uffd-wp needs {0}, which this kernel's userfaultfd lacks")]
    Features(String),
    #[error("userfaultfd refused to {what}: {source}")]
    Ioctl {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("userfaultfd cannot write-protect this kind of guest RAM")]
    NotProtectable,
    #[error("cannot open /proc/self/pagemap: {0}")]
    Pagemap(std::io::Error),
    #[error(
        "--dirty-tracking uffd-wp needs the PAGEMAP_SCAN ioctl (Linux 6.7), which this \
         kernel lacks"
    )]
    NoPagemapScan,
    #[error("PAGEMAP_SCAN failed: {0}")]
    Scan(std::io::Error),
    #[error("PAGEMAP_SCAN stopped at {walk_end:#x} without progress (range {start:#x}..{end:#x})")]
    Stalled { start: u64, end: u64, walk_end: u64 },
}

fn uffd_ioctl(what: &'static str) -> impl FnOnce(std::io::Error) -> UffdError {
    move |source| UffdError::Ioctl { what, source }
}

/// A userfaultfd with asynchronous write-protection on, and the pagemap file that
/// scans and re-protects the ranges registered with it.
#[derive(Debug)]
struct AsyncWriteProtect {
    uffd: OwnedFd,
    pagemap: File,
}

impl AsyncWriteProtect {
    /// Opens a userfaultfd with the features asynchronous tracking needs; `shared`
    /// memory (a shared file mapping) needs `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` too. A
    /// kernel that lacks a feature is an error naming it.
    fn open(shared: bool) -> Result<Self, UffdError> {
        let mut wanted = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
        if shared {
            wanted |= UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        }
        // The handshake can be made once per descriptor: ask a first one what the
        // kernel offers, so that a refusal can name what is missing.
        let offered = api_handshake(&new_userfaultfd()?, 0)?;
        let missing: Vec<&str> = FEATURE_NAMES
            .iter()
            .filter(|(bit, _)| wanted & bit != 0 && offered & bit == 0)
            .map(|&(_, name)| name)
            .collect();
        if !missing.is_empty() {
            return Err(UffdError::Features(missing.join(" and ")));
        }
        let uffd = new_userfaultfd()?;
        api_handshake(&uffd, wanted)?;
        let pagemap = File::open("/proc/self/pagemap").map_err(UffdError::Pagemap)?;
        Ok(Self { uffd, pagemap })
    }

    /// Registers `start..start+len` for write-protection tracking.
    fn register(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: `uffd` is a userfaultfd after its handshake and `reg` the struct this
        // request encodes, live across the call. Registering changes no memory: with
        // asynchronous write-protection a fault in the range never waits for us.
        let ret = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) };
        if ret < 0 {
            return Err(uffd_ioctl("register guest RAM")(
                std::io::Error::last_os_error(),
            ));
        }
        if reg.ioctls & (1 << UFFDIO_WRITEPROTECT_NR) == 0 {
            let _ = self.unregister(start, len);
            return Err(UffdError::NotProtectable);
        }
        Ok(())
    }

    fn unregister(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let range = UffdioRange { start, len };
        // SAFETY: as in `register`; the kernel only reads `range`.
        let ret = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_UNREGISTER, &range) };
        if ret < 0 {
            return Err(uffd_ioctl("unregister guest RAM")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Write-protects (`protect`) or unprotects a registered range.
    fn write_protect(&self, start: u64, len: u64, protect: bool) -> Result<(), UffdError> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        // SAFETY: as in `register`; protection changes page table bits, never memory
        // contents, and a later write to a protected page is resolved by the kernel.
        let ret = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp) };
        if ret < 0 {
            return Err(uffd_ioctl(if protect {
                "write-protect guest RAM"
            } else {
                "unprotect guest RAM"
            })(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Hands every written range of `start..end` to `written` (as addresses) and, with
    /// `reprotect`, write-protects it again in the same walk. `regions` bounds how many
    /// ranges one call returns; the walk goes on where the kernel stopped.
    fn scan_written(
        &self,
        start: u64,
        end: u64,
        reprotect: bool,
        regions: &mut [PageRegion],
        mut written: impl FnMut(u64, u64),
    ) -> Result<(), UffdError> {
        assert!(!regions.is_empty());
        let mut from = start;
        while from < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_CHECK_WPASYNC | if reprotect { PM_SCAN_WP_MATCHING } else { 0 },
                start: from,
                end,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..Default::default()
            };
            // SAFETY: `pagemap` is this process's pagemap file and `arg` the struct this
            // request encodes, live across the call; its `vec` points at `regions`,
            // `vec_len` entries of `struct page_region` that the kernel fills and that
            // nothing else borrows meanwhile. The walk only reads and write-protects
            // page table entries of our own mappings.
            let ret = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
            if ret < 0 {
                let e = std::io::Error::last_os_error();
                return Err(if e.raw_os_error() == Some(libc::ENOTTY) {
                    UffdError::NoPagemapScan
                } else {
                    UffdError::Scan(e)
                });
            }
            for r in &regions[..(ret as usize).min(regions.len())] {
                written(r.start.max(from), r.end.min(end));
            }
            if arg.walk_end <= from {
                return Err(UffdError::Stalled {
                    start: from,
                    end,
                    walk_end: arg.walk_end,
                });
            }
            from = arg.walk_end;
        }
        Ok(())
    }
}

/// A new userfaultfd (non-blocking, close-on-exec): from the system call, or, where
/// that is refused (`vm.unprivileged_userfaultfd`, seccomp), from `/dev/userfaultfd`.
fn new_userfaultfd() -> Result<OwnedFd, UffdError> {
    abi::open().map_err(|(syscall, device)| UffdError::Open { syscall, device })
}

/// `UFFDIO_API`: enables `features` and returns those the kernel offers.
fn api_handshake(uffd: &OwnedFd, features: u64) -> Result<u64, UffdError> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: `uffd` is a new userfaultfd and `api` the struct this request encodes,
    // live across the call.
    let ret = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api) };
    if ret < 0 {
        return Err(uffd_ioctl("enable asynchronous write-protection")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(api.features)
}

/// What a sync needs and only one sync at a time may use.
#[derive(Debug)]
struct ScanState {
    /// Guest RAM is registered and write-protected: between `start` and `stop`.
    armed: bool,
    /// The ranges one `PAGEMAP_SCAN` call fills.
    regions: Vec<PageRegion>,
}

/// The dirty tracker of a `soft` guest with `--dirty-tracking uffd-wp`: the kernel
/// reports the pages the vCPU threads write; the VMM's own writes come from
/// `vmm_dirty`.
#[derive(Debug)]
pub struct UffdWpTracker {
    ram: Arc<RamBlock>,
    vmm_dirty: Arc<AtomicDirtyLog>,
    wp: AsyncWriteProtect,
    state: Mutex<ScanState>,
}

impl UffdWpTracker {
    /// Sets up tracking of `ram` (block 0 of `vmm_dirty`), a shared file mapping when
    /// `shared`. Registers the block and scans a page once, so that a kernel that
    /// cannot track it fails here rather than when a migration starts.
    pub fn new(
        ram: Arc<RamBlock>,
        vmm_dirty: Arc<AtomicDirtyLog>,
        shared: bool,
    ) -> Result<Self, UffdError> {
        let tracker = Self {
            wp: AsyncWriteProtect::open(shared)?,
            ram,
            vmm_dirty,
            state: Mutex::new(ScanState {
                armed: false,
                regions: vec![PageRegion::default(); SCAN_REGIONS],
            }),
        };
        let (start, len) = tracker.range();
        tracker.wp.register(start, len)?;
        let probe = {
            let mut st = tracker.lock_state();
            let end = start + tracker.ram.page_size().min(len);
            tracker
                .wp
                .scan_written(start, end, false, &mut st.regions, |_, _| {})
        };
        let unregistered = tracker.wp.unregister(start, len);
        probe?;
        unregistered?;
        Ok(tracker)
    }

    /// Guest RAM's host address and length.
    fn range(&self) -> (u64, u64) {
        let len = self.ram.len();
        (self.ram.host_addr(), len)
    }

    fn lock_state(&self) -> MutexGuard<'_, ScanState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn disarm(&self, st: &mut ScanState) {
        if st.armed {
            let (start, len) = self.range();
            let _ = self.wp.write_protect(start, len, false);
            let _ = self.wp.unregister(start, len);
            st.armed = false;
        }
    }
}

fn tracking_error(e: UffdError) -> VmmError {
    VmmError::DirtyTracking(e.to_string())
}

impl DirtyTracker for UffdWpTracker {
    fn start(&self) -> Result<(), VmmError> {
        let mut st = self.lock_state();
        // Armed from an earlier session: start over, the first pass sends every page.
        self.disarm(&mut st);
        self.vmm_dirty.start()?;
        let (start, len) = self.range();
        self.wp.register(start, len).map_err(tracking_error)?;
        if let Err(e) = self.wp.write_protect(start, len, true) {
            let _ = self.wp.unregister(start, len);
            return Err(tracking_error(e));
        }
        st.armed = true;
        Ok(())
    }

    fn sync(&self, block: usize, out: &mut DirtyBitmap) -> Result<(), VmmError> {
        if block != 0 {
            return Err(VmmError::DirtyTracking(format!("no RAM block {block}")));
        }
        let mut st = self.lock_state();
        if !st.armed {
            return Err(VmmError::DirtyTracking(
                "userfaultfd write-protection is not armed: sync before start".into(),
            ));
        }
        let (start, len) = self.range();
        let ps = self.ram.page_size();
        self.wp
            .scan_written(start, start + len, true, &mut st.regions, |from, to| {
                let first = (from - start) / ps;
                let count = (to - from).div_ceil(ps);
                out.set_range(first as usize, count as usize);
            })
            .map_err(tracking_error)?;
        drop(st);
        self.vmm_dirty.sync(block, out)
    }

    fn requeue(&self, block: usize, pages: &DirtyBitmap) {
        self.vmm_dirty.requeue(block, pages);
    }

    fn stop(&self) {
        let mut st = self.lock_state();
        self.disarm(&mut st);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// An anonymous block of `pages` host pages and its tracker, or why userfaultfd
    /// write-protection is unavailable here.
    fn tracked(pages: usize) -> Result<(Arc<RamBlock>, UffdWpTracker), UffdError> {
        let ps = vmigrate_engine::memory::host_page_size();
        let ram = Arc::new(RamBlock::anonymous("ram", pages as u64 * ps, 0).unwrap());
        // Base pages only: a write to a transparent huge page that was never protected
        // (the tests write before arming too) would be reported as the whole huge page.
        ram.no_huge_pages();
        let dirty = Arc::new(AtomicDirtyLog::new(&[pages]));
        let t = UffdWpTracker::new(ram.clone(), dirty, false)?;
        Ok((ram, t))
    }

    macro_rules! tracked_or_skip {
        ($test:literal, $pages:expr) => {
            match tracked($pages) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("SKIP {}: {e}", $test);
                    return;
                }
            }
        };
    }

    /// Writes one word into each of `pages`, as the workload does: no marking API.
    fn poke(ram: &RamBlock, pages: &[usize], value: u64) {
        let ps = ram.page_size() as usize;
        for &p in pages {
            ram.fill_u64((p * ps + 8) as u64, 8, value);
        }
    }

    fn synced(t: &UffdWpTracker, pages: usize) -> Vec<usize> {
        let mut out = DirtyBitmap::new(pages);
        t.sync(0, &mut out).unwrap();
        out.iter_set().collect()
    }

    #[test]
    fn reports_exactly_the_pages_written_and_clears_them() {
        let (ram, t) = tracked_or_skip!("reports_exactly_the_pages_written_and_clears_them", 256);
        // Populated before tracking starts: present pages the next writes must hit.
        poke(&ram, &(0..128).collect::<Vec<_>>(), 1);
        t.start().unwrap();
        assert_eq!(synced(&t, 256), Vec::<usize>::new(), "nothing written yet");
        let written = [0, 1, 2, 63, 64, 100, 127, 255];
        poke(&ram, &written, 2);
        assert_eq!(synced(&t, 256), written);
        assert_eq!(
            synced(&t, 256),
            Vec::<usize>::new(),
            "the first sync cleared"
        );
        // Re-protected by the scan: written again, reported again.
        poke(&ram, &[1, 100, 200], 3);
        assert_eq!(synced(&t, 256), [1, 100, 200]);
        t.stop();
    }

    #[test]
    fn first_writes_to_unpopulated_pages_are_reported() {
        let (ram, t) = tracked_or_skip!("first_writes_to_unpopulated_pages_are_reported", 1024);
        t.start().unwrap();
        poke(&ram, &[5, 512, 1023], 7);
        assert_eq!(synced(&t, 1024), [5, 512, 1023]);
        // A read fault maps the page protected: still not written.
        let mut word = [0u8; 8];
        ram.read(600 * ram.page_size(), &mut word);
        assert_eq!(word, [0; 8]);
        assert_eq!(synced(&t, 1024), Vec::<usize>::new());
        poke(&ram, &[600], 1);
        assert_eq!(synced(&t, 1024), [600]);
        t.stop();
    }

    #[test]
    fn requeued_pages_and_vmm_writes_come_back() {
        let (ram, t) = tracked_or_skip!("requeued_pages_and_vmm_writes_come_back", 128);
        t.start().unwrap();
        poke(&ram, &[3, 4, 90], 1);
        let mut fetched = DirtyBitmap::new(128);
        t.sync(0, &mut fetched).unwrap();
        assert_eq!(fetched.count(), 3);
        t.requeue(0, &fetched);
        t.vmm_dirty.mark(0, 17, 2);
        assert_eq!(synced(&t, 128), [3, 4, 17, 18, 90]);
        assert_eq!(synced(&t, 128), Vec::<usize>::new());
        // Pages put back after tracking stopped (a failed migration) are kept too.
        t.stop();
        t.requeue(0, &fetched);
        t.start().unwrap();
        assert_eq!(synced(&t, 128), Vec::<usize>::new(), "start begins afresh");
        t.stop();
    }

    /// Written ranges that do not fit one call's buffer: the scan goes on where the
    /// kernel stopped, and no page is lost or reported twice.
    #[test]
    fn a_scan_longer_than_its_buffer_goes_on_from_where_it_stopped() {
        let (ram, t) = tracked_or_skip!(
            "a_scan_longer_than_its_buffer_goes_on_from_where_it_stopped",
            4096
        );
        t.lock_state().regions.truncate(3);
        t.start().unwrap();
        let written: Vec<usize> = (0..4096).step_by(7).collect();
        poke(&ram, &written, 9);
        assert_eq!(synced(&t, 4096), written);
        assert_eq!(synced(&t, 4096), Vec::<usize>::new());
        t.stop();
    }

    /// `stop` disarms: writes after it are not tracked, a sync is refused, and a new
    /// `start` tracks again.
    #[test]
    fn stop_disarms_and_start_arms_again() {
        let (ram, t) = tracked_or_skip!("stop_disarms_and_start_arms_again", 64);
        t.start().unwrap();
        poke(&ram, &[1], 1);
        t.stop();
        poke(&ram, &[2], 1);
        assert!(t.sync(0, &mut DirtyBitmap::new(64)).is_err());
        t.start().unwrap();
        assert_eq!(synced(&t, 64), Vec::<usize>::new());
        poke(&ram, &[2, 40], 2);
        assert_eq!(synced(&t, 64), [2, 40]);
        t.stop();
        assert!(t.sync(1, &mut DirtyBitmap::new(64)).is_err());
    }

    /// Tracking a shared file mapping (`--mem-path --share`), which needs
    /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` on shared memory.
    #[test]
    fn tracks_a_shared_file_mapping() {
        let ps = vmigrate_engine::memory::host_page_size();
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            std::path::PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("vmigrate-uffd-test-{}", std::process::id()));
        let ram = Arc::new(RamBlock::from_file("ram", &path, 64 * ps, 0, true).unwrap());
        let _ = std::fs::remove_file(&path);
        let dirty = Arc::new(AtomicDirtyLog::new(&[64]));
        let t = match UffdWpTracker::new(ram.clone(), dirty, true) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("SKIP tracks_a_shared_file_mapping: {e}");
                return;
            }
        };
        poke(&ram, &[0, 1], 1);
        t.start().unwrap();
        poke(&ram, &[1, 33, 63], 2);
        assert_eq!(synced(&t, 64), [1, 33, 63]);
        assert_eq!(synced(&t, 64), Vec::<usize>::new());
        t.stop();
    }

    /// The encoder against request numbers from `<linux/userfaultfd.h>` and
    /// `<linux/fs.h>`, and the structs' sizes.
    #[test]
    fn abi_matches_the_kernel_headers() {
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(abi::USERFAULTFD_IOC_NEW, 0xaa00);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(std::mem::size_of::<PageRegion>(), 24);
    }

    /// How long a sync takes with a tenth of the pages written, on blocks of 256 MiB
    /// and 1 GiB, every page populated first (a guest that has run a while). Run with
    /// `--ignored --nocapture`.
    #[test]
    #[ignore = "a measurement: run explicitly"]
    fn measure_sync_time() {
        let ps = vmigrate_engine::memory::host_page_size() as usize;
        for mib in [256usize, 1024] {
            let pages = (mib << 20) / ps;
            let (ram, t) = tracked_or_skip!("measure_sync_time", pages);
            ram.populate_write(0, ram.len() as usize);
            let t0 = Instant::now();
            t.start().unwrap();
            let armed = t0.elapsed();
            let empty = Instant::now();
            assert_eq!(synced(&t, pages).len(), 0);
            let empty = empty.elapsed();
            let mut times = Vec::new();
            for round in 0..5u64 {
                let written: Vec<usize> = (round as usize..pages).step_by(10).collect();
                poke(&ram, &written, round);
                let mut out = DirtyBitmap::new(pages);
                let s = Instant::now();
                t.sync(0, &mut out).unwrap();
                times.push(s.elapsed());
                assert_eq!(out.count(), written.len());
            }
            times.sort();
            let d0 = Instant::now();
            t.stop();
            let disarmed = d0.elapsed();
            println!(
                "uffd-wp {mib} MiB ({pages} pages): arm {armed:?}, empty sync {empty:?}, \
                 sync with 10% written: median {:?} (min {:?}, max {:?}), disarm {disarmed:?}",
                times[times.len() / 2],
                times[0],
                times[times.len() - 1]
            );
        }
    }
}
