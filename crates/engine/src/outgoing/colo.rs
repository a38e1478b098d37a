//! The COLO primary: once the first migration's stream is out, the source keeps
//! running and checkpoints its state to the secondary every `x-checkpoint-delay` ms.
//!
//! ```text
//! status device ─▶ colo; wait for CHECKPOINT_READY; run the VM
//! every x-checkpoint-delay ms (at once after the delay changed):
//!     ─▶ CHECKPOINT_REQUEST          ◀─ CHECKPOINT_REPLY
//!     stop the VM (run state colo)
//!     ─▶ VMSTATE_SEND, ram END section (pages dirtied since the last one), EOF,
//!        VMSTATE_SIZE n, n bytes of device state (FULL sections, EOF)
//!     ◀─ VMSTATE_RECEIVED            ◀─ VMSTATE_LOADED
//!     run the VM
//! x-colo-lost-heartbeat: status colo ─▶ completed, COLO_EXIT request, the VM runs alone
//! the secondary lost: COLO_EXIT error, then wait (status colo) for x-colo-lost-heartbeat
//! ```
//!
//! The primary's messages travel on the main channel, the secondary's come back on the
//! same connection (QEMU's return path without its thread). With `return-path`, the
//! return-path messages of the first migration come first on that connection, with no
//! SHUT after them (QEMU's secondary sends SHUT only once COLO is over): the return
//! path's reader ends at CHECKPOINT_READY, before the status leaves `device`.

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmigrate_stream::colo::ColoMessage;
use vmigrate_stream::section::Record;
use vmigrate_stream::DecodeError;

use crate::colo::{emit_exit, ColoMode, ExitReason};
use crate::io::{FdSource, StreamWriter, WriteError};
use crate::outgoing::ram_save::RamSaver;
use crate::outgoing::save::{encode_device_sections, send_ram_body, ColoHandover, SaveError};
use crate::shared::{SectionIds, Shared};
use crate::status::{MigrationStatus, RunState};
use crate::vmm::{DeviceState, Vmm, VmmError};

/// Why COLO ended on the primary other than by a failover request.
#[derive(Debug, thiserror::Error)]
pub enum ColoPrimaryError {
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("COLO message from the secondary: {0}")]
    Receive(#[from] DecodeError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error(transparent)]
    Save(#[from] SaveError),
}

/// Runs COLO from the end of the first migration (status `device`, VM stopped) to a
/// failover, which leaves the status `completed` and the VM running alone.
pub(crate) fn run(shared: &Shared, vmm: &dyn Vmm, h: ColoHandover) -> Result<(), SaveError> {
    let ColoHandover {
        mut w,
        mut saver,
        ids,
        devices,
        socket,
        ready_received,
    } = h;
    let control = vmm.control();
    let tracker = vmm.dirty_tracker();
    if let Err(e) = shared.transition(MigrationStatus::Device, MigrationStatus::Colo) {
        tracker.stop();
        return Err(SaveError::Status(e));
    }
    shared.colo.enter(ColoMode::Primary, &socket);
    let session = Session {
        shared,
        vmm,
        ids,
        devices: &devices,
    };
    let outcome = session.checkpoint_loop(&mut w, &mut saver, &socket, ready_received);
    tracker.stop();
    let reason = match &outcome {
        Ok(()) => ExitReason::Request,
        Err(e) => {
            shared.events.warn(&format!("COLO: {e}"));
            ExitReason::Error
        }
    };
    if reason == ExitReason::Error {
        emit_exit(&shared.events, ColoMode::Primary, reason);
        // QEMU's primary too waits for the heartbeat's verdict.
        shared.colo.wait_for_failover();
    }
    // The failover: completed first, then COLO_EXIT, as QEMU orders them.
    shared.transition(MigrationStatus::Colo, MigrationStatus::Completed)?;
    shared.colo.failover_done();
    if reason == ExitReason::Request {
        emit_exit(&shared.events, ColoMode::Primary, reason);
    }
    if !control.run_state().is_running() {
        control.vm_start();
    }
    Ok(())
}

/// What stays fixed through the COLO phase.
struct Session<'a> {
    shared: &'a Shared,
    vmm: &'a dyn Vmm,
    ids: SectionIds,
    devices: &'a [Arc<dyn DeviceState>],
}

impl Session<'_> {
    /// CHECKPOINT_READY, then checkpoints until a failover request (`Ok`) or an error.
    fn checkpoint_loop(
        &self,
        w: &mut StreamWriter,
        saver: &mut RamSaver,
        socket: &OwnedFd,
        ready_received: bool,
    ) -> Result<(), ColoPrimaryError> {
        let shared = self.shared;
        let fd = socket
            .try_clone()
            .map_err(|e| WriteError::Io(e.to_string()))?;
        let mut back = FdSource::new(fd, 0);
        let failed_over = |e: ColoPrimaryError| {
            if shared.colo.failover_requested() {
                Ok(())
            } else {
                Err(e)
            }
        };
        if !ready_received {
            if let Err(e) = ColoMessage::expect(&mut back, ColoMessage::CheckpointReady) {
                return failed_over(e.into());
            }
        }
        self.vmm.control().vm_start();
        // As QEMU's timer does, the delay runs from the start of the last checkpoint
        // (a checkpoint longer than the delay is followed by the next at once).
        let mut last = Instant::now();
        loop {
            let delay =
                Duration::from_millis(u64::from(shared.params_snapshot().x_checkpoint_delay()));
            if shared.colo.wait_for_checkpoint(last + delay) {
                return Ok(());
            }
            last = Instant::now();
            if let Err(e) = self.checkpoint(w, saver, &mut back) {
                return failed_over(e);
            }
        }
    }

    /// One checkpoint transaction.
    fn checkpoint(
        &self,
        w: &mut StreamWriter,
        saver: &mut RamSaver,
        back: &mut FdSource,
    ) -> Result<(), ColoPrimaryError> {
        let (shared, vmm, ids, devices) = (self.shared, self.vmm, self.ids, self.devices);
        w.with_buf(|out| ColoMessage::CheckpointRequest.encode(out))?;
        w.flush()?;
        ColoMessage::expect(back, ColoMessage::CheckpointReply)?;
        if shared.colo.failover_requested() {
            return Ok(());
        }
        let control = vmm.control();
        let stats = shared.stats();
        let start_bytes = stats.transferred.load(Ordering::Relaxed);
        let stopped = Instant::now();
        control.vm_stop(RunState::Colo);
        // The device state first, into a buffer (its size goes before it).
        let mut state = Vec::new();
        encode_device_sections(&mut state, devices, &ids, RunState::Running)?;
        Record::Eof.encode(&mut state);
        // RAM: what the guest dirtied since the last checkpoint, as one END section.
        saver.sync(vmm.dirty_tracker())?;
        stats.dirty_sync_count.fetch_add(1, Ordering::Relaxed);
        w.with_buf(|out| {
            ColoMessage::VmstateSend.encode(out);
            Record::End(ids.ram).encode(out);
        })?;
        let (sent, _) = send_ram_body(shared, w, saver, Some(ids.ram), None)?;
        w.with_buf(|out| {
            Record::Eof.encode(out);
            ColoMessage::encode_size(out, state.len() as u64);
        })?;
        w.put(&state)?;
        w.flush()?;
        ColoMessage::expect(back, ColoMessage::VmstateReceived)?;
        ColoMessage::expect(back, ColoMessage::VmstateLoaded)?;
        control.vm_start();
        let bytes = stats.transferred.load(Ordering::Relaxed) - start_bytes;
        shared
            .colo
            .record_checkpoint(stopped.elapsed(), bytes, sent.total());
        Ok(())
    }
}
