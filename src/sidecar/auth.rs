//! Who is calling: a capability token (for one promise) or an operator token.
//!
//! A capability token may come in the path (`/cb/{token}/...`), as
//! `Authorization: Bearer <token>`, or as the password of HTTP Basic auth
//! (Resonate SDK clients and Databricks webhook destinations). Tokens are
//! compared in constant time; none is ever logged.

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

use crate::domain::{CallbackSigner, CallbackToken, Incarnation, PromiseId};

/// Every credential the request carries, path token first.
pub fn credentials(headers: &HeaderMap, path_token: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(t) = path_token {
        out.push(t.to_owned());
    }
    if let Some(v) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if let Some(t) = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
        {
            out.push(t.trim().to_owned());
        } else if let Some(pw) = v
            .strip_prefix("Basic ")
            .or_else(|| v.strip_prefix("basic "))
            .and_then(|b| STANDARD.decode(b.trim()).ok())
            .and_then(|raw| String::from_utf8(raw).ok())
            .and_then(|s| s.split_once(':').map(|(_, p)| p.to_owned()))
        {
            out.push(pw);
        }
    }
    out
}

/// Does one of the credentials open this id, and which incarnation of it?
/// (The caller holds the answer against the record: [`Incarnation`].)
pub fn opens(signer: &CallbackSigner, creds: &[String], id: &PromiseId) -> Option<Incarnation> {
    creds
        .iter()
        .filter_map(|c| CallbackToken::parse(c).ok())
        .find_map(|t| signer.verify(&t, id))
}

/// HTTP Basic with exactly this user and password (constant-time compare).
pub fn basic_matches(headers: &HeaderMap, user: &str, password: &SecretString) -> bool {
    let Some(decoded) = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("Basic ").map(str::to_owned))
        .and_then(|b| STANDARD.decode(b.trim()).ok())
        .and_then(|raw| String::from_utf8(raw).ok())
    else {
        return false;
    };
    let Some((u, p)) = decoded.split_once(':') else {
        return false;
    };
    if p.is_empty() || password.expose_secret().is_empty() {
        return false;
    }
    let user_ok = bool::from(u.as_bytes().ct_eq(user.as_bytes()));
    let pass_ok = bool::from(p.as_bytes().ct_eq(password.expose_secret().as_bytes()));
    user_ok & pass_ok
}

/// Is one of the credentials an operator token? An empty credential never
/// is, whatever the configuration holds.
pub fn is_operator(tokens: &[SecretString], creds: &[String]) -> bool {
    creds.iter().filter(|c| !c.is_empty()).any(|c| {
        tokens.iter().fold(false, |ok, t| {
            bool::from(t.expose_secret().as_bytes().ct_eq(c.as_bytes())) | ok
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn bearer_and_basic_are_read() {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert_eq!(
            credentials(&h, Some("p")),
            vec!["p".to_string(), "abc".to_string()]
        );
        let basic = format!("Basic {}", STANDARD.encode("user:s3cret"));
        h.insert(AUTHORIZATION, HeaderValue::from_str(&basic).unwrap());
        assert_eq!(credentials(&h, None), vec!["s3cret".to_string()]);
    }

    #[test]
    fn operator_tokens_compare_exactly() {
        let toks = vec![SecretString::from("op-token-1".to_string())];
        assert!(is_operator(&toks, &["op-token-1".into()]));
        assert!(!is_operator(&toks, &["op-token-".into()]));
        assert!(!is_operator(&toks, &["op-token-12".into()]));
        assert!(!is_operator(&[], &["".into()]));
        let with_empty = vec![SecretString::from(String::new())];
        assert!(!is_operator(&with_empty, &["".into()]));
    }
}
