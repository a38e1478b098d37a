//! Guest memory from rust-vmm's `vm-memory` (cargo feature `vm-memory`): the regions of a
//! `GuestMemoryMmap` as the engine's RAM blocks, and a [`DirtyTracker`] over the
//! `AtomicBitmap` that `vm-memory` keeps of the writes made through its API.
//!
//! ```text
//! GuestMemoryMmap<AtomicBitmap>
//!   region 0 (gpa, len, mmap) ──► RamBlock "ram0" over the same mapping (no copy)
//!   region 1                  ──► RamBlock "ram1"
//!   each region's AtomicBitmap ─► BitmapDirtyTracker::sync (read and cleared)
//! ```
//!
//! The blocks hold the regions' mappings (`Arc<MmapRegion>`) alive and never unmap them.
//! Only writes made through `vm-memory` (`write_obj`, `write_slice`, ...) mark its
//! bitmap: a VMM whose vCPUs write guest RAM directly needs another tracker for those
//! (KVM's dirty log, userfaultfd write-protect), ORed into the same sync.

use std::sync::Arc;

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

use crate::memory::{MemoryError, RamBlock};
use crate::vmm::{DirtyBitmap, DirtyTracker, VmmError};

/// The regions of `mem`, in guest-address order, as RAM blocks named by `name(index)`.
/// The blocks share the regions' memory.
pub fn ram_blocks<B>(
    mem: &GuestMemoryMmap<B>,
    name: impl Fn(usize) -> String,
) -> Result<Vec<Arc<RamBlock>>, MemoryError>
where
    B: Bitmap + Send + Sync + 'static,
{
    let mut blocks = Vec::new();
    for (i, region) in mem.iter().enumerate() {
        let mapping: Arc<MmapRegion<B>> = region.get_mmap();
        let host = mapping.as_ptr();
        let len = region.len();
        let gpa = region.start_addr().0;
        // SAFETY: `host` is the start of the region's read-write mapping of `len`
        // bytes, which `mapping` (kept by the block) keeps mapped; vm-memory never
        // remaps a region it handed out.
        let block =
            unsafe { RamBlock::from_external(&name(i), host, len, gpa, Box::new(mapping)) }?;
        blocks.push(Arc::new(block));
    }
    Ok(blocks)
}

/// Dirty tracking from the `AtomicBitmap`s of a `GuestMemoryMmap<AtomicBitmap>`, one per
/// region (block), in the order of [`ram_blocks`].
#[derive(Debug)]
pub struct BitmapDirtyTracker {
    regions: Vec<Arc<MmapRegion<AtomicBitmap>>>,
}

impl BitmapDirtyTracker {
    pub fn new(mem: &GuestMemoryMmap<AtomicBitmap>) -> Self {
        Self {
            regions: mem.iter().map(|r| r.get_mmap()).collect(),
        }
    }

    fn bitmap(&self, block: usize) -> Result<&AtomicBitmap, VmmError> {
        self.regions
            .get(block)
            .map(|r| r.bitmap())
            .ok_or_else(|| VmmError::DirtyTracking(format!("no guest memory region {block}")))
    }
}

impl DirtyTracker for BitmapDirtyTracker {
    fn start(&self) -> Result<(), VmmError> {
        for r in &self.regions {
            r.bitmap().reset();
        }
        Ok(())
    }

    fn sync(&self, block: usize, out: &mut DirtyBitmap) -> Result<(), VmmError> {
        let words = self.bitmap(block)?.get_and_reset();
        let pages = out.pages();
        for (wi, word) in words.into_iter().enumerate() {
            let mut w = word;
            while w != 0 {
                let page = wi * 64 + w.trailing_zeros() as usize;
                w &= w - 1;
                if page < pages {
                    out.set(page);
                }
            }
        }
        Ok(())
    }

    fn requeue(&self, block: usize, pages: &DirtyBitmap) {
        if let Ok(bitmap) = self.bitmap(block) {
            for page in pages.iter_set() {
                bitmap.set_bit(page);
            }
        }
    }

    fn stop(&self) {}
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    #[test]
    fn regions_become_blocks_and_writes_are_tracked() {
        let ps = crate::memory::host_page_size() as usize;
        let mem: GuestMemoryMmap<AtomicBitmap> = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 16 * ps),
            (GuestAddress(1 << 20), 4 * ps),
        ])
        .unwrap();
        let blocks = ram_blocks(&mem, |i| format!("ram{i}")).unwrap();
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[1].idstr(), "ram1");
        assert_eq!(blocks[1].gpa(), 1 << 20);
        assert_eq!(blocks[1].len(), 4 * ps as u64);

        let tracker = BitmapDirtyTracker::new(&mem);
        tracker.start().unwrap();
        mem.write_obj(0xABCD_u64, GuestAddress(3 * ps as u64 + 8))
            .unwrap();
        mem.write_obj(7u8, GuestAddress((1 << 20) + ps as u64))
            .unwrap();
        // The block sees the write: same memory.
        let mut word = [0u8; 8];
        blocks[0].read(3 * ps as u64 + 8, &mut word);
        assert_eq!(u64::from_ne_bytes(word), 0xABCD);
        // A write through the block reaches vm-memory's view.
        blocks[1].write(2 * ps as u64, &[9]);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress((1 << 20) + 2 * ps as u64))
                .unwrap(),
            9
        );

        let mut d0 = DirtyBitmap::new(16);
        tracker.sync(0, &mut d0).unwrap();
        assert_eq!(d0.iter_set().collect::<Vec<_>>(), vec![3]);
        let mut d1 = DirtyBitmap::new(4);
        tracker.sync(1, &mut d1).unwrap();
        assert_eq!(d1.iter_set().collect::<Vec<_>>(), vec![1]);
        // Cleared by the sync; requeued pages come back.
        let mut again = DirtyBitmap::new(16);
        tracker.sync(0, &mut again).unwrap();
        assert_eq!(again.count(), 0);
        tracker.requeue(0, &d0);
        tracker.sync(0, &mut again).unwrap();
        assert_eq!(again.iter_set().collect::<Vec<_>>(), vec![3]);
        assert!(tracker.sync(2, &mut again).is_err());
        // The blocks keep the mappings alive after the guest memory object is gone.
        drop(mem);
        blocks[0].read(3 * ps as u64 + 8, &mut word);
        assert_eq!(u64::from_ne_bytes(word), 0xABCD);
    }
}
