//! Per-channel compression for multifd: one zlib or zstd stream per channel that lives
//! for the whole migration and is flushed at the end of every packet, as QEMU does.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

use crate::options::MultifdCompression;

/// The `multifd-compression` methods vmigrate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    None,
    Zlib,
    Zstd,
}

impl From<MultifdCompression> for Method {
    fn from(compression: MultifdCompression) -> Self {
        match compression {
            MultifdCompression::None => Method::None,
            MultifdCompression::Zlib => Method::Zlib,
            MultifdCompression::Zstd => Method::Zstd,
        }
    }
}

impl Method {
    /// The packet-header flag bits for this method.
    pub fn flag(self) -> u32 {
        use vmigrate_stream::multifd::{FLAG_ZLIB, FLAG_ZSTD};
        match self {
            Method::None => 0,
            Method::Zlib => FLAG_ZLIB,
            Method::Zstd => FLAG_ZSTD,
        }
    }
}

/// A compression failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct CompressError(pub String);

/// The sending side of one channel.
pub enum Compressor {
    None,
    Zlib(Box<Compress>),
    Zstd(Box<Encoder<'static>>),
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compressor::None => "Compressor::None",
            Compressor::Zlib(_) => "Compressor::Zlib",
            Compressor::Zstd(_) => "Compressor::Zstd",
        })
    }
}

impl Compressor {
    pub fn new(method: Method, level: u32) -> Result<Self, CompressError> {
        Ok(match method {
            Method::None => Compressor::None,
            Method::Zlib => {
                Compressor::Zlib(Box::new(Compress::new(Compression::new(level), true)))
            }
            Method::Zstd => Compressor::Zstd(Box::new(
                Encoder::new(level as i32).map_err(|e| CompressError(format!("zstd init: {e}")))?,
            )),
        })
    }

    /// Compresses the pages of one packet into `out` (cleared first) and flushes, so the
    /// destination can decode this packet without the next one.
    pub fn compress_packet(
        &mut self,
        pages: &[&[u8]],
        out: &mut Vec<u8>,
    ) -> Result<(), CompressError> {
        out.clear();
        match self {
            Compressor::None => {
                for p in pages {
                    out.extend_from_slice(p);
                }
            }
            Compressor::Zlib(z) => {
                for p in pages {
                    let mut input: &[u8] = p;
                    while !input.is_empty() {
                        out.reserve(input.len() / 2 + 1024);
                        let before = z.total_in();
                        z.compress_vec(input, out, FlushCompress::None)
                            .map_err(|e| CompressError(format!("zlib: {e}")))?;
                        let used = (z.total_in() - before) as usize;
                        input = &input[used..];
                    }
                }
                loop {
                    out.reserve(4096);
                    let before = out.len();
                    z.compress_vec(&[], out, FlushCompress::Sync)
                        .map_err(|e| CompressError(format!("zlib: {e}")))?;
                    if out.len() < out.capacity() || out.len() == before {
                        break;
                    }
                }
            }
            Compressor::Zstd(e) => {
                // Room for the worst case (incompressible input plus block overhead),
                // so zstd writes straight into `out`.
                let input_len: usize = pages.iter().map(|p| p.len()).sum();
                out.reserve(input_len + input_len / 128 + 4096);
                let mut o = OutBuffer::around(out);
                for p in pages {
                    let mut input = InBuffer::around(p);
                    while input.pos < p.len() {
                        let before = (input.pos, o.pos());
                        e.run(&mut input, &mut o)
                            .map_err(|e| CompressError(format!("zstd: {e}")))?;
                        if (input.pos, o.pos()) == before {
                            return Err(CompressError("zstd: output buffer full".into()));
                        }
                    }
                }
                loop {
                    let before = o.pos();
                    let left = e
                        .flush(&mut o)
                        .map_err(|e| CompressError(format!("zstd: {e}")))?;
                    if left == 0 {
                        break;
                    }
                    if o.pos() == before {
                        return Err(CompressError("zstd: output buffer full".into()));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The receiving side of one channel.
pub enum Decompressor {
    None,
    Zlib(Box<Decompress>),
    Zstd(Box<Decoder<'static>>),
}

impl std::fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decompressor")
    }
}

impl Decompressor {
    pub fn new(method: Method) -> Result<Self, CompressError> {
        Ok(match method {
            Method::None => Decompressor::None,
            Method::Zlib => Decompressor::Zlib(Box::new(Decompress::new(true))),
            Method::Zstd => Decompressor::Zstd(Box::new(
                Decoder::new().map_err(|e| CompressError(format!("zstd init: {e}")))?,
            )),
        })
    }

    /// Decodes one packet's payload into exactly `out.len()` bytes. A payload that
    /// inflates to more or to less is an error.
    pub fn decompress_packet(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), CompressError> {
        self.decompress_pages(input, &mut [out])
    }

    /// Decodes one packet's payload straight into `pages`, filling each exactly, in
    /// order (the pages of a packet need not be next to each other in memory). A
    /// payload that inflates to more or to less than their total is an error; pages
    /// may then hold part of it.
    pub fn decompress_pages(
        &mut self,
        input: &[u8],
        pages: &mut [&mut [u8]],
    ) -> Result<(), CompressError> {
        let want: usize = pages.iter().map(|p| p.len()).sum();
        let mut cursor = PageCursor::default();
        match self {
            Decompressor::None => {
                if input.len() != want {
                    return Err(CompressError(format!(
                        "payload of {} bytes for {want} bytes of pages",
                        input.len()
                    )));
                }
                let mut at = 0;
                for p in pages.iter_mut() {
                    p.copy_from_slice(&input[at..at + p.len()]);
                    at += p.len();
                }
            }
            Decompressor::Zlib(z) => {
                let (in0, out0) = (z.total_in(), z.total_out());
                let mut spare = [0u8; 64];
                loop {
                    let done_in = (z.total_in() - in0) as usize;
                    if done_in == input.len() {
                        break;
                    }
                    let before_out = z.total_out();
                    let status = match cursor.next_room(pages) {
                        Some(room) => {
                            let r = z.decompress(&input[done_in..], room, FlushDecompress::Sync);
                            cursor.advance((z.total_out() - before_out) as usize);
                            r
                        }
                        None => {
                            let r =
                                z.decompress(&input[done_in..], &mut spare, FlushDecompress::Sync);
                            if z.total_out() != before_out {
                                return Err(CompressError(format!(
                                    "zlib payload inflates past its {want} bytes of pages"
                                )));
                            }
                            r
                        }
                    }
                    .map_err(|e| CompressError(format!("zlib: {e}")))?;
                    let progressed =
                        (z.total_in() - in0) as usize != done_in || z.total_out() != before_out;
                    if matches!(status, Status::StreamEnd) || !progressed {
                        break;
                    }
                }
                let got = (z.total_out() - out0) as usize;
                if got != want || (z.total_in() - in0) as usize != input.len() {
                    return Err(CompressError(format!(
                        "zlib payload of {} bytes gave {got} bytes, expected {want}",
                        input.len()
                    )));
                }
            }
            Decompressor::Zstd(d) => {
                let mut inb = InBuffer::around(input);
                let mut produced = 0usize;
                let mut spare = [0u8; 64];
                loop {
                    match cursor.next_room(pages) {
                        Some(room) => {
                            let mut o = OutBuffer::around(room);
                            d.run(&mut inb, &mut o)
                                .map_err(|e| CompressError(format!("zstd: {e}")))?;
                            let n = o.pos();
                            cursor.advance(n);
                            produced += n;
                            if n == 0 && inb.pos == input.len() {
                                break;
                            }
                        }
                        None => {
                            let mut o = OutBuffer::around(&mut spare[..]);
                            d.run(&mut inb, &mut o)
                                .map_err(|e| CompressError(format!("zstd: {e}")))?;
                            if o.pos() > 0 {
                                return Err(CompressError(format!(
                                    "zstd payload inflates past its {want} bytes of pages"
                                )));
                            }
                            if inb.pos == input.len() {
                                break;
                            }
                        }
                    }
                }
                if produced != want || inb.pos != input.len() {
                    return Err(CompressError(format!(
                        "zstd payload of {} bytes gave {produced} bytes, expected {want}",
                        input.len()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Where decoded bytes go next among a packet's pages.
#[derive(Debug, Default)]
struct PageCursor {
    page: usize,
    filled: usize,
}

impl PageCursor {
    /// The unfilled rest of the current page, moving past full ones; `None` once every
    /// page is full.
    fn next_room<'a>(&mut self, pages: &'a mut [&mut [u8]]) -> Option<&'a mut [u8]> {
        while self.page < pages.len() && self.filled == pages[self.page].len() {
            self.page += 1;
            self.filled = 0;
        }
        let page = pages.get_mut(self.page)?;
        Some(&mut page[self.filled..])
    }

    fn advance(&mut self, n: usize) {
        self.filled += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages() -> Vec<Vec<u8>> {
        (0..5u8)
            .map(|i| (0..4096u32).map(|j| (j as u8).wrapping_mul(i)).collect())
            .collect()
    }

    fn round_trip(method: Method, level: u32) {
        let mut c = Compressor::new(method, level).unwrap();
        let mut d = Decompressor::new(method).unwrap();
        let p = pages();
        for round in 0..3 {
            let refs: Vec<&[u8]> = p.iter().map(|v| v.as_slice()).collect();
            let mut out = Vec::new();
            c.compress_packet(&refs[..round + 1], &mut out).unwrap();
            let mut back = vec![0u8; 4096 * (round + 1)];
            d.decompress_packet(&out, &mut back).unwrap();
            assert_eq!(back, p[..round + 1].concat());
            if method == Method::Zlib {
                assert_eq!(&out[out.len() - 4..], &[0, 0, 0xff, 0xff]);
            }
        }
    }

    #[test]
    fn zlib_packets_decode_independently_in_order() {
        round_trip(Method::Zlib, 1);
        round_trip(Method::Zlib, 9);
    }

    #[test]
    fn zstd_packets_decode_independently_in_order() {
        round_trip(Method::Zstd, 1);
        round_trip(Method::Zstd, 19);
    }

    #[test]
    fn packets_decode_straight_into_scattered_pages() {
        for (m, level) in [(Method::Zlib, 1), (Method::Zstd, 1), (Method::None, 0)] {
            let mut c = Compressor::new(m, level).unwrap();
            let mut d = Decompressor::new(m).unwrap();
            let p = pages();
            for round in 0..3 {
                let refs: Vec<&[u8]> = p.iter().map(|v| v.as_slice()).collect();
                let mut out = Vec::new();
                c.compress_packet(&refs, &mut out).unwrap();
                // One allocation per page, not one contiguous buffer.
                let mut dst: Vec<Vec<u8>> = (0..p.len()).map(|_| vec![0xee; 4096]).collect();
                let mut views: Vec<&mut [u8]> = dst.iter_mut().map(|v| v.as_mut_slice()).collect();
                d.decompress_pages(&out, &mut views).unwrap();
                assert_eq!(dst, p, "{m:?} round {round}");
            }
            // One page short: the payload inflates past the pages.
            let refs: Vec<&[u8]> = p.iter().map(|v| v.as_slice()).collect();
            let mut out = Vec::new();
            Compressor::new(m, level)
                .unwrap()
                .compress_packet(&refs, &mut out)
                .unwrap();
            let mut short: Vec<Vec<u8>> = (0..p.len() - 1).map(|_| vec![0; 4096]).collect();
            let mut views: Vec<&mut [u8]> = short.iter_mut().map(|v| v.as_mut_slice()).collect();
            let fresh = Decompressor::new(m)
                .unwrap()
                .decompress_pages(&out, &mut views);
            assert!(fresh.is_err(), "{m:?}");
        }
    }

    #[test]
    fn inflating_past_the_page_count_is_refused() {
        for m in [Method::Zlib, Method::Zstd] {
            let mut c = Compressor::new(m, 1).unwrap();
            let p = pages();
            let refs: Vec<&[u8]> = p.iter().map(|v| v.as_slice()).collect();
            let mut out = Vec::new();
            c.compress_packet(&refs, &mut out).unwrap();
            let mut d = Decompressor::new(m).unwrap();
            let mut small = vec![0u8; 4096 * 2];
            assert!(d.decompress_packet(&out, &mut small).is_err(), "{m:?}");
        }
    }
}
