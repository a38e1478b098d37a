//! A human monitor in front of any QMP server reachable through a unix socket.
//!
//! ```text
//! cargo run -p vmigrate-hmp --example hmp_over_qmp -- /path/to/qmp.sock
//! ```
//! Reads HMP command lines on standard input and prints each command's output followed by a
//! line holding only `(qemu) `, which makes the output easy to compare with QEMU's own monitor.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

use serde_json::{json, Value};
use vmigrate_hmp::{run_command, QmpError, QmpExecutor, BANNER, PROMPT};

/// A QMP client over a unix socket that skips events.
struct SocketQmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl SocketQmp {
    /// Connects, reads the greeting and negotiates capabilities.
    fn connect(path: &str) -> std::io::Result<Self> {
        let writer = UnixStream::connect(path)?;
        let mut client = Self {
            reader: BufReader::new(writer.try_clone()?),
            writer,
        };
        let mut greeting = String::new();
        client.reader.read_line(&mut greeting)?;
        client
            .execute("qmp_capabilities", json!({}))
            .map_err(|error| std::io::Error::other(error.desc))?;
        Ok(client)
    }
}

impl QmpExecutor for SocketQmp {
    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let request = json!({"execute": command, "arguments": arguments});
        let io_error = |error: std::io::Error| QmpError::generic(error.to_string());
        writeln!(self.writer, "{request}").map_err(io_error)?;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).map_err(io_error)? == 0 {
                return Err(QmpError::generic("QMP connection closed"));
            }
            let reply: Value = serde_json::from_str(&line)
                .map_err(|error| QmpError::generic(error.to_string()))?;
            if let Some(value) = reply.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = reply.get("error") {
                let member = |key: &str| {
                    error
                        .get(key)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                return Err(QmpError {
                    class: member("class"),
                    desc: member("desc"),
                });
            }
        }
    }
}

fn main() -> std::io::Result<()> {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: hmp_over_qmp QMP_SOCKET");
        std::process::exit(2);
    };
    let mut qmp = SocketQmp::connect(&path)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "{BANNER}")?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        write!(out, "{}", run_command(&line, &mut qmp))?;
        writeln!(out, "{PROMPT}")?;
        out.flush()?;
    }
    Ok(())
}
