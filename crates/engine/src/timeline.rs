//! A migration's timeline: its figures about every 100 ms and the moments that matter
//! (status changes, dirty-bitmap passes, the stop and the downtime), for a picture of
//! how it went (`vmigrate report`) and for the vmigrate-only QMP command
//! `x-vmigrate-query-migrate-timeline`.
//!
//! It lives in [`crate::stats::Stats`], so it starts with each outgoing migration's fresh counters and
//! reads the same figures `query-migrate` reports. Status changes and passes are noted
//! where they happen (the state machine in `shared`); a sampler thread reads the
//! counters every [`SAMPLE_PERIOD`] until the migration ends, then takes a last sample.
//!
//! Memory is bounded: past [`MAX_SAMPLES`] samples every other one is dropped and the
//! period doubles, so an hour-long migration keeps a coarser picture of all of it.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::status::MigrationStatus;

/// How often the sampler reads the counters.
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(100);

/// Samples kept before the timeline thins itself.
pub const MAX_SAMPLES: usize = 4096;

/// Events kept (status changes and passes); later ones are counted, not kept.
pub const MAX_EVENTS: usize = 4096;

/// Version of the JSON document, for readers of saved timelines.
pub const FORMAT_VERSION: u64 = 1;

/// The figures at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Milliseconds since the migration started.
    pub t_ms: u64,
    /// Bytes sent so far (`ram.transferred`).
    pub transferred: u64,
    /// Bytes still dirty (`ram.remaining`).
    pub remaining: u64,
    /// Bytes per second the guest dirtied, from the last pass (`dirty-pages-rate` ×
    /// page size).
    pub dirty_rate: u64,
    /// Bytes per second sent since the previous sample (or the one before it, when the
    /// previous one is less than half a period back).
    pub bandwidth: u64,
    /// Dirty-bitmap passes so far (`dirty-sync-count`).
    pub pass: u64,
    /// auto-converge's throttle, percent.
    pub throttle: u64,
    pub status: MigrationStatus,
}

/// The counters a sample and the summary read: the figures of `query-migrate`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counters {
    pub transferred: u64,
    pub remaining: u64,
    /// Pages per second.
    pub dirty_pages_rate: u64,
    pub page_size: u64,
    pub dirty_sync_count: u64,
    pub cpu_throttle_percentage: u64,
    pub total_ram: u64,
    pub normal: u64,
    pub duplicate: u64,
    pub setup_time_ms: u64,
    pub downtime_ms: u64,
    pub total_time_ms: u64,
    /// Milliseconds since the migration started.
    pub elapsed_ms: u64,
    pub mbps: f64,
}

/// Something that happened at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Status(MigrationStatus),
    /// A dirty-bitmap pass began (its number, as `MIGRATION_PASS` gives it).
    Pass(u64),
}

#[derive(Debug)]
struct Inner {
    samples: Vec<Sample>,
    events: Vec<(u64, Event)>,
    events_dropped: u64,
    /// Keep one sample in `stride` (doubles each time the samples are thinned).
    stride: u64,
    taken: u64,
    status: MigrationStatus,
    last_transferred: u64,
    last_t_ms: u64,
    /// The sample before the last one, as (t_ms, transferred).
    before_last: (u64, u64),
    /// When the migration ended (its last status change).
    ended_at_ms: Option<u64>,
}

/// The timeline of one migration. See the module documentation.
#[derive(Debug)]
pub struct Timeline {
    origin: Instant,
    inner: Mutex<Inner>,
}

impl Default for Timeline {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            inner: Mutex::new(Inner {
                samples: Vec::new(),
                events: Vec::new(),
                events_dropped: 0,
                stride: 1,
                taken: 0,
                status: MigrationStatus::None,
                last_transferred: 0,
                last_t_ms: 0,
                before_last: (0, 0),
                ended_at_ms: None,
            }),
        }
    }
}

impl Timeline {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn push_event(&self, event: Event) {
        let t = self.now_ms();
        let mut inner = self.lock();
        if let Event::Status(s) = event {
            inner.status = s;
            inner.ended_at_ms = has_ended(s).then_some(t);
        }
        if inner.events.len() < MAX_EVENTS {
            inner.events.push((t, event));
        } else {
            inner.events_dropped += 1;
        }
    }

    /// Notes a status change (called by the state machine).
    pub fn status_changed(&self, status: MigrationStatus) {
        self.push_event(Event::Status(status));
    }

    /// Notes the start of a dirty-bitmap pass.
    pub fn pass(&self, pass: u64) {
        self.push_event(Event::Pass(pass));
    }

    /// The status last noted.
    pub fn status(&self) -> MigrationStatus {
        self.lock().status
    }

    /// Takes one sample of the counters.
    pub fn sample(&self, c: &Counters) {
        let now = self.now_ms();
        let transferred = c.transferred;
        let mut inner = self.lock();
        // Samples after the end are dated at the end: nothing moved since.
        let t_ms = inner.ended_at_ms.map_or(now, |end| end.min(now));
        // Over at least half a period: the last sample of a migration can come a few
        // milliseconds after the one before, and a rate over so short a time says little.
        let (mut since_t, mut since_bytes) = (inner.last_t_ms, inner.last_transferred);
        if t_ms.saturating_sub(since_t) < SAMPLE_PERIOD.as_millis() as u64 / 2 {
            (since_t, since_bytes) = inner.before_last;
        }
        let dt = t_ms.saturating_sub(since_t);
        let bandwidth = (transferred.saturating_sub(since_bytes) * 1000)
            .checked_div(dt)
            .unwrap_or(0);
        inner.before_last = (inner.last_t_ms, inner.last_transferred);
        inner.last_t_ms = t_ms;
        inner.last_transferred = transferred;
        let ended = has_ended(inner.status);
        let sample = Sample {
            t_ms,
            transferred,
            remaining: if ended { 0 } else { c.remaining },
            dirty_rate: c.dirty_pages_rate.saturating_mul(c.page_size.max(1)),
            bandwidth,
            pass: c.dirty_sync_count,
            throttle: c.cpu_throttle_percentage,
            status: inner.status,
        };
        inner.taken += 1;
        // The last sample of an ended migration is always kept.
        if !inner.taken.is_multiple_of(inner.stride) && !ended {
            return;
        }
        inner.samples.push(sample);
        if inner.samples.len() >= MAX_SAMPLES {
            let mut i = 0;
            inner.samples.retain(|_| {
                i += 1;
                i % 2 == 1
            });
            inner.stride *= 2;
        }
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.lock().samples.clone()
    }

    pub fn events(&self) -> Vec<(u64, Event)> {
        self.lock().events.clone()
    }

    /// The timeline as JSON: samples, events and a summary whose figures are those of
    /// `query-migrate` (the same counters).
    pub fn to_json(&self, c: &Counters) -> Value {
        let inner = self.lock();
        let samples: Vec<Value> = inner
            .samples
            .iter()
            .map(|s| {
                json!({
                    "t-ms": s.t_ms,
                    "transferred": s.transferred,
                    "remaining": s.remaining,
                    "dirty-rate": s.dirty_rate,
                    "bandwidth": s.bandwidth,
                    "pass": s.pass,
                    "throttle": s.throttle,
                    "status": s.status.name(),
                })
            })
            .collect();
        let events: Vec<Value> = inner
            .events
            .iter()
            .map(|(t, e)| match e {
                Event::Status(s) => json!({"t-ms": t, "event": "status", "status": s.name()}),
                Event::Pass(p) => json!({"t-ms": t, "event": "pass", "pass": p}),
            })
            .collect();
        let ended = has_ended(inner.status);
        json!({
            "version": FORMAT_VERSION,
            "sample-period-ms": SAMPLE_PERIOD.as_millis() as u64 * inner.stride,
            "samples": samples,
            "events": events,
            "events-dropped": inner.events_dropped,
            "summary": {
                "status": inner.status.name(),
                "transferred": c.transferred,
                "total-ram": c.total_ram,
                "page-size": c.page_size,
                "normal-pages": c.normal,
                "duplicate-pages": c.duplicate,
                "passes": c.dirty_sync_count,
                "setup-time-ms": c.setup_time_ms,
                "downtime-ms": ended.then_some(c.downtime_ms),
                "total-time-ms": if ended { c.total_time_ms } else { c.elapsed_ms },
                "mbps": c.mbps,
            },
        })
    }
}

/// Completed, failed or cancelled (not `none`: a timeline that has not started).
pub fn has_ended(status: MigrationStatus) -> bool {
    status.is_terminal() && status != MigrationStatus::None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_follow_the_counters() {
        let t = Timeline::default();
        let mut c = Counters {
            page_size: 4096,
            ..Counters::default()
        };
        t.status_changed(MigrationStatus::Setup);
        t.sample(&c);
        c.transferred = 1 << 20;
        c.remaining = 5 << 20;
        c.dirty_pages_rate = 10;
        t.pass(1);
        t.status_changed(MigrationStatus::Active);
        std::thread::sleep(Duration::from_millis(20));
        t.sample(&c);
        let s = t.samples();
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].transferred, 1 << 20);
        assert_eq!(s[1].remaining, 5 << 20);
        assert_eq!(s[1].dirty_rate, 40960);
        assert!(s[1].bandwidth > 0);
        assert_eq!(s[1].status, MigrationStatus::Active);
        assert!(s[1].t_ms >= s[0].t_ms + 20);
        let e = t.events();
        assert_eq!(e[1].1, Event::Pass(1));
        t.status_changed(MigrationStatus::Completed);
        t.sample(&c);
        let j = t.to_json(&c);
        assert_eq!(j["summary"]["transferred"], 1 << 20);
        assert_eq!(j["samples"][2]["remaining"], 0);
        assert_eq!(j["events"][3]["status"], "completed");
    }

    #[test]
    fn long_migrations_thin_their_samples() {
        let t = Timeline::default();
        let c = Counters::default();
        t.status_changed(MigrationStatus::Active);
        for _ in 0..(MAX_SAMPLES * 3) {
            t.sample(&c);
        }
        let n = t.samples().len();
        assert!(n < MAX_SAMPLES && n > MAX_SAMPLES / 4, "{n}");
        t.status_changed(MigrationStatus::Completed);
        t.sample(&c);
        assert_eq!(
            t.samples().last().unwrap().status,
            MigrationStatus::Completed
        );
        for _ in 0..MAX_EVENTS + 5 {
            t.pass(1);
        }
        assert_eq!(t.events().len(), MAX_EVENTS);
        assert_eq!(t.to_json(&c)["events-dropped"], 7);
    }
}
