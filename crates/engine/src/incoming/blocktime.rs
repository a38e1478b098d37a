//! `postcopy-blocktime`: how long the vCPUs waited for postcopy pages, measured as QEMU
//! measures it. A vCPU is blocked from the moment the fault thread reads its fault
//! until the page it faulted on is placed; its blocktime is the sum of those waits.
//! The overall blocktime is the time during which every vCPU was blocked at once (the
//! guest made no progress at all). Faults of other threads (devices, the monitor) do
//! not count.
//!
//! No clock and no I/O here: the fault thread and the placements feed events with
//! their times.
//!
//! ```text
//! running ──fault(addr, t)──▶ blocked on addr since t ──placed(addr, t')──▶ running
//!                                                      (+ t' - t to the vCPU)
//! all vCPUs blocked from t_all ──any placement at t'──▶ (+ t' - t_all overall)
//! ```

use std::time::{Duration, Instant};

/// One vCPU's waits.
#[derive(Debug, Clone, Default)]
struct VcpuWaits {
    /// The page address it is blocked on, and since when.
    blocked_on: Option<(u64, Instant)>,
    total: Duration,
}

/// The blocktime of one postcopy destination.
#[derive(Debug, Clone)]
pub struct Blocktime {
    vcpus: Vec<VcpuWaits>,
    /// vCPUs blocked right now.
    blocked: usize,
    /// Since when every vCPU has been blocked, while they all are.
    all_blocked_since: Option<Instant>,
    overall: Duration,
}

impl Blocktime {
    pub fn new(vcpus: usize) -> Self {
        Self {
            vcpus: vec![VcpuWaits::default(); vcpus],
            blocked: 0,
            all_blocked_since: None,
            overall: Duration::ZERO,
        }
    }

    /// vCPU `vcpu` faulted on the page at host address `page_addr` (read at `at`).
    /// A vCPU index out of range is ignored; a vCPU already blocked keeps the start of
    /// its wait (the kernel may report a fault again).
    pub fn fault(&mut self, vcpu: usize, page_addr: u64, at: Instant) {
        let Some(v) = self.vcpus.get_mut(vcpu) else {
            return;
        };
        match &mut v.blocked_on {
            Some((addr, _)) => *addr = page_addr,
            None => {
                v.blocked_on = Some((page_addr, at));
                self.blocked += 1;
                if self.blocked == self.vcpus.len() {
                    self.all_blocked_since = Some(at);
                }
            }
        }
    }

    /// The page at host address `page_addr` was placed at `at`: the vCPUs blocked on
    /// it run again.
    pub fn placed(&mut self, page_addr: u64, at: Instant) {
        for v in &mut self.vcpus {
            let Some((addr, since)) = v.blocked_on else {
                continue;
            };
            if addr != page_addr {
                continue;
            }
            v.total += at.saturating_duration_since(since);
            v.blocked_on = None;
            if let Some(all) = self.all_blocked_since.take() {
                self.overall += at.saturating_duration_since(all);
            }
            self.blocked -= 1;
        }
    }

    /// The overall blocktime in milliseconds (`postcopy-blocktime`).
    pub fn overall_ms(&self) -> u32 {
        millis(self.overall)
    }

    /// Each vCPU's blocktime in milliseconds (`postcopy-vcpu-blocktime`).
    pub fn per_vcpu_ms(&self) -> Vec<u32> {
        self.vcpus.iter().map(|v| millis(v.total)).collect()
    }
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn each_vcpu_counts_its_own_waits_and_overall_only_when_all_wait() {
        let t0 = Instant::now();
        let mut b = Blocktime::new(2);
        b.fault(0, 0x1000, t0);
        b.fault(1, 0x2000, t0 + ms(10));
        // Both blocked from 10 to 30.
        b.placed(0x2000, t0 + ms(30));
        b.placed(0x1000, t0 + ms(50));
        assert_eq!(b.per_vcpu_ms(), [50, 20]);
        assert_eq!(b.overall_ms(), 20);
        // vCPU 1 alone: no overall time.
        b.fault(1, 0x3000, t0 + ms(60));
        b.placed(0x3000, t0 + ms(65));
        assert_eq!(b.per_vcpu_ms(), [50, 25]);
        assert_eq!(b.overall_ms(), 20);
    }

    #[test]
    fn two_vcpus_on_one_page_both_run_again_when_it_is_placed() {
        let t0 = Instant::now();
        let mut b = Blocktime::new(2);
        b.fault(0, 0x1000, t0);
        b.fault(1, 0x1000, t0 + ms(4));
        // A repeated fault message does not restart the wait.
        b.fault(0, 0x1000, t0 + ms(5));
        b.placed(0x1000, t0 + ms(10));
        assert_eq!(b.per_vcpu_ms(), [10, 6]);
        assert_eq!(b.overall_ms(), 6);
        b.placed(0x1000, t0 + ms(20));
        assert_eq!(b.per_vcpu_ms(), [10, 6]);
    }

    #[test]
    fn unknown_vcpus_and_other_pages_change_nothing() {
        let t0 = Instant::now();
        let mut b = Blocktime::new(1);
        b.fault(7, 0x1000, t0);
        b.placed(0x1000, t0 + ms(5));
        b.fault(0, 0x2000, t0);
        b.placed(0x3000, t0 + ms(5));
        assert_eq!(b.per_vcpu_ms(), [0]);
        b.placed(0x2000, t0 + ms(8));
        assert_eq!((b.per_vcpu_ms(), b.overall_ms()), (vec![8], 8));
        assert_eq!(Blocktime::new(0).per_vcpu_ms(), Vec::<u32>::new());
    }
}
