//! Migration status and VM run state, with QEMU's names.

use std::fmt;

/// `MigrationStatus`, as QEMU names it.
///
/// Every change is a compare-and-set from the state its writer expects
/// ([`MigrationStatus::may_become`] lists the edges; `Shared::transition` applies them),
/// so a session thread and `migrate_cancel` racing each other cannot overwrite one
/// another's outcome.
///
/// Source:
///
/// ```text
/// none|completed|failed|cancelled ──migrate──▶ setup ──▶ active ──(converged)──▶ [pre-switchover ─▶] device ──▶ completed
///                                                │         │                          │                 │
///                                                └─────────┴──────(error)─────────────┴─────────────────┴──▶ failed
/// setup|active|pre-switchover|device ──migrate_cancel──▶ cancelling ──▶ cancelled
///                                                                   └─(the stream was already whole)──▶ completed
///
/// active ──(migrate-start-postcopy)──▶ device ──(package sent)──▶ postcopy-active ──▶ completed | failed
/// ```
///
/// `postcopy-active` cannot be cancelled: the guest runs on the destination. A network
/// failure (or `migrate-pause`) pauses it instead, until a recovery:
///
/// ```text
/// postcopy-active|postcopy-recover ──(channel broke, migrate-pause)──▶ postcopy-paused
/// postcopy-paused ──migrate resume=true──▶ postcopy-recover-setup ──(connected)──▶ postcopy-recover
///                  └──(connect failed)──▶ postcopy-paused ◀──┘
/// postcopy-recover ──(RESUME_ACK)──▶ postcopy-active
/// ```
///
/// Destination: `none ──migrate-incoming──▶ setup ──(stream starts)──▶ active ──▶ completed | failed`
/// (and `setup ──▶ failed` when no connection could be accepted); with postcopy,
/// `active ──POSTCOPY_LISTEN──▶ postcopy-active ──▶ completed | failed`, and
/// `postcopy-active|postcopy-recover ──(channel broke, migrate-pause)──▶ postcopy-paused
/// ──(migrate-recover, then the source connects)──▶ postcopy-recover ──(POSTCOPY_RESUME)──▶
/// postcopy-active` (as QEMU 10.0's destination, it does not pass through
/// `postcopy-recover-setup`). A failure that is not the network's stays final.
///
/// With `x-colo` the first migration does not complete: both sides go on checkpointing
/// (see [`crate::colo`]) until a failover (`x-colo-lost-heartbeat`) completes them:
///
/// ```text
/// source:      device ──(stream sent)──▶ colo ──(failover)──▶ completed
/// destination: active ──(stream loaded)──▶ colo ──(failover)──▶ completed
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationStatus {
    None,
    Setup,
    Cancelling,
    Cancelled,
    Active,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecoverSetup,
    PostcopyRecover,
    Completed,
    Failed,
    Colo,
    PreSwitchover,
    Device,
    WaitUnplug,
}

impl MigrationStatus {
    pub const ALL: [MigrationStatus; 15] = [
        Self::None,
        Self::Setup,
        Self::Cancelling,
        Self::Cancelled,
        Self::Active,
        Self::PostcopyActive,
        Self::PostcopyPaused,
        Self::PostcopyRecoverSetup,
        Self::PostcopyRecover,
        Self::Completed,
        Self::Failed,
        Self::Colo,
        Self::PreSwitchover,
        Self::Device,
        Self::WaitUnplug,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Setup => "setup",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
            Self::Active => "active",
            Self::PostcopyActive => "postcopy-active",
            Self::PostcopyPaused => "postcopy-paused",
            Self::PostcopyRecoverSetup => "postcopy-recover-setup",
            Self::PostcopyRecover => "postcopy-recover",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Colo => "colo",
            Self::PreSwitchover => "pre-switchover",
            Self::Device => "device",
            Self::WaitUnplug => "wait-unplug",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// States in which a migration is "in progress" (blocks `migrate` and capability
    /// changes).
    pub fn is_running(self) -> bool {
        !matches!(
            self,
            Self::None | Self::Completed | Self::Failed | Self::Cancelled
        )
    }

    /// Whether a migration may go from `self` to `next`: the edges of the diagrams
    /// above. Anything else is a bug in the caller and is refused.
    pub fn may_become(self, next: MigrationStatus) -> bool {
        use MigrationStatus::*;
        match (self, next) {
            // A new migration starts from rest.
            (None | Completed | Failed | Cancelled, Setup) => true,
            (Setup, Active | Failed | Cancelling) => true,
            // Completed directly from active: a destination.
            (Active, PreSwitchover | Device | Completed | Failed | Cancelling) => true,
            // A postcopy destination: from POSTCOPY_LISTEN until the stream's end.
            (Active, PostcopyActive) => true,
            (PreSwitchover, Device | Failed | Cancelling) => true,
            (Device, Completed | Failed | Cancelling | PostcopyActive) => true,
            (PostcopyActive, Completed | Failed | PostcopyPaused) => true,
            // Recovery (see the diagram).
            (PostcopyPaused, PostcopyRecoverSetup | PostcopyRecover | Failed) => true,
            (PostcopyRecoverSetup, PostcopyRecover | PostcopyPaused | Failed) => true,
            (PostcopyRecover, PostcopyActive | PostcopyPaused | Failed) => true,
            // A cancel that came after the whole stream was out does not undo it.
            (Cancelling, Cancelled | Completed) => true,
            // COLO, entered at the end of the first migration, left by a failover.
            (Active | Device, Colo) => true,
            (Colo, Completed) => true,
            _ => false,
        }
    }

    /// Whether a migration in this state has ended (or never started).
    pub fn is_terminal(self) -> bool {
        !self.is_running()
    }

    pub fn is_postcopy(self) -> bool {
        matches!(
            self,
            Self::PostcopyActive
                | Self::PostcopyPaused
                | Self::PostcopyRecoverSetup
                | Self::PostcopyRecover
        )
    }
}

impl fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A status change that the state machine does not allow from where the migration
/// really is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("migration status cannot go from {current} to {next} (expected to be in {expected})")]
pub struct StatusError {
    pub expected: MigrationStatus,
    pub current: MigrationStatus,
    pub next: MigrationStatus,
}

/// The VM run state (`RunState` in QEMU's schema), for the states vmigrate reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    InMigrate,
    FinishMigrate,
    PostMigrate,
    Prelaunch,
    Shutdown,
    Suspended,
    InternalError,
    /// An internal snapshot is being loaded (`loadvm`, `snapshot-load`).
    RestoreVm,
    /// An internal snapshot is being saved (`savevm`, `snapshot-save`).
    SaveVm,
    /// COLO: the VM is stopped for a checkpoint (primary) or holds the last one
    /// (secondary).
    Colo,
}

impl RunState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::InMigrate => "inmigrate",
            Self::FinishMigrate => "finish-migrate",
            Self::PostMigrate => "postmigrate",
            Self::Prelaunch => "prelaunch",
            Self::Shutdown => "shutdown",
            Self::Suspended => "suspended",
            Self::InternalError => "internal-error",
            Self::RestoreVm => "restore-vm",
            Self::SaveVm => "save-vm",
            Self::Colo => "colo",
        }
    }

    /// Maps a run state received in `globalstate`; states vmigrate cannot enter on a
    /// destination become `paused`, as for any non-running state.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "running" => Self::Running,
            "paused" => Self::Paused,
            "inmigrate" => Self::InMigrate,
            "finish-migrate" => Self::FinishMigrate,
            "postmigrate" => Self::PostMigrate,
            "prelaunch" => Self::Prelaunch,
            "shutdown" => Self::Shutdown,
            "suspended" => Self::Suspended,
            "internal-error" => Self::InternalError,
            "restore-vm" => Self::RestoreVm,
            "save-vm" => Self::SaveVm,
            "colo" => Self::Colo,
            _ => return None,
        })
    }

    pub fn is_running(self) -> bool {
        self == Self::Running
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_follow_the_diagram() {
        use MigrationStatus::*;
        let ok = [
            (None, Setup),
            (Setup, Active),
            (Active, PreSwitchover),
            (PreSwitchover, Device),
            (Device, Completed),
            (Active, Cancelling),
            (Cancelling, Cancelled),
            (Cancelling, Completed),
            (Device, Failed),
            (Failed, Setup),
            (Device, PostcopyActive),
            (Active, PostcopyActive),
            (PostcopyActive, Completed),
            (PostcopyActive, Failed),
            (PostcopyActive, PostcopyPaused),
            (PostcopyPaused, PostcopyRecoverSetup),
            (PostcopyRecoverSetup, PostcopyPaused),
            (PostcopyRecoverSetup, PostcopyRecover),
            (PostcopyPaused, PostcopyRecover),
            (PostcopyRecover, PostcopyActive),
            (PostcopyRecover, PostcopyPaused),
            (Device, Colo),
            (Active, Colo),
            (Colo, Completed),
        ];
        for (a, b) in ok {
            assert!(a.may_become(b), "{a} -> {b}");
        }
        let refused = [
            (Completed, Active),
            (Cancelled, Cancelling),
            (Cancelling, Active),
            (Cancelling, Failed),
            (Device, Active),
            (None, Completed),
            (Setup, Setup),
            (Active, Setup),
            (PostcopyActive, Cancelling),
            (PostcopyActive, Active),
            (PostcopyPaused, PostcopyActive),
            (PostcopyPaused, Cancelling),
            (PostcopyRecoverSetup, PostcopyActive),
            (PostcopyPaused, Completed),
            (Colo, Cancelling),
            (Colo, Failed),
            (Setup, Colo),
        ];
        for (a, b) in refused {
            assert!(!a.may_become(b), "{a} -> {b}");
        }
        // No edge leaves a terminal state except to start again.
        for from in MigrationStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in MigrationStatus::ALL {
                assert_eq!(from.may_become(to), to == Setup, "{from} -> {to}");
            }
        }
    }
}
