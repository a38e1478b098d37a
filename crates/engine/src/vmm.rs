//! The seam between the engine and a VMM: guest RAM, dirty tracking, VM control and
//! device state. The engine knows nothing about KVM; a VMM implements these.

use std::sync::Arc;

use vmigrate_stream::{DecodeError, Source};

use crate::memory::RamBlock;
use crate::options::MigMode;
use crate::status::RunState;

/// A page bitmap several threads set and clear at once: bit `i % 64` of word `i / 64`
/// for page `i`.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Vec<std::sync::atomic::AtomicU64>,
}

impl AtomicBitmap {
    pub fn new(pages: usize) -> Self {
        Self {
            words: (0..pages.div_ceil(64))
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
        }
    }

    /// Sets or clears the bit of `page`; returns whether it was set before.
    pub fn put(&self, page: usize, on: bool) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let bit = 1u64 << (page % 64);
        let old = if on {
            self.words[page / 64].fetch_or(bit, Relaxed)
        } else {
            self.words[page / 64].fetch_and(!bit, Relaxed)
        };
        old & bit != 0
    }

    /// Whether the bit of `page` is set.
    pub fn get(&self, page: usize) -> bool {
        let bit = 1u64 << (page % 64);
        self.words[page / 64].load(std::sync::atomic::Ordering::Acquire) & bit != 0
    }

    pub fn any(&self) -> bool {
        self.words
            .iter()
            .any(|w| w.load(std::sync::atomic::Ordering::Relaxed) != 0)
    }

    /// The words as 64-bit little-endian bytes (the mapped-ram file encoding).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        self.words
            .iter()
            .flat_map(|w| w.load(std::sync::atomic::Ordering::Relaxed).to_le_bytes())
            .collect()
    }
}

/// Dirty pages of one RAM block since the last sync, one bit per page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: usize,
}

impl DirtyBitmap {
    pub fn new(pages: usize) -> Self {
        Self {
            words: vec![0; pages.div_ceil(64)],
            pages,
        }
    }

    pub fn all_set(pages: usize) -> Self {
        let mut b = Self::new(pages);
        b.set_range(0, pages);
        b
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    pub fn set(&mut self, page: usize) {
        self.words[page / 64] |= 1 << (page % 64);
    }

    pub fn set_range(&mut self, start: usize, count: usize) {
        for p in start..(start + count).min(self.pages) {
            self.set(p);
        }
    }

    pub fn test_and_clear(&mut self, page: usize) -> bool {
        let bit = 1u64 << (page % 64);
        let w = &mut self.words[page / 64];
        let was = *w & bit != 0;
        *w &= !bit;
        was
    }

    /// ORs another bitmap in (the VMM's own writes, or pages put back after a failed
    /// send).
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// How many bits in a row are set from `from` on, counting at most `max`.
    pub fn run_len(&self, from: usize, max: usize) -> usize {
        let end = from.saturating_add(max).min(self.pages);
        let mut p = from;
        while p < end {
            let (wi, bit) = (p / 64, p % 64);
            let ones = (!(self.words[wi] >> bit)).trailing_zeros() as usize;
            let ones = ones.min(64 - bit);
            p += ones;
            if ones < 64 - bit {
                break;
            }
        }
        p.min(end) - from.min(end)
    }

    /// Every set bit, in ascending order.
    pub fn iter_set(&self) -> impl Iterator<Item = usize> + '_ {
        std::iter::successors(self.next_set(0), |&p| self.next_set(p + 1))
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: usize) -> Option<usize> {
        if from >= self.pages {
            return None;
        }
        let mut wi = from / 64;
        let mut w = self.words[wi] & (!0u64 << (from % 64));
        loop {
            if w != 0 {
                let p = wi * 64 + w.trailing_zeros() as usize;
                return (p < self.pages).then_some(p);
            }
            wi += 1;
            if wi >= self.words.len() {
                return None;
            }
            w = self.words[wi];
        }
    }
}

/// Errors a VMM reports through the seam.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("device '{0}' does not support migration")]
    NotMigratable(String),
    #[error("dirty tracking failed: {0}")]
    DirtyTracking(String),
    #[error("{0}")]
    Other(String),
}

/// Dirty-page tracking for guest RAM. Bits handed out by [`DirtyTracker::sync`] are
/// cleared in the tracker; the engine puts them back with [`DirtyTracker::requeue`] if it
/// could not send them.
pub trait DirtyTracker: Send + Sync {
    /// Starts tracking; every page written from now on is reported by the next sync.
    fn start(&self) -> Result<(), VmmError>;
    /// ORs the pages dirtied since the last sync of `block` into `out`, and clears them.
    fn sync(&self, block: usize, out: &mut DirtyBitmap) -> Result<(), VmmError>;
    /// Puts pages back that were fetched but not sent.
    fn requeue(&self, block: usize, pages: &DirtyBitmap);
    fn stop(&self);
    /// Whether `page` of `block` was written since the last sync, so that the next sync
    /// reports it. A pass leaves such a page for later: what it would send now is stale
    /// already and goes out again after that sync. Trackers that cannot tell without a
    /// sync answer `false` (every page is sent).
    fn written_since_sync(&self, block: usize, page: usize) -> bool {
        let _ = (block, page);
        false
    }
}

/// Run control of the VM.
pub trait VmControl: Send + Sync {
    fn run_state(&self) -> RunState;
    /// Stops the vCPUs (if running) and enters `state`. Emits `STOP` when the VM was
    /// running.
    fn vm_stop(&self, state: RunState);
    /// Starts the vCPUs. Emits `RESUME`.
    fn vm_start(&self);
    /// Changes the run state without starting or stopping vCPUs (both not running).
    fn set_run_state(&self, state: RunState);
    /// Throttles the vCPUs to run only `100 - percentage` % of the time (auto-converge);
    /// 0 removes the throttle. Machines without vCPUs cannot be throttled.
    fn set_cpu_throttle(&self, percentage: u8) -> Result<(), VmmError> {
        if percentage == 0 {
            return Ok(());
        }
        Err(VmmError::Other(
            "this machine has no vCPUs to throttle".into(),
        ))
    }
}

/// Per-vCPU dirty-page counting and throttling, what dirty-limit and `calc-dirty-rate`
/// in `dirty-ring` mode need from a VMM (on QEMU: KVM with a dirty ring). A VMM that
/// cannot count per vCPU does not offer it ([`Vmm::vcpu_dirty_control`] is `None`), and
/// those commands fail as QEMU's do without a ring.
pub trait VcpuDirtyControl: Send + Sync {
    /// How many vCPUs the machine has.
    fn vcpu_count(&self) -> usize;
    /// Whether the counts come from KVM dirty rings: such a VM has no dirty bitmap to
    /// measure with, and `calc-dirty-rate` refuses `dirty-bitmap` as QEMU does.
    fn is_dirty_ring(&self) -> bool;
    /// Starts counting: from now on [`VcpuDirtyControl::dirtied_pages`] grows as each
    /// vCPU dirties pages (a KVM VMM turns dirty logging on for its rings). Calls nest:
    /// each is ended by one [`VcpuDirtyControl::stop_counting`].
    fn start_counting(&self) -> Result<(), VmmError>;
    /// Stops counting (a VMM keeps logging on while a migration tracks dirty pages).
    fn stop_counting(&self);
    /// Pages each vCPU dirtied since counting started, by vCPU index; monotonic.
    fn dirtied_pages(&self) -> Result<Vec<u64>, VmmError>;
    /// Makes vCPU `index` sleep `sleep_us_per_mib` µs for every MiB it dirties (0: runs
    /// freely), as QEMU sleeps a vCPU each time its dirty ring fills. The VMM takes the
    /// sleeps as the pages are dirtied, a millisecond or more at a time.
    fn set_vcpu_sleep(&self, index: usize, sleep_us_per_mib: u32) -> Result<(), VmmError>;
}

/// One device's migratable state, a vmstate section. The defaults fail: a device that
/// did not implement migration cannot silently migrate as empty.
pub trait DeviceState: Send + Sync {
    fn idstr(&self) -> &str;
    fn instance_id(&self) -> u32 {
        0
    }
    fn version(&self) -> u32;
    fn minimum_version(&self) -> u32 {
        self.version()
    }
    /// The body of its FULL section.
    fn save(&self) -> Result<Vec<u8>, VmmError> {
        Err(VmmError::NotMigratable(self.idstr().to_string()))
    }
    /// Loads a body of `version` from the stream (the footer is read by the engine).
    fn load(&self, src: &mut dyn Source, version: u32) -> Result<(), DeviceLoadError> {
        let _ = (src, version);
        Err(DeviceLoadError::Vmm(VmmError::NotMigratable(
            self.idstr().to_string(),
        )))
    }
    /// The vmdesc description of its body.
    fn describe(&self) -> serde_json::Value;
}

/// A device body that failed to load.
#[derive(Debug, thiserror::Error)]
pub enum DeviceLoadError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
}

/// Everything the engine needs from a VMM.
pub trait Vmm: Send + Sync {
    /// The machine type name written into the configuration record (`none`, ...).
    fn machine_name(&self) -> &str;
    fn ram_blocks(&self) -> &[Arc<RamBlock>];
    fn dirty_tracker(&self) -> &dyn DirtyTracker;
    fn control(&self) -> &dyn VmControl;
    /// Non-iterative device sections, in registration order.
    fn devices(&self) -> Vec<Arc<dyn DeviceState>>;
    /// The VM's UUID, if one was given.
    fn uuid(&self) -> Option<[u8; 16]>;
    /// Reasons outgoing migration in `mode` is blocked, oldest first. `query-migrate`
    /// lists them in this order; `migrate` refuses with the most recent one, as QEMU
    /// does.
    fn migration_blockers(&self, mode: MigMode) -> Vec<String> {
        let _ = mode;
        Vec::new()
    }
    /// The host thread id of each vCPU's thread, by vCPU index (0 for a thread not
    /// started yet): postcopy-blocktime tells a vCPU's fault by it, and reports one
    /// figure per vCPU. The default is a VM without vCPUs.
    fn vcpu_thread_ids(&self) -> Vec<u32> {
        Vec::new()
    }
    /// Per-vCPU dirty counting and throttling, if this VMM can do it (the default is a
    /// VMM that cannot: dirty-limit and `dirty-ring` measurements are refused).
    fn vcpu_dirty_control(&self) -> Option<&dyn VcpuDirtyControl> {
        None
    }

    /// Whether this VM was started as a cpr-transfer destination: its guest RAM came
    /// with the CPR state, so an incoming stream carries no page of any block (QEMU's
    /// incoming mode `cpr-transfer`).
    fn ram_handed_over(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_scan() {
        let mut b = DirtyBitmap::new(130);
        b.set(3);
        b.set(64);
        b.set(129);
        assert_eq!(b.next_set(0), Some(3));
        assert_eq!(b.next_set(4), Some(64));
        assert_eq!(b.next_set(65), Some(129));
        assert_eq!(b.next_set(130), None);
        assert_eq!(b.iter_set().collect::<Vec<_>>(), [3, 64, 129]);
        assert!(b.test_and_clear(64));
        assert_eq!(b.count(), 2);
        let all = DirtyBitmap::all_set(130);
        assert_eq!(all.count(), 130);
        assert_eq!(all.next_set(129), Some(129));
    }

    #[test]
    fn runs_of_set_bits() {
        let mut b = DirtyBitmap::new(200);
        b.set_range(10, 120);
        b.set(190);
        assert_eq!(b.run_len(10, 1000), 120);
        assert_eq!(b.run_len(10, 50), 50);
        assert_eq!(b.run_len(63, 1000), 67);
        assert_eq!(b.run_len(64, 64), 64);
        assert_eq!(b.run_len(129, 10), 1);
        assert_eq!(b.run_len(130, 10), 0);
        assert_eq!(b.run_len(9, 10), 0);
        assert_eq!(b.run_len(190, 100), 1);
        assert_eq!(b.run_len(199, 100), 0);
        assert_eq!(b.run_len(250, 100), 0);
        let all = DirtyBitmap::all_set(200);
        assert_eq!(all.run_len(0, usize::MAX), 200);
        assert_eq!(all.run_len(130, usize::MAX), 70);
        // Every start and length against a bit-by-bit count.
        for from in 0..200 {
            for max in [0, 1, 7, 64, 65, 300] {
                let slow = (from..200)
                    .take(max)
                    .take_while(|&p| b.next_set(p) == Some(p))
                    .count();
                assert_eq!(b.run_len(from, max), slow, "from {from} max {max}");
            }
        }
    }
}
