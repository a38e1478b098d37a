//! Golden tests: QMP replies captured from QEMU 10.0.2 are fed to the commands, and the text
//! must equal what QEMU's own monitor printed for the same state (see `testdata/README.md`).

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::{json, Value};

use crate::{run_command, MigrationGlobals, QmpError, QmpExecutor, MIGRATE_POLL_INTERVAL};

/// A QMP executor with canned replies that records every call.
#[derive(Debug, Default)]
struct FakeQmp {
    /// Queued replies per command; the last one of a command is reused once the queue is down
    /// to it. Commands without replies succeed with `{}`.
    replies: Vec<(String, VecDeque<Result<Value, QmpError>>)>,
    /// Every command executed, with its arguments.
    calls: Vec<(String, Value)>,
    /// The intervals passed to `wait_before_migration_poll`.
    waits: Vec<Duration>,
    /// The texts passed to `report_migration_error`.
    reported_errors: Vec<String>,
    /// Overrides the default globals when set.
    globals: Option<MigrationGlobals>,
}

impl FakeQmp {
    /// Queues a reply for `command`.
    fn reply(mut self, command: &str, reply: Result<Value, QmpError>) -> Self {
        match self.replies.iter_mut().find(|(name, _)| name == command) {
            Some((_, queue)) => queue.push_back(reply),
            None => self
                .replies
                .push((command.to_owned(), VecDeque::from([reply]))),
        }
        self
    }

    /// Queues a successful reply for `command`.
    fn ok(self, command: &str, reply: Value) -> Self {
        self.reply(command, Ok(reply))
    }

    /// Queues a `GenericError` reply for `command`.
    fn error(self, command: &str, desc: &str) -> Self {
        self.reply(command, Err(QmpError::generic(desc)))
    }

    /// The commands executed, without the `query-*` ones.
    fn actions(&self) -> Vec<(String, Value)> {
        self.calls
            .iter()
            .filter(|(command, _)| !command.starts_with("query-"))
            .cloned()
            .collect()
    }
}

impl QmpExecutor for FakeQmp {
    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.calls.push((command.to_owned(), arguments));
        match self.replies.iter_mut().find(|(name, _)| name == command) {
            Some((_, queue)) if queue.len() > 1 => queue.pop_front().unwrap_or(Ok(json!({}))),
            Some((_, queue)) => queue.front().cloned().unwrap_or(Ok(json!({}))),
            None => Ok(json!({})),
        }
    }

    fn migration_globals(&mut self) -> MigrationGlobals {
        self.globals.unwrap_or_default()
    }

    fn wait_before_migration_poll(&mut self, interval: Duration) {
        self.waits.push(interval);
    }

    fn report_migration_error(&mut self, error_desc: &str) {
        self.reported_errors.push(error_desc.to_owned());
    }
}

/// One captured pair: the QMP reply and the HMP text QEMU printed for it.
struct Capture {
    name: &'static str,
    reply: &'static str,
    text: &'static str,
}

macro_rules! capture {
    ($name:literal) => {
        Capture {
            name: $name,
            reply: include_str!(concat!("../testdata/qemu-10.0.2/", $name, ".json")),
            text: include_str!(concat!("../testdata/qemu-10.0.2/", $name, ".txt")),
        }
    };
}

impl Capture {
    fn reply(&self) -> Value {
        serde_json::from_str(self.reply)
            .unwrap_or_else(|error| panic!("{}.json does not parse: {error}", self.name))
    }
}

/// Runs `line` with `query` answering `capture`'s reply and compares against its text.
fn assert_capture(line: &str, query: &str, capture: &Capture) {
    let mut qmp = FakeQmp::default().ok(query, capture.reply());
    assert_eq!(
        run_command(line, &mut qmp),
        capture.text,
        "capture {}",
        capture.name
    );
    assert_eq!(
        qmp.actions(),
        vec![],
        "capture {} changed state",
        capture.name
    );
}

#[test]
fn info_migrate_matches_qemu_in_every_captured_state() {
    let captures = [
        capture!("none"),
        capture!("reference_active_dirtying"),
        capture!("reference_blocked"),
        capture!("src_active"),
        capture!("active_xbzrle"),
        capture!("src_postcopy_active"),
        capture!("src_completed"),
        capture!("completed_xbzrle"),
        capture!("cancelled"),
        capture!("failed"),
        capture!("dest_setup_tcp"),
        capture!("dest_setup_tcp_dual"),
        capture!("dest_setup_unix"),
        capture!("dest_active_unix"),
        capture!("dest_postcopy_active"),
        capture!("dest_completed"),
        capture!("dest_completed_smp3"),
    ];
    for capture in &captures {
        assert_capture("info migrate", "query-migrate", capture);
    }
}

#[test]
fn info_migrate_optional_lines() {
    let globals = MigrationGlobals {
        only_migratable: true,
        clear_bitmap_shift: 20,
        ..MigrationGlobals::default()
    };
    let mut qmp = FakeQmp {
        globals: Some(globals),
        ..FakeQmp::default()
    }
    .ok(
        "query-migrate",
        json!({
            "status": "postcopy-paused",
            "error-desc": "Postcopy migration is paused by the user",
            "setup-time": 1, "downtime": 3, "total-time": 5122,
            "ram": {"total": 268967936, "postcopy-requests": 14, "dirty-sync-count": 3,
                    "multifd-bytes": 2048, "pages-per-second": 16640, "downtime-bytes": 4096,
                    "page-size": 4096, "remaining": 39981056, "postcopy-bytes": 27184128,
                    "mbps": 0.125, "transferred": 127935488,
                    "dirty-sync-missed-zero-copy": 7, "precopy-bytes": 100723712,
                    "duplicate": 49167, "dirty-pages-rate": 3948, "normal-bytes": 127217664,
                    "normal": 31059},
            "xbzrle-cache": {"encoding-rate": 2.5, "bytes": 10240, "cache-size": 134217728,
                             "cache-miss-rate": 0.375, "pages": 9, "overflow": 1,
                             "cache-miss": 7936},
            "cpu-throttle-percentage": 20,
            "dirty-limit-throttle-time-per-round": 0,
            "dirty-limit-ring-full-time": 12,
            "postcopy-blocktime": 176,
            "postcopy-vcpu-blocktime": [176, 3, 4],
            "socket-address": [{"type": "vsock", "cid": "3", "port": "4444"},
                               {"type": "fd", "str": "mig"}],
            "vfio": {"transferred": 5120},
            "blocked-reasons": ["reason one", "reason two"]
        }),
    );
    let expected = "globals:\n\
        store-global-state: on\n\
        only-migratable: on\n\
        send-configuration: on\n\
        send-section-footer: on\n\
        send-switchover-start: on\n\
        clear-bitmap-shift: 20\n\
        Outgoing migration blocked:\n  reason one\n  reason two\n\
        Migration status: postcopy-paused\n\
        total time: 5122 ms\n\
        downtime: 3 ms\n\
        setup: 1 ms\n\
        transferred ram: 124937 kbytes\n\
        throughput: 0.12 mbps\n\
        remaining ram: 39044 kbytes\n\
        total ram: 262664 kbytes\n\
        duplicate: 49167 pages\n\
        normal: 31059 pages\n\
        normal bytes: 124236 kbytes\n\
        dirty sync count: 3\n\
        page size: 4 kbytes\n\
        multifd bytes: 2 kbytes\n\
        pages-per-second: 16640\n\
        dirty pages rate: 3948 pages\n\
        postcopy request count: 14\n\
        precopy ram: 98363 kbytes\n\
        downtime ram: 4 kbytes\n\
        postcopy ram: 26547 kbytes\n\
        Zero-copy-send fallbacks happened: 7 times\n\
        cache size: 134217728 bytes\n\
        xbzrle transferred: 10 kbytes\n\
        xbzrle pages: 9 pages\n\
        xbzrle cache miss: 7936 pages\n\
        xbzrle cache miss rate: 0.38\n\
        xbzrle encoding rate: 2.50\n\
        xbzrle overflow: 1\n\
        cpu throttle percentage: 20\n\
        dirty-limit throttle time: 0 us\n\
        dirty-limit ring full time: 12 us\n\
        postcopy blocktime: 176\n\
        postcopy vcpu blocktime: 3-4,176\n\
        socket address: [\n\tvsock:3:4444\n\tfd:mig\n]\n\
        vfio device transferred: 5 kbytes\n";
    assert_eq!(run_command("info migrate", &mut qmp), expected);
}

#[test]
fn info_capabilities_parameters_status_and_version_match_qemu() {
    for capture in [capture!("caps_default"), capture!("caps_some_on")] {
        assert_capture(
            "info migrate_capabilities",
            "query-migrate-capabilities",
            &capture,
        );
    }
    for capture in [capture!("params_default"), capture!("params_modified")] {
        assert_capture(
            "info migrate_parameters",
            "query-migrate-parameters",
            &capture,
        );
    }
    for capture in [
        capture!("status_running"),
        capture!("status_paused"),
        capture!("status_inmigrate"),
        capture!("status_postmigrate"),
        capture!("status_dest_after"),
    ] {
        assert_capture("info status", "query-status", &capture);
    }
    assert_capture("info version", "query-version", &capture!("version"));
}

#[test]
fn capabilities_are_printed_as_the_query_returns_them() {
    let mut qmp = FakeQmp::default().ok(
        "query-migrate-capabilities",
        json!([{"state": true, "capability": "future-cap"}, {"state": false, "capability": "xbzrle"}]),
    );
    assert_eq!(
        run_command("info migrate_capabilities", &mut qmp),
        "future-cap: on\nxbzrle: off\n"
    );
}

/// Runs `migrate_set_parameter name value` and returns the output and the QMP actions.
fn set_parameter(name: &str, value: &str) -> (String, Vec<(String, Value)>) {
    let mut qmp = FakeQmp::default();
    let output = run_command(&format!("migrate_set_parameter {name} {value}"), &mut qmp);
    (output, qmp.actions())
}

#[test]
fn migrate_set_parameter_sends_parsed_values() {
    let cases: &[(&str, &str, Value)] = &[
        ("max-bandwidth", "100", json!(104_857_600)),
        ("max-bandwidth", "100k", json!(102_400)),
        ("avail-switchover-bandwidth", "1.5M", json!(1_572_864)),
        ("max-bandwidth", "0x10", json!(16_777_216)),
        ("downtime-limit", "1k", json!(1024)),
        ("downtime-limit", "0x10", json!(16)),
        ("xbzrle-cache-size", "1g", json!(1_073_741_824)),
        ("max-postcopy-bandwidth", "2K", json!(2048)),
        ("announce-step", "010", json!(10)),
        ("multifd-channels", "010", json!(8)),
        ("x-checkpoint-delay", "0xff", json!(255)),
        ("cpu-throttle-tailslow", "yes", json!(true)),
        ("direct-io", "false", json!(false)),
        ("multifd-compression", "zlib", json!("zlib")),
        ("mode", "cpr-reboot", json!("cpr-reboot")),
        ("tls-hostname", "''", json!("''")),
        ("tls-creds", "\"a b\"", json!("a b")),
        ("tls-authz", "\"\"", json!("")),
    ];
    for (name, value, expected) in cases {
        let (output, actions) = set_parameter(name, value);
        assert_eq!(output, "", "{name} {value}");
        assert_eq!(
            actions,
            vec![(
                "migrate-set-parameters".to_owned(),
                json!({ *name: expected })
            )],
            "{name} {value}"
        );
    }
}

#[test]
fn migrate_set_parameter_refusals_match_qemu() {
    let not_a_size = "expects a non-negative number below 2^64\n\
        Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
        and exabytes, respectively.";
    let cases = [
        (
            "nosuch",
            "5",
            "Error: invalid parameter value: nosuch\n".to_owned(),
        ),
        ("max-bandwidth", "-5", "Error: Invalid size -5\n".to_owned()),
        (
            "max-bandwidth",
            "abc",
            "Error: Invalid size abc\n".to_owned(),
        ),
        (
            "max-bandwidth",
            "9223372036854775808",
            "Error: Invalid size 9223372036854775808\n".to_owned(),
        ),
        (
            "downtime-limit",
            "-5",
            "Error: Value '-5' is out of range for parameter 'downtime-limit'\n".to_owned(),
        ),
        (
            "downtime-limit",
            "'5'",
            format!("Error: Parameter 'downtime-limit' {not_a_size}\n"),
        ),
        (
            "announce-initial",
            "1.5",
            format!("Error: Parameter 'announce-initial' {not_a_size}\n"),
        ),
        (
            "xbzrle-cache-size",
            "9223372036854775808",
            "Error: Invalid size 9223372036854775808\n".to_owned(),
        ),
        (
            "multifd-channels",
            "256",
            "Error: Parameter 'multifd-channels' expects uint8_t\n".to_owned(),
        ),
        (
            "multifd-channels",
            "-1",
            "Error: Parameter 'multifd-channels' expects uint8_t\n".to_owned(),
        ),
        (
            "multifd-channels",
            "abc",
            "Error: Parameter 'multifd-channels' expects uint64\n".to_owned(),
        ),
        (
            "x-checkpoint-delay",
            "4294967296",
            "Error: Parameter 'x-checkpoint-delay' expects uint32_t\n".to_owned(),
        ),
        (
            "cpu-throttle-tailslow",
            "1",
            "Error: Parameter 'cpu-throttle-tailslow' expects 'on' or 'off'\n".to_owned(),
        ),
        (
            "block-bitmap-mapping",
            "x",
            "Error: The block-bitmap-mapping parameter can only be set through QMP\n".to_owned(),
        ),
    ];
    for (name, value, expected) in cases {
        let (output, actions) = set_parameter(name, value);
        assert_eq!(output, expected, "{name} {value}");
        assert_eq!(actions, vec![], "{name} {value} reached QMP");
    }
}

#[test]
fn migrate_set_parameter_prints_qmp_range_errors() {
    let mut qmp = FakeQmp::default().error(
        "migrate-set-parameters",
        "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms",
    );
    assert_eq!(
        run_command("migrate_set_parameter downtime-limit 3000000", &mut qmp),
        "Error: Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms\n"
    );
    assert_eq!(
        qmp.actions(),
        vec![(
            "migrate-set-parameters".to_owned(),
            json!({"downtime-limit": 3_000_000})
        )]
    );
}

#[test]
fn migrate_set_parameter_argument_errors() {
    let (output, actions) = set_parameter("max-bandwidth", "");
    assert_eq!(
        output,
        "migrate_set_parameter: string expected\n\
         Try \"help migrate_set_parameter\" for more information\n"
    );
    assert!(actions.is_empty());
    let (output, _) = set_parameter("cpu-throttle-tailslow", "on x");
    assert_eq!(
        output,
        "migrate_set_parameter: extraneous characters at the end of line\n\
         Try \"help migrate_set_parameter\" for more information\n"
    );
}

#[test]
fn migrate_set_capability() {
    let capabilities = json!([{"state": false, "capability": "xbzrle"},
                              {"state": false, "capability": "events"}]);
    let mut qmp = FakeQmp::default().ok("query-migrate-capabilities", capabilities.clone());
    assert_eq!(
        run_command("migrate_set_capability events on", &mut qmp),
        ""
    );
    assert_eq!(
        qmp.actions(),
        vec![(
            "migrate-set-capabilities".to_owned(),
            json!({"capabilities": [{"capability": "events", "state": true}]})
        )]
    );

    let try_help = "Try \"help migrate_set_capability\" for more information\n";
    for line in [
        "migrate_set_capability xbzrle yes",
        "migrate_set_capability xbzrle true",
        "migrate_set_capability xbzrle 1",
        "migrate_set_capability xbzrle",
        "migrate_set_capability xbzrle \"on\"",
    ] {
        let mut qmp = FakeQmp::default().ok("query-migrate-capabilities", capabilities.clone());
        assert_eq!(
            run_command(line, &mut qmp),
            format!("Expected 'on' or 'off'\n{try_help}"),
            "{line}"
        );
        assert!(qmp.calls.is_empty(), "{line}");
    }

    let mut qmp = FakeQmp::default();
    assert_eq!(
        run_command("migrate_set_capability", &mut qmp),
        format!("migrate_set_capability: string expected\n{try_help}")
    );

    let mut qmp = FakeQmp::default().ok("query-migrate-capabilities", capabilities.clone());
    assert_eq!(
        run_command("migrate_set_capability nosuch on", &mut qmp),
        "Error: invalid parameter value: nosuch\n"
    );
    assert_eq!(qmp.actions(), vec![]);

    let mut qmp = FakeQmp::default()
        .ok("query-migrate-capabilities", capabilities)
        .error(
            "migrate-set-capabilities",
            "There's a migration process in progress",
        );
    assert_eq!(
        run_command("migrate_set_capability xbzrle off", &mut qmp),
        "Error: There's a migration process in progress\n"
    );
}

#[test]
fn unknown_commands_and_argument_errors() {
    let cases = [
        ("foo", "unknown command: 'foo'\n"),
        ("INFO status", "unknown command: 'INFO'\n"),
        ("info foo", "unknown command: 'info foo'\n"),
        ("info Status", "unknown command: 'info Status'\n"),
        ("h", "unknown command: 'h'\n"),
        ("", ""),
        ("   ", ""),
        (
            "migrate",
            "migrate: string expected\nTry \"help migrate\" for more information\n",
        ),
        (
            "migrate -x tcp:1",
            "migrate: unsupported option -x\nTry \"help migrate\" for more information\n",
        ),
        (
            "migrate -d -d unix:/nonexist",
            "migrate: unsupported option -d\nTry \"help migrate\" for more information\n",
        ),
        (
            "migrate -dr unix:/nonexist",
            "migrate: extraneous characters at the end of line\nTry \"help migrate\" for more information\n",
        ),
        (
            "migrate_incoming \"a b",
            "unterminated string\nmigrate_incoming: string expected\nTry \"help migrate_incoming\" for more information\n",
        ),
        (
            "migrate_incoming \"a\\\"b\\x\"",
            "unsupported escape code: '\\x'\nmigrate_incoming: string expected\nTry \"help migrate_incoming\" for more information\n",
        ),
        (
            "migrate_incoming a b",
            "migrate_incoming: extraneous characters at the end of line\nTry \"help migrate_incoming\" for more information\n",
        ),
        (
            "migrate_cancel extra",
            "migrate_cancel: extraneous characters at the end of line\nTry \"help migrate_cancel\" for more information\n",
        ),
        (
            "stop x",
            "stop|s: extraneous characters at the end of line\nTry \"help stop\" for more information\n",
        ),
        (
            "s x",
            "stop|s: extraneous characters at the end of line\nTry \"help s\" for more information\n",
        ),
        (
            "c x",
            "cont|c: extraneous characters at the end of line\nTry \"help c\" for more information\n",
        ),
        (
            "q x",
            "quit|q: extraneous characters at the end of line\nTry \"help q\" for more information\n",
        ),
        (
            "info status x",
            "status: extraneous characters at the end of line\nTry \"help info status\" for more information\n",
        ),
        (
            "info migrate x",
            "migrate: extraneous characters at the end of line\nTry \"help info migrate\" for more information\n",
        ),
    ];
    for (line, expected) in cases {
        let mut qmp = FakeQmp::default();
        assert_eq!(run_command(line, &mut qmp), expected, "{line:?}");
        assert!(qmp.calls.is_empty(), "{line:?} reached QMP");
    }
}

#[test]
fn help_texts_match_qemu() {
    let cases = [
        (
            "help migrate",
            "migrate [-d] [-r] uri -- migrate to URI (using -d to not wait for completion)\n\t\t\t -r to resume a paused postcopy migration\n",
        ),
        ("help migrate x", "migrate [-d] [-r] uri -- migrate to URI (using -d to not wait for completion)\n\t\t\t -r to resume a paused postcopy migration\n"),
        ("help migrate_cancel", "migrate_cancel  -- cancel the current VM migration\n"),
        ("help migrate_pause", "migrate_pause  -- Pause an ongoing migration (postcopy-only)\n"),
        ("help migrate_set_parameter", "migrate_set_parameter parameter value -- Set the parameter for migration\n"),
        ("help migrate_set_capability", "migrate_set_capability capability state -- Enable/Disable the usage of a capability for migration\n"),
        ("help migrate_incoming", "migrate_incoming uri -- Continue an incoming migration from an -incoming defer\n"),
        ("help migrate_continue", "migrate_continue state -- Continue migration from the given paused state\n"),
        ("help migrate_recover", "migrate_recover uri -- Continue a paused incoming postcopy migration\n"),
        ("help stop", "stop|s  -- stop emulation\n"),
        ("help s", "stop|s  -- stop emulation\n"),
        ("help cont", "cont|c  -- resume emulation\n"),
        ("help quit", "quit|q  -- quit the emulator\n"),
        ("help help", "help|? [cmd] -- show the help\n"),
        ("help ?", "help|? [cmd] -- show the help\n"),
        ("? migrate_cancel", "migrate_cancel  -- cancel the current VM migration\n"),
        ("help info status", "info status  -- show the current VM status (running|paused)\n"),
        ("help info migrate", "info migrate  -- show migration status\n"),
        ("help info version", "info version  -- show the version of QEMU\n"),
        ("help foo", "unknown command: 'foo'\n"),
        (
            "help calc_dirty_rate",
            "calc_dirty_rate [-r] [-b] second [sample_pages_per_GB] -- start a round of guest dirty rate measurement (using -r to\n\t\t\t specify dirty ring as the method of calculation and\n\t\t\t -b to specify dirty bitmap as method of calculation)\n",
        ),
        (
            "help set_vcpu_dirty_limit",
            "set_vcpu_dirty_limit dirty_rate [cpu_index] -- set dirty page rate limit, use cpu_index to set limit\n\t\t\t\t\t on a specified virtual cpu\n",
        ),
        (
            "help cancel_vcpu_dirty_limit",
            "cancel_vcpu_dirty_limit [cpu_index] -- cancel dirty page rate limit, use cpu_index to cancel\n\t\t\t\t\t limit on a specified virtual cpu\n",
        ),
        ("help savevm", "savevm tag -- save a VM snapshot. If no tag is provided, a new snapshot is created\n"),
        ("help loadvm", "loadvm tag -- restore a VM snapshot from its tag\n"),
        ("help delvm", "delvm tag -- delete a VM snapshot from its tag\n"),
        ("help info snapshots", "info snapshots  -- show the currently saved VM snapshots\n"),
        ("help info vcpu_dirty_limit", "info vcpu_dirty_limit  -- show dirty page limit information of all vCPU\n"),
        ("help info foo", "unknown command: 'info foo'\n"),
        (
            "help x_colo_lost_heartbeat",
            "x_colo_lost_heartbeat  -- Tell COLO that heartbeat is lost,\n\t\t\ta failover or takeover is needed.\n",
        ),
    ];
    for (line, expected) in cases {
        let mut qmp = FakeQmp::default();
        assert_eq!(run_command(line, &mut qmp), expected, "{line:?}");
    }
    let info_list = "info dirty_rate  -- show dirty rate information\n\
        info migrate  -- show migration status\n\
        info migrate_capabilities  -- show current migration capabilities\n\
        info migrate_parameters  -- show current migration parameters\n\
        info snapshots  -- show the currently saved VM snapshots\n\
        info status  -- show the current VM status (running|paused)\n\
        info vcpu_dirty_limit  -- show dirty page limit information of all vCPU\n\
        info version  -- show the version of QEMU\n";
    assert_eq!(run_command("info", &mut FakeQmp::default()), info_list);
    assert_eq!(run_command("help info", &mut FakeQmp::default()), info_list);
    let all = run_command("help", &mut FakeQmp::default());
    assert!(all.starts_with("calc_dirty_rate [-r] [-b] second [sample_pages_per_GB] -- "));
    assert!(all.contains("cont|c  -- resume emulation\ndelvm tag -- delete a VM snapshot from its tag\nhelp|? [cmd] -- show the help\n"));
    assert!(all.ends_with("quit|q  -- quit the emulator\nsavevm tag -- save a VM snapshot. If no tag is provided, a new snapshot is created\nset_vcpu_dirty_limit dirty_rate [cpu_index] -- set dirty page rate limit, use cpu_index to set limit\n\t\t\t\t\t on a specified virtual cpu\nstop|s  -- stop emulation\nx_colo_lost_heartbeat  -- Tell COLO that heartbeat is lost,\n\t\t\ta failover or takeover is needed.\n"));
}

#[test]
fn synchronous_migrate_polls_until_the_migration_settles() {
    let mut qmp = FakeQmp::default()
        .ok("query-migrate", json!({"status": "setup"}))
        .ok("query-migrate", json!({"status": "active"}))
        .ok(
            "query-migrate",
            json!({"status": "failed", "error-desc": "Failed to connect to '127.0.0.1:1': Connection refused"}),
        );
    assert_eq!(run_command("migrate tcp:127.0.0.1:1", &mut qmp), "");
    assert_eq!(
        qmp.calls.first(),
        Some(&(
            "migrate".to_owned(),
            json!({"uri": "tcp:127.0.0.1:1", "resume": false})
        ))
    );
    assert_eq!(qmp.waits, vec![MIGRATE_POLL_INTERVAL; 2]);
    assert_eq!(
        qmp.reported_errors,
        vec!["Failed to connect to '127.0.0.1:1': Connection refused".to_owned()]
    );

    // Any state other than setup and active ends the wait, without a report when all is well.
    let mut qmp = FakeQmp::default().ok("query-migrate", json!({"status": "pre-switchover"}));
    assert_eq!(run_command("migrate exec:cat", &mut qmp), "");
    assert!(qmp.waits.is_empty());
    assert!(qmp.reported_errors.is_empty());
}

#[test]
fn detached_and_resumed_migrate() {
    let mut qmp = FakeQmp::default();
    assert_eq!(
        run_command("migrate -d -r unix:/run/mig.sock", &mut qmp),
        ""
    );
    assert_eq!(
        qmp.calls,
        vec![(
            "migrate".to_owned(),
            json!({"uri": "unix:/run/mig.sock", "resume": true})
        )]
    );

    let mut qmp = FakeQmp::default().error("migrate", "unknown migration protocol: foo:bar");
    assert_eq!(
        run_command("migrate foo:bar", &mut qmp),
        "Error: unknown migration protocol: foo:bar\n"
    );
    assert_eq!(qmp.calls.len(), 1, "no polling after a refused migrate");
}

#[test]
fn commands_that_map_one_to_one() {
    let cases: &[(&str, &str, Value)] = &[
        (
            "migrate_incoming tcp:127.0.0.1:0",
            "migrate-incoming",
            json!({"uri": "tcp:127.0.0.1:0", "exit-on-error": false}),
        ),
        (
            "migrate_continue pre-switchover",
            "migrate-continue",
            json!({"state": "pre-switchover"}),
        ),
        ("migrate_pause", "migrate-pause", json!({})),
        ("x_colo_lost_heartbeat", "x-colo-lost-heartbeat", json!({})),
        (
            "migrate_recover tcp:0:4444",
            "migrate-recover",
            json!({"uri": "tcp:0:4444"}),
        ),
        (
            "migrate_start_postcopy",
            "migrate-start-postcopy",
            json!({}),
        ),
        ("migrate_cancel", "migrate_cancel", json!({})),
        ("stop", "stop", json!({})),
        ("s", "stop", json!({})),
        ("cont", "cont", json!({})),
        ("c", "cont", json!({})),
        ("quit", "quit", json!({})),
        ("q", "quit", json!({})),
    ];
    for (line, command, arguments) in cases {
        let mut qmp = FakeQmp::default();
        assert_eq!(run_command(line, &mut qmp), "", "{line}");
        assert_eq!(
            qmp.calls,
            vec![(command.to_string(), arguments.clone())],
            "{line}"
        );
    }
}

#[test]
fn qmp_errors_are_printed_except_for_cancel() {
    let cases = [
        (
            "migrate_continue active",
            "migrate-continue",
            "Migration not in expected state: none",
        ),
        (
            "migrate_pause",
            "migrate-pause",
            "migrate-pause is currently only supported during postcopy-active or postcopy-recover state",
        ),
        (
            "migrate_recover x",
            "migrate-recover",
            "Migrate recover can only be run when postcopy is paused.",
        ),
        (
            "migrate_start_postcopy",
            "migrate-start-postcopy",
            "Enable postcopy with migrate_set_capability before the start of migration",
        ),
        (
            "migrate_incoming tcp:127.0.0.1:0",
            "migrate-incoming",
            "'-incoming' was not specified on the command line",
        ),
    ];
    for (line, command, desc) in cases {
        let mut qmp = FakeQmp::default().error(command, desc);
        assert_eq!(
            run_command(line, &mut qmp),
            format!("Error: {desc}\n"),
            "{line}"
        );
    }
    let mut qmp = FakeQmp::default().error(
        "migrate_cancel",
        "Postcopy migration in progress, cannot cancel.",
    );
    assert_eq!(run_command("migrate_cancel", &mut qmp), "");

    let mut qmp = FakeQmp::default();
    assert_eq!(
        run_command("migrate_continue bogus", &mut qmp),
        "Error: invalid parameter value: bogus\n"
    );
    assert!(qmp.calls.is_empty());
}

#[test]
fn failed_queries_print_the_qmp_error() {
    let mut qmp = FakeQmp::default().error("query-migrate", "Migration is disabled");
    assert_eq!(
        run_command("info migrate", &mut qmp),
        "Error: Migration is disabled\n"
    );
}

/// The texts QEMU 10.0.2 printed for these lines on a `-M none` VM without a KVM dirty
/// ring (captured through `human-monitor-command`, CRLF turned into LF).
#[test]
fn dirty_rate_and_dirty_limit_commands_match_qemu() {
    let kvm =
        "dirty page limit feature requires KVM with accelerator property 'dirty-ring-size' set'";
    let ring = "mode dirty-ring is not enabled, use other method instead.";
    let started = "Starting dirty rate measurement with period 1 seconds\n[Please use 'info dirty_rate' to check results]\n";
    let cancelled = "[Please use 'info vcpu_dirty_limit' to query dirty limit for virtual CPU]\n";
    // (line, the QMP command it must send with its arguments, that command's error,
    // the text printed)
    type Case<'a> = (&'a str, Option<(&'a str, Value)>, Option<&'a str>, &'a str);
    let cases: &[Case] = &[
        ("calc_dirty_rate", None, None, "unexpected end of expression\nTry \"help calc_dirty_rate\" for more information\n"),
        ("calc_dirty_rate 0", None, None, "Incorrect period length specified!\n"),
        ("calc_dirty_rate 1 -1", None, None, "Incorrect period length specified!\n"),
        ("calc_dirty_rate -r -b 1", None, None, "Either dirty ring or dirty bitmap can be specified!\n"),
        ("calc_dirty_rate x", None, None, "invalid char 'x' in expression\nTry \"help calc_dirty_rate\" for more information\n"),
        ("calc_dirty_rate -1", None, None, "calc_dirty_rate: unsupported option -1\nTry \"help calc_dirty_rate\" for more information\n"),
        ("calc_dirty_rate 1 2 3", None, None, "calc_dirty_rate: extraneous characters at the end of line\nTry \"help calc_dirty_rate\" for more information\n"),
        ("calc_dirty_rate 1/0", None, None, "division by zero\nTry \"help calc_dirty_rate\" for more information\n"),
        ("calc_dirty_rate $pc", None, None, "unknown register\nTry \"help calc_dirty_rate\" for more information\n"),
        ("calc_dirty_rate 99999999999999999999", None, None, "number too large\nTry \"help calc_dirty_rate\" for more information\n"),
        ("calc_dirty_rate 1", Some(("calc-dirty-rate", json!({"calc-time": 1, "mode": "page-sampling"}))), None, started),
        ("calc_dirty_rate 2-1 256", Some(("calc-dirty-rate", json!({"calc-time": 1, "mode": "page-sampling", "sample-pages": 256}))), None, started),
        ("calc_dirty_rate -r 1", Some(("calc-dirty-rate", json!({"calc-time": 1, "mode": "dirty-ring"}))), Some(ring), "Error: mode dirty-ring is not enabled, use other method instead.\n"),
        ("calc_dirty_rate -b 0x1", Some(("calc-dirty-rate", json!({"calc-time": 1, "mode": "dirty-bitmap"}))), None, started),
        ("calc_dirty_rate 1 -5", Some(("calc-dirty-rate", json!({"calc-time": -4, "mode": "page-sampling"}))), Some("Calculation time is out of range [50ms, 60000ms]."), "Error: Calculation time is out of range [50ms, 60000ms].\n"),
        ("set_vcpu_dirty_limit", None, None, "unexpected end of expression\nTry \"help set_vcpu_dirty_limit\" for more information\n"),
        ("set_vcpu_dirty_limit -1", None, None, "Error: invalid dirty page limit -1\n"),
        ("set_vcpu_dirty_limit 100", Some(("set-vcpu-dirty-limit", json!({"dirty-rate": 100}))), Some(kvm), "Error: dirty page limit feature requires KVM with accelerator property 'dirty-ring-size' set'\n"),
        ("set_vcpu_dirty_limit 100 5", Some(("set-vcpu-dirty-limit", json!({"dirty-rate": 100, "cpu-index": 5}))), Some(kvm), "Error: dirty page limit feature requires KVM with accelerator property 'dirty-ring-size' set'\n"),
        ("set_vcpu_dirty_limit 100 -1", Some(("set-vcpu-dirty-limit", json!({"dirty-rate": 99}))), Some(kvm), "Error: dirty page limit feature requires KVM with accelerator property 'dirty-ring-size' set'\n"),
        ("set_vcpu_dirty_limit 1 2 3", None, None, "set_vcpu_dirty_limit: extraneous characters at the end of line\nTry \"help set_vcpu_dirty_limit\" for more information\n"),
        ("cancel_vcpu_dirty_limit", Some(("cancel-vcpu-dirty-limit", json!({}))), None, cancelled),
        ("cancel_vcpu_dirty_limit 5", Some(("cancel-vcpu-dirty-limit", json!({"cpu-index": 5}))), None, cancelled),
        ("cancel_vcpu_dirty_limit -1", Some(("cancel-vcpu-dirty-limit", json!({}))), None, cancelled),
        ("cancel_vcpu_dirty_limit x", None, None, "invalid char 'x' in expression\nTry \"help cancel_vcpu_dirty_limit\" for more information\n"),
        ("info vcpu_dirty_limit x", None, None, "vcpu_dirty_limit: extraneous characters at the end of line\nTry \"help info vcpu_dirty_limit\" for more information\n"),
    ];
    for (line, call, error, text) in cases {
        let mut qmp = FakeQmp::default();
        if let (Some((command, _)), Some(desc)) = (call, error) {
            qmp = qmp.error(command, desc);
        }
        assert_eq!(run_command(line, &mut qmp), *text, "{line:?}");
        let expected: Vec<(String, Value)> = call
            .iter()
            .map(|(c, a)| (c.to_string(), a.clone()))
            .collect();
        assert_eq!(qmp.actions(), expected, "{line:?}");
    }
}

#[test]
fn info_vcpu_dirty_limit() {
    let mut qmp = FakeQmp::default().ok("query-vcpu-dirty-limit", json!([]));
    assert_eq!(
        run_command("info vcpu_dirty_limit", &mut qmp),
        "Dirty page limit not enabled!\n"
    );
    // The format QEMU prints for a limiter in service (§6.6 of the reference).
    let mut qmp = FakeQmp::default().ok(
        "query-vcpu-dirty-limit",
        json!([{"cpu-index": 0, "limit-rate": 200, "current-rate": 0},
               {"cpu-index": 1, "limit-rate": 200, "current-rate": 0}]),
    );
    assert_eq!(
        run_command("info vcpu_dirty_limit", &mut qmp),
        "vcpu[0], limit rate 200 (MB/s), current rate 0 (MB/s)\n\
         vcpu[1], limit rate 200 (MB/s), current rate 0 (MB/s)\n"
    );
}

/// An executor whose internal snapshots behave as QEMU's without block devices, and
/// that records the operations.
#[derive(Default)]
struct Diskless {
    ops: Vec<String>,
}

impl QmpExecutor for Diskless {
    fn execute(&mut self, command: &str, _arguments: Value) -> Result<Value, QmpError> {
        Err(QmpError::generic(format!("unexpected {command}")))
    }

    fn internal_snapshot(&mut self, op: crate::SnapshotOp<'_>) -> Result<(), QmpError> {
        self.ops.push(format!("{op:?}"));
        match op {
            crate::SnapshotOp::Delete(_) => Ok(()),
            _ => Err(QmpError::generic(
                "no block device can store vmstate for snapshot",
            )),
        }
    }
}

#[test]
fn snapshot_commands_match_qemu_without_block_devices() {
    let error = "Error: no block device can store vmstate for snapshot\n";
    let cases = [
        ("savevm", error, Some("Save(None)")),
        ("savevm t1", error, Some("Save(Some(\"t1\"))")),
        ("savevm \"a b\"", error, Some("Save(Some(\"a b\"))")),
        ("loadvm t1", error, Some("Load(\"t1\")")),
        ("delvm t1", "", Some("Delete(\"t1\")")),
        ("info snapshots", "no block device can store vmstate for snapshot\n", Some("List")),
        ("loadvm", "loadvm: string expected\nTry \"help loadvm\" for more information\n", None),
        ("delvm", "delvm: string expected\nTry \"help delvm\" for more information\n", None),
        ("savevm a b", "savevm: extraneous characters at the end of line\nTry \"help savevm\" for more information\n", None),
        ("info snapshots x", "snapshots: extraneous characters at the end of line\nTry \"help info snapshots\" for more information\n", None),
    ];
    for (line, text, op) in cases {
        let mut qmp = Diskless::default();
        assert_eq!(run_command(line, &mut qmp), text, "{line:?}");
        let expected: Vec<String> = op.into_iter().map(String::from).collect();
        assert_eq!(qmp.ops, expected, "{line:?}");
    }
    // A VM that can list snapshots but has none.
    struct NoSnapshots;
    impl QmpExecutor for NoSnapshots {
        fn execute(&mut self, _: &str, _: Value) -> Result<Value, QmpError> {
            Ok(json!({}))
        }
        fn internal_snapshot(&mut self, _: crate::SnapshotOp<'_>) -> Result<(), QmpError> {
            Ok(())
        }
    }
    assert_eq!(
        run_command("info snapshots", &mut NoSnapshots),
        "There is no snapshot available.\n"
    );
    // The default refuses loudly.
    assert_eq!(
        run_command("savevm t1", &mut FakeQmp::default()),
        "Error: internal snapshots are not available on this monitor\n"
    );
}
