//! Pages a load has written, zero pages placed without touching pages that are zero
//! already, and pages faulted in by the run before data lands in them: shared by the
//! main loader and the multifd channel threads.
//!
//! Most of a destination's time goes to the kernel making fresh pages (a fault, a
//! cleared page, a page-table entry, one page at a time). A run of pages about to be
//! filled is faulted in with one `MADV_POPULATE_WRITE` first; only pages that get data
//! are, so a destination's memory still holds just the non-zero part of the guest.

use std::sync::Arc;

use vmigrate_stream::ram::{FLAG_CONTINUE, FLAG_PAGE};

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

/// Faults in, one `MADV_POPULATE_WRITE` per run of contiguous pages, the pages at
/// `offsets` of block `bi` that this load has not written yet (a page written before
/// is there already: a second pass costs no call). Returns the calls made.
pub fn prefault_pages(
    block: &RamBlock,
    received: &ReceivedPages,
    bi: usize,
    offsets: &[u64],
) -> usize {
    let ps = block.page_size();
    let mut calls = 0;
    let mut run: Option<(u64, u64)> = None;
    let mut flush = |run: (u64, u64)| {
        block.populate_for_write(run.0, (run.1 - run.0) as usize);
        calls += 1;
    };
    for &o in offsets {
        if received.get(bi, (o / ps) as usize) {
            continue;
        }
        run = match run {
            Some((start, end)) if end == o => Some((start, o + ps)),
            Some(done) => {
                flush(done);
                Some((o, o + ps))
            }
            None => Some((o, o + ps)),
        };
    }
    if let Some(done) = run {
        flush(done);
    }
    calls
}

/// The number of pages, from the one at `addr` on, that a precopy stream's buffered
/// bytes show to be sent one after another as data: `ahead` starts with the data of
/// the page at `addr` and holds what follows it; every further page counts if its
/// record is a PAGE record continuing the same block at the next address and its
/// header is in `ahead`. At most `max`; 1 when nothing can be seen.
pub fn page_run_ahead(ahead: &[u8], addr: u64, page_size: u64, max: usize) -> usize {
    let ps = page_size as usize;
    let mut run = 1;
    let mut at = ps;
    while run < max {
        let Some(word) = ahead.get(at..at + 8) else {
            break;
        };
        let word = u64::from_be_bytes(word.try_into().expect("8 bytes"));
        if word & (page_size - 1) != FLAG_PAGE | FLAG_CONTINUE
            || word & !(page_size - 1) != addr + run as u64 * page_size
        {
            break;
        }
        run += 1;
        at += 8 + ps;
    }
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_fresh_pages_are_populated_and_nothing_else() {
        let ps = crate::memory::host_page_size();
        let block = Arc::new(RamBlock::anonymous("ram", 16 * ps, 0).unwrap());
        let received = ReceivedPages::new(std::slice::from_ref(&block));
        received.set(0, 5);
        // 1-3 one run, 5 already written (not asked again), 7 and 9 runs of their own.
        let offsets: Vec<u64> = [1, 2, 3, 5, 7, 9].iter().map(|p| p * ps).collect();
        assert_eq!(prefault_pages(&block, &received, 0, &offsets), 3);
        let resident = block.resident_pages(0, block.len() as usize).unwrap();
        if !resident[1] {
            println!("skipped: this kernel has no MADV_POPULATE_WRITE");
            return;
        }
        let want: Vec<bool> = (0..16).map(|p| [1, 2, 3, 7, 9].contains(&p)).collect();
        assert_eq!(resident, want, "pages that get no data must stay untouched");
        assert!(block.pristine(), "populating is not writing");
    }

    #[test]
    fn a_run_ahead_is_read_from_page_record_headers() {
        let ps = 4096u64;
        let record = |addr: u64, flags: u64| {
            let mut r = (addr | flags).to_be_bytes().to_vec();
            r.extend(vec![0xaa; ps as usize]);
            r
        };
        let mut ahead = vec![0x55; ps as usize];
        ahead.extend(record(11 * ps, FLAG_PAGE | FLAG_CONTINUE));
        ahead.extend(record(12 * ps, FLAG_PAGE | FLAG_CONTINUE));
        ahead.extend(record(13 * ps, 0x02 | FLAG_CONTINUE)); // a zero page ends it
        ahead.extend(record(14 * ps, FLAG_PAGE | FLAG_CONTINUE));
        assert_eq!(page_run_ahead(&ahead, 10 * ps, ps, 64), 3);
        assert_eq!(page_run_ahead(&ahead, 10 * ps, ps, 2), 2);
        // A gap in addresses, another block, or a header cut short end a run.
        assert_eq!(page_run_ahead(&ahead, 9 * ps, ps, 64), 1);
        let mut named = vec![0x55; ps as usize];
        named.extend(record(11 * ps, FLAG_PAGE));
        assert_eq!(page_run_ahead(&named, 10 * ps, ps, 64), 1);
        assert_eq!(
            page_run_ahead(&ahead[..ps as usize + 7], 10 * ps, ps, 64),
            1
        );
        assert_eq!(page_run_ahead(&[], 10 * ps, ps, 64), 1);
    }
}
