//! What the fuzz targets share: an in-memory VMM for the destination, and a memfd
//! holding the input (a seekable descriptor, as a `file:` migration reads).

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};

use vmigrate_engine::vmm::DeviceLoadError;
use vmigrate_engine::{
    DeviceState, DirtyBitmap, DirtyTracker, RamBlock, RunState, VmControl, Vmm, VmmError,
};
use vmigrate_stream::{DecodeError, Source};

/// A destination writes nothing on its own: nothing is ever dirty.
#[derive(Debug)]
pub struct Quiet;

impl DirtyTracker for Quiet {
    fn start(&self) -> Result<(), VmmError> {
        Ok(())
    }
    fn sync(&self, _block: usize, _out: &mut DirtyBitmap) -> Result<(), VmmError> {
        Ok(())
    }
    fn requeue(&self, _block: usize, _pages: &DirtyBitmap) {}
    fn stop(&self) {}
}

/// Run control without vCPUs.
#[derive(Debug)]
pub struct Control(Mutex<RunState>);

impl VmControl for Control {
    fn run_state(&self) -> RunState {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn vm_stop(&self, state: RunState) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = state
    }
    fn vm_start(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = RunState::Running
    }
    fn set_run_state(&self, state: RunState) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = state
    }
}

/// A device section whose body is a fixed number of bytes (QEMU's `timer` has three
/// 64-bit fields), read through the engine's source as a real device would.
#[derive(Debug)]
pub struct FixedDevice {
    pub idstr: &'static str,
    pub version: u32,
    pub len: usize,
}

impl DeviceState for FixedDevice {
    fn idstr(&self) -> &str {
        self.idstr
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn save(&self) -> Result<Vec<u8>, VmmError> {
        Ok(vec![0; self.len])
    }
    fn load(&self, src: &mut dyn Source, _version: u32) -> Result<(), DeviceLoadError> {
        let mut buf = vec![0u8; self.len];
        src.fill(&mut buf, "device body")
            .map_err(DeviceLoadError::from)?;
        Ok(())
    }
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({"name": self.idstr, "version": self.version, "fields": []})
    }
}

/// The in-memory VMM a fuzzed stream loads into: the 8 MiB block `m0` of the QEMU
/// captures, `pc.ram` of `-M none -m 8M`, and a `timer` device.
#[derive(Debug)]
pub struct MemVm {
    ram: Vec<Arc<RamBlock>>,
    tracker: Quiet,
    control: Control,
}

impl Vmm for MemVm {
    fn machine_name(&self) -> &str {
        "none"
    }
    fn ram_blocks(&self) -> &[Arc<RamBlock>] {
        &self.ram
    }
    fn dirty_tracker(&self) -> &dyn DirtyTracker {
        &self.tracker
    }
    fn control(&self) -> &dyn VmControl {
        &self.control
    }
    fn devices(&self) -> Vec<Arc<dyn DeviceState>> {
        vec![Arc::new(FixedDevice {
            idstr: "timer",
            version: 2,
            len: 24,
        })]
    }
    fn uuid(&self) -> Option<[u8; 16]> {
        None
    }
}

/// One VMM for the whole run (mapping RAM per input would dominate the time).
pub fn vm() -> Arc<MemVm> {
    static VM: OnceLock<Arc<MemVm>> = OnceLock::new();
    VM.get_or_init(|| {
        let block =
            |name: &str, gpa| Arc::new(RamBlock::anonymous(name, 8 << 20, gpa).expect("map RAM"));
        Arc::new(MemVm {
            ram: vec![block("m0", 0), block("pc.ram", 8 << 20)],
            tracker: Quiet,
            control: Control(Mutex::new(RunState::InMigrate)),
        })
    })
    .clone()
}

/// A memfd holding `data`, positioned at its start.
pub fn memfd(data: &[u8]) -> OwnedFd {
    // SAFETY: memfd_create takes a NUL-terminated name and returns a new descriptor or -1.
    let raw = unsafe { libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0, "memfd_create failed");
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut file = std::fs::File::from(fd);
    file.write_all(data).expect("write memfd");
    // SAFETY: lseek on a descriptor `file` owns.
    unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(&file), 0, libc::SEEK_SET) };
    OwnedFd::from(file)
}

/// Splits `data` at a little-endian u16 length prefix: (first part, rest).
pub fn split(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 2 {
        return (data, &[]);
    }
    let n = usize::from(u16::from_le_bytes([data[0], data[1]])).min(data.len() - 2);
    (&data[2..2 + n], &data[2 + n..])
}

/// Keeps a decode error's text formatted, as a destination's message would be.
pub fn show(e: &DecodeError) -> usize {
    e.to_string().len()
}

/// A machine with no guest memory reads for the monitor's `x`/`xp`/`pmemsave`.
#[derive(Debug)]
pub struct NoBackend;

impl vmigrate_qmp::VmBackend for NoBackend {
    fn read_physical(&self, _gpa: u64, out: &mut [u8]) -> bool {
        out.fill(0);
        out.len() <= 1 << 20
    }
}

/// A monitor on a destination-less VM (nothing is listening, nothing is sent).
pub fn dispatcher() -> Arc<vmigrate_qmp::Dispatcher> {
    static D: OnceLock<Arc<vmigrate_qmp::Dispatcher>> = OnceLock::new();
    D.get_or_init(|| {
        let vm = vm();
        let m = vmigrate_engine::Migrator::new(
            vm,
            vmigrate_engine::EventBus::new(),
            vmigrate_engine::IncomingMode::Disabled,
        );
        vmigrate_qmp::Dispatcher::new(m, Arc::new(NoBackend))
    })
    .clone()
}

/// Commands a fuzzed monitor may run: they read or set state and touch neither the
/// network, files, nor the process (no `migrate`, `quit`, `pmemsave`, `getfd`, ...).
/// Every command's arguments are checked against its schema before it runs, so the
/// checking is exercised by these.
pub fn safe_command(name: &str) -> bool {
    (name.starts_with("query-") && name != "query-dirty-rate")
        || matches!(
            name,
            "qmp_capabilities"
                | "migrate-set-capabilities"
                | "migrate-set-parameters"
                | "migrate_cancel"
                | "migrate-continue"
                | "migrate-start-postcopy"
                | "stop"
                | "cont"
                | "object-del"
                | "closefd"
                | "x-vmigrate-nonexistent"
        )
}
