//! Top-level records: section headers, footers, EOF and the vmdesc tag.

use crate::command::{self, Command};
use crate::error::{DecodeError, DecodeErrorKind};
use crate::put_counted;
use crate::source::Source;

pub const EOF: u8 = 0x00;
pub const SECTION_START: u8 = 0x01;
pub const SECTION_PART: u8 = 0x02;
pub const SECTION_END: u8 = 0x03;
pub const SECTION_FULL: u8 = 0x04;
pub const SUBSECTION: u8 = 0x05;
pub const VMDESCRIPTION: u8 = 0x06;
pub const COMMAND: u8 = 0x08;
pub const SECTION_FOOTER: u8 = 0x7E;

/// The header of a START or FULL section: which state entry follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionId {
    pub section_id: u32,
    pub idstr: String,
    pub instance_id: u32,
    pub version_id: u32,
}

/// One top-level record, decoded up to (not including) its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Eof,
    Start(SectionId),
    Part(u32),
    End(u32),
    Full(SectionId),
    Command(Command),
}

impl Record {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Record::Eof => out.push(EOF),
            Record::Start(s) => encode_section_id(out, SECTION_START, s),
            Record::Full(s) => encode_section_id(out, SECTION_FULL, s),
            Record::Part(id) => {
                out.push(SECTION_PART);
                out.extend_from_slice(&id.to_be_bytes());
            }
            Record::End(id) => {
                out.push(SECTION_END);
                out.extend_from_slice(&id.to_be_bytes());
            }
            Record::Command(c) => c.encode(out),
        }
    }

    /// Decodes the next top-level record. A clean end of the input here is reported as
    /// truncation: a stream must end with EOF.
    pub fn decode(src: &mut impl Source) -> Result<Self, DecodeError> {
        let at = src.offset();
        let tag = src.u8("section type")?;
        Ok(match tag {
            EOF => Record::Eof,
            SECTION_START | SECTION_FULL => {
                let section_id = src.be32("section id")?;
                let idstr = src.counted("section idstr")?;
                let instance_id = src.be32("instance id")?;
                let version_id = src.be32("version id")?;
                let s = SectionId {
                    section_id,
                    idstr,
                    instance_id,
                    version_id,
                };
                if tag == SECTION_START {
                    Record::Start(s)
                } else {
                    Record::Full(s)
                }
            }
            SECTION_PART => Record::Part(src.be32("section id")?),
            SECTION_END => Record::End(src.be32("section id")?),
            COMMAND => Record::Command(command::decode_after_tag(src, at)?),
            other => {
                return Err(DecodeError::new(
                    at,
                    DecodeErrorKind::UnknownSectionType(other),
                ))
            }
        })
    }
}

fn encode_section_id(out: &mut Vec<u8>, tag: u8, s: &SectionId) {
    out.push(tag);
    out.extend_from_slice(&s.section_id.to_be_bytes());
    put_counted(out, &s.idstr);
    out.extend_from_slice(&s.instance_id.to_be_bytes());
    out.extend_from_slice(&s.version_id.to_be_bytes());
}

pub fn encode_footer(out: &mut Vec<u8>, section_id: u32) {
    out.push(SECTION_FOOTER);
    out.extend_from_slice(&section_id.to_be_bytes());
}

/// Reads and checks the footer after a section body.
pub fn decode_footer(
    src: &mut impl Source,
    section_id: u32,
    idstr: &str,
) -> Result<(), DecodeError> {
    let at = src.offset();
    let tag = src.u8("section footer")?;
    if tag != SECTION_FOOTER {
        return Err(DecodeError::new(
            at,
            DecodeErrorKind::MissingFooter(idstr.to_string()),
        ));
    }
    let read = src.be32("section footer id")?;
    if read != section_id {
        return Err(DecodeError::new(
            at,
            DecodeErrorKind::FooterMismatch {
                idstr: idstr.to_string(),
                read,
                expected: section_id,
            },
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SliceSource;

    #[test]
    fn start_round_trip() {
        let r = Record::Start(SectionId {
            section_id: 1,
            idstr: "ram".into(),
            instance_id: 0,
            version_id: 4,
        });
        let mut v = Vec::new();
        r.encode(&mut v);
        assert_eq!(v, b"\x01\0\0\0\x01\x03ram\0\0\0\0\0\0\0\x04");
        assert_eq!(Record::decode(&mut SliceSource::new(&v)).unwrap(), r);
    }

    #[test]
    fn footer_errors() {
        let e = decode_footer(&mut SliceSource::new(b"\x7e\0\0\0\x65"), 0x64, "ram").unwrap_err();
        assert_eq!(
            e.kind.to_string(),
            "Mismatched section id in footer for ram - read 0x65 expected 0x64"
        );
        let e = decode_footer(&mut SliceSource::new(b"\x02\0\0\0\x64"), 0x64, "ram").unwrap_err();
        assert_eq!(e.kind.to_string(), "Missing section footer for ram");
    }

    #[test]
    fn unknown_top_level() {
        let e = Record::decode(&mut SliceSource::with_base(b"\x09", 7)).unwrap_err();
        assert_eq!(e.offset, 7);
        assert_eq!(e.kind.to_string(), "Unknown savevm section type 9");
    }
}
