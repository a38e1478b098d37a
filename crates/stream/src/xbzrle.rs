//! XBZRLE: a page encoded as its difference from the copy the other side already holds.
//!
//! The encoding is a sequence of pairs: a ULEB128 count of unchanged bytes (the skip),
//! a ULEB128 count `n ≥ 1` of changed bytes, then those `n` new bytes. Counts take one or
//! two bytes (values up to 0x3FFF). Unchanged bytes at the end of the page are not
//! encoded; a page equal to the old one encodes to nothing. The runs are maximal: each
//! changed run ends at the first unchanged byte, each skip at the first changed byte, so
//! for two given pages there is exactly one encoding, the one QEMU 10.0 writes.
//!
//! The record around an encoding (`u8` encoding kind, `be16` length) is written by the
//! RAM saver; see [`ENCODING_XBZRLE`].

use std::fmt;

/// The encoding kind byte that precedes the length of an XBZRLE page.
pub const ENCODING_XBZRLE: u8 = 1;

/// The largest count a one- or two-byte ULEB128 can carry.
const MAX_SMALL_ULEB: usize = 0x3FFF;

/// What [`encode`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoded {
    /// The page equals the old one: nothing to send.
    Unchanged,
    /// The encoding would not fit in the output buffer: send the page whole.
    Overflow,
    /// The first `n` bytes of the output buffer hold the encoding.
    Len(usize),
}

/// Every low byte of a word set: the constant of the zero-byte test.
const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

#[inline(always)]
fn word(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    // Little-endian so that the lowest set bit names the first byte in memory order.
    u64::from_le_bytes(b)
}

/// Index of the first byte at or after `from` where `old` and `new` differ, or `len`.
#[inline(always)]
fn first_difference(old: &[u8], new: &[u8], mut from: usize) -> usize {
    let len = new.len();
    while from + 8 <= len {
        let x = word(old, from) ^ word(new, from);
        if x != 0 {
            return from + (x.trailing_zeros() / 8) as usize;
        }
        from += 8;
    }
    while from < len && old[from] == new[from] {
        from += 1;
    }
    from
}

/// Index of the first byte at or after `from` where `old` and `new` agree, or `len`.
#[inline(always)]
fn first_agreement(old: &[u8], new: &[u8], mut from: usize) -> usize {
    let len = new.len();
    while from + 8 <= len {
        let x = word(old, from) ^ word(new, from);
        // A zero byte of `x` is an agreeing byte. The borrow of the subtraction can only
        // flag bytes above the first zero byte, so the lowest flag is exact.
        let zeros = x.wrapping_sub(ONES) & !x & HIGHS;
        if zeros != 0 {
            return from + (zeros.trailing_zeros() / 8) as usize;
        }
        from += 8;
    }
    while from < len && old[from] != new[from] {
        from += 1;
    }
    from
}

/// Writes `v` (≤ 0x3FFF) as a one- or two-byte ULEB128 at `out[at..]`; returns its size.
#[inline(always)]
fn put_uleb(out: &mut [u8], at: usize, v: usize) -> usize {
    debug_assert!(v <= MAX_SMALL_ULEB);
    if v < 0x80 {
        out[at] = v as u8;
        1
    } else {
        out[at] = (v as u8 & 0x7F) | 0x80;
        out[at + 1] = (v >> 7) as u8;
        2
    }
}

/// Encodes `new` against `old` (same length, at most 0x3FFF bytes) into `out`, whose
/// length is the limit: an encoding longer than `out` is [`Encoded::Overflow`]. The
/// limit is checked where QEMU checks it (room for two count bytes before each count
/// pair, room for the run before its bytes), so both give up on the same pages.
///
/// `new` may be guest memory that changes while it is read. The encoding is then still
/// well formed (no empty run, no empty skip after the first, nothing past the page) and
/// its runs carry the bytes as they were copied; apply it with [`decode`] to the copy
/// the other side holds to keep that copy exact.
///
/// On x86-64 CPUs with AVX2 (detected at run time) the scans for changed and unchanged
/// bytes compare 32 bytes at a time; elsewhere they compare words. Both give the same
/// bytes as [`encode_portable`].
pub fn encode(old: &[u8], new: &[u8], out: &mut [u8]) -> Encoded {
    check_pages(old, new);
    encode_dispatch(old, new, out)
}

/// [`encode`], and each run also written into `old` as it is copied to `out`: when the
/// result is [`Encoded::Len`], `old` is then what [`decode`] of the encoding into `old`
/// would have made of it, without a second pass over the runs. On
/// [`Encoded::Unchanged`] `old` is as it was; on [`Encoded::Overflow`] it holds part of
/// the runs and must be rewritten whole.
pub fn encode_applying(old: &mut [u8], new: &[u8], out: &mut [u8]) -> Encoded {
    check_pages(old, new);
    encode_dispatch(old, new, out)
}

fn encode_dispatch<B: Base>(old: B, new: &[u8], out: &mut [u8]) -> Encoded {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { x86::encode_avx2(old, new, out) };
    }
    encode_with::<false, B>(old, new, out)
}

/// [`encode`] with word-at-a-time scans only, whatever the CPU.
pub fn encode_portable(old: &[u8], new: &[u8], out: &mut [u8]) -> Encoded {
    check_pages(old, new);
    encode_with::<false, _>(old, new, out)
}

/// The page an encoding is made against: read by the scans, and given each run as it
/// is emitted (kept by a mutable page, ignored by a shared one).
trait Base {
    fn bytes(&self) -> &[u8];
    fn apply(&mut self, at: usize, run: &[u8]);
}

impl Base for &[u8] {
    #[inline(always)]
    fn bytes(&self) -> &[u8] {
        self
    }

    #[inline(always)]
    fn apply(&mut self, _at: usize, _run: &[u8]) {}
}

impl Base for &mut [u8] {
    #[inline(always)]
    fn bytes(&self) -> &[u8] {
        self
    }

    #[inline(always)]
    fn apply(&mut self, at: usize, run: &[u8]) {
        let to = &mut self[at..at + run.len()];
        if run.len() <= 8 {
            for (o, b) in to.iter_mut().zip(run) {
                *o = *b;
            }
        } else {
            to.copy_from_slice(run);
        }
    }
}

fn check_pages(old: &[u8], new: &[u8]) {
    assert_eq!(old.len(), new.len(), "XBZRLE pages of different sizes");
    assert!(new.len() <= MAX_SMALL_ULEB, "XBZRLE page too large");
}

/// The first difference at or after `from`, with AVX2 when `AVX2`.
#[inline(always)]
fn find_difference<const AVX2: bool>(old: &[u8], new: &[u8], from: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: `encode_with::<true>` runs only inside `x86::encode_avx2`, which is
        // called only once AVX2 was detected.
        return unsafe { x86::first_difference(old, new, from) };
    }
    first_difference(old, new, from)
}

/// The first agreement at or after `from`, with AVX2 when `AVX2`.
#[inline(always)]
fn find_agreement<const AVX2: bool>(old: &[u8], new: &[u8], from: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: as in `find_difference`.
        return unsafe { x86::first_agreement(old, new, from) };
    }
    first_agreement(old, new, from)
}

/// The encoder, its scans chosen by `AVX2`. `old` and `new` have the same length.
#[inline(always)]
fn encode_with<const AVX2: bool, B: Base>(mut base: B, new: &[u8], out: &mut [u8]) -> Encoded {
    let len = new.len();
    let limit = out.len();
    let mut d = 0;
    let mut i = 0;
    while i < len {
        if d + 2 > limit {
            return Encoded::Overflow;
        }
        // After a run, byte `i` agreed when it was scanned; the scan for the next change
        // starts past it, so that a skip after the first is never empty even if `new`
        // changed since (guest memory read live).
        let from = if i == 0 { 0 } else { i + 1 };
        let old = base.bytes();
        let changed = find_difference::<AVX2>(old, new, from);
        let skip = changed - i;
        if skip == len {
            return Encoded::Unchanged;
        }
        if changed == len {
            return Encoded::Len(d);
        }
        d += put_uleb(out, d, skip);
        if d + 2 > limit {
            return Encoded::Overflow;
        }
        // Runs of one byte are the usual case (a counter or tag per word): check the
        // next byte before a wide scan. The run takes byte `changed` whatever a second
        // read of it would say, so it is never empty.
        let end = if changed + 1 < len && old[changed + 1] == new[changed + 1] {
            changed + 1
        } else {
            find_agreement::<AVX2>(old, new, changed + 1)
        };
        let n = end - changed;
        d += put_uleb(out, d, n);
        if d + n > limit {
            return Encoded::Overflow;
        }
        copy_once(&mut out[d..d + n], &new[changed..end]);
        // What is applied is what was copied out, not a second read of `new`.
        base.apply(changed, &out[d..d + n]);
        d += n;
        i = end;
    }
    Encoded::Len(d)
}

/// Copies `run` into `out` reading each byte exactly once. `run` may be guest memory
/// that changes meanwhile: with plain loads the compiler may read it again where it
/// uses the copy (it takes a shared slice for unchanging), so the bytes applied to the
/// cached copy could differ from those sent. Volatile loads are never repeated.
#[inline(always)]
fn copy_once(out: &mut [u8], run: &[u8]) {
    debug_assert_eq!(out.len(), run.len());
    let src = run.as_ptr();
    let mut k = 0;
    while k + 8 <= run.len() {
        // SAFETY: `k + 8 <= run.len()`, so the 8 bytes are inside `run`; `[u8; 8]` has
        // alignment 1.
        let w = unsafe { std::ptr::read_volatile(src.add(k).cast::<[u8; 8]>()) };
        out[k..k + 8].copy_from_slice(&w);
        k += 8;
    }
    while k < run.len() {
        // SAFETY: `k < run.len()`.
        out[k] = unsafe { std::ptr::read_volatile(src.add(k)) };
        k += 1;
    }
}

/// The AVX2 scans: 32 bytes compared per instruction, the rest by the word scans.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{__m256i, _mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_movemask_epi8};

    /// The encoder with AVX2 scans.
    ///
    /// # Safety
    ///
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn encode_avx2<B: super::Base>(
        old: B,
        new: &[u8],
        out: &mut [u8],
    ) -> super::Encoded {
        super::encode_with::<true, B>(old, new, out)
    }

    /// Bit `i` set where byte `at + i` of `old` and `new` agree.
    ///
    /// # Safety
    ///
    /// AVX2, and `at + 32` at most the length of both slices.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn agreeing(old: &[u8], new: &[u8], at: usize) -> u32 {
        // SAFETY: `at + 32 <= len` for both slices (the caller's promise), so each
        // 32-byte load stays inside its slice; `loadu` has no alignment requirement.
        let (a, b) = unsafe {
            (
                _mm256_loadu_si256(old.as_ptr().add(at).cast::<__m256i>()),
                _mm256_loadu_si256(new.as_ptr().add(at).cast::<__m256i>()),
            )
        };
        _mm256_movemask_epi8(_mm256_cmpeq_epi8(a, b)) as u32
    }

    /// [`super::first_difference`] 32 bytes at a time.
    ///
    /// # Safety
    ///
    /// The CPU must support AVX2; `old` and `new` have the same length.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn first_difference(old: &[u8], new: &[u8], mut from: usize) -> usize {
        let len = new.len().min(old.len());
        // Short skips (between word tags) are found by one word compare.
        if from + 8 <= len {
            let x = super::word(old, from) ^ super::word(new, from);
            if x != 0 {
                return from + (x.trailing_zeros() / 8) as usize;
            }
            from += 8;
        }
        while from + 32 <= len {
            // SAFETY: AVX2 is there (the caller's promise) and `from + 32 <= len`.
            let same = unsafe { agreeing(old, new, from) };
            if same != u32::MAX {
                return from + (!same).trailing_zeros() as usize;
            }
            from += 32;
        }
        super::first_difference(old, new, from)
    }

    /// [`super::first_agreement`] 32 bytes at a time.
    ///
    /// # Safety
    ///
    /// As [`first_difference`].
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn first_agreement(old: &[u8], new: &[u8], mut from: usize) -> usize {
        let len = new.len().min(old.len());
        // Short runs end within a word: one word compare finds them.
        if from + 8 <= len {
            let x = super::word(old, from) ^ super::word(new, from);
            let zeros = x.wrapping_sub(super::ONES) & !x & super::HIGHS;
            if zeros != 0 {
                return from + (zeros.trailing_zeros() / 8) as usize;
            }
            from += 8;
        }
        while from + 32 <= len {
            // SAFETY: AVX2 is there (the caller's promise) and `from + 32 <= len`.
            let same = unsafe { agreeing(old, new, from) };
            if same != 0 {
                return from + same.trailing_zeros() as usize;
            }
            from += 32;
        }
        super::first_agreement(old, new, from)
    }
}

/// Why an encoded page was refused. Offsets are into the encoded bytes (`at`) and into
/// the page (`page_at`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XbzrleError {
    /// Fewer than two bytes left where a count must start (a truncated encoding, or
    /// bytes left over after the last run).
    Truncated { at: usize },
    /// A count whose second byte has its top bit set (more than 14 bits).
    CountTooLong { at: usize },
    /// A skip of 0 after the first pair.
    ZeroSkip { at: usize },
    /// A changed run of 0 bytes.
    EmptyRun { at: usize },
    /// A skip or run that goes past the end of the page.
    PastPage {
        at: usize,
        page_at: usize,
        len: usize,
        page_size: usize,
    },
    /// A run whose bytes go past the end of the encoding.
    RunTruncated { at: usize, len: usize, left: usize },
}

impl fmt::Display for XbzrleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { at } => write!(
                f,
                "encoding truncated at byte {at}: fewer than 2 bytes left for a count"
            ),
            Self::CountTooLong { at } => {
                write!(f, "count at byte {at} is longer than 2 bytes")
            }
            Self::ZeroSkip { at } => write!(f, "skip of 0 bytes at byte {at}"),
            Self::EmptyRun { at } => write!(f, "run of 0 bytes at byte {at}"),
            Self::PastPage {
                at,
                page_at,
                len,
                page_size,
            } => write!(
                f,
                "count at byte {at} runs past the page: {len} bytes from page offset \
                 {page_at} of {page_size}"
            ),
            Self::RunTruncated { at, len, left } => write!(
                f,
                "run at byte {at} needs {len} bytes, the encoding has {left} left"
            ),
        }
    }
}

impl std::error::Error for XbzrleError {}

/// Reads a one- or two-byte ULEB128 at `src[at..]` (two bytes are there).
fn get_uleb(src: &[u8], at: usize) -> Result<(usize, usize), XbzrleError> {
    let b0 = src[at];
    if b0 & 0x80 == 0 {
        return Ok((usize::from(b0), 1));
    }
    let b1 = src[at + 1];
    if b1 & 0x80 != 0 {
        return Err(XbzrleError::CountTooLong { at });
    }
    Ok((usize::from(b0 & 0x7F) | usize::from(b1) << 7, 2))
}

/// Applies the encoding `src` to `page` (which holds the old contents) with QEMU's rules:
/// every count needs two bytes left to start, skips after the first are not 0, runs are
/// not empty, nothing goes past the page or the encoding. Returns the page offset after
/// the last run. On error `page` may be partly changed: decode into a copy.
pub fn decode(src: &[u8], page: &mut [u8]) -> Result<usize, XbzrleError> {
    let page_size = page.len();
    let mut i = 0;
    let mut d = 0;
    while i < src.len() {
        if src.len() - i < 2 {
            return Err(XbzrleError::Truncated { at: i });
        }
        let (skip, w) = get_uleb(src, i)?;
        if i != 0 && skip == 0 {
            return Err(XbzrleError::ZeroSkip { at: i });
        }
        if d + skip > page_size {
            return Err(XbzrleError::PastPage {
                at: i,
                page_at: d,
                len: skip,
                page_size,
            });
        }
        i += w;
        d += skip;
        if src.len() - i < 2 {
            return Err(XbzrleError::Truncated { at: i });
        }
        let (n, w) = get_uleb(src, i)?;
        if n == 0 {
            return Err(XbzrleError::EmptyRun { at: i });
        }
        if d + n > page_size {
            return Err(XbzrleError::PastPage {
                at: i,
                page_at: d,
                len: n,
                page_size,
            });
        }
        let at = i;
        i += w;
        if i + n > src.len() {
            return Err(XbzrleError::RunTruncated {
                at,
                len: n,
                left: src.len() - i,
            });
        }
        page[d..d + n].copy_from_slice(&src[i..i + n]);
        d += n;
        i += n;
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: usize = 4096;

    fn enc(old: &[u8], new: &[u8]) -> Encoded {
        let mut out = vec![0u8; PS];
        encode(old, new, &mut out)
    }

    fn enc_bytes(old: &[u8], new: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; PS];
        match encode(old, new, &mut out) {
            Encoded::Len(n) => out[..n].to_vec(),
            other => panic!("expected an encoding, got {other:?}"),
        }
    }

    /// The byte-at-a-time definition of the encoding, to check the word-at-a-time one.
    fn reference(old: &[u8], new: &[u8], limit: usize) -> Encoded {
        let mut out = Vec::new();
        let mut i = 0;
        let len = new.len();
        while i < len {
            if out.len() + 2 > limit {
                return Encoded::Overflow;
            }
            let mut j = i;
            while j < len && old[j] == new[j] {
                j += 1;
            }
            if j - i == len {
                return Encoded::Unchanged;
            }
            if j == len {
                return Encoded::Len(out.len());
            }
            let mut tmp = [0u8; 2];
            let w = put_uleb(&mut tmp, 0, j - i);
            out.extend_from_slice(&tmp[..w]);
            if out.len() + 2 > limit {
                return Encoded::Overflow;
            }
            let mut k = j;
            while k < len && old[k] != new[k] {
                k += 1;
            }
            let w = put_uleb(&mut tmp, 0, k - j);
            out.extend_from_slice(&tmp[..w]);
            if out.len() + (k - j) > limit {
                return Encoded::Overflow;
            }
            out.extend_from_slice(&new[j..k]);
            i = k;
        }
        Encoded::Len(out.len())
    }

    #[test]
    fn first_byte_changed_is_qemus_record() {
        let old = vec![0u8; PS];
        let mut new = old.clone();
        new[0] = 0xC2;
        assert_eq!(enc_bytes(&old, &new), [0x00, 0x01, 0xC2]);
    }

    #[test]
    fn unchanged_page_and_trailing_skip() {
        let old = vec![7u8; PS];
        assert_eq!(enc(&old, &old), Encoded::Unchanged);
        let mut new = old.clone();
        new[300] = 1;
        // skip 300 = 0xAC 0x02, run 1, byte; the unchanged end is not encoded.
        assert_eq!(enc_bytes(&old, &new), [0xAC, 0x02, 0x01, 0x01]);
    }

    #[test]
    fn runs_end_at_the_first_agreeing_byte() {
        let old = vec![0u8; PS];
        let mut new = old.clone();
        for b in &mut new[8..20] {
            *b = 0xFF;
        }
        new[13] = 0; // agrees: splits the run
        assert_eq!(
            enc_bytes(&old, &new),
            [8, 5, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 1, 6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]
        );
    }

    #[test]
    fn overflow_where_qemu_gives_up() {
        // Every other byte changed: 2048 pairs of 3 bytes do not fit in 4096.
        let old = vec![0u8; PS];
        let new: Vec<u8> = (0..PS).map(|i| (i % 2) as u8).collect();
        assert_eq!(enc(&old, &new), Encoded::Overflow);
        // A whole changed page: skip 0, run 4096 (2 bytes), 4096 bytes: too long.
        let new = vec![1u8; PS];
        assert_eq!(enc(&old, &new), Encoded::Overflow);
    }

    #[test]
    fn word_scan_agrees_with_the_byte_definition() {
        // A small deterministic generator: pages with runs of every length and place.
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..2000 {
            let old: Vec<u8> = (0..PS).map(|_| next() as u8).collect();
            let mut new = old.clone();
            let writes = (next() % 200) as usize;
            for _ in 0..writes {
                let at = (next() as usize) % PS;
                let n = 1 + (next() as usize) % if round % 3 == 0 { 64 } else { 4 };
                for k in at..(at + n).min(PS) {
                    // Sometimes the "new" byte equals the old one.
                    new[k] = if next() % 5 == 0 {
                        old[k]
                    } else {
                        next() as u8
                    };
                }
            }
            let limit = if round % 7 == 0 { 64 } else { PS };
            let mut out = vec![0u8; limit];
            let got = encode(&old, &new, &mut out);
            assert_eq!(got, reference(&old, &new, limit), "round {round}");
            if let Encoded::Len(n) = got {
                let mut page = old.clone();
                let end = decode(&out[..n], &mut page).unwrap();
                assert!(end <= PS);
                assert_eq!(page, new, "round {round}");
            }
            // The applying encoder writes the same bytes and leaves `old` as decoding
            // them would (unchanged when the page is).
            let mut applied = old.clone();
            let mut out2 = vec![0u8; limit];
            let got2 = encode_applying(&mut applied, &new, &mut out2);
            assert_eq!(got2, got, "round {round}");
            match got {
                Encoded::Len(n) => {
                    assert_eq!(out2[..n], out[..n], "round {round}");
                    assert_eq!(applied, new, "round {round}");
                }
                Encoded::Unchanged => assert_eq!(applied, old, "round {round}"),
                Encoded::Overflow => {}
            }
        }
    }

    #[test]
    fn fast_path_gives_the_portable_bytes() {
        // Random pages with changes of every length at every place (across the 32-byte
        // lanes of the wide scans), and the case XBZRLE is for: one changed word per
        // page, at each word offset. Both paths must write the same bytes and agree on
        // Unchanged and Overflow, also with a short output buffer.
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let check = |old: &[u8], new: &[u8], limit: usize, what: &str| {
            let (mut fast, mut slow) = (vec![0u8; limit], vec![0u8; limit]);
            let a = encode(old, new, &mut fast);
            let b = encode_portable(old, new, &mut slow);
            assert_eq!(a, b, "{what}");
            if let Encoded::Len(n) = a {
                assert_eq!(fast[..n], slow[..n], "{what}");
            }
        };
        for round in 0..3000 {
            let old: Vec<u8> = (0..PS).map(|_| next() as u8).collect();
            let mut new = old.clone();
            for _ in 0..(next() % 300) {
                let at = (next() as usize) % PS;
                let n = 1 + (next() as usize) % [2, 9, 40, 700][round % 4];
                for b in &mut new[at..(at + n).min(PS)] {
                    *b = if next() % 6 == 0 { *b } else { next() as u8 };
                }
            }
            let limit = [PS, PS / 2, 100, 3][round % 4];
            check(&old, &new, limit, &format!("random round {round}"));
        }
        let old = vec![0x5Au8; PS];
        for at in 0..PS {
            let mut new = old.clone();
            new[at] ^= 0x80;
            check(&old, &new, PS, &format!("one byte at {at}"));
            // Slices that start off any alignment.
            let o = (at % 31) + 1;
            check(&old[o..], &new[o..], PS, &format!("offset slices at {at}"));
        }
        check(&old, &old, PS, "unchanged");
        let all: Vec<u8> = old.iter().map(|b| !b).collect();
        check(&old, &all, PS, "all changed");
    }

    #[test]
    fn hostile_encodings_are_refused_with_their_offset() {
        let mut page = vec![0u8; PS];
        let cases: &[(&[u8], XbzrleError)] = &[
            (&[0x00], XbzrleError::Truncated { at: 0 }),
            (&[0x05, 0x01, 0xAA, 0x07], XbzrleError::Truncated { at: 3 }),
            (
                &[0x00, 0x01, 0xAA, 0x00, 0x01, 0xBB],
                XbzrleError::ZeroSkip { at: 3 },
            ),
            (&[0x00, 0x00, 0xAA], XbzrleError::EmptyRun { at: 1 }),
            (&[0x80, 0x80, 0x01], XbzrleError::CountTooLong { at: 0 }),
            (
                // skip 4096, then a run: past the page.
                &[0x80, 0x20, 0x01, 0xAA],
                XbzrleError::PastPage {
                    at: 2,
                    page_at: 4096,
                    len: 1,
                    page_size: 4096,
                },
            ),
            (
                // skip 4095, run 2.
                &[0xFF, 0x1F, 0x02, 0xAA, 0xBB],
                XbzrleError::PastPage {
                    at: 2,
                    page_at: 4095,
                    len: 2,
                    page_size: 4096,
                },
            ),
            (
                &[0x00, 0x05, 0xAA, 0xBB],
                XbzrleError::RunTruncated {
                    at: 1,
                    len: 5,
                    left: 2,
                },
            ),
            (
                // skip beyond the page.
                &[0xFF, 0x7F, 0x01, 0xAA],
                XbzrleError::PastPage {
                    at: 0,
                    page_at: 0,
                    len: 0x3FFF,
                    page_size: 4096,
                },
            ),
        ];
        for (src, want) in cases {
            assert_eq!(decode(src, &mut page).unwrap_err(), *want, "{src:02x?}");
            assert!(!want.to_string().is_empty());
        }
        // An empty encoding changes nothing.
        assert_eq!(decode(&[], &mut page), Ok(0));
    }

    /// A page another thread writes while it is encoded (guest memory read live): every
    /// encoding must still decode, and the copy it is applied to holds only values the
    /// page held.
    #[test]
    fn a_page_written_during_the_encoding_still_encodes_to_a_valid_record() {
        use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
        use std::sync::Arc;
        let page: Arc<Vec<AtomicU8>> = Arc::new((0..PS).map(|_| AtomicU8::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (page, stop) = (page.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut v = 0u8;
                while !stop.load(Ordering::Relaxed) {
                    v ^= 1;
                    for at in [0, 1, 7, 8, 100, 101, 2000, 2031, 2032, 4094, 4095] {
                        page[at].store(v, Ordering::Relaxed);
                    }
                    for at in 3000..3040 {
                        page[at].store(v, Ordering::Relaxed);
                    }
                }
            })
        };
        let old = vec![0u8; PS];
        let mut out = vec![0u8; PS];
        let mut encoded = 0;
        let t0 = std::time::Instant::now();
        while encoded < 20_000 && t0.elapsed() < std::time::Duration::from_secs(5) {
            // SAFETY: `AtomicU8` has the layout of `u8` and the vector lives on; the
            // racing stores are what this test is about.
            let new = unsafe { std::slice::from_raw_parts(page.as_ptr().cast::<u8>(), PS) };
            let mut applied = old.clone();
            if let Encoded::Len(n) = encode_applying(&mut applied, new, &mut out) {
                let mut copy = old.clone();
                decode(&out[..n], &mut copy).expect("a live page encodes to a valid record");
                assert!(copy.iter().all(|&b| b <= 1));
                assert_eq!(copy, applied, "the applied copy is the decoded one");
                encoded += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert!(encoded > 1000, "only {encoded} pages seen changed");
    }
}
