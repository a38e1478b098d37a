//! The `soft` accelerator: each vCPU is a thread of the VM process that runs the
//! workload against guest RAM at native speed. Under `bitmap` dirty tracking it marks
//! every page it writes in the dirty log after writing it; under `uffd-wp` it marks
//! nothing and the kernel reports its writes ([`crate::uffd`]).
//!
//! A vCPU's "registers" are its pass number and its cursor in its slice of the hot set;
//! they live in [`SoftVcpu`] and travel in the `lab-workload` section, so a destination
//! resumes each vCPU at the page where the source stopped it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::json;
use vmigrate_engine::vmm::{DeviceLoadError, DeviceState, VmmError};
use vmigrate_engine::RamBlock;
use vmigrate_stream::vmstate::{FieldDesc, FieldWriter};
use vmigrate_stream::Source;

use crate::dirty::AtomicDirtyLog;
use crate::gate::{Pacer, VcpuGate};
use crate::serial::SerialSink;
use crate::workload::{first_mismatch, page_tag, tag_pass, vcpu_slice, WorkloadSpec};

pub const WORKLOAD_IDSTR: &str = "lab-workload";
pub const WORKLOAD_VERSION: u32 = 1;

/// How a `soft` guest's dirty pages are tracked (`--dirty-tracking`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyTracking {
    /// The vCPU threads mark an atomic bitmap after each write.
    #[default]
    Bitmap,
    /// The kernel tracks the writes: userfaultfd asynchronous write-protection, read
    /// and re-armed with `PAGEMAP_SCAN`.
    UffdWp,
}

impl DirtyTracking {
    /// Parses `bitmap` or `uffd-wp`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "bitmap" => Some(Self::Bitmap),
            "uffd-wp" => Some(Self::UffdWp),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Bitmap => "bitmap",
            Self::UffdWp => "uffd-wp",
        }
    }
}

impl std::fmt::Display for DirtyTracking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Violations a vCPU reports line by line on the serial port; later ones are counted.
const REPORTED_VIOLATIONS: u64 = 16;

/// One soft vCPU's state.
#[derive(Debug)]
pub struct SoftVcpu {
    /// The pass being written (1 for the first).
    pass: AtomicU64,
    /// The next page to write, counted from the start of this vCPU's slice.
    cursor: AtomicU64,
    violations: AtomicU64,
    /// Pages written since the guest booted (migrated).
    pages_written: AtomicU64,
    /// Pages written by this process (not migrated): the dirty-rate meter's source.
    local_written: AtomicU64,
}

impl Default for SoftVcpu {
    fn default() -> Self {
        Self {
            pass: AtomicU64::new(1),
            cursor: AtomicU64::new(0),
            violations: AtomicU64::new(0),
            pages_written: AtomicU64::new(0),
            local_written: AtomicU64::new(0),
        }
    }
}

/// The workload of a `soft` machine and its vCPUs' state: the `lab-workload` section.
#[derive(Debug)]
pub struct SoftWorkload {
    spec: WorkloadSpec,
    hot_pages: u64,
    page_size: u64,
    vcpus: Vec<SoftVcpu>,
    /// The host thread of each vCPU.
    threads: crate::vcpu_threads::VcpuThreadIds,
    ram: Arc<RamBlock>,
    /// Where the vCPUs mark the pages they write; `None` when the kernel tracks their
    /// writes.
    dirty: Option<Arc<AtomicDirtyLog>>,
    serial: Arc<SerialSink>,
    gate: Arc<VcpuGate>,
}

/// Counters of the whole workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadCounters {
    /// Passes completed over the whole hot set (the slowest vCPU's count).
    pub passes: u64,
    pub violations: u64,
    pub pages_written: u64,
    /// Pages this process wrote (for the dirty rate).
    pub local_written: u64,
}

impl SoftWorkload {
    /// A workload whose vCPUs mark each page they write in `dirty`, or nothing with
    /// `None` (the kernel tracks their writes).
    pub fn new(
        spec: WorkloadSpec,
        cpus: u32,
        ram: Arc<RamBlock>,
        dirty: Option<Arc<AtomicDirtyLog>>,
        serial: Arc<SerialSink>,
        gate: Arc<VcpuGate>,
    ) -> Self {
        let page_size = ram.page_size();
        let hot_pages = if spec.enabled {
            spec.hot_pages(ram.pages() as u64, page_size)
        } else {
            0
        };
        Self {
            spec,
            hot_pages,
            page_size,
            vcpus: (0..cpus.max(1)).map(|_| SoftVcpu::default()).collect(),
            threads: crate::vcpu_threads::VcpuThreadIds::new(cpus.max(1) as usize),
            ram,
            dirty,
            serial,
            gate,
        }
    }

    pub fn spec(&self) -> WorkloadSpec {
        self.spec
    }

    pub fn hot_bytes(&self) -> u64 {
        self.hot_pages * self.page_size
    }

    pub fn counters(&self) -> WorkloadCounters {
        let mut c = WorkloadCounters {
            passes: u64::MAX,
            violations: 0,
            pages_written: 0,
            local_written: 0,
        };
        for (i, v) in self.vcpus.iter().enumerate() {
            let slice = vcpu_slice(self.hot_pages, self.vcpus.len() as u32, i as u32);
            if !slice.is_empty() {
                c.passes = c.passes.min(v.pass.load(Ordering::Relaxed) - 1);
            }
            c.violations += v.violations.load(Ordering::Relaxed);
            c.pages_written += v.pages_written.load(Ordering::Relaxed);
            c.local_written += v.local_written.load(Ordering::Relaxed);
        }
        if c.passes == u64::MAX {
            c.passes = 0;
        }
        c
    }

    /// Pages each vCPU thread wrote (and marked dirty) in this process, by vCPU.
    pub fn vcpu_pages_written(&self) -> Vec<u64> {
        self.vcpus
            .iter()
            .map(|v| v.local_written.load(Ordering::Relaxed))
            .collect()
    }

    /// Starts one thread per vCPU; they stay parked until the gate lets them run.
    pub fn spawn(self: &Arc<Self>) -> std::io::Result<Vec<JoinHandle<()>>> {
        (0..self.vcpus.len())
            .map(|i| {
                let w = self.clone();
                w.gate.register();
                std::thread::Builder::new()
                    .name(format!("vcpu{i}"))
                    .spawn(move || {
                        w.run_vcpu(i);
                        w.gate.unregister();
                    })
                    .inspect_err(|_| self.gate.unregister())
            })
            .collect()
    }

    /// One vCPU's loop: write the next page of its slice, pass after pass.
    /// The host thread of each vCPU.
    pub fn vcpu_threads(&self) -> &crate::vcpu_threads::VcpuThreadIds {
        &self.threads
    }

    fn run_vcpu(&self, index: usize) {
        self.threads.record_current(index);
        let cpus = self.vcpus.len() as u32;
        let slice = vcpu_slice(self.hot_pages, cpus, index as u32);
        let me = &self.vcpus[index];
        let ps = self.page_size;
        let mut pacer =
            Pacer::for_vcpu(self.spec.rate.map(|r| (r / u64::from(cpus)).max(1)), index);
        loop {
            if self.gate.should_park() {
                if !self.gate.park() {
                    return;
                }
                pacer.restart();
                continue;
            }
            if slice.is_empty() {
                // An idle vCPU: nothing to write.
                self.gate.sleep(Duration::from_millis(100));
                continue;
            }
            let pass = me.pass.load(Ordering::Relaxed);
            let cursor = me.cursor.load(Ordering::Relaxed);
            let page = slice.start + cursor;
            let offset = page * ps;
            if self.spec.verify {
                let want = page_tag(pass - 1, page);
                // SAFETY: while vCPUs run, this vCPU thread is the only writer of the
                // pages of its slice: a destination loads them before the vCPUs start,
                // and the migration threads only read them.
                let found = unsafe {
                    self.ram
                        .with_bytes(offset, ps as usize, |b| first_mismatch(b, want))
                };
                if let Some((word, value)) = found {
                    self.report_violation(index, page, pass - 1, word, value);
                }
            }
            let written = if self.spec.sparse { 8 } else { ps as usize };
            self.ram.fill_u64(offset, written, page_tag(pass, page));
            if let Some(dirty) = &self.dirty {
                dirty.mark(0, page as usize, 1);
            }
            me.pages_written.fetch_add(1, Ordering::Relaxed);
            me.local_written.fetch_add(1, Ordering::Relaxed);
            if cursor + 1 == slice.end - slice.start {
                me.cursor.store(0, Ordering::Relaxed);
                me.pass.store(pass + 1, Ordering::Relaxed);
            } else {
                me.cursor.store(cursor + 1, Ordering::Relaxed);
            }
            pacer.account(&self.gate, ps);
        }
    }

    fn report_violation(&self, vcpu: usize, page: u64, want_pass: u64, word: usize, value: u64) {
        let n = self.vcpus[vcpu].violations.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= REPORTED_VIOLATIONS {
            let line = format!(
                "lab: vcpu{vcpu}: VIOLATION page {page} (gpa {:#x}) word {word}: found {value:#018x} \
                 (pass {}), expected pass {want_pass}\n",
                page * self.page_size,
                tag_pass(value)
            );
            self.serial.write(line.as_bytes());
        } else if n == REPORTED_VIOLATIONS + 1 {
            self.serial
                .write(format!("lab: vcpu{vcpu}: more violations, counting only\n").as_bytes());
        }
    }
}

impl DeviceState for SoftWorkload {
    fn idstr(&self) -> &str {
        WORKLOAD_IDSTR
    }
    fn version(&self) -> u32 {
        WORKLOAD_VERSION
    }
    fn save(&self) -> Result<Vec<u8>, VmmError> {
        let mut w = FieldWriter::default();
        w.be32(self.vcpus.len() as u32)
            .be64(self.hot_pages)
            .be64(self.page_size)
            .u8(u8::from(self.spec.verify));
        for v in &self.vcpus {
            w.be64(v.pass.load(Ordering::Relaxed))
                .be64(v.cursor.load(Ordering::Relaxed))
                .be64(v.violations.load(Ordering::Relaxed))
                .be64(v.pages_written.load(Ordering::Relaxed));
        }
        Ok(w.buf)
    }
    fn load(&self, src: &mut dyn Source, _version: u32) -> Result<(), DeviceLoadError> {
        let cpus = src.be32("lab-workload vcpus")?;
        let hot_pages = src.be64("lab-workload hot_pages")?;
        let page_size = src.be64("lab-workload page_size")?;
        let verify = src.u8("lab-workload verify")? != 0;
        if cpus as usize != self.vcpus.len()
            || hot_pages != self.hot_pages
            || page_size != self.page_size
            || verify != self.spec.verify
        {
            return Err(VmmError::Other(format!(
                "the source's workload ({cpus} vCPUs, {hot_pages} hot pages of {page_size} \
                 bytes, verify {verify}) differs from this machine's ({} vCPUs, {} hot pages \
                 of {} bytes, verify {})",
                self.vcpus.len(),
                self.hot_pages,
                self.page_size,
                self.spec.verify
            ))
            .into());
        }
        let mut loaded = Vec::with_capacity(self.vcpus.len());
        for i in 0..self.vcpus.len() {
            let pass = src.be64("lab-workload pass")?;
            let cursor = src.be64("lab-workload cursor")?;
            let violations = src.be64("lab-workload violations")?;
            let pages_written = src.be64("lab-workload pages_written")?;
            let slice = vcpu_slice(hot_pages, cpus, i as u32);
            if pass == 0 || pass >= 1 << 32 || (cursor >= slice.end - slice.start && cursor != 0) {
                return Err(VmmError::Other(format!(
                    "vCPU {i} of the workload has pass {pass} and cursor {cursor}, out of range"
                ))
                .into());
            }
            loaded.push((pass, cursor, violations, pages_written));
        }
        for (v, (pass, cursor, violations, pages_written)) in self.vcpus.iter().zip(loaded) {
            v.pass.store(pass, Ordering::Relaxed);
            v.cursor.store(cursor, Ordering::Relaxed);
            v.violations.store(violations, Ordering::Relaxed);
            v.pages_written.store(pages_written, Ordering::Relaxed);
        }
        Ok(())
    }
    fn describe(&self) -> serde_json::Value {
        json!({"name": WORKLOAD_IDSTR, "instance_id": 0, "vmsd_name": WORKLOAD_IDSTR,
        "version": WORKLOAD_VERSION, "fields": [
            FieldDesc::scalar("vcpus", "uint32", 4).to_json(),
            FieldDesc::scalar("hot_pages", "uint64", 8).to_json(),
            FieldDesc::scalar("page_size", "uint64", 8).to_json(),
            FieldDesc::scalar("verify", "bool", 1).to_json(),
            FieldDesc {
                name: "vcpu".into(),
                ty: "struct",
                size: 32,
                array_len: Some(self.vcpus.len()),
            }.to_json(),
        ]})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmigrate_engine::{DirtyBitmap, DirtyTracker};
    use vmigrate_stream::SliceSource;

    #[test]
    fn parses_modes() {
        assert_eq!(DirtyTracking::parse("bitmap"), Some(DirtyTracking::Bitmap));
        assert_eq!(DirtyTracking::parse("uffd-wp"), Some(DirtyTracking::UffdWp));
        for bad in ["", "auto", "log", "uffd", "UFFD-WP"] {
            assert_eq!(DirtyTracking::parse(bad), None, "{bad:?}");
        }
        assert_eq!(DirtyTracking::UffdWp.to_string(), "uffd-wp");
        assert_eq!(DirtyTracking::default(), DirtyTracking::Bitmap);
    }

    fn workload(spec: &str, pages: u64, cpus: u32) -> (Arc<SoftWorkload>, Vec<JoinHandle<()>>) {
        let ps = vmigrate_engine::memory::host_page_size();
        let ram = Arc::new(RamBlock::anonymous("ram", pages * ps, 0).unwrap());
        let dirty = Arc::new(AtomicDirtyLog::new(&[pages as usize]));
        workload_on(spec, ram, Some(dirty), cpus)
    }

    fn workload_on(
        spec: &str,
        ram: Arc<RamBlock>,
        dirty: Option<Arc<AtomicDirtyLog>>,
        cpus: u32,
    ) -> (Arc<SoftWorkload>, Vec<JoinHandle<()>>) {
        let w = Arc::new(SoftWorkload::new(
            WorkloadSpec::parse(spec).unwrap(),
            cpus,
            ram,
            dirty,
            Arc::new(SerialSink::Discard),
            Arc::new(VcpuGate::new()),
        ));
        let threads = w.spawn().unwrap();
        (w, threads)
    }

    fn finish(w: &SoftWorkload, threads: Vec<JoinHandle<()>>) {
        w.gate.shutdown();
        for t in threads {
            t.join().unwrap();
        }
    }

    fn run_for(w: &SoftWorkload, ms: u64) {
        w.gate.resume();
        std::thread::sleep(Duration::from_millis(ms));
        w.gate.pause();
    }

    /// Runs the vCPUs until every one has completed `passes` passes (however busy the
    /// host is), parks them and returns the counters.
    fn run_passes(w: &SoftWorkload, passes: u64) -> WorkloadCounters {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        w.gate.resume();
        while w.counters().passes < passes {
            assert!(std::time::Instant::now() < deadline, "{:?}", w.counters());
            std::thread::sleep(Duration::from_millis(5));
        }
        w.gate.pause();
        w.counters()
    }

    #[test]
    fn verified_passes_and_dirty_pages() {
        let (w, threads) = workload("hot=64K,verify", 64, 2);
        let dirty = w.dirty.clone().unwrap();
        dirty.start().unwrap();
        run_for(&w, 50);
        let c = w.counters();
        assert!(c.passes >= 2, "{c:?}");
        assert_eq!(c.violations, 0);
        let mut d = DirtyBitmap::new(64);
        dirty.sync(0, &mut d).unwrap();
        let hot = (64 * 1024 / w.page_size) as usize;
        assert_eq!(d.count(), hot, "every hot page is dirty, no other");
        // Parked: nothing moves.
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(w.counters(), c);
        finish(&w, threads);
    }

    /// Under `uffd-wp` the vCPUs mark nothing: the kernel reports exactly the hot set,
    /// and nothing once they are parked.
    #[test]
    fn kernel_tracking_sees_every_page_the_vcpus_write() {
        let pages = 256;
        let ps = vmigrate_engine::memory::host_page_size();
        let ram = Arc::new(RamBlock::anonymous("ram", pages * ps, 0).unwrap());
        let vmm_dirty = Arc::new(AtomicDirtyLog::new(&[pages as usize]));
        let tracker = match crate::uffd::UffdWpTracker::new(ram.clone(), vmm_dirty.clone(), false) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("SKIP kernel_tracking_sees_every_page_the_vcpus_write: {e}");
                return;
            }
        };
        let hot = 64 * 1024 / ps as usize;
        let (w, threads) = workload_on("hot=64K,verify", ram, None, 2);
        tracker.start().unwrap();
        let c = run_passes(&w, 2);
        assert_eq!(c.violations, 0);
        let mut d = DirtyBitmap::new(pages as usize);
        tracker.sync(0, &mut d).unwrap();
        assert_eq!(d.count(), hot, "every hot page is dirty, no other");
        assert_eq!(d.next_set(hot), None);
        let mut marked = DirtyBitmap::new(pages as usize);
        vmm_dirty.sync(0, &mut marked).unwrap();
        assert_eq!(marked.count(), 0, "the vCPUs marked the bitmap");
        let mut again = DirtyBitmap::new(pages as usize);
        tracker.sync(0, &mut again).unwrap();
        assert_eq!(again.count(), 0, "parked vCPUs wrote");
        // Every vCPU finishes the pass it was parked in and then one whole pass more,
        // so each hot page is written after the sync whatever the scheduling.
        let furthest = w
            .vcpus
            .iter()
            .map(|v| v.pass.load(Ordering::Relaxed) - 1)
            .max()
            .unwrap_or(0);
        run_passes(&w, furthest + 2);
        tracker.sync(0, &mut again).unwrap();
        assert_eq!(
            again.count(),
            hot,
            "written again after the sync re-protected"
        );
        tracker.stop();
        finish(&w, threads);
    }

    #[test]
    fn a_missed_page_is_caught() {
        let (w, threads) = workload("hot=16K,verify", 16, 1);
        run_for(&w, 20);
        assert_eq!(w.counters().violations, 0);
        // A page as a destination would hold it had its last write not been resent.
        let pass = w.vcpus[0].pass.load(Ordering::Relaxed);
        let cursor = w.vcpus[0].cursor.load(Ordering::Relaxed);
        let stale_page = if cursor > 0 { cursor - 1 } else { 3 };
        let current = if cursor > 0 { pass } else { pass - 1 };
        w.ram.fill_u64(
            stale_page * w.page_size,
            w.page_size as usize,
            page_tag(current - 1, stale_page),
        );
        run_for(&w, 20);
        assert!(w.counters().violations >= 1);
        finish(&w, threads);
    }

    #[test]
    fn a_torn_page_is_caught() {
        let (w, threads) = workload("hot=16K,verify", 16, 1);
        run_for(&w, 20);
        w.ram.fill_u64(w.page_size + 64, 8, 0xdead);
        run_for(&w, 20);
        assert!(w.counters().violations >= 1);
        finish(&w, threads);
    }

    #[test]
    fn state_migrates_and_continues() {
        let (src, st) = workload("hot=32K,verify", 32, 2);
        run_for(&src, 30);
        let body = src.save().unwrap();
        assert_eq!(
            vmigrate_stream::vmstate::described_size(&src.describe()),
            Some(body.len() as u64)
        );
        let (dst, dt) = workload("hot=32K,verify", 32, 2);
        // Copy RAM as a migration would.
        let len = src.ram.len() as usize;
        let mut ram = vec![0u8; len];
        src.ram.read(0, &mut ram);
        dst.ram.write(0, &ram);
        dst.load(&mut SliceSource::new(&body), 1).unwrap();
        let before = dst.counters();
        assert_eq!(before.passes, src.counters().passes);
        run_for(&dst, 30);
        let after = dst.counters();
        assert!(after.passes > before.passes);
        assert_eq!(after.violations, 0);
        // A different machine refuses the state.
        let (other, ot) = workload("hot=16K,verify", 32, 2);
        assert!(other.load(&mut SliceSource::new(&body), 1).is_err());
        finish(&src, st);
        finish(&dst, dt);
        finish(&other, ot);
    }

    #[test]
    fn rate_is_paced() {
        let (w, threads) = workload("hot=1M,rate=4M", 256, 1);
        run_for(&w, 250);
        let bytes = w.counters().pages_written * w.page_size;
        assert!(bytes < 3 << 20, "wrote {bytes} bytes in 250 ms at 4 MiB/s");
        assert!(bytes > 256 << 10, "wrote only {bytes} bytes");
        finish(&w, threads);
    }
}
