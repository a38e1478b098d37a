//! A minimal VMM that embeds the vmigrate engine, with guest memory from rust-vmm's
//! `vm-memory`: `cargo run --release --example embed`.
//!
//! It builds a `GuestMemoryMmap<AtomicBitmap>` of two regions, hands the regions to the
//! engine as RAM blocks (`vmigrate_engine::guest_memory`), implements the rest of the
//! seam (`Vmm`, `VmControl`; dirty pages come from vm-memory's bitmap), starts a second
//! instance of itself as the destination, and migrates live to it over a unix socket
//! while a thread keeps writing guest memory through vm-memory. Once the migration has
//! completed, the destination reports a digest of its guest memory and this process
//! compares it with its own (its writer stopped at the switchover): one line says
//! whether the copy is exact.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmigrate_engine::guest_memory::{ram_blocks, BitmapDirtyTracker};
use vmigrate_engine::migrator::Migrator;
use vmigrate_engine::{
    DeviceState, DirtyTracker, EventBus, IncomingMode, MigrationStatus, RamBlock, RunState,
    VmControl, Vmm,
};

type Memory = GuestMemoryMmap<AtomicBitmap>;

/// Guest memory: 32 MiB at 0 and 8 MiB at 4 GiB, as a VMM with a PCI hole would lay it.
const REGIONS: [(u64, usize); 2] = [(0, 32 << 20), (1 << 32, 8 << 20)];

/// The part of region 0 the guest keeps writing.
const HOT_BYTES: u64 = 4 << 20;

fn guest_memory() -> anyhow::Result<Memory> {
    let ranges: Vec<_> = REGIONS
        .iter()
        .map(|&(gpa, len)| (GuestAddress(gpa), len))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).context("creating guest memory")
}

/// Run control: a running guest is the writer thread, which parks when the VM stops.
struct Control {
    state: Mutex<RunState>,
    stop_requested: AtomicBool,
    writer_parked: AtomicBool,
}

impl Control {
    fn new(state: RunState) -> Self {
        Self {
            state: Mutex::new(state),
            stop_requested: AtomicBool::new(state != RunState::Running),
            writer_parked: AtomicBool::new(true),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl VmControl for Control {
    fn run_state(&self) -> RunState {
        *self.lock()
    }

    fn vm_stop(&self, state: RunState) {
        self.stop_requested.store(true, Ordering::SeqCst);
        // The guest is stopped once its writer no longer writes.
        while !self.writer_parked.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        *self.lock() = state;
    }

    fn vm_start(&self) {
        *self.lock() = RunState::Running;
        self.stop_requested.store(false, Ordering::SeqCst);
    }

    fn set_run_state(&self, state: RunState) {
        *self.lock() = state;
    }
}

/// The seam: RAM blocks over vm-memory's regions, its bitmap as the dirty tracker.
struct EmbedVmm {
    blocks: Vec<Arc<RamBlock>>,
    tracker: BitmapDirtyTracker,
    control: Arc<Control>,
}

impl EmbedVmm {
    fn new(mem: &Memory, control: Arc<Control>) -> anyhow::Result<Self> {
        Ok(Self {
            blocks: ram_blocks(mem, |i| format!("ram{i}"))?,
            tracker: BitmapDirtyTracker::new(mem),
            control,
        })
    }
}

impl Vmm for EmbedVmm {
    fn machine_name(&self) -> &str {
        "embed"
    }
    fn ram_blocks(&self) -> &[Arc<RamBlock>] {
        &self.blocks
    }
    fn dirty_tracker(&self) -> &dyn DirtyTracker {
        &self.tracker
    }
    fn control(&self) -> &dyn VmControl {
        self.control.as_ref()
    }
    fn devices(&self) -> Vec<Arc<dyn DeviceState>> {
        Vec::new()
    }
    fn uuid(&self) -> Option<[u8; 16]> {
        None
    }
}

/// FNV-1a over all guest memory, read through vm-memory.
fn digest(mem: &Memory) -> anyhow::Result<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; 1 << 20];
    for region in mem.iter() {
        let mut at = 0u64;
        while at < region.len() {
            let n = buf.len().min((region.len() - at) as usize);
            mem.read_slice(&mut buf[..n], GuestAddress(region.start_addr().0 + at))?;
            for w in buf[..n].chunks_exact(8) {
                h ^= u64::from_le_bytes(w.try_into()?);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            at += n as u64;
        }
    }
    Ok(h)
}

fn wait_status(m: &Migrator, timeout: Duration) -> anyhow::Result<MigrationStatus> {
    let t0 = Instant::now();
    loop {
        let status = m.status();
        if matches!(
            status,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        ) {
            return Ok(status);
        }
        if t0.elapsed() > timeout {
            bail!("migration still {} after {timeout:?}", status.name());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The destination: empty guest memory of the same layout, loads the stream, prints
/// the digest of what arrived.
fn destination(socket: &Path) -> anyhow::Result<()> {
    let mem = guest_memory()?;
    let control = Arc::new(Control::new(RunState::InMigrate));
    let vmm = Arc::new(EmbedVmm::new(&mem, control)?);
    let m = Migrator::new(vmm, EventBus::new(), IncomingMode::Deferred);
    let addr = Migrator::parse_target(Some(&format!("unix:{}", socket.display())), None, true)?;
    m.migrate_incoming(addr, false)?;
    println!("listening");
    let status = wait_status(&m, Duration::from_secs(60))?;
    if status != MigrationStatus::Completed {
        bail!(
            "destination: migration {}: {}",
            status.name(),
            m.query_migrate()
        );
    }
    println!("digest {:016x}", digest(&mem)?);
    Ok(())
}

fn source() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("vmigrate-embed-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("migration.sock");
    let result = run_source(&socket);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_source(socket: &Path) -> anyhow::Result<()> {
    let mem = guest_memory()?;
    // Some data in every region before the guest starts writing.
    for (i, region) in mem.iter().enumerate() {
        let mut at = 0;
        while at < region.len() {
            let value = ((i as u64) << 56) | at;
            mem.write_obj(value, GuestAddress(region.start_addr().0 + at))?;
            at += 512;
        }
    }
    let control = Arc::new(Control::new(RunState::Running));
    let vmm = Arc::new(EmbedVmm::new(&mem, control.clone())?);

    let mut child = Command::new(std::env::current_exe()?)
        .arg("--destination")
        .arg(socket)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the destination")?;
    let mut lines = BufReader::new(child.stdout.take().context("destination stdout")?).lines();
    match lines.next() {
        Some(Ok(l)) if l == "listening" => {}
        other => bail!("destination did not start: {other:?}"),
    }

    // The guest: a thread writing pages through vm-memory (so its bitmap sees them)
    // until the VM stops.
    let writes = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (mem, control, writes, done) =
            (mem.clone(), control.clone(), writes.clone(), done.clone());
        control.writer_parked.store(false, Ordering::SeqCst);
        std::thread::spawn(move || {
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            while !done.load(Ordering::SeqCst) {
                if control.stop_requested.load(Ordering::SeqCst) {
                    control.writer_parked.store(true, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                control.writer_parked.store(false, Ordering::SeqCst);
                if control.stop_requested.load(Ordering::SeqCst) {
                    continue;
                }
                // xorshift: a word in the first 4 MiB (the guest's hot set), about
                // 20 000 writes a second: the dirty set stays small enough to converge.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let addr = ((x >> 8) % HOT_BYTES) & !7;
                let _ = mem.write_obj(x, GuestAddress(addr));
                if writes.fetch_add(1, Ordering::Relaxed) % 20 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            control.writer_parked.store(true, Ordering::SeqCst);
        })
    };

    let events = EventBus::new();
    let m = Migrator::new(vmm, events, IncomingMode::Disabled);
    // A capped link, so the guest writes during several passes.
    let params = serde_json::json!({"max-bandwidth": 64u64 << 20});
    m.set_parameters(params.as_object().context("parameters")?)?;
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    let addr = Migrator::parse_target(Some(&format!("unix:{}", socket.display())), None, false)?;
    m.migrate(addr, false, None)?;
    let status = wait_status(&m, Duration::from_secs(60))?;
    let elapsed = started.elapsed();
    let info = m.query_migrate();
    done.store(true, Ordering::SeqCst);
    let _ = writer.join();
    if status != MigrationStatus::Completed {
        let _ = child.kill();
        bail!("migration {}: {info}", status.name());
    }
    let dst_digest = match lines.next() {
        Some(Ok(l)) => l
            .strip_prefix("digest ")
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .with_context(|| format!("unexpected destination output {l:?}"))?,
        other => bail!("destination reported nothing: {other:?}"),
    };
    let exit = child.wait()?;
    if !exit.success() {
        bail!("destination exited with {exit}");
    }
    let src_digest = digest(&mem)?;
    let total: usize = REGIONS.iter().map(|r| r.1).sum();
    let verdict = if src_digest == dst_digest {
        "identical"
    } else {
        "DIFFERENT"
    };
    println!(
        "embed: {} MiB of vm-memory guest RAM in {} regions migrated live to a second process \
         over unix socket in {} ms ({} passes, downtime {} ms) while the guest made {} writes; \
         the copy is {verdict} (digest {src_digest:016x} / {dst_digest:016x})",
        total >> 20,
        REGIONS.len(),
        elapsed.as_millis(),
        info["ram"]["dirty-sync-count"],
        info["downtime"],
        writes.load(Ordering::Relaxed),
    );
    if src_digest != dst_digest {
        bail!("the destination's guest memory differs from the source's");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--destination") => {
            let socket = PathBuf::from(args.get(2).context("--destination needs a socket path")?);
            destination(&socket)
        }
        Some(other) => bail!("unknown argument {other:?} (run with no arguments)"),
        None => source(),
    }
}
