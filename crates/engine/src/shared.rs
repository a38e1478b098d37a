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
use crate::status::MigrationStatus;

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
    /// The outgoing migration's TLS setup, for its multifd channels.
    pub(crate) tls_client: Option<tls::ClientSetup>,
    /// Relays of outgoing multifd channels, waited for before `completed`.
    pub(crate) tls_relays: Vec<tls::RelayDone>,
}

/// State shared between the facade and the session threads.
pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    pub(crate) continue_cv: Condvar,
    pub(crate) events: Arc<EventBus>,
    pub(crate) max_bandwidth: Arc<AtomicU64>,
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

    pub fn set_status(&self, status: MigrationStatus) {
        let events = {
            let mut st = self.lock();
            if st.status == status {
                return;
            }
            st.status = status;
            st.caps.get("events")
        };
        if events {
            self.events
                .emit("MIGRATION", Some(json!({"status": status.name()})));
        }
    }

    pub(crate) fn fail(&self, msg: String) {
        self.lock().error = Some(msg);
        self.set_status(MigrationStatus::Failed);
    }

    /// Adds a socket that cancel shuts down (multifd channels) while `fd` is open.
    pub fn register_cancel_fd(&self, fd: &Arc<OwnedFd>) {
        self.lock().cancel_fds.push(Arc::downgrade(fd));
    }

    /// The outgoing migration's TLS setup, when `tls-creds` is set.
    pub fn tls_client(&self) -> Option<tls::ClientSetup> {
        self.lock().tls_client.clone()
    }

    /// Keeps a multifd channel's relay, so completion waits for its last bytes.
    pub fn add_tls_relay(&self, relay: tls::RelayDone) {
        self.lock().tls_relays.push(relay);
    }

    pub fn emit_pass(&self, pass: u64) {
        if self.lock().caps.get("events") {
            self.events
                .emit("MIGRATION_PASS", Some(json!({"pass": pass})));
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
