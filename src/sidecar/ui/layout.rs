//! The frame every console page shares (navigation, the logout form, the
//! inlined stylesheet and script), the small pieces pages repeat, and the
//! response headers every page gets.
//!
//! Markup is written with `maud`: compiled with the binary, and every value
//! spliced in with `(..)` is HTML-escaped. Only [`CSS`] and [`JS`], the
//! console's own assets, are spliced unescaped.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use maud::{DOCTYPE, Markup, PreEscaped, html};

const CSS: &str = include_str!("ui.css");
const JS: &str = include_str!("ui.js");

/// Which navigation link is the current page.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Nav {
    Overview,
    Promises,
    DeadLetters,
    Audit,
    None,
}

/// A whole page: layout, navigation and the logout form (with the
/// session's CSRF token) when there is a session.
pub(super) fn page(title: &str, nav: Nav, csrf: Option<&str>, body: Markup) -> Markup {
    let link = |href: &str, label: &str, me: Nav| {
        html! { a href=(href) aria-current=[(nav == me).then_some("page")] { (label) } }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · runbridge" }
                style { (PreEscaped(CSS)) }
            }
            body {
                header {
                    span.brand { "runbridge" }
                    @if let Some(csrf) = csrf {
                        nav aria-label="Main" {
                            (link("/ui", "Overview", Nav::Overview))
                            (link("/ui/promises", "Promises", Nav::Promises))
                            (link("/ui/dead-letters", "Dead letters", Nav::DeadLetters))
                            (link("/ui/audit", "Audit", Nav::Audit))
                        }
                        form method="post" action="/ui/logout" {
                            (csrf_field(csrf))
                            button.plain type="submit" { "Log out" }
                        }
                    }
                }
                main id="main" { (body) }
                script { (PreEscaped(JS)) }
            }
        }
    }
}

/// The hidden CSRF field of a form that changes something.
pub(super) fn csrf_field(csrf: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(csrf); }
}

/// The "I am sure" box of a form that settles or republishes.
pub(super) fn confirm_box() -> Markup {
    html! {
        label.inline { span { input type="checkbox" name="confirm" value="yes" required; " I am sure" } }
    }
}

/// An error message, announced to screen readers.
pub(super) fn alert(message: &str) -> Markup {
    html! { p.error role="alert" { (message) } }
}

/// The outcome of the last action, announced to screen readers.
pub(super) fn notice(message: &str) -> Markup {
    html! { p.notice role="status" { (message) } }
}

/// `class="state state-<STATE>"`: the state's colour.
pub(super) fn state_class(state: impl std::fmt::Display) -> String {
    format!("state state-{state}")
}

/// A page or fragment with the console's headers: never cached, never
/// framed, scripts only by hash.
pub(super) fn respond(status: StatusCode, body: Markup) -> Response {
    let mut r = (status, Html(body.into_string())).into_response();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spliced_values_are_escaped() {
        let m = page(
            r#"<a href="x">'&'</a>"#,
            Nav::None,
            Some(r#""><script>"#),
            alert("<img src=x onerror=alert(1)>"),
        )
        .into_string();
        assert!(m.contains("&lt;a href=&quot;x&quot;&gt;'&amp;'&lt;/a&gt; · runbridge"));
        assert!(m.contains(r#"value="&quot;&gt;&lt;script&gt;""#));
        assert!(m.contains("&lt;img src=x onerror=alert(1)&gt;"));
        assert_eq!(
            m.matches("<script>").count(),
            1,
            "only the console's own script"
        );
    }

    #[test]
    fn the_script_runs_under_the_policy() {
        let m = page("t", Nav::None, None, html! {}).into_string();
        assert!(m.contains(&format!("<script>{JS}</script>")));
        assert!(CSP.to_str().unwrap().contains("script-src 'sha256-"));
    }
}
