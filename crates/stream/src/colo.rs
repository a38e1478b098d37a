//! COLO's checkpoint messages (QEMU's `COLOMessage`), exchanged once the first
//! migration has completed: the primary's on the main channel, the secondary's on the
//! way back over the same connection.
//!
//! ```text
//! message:        be32 n                 (the COLOMessage value, below)
//! VMSTATE_SIZE:   be32 4, be64 size      (then `size` bytes of device state)
//!
//! secondary ─▶ CHECKPOINT_READY                          (once, when it entered COLO)
//! primary   ─▶ CHECKPOINT_REQUEST
//! secondary ─▶ CHECKPOINT_REPLY
//! primary   ─▶ VMSTATE_SEND, ram END section, EOF, VMSTATE_SIZE size, device state
//! secondary ─▶ VMSTATE_RECEIVED, VMSTATE_LOADED
//! ```
//!
//! The device state is a run of FULL sections ended by EOF, without the stream header.

use std::fmt;

use crate::error::{DecodeError, DecodeErrorKind};
use crate::source::Source;

/// One of QEMU's COLO messages, with its wire value (the QAPI enum's order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColoMessage {
    /// The secondary has loaded the first migration and entered COLO.
    CheckpointReady = 0,
    /// The primary starts a checkpoint.
    CheckpointRequest = 1,
    /// The secondary is ready to take it.
    CheckpointReply = 2,
    /// The primary's RAM and device state follow.
    VmstateSend = 3,
    /// The size of the device state that follows (a be64 after the message).
    VmstateSize = 4,
    /// The secondary has the whole checkpoint.
    VmstateReceived = 5,
    /// The secondary has applied it.
    VmstateLoaded = 6,
}

impl ColoMessage {
    /// Every message, in wire order.
    pub const ALL: [ColoMessage; 7] = [
        Self::CheckpointReady,
        Self::CheckpointRequest,
        Self::CheckpointReply,
        Self::VmstateSend,
        Self::VmstateSize,
        Self::VmstateReceived,
        Self::VmstateLoaded,
    ];

    /// The QAPI name (`checkpoint-ready`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::CheckpointReady => "checkpoint-ready",
            Self::CheckpointRequest => "checkpoint-request",
            Self::CheckpointReply => "checkpoint-reply",
            Self::VmstateSend => "vmstate-send",
            Self::VmstateSize => "vmstate-size",
            Self::VmstateReceived => "vmstate-received",
            Self::VmstateLoaded => "vmstate-loaded",
        }
    }

    /// The wire value.
    pub fn value(self) -> u32 {
        self as u32
    }

    /// The message with wire value `value`, if there is one.
    pub fn from_value(value: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.value() == value)
    }

    /// Appends the message.
    pub fn encode(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.value().to_be_bytes());
    }

    /// Appends VMSTATE_SIZE with its value.
    pub fn encode_size(out: &mut Vec<u8>, size: u64) {
        Self::VmstateSize.encode(out);
        out.extend_from_slice(&size.to_be_bytes());
    }

    /// Reads one message; a value past the last message is refused (QEMU's
    /// `colo_receive_message`: "Invalid message").
    pub fn decode(src: &mut impl Source) -> Result<Self, DecodeError> {
        let at = src.offset();
        let value = src.be32("COLO message")?;
        Self::from_value(value).ok_or_else(|| {
            DecodeError::new(
                at,
                DecodeErrorKind::Invalid {
                    what: "COLO message",
                    detail: format!("{value} is not a COLO message"),
                },
            )
        })
    }

    /// Reads one message that must be `expected` (QEMU's text for another one:
    /// `Unexpected COLO message 5, expected 2`).
    pub fn expect(src: &mut impl Source, expected: Self) -> Result<(), DecodeError> {
        let at = src.offset();
        let got = Self::decode(src)?;
        if got != expected {
            return Err(DecodeError::new(
                at,
                DecodeErrorKind::Invalid {
                    what: "COLO message",
                    detail: format!(
                        "Unexpected COLO message {}, expected {}",
                        got.value(),
                        expected.value()
                    ),
                },
            ));
        }
        Ok(())
    }

    /// Reads VMSTATE_SIZE and its value, which must not exceed `max` (nothing from the
    /// wire sizes an allocation beyond it).
    pub fn decode_size(src: &mut impl Source, max: u64) -> Result<u64, DecodeError> {
        Self::expect(src, Self::VmstateSize)?;
        let at = src.offset();
        let size = src.be64("COLO device state size")?;
        if size > max {
            return Err(DecodeError::new(
                at,
                DecodeErrorKind::Invalid {
                    what: "COLO message",
                    detail: format!(
                        "device state of {size} bytes is larger than the {max}-byte limit"
                    ),
                },
            ));
        }
        Ok(size)
    }
}

impl fmt::Display for ColoMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SliceSource;

    #[test]
    fn every_message_round_trips_with_its_qapi_value() {
        for (i, m) in ColoMessage::ALL.into_iter().enumerate() {
            let mut out = Vec::new();
            m.encode(&mut out);
            assert_eq!(out, (i as u32).to_be_bytes());
            let mut src = SliceSource::new(&out);
            assert_eq!(ColoMessage::decode(&mut src).unwrap(), m);
        }
        assert_eq!(ColoMessage::VmstateLoaded.name(), "vmstate-loaded");
    }

    #[test]
    fn the_size_message_carries_a_be64() {
        let mut out = Vec::new();
        ColoMessage::encode_size(&mut out, 0x0102_0304_0506);
        assert_eq!(
            out,
            [0, 0, 0, 4, 0, 0, 1, 2, 3, 4, 5, 6],
            "be32 4 then be64 size"
        );
        let mut src = SliceSource::new(&out);
        assert_eq!(
            ColoMessage::decode_size(&mut src, 1 << 48).unwrap(),
            0x0102_0304_0506
        );
    }

    #[test]
    fn an_unknown_message_is_refused_with_its_offset() {
        let bytes = [0, 0, 0, 1, 0, 0, 0, 7];
        let mut src = SliceSource::new(&bytes);
        ColoMessage::decode(&mut src).unwrap();
        let e = ColoMessage::decode(&mut src).unwrap_err();
        assert_eq!(e.offset, 4);
        assert!(e.to_string().contains("7 is not a COLO message"), "{e}");
    }

    #[test]
    fn a_message_out_of_order_is_named_as_qemu_names_it() {
        let mut out = Vec::new();
        ColoMessage::VmstateReceived.encode(&mut out);
        let e = ColoMessage::expect(&mut SliceSource::new(&out), ColoMessage::CheckpointReply)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("Unexpected COLO message 5, expected 2"),
            "{e}"
        );
    }

    #[test]
    fn an_oversized_device_state_is_refused_before_any_allocation() {
        let mut out = Vec::new();
        ColoMessage::encode_size(&mut out, u64::MAX);
        let e = ColoMessage::decode_size(&mut SliceSource::new(&out), 1 << 24).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        // A truncated value is an error too, not a panic.
        let e = ColoMessage::decode_size(&mut SliceSource::new(&out[..6]), 1 << 24).unwrap_err();
        assert!(matches!(e.kind, DecodeErrorKind::Truncated { .. }), "{e}");
    }
}
