//! Guest workloads of the `lab` machine: the `--workload` specification and the page
//! pattern the self-checking workload keeps.
//!
//! A workload writes every page of its hot set, pass after pass. With `verify`, each
//! page holds one 64-bit tag in every word, [`page_tag`]`(pass, page)`, and before a
//! vCPU writes pass `p` into a page it checks that the page still holds pass `p - 1`.
//! The pass counters of neighbouring pages therefore always agree: within one vCPU's
//! slice the pages before its cursor hold pass `p`, those from the cursor on hold
//! `p - 1`. A page the migration failed to resend (a missed dirty page) still holds an
//! older pass on the destination, and a page copied while it was being written holds
//! two tags; either is reported as a violation the next time the vCPU comes to it.

use std::fmt;

/// The `--workload` specification: `hot=SIZE,rate=RATE,verify` or `sparse` (all
/// optional).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadSpec {
    /// Bytes of guest RAM written each pass, from the start of RAM; `None` is all of it.
    pub hot: Option<u64>,
    /// Bytes of dirtied pages per second across all vCPUs; `None` is as fast as it can.
    pub rate: Option<u64>,
    /// Check every page before rewriting it (the self-checking workload).
    pub verify: bool,
    /// Write only the first 64-bit word of each page (its tag), not the whole page: from
    /// one pass to the next one byte of the page changes, as in a guest that bumps a
    /// counter per page. Not with `verify` (the rest of the page holds no tag).
    pub sparse: bool,
    /// Whether the workload runs at all (`--workload none` or no `--workload`).
    pub enabled: bool,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        Self {
            hot: None,
            rate: None,
            verify: false,
            sparse: false,
            enabled: true,
        }
    }
}

/// A `--workload` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadSpecError {
    #[error("invalid size '{value}' for '{key}' (use a size such as 64M or 1G)")]
    BadSize { key: &'static str, value: String },
    #[error("'{0}' must not be zero")]
    Zero(&'static str),
    #[error("unknown workload option '{0}' (known: hot=SIZE, rate=RATE, verify, sparse, none)")]
    UnknownOption(String),
    #[error("'sparse' and 'verify' exclude each other (a sparse page holds one tag)")]
    SparseVerify,
}

impl WorkloadSpec {
    /// The idle machine: vCPUs that do nothing.
    pub fn idle() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }

    /// Parses `hot=256M,rate=400M,verify`. Sizes take QEMU's suffixes (K, M, G, T;
    /// a plain number is bytes); `rate` is bytes per second.
    pub fn parse(s: &str) -> Result<Self, WorkloadSpecError> {
        let mut spec = Self::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim())),
                None => (item, None),
            };
            match (key, value) {
                ("hot", Some(v)) => spec.hot = Some(parse_size("hot", v)?),
                ("rate", Some(v)) => spec.rate = Some(parse_size("rate", v)?),
                ("verify", None) => spec.verify = true,
                ("sparse", None) => spec.sparse = true,
                ("none", None) => spec.enabled = false,
                _ => return Err(WorkloadSpecError::UnknownOption(item.to_string())),
            }
        }
        if spec.sparse && spec.verify {
            return Err(WorkloadSpecError::SparseVerify);
        }
        Ok(spec)
    }

    /// The hot set in pages of `page_size` for a RAM of `ram_pages`: the given size
    /// rounded up to whole pages and capped at RAM.
    pub fn hot_pages(&self, ram_pages: u64, page_size: u64) -> u64 {
        match self.hot {
            Some(bytes) => bytes.div_ceil(page_size).min(ram_pages),
            None => ram_pages,
        }
    }
}

impl fmt::Display for WorkloadSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.enabled {
            return f.write_str("none");
        }
        let mut parts = Vec::new();
        if let Some(h) = self.hot {
            parts.push(format!("hot={h}"));
        }
        if let Some(r) = self.rate {
            parts.push(format!("rate={r}"));
        }
        if self.verify {
            parts.push("verify".into());
        }
        if self.sparse {
            parts.push("sparse".into());
        }
        if parts.is_empty() {
            parts.push("all".into());
        }
        f.write_str(&parts.join(","))
    }
}

fn parse_size(key: &'static str, v: &str) -> Result<u64, WorkloadSpecError> {
    let bad = || WorkloadSpecError::BadSize {
        key,
        value: v.to_string(),
    };
    let n = if v.chars().all(|c| c.is_ascii_digit()) {
        v.parse::<u64>().map_err(|_| bad())?
    } else {
        vmigrate_engine::channels::parse_size(v).ok_or_else(bad)?
    };
    if n == 0 {
        return Err(WorkloadSpecError::Zero(key));
    }
    Ok(n)
}

/// The 64-bit word every word of `page` holds after pass `pass`; pass 0 is a page
/// never written (zero). Distinct for every page and pass, so a page that arrives at
/// the wrong offset or from an older pass does not match.
pub fn page_tag(pass: u64, page: u64) -> u64 {
    if pass == 0 {
        return 0;
    }
    (pass << 32) | (page & 0xffff_ffff)
}

/// The pass a tag was written in (0 for a zero word).
pub fn tag_pass(tag: u64) -> u64 {
    tag >> 32
}

/// The first word of `bytes` that is not `tag`, as (word index, value).
pub fn first_mismatch(bytes: &[u8], tag: u64) -> Option<(usize, u64)> {
    let want = tag.to_ne_bytes();
    // Compare in 64-byte strides first (vectorised), then find the word.
    for (ci, chunk) in bytes.chunks(64).enumerate() {
        if chunk.chunks_exact(8).all(|w| w == want) && chunk.len() % 8 == 0 {
            continue;
        }
        for (wi, w) in chunk.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..w.len()].copy_from_slice(w);
            let v = u64::from_ne_bytes(word);
            if v != tag || w.len() < 8 {
                return Some((ci * 8 + wi, v));
            }
        }
    }
    None
}

/// How many pages of a hot set of `hot_pages` each of `vcpus` vCPUs writes: contiguous
/// slices, the first ones one page longer when it does not divide evenly.
pub fn vcpu_slice(hot_pages: u64, vcpus: u32, index: u32) -> std::ops::Range<u64> {
    let n = u64::from(vcpus.max(1));
    let i = u64::from(index);
    let base = hot_pages / n;
    let extra = hot_pages % n;
    let start = i * base + i.min(extra);
    let len = base + u64::from(i < extra);
    start..start + len
}

/// Measures the dirty rate from a growing count of bytes written, over windows of at
/// least [`DirtyRateMeter::WINDOW`].
#[derive(Debug)]
pub struct DirtyRateMeter {
    last: std::sync::Mutex<(std::time::Instant, u64, u64)>,
}

impl Default for DirtyRateMeter {
    fn default() -> Self {
        Self {
            last: std::sync::Mutex::new((std::time::Instant::now(), 0, 0)),
        }
    }
}

impl DirtyRateMeter {
    pub const WINDOW: std::time::Duration = std::time::Duration::from_millis(500);

    /// The rate in bytes per second given the total written so far: a fresh figure when
    /// a window has passed since the last one, else the last figure.
    pub fn rate(&self, total_bytes: u64) -> u64 {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = last.0.elapsed();
        if elapsed >= Self::WINDOW {
            let delta = total_bytes.saturating_sub(last.1);
            last.2 = (delta as f64 / elapsed.as_secs_f64()) as u64;
            last.0 = std::time::Instant::now();
            last.1 = total_bytes;
        }
        last.2
    }
}

/// [`DirtyRateMeter`] for each vCPU: bytes per second from each vCPU's growing count.
#[derive(Debug)]
pub struct VcpuRateMeter {
    last: std::sync::Mutex<(std::time::Instant, Vec<u64>, Vec<u64>)>,
}

impl Default for VcpuRateMeter {
    fn default() -> Self {
        Self {
            last: std::sync::Mutex::new((std::time::Instant::now(), Vec::new(), Vec::new())),
        }
    }
}

impl VcpuRateMeter {
    /// Each vCPU's rate given each one's total so far (fresh once a window passed).
    pub fn rates(&self, totals: &[u64]) -> Vec<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = last.0.elapsed();
        if elapsed >= DirtyRateMeter::WINDOW || last.2.len() != totals.len() {
            let secs = elapsed.as_secs_f64().max(1e-3);
            last.2 = totals
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let before = last.1.get(i).copied().unwrap_or(*t);
                    (t.saturating_sub(before) as f64 / secs) as u64
                })
                .collect();
            last.0 = std::time::Instant::now();
            last.1 = totals.to_vec();
        }
        last.2.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let s = WorkloadSpec::parse("hot=256M,rate=400M").unwrap();
        assert_eq!(s.hot, Some(256 << 20));
        assert_eq!(s.rate, Some(400 << 20));
        assert!(!s.verify && s.enabled);
        let sparse = WorkloadSpec::parse("hot=1M,sparse").unwrap();
        assert!(sparse.sparse && !sparse.verify);
        assert_eq!(sparse.to_string(), "hot=1048576,sparse");
        assert_eq!(
            WorkloadSpec::parse("sparse,verify").unwrap_err(),
            WorkloadSpecError::SparseVerify
        );
        let v = WorkloadSpec::parse("verify").unwrap();
        assert!(v.verify && v.hot.is_none());
        assert!(!WorkloadSpec::parse("none").unwrap().enabled);
        assert_eq!(WorkloadSpec::parse("hot=4096").unwrap().hot, Some(4096));
        assert!(matches!(
            WorkloadSpec::parse("hot=lots"),
            Err(WorkloadSpecError::BadSize { key: "hot", .. })
        ));
        assert!(matches!(
            WorkloadSpec::parse("rate=0"),
            Err(WorkloadSpecError::Zero("rate"))
        ));
        assert!(matches!(
            WorkloadSpec::parse("fast"),
            Err(WorkloadSpecError::UnknownOption(_))
        ));
    }

    #[test]
    fn hot_set_is_capped_and_rounded() {
        let s = WorkloadSpec::parse("hot=5000").unwrap();
        assert_eq!(s.hot_pages(100, 4096), 2);
        let big = WorkloadSpec::parse("hot=1G").unwrap();
        assert_eq!(big.hot_pages(100, 4096), 100);
        assert_eq!(WorkloadSpec::default().hot_pages(7, 4096), 7);
    }

    #[test]
    fn tags_differ_by_pass_and_page() {
        assert_eq!(page_tag(0, 5), 0);
        assert_ne!(page_tag(1, 0), 0);
        assert_ne!(page_tag(2, 3), page_tag(1, 3));
        assert_ne!(page_tag(2, 3), page_tag(2, 4));
        assert_eq!(tag_pass(page_tag(7, 9)), 7);
    }

    #[test]
    fn mismatch_finds_the_odd_word() {
        let tag = page_tag(3, 1);
        let mut page: Vec<u8> = std::iter::repeat_n(tag.to_ne_bytes(), 512)
            .flatten()
            .collect();
        assert_eq!(first_mismatch(&page, tag), None);
        page[8 * 300..8 * 301].copy_from_slice(&page_tag(2, 1).to_ne_bytes());
        assert_eq!(first_mismatch(&page, tag), Some((300, page_tag(2, 1))));
        assert_eq!(first_mismatch(&[0u8; 4096], 0), None);
    }

    #[test]
    fn slices_cover_the_hot_set() {
        let mut next = 0;
        for i in 0..3 {
            let r = vcpu_slice(10, 3, i);
            assert_eq!(r.start, next);
            next = r.end;
        }
        assert_eq!(next, 10);
        assert_eq!(vcpu_slice(10, 3, 0), 0..4);
        assert_eq!(vcpu_slice(2, 4, 3), 2..2);
    }
}
