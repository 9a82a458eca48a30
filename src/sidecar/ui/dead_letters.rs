//! Dead letters (`/ui/dead-letters`): the first messages of the dead-letter
//! queue, read without removing them, each with a form to edit its body and
//! republish it to the trigger queue (`POST /ui/dead-letters/republish`).

use axum::body::Body;
use axum::extract::RawQuery;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use maud::{Markup, html};

use super::layout::{Nav, confirm_box, csrf_field, notice, page, respond};
use super::{
    checked_form, done_notice, error_page, see_other, session, unauthorized, unavailable_page,
    unconfirmed, url_enc,
};
use crate::broker::{self, DeadLetter};
use crate::sidecar::St;
use crate::store::Store;

fn dead_letter_list(letters: &[DeadLetter], csrf: &str) -> Markup {
    html! {
        ol.dead-letters {
            @for (i, d) in letters.iter().enumerate() {
                li {
                    h2 id=(format!("dl-{i}")) { (d.message_id.as_deref().unwrap_or("(no message id)")) }
                    p {
                        strong { "Why:" } " "
                        span.dl-reason {
                            (d.error.as_deref().unwrap_or("(no x-runbridge-error header: past the delivery limit)"))
                        }
                    }
                    form method="post" action="/ui/dead-letters/republish" aria-labelledby=(format!("dl-{i}")) {
                        (csrf_field(csrf))
                        input type="hidden" name="fingerprint" value=(d.fingerprint);
                        label for=(format!("dl-body-{i}")) {
                            "Body (edit, then republish to the trigger queue)"
                            textarea id=(format!("dl-body-{i}")) name="body" { (d.body) }
                        }
                        (confirm_box())
                        p { button type="submit" { "Republish" } }
                    }
                }
            }
        }
    }
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
    let done = done_notice(&q);
    match broker::browse_dead_letters(b, 100).await {
        Ok(letters) => {
            let body = html! {
                h1 { "Dead letters" }
                @if let Some(n) = &done { (notice(n)) }
                p {
                    "The first " (letters.len()) " messages of " code { (b.dead_letter_queue) }
                    ", read without removing them. Republishing puts the edited body on the trigger queue (confirmed) and only then removes the dead letter."
                }
                @if letters.is_empty() {
                    p.notice id="no-dead-letters" { "The dead-letter queue is empty." }
                } @else {
                    (dead_letter_list(&letters, &s))
                }
            };
            respond(
                StatusCode::OK,
                page("Dead letters", Nav::DeadLetters, Some(&s), body),
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
