//! Databricks job notification destinations: a notification brings the
//! run's check forward.

use super::*;

#[derive(Deserialize, ToSchema)]
pub(super) struct NotificationRun {
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
pub(super) fn id_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
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

pub(super) fn opt_id_number<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<u64>, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(None),
        v => id_number(v).map(Some).map_err(serde::de::Error::custom),
    }
}

/// A Databricks job notification (webhook destination) payload; other
/// fields are ignored.
#[derive(Deserialize, ToSchema)]
pub(super) struct Notification {
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
pub(super) async fn notification<S: Store>(st: St<S>, h: HeaderMap, body: Body) -> ApiResult {
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
