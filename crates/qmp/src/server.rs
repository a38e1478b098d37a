//! The QMP server: listens on unix or tcp sockets, greets, negotiates capabilities,
//! dispatches commands and delivers events to every negotiated connection.

use std::io::Write;
use std::mem::MaybeUninit;
use std::net::TcpListener;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use vmigrate_engine::EventBus;
use vmigrate_stream::vmdesc::to_qemu_json;

use crate::dispatch::{version, Dispatcher, QmpError, Session};
use crate::framing::{normalise_quotes, Frame, Framer};

/// Where a monitor listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorAddress {
    Unix(String),
    Tcp(String),
}

impl MonitorAddress {
    /// Parses `unix:PATH` or `tcp:HOST:PORT` (QEMU's `,server,wait=off` suffixes are
    /// accepted and ignored).
    pub fn parse(s: &str) -> Option<Self> {
        let main = s.split(',').next()?;
        if let Some(p) = main.strip_prefix("unix:") {
            return (!p.is_empty()).then(|| MonitorAddress::Unix(p.to_string()));
        }
        if let Some(a) = main.strip_prefix("tcp:") {
            return a.contains(':').then(|| MonitorAddress::Tcp(a.to_string()));
        }
        None
    }
}

/// One connection's output, shared by its replies and the events sent to it.
type SharedWriter = Arc<Mutex<Box<dyn Write + Send>>>;

/// The connections that receive events.
#[derive(Default)]
struct Clients {
    writers: Mutex<Vec<SharedWriter>>,
}

fn timestamp() -> Value {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => json!({"seconds": d.as_secs(), "microseconds": d.subsec_micros()}),
        Err(_) => json!({"seconds": -1, "microseconds": -1}),
    }
}

fn event_line(name: &str, data: Option<&Value>) -> String {
    let mut ev = Map::new();
    ev.insert("timestamp".into(), timestamp());
    ev.insert("event".into(), json!(name));
    if let Some(d) = data {
        ev.insert("data".into(), d.clone());
    }
    format!("{}\r\n", to_qemu_json(&Value::Object(ev)))
}

/// Binds every address and serves each on its own thread. Returns once all are bound.
pub fn serve(
    addrs: &[MonitorAddress],
    dispatcher: Arc<Dispatcher>,
    events: &EventBus,
) -> std::io::Result<()> {
    let clients = Arc::new(Clients::default());
    {
        let clients = clients.clone();
        events.subscribe(move |name, data| {
            let line = event_line(name, data);
            let writers = clients.writers.lock().unwrap_or_else(|e| e.into_inner());
            for w in writers.iter() {
                let _ = w
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write_all(line.as_bytes());
            }
        });
    }
    for addr in addrs {
        let d = dispatcher.clone();
        let c = clients.clone();
        match addr {
            MonitorAddress::Unix(path) => {
                let _ = std::fs::remove_file(path);
                let l = UnixListener::bind(path)?;
                std::thread::spawn(move || accept_loop(l.incoming().flatten(), true, d, c));
            }
            MonitorAddress::Tcp(a) => {
                let l = TcpListener::bind(a.as_str())?;
                std::thread::spawn(move || accept_loop(l.incoming().flatten(), false, d, c));
            }
        }
    }
    Ok(())
}

/// Serves every connection a listener yields, each on its own thread.
fn accept_loop<S>(
    conns: impl Iterator<Item = S>,
    unix: bool,
    dispatcher: Arc<Dispatcher>,
    clients: Arc<Clients>,
) where
    S: Into<OwnedFd> + TryCloneStream + Send + 'static,
{
    for conn in conns {
        let (d, c) = (dispatcher.clone(), clients.clone());
        std::thread::spawn(move || {
            let Some(w) = conn.try_clone_stream() else {
                return;
            };
            serve_connection(conn.into(), unix, w, d, c)
        });
    }
}

/// Socket types whose second handle writes replies and events.
trait TryCloneStream {
    fn try_clone_stream(&self) -> Option<Box<dyn Write + Send>>;
}

impl TryCloneStream for std::os::unix::net::UnixStream {
    fn try_clone_stream(&self) -> Option<Box<dyn Write + Send>> {
        self.try_clone()
            .ok()
            .map(|s| Box::new(s) as Box<dyn Write + Send>)
    }
}

impl TryCloneStream for std::net::TcpStream {
    fn try_clone_stream(&self) -> Option<Box<dyn Write + Send>> {
        self.try_clone()
            .ok()
            .map(|s| Box::new(s) as Box<dyn Write + Send>)
    }
}

/// Reads from a socket, collecting descriptors passed with SCM_RIGHTS.
fn read_with_fds(
    fd: &OwnedFd,
    unix: bool,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<usize> {
    if !unix {
        return Ok(rustix::io::read(fd, buf)?);
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut anc = rustix::net::RecvAncillaryBuffer::new(&mut space);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = rustix::net::recvmsg(
        fd.as_fd(),
        &mut iov,
        &mut anc,
        rustix::net::RecvFlags::CMSG_CLOEXEC,
    )?;
    for m in anc.drain() {
        if let rustix::net::RecvAncillaryMessage::ScmRights(r) = m {
            fds.extend(r);
        }
    }
    Ok(msg.bytes)
}

fn serve_connection(
    fd: OwnedFd,
    unix: bool,
    writer: Box<dyn Write + Send>,
    dispatcher: Arc<Dispatcher>,
    clients: Arc<Clients>,
) {
    let writer = Arc::new(Mutex::new(writer));
    let send = |v: &Value| {
        let line = format!("{}\r\n", to_qemu_json(v));
        writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(line.as_bytes())
    };
    let greeting = json!({"QMP": {"version": version(), "capabilities": ["oob"]}});
    if send(&greeting).is_err() {
        return;
    }
    let mut framer = Framer::default();
    let mut negotiated = false;
    let mut oob = false;
    let mut session = Session::default();
    let mut buf = vec![0u8; 64 << 10];
    'outer: loop {
        let n = match read_with_fds(&fd, unix, &mut buf, &mut session.received_fds) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut frames = Vec::new();
        framer.push(&buf[..n], &mut frames);
        for frame in frames {
            let reply = match frame {
                Frame::Error(desc) => error_reply(None, &QmpError::generic(desc)),
                Frame::Message(text) => {
                    handle_message(&text, &mut negotiated, &mut oob, &dispatcher, &mut session)
                }
            };
            let sent = send(&reply);
            // Whether or not the client is still there, started work ends.
            session.run_after_reply();
            if sent.is_err() {
                break 'outer;
            }
            if session.quit {
                dispatcher
                    .migrator()
                    .vmm()
                    .control()
                    .vm_stop(vmigrate_engine::RunState::Shutdown);
                let line = event_line(
                    "SHUTDOWN",
                    Some(&json!({"guest": false, "reason": "host-qmp-quit"})),
                );
                let _ = writer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write_all(line.as_bytes());
                std::process::exit(0);
            }
            if negotiated {
                let mut ws = clients.writers.lock().unwrap_or_else(|e| e.into_inner());
                if !ws.iter().any(|w| Arc::ptr_eq(w, &writer)) {
                    ws.push(writer.clone());
                }
            }
        }
    }
    clients
        .writers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|w| !Arc::ptr_eq(w, &writer));
}

fn error_reply(id: Option<&Value>, e: &QmpError) -> Value {
    let mut m = Map::new();
    if let Some(id) = id {
        m.insert("id".into(), id.clone());
    }
    m.insert("error".into(), json!({"class": e.class, "desc": e.desc}));
    Value::Object(m)
}

fn handle_message(
    text: &str,
    negotiated: &mut bool,
    oob: &mut bool,
    d: &Dispatcher,
    session: &mut Session,
) -> Value {
    let parsed: Value = match serde_json::from_str(text)
        .or_else(|_| serde_json::from_str(&normalise_quotes(text)))
    {
        Ok(v) => v,
        Err(_) => {
            return error_reply(
                None,
                &QmpError::generic("JSON parse error, expecting value"),
            )
        }
    };
    let Value::Object(obj) = parsed else {
        return error_reply(None, &QmpError::generic("QMP input must be a JSON object"));
    };
    let id = obj.get("id").cloned();
    let id = id.as_ref();
    let fail = |desc: String| error_reply(id, &QmpError::generic(desc));
    for key in obj.keys() {
        if !matches!(
            key.as_str(),
            "execute" | "exec-oob" | "arguments" | "id" | "control"
        ) {
            return fail(format!("QMP input member '{key}' is unexpected"));
        }
    }
    let out_of_band = obj.contains_key("exec-oob");
    if out_of_band {
        if !*oob {
            return fail("QMP input member 'exec-oob' is unexpected".into());
        }
        if obj.contains_key("execute") {
            return fail("QMP input member 'execute' clashes with 'exec-oob'".into());
        }
    }
    let member = if out_of_band { "exec-oob" } else { "execute" };
    let name = match obj.get(member) {
        None => return fail("QMP input lacks member 'execute'".into()),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return fail(format!("QMP input member '{member}' must be a string")),
    };
    let args = match obj.get("arguments") {
        None => Map::new(),
        Some(Value::Object(a)) => a.clone(),
        Some(_) => return fail("QMP input member 'arguments' must be an object".into()),
    };
    // Commands run one at a time per connection, so an out-of-band command simply runs
    // now; what QEMU checks is that the command allows it.
    let oob_refusal = match Dispatcher::allows_oob(&name) {
        _ if !out_of_band => None,
        None => Some(QmpError::not_found(format!(
            "The command {name} has not been found"
        ))),
        Some(false) => Some(QmpError::generic(format!(
            "The command {name} does not support OOB"
        ))),
        Some(true) => None,
    };
    let result = if let Some(e) = oob_refusal {
        Err(e)
    } else if !*negotiated {
        if name == "qmp_capabilities" {
            negotiate(&args).map(|enabled| {
                *negotiated = true;
                *oob = enabled;
                json!({})
            })
        } else {
            Err(QmpError::not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ))
        }
    } else {
        d.execute(&name, &args, session)
    };
    match result {
        Ok(v) => {
            let mut m = Map::new();
            m.insert("return".into(), v);
            if let Some(id) = id {
                m.insert("id".into(), id.clone());
            }
            Value::Object(m)
        }
        Err(e) => error_reply(id, &e),
    }
}

/// `qmp_capabilities` before negotiation: true when `oob` was enabled.
fn negotiate(args: &Map<String, Value>) -> Result<bool, QmpError> {
    let mut oob = false;
    for (k, v) in args {
        if k != "enable" {
            return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
        }
        let Some(list) = v.as_array() else {
            return Err(QmpError::generic(
                "Invalid parameter type for 'enable', expected: array",
            ));
        };
        for item in list {
            match item.as_str() {
                Some("oob") => oob = true,
                Some(other) => {
                    return Err(QmpError::generic(format!(
                        "Parameter 'null' does not accept value '{other}'"
                    )))
                }
                None => {
                    return Err(QmpError::generic(format!(
                        "Invalid parameter type for 'enable[{}]', expected: string",
                        list.iter().position(|x| x == item).unwrap_or(0)
                    )))
                }
            }
        }
    }
    Ok(oob)
}
