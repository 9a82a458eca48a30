//! Resonate's protocol: what Resonate's current SDKs speak.
//!
//! `@resonatehq/sdk` 0.11's `HttpNetwork` sends every request as one `POST`
//! to the server's URL: an envelope `{kind, head: {corrId, version, auth?},
//! data}`, answered with the same `kind` and `corrId` and the outcome in
//! `head.status` (the protocol specification, `resonatehq/resonate-protocol`
//! `spec/protocol.md`). So `POST /` on the sidecar takes those envelopes,
//! beside the classic Durable Promise routes:
//!
//! - `promise.get`, `promise.create`, `promise.settle` and `promise.search`
//!   run on the same store as the classic routes, with the same credentials
//!   (the `Authorization` header or `head.auth`: an operator token, or for
//!   get and settle the promise's own capability token) and write the same
//!   completion events;
//! - a create of an existing id answers the existing promise, and a settle
//!   of a settled promise answers it as it is (both idempotent, as the
//!   protocol says);
//! - every other kind (tasks, schedules, callbacks, listeners, debug) is
//!   501: runbridge does not schedule Resonate's functions, Databricks runs
//!   its work.
//!
//! The HTTP status is `head.status`: the SDK takes 200, 404, 409, 422 and
//! 501 as answers, anything else as a failure of the server.

use super::promises::{caller_among, creation_timeout, require_operator_among};
use super::*;

/// The protocol version runbridge answers with: the one `@resonatehq/sdk`
/// 0.11 sends.
pub const PROTOCOL_VERSION: &str = "2026-04-01";

/// The protocol's other kinds: answered 501, where an unknown kind is 400.
const NOT_OFFERED: &[&str] = &[
    "promise.register_callback",
    "promise.register_listener",
    "task.get",
    "task.create",
    "task.acquire",
    "task.release",
    "task.suspend",
    "task.halt",
    "task.continue",
    "task.fulfill",
    "task.fence",
    "task.heartbeat",
    "task.search",
    "schedule.get",
    "schedule.create",
    "schedule.delete",
    "schedule.search",
    "debug.start",
    "debug.reset",
    "debug.tick",
    "debug.snap",
    "debug.stop",
];

#[derive(Deserialize)]
struct Envelope {
    kind: String,
    head: Head,
    #[serde(default)]
    data: Value,
}

#[derive(Deserialize)]
struct Head {
    #[serde(rename = "corrId")]
    corr_id: String,
    #[serde(default)]
    auth: Option<String>,
}

#[derive(Deserialize)]
struct IdData {
    id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateData {
    id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    param: Payload,
    #[serde(default, deserialize_with = "null_as_default")]
    tags: BTreeMap<String, String>,
    timeout_at: i64,
}

#[derive(Deserialize)]
struct SettleData {
    id: String,
    state: String,
    #[serde(default, deserialize_with = "null_as_default")]
    value: Payload,
}

#[derive(Deserialize)]
struct SearchData {
    #[serde(default)]
    state: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    tags: BTreeMap<String, String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    cursor: Option<String>,
}

/// The answer's envelope.
#[derive(Serialize)]
struct Reply {
    kind: String,
    head: ReplyHead,
    data: Value,
}

#[derive(Serialize)]
struct ReplyHead {
    #[serde(rename = "corrId")]
    corr_id: String,
    status: u16,
    version: &'static str,
}

/// A promise as the protocol writes it: lower-case states, `timeoutAt`,
/// `createdAt`, and `settledAt` only once settled.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ProtocolPromise<'a> {
    id: &'a str,
    state: String,
    param: &'a Payload,
    value: &'a Payload,
    tags: &'a BTreeMap<String, String>,
    timeout_at: i64,
    created_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    settled_at: Option<i64>,
}

impl<'a> From<&'a Promise> for ProtocolPromise<'a> {
    fn from(p: &'a Promise) -> Self {
        Self {
            id: p.id.as_str(),
            state: p.state.as_str().to_ascii_lowercase(),
            param: &p.param,
            value: &p.value,
            tags: &p.tags,
            timeout_at: p.timeout,
            created_at: p.created_on,
            settled_at: p.completed_on,
        }
    }
}

#[derive(Serialize)]
struct OnePromise<'a> {
    promise: ProtocolPromise<'a>,
}

#[derive(Serialize)]
struct Found<'a> {
    promises: Vec<ProtocolPromise<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cursor: Option<String>,
}

/// What a request came to: a status and the envelope's `data` (an object
/// on 200, a message otherwise).
struct Answer {
    status: StatusCode,
    data: Value,
}

impl From<ApiError> for Answer {
    fn from(e: ApiError) -> Self {
        Self {
            status: e.status,
            data: Value::String(e.message),
        }
    }
}

fn ok(data: impl Serialize) -> Result<Answer, ApiError> {
    Ok(Answer {
        status: StatusCode::OK,
        data: serde_json::to_value(data).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?,
    })
}

fn one(p: &Promise) -> Result<Answer, ApiError> {
    ok(OnePromise { promise: p.into() })
}

/// `POST /`: one envelope in, one out.
pub(super) async fn envelope<S: Store>(st: St<S>, h: HeaderMap, body: Body) -> Response {
    let bytes = match read_body(&st, &h, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let env: Envelope = match serde_json::from_slice(&bytes) {
        Ok(env) => env,
        Err(e) => {
            return ApiError::bad_request(format!(
                "not a Resonate protocol request ({{kind, head: {{corrId, version}}, data}}): {e}"
            ))
            .into_response();
        }
    };
    let mut creds = auth::credentials(&h, None);
    creds.extend(env.head.auth.iter().map(|a| a.trim().to_owned()));
    let answer = dispatch(&st, &creds, &env.kind, env.data)
        .await
        .unwrap_or_else(Answer::from);
    let body = Reply {
        kind: env.kind,
        head: ReplyHead {
            corr_id: env.head.corr_id,
            status: answer.status.as_u16(),
            version: PROTOCOL_VERSION,
        },
        data: answer.data,
    };
    (answer.status, Json(body)).into_response()
}

async fn dispatch<S: Store>(
    st: &AppState<S>,
    creds: &[String],
    kind: &str,
    data: Value,
) -> Result<Answer, ApiError> {
    match kind {
        "promise.get" => {
            let d: IdData = parse(kind, data)?;
            let id = parse_id(&d.id)?;
            let caller = caller_among(st, creds, true, &id)?;
            match st.store.get(&id).await? {
                Some(p) => {
                    caller.sees(&p)?;
                    one(&p)
                }
                None => Err(ApiError::not_found(id.as_str())),
            }
        }
        "promise.create" => {
            require_operator_among(st, creds)?;
            let d: CreateData = parse(kind, data)?;
            let id = parse_id(&d.id)?;
            check_tags(&d.tags)?;
            let new = NewPromise {
                param: d.param,
                tags: d.tags,
                ..NewPromise::bare(
                    id,
                    creation_timeout(st, Some(d.timeout_at))?,
                    st.settings.default_workspace.clone(),
                )
            };
            let (CreateOutcome::Created(p) | CreateOutcome::Existing(p)) =
                st.store.create(&new).await?;
            one(&p)
        }
        "promise.settle" => {
            let d: SettleData = parse(kind, data)?;
            let id = parse_id(&d.id)?;
            let by = caller_among(st, creds, true, &id)?;
            let target = match d.state.as_str() {
                "resolved" => State::Resolved,
                "rejected" => State::Rejected,
                "rejected_canceled" => State::RejectedCanceled,
                other => {
                    return Err(ApiError::bad_request(format!(
                        "state must be resolved, rejected or rejected_canceled, not {other:?}"
                    )));
                }
            };
            let req = Settle {
                id,
                target,
                value: d.value,
                ikey: None,
                strict: false,
                settled_by: by.settled_by(),
                cancel_run: target == State::RejectedCanceled,
                capability: by.capability(),
            };
            match st.store.settle(&req).await? {
                SettleOutcome::Settled(p)
                | SettleOutcome::TimedOut(p)
                | SettleOutcome::Deduplicated(p)
                | SettleOutcome::AlreadySettled(p) => one(&p),
                SettleOutcome::NotFound => Err(ApiError::not_found(req.id.as_str())),
                SettleOutcome::NotOpened => Err(ApiError::unauthorized()),
            }
        }
        "promise.search" => {
            require_operator_among(st, creds)?;
            let d: SearchData = parse(kind, data)?;
            let states = match d.state.as_deref() {
                None => None,
                Some(s) => Some(vec![
                    s.parse::<State>()
                        .map_err(|e| ApiError::bad_request(e.to_string()))?,
                ]),
            };
            let limit = d.limit.unwrap_or(100);
            if !(1..=1000).contains(&limit) {
                return Err(ApiError::bad_request("limit must be 1-1000"));
            }
            check_tags(&d.tags)?;
            let page = st
                .store
                .search(&SearchQuery {
                    states,
                    tags: d.tags,
                    limit,
                    cursor: d.cursor,
                    ..Default::default()
                })
                .await?;
            ok(Found {
                promises: page.promises.iter().map(ProtocolPromise::from).collect(),
                cursor: page.cursor,
            })
        }
        k if NOT_OFFERED.contains(&k) => Ok(Answer {
            status: StatusCode::NOT_IMPLEMENTED,
            data: Value::String(format!(
                "runbridge does not offer {k}: it serves promise.get, promise.create, promise.settle and promise.search (Databricks runs the work; there are no Resonate tasks, schedules or callbacks)"
            )),
        }),
        other => Err(ApiError::bad_request(format!("unknown kind {other:?}"))),
    }
}

fn parse<T: serde::de::DeserializeOwned>(kind: &str, data: Value) -> Result<T, ApiError> {
    serde_json::from_value(data).map_err(|e| ApiError::bad_request(format!("{kind}: data: {e}")))
}
