//! The file header: `QEVM` magic and stream version 3.

use crate::error::{DecodeError, DecodeErrorKind};
use crate::source::Source;

pub const MAGIC: u32 = 0x5145_564D;
pub const VERSION: u32 = 3;
/// The obsolete version QEMU names specially in its error.
const VERSION_V2: u32 = 2;

pub fn encode_header(out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&VERSION.to_be_bytes());
}

pub fn decode_header(src: &mut impl Source) -> Result<(), DecodeError> {
    let at = src.offset();
    let magic = src.be32("stream magic")?;
    if magic != MAGIC {
        return Err(DecodeError::new(at, DecodeErrorKind::BadMagic));
    }
    let at = src.offset();
    match src.be32("stream version")? {
        VERSION => Ok(()),
        VERSION_V2 => Err(DecodeError::new(at, DecodeErrorKind::ObsoleteVersion)),
        v => Err(DecodeError::new(at, DecodeErrorKind::UnsupportedVersion(v))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SliceSource;

    #[test]
    fn round_trip() {
        let mut v = Vec::new();
        encode_header(&mut v);
        assert_eq!(v, b"QEVM\0\0\0\x03");
        decode_header(&mut SliceSource::new(&v)).unwrap();
    }

    #[test]
    fn bad_magic() {
        let e = decode_header(&mut SliceSource::new(b"QEVX\0\0\0\x03")).unwrap_err();
        assert_eq!(e.offset, 0);
        assert_eq!(e.kind.to_string(), "Not a migration stream");
    }

    #[test]
    fn bad_versions() {
        let e = decode_header(&mut SliceSource::new(b"QEVM\0\0\0\x02")).unwrap_err();
        assert!(matches!(e.kind, DecodeErrorKind::ObsoleteVersion));
        assert_eq!(e.offset, 4);
        let e = decode_header(&mut SliceSource::new(b"QEVM\0\0\0\x04")).unwrap_err();
        assert_eq!(e.kind.to_string(), "Unsupported migration stream version");
    }
}
