//! The postcopy preempt channel (`postcopy-preempt`): a second connection on which the
//! source sends the pages the destination asked for, so they overtake the background
//! push on the main channel.
//!
//! The channel carries bare RAM page records and nothing else: no header, no section
//! headers or footers, and in QEMU 10.0 no terminating EOS (only the pre-7.2 compat mode
//! writes one at the end; a reader accepts it as a no-op, as QEMU's does). Each record is
//! a be64 `offset | flags` with flags PAGE or ZERO, plus CONTINUE when the block is the
//! one of the previous record on this channel; without CONTINUE the block's counted name
//! follows. A ZERO record ends with a fill byte (0), a PAGE record with the page.
//!
//! ```text
//! 00000000 01800008 02 "m0" <4096 bytes>     PAGE, naming its block
//! 00000000 01801022 00                       ZERO|CONTINUE, fill 0
//! ```

use crate::error::{DecodeError, DecodeErrorKind};
use crate::ram::{self, RamRecordHeader, RamRecordKind};
use crate::source::Source;

/// What a preempt record carries after its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreemptPageKind {
    /// A zero page (its fill byte, checked to be 0, was read).
    Zero,
    /// A page of data: `page_size` bytes follow the header.
    Data,
}

/// The header of one record on the preempt channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreemptRecord {
    /// A page of the block named here, or of the channel's current block when `None`
    /// (CONTINUE).
    Page {
        block: Option<String>,
        offset: u64,
        kind: PreemptPageKind,
    },
    /// EOS: written only by a pre-7.2 compat source at the end; nothing to do.
    Eos,
}

/// Writes a PAGE record: header, the block name unless `block` is `None` (CONTINUE),
/// and the page.
pub fn put_page(out: &mut Vec<u8>, offset: u64, block: Option<&str>, data: &[u8]) {
    ram::put_page_header(out, offset, ram::FLAG_PAGE, block);
    out.extend_from_slice(data);
}

/// Writes a ZERO record (fill byte 0).
pub fn put_zero(out: &mut Vec<u8>, offset: u64, block: Option<&str>) {
    ram::put_zero_page(out, offset, block);
}

/// Reads the next record's header (and the block name, and a ZERO record's fill byte);
/// for [`PreemptPageKind::Data`] the caller reads the page. `None` at a clean end of
/// the channel (between records). Flags other than PAGE, ZERO, CONTINUE (and EOS) are
/// an error: nothing else may travel on this channel.
pub fn decode_record(
    src: &mut impl Source,
    page_size: u64,
) -> Result<Option<PreemptRecord>, DecodeError> {
    if src.peek_u8()?.is_none() {
        return Ok(None);
    }
    let at = src.offset();
    let h = RamRecordHeader::decode(src, page_size)?;
    let kind = match h.kind {
        RamRecordKind::Page => PreemptPageKind::Data,
        RamRecordKind::Zero => PreemptPageKind::Zero,
        RamRecordKind::Eos if !h.continues && h.addr == 0 => return Ok(Some(PreemptRecord::Eos)),
        other => {
            return Err(DecodeError::new(
                at,
                DecodeErrorKind::Invalid {
                    what: "postcopy preempt channel record",
                    detail: format!(
                        "{other:?} record (header {:#x}); only PAGE and ZERO records may occur",
                        h.addr
                    ),
                },
            ))
        }
    };
    let block = if h.names_block() {
        let name = src.counted("RAM block name")?;
        if name.is_empty() {
            return Err(DecodeError::new(
                at,
                DecodeErrorKind::EmptyName("RAM block name"),
            ));
        }
        Some(name)
    } else {
        None
    };
    if kind == PreemptPageKind::Zero {
        let fill_at = src.offset();
        let fill = src.u8("zero page fill byte")?;
        if fill != 0 {
            return Err(DecodeError::new(
                fill_at,
                DecodeErrorKind::NonZeroFill(fill),
            ));
        }
    }
    Ok(Some(PreemptRecord::Page {
        block,
        offset: h.addr,
        kind,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SliceSource;

    const PS: u64 = 4096;

    #[test]
    fn records_round_trip() {
        let page: Vec<u8> = (0..PS).map(|i| i as u8).collect();
        let mut out = Vec::new();
        put_page(&mut out, 0x1800000, Some("m0"), &page);
        put_zero(&mut out, 0x1801000, None);
        put_page(&mut out, 0x2000, Some("pc.ram"), &page);
        let mut src = SliceSource::new(&out);
        assert_eq!(
            decode_record(&mut src, PS).unwrap(),
            Some(PreemptRecord::Page {
                block: Some("m0".into()),
                offset: 0x1800000,
                kind: PreemptPageKind::Data
            })
        );
        let mut got = vec![0; PS as usize];
        src.fill(&mut got, "page").unwrap();
        assert_eq!(got, page);
        assert_eq!(
            decode_record(&mut src, PS).unwrap(),
            Some(PreemptRecord::Page {
                block: None,
                offset: 0x1801000,
                kind: PreemptPageKind::Zero
            })
        );
        assert!(matches!(
            decode_record(&mut src, PS).unwrap(),
            Some(PreemptRecord::Page { block: Some(ref b), offset: 0x2000, .. }) if b == "pc.ram"
        ));
        src.fill(&mut got, "page").unwrap();
        assert_eq!(decode_record(&mut src, PS).unwrap(), None);
    }

    #[test]
    fn the_bytes_are_qemus() {
        // QEMU 10.0.2's preempt channel: a zero page naming m0, then one continuing.
        let mut out = Vec::new();
        put_zero(&mut out, 0x1800000, Some("m0"));
        put_zero(&mut out, 0x1801000, None);
        assert_eq!(
            out,
            [
                0, 0, 0, 0, 0x01, 0x80, 0x00, 0x02, 2, b'm', b'0', 0, 0, 0, 0, 0, 0x01, 0x80, 0x10,
                0x22, 0
            ]
        );
    }

    #[test]
    fn other_flags_are_refused() {
        for word in [
            0x1000u64 | ram::FLAG_MEM_SIZE,
            ram::FLAG_XBZRLE,
            ram::FLAG_MULTIFD_FLUSH,
            ram::FLAG_HOOK,
            0x100,
        ] {
            let bytes = word.to_be_bytes();
            let mut src = SliceSource::new(&bytes);
            let e = decode_record(&mut src, PS).unwrap_err();
            assert_eq!(e.offset, 0, "{word:#x}");
        }
        let bytes = 0x1000u64.to_be_bytes();
        let e = decode_record(&mut SliceSource::new(&bytes), PS).unwrap_err();
        assert!(e.to_string().contains("0x0"), "{e}");
    }

    #[test]
    fn eos_is_accepted_and_a_bad_fill_is_not() {
        let mut out = Vec::new();
        ram::put_eos(&mut out);
        ram::put_page_header(&mut out, 0, ram::FLAG_ZERO, Some("m0"));
        out.push(7);
        let mut src = SliceSource::new(&out);
        assert_eq!(
            decode_record(&mut src, PS).unwrap(),
            Some(PreemptRecord::Eos)
        );
        let e = decode_record(&mut src, PS).unwrap_err();
        assert!(matches!(e.kind, DecodeErrorKind::NonZeroFill(7)), "{e}");
    }

    #[test]
    fn a_truncated_record_is_an_error() {
        let mut out = Vec::new();
        put_zero(&mut out, 0x1000, Some("m0"));
        out.truncate(out.len() - 1);
        assert!(decode_record(&mut SliceSource::new(&out), PS).is_err());
    }
}
