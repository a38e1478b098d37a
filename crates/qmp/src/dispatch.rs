//! QMP commands: argument checks as QEMU's input visitor makes them, and the handlers,
//! mapped onto the engine's [`Migrator`].

use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};
use vmigrate_engine::migrator::MigrateError;
use vmigrate_engine::{Migrator, RunState};

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

/// The argument type of one command member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arg {
    Str,
    Int,
    Bool,
    Any,
}

/// A command member: name, type, required.
type Member = (&'static str, Arg, bool);

/// Every command: name and members.
const COMMANDS: &[(&str, &[Member])] = &[
    ("qmp_capabilities", &[("enable", Arg::Any, false)]),
    ("query-version", &[]),
    ("query-commands", &[]),
    ("query-status", &[]),
    ("stop", &[]),
    ("cont", &[]),
    ("quit", &[]),
    (
        "migrate",
        &[
            ("uri", Arg::Str, false),
            ("channels", Arg::Any, false),
            ("detach", Arg::Bool, false),
            ("resume", Arg::Bool, false),
        ],
    ),
    (
        "migrate-incoming",
        &[
            ("uri", Arg::Str, false),
            ("channels", Arg::Any, false),
            ("exit-on-error", Arg::Bool, false),
        ],
    ),
    ("migrate_cancel", &[]),
    ("migrate-continue", &[("state", Arg::Str, true)]),
    ("migrate-pause", &[]),
    ("migrate-recover", &[("uri", Arg::Str, true)]),
    ("migrate-start-postcopy", &[]),
    (
        "migrate-set-capabilities",
        &[("capabilities", Arg::Any, true)],
    ),
    ("query-migrate-capabilities", &[]),
    ("migrate-set-parameters", &[]),
    ("query-migrate-parameters", &[]),
    ("query-migrate", &[]),
    (
        "pmemsave",
        &[
            ("val", Arg::Int, true),
            ("size", Arg::Int, true),
            ("filename", Arg::Str, true),
        ],
    ),
    ("getfd", &[("fdname", Arg::Str, true)]),
    ("query-workload", &[]),
    ("closefd", &[("fdname", Arg::Str, true)]),
    (
        "human-monitor-command",
        &[
            ("command-line", Arg::Str, true),
            ("cpu-index", Arg::Int, false),
        ],
    ),
];

/// Runs commands against one VM. Shared by every monitor connection.
pub struct Dispatcher {
    migrator: Arc<Migrator>,
    backend: Arc<dyn VmBackend>,
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
}

impl Dispatcher {
    pub fn new(migrator: Arc<Migrator>, backend: Arc<dyn VmBackend>) -> Arc<Self> {
        Arc::new(Self {
            migrator,
            backend,
            big_lock: Mutex::new(()),
        })
    }

    pub fn migrator(&self) -> &Arc<Migrator> {
        &self.migrator
    }

    /// Names of the commands, for `query-commands`.
    pub fn command_names() -> Vec<&'static str> {
        COMMANDS.iter().map(|(n, _)| *n).collect()
    }

    /// Checks arguments and runs `name`.
    pub fn execute(
        &self,
        name: &str,
        args: &Map<String, Value>,
        session: &mut Session,
    ) -> Result<Value, QmpError> {
        let Some((_, members)) = COMMANDS.iter().find(|(n, _)| *n == name) else {
            return Err(QmpError::not_found(format!(
                "The command {name} has not been found"
            )));
        };
        if name != "migrate-set-parameters" {
            check_args(args, members)?;
        }
        if name == "human-monitor-command" {
            // HMP may poll (migrate without -d): run it outside the command lock.
            let line = args["command-line"].as_str().unwrap_or("");
            return Ok(json!(self.human_monitor_command(line, session)));
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
                let target = Migrator::parse_target(s("uri"), args.get("channels"), false)?;
                let resume = args.get("resume").and_then(Value::as_bool).unwrap_or(false);
                m.migrate(target, resume)?;
                empty()
            }
            "migrate-incoming" => {
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
                let state = s("state").unwrap_or("");
                if vmigrate_engine::MigrationStatus::from_name(state).is_none() {
                    return Err(QmpError::generic(format!(
                        "Parameter 'state' does not accept value '{state}'"
                    )));
                }
                if state == "none" && m.status() == vmigrate_engine::MigrationStatus::None {
                    return empty();
                }
                m.migrate_continue(state)?;
                empty()
            }
            "migrate-pause" => Err(QmpError::generic(
                "migrate-pause is currently only supported during postcopy-active or postcopy-recover state",
            )),
            "migrate-recover" => Err(QmpError::generic(
                "Migrate recover can only be run when postcopy is paused.",
            )),
            "migrate-start-postcopy" => Err(QmpError::generic(
                "Enable postcopy with migrate_set_capability before the start of migration",
            )),
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
            "pmemsave" => {
                let val = args["val"].as_u64().unwrap_or(0);
                let size = args["size"].as_u64().unwrap_or(0);
                self.pmemsave(val, size, s("filename").unwrap_or(""))?;
                empty()
            }
            "getfd" => {
                let fdname = s("fdname").unwrap_or("");
                let Some(fd) = session.received_fds.pop() else {
                    return Err(QmpError::generic("No file descriptor supplied via SCM_RIGHTS"));
                };
                if fdname.chars().next().is_some_and(|c| c.is_ascii_digit()) {
                    return Err(QmpError::generic("File descriptor name must not begin with a digit"));
                }
                m.fd_store().add(fdname, fd);
                empty()
            }
            "query-workload" => self.backend.query_workload().ok_or_else(|| {
                QmpError::generic("This machine runs no workload")
            }),
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
                vmigrate_engine::transport::errno_text(&e)
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
                    vmigrate_engine::transport::errno_text(&e)
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
}

/// `query-version`: the QEMU release vmigrate is compatible with.
pub fn version() -> Value {
    json!({"qemu": {"micro": 2, "minor": 0, "major": 10},
           "package": concat!("vmigrate ", env!("CARGO_PKG_VERSION"))})
}

fn check_args(args: &Map<String, Value>, members: &[Member]) -> Result<(), QmpError> {
    for key in args.keys() {
        if !members.iter().any(|(n, _, _)| n == key) {
            return Err(QmpError::generic(format!(
                "Parameter '{key}' is unexpected"
            )));
        }
    }
    for (name, ty, required) in members {
        match args.get(*name) {
            None if *required => {
                return Err(QmpError::generic(format!("Parameter '{name}' is missing")))
            }
            None => {}
            Some(v) => {
                let ok = match ty {
                    Arg::Str => v.is_string(),
                    Arg::Int => v.is_i64() || v.is_u64(),
                    Arg::Bool => v.is_boolean(),
                    Arg::Any => true,
                };
                if !ok {
                    let t = match ty {
                        Arg::Str => "string",
                        Arg::Int => "int",
                        Arg::Bool => "bool",
                        Arg::Any => "value",
                    };
                    return Err(QmpError::generic(format!("Parameter '{name}' expects {t}")));
                }
            }
        }
    }
    Ok(())
}
