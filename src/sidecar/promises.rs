//! The Durable Promise API: read (with long-poll), complete, create,
//! search and bulk cancel.

use super::*;

/// Who may act on `/promises/{id}`: an operator, or the promise's own token
/// (and what it opens of the id, held against the record where it is read).
#[derive(Debug, Clone, Copy)]
pub(super) enum Caller {
    Operator,
    Capability(Incarnation),
}

impl Caller {
    /// What the store checks the record against (`None`: an operator).
    pub(super) fn capability(self) -> Option<Incarnation> {
        match self {
            Caller::Operator => None,
            Caller::Capability(c) => Some(c),
        }
    }

    pub(super) fn settled_by(self) -> SettledBy {
        match self {
            Caller::Operator => SettledBy::Operator,
            Caller::Capability(_) => SettledBy::Callback,
        }
    }

    /// May this caller see that promise? A token of an earlier incarnation
    /// of the id may not (answered as if it opened nothing).
    pub(super) fn sees(self, p: &Promise) -> Result<(), ApiError> {
        match self {
            Caller::Capability(c) if !p.opened_by(c) => Err(ApiError::unauthorized()),
            _ => Ok(()),
        }
    }
}

pub(super) fn caller_for<S>(
    st: &AppState<S>,
    headers: &HeaderMap,
    path_token: Option<&str>,
    id: &PromiseId,
) -> Result<Caller, ApiError> {
    // A token in the path is a capability, never an operator's.
    caller_among(
        st,
        &auth::credentials(headers, path_token),
        path_token.is_none(),
        id,
    )
}

/// [`caller_for`] on credentials already gathered (Resonate's protocol
/// adds the envelope's `head.auth`).
pub(super) fn caller_among<S>(
    st: &AppState<S>,
    creds: &[String],
    operator_allowed: bool,
    id: &PromiseId,
) -> Result<Caller, ApiError> {
    if operator_allowed && auth::is_operator(&st.operator_tokens, creds) {
        return Ok(Caller::Operator);
    }
    auth::opens(&st.signer, creds, id)
        .map(Caller::Capability)
        .ok_or_else(ApiError::unauthorized)
}

pub(super) fn require_operator<S>(st: &AppState<S>, headers: &HeaderMap) -> Result<(), ApiError> {
    require_operator_among(st, &auth::credentials(headers, None))
}

/// [`require_operator`] on credentials already gathered.
pub(super) fn require_operator_among<S>(
    st: &AppState<S>,
    creds: &[String],
) -> Result<(), ApiError> {
    if auth::is_operator(&st.operator_tokens, creds) {
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
pub(super) fn parse_wait(s: &str) -> Result<Duration, ApiError> {
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

pub(super) async fn read_promise<S: Store>(
    st: &AppState<S>,
    caller: Caller,
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
        caller.sees(&p)?;
        let now = tokio::time::Instant::now();
        if p.state.is_settled() || now >= deadline {
            return Ok((StatusCode::OK, Json(view_with_children(st, &p).await?)).into_response());
        }
        tokio::time::sleep(interval.min(deadline - now)).await;
        interval = (interval * 2).min(Duration::from_millis(500));
    }
}

/// A promise's view; a parent's lists its children.
pub(super) async fn view_with_children<S: Store>(
    st: &AppState<S>,
    p: &Promise,
) -> Result<PromiseView, ApiError> {
    let mut view = p.view();
    if let Some(children) = view.children.as_mut() {
        children.items = Some(
            crate::join::children_now(&st.store, &p.id)
                .await?
                .iter()
                .map(crate::store::ChildEntry::view)
                .collect(),
        );
    }
    Ok(view)
}

/// The path of `/promises/{*id}` and `/cb/{token}/promises/{*id}`: one
/// handler per operation serves both, the token form carrying the
/// capability token in the path instead of a credential header.
#[derive(Deserialize)]
pub(super) struct PromisePath {
    #[serde(default)]
    token: Option<String>,
    id: String,
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
pub(super) async fn get_promise<S: Store>(
    st: St<S>,
    Path(path): Path<PromisePath>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let id = parse_id(&path.id)?;
    let caller = caller_for(&st, &h, path.token.as_deref(), &id)?;
    let wait = query_map(&q)
        .get("wait")
        .map(|w| parse_wait(w))
        .transpose()?;
    read_promise(&st, caller, &id, wait).await
}

/// Complete a promise (Durable Promise specification).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PatchBody {
    /// RESOLVED, REJECTED or REJECTED_CANCELED (case-insensitive).
    #[schema(example = "RESOLVED")]
    state: String,
    #[serde(default)]
    value: Option<Payload>,
}

pub(super) async fn complete<S: Store>(
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
        settled_by: caller.settled_by(),
        cancel_run: target == State::RejectedCanceled,
        capability: caller.capability(),
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
pub(super) async fn patch<S: Store>(
    st: St<S>,
    Path(path): Path<PromisePath>,
    h: HeaderMap,
    body: Body,
) -> ApiResult {
    complete(&st, path.id, path.token.as_deref(), h, body).await
}

/// Create a bare promise (Durable Promise specification).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateBody {
    id: String,
    #[serde(default)]
    param: Option<Payload>,
    /// Milliseconds since the epoch.
    #[serde(default)]
    timeout: Option<i64>,
    #[serde(default, deserialize_with = "null_as_default")]
    #[schema(nullable)]
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
pub(super) async fn create<S: Store>(st: St<S>, h: HeaderMap, body: Body) -> ApiResult {
    let bytes = read_body(&st, &h, body).await?;
    require_operator(&st, &h)?;
    let b: CreateBody =
        json_body(&h, &bytes)?.ok_or_else(|| ApiError::bad_request("missing body"))?;
    let id = parse_id(&b.id)?;
    let strict = header_flag(&h, "strict")?;
    let key = ikey(&h);
    let timeout = creation_timeout(&st, b.timeout)?;
    check_tags(&b.tags)?;
    let new = NewPromise {
        param: b.param.unwrap_or_default(),
        tags: b.tags,
        ikey_create: key.clone(),
        ..NewPromise::bare(id, timeout, st.settings.default_workspace.clone())
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
                    reason: "already_exists",
                    message: format!("promise {} already exists ({})", p.id, p.state),
                    promise: Some(Box::new(p.view())),
                })
            }
        }
    }
}

/// A create's timeout: an epoch time in ms within `worker.max_timeout_seconds`
/// from now, or the default. Shared by the classic create and Resonate's
/// `promise.create`.
pub(super) fn creation_timeout<S>(
    st: &AppState<S>,
    timeout: Option<i64>,
) -> Result<Timeout, ApiError> {
    Ok(match timeout {
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
    })
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
pub(super) async fn search<S: Store>(st: St<S>, h: HeaderMap, RawQuery(q): RawQuery) -> ApiResult {
    require_operator(&st, &h)?;
    let mut query = SearchQuery {
        limit: 100,
        ..Default::default()
    };
    for (k, v) in url::form_urlencoded::parse(q.as_deref().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "id" => {
                query.id = IdPattern::parse(&v)?;
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
    check_tags(&query.tags)?;
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
pub(super) struct CancelBody {
    /// A promise id or a pattern with * wildcards.
    #[serde(default)]
    id: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    #[schema(nullable)]
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
pub(super) async fn bulk_cancel<S: Store>(st: St<S>, h: HeaderMap, body: Body) -> ApiResult {
    let bytes = read_body(&st, &h, body).await?;
    require_operator(&st, &h)?;
    let b: CancelBody = json_body(&h, &bytes)?
        .ok_or_else(|| ApiError::bad_request("missing body: {\"tags\"|\"job_id\"|\"id\": ...}"))?;
    let filter = CancelFilter::new(b.id.as_deref(), b.tags, b.job_id)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if filter.is_empty() {
        return Err(ApiError::bad_request(
            "give at least one of id, tags, job_id",
        ));
    }
    let reason = b.reason.unwrap_or_else(|| "canceled by an operator".into());
    let report = cancel_matching(&st.store, &filter, &reason, SettledBy::Operator).await?;
    Ok(Json(report).into_response())
}

pub(super) async fn get_cancel_promise<S: Store>(
    st: St<S>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let path = PromisePath {
        token: None,
        id: "cancel".into(),
    };
    get_promise(st, Path(path), h, RawQuery(q)).await
}

/// Adopt a run started outside runbridge for a pending promise.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct AdoptBody {
    /// The pending promise.
    id: String,
    /// The Databricks run it follows from now on: a run of the promise's
    /// job in its workspace (a one-time run for a `runs/submit` promise).
    run_id: u64,
}

/// `POST /promises/adopt`: the pending promise follows the given run from
/// now on, as if runbridge had launched it (checks, deadline, exit value;
/// its event names the run). Refused, with the reason, for a settled
/// promise, a run that does not exist or a run of another job.
#[utoipa::path(
    post,
    path = "/promises/adopt",
    tag = "promises",
    request_body(content = AdoptBody, content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Adopted: the promise as it is now", body = PromiseAnswer),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such promise", body = ErrorBody),
        (status = 409, description = "Refused: the promise is settled or launching, the run does not exist, is another job's or another promise's", body = ErrorBody),
        (status = 503, description = "Databricks or the store is unavailable, or this sidecar has no Databricks credentials", body = ErrorBody),
    )
)]
pub(super) async fn adopt<S: Store>(st: St<S>, h: HeaderMap, body: Body) -> ApiResult {
    use crate::audit::adopt::{AdoptError, adopt};
    let bytes = read_body(&st, &h, body).await?;
    require_operator(&st, &h)?;
    let b: AdoptBody = json_body(&h, &bytes)?
        .ok_or_else(|| ApiError::bad_request("missing body: {\"id\": ..., \"run_id\": ...}"))?;
    let id = PromiseId::parse(&b.id)?;
    let run = RunId::new(b.run_id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let Some(runs) = st.runs.as_deref() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_databricks",
            "this sidecar has no Databricks credentials to read the run with: adopt with `runbridge promise adopt`, or give the sidecar the workspace's credentials",
        ));
    };
    match adopt(&st.store, runs, &id, run, st.first_poll).await {
        Ok(p) => Ok(promise_response(StatusCode::OK, &p, false)),
        Err(AdoptError::NotFound(_)) => Err(ApiError::not_found(id.as_str())),
        Err(AdoptError::Store(e)) => Err(e.into()),
        Err(e @ AdoptError::Databricks(_)) => {
            tracing::warn!(error = %e, "adoption: the run could not be read");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("{e}; retry"),
            ))
        }
        Err(e) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "refused",
            e.to_string(),
        )),
    }
}

pub(super) async fn get_adopt_promise<S: Store>(
    st: St<S>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let path = PromisePath {
        token: None,
        id: "adopt".into(),
    };
    get_promise(st, Path(path), h, RawQuery(q)).await
}
