//! `migrate_set_parameter NAME VALUE`: turning the text value into the JSON member of a
//! `migrate-set-parameters` request, with the error texts QEMU's HMP prints.
//!
//! Range checks are not done here: they belong to `migrate-set-parameters`, whose error
//! descriptions HMP prints unchanged.

use serde_json::Value;
use thiserror::Error;

use crate::numbers::{parse_size, parse_unsigned, SizeParseError};

/// How the value text of one parameter is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParameterSyntax {
    /// A size whose unsuffixed numbers are MiB (`max-bandwidth`, `avail-switchover-bandwidth`).
    SizeInMebibytes,
    /// A size whose unsuffixed numbers are bytes (also used for the plain `uint64` parameters).
    SizeInBytes,
    /// Like [`SizeInBytes`](Self::SizeInBytes), but refused above `i64::MAX` with
    /// `Invalid size` (`xbzrle-cache-size`).
    CacheSize,
    /// An unsigned integer of the given width in bits (8, 32 or 64).
    Unsigned {
        /// The width of the QAPI type, used for the `expects uint<bits>_t` message.
        bits: u32,
    },
    /// `on`/`yes`/`y`/`true` or `off`/`no`/`n`/`false`.
    Bool,
    /// A free string (the TLS object ids and host name).
    Text,
    /// An enum member name; the QMP side checks the name.
    EnumMember,
    /// Settable only through QMP (`block-bitmap-mapping`).
    QmpOnly,
}

/// Every migration parameter HMP knows (QEMU's `MigrationParameter` enum, in its order), with
/// the syntax of its value.
pub const PARAMETERS: &[(&str, ParameterSyntax)] = &[
    ("announce-initial", ParameterSyntax::SizeInBytes),
    ("announce-max", ParameterSyntax::SizeInBytes),
    ("announce-rounds", ParameterSyntax::SizeInBytes),
    ("announce-step", ParameterSyntax::SizeInBytes),
    (
        "throttle-trigger-threshold",
        ParameterSyntax::Unsigned { bits: 8 },
    ),
    (
        "cpu-throttle-initial",
        ParameterSyntax::Unsigned { bits: 8 },
    ),
    (
        "cpu-throttle-increment",
        ParameterSyntax::Unsigned { bits: 8 },
    ),
    ("cpu-throttle-tailslow", ParameterSyntax::Bool),
    ("tls-creds", ParameterSyntax::Text),
    ("tls-hostname", ParameterSyntax::Text),
    ("tls-authz", ParameterSyntax::Text),
    ("max-bandwidth", ParameterSyntax::SizeInMebibytes),
    (
        "avail-switchover-bandwidth",
        ParameterSyntax::SizeInMebibytes,
    ),
    ("downtime-limit", ParameterSyntax::SizeInBytes),
    ("x-checkpoint-delay", ParameterSyntax::Unsigned { bits: 32 }),
    ("multifd-channels", ParameterSyntax::Unsigned { bits: 8 }),
    ("xbzrle-cache-size", ParameterSyntax::CacheSize),
    ("max-postcopy-bandwidth", ParameterSyntax::SizeInBytes),
    ("max-cpu-throttle", ParameterSyntax::Unsigned { bits: 8 }),
    ("multifd-compression", ParameterSyntax::EnumMember),
    ("multifd-zlib-level", ParameterSyntax::Unsigned { bits: 8 }),
    (
        "multifd-qatzip-level",
        ParameterSyntax::Unsigned { bits: 8 },
    ),
    ("multifd-zstd-level", ParameterSyntax::Unsigned { bits: 8 }),
    ("block-bitmap-mapping", ParameterSyntax::QmpOnly),
    ("x-vcpu-dirty-limit-period", ParameterSyntax::SizeInBytes),
    ("vcpu-dirty-limit", ParameterSyntax::SizeInBytes),
    ("mode", ParameterSyntax::EnumMember),
    ("zero-page-detection", ParameterSyntax::EnumMember),
    ("direct-io", ParameterSyntax::Bool),
    // vmigrate's own: milliseconds of precopy before the automatic switch to postcopy.
    (
        "x-vmigrate-postcopy-after",
        ParameterSyntax::Unsigned { bits: 64 },
    ),
];

/// Why a `migrate_set_parameter` value was refused before anything was sent to QMP.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParameterValueError {
    /// The parameter name is not a migration parameter.
    #[error("invalid parameter value: {0}")]
    UnknownParameter(String),
    /// A bandwidth or cache size that is not a size, or too large.
    #[error("Invalid size {0}")]
    InvalidSize(String),
    /// A byte-unit size that does not parse.
    #[error(
        "Parameter '{0}' expects a non-negative number below 2^64\n\
         Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
         and exabytes, respectively."
    )]
    NotASize(String),
    /// A byte-unit size that is negative or does not fit in 64 bits.
    #[error("Value '{value}' is out of range for parameter '{parameter}'")]
    SizeOutOfRange {
        /// The parameter name.
        parameter: String,
        /// The value text as typed.
        value: String,
    },
    /// An integer parameter whose value is not a 64-bit unsigned integer.
    #[error("Parameter '{0}' expects uint64")]
    NotUnsigned64(String),
    /// An integer parameter whose value does not fit in its narrower type.
    #[error("Parameter '{parameter}' expects uint{bits}_t")]
    OutOfTypeRange {
        /// The parameter name.
        parameter: String,
        /// The width of the parameter's type.
        bits: u32,
    },
    /// A boolean parameter with a value that is not a boolean word.
    #[error("Parameter '{0}' expects 'on' or 'off'")]
    NotABool(String),
    /// `block-bitmap-mapping` cannot be expressed on a command line.
    #[error("The block-bitmap-mapping parameter can only be set through QMP")]
    QmpOnly,
}

/// The `migrate-set-parameters` arguments that `migrate_set_parameter name value` sends.
pub fn set_parameter_arguments(name: &str, value: &str) -> Result<Value, ParameterValueError> {
    let syntax = PARAMETERS
        .iter()
        .find(|(known, _)| *known == name)
        .map(|(_, syntax)| *syntax)
        .ok_or_else(|| ParameterValueError::UnknownParameter(name.to_owned()))?;
    let json_value = parse_value(name, syntax, value)?;
    let mut arguments = serde_json::Map::new();
    arguments.insert(name.to_owned(), json_value);
    Ok(Value::Object(arguments))
}

/// Converts `value` to JSON according to `syntax`; `name` is used in error messages.
fn parse_value(
    name: &str,
    syntax: ParameterSyntax,
    value: &str,
) -> Result<Value, ParameterValueError> {
    const MIB: u64 = 1 << 20;
    let out_of_range = || ParameterValueError::SizeOutOfRange {
        parameter: name.to_owned(),
        value: value.to_owned(),
    };
    match syntax {
        ParameterSyntax::SizeInMebibytes => match parse_size(value, MIB) {
            Ok(bytes) if i64::try_from(bytes).is_ok() => Ok(Value::from(bytes)),
            _ => Err(ParameterValueError::InvalidSize(value.to_owned())),
        },
        ParameterSyntax::SizeInBytes | ParameterSyntax::CacheSize => {
            let bytes = parse_size(value, 1).map_err(|error| match error {
                SizeParseError::Invalid => ParameterValueError::NotASize(name.to_owned()),
                SizeParseError::OutOfRange => out_of_range(),
            })?;
            if syntax == ParameterSyntax::CacheSize && i64::try_from(bytes).is_err() {
                return Err(ParameterValueError::InvalidSize(value.to_owned()));
            }
            Ok(Value::from(bytes))
        }
        ParameterSyntax::Unsigned { bits } => {
            let number = parse_unsigned(value)
                .map_err(|_| ParameterValueError::NotUnsigned64(name.to_owned()))?;
            if bits < 64 && number >> bits != 0 {
                return Err(ParameterValueError::OutOfTypeRange {
                    parameter: name.to_owned(),
                    bits,
                });
            }
            Ok(Value::from(number))
        }
        ParameterSyntax::Bool => match value {
            "on" | "yes" | "y" | "true" => Ok(Value::Bool(true)),
            "off" | "no" | "n" | "false" => Ok(Value::Bool(false)),
            _ => Err(ParameterValueError::NotABool(name.to_owned())),
        },
        ParameterSyntax::Text | ParameterSyntax::EnumMember => Ok(Value::from(value)),
        ParameterSyntax::QmpOnly => Err(ParameterValueError::QmpOnly),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const NOT_A_SIZE_TAIL: &str = " expects a non-negative number below 2^64\n\
        Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
        and exabytes, respectively.";

    fn sent(name: &str, value: &str) -> Value {
        set_parameter_arguments(name, value)
            .unwrap_or_else(|error| panic!("{name} {value}: {error}"))
    }

    fn refused(name: &str, value: &str) -> String {
        match set_parameter_arguments(name, value) {
            Ok(arguments) => panic!("{name} {value} was accepted as {arguments}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn the_table_lists_every_parameter_once() {
        // QEMU's 29 and vmigrate's x-vmigrate-postcopy-after.
        assert_eq!(PARAMETERS.len(), 30);
        for (index, (name, _)) in PARAMETERS.iter().enumerate() {
            assert!(
                PARAMETERS[index + 1..]
                    .iter()
                    .all(|(other, _)| other != name),
                "{name} twice"
            );
        }
    }

    #[test]
    fn the_automatic_postcopy_switch_takes_plain_milliseconds() {
        assert_eq!(
            sent("x-vmigrate-postcopy-after", "5000"),
            json!({ "x-vmigrate-postcopy-after": 5000 })
        );
        assert_eq!(
            refused("x-vmigrate-postcopy-after", "5s"),
            "Parameter 'x-vmigrate-postcopy-after' expects uint64"
        );
    }

    #[test]
    fn bandwidths_default_to_mebibytes() {
        for name in ["max-bandwidth", "avail-switchover-bandwidth"] {
            assert_eq!(sent(name, "5"), json!({ name: 5_242_880 }));
            assert_eq!(sent(name, "100k"), json!({ name: 102_400 }));
            assert_eq!(sent(name, "1.5M"), json!({ name: 1_572_864 }));
            assert_eq!(sent(name, "1.5"), json!({ name: 1_572_864 }));
            assert_eq!(sent(name, "0x10"), json!({ name: 16_777_216 }));
            assert_eq!(
                sent(name, "8796093022207"),
                json!({ name: 9_223_372_036_853_727_232_u64 })
            );
            for bad in [
                "-5",
                "abc",
                "8796093022208",
                "9223372036854775807",
                "1.5b",
                "0x10k",
                "",
            ] {
                assert_eq!(refused(name, bad), format!("Invalid size {bad}"));
            }
        }
    }

    #[test]
    fn byte_sizes_and_plain_64_bit_integers() {
        for name in [
            "announce-initial",
            "downtime-limit",
            "max-postcopy-bandwidth",
            "vcpu-dirty-limit",
            "x-vcpu-dirty-limit-period",
        ] {
            assert_eq!(sent(name, "5"), json!({ name: 5 }));
            assert_eq!(sent(name, "1k"), json!({ name: 1024 }));
            assert_eq!(sent(name, "0x10"), json!({ name: 16 }));
            assert_eq!(sent(name, "010"), json!({ name: 10 }));
            assert_eq!(sent(name, "1.5M"), json!({ name: 1_572_864 }));
            for bad in ["1.5", "abc", "1e3", "0x10k", ""] {
                assert_eq!(
                    refused(name, bad),
                    format!("Parameter '{name}'{NOT_A_SIZE_TAIL}")
                );
            }
            for bad in ["-5", "-0", "18446744073709551616"] {
                assert_eq!(
                    refused(name, bad),
                    format!("Value '{bad}' is out of range for parameter '{name}'")
                );
            }
        }
        assert_eq!(
            sent("max-postcopy-bandwidth", "0xffffffffffffffff"),
            json!({ "max-postcopy-bandwidth": u64::MAX })
        );
    }

    #[test]
    fn cache_size_is_capped_at_i64_max() {
        assert_eq!(
            sent("xbzrle-cache-size", "1g"),
            json!({ "xbzrle-cache-size": 1_073_741_824 })
        );
        assert_eq!(
            refused("xbzrle-cache-size", "9223372036854775808"),
            "Invalid size 9223372036854775808"
        );
        assert_eq!(
            refused("xbzrle-cache-size", "-5"),
            "Value '-5' is out of range for parameter 'xbzrle-cache-size'"
        );
        // The power-of-two rule is the QMP command's to enforce.
        assert_eq!(
            sent("xbzrle-cache-size", "5"),
            json!({ "xbzrle-cache-size": 5 })
        );
    }

    #[test]
    fn narrow_integers() {
        assert_eq!(
            sent("multifd-channels", "0x10"),
            json!({ "multifd-channels": 16 })
        );
        assert_eq!(
            sent("multifd-channels", "010"),
            json!({ "multifd-channels": 8 })
        );
        assert_eq!(
            sent("multifd-channels", "0"),
            json!({ "multifd-channels": 0 })
        );
        assert_eq!(
            sent("x-checkpoint-delay", "256"),
            json!({ "x-checkpoint-delay": 256 })
        );
        for bad in ["256", "-1", "-5", "4294967296", "18446744073709551615"] {
            assert_eq!(
                refused("multifd-channels", bad),
                "Parameter 'multifd-channels' expects uint8_t"
            );
        }
        for bad in ["abc", "1k", "1.5", "08", "0x", "18446744073709551616"] {
            assert_eq!(
                refused("cpu-throttle-initial", bad),
                "Parameter 'cpu-throttle-initial' expects uint64"
            );
        }
        assert_eq!(
            refused("x-checkpoint-delay", "4294967296"),
            "Parameter 'x-checkpoint-delay' expects uint32_t"
        );
    }

    #[test]
    fn booleans() {
        for word in ["on", "yes", "y", "true"] {
            assert_eq!(sent("direct-io", word), json!({ "direct-io": true }));
        }
        for word in ["off", "no", "n", "false"] {
            assert_eq!(
                sent("cpu-throttle-tailslow", word),
                json!({ "cpu-throttle-tailslow": false })
            );
        }
        for bad in ["ON", "1", "0", ""] {
            assert_eq!(
                refused("cpu-throttle-tailslow", bad),
                "Parameter 'cpu-throttle-tailslow' expects 'on' or 'off'"
            );
        }
    }

    #[test]
    fn strings_enums_and_refusals() {
        assert_eq!(sent("tls-creds", "''"), json!({ "tls-creds": "''" }));
        assert_eq!(sent("tls-authz", ""), json!({ "tls-authz": "" }));
        assert_eq!(sent("mode", "nope"), json!({ "mode": "nope" }));
        assert_eq!(
            sent("multifd-compression", "zstd"),
            json!({ "multifd-compression": "zstd" })
        );
        assert_eq!(
            refused("block-bitmap-mapping", "[]"),
            "The block-bitmap-mapping parameter can only be set through QMP"
        );
        assert_eq!(refused("nosuch", "5"), "invalid parameter value: nosuch");
    }
}
