//! The destination side of XBZRLE: applying an encoded page to the copy already in
//! guest memory.
//!
//! Every encoding is checked before guest memory changes: it is decoded into a copy of
//! the page, which is written back only when the whole encoding was valid. An XBZRLE
//! page for a page that this load never received whole (as PAGE or ZERO) is refused:
//! the source encodes against what it sent, so there is nothing valid to apply it to.

use vmigrate_stream::xbzrle::{self, ENCODING_XBZRLE};
use vmigrate_stream::{DecodeError, DecodeErrorKind, Source};

use crate::memory::RamBlock;
use crate::vmm::AtomicBitmap;

/// Pages received whole, and the buffers of the decoder.
#[derive(Debug)]
pub struct XbzrleLoad {
    full: Vec<AtomicBitmap>,
    encoded: Vec<u8>,
    page: Vec<u8>,
    /// XBZRLE pages loaded.
    pub pages: u64,
}

impl XbzrleLoad {
    pub fn new(blocks: &[std::sync::Arc<RamBlock>]) -> Self {
        let ps = blocks.first().map_or(4096, |b| b.page_size()) as usize;
        Self {
            full: blocks
                .iter()
                .map(|b| AtomicBitmap::new(b.pages()))
                .collect(),
            encoded: vec![0; ps],
            page: vec![0; ps],
            pages: 0,
        }
    }

    /// Page `page` of block `bi` arrived whole (PAGE or ZERO).
    pub fn note_full(&self, bi: usize, page: usize) {
        self.full[bi].put(page, true);
    }

    /// Reads the body of an XBZRLE record (encoding byte, length, encoding) for page
    /// `page` of `block` (index `bi`) from `src` and applies it. `at` is the record's
    /// stream offset, for the errors.
    pub fn load(
        &mut self,
        src: &mut dyn Source,
        block: &RamBlock,
        bi: usize,
        page: usize,
        at: u64,
    ) -> Result<(), DecodeError> {
        let ps = block.page_size() as usize;
        let offset = page as u64 * ps as u64;
        let fail = |at: u64, why: String| {
            DecodeError::new(
                at,
                DecodeErrorKind::Invalid {
                    what: "XBZRLE page",
                    detail: format!(
                        "Failed to decompress XBZRLE page at {} offset {offset:#x}: {why}",
                        block.idstr()
                    ),
                },
            )
        };
        let kind_at = src.offset();
        let kind = src.u8("XBZRLE encoding")?;
        if kind != ENCODING_XBZRLE {
            return Err(fail(kind_at, format!("wrong compression {kind}")));
        }
        let len_at = src.offset();
        let len = usize::from(src.be16("XBZRLE length")?);
        if len > ps {
            return Err(fail(
                len_at,
                format!("encoded length {len} is beyond the page size {ps}"),
            ));
        }
        let data_at = src.offset();
        src.fill(&mut self.encoded[..len], "XBZRLE data")?;
        if !self.full[bi].get(page) {
            return Err(fail(at, "the page was never sent in full before".into()));
        }
        block.read(offset, &mut self.page[..ps]);
        if let Err(e) = xbzrle::decode(&self.encoded[..len], &mut self.page[..ps]) {
            return Err(fail(data_at, e.to_string()));
        }
        block.load(offset, &self.page[..ps]);
        self.pages += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use vmigrate_stream::Source;

    use crate::incoming::ram_load::RamLoader;
    use crate::io::FdSource;
    use crate::memory::RamBlock;

    /// QEMU's `xbzrle.bin` (a `-M pc` guest bumping the first byte of 16 pages while a
    /// slow migration runs) loads page by page: every RAM section, all 696 XBZRLE pages.
    /// The device sections after the RAM are not loaded (no `pc` devices here).
    #[test]
    fn qemus_xbzrle_capture_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/qemu-oracle/captures/xbzrle.bin");
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let blocks: Vec<Arc<RamBlock>> = [
            ("pc.ram", 0x400_0000),
            ("/rom@etc/acpi/tables", 0x2_0000),
            ("pc.rom", 0x2_0000),
            ("pc.bios", 0x1_0000),
            ("/rom@etc/table-loader", 0x1000),
            ("/rom@etc/acpi/rsdp", 0x1000),
        ]
        .iter()
        .map(|(name, len)| Arc::new(RamBlock::anonymous(name, *len, 0).unwrap()))
        .collect();
        let mut loader = RamLoader::new(blocks.clone());
        let mut src = FdSource::new(file.into(), 0);
        src.skip(8, "header").unwrap();
        assert_eq!(src.u8("configuration").unwrap(), 0x07);
        let len = src.be32("machine length").unwrap();
        src.skip(u64::from(len), "machine").unwrap();
        let mut sections = 0;
        loop {
            match src.u8("record type").unwrap() {
                0x01 => {
                    src.be32("section id").unwrap();
                    assert_eq!(src.counted("idstr").unwrap(), "ram");
                    src.skip(8, "instance and version").unwrap();
                    loader.load_setup(&mut src).unwrap();
                }
                0x02 | 0x03 => {
                    src.be32("section id").unwrap();
                    loader
                        .load_records(&mut src)
                        .unwrap_or_else(|e| panic!("section {sections}: {e}"));
                }
                0x08 => {
                    src.be16("command").unwrap();
                    let len = src.be16("command length").unwrap();
                    src.skip(u64::from(len), "command body").unwrap();
                    continue;
                }
                0x04 => break,
                t => panic!("unexpected record type {t:#x}"),
            }
            assert_eq!(src.u8("footer").unwrap(), 0x7E);
            src.be32("footer id").unwrap();
            sections += 1;
        }
        assert_eq!(loader.xbzrle_pages(), 696);
        assert!(sections > 3);
        // The guest bumped byte 0 of pages 0x10000..0x1f000 and nothing else there.
        let ram = &blocks[0];
        let mut page = vec![0u8; 4096];
        for p in 0x10..0x20u64 {
            ram.read(p << 12, &mut page);
            assert_ne!(page[0], 0, "page {p:#x}");
            assert!(page[1..].iter().all(|b| *b == 0), "page {p:#x}");
        }
    }
}
