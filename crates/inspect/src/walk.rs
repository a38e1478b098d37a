//! The forward walk: header, configuration, then record after record, decoding the
//! bodies it knows (`ram`, `timer`, `globalstate`) and skipping the others by their
//! vmdesc size.
//!
//! Every length read from the file is checked against the bytes that remain before it
//! is used; page bodies are passed over without copying.

use std::collections::HashMap;

use vmigrate_stream::command::Command;
use vmigrate_stream::config::{Configuration, CONFIGURATION};
use vmigrate_stream::devices::{
    GlobalState, TimerState, GLOBALSTATE_IDSTR, GLOBALSTATE_VERSION, TIMER_IDSTR,
    TIMER_MIN_VERSION, TIMER_VERSION,
};
use vmigrate_stream::ram::{
    BlockEntry, MappedRamHeader, RamRecordHeader, RamRecordKind, RAM_IDSTR, RAM_SECTION_VERSION,
};
use vmigrate_stream::section::{self, Record, SectionId, VMDESCRIPTION};
use vmigrate_stream::{header, DecodeErrorKind, SliceSource, Source};

use crate::error::{InspectError, InspectErrorKind};
use crate::report::{
    BodyInfo, MappedRamInfo, Note, PageSizeSource, RamBlockInfo, RamCounts, RamSummary,
    RecordEntry, RecordInfo, Report, SectionInfo, SectionKind, VmdescSummary,
};
use crate::{commands, trailer, Options};

/// QEMU leaves the target page size implicit on x86 (12 bits, 4 KiB); other targets
/// send `configuration/target-page-bits`.
const DEFAULT_TARGET_PAGE_BITS: u32 = 12;
/// Target page sizes QEMU builds for span 1 KiB to 64 KiB; allow some room.
const PAGE_BITS_RANGE: std::ops::RangeInclusive<u32> = 9..=24;
/// QEMU's loader does not nest packages; a bound keeps a hostile file off the stack.
const MAX_PACKAGE_DEPTH: u8 = 4;
/// `timer` fields (§4.1): two be64 offsets around 8 unused bytes; version 1 lacks the
/// second offset.
const TIMER_FIELDS_LEN: u64 = 24;
const TIMER_V1_FIELDS_LEN: u64 = 16;
/// `globalstate` fields (§4.2): be32 size, 32-byte name, two flags, 66 unused bytes.
const GLOBALSTATE_FIELDS_LEN: u64 = 104;
/// The XBZRLE encoding byte QEMU writes.
const XBZRLE_ENCODING: u8 = 1;

/// How a (possibly packaged) record sequence ended.
enum WalkEnd {
    /// An EOF record at this offset.
    Eof(u64),
    /// POSTCOPY_RUN inside a package: the rest of the package is not read.
    PostcopyRun,
    /// A package's bytes ran out.
    PackageEnd,
}

pub(crate) fn run(data: &[u8], options: &Options) -> Report {
    let mut walker = Walker::new(data, options);
    if let Err(e) = walker.walk_file() {
        walker.report.end_offset = e.offset;
        walker.report.error = Some(e);
    }
    walker.finish()
}

struct Walker<'a> {
    data: &'a [u8],
    options: &'a Options,
    report: Report,
    /// Headers of START/FULL sections by section id, for PART/END.
    sections: HashMap<u32, SectionId>,
    /// Body sizes from the trailer by (idstr, instance); `None` when malformed.
    described: HashMap<(String, u32), Option<u64>>,
    ram: RamSummary,
    saw_ram: bool,
    /// Block index by name, for page records.
    block_index: HashMap<Vec<u8>, usize>,
    /// The block the last page record named (CONTINUE refers to it).
    current_block: Option<usize>,
    /// Whether a MEM_SIZE block list was read (then unknown names are errors).
    block_list_seen: bool,
    mapped_ram: bool,
    ignore_shared: bool,
    /// A POSTCOPY_RUN was read: the source switched to postcopy and sends no trailer.
    postcopy_ran: bool,
}

impl<'a> Walker<'a> {
    fn new(data: &'a [u8], options: &'a Options) -> Self {
        let file_len = data.len() as u64;
        let sections = options
            .known_sections
            .iter()
            .map(|(id, idstr)| {
                let s = SectionId {
                    section_id: *id,
                    idstr: idstr.clone(),
                    instance_id: 0,
                    version_id: 0,
                };
                (*id, s)
            })
            .collect();
        Self {
            data,
            options,
            report: Report {
                file_len,
                stream_offset: options.stream_offset,
                headerless: options.headerless,
                version: None,
                configuration: None,
                page_size: 1 << DEFAULT_TARGET_PAGE_BITS,
                page_size_source: PageSizeSource::Default,
                records: Vec::new(),
                records_omitted: 0,
                ram: None,
                vmdesc: None,
                eof_offset: None,
                notes: Vec::new(),
                end_offset: file_len,
                error: None,
            },
            sections,
            described: HashMap::new(),
            ram: RamSummary::default(),
            saw_ram: false,
            block_index: HashMap::new(),
            current_block: None,
            block_list_seen: false,
            mapped_ram: false,
            ignore_shared: false,
            postcopy_ran: false,
        }
    }

    fn finish(mut self) -> Report {
        if self.saw_ram {
            self.report.ram = Some(self.ram);
        }
        self.report
    }

    fn note(&mut self, offset: u64, message: impl Into<String>) {
        self.report.notes.push(Note {
            offset,
            message: message.into(),
        });
    }

    /// Keeps a record unless the cap is reached; returns its index.
    fn push(&mut self, offset: u64, depth: u8, record: RecordInfo) -> Option<usize> {
        if self.report.records.len() >= self.options.max_records {
            self.report.records_omitted += 1;
            return None;
        }
        self.report.records.push(RecordEntry {
            offset,
            depth,
            record,
        });
        Some(self.report.records.len() - 1)
    }

    fn walk_file(&mut self) -> Result<(), InspectError> {
        let file_len = self.data.len() as u64;
        let start = self.options.stream_offset;
        let start_index = usize::try_from(start)
            .ok()
            .filter(|s| *s <= self.data.len())
            .ok_or(InspectError::new(
                0,
                InspectErrorKind::OffsetPastEnd {
                    offset: start,
                    file_len,
                },
            ))?;
        self.report.vmdesc = trailer::locate(self.data, start_index);
        if let Some(v) = &self.report.vmdesc {
            for d in &v.devices {
                self.described
                    .entry((d.name.clone(), d.instance_id))
                    .or_insert(d.size);
            }
        }
        let mut src = SliceSource::with_base(&self.data[start_index..], start);
        if !self.options.headerless {
            header::decode_header(&mut src)?;
            self.report.version = Some(header::VERSION);
            self.configuration(&mut src)?;
        }
        self.choose_page_size();
        match self.walk_records(&mut src, 0)? {
            WalkEnd::Eof(at) => {
                self.report.eof_offset = Some(at);
                self.after_eof(&mut src)
            }
            WalkEnd::PostcopyRun | WalkEnd::PackageEnd => Ok(()),
        }
    }

    fn configuration(&mut self, src: &mut SliceSource<'a>) -> Result<(), InspectError> {
        if src.peek_u8()? != Some(CONFIGURATION) {
            let at = src.offset();
            self.note(
                at,
                "no configuration record after the header \
                 (a QEMU 10.0 destination refuses such a stream by default)",
            );
            return Ok(());
        }
        let at = src.offset();
        let cfg = Configuration::decode(src)?;
        if let Some(bits) = cfg.target_page_bits {
            if !PAGE_BITS_RANGE.contains(&bits) {
                return Err(InspectError::new(at, InspectErrorKind::BadPageBits(bits)));
            }
        }
        self.mapped_ram = cfg.has_capability("mapped-ram");
        self.ignore_shared = cfg.has_capability("x-ignore-shared");
        self.report.configuration = Some(cfg);
        Ok(())
    }

    /// Page bits from the configuration (already range-checked), else the trailer's
    /// page size, else the x86 default.
    fn choose_page_size(&mut self) {
        let bits = self
            .report
            .configuration
            .as_ref()
            .and_then(|c| c.target_page_bits);
        if let Some(bits) = bits {
            self.report.page_size = 1 << bits;
            self.report.page_size_source = PageSizeSource::Configuration;
        } else if let Some(ps) = self.report.vmdesc.as_ref().and_then(|v| v.page_size) {
            let usable = ps.is_power_of_two() && PAGE_BITS_RANGE.contains(&ps.trailing_zeros());
            if usable {
                self.report.page_size = ps;
                self.report.page_size_source = PageSizeSource::Vmdesc;
            }
        }
    }

    /// Walks records until EOF, or (in a package) until POSTCOPY_RUN or its end.
    fn walk_records(
        &mut self,
        src: &mut SliceSource<'a>,
        depth: u8,
    ) -> Result<WalkEnd, InspectError> {
        loop {
            let at = src.offset();
            if src.remaining().is_empty() {
                if depth > 0 {
                    return Ok(WalkEnd::PackageEnd);
                }
                return Err(InspectError::new(at, InspectErrorKind::MissingEof));
            }
            match Record::decode(src)? {
                Record::Eof => {
                    self.push(at, depth, RecordInfo::Eof);
                    return Ok(WalkEnd::Eof(at));
                }
                Record::Start(s) => self.section(src, at, depth, SectionKind::Start, s)?,
                Record::Full(s) => self.section(src, at, depth, SectionKind::Full, s)?,
                Record::Part(id) => {
                    let s = self.started_section(at, id)?;
                    self.section(src, at, depth, SectionKind::Part, s)?;
                }
                Record::End(id) => {
                    let s = self.started_section(at, id)?;
                    self.section(src, at, depth, SectionKind::End, s)?;
                }
                Record::Command(c) => {
                    self.command_notes(at, &c);
                    self.push(at, depth, RecordInfo::Command(c.clone()));
                    if c == Command::PostcopyRun {
                        self.postcopy_ran = true;
                    }
                    match c {
                        Command::Packaged(len) => self.package(src, at, depth, len)?,
                        Command::PostcopyRun if depth > 0 => {
                            if !src.remaining().is_empty() {
                                let n = src.remaining().len();
                                self.note(
                                    src.offset(),
                                    format!(
                                        "{n} bytes after POSTCOPY_RUN in the package are ignored"
                                    ),
                                );
                            }
                            return Ok(WalkEnd::PostcopyRun);
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// The header a PART/END refers to.
    fn started_section(&mut self, at: u64, id: u32) -> Result<SectionId, InspectError> {
        if let Some(s) = self.sections.get(&id) {
            return Ok(s.clone());
        }
        if self.options.headerless && self.options.known_sections.is_empty() {
            // A headerless channel (postcopy recovery) continues the one iterative
            // section QEMU migrates in practice.
            self.note(
                at,
                format!("section id {id} was never started here; taken to be 'ram'"),
            );
            let s = SectionId {
                section_id: id,
                idstr: RAM_IDSTR.to_string(),
                instance_id: 0,
                version_id: RAM_SECTION_VERSION,
            };
            self.sections.insert(id, s.clone());
            return Ok(s);
        }
        Err(InspectError::new(
            at,
            DecodeErrorKind::UnknownSectionId(id).into(),
        ))
    }

    fn command_notes(&mut self, at: u64, c: &Command) {
        if let Command::PostcopyAdvise(p) = c {
            if let Some((summary, target)) = commands::advise(p) {
                if target != self.report.page_size {
                    self.note(
                        at,
                        format!(
                            "POSTCOPY_ADVISE target page size {target} differs from {}",
                            self.report.page_size
                        ),
                    );
                }
                if summary & !self.report.page_size != 0 {
                    self.note(
                        at,
                        format!(
                            "RAM page sizes 0x{summary:x} include huge pages; their blocks \
                             carry a page size field this inspector does not read"
                        ),
                    );
                }
            }
        }
    }

    fn package(
        &mut self,
        src: &mut SliceSource<'a>,
        at: u64,
        depth: u8,
        len: u32,
    ) -> Result<(), InspectError> {
        if depth >= MAX_PACKAGE_DEPTH {
            return Err(InspectError::new(
                at,
                InspectErrorKind::PackageTooDeep(MAX_PACKAGE_DEPTH),
            ));
        }
        let blob_at = src.offset();
        let blob = src.take(len as usize, "packaged stream")?;
        let mut inner = SliceSource::with_base(blob, blob_at);
        if let WalkEnd::Eof(eof_at) = self.walk_records(&mut inner, depth + 1)? {
            self.note(eof_at, "EOF inside a packaged stream ends the package");
        }
        Ok(())
    }

    fn section(
        &mut self,
        src: &mut SliceSource<'a>,
        at: u64,
        depth: u8,
        kind: SectionKind,
        s: SectionId,
    ) -> Result<(), InspectError> {
        if matches!(kind, SectionKind::Start | SectionKind::Full) {
            if s.idstr.is_empty() {
                return Err(InspectError::new(
                    at,
                    DecodeErrorKind::EmptyName("section idstr").into(),
                ));
            }
            self.version_notes(at, &s);
            self.sections.insert(s.section_id, s.clone());
        }
        let body_offset = src.offset();
        let index = self.push(
            at,
            depth,
            RecordInfo::Section(SectionInfo {
                kind,
                section_id: s.section_id,
                idstr: s.idstr.clone(),
                instance_id: s.instance_id,
                version_id: s.version_id,
                body_offset,
                body_len: None,
                body: BodyInfo::Unread,
            }),
        );
        let (body, result) = self.body(src, kind, &s);
        let result = result.and_then(|()| {
            let footer_at = src.offset();
            section::decode_footer(src, s.section_id, &s.idstr)?;
            Ok(footer_at - body_offset)
        });
        if let Some(RecordInfo::Section(info)) = index.map(|i| &mut self.report.records[i].record) {
            info.body = body;
            info.body_len = result.as_ref().ok().copied();
        }
        result.map(|_| ())
    }

    fn version_notes(&mut self, at: u64, s: &SectionId) {
        let (local, minimum) = match s.idstr.as_str() {
            RAM_IDSTR => (RAM_SECTION_VERSION, RAM_SECTION_VERSION),
            TIMER_IDSTR => (TIMER_VERSION, TIMER_MIN_VERSION),
            GLOBALSTATE_IDSTR => (GLOBALSTATE_VERSION, GLOBALSTATE_VERSION),
            _ => return,
        };
        let kind = if s.version_id > local {
            DecodeErrorKind::UnsupportedSectionVersion {
                idstr: s.idstr.clone(),
                version: s.version_id,
                local,
            }
        } else if s.version_id < minimum {
            DecodeErrorKind::SectionVersionTooOld {
                idstr: s.idstr.clone(),
                version: s.version_id,
                minimum,
            }
        } else {
            return;
        };
        self.note(
            at,
            format!("{kind} (a QEMU 10.0 destination refuses it; read as v{local})"),
        );
    }

    /// Reads a section body. The body summary is returned even when reading failed, so
    /// that the report keeps the counts made before the break.
    fn body(
        &mut self,
        src: &mut SliceSource<'a>,
        kind: SectionKind,
        s: &SectionId,
    ) -> (BodyInfo, Result<(), InspectError>) {
        if s.idstr == RAM_IDSTR {
            let mut counts = RamCounts::default();
            let result = self.ram_body(src, &mut counts);
            return (BodyInfo::Ram(counts), result);
        }
        if kind != SectionKind::Full {
            let err = InspectError::new(
                src.offset(),
                InspectErrorKind::UnknownIterative(s.idstr.clone()),
            );
            return (BodyInfo::Unread, Err(err));
        }
        match self.device_body(src, s) {
            Ok(body) => (body, Ok(())),
            Err(e) => (BodyInfo::Unread, Err(e)),
        }
    }

    fn device_body(
        &mut self,
        src: &mut SliceSource<'a>,
        s: &SectionId,
    ) -> Result<BodyInfo, InspectError> {
        let body_at = src.offset();
        let described = self
            .described
            .get(&(s.idstr.clone(), s.instance_id))
            .copied();
        if described == Some(None) {
            return Err(InspectError::new(
                body_at,
                InspectErrorKind::BadDescription {
                    idstr: s.idstr.clone(),
                    instance: s.instance_id,
                },
            ));
        }
        let described = described.flatten();
        match s.idstr.as_str() {
            TIMER_IDSTR => {
                let version = s.version_id.min(TIMER_VERSION);
                let fields = if version >= 2 {
                    TIMER_FIELDS_LEN
                } else {
                    TIMER_V1_FIELDS_LEN
                };
                self.known_body(src, s, described, fields, |f| {
                    TimerState::decode(f, version)
                })
                .map(BodyInfo::Timer)
            }
            GLOBALSTATE_IDSTR => self
                .known_body(
                    src,
                    s,
                    described,
                    GLOBALSTATE_FIELDS_LEN,
                    GlobalState::decode,
                )
                .map(BodyInfo::GlobalState),
            _ => match described {
                Some(n) => {
                    src.skip(n, "device body")?;
                    Ok(BodyInfo::Skipped)
                }
                None => Err(InspectError::new(
                    body_at,
                    InspectErrorKind::Undescribed {
                        idstr: s.idstr.clone(),
                        instance: s.instance_id,
                    },
                )),
            },
        }
    }

    /// Decodes a body whose fields the stream crate knows. With a vmdesc size, the fields
    /// are decoded from their own bytes and any subsections after them are skipped.
    fn known_body<T>(
        &mut self,
        src: &mut SliceSource<'a>,
        s: &SectionId,
        described: Option<u64>,
        fields_len: u64,
        decode: impl FnOnce(&mut SliceSource<'a>) -> Result<T, vmigrate_stream::DecodeError>,
    ) -> Result<T, InspectError> {
        let body_at = src.offset();
        match described {
            Some(n) if n >= fields_len => {
                let body = src.take(n as usize, "device body")?;
                let mut fields = SliceSource::with_base(&body[..fields_len as usize], body_at);
                let value = decode(&mut fields)?;
                if n > fields_len {
                    self.note(
                        body_at + fields_len,
                        format!(
                            "{} bytes of '{}' subsections skipped using vmdesc",
                            n - fields_len,
                            s.idstr
                        ),
                    );
                }
                Ok(value)
            }
            Some(n) => {
                self.note(
                    body_at,
                    format!(
                        "vmdesc gives '{}' {n} bytes, fewer than its {fields_len} bytes of fields",
                        s.idstr
                    ),
                );
                Ok(decode(src)?)
            }
            None => Ok(decode(src)?),
        }
    }

    fn ram_body(
        &mut self,
        src: &mut SliceSource<'a>,
        counts: &mut RamCounts,
    ) -> Result<(), InspectError> {
        self.saw_ram = true;
        let page_size = self.report.page_size;
        loop {
            let at = src.offset();
            let h = RamRecordHeader::decode(src, page_size)?;
            let block = if h.names_block() {
                Some(self.named_block(src)?)
            } else if matches!(
                h.kind,
                RamRecordKind::Zero | RamRecordKind::Page | RamRecordKind::Xbzrle
            ) {
                Some(self.current_block.ok_or(InspectError::new(
                    at,
                    DecodeErrorKind::ContinueWithoutBlock.into(),
                ))?)
            } else {
                None
            };
            if let Some(b) = block {
                self.check_page_offset(at, b, h.addr)?;
            }
            match h.kind {
                RamRecordKind::MemSize => self.block_list(src, h.addr, counts)?,
                RamRecordKind::Zero => {
                    let fill_at = src.offset();
                    let fill = src.u8("zero page fill byte")?;
                    if fill != 0 {
                        return Err(InspectError::new(
                            fill_at,
                            DecodeErrorKind::NonZeroFill(fill).into(),
                        ));
                    }
                    counts.zero_pages += 1;
                    self.page_counted(block, |b| b.zero_pages += 1);
                }
                RamRecordKind::Page => {
                    src.skip(page_size, "page contents")?;
                    counts.normal_pages += 1;
                    self.page_counted(block, |b| b.normal_pages += 1);
                }
                RamRecordKind::Xbzrle => {
                    self.xbzrle_body(src)?;
                    counts.xbzrle_pages += 1;
                    self.page_counted(block, |b| b.xbzrle_pages += 1);
                }
                RamRecordKind::MultifdFlush => {
                    counts.multifd_flushes += 1;
                    self.ram.multifd_flushes += 1;
                }
                RamRecordKind::Eos => {
                    counts.eos += 1;
                    self.ram.eos += 1;
                    return Ok(());
                }
                RamRecordKind::Hook => {
                    return Err(InspectError::new(at, InspectErrorKind::RdmaHook));
                }
            }
        }
    }

    fn page_counted(&mut self, block: Option<usize>, count: impl FnOnce(&mut RamBlockInfo)) {
        if let Some(b) = block.and_then(|i| self.ram.blocks.get_mut(i)) {
            count(b);
        }
    }

    /// Reads the block name of a page record without allocating for known names.
    fn named_block(&mut self, src: &mut SliceSource<'a>) -> Result<usize, InspectError> {
        let at = src.offset();
        let len = src.u8("RAM block name")?;
        let name = src.take(len as usize, "RAM block name")?;
        if let Some(&i) = self.block_index.get(name) {
            self.current_block = Some(i);
            return Ok(i);
        }
        let printable = String::from_utf8_lossy(name).into_owned();
        if self.block_list_seen || name.is_empty() {
            return Err(InspectError::new(
                at,
                DecodeErrorKind::UnknownPageBlock(printable).into(),
            ));
        }
        self.note(
            at,
            format!("block '{printable}' is named by pages but no block list was read"),
        );
        let i = self.add_block(name, printable);
        self.current_block = Some(i);
        Ok(i)
    }

    fn add_block(&mut self, name: &[u8], idstr: String) -> usize {
        self.ram.blocks.push(RamBlockInfo {
            idstr,
            used_length: None,
            mr_addr: None,
            mapped_ram: None,
            zero_pages: 0,
            normal_pages: 0,
            xbzrle_pages: 0,
        });
        let i = self.ram.blocks.len() - 1;
        self.block_index.insert(name.to_vec(), i);
        i
    }

    fn check_page_offset(&self, at: u64, block: usize, addr: u64) -> Result<(), InspectError> {
        let b = &self.ram.blocks[block];
        match b.used_length {
            Some(len) if addr >= len => Err(InspectError::new(
                at,
                DecodeErrorKind::IllegalRamOffset {
                    idstr: b.idstr.clone(),
                    offset: addr,
                    len,
                }
                .into(),
            )),
            _ => Ok(()),
        }
    }

    fn xbzrle_body(&mut self, src: &mut SliceSource<'a>) -> Result<(), InspectError> {
        let at = src.offset();
        let encoding = src.u8("XBZRLE encoding")?;
        if encoding != XBZRLE_ENCODING {
            return Err(InspectError::new(
                at,
                InspectErrorKind::Xbzrle(format!("unknown encoding {encoding}")),
            ));
        }
        let len_at = src.offset();
        let len = u64::from(src.be16("XBZRLE length")?);
        if len > self.report.page_size {
            return Err(InspectError::new(
                len_at,
                InspectErrorKind::Xbzrle(format!(
                    "encoded length {len} exceeds the page size {}",
                    self.report.page_size
                )),
            ));
        }
        let data_at = src.offset();
        let data = src.take(len as usize, "XBZRLE data")?;
        // Each encoding is decoded in full (against a zero page: the runs' positions do
        // not depend on the old contents) so that a broken one is found here.
        let mut page = vec![0u8; self.report.page_size as usize];
        vmigrate_stream::xbzrle::decode(data, &mut page)
            .map_err(|e| InspectError::new(data_at, InspectErrorKind::Xbzrle(e.to_string())))?;
        Ok(())
    }

    /// The MEM_SIZE block list: entries until their lengths add up to `total`.
    fn block_list(
        &mut self,
        src: &mut SliceSource<'a>,
        total: u64,
        counts: &mut RamCounts,
    ) -> Result<(), InspectError> {
        counts.mem_size = Some(total);
        self.ram.mem_size = Some(total);
        self.block_list_seen = true;
        let mut listed = 0u64;
        while listed < total {
            let at = src.offset();
            let entry = match BlockEntry::decode_with(src, false, self.ignore_shared) {
                Err(e) if matches!(e.kind, DecodeErrorKind::EmptyName(_)) => {
                    return Err(InspectError::new(
                        at,
                        InspectErrorKind::BlockListShort { listed, total },
                    ));
                }
                other => other?,
            };
            listed = listed
                .checked_add(entry.used_length)
                .filter(|l| *l <= total)
                .ok_or(InspectError::new(
                    at,
                    DecodeErrorKind::BlockListOverrun { total }.into(),
                ))?;
            let mapped = if self.mapped_ram {
                Some(self.mapped_ram_region(src, &entry)?)
            } else {
                None
            };
            counts.blocks_listed += 1;
            self.list_block(at, entry, mapped);
        }
        Ok(())
    }

    fn list_block(&mut self, at: u64, entry: BlockEntry, mapped: Option<MappedRamInfo>) {
        let i = match self.block_index.get(entry.idstr.as_bytes()) {
            Some(&i) => {
                self.note(at, format!("block '{}' is listed again", entry.idstr));
                i
            }
            None => self.add_block(entry.idstr.as_bytes(), entry.idstr.clone()),
        };
        let b = &mut self.ram.blocks[i];
        b.used_length = Some(entry.used_length);
        b.mr_addr = entry.mr_addr;
        b.mapped_ram = mapped;
    }

    /// Reads a block's mapped-ram header, counts its bitmap, and jumps over its page area
    /// to where the stream resumes.
    fn mapped_ram_region(
        &mut self,
        src: &mut SliceSource<'a>,
        entry: &BlockEntry,
    ) -> Result<MappedRamInfo, InspectError> {
        let at = src.offset();
        let h = MappedRamHeader::decode(src)?;
        let header_end = src.offset();
        let fail = |detail: String| {
            InspectError::new(
                at,
                InspectErrorKind::MappedRam {
                    block: entry.idstr.clone(),
                    detail,
                },
            )
        };
        if h.version != MappedRamHeader::VERSION {
            return Err(fail(format!("unsupported version {}", h.version)));
        }
        if !h.page_size.is_power_of_two()
            || !PAGE_BITS_RANGE.contains(&h.page_size.trailing_zeros())
        {
            return Err(fail(format!("page size 0x{:x} is not usable", h.page_size)));
        }
        if h.page_size != self.report.page_size {
            self.note(
                at,
                format!(
                    "mapped-ram page size {} of block '{}' differs from the stream's {}",
                    h.page_size, entry.idstr, self.report.page_size
                ),
            );
        }
        if !entry.used_length.is_multiple_of(h.page_size) {
            return Err(fail(format!(
                "block length 0x{:x} is not a multiple of the page size",
                entry.used_length
            )));
        }
        let pages = entry.used_length / h.page_size;
        let bitmap_len = pages.div_ceil(64) * 8;
        let file_len = self.data.len() as u64;
        let bitmap_end = h
            .bitmap_offset
            .checked_add(bitmap_len)
            .filter(|e| *e <= file_len)
            .ok_or_else(|| {
                fail(format!(
                    "bitmap of {bitmap_len} bytes at 0x{:x} runs past the end of the file",
                    h.bitmap_offset
                ))
            })?;
        if h.bitmap_offset < header_end {
            return Err(fail(format!(
                "bitmap at 0x{:x} starts before the header ends at 0x{header_end:x}",
                h.bitmap_offset
            )));
        }
        if h.bitmap_offset != header_end {
            self.note(
                at,
                format!(
                    "bitmap of block '{}' is at 0x{:x}, not right after its header",
                    entry.idstr, h.bitmap_offset
                ),
            );
        }
        if h.pages_offset % h.page_size != 0 {
            return Err(fail(format!(
                "pages offset 0x{:x} is not page aligned",
                h.pages_offset
            )));
        }
        if h.pages_offset < bitmap_end {
            return Err(fail(format!(
                "pages offset 0x{:x} lies inside the bitmap",
                h.pages_offset
            )));
        }
        let resume = h
            .pages_offset
            .checked_add(entry.used_length)
            .filter(|r| *r <= file_len)
            .ok_or_else(|| {
                fail(format!(
                    "page area 0x{:x}+0x{:x} runs past the end of the file",
                    h.pages_offset, entry.used_length
                ))
            })?;
        // In bounds: checked against the file length above.
        let bitmap = &self.data[h.bitmap_offset as usize..bitmap_end as usize];
        let pages_present = count_set_bits(bitmap, pages);
        src.seek_to(resume)?;
        Ok(MappedRamInfo {
            header_offset: at,
            version: h.version,
            page_size: h.page_size,
            bitmap_offset: h.bitmap_offset,
            bitmap_len,
            pages_offset: h.pages_offset,
            pages,
            pages_present,
        })
    }

    /// After the top-level EOF: the VMDESCRIPTION trailer, which QEMU only warns about
    /// when it is missing or wrong.
    fn after_eof(&mut self, src: &mut SliceSource<'a>) -> Result<(), InspectError> {
        let at = src.offset();
        match src.peek_u8()? {
            None => {
                if self.report.vmdesc.is_some() {
                    // Found by the backward scan, yet not after EOF: the file is odd.
                    self.note(
                        at,
                        "the vmdesc trailer found at the end does not follow EOF",
                    );
                }
                if self.postcopy_ran {
                    self.note(
                        at,
                        "no VMDESCRIPTION trailer after EOF (as after every postcopy)",
                    );
                } else {
                    self.note(at, "no VMDESCRIPTION trailer after EOF");
                }
                return Ok(());
            }
            Some(VMDESCRIPTION) => {}
            Some(other) => {
                self.note(
                    at,
                    format!(
                        "{} ({} bytes after EOF not read)",
                        DecodeErrorKind::BadVmdescTag(other),
                        src.remaining().len()
                    ),
                );
                return Ok(());
            }
        }
        let found_here = self.report.vmdesc.as_ref().map(|v| v.offset) == Some(at);
        if !found_here {
            let summary = self.trailer_forward(src)?;
            self.report.vmdesc = Some(summary);
        }
        let json_len = self.report.vmdesc.as_ref().map_or(0, |v| v.json_len);
        src.skip(5 + u64::from(json_len), "vmdesc trailer")?;
        self.push(at, 0, RecordInfo::Vmdesc { json_len });
        if !src.remaining().is_empty() {
            let n = src.remaining().len();
            self.note(src.offset(), format!("{n} bytes after the vmdesc trailer"));
        }
        Ok(())
    }

    /// Reads a trailer after EOF that the backward scan did not find (it is followed by
    /// other bytes, or it is damaged).
    fn trailer_forward(
        &mut self,
        src: &mut SliceSource<'a>,
    ) -> Result<VmdescSummary, InspectError> {
        let mut probe = src.clone();
        let at = probe.offset();
        probe.u8("vmdesc tag")?;
        let len_at = probe.offset();
        let len = probe.be32("vmdesc length")?;
        if len > vmigrate_stream::vmdesc::MAX_VMDESC_LEN {
            return Err(InspectError::new(
                len_at,
                DecodeErrorKind::VmdescTooLarge(len).into(),
            ));
        }
        let text = probe.take(len as usize, "vmdesc JSON")?;
        // `at` is a file offset inside `data`: the probe just read past it.
        match trailer::parse_at(self.data, at as usize) {
            Some(summary) => Ok(summary),
            None => {
                let detail = serde_json::from_slice::<serde_json::Value>(text)
                    .err()
                    .map_or_else(|| "not a JSON object".to_string(), |e| e.to_string());
                Err(InspectError::new(
                    len_at + 4,
                    DecodeErrorKind::VmdescJson(detail).into(),
                ))
            }
        }
    }
}

/// Counts the set bits among the first `pages` bits of a little-endian word bitmap.
fn count_set_bits(bitmap: &[u8], pages: u64) -> u64 {
    let full_bytes = (pages / 8) as usize;
    let mut n: u64 = bitmap[..full_bytes]
        .chunks(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            u64::from(u64::from_le_bytes(w).count_ones())
        })
        .sum();
    let rest_bits = pages % 8;
    if rest_bits > 0 {
        let mask = (1u8 << rest_bits) - 1;
        n += u64::from((bitmap[full_bytes] & mask).count_ones());
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_count_stops_at_page_count() {
        let bitmap = [0xFFu8; 16];
        assert_eq!(count_set_bits(&bitmap, 128), 128);
        assert_eq!(count_set_bits(&bitmap, 70), 70);
        assert_eq!(count_set_bits(&bitmap, 3), 3);
        assert_eq!(count_set_bits(&bitmap, 0), 0);
        let mut bitmap = [0u8; 256];
        bitmap[0] = 0x0F;
        bitmap[12] = 0x10;
        bitmap[255] = 0x80;
        assert_eq!(count_set_bits(&bitmap, 2048), 6);
        assert_eq!(count_set_bits(&bitmap, 2047), 5);
    }
}
