//! The CPR state of `cpr-transfer`: a small stream of its own, sent on the `cpr` channel
//! (a unix socket) before the main migration stream.
//!
//! Layout (QEMU 10.0): be32 magic `QCPR`, be32 version 1, then the `CprState` vmstate,
//! a list of descriptors: for each, a byte 1, be32 name length (with its NUL), the name
//! and NUL, be32 id, then one byte (a space) that carries the descriptor (SCM_RIGHTS);
//! a byte 0 ends the list. The source then shuts its writing side and waits for the
//! destination to close the socket before it connects the main channel.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// `QCPR`.
pub const MAGIC: u32 = 0x5143_5052;
pub const VERSION: u32 = 1;

/// Bounds on what a loader accepts: names of RAM blocks are short, and a VM has few
/// descriptors to hand over.
const MAX_NAME: u32 = 4096;
const MAX_FDS: usize = 1024;

/// A cpr-transfer failure, with the text the migration reports.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CprError(pub String);

fn io_err(what: &str, e: impl std::fmt::Display) -> CprError {
    CprError(format!("cpr channel: {what}: {e}"))
}

/// One descriptor of the CPR state: QEMU names RAM by its block name, id 0.
#[derive(Debug)]
pub struct CprFd {
    pub name: String,
    pub id: i32,
    pub fd: OwnedFd,
}

/// Connects to the destination's `cpr` channel.
pub fn connect(path: &Path) -> Result<UnixStream, CprError> {
    UnixStream::connect(path).map_err(|e| {
        CprError(format!(
            "Failed to connect to '{}': {}",
            path.display(),
            crate::errno::errno_text(&e)
        ))
    })
}

/// Sends the CPR state with `fds` (name, id, descriptor), then shuts the writing side.
pub fn send_state(sock: &UnixStream, fds: &[(&str, i32, BorrowedFd<'_>)]) -> Result<(), CprError> {
    let mut head = Vec::new();
    head.extend_from_slice(&MAGIC.to_be_bytes());
    head.extend_from_slice(&VERSION.to_be_bytes());
    for (name, id, fd) in fds {
        head.push(1);
        let len = name.len() as u32 + 1;
        head.extend_from_slice(&len.to_be_bytes());
        head.extend_from_slice(name.as_bytes());
        head.push(0);
        head.extend_from_slice(&id.to_be_bytes());
        (&*sock).write_all(&head).map_err(|e| io_err("write", e))?;
        head.clear();
        let raw = [*fd];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut anc = SendAncillaryBuffer::new(&mut space);
        anc.push(SendAncillaryMessage::ScmRights(&raw));
        let n = sendmsg(
            sock,
            &[std::io::IoSlice::new(b" ")],
            &mut anc,
            SendFlags::NOSIGNAL,
        )
        .map_err(|e| io_err("send descriptor", e))?;
        if n != 1 {
            return Err(CprError("cpr channel: descriptor not sent".into()));
        }
    }
    head.push(0);
    (&*sock).write_all(&head).map_err(|e| io_err("write", e))?;
    sock.shutdown(std::net::Shutdown::Write)
        .map_err(|e| io_err("shutdown", e))
}

/// Waits until the destination closes the `cpr` channel (it has read the state and
/// taken the descriptors), or `cancel` is set.
pub fn wait_hangup(sock: &UnixStream, cancel: &AtomicBool) -> Result<(), CprError> {
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| io_err("timeout", e))?;
    let mut buf = [0u8; 64];
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(CprError("cpr channel: cancelled".into()));
        }
        match (&*sock).read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut
                    || e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(io_err("read", e)),
        }
    }
}

/// Reads bytes and the descriptors that come with them.
struct Reader<'a> {
    sock: &'a UnixStream,
    buf: Vec<u8>,
    pos: usize,
    fds: VecDeque<OwnedFd>,
    offset: u64,
}

impl Reader<'_> {
    fn fill(&mut self) -> Result<(), CprError> {
        let mut chunk = [0u8; 4096];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
        let mut anc = RecvAncillaryBuffer::new(&mut space);
        let r = recvmsg(
            self.sock,
            &mut [std::io::IoSliceMut::new(&mut chunk)],
            &mut anc,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(|e| io_err("read", e))?;
        for m in anc.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = m {
                for fd in rights {
                    if self.fds.len() >= MAX_FDS {
                        return Err(CprError("cpr channel: too many descriptors".into()));
                    }
                    self.fds.push_back(fd);
                }
            }
        }
        if r.bytes == 0 {
            return Err(CprError(format!(
                "cpr channel: the state ends early, at byte offset {}",
                self.offset
            )));
        }
        self.buf.drain(..self.pos);
        self.pos = 0;
        self.buf.extend_from_slice(&chunk[..r.bytes]);
        Ok(())
    }

    fn bytes(&mut self, n: usize) -> Result<Vec<u8>, CprError> {
        while self.buf.len() - self.pos < n {
            self.fill()?;
        }
        let out = self.buf[self.pos..self.pos + n].to_vec();
        self.pos += n;
        self.offset += n as u64;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, CprError> {
        Ok(self.bytes(1)?[0])
    }

    fn be32(&mut self) -> Result<u32, CprError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Reads the CPR state from an accepted `cpr` channel. The caller closes the socket
/// when it has taken the descriptors (the source waits for that).
pub fn load_state(sock: &UnixStream) -> Result<Vec<CprFd>, CprError> {
    let mut r = Reader {
        sock,
        buf: Vec::new(),
        pos: 0,
        fds: VecDeque::new(),
        offset: 0,
    };
    let magic = r.be32()?;
    if magic != MAGIC {
        return Err(CprError(format!(
            "Not a migration stream (bad magic {magic:x})"
        )));
    }
    let version = r.be32()?;
    if version != VERSION {
        return Err(CprError(format!(
            "Unsupported migration stream version {version}"
        )));
    }
    let mut out = Vec::new();
    loop {
        let at = r.offset;
        match r.u8()? {
            0 => break,
            1 => {}
            other => {
                return Err(CprError(format!(
                    "cpr channel: bad list marker 0x{other:x} at byte offset {at}"
                )))
            }
        }
        if out.len() >= MAX_FDS {
            return Err(CprError("cpr channel: too many descriptors".into()));
        }
        let at = r.offset;
        let len = r.be32()?;
        if len == 0 || len > MAX_NAME {
            return Err(CprError(format!(
                "cpr channel: bad name length {len} at byte offset {at}"
            )));
        }
        let raw = r.bytes(len as usize)?;
        let name =
            String::from_utf8_lossy(raw.split(|b| *b == 0).next().unwrap_or(&[])).into_owned();
        let id = r.be32()? as i32;
        let at = r.offset;
        r.u8()?;
        let Some(fd) = r.fds.pop_front() else {
            return Err(CprError(format!(
                "cpr channel: no descriptor came with '{name}' (byte offset {at})"
            )));
        };
        out.push(CprFd { name, id, fd });
    }
    Ok(out)
}

/// Checks a descriptor handed over for a RAM block of `len` bytes.
pub fn check_ram_fd(name: &str, fd: impl AsFd, len: u64) -> Result<(), CprError> {
    let st = rustix::fs::fstat(fd).map_err(|e| io_err("fstat", e))?;
    if st.st_size as u64 != len {
        return Err(CprError(format!(
            "cpr channel: the descriptor for RAM block '{name}' is {} bytes, the block is {len}",
            st.st_size
        )));
    }
    Ok(())
}

/// The source's first step: connects to `path` and sends the CPR state with the
/// descriptor of each RAM block mapped from a shared file. The socket is returned for
/// [`wait_hangup`] and held until the migration ends.
pub fn send_to(path: &Path, vmm: &dyn crate::vmm::Vmm) -> Result<UnixStream, CprError> {
    let blocks = vmm.ram_blocks();
    let mut fds = Vec::new();
    for b in blocks {
        if let crate::memory::Backing::File {
            file, shared: true, ..
        } = b.backing()
        {
            fds.push((b.idstr(), 0, file.as_fd()));
        }
    }
    let sock = connect(path)?;
    send_state(&sock, &fds)?;
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn state_with_a_descriptor_reads_back_as_qemu_writes_it() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile_of(8192);
        send_state(&a, &[("m0", 0, file.as_fd())]).unwrap();
        let got = load_state(&b).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].name, "m0");
        assert_eq!(got[0].id, 0);
        assert!(got[0].fd.as_raw_fd() >= 0);
        check_ram_fd("m0", &got[0].fd, 8192).unwrap();
        let e = check_ram_fd("m0", &got[0].fd, 4096).unwrap_err();
        assert!(e.0.contains("is 8192 bytes, the block is 4096"), "{e}");
    }

    #[test]
    fn empty_state_is_nine_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        send_state(&a, &[]).unwrap();
        let mut raw = Vec::new();
        (&b).read_to_end(&mut raw).unwrap();
        assert_eq!(raw, [0x51, 0x43, 0x50, 0x52, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn bad_states_fail_with_a_reason() {
        let cases: [(&[u8], &str); 5] = [
            (b"QCP", "ends early"),
            (b"QEVM\0\0\0\x01\0", "bad magic 5145564d"),
            (
                b"QCPR\0\0\0\x02\0",
                "Unsupported migration stream version 2",
            ),
            (b"QCPR\0\0\0\x01\x01\xff\xff\xff\xff", "bad name length"),
            (
                b"QCPR\0\0\0\x01\x01\0\0\0\x03m0\0\0\0\0\0 \0",
                "no descriptor came with 'm0'",
            ),
        ];
        for (bytes, want) in cases {
            let (a, b) = UnixStream::pair().unwrap();
            (&a).write_all(bytes).unwrap();
            drop(a);
            let e = load_state(&b).unwrap_err();
            assert!(e.0.contains(want), "{want}: {e}");
        }
    }

    fn tempfile_of(len: u64) -> std::fs::File {
        let path = crate::test_support::temp_path("cpr");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(len).unwrap();
        let _ = std::fs::remove_file(&path);
        f
    }
}
