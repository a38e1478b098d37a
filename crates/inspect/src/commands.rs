//! Reading the payloads of commands that carry more than a number.

use vmigrate_stream::command::Command;

/// What a POSTCOPY_RAM_DISCARD asks the destination to drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discard {
    pub version: u8,
    pub block: String,
    /// (start, length) byte ranges inside the block.
    pub ranges: Vec<(u64, u64)>,
}

/// Header bytes before the ranges: version, name length, and the NUL after the name.
const DISCARD_FIXED_LEN: usize = 3;
const DISCARD_RANGE_LEN: usize = 16;

/// Decodes a POSTCOPY_RAM_DISCARD payload; `None` when it is malformed.
pub fn discard(payload: &[u8]) -> Option<Discard> {
    let version = *payload.first()?;
    let name_len = *payload.get(1)? as usize;
    let name = payload.get(2..2 + name_len)?;
    if *payload.get(2 + name_len)? != 0 {
        return None;
    }
    let rest = &payload[DISCARD_FIXED_LEN + name_len..];
    if !rest.len().is_multiple_of(DISCARD_RANGE_LEN) {
        return None;
    }
    let ranges = rest
        .chunks_exact(DISCARD_RANGE_LEN)
        .map(|c| {
            let (s, l) = c.split_at(8);
            (be64(s), be64(l))
        })
        .collect();
    Some(Discard {
        version,
        block: String::from_utf8_lossy(name).into_owned(),
        ranges,
    })
}

/// (ram_pagesize_summary, target page size) of a 16-byte POSTCOPY_ADVISE.
pub fn advise(payload: &[u8]) -> Option<(u64, u64)> {
    if payload.len() != 16 {
        return None;
    }
    let (a, b) = payload.split_at(8);
    Some((be64(a), be64(b)))
}

fn be64(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(b);
    u64::from_be_bytes(w)
}

/// One line of detail for a command, for the text report.
pub fn detail(c: &Command) -> String {
    match c {
        Command::Ping(v) => format!(" {v}"),
        Command::Packaged(len) => format!(" {len} bytes"),
        Command::PostcopyAdvise(p) => match advise(p) {
            Some((summary, target)) => {
                format!(" ram_pagesize_summary=0x{summary:x} target_page_size={target}")
            }
            None if p.is_empty() => " (dirty-bitmap postcopy only)".to_string(),
            None => format!(" ({} bytes, malformed)", p.len()),
        },
        Command::PostcopyRamDiscard(p) => match discard(p) {
            Some(d) => {
                let ranges: Vec<String> = d
                    .ranges
                    .iter()
                    .map(|(s, l)| format!("0x{s:x}+0x{l:x}"))
                    .collect();
                format!(" block '{}' {}", d.block, ranges.join(" "))
            }
            None => format!(" ({} bytes, malformed)", p.len()),
        },
        Command::RecvBitmap(block) => format!(" block '{block}'"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discard_payload() {
        let mut p = vec![0, 2, b'm', b'0', 0];
        p.extend_from_slice(&0x100000u64.to_be_bytes());
        p.extend_from_slice(&0x700000u64.to_be_bytes());
        let d = discard(&p).unwrap();
        assert_eq!(d.block, "m0");
        assert_eq!(d.ranges, vec![(0x100000, 0x700000)]);
        assert!(discard(&p[..p.len() - 1]).is_none());
        assert!(discard(&[0, 5, b'm']).is_none());
        assert!(discard(&[0, 1, b'm', 1]).is_none());
        assert!(discard(&[]).is_none());
    }

    #[test]
    fn advise_payload() {
        let mut p = 0x1000u64.to_be_bytes().to_vec();
        p.extend_from_slice(&4096u64.to_be_bytes());
        assert_eq!(advise(&p), Some((0x1000, 4096)));
        assert_eq!(advise(&p[..8]), None);
    }
}
