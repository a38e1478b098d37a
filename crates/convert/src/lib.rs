//! Rewrites a QEMU 10.0 migration file between the two layouts QEMU writes to files:
//!
//! - **plain**: the RAM pages travel inside the `ram` section bodies as PAGE and ZERO
//!   records, as over a socket;
//! - **mapped-ram**: every page of a block has a fixed offset in a sparse file, a bitmap
//!   says which pages hold contents, and the `ram` bodies carry no pages at all.
//!
//! Only the RAM changes. Every other record (device sections of any machine, commands,
//! EOF) is copied byte for byte; the configuration record gains or loses the
//! `mapped-ram` capability, which QEMU validates on load, and the vmdesc trailer's
//! description of that record follows (its device descriptions are kept). The input is first
//! walked by the inspector, so a damaged file is refused with the inspector's error and
//! the byte offset where it broke, before anything is written.
//!
//! [`convert_file`] never leaves a half-written output under its final name: it writes a
//! temporary file in the output's directory, syncs it and renames it into place.
//!
//! ```text
//! plain:      … START{MEM_SIZE, entries, EOS} PART{PAGE/ZERO…, EOS}… END{…, EOS} FULL… EOF vmdesc
//! mapped-ram: … START{MEM_SIZE, entry, header, ⟨bitmap, hole, pages⟩ …, EOS} PART{EOS}… END{EOS} FULL… EOF vmdesc
//! ```
//!
//! Going to plain, all pages are written in the `ram` END body: a page whose bitmap bit
//! is set becomes a PAGE record, every other page a ZERO record. Going to mapped-ram, a
//! page keeps the contents of its last PAGE record; a page whose last record was ZERO (or
//! that no record named) keeps a clear bit and a hole.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vmigrate_inspect::{InspectError, InspectErrorKind, RecordInfo, SectionKind};
use vmigrate_stream::command::Command;
use vmigrate_stream::config::Configuration;
use vmigrate_stream::ram::{
    put_eos, put_mem_size, put_page_header, put_zero_page, BlockEntry, MappedRamHeader,
    RamRecordHeader, RamRecordKind, FLAG_PAGE, MAPPED_RAM_HEADER_LEN, RAM_IDSTR,
};
use vmigrate_stream::{DecodeError, SliceSource, Source};

/// The capability that marks a mapped-ram file in the configuration record.
const MAPPED_RAM: &str = "mapped-ram";

/// QEMU starts every page area on a multiple of this absolute file offset.
const PAGES_ALIGNMENT: u64 = 1 << 20;

/// The trailer's tag byte and be32 length.
const VMDESC_HEADER_LEN: usize = 5;

/// Buffered stream bytes are written out once they reach this size.
const FLUSH_AT: usize = 1 << 20;

/// The two file layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Pages as records inside the `ram` sections.
    Plain,
    /// Pages at fixed offsets, with a bitmap per block.
    MappedRam,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Plain => "plain",
            Layout::MappedRam => "mapped-ram",
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a file could not be converted.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The inspector could not walk the input.
    #[error("damaged input: {0}")]
    Damaged(#[from] InspectError),
    /// The input is valid but holds something a file of the other layout cannot carry.
    #[error("{what} (at byte offset {offset}) cannot be converted")]
    Unsupported { offset: u64, what: String },
    #[error("the input is already a {0} file")]
    AlreadyThere(Layout),
    #[error("the input has a 'ram' section without an END section, so its pages have no place in a plain stream")]
    NoRamEnd,
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the output failed")]
    Write(#[source] std::io::Error),
}

impl From<DecodeError> for ConvertError {
    fn from(e: DecodeError) -> Self {
        ConvertError::Damaged(e.into())
    }
}

impl From<std::io::Error> for ConvertError {
    fn from(e: std::io::Error) -> Self {
        ConvertError::Write(e)
    }
}

/// What a conversion did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Layout of the input.
    pub from: Option<Layout>,
    /// RAM blocks in the block list.
    pub blocks: usize,
    /// Pages whose contents are in the output.
    pub pages_with_contents: u64,
    /// Pages of all blocks.
    pub pages_total: u64,
    /// Records copied unchanged (device sections, commands, EOF, trailer).
    pub records_copied: usize,
    /// Size of the output file.
    pub output_len: u64,
}

/// Converts the file at `input` into `output` (a new file, or one that is replaced).
/// On failure nothing exists under `output` that was not there before.
pub fn convert_file(input: &Path, output: &Path, to: Layout) -> Result<Summary, ConvertError> {
    let map =
        vmigrate_engine::memory::MappedFile::open(input).map_err(|source| ConvertError::Io {
            what: "read",
            path: input.to_path_buf(),
            source,
        })?;
    let temp = TempOutput::create(output)?;
    let summary = convert_bytes(map.bytes(), &temp.file, to)?;
    temp.commit()?;
    Ok(summary)
}

/// Converts a whole file held in memory, writing the result to `out` (which should be
/// empty) with positional writes.
pub fn convert_bytes(input: &[u8], out: &File, to: Layout) -> Result<Summary, ConvertError> {
    let options = vmigrate_inspect::Options {
        max_records: usize::MAX,
        ..Default::default()
    };
    let report = vmigrate_inspect::inspect_with(input, &options);
    if let Some(e) = report.error {
        return Err(e.into());
    }
    if report.eof_offset.is_none() {
        return Err(InspectError::new(report.end_offset, InspectErrorKind::MissingEof).into());
    }
    let mut src = SliceSource::new(input);
    src.seek_to(8)?;
    let mut config = Configuration::decode(&mut src)?;
    let from = if config.has_capability(MAPPED_RAM) {
        Layout::MappedRam
    } else {
        Layout::Plain
    };
    if from == to {
        return Err(ConvertError::AlreadyThere(to));
    }
    let mut conv = Converter {
        input,
        to,
        page_size: report.page_size,
        ignore_shared: config.has_capability("x-ignore-shared"),
        blocks: Vec::new(),
        by_name: HashMap::new(),
        current: None,
        out: Output::new(out),
        summary: Summary {
            from: Some(from),
            ..Summary::default()
        },
    };

    conv.out.put(&input[..8])?;
    match to {
        Layout::MappedRam => config.capabilities.push(MAPPED_RAM.to_string()),
        Layout::Plain => config.capabilities.retain(|c| c != MAPPED_RAM),
    }
    config.encode(&mut conv.out.buf);

    let top: Vec<_> = report.records.iter().filter(|r| r.depth == 0).collect();
    if let Some(nested) = report.records.iter().find(|r| r.depth > 0) {
        return Err(ConvertError::Unsupported {
            offset: nested.offset,
            what: "a packaged (postcopy) stream".to_string(),
        });
    }
    let mut ram_end_seen = false;
    for (i, rec) in top.iter().enumerate() {
        let end = top
            .get(i + 1)
            .map_or(input.len() as u64, |next| next.offset) as usize;
        match &rec.record {
            RecordInfo::Section(s) if s.idstr == RAM_IDSTR && s.kind != SectionKind::Full => {
                // The walk succeeded, so every body has a length.
                let body_end = s.body_offset + s.body_len.unwrap_or_default();
                conv.out
                    .put(&input[rec.offset as usize..s.body_offset as usize])?;
                let is_end = s.kind == SectionKind::End;
                conv.ram_body(s.body_offset, is_end)?;
                ram_end_seen |= is_end;
                conv.out.put(&input[body_end as usize..end])?;
            }
            RecordInfo::Vmdesc { .. } => {
                let json = &input[rec.offset as usize + VMDESC_HEADER_LEN..end];
                conv.out.put(
                    &vmdesc_for(json, &config)
                        .unwrap_or_else(|| input[rec.offset as usize..end].to_vec()),
                )?;
                conv.summary.records_copied += 1;
            }
            RecordInfo::Command(c) if is_postcopy(c) => {
                return Err(ConvertError::Unsupported {
                    offset: rec.offset,
                    what: format!("command {}", c.name()),
                });
            }
            _ => {
                conv.out.put(&input[rec.offset as usize..end])?;
                conv.summary.records_copied += 1;
            }
        }
    }
    if !conv.blocks.is_empty() && !ram_end_seen {
        return Err(ConvertError::NoRamEnd);
    }
    conv.out.flush()?;
    conv.summary.output_len = conv.out.pos();
    Ok(conv.summary)
}

/// The vmdesc trailer with its `configuration` member describing the new configuration
/// record, as QEMU describes it; the device descriptions stay as they were. `None` when
/// the trailer has no configuration member (it is then copied unchanged).
fn vmdesc_for(json: &[u8], config: &Configuration) -> Option<Vec<u8>> {
    let mut desc: serde_json::Value = serde_json::from_slice(json).ok()?;
    let member = desc.get_mut("configuration")?;
    *member = config.describe();
    let mut out = Vec::new();
    vmigrate_stream::vmdesc::encode(&mut out, &desc);
    Some(out)
}

fn is_postcopy(c: &Command) -> bool {
    matches!(
        c,
        Command::PostcopyAdvise(_)
            | Command::PostcopyListen
            | Command::PostcopyRun
            | Command::PostcopyRamDiscard(_)
            | Command::Packaged(_)
            | Command::PostcopyResume
            | Command::RecvBitmap(_)
    )
}

/// Where one block's bitmap and pages live in a mapped-ram file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    bitmap_offset: u64,
    pages_offset: u64,
    page_size: u64,
    used_length: u64,
}

impl Region {
    /// QEMU's layout for a block whose header starts at `header_at`: the bitmap right
    /// after the header, the pages at the next 1 MiB boundary.
    fn plan(header_at: u64, used_length: u64, page_size: u64) -> Self {
        let bitmap_offset = header_at + MAPPED_RAM_HEADER_LEN as u64;
        let mut region = Self {
            bitmap_offset,
            pages_offset: 0,
            page_size,
            used_length,
        };
        region.pages_offset =
            (bitmap_offset + region.bitmap_len()).next_multiple_of(PAGES_ALIGNMENT);
        region
    }

    /// Whole 64-bit words, one bit per page.
    fn bitmap_len(&self) -> u64 {
        (self.used_length / self.page_size).div_ceil(64) * 8
    }

    /// Where the main stream continues after this block.
    fn end(&self) -> u64 {
        self.pages_offset + self.used_length
    }

    fn header(&self) -> MappedRamHeader {
        MappedRamHeader {
            version: MappedRamHeader::VERSION,
            page_size: self.page_size,
            bitmap_offset: self.bitmap_offset,
            pages_offset: self.pages_offset,
        }
    }
}

/// One RAM block of the block list, where its pages are in the input and the output.
#[derive(Debug)]
struct Block {
    idstr: String,
    used_length: u64,
    /// The input's mapped-ram region.
    input_region: Option<Region>,
    /// The output's mapped-ram region.
    output_region: Option<Region>,
    /// Output bitmap words (mapped-ram output): pages whose contents are in the file.
    present: Vec<u64>,
}

#[derive(Debug)]
struct Converter<'a> {
    input: &'a [u8],
    to: Layout,
    page_size: u64,
    ignore_shared: bool,
    blocks: Vec<Block>,
    by_name: HashMap<String, usize>,
    /// The block the last page record named (what CONTINUE refers to).
    current: Option<usize>,
    out: Output<'a>,
    summary: Summary,
}

impl<'a> Converter<'a> {
    /// Reads one `ram` body at `offset` and writes its converted form.
    fn ram_body(&mut self, offset: u64, is_end: bool) -> Result<(), ConvertError> {
        let mut src = SliceSource::new(self.input);
        src.seek_to(offset)?;
        loop {
            let at = src.offset();
            let h = RamRecordHeader::decode(&mut src, self.page_size)?;
            let is_page = matches!(
                h.kind,
                RamRecordKind::Zero | RamRecordKind::Page | RamRecordKind::Xbzrle
            );
            if h.names_block() {
                let name = src.counted("RAM block name")?;
                self.current = self.by_name.get(&name).copied();
            }
            let block = match (is_page, self.current) {
                (true, Some(b)) => b,
                (true, None) => {
                    return Err(ConvertError::Unsupported {
                        offset: at,
                        what: "a page of a block missing from the block list".to_string(),
                    })
                }
                (false, _) => usize::MAX,
            };
            match h.kind {
                RamRecordKind::MemSize => self.block_list(&mut src, h.addr)?,
                RamRecordKind::Zero => {
                    src.u8("zero page fill byte")?;
                    self.zero_page(block, h.addr);
                }
                RamRecordKind::Page => {
                    let data = src.take(self.page_size as usize, "page contents")?;
                    self.page(at, block, h.addr, data)?;
                }
                RamRecordKind::Xbzrle => {
                    return Err(ConvertError::Unsupported {
                        offset: at,
                        what: "an XBZRLE page".to_string(),
                    })
                }
                RamRecordKind::Hook => {
                    return Err(ConvertError::Unsupported {
                        offset: at,
                        what: "an RDMA hook record".to_string(),
                    })
                }
                // Sync points of multifd over sockets: a file has nothing to sync.
                RamRecordKind::MultifdFlush => {}
                RamRecordKind::Eos => {
                    if is_end {
                        self.finish_ram()?;
                    }
                    put_eos(&mut self.out.buf);
                    return Ok(self.out.maybe_flush()?);
                }
            }
        }
    }

    /// The MEM_SIZE block list, with or without mapped-ram headers and regions.
    fn block_list(&mut self, src: &mut SliceSource<'a>, total: u64) -> Result<(), ConvertError> {
        put_mem_size(&mut self.out.buf, total);
        let mut listed = 0u64;
        while listed < total {
            let at = src.offset();
            let entry = BlockEntry::decode_with(src, false, self.ignore_shared)?;
            listed = listed.saturating_add(entry.used_length);
            let input_region = if self.to == Layout::Plain {
                let h = MappedRamHeader::decode(src)?;
                let region = Region {
                    bitmap_offset: h.bitmap_offset,
                    pages_offset: h.pages_offset,
                    page_size: h.page_size,
                    used_length: entry.used_length,
                };
                if h.page_size != self.page_size {
                    return Err(ConvertError::Unsupported {
                        offset: at,
                        what: format!(
                            "block '{}' with mapped-ram page size {} (the stream's is {})",
                            entry.idstr, h.page_size, self.page_size
                        ),
                    });
                }
                // The inspector checked that the region lies inside the file.
                src.seek_to(region.end())?;
                Some(region)
            } else {
                None
            };
            entry.encode(&mut self.out.buf);
            let output_region = if self.to == Layout::MappedRam {
                let region = Region::plan(self.out.pos(), entry.used_length, self.page_size);
                region.header().encode(&mut self.out.buf);
                self.out.jump_to(region.end())?;
                Some(region)
            } else {
                None
            };
            let pages = entry.used_length / self.page_size;
            self.summary.pages_total += pages;
            if self.by_name.contains_key(&entry.idstr) {
                return Err(ConvertError::Unsupported {
                    offset: at,
                    what: format!("block '{}' listed twice", entry.idstr),
                });
            }
            self.by_name.insert(entry.idstr.clone(), self.blocks.len());
            self.blocks.push(Block {
                idstr: entry.idstr,
                used_length: entry.used_length,
                input_region,
                output_region,
                present: vec![0; pages.div_ceil(64) as usize],
            });
        }
        self.summary.blocks = self.blocks.len();
        Ok(())
    }

    fn zero_page(&mut self, block: usize, addr: u64) {
        let b = &mut self.blocks[block];
        let page = (addr / self.page_size) as usize;
        if let Some(w) = b.present.get_mut(page / 64) {
            *w &= !(1u64 << (page % 64));
        }
    }

    fn page(&mut self, at: u64, block: usize, addr: u64, data: &[u8]) -> Result<(), ConvertError> {
        let b = &mut self.blocks[block];
        let Some(region) = b.output_region else {
            return Err(ConvertError::Unsupported {
                offset: at,
                what: "a page record in a mapped-ram stream".to_string(),
            });
        };
        if addr + self.page_size > b.used_length {
            return Err(ConvertError::Unsupported {
                offset: at,
                what: format!(
                    "a page at 0x{addr:x} that ends past block '{}' (0x{:x} bytes)",
                    b.idstr, b.used_length
                ),
            });
        }
        self.out.write_at(data, region.pages_offset + addr)?;
        let page = (addr / self.page_size) as usize;
        b.present[page / 64] |= 1u64 << (page % 64);
        Ok(())
    }

    /// At the end of the `ram` END body: the bitmaps (mapped-ram output), or every page
    /// of every block (plain output).
    fn finish_ram(&mut self) -> Result<(), ConvertError> {
        match self.to {
            Layout::MappedRam => {
                for b in &self.blocks {
                    let Some(region) = b.output_region else {
                        continue;
                    };
                    let bytes: Vec<u8> = b.present.iter().flat_map(|w| w.to_le_bytes()).collect();
                    self.out.write_at(&bytes, region.bitmap_offset)?;
                    self.summary.pages_with_contents += b
                        .present
                        .iter()
                        .map(|w| u64::from(w.count_ones()))
                        .sum::<u64>();
                }
            }
            Layout::Plain => {
                for bi in 0..self.blocks.len() {
                    self.emit_pages(bi)?;
                }
            }
        }
        Ok(())
    }

    /// Writes all pages of a mapped-ram input block as PAGE and ZERO records.
    fn emit_pages(&mut self, bi: usize) -> Result<(), ConvertError> {
        let b = &self.blocks[bi];
        let Some(region) = b.input_region else {
            return Ok(());
        };
        let ps = self.page_size as usize;
        let pages = (b.used_length / self.page_size) as usize;
        let bitmap_at = region.bitmap_offset as usize;
        // Checked by the inspector: the bitmap and the page area lie inside the file.
        let bitmap = &self.input[bitmap_at..bitmap_at + region.bitmap_len() as usize];
        let pages_at = region.pages_offset as usize;
        let idstr = b.idstr.clone();
        for page in 0..pages {
            let name = (page == 0).then_some(idstr.as_str());
            let addr = (page * ps) as u64;
            if bitmap[page / 8] & (1 << (page % 8)) != 0 {
                put_page_header(&mut self.out.buf, addr, FLAG_PAGE, name);
                let start = pages_at + page * ps;
                self.out
                    .buf
                    .extend_from_slice(&self.input[start..start + ps]);
                self.summary.pages_with_contents += 1;
            } else {
                put_zero_page(&mut self.out.buf, addr, name);
            }
            self.out.maybe_flush()?;
        }
        self.current = Some(bi);
        Ok(())
    }
}

/// The output file: a buffered sequential stream that may jump forward (over mapped-ram
/// regions), plus positional writes for pages and bitmaps.
#[derive(Debug)]
struct Output<'f> {
    file: &'f File,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    buf_start: u64,
}

impl<'f> Output<'f> {
    fn new(file: &'f File) -> Self {
        Self {
            file,
            buf: Vec::with_capacity(FLUSH_AT + (64 << 10)),
            buf_start: 0,
        }
    }

    fn pos(&self) -> u64 {
        self.buf_start + self.buf.len() as u64
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if bytes.len() >= FLUSH_AT {
            self.flush()?;
            self.file.write_all_at(bytes, self.buf_start)?;
            self.buf_start += bytes.len() as u64;
            return Ok(());
        }
        self.buf.extend_from_slice(bytes);
        self.maybe_flush()
    }

    fn maybe_flush(&mut self) -> std::io::Result<()> {
        if self.buf.len() >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.write_all_at(&self.buf, self.buf_start)?;
        self.buf_start += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Continues the stream at `pos` (past a hole).
    fn jump_to(&mut self, pos: u64) -> std::io::Result<()> {
        self.flush()?;
        self.buf_start = pos;
        Ok(())
    }

    fn write_at(&self, bytes: &[u8], pos: u64) -> std::io::Result<()> {
        self.file.write_all_at(bytes, pos)
    }
}

/// A temporary file next to the output, removed unless committed.
#[derive(Debug)]
struct TempOutput {
    file: File,
    temp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl TempOutput {
    fn create(target: &Path) -> Result<Self, ConvertError> {
        let name = target.file_name().ok_or_else(|| ConvertError::Io {
            what: "write to",
            path: target.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
        })?;
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".convert-{}.tmp", std::process::id()));
        let temp = target.with_file_name(temp_name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|source| ConvertError::Io {
                what: "create",
                path: temp.clone(),
                source,
            })?;
        Ok(Self {
            file,
            temp,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    /// Syncs the file, renames it to the target and syncs the directory.
    fn commit(mut self) -> Result<(), ConvertError> {
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| ConvertError::Io { what, path, source }
        };
        self.file.sync_all().map_err(io("sync", &self.temp))?;
        std::fs::rename(&self.temp, &self.target).map_err(io("rename to", &self.target))?;
        self.committed = true;
        let dir = match self.target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync", &dir))?;
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the temporary name is ours alone.
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests;
