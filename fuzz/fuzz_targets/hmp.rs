//! The HMP command line: command lookup, argument parsing by type (sizes, numbers,
//! expressions, flags), then the QMP commands it maps to (only those that stay inside
//! the process run; the others are refused as a monitor would refuse them).
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vmigrate_fuzz::{dispatcher, safe_command};
use vmigrate_hmp::{QmpError, QmpExecutor};
use vmigrate_qmp::dispatch::Session;

struct Exec(Session);

impl QmpExecutor for Exec {
    fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, QmpError> {
        if !safe_command(command) {
            return Err(QmpError {
                class: "GenericError".into(),
                desc: format!("{command} is not run here"),
            });
        }
        let args = arguments.as_object().cloned().unwrap_or_default();
        dispatcher()
            .execute(command, &args, &mut self.0)
            .map_err(|e| QmpError {
                class: e.class.to_string(),
                desc: e.desc,
            })
    }
    fn wait_before_migration_poll(&mut self, _interval: Duration) {}
    fn report_migration_error(&mut self, _error_desc: &str) {}
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut exec = Exec(Session::default());
    for line in text.lines().take(8) {
        let _ = vmigrate_hmp::run_command(line, &mut exec);
    }
});
