//! A search's id filter: an id, or an id with `*` wildcards.
//!
//! The store matches it inside one Redis script, and a script cannot be
//! interrupted: Redis serves nobody until it returns, answers no `BUSY`
//! while the matcher runs in one C call, and ignores `SCRIPT KILL`. So the
//! cost of one match must not depend on the pattern's shape, only on its
//! length and the id's. A backtracking matcher (a Lua pattern `^a.*b.*c$`)
//! is exponential in the number of stars; this one is not:
//!
//! - runs of `*` are one `*` (they match the same ids);
//! - the text between stars is a list of literal pieces; the first must
//!   start the id, the last must end it, and each middle piece is found,
//!   leftmost, after the one before. Leftmost is always right: a piece found
//!   further left leaves more room for the pieces after it. So one match is
//!   at most one substring search per piece, never a retry;
//! - at most [`IdPattern::MAX_WILDCARDS`] stars, and the pattern is no
//!   longer than an id, so the work per id examined has a fixed ceiling.
//!
//! [`IdPattern::matches`] is the same rule in Rust; `search.lua`'s
//! `glob_match` is its twin, and the integration tests check the two
//! against a plain reference matcher.

use std::fmt;

use super::ids::{IdError, PromiseId};

/// A parsed id filter (see the module docs). Built only by
/// [`IdPattern::parse`] or [`IdPattern::any`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdPattern(String);

impl IdPattern {
    /// Stars a pattern may hold once runs are collapsed. Eight covers every
    /// filter an operator types (`team-*-2026-*`) with room to spare.
    pub const MAX_WILDCARDS: usize = 8;

    /// Every id.
    pub fn any() -> Self {
        Self("*".into())
    }

    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() || s.len() > PromiseId::MAX_LEN {
            return Err(IdError::PatternLength(s.chars().count()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(*c == '*' || PromiseId::is_id_char(*c)))
        {
            return Err(IdError::PatternChar(c));
        }
        let mut glob = String::with_capacity(s.len());
        for c in s.chars() {
            if !(c == '*' && glob.ends_with('*')) {
                glob.push(c);
            }
        }
        let stars = glob.matches('*').count();
        if stars > Self::MAX_WILDCARDS {
            return Err(IdError::PatternWildcards(stars));
        }
        Ok(Self(glob))
    }

    /// The pattern with runs of `*` collapsed: what the store matches.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Does it match every id?
    pub fn is_any(&self) -> bool {
        self.0 == "*"
    }

    /// The one id it names, when it has no wildcard.
    pub fn exact(&self) -> Option<PromiseId> {
        if self.0.contains('*') {
            None
        } else {
            PromiseId::parse(&self.0).ok()
        }
    }

    /// Linear-time glob match (the module docs say why it is right).
    pub fn matches(&self, id: &str) -> bool {
        let pieces: Vec<&str> = self.0.split('*').collect();
        let (first, rest) = match pieces.split_first() {
            Some(x) => x,
            None => return id.is_empty(),
        };
        let Some((last, middle)) = rest.split_last() else {
            return id == *first;
        };
        if id.len() < first.len() + last.len() || !id.starts_with(first) || !id.ends_with(last) {
            return false;
        }
        let mut hay = &id[first.len()..id.len() - last.len()];
        for piece in middle {
            match hay.find(piece) {
                Some(at) => hay = &hay[at + piece.len()..],
                None => return false,
            }
        }
        true
    }
}

impl Default for IdPattern {
    fn default() -> Self {
        Self::any()
    }
}

impl fmt::Display for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The plain definition of a `*` glob, by dynamic programming over every
/// pair of positions: obviously right, quadratic; for tests (the
/// integration tests hold the store's matcher to it).
#[doc(hidden)]
pub fn reference_match(glob: &str, id: &str) -> bool {
    let (g, s) = (glob.as_bytes(), id.as_bytes());
    // m[j]: does g[..i] match s[..j], for the current i.
    let mut m = vec![false; s.len() + 1];
    m[0] = true;
    for &gc in g {
        let mut next = vec![false; s.len() + 1];
        if gc == b'*' {
            let mut any = false;
            for j in 0..=s.len() {
                any |= m[j];
                next[j] = any;
            }
        } else {
            for j in 1..=s.len() {
                next[j] = m[j - 1] && s[j - 1] == gc;
            }
        }
        m = next;
    }
    m[s.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_collapses_runs_and_bounds_stars() {
        assert_eq!(IdPattern::parse("a***b*").unwrap().as_str(), "a*b*");
        assert_eq!(IdPattern::parse("**********Z").unwrap().as_str(), "*Z");
        assert!(IdPattern::parse("*").unwrap().is_any());
        assert!(IdPattern::parse(&"*a".repeat(8)).is_ok());
        assert_eq!(
            IdPattern::parse(&"*a".repeat(9)),
            Err(IdError::PatternWildcards(9))
        );
        assert_eq!(IdPattern::parse(""), Err(IdError::PatternLength(0)));
        assert_eq!(IdPattern::parse("a b*"), Err(IdError::PatternChar(' ')));
        assert_eq!(IdPattern::parse("a%"), Err(IdError::PatternChar('%')));
        assert_eq!(
            IdPattern::parse("nightly-1").unwrap().exact(),
            Some(PromiseId::parse("nightly-1").unwrap())
        );
        assert_eq!(IdPattern::parse("nightly-*").unwrap().exact(), None);
    }

    #[test]
    fn matches_by_example() {
        let p = |s: &str| IdPattern::parse(s).unwrap();
        assert!(p("nightly-*").matches("nightly-sales"));
        assert!(!p("nightly-*").matches("weekly-sales"));
        assert!(p("*-sales-*").matches("nightly-sales-2026"));
        assert!(p("a*a").matches("aa"));
        assert!(!p("a*a").matches("a"));
        assert!(p("*a*a*a*a*b").matches(&format!("{}b", "a".repeat(199))));
        assert!(!p("*a*a*a*a*b").matches(&"a".repeat(200)));
        assert!(p("exact").matches("exact"));
        assert!(!p("exact").matches("exact2"));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: crate::domain::hostile_cases(), failure_persistence: None, ..ProptestConfig::default() })]

        /// Over a small alphabet, so that pieces overlap and repeat: the
        /// linear matcher agrees with the reference on every pair.
        #[test]
        fn agrees_with_the_reference(glob in "[ab*-]{1,12}", id in "[ab-]{0,16}") {
            if let Ok(p) = IdPattern::parse(&glob) {
                prop_assert_eq!(p.matches(&id), reference_match(&glob, &id), "{} ~ {}", glob, id);
            }
        }
    }
}
