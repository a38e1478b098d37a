//! The seam between the human monitor and whatever answers QMP commands.

use std::time::Duration;

use thiserror::Error;

/// An error reply to a QMP command: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{desc}")]
pub struct QmpError {
    /// The QMP error class, almost always `GenericError`.
    pub class: String,
    /// The human-readable description; HMP prints it as `Error: <desc>`.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError` with the given description.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: "GenericError".to_owned(),
            desc: desc.into(),
        }
    }
}

/// The migration object's own properties that `info migrate` prints in its `globals:` block.
///
/// QEMU takes these from its migration object (they are set with `-global migration.<prop>`),
/// not from any QMP command, so the executor supplies them directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationGlobals {
    /// `store-global-state`: the run state travels in the `globalstate` section.
    pub store_global_state: bool,
    /// `only-migratable`: QEMU was started with `-only-migratable`.
    pub only_migratable: bool,
    /// `send-configuration`: the stream carries the configuration section.
    pub send_configuration: bool,
    /// `send-section-footer`: sections end in a footer byte.
    pub send_section_footer: bool,
    /// `send-switchover-start`: the source announces the switchover start.
    pub send_switchover_start: bool,
    /// `x-clear-bitmap-shift`: log2 of the pages covered by one dirty-bitmap clear chunk.
    pub clear_bitmap_shift: u8,
}

impl Default for MigrationGlobals {
    /// The values of QEMU 10.0 with no `-global migration.*` options.
    fn default() -> Self {
        Self {
            store_global_state: true,
            only_migratable: false,
            send_configuration: true,
            send_section_footer: true,
            send_switchover_start: true,
            clear_bitmap_shift: 18,
        }
    }
}

/// An internal-snapshot operation of the human monitor, which QEMU carries out without
/// a QMP command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotOp<'a> {
    /// `savevm [tag]`.
    Save(Option<&'a str>),
    /// `loadvm tag`.
    Load(&'a str),
    /// `delvm tag`.
    Delete(&'a str),
    /// `info snapshots`: succeeds when snapshots could be listed (there are none).
    List,
}

/// Runs QMP commands on behalf of the human monitor.
///
/// Only [`execute`](QmpExecutor::execute) is required. The other methods have defaults that
/// behave like QEMU itself; override them to report real settings or to avoid blocking.
pub trait QmpExecutor {
    /// Runs one QMP command; `arguments` is a JSON object (may be empty).
    fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, QmpError>;

    /// The values printed in the `globals:` block of `info migrate`.
    ///
    /// The default is QEMU 10.0's default configuration; override it when the migration object
    /// was configured differently (for example `-only-migratable`).
    fn migration_globals(&mut self) -> MigrationGlobals {
        MigrationGlobals::default()
    }

    /// Called between two `query-migrate` polls while a synchronous `migrate` (no `-d`) waits.
    ///
    /// The default sleeps for `interval` (QEMU polls once a second, see
    /// [`MIGRATE_POLL_INTERVAL`](crate::MIGRATE_POLL_INTERVAL)). An executor that must keep
    /// serving events meanwhile can do that here instead.
    fn wait_before_migration_poll(&mut self, interval: Duration) {
        std::thread::sleep(interval);
    }

    /// Carries out an internal-snapshot operation (`savevm`, `loadvm`, `delvm`,
    /// `info snapshots`).
    ///
    /// The default refuses every operation: a VM has to say how it stores snapshots.
    fn internal_snapshot(&mut self, op: SnapshotOp<'_>) -> Result<(), QmpError> {
        let _ = op;
        Err(QmpError::generic(
            "internal snapshots are not available on this monitor",
        ))
    }

    /// Receives the `error-desc` of a synchronous `migrate` that ended in failure.
    ///
    /// QEMU reports it on its standard error, not on the monitor; the default does the same.
    fn report_migration_error(&mut self, error_desc: &str) {
        eprintln!("{error_desc}");
    }
}
