//! Dirty tracking by an atomic bitmap per RAM block that writers mark: the writes the
//! VMM itself makes to guest RAM.

use std::sync::atomic::{AtomicU64, Ordering};

use vmigrate_engine::{DirtyBitmap, DirtyTracker, VmmError};

/// One atomic bitmap per block.
#[derive(Debug)]
pub struct AtomicDirtyLog {
    blocks: Vec<Vec<AtomicU64>>,
    pages: Vec<usize>,
}

impl AtomicDirtyLog {
    pub fn new(block_pages: &[usize]) -> Self {
        Self {
            blocks: block_pages
                .iter()
                .map(|p| (0..p.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
                .collect(),
            pages: block_pages.to_vec(),
        }
    }

    /// Marks pages `first..first+count` of `block` dirty. Call it after writing the
    /// pages: a sync that clears the bit before the write lands sees it set again.
    pub fn mark(&self, block: usize, first: usize, count: usize) {
        let words = &self.blocks[block];
        for p in first..(first + count).min(self.pages[block]) {
            words[p / 64].fetch_or(1 << (p % 64), Ordering::Release);
        }
    }
}

impl DirtyTracker for AtomicDirtyLog {
    fn start(&self) -> Result<(), VmmError> {
        for b in &self.blocks {
            for w in b {
                w.store(0, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn sync(&self, block: usize, out: &mut DirtyBitmap) -> Result<(), VmmError> {
        let words = self
            .blocks
            .get(block)
            .ok_or_else(|| VmmError::DirtyTracking(format!("no RAM block {block}")))?;
        for (wi, w) in words.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                out.set(wi * 64 + b);
                bits &= bits - 1;
            }
        }
        Ok(())
    }

    fn requeue(&self, block: usize, pages: &DirtyBitmap) {
        let mut p = 0;
        while let Some(next) = pages.next_set(p) {
            self.mark(block, next, 1);
            p = next + 1;
        }
    }

    fn stop(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_returns_and_clears() {
        let log = AtomicDirtyLog::new(&[100]);
        log.start().unwrap();
        log.mark(0, 3, 2);
        log.mark(0, 99, 5);
        let mut out = DirtyBitmap::new(100);
        log.sync(0, &mut out).unwrap();
        assert_eq!(out.count(), 3);
        let mut again = DirtyBitmap::new(100);
        log.sync(0, &mut again).unwrap();
        assert_eq!(again.count(), 0);
        log.requeue(0, &out);
        log.sync(0, &mut again).unwrap();
        assert_eq!(again, out);
    }
}
