//! The incoming migration: reads a stream into the destination VM.
//!
//! ```text
//! header ─▶ configuration (checked) ─▶ { START/PART/END ram │ FULL device │ COMMAND }* ─▶ EOF ─▶ vmdesc
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use vmigrate_stream::command::Command;
use vmigrate_stream::config::{format_uuid, Configuration, VALIDATED_CAPABILITIES};
use vmigrate_stream::devices::{GlobalState, GLOBALSTATE_IDSTR, GLOBALSTATE_VERSION};
use vmigrate_stream::ram::{RAM_IDSTR, RAM_SECTION_VERSION};
use vmigrate_stream::section::{decode_footer, Record, SectionId};
use vmigrate_stream::{header, vmdesc, DecodeError, DecodeErrorKind, Source};

use crate::channels::return_path::ReturnPathWriter;
use crate::incoming::multifd_recv::{channel_error, MultifdReceiver, ReceiveConfig};
use crate::incoming::ram_load::{MappedRamLoad, RamLoader};
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
}

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
    let mut rp = ReturnPathState {
        writer: return_path,
        open: false,
    };
    let mut ram = RamLoader::new(vmm.ram_blocks().to_vec());
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
    let mut result = load_records(src, vmm, caps, &mut rp, &mut ram);
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
    if rp.open {
        let code = u32::from(result.is_err());
        let _ = rp.send(&RpMessage::Shut(code), 0);
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

/// The commands of the main stream, one handler each, and what they change: the
/// return path and the destination's phase.
struct Commands<'a> {
    rp: &'a mut ReturnPathState,
    switchover_ack: bool,
    phase: IncomingPhase,
}

impl Commands<'_> {
    fn handle(&mut self, cmd: Command, at: u64) -> Result<(), LoadError> {
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
            Command::OpenReturnPath => self.open_return_path(at),
            Command::Ping(v) => self.ping(v, at),
            Command::SwitchoverStart => self.switchover_start(),
            other => Err(unsupported(&other, at)),
        }
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
}

fn unsupported(cmd: &Command, at: u64) -> LoadError {
    DecodeError::new(at, DecodeErrorKind::UnsupportedCommand(cmd.name())).into()
}

/// The destination's end of the return path.
struct ReturnPathState {
    writer: Option<ReturnPathWriter>,
    open: bool,
}

impl ReturnPathState {
    fn send(&mut self, msg: &RpMessage, at: u64) -> Result<(), DecodeError> {
        let w = self.writer.as_mut().filter(|_| self.open).ok_or_else(|| {
            DecodeError::new(
                at,
                DecodeErrorKind::Invalid {
                    what: "command",
                    detail: "the return path is not open".into(),
                },
            )
        })?;
        w.send(msg).map_err(|e| {
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
                        runstate = Some(GlobalState::decode(src)?.runstate);
                    }
                    Entry::Device(dev) => {
                        check_version(&s, dev.version(), dev.minimum_version(), at)?;
                        let body_at = src.offset();
                        let mut dyn_src: &mut dyn Source = src;
                        dev.load(&mut dyn_src, s.version_id).map_err(|source| {
                            LoadError::Device {
                                idstr: s.idstr.clone(),
                                offset: body_at,
                                source,
                            }
                        })?;
                    }
                }
                decode_footer(src, s.section_id, &s.idstr)?;
            }
            Record::Command(cmd) => commands.handle(cmd, at)?,
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
    })
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
            // In its phase, but postcopy is not built: refused as unsupported.
            (
                vec![Command::PostcopyAdvise(vec![0; 16])],
                "Command POSTCOPY_ADVISE is not supported in a precopy stream",
            ),
            (
                vec![Command::Packaged(0)],
                "Command PACKAGED is not supported",
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
