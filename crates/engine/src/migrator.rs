//! The migration facade a monitor drives: capabilities, parameters, `migrate`,
//! `migrate-incoming`, `migrate_cancel`, `migrate-continue` and `query-migrate`.
//!
//! One [`Migrator`] per VM. It owns the options and the state shared with the session
//! threads; each session thread reports back through `shared::Shared`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use serde_json::{json, Map, Value};

use crate::events::EventBus;
use crate::shared::{Ending, IncomingMode, Role, Shared, State};

use crate::channels::objects::{ObjectStore, TlsSetupError};
use crate::channels::tls;
use crate::channels::transport::{self, Address, FdStore, Incoming};
use crate::incoming::accept::{
    accept_channels, accept_main, accept_main_keep_listening, spawn_preempt_acceptor, AcceptError,
};
use crate::incoming::load::{self, LoadOutcome};
use crate::io::FdSource;
use crate::options::{cpr_conflict, Capabilities, MigMode, Parameters};
use crate::outgoing::save::{self, SaveError};
use crate::properties::MigrationProperties;
use crate::stats::Stats;
use crate::status::{MigrationStatus, RunState};
use crate::vmm::Vmm;

/// A command error, with QEMU's text (class `GenericError`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MigrateError(pub String);

fn merr<T>(msg: impl Into<String>) -> Result<T, MigrateError> {
    Err(MigrateError(msg.into()))
}

type FailureHandler = Box<dyn Fn(&str) + Send + Sync>;

/// The migration controller of one VM.
pub struct Migrator {
    vmm: Arc<dyn Vmm>,
    shared: Arc<Shared>,
    fds: Arc<FdStore>,
    objects: Arc<ObjectStore>,
    on_incoming_failure: Mutex<Option<FailureHandler>>,
    /// Whether a destination starts the guest after a stream that says `running`
    /// (QEMU's autostart: off with `-S`, or after `stop` while waiting).
    autostart: AtomicBool,
    /// The postcopy session of the incoming migration, from POSTCOPY_LISTEN on (for
    /// its figures in `query-migrate`).
    postcopy: Mutex<Option<Arc<crate::incoming::PostcopyIncoming>>>,
    /// A `dirty-bitmap` dirty rate measurement holds the VM's dirty tracking.
    tracker_lent: Arc<AtomicBool>,
}

/// The VM's dirty tracking lent to a `dirty-bitmap` measurement.
struct TrackerLent(Arc<AtomicBool>);

impl crate::dirtyrate::TrackerLease for TrackerLent {}

impl Drop for TrackerLent {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl std::fmt::Debug for Migrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migrator").finish_non_exhaustive()
    }
}

impl Migrator {
    pub fn new(vmm: Arc<dyn Vmm>, events: Arc<EventBus>, incoming_mode: IncomingMode) -> Arc<Self> {
        let params = Parameters::default();
        let max_bandwidth = Arc::new(AtomicU64::new(params.max_bandwidth()));
        let dirty_limiter = Arc::new(crate::dirtylimit::DirtyLimiter::new(vmm.clone()));
        Arc::new(Self {
            vmm,
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    caps: Capabilities::default(),
                    params,
                    properties: MigrationProperties::default(),
                    status: MigrationStatus::None,
                    role: Role::None,
                    error: None,
                    stats: Stats::new(),
                    cancel: Arc::new(AtomicBool::new(false)),
                    cancel_fds: Vec::new(),
                    incoming_mode,
                    incoming_started: false,
                    socket_address: None,
                    continue_requested: false,
                    postcopy_requested: false,
                    tls_client: None,
                    tls_relays: Vec::new(),
                    recovery: Default::default(),
                }),
                continue_cv: Condvar::new(),
                recovery_cv: Condvar::new(),
                event_order: Mutex::new(()),
                events,
                max_bandwidth,
                dirty_limiter,
                colo: Default::default(),
            }),
            fds: Arc::new(FdStore::default()),
            objects: Arc::new(ObjectStore::default()),
            on_incoming_failure: Mutex::new(None),
            autostart: AtomicBool::new(true),
            postcopy: Mutex::new(None),
            tracker_lent: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Descriptors passed with `getfd`.
    pub fn fd_store(&self) -> &FdStore {
        &self.fds
    }

    /// Objects made with `object-add` or `--object` (TLS credentials, authz).
    pub fn objects(&self) -> &ObjectStore {
        &self.objects
    }

    /// The source's TLS setup from `tls-creds` and `tls-hostname` (else the URI's
    /// host), or `None` without TLS.
    fn outgoing_tls(&self, addr: &Address) -> Result<Option<tls::ClientSetup>, TlsSetupError> {
        let params = self.shared.params_snapshot();
        let id = params.tls_creds();
        if id.is_empty() {
            return Ok(None);
        }
        let creds = self.objects.tls_creds(id, tls::Endpoint::Client)?;
        let hostname = match (params.tls_hostname(), addr) {
            ("", Address::Tcp { host, .. }) => Some(host.as_str()),
            ("", _) => None,
            (h, _) => Some(h),
        };
        tls::ClientSetup::new(&creds, hostname)
            .map(Some)
            .map_err(TlsSetupError::from)
    }

    /// The destination's TLS setup from `tls-creds` and `tls-authz`.
    fn incoming_tls(&self) -> Result<Option<tls::ServerSetup>, TlsSetupError> {
        let params = self.shared.params_snapshot();
        let id = params.tls_creds();
        if id.is_empty() {
            return Ok(None);
        }
        let creds = self.objects.tls_creds(id, tls::Endpoint::Server)?;
        let authz = match params.tls_authz() {
            "" => None,
            az => Some(self.objects.authz(az)?),
        };
        tls::ServerSetup::new(&creds, authz)
            .map(Some)
            .map_err(TlsSetupError::from)
    }

    pub fn vmm(&self) -> &Arc<dyn Vmm> {
        &self.vmm
    }

    /// The per-vCPU dirty-rate limiter.
    pub fn dirty_limiter(&self) -> &Arc<crate::dirtylimit::DirtyLimiter> {
        &self.shared.dirty_limiter
    }

    /// Lends the VM's dirty tracking to a `dirty-bitmap` dirty rate measurement: `None`
    /// while an outgoing migration runs (it owns the tracking); no migration starts
    /// until the lease is dropped.
    pub fn lend_dirty_tracker(&self) -> Option<Box<dyn crate::dirtyrate::TrackerLease>> {
        let st = self.shared.lock();
        if st.role == Role::Outgoing && st.status.is_running() {
            return None;
        }
        if self.tracker_lent.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(Box::new(TrackerLent(self.tracker_lent.clone())))
    }

    /// Whether a running outgoing migration has the `dirty-limit` capability: the
    /// monitor may not change the limits it set (QEMU's rule).
    pub fn dirty_limit_migration_running(&self) -> bool {
        let st = self.shared.lock();
        st.role == Role::Outgoing && st.status.is_running() && st.caps.dirty_limit()
    }

    /// Where this VM's events go.
    pub fn events(&self) -> &Arc<EventBus> {
        &self.shared.events
    }

    /// Called with the error text when an incoming migration fails and
    /// `exit-on-error` is set (the binary exits, as QEMU does).
    pub fn set_incoming_failure_handler(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        *self
            .on_incoming_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    /// Sets the migration object's properties; the command line does this once, before
    /// any migration starts.
    pub fn set_properties(&self, properties: MigrationProperties) {
        self.shared.lock().properties = properties;
    }

    /// The migration object's properties.
    pub fn properties(&self) -> MigrationProperties {
        self.shared.properties()
    }

    /// Sets whether an incoming guest that was running starts running here.
    pub fn set_autostart(&self, on: bool) {
        self.autostart.store(on, Ordering::Relaxed);
    }

    pub fn status(&self) -> MigrationStatus {
        self.shared.lock().status
    }

    pub fn query_capabilities(&self) -> Value {
        self.shared.lock().caps.to_json()
    }

    pub fn set_capabilities(&self, list: &Value) -> Result<(), MigrateError> {
        let mut st = self.shared.lock();
        if st.role == Role::Outgoing && st.status.is_running() {
            return merr("There's a migration process in progress");
        }
        // A destination waiting for its stream checks that it can do postcopy.
        let host_check = || -> Result<(), String> {
            self.vmm
                .ram_blocks()
                .iter()
                .try_for_each(|b| b.postcopy_host_check())?;
            crate::uffd::available().map_err(|e| e.to_string())
        };
        let inmigrate = self.vmm.control().run_state() == RunState::InMigrate;
        if st.caps.background_snapshot_after(list) {
            crate::outgoing::background_snapshot::host_check(self.vmm.ram_blocks())
                .map_err(merr_text)?;
        }
        let next = st
            .caps
            .merged_checking_host(
                list,
                st.incoming_started,
                &st.params,
                inmigrate.then_some(&host_check as &dyn Fn() -> Result<(), String>),
                self.vmm.vcpu_dirty_control().is_some(),
            )
            .map_err(|e| MigrateError(e.0))?;
        if next.zero_blocks() {
            self.shared
                .events
                .warn("warning: zero-blocks capability is deprecated");
        }
        st.caps = next;
        Ok(())
    }

    pub fn query_parameters(&self) -> Value {
        self.shared.lock().params.to_json()
    }

    pub fn set_parameters(&self, args: &Map<String, Value>) -> Result<(), MigrateError> {
        let mut st = self.shared.lock();
        let next = st.params.merged(args).map_err(|e| MigrateError(e.0))?;
        next.cross_check(&st.params, &st.caps)
            .map_err(|e| MigrateError(e.0))?;
        // In postcopy the stream runs at `max-postcopy-bandwidth` (0: unlimited).
        let limit = if st.role == Role::Outgoing && st.status.is_postcopy() {
            next.max_postcopy_bandwidth()
        } else {
            next.max_bandwidth()
        };
        self.shared.max_bandwidth.store(limit, Ordering::Relaxed);
        // COLO checkpoints at once and counts the new delay from there.
        if args.contains_key("x-checkpoint-delay") {
            self.shared.colo.delay_changed();
        }
        if st.role == Role::Outgoing && st.status.is_running() && st.caps.dirty_limit() {
            self.shared.dirty_limiter.migration_parameters(
                next.vcpu_dirty_limit(),
                std::time::Duration::from_millis(next.x_vcpu_dirty_limit_period()),
            );
        }
        st.params = next;
        Ok(())
    }

    /// `query-colo-status`.
    pub fn query_colo_status(&self) -> Value {
        self.shared.colo.query_status()
    }

    /// `x-colo-lost-heartbeat`: the side in COLO fails over (see [`crate::colo`]).
    pub fn colo_lost_heartbeat(&self) -> Result<(), MigrateError> {
        self.shared
            .colo
            .request_failover()
            .map_err(|e| MigrateError(e.to_string()))
    }

    /// `migrate-start-postcopy`: asks the running (or next) outgoing migration to switch
    /// to postcopy at its next decision point. As in QEMU it only sets a flag, and is
    /// accepted in any state once a migration was started.
    pub fn start_postcopy(&self) -> Result<(), MigrateError> {
        let mut st = self.shared.lock();
        if !st.caps.postcopy_ram() && !st.caps.dirty_bitmaps() {
            return merr(
                "Enable postcopy with migrate_set_capability before the start of migration",
            );
        }
        if st.role != Role::Outgoing || st.status == MigrationStatus::None {
            return merr("Postcopy must be started after migration has been started");
        }
        st.postcopy_requested = true;
        Ok(())
    }

    /// Parses `uri` xor `channels` into the main address.
    pub fn parse_target(
        uri: Option<&str>,
        channels: Option<&Value>,
        incoming: bool,
    ) -> Result<Address, MigrateError> {
        let channels = channels.and_then(Value::as_array).filter(|c| !c.is_empty());
        match (uri, channels) {
            (Some(u), None) => Address::parse_uri(u).map_err(|e| MigrateError(e.0)),
            (None, Some(list)) => {
                if incoming && list.len() != 1 {
                    return merr("Channel list must have only one entry, for type 'main'");
                }
                let mut main = None;
                for (i, ch) in list.iter().enumerate() {
                    let ty = ch.get("channel-type").and_then(Value::as_str).unwrap_or("");
                    if ty != "main" && ty != "cpr" {
                        return merr(format!(
                            "Parameter 'channels[{i}].channel-type' does not accept value '{ty}'"
                        ));
                    }
                    if ty == "main" || incoming {
                        if main.is_some() {
                            return merr("Channel list has more than one main entry");
                        }
                        let addr = ch.get("addr").ok_or_else(|| {
                            MigrateError(format!("Parameter 'channels[{i}].addr' is missing"))
                        })?;
                        main = Some(
                            Address::from_json(addr, &format!("channels[{i}].addr"))
                                .map_err(|e| MigrateError(e.0))?,
                        );
                    }
                }
                main.ok_or_else(|| MigrateError("Channel list has no main entry".into()))
            }
            _ => merr("need either 'uri' or 'channels' argument"),
        }
    }

    /// QEMU's checks of the main channel against the capabilities and the mode.
    pub fn check_transport(&self, addr: &Address) -> Result<(), MigrateError> {
        let caps = self.shared.caps_snapshot();
        if caps.mapped_ram() && !matches!(addr, Address::File { .. }) {
            return merr("Migration requires seekable transport (e.g. file)");
        }
        let file = matches!(addr, Address::File { .. });
        let multi_channel = addr.is_socket() || (file && caps.mapped_ram());
        if (caps.multifd() || caps.postcopy_preempt()) && !multi_channel {
            return merr("Migration requires multi-channel URIs (e.g. tcp)");
        }
        let params = self.shared.params_snapshot();
        if caps.multifd() && caps.mapped_ram() && params.direct_io() && !file {
            return merr("Migration requires a transport that allows for extra fds (e.g. file)");
        }
        let cpr_transfer = params.mode() == MigMode::CprTransfer;
        if cpr_transfer && matches!(addr, Address::File { .. }) {
            return merr("Migration requires streamable transport (eg unix)");
        }
        Ok(())
    }

    /// `migrate`: checks, starts the transport, and runs the session on its own thread.
    /// `cpr_channel` is the `addr` of the request's `cpr` channel, if it had one.
    pub fn migrate(
        self: &Arc<Self>,
        addr: Address,
        resume: bool,
        cpr_channel: Option<&Value>,
    ) -> Result<(), MigrateError> {
        self.check_transport(&addr)?;
        if resume {
            return self.resume_postcopy(addr);
        }
        {
            let st = self.shared.lock();
            if st.role == Role::Outgoing && st.status.is_running() {
                return merr("There's a migration process in progress");
            }
        }
        if self.tracker_lent.load(Ordering::Acquire) {
            return merr("A dirty rate measurement in dirty-bitmap mode is running");
        }
        match self.vmm.control().run_state() {
            RunState::InMigrate => return merr("Guest is waiting for an incoming migration"),
            RunState::PostMigrate => {
                return merr("Can't migrate the vm that was paused due to previous migration")
            }
            _ => {}
        }
        let mode = self.shared.params_snapshot().mode();
        if let Some(reason) = self.vmm.migration_blockers(mode).pop() {
            return merr(reason);
        }
        let caps = self.shared.caps_snapshot();
        if caps.mapped_ram() {
            let params = self.shared.params_snapshot();
            if !params.tls_creds().is_empty() {
                return merr("Cannot use TLS with mapped-ram");
            }
            if params.multifd_compression() != crate::options::MultifdCompression::None {
                return merr("Cannot use compression with mapped-ram");
            }
        }
        if let Some(conflict) = cpr_conflict(mode, &caps) {
            return merr(conflict);
        }
        if caps.x_colo() {
            if let Some(other) = colo_unsupported_with(&caps) {
                return merr(format!(
                    "x-colo with {other} is not supported by vmigrate yet"
                ));
            }
        }
        let mut cpr_socket = None;
        if mode == MigMode::CprTransfer {
            // QEMU checks the cpr channel once the migration is set up, so a bad one
            // ends it as `failed`.
            let path = cpr_channel
                .filter(|a| {
                    a.get("transport").and_then(Value::as_str) == Some("socket")
                        && a.get("type").and_then(Value::as_str) == Some("unix")
                })
                .and_then(|a| a.get("path").and_then(Value::as_str));
            let Some(path) = path else {
                return Err(self.fail_outgoing_setup("bad cpr channel address; must be unix"));
            };
            // As QEMU, the CPR state is sent before `migrate` returns; the wait for the
            // destination to close the channel is the migration thread's.
            match crate::cpr::send_to(std::path::Path::new(path), self.vmm.as_ref()) {
                Ok(sock) => cpr_socket = Some(sock),
                Err(e) => return Err(self.fail_outgoing_setup(&e.0)),
            }
        }
        let early =
            transport::open_outgoing_sync(&addr, &self.fds).map_err(|e| MigrateError(e.0))?;
        let stats = Stats::new();
        stats.start_clock();
        // (A postcopy before this one ran at max-postcopy-bandwidth.)
        self.shared.max_bandwidth.store(
            self.shared.params_snapshot().max_bandwidth(),
            Ordering::Relaxed,
        );
        let cancel = Arc::new(AtomicBool::new(false));
        let sampled = stats.clone();
        self.shared
            .begin(Role::Outgoing, |st| st.reset_outgoing(stats, cancel))
            .map_err(|_| MigrateError("There's a migration process in progress".into()))?;
        if let Err(e) = sampled.start_timeline_sampler() {
            self.shared
                .events
                .warn(&format!("migration timeline not sampled: {e}"));
        }
        let me = self.clone();
        std::thread::Builder::new()
            .name("mig/src/main".into())
            .spawn(move || me.outgoing_thread(addr, early, cpr_socket))
            .map_err(|e| MigrateError(format!("cannot start migration thread: {e}")))?;
        Ok(())
    }

    /// `migrate` with `resume`: hands `addr` to the paused postcopy session, which
    /// connects there and recovers (see [`crate::outgoing::recover`]).
    fn resume_postcopy(&self, addr: Address) -> Result<(), MigrateError> {
        {
            let st = self.shared.lock();
            if st.role != Role::Outgoing || st.status != MigrationStatus::PostcopyPaused {
                return merr("Cannot resume if there is no paused migration");
            }
            if st.caps.release_ram() {
                return merr("Postcopy recovery cannot work when release-ram capability is set");
            }
        }
        self.shared
            .transition(
                MigrationStatus::PostcopyPaused,
                MigrationStatus::PostcopyRecoverSetup,
            )
            .map_err(|_| MigrateError("Cannot resume if there is no paused migration".into()))?;
        self.shared.lock().recovery.resume_to = Some(addr);
        self.shared.recovery_cv.notify_all();
        Ok(())
    }

    /// `migrate-pause`: during postcopy, shuts this side's channels down so that both
    /// sides pause, waiting for a recovery.
    pub fn migrate_pause(&self) -> Result<(), MigrateError> {
        match self.shared.request_pause() {
            Some(Role::Outgoing) => Ok(()),
            Some(_) => {
                if let Some(pc) = &*self.postcopy.lock().unwrap_or_else(|e| e.into_inner()) {
                    pc.pause();
                }
                Ok(())
            }
            None => merr(
                "migrate-pause is currently only supported during postcopy-active or \
                 postcopy-recover state",
            ),
        }
    }

    /// An outgoing migration that fails right after its setup: it is reported as a
    /// migration that went `setup` then `failed`, with `msg` as its error.
    fn fail_outgoing_setup(&self, msg: &str) -> MigrateError {
        let started = self.shared.begin(Role::Outgoing, |st| {
            st.reset_outgoing(Stats::new(), Arc::new(AtomicBool::new(false)))
        });
        if started.is_ok() {
            self.end_session(Ending::Failed(msg.to_string()));
        }
        MigrateError(msg.to_string())
    }

    fn outgoing_thread(
        &self,
        addr: Address,
        early: Option<transport::Channel>,
        cpr_socket: Option<std::os::unix::net::UnixStream>,
    ) {
        // cpr-transfer: the CPR state goes first, and the main channel is connected once
        // the destination has closed the cpr channel.
        if let Some(sock) = &cpr_socket {
            if let Err(e) = crate::cpr::wait_hangup(sock, &self.shared.cancel_flag()) {
                self.end_session(Ending::Failed(e.0));
                return;
            }
        }
        let tls = match self.outgoing_tls(&addr) {
            Ok(t) => t,
            Err(e) => {
                self.end_session(Ending::Failed(e.to_string()));
                return;
            }
        };
        {
            let mut st = self.shared.lock();
            st.tls_client = tls.clone();
            st.tls_relays.clear();
        }
        let channel = match early {
            Some(ch) => Ok(ch),
            None => transport::connect_outgoing(&addr),
        };
        let mut channel = match channel {
            Ok(ch) => ch,
            Err(e) => {
                self.end_session(Ending::Failed(e.0));
                return;
            }
        };
        if let Some(setup) = &tls {
            let cancel = self.shared.cancel_flag();
            if let Err(e) = tls::secure_outgoing(&mut channel, setup, &cancel, "main") {
                channel.finish_with_close();
                // (Failed while cancelling ends `cancelled`: see Shared::end.)
                self.end_session(Ending::Failed(e.0));
                return;
            }
            // Kept with the other channels' relays: a postcopy recovery retires it.
            if let Some(relay) = channel.tls_relay.take() {
                self.shared.add_tls_relay(relay);
            }
        }
        // The main socket for cancel to shut down: a duplicate held here until the end,
        // and weakly by the cancel list.
        let cancel_socket = channel
            .is_socket
            .then(|| channel.fd.try_clone().ok().map(Arc::new))
            .flatten();
        {
            let mut st = self.shared.lock();
            if let Some(fd) = &cancel_socket {
                st.cancel_fds.push(Arc::downgrade(fd));
            }
            if st.cancel.load(Ordering::Relaxed) {
                drop(st);
                self.end_session(Ending::Cancelled);
                return;
            }
        }
        let state_before = self.vmm.control().run_state();
        let mut result = if self.shared.caps_snapshot().background_snapshot() {
            crate::outgoing::background_snapshot::run(&self.shared, self.vmm.as_ref(), &channel)
        } else {
            save::run(&self.shared, self.vmm.as_ref(), &channel, &addr).and_then(|colo| {
                match colo {
                    // x-colo: checkpoints go on until a failover completes the session.
                    Some(handover) => {
                        crate::outgoing::colo::run(&self.shared, self.vmm.as_ref(), handover)
                    }
                    None => Ok(()),
                }
            })
        };
        if channel.is_socket {
            transport::shutdown_socket(&channel.fd);
        }
        self.shared.lock().cancel_fds.clear();
        drop(cancel_socket);
        drop(channel.fd.try_clone());
        let mut relays = std::mem::take(&mut self.shared.lock().tls_relays);
        if result.is_err() {
            // Nothing more is owed to the peer: end the sessions now.
            for r in &relays {
                r.abort();
            }
            relays.clear();
        }
        channel.finish_with_close();
        // With TLS, the stream is sent once its relays have handed everything to the
        // network and the peer raised no alert.
        for r in relays {
            let outcome = r.wait(transport::TLS_FLUSH_TIMEOUT);
            if let (Ok(()), Some(Err(e))) = (&result, outcome) {
                result = Err(SaveError::Write(crate::io::WriteError::Tls(e.to_string())));
                // After postcopy started the guest runs on the destination.
                if !self.shared.status().is_postcopy() {
                    save::restore_run_state(self.vmm.as_ref(), state_before);
                }
            }
        }
        let stats = self.shared.stats();
        stats
            .total_time_ms
            .store(stats.elapsed_ms(), Ordering::Relaxed);
        self.end_session(match result {
            Ok(()) => Ending::Completed,
            Err(SaveError::Cancelled) => Ending::Cancelled,
            // While cancelling, this ends `cancelled`: the cancel caused the error.
            Err(e) => Ending::Failed(e.to_string()),
        });
    }

    /// Ends the session in its final status. An ending the state machine refuses is a
    /// bug; it is reported as a warning and the status stays as it was.
    fn end_session(&self, ending: Ending) {
        if let Err(e) = self.shared.end(ending) {
            self.shared.events.warn(&format!("internal error: {e}"));
        }
    }

    /// `migrate_cancel`.
    pub fn cancel(&self) -> Result<(), MigrateError> {
        if self.shared.status().is_postcopy() {
            return merr("Postcopy migration in progress, cannot cancel.");
        }
        self.shared.cancel_outgoing();
        Ok(())
    }

    /// `migrate-continue`.
    pub fn migrate_continue(&self, state: &str) -> Result<(), MigrateError> {
        let mut st = self.shared.lock();
        // Only an outgoing migration can be continued: a destination counts as `none`.
        let current = match st.role {
            Role::Outgoing => st.status,
            _ => MigrationStatus::None,
        };
        if current.name() != state {
            return merr(format!(
                "Migration not in expected state: {}",
                current.name()
            ));
        }
        if current == MigrationStatus::None {
            return Ok(());
        }
        st.continue_requested = true;
        drop(st);
        self.shared.continue_cv.notify_all();
        Ok(())
    }

    /// The checks `migrate-incoming` makes before it looks at its address: whether
    /// this process waits for `migrate-incoming` at all, and only once.
    pub fn incoming_precheck(&self) -> Result<(), MigrateError> {
        let st = self.shared.lock();
        match st.incoming_mode {
            IncomingMode::Disabled => {
                return merr("'-incoming' was not specified on the command line")
            }
            IncomingMode::Started => {
                return merr("The incoming migration has already been started")
            }
            IncomingMode::Deferred => {}
        }
        if st.incoming_started {
            return merr(format!(
                "Illegal migration incoming state: {}",
                st.status.name()
            ));
        }
        Ok(())
    }

    /// `migrate-incoming` (and `--incoming URI` at startup).
    pub fn migrate_incoming(
        self: &Arc<Self>,
        addr: Address,
        exit_on_error: bool,
    ) -> Result<(), MigrateError> {
        self.incoming_precheck()?;
        self.check_transport(&addr)?;
        self.shared
            .begin(Role::Incoming, |st| st.incoming_started = true)
            .map_err(|e| {
                MigrateError(format!(
                    "Illegal migration incoming state: {}",
                    e.current.name()
                ))
            })?;
        let incoming = Incoming::start(&addr, &self.fds).map_err(|e| MigrateError(e.0))?;
        {
            let mut st = self.shared.lock();
            st.socket_address = incoming.socket_address();
            st.incoming_mode = IncomingMode::Started;
        }
        let me = self.clone();
        std::thread::Builder::new()
            .name("mig/dst/main".into())
            .spawn(move || me.incoming_thread(incoming, exit_on_error))
            .map_err(|e| MigrateError(format!("cannot start migration thread: {e}")))?;
        Ok(())
    }

    /// `migrate-recover`: on a destination whose postcopy is paused, listens on `addr`
    /// for the source's recovery connection (replacing the listener of an earlier
    /// `migrate-recover`).
    pub fn migrate_recover(&self, addr: Address) -> Result<(), MigrateError> {
        self.recover_precheck()?;
        let incoming = Incoming::start(&addr, &self.fds).map_err(|e| MigrateError(e.0))?;
        {
            let mut st = self.shared.lock();
            st.socket_address = incoming.socket_address();
            st.recovery.listener = Some(incoming);
        }
        self.shared.recovery_cv.notify_all();
        Ok(())
    }

    /// The check `migrate-recover` makes before it looks at its address.
    pub fn recover_precheck(&self) -> Result<(), MigrateError> {
        let st = self.shared.lock();
        if st.role == Role::Incoming && st.status == MigrationStatus::PostcopyPaused {
            Ok(())
        } else {
            merr("Migrate recover can only be run when postcopy is paused.")
        }
    }

    fn incoming_thread(&self, incoming: Incoming, exit_on_error: bool) {
        self.incoming_thread_inner(incoming, exit_on_error)
    }

    fn incoming_thread_inner(&self, incoming: Incoming, exit_on_error: bool) {
        *self.postcopy.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let caps = self.shared.caps_snapshot();
        let mapped_ram = caps.mapped_ram();
        // A mapped-ram file has no channel connections: its readers use the file itself.
        let multifd = caps.multifd() && !mapped_ram;
        let tls = self.incoming_tls().map_err(AcceptError::from);
        // With postcopy-preempt the connection after the main one is the preempt
        // channel: the listener stays open for it until the migration ends.
        let preempt =
            caps.postcopy_preempt() && !multifd && !matches!(incoming, Incoming::Ready(_));
        let preempt_stop = Arc::new(AtomicBool::new(false));
        let (preempt_tx, preempt_rx) = std::sync::mpsc::channel();
        let preempt_rx = Mutex::new(Some(preempt_rx));
        // A postcopy recovery reopens the preempt channel through the same hand-over.
        let recovery_preempt =
            preempt.then(|| (Mutex::new(preempt_tx.clone()), preempt_stop.clone()));
        let recovery_tls = self.incoming_tls().ok().flatten();
        let mut preempt_acceptor = None;
        let accepted = tls.and_then(|tls| {
            if preempt {
                let main =
                    accept_main_keep_listening(&incoming, tls.as_ref(), &self.shared.events)?;
                preempt_acceptor = Some(
                    spawn_preempt_acceptor(
                        incoming,
                        tls,
                        self.shared.events.clone(),
                        preempt_tx,
                        preempt_stop.clone(),
                    )
                    .map_err(|e| {
                        AcceptError::Transport(crate::channels::transport::TransportError(format!(
                            "cannot start the preempt channel's acceptor: {e}"
                        )))
                    })?,
                );
                Ok((main, None))
            } else if multifd {
                accept_channels(
                    &incoming,
                    tls.as_ref(),
                    &self.shared.params_snapshot(),
                    self.shared.properties().multifd_sync(),
                    self.vmm.uuid().unwrap_or([0; 16]),
                    &self.shared.events,
                )
            } else {
                accept_main(incoming, tls.as_ref(), &self.shared.events).map(|ch| (ch, None))
            }
        });
        let accepted = accepted.map_err(|e| e.to_string());
        let result = accepted.and_then(|(mut ch, channels)| {
            self.shared
                .transition(MigrationStatus::Setup, MigrationStatus::Active)
                .map_err(|e| e.to_string())?;
            let fd = ch.fd.try_clone().map_err(|e| e.to_string())?;
            let mut src = FdSource::new(fd, ch.base_offset);
            let caps = self.shared.caps_snapshot();
            let rp = if ch.is_socket {
                let back = ch.fd.try_clone().map_err(|e| e.to_string())?;
                Some(crate::channels::return_path::ReturnPathWriter::new(
                    Box::new(std::fs::File::from(back)),
                ))
            } else {
                None
            };
            let params = self.shared.params_snapshot();
            let file_load = crate::incoming::ram_load::MappedRamLoad {
                threads: if caps.multifd() {
                    usize::from(params.multifd_channels())
                } else {
                    1
                },
                direct_io: params.direct_io(),
            };
            let on_listen = |pc: &Arc<crate::incoming::PostcopyIncoming>| -> Result<(), String> {
                *self.postcopy.lock().unwrap_or_else(|e| e.into_inner()) = Some(pc.clone());
                let channel = preempt_rx.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(channel) = channel.filter(|_| preempt) {
                    pc.start_preempt(channel).map_err(|e| e.to_string())?;
                }
                self.shared
                    .transition(MigrationStatus::Active, MigrationStatus::PostcopyActive)
                    .map_err(|e| e.to_string())
            };
            let on_run = |runstate: Option<&str>| self.apply_incoming_runstate(runstate);
            // A postcopy that loses its connection pauses for a recovery (sockets only:
            // the source connects again).
            let recovery = ch
                .is_socket
                .then(|| crate::incoming::accept::RecoveryAcceptor {
                    shared: &self.shared,
                    tls: recovery_tls,
                    events: self.shared.events.clone(),
                    preempt: recovery_preempt,
                });
            let hooks = load::PostcopyHooks {
                on_listen: &on_listen,
                on_run: &on_run,
                recovery: recovery
                    .as_ref()
                    .map(|r| r as &dyn crate::incoming::PostcopyRecovery),
            };
            let r = load::load_stream_postcopy(
                &mut src,
                self.vmm.as_ref(),
                &caps,
                rp,
                channels,
                file_load,
                Some(&hooks),
            )
            .map_err(|e| format!("load of migration failed: {e}"));
            // x-colo: the destination becomes the secondary, on the same connection.
            let r = match r {
                Ok(outcome) if outcome.colo => self
                    .run_colo_secondary(&mut src, &ch, &outcome)
                    .map(|()| outcome)
                    .map_err(|e| format!("COLO failed: {e}")),
                other => other,
            };
            drop(src);
            if r.is_err() {
                if let Some(relay) = ch.tls_relay.take() {
                    relay.abort();
                }
            }
            ch.finish_with_close();
            r
        });
        preempt_stop.store(true, Ordering::Release);
        // A `migrate-recover` that came too late has nothing to recover any more.
        self.shared.lock().recovery.listener = None;
        if let Some(h) = preempt_acceptor {
            let _ = h.join();
        }
        match result {
            Ok(outcome) => self.incoming_done(outcome),
            Err(msg) => {
                if self.shared.status().is_postcopy() {
                    // Its pages are split between two hosts: the guest cannot go on.
                    self.vmm.control().vm_stop(RunState::InternalError);
                }
                self.end_session(Ending::Failed(msg.clone()));
                if exit_on_error {
                    if let Some(h) = self
                        .on_incoming_failure
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_ref()
                    {
                        h(&msg);
                    }
                }
            }
        }
    }

    /// The COLO secondary's phase, from the end of the first migration to a failover
    /// (see [`crate::incoming::colo`]); the status is `completed` and the guest runs
    /// when it returns.
    fn run_colo_secondary(
        &self,
        src: &mut FdSource,
        ch: &transport::Channel,
        outcome: &LoadOutcome,
    ) -> Result<(), crate::incoming::colo::ColoSecondaryError> {
        if let Some(note) = &outcome.vmdesc_note {
            self.shared.events.warn(note);
        }
        let socket = ch
            .fd
            .try_clone()
            .map_err(crate::incoming::colo::ColoSecondaryError::Reply)?;
        crate::incoming::colo::run(crate::incoming::colo::Secondary {
            shared: &self.shared,
            vmm: self.vmm.as_ref(),
            src,
            socket: Arc::new(socket),
            ram_section: outcome.ram_section,
            ram_block: outcome.ram_block,
            autostart: self.autostart.load(Ordering::Relaxed),
        })
    }

    fn incoming_done(&self, outcome: LoadOutcome) {
        if outcome.colo {
            // COLO completed the migration and started the guest at its failover.
            return;
        }
        if let Some(note) = &outcome.vmdesc_note {
            self.shared.events.warn(note);
        }
        if outcome.postcopy.is_some() {
            // The guest was started (or not) at POSTCOPY_RUN.
            if let Err(e) = self
                .shared
                .transition(MigrationStatus::PostcopyActive, MigrationStatus::Completed)
            {
                self.shared.events.warn(&format!("internal error: {e}"));
            }
            return;
        }
        self.apply_incoming_runstate(outcome.runstate.as_deref());
        if let Err(e) = self
            .shared
            .transition(MigrationStatus::Active, MigrationStatus::Completed)
        {
            self.shared.events.warn(&format!("internal error: {e}"));
        }
    }

    /// Starts the guest after an incoming stream that says `running` (unless autostart
    /// is off), or sets the run state it carried.
    fn apply_incoming_runstate(&self, runstate: Option<&str>) {
        let control = self.vmm.control();
        match runstate {
            None | Some("running") => {
                if self.autostart.load(Ordering::Relaxed) {
                    control.vm_start();
                } else {
                    control.set_run_state(RunState::Paused);
                }
            }
            Some(other) => {
                control.set_run_state(RunState::from_name(other).unwrap_or(RunState::Paused))
            }
        }
    }

    /// `query-migrate`.
    /// `x-vmigrate-query-migrate-timeline`: the last outgoing migration's timeline.
    pub fn query_timeline(&self) -> Value {
        self.shared.stats().timeline_json()
    }

    pub fn query_migrate(&self) -> Value {
        let st = self.shared.lock();
        let mut out = Map::new();
        let blockers = self.vmm.migration_blockers(st.params.mode());
        if !blockers.is_empty() {
            out.insert("blocked-reasons".into(), json!(blockers));
        }
        if st.status == MigrationStatus::None {
            return Value::Object(out);
        }
        out.insert("status".into(), json!(st.status.name()));
        match st.role {
            Role::Incoming => {
                if let Some(sa) = &st.socket_address {
                    out.insert("socket-address".into(), sa.clone());
                }
                // vmigrate's own figures of a postcopy destination (QEMU shows none).
                if let Some(pc) = &*self.postcopy.lock().unwrap_or_else(|e| e.into_inner()) {
                    // QEMU's, once the migration completed with postcopy-blocktime on.
                    if let Some((overall, per_vcpu)) = pc
                        .blocktime()
                        .filter(|_| st.status == MigrationStatus::Completed)
                    {
                        out.insert("postcopy-blocktime".into(), json!(overall));
                        out.insert("postcopy-vcpu-blocktime".into(), json!(per_vcpu));
                    }
                    let l = pc.latency();
                    out.insert("x-vmigrate-postcopy-requests".into(), json!(pc.requests()));
                    out.insert(
                        "x-vmigrate-postcopy-zero-faults".into(),
                        json!(pc.zero_faults()),
                    );
                    out.insert(
                        "x-vmigrate-fault-latency-us".into(),
                        json!({"count": l.count, "p50": l.p50_us, "p99": l.p99_us, "max": l.max_us}),
                    );
                }
            }
            Role::Outgoing | Role::None => {
                let s = &st.stats;
                let live = |a: &AtomicU64| a.load(Ordering::Relaxed);
                match st.status {
                    MigrationStatus::Active
                    | MigrationStatus::PreSwitchover
                    | MigrationStatus::Device
                    | MigrationStatus::Cancelling => {
                        out.insert("setup-time".into(), json!(live(&s.setup_time_ms)));
                        out.insert("total-time".into(), json!(s.elapsed_ms()));
                        out.insert(
                            "expected-downtime".into(),
                            json!(live(&s.expected_downtime_ms)),
                        );
                        let throttle = live(&s.cpu_throttle_percentage);
                        if throttle > 0 {
                            out.insert("cpu-throttle-percentage".into(), json!(throttle));
                        }
                        out.insert("ram".into(), s.ram_json(false));
                        if st.caps.dirty_limit() {
                            if let Some((per_round, ring_full)) =
                                self.shared.dirty_limiter.round_times()
                            {
                                out.insert(
                                    "dirty-limit-throttle-time-per-round".into(),
                                    json!(per_round),
                                );
                                out.insert("dirty-limit-ring-full-time".into(), json!(ring_full));
                            }
                        }
                    }
                    MigrationStatus::PostcopyActive
                    | MigrationStatus::PostcopyPaused
                    | MigrationStatus::PostcopyRecoverSetup
                    | MigrationStatus::PostcopyRecover => {
                        out.insert("setup-time".into(), json!(live(&s.setup_time_ms)));
                        out.insert("total-time".into(), json!(s.elapsed_ms()));
                        out.insert("downtime".into(), json!(live(&s.downtime_ms)));
                        out.insert("ram".into(), s.ram_json(false));
                    }
                    MigrationStatus::Completed => {
                        out.insert("setup-time".into(), json!(live(&s.setup_time_ms)));
                        out.insert("total-time".into(), json!(live(&s.total_time_ms)));
                        out.insert("downtime".into(), json!(live(&s.downtime_ms)));
                        out.insert("ram".into(), s.ram_json(true));
                    }
                    _ => {}
                }
                if st.caps.xbzrle() && out.contains_key("ram") {
                    let cache = s.xbzrle.to_json(st.params.xbzrle_cache_size());
                    out.insert("xbzrle-cache".into(), cache);
                }
            }
        }
        // vmigrate's own checkpoint figures, once COLO ran.
        if let Some(colo) = self.shared.colo.figures() {
            out.insert("x-vmigrate-colo".into(), colo);
        }
        // (In postcopy the error that paused it stays shown, as QEMU shows it.)
        if st.status == MigrationStatus::Failed || st.status.is_postcopy() {
            if let Some(e) = &st.error {
                out.insert("error-desc".into(), json!(e));
            }
        }
        Value::Object(out)
    }
}

/// A capability vmigrate's COLO does not combine with `x-colo` yet: its checkpoints
/// are plain RAM sections on the main channel, answered on the same connection.
fn colo_unsupported_with(caps: &Capabilities) -> Option<&'static str> {
    use crate::options::Cap;
    [
        Cap::Multifd,
        Cap::PostcopyRam,
        Cap::MappedRam,
        Cap::Xbzrle,
        Cap::BackgroundSnapshot,
    ]
    .into_iter()
    .find(|c| caps.has(*c))
    .map(|c| c.name())
}

/// A QEMU error text as a [`MigrateError`].
fn merr_text(text: &'static str) -> MigrateError {
    MigrateError(text.into())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::test_support::{recorded_migrator, temp_path, wait_for_end, FakeVmm};
    use crate::vmm::{DirtyBitmap, DirtyTracker, VmControl};
    use MigrationStatus as S;

    const LIMIT: Duration = Duration::from_secs(20);

    fn file_addr(path: &std::path::Path) -> Address {
        Address::parse_uri(&format!("file:{}", path.display())).unwrap()
    }

    fn unlimited(m: &Migrator) {
        m.set_parameters(json!({"max-bandwidth": 0}).as_object().unwrap())
            .unwrap();
    }

    /// The statuses seen, once the migration's end has been announced too (the status
    /// changes before its event goes out).
    fn events_of(seen: &Mutex<Vec<String>>) -> Vec<String> {
        crate::test_support::ended_events(seen)
    }

    #[test]
    fn a_session_saves_to_a_file_and_another_loads_it() {
        let src = FakeVmm::new(64, RunState::Running);
        for p in [0, 3, 17, 63] {
            src.write_page(p, p as u8 + 1);
        }
        let (m, seen) = recorded_migrator(src.clone(), IncomingMode::Disabled);
        unlimited(&m);
        let path = temp_path("save");
        m.migrate(file_addr(&path), false, None).unwrap();
        assert_eq!(
            wait_for_end(&m, LIMIT),
            S::Completed,
            "{}",
            m.query_migrate()
        );
        assert_eq!(events_of(&seen), ["setup", "active", "device", "completed"]);
        assert_eq!(src.control.run_state(), RunState::PostMigrate);

        let dst = FakeVmm::new(64, RunState::InMigrate);
        let (d, dseen) = recorded_migrator(dst.clone(), IncomingMode::Deferred);
        d.migrate_incoming(file_addr(&path), false).unwrap();
        assert_eq!(
            wait_for_end(&d, LIMIT),
            S::Completed,
            "{}",
            d.query_migrate()
        );
        assert_eq!(events_of(&dseen), ["setup", "active", "completed"]);
        assert!(dst.ram() == src.ram(), "destination RAM differs");
        assert_eq!(dst.control.run_state(), RunState::Running);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn an_out_of_order_transition_is_refused_and_changes_nothing() {
        let (m, seen) =
            recorded_migrator(FakeVmm::new(4, RunState::Running), IncomingMode::Disabled);
        let e = m.shared.transition(S::None, S::Active).unwrap_err();
        assert_eq!((e.current, e.next), (S::None, S::Active));
        assert_eq!(m.status(), S::None);
        m.shared.begin(Role::Outgoing, |_| {}).unwrap();
        // Not where the caller thinks it is.
        let e = m.shared.transition(S::Active, S::Device).unwrap_err();
        assert_eq!(e.current, S::Setup);
        // No such edge, even from where it is.
        assert!(m.shared.transition(S::Setup, S::Device).is_err());
        assert!(m.shared.begin(Role::Outgoing, |_| {}).is_err());
        m.shared.transition(S::Setup, S::Active).unwrap();
        m.shared.transition(S::Active, S::Device).unwrap();
        assert_eq!(m.shared.end(Ending::Completed).unwrap(), S::Completed);
        assert!(m.shared.transition(S::Completed, S::Active).is_err());
        assert!(m.shared.end(Ending::Cancelled).is_err());
        assert_eq!(m.status(), S::Completed);
        assert_eq!(events_of(&seen), ["setup", "active", "device", "completed"]);
        assert!(e.to_string().contains("from setup to device"), "{e}");
    }

    /// One migration of a small running VM to a file, cancelled after `delay` (or not
    /// at all): (its end, its events).
    fn migrate_and_cancel_after(delay: Option<Duration>) -> (S, Vec<String>, Arc<FakeVmm>) {
        let src = FakeVmm::new(32, RunState::Running);
        src.write_page(1, 7);
        src.write_page(30, 9);
        let (m, seen) = recorded_migrator(src.clone(), IncomingMode::Disabled);
        unlimited(&m);
        let path = temp_path("race");
        m.migrate(file_addr(&path), false, None).unwrap();
        if let Some(delay) = delay {
            let t0 = Instant::now();
            while t0.elapsed() < delay {
                std::hint::spin_loop();
            }
            m.cancel().unwrap();
        }
        let end = wait_for_end(&m, LIMIT);
        let _ = std::fs::remove_file(path);
        (end, events_of(&seen), src)
    }

    #[test]
    fn cancel_racing_the_end_of_a_session_never_stays_cancelling() {
        // How long a whole migration takes here, so the cancels land from before its
        // start to after its end.
        let t0 = Instant::now();
        let (end, _, _) = migrate_and_cancel_after(None);
        assert_eq!(end, S::Completed);
        let whole = t0.elapsed().max(Duration::from_micros(200));
        let rounds = 200u32;
        let (mut completed, mut cancelled) = (0, 0);
        for round in 0..rounds {
            let delay = whole * 3 / 2 * round / rounds;
            let (end, events, vm) = migrate_and_cancel_after(Some(delay));
            let last = events.last().cloned().unwrap_or_default();
            assert!(
                matches!(end, S::Completed | S::Cancelled),
                "round {round}: ended {end}, events {events:?}"
            );
            assert_eq!(last, end.name(), "round {round}: events {events:?}");
            if let Some(i) = events.iter().position(|e| e == "cancelling") {
                assert_eq!(events.len(), i + 2, "round {round}: events {events:?}");
            }
            let run_state = vm.control.run_state();
            match end {
                S::Completed => {
                    completed += 1;
                    assert_eq!(run_state, RunState::PostMigrate, "round {round}");
                }
                _ => {
                    cancelled += 1;
                    assert_eq!(run_state, RunState::Running, "round {round}");
                }
            }
        }
        // Both outcomes happened: the cancels really raced the sessions' ends.
        assert!(
            completed > 0 && cancelled > 0,
            "completed {completed}, cancelled {cancelled} (a whole migration took {whole:?})"
        );
    }

    #[test]
    fn cancel_while_pages_are_being_sent_resumes_the_vm_and_keeps_its_pages_dirty() {
        let pages = 4096;
        let src = FakeVmm::new(pages, RunState::Running);
        for p in 0..pages {
            src.write_page(p, (p % 251) as u8 + 1);
        }
        // A destination that accepts and never reads: the session blocks in `active`.
        let path = temp_path("sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (m, seen) = recorded_migrator(src.clone(), IncomingMode::Disabled);
        unlimited(&m);
        let addr = Address::parse_uri(&format!("unix:{}", path.display())).unwrap();
        m.migrate(addr, false, None).unwrap();
        let (_conn, _) = listener.accept().unwrap();
        let t0 = Instant::now();
        while m.status() != S::Active {
            assert!(t0.elapsed() < LIMIT, "{}", m.query_migrate());
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(50));
        let cancelled_at = Instant::now();
        m.cancel().unwrap();
        assert_eq!(wait_for_end(&m, LIMIT), S::Cancelled);
        assert!(cancelled_at.elapsed() < Duration::from_secs(3));
        assert_eq!(
            events_of(&seen),
            ["setup", "active", "cancelling", "cancelled"]
        );
        assert_eq!(src.control.run_state(), RunState::Running);
        // Pages fetched but not sent went back to the tracker.
        let mut dirty = DirtyBitmap::new(pages);
        src.dirty.sync(0, &mut dirty).unwrap();
        assert!(dirty.count() > 0, "no page was handed back");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn pre_switchover_waits_and_cancel_or_continue_decide() {
        for go_on in [false, true] {
            let src = FakeVmm::new(16, RunState::Running);
            src.write_page(2, 5);
            let (m, seen) = recorded_migrator(src.clone(), IncomingMode::Disabled);
            unlimited(&m);
            m.set_capabilities(&json!([{"capability": "pause-before-switchover", "state": true}]))
                .unwrap();
            let path = temp_path("pre");
            m.migrate(file_addr(&path), false, None).unwrap();
            let t0 = Instant::now();
            while m.status() != S::PreSwitchover {
                assert!(t0.elapsed() < LIMIT, "{}", m.query_migrate());
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(src.control.run_state(), RunState::FinishMigrate);
            assert!(m.migrate_continue("active").is_err());
            if go_on {
                m.migrate_continue("pre-switchover").unwrap();
            } else {
                m.cancel().unwrap();
            }
            let end = wait_for_end(&m, LIMIT);
            let (want_end, want_events, want_state) = if go_on {
                (
                    S::Completed,
                    vec!["setup", "active", "pre-switchover", "device", "completed"],
                    RunState::PostMigrate,
                )
            } else {
                (
                    S::Cancelled,
                    vec![
                        "setup",
                        "active",
                        "pre-switchover",
                        "cancelling",
                        "cancelled",
                    ],
                    RunState::Running,
                )
            };
            assert_eq!(end, want_end);
            assert_eq!(events_of(&seen), want_events);
            assert_eq!(src.control.run_state(), want_state);
            // Stopped for the switchover, then either handed over or running again.
            let history = src.control.history();
            assert_eq!(
                history[history.len() - 2],
                RunState::FinishMigrate,
                "{history:?}"
            );
            let _ = std::fs::remove_file(path);
        }
    }

    #[test]
    fn a_failed_destination_reports_and_stays_queryable() {
        let path = temp_path("bad");
        std::fs::write(&path, b"QEVM\x00\x00\x00\x03garbage").unwrap();
        let dst = FakeVmm::new(8, RunState::InMigrate);
        let (d, seen) = recorded_migrator(dst, IncomingMode::Deferred);
        d.migrate_incoming(file_addr(&path), false).unwrap();
        assert_eq!(wait_for_end(&d, LIMIT), S::Failed);
        assert_eq!(events_of(&seen), ["setup", "active", "failed"]);
        let q = d.query_migrate();
        assert!(
            q["error-desc"]
                .as_str()
                .is_some_and(|e| e.starts_with("load of migration failed")),
            "{q}"
        );
        // A destination that failed does not take a second incoming migration.
        assert!(d.migrate_incoming(file_addr(&path), false).is_err());
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn multifd_sessions_between_two_vms_carry_every_page() {
        for (compression, channels) in [("none", 2), ("zlib", 3), ("zstd", 1)] {
            let src = FakeVmm::new(512, RunState::Running);
            for p in (0..512).step_by(3) {
                src.write_page(p, (p % 200) as u8 + 1);
            }
            let dst = FakeVmm::new(512, RunState::InMigrate);
            let caps = json!([{"capability": "multifd", "state": true}]);
            let params = json!({"multifd-channels": channels, "multifd-compression": compression,
                                "max-bandwidth": 0});
            let (d, dseen) = recorded_migrator(dst.clone(), IncomingMode::Deferred);
            let (m, seen) = recorded_migrator(src.clone(), IncomingMode::Disabled);
            for x in [&d, &m] {
                x.set_capabilities(&caps).unwrap();
                x.set_parameters(params.as_object().unwrap()).unwrap();
            }
            let path = temp_path("mf.sock");
            let addr = Address::parse_uri(&format!("unix:{}", path.display())).unwrap();
            d.migrate_incoming(addr.clone(), false).unwrap();
            m.migrate(addr, false, None).unwrap();
            assert_eq!(
                wait_for_end(&m, LIMIT),
                S::Completed,
                "{}",
                m.query_migrate()
            );
            assert_eq!(
                wait_for_end(&d, LIMIT),
                S::Completed,
                "{}",
                d.query_migrate()
            );
            assert!(dst.ram() == src.ram(), "{compression}: RAM differs");
            assert_eq!(events_of(&seen), ["setup", "active", "device", "completed"]);
            assert_eq!(events_of(&dseen), ["setup", "active", "completed"]);
            let q = m.query_migrate();
            assert!(q["ram"]["multifd-bytes"].as_u64().unwrap_or(0) > 0, "{q}");
            let _ = std::fs::remove_file(path);
        }
    }

    /// Waits until `f` holds (or fails the test after `LIMIT`).
    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(t0.elapsed() < LIMIT, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn colo_exits(m: &Migrator) -> Arc<Mutex<Vec<Value>>> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        m.events().subscribe(move |name, data| {
            if name == "COLO_EXIT" {
                s.lock().unwrap().push(data.cloned().unwrap_or(Value::Null));
            }
        });
        seen
    }

    fn checkpoints(m: &Migrator) -> u64 {
        m.query_migrate()["x-vmigrate-colo"]["checkpoints"]
            .as_u64()
            .unwrap_or(0)
    }

    #[test]
    fn colo_checkpoints_reach_the_secondary_and_either_side_fails_over() {
        let src = FakeVmm::new(128, RunState::Running);
        for p in (0..128).step_by(5) {
            src.write_page(p, p as u8 + 1);
        }
        let dst = FakeVmm::new(128, RunState::InMigrate);
        let (d, dseen) = recorded_migrator(dst.clone(), IncomingMode::Deferred);
        let (m, seen) = recorded_migrator(src.clone(), IncomingMode::Disabled);
        let caps = json!([{"capability": "x-colo", "state": true}]);
        for x in [&d, &m] {
            x.set_capabilities(&caps).unwrap();
        }
        m.set_parameters(
            json!({"max-bandwidth": 0, "x-checkpoint-delay": 10})
                .as_object()
                .unwrap(),
        )
        .unwrap();
        let (d_exits, m_exits) = (colo_exits(&d), colo_exits(&m));
        let path = temp_path("colo.sock");
        let addr = Address::parse_uri(&format!("unix:{}", path.display())).unwrap();
        d.migrate_incoming(addr.clone(), false).unwrap();
        m.migrate(addr, false, None).unwrap();
        wait_until("COLO on both sides", || {
            m.status() == S::Colo && d.status() == S::Colo
        });
        assert_eq!(m.query_colo_status()["mode"], "primary");
        assert_eq!(d.query_colo_status()["mode"], "secondary");
        assert_eq!(dst.control.run_state(), RunState::Colo);
        // Refused while in COLO, as QEMU refuses it.
        assert_eq!(
            m.set_capabilities(&json!([{"capability": "x-colo", "state": false}]))
                .unwrap_err()
                .0,
            "There's a migration process in progress"
        );
        // What the primary writes now arrives with a later checkpoint.
        for round in 0..3u8 {
            let before = checkpoints(&m);
            for p in (round as usize..128).step_by(7) {
                src.write_page(p, 0x80 + round);
            }
            wait_until("two more checkpoints", || checkpoints(&m) >= before + 2);
            assert!(dst.ram() == src.ram(), "round {round}: RAM differs");
        }
        assert_eq!(src.control.run_state(), RunState::Running);
        // The secondary takes over: completed, COLO_EXIT request, the guest runs.
        d.colo_lost_heartbeat().unwrap();
        assert_eq!(wait_for_end(&d, LIMIT), S::Completed);
        wait_until("the secondary's guest to run", || {
            dst.control.run_state() == RunState::Running
        });
        assert_eq!(
            d.query_colo_status(),
            json!({"mode": "none", "last-mode": "secondary", "reason": "request"})
        );
        assert_eq!(
            *d_exits.lock().unwrap(),
            [json!({"mode": "secondary", "reason": "request"})]
        );
        assert_eq!(events_of(&dseen), ["setup", "active", "colo", "completed"]);
        // The primary lost its secondary: COLO_EXIT error, still in COLO until told.
        wait_until("the primary's COLO_EXIT", || {
            !m_exits.lock().unwrap().is_empty()
        });
        assert_eq!(
            *m_exits.lock().unwrap(),
            [json!({"mode": "primary", "reason": "error"})]
        );
        assert_eq!(m.status(), S::Colo);
        m.colo_lost_heartbeat().unwrap();
        assert_eq!(wait_for_end(&m, LIMIT), S::Completed);
        assert_eq!(
            events_of(&seen),
            ["setup", "active", "device", "colo", "completed"]
        );
        wait_until("the primary's guest to run", || {
            src.control.run_state() == RunState::Running
        });
        assert_eq!(
            m.colo_lost_heartbeat().unwrap_err().0,
            "VM is not in COLO mode"
        );
        let _ = std::fs::remove_file(path);
    }
}
