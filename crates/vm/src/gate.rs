//! The gate every vCPU thread passes: run, park and throttle.
//!
//! ```text
//!            resume()                      pause() (returns once all are parked)
//!  Parked ───────────────▶ Running ─────────────────────────────────▶ Parked
//!                            │  ▲
//!          throttle slice    ▼  │  slept pct/(100-pct) of each 10 ms slice
//!                          Throttled
//! shutdown(): every thread leaves its loop.
//! ```
//!
//! A vCPU thread checks [`VcpuGate::should_park`] between units of guest work (one page
//! for `soft`, one `KVM_RUN` exit for `kvm`) and calls [`VcpuGate::park`] when asked;
//! [`VcpuGate::pause`] returns only when every thread has parked, so no vCPU writes
//! guest memory after it. Sleeping (pacing, throttling) goes through
//! [`VcpuGate::sleep`], which a pause interrupts.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// The length of one throttling slice: a vCPU throttled at `pct` runs for this long,
/// then sleeps `pct / (100 - pct)` times as long.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// The largest throttle percentage (QEMU's `max-cpu-throttle` range ends at 99).
pub const MAX_THROTTLE: u8 = 99;

/// A vCPU held to a dirty limit sleeps once it owes at least this much.
pub const DIRTY_LIMIT_MIN_SLEEP: Duration = Duration::from_millis(1);

/// vCPUs whose sleep share dirty-limit can set (the machines have at most 16).
pub const MAX_LIMITED_VCPUS: usize = 64;

#[derive(Debug)]
struct GateState {
    run: bool,
    quit: bool,
    /// Threads that exist and have not ended.
    threads: usize,
    /// Threads waiting in `park`.
    parked: usize,
}

/// Run, park and throttle control shared by the VMM and its vCPU threads.
#[derive(Debug)]
pub struct VcpuGate {
    state: Mutex<GateState>,
    changed: Condvar,
    /// Set while the vCPUs should not run: the threads' fast-path check.
    stop_requested: AtomicBool,
    throttle: AtomicU8,
    /// Each vCPU's dirty-limit sleep per MiB it dirties, µs.
    vcpu_sleep: [AtomicU32; MAX_LIMITED_VCPUS],
}

impl Default for VcpuGate {
    fn default() -> Self {
        Self::new()
    }
}

impl VcpuGate {
    /// A gate that holds its vCPUs parked until [`VcpuGate::resume`].
    pub fn new() -> Self {
        Self {
            state: Mutex::new(GateState {
                run: false,
                quit: false,
                threads: 0,
                parked: 0,
            }),
            changed: Condvar::new(),
            stop_requested: AtomicBool::new(true),
            throttle: AtomicU8::new(0),
            vcpu_sleep: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a vCPU thread in; call before spawning it.
    pub fn register(&self) {
        self.lock().threads += 1;
    }

    /// Counts a vCPU thread out; call when its loop ends.
    pub fn unregister(&self) {
        let mut st = self.lock();
        st.threads -= 1;
        drop(st);
        self.changed.notify_all();
    }

    /// Whether the thread should stop doing guest work and call [`VcpuGate::park`].
    pub fn should_park(&self) -> bool {
        self.stop_requested.load(Ordering::Acquire)
    }

    /// Waits, parked, until the vCPUs may run again. False when the machine shuts down
    /// (the thread must end).
    pub fn park(&self) -> bool {
        let mut st = self.lock();
        st.parked += 1;
        self.changed.notify_all();
        while !st.run && !st.quit {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.parked -= 1;
        !st.quit
    }

    /// Stops the vCPUs: returns when every registered thread is parked.
    pub fn pause(&self) {
        let mut st = self.lock();
        st.run = false;
        self.stop_requested.store(true, Ordering::Release);
        self.changed.notify_all();
        while st.parked < st.threads && !st.quit {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Lets the vCPUs run.
    pub fn resume(&self) {
        let mut st = self.lock();
        st.run = true;
        self.stop_requested.store(false, Ordering::Release);
        drop(st);
        self.changed.notify_all();
    }

    /// Whether the vCPUs are allowed to run.
    pub fn running(&self) -> bool {
        self.lock().run
    }

    /// Ends every vCPU thread's loop.
    pub fn shutdown(&self) {
        let mut st = self.lock();
        st.quit = true;
        st.run = false;
        self.stop_requested.store(true, Ordering::Release);
        drop(st);
        self.changed.notify_all();
    }

    /// Sets the throttle (0 to [`MAX_THROTTLE`] percent; larger values are capped).
    pub fn set_throttle(&self, pct: u8) {
        self.throttle
            .store(pct.min(MAX_THROTTLE), Ordering::Relaxed);
    }

    pub fn throttle(&self) -> u8 {
        self.throttle.load(Ordering::Relaxed)
    }

    /// Sets how long vCPU `index` sleeps per MiB it dirties (dirty-limit, µs); false for
    /// an index beyond [`MAX_LIMITED_VCPUS`].
    pub fn set_vcpu_sleep(&self, index: usize, us_per_mib: u32) -> bool {
        match self.vcpu_sleep.get(index) {
            Some(slot) => {
                slot.store(us_per_mib, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// vCPU `index`'s dirty-limit sleep per MiB (µs).
    pub fn vcpu_sleep(&self, index: usize) -> u32 {
        self.vcpu_sleep
            .get(index)
            .map_or(0, |s| s.load(Ordering::Relaxed))
    }

    /// Sleeps up to `d`, returning early when the vCPUs are asked to park.
    pub fn sleep(&self, d: Duration) {
        let deadline = Instant::now() + d;
        let mut st = self.lock();
        while st.run && !st.quit {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Per-thread throttling and pacing: how long a vCPU thread has run in the current
/// slice, and how far ahead of a rate it is.
#[derive(Debug)]
pub struct Pacer {
    slice_start: Instant,
    rate_start: Instant,
    rate_bytes: u64,
    /// Bytes per second this thread may dirty; `None` is unlimited.
    rate: Option<u64>,
    /// The vCPU this thread runs, for its dirty-limit sleeps.
    vcpu: Option<usize>,
    /// Dirty-limit sleep owed and not taken yet, ns.
    owed_ns: u64,
}

impl Pacer {
    pub fn new(rate: Option<u64>) -> Self {
        let now = Instant::now();
        Self {
            slice_start: now,
            rate_start: now,
            rate_bytes: 0,
            rate,
            vcpu: None,
            owed_ns: 0,
        }
    }

    /// The pacer of vCPU `index`'s thread: it also takes the vCPU's dirty-limit sleeps.
    pub fn for_vcpu(rate: Option<u64>, index: usize) -> Self {
        Self {
            vcpu: Some(index),
            ..Self::new(rate)
        }
    }

    /// Starts afresh after the thread was parked, so no burst makes up for the pause.
    pub fn restart(&mut self) {
        let vcpu = self.vcpu;
        *self = Self::new(self.rate);
        self.vcpu = vcpu;
    }

    /// Counts `bytes` the vCPU dirtied: a vCPU held to a dirty limit sleeps its share
    /// for them (through the gate), once it owes at least [`DIRTY_LIMIT_MIN_SLEEP`].
    pub fn dirtied(&mut self, gate: &VcpuGate, bytes: u64) {
        let us_per_mib = self.vcpu.map_or(0, |i| gate.vcpu_sleep(i));
        if us_per_mib == 0 {
            self.owed_ns = 0;
            return;
        }
        let owed = (u128::from(bytes) * u128::from(us_per_mib) * 1000) >> 20;
        // A jump in the count (a guest that arrived by migration) owes no more than a
        // measuring period's worth.
        let cap = Duration::from_secs(1).as_nanos();
        self.owed_ns = (u128::from(self.owed_ns) + owed).min(cap) as u64;
        if self.owed_ns >= DIRTY_LIMIT_MIN_SLEEP.as_nanos() as u64 {
            gate.sleep(Duration::from_nanos(self.owed_ns));
            self.owed_ns = 0;
        }
    }

    /// Accounts `bytes` of guest work and sleeps (through the gate) as the throttle and
    /// the rate require.
    pub fn account(&mut self, gate: &VcpuGate, bytes: u64) {
        self.dirtied(gate, bytes);
        if let Some(rate) = self.rate {
            self.rate_bytes += bytes;
            let due = Duration::from_secs_f64(self.rate_bytes as f64 / rate as f64);
            let elapsed = self.rate_start.elapsed();
            if due > elapsed + Duration::from_millis(1) {
                gate.sleep(due - elapsed);
            }
            if self.rate_start.elapsed() > Duration::from_secs(1) {
                // Keep the window short so a slow second is not made up later.
                self.rate_start = Instant::now();
                self.rate_bytes = 0;
            }
        }
        self.throttle_point(gate);
    }

    /// Sleeps for the throttle's share once a slice has been used up.
    /// Sleeps for the throttle's share once a slice has been used up.
    pub fn throttle_point(&mut self, gate: &VcpuGate) {
        let ran = self.slice_start.elapsed();
        if ran < THROTTLE_SLICE {
            return;
        }
        let pct = u32::from(gate.throttle());
        if pct > 0 {
            gate.sleep(ran * pct / (100 - pct));
        }
        self.slice_start = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    fn spin_thread(gate: Arc<VcpuGate>, work: Arc<AtomicU64>) -> std::thread::JoinHandle<()> {
        gate.register();
        std::thread::spawn(move || {
            let mut pacer = Pacer::new(None);
            loop {
                if gate.should_park() {
                    if !gate.park() {
                        break;
                    }
                    pacer.restart();
                }
                work.fetch_add(1, Ordering::Relaxed);
                std::hint::spin_loop();
                pacer.throttle_point(&gate);
            }
            gate.unregister();
        })
    }

    #[test]
    fn a_limited_vcpu_sleeps_per_mib_it_dirties() {
        let gate = VcpuGate::new();
        gate.resume();
        let mut pacer = Pacer::for_vcpu(None, 1);
        let t = Instant::now();
        pacer.dirtied(&gate, 4 << 20);
        assert!(t.elapsed() < Duration::from_millis(5), "a free vCPU slept");
        assert!(gate.set_vcpu_sleep(1, 5_000));
        assert!(!gate.set_vcpu_sleep(MAX_LIMITED_VCPUS, 5_000));
        let t = Instant::now();
        // 4 MiB at 5 ms per MiB, owed in quarter-MiB steps.
        for _ in 0..16 {
            pacer.dirtied(&gate, 1 << 18);
        }
        let slept = t.elapsed();
        assert!(slept >= Duration::from_millis(19), "{slept:?}");
        // Another vCPU is not limited.
        let mut other = Pacer::for_vcpu(None, 0);
        let t = Instant::now();
        other.dirtied(&gate, 4 << 20);
        assert!(t.elapsed() < Duration::from_millis(5));
    }

    #[test]
    fn pause_returns_only_when_threads_are_parked() {
        let gate = Arc::new(VcpuGate::new());
        let work = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..2)
            .map(|_| spin_thread(gate.clone(), work.clone()))
            .collect();
        gate.resume();
        std::thread::sleep(Duration::from_millis(20));
        gate.pause();
        let at_pause = work.load(Ordering::Relaxed);
        assert!(at_pause > 0);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(work.load(Ordering::Relaxed), at_pause, "a parked vCPU ran");
        gate.resume();
        std::thread::sleep(Duration::from_millis(20));
        assert!(work.load(Ordering::Relaxed) > at_pause);
        gate.shutdown();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn throttle_takes_its_share() {
        let gate = VcpuGate::new();
        gate.resume();
        gate.set_throttle(200);
        assert_eq!(gate.throttle(), MAX_THROTTLE);
        gate.set_throttle(50);
        let mut pacer = Pacer::new(None);
        let t0 = Instant::now();
        let mut busy = Duration::ZERO;
        while t0.elapsed() < Duration::from_millis(200) {
            let b = Instant::now();
            while b.elapsed() < Duration::from_millis(1) {
                std::hint::spin_loop();
            }
            busy += b.elapsed();
            pacer.throttle_point(&gate);
        }
        let share = busy.as_secs_f64() / t0.elapsed().as_secs_f64();
        assert!((0.3..0.7).contains(&share), "ran {share:.2} of the time");
    }

    #[test]
    fn pacing_holds_the_rate() {
        let gate = VcpuGate::new();
        gate.resume();
        let mut pacer = Pacer::new(Some(10 << 20));
        let t0 = Instant::now();
        let mut bytes = 0u64;
        while bytes < 2 << 20 {
            pacer.account(&gate, 4096);
            bytes += 4096;
        }
        let secs = t0.elapsed().as_secs_f64();
        assert!(secs > 0.15, "2 MiB at 10 MiB/s took only {secs:.3} s");
    }

    #[test]
    fn pause_interrupts_sleep() {
        let gate = Arc::new(VcpuGate::new());
        gate.resume();
        let g = gate.clone();
        let t = std::thread::spawn(move || {
            let t0 = Instant::now();
            g.sleep(Duration::from_secs(10));
            t0.elapsed()
        });
        std::thread::sleep(Duration::from_millis(20));
        gate.pause();
        assert!(t.join().unwrap() < Duration::from_secs(5));
    }
}
