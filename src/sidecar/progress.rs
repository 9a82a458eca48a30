//! What a running notebook reports between start and end, and what an
//! operator asks of a promise waiting to retry:
//! - `POST {url}/progress?id=..` (token in the path, or the token-less form
//!   with a credential header): a progress update (docs/contracts.md,
//!   progress). It counts as a heartbeat, is stored on the promise, and
//!   becomes a `promise.progress` event, at most one per interval;
//! - `POST /promises/retry` (operators): the next attempt of a promise
//!   waiting for one, now.

use super::*;
use crate::domain::progress::ProgressUpdate;
use crate::store::{AttemptOutcome, ProgressOutcome, StoreError};

#[utoipa::path(
    post,
    path = "/progress",
    tag = "callbacks",
    params(("id" = String, Query, description = "The promise id")),
    request_body(content = Option<crate::domain::progress::ProgressMessage>, content_type = "application/json"),
    security(("bearer" = []), ("basic" = [])),
    responses(
        (status = 202, description = "Recorded (a heartbeat too); published as a promise.progress event within the interval", body = ProgressAnswer),
        (status = 400, description = "Malformed update", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Already settled", body = ErrorBody),
        (status = 404, description = "No such promise", body = ErrorBody)
    )
)]
pub(super) async fn progress<S: Store>(
    st: St<S>,
    token: Option<Path<String>>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
    body: Body,
) -> ApiResult {
    let token = token.map(|Path(t)| t);
    let bytes = read_body(&st, &h, body).await?;
    let id = query_map(&q)
        .get("id")
        .cloned()
        .ok_or_else(|| ApiError::bad_request("missing promise id: pass ?id="))?;
    // Authenticated before anything about the body is said.
    let creds = auth::credentials(&h, token.as_deref());
    let (id, bound) = PromiseId::parse(&id)
        .ok()
        .and_then(|id| auth::opens(&st.signer, &creds, &id).map(|bound| (id, bound)))
        .ok_or_else(ApiError::unauthorized)?;
    let update = ProgressUpdate::parse(&bytes).map_err(ApiError::bad_request)?;
    let outcome = st
        .store
        .progress(
            &id,
            Some(bound),
            update.members(),
            st.settings.progress_interval,
            st.settings.progress_history,
        )
        .await?;
    match outcome {
        ProgressOutcome::Recorded(seq) => {
            metrics::counter!("runbridge_progress_updates_total").increment(1);
            let answer = ProgressAnswer {
                id: id.to_string(),
                seq,
            };
            Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
        }
        ProgressOutcome::Settled(state) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "already_settled",
            format!("promise {id} is already {state}"),
        )),
        ProgressOutcome::NotFound => Err(ApiError::not_found(id.as_str())),
        ProgressOutcome::NotOpened => Err(ApiError::unauthorized()),
    }
}

/// A recorded progress update.
#[derive(Serialize, ToSchema)]
pub(super) struct ProgressAnswer {
    /// The promise.
    id: String,
    /// The update's number, from 1 (the event id's last segment).
    seq: u64,
}

/// `POST /promises/retry`'s body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RetryBody {
    /// The promise waiting for its next attempt.
    id: String,
}

#[utoipa::path(
    post,
    path = "/promises/retry",
    tag = "promises",
    request_body(content = RetryBody, content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "The next attempt starts now (within a tick)", body = PromiseAnswer),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such promise", body = ErrorBody),
        (status = 409, description = "Not waiting for a retry (running, settled, or without a policy)", body = ErrorBody)
    )
)]
pub(super) async fn retry_now<S: Store>(st: St<S>, h: HeaderMap, body: Body) -> ApiResult {
    let bytes = read_body(&st, &h, body).await?;
    super::promises::require_operator(&st, &h)?;
    let b: RetryBody = json_body(&h, &bytes)?
        .ok_or_else(|| ApiError::bad_request("missing body: {\"id\": ...}"))?;
    let id = parse_id(&b.id)?;
    match retry_promise(&st.store, &id).await? {
        RetryNow::Scheduled(p) => Ok(promise_response(StatusCode::ACCEPTED, &p, false)),
        RetryNow::NotFound => Err(ApiError::not_found(id.as_str())),
        RetryNow::NotWaiting(why) => Err(ApiError::new(StatusCode::CONFLICT, "not_waiting", why)),
    }
}

/// What an operator's retry did.
pub enum RetryNow {
    Scheduled(Box<Promise>),
    NotFound,
    /// Why not.
    NotWaiting(String),
}

/// Makes a waiting promise's next attempt due now (the API, the CLI and
/// the console call this).
pub async fn retry_promise<S: Store>(store: &S, id: &PromiseId) -> Result<RetryNow, StoreError> {
    Ok(match store.retry_now(id).await? {
        AttemptOutcome::Done => match store.get(id).await? {
            Some(p) => {
                tracing::info!(promise.id = %id, "operator asked for the next attempt now");
                RetryNow::Scheduled(Box::new(p))
            }
            None => RetryNow::NotFound,
        },
        AttemptOutcome::NotFound => RetryNow::NotFound,
        AttemptOutcome::Settled(state) => {
            RetryNow::NotWaiting(format!("promise {id} is already {state}"))
        }
        AttemptOutcome::Stale => RetryNow::NotWaiting(format!(
            "promise {id} is not waiting for a retry: its run has not failed, or it has no retry policy"
        )),
    })
}
