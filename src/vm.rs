//! `vmigrate vm`: builds the machine, the migration engine and the monitors.

use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use vmigrate_engine::channels::Address;
use vmigrate_engine::{EventBus, IncomingMode, MigrationProperties, Migrator, RunState};
use vmigrate_qmp::{Dispatcher, MonitorAddress, VmBackend};
use vmigrate_vm::kvm::DirtyTracking as KvmDirtyTracking;
use vmigrate_vm::soft::DirtyTracking as SoftDirtyTracking;
use vmigrate_vm::{Accel, LabConfig, Machine, MachineConfig, MachineKind, WorkloadSpec};

#[derive(Args, Debug)]
pub struct VmArgs {
    /// Machine type: `none` (RAM only) or `lab` (RAM and vCPUs running a workload).
    #[arg(long, default_value = "none")]
    machine: String,
    /// `lab` accelerator: `kvm` (default where /dev/kvm works) or `soft`.
    #[arg(long)]
    accel: Option<String>,
    /// `lab` vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// `lab` workload: `hot=SIZE,rate=BYTES_PER_S,verify` (each optional), or `none`.
    #[arg(long, default_value = "")]
    workload: String,
    /// `lab`: how the pages the guest writes are tracked.
    /// With `--accel kvm`: `log`: KVM_GET_DIRTY_LOG, which fetches and re-protects in
    /// one call; `log-clear`: KVM_GET_DIRTY_LOG then KVM_CLEAR_DIRTY_LOG for the fetched
    /// pages (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2); `ring` or `ring=ENTRIES`: a dirty ring
    /// per vCPU (KVM_CAP_DIRTY_LOG_RING; ENTRIES a power of two, default 4096);
    /// `auto` (default): ring where KVM offers it, else log-clear, else log.
    /// With `--accel soft`: `bitmap` (default): the vCPU threads mark an atomic bitmap
    /// after each write; `uffd-wp`: the kernel tracks their writes (userfaultfd
    /// asynchronous write-protection read with PAGEMAP_SCAN, Linux 6.7).
    /// A mode the host lacks is an error.
    #[arg(long, value_name = "MODE", value_parser = parse_dirty_tracking)]
    dirty_tracking: Option<DirtyTrackingArg>,
    /// `lab` serial console: `stdio`, `none` or a file.
    #[arg(long, default_value = "none")]
    serial: String,
    /// Guest RAM size, QEMU style (`64M`, `4G`; a plain number is MiB).
    #[arg(long, default_value = "128M")]
    memory: String,
    /// Map guest RAM from this file.
    #[arg(long)]
    mem_path: Option<std::path::PathBuf>,
    /// Map the file shared, so other processes see guest RAM.
    #[arg(long)]
    share: bool,
    /// Name of the RAM block (QEMU's `-M none -m` calls it `ram`).
    #[arg(long, default_value = "ram")]
    ram_id: String,
    /// QMP socket, `unix:PATH` or `tcp:HOST:PORT` (repeatable).
    #[arg(long)]
    qmp: Vec<String>,
    /// HMP monitor: `stdio` or `unix:PATH`.
    #[arg(long)]
    monitor: Option<String>,
    /// Wait for an incoming migration: a URI, or `defer` for `migrate-incoming`. Given
    /// twice for cpr-transfer: the main URI and the `cpr` channel as JSON
    /// (`{"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": P}}`),
    /// on which the CPR state is awaited before guest RAM is mapped.
    #[arg(long)]
    incoming: Vec<String>,
    /// The VM's UUID.
    #[arg(long)]
    uuid: Option<String>,
    /// Start with the vCPUs stopped (QEMU's `-S`): run state `prelaunch` until `cont`;
    /// an incoming guest is not started.
    #[arg(long)]
    paused: bool,
    /// Registers a migration blocker, `MODE:TEXT` (repeatable): outgoing migration in
    /// MODE (`normal`, `cpr-reboot`, `cpr-transfer`, or `all`) fails with TEXT, and
    /// `query-migrate` lists TEXT in `blocked-reasons` while `mode` is MODE.
    #[arg(long, value_name = "MODE:TEXT")]
    migration_blocker: Vec<String>,
    /// Sets a migration property as QEMU's `-global` does, `migration.PROPERTY=VALUE`
    /// (repeatable). Known: `multifd-flush-after-each-section` (`on`/`off`, default
    /// `off`): a multifd sync point before every RAM EOS instead of one per pass over
    /// RAM; both ends of a migration must agree.
    #[arg(long = "global", value_name = "DRIVER.PROPERTY=VALUE")]
    globals: Vec<String>,
    /// Creates an object as QEMU's `-object` does, `TYPE,id=ID,...` (repeatable; `,,`
    /// is a literal comma). Types: `tls-creds-x509` (`dir`, `endpoint=client|server`,
    /// `verify-peer=on|off`), `authz-simple` (`identity`), `authz-list` (`policy`,
    /// `rules.N.match`, `rules.N.policy`, `rules.N.format=exact|glob`); migration
    /// uses them through the `tls-creds` and `tls-authz` parameters.
    #[arg(long = "object", value_name = "TYPE,id=ID,...")]
    objects: Vec<String>,
}

/// Parses a QEMU-style memory size: a plain number is MiB.
pub fn parse_memory(s: &str) -> Option<u64> {
    if s.chars().all(|c| c.is_ascii_digit()) {
        return s.parse::<u64>().ok()?.checked_mul(1 << 20);
    }
    vmigrate_engine::channels::parse_size(s)
}

/// A `--dirty-tracking` mode, of one accelerator or the other.
#[derive(Debug, Clone, Copy)]
enum DirtyTrackingArg {
    Kvm(KvmDirtyTracking),
    Soft(SoftDirtyTracking),
}

const KVM_TRACKING_MODES: &str = "auto, log, log-clear, ring, ring=ENTRIES";
const SOFT_TRACKING_MODES: &str = "bitmap, uffd-wp";

fn parse_dirty_tracking(s: &str) -> Result<DirtyTrackingArg, String> {
    if let Some(m) = KvmDirtyTracking::parse(s) {
        return Ok(DirtyTrackingArg::Kvm(m));
    }
    SoftDirtyTracking::parse(s)
        .map(DirtyTrackingArg::Soft)
        .ok_or_else(|| {
            format!(
                "known modes: {KVM_TRACKING_MODES} (--accel kvm); \
                 {SOFT_TRACKING_MODES} (--accel soft)"
            )
        })
}

struct Backend(Arc<Machine>);

impl VmBackend for Backend {
    fn read_physical(&self, gpa: u64, out: &mut [u8]) -> bool {
        self.0.read_physical(gpa, out)
    }
    fn query_workload(&self) -> Option<serde_json::Value> {
        self.0.query_workload()
    }
}

pub fn run(args: VmArgs) -> anyhow::Result<()> {
    let kind = match args.machine.as_str() {
        "none" => MachineKind::None,
        "lab" => MachineKind::Lab,
        other => bail!("unknown machine type '{other}' (known: none, lab)"),
    };
    let accel = match args.accel.as_deref() {
        None if kind == MachineKind::Lab => Accel::host_default(),
        None => Accel::Soft,
        Some(a) => {
            Accel::parse(a).with_context(|| format!("unknown --accel '{a}' (known: kvm, soft)"))?
        }
    };
    let workload = WorkloadSpec::parse(&args.workload)
        .with_context(|| format!("invalid --workload '{}'", args.workload))?;
    if kind == MachineKind::None && args.accel.is_some() {
        bail!("--accel needs --machine lab");
    }
    // A `none` machine runs a workload on writer threads whose state does not migrate,
    // so it cannot check itself after a migration.
    let none_writers = kind == MachineKind::None && !args.workload.is_empty() && workload.enabled;
    if workload.sparse && accel == Accel::Kvm {
        bail!("--workload sparse needs --accel soft (the KVM guest fills its pages)");
    }
    if kind == MachineKind::None && workload.verify {
        bail!("--workload verify needs --machine lab (the check's state migrates with the guest)");
    }
    if kind == MachineKind::None && args.cpus != 1 && !none_writers {
        bail!("--cpus needs --machine lab or a --workload");
    }
    let (dirty_tracking, soft_dirty_tracking) = match (args.dirty_tracking, accel) {
        (None, _) => (KvmDirtyTracking::Auto, SoftDirtyTracking::Bitmap),
        (Some(_), _) if kind != MachineKind::Lab => {
            bail!("--dirty-tracking needs --machine lab")
        }
        (Some(DirtyTrackingArg::Kvm(m)), Accel::Kvm) => (m, SoftDirtyTracking::Bitmap),
        (Some(DirtyTrackingArg::Soft(m)), Accel::Soft) => (KvmDirtyTracking::Auto, m),
        (Some(DirtyTrackingArg::Kvm(m)), Accel::Soft) => bail!(
            "--dirty-tracking {} is a mode of --accel kvm; --accel soft offers \
             {SOFT_TRACKING_MODES}",
            m.name()
        ),
        (Some(DirtyTrackingArg::Soft(m)), Accel::Kvm) => bail!(
            "--dirty-tracking {m} is a mode of --accel soft; --accel kvm offers \
             {KVM_TRACKING_MODES}"
        ),
    };
    if args.cpus == 0 {
        bail!("--cpus must be at least 1");
    }
    let memory = parse_memory(&args.memory)
        .with_context(|| format!("invalid --memory '{}'", args.memory))?;
    let uuid = match &args.uuid {
        Some(u) => Some(
            vmigrate_stream::config::parse_uuid(u)
                .with_context(|| format!("invalid --uuid '{u}'"))?,
        ),
        None => None,
    };
    let mut properties = MigrationProperties::default();
    for spec in &args.globals {
        properties
            .apply_global(spec)
            .map_err(|e| anyhow::anyhow!("--global: {e}"))?;
    }
    let (incoming, cpr_path) = crate::vm_cpr::split_incoming(&args.incoming)?;
    let cpr_state = match &cpr_path {
        Some(path) => Some(crate::vm_cpr::receive(path)?),
        None => None,
    };
    let mut mem_path = args.mem_path.clone();
    let mut share = args.share;
    if let Some(state) = &cpr_state {
        match &mem_path {
            Some(p) if share => state.check_same_file(&args.ram_id, p)?,
            _ => match state.ram_path(&args.ram_id, memory)? {
                Some(p) => {
                    mem_path = Some(p);
                    share = true;
                }
                None => bail!(
                    "cpr-transfer: no descriptor came for RAM block '{}', and its memory is \
                     not a shared file (--mem-path with --share)",
                    args.ram_id
                ),
            },
        }
    }
    let initial = if incoming.is_some() {
        RunState::InMigrate
    } else if args.paused {
        RunState::Prelaunch
    } else {
        RunState::Running
    };
    let events = EventBus::new();
    events.on_warning(|msg| eprintln!("vmigrate: {msg}"));
    let machine = Arc::new(Machine::new(
        &MachineConfig {
            kind,
            memory,
            mem_path,
            share,
            ram_id: args.ram_id.clone(),
            uuid,
            initial,
            lab: LabConfig {
                accel,
                cpus: args.cpus,
                workload,
                serial: args.serial.clone(),
                dirty_tracking,
                soft_dirty_tracking,
                none_writers,
            },
        },
        events.clone(),
    )?);
    if cpr_state.is_some() {
        machine.set_ram_handed_over();
    }
    let mode = if incoming.is_some() {
        IncomingMode::Deferred
    } else {
        IncomingMode::Disabled
    };
    for spec in &args.migration_blocker {
        let (blocker_mode, reason) = vmigrate_vm::blockers::parse_blocker_spec(spec)
            .map_err(|e| anyhow::anyhow!("invalid --migration-blocker: {e}"))?;
        machine.add_migration_blocker(blocker_mode, reason);
    }
    let migrator = Migrator::new(machine.clone(), events.clone(), mode);
    migrator.set_properties(properties);
    for spec in &args.objects {
        let props = vmigrate_engine::channels::parse_object_option(spec)
            .map_err(|e| anyhow::anyhow!("--object {spec}: {e}"))?;
        migrator
            .objects()
            .add(&props, false)
            .map_err(|e| anyhow::anyhow!("--object {spec}: {e}"))?;
    }
    migrator.set_autostart(!args.paused);
    migrator.set_incoming_failure_handler(|msg| {
        eprintln!("vmigrate: {msg}");
        std::process::exit(1);
    });
    let dispatcher = Dispatcher::new(migrator.clone(), Arc::new(Backend(machine.clone())));
    let mut addrs = Vec::new();
    for q in &args.qmp {
        addrs.push(MonitorAddress::parse(q).with_context(|| format!("invalid --qmp '{q}'"))?);
    }
    vmigrate_qmp::serve(&addrs, dispatcher.clone(), &events).context("cannot start QMP")?;
    match args.monitor.as_deref() {
        None => {}
        Some("stdio") => vmigrate_qmp::hmp::run_stdio(dispatcher.clone()),
        Some(m) => match m.strip_prefix("unix:") {
            Some(path) => {
                let path = path.split(',').next().unwrap_or(path);
                vmigrate_qmp::hmp::serve_unix(path, dispatcher.clone())
                    .context("cannot start the HMP monitor")?
            }
            None => bail!("invalid --monitor '{m}' (use stdio or unix:PATH)"),
        },
    }
    if let Some(uri) = incoming.as_deref().filter(|u| *u != "defer") {
        let addr = Address::parse_uri(uri).map_err(|e| anyhow::anyhow!("{e}"))?;
        migrator
            .migrate_incoming(addr, true)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    if let Some(state) = cpr_state {
        state.close();
    }
    loop {
        std::thread::park();
    }
}
