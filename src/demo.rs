//! `vmigrate demo`: starts a source VM holding a known pattern and a destination, live
//! migrates between them over loopback TCP while showing progress, and checks that the
//! destination's RAM is identical.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

use crate::qmp_client::QmpClient;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Guest RAM size.
    #[arg(long, default_value = "512M")]
    memory: String,
    /// Bandwidth cap in bytes/s so the transfer can be watched (0 = unlimited).
    #[arg(long, default_value_t = 256 << 20)]
    max_bandwidth: u64,
}

/// Processes and files of one demo run, removed on drop.
struct Run {
    dir: PathBuf,
    children: Vec<Child>,
}

impl Drop for Run {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Fills guest RAM with a known mix: zero pages, counter pages and text-like pages.
fn write_pattern(path: &Path, bytes: u64, page: usize) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path)?;
    let text = b"vmigrate moves a running VM's memory to another host while it keeps working. ";
    let mut buf = vec![0u8; page];
    for i in 0..(bytes / page as u64) {
        match i % 5 {
            0 | 1 => buf.fill(0),
            2 | 3 => {
                for (j, b) in buf.iter_mut().enumerate() {
                    *b = (i as usize).wrapping_mul(31).wrapping_add(j * 7) as u8;
                }
                buf[..8].copy_from_slice(&i.to_be_bytes());
            }
            _ => {
                for (j, b) in buf.iter_mut().enumerate() {
                    *b = text[(j + i as usize) % text.len()];
                }
            }
        }
        f.write_all(&buf)?;
    }
    Ok(())
}

fn digest(path: &Path) -> anyhow::Result<u64> {
    let data = std::fs::read(path)?;
    // FNV-1a over 8-byte words: enough to tell two RAM images apart in a demo.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in data.chunks(8) {
        let mut word = [0u8; 8];
        word[..w.len()].copy_from_slice(w);
        h ^= u64::from_le_bytes(word);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Ok(h)
}

fn spawn_vm(exe: &Path, args: &[String]) -> anyhow::Result<Child> {
    Command::new(exe)
        .arg("vm")
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .context("starting a vmigrate vm process")
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let memory = crate::vm::parse_memory(&args.memory).context("invalid --memory")?;
    let exe = std::env::current_exe()?;
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("vmigrate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut run = Run {
        dir: dir.clone(),
        children: Vec::new(),
    };
    let (src_ram, dst_ram) = (dir.join("src.ram"), dir.join("dst.ram"));
    let (src_qmp, dst_qmp) = (dir.join("src.qmp"), dir.join("dst.qmp"));
    let page = vmigrate_engine::memory::host_page_size() as usize;
    println!(
        "vmigrate demo: {} MiB guest, migrating over loopback TCP",
        memory >> 20
    );
    write_pattern(&src_ram, memory, page)?;
    let common = |ram: &Path, qmp: &Path| {
        vec![
            "--memory".to_string(),
            format!("{}M", memory >> 20),
            "--mem-path".into(),
            ram.display().to_string(),
            "--share".into(),
            "--qmp".into(),
            format!("unix:{}", qmp.display()),
        ]
    };
    run.children
        .push(spawn_vm(&exe, &common(&src_ram, &src_qmp))?);
    let mut dst_args = common(&dst_ram, &dst_qmp);
    dst_args.extend(["--incoming".into(), "defer".into()]);
    run.children.push(spawn_vm(&exe, &dst_args)?);
    let mut src = QmpClient::connect(&src_qmp, Duration::from_secs(10))?;
    let mut dst = QmpClient::connect(&dst_qmp, Duration::from_secs(10))?;

    dst.execute("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}))?;
    let info = dst.execute("query-migrate", json!({}))?;
    let port = info["socket-address"][0]["port"]
        .as_str()
        .context("destination did not report its port")?
        .to_string();
    src.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": args.max_bandwidth}),
    )?;
    let before = src.execute("query-status", json!({}))?;
    println!(
        "source is {}; destination listens on 127.0.0.1:{port}",
        before["status"].as_str().unwrap_or("?")
    );
    let started = Instant::now();
    src.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))?;
    let last = loop {
        let q = src.execute("query-migrate", json!({}))?;
        let status = q["status"].as_str().unwrap_or("").to_string();
        show_progress(&q, memory);
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            println!();
            break q;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if last["status"] != "completed" {
        bail!(
            "migration ended {}: {}",
            last["status"],
            last["error-desc"].as_str().unwrap_or("")
        );
    }
    let wait_dst = Instant::now();
    loop {
        let q = dst.execute("query-migrate", json!({}))?;
        if q["status"] == "completed" {
            break;
        }
        if q["status"] == "failed" || wait_dst.elapsed() > Duration::from_secs(30) {
            bail!("destination: {}", q);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ram = &last["ram"];
    println!(
        "completed in {} ms (downtime {} ms, setup {} ms): {} MiB sent, {} normal and {} zero pages, {} dirty syncs",
        last["total-time"],
        last["downtime"],
        last["setup-time"],
        ram["transferred"].as_u64().unwrap_or(0) >> 20,
        ram["normal"],
        ram["duplicate"],
        ram["dirty-sync-count"]
    );
    let src_state = src.execute("query-status", json!({}))?;
    let dst_state = dst.execute("query-status", json!({}))?;
    println!(
        "source is now {}, destination is {}",
        src_state["status"].as_str().unwrap_or("?"),
        dst_state["status"].as_str().unwrap_or("?")
    );
    let (a, b) = (digest(&src_ram)?, digest(&dst_ram)?);
    println!(
        "guest RAM digest: source {a:016x}, destination {b:016x} (wall {:.2} s)",
        started.elapsed().as_secs_f64()
    );
    if a != b {
        bail!("destination RAM differs from the source");
    }
    println!("destination RAM is identical to the source: the VM arrived intact");
    let _ = src.execute("quit", json!({}));
    let _ = dst.execute("quit", json!({}));
    Ok(())
}

fn show_progress(q: &Value, memory: u64) {
    let ram = &q["ram"];
    let sent = ram["transferred"].as_u64().unwrap_or(0);
    let remaining = ram["remaining"].as_u64().unwrap_or(memory);
    let done = memory.saturating_sub(remaining);
    let width = 30usize;
    let filled = ((done as f64 / memory as f64) * width as f64) as usize;
    let mbps = ram["mbps"].as_f64().unwrap_or(0.0);
    let eta = if mbps > 0.0 {
        format!("{:.1} s", remaining as f64 * 8.0 / (mbps * 1e6))
    } else {
        "-".into()
    };
    print!(
        "\r[{}{}] {:>9} sent {:>5} MiB remaining {:>5} MiB {:>8.1} Mbit/s dirty {:>6} pages/s ETA {:<8}",
        "#".repeat(filled.min(width)),
        " ".repeat(width - filled.min(width)),
        q["status"].as_str().unwrap_or(""),
        sent >> 20,
        remaining >> 20,
        mbps,
        ram["dirty-pages-rate"].as_u64().unwrap_or(0),
        eta
    );
    let _ = std::io::stdout().flush();
}
