//! The audit's findings (`/ui/audit`): per workspace, each finding the
//! audit keeps, the promise and the run side by side, most recently seen
//! first; and adoption (`POST /ui/adopt`), the promise page's form that
//! makes a pending promise follow a run started elsewhere.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use maud::{Markup, html};

use super::layout::{Nav, page, respond, state_class};
use super::session::Cookies;
use super::{
    confirmed_promise_form, error_page, see_other, session, unauthorized, unavailable_page, url_enc,
};
use crate::audit::adopt::{AdoptError, adopt};
use crate::audit::{Finding, kept_findings};
use crate::domain::RunId;
use crate::sidecar::St;
use crate::store::Store;

/// Findings a page lists per workspace: each row is a few hundred bytes
/// of text, so a page stays small whatever the audit found.
const PAGE: usize = 200;

fn findings_table(findings: &[Finding]) -> Markup {
    html! {
        table.findings {
            thead { tr {
                th { "Kind" } th { "Promise" } th { "Promise state" } th { "Run" }
                th { "Run state" } th { "Action" } th { "Why" } th { "Last seen" }
            } }
            tbody {
                @for f in findings {
                    tr.finding data-kind=(f.kind.as_str()) {
                        td { strong { (f.kind.as_str()) } }
                        td { a href=(format!("/ui/promises/{}", f.promise_id)) { (f.promise_id) } }
                        td {
                            @match &f.promise {
                                Some(p) => span class=(state_class(&p.state)) {
                                    (p.state)
                                    @if let Some(by) = &p.settled_by { " by " (by) }
                                },
                                None => "(no such promise)",
                            }
                        }
                        td {
                            @match &f.run.run_page_url {
                                Some(u) => a href=(u) rel="noreferrer" { (f.run.run_id) },
                                None => (f.run.run_id),
                            }
                        }
                        td { (f.run.state) @if let Some(r) = &f.run.result { " " (r) } }
                        td { (f.action.as_str()) }
                        td { (f.reason) }
                        td { (f.last_seen) }
                    }
                }
            }
        }
    }
}

/// `GET /ui/audit`.
pub async fn audit<S: Store>(st: St<S>, h: HeaderMap) -> Response {
    let Some(s) = session::operator(&st, &h).await else {
        return unauthorized(Cookies::of(&st));
    };
    let mut sections = Vec::new();
    for ws in &st.settings.workspaces {
        match kept_findings(&st.store, ws, PAGE).await {
            Ok(f) => sections.push((ws.clone(), f)),
            Err(e) => return unavailable_page(&s, "store", &e, ""),
        }
    }
    let body = html! {
        h1 { "Audit" }
        p {
            "The workspace held against the promises: runs nobody waits for (orphan), a second run for one promise (duplicate), a settled promise whose run ended otherwise (mismatch), a pending promise whose run ended long ago or is gone (lost). "
            "Each finding as the last audit that saw it left it, with what was done; at most " (PAGE) " per workspace, most recently seen first."
        }
        @for (ws, findings) in &sections {
            h2 { "Workspace " code { (ws) } }
            @if findings.is_empty() {
                p.notice.no-findings { "No findings: the workspace agrees with the promises." }
            } @else {
                (findings_table(findings))
            }
        }
    };
    respond(StatusCode::OK, page("Audit", Nav::Audit, Some(&s), body))
}

/// The promise page's adoption form.
pub(super) fn adopt_form(csrf: &str, id: &str) -> Markup {
    html! {
        form method="post" action="/ui/adopt" {
            (super::layout::csrf_field(csrf))
            input type="hidden" name="id" value=(id);
            p { "Adopt a run started elsewhere (a re-run from the Databricks UI): the promise follows that run from now on, as if runbridge had launched it. It must be a run of this promise's job." }
            label for="adopt-run" { "Run id" input id="adopt-run" name="run_id" inputmode="numeric" required; }
            (super::layout::confirm_box())
            p { button type="submit" id="adopt-button" { "Adopt run" } }
        }
    }
}

/// `POST /ui/adopt`.
pub async fn adopt_action<S: Store>(st: St<S>, h: HeaderMap, body: Body) -> Response {
    let (s, f, id) = match confirmed_promise_form(&st, &h, body).await {
        Ok(x) => x,
        Err(refused) => return refused,
    };
    let Some(run) = f
        .get("run_id")
        .and_then(|r| r.trim().parse::<u64>().ok())
        .and_then(|r| RunId::new(r).ok())
    else {
        return error_page(
            &s,
            StatusCode::BAD_REQUEST,
            "The run id must be a positive number; nothing was changed.",
        );
    };
    let Some(runs) = st.runs.as_deref() else {
        return error_page(
            &s,
            StatusCode::SERVICE_UNAVAILABLE,
            "This sidecar has no Databricks credentials to read the run with; nothing was changed (runbridge promise adopt works).",
        );
    };
    let back = format!("/ui/promises/{}", id.as_str());
    match adopt(&st.store, runs, &id, run, st.first_poll).await {
        Ok(_) => see_other(&format!(
            "{back}?done={}",
            url_enc(&format!("Run {run} adopted: the promise follows it now."))
        )),
        Err(e @ (AdoptError::Store(_) | AdoptError::Databricks(_))) => {
            unavailable_page(&s, "store or Databricks", &e, "; nothing was changed")
        }
        Err(e) => error_page(
            &s,
            StatusCode::CONFLICT,
            &format!("Refused: {e}; nothing was changed."),
        ),
    }
}
