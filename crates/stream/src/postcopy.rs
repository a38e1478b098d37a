//! The payloads of postcopy's commands: POSTCOPY_ADVISE (the page sizes the source
//! uses) and POSTCOPY_RAM_DISCARD (ranges of one block the destination must drop, so
//! they fault and are fetched).

use crate::error::{DecodeError, DecodeErrorKind};

/// Ranges per POSTCOPY_RAM_DISCARD command, as QEMU sends them (about 200 bytes each).
pub const MAX_DISCARD_RANGES: usize = 12;

/// The only discard payload version.
pub const DISCARD_VERSION: u8 = 0;

/// POSTCOPY_ADVISE's 16-byte payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostcopyAdvise {
    /// Every RAM block's page size ORed together (4096 with no huge pages).
    pub ram_pagesize_summary: u64,
    /// The target page size (4096 on x86).
    pub target_page_size: u64,
}

impl PostcopyAdvise {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        out.extend_from_slice(&self.ram_pagesize_summary.to_be_bytes());
        out.extend_from_slice(&self.target_page_size.to_be_bytes());
        out
    }

    /// Decodes the payload of a command that starts at `at`.
    pub fn decode(payload: &[u8], at: u64) -> Result<Self, DecodeError> {
        if payload.len() != 16 {
            return Err(invalid(
                at,
                "POSTCOPY_ADVISE",
                format!("payload of {} bytes, expected 16", payload.len()),
            ));
        }
        let word = |i: usize| u64::from_be_bytes(payload[i..i + 8].try_into().expect("8 bytes"));
        Ok(Self {
            ram_pagesize_summary: word(0),
            target_page_size: word(8),
        })
    }
}

/// One POSTCOPY_RAM_DISCARD command: byte ranges (start, length) of one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamDiscard {
    pub block: String,
    pub ranges: Vec<(u64, u64)>,
}

impl RamDiscard {
    /// `u8 version`, `u8 len` + name + NUL, then `be64 start`, `be64 length` per range.
    pub fn encode(&self) -> Vec<u8> {
        let name = self.block.as_bytes();
        let mut out = Vec::with_capacity(3 + name.len() + 16 * self.ranges.len());
        out.push(DISCARD_VERSION);
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.push(0);
        for (start, len) in &self.ranges {
            out.extend_from_slice(&start.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
        }
        out
    }

    /// Splits `ranges` of `block` into commands of at most [`MAX_DISCARD_RANGES`].
    pub fn batches(block: &str, ranges: &[(u64, u64)]) -> Vec<RamDiscard> {
        ranges
            .chunks(MAX_DISCARD_RANGES)
            .map(|c| RamDiscard {
                block: block.to_string(),
                ranges: c.to_vec(),
            })
            .collect()
    }

    /// Decodes the payload of a command that starts at `at`; every length is checked
    /// against the payload, nothing is trusted.
    pub fn decode(payload: &[u8], at: u64) -> Result<Self, DecodeError> {
        let bad = |detail: String| invalid(at, "POSTCOPY_RAM_DISCARD", detail);
        let (&version, rest) = payload
            .split_first()
            .ok_or_else(|| bad("empty payload".into()))?;
        if version != DISCARD_VERSION {
            return Err(bad(format!(
                "Expected version {DISCARD_VERSION}, got {version}"
            )));
        }
        let (&len, rest) = rest
            .split_first()
            .ok_or_else(|| bad("no block name".into()))?;
        let len = usize::from(len);
        if rest.len() < len + 1 {
            return Err(bad(format!(
                "block name of {len} bytes runs past the payload"
            )));
        }
        let block = std::str::from_utf8(&rest[..len])
            .map_err(|_| bad("block name is not UTF-8".into()))?
            .to_string();
        if rest[len] != 0 {
            return Err(bad("block name is not NUL-terminated".into()));
        }
        let pairs = &rest[len + 1..];
        if pairs.len() % 16 != 0 {
            return Err(bad(format!(
                "{} bytes of ranges is not a whole number of (start, length) pairs",
                pairs.len()
            )));
        }
        let ranges = pairs
            .chunks_exact(16)
            .map(|p| {
                (
                    u64::from_be_bytes(p[..8].try_into().expect("8 bytes")),
                    u64::from_be_bytes(p[8..].try_into().expect("8 bytes")),
                )
            })
            .collect();
        Ok(Self { block, ranges })
    }
}

fn invalid(at: u64, what: &'static str, detail: String) -> DecodeError {
    DecodeError::new(at, DecodeErrorKind::Invalid { what, detail })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_discard_round_trips() {
        // cap_pc's POSTCOPY_RAM_DISCARD of `m0`: 0x100000 + 0x700000 (QEMU 10.0.2).
        let bytes = [
            0, 2, b'm', b'0', 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x70, 0, 0,
        ];
        let d = RamDiscard::decode(&bytes, 0).unwrap();
        assert_eq!(d.block, "m0");
        assert_eq!(d.ranges, vec![(0x100000, 0x700000)]);
        assert_eq!(d.encode(), bytes);
    }

    #[test]
    fn discard_rejects_lies() {
        for bad in [
            &[][..],
            &[1, 2, b'm', b'0', 0][..],
            &[0, 9, b'm', b'0', 0][..],
            &[0, 2, b'm', b'0', 1][..],
            &[0, 2, b'm', b'0', 0, 1, 2, 3][..],
        ] {
            assert!(RamDiscard::decode(bad, 7).is_err(), "{bad:?}");
        }
        let e = RamDiscard::decode(&[0, 9, b'm'], 7).unwrap_err();
        assert_eq!(e.offset, 7);
    }

    #[test]
    fn discards_go_in_batches_of_twelve() {
        let ranges: Vec<_> = (0..25u64).map(|i| (i * 8192, 4096)).collect();
        let b = RamDiscard::batches("ram", &ranges);
        assert_eq!(
            b.iter().map(|d| d.ranges.len()).collect::<Vec<_>>(),
            [12, 12, 1]
        );
    }

    #[test]
    fn advise_round_trips() {
        let a = PostcopyAdvise {
            ram_pagesize_summary: 4096,
            target_page_size: 4096,
        };
        let bytes = a.encode();
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x10, 0]
        );
        assert_eq!(PostcopyAdvise::decode(&bytes, 0).unwrap(), a);
        assert!(PostcopyAdvise::decode(&bytes[..15], 0).is_err());
    }
}
