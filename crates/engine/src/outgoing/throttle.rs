//! auto-converge: throttles the guest's vCPUs when it dirties memory faster than the
//! migration sends it, the way QEMU decides it at each dirty-bitmap sync.

use crate::options::Parameters;

/// What one sync period looked like.
#[derive(Debug, Clone, Copy)]
pub struct SyncPeriod {
    /// Bytes the guest dirtied since the previous sync.
    pub dirtied: u64,
    /// Bytes the migration sent since the previous sync.
    pub sent: u64,
}

/// The throttle decision state.
#[derive(Debug, Default)]
pub struct AutoConverge {
    high_periods: u32,
    percentage: u8,
}

impl AutoConverge {
    pub fn percentage(&self) -> u8 {
        self.percentage
    }

    /// Feeds one sync period; returns the new throttle percentage when it changes.
    /// Dirtying above `throttle-trigger-threshold` % of what was sent, in two periods,
    /// throttles: first to `cpu-throttle-initial`, then up by `cpu-throttle-increment`
    /// (or less with `cpu-throttle-tailslow`), never above `max-cpu-throttle`.
    pub fn on_sync(&mut self, params: &Parameters, period: SyncPeriod) -> Option<u8> {
        let threshold = period.sent as f64 * f64::from(params.throttle_trigger_threshold()) / 100.0;
        if (period.dirtied as f64) <= threshold {
            return None;
        }
        self.high_periods += 1;
        if self.high_periods < 2 {
            return None;
        }
        self.high_periods = 0;
        let initial = params.cpu_throttle_initial();
        let increment = f64::from(params.cpu_throttle_increment());
        let max = params.max_cpu_throttle();
        let next = if self.percentage == 0 {
            initial
        } else if !params.cpu_throttle_tailslow() {
            (f64::from(self.percentage) + increment).min(f64::from(max)) as u8
        } else {
            // Only as much more as the ratio of what could be sent to what was dirtied
            // asks for.
            let cpu_now = 100.0 - f64::from(self.percentage);
            let cpu_ideal = cpu_now * (threshold / period.dirtied as f64);
            let inc = (cpu_now - cpu_ideal).min(increment).max(0.0);
            (f64::from(self.percentage) + inc).min(f64::from(max)) as u8
        };
        let next = next.min(max);
        if next == self.percentage {
            return None;
        }
        self.percentage = next;
        Some(next)
    }
}

/// dirty-limit's trigger: the same rule as auto-converge's (dirtying above
/// `throttle-trigger-threshold` % of what was sent, in two periods), after which every
/// vCPU is limited to `vcpu-dirty-limit`.
#[derive(Debug, Default)]
pub struct DirtyLimitTrigger {
    high_periods: u32,
}

impl DirtyLimitTrigger {
    /// Feeds one sync period; true when the vCPUs should be limited now.
    pub fn on_sync(&mut self, params: &Parameters, period: SyncPeriod) -> bool {
        let threshold = period.sent as f64 * f64::from(params.throttle_trigger_threshold()) / 100.0;
        if (period.dirtied as f64) <= threshold {
            return false;
        }
        self.high_periods += 1;
        if self.high_periods < 2 {
            return false;
        }
        self.high_periods = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(v: serde_json::Value) -> Parameters {
        Parameters::default()
            .merged(v.as_object().unwrap())
            .unwrap()
    }

    #[test]
    fn throttles_after_two_high_periods_and_rises_by_the_increment() {
        let p = Parameters::default();
        let mut ac = AutoConverge::default();
        let high = SyncPeriod {
            dirtied: 100,
            sent: 100,
        };
        assert_eq!(ac.on_sync(&p, high), None);
        assert_eq!(ac.on_sync(&p, high), Some(20));
        assert_eq!(ac.on_sync(&p, high), None);
        assert_eq!(ac.on_sync(&p, high), Some(30));
        let low = SyncPeriod {
            dirtied: 10,
            sent: 100,
        };
        assert_eq!(ac.on_sync(&p, low), None);
        assert_eq!(ac.percentage(), 30);
    }

    #[test]
    fn dirty_limit_triggers_as_auto_converge_does() {
        let p = Parameters::default();
        let mut t = DirtyLimitTrigger::default();
        let high = SyncPeriod {
            dirtied: 100,
            sent: 100,
        };
        let low = SyncPeriod {
            dirtied: 10,
            sent: 100,
        };
        assert!(!t.on_sync(&p, high));
        assert!(!t.on_sync(&p, low));
        assert!(t.on_sync(&p, high));
        assert!(!t.on_sync(&p, high));
    }

    #[test]
    fn respects_the_maximum_and_tailslow() {
        let p = params(
            json!({"cpu-throttle-initial": 50, "cpu-throttle-increment": 40, "max-cpu-throttle": 80}),
        );
        let mut ac = AutoConverge::default();
        let high = SyncPeriod {
            dirtied: 1000,
            sent: 100,
        };
        ac.on_sync(&p, high);
        assert_eq!(ac.on_sync(&p, high), Some(50));
        ac.on_sync(&p, high);
        assert_eq!(ac.on_sync(&p, high), Some(80));
        let p = params(json!({"cpu-throttle-tailslow": true}));
        let mut ac = AutoConverge::default();
        let slight = SyncPeriod {
            dirtied: 60,
            sent: 100,
        };
        ac.on_sync(&p, slight);
        assert_eq!(ac.on_sync(&p, slight), Some(20));
        ac.on_sync(&p, slight);
        // cpu_now 80, ideal 80 * 50/60 = 66.7: +13.3 capped at the increment of 10.
        assert_eq!(ac.on_sync(&p, slight), Some(30));
    }
}
