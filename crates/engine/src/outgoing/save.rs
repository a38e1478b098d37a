//! The outgoing migration: the precopy session that runs on its own thread.
//!
//! ```text
//! connect ─▶ header, configuration, ram START (setup), first dirty sync   [setup]
//!         ─▶ ram PART sections until the remaining data fits the downtime  [active]
//!         ─▶ stop the VM, [pre-switchover,] final sync, SWITCHOVER_START,
//!            ram END, device FULL sections, EOF, vmdesc                   [device]
//!         ─▶ completed │ failed │ cancelled
//! ```
//!
//! With `postcopy-ram` the return path is always opened and POSTCOPY_ADVISE follows
//! PING(1); after `migrate-start-postcopy` the next decision point hands the session to
//! [`crate::outgoing::postcopy`] instead of completing it here.
//!
//! In mode `cpr-reboot` the VM is stopped before the header is written, so every pass
//! runs on a stopped VM.
//!
//! With `x-colo` the session does not complete: once the stream is out it hands its
//! writer and RAM saver over to [`crate::outgoing::colo`], which checkpoints to the
//! secondary until a failover.
//!
//! The VM is resumed on every error path after it was stopped, if it ran before.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmigrate_stream::command::Command;
use vmigrate_stream::config::Configuration;
use vmigrate_stream::devices::{GlobalState, GLOBALSTATE_IDSTR, GLOBALSTATE_VERSION};
use vmigrate_stream::ram::{RAM_IDSTR, RAM_SECTION_VERSION};
use vmigrate_stream::section::{encode_footer, Record, SectionId};
use vmigrate_stream::{header, vmdesc};

use crate::channels::return_path::{ReturnPath, ReturnPathError};
use crate::channels::transport::Channel;
use crate::channels::transport::{self, Address};
use crate::compress::Method;
use crate::io::{StreamWriter, WriteError};
use crate::options::MigMode;
use crate::outgoing::multifd_send::{ChannelConfig, MultifdSender, ZeroDetection};
use crate::outgoing::postcopy;
use crate::outgoing::ram_save::{RamSaveError, RamSaver, ZeroPages, ITERATION_SLICE};
use crate::outgoing::recover;
use crate::outgoing::throttle::{AutoConverge, DirtyLimitTrigger, SyncPeriod};
use crate::shared::{SectionIds, Shared};
use crate::status::{MigrationStatus, RunState, StatusError};
use crate::vmm::{Vmm, VmmError};

/// Why an outgoing migration ended without completing.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error("migration was cancelled")]
    Cancelled,
    /// `return-path` is on, but the channel cannot carry one (not a socket).
    #[error("Unable to open return-path for postcopy")]
    ReturnPathUnavailable,
    #[error(transparent)]
    ReturnPath(#[from] ReturnPathError),
    #[error(transparent)]
    Status(#[from] StatusError),
    #[error(transparent)]
    Postcopy(#[from] postcopy::PostcopyError),
    #[error(transparent)]
    XbzrleCache(#[from] crate::outgoing::xbzrle_cache::XbzrleCacheError),
    /// `x-colo` over a channel the secondary cannot answer on.
    #[error("COLO needs a socket: the secondary answers on the migration's connection")]
    ColoNeedsSocket,
}

impl From<RamSaveError> for SaveError {
    fn from(e: RamSaveError) -> Self {
        match e {
            RamSaveError::Write(w) => SaveError::Write(w),
            RamSaveError::Vmm(v) => SaveError::Vmm(v),
        }
    }
}

/// How long the source waits for the destination's SHUT after the last byte.
const RETURN_PATH_CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Puts the VM back as it was when dropped, unless disarmed: whatever fails after
/// the migration stopped the VM, a VM that was running runs again, and one that was
/// paused goes back from `finish-migrate` to its old run state (as QEMU does).
struct ResumeGuard<'a> {
    vmm: &'a dyn Vmm,
    before: RunState,
    armed: bool,
}

impl Drop for ResumeGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        restore_run_state(self.vmm, self.before);
    }
}

/// After a migration that failed with the VM stopped (`finish-migrate`, or
/// `postmigrate` when the failure showed only at the end): a VM that was running runs
/// again; one that was not goes back to `before`.
pub(crate) fn restore_run_state(vmm: &dyn Vmm, before: RunState) {
    let control = vmm.control();
    if before.is_running() {
        control.vm_start();
    } else if !control.run_state().is_running() {
        control.set_run_state(before);
    }
}

/// The START record of the `ram` section, which opens RAM's setup.
pub(crate) fn ram_start(ids: &SectionIds) -> Record {
    Record::Start(SectionId {
        section_id: ids.ram,
        idstr: RAM_IDSTR.into(),
        instance_id: 0,
        version_id: RAM_SECTION_VERSION,
    })
}

/// Runs one outgoing precopy migration over `channel` to its end; with `x-colo`, to
/// the end of its stream, returning what COLO goes on with.
pub(crate) fn run(
    shared: &Shared,
    vmm: &dyn Vmm,
    channel: &Channel,
    addr: &Address,
) -> Result<Option<ColoHandover>, SaveError> {
    let params = shared.params_snapshot();
    let caps = shared.caps_snapshot();
    let stats = shared.stats();
    let cancel = shared.cancel_flag();
    if caps.x_colo() && !channel.is_socket {
        return Err(SaveError::ColoNeedsSocket);
    }
    let fd = channel
        .fd
        .try_clone()
        .map_err(|e| WriteError::Io(e.to_string()))?;
    let mut w = StreamWriter::new(
        fd,
        stats.transferred.clone(),
        shared.max_bandwidth(),
        cancel.clone(),
    );
    // cpr-reboot stops the VM before anything is saved (STOP comes before `active`);
    // whatever fails from here on resumes a VM that was running.
    let early_stop =
        matches!(params.mode(), MigMode::CprReboot | MigMode::CprTransfer).then(|| {
            let before = vmm.control().run_state();
            vmm.control().vm_stop(RunState::FinishMigrate);
            EarlyStop {
                before,
                at: Instant::now(),
            }
        });
    let mut early_guard = ResumeGuard {
        vmm,
        before: early_stop.map_or(RunState::Running, |e| e.before),
        armed: early_stop.is_some(),
    };
    let tracker = vmm.dirty_tracker();
    let zero_pages = if params.zero_page_detection() == crate::options::ZeroPageDetection::None {
        ZeroPages::SendAsData
    } else {
        ZeroPages::Detect
    };
    let mut saver = RamSaver::new(vmm.ram_blocks().to_vec(), zero_pages);
    if params.mode() == MigMode::CprTransfer {
        saver.ignore_all();
    } else if caps.x_ignore_shared() {
        saver.ignore_shared();
    }
    if caps.xbzrle() {
        saver.use_xbzrle(crate::outgoing::xbzrle_cache::XbzrleSaver::new(
            vmm.ram_blocks(),
            params.xbzrle_cache_size(),
            stats.clone(),
        )?);
    }
    let ps = vmm
        .ram_blocks()
        .first()
        .map(|b| b.page_size())
        .unwrap_or(4096);
    stats.page_size.store(ps, Ordering::Relaxed);
    stats
        .total_ram
        .store(saver.migrated_bytes(), Ordering::Relaxed);
    let devices = vmm.devices();
    let ids = SectionIds::new(devices.len());
    let mapped_ram = caps.mapped_ram();
    w.set_position(channel.base_offset);
    if mapped_ram {
        saver.use_mapped_layout();
    } else if caps.multifd() {
        let sender = start_multifd(shared, vmm, addr, &params, ps)?;
        saver.use_multifd(sender, shared.properties().multifd_sync());
    }

    // Setup.
    let config = Configuration {
        machine: vmm.machine_name().to_string(),
        target_page_bits: None,
        capabilities: [
            (caps.x_ignore_shared(), "x-ignore-shared"),
            (mapped_ram, "mapped-ram"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, name)| name.to_string())
        .collect(),
        uuid: if caps.validate_uuid() {
            vmm.uuid()
        } else {
            None
        },
    };
    // Postcopy always needs the return path: page requests come back on it.
    let postcopy = caps.postcopy_ram();
    let return_path = if caps.return_path() || postcopy {
        if !channel.is_socket {
            return Err(SaveError::ReturnPathUnavailable);
        }
        let back = channel
            .fd
            .try_clone()
            .map_err(|e| WriteError::Io(e.to_string()))?;
        Some(if caps.x_colo() {
            ReturnPath::spawn_for_colo(back)
        } else {
            ReturnPath::spawn(back, postcopy)
        })
    } else {
        None
    };
    w.with_buf(|out| {
        header::encode_header(out);
        config.encode(out);
        if return_path.is_some() {
            Command::OpenReturnPath.encode(out);
            Command::Ping(1).encode(out);
        }
        if postcopy {
            postcopy::advise(&saver).encode(out);
        }
        if caps.x_colo() {
            Command::EnableColo.encode(out);
        }
        ram_start(&ids).encode(out);
    })?;
    let regions = saver.write_setup(&mut w)?;
    w.with_buf(|out| encode_footer(out, ids.ram))?;
    w.flush()?;
    if mapped_ram {
        let threads = if caps.multifd() {
            usize::from(params.multifd_channels())
        } else {
            0
        };
        let config = crate::mapped_ram::WriterConfig {
            threads,
            direct_io: params.direct_io(),
            detect_zero: params.zero_page_detection() != crate::options::ZeroPageDetection::None,
            limit: shared.max_bandwidth(),
        };
        saver.use_mapped_ram(crate::mapped_ram::MappedRamWriter::start(
            &channel.fd,
            vmm.ram_blocks().to_vec(),
            regions,
            config,
            shared.stats(),
            cancel.clone(),
        )?);
    }
    tracker.start()?;
    let colo = caps.x_colo();
    let session = Session {
        colo,
        ids,
        config,
        devices,
        return_path,
        switchover_ack: caps.switchover_ack(),
        early_stop,
        postcopy,
        preempt_to: (postcopy && caps.postcopy_preempt()).then(|| addr.clone()),
        release_ram: postcopy && caps.release_ram(),
    };
    let result = iterate_and_complete(shared, vmm, &mut w, &mut saver, &session);
    if result.is_ok() && colo {
        // Dirty tracking goes on: COLO's checkpoints send what the guest dirties.
        early_guard.armed = false;
        let socket = channel
            .fd
            .try_clone()
            .map_err(|e| WriteError::Io(e.to_string()))?;
        return Ok(Some(ColoHandover {
            w,
            saver,
            ids: session.ids,
            devices: session.devices,
            socket: Arc::new(socket),
            ready_received: session.return_path.is_some(),
        }));
    }
    tracker.stop();
    if result.is_err() {
        saver.requeue_all(tracker);
    } else {
        early_guard.armed = false;
    }
    result.map(|()| None)
}

/// With `x-colo`: what the first migration hands [`crate::outgoing::colo`] once its
/// stream is out (the VM stopped, status `device`, dirty tracking still on).
pub(crate) struct ColoHandover {
    pub w: StreamWriter,
    pub saver: RamSaver,
    pub ids: SectionIds,
    pub devices: Vec<Arc<dyn crate::vmm::DeviceState>>,
    /// The connection: the secondary answers on it, and a failover shuts it down.
    pub socket: Arc<std::os::fd::OwnedFd>,
    /// With `return-path`, the return path's reader took CHECKPOINT_READY already.
    pub ready_received: bool,
}

/// Connects the multifd channels and starts their threads.
fn start_multifd(
    shared: &Shared,
    vmm: &dyn Vmm,
    addr: &Address,
    params: &crate::options::Parameters,
    page_size: u64,
) -> Result<MultifdSender, SaveError> {
    let n = u64::from(params.multifd_channels());
    let mut conns = Vec::new();
    let tls = shared.tls_client();
    for i in 0..n {
        let mut ch = transport::connect_outgoing(addr).map_err(|e| WriteError::Io(e.0))?;
        if let Some(setup) = &tls {
            let cancel = shared.cancel_flag();
            crate::channels::tls::secure_outgoing(&mut ch, setup, &cancel, &format!("multifd{i}"))
                .map_err(|e| WriteError::Tls(e.0))?;
            if let Some(relay) = ch.tls_relay.take() {
                shared.add_tls_relay(relay);
            }
        }
        let channel_fd = Arc::new(ch.fd);
        shared.register_cancel_fd(&channel_fd);
        MultifdSender::send_init(
            &channel_fd,
            vmm.uuid().unwrap_or([0; 16]),
            i as u8,
            &shared.stats(),
        )?;
        conns.push(channel_fd);
    }
    let method = Method::from(params.multifd_compression());
    let level = match method {
        Method::Zlib => params.multifd_zlib_level(),
        Method::Zstd => params.multifd_zstd_level(),
        Method::None => 0,
    } as u32;
    let zero = ZeroDetection::from(params.zero_page_detection());
    let config = ChannelConfig {
        method,
        level,
        zero,
        uuid: vmm.uuid().unwrap_or([0; 16]),
        page_size,
        zero_copy: shared.caps_snapshot().zero_copy_send(),
    };
    Ok(MultifdSender::start(
        conns,
        vmm.ram_blocks().to_vec(),
        config,
        shared.stats(),
        shared.max_bandwidth(),
        shared.cancel_flag(),
    )?)
}

/// How long the source waits for the first PONG before it opens the preempt channel.
const PREEMPT_PONG_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Opens the postcopy preempt channel to `addr` once the destination answered a PING
/// (so it accepted the main channel and takes this one as the preempt channel).
fn open_preempt(
    shared: &Shared,
    addr: &Address,
    rp: &ReturnPath,
) -> Result<postcopy::PreemptChannel, SaveError> {
    rp.await_pong(PREEMPT_PONG_TIMEOUT)?;
    Ok(postcopy::connect_preempt(shared, addr)?)
}

/// What stays fixed through one outgoing session.
struct Session {
    /// `x-colo`: the stream's end starts COLO instead of completing.
    colo: bool,
    ids: SectionIds,
    config: Configuration,
    devices: Vec<Arc<dyn crate::vmm::DeviceState>>,
    return_path: Option<Arc<ReturnPath>>,
    switchover_ack: bool,
    /// Set when the VM was stopped at the start (cpr-reboot).
    early_stop: Option<EarlyStop>,
    /// `postcopy-ram`: POSTCOPY_ADVISE was sent; `migrate-start-postcopy` may switch.
    postcopy: bool,
    /// `postcopy-ram` with `postcopy-preempt`: the address the preempt channel
    /// connects to at the switch.
    preempt_to: Option<Address>,
    /// `postcopy-ram` with `release-ram`: pages sent in postcopy are freed.
    release_ram: bool,
}

/// The VM was stopped when the migration started: its run state before, and when.
#[derive(Debug, Clone, Copy)]
struct EarlyStop {
    before: RunState,
    at: Instant,
}

impl Session {
    /// Whether the destination allows switchover (always, without switchover-ack).
    fn may_switch_over(&self) -> bool {
        !self.switchover_ack
            || self
                .return_path
                .as_ref()
                .is_some_and(|rp| rp.switchover_acked())
    }

    fn return_path_error(&self) -> Result<(), SaveError> {
        match self.return_path.as_ref().and_then(|rp| rp.error()) {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

/// Dirty-rate bookkeeping between syncs, and auto-converge.
struct SyncTracker {
    last: Instant,
    sent_at_last: u64,
    auto_converge: AutoConverge,
    dirty_limit: DirtyLimitTrigger,
    first: bool,
}

impl SyncTracker {
    fn new() -> Self {
        Self {
            last: Instant::now(),
            sent_at_last: 0,
            auto_converge: AutoConverge::default(),
            dirty_limit: DirtyLimitTrigger::default(),
            first: true,
        }
    }
}

fn dirty_sync(
    shared: &Shared,
    vmm: &dyn Vmm,
    saver: &mut RamSaver,
    tracker: &mut SyncTracker,
) -> Result<(), VmmError> {
    let stats = shared.stats();
    let fresh = saver.sync(vmm.dirty_tracker())?;
    let pass = stats.dirty_sync_count.fetch_add(1, Ordering::Relaxed) + 1;
    stats
        .remaining
        .store(saver.remaining_bytes(), Ordering::Relaxed);
    let sent_now = stats.transferred.load(Ordering::Relaxed);
    let secs = tracker.last.elapsed().as_secs_f64();
    if !tracker.first && secs > 0.0 {
        stats
            .dirty_pages_rate
            .store((fresh as f64 / secs) as u64, Ordering::Relaxed);
        let params = shared.params_snapshot();
        let caps = shared.caps_snapshot();
        let period = SyncPeriod {
            dirtied: fresh * saver.page_size(),
            sent: sent_now - tracker.sent_at_last,
        };
        if caps.auto_converge() {
            if let Some(pct) = tracker.auto_converge.on_sync(&params, period) {
                vmm.control().set_cpu_throttle(pct)?;
                stats
                    .cpu_throttle_percentage
                    .store(u64::from(pct), Ordering::Relaxed);
            }
        } else if caps.dirty_limit()
            && tracker.dirty_limit.on_sync(&params, period)
            && !shared.dirty_limiter.migration_owned()
        {
            let period = std::time::Duration::from_millis(params.x_vcpu_dirty_limit_period());
            if let Err(e) = shared
                .dirty_limiter
                .migration_limit(params.vcpu_dirty_limit(), period)
            {
                shared
                    .events
                    .warn(&format!("dirty-limit could not limit the vCPUs: {e}"));
            }
        }
    }
    tracker.first = false;
    tracker.last = Instant::now();
    tracker.sent_at_last = sent_now;
    shared.emit_pass(pass);
    Ok(())
}

/// Bandwidth and rate figures, recomputed about every 100 ms of transfer.
struct RateWindow {
    start: Instant,
    bytes_at_start: u64,
    pages_at_start: u64,
    /// Bytes per millisecond, the last measurement.
    bandwidth: f64,
}

fn iterate_and_complete(
    shared: &Shared,
    vmm: &dyn Vmm,
    w: &mut StreamWriter,
    saver: &mut RamSaver,
    session: &Session,
) -> Result<(), SaveError> {
    let mut sync_tracker = SyncTracker::new();
    let result = iterate_inner(shared, vmm, w, saver, session, &mut sync_tracker);
    shared.dirty_limiter.migration_ended();
    if sync_tracker.auto_converge.percentage() > 0 {
        let _ = vmm.control().set_cpu_throttle(0);
        shared
            .stats()
            .cpu_throttle_percentage
            .store(0, Ordering::Relaxed);
    }
    result
}

fn iterate_inner(
    shared: &Shared,
    vmm: &dyn Vmm,
    w: &mut StreamWriter,
    saver: &mut RamSaver,
    session: &Session,
    sync_tracker: &mut SyncTracker,
) -> Result<(), SaveError> {
    let ids = &session.ids;
    let stats = shared.stats();
    let cancel = shared.cancel_flag();
    dirty_sync(shared, vmm, saver, sync_tracker)?;
    stats
        .setup_time_ms
        .store(stats.elapsed_ms(), Ordering::Relaxed);
    advance(shared, MigrationStatus::Setup, MigrationStatus::Active)?;
    let params = shared.params_snapshot();
    stats
        .expected_downtime_ms
        .store(params.downtime_limit(), Ordering::Relaxed);
    let mut window = RateWindow {
        start: Instant::now(),
        bytes_at_start: stats.transferred.load(Ordering::Relaxed),
        pages_at_start: 0,
        bandwidth: 0.0,
    };
    let mut pages_total = 0u64;
    let precopy_started = Instant::now();
    let mut pass_started = precopy_started;
    let mut extra_passes = ExtraPasses::default();
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(SaveError::Cancelled);
        }
        session.return_path_error()?;
        // mapped-ram PART sections would carry nothing but EOS; leaving them out keeps
        // the file's size fixed however many passes the guest forces.
        let section = (!saver.is_mapped()).then_some(ids.ram);
        if let Some(id) = section {
            w.with_buf(|out| Record::Part(id).encode(out))?;
        }
        let (sent, pass_done) = send_ram_body(
            shared,
            w,
            saver,
            section,
            Some((Instant::now() + ITERATION_SLICE, vmm.dirty_tracker())),
        )?;
        w.flush()?;
        pages_total += sent.total();
        stats
            .remaining
            .store(saver.remaining_bytes(), Ordering::Relaxed);
        update_rates(shared, &mut window, pages_total);
        if postcopy_due(shared, session, precopy_started) && session.may_switch_over() {
            return run_postcopy(shared, vmm, w, saver, session, sync_tracker);
        }
        if pass_done {
            // As QEMU decides it: the estimate (what is still marked dirty) is checked
            // against the threshold; only when it is below does an exact dirty sync
            // run before the decision. A threshold of 0 after a pass long enough to
            // have measured the bandwidth is not trusted (QEMU would switch over at
            // once): the exact sync runs, since an empty estimate at the end of a pass
            // says nothing about what a running guest dirtied meanwhile.
            let params = shared.params_snapshot();
            let threshold = switchover_threshold(&params, window.bandwidth);
            let mut pending = saver.remaining_bytes() as f64;
            let mut synced = false;
            // (cpr-reboot: the VM was stopped before the first sync; the estimate is
            // exact.)
            let exact = session.early_stop.is_some();
            let unmeasured = threshold == 0.0 && pass_started.elapsed() >= RATE_PERIOD;
            if pending < threshold || (unmeasured && !exact) {
                dirty_sync(shared, vmm, saver, sync_tracker)?;
                synced = true;
                pending = saver.remaining_bytes() as f64;
                if window.bandwidth > 0.0 {
                    stats
                        .expected_downtime_ms
                        .store((pending / window.bandwidth) as u64, Ordering::Relaxed);
                }
            }
            if (pending == 0.0 || pending < threshold)
                && session.may_switch_over()
                && !extra_passes.worth_one(shared, vmm, pending, window.bandwidth, &params)
            {
                break;
            }
            if !synced {
                dirty_sync(shared, vmm, saver, sync_tracker)?;
            }
            pass_started = Instant::now();
        }
    }
    complete(shared, vmm, w, saver, session, sync_tracker)
}

/// Whether the session switches to postcopy at this decision point: `postcopy-ram` is on
/// and `migrate-start-postcopy` asked for it, or precopy has been `active` for
/// `x-vmigrate-postcopy-after` milliseconds (0: never) without converging, which then
/// asks for it as that command would.
fn postcopy_due(shared: &Shared, session: &Session, precopy_started: Instant) -> bool {
    if !session.postcopy {
        return false;
    }
    if shared.postcopy_requested() {
        return true;
    }
    let after_ms = shared.params_snapshot().x_vmigrate_postcopy_after();
    if after_ms > 0 && precopy_started.elapsed() >= Duration::from_millis(after_ms) {
        shared.request_postcopy();
        return true;
    }
    false
}

/// Switches the session to postcopy (status `active`, the VM running or paused) and
/// runs it to its end; see [`crate::outgoing::postcopy`] for the stream. Until the
/// package is out a failure resumes the VM; after it the guest runs on the destination
/// and the source VM stays stopped (`postmigrate`) whatever happens.
fn run_postcopy(
    shared: &Shared,
    vmm: &dyn Vmm,
    w: &mut StreamWriter,
    saver: &mut RamSaver,
    session: &Session,
    sync_tracker: &mut SyncTracker,
) -> Result<(), SaveError> {
    let rp = session
        .return_path
        .clone()
        .ok_or(postcopy::PostcopyError::NoReturnPath)?;
    // The preempt channel is opened while the VM still runs here: failing to open it
    // is an ordinary precopy failure.
    let preempt = match &session.preempt_to {
        Some(addr) => Some(open_preempt(shared, addr, &rp)?),
        None => None,
    };
    let stats = shared.stats();
    let control = vmm.control();
    let before = control.run_state();
    let stop_time = Instant::now();
    stats
        .precopy_bytes
        .store(stats.transferred.load(Ordering::Relaxed), Ordering::Relaxed);
    control.vm_stop(RunState::FinishMigrate);
    let mut guard = ResumeGuard {
        vmm,
        before,
        armed: true,
    };
    advance(shared, MigrationStatus::Active, MigrationStatus::Device)?;
    dirty_sync(shared, vmm, saver, sync_tracker)?;
    let mut sections = Vec::new();
    encode_device_sections(&mut sections, &session.devices, &session.ids, before)?;
    postcopy::write_switchover(w, saver, &sections)?;
    // From `postcopy-active` on nothing cancels the migration; a package that does not
    // get out still fails it with the VM resumed (POSTCOPY_RUN is its last command).
    advance(
        shared,
        MigrationStatus::Device,
        MigrationStatus::PostcopyActive,
    )?;
    w.flush()?;
    guard.armed = false;
    control.set_run_state(RunState::PostMigrate);
    // `downtime-bytes` counts RAM sent while neither side ran the guest: none in
    // postcopy (the switch carries commands and device state only), 0 as in QEMU.
    let downtime_end = stats.transferred.load(Ordering::Relaxed);
    stats
        .downtime_ms
        .store(stop_time.elapsed().as_millis() as u64, Ordering::Relaxed);
    // The background push runs at `max-postcopy-bandwidth` (see also set_parameters).
    let bandwidth = shared.max_bandwidth();
    bandwidth.store(
        shared.params_snapshot().max_postcopy_bandwidth(),
        Ordering::Relaxed,
    );
    push_until_done(shared, w, saver, session, rp, preempt, downtime_end)?;
    stats.remaining.store(0, Ordering::Relaxed);
    // Once completed, QEMU's `downtime` runs from the stop to the end: the source VM
    // was stopped all through postcopy.
    stats
        .downtime_ms
        .store(stop_time.elapsed().as_millis() as u64, Ordering::Relaxed);
    Ok(())
}

/// The postcopy phase to its end: the push, then the destination's SHUT. A channel
/// that breaks pauses the migration until a recovery gives new channels (see
/// [`crate::outgoing::recover`]); the push then goes on over them.
fn push_until_done(
    shared: &Shared,
    w: &mut StreamWriter,
    saver: &mut RamSaver,
    session: &Session,
    mut rp: Arc<ReturnPath>,
    mut preempt: Option<postcopy::PreemptChannel>,
    postcopy_start: u64,
) -> Result<(), SaveError> {
    let stats = shared.stats();
    let bandwidth = shared.max_bandwidth();
    // The writer of the connection a recovery made, and that connection's socket.
    let mut resumed: Option<(StreamWriter, Arc<std::os::fd::OwnedFd>)> = None;
    let recover_options = recover::RecoverOptions {
        preempt: session.preempt_to.is_some(),
        shared,
    };
    loop {
        let writer = match resumed.as_mut() {
            Some((writer, _)) => writer,
            None => &mut *w,
        };
        // A request waiting cuts the rate limit's wait short, as in QEMU: the pages
        // the guest waits for do not wait for the background push's budget.
        writer.wake_rate_limit_on(Some(rp.requests_waiting()));
        let pushed = postcopy::push_pages(
            &stats,
            writer,
            saver,
            &rp,
            preempt.as_mut(),
            &postcopy::PushOptions {
                ram_id: session.ids.ram,
                postcopy_start,
                release_ram: session.release_ram,
                warnings: &shared.events,
            },
        )
        .and_then(|()| Ok(rp.await_close(RETURN_PATH_CLOSE_TIMEOUT)?));
        writer.wake_rate_limit_on(None);
        let error = match pushed {
            Ok(()) => break,
            Err(e) if recover::is_network_failure(&e) => e,
            Err(e) => {
                bandwidth.store(shared.params_snapshot().max_bandwidth(), Ordering::Relaxed);
                return Err(e.into());
            }
        };
        // Both ends of every channel down, so the destination pauses too.
        writer.shutdown();
        if let Some(p) = preempt.take() {
            p.shutdown();
        }
        let r = recover::pause_and_resume(
            MigrationStatus::PostcopyActive,
            &error.to_string(),
            saver,
            &recover_options,
        )?;
        rp = r.rp;
        preempt = r.preempt;
        resumed = Some((r.writer, r.socket));
    }
    bandwidth.store(shared.params_snapshot().max_bandwidth(), Ordering::Relaxed);
    // The preempt channel closes only once the destination finished (as QEMU's does,
    // at cleanup): a QEMU destination whose preempt channel ends while it still loads
    // takes that for a network failure and pauses postcopy.
    drop(preempt);
    if let Some((_, socket)) = resumed {
        transport::shutdown_socket(&*socket);
    }
    Ok(())
}

/// Passes run after the remaining data already fits `downtime-limit`, while the link
/// outruns the guest enough that sending the set once more, with the guest running,
/// takes a good part of it off the downtime (see [`another_pass_pays`]); at most a few
/// per migration, whatever the figures say. Each costs at most a set that fits the
/// limit in bytes. QEMU switches over at the first chance, with a downtime anywhere up
/// to the limit.
#[derive(Debug, Default)]
struct ExtraPasses {
    taken: u32,
}

impl ExtraPasses {
    const MAX: u32 = 3;

    fn worth_one(
        &mut self,
        shared: &Shared,
        vmm: &dyn Vmm,
        pending: f64,
        bandwidth: f64,
        params: &crate::options::Parameters,
    ) -> bool {
        if self.taken >= Self::MAX || !vmm.control().run_state().is_running() {
            return false;
        }
        let stats = shared.stats();
        // Bytes the guest dirties per millisecond, as the last sync measured it.
        let dirtying = stats.dirty_pages_rate.load(Ordering::Relaxed) as f64
            * stats.page_size.load(Ordering::Relaxed) as f64
            / 1000.0;
        let limit_ms = params.downtime_limit() as f64;
        let worth = another_pass_pays(pending, bandwidth, dirtying, limit_ms);
        self.taken += u32::from(worth);
        worth
    }
}

/// Whether sending `pending` bytes once more at `bandwidth` (bytes/ms) while the guest
/// dirties `dirtying` bytes/ms shrinks the downtime enough: above half of `limit_ms`, a
/// pass that takes a tenth off is worth its bytes; below, one must take a quarter off;
/// under a tenth of the limit, none is.
fn another_pass_pays(pending: f64, bandwidth: f64, dirtying: f64, limit_ms: f64) -> bool {
    if pending <= 0.0 || bandwidth <= 0.0 {
        return false;
    }
    let expected_ms = pending / bandwidth;
    let next = dirtying * expected_ms;
    if expected_ms > limit_ms / 2.0 {
        next <= pending * 0.9
    } else {
        expected_ms > limit_ms / 10.0 && next <= pending * 0.75
    }
}

/// The rest of a PART or END body of the `ram` section: dirty pages until the deadline
/// of `iteration` (or all of them at switchover), the multifd sync point if one is due
/// (see [`RamSaver::sync_before_eos`]), EOS and the footer (when the pages are in section
/// `ram_id`).
/// While iterating, pages the guest wrote again since the last sync wait for the next
/// one (see [`RamSaver::send_dirty`]). Returns the pages sent and whether the pass was
/// complete.
pub(super) fn send_ram_body(
    shared: &Shared,
    w: &mut StreamWriter,
    saver: &mut RamSaver,
    ram_id: Option<u32>,
    iteration: Option<(Instant, &dyn crate::vmm::DirtyTracker)>,
) -> Result<(crate::outgoing::ram_save::SentPages, bool), SaveError> {
    let deadline = iteration.map(|(d, _)| d);
    saver.set_xbzrle_cache_size(shared.params_snapshot().xbzrle_cache_size())?;
    let (sent, pass_done) = saver.send_dirty(w, deadline, iteration.map(|(_, t)| t))?;
    saver.sync_before_eos(w, pass_done)?;
    if deadline.is_none() {
        saver.write_mapped_bitmaps()?;
    }
    if let Some(id) = ram_id {
        w.with_buf(|out| {
            vmigrate_stream::ram::put_eos(out);
            encode_footer(out, id);
        })?;
    }
    let stats = shared.stats();
    stats.duplicate.fetch_add(sent.zero, Ordering::Relaxed);
    stats.normal.fetch_add(sent.normal, Ordering::Relaxed);
    Ok((sent, pass_done))
}

/// How often the bandwidth and rates are measured.
const RATE_PERIOD: std::time::Duration = std::time::Duration::from_millis(100);

/// Bytes that may remain for switchover: bandwidth (bytes/ms) × downtime-limit (ms),
/// using `avail-switchover-bandwidth` instead of the estimate when it is set.
fn switchover_threshold(params: &crate::options::Parameters, bandwidth: f64) -> f64 {
    let avail = params.avail_switchover_bandwidth();
    let bw = if avail > 0 {
        avail as f64 / 1000.0
    } else {
        bandwidth
    };
    bw * params.downtime_limit() as f64
}

fn update_rates(shared: &Shared, window: &mut RateWindow, pages_total: u64) {
    let stats = shared.stats();
    let elapsed = window.start.elapsed();
    if elapsed < RATE_PERIOD {
        return;
    }
    let bytes = stats.transferred.load(Ordering::Relaxed);
    let ms = elapsed.as_secs_f64() * 1000.0;
    let delta = bytes - window.bytes_at_start;
    window.bandwidth = delta as f64 / ms;
    stats
        .mbps_milli
        .store((delta as f64 * 8.0 / ms) as u64, Ordering::Relaxed);
    stats.pages_per_second.store(
        ((pages_total - window.pages_at_start) as f64 * 1000.0 / ms) as u64,
        Ordering::Relaxed,
    );
    if window.bandwidth > 0.0 {
        stats.expected_downtime_ms.store(
            (stats.remaining.load(Ordering::Relaxed) as f64 / window.bandwidth) as u64,
            Ordering::Relaxed,
        );
    }
    window.start = Instant::now();
    window.bytes_at_start = bytes;
    window.pages_at_start = pages_total;
}

fn complete(
    shared: &Shared,
    vmm: &dyn Vmm,
    w: &mut StreamWriter,
    saver: &mut RamSaver,
    session: &Session,
    sync_tracker: &mut SyncTracker,
) -> Result<(), SaveError> {
    let (ids, config, devices) = (&session.ids, &session.config, &session.devices);
    let stats = shared.stats();
    let control = vmm.control();
    let runstate_at_switchover = match session.early_stop {
        Some(stop) => stop.before,
        None => control.run_state(),
    };
    // With the VM stopped from the start, everything after setup was sent in downtime.
    let stop_time = session.early_stop.map_or_else(Instant::now, |stop| stop.at);
    let precopy_bytes = match session.early_stop {
        Some(_) => 0,
        None => stats.transferred.load(Ordering::Relaxed),
    };
    stats.precopy_bytes.store(precopy_bytes, Ordering::Relaxed);
    if session.early_stop.is_none() {
        control.vm_stop(RunState::FinishMigrate);
    }
    let mut guard = ResumeGuard {
        vmm,
        before: runstate_at_switchover,
        armed: session.early_stop.is_none(),
    };
    let mut before_device = MigrationStatus::Active;
    if shared.caps_snapshot().pause_before_switchover() {
        advance(
            shared,
            MigrationStatus::Active,
            MigrationStatus::PreSwitchover,
        )?;
        before_device = MigrationStatus::PreSwitchover;
        if !shared.wait_continue() {
            return Err(SaveError::Cancelled);
        }
    }
    advance(shared, before_device, MigrationStatus::Device)?;
    dirty_sync(shared, vmm, saver, sync_tracker)?;
    w.with_buf(|out| {
        Command::SwitchoverStart.encode(out);
        Record::End(ids.ram).encode(out);
    })?;
    send_ram_body(shared, w, saver, Some(ids.ram), None)?;
    let mut sections = Vec::new();
    let mut descriptions =
        encode_device_sections(&mut sections, devices, ids, runstate_at_switchover)?;
    w.put(&sections)?;
    w.with_buf(|out| Record::Eof.encode(out))?;
    descriptions.push(GlobalState::describe());
    let desc = vmdesc::build(Some(config.describe()), saver_page_size(vmm), descriptions);
    w.with_buf(|out| vmdesc::encode(out, &desc))?;
    w.flush()?;
    saver.finish_multifd()?;
    if let Some(rp) = &session.return_path {
        if session.colo {
            // The secondary sends no SHUT before COLO: its CHECKPOINT_READY ends the
            // return path (see outgoing::colo).
            rp.await_colo_ready(RETURN_PATH_CLOSE_TIMEOUT)?;
        } else {
            rp.await_close(RETURN_PATH_CLOSE_TIMEOUT)?;
        }
    }
    let total = stats.transferred.load(Ordering::Relaxed);
    stats
        .downtime_bytes
        .store(total - precopy_bytes, Ordering::Relaxed);
    stats
        .downtime_ms
        .store(stop_time.elapsed().as_millis() as u64, Ordering::Relaxed);
    stats.remaining.store(0, Ordering::Relaxed);
    guard.armed = false;
    if session.colo {
        // The VM stays stopped until the secondary is ready (see outgoing::colo).
        return Ok(());
    }
    control.set_run_state(RunState::PostMigrate);
    Ok(())
}

/// Appends every device's FULL section, then `globalstate` with the run state the VM
/// had at switchover (`running` makes the destination start the guest), to `out`.
/// Returns the devices' vmdesc entries.
pub(super) fn encode_device_sections(
    out: &mut Vec<u8>,
    devices: &[Arc<dyn crate::vmm::DeviceState>],
    ids: &SectionIds,
    runstate_at_switchover: RunState,
) -> Result<Vec<serde_json::Value>, VmmError> {
    let mut descriptions = Vec::new();
    for (i, dev) in devices.iter().enumerate() {
        let body = dev.save()?;
        Record::Full(SectionId {
            section_id: i as u32,
            idstr: dev.idstr().to_string(),
            instance_id: dev.instance_id(),
            version_id: dev.version(),
        })
        .encode(out);
        out.extend_from_slice(&body);
        encode_footer(out, i as u32);
        descriptions.push(dev.describe());
    }
    let global = GlobalState {
        runstate: if runstate_at_switchover.is_running() {
            "running".into()
        } else {
            runstate_name_for_stream(runstate_at_switchover)
        },
        vm_was_suspended: false,
    };
    Record::Full(SectionId {
        section_id: ids.globalstate,
        idstr: GLOBALSTATE_IDSTR.into(),
        instance_id: 0,
        version_id: GLOBALSTATE_VERSION,
    })
    .encode(out);
    out.extend_from_slice(&global.encode());
    encode_footer(out, ids.globalstate);
    Ok(descriptions)
}

/// Moves the session's status on; a cancel that got there first ends the session.
fn advance(shared: &Shared, from: MigrationStatus, to: MigrationStatus) -> Result<(), SaveError> {
    shared.transition(from, to).map_err(|e| {
        if e.current == MigrationStatus::Cancelling {
            SaveError::Cancelled
        } else {
            SaveError::Status(e)
        }
    })
}

/// The run state a stopped source reports in `globalstate`: QEMU stores the state the
/// VM had before switchover.
fn runstate_name_for_stream(state: RunState) -> String {
    match state {
        RunState::FinishMigrate | RunState::PostMigrate | RunState::InMigrate => "paused".into(),
        other => other.name().into(),
    }
}

fn saver_page_size(vmm: &dyn Vmm) -> u64 {
    vmm.ram_blocks()
        .first()
        .map(|b| b.page_size())
        .unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::another_pass_pays;

    const MIB: f64 = 1048576.0;

    #[test]
    fn another_pass_only_when_it_shrinks_the_downtime() {
        // 1.2 GB/s link (bytes/ms), 300 ms limit.
        let bw = 1.2e6;
        // 128 MiB left (112 ms) with the guest at 512 MiB/s: the next set is ~57 MiB.
        assert!(another_pass_pays(128.0 * MIB, bw, 0.512 * MIB, 300.0));
        // The guest nearly as fast as the link: a pass would barely shrink the set.
        assert!(!another_pass_pays(128.0 * MIB, bw, 1.1 * MIB, 300.0));
        // Above half the limit, a smaller gain is enough.
        assert!(another_pass_pays(220.0 * MIB, bw, 1.0 * MIB, 300.0));
        assert!(!another_pass_pays(220.0 * MIB, bw, 1.2 * MIB, 300.0));
        // Already under a tenth of the limit: switch over.
        assert!(!another_pass_pays(30.0 * MIB, bw, 0.0, 300.0));
        // Nothing measured, nothing left.
        assert!(!another_pass_pays(128.0 * MIB, 0.0, 0.0, 300.0));
        assert!(!another_pass_pays(0.0, bw, 0.0, 300.0));
    }
}
