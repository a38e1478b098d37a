//! QEMU 10.0-compatible human monitor (HMP) commands for migration, mapped onto QMP.
//!
//! Each HMP command is carried out the way QEMU's own HMP does it: it runs one or more QMP
//! commands through a [`QmpExecutor`] and formats the replies as QEMU 10.0.2 prints them, byte
//! for byte. The crate knows nothing about the migration engine behind the executor.
//!
//! Implemented commands: `info status`, `info version`, `info migrate`,
//! `info migrate_capabilities`, `info migrate_parameters`, `info dirty_rate`,
//! `info vcpu_dirty_limit`, `info snapshots`, `migrate [-d] [-r] uri`,
//! `migrate_incoming uri`, `migrate_cancel`, `migrate_continue state`, `migrate_pause`,
//! `migrate_recover uri`, `migrate_start_postcopy`, `migrate_set_capability cap on|off`,
//! `migrate_set_parameter name value`, `calc_dirty_rate [-r] [-b] second [sample_pages]`,
//! `set_vcpu_dirty_limit dirty_rate [cpu_index]`, `cancel_vcpu_dirty_limit [cpu_index]`,
//! `savevm [tag]`, `loadvm tag`, `delvm tag`, `stop`, `cont`, `quit` and `help [cmd]`.
//! Any other command name gets QEMU's `unknown command: '<name>'`.
//!
//! ```
//! use serde_json::{json, Value};
//! use vmigrate_hmp::{run_command, QmpError, QmpExecutor};
//!
//! struct Paused;
//! impl QmpExecutor for Paused {
//!     fn execute(&mut self, command: &str, _arguments: Value) -> Result<Value, QmpError> {
//!         match command {
//!             "query-status" => Ok(json!({"status": "postmigrate", "running": false})),
//!             other => Err(QmpError::generic(format!("The command {other} has not been found"))),
//!         }
//!     }
//! }
//!
//! assert_eq!(run_command("info status", &mut Paused), "VM status: paused (postmigrate)\n");
//! assert_eq!(run_command("stop", &mut Paused), "Error: The command stop has not been found\n");
//! assert_eq!(run_command("foo", &mut Paused), "unknown command: 'foo'\n");
//! ```

mod command_line;
mod commands;
mod executor;
mod expression;
mod info;
mod numbers;
mod parameters;

#[cfg(test)]
mod tests;

use std::time::Duration;

pub use executor::{MigrationGlobals, QmpError, QmpExecutor, SnapshotOp};

/// The line a QEMU 10.0.2 monitor prints when a client connects (without the line ending).
pub const BANNER: &str = "QEMU 10.0.2 monitor - type 'help' for more information";

/// The prompt printed after the banner and after each command's output.
pub const PROMPT: &str = "(qemu) ";

/// How often a synchronous `migrate` (no `-d`) polls `query-migrate`; QEMU uses one second.
pub const MIGRATE_POLL_INTERVAL: Duration = Duration::from_millis(1000);

/// Runs one HMP command line and returns the text to print.
///
/// Every line of the result ends in `"\n"`; the caller converts to CRLF where the transport
/// needs it and prints [`PROMPT`] afterwards. An empty result means the command printed
/// nothing. `quit` runs the QMP `quit` command; ending the process or connection is up to the
/// executor.
pub fn run_command(line: &str, qmp: &mut dyn QmpExecutor) -> String {
    commands::run_line(line, qmp)
}
