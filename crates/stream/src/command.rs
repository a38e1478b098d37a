//! `QEMU_VM_COMMAND` records (`0x08`, be16 command, be16 length, payload).

use crate::error::{DecodeError, DecodeErrorKind};
use crate::section::COMMAND;
use crate::source::Source;

pub const CMD_OPEN_RETURN_PATH: u16 = 1;
pub const CMD_PING: u16 = 2;
pub const CMD_POSTCOPY_ADVISE: u16 = 3;
pub const CMD_POSTCOPY_LISTEN: u16 = 4;
pub const CMD_POSTCOPY_RUN: u16 = 5;
pub const CMD_POSTCOPY_RAM_DISCARD: u16 = 6;
pub const CMD_PACKAGED: u16 = 7;
pub const CMD_ENABLE_COLO: u16 = 8;
pub const CMD_POSTCOPY_RESUME: u16 = 9;
pub const CMD_RECV_BITMAP: u16 = 10;
pub const CMD_SWITCHOVER_START: u16 = 11;

/// A decoded command. Variable-length payloads are kept as bytes; they are small
/// (the length field is 16 bits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    OpenReturnPath,
    Ping(u32),
    PostcopyAdvise(Vec<u8>),
    PostcopyListen,
    PostcopyRun,
    PostcopyRamDiscard(Vec<u8>),
    /// Length of the nested stream that follows the command.
    Packaged(u32),
    EnableColo,
    PostcopyResume,
    RecvBitmap(String),
    SwitchoverStart,
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::OpenReturnPath => "OPEN_RETURN_PATH",
            Command::Ping(_) => "PING",
            Command::PostcopyAdvise(_) => "POSTCOPY_ADVISE",
            Command::PostcopyListen => "POSTCOPY_LISTEN",
            Command::PostcopyRun => "POSTCOPY_RUN",
            Command::PostcopyRamDiscard(_) => "POSTCOPY_RAM_DISCARD",
            Command::Packaged(_) => "PACKAGED",
            Command::EnableColo => "ENABLE_COLO",
            Command::PostcopyResume => "POSTCOPY_RESUME",
            Command::RecvBitmap(_) => "RECV_BITMAP",
            Command::SwitchoverStart => "SWITCHOVER_START",
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let (cmd, payload): (u16, Vec<u8>) = match self {
            Command::OpenReturnPath => (CMD_OPEN_RETURN_PATH, vec![]),
            Command::Ping(v) => (CMD_PING, v.to_be_bytes().to_vec()),
            Command::PostcopyAdvise(p) => (CMD_POSTCOPY_ADVISE, p.clone()),
            Command::PostcopyListen => (CMD_POSTCOPY_LISTEN, vec![]),
            Command::PostcopyRun => (CMD_POSTCOPY_RUN, vec![]),
            Command::PostcopyRamDiscard(p) => (CMD_POSTCOPY_RAM_DISCARD, p.clone()),
            Command::Packaged(l) => (CMD_PACKAGED, l.to_be_bytes().to_vec()),
            Command::EnableColo => (CMD_ENABLE_COLO, vec![]),
            Command::PostcopyResume => (CMD_POSTCOPY_RESUME, vec![]),
            Command::RecvBitmap(name) => {
                let mut p = vec![name.len() as u8];
                p.extend_from_slice(name.as_bytes());
                (CMD_RECV_BITMAP, p)
            }
            Command::SwitchoverStart => (CMD_SWITCHOVER_START, vec![]),
        };
        out.push(COMMAND);
        out.extend_from_slice(&cmd.to_be_bytes());
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        out.extend_from_slice(&payload);
    }
}

/// Decodes a command whose `0x08` tag (at `at`) was already consumed.
pub fn decode_after_tag(src: &mut impl Source, at: u64) -> Result<Command, DecodeError> {
    let cmd = src.be16("command id")?;
    let len = src.be16("command length")?;
    let fixed = |name: &'static str, expected: u16| {
        if len == expected {
            Ok(())
        } else {
            Err(DecodeError::new(
                at,
                DecodeErrorKind::BadCommandLength {
                    name,
                    expected,
                    got: len,
                },
            ))
        }
    };
    let mut payload = vec![0u8; len as usize];
    let read_payload = |src: &mut _, payload: &mut Vec<u8>| -> Result<(), DecodeError> {
        Source::fill(src, payload, "command payload")
    };
    Ok(match cmd {
        CMD_OPEN_RETURN_PATH => {
            fixed("OPEN_RETURN_PATH", 0)?;
            Command::OpenReturnPath
        }
        CMD_PING => {
            fixed("PING", 4)?;
            Command::Ping(src.be32("ping value")?)
        }
        CMD_POSTCOPY_ADVISE => {
            if len != 0 && len != 16 {
                fixed("POSTCOPY_ADVISE", 16)?;
            }
            read_payload(src, &mut payload)?;
            Command::PostcopyAdvise(payload)
        }
        CMD_POSTCOPY_LISTEN => {
            fixed("POSTCOPY_LISTEN", 0)?;
            Command::PostcopyListen
        }
        CMD_POSTCOPY_RUN => {
            fixed("POSTCOPY_RUN", 0)?;
            Command::PostcopyRun
        }
        CMD_POSTCOPY_RAM_DISCARD => {
            read_payload(src, &mut payload)?;
            Command::PostcopyRamDiscard(payload)
        }
        CMD_PACKAGED => {
            fixed("PACKAGED", 4)?;
            Command::Packaged(src.be32("package length")?)
        }
        CMD_ENABLE_COLO => {
            fixed("ENABLE_COLO", 0)?;
            Command::EnableColo
        }
        CMD_POSTCOPY_RESUME => {
            fixed("POSTCOPY_RESUME", 0)?;
            Command::PostcopyResume
        }
        CMD_RECV_BITMAP => {
            read_payload(src, &mut payload)?;
            if payload.is_empty() || payload[0] as usize + 1 != payload.len() {
                return Err(DecodeError::new(
                    at,
                    DecodeErrorKind::Invalid {
                        what: "RECV_BITMAP",
                        detail: format!("length {len} does not match its block name"),
                    },
                ));
            }
            Command::RecvBitmap(String::from_utf8_lossy(&payload[1..]).into_owned())
        }
        CMD_SWITCHOVER_START => {
            fixed("SWITCHOVER_START", 0)?;
            Command::SwitchoverStart
        }
        _ => {
            return Err(DecodeError::new(
                at,
                DecodeErrorKind::UnknownCommand { cmd, len },
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::section::Record;
    use crate::SliceSource;

    #[test]
    fn switchover_start_bytes() {
        let mut v = Vec::new();
        Command::SwitchoverStart.encode(&mut v);
        assert_eq!(v, [0x08, 0x00, 0x0b, 0x00, 0x00]);
    }

    #[test]
    fn ping_round_trip_and_bad_length() {
        let mut v = Vec::new();
        Command::Ping(7).encode(&mut v);
        assert_eq!(
            Record::decode(&mut SliceSource::new(&v)).unwrap(),
            Record::Command(Command::Ping(7))
        );
        let bad = [0x08, 0, 2, 0, 3, 0, 0, 0];
        let e = Record::decode(&mut SliceSource::new(&bad)).unwrap_err();
        assert_eq!(
            e.kind.to_string(),
            "PING received with bad length - expecting 4, got 3"
        );
    }

    #[test]
    fn unknown_command() {
        let e = Record::decode(&mut SliceSource::new(&[8, 0, 0xc, 0, 0])).unwrap_err();
        assert_eq!(e.kind.to_string(), "MIG_CMD 0xc unknown (len 0x0)");
    }
}
