//! A small QMP client for the demo: connects to a unix socket, negotiates, runs
//! commands and skips events.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};

pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl QmpClient {
    /// Connects, retrying until the socket exists or `timeout` passes.
    pub fn connect(path: &std::path::Path, timeout: Duration) -> anyhow::Result<Self> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < timeout => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("connecting to {}", path.display()))
                }
            }
        };
        let writer = stream.try_clone()?;
        let mut c = Self {
            reader: BufReader::new(stream),
            writer,
        };
        c.read_message()?;
        c.execute("qmp_capabilities", json!({}))?;
        Ok(c)
    }

    fn read_message(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("monitor closed the connection");
        }
        Ok(serde_json::from_str(&line)?)
    }

    pub fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        let msg = json!({"execute": command, "arguments": arguments});
        self.writer.write_all(format!("{msg}\n").as_bytes())?;
        loop {
            let v = self.read_message()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(anyhow!(
                    "{command}: {}",
                    e.get("desc").and_then(Value::as_str).unwrap_or("error")
                ));
            }
        }
    }
}
