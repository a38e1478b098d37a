//! `vmigrate report` and `vmigrate demo --report`: a migration timeline, from a file or
//! a QMP socket, written as an HTML page.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};

use crate::qmp_client::QmpClient;

/// The vmigrate-only QMP command that returns the last outgoing migration's timeline.
pub const TIMELINE_COMMAND: &str = "x-vmigrate-query-migrate-timeline";

pub fn read_timeline(path: &Path) -> anyhow::Result<Value> {
    let mut text = String::new();
    if path == Path::new("-") {
        std::io::stdin().read_to_string(&mut text)?;
    } else {
        text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
    }
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// Reads the timeline over QMP (`unix:PATH`, or a bare path).
pub fn fetch_timeline(qmp: &str) -> anyhow::Result<Value> {
    let path = qmp.strip_prefix("unix:").unwrap_or(qmp);
    let mut client = QmpClient::connect(Path::new(path), Duration::from_secs(5))?;
    client.execute(TIMELINE_COMMAND, json!({}))
}

/// Renders the page and writes it (under a temporary name first, then renamed).
pub fn write_page(timeline: &Value, output: &Path) -> anyhow::Result<()> {
    let page = vmigrate_report::render(timeline)?;
    let mut temp = output.as_os_str().to_owned();
    temp.push(".tmp");
    std::fs::write(&temp, page).with_context(|| format!("cannot write {}", output.display()))?;
    std::fs::rename(&temp, output).with_context(|| format!("cannot write {}", output.display()))?;
    Ok(())
}
