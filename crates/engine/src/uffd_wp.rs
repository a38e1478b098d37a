//! A userfaultfd in write-protect mode, what a background snapshot keeps guest RAM
//! as it was at the snapshot's start with.
//!
//! Guest RAM is registered with `UFFDIO_REGISTER_MODE_WP` and protected whole with
//! `UFFDIO_WRITEPROTECT`. A write to a protected page (by a vCPU thread, by KVM on a
//! vCPU's behalf, or by the VMM) stops the writer and queues a message; the snapshot
//! saves the page, then lifts the protection, which wakes the writer and lets its write
//! go on. Lifting the protection of a page already saved is how the walk hands pages
//! back. Unregistering wakes every waiter, so no thread stays blocked once the snapshot
//! ends, however it ends.
//!
//! Without `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4) a page never touched cannot be
//! protected; such RAM is populated by reading it first (a zero page is mapped).

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use crate::uffd::abi::{
    self, ioc, UffdioApi, UffdioRange, UffdioRegister, IOC_READ_WRITE, UFFDIO, UFFDIO_API,
    UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFD_API,
};

/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`: write-protect faults are reported.
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: shared memory and hugetlbfs can be protected.
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED`: pages never faulted in can be protected.
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFDIO_REGISTER_MODE_WP`.
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`: protect (without it: unprotect and wake).
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `_UFFDIO_WRITEPROTECT`, the bit of `uffdio_register.ioctls` that says the range can
/// be write-protected.
const UFFDIO_WRITEPROTECT_NR: u32 = 0x06;
/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

const UFFDIO_WRITEPROTECT: libc::Ioctl = ioc(
    IOC_READ_WRITE,
    UFFDIO,
    UFFDIO_WRITEPROTECT_NR,
    std::mem::size_of::<UffdioWriteprotect>(),
);

/// Why write-protection cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WpError {
    /// No userfaultfd, or one without write-protect faults.
    #[error("userfaultfd write-protection is unavailable: {0}")]
    Unavailable(String),
    /// The memory cannot be registered or protected.
    #[error("userfaultfd cannot write-protect this guest RAM: {0}")]
    Incompatible(String),
    #[error("userfaultfd refused to {what}: {source}")]
    Ioctl {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("reading userfaultfd messages failed: {0}")]
    Read(std::io::Error),
}

/// A userfaultfd with write-protect faults.
#[derive(Debug)]
pub struct WriteProtect {
    fd: OwnedFd,
    /// Whether pages never touched can be protected as they are.
    unpopulated: bool,
}

fn handshake(fd: &OwnedFd, features: u64) -> Result<u64, std::io::Error> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: `fd` is a new userfaultfd and `api` the struct this request encodes, live
    // across the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(api.features)
}

fn open_fd() -> Result<OwnedFd, WpError> {
    abi::open().map_err(|(syscall, device)| {
        WpError::Unavailable(format!(
            "the userfaultfd system call: {syscall}; /dev/userfaultfd: {device}"
        ))
    })
}

impl WriteProtect {
    /// Opens a userfaultfd with write-protect faults, and the features for shared
    /// memory and unpopulated pages where the kernel has them.
    pub fn open() -> Result<Self, WpError> {
        // A first descriptor asks which features the kernel has (the handshake can be
        // made once per descriptor).
        let probe = open_fd()?;
        let have = handshake(&probe, 0).map_err(|e| WpError::Unavailable(e.to_string()))?;
        drop(probe);
        if have & UFFD_FEATURE_PAGEFAULT_FLAG_WP == 0 {
            return Err(WpError::Unavailable(
                "the kernel lacks UFFD_FEATURE_PAGEFAULT_FLAG_WP".into(),
            ));
        }
        let wanted = have
            & (UFFD_FEATURE_PAGEFAULT_FLAG_WP
                | UFFD_FEATURE_WP_HUGETLBFS_SHMEM
                | UFFD_FEATURE_WP_UNPOPULATED);
        let fd = open_fd()?;
        handshake(&fd, wanted).map_err(|e| WpError::Unavailable(e.to_string()))?;
        Ok(Self {
            fd,
            unpopulated: wanted & UFFD_FEATURE_WP_UNPOPULATED != 0,
        })
    }

    /// Whether pages never touched can be protected without populating them first.
    pub fn protects_unpopulated(&self) -> bool {
        self.unpopulated
    }

    /// Registers `start..start+len` for write-protect faults; fails with
    /// [`WpError::Incompatible`] when the kernel cannot protect that memory.
    pub fn register(&self, start: u64, len: u64) -> Result<(), WpError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: `fd` is a userfaultfd after its handshake and `reg` the struct this
        // request encodes, live across the call. Registering changes no memory contents.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) };
        if ret < 0 {
            return Err(WpError::Incompatible(
                std::io::Error::last_os_error().to_string(),
            ));
        }
        if reg.ioctls & (1 << UFFDIO_WRITEPROTECT_NR) == 0 {
            let _ = self.unregister(start, len);
            return Err(WpError::Incompatible(
                "the range has no UFFDIO_WRITEPROTECT".into(),
            ));
        }
        Ok(())
    }

    /// Unregisters a range; its waiters wake and write as on ordinary memory.
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), WpError> {
        let range = UffdioRange { start, len };
        // SAFETY: as in `register`; the kernel only reads `range`.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &range) };
        if ret < 0 {
            return Err(WpError::Ioctl {
                what: "unregister guest RAM",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Protects (`on`) or unprotects a registered range; unprotecting wakes the threads
    /// waiting on it.
    pub fn protect(&self, start: u64, len: u64, on: bool) -> Result<(), WpError> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: if on { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
        };
        loop {
            // SAFETY: `wp` is the struct this request encodes, live across the call; it
            // changes page protections only, never memory contents.
            let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp) };
            if ret == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EAGAIN) {
                return Err(WpError::Ioctl {
                    what: if on {
                        "write-protect guest RAM"
                    } else {
                        "lift write-protection"
                    },
                    source: e,
                });
            }
        }
    }

    /// Waits up to `timeout` for write faults and appends their addresses to `out`.
    pub fn read_faults(&self, timeout: Duration, out: &mut Vec<u64>) -> Result<(), WpError> {
        abi::read_page_faults(&self.fd, timeout, |m| out.push(m.address)).map_err(WpError::Read)?;
        Ok(())
    }
}

/// Whether this host's kernel has userfaultfd write-protection (QEMU's "write tracking
/// available").
pub fn available() -> Result<(), WpError> {
    WriteProtect::open().map(drop)
}

/// Whether every range of `ranges` (address, length) can be write-protected (QEMU's
/// "write tracking compatible"): each is registered and unregistered again.
pub fn compatible(ranges: &[(u64, u64)]) -> Result<(), WpError> {
    let wp = WriteProtect::open()?;
    for &(start, len) in ranges {
        wp.register(start, len)?;
        wp.unregister(start, len)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_sizes_match_the_kernel() {
        assert_eq!(std::mem::size_of::<abi::UffdMsg>(), 32);
        assert_eq!(std::mem::size_of::<UffdioWriteprotect>(), 24);
        // _IOWR(0xAA, 0x06, struct uffdio_writeprotect)
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
    }

    /// A write to a protected page stops its thread and is reported; the page keeps
    /// its old bytes until the protection is lifted, then the write goes through.
    #[test]
    fn a_write_to_a_protected_page_waits_until_it_is_freed() {
        use crate::memory::RamBlock;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        use std::time::Instant;

        let ps = crate::memory::host_page_size();
        let ram = Arc::new(RamBlock::anonymous("ram", 4 * ps, 0).unwrap());
        ram.no_huge_pages();
        ram.write(ps, &[1]);
        let wp = match WriteProtect::open() {
            Ok(wp) => wp,
            Err(e) => {
                eprintln!("SKIP write-protect test: {e}");
                return;
            }
        };
        let (start, len) = (ram.host_addr(), ram.len());
        if let Err(e) = wp.register(start, len) {
            eprintln!("SKIP write-protect test: {e}");
            return;
        }
        wp.protect(start, len, true).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (ram, done) = (ram.clone(), done.clone());
            std::thread::spawn(move || {
                ram.write(ps, &[2]);
                done.store(true, Ordering::SeqCst);
            })
        };
        let mut faults = Vec::new();
        let t0 = Instant::now();
        while faults.is_empty() && t0.elapsed() < Duration::from_secs(10) {
            wp.read_faults(Duration::from_millis(100), &mut faults)
                .unwrap();
        }
        assert_eq!(faults.first().map(|a| a & !(ps - 1)), Some(start + ps));
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !done.load(Ordering::SeqCst),
            "the write went through a protected page"
        );
        let mut b = [0u8];
        ram.read(ps, &mut b);
        assert_eq!(b[0], 1);
        wp.protect(start + ps, ps, false).unwrap();
        writer.join().unwrap();
        ram.read(ps, &mut b);
        assert_eq!(b[0], 2);
        wp.unregister(start, len).unwrap();
    }
}
