//! Splitting an HMP command line into a command name and typed arguments, with QEMU's
//! argument-parser error messages.

use thiserror::Error;

use crate::expression::{parse_expression, ExpressionError};

/// The kinds of arguments the implemented commands take (QEMU's `args_type` letters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgumentKind {
    /// `-x`: an optional single-letter flag; `letter` is the `x`.
    Flag {
        /// The flag letter that follows the dash.
        letter: char,
    },
    /// `s`: a required string, either one whitespace-free word or a double-quoted string.
    Word,
    /// `s?`: a string that may be left out (only at the end of the line).
    OptionalWord,
    /// `b`: a required `on` or `off`.
    OnOff,
    /// `l`: a required integer expression.
    Integer,
    /// `l?`: an integer expression that may be left out (only at the end of the line).
    OptionalInteger,
}

/// One parsed argument value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgumentValue {
    /// A flag was present (`true`) or absent (`false`).
    Flag(bool),
    /// A string argument.
    Word(String),
    /// An optional string argument.
    OptionalWord(Option<String>),
    /// An `on`/`off` argument.
    OnOff(bool),
    /// An integer argument (`None`: an optional one left out).
    Integer(Option<i64>),
}

/// A problem inside a double-quoted string, printed on its own line before the argument error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum QuotedStringError {
    /// The closing quote is missing.
    #[error("unterminated string")]
    Unterminated,
    /// A backslash is followed by something other than `\`, `'`, `"`, `n` or `r`.
    #[error("unsupported escape code: '\\{0}'")]
    UnsupportedEscape(char),
}

/// Why the arguments of a command were refused, before the command ran.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ArgumentError {
    /// A string argument is missing or malformed.
    #[error("string expected")]
    StringExpected(Option<QuotedStringError>),
    /// An `on`/`off` argument is something else.
    #[error("Expected 'on' or 'off'")]
    ExpectedOnOff,
    /// A dash option that the command does not have (the text after the dash: one character,
    /// or nothing when the line ends in a dash).
    #[error("unsupported option -{0}")]
    UnsupportedOption(String),
    /// Text is left after the last argument.
    #[error("extraneous characters at the end of line")]
    ExtraneousCharacters,
    /// An integer argument is not a valid expression.
    #[error(transparent)]
    Expression(#[from] ExpressionError),
}

impl ArgumentError {
    /// The monitor text for this error: QEMU names the command (`table_name`, e.g. `stop|s`)
    /// for most errors and ends with a pointer to `help <typed_path>`.
    pub fn render(&self, table_name: &str, typed_path: &str) -> String {
        let mut text = String::new();
        match self {
            ArgumentError::StringExpected(Some(quoted)) => {
                text.push_str(&format!("{quoted}\n{table_name}: {self}\n"));
            }
            ArgumentError::ExpectedOnOff | ArgumentError::Expression(_) => {
                text.push_str(&format!("{self}\n"))
            }
            _ => text.push_str(&format!("{table_name}: {self}\n")),
        }
        text.push_str(&format!("Try \"help {typed_path}\" for more information\n"));
        text
    }
}

/// Whitespace as C `isspace` sees it.
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// Returns `text` without leading whitespace.
pub fn skip_spaces(text: &str) -> &str {
    text.trim_start_matches(is_space)
}

/// Splits off the first whitespace-delimited word: `(word, rest)`.
pub fn split_word(text: &str) -> (&str, &str) {
    let text = skip_spaces(text);
    let end = text.find(is_space).unwrap_or(text.len());
    text.split_at(end)
}

/// Reads one string argument (unquoted word or double-quoted string) from the start of `text`.
fn read_string(text: &str) -> Result<(String, &str), ArgumentError> {
    let text = skip_spaces(text);
    if text.is_empty() {
        return Err(ArgumentError::StringExpected(None));
    }
    let Some(quoted) = text.strip_prefix('"') else {
        let (word, rest) = split_word(text);
        return Ok((word.to_owned(), rest));
    };
    let mut value = String::new();
    let mut chars = quoted.char_indices();
    while let Some((index, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &quoted[index + 1..])),
            '\\' => match chars.next() {
                Some((_, '\\')) => value.push('\\'),
                Some((_, '\'')) => value.push('\''),
                Some((_, '"')) => value.push('"'),
                Some((_, 'n')) => value.push('\n'),
                Some((_, 'r')) => value.push('\r'),
                Some((_, other)) => {
                    return Err(ArgumentError::StringExpected(Some(
                        QuotedStringError::UnsupportedEscape(other),
                    )))
                }
                None => break,
            },
            other => value.push(other),
        }
    }
    Err(ArgumentError::StringExpected(Some(
        QuotedStringError::Unterminated,
    )))
}

/// Parses `text` (everything after the command name) against `kinds`, in order.
///
/// Flags are matched the way QEMU does: a `-y` seen where flag `x` is expected is left for a
/// later flag `y` of the same command, and an unknown letter is an error.
pub fn parse_arguments(
    kinds: &[ArgumentKind],
    text: &str,
) -> Result<Vec<ArgumentValue>, ArgumentError> {
    let mut rest = text;
    let mut values = Vec::with_capacity(kinds.len());
    for (position, kind) in kinds.iter().enumerate() {
        match *kind {
            ArgumentKind::Flag { letter } => {
                let candidate = skip_spaces(rest);
                let mut present = false;
                if let Some(after_dash) = candidate.strip_prefix('-') {
                    let given = after_dash.chars().next();
                    if given == Some(letter) {
                        present = true;
                        rest = &after_dash[letter.len_utf8()..];
                    } else {
                        let later_flag = kinds[position + 1..].iter().any(|later| {
                            matches!(later, ArgumentKind::Flag { letter } if Some(*letter) == given)
                        });
                        if !later_flag {
                            return Err(ArgumentError::UnsupportedOption(
                                given.map(String::from).unwrap_or_default(),
                            ));
                        }
                    }
                }
                values.push(ArgumentValue::Flag(present));
            }
            ArgumentKind::Word => {
                let (word, after) = read_string(rest)?;
                rest = after;
                values.push(ArgumentValue::Word(word));
            }
            ArgumentKind::OptionalWord => {
                if skip_spaces(rest).is_empty() {
                    values.push(ArgumentValue::OptionalWord(None));
                } else {
                    let (word, after) = read_string(rest)?;
                    rest = after;
                    values.push(ArgumentValue::OptionalWord(Some(word)));
                }
            }
            ArgumentKind::Integer | ArgumentKind::OptionalInteger => {
                if *kind == ArgumentKind::OptionalInteger && skip_spaces(rest).is_empty() {
                    values.push(ArgumentValue::Integer(None));
                } else {
                    let (value, after) = parse_expression(rest)?;
                    rest = after;
                    values.push(ArgumentValue::Integer(Some(value)));
                }
            }
            ArgumentKind::OnOff => {
                let (word, after) = split_word(rest);
                let state = match word {
                    "on" => true,
                    "off" => false,
                    _ => return Err(ArgumentError::ExpectedOnOff),
                };
                rest = after;
                values.push(ArgumentValue::OnOff(state));
            }
        }
    }
    if !skip_spaces(rest).is_empty() {
        return Err(ArgumentError::ExtraneousCharacters);
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIGRATE: &[ArgumentKind] = &[
        ArgumentKind::Flag { letter: 'd' },
        ArgumentKind::Flag { letter: 'r' },
        ArgumentKind::Word,
    ];

    fn words(values: &[ArgumentValue]) -> Vec<String> {
        values
            .iter()
            .filter_map(|value| match value {
                ArgumentValue::Word(word) => Some(word.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn flags_in_order_and_skipped_ahead() {
        let parsed = parse_arguments(MIGRATE, " -d -r tcp:1:2").unwrap();
        assert_eq!(
            parsed,
            vec![
                ArgumentValue::Flag(true),
                ArgumentValue::Flag(true),
                ArgumentValue::Word("tcp:1:2".into())
            ]
        );
        let parsed = parse_arguments(MIGRATE, "-r unix:/x").unwrap();
        assert_eq!(parsed[0], ArgumentValue::Flag(false));
        assert_eq!(parsed[1], ArgumentValue::Flag(true));
    }

    #[test]
    fn flag_errors_match_qemu() {
        assert_eq!(
            parse_arguments(MIGRATE, "-x tcp:1"),
            Err(ArgumentError::UnsupportedOption("x".into()))
        );
        assert_eq!(
            parse_arguments(MIGRATE, "-d -d unix:/x"),
            Err(ArgumentError::UnsupportedOption("d".into()))
        );
        // "-dr" sets -d, then "r" is taken as the URI and the real URI is left over.
        assert_eq!(
            parse_arguments(MIGRATE, "-dr unix:/x"),
            Err(ArgumentError::ExtraneousCharacters)
        );
    }

    #[test]
    fn quoted_strings() {
        let kinds = &[ArgumentKind::Word];
        assert_eq!(words(&parse_arguments(kinds, r#""a b""#).unwrap()), ["a b"]);
        assert_eq!(
            words(&parse_arguments(kinds, r#""x\\y\"""#).unwrap()),
            [r#"x\y""#]
        );
        assert_eq!(words(&parse_arguments(kinds, "''").unwrap()), ["''"]);
        assert_eq!(words(&parse_arguments(kinds, r#""""#).unwrap()), [""]);
        assert_eq!(
            parse_arguments(kinds, r#""a b"#),
            Err(ArgumentError::StringExpected(Some(
                QuotedStringError::Unterminated
            )))
        );
        assert_eq!(
            parse_arguments(kinds, r#""a\x""#),
            Err(ArgumentError::StringExpected(Some(
                QuotedStringError::UnsupportedEscape('x')
            )))
        );
        assert_eq!(
            parse_arguments(kinds, "   "),
            Err(ArgumentError::StringExpected(None))
        );
    }

    #[test]
    fn on_off_is_exact() {
        let kinds = &[ArgumentKind::OnOff];
        assert_eq!(
            parse_arguments(kinds, " on "),
            Ok(vec![ArgumentValue::OnOff(true)])
        );
        assert_eq!(
            parse_arguments(kinds, "off"),
            Ok(vec![ArgumentValue::OnOff(false)])
        );
        for bad in ["yes", "onx", "\"on\"", "o", ""] {
            assert_eq!(
                parse_arguments(kinds, bad),
                Err(ArgumentError::ExpectedOnOff),
                "{bad}"
            );
        }
    }

    #[test]
    fn integers_and_optional_arguments() {
        const CALC: &[ArgumentKind] = &[
            ArgumentKind::Flag { letter: 'r' },
            ArgumentKind::Flag { letter: 'b' },
            ArgumentKind::Integer,
            ArgumentKind::OptionalInteger,
        ];
        assert_eq!(
            parse_arguments(CALC, "-b 1"),
            Ok(vec![
                ArgumentValue::Flag(false),
                ArgumentValue::Flag(true),
                ArgumentValue::Integer(Some(1)),
                ArgumentValue::Integer(None)
            ])
        );
        // "1 -5" is one expression: 1 - 5
        assert_eq!(
            parse_arguments(CALC, "1 -5")
                .unwrap()
                .get(2..)
                .map(<[ArgumentValue]>::to_vec),
            Some(vec![
                ArgumentValue::Integer(Some(-4)),
                ArgumentValue::Integer(None)
            ])
        );
        assert_eq!(
            parse_arguments(CALC, "-5"),
            Err(ArgumentError::UnsupportedOption("5".into()))
        );
        assert_eq!(
            parse_arguments(CALC, ""),
            Err(ArgumentError::Expression(ExpressionError::UnexpectedEnd))
        );
        assert_eq!(
            parse_arguments(CALC, "1 2 3"),
            Err(ArgumentError::ExtraneousCharacters)
        );
        let savevm = &[ArgumentKind::OptionalWord];
        assert_eq!(
            parse_arguments(savevm, "  "),
            Ok(vec![ArgumentValue::OptionalWord(None)])
        );
        assert_eq!(
            parse_arguments(savevm, "\"a b\""),
            Ok(vec![ArgumentValue::OptionalWord(Some("a b".into()))])
        );
        assert_eq!(
            parse_arguments(savevm, "a b"),
            Err(ArgumentError::ExtraneousCharacters)
        );
    }

    #[test]
    fn rendering_names_the_command_and_help_path() {
        assert_eq!(
            ArgumentError::ExtraneousCharacters.render("stop|s", "s"),
            "stop|s: extraneous characters at the end of line\nTry \"help s\" for more information\n"
        );
        assert_eq!(
            ArgumentError::StringExpected(Some(QuotedStringError::UnsupportedEscape('x')))
                .render("migrate_incoming", "migrate_incoming"),
            "unsupported escape code: '\\x'\nmigrate_incoming: string expected\nTry \"help migrate_incoming\" for more information\n"
        );
        assert_eq!(
            ArgumentError::ExpectedOnOff.render("migrate_set_capability", "migrate_set_capability"),
            "Expected 'on' or 'off'\nTry \"help migrate_set_capability\" for more information\n"
        );
        assert_eq!(
            ArgumentError::Expression(ExpressionError::InvalidChar('x'))
                .render("calc_dirty_rate", "calc_dirty_rate"),
            "invalid char 'x' in expression\nTry \"help calc_dirty_rate\" for more information\n"
        );
    }
}
