//! COLO (`x-colo`): after the first migration the primary keeps running and
//! checkpoints its state to the secondary every `x-checkpoint-delay` ms; the secondary
//! keeps the last complete checkpoint and takes over from it on a failover.
//!
//! This module holds what both sides share with the monitor: the failover state
//! (QEMU's `FailoverStatus`), `query-colo-status`, `x-colo-lost-heartbeat`, the
//! `COLO_EXIT` event and the checkpoint figures. The two sessions are
//! [`crate::outgoing::colo`] (primary) and [`crate::incoming::colo`] (secondary); the
//! messages are [`vmigrate_stream::colo`].
//!
//! ```text
//! failover: none ──x-colo-lost-heartbeat──▶ active ──(session saw it)──▶ completed
//! ```
//!
//! A session that loses its peer emits `COLO_EXIT` with reason `error` and waits, in
//! status `colo`, for `x-colo-lost-heartbeat`, as QEMU's does: the decision to fail
//! over belongs to whoever watches the heartbeat.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::events::EventBus;

/// QEMU's `COLOMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ColoMode {
    #[default]
    None,
    Primary,
    Secondary,
}

impl ColoMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Primary => "primary",
            Self::Secondary => "secondary",
        }
    }
}

/// QEMU's `COLOExitReason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    None,
    Request,
    Error,
    Processing,
}

impl ExitReason {
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Request => "request",
            Self::Error => "error",
            Self::Processing => "processing",
        }
    }
}

/// QEMU's failover states, as far as vmigrate passes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Failover {
    #[default]
    None,
    /// `x-colo-lost-heartbeat` was given; the session has not acted on it yet.
    Active,
    /// The session left COLO on the request.
    Completed,
}

/// Checkpoint figures, kept by the side that does the work (the primary stops its VM
/// and sends; the secondary applies).
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckpointStats {
    pub checkpoints: u64,
    /// Time the VM was stopped (primary) or the checkpoint took to apply (secondary).
    pub last_us: u64,
    pub total_us: u64,
    pub max_us: u64,
    /// Bytes of the last checkpoint on the wire (RAM and device state).
    pub last_bytes: u64,
    pub total_bytes: u64,
    /// Pages the last checkpoint carried.
    pub last_pages: u64,
}

impl CheckpointStats {
    pub(crate) fn record(&mut self, took: Duration, bytes: u64, pages: u64) {
        let us = took.as_micros() as u64;
        self.checkpoints += 1;
        self.last_us = us;
        self.total_us += us;
        self.max_us = self.max_us.max(us);
        self.last_bytes = bytes;
        self.total_bytes += bytes;
        self.last_pages = pages;
    }

    fn to_json(self) -> Value {
        json!({
            "checkpoints": self.checkpoints,
            "last-checkpoint-us": self.last_us,
            "total-checkpoint-us": self.total_us,
            "max-checkpoint-us": self.max_us,
            "last-checkpoint-bytes": self.last_bytes,
            "total-checkpoint-bytes": self.total_bytes,
            "last-checkpoint-pages": self.last_pages,
        })
    }
}

#[derive(Debug, Default)]
struct State {
    /// The side this process plays while in COLO.
    mode: ColoMode,
    /// The mode at the last failover (QEMU's `last-mode`).
    last_mode: ColoMode,
    failover: Failover,
    /// `x-checkpoint-delay` changed: the primary checkpoints at once.
    checkpoint_now: bool,
    /// The connection a failover shuts down, to wake a session blocked on it.
    socket: Option<Weak<OwnedFd>>,
    stats: CheckpointStats,
}

/// COLO's state shared between the monitor and the session.
#[derive(Debug, Default)]
pub struct Colo {
    state: Mutex<State>,
    wake: Condvar,
}

/// Why `x-colo-lost-heartbeat` was refused, with QEMU's texts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FailoverError {
    #[error("VM is not in COLO mode")]
    NotInColo,
    #[error("COLO failover is already activated")]
    AlreadyActive,
}

impl Colo {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A session enters COLO as `mode`, its connection to be shut down by a failover.
    pub(crate) fn enter(&self, mode: ColoMode, socket: &Arc<OwnedFd>) {
        let mut st = self.lock();
        st.mode = mode;
        st.failover = Failover::None;
        st.checkpoint_now = false;
        st.socket = Some(Arc::downgrade(socket));
        st.stats = CheckpointStats::default();
    }

    /// The mode this process is in (`none` outside COLO).
    pub fn mode(&self) -> ColoMode {
        self.lock().mode
    }

    /// `x-colo-lost-heartbeat`: asks the session to fail over, and shuts its connection
    /// down so that a session blocked on the peer notices at once.
    pub fn request_failover(&self) -> Result<(), FailoverError> {
        let mut st = self.lock();
        if st.mode == ColoMode::None {
            return Err(FailoverError::NotInColo);
        }
        if st.failover != Failover::None {
            return Err(FailoverError::AlreadyActive);
        }
        st.failover = Failover::Active;
        if let Some(fd) = st.socket.as_ref().and_then(Weak::upgrade) {
            crate::channels::transport::shutdown_socket(&fd);
        }
        drop(st);
        self.wake.notify_all();
        Ok(())
    }

    /// Whether a failover was asked for.
    pub(crate) fn failover_requested(&self) -> bool {
        self.lock().failover != Failover::None
    }

    /// `x-checkpoint-delay` was set: a primary in COLO checkpoints at once and counts
    /// the new delay from there (QEMU's `colo_checkpoint_delay_set`).
    pub(crate) fn delay_changed(&self) {
        let mut st = self.lock();
        if st.mode == ColoMode::Primary {
            st.checkpoint_now = true;
            drop(st);
            self.wake.notify_all();
        }
    }

    /// Waits until `deadline`, a checkpoint asked for now, or a failover. Returns
    /// whether a failover was asked for.
    pub(crate) fn wait_for_checkpoint(&self, deadline: Instant) -> bool {
        let mut st = self.lock();
        loop {
            if st.failover != Failover::None {
                return true;
            }
            if st.checkpoint_now {
                st.checkpoint_now = false;
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .wake
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits, however long it takes, for a failover request (after the peer was lost).
    pub(crate) fn wait_for_failover(&self) {
        let mut st = self.lock();
        while st.failover == Failover::None {
            st = self.wake.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The session acted on the failover request: COLO is over.
    pub(crate) fn failover_done(&self) {
        let mut st = self.lock();
        st.last_mode = st.mode;
        st.mode = ColoMode::None;
        st.failover = Failover::Completed;
        st.socket = None;
    }

    pub(crate) fn record_checkpoint(&self, took: Duration, bytes: u64, pages: u64) {
        self.lock().stats.record(took, bytes, pages);
    }

    pub fn checkpoint_stats(&self) -> CheckpointStats {
        self.lock().stats
    }

    /// `query-colo-status`, as QEMU computes it: the reason comes from the failover
    /// state (`processing` while a primary still is in COLO, `error` otherwise).
    pub fn query_status(&self) -> Value {
        let st = self.lock();
        let reason = match st.failover {
            Failover::None => ExitReason::None,
            Failover::Completed => ExitReason::Request,
            Failover::Active if st.mode == ColoMode::Primary => ExitReason::Processing,
            Failover::Active => ExitReason::Error,
        };
        json!({
            "mode": st.mode.name(),
            "last-mode": st.last_mode.name(),
            "reason": reason.name(),
        })
    }

    /// vmigrate's own figures for `query-migrate` (`x-vmigrate-colo`), once a COLO
    /// session has run.
    pub(crate) fn figures(&self) -> Option<Value> {
        let st = self.lock();
        (st.mode != ColoMode::None || st.last_mode != ColoMode::None).then(|| st.stats.to_json())
    }
}

/// Emits `COLO_EXIT` with the side and the reason.
pub(crate) fn emit_exit(events: &EventBus, mode: ColoMode, reason: ExitReason) {
    events.emit(
        "COLO_EXIT",
        Some(json!({"mode": mode.name(), "reason": reason.name()})),
    );
}

/// The largest device state a checkpoint may carry (nothing from the wire sizes an
/// allocation past it).
pub const MAX_DEVICE_STATE: u64 = 64 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    fn socket() -> Arc<OwnedFd> {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        Arc::new(OwnedFd::from(a))
    }

    #[test]
    fn a_failover_outside_colo_or_twice_is_refused_with_qemus_texts() {
        let colo = Colo::default();
        assert_eq!(
            colo.request_failover().unwrap_err().to_string(),
            "VM is not in COLO mode"
        );
        let s = socket();
        colo.enter(ColoMode::Secondary, &s);
        assert_eq!(colo.query_status()["reason"], "none");
        colo.request_failover().unwrap();
        assert_eq!(
            colo.request_failover().unwrap_err().to_string(),
            "COLO failover is already activated"
        );
        assert_eq!(colo.query_status()["reason"], "error");
        colo.failover_done();
        assert_eq!(
            colo.query_status(),
            json!({"mode": "none", "last-mode": "secondary", "reason": "request"})
        );
    }

    #[test]
    fn a_delay_change_wakes_the_primary_and_a_failover_ends_its_wait() {
        let colo = Arc::new(Colo::default());
        let s = socket();
        colo.enter(ColoMode::Primary, &s);
        let far = Instant::now() + Duration::from_secs(60);
        let c = colo.clone();
        let t = std::thread::spawn(move || c.wait_for_checkpoint(far));
        std::thread::sleep(Duration::from_millis(20));
        colo.delay_changed();
        assert!(!t.join().unwrap(), "a delay change is not a failover");
        let c = colo.clone();
        let t = std::thread::spawn(move || c.wait_for_checkpoint(far));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(colo.query_status()["reason"], "none");
        colo.request_failover().unwrap();
        assert_eq!(colo.query_status()["reason"], "processing");
        assert!(t.join().unwrap());
    }

    #[test]
    fn checkpoint_figures_add_up() {
        let mut s = CheckpointStats::default();
        s.record(Duration::from_micros(300), 4096, 1);
        s.record(Duration::from_micros(100), 8192, 2);
        assert_eq!(
            (s.checkpoints, s.total_us, s.max_us, s.last_us),
            (2, 400, 300, 100)
        );
        assert_eq!((s.total_bytes, s.last_pages), (12288, 2));
    }
}
