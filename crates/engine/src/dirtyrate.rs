//! `calc-dirty-rate` in its three modes:
//!
//! - `page-sampling`: hash a random sample of guest pages, wait, hash them again, and
//!   scale the share that changed to all of guest RAM;
//! - `dirty-ring`: each vCPU's own count of the pages it dirtied (the VMM's
//!   [`VcpuDirtyControl`]: a KVM dirty ring per vCPU, or what each `soft` vCPU thread
//!   marks), with one rate per vCPU;
//! - `dirty-bitmap`: the VM's dirty tracking (the one a migration uses), started for
//!   the period and synced at its end; refused while a migration tracks.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::memory::RamBlock;
use crate::vmm::{DirtyBitmap, VcpuDirtyControl, Vmm};

/// Sample pages per GiB when the caller gives none.
pub const DEFAULT_SAMPLE_PAGES: u64 = 512;

#[derive(Debug, Clone)]
struct Measurement {
    status: &'static str,
    dirty_rate: Option<u64>,
    start_time: u64,
    calc_time_ms: u64,
    sample_pages: u64,
    mode: &'static str,
    /// Each vCPU's rate (MiB/s), in `dirty-ring` mode.
    vcpu_rates: Option<Vec<u64>>,
}

impl Default for Measurement {
    fn default() -> Self {
        Self {
            status: "unstarted",
            dirty_rate: None,
            start_time: 0,
            calc_time_ms: 0,
            sample_pages: 0,
            mode: "page-sampling",
            vcpu_rates: None,
        }
    }
}

/// Why `calc-dirty-rate` refused to start, with QEMU's texts.
#[derive(Debug, thiserror::Error)]
pub enum DirtyRateError {
    #[error("the dirty rate is already being measured.")]
    AlreadyMeasuring,
    #[error("Calculation time is out of range [50ms, 60000ms].")]
    CalcTimeOutOfRange,
    #[error("sample-pages is used only in page-sampling mode")]
    SamplePagesWithoutSampling,
    #[error("sample-pages is out of range[128, 16384].")]
    SamplePagesOutOfRange,
    #[error("mode dirty-ring is not enabled, use other method instead.")]
    DirtyRingDisabled,
    #[error("mode dirty-bitmap is not enabled, use other method instead.")]
    DirtyBitmapDisabled,
    #[error("mode {0} is not supported by vmigrate yet, use page-sampling instead.")]
    UnsupportedMode(String),
    /// dirty-bitmap mode shares the VM's dirty tracking with migration.
    #[error("mode dirty-bitmap cannot measure while a migration tracks dirty pages")]
    TrackerBusy,
    /// The measuring thread could not be started.
    #[error("cannot start the measurement: {0}")]
    SpawnThread(std::io::Error),
}

/// One measurement at a time, run on its own thread.
#[derive(Debug, Default)]
pub struct DirtyRateMeter {
    state: Arc<Mutex<Measurement>>,
}

/// Arguments of `calc-dirty-rate`.
#[derive(Debug, Clone)]
pub struct CalcRequest {
    pub calc_time: i64,
    pub millis: bool,
    pub sample_pages: Option<i64>,
    pub mode: String,
}

impl DirtyRateMeter {
    /// Checks the request as QEMU does, in its order (a running measurement first, then
    /// the time, the sample count, the mode), and starts the measurement. `tracker`
    /// lends the VM's dirty tracking to a `dirty-bitmap` measurement: `None` while a
    /// migration uses it; the lease is returned (dropped) when the measurement ends.
    pub fn start(
        &self,
        vmm: Arc<dyn Vmm>,
        req: &CalcRequest,
        tracker: Option<Box<dyn TrackerLease>>,
    ) -> Result<(), DirtyRateError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.status == "measuring" {
            return Err(DirtyRateError::AlreadyMeasuring);
        }
        let ms = if req.millis {
            req.calc_time
        } else {
            req.calc_time.saturating_mul(1000)
        };
        if !(50..=60_000).contains(&ms) {
            return Err(DirtyRateError::CalcTimeOutOfRange);
        }
        let sample_pages = match req.sample_pages {
            None if req.mode == "page-sampling" => DEFAULT_SAMPLE_PAGES,
            None => 0,
            Some(_) if req.mode != "page-sampling" => {
                return Err(DirtyRateError::SamplePagesWithoutSampling)
            }
            Some(n) if (128..=16384).contains(&n) => n as u64,
            Some(_) => return Err(DirtyRateError::SamplePagesOutOfRange),
        };
        // A VM whose vCPUs count through a KVM dirty ring has no dirty bitmap (QEMU's
        // rule); `soft` vCPUs offer both.
        let ring = vmm.vcpu_dirty_control().is_some();
        let kvm_ring = vmm.vcpu_dirty_control().is_some_and(|c| c.is_dirty_ring());
        let mode: &'static str = match req.mode.as_str() {
            "page-sampling" => "page-sampling",
            "dirty-ring" if ring => "dirty-ring",
            "dirty-ring" => return Err(DirtyRateError::DirtyRingDisabled),
            "dirty-bitmap" if kvm_ring => return Err(DirtyRateError::DirtyBitmapDisabled),
            "dirty-bitmap" => "dirty-bitmap",
            _ => return Err(DirtyRateError::UnsupportedMode(req.mode.clone())),
        };
        let lease = match (mode, tracker) {
            ("dirty-bitmap", None) => return Err(DirtyRateError::TrackerBusy),
            (_, lease) => lease,
        };
        *st = Measurement {
            status: "measuring",
            dirty_rate: None,
            start_time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            calc_time_ms: ms as u64,
            sample_pages,
            mode,
            vcpu_rates: None,
        };
        drop(st);
        let state = self.state.clone();
        let period = Duration::from_millis(ms as u64);
        std::thread::Builder::new()
            .name("dirtyrate-calc".into())
            .spawn(move || {
                let (rate, vcpus) = match mode {
                    "dirty-ring" => measure_ring(&*vmm, period),
                    "dirty-bitmap" => (measure_bitmap(&*vmm, period), None),
                    _ => (measure(vmm.ram_blocks(), sample_pages, period), None),
                };
                drop(lease);
                let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                st.dirty_rate = Some(rate);
                st.vcpu_rates = vcpus;
                st.status = "measured";
            })
            .map_err(DirtyRateError::SpawnThread)?;
        Ok(())
    }

    /// `query-dirty-rate`, with `calc-time` in `unit` (rounded down), in QEMU's member
    /// order.
    pub fn query(&self, millis: bool) -> Value {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut v = serde_json::Map::new();
        if st.mode == "dirty-ring" {
            let rates = st.vcpu_rates.unwrap_or_default();
            v.insert(
                "vcpu-dirty-rate".into(),
                Value::Array(
                    rates
                        .iter()
                        .enumerate()
                        .map(|(i, r)| json!({"id": i, "dirty-rate": r}))
                        .collect(),
                ),
            );
        }
        v.insert("status".into(), json!(st.status));
        v.insert("sample-pages".into(), json!(st.sample_pages));
        if let Some(r) = st.dirty_rate {
            v.insert("dirty-rate".into(), json!(r));
        }
        v.insert("mode".into(), json!(st.mode));
        v.insert(
            "calc-time-unit".into(),
            json!(if millis { "millisecond" } else { "second" }),
        );
        v.insert("start-time".into(), json!(st.start_time));
        v.insert(
            "calc-time".into(),
            json!(if millis {
                st.calc_time_ms
            } else {
                st.calc_time_ms / 1000
            }),
        );
        Value::Object(v)
    }
}

/// The VM's dirty tracking lent to a `dirty-bitmap` measurement; dropping it gives it
/// back (a migration may start again).
pub trait TrackerLease: Send {}

/// `dirty-ring` mode: each vCPU's pages over `period` (read every
/// [`crate::dirtylimit::SAMPLE`], so a ring that counts each page once per read sees
/// a small hot set rewritten fast as it is), in MiB/s; the total is their sum.
fn measure_ring(vmm: &dyn Vmm, period: Duration) -> (u64, Option<Vec<u64>>) {
    let Some(control) = vmm.vcpu_dirty_control() else {
        return (0, Some(Vec::new()));
    };
    let page = vmm.ram_blocks().first().map_or(4096, |b| b.page_size());
    let rates = count_vcpu_pages(control, period).map(|pages| {
        pages
            .iter()
            .map(|p| (p * page) as f64 / f64::from(1u32 << 20) / period.as_secs_f64())
            .map(|r| r as u64)
            .collect::<Vec<_>>()
    });
    let rates = rates.unwrap_or_default();
    (rates.iter().sum(), Some(rates))
}

/// Pages each vCPU dirtied over `period`.
fn count_vcpu_pages(
    control: &dyn VcpuDirtyControl,
    period: Duration,
) -> Result<Vec<u64>, crate::vmm::VmmError> {
    control.start_counting()?;
    let counted = (|| {
        let before = control.dirtied_pages()?;
        let start = std::time::Instant::now();
        while start.elapsed() + crate::dirtylimit::SAMPLE < period {
            std::thread::sleep(crate::dirtylimit::SAMPLE);
            control.dirtied_pages()?;
        }
        std::thread::sleep(period.saturating_sub(start.elapsed()));
        let after = control.dirtied_pages()?;
        Ok(after
            .iter()
            .zip(before.iter().chain(std::iter::repeat(&0)))
            .map(|(a, b)| a.saturating_sub(*b))
            .collect())
    })();
    control.stop_counting();
    counted
}

/// `dirty-bitmap` mode: the pages the VM's dirty tracking reports over `period`, in
/// MiB/s.
fn measure_bitmap(vmm: &dyn Vmm, period: Duration) -> u64 {
    let tracker = vmm.dirty_tracker();
    let blocks = vmm.ram_blocks();
    if tracker.start().is_err() {
        return 0;
    }
    let sync_all = || -> Result<u64, crate::vmm::VmmError> {
        let mut bytes = 0;
        for (i, b) in blocks.iter().enumerate() {
            let mut bits = DirtyBitmap::new(b.pages());
            tracker.sync(i, &mut bits)?;
            bytes += bits.count() as u64 * b.page_size();
        }
        Ok(bytes)
    };
    // Whatever a tracker reports at once is from before the period.
    let _ = sync_all();
    let start = std::time::Instant::now();
    std::thread::sleep(period);
    let bytes = sync_all().unwrap_or(0);
    let secs = start.elapsed().as_secs_f64();
    tracker.stop();
    (bytes as f64 / f64::from(1u32 << 20) / secs) as u64
}

/// FNV-1a over a page, 8 bytes at a time.
fn page_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in bytes.chunks_exact(8) {
        h ^= u64::from_le_bytes(w.try_into().expect("8-byte chunk"));
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Dirty rate in MiB/s over `period`, from `per_gib` sampled pages per GiB of each block.
fn measure(blocks: &[Arc<RamBlock>], per_gib: u64, period: Duration) -> u64 {
    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut samples = Vec::new();
    let mut page = Vec::new();
    let mut sample_hash = |b: &RamBlock, off: u64| {
        page.resize(b.page_size() as usize, 0);
        b.read(off, &mut page);
        page_hash(&page)
    };
    let mut total_bytes = 0u64;
    for (bi, b) in blocks.iter().enumerate() {
        total_bytes += b.len();
        let n = ((b.len() * per_gib) >> 30).max(1);
        for _ in 0..n {
            let page = next() % b.pages() as u64;
            let off = page * b.page_size();
            samples.push((bi, off, sample_hash(b, off)));
        }
    }
    std::thread::sleep(period);
    let changed = samples
        .iter()
        .filter(|(bi, off, h)| sample_hash(&blocks[*bi], *off) != *h)
        .count() as f64;
    let share = changed / samples.len().max(1) as f64;
    let mib = total_bytes as f64 / f64::from(1u32 << 20);
    (share * mib / period.as_secs_f64()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::RunState;
    use crate::test_support::FakeVmm;

    struct Lease;
    impl TrackerLease for Lease {}

    fn req(calc_time: i64, millis: bool, sample_pages: Option<i64>, mode: &str) -> CalcRequest {
        CalcRequest {
            calc_time,
            millis,
            sample_pages,
            mode: mode.into(),
        }
    }

    #[test]
    fn errors_match_qemu() {
        let m = DirtyRateMeter::default();
        let vmm: Arc<dyn Vmm> = FakeVmm::new(256, RunState::Running);
        let e = |r| {
            m.start(vmm.clone(), &r, Some(Box::new(Lease)))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            e(req(0, false, None, "page-sampling")),
            "Calculation time is out of range [50ms, 60000ms]."
        );
        assert_eq!(
            e(req(49, true, None, "page-sampling")),
            "Calculation time is out of range [50ms, 60000ms]."
        );
        assert_eq!(
            e(req(1, false, Some(100), "page-sampling")),
            "sample-pages is out of range[128, 16384]."
        );
        assert_eq!(
            e(req(1, false, None, "dirty-ring")),
            "mode dirty-ring is not enabled, use other method instead."
        );
        assert_eq!(
            e(req(1, false, Some(256), "dirty-bitmap")),
            "sample-pages is used only in page-sampling mode"
        );
        assert_eq!(
            m.start(vmm.clone(), &req(1, false, None, "dirty-bitmap"), None)
                .unwrap_err()
                .to_string(),
            "mode dirty-bitmap cannot measure while a migration tracks dirty pages"
        );
    }

    #[test]
    fn dirty_bitmap_counts_the_pages_written_in_the_period() {
        let m = DirtyRateMeter::default();
        let fake = FakeVmm::new(4096, RunState::Running);
        let vmm: Arc<dyn Vmm> = fake.clone();
        m.start(
            vmm,
            &req(500, true, None, "dirty-bitmap"),
            Some(Box::new(Lease)),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        for p in 0..1024 {
            fake.write_page(p, 1);
        }
        std::thread::sleep(Duration::from_millis(600));
        let q = m.query(true);
        assert_eq!(q["status"], "measured", "{q}");
        assert_eq!(q["mode"], "dirty-bitmap");
        assert!(q.get("vcpu-dirty-rate").is_none());
        let page = fake.ram_blocks()[0].page_size();
        let want = (1024 * page) as f64 / f64::from(1u32 << 20) / 0.5;
        let got = q["dirty-rate"].as_u64().unwrap() as f64;
        // The period is slept, so it may run a little long: never more, at most a
        // little less.
        assert!(got <= want && got >= want * 0.8, "{q} want {want}");
    }

    #[test]
    fn measures_a_block_being_written() {
        let m = DirtyRateMeter::default();
        let fake = FakeVmm::new(
            (64 << 20) / crate::memory::host_page_size() as usize,
            RunState::Running,
        );
        let vmm: Arc<dyn Vmm> = fake.clone();
        let b = fake.ram_blocks()[0].clone();
        assert_eq!(m.query(false)["status"], "unstarted");
        m.start(
            vmm.clone(),
            &req(300, true, Some(4096), "page-sampling"),
            None,
        )
        .unwrap();
        assert!(m
            .start(vmm.clone(), &req(300, true, None, "page-sampling"), None)
            .is_err());
        // Rewrite every page during the window: the whole block is dirty.
        let writer = {
            let b = b.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                for round in 1..=3u8 {
                    for p in 0..b.pages() as u64 {
                        b.write(p * b.page_size(), &[round; 8]);
                    }
                }
            })
        };
        writer.join().unwrap();
        std::thread::sleep(Duration::from_millis(350));
        let q = m.query(true);
        assert_eq!(q["status"], "measured", "{q}");
        let rate = q["dirty-rate"].as_u64().unwrap();
        // 64 MiB dirtied in a 300 ms window: about 213 MiB/s.
        assert!((150..=260).contains(&rate), "{q}");
        assert_eq!(q["calc-time"], 300);
    }
}
