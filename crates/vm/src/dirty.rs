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
        for page in pages.iter_set() {
            self.mark(block, page, 1);
        }
    }

    fn stop(&self) {}

    fn written_since_sync(&self, block: usize, page: usize) -> bool {
        self.blocks
            .get(block)
            .and_then(|words| words.get(page / 64))
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (page % 64)) != 0)
    }
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

    #[test]
    fn a_pass_leaves_pages_written_again_to_the_next_sync() {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        use std::sync::Arc;
        use vmigrate_engine::io::StreamWriter;
        use vmigrate_engine::outgoing::{RamSaver, ZeroPages};
        use vmigrate_engine::RamBlock;

        let pages = 64;
        let ram = Arc::new(RamBlock::anonymous("ram", pages as u64 * 4096, 0).unwrap());
        ram.fill_u64(0, pages * 4096, 0x5a5a);
        let log = AtomicDirtyLog::new(&[pages]);
        log.start().unwrap();
        log.mark(0, 0, pages);
        let mut saver = RamSaver::new(vec![ram.clone()], ZeroPages::Detect);
        saver.sync(&log).unwrap();
        // The guest writes pages 7 and 40 again after the sync.
        ram.fill_u64(7 * 4096, 4096, 1);
        log.mark(0, 7, 1);
        ram.fill_u64(40 * 4096, 4096, 2);
        log.mark(0, 40, 1);
        let sink = std::fs::File::create("/dev/null").unwrap();
        let mut w = StreamWriter::new(
            std::os::fd::OwnedFd::from(sink),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (sent, done) = saver.send_dirty(&mut w, None, Some(&log)).unwrap();
        assert!(done);
        assert_eq!((sent.normal, sent.deferred), (pages as u64 - 2, 2));
        assert_eq!(saver.remaining_bytes(), 0);
        // Still marked in the tracker: the next sync brings exactly those back.
        let fresh = saver.sync(&log).unwrap();
        assert_eq!(fresh, 2);
        assert_eq!(saver.remaining_bytes(), 2 * 4096);
        // Without a live tracker (switchover) every dirty page is sent.
        log.mark(0, 7, 1);
        let (sent, _) = saver.send_dirty(&mut w, None, None).unwrap();
        assert_eq!((sent.normal, sent.deferred), (2, 0));
    }
}
