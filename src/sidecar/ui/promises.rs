//! Promises: the search page (`/ui/promises`), one promise's record and
//! timeline (`/ui/promises/{id}`), and settling one by hand (`POST /ui/act`).

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{Path, RawQuery};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use maud::{Markup, html};

use super::layout::{Nav, alert, confirm_box, csrf_field, notice, page, respond, state_class};
use super::session::Cookies;
use super::{
    confirmed_promise_form, done_notice, error_page, query, see_other, session, unauthorized,
    unavailable_page, url_enc,
};
use crate::domain::IdPattern;
use crate::domain::{Completion, Payload, Promise, PromiseId, SettledBy, State};
use crate::sidecar::St;
use crate::store::{ChildEntry, SearchQuery, Settle, SettleOutcome, Store, StoreError};

/// The search form, filled with what was asked.
fn search_form(
    id: &str,
    state: Option<&str>,
    tag: Option<&str>,
    workspace: Option<&str>,
) -> Markup {
    let options = std::iter::once(("", "any state"))
        .chain(State::ALL.iter().map(|s| (s.as_str(), s.as_str())));
    html! {
        h1 { "Promises" }
        form.search method="get" action="/ui/promises" role="search" {
            label for="q-id" { "Id (use * as a wildcard)" input id="q-id" name="id" value=(id); }
            label for="q-state" {
                "State"
                select id="q-state" name="state" {
                    @for (v, label) in options {
                        option value=(v) selected[state == Some(v)] { (label) }
                    }
                }
            }
            label for="q-tag" { "Tag (key=value)" input id="q-tag" name="tag" value=(tag.unwrap_or("")); }
            label for="q-ws" { "Workspace" input id="q-ws" name="workspace" value=(workspace.unwrap_or("")); }
            button type="submit" { "Search" }
        }
    }
}

pub async fn promises<S: Store>(st: St<S>, h: HeaderMap, RawQuery(q): RawQuery) -> Response {
    let Some(s) = session::operator(&st, &h).await else {
        return unauthorized(Cookies::of(&st));
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
    let form = search_form(&id, state.as_deref(), tag.as_deref(), workspace.as_deref());
    let refused = |message: &str| {
        let body = html! { (form) (alert(message)) };
        respond(
            StatusCode::BAD_REQUEST,
            page("Promises", Nav::Promises, Some(&s), body),
        )
    };
    let mut problems = Vec::new();
    let pattern = match IdPattern::parse(&id) {
        Ok(p) => p,
        Err(e) => {
            problems.push(e.to_string());
            IdPattern::any()
        }
    };
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
    if !problems.is_empty() {
        return refused(&problems.join(" "));
    }
    let q = SearchQuery {
        id: pattern,
        states,
        tags,
        workspace: workspace.clone(),
        limit: 50,
        cursor: cursor.clone(),
        ..Default::default()
    };
    let found = match st.store.search(&q).await {
        Ok(p) => p,
        Err(StoreError::InvalidCursor) => {
            return refused("That page link is no longer valid; search again.");
        }
        Err(e) => return unavailable_page(&s, "store", &e, ""),
    };
    let next = found.cursor.as_ref().map(|next| {
        let mut link: Vec<(String, String)> = params
            .iter()
            .filter(|(k, _)| k != "cursor")
            .cloned()
            .collect();
        link.push(("cursor".into(), next.clone()));
        url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(link)
            .finish()
    });
    let body = html! {
        (form)
        @if found.unreadable > 0 {
            p.notice id="unreadable" {
                (found.unreadable) " stored records on this page could not be read and are left out (see runbridge_store_unreadable_records_total and the sidecar's log)."
            }
        }
        @if found.promises.is_empty() {
            p.notice id="no-results" { "No promise matches." }
        } @else {
            table id="results" {
                caption.sr-only { "Matching promises" }
                thead {
                    tr {
                        th scope="col" { "Id" }
                        th scope="col" { "State" }
                        th scope="col" { "Created" }
                        th scope="col" { "Workspace" }
                        th scope="col" { "Tags" }
                    }
                }
                tbody {
                    @for p in &found.promises {
                        tr {
                            td { a href=(format!("/ui/promises/{}", p.id.as_str())) { (p.id.as_str()) } }
                            td class=(state_class(p.state)) { (p.state.as_str()) }
                            td { (when(p.created_on)) }
                            td { (p.workspace) }
                            td { (tag_list(&p.tags)) }
                        }
                    }
                }
            }
        }
        @if let Some(qs) = next {
            p { a id="next-page" href=(format!("/ui/promises?{qs}")) { "Next page" } }
        }
    };
    respond(
        StatusCode::OK,
        page("Promises", Nav::Promises, Some(&s), body),
    )
}

fn when(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| ms.to_string())
}

fn tag_list(tags: &BTreeMap<String, String>) -> String {
    tags.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The most of one stored value a page shows. Pretty-printing indents
/// every level, so a deep value grows by its depth on every line (a 250 KB
/// value nested 126 deep made a 32 MB page): only a small, shallow value
/// is pretty-printed, and what is shown is cut at [`SHOWN_BYTES`].
const PRETTY_BYTES: usize = 16 * 1024;
const PRETTY_DEPTH: usize = 8;
const SHOWN_BYTES: usize = 64 * 1024;

fn depth(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        serde_json::Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// A parameter or result: pretty JSON when it is small and shallow, else as
/// stored, and never more than [`SHOWN_BYTES`] of it (the whole value is
/// the promise's JSON, `GET /promises/{id}`).
fn data_block(p: &Payload) -> Markup {
    match &p.data {
        None => html! { p { "(none)" } },
        Some(d) => {
            let pretty = (d.len() <= PRETTY_BYTES)
                .then(|| serde_json::from_str::<serde_json::Value>(d).ok())
                .flatten()
                .filter(|v| depth(v) <= PRETTY_DEPTH)
                .and_then(|v| serde_json::to_string_pretty(&v).ok());
            let shown = pretty.as_deref().unwrap_or(d);
            if shown.len() <= SHOWN_BYTES {
                return html! { pre { (shown) } };
            }
            let end = shown.floor_char_boundary(SHOWN_BYTES);
            html! {
                p.data-cut { (d.len()) " bytes; the first " (end) " are shown (the whole value: the promise's JSON, GET /promises/{id})." }
                pre { (&shown[..end]) }
            }
        }
    }
}

/// A parent's children: each with its state and a link to its page.
fn children_table(children: &[ChildEntry]) -> Markup {
    html! {
        table id="children" {
            caption.sr-only { "The parent's children" }
            thead { tr { th scope="col" { "#" } th scope="col" { "Child" } th scope="col" { "State" } } }
            tbody {
                @for c in children {
                    tr {
                        td { (c.index) }
                        td { a href=(format!("/ui/promises/{}", c.id.as_str())) { (c.id.as_str()) } }
                        @match c.state {
                            Some(st) => td class=(state_class(st)) { (st.as_str()) },
                            None => td { "not launched yet" },
                        }
                    }
                }
            }
        }
    }
}

fn promise_page(
    p: &Promise,
    children: Option<&[ChildEntry]>,
    csrf: &str,
    done: Option<&str>,
) -> Markup {
    let id = p.id.as_str();
    let run = match (p.run_id, &p.run_page_url) {
        (Some(r), Some(u)) if u.starts_with("https://") || u.starts_with("http://") => {
            html! { (r) " (" a href=(u) rel="noreferrer" { "run page" } ")" }
        }
        (Some(r), _) => html! { (r) },
        (None, _) => html! { "none recorded" },
    };
    let a = &p.activity;
    let dash = || "–".to_string();
    let rows: [(&str, Markup); 9] = [
        ("Databricks run", run.clone()),
        (
            "Job",
            html! { (p.job_id.map(|j| j.to_string()).unwrap_or_else(dash)) },
        ),
        ("Workspace", html! { (p.workspace) }),
        ("Deadline", html! { (when(p.timeout)) }),
        (
            "Heartbeat every",
            html! { (p.heartbeat_seconds.map(|s| format!("{s} s")).unwrap_or_else(dash)) },
        ),
        ("Tags", html! { (tag_list(&p.tags)) }),
        ("Reply to", html! { (p.reply_to.as_deref().unwrap_or("–")) }),
        ("Trace", html! { (p.traceparent.as_deref().unwrap_or("–")) }),
        (
            "Parent",
            match &p.parent {
                Some(of) => html! {
                    a href=(format!("/ui/promises/{}", of.parent.as_str())) { (of.parent.as_str()) }
                    " (child " (of.index) ")"
                },
                None => html! { "–" },
            },
        ),
    ];
    let attempts = p.retry.policy.as_ref().map(|r| {
        format!(
            "{} of {} ({}){}",
            p.retry.attempt,
            r.max_attempts(),
            r.mode().as_str(),
            p.retry
                .next_at
                .map(|t| format!("; the next is due {}", when(t)))
                .unwrap_or_default()
        )
    });
    let failed: Vec<(i64, String)> = p
        .retry
        .failed
        .iter()
        .map(|a| {
            let why = a["failure"]["result_state"]
                .as_str()
                .or_else(|| a["failure"]["reason"].as_str())
                .unwrap_or("failed")
                .to_owned();
            (
                a["ended_on"].as_i64().unwrap_or(0),
                format!(
                    "attempt {} (run {}) failed: {why}",
                    a["attempt"],
                    a["run_id"]
                        .as_u64()
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| "–".into())
                ),
            )
        })
        .collect();
    let updates: Vec<(i64, String)> = p
        .progress
        .as_ref()
        .map(|pr| {
            pr.history
                .iter()
                .map(|u| {
                    let mut said = format!("progress #{}", u["seq"]);
                    if let Some(pc) = u["percent"].as_f64() {
                        said.push_str(&format!(", {pc:.0} %"));
                    }
                    if let Some(st) = u["stage"].as_str() {
                        said.push_str(&format!(", {st}"));
                    }
                    if let Some(m) = u["message"].as_str() {
                        said.push_str(&format!(": {m}"));
                    }
                    (u["at"].as_i64().unwrap_or(0), said)
                })
                .collect()
        })
        .unwrap_or_default();
    let family = p.family.as_ref().map(|f| {
        let mc = f
            .max_concurrency
            .map(|m| format!(", at most {m} at once"))
            .unwrap_or_default();
        format!(
            "{} children, joined by {}{}{mc}",
            f.children,
            f.join.as_str(),
            if f.fail_fast { " (fail fast)" } else { "" }
        )
    });
    html! {
        h1 { "Promise " code { (id) } }
        @if let Some(n) = done { (notice(n)) }
        table {
            caption.sr-only { "The promise's record" }
            tbody {
                tr {
                    th scope="row" { "State" }
                    td class=(state_class(p.state)) id="promise-state" { (p.state.as_str()) }
                }
                @for (label, value) in rows {
                    tr { th scope="row" { (label) } td { (value) } }
                }
                @if let Some(at) = &attempts {
                    tr { th scope="row" { "Attempt" } td id="attempt" { (at) } }
                }
            }
        }
        // The timeline: what the record knows, in order.
        h2 { "Timeline" }
        ol.timeline {
            li { (when(p.created_on)) ": created" }
            @if p.run_id.is_some() {
                li {
                    @if let Some(t) = a.launched_on { (when(t)) ": " }
                    "launched as Databricks run " (run)
                }
            }
            @for (t, what) in &failed {
                li { (when(*t)) ": " (what) }
            }
            @for (t, what) in &updates {
                li.progress { (when(*t)) ": " (what) }
            }
            @if a.heartbeats > 0 {
                li { (a.last_heartbeat_on.map(when).unwrap_or_default()) ": the last of " (a.heartbeats) " heartbeats" }
            }
            @if let Some(done) = p.completed_on {
                li { (when(done)) ": " (p.state.as_str()) " by " (p.settled_by.as_deref().unwrap_or("?")) }
                @let event = html! { code { (id) "/" (p.state.as_str()) } };
                @match a.published_on {
                    Some(t) => li {
                        (when(t)) ": completion event " (event) " published (routing key "
                        code { (p.state.routing_key()) } "), confirmed by the broker"
                    },
                    None => li { "completion event " (event) " in the outbox, not confirmed by the broker yet" },
                }
            } @else {
                li { "pending" }
            }
        }
        @if let Some(f) = &family {
            h2 { "Children" }
            p { (f) }
            @if let Some(c) = children { (children_table(c)) }
        }
        h2 { "Parameters" }
        (data_block(&p.param))
        h2 { @if p.state.is_rejection() { "Error" } @else { "Value" } }
        (data_block(&p.value))
        @if p.state == State::Pending {
            h2 { "Act on it" }
            div.actions {
                @if p.retry.next_at.is_some() {
                    form method="post" action="/ui/act" {
                        (act_fields(csrf, id, "retry"))
                        p { "Retry now: the next attempt starts at once instead of after its backoff." }
                        (confirm_box())
                        p { button type="submit" id="retry-button" { "Retry now" } }
                    }
                }
                form method="post" action="/ui/act" {
                    (act_fields(csrf, id, "cancel"))
                    @if p.family.is_some() {
                        p { "Cancel the whole tree: the parent becomes REJECTED_CANCELED and every pending child is cancelled with its run." }
                    } @else {
                        p { "Cancel: the promise becomes REJECTED_CANCELED and its run is cancelled." }
                    }
                    label for="cancel-reason" { "Reason" input id="cancel-reason" name="value" value="canceled by an operator"; }
                    (confirm_box())
                    p { button.danger type="submit" id="cancel-button" { "Cancel promise" } }
                }
                @if p.family.is_none() {
                    (super::audit::adopt_form(csrf, id))
                }
                form method="post" action="/ui/act" {
                    (act_fields(csrf, id, "resolve"))
                    label for="resolve-value" { "Resolve with value" textarea id="resolve-value" name="value" {} }
                    (confirm_box())
                    p { button type="submit" { "Resolve" } }
                }
                form method="post" action="/ui/act" {
                    (act_fields(csrf, id, "reject"))
                    label for="reject-value" { "Reject with error" textarea id="reject-value" name="value" {} }
                    (confirm_box())
                    p { button.danger type="submit" { "Reject" } }
                }
            }
        }
    }
}

/// The hidden fields of an action form: CSRF token, promise id, action.
fn act_fields(csrf: &str, id: &str, action: &str) -> Markup {
    html! {
        (csrf_field(csrf))
        input type="hidden" name="id" value=(id);
        input type="hidden" name="action" value=(action);
    }
}

pub async fn promise<S: Store>(
    st: St<S>,
    Path(id): Path<String>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let Some(s) = session::operator(&st, &h).await else {
        return unauthorized(Cookies::of(&st));
    };
    let Ok(pid) = PromiseId::parse(&id) else {
        return error_page(
            &s,
            StatusCode::BAD_REQUEST,
            &format!("{id:?} is not a promise id."),
        );
    };
    let done = done_notice(&q);
    match st.store.get(&pid).await {
        Ok(Some(p)) => {
            let children = match &p.family {
                Some(_) => match crate::join::children_now(&st.store, &pid).await {
                    Ok(c) => Some(c),
                    Err(e) => return unavailable_page(&s, "store", &e, ""),
                },
                None => None,
            };
            respond(
                StatusCode::OK,
                page(
                    &format!("Promise {id}"),
                    Nav::Promises,
                    Some(&s),
                    promise_page(&p, children.as_deref(), &s, done.as_deref()),
                ),
            )
        }
        Ok(None) => error_page(
            &s,
            StatusCode::NOT_FOUND,
            &format!("No promise {id:?} (never created, or expired after its retention)."),
        ),
        Err(StoreError::Corrupt(e)) => {
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

/// `POST /ui/act`: cancel, resolve, reject or retry one promise by hand. The
/// CSRF token and the confirmation box are checked before anything else.
pub async fn act<S: Store>(st: St<S>, h: HeaderMap, body: Body) -> Response {
    let (s, f, id) = match confirmed_promise_form(&st, &h, body).await {
        Ok(x) => x,
        Err(refused) => return refused,
    };
    let value = f.get("value").cloned().unwrap_or_default();
    let back = format!("/ui/promises/{}", id.as_str());
    if f.get("action").map(String::as_str) == Some("retry") {
        use crate::sidecar::progress::{RetryNow, retry_promise};
        let said = match retry_promise(&st.store, &id).await {
            Ok(RetryNow::Scheduled(_)) => "The next attempt starts now.".to_string(),
            Ok(RetryNow::NotWaiting(why)) => format!("Nothing changed: {why}."),
            Ok(RetryNow::NotFound) => {
                return error_page(
                    &s,
                    StatusCode::NOT_FOUND,
                    "No such promise; nothing was changed.",
                );
            }
            Err(e) => return unavailable_page(&s, "store", &e, "; nothing was changed"),
        };
        return see_other(&format!("{back}?done={}", url_enc(&said)));
    }
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
        capability: None,
    };
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
        // No capability was given, so none can fail to open it.
        Ok(SettleOutcome::NotFound | SettleOutcome::NotOpened) => error_page(
            &s,
            StatusCode::NOT_FOUND,
            "No such promise; nothing was changed.",
        ),
        Err(e) => unavailable_page(&s, "store", &e, "; nothing was changed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_data_is_shown_escaped() {
        let m = data_block(&Payload::data("</pre><script>alert(1)</script>")).into_string();
        assert_eq!(
            m,
            "<pre>&lt;/pre&gt;&lt;script&gt;alert(1)&lt;/script&gt;</pre>"
        );
    }
}
