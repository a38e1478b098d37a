//! `vmigrate demo`: starts a `lab` source VM whose vCPU runs a self-checking workload
//! (every page of a hot set rewritten pass after pass, each page checked before it is
//! rewritten) and a destination, live-migrates the running guest over loopback TCP
//! while showing progress, and shows that it arrived intact: guest RAM at switchover is
//! identical on both sides, and the guest's own self-check keeps passing on the
//! destination with its pass count continuing from the source's.

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
    /// The guest's workload (`hot=SIZE,rate=BYTES_PER_S`; the self-check is always on).
    #[arg(long, default_value = "hot=128M,rate=200M")]
    workload: String,
    /// The lab machine's accelerator (`soft` or `kvm`).
    #[arg(long, default_value = "soft")]
    accel: String,
    /// Bandwidth cap in bytes/s so the transfer can be watched (0 = unlimited).
    #[arg(long, default_value_t = 512 << 20)]
    max_bandwidth: u64,
    /// Also write the migration's timeline as an HTML page with charts to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
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
    let workload = format!("{},verify", args.workload);
    let common = |ram: &Path, qmp: &Path| {
        vec![
            "--machine".to_string(),
            "lab".into(),
            "--accel".into(),
            args.accel.clone(),
            "--workload".into(),
            workload.clone(),
            "--memory".into(),
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
    // Paused on arrival, so its RAM can be compared before the guest runs on.
    dst_args.extend(["--incoming".into(), "defer".into(), "--paused".into()]);
    run.children.push(spawn_vm(&exe, &dst_args)?);
    let mut src = QmpClient::connect(&src_qmp, Duration::from_secs(10))?;
    let mut dst = QmpClient::connect(&dst_qmp, Duration::from_secs(10))?;

    println!(
        "vmigrate demo: a {} MiB `lab` guest ({}, workload {workload}) live-migrating over loopback TCP",
        memory >> 20,
        args.accel
    );
    let w = wait_passes(&mut src, 2, Duration::from_secs(20))?;
    std::thread::sleep(Duration::from_millis(600));
    let w = {
        let now = src.execute("query-workload", json!({}))?;
        if now["dirty-rate"].as_u64().unwrap_or(0) > 0 {
            now
        } else {
            w
        }
    };
    println!(
        "source guest: running, {} passes over its {} MiB hot set, dirtying {:.0} MB/s, {} violations",
        w["passes"],
        w["hot-bytes"].as_u64().unwrap_or(0) >> 20,
        w["dirty-rate"].as_u64().unwrap_or(0) as f64 / 1e6,
        w["violations"]
    );

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
    let started = Instant::now();
    src.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))?;
    let last = loop {
        let q = src.execute("query-migrate", json!({}))?;
        let wl = src.execute("query-workload", json!({}))?;
        show_progress(&q, &wl, memory);
        if matches!(
            q["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
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
    let wall = started.elapsed();
    // The source stopped its vCPUs at switchover and the destination arrived paused:
    // both RAMs and counters are as they were at switchover.
    let at_switchover = src.execute("query-workload", json!({}))?;
    let src_digest = digest(&src_ram)?;
    let ram = &last["ram"];
    println!(
        "completed in {} ms (setup {} ms, downtime {} ms): {:.1} MiB sent, {} passes over RAM (dirty syncs), {} normal and {} zero pages",
        last["total-time"],
        last["setup-time"],
        last["downtime"],
        ram["transferred"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
        ram["dirty-sync-count"],
        ram["normal"],
        ram["duplicate"],
    );
    if let Some(page) = &args.report {
        let timeline = src.execute(crate::report::TIMELINE_COMMAND, json!({}))?;
        crate::report::write_page(&timeline, page)?;
        println!(
            "migration report (charts of this migration): {}",
            page.display()
        );
    }
    let dst_digest = digest(&dst_ram)?;
    println!("guest RAM at switchover: source {src_digest:016x}, destination {dst_digest:016x}");
    if src_digest != dst_digest {
        bail!("destination RAM differs from the source's at switchover");
    }
    let arrived = dst.execute("query-workload", json!({}))?;
    dst.execute("cont", json!({}))?;
    let target = arrived["passes"].as_u64().unwrap_or(0) + 3;
    let verdict = wait_passes(&mut dst, target, Duration::from_secs(20))?;
    let src_state = src.execute("query-status", json!({}))?;
    let dst_state = dst.execute("query-status", json!({}))?;
    println!(
        "source is now {}, destination is {} (wall {:.2} s)",
        src_state["status"].as_str().unwrap_or("?"),
        dst_state["status"].as_str().unwrap_or("?"),
        wall.as_secs_f64()
    );
    println!(
        "guest's verdict: {} passes on the source at switchover, {} on arrival, {} now on the destination; {} violations",
        at_switchover["passes"], arrived["passes"], verdict["passes"], verdict["violations"]
    );
    if arrived["passes"] != at_switchover["passes"] || verdict["violations"] != 0 {
        bail!("the guest's self-check failed on the destination: {verdict}");
    }
    println!(
        "the guest's self-check holds on the destination: every page arrived, nothing was lost"
    );
    let _ = src.execute("quit", json!({}));
    let _ = dst.execute("quit", json!({}));
    Ok(())
}

fn wait_passes(q: &mut QmpClient, passes: u64, timeout: Duration) -> anyhow::Result<Value> {
    let t0 = Instant::now();
    loop {
        let w = q.execute("query-workload", json!({}))?;
        if w["passes"].as_u64().unwrap_or(0) >= passes {
            return Ok(w);
        }
        if t0.elapsed() > timeout {
            bail!("the guest's workload did not reach {passes} passes: {w}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn show_progress(q: &Value, wl: &Value, memory: u64) {
    let ram = &q["ram"];
    let sent = ram["transferred"].as_u64().unwrap_or(0);
    let remaining = ram["remaining"].as_u64().unwrap_or(memory);
    let done = memory.saturating_sub(remaining);
    let width = 20usize;
    let filled = (((done as f64 / memory as f64) * width as f64) as usize).min(width);
    let mbps = ram["mbps"].as_f64().unwrap_or(0.0);
    // Zero pages cost almost nothing on the wire, so the ETA uses the page rate.
    let page_rate =
        ram["pages-per-second"].as_u64().unwrap_or(0) * ram["page-size"].as_u64().unwrap_or(4096);
    let eta = if page_rate > 0 {
        format!("{:.1} s", remaining as f64 / page_rate as f64)
    } else {
        "-".into()
    };
    print!(
        "\r[{}{}] {:<9} sent {:>4} MiB  left {:>4} MiB  dirty {:>4.0} MB/s  bw {:>5.0} MB/s  ETA {:<6}",
        "#".repeat(filled),
        " ".repeat(width - filled),
        q["status"].as_str().unwrap_or(""),
        sent >> 20,
        remaining >> 20,
        wl["dirty-rate"].as_u64().unwrap_or(0) as f64 / 1e6,
        mbps / 8.0,
        eta
    );
    let _ = std::io::stdout().flush();
}
