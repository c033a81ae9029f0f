//! Per-export access: which clients may open which exports
//! (`--allow EXPORT_PATTERN=NAME[,NAME...]`) and which exports are served
//! read-only (`--read-only-export PATTERN`).
//!
//! A client's name is its identity from TLS (certificate CN or PSK user);
//! a connection without TLS has none. Export names are `ORIGIN` or
//! `ORIGIN@TAG`; patterns are globs over the whole name, `*` any run of
//! characters (`@` included), `?` exactly one, everything else literal.
//! There is no escape: an origin id may itself hold `*` or `?`, and then
//! the wildcard also matches that character.
//!
//! Rules: an export that no `--allow` pattern matches is open to every
//! client, named or not. One that some match may be opened only by the
//! clients that any of the matching rules names (the rules are an allow
//! list, so two rules for one export add up; none takes away what another
//! grants). Read-only patterns only add read-only-ness.
//!
//! The policy is applied where negotiation resolves a name, on the
//! canonical name (the default export's real name for ""); that is sound
//! only because every export has exactly one name the catalogue opens
//! (see `backend::Catalog::open`).

use std::fmt;
use std::str::FromStr;

/// A bad `--allow` or `--read-only-export` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("'{0}' is not of the form EXPORT_PATTERN=NAME[,NAME...]")]
    NoEquals(String),
    #[error("the export pattern is empty")]
    EmptyPattern,
    #[error(
        "export pattern {0:?} can never match an export name (export names are printable \
         ASCII without '/' or '='; '*' and '?' are the wildcards)"
    )]
    BadPattern(String),
    #[error("'{0}' names no client after '='")]
    NoClients(String),
    #[error("client name {name:?} in '{rule}': {why}")]
    BadClient {
        rule: String,
        name: String,
        why: &'static str,
    },
}

/// A glob over export names (see the module docs for the syntax).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportPattern {
    /// Printable ASCII without '/' or '=' (checked at parse time).
    glob: String,
}

impl FromStr for ExportPattern {
    type Err = AccessError;
    fn from_str(s: &str) -> Result<Self, AccessError> {
        if s.is_empty() {
            return Err(AccessError::EmptyPattern);
        }
        // The characters an export name can hold (`validate_id` plus '@'
        // and digits): anything else is a typo that would silently match
        // nothing, and so protect or open nothing.
        let valid = s
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b'='));
        if !valid {
            return Err(AccessError::BadPattern(s.to_string()));
        }
        Ok(ExportPattern {
            glob: s.to_string(),
        })
    }
}

impl fmt::Display for ExportPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.glob)
    }
}

impl ExportPattern {
    /// Whether the whole of `export` matches.
    pub fn matches(&self, export: &str) -> bool {
        glob_matches(self.glob.as_bytes(), export)
    }
}

/// Glob match of an ASCII pattern against a whole name, in time at worst
/// the product of their lengths (names come from the network: no
/// exponential backtracking). Only the last `*` seen is ever retried: whatever an
/// earlier star matched, a later one can absorb the difference.
fn glob_matches(pattern: &[u8], name: &str) -> bool {
    let name: Vec<char> = name.chars().collect();
    let (mut p, mut n) = (0usize, 0usize);
    // The last star's position in the pattern, and where in the name the
    // text after it is being tried from.
    let mut retry: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                retry = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || char::from(c) == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match retry {
                // Let the star take one more character and try again.
                Some((star, from)) => {
                    assert!(from < name.len(), "a retry always has a character left");
                    retry = Some((star, from + 1));
                    p = star + 1;
                    n = from + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// One `--allow PATTERN=NAME[,NAME...]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowRule {
    pattern: ExportPattern,
    /// Never empty; each name non-empty and exact.
    clients: Vec<String>,
}

impl FromStr for AllowRule {
    type Err = AccessError;
    fn from_str(s: &str) -> Result<Self, AccessError> {
        // Export names cannot hold '=', so the first one ends the pattern.
        let Some((pattern, names)) = s.split_once('=') else {
            return Err(AccessError::NoEquals(s.to_string()));
        };
        let pattern: ExportPattern = pattern.parse()?;
        if names.is_empty() {
            return Err(AccessError::NoClients(s.to_string()));
        }
        let bad = |name: &str, why| AccessError::BadClient {
            rule: s.to_string(),
            name: name.to_string(),
            why,
        };
        let mut clients = Vec::new();
        for name in names.split(',') {
            if name.is_empty() {
                return Err(bad(name, "empty (a stray ',')"));
            }
            if name.trim() != name {
                return Err(bad(
                    name,
                    "leading or trailing spaces (names match exactly)",
                ));
            }
            if name.chars().any(char::is_control) {
                return Err(bad(name, "control characters"));
            }
            if name.contains(['*', '?']) {
                return Err(bad(name, "client names are exact, not patterns"));
            }
            clients.push(name.to_string());
        }
        assert!(!clients.is_empty(), "a non-empty list splits into names");
        Ok(AllowRule { pattern, clients })
    }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.pattern, self.clients.join(","))
    }
}

/// Who may open which export, and which exports are read-only. The
/// default is open to all, nothing read-only.
#[derive(Clone, Debug, Default)]
pub struct AccessPolicy {
    allow: Vec<AllowRule>,
    read_only: Vec<ExportPattern>,
}

impl AccessPolicy {
    pub fn new(allow: Vec<AllowRule>, read_only: Vec<ExportPattern>) -> AccessPolicy {
        AccessPolicy { allow, read_only }
    }

    /// Whether any `--allow` rule restricts some exports.
    pub fn restricts(&self) -> bool {
        !self.allow.is_empty()
    }

    /// Whether `client` (its TLS identity; `None` without TLS) may open,
    /// list or query `export` (a canonical export name).
    pub fn may_open(&self, export: &str, client: Option<&str>) -> bool {
        let mut restricted = false;
        for rule in self.allow.iter().filter(|r| r.pattern.matches(export)) {
            if client.is_some_and(|c| rule.clients.iter().any(|n| n == c)) {
                return true;
            }
            restricted = true;
        }
        !restricted
    }

    /// Whether `export` is served read-only by `--read-only-export`.
    pub fn read_only(&self, export: &str) -> bool {
        self.read_only.iter().any(|p| p.matches(export))
    }
}

impl fmt::Display for AccessPolicy {
    /// The flags that build this policy, for the start-up log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let allow = self.allow.iter().map(|r| format!("--allow {r}"));
        let ro = self
            .read_only
            .iter()
            .map(|p| format!("--read-only-export {p}"));
        let all: Vec<String> = allow.chain(ro).collect();
        match all.is_empty() {
            true => f.write_str("every export open to every client"),
            false => f.write_str(&all.join(" ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pattern(s: &str) -> ExportPattern {
        s.parse().unwrap()
    }

    fn rule(s: &str) -> AllowRule {
        s.parse().unwrap()
    }

    #[test]
    fn globs() {
        let cases = [
            ("sdb1", "sdb1", true),
            ("sdb1", "sdb1@1", false),
            ("sdb1", "sdb", false),
            ("sdb1@*", "sdb1@1", true),
            ("sdb1@*", "sdb1@12345", true),
            ("sdb1@*", "sdb1", false),
            ("sdb1@*", "sdb10@1", false),
            ("sdb1*", "sdb1", true),
            ("sdb1*", "sdb10@3", true),
            ("*", "", true),
            ("*", "anything@7", true),
            ("*@*", "o", false),
            ("*@*", "o@1", true),
            ("sdb?@1", "sdb2@1", true),
            ("sdb?@1", "sdb@1", false),
            ("sdb?@1", "sdb12@1", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyycd", false),
            ("a*b*c", "acb", false),
            ("**a", "a", true),
            ("?", "é", true),
        ];
        for (p, name, expect) in cases {
            assert_eq!(pattern(p).matches(name), expect, "{p:?} vs {name:?}");
        }
    }

    #[test]
    fn pattern_errors() {
        assert_eq!("".parse::<ExportPattern>(), Err(AccessError::EmptyPattern));
        for bad in ["a b", "a/b", "a=b", "é", "a\tb"] {
            assert_eq!(
                bad.parse::<ExportPattern>(),
                Err(AccessError::BadPattern(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn rule_errors() {
        let err = |s: &str| s.parse::<AllowRule>().unwrap_err();
        assert_eq!(err("sdb1"), AccessError::NoEquals("sdb1".into()));
        assert_eq!(err("sdb1="), AccessError::NoClients("sdb1=".into()));
        assert_eq!(err("=alice"), AccessError::EmptyPattern);
        assert!(matches!(err("sdb1=alice,"), AccessError::BadClient { .. }));
        assert!(matches!(
            err("sdb1=alice,,bob"),
            AccessError::BadClient { .. }
        ));
        assert!(matches!(
            err("sdb1=alice, bob"),
            AccessError::BadClient { .. }
        ));
        assert!(matches!(err("sdb1=*"), AccessError::BadClient { .. }));
        assert!(matches!(err("sdb1=a\nb"), AccessError::BadClient { .. }));
        assert!(matches!(err("a b=alice"), AccessError::BadPattern(_)));
        // Every message names the offending text.
        assert!(err("sdb1=alice,,bob")
            .to_string()
            .contains("sdb1=alice,,bob"));
        let ok = rule("sdb1@*=alice,Bob Smith,host-1.example");
        assert_eq!(ok.clients, ["alice", "Bob Smith", "host-1.example"]);
        assert_eq!(ok.to_string(), "sdb1@*=alice,Bob Smith,host-1.example");
        // Only the first '=' splits; the names may hold more.
        assert_eq!(rule("o=a=b").clients, ["a=b"]);
    }

    #[test]
    fn policy() {
        let p = AccessPolicy::new(
            vec![
                rule("sdb1@*=alice"),
                rule("sdb1@7=bob"),
                rule("secret=carol"),
            ],
            vec![pattern("sdb1@*"), pattern("ro?")],
        );
        // Matched by no rule: open to all, anonymous included.
        for c in [None, Some("alice"), Some("mallory")] {
            assert!(p.may_open("sdb1", c));
            assert!(p.may_open("sdb2@1", c));
        }
        assert!(p.may_open("sdb1@1", Some("alice")));
        assert!(!p.may_open("sdb1@1", Some("bob")));
        assert!(!p.may_open("sdb1@1", None));
        // Two matching rules add up.
        assert!(p.may_open("sdb1@7", Some("alice")));
        assert!(p.may_open("sdb1@7", Some("bob")));
        assert!(!p.may_open("sdb1@7", Some("carol")));
        // Names are exact: no case folding, no prefixes.
        assert!(!p.may_open("secret", Some("Carol")));
        assert!(!p.may_open("secret", Some("caro")));
        assert!(!p.may_open("secret", Some("")));
        assert!(p.read_only("sdb1@3"));
        assert!(p.read_only("ro1"));
        assert!(!p.read_only("sdb1"));
        assert!(!p.read_only("ro12"));
        let open = AccessPolicy::default();
        assert!(open.may_open("anything", None));
        assert!(!open.read_only("anything"));
        assert_eq!(open.to_string(), "every export open to every client");
        assert!(p.to_string().contains("--allow sdb1@7=bob"));
        assert!(p.to_string().contains("--read-only-export ro?"));
    }

    /// The textbook recursive definition of a glob match, exponential but
    /// obviously right, to check the linear-space matcher against.
    fn reference(p: &[u8], n: &[u8]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some((b'*', rest)) => (0..=n.len()).any(|i| reference(rest, &n[i..])),
            Some((&c, rest)) => {
                n.first().is_some_and(|&m| c == b'?' || c == m) && reference(rest, &n[1..])
            }
        }
    }

    proptest! {
        #[test]
        fn matcher_agrees_with_the_definition(
            p in "[ab@1*?]{1,8}",
            n in "[ab@1]{0,10}",
        ) {
            let got = pattern(&p).matches(&n);
            prop_assert_eq!(got, reference(p.as_bytes(), n.as_bytes()), "{} vs {}", p, n);
        }

        /// A name matches every pattern made from it by turning characters
        /// into '?' and runs into '*'.
        #[test]
        fn a_name_matches_its_generalisations(
            n in "[a-z0-9]{1,6}(@[1-9][0-9]{0,3})?",
            edits in proptest::collection::vec((0usize..16, 0usize..3, 0u8..3), 0..4),
        ) {
            // Each pattern byte, and whether it still stands for exactly
            // one byte of the name (only those may become '?': a '?' in
            // place of a '*' would demand a character).
            let mut p: Vec<(u8, bool)> = n.bytes().map(|b| (b, true)).collect();
            for (at, len, kind) in edits {
                let at = at % (p.len() + 1);
                let end = (at + len).min(p.len());
                match kind {
                    0 => {
                        p.splice(at..end, [(b'*', false)]);
                    }
                    1 if p.get(at).is_some_and(|&(_, one)| one) => p[at].0 = b'?',
                    _ => {}
                }
            }
            let p = String::from_utf8(p.iter().map(|&(b, _)| b).collect()).unwrap();
            prop_assert!(pattern(&p).matches(&n), "{} vs {}", p, n);
        }

        /// Adding an allow rule never opens an export to a client it does
        /// not name.
        #[test]
        fn a_rule_only_grants_what_it_names(
            rules in proptest::collection::vec(("[ab@*]{1,4}", "[xy]"), 0..4),
            extra in ("[ab@*]{1,4}", "[xy]"),
            export in "[ab@]{1,4}",
            client in proptest::option::of("[xyz]"),
        ) {
            let to_rule = |(p, c): &(String, String)| rule(&format!("{p}={c}"));
            let before = AccessPolicy::new(rules.iter().map(to_rule).collect(), vec![]);
            let mut all: Vec<AllowRule> = rules.iter().map(to_rule).collect();
            all.push(to_rule(&extra));
            let after = AccessPolicy::new(all, vec![]);
            let c = client.as_deref();
            if after.may_open(&export, c) && !before.may_open(&export, c) {
                prop_assert_eq!(c, Some(extra.1.as_str()));
            }
            // And no client is ever let in by a rule for the anonymous.
            if pattern(&extra.0).matches(&export) {
                prop_assert!(!after.may_open(&export, None));
            }
        }
    }
}
