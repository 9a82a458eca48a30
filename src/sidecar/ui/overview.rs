//! The overview (`/ui`): counts by state, the outbox and the dead letters,
//! pending promises by age, and the settle rate over the last hour. The
//! page polls `/ui/overview` for its body alone to stay live.

use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use maud::{Markup, html};

use super::layout::{Nav, page, respond, state_class};
use super::session::Cookies;
use super::{session, unauthorized, unavailable_page};
use crate::domain::State;
use crate::sidecar::{AppState, St};
use crate::store::{Overview, Store, StoreError};

pub async fn overview<S: Store>(st: St<S>, h: HeaderMap) -> Response {
    let Some(s) = session::operator(&st, &h).await else {
        return unauthorized(Cookies::of(&st));
    };
    match overview_data(&st).await {
        Ok(frag) => {
            let body = html! {
                h1 { "Overview" }
                div id="overview" data-refresh="/ui/overview" aria-live="polite" { (frag) }
            };
            respond(
                StatusCode::OK,
                page("Overview", Nav::Overview, Some(&s), body),
            )
        }
        Err(e) => unavailable_page(&s, "store", &e, ""),
    }
}

/// The overview's body alone, for the page's live refresh.
pub async fn overview_fragment_route<S: Store>(st: St<S>, h: HeaderMap) -> Response {
    if session::operator(&st, &h).await.is_none() {
        return (StatusCode::UNAUTHORIZED, Html(String::new())).into_response();
    }
    match overview_data(&st).await {
        Ok(frag) => respond(StatusCode::OK, frag),
        Err(e) => {
            tracing::error!(error = %e, "console: the store is unavailable");
            respond(
                StatusCode::SERVICE_UNAVAILABLE,
                html! { "The store is unavailable." },
            )
        }
    }
}

async fn overview_data<S: Store>(st: &AppState<S>) -> Result<Markup, StoreError> {
    let o = st.store.overview().await?;
    // The readiness watcher knows whether the broker is there; asking it
    // then costs no connect timeout while it is down.
    let dead = match &st.dead_letters {
        Some(_) if !st.broker_ready.load(std::sync::atomic::Ordering::Relaxed) => {
            Err("the broker is unreachable")
        }
        Some(b) => b.count().await.map_err(|e| {
            tracing::warn!(error = %e, "console: cannot count dead letters");
            "the broker did not answer"
        }),
        None => Err("no broker configured"),
    };
    Ok(fragment(&o, dead))
}

fn fragment(o: &Overview, dead: Result<u32, &str>) -> Markup {
    let oldest = o
        .oldest_pending_age()
        .map(human)
        .unwrap_or_else(|| "none".into());
    let last_hour = o.settled_last_hour();
    let settled: u64 = last_hour.values().sum();
    let card = |id: &str, n: Markup, label: &str| {
        html! { div.card { span.n id=(id) { (n) } span.label { (label) } } }
    };
    let dead = match dead {
        Ok(n) => html! { (n) },
        Err(why) => html! { abbr title=(why) { "unknown" } },
    };
    let buckets = age_buckets(o);
    let most = buckets.iter().map(|(_, n)| *n).max().unwrap_or(0).max(1);
    html! {
        div.cards {
            (card("count-pending", html! { (o.pending) }, "pending"))
            (card("oldest-pending", html! { (oldest) }, "oldest pending"))
            (card("outbox", html! { (o.outbox) }, "events in the outbox"))
            (card("dead-letters", dead, "dead letters"))
            (card("settled-hour", html! { (settled) }, "settled in the last hour"))
        }
        h2 { "Promises by state" }
        table {
            caption.sr-only { "Pending now, and settled in the last hour by state" }
            thead { tr { th scope="col" { "State" } th.num scope="col" { "Count" } } }
            tbody {
                tr {
                    td { a class=(state_class("PENDING")) href="/ui/promises?state=PENDING" { "PENDING" } " (now)" }
                    td.num id="state-PENDING" { (o.pending) }
                }
                @for st in State::ALL.iter().filter(|s| s.is_settled()) {
                    tr {
                        td {
                            a class=(state_class(st)) href=(format!("/ui/promises?state={st}")) { (st.as_str()) }
                            " (last hour)"
                        }
                        td.num id=(format!("state-{st}")) {
                            (last_hour.get(st.as_str()).copied().unwrap_or(0))
                        }
                    }
                }
            }
        }
        h2 { "Pending promises by age" }
        table {
            caption.sr-only { "Pending promises by age" }
            thead {
                tr {
                    th scope="col" { "Age" }
                    th.num scope="col" { "Count" }
                    th scope="col" { span.sr-only { "Share" } }
                }
            }
            tbody {
                @for (label, n) in &buckets {
                    tr {
                        td { (label) }
                        td.num { (n) }
                        td aria-hidden="true" { span.bar style=(format!("width:{}px", n * 300 / most)) {} }
                    }
                }
            }
        }
        h2 { "Settle rate" }
        (rate_chart(o))
    }
}

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
fn rate_chart(o: &Overview) -> Markup {
    let totals: Vec<u64> = o
        .settled_per_minute
        .iter()
        .map(|m| m.values().sum())
        .collect();
    let max = totals.iter().copied().max().unwrap_or(0).max(1);
    let total: u64 = totals.iter().sum();
    let (w, h) = (600u64, 120u64);
    let bw = w / totals.len().max(1) as u64;
    html! {
        figure {
            svg.chart role="img" aria-labelledby="rate-cap" viewBox=(format!("0 0 {w} {h}"))
                width="100%" height=(h) preserveAspectRatio="none" {
                @for (i, n) in totals.iter().enumerate() {
                    @let bh = n * (h - 10) / max;
                    rect x=(i as u64 * bw) y=(h - bh) width=(bw.saturating_sub(1).max(1)) height=(bh) {
                        title { (n) " settled, " (totals.len() - i - 1) " min ago" }
                    }
                }
            }
            figcaption id="rate-cap" {
                "Settlements per minute over the last hour: " (total) " in all, at most "
                (max) " in one minute (oldest minute on the left)."
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_broker_error_is_shown_escaped() {
        let m = fragment(&Overview::default(), Err("<b>down</b>")).into_string();
        assert!(m.contains(r#"<abbr title="&lt;b&gt;down&lt;/b&gt;">unknown</abbr>"#));
    }
}
