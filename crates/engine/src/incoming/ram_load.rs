//! The RAM loader: the `ram` section's setup body (block list) and page records.

use std::sync::Arc;

use vmigrate_stream::ram::{self, BlockEntry, RamRecordHeader, RamRecordKind};
use vmigrate_stream::{DecodeError, DecodeErrorKind, Source};

use crate::incoming::multifd_recv::MultifdReceiver;
use crate::incoming::pages::{load_zero_page, page_run_ahead, ReceivedPages};
use crate::incoming::postcopy::{PostcopyError, PostcopyIncoming};
use crate::incoming::xbzrle_load::XbzrleLoad;
use crate::io::FdSource;
use crate::mapped_ram::{self, MappedRamError, Region};
use crate::memory::RamBlock;
use crate::properties::MultifdSync;

/// Why a postcopy page record could not be loaded: the stream, or placing the page
/// (with the record's offset).
#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadPostcopyError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("at byte offset {0}: {1}")]
    Postcopy(u64, #[source] PostcopyError),
}

/// How a mapped-ram file's page area is read.
#[derive(Debug, Clone, Copy)]
pub struct MappedRamLoad {
    /// Parallel readers (the multifd channel count with multifd, else 1).
    pub threads: usize,
    /// Read the page area with O_DIRECT.
    pub direct_io: bool,
}

impl Default for MappedRamLoad {
    fn default() -> Self {
        Self {
            threads: 1,
            direct_io: false,
        }
    }
}

/// Loads page records into the destination's RAM blocks.
#[derive(Debug)]
pub struct RamLoader {
    blocks: Vec<Arc<RamBlock>>,
    /// Pages this load wrote; a ZERO record for a page of a pristine block that the
    /// load did not write needs no work at all.
    received: Arc<ReceivedPages>,
    /// multifd channels whose pages must all be in before a MULTIFD_FLUSH (and, per
    /// section, a RAM EOS) is passed.
    multifd: Option<Arc<MultifdReceiver>>,
    multifd_sync: MultifdSync,
    /// Whether each block was pristine when the load began.
    pristine: Vec<bool>,
    current_block: Option<usize>,
    page_size: u64,
    /// mapped-ram: pages come from the file's page areas, the sections carry none.
    mapped: Option<MappedRamLoad>,
    /// The O_DIRECT descriptor for the page area, opened at the first block.
    direct_fd: Option<std::os::fd::OwnedFd>,
    /// With postcopy advised: pages delivered in precopy are noted there, and pages
    /// of the postcopy phase are placed through it.
    postcopy: Option<Arc<PostcopyIncoming>>,
    /// Pages received whole, the base of XBZRLE pages.
    xbzrle: XbzrleLoad,
    /// The pages `(block, first..end)` last faulted in ahead of their data.
    prefaulted: (usize, std::ops::Range<usize>),
    /// x-ignore-shared: the block list carries guest addresses, and the blocks marked
    /// here (shared named files) take no pages.
    with_mr_addr: bool,
    ignored: Vec<bool>,
    /// COLO secondary: every page a record names, whatever its kind (the pages a
    /// checkpoint carries, to copy from the staging blocks into guest RAM).
    staged: Option<Arc<ReceivedPages>>,
    pub zero_pages: u64,
    pub normal_pages: u64,
}

impl RamLoader {
    pub fn new(blocks: Vec<Arc<RamBlock>>) -> Self {
        let blocks_len = blocks.len();
        let received = Arc::new(ReceivedPages::new(&blocks));
        let pristine = blocks.iter().map(|b| b.pristine()).collect();
        let page_size = blocks.first().map(|b| b.page_size()).unwrap_or(4096);
        let xbzrle = XbzrleLoad::new(&blocks);
        Self {
            xbzrle,
            blocks,
            received,
            multifd: None,
            multifd_sync: MultifdSync::PerRound,
            pristine,
            current_block: None,
            page_size,
            mapped: None,
            direct_fd: None,
            postcopy: None,
            prefaulted: (0, 0..0),
            with_mr_addr: false,
            ignored: vec![false; blocks_len],
            staged: None,
            zero_pages: 0,
            normal_pages: 0,
        }
    }

    /// cpr-transfer destination: every block came with the CPR state, none takes pages
    /// (and the block list carries no addresses).
    pub fn ignore_all(&mut self) {
        self.ignored.fill(true);
    }

    /// x-ignore-shared is on: reads each block's guest address, and leaves the blocks
    /// in shared named files alone (the source sends none of their pages).
    pub fn ignore_shared(&mut self) {
        self.with_mr_addr = true;
        for (i, b) in self.blocks.iter().enumerate() {
            self.ignored[i] = b.is_shared_named_file();
        }
    }

    /// The block the last page record named (the one a CONTINUE record means).
    pub(crate) fn current_block(&self) -> Option<usize> {
        self.current_block
    }

    /// Goes on from where another loader of the same blocks stopped: COLO's first
    /// checkpoint may CONTINUE the block of the migration's last page.
    pub(crate) fn continue_from(&mut self, block: Option<usize>) {
        self.current_block = block.filter(|&b| b < self.blocks.len());
    }

    /// Notes in `pages` every page a record names from now on (COLO's staging copy).
    pub(crate) fn note_pages_in(&mut self, pages: Arc<ReceivedPages>) {
        self.staged = Some(pages);
    }

    /// The pages-written map, to share with multifd channels.
    pub fn received(&self) -> Arc<ReceivedPages> {
        self.received.clone()
    }

    /// Whether each block was pristine when the load began.
    pub fn pristine(&self) -> Vec<bool> {
        self.pristine.clone()
    }

    /// Postcopy was advised: notes every page precopy delivers from now on.
    pub(crate) fn track_for_postcopy(&mut self, pc: Arc<PostcopyIncoming>) {
        self.postcopy = Some(pc);
    }

    /// The postcopy session, once advised.
    pub(crate) fn postcopy(&self) -> Option<&Arc<PostcopyIncoming>> {
        self.postcopy.as_ref()
    }

    /// XBZRLE pages loaded.
    #[cfg(test)]
    pub(crate) fn xbzrle_pages(&self) -> u64 {
        self.xbzrle.pages
    }

    /// Whether any page record was loaded yet.
    pub(crate) fn loaded_any(&self) -> bool {
        self.zero_pages + self.normal_pages > 0
    }

    /// Reads page records of the postcopy phase up to and including EOS: only ZERO,
    /// PAGE and EOS may occur, and each page is placed atomically.
    pub(crate) fn load_records_postcopy(
        &mut self,
        src: &mut FdSource,
        buf: &mut Vec<u8>,
    ) -> Result<(), LoadPostcopyError> {
        let pc = self.postcopy.clone().ok_or_else(|| {
            LoadPostcopyError::Postcopy(src.offset(), PostcopyError::NotListening)
        })?;
        loop {
            let at = src.offset();
            let h = RamRecordHeader::decode(src, self.page_size)?;
            match h.kind {
                RamRecordKind::Eos => return Ok(()),
                RamRecordKind::Zero | RamRecordKind::Page => {
                    let (bi, page) = self.resolve(src, &h, at)?;
                    if h.kind == RamRecordKind::Zero {
                        let fill_at = src.offset();
                        let fill = src.u8("zero page fill byte")?;
                        if fill != 0 {
                            return Err(
                                DecodeError::new(fill_at, DecodeErrorKind::NonZeroFill(fill)).into(),
                            );
                        }
                        self.zero_pages += 1;
                        pc.place(bi, page, None)
                            .map_err(|e| LoadPostcopyError::Postcopy(at, e))?;
                    } else {
                        buf.resize(self.blocks[bi].page_size() as usize, 0);
                        src.fill(buf, "RAM page")?;
                        self.normal_pages += 1;
                        pc.place(bi, page, Some(buf))
                            .map_err(|e| LoadPostcopyError::Postcopy(at, e))?;
                    }
                }
                other => {
                    return Err(DecodeError::new(
                        at,
                        DecodeErrorKind::Invalid {
                            what: "RAM record",
                            detail: format!(
                                "Unexpected RAM flags in postcopy: {other:?} records may not occur there"
                            ),
                        },
                    )
                    .into())
                }
            }
        }
    }

    /// Reads a mapped-ram file: each block entry is followed by its header and region.
    pub fn use_mapped_ram(&mut self, how: MappedRamLoad) {
        self.mapped = Some(how);
    }

    /// Reads one block's mapped-ram header at the stream position and loads its pages;
    /// the stream continues after the block's page area.
    fn load_mapped_block(
        &mut self,
        src: &mut FdSource,
        bi: usize,
        how: MappedRamLoad,
    ) -> Result<(), DecodeError> {
        let at = src.offset();
        let header = ram::MappedRamHeader::decode(src)?;
        let block = self.blocks[bi].clone();
        let invalid = |e: MappedRamError| {
            DecodeError::new(
                at,
                DecodeErrorKind::Invalid {
                    what: "mapped-ram region",
                    detail: format!("block '{}': {e}", block.idstr()),
                },
            )
        };
        let file_len = rustix::fs::fstat(src.fd())
            .map_err(|e| invalid(MappedRamError::FileSize(e)))?
            .st_size as u64;
        let region = Region::from_header(&header, &block, file_len).map_err(invalid)?;
        if how.direct_io && self.direct_fd.is_none() {
            self.direct_fd =
                Some(mapped_ram::reopen_direct(src.fd(), false).map_err(|e| invalid(e.into()))?);
        }
        let pages_fd = self.direct_fd.as_ref().unwrap_or(src.fd());
        let read = mapped_ram::load_block(src.fd(), pages_fd, &block, &region, how.threads)
            .map_err(invalid)?;
        self.normal_pages += read;
        src.seek_to(region.end())
    }

    /// Makes MULTIFD_FLUSH records, and with [`MultifdSync::PerSection`] every RAM EOS
    /// too, wait for these channels.
    pub fn use_multifd(&mut self, m: Arc<MultifdReceiver>, sync: MultifdSync) {
        self.multifd = Some(m);
        self.multifd_sync = sync;
    }

    /// A sync point: waits until every channel has read its SYNC, then releases them.
    fn multifd_sync_point(&self, at: u64) -> Result<(), DecodeError> {
        match &self.multifd {
            Some(m) => m
                .wait_sync()
                .map_err(|e| crate::incoming::multifd_recv::channel_error(at, e)),
            None => Ok(()),
        }
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.blocks.iter().position(|b| b.idstr() == name)
    }

    /// Reads the START body: MEM_SIZE, the block list, then records up to EOS.
    pub fn load_setup(&mut self, src: &mut FdSource) -> Result<(), DecodeError> {
        let at = src.offset();
        let h = RamRecordHeader::decode(src, self.page_size)?;
        if h.kind != RamRecordKind::MemSize {
            return Err(DecodeError::new(
                at,
                DecodeErrorKind::Invalid {
                    what: "ram setup",
                    detail: "expected the MEM_SIZE block list first".into(),
                },
            ));
        }
        let total = h.addr;
        let mut sum = 0u64;
        while sum < total {
            let at = src.offset();
            let entry = BlockEntry::decode_with(src, false, self.with_mr_addr)?;
            let Some(i) = self.find(&entry.idstr) else {
                return Err(DecodeError::new(
                    at,
                    DecodeErrorKind::UnknownRamBlock(entry.idstr),
                ));
            };
            let local = self.blocks[i].len();
            if entry.used_length != local {
                return Err(DecodeError::new(
                    at,
                    DecodeErrorKind::BlockSizeMismatch {
                        idstr: entry.idstr,
                        received: entry.used_length,
                        local,
                    },
                ));
            }
            sum = sum
                .checked_add(entry.used_length)
                .filter(|s| *s <= total)
                .ok_or(DecodeError::new(
                    at,
                    DecodeErrorKind::BlockListOverrun { total },
                ))?;
            if let Some(received) = entry.mr_addr.filter(|_| self.ignored[i]) {
                let local = self.blocks[i].gpa();
                if received != local {
                    return Err(DecodeError::new(
                        at,
                        DecodeErrorKind::MismatchedGpa {
                            idstr: entry.idstr,
                            received,
                            local,
                        },
                    ));
                }
            }
            if let Some(how) = self.mapped {
                self.load_mapped_block(src, i, how)?;
            }
        }
        self.load_records(src)
    }

    /// Reads page records up to and including EOS.
    pub fn load_records(&mut self, src: &mut FdSource) -> Result<(), DecodeError> {
        loop {
            let at = src.offset();
            let h = RamRecordHeader::decode(src, self.page_size)?;
            if self.mapped.is_some() && h.kind != RamRecordKind::Eos {
                return Err(DecodeError::new(
                    at,
                    DecodeErrorKind::Invalid {
                        what: "RAM record",
                        detail: format!(
                            "Unexpected RAM flags: {:?} records do not occur in a mapped-ram stream",
                            h.kind
                        ),
                    },
                ));
            }
            match h.kind {
                RamRecordKind::Eos => {
                    // (mapped-ram loads have no channel receiver, so no sync point.)
                    if self.multifd_sync == MultifdSync::PerSection {
                        self.multifd_sync_point(at)?;
                    }
                    return Ok(());
                }
                RamRecordKind::MultifdFlush => self.multifd_sync_point(at)?,
                RamRecordKind::Zero | RamRecordKind::Page => {
                    let (bi, page) = self.resolve(src, &h, at)?;
                    if h.kind == RamRecordKind::Zero {
                        self.load_zero(src, bi, page)?;
                    } else {
                        self.load_page(src, bi, page)?;
                    }
                }
                RamRecordKind::Xbzrle => {
                    let (bi, page) = self.resolve(src, &h, at)?;
                    self.xbzrle.load(src, &self.blocks[bi], bi, page, at)?;
                    self.received.set(bi, page);
                    if let Some(pc) = &self.postcopy {
                        pc.note_delivered(bi, page);
                    }
                }
                RamRecordKind::MemSize | RamRecordKind::Hook => {
                    return Err(DecodeError::new(
                        at,
                        DecodeErrorKind::UnknownRamFlags(if h.kind == RamRecordKind::MemSize {
                            ram::FLAG_MEM_SIZE
                        } else {
                            ram::FLAG_HOOK
                        }),
                    ))
                }
            }
        }
    }

    fn resolve(
        &mut self,
        src: &mut FdSource,
        h: &RamRecordHeader,
        at: u64,
    ) -> Result<(usize, usize), DecodeError> {
        let bi = if h.names_block() {
            let name = src.counted("RAM block name")?;
            match self.find(&name) {
                Some(i) => i,
                None => {
                    return Err(DecodeError::new(
                        at,
                        DecodeErrorKind::UnknownPageBlock(name),
                    ))
                }
            }
        } else {
            self.current_block
                .ok_or(DecodeError::new(at, DecodeErrorKind::ContinueWithoutBlock))?
        };
        self.current_block = Some(bi);
        let block = &self.blocks[bi];
        if self.ignored[bi] {
            return Err(DecodeError::new(
                at,
                DecodeErrorKind::IgnoredBlockPage(block.idstr().to_string()),
            ));
        }
        if h.addr >= block.len() {
            return Err(DecodeError::new(
                at,
                DecodeErrorKind::IllegalRamOffset {
                    idstr: block.idstr().to_string(),
                    offset: h.addr,
                    len: block.len(),
                },
            ));
        }
        let page = (h.addr / block.page_size()) as usize;
        if let Some(staged) = &self.staged {
            staged.set(bi, page);
        }
        Ok((bi, page))
    }

    fn load_zero(&mut self, src: &mut FdSource, bi: usize, page: usize) -> Result<(), DecodeError> {
        let at = src.offset();
        let fill = src.u8("zero page fill byte")?;
        if fill != 0 {
            return Err(DecodeError::new(at, DecodeErrorKind::NonZeroFill(fill)));
        }
        self.zero_pages += 1;
        self.xbzrle.note_full(bi, page);
        if let Some(pc) = &self.postcopy {
            pc.note_delivered(bi, page);
        }
        load_zero_page(
            &self.blocks[bi],
            self.pristine[bi],
            &self.received,
            bi,
            page,
        );
        Ok(())
    }

    fn load_page(&mut self, src: &mut FdSource, bi: usize, page: usize) -> Result<(), DecodeError> {
        let block = &self.blocks[bi];
        let ps = block.page_size() as usize;
        if block.file_load_free() && src.buffered().len() >= ps {
            return self.load_page_run(src, bi, page);
        }
        let (done_bi, done) = &self.prefaulted;
        if (*done_bi != bi || !done.contains(&page)) && !self.received.get(bi, page) {
            // A page the load has not written yet: fault in, with one call, it and the
            // pages the read-ahead shows coming next as data, up to one written before.
            let max = page_run_ahead(src.buffered(), page as u64 * ps as u64, ps as u64, 256)
                .min(block.pages() - page);
            let run = (page..page + max)
                .take_while(|&p| p == page || !self.received.get(bi, p))
                .count();
            if run > 1 {
                block.populate_for_write(page as u64 * ps as u64, run * ps);
            }
            self.prefaulted = (bi, page..page + run);
        }
        src.fill_guest(block, page as u64 * ps as u64, ps, "RAM page")?;
        self.received.set(bi, page);
        self.xbzrle.note_full(bi, page);
        if let Some(pc) = &self.postcopy {
            pc.note_delivered(bi, page);
        }
        self.normal_pages += 1;
        Ok(())
    }
}

impl RamLoader {
    /// Loads the page at `page` and the pages the read-ahead shows following it as
    /// data, straight from the read-ahead into the block's file with one write.
    fn load_page_run(
        &mut self,
        src: &mut FdSource,
        bi: usize,
        page: usize,
    ) -> Result<(), DecodeError> {
        let block = &self.blocks[bi];
        let ps = block.page_size() as usize;
        let addr = page as u64 * ps as u64;
        let ahead = src.buffered();
        // The run ahead counts pages whose header is buffered; those whose data is too:
        let whole = (ahead.len() - ps) / (ps + 8) + 1;
        let run = page_run_ahead(ahead, addr, ps as u64, 256)
            .min(whole)
            .min(block.pages() - page);
        // Page k's data follows k records: k pages and k headers of 8 bytes.
        let parts: Vec<&[u8]> = (0..run)
            .map(|k| &ahead[k * (ps + 8)..k * (ps + 8) + ps])
            .collect();
        block.load_gathered(addr, &parts).map_err(|source| {
            DecodeError::new(
                src.offset(),
                DecodeErrorKind::GuestWrite {
                    what: "RAM page",
                    source,
                },
            )
        })?;
        src.consume(run * (ps + 8) - 8);
        for p in page..page + run {
            self.received.set(bi, p);
            self.xbzrle.note_full(bi, p);
            if let Some(pc) = &self.postcopy {
                pc.note_delivered(bi, p);
            }
            if let Some(staged) = &self.staged {
                staged.set(bi, p);
            }
        }
        self.normal_pages += run as u64;
        Ok(())
    }
}

impl Drop for RamLoader {
    fn drop(&mut self) {
        for (bi, block) in self.blocks.iter().enumerate() {
            if self.received.any(bi) {
                block.note_external_writes();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
    use std::sync::atomic::{AtomicBool, AtomicU64};

    use super::*;
    use crate::io::StreamWriter;
    use crate::outgoing::ram_save::{RamSaver, ZeroPages};
    use crate::status::RunState;
    use crate::test_support::{temp_path, FakeVmm};
    use crate::vmm::Vmm;

    /// The setup body and one pass of `vm`'s RAM, as the saver writes them, in a file.
    fn saved_pass(vm: &FakeVmm) -> std::path::PathBuf {
        let path = temp_path("ram");
        let file = std::fs::File::create(&path).unwrap();
        let mut w = StreamWriter::new(
            OwnedFd::from(file),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let mut saver = RamSaver::new(vm.ram_blocks().to_vec(), ZeroPages::Detect);
        saver.write_setup(&mut w).unwrap();
        let (sent, done) = saver.send_dirty(&mut w, None, None).unwrap();
        assert!(done);
        assert_eq!(sent.total(), vm.ram_blocks()[0].pages() as u64);
        w.with_buf(ram::put_eos).unwrap();
        w.flush().unwrap();
        path
    }

    fn source_of(path: &std::path::Path) -> FdSource {
        FdSource::new(OwnedFd::from(std::fs::File::open(path).unwrap()), 0)
    }

    #[test]
    fn what_the_saver_writes_the_loader_reads_back() {
        let vm = FakeVmm::new(64, RunState::Paused);
        for p in [0, 1, 33, 63] {
            vm.write_page(p, 0x40 + p as u8);
        }
        let path = saved_pass(&vm);
        let dst = FakeVmm::new(64, RunState::InMigrate);
        // A page the destination holds that the stream says is zero must be cleared.
        dst.write_page(2, 0xee);
        let mut loader = RamLoader::new(dst.ram_blocks().to_vec());
        let mut src = source_of(&path);
        loader.load_setup(&mut src).unwrap();
        loader.load_records(&mut src).unwrap();
        assert_eq!((loader.normal_pages, loader.zero_pages), (4, 60));
        drop(loader);
        assert!(dst.ram() == vm.ram(), "RAM differs after the load");
        let _ = std::fs::remove_file(path);
    }

    /// Into shared memory on tmpfs, runs of pages go from the read-ahead into the file
    /// with one write each; only pages with data are allocated.
    #[test]
    fn runs_of_pages_load_through_a_tmpfs_file() {
        let shm = std::path::Path::new("/dev/shm");
        if !shm.is_dir() {
            println!("skipped: no /dev/shm");
            return;
        }
        let vm = FakeVmm::new(64, RunState::Paused);
        let data: Vec<usize> = (3..40).chain([41, 50, 63]).collect();
        for &p in &data {
            vm.write_page(p, 0x40 + p as u8);
        }
        let path = saved_pass(&vm);
        let ps = vm.ram_blocks()[0].page_size() as usize;
        // A read-ahead that holds all of it, and one that ends runs mid-page and
        // mid-header.
        for capacity in [1 << 20, 3 * (ps + 8) + 100] {
            let mem = shm.join(format!("vmigrate-ram-load-{}", std::process::id()));
            let _ = std::fs::remove_file(&mem);
            let len = vm.ram_blocks()[0].len();
            let block = Arc::new(RamBlock::from_file("ram", &mem, len, 0, true).unwrap());
            assert!(block.loads_through_file());
            let mut loader = RamLoader::new(vec![block.clone()]);
            let file = std::fs::File::open(&path).unwrap();
            let mut src = FdSource::with_buffer(OwnedFd::from(file), 0, capacity);
            loader.load_setup(&mut src).unwrap();
            loader.load_records(&mut src).unwrap();
            assert_eq!(loader.normal_pages, data.len() as u64);
            drop(loader);
            use std::os::unix::fs::MetadataExt;
            let allocated = std::fs::metadata(&mem).unwrap().blocks() * 512;
            assert_eq!(
                allocated,
                (data.len() * ps) as u64,
                "pages that stay zero were allocated"
            );
            let mut got = vec![0u8; len as usize];
            block.read(0, &mut got);
            assert!(got == vm.ram(), "RAM differs after the load");
            let _ = std::fs::remove_file(mem);
        }
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_block_of_another_size_or_name_is_refused_with_its_offset() {
        let vm = FakeVmm::new(16, RunState::Paused);
        let path = saved_pass(&vm);
        let dst = FakeVmm::new(32, RunState::InMigrate);
        let mut loader = RamLoader::new(dst.ram_blocks().to_vec());
        let e = loader.load_setup(&mut source_of(&path)).unwrap_err();
        assert!(
            matches!(e.kind, DecodeErrorKind::BlockSizeMismatch { .. }),
            "{e}"
        );
        // The first block entry follows the 8-byte MEM_SIZE record.
        assert_eq!(e.offset, 8);
        // Cut inside the pages: the error says where the stream ended.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
        let dst = FakeVmm::new(16, RunState::InMigrate);
        let mut loader = RamLoader::new(dst.ram_blocks().to_vec());
        let mut src = source_of(&path);
        loader.load_setup(&mut src).unwrap();
        assert!(loader.load_records(&mut src).is_err());
        let _ = std::fs::remove_file(path);
    }
}
