//! The incoming migration: reads a stream into the destination VM.
//!
//! ```text
//! header ─▶ configuration (checked) ─▶ { START/PART/END ram │ FULL device │ COMMAND }* ─▶ EOF ─▶ vmdesc
//! ```

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use vmigrate_stream::command::Command;
use vmigrate_stream::config::{format_uuid, Configuration, VALIDATED_CAPABILITIES};
use vmigrate_stream::devices::{GlobalState, GLOBALSTATE_IDSTR, GLOBALSTATE_VERSION};
use vmigrate_stream::postcopy::{PostcopyAdvise, RamDiscard};
use vmigrate_stream::ram::{RAM_IDSTR, RAM_SECTION_VERSION};
use vmigrate_stream::section::{decode_footer, Record, SectionId};
use vmigrate_stream::{header, vmdesc, DecodeError, DecodeErrorKind, SliceSource, Source};

use crate::channels::return_path::ReturnPathWriter;
use crate::incoming::multifd_recv::{channel_error, MultifdReceiver, ReceiveConfig};
use crate::incoming::postcopy::{LatencySummary, PostcopyError, PostcopyIncoming, SharedWriter};
use crate::incoming::ram_load::{LoadPostcopyError, MappedRamLoad, RamLoader};
use crate::incoming::recover::{self, PostcopyRecovery, RecoverError};
use crate::io::FdSource;
use crate::options::Capabilities;
use crate::vmm::{DeviceLoadError, DeviceState, Vmm};
use vmigrate_stream::return_path::RpMessage;

/// What a completed load carried over.
#[derive(Debug)]
pub struct LoadOutcome {
    /// The run state from `globalstate`; `None` when the section was absent.
    pub runstate: Option<String>,
    pub zero_pages: u64,
    pub normal_pages: u64,
    /// A note for the log when the trailer was missing or odd (QEMU prints these and
    /// still succeeds).
    pub vmdesc_note: Option<String>,
    /// The load ended in postcopy: the guest was started at POSTCOPY_RUN already.
    pub postcopy: Option<PostcopyOutcome>,
    /// ENABLE_COLO came: the destination becomes the COLO secondary.
    pub colo: bool,
    /// The `ram` section's id, which COLO checkpoints' END sections use.
    pub ram_section: Option<u32>,
    /// The RAM block the last page record named (COLO's first checkpoint may go on
    /// with it).
    pub ram_block: Option<usize>,
}

/// What postcopy did on the destination.
#[derive(Debug, Clone, Copy)]
pub struct PostcopyOutcome {
    /// Pages asked of the source.
    pub requests: u64,
    /// Faults resolved with a zero page without asking.
    pub zero_faults: u64,
    /// Fault to placement, per fault.
    pub fault_latency: LatencySummary,
}

/// What a postcopy destination tells the migrator as the stream goes on.
pub struct PostcopyHooks<'a> {
    /// POSTCOPY_LISTEN: guest RAM is registered; the status becomes `postcopy-active`.
    pub on_listen: &'a (dyn Fn(&Arc<PostcopyIncoming>) -> Result<(), String> + Sync),
    /// POSTCOPY_RUN, with the run state `globalstate` carried (`None`: absent).
    pub on_run: &'a (dyn Fn(Option<&str>) + Sync),
    /// Pauses postcopy when a channel breaks and brings the recovery's connection;
    /// without it a break fails the migration.
    pub recovery: Option<&'a dyn PostcopyRecovery>,
}

impl std::fmt::Debug for PostcopyHooks<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PostcopyHooks")
    }
}

/// The largest PACKAGED blob accepted (QEMU's limit too: 16 MiB).
pub const MAX_PACKAGE_LEN: u32 = 1 << 24;

/// Why an incoming migration failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("device '{idstr}' failed to load at byte offset {offset}: {source}")]
    Device {
        idstr: String,
        offset: u64,
        #[source]
        source: DeviceLoadError,
    },
    #[error("postcopy failed at byte offset {offset}: {source}")]
    Postcopy {
        offset: u64,
        #[source]
        source: PostcopyError,
    },
    #[error("postcopy failed: {0}")]
    PostcopyFault(String),
    #[error(transparent)]
    Recover(#[from] RecoverError),
}

impl LoadError {
    /// Whether the error is the connection's (it broke or ended: postcopy pauses)
    /// rather than the stream's (it fails).
    pub(crate) fn is_network_failure(&self) -> bool {
        matches!(
            self,
            LoadError::Decode(DecodeError {
                kind: DecodeErrorKind::Io { .. } | DecodeErrorKind::Truncated { .. },
                ..
            })
        )
    }
}

impl From<LoadPostcopyError> for LoadError {
    fn from(e: LoadPostcopyError) -> Self {
        match e {
            LoadPostcopyError::Decode(d) => d.into(),
            LoadPostcopyError::Postcopy(offset, source) => Self::Postcopy { offset, source },
        }
    }
}

enum Entry {
    Device(Arc<dyn DeviceState>),
    GlobalState,
}

/// Loads a whole precopy stream from `src`. `return_path` is the way back to the source
/// when the transport has one (sockets); the source opens it with OPEN_RETURN_PATH.
pub fn load_stream(
    src: &mut FdSource,
    vmm: &dyn Vmm,
    caps: &Capabilities,
    return_path: Option<ReturnPathWriter>,
    multifd: Option<MultifdChannels>,
) -> Result<LoadOutcome, LoadError> {
    load_stream_with(
        src,
        vmm,
        caps,
        return_path,
        multifd,
        MappedRamLoad::default(),
    )
}

/// [`load_stream`], with the settings a mapped-ram file is read with.
pub fn load_stream_with(
    src: &mut FdSource,
    vmm: &dyn Vmm,
    caps: &Capabilities,
    return_path: Option<ReturnPathWriter>,
    multifd: Option<MultifdChannels>,
    mapped_ram: MappedRamLoad,
) -> Result<LoadOutcome, LoadError> {
    load_stream_postcopy(src, vmm, caps, return_path, multifd, mapped_ram, None)
}

/// [`load_stream_with`], for a destination that can take postcopy: `hooks` hear of
/// LISTEN and RUN.
pub fn load_stream_postcopy(
    src: &mut FdSource,
    vmm: &dyn Vmm,
    caps: &Capabilities,
    return_path: Option<ReturnPathWriter>,
    multifd: Option<MultifdChannels>,
    mapped_ram: MappedRamLoad,
    hooks: Option<&PostcopyHooks<'_>>,
) -> Result<LoadOutcome, LoadError> {
    let mut rp = ReturnPathState {
        writer: return_path.map(|w| Arc::new(Mutex::new(w))),
        open: false,
    };
    let mut ram = RamLoader::new(vmm.ram_blocks().to_vec());
    if vmm.ram_handed_over() {
        ram.ignore_all();
    } else if caps.x_ignore_shared() {
        ram.ignore_shared();
    }
    if caps.mapped_ram() {
        ram.use_mapped_ram(mapped_ram);
    }
    let receiver = multifd.map(|m| {
        let r = MultifdReceiver::start(
            m.fds,
            ReceiveConfig {
                blocks: vmm.ram_blocks().to_vec(),
                pristine: ram.pristine(),
                received: ram.received(),
                method: m.method,
                page_size: vmm
                    .ram_blocks()
                    .first()
                    .map(|b| b.page_size())
                    .unwrap_or(4096),
            },
        );
        ram.use_multifd(r.clone(), m.sync);
        r
    });
    let mut result = load_records(src, vmm, caps, &mut rp, &mut ram, hooks);
    if let Some(r) = &receiver {
        match &result {
            Ok(_) => {
                let finished = if rp.open {
                    r.close_after_last_sync()
                } else {
                    r.finish()
                };
                if let Err(e) = finished {
                    result = Err(channel_error(src.offset(), e).into());
                }
            }
            Err(_) => {
                // A channel that failed first holds the cause; the main stream's error
                // (often its end, once the source gave up) is only the consequence.
                if let Some(cause) = r.failure() {
                    result = Err(channel_error(src.offset(), cause).into());
                }
                r.abort();
            }
        }
    }
    if let Some(pc) = ram.postcopy() {
        // Whatever happened, no thread may stay blocked on a page.
        pc.finish();
    }
    // (A COLO secondary answers on the same connection after the stream: QEMU's
    // sends SHUT only once COLO is over.)
    let colo = result.as_ref().is_ok_and(|o| o.colo);
    if rp.open && !colo {
        let code = u32::from(result.is_err());
        let _ = rp.send(&RpMessage::Shut(code), 0);
    }
    if let Some(pc) = ram.postcopy() {
        pc.end_channels();
    }
    result
}

/// Where the destination is in a migration, as QEMU's `PostcopyState` counts it. Each
/// command that arrives is checked against it: one out of order ends the load with
/// QEMU's text (`CMD_POSTCOPY_RUN in wrong postcopy state (0)`).
///
/// ```text
/// precopy(0) ──ADVISE──▶ advised(1) ──RAM_DISCARD──▶ discarding(2) ──LISTEN──▶ listening(3) ──RUN──▶ running(4)
///                            └────────────────────LISTEN─────────────────────────▲
/// ```
///
/// Postcopy is not built yet: a command that would leave `precopy` is refused as
/// unsupported once its phase check passed, so the phases past it are not entered yet.
/// (QEMU's phase 5, end, follows running.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IncomingPhase {
    Precopy,
    Advised,
    Discarding,
    Listening,
    Running,
}

impl IncomingPhase {
    /// QEMU's number for the phase, as its messages print it.
    pub(crate) fn number(self) -> u8 {
        match self {
            Self::Precopy => 0,
            Self::Advised => 1,
            Self::Discarding => 2,
            Self::Listening => 3,
            Self::Running => 4,
        }
    }

    /// The phases in which `command` may arrive; `None` when any phase will do.
    fn allowed_for(command: &Command) -> Option<&'static [IncomingPhase]> {
        use IncomingPhase::*;
        match command {
            Command::PostcopyAdvise(_) => Some(&[Precopy]),
            Command::PostcopyRamDiscard(_) | Command::PostcopyListen => {
                Some(&[Advised, Discarding])
            }
            Command::PostcopyRun => Some(&[Listening]),
            Command::PostcopyResume | Command::RecvBitmap(_) => Some(&[Running]),
            _ => None,
        }
    }
}

/// What the loop that read a command does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Continue,
    /// POSTCOPY_ADVISE with RAM postcopy: the RAM loader notes pages from now on.
    Advised,
    /// POSTCOPY_LISTEN: RAM is registered; the rest of the main stream belongs to the
    /// listen thread.
    Listen,
    /// POSTCOPY_RUN: the guest may run; the package ends here.
    Run,
    /// PACKAGED: a blob of this many bytes follows.
    Package(u32),
}

/// The commands of the main stream, one handler each, and what they change: the
/// return path and the destination's phase.
struct Commands<'a> {
    rp: &'a mut ReturnPathState,
    switchover_ack: bool,
    phase: IncomingPhase,
    postcopy_ram: bool,
    blocks: Vec<Arc<crate::memory::RamBlock>>,
    /// With `postcopy-blocktime`: each vCPU's host thread id.
    vcpu_threads: Option<Vec<u32>>,
    postcopy: Option<Arc<PostcopyIncoming>>,
    hooks: Option<&'a PostcopyHooks<'a>>,
    /// `x-colo` is on here.
    colo_cap: bool,
    /// `multifd` is on here (COLO checkpoints are not loaded from its channels).
    multifd: bool,
    /// ENABLE_COLO came.
    colo: bool,
}

impl Commands<'_> {
    fn handle(&mut self, cmd: Command, at: u64) -> Result<Step, LoadError> {
        if let Some(allowed) = IncomingPhase::allowed_for(&cmd) {
            if !allowed.contains(&self.phase) {
                return Err(DecodeError::new(
                    at,
                    DecodeErrorKind::CommandInWrongPhase {
                        command: cmd.name(),
                        phase: self.phase.number(),
                    },
                )
                .into());
            }
        }
        match cmd {
            Command::OpenReturnPath => self.open_return_path(at).map(|()| Step::Continue),
            Command::Ping(v) => self.ping(v, at).map(|()| Step::Continue),
            Command::SwitchoverStart => self.switchover_start().map(|()| Step::Continue),
            Command::PostcopyAdvise(payload) => self.postcopy_advise(&payload, at),
            Command::PostcopyRamDiscard(payload) => self.postcopy_ram_discard(&payload, at),
            Command::PostcopyListen => self.postcopy_listen(at),
            Command::PostcopyRun => {
                self.phase = IncomingPhase::Running;
                Ok(Step::Run)
            }
            Command::Packaged(len) => Ok(Step::Package(len)),
            Command::EnableColo => self.enable_colo(at).map(|()| Step::Continue),
            other => Err(unsupported(&other, at)),
        }
    }

    /// ENABLE_COLO: the source will go on checkpointing after the stream; this side
    /// needs `x-colo` too (QEMU's text otherwise).
    fn enable_colo(&mut self, at: u64) -> Result<(), LoadError> {
        let invalid = |detail: &str| -> LoadError {
            DecodeError::new(
                at,
                DecodeErrorKind::Invalid {
                    what: "ENABLE_COLO",
                    detail: detail.into(),
                },
            )
            .into()
        };
        if !self.colo_cap {
            return Err(invalid(
                "ENABLE_COLO command come in migration stream, but x-colo capability is not set",
            ));
        }
        if self.multifd || self.postcopy_ram {
            return Err(invalid(
                "COLO with multifd or postcopy-ram is not supported by vmigrate yet",
            ));
        }
        self.colo = true;
        Ok(())
    }

    /// OPEN_RETURN_PATH: from now on the destination answers on the way back; with
    /// `switchover-ack` its ACK goes out at once (vmigrate has nothing to hold it for).
    fn open_return_path(&mut self, at: u64) -> Result<(), LoadError> {
        if self.rp.writer.is_none() {
            return Err(DecodeError::new(
                at,
                DecodeErrorKind::Invalid {
                    what: "OPEN_RETURN_PATH",
                    detail: "Unable to open return-path: the transport has no way back".into(),
                },
            )
            .into());
        }
        if !self.rp.open {
            self.rp.open = true;
            if self.switchover_ack {
                self.rp.send(&RpMessage::SwitchoverAck, at)?;
            }
        }
        Ok(())
    }

    /// PING: answered with a PONG of the same value.
    fn ping(&mut self, value: u32, at: u64) -> Result<(), LoadError> {
        Ok(self.rp.send(&RpMessage::Pong(value), at)?)
    }

    /// SWITCHOVER_START: the source stopped its VM; nothing to prepare here.
    fn switchover_start(&mut self) -> Result<(), LoadError> {
        Ok(())
    }

    /// POSTCOPY_ADVISE: the source may switch to postcopy. A 16-byte payload (RAM
    /// postcopy) needs `postcopy-ram` here and the same page sizes on both sides.
    fn postcopy_advise(&mut self, payload: &[u8], at: u64) -> Result<Step, LoadError> {
        let invalid = |detail: String| -> LoadError {
            DecodeError::new(
                at,
                DecodeErrorKind::Invalid {
                    what: "POSTCOPY_ADVISE",
                    detail,
                },
            )
            .into()
        };
        self.phase = IncomingPhase::Advised;
        match payload.len() {
            0 if self.postcopy_ram => {
                return Err(invalid(
                    "RAM postcopy is enabled but have 0 byte advise".into(),
                ))
            }
            0 => return Ok(Step::Continue),
            16 if !self.postcopy_ram => {
                return Err(invalid(
                    "RAM postcopy is disabled but have 16 byte advise".into(),
                ))
            }
            16 => {}
            n => return Err(invalid(format!("CMD_POSTCOPY_ADVISE invalid length ({n})"))),
        }
        let advise = PostcopyAdvise::decode(payload, at)?;
        let summary = self.blocks.iter().fold(0, |acc, b| acc | b.page_size());
        if advise.ram_pagesize_summary != summary {
            return Err(invalid(format!(
                "Postcopy needs matching RAM page sizes (s={:x} d={:x})",
                advise.ram_pagesize_summary, summary
            )));
        }
        let target = crate::memory::host_page_size();
        if advise.target_page_size != target {
            return Err(invalid(format!(
                "Postcopy needs matching target page sizes (s={} d={})",
                advise.target_page_size, target
            )));
        }
        for b in &self.blocks {
            b.postcopy_host_check()
                .map_err(|e| invalid(format!("Postcopy is not supported: {e}")))?;
        }
        self.postcopy = Some(PostcopyIncoming::new(
            self.blocks.clone(),
            self.rp.writer.clone(),
            self.vcpu_threads.clone(),
        ));
        Ok(Step::Advised)
    }

    fn postcopy_state(
        &self,
        at: u64,
        what: &'static str,
    ) -> Result<Arc<PostcopyIncoming>, LoadError> {
        self.postcopy.clone().ok_or_else(|| {
            DecodeError::new(
                at,
                DecodeErrorKind::Invalid {
                    what,
                    detail: "RAM postcopy was not advised".into(),
                },
            )
            .into()
        })
    }

    /// POSTCOPY_RAM_DISCARD: ranges of one block that must fault and be fetched.
    fn postcopy_ram_discard(&mut self, payload: &[u8], at: u64) -> Result<Step, LoadError> {
        let discard = RamDiscard::decode(payload, at)?;
        let pc = self.postcopy_state(at, "POSTCOPY_RAM_DISCARD")?;
        self.phase = IncomingPhase::Discarding;
        pc.discard(&discard.block, &discard.ranges)
            .map_err(|source| LoadError::Postcopy { offset: at, source })?;
        Ok(Step::Continue)
    }

    /// POSTCOPY_LISTEN: guest RAM is registered with userfaultfd and the fault thread
    /// starts; the caller hands the rest of the main stream to a listen thread.
    fn postcopy_listen(&mut self, at: u64) -> Result<Step, LoadError> {
        let pc = self.postcopy_state(at, "POSTCOPY_LISTEN")?;
        self.phase = IncomingPhase::Listening;
        pc.listen()
            .map_err(|source| LoadError::Postcopy { offset: at, source })?;
        if let Some(h) = self.hooks {
            (h.on_listen)(&pc).map_err(LoadError::PostcopyFault)?;
        }
        Ok(Step::Listen)
    }
}

fn unsupported(cmd: &Command, at: u64) -> LoadError {
    DecodeError::new(at, DecodeErrorKind::UnsupportedCommand(cmd.name())).into()
}

/// The destination's end of the return path. The writer is shared: the listen thread
/// answers PINGs and the fault thread asks for pages while postcopy runs.
#[derive(Clone)]
struct ReturnPathState {
    writer: Option<SharedWriter>,
    open: bool,
}

impl ReturnPathState {
    fn send(&self, msg: &RpMessage, at: u64) -> Result<(), DecodeError> {
        let w = self.writer.as_ref().filter(|_| self.open).ok_or_else(|| {
            DecodeError::new(
                at,
                DecodeErrorKind::Invalid {
                    what: "command",
                    detail: "the return path is not open".into(),
                },
            )
        })?;
        w.lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(msg)
            .map_err(|e| {
                DecodeError::new(
                    at,
                    DecodeErrorKind::Io {
                        what: "return path",
                        source: e,
                    },
                )
            })
    }
}

/// The multifd connections of an incoming migration, ordered by channel id.
#[derive(Debug)]
pub struct MultifdChannels {
    pub fds: Vec<std::os::fd::OwnedFd>,
    pub method: crate::compress::Method,
    /// Which main-stream records are sync points: MULTIFD_FLUSH always, RAM EOS too
    /// per section.
    pub sync: crate::properties::MultifdSync,
}

fn load_records(
    src: &mut FdSource,
    vmm: &dyn Vmm,
    caps: &Capabilities,
    rp: &mut ReturnPathState,
    ram: &mut RamLoader,
    hooks: Option<&PostcopyHooks<'_>>,
) -> Result<LoadOutcome, LoadError> {
    header::decode_header(src)?;
    let at = src.offset();
    let config = Configuration::decode(src)?;
    check_configuration(&config, at, vmm, caps)?;

    let devices = vmm.devices();
    let mut commands = Commands {
        rp,
        switchover_ack: caps.switchover_ack(),
        phase: IncomingPhase::Precopy,
        postcopy_ram: caps.postcopy_ram(),
        blocks: vmm.ram_blocks().to_vec(),
        vcpu_threads: caps.postcopy_blocktime().then(|| vmm.vcpu_thread_ids()),
        postcopy: None,
        hooks,
        colo_cap: caps.x_colo(),
        multifd: caps.multifd(),
        colo: false,
    };
    let mut sections: HashMap<u32, (String, u32)> = HashMap::new();
    let mut runstate = None;
    loop {
        let at = src.offset();
        match Record::decode(src)? {
            Record::Eof => break,
            Record::Start(s) | Record::Full(s) if s.idstr == RAM_IDSTR && s.instance_id == 0 => {
                check_version(&s, RAM_SECTION_VERSION, RAM_SECTION_VERSION, at)?;
                sections.insert(s.section_id, (s.idstr.clone(), 0));
                ram.load_setup(src)?;
                decode_footer(src, s.section_id, &s.idstr)?;
            }
            Record::Part(id) | Record::End(id) => {
                let Some((idstr, _)) = sections.get(&id) else {
                    return Err(DecodeError::new(at, DecodeErrorKind::UnknownSectionId(id)).into());
                };
                if idstr != RAM_IDSTR {
                    return Err(DecodeError::new(at, DecodeErrorKind::UnknownSectionId(id)).into());
                }
                ram.load_records(src)?;
                decode_footer(src, id, RAM_IDSTR)?;
            }
            Record::Start(s) | Record::Full(s) => {
                load_device_section(s, src, at, &devices, &mut sections, &mut runstate)?;
            }
            Record::Command(cmd) => match commands.handle(cmd, at)? {
                Step::Continue => {}
                Step::Advised => {
                    if ram.loaded_any() {
                        return Err(DecodeError::new(
                            at,
                            DecodeErrorKind::Invalid {
                                what: "POSTCOPY_ADVISE",
                                detail: "RAM pages were loaded before postcopy was advised".into(),
                            },
                        )
                        .into());
                    }
                    if let Some(pc) = &commands.postcopy {
                        ram.track_for_postcopy(pc.clone());
                    }
                }
                Step::Listen => {
                    // Outside a package nothing else needs this thread: it reads the
                    // rest of the stream itself.
                    let pc = commands.postcopy_state(at, "POSTCOPY_LISTEN")?;
                    let ram_ids = ram_section_ids(&sections);
                    let rp = commands.rp.clone();
                    let recovery = commands.hooks.and_then(|h| h.recovery);
                    listen_loop(src, ram, &ram_ids, &rp, &pc, recovery)?;
                    return Ok(postcopy_outcome(runstate, ram, &pc));
                }
                Step::Run => {
                    // RUN needs LISTEN, which outside a package never returns here.
                    return Err(unsupported(&Command::PostcopyRun, at));
                }
                Step::Package(len) => {
                    if len > MAX_PACKAGE_LEN {
                        return Err(DecodeError::new(
                            at,
                            DecodeErrorKind::Invalid {
                                what: "PACKAGED",
                                detail: format!("Unreasonably large packaged state: {len}"),
                            },
                        )
                        .into());
                    }
                    let base = src.offset();
                    let mut blob = vec![0u8; len as usize];
                    src.fill(&mut blob, "packaged stream")?;
                    let mut package = Package {
                        commands: &mut commands,
                        devices: &devices,
                        sections: &mut sections,
                        runstate: &mut runstate,
                    };
                    if let Some(pc) = package.run(&blob, base, src, ram)? {
                        return Ok(postcopy_outcome(runstate, ram, &pc));
                    }
                }
            },
        }
    }
    let vmdesc_note = match vmdesc::decode(src) {
        Ok(Some(_)) => None,
        Ok(None) => Some("Expected vmdescription section, but got 0".to_string()),
        Err(e) => Some(e.to_string()),
    };
    Ok(LoadOutcome {
        runstate,
        zero_pages: ram.zero_pages,
        normal_pages: ram.normal_pages,
        vmdesc_note,
        postcopy: None,
        colo: commands.colo,
        ram_section: ram_section_ids(&sections).into_iter().next(),
        ram_block: ram.current_block(),
    })
}

fn postcopy_outcome(
    runstate: Option<String>,
    ram: &RamLoader,
    pc: &PostcopyIncoming,
) -> LoadOutcome {
    LoadOutcome {
        runstate,
        zero_pages: ram.zero_pages,
        normal_pages: ram.normal_pages,
        // A postcopy stream has no trailer.
        vmdesc_note: None,
        postcopy: Some(PostcopyOutcome {
            requests: pc.requests(),
            zero_faults: pc.zero_faults(),
            fault_latency: pc.latency(),
        }),
        colo: false,
        ram_section: None,
        ram_block: None,
    }
}

fn ram_section_ids(sections: &HashMap<u32, (String, u32)>) -> HashSet<u32> {
    sections
        .iter()
        .filter(|(_, (idstr, _))| idstr == RAM_IDSTR)
        .map(|(id, _)| *id)
        .collect()
}

/// Loads a device's START/FULL section body (the header at `at` was read).
pub(crate) fn load_device_section<S: Source>(
    s: SectionId,
    src: &mut S,
    at: u64,
    devices: &[Arc<dyn DeviceState>],
    sections: &mut HashMap<u32, (String, u32)>,
    runstate: &mut Option<String>,
) -> Result<(), LoadError> {
    let entry = if s.idstr == GLOBALSTATE_IDSTR && s.instance_id == 0 {
        Entry::GlobalState
    } else {
        devices
            .iter()
            .find(|d| {
                (d.idstr() == s.idstr || s.idstr.rsplit('/').next() == Some(d.idstr()))
                    && d.instance_id() == s.instance_id
            })
            .cloned()
            .map(Entry::Device)
            .ok_or_else(|| {
                DecodeError::new(
                    at,
                    DecodeErrorKind::UnknownSection {
                        idstr: s.idstr.clone(),
                        instance: s.instance_id,
                    },
                )
            })?
    };
    sections.insert(s.section_id, (s.idstr.clone(), s.instance_id));
    match entry {
        Entry::GlobalState => {
            check_version(&s, GLOBALSTATE_VERSION, GLOBALSTATE_VERSION, at)?;
            *runstate = Some(GlobalState::decode(src)?.runstate);
        }
        Entry::Device(dev) => {
            check_version(&s, dev.version(), dev.minimum_version(), at)?;
            let body_at = src.offset();
            let mut dyn_src: &mut dyn Source = src;
            dev.load(&mut dyn_src, s.version_id)
                .map_err(|source| LoadError::Device {
                    idstr: s.idstr.clone(),
                    offset: body_at,
                    source,
                })?;
        }
    }
    decode_footer(src, s.section_id, &s.idstr)?;
    Ok(())
}

/// A PACKAGED blob's nested stream: LISTEN, device sections, PING, RUN. From LISTEN on
/// a listen thread reads the main stream while this one goes on with the blob, which
/// is in memory already; RUN ends the package.
struct Package<'p, 'a> {
    commands: &'p mut Commands<'a>,
    devices: &'p [Arc<dyn DeviceState>],
    sections: &'p mut HashMap<u32, (String, u32)>,
    runstate: &'p mut Option<String>,
}

impl<'a> Package<'_, 'a> {
    /// Loads the blob; `Some` when it started postcopy, whose listen thread has then
    /// read the main stream to its end.
    fn run(
        &mut self,
        blob: &[u8],
        base: u64,
        src: &mut FdSource,
        ram: &mut RamLoader,
    ) -> Result<Option<Arc<PostcopyIncoming>>, LoadError> {
        let mut nested = SliceSource::with_base(blob, base);
        let mut stream = Some((src, ram));
        std::thread::scope(|scope| {
            let mut listener = None;
            let result = self.load_nested(&mut nested, &mut stream, scope, &mut listener);
            let Some((handle, shutdown, pc)) = listener else {
                return result.map(|()| None);
            };
            if result.is_err() {
                // The listen thread must not wait for a stream nobody reads any more;
                // the way back stays open for the SHUT that tells the source.
                pc.finish();
                let _ = rustix::net::shutdown(&shutdown, rustix::net::Shutdown::Read);
            }
            let listened: Result<(), LoadError> = handle.join().unwrap_or_else(|_| {
                Err(LoadError::PostcopyFault(
                    "the listen thread panicked".into(),
                ))
            });
            result?;
            listened?;
            Ok(Some(pc))
        })
    }

    #[allow(clippy::type_complexity)]
    fn load_nested<'scope, 'env>(
        &mut self,
        nested: &mut SliceSource<'_>,
        stream: &mut Option<(&'env mut FdSource, &'env mut RamLoader)>,
        scope: &'scope std::thread::Scope<'scope, 'env>,
        listener: &mut Option<(
            std::thread::ScopedJoinHandle<'scope, Result<(), LoadError>>,
            OwnedFd,
            Arc<PostcopyIncoming>,
        )>,
    ) -> Result<(), LoadError>
    where
        'a: 'env,
    {
        loop {
            let at = nested.offset();
            // With LISTEN done and no RUN, the listen thread reads the main stream
            // from here on, where a RUN after the package has no place.
            let listening = listener.is_some();
            if nested.peek_u8()?.is_none() {
                return end_of_package(listening, at);
            }
            match Record::decode(nested)? {
                Record::Eof => return end_of_package(listening, at),
                Record::Start(s) | Record::Full(s) if s.idstr != RAM_IDSTR => {
                    load_device_section(s, nested, at, self.devices, self.sections, self.runstate)?;
                }
                Record::Start(_) | Record::Full(_) | Record::Part(_) | Record::End(_) => {
                    return Err(DecodeError::new(
                        at,
                        DecodeErrorKind::Invalid {
                            what: "PACKAGED",
                            detail: "RAM sections do not occur inside a package".into(),
                        },
                    )
                    .into())
                }
                Record::Command(cmd) => match self.commands.handle(cmd, at)? {
                    Step::Continue => {}
                    Step::Listen => {
                        let pc = self.commands.postcopy_state(at, "POSTCOPY_LISTEN")?;
                        let Some((src, ram)) = stream.take() else {
                            return Err(unsupported(&Command::PostcopyListen, at));
                        };
                        let shutdown = src.fd().try_clone().map_err(|e| {
                            LoadError::PostcopyFault(format!("cannot start the listen thread: {e}"))
                        })?;
                        let ram_ids = ram_section_ids(self.sections);
                        let rp = self.commands.rp.clone();
                        let thread_pc = pc.clone();
                        let recovery = self.commands.hooks.and_then(|h| h.recovery);
                        let handle = std::thread::Builder::new()
                            .name("mig/dst/listen".into())
                            .spawn_scoped(scope, move || {
                                let r = listen_loop(src, ram, &ram_ids, &rp, &thread_pc, recovery);
                                // Done or failed, no page will arrive any more.
                                thread_pc.finish();
                                r
                            })
                            .map_err(|e| {
                                pc.finish();
                                LoadError::PostcopyFault(format!(
                                    "cannot start the listen thread: {e}"
                                ))
                            })?;
                        *listener = Some((handle, shutdown, pc));
                    }
                    Step::Run => {
                        if let Some(h) = self.commands.hooks {
                            (h.on_run)(self.runstate.as_deref());
                        }
                        return Ok(());
                    }
                    Step::Advised | Step::Package(_) => {
                        return Err(DecodeError::new(
                            at,
                            DecodeErrorKind::Invalid {
                                what: "PACKAGED",
                                detail:
                                    "POSTCOPY_ADVISE and PACKAGED do not occur inside a package"
                                        .into(),
                            },
                        )
                        .into())
                    }
                },
            }
        }
    }
}

/// The end of a package (its last byte, or EOF in it): fine unless it started the
/// listen thread without running the guest.
fn end_of_package(listening: bool, at: u64) -> Result<(), LoadError> {
    if !listening {
        return Ok(());
    }
    Err(DecodeError::new(
        at,
        DecodeErrorKind::Invalid {
            what: "PACKAGED",
            detail: "the package ends after POSTCOPY_LISTEN without POSTCOPY_RUN".into(),
        },
    )
    .into())
}

/// The listen thread: the rest of the main stream once postcopy listens. A break of
/// the connection pauses postcopy when `recovery` is given; reading goes on from the
/// recovery's new connection (see [`crate::incoming::recover`]).
fn listen_loop(
    src: &mut FdSource,
    ram: &mut RamLoader,
    ram_ids: &HashSet<u32>,
    rp: &ReturnPathState,
    pc: &PostcopyIncoming,
    recovery: Option<&dyn PostcopyRecovery>,
) -> Result<(), LoadError> {
    pc.set_main_channel(src.fd());
    // The connection of the last recovery, and its reader.
    let mut reconnected: Option<(crate::channels::transport::Channel, FdSource)> = None;
    let mut recovering = false;
    loop {
        let current = match reconnected.as_mut() {
            Some((_, s)) => s,
            None => &mut *src,
        };
        let listen = ListenState {
            ram_ids,
            rp,
            pc,
            recovery,
        };
        let error = match listen.read(current, ram, &mut recovering) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let Some(recovery) = recovery.filter(|_| error.is_network_failure()) else {
            return Err(error);
        };
        pc.pause();
        let Some(ch) = recovery.pause_and_accept(&error.to_string()) else {
            return Err(error);
        };
        let (Ok(back), Ok(read)) = (ch.fd.try_clone(), ch.fd.try_clone()) else {
            return Err(error);
        };
        if let Some(w) = &rp.writer {
            recover::replace_writer(w, back);
        }
        pc.set_main_channel(&ch.fd);
        reconnected = Some((ch, FdSource::new(read, 0)));
        recovering = true;
    }
}

/// What the listen thread reads the main stream with.
struct ListenState<'l> {
    ram_ids: &'l HashSet<u32>,
    rp: &'l ReturnPathState,
    pc: &'l PostcopyIncoming,
    recovery: Option<&'l dyn PostcopyRecovery>,
}

impl ListenState<'_> {
    /// Reads one connection. Only RAM PART/END sections (ZERO, PAGE, EOS), PING and
    /// EOF may come (there is no trailer), and on a recovery's connection RECV_BITMAP
    /// and POSTCOPY_RESUME; `recovering` is set until the latter.
    fn read(
        &self,
        src: &mut FdSource,
        ram: &mut RamLoader,
        recovering: &mut bool,
    ) -> Result<(), LoadError> {
        let pc = self.pc;
        let mut page = Vec::new();
        loop {
            if let Some(e) = pc.fault_error() {
                return Err(LoadError::PostcopyFault(e));
            }
            let at = src.offset();
            match Record::decode(src)? {
                Record::Eof => {
                    // Requested pages may still be on their way on the preempt channel.
                    pc.await_requested_pages()
                        .map_err(LoadError::PostcopyFault)?;
                    if let Some(e) = pc.fault_error() {
                        return Err(LoadError::PostcopyFault(e));
                    }
                    return Ok(());
                }
                Record::Part(id) | Record::End(id) => {
                    if !self.ram_ids.contains(&id) {
                        return Err(
                            DecodeError::new(at, DecodeErrorKind::UnknownSectionId(id)).into()
                        );
                    }
                    ram.load_records_postcopy(src, &mut page)?;
                    decode_footer(src, id, RAM_IDSTR)?;
                }
                Record::Command(Command::Ping(v)) => self.rp.send(&RpMessage::Pong(v), at)?,
                // A bitmap of a block this VM does not have: that is the problem to
                // name (as QEMU does), whatever the phase.
                Record::Command(Command::RecvBitmap(block)) if !pc.has_block(&block) => {
                    return Err(DecodeError::new(
                        at,
                        DecodeErrorKind::Invalid {
                            what: "RECV_BITMAP",
                            detail: format!("RAM block '{block}' not found"),
                        },
                    )
                    .into())
                }
                Record::Command(Command::RecvBitmap(block)) => {
                    let writer = self.recovery_writer(*recovering, "RECV_BITMAP", at)?;
                    recover::answer_recv_bitmap(pc, writer, &block)?;
                }
                Record::Command(Command::PostcopyResume) => {
                    let writer = self.recovery_writer(*recovering, "POSTCOPY_RESUME", at)?;
                    let recovery = self
                        .recovery
                        .ok_or(RecoverError::NotRecovering("POSTCOPY_RESUME"))?;
                    recover::answer_resume(pc, writer, recovery)?;
                    *recovering = false;
                }
                Record::Command(cmd) => {
                    return Err(DecodeError::new(
                        at,
                        DecodeErrorKind::CommandInWrongPhase {
                            command: cmd.name(),
                            phase: IncomingPhase::Running.number(),
                        },
                    )
                    .into())
                }
                Record::Start(s) | Record::Full(s) => {
                    return Err(DecodeError::new(
                        at,
                        DecodeErrorKind::Invalid {
                            what: "section",
                            detail: format!(
                                "section '{}' arrived while postcopy runs; only RAM may",
                                s.idstr
                            ),
                        },
                    )
                    .into())
                }
            }
        }
    }

    /// The return path a recovery command is answered on; the command is refused
    /// outside a recovery.
    fn recovery_writer(
        &self,
        recovering: bool,
        command: &'static str,
        at: u64,
    ) -> Result<&SharedWriter, LoadError> {
        match &self.rp.writer {
            Some(w) if recovering && self.rp.open => Ok(w),
            _ => Err(DecodeError::new(
                at,
                DecodeErrorKind::Invalid {
                    what: command,
                    detail: RecoverError::NotRecovering(command).to_string(),
                },
            )
            .into()),
        }
    }
}

fn check_version(s: &SectionId, local: u32, minimum: u32, at: u64) -> Result<(), DecodeError> {
    if s.version_id > local {
        return Err(DecodeError::new(
            at,
            DecodeErrorKind::UnsupportedSectionVersion {
                idstr: s.idstr.clone(),
                version: s.version_id,
                local,
            },
        ));
    }
    if s.version_id < minimum {
        return Err(DecodeError::new(
            at,
            DecodeErrorKind::SectionVersionTooOld {
                idstr: s.idstr.clone(),
                version: s.version_id,
                minimum,
            },
        ));
    }
    Ok(())
}

fn check_configuration(
    config: &Configuration,
    at: u64,
    vmm: &dyn Vmm,
    caps: &Capabilities,
) -> Result<(), DecodeError> {
    let local = vmm.machine_name();
    if !local.as_bytes().starts_with(config.machine.as_bytes()) {
        return Err(DecodeError::new(
            at,
            DecodeErrorKind::MachineMismatch {
                received: config.machine.clone(),
                local: local.to_string(),
            },
        ));
    }
    for name in &config.capabilities {
        if !VALIDATED_CAPABILITIES.contains(&name.as_str()) {
            return Err(DecodeError::new(
                at,
                DecodeErrorKind::UnknownCapability(name.clone()),
            ));
        }
    }
    for name in VALIDATED_CAPABILITIES {
        let received = config.has_capability(name);
        let local_state = crate::options::Cap::from_name(name).is_some_and(|c| caps.has(c));
        if received != local_state {
            return Err(DecodeError::new(
                at,
                DecodeErrorKind::CapabilityMismatch {
                    name: name.to_string(),
                    local: local_state.into(),
                    received: received.into(),
                },
            ));
        }
    }
    if let Some(bits) = config.target_page_bits {
        let local_bits = vmm
            .ram_blocks()
            .first()
            .map(|b| b.page_size().trailing_zeros())
            .unwrap_or(12);
        if bits != local_bits {
            return Err(DecodeError::new(
                at,
                DecodeErrorKind::PageBitsMismatch {
                    received: bits,
                    local: local_bits,
                },
            ));
        }
    }
    if let (Some(received), Some(local)) = (config.uuid, vmm.uuid()) {
        if received != local {
            return Err(DecodeError::new(
                at,
                DecodeErrorKind::UuidMismatch {
                    received: format_uuid(&received),
                    local: format_uuid(&local),
                },
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;

    use vmigrate_stream::config::Configuration;

    use super::*;
    use crate::channels::return_path::ReturnPathWriter;
    use crate::status::RunState;
    use crate::test_support::{temp_path, FakeVmm};

    /// Loads a stream of the header, a `none` configuration and `commands`.
    fn load_commands(commands: &[Command]) -> Result<LoadOutcome, LoadError> {
        let mut bytes = Vec::new();
        header::encode_header(&mut bytes);
        Configuration {
            machine: "none".into(),
            target_page_bits: None,
            capabilities: vec![],
            uuid: None,
        }
        .encode(&mut bytes);
        for c in commands {
            c.encode(&mut bytes);
        }
        Record::Eof.encode(&mut bytes);
        let path = temp_path("cmds");
        std::fs::write(&path, &bytes).unwrap();
        let fd = OwnedFd::from(std::fs::File::open(&path).unwrap());
        let _ = std::fs::remove_file(&path);
        let mut src = FdSource::new(fd, 0);
        let vmm = FakeVmm::new(4, RunState::InMigrate);
        load_stream(&mut src, vmm.as_ref(), &Capabilities::default(), None, None)
    }

    #[test]
    fn each_command_is_checked_against_the_phase() {
        let text = |cmds: &[Command]| load_commands(cmds).unwrap_err().to_string();
        assert!(load_commands(&[Command::SwitchoverStart]).is_ok());
        for (cmds, want) in [
            (
                vec![Command::PostcopyRun],
                "CMD_POSTCOPY_RUN in wrong postcopy state (0)",
            ),
            (
                vec![Command::PostcopyListen],
                "CMD_POSTCOPY_LISTEN in wrong postcopy state (0)",
            ),
            (
                vec![Command::PostcopyRamDiscard(vec![0, 0])],
                "CMD_POSTCOPY_RAM_DISCARD in wrong postcopy state (0)",
            ),
            (
                vec![Command::PostcopyResume],
                "CMD_POSTCOPY_RESUME in wrong postcopy state (0)",
            ),
            // In its phase, but this destination has no postcopy-ram.
            (
                vec![Command::PostcopyAdvise(vec![0; 16])],
                "RAM postcopy is disabled but have 16 byte advise",
            ),
            (
                vec![Command::PostcopyAdvise(vec![0; 5])],
                "POSTCOPY_ADVISE received with bad length - expecting 16, got 5",
            ),
            // A package that claims more than the stream holds, or more than the cap.
            (vec![Command::Packaged(64)], "packaged stream"),
            (
                vec![Command::Packaged(MAX_PACKAGE_LEN + 1)],
                "Unreasonably large packaged state: 16777217",
            ),
            // A 0-byte advise (no RAM postcopy) still moves the phase on.
            (
                vec![Command::PostcopyAdvise(vec![]), Command::PostcopyRun],
                "CMD_POSTCOPY_RUN in wrong postcopy state (1)",
            ),
            (
                vec![Command::PostcopyAdvise(vec![]), Command::PostcopyListen],
                "RAM postcopy was not advised",
            ),
            // PING needs an open return path.
            (vec![Command::Ping(3)], "the return path is not open"),
            (
                vec![Command::OpenReturnPath],
                "the transport has no way back",
            ),
        ] {
            let got = text(&cmds);
            assert!(got.contains(want), "{cmds:?}: {got}");
            assert!(got.contains("byte offset"), "{got}");
        }
    }

    /// Plays a postcopy source for a 16-page `ram` block: pages 0-3 as data and 4-7 as
    /// zero in precopy, pages 2-3 discarded, then the package. Returns the test's end of
    /// the socket and the loader's thread.
    mod postcopy_source {
        use super::*;
        use crate::memory::host_page_size;
        use vmigrate_stream::ram;

        pub(super) const RAM_ID: u32 = 2;

        pub(super) fn page_bytes(page: u64, ps: u64) -> Vec<u8> {
            (0..ps).map(|j| (page * 7 + j) as u8).collect()
        }

        pub(super) fn precopy_and_package(pages: u64) -> Vec<u8> {
            let ps = host_page_size();
            let mut b = Vec::new();
            header::encode_header(&mut b);
            Configuration {
                machine: "none".into(),
                target_page_bits: None,
                capabilities: vec![],
                uuid: None,
            }
            .encode(&mut b);
            Command::OpenReturnPath.encode(&mut b);
            Command::PostcopyAdvise(
                PostcopyAdvise {
                    ram_pagesize_summary: ps,
                    target_page_size: ps,
                }
                .encode(),
            )
            .encode(&mut b);
            Record::Start(SectionId {
                section_id: RAM_ID,
                idstr: RAM_IDSTR.into(),
                instance_id: 0,
                version_id: RAM_SECTION_VERSION,
            })
            .encode(&mut b);
            ram::put_mem_size(&mut b, pages * ps);
            ram::BlockEntry {
                idstr: "ram".into(),
                used_length: pages * ps,
                page_size: None,
                mr_addr: None,
            }
            .encode(&mut b);
            ram::put_eos(&mut b);
            vmigrate_stream::section::encode_footer(&mut b, RAM_ID);
            Record::Part(RAM_ID).encode(&mut b);
            for p in 0..4u64 {
                ram::put_page_header(&mut b, p * ps, ram::FLAG_PAGE, (p == 0).then_some("ram"));
                b.extend_from_slice(&page_bytes(p, ps));
            }
            for p in 4..8u64 {
                ram::put_zero_page(&mut b, p * ps, None);
            }
            ram::put_eos(&mut b);
            vmigrate_stream::section::encode_footer(&mut b, RAM_ID);
            Command::SwitchoverStart.encode(&mut b);
            Command::PostcopyRamDiscard(
                RamDiscard {
                    block: "ram".into(),
                    ranges: vec![(2 * ps, 2 * ps), (8 * ps, (pages - 8) * ps)],
                }
                .encode(),
            )
            .encode(&mut b);
            let mut pkg = Vec::new();
            Command::PostcopyListen.encode(&mut pkg);
            Record::Full(SectionId {
                section_id: 9,
                idstr: GLOBALSTATE_IDSTR.into(),
                instance_id: 0,
                version_id: GLOBALSTATE_VERSION,
            })
            .encode(&mut pkg);
            pkg.extend_from_slice(
                &GlobalState {
                    runstate: "running".into(),
                    vm_was_suspended: false,
                }
                .encode(),
            );
            vmigrate_stream::section::encode_footer(&mut pkg, 9);
            Command::Ping(3).encode(&mut pkg);
            Command::PostcopyRun.encode(&mut pkg);
            Command::Packaged(pkg.len() as u32).encode(&mut b);
            b.extend_from_slice(&pkg);
            b
        }

        /// A PART (or END) section with `pages` as PAGE records.
        pub(super) fn pages_section(end: bool, pages: &[u64]) -> Vec<u8> {
            let ps = host_page_size();
            let mut b = Vec::new();
            if end {
                Record::End(RAM_ID).encode(&mut b);
            } else {
                Record::Part(RAM_ID).encode(&mut b);
            }
            for &p in pages {
                ram::put_page_header(&mut b, p * ps, ram::FLAG_PAGE, Some("ram"));
                b.extend_from_slice(&page_bytes(p, ps));
            }
            ram::put_eos(&mut b);
            vmigrate_stream::section::encode_footer(&mut b, RAM_ID);
            b
        }
    }

    fn postcopy_caps(blocktime: bool) -> Capabilities {
        Capabilities::default()
            .merged(
                &serde_json::json!([{"capability": "postcopy-ram", "state": true},
                                    {"capability": "postcopy-blocktime", "state": blocktime}]),
                false,
                &crate::options::Parameters::default(),
            )
            .unwrap()
    }

    /// What a synthetic postcopy run gives: the load's result, the return path's
    /// messages, the postcopy session.
    type PostcopyRun = (
        Result<LoadOutcome, LoadError>,
        Vec<RpMessage>,
        Option<Arc<PostcopyIncoming>>,
    );

    /// Runs the synthetic postcopy stream; `hostile` sends the requested page twice.
    /// The thread that reads the discarded page 2 plays vCPU 1 of 2; with `blocktime`
    /// the capability is on, and the source holds the page back `hold` long.
    fn run_postcopy_with(
        hostile: bool,
        blocktime: bool,
        hold: std::time::Duration,
    ) -> Option<PostcopyRun> {
        use std::io::Write;
        use std::os::unix::net::UnixStream;
        if let Err(e) = crate::uffd::available() {
            eprintln!("SKIP postcopy test: userfaultfd is not usable here: {e}");
            return None;
        }
        let ps = crate::memory::host_page_size();
        let pages = 16u64;
        let vmm = FakeVmm::new(pages as usize, RunState::InMigrate);
        let (dst, mut source) = UnixStream::pair().unwrap();
        source
            .set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let caps = postcopy_caps(blocktime);
        let runs = Mutex::new(Vec::new());
        let listened = std::sync::atomic::AtomicBool::new(false);
        let session = Mutex::new(None);
        let on_listen = |pc: &Arc<PostcopyIncoming>| -> Result<(), String> {
            listened.store(true, std::sync::atomic::Ordering::SeqCst);
            *session.lock().unwrap() = Some(pc.clone());
            Ok(())
        };
        let on_run = |r: Option<&str>| runs.lock().unwrap().push(r.map(str::to_string));
        let hooks = PostcopyHooks {
            on_listen: &on_listen,
            on_run: &on_run,
            recovery: None,
        };
        let block = vmm.ram_blocks()[0].clone();
        std::thread::scope(|scope| {
            // Page 2 was discarded: this reader (vCPU 1) waits until the source sends
            // it.
            let (go, wait) = std::sync::mpsc::channel::<()>();
            let (tid_tx, tid_rx) = std::sync::mpsc::channel();
            let reader = {
                let b = block.clone();
                scope.spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    let _ = tid_tx.send(unsafe { libc::gettid() } as u32);
                    wait.recv().unwrap();
                    let mut page = vec![0u8; ps as usize];
                    b.read(2 * ps, &mut page);
                    page
                })
            };
            *vmm.vcpu_threads.lock().unwrap() = vec![1, tid_rx.recv().unwrap()];
            let loader = scope.spawn(|| {
                let fd = OwnedFd::from(dst.try_clone().unwrap());
                let mut src = FdSource::new(fd, 0);
                let rp = ReturnPathWriter::new(Box::new(dst.try_clone().unwrap()));
                load_stream_postcopy(
                    &mut src,
                    vmm.as_ref(),
                    &caps,
                    Some(rp),
                    None,
                    MappedRamLoad::default(),
                    Some(&hooks),
                )
            });
            source
                .write_all(&postcopy_source::precopy_and_package(pages))
                .unwrap();
            let mut rp_in = FdSource::new(OwnedFd::from(source.try_clone().unwrap()), 0);
            let mut heard = vec![RpMessage::decode(&mut rp_in).unwrap()];
            assert_eq!(heard[0], RpMessage::Pong(3));
            // Page 5 came as zero and was never written: placed at once, no request.
            let zero_reader = {
                let b = block.clone();
                scope.spawn(move || {
                    let mut page = vec![1u8; ps as usize];
                    b.read(5 * ps, &mut page);
                    page
                })
            };
            assert!(zero_reader.join().unwrap().iter().all(|&x| x == 0));
            go.send(()).unwrap();
            let req = RpMessage::decode(&mut rp_in).unwrap();
            assert_eq!(
                req,
                RpMessage::ReqPagesId {
                    start: 2 * ps,
                    len: ps as u32,
                    block: "ram".into()
                }
            );
            heard.push(req);
            std::thread::sleep(hold);
            source
                .write_all(&postcopy_source::pages_section(false, &[2]))
                .unwrap();
            assert_eq!(reader.join().unwrap(), postcopy_source::page_bytes(2, ps));
            let rest: Vec<u64> = if hostile {
                vec![2]
            } else {
                std::iter::once(3).chain(8..pages).collect()
            };
            source
                .write_all(&postcopy_source::pages_section(true, &rest))
                .unwrap();
            let mut tail = Vec::new();
            Record::Eof.encode(&mut tail);
            let _ = source.write_all(&tail);
            heard.push(RpMessage::decode(&mut rp_in).unwrap());
            let result = loader.join().unwrap();
            assert!(listened.load(std::sync::atomic::Ordering::SeqCst));
            assert_eq!(*runs.lock().unwrap(), vec![Some("running".to_string())]);
            if result.is_ok() {
                let ram = vmm.ram();
                for p in 0..pages {
                    let want = if (4..8).contains(&p) {
                        vec![0; ps as usize]
                    } else {
                        postcopy_source::page_bytes(p, ps)
                    };
                    let at = (p * ps) as usize;
                    assert_eq!(&ram[at..at + ps as usize], &want[..], "page {p}");
                }
            }
            let pc = session.lock().unwrap().take();
            Some((result, heard, pc))
        })
    }

    fn run_postcopy(hostile: bool) -> Option<(Result<LoadOutcome, LoadError>, Vec<RpMessage>)> {
        run_postcopy_with(hostile, false, std::time::Duration::ZERO)
            .map(|(result, heard, _)| (result, heard))
    }

    #[test]
    fn postcopy_blocktime_counts_the_vcpu_thread_waits() {
        let hold = std::time::Duration::from_millis(150);
        let Some((result, _, pc)) = run_postcopy_with(false, true, hold) else {
            return;
        };
        result.unwrap();
        let (overall, per_vcpu) = pc.unwrap().blocktime().expect("blocktime on");
        // vCPU 1 waited for page 2 at least as long as the source held it; vCPU 0
        // (thread id 1, no such thread) never faulted, so the vCPUs were never all
        // blocked at once.
        assert_eq!(per_vcpu.len(), 2);
        assert_eq!(per_vcpu[0], 0);
        assert!((150..5000).contains(&per_vcpu[1]), "{per_vcpu:?}");
        assert_eq!(overall, 0);
        // Without the capability, nothing is measured.
        let Some((result, _, pc)) = run_postcopy_with(false, false, hold) else {
            return;
        };
        result.unwrap();
        assert_eq!(pc.unwrap().blocktime(), None);
    }

    #[test]
    fn postcopy_pages_are_requested_and_placed() {
        let Some((result, heard)) = run_postcopy(false) else {
            return;
        };
        let outcome = result.unwrap();
        let pc = outcome.postcopy.expect("a postcopy outcome");
        assert_eq!(pc.requests, 1);
        assert_eq!(pc.fault_latency.count, 1);
        assert_eq!(
            pc.zero_faults, 1,
            "page 5 was placed as zero without asking"
        );
        assert_eq!(outcome.vmdesc_note, None);
        assert_eq!(heard.last(), Some(&RpMessage::Shut(0)));
    }

    #[test]
    fn a_page_placed_twice_fails_postcopy_cleanly() {
        let Some((result, heard)) = run_postcopy(true) else {
            return;
        };
        let text = result.unwrap_err().to_string();
        assert!(
            text.contains("page 0x2000 of block 'ram' was already placed in postcopy")
                || text.contains("was already placed"),
            "{text}"
        );
        assert_eq!(heard.last(), Some(&RpMessage::Shut(1)));
    }

    /// A recovery that hands the listen thread the socket pairs of `conns`, one per
    /// pause, and counts what it was told.
    struct FakeRecovery {
        conns: Mutex<Vec<std::os::unix::net::UnixStream>>,
        pauses: Mutex<Vec<String>>,
        resumes: std::sync::atomic::AtomicUsize,
    }

    impl PostcopyRecovery for FakeRecovery {
        fn pause_and_accept(&self, reason: &str) -> Option<crate::channels::transport::Channel> {
            self.pauses.lock().unwrap().push(reason.to_string());
            let conn = self.conns.lock().unwrap().pop()?;
            Some(crate::channels::transport::Channel::plain(
                OwnedFd::from(conn),
                true,
            ))
        }

        fn resumed(&self) -> Result<(), crate::status::StatusError> {
            self.resumes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    /// What a recovery run gives: the load's result, the recovery's record, and the
    /// bytes left on the new return path.
    type RecoveryRun = (Result<LoadOutcome, LoadError>, Arc<FakeRecovery>, Vec<u8>);

    /// A postcopy destination whose connection is cut while a reader waits for page
    /// 2; `recovery` talks to it over the new connection (the first), then the test
    /// checks the load's result and the return path of the second connection.
    fn recovery_run(
        recovery: impl FnOnce(&mut std::os::unix::net::UnixStream, &mut FdSource),
    ) -> Option<RecoveryRun> {
        use std::io::Write;
        use std::os::unix::net::UnixStream;
        if let Err(e) = crate::uffd::available() {
            eprintln!("SKIP postcopy test: userfaultfd is not usable here: {e}");
            return None;
        }
        let ps = crate::memory::host_page_size();
        let pages = 16u64;
        let vmm = FakeVmm::new(pages as usize, RunState::InMigrate);
        let (dst, mut source) = UnixStream::pair().unwrap();
        let (dst2, mut source2) = UnixStream::pair().unwrap();
        source2
            .set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let fake = Arc::new(FakeRecovery {
            conns: Mutex::new(vec![dst2]),
            pauses: Mutex::new(Vec::new()),
            resumes: std::sync::atomic::AtomicUsize::new(0),
        });
        let caps = postcopy_caps(false);
        let on_listen = |_: &Arc<PostcopyIncoming>| -> Result<(), String> { Ok(()) };
        let on_run = |_: Option<&str>| {};
        let hooks = PostcopyHooks {
            on_listen: &on_listen,
            on_run: &on_run,
            recovery: Some(fake.as_ref()),
        };
        let block = vmm.ram_blocks()[0].clone();
        std::thread::scope(|scope| {
            let loader = scope.spawn(|| {
                let mut src = FdSource::new(OwnedFd::from(dst.try_clone().unwrap()), 0);
                let rp = ReturnPathWriter::new(Box::new(dst.try_clone().unwrap()));
                load_stream_postcopy(
                    &mut src,
                    vmm.as_ref(),
                    &caps,
                    Some(rp),
                    None,
                    MappedRamLoad::default(),
                    Some(&hooks),
                )
            });
            source
                .write_all(&postcopy_source::precopy_and_package(pages))
                .unwrap();
            let mut rp_in = FdSource::new(OwnedFd::from(source.try_clone().unwrap()), 0);
            assert_eq!(RpMessage::decode(&mut rp_in).unwrap(), RpMessage::Pong(3));
            let reader = {
                let b = block.clone();
                scope.spawn(move || {
                    let mut page = vec![0u8; ps as usize];
                    b.read(2 * ps, &mut page);
                    page
                })
            };
            assert!(matches!(
                RpMessage::decode(&mut rp_in).unwrap(),
                RpMessage::ReqPagesId { start, .. } if start == 2 * ps
            ));
            // The network fails: a record cut short, then nothing.
            source.write_all(&[2, 0, 0]).unwrap();
            source.shutdown(std::net::Shutdown::Both).unwrap();
            let mut rp2 = FdSource::new(OwnedFd::from(source2.try_clone().unwrap()), 0);
            recovery(&mut source2, &mut rp2);
            let result = loader.join().unwrap();
            if result.is_ok() {
                assert_eq!(reader.join().unwrap(), postcopy_source::page_bytes(2, ps));
            } else {
                // Released: RAM was unregistered.
                let _ = reader.join();
            }
            let mut rest = Vec::new();
            let _ = std::io::Read::read_to_end(&mut source2, &mut rest);
            Some((result, fake.clone(), rest))
        })
    }

    fn send_command(to: &mut std::os::unix::net::UnixStream, cmd: Command) {
        use std::io::Write;
        let mut b = Vec::new();
        cmd.encode(&mut b);
        to.write_all(&b).unwrap();
    }

    #[test]
    fn a_cut_pauses_and_a_recovery_answers_the_bitmap_and_asks_again() {
        use std::io::Write;
        let ps = crate::memory::host_page_size();
        let Some((result, fake, rest)) = recovery_run(|conn, rp| {
            send_command(conn, Command::RecvBitmap("ram".into()));
            assert_eq!(
                RpMessage::decode(rp).unwrap(),
                RpMessage::RecvBitmap {
                    block: "ram".into()
                }
            );
            let bitmap = vmigrate_stream::recover::RecvBitmap::decode_body(rp, "ram", 16).unwrap();
            // Precopy delivered 0..2 and 4..8 (zero); 2, 3 and 8.. were discarded.
            let held: Vec<u64> = (0..16).filter(|&p| bitmap.received(p)).collect();
            assert_eq!(held, [0, 1, 4, 5, 6, 7]);
            send_command(conn, Command::PostcopyResume);
            assert_eq!(RpMessage::decode(rp).unwrap(), RpMessage::ResumeAck(1));
            // The page still pending is asked for again, naming its block.
            assert_eq!(
                RpMessage::decode(rp).unwrap(),
                RpMessage::ReqPagesId {
                    start: 2 * ps,
                    len: ps as u32,
                    block: "ram".into()
                }
            );
            let mut b = postcopy_source::pages_section(false, &[2]);
            let rest: Vec<u64> = std::iter::once(3).chain(8..16).collect();
            b.extend(postcopy_source::pages_section(true, &rest));
            Record::Eof.encode(&mut b);
            conn.write_all(&b).unwrap();
        }) else {
            return;
        };
        result.unwrap();
        assert_eq!(fake.pauses.lock().unwrap().len(), 1);
        assert_eq!(fake.resumes.load(std::sync::atomic::Ordering::SeqCst), 1);
        // SHUT(0) on the new return path.
        assert_eq!(rest, [0, 1, 0, 4, 0, 0, 0, 0]);
    }

    #[test]
    fn a_recv_bitmap_for_an_unknown_block_fails_the_recovery() {
        let Some((result, fake, rest)) = recovery_run(|conn, _| {
            send_command(conn, Command::RecvBitmap("nope".into()));
        }) else {
            return;
        };
        let text = result.unwrap_err().to_string();
        assert!(text.contains("RAM block 'nope' not found"), "{text}");
        assert_eq!(fake.resumes.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(rest, [0, 1, 0, 4, 0, 0, 0, 1]);
    }

    #[test]
    fn a_second_resume_is_refused() {
        let Some((result, _, _)) = recovery_run(|conn, rp| {
            send_command(conn, Command::PostcopyResume);
            assert_eq!(RpMessage::decode(rp).unwrap(), RpMessage::ResumeAck(1));
            send_command(conn, Command::PostcopyResume);
        }) else {
            return;
        };
        let text = result.unwrap_err().to_string();
        assert!(
            text.contains("illegal POSTCOPY_RESUME received: postcopy is not being recovered"),
            "{text}"
        );
    }

    /// The source vanishes while a reader waits for a page: the load fails, RAM is
    /// unregistered, and the reader is released instead of waiting forever.
    #[test]
    fn a_reader_waiting_when_the_stream_dies_is_released() {
        use std::io::Write;
        use std::os::unix::net::UnixStream;
        if let Err(e) = crate::uffd::available() {
            eprintln!("SKIP postcopy test: userfaultfd is not usable here: {e}");
            return;
        }
        let ps = crate::memory::host_page_size();
        let vmm = FakeVmm::new(16, RunState::InMigrate);
        let (dst, mut source) = UnixStream::pair().unwrap();
        let caps = postcopy_caps(false);
        let on_listen = |_: &Arc<PostcopyIncoming>| -> Result<(), String> { Ok(()) };
        let on_run = |_: Option<&str>| {};
        let hooks = PostcopyHooks {
            on_listen: &on_listen,
            on_run: &on_run,
            recovery: None,
        };
        let block = vmm.ram_blocks()[0].clone();
        std::thread::scope(|scope| {
            let loader = scope.spawn(|| {
                let mut src = FdSource::new(OwnedFd::from(dst.try_clone().unwrap()), 0);
                let rp = ReturnPathWriter::new(Box::new(dst.try_clone().unwrap()));
                load_stream_postcopy(
                    &mut src,
                    vmm.as_ref(),
                    &caps,
                    Some(rp),
                    None,
                    MappedRamLoad::default(),
                    Some(&hooks),
                )
            });
            source
                .write_all(&postcopy_source::precopy_and_package(16))
                .unwrap();
            let mut rp_in = FdSource::new(OwnedFd::from(source.try_clone().unwrap()), 0);
            assert_eq!(RpMessage::decode(&mut rp_in).unwrap(), RpMessage::Pong(3));
            let reader = {
                let b = block.clone();
                scope.spawn(move || {
                    let mut page = vec![7u8; ps as usize];
                    b.read(9 * ps, &mut page);
                    page
                })
            };
            assert!(matches!(
                RpMessage::decode(&mut rp_in).unwrap(),
                RpMessage::ReqPagesId { start, .. } if start == 9 * ps
            ));
            source.shutdown(std::net::Shutdown::Write).unwrap();
            let err = loader.join().unwrap().unwrap_err().to_string();
            assert!(err.contains("byte offset"), "{err}");
            // Released: the page reads as the empty memory it now is.
            assert_eq!(reader.join().unwrap(), vec![0u8; ps as usize]);
            assert_eq!(RpMessage::decode(&mut rp_in).unwrap(), RpMessage::Shut(1));
        });
    }

    /// A postcopy destination with a preempt channel (a second socket pair): runs the
    /// synthetic stream, with `drive` playing the source once the package is in (given
    /// the main socket, the preempt socket, the return path and the block); returns the
    /// load's result and the last return-path message.
    fn run_preempt(
        drive: impl FnOnce(
                &mut std::os::unix::net::UnixStream,
                &mut std::os::unix::net::UnixStream,
                &mut FdSource,
                &Arc<crate::memory::RamBlock>,
            ) + Send,
    ) -> Option<(Result<LoadOutcome, LoadError>, RpMessage, Arc<FakeVmm>)> {
        use std::io::Write;
        use std::os::unix::net::UnixStream;
        if let Err(e) = crate::uffd::available() {
            eprintln!("SKIP postcopy test: userfaultfd is not usable here: {e}");
            return None;
        }
        let vmm = FakeVmm::new(16, RunState::InMigrate);
        let (dst, mut source) = UnixStream::pair().unwrap();
        let (preempt_dst, mut preempt_src) = UnixStream::pair().unwrap();
        source
            .set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let caps = postcopy_caps(false);
        let (tx, rx) = std::sync::mpsc::channel();
        let rx = Mutex::new(Some(rx));
        let on_listen = |pc: &Arc<PostcopyIncoming>| -> Result<(), String> {
            let rx = rx.lock().unwrap().take().unwrap();
            pc.start_preempt(rx).map_err(|e| e.to_string())
        };
        let on_run = |_: Option<&str>| {};
        let hooks = PostcopyHooks {
            on_listen: &on_listen,
            on_run: &on_run,
            recovery: None,
        };
        let block = vmm.ram_blocks()[0].clone();
        std::thread::scope(|scope| {
            let loader = scope.spawn(|| {
                let mut src = FdSource::new(OwnedFd::from(dst.try_clone().unwrap()), 0);
                let rp = ReturnPathWriter::new(Box::new(dst.try_clone().unwrap()));
                load_stream_postcopy(
                    &mut src,
                    vmm.as_ref(),
                    &caps,
                    Some(rp),
                    None,
                    MappedRamLoad::default(),
                    Some(&hooks),
                )
            });
            source
                .write_all(&postcopy_source::precopy_and_package(16))
                .unwrap();
            // The source connects the preempt channel once it heard a PONG.
            let mut rp_in = FdSource::new(OwnedFd::from(source.try_clone().unwrap()), 0);
            assert_eq!(RpMessage::decode(&mut rp_in).unwrap(), RpMessage::Pong(3));
            tx.send(crate::channels::transport::Channel::plain(
                OwnedFd::from(preempt_dst),
                true,
            ))
            .unwrap();
            drive(&mut source, &mut preempt_src, &mut rp_in, &block);
            let last = RpMessage::decode(&mut rp_in).unwrap();
            Some((loader.join().unwrap(), last, vmm.clone()))
        })
    }

    /// Reads page `page` of `block` on a thread (it faults until the page is placed).
    fn read_page_later<'s>(
        scope: &'s std::thread::Scope<'s, '_>,
        block: &Arc<crate::memory::RamBlock>,
        page: u64,
    ) -> std::thread::ScopedJoinHandle<'s, Vec<u8>> {
        let b = block.clone();
        scope.spawn(move || {
            let ps = crate::memory::host_page_size();
            let mut buf = vec![0u8; ps as usize];
            b.read(page * ps, &mut buf);
            buf
        })
    }

    #[test]
    fn requested_pages_arrive_on_the_preempt_channel() {
        use std::io::Write;
        use vmigrate_stream::preempt;
        let ps = crate::memory::host_page_size();
        let Some((result, last, vmm)) = run_preempt(|main, pre, rp_in, block| {
            std::thread::scope(|scope| {
                // Page 2 was discarded: asked for, and sent on the preempt channel.
                let reader = read_page_later(scope, block, 2);
                assert_eq!(
                    RpMessage::decode(rp_in).unwrap(),
                    RpMessage::ReqPagesId {
                        start: 2 * ps,
                        len: ps as u32,
                        block: "ram".into()
                    }
                );
                let mut b = Vec::new();
                preempt::put_page(
                    &mut b,
                    2 * ps,
                    Some("ram"),
                    &postcopy_source::page_bytes(2, ps),
                );
                // Page 3, not asked for, also comes there first (CONTINUE).
                preempt::put_page(&mut b, 3 * ps, None, &postcopy_source::page_bytes(3, ps));
                pre.write_all(&b).unwrap();
                assert_eq!(reader.join().unwrap(), postcopy_source::page_bytes(2, ps));
                // Page 9 is asked for; the main stream ends before it arrives on the
                // preempt channel: the destination waits for it.
                let reader = read_page_later(scope, block, 9);
                assert_eq!(
                    RpMessage::decode(rp_in).unwrap(),
                    RpMessage::ReqPages {
                        start: 9 * ps,
                        len: ps as u32
                    }
                );
                let rest: Vec<u64> = (8..16).filter(|&p| p != 9).collect();
                main.write_all(&postcopy_source::pages_section(true, &rest))
                    .unwrap();
                let mut tail = Vec::new();
                Record::Eof.encode(&mut tail);
                main.write_all(&tail).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(200));
                let mut b = Vec::new();
                preempt::put_page(&mut b, 9 * ps, None, &postcopy_source::page_bytes(9, ps));
                pre.write_all(&b).unwrap();
                assert_eq!(reader.join().unwrap(), postcopy_source::page_bytes(9, ps));
            });
        }) else {
            return;
        };
        let outcome = result.unwrap();
        assert_eq!(last, RpMessage::Shut(0));
        let pc = outcome.postcopy.expect("a postcopy outcome");
        assert_eq!(pc.requests, 2);
        assert_eq!(pc.fault_latency.count, 2);
        let ram = vmm.ram();
        for p in 0..16u64 {
            let want = if (4..8).contains(&p) {
                vec![0; ps as usize]
            } else {
                postcopy_source::page_bytes(p, ps)
            };
            let at = (p * ps) as usize;
            assert_eq!(&ram[at..at + ps as usize], &want[..], "page {p}");
        }
    }

    /// A bad record on the preempt channel fails the migration with what was wrong.
    fn bad_preempt_record_fails(record: Vec<u8>, text: &str) {
        use std::io::Write;
        let Some((result, last, _)) = run_preempt(|main, pre, rp_in, block| {
            std::thread::scope(|scope| {
                // A page is asked for: the end of the main stream waits for it, and
                // so sees the preempt channel's failure whenever it comes.
                let reader = read_page_later(scope, block, 2);
                assert!(matches!(
                    RpMessage::decode(rp_in).unwrap(),
                    RpMessage::ReqPagesId { .. }
                ));
                pre.write_all(&record).unwrap();
                let mut tail = Vec::new();
                Record::Eof.encode(&mut tail);
                let _ = main.write_all(&tail);
                // Released when postcopy fails.
                reader.join().unwrap();
            });
        }) else {
            return;
        };
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains("preempt channel") && err.contains(text),
            "{err}"
        );
        assert_eq!(last, RpMessage::Shut(1));
    }

    #[test]
    fn a_preempt_page_of_an_unknown_block_fails() {
        let ps = crate::memory::host_page_size();
        let mut b = Vec::new();
        vmigrate_stream::preempt::put_page(&mut b, 0, Some("nope"), &vec![1; ps as usize]);
        bad_preempt_record_fails(b, "Can't find block nope");
    }

    #[test]
    fn a_preempt_page_out_of_range_fails() {
        let ps = crate::memory::host_page_size();
        let mut b = Vec::new();
        vmigrate_stream::preempt::put_zero(&mut b, 16 * ps, Some("ram"));
        bad_preempt_record_fails(b, "Illegal RAM offset");
    }

    #[test]
    fn other_records_on_the_preempt_channel_fail() {
        let ps = crate::memory::host_page_size();
        let mut b = Vec::new();
        vmigrate_stream::ram::put_page_header(
            &mut b,
            ps,
            vmigrate_stream::ram::FLAG_XBZRLE,
            Some("ram"),
        );
        bad_preempt_record_fails(b, "only PAGE and ZERO records may occur");
        let mut b = Vec::new();
        vmigrate_stream::ram::put_page_header(&mut b, ps, 0x100, Some("ram"));
        bad_preempt_record_fails(b, "Unknown combination of migration flags: 0x100");
    }

    /// Discards and packages that lie are refused with what was wrong.
    #[test]
    fn hostile_postcopy_commands_are_refused() {
        let ps = crate::memory::host_page_size();
        let advise = Command::PostcopyAdvise(
            PostcopyAdvise {
                ram_pagesize_summary: ps,
                target_page_size: ps,
            }
            .encode(),
        );
        let discard = |block: &str, ranges: Vec<(u64, u64)>| {
            Command::PostcopyRamDiscard(
                RamDiscard {
                    block: block.into(),
                    ranges,
                }
                .encode(),
            )
        };
        let load = |cmds: &[Command], tail: &[u8]| {
            let mut bytes = Vec::new();
            header::encode_header(&mut bytes);
            Configuration {
                machine: "none".into(),
                target_page_bits: None,
                capabilities: vec![],
                uuid: None,
            }
            .encode(&mut bytes);
            for c in cmds {
                c.encode(&mut bytes);
            }
            bytes.extend_from_slice(tail);
            Record::Eof.encode(&mut bytes);
            let path = temp_path("pc-cmds");
            std::fs::write(&path, &bytes).unwrap();
            let fd = OwnedFd::from(std::fs::File::open(&path).unwrap());
            let _ = std::fs::remove_file(&path);
            let mut src = FdSource::new(fd, 0);
            let vmm = FakeVmm::new(4, RunState::InMigrate);
            load_stream(&mut src, vmm.as_ref(), &postcopy_caps(false), None, None)
                .unwrap_err()
                .to_string()
        };
        let cases: Vec<(Vec<Command>, Vec<u8>, String)> = vec![
            (
                vec![advise.clone(), discard("nosuch", vec![(0, ps)])],
                vec![],
                "Failed to find block 'nosuch'".into(),
            ),
            (
                vec![advise.clone(), discard("ram", vec![(3 * ps, 2 * ps)])],
                vec![],
                "Overrun block 'ram'".into(),
            ),
            (
                vec![advise.clone(), discard("ram", vec![(u64::MAX - 1, 4)])],
                vec![],
                "Overrun block 'ram'".into(),
            ),
            (
                vec![advise.clone(), discard("ram", vec![(1, ps)])],
                vec![],
                "unaligned range".into(),
            ),
            (
                vec![Command::PostcopyAdvise(
                    PostcopyAdvise {
                        ram_pagesize_summary: ps * 2,
                        target_page_size: ps,
                    }
                    .encode(),
                )],
                vec![],
                format!(
                    "Postcopy needs matching RAM page sizes (s={:x} d={ps:x})",
                    ps * 2
                ),
            ),
            // A package whose RUN comes before LISTEN, in the package's own stream.
            (
                vec![advise.clone(), Command::Packaged(5)],
                {
                    let mut b = Vec::new();
                    Command::PostcopyRun.encode(&mut b);
                    b
                },
                "CMD_POSTCOPY_RUN in wrong postcopy state (1)".into(),
            ),
            // A package holding a RAM section.
            (
                vec![advise.clone(), Command::Packaged(5)],
                {
                    let mut b = Vec::new();
                    Record::Part(2).encode(&mut b);
                    b
                },
                "RAM sections do not occur inside a package".into(),
            ),
            // PACKAGED with a length longer than the stream.
            (
                vec![advise, Command::Packaged(1000)],
                vec![],
                "packaged stream".into(),
            ),
        ];
        for (cmds, tail, want) in cases {
            let got = load(&cmds, &tail);
            assert!(got.contains(&want), "{cmds:?}: {got}");
            assert!(got.contains("byte offset"), "{got}");
        }
    }

    #[test]
    fn phases_number_as_qemu_prints_them() {
        use IncomingPhase::*;
        let all = [Precopy, Advised, Discarding, Listening, Running];
        for (i, p) in all.into_iter().enumerate() {
            assert_eq!(usize::from(p.number()), i);
        }
        assert_eq!(
            IncomingPhase::allowed_for(&Command::PostcopyRun),
            Some(&[Listening][..])
        );
        assert_eq!(IncomingPhase::allowed_for(&Command::Ping(1)), None);
    }
}
