//! dirty-limit: holds each limited vCPU to a dirty-page rate.
//!
//! A limiter thread measures every vCPU's dirty rate once a period from the VMM's
//! per-vCPU counters ([`VcpuDirtyControl`]: the KVM dirty ring of each vCPU, or what a
//! `soft` vCPU thread marks) and re-tunes the share of its time each limited vCPU
//! sleeps. vCPUs without a limit are never touched.
//!
//! ```text
//!   set (first limit)            period tick: measure, re-tune          cancel (last limit)
//!  Idle ─────────────────▶ InService ──────────────────────▶ InService ─────────────▶ Idle
//!                          (thread runs, counting on)                  (sleeps lifted)
//! ```
//!
//! The throttle is by volume, as QEMU's (which sleeps a set time each time a vCPU's
//! dirty ring fills): a limited vCPU sleeps a set time for every MiB it dirties. Held
//! far below its free rate, its rate is then set by the sleeps, not by how fast it runs
//! on a host shared with others. The controller ([`retune`]) takes each period's rate as
//! a time per MiB, split into what the sleeps took and what running took, and moves the
//! total part of the way (on a log scale) to the time per MiB that meets the limit: most
//! of the way when far off, half of it near the limit, where the period's figure is
//! mostly noise that a full step would feed back as oscillation. A figure within a small
//! tolerance of the limit leaves it alone.

//! The same limiter serves `set-vcpu-dirty-limit` and the migration's `dirty-limit`
//! capability: while a migration owns it, the monitor cannot change it (QEMU's rule),
//! and the migration lifts every limit when it ends, fails or is cancelled.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::vmm::{VcpuDirtyControl, Vmm, VmmError};

/// The measuring period outside migration (QEMU's, for `set-vcpu-dirty-limit`).
pub const DEFAULT_PERIOD: Duration = Duration::from_millis(1000);

/// How often the per-vCPU counters are read within a period.
pub const SAMPLE: Duration = Duration::from_millis(50);

/// The longest a limited vCPU sleeps per MiB it dirties (µs): 0.1 MiB/s at most.
pub const MAX_SLEEP_US_PER_MIB: u32 = 10_000_000;

/// A measured rate within this share of the limit needs no re-tuning.
const TOLERANCE: f64 = 0.08;

/// How far (as a power on the ratio limit / rate) each period moves the run share
/// when the rate is more than half as much again off the limit: 1 would jump straight to
/// the model's answer.
const FAR_STEP: f64 = 0.8;

/// The same within half as much again of the limit: smaller, to damp measurement noise.
const NEAR_STEP: f64 = 0.5;

/// Dirty ring entries per vCPU assumed for the ring-full figures when the VMM has no
/// ring (`soft` vCPUs): QEMU's usual `dirty-ring-size`.
const NOMINAL_RING_ENTRIES: u64 = 4096;

/// Why a dirty-limit command was refused, with QEMU's texts.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLimitError {
    #[error(
        "dirty page limit feature requires KVM with accelerator property 'dirty-ring-size' set'"
    )]
    Unavailable,
    #[error("incorrect cpu index specified")]
    CpuIndex,
    #[error("can't set dirty page rate limit while migration is running")]
    SetDuringMigration,
    #[error("can't cancel dirty page rate limit while migration is running")]
    CancelDuringMigration,
    #[error("the dirty-limit thread cannot be started: {0}")]
    SpawnThread(std::io::Error),
    #[error(transparent)]
    Vmm(#[from] VmmError),
}

/// The next sleep per MiB (µs) of a vCPU limited to `quota` MiB/s that dirtied at
/// `current` MiB/s in the last period while sleeping `sleep_us` per MiB.
pub fn retune(quota: u64, current: f64, sleep_us: u32) -> u32 {
    if quota == 0 {
        return 0;
    }
    if current <= 0.0 {
        // Nothing dirtied: idle, or stopped. Half the sleep, not none at once, which
        // would only bring a burst back.
        return sleep_us / 2;
    }
    let quota = quota as f64;
    if (current - quota).abs() <= quota * TOLERANCE {
        return sleep_us;
    }
    let per_mib = 1e6 / current;
    // What running took per MiB (at least a little: the figures are a period's).
    let running = (per_mib - f64::from(sleep_us)).max(per_mib * 0.01);
    let ratio = current / quota;
    let step = if (1.0 / 1.5..=1.5).contains(&ratio) {
        NEAR_STEP
    } else {
        FAR_STEP
    };
    let next_per_mib = per_mib * ratio.powf(step);
    let sleep = (next_per_mib - running).round().max(0.0);
    sleep.min(f64::from(MAX_SLEEP_US_PER_MIB)) as u32
}

/// One vCPU's limit and figures.
#[derive(Debug, Clone, Copy, Default)]
struct VcpuLimit {
    /// MiB/s; `None` when the vCPU is not limited.
    quota: Option<u64>,
    /// The last measured rate, MiB/s.
    current: f64,
    /// How long it sleeps per MiB it dirties, µs.
    sleep_us: u32,
}

#[derive(Debug, Default)]
struct LimiterState {
    vcpus: Vec<VcpuLimit>,
    /// The measuring thread runs (some vCPU is limited).
    in_service: bool,
    /// A migration with the `dirty-limit` capability set the limits.
    migration: bool,
    period: Option<Duration>,
    /// Asks the thread to end.
    quit: bool,
}

/// The per-vCPU dirty-page rate limiter of one VM.
pub struct DirtyLimiter {
    vmm: Arc<dyn Vmm>,
    state: Arc<(Mutex<LimiterState>, Condvar)>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for DirtyLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyLimiter")
            .field("state", &self.lock())
            .finish()
    }
}

impl DirtyLimiter {
    pub fn new(vmm: Arc<dyn Vmm>) -> Self {
        Self {
            vmm,
            state: Arc::new((Mutex::new(LimiterState::default()), Condvar::new())),
            thread: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LimiterState> {
        self.state.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn control(&self) -> Result<&dyn VcpuDirtyControl, DirtyLimitError> {
        self.vmm
            .vcpu_dirty_control()
            .ok_or(DirtyLimitError::Unavailable)
    }

    /// Whether this VM can limit dirty rates at all.
    pub fn available(&self) -> bool {
        self.vmm.vcpu_dirty_control().is_some()
    }

    /// Whether some vCPU is limited.
    pub fn in_service(&self) -> bool {
        self.lock().in_service
    }

    fn check_index(
        &self,
        control: &dyn VcpuDirtyControl,
        cpu_index: Option<i64>,
    ) -> Result<(), DirtyLimitError> {
        match cpu_index {
            Some(i) if i < 0 || i as u64 >= control.vcpu_count() as u64 => {
                Err(DirtyLimitError::CpuIndex)
            }
            _ => Ok(()),
        }
    }

    /// `set-vcpu-dirty-limit`: limits one vCPU (or all) to `rate` MiB/s; 0 cancels.
    /// `migration_owns` is QEMU's rule: a migration with `dirty-limit` set and the
    /// limiter in service refuses the monitor.
    pub fn set(
        &self,
        cpu_index: Option<i64>,
        rate: u64,
        migration_owns: bool,
    ) -> Result<(), DirtyLimitError> {
        let control = self.control()?;
        self.check_index(control, cpu_index)?;
        if migration_owns && self.in_service() {
            return Err(DirtyLimitError::SetDuringMigration);
        }
        if rate == 0 {
            return self.cancel(cpu_index, migration_owns);
        }
        self.apply(control, cpu_index.map(|i| i as usize), Some(rate))
    }

    /// `cancel-vcpu-dirty-limit`: lifts one vCPU's limit (or all). A VM that cannot
    /// limit answers with success, as QEMU does without a ring.
    pub fn cancel(
        &self,
        cpu_index: Option<i64>,
        migration_owns: bool,
    ) -> Result<(), DirtyLimitError> {
        let Ok(control) = self.control() else {
            return Ok(());
        };
        self.check_index(control, cpu_index)?;
        if migration_owns && self.in_service() {
            return Err(DirtyLimitError::CancelDuringMigration);
        }
        self.apply(control, cpu_index.map(|i| i as usize), None)
    }

    /// The migration's trigger: every vCPU limited to `rate` MiB/s, measured every
    /// `period`.
    pub fn migration_limit(&self, rate: u64, period: Duration) -> Result<(), DirtyLimitError> {
        let control = self.control()?;
        {
            let mut st = self.lock();
            st.migration = true;
            st.period = Some(period);
        }
        self.apply(control, None, Some(rate.max(1)))
    }

    /// New `vcpu-dirty-limit` / `x-vcpu-dirty-limit-period` during a migration that
    /// limits the vCPUs: they take effect at once.
    pub fn migration_parameters(&self, rate: u64, period: Duration) {
        let mut st = self.lock();
        if !st.migration || !st.in_service {
            return;
        }
        st.period = Some(period);
        for v in st.vcpus.iter_mut().filter(|v| v.quota.is_some()) {
            v.quota = Some(rate.max(1));
        }
        drop(st);
        self.state.1.notify_all();
    }

    /// The migration ended (completed, failed or cancelled): every limit is lifted, as
    /// QEMU does when the migration set them.
    pub fn migration_ended(&self) {
        let was = std::mem::take(&mut self.lock().migration);
        if was {
            if let Ok(control) = self.control() {
                let _ = self.apply(control, None, None);
            }
        }
    }

    /// Whether a migration set the current limits.
    pub fn migration_owned(&self) -> bool {
        let st = self.lock();
        st.migration && st.in_service
    }

    fn apply(
        &self,
        control: &dyn VcpuDirtyControl,
        only: Option<usize>,
        quota: Option<u64>,
    ) -> Result<(), DirtyLimitError> {
        let mut st = self.lock();
        let n = control.vcpu_count();
        if st.vcpus.len() != n {
            st.vcpus.resize(n, VcpuLimit::default());
        }
        for (i, v) in st.vcpus.iter_mut().enumerate() {
            if only.is_some_and(|o| o != i) {
                continue;
            }
            v.quota = quota;
            if quota.is_none() && v.sleep_us != 0 {
                v.sleep_us = 0;
                control.set_vcpu_sleep(i, 0)?;
            }
        }
        let any = st.vcpus.iter().any(|v| v.quota.is_some());
        if any && !st.in_service {
            control.start_counting()?;
            st.in_service = true;
            st.quit = false;
            drop(st);
            self.spawn()?;
        } else if !any && st.in_service {
            st.in_service = false;
            st.quit = true;
            st.migration = false;
            st.period = None;
            for v in st.vcpus.iter_mut() {
                v.current = 0.0;
            }
            drop(st);
            self.state.1.notify_all();
            if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = t.join();
            }
            control.stop_counting();
        } else {
            drop(st);
            self.state.1.notify_all();
        }
        Ok(())
    }

    fn spawn(&self) -> Result<(), DirtyLimitError> {
        let vmm = self.vmm.clone();
        let state = self.state.clone();
        let handle = std::thread::Builder::new()
            .name("dirtylimit".into())
            .spawn(move || limiter_thread(&*vmm, &state))
            .map_err(DirtyLimitError::SpawnThread)?;
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(())
    }

    /// `query-vcpu-dirty-limit`: the limited vCPUs with their limit and current rate.
    pub fn query(&self) -> Value {
        let st = self.lock();
        if !st.in_service {
            return json!([]);
        }
        Value::Array(
            st.vcpus
                .iter()
                .enumerate()
                .filter_map(|(i, v)| {
                    v.quota.map(|q| {
                        json!({"limit-rate": q, "current-rate": v.current as u64, "cpu-index": i})
                    })
                })
                .collect(),
        )
    }

    /// The current dirty rate of each vCPU in MiB/s while the limiter measures.
    pub fn current_rates(&self) -> Option<Vec<u64>> {
        let st = self.lock();
        st.in_service
            .then(|| st.vcpus.iter().map(|v| v.current as u64).collect())
    }

    /// `query-migrate`'s `dirty-limit-throttle-time-per-round` and
    /// `dirty-limit-ring-full-time` (µs): the most any vCPU sleeps per dirty ring's worth
    /// of pages, and the time the vCPUs take on average to dirty that much when they run.
    pub fn round_times(&self) -> Option<(u64, u64)> {
        let st = self.lock();
        if !st.in_service {
            return None;
        }
        let page = self
            .vmm
            .ram_blocks()
            .first()
            .map_or(4096, |b| b.page_size());
        let ring_mib = (self.ring_entries() * page) as f64 / f64::from(1u32 << 20);
        let running: Vec<f64> = st
            .vcpus
            .iter()
            .filter(|v| v.current > 0.0)
            .map(|v| (1e6 / v.current - f64::from(v.sleep_us)).max(0.0))
            .collect();
        let full_us = if running.is_empty() {
            0.0
        } else {
            ring_mib * running.iter().sum::<f64>() / running.len() as f64
        };
        let throttle_us = st
            .vcpus
            .iter()
            .map(|v| ring_mib * f64::from(v.sleep_us))
            .fold(0.0, f64::max);
        Some((throttle_us as u64, full_us as u64))
    }

    fn ring_entries(&self) -> u64 {
        NOMINAL_RING_ENTRIES
    }
}

impl Drop for DirtyLimiter {
    fn drop(&mut self) {
        self.lock().quit = true;
        self.state.1.notify_all();
        if let Some(t) = self
            .thread
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = t.join();
        }
    }
}

/// Measures every period and re-tunes the limited vCPUs until asked to end. The
/// counters are read every [`SAMPLE`] within a period: a VMM that counts each page once
/// per read (a dirty ring's pages) then sees up to a slice's worth per sample, not per
/// period, and a vCPU that rewrites a small set fast still shows a high rate.
fn limiter_thread(vmm: &dyn Vmm, state: &(Mutex<LimiterState>, Condvar)) {
    let Some(control) = vmm.vcpu_dirty_control() else {
        return;
    };
    let page = vmm.ram_blocks().first().map_or(4096, |b| b.page_size());
    let mut last = control.dirtied_pages().unwrap_or_default();
    let mut since = Instant::now();
    let lock = || state.0.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let mut st = lock();
        let period = st.period.unwrap_or(DEFAULT_PERIOD);
        let deadline = since + period;
        let mut next_sample = Instant::now() + SAMPLE;
        loop {
            if st.quit {
                return;
            }
            let now = Instant::now();
            if now >= deadline || st.period.unwrap_or(DEFAULT_PERIOD) != period {
                break;
            }
            if now >= next_sample {
                // Counted pages accumulate in the VMM until the period ends.
                drop(st);
                let _ = control.dirtied_pages();
                next_sample = Instant::now() + SAMPLE;
                st = lock();
                continue;
            }
            let wake = deadline.min(next_sample);
            st = state
                .1
                .wait_timeout(st, wake - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(st);
        let Ok(now_pages) = control.dirtied_pages() else {
            continue;
        };
        let secs = since.elapsed().as_secs_f64().max(1e-3);
        since = Instant::now();
        let mut st = lock();
        for (i, v) in st.vcpus.iter_mut().enumerate() {
            let delta = now_pages
                .get(i)
                .zip(last.get(i))
                .map_or(0, |(n, l)| n.saturating_sub(*l));
            v.current = (delta * page) as f64 / f64::from(1u32 << 20) / secs;
            if let Some(q) = v.quota {
                let next = retune(q, v.current, v.sleep_us);
                if next != v.sleep_us {
                    v.sleep_us = next;
                    let _ = control.set_vcpu_sleep(i, next);
                }
            }
        }
        last = now_pages;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rate of a vCPU that dirties `free` MiB/s while it runs and sleeps `sleep`
    /// µs per MiB.
    fn rate(free: f64, sleep: u32) -> f64 {
        1e6 / (1e6 / free + f64::from(sleep))
    }

    /// A vCPU settles on the limit within a few periods, from above, and stays there;
    /// one held far below its free rate stays there even when that swings (a loaded
    /// host), since its sleeps set its rate.
    #[test]
    fn retune_settles_without_oscillating() {
        for (free, quota) in [(2000.0, 50u64), (100.0, 90), (5000.0, 1), (40.0, 30)] {
            let mut sleep = 0;
            let mut rates = Vec::new();
            for i in 0..10 {
                // The free rate swings by a factor of two once settled.
                let swings = free >= 10.0 * quota as f64 && i >= 6 && i % 2 == 0;
                let f = if swings { free * 2.0 } else { free };
                let r = rate(f, sleep);
                rates.push(r);
                sleep = retune(quota, r, sleep);
            }
            let q = quota as f64;
            for r in &rates[4..] {
                assert!(
                    (r - q).abs() <= q * 0.25,
                    "free {free} quota {quota}: {rates:?}"
                );
            }
            assert!(rates.iter().all(|r| *r >= q * 0.75), "{rates:?}");
        }
    }

    #[test]
    fn retune_leaves_a_vcpu_under_its_limit_alone() {
        assert_eq!(retune(100, 10.0, 0), 0);
        assert_eq!(retune(100, 0.0, 0), 0);
        // Nothing dirtied while throttled: half the sleep, not none.
        assert_eq!(retune(100, 0.0, 9000), 4500);
        // Within the tolerance: unchanged.
        assert_eq!(retune(100, 106.0, 4000), 4000);
        // Under the limit while sleeping: sleeps less.
        assert!(retune(100, 50.0, 15_000) < 15_000);
    }
}
