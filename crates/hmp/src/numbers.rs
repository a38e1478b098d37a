//! Number syntaxes that HMP arguments use.
//!
//! * [`parse_size`]: a size with an optional binary suffix (`B`, `K`, `M`, `G`, `T`, `P`, `E`,
//!   either case, powers of 1024), a decimal fraction (`1.5M`) or a `0x` prefix (hex takes no
//!   fraction and no suffix). Values without a suffix are multiplied by a caller-chosen default
//!   unit. A fraction is refused when the unit is bytes. Fractions are rounded to the nearest
//!   byte. A leading `-` is refused.
//! * [`parse_unsigned`]: C `strtoull` base 0 syntax (`0x` hex, leading `0` octal, decimal), where
//!   a leading `-` wraps around modulo 2^64 the way QEMU's string visitor lets it.

use thiserror::Error;

/// Why a size string was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SizeParseError {
    /// The text is not a size at all.
    #[error("not a size")]
    Invalid,
    /// The text is a well-formed size, but negative or at least 2^64 bytes.
    #[error("size out of range")]
    OutOfRange,
}

/// Why an unsigned integer string was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum UnsignedParseError {
    /// Not an integer, or does not fit in 64 bits.
    #[error("not a 64-bit unsigned integer")]
    NotUnsigned64,
}

/// Bytes in one unit of each size suffix letter.
fn suffix_multiplier(suffix: u8) -> Option<u64> {
    let power = match suffix.to_ascii_lowercase() {
        b'b' => 0,
        b'k' => 1,
        b'm' => 2,
        b'g' => 3,
        b't' => 4,
        b'p' => 5,
        b'e' => 6,
        _ => return None,
    };
    Some(1u64 << (10 * power))
}

/// Parses `text` as a size; numbers without a suffix are in units of `default_unit` bytes.
pub fn parse_size(text: &str, default_unit: u64) -> Result<u64, SizeParseError> {
    let body = text.trim_start();
    let (negative, body) = match body.as_bytes().first() {
        Some(b'-') => (true, &body[1..]),
        Some(b'+') => (false, &body[1..]),
        _ => (false, body),
    };
    let magnitude = parse_unsigned_size(body, default_unit);
    match magnitude {
        Ok(_) if negative => Err(SizeParseError::OutOfRange),
        other => other,
    }
}

/// [`parse_size`] without the sign.
fn parse_unsigned_size(body: &str, default_unit: u64) -> Result<u64, SizeParseError> {
    let bytes = body.as_bytes();
    if bytes.len() > 2 && bytes[0] == b'0' && (bytes[1] == b'x' || bytes[1] == b'X') {
        let digits = &body[2..];
        if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SizeParseError::Invalid);
        }
        let value = u64::from_str_radix(digits, 16).map_err(|_| SizeParseError::OutOfRange)?;
        return value
            .checked_mul(default_unit)
            .ok_or(SizeParseError::OutOfRange);
    }

    let integer_len = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    let integer_digits = &body[..integer_len];
    let mut rest = &body[integer_len..];
    let mut fraction_digits = "";
    if let Some(after_point) = rest.strip_prefix('.') {
        let fraction_len = after_point
            .bytes()
            .take_while(|b| b.is_ascii_digit())
            .count();
        fraction_digits = &after_point[..fraction_len];
        rest = &after_point[fraction_len..];
    }
    if integer_digits.is_empty() && fraction_digits.is_empty() {
        return Err(SizeParseError::Invalid);
    }
    let unit = match rest.as_bytes() {
        [] => default_unit,
        [suffix] => suffix_multiplier(*suffix).ok_or(SizeParseError::Invalid)?,
        _ => return Err(SizeParseError::Invalid),
    };
    let fraction: f64 = if fraction_digits.is_empty() {
        0.0
    } else {
        format!("0.{fraction_digits}")
            .parse()
            .map_err(|_| SizeParseError::Invalid)?
    };
    if fraction != 0.0 && unit == 1 {
        return Err(SizeParseError::Invalid);
    }
    let integer: u128 = if integer_digits.is_empty() {
        0
    } else {
        match integer_digits.parse::<u64>() {
            Ok(value) => u128::from(value),
            Err(_) => return Err(SizeParseError::OutOfRange),
        }
    };
    // The fraction is below one unit, and a unit is at most 2^60, so this fits easily.
    let fraction_bytes = (fraction * unit as f64).round() as u128;
    let total = integer * u128::from(unit) + fraction_bytes;
    u64::try_from(total).map_err(|_| SizeParseError::OutOfRange)
}

/// Parses `text` the way C `strtoull(text, .., 0)` does when it must consume the whole string.
pub fn parse_unsigned(text: &str) -> Result<u64, UnsignedParseError> {
    let body = text.trim_start();
    let (negative, body) = match body.as_bytes().first() {
        Some(b'-') => (true, &body[1..]),
        Some(b'+') => (false, &body[1..]),
        _ => (false, body),
    };
    let bytes = body.as_bytes();
    let (radix, digits) =
        if bytes.len() > 2 && bytes[0] == b'0' && (bytes[1] == b'x' || bytes[1] == b'X') {
            (16, &body[2..])
        } else if bytes.len() > 1 && bytes[0] == b'0' {
            (8, &body[1..])
        } else {
            (10, body)
        };
    if digits.is_empty() || !digits.bytes().all(|b| char::from(b).is_digit(radix)) {
        return Err(UnsignedParseError::NotUnsigned64);
    }
    let magnitude =
        u64::from_str_radix(digits, radix).map_err(|_| UnsignedParseError::NotUnsigned64)?;
    Ok(if negative {
        magnitude.wrapping_neg()
    } else {
        magnitude
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn sizes_with_a_mebibyte_default_unit() {
        let cases: &[(&str, Result<u64, SizeParseError>)] = &[
            ("5", Ok(5 * MIB)),
            ("1k", Ok(1024)),
            ("1.5M", Ok(1_572_864)),
            ("1.5", Ok(1_572_864)),
            ("0x10", Ok(16 * MIB)),
            ("0X10", Ok(16 * MIB)),
            ("010", Ok(10 * MIB)),
            ("1b", Ok(1)),
            ("1B", Ok(1)),
            ("1g", Ok(1 << 30)),
            ("1E", Ok(1 << 60)),
            ("1.5e", Ok(1_729_382_256_910_270_464)),
            ("0.5k", Ok(512)),
            (".5M", Ok(524_288)),
            ("1.", Ok(MIB)),
            ("1.M", Ok(MIB)),
            ("+5", Ok(5 * MIB)),
            ("1.1", Ok(1_153_434)),
            ("0.3", Ok(314_573)),
            ("1.0000001k", Ok(1024)),
            ("0.0000001k", Ok(0)),
            ("16383.99999999999T", Ok(18_014_398_509_481_973)),
            ("-5", Err(SizeParseError::OutOfRange)),
            ("-0", Err(SizeParseError::OutOfRange)),
            ("-abc", Err(SizeParseError::Invalid)),
            ("abc", Err(SizeParseError::Invalid)),
            ("", Err(SizeParseError::Invalid)),
            (".", Err(SizeParseError::Invalid)),
            ("0x", Err(SizeParseError::Invalid)),
            ("00x1", Err(SizeParseError::Invalid)),
            ("0x10k", Err(SizeParseError::Invalid)),
            ("1kB", Err(SizeParseError::Invalid)),
            ("1e3", Err(SizeParseError::Invalid)),
            ("1.5.5", Err(SizeParseError::Invalid)),
            ("1.5b", Err(SizeParseError::Invalid)),
            ("16E", Err(SizeParseError::OutOfRange)),
            ("18446744073709551616", Err(SizeParseError::OutOfRange)),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_size(text, MIB), *expected, "{text:?}");
        }
    }

    #[test]
    fn sizes_with_a_byte_default_unit() {
        let cases: &[(&str, Result<u64, SizeParseError>)] = &[
            ("5", Ok(5)),
            ("0x10", Ok(16)),
            ("010", Ok(10)),
            ("1.0", Ok(1)),
            ("1.0b", Ok(1)),
            ("1.", Ok(1)),
            ("0.00048828125k", Ok(1)),
            ("0.0004882812k", Ok(0)),
            ("0.99999999999k", Ok(1024)),
            ("8E", Ok(1 << 63)),
            ("0xffffffffffffffff", Ok(u64::MAX)),
            ("18446744073709551615", Ok(u64::MAX)),
            ("1.5", Err(SizeParseError::Invalid)),
            ("0.3", Err(SizeParseError::Invalid)),
            ("0x10000000000000000", Err(SizeParseError::OutOfRange)),
            ("15.99999999999999999E", Err(SizeParseError::OutOfRange)),
            ("'1'", Err(SizeParseError::Invalid)),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_size(text, 1), *expected, "{text:?}");
        }
    }

    #[test]
    fn unsigned_integers_follow_strtoull_base_zero() {
        let cases: &[(&str, Result<u64, UnsignedParseError>)] = &[
            ("5", Ok(5)),
            ("0x10", Ok(16)),
            ("0xFF", Ok(255)),
            ("010", Ok(8)),
            ("0", Ok(0)),
            ("+5", Ok(5)),
            ("-0", Ok(0)),
            ("-1", Ok(u64::MAX)),
            ("-5", Ok(u64::MAX - 4)),
            ("18446744073709551615", Ok(u64::MAX)),
            (
                "18446744073709551616",
                Err(UnsignedParseError::NotUnsigned64),
            ),
            ("08", Err(UnsignedParseError::NotUnsigned64)),
            ("0x", Err(UnsignedParseError::NotUnsigned64)),
            ("1k", Err(UnsignedParseError::NotUnsigned64)),
            ("1.5", Err(UnsignedParseError::NotUnsigned64)),
            ("abc", Err(UnsignedParseError::NotUnsigned64)),
            ("", Err(UnsignedParseError::NotUnsigned64)),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_unsigned(text), *expected, "{text:?}");
        }
    }
}
