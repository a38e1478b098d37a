//! A userfaultfd in MISSING mode, the kernel object postcopy's destination lives on.
//!
//! Guest RAM is registered with `UFFDIO_REGISTER_MODE_MISSING`: a read or write of a
//! page that is not present (never written, or dropped by a discard) stops the
//! faulting thread and queues a message on the descriptor. The fault thread reads the
//! messages ([`Userfaultfd::read_faults`]); pages are placed atomically with
//! `UFFDIO_COPY` or `UFFDIO_ZEROPAGE`, which also wake the threads waiting on them.
//! Unregistering a range wakes its waiters too: they fault again as on ordinary memory,
//! so no thread stays blocked once postcopy ends, whether it succeeded or not.
//!
//! The C headers of many hosts lack part of this ABI, so it is spelled out here from
//! the kernel's `<linux/userfaultfd.h>`. Placing pages writes guest memory: those calls
//! are `unsafe` and made only by `memory.rs`, guest memory's one door.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

/// The parts of `<linux/userfaultfd.h>` every user of a userfaultfd needs (this
/// module's MISSING mode, and the write-protect dirty tracking of the reference VM):
/// the API handshake and register structs, their ioctl numbers, and opening one.
pub mod abi {
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// `UFFD_API`: the only userfaultfd API version.
    pub const UFFD_API: u64 = 0xaa;
    /// `struct uffdio_api`.
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct UffdioApi {
        pub api: u64,
        pub features: u64,
        pub ioctls: u64,
    }

    /// `struct uffdio_range`.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UffdioRange {
        pub start: u64,
        pub len: u64,
    }

    /// `struct uffdio_register`.
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct UffdioRegister {
        pub range: UffdioRange,
        pub mode: u64,
        pub ioctls: u64,
    }

    /// Encodes an ioctl request number as `<asm-generic/ioctl.h>` does on x86-64.
    pub const fn ioc(dir: u32, ty: u8, nr: u32, size: usize) -> libc::Ioctl {
        ((dir << 30) | ((size as u32) << 16) | ((ty as u32) << 8) | nr) as libc::Ioctl
    }
    pub const IOC_NONE: u32 = 0;
    pub const IOC_READ: u32 = 2;
    pub const IOC_READ_WRITE: u32 = 3;
    pub const UFFDIO: u8 = 0xaa;
    /// `_IO(USERFAULTFD_IOC, 0x00)` on `/dev/userfaultfd`: a new userfaultfd.
    pub const USERFAULTFD_IOC_NEW: libc::Ioctl = ioc(IOC_NONE, UFFDIO, 0x00, 0);
    pub const UFFDIO_API: libc::Ioctl = ioc(
        IOC_READ_WRITE,
        UFFDIO,
        0x3f,
        std::mem::size_of::<UffdioApi>(),
    );
    pub const UFFDIO_REGISTER: libc::Ioctl = ioc(
        IOC_READ_WRITE,
        UFFDIO,
        0x00,
        std::mem::size_of::<UffdioRegister>(),
    );
    pub const UFFDIO_UNREGISTER: libc::Ioctl =
        ioc(IOC_READ, UFFDIO, 0x01, std::mem::size_of::<UffdioRange>());

    /// `UFFD_EVENT_PAGEFAULT`.
    pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

    /// `struct uffd_msg` (32 bytes): the event, then a union whose page-fault member is
    /// `flags`, `address`, `ptid`.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UffdMsg {
        pub event: u8,
        pub reserved1: u8,
        pub reserved2: u16,
        pub reserved3: u32,
        pub flags: u64,
        pub address: u64,
        pub rest: u64,
    }

    /// Waits up to `timeout` for messages on userfaultfd `fd` and calls `each` with
    /// every page-fault message of one read. A timeout, an interrupted wait and a read
    /// that finds nothing are not errors.
    pub fn read_page_faults(
        fd: &OwnedFd,
        timeout: std::time::Duration,
        mut each: impl FnMut(&UffdMsg),
    ) -> std::io::Result<()> {
        let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
        let ts = rustix::time::Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        let mut msgs = [UffdMsg::default(); 16];
        let bytes = std::mem::size_of_val(&msgs);
        // SAFETY: the kernel writes at most `bytes` bytes of whole `uffd_msg` records
        // into `msgs`, a plain-data array we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), msgs.as_mut_ptr().cast(), bytes) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(()),
                _ => Err(e),
            };
        }
        let count = n as usize / std::mem::size_of::<UffdMsg>();
        msgs[..count]
            .iter()
            .filter(|m| m.event == UFFD_EVENT_PAGEFAULT)
            .for_each(&mut each);
        Ok(())
    }

    /// A new userfaultfd (non-blocking, close-on-exec): from the system call, or, where
    /// that is refused (`vm.unprivileged_userfaultfd`, seccomp), from
    /// `/dev/userfaultfd`. On failure, why each way was refused: (system call, device).
    pub fn open() -> Result<OwnedFd, (std::io::Error, std::io::Error)> {
        use rustix::mm::UserfaultfdFlags;
        // SAFETY: creating the descriptor touches no memory; what it can do to our
        // mappings is limited to what its owner registers with it.
        let syscall = match unsafe {
            rustix::mm::userfaultfd(UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK)
        } {
            Ok(fd) => return Ok(fd),
            Err(e) => std::io::Error::from(e),
        };
        let device = match File::options()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
        {
            Ok(dev) => {
                let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
                // SAFETY: `dev` is /dev/userfaultfd and this request takes the new
                // descriptor's flags by value.
                let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
                if fd >= 0 {
                    // SAFETY: the kernel returned a new descriptor that nothing else owns.
                    return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
                }
                std::io::Error::last_os_error()
            }
            Err(e) => e,
        };
        Err((syscall, device))
    }
}

use abi::*;

/// `UFFD_FEATURE_MISSING_HUGETLBFS`, `UFFD_FEATURE_MISSING_SHMEM`.
const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFD_FEATURE_THREAD_ID`: fault messages carry the faulting thread's id.
const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
/// `UFFDIO_REGISTER_MODE_MISSING`.
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `_UFFDIO_COPY`: the bit of `uffdio_register.ioctls` that says pages can be copied in.
const UFFDIO_COPY_NR: u32 = 0x03;
const UFFDIO_ZEROPAGE_NR: u32 = 0x04;
const UFFDIO_WAKE_NR: u32 = 0x02;
/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    /// Bytes copied, or a negated errno (written by the kernel).
    copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

const UFFDIO_WAKE: libc::Ioctl = ioc(
    IOC_READ,
    UFFDIO,
    UFFDIO_WAKE_NR,
    std::mem::size_of::<UffdioRange>(),
);
const UFFDIO_COPY: libc::Ioctl = ioc(
    IOC_READ_WRITE,
    UFFDIO,
    UFFDIO_COPY_NR,
    std::mem::size_of::<UffdioCopy>(),
);
const UFFDIO_ZEROPAGE: libc::Ioctl = ioc(
    IOC_READ_WRITE,
    UFFDIO,
    UFFDIO_ZEROPAGE_NR,
    std::mem::size_of::<UffdioZeropage>(),
);

/// Errors of the userfaultfd.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error(
        "postcopy needs userfaultfd, which this host refuses (the userfaultfd system \
         call: {syscall}; /dev/userfaultfd: {device})"
    )]
    Open {
        syscall: std::io::Error,
        device: std::io::Error,
    },
    #[error("postcopy needs {0}, which this kernel's userfaultfd lacks")]
    Features(&'static str),
    #[error("userfaultfd refused to {what}: {source}")]
    Ioctl {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("userfaultfd cannot place pages in this kind of guest RAM")]
    NotPlaceable,
    #[error("reading userfaultfd messages failed: {0}")]
    Read(std::io::Error),
}

/// What placing a page did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The page was missing and now holds the data; its waiters were woken.
    Placed,
    /// The page was present already (`EEXIST`); nothing changed.
    AlreadyPresent,
}

/// One page fault read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub address: u64,
    /// The faulting thread's id (`UFFD_FEATURE_THREAD_ID`), else 0.
    pub thread_id: u32,
}

/// A userfaultfd for MISSING faults.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
}

impl Userfaultfd {
    /// Opens a userfaultfd (the system call, else `/dev/userfaultfd`) for MISSING
    /// faults; `shmem` and `hugetlbfs` ask for the features those memory kinds need.
    pub fn open(shmem: bool, hugetlbfs: bool) -> Result<Self, UffdError> {
        Self::open_with(shmem, hugetlbfs, false)
    }

    /// [`Userfaultfd::open`], and with `thread_id` fault messages say which thread
    /// faulted (`UFFD_FEATURE_THREAD_ID`, for postcopy-blocktime).
    pub fn open_with(shmem: bool, hugetlbfs: bool, thread_id: bool) -> Result<Self, UffdError> {
        let fd = new_userfaultfd()?;
        let mut wanted = 0;
        if thread_id {
            wanted |= UFFD_FEATURE_THREAD_ID;
        }
        if shmem {
            wanted |= UFFD_FEATURE_MISSING_SHMEM;
        }
        if hugetlbfs {
            wanted |= UFFD_FEATURE_MISSING_HUGETLBFS;
        }
        let mut api = UffdioApi {
            api: UFFD_API,
            features: wanted,
            ioctls: 0,
        };
        // SAFETY: `fd` is a new userfaultfd and `api` the struct this request encodes,
        // live across the call.
        let ret = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) };
        if ret < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) && wanted != 0 {
                return Err(UffdError::Features(if shmem {
                    "UFFD_FEATURE_MISSING_SHMEM"
                } else {
                    "UFFD_FEATURE_MISSING_HUGETLBFS"
                }));
            }
            return Err(ioctl_error("enable the userfaultfd API", e));
        }
        Ok(Self { fd })
    }

    /// Registers `start..start+len` (addresses) for MISSING faults.
    pub fn register_missing(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: `fd` is a userfaultfd after its handshake and `reg` the struct this
        // request encodes, live across the call. Registering changes no memory contents.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) };
        if ret < 0 {
            return Err(ioctl_error(
                "register guest RAM",
                std::io::Error::last_os_error(),
            ));
        }
        if reg.ioctls & (1 << UFFDIO_COPY_NR) == 0 {
            let _ = self.unregister(start, len);
            return Err(UffdError::NotPlaceable);
        }
        Ok(())
    }

    /// Unregisters a range; threads waiting on its pages are woken and fault again as
    /// on ordinary memory.
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let range = UffdioRange { start, len };
        // SAFETY: as in `register_missing`; the kernel only reads `range`.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &range) };
        if ret < 0 {
            return Err(ioctl_error(
                "unregister guest RAM",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Wakes threads waiting on `start..start+len` (a page placed meanwhile).
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let range = UffdioRange { start, len };
        // SAFETY: as in `unregister`; waking changes no memory.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &range) };
        if ret < 0 {
            return Err(ioctl_error("wake", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Copies `len` bytes at `src` into the missing page(s) at `dst`, atomically, and
    /// wakes their waiters.
    ///
    /// # Safety
    ///
    /// `dst..dst+len` must be inside a live mapping registered with this userfaultfd
    /// that the caller may write (guest RAM, through `memory.rs`); `src` must be
    /// readable for `len` bytes.
    pub(crate) unsafe fn copy(
        &self,
        dst: u64,
        src: *const u8,
        len: u64,
    ) -> Result<Placement, UffdError> {
        loop {
            let mut c = UffdioCopy {
                dst,
                src: src as u64,
                len,
                mode: 0,
                copy: 0,
            };
            // SAFETY: the caller guarantees both ranges; the kernel reads `src`, writes
            // `dst` only if it is missing, and writes back into `c`.
            let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) };
            if ret == 0 {
                return Ok(Placement::Placed);
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EEXIST) => return Ok(Placement::AlreadyPresent),
                // The address space was changing; the kernel asks to retry.
                Some(libc::EAGAIN) if c.copy <= 0 => continue,
                _ => return Err(ioctl_error("place a page", e)),
            }
        }
    }

    /// Maps zero page(s) at the missing `dst..dst+len` and wakes their waiters. Memory
    /// kinds without `UFFDIO_ZEROPAGE` (hugetlbfs) fail with `EINVAL`.
    ///
    /// # Safety
    ///
    /// As for [`Userfaultfd::copy`], for `dst`.
    pub(crate) unsafe fn zeropage(&self, dst: u64, len: u64) -> Result<Placement, UffdError> {
        loop {
            let mut z = UffdioZeropage {
                range: UffdioRange { start: dst, len },
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: the caller guarantees the range; the kernel maps zeroes there only
            // if the page is missing, and writes back into `z`.
            let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) };
            if ret == 0 {
                return Ok(Placement::Placed);
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EEXIST) => return Ok(Placement::AlreadyPresent),
                Some(libc::EAGAIN) if z.zeropage <= 0 => continue,
                _ => return Err(ioctl_error("place a zero page", e)),
            }
        }
    }

    /// Waits up to `timeout` for fault messages and appends the faulting addresses to
    /// `out`. Returns with nothing when the time passed, so a caller can stop.
    pub fn read_faults(&self, timeout: Duration, out: &mut Vec<u64>) -> Result<(), UffdError> {
        let mut faults = Vec::new();
        self.read_faults_with_thread(timeout, &mut faults)?;
        out.extend(faults.into_iter().map(|f| f.address));
        Ok(())
    }

    /// [`Userfaultfd::read_faults`], each fault with the id of the thread that took it
    /// (0 unless opened with `thread_id`).
    pub fn read_faults_with_thread(
        &self,
        timeout: Duration,
        out: &mut Vec<Fault>,
    ) -> Result<(), UffdError> {
        read_page_faults(&self.fd, timeout, |m| {
            out.push(Fault {
                address: m.address,
                // `feat.ptid`, the first 32 bits after the address.
                thread_id: m.rest as u32,
            })
        })
        .map_err(UffdError::Read)?;
        Ok(())
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn ioctl_error(what: &'static str, source: std::io::Error) -> UffdError {
    UffdError::Ioctl { what, source }
}

/// Whether this process can open a userfaultfd at all.
pub fn available() -> Result<(), UffdError> {
    new_userfaultfd().map(drop)
}

fn new_userfaultfd() -> Result<OwnedFd, UffdError> {
    abi::open().map_err(|(syscall, device)| UffdError::Open { syscall, device })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_sizes_match_the_kernel() {
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
        assert_eq!(std::mem::size_of::<UffdioCopy>(), 40);
        assert_eq!(std::mem::size_of::<UffdioZeropage>(), 32);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        // _IOWR(0xAA, 0x03, struct uffdio_copy), as the kernel header defines it.
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
    }
}
