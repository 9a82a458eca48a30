//! The HTTP sidecar (docs/contracts.md, the HTTP API): notebook callbacks, the Durable Promise
//! API, health. The only module that imports axum (besides the emulator, a
//! stand-in for Databricks that is not part of the bridge).
//!
//! Request handling order is fixed so that bad input changes nothing: the
//! body is read raw with a size limit (413), its content type checked (415),
//! the caller authenticated (401) before anything is written, then parsed
//! (400) into domain types, then one store call does the transition.

mod auth;
mod error;
pub mod openapi;
mod serve;
pub mod ui;

pub use serve::{Limits, TlsPem, serve, serve_metrics};

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State as AxState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::Instrument;
use utoipa::ToSchema;

pub use error::ApiError;
use error::ErrorBody;
use openapi::{Health, NotificationAnswer, Readiness, SearchPage, SettleAnswers};

use crate::domain::promise::PromiseView;
use crate::domain::{
    CallbackSigner, Completion, Payload, Promise, PromiseId, RunId, SettledBy, State,
};
use crate::reconciler::{CancelFilter, CancelReport, cancel_matching, valid_id_filter};
use crate::store::{
    CreateOutcome, HeartbeatOutcome, NewPromise, SearchQuery, Settle, SettleOutcome, Store, Timeout,
};

#[derive(Debug, Clone)]
pub struct SidecarSettings {
    pub body_limit: usize,
    /// How long reading a request body may take (then 408).
    pub body_timeout: Duration,
    pub max_wait: Duration,
    pub default_timeout: Duration,
    /// The latest deadline a created promise may have, from now.
    pub max_timeout: Duration,
    pub default_workspace: String,
    /// The console's cookie gets `Secure` (the sidecar serves HTTPS).
    pub secure_cookies: bool,
    /// A console session ends after this long unused...
    pub session_idle: Duration,
    /// ...and after this long in all.
    pub session_max: Duration,
}

/// Shared by every handler.
pub struct AppState<S> {
    pub store: S,
    pub signer: CallbackSigner,
    pub operator_tokens: Vec<SecretString>,
    pub settings: SidecarSettings,
    /// Set by a background task that keeps a broker connection (for /readyz).
    pub broker_ready: Arc<AtomicBool>,
    /// HTTP Basic credentials Databricks notification destinations use
    /// (`None`: the notification route refuses everything).
    pub notification_auth: Option<(String, SecretString)>,
    /// Where the console reads and republishes dead letters (`None`: it
    /// says the broker is not configured).
    pub broker: Option<crate::broker::BrokerSettings>,
}

type St<S> = AxState<Arc<AppState<S>>>;
type ApiResult = Result<Response, ApiError>;

pub fn router<S: Store>(state: Arc<AppState<S>>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<S>))
        .route("/openapi.json", get(openapi_json))
        .route("/metrics", get(metrics))
        .route("/cb/{token}/resolve", post(cb_resolve::<S>))
        .route("/cb/{token}/reject", post(cb_reject::<S>))
        .route("/cb/{token}/heartbeat", post(cb_heartbeat::<S>))
        .route(
            "/cb/{token}/promises/{*id}",
            get(cb_get::<S>).patch(cb_patch::<S>),
        )
        .route("/resolve", post(resolve::<S>))
        .route("/reject", post(reject::<S>))
        .route("/heartbeat", post(heartbeat::<S>))
        .route("/promises", get(search::<S>).post(create::<S>))
        // A static route wins over the wildcard below, so GET of a promise
        // whose id is "cancel" is served here too.
        .route(
            "/promises/cancel",
            post(bulk_cancel::<S>).get(get_cancel_promise::<S>),
        )
        .route("/databricks/notifications", post(notification::<S>))
        // The operator console (ui.rs).
        .route("/ui", get(ui::overview::<S>))
        .route("/ui/", get(ui::overview::<S>))
        .route("/ui/login", get(ui::login_form::<S>).post(ui::login::<S>))
        .route("/ui/logout", post(ui::logout::<S>))
        .route("/ui/overview", get(ui::overview_fragment_route::<S>))
        .route("/ui/promises", get(ui::promises::<S>))
        .route("/ui/promises/{*id}", get(ui::promise::<S>))
        .route("/ui/act", post(ui::act::<S>))
        .route("/ui/dead-letters", get(ui::dead_letters::<S>))
        .route("/ui/dead-letters/republish", post(ui::republish::<S>))
        .route("/promises/{*id}", get(get_promise::<S>).patch(patch::<S>))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(axum::middleware::map_response(hardening_headers))
        .with_state(state)
}

/// On every response: no content-type sniffing (a JSON body is never run
/// as script), and no Referer carrying a promise id or a capability token
/// in a URL to another site.
async fn hardening_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("no-referrer"),
    );
    r
}

/// Prometheus text format (version 0.0.4).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    security(()),
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String))
)]
async fn metrics() -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::telemetry::metrics::render(),
    )
        .into_response()
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    security(()),
    responses((status = 200, description = "The process is up", body = Health))
)]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    security(()),
    responses((status = 200, description = "This document", content_type = "application/json"))
)]
async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi::document(),
    )
        .into_response()
}

// ---------- request plumbing ----------

fn query_map(raw: &Option<String>) -> HashMap<String, String> {
    raw.as_deref()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

/// Reads the body raw, refusing it past the limit before buffering it all.
async fn read_body<S>(
    st: &AppState<S>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, ApiError> {
    let limit = st.settings.body_limit;
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        && len > limit
    {
        return Err(ApiError::too_large(limit));
    }
    let read = tokio::time::timeout(st.settings.body_timeout, axum::body::to_bytes(body, limit));
    let Ok(read) = read.await else {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} ms",
                st.settings.body_timeout.as_millis()
            ),
        ));
    };
    read.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit")
        {
            ApiError::too_large(limit)
        } else {
            ApiError::bad_request(format!("could not read the body: {e}"))
        }
    })
}

/// A non-empty body must be JSON.
fn json_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    bytes: &Bytes,
) -> Result<Option<T>, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    json_bytes(ct, bytes)
}

/// [`json_body`] on a content type and bytes.
fn json_bytes<T: serde::de::DeserializeOwned>(
    ct: &str,
    bytes: &[u8],
) -> Result<Option<T>, ApiError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime != "application/json" && !mime.ends_with("+json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "the body must be application/json, got {:?}",
                if ct.is_empty() { "nothing" } else { ct }
            ),
        ));
    }
    serde_json::from_slice(bytes)
        .map(Some)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))
}

fn parse_id(s: &str) -> Result<PromiseId, ApiError> {
    PromiseId::parse(s).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// A promise as a write answers it.
#[derive(Serialize, ToSchema)]
struct PromiseAnswer {
    #[serde(flatten)]
    promise: PromiseView,
    /// True when this request repeated an earlier one (same idempotency key)
    /// and changed nothing.
    deduplicated: bool,
}

fn promise_response(status: StatusCode, p: &Promise, deduplicated: bool) -> Response {
    let body = PromiseAnswer {
        promise: p.view(),
        deduplicated,
    };
    (status, Json(body)).into_response()
}

/// A JSON value as a promise payload: strings are kept as sent.
fn payload_of(v: Option<Value>) -> Payload {
    match v {
        None | Some(Value::Null) => Payload::default(),
        Some(Value::String(s)) => Payload::data(s),
        Some(other) => Payload::data(other.to_string()),
    }
}

fn settle_response(outcome: SettleOutcome, id: &PromiseId, strict: bool) -> ApiResult {
    match outcome {
        SettleOutcome::Settled(p) => Ok(promise_response(StatusCode::OK, &p, false)),
        SettleOutcome::Deduplicated(p) => Ok(promise_response(StatusCode::OK, &p, true)),
        // The specification: completing a timed-out promise without `strict` succeeds.
        SettleOutcome::TimedOut(p) if !strict => Ok(promise_response(StatusCode::OK, &p, false)),
        SettleOutcome::TimedOut(p) | SettleOutcome::AlreadySettled(p) => {
            Err(ApiError::already_settled(&p))
        }
        SettleOutcome::NotFound => Err(ApiError::not_found(id.as_str())),
    }
}

fn header_flag(headers: &HeaderMap, name: &str) -> Result<bool, ApiError> {
    match headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
    {
        None | Some("") => Ok(false),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
        Some(v) => Err(ApiError::bad_request(format!(
            "header {name} must be true or false, got {v:?}"
        ))),
    }
}

fn ikey(headers: &HeaderMap) -> Option<String> {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .filter(|s| !s.is_empty())
}

// ---------- capability callbacks: resolve / reject / heartbeat ----------

/// A notebook's callback as JSON (the same fields as the query string).
#[derive(Deserialize, Default, ToSchema)]
struct CallbackBody {
    /// The promise id (or `?id=`).
    id: Option<String>,
    /// The result (`/resolve`): any JSON; a string is kept as sent.
    value: Option<Value>,
    /// The error (`/reject`): any JSON.
    error: Option<Value>,
}

/// Resolve or reject from a notebook: `?id=..&value=..` (or `error=`) or a JSON body.
/// The callback's span carries the promise id and, when the notebook sends
/// one back, its W3C `traceparent`, which is also the span's parent (the
/// trigger's trace continues here).
async fn callback_settle<S: Store>(
    st: &AppState<S>,
    completion: Completion,
    path_token: Option<&str>,
    headers: &HeaderMap,
    raw_query: &Option<String>,
    body: Body,
) -> ApiResult {
    let tp = headers.get("traceparent").and_then(|v| v.to_str().ok());
    let span = tracing::info_span!(
        "callback",
        promise.id = tracing::field::Empty,
        traceparent = tp
    );
    if let Some(tp) = tp {
        crate::telemetry::continue_trace(&span, tp);
    }
    callback_settle_in_span(st, completion, path_token, headers, raw_query, body)
        .instrument(span)
        .await
}

/// A notebook's callback, from what arrived (headers, the token in the
/// path, the query string, the body): the promise its token opens and the
/// value, or the 4xx to answer. Authenticates on the raw id before anything
/// else; a request that is not authenticated learns nothing else (401
/// whatever is wrong). Pure, for the fuzz target `callback`.
pub fn parse_callback(
    signer: &CallbackSigner,
    completion: Completion,
    headers: &HeaderMap,
    path_token: Option<&str>,
    raw_query: Option<&str>,
    bytes: &[u8],
) -> Result<(PromiseId, Payload), ApiError> {
    let q = query_map(&raw_query.map(str::to_owned));
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let b: CallbackBody = json_bytes(ct, bytes)?.unwrap_or_default();
    let id =
        q.get("id").cloned().or(b.id).ok_or_else(|| {
            ApiError::bad_request("missing promise id: pass ?id= or {\"id\": ...}")
        })?;
    let creds = auth::credentials(headers, path_token);
    let id = match PromiseId::parse(&id) {
        Ok(id) if auth::opens(signer, &creds, &id) => id,
        Ok(_) => return Err(ApiError::unauthorized()),
        Err(e) => {
            return Err(if creds.is_empty() {
                ApiError::unauthorized()
            } else {
                ApiError::bad_request(e.to_string())
            });
        }
    };
    let value = match completion {
        Completion::Resolve => q.get("value").map(|v| Value::String(v.clone())).or(b.value),
        _ => q
            .get("error")
            .or(q.get("value"))
            .map(|v| Value::String(v.clone()))
            .or(b.error)
            .or(b.value),
    };
    Ok((id, payload_of(value)))
}

async fn callback_settle_in_span<S: Store>(
    st: &AppState<S>,
    completion: Completion,
    path_token: Option<&str>,
    headers: &HeaderMap,
    raw_query: &Option<String>,
    body: Body,
) -> ApiResult {
    let bytes = read_body(st, headers, body).await?;
    let (id, value) = parse_callback(
        &st.signer,
        completion,
        headers,
        path_token,
        raw_query.as_deref(),
        &bytes,
    )?;
    tracing::Span::current().record("promise.id", id.as_str());
    let req = Settle {
        target: completion.target(),
        value,
        // As in the Resonate example: the promise id is the idempotency key,
        // and the action must match the state for a repeat to be deduplicated.
        ikey: Some(id.to_string()),
        strict: true,
        settled_by: SettledBy::Callback,
        // A notebook rejecting its own promise is finishing; nothing to cancel.
        cancel_run: false,
        id,
    };
    crate::failpoint!("sidecar.before_settle");
    let outcome = st.store.settle(&req).await?;
    crate::failpoint!("sidecar.after_settle");
    settle_response(outcome, &req.id, true)
}

async fn callback_heartbeat<S: Store>(
    st: &AppState<S>,
    path_token: Option<&str>,
    headers: &HeaderMap,
    raw_query: &Option<String>,
    body: Body,
) -> ApiResult {
    let q = query_map(raw_query);
    let bytes = read_body(st, headers, body).await?;
    let b: CallbackBody = json_body(headers, &bytes)?.unwrap_or_default();
    let id = q
        .get("id")
        .cloned()
        .or(b.id)
        .ok_or_else(|| ApiError::bad_request("missing promise id"))?;
    let id = parse_id(&id)?;
    if !auth::opens(&st.signer, &auth::credentials(headers, path_token), &id) {
        return Err(ApiError::unauthorized());
    }
    match st.store.heartbeat(&id).await? {
        HeartbeatOutcome::Extended(p) => Ok(promise_response(StatusCode::OK, &p, false)),
        HeartbeatOutcome::Settled(p) => Err(ApiError::already_settled(&p)),
        HeartbeatOutcome::NotFound => Err(ApiError::not_found(id.as_str())),
    }
}

#[utoipa::path(
    post,
    path = "/cb/{token}/resolve",
    tag = "callbacks",
    params(("token" = String, Path, description = "The capability token (the `url` parameter's last segment)"),
        ("id" = Option<String>, Query, description = "The promise id (or in the body)"),
        ("value" = Option<String>, Query, description = "The result (or in the body)"),
    ),
    request_body(content = Option<CallbackBody>, content_type = "application/json"),
    security(()),
    responses(SettleAnswers)
)]
async fn cb_resolve<S: Store>(
    st: St<S>,
    Path(token): Path<String>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
    body: Body,
) -> ApiResult {
    callback_settle(&st, Completion::Resolve, Some(&token), &h, &q, body).await
}
#[utoipa::path(
    post,
    path = "/cb/{token}/reject",
    tag = "callbacks",
    params(("token" = String, Path, description = "The capability token (the `url` parameter's last segment)"),
        ("id" = Option<String>, Query, description = "The promise id (or in the body)"),
        ("error" = Option<String>, Query, description = "The error (or in the body)"),
    ),
    request_body(content = Option<CallbackBody>, content_type = "application/json"),
    security(()),
    responses(SettleAnswers)
)]
async fn cb_reject<S: Store>(
    st: St<S>,
    Path(token): Path<String>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
    body: Body,
) -> ApiResult {
    callback_settle(&st, Completion::Reject, Some(&token), &h, &q, body).await
}
#[utoipa::path(
    post,
    path = "/cb/{token}/heartbeat",
    tag = "callbacks",
    params(("token" = String, Path, description = "The capability token (the `url` parameter's last segment)"),
        ("id" = Option<String>, Query, description = "The promise id (or in the body)"),
    ),
    request_body(content = Option<CallbackBody>, content_type = "application/json"),
    security(()),
    responses(
        (status = 200, description = "Heartbeat deadline extended", body = PromiseAnswer),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Already settled", body = ErrorBody),
        (status = 404, description = "No such promise", body = ErrorBody)
    )
)]
async fn cb_heartbeat<S: Store>(
    st: St<S>,
    Path(token): Path<String>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
    body: Body,
) -> ApiResult {
    callback_heartbeat(&st, Some(&token), &h, &q, body).await
}
#[utoipa::path(
    post,
    path = "/resolve",
    tag = "callbacks",
    params(
        ("id" = Option<String>, Query, description = "The promise id (or in the body)"),
        ("value" = Option<String>, Query, description = "The result (or in the body)"),
    ),
    request_body(content = Option<CallbackBody>, content_type = "application/json"),
    security(("bearer" = []), ("basic" = [])),
    responses(SettleAnswers)
)]
async fn resolve<S: Store>(
    st: St<S>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
    body: Body,
) -> ApiResult {
    callback_settle(&st, Completion::Resolve, None, &h, &q, body).await
}
#[utoipa::path(
    post,
    path = "/reject",
    tag = "callbacks",
    params(
        ("id" = Option<String>, Query, description = "The promise id (or in the body)"),
        ("error" = Option<String>, Query, description = "The error (or in the body)"),
    ),
    request_body(content = Option<CallbackBody>, content_type = "application/json"),
    security(("bearer" = []), ("basic" = [])),
    responses(SettleAnswers)
)]
async fn reject<S: Store>(st: St<S>, h: HeaderMap, RawQuery(q): RawQuery, body: Body) -> ApiResult {
    callback_settle(&st, Completion::Reject, None, &h, &q, body).await
}
#[utoipa::path(
    post,
    path = "/heartbeat",
    tag = "callbacks",
    params(
        ("id" = Option<String>, Query, description = "The promise id (or in the body)"),
    ),
    request_body(content = Option<CallbackBody>, content_type = "application/json"),
    security(("bearer" = []), ("basic" = [])),
    responses(
        (status = 200, description = "Heartbeat deadline extended", body = PromiseAnswer),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Already settled", body = ErrorBody),
        (status = 404, description = "No such promise", body = ErrorBody)
    )
)]
async fn heartbeat<S: Store>(
    st: St<S>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
    body: Body,
) -> ApiResult {
    callback_heartbeat(&st, None, &h, &q, body).await
}

// ---------- Durable Promise API ----------

/// Who may act on `/promises/{id}`: an operator, or the promise's own token.
enum Caller {
    Operator,
    Capability,
}

fn caller_for<S>(
    st: &AppState<S>,
    headers: &HeaderMap,
    path_token: Option<&str>,
    id: &PromiseId,
) -> Result<Caller, ApiError> {
    let creds = auth::credentials(headers, path_token);
    if path_token.is_none() && auth::is_operator(&st.operator_tokens, &creds) {
        return Ok(Caller::Operator);
    }
    if auth::opens(&st.signer, &creds, id) {
        return Ok(Caller::Capability);
    }
    Err(ApiError::unauthorized())
}

fn require_operator<S>(st: &AppState<S>, headers: &HeaderMap) -> Result<(), ApiError> {
    if auth::is_operator(&st.operator_tokens, &auth::credentials(headers, None)) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid operator token",
        ))
    }
}

/// `30s`, `500ms`, `2m` or a number of seconds.
fn parse_wait(s: &str) -> Result<Duration, ApiError> {
    let bad = || ApiError::bad_request(format!("wait must look like 30s, 500ms or 2m, got {s:?}"));
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    // Capped by sidecar.max_wait_seconds later; anything past a day is
    // a mistake, and refusing it keeps the arithmetic below from overflowing.
    let wait = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?),
        _ => return Err(bad()),
    };
    if wait > Duration::from_secs(86_400) {
        return Err(ApiError::bad_request(format!(
            "wait must be at most a day (and is capped by sidecar.max_wait_seconds), got {s:?}"
        )));
    }
    Ok(wait)
}

async fn read_promise<S: Store>(
    st: &AppState<S>,
    id: &PromiseId,
    wait: Option<Duration>,
) -> ApiResult {
    let deadline = tokio::time::Instant::now() + wait.unwrap_or_default().min(st.settings.max_wait);
    let mut interval = Duration::from_millis(25);
    loop {
        let p = st
            .store
            .get(id)
            .await?
            .ok_or_else(|| ApiError::not_found(id.as_str()))?;
        let now = tokio::time::Instant::now();
        if p.state.is_settled() || now >= deadline {
            return Ok((StatusCode::OK, Json(p.view())).into_response());
        }
        tokio::time::sleep(interval.min(deadline - now)).await;
        interval = (interval * 2).min(Duration::from_millis(500));
    }
}

#[utoipa::path(
    get,
    path = "/promises/{id}",
    tag = "promises",
    params(
        ("id" = String, Path, description = "The promise id (may contain /)"),
        ("wait" = Option<String>, Query, description = "Long-poll until settled, at most this long (30s, 500ms, 2m; capped by sidecar.max_wait_seconds)"),
    ),
    security(("bearer" = []), ("basic" = [])),
    responses(
        (status = 200, description = "The promise", body = PromiseView),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such promise", body = ErrorBody)
    )
)]
async fn get_promise<S: Store>(
    st: St<S>,
    Path(id): Path<String>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let id = parse_id(&id)?;
    caller_for(&st, &h, None, &id)?;
    let wait = query_map(&q)
        .get("wait")
        .map(|w| parse_wait(w))
        .transpose()?;
    read_promise(&st, &id, wait).await
}

#[utoipa::path(
    get,
    path = "/cb/{token}/promises/{id}",
    tag = "promises",
    params(("token" = String, Path, description = "The capability token (the `url` parameter's last segment)"),
        ("id" = String, Path, description = "The promise id (may contain /)"),
        ("wait" = Option<String>, Query, description = "Long-poll until settled, at most this long (30s, 500ms, 2m; capped by sidecar.max_wait_seconds)"),
    ),
    security(()),
    responses(
        (status = 200, description = "The promise", body = PromiseView),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such promise", body = ErrorBody)
    )
)]
async fn cb_get<S: Store>(
    st: St<S>,
    Path((token, id)): Path<(String, String)>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let id = parse_id(&id)?;
    caller_for(&st, &h, Some(&token), &id)?;
    let wait = query_map(&q)
        .get("wait")
        .map(|w| parse_wait(w))
        .transpose()?;
    read_promise(&st, &id, wait).await
}

/// Complete a promise (Durable Promise specification).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    /// RESOLVED, REJECTED or REJECTED_CANCELED (case-insensitive).
    #[schema(example = "RESOLVED")]
    state: String,
    #[serde(default)]
    value: Option<Payload>,
}

async fn complete<S: Store>(
    st: &AppState<S>,
    id: String,
    path_token: Option<&str>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let bytes = read_body(st, &headers, body).await?;
    let id = parse_id(&id)?;
    let caller = caller_for(st, &headers, path_token, &id)?;
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (target, value) = parse_patch(ct, &bytes)?;
    let strict = header_flag(&headers, "strict")?;
    let req = Settle {
        id,
        target,
        value,
        ikey: ikey(&headers),
        strict,
        settled_by: match caller {
            Caller::Operator => SettledBy::Operator,
            Caller::Capability => SettledBy::Callback,
        },
        cancel_run: target == State::RejectedCanceled,
    };
    let outcome = st.store.settle(&req).await?;
    settle_response(outcome, &req.id, strict)
}

/// A `PATCH` body (`{"state": ..., "value": ...}`) with its content type:
/// the target state and value, or the 4xx to answer. Pure, so the fuzz
/// target `patch_body` can call it.
pub fn parse_patch(content_type: &str, bytes: &[u8]) -> Result<(State, Payload), ApiError> {
    let b: PatchBody = json_bytes(content_type, bytes)?
        .ok_or_else(|| ApiError::bad_request("missing body: {\"state\": ..., \"value\": ...}"))?;
    let target: State = b
        .state
        .parse()
        .map_err(|e: crate::domain::promise::UnknownState| ApiError::bad_request(e.to_string()))?;
    if Completion::from_target(target).is_none() {
        return Err(ApiError::bad_request(
            "state must be RESOLVED, REJECTED or REJECTED_CANCELED",
        ));
    }
    Ok((target, b.value.unwrap_or_default()))
}

/// A Databricks job notification's event type and run (its parent run for
/// a task run), or the 400 to answer. Pure, for the fuzz target
/// `notification`.
pub fn parse_notification(bytes: &[u8]) -> Result<(String, RunId), ApiError> {
    let n: Notification = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("not a job notification: {e}")))?;
    let run = n.run.parent_run_id.unwrap_or(n.run.run_id);
    let run = RunId::new(run).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok((n.event_type, run))
}

#[utoipa::path(
    patch,
    path = "/promises/{id}",
    tag = "promises",
    params(
        ("id" = String, Path, description = "The promise id (may contain /)"),
        ("idempotency-key" = Option<String>, Header, description = "Repeats with the same key are deduplicated"),
        ("strict" = Option<bool>, Header, description = "Refuse to complete a timed-out promise, and deduplicate only a matching state"),
    ),
    request_body(content = PatchBody, content_type = "application/json"),
    security(("bearer" = []), ("basic" = [])),
    responses(SettleAnswers)
)]
async fn patch<S: Store>(st: St<S>, Path(id): Path<String>, h: HeaderMap, body: Body) -> ApiResult {
    complete(&st, id, None, h, body).await
}

#[utoipa::path(
    patch,
    path = "/cb/{token}/promises/{id}",
    tag = "promises",
    params(("token" = String, Path, description = "The capability token (the `url` parameter's last segment)"),
        ("id" = String, Path, description = "The promise id (may contain /)"),
        ("idempotency-key" = Option<String>, Header, description = "Repeats with the same key are deduplicated"),
        ("strict" = Option<bool>, Header, description = "Refuse to complete a timed-out promise, and deduplicate only a matching state"),
    ),
    request_body(content = PatchBody, content_type = "application/json"),
    security(()),
    responses(SettleAnswers)
)]
async fn cb_patch<S: Store>(
    st: St<S>,
    Path((token, id)): Path<(String, String)>,
    h: HeaderMap,
    body: Body,
) -> ApiResult {
    complete(&st, id, Some(&token), h, body).await
}

/// Create a bare promise (Durable Promise specification).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    id: String,
    #[serde(default)]
    param: Option<Payload>,
    /// Milliseconds since the epoch.
    #[serde(default)]
    timeout: Option<i64>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

#[utoipa::path(
    post,
    path = "/promises",
    tag = "promises",
    params(
        ("idempotency-key" = Option<String>, Header, description = "A repeat with the same key answers 200 with the existing promise"),
        ("strict" = Option<bool>, Header, description = "With strict, a repeat of a settled promise is a conflict"),
    ),
    request_body(content = CreateBody, content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created", body = PromiseAnswer),
        (status = 200, description = "A repeat with the same idempotency key", body = PromiseAnswer),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 409, description = "Exists already (another key)", body = ErrorBody)
    )
)]
async fn create<S: Store>(st: St<S>, h: HeaderMap, body: Body) -> ApiResult {
    let bytes = read_body(&st, &h, body).await?;
    require_operator(&st, &h)?;
    let b: CreateBody =
        json_body(&h, &bytes)?.ok_or_else(|| ApiError::bad_request("missing body"))?;
    let id = parse_id(&b.id)?;
    let strict = header_flag(&h, "strict")?;
    let key = ikey(&h);
    let new = NewPromise {
        id,
        param: b.param.unwrap_or_default(),
        timeout: match b.timeout {
            Some(ms) if ms > 0 => {
                let latest = chrono::Utc::now()
                    .timestamp_millis()
                    .saturating_add(st.settings.max_timeout.as_millis() as i64);
                if ms > latest {
                    return Err(ApiError::bad_request(format!(
                        "timeout {ms} is beyond the longest allowed, {} s from now (worker.max_timeout_seconds); it is an epoch time in milliseconds",
                        st.settings.max_timeout.as_secs()
                    )));
                }
                Timeout::At(ms)
            }
            Some(_) => {
                return Err(ApiError::bad_request(
                    "timeout must be a positive epoch time in milliseconds",
                ));
            }
            None => Timeout::After(st.settings.default_timeout),
        },
        tags: b.tags,
        ikey_create: key.clone(),
        job_id: None,
        workspace: st.settings.default_workspace.clone(),
        reply_to: None,
        correlation_id: None,
        traceparent: None,
        heartbeat: None,
        cancel_on_timeout: false,
    };
    match st.store.create(&new).await? {
        CreateOutcome::Created(p) => Ok(promise_response(StatusCode::CREATED, &p, false)),
        CreateOutcome::Existing(p) => {
            let same_key = key.is_some() && p.ikey_create == key;
            if same_key && (!p.state.is_settled() || !strict) {
                Ok(promise_response(StatusCode::OK, &p, true))
            } else {
                Err(ApiError {
                    status: StatusCode::CONFLICT,
                    code: "already_exists",
                    message: format!("promise {} already exists ({})", p.id, p.state),
                    promise: Some(Box::new(p.view())),
                })
            }
        }
    }
}

#[utoipa::path(
    get,
    path = "/promises",
    tag = "promises",
    params(
        ("id" = Option<String>, Query, description = "Id or pattern with * wildcards (default *)"),
        ("state" = Option<String>, Query, description = "A state, case-insensitive; `rejected` matches every REJECTED_* state"),
        ("tags" = Option<std::collections::HashMap<String, String>>, Query, style = DeepObject, explode, description = "tags[k]=v, all must match"),
        ("limit" = Option<usize>, Query, description = "1-1000 (default 100)"),
        ("cursor" = Option<String>, Query, description = "From the previous page"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of promises", body = SearchPage),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    )
)]
async fn search<S: Store>(st: St<S>, h: HeaderMap, RawQuery(q): RawQuery) -> ApiResult {
    require_operator(&st, &h)?;
    let mut query = SearchQuery {
        id: "*".into(),
        limit: 100,
        ..Default::default()
    };
    for (k, v) in url::form_urlencoded::parse(q.as_deref().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "id" => {
                if !valid_id_filter(&v) {
                    return Err(ApiError::bad_request(
                        "id may use [A-Za-z0-9._:/-] and * wildcards",
                    ));
                }
                query.id = v.into_owned();
            }
            "state" => {
                let states = if v.eq_ignore_ascii_case("rejected") {
                    vec![
                        State::Rejected,
                        State::RejectedCanceled,
                        State::RejectedTimedout,
                    ]
                } else {
                    vec![
                        v.parse::<State>()
                            .map_err(|e| ApiError::bad_request(e.to_string()))?,
                    ]
                };
                query.states = Some(states);
            }
            "limit" => {
                query.limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| ApiError::bad_request("limit must be 1-1000"))?;
            }
            "cursor" => query.cursor = Some(v.into_owned()),
            other => {
                if let Some(tag) = other
                    .strip_prefix("tags[")
                    .and_then(|t| t.strip_suffix(']'))
                {
                    query.tags.insert(tag.to_owned(), v.into_owned());
                } else {
                    return Err(ApiError::bad_request(format!(
                        "unknown search parameter {other:?}"
                    )));
                }
            }
        }
    }
    let page = st.store.search(&query).await?;
    let body = SearchPage {
        promises: page.promises.iter().map(Promise::view).collect(),
        cursor: page.cursor,
    };
    Ok(Json(body).into_response())
}

/// Cancel every pending promise that matches all of the given filters.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    /// A promise id or a pattern with * wildcards.
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    #[serde(default)]
    job_id: Option<u64>,
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /promises/cancel`: cancel every pending promise matching tags, a job
/// id or an id wildcard (Databricks Connect's `interruptTag`, the Jobs API's
/// `cancel_all`). Answers how many matched.
#[utoipa::path(
    post,
    path = "/promises/cancel",
    tag = "promises",
    request_body(content = CancelBody, content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "How many matched and were cancelled (their runs too)", body = CancelReport),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    )
)]
async fn bulk_cancel<S: Store>(st: St<S>, h: HeaderMap, body: Body) -> ApiResult {
    let bytes = read_body(&st, &h, body).await?;
    require_operator(&st, &h)?;
    let b: CancelBody = json_body(&h, &bytes)?
        .ok_or_else(|| ApiError::bad_request("missing body: {\"tags\"|\"job_id\"|\"id\": ...}"))?;
    if b.id.as_deref().is_some_and(|id| !valid_id_filter(id)) {
        return Err(ApiError::bad_request(
            "id may use [A-Za-z0-9._:/-] and * wildcards",
        ));
    }
    let filter = CancelFilter {
        id: b.id,
        tags: b.tags,
        job_id: b.job_id,
    };
    if filter.is_empty() {
        return Err(ApiError::bad_request(
            "give at least one of id, tags, job_id",
        ));
    }
    let reason = b.reason.unwrap_or_else(|| "canceled by an operator".into());
    let report = cancel_matching(&st.store, &filter, &reason, SettledBy::Operator).await?;
    Ok(Json(report).into_response())
}

async fn get_cancel_promise<S: Store>(st: St<S>, h: HeaderMap, RawQuery(q): RawQuery) -> ApiResult {
    get_promise(st, Path("cancel".into()), h, RawQuery(q)).await
}

#[derive(Deserialize, ToSchema)]
struct NotificationRun {
    /// A number, or a string of digits (some destinations send ids as
    /// strings, to keep 64-bit ids exact in JSON).
    #[serde(deserialize_with = "id_number")]
    #[schema(value_type = u64)]
    run_id: u64,
    #[serde(default, deserialize_with = "opt_id_number")]
    #[schema(value_type = Option<u64>)]
    parent_run_id: Option<u64>,
}

/// An id sent as a JSON number or as a string of digits.
fn id_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| serde::de::Error::custom("run id must be a positive integer")),
        serde_json::Value::String(s) => s
            .parse()
            .map_err(|_| serde::de::Error::custom("run id must be a string of digits")),
        _ => Err(serde::de::Error::custom(
            "run id must be a number or a string",
        )),
    }
}

fn opt_id_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(None),
        v => id_number(v).map(Some).map_err(serde::de::Error::custom),
    }
}

/// A Databricks job notification (webhook destination) payload; other
/// fields are ignored.
#[derive(Deserialize, ToSchema)]
struct Notification {
    #[serde(default)]
    event_type: String,
    run: NotificationRun,
}

/// `POST /databricks/notifications`: a Databricks job webhook destination.
/// Never settles anything by itself (the payload has no result); it makes the
/// run's promise due for a `runs/get` check on the next reconciler tick.
#[utoipa::path(
    post,
    path = "/databricks/notifications",
    tag = "databricks",
    request_body(content = Notification, content_type = "application/json"),
    security(("basic" = [])),
    responses(
        (status = 200, description = "The run's promise (if any) is checked on the next reconciler tick", body = NotificationAnswer),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    )
)]
async fn notification<S: Store>(st: St<S>, h: HeaderMap, body: Body) -> ApiResult {
    let bytes = read_body(&st, &h, body).await?;
    let Some((user, pass)) = &st.notification_auth else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "notifications are not configured (auth.notification_password)",
        ));
    };
    if !auth::basic_matches(&h, user, pass) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "bad or missing basic auth",
        ));
    }
    let (event_type, run) = parse_notification(&bytes)?;
    let promise = st.store.poll_run_now(run).await?;
    tracing::debug!(event_type = %event_type, run_id = run.get(), found = promise.is_some(), "job notification");
    let body = NotificationAnswer {
        scheduled: promise.is_some(),
        promise_id: promise.map(|p| p.to_string()),
    };
    Ok(Json(body).into_response())
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "Redis and the broker are reachable", body = Readiness),
        (status = 503, description = "One of them is not", body = Readiness)
    )
)]
async fn readyz<S: Store>(st: St<S>) -> Response {
    let redis = st.store.ping().await.is_ok();
    let broker = st.broker_ready.load(Ordering::Relaxed);
    let status = if redis && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "unreachable" };
    let body = Readiness {
        status: if redis && broker {
            "ready"
        } else {
            "not_ready"
        },
        redis: word(redis),
        broker: word(broker),
    };
    (status, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_durations() {
        assert_eq!(parse_wait("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_wait("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_wait("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_wait("7").unwrap(), Duration::from_secs(7));
        assert!(parse_wait("soon").is_err());
        assert!(parse_wait("5h").is_err());
        // Would overflow a multiplication by 60.
        assert!(parse_wait("307445734561825861m").is_err());
        assert!(parse_wait("18446744073709551615s").is_err());
        assert!(parse_wait("1441m").is_err());
        assert_eq!(parse_wait("1440m").unwrap(), Duration::from_secs(86_400));
    }

    #[test]
    fn notification_ids_as_numbers_or_strings() {
        for body in [
            r#"{"event_type":"jobs.on_success","run":{"run_id":123}}"#,
            r#"{"event_type":"jobs.on_success","run":{"run_id":"123"}}"#,
            r#"{"event_type":"jobs.on_success","run":{"run_id":"9","parent_run_id":"123"}}"#,
            r#"{"event_type":"jobs.on_success","run":{"run_id":9,"parent_run_id":123}}"#,
        ] {
            let (_, run) = parse_notification(body.as_bytes()).unwrap();
            assert_eq!(run.get(), 123, "{body}");
        }
        assert!(parse_notification(br#"{"run":{"run_id":"12x"}}"#).is_err());
        assert!(parse_notification(br#"{"run":{"run_id":-1}}"#).is_err());
    }
}

/// Hostile requests: the request parsers answer anything, in CI
/// (`make fuzz` runs more cases, and the cargo-fuzz targets).
#[cfg(test)]
mod hostile {
    use super::*;
    use proptest::prelude::*;

    fn signer() -> CallbackSigner {
        CallbackSigner::new(vec![
            "hostile-test-secret-0123456789abcdef".to_string().into(),
        ])
        .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: crate::domain::hostile_cases(), failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn patch_and_notification_bodies_get_an_answer(body in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_patch("application/json", &body);
            let _ = parse_notification(&body);
        }

        #[test]
        fn callbacks_open_nothing_without_their_token(
            query in prop::option::of("[a-z=&%0-9._/-]{0,80}"),
            body in prop::collection::vec(any::<u8>(), 0..256),
            token in prop::option::of("v1\\\\.[A-Za-z0-9_-]{0,50}"),
            json in any::<bool>(),
        ) {
            let mut h = HeaderMap::new();
            if json {
                h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
            }
            // Whatever arrives, no promise opens: the token is not a MAC.
            let r = parse_callback(&signer(), Completion::Resolve, &h, token.as_deref(), query.as_deref(), &body);
            prop_assert!(r.is_err());
        }

        #[test]
        fn a_valid_token_opens_only_its_promise(
            other in prop_oneof![Just("owned-1".to_string()), "[a-z0-9-]{1,20}"],
            value in "\\\\PC{0,40}",
        ) {
            let s = signer();
            let id = PromiseId::parse("owned-1").unwrap();
            let token = s.sign(&id);
            let q = format!("id={other}&value={}", url::form_urlencoded::byte_serialize(value.as_bytes()).collect::<String>());
            let r = parse_callback(&s, Completion::Resolve, &HeaderMap::new(), Some(token.expose()), Some(&q), b"");
            if other == "owned-1" {
                prop_assert!(r.is_ok());
            } else {
                prop_assert!(r.is_err());
            }
        }
    }
}
