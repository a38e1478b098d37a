//! The source side of XBZRLE: the cache of pages as the destination holds them, the
//! choice between an encoded page, a whole page and no page at all, and the
//! `xbzrle-cache` figures of `query-migrate`.
//!
//! The rules are QEMU 10.0's:
//!
//! - The cache is direct-mapped: `xbzrle-cache-size / page size` slots (a power of two),
//!   a page's slot chosen by its RAM address (the blocks laid end to end) modulo the slot
//!   count. Each slot remembers the address it holds and its age, the dirty-sync count
//!   when it was last hit or filled.
//! - XBZRLE starts after the first complete pass over RAM. A page then missing from the
//!   cache is a *cache miss*: it is put in its slot (unless the slot holds another page
//!   used during this or the previous sync) and sent whole, from the cached copy, so that
//!   the cache holds exactly what was sent.
//! - A page in the cache is encoded against the cached copy. An unchanged page is not
//!   sent at all; an encoding longer than a page is an *overflow*: the page is copied
//!   into the cache and sent whole from there; otherwise the encoding is sent.
//! - A page sent as ZERO puts a zero page in its slot (a stale copy would be wrong).
//! - At the completion (the VM stopped) a page that overflows empties its slot.
//! - In postcopy XBZRLE is not used.
//! - `cache-miss-rate` and `encoding-rate` are measured over periods of at least one
//!   second, at dirty syncs: misses per page sent, and page bytes encoded per byte
//!   sent for them (0 when nothing was encoded in the period).
//!
//! QEMU copies each page out of guest memory before encoding it, so that what it sends
//! and what it caches are the same bytes while the guest writes the page. Here the page
//! is encoded where it lies and each run is written into the cached copy as it is
//! written into the encoding, so the cache holds what the destination will: one copy of
//! the page fewer, and only the changed bytes are written into the cache.
//!
//! QEMU replaces its cache when `xbzrle-cache-size` changes during a migration; here the
//! saver builds a new, empty cache of the new size at the next iteration.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmigrate_stream::xbzrle::{self, Encoded};

use crate::memory::RamBlock;
use crate::stats::Stats;

/// How many dirty syncs a slot stays reserved for its page after its last use.
const CACHED_PAGE_LIFETIME: u64 = 2;

/// How often the rates are measured (at the first dirty sync after this much time).
const RATE_PERIOD: Duration = Duration::from_secs(1);

/// The cache could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XbzrleCacheError {
    /// QEMU's text when its cache table cannot be allocated.
    #[error("Parameter 'cache size' expects Failed to allocate page cache")]
    Allocation,
    /// QEMU's text for a size that is not a power-of-two number of pages.
    #[error("Parameter 'cache size' expects is not a power of two number of pages")]
    NotPowerOfTwo,
    #[error("Parameter 'cache size' expects is smaller than one target page size")]
    TooSmall,
}

/// One cache slot.
#[derive(Debug)]
struct Slot {
    /// RAM address of the cached page; `u64::MAX` when empty.
    addr: u64,
    age: u64,
    data: Option<Box<[u8]>>,
}

/// QEMU's page cache: direct-mapped, `size / page_size` slots.
#[derive(Debug)]
pub struct PageCache {
    page_size: usize,
    slots: Vec<Slot>,
}

impl PageCache {
    pub fn new(size: u64, page_size: usize) -> Result<Self, XbzrleCacheError> {
        if size < page_size as u64 {
            return Err(XbzrleCacheError::TooSmall);
        }
        let n = size / page_size as u64;
        if !n.is_power_of_two() {
            return Err(XbzrleCacheError::NotPowerOfTwo);
        }
        let n = usize::try_from(n).map_err(|_| XbzrleCacheError::Allocation)?;
        let mut slots = Vec::new();
        slots
            .try_reserve_exact(n)
            .map_err(|_| XbzrleCacheError::Allocation)?;
        slots.extend((0..n).map(|_| Slot {
            addr: u64::MAX,
            age: 0,
            data: None,
        }));
        Ok(Self { page_size, slots })
    }

    fn index(&self, addr: u64) -> usize {
        ((addr / self.page_size as u64) as usize) & (self.slots.len() - 1)
    }

    /// Whether `addr` is cached; a hit renews its slot's age.
    pub fn is_cached(&mut self, addr: u64, age: u64) -> bool {
        let i = self.index(addr);
        let slot = &mut self.slots[i];
        if slot.addr == addr {
            slot.age = age;
            true
        } else {
            false
        }
    }

    /// Puts a copy of `page` in the slot of `addr` (filled by `fill`), unless the slot
    /// holds another page used recently. Returns the cached copy.
    fn insert_with(&mut self, addr: u64, age: u64, fill: impl FnOnce(&mut [u8])) -> Option<&[u8]> {
        let i = self.index(addr);
        let ps = self.page_size;
        let slot = &mut self.slots[i];
        if slot.data.is_some() && slot.addr != addr && slot.age + CACHED_PAGE_LIFETIME > age {
            return None;
        }
        let data = slot
            .data
            .get_or_insert_with(|| vec![0u8; ps].into_boxed_slice());
        fill(data);
        slot.addr = addr;
        slot.age = age;
        slot.data.as_deref()
    }

    /// Empties the slot of `addr` (which must be cached).
    fn forget(&mut self, addr: u64) {
        let i = self.index(addr);
        self.slots[i].addr = u64::MAX;
    }

    /// The cached copy of `addr` (which must be cached), to change.
    fn data_mut(&mut self, addr: u64) -> &mut [u8] {
        let i = self.index(addr);
        self.slots[i]
            .data
            .as_deref_mut()
            .expect("a cached page has its data")
    }
}

/// What to send for one page.
#[derive(Debug)]
pub enum XbzrlePage<'a> {
    /// The page did not change since it was last sent: nothing.
    Unchanged,
    /// An XBZRLE record with this encoding.
    Encoded(&'a [u8]),
    /// The page whole, these bytes (the copy the cache now holds).
    Whole(&'a [u8]),
    /// The page whole, read from guest memory.
    FromGuest,
}

/// The source's XBZRLE state for one migration.
#[derive(Debug)]
pub struct XbzrleSaver {
    cache: PageCache,
    cache_size: u64,
    page_size: usize,
    /// RAM address of the start of each block.
    block_base: Vec<u64>,
    encoded: Vec<u8>,
    stats: Arc<Stats>,
    /// Pages written since the start (records of any kind), for the rates.
    pages_sent: u64,
    rates: RateMark,
}

#[derive(Debug)]
struct RateMark {
    at: Instant,
    pages_sent: u64,
    cache_miss: u64,
    pages: u64,
    bytes: u64,
}

impl XbzrleSaver {
    pub fn new(
        blocks: &[Arc<RamBlock>],
        cache_size: u64,
        stats: Arc<Stats>,
    ) -> Result<Self, XbzrleCacheError> {
        let page_size = blocks.first().map_or(4096, |b| b.page_size()) as usize;
        let mut base = 0;
        let block_base = blocks
            .iter()
            .map(|b| {
                let at = base;
                base += b.len();
                at
            })
            .collect();
        Ok(Self {
            cache: PageCache::new(cache_size, page_size)?,
            cache_size,
            page_size,
            block_base,
            encoded: vec![0; page_size],
            stats,
            pages_sent: 0,
            rates: RateMark {
                at: Instant::now(),
                pages_sent: 0,
                cache_miss: 0,
                pages: 0,
                bytes: 0,
            },
        })
    }

    /// `xbzrle-cache-size` is now `size`: a different size gets a new, empty cache.
    pub fn resize(&mut self, size: u64) -> Result<(), XbzrleCacheError> {
        if size != self.cache_size {
            self.cache = PageCache::new(size, self.page_size)?;
            self.cache_size = size;
        }
        Ok(())
    }

    fn age(&self) -> u64 {
        self.stats.dirty_sync_count.load(Ordering::Relaxed)
    }

    /// A record of some kind was written for one page.
    pub fn note_page_sent(&mut self) {
        self.pages_sent += 1;
    }

    /// Page `offset` of block `bi` was sent as ZERO, XBZRLE having started.
    pub fn zero_page_sent(&mut self, bi: usize, offset: u64) {
        let age = self.age();
        let _ = self
            .cache
            .insert_with(self.block_base[bi] + offset, age, |d| d.fill(0));
    }

    /// Decides what to send for page `offset` of `block` (index `bi`), XBZRLE having
    /// started. `last_stage`: the VM is stopped for completion, the cache stays as it
    /// is. `header_bytes`: the record header's bytes after its 8-byte offset word (the
    /// block name, when named), counted in `bytes` as QEMU does.
    pub fn page(
        &mut self,
        block: &RamBlock,
        bi: usize,
        offset: u64,
        last_stage: bool,
        header_bytes: u64,
    ) -> XbzrlePage<'_> {
        let counters = &self.stats.xbzrle;
        let addr = self.block_base[bi] + offset;
        let age = self.age();
        if !self.cache.is_cached(addr, age) {
            counters.cache_miss.fetch_add(1, Ordering::Relaxed);
            if last_stage {
                return XbzrlePage::FromGuest;
            }
            return match self.cache.insert_with(addr, age, |d| block.read(offset, d)) {
                Some(copy) => XbzrlePage::Whole(copy),
                None => XbzrlePage::FromGuest,
            };
        }
        counters.pages.fetch_add(1, Ordering::Relaxed);
        let ps = self.page_size;
        let cached = self.cache.data_mut(addr);
        let encoded = &mut self.encoded;
        // SAFETY: the encoder's output is well formed whatever it reads, and the page's
        // bytes leave only as the runs it copies once, into the encoding and from there
        // into the cached copy (see `xbzrle::encode`).
        let result = unsafe {
            block.with_live_bytes(offset, ps, |new| {
                xbzrle::encode_applying(cached, new, encoded)
            })
        };
        match result {
            Encoded::Unchanged => XbzrlePage::Unchanged,
            Encoded::Overflow => {
                counters.overflow.fetch_add(1, Ordering::Relaxed);
                counters.bytes.fetch_add(ps as u64, Ordering::Relaxed);
                if last_stage {
                    // The cached copy took part of the runs: it is no longer the
                    // destination's.
                    self.cache.forget(addr);
                    return XbzrlePage::FromGuest;
                }
                // One copy out of guest memory, sent from the cache so that both are the
                // same bytes.
                let cached = self.cache.data_mut(addr);
                block.read(offset, cached);
                XbzrlePage::Whole(cached)
            }
            Encoded::Len(n) => {
                counters
                    .bytes
                    .fetch_add(header_bytes + 3 + n as u64, Ordering::Relaxed);
                XbzrlePage::Encoded(&self.encoded[..n])
            }
        }
    }

    /// At a dirty sync: measures the rates if a period has passed.
    pub fn update_rates(&mut self) {
        if self.rates.at.elapsed() < RATE_PERIOD {
            return;
        }
        let c = &self.stats.xbzrle;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (miss, pages, bytes) = (get(&c.cache_miss), get(&c.pages), get(&c.bytes));
        let sent = self.pages_sent - self.rates.pages_sent;
        self.rates.at = Instant::now();
        if sent == 0 {
            return;
        }
        let miss_rate = (miss - self.rates.cache_miss) as f64 / sent as f64;
        let encoded = (bytes - self.rates.bytes) as f64;
        let encoding_rate = if pages == self.rates.pages || encoded == 0.0 {
            0.0
        } else {
            ((pages - self.rates.pages) * self.page_size as u64) as f64 / encoded
        };
        c.cache_miss_rate
            .store(miss_rate.to_bits(), Ordering::Relaxed);
        c.encoding_rate
            .store(encoding_rate.to_bits(), Ordering::Relaxed);
        self.rates.pages_sent = self.pages_sent;
        self.rates.cache_miss = miss;
        self.rates.pages = pages;
        self.rates.bytes = bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_mapped_slots_keep_fresh_pages() {
        let mut c = PageCache::new(4 * 4096, 4096).unwrap();
        assert!(!c.is_cached(0, 1));
        assert!(c.insert_with(0, 1, |d| d.fill(1)).is_some());
        assert!(c.is_cached(0, 1));
        // Address 4 pages on shares slot 0: refused while page 0 is fresh.
        assert!(c.insert_with(4 * 4096, 2, |d| d.fill(2)).is_none());
        assert!(c.is_cached(0, 1));
        // Two syncs later the slot may be taken.
        assert!(c.insert_with(4 * 4096, 3, |d| d.fill(2)).is_some());
        assert!(!c.is_cached(0, 3));
        assert!(c.is_cached(4 * 4096, 3));
    }

    #[test]
    fn sizes_follow_qemus_rules() {
        assert_eq!(
            PageCache::new(2048, 4096).unwrap_err(),
            XbzrleCacheError::TooSmall
        );
        assert_eq!(
            PageCache::new(3 * 4096, 4096).unwrap_err(),
            XbzrleCacheError::NotPowerOfTwo
        );
        assert_eq!(
            PageCache::new(1 << 62, 4096).unwrap_err(),
            XbzrleCacheError::Allocation
        );
    }

    #[test]
    fn miss_then_encoded_then_unchanged_then_overflow() {
        let block = Arc::new(RamBlock::anonymous("m0", 16 * 4096, 0).unwrap());
        let stats = Stats::new();
        let mut x = XbzrleSaver::new(std::slice::from_ref(&block), 1 << 20, stats.clone()).unwrap();
        block.write(4096, &[5u8; 16]);
        assert!(matches!(x.page(&block, 0, 4096, false, 0), XbzrlePage::Whole(p) if p[0] == 5));
        block.write(4096 + 100, &[9u8]);
        match x.page(&block, 0, 4096, false, 0) {
            XbzrlePage::Encoded(e) => assert_eq!(e, [100, 1, 9]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            x.page(&block, 0, 4096, false, 0),
            XbzrlePage::Unchanged
        ));
        block.write(4096, &[0xEE; 4096]);
        assert!(matches!(x.page(&block, 0, 4096, false, 0), XbzrlePage::Whole(p) if p[1] == 0xEE));
        let c = &stats.xbzrle;
        assert_eq!(c.cache_miss.load(Ordering::Relaxed), 1);
        assert_eq!(c.pages.load(Ordering::Relaxed), 3);
        assert_eq!(c.overflow.load(Ordering::Relaxed), 1);
        assert_eq!(c.bytes.load(Ordering::Relaxed), 6 + 4096);
        // A zero page replaces the cached copy: the next change encodes against zeros.
        block.write(4096, &[0u8; 4096]);
        x.zero_page_sent(0, 4096);
        block.write(4096 + 7, &[1u8]);
        match x.page(&block, 0, 4096, false, 0) {
            XbzrlePage::Encoded(e) => assert_eq!(e, [7, 1, 1]),
            other => panic!("{other:?}"),
        }
        let json = c.to_json(1 << 20);
        assert_eq!(json["cache-size"], 1 << 20);
        assert_eq!(json["pages"], 4);
    }
}
