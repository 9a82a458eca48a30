//! What a notebook calls: resolve, reject and heartbeat, with the
//! capability token in the path (`/cb/{token}/...`, the notebook's `url`)
//! or in a credential header; both forms share one handler per operation,
//! the token arriving as `Option<Path>`.

use super::*;
use crate::domain::retry::NOTEBOOK_REJECTED;

/// A notebook's callback as JSON (the same fields as the query string).
#[derive(Deserialize, Default, ToSchema)]
pub(super) struct CallbackBody {
    /// The promise id (or `?id=`).
    id: Option<String>,
    /// The result (`/resolve`): any JSON; a string is kept as sent.
    value: Option<Value>,
    /// The error (`/reject`): any JSON.
    error: Option<Value>,
    /// `/reject` only: `true` when no retry may follow (or `?final=true`).
    /// Without it, a promise whose retry policy names NOTEBOOK_REJECTED
    /// gets another attempt.
    #[serde(rename = "final")]
    is_final: Option<bool>,
}

/// Does a `/reject` say it is final (`?final=true` or `{"final": true}`)?
fn says_final(raw_query: &Option<String>, headers: &HeaderMap, bytes: &Bytes) -> bool {
    if let Some(f) = query_map(raw_query).get("final") {
        return matches!(f.as_str(), "true" | "1" | "yes");
    }
    json_body::<CallbackBody>(headers, bytes)
        .ok()
        .flatten()
        .and_then(|b| b.is_final)
        .unwrap_or(false)
}

/// Resolve or reject from a notebook: `?id=..&value=..` (or `error=`) or a JSON body.
/// The callback's span carries the promise id and, when the notebook sends
/// one back, its W3C `traceparent`, which is also the span's parent (the
/// trigger's trace continues here).
pub(super) async fn callback_settle<S: Store>(
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
/// whatever is wrong). Also answers which incarnation of the id the token
/// opens, for the store to hold against the record. Pure, for the fuzz
/// target `callback`.
pub fn parse_callback(
    signer: &CallbackSigner,
    completion: Completion,
    headers: &HeaderMap,
    path_token: Option<&str>,
    raw_query: Option<&str>,
    bytes: &[u8],
) -> Result<(PromiseId, Incarnation, Payload), ApiError> {
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
    let (id, bound) = match PromiseId::parse(&id) {
        Ok(id) => {
            let bound = auth::opens(signer, &creds, &id).ok_or_else(ApiError::unauthorized)?;
            (id, bound)
        }
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
    Ok((id, bound, payload_of(value)))
}

pub(super) async fn callback_settle_in_span<S: Store>(
    st: &AppState<S>,
    completion: Completion,
    path_token: Option<&str>,
    headers: &HeaderMap,
    raw_query: &Option<String>,
    body: Body,
) -> ApiResult {
    let bytes = read_body(st, headers, body).await?;
    let (id, bound, value) = parse_callback(
        &st.signer,
        completion,
        headers,
        path_token,
        raw_query.as_deref(),
        &bytes,
    )?;
    tracing::Span::current().record("promise.id", id.as_str());
    if completion == Completion::Reject
        && !says_final(raw_query, headers, &bytes)
        && let Some(p) = st.store.get(&id).await?
        && p.opened_by(bound)
        && !p.state.is_settled()
        && p.retry.policy.is_some()
    {
        let failure =
            serde_json::json!({"reason": "notebook_rejected", "error": value.data_as_json()});
        if crate::retry::fail_or_retry(&st.store, &p, &[NOTEBOOK_REJECTED], &failure).await? {
            // The promise stays pending: its next attempt is scheduled.
            return match st.store.get(&id).await? {
                Some(p) => Ok(promise_response(StatusCode::ACCEPTED, &p, false)),
                None => Err(ApiError::not_found(id.as_str())),
            };
        }
    }
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
        capability: Some(bound),
        id,
    };
    crate::failpoint!("sidecar.before_settle");
    let outcome = st.store.settle(&req).await?;
    crate::failpoint!("sidecar.after_settle");
    settle_response(outcome, &req.id, true)
}

pub(super) async fn callback_heartbeat<S: Store>(
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
    let bound = auth::opens(&st.signer, &auth::credentials(headers, path_token), &id)
        .ok_or_else(ApiError::unauthorized)?;
    match st.store.heartbeat(&id, Some(bound)).await? {
        HeartbeatOutcome::Extended(p) => Ok(promise_response(StatusCode::OK, &p, false)),
        HeartbeatOutcome::Settled(p) => Err(ApiError::already_settled(&p)),
        HeartbeatOutcome::NotFound => Err(ApiError::not_found(id.as_str())),
        HeartbeatOutcome::NotOpened => Err(ApiError::unauthorized()),
    }
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
pub(super) async fn resolve<S: Store>(
    st: St<S>,
    token: Option<Path<String>>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
    body: Body,
) -> ApiResult {
    let token = token.map(|Path(t)| t);
    callback_settle(&st, Completion::Resolve, token.as_deref(), &h, &q, body).await
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
pub(super) async fn reject<S: Store>(
    st: St<S>,
    token: Option<Path<String>>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
    body: Body,
) -> ApiResult {
    let token = token.map(|Path(t)| t);
    callback_settle(&st, Completion::Reject, token.as_deref(), &h, &q, body).await
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
pub(super) async fn heartbeat<S: Store>(
    st: St<S>,
    token: Option<Path<String>>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
    body: Body,
) -> ApiResult {
    let token = token.map(|Path(t)| t);
    callback_heartbeat(&st, token.as_deref(), &h, &q, body).await
}
