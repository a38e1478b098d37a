//! Authorization of a TLS client by its certificate's subject (`tls-authz`): QEMU's
//! `authz-simple` and `authz-list` checks, with fnmatch(3) globs.

/// An authorization check on a client certificate's subject (`tls-authz`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authz {
    /// `authz-simple`: exactly one identity is allowed.
    Simple { identity: String },
    /// `authz-list`: the first rule that matches decides, else the list's policy.
    List {
        policy: Policy,
        rules: Vec<AuthzRule>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchFormat {
    Exact,
    Glob,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzRule {
    pub pattern: String,
    pub policy: Policy,
    pub format: MatchFormat,
}

impl Authz {
    pub fn is_allowed(&self, identity: &str) -> bool {
        match self {
            Authz::Simple { identity: allowed } => allowed == identity,
            Authz::List { policy, rules } => {
                let decided = rules.iter().find(|r| match r.format {
                    MatchFormat::Exact => r.pattern == identity,
                    MatchFormat::Glob => glob_match(r.pattern.as_bytes(), identity.as_bytes()),
                });
                decided.map_or(*policy, |r| r.policy) == Policy::Allow
            }
        }
    }
}

/// fnmatch(3) without flags: `*`, `?`, `[...]` (with `!` or `^` negation and
/// ranges), `\` quoting the next character.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative, with one backtrack point for the last `*`: linear in practice and
    // never recursive, whatever the pattern.
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        let step = match pattern.get(p) {
            Some(b'*') => {
                star = Some((p + 1, t));
                p += 1;
                continue;
            }
            Some(b'?') => Some(p + 1),
            Some(b'[') => match class_match(pattern, p, text[t]) {
                Some((true, next)) => Some(next),
                Some((false, _)) => None,
                // An unclosed `[` is an ordinary character.
                None => (text[t] == b'[').then_some(p + 1),
            },
            Some(b'\\') if p + 1 < pattern.len() => (pattern[p + 1] == text[t]).then_some(p + 2),
            Some(&c) => (c == text[t]).then_some(p + 1),
            None => None,
        };
        match step {
            Some(next) => {
                p = next;
                t += 1;
            }
            None => match star {
                Some((sp, st)) => {
                    p = sp;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Matches `c` against the bracket expression at `pattern[start]`: (matched, index
/// after the `]`), or `None` when it has no closing bracket.
fn class_match(pattern: &[u8], start: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(pattern.get(i), Some(b'!') | Some(b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let lo = *pattern.get(i)?;
        if lo == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if pattern.get(i + 1) == Some(&b'-') && pattern.get(i + 2).is_some_and(|&h| h != b']') {
            let hi = pattern[i + 2];
            matched |= lo <= c && c <= hi;
            i += 3;
        } else {
            matched |= lo == c;
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_follows_fnmatch() {
        let g = |p: &str, t: &str| glob_match(p.as_bytes(), t.as_bytes());
        assert!(g("CN=*,O=Example", "CN=host1,O=Example"));
        assert!(g("*", ""));
        assert!(g("a?c", "abc"));
        assert!(!g("a?c", "ac"));
        assert!(g("[a-c]x", "bx"));
        assert!(!g("[!a-c]x", "bx"));
        assert!(g("[]]", "]"));
        assert!(g("\\*", "*"));
        assert!(!g("\\*", "x"));
        assert!(g("*a*b*c", "xxaxxbxxc"));
        assert!(!g("*a*b*c", "xxaxxbxx"));
        assert!(g("[", "["));
        // no exponential blow-up on a pathological pattern
        let text = "a".repeat(5000);
        assert!(!g(&format!("{}b", "*a".repeat(50)), &text));
    }

    #[test]
    fn authz_list_first_matching_rule_decides() {
        let a = Authz::List {
            policy: Policy::Deny,
            rules: vec![
                AuthzRule {
                    pattern: "CN=bad,O=x".into(),
                    policy: Policy::Deny,
                    format: MatchFormat::Exact,
                },
                AuthzRule {
                    pattern: "CN=*,O=x".into(),
                    policy: Policy::Allow,
                    format: MatchFormat::Glob,
                },
            ],
        };
        assert!(a.is_allowed("CN=good,O=x"));
        assert!(!a.is_allowed("CN=bad,O=x"));
        assert!(!a.is_allowed("CN=good,O=y"));
    }
}
