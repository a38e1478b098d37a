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
