//! The operator console (`/ui`): server-rendered HTML, no JavaScript
//! framework, assets compiled into the binary (one stylesheet and one small
//! script, inlined into each page, so there is no asset route to protect).
//!
//! Access: a server-side session opened by logging in with an operator
//! token, or `Authorization: Bearer` on every request (`session.rs`).
//! Without one every `/ui` route answers 401 with the login form and no
//! data. Every form that changes something carries the session's CSRF
//! token, checked before anything else; a missing or wrong one is a 403
//! that changes nothing.
//!
//! The pages read through the same store traits as the HTTP API, and the
//! buttons settle through the same `settle` (cancel also cancels the run).
//!
//! The parts: [`layout`] (the frame and the response headers), one module
//! per page family ([`overview`], [`promises`], [`dead_letters`],
//! [`audit`]), and
//! [`session`] (log in, log out, who is asking). Here: the responses every
//! route may give (login form, refusals, errors) and form plumbing.

mod audit;
mod dead_letters;
mod layout;
mod overview;
mod promises;
mod session;
pub mod throttle;

use std::collections::HashMap;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::html;

use super::{AppState, read_body};
use crate::store::Store;
use layout::{Nav, alert, csrf_field, page, respond};
use session::{Cookies, csrf_ok};

pub use audit::{adopt_action, audit};
pub use dead_letters::{body as dead_letter_body, dead_letters, republish};
pub use overview::{overview, overview_fragment_route};
pub use promises::{act, promise, promises};
pub use session::{login, login_form, logout};

fn url_enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn form(bytes: &Bytes) -> HashMap<String, String> {
    url::form_urlencoded::parse(bytes).into_owned().collect()
}

fn query(raw: &Option<String>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(raw.as_deref().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

/// The `done` message a redirect after an action carries.
fn done_notice(raw: &Option<String>) -> Option<String> {
    query(raw)
        .into_iter()
        .find(|(k, _)| k == "done")
        .map(|(_, v)| v)
}

fn login_page(c: Cookies, status: StatusCode, message: Option<&str>) -> Response {
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    let body = html! {
        h1 { "Operator console" }
        @if let Some(m) = message { (alert(m)) }
        form method="post" action="/ui/login" {
            (csrf_field(&nonce))
            label for="token" {
                "Operator token"
                input id="token" name="token" type="password" autocomplete="current-password" required;
            }
            p { button type="submit" { "Log in" } }
        }
    };
    let mut r = respond(status, page("Log in", Nav::None, None, body));
    if let Some(v) = c.set(c.login(), &nonce, None) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// 401 with the login form: what every `/ui` route answers without a token.
fn unauthorized(c: Cookies) -> Response {
    login_page(c, StatusCode::UNAUTHORIZED, None)
}

fn forbidden_csrf() -> Response {
    let body = html! {
        h1 { "Refused" }
        (alert("The form's CSRF token is missing or wrong; nothing was changed. Reload the page and try again."))
    };
    respond(
        StatusCode::FORBIDDEN,
        page("Refused", Nav::None, None, body),
    )
}

fn see_other(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// A state-changing form, checked in this order before anything else is
/// looked at: the session (401), the body, its CSRF token (403).
async fn checked_form<S: Store>(
    st: &AppState<S>,
    h: &HeaderMap,
    body: Body,
) -> Result<(String, HashMap<String, String>), Response> {
    let Some(s) = session::operator(st, h).await else {
        return Err(unauthorized(Cookies::of(st)));
    };
    let Ok(bytes) = read_body(st, h, body).await else {
        return Err(forbidden_csrf());
    };
    let f = form(&bytes);
    if !csrf_ok(&s, f.get("csrf")) {
        return Err(forbidden_csrf());
    }
    Ok((s, f))
}

/// A checked form ([`checked_form`]) that acts on one promise: it names a
/// valid promise id and its "I am sure" box is ticked, else the page that
/// says so (nothing changed).
async fn confirmed_promise_form<S: Store>(
    st: &AppState<S>,
    h: &HeaderMap,
    body: Body,
) -> Result<(String, HashMap<String, String>, crate::domain::PromiseId), Response> {
    let (s, f) = checked_form(st, h, body).await?;
    let Some(Ok(id)) = f.get("id").map(|i| crate::domain::PromiseId::parse(i)) else {
        return Err(error_page(
            &s,
            StatusCode::BAD_REQUEST,
            "The form names no valid promise id.",
        ));
    };
    if let Some(refused) = unconfirmed(&s, &f) {
        return Err(refused);
    }
    Ok((s, f, id))
}

/// The "I am sure" box of a form that settles or republishes, unticked.
fn unconfirmed(session: &str, f: &HashMap<String, String>) -> Option<Response> {
    (f.get("confirm").map(String::as_str) != Some("yes")).then(|| {
        error_page(
            session,
            StatusCode::BAD_REQUEST,
            "Tick \"I am sure\" to confirm; nothing was changed.",
        )
    })
}

fn error_page(session: &str, status: StatusCode, message: &str) -> Response {
    let body = html! { h1 { "Error" } (alert(message)) };
    respond(status, page("Error", Nav::None, Some(session), body))
}

/// The store or broker failed: logged here with its details, shown
/// without them (a page is no place for internal errors).
fn unavailable_page(
    session: &str,
    what: &str,
    error: &dyn std::fmt::Display,
    outcome: &str,
) -> Response {
    tracing::error!(%error, "console: the {what} is unavailable");
    error_page(
        session,
        StatusCode::SERVICE_UNAVAILABLE,
        &format!(
            "The {what} is unavailable{outcome}; try again in a moment (the sidecar's log says why)."
        ),
    )
}
