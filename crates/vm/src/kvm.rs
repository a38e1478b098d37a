//! The `kvm` accelerator: real KVM vCPUs running the guest program in `guest/lab.S`,
//! KVM's dirty tracking for guest writes (see [`tracking`] for the modes), and each
//! vCPU's state as a `cpu` section.
//!
//! Guest-physical layout (x86 pages are 4 KiB architecturally):
//!
//! ```text
//! 0x0000  mailboxes, MAILBOX_SIZE bytes per vCPU: hot slice, pass, counters
//! 0x0800  GDT (null, flat code, flat data)
//! 0x1000  the guest program (GUEST_LOAD)
//! 0x2000  stacks, STACK_SIZE bytes per vCPU, growing down from 0x3000
//! 0x3000  the hot set (HOT_BASE), split into one slice per vCPU
//! ```
//!
//! The workload's counters live in guest RAM, in the mailboxes, so they migrate with
//! it; the vCPUs' registers travel in `cpu` sections and the UART's in `serial`.
//!
//! A vCPU thread only parks between `KVM_RUN`s; the guest writes to the POST port
//! (0x80) every 256 pages so that it exits often enough to stop promptly (about 1 ms
//! here) even when a pass over a large hot set takes long. After an I/O exit KVM completes the
//! instruction on the next entry, so before parking the thread enters once more with
//! `immediate_exit` set: the saved registers then point past the `out`, and the
//! destination neither repeats nor loses a character.
//!
//! With dirty rings, a vCPU thread harvests its own ring into the pending log (which
//! the next sync ORs in) whenever it exits with the ring a quarter full, and when KVM
//! stops it with `KVM_EXIT_DIRTY_RING_FULL`: a full ring never waits for the migration
//! thread. A ring that overflowed anyway (see [`tracking`]) costs a full resend, never a
//! lost page: tracking is re-armed and every page counted dirty.

mod tracking;

pub use tracking::{DirtyTracking, DEFAULT_RING_ENTRIES};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region,
    KVM_EXIT_DIRTY_RING_FULL, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde_json::json;
use vmigrate_engine::vmm::{DeviceLoadError, DeviceState, VmmError};
use vmigrate_engine::{DirtyBitmap, DirtyTracker, RamBlock};
use vmigrate_stream::vmstate::{FieldDesc, FieldWriter};
use vmigrate_stream::Source;

use crate::dirty::AtomicDirtyLog;
use crate::gate::{Pacer, VcpuGate};
use crate::serial::{SerialSink, Uart, COM1};
use crate::soft::WorkloadCounters;
use crate::workload::{vcpu_slice, WorkloadSpec};
use tracking::{DirtyRing, RingHarvest};

/// The guest program, assembled by build.rs.
static GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/lab-guest.bin"));

/// x86's page size, which the guest program is written for.
const GUEST_PAGE: u64 = 4096;
const GUEST_LOAD: u64 = 0x1000;
const MAILBOX_SIZE: u64 = 64;
const GDT_BASE: u64 = 0x800;
const STACK_TOP: u64 = 0x3000;
const STACK_SIZE: u64 = 128;
const HOT_BASE: u64 = 0x3000;
/// The most vCPUs the layout has mailboxes and stacks for.
pub const MAX_VCPUS: u32 = 16;

/// Mailbox fields (byte offsets), as guest/lab.S defines them.
mod mailbox {
    pub const HOT_BASE: u64 = 0;
    pub const HOT_PAGES: u64 = 4;
    pub const VERIFY: u64 = 8;
    pub const PASS: u64 = 12;
    pub const VIOLATIONS: u64 = 16;
    pub const WRITTEN: u64 = 20;
    pub const PRINT: u64 = 28;
    pub const CPU: u64 = 32;
}

const SLOT: u32 = 0;

pub const CPU_IDSTR: &str = "cpu";
pub const CPU_VERSION: u32 = 1;

/// Errors setting up the KVM guest.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("cannot open /dev/kvm: {0}")]
    Open(kvm_ioctls::Error),
    #[error("KVM refused to {what}: {source}")]
    Ioctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("the kvm lab machine supports 1 to {MAX_VCPUS} vCPUs, not {0}")]
    Vcpus(u32),
    #[error("the kvm lab machine needs more than {0} bytes of RAM")]
    TooSmall(u64),
    #[error("the kvm lab machine needs 4 KiB host pages, not {0}")]
    PageSize(u64),
    #[error("the kvm guest does not pace its writes: drop rate= or use --accel soft")]
    Rate,
    #[error("--dirty-tracking {mode} needs {cap}, which this host's KVM does not offer")]
    Unsupported {
        mode: &'static str,
        cap: &'static str,
    },
    #[error("a dirty ring has a power of two from {min} to {max} entries, not {entries}")]
    RingSize { entries: u32, min: u32, max: u32 },
    #[error("cannot map the dirty ring of vCPU {index}: {source}")]
    MapRing { index: u32, source: std::io::Error },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { what, source }
}

/// Whether /dev/kvm is there and creates a VM with a vCPU.
pub fn usable() -> bool {
    let Ok(kvm) = Kvm::new() else {
        return false;
    };
    kvm.create_vm().and_then(|vm| vm.create_vcpu(0)).is_ok()
}

/// A KVM VM with its vCPUs, UART and dirty tracking.
#[derive(Debug)]
pub struct KvmGuest {
    vm: VmFd,
    /// The dirty tracking mode in use (never `Auto`).
    tracking: DirtyTracking,
    vcpus: Vec<Arc<KvmVcpu>>,
    ram: Arc<RamBlock>,
    spec: WorkloadSpec,
    hot_pages: u64,
    uart: Arc<Uart>,
    gate: Arc<VcpuGate>,
    /// Dirty pages outside KVM's log, ORed into every sync: writes the VMM makes,
    /// pages requeued after a failed send, and ring entries a vCPU harvested itself
    /// when its ring filled.
    vmm_dirty: Arc<AtomicDirtyLog>,
    /// The dirty rings and whether tracking is on.
    tracking_state: Mutex<TrackingState>,
    /// `KVM_RESET_DIRTY_RINGS` calls made: a vCPU that finds it unchanged across a
    /// `KVM_RUN` knows nobody freed ring entries meanwhile.
    ring_resets: AtomicU64,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits the vCPUs took.
    ring_full_exits: AtomicU64,
    /// The host thread of each vCPU.
    threads: crate::vcpu_threads::VcpuThreadIds,
    /// Ring overflows recovered from (each re-armed tracking).
    ring_overflows: AtomicU64,
    /// Pages written counted at boot or arrival (the dirty-rate meter counts from it).
    written_base: AtomicU64,
    /// Exits KVM reported that the guest program never causes.
    unexpected_exits: AtomicU64,
}

/// One vCPU: its file descriptor (used by its thread while running, by the migration
/// while parked) and its index.
#[derive(Debug)]
pub struct KvmVcpu {
    index: u32,
    fd: Mutex<VcpuFd>,
}

/// What the sync, the vCPU threads and start/stop share, under one lock: a harvest
/// and the reset that follows it, and turning tracking on or off, never interleave.
#[derive(Debug, Default)]
struct TrackingState {
    /// One ring per vCPU, by index (ring mode; empty otherwise).
    rings: Vec<DirtyRing>,
    /// Between `start` and `stop`.
    active: bool,
    /// Users counting each vCPU's ring pages (dirty-limit, `calc-dirty-rate`): dirty
    /// logging stays on while there is one.
    counting: u32,
    /// Distinct pages each vCPU's ring gave per counting period, summed, by vCPU
    /// (dirty-limit's rates).
    harvested: Vec<u64>,
    /// The pages each vCPU's ring gave in the current counting period, one bitmap per
    /// vCPU: KVM here pushes an entry for every write fault, several per page between
    /// two resets, while a dirty rate counts pages.
    seen: Vec<Vec<u64>>,
}

impl KvmGuest {
    /// Creates the VM with `ram` as its memory, `cpus` vCPUs and dirty tracking by
    /// `tracking`. Unless `incoming` (the state arrives by migration), writes the guest
    /// program and the mailboxes into RAM and sets the vCPUs at its entry.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ram: Arc<RamBlock>,
        cpus: u32,
        spec: WorkloadSpec,
        sink: Arc<SerialSink>,
        gate: Arc<VcpuGate>,
        vmm_dirty: Arc<AtomicDirtyLog>,
        tracking: DirtyTracking,
        incoming: bool,
    ) -> Result<Self, KvmError> {
        if cpus == 0 || cpus > MAX_VCPUS {
            return Err(KvmError::Vcpus(cpus));
        }
        if ram.page_size() != GUEST_PAGE {
            return Err(KvmError::PageSize(ram.page_size()));
        }
        if ram.len() <= HOT_BASE {
            return Err(KvmError::TooSmall(HOT_BASE));
        }
        if spec.rate.is_some() {
            return Err(KvmError::Rate);
        }
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let vm = kvm.create_vm().map_err(ioctl("create a VM"))?;
        let tracking = tracking.resolve(&vm)?;
        tracking.enable(&vm)?;
        let guest = Self {
            vm,
            tracking,
            vcpus: Vec::new(),
            hot_pages: if spec.enabled {
                spec.hot_pages(ram.pages() as u64, GUEST_PAGE)
                    .min((ram.len() - HOT_BASE) / GUEST_PAGE)
            } else {
                0
            },
            ram,
            spec,
            uart: Arc::new(Uart::new(sink)),
            gate,
            vmm_dirty,
            tracking_state: Mutex::default(),
            ring_resets: AtomicU64::new(0),
            ring_full_exits: AtomicU64::new(0),
            threads: crate::vcpu_threads::VcpuThreadIds::new(cpus as usize),
            ring_overflows: AtomicU64::new(0),
            written_base: AtomicU64::new(0),
            unexpected_exits: AtomicU64::new(0),
        };
        guest.set_memory_flags(0)?;
        let mut guest = guest;
        for i in 0..cpus {
            let fd = guest
                .vm
                .create_vcpu(u64::from(i))
                .map_err(ioctl("create a vCPU"))?;
            if let DirtyTracking::Ring { entries } = tracking {
                let ring = DirtyRing::map(&fd, entries)
                    .map_err(|source| KvmError::MapRing { index: i, source })?;
                guest.lock_tracking().rings.push(ring);
            }
            guest.vcpus.push(Arc::new(KvmVcpu {
                index: i,
                fd: Mutex::new(fd),
            }));
        }
        if !incoming {
            guest.boot()?;
        }
        Ok(guest)
    }

    /// Registers guest RAM as memory slot 0 with `flags`.
    fn set_memory_flags(&self, flags: u32) -> Result<(), KvmError> {
        let region = kvm_userspace_memory_region {
            slot: SLOT,
            flags,
            guest_phys_addr: self.ram.gpa(),
            memory_size: self.ram.len(),
            userspace_addr: self.ram.host_addr(),
        };
        // SAFETY: the region is the whole of `ram`, a live mapping that this guest keeps
        // alive (it holds an Arc) for as long as the VM exists.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(ioctl("register guest memory"))
    }

    fn write_u32(&self, gpa: u64, v: u32) {
        self.ram.write(gpa, &v.to_le_bytes());
    }

    fn read_u32(&self, gpa: u64) -> u32 {
        let mut b = [0u8; 4];
        self.ram.read(gpa, &mut b);
        u32::from_le_bytes(b)
    }

    /// Loads the program, fills the mailboxes and GDT, and points each vCPU at the entry.
    fn boot(&self) -> Result<(), KvmError> {
        self.ram.write(GUEST_LOAD, GUEST);
        let gdt: [u64; 3] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
        for (i, d) in gdt.iter().enumerate() {
            self.ram.write(GDT_BASE + 8 * i as u64, &d.to_le_bytes());
        }
        let cpus = self.vcpus.len() as u32;
        for v in &self.vcpus {
            let mb = MAILBOX_SIZE * u64::from(v.index);
            let slice = vcpu_slice(self.hot_pages, cpus, v.index);
            self.write_u32(
                mb + mailbox::HOT_BASE,
                (HOT_BASE + slice.start * GUEST_PAGE) as u32,
            );
            self.write_u32(mb + mailbox::HOT_PAGES, (slice.end - slice.start) as u32);
            self.write_u32(mb + mailbox::VERIFY, u32::from(self.spec.verify));
            self.write_u32(mb + mailbox::PASS, 1);
            self.write_u32(mb + mailbox::PRINT, u32::from(v.index == 0));
            self.write_u32(mb + mailbox::CPU, v.index);
            let fd = v.fd.lock().unwrap_or_else(|e| e.into_inner());
            let mut sregs = fd.get_sregs().map_err(ioctl("read special registers"))?;
            let code = flat_segment(1, 0xb);
            let data = flat_segment(2, 0x3);
            sregs.cs = code;
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.gdt.base = GDT_BASE;
            sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
            sregs.cr0 |= 1; // protected mode, no paging
            fd.set_sregs(&sregs)
                .map_err(ioctl("set special registers"))?;
            let regs = kvm_regs {
                rflags: 2,
                rip: GUEST_LOAD,
                rsi: mb,
                rsp: STACK_TOP - STACK_SIZE * u64::from(v.index),
                ..Default::default()
            };
            fd.set_regs(&regs).map_err(ioctl("set registers"))?;
        }
        let pages = (HOT_BASE / GUEST_PAGE) as usize;
        self.vmm_dirty.mark(0, 0, pages);
        Ok(())
    }

    pub fn spec(&self) -> WorkloadSpec {
        self.spec
    }

    /// The dirty tracking mode in use (`Auto` resolved).
    pub fn dirty_tracking(&self) -> DirtyTracking {
        self.tracking
    }

    /// How many times a vCPU stopped because its dirty ring was full.
    pub fn ring_full_exits(&self) -> u64 {
        self.ring_full_exits.load(Ordering::Relaxed)
    }

    /// How many dirty ring overflows were recovered from.
    pub fn ring_overflows(&self) -> u64 {
        self.ring_overflows.load(Ordering::Relaxed)
    }

    pub fn hot_bytes(&self) -> u64 {
        self.hot_pages * GUEST_PAGE
    }

    /// Pages each vCPU's guest program counts as written, by vCPU (from the mailboxes).
    pub fn vcpu_pages_written(&self) -> Vec<u64> {
        self.vcpus
            .iter()
            .map(|v| self.vcpu_written(v.index))
            .collect()
    }

    /// Pages vCPU `index`'s guest program counts as written (its mailbox).
    fn vcpu_written(&self, index: u32) -> u64 {
        let mut w = [0u8; 8];
        self.ram
            .read(MAILBOX_SIZE * u64::from(index) + mailbox::WRITTEN, &mut w);
        u64::from_le_bytes(w)
    }

    /// Whether each vCPU has its own dirty ring (dirty-limit needs one).
    pub fn has_dirty_rings(&self) -> bool {
        matches!(self.tracking, DirtyTracking::Ring { .. })
    }

    /// dirty-limit: turns dirty logging on so that every vCPU's ring counts its writes.
    pub fn start_ring_counting(&self) -> Result<(), VmmError> {
        let mut st = self.lock_tracking();
        if st.counting == 0 {
            let n = st.rings.len();
            st.harvested.resize(n, 0);
            let words = self.ram.pages().div_ceil(64);
            st.seen = vec![vec![0; words]; n];
            if !st.active {
                self.set_memory_flags(KVM_MEM_LOG_DIRTY_PAGES)
                    .map_err(|e| VmmError::DirtyTracking(e.to_string()))?;
            }
        }
        st.counting += 1;
        Ok(())
    }

    /// Ends [`KvmGuest::start_ring_counting`]; logging stays on while a migration
    /// tracks.
    pub fn stop_ring_counting(&self) {
        let mut st = self.lock_tracking();
        if st.counting == 1 {
            if !st.active {
                let _ = self.set_memory_flags(0);
            }
            st.seen = Vec::new();
        }
        st.counting = st.counting.saturating_sub(1);
    }

    /// Harvests every ring (the pages go where the vCPUs' own harvests put them) and
    /// returns how many pages each vCPU's ring has given so far, each page counted once
    /// per call (a counting period).
    pub fn ring_pages_harvested(&self) -> Result<Vec<u64>, VmmError> {
        let mut st = self.lock_tracking();
        self.harvest_rings(&mut st, None, &mut |page| self.vmm_dirty.mark(0, page, 1))?;
        for bits in &mut st.seen {
            bits.fill(0);
        }
        Ok(st.harvested.clone())
    }

    /// The workload's counters, read from the mailboxes in guest RAM.
    pub fn counters(&self) -> WorkloadCounters {
        let cpus = self.vcpus.len() as u32;
        let mut c = WorkloadCounters {
            passes: u64::MAX,
            violations: 0,
            pages_written: 0,
            local_written: 0,
        };
        for v in &self.vcpus {
            let mb = MAILBOX_SIZE * u64::from(v.index);
            if !vcpu_slice(self.hot_pages, cpus, v.index).is_empty() {
                let pass = u64::from(self.read_u32(mb + mailbox::PASS));
                c.passes = c.passes.min(pass.saturating_sub(1));
            }
            c.violations += u64::from(self.read_u32(mb + mailbox::VIOLATIONS));
            let mut w = [0u8; 8];
            self.ram.read(mb + mailbox::WRITTEN, &mut w);
            c.pages_written += u64::from_le_bytes(w);
        }
        if c.passes == u64::MAX {
            c.passes = 0;
        }
        c.local_written = c
            .pages_written
            .saturating_sub(self.written_base.load(Ordering::Relaxed));
        c
    }

    /// The device sections: one `cpu` per vCPU, then the UART.
    pub fn devices(self: &Arc<Self>) -> Vec<Arc<dyn DeviceState>> {
        let mut d: Vec<Arc<dyn DeviceState>> = self
            .vcpus
            .iter()
            .map(|v| {
                Arc::new(CpuSection {
                    vcpu: v.clone(),
                    guest: Arc::downgrade(self),
                }) as Arc<dyn DeviceState>
            })
            .collect();
        d.push(self.uart.clone());
        d
    }

    /// Starts one thread per vCPU; they stay parked until the gate lets them run.
    pub fn spawn(self: &Arc<Self>) -> std::io::Result<Vec<JoinHandle<()>>> {
        self.vcpus
            .iter()
            .map(|v| {
                let guest = self.clone();
                let vcpu = v.clone();
                guest.gate.register();
                std::thread::Builder::new()
                    .name(format!("vcpu{}", v.index))
                    .spawn(move || {
                        guest.run_vcpu(&vcpu);
                        guest.gate.unregister();
                    })
                    .inspect_err(|_| self.gate.unregister())
            })
            .collect()
    }

    /// The host thread of each vCPU.
    pub fn vcpu_threads(&self) -> &crate::vcpu_threads::VcpuThreadIds {
        &self.threads
    }

    fn run_vcpu(&self, vcpu: &KvmVcpu) {
        self.threads.record_current(vcpu.index as usize);
        let mut pacer = Pacer::for_vcpu(None, vcpu.index as usize);
        let mut written = self.vcpu_written(vcpu.index);
        let mut stopped = false;
        loop {
            if self.gate.should_park() {
                if !self.gate.park() {
                    return;
                }
                pacer.restart();
                continue;
            }
            if stopped {
                // The guest did something it never does: keep it stopped.
                self.gate.sleep(Duration::from_millis(100));
                continue;
            }
            let mut fd = vcpu.fd.lock().unwrap_or_else(|e| e.into_inner());
            let mut idle = false;
            let mut io = false;
            let mut ring_full = false;
            let resets_before = self.ring_resets.load(Ordering::Acquire);
            match fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    io = true;
                    if let (Some(off), Some(b)) = (port.checked_sub(COM1), data.first()) {
                        if off < 8 {
                            self.uart.write(off, *b);
                        }
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    io = true;
                    let v = match port.checked_sub(COM1) {
                        Some(off) if off < 8 => self.uart.read(off),
                        _ => 0xff,
                    };
                    data.fill(v);
                }
                Ok(VcpuExit::Hlt) => idle = true,
                Ok(VcpuExit::Intr) => {}
                Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => ring_full = true,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Ok(other) => {
                    self.unexpected_exits.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "vmigrate: vCPU {} stopped on an unexpected exit: {other:?}",
                        vcpu.index
                    );
                    stopped = true;
                }
                Err(e) => {
                    self.unexpected_exits.fetch_add(1, Ordering::Relaxed);
                    eprintln!("vmigrate: vCPU {} stopped: KVM_RUN failed: {e}", vcpu.index);
                    stopped = true;
                }
            }
            if io && self.gate.should_park() {
                complete_pending_io(&mut fd);
            }
            drop(fd);
            if let DirtyTracking::Ring { .. } = self.tracking {
                if let Err(e) = self.reap_own_ring(vcpu.index, ring_full, resets_before) {
                    self.unexpected_exits.fetch_add(1, Ordering::Relaxed);
                    eprintln!("vmigrate: vCPU {} stopped: {e}", vcpu.index);
                    stopped = true;
                }
            }
            if idle {
                self.gate.sleep(Duration::from_millis(50));
            }
            // dirty-limit: the pages the guest counts as written since the last exit.
            let now_written = self.vcpu_written(vcpu.index);
            pacer.dirtied(&self.gate, now_written.saturating_sub(written) * GUEST_PAGE);
            written = now_written;
            pacer.throttle_point(&self.gate);
        }
    }
}

/// Enters the vCPU once with `immediate_exit` set, so KVM finishes the instruction of
/// the last I/O exit and the registers are consistent for saving.
fn complete_pending_io(fd: &mut VcpuFd) {
    fd.set_kvm_immediate_exit(1);
    let _ = fd.run();
    fd.set_kvm_immediate_exit(0);
}

fn flat_segment(index: u16, ty: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: index << 3,
        type_: ty,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl KvmGuest {
    fn lock_tracking(&self) -> MutexGuard<'_, TrackingState> {
        self.tracking_state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// After an exit in ring mode: harvests this vCPU's ring into the pending log when
    /// KVM found it full (`ring_full`) or it is a quarter full.
    fn reap_own_ring(
        &self,
        index: u32,
        ring_full: bool,
        resets_before: u64,
    ) -> Result<(), VmmError> {
        let i = index as usize;
        let mut st = if ring_full {
            self.ring_full_exits.fetch_add(1, Ordering::Relaxed);
            self.lock_tracking()
        } else {
            // The sync may hold the lock: it harvests this ring too.
            let Ok(st) = self.tracking_state.try_lock() else {
                return Ok(());
            };
            match st.rings.get(i) {
                Some(r) if r.holds_at_least(r.entries() / 4) => st,
                _ => return Ok(()),
            }
        };
        let h = self.harvest_rings(&mut st, Some(i), &mut |page| {
            self.vmm_dirty.mark(0, page, 1)
        })?;
        if ring_full
            && h == RingHarvest::default()
            && self.ring_resets.load(Ordering::Acquire) == resets_before
        {
            // KVM held the ring full and nobody has freed an entry since, yet it shows
            // nothing: KVM counts entries an overflow wrote over. Free one; the next
            // full exit frees another, until KVM lets the vCPU run and its new pushes
            // show where the hole ends.
            st.rings[i].release_one_counted();
            self.reset_dirty_rings()?;
        }
        Ok(())
    }

    /// Harvests the rings (all, or `only` one) with `st` locked, handing each dirty
    /// page of the slot to `dirty`, then resets them so the pages are write-protected
    /// again before the caller reads them. After an overflow, re-arms tracking and
    /// counts every page dirty.
    fn harvest_rings(
        &self,
        st: &mut TrackingState,
        only: Option<usize>,
        dirty: &mut dyn FnMut(usize),
    ) -> Result<RingHarvest, VmmError> {
        let pages = self.ram.pages();
        let mut total = RingHarvest::default();
        for (i, ring) in st.rings.iter_mut().enumerate() {
            if only.is_some_and(|o| o != i) {
                continue;
            }
            let mut seen = st.seen.get_mut(i).zip(st.harvested.get_mut(i));
            let h = ring.harvest(|slot, page| {
                if slot == SLOT && (page as usize) < pages {
                    dirty(page as usize);
                    if let Some((bits, count)) = seen.as_mut() {
                        let (w, b) = (page as usize / 64, 1u64 << (page % 64));
                        if bits[w] & b == 0 {
                            bits[w] |= b;
                            **count += 1;
                        }
                    }
                }
            });
            total.taken += h.taken;
            total.overflowed |= h.overflowed;
        }
        if total == RingHarvest::default() {
            return Ok(total);
        }
        self.reset_dirty_rings()?;
        if total.overflowed {
            self.ring_overflows.fetch_add(1, Ordering::Relaxed);
            if st.active {
                // Pages whose entries were written over may be writable with no entry
                // to come: write-protect them all again, and send them all.
                self.set_memory_flags(0)
                    .and_then(|()| self.set_memory_flags(KVM_MEM_LOG_DIRTY_PAGES))
                    .map_err(|e| VmmError::DirtyTracking(e.to_string()))?;
                self.vmm_dirty.mark(0, 0, pages);
            }
        }
        Ok(total)
    }

    fn reset_dirty_rings(&self) -> Result<(), VmmError> {
        let mut tries = 0;
        loop {
            match tracking::reset_dirty_rings(&self.vm) {
                Ok(_) => break,
                // A signal cut the walk short; it resumes where it stopped.
                Err(e) if e.errno() == libc::EINTR && tries < 100 => tries += 1,
                Err(e) => {
                    return Err(VmmError::DirtyTracking(format!(
                        "KVM_RESET_DIRTY_RINGS failed: {e}"
                    )))
                }
            }
        }
        self.ring_resets.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Fetches the slot's dirty bitmap; with `clear`, then clears and re-protects the
    /// fetched pages (manual protect mode, where the fetch alone clears nothing).
    fn sync_dirty_log(&self, clear: bool, out: &mut DirtyBitmap) -> Result<(), VmmError> {
        let pages = self.ram.pages();
        let mut words = self
            .vm
            .get_dirty_log(SLOT, self.ram.len() as usize)
            .map_err(|e| VmmError::DirtyTracking(format!("KVM_GET_DIRTY_LOG failed: {e}")))?;
        for (wi, w) in words.iter().enumerate() {
            let mut bits = *w;
            while bits != 0 {
                let page = wi * 64 + bits.trailing_zeros() as usize;
                if page < out.pages() {
                    out.set(page);
                }
                bits &= bits - 1;
            }
        }
        if !clear {
            return Ok(());
        }
        // Clear only the words that have bits: KVM_CLEAR_DIRTY_LOG takes a range that
        // starts on a multiple of 64 pages and ends on one or at the end of the slot.
        let Some(first) = words.iter().position(|&w| w != 0) else {
            return Ok(());
        };
        let last = words.iter().rposition(|&w| w != 0).unwrap_or(first);
        let first_page = first * 64;
        let end_page = ((last + 1) * 64).min(pages);
        tracking::clear_dirty_log(
            &self.vm,
            SLOT,
            first_page as u64,
            (end_page - first_page) as u32,
            &mut words[first..=last],
        )
        .map_err(|e| VmmError::DirtyTracking(format!("KVM_CLEAR_DIRTY_LOG failed: {e}")))
    }
}

impl DirtyTracker for KvmGuest {
    fn start(&self) -> Result<(), VmmError> {
        let mut st = self.lock_tracking();
        // Entries left from an earlier session: the first pass sends every page.
        self.harvest_rings(&mut st, None, &mut |_| {})?;
        self.vmm_dirty.start()?;
        self.set_memory_flags(KVM_MEM_LOG_DIRTY_PAGES)
            .map_err(|e| VmmError::DirtyTracking(e.to_string()))?;
        st.active = true;
        Ok(())
    }

    fn sync(&self, block: usize, out: &mut DirtyBitmap) -> Result<(), VmmError> {
        if block != 0 {
            return Err(VmmError::DirtyTracking(format!("no RAM block {block}")));
        }
        match self.tracking {
            DirtyTracking::Auto | DirtyTracking::Log => self.sync_dirty_log(false, out)?,
            DirtyTracking::LogClear => self.sync_dirty_log(true, out)?,
            DirtyTracking::Ring { .. } => {
                let mut st = self.lock_tracking();
                self.harvest_rings(&mut st, None, &mut |page| out.set(page))?;
            }
        }
        self.vmm_dirty.sync(block, out)
    }

    fn requeue(&self, block: usize, pages: &DirtyBitmap) {
        self.vmm_dirty.requeue(block, pages);
    }

    fn stop(&self) {
        let mut st = self.lock_tracking();
        st.active = false;
        if st.counting == 0 {
            let _ = self.set_memory_flags(0);
        }
    }
}

/// One vCPU's registers as a `cpu` section (instance = vCPU index).
#[derive(Debug)]
struct CpuSection {
    vcpu: Arc<KvmVcpu>,
    guest: std::sync::Weak<KvmGuest>,
}

const SEGMENT_BYTES: usize = 8 + 4 + 2 + 9;
const REGS_BYTES: usize = 18 * 8;
const SREGS_BYTES: usize = 8 * SEGMENT_BYTES + 2 * 10 + 7 * 8 + 4 * 8;
const FPU_BYTES: usize = 8 * 16 + 2 + 2 + 1 + 2 + 8 + 8 + 16 * 16 + 4;

fn put_segment(w: &mut FieldWriter, s: &kvm_segment) {
    w.be64(s.base)
        .be32(s.limit)
        .bytes(&s.selector.to_be_bytes());
    for b in [
        s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable,
    ] {
        w.u8(b);
    }
}

fn get_segment(src: &mut dyn Source) -> Result<kvm_segment, DeviceLoadError> {
    let mut s = kvm_segment {
        base: src.be64("segment base")?,
        limit: src.be32("segment limit")?,
        selector: src.be16("segment selector")?,
        ..Default::default()
    };
    for f in [
        &mut s.type_,
        &mut s.present,
        &mut s.dpl,
        &mut s.db,
        &mut s.s,
        &mut s.l,
        &mut s.g,
        &mut s.avl,
        &mut s.unusable,
    ] {
        *f = src.u8("segment attribute")?;
    }
    Ok(s)
}

fn regs_fields(r: &mut kvm_regs) -> [&mut u64; 18] {
    [
        &mut r.rax,
        &mut r.rbx,
        &mut r.rcx,
        &mut r.rdx,
        &mut r.rsi,
        &mut r.rdi,
        &mut r.rsp,
        &mut r.rbp,
        &mut r.r8,
        &mut r.r9,
        &mut r.r10,
        &mut r.r11,
        &mut r.r12,
        &mut r.r13,
        &mut r.r14,
        &mut r.r15,
        &mut r.rip,
        &mut r.rflags,
    ]
}

fn sregs_segments(s: &mut kvm_sregs) -> [&mut kvm_segment; 8] {
    [
        &mut s.cs, &mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss, &mut s.tr, &mut s.ldt,
    ]
}

fn sregs_controls(s: &mut kvm_sregs) -> [&mut u64; 7] {
    [
        &mut s.cr0,
        &mut s.cr2,
        &mut s.cr3,
        &mut s.cr4,
        &mut s.cr8,
        &mut s.efer,
        &mut s.apic_base,
    ]
}

/// Encodes registers, special registers and FPU state.
fn encode_cpu(mut regs: kvm_regs, mut sregs: kvm_sregs, fpu: &kvm_fpu) -> Vec<u8> {
    let mut w = FieldWriter::default();
    for r in regs_fields(&mut regs) {
        w.be64(*r);
    }
    for s in sregs_segments(&mut sregs) {
        put_segment(&mut w, s);
    }
    for t in [sregs.gdt, sregs.idt] {
        w.be64(t.base).bytes(&t.limit.to_be_bytes());
    }
    for c in sregs_controls(&mut sregs) {
        w.be64(*c);
    }
    for b in sregs.interrupt_bitmap {
        w.be64(b);
    }
    for r in &fpu.fpr {
        w.bytes(r);
    }
    w.bytes(&fpu.fcw.to_be_bytes())
        .bytes(&fpu.fsw.to_be_bytes())
        .u8(fpu.ftwx)
        .bytes(&fpu.last_opcode.to_be_bytes())
        .be64(fpu.last_ip)
        .be64(fpu.last_dp);
    for x in &fpu.xmm {
        w.bytes(x);
    }
    w.be32(fpu.mxcsr);
    w.buf
}

fn decode_cpu(src: &mut dyn Source) -> Result<(kvm_regs, kvm_sregs, kvm_fpu), DeviceLoadError> {
    let mut regs = kvm_regs::default();
    for r in regs_fields(&mut regs) {
        *r = src.be64("cpu register")?;
    }
    let mut sregs = kvm_sregs::default();
    for s in sregs_segments(&mut sregs) {
        *s = get_segment(src)?;
    }
    sregs.gdt.base = src.be64("cpu gdt base")?;
    sregs.gdt.limit = src.be16("cpu gdt limit")?;
    sregs.idt.base = src.be64("cpu idt base")?;
    sregs.idt.limit = src.be16("cpu idt limit")?;
    for c in sregs_controls(&mut sregs) {
        *c = src.be64("cpu control register")?;
    }
    for b in &mut sregs.interrupt_bitmap {
        *b = src.be64("cpu interrupt bitmap")?;
    }
    let mut fpu = kvm_fpu::default();
    for r in &mut fpu.fpr {
        src.fill(r, "fpu register")?;
    }
    fpu.fcw = src.be16("fpu fcw")?;
    fpu.fsw = src.be16("fpu fsw")?;
    fpu.ftwx = src.u8("fpu ftwx")?;
    fpu.last_opcode = src.be16("fpu last opcode")?;
    fpu.last_ip = src.be64("fpu last ip")?;
    fpu.last_dp = src.be64("fpu last dp")?;
    for x in &mut fpu.xmm {
        src.fill(x, "fpu xmm")?;
    }
    fpu.mxcsr = src.be32("fpu mxcsr")?;
    Ok((regs, sregs, fpu))
}

impl DeviceState for CpuSection {
    fn idstr(&self) -> &str {
        CPU_IDSTR
    }
    fn instance_id(&self) -> u32 {
        self.vcpu.index
    }
    fn version(&self) -> u32 {
        CPU_VERSION
    }
    fn save(&self) -> Result<Vec<u8>, VmmError> {
        let fd = self.vcpu.fd.lock().unwrap_or_else(|e| e.into_inner());
        let err = |what: &str, e: kvm_ioctls::Error| {
            VmmError::Other(format!("cannot read vCPU {} {what}: {e}", self.vcpu.index))
        };
        let regs = fd.get_regs().map_err(|e| err("registers", e))?;
        let sregs = fd.get_sregs().map_err(|e| err("special registers", e))?;
        let fpu = fd.get_fpu().map_err(|e| err("FPU state", e))?;
        Ok(encode_cpu(regs, sregs, &fpu))
    }
    fn load(&self, src: &mut dyn Source, _version: u32) -> Result<(), DeviceLoadError> {
        let (regs, sregs, fpu) = decode_cpu(src)?;
        let fd = self.vcpu.fd.lock().unwrap_or_else(|e| e.into_inner());
        let err = |what: &str, e: kvm_ioctls::Error| {
            DeviceLoadError::Vmm(VmmError::Other(format!(
                "vCPU {} refused its {what}: {e}",
                self.vcpu.index
            )))
        };
        fd.set_sregs(&sregs)
            .map_err(|e| err("special registers", e))?;
        fd.set_regs(&regs).map_err(|e| err("registers", e))?;
        fd.set_fpu(&fpu).map_err(|e| err("FPU state", e))?;
        drop(fd);
        if let Some(g) = self.guest.upgrade() {
            // RAM arrived before the devices: count the dirty rate from here.
            let written = g.counters().pages_written;
            g.written_base.store(written, Ordering::Relaxed);
        }
        Ok(())
    }
    fn describe(&self) -> serde_json::Value {
        json!({"name": CPU_IDSTR, "instance_id": self.vcpu.index, "vmsd_name": CPU_IDSTR,
        "version": CPU_VERSION, "fields": [
            FieldDesc { name: "regs".into(), ty: "uint64", size: 8,
                array_len: Some(REGS_BYTES / 8) }
                .to_json(),
            FieldDesc::scalar("sregs", "buffer", SREGS_BYTES).to_json(),
            FieldDesc::scalar("fpu", "buffer", FPU_BYTES).to_json(),
        ]})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::JoinHandle;
    use vmigrate_stream::SliceSource;

    #[test]
    fn cpu_state_round_trips() {
        let mut regs = kvm_regs {
            rip: 0x1234,
            rsi: 7,
            rflags: 2,
            ..Default::default()
        };
        let mut sregs = kvm_sregs {
            cs: flat_segment(1, 0xb),
            ss: flat_segment(2, 3),
            cr0: 0x11,
            ..Default::default()
        };
        sregs.gdt.base = GDT_BASE;
        sregs.gdt.limit = 23;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        let body = encode_cpu(regs, sregs, &fpu);
        assert_eq!(body.len(), REGS_BYTES + SREGS_BYTES + FPU_BYTES);
        let (r, s, f) = decode_cpu(&mut SliceSource::new(&body)).unwrap();
        assert_eq!(regs_fields(&mut regs).map(|v| *v), {
            let mut r = r;
            regs_fields(&mut r).map(|v| *v)
        });
        assert_eq!(s.cs, sregs.cs);
        assert_eq!(s.ss, sregs.ss);
        assert_eq!(s.gdt.limit, 23);
        assert_eq!(s.cr0, 0x11);
        assert_eq!(f.fcw, 0x37f);
        assert_eq!(f.mxcsr, 0x1f80);
        assert!(decode_cpu(&mut SliceSource::new(&body[..body.len() - 1])).is_err());
    }

    #[test]
    fn guest_program_fits_its_page() {
        assert!(!GUEST.is_empty());
        assert!((GUEST.len() as u64) <= HOT_BASE - GUEST_LOAD - (STACK_TOP - 0x2000));
        assert!(u64::from(MAX_VCPUS) * MAILBOX_SIZE <= GDT_BASE);
        assert!(u64::from(MAX_VCPUS) * STACK_SIZE <= STACK_TOP - 0x2000);
    }

    /// A guest on real KVM with its vCPU threads, torn down on drop.
    struct TestGuest {
        guest: Arc<KvmGuest>,
        ram: Arc<RamBlock>,
        vmm_dirty: Arc<AtomicDirtyLog>,
        gate: Arc<VcpuGate>,
        threads: Vec<JoinHandle<()>>,
        serial: std::path::PathBuf,
    }

    impl TestGuest {
        /// Boots `workload` in `mem` bytes of RAM with `tracking`, its vCPUs parked; or
        /// says why this host cannot.
        fn boot(
            name: &str,
            mem: u64,
            workload: &str,
            tracking: DirtyTracking,
        ) -> Result<Self, String> {
            if !usable() {
                return Err("/dev/kvm is missing or unusable".into());
            }
            let ram = Arc::new(RamBlock::anonymous("ram", mem, 0).unwrap());
            let vmm_dirty = Arc::new(AtomicDirtyLog::new(&[ram.pages()]));
            let serial =
                std::env::temp_dir().join(format!("vmigrate-kvm-{name}-{}", std::process::id()));
            let _ = std::fs::remove_file(&serial);
            let sink = Arc::new(SerialSink::open(serial.to_str().unwrap()).unwrap());
            let gate = Arc::new(VcpuGate::new());
            let guest = match KvmGuest::new(
                ram.clone(),
                1,
                WorkloadSpec::parse(workload).unwrap(),
                sink,
                gate.clone(),
                vmm_dirty.clone(),
                tracking,
                false,
            ) {
                Ok(g) => Arc::new(g),
                Err(e @ (KvmError::Unsupported { .. } | KvmError::RingSize { .. })) => {
                    return Err(e.to_string())
                }
                Err(e) => panic!("cannot boot the KVM guest: {e}"),
            };
            let threads = guest.spawn().unwrap();
            Ok(Self {
                guest,
                ram,
                vmm_dirty,
                gate,
                threads,
                serial,
            })
        }

        /// Lets the vCPU run until the workload has completed `more` further passes,
        /// then parks it.
        fn run_passes(&self, more: u64) -> WorkloadCounters {
            let target = self.guest.counters().passes + more;
            self.gate.resume();
            let t0 = std::time::Instant::now();
            while self.guest.counters().passes < target && t0.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(5));
            }
            self.gate.pause();
            let c = self.guest.counters();
            assert!(
                c.passes >= target,
                "the guest did not reach pass {target}: {c:?}, ring-full exits {}, unexpected exits {}",
                self.guest.ring_full_exits(),
                self.guest.unexpected_exits.load(Ordering::Relaxed)
            );
            assert_eq!(c.violations, 0, "{c:?}");
            c
        }

        fn sync(&self) -> (DirtyBitmap, Duration) {
            let mut d = DirtyBitmap::new(self.ram.pages());
            let t0 = std::time::Instant::now();
            self.guest.sync(0, &mut d).unwrap();
            (d, t0.elapsed())
        }

        fn hot_pages(&self) -> std::ops::Range<usize> {
            let first = (HOT_BASE / GUEST_PAGE) as usize;
            first..first + self.guest.hot_pages as usize
        }
    }

    impl Drop for TestGuest {
        fn drop(&mut self) {
            self.guest.stop();
            self.gate.shutdown();
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
            let _ = std::fs::remove_file(&self.serial);
        }
    }

    fn set_pages(d: &DirtyBitmap) -> Vec<usize> {
        d.iter_set().collect()
    }

    /// Runs the guest under `tracking` and checks, sync by sync: every hot page the
    /// guest wrote is reported, nothing it did not write is; a second sync with the
    /// guest parked is empty (the first one cleared); pages written after a sync are
    /// reported by the next one (it re-protected them); requeued pages and the VMM's
    /// own writes come back.
    fn check_tracking(test: &str, tracking: DirtyTracking) {
        const MEM: u64 = 128 << 20;
        let g = match TestGuest::boot(test, MEM, "hot=1M,verify", tracking) {
            Ok(g) => g,
            Err(reason) => {
                eprintln!("SKIP {test}: {reason}");
                return;
            }
        };
        let mode = g.guest.dirty_tracking();
        assert_ne!(mode, DirtyTracking::Auto);
        g.guest.start().unwrap();
        let hot = g.hot_pages();
        // The mailboxes (page 0) and vCPU 0's stack (page 2) are written too.
        let written = |p: usize| p == 0 || p == 2 || hot.contains(&p);
        let mut timings = Vec::new();
        for round in 0..3 {
            g.run_passes(2);
            let (d, took) = g.sync();
            let pages = set_pages(&d);
            for p in hot.clone() {
                assert!(
                    pages.contains(&p),
                    "{mode} round {round}: hot page {p} not reported"
                );
            }
            assert!(
                pages.iter().all(|&p| written(p)),
                "{mode} round {round}: reported pages the guest never wrote: {:?}",
                pages.iter().filter(|&&p| !written(p)).collect::<Vec<_>>()
            );
            timings.push((pages.len(), took));
            let (again, empty_took) = g.sync();
            assert_eq!(
                again.count(),
                0,
                "{mode} round {round}: the sync did not clear"
            );
            timings.push((0, empty_took));
            if round == 1 {
                g.guest.requeue(0, &d);
                assert_eq!(g.sync().0, d, "{mode}: requeued pages were lost");
                g.vmm_dirty.mark(0, g.ram.pages() - 1, 1);
                assert_eq!(set_pages(&g.sync().0), [g.ram.pages() - 1]);
            }
        }
        // Harvesting at exits keeps a ring of the default size from ever filling.
        assert_eq!(g.guest.ring_overflows(), 0, "{mode}: the ring overflowed");
        eprintln!(
            "{test}: {mode} on {} MiB, sync (pages, time): {timings:?}; ring-full exits {}",
            MEM >> 20,
            g.guest.ring_full_exits()
        );
    }

    #[test]
    fn dirty_log_reports_guest_writes() {
        check_tracking("dirty_log_reports_guest_writes", DirtyTracking::Log);
    }

    #[test]
    fn dirty_log_clear_reports_guest_writes() {
        check_tracking(
            "dirty_log_clear_reports_guest_writes",
            DirtyTracking::LogClear,
        );
    }

    #[test]
    fn dirty_ring_reports_guest_writes() {
        check_tracking(
            "dirty_ring_reports_guest_writes",
            DirtyTracking::Ring {
                entries: DEFAULT_RING_ENTRIES,
            },
        );
    }

    #[test]
    fn auto_tracking_reports_guest_writes() {
        check_tracking("auto_tracking_reports_guest_writes", DirtyTracking::Auto);
    }

    /// A ring far smaller than a pass over the hot set: the vCPU fills it between
    /// exits, harvests it itself, runs on, and every sync still reports every page it
    /// wrote. (Where KVM pushes past the ring's soft limit, as a batch-emulating vendor
    /// module does, this is the overflow recovery's test.)
    #[test]
    fn full_dirty_ring_is_harvested_by_its_vcpu() {
        let test = "full_dirty_ring_is_harvested_by_its_vcpu";
        let entries = tracking::ring_min_entries();
        let g = match TestGuest::boot(
            test,
            4 << 20,
            "hot=3M,verify",
            DirtyTracking::Ring { entries },
        ) {
            Ok(g) => g,
            Err(reason) => {
                eprintln!("SKIP {test}: {reason}");
                return;
            }
        };
        assert!(g.hot_pages().len() > 2 * entries as usize);
        g.guest.start().unwrap();
        for round in 0..2 {
            g.run_passes(2);
            let pages = set_pages(&g.sync().0);
            for p in g.hot_pages() {
                assert!(
                    pages.contains(&p),
                    "round {round}: hot page {p} not reported"
                );
            }
            assert_eq!(g.sync().0.count(), 0);
        }
        let (full, overflows) = (g.guest.ring_full_exits(), g.guest.ring_overflows());
        assert!(full + overflows > 0, "the ring never filled");
        eprintln!("{test}: {entries} entries, {full} ring-full exits, {overflows} overflows");
    }

    #[test]
    fn ring_sizes_kvm_refuses_are_errors() {
        let test = "ring_sizes_kvm_refuses_are_errors";
        for entries in [0, 100, tracking::ring_min_entries() / 2, 1 << 30] {
            match TestGuest::boot(test, 1 << 20, "none", DirtyTracking::Ring { entries }) {
                Err(reason) if reason.contains("power of two") => {}
                Err(reason) => {
                    eprintln!("SKIP {test}: {reason}");
                    return;
                }
                Ok(_) => panic!("a ring of {entries} entries was accepted"),
            }
        }
    }

    /// Boots the guest on real KVM where there is one, runs it, and checks it writes
    /// its hot set, prints, and that the dirty log sees the pages.
    #[test]
    fn guest_runs_under_kvm() {
        if !usable() {
            eprintln!("SKIP guest_runs_under_kvm: /dev/kvm is missing or unusable");
            return;
        }
        let ram = Arc::new(RamBlock::anonymous("ram", 1 << 20, 0).unwrap());
        let dirty = Arc::new(AtomicDirtyLog::new(&[ram.pages()]));
        let path = std::env::temp_dir().join(format!("vmigrate-kvm-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let sink = Arc::new(SerialSink::open(path.to_str().unwrap()).unwrap());
        let gate = Arc::new(VcpuGate::new());
        let guest = Arc::new(
            KvmGuest::new(
                ram.clone(),
                1,
                WorkloadSpec::parse("hot=64K,verify").unwrap(),
                sink,
                gate.clone(),
                dirty,
                DirtyTracking::Auto,
                false,
            )
            .unwrap(),
        );
        let threads = guest.spawn().unwrap();
        guest.start().unwrap();
        gate.resume();
        let t0 = std::time::Instant::now();
        while guest.counters().passes < 3 && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(20));
        }
        gate.pause();
        let c = guest.counters();
        let mut d = DirtyBitmap::new(ram.pages());
        guest.sync(0, &mut d).unwrap();
        guest.stop();
        gate.shutdown();
        for t in threads {
            t.join().unwrap();
        }
        assert!(c.passes >= 3, "{c:?}");
        assert_eq!(c.violations, 0);
        let hot_first = (HOT_BASE / GUEST_PAGE) as usize;
        for p in hot_first..hot_first + 16 {
            assert_eq!(d.next_set(p), Some(p), "hot page {p} not in the dirty log");
        }
        let out = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(
            out.starts_with("lab guest: running\npass 00000001\n"),
            "{out:?}"
        );
    }
}
