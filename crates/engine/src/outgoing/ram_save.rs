//! The RAM saver: the `ram` section's setup body, iterative passes over dirty pages with
//! zero-page detection, and the completion pass.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmigrate_stream::ram::{self, BlockEntry};

use crate::io::{StreamWriter, WriteError};
use crate::mapped_ram::{MappedRamWriter, Region};
use crate::memory::RamBlock;
use crate::outgoing::multifd_send::{MultifdSender, ZeroDetection};
use crate::outgoing::xbzrle_cache::{XbzrleCacheError, XbzrlePage, XbzrleSaver};
use crate::properties::MultifdSync;
use crate::vmm::{DirtyBitmap, DirtyTracker, VmmError};

/// How zero pages are sent on the main channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroPages {
    /// Every page is sent as PAGE (`zero-page-detection=none`).
    SendAsData,
    /// All-zero pages become ZERO records (`legacy`, and `multifd` without multifd).
    Detect,
}

/// Pages sent by one call, for the statistics.
#[derive(Debug, Default, Clone, Copy)]
pub struct SentPages {
    pub zero: u64,
    pub normal: u64,
    /// Pages handed to multifd channels (which count zero and normal themselves).
    pub queued: u64,
    /// Pages left for the next sync: the guest wrote them again since the last one.
    pub deferred: u64,
}

impl SentPages {
    pub fn total(&self) -> u64 {
        self.zero + self.normal + self.queued
    }
}

/// Walks the dirty bitmaps and writes page records.
#[derive(Debug)]
pub struct RamSaver {
    blocks: Vec<Arc<RamBlock>>,
    dirty: Vec<DirtyBitmap>,
    zero_pages: ZeroPages,
    /// Block of the last page record written on this channel (for CONTINUE).
    last_block: Option<usize>,
    /// Scan position: block and page.
    cursor: (usize, usize),
    /// The pages last mapped in ahead of the scan: block, first page, end page.
    read_ahead: (usize, usize, usize),
    /// Set once a pass has reached the end of RAM: the pages dirty from then on were
    /// written, so they are mapped and need no read-ahead, and XBZRLE (when on) starts.
    first_pass_done: bool,
    /// multifd channels, when the capability is on: pages go there, not to the main
    /// stream.
    multifd: Option<MultifdSender>,
    /// Where the multifd sync points go.
    multifd_sync: MultifdSync,
    /// mapped-ram: the setup section lays the blocks out in the file and pages go to
    /// their fixed offsets instead of the stream.
    mapped_layout: bool,
    mapped: Option<MappedRamWriter>,
    /// XBZRLE, when the capability is on.
    xbzrle: Option<XbzrleSaver>,
    /// Postcopy started: pages are sent whole (XBZRLE is not used).
    postcopy_phase: bool,
    /// x-ignore-shared: the block list carries each block's guest address, and the
    /// blocks marked here (shared memory the destination maps itself) send no pages.
    with_mr_addr: bool,
    ignored: Vec<bool>,
}

/// Why a saver step stopped.
#[derive(Debug, thiserror::Error)]
pub enum RamSaveError {
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
}

impl RamSaver {
    pub fn new(blocks: Vec<Arc<RamBlock>>, zero_pages: ZeroPages) -> Self {
        let blocks_len = blocks.len();
        let dirty = blocks
            .iter()
            .map(|b| DirtyBitmap::all_set(b.pages()))
            .collect();
        Self {
            blocks,
            dirty,
            zero_pages,
            last_block: None,
            cursor: (0, 0),
            read_ahead: (usize::MAX, 0, 0),
            first_pass_done: false,
            multifd: None,
            multifd_sync: MultifdSync::PerRound,
            mapped_layout: false,
            mapped: None,
            xbzrle: None,
            postcopy_phase: false,
            with_mr_addr: false,
            ignored: vec![false; blocks_len],
        }
    }

    /// x-ignore-shared: lists each block's guest address and sends no page of the
    /// blocks in shared named files (QEMU's `migrate_ram_is_ignored`).
    pub fn ignore_shared(&mut self) {
        self.with_mr_addr = true;
        for (i, b) in self.blocks.iter().enumerate() {
            if b.is_shared_named_file() {
                self.ignored[i] = true;
                self.dirty[i] = DirtyBitmap::new(b.pages());
            }
        }
    }

    /// cpr-transfer: the destination maps every block itself, so none sends pages (and
    /// the block list carries no addresses).
    pub fn ignore_all(&mut self) {
        for (i, b) in self.blocks.iter().enumerate() {
            self.ignored[i] = true;
            self.dirty[i] = DirtyBitmap::new(b.pages());
        }
    }

    /// Bytes of the blocks whose pages migrate (QEMU's `ram_bytes_total`: ignored
    /// blocks left out).
    pub fn migrated_bytes(&self) -> u64 {
        self.blocks
            .iter()
            .zip(&self.ignored)
            .filter(|(_, ignored)| !**ignored)
            .map(|(b, _)| b.len())
            .sum()
    }

    /// Encodes pages sent again with XBZRLE from the second pass on.
    pub fn use_xbzrle(&mut self, x: XbzrleSaver) {
        self.xbzrle = Some(x);
    }

    /// `xbzrle-cache-size` may have changed during the migration.
    pub fn set_xbzrle_cache_size(&mut self, size: u64) -> Result<(), XbzrleCacheError> {
        match &mut self.xbzrle {
            Some(x) => x.resize(size),
            None => Ok(()),
        }
    }

    /// Lays the blocks out as mapped-ram in the setup section.
    pub fn use_mapped_layout(&mut self) {
        self.mapped_layout = true;
    }

    /// Writes pages at their file offsets from now on.
    pub fn use_mapped_ram(&mut self, writer: MappedRamWriter) {
        self.mapped = Some(writer);
    }

    pub fn is_mapped(&self) -> bool {
        self.mapped_layout
    }

    /// mapped-ram: waits for every page written so far, then writes the bitmaps.
    pub fn write_mapped_bitmaps(&mut self) -> Result<(), WriteError> {
        match &mut self.mapped {
            Some(m) => m.write_bitmaps(),
            None => Ok(()),
        }
    }

    /// Sends pages through multifd channels from now on, with sync points placed as
    /// `sync` says.
    pub fn use_multifd(&mut self, sender: MultifdSender, sync: MultifdSync) {
        self.multifd = Some(sender);
        self.multifd_sync = sync;
    }

    /// The sync point due at the end of a RAM section body, just before its EOS, if any:
    /// per round only when the pass reached the end of RAM (`pass_done`), marked by the
    /// MULTIFD_FLUSH this writes; per section always, marked by the EOS the caller
    /// writes next. All pages queued so far reach the destination before it reads past
    /// the marker. mapped-ram has no sync points: at the end of a pass it waits for its
    /// writers.
    pub fn sync_before_eos(
        &mut self,
        w: &mut StreamWriter,
        pass_done: bool,
    ) -> Result<(), WriteError> {
        if let Some(m) = &mut self.multifd {
            match self.multifd_sync {
                MultifdSync::PerRound if pass_done => {
                    m.sync()?;
                    w.with_buf(ram::put_multifd_flush)?;
                }
                MultifdSync::PerRound => {}
                MultifdSync::PerSection => m.sync()?,
            }
        }
        if pass_done {
            if let Some(m) = &mut self.mapped {
                m.drain()?;
            }
        }
        Ok(())
    }

    /// Stops the multifd channels after the last sync.
    pub fn finish_multifd(&mut self) -> Result<(), WriteError> {
        if let Some(mut m) = self.mapped.take() {
            m.drain()?;
        }
        match self.multifd.take() {
            Some(m) => m.finish(),
            None => Ok(()),
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.len()).sum()
    }

    /// The setup body: MEM_SIZE, the block list, [multifd sync point,] EOS. With the
    /// mapped-ram layout each block entry is followed by its header and the stream jumps
    /// past the block's bitmap and pages; the regions are returned.
    pub fn write_setup(&mut self, w: &mut StreamWriter) -> Result<Vec<Region>, WriteError> {
        let mut regions = Vec::new();
        w.with_buf(|out| ram::put_mem_size(out, self.total_bytes()))?;
        for b in &self.blocks {
            w.with_buf(|out| {
                BlockEntry {
                    idstr: b.idstr().to_string(),
                    used_length: b.len(),
                    page_size: None,
                    mr_addr: self.with_mr_addr.then(|| b.gpa()),
                }
                .encode(out)
            })?;
            if self.mapped_layout {
                let region = Region::plan(w.position(), b.len(), b.page_size());
                w.with_buf(|out| region.header().encode(out))?;
                w.seek_to(region.end())?;
                regions.push(region);
            }
        }
        self.sync_before_eos(w, true)?;
        w.with_buf(ram::put_eos)?;
        Ok(regions)
    }

    pub fn page_size(&self) -> u64 {
        self.blocks.first().map(|b| b.page_size()).unwrap_or(4096)
    }

    /// Bytes still marked dirty.
    pub fn remaining_bytes(&self) -> u64 {
        self.blocks
            .iter()
            .zip(&self.dirty)
            .map(|(b, d)| d.count() as u64 * b.page_size())
            .sum()
    }

    /// Index of the block called `name`.
    pub fn block_index(&self, name: &str) -> Option<usize> {
        self.blocks.iter().position(|b| b.idstr() == name)
    }

    pub fn block(&self, index: usize) -> &Arc<RamBlock> {
        &self.blocks[index]
    }

    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// The runs of pages of block `index` still marked dirty, as byte ranges
    /// (start, length): what a postcopy destination must discard.
    pub fn dirty_runs(&self, index: usize) -> Vec<(u64, u64)> {
        let ps = self.blocks[index].page_size();
        let bitmap = &self.dirty[index];
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for page in bitmap.iter_set() {
            let start = page as u64 * ps;
            match runs.last_mut() {
                Some((s, len)) if *s + *len == start => *len += ps,
                _ => runs.push((start, ps)),
            }
        }
        runs
    }

    /// Postcopy: sends page `page` of block `index` now, naming its block, if it is
    /// still to be sent (a page already sent is never sent twice), and moves the scan
    /// to just after it. Returns whether a record was written.
    pub fn send_requested(
        &mut self,
        w: &mut StreamWriter,
        index: usize,
        page: usize,
        sent: &mut SentPages,
    ) -> Result<bool, WriteError> {
        self.postcopy_phase = true;
        if !self.dirty[index].test_and_clear(page) {
            return Ok(false);
        }
        self.last_block = None;
        if let Err(e) = self.send_page(w, index, page, sent) {
            self.dirty[index].set(page);
            return Err(e);
        }
        self.cursor = (index, page + 1);
        Ok(true)
    }

    /// Postcopy with a preempt channel: sends page `page` of block `index` on `w` (the
    /// preempt channel) if it is still to be sent, naming its block unless it is
    /// `channel_block`, the block of that channel's previous record (updated here). The
    /// scan moves to just after it, as for [`Self::send_requested`].
    pub fn send_requested_on(
        &mut self,
        w: &mut StreamWriter,
        index: usize,
        page: usize,
        sent: &mut SentPages,
        channel_block: &mut Option<usize>,
    ) -> Result<bool, WriteError> {
        self.postcopy_phase = true;
        if !self.dirty[index].test_and_clear(page) {
            return Ok(false);
        }
        if let Err(e) = self.send_page_tracking(w, index, page, sent, channel_block) {
            self.dirty[index].set(page);
            return Err(e);
        }
        self.cursor = (index, page + 1);
        Ok(true)
    }

    /// Postcopy: sends the next page still to be sent from the scan position, wrapping
    /// around to the start of RAM once. Returns the block index and page it sent, or
    /// `None` when no page is left.
    pub fn send_next(
        &mut self,
        w: &mut StreamWriter,
        sent: &mut SentPages,
    ) -> Result<Option<(usize, usize)>, WriteError> {
        self.postcopy_phase = true;
        let mut wrapped = false;
        loop {
            let (bi, from) = self.cursor;
            if bi >= self.blocks.len() {
                if wrapped {
                    return Ok(None);
                }
                wrapped = true;
                self.cursor = (0, 0);
                continue;
            }
            let Some(page) = self.dirty[bi].next_set(from) else {
                self.cursor = (bi + 1, 0);
                continue;
            };
            self.dirty[bi].test_and_clear(page);
            self.cursor = (bi, page + 1);
            if let Err(e) = self.send_page(w, bi, page, sent) {
                self.dirty[bi].set(page);
                return Err(e);
            }
            return Ok(Some((bi, page)));
        }
    }

    /// Postcopy recovery: block `index` is to send again every page the destination
    /// did not receive. `received` counts target pages ([`Self::page_size`]); a block
    /// page is whole on the destination only when every target page in it is. Returns
    /// the pages now to send.
    pub fn reload_from_received(
        &mut self,
        index: usize,
        received: &vmigrate_stream::recover::RecvBitmap,
    ) -> usize {
        let per_page = (self.blocks[index].page_size() / self.page_size()).max(1);
        let bitmap = &mut self.dirty[index];
        let mut pages = DirtyBitmap::new(bitmap.pages());
        for page in 0..bitmap.pages() {
            let first = page as u64 * per_page;
            if !(first..first + per_page).all(|t| received.received(t)) {
                pages.set(page);
            }
        }
        let count = pages.count();
        *bitmap = pages;
        self.cursor = (0, 0);
        self.last_block = None;
        count
    }

    /// The number of target pages of block `index` (the bits of its received bitmap).
    pub fn target_pages(&self, index: usize) -> u64 {
        self.blocks[index].len() / self.page_size()
    }

    /// The next page record names its block (a new phase of the stream starts).
    pub fn forget_last_block(&mut self) {
        self.last_block = None;
    }

    /// Fetches the pages dirtied since the last sync into the saver's bitmaps and
    /// returns how many pages that added.
    pub fn sync(&mut self, tracker: &dyn DirtyTracker) -> Result<u64, VmmError> {
        let mut fresh = 0;
        for (i, d) in self.dirty.iter_mut().enumerate() {
            let mut got = DirtyBitmap::new(d.pages());
            tracker.sync(i, &mut got)?;
            if self.ignored[i] {
                continue;
            }
            fresh += got.count() as u64;
            d.merge(&got);
        }
        if let Some(x) = &mut self.xbzrle {
            x.update_rates();
        }
        self.cursor = (0, 0);
        Ok(fresh)
    }

    /// Hands every page still marked dirty back to the tracker (a failed migration must
    /// not lose dirty state the VMM might need for a retry).
    pub fn requeue_all(&self, tracker: &dyn DirtyTracker) {
        // Pages handed to channel threads may not have left: give back every page.
        let in_flight = self.multifd.is_some() || self.mapped.is_some();
        for (i, d) in self.dirty.iter().enumerate() {
            if in_flight {
                tracker.requeue(i, &DirtyBitmap::all_set(d.pages()));
            } else {
                tracker.requeue(i, d);
            }
        }
    }

    /// Sends dirty pages until the bitmaps are empty or `deadline` passes. Returns the
    /// pages sent and whether the pass reached the end of RAM. With `live`, the tracker
    /// of a running guest, a page the guest wrote again since the last sync is left to
    /// the next one instead of being sent now and again then (it stays marked there, so
    /// it cannot be lost).
    pub fn send_dirty(
        &mut self,
        w: &mut StreamWriter,
        deadline: Option<Instant>,
        live: Option<&dyn DirtyTracker>,
    ) -> Result<(SentPages, bool), WriteError> {
        let mut sent = SentPages::default();
        let mut n = 0u32;
        // Without a deadline the VM is stopped: XBZRLE's last stage.
        let last_stage = deadline.is_none();
        loop {
            let (bi, from) = self.cursor;
            if bi >= self.blocks.len() {
                self.first_pass_done = true;
                return Ok((sent, true));
            }
            let Some(page) = self.dirty[bi].next_set(from) else {
                self.cursor = (bi + 1, 0);
                continue;
            };
            if !self.first_pass_done {
                self.read_ahead(bi, page);
            }
            self.dirty[bi].test_and_clear(page);
            self.cursor = (bi, page + 1);
            if live.is_some_and(|t| t.written_since_sync(bi, page)) {
                sent.deferred += 1;
                continue;
            }
            let result = match self.xbzrle.is_some() && self.first_pass_done {
                true => self.send_page_xbzrle(w, bi, page, &mut sent, last_stage),
                false => self.send_page(w, bi, page, &mut sent),
            };
            if let Err(e) = result {
                self.dirty[bi].set(page);
                return Err(e);
            }
            n += 1;
            if n.is_multiple_of(256) && deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok((sent, false));
            }
        }
    }

    /// Maps in the run of dirty pages from `page` on (up to 1 MiB) with one call when
    /// the scan leaves the run mapped last: reading a page that is not mapped yet costs
    /// a fault, and faults were most of a saver's CPU. Only dirty pages are asked for, so
    /// a hole in a shared file is not filled for nothing. Only the first pass needs it:
    /// a page dirty in a later one was written since, so it is mapped, and asking the
    /// kernel again costs a page-table walk per page for nothing.
    fn read_ahead(&mut self, bi: usize, page: usize) {
        const AHEAD: u64 = 1 << 20;
        let (rb, start, end) = self.read_ahead;
        if rb == bi && (start..end).contains(&page) {
            return;
        }
        let block = &self.blocks[bi];
        let ps = block.page_size();
        let run = self.dirty[bi].run_len(page, (AHEAD / ps).max(1) as usize);
        block.populate_for_read(page as u64 * ps, run * ps as usize);
        self.read_ahead = (bi, page, page + run);
    }

    fn send_page(
        &mut self,
        w: &mut StreamWriter,
        bi: usize,
        page: usize,
        sent: &mut SentPages,
    ) -> Result<(), WriteError> {
        let mut last = self.last_block;
        self.send_page_tracking(w, bi, page, sent, &mut last)?;
        self.last_block = last;
        Ok(())
    }

    /// Sends one page on `w`, whose previous page record was of block `last_block`
    /// (updated once the record is written).
    fn send_page_tracking(
        &mut self,
        w: &mut StreamWriter,
        bi: usize,
        page: usize,
        sent: &mut SentPages,
        last_block: &mut Option<usize>,
    ) -> Result<(), WriteError> {
        let block = &self.blocks[bi];
        let ps = block.page_size();
        let offset = page as u64 * ps;
        let name = if *last_block == Some(bi) {
            None
        } else {
            Some(block.idstr())
        };
        if let Some(m) = &mut self.mapped {
            m.queue(bi, page)?;
            sent.queued += 1;
            return Ok(());
        }
        if let Some(m) = &mut self.multifd {
            if m.zero_detection() != ZeroDetection::Legacy || !block.is_zero(offset, ps as usize) {
                m.queue(bi, offset)?;
                sent.queued += 1;
                return Ok(());
            }
        }
        if self.zero_pages == ZeroPages::Detect && block.is_zero(offset, ps as usize) {
            w.with_buf(|out| ram::put_zero_page(out, offset, name))?;
            sent.zero += 1;
            if let Some(x) = self.xbzrle.as_mut().filter(|_| self.first_pass_done) {
                x.zero_page_sent(bi, offset);
            }
        } else {
            w.with_buf(|out| ram::put_page_header(out, offset, ram::FLAG_PAGE, name))?;
            w.put_guest(block, offset, ps as usize)?;
            sent.normal += 1;
        }
        *last_block = Some(bi);
        if let Some(x) = &mut self.xbzrle {
            x.note_page_sent();
        }
        Ok(())
    }

    /// Sends one page on the main channel with XBZRLE started: a ZERO record, an
    /// XBZRLE record, the page whole, or nothing when it did not change (see
    /// [`XbzrleSaver::page`]). `last_stage`: the VM is stopped.
    fn send_page_xbzrle(
        &mut self,
        w: &mut StreamWriter,
        bi: usize,
        page: usize,
        sent: &mut SentPages,
        last_stage: bool,
    ) -> Result<(), WriteError> {
        let block = &self.blocks[bi];
        let ps = block.page_size();
        let offset = page as u64 * ps;
        let zero = self.zero_pages == ZeroPages::Detect && block.is_zero(offset, ps as usize);
        let Some(x) = self
            .xbzrle
            .as_mut()
            .filter(|_| !self.postcopy_phase && !zero)
        else {
            return self.send_page(w, bi, page, sent);
        };
        let name = (self.last_block != Some(bi)).then(|| block.idstr());
        let name_bytes = name.map_or(0, |n| 1 + n.len() as u64);
        match x.page(block, bi, offset, last_stage, name_bytes) {
            XbzrlePage::Unchanged => return Ok(()),
            XbzrlePage::Encoded(e) => w.with_buf(|out| {
                ram::put_page_header(out, offset, ram::FLAG_XBZRLE, name);
                out.push(vmigrate_stream::xbzrle::ENCODING_XBZRLE);
                out.extend_from_slice(&(e.len() as u16).to_be_bytes());
                out.extend_from_slice(e);
            })?,
            XbzrlePage::Whole(data) => {
                w.with_buf(|out| {
                    ram::put_page_header(out, offset, ram::FLAG_PAGE, name);
                    out.extend_from_slice(data);
                })?;
                sent.normal += 1;
            }
            XbzrlePage::FromGuest => {
                w.with_buf(|out| ram::put_page_header(out, offset, ram::FLAG_PAGE, name))?;
                w.put_guest(block, offset, ps as usize)?;
                sent.normal += 1;
            }
        }
        x.note_page_sent();
        self.last_block = Some(bi);
        Ok(())
    }
}

/// A time slice for one iteration, as QEMU bounds each PART section.
pub const ITERATION_SLICE: Duration = Duration::from_millis(50);
