//! The command table, `help`, and the handlers that map each HMP command onto QMP.

use serde_json::{json, Value};

use crate::command_line::{parse_arguments, split_word, ArgumentKind, ArgumentValue};
use crate::executor::{QmpError, QmpExecutor, SnapshotOp};
use crate::info;
use crate::parameters::{set_parameter_arguments, ParameterValueError};
use crate::MIGRATE_POLL_INTERVAL;

/// What a top-level command does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TopLevelAction {
    CalcDirtyRate,
    CancelVcpuDirtyLimit,
    Cont,
    DeleteVm,
    Help,
    Info,
    LoadVm,
    Migrate,
    MigrateCancel,
    MigrateContinue,
    MigrateIncoming,
    MigratePause,
    MigrateRecover,
    MigrateSetCapability,
    MigrateSetParameter,
    MigrateStartPostcopy,
    Quit,
    SaveVm,
    SetVcpuDirtyLimit,
    Stop,
    XColoLostHeartbeat,
}

/// What an `info` subcommand shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InfoAction {
    DirtyRate,
    Migrate,
    MigrateCapabilities,
    MigrateParameters,
    Snapshots,
    Status,
    VcpuDirtyLimit,
    Version,
}

/// One row of a command table, with the texts `help` prints.
#[derive(Debug)]
struct CommandSpec<Action: 'static> {
    /// The name with its aliases, separated by `|` (`stop|s`).
    names: &'static str,
    /// The argument synopsis shown by `help` (may be empty).
    params: &'static str,
    /// The one-line description shown by `help` (may contain QEMU's own line breaks).
    help: &'static str,
    /// The arguments, in order.
    arguments: &'static [ArgumentKind],
    /// The handler.
    action: Action,
}

impl<Action> CommandSpec<Action> {
    /// Whether `name` is this command's name or one of its aliases.
    fn is_named(&self, name: &str) -> bool {
        self.names.split('|').any(|alias| alias == name)
    }

    /// The `help` line: `names params -- help`.
    fn help_line(&self, prefix: &str) -> String {
        format!("{prefix}{} {} -- {}\n", self.names, self.params, self.help)
    }
}

/// `uri:s` and the like: one string argument.
const ONE_WORD: &[ArgumentKind] = &[ArgumentKind::Word];

/// The top-level commands, in the order QEMU's `help` lists them.
const COMMANDS: &[CommandSpec<TopLevelAction>] = &[
    CommandSpec {
        names: "calc_dirty_rate",
        params: "[-r] [-b] second [sample_pages_per_GB]",
        help: "start a round of guest dirty rate measurement (using -r to\n\t\t\t specify dirty ring as the method of calculation and\n\t\t\t -b to specify dirty bitmap as method of calculation)",
        arguments: &[
            ArgumentKind::Flag { letter: 'r' },
            ArgumentKind::Flag { letter: 'b' },
            ArgumentKind::Integer,
            ArgumentKind::OptionalInteger,
        ],
        action: TopLevelAction::CalcDirtyRate,
    },
    CommandSpec {
        names: "cancel_vcpu_dirty_limit",
        params: "[cpu_index]",
        help: "cancel dirty page rate limit, use cpu_index to cancel\n\t\t\t\t\t limit on a specified virtual cpu",
        arguments: &[ArgumentKind::OptionalInteger],
        action: TopLevelAction::CancelVcpuDirtyLimit,
    },
    CommandSpec {
        names: "cont|c",
        params: "",
        help: "resume emulation",
        arguments: &[],
        action: TopLevelAction::Cont,
    },
    CommandSpec {
        names: "delvm",
        params: "tag",
        help: "delete a VM snapshot from its tag",
        arguments: ONE_WORD,
        action: TopLevelAction::DeleteVm,
    },
    CommandSpec {
        names: "help|?",
        params: "[cmd]",
        help: "show the help",
        arguments: &[],
        action: TopLevelAction::Help,
    },
    CommandSpec {
        names: "info",
        params: "[subcommand]",
        help: "show various information about the system state",
        arguments: &[],
        action: TopLevelAction::Info,
    },
    CommandSpec {
        names: "loadvm",
        params: "tag",
        help: "restore a VM snapshot from its tag",
        arguments: ONE_WORD,
        action: TopLevelAction::LoadVm,
    },
    CommandSpec {
        names: "migrate",
        params: "[-d] [-r] uri",
        help: "migrate to URI (using -d to not wait for completion)\n\t\t\t -r to resume a paused postcopy migration",
        arguments: &[
            ArgumentKind::Flag { letter: 'd' },
            ArgumentKind::Flag { letter: 'r' },
            ArgumentKind::Word,
        ],
        action: TopLevelAction::Migrate,
    },
    CommandSpec {
        names: "migrate_cancel",
        params: "",
        help: "cancel the current VM migration",
        arguments: &[],
        action: TopLevelAction::MigrateCancel,
    },
    CommandSpec {
        names: "migrate_continue",
        params: "state",
        help: "Continue migration from the given paused state",
        arguments: ONE_WORD,
        action: TopLevelAction::MigrateContinue,
    },
    CommandSpec {
        names: "migrate_incoming",
        params: "uri",
        help: "Continue an incoming migration from an -incoming defer",
        arguments: ONE_WORD,
        action: TopLevelAction::MigrateIncoming,
    },
    CommandSpec {
        names: "migrate_pause",
        params: "",
        help: "Pause an ongoing migration (postcopy-only)",
        arguments: &[],
        action: TopLevelAction::MigratePause,
    },
    CommandSpec {
        names: "migrate_recover",
        params: "uri",
        help: "Continue a paused incoming postcopy migration",
        arguments: ONE_WORD,
        action: TopLevelAction::MigrateRecover,
    },
    CommandSpec {
        names: "migrate_set_capability",
        params: "capability state",
        help: "Enable/Disable the usage of a capability for migration",
        arguments: &[ArgumentKind::Word, ArgumentKind::OnOff],
        action: TopLevelAction::MigrateSetCapability,
    },
    CommandSpec {
        names: "migrate_set_parameter",
        params: "parameter value",
        help: "Set the parameter for migration",
        arguments: &[ArgumentKind::Word, ArgumentKind::Word],
        action: TopLevelAction::MigrateSetParameter,
    },
    CommandSpec {
        names: "migrate_start_postcopy",
        params: "",
        help: "Followup to a migration command to switch the migration to postcopy mode. The postcopy-ram capability must be set on both source and destination before the original migration command .",
        arguments: &[],
        action: TopLevelAction::MigrateStartPostcopy,
    },
    CommandSpec {
        names: "quit|q",
        params: "",
        help: "quit the emulator",
        arguments: &[],
        action: TopLevelAction::Quit,
    },
    CommandSpec {
        names: "savevm",
        params: "tag",
        help: "save a VM snapshot. If no tag is provided, a new snapshot is created",
        arguments: &[ArgumentKind::OptionalWord],
        action: TopLevelAction::SaveVm,
    },
    CommandSpec {
        names: "set_vcpu_dirty_limit",
        params: "dirty_rate [cpu_index]",
        help: "set dirty page rate limit, use cpu_index to set limit\n\t\t\t\t\t on a specified virtual cpu",
        arguments: &[ArgumentKind::Integer, ArgumentKind::OptionalInteger],
        action: TopLevelAction::SetVcpuDirtyLimit,
    },
    CommandSpec {
        names: "stop|s",
        params: "",
        help: "stop emulation",
        arguments: &[],
        action: TopLevelAction::Stop,
    },
    CommandSpec {
        names: "x_colo_lost_heartbeat",
        params: "",
        help: "Tell COLO that heartbeat is lost,\n\t\t\ta failover or takeover is needed.",
        arguments: &[],
        action: TopLevelAction::XColoLostHeartbeat,
    },
];

/// The `info` subcommands, in the order QEMU's `info` lists them.
const INFO_COMMANDS: &[CommandSpec<InfoAction>] = &[
    CommandSpec {
        names: "dirty_rate",
        params: "",
        help: "show dirty rate information",
        arguments: &[],
        action: InfoAction::DirtyRate,
    },
    CommandSpec {
        names: "migrate",
        params: "",
        help: "show migration status",
        arguments: &[],
        action: InfoAction::Migrate,
    },
    CommandSpec {
        names: "migrate_capabilities",
        params: "",
        help: "show current migration capabilities",
        arguments: &[],
        action: InfoAction::MigrateCapabilities,
    },
    CommandSpec {
        names: "migrate_parameters",
        params: "",
        help: "show current migration parameters",
        arguments: &[],
        action: InfoAction::MigrateParameters,
    },
    CommandSpec {
        names: "snapshots",
        params: "",
        help: "show the currently saved VM snapshots",
        arguments: &[],
        action: InfoAction::Snapshots,
    },
    CommandSpec {
        names: "status",
        params: "",
        help: "show the current VM status (running|paused)",
        arguments: &[],
        action: InfoAction::Status,
    },
    CommandSpec {
        names: "vcpu_dirty_limit",
        params: "",
        help: "show dirty page limit information of all vCPU",
        arguments: &[],
        action: InfoAction::VcpuDirtyLimit,
    },
    CommandSpec {
        names: "version",
        params: "",
        help: "show the version of QEMU",
        arguments: &[],
        action: InfoAction::Version,
    },
];

/// The `MigrationStatus` names `migrate_continue` accepts (QEMU checks them before QMP).
const MIGRATION_STATUSES: &[&str] = &[
    "none",
    "setup",
    "cancelling",
    "cancelled",
    "active",
    "postcopy-active",
    "postcopy-paused",
    "postcopy-recover-setup",
    "postcopy-recover",
    "completed",
    "failed",
    "colo",
    "pre-switchover",
    "device",
    "wait-unplug",
];

/// A command failure that HMP prints as `Error: <message>`.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    /// The QMP command failed.
    #[error("{}", .0.desc)]
    Qmp(#[from] QmpError),
    /// `migrate_set_parameter` refused the value before calling QMP.
    #[error(transparent)]
    ParameterValue(#[from] ParameterValueError),
    /// A name is not a member of the enum it must belong to.
    #[error("invalid parameter value: {0}")]
    InvalidEnumValue(String),
    /// `set_vcpu_dirty_limit` with a negative rate.
    #[error("invalid dirty page limit {0}")]
    InvalidDirtyLimit(i64),
}

/// The `unknown command: '<name>'` line.
fn unknown_command(name: &str) -> String {
    format!("unknown command: '{name}'\n")
}

/// Runs one command line; see [`crate::run_command`].
pub fn run_line(line: &str, qmp: &mut dyn QmpExecutor) -> String {
    let (name, rest) = split_word(line);
    if name.is_empty() {
        return String::new();
    }
    let Some(command) = COMMANDS.iter().find(|command| command.is_named(name)) else {
        return unknown_command(name);
    };
    match command.action {
        TopLevelAction::Help => help(rest),
        TopLevelAction::Info => run_info(rest, qmp),
        action => match parse_arguments(command.arguments, rest) {
            Err(error) => error.render(command.names, name),
            Ok(arguments) => match run_top_level(action, &arguments, qmp) {
                Ok(text) => text,
                Err(error) => format!("Error: {error}\n"),
            },
        },
    }
}

/// `info [subcommand]`.
fn run_info(rest: &str, qmp: &mut dyn QmpExecutor) -> String {
    let (name, arguments_text) = split_word(rest);
    if name.is_empty() {
        return info_help_lines();
    }
    let Some(command) = INFO_COMMANDS.iter().find(|command| command.is_named(name)) else {
        return unknown_command(&format!("info {name}"));
    };
    if let Err(error) = parse_arguments(command.arguments, arguments_text) {
        return error.render(command.names, &format!("info {name}"));
    }
    let reply = match command.action {
        InfoAction::DirtyRate => qmp
            .execute("query-dirty-rate", json!({}))
            .map(|reply| info::format_dirty_rate(&reply)),
        InfoAction::Migrate => qmp
            .execute("query-migrate", json!({}))
            .map(|reply| info::format_migration_info(&reply, &qmp.migration_globals())),
        InfoAction::MigrateCapabilities => qmp
            .execute("query-migrate-capabilities", json!({}))
            .map(|reply| info::format_capabilities(&reply)),
        InfoAction::MigrateParameters => qmp
            .execute("query-migrate-parameters", json!({}))
            .map(|reply| info::format_parameters(&reply)),
        InfoAction::Snapshots => Ok(match qmp.internal_snapshot(SnapshotOp::List) {
            Ok(()) => "There is no snapshot available.\n".to_owned(),
            // QEMU reports this one without the `Error: ` prefix.
            Err(error) => format!("{}\n", error.desc),
        }),
        InfoAction::Status => qmp
            .execute("query-status", json!({}))
            .map(|reply| info::format_status(&reply)),
        InfoAction::VcpuDirtyLimit => qmp
            .execute("query-vcpu-dirty-limit", json!({}))
            .map(|reply| info::format_vcpu_dirty_limit(&reply)),
        InfoAction::Version => qmp
            .execute("query-version", json!({}))
            .map(|reply| info::format_version(&reply)),
    };
    reply.unwrap_or_else(|error| format!("Error: {}\n", error.desc))
}

/// The help lines of every `info` subcommand.
fn info_help_lines() -> String {
    INFO_COMMANDS
        .iter()
        .map(|command| command.help_line("info "))
        .collect()
}

/// `help [cmd]`: every command, the `info` list, or one command's line.
fn help(rest: &str) -> String {
    let (name, after_name) = split_word(rest);
    if name.is_empty() {
        return COMMANDS
            .iter()
            .map(|command| command.help_line(""))
            .collect();
    }
    let Some(command) = COMMANDS.iter().find(|command| command.is_named(name)) else {
        return unknown_command(name);
    };
    if command.action != TopLevelAction::Info {
        return command.help_line("");
    }
    let (subcommand, _) = split_word(after_name);
    if subcommand.is_empty() {
        return info_help_lines();
    }
    match INFO_COMMANDS.iter().find(|info| info.is_named(subcommand)) {
        Some(info) => info.help_line("info "),
        None => unknown_command(&format!("info {subcommand}")),
    }
}

/// The `index`th string argument.
fn word(arguments: &[ArgumentValue], index: usize) -> &str {
    arguments
        .iter()
        .filter_map(|argument| match argument {
            ArgumentValue::Word(word) => Some(word.as_str()),
            _ => None,
        })
        .nth(index)
        .unwrap_or("")
}

/// The `index`th flag.
fn flag(arguments: &[ArgumentValue], index: usize) -> bool {
    arguments
        .iter()
        .filter_map(|argument| match argument {
            ArgumentValue::Flag(present) => Some(*present),
            _ => None,
        })
        .nth(index)
        .unwrap_or(false)
}

/// The `index`th integer argument (`None` when an optional one was left out).
fn integer(arguments: &[ArgumentValue], index: usize) -> Option<i64> {
    arguments
        .iter()
        .filter_map(|argument| match argument {
            ArgumentValue::Integer(value) => Some(*value),
            _ => None,
        })
        .nth(index)
        .flatten()
}

/// The first optional string argument.
fn optional_word(arguments: &[ArgumentValue]) -> Option<&str> {
    arguments.iter().find_map(|argument| match argument {
        ArgumentValue::OptionalWord(word) => word.as_deref(),
        _ => None,
    })
}

/// The first `on`/`off` argument.
fn on_off(arguments: &[ArgumentValue]) -> bool {
    arguments
        .iter()
        .find_map(|argument| match argument {
            ArgumentValue::OnOff(state) => Some(*state),
            _ => None,
        })
        .unwrap_or(false)
}

/// Runs a command whose arguments have been parsed; `Ok` holds the text to print.
fn run_top_level(
    action: TopLevelAction,
    arguments: &[ArgumentValue],
    qmp: &mut dyn QmpExecutor,
) -> Result<String, CommandError> {
    let simple = |qmp: &mut dyn QmpExecutor, command: &str, arguments: Value| {
        qmp.execute(command, arguments)
            .map(|_| String::new())
            .map_err(CommandError::from)
    };
    match action {
        TopLevelAction::Cont => simple(qmp, "cont", json!({})),
        TopLevelAction::Stop => simple(qmp, "stop", json!({})),
        TopLevelAction::Quit => simple(qmp, "quit", json!({})),
        TopLevelAction::Migrate => migrate(
            qmp,
            word(arguments, 0),
            flag(arguments, 0),
            flag(arguments, 1),
        ),
        TopLevelAction::MigrateCancel => {
            // HMP never reports a failed cancel (QEMU discards the QMP error).
            let _ = qmp.execute("migrate_cancel", json!({}));
            Ok(String::new())
        }
        TopLevelAction::MigrateContinue => {
            let state = word(arguments, 0);
            if !MIGRATION_STATUSES.contains(&state) {
                return Err(CommandError::InvalidEnumValue(state.to_owned()));
            }
            simple(qmp, "migrate-continue", json!({ "state": state }))
        }
        TopLevelAction::MigrateIncoming => simple(
            qmp,
            "migrate-incoming",
            json!({ "uri": word(arguments, 0), "exit-on-error": false }),
        ),
        TopLevelAction::MigratePause => simple(qmp, "migrate-pause", json!({})),
        TopLevelAction::MigrateRecover => {
            simple(qmp, "migrate-recover", json!({ "uri": word(arguments, 0) }))
        }
        TopLevelAction::MigrateStartPostcopy => simple(qmp, "migrate-start-postcopy", json!({})),
        TopLevelAction::XColoLostHeartbeat => simple(qmp, "x-colo-lost-heartbeat", json!({})),
        TopLevelAction::MigrateSetCapability => {
            set_capability(qmp, word(arguments, 0), on_off(arguments))
        }
        TopLevelAction::MigrateSetParameter => {
            let request = set_parameter_arguments(word(arguments, 0), word(arguments, 1))?;
            simple(qmp, "migrate-set-parameters", request)
        }
        TopLevelAction::CalcDirtyRate => calc_dirty_rate(
            qmp,
            flag(arguments, 0),
            flag(arguments, 1),
            integer(arguments, 0).unwrap_or(0),
            integer(arguments, 1),
        ),
        TopLevelAction::SetVcpuDirtyLimit => {
            let rate = integer(arguments, 0).unwrap_or(0);
            if rate < 0 {
                return Err(CommandError::InvalidDirtyLimit(rate));
            }
            let mut request = json!({ "dirty-rate": rate });
            if let Some(index) = integer(arguments, 1).filter(|index| *index != -1) {
                request["cpu-index"] = json!(index);
            }
            simple(qmp, "set-vcpu-dirty-limit", request)
        }
        TopLevelAction::CancelVcpuDirtyLimit => {
            let mut request = json!({});
            if let Some(index) = integer(arguments, 0).filter(|index| *index != -1) {
                request["cpu-index"] = json!(index);
            }
            qmp.execute("cancel-vcpu-dirty-limit", request)?;
            Ok(
                "[Please use 'info vcpu_dirty_limit' to query dirty limit for virtual CPU]\n"
                    .to_owned(),
            )
        }
        TopLevelAction::SaveVm => snapshot(qmp, SnapshotOp::Save(optional_word(arguments))),
        TopLevelAction::LoadVm => snapshot(qmp, SnapshotOp::Load(word(arguments, 0))),
        TopLevelAction::DeleteVm => snapshot(qmp, SnapshotOp::Delete(word(arguments, 0))),
        // Handled before argument parsing.
        TopLevelAction::Help | TopLevelAction::Info => Ok(String::new()),
    }
}

/// `savevm`, `loadvm`, `delvm`: nothing is printed on success.
fn snapshot(qmp: &mut dyn QmpExecutor, op: SnapshotOp<'_>) -> Result<String, CommandError> {
    qmp.internal_snapshot(op)?;
    Ok(String::new())
}

/// `calc_dirty_rate [-r] [-b] second [sample_pages_per_GB]`: a zero period and both
/// methods at once are refused with a plain message (not an error); a sample count of
/// -1 counts as left out.
fn calc_dirty_rate(
    qmp: &mut dyn QmpExecutor,
    dirty_ring: bool,
    dirty_bitmap: bool,
    seconds: i64,
    sample_pages: Option<i64>,
) -> Result<String, CommandError> {
    if seconds == 0 {
        return Ok("Incorrect period length specified!\n".to_owned());
    }
    if dirty_ring && dirty_bitmap {
        return Ok("Either dirty ring or dirty bitmap can be specified!\n".to_owned());
    }
    let mode = if dirty_bitmap {
        "dirty-bitmap"
    } else if dirty_ring {
        "dirty-ring"
    } else {
        "page-sampling"
    };
    let mut request = json!({ "calc-time": seconds, "mode": mode });
    if let Some(pages) = sample_pages.filter(|pages| *pages != -1) {
        request["sample-pages"] = json!(pages);
    }
    qmp.execute("calc-dirty-rate", request)?;
    Ok(format!(
        "Starting dirty rate measurement with period {seconds} seconds\n\
         [Please use 'info dirty_rate' to check results]\n"
    ))
}

/// `migrate_set_capability`: the name must be one `query-migrate-capabilities` reports.
fn set_capability(
    qmp: &mut dyn QmpExecutor,
    capability: &str,
    state: bool,
) -> Result<String, CommandError> {
    let known = qmp.execute("query-migrate-capabilities", json!({}))?;
    let is_known = known
        .as_array()
        .into_iter()
        .flatten()
        .any(|entry| entry.get("capability").and_then(Value::as_str) == Some(capability));
    if !is_known {
        return Err(CommandError::InvalidEnumValue(capability.to_owned()));
    }
    qmp.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": capability, "state": state }] }),
    )?;
    Ok(String::new())
}

/// `migrate [-d] [-r] uri`: start the migration, then, without `-d`, wait until it leaves the
/// `setup` and `active` states, polling `query-migrate` every [`MIGRATE_POLL_INTERVAL`]
/// (a reply without `status` also ends the wait: there is nothing left to wait for).
///
/// As in QEMU, a migration that ends in failure is reported through
/// [`QmpExecutor::report_migration_error`], not on the monitor.
fn migrate(
    qmp: &mut dyn QmpExecutor,
    uri: &str,
    detach: bool,
    resume: bool,
) -> Result<String, CommandError> {
    qmp.execute("migrate", json!({ "uri": uri, "resume": resume }))?;
    if detach {
        return Ok(String::new());
    }
    loop {
        let info = qmp.execute("query-migrate", json!({}))?;
        let status = info.get("status").and_then(Value::as_str);
        if !matches!(status, Some("setup") | Some("active")) {
            if let Some(error_desc) = info.get("error-desc").and_then(Value::as_str) {
                qmp.report_migration_error(error_desc);
            }
            return Ok(String::new());
        }
        qmp.wait_before_migration_poll(MIGRATE_POLL_INTERVAL);
    }
}
