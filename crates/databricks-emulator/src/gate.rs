//! Who may call: the bearer token check, and the faults a call is answered
//! with instead (scripted or random), before any handler runs.

// Handlers return a finished error `Response` through `?`-style helpers; its
// size does not matter for an emulator.
#![allow(clippy::result_large_err)]

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use axum::body::Bytes;

use super::model::{Emulator, Injected, now_ms};
use super::request::{Params, err};

/// The page older workspaces answer a refused token with (Jetty's error
/// page); Databricks' SDK reads its `<pre>` (`_HtmlErrorDeserializer`).
fn html_403(path: &str) -> Response {
    let body = format!(
        "<html>\n<head>\n<meta http-equiv=\"Content-Type\" content=\"text/html;charset=utf-8\"/>\n<title>Error 403 Invalid access token.</title>\n</head>\n<body><h2>HTTP ERROR 403</h2>\n<p>Problem accessing {path}. Reason:\n<pre>    Invalid access token.</pre></p>\n</body>\n</html>\n"
    );
    (
        StatusCode::FORBIDDEN,
        [(header::CONTENT_TYPE, "text/html;charset=utf-8")],
        body,
    )
        .into_response()
}

/// An invalid, revoked or expired personal access token: 403 with a
/// *numeric* `error_code` (as workspaces answer it; databricks-sdk-go #917
/// shows the body, which the Go SDK of the time could not parse).
fn invalid_token() -> Response {
    (
        StatusCode::FORBIDDEN,
        Json(json!({"error_code": 403, "message": "Invalid access token."})),
    )
        .into_response()
}

/// The bearer token check. A missing credential is 401 `UNAUTHENTICATED`;
/// an expired OAuth access token 401; a PAT that is wrong or was revoked
/// (`POST /emulator/tokens`) 403 "Invalid access token.", as JSON or as
/// the older HTML page.
pub fn authenticate(emu: &Emulator, headers: &HeaderMap, path: &str) -> Result<(), Response> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| !t.is_empty());
    let Some(bearer) = bearer else {
        return Err(err(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "Credential was not sent or was of an unsupported type for this API.",
        ));
    };
    if let Some(html) = emu.lock().refused_tokens.get(bearer).copied() {
        return Err(if html {
            html_403(path)
        } else {
            invalid_token()
        });
    }
    // An OAuth access token the emulator issued: good until it expires.
    let oauth = emu.lock().oauth_tokens.get(bearer).copied();
    if let Some(expires) = oauth {
        if now_ms() >= expires {
            emu.lock().oauth_expired_refused += 1;
            return Err(err(
                StatusCode::UNAUTHORIZED,
                "UNAUTHENTICATED",
                "Token expired. Please obtain a new token.",
            ));
        }
        return Ok(());
    }
    let ok = match &emu.settings.token {
        // With OAuth configured, only its tokens (or the PAT) pass.
        None => emu.settings.oauth.is_none(),
        Some(want) => want == bearer,
    };
    if ok { Ok(()) } else { Err(invalid_token()) }
}

/// Version check, auth, then faults; `Err` is the response to send instead.
pub async fn gate(
    emu: &Emulator,
    version: &str,
    headers: &HeaderMap,
    endpoint: &str,
) -> Result<Option<Injected>, Response> {
    if version != "2.2" && version != "2.1" {
        return Err(err(
            StatusCode::NOT_FOUND,
            "ENDPOINT_NOT_FOUND",
            format!("No API found for 'api/{version}/jobs'"),
        ));
    }
    authenticate(emu, headers, &format!("/api/{version}/{endpoint}"))?;
    match emu.fault_for(endpoint) {
        Some(Injected::TooManyRequests) => {
            let after = emu.faults().retry_after_s.max(1);
            let mut r = err(
                StatusCode::TOO_MANY_REQUESTS,
                "REQUEST_LIMIT_EXCEEDED",
                format!("Too many requests to {endpoint}. Please retry after {after} seconds."),
            );
            if let Ok(v) = after.to_string().parse() {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            Err(r)
        }
        Some(Injected::Unavailable) => {
            let mut r = err(
                StatusCode::SERVICE_UNAVAILABLE,
                "TEMPORARILY_UNAVAILABLE",
                "The service is temporarily unavailable. Please retry.",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            Err(r)
        }
        Some(Injected::PermissionDenied) => Err(err(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            format!(
                "User emulator@runbridge.local does not have Manage Run or Owner or Admin permissions on {endpoint}"
            ),
        )),
        Some(Injected::JobQuota) => Err(invalid_state(
            "The number of jobs created in past 3600 seconds exceeds the limit of 10000. Please retry later.",
        )),
        Some(Injected::Slow) => {
            let ms = match emu.faults().slow_ms {
                0 => 3000,
                n => n,
            };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(None)
        }
        other => Ok(other),
    }
}

fn invalid_state(message: &str) -> Response {
    err(StatusCode::BAD_REQUEST, "INVALID_STATE", message)
}

/// The fields of a GET, after the version check, auth and faults.
pub async fn get_params(
    emu: &Emulator,
    version: &str,
    headers: &HeaderMap,
    endpoint: &str,
    query: Option<&str>,
    body: &Bytes,
) -> Result<Params, Response> {
    gate(emu, version, headers, endpoint).await?;
    Params::get(query, body)
}

/// The fields of a POST, after the version check, auth and faults.
pub async fn post_params(
    emu: &Emulator,
    version: &str,
    headers: &HeaderMap,
    endpoint: &str,
    body: &Bytes,
) -> Result<Params, Response> {
    gate(emu, version, headers, endpoint).await?;
    Params::post(body)
}
