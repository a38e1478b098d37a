//! Machines of the reference VM.

use std::path::PathBuf;
use std::sync::Arc;

use vmigrate_engine::memory::MemoryError;
use vmigrate_engine::vmm::{DeviceState, DirtyTracker, VmControl, Vmm};
use vmigrate_engine::{EventBus, RamBlock, RunState};

use crate::dirty::AtomicDirtyLog;
use crate::runstate::RunControl;
use crate::timer::GuestClock;

/// The machine types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineKind {
    /// RAM only: the same stream shape as `qemu-system-x86_64 -M none -nodefaults`.
    None,
}

impl MachineKind {
    pub fn name(self) -> &'static str {
        match self {
            MachineKind::None => "none",
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
}

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// A running reference VM.
pub struct Machine {
    kind: MachineKind,
    ram: Vec<Arc<RamBlock>>,
    dirty: AtomicDirtyLog,
    control: RunControl,
    clock: Arc<GuestClock>,
    uuid: Option<[u8; 16]>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("kind", &self.kind)
            .field("ram", &self.ram)
            .finish_non_exhaustive()
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
        let dirty = AtomicDirtyLog::new(&[block.pages()]);
        Ok(Self {
            kind: config.kind,
            ram: vec![Arc::new(block)],
            dirty,
            control: RunControl::new(config.initial, events),
            clock: Arc::new(GuestClock::default()),
            uuid: config.uuid,
        })
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
        &self.dirty
    }
    fn control(&self) -> &dyn VmControl {
        &self.control
    }
    fn devices(&self) -> Vec<Arc<dyn DeviceState>> {
        vec![self.clock.clone()]
    }
    fn uuid(&self) -> Option<[u8; 16]> {
        self.uuid
    }
}
