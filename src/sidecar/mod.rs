//! The HTTP sidecar (docs/contracts.md, the HTTP API): notebook callbacks, the Durable Promise
//! API, health. The only module that imports axum (besides the emulator, a
//! stand-in for Databricks that is not part of the bridge).
//!
//! Request handling order is fixed so that bad input changes nothing: the
//! body is read raw with a size limit (413), its content type checked (415),
//! the caller authenticated (401) before anything is written, then parsed
//! (400) into domain types, then one store call does the transition.

mod auth;
mod callbacks;
mod connections;
mod error;
mod health;
mod notifications;
pub mod openapi;
pub mod progress;
mod promises;
mod resonate;
mod serve;
pub mod ui;

use callbacks::*;
use health::*;
use notifications::*;
use promises::*;

// The request parsers, pure, for the fuzz targets.
pub use callbacks::parse_callback;
pub use notifications::parse_notification;
pub use promises::parse_patch;

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

use crate::domain::promise::{PromiseView, null_as_default};
use crate::domain::tags::check_tags;
use crate::domain::{
    CallbackSigner, Completion, IdPattern, Incarnation, Payload, Promise, PromiseId, RunId,
    SettledBy, State,
};
use crate::reconciler::{CancelFilter, CancelReport, cancel_matching};
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
    /// Every configured workspace (the console's audit page).
    pub workspaces: Vec<String>,
    /// The console's cookie gets `Secure` (the sidecar serves HTTPS).
    pub secure_cookies: bool,
    /// A console session ends after this long unused...
    pub session_idle: Duration,
    /// ...and after this long in all.
    pub session_max: Duration,
    /// At most one progress event per promise per this long.
    pub progress_interval: Duration,
    /// Progress updates kept per promise.
    pub progress_history: u32,
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
    /// Failed console logins, per client address and in all.
    pub login_throttle: ui::throttle::LoginThrottle,
    /// Where the console reads and republishes dead letters, on a
    /// connection it keeps (`None`: it says the broker is not configured).
    pub dead_letters: Option<crate::broker::DeadLetterQueue>,
    /// Reads a run an operator adopts (`None`: this sidecar has no
    /// Databricks credentials, and adoption is refused with that reason).
    pub runs: Option<Arc<dyn crate::databricks::RunReader>>,
    /// The first check of an adopted run, this long after adoption.
    pub first_poll: Duration,
}

type St<S> = AxState<Arc<AppState<S>>>;
type ApiResult = Result<Response, ApiError>;

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routes {
    /// Everything, on one listener (no `sidecar.operator_listen`).
    All,
    /// What a notebook and Databricks need, and the health checks: the
    /// listener the workspace reaches.
    Notebook,
    /// The promise API, the console, metrics and the OpenAPI document, and
    /// the health checks: an internal listener.
    Operator,
}

/// Every route, on one listener.
pub fn router<S: Store>(state: Arc<AppState<S>>) -> Router {
    routes(state, Routes::All)
}

pub fn routes<S: Store>(state: Arc<AppState<S>>, which: Routes) -> Router {
    let mut r = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<S>));
    if which != Routes::Operator {
        r = r.merge(notebook_routes::<S>());
    }
    if which != Routes::Notebook {
        r = r.merge(operator_routes::<S>());
    }
    r.fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such route") })
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

/// What a running notebook calls (with its capability token) and what
/// Databricks' notification destination posts.
fn notebook_routes<S: Store>() -> Router<Arc<AppState<S>>> {
    Router::new()
        // The capability routes: the same handlers as their token-less
        // forms below, with the token in the path.
        .route("/cb/{token}/resolve", post(resolve::<S>))
        .route("/cb/{token}/reject", post(reject::<S>))
        .route("/cb/{token}/heartbeat", post(heartbeat::<S>))
        .route("/cb/{token}/progress", post(progress::progress::<S>))
        .route(
            "/cb/{token}/promises/{*id}",
            get(get_promise::<S>).patch(patch::<S>),
        )
        .route("/resolve", post(resolve::<S>))
        .route("/reject", post(reject::<S>))
        .route("/heartbeat", post(heartbeat::<S>))
        .route("/progress", post(progress::progress::<S>))
        .route("/databricks/notifications", post(notification::<S>))
}

/// What operators and their tools use (with an operator token or a console
/// session), and monitoring.
fn operator_routes<S: Store>() -> Router<Arc<AppState<S>>> {
    Router::new()
        .route("/openapi.json", get(openapi_json))
        .route("/metrics", get(metrics))
        .route("/promises/retry", post(progress::retry_now::<S>))
        .route("/promises", get(search::<S>).post(create::<S>))
        // A static route wins over the wildcard below, so GET of a promise
        // whose id is "cancel" is served here too.
        .route(
            "/promises/cancel",
            post(bulk_cancel::<S>).get(get_cancel_promise::<S>),
        )
        // Likewise the promise whose id is "adopt".
        .route(
            "/promises/adopt",
            post(adopt::<S>).get(get_adopt_promise::<S>),
        )
        // Resonate's protocol: its SDKs post every envelope to the base URL.
        .route("/", post(resonate::envelope::<S>))
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
        .route("/ui/audit", get(ui::audit::<S>))
        .route("/ui/adopt", post(ui::adopt_action::<S>))
        .route("/ui/dead-letters/republish", post(ui::republish::<S>))
        .route("/ui/dead-letters/body", get(ui::dead_letter_body::<S>))
        .route("/promises/{*id}", get(get_promise::<S>).patch(patch::<S>))
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
    Ok(PromiseId::parse(s)?)
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
        SettleOutcome::NotOpened => Err(ApiError::unauthorized()),
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
            let token = s.sign(&id, 1);
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
