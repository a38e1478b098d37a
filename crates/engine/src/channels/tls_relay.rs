//! The thread that carries a TLS session for the engine: plaintext in and out of one
//! end of a socket pair, records in and out of the network socket.
//!
//! ```text
//!  engine ──plaintext──▶ [pair end] ─▶ relay ─▶ rustls ─records─▶ network socket
//!  engine ◀─plaintext─── [pair end] ◀─ relay ◀─ rustls ◀─records── network socket
//! ```
//!
//! Both descriptors are non-blocking and watched with one `poll`. Backpressure holds in
//! both directions: plaintext is taken from the engine only while no encrypted bytes
//! are waiting for the network, and records are read from the network only while the
//! engine has taken what was decrypted before.
//!
//! Ends:
//! - The engine closes (or shuts down) its end: a `close_notify` goes to the peer,
//!   the network socket's write side is shut, and the thread ends.
//! - The peer closes: what was decrypted is delivered, then the engine reads end of
//!   file. Writing towards the peer goes on until the engine closes.
//! - The network or the TLS layer fails: the engine's end is shut down both ways, so
//!   its next read or write fails as it would on a broken plain socket.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags};
use rustix::net::{recv, send, shutdown, RecvFlags, SendFlags, Shutdown};

use rustls::Connection;

/// How much plaintext moves in one step, each way.
/// A finished handshake, ready for [`relay`]; made by the handshakes in `tls`.
#[derive(Debug)]
pub struct Session {
    pub(crate) conn: Connection,
    pub(crate) socket: OwnedFd,
}

/// Reads and writes a socket with `recv`/`send` (no SIGPIPE).
pub(crate) struct SocketIo<'a>(pub(crate) std::os::fd::BorrowedFd<'a>);

impl Read for SocketIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        rustix::net::recv(self.0, buf, rustix::net::RecvFlags::empty())
            .map(|(n, _)| n)
            .map_err(io::Error::from)
    }
}

impl Write for SocketIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        rustix::net::send(self.0, buf, rustix::net::SendFlags::NOSIGNAL).map_err(io::Error::from)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const CHUNK: usize = 64 * 1024;
/// How much decrypted plaintext may wait for the engine before reading stops.
const MAX_PENDING: usize = 4 * CHUNK;
/// How long a finished relay waits for the peer to close before it closes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a relay ended before it had carried the whole session.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RelayError {
    /// Reading records from the network socket failed (errno text).
    #[error("Unable to read from socket: {0}")]
    ReadNetwork(String),
    /// Writing records to the network socket failed (errno text).
    #[error("Unable to write to socket: {0}")]
    WriteNetwork(String),
    #[error("TLS peer sent alert {0:?}")]
    PeerAlert(rustls::AlertDescription),
    /// A record did not decrypt or broke the protocol.
    #[error("TLS error: {0}")]
    Session(rustls::Error),
}

/// How a relay ended: `Ok` when everything the engine wrote went to the network and
/// the peer raised no TLS alert; else what went wrong.
pub type RelayOutcome = Result<(), RelayError>;

/// Tells when a relay thread has ended, and how; can also make it end now.
#[derive(Debug)]
pub struct RelayDone {
    outcome: mpsc::Receiver<RelayOutcome>,
    /// A duplicate of the network socket, for [`RelayDone::abort`].
    network: Option<OwnedFd>,
}

impl RelayDone {
    /// Waits for the relay to end, at most `timeout`: `None` if it has not.
    pub fn wait(&self, timeout: Duration) -> Option<RelayOutcome> {
        match self.outcome.recv_timeout(timeout) {
            Ok(outcome) => Some(outcome),
            Err(mpsc::RecvTimeoutError::Disconnected) => Some(Ok(())),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
        }
    }

    /// Ends the session without flushing (a cancelled or failed migration): the
    /// network socket is shut down, so a relay blocked on a peer that does not read
    /// returns at once.
    pub fn abort(&self) {
        if let Some(net) = &self.network {
            let _ = shutdown(net, Shutdown::Both);
        }
    }
}

/// Starts the relay thread for `session` and returns the engine's end of the pair.
pub fn relay(session: Session, name: &str) -> io::Result<(OwnedFd, RelayDone)> {
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
    let (engine_end, relay_end) = socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let (done_tx, done_rx) = mpsc::channel();
    let network = session.socket.try_clone().ok();
    std::thread::Builder::new()
        .name(format!("mig/tls/{name}"))
        .spawn(move || {
            let mut relay = Relay::new(session, relay_end);
            relay.run();
            let _ = done_tx.send(relay.failure.take().map_or(Ok(()), Err));
        })?;
    Ok((
        engine_end,
        RelayDone {
            outcome: done_rx,
            network,
        },
    ))
}

struct Relay {
    conn: rustls::Connection,
    net: OwnedFd,
    app: OwnedFd,
    /// Decrypted bytes not yet taken by the engine, from `to_app_pos` on.
    to_app: Vec<u8>,
    to_app_pos: usize,
    buf: Vec<u8>,
    app_eof: bool,
    net_eof: bool,
    app_write_shut: bool,
    /// The first failure of the network or of the TLS session.
    failure: Option<RelayError>,
    /// The last error reading the network, for the failure it may become.
    read_error: Option<RelayError>,
}

impl Relay {
    fn new(session: Session, app: OwnedFd) -> Self {
        let mut conn = session.conn;
        // Backpressure comes from taking plaintext only while nothing waits to be sent.
        conn.set_buffer_limit(None);
        Self {
            conn,
            net: session.socket,
            app,
            to_app: Vec::new(),
            to_app_pos: 0,
            buf: vec![0; CHUNK],
            app_eof: false,
            net_eof: false,
            app_write_shut: false,
            failure: None,
            read_error: None,
        }
    }

    fn run(&mut self) {
        let nonblocking = rustix::io::ioctl_fionbio(&self.net, true)
            .and_then(|()| rustix::io::ioctl_fionbio(&self.app, true));
        if nonblocking.is_err() {
            return self.break_app();
        }
        loop {
            if self.step().is_err() {
                return self.break_app();
            }
            if self.app_eof && !self.conn.wants_write() {
                let _ = shutdown(&self.net, Shutdown::Write);
                self.drain_network();
                return;
            }
            let net_in = !self.net_eof && self.pending() < MAX_PENDING;
            let net_out = self.conn.wants_write();
            let app_in = !self.app_eof && !net_out;
            let app_out = self.pending() > 0;
            let flags = |i: bool, o: bool| {
                let mut f = PollFlags::empty();
                if i {
                    f |= PollFlags::IN;
                }
                if o {
                    f |= PollFlags::OUT;
                }
                f
            };
            let (net_flags, app_flags) = (flags(net_in, net_out), flags(app_in, app_out));
            // Only descriptors with something to wait for are watched: a hung-up socket
            // reports POLLHUP whatever it is asked.
            let mut fds = Vec::with_capacity(2);
            if !net_flags.is_empty() {
                fds.push(PollFd::new(&self.net, net_flags));
            }
            if !app_flags.is_empty() {
                fds.push(PollFd::new(&self.app, app_flags));
            }
            if fds.is_empty() {
                // Both directions are finished.
                return;
            }
            match poll(&mut fds, None) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(_) => return self.break_app(),
            }
            let mut ready = fds.iter().map(|p| !p.revents().is_empty());
            let net_ready = !net_flags.is_empty() && ready.next().unwrap_or(false);
            let app_ready = !app_flags.is_empty() && ready.next().unwrap_or(false);
            if net_ready && net_in && self.read_network().is_err() {
                if let Some(e) = self.read_error.take() {
                    self.fail(e);
                }
                return self.break_app();
            }
            if app_ready && app_in {
                self.read_app();
            }
        }
    }

    fn pending(&self) -> usize {
        self.to_app.len() - self.to_app_pos
    }

    /// Moves what can move without waiting: decrypted bytes to the engine, records to
    /// the network. An error ends the relay.
    fn step(&mut self) -> Result<(), ()> {
        if self.pending() == 0 {
            self.to_app.clear();
            self.to_app_pos = 0;
        }
        while self.pending() < MAX_PENDING {
            match self.conn.reader().read(&mut self.buf) {
                Ok(0) => {
                    self.net_eof = true;
                    break;
                }
                Ok(n) => self.to_app.extend_from_slice(&self.buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.net_eof = true;
                    break;
                }
            }
        }
        while self.pending() > 0 {
            let data = &self.to_app[self.to_app_pos..];
            match send(&self.app, data, SendFlags::NOSIGNAL) {
                Ok(n) => self.to_app_pos += n,
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR) => {}
                // The engine is gone; whatever the peer still sends has nowhere to go.
                Err(_) => {
                    self.to_app_pos = self.to_app.len();
                    self.app_eof = true;
                    self.conn.send_close_notify();
                }
            }
        }
        if self.net_eof && self.pending() == 0 && !self.app_write_shut {
            let _ = shutdown(&self.app, Shutdown::Write);
            self.app_write_shut = true;
        }
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut SocketIo(self.net.as_fd())) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fail(RelayError::WriteNetwork(crate::errno::errno_text(&e)));
                    return Err(());
                }
            }
        }
        Ok(())
    }

    fn fail(&mut self, e: RelayError) {
        self.failure.get_or_insert(e);
    }

    /// Reads records from the network and processes them; a TLS error (an alert from
    /// the peer, a record that does not decrypt) is recorded and ends the relay.
    fn read_network(&mut self) -> Result<(), ()> {
        match self.conn.read_tls(&mut SocketIo(self.net.as_fd())) {
            Ok(0) => {
                self.net_eof = true;
                Ok(())
            }
            Ok(_) => match self.conn.process_new_packets() {
                Ok(_) => Ok(()),
                Err(e) => {
                    self.fail(match e {
                        rustls::Error::AlertReceived(alert) => RelayError::PeerAlert(alert),
                        other => RelayError::Session(other),
                    });
                    // The alert rustls queued is sent on the way out.
                    let _ = self.conn.write_tls(&mut SocketIo(self.net.as_fd()));
                    Err(())
                }
            },
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(())
            }
            Err(e) => {
                self.read_error = Some(RelayError::ReadNetwork(crate::errno::errno_text(&e)));
                Err(())
            }
        }
    }

    fn read_app(&mut self) {
        match recv(&self.app, &mut self.buf, RecvFlags::empty()) {
            Ok((0, _)) => {
                self.app_eof = true;
                self.conn.send_close_notify();
            }
            Ok((n, _)) => {
                // With no buffer limit the whole chunk is taken.
                let _ = self.conn.writer().write_all(&self.buf[..n]);
            }
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => {
                self.app_eof = true;
                self.conn.send_close_notify();
            }
        }
    }

    /// After the last record: reads until the peer closes (at most [`DRAIN_TIMEOUT`])
    /// before closing. Closing a TCP socket with unread bytes (a TLS 1.3 session
    /// ticket, say) sends a reset, and a reset makes the peer drop whatever it has
    /// received but not yet read: the end of the stream.
    fn drain_network(&mut self) {
        let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
        while !self.net_eof && !self.conn.wants_write() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            let timeout = rustix::event::Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            let mut fds = [PollFd::new(&self.net, PollFlags::IN)];
            match poll(&mut fds, Some(&timeout)) {
                Ok(0) => return,
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(_) => return,
            }
            // A reset here is no failure: a peer that has read the whole stream may
            // close with our close_notify unread.
            if self.read_network().is_err() {
                return;
            }
            // Plaintext the peer sends now has no reader; a close_notify ends the wait.
            loop {
                match self.conn.reader().read(&mut self.buf) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return,
                }
            }
        }
    }

    /// The session is broken: the engine's reads and writes fail from now on.
    fn break_app(&mut self) {
        let _ = shutdown(&self.app, Shutdown::Both);
        let _ = shutdown(&self.net, Shutdown::Both);
    }
}
