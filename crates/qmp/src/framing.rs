//! Splits QMP input into complete top-level JSON values. Objects may arrive split across
//! reads or several in one read; a control character resets the parser, as in QEMU.

/// Largest single message accepted; anything longer is answered with an error and
/// dropped, so one client cannot make the monitor allocate without bound.
pub const MAX_MESSAGE: usize = 16 << 20;

/// What the framer produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// The text of one complete JSON value.
    Message(String),
    /// Input that cannot be a JSON value; the parser was reset.
    Error(String),
}

/// Incremental splitter.
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    depth: u32,
    quote: Option<u8>,
    escaped: bool,
    overflowed: bool,
}

impl Framer {
    pub fn push(&mut self, data: &[u8], out: &mut Vec<Frame>) {
        for &b in data {
            if self.quote.is_none() && b < 0x20 && !matches!(b, b'\t' | b'\r' | b'\n') {
                self.reset();
                out.push(Frame::Error(format!(
                    "JSON parse error, stray '{}'",
                    char::from(b)
                )));
                continue;
            }
            if self.overflowed {
                if self.quote.is_none() && self.depth == 0 {
                    self.overflowed = false;
                }
            } else {
                self.buf.push(b);
                if self.buf.len() > MAX_MESSAGE {
                    out.push(Frame::Error(format!(
                        "JSON message is longer than the {MAX_MESSAGE}-byte limit"
                    )));
                    self.buf.clear();
                    self.overflowed = true;
                }
            }
            if let Some(q) = self.quote {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == q {
                    self.quote = None;
                }
                continue;
            }
            match b {
                b'"' | b'\'' => self.quote = Some(b),
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    if self.depth == 0 {
                        self.reset();
                        out.push(Frame::Error("JSON parse error, stray '}'".into()));
                        continue;
                    }
                    self.depth -= 1;
                    if self.depth == 0 && !self.overflowed {
                        let text = String::from_utf8_lossy(&self.buf).trim().to_string();
                        self.buf.clear();
                        out.push(Frame::Message(text));
                    } else if self.depth == 0 {
                        self.overflowed = false;
                        self.buf.clear();
                    }
                }
                b' ' | b'\t' | b'\r' | b'\n' if self.depth == 0 => {
                    self.buf.pop();
                }
                _ if self.depth == 0 => {
                    // A scalar at top level: it ends at whitespace or the next value.
                }
                _ => {}
            }
        }
        if self.depth == 0 && self.quote.is_none() {
            let text = String::from_utf8_lossy(&self.buf).trim().to_string();
            if !text.is_empty() {
                self.buf.clear();
                out.push(Frame::Message(text));
            }
        }
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.depth = 0;
        self.quote = None;
        self.escaped = false;
        self.overflowed = false;
    }
}

/// Turns QEMU's single-quoted strings into JSON double-quoted ones.
pub fn normalise_quotes(text: &str) -> String {
    if !text.contains('\'') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in text.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                    if q == '\'' && c == '\'' {
                        out.pop();
                        out.push('\'');
                        continue;
                    }
                    out.push(c);
                } else if c == '\\' {
                    escaped = true;
                    out.push(c);
                } else if c == q {
                    quote = None;
                    out.push('"');
                } else if q == '\'' && c == '"' {
                    out.push_str("\\\"");
                } else {
                    out.push(c);
                }
            }
            None => {
                if c == '"' || c == '\'' {
                    quote = Some(c);
                    out.push('"');
                } else {
                    out.push(c);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(chunks: &[&str]) -> Vec<Frame> {
        let mut f = Framer::default();
        let mut out = Vec::new();
        for c in chunks {
            f.push(c.as_bytes(), &mut out);
        }
        out
    }

    #[test]
    fn split_and_joined_objects() {
        let out = frames(&["{\"execute\":", "\"a\"}{\"execute\":\"b\",\"id\":6}\n"]);
        assert_eq!(
            out,
            vec![
                Frame::Message("{\"execute\":\"a\"}".into()),
                Frame::Message("{\"execute\":\"b\",\"id\":6}".into())
            ]
        );
    }

    #[test]
    fn braces_in_strings_and_control_reset() {
        let out = frames(&["{\"a\":\"}{\"}", "{\"x\"\u{1}", "{\"b\":1}"]);
        assert_eq!(out[0], Frame::Message("{\"a\":\"}{\"}".into()));
        assert!(matches!(out[1], Frame::Error(_)));
        assert_eq!(out[2], Frame::Message("{\"b\":1}".into()));
    }

    #[test]
    fn single_quotes() {
        assert_eq!(
            normalise_quotes("{'execute': 'query-status', 'id': 'sq'}"),
            "{\"execute\": \"query-status\", \"id\": \"sq\"}"
        );
    }
}
