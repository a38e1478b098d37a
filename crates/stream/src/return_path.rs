//! Return-path messages (destination → source, the reverse direction of the main
//! socket): `be16 type`, `be16 len`, payload.

use crate::error::{DecodeError, DecodeErrorKind};
use crate::source::Source;

pub const RP_SHUT: u16 = 1;
pub const RP_PONG: u16 = 2;
pub const RP_REQ_PAGES_ID: u16 = 3;
pub const RP_REQ_PAGES: u16 = 4;
pub const RP_RECV_BITMAP: u16 = 5;
pub const RP_RESUME_ACK: u16 = 6;
pub const RP_SWITCHOVER_ACK: u16 = 7;
/// The source rejects longer messages.
pub const RP_MAX_LEN: u16 = 512;

/// A return-path message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpMessage {
    /// The destination is done: 0 = loaded fine, anything else = failed.
    Shut(u32),
    Pong(u32),
    SwitchoverAck,
    /// Postcopy and recovery messages, kept raw.
    Other {
        kind: u16,
        payload: Vec<u8>,
    },
}

impl RpMessage {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (kind, payload): (u16, Vec<u8>) = match self {
            RpMessage::Shut(v) => (RP_SHUT, v.to_be_bytes().to_vec()),
            RpMessage::Pong(v) => (RP_PONG, v.to_be_bytes().to_vec()),
            RpMessage::SwitchoverAck => (RP_SWITCHOVER_ACK, vec![]),
            RpMessage::Other { kind, payload } => (*kind, payload.clone()),
        };
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        out.extend_from_slice(&payload);
    }

    pub fn decode(src: &mut impl Source) -> Result<Self, DecodeError> {
        let at = src.offset();
        let kind = src.be16("return-path message type")?;
        let len = src.be16("return-path message length")?;
        let bad = |detail: String| {
            Err(DecodeError::new(
                at,
                DecodeErrorKind::Invalid {
                    what: "return-path message",
                    detail,
                },
            ))
        };
        if kind == 0 || kind > RP_SWITCHOVER_ACK {
            return bad(format!("unknown type {kind}"));
        }
        if len > RP_MAX_LEN {
            return bad(format!("length {len} exceeds {RP_MAX_LEN}"));
        }
        let fixed = match kind {
            RP_SHUT | RP_PONG | RP_RESUME_ACK => Some(4),
            RP_REQ_PAGES => Some(12),
            RP_SWITCHOVER_ACK => Some(0),
            _ => None,
        };
        if let Some(f) = fixed {
            if len != f {
                return bad(format!("type {kind} with length {len}, expected {f}"));
            }
        }
        let mut payload = vec![0u8; len as usize];
        src.fill(&mut payload, "return-path payload")?;
        let word = || u32::from_be_bytes(payload[..4].try_into().expect("4-byte payload"));
        Ok(match kind {
            RP_SHUT => RpMessage::Shut(word()),
            RP_PONG => RpMessage::Pong(word()),
            RP_SWITCHOVER_ACK => RpMessage::SwitchoverAck,
            _ => RpMessage::Other { kind, payload },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SliceSource;

    #[test]
    fn captured_precopy_return_path() {
        // SWITCHOVER_ACK, PONG 1, SHUT 0, as QEMU 10.0.2 sends them.
        let bytes = [0, 7, 0, 0, 0, 2, 0, 4, 0, 0, 0, 1, 0, 1, 0, 4, 0, 0, 0, 0];
        let mut src = SliceSource::new(&bytes);
        let msgs: Vec<_> = (0..3)
            .map(|_| RpMessage::decode(&mut src).unwrap())
            .collect();
        assert_eq!(
            msgs,
            [
                RpMessage::SwitchoverAck,
                RpMessage::Pong(1),
                RpMessage::Shut(0)
            ]
        );
        let mut out = Vec::new();
        for m in &msgs {
            m.encode(&mut out);
        }
        assert_eq!(out, bytes);
    }

    #[test]
    fn rejects_bad_messages() {
        assert!(RpMessage::decode(&mut SliceSource::new(&[0, 9, 0, 0])).is_err());
        assert!(RpMessage::decode(&mut SliceSource::new(&[0, 2, 0, 3, 0, 0, 0])).is_err());
        assert!(RpMessage::decode(&mut SliceSource::new(&[0, 3, 2, 1])).is_err());
    }
}
