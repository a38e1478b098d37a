//! Records of the `ram` section (version 4).
//!
//! Every record starts with a be64 whose low bits (below the page size) are flags and
//! whose high bits are an offset inside a RAM block (or, for MEM_SIZE, a length).

use crate::error::{DecodeError, DecodeErrorKind};
use crate::put_counted;
use crate::source::Source;

pub const RAM_IDSTR: &str = "ram";
pub const RAM_SECTION_VERSION: u32 = 4;

pub const FLAG_FULL: u64 = 0x001;
pub const FLAG_ZERO: u64 = 0x002;
pub const FLAG_MEM_SIZE: u64 = 0x004;
pub const FLAG_PAGE: u64 = 0x008;
pub const FLAG_EOS: u64 = 0x010;
pub const FLAG_CONTINUE: u64 = 0x020;
pub const FLAG_XBZRLE: u64 = 0x040;
pub const FLAG_HOOK: u64 = 0x080;
pub const FLAG_MULTIFD_FLUSH: u64 = 0x200;

/// Size of the `MappedRamHeader` that follows each block entry with mapped-ram.
pub const MAPPED_RAM_HEADER_LEN: usize = 28;

/// The kind of a RAM record, from its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamRecordKind {
    MemSize,
    Zero,
    Page,
    Xbzrle,
    Eos,
    MultifdFlush,
    Hook,
}

/// The be64 that starts a RAM record, split into its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRecordHeader {
    pub kind: RamRecordKind,
    /// CONTINUE: same block as the previous page record on this channel.
    pub continues: bool,
    /// Offset inside the block (or total length for MEM_SIZE).
    pub addr: u64,
}

impl RamRecordHeader {
    /// Splits a header word; `page_size` must be a power of two.
    pub fn from_word(word: u64, page_size: u64) -> Result<Self, DecodeErrorKind> {
        let flags = word & (page_size - 1);
        let addr = word & !(page_size - 1);
        let continues = flags & FLAG_CONTINUE != 0;
        let kind = match flags & !FLAG_CONTINUE {
            FLAG_MEM_SIZE => RamRecordKind::MemSize,
            FLAG_ZERO => RamRecordKind::Zero,
            FLAG_PAGE => RamRecordKind::Page,
            FLAG_XBZRLE => RamRecordKind::Xbzrle,
            FLAG_EOS => RamRecordKind::Eos,
            FLAG_MULTIFD_FLUSH => RamRecordKind::MultifdFlush,
            FLAG_HOOK => RamRecordKind::Hook,
            other => return Err(DecodeErrorKind::UnknownRamFlags(other)),
        };
        Ok(Self {
            kind,
            continues,
            addr,
        })
    }

    pub fn decode(src: &mut impl Source, page_size: u64) -> Result<Self, DecodeError> {
        let at = src.offset();
        let word = src.be64("RAM record header")?;
        Self::from_word(word, page_size).map_err(|k| DecodeError::new(at, k))
    }

    /// Whether a block name follows (page records without CONTINUE).
    pub fn names_block(&self) -> bool {
        matches!(
            self.kind,
            RamRecordKind::Zero | RamRecordKind::Page | RamRecordKind::Xbzrle
        ) && !self.continues
    }
}

/// Writes the be64 of a page record and, unless `continues`, the block name.
pub fn put_page_header(out: &mut Vec<u8>, offset: u64, flag: u64, block: Option<&str>) {
    match block {
        Some(name) => {
            out.extend_from_slice(&(offset | flag).to_be_bytes());
            put_counted(out, name);
        }
        None => out.extend_from_slice(&(offset | flag | FLAG_CONTINUE).to_be_bytes()),
    }
}

/// Writes a ZERO record (header, optional block name, fill byte 0).
pub fn put_zero_page(out: &mut Vec<u8>, offset: u64, block: Option<&str>) {
    put_page_header(out, offset, FLAG_ZERO, block);
    out.push(0);
}

pub fn put_eos(out: &mut Vec<u8>) {
    out.extend_from_slice(&FLAG_EOS.to_be_bytes());
}

pub fn put_multifd_flush(out: &mut Vec<u8>) {
    out.extend_from_slice(&FLAG_MULTIFD_FLUSH.to_be_bytes());
}

/// One entry of the MEM_SIZE block list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockEntry {
    pub idstr: String,
    pub used_length: u64,
    /// Present with postcopy-ram when the block's page size differs from the host's.
    pub page_size: Option<u64>,
    /// Present with x-ignore-shared.
    pub mr_addr: Option<u64>,
}

/// Writes the MEM_SIZE word that opens the setup body.
pub fn put_mem_size(out: &mut Vec<u8>, total: u64) {
    out.extend_from_slice(&(total | FLAG_MEM_SIZE).to_be_bytes());
}

impl BlockEntry {
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_counted(out, &self.idstr);
        out.extend_from_slice(&self.used_length.to_be_bytes());
        if let Some(ps) = self.page_size {
            out.extend_from_slice(&ps.to_be_bytes());
        }
        if let Some(addr) = self.mr_addr {
            out.extend_from_slice(&addr.to_be_bytes());
        }
    }

    /// Decodes the name and length; the optional fields depend on capabilities, so the
    /// caller reads them (see [`BlockEntry::decode_with`]).
    pub fn decode_with(
        src: &mut impl Source,
        with_page_size: bool,
        with_mr_addr: bool,
    ) -> Result<Self, DecodeError> {
        let at = src.offset();
        let idstr = src.counted("RAM block name")?;
        if idstr.is_empty() {
            return Err(DecodeError::new(
                at,
                DecodeErrorKind::EmptyName("RAM block"),
            ));
        }
        let used_length = src.be64("RAM block length")?;
        let page_size = if with_page_size {
            Some(src.be64("RAM block page size")?)
        } else {
            None
        };
        let mr_addr = if with_mr_addr {
            Some(src.be64("RAM block address")?)
        } else {
            None
        };
        Ok(Self {
            idstr,
            used_length,
            page_size,
            mr_addr,
        })
    }
}

/// The mapped-ram header that follows a block entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedRamHeader {
    pub version: u32,
    pub page_size: u64,
    pub bitmap_offset: u64,
    pub pages_offset: u64,
}

impl MappedRamHeader {
    pub const VERSION: u32 = 1;

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.page_size.to_be_bytes());
        out.extend_from_slice(&self.bitmap_offset.to_be_bytes());
        out.extend_from_slice(&self.pages_offset.to_be_bytes());
    }

    pub fn decode(src: &mut impl Source) -> Result<Self, DecodeError> {
        Ok(Self {
            version: src.be32("mapped-ram version")?,
            page_size: src.be64("mapped-ram page size")?,
            bitmap_offset: src.be64("mapped-ram bitmap offset")?,
            pages_offset: src.be64("mapped-ram pages offset")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SliceSource;

    #[test]
    fn header_words() {
        let h = RamRecordHeader::from_word(0xE41022, 4096).unwrap();
        assert_eq!(h.kind, RamRecordKind::Zero);
        assert!(h.continues);
        assert_eq!(h.addr, 0xE41000);
        assert!(!h.names_block());
        let e = RamRecordHeader::from_word(0x100, 4096).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Unknown combination of migration flags: 0x100"
        );
        assert!(RamRecordHeader::from_word(0x1, 4096).is_err());
        assert!(RamRecordHeader::from_word(0x6, 4096).is_err());
    }

    #[test]
    fn zero_record_bytes() {
        let mut v = Vec::new();
        put_zero_page(&mut v, 0, Some("ram"));
        put_zero_page(&mut v, 0x1000, None);
        assert_eq!(
            v,
            b"\0\0\0\0\0\0\0\x02\x03ram\0\0\0\0\0\0\0\x10\x22\0".to_vec()
        );
    }

    #[test]
    fn block_entry_round_trip() {
        let b = BlockEntry {
            idstr: "m0".into(),
            used_length: 0x800000,
            page_size: None,
            mr_addr: Some(0),
        };
        let mut v = Vec::new();
        b.encode(&mut v);
        let d = BlockEntry::decode_with(&mut SliceSource::new(&v), false, true).unwrap();
        assert_eq!(d, b);
    }
}
