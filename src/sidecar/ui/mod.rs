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

mod session;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};

use super::{AppState, St, auth, read_body};
use crate::broker::{self, DeadLetter};
use crate::domain::{Completion, Payload, Promise, PromiseId, SettledBy, State};
use crate::reconciler::valid_id_filter;
use crate::store::{Overview, SearchQuery, Settle, SettleOutcome, Store};

use session::{LOGIN_COOKIE, csrf_ok};
pub use session::{login, login_form, logout};

const CSS: &str = include_str!("ui.css");
const JS: &str = include_str!("ui.js");

/// HTML-escapes text for element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

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

#[derive(Clone, Copy, PartialEq)]
enum Nav {
    Overview,
    Promises,
    DeadLetters,
    None,
}

/// A whole page: layout, navigation, the logout form (with its CSRF token).
fn page(title: &str, nav: Nav, session: Option<&str>, body: &str) -> String {
    let link = |href: &str, label: &str, me: Nav| {
        let cur = if nav == me {
            r#" aria-current="page""#
        } else {
            ""
        };
        format!(r#"<a href="{href}"{cur}>{label}</a>"#)
    };
    let header = match session {
        Some(s) => format!(
            r#"<header><span class="brand">runbridge</span>
<nav aria-label="Main">{}{}{}</nav>
<form method="post" action="/ui/logout"><input type="hidden" name="csrf" value="{}"><button class="plain" type="submit">Log out</button></form></header>"#,
            link("/ui", "Overview", Nav::Overview),
            link("/ui/promises", "Promises", Nav::Promises),
            link("/ui/dead-letters", "Dead letters", Nav::DeadLetters),
            s
        ),
        None => r#"<header><span class="brand">runbridge</span></header>"#.to_owned(),
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{} · runbridge</title><style>{CSS}</style></head>
<body>{header}<main id="main">{body}</main><script>{JS}</script></body></html>"#,
        esc(title)
    )
}

fn html(status: StatusCode, body: String) -> Response {
    let mut r = (status, Html(body)).into_response();
    // Pages hold operational data: never cached, never framed.
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(header::CONTENT_SECURITY_POLICY, CSP.clone());
    r
}

/// The pages' Content-Security-Policy. Scripts: only the one inlined
/// script, allowed by its SHA-256, so markup that slipped into a page could
/// not run any. Styles stay inline (the stylesheet and the chart's bar
/// widths), which cannot run code.
static CSP: std::sync::LazyLock<HeaderValue> = std::sync::LazyLock::new(|| {
    use base64::Engine;
    use sha2::{Digest, Sha256};
    let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(JS.as_bytes()));
    HeaderValue::from_str(&format!(
        "default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{hash}'; connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"))
});

fn login_page(status: StatusCode, message: Option<&str>) -> Response {
    let msg = message
        .map(|m| format!(r#"<p class="error" role="alert">{}</p>"#, esc(m)))
        .unwrap_or_default();
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    let mut r = html(
        status,
        page(
            "Log in",
            Nav::None,
            None,
            &format!(
                r#"<h1>Operator console</h1>{msg}
<form method="post" action="/ui/login"><input type="hidden" name="csrf" value="{nonce}">
<label for="token">Operator token<input id="token" name="token" type="password" autocomplete="current-password" required></label>
<p><button type="submit">Log in</button></p></form>"#
            ),
        ),
    );
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{LOGIN_COOKIE}={nonce}; Path=/ui; HttpOnly; SameSite=Strict"
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// 401 with the login form: what every `/ui` route answers without a token.
fn unauthorized() -> Response {
    login_page(StatusCode::UNAUTHORIZED, None)
}

fn forbidden_csrf() -> Response {
    html(
        StatusCode::FORBIDDEN,
        page(
            "Refused",
            Nav::None,
            None,
            r#"<h1>Refused</h1><p class="error" role="alert">The form's CSRF token is missing or wrong; nothing was changed. Reload the page and try again.</p>"#,
        ),
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
        return Err(unauthorized());
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
    html(
        status,
        page(
            "Error",
            Nav::None,
            Some(session),
            &format!(
                r#"<h1>Error</h1><p class="error" role="alert">{}</p>"#,
                esc(message)
            ),
        ),
    )
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

// ---------- overview ----------

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86_400 => format!("{} h {} min", s / 3600, (s % 3600) / 60),
        _ => format!("{} d {} h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Pending promises by age, in buckets an operator thinks in.
fn age_buckets(o: &Overview) -> Vec<(&'static str, u64)> {
    const EDGES: [(&str, u64); 6] = [
        ("under 1 min", 60),
        ("1–10 min", 600),
        ("10–60 min", 3600),
        ("1–6 h", 6 * 3600),
        ("6–24 h", 86_400),
        ("over 1 day", u64::MAX),
    ];
    let mut out: Vec<(&str, u64)> = EDGES.iter().map(|(l, _)| (*l, 0)).collect();
    for (age, n) in &o.pending_ages {
        let i = EDGES
            .iter()
            .position(|(_, edge)| age.as_secs() < *edge)
            .unwrap_or(EDGES.len() - 1);
        out[i].1 += n;
    }
    out
}

/// The settle rate over the last hour: an SVG bar per minute, with the
/// numbers in the bars' titles and a sentence for screen readers.
fn rate_chart(o: &Overview) -> String {
    let totals: Vec<u64> = o
        .settled_per_minute
        .iter()
        .map(|m| m.values().sum())
        .collect();
    let max = totals.iter().copied().max().unwrap_or(0).max(1);
    let total: u64 = totals.iter().sum();
    let (w, h) = (600u64, 120u64);
    let bw = w / totals.len().max(1) as u64;
    let mut bars = String::new();
    for (i, n) in totals.iter().enumerate() {
        let bh = n * (h - 10) / max;
        let ago = totals.len() - i - 1;
        let _ = write!(
            bars,
            r#"<rect x="{}" y="{}" width="{}" height="{bh}"><title>{n} settled, {ago} min ago</title></rect>"#,
            i as u64 * bw,
            h - bh,
            bw.saturating_sub(1).max(1)
        );
    }
    format!(
        r#"<figure><svg class="chart" role="img" aria-labelledby="rate-cap" viewBox="0 0 {w} {h}" width="100%" height="{h}" preserveAspectRatio="none">{bars}</svg>
<figcaption id="rate-cap">Settlements per minute over the last hour: {total} in all, at most {max} in one minute (oldest minute on the left).</figcaption></figure>"#
    )
}

fn overview_fragment(o: &Overview, dead: Result<u32, &str>) -> String {
    let oldest = o
        .oldest_pending_age()
        .map(human)
        .unwrap_or_else(|| "none".into());
    let dead = match dead {
        Ok(n) => n.to_string(),
        Err(why) => format!(r#"<abbr title="{}">unknown</abbr>"#, esc(why)),
    };
    let last_hour = o.settled_last_hour();
    let settled: u64 = last_hour.values().sum();
    let mut s = format!(
        r#"<div class="cards">
<div class="card"><span class="n" id="count-pending">{}</span><span class="label">pending</span></div>
<div class="card"><span class="n" id="oldest-pending">{oldest}</span><span class="label">oldest pending</span></div>
<div class="card"><span class="n" id="outbox">{}</span><span class="label">events in the outbox</span></div>
<div class="card"><span class="n" id="dead-letters">{dead}</span><span class="label">dead letters</span></div>
<div class="card"><span class="n" id="settled-hour">{settled}</span><span class="label">settled in the last hour</span></div>
</div>
<h2>Promises by state</h2>
<table><caption class="sr-only">Pending now, and settled in the last hour by state</caption>
<thead><tr><th scope="col">State</th><th scope="col" class="num">Count</th></tr></thead><tbody>
<tr><td><a class="state state-PENDING" href="/ui/promises?state=PENDING">PENDING</a> (now)</td><td class="num" id="state-PENDING">{}</td></tr>"#,
        o.pending, o.outbox, o.pending
    );
    for st in State::ALL.iter().filter(|s| s.is_settled()) {
        let n = last_hour.get(st.as_str()).copied().unwrap_or(0);
        let _ = write!(
            s,
            r#"<tr><td><a class="state state-{st}" href="/ui/promises?state={st}">{st}</a> (last hour)</td><td class="num" id="state-{st}">{n}</td></tr>"#
        );
    }
    s.push_str("</tbody></table><h2>Pending promises by age</h2><table><caption class=\"sr-only\">Pending promises by age</caption><thead><tr><th scope=\"col\">Age</th><th scope=\"col\" class=\"num\">Count</th><th scope=\"col\"><span class=\"sr-only\">Share</span></th></tr></thead><tbody>");
    let buckets = age_buckets(o);
    let most = buckets.iter().map(|(_, n)| *n).max().unwrap_or(0).max(1);
    for (label, n) in buckets {
        let _ = write!(
            s,
            r#"<tr><td>{label}</td><td class="num">{n}</td><td aria-hidden="true"><span class="bar" style="width:{}px"></span></td></tr>"#,
            n * 300 / most
        );
    }
    s.push_str("</tbody></table><h2>Settle rate</h2>");
    s.push_str(&rate_chart(o));
    s
}

async fn overview_data<S: Store>(st: &AppState<S>) -> Result<String, crate::store::StoreError> {
    let o = st.store.overview().await?;
    // The readiness watcher knows whether the broker is there; asking it
    // then costs no connect timeout while it is down.
    let dead = match &st.broker {
        Some(_) if !st.broker_ready.load(std::sync::atomic::Ordering::Relaxed) => {
            Err("the broker is unreachable")
        }
        Some(b) => broker::dead_letter_count(b).await.map_err(|e| {
            tracing::warn!(error = %e, "console: cannot count dead letters");
            "the broker did not answer"
        }),
        None => Err("no broker configured"),
    };
    Ok(overview_fragment(&o, dead))
}

pub async fn overview<S: Store>(st: St<S>, h: HeaderMap) -> Response {
    let Some(s) = session::operator(&st, &h).await else {
        return unauthorized();
    };
    match overview_data(&st).await {
        Ok(frag) => html(
            StatusCode::OK,
            page(
                "Overview",
                Nav::Overview,
                Some(&s),
                &format!(
                    r#"<h1>Overview</h1><div id="overview" data-refresh="/ui/overview" aria-live="polite">{frag}</div>"#
                ),
            ),
        ),
        Err(e) => unavailable_page(&s, "store", &e, ""),
    }
}

/// The overview's body alone, for the page's live refresh.
pub async fn overview_fragment_route<S: Store>(st: St<S>, h: HeaderMap) -> Response {
    if session::operator(&st, &h).await.is_none() {
        return (StatusCode::UNAUTHORIZED, Html(String::new())).into_response();
    }
    match overview_data(&st).await {
        Ok(frag) => html(StatusCode::OK, frag),
        Err(e) => {
            tracing::error!(error = %e, "console: the store is unavailable");
            html(
                StatusCode::SERVICE_UNAVAILABLE,
                "The store is unavailable.".into(),
            )
        }
    }
}

// ---------- search ----------

pub async fn promises<S: Store>(st: St<S>, h: HeaderMap, RawQuery(q): RawQuery) -> Response {
    let Some(s) = session::operator(&st, &h).await else {
        return unauthorized();
    };
    let params = query(&q);
    let get = |k: &str| {
        params
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let (id, state, tag, workspace, cursor) = (
        get("id").unwrap_or_else(|| "*".into()),
        get("state"),
        get("tag"),
        get("workspace"),
        get("cursor"),
    );
    let mut problems = Vec::new();
    if !valid_id_filter(&id) {
        problems.push("The id may use letters, digits, . _ : / - and * wildcards.".to_owned());
    }
    let states = match state.as_deref() {
        None => None,
        Some(x) if x.eq_ignore_ascii_case("rejected") => Some(vec![
            State::Rejected,
            State::RejectedCanceled,
            State::RejectedTimedout,
        ]),
        Some(x) => match x.parse::<State>() {
            Ok(st) => Some(vec![st]),
            Err(e) => {
                problems.push(e.to_string());
                None
            }
        },
    };
    let mut tags = BTreeMap::new();
    if let Some(t) = &tag {
        match t.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                tags.insert(k.to_owned(), v.to_owned());
            }
            _ => problems.push("A tag filter looks like team=growth.".into()),
        }
    }
    let options: String = std::iter::once(("", "any state"))
        .chain(State::ALL.iter().map(|s| (s.as_str(), s.as_str())))
        .map(|(v, label)| {
            let sel = if state.as_deref() == Some(v) {
                " selected"
            } else {
                ""
            };
            format!(r#"<option value="{v}"{sel}>{label}</option>"#)
        })
        .collect();
    let mut body = format!(
        r#"<h1>Promises</h1>
<form class="search" method="get" action="/ui/promises" role="search">
<label for="q-id">Id (use * as a wildcard)<input id="q-id" name="id" value="{}"></label>
<label for="q-state">State<select id="q-state" name="state">{options}</select></label>
<label for="q-tag">Tag (key=value)<input id="q-tag" name="tag" value="{}"></label>
<label for="q-ws">Workspace<input id="q-ws" name="workspace" value="{}"></label>
<button type="submit">Search</button></form>"#,
        esc(&id),
        esc(tag.as_deref().unwrap_or("")),
        esc(workspace.as_deref().unwrap_or(""))
    );
    if !problems.is_empty() {
        let _ = write!(
            body,
            r#"<p class="error" role="alert">{}</p>"#,
            esc(&problems.join(" "))
        );
        return html(
            StatusCode::BAD_REQUEST,
            page("Promises", Nav::Promises, Some(&s), &body),
        );
    }
    let q = SearchQuery {
        id: id.clone(),
        states,
        tags,
        workspace: workspace.clone(),
        limit: 50,
        cursor: cursor.clone(),
        ..Default::default()
    };
    let found = match st.store.search(&q).await {
        Ok(p) => p,
        Err(crate::store::StoreError::InvalidCursor) => {
            let _ = write!(
                body,
                r#"<p class="error" role="alert">That page link is no longer valid; search again.</p>"#
            );
            return html(
                StatusCode::BAD_REQUEST,
                page("Promises", Nav::Promises, Some(&s), &body),
            );
        }
        Err(e) => return unavailable_page(&s, "store", &e, ""),
    };
    if found.unreadable > 0 {
        let _ = write!(
            body,
            r#"<p class="notice" id="unreadable">{} stored records on this page could not be read and are left out (see runbridge_store_unreadable_records_total and the sidecar's log).</p>"#,
            found.unreadable
        );
    }
    if found.promises.is_empty() {
        body.push_str(r#"<p class="notice" id="no-results">No promise matches.</p>"#);
    } else {
        body.push_str(r#"<table id="results"><caption class="sr-only">Matching promises</caption><thead><tr><th scope="col">Id</th><th scope="col">State</th><th scope="col">Created</th><th scope="col">Workspace</th><th scope="col">Tags</th></tr></thead><tbody>"#);
        for p in &found.promises {
            let tags: Vec<String> = p.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = write!(
                body,
                r#"<tr><td><a href="/ui/promises/{}">{}</a></td><td class="state state-{st}">{st}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
                esc(p.id.as_str()),
                esc(p.id.as_str()),
                when(p.created_on),
                esc(&p.workspace),
                esc(&tags.join(", ")),
                st = p.state
            );
        }
        body.push_str("</tbody></table>");
    }
    if let Some(next) = &found.cursor {
        let mut link: Vec<(String, String)> =
            params.into_iter().filter(|(k, _)| k != "cursor").collect();
        link.push(("cursor".into(), next.clone()));
        let qs: String = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(link)
            .finish();
        let _ = write!(
            body,
            r#"<p><a id="next-page" href="/ui/promises?{}">Next page</a></p>"#,
            esc(&qs)
        );
    }
    html(
        StatusCode::OK,
        page("Promises", Nav::Promises, Some(&s), &body),
    )
}

fn when(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| ms.to_string())
}

// ---------- one promise ----------

fn data_block(p: &Payload) -> String {
    match &p.data {
        None => "<p>(none)</p>".into(),
        Some(d) => {
            let pretty = serde_json::from_str::<serde_json::Value>(d)
                .ok()
                .and_then(|v| serde_json::to_string_pretty(&v).ok())
                .unwrap_or_else(|| d.clone());
            format!("<pre>{}</pre>", esc(&pretty))
        }
    }
}

fn promise_page(p: &Promise, session: &str, notice: Option<&str>) -> String {
    let id = esc(p.id.as_str());
    let mut b = format!(r#"<h1>Promise <code>{id}</code></h1>"#);
    if let Some(n) = notice {
        let _ = write!(b, r#"<p class="notice" role="status">{}</p>"#, esc(n));
    }
    let run = match (p.run_id, &p.run_page_url) {
        (Some(r), Some(u)) if u.starts_with("https://") || u.starts_with("http://") => {
            format!(
                r#"{r} (<a href="{}" rel="noreferrer">run page</a>)"#,
                esc(u)
            )
        }
        (Some(r), _) => r.to_string(),
        (None, _) => "none recorded".into(),
    };
    let tags: Vec<String> = p.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = write!(
        b,
        r#"<table><caption class="sr-only">The promise's record</caption><tbody>
<tr><th scope="row">State</th><td class="state state-{st}" id="promise-state">{st}</td></tr>
<tr><th scope="row">Databricks run</th><td>{run}</td></tr>
<tr><th scope="row">Job</th><td>{}</td></tr>
<tr><th scope="row">Workspace</th><td>{}</td></tr>
<tr><th scope="row">Deadline</th><td>{}</td></tr>
<tr><th scope="row">Heartbeat every</th><td>{}</td></tr>
<tr><th scope="row">Tags</th><td>{}</td></tr>
<tr><th scope="row">Reply to</th><td>{}</td></tr>
<tr><th scope="row">Trace</th><td>{}</td></tr>
</tbody></table>"#,
        p.job_id
            .map(|j| j.to_string())
            .unwrap_or_else(|| "–".into()),
        esc(&p.workspace),
        when(p.timeout),
        p.heartbeat_seconds
            .map(|s| format!("{s} s"))
            .unwrap_or_else(|| "–".into()),
        esc(&tags.join(", ")),
        esc(p.reply_to.as_deref().unwrap_or("–")),
        esc(p.traceparent.as_deref().unwrap_or("–")),
        st = p.state
    );
    // The timeline: what the record knows, in order.
    b.push_str(r#"<h2>Timeline</h2><ol class="timeline">"#);
    let a = &p.activity;
    let _ = write!(b, "<li>{}: created</li>", when(p.created_on));
    if p.run_id.is_some() {
        let at = a
            .launched_on
            .map(|t| format!("{}: ", when(t)))
            .unwrap_or_default();
        let _ = write!(b, "<li>{at}launched as Databricks run {run}</li>");
    }
    if a.heartbeats > 0 {
        let last = a.last_heartbeat_on.map(when).unwrap_or_default();
        let _ = write!(
            b,
            "<li>{last}: the last of {} heartbeats</li>",
            a.heartbeats
        );
    }
    if let Some(done) = p.completed_on {
        let _ = write!(
            b,
            "<li>{}: {} by {}</li>",
            when(done),
            p.state,
            esc(p.settled_by.as_deref().unwrap_or("?"))
        );
        let event = format!("<code>{id}/{}</code>", p.state);
        match a.published_on {
            Some(t) => {
                let _ = write!(
                    b,
                    "<li>{}: completion event {event} published (routing key <code>{}</code>), confirmed by the broker</li>",
                    when(t),
                    p.state.routing_key()
                );
            }
            None => {
                let _ = write!(
                    b,
                    "<li>completion event {event} in the outbox, not confirmed by the broker yet</li>"
                );
            }
        }
    } else {
        b.push_str("<li>pending</li>");
    }
    b.push_str("</ol>");
    b.push_str("<h2>Parameters</h2>");
    b.push_str(&data_block(&p.param));
    b.push_str(if p.state.is_rejection() {
        "<h2>Error</h2>"
    } else {
        "<h2>Value</h2>"
    });
    b.push_str(&data_block(&p.value));
    if p.state == State::Pending {
        let csrf = session;
        let _ = write!(
            b,
            r#"<h2>Act on it</h2><div class="actions">
<form method="post" action="/ui/act"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="id" value="{id}"><input type="hidden" name="action" value="cancel">
<p>Cancel: the promise becomes REJECTED_CANCELED and its run is cancelled.</p>
<label for="cancel-reason">Reason<input id="cancel-reason" name="value" value="canceled by an operator"></label>
<label class="inline"><span><input type="checkbox" name="confirm" value="yes" required> I am sure</span></label>
<p><button class="danger" type="submit" id="cancel-button">Cancel promise</button></p></form>
<form method="post" action="/ui/act"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="id" value="{id}"><input type="hidden" name="action" value="resolve">
<label for="resolve-value">Resolve with value<textarea id="resolve-value" name="value"></textarea></label>
<label class="inline"><span><input type="checkbox" name="confirm" value="yes" required> I am sure</span></label>
<p><button type="submit">Resolve</button></p></form>
<form method="post" action="/ui/act"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="id" value="{id}"><input type="hidden" name="action" value="reject">
<label for="reject-value">Reject with error<textarea id="reject-value" name="value"></textarea></label>
<label class="inline"><span><input type="checkbox" name="confirm" value="yes" required> I am sure</span></label>
<p><button class="danger" type="submit">Reject</button></p></form></div>"#
        );
    }
    b
}

pub async fn promise<S: Store>(
    st: St<S>,
    Path(id): Path<String>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let Some(s) = session::operator(&st, &h).await else {
        return unauthorized();
    };
    let Ok(pid) = PromiseId::parse(&id) else {
        return error_page(
            &s,
            StatusCode::BAD_REQUEST,
            &format!("{id:?} is not a promise id."),
        );
    };
    let notice = query(&q)
        .into_iter()
        .find(|(k, _)| k == "done")
        .map(|(_, v)| v);
    match st.store.get(&pid).await {
        Ok(Some(p)) => html(
            StatusCode::OK,
            page(
                &format!("Promise {id}"),
                Nav::Promises,
                Some(&s),
                &promise_page(&p, &s, notice.as_deref()),
            ),
        ),
        Ok(None) => error_page(
            &s,
            StatusCode::NOT_FOUND,
            &format!("No promise {id:?} (never created, or expired after its retention)."),
        ),
        Err(crate::store::StoreError::Corrupt(e)) => {
            tracing::error!(error = %e, id = %id, "console: unreadable promise record");
            error_page(
                &s,
                StatusCode::INTERNAL_SERVER_ERROR,
                "The stored record of this promise cannot be read; it must be repaired or deleted in the store.",
            )
        }
        Err(e) => unavailable_page(&s, "store", &e, ""),
    }
}

/// `POST /ui/act`: cancel, resolve or reject one promise by hand. The
/// CSRF token and the confirmation box are checked before anything else.
pub async fn act<S: Store>(st: St<S>, h: HeaderMap, body: Body) -> Response {
    let (s, f) = match checked_form(&st, &h, body).await {
        Ok(x) => x,
        Err(refused) => return refused,
    };
    let Some(Ok(id)) = f.get("id").map(|i| PromiseId::parse(i)) else {
        return error_page(
            &s,
            StatusCode::BAD_REQUEST,
            "The form names no valid promise id.",
        );
    };
    if let Some(refused) = unconfirmed(&s, &f) {
        return refused;
    }
    let value = f.get("value").cloned().unwrap_or_default();
    let (completion, word) = match f.get("action").map(String::as_str) {
        Some("cancel") => (Completion::Cancel, "cancelled"),
        Some("resolve") => (Completion::Resolve, "resolved"),
        Some("reject") => (Completion::Reject, "rejected"),
        _ => {
            return error_page(
                &s,
                StatusCode::BAD_REQUEST,
                "Unknown action; nothing was changed.",
            );
        }
    };
    let target = completion.target();
    let req = Settle {
        id: id.clone(),
        target,
        value: if value.is_empty() {
            Payload::default()
        } else {
            Payload::data(value)
        },
        ikey: None,
        strict: true,
        settled_by: SettledBy::Operator,
        cancel_run: target == State::RejectedCanceled,
    };
    let back = format!("/ui/promises/{}", id.as_str());
    match st.store.settle(&req).await {
        Ok(SettleOutcome::Settled(_)) => see_other(&format!(
            "{back}?done={}",
            url_enc(&format!("The promise was {word}."))
        )),
        Ok(
            SettleOutcome::Deduplicated(p)
            | SettleOutcome::AlreadySettled(p)
            | SettleOutcome::TimedOut(p),
        ) => see_other(&format!(
            "{back}?done={}",
            url_enc(&format!(
                "Nothing changed: the promise is already {}.",
                p.state
            ))
        )),
        Ok(SettleOutcome::NotFound) => error_page(
            &s,
            StatusCode::NOT_FOUND,
            "No such promise; nothing was changed.",
        ),
        Err(e) => unavailable_page(&s, "store", &e, "; nothing was changed"),
    }
}

// ---------- dead letters ----------

fn dead_letter_rows(letters: &[DeadLetter], csrf: &str) -> String {
    let mut b = String::new();
    for (i, d) in letters.iter().enumerate() {
        let _ = write!(
            b,
            r#"<li><h2 id="dl-{i}">{}</h2>
<p><strong>Why:</strong> <span class="dl-reason">{}</span></p>
<form method="post" action="/ui/dead-letters/republish" aria-labelledby="dl-{i}">
<input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="fingerprint" value="{}">
<label for="dl-body-{i}">Body (edit, then republish to the trigger queue)<textarea id="dl-body-{i}" name="body">{}</textarea></label>
<label class="inline"><span><input type="checkbox" name="confirm" value="yes" required> I am sure</span></label>
<p><button type="submit">Republish</button></p></form></li>"#,
            esc(d.message_id.as_deref().unwrap_or("(no message id)")),
            esc(d
                .error
                .as_deref()
                .unwrap_or("(no x-runbridge-error header: past the delivery limit)")),
            esc(&d.fingerprint),
            esc(&d.body)
        );
    }
    b
}

pub async fn dead_letters<S: Store>(st: St<S>, h: HeaderMap, RawQuery(q): RawQuery) -> Response {
    let Some(s) = session::operator(&st, &h).await else {
        return unauthorized();
    };
    let Some(b) = &st.broker else {
        return error_page(
            &s,
            StatusCode::SERVICE_UNAVAILABLE,
            "No broker is configured.",
        );
    };
    let notice = query(&q)
        .into_iter()
        .find(|(k, _)| k == "done")
        .map(|(_, v)| format!(r#"<p class="notice" role="status">{}</p>"#, esc(&v)))
        .unwrap_or_default();
    match broker::browse_dead_letters(b, 100).await {
        Ok(letters) => {
            let list = if letters.is_empty() {
                r#"<p class="notice" id="no-dead-letters">The dead-letter queue is empty.</p>"#
                    .to_owned()
            } else {
                format!(
                    r#"<ol class="dead-letters">{}</ol>"#,
                    dead_letter_rows(&letters, &s)
                )
            };
            html(
                StatusCode::OK,
                page(
                    "Dead letters",
                    Nav::DeadLetters,
                    Some(&s),
                    &format!(
                        r#"<h1>Dead letters</h1>{notice}<p>The first {} messages of <code>{}</code>, read without removing them. Republishing puts the edited body on the trigger queue (confirmed) and only then removes the dead letter.</p>{list}"#,
                        letters.len(),
                        esc(&b.dead_letter_queue)
                    ),
                ),
            )
        }
        Err(e) => unavailable_page(&s, "broker", &e, ""),
    }
}

pub async fn republish<S: Store>(st: St<S>, h: HeaderMap, body: Body) -> Response {
    let (s, f) = match checked_form(&st, &h, body).await {
        Ok(x) => x,
        Err(refused) => return refused,
    };
    if let Some(refused) = unconfirmed(&s, &f) {
        return refused;
    }
    let (Some(fp), Some(new_body)) = (f.get("fingerprint"), f.get("body")) else {
        return error_page(
            &s,
            StatusCode::BAD_REQUEST,
            "The form is incomplete; nothing was changed.",
        );
    };
    let Some(b) = &st.broker else {
        return error_page(
            &s,
            StatusCode::SERVICE_UNAVAILABLE,
            "No broker is configured.",
        );
    };
    match broker::republish_dead_letter(b, fp, new_body.as_bytes()).await {
        Ok(true) => see_other(&format!(
            "/ui/dead-letters?done={}",
            url_enc("Republished to the trigger queue.")
        )),
        Ok(false) => see_other(&format!(
            "/ui/dead-letters?done={}",
            url_enc("That dead letter is no longer in the queue; nothing was published.")
        )),
        Err(e) => unavailable_page(&s, "broker", &e, "; nothing was removed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn ages_fall_in_buckets() {
        let o = Overview {
            pending_ages: vec![
                (Duration::from_secs(90_000), 1),
                (Duration::from_secs(700), 2),
                (Duration::from_secs(5), 3),
            ],
            ..Default::default()
        };
        let b = age_buckets(&o);
        assert_eq!(b[0], ("under 1 min", 3));
        assert_eq!(b[2], ("10–60 min", 2));
        assert_eq!(b[5], ("over 1 day", 1));
    }
}
