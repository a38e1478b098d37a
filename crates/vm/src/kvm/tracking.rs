//! KVM's three ways of reporting the pages a guest writes, and the parts of them that
//! `kvm-ioctls` does not wrap.
//!
//! - **log**: `KVM_MEM_LOG_DIRTY_PAGES` on the memory slot; `KVM_GET_DIRTY_LOG` returns
//!   the slot's bitmap and, in the same call, clears it and write-protects the pages.
//! - **log-clear** (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): `KVM_GET_DIRTY_LOG` only reads
//!   the bitmap; `KVM_CLEAR_DIRTY_LOG` then clears and write-protects exactly the pages
//!   that were fetched, so the kernel never walks the clean part of the slot twice.
//! - **ring** (`KVM_CAP_DIRTY_LOG_RING`, or `_ACQ_REL`): each vCPU pushes the pages it
//!   dirties into a ring shared with the VMM (mapped from the vCPU's fd at
//!   `KVM_DIRTY_LOG_PAGE_OFFSET`). The VMM collects entries and marks them harvested,
//!   then `KVM_RESET_DIRTY_RINGS` write-protects their pages again. A vCPU whose ring
//!   is nearly full exits with `KVM_EXIT_DIRTY_RING_FULL` and may not run until its ring
//!   has been harvested and reset. The ring must be enabled before any vCPU exists, and
//!   with it the VM has no dirty bitmap.
//!
//! Ring entry life cycle (`flags`): `0` (free) ─kernel pushes→ `DIRTY` ─VMM harvests→
//! `RESET` ─`KVM_RESET_DIRTY_RINGS`→ `0`.
//!
//! Every unsafe block of the `kvm` accelerator that is not a `kvm-ioctls` call is here.

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_gfn, kvm_enable_cap,
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};

use super::{ioctl, KvmError};

/// The ring size `ring` asks for: 64 KiB of entries per vCPU.
pub const DEFAULT_RING_ENTRIES: u32 = 4096;

/// Which dirty-page interface a KVM guest uses (`--dirty-tracking`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyTracking {
    /// The best the host offers: ring, else log-clear, else log.
    #[default]
    Auto,
    /// `KVM_GET_DIRTY_LOG`, which fetches and re-protects in one call.
    Log,
    /// `KVM_GET_DIRTY_LOG`, then `KVM_CLEAR_DIRTY_LOG` for the fetched pages.
    LogClear,
    /// Per-vCPU dirty rings of `entries` entries each.
    Ring { entries: u32 },
}

impl DirtyTracking {
    /// Parses `auto`, `log`, `log-clear`, `ring` or `ring=ENTRIES`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "log" => Some(Self::Log),
            "log-clear" => Some(Self::LogClear),
            "ring" => Some(Self::Ring {
                entries: DEFAULT_RING_ENTRIES,
            }),
            _ => {
                let entries = s.strip_prefix("ring=")?.parse().ok()?;
                Some(Self::Ring { entries })
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Log => "log",
            Self::LogClear => "log-clear",
            Self::Ring { .. } => "ring",
        }
    }

    /// The mode this VM will use: `Auto` becomes the best one offered; a mode the host
    /// lacks, or a ring size it refuses, is an error.
    pub(super) fn resolve(self, vm: &VmFd) -> Result<Self, KvmError> {
        let caps = HostCaps::probe(vm);
        match self {
            Self::Auto if caps.ring_max_bytes > 0 => {
                let max = caps.ring_max_bytes / ring_entry_bytes();
                Ok(Self::Ring {
                    entries: DEFAULT_RING_ENTRIES.min(max),
                })
            }
            Self::Auto if caps.manual_protect => Ok(Self::LogClear),
            Self::Auto | Self::Log => Ok(Self::Log),
            Self::LogClear if caps.manual_protect => Ok(Self::LogClear),
            Self::LogClear => Err(KvmError::Unsupported {
                mode: "log-clear",
                cap: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
            }),
            Self::Ring { .. } if caps.ring_max_bytes == 0 => Err(KvmError::Unsupported {
                mode: "ring",
                cap: "KVM_CAP_DIRTY_LOG_RING",
            }),
            Self::Ring { entries } => {
                let min = ring_min_entries();
                let max = caps.ring_max_bytes / ring_entry_bytes();
                if !entries.is_power_of_two() || entries < min || entries > max {
                    return Err(KvmError::RingSize { entries, min, max });
                }
                Ok(self)
            }
        }
    }

    /// Turns the mode on for `vm`; for `Ring`, before any vCPU is created.
    pub(super) fn enable(self, vm: &VmFd) -> Result<(), KvmError> {
        let cap = match self {
            Self::Auto | Self::Log => return Ok(()),
            // Not KVM_DIRTY_LOG_INITIALLY_SET: the engine's first pass sends every page
            // anyway, and with the bitmap initially full the first sync would report
            // all of RAM again.
            Self::LogClear => kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                args: [u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
                ..Default::default()
            },
            Self::Ring { entries } => kvm_enable_cap {
                cap: HostCaps::probe(vm).ring_cap,
                args: [u64::from(entries * ring_entry_bytes()), 0, 0, 0],
                ..Default::default()
            },
        };
        vm.enable_cap(&cap)
            .map_err(ioctl("enable its dirty tracking mode"))
    }
}

impl std::fmt::Display for DirtyTracking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ring { entries } => write!(f, "ring={entries}"),
            other => f.write_str(other.name()),
        }
    }
}

/// What the host's KVM offers for dirty tracking.
#[derive(Debug, Clone, Copy)]
struct HostCaps {
    manual_protect: bool,
    /// The ring capability to enable: the `_ACQ_REL` one where offered.
    ring_cap: u32,
    /// The largest ring in bytes; 0 without rings.
    ring_max_bytes: u32,
}

impl HostCaps {
    fn probe(vm: &VmFd) -> Self {
        let flags = vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
        let manual_protect = flags > 0 && flags as u32 & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0;
        let (ring_cap, ring_max_bytes) = [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
            .into_iter()
            .map(|cap| (cap, vm.check_extension_raw(cap.into()).max(0) as u32))
            .find(|&(_, max)| max > 0)
            .unwrap_or((KVM_CAP_DIRTY_LOG_RING, 0));
        Self {
            manual_protect,
            ring_cap,
            ring_max_bytes,
        }
    }
}

fn ring_entry_bytes() -> u32 {
    std::mem::size_of::<kvm_dirty_gfn>() as u32
}

/// KVM wants a ring of at least one host page.
pub(super) fn ring_min_entries() -> u32 {
    (vmigrate_engine::memory::host_page_size() as u32 / ring_entry_bytes()).max(1)
}

/// `KVM_DIRTY_GFN_F_DIRTY`: the kernel pushed this entry.
const GFN_DIRTY: u32 = 1 << 0;
/// `KVM_DIRTY_GFN_F_RESET`: the VMM harvested this entry.
const GFN_RESET: u32 = 1 << 1;

/// Encodes an ioctl request number as `<asm-generic/ioctl.h>` does on x86-64.
const fn kvm_ioc(dir: u32, nr: u32, size: usize) -> libc::Ioctl {
    const KVMIO: u32 = 0xae;
    ((dir << 30) | ((size as u32) << 16) | (KVMIO << 8) | nr) as libc::Ioctl
}
const IOC_NONE: u32 = 0;
const IOC_READ_WRITE: u32 = 3;
/// `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
const KVM_CLEAR_DIRTY_LOG: libc::Ioctl = kvm_ioc(
    IOC_READ_WRITE,
    0xc0,
    std::mem::size_of::<kvm_clear_dirty_log>(),
);
/// `_IO(KVMIO, 0xc7)`.
const KVM_RESET_DIRTY_RINGS: libc::Ioctl = kvm_ioc(IOC_NONE, 0xc7, 0);

/// `KVM_CLEAR_DIRTY_LOG`: clears and write-protects the pages of `slot` from
/// `first_page` whose bits are set in `bitmap` (one bit per page, `num_pages` bits).
/// `first_page` must be a multiple of 64, and `num_pages` too unless the range ends
/// at the end of the slot.
pub(super) fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &mut [u64],
) -> Result<(), kvm_ioctls::Error> {
    assert!(bitmap.len() * 64 >= num_pages as usize);
    let clear = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast(),
        },
    };
    // SAFETY: `vm` is a VM fd; the struct is the one this request number encodes and
    // lives across the call; its bitmap pointer covers `num_pages` bits (asserted above)
    // of a live buffer, which the kernel only reads.
    let ret = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG, &clear) };
    if ret < 0 {
        return Err(kvm_ioctls::Error::last());
    }
    Ok(())
}

/// `KVM_RESET_DIRTY_RINGS`: write-protects again the pages of every harvested ring
/// entry of `vm`, and frees the entries. Returns how many it reset.
pub(super) fn reset_dirty_rings(vm: &VmFd) -> Result<u32, kvm_ioctls::Error> {
    // SAFETY: `vm` is a VM fd and this request takes no argument.
    let ret = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS) };
    if ret < 0 {
        return Err(kvm_ioctls::Error::last());
    }
    Ok(ret as u32)
}

/// What one harvest of a ring found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct RingHarvest {
    /// Entries handed out.
    pub taken: u32,
    /// The ring had overflowed: the kernel wrote past the entries the VMM had freed,
    /// so some pushes were overwritten and their pages are unknown.
    pub overflowed: bool,
}

/// One vCPU's dirty ring, mapped into the VMM, and where the next harvest starts.
///
/// Between harvests (each followed by [`reset_dirty_rings`]) the kernel's reset index
/// equals `next`: entries from `next` on are either pushed (`DIRTY`) or free (`0`), in
/// that order. A kernel that keeps pushing after the soft limit without exiting (a
/// vendor module that emulates guest instructions in batches does) can overwrite
/// entries the VMM has not seen. That shows as a full lap of dirty entries, or, after
/// such a lap was reset, as free entries the kernel still counts as used (a "hole")
/// followed by newer dirty ones. [`DirtyRing::harvest`] reports both, and steps over a
/// hole so that the kernel's reset index catches up with its push index.
#[derive(Debug)]
pub(super) struct DirtyRing {
    gfns: NonNull<kvm_dirty_gfn>,
    entries: u32,
    /// The index (modulo `entries`) of the oldest entry not yet harvested.
    next: u32,
}

// SAFETY: the ring is a shared mapping that lives as long as this value; entries are
// accessed through atomics and volatile reads, and `&mut self` serialises harvests.
unsafe impl Send for DirtyRing {}
// SAFETY: `&self` only reads entry flags, atomically.
unsafe impl Sync for DirtyRing {}

impl DirtyRing {
    /// Maps `vcpu`'s ring of `entries` entries (the size the VM's ring was enabled
    /// with, a power of two).
    pub(super) fn map(vcpu: &VcpuFd, entries: u32) -> std::io::Result<Self> {
        assert!(entries.is_power_of_two());
        let len = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        let offset =
            u64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * vmigrate_engine::memory::host_page_size();
        // SAFETY: a new shared mapping of the vCPU fd's ring pages, at an address the
        // kernel picks, so no existing memory is touched. The mapping holds its own
        // reference to the file and stays valid until `Drop` unmaps it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let gfns = NonNull::new(ptr.cast()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(Self {
            gfns,
            entries,
            next: 0,
        })
    }

    pub(super) fn entries(&self) -> u32 {
        self.entries
    }

    fn entry(&self, index: u32) -> *mut kvm_dirty_gfn {
        // SAFETY: the index is reduced modulo `entries`, so the entry lies inside the
        // mapping.
        unsafe {
            self.gfns
                .as_ptr()
                .add((index & (self.entries - 1)) as usize)
        }
    }

    fn flags(&self, index: u32) -> &AtomicU32 {
        let gfn = self.entry(index);
        // SAFETY: `flags` is a naturally aligned u32 at the start of a 16-byte entry of
        // a page-aligned mapping that outlives `&self`; the kernel and this type access
        // it only atomically, so viewing it as an AtomicU32 is sound.
        unsafe { AtomicU32::from_ptr(&raw mut (*gfn).flags) }
    }

    fn is_dirty(&self, index: u32) -> bool {
        self.flags(index).load(Ordering::Acquire) & GFN_DIRTY != 0
    }

    /// Whether at least `n` (≥ 1) pushed entries wait: the kernel pushes in order, so
    /// the `n`th one being there is enough.
    pub(super) fn holds_at_least(&self, n: u32) -> bool {
        self.is_dirty(self.next.wrapping_add(n.clamp(1, self.entries) - 1))
    }

    /// Marks the entry at `next` harvested without reading it and moves past it.
    fn release_next(&mut self) {
        self.flags(self.next).store(GFN_RESET, Ordering::Release);
        self.next = self.next.wrapping_add(1);
    }

    /// Hands each pushed entry since the last harvest to `dirty` as (slot, page offset
    /// in the slot), oldest first, and marks it harvested; steps over a hole. The
    /// pages stay writable without a new entry until [`reset_dirty_rings`].
    pub(super) fn harvest(&mut self, mut dirty: impl FnMut(u32, u64)) -> RingHarvest {
        let mut h = RingHarvest::default();
        // A hole is only looked for once per harvest: a second one would need another
        // reset in between.
        let mut hole_checked = false;
        loop {
            while h.taken < self.entries && self.is_dirty(self.next) {
                let gfn = self.entry(self.next);
                // SAFETY: the acquire load saw DIRTY, which the kernel sets after
                // writing the entry; the fields stay put until the entry is reset,
                // which needs the RESET flag that `release_next` stores after this.
                let (slot, offset) = unsafe {
                    (
                        std::ptr::read_volatile(&raw const (*gfn).slot),
                        std::ptr::read_volatile(&raw const (*gfn).offset),
                    )
                };
                dirty(slot, offset);
                self.release_next();
                h.taken += 1;
            }
            if h.taken == self.entries {
                // Every entry was pushed and none free: the kernel may have wrapped.
                h.overflowed = true;
                return h;
            }
            if hole_checked {
                return h;
            }
            hole_checked = true;
            let Some(hole) = self.hole_len(self.entries - h.taken) else {
                return h;
            };
            h.overflowed = true;
            for _ in 0..hole {
                self.release_next();
            }
        }
    }

    /// The free entries at `next` that the kernel still counts as used: a run of
    /// free entries followed, within `span` entries, by a pushed one. Entries beyond
    /// `span` are the ones this harvest already took.
    fn hole_len(&self, span: u32) -> Option<u32> {
        let after = (1..span).find(|&j| self.is_dirty(self.next.wrapping_add(j)))?;
        // The kernel pushes in order: if `next` is still free now that a later entry
        // is seen pushed, the kernel's push index had passed it.
        (!self.is_dirty(self.next)).then_some(after)
    }

    /// For a vCPU that KVM holds as full while its ring shows nothing to harvest (the
    /// kernel counts at least one entry more than the ring holds): releases one free
    /// entry so the kernel's reset index moves one step towards its push index.
    pub(super) fn release_one_counted(&mut self) {
        self.release_next();
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        let len = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmaps exactly the mapping `map` made; no reference into it outlives
        // `self`.
        unsafe {
            libc::munmap(self.gfns.as_ptr().cast(), len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_modes() {
        assert_eq!(DirtyTracking::parse("auto"), Some(DirtyTracking::Auto));
        assert_eq!(DirtyTracking::parse("log"), Some(DirtyTracking::Log));
        assert_eq!(
            DirtyTracking::parse("log-clear"),
            Some(DirtyTracking::LogClear)
        );
        assert_eq!(
            DirtyTracking::parse("ring"),
            Some(DirtyTracking::Ring {
                entries: DEFAULT_RING_ENTRIES
            })
        );
        assert_eq!(
            DirtyTracking::parse("ring=512"),
            Some(DirtyTracking::Ring { entries: 512 })
        );
        for bad in ["", "ring=", "ring=x", "rings", "LOG"] {
            assert_eq!(DirtyTracking::parse(bad), None, "{bad:?}");
        }
        assert_eq!(DirtyTracking::Ring { entries: 512 }.to_string(), "ring=512");
        assert_eq!(DirtyTracking::LogClear.to_string(), "log-clear");
    }

    /// The kernel's side of a ring, as `virt/kvm/dirty_ring.c` behaves: pushes at the
    /// push index whether or not the entry is free (it only warns), and a reset that
    /// frees harvested entries from the reset index on.
    struct ModelKernel {
        ring: DirtyRing,
        push_index: u32,
        reset_index: u32,
    }

    impl ModelKernel {
        fn new(entries: u32) -> Self {
            let len = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
            // SAFETY: a new private anonymous mapping; `DirtyRing`'s Drop unmaps it.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED);
            Self {
                ring: DirtyRing {
                    gfns: NonNull::new(ptr.cast()).unwrap(),
                    entries,
                    next: 0,
                },
                push_index: 0,
                reset_index: 0,
            }
        }

        fn push(&mut self, page: u64) {
            let gfn = self.ring.entry(self.push_index);
            // SAFETY: the entry lies in the mapping; the flag store below publishes it.
            unsafe {
                (*gfn).slot = 0;
                (*gfn).offset = page;
            }
            self.ring
                .flags(self.push_index)
                .store(GFN_DIRTY, Ordering::Release);
            self.push_index = self.push_index.wrapping_add(1);
        }

        fn reset(&mut self) {
            while self.ring.flags(self.reset_index).load(Ordering::Acquire) & GFN_RESET != 0 {
                self.ring
                    .flags(self.reset_index)
                    .store(0, Ordering::Release);
                self.reset_index = self.reset_index.wrapping_add(1);
            }
        }

        fn used(&self) -> u32 {
            self.push_index.wrapping_sub(self.reset_index)
        }

        fn harvest(&mut self) -> (Vec<u64>, RingHarvest) {
            let mut pages = Vec::new();
            let h = self.ring.harvest(|_, p| pages.push(p));
            self.reset();
            (pages, h)
        }
    }

    #[test]
    fn ring_harvest_takes_pushes_in_order() {
        let mut k = ModelKernel::new(16);
        for p in [5, 9, 5, 200] {
            k.push(p);
        }
        let (pages, h) = k.harvest();
        assert_eq!(pages, [5, 9, 5, 200]);
        assert_eq!(
            h,
            RingHarvest {
                taken: 4,
                overflowed: false
            }
        );
        assert_eq!((k.used(), k.ring.next), (0, 4));
        assert_eq!(k.harvest().1, RingHarvest::default());
        // Around the end of the ring.
        for p in 0..14 {
            k.push(p);
        }
        assert!(k.ring.holds_at_least(14) && !k.ring.holds_at_least(15));
        let (pages, h) = k.harvest();
        assert_eq!(pages, (0..14).collect::<Vec<_>>());
        assert!(!h.overflowed);
        assert_eq!(k.used(), 0);
    }

    /// A kernel that pushed past the end: the full lap is reported as an overflow, the
    /// freed entries it still counts are stepped over once newer pushes show where they
    /// end, and from then on the ring is in step again.
    #[test]
    fn ring_overflow_is_reported_and_the_hole_stepped_over() {
        let mut k = ModelKernel::new(16);
        for p in 0..21 {
            k.push(p);
        }
        let (pages, h) = k.harvest();
        assert_eq!(pages.len(), 16);
        assert!(h.overflowed);
        assert_eq!(k.used(), 5, "the kernel counts the five it wrote over");
        assert_eq!(k.harvest().1, RingHarvest::default(), "nothing shows yet");
        k.push(100);
        k.push(101);
        let (pages, h) = k.harvest();
        assert_eq!(pages, [100, 101]);
        assert!(h.overflowed);
        assert_eq!(k.used(), 0);
        assert_eq!(k.ring.next, k.reset_index);
        k.push(7);
        let (pages, h) = k.harvest();
        assert_eq!((pages, h.overflowed), (vec![7], false));
    }

    /// A hole deeper than the ring: nothing shows, and releasing one counted entry at a
    /// time (what a vCPU held full does) brings the kernel back into step.
    #[test]
    fn ring_hole_deeper_than_the_ring_is_released_step_by_step() {
        let mut k = ModelKernel::new(16);
        for p in 0..40 {
            k.push(p);
        }
        assert!(k.harvest().1.overflowed);
        assert_eq!(k.used(), 24);
        while k.used() >= 16 - 4 {
            assert_eq!(k.harvest().1, RingHarvest::default());
            k.ring.release_one_counted();
            k.reset();
        }
        k.push(300);
        let (pages, h) = k.harvest();
        assert_eq!(pages, [300]);
        assert!(h.overflowed);
        assert_eq!((k.used(), k.ring.next), (0, k.reset_index));
    }

    /// The encoder against request numbers from `<linux/kvm.h>`: one that `kvm-ioctls`
    /// also defines (`KVM_GET_DIRTY_LOG`) and the two defined here.
    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        let get_dirty_log = kvm_ioc(1, 0x42, std::mem::size_of::<kvm_bindings::kvm_dirty_log>());
        assert_eq!(get_dirty_log, 0x4010_ae42);
        assert_eq!(KVM_CLEAR_DIRTY_LOG, 0xc018_aec0);
        assert_eq!(KVM_RESET_DIRTY_RINGS, 0xaec7);
        assert_eq!(std::mem::size_of::<kvm_dirty_gfn>(), 16);
    }
}
