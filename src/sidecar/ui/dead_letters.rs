//! Dead letters (`/ui/dead-letters`): the first messages of the dead-letter
//! queue, read without removing them, each with a form to edit its body and
//! republish it to the trigger queue (`POST /ui/dead-letters/republish`).

use axum::body::Body;
use axum::extract::RawQuery;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};

use super::layout::{Nav, confirm_box, csrf_field, notice, page, respond};
use super::session::Cookies;
use super::{
    checked_form, done_notice, error_page, see_other, session, unauthorized, unavailable_page,
    unconfirmed, url_enc,
};
use crate::broker::{DeadLetter, DeadLetterQueue, PREVIEW_BYTES};
use crate::sidecar::St;
use crate::store::Store;

/// Dead letters a page lists: with previews of [`PREVIEW_BYTES`], a page
/// stays under about 1.5 MiB whatever the bodies (HTML escaping at most
/// sextuples a preview).
const PAGE: usize = 50;

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
                        @if d.is_whole() {
                            label for=(format!("dl-body-{i}")) {
                                "Body (edit, then republish to the trigger queue)"
                                textarea id=(format!("dl-body-{i}")) name="body" { (d.body) }
                            }
                        } @else {
                            // Too large to edit here: a preview, the whole
                            // body as a download, and a republish as it is.
                            p.dl-size {
                                (d.size) " bytes; the first " (PREVIEW_BYTES) " are shown. "
                                a href=(format!("/ui/dead-letters/body?fingerprint={}", d.fingerprint)) download { "Download the whole body" }
                            }
                            pre.dl-preview { (d.body) }
                            input type="hidden" name="as_is" value="1";
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
    let (s, b) = match viewer(&st, &h).await {
        Ok(x) => x,
        Err(refused) => return refused,
    };
    let done = done_notice(&q);
    match b.browse(PAGE).await {
        Ok(letters) => {
            let body = html! {
                h1 { "Dead letters" }
                @if let Some(n) = &done { (notice(n)) }
                p {
                    "The first " (letters.len()) " messages of " code { (b.name()) }
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
    let new_body = match (f.get("body"), f.get("as_is").map(String::as_str)) {
        (Some(b), _) => Some(b.as_bytes()),
        (None, Some("1")) => None,
        _ => return incomplete(&s),
    };
    let Some(fp) = f.get("fingerprint") else {
        return incomplete(&s);
    };
    let Some(b) = &st.dead_letters else {
        return no_broker(&s);
    };
    match b.republish(fp, new_body).await {
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

/// The operator's session and the broker, or the page that refuses.
async fn viewer<'a, S: Store>(
    st: &'a St<S>,
    h: &HeaderMap,
) -> Result<(String, &'a DeadLetterQueue), Response> {
    let Some(s) = session::operator(st, h).await else {
        return Err(unauthorized(Cookies::of(st)));
    };
    match &st.dead_letters {
        Some(b) => Ok((s, b)),
        None => Err(no_broker(&s)),
    }
}

fn no_broker(s: &str) -> Response {
    error_page(
        s,
        StatusCode::SERVICE_UNAVAILABLE,
        "No broker is configured.",
    )
}

fn incomplete(s: &str) -> Response {
    error_page(
        s,
        StatusCode::BAD_REQUEST,
        "The form is incomplete; nothing was changed.",
    )
}

/// `GET /ui/dead-letters/body?fingerprint=...`: one dead letter's whole
/// body, as a download (never rendered into a page).
pub async fn body<S: Store>(st: St<S>, h: HeaderMap, RawQuery(q): RawQuery) -> Response {
    let (s, b) = match viewer(&st, &h).await {
        Ok(x) => x,
        Err(refused) => return refused,
    };
    let wanted = url::form_urlencoded::parse(q.as_deref().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "fingerprint")
        .map(|(_, v)| v.into_owned())
        .filter(|f| f.len() == 32 && f.bytes().all(|c| c.is_ascii_hexdigit()));
    let Some(wanted) = wanted else {
        return error_page(&s, StatusCode::BAD_REQUEST, "No such dead letter.");
    };
    match b.body(&wanted).await {
        Ok(Some(bytes)) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"dead-letter-{wanted}.json\""),
                ),
                (header::CACHE_CONTROL, "no-store".to_owned()),
            ],
            bytes,
        )
            .into_response(),
        Ok(None) => error_page(
            &s,
            StatusCode::NOT_FOUND,
            "That dead letter is no longer in the queue.",
        ),
        Err(e) => unavailable_page(&s, "broker", &e, ""),
    }
}
