//! Who is using the console, and the CSRF token of their forms.
//!
//! A browser logs in once with an operator token and gets a server-side
//! session: the `rb_session` cookie holds 32 random bytes, Redis holds the
//! session under their SHA-256 (with its CSRF token and which operator
//! token opened it) and ends it after `sidecar.session_idle_seconds`
//! without use or `sidecar.session_max_seconds` in all. Logging out deletes
//! it, so a copied cookie stops working; removing an operator token from the
//! configuration ends the sessions it opened. The cookie is never an API
//! credential.
//!
//! Scripts may instead send `Authorization: Bearer <operator token>` with
//! every request; a browser never sends that header by itself, so their
//! forms' CSRF token can simply be derived from the token.

use std::net::SocketAddr;

use axum::Extension;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{form, login_page, see_other, unauthorized};
use crate::sidecar::{AppState, St, auth, read_body};
use crate::store::{ConsoleSession, Store};

/// The console's cookies: the session's, and before login the login form's
/// (there is no session yet to bind a CSRF token to, so the form carries a
/// random one that must match this cookie: double submit).
///
/// Under HTTPS (`sidecar.tls_cert_file`, or an `https://` public URL) they
/// are `Secure` and named `__Host-…`, which a browser keeps only when set by
/// this very host over HTTPS with `Path=/` and no `Domain`: neither a
/// sibling subdomain nor a plain-HTTP response can plant or overwrite one.
/// Over plain HTTP (development) they are `rb_…` on `/ui`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Cookies {
    secure: bool,
}

impl Cookies {
    pub(super) fn of<S>(st: &AppState<S>) -> Self {
        Self {
            secure: st.settings.secure_cookies,
        }
    }

    pub(super) fn session(self) -> &'static str {
        if self.secure {
            "__Host-rb_session"
        } else {
            "rb_session"
        }
    }

    pub(super) fn login(self) -> &'static str {
        if self.secure {
            "__Host-rb_login"
        } else {
            "rb_login"
        }
    }

    fn attributes(self) -> &'static str {
        if self.secure {
            "Path=/; Secure; HttpOnly; SameSite=Strict"
        } else {
            "Path=/ui; HttpOnly; SameSite=Strict"
        }
    }

    /// `Set-Cookie` of `name` (one of the above), for `max_age` or the
    /// browser's session.
    pub(super) fn set(
        self,
        name: &str,
        value: &str,
        max_age: Option<std::time::Duration>,
    ) -> Option<HeaderValue> {
        let age = max_age
            .map(|a| format!("; Max-Age={}", a.as_secs()))
            .unwrap_or_default();
        HeaderValue::from_str(&format!("{name}={value}; {}{age}", self.attributes())).ok()
    }

    fn clear(self, name: &str) -> HeaderValue {
        self.set(name, "", Some(std::time::Duration::ZERO))
            .unwrap_or_else(|| HeaderValue::from_static(""))
    }
}

/// The cookie of earlier versions, which held the operator token itself:
/// cleared at login and logout, never read.
const OLD_COOKIE: &str = "rb_operator";

fn random_hex() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
        h.update([0u8]);
    }
    hex::encode(h.finalize())
}

/// Which operator token opened a session, without keeping the token.
fn fingerprint(token: &str) -> String {
    sha256_hex(&[b"runbridge-operator-v1", token.as_bytes()])[..32].to_owned()
}

pub(super) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
}

/// The session id of the request's cookie, hashed as the store keys it;
/// `None` for anything that is not 64 hex digits.
fn session_hash(c: Cookies, headers: &HeaderMap) -> Option<String> {
    let id = cookie(headers, c.session())?;
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| sha256_hex(&[id.as_bytes()]))
}

/// A Bearer caller's CSRF token.
fn bearer_csrf(token: &str) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(token.as_bytes()) else {
        return String::new();
    };
    mac.update(b"runbridge-ui-csrf-v1");
    hex::encode(mac.finalize().into_bytes())
}

/// The CSRF token of the request's operator (Bearer token or live
/// session), or `None`: not logged in.
pub(super) async fn operator<S: Store>(st: &AppState<S>, headers: &HeaderMap) -> Option<String> {
    if let Some(t) = auth::credentials(headers, None)
        .into_iter()
        .find(|c| auth::is_operator(&st.operator_tokens, std::slice::from_ref(c)))
    {
        return Some(bearer_csrf(&t));
    }
    let hash = session_hash(Cookies::of(st), headers)?;
    match st
        .store
        .touch_session(&hash, st.settings.session_idle)
        .await
    {
        Ok(Some(s)) => {
            let still_valid = st
                .operator_tokens
                .iter()
                .any(|t| fingerprint(t.expose_secret()) == s.operator);
            if still_valid {
                Some(s.csrf)
            } else {
                let _ = st.store.close_session(&hash).await;
                None
            }
        }
        Ok(None) => None,
        Err(e) => {
            tracing::error!(error = %e, "console: cannot read the session");
            None
        }
    }
}

pub(super) fn csrf_ok(want: &str, given: Option<&String>) -> bool {
    !want.is_empty() && given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(want.as_bytes())))
}

/// Clears the cookie of earlier versions (set on `/ui`, never `Secure`).
fn clear_old() -> HeaderValue {
    Cookies { secure: false }.clear(OLD_COOKIE)
}

pub async fn login_form<S: Store>(st: St<S>, h: HeaderMap) -> Response {
    if operator(&st, &h).await.is_some() {
        return see_other("/ui");
    }
    unauthorized(Cookies::of(&st))
}

pub async fn login<S: Store>(
    st: St<S>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    h: HeaderMap,
    body: Body,
) -> Response {
    let c = Cookies::of(&st);
    let client = peer.map(|Extension(ConnectInfo(a))| a.ip());
    // Before the body is read: a refused client costs nothing more.
    if st.login_throttle.check(client).is_err() {
        let mut r = login_page(
            c,
            StatusCode::TOO_MANY_REQUESTS,
            Some("Too many failed logins; try again in a minute."),
        );
        r.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(super::throttle::WINDOW.as_secs()),
        );
        return r;
    }
    let Ok(bytes) = read_body(&st, &h, body).await else {
        return login_page(
            c,
            StatusCode::BAD_REQUEST,
            Some("The form could not be read."),
        );
    };
    let mut f = form(&bytes);
    let nonce = cookie(&h, c.login()).unwrap_or_default();
    let given = f.remove("csrf").unwrap_or_default();
    if nonce.len() != 32 || !bool::from(given.as_bytes().ct_eq(nonce.as_bytes())) {
        return login_page(
            c,
            StatusCode::FORBIDDEN,
            Some("The login form expired or came from elsewhere; log in again."),
        );
    }
    let token = f.remove("token").unwrap_or_default();
    if !auth::is_operator(&st.operator_tokens, std::slice::from_ref(&token)) {
        st.login_throttle.failed(client);
        return login_page(
            c,
            StatusCode::UNAUTHORIZED,
            Some("That is not an operator token."),
        );
    }
    let id = random_hex();
    let session = ConsoleSession {
        csrf: random_hex(),
        operator: fingerprint(&token),
    };
    let (idle, max) = (st.settings.session_idle, st.settings.session_max);
    if let Err(e) = st
        .store
        .open_session(&sha256_hex(&[id.as_bytes()]), &session, idle, max)
        .await
    {
        tracing::error!(error = %e, "console: cannot store the session");
        return login_page(
            c,
            StatusCode::SERVICE_UNAVAILABLE,
            Some("The store is unavailable; try again in a moment."),
        );
    }
    let mut r = see_other("/ui");
    if let Some(v) = c.set(c.session(), &id, Some(max)) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r.headers_mut()
        .append(header::SET_COOKIE, c.clear(c.login()));
    r.headers_mut().append(header::SET_COOKIE, clear_old());
    r
}

/// Ends the session for good (in the store, not only in this browser).
pub async fn logout<S: Store>(st: St<S>, h: HeaderMap, body: Body) -> Response {
    let csrf = match super::checked_form(&st, &h, body).await {
        Ok((csrf, _)) => csrf,
        Err(refused) => return refused,
    };
    let c = Cookies::of(&st);
    if let Some(hash) = session_hash(c, &h)
        && let Err(e) = st.store.close_session(&hash).await
    {
        return super::unavailable_page(&csrf, "store", &e, "; you are still logged in");
    }
    let mut r = see_other("/ui/login");
    r.headers_mut()
        .insert(header::SET_COOKIE, c.clear(c.session()));
    r.headers_mut().append(header::SET_COOKIE, clear_old());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_needs_the_exact_token() {
        let t = bearer_csrf("op-token-1");
        assert!(csrf_ok(&t, Some(&t)));
        assert!(!csrf_ok(&bearer_csrf("op-token-2"), Some(&t)));
        assert!(!csrf_ok(&t, None));
        assert!(!csrf_ok(&t, Some(&String::new())));
        assert!(!csrf_ok("", Some(&String::new())));
    }

    #[test]
    fn only_well_formed_session_cookies_are_looked_up() {
        let c = Cookies { secure: false };
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::COOKIE,
                HeaderValue::from_str(&format!("{}={v}", c.session())).unwrap(),
            );
            session_hash(c, &h)
        };
        let id = random_hex();
        assert_eq!(with(&id), Some(sha256_hex(&[id.as_bytes()])));
        assert_ne!(with(&id).unwrap(), id, "the store never sees the cookie");
        assert_eq!(with("local-dev-operator-token"), None);
        assert_eq!(with(""), None);
        assert_eq!(with(&"g".repeat(64)), None);
    }
}
