//! The `kvm` accelerator: real KVM vCPUs running the guest program in `guest/lab.S`,
//! KVM's dirty log for guest writes, and each vCPU's state as a `cpu` section.
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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES,
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

/// A KVM VM with its vCPUs, UART and dirty log.
#[derive(Debug)]
pub struct KvmGuest {
    vm: VmFd,
    vcpus: Vec<Arc<KvmVcpu>>,
    ram: Arc<RamBlock>,
    spec: WorkloadSpec,
    hot_pages: u64,
    uart: Arc<Uart>,
    gate: Arc<VcpuGate>,
    /// Writes the VMM makes, ORed into every sync.
    vmm_dirty: Arc<AtomicDirtyLog>,
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

impl KvmGuest {
    /// Creates the VM with `ram` as its memory and `cpus` vCPUs. Unless `incoming` (the
    /// state arrives by migration), writes the guest program and the mailboxes into RAM
    /// and sets the vCPUs at its entry.
    pub fn new(
        ram: Arc<RamBlock>,
        cpus: u32,
        spec: WorkloadSpec,
        sink: Arc<SerialSink>,
        gate: Arc<VcpuGate>,
        vmm_dirty: Arc<AtomicDirtyLog>,
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
        let guest = Self {
            vm,
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
            userspace_addr: self.ram.ptr_at(0, self.ram.len() as usize) as u64,
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

    pub fn hot_bytes(&self) -> u64 {
        self.hot_pages * GUEST_PAGE
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

    fn run_vcpu(&self, vcpu: &KvmVcpu) {
        let mut pacer = Pacer::new(None);
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
            if idle {
                self.gate.sleep(Duration::from_millis(50));
            }
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

impl DirtyTracker for KvmGuest {
    fn start(&self) -> Result<(), VmmError> {
        self.vmm_dirty.start()?;
        self.set_memory_flags(KVM_MEM_LOG_DIRTY_PAGES)
            .map_err(|e| VmmError::DirtyTracking(e.to_string()))
    }

    fn sync(&self, block: usize, out: &mut DirtyBitmap) -> Result<(), VmmError> {
        if block != 0 {
            return Err(VmmError::DirtyTracking(format!("no RAM block {block}")));
        }
        let words = self
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
        self.vmm_dirty.sync(block, out)
    }

    fn requeue(&self, block: usize, pages: &DirtyBitmap) {
        self.vmm_dirty.requeue(block, pages);
    }

    fn stop(&self) {
        let _ = self.set_memory_flags(0);
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
