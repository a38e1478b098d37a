//! Migration status and VM run state, with QEMU's names.

use std::fmt;

/// `MigrationStatus`, as QEMU names it.
///
/// Source transitions:
///
/// ```text
/// none ──migrate──▶ setup ──▶ active ──(converged)──▶ [pre-switchover ─▶] device ──▶ completed
///                     │          │                                          └──▶ failed
///                     └─(error)──┴──▶ failed
/// setup|active|pre-switchover|device ──migrate_cancel──▶ cancelling ──▶ cancelled
/// ```
///
/// Destination: `none ──migrate-incoming──▶ setup ──(stream starts)──▶ active ──▶ completed | failed`.
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
