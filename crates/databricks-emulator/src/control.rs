//! The emulator's own routes for tests (`/emulator/*`: faults, scripted
//! faults, tokens, notifications, the run table, counters) and the
//! workspace's identity routes (SCIM `Me`, the OAuth token endpoint).

use std::collections::VecDeque;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::gate::authenticate;
use super::model::{Faults, Injected, NotifyTarget, now_ms};
use super::request::{Emu, invalid};

/// SCIM `Me`: who the credentials are (what `runbridge check` calls).
pub async fn me(State(emu): Emu, headers: HeaderMap) -> Response {
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
pub struct TokenState {
    token: String,
    /// `valid`, or `revoked` (also what an expired PAT gets).
    state: String,
    /// Answer a refused token with the older HTML page.
    #[serde(default)]
    html: bool,
}

/// Revokes a token (or makes it valid again), for credential-outage tests.
pub async fn set_token(State(emu): Emu, Json(t): Json<TokenState>) -> Response {
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

pub async fn get_faults(State(emu): Emu) -> Response {
    Json(emu.faults()).into_response()
}

pub async fn set_faults(State(emu): Emu, Json(f): Json<Faults>) -> Response {
    emu.set_faults(f.clone());
    Json(f).into_response()
}

#[derive(Deserialize)]
pub struct Inject {
    /// e.g. `jobs/run-now`
    endpoint: String,
    faults: Vec<Injected>,
}

pub async fn inject(State(emu): Emu, Json(i): Json<Inject>) -> Response {
    let mut inner = emu.lock();
    let q = inner.inject.entry(i.endpoint).or_insert_with(VecDeque::new);
    q.extend(i.faults);
    Json(json!({"queued": q.len()})).into_response()
}

pub async fn set_notify(State(emu): Emu, Json(t): Json<NotifyTarget>) -> Response {
    if let Ok(mut n) = emu.notify.lock() {
        *n = Some(t);
    }
    Json(json!({"ok": true})).into_response()
}

/// Every API request with its arrival time (ms) and the fault it got.
pub async fn call_log(State(emu): Emu) -> Response {
    let inner = emu.lock();
    let calls: Vec<Value> = inner
        .call_log
        .iter()
        .map(|(e, t, f)| json!({"endpoint": e, "at": t, "fault": f}))
        .collect();
    Json(json!({ "calls": calls })).into_response()
}

pub async fn all_runs(State(emu): Emu) -> Response {
    let inner = emu.lock();
    Json(json!({ "runs": inner.runs.values().collect::<Vec<_>>() })).into_response()
}

/// The workspace's OAuth token endpoint (client-credentials grant, client
/// authenticated with HTTP Basic), as Databricks serves it for service
/// principals. Errors as OAuth 2.0 (RFC 6749 §5.2) bodies.
pub async fn oauth_token(State(emu): Emu, headers: HeaderMap, body: Bytes) -> Response {
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

pub async fn stats(State(emu): Emu) -> Response {
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
