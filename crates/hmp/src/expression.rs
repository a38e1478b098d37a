//! Integer arguments (QEMU's `l` argument type): an expression with QEMU's monitor
//! grammar and error texts.
//!
//! ```text
//! sum     = product { ('+' | '-') product }
//! product = logic { ('*' | '/' | '%') logic }
//! logic   = unary { ('&' | '|' | '^') unary }
//! unary   = '+' unary | '-' unary | '~' unary | '(' sum ')' | "'" char "'"
//!         | '$' register | number
//! ```
//!
//! Numbers are read as C's `strtoull` with base 0 does (`0x` hex, a leading `0` octal)
//! and the arithmetic wraps on 64 bits. Spaces may follow every token; an expression
//! ends at the first character that cannot continue it. There are no CPU registers to
//! read, so every `$name` is an unknown register.

use thiserror::Error;

/// Why an expression could not be evaluated (the text QEMU prints).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ExpressionError {
    #[error("unexpected end of expression")]
    UnexpectedEnd,
    #[error("invalid char '{0}' in expression")]
    InvalidChar(char),
    #[error("number too large")]
    NumberTooLarge,
    #[error("')' expected")]
    CloseParenExpected,
    #[error("character constant expected")]
    CharacterConstantExpected,
    #[error("missing terminating ' character")]
    MissingQuote,
    #[error("division by zero")]
    DivisionByZero,
    #[error("unknown register")]
    UnknownRegister,
}

/// Whitespace as C `isspace` sees it.
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c')
}

struct Parser<'a> {
    text: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn skip_spaces(&mut self) {
        while self.peek().is_some_and(is_space) {
            self.pos += 1;
        }
    }

    /// Steps over the current character and the spaces after it.
    fn next(&mut self) {
        if self.peek().is_some() {
            self.pos += 1;
            self.skip_spaces();
        }
    }

    fn sum(&mut self) -> Result<i64, ExpressionError> {
        let mut value = self.product()?;
        while let Some(op @ (b'+' | b'-')) = self.peek() {
            self.next();
            let rhs = self.product()?;
            value = if op == b'+' {
                value.wrapping_add(rhs)
            } else {
                value.wrapping_sub(rhs)
            };
        }
        Ok(value)
    }

    fn product(&mut self) -> Result<i64, ExpressionError> {
        let mut value = self.logic()?;
        while let Some(op @ (b'*' | b'/' | b'%')) = self.peek() {
            self.next();
            let rhs = self.logic()?;
            value = match op {
                b'*' => value.wrapping_mul(rhs),
                _ if rhs == 0 => return Err(ExpressionError::DivisionByZero),
                b'/' => value.wrapping_div(rhs),
                _ => value.wrapping_rem(rhs),
            };
        }
        Ok(value)
    }

    fn logic(&mut self) -> Result<i64, ExpressionError> {
        let mut value = self.unary()?;
        while let Some(op @ (b'&' | b'|' | b'^')) = self.peek() {
            self.next();
            let rhs = self.unary()?;
            value = match op {
                b'&' => value & rhs,
                b'|' => value | rhs,
                _ => value ^ rhs,
            };
        }
        Ok(value)
    }

    fn unary(&mut self) -> Result<i64, ExpressionError> {
        match self.peek() {
            None => Err(ExpressionError::UnexpectedEnd),
            Some(b'+') => {
                self.next();
                self.unary()
            }
            Some(b'-') => {
                self.next();
                Ok(self.unary()?.wrapping_neg())
            }
            Some(b'~') => {
                self.next();
                Ok(!self.unary()?)
            }
            Some(b'(') => {
                self.next();
                let value = self.sum()?;
                if self.peek() != Some(b')') {
                    return Err(ExpressionError::CloseParenExpected);
                }
                self.next();
                Ok(value)
            }
            Some(b'\'') => {
                self.pos += 1;
                let c = self
                    .peek()
                    .ok_or(ExpressionError::CharacterConstantExpected)?;
                self.pos += 1;
                if self.peek() != Some(b'\'') {
                    return Err(ExpressionError::MissingQuote);
                }
                self.next();
                Ok(i64::from(c as i8))
            }
            Some(b'$') => {
                self.pos += 1;
                while self
                    .peek()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.')
                {
                    self.pos += 1;
                }
                Err(ExpressionError::UnknownRegister)
            }
            Some(_) => {
                let value = self.number()?;
                self.skip_spaces();
                Ok(value)
            }
        }
    }

    /// `strtoull(text, &end, 0)` from the current position.
    fn number(&mut self) -> Result<i64, ExpressionError> {
        let rest = &self.text[self.pos..];
        let hex_digits = |s: &[u8]| s.iter().take_while(|c| c.is_ascii_hexdigit()).count();
        let (radix, start) = match rest {
            [b'0', b'x' | b'X', tail @ ..] if hex_digits(tail) > 0 => (16, 2),
            [b'0', ..] => (8, 0),
            _ => (10, 0),
        };
        let digits = rest[start..]
            .iter()
            .take_while(|c| (**c as char).is_digit(radix))
            .count();
        if digits == 0 {
            let bad = std::str::from_utf8(rest)
                .ok()
                .and_then(|s| s.chars().next())
                .unwrap_or(rest[0] as char);
            return Err(ExpressionError::InvalidChar(bad));
        }
        let mut value: u64 = 0;
        let mut overflow = false;
        for &c in &rest[start..start + digits] {
            let d = u64::from((c as char).to_digit(radix).unwrap_or(0));
            match value
                .checked_mul(u64::from(radix))
                .and_then(|v| v.checked_add(d))
            {
                Some(v) => value = v,
                None => overflow = true,
            }
        }
        if overflow {
            return Err(ExpressionError::NumberTooLarge);
        }
        self.pos += start + digits;
        Ok(value as i64)
    }
}

/// Evaluates the expression at the start of `text` (after any spaces); returns its value
/// and the text after it.
pub fn parse_expression(text: &str) -> Result<(i64, &str), ExpressionError> {
    let mut parser = Parser {
        text: text.as_bytes(),
        pos: 0,
    };
    parser.skip_spaces();
    let value = parser.sum()?;
    // Every step stops on an ASCII character or the end, so this is a char boundary.
    Ok((value, &text[parser.pos..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(text: &str) -> Result<i64, ExpressionError> {
        parse_expression(text).map(|(v, _)| v)
    }

    #[test]
    fn numbers_and_operators() {
        assert_eq!(eval("1"), Ok(1));
        assert_eq!(eval("  0x10"), Ok(16));
        assert_eq!(eval("010"), Ok(8));
        assert_eq!(eval("2-1"), Ok(1));
        assert_eq!(eval("1 -5"), Ok(-4));
        assert_eq!(eval("(1)"), Ok(1));
        assert_eq!(eval("2+3*4"), Ok(14));
        assert_eq!(eval("1|2*3"), Ok(9));
        assert_eq!(eval("~0"), Ok(-1));
        assert_eq!(eval("'a'"), Ok(97));
        assert_eq!(eval("18446744073709551615"), Ok(-1));
        assert_eq!(eval("7 % 4"), Ok(3));
    }

    #[test]
    fn the_rest_of_the_line_is_left() {
        assert_eq!(parse_expression("100 5"), Ok((100, "5")));
        assert_eq!(parse_expression("1 2 3"), Ok((1, "2 3")));
        assert_eq!(parse_expression("08"), Ok((0, "8")));
        assert_eq!(parse_expression("0x"), Ok((0, "x")));
    }

    #[test]
    fn errors_have_qemus_texts() {
        let text = |s: &str| eval(s).unwrap_err().to_string();
        assert_eq!(text(""), "unexpected end of expression");
        assert_eq!(text("1*"), "unexpected end of expression");
        assert_eq!(text("x"), "invalid char 'x' in expression");
        assert_eq!(text("1/0"), "division by zero");
        assert_eq!(text("1%0"), "division by zero");
        assert_eq!(text("99999999999999999999"), "number too large");
        assert_eq!(text("(1"), "')' expected");
        assert_eq!(text("'"), "character constant expected");
        assert_eq!(text("'ab'"), "missing terminating ' character");
        assert_eq!(text("$pc"), "unknown register");
    }
}
