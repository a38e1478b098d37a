//! The `background-snapshot` session: RAM as it was at one moment, saved while the VM
//! keeps running.
//!
//! ```text
//! connect ─▶ header, configuration, ram START (setup)                      [setup]
//!         ─▶ stop the VM, device FULL sections + EOF + vmdesc into a buffer,
//!            write-protect guest RAM, resume the VM                        [active]
//!         ─▶ ram PART sections: every page once, in order; a page the guest
//!            writes before the walk reached it is saved first, then freed
//!         ─▶ the buffered device state                                     [completed]
//! ```
//!
//! The stream is QEMU's: the device state taken at the start follows the RAM, and no
//! ram END section is written. As in QEMU, `max-bandwidth` does not apply. There is no dirty tracking and no second pass: a page
//! is protected until it is saved (its bytes copied into the writer's buffer), then
//! its protection is lifted, which also wakes a writer waiting on it. The guest's
//! writes to pages not saved yet wait only for that page.
//!
//! With `mapped-ram` the setup section lays the blocks out as a mapped-ram file, the
//! walk and the copy-before-write path write each page at its offset in the file (a
//! page's protection goes once its write returned), the RAM PART sections carry only
//! EOS, and the page bitmaps are written once the walk is over, before the device
//! state. QEMU 10.0 accepts the combination but never writes the bitmaps (it writes
//! them in the ram END section, which a background snapshot does not have), so its
//! own files load with every page zero; vmigrate's files carry them and load in QEMU.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmigrate_stream::ram::{put_eos, put_page_header, put_zero_page, FLAG_PAGE};
use vmigrate_stream::section::{encode_footer, Record};
use vmigrate_stream::{header, vmdesc};

use vmigrate_stream::config::Configuration;
use vmigrate_stream::devices::GlobalState;

use crate::channels::transport::Channel;
use crate::io::{StreamWriter, WriteError};
use crate::mapped_ram::{MappedRamWriter, WriterConfig};
use crate::memory::RamBlock;
use crate::outgoing::ram_save::{RamSaver, ZeroPages};
use crate::outgoing::save::{encode_device_sections, ram_start, SaveError};
use crate::shared::{SectionIds, Shared};
use crate::status::{MigrationStatus, RunState};
use crate::uffd_wp::{WpError, WriteProtect};
use crate::vmm::{DirtyBitmap, Vmm, VmmError};

/// The page size of RAM records (QEMU's x86 target page).
const TARGET_PAGE: u64 = 4096;
/// Pages the walk saves between two looks at the guest's write faults.
const WALK_CHUNK: usize = 64;
/// How long one RAM PART section runs before the next begins.
const SECTION_SLICE: Duration = Duration::from_millis(50);

impl From<WpError> for SaveError {
    fn from(e: WpError) -> Self {
        SaveError::Vmm(VmmError::DirtyTracking(e.to_string()))
    }
}

/// Guest RAM write-protected for the snapshot; unregistered (waking every waiter)
/// when dropped.
struct Protected<'a> {
    wp: WriteProtect,
    blocks: &'a [Arc<RamBlock>],
    registered: usize,
}

impl Drop for Protected<'_> {
    fn drop(&mut self) {
        for b in &self.blocks[..self.registered] {
            let _ = self.wp.protect(b.host_addr(), b.len(), false);
            let _ = self.wp.unregister(b.host_addr(), b.len());
        }
    }
}

impl<'a> Protected<'a> {
    /// Registers every block for write-protect faults, protecting nothing yet: done
    /// while the VM still runs, so that the stop lasts only for the protection.
    fn register(blocks: &'a [Arc<RamBlock>]) -> Result<Self, WpError> {
        let mut p = Protected {
            wp: WriteProtect::open()?,
            blocks,
            registered: 0,
        };
        for b in blocks {
            if !p.wp.protects_unpopulated() {
                populate_read(b);
            }
            p.wp.register(b.host_addr(), b.len())?;
            p.registered += 1;
        }
        Ok(p)
    }

    /// Protects every registered block: the snapshot's moment.
    fn protect_all(&self) -> Result<(), WpError> {
        for b in self.blocks {
            self.wp.protect(b.host_addr(), b.len(), true)?;
        }
        Ok(())
    }
}

/// Reads one byte of every page so each one is mapped and can be protected.
fn populate_read(b: &RamBlock) {
    let ps = b.page_size();
    let mut byte = [0u8; 1];
    let mut off = 0;
    while off < b.len() {
        b.read(off, &mut byte);
        off += ps;
    }
}

/// The walk's state: pages still to save, and the block of the previous record.
struct Walk<'a> {
    blocks: &'a [Arc<RamBlock>],
    todo: Vec<DirtyBitmap>,
    last_block: Option<usize>,
    zero: u64,
    normal: u64,
    scratch: Vec<u8>,
    /// Whether pages of zeroes go as ZERO records (else as data).
    detect_zero: bool,
    /// mapped-ram: pages go to their file offsets instead of the stream.
    mapped: Option<MappedRamWriter>,
}

impl Walk<'_> {
    /// Saves page `page` of block `bi` (a block page: one or more target pages) if it
    /// is still to be saved. Returns whether it was.
    fn save_page(
        &mut self,
        w: &mut StreamWriter,
        bi: usize,
        page: usize,
    ) -> Result<bool, WriteError> {
        if !self.todo[bi].test_and_clear(page) {
            return Ok(false);
        }
        if let Some(m) = &mut self.mapped {
            m.queue(bi, page)?;
            return Ok(true);
        }
        let b = &self.blocks[bi];
        let ps = b.page_size();
        let base = page as u64 * ps;
        let mut off = base;
        while off < base + ps && off < b.len() {
            let name = (self.last_block != Some(bi)).then(|| b.idstr().to_string());
            self.last_block = Some(bi);
            if self.detect_zero && b.is_zero(off, TARGET_PAGE as usize) {
                w.with_buf(|out| put_zero_page(out, off, name.as_deref()))?;
                self.zero += 1;
            } else {
                self.scratch.resize(TARGET_PAGE as usize, 0);
                b.read(off, &mut self.scratch);
                let data = &self.scratch;
                w.with_buf(|out| {
                    put_page_header(out, off, FLAG_PAGE, name.as_deref());
                    out.extend_from_slice(data);
                })?;
                self.normal += 1;
            }
            off += TARGET_PAGE;
        }
        Ok(true)
    }

    /// Makes every page saved so far durable in its place: the stream buffer already
    /// holds them; a mapped-ram file gets its queued pages written. After this their
    /// protection may go.
    fn settle(&mut self) -> Result<(), WriteError> {
        match &mut self.mapped {
            Some(m) => m.drain(),
            None => Ok(()),
        }
    }
}

/// Runs one background snapshot over `channel` to its end.
pub(crate) fn run(shared: &Shared, vmm: &dyn Vmm, channel: &Channel) -> Result<(), SaveError> {
    let params = shared.params_snapshot();
    let stats = shared.stats();
    let cancel = shared.cancel_flag();
    let fd = channel
        .fd
        .try_clone()
        .map_err(|e| WriteError::Io(e.to_string()))?;
    // QEMU's background snapshot never waits on `max-bandwidth`: it writes as fast
    // as the channel takes the stream.
    let unlimited = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut w = StreamWriter::new(fd, stats.transferred.clone(), unlimited, cancel.clone());
    w.set_position(channel.base_offset);
    let blocks = vmm.ram_blocks().to_vec();
    let zero_pages = if params.zero_page_detection() == crate::options::ZeroPageDetection::None {
        ZeroPages::SendAsData
    } else {
        ZeroPages::Detect
    };
    let detect_zero = matches!(zero_pages, ZeroPages::Detect);
    let mapped_ram = shared.caps_snapshot().mapped_ram();
    let mut setup_saver = RamSaver::new(blocks.clone(), zero_pages);
    if mapped_ram {
        setup_saver.use_mapped_layout();
    }
    stats.page_size.store(TARGET_PAGE, Ordering::Relaxed);
    stats
        .total_ram
        .store(setup_saver.total_bytes(), Ordering::Relaxed);
    let devices = vmm.devices();
    let ids = SectionIds::new(devices.len());
    let config = Configuration {
        machine: vmm.machine_name().to_string(),
        target_page_bits: None,
        capabilities: if mapped_ram {
            vec!["mapped-ram".to_string()]
        } else {
            vec![]
        },
        uuid: None,
    };
    w.with_buf(|out| {
        header::encode_header(out);
        config.encode(out);
        ram_start(&ids).encode(out);
    })?;
    let regions = setup_saver.write_setup(&mut w)?;
    w.with_buf(|out| encode_footer(out, ids.ram))?;
    w.flush()?;
    drop(setup_saver);
    let mapped = if mapped_ram {
        let config = WriterConfig {
            threads: 0,
            direct_io: params.direct_io(),
            detect_zero,
            limit: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        };
        Some(MappedRamWriter::start(
            &channel.fd,
            blocks.clone(),
            regions,
            config,
            stats.clone(),
            cancel.clone(),
        )?)
    } else {
        None
    };

    // The moment of the snapshot: the VM stops, its device state is kept, RAM is
    // protected, and the VM runs again.
    let protected = Protected::register(&blocks)?;
    let control = vmm.control();
    let before = control.run_state();
    let stop_at = Instant::now();
    control.vm_stop(RunState::Paused);
    let taken = (|| -> Result<Vec<u8>, SaveError> {
        let mut state = Vec::new();
        let mut descriptions =
            // As QEMU, `globalstate` holds the run state from before the stop: a
            // running VM's snapshot starts running where it is loaded.
            encode_device_sections(&mut state, &devices, &ids, before)?;
        Record::Eof.encode(&mut state);
        descriptions.push(GlobalState::describe());
        let desc = vmdesc::build(Some(config.describe()), TARGET_PAGE, descriptions);
        vmdesc::encode(&mut state, &desc);
        protected.protect_all()?;
        Ok(state)
    })();
    if before.is_running() {
        control.vm_start();
    } else {
        control.set_run_state(before);
    }
    let device_state = taken?;
    stats
        .downtime_ms
        .store(stop_at.elapsed().as_millis() as u64, Ordering::Relaxed);
    stats
        .setup_time_ms
        .store(stats.elapsed_ms(), Ordering::Relaxed);
    shared
        .transition(MigrationStatus::Setup, MigrationStatus::Active)
        .map_err(|e| {
            if e.current == MigrationStatus::Cancelling {
                SaveError::Cancelled
            } else {
                SaveError::Status(e)
            }
        })?;

    let mut walk = Walk {
        blocks: &blocks,
        todo: blocks
            .iter()
            .map(|b| DirtyBitmap::all_set(b.pages()))
            .collect(),
        last_block: None,
        zero: 0,
        normal: 0,
        scratch: Vec::new(),
        detect_zero,
        mapped,
    };
    let total_pages: u64 = blocks.iter().map(|b| b.pages() as u64).sum();
    let mut left = total_pages;
    let mut faults = Vec::new();
    let mut cursor = (0usize, 0usize);
    while left > 0 {
        if cancel.load(Ordering::Relaxed) {
            return Err(SaveError::Cancelled);
        }
        w.with_buf(|out| Record::Part(ids.ram).encode(out))?;
        walk.last_block = None;
        let slice_end = Instant::now() + SECTION_SLICE;
        while left > 0 && Instant::now() < slice_end {
            // Writes waiting on a page come first.
            faults.clear();
            protected.wp.read_faults(Duration::ZERO, &mut faults)?;
            let mut faulted = Vec::with_capacity(faults.len());
            for &addr in &faults {
                let Some((bi, page)) = locate(&blocks, addr) else {
                    continue;
                };
                if walk.save_page(&mut w, bi, page)? {
                    left -= 1;
                }
                faulted.push((bi, page));
            }
            walk.settle()?;
            for (bi, page) in faulted {
                let b = &blocks[bi];
                let ps = b.page_size();
                protected
                    .wp
                    .protect(b.host_addr() + page as u64 * ps, ps, false)?;
            }
            // Then the next pages of the walk.
            let mut freed: Option<(usize, usize, usize)> = None;
            let mut saved = 0;
            while saved < WALK_CHUNK && cursor.0 < blocks.len() {
                let (bi, from) = cursor;
                let Some(page) = walk.todo[bi].next_set(from) else {
                    cursor = (bi + 1, 0);
                    if freed.is_some() {
                        break;
                    }
                    continue;
                };
                if freed.is_some_and(|(fb, _, _)| fb != bi) {
                    break;
                }
                walk.save_page(&mut w, bi, page)?;
                left -= 1;
                saved += 1;
                cursor = (bi, page + 1);
                freed = Some(match freed {
                    Some((fb, first, _)) => (fb, first, page),
                    None => (bi, page, page),
                });
            }
            // The pages' bytes are in the writer's buffer (or the file): their
            // protection goes (a page in between saved earlier for a fault is
            // unprotected already).
            walk.settle()?;
            if let Some((bi, first, last)) = freed {
                let b = &blocks[bi];
                let ps = b.page_size();
                protected.wp.protect(
                    b.host_addr() + first as u64 * ps,
                    (last - first + 1) as u64 * ps,
                    false,
                )?;
            }
            stats
                .remaining
                .store(left.saturating_mul(TARGET_PAGE), Ordering::Relaxed);
        }
        w.with_buf(|out| {
            put_eos(out);
            encode_footer(out, ids.ram);
        })?;
        w.flush()?;
        if walk.mapped.is_none() {
            stats.normal.store(walk.normal, Ordering::Relaxed);
            stats.duplicate.store(walk.zero, Ordering::Relaxed);
        }
    }
    drop(protected);
    if let Some(mut m) = walk.mapped.take() {
        m.write_bitmaps()?;
    }
    w.put(&device_state)?;
    w.flush()?;
    stats.remaining.store(0, Ordering::Relaxed);
    stats
        .precopy_bytes
        .store(stats.transferred.load(Ordering::Relaxed), Ordering::Relaxed);
    Ok(())
}

/// The block and block page of a faulting address.
fn locate(blocks: &[Arc<RamBlock>], addr: u64) -> Option<(usize, usize)> {
    blocks.iter().enumerate().find_map(|(i, b)| {
        let start = b.host_addr();
        (addr >= start && addr < start + b.len())
            .then(|| (i, ((addr - start) / b.page_size()) as usize))
    })
}

/// QEMU's checks of the host before `background-snapshot` can be on: userfaultfd
/// write-protection in the kernel, then on every RAM block. The error is QEMU's text.
pub(crate) fn host_check(blocks: &[Arc<RamBlock>]) -> Result<(), &'static str> {
    if crate::uffd_wp::available().is_err() {
        return Err("Background-snapshot is not supported by host kernel");
    }
    let ranges: Vec<(u64, u64)> = blocks.iter().map(|b| (b.host_addr(), b.len())).collect();
    if crate::uffd_wp::compatible(&ranges).is_err() {
        return Err("Background-snapshot is not compatible with guest memory configuration");
    }
    Ok(())
}
