//! multifd channel formats: the 64-byte init packet each channel starts with, and the
//! RAM packet header (fixed size: 320 bytes plus one be64 offset per page slot).

use crate::error::{DecodeError, DecodeErrorKind};

pub const MULTIFD_MAGIC: u32 = 0x1122_3344;
pub const MULTIFD_VERSION: u32 = 1;
pub const INIT_LEN: usize = 64;
/// Bytes of RAM one packet carries at most: 512 KiB.
pub const PACKET_RAM_BYTES: u64 = 512 << 10;
pub const IDSTR_LEN: usize = 256;
/// Header bytes before the offset array.
pub const HEADER_FIXED_LEN: usize = 320;

pub const FLAG_SYNC: u32 = 0x01;
pub const FLAG_COMPRESSION_MASK: u32 = 0x3e;
pub const FLAG_ZLIB: u32 = 0x02;
pub const FLAG_ZSTD: u32 = 0x04;
pub const FLAG_DEVICE_STATE: u32 = 0x40;

/// Page slots per packet for a page size (128 for 4 KiB pages).
pub fn page_slots(page_size: u64) -> usize {
    (PACKET_RAM_BYTES / page_size) as usize
}

/// Total header length for a page size (1344 bytes for 4 KiB pages).
pub fn packet_len(page_size: u64) -> usize {
    HEADER_FIXED_LEN + 8 * page_slots(page_size)
}

fn invalid(what: &'static str, detail: String) -> DecodeErrorKind {
    DecodeErrorKind::Invalid { what, detail }
}

/// The init packet: which source VM and which channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelInit {
    pub uuid: [u8; 16],
    pub id: u8,
}

impl ChannelInit {
    pub fn encode(&self) -> [u8; INIT_LEN] {
        let mut b = [0u8; INIT_LEN];
        b[0..4].copy_from_slice(&MULTIFD_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&MULTIFD_VERSION.to_be_bytes());
        b[8..24].copy_from_slice(&self.uuid);
        b[24] = self.id;
        b
    }

    pub fn decode(b: &[u8; INIT_LEN]) -> Result<Self, DecodeErrorKind> {
        let magic = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
        if magic != MULTIFD_MAGIC {
            return Err(invalid(
                "multifd channel handshake",
                format!("received packet magic {magic:x} and expected magic {MULTIFD_MAGIC:x}"),
            ));
        }
        let version = u32::from_be_bytes(b[4..8].try_into().expect("4 bytes"));
        if version != MULTIFD_VERSION {
            return Err(invalid(
                "multifd channel handshake",
                format!("received packet version {version} and expected version {MULTIFD_VERSION}"),
            ));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[8..24]);
        Ok(Self { uuid, id: b[24] })
    }
}

/// A RAM packet header.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PacketHeader {
    pub flags: u32,
    pub pages_alloc: u32,
    pub normal_pages: u32,
    /// Payload bytes after the header.
    pub next_packet_size: u32,
    pub packet_num: u64,
    pub zero_pages: u32,
    pub block: String,
    /// `normal_pages` normal-page offsets, then `zero_pages` zero-page offsets.
    pub offsets: Vec<u64>,
}

impl PacketHeader {
    pub fn sync(packet_num: u64) -> Self {
        Self {
            flags: FLAG_SYNC,
            packet_num,
            ..Default::default()
        }
    }

    pub fn is_sync(&self) -> bool {
        self.flags & FLAG_SYNC != 0
    }

    /// Appends the fixed-size header for `page_size`.
    pub fn encode(&self, out: &mut Vec<u8>, page_size: u64) {
        let start = out.len();
        out.extend_from_slice(&MULTIFD_MAGIC.to_be_bytes());
        out.extend_from_slice(&MULTIFD_VERSION.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.pages_alloc.to_be_bytes());
        out.extend_from_slice(&self.normal_pages.to_be_bytes());
        out.extend_from_slice(&self.next_packet_size.to_be_bytes());
        out.extend_from_slice(&self.packet_num.to_be_bytes());
        out.extend_from_slice(&self.zero_pages.to_be_bytes());
        out.resize(start + 64, 0);
        let name = self.block.as_bytes();
        let n = name.len().min(IDSTR_LEN - 1);
        out.extend_from_slice(&name[..n]);
        out.resize(start + HEADER_FIXED_LEN, 0);
        for o in &self.offsets {
            out.extend_from_slice(&o.to_be_bytes());
        }
        out.resize(start + packet_len(page_size), 0);
    }

    /// Decodes and checks a header of exactly `packet_len(page_size)` bytes.
    /// `expected_compression` is the destination's configured method bits.
    pub fn decode(
        b: &[u8],
        page_size: u64,
        expected_compression: u32,
    ) -> Result<Self, DecodeError> {
        let at = |k| DecodeError::new(0, k);
        let slots = page_slots(page_size);
        if b.len() != packet_len(page_size) {
            return Err(at(invalid(
                "multifd packet",
                format!("header of {} bytes", b.len()),
            )));
        }
        let be32 = |o: usize| u32::from_be_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let be64 = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let magic = be32(0);
        if magic != MULTIFD_MAGIC {
            return Err(at(invalid(
                "multifd packet",
                format!("received packet magic {magic:x} and expected magic {MULTIFD_MAGIC:x}"),
            )));
        }
        let version = be32(4);
        if version != MULTIFD_VERSION {
            return Err(at(invalid(
                "multifd packet",
                format!("received packet version {version} and expected version {MULTIFD_VERSION}"),
            )));
        }
        let flags = be32(8);
        if flags & FLAG_DEVICE_STATE != 0 {
            return Err(at(invalid(
                "multifd packet",
                "device-state packets are not supported by vmigrate yet".into(),
            )));
        }
        let method = flags & FLAG_COMPRESSION_MASK;
        if flags & FLAG_SYNC == 0 && method != expected_compression {
            return Err(at(invalid(
                "multifd packet",
                format!("flags received {flags:x} flags expected {expected_compression:x}"),
            )));
        }
        let pages_alloc = be32(12);
        let normal_pages = be32(16);
        let next_packet_size = be32(20);
        let packet_num = be64(24);
        let zero_pages = be32(32);
        if pages_alloc as usize > slots {
            return Err(at(invalid(
                "multifd packet",
                format!("received packet with {pages_alloc} pages and expected maximum pages are {slots}"),
            )));
        }
        if normal_pages > pages_alloc {
            return Err(at(invalid(
                "multifd packet",
                format!("received packet with {normal_pages} normal pages and expected maximum pages are {pages_alloc}"),
            )));
        }
        if zero_pages > pages_alloc - normal_pages {
            return Err(at(invalid(
                "multifd packet",
                format!(
                    "received packet with {zero_pages} zero pages and expected maximum zero pages are {}",
                    pages_alloc - normal_pages
                ),
            )));
        }
        if method == 0 && u64::from(next_packet_size) != u64::from(normal_pages) * page_size {
            return Err(at(invalid(
                "multifd packet",
                format!(
                    "payload of {next_packet_size} bytes for {normal_pages} uncompressed pages"
                ),
            )));
        }
        if u64::from(next_packet_size) > PACKET_RAM_BYTES * 2 {
            return Err(at(invalid(
                "multifd packet",
                format!("payload of {next_packet_size} bytes is larger than a packet can need"),
            )));
        }
        let name = &b[64..64 + IDSTR_LEN];
        let end = name.iter().position(|c| *c == 0).unwrap_or(IDSTR_LEN);
        let count = (normal_pages + zero_pages) as usize;
        let offsets = (0..count).map(|i| be64(HEADER_FIXED_LEN + 8 * i)).collect();
        Ok(Self {
            flags,
            pages_alloc,
            normal_pages,
            next_packet_size,
            packet_num,
            zero_pages,
            block: String::from_utf8_lossy(&name[..end]).into_owned(),
            offsets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_round_trip_and_errors() {
        let i = ChannelInit {
            uuid: [7; 16],
            id: 3,
        };
        let b = i.encode();
        assert_eq!(&b[..8], &[0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1]);
        assert_eq!(ChannelInit::decode(&b).unwrap(), i);
        let mut bad = b;
        bad[0] = 0;
        assert!(ChannelInit::decode(&bad).is_err());
        let mut bad = b;
        bad[7] = 2;
        assert!(ChannelInit::decode(&bad).is_err());
    }

    #[test]
    fn packet_round_trip_and_limits() {
        let h = PacketHeader {
            flags: 0,
            pages_alloc: 128,
            normal_pages: 2,
            next_packet_size: 8192,
            packet_num: 9,
            zero_pages: 1,
            block: "m0".into(),
            offsets: vec![0, 0x1000, 0x5000],
        };
        let mut v = Vec::new();
        h.encode(&mut v, 4096);
        assert_eq!(v.len(), 1344);
        assert_eq!(PacketHeader::decode(&v, 4096, 0).unwrap(), h);
        let mut bad = v.clone();
        bad[19] = 200; // normal_pages > pages_alloc
        assert!(PacketHeader::decode(&bad, 4096, 0).is_err());
        let mut bad = v.clone();
        bad[15] = 129; // pages_alloc > slots
        assert!(PacketHeader::decode(&bad, 4096, 0).is_err());
        assert!(PacketHeader::decode(&v, 4096, FLAG_ZSTD).is_err());
        let mut s = Vec::new();
        PacketHeader::sync(4).encode(&mut s, 4096);
        assert!(PacketHeader::decode(&s, 4096, FLAG_ZLIB).unwrap().is_sync());
    }
}
