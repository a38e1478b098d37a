//! Pages a load has written, and zero pages placed without touching pages that are
//! zero already: shared by the main loader and the multifd channel threads.

use std::sync::Arc;

use crate::memory::RamBlock;
use crate::vmm::AtomicBitmap;

/// Pages a load has written, per block, shared by the main loader and the multifd
/// channel threads.
#[derive(Debug)]
pub struct ReceivedPages {
    blocks: Vec<AtomicBitmap>,
}

impl ReceivedPages {
    pub fn new(blocks: &[Arc<RamBlock>]) -> Self {
        Self {
            blocks: blocks
                .iter()
                .map(|b| AtomicBitmap::new(b.pages()))
                .collect(),
        }
    }

    pub fn set(&self, block: usize, page: usize) {
        self.blocks[block].put(page, true);
    }

    pub fn get(&self, block: usize, page: usize) -> bool {
        self.blocks[block].get(page)
    }

    /// Sets the bit and says whether it was set already.
    pub fn put_once(&self, block: usize, page: usize) -> bool {
        self.blocks[block].put(page, true)
    }

    /// Clears the bit and says whether it was set.
    pub fn take(&self, block: usize, page: usize) -> bool {
        self.blocks[block].put(page, false)
    }

    pub(crate) fn any(&self, block: usize) -> bool {
        self.blocks[block].any()
    }
}

/// Handles a zero page: nothing to do for a page of a pristine block that no one wrote
/// during this load; otherwise the page is cleared (only if it is not zero already).
pub fn load_zero_page(
    block: &RamBlock,
    pristine: bool,
    received: &ReceivedPages,
    bi: usize,
    page: usize,
) {
    let was_written = received.take(bi, page);
    if pristine && !was_written {
        return;
    }
    let ps = block.page_size() as usize;
    let offset = page as u64 * ps as u64;
    if !block.is_zero(offset, ps) {
        // A loader's write: the load tracks its own writes, so this must not end the
        // block's pristine state for the rest of the load.
        block.load_zero(offset, ps);
    }
}
