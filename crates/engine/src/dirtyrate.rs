//! `calc-dirty-rate` in `page-sampling` mode: hash a random sample of guest pages, wait,
//! hash them again, and scale the share that changed to all of guest RAM.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::memory::RamBlock;

/// Sample pages per GiB when the caller gives none.
pub const DEFAULT_SAMPLE_PAGES: u64 = 512;

#[derive(Debug, Clone)]
struct Measurement {
    status: &'static str,
    dirty_rate: Option<u64>,
    start_time: u64,
    calc_time_ms: u64,
    sample_pages: u64,
}

impl Default for Measurement {
    fn default() -> Self {
        Self {
            status: "unstarted",
            dirty_rate: None,
            start_time: 0,
            calc_time_ms: 0,
            sample_pages: 0,
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
    #[error("mode {0} is not supported by vmigrate yet, use page-sampling instead.")]
    UnsupportedMode(String),
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
    /// the time, the sample count, the mode), and starts the measurement.
    pub fn start(
        &self,
        blocks: Vec<Arc<RamBlock>>,
        req: &CalcRequest,
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
            None => DEFAULT_SAMPLE_PAGES,
            Some(_) if req.mode != "page-sampling" => {
                return Err(DirtyRateError::SamplePagesWithoutSampling)
            }
            Some(n) if (128..=16384).contains(&n) => n as u64,
            Some(_) => return Err(DirtyRateError::SamplePagesOutOfRange),
        };
        match req.mode.as_str() {
            "page-sampling" => {}
            "dirty-ring" => return Err(DirtyRateError::DirtyRingDisabled),
            _ => return Err(DirtyRateError::UnsupportedMode(req.mode.clone())),
        }
        {
            *st = Measurement {
                status: "measuring",
                dirty_rate: None,
                start_time: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                calc_time_ms: ms as u64,
                sample_pages,
            };
        }
        drop(st);
        let state = self.state.clone();
        std::thread::Builder::new()
            .name("dirtyrate-calc".into())
            .spawn(move || {
                let rate = measure(&blocks, sample_pages, Duration::from_millis(ms as u64));
                let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                st.dirty_rate = Some(rate);
                st.status = "measured";
            })
            .map_err(DirtyRateError::SpawnThread)?;
        Ok(())
    }

    /// `query-dirty-rate`, with `calc-time` in `unit` (rounded down).
    pub fn query(&self, millis: bool) -> Value {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut v = json!({
            "status": st.status,
            "sample-pages": st.sample_pages,
            "mode": "page-sampling",
            "calc-time-unit": if millis { "millisecond" } else { "second" },
            "start-time": st.start_time,
            "calc-time": if millis { st.calc_time_ms } else { st.calc_time_ms / 1000 },
        });
        if let Some(r) = st.dirty_rate {
            v["dirty-rate"] = json!(r);
        }
        v
    }
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
        let b = vec![Arc::new(RamBlock::anonymous("ram", 1 << 20, 0).unwrap())];
        let e = |r| m.start(b.clone(), &r).unwrap_err().to_string();
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
    }

    #[test]
    fn measures_a_block_being_written() {
        let m = DirtyRateMeter::default();
        let b = Arc::new(RamBlock::anonymous("ram", 64 << 20, 0).unwrap());
        assert_eq!(m.query(false)["status"], "unstarted");
        m.start(
            vec![b.clone()],
            &req(300, true, Some(4096), "page-sampling"),
        )
        .unwrap();
        assert!(m
            .start(vec![b.clone()], &req(300, true, None, "page-sampling"))
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
