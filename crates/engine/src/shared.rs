//! State shared between the migration facade ([`crate::migrator`]) and the session
//! threads it starts: options, status, stats, the cancel flag and the sockets that
//! cancel shuts down.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

use serde_json::{json, Value};

use crate::channels::tls;
use crate::events::EventBus;
use crate::options::{Capabilities, Parameters};
use crate::properties::MigrationProperties;
use crate::stats::Stats;
use crate::status::{MigrationStatus, StatusError};

/// Which way this process's migration goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    None,
    Outgoing,
    Incoming,
}

/// How the destination was configured on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncomingMode {
    /// No `--incoming`.
    Disabled,
    /// `--incoming defer`: waits for `migrate-incoming`.
    Deferred,
    /// `--incoming URI` was given and started.
    Started,
}

/// Section ids the saver uses: VMM devices first, in registration order, then `ram`,
/// then `globalstate` (one id in between is reserved, as QEMU's `none` machine
/// registers `dirty-bitmap` there).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SectionIds {
    pub ram: u32,
    pub globalstate: u32,
}

impl SectionIds {
    pub fn new(devices: usize) -> Self {
        let ram = devices as u32;
        Self {
            ram,
            globalstate: ram + 2,
        }
    }
}

pub(crate) struct State {
    pub(crate) caps: Capabilities,
    pub(crate) params: Parameters,
    /// Fixed at startup (`--global migration.*`).
    pub(crate) properties: MigrationProperties,
    pub(crate) status: MigrationStatus,
    pub(crate) role: Role,
    pub(crate) error: Option<String>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) cancel: Arc<AtomicBool>,
    /// The outgoing sockets, for shutdown on cancel. Held weakly: a socket its owner
    /// has closed is left alone, and none is kept open by this list.
    pub(crate) cancel_fds: Vec<Weak<OwnedFd>>,
    pub(crate) incoming_mode: IncomingMode,
    pub(crate) incoming_started: bool,
    pub(crate) socket_address: Option<Value>,
    pub(crate) continue_requested: bool,
    /// `migrate-start-postcopy` was given: the session switches to postcopy at its next
    /// decision point. Cleared when a new outgoing migration starts.
    pub(crate) postcopy_requested: bool,
    /// The outgoing migration's TLS setup, for its multifd channels.
    pub(crate) tls_client: Option<tls::ClientSetup>,
    /// Relays of outgoing multifd channels, waited for before `completed`.
    pub(crate) tls_relays: Vec<tls::RelayDone>,
    /// Postcopy recovery's hand-overs between the monitor and the paused session.
    pub(crate) recovery: Recovery,
}

/// What the monitor hands a paused postcopy session (see [`crate::outgoing::recover`]
/// and [`crate::incoming::recover`]), and what `migrate-pause` shuts down.
#[derive(Default)]
pub(crate) struct Recovery {
    /// Source: the address `migrate` with `resume` gave, for the paused session to
    /// connect to (the status is `postcopy-recover-setup` already).
    pub(crate) resume_to: Option<crate::channels::transport::Address>,
    /// Destination: the listener the last `migrate-recover` opened.
    pub(crate) listener: Option<crate::channels::transport::Incoming>,
    /// `migrate-pause` caused the coming pause: its text becomes the error.
    pub(crate) paused_by_user: bool,
}

/// The `error-desc` of a postcopy migration that `migrate-pause` paused.
pub(crate) const PAUSED_BY_USER: &str = "Postcopy migration is paused by the user";

/// How a session ended, as its thread saw it (see [`Shared::end`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ending {
    Completed,
    Cancelled,
    Failed(String),
}

impl State {
    /// A new outgoing migration's fresh counters, cancel flag and requests.
    pub(crate) fn reset_outgoing(&mut self, stats: Arc<Stats>, cancel: Arc<AtomicBool>) {
        self.stats = stats;
        self.cancel = cancel;
        self.cancel_fds.clear();
        self.continue_requested = false;
        self.postcopy_requested = false;
    }
}

/// State shared between the facade and the session threads.
pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    pub(crate) continue_cv: Condvar,
    /// Wakes a paused postcopy session when the monitor handed it something.
    pub(crate) recovery_cv: Condvar,
    /// See [`Shared::event_order`].
    pub(crate) event_order: Mutex<()>,
    pub(crate) events: Arc<EventBus>,
    pub(crate) max_bandwidth: Arc<AtomicU64>,
    /// The per-vCPU dirty-rate limiter (monitor commands and the `dirty-limit`
    /// capability).
    pub(crate) dirty_limiter: Arc<crate::dirtylimit::DirtyLimiter>,
    /// COLO's failover state and checkpoint figures.
    pub(crate) colo: crate::colo::Colo,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn params_snapshot(&self) -> Parameters {
        self.lock().params.clone()
    }

    pub fn caps_snapshot(&self) -> Capabilities {
        self.lock().caps.clone()
    }

    pub fn properties(&self) -> MigrationProperties {
        self.lock().properties
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.lock().stats.clone()
    }

    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.lock().cancel.clone()
    }

    pub fn max_bandwidth(&self) -> Arc<AtomicU64> {
        self.max_bandwidth.clone()
    }

    /// Serialises status changes with their `MIGRATION` events, so events leave in the
    /// order the changes were made. Taken before the state lock, never after it.
    fn event_order(&self) -> MutexGuard<'_, ()> {
        self.event_order.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit_status(&self, events: bool, status: MigrationStatus) {
        if events {
            self.events
                .emit("MIGRATION", Some(json!({"status": status.name()})));
        }
    }

    /// The current status.
    pub fn status(&self) -> MigrationStatus {
        self.lock().status
    }

    /// Moves the status from `expected` to `next`, as one compare-and-set, and emits
    /// `MIGRATION`. Fails, changing nothing, when the migration is not in `expected`
    /// (a cancel got there first) or the edge is not in the state machine.
    pub(crate) fn transition(
        &self,
        expected: MigrationStatus,
        next: MigrationStatus,
    ) -> Result<(), StatusError> {
        let _order = self.event_order();
        let events = {
            let mut st = self.lock();
            if st.status != expected || !expected.may_become(next) {
                return Err(StatusError {
                    expected,
                    current: st.status,
                    next,
                });
            }
            st.status = next;
            st.stats.timeline.status_changed(next);
            st.caps.events()
        };
        self.emit_status(events, next);
        Ok(())
    }

    /// Starts a new migration in `role`: from rest (none, or a migration that ended) to
    /// `setup`, after `reset` prepared the state, all under the lock.
    pub(crate) fn begin(
        &self,
        role: Role,
        reset: impl FnOnce(&mut State),
    ) -> Result<(), StatusError> {
        let _order = self.event_order();
        let events = {
            let mut st = self.lock();
            let current = st.status;
            if !current.may_become(MigrationStatus::Setup) {
                return Err(StatusError {
                    expected: MigrationStatus::None,
                    current,
                    next: MigrationStatus::Setup,
                });
            }
            reset(&mut st);
            st.role = role;
            st.error = None;
            st.status = MigrationStatus::Setup;
            st.stats.timeline.status_changed(MigrationStatus::Setup);
            st.caps.events()
        };
        self.emit_status(events, MigrationStatus::Setup);
        Ok(())
    }

    /// Ends the running migration from whatever state it is in. A failure while a
    /// cancel is under way ends it `cancelled` (the cancel caused it); a stream that
    /// was already whole when the cancel came ends `completed`. Returns the final
    /// status, or an error (and no change) when the machine has no such edge.
    pub(crate) fn end(&self, ending: Ending) -> Result<MigrationStatus, StatusError> {
        let _order = self.event_order();
        let (events, next) = {
            let mut st = self.lock();
            let current = st.status;
            // COLO completes its session itself, at the failover.
            if ending == Ending::Completed && current == MigrationStatus::Completed {
                return Ok(current);
            }
            let next = match (&ending, current) {
                (Ending::Failed(_), MigrationStatus::Cancelling) => MigrationStatus::Cancelled,
                (Ending::Failed(_), _) => MigrationStatus::Failed,
                (Ending::Completed, _) => MigrationStatus::Completed,
                (Ending::Cancelled, _) => MigrationStatus::Cancelled,
            };
            if !current.may_become(next) {
                return Err(StatusError {
                    expected: current,
                    current,
                    next,
                });
            }
            if let (Ending::Failed(msg), MigrationStatus::Failed) = (ending, next) {
                st.error = Some(msg);
            }
            st.status = next;
            st.stats.timeline.status_changed(next);
            (st.caps.events(), next)
        };
        self.emit_status(events, next);
        Ok(next)
    }

    /// `migrate_cancel` on the outgoing side, as one step under the lock: the cancel
    /// flag, the sockets shut down, and the status moved to `cancelling` from the
    /// running state it was in. Nothing happens when no outgoing migration runs.
    pub(crate) fn cancel_outgoing(&self) {
        let _order = self.event_order();
        let events = {
            let mut st = self.lock();
            let current = st.status;
            if st.role != Role::Outgoing
                || !current.is_running()
                || !current.may_become(MigrationStatus::Cancelling)
            {
                return;
            }
            st.cancel.store(true, Ordering::Relaxed);
            for fd in st.cancel_fds.iter().filter_map(|fd| fd.upgrade()) {
                crate::channels::transport::shutdown_socket(fd);
            }
            st.status = MigrationStatus::Cancelling;
            st.stats
                .timeline
                .status_changed(MigrationStatus::Cancelling);
            st.caps.events()
        };
        self.continue_cv.notify_all();
        self.emit_status(events, MigrationStatus::Cancelling);
    }

    /// Adds a socket that cancel shuts down (multifd channels) while `fd` is open.
    pub fn register_cancel_fd(&self, fd: &Arc<OwnedFd>) {
        self.lock().cancel_fds.push(Arc::downgrade(fd));
    }

    /// The outgoing migration's TLS setup, when `tls-creds` is set.
    pub fn tls_client(&self) -> Option<tls::ClientSetup> {
        self.lock().tls_client.clone()
    }

    /// Keeps a channel's relay (the main one, multifd, preempt), so completion waits
    /// for its last bytes and reports a failed session.
    pub fn add_tls_relay(&self, relay: tls::RelayDone) {
        self.lock().tls_relays.push(relay);
    }

    /// Ends the TLS sessions a postcopy recovery replaces: their connections broke,
    /// so completion neither waits for them nor reports how they ended.
    pub(crate) fn retire_tls_relays(&self) {
        let retired = std::mem::take(&mut self.lock().tls_relays);
        for relay in &retired {
            relay.abort();
        }
    }

    pub fn emit_pass(&self, pass: u64) {
        let st = self.lock();
        st.stats.timeline.pass(pass);
        let events = st.caps.events();
        drop(st);
        if events {
            self.events
                .emit("MIGRATION_PASS", Some(json!({"pass": pass})));
        }
    }

    /// Whether `migrate-start-postcopy` asked for the switch to postcopy.
    pub fn postcopy_requested(&self) -> bool {
        self.lock().postcopy_requested
    }

    /// Asks for the switch to postcopy as `migrate-start-postcopy` does (the automatic
    /// switch of `x-vmigrate-postcopy-after`).
    pub(crate) fn request_postcopy(&self) {
        self.lock().postcopy_requested = true;
    }

    /// Postcopy failed on a channel: moves the status from `from` to `postcopy-paused`
    /// and records why (the text of `migrate-pause` when it caused it).
    pub(crate) fn pause_postcopy(
        &self,
        from: MigrationStatus,
        reason: &str,
    ) -> Result<(), StatusError> {
        let _order = self.event_order();
        let events = {
            let mut st = self.lock();
            let next = MigrationStatus::PostcopyPaused;
            if st.status != from || !from.may_become(next) {
                return Err(StatusError {
                    expected: from,
                    current: st.status,
                    next,
                });
            }
            let by_user = std::mem::take(&mut st.recovery.paused_by_user);
            st.error = Some(if by_user { PAUSED_BY_USER } else { reason }.to_string());
            st.status = next;
            st.caps.events()
        };
        self.emit_status(events, MigrationStatus::PostcopyPaused);
        Ok(())
    }

    /// `migrate-pause`: in `postcopy-active` or `postcopy-recover`, notes that the
    /// coming pause is the user's and, on a source, shuts its channels down so that
    /// both sides pause (a destination's are shut down by its postcopy session).
    /// Returns the migration's role, or `None` when not in those states.
    pub(crate) fn request_pause(&self) -> Option<Role> {
        let mut st = self.lock();
        if !matches!(
            st.status,
            MigrationStatus::PostcopyActive | MigrationStatus::PostcopyRecover
        ) {
            return None;
        }
        st.recovery.paused_by_user = true;
        if st.role == Role::Outgoing {
            for fd in st.cancel_fds.iter().filter_map(|fd| fd.upgrade()) {
                crate::channels::transport::shutdown_socket(fd);
            }
        }
        Some(st.role)
    }

    /// Blocks a paused postcopy session until `take` finds what the monitor handed it.
    pub(crate) fn wait_recovery<T>(&self, mut take: impl FnMut(&mut Recovery) -> Option<T>) -> T {
        let mut st = self.lock();
        loop {
            if let Some(t) = take(&mut st.recovery) {
                return t;
            }
            st = self.recovery_cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits in `pre-switchover` for `migrate-continue` or a cancel. True to go on.
    pub fn wait_continue(&self) -> bool {
        let mut st = self.lock();
        loop {
            if st.cancel.load(Ordering::Relaxed) {
                return false;
            }
            if st.continue_requested {
                st.continue_requested = false;
                return true;
            }
            st = self.continue_cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}
