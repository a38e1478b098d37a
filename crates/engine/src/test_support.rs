//! A fake VMM for the engine's own tests: anonymous RAM blocks, a dirty log that the
//! test's writes mark, a run state, no devices. Sessions run against it exactly as
//! against a real VMM, over real files and sockets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::events::EventBus;
use crate::memory::{host_page_size, RamBlock};
use crate::migrator::Migrator;
use crate::shared::IncomingMode;
use crate::status::{MigrationStatus, RunState};
use crate::vmm::{DeviceState, DirtyBitmap, DirtyTracker, VmControl, Vmm, VmmError};

/// Pages written since the last sync, one atomic bitmap per block.
#[derive(Debug)]
pub(crate) struct FakeDirtyLog {
    blocks: Vec<Vec<AtomicU64>>,
}

impl FakeDirtyLog {
    fn new(pages: &[usize]) -> Self {
        Self {
            blocks: pages
                .iter()
                .map(|p| (0..p.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
                .collect(),
        }
    }

    fn mark(&self, block: usize, page: usize) {
        self.blocks[block][page / 64].fetch_or(1 << (page % 64), Ordering::AcqRel);
    }
}

impl DirtyTracker for FakeDirtyLog {
    fn start(&self) -> Result<(), VmmError> {
        Ok(())
    }

    fn sync(&self, block: usize, out: &mut DirtyBitmap) -> Result<(), VmmError> {
        for (wi, w) in self.blocks[block].iter().enumerate() {
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                out.set(wi * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
        Ok(())
    }

    fn requeue(&self, block: usize, pages: &DirtyBitmap) {
        for p in pages.iter_set() {
            self.mark(block, p);
        }
    }

    fn stop(&self) {}
}

/// The run state, and every state it went through.
#[derive(Debug)]
pub(crate) struct FakeControl {
    state: Mutex<Vec<RunState>>,
}

impl FakeControl {
    /// Every run state so far, the current one last.
    pub(crate) fn history(&self) -> Vec<RunState> {
        self.state.lock().unwrap().clone()
    }
}

impl VmControl for FakeControl {
    fn run_state(&self) -> RunState {
        *self.state.lock().unwrap().last().expect("a run state")
    }
    fn vm_stop(&self, state: RunState) {
        self.state.lock().unwrap().push(state);
    }
    fn vm_start(&self) {
        self.state.lock().unwrap().push(RunState::Running);
    }
    fn set_run_state(&self, state: RunState) {
        self.state.lock().unwrap().push(state);
    }
}

/// A RAM-only machine named `none`, as the reference VM's.
#[derive(Debug)]
pub(crate) struct FakeVmm {
    blocks: Vec<Arc<RamBlock>>,
    pub(crate) dirty: FakeDirtyLog,
    pub(crate) control: FakeControl,
    /// The host thread ids that play the vCPUs, by index (none by default).
    pub(crate) vcpu_threads: Mutex<Vec<u32>>,
}

impl FakeVmm {
    /// One anonymous block `ram` of `pages` host pages, in run state `state`.
    pub(crate) fn new(pages: usize, state: RunState) -> Arc<Self> {
        let len = pages as u64 * host_page_size();
        let block = Arc::new(RamBlock::anonymous("ram", len, 0).expect("guest RAM"));
        Arc::new(Self {
            dirty: FakeDirtyLog::new(&[block.pages()]),
            blocks: vec![block],
            control: FakeControl {
                state: Mutex::new(vec![state]),
            },
            vcpu_threads: Mutex::new(Vec::new()),
        })
    }

    /// Writes `page` full of `byte`, as a guest would, and marks it dirty.
    pub(crate) fn write_page(&self, page: usize, byte: u8) {
        let ps = host_page_size();
        self.blocks[0].write(page as u64 * ps, &vec![byte; ps as usize]);
        self.dirty.mark(0, page);
    }

    /// The whole of guest RAM, copied.
    pub(crate) fn ram(&self) -> Vec<u8> {
        let b = &self.blocks[0];
        let mut out = vec![0; b.len() as usize];
        b.read(0, &mut out);
        out
    }
}

impl Vmm for FakeVmm {
    fn machine_name(&self) -> &str {
        "none"
    }
    fn ram_blocks(&self) -> &[Arc<RamBlock>] {
        &self.blocks
    }
    fn dirty_tracker(&self) -> &dyn DirtyTracker {
        &self.dirty
    }
    fn control(&self) -> &dyn VmControl {
        &self.control
    }
    fn devices(&self) -> Vec<Arc<dyn DeviceState>> {
        Vec::new()
    }
    fn uuid(&self) -> Option<[u8; 16]> {
        None
    }
    fn vcpu_thread_ids(&self) -> Vec<u32> {
        self.vcpu_threads.lock().unwrap().clone()
    }
}

/// A migrator for `vmm` whose `MIGRATION` events (statuses, in order) are recorded.
pub(crate) fn recorded_migrator(
    vmm: Arc<FakeVmm>,
    incoming: IncomingMode,
) -> (Arc<Migrator>, Arc<Mutex<Vec<String>>>) {
    let events = EventBus::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    events.subscribe(move |name, data| {
        if name == "MIGRATION" {
            let status = data
                .and_then(|d| d.get("status"))
                .and_then(|v| v.as_str())
                .unwrap_or("?");
            s.lock().unwrap().push(status.to_string());
        }
    });
    let m = Migrator::new(vmm, events, incoming);
    m.set_capabilities(&serde_json::json!([{"capability": "events", "state": true}]))
        .expect("events capability");
    (m, seen)
}

/// Waits until the migration has ended (or `limit` passed) and returns its status.
pub(crate) fn wait_for_end(m: &Migrator, limit: Duration) -> MigrationStatus {
    let t0 = Instant::now();
    loop {
        let s = m.status();
        if !s.is_running() || t0.elapsed() > limit {
            return s;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The MIGRATION statuses a [`recorded_migrator`] saw, once the last is an end
/// (`completed`, `failed`, `cancelled`) or 10 s have passed: the status changes before
/// its event goes out, so a test that saw the end in the status waits for the event.
pub(crate) fn ended_events(seen: &Mutex<Vec<String>>) -> Vec<String> {
    let t0 = Instant::now();
    loop {
        let events = seen.lock().unwrap().clone();
        let ended = matches!(
            events.last().map(String::as_str),
            Some("completed" | "failed" | "cancelled")
        );
        if ended || t0.elapsed() > Duration::from_secs(10) {
            return events;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A path for a test's file that no other test uses.
pub(crate) fn temp_path(name: &str) -> std::path::PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "vmigrate-engine-{}-{}-{name}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}
