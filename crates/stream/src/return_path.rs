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
    /// A page the destination needs, in the block of the last [`RpMessage::ReqPagesId`].
    ReqPages {
        start: u64,
        len: u32,
    },
    /// A page the destination needs, naming its block.
    ReqPagesId {
        start: u64,
        len: u32,
        block: String,
    },
    /// Postcopy recovery: the received-pages bitmap of `block` follows outside the
    /// message ([`crate::recover::RecvBitmap::decode_body`]).
    RecvBitmap {
        block: String,
    },
    /// Postcopy recovery: the destination resumed (value 1).
    ResumeAck(u32),
    /// A message kept raw (only built by hand, for tests of hostile input).
    Other {
        kind: u16,
        payload: Vec<u8>,
    },
}

impl RpMessage {
    /// The message's type number on the wire.
    pub fn kind(&self) -> u16 {
        match self {
            RpMessage::Shut(_) => RP_SHUT,
            RpMessage::Pong(_) => RP_PONG,
            RpMessage::SwitchoverAck => RP_SWITCHOVER_ACK,
            RpMessage::ReqPages { .. } => RP_REQ_PAGES,
            RpMessage::ReqPagesId { .. } => RP_REQ_PAGES_ID,
            RpMessage::RecvBitmap { .. } => RP_RECV_BITMAP,
            RpMessage::ResumeAck(_) => RP_RESUME_ACK,
            RpMessage::Other { kind, .. } => *kind,
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let (kind, payload): (u16, Vec<u8>) = match self {
            RpMessage::Shut(v) => (RP_SHUT, v.to_be_bytes().to_vec()),
            RpMessage::Pong(v) => (RP_PONG, v.to_be_bytes().to_vec()),
            RpMessage::SwitchoverAck => (RP_SWITCHOVER_ACK, vec![]),
            RpMessage::ReqPages { start, len } => {
                let mut p = start.to_be_bytes().to_vec();
                p.extend_from_slice(&len.to_be_bytes());
                (RP_REQ_PAGES, p)
            }
            RpMessage::ReqPagesId { start, len, block } => {
                let mut p = start.to_be_bytes().to_vec();
                p.extend_from_slice(&len.to_be_bytes());
                crate::put_counted(&mut p, block);
                (RP_REQ_PAGES_ID, p)
            }
            RpMessage::RecvBitmap { block } => {
                let mut p = Vec::with_capacity(block.len() + 1);
                crate::put_counted(&mut p, block);
                (RP_RECV_BITMAP, p)
            }
            RpMessage::ResumeAck(v) => (RP_RESUME_ACK, v.to_be_bytes().to_vec()),
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
        Self::decode_after_header(src, at, kind, len)
    }

    /// [`Self::decode`] on a COLO primary's return path, where the secondary's first
    /// COLO message follows the return-path messages on the same socket with no
    /// `SHUT` before it (QEMU's secondary sends `SHUT` only once COLO is over).
    /// That message, `CHECKPOINT_READY`, is a be32 0: read as a return-path header it
    /// is type 0 (which no message has) with length 0. `None` when those four bytes
    /// came; they are consumed.
    pub fn decode_before_colo(src: &mut impl Source) -> Result<Option<Self>, DecodeError> {
        let at = src.offset();
        let kind = src.be16("return-path message type")?;
        let len = src.be16("return-path message length")?;
        if kind == 0 && len == 0 {
            return Ok(None);
        }
        Self::decode_after_header(src, at, kind, len).map(Some)
    }

    fn decode_after_header(
        src: &mut impl Source,
        at: u64,
        kind: u16,
        len: u16,
    ) -> Result<Self, DecodeError> {
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
            RP_RESUME_ACK => RpMessage::ResumeAck(word()),
            RP_RECV_BITMAP => {
                let n = payload.first().copied().map(usize::from);
                match n {
                    Some(n) if n > 0 && n + 1 == payload.len() => {
                        match std::str::from_utf8(&payload[1..]) {
                            Ok(s) => RpMessage::RecvBitmap {
                                block: s.to_string(),
                            },
                            Err(_) => return bad("block name is not UTF-8".into()),
                        }
                    }
                    _ => return bad(format!("RECV_BITMAP with a bad block name ({len} bytes)")),
                }
            }
            RP_REQ_PAGES | RP_REQ_PAGES_ID => {
                if payload.len() < 12 {
                    return bad(format!("page request of {len} bytes"));
                }
                let start = u64::from_be_bytes(payload[..8].try_into().expect("8 bytes"));
                let plen = u32::from_be_bytes(payload[8..12].try_into().expect("4 bytes"));
                if kind == RP_REQ_PAGES {
                    RpMessage::ReqPages { start, len: plen }
                } else {
                    let n = payload.get(12).copied().map(usize::from);
                    let name = n.and_then(|n| payload.get(13..13 + n));
                    let block = match (name, n) {
                        (Some(b), Some(n)) if 13 + n == payload.len() && n > 0 => {
                            match std::str::from_utf8(b) {
                                Ok(s) => s.to_string(),
                                Err(_) => return bad("block name is not UTF-8".into()),
                            }
                        }
                        _ => {
                            return bad(format!("page request with a bad block name ({len} bytes)"))
                        }
                    };
                    RpMessage::ReqPagesId {
                        start,
                        len: plen,
                        block,
                    }
                }
            }
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
    fn colo_checkpoint_ready_ends_the_return_path_messages() {
        // SWITCHOVER_ACK, PONG 1, then COLO's CHECKPOINT_READY (be32 0); nothing of the
        // COLO message is left unread, nothing after it is read.
        let bytes = [0, 7, 0, 0, 0, 2, 0, 4, 0, 0, 0, 1, 0, 0, 0, 0, 0xAA];
        let mut src = SliceSource::new(&bytes);
        let mut got = Vec::new();
        while let Some(m) = RpMessage::decode_before_colo(&mut src).unwrap() {
            got.push(m);
        }
        assert_eq!(got, [RpMessage::SwitchoverAck, RpMessage::Pong(1)]);
        assert_eq!(src.offset(), 16);
        // Type 0 with a length is no COLO message, and plain decode refuses type 0.
        let mut src = SliceSource::new(&[0, 0, 0, 4, 0, 0, 0, 0]);
        assert!(RpMessage::decode_before_colo(&mut src).is_err());
        let mut src = SliceSource::new(&[0, 0, 0, 0]);
        assert!(RpMessage::decode(&mut src).is_err());
    }

    #[test]
    fn captured_page_requests() {
        // cap_pcp's return path: REQ_PAGES_ID 0x1c0000 of `m0`, then REQ_PAGES 0x1c1000.
        let bytes = [
            0, 3, 0, 15, 0, 0, 0, 0, 0, 0x1c, 0, 0, 0, 0, 0x10, 0, 2, b'm', b'0', 0, 4, 0, 12, 0,
            0, 0, 0, 0, 0x1c, 0x10, 0, 0, 0, 0x10, 0,
        ];
        let mut src = SliceSource::new(&bytes);
        let a = RpMessage::decode(&mut src).unwrap();
        let b = RpMessage::decode(&mut src).unwrap();
        assert_eq!(
            a,
            RpMessage::ReqPagesId {
                start: 0x1c0000,
                len: 4096,
                block: "m0".into()
            }
        );
        assert_eq!(
            b,
            RpMessage::ReqPages {
                start: 0x1c1000,
                len: 4096
            }
        );
        let mut out = Vec::new();
        a.encode(&mut out);
        b.encode(&mut out);
        assert_eq!(out, bytes);
        // A name that runs past the message, or none at all.
        let lying = [0, 3, 0, 13, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 5];
        assert!(RpMessage::decode(&mut SliceSource::new(&lying)).is_err());
        let short = [0, 3, 0, 4, 0, 0, 0, 0];
        assert!(RpMessage::decode(&mut SliceSource::new(&short)).is_err());
    }

    #[test]
    fn rejects_bad_messages() {
        assert!(RpMessage::decode(&mut SliceSource::new(&[0, 9, 0, 0])).is_err());
        assert!(RpMessage::decode(&mut SliceSource::new(&[0, 2, 0, 3, 0, 0, 0])).is_err());
        assert!(RpMessage::decode(&mut SliceSource::new(&[0, 3, 2, 1])).is_err());
    }
}
