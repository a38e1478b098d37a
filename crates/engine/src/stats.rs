//! Migration statistics: one structure behind `query-migrate`, HMP `info migrate`, the
//! progress display and the events.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use crate::timeline::{self, Counters};

/// Counters the saver updates while it runs.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes written on the main channel.
    pub transferred: Arc<AtomicU64>,
    pub total_ram: AtomicU64,
    pub duplicate: AtomicU64,
    pub normal: AtomicU64,
    pub page_size: AtomicU64,
    pub dirty_sync_count: AtomicU64,
    pub remaining: AtomicU64,
    pub dirty_pages_rate: AtomicU64,
    pub pages_per_second: AtomicU64,
    /// Megabits per second × 1000 (mbps is a float in QMP).
    pub mbps_milli: AtomicU64,
    /// Bytes written on multifd channels (also counted in `transferred`).
    pub multifd_bytes: AtomicU64,
    pub precopy_bytes: AtomicU64,
    pub downtime_bytes: AtomicU64,
    /// Bytes sent after the destination started running (postcopy).
    pub postcopy_bytes: AtomicU64,
    /// Page requests the destination sent in postcopy (one per message).
    pub postcopy_requests: AtomicU64,
    /// zero-copy-send: channel syncs at which the kernel had copied every send.
    pub dirty_sync_missed_zero_copy: AtomicU64,
    pub expected_downtime_ms: AtomicU64,
    /// auto-converge's current throttle, 0 when not throttling.
    pub cpu_throttle_percentage: AtomicU64,
    pub setup_time_ms: AtomicU64,
    pub downtime_ms: AtomicU64,
    pub total_time_ms: AtomicU64,
    pub started: std::sync::Mutex<Option<Instant>>,
    /// The figures over time, and the moments that matter.
    pub timeline: timeline::Timeline,
    /// XBZRLE's figures (`xbzrle-cache` in `query-migrate`).
    pub xbzrle: XbzrleCounters,
}

impl Stats {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn start_clock(&self) {
        *self.started.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    pub fn elapsed_ms(&self) -> u64 {
        self.started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed().as_millis() as u64)
            .unwrap_or(0)
    }

    fn get(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }

    pub fn mbps(&self) -> f64 {
        Self::get(&self.mbps_milli) as f64 / 1000.0
    }

    /// The counters the timeline reads.
    pub fn counters(&self) -> Counters {
        let get = Self::get;
        Counters {
            transferred: get(&self.transferred),
            remaining: get(&self.remaining),
            dirty_pages_rate: get(&self.dirty_pages_rate),
            page_size: get(&self.page_size),
            dirty_sync_count: get(&self.dirty_sync_count),
            cpu_throttle_percentage: get(&self.cpu_throttle_percentage),
            total_ram: get(&self.total_ram),
            normal: get(&self.normal),
            duplicate: get(&self.duplicate),
            setup_time_ms: get(&self.setup_time_ms),
            downtime_ms: get(&self.downtime_ms),
            total_time_ms: get(&self.total_time_ms),
            elapsed_ms: self.elapsed_ms(),
            mbps: self.mbps(),
        }
    }

    /// The timeline as JSON (`x-vmigrate-query-migrate-timeline`).
    pub fn timeline_json(&self) -> Value {
        self.timeline.to_json(&self.counters())
    }

    /// Starts the thread that samples the timeline every [`timeline::SAMPLE_PERIOD`]. It
    /// stops after the sample that follows the end of the migration, or when nothing
    /// else holds these stats any more.
    pub fn start_timeline_sampler(self: &Arc<Self>) -> std::io::Result<()> {
        let stats = self.clone();
        std::thread::Builder::new()
            // Not `mig/src/...`: `query-migrationthreads` lists only the threads QEMU has.
            .name("mig-timeline".into())
            .spawn(move || loop {
                stats.timeline.sample(&stats.counters());
                if timeline::has_ended(stats.timeline.status()) || Arc::strong_count(&stats) == 1 {
                    break;
                }
                std::thread::sleep(timeline::SAMPLE_PERIOD);
            })
            .map(|_| ())
    }

    /// The `ram` member of `query-migrate`. `completed` zeroes the live-only figures.
    pub fn ram_json(&self, completed: bool) -> Value {
        let ps = Self::get(&self.page_size);
        let normal = Self::get(&self.normal);
        json!({
            "transferred": Self::get(&self.transferred),
            "remaining": if completed { 0 } else { Self::get(&self.remaining) },
            "total": Self::get(&self.total_ram),
            "duplicate": Self::get(&self.duplicate),
            "normal": normal,
            "normal-bytes": normal * ps,
            "dirty-pages-rate": if completed { 0 } else { Self::get(&self.dirty_pages_rate) },
            "mbps": number(self.mbps()),
            "dirty-sync-count": Self::get(&self.dirty_sync_count),
            "postcopy-requests": Self::get(&self.postcopy_requests),
            "page-size": ps,
            "multifd-bytes": Self::get(&self.multifd_bytes),
            "pages-per-second": Self::get(&self.pages_per_second),
            "precopy-bytes": Self::get(&self.precopy_bytes),
            "downtime-bytes": Self::get(&self.downtime_bytes),
            "postcopy-bytes": Self::get(&self.postcopy_bytes),
            "dirty-sync-missed-zero-copy": Self::get(&self.dirty_sync_missed_zero_copy),
        })
    }
}

/// The XBZRLE figures of a migration (QEMU's `xbzrle_counters`).
#[derive(Debug, Default)]
pub struct XbzrleCounters {
    /// Bytes of XBZRLE records (without their 8-byte offset word) and of overflowing
    /// pages.
    pub bytes: AtomicU64,
    /// Pages found in the cache (encoded, unchanged or overflowing).
    pub pages: AtomicU64,
    pub cache_miss: AtomicU64,
    pub overflow: AtomicU64,
    /// f64 bits.
    pub cache_miss_rate: AtomicU64,
    /// f64 bits.
    pub encoding_rate: AtomicU64,
}

impl XbzrleCounters {
    /// The `xbzrle-cache` member of `query-migrate`, in QEMU's member order.
    pub fn to_json(&self, cache_size: u64) -> Value {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "cache-size": cache_size,
            "bytes": get(&self.bytes),
            "pages": get(&self.pages),
            "cache-miss": get(&self.cache_miss),
            "cache-miss-rate": number(f64::from_bits(get(&self.cache_miss_rate))),
            "encoding-rate": number(f64::from_bits(get(&self.encoding_rate))),
            "overflow": get(&self.overflow),
        })
    }
}

/// A float as QEMU prints it: integral values without a decimal point.
pub fn number(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        json!(f as i64)
    } else {
        json!(f)
    }
}
