//! Identifiers that cross a boundary, each built only by checked parsing.
//!
//! A value of one of these types is proof that the check ran: code that holds
//! a [`PromiseId`] never has to ask whether it is 1–200 safe characters.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// Why an identifier was refused. The message is shown to producers and
/// notebook authors, so it says what the rule is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("promise id must be 1-200 characters of [A-Za-z0-9._:/-], got {0} characters")]
    PromiseIdLength(usize),
    #[error("promise id may contain only [A-Za-z0-9._:/-]; found {0:?}")]
    PromiseIdChar(char),
    #[error(
        "promise id may not have a \".\" or \"..\" segment between slashes (it would name another path)"
    )]
    PromiseIdDotSegment,
    #[error(
        "an id filter must be 1-200 characters of [A-Za-z0-9._:/-] and * wildcards, got {0} characters"
    )]
    PatternLength(usize),
    #[error("an id filter may contain only [A-Za-z0-9._:/-] and * wildcards; found {0:?}")]
    PatternChar(char),
    #[error("an id filter may hold at most 8 * wildcards (runs of * count once), got {0}")]
    PatternWildcards(usize),
    #[error("run id must be a positive integer")]
    RunId,
    #[error("callback token is malformed")]
    CallbackToken,
}

/// The promise id: also the idempotency key of the whole request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PromiseId(String);

impl PromiseId {
    pub const MAX_LEN: usize = 200;

    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(IdError::PromiseIdLength(s.chars().count()));
        }
        if let Some(c) = s.chars().find(|c| !Self::is_id_char(*c)) {
            return Err(IdError::PromiseIdChar(c));
        }
        // In a URL path (`/promises/{id}`, the console's links) a "." or
        // ".." segment would be resolved away by browsers and proxies, so
        // the link of one promise would open another.
        if s.split('/').any(|seg| seg == "." || seg == "..") {
            return Err(IdError::PromiseIdDotSegment);
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A character an id may hold: `[A-Za-z0-9._:/-]` (an id filter adds `*`).
    pub(super) fn is_id_char(c: char) -> bool {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '-')
    }
}

impl fmt::Display for PromiseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Databricks run id (`run_id` in the Jobs API): a positive 64-bit integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId(u64);

impl RunId {
    pub fn new(n: u64) -> Result<Self, IdError> {
        if n == 0 {
            Err(IdError::RunId)
        } else {
            Ok(Self(n))
        }
    }

    pub fn parse(s: &str) -> Result<Self, IdError> {
        s.parse::<u64>()
            .map_err(|_| IdError::RunId)
            .and_then(Self::new)
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The `idempotency_token` sent to Databricks. Derived, never random, so that
/// a retry after any crash asks for the same run (docs/databricks-fidelity.md):
/// - version 2, every promise created since token versions exist:
///   `rb2-` + hex of the first 30 bytes of
///   SHA-256(workspace + "\0" + promise_id + "\0" + created_ms). The creation
///   time binds the token to one incarnation of the id: Databricks keeps a
///   token bound to its run as long as the run exists (up to 60 days), longer
///   than a settled promise is kept, so an id used again after its promise
///   expired must not find the old run.
/// - version 1, promises created before (no `tv` field): `rb1-` + the same
///   over workspace + "\0" + promise_id, so a deployment upgraded while
///   they were in flight launches no second run.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyToken(String);

impl IdempotencyToken {
    /// Version 1 (promises without a token version).
    pub fn derive(workspace: &str, promise_id: &PromiseId) -> Self {
        let mut h = Sha256::new();
        h.update(workspace.as_bytes());
        h.update([0u8]);
        h.update(promise_id.as_str().as_bytes());
        let digest = h.finalize();
        Self(format!("rb1-{}", hex::encode(&digest[..30])))
    }

    /// Version 2: bound to the promise's creation time (ms, Redis's clock).
    pub fn derive_v2(workspace: &str, promise_id: &PromiseId, created_ms: i64) -> Self {
        let mut h = Sha256::new();
        h.update(workspace.as_bytes());
        h.update([0u8]);
        h.update(promise_id.as_str().as_bytes());
        h.update([0u8]);
        h.update(created_ms.to_string().as_bytes());
        let digest = h.finalize();
        Self(format!("rb2-{}", hex::encode(&digest[..30])))
    }

    /// A later attempt's token: the first attempt's, the promise id and the
    /// attempt number, hashed (`rb3-`, 64 characters, Databricks' limit).
    pub(crate) fn derive_attempt(base: &IdempotencyToken, promise_id: &PromiseId, n: u32) -> Self {
        let mut h = Sha256::new();
        h.update(base.0.as_bytes());
        h.update([0u8]);
        h.update(promise_id.as_str().as_bytes());
        h.update([0u8]);
        h.update(n.to_string().as_bytes());
        let digest = h.finalize();
        Self(format!("rb3-{}", hex::encode(&digest[..30])))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A capability token. Holding it is the right to settle exactly one
/// promise, so it is never logged (its `Debug` is redacted).
/// - `v2.<created>.<mac>`: base64url(HMAC-SHA256(secret, "v2\0" + id + "\0" +
///   created)), where `created` is the promise's creation time (ms, Redis's
///   clock). It opens one incarnation of the id: once a settled promise has
///   expired and its id is used again, the old run's token (which Databricks
///   keeps in the run's parameters for up to 60 days) opens nothing.
/// - `v1.<mac>`: base64url(HMAC-SHA256(secret, id)), handed out before
///   tokens were bound. It still opens the promises created then (token
///   version below 3), never one created since.
#[derive(Clone, PartialEq, Eq)]
pub struct CallbackToken {
    text: String,
    /// What the token claims to open besides the id (under its MAC).
    bound: Incarnation,
    /// Where the MAC starts in `text`.
    mac_at: usize,
}

impl fmt::Debug for CallbackToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CallbackToken([REDACTED])")
    }
}

/// What a verified capability token opens besides its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incarnation {
    /// A `v1.` token: a promise of that id created before tokens were bound.
    Legacy,
    /// A `v2.` token: the promise of that id created at this ms.
    Created(i64),
}

const TOKEN_PREFIX: &str = "v1.";
const BOUND_PREFIX: &str = "v2.";
/// base64url without padding of a 32-byte MAC.
const TOKEN_MAC_LEN: usize = 43;

fn is_mac(mac: &str) -> bool {
    mac.len() == TOKEN_MAC_LEN
        && mac
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl CallbackToken {
    /// Checks the shape only; whether it opens a promise is [`CallbackSigner::verify`]'s job.
    /// A `v2.` creation time is written as the signer writes it (no sign,
    /// no leading zero), so one token has one text.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let (bound, mac_at) = if s.starts_with(TOKEN_PREFIX) {
            (Incarnation::Legacy, TOKEN_PREFIX.len())
        } else {
            let rest = s.strip_prefix(BOUND_PREFIX).ok_or(IdError::CallbackToken)?;
            let (created, _) = rest.split_once('.').ok_or(IdError::CallbackToken)?;
            let ms = created
                .parse::<i64>()
                .ok()
                .filter(|ms| *ms >= 0 && ms.to_string() == created)
                .ok_or(IdError::CallbackToken)?;
            (
                Incarnation::Created(ms),
                BOUND_PREFIX.len() + created.len() + 1,
            )
        };
        if !is_mac(&s[mac_at..]) {
            return Err(IdError::CallbackToken);
        }
        Ok(Self {
            text: s.to_owned(),
            bound,
            mac_at,
        })
    }

    /// The token text, for building the callback URL handed to the run.
    pub fn expose(&self) -> &str {
        &self.text
    }
}

type HmacSha256 = Hmac<Sha256>;

#[cfg(test)]
thread_local! {
    /// MACs computed on this thread (tests: that verification never stops early).
    static MACS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Signs and checks capability tokens. The first secret signs; every secret
/// verifies, so a secret can be rotated without refusing tokens already handed out.
#[derive(Clone)]
pub struct CallbackSigner {
    secrets: Vec<SecretString>,
}

impl fmt::Debug for CallbackSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CallbackSigner({} secrets)", self.secrets.len())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("at least one callback secret of 32 or more bytes is required (auth.callback_secrets)")]
pub struct NoSecret;

impl CallbackSigner {
    pub const MIN_SECRET_LEN: usize = 32;

    pub fn new(secrets: Vec<SecretString>) -> Result<Self, NoSecret> {
        if secrets.is_empty()
            || secrets
                .iter()
                .any(|s| s.expose_secret().len() < Self::MIN_SECRET_LEN)
        {
            return Err(NoSecret);
        }
        Ok(Self { secrets })
    }

    fn mac(secret: &SecretString, id: &PromiseId, bound: Incarnation) -> HmacSha256 {
        #[cfg(test)]
        MACS.with(|n| n.set(n.get() + 1));
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(secret.expose_secret().as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        match bound {
            Incarnation::Legacy => mac.update(id.as_str().as_bytes()),
            Incarnation::Created(ms) => {
                mac.update(b"v2\0");
                mac.update(id.as_str().as_bytes());
                mac.update(b"\0");
                mac.update(ms.to_string().as_bytes());
            }
        }
        mac
    }

    /// The token of the promise `id` created at `created_ms`.
    pub fn sign(&self, id: &PromiseId, created_ms: i64) -> CallbackToken {
        self.token(id, Incarnation::Created(created_ms))
    }

    /// A token of the id alone, as handed out for promises created before
    /// tokens were bound (their token version is below 3).
    pub fn sign_legacy(&self, id: &PromiseId) -> CallbackToken {
        self.token(id, Incarnation::Legacy)
    }

    fn token(&self, id: &PromiseId, bound: Incarnation) -> CallbackToken {
        let head = match bound {
            Incarnation::Legacy => TOKEN_PREFIX.to_owned(),
            Incarnation::Created(ms) => format!("{BOUND_PREFIX}{ms}."),
        };
        let tag = Self::mac(&self.secrets[0], id, bound)
            .finalize()
            .into_bytes();
        CallbackToken {
            mac_at: head.len(),
            text: head + &URL_SAFE_NO_PAD.encode(tag),
            bound,
        }
    }

    /// Constant-time check against every active secret (`Mac::verify_slice`):
    /// what the token opens of `id`, or `None`. The caller still has to hold
    /// the answer against the record ([`Incarnation`]).
    pub fn verify(&self, token: &CallbackToken, id: &PromiseId) -> Option<Incarnation> {
        let bound = token.bound;
        let tag = URL_SAFE_NO_PAD.decode(&token.text[token.mac_at..]).ok()?;
        // Check every secret, not the first match, so timing does not say which one.
        let ok = self.secrets.iter().fold(false, |ok, s| {
            Self::mac(s, id, bound).verify_slice(&tag).is_ok() | ok
        });
        ok.then_some(bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> PromiseId {
        PromiseId::parse(s).unwrap()
    }

    #[test]
    fn promise_id_rules() {
        assert!(PromiseId::parse("nightly-sales-2026-11-23").is_ok());
        assert!(PromiseId::parse("a/b:c.d_e-f").is_ok());
        assert!(PromiseId::parse(&"x".repeat(200)).is_ok());
        assert_eq!(
            PromiseId::parse(&"x".repeat(201)),
            Err(IdError::PromiseIdLength(201))
        );
        assert_eq!(PromiseId::parse(""), Err(IdError::PromiseIdLength(0)));
        assert_eq!(PromiseId::parse("a b"), Err(IdError::PromiseIdChar(' ')));
        assert_eq!(PromiseId::parse("é"), Err(IdError::PromiseIdChar('é')));
        assert!(
            PromiseId::parse("a{b}").is_err(),
            "hash-tag braces must be refused"
        );
        for bad in ["decoy/../xss-7", "..", ".", "./a", "a/.", "a/./b", "a/.."] {
            assert_eq!(
                PromiseId::parse(bad),
                Err(IdError::PromiseIdDotSegment),
                "{bad}"
            );
        }
        for good in ["a..b", "...", "a/.b", "v1.2/x..", "a/...", ".a/b."] {
            assert!(PromiseId::parse(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn idempotency_token_is_derived_and_64_chars() {
        let t = IdempotencyToken::derive("default", &id("p1"));
        assert_eq!(t.as_str().len(), 64);
        assert!(t.as_str().starts_with("rb1-"));
        assert_eq!(t, IdempotencyToken::derive("default", &id("p1")));
        assert_ne!(t, IdempotencyToken::derive("other", &id("p1")));
        assert_ne!(t, IdempotencyToken::derive("default", &id("p2")));
        // SHA-256("default\0p1"), first 30 bytes, computed independently with Python's hashlib.
        let mut h = Sha256::new();
        h.update(b"default\0p1");
        assert_eq!(&t.as_str()[4..], hex::encode(&h.finalize()[..30]));
    }

    #[test]
    fn version_2_tokens_are_bound_to_the_incarnation() {
        let t = IdempotencyToken::derive_v2("default", &id("p1"), 1_700_000_000_123);
        assert_eq!(t.as_str().len(), 64);
        assert!(t.as_str().starts_with("rb2-"));
        assert_eq!(
            t,
            IdempotencyToken::derive_v2("default", &id("p1"), 1_700_000_000_123)
        );
        assert_ne!(
            t,
            IdempotencyToken::derive_v2("default", &id("p1"), 1_700_000_000_124)
        );
        let mut h = Sha256::new();
        h.update(b"default\0p1\x001700000000123");
        assert_eq!(&t.as_str()[4..], hex::encode(&h.finalize()[..30]));
    }

    #[test]
    fn run_id_must_be_positive() {
        assert!(RunId::new(0).is_err());
        assert_eq!(RunId::parse("42").unwrap().get(), 42);
        assert!(RunId::parse("-1").is_err());
        assert!(RunId::parse("x").is_err());
    }

    fn signer(secrets: &[&str]) -> CallbackSigner {
        CallbackSigner::new(
            secrets
                .iter()
                .map(|s| SecretString::from(s.to_string()))
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn token_opens_only_its_own_promise() {
        let s = signer(&["0123456789abcdef0123456789abcdef"]);
        let t = s.sign(&id("a"), 1_700_000_000_123);
        assert!(CallbackToken::parse(t.expose()).is_ok());
        assert_eq!(
            s.verify(&t, &id("a")),
            Some(Incarnation::Created(1_700_000_000_123))
        );
        assert_eq!(s.verify(&t, &id("b")), None);
        let legacy = s.sign_legacy(&id("a"));
        assert!(legacy.expose().starts_with("v1."));
        assert_eq!(s.verify(&legacy, &id("a")), Some(Incarnation::Legacy));
        assert_eq!(s.verify(&legacy, &id("b")), None);
    }

    /// The creation time is under the MAC: a token of one incarnation
    /// edited to name another opens nothing.
    #[test]
    fn a_bound_token_cannot_be_moved_to_another_incarnation() {
        let s = signer(&["0123456789abcdef0123456789abcdef"]);
        let t = s.sign(&id("a"), 1_000);
        let moved = t.expose().replacen("v2.1000.", "v2.1001.", 1);
        let moved = CallbackToken::parse(&moved).unwrap();
        assert_eq!(s.verify(&moved, &id("a")), None);
        // Nor does its MAC pass as a v1 token.
        let mac = t.expose().rsplit('.').next().unwrap();
        let as_v1 = CallbackToken::parse(&format!("v1.{mac}")).unwrap();
        assert_eq!(s.verify(&as_v1, &id("a")), None);
    }

    #[test]
    fn rotation_accepts_old_and_new_secret() {
        let old = signer(&["old-secret-old-secret-old-secret-"]);
        let both = signer(&[
            "new-secret-new-secret-new-secret-",
            "old-secret-old-secret-old-secret-",
        ]);
        let new_only = signer(&["new-secret-new-secret-new-secret-"]);
        let t = old.sign(&id("p"), 7);
        assert!(both.verify(&t, &id("p")).is_some());
        assert!(new_only.verify(&t, &id("p")).is_none());
        assert!(both.verify(&both.sign(&id("p"), 7), &id("p")).is_some());
    }

    #[test]
    fn malformed_tokens_are_refused() {
        assert!(CallbackToken::parse("").is_err());
        assert!(CallbackToken::parse("v2.abc").is_err());
        let s = signer(&["0123456789abcdef0123456789abcdef"]);
        for t in [s.sign_legacy(&id("a")), s.sign(&id("a"), 42)] {
            assert!(CallbackToken::parse(&format!("{}x", t.expose())).is_err());
            assert!(CallbackToken::parse(&t.expose()[..t.expose().len() - 1]).is_err());
            assert!(CallbackToken::parse(&t.expose().replacen(".", ".!", 1)).is_err());
            assert!(!format!("{t:?}").contains(&t.expose()[10..]));
        }
        assert!(CallbackToken::parse(&format!("v2..{}", "A".repeat(43))).is_err());
        assert!(CallbackToken::parse(&format!("v2.-1.{}", "A".repeat(43))).is_err());
        assert!(
            CallbackToken::parse(&format!("v2.{}.{}", "9".repeat(20), "A".repeat(43))).is_err()
        );
        // One text per token: no sign, no leading zero.
        for created in ["+42", "042"] {
            let t = format!("v2.{created}.{}", "A".repeat(43));
            assert!(CallbackToken::parse(&t).is_err(), "{t}");
        }
    }

    #[test]
    fn short_or_missing_secrets_are_refused() {
        assert!(CallbackSigner::new(vec![]).is_err());
        assert!(CallbackSigner::new(vec![SecretString::from("short".to_string())]).is_err());
    }

    /// Verification takes the same path whichever secret matches, or none:
    /// one MAC per secret, each compared by `verify_slice` (constant time),
    /// no early exit on a match (which would tell by its timing which
    /// secret signed, or that the first did).
    #[test]
    fn verification_computes_every_mac_whatever_matches() {
        let s = signer(&[
            "first-secret-0123456789abcdef-0123456789",
            "second-secret-0123456789abcdef-012345678",
            "third-secret-0123456789abcdef-0123456789",
        ]);
        let id = id("p-1");
        let by_first = s.sign(&id, 1);
        let by_third = signer(&["third-secret-0123456789abcdef-0123456789"]).sign(&id, 1);
        let forged = CallbackToken::parse(&format!("{BOUND_PREFIX}1.{}", "A".repeat(43))).unwrap();
        for (token, valid) in [(&by_first, true), (&by_third, true), (&forged, false)] {
            MACS.with(|n| n.set(0));
            assert_eq!(s.verify(token, &id).is_some(), valid);
            assert_eq!(MACS.with(|n| n.get()), 3, "one MAC per secret");
        }
    }
}
