//! Machines of the reference VM.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde_json::{json, Value};
use vmigrate_engine::memory::MemoryError;
use vmigrate_engine::vmm::{DeviceState, DirtyTracker, VcpuDirtyControl, VmControl, Vmm, VmmError};
use vmigrate_engine::{EventBus, MigMode, RamBlock, RunState};

use crate::blockers::{cpr_ram_blocker, MigrationBlockers};
use crate::dirty::AtomicDirtyLog;
use crate::gate::VcpuGate;
use crate::runstate::RunControl;
use crate::serial::SerialSink;
use crate::soft::SoftWorkload;
use crate::timer::GuestClock;
use crate::workload::{DirtyRateMeter, VcpuRateMeter, WorkloadSpec};

/// The machine types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineKind {
    /// RAM only: the same stream shape as `qemu-system-x86_64 -M none -nodefaults`.
    None,
    /// RAM plus vCPUs running a workload, for live migration.
    Lab,
}

impl MachineKind {
    pub fn name(self) -> &'static str {
        match self {
            MachineKind::None => "none",
            MachineKind::Lab => "lab",
        }
    }
}

/// How a `lab` machine runs its vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Real vCPUs under KVM running a guest program from this repository.
    Kvm,
    /// Threads of the VM process that run the workload at native speed.
    Soft,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Soft => "soft",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "kvm" => Some(Accel::Kvm),
            "soft" | "tcg" => Some(Accel::Soft),
            _ => None,
        }
    }

    /// `kvm` where /dev/kvm can create a VM, else `soft`.
    pub fn host_default() -> Self {
        if crate::kvm::usable() {
            Accel::Kvm
        } else {
            Accel::Soft
        }
    }
}

/// The `lab` machine's options.
#[derive(Debug, Clone)]
pub struct LabConfig {
    pub accel: Accel,
    pub cpus: u32,
    pub workload: WorkloadSpec,
    /// `stdio`, `none` or a file path.
    pub serial: String,
    /// How a `kvm` guest's dirty pages are tracked.
    pub dirty_tracking: crate::kvm::DirtyTracking,
    /// How a `soft` guest's dirty pages are tracked.
    pub soft_dirty_tracking: crate::soft::DirtyTracking,
    /// A `none` machine runs `workload` on writer threads: their writes are dirty-tracked,
    /// they have no state that migrates (no device section), so the machine still
    /// migrates to and from QEMU's `-M none`, live.
    pub none_writers: bool,
}

impl Default for LabConfig {
    fn default() -> Self {
        Self {
            accel: Accel::Soft,
            cpus: 1,
            workload: WorkloadSpec::default(),
            serial: "none".into(),
            dirty_tracking: crate::kvm::DirtyTracking::Auto,
            soft_dirty_tracking: crate::soft::DirtyTracking::Bitmap,
            none_writers: false,
        }
    }
}

/// How to build a machine (the `vmigrate vm` command line).
#[derive(Debug, Clone)]
pub struct MachineConfig {
    pub kind: MachineKind,
    pub memory: u64,
    pub mem_path: Option<PathBuf>,
    pub share: bool,
    pub ram_id: String,
    pub uuid: Option<[u8; 16]>,
    pub initial: RunState,
    /// Used by the `lab` machine only.
    pub lab: LabConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("cannot open the serial output '{path}': {source}")]
    Serial {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Kvm(#[from] crate::kvm::KvmError),
    #[error(transparent)]
    Uffd(#[from] crate::uffd::UffdError),
}

/// What runs the guest.
enum Accelerator {
    /// No vCPUs (`none`).
    Idle,
    Soft {
        workload: Arc<SoftWorkload>,
        tracking: crate::soft::DirtyTracking,
    },
    Kvm(Arc<crate::kvm::KvmGuest>),
}

/// A running reference VM.
pub struct Machine {
    kind: MachineKind,
    ram: Vec<Arc<RamBlock>>,
    /// Writes the VMM itself makes to guest RAM (and the soft vCPUs' writes under
    /// `bitmap` tracking).
    dirty: Arc<AtomicDirtyLog>,
    /// What the engine syncs: `dirty`, or KVM's log or the kernel's userfaultfd
    /// write-protection tracking with `dirty` ORed in.
    tracker: Arc<dyn DirtyTracker>,
    control: RunControl,
    uuid: Option<[u8; 16]>,
    accel: Accelerator,
    gate: Option<Arc<VcpuGate>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    devices: Vec<Arc<dyn DeviceState>>,
    dirty_rate: DirtyRateMeter,
    /// Each vCPU's rate, from the workload's own per-vCPU counts.
    vcpu_rates: VcpuRateMeter,
    cpus: u32,
    blockers: MigrationBlockers,
    /// Started as a cpr-transfer destination (see [`Vmm::ram_handed_over`]).
    ram_handed_over: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("kind", &self.kind)
            .field("ram", &self.ram)
            .field("cpus", &self.cpus)
            .finish_non_exhaustive()
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Some(g) = &self.gate {
            g.shutdown();
        }
        for t in self
            .threads
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = t.join();
        }
    }
}

impl Machine {
    pub fn new(config: &MachineConfig, events: Arc<EventBus>) -> Result<Self, MachineError> {
        let block = match &config.mem_path {
            Some(path) => {
                RamBlock::from_file(&config.ram_id, path, config.memory, 0, config.share)?
            }
            None => RamBlock::anonymous(&config.ram_id, config.memory, 0)?,
        };
        let block = Arc::new(block);
        let blockers = MigrationBlockers::default();
        if config.mem_path.is_none() || !config.share {
            // Only RAM in a shared file can be handed to a new process.
            blockers.add(Some(MigMode::CprTransfer), cpr_ram_blocker(block.idstr()));
        }
        let dirty = Arc::new(AtomicDirtyLog::new(&[block.pages()]));
        let clock = Arc::new(GuestClock::default());
        let mut machine = Self {
            kind: config.kind,
            ram: vec![block.clone()],
            dirty: dirty.clone(),
            tracker: dirty.clone(),
            control: RunControl::new(config.initial, events.clone()),
            uuid: config.uuid,
            accel: Accelerator::Idle,
            gate: None,
            threads: Mutex::new(Vec::new()),
            devices: vec![clock],
            dirty_rate: DirtyRateMeter::default(),
            vcpu_rates: VcpuRateMeter::default(),
            cpus: 0,
            blockers,
            ram_handed_over: std::sync::atomic::AtomicBool::new(false),
        };
        let lab = &config.lab;
        if config.kind == MachineKind::None && !lab.none_writers {
            return Ok(machine);
        }
        let sink =
            Arc::new(
                SerialSink::open(&lab.serial).map_err(|source| MachineError::Serial {
                    path: lab.serial.clone(),
                    source,
                })?,
            );
        let gate = Arc::new(VcpuGate::new());
        machine.cpus = lab.cpus.max(1);
        match lab.accel {
            Accel::Soft => {
                let tracking = lab.soft_dirty_tracking;
                let vcpu_dirty = match tracking {
                    crate::soft::DirtyTracking::Bitmap => Some(dirty),
                    crate::soft::DirtyTracking::UffdWp => {
                        machine.tracker = Arc::new(crate::uffd::UffdWpTracker::new(
                            block.clone(),
                            dirty,
                            config.mem_path.is_some() && config.share,
                        )?);
                        None
                    }
                };
                let workload = Arc::new(SoftWorkload::new(
                    lab.workload,
                    machine.cpus,
                    block,
                    vcpu_dirty,
                    sink,
                    gate.clone(),
                ));
                let threads = workload.spawn().map_err(MachineError::Thread)?;
                *machine.threads.get_mut().unwrap_or_else(|e| e.into_inner()) = threads;
                if config.kind == MachineKind::Lab {
                    machine.devices.push(workload.clone());
                }
                machine.accel = Accelerator::Soft { workload, tracking };
            }
            Accel::Kvm => {
                let guest = Arc::new(crate::kvm::KvmGuest::new(
                    block,
                    machine.cpus,
                    lab.workload,
                    sink,
                    gate.clone(),
                    dirty,
                    lab.dirty_tracking,
                    config.initial == RunState::InMigrate,
                )?);
                let threads = guest.spawn().map_err(MachineError::Thread)?;
                *machine.threads.get_mut().unwrap_or_else(|e| e.into_inner()) = threads;
                machine.devices.extend(guest.devices());
                machine.tracker = guest.clone();
                machine.accel = Accelerator::Kvm(guest);
            }
        }
        machine.control = RunControl::with_vcpus(config.initial, events, gate.clone());
        machine.gate = Some(gate);
        Ok(machine)
    }

    /// Registers a migration blocker for `mode`, or for every mode when `None`.
    /// Marks the VM as a cpr-transfer destination: its RAM came with the CPR state.
    pub fn set_ram_handed_over(&self) {
        self.ram_handed_over
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn add_migration_blocker(&self, mode: Option<MigMode>, reason: impl Into<String>) {
        self.blockers.add(mode, reason);
    }

    /// `query-workload`: the workload's counters, or `None` on a machine without one.
    pub fn query_workload(&self) -> Option<Value> {
        let throttle = self.gate.as_ref().map_or(0, |g| g.throttle());
        let running = self.control.run_state().is_running();
        let (accel, spec, hot, c) = match &self.accel {
            Accelerator::Idle => return None,
            Accelerator::Soft { workload: w, .. } => {
                (Accel::Soft, w.spec(), w.hot_bytes(), w.counters())
            }
            Accelerator::Kvm(g) => (Accel::Kvm, g.spec(), g.hot_bytes(), g.counters()),
        };
        let ps = self.ram.first().map_or(0, |b| b.page_size());
        let mut w = json!({
            "machine": self.kind.name(),
            "accel": accel.name(),
            "vcpus": self.cpus,
            "workload": spec.to_string(),
            "running": running,
            "hot-bytes": hot,
            "verify": spec.verify,
            "passes": c.passes,
            "violations": c.violations,
            "pages-written": c.pages_written,
            "dirty-rate": self.dirty_rate.rate(c.local_written * ps),
            "cpu-throttle-percentage": throttle,
        });
        let per_vcpu = match &self.accel {
            Accelerator::Soft { workload, .. } => workload.vcpu_pages_written(),
            Accelerator::Kvm(g) => g.vcpu_pages_written(),
            Accelerator::Idle => Vec::new(),
        };
        let per_vcpu: Vec<u64> = per_vcpu.iter().map(|p| p * ps).collect();
        w["vcpu-dirty-rates"] = json!(self.vcpu_rates.rates(&per_vcpu));
        w["vcpu-bytes-written"] = json!(per_vcpu);
        match &self.accel {
            Accelerator::Kvm(g) => {
                w["dirty-tracking"] = json!(g.dirty_tracking().to_string());
                w["dirty-ring-full-exits"] = json!(g.ring_full_exits());
                w["dirty-ring-overflows"] = json!(g.ring_overflows());
            }
            Accelerator::Soft { tracking, .. } => {
                w["dirty-tracking"] = json!(tracking.to_string());
            }
            Accelerator::Idle => {}
        }
        Some(w)
    }

    /// Copies guest-physical memory `gpa..gpa+out.len()` into `out`; false when the
    /// range is not all RAM.
    pub fn read_physical(&self, gpa: u64, out: &mut [u8]) -> bool {
        let mut done = 0usize;
        while done < out.len() {
            let addr = gpa + done as u64;
            let Some(b) = self
                .ram
                .iter()
                .find(|b| addr >= b.gpa() && addr < b.gpa() + b.len())
            else {
                return false;
            };
            let off = addr - b.gpa();
            let n = ((b.len() - off) as usize).min(out.len() - done);
            b.read(off, &mut out[done..done + n]);
            done += n;
        }
        true
    }

    /// Writes guest-physical memory on behalf of the VMM (marks the pages dirty).
    pub fn write_physical(&self, gpa: u64, data: &[u8]) -> bool {
        let Some((bi, b)) = self
            .ram
            .iter()
            .enumerate()
            .find(|(_, b)| gpa >= b.gpa() && gpa + data.len() as u64 <= b.gpa() + b.len())
        else {
            return false;
        };
        let off = gpa - b.gpa();
        b.write(off, data);
        let ps = b.page_size();
        let first = off / ps;
        let last = (off + data.len().max(1) as u64 - 1) / ps;
        self.dirty
            .mark(bi, first as usize, (last - first + 1) as usize);
        true
    }
}

impl Vmm for Machine {
    fn machine_name(&self) -> &str {
        self.kind.name()
    }
    fn ram_blocks(&self) -> &[Arc<RamBlock>] {
        &self.ram
    }
    fn dirty_tracker(&self) -> &dyn DirtyTracker {
        &*self.tracker
    }
    fn control(&self) -> &dyn VmControl {
        &self.control
    }
    fn devices(&self) -> Vec<Arc<dyn DeviceState>> {
        self.devices.clone()
    }
    fn uuid(&self) -> Option<[u8; 16]> {
        self.uuid
    }
    fn migration_blockers(&self, mode: MigMode) -> Vec<String> {
        self.blockers.for_mode(mode)
    }
    fn ram_handed_over(&self) -> bool {
        self.ram_handed_over
            .load(std::sync::atomic::Ordering::Relaxed)
    }
    fn vcpu_thread_ids(&self) -> Vec<u32> {
        self.vcpu_threads().map_or_else(Vec::new, |t| t.snapshot())
    }
    /// `soft` vCPUs count what each thread marks (QEMU has no dirty limit without KVM;
    /// vmigrate offers it there too); KVM vCPUs need a dirty ring each, as on QEMU.
    fn vcpu_dirty_control(&self) -> Option<&dyn VcpuDirtyControl> {
        match &self.accel {
            Accelerator::Soft { .. } => Some(self),
            Accelerator::Kvm(g) if g.has_dirty_rings() => Some(self),
            _ => None,
        }
    }
}

impl VcpuDirtyControl for Machine {
    fn vcpu_count(&self) -> usize {
        self.cpus as usize
    }

    fn is_dirty_ring(&self) -> bool {
        matches!(&self.accel, Accelerator::Kvm(g) if g.has_dirty_rings())
    }

    fn start_counting(&self) -> Result<(), VmmError> {
        match &self.accel {
            Accelerator::Kvm(g) => g.start_ring_counting(),
            _ => Ok(()),
        }
    }

    fn stop_counting(&self) {
        if let Accelerator::Kvm(g) = &self.accel {
            g.stop_ring_counting();
        }
    }

    fn dirtied_pages(&self) -> Result<Vec<u64>, VmmError> {
        match &self.accel {
            Accelerator::Soft { workload, .. } => Ok(workload.vcpu_pages_written()),
            Accelerator::Kvm(g) => g.ring_pages_harvested(),
            Accelerator::Idle => Ok(Vec::new()),
        }
    }

    fn set_vcpu_sleep(&self, index: usize, sleep_us_per_mib: u32) -> Result<(), VmmError> {
        match &self.gate {
            Some(g) if g.set_vcpu_sleep(index, sleep_us_per_mib) => Ok(()),
            _ => Err(VmmError::Other(format!("no vCPU {index} to throttle"))),
        }
    }
}

impl Machine {
    /// The host threads of the soft or KVM vCPUs (none on a `none` machine).
    fn vcpu_threads(&self) -> Option<&crate::vcpu_threads::VcpuThreadIds> {
        match &self.accel {
            Accelerator::Idle => None,
            Accelerator::Soft { workload, .. } => Some(workload.vcpu_threads()),
            Accelerator::Kvm(guest) => Some(guest.vcpu_threads()),
        }
    }
}
