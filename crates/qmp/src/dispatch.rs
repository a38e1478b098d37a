//! QMP commands: argument checks as QEMU's input visitor makes them, and the handlers,
//! mapped onto the engine's [`Migrator`].

use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};
use vmigrate_engine::migrator::MigrateError;
use vmigrate_engine::options::{MigMode, MultifdCompression, ZeroPageDetection, CAPABILITIES};
use vmigrate_engine::{Migrator, RunState};

use crate::jobs::{stop_if_running, JobType, JobVerb, Jobs, SnapshotRequest, NO_VMSTATE_DEVICE};
use crate::schema::{check_members, opt, req, Member, SchemaBuilder, Ty};

/// A QMP error: class and description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    pub class: &'static str,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: "GenericError",
            desc: desc.into(),
        }
    }

    pub fn not_found(desc: impl Into<String>) -> Self {
        Self {
            class: "CommandNotFound",
            desc: desc.into(),
        }
    }
}

impl From<MigrateError> for QmpError {
    fn from(e: MigrateError) -> Self {
        QmpError::generic(e.0)
    }
}

/// What the monitor needs from the VM beyond the engine's seam.
pub trait VmBackend: Send + Sync {
    /// Copies guest-physical memory; false when the range is not all RAM.
    fn read_physical(&self, gpa: u64, out: &mut [u8]) -> bool;
    /// `query-workload` (a vmigrate extension): the guest workload's counters, or
    /// `None` when the machine runs no workload.
    fn query_workload(&self) -> Option<Value> {
        None
    }
}

static STR: Ty = Ty::Str;
static INT: Ty = Ty::Int;
static U64: Ty = Ty::Uint64;
static BOOL: Ty = Ty::Bool;
static ANY: Ty = Ty::Any;
static STR_OR_NULL: Ty = Ty::StrOrNull;
static EMPTY: Ty = Ty::Struct("q_empty", &[]);
static TIME_UNIT: Ty = Ty::Enum("TimeUnit", &["second", "millisecond"]);
static DIRTY_RATE_MODE: Ty = Ty::Enum(
    "DirtyRateMeasureMode",
    &["page-sampling", "dirty-ring", "dirty-bitmap"],
);

static MIGRATION_STATUS: Ty = Ty::Enum(
    "MigrationStatus",
    &[
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
    ],
);
static COLO_EXIT_REASON: Ty = Ty::Enum(
    "COLOExitReason",
    &["none", "request", "error", "processing"],
);
static COLO_MODE: Ty = Ty::Enum("COLOMode", &["none", "primary", "secondary"]);
static COLO_STATUS: Ty = Ty::Struct(
    "COLOStatus",
    &[
        req("mode", &COLO_MODE),
        req("last-mode", &COLO_MODE),
        req("reason", &COLO_EXIT_REASON),
    ],
);
static CAPABILITY: Ty = Ty::Enum("MigrationCapability", &CAPABILITIES);
static CAPABILITY_STATUS: Ty = Ty::Struct(
    "MigrationCapabilityStatus",
    &[req("capability", &CAPABILITY), req("state", &BOOL)],
);
static CAPABILITY_LIST: Ty = Ty::Array(&CAPABILITY_STATUS);

static INET_ADDRESS: Ty = Ty::Struct(
    "InetSocketAddress",
    &[
        req("host", &STR),
        req("port", &STR),
        opt("numeric", &BOOL),
        opt("to", &U64),
        opt("ipv4", &BOOL),
        opt("ipv6", &BOOL),
        opt("keep-alive", &BOOL),
        opt("mptcp", &BOOL),
    ],
);
static UNIX_ADDRESS: Ty = Ty::Struct(
    "UnixSocketAddress",
    &[
        req("path", &STR),
        opt("abstract", &BOOL),
        opt("tight", &BOOL),
    ],
);
static VSOCK_ADDRESS: Ty = Ty::Struct("VsockSocketAddress", &[req("cid", &STR), req("port", &STR)]);
static FD_ADDRESS: Ty = Ty::Struct("FdSocketAddress", &[req("str", &STR)]);
static SOCKET_TYPE: Ty = Ty::Enum("SocketAddressType", &["inet", "unix", "vsock", "fd"]);
static SOCKET_ADDRESS: Ty = Ty::Union {
    name: "SocketAddress",
    base: &[req("type", &SOCKET_TYPE)],
    tag: "type",
    branches: &[
        ("inet", &INET_ADDRESS),
        ("unix", &UNIX_ADDRESS),
        ("vsock", &VSOCK_ADDRESS),
        ("fd", &FD_ADDRESS),
    ],
};
static STR_LIST: Ty = Ty::Array(&STR);
static INT_LIST: Ty = Ty::Array(&INT);
static EXEC_ADDRESS: Ty = Ty::Struct("MigrationExecCommand", &[req("args", &STR_LIST)]);
static FILE_ADDRESS: Ty = Ty::Struct(
    "FileMigrationArgs",
    &[req("filename", &STR), req("offset", &U64)],
);
static ADDRESS_TYPE: Ty = Ty::Enum("MigrationAddressType", &["socket", "exec", "rdma", "file"]);
static MIGRATION_ADDRESS: Ty = Ty::Union {
    name: "MigrationAddress",
    base: &[req("transport", &ADDRESS_TYPE)],
    tag: "transport",
    branches: &[
        ("socket", &SOCKET_ADDRESS),
        ("exec", &EXEC_ADDRESS),
        ("rdma", &INET_ADDRESS),
        ("file", &FILE_ADDRESS),
    ],
};
static CHANNEL_TYPE: Ty = Ty::Enum("MigrationChannelType", &["main", "cpr"]);
static CHANNEL: Ty = Ty::Struct(
    "MigrationChannel",
    &[
        req("channel-type", &CHANNEL_TYPE),
        req("addr", &MIGRATION_ADDRESS),
    ],
);
static CHANNEL_LIST: Ty = Ty::Array(&CHANNEL);

static MODE: Ty = Ty::Enum("MigMode", &MigMode::NAMES);
static COMPRESSION: Ty = Ty::Enum("MultiFDCompression", &MultifdCompression::NAMES);
static ZERO_PAGE: Ty = Ty::Enum("ZeroPageDetection", &ZeroPageDetection::NAMES);
static BITMAP_MAPPING: Ty = Ty::Array(&ANY);
/// `migrate-set-parameters` (checked by the engine's options; listed for the schema).
static SET_PARAMETERS: Ty = Ty::Struct(
    "MigrateSetParameters",
    &[
        opt("announce-initial", &U64),
        opt("announce-max", &U64),
        opt("announce-rounds", &U64),
        opt("announce-step", &U64),
        opt("throttle-trigger-threshold", &U64),
        opt("cpu-throttle-initial", &U64),
        opt("cpu-throttle-increment", &U64),
        opt("cpu-throttle-tailslow", &BOOL),
        opt("tls-creds", &STR_OR_NULL),
        opt("tls-hostname", &STR_OR_NULL),
        opt("tls-authz", &STR_OR_NULL),
        opt("max-bandwidth", &U64),
        opt("avail-switchover-bandwidth", &U64),
        opt("downtime-limit", &U64),
        opt("x-checkpoint-delay", &U64),
        opt("multifd-channels", &U64),
        opt("xbzrle-cache-size", &U64),
        opt("max-postcopy-bandwidth", &U64),
        opt("max-cpu-throttle", &U64),
        opt("multifd-compression", &COMPRESSION),
        opt("multifd-zlib-level", &U64),
        opt("multifd-qatzip-level", &U64),
        opt("multifd-zstd-level", &U64),
        opt("block-bitmap-mapping", &BITMAP_MAPPING),
        opt("x-vcpu-dirty-limit-period", &U64),
        opt("vcpu-dirty-limit", &U64),
        opt("mode", &MODE),
        opt("zero-page-detection", &ZERO_PAGE),
        opt("direct-io", &BOOL),
        opt("x-vmigrate-postcopy-after", &U64),
    ],
);
static PARAMETERS: Ty = Ty::Struct("MigrationParameters", &[]);
static MIGRATION_INFO: Ty = Ty::Struct(
    "MigrationInfo",
    &[
        opt("status", &MIGRATION_STATUS),
        opt("ram", &ANY),
        opt("total-time", &INT),
        opt("expected-downtime", &INT),
        opt("downtime", &INT),
        opt("setup-time", &INT),
        opt("error-desc", &STR),
        opt("blocked-reasons", &STR_LIST),
        opt("socket-address", &ANY),
        opt("postcopy-blocktime", &INT),
        opt("postcopy-vcpu-blocktime", &INT_LIST),
    ],
);
static THREAD_INFO: Ty = Ty::Struct(
    "MigrationThreadInfo",
    &[req("name", &STR), req("thread-id", &INT)],
);
static THREAD_LIST: Ty = Ty::Array(&THREAD_INFO);
static STATUS_INFO: Ty = Ty::Struct("StatusInfo", &[req("running", &BOOL), req("status", &STR)]);
static VERSION_INFO: Ty = Ty::Struct("VersionInfo", &[req("qemu", &ANY), req("package", &STR)]);
static COMMAND_INFO: Ty = Ty::Struct("CommandInfo", &[req("name", &STR)]);
static COMMAND_LIST: Ty = Ty::Array(&COMMAND_INFO);
static SCHEMA_LIST: Ty = Ty::Array(&ANY);
static DIRTY_LIMIT_INFO: Ty = Ty::Struct(
    "DirtyLimitInfo",
    &[
        req("cpu-index", &INT),
        req("limit-rate", &U64),
        req("current-rate", &U64),
    ],
);
static DIRTY_LIMIT_LIST: Ty = Ty::Array(&DIRTY_LIMIT_INFO);
static JOB_TYPE: Ty = Ty::Enum(
    "JobType",
    &[
        "commit",
        "stream",
        "mirror",
        "backup",
        "create",
        "amend",
        "snapshot-load",
        "snapshot-save",
        "snapshot-delete",
    ],
);
static JOB_STATUS: Ty = Ty::Enum(
    "JobStatus",
    &[
        "undefined",
        "created",
        "running",
        "paused",
        "ready",
        "standby",
        "waiting",
        "pending",
        "aborting",
        "concluded",
        "null",
    ],
);
static JOB_INFO: Ty = Ty::Struct(
    "JobInfo",
    &[
        req("id", &STR),
        req("type", &JOB_TYPE),
        req("status", &JOB_STATUS),
        req("current-progress", &INT),
        req("total-progress", &INT),
        opt("error", &STR),
    ],
);
static JOB_INFO_LIST: Ty = Ty::Array(&JOB_INFO);
static QMP_CAPABILITY: Ty = Ty::Enum("QMPCapability", &["oob"]);
static QMP_CAPABILITY_LIST: Ty = Ty::Array(&QMP_CAPABILITY);

/// One command: name, arguments, return type, whether `exec-oob` may run it.
struct Command {
    name: &'static str,
    args: Ty,
    ret: &'static Ty,
    oob: bool,
}

const fn command(name: &'static str, args: &'static [Member], ret: &'static Ty) -> Command {
    Command {
        name,
        args: Ty::Struct(name, args),
        ret,
        oob: false,
    }
}

/// Every command vmigrate offers.
static COMMANDS: &[Command] = &[
    command(
        "qmp_capabilities",
        &[opt("enable", &QMP_CAPABILITY_LIST)],
        &EMPTY,
    ),
    command("query-version", &[], &VERSION_INFO),
    command("query-commands", &[], &COMMAND_LIST),
    command("query-qmp-schema", &[], &SCHEMA_LIST),
    command("query-status", &[], &STATUS_INFO),
    command("stop", &[], &EMPTY),
    command("cont", &[], &EMPTY),
    command("quit", &[], &EMPTY),
    command(
        "migrate",
        &[
            opt("uri", &STR),
            opt("channels", &CHANNEL_LIST),
            opt("detach", &BOOL),
            opt("resume", &BOOL),
        ],
        &EMPTY,
    ),
    command(
        "migrate-incoming",
        &[
            opt("uri", &STR),
            opt("channels", &CHANNEL_LIST),
            opt("exit-on-error", &BOOL),
        ],
        &EMPTY,
    ),
    command("migrate_cancel", &[], &EMPTY),
    command(
        "migrate-continue",
        &[req("state", &MIGRATION_STATUS)],
        &EMPTY,
    ),
    Command {
        name: "migrate-pause",
        args: Ty::Struct("migrate-pause", &[]),
        ret: &EMPTY,
        oob: true,
    },
    Command {
        name: "migrate-recover",
        args: Ty::Struct("migrate-recover", &[req("uri", &STR)]),
        ret: &EMPTY,
        oob: true,
    },
    command("migrate-start-postcopy", &[], &EMPTY),
    command("query-colo-status", &[], &COLO_STATUS),
    command("x-colo-lost-heartbeat", &[], &EMPTY),
    command(
        "migrate-set-capabilities",
        &[req("capabilities", &CAPABILITY_LIST)],
        &EMPTY,
    ),
    command("query-migrate-capabilities", &[], &CAPABILITY_LIST),
    Command {
        name: "migrate-set-parameters",
        args: Ty::Struct("migrate-set-parameters", &[]),
        ret: &EMPTY,
        oob: false,
    },
    command("query-migrate-parameters", &[], &PARAMETERS),
    command("query-migrate", &[], &MIGRATION_INFO),
    command("query-migrationthreads", &[], &THREAD_LIST),
    command(
        "pmemsave",
        &[req("val", &INT), req("size", &INT), req("filename", &STR)],
        &EMPTY,
    ),
    command("getfd", &[req("fdname", &STR)], &EMPTY),
    // Members depend on qom-type; the object store checks them.
    Command {
        name: "object-add",
        args: Ty::Struct("object-add", &[]),
        ret: &EMPTY,
        oob: false,
    },
    command("object-del", &[req("id", &STR)], &EMPTY),
    command("query-workload", &[], &ANY),
    // vmigrate's own: the `x-vmigrate-` prefix keeps it out of QEMU's namespace.
    command("x-vmigrate-query-migrate-timeline", &[], &ANY),
    command(
        "calc-dirty-rate",
        &[
            req("calc-time", &INT),
            opt("calc-time-unit", &TIME_UNIT),
            opt("sample-pages", &INT),
            opt("mode", &DIRTY_RATE_MODE),
        ],
        &EMPTY,
    ),
    command(
        "query-dirty-rate",
        &[opt("calc-time-unit", &TIME_UNIT)],
        &ANY,
    ),
    command("closefd", &[req("fdname", &STR)], &EMPTY),
    command(
        "set-vcpu-dirty-limit",
        &[opt("cpu-index", &INT), req("dirty-rate", &U64)],
        &EMPTY,
    ),
    command("cancel-vcpu-dirty-limit", &[opt("cpu-index", &INT)], &EMPTY),
    command("query-vcpu-dirty-limit", &[], &DIRTY_LIMIT_LIST),
    command(
        "snapshot-save",
        &[
            req("job-id", &STR),
            req("tag", &STR),
            req("vmstate", &STR),
            req("devices", &STR_LIST),
        ],
        &EMPTY,
    ),
    command(
        "snapshot-load",
        &[
            req("job-id", &STR),
            req("tag", &STR),
            req("vmstate", &STR),
            req("devices", &STR_LIST),
        ],
        &EMPTY,
    ),
    command(
        "snapshot-delete",
        &[
            req("job-id", &STR),
            req("tag", &STR),
            req("devices", &STR_LIST),
        ],
        &EMPTY,
    ),
    command("query-jobs", &[], &JOB_INFO_LIST),
    command("job-pause", &[req("id", &STR)], &EMPTY),
    command("job-resume", &[req("id", &STR)], &EMPTY),
    command("job-cancel", &[req("id", &STR)], &EMPTY),
    command("job-complete", &[req("id", &STR)], &EMPTY),
    command("job-dismiss", &[req("id", &STR)], &EMPTY),
    command("job-finalize", &[req("id", &STR)], &EMPTY),
    command(
        "human-monitor-command",
        &[req("command-line", &STR), opt("cpu-index", &INT)],
        &STR,
    ),
];

static MIGRATION_EVENT: Ty = Ty::Struct("MIGRATION-data", &[req("status", &MIGRATION_STATUS)]);
static PASS_EVENT: Ty = Ty::Struct("MIGRATION_PASS-data", &[req("pass", &INT)]);
static JOB_STATUS_EVENT: Ty = Ty::Struct(
    "JOB_STATUS_CHANGE-data",
    &[req("id", &STR), req("status", &JOB_STATUS)],
);
static SHUTDOWN_EVENT: Ty =
    Ty::Struct("SHUTDOWN-data", &[req("guest", &BOOL), req("reason", &STR)]);
/// Every event vmigrate sends, with its data.
static EVENTS: &[(&str, &Ty)] = &[
    ("MIGRATION", &MIGRATION_EVENT),
    ("MIGRATION_PASS", &PASS_EVENT),
    ("STOP", &EMPTY),
    ("RESUME", &EMPTY),
    ("SHUTDOWN", &SHUTDOWN_EVENT),
    ("JOB_STATUS_CHANGE", &JOB_STATUS_EVENT),
];

fn find_command(name: &str) -> Option<&'static Command> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// `query-qmp-schema`: the commands and events above as QEMU's `SchemaInfo` list.
fn qmp_schema() -> Value {
    let mut b = SchemaBuilder::default();
    for c in COMMANDS {
        if c.name == "migrate-set-parameters" {
            b.command(c.name, &SET_PARAMETERS, c.ret, c.oob);
        } else {
            b.command(c.name, &c.args, c.ret, c.oob);
        }
    }
    for (name, data) in EVENTS {
        b.event(name, data);
    }
    b.finish()
}

/// `query-migrationthreads`: the engine's outgoing threads (`mig/src/...`) that run now.
fn migration_threads() -> Value {
    let mut threads = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for entry in dir.flatten() {
            let Ok(tid) = entry.file_name().to_string_lossy().parse::<i64>() else {
                continue;
            };
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            let name = comm.trim_end();
            if name.starts_with("mig/src/") {
                threads.push((tid, name.to_string()));
            }
        }
    }
    threads.sort();
    Value::Array(
        threads
            .into_iter()
            .map(|(tid, name)| json!({"name": name, "thread-id": tid}))
            .collect(),
    )
}

/// QEMU's rules on a `migrate` channel list beyond its types: one entry per type, and
/// a main one.
fn check_outgoing_channels(channels: Option<&Value>) -> Result<bool, QmpError> {
    let list = channels
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let count = |t: &str| {
        list.iter()
            .filter(|c| c.get("channel-type").and_then(Value::as_str) == Some(t))
            .count()
    };
    for t in ["main", "cpr"] {
        if count(t) > 1 {
            return Err(QmpError::generic(format!(
                "Channel list has more than one {t} entry"
            )));
        }
    }
    if !list.is_empty() && count("main") == 0 {
        return Err(QmpError::generic("Channel list has no main entry"));
    }
    Ok(count("cpr") == 1)
}

/// Runs commands against one VM. Shared by every monitor connection.
pub struct Dispatcher {
    migrator: Arc<Migrator>,
    backend: Arc<dyn VmBackend>,
    /// `calc-dirty-rate` / `query-dirty-rate`.
    dirty_rate: vmigrate_engine::dirtyrate::DirtyRateMeter,
    /// `query-jobs` and the snapshot jobs.
    jobs: Arc<Jobs>,
    /// Serialises command execution, as QEMU's main loop does.
    big_lock: Mutex<()>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").finish_non_exhaustive()
    }
}

/// Per-connection context a command may use.
#[derive(Debug, Default)]
pub struct Session {
    /// Descriptors received with the last message (SCM_RIGHTS), for `getfd`.
    pub received_fds: Vec<OwnedFd>,
    /// Set by `quit`.
    pub quit: bool,
    /// Work a command left for after its reply (QEMU runs it in a bottom half).
    after_reply: AfterReply,
}

/// Steps to run once the reply of the command that queued them has been sent.
#[derive(Default)]
struct AfterReply(Vec<Box<dyn FnOnce() + Send>>);

impl std::fmt::Debug for AfterReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AfterReply({} steps)", self.0.len())
    }
}

impl Session {
    /// Runs the work the last command left for after its reply; the monitor calls this
    /// once the reply is out.
    pub fn run_after_reply(&mut self) {
        for step in std::mem::take(&mut self.after_reply.0) {
            step();
        }
    }
}

impl Dispatcher {
    pub fn new(migrator: Arc<Migrator>, backend: Arc<dyn VmBackend>) -> Arc<Self> {
        let jobs = Arc::new(Jobs::new(migrator.events().clone()));
        Arc::new(Self {
            migrator,
            backend,
            dirty_rate: Default::default(),
            jobs,
            big_lock: Mutex::new(()),
        })
    }

    pub fn migrator(&self) -> &Arc<Migrator> {
        &self.migrator
    }

    /// Names of the commands, for `query-commands`.
    pub fn command_names() -> Vec<&'static str> {
        COMMANDS.iter().map(|c| c.name).collect()
    }

    /// Whether `name` exists and may run out of band (`exec-oob`).
    pub fn allows_oob(name: &str) -> Option<bool> {
        find_command(name).map(|c| c.oob)
    }

    /// Checks arguments and runs `name`.
    pub fn execute(
        &self,
        name: &str,
        args: &Map<String, Value>,
        session: &mut Session,
    ) -> Result<Value, QmpError> {
        let Some(command) = find_command(name) else {
            return Err(QmpError::not_found(format!(
                "The command {name} has not been found"
            )));
        };
        if name != "migrate-set-parameters" && name != "object-add" {
            check_members(args, &command.args, "").map_err(QmpError::generic)?;
        }
        if name == "human-monitor-command" {
            // HMP may poll (migrate without -d): run it outside the command lock.
            // QEMU's monitor ends every output line in CRLF, here as on its sockets.
            let line = args["command-line"].as_str().unwrap_or("");
            let text = self.human_monitor_command(line, session);
            return Ok(json!(text.replace("\r\n", "\n").replace('\n', "\r\n")));
        }
        let _guard = self.big_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.run(name, args, session)
    }

    fn run(
        &self,
        name: &str,
        args: &Map<String, Value>,
        session: &mut Session,
    ) -> Result<Value, QmpError> {
        let m = &self.migrator;
        let control = m.vmm().control();
        let s = |k: &str| args.get(k).and_then(Value::as_str);
        let empty = || Ok(json!({}));
        match name {
            "qmp_capabilities" => Err(QmpError::not_found(
                "Capabilities negotiation is already complete, command ignored",
            )),
            "query-version" => Ok(version()),
            "query-qmp-schema" => Ok(qmp_schema()),
            "query-migrationthreads" => Ok(migration_threads()),
            "query-commands" => Ok(Value::Array(
                Self::command_names()
                    .into_iter()
                    .map(|n| json!({"name": n}))
                    .collect(),
            )),
            "query-status" => {
                let st = control.run_state();
                Ok(json!({"running": st.is_running(), "status": st.name()}))
            }
            "stop" => {
                match control.run_state() {
                    RunState::InMigrate => m.set_autostart(false),
                    RunState::Running => control.vm_stop(RunState::Paused),
                    _ => {}
                }
                empty()
            }
            "cont" => {
                match control.run_state() {
                    RunState::InMigrate => m.set_autostart(true),
                    RunState::Running => {}
                    _ => control.vm_start(),
                }
                empty()
            }
            "quit" => {
                session.quit = true;
                empty()
            }
            "migrate" => {
                let has_cpr = if s("uri").is_none() {
                    check_outgoing_channels(args.get("channels"))?
                } else {
                    false
                };
                let target = Migrator::parse_target(s("uri"), args.get("channels"), false)?;
                m.check_transport(&target)?;
                if m.query_parameters()["mode"] == "cpr-transfer" && !has_cpr {
                    return Err(QmpError::generic("missing 'cpr' migration channel"));
                }
                let resume = args.get("resume").and_then(Value::as_bool).unwrap_or(false);
                let cpr_channel = args
                    .get("channels")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .find(|c| c.get("channel-type").and_then(Value::as_str) == Some("cpr"))
                    .and_then(|c| c.get("addr"));
                m.migrate(target, resume, cpr_channel)?;
                empty()
            }
            "migrate-incoming" => {
                m.incoming_precheck()?;
                let target = Migrator::parse_target(s("uri"), args.get("channels"), true)?;
                let exit = args
                    .get("exit-on-error")
                    .and_then(Value::as_bool)
                    .unwrap_or(true);
                m.migrate_incoming(target, exit)?;
                empty()
            }
            "migrate_cancel" => {
                m.cancel()?;
                empty()
            }
            "migrate-continue" => {
                m.migrate_continue(s("state").unwrap_or(""))?;
                empty()
            }
            "migrate-pause" => {
                m.migrate_pause()?;
                empty()
            }
            "migrate-recover" => {
                m.recover_precheck()?;
                let target = Migrator::parse_target(s("uri"), None, true)?;
                m.migrate_recover(target)?;
                empty()
            }
            "migrate-start-postcopy" => {
                m.start_postcopy()?;
                empty()
            }
            "query-colo-status" => Ok(m.query_colo_status()),
            "x-colo-lost-heartbeat" => {
                m.colo_lost_heartbeat()?;
                empty()
            }
            "migrate-set-capabilities" => {
                m.set_capabilities(&args["capabilities"])?;
                empty()
            }
            "query-migrate-capabilities" => Ok(m.query_capabilities()),
            "migrate-set-parameters" => {
                m.set_parameters(args)?;
                empty()
            }
            "query-migrate-parameters" => Ok(m.query_parameters()),
            "query-migrate" => Ok(m.query_migrate()),
            "x-vmigrate-query-migrate-timeline" => Ok(m.query_timeline()),
            "pmemsave" => {
                let val = args["val"].as_u64().unwrap_or(0);
                let size = args["size"].as_u64().unwrap_or(0);
                self.pmemsave(val, size, s("filename").unwrap_or(""))?;
                empty()
            }
            "getfd" => {
                let fdname = s("fdname").unwrap_or("");
                let Some(fd) = session.received_fds.pop() else {
                    return Err(QmpError::generic(
                        "No file descriptor supplied via SCM_RIGHTS",
                    ));
                };
                if fdname.chars().next().is_some_and(|c| c.is_ascii_digit()) {
                    return Err(QmpError::generic(
                        "File descriptor name must not begin with a digit",
                    ));
                }
                m.fd_store().add(fdname, fd);
                empty()
            }
            "calc-dirty-rate" => {
                let request = vmigrate_engine::dirtyrate::CalcRequest {
                    calc_time: args["calc-time"].as_i64().unwrap_or(0),
                    millis: s("calc-time-unit") == Some("millisecond"),
                    sample_pages: args.get("sample-pages").and_then(Value::as_i64),
                    mode: s("mode").unwrap_or("page-sampling").to_string(),
                };
                let lease = (request.mode == "dirty-bitmap")
                    .then(|| m.lend_dirty_tracker())
                    .flatten();
                self.dirty_rate
                    .start(m.vmm().clone(), &request, lease)
                    .map_err(|e| QmpError::generic(e.to_string()))?;
                empty()
            }
            "query-dirty-rate" => Ok(self
                .dirty_rate
                .query(s("calc-time-unit") == Some("millisecond"))),
            "set-vcpu-dirty-limit" => {
                m.dirty_limiter()
                    .set(
                        args.get("cpu-index").and_then(Value::as_i64),
                        args["dirty-rate"].as_u64().unwrap_or(0),
                        m.dirty_limit_migration_running(),
                    )
                    .map_err(|e| QmpError::generic(e.to_string()))?;
                empty()
            }
            "cancel-vcpu-dirty-limit" => {
                m.dirty_limiter()
                    .cancel(
                        args.get("cpu-index").and_then(Value::as_i64),
                        m.dirty_limit_migration_running(),
                    )
                    .map_err(|e| QmpError::generic(e.to_string()))?;
                empty()
            }
            "query-vcpu-dirty-limit" => Ok(m.dirty_limiter().query()),
            "snapshot-save" | "snapshot-load" | "snapshot-delete" => {
                let job_type = match name {
                    "snapshot-save" => JobType::SnapshotSave,
                    "snapshot-load" => JobType::SnapshotLoad,
                    _ => JobType::SnapshotDelete,
                };
                let request = SnapshotRequest {
                    job_type,
                    job_id: s("job-id").unwrap_or("").to_string(),
                    devices: args["devices"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .map(String::from)
                        .collect(),
                };
                let finish = self.jobs.start_snapshot(request)?;
                if job_type == JobType::SnapshotLoad {
                    stop_if_running(control, RunState::RestoreVm);
                }
                session.after_reply.0.push(Box::new(finish));
                empty()
            }
            "query-jobs" => Ok(self.jobs.query()),
            verb if verb.starts_with("job-") => {
                let verb = JobVerb::from_command(verb).ok_or_else(|| {
                    QmpError::not_found(format!("The command {name} has not been found"))
                })?;
                self.jobs.verb(verb, s("id").unwrap_or(""))?;
                empty()
            }
            "query-workload" => self
                .backend
                .query_workload()
                .ok_or_else(|| QmpError::generic("This machine runs no workload")),
            "object-add" => {
                m.objects()
                    .add(args, true)
                    .map_err(|e| QmpError::generic(e.to_string()))?;
                empty()
            }
            "object-del" => {
                m.objects()
                    .delete(s("id").unwrap_or(""))
                    .map_err(|e| QmpError::generic(e.to_string()))?;
                empty()
            }
            "closefd" => {
                let fdname = s("fdname").unwrap_or("");
                match m.fd_store().remove(fdname) {
                    Some(_) => empty(),
                    None => Err(QmpError::generic(format!(
                        "File descriptor named '{fdname}' not found"
                    ))),
                }
            }
            _ => Err(QmpError::not_found(format!(
                "The command {name} has not been found"
            ))),
        }
    }

    fn pmemsave(&self, addr: u64, size: u64, filename: &str) -> Result<(), QmpError> {
        let mut file = std::fs::File::create(filename).map_err(|e| {
            QmpError::generic(format!(
                "Could not open '{filename}': {}",
                vmigrate_engine::errno::errno_text(&e)
            ))
        })?;
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < size {
            let n = (size - done).min(buf.len() as u64) as usize;
            if !self.backend.read_physical(addr + done, &mut buf[..n]) {
                buf[..n].fill(0);
            }
            file.write_all(&buf[..n]).map_err(|e| {
                QmpError::generic(format!(
                    "writing memory to '{filename}': {}",
                    vmigrate_engine::errno::errno_text(&e)
                ))
            })?;
            done += n as u64;
        }
        Ok(())
    }

    /// Runs an HMP command line and returns its text.
    pub fn human_monitor_command(&self, line: &str, session: &mut Session) -> String {
        let mut exec = HmpBridge {
            dispatcher: self,
            session,
        };
        vmigrate_hmp::run_command(line, &mut exec)
    }
}

/// Lets the HMP layer call QMP commands.
struct HmpBridge<'a> {
    dispatcher: &'a Dispatcher,
    session: &'a mut Session,
}

impl vmigrate_hmp::QmpExecutor for HmpBridge<'_> {
    fn execute(
        &mut self,
        command: &str,
        arguments: Value,
    ) -> Result<Value, vmigrate_hmp::QmpError> {
        let args = arguments.as_object().cloned().unwrap_or_default();
        self.dispatcher
            .execute(command, &args, self.session)
            .map_err(|e| vmigrate_hmp::QmpError {
                class: e.class.to_string(),
                desc: e.desc,
            })
    }

    /// Internal snapshots need a block device to hold the VM state, and this VM has
    /// none: QEMU's answers for that case. `loadvm` stops a running VM first and leaves
    /// it stopped; `delvm` has nothing to delete.
    fn internal_snapshot(
        &mut self,
        op: vmigrate_hmp::SnapshotOp<'_>,
    ) -> Result<(), vmigrate_hmp::QmpError> {
        use vmigrate_hmp::SnapshotOp;
        if let SnapshotOp::Load(_) = op {
            let _guard = self
                .dispatcher
                .big_lock
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            stop_if_running(
                self.dispatcher.migrator.vmm().control(),
                RunState::RestoreVm,
            );
        }
        match op {
            SnapshotOp::Delete(_) => Ok(()),
            SnapshotOp::Save(_) | SnapshotOp::Load(_) | SnapshotOp::List => {
                Err(vmigrate_hmp::QmpError::generic(NO_VMSTATE_DEVICE))
            }
        }
    }
}

/// `query-version`: the QEMU release vmigrate is compatible with.
pub fn version() -> Value {
    json!({"qemu": {"micro": 2, "minor": 0, "major": 10},
           "package": concat!("vmigrate ", env!("CARGO_PKG_VERSION"))})
}
