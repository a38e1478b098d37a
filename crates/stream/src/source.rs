//! Where decoders read from: anything that can fill a buffer and knows its offset.

use crate::error::{DecodeError, DecodeErrorKind};

/// A byte source for decoders. The engine implements it over sockets and files; tests and
/// the inspector use [`SliceSource`].
pub trait Source {
    /// Fills `buf` completely, or fails with [`DecodeErrorKind::Truncated`] or `Io`.
    /// `what` names the item being read, for the error message.
    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), DecodeError>;

    /// Offset of the next byte, counted from the start of the stream.
    fn offset(&self) -> u64;

    /// Looks at the next byte without consuming it; `None` at a clean end of stream.
    fn peek_u8(&mut self) -> Result<Option<u8>, DecodeError>;

    /// Skips `n` bytes.
    fn skip(&mut self, mut n: u64, what: &'static str) -> Result<(), DecodeError> {
        let mut scratch = [0u8; 4096];
        while n > 0 {
            let take = n.min(scratch.len() as u64) as usize;
            self.fill(&mut scratch[..take], what)?;
            n -= take as u64;
        }
        Ok(())
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        let mut b = [0u8; 1];
        self.fill(&mut b, what)?;
        Ok(b[0])
    }

    fn be16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        let mut b = [0u8; 2];
        self.fill(&mut b, what)?;
        Ok(u16::from_be_bytes(b))
    }

    fn be32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let mut b = [0u8; 4];
        self.fill(&mut b, what)?;
        Ok(u32::from_be_bytes(b))
    }

    fn be64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let mut b = [0u8; 8];
        self.fill(&mut b, what)?;
        Ok(u64::from_be_bytes(b))
    }

    /// Reads a counted string (`u8 len` + bytes). Bytes that are not UTF-8 are replaced,
    /// so a hostile name still produces a printable error.
    fn counted(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let len = self.u8(what)? as usize;
        let mut b = [0u8; 255];
        self.fill(&mut b[..len], what)?;
        Ok(String::from_utf8_lossy(&b[..len]).into_owned())
    }
}

/// A [`Source`] over a byte slice. `base` is the offset of the slice's first byte in the
/// whole stream (for `file:…,offset=N` streams and for nested packaged streams).
#[derive(Debug, Clone)]
pub struct SliceSource<'a> {
    data: &'a [u8],
    pos: usize,
    base: u64,
}

impl<'a> SliceSource<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self::with_base(data, 0)
    }

    pub fn with_base(data: &'a [u8], base: u64) -> Self {
        Self { data, pos: 0, base }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> &'a [u8] {
        &self.data[self.pos..]
    }

    /// Moves to an absolute stream offset (mapped-ram jumps over the page area).
    pub fn seek_to(&mut self, offset: u64) -> Result<(), DecodeError> {
        let rel = offset
            .checked_sub(self.base)
            .filter(|r| *r <= self.data.len() as u64)
            .ok_or(DecodeError::new(
                self.offset(),
                DecodeErrorKind::Truncated {
                    what: "seek target",
                    needed: 0,
                },
            ))?;
        self.pos = rel as usize;
        Ok(())
    }

    /// Returns the next `n` bytes without copying.
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.data.len() - self.pos < n {
            return Err(DecodeError::new(
                self.offset(),
                DecodeErrorKind::Truncated { what, needed: n },
            ));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
}

impl Source for SliceSource<'_> {
    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), DecodeError> {
        let s = self.take(buf.len(), what)?;
        buf.copy_from_slice(s);
        Ok(())
    }

    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    fn peek_u8(&mut self) -> Result<Option<u8>, DecodeError> {
        Ok(self.data.get(self.pos).copied())
    }

    fn skip(&mut self, n: u64, what: &'static str) -> Result<(), DecodeError> {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        self.take(n, what).map(|_| ())
    }
}

impl<S: Source + ?Sized> Source for &mut S {
    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), DecodeError> {
        (**self).fill(buf, what)
    }
    fn offset(&self) -> u64 {
        (**self).offset()
    }
    fn peek_u8(&mut self) -> Result<Option<u8>, DecodeError> {
        (**self).peek_u8()
    }
    fn skip(&mut self, n: u64, what: &'static str) -> Result<(), DecodeError> {
        (**self).skip(n, what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_read_reports_offset() {
        let mut s = SliceSource::with_base(&[1, 2, 3], 100);
        assert_eq!(s.u8("a").unwrap(), 1);
        let err = s.be32("b").unwrap_err();
        assert_eq!(err.offset, 101);
        assert!(err.to_string().contains("needed 4 bytes for b"));
    }
}
