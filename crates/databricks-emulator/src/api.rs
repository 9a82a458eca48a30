//! The emulator's HTTP surface: Jobs API 2.2 routes plus `/emulator/*` for
//! tests (faults, scripted faults, the full run table).

// Handlers return a finished error `Response` through `?`-style helpers; its
// size does not matter for an emulator.
#![allow(clippy::result_large_err)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::model::{Emulator, Faults, Injected, now_ms};
use super::{jobs, runs};

pub type Emu = State<Arc<Emulator>>;

/// A Databricks error response: `{"error_code", "message"}`.
pub fn err(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error_code": code, "message": message.into()})),
    )
        .into_response()
}

pub fn invalid(message: impl Into<String>) -> Response {
    err(StatusCode::BAD_REQUEST, "INVALID_PARAMETER_VALUE", message)
}

pub fn router(emu: Arc<Emulator>) -> Router {
    Router::new()
        .route("/api/{version}/jobs/create", post(jobs::create_job))
        .route("/api/{version}/jobs/get", get(jobs::get_job))
        .route("/api/{version}/jobs/run-now", post(runs::run_now))
        .route("/api/{version}/jobs/runs/submit", post(runs::submit))
        .route("/api/{version}/jobs/runs/get", get(runs::get_run))
        .route("/api/{version}/jobs/runs/get-output", get(runs::get_output))
        .route("/api/{version}/jobs/runs/cancel", post(runs::cancel))
        .route(
            "/api/{version}/jobs/runs/repair",
            post(super::repair::repair),
        )
        .route("/api/{version}/jobs/runs/list", get(runs::list_runs))
        .route("/api/2.0/preview/scim/v2/Me", get(me))
        .route("/oidc/v1/token", post(oauth_token))
        .route("/emulator/tokens", post(set_token))
        .route("/emulator/faults", get(get_faults).post(set_faults))
        .route("/emulator/inject", post(inject))
        .route("/emulator/notifications", post(set_notify))
        .route("/emulator/runs", get(all_runs))
        .route("/emulator/stats", get(stats))
        .route("/emulator/calls", get(call_log))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .fallback(|| async {
            err(
                StatusCode::NOT_FOUND,
                "ENDPOINT_NOT_FOUND",
                "No API found for this path",
            )
        })
        .with_state(emu)
}

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
fn authenticate(emu: &Emulator, headers: &HeaderMap, path: &str) -> Result<(), Response> {
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

/// SCIM `Me`: who the credentials are (what `runbridge check` calls).
async fn me(State(emu): Emu, headers: HeaderMap) -> Response {
    if let Err(r) = authenticate(&emu, &headers, "/api/2.0/preview/scim/v2/Me") {
        return r;
    }
    Json(json!({
        "id": "1",
        "userName": "emulator@runbridge.local",
        "active": true,
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
    }))
    .into_response()
}

#[derive(Deserialize)]
struct TokenState {
    token: String,
    /// `valid`, or `revoked` (also what an expired PAT gets).
    state: String,
    /// Answer a refused token with the older HTML page.
    #[serde(default)]
    html: bool,
}

/// Revokes a token (or makes it valid again), for credential-outage tests.
async fn set_token(State(emu): Emu, Json(t): Json<TokenState>) -> Response {
    let mut inner = emu.lock();
    match t.state.as_str() {
        "valid" => {
            inner.refused_tokens.remove(&t.token);
        }
        "revoked" | "expired" => {
            inner.refused_tokens.insert(t.token, t.html);
        }
        other => {
            return invalid(format!(
                "state must be valid, revoked or expired, not {other:?}"
            ));
        }
    }
    Json(json!({"refused": inner.refused_tokens.len()})).into_response()
}

pub fn parse_body(body: &Bytes) -> Result<Map<String, Value>, Response> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(err(
            StatusCode::BAD_REQUEST,
            "MALFORMED_REQUEST",
            "Request body must be a JSON object",
        )),
        Err(e) => Err(err(
            StatusCode::BAD_REQUEST,
            "MALFORMED_REQUEST",
            format!("Could not parse request object: {e}"),
        )),
    }
}

async fn get_faults(State(emu): Emu) -> Response {
    Json(emu.faults()).into_response()
}

async fn set_faults(State(emu): Emu, Json(f): Json<Faults>) -> Response {
    emu.set_faults(f.clone());
    Json(f).into_response()
}

#[derive(Deserialize)]
struct Inject {
    /// e.g. `jobs/run-now`
    endpoint: String,
    faults: Vec<Injected>,
}

async fn inject(State(emu): Emu, Json(i): Json<Inject>) -> Response {
    let mut inner = emu.lock();
    let q = inner.inject.entry(i.endpoint).or_insert_with(VecDeque::new);
    q.extend(i.faults);
    Json(json!({"queued": q.len()})).into_response()
}

async fn set_notify(State(emu): Emu, Json(t): Json<super::model::NotifyTarget>) -> Response {
    if let Ok(mut n) = emu.notify.lock() {
        *n = Some(t);
    }
    Json(json!({"ok": true})).into_response()
}

/// Every API request with its arrival time (ms) and the fault it got.
async fn call_log(State(emu): Emu) -> Response {
    let inner = emu.lock();
    let calls: Vec<Value> = inner
        .call_log
        .iter()
        .map(|(e, t, f)| json!({"endpoint": e, "at": t, "fault": f}))
        .collect();
    Json(json!({ "calls": calls })).into_response()
}

async fn all_runs(State(emu): Emu) -> Response {
    let inner = emu.lock();
    Json(json!({ "runs": inner.runs.values().collect::<Vec<_>>() })).into_response()
}

/// The workspace's OAuth token endpoint (client-credentials grant, client
/// authenticated with HTTP Basic), as Databricks serves it for service
/// principals. Errors as OAuth 2.0 (RFC 6749 §5.2) bodies.
async fn oauth_token(State(emu): Emu, headers: HeaderMap, body: Bytes) -> Response {
    let oauth_err = |status: StatusCode, error: &str, description: &str| {
        (
            status,
            Json(json!({"error": error, "error_description": description})),
        )
            .into_response()
    };
    let Some(client) = emu.settings.oauth.clone() else {
        return oauth_err(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            "No OAuth client is configured for this workspace",
        );
    };
    let form: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(&body).into_owned().collect();
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok());
    let (id, secret) = match basic.as_deref().and_then(|s| s.split_once(':')) {
        Some((i, s)) => (i.to_owned(), s.to_owned()),
        None => (
            form.get("client_id").cloned().unwrap_or_default(),
            form.get("client_secret").cloned().unwrap_or_default(),
        ),
    };
    if id != client.client_id || secret != client.client_secret {
        return oauth_err(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Client authentication failed",
        );
    }
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return oauth_err(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "Only client_credentials is supported",
        );
    }
    let ttl = client.token_ttl;
    let token = {
        let mut inner = emu.lock();
        let token = format!("emu-oauth-{}", inner.oauth_tokens.len() + 1);
        inner
            .oauth_tokens
            .insert(token.clone(), now_ms() + ttl.as_millis() as i64);
        token
    };
    Json(json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": ttl.as_secs(),
        "scope": form.get("scope").cloned().unwrap_or_else(|| "all-apis".into()),
    }))
    .into_response()
}

async fn stats(State(emu): Emu) -> Response {
    let inner = emu.lock();
    Json(json!({
        "oauth_tokens_issued": inner.oauth_tokens.len(),
        "oauth_expired_refused": inner.oauth_expired_refused,
        "calls": inner.calls,
        "runs": inner.runs.len(),
        "jobs": inner.jobs.len(),
        "max_launches_in_flight": inner.max_launches_in_flight,
        "max_active_runs": inner.max_active,
    }))
    .into_response()
}
