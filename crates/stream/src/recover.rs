//! Postcopy recovery on the wire: the received-pages bitmap the destination sends
//! after RP `RECV_BITMAP` (message type 5) and the `RESUME_ACK` value.
//!
//! ```text
//! RP message:  be16 5, be16 1+n, u8 n, n bytes block name
//! then, outside the message:
//!              be64 size                 (bytes of bitmap: whole 64-bit words)
//!              size bytes                (bit i = byte i/8, bit i%8; set = received)
//!              be64 0x0123456789ABCDEF   (end mark)
//! ```
//!
//! The bitmap has one bit per target page of the block, little-endian whatever the
//! rest of the stream uses. The source sends again every page whose bit is clear.

use crate::error::{DecodeError, DecodeErrorKind};
use crate::source::Source;

/// The be64 that closes a received-pages bitmap.
pub const RECV_BITMAP_END_MARK: u64 = 0x0123_4567_89AB_CDEF;

/// The value a destination's `RESUME_ACK` carries.
pub const RESUME_ACK_VALUE: u32 = 1;

/// Bytes of the bitmap of a block of `pages` pages: whole 64-bit words.
pub fn recv_bitmap_len(pages: u64) -> u64 {
    pages.div_ceil(64) * 8
}

/// A received-pages bitmap in its wire layout (bit `i` = byte `i / 8`, bit `i % 8`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecvBitmap {
    pages: u64,
    bytes: Vec<u8>,
}

impl RecvBitmap {
    /// The bitmap of `pages` pages, `received(page)` telling which ones arrived.
    pub fn from_fn(pages: u64, received: impl Fn(u64) -> bool) -> Self {
        let mut bytes = vec![0u8; recv_bitmap_len(pages) as usize];
        for page in 0..pages {
            if received(page) {
                bytes[(page / 8) as usize] |= 1 << (page % 8);
            }
        }
        Self { pages, bytes }
    }

    /// Whether page `page` arrived on the destination.
    pub fn received(&self, page: u64) -> bool {
        page < self.pages && self.bytes[(page / 8) as usize] & (1 << (page % 8)) != 0
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Pages marked received.
    pub fn count(&self) -> u64 {
        (0..self.pages).filter(|&p| self.received(p)).count() as u64
    }

    /// The part after the RP message: size, bitmap, end mark.
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.bytes.len() as u64).to_be_bytes());
        out.extend_from_slice(&self.bytes);
        out.extend_from_slice(&RECV_BITMAP_END_MARK.to_be_bytes());
    }

    /// Reads the part after the RP message for `block`, which has `pages` pages here:
    /// the size must be the one this side computes (so nothing from the wire sizes the
    /// allocation), then the end mark must follow.
    pub fn decode_body(
        src: &mut impl Source,
        block: &str,
        pages: u64,
    ) -> Result<Self, DecodeError> {
        let at = src.offset();
        let expected = recv_bitmap_len(pages);
        let size = src.be64("received bitmap size")?;
        if size != expected {
            return Err(invalid(
                at,
                format!("RAM block '{block}' bitmap size mismatch ({size:#x} != {expected:#x})"),
            ));
        }
        let mut bytes = vec![0u8; expected as usize];
        src.fill(&mut bytes, "received bitmap")?;
        let mark_at = src.offset();
        let mark = src.be64("received bitmap end mark")?;
        if mark != RECV_BITMAP_END_MARK {
            return Err(invalid(
                mark_at,
                format!("RAM block '{block}' bitmap end mark incorrect: {mark:#x}"),
            ));
        }
        Ok(Self { pages, bytes })
    }
}

fn invalid(at: u64, detail: String) -> DecodeError {
    DecodeError::new(
        at,
        DecodeErrorKind::Invalid {
            what: "RECV_BITMAP",
            detail,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::return_path::RpMessage;
    use crate::SliceSource;

    /// The head of cap_rec/gen2's return path (QEMU 10.0.2 destination, block `m0` of
    /// 8 MiB): RECV_BITMAP, size 0x100, pages 0..352 received, end mark,
    /// RESUME_ACK(1), SHUT(0).
    fn captured() -> Vec<u8> {
        let mut b = vec![0, 5, 0, 3, 2, b'm', b'0'];
        b.extend_from_slice(&0x100u64.to_be_bytes());
        let mut bitmap = vec![0u8; 0x100];
        bitmap[..44].fill(0xff);
        b.extend_from_slice(&bitmap);
        b.extend_from_slice(&[0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
        b.extend_from_slice(&[0, 6, 0, 4, 0, 0, 0, 1, 0, 1, 0, 4, 0, 0, 0, 0]);
        b
    }

    #[test]
    fn captured_recovery_return_path_decodes_and_encodes_back() {
        let bytes = captured();
        let mut src = SliceSource::new(&bytes);
        let msg = RpMessage::decode(&mut src).unwrap();
        assert_eq!(msg, RpMessage::RecvBitmap { block: "m0".into() });
        let pages = 8 << 20 >> 12;
        let bitmap = RecvBitmap::decode_body(&mut src, "m0", pages).unwrap();
        assert_eq!(bitmap.count(), 352);
        assert!(bitmap.received(0) && bitmap.received(351) && !bitmap.received(352));
        assert_eq!(
            RpMessage::decode(&mut src).unwrap(),
            RpMessage::ResumeAck(RESUME_ACK_VALUE)
        );
        assert_eq!(RpMessage::decode(&mut src).unwrap(), RpMessage::Shut(0));
        // Encoded again, the same bytes.
        let mut out = Vec::new();
        msg.encode(&mut out);
        RecvBitmap::from_fn(pages, |p| bitmap.received(p)).encode_body(&mut out);
        RpMessage::ResumeAck(RESUME_ACK_VALUE).encode(&mut out);
        RpMessage::Shut(0).encode(&mut out);
        assert_eq!(out, bytes);
    }

    #[test]
    fn the_captured_file_matches_when_present() {
        let path = "/work/shared/qemu-oracle/captures/cap_rec/gen2/conn0.s2c";
        let Ok(real) = std::fs::read(path) else {
            // (The bytes above were taken from it; this only checks them again.)
            return;
        };
        assert_eq!(real, captured());
    }

    #[test]
    fn the_recovery_commands_encode_as_captured() {
        // cap_rec/gen2's new main stream starts with RECV_BITMAP("m0") and
        // POSTCOPY_RESUME, no header.
        let mut out = Vec::new();
        crate::command::Command::RecvBitmap("m0".into()).encode(&mut out);
        crate::command::Command::PostcopyResume.encode(&mut out);
        assert_eq!(
            out,
            [0x08, 0x00, 0x0a, 0x00, 0x03, 0x02, b'm', b'0', 0x08, 0x00, 0x09, 0x00, 0x00]
        );
        let path = "/work/shared/qemu-oracle/captures/cap_rec/gen2/conn0.c2s";
        if let Ok(real) = std::fs::read(path) {
            assert_eq!(real[..out.len()], out[..]);
        }
    }

    #[test]
    fn sizes_are_whole_words() {
        assert_eq!(recv_bitmap_len(0), 0);
        assert_eq!(recv_bitmap_len(1), 8);
        assert_eq!(recv_bitmap_len(64), 8);
        assert_eq!(recv_bitmap_len(65), 16);
        // cap_rec/gen1's 64 MiB block: 0x800 bytes.
        assert_eq!(recv_bitmap_len(64 << 20 >> 12), 0x800);
    }

    #[test]
    fn a_wrong_size_or_end_mark_is_refused() {
        let mut body = Vec::new();
        RecvBitmap::from_fn(100, |p| p % 3 == 0).encode_body(&mut body);
        // Decoded as a block of another size.
        let e = RecvBitmap::decode_body(&mut SliceSource::new(&body), "b", 1000).unwrap_err();
        assert!(
            e.to_string()
                .contains("bitmap size mismatch (0x10 != 0x80)"),
            "{e}"
        );
        let mut bad = body.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        let e = RecvBitmap::decode_body(&mut SliceSource::new(&bad), "b", 100).unwrap_err();
        assert!(e.to_string().contains("end mark incorrect"), "{e}");
        // Cut short.
        assert!(RecvBitmap::decode_body(&mut SliceSource::new(&body[..12]), "b", 100).is_err());
        let ok = RecvBitmap::decode_body(&mut SliceSource::new(&body), "b", 100).unwrap();
        assert!((0..100).all(|p| ok.received(p) == (p % 3 == 0)));
    }
}
