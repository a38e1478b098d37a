//! The COLO secondary: once the first migration is loaded, the destination stays
//! paused (run state `colo`) holding the primary's last complete checkpoint, and takes
//! over from it on a failover.
//!
//! ```text
//! status active ─▶ colo; ─▶ CHECKPOINT_READY
//! each checkpoint:
//!     ◀─ CHECKPOINT_REQUEST   ─▶ CHECKPOINT_REPLY
//!     ◀─ VMSTATE_SEND, ram END section(s) into the staging copy, EOF,
//!        VMSTATE_SIZE n, n bytes of device state (kept in memory)
//!     ─▶ VMSTATE_RECEIVED
//!     apply: the device state (put back if it fails), then the staged pages into RAM
//!     ─▶ VMSTATE_LOADED
//! x-colo-lost-heartbeat: status colo ─▶ completed, COLO_EXIT request, the guest runs
//! the primary lost: COLO_EXIT error, then wait (status colo) for x-colo-lost-heartbeat
//! ```
//!
//! Pages of a checkpoint land in staging blocks (anonymous memory the size of guest
//! RAM, touched only where pages arrive); guest RAM changes only once the whole
//! checkpoint is in and its device state loaded, so a failover never resumes from a
//! half-received or half-applied one. Unlike
//! QEMU's secondary, which runs its own copy of the guest between checkpoints (and
//! compares network output with `colo-compare`), vmigrate's stays paused.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use vmigrate_stream::colo::ColoMessage;
use vmigrate_stream::ram::RAM_IDSTR;
use vmigrate_stream::section::{decode_footer, Record};
use vmigrate_stream::{DecodeError, DecodeErrorKind, SliceSource, Source};

use crate::colo::{emit_exit, ColoMode, ExitReason, MAX_DEVICE_STATE};
use crate::incoming::load::{load_device_section, LoadError};
use crate::incoming::pages::ReceivedPages;
use crate::incoming::ram_load::RamLoader;
use crate::io::FdSource;
use crate::memory::{MemoryError, RamBlock};
use crate::shared::Shared;
use crate::status::{MigrationStatus, RunState, StatusError};
use crate::vmm::{DeviceState, Vmm, VmmError};

/// Why COLO ended on the secondary other than by a failover request.
#[derive(Debug, thiserror::Error)]
pub enum ColoSecondaryError {
    #[error(transparent)]
    Stream(#[from] DecodeError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("cannot answer the primary: {0}")]
    Reply(#[source] std::io::Error),
    #[error("cannot map the staging copy of guest RAM: {0}")]
    Staging(#[from] MemoryError),
    #[error("cannot keep the device state to undo a failed checkpoint: {0}")]
    Backup(#[from] VmmError),
    #[error(transparent)]
    Status(#[from] StatusError),
}

/// What the first migration's load hands the COLO phase.
pub(crate) struct Secondary<'a> {
    pub shared: &'a Shared,
    pub vmm: &'a dyn Vmm,
    /// The main stream, read on from where the first migration ended.
    pub src: &'a mut FdSource,
    /// The connection, for the answers and for a failover to shut down.
    pub socket: Arc<OwnedFd>,
    /// The `ram` section's id in the first migration.
    pub ram_section: Option<u32>,
    /// The block of the first migration's last page record.
    pub ram_block: Option<usize>,
    /// Whether the destination would have started the guest (QEMU ignores `-S` here).
    pub autostart: bool,
}

/// Runs COLO from the end of the first migration (status `active`) to a failover,
/// which leaves the status `completed` and the guest running from the last complete
/// checkpoint.
pub(crate) fn run(s: Secondary<'_>) -> Result<(), ColoSecondaryError> {
    let shared = s.shared;
    let control = s.vmm.control();
    shared.transition(MigrationStatus::Active, MigrationStatus::Colo)?;
    shared.colo.enter(ColoMode::Secondary, &s.socket);
    control.set_run_state(RunState::Colo);
    let autostart = s.autostart;
    let outcome = checkpoint_loop(s);
    let reason = match outcome {
        Ok(()) => ExitReason::Request,
        Err(e) => {
            shared.events.warn(&format!("COLO: {e}"));
            ExitReason::Error
        }
    };
    if reason == ExitReason::Error {
        emit_exit(&shared.events, ColoMode::Secondary, reason);
        shared.colo.wait_for_failover();
    }
    shared.transition(MigrationStatus::Colo, MigrationStatus::Completed)?;
    shared.colo.failover_done();
    if reason == ExitReason::Request {
        emit_exit(&shared.events, ColoMode::Secondary, reason);
    }
    if !autostart {
        shared
            .events
            .warn("\"-S\" qemu option will be ignored in secondary side");
    }
    control.vm_start();
    Ok(())
}

/// CHECKPOINT_READY, then checkpoints until a failover request (`Ok`) or an error.
fn checkpoint_loop(s: Secondary<'_>) -> Result<(), ColoSecondaryError> {
    let Secondary {
        shared,
        vmm,
        src,
        socket,
        ram_section,
        ram_block,
        ..
    } = s;
    let failed_over = |e: ColoSecondaryError| {
        if shared.colo.failover_requested() {
            Ok(())
        } else {
            Err(e)
        }
    };
    let mut back = std::fs::File::from(socket.try_clone().map_err(ColoSecondaryError::Reply)?);
    let mut staging = match Staging::new(vmm.ram_blocks(), ram_block) {
        Ok(s) => s,
        Err(e) => return failed_over(e),
    };
    if let Err(e) = reply(&mut back, ColoMessage::CheckpointReady) {
        return failed_over(e);
    }
    let devices = vmm.devices();
    let mut receiver = Checkpoint {
        shared,
        devices: &devices,
        ram_section,
        back: &mut back,
    };
    loop {
        match receiver.receive_and_apply(&mut *src, &mut staging) {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) => return failed_over(e),
        }
    }
}

fn reply(back: &mut std::fs::File, msg: ColoMessage) -> Result<(), ColoSecondaryError> {
    let mut out = Vec::with_capacity(4);
    msg.encode(&mut out);
    back.write_all(&out).map_err(ColoSecondaryError::Reply)
}

/// The staging copy of guest RAM and the loader that fills it.
struct Staging {
    guest: Vec<Arc<RamBlock>>,
    blocks: Vec<Arc<RamBlock>>,
    loader: RamLoader,
    /// The pages the checkpoint under way carried.
    pages: Arc<ReceivedPages>,
}

impl Staging {
    fn new(guest: &[Arc<RamBlock>], block: Option<usize>) -> Result<Self, ColoSecondaryError> {
        let blocks = guest
            .iter()
            .map(|b| {
                let s = RamBlock::anonymous(b.idstr(), b.len(), b.gpa())?;
                // Pages left from an earlier checkpoint are not zero: a ZERO record must
                // clear them.
                s.note_external_writes();
                Ok(Arc::new(s))
            })
            .collect::<Result<Vec<_>, MemoryError>>()?;
        let pages = Arc::new(ReceivedPages::new(&blocks));
        // One loader for the whole session: a checkpoint's first page may CONTINUE
        // the block of the last one's (or of the first migration's last page).
        let mut loader = RamLoader::new(blocks.clone());
        loader.continue_from(block);
        loader.note_pages_in(pages.clone());
        Ok(Self {
            guest: guest.to_vec(),
            blocks,
            loader,
            pages,
        })
    }

    /// Copies every staged page into guest RAM, in runs of contiguous pages. Returns
    /// the pages copied.
    fn flush(&self) -> u64 {
        const RUN: usize = 256;
        let mut copied = 0;
        let mut buf = Vec::new();
        for (bi, (guest, staged)) in self.guest.iter().zip(&self.blocks).enumerate() {
            let ps = guest.page_size() as usize;
            let pages = guest.pages();
            let mut p = 0;
            while p < pages {
                if !self.pages.take(bi, p) {
                    p += 1;
                    continue;
                }
                let mut run = 1;
                while run < RUN && p + run < pages && self.pages.take(bi, p + run) {
                    run += 1;
                }
                let offset = p as u64 * ps as u64;
                buf.resize(run * ps, 0);
                staged.read(offset, &mut buf);
                guest.write(offset, &buf);
                copied += run as u64;
                p += run;
            }
        }
        copied
    }

    /// Forgets the pages of a checkpoint that will not be applied.
    fn discard(&self) {
        for (bi, b) in self.guest.iter().enumerate() {
            for p in 0..b.pages() {
                self.pages.take(bi, p);
            }
        }
    }
}

/// One checkpoint on the secondary.
struct Checkpoint<'a> {
    shared: &'a Shared,
    devices: &'a [Arc<dyn DeviceState>],
    ram_section: Option<u32>,
    back: &'a mut std::fs::File,
}

impl Checkpoint<'_> {
    /// Receives one checkpoint and applies it. Returns `false` when a failover was
    /// asked for before it started.
    fn receive_and_apply(
        &mut self,
        src: &mut FdSource,
        staging: &mut Staging,
    ) -> Result<bool, ColoSecondaryError> {
        let at = src.offset();
        let msg = ColoMessage::decode(src)?;
        if msg != ColoMessage::CheckpointRequest {
            return Err(DecodeError::new(
                at,
                DecodeErrorKind::Invalid {
                    what: "COLO message",
                    detail: format!("Got unknown COLO message: {}", msg.value()),
                },
            )
            .into());
        }
        if self.shared.colo.failover_requested() {
            return Ok(false);
        }
        reply(self.back, ColoMessage::CheckpointReply)?;
        ColoMessage::expect(src, ColoMessage::VmstateSend)?;
        let started = src.offset();
        let loaded = self.receive_ram(src, staging);
        if let Err(e) = loaded {
            staging.discard();
            return Err(e);
        }
        let size = match ColoMessage::decode_size(src, MAX_DEVICE_STATE) {
            Ok(n) => n as usize,
            Err(e) => {
                staging.discard();
                return Err(e.into());
            }
        };
        let mut state = vec![0u8; size];
        if let Err(e) = src.fill(&mut state, "COLO device state") {
            staging.discard();
            return Err(e.into());
        }
        let bytes = src.offset() - started;
        reply(self.back, ColoMessage::VmstateReceived)?;
        let applying = Instant::now();
        let pages = self.apply(staging, &state, src.offset() - size as u64)?;
        reply(self.back, ColoMessage::VmstateLoaded)?;
        self.shared
            .colo
            .record_checkpoint(applying.elapsed(), bytes, pages);
        Ok(true)
    }

    /// The checkpoint's live part: `ram` END (or PART) sections into the staging copy,
    /// up to EOF. Nothing else belongs there.
    fn receive_ram(
        &self,
        src: &mut FdSource,
        staging: &mut Staging,
    ) -> Result<(), ColoSecondaryError> {
        loop {
            let at = src.offset();
            match Record::decode(src)? {
                Record::Eof => return Ok(()),
                Record::Part(id) | Record::End(id) if Some(id) == self.ram_section => {
                    staging.loader.load_records(src)?;
                    decode_footer(src, id, RAM_IDSTR)?;
                }
                Record::Part(id) | Record::End(id) => {
                    return Err(DecodeError::new(at, DecodeErrorKind::UnknownSectionId(id)).into())
                }
                other => {
                    return Err(DecodeError::new(
                        at,
                        DecodeErrorKind::Invalid {
                            what: "COLO checkpoint",
                            detail: format!(
                                "{} where only ram sections and EOF may come",
                                record_name(&other)
                            ),
                        },
                    )
                    .into())
                }
            }
        }
    }

    /// The device state, then the staged pages into guest RAM. A device state that
    /// does not load puts the devices back and leaves guest RAM alone (the devices are
    /// loaded first because only their load can fail; copying pages cannot). Returns
    /// the pages applied.
    fn apply(
        &self,
        staging: &Staging,
        state: &[u8],
        state_at: u64,
    ) -> Result<u64, ColoSecondaryError> {
        let saved = self
            .devices
            .iter()
            .map(|d| d.save())
            .collect::<Result<Vec<_>, _>>()?;
        if let Err(e) = self.load_devices(state, state_at) {
            staging.discard();
            for (dev, body) in self.devices.iter().zip(&saved) {
                let mut src = SliceSource::new(body);
                let mut dyn_src: &mut dyn Source = &mut src;
                if let Err(again) = dev.load(&mut dyn_src, dev.version()) {
                    self.shared.events.warn(&format!(
                        "COLO: device '{}' could not be put back: {again}",
                        dev.idstr()
                    ));
                }
            }
            return Err(e);
        }
        Ok(staging.flush())
    }

    fn load_devices(&self, state: &[u8], state_at: u64) -> Result<(), ColoSecondaryError> {
        let mut src = OffsetSource {
            inner: SliceSource::new(state),
            base: state_at,
        };
        let mut sections = std::collections::HashMap::new();
        let mut runstate = None;
        loop {
            let at = src.offset();
            match Record::decode(&mut src)? {
                Record::Eof => return Ok(()),
                Record::Full(s) | Record::Start(s) => load_device_section(
                    s,
                    &mut src,
                    at,
                    self.devices,
                    &mut sections,
                    &mut runstate,
                )?,
                other => {
                    return Err(DecodeError::new(
                        at,
                        DecodeErrorKind::Invalid {
                            what: "COLO device state",
                            detail: format!(
                                "{} where only FULL sections and EOF may come",
                                record_name(&other)
                            ),
                        },
                    )
                    .into())
                }
            }
        }
    }
}

/// A record's kind, for the errors.
fn record_name(r: &Record) -> &'static str {
    match r {
        Record::Eof => "EOF",
        Record::Start(_) => "a START section",
        Record::Part(_) => "a PART section",
        Record::End(_) => "an END section",
        Record::Full(_) => "a FULL section",
        Record::Command(_) => "a command",
    }
}

/// The device state buffer, read with the stream offsets it arrived at.
struct OffsetSource<'a> {
    inner: SliceSource<'a>,
    base: u64,
}

impl Source for OffsetSource<'_> {
    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), DecodeError> {
        self.inner.fill(buf, what).map_err(|mut e| {
            e.offset += self.base;
            e
        })
    }

    fn offset(&self) -> u64 {
        self.base + self.inner.offset()
    }

    fn peek_u8(&mut self) -> Result<Option<u8>, DecodeError> {
        self.inner.peek_u8().map_err(|mut e| {
            e.offset += self.base;
            e
        })
    }
}
