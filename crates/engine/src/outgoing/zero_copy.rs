//! `zero-copy-send`: multifd channels hand guest pages to the kernel with `MSG_ZEROCOPY`
//! instead of copying them into socket buffers.
//!
//! The kernel reads the pages when it transmits them and reports each completed
//! `sendmsg` on the socket's error queue; a completion may say that the kernel copied
//! the data after all (it always does on loopback, where the receiver would otherwise
//! see memory the sender may still change). Guest pages may change before completion:
//! such a page is dirty again and sent again, as with any live page. Packet headers are
//! written with an ordinary copy, since their buffer is reused at once.
//!
//! At every sync point each channel waits for the completions of everything it sent (as
//! QEMU flushes its channels there) and counts a sync at which no send avoided the copy
//! as one more `dirty-sync-missed-zero-copy`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::memory::RamBlock;

/// QEMU's text when a channel's socket cannot send with `MSG_ZEROCOPY` (a unix socket,
/// or a kernel without it).
pub const NOT_AVAILABLE: &str = "Zero copy send feature not detected in host kernel";
/// QEMU's text when the kernel refuses to pin more pages (`ENOBUFS`): the locked-memory
/// limit (`RLIMIT_MEMLOCK`) is too low for what is in flight.
pub const MEMLOCK: &str = "Process can't lock enough memory for using MSG_ZEROCOPY";

/// `SO_EE_ORIGIN_ZEROCOPY` and `SO_EE_CODE_ZEROCOPY_COPIED` of `<linux/errqueue.h>`.
const ORIGIN_ZEROCOPY: u8 = 5;
const CODE_COPIED: u8 = 1;

/// `struct sock_extended_err`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct ExtendedErr {
    errno: u32,
    origin: u8,
    kind: u8,
    code: u8,
    pad: u8,
    info: u32,
    data: u32,
}

/// Turns `SO_ZEROCOPY` on for a socket.
pub fn enable(fd: BorrowedFd<'_>) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid descriptor and a c_int option value of the right size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ZEROCOPY,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A run of guest memory to send.
#[derive(Debug, Clone, Copy)]
pub struct GuestRun<'a> {
    pub block: &'a RamBlock,
    pub offset: u64,
    pub len: usize,
}

/// The zero-copy state of one socket.
#[derive(Debug, Default)]
pub struct ZeroCopy {
    /// `sendmsg` calls made with `MSG_ZEROCOPY` that sent something.
    queued: u64,
    /// Of those, how many the kernel reported complete.
    completed: u64,
}

impl ZeroCopy {
    /// Sends `runs` from byte `skip` on, with `MSG_ZEROCOPY`; returns the bytes sent.
    pub fn send(
        &mut self,
        fd: BorrowedFd<'_>,
        runs: &[GuestRun<'_>],
        mut skip: usize,
    ) -> io::Result<usize> {
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(runs.len());
        for r in runs {
            if skip >= r.len {
                skip -= r.len;
                continue;
            }
            assert!(
                r.offset + r.len as u64 <= r.block.len(),
                "zero-copy run outside its block"
            );
            let base = r.block.host_addr() + r.offset + skip as u64;
            iov.push(libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: r.len - skip,
            });
            skip = 0;
        }
        if iov.is_empty() {
            return Ok(0);
        }
        // SAFETY: an all-zero msghdr is valid; its iovecs point into guest mappings that
        // stay mapped for the whole migration (the kernel pins what it has not sent yet).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len() as _;
        // SAFETY: `msg` is valid for the call; the kernel only reads the iovecs.
        let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_ZEROCOPY) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                return Err(io::Error::other(MEMLOCK));
            }
            return Err(e);
        }
        if n > 0 {
            self.queued += 1;
        }
        Ok(n as usize)
    }

    /// Waits until every send so far is reported complete. Returns whether the kernel
    /// copied all that completed in this wait (also when there was nothing to wait for,
    /// as QEMU counts it).
    pub fn flush(&mut self, fd: BorrowedFd<'_>) -> io::Result<bool> {
        let mut all_copied = true;
        while self.completed < self.queued {
            let mut control = [0u64; 16];
            // SAFETY: an all-zero msghdr is valid; the control buffer outlives the call.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            // SAFETY: `msg` describes live buffers.
            let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_ERRQUEUE) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => {
                        let mut p = libc::pollfd {
                            fd: fd.as_raw_fd(),
                            events: 0,
                            revents: 0,
                        };
                        // POLLERR is always reported: wait for the error queue.
                        // SAFETY: one valid pollfd.
                        unsafe { libc::poll(&mut p, 1, 1000) };
                        continue;
                    }
                    Some(libc::EINTR) => continue,
                    _ => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("Unable to read errqueue: {e}"),
                        ))
                    }
                }
            }
            // SAFETY: the kernel filled `msg`'s control buffer; CMSG_FIRSTHDR stays within.
            let cm = unsafe { libc::CMSG_FIRSTHDR(&msg) };
            if cm.is_null() {
                return Err(io::Error::other("Wrong cmsg in errqueue"));
            }
            // SAFETY: `cm` points into `control`.
            let (level, kind) = unsafe { ((*cm).cmsg_level, (*cm).cmsg_type) };
            let ok = (level == libc::SOL_IP && kind == libc::IP_RECVERR)
                || (level == libc::SOL_IPV6 && kind == libc::IPV6_RECVERR);
            if !ok {
                return Err(io::Error::other("Wrong cmsg in errqueue"));
            }
            let mut err = ExtendedErr::default();
            // SAFETY: the data of an IP(V6)_RECVERR cmsg starts with a sock_extended_err;
            // it is copied out unaligned.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    libc::CMSG_DATA(cm),
                    (&mut err as *mut ExtendedErr).cast(),
                    std::mem::size_of::<ExtendedErr>(),
                )
            };
            if err.errno != 0 {
                return Err(io::Error::from_raw_os_error(err.errno as i32));
            }
            if err.origin != ORIGIN_ZEROCOPY {
                return Err(io::Error::other("Error not from zero copy"));
            }
            if err.data < err.info {
                return Err(io::Error::other("Wrong notification bounds"));
            }
            self.completed += u64::from(err.data - err.info) + 1;
            if err.code & CODE_COPIED == 0 {
                all_copied = false;
            }
        }
        Ok(all_copied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;
    use std::sync::Arc;

    #[test]
    fn loopback_sends_arrive_and_complete_copied() {
        let block = Arc::new(RamBlock::anonymous("m0", 4 * 4096, 0).unwrap());
        block.write(0, &[7u8; 4096]);
        block.write(8192, &[9u8; 4096]);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let tx = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut rx, _) = listener.accept().unwrap();
        enable(tx.as_fd()).unwrap();
        let mut zc = ZeroCopy::default();
        let runs = [
            GuestRun {
                block: &block,
                offset: 0,
                len: 4096,
            },
            GuestRun {
                block: &block,
                offset: 8192,
                len: 4096,
            },
        ];
        let mut sent = 0;
        while sent < 8192 {
            sent += zc.send(tx.as_fd(), &runs, sent).unwrap();
        }
        let mut got = vec![0u8; 8192];
        rx.read_exact(&mut got).unwrap();
        assert!(got[..4096].iter().all(|b| *b == 7) && got[4096..].iter().all(|b| *b == 9));
        // Loopback: the kernel copies.
        assert!(zc.flush(tx.as_fd()).unwrap());
        assert_eq!(zc.completed, zc.queued);
        // Nothing in flight: counted as missed, as QEMU counts it.
        assert!(zc.flush(tx.as_fd()).unwrap());
    }

    #[test]
    fn unix_sockets_have_no_zero_copy() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(enable(a.as_fd()).is_err());
    }
}
