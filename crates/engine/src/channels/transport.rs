//! Transports: QEMU's URI grammar and structured `channels`, outgoing connections and
//! incoming listeners for `tcp`, `unix`, `fd`, `exec` and `file`.
//!
//! Every transport ends up as a file descriptor the engine reads or writes; `exec` keeps
//! its child process alongside.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Seek;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use serde_json::{json, Value};

use crate::errno::errno_text;

/// A migration address, parsed from a URI or a `MigrationChannel`'s `addr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: String },
    Unix { path: String },
    Fd { name: String },
    Exec { args: Vec<String> },
    File { path: String, offset: u64 },
    Vsock { cid: String, port: String },
    Rdma { host: String, port: String },
}

/// A transport error, with QEMU's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(pub String);

fn terr<T>(msg: impl Into<String>) -> Result<T, TransportError> {
    Err(TransportError(msg.into()))
}

impl Address {
    /// Parses a URI string (`tcp:`, `unix:`, `fd:`, `exec:`, `file:`, `vsock:`, `rdma:`).
    pub fn parse_uri(uri: &str) -> Result<Address, TransportError> {
        let (scheme, rest) = uri.split_once(':').unwrap_or(("", ""));
        match scheme {
            "tcp" | "rdma" => {
                let (host, port) = parse_host_port(rest)?;
                Ok(if scheme == "tcp" {
                    Address::Tcp { host, port }
                } else {
                    Address::Rdma { host, port }
                })
            }
            "unix" => {
                if rest.is_empty() {
                    return terr("invalid Unix socket address");
                }
                Ok(Address::Unix {
                    path: rest.to_string(),
                })
            }
            "fd" => {
                if rest.is_empty() {
                    return terr("invalid file descriptor address");
                }
                Ok(Address::Fd {
                    name: rest.to_string(),
                })
            }
            "exec" => Ok(Address::Exec {
                args: vec!["/bin/sh".into(), "-c".into(), rest.to_string()],
            }),
            "vsock" => {
                let Some((cid, port)) = rest.split_once(':') else {
                    return terr(format!("error parsing address '{rest}'"));
                };
                Ok(Address::Vsock {
                    cid: cid.into(),
                    port: port.into(),
                })
            }
            "file" => {
                let (path, offset) = match rest.split_once(",offset=") {
                    Some((p, o)) => {
                        let off = parse_size(o).ok_or_else(|| {
                            let why = if o.starts_with('-')
                                || (o.chars().all(|c| c.is_ascii_digit()) && !o.is_empty())
                            {
                                "Numerical result out of range"
                            } else {
                                "Invalid argument"
                            };
                            TransportError(format!("file URI has bad offset {o}: {why}"))
                        })?;
                        (p, off)
                    }
                    None => (rest, 0),
                };
                Ok(Address::File {
                    path: path.to_string(),
                    offset,
                })
            }
            _ => terr(format!("unknown migration protocol: {uri}")),
        }
    }

    /// Parses a `MigrationAddress` object from the structured `channels` form.
    pub fn from_json(addr: &Value, path: &str) -> Result<Address, TransportError> {
        let obj = addr
            .as_object()
            .ok_or_else(|| TransportError(format!("Parameter '{path}' expects object")))?;
        let s = |k: &str| -> Result<String, TransportError> {
            match obj.get(k) {
                Some(Value::String(v)) => Ok(v.clone()),
                Some(_) => terr(format!("Parameter '{path}.{k}' expects string")),
                None => terr(format!("Parameter '{path}.{k}' is missing")),
            }
        };
        match s("transport")?.as_str() {
            "socket" => match s("type")?.as_str() {
                "inet" => Ok(Address::Tcp {
                    host: s("host")?,
                    port: s("port")?,
                }),
                "unix" => Ok(Address::Unix { path: s("path")? }),
                "fd" => Ok(Address::Fd { name: s("str")? }),
                "vsock" => Ok(Address::Vsock {
                    cid: s("cid")?,
                    port: s("port")?,
                }),
                other => terr(format!(
                    "Parameter '{path}.type' does not accept value '{other}'"
                )),
            },
            "exec" => {
                let args = obj
                    .get("args")
                    .and_then(Value::as_array)
                    .ok_or_else(|| TransportError(format!("Parameter '{path}.args' is missing")))?;
                let args = args
                    .iter()
                    .map(|a| a.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        TransportError(format!("Parameter '{path}.args' expects string"))
                    })?;
                Ok(Address::Exec { args })
            }
            "file" => {
                let offset = match obj.get("offset") {
                    Some(v) => v.as_u64().ok_or_else(|| {
                        TransportError(format!("Parameter '{path}.offset' expects uint64"))
                    })?,
                    None => return terr(format!("Parameter '{path}.offset' is missing")),
                };
                Ok(Address::File {
                    path: s("filename")?,
                    offset,
                })
            }
            "rdma" => Ok(Address::Rdma {
                host: s("host")?,
                port: s("port")?,
            }),
            other => terr(format!(
                "Parameter '{path}.transport' does not accept value '{other}'"
            )),
        }
    }

    pub fn is_socket(&self) -> bool {
        matches!(
            self,
            Address::Tcp { .. } | Address::Unix { .. } | Address::Vsock { .. }
        )
    }
}

fn parse_host_port(rest: &str) -> Result<(String, String), TransportError> {
    let mut parts = rest.split(',');
    let rest = parts.next().unwrap_or("");
    for opt in parts {
        if let Some(v) = opt.strip_prefix("to=") {
            if v.parse::<u16>().is_err() {
                return terr("error parsing to= argument");
            }
        }
    }
    if let Some(v6) = rest.strip_prefix('[') {
        let Some((host, after)) = v6.split_once(']') else {
            return terr(format!("error parsing IPv6 address '{rest}'"));
        };
        let Some(port) = after.strip_prefix(':') else {
            return terr(format!("error parsing address '{rest}'"));
        };
        check_port(port, rest)?;
        return Ok((host.to_string(), port.to_string()));
    }
    let Some((host, port)) = rest.rsplit_once(':') else {
        return terr(format!("error parsing address '{rest}'"));
    };
    check_port(port, rest)?;
    Ok((host.to_string(), port.to_string()))
}

fn check_port(port: &str, whole: &str) -> Result<(), TransportError> {
    if port.is_empty() {
        return terr(format!("error parsing port in address '{whole}'"));
    }
    Ok(())
}

/// Parses a size with optional `0x` prefix or B/K/M/G/T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).ok();
    }
    let (num, mult) = match s.chars().last()? {
        'b' | 'B' => (&s[..s.len() - 1], 1u64),
        'k' | 'K' => (&s[..s.len() - 1], 1 << 10),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        'g' | 'G' => (&s[..s.len() - 1], 1 << 30),
        't' | 'T' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// Descriptors registered with QMP `getfd`, by name.
#[derive(Debug, Default)]
pub struct FdStore {
    fds: Mutex<HashMap<String, OwnedFd>>,
}

impl FdStore {
    pub fn add(&self, name: &str, fd: OwnedFd) {
        self.fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), fd);
    }

    pub fn remove(&self, name: &str) -> Option<OwnedFd> {
        self.fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(name)
    }
}

/// How long closing a TLS channel waits for its relay to hand the last bytes to the
/// network.
pub const TLS_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// An open migration channel: a descriptor, plus the child of an `exec:` transport.
#[derive(Debug)]
pub struct Channel {
    pub fd: OwnedFd,
    pub child: Option<Child>,
    /// Whether this is a socket (supports shutdown for cancellation).
    pub is_socket: bool,
    /// Offset in the file where the stream starts (file: transport).
    pub base_offset: u64,
    /// With TLS, the relay thread that carries `fd`'s plaintext to the network.
    pub tls_relay: Option<crate::channels::tls_relay::RelayDone>,
}

impl Channel {
    pub(crate) fn plain(fd: OwnedFd, is_socket: bool) -> Self {
        Self {
            fd,
            child: None,
            is_socket,
            base_offset: 0,
            tls_relay: None,
        }
    }

    /// Waits for an `exec:` child to exit, and for a TLS relay to send what it holds
    /// (at most [`TLS_FLUSH_TIMEOUT`]).
    pub fn finish(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        if let Some(r) = self.tls_relay.take() {
            let _ = r.wait(TLS_FLUSH_TIMEOUT);
        }
    }
}

fn fd_of(raw: RawFd) -> OwnedFd {
    // SAFETY: callers pass a descriptor they own exclusively (from into_raw_fd).
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// The synchronous part of starting an outgoing transport: errors QEMU reports from the
/// `migrate` command itself (file creation, unknown fd names).
pub fn open_outgoing_sync(
    addr: &Address,
    fds: &FdStore,
) -> Result<Option<Channel>, TransportError> {
    match addr {
        Address::File { path, offset } => {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| {
                    TransportError(format!("Could not create '{path}': {}", errno_text(&e)))
                })?;
            // Only a file longer than the offset is cut: truncating a file that is
            // already short enough makes ext4 write all of its data back at close.
            let len = file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
            if len != *offset {
                file.set_len(*offset).map_err(|e| {
                    TransportError(format!("Could not truncate '{path}': {}", errno_text(&e)))
                })?;
            }
            let mut file = file;
            file.seek(std::io::SeekFrom::Start(*offset)).map_err(|e| {
                TransportError(format!("Could not seek '{path}': {}", errno_text(&e)))
            })?;
            let mut ch = Channel::plain(OwnedFd::from(file), false);
            ch.base_offset = *offset;
            Ok(Some(ch))
        }
        Address::Fd { name } => {
            let fd = fds.remove(name).ok_or_else(|| {
                TransportError(format!("File descriptor named '{name}' has not been found"))
            })?;
            let is_socket = rustix::net::sockopt::socket_type(&fd).is_ok();
            Ok(Some(Channel::plain(fd, is_socket)))
        }
        Address::Vsock { .. } => terr("vsock transport is not supported by vmigrate yet"),
        Address::Rdma { .. } => terr("RDMA ERROR: could not create CM channel"),
        _ => Ok(None),
    }
}

/// The asynchronous part: connect sockets, start `exec:` children. Errors end the
/// migration in `failed` with this text.
pub fn connect_outgoing(addr: &Address) -> Result<Channel, TransportError> {
    match addr {
        Address::Tcp { host, port } => {
            let shown = format!("{host}:{port}");
            let addrs: Vec<SocketAddr> = (host.as_str(), port.parse::<u16>().unwrap_or(0))
                .to_socket_addrs()
                .map_err(|e| {
                    TransportError(format!(
                        "address resolution failed for {shown}: {}",
                        gai_text(&e)
                    ))
                })?
                .collect();
            let mut last = None;
            for a in &addrs {
                match TcpStream::connect(a) {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        return Ok(Channel::plain(OwnedFd::from(s), true));
                    }
                    Err(e) => last = Some(e),
                }
            }
            let e = last
                .map(|e| errno_text(&e))
                .unwrap_or_else(|| "no address".into());
            terr(format!("Failed to connect to '{shown}': {e}"))
        }
        Address::Unix { path } => {
            let s = UnixStream::connect(path).map_err(|e| {
                TransportError(format!("Failed to connect to '{path}': {}", errno_text(&e)))
            })?;
            Ok(Channel::plain(OwnedFd::from(s), true))
        }
        Address::Exec { args } => spawn_exec(args, ExecEnd::Stdin),
        _ => terr("transport cannot be connected"),
    }
}

/// Which end of an `exec:` child carries the stream.
enum ExecEnd {
    /// The source writes into the child's stdin.
    Stdin,
    /// The destination reads the child's stdout.
    Stdout,
}

/// Starts an `exec:` child and returns the pipe end the stream uses.
fn spawn_exec(args: &[String], end: ExecEnd) -> Result<Channel, TransportError> {
    let (prog, rest) = args
        .split_first()
        .ok_or_else(|| TransportError("exec: empty command".into()))?;
    let mut cmd = Command::new(prog);
    cmd.args(rest);
    match end {
        ExecEnd::Stdin => cmd.stdin(Stdio::piped()),
        ExecEnd::Stdout => cmd.stdout(Stdio::piped()),
    };
    let mut child = cmd
        .spawn()
        .map_err(|e| TransportError(format!("cannot run '{prog}': {}", errno_text(&e))))?;
    let fd = match end {
        ExecEnd::Stdin => OwnedFd::from(child.stdin.take().expect("stdin was piped")),
        ExecEnd::Stdout => OwnedFd::from(child.stdout.take().expect("stdout was piped")),
    };
    Ok(Channel {
        fd,
        child: Some(child),
        is_socket: false,
        base_offset: 0,
        tls_relay: None,
    })
}

/// An incoming transport that is ready to produce its channel.
#[derive(Debug)]
pub enum Incoming {
    Tcp(TcpListener),
    Unix(UnixListener, String),
    Ready(Channel),
}

impl Incoming {
    /// Starts listening (sockets) or opens the source (file, fd, exec).
    pub fn start(addr: &Address, fds: &FdStore) -> Result<Incoming, TransportError> {
        match addr {
            Address::Tcp { host, port } => {
                let p: u16 = port.parse().map_err(|_| {
                    TransportError(format!("error parsing port in address '{host}:{port}'"))
                })?;
                let bind_host = if host.is_empty() {
                    "0.0.0.0"
                } else {
                    host.as_str()
                };
                let l = TcpListener::bind((bind_host, p)).map_err(|e| {
                    TransportError(format!(
                        "Failed to find an available port: {}",
                        errno_text(&e)
                    ))
                })?;
                Ok(Incoming::Tcp(l))
            }
            Address::Unix { path } => {
                let _ = std::fs::remove_file(path);
                let l = UnixListener::bind(path).map_err(|e| {
                    TransportError(format!(
                        "Failed to bind socket to {path}: {}",
                        errno_text(&e)
                    ))
                })?;
                Ok(Incoming::Unix(l, path.clone()))
            }
            Address::File { path, offset } => {
                let mut file = std::fs::File::open(path).map_err(|e| {
                    TransportError(format!("Could not open '{path}': {}", errno_text(&e)))
                })?;
                file.seek(std::io::SeekFrom::Start(*offset)).map_err(|e| {
                    TransportError(format!("Could not seek '{path}': {}", errno_text(&e)))
                })?;
                let mut ch = Channel::plain(OwnedFd::from(file), false);
                ch.base_offset = *offset;
                Ok(Incoming::Ready(ch))
            }
            Address::Fd { name } => {
                let fd = match fds.remove(name) {
                    Some(fd) => fd,
                    None => {
                        let n: RawFd = name.parse().map_err(|_| {
                            TransportError(format!(
                                "File descriptor named '{name}' has not been found"
                            ))
                        })?;
                        if rustix::io::fcntl_getfd(
                            // SAFETY: only borrowed for the duration of the check.
                            unsafe { std::os::fd::BorrowedFd::borrow_raw(n) },
                        )
                        .is_err()
                        {
                            return terr(format!(
                                "File descriptor named '{name}' has not been found"
                            ));
                        }
                        fd_of(n)
                    }
                };
                let is_socket = rustix::net::sockopt::socket_type(&fd).is_ok();
                Ok(Incoming::Ready(Channel::plain(fd, is_socket)))
            }
            Address::Exec { args } => spawn_exec(args, ExecEnd::Stdout).map(Incoming::Ready),
            Address::Vsock { .. } => terr("vsock transport is not supported by vmigrate yet"),
            Address::Rdma { .. } => terr("RDMA ERROR: could not create CM channel"),
        }
    }

    /// The listening addresses, as `query-migrate` reports them in `socket-address`.
    pub fn socket_address(&self) -> Option<Value> {
        match self {
            Incoming::Tcp(l) => {
                let a = l.local_addr().ok()?;
                let mut v = json!({"port": a.port().to_string()});
                if a.is_ipv4() {
                    v["ipv4"] = json!(true);
                } else {
                    v["ipv6"] = json!(true);
                }
                v["host"] = json!(a.ip().to_string());
                v["type"] = json!("inet");
                Some(json!([v]))
            }
            Incoming::Unix(_, path) => Some(json!([{"path": path, "type": "unix"}])),
            Incoming::Ready(_) => None,
        }
    }

    /// Accepts one more connection on a socket listener, waiting at most until
    /// `deadline`.
    pub fn accept_more(&self, deadline: std::time::Instant) -> Result<Channel, TransportError> {
        let fd = match self {
            Incoming::Tcp(l) => rustix::fd::AsFd::as_fd(l),
            Incoming::Unix(l, _) => rustix::fd::AsFd::as_fd(l),
            Incoming::Ready(_) => return terr("this transport has only one channel"),
        };
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return terr("timed out waiting for the source's multifd channels to connect");
            }
            let timeout = rustix::event::Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            let mut fds = [rustix::event::PollFd::new(
                &fd,
                rustix::event::PollFlags::IN,
            )];
            match rustix::event::poll(&mut fds, Some(&timeout)) {
                Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                Ok(_) => break,
                Err(e) => return terr(format!("poll failed: {e}")),
            }
        }
        let conn = match self {
            Incoming::Tcp(l) => {
                let (s, _) = l
                    .accept()
                    .map_err(|e| TransportError(format!("accept failed: {}", errno_text(&e))))?;
                let _ = s.set_nodelay(true);
                OwnedFd::from(s)
            }
            Incoming::Unix(l, _) => {
                let (s, _) = l
                    .accept()
                    .map_err(|e| TransportError(format!("accept failed: {}", errno_text(&e))))?;
                OwnedFd::from(s)
            }
            Incoming::Ready(_) => unreachable!("handled above"),
        };
        Ok(Channel::plain(conn, true))
    }

    /// Waits for the source to connect.
    pub fn accept(self) -> Result<Channel, TransportError> {
        match self {
            Incoming::Tcp(l) => {
                let (s, _) = l
                    .accept()
                    .map_err(|e| TransportError(format!("accept failed: {}", errno_text(&e))))?;
                let _ = s.set_nodelay(true);
                Ok(Channel::plain(OwnedFd::from(s), true))
            }
            Incoming::Unix(l, path) => {
                let (s, _) = l
                    .accept()
                    .map_err(|e| TransportError(format!("accept failed: {}", errno_text(&e))))?;
                let _ = std::fs::remove_file(&path);
                Ok(Channel::plain(OwnedFd::from(s), true))
            }
            Incoming::Ready(ch) => Ok(ch),
        }
    }
}

fn gai_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    s.split(": ").last().unwrap_or(&s).to_string()
}

/// Shuts a socket down so a blocked reader or writer returns (used by cancel).
pub fn shutdown_socket(fd: impl AsFd) {
    let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Both);
}

/// Looks at the first 4 bytes of a connection without consuming them.
pub fn peek4(fd: &OwnedFd) -> Result<[u8; 4], TransportError> {
    let mut b = [0u8; 4];
    let (n, _) = rustix::net::recv(
        fd,
        &mut b,
        rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::WAITALL,
    )
    .map_err(|e| match e {
        rustix::io::Errno::AGAIN => {
            TransportError("a new connection sent no handshake before the timeout".into())
        }
        e => TransportError(format!("reading a new connection failed: {e}")),
    })?;
    if n < 4 {
        return terr("a connection closed before sending 4 bytes");
    }
    Ok(b)
}

/// Sets (or with `None` clears) the receive timeout of a socket.
pub fn set_read_timeout(fd: &OwnedFd, timeout: Option<std::time::Duration>) {
    let _ =
        rustix::net::sockopt::set_socket_timeout(fd, rustix::net::sockopt::Timeout::Recv, timeout);
}

impl Channel {
    /// Closes the descriptor and reaps an `exec:` child.
    pub fn finish_with_close(&mut self) {
        let placeholder = match std::fs::File::open("/dev/null") {
            Ok(f) => std::os::fd::OwnedFd::from(f),
            Err(_) => return self.finish(),
        };
        drop(std::mem::replace(&mut self.fd, placeholder));
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_errors_match_qemu() {
        let e = |u: &str| Address::parse_uri(u).unwrap_err().0;
        assert_eq!(e("foo:bar"), "unknown migration protocol: foo:bar");
        assert_eq!(
            e("127.0.0.1:4444"),
            "unknown migration protocol: 127.0.0.1:4444"
        );
        assert_eq!(e("tcp:"), "error parsing address ''");
        assert_eq!(e("tcp:127.0.0.1"), "error parsing address '127.0.0.1'");
        assert_eq!(e("tcp:[::1"), "error parsing IPv6 address '[::1'");
        assert_eq!(e("unix:"), "invalid Unix socket address");
        assert_eq!(e("fd:"), "invalid file descriptor address");
        assert_eq!(
            e("file:/x,offset=abc"),
            "file URI has bad offset abc: Invalid argument"
        );
    }

    #[test]
    fn uris() {
        assert_eq!(
            Address::parse_uri("tcp:[::1]:0").unwrap(),
            Address::Tcp {
                host: "::1".into(),
                port: "0".into()
            }
        );
        assert_eq!(
            Address::parse_uri("file:/tmp/x,offset=4k").unwrap(),
            Address::File {
                path: "/tmp/x".into(),
                offset: 4096
            }
        );
        assert_eq!(
            Address::parse_uri("file:/tmp/x,offset=0x1000").unwrap(),
            Address::File {
                path: "/tmp/x".into(),
                offset: 4096
            }
        );
    }

    #[test]
    fn errno_texts_are_plain() {
        let e = std::io::Error::from_raw_os_error(111);
        assert_eq!(errno_text(&e), "Connection refused");
        let e = std::io::Error::from_raw_os_error(2);
        assert_eq!(errno_text(&e), "No such file or directory");
    }
}
