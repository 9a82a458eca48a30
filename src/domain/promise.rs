//! The durable promise: its states, its record and the JSON shape of the
//! Durable Promise specification (`resonatehq/durable-promise-specification`).
//!
//! The record lives in a Redis hash (see `store`); [`Promise::from_fields`]
//! is the one place that turns those fields back into a typed value, used for
//! reads, for settlement answers and for outbox entries alike.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::ids::{CallbackSigner, CallbackToken, IdempotencyToken, Incarnation, PromiseId, RunId};
use super::retry::RetryPolicy;

/// How a parent's outcome follows from its children's.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Join {
    /// RESOLVED with every child's value, in order, once every child
    /// resolved; REJECTED when a child is rejected, naming it.
    #[default]
    All,
    /// RESOLVED with every child's outcome once every child settled.
    AllSettled,
    /// RESOLVED with the first child to resolve; REJECTED when none did.
    Any,
}

impl Join {
    pub fn as_str(self) -> &'static str {
        match self {
            Join::All => "all",
            Join::AllSettled => "all_settled",
            Join::Any => "any",
        }
    }

    pub fn parse(s: &str) -> Option<Join> {
        [Join::All, Join::AllSettled, Join::Any]
            .into_iter()
            .find(|j| j.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    Pending,
    Resolved,
    Rejected,
    RejectedCanceled,
    RejectedTimedout,
}

impl State {
    pub const ALL: [State; 5] = [
        State::Pending,
        State::Resolved,
        State::Rejected,
        State::RejectedCanceled,
        State::RejectedTimedout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "PENDING",
            State::Resolved => "RESOLVED",
            State::Rejected => "REJECTED",
            State::RejectedCanceled => "REJECTED_CANCELED",
            State::RejectedTimedout => "REJECTED_TIMEDOUT",
        }
    }

    pub fn is_settled(self) -> bool {
        self != State::Pending
    }

    pub fn is_rejection(self) -> bool {
        matches!(
            self,
            State::Rejected | State::RejectedCanceled | State::RejectedTimedout
        )
    }

    /// `promise.<state in lower case>` (docs/contracts.md, completion events).
    pub fn routing_key(self) -> String {
        format!("promise.{}", self.as_str().to_ascii_lowercase())
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown promise state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for State {
    type Err = UnknownState;
    /// Case-insensitive, as the search API wants.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        State::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// Who settled a promise (the event's `settled_by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SettledBy {
    Callback,
    Reconciler,
    Timeout,
    Operator,
    /// The worker, from a permanent Databricks error at launch.
    Worker,
    /// A parent, from its children's outcomes.
    Join,
    /// A child cancelled because its parent settled.
    Parent,
}

impl SettledBy {
    pub fn as_str(self) -> &'static str {
        match self {
            SettledBy::Callback => "callback",
            SettledBy::Reconciler => "reconciler",
            SettledBy::Timeout => "timeout",
            SettledBy::Operator => "operator",
            SettledBy::Worker => "worker",
            SettledBy::Join => "join",
            SettledBy::Parent => "parent",
        }
    }
}

/// `{headers, data}` as in the specification. `data` is kept as the string
/// the client sent; without data it is left out, not `null` (as Resonate's
/// own server answers: strict clients refuse a null string).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Payload {
    #[serde(default, deserialize_with = "null_as_default")]
    #[schema(nullable)]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

/// Reads `null` as the field's default. Clients generated from the Durable
/// Promise OpenAPI document send `"headers": null` (or `"tags": null`) for
/// an optional object they leave unset, and Resonate's own server takes it
/// as absent; so does runbridge.
pub fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl Payload {
    pub fn data(data: impl Into<String>) -> Self {
        Self {
            headers: BTreeMap::new(),
            data: Some(data.into()),
        }
    }

    /// The data as JSON when it is JSON, else as a JSON string: what events carry.
    pub fn data_as_json(&self) -> Value {
        match &self.data {
            None => Value::Null,
            Some(s) => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone())),
        }
    }
}

/// One promise, as read from its record.
#[derive(Debug, Clone, PartialEq)]
pub struct Promise {
    pub id: PromiseId,
    pub state: State,
    pub param: Payload,
    pub value: Payload,
    /// Deadline, milliseconds since the epoch.
    pub timeout: i64,
    pub tags: BTreeMap<String, String>,
    pub ikey_create: Option<String>,
    pub ikey_complete: Option<String>,
    pub created_on: i64,
    pub completed_on: Option<i64>,
    pub run_id: Option<RunId>,
    pub job_id: Option<u64>,
    pub workspace: String,
    pub run_page_url: Option<String>,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    pub traceparent: Option<String>,
    pub settled_by: Option<String>,
    pub heartbeat_seconds: Option<u64>,
    pub cancel_on_timeout: bool,
    /// How the run's tokens are derived: 1 (no field), the idempotency
    /// token of the id alone; 2, the idempotency token bound to `created`;
    /// 3 (every promise created since), the capability token bound to
    /// `created` too ([`CallbackToken`]).
    pub token_version: u8,
    /// For the console's timeline: when the run id was recorded, the last
    /// heartbeat and how many, when the completion event was confirmed.
    pub activity: Activity,
    /// The parent, for a child of a parent trigger.
    pub parent: Option<ChildOf>,
    /// The children, for a parent.
    pub family: Option<Family>,
    /// The retry policy, and where the promise stands in it.
    pub retry: Retrying,
    /// What the notebook last said of its progress, and the recent updates.
    pub progress: Option<ProgressState>,
}

/// A promise's attempts (docs/contracts.md, retries).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Retrying {
    pub policy: Option<RetryPolicy>,
    /// The attempt running or waiting to start (1 for the first).
    pub attempt: u32,
    /// Each attempt that failed, oldest first, as recorded: `attempt`,
    /// `run_id`, `repair_id`, `started_on`, `ended_on`, `failure`.
    pub failed: Vec<Value>,
    /// The run's latest repair (mode `repair`).
    pub repair_id: Option<u64>,
    /// While waiting for the next attempt: when it is due (ms).
    pub next_at: Option<i64>,
    /// The current attempt has begun and its run is not recorded yet.
    pub launching: bool,
}

/// The notebook's progress: the latest update, its number, and the last
/// few (for the console's timeline).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProgressState {
    pub latest: Value,
    pub seq: u64,
    pub history: Vec<Value>,
}

/// Where a child sits: its parent and its place among the parent's children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildOf {
    pub parent: PromiseId,
    pub index: u32,
}

/// A parent's children as its record describes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    pub children: u32,
    pub join: Join,
    pub fail_fast: bool,
    pub max_concurrency: Option<u32>,
    /// How many children may have been launched so far (the window).
    pub launched: u32,
}

/// When things happened to a promise (milliseconds since the epoch).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Activity {
    pub launched_on: Option<i64>,
    pub last_heartbeat_on: Option<i64>,
    pub heartbeats: u64,
    pub published_on: Option<i64>,
}

/// Field names of the Redis hash. Short, since every pending promise pays for
/// them; the `store` module and its Lua scripts use exactly these.
pub mod field {
    pub const ID: &str = "id";
    pub const STATE: &str = "state";
    pub const PARAM: &str = "param";
    pub const VALUE: &str = "value";
    pub const TIMEOUT: &str = "timeout";
    pub const TAGS: &str = "tags";
    pub const IKEY_CREATE: &str = "ikc";
    pub const IKEY_COMPLETE: &str = "iku";
    pub const CREATED: &str = "created";
    pub const COMPLETED: &str = "completed";
    pub const RUN_ID: &str = "run_id";
    pub const JOB_ID: &str = "job_id";
    pub const WORKSPACE: &str = "ws";
    pub const RUN_PAGE_URL: &str = "url";
    pub const REPLY_TO: &str = "reply_to";
    pub const CORRELATION_ID: &str = "corr";
    pub const TRACEPARENT: &str = "tp";
    pub const SETTLED_BY: &str = "by";
    pub const HEARTBEAT: &str = "hb";
    pub const CANCEL_ON_TIMEOUT: &str = "cot";
    pub const LAUNCHED: &str = "la";
    pub const LAST_HEARTBEAT: &str = "hbl";
    pub const HEARTBEATS: &str = "hbn";
    pub const PUBLISHED: &str = "pub";
    pub const TOKEN_VERSION: &str = "tv";
    pub const PARENT: &str = "par";
    pub const PARENT_INDEX: &str = "pn";
    pub const CHILDREN: &str = "kids";
    pub const JOIN: &str = "join";
    pub const FAIL_FAST: &str = "ff";
    pub const MAX_CONCURRENCY: &str = "mc";
    pub const WINDOW: &str = "kl";
    pub const RETRY: &str = "rt";
    pub const ATTEMPT: &str = "an";
    pub const ATTEMPTS_FAILED: &str = "ah";
    pub const REPAIR_ID: &str = "rp";
    pub const RETRY_AT: &str = "rw";
    pub const ATTEMPT_LAUNCHING: &str = "rl";
    pub const PROGRESS: &str = "pg";
    pub const PROGRESS_SEQ: &str = "pgn";
    pub const PROGRESS_HISTORY: &str = "pgh";
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt promise record: {0}")]
pub struct CorruptRecord(pub String);

fn opt(fields: &HashMap<String, String>, k: &str) -> Option<String> {
    fields.get(k).filter(|v| !v.is_empty()).cloned()
}

fn json_field<T: serde::de::DeserializeOwned + Default>(
    fields: &HashMap<String, String>,
    k: &str,
) -> Result<T, CorruptRecord> {
    match fields.get(k).filter(|v| !v.is_empty()) {
        None => Ok(T::default()),
        Some(s) => serde_json::from_str(s).map_err(|e| CorruptRecord(format!("{k}: {e}"))),
    }
}

fn int_field<T: FromStr>(
    fields: &HashMap<String, String>,
    k: &str,
) -> Result<Option<T>, CorruptRecord> {
    opt(fields, k)
        .map(|v| {
            v.parse::<T>()
                .map_err(|_| CorruptRecord(format!("{k}: {v:?} is not a number")))
        })
        .transpose()
}

impl Promise {
    pub fn from_fields(fields: &HashMap<String, String>) -> Result<Self, CorruptRecord> {
        let id = opt(fields, field::ID).ok_or_else(|| CorruptRecord("no id".into()))?;
        let id = PromiseId::parse(&id).map_err(|e| CorruptRecord(e.to_string()))?;
        let state = opt(fields, field::STATE)
            .ok_or_else(|| CorruptRecord("no state".into()))?
            .parse::<State>()
            .map_err(|e| CorruptRecord(e.to_string()))?;
        let parent = match opt(fields, field::PARENT) {
            None => None,
            Some(par) => Some(ChildOf {
                parent: PromiseId::parse(&par).map_err(|e| CorruptRecord(e.to_string()))?,
                index: int_field(fields, field::PARENT_INDEX)?
                    .ok_or_else(|| CorruptRecord("par without pn".into()))?,
            }),
        };
        let family = match int_field::<u32>(fields, field::CHILDREN)? {
            None => None,
            Some(children) => Some(Family {
                children,
                join: opt(fields, field::JOIN)
                    .and_then(|j| Join::parse(&j))
                    .ok_or_else(|| CorruptRecord("kids without a known join".into()))?,
                fail_fast: opt(fields, field::FAIL_FAST).as_deref() == Some("1"),
                max_concurrency: int_field(fields, field::MAX_CONCURRENCY)?,
                launched: int_field(fields, field::WINDOW)?.unwrap_or(children),
            }),
        };
        let run_id = int_field::<u64>(fields, field::RUN_ID)?
            .map(RunId::new)
            .transpose()
            .map_err(|e| CorruptRecord(e.to_string()))?;
        Ok(Promise {
            id,
            state,
            param: json_field(fields, field::PARAM)?,
            value: json_field(fields, field::VALUE)?,
            timeout: int_field(fields, field::TIMEOUT)?.unwrap_or(0),
            tags: json_field(fields, field::TAGS)?,
            ikey_create: opt(fields, field::IKEY_CREATE),
            ikey_complete: opt(fields, field::IKEY_COMPLETE),
            created_on: int_field(fields, field::CREATED)?.unwrap_or(0),
            completed_on: int_field(fields, field::COMPLETED)?,
            run_id,
            job_id: int_field(fields, field::JOB_ID)?,
            workspace: opt(fields, field::WORKSPACE).unwrap_or_else(|| "default".into()),
            run_page_url: opt(fields, field::RUN_PAGE_URL),
            reply_to: opt(fields, field::REPLY_TO),
            correlation_id: opt(fields, field::CORRELATION_ID),
            traceparent: opt(fields, field::TRACEPARENT),
            settled_by: opt(fields, field::SETTLED_BY),
            heartbeat_seconds: int_field(fields, field::HEARTBEAT)?,
            cancel_on_timeout: opt(fields, field::CANCEL_ON_TIMEOUT).as_deref() != Some("0"),
            token_version: int_field(fields, field::TOKEN_VERSION)?.unwrap_or(1),
            activity: Activity {
                launched_on: int_field(fields, field::LAUNCHED)?,
                last_heartbeat_on: int_field(fields, field::LAST_HEARTBEAT)?,
                heartbeats: int_field(fields, field::HEARTBEATS)?.unwrap_or(0),
                published_on: int_field(fields, field::PUBLISHED)?,
            },
            parent,
            family,
            retry: Retrying {
                policy: match opt(fields, field::RETRY) {
                    None => None,
                    Some(s) => Some(
                        RetryPolicy::from_stored(&s)
                            .ok_or_else(|| CorruptRecord("rt: not a retry policy".into()))?,
                    ),
                },
                attempt: int_field(fields, field::ATTEMPT)?.unwrap_or(1),
                failed: json_field(fields, field::ATTEMPTS_FAILED)?,
                repair_id: int_field(fields, field::REPAIR_ID)?,
                next_at: int_field(fields, field::RETRY_AT)?,
                launching: opt(fields, field::ATTEMPT_LAUNCHING).is_some(),
            },
            progress: match opt(fields, field::PROGRESS) {
                None => None,
                Some(latest) => Some(ProgressState {
                    latest: serde_json::from_str(&latest)
                        .map_err(|e| CorruptRecord(format!("pg: {e}")))?,
                    seq: int_field(fields, field::PROGRESS_SEQ)?.unwrap_or(0),
                    history: json_field(fields, field::PROGRESS_HISTORY)?,
                }),
            },
        })
    }

    /// Every attempt so far, oldest first: those that failed as recorded,
    /// then the current one (none while a parent, which runs nothing). An
    /// attempt begun whose run is not recorded yet (the promise may have
    /// settled by its run's callback first) has no run id (rerun) or repair
    /// id (repair) yet.
    pub fn attempts(&self) -> Vec<Value> {
        let mut all = self.retry.failed.clone();
        let r = &self.retry;
        if (self.run_id.is_some() || r.launching) && r.next_at.is_none() {
            let repair = if r.launching { None } else { r.repair_id };
            all.push(serde_json::json!({
                "attempt": r.attempt,
                "run_id": self.run_id.map(RunId::get),
                "repair_id": repair,
                "started_on": if r.launching { None } else { self.activity.launched_on },
            }));
        }
        all
    }

    /// The `idempotency_token` of this promise's run (see
    /// [`IdempotencyToken`] for the versions).
    pub fn idempotency_token(&self) -> IdempotencyToken {
        match self.token_version {
            1 => IdempotencyToken::derive(&self.workspace, &self.id),
            _ => IdempotencyToken::derive_v2(&self.workspace, &self.id, self.created_on),
        }
    }

    /// The capability token handed to this promise's run: bound to its
    /// creation time, or of the id alone for a promise created before
    /// tokens were bound (so its run's token keeps working).
    pub fn callback_token(&self, signer: &CallbackSigner) -> CallbackToken {
        if self.token_version >= 3 {
            signer.sign(&self.id, self.created_on)
        } else {
            signer.sign_legacy(&self.id)
        }
    }

    /// Does a token that opens this id (as [`CallbackSigner::verify`]
    /// answered) open this incarnation of it?
    pub fn opened_by(&self, bound: Incarnation) -> bool {
        match bound {
            Incarnation::Legacy => self.token_version < 3,
            Incarnation::Created(ms) => ms == self.created_on,
        }
    }

    /// The Durable Promise JSON (Resonate's `Promise` schema), plus the
    /// bridge's own read-only fields, which spec clients ignore.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self.view()).unwrap_or_default()
    }

    pub fn view(&self) -> PromiseView {
        PromiseView {
            id: self.id.to_string(),
            state: self.state,
            param: self.param.clone(),
            value: self.value.clone(),
            timeout: self.timeout,
            tags: self.tags.clone(),
            idempotency_key_for_create: self.ikey_create.clone(),
            idempotency_key_for_complete: self.ikey_complete.clone(),
            created_on: self.created_on,
            completed_on: self.completed_on,
            run_id: self.run_id.map(RunId::get),
            job_id: self.job_id,
            run_page_url: self.run_page_url.clone(),
            settled_by: self.settled_by.clone(),
            parent: self.parent.as_ref().map(|c| c.parent.to_string()),
            children: self.family.as_ref().map(|f| ChildrenView {
                count: f.children,
                join: f.join,
                fail_fast: f.fail_fast,
                max_concurrency: f.max_concurrency,
                items: None,
            }),
            attempt: self.retry.policy.as_ref().map(|_| self.retry.attempt),
            attempts: self.retry.policy.as_ref().map(|_| self.attempts()),
            retry: self.retry.policy.as_ref().map(RetryPolicy::to_json),
            next_attempt_at: self.retry.next_at,
            progress: self.progress.as_ref().map(|p| p.latest.clone()),
            progress_history: self.progress.as_ref().map(|p| p.history.clone()),
        }
    }
}

/// A parent's children in the HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChildrenView {
    pub count: u32,
    pub join: Join,
    pub fail_fast: bool,
    pub max_concurrency: Option<u32>,
    /// Each child in order with its state (null: not created yet). Given
    /// when one promise is read (`GET /promises/{id}`), not in searches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<ChildView>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChildView {
    pub index: u32,
    pub id: String,
    pub state: Option<State>,
}

/// A promise as the HTTP API answers it: the Durable Promise specification's
/// `Promise` (`resonatehq/resonate` `api/openapi.yml`) plus the bridge's
/// read-only fields (`runId`, `jobId`, `runPageUrl`, `settledBy`). The
/// sidecar's OpenAPI document takes its schema from this struct.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Promise)]
pub struct PromiseView {
    pub id: String,
    pub state: State,
    pub param: Payload,
    pub value: Payload,
    /// The deadline, milliseconds since the epoch.
    pub timeout: i64,
    pub tags: BTreeMap<String, String>,
    pub idempotency_key_for_create: Option<String>,
    pub idempotency_key_for_complete: Option<String>,
    /// Milliseconds since the epoch; never changes.
    pub created_on: i64,
    /// Milliseconds since the epoch; null while pending.
    pub completed_on: Option<i64>,
    pub run_id: Option<u64>,
    pub job_id: Option<u64>,
    pub run_page_url: Option<String>,
    #[schema(value_type = Option<SettledBy>)]
    pub settled_by: Option<String>,
    /// A child's parent (only on children).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// A parent's children (only on parents).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub children: Option<ChildrenView>,
    /// The attempt running or waiting (only with a retry policy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Every attempt so far, oldest first: `attempt`, `run_id`,
    /// `repair_id`, `started_on`, and for one that failed `ended_on` and
    /// `failure` (only with a retry policy).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub attempts: Option<Vec<Value>>,
    /// The retry policy (only with one).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub retry: Option<Value>,
    /// While waiting to retry: when the next attempt is due (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<i64>,
    /// The notebook's latest progress update (`percent`, `stage`,
    /// `message`, `metrics`, `at`, `seq`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub progress: Option<Value>,
    /// The last few progress updates, oldest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub progress_history: Option<Vec<Value>>,
}

/// What a client asks a pending promise to become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    Resolve,
    Reject,
    Cancel,
}

impl Completion {
    pub fn target(self) -> State {
        match self {
            Completion::Resolve => State::Resolved,
            Completion::Reject => State::Rejected,
            Completion::Cancel => State::RejectedCanceled,
        }
    }

    pub fn from_target(s: State) -> Option<Self> {
        match s {
            State::Resolved => Some(Completion::Resolve),
            State::Rejected => Some(Completion::Reject),
            State::RejectedCanceled => Some(Completion::Cancel),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn states_parse_case_insensitively() {
        assert_eq!("resolved".parse::<State>().unwrap(), State::Resolved);
        assert_eq!(
            "Rejected_TimedOut".parse::<State>().unwrap(),
            State::RejectedTimedout
        );
        assert!("done".parse::<State>().is_err());
        assert_eq!(
            State::RejectedCanceled.routing_key(),
            "promise.rejected_canceled"
        );
    }

    #[test]
    fn record_round_trip() {
        let mut f = HashMap::new();
        f.insert("id".to_string(), "p1".to_string());
        f.insert("state".to_string(), "RESOLVED".to_string());
        f.insert(
            "value".to_string(),
            r#"{"headers":{},"data":"hello world"}"#.to_string(),
        );
        f.insert("tags".to_string(), r#"{"team":"growth"}"#.to_string());
        f.insert("run_id".to_string(), "42".to_string());
        f.insert("created".to_string(), "1000".to_string());
        f.insert("completed".to_string(), "2000".to_string());
        let p = Promise::from_fields(&f).unwrap();
        assert_eq!(p.run_id.unwrap().get(), 42);
        let j = p.to_json();
        assert_eq!(j["state"], "RESOLVED");
        assert_eq!(j["value"]["data"], "hello world");
        assert_eq!(j["param"], json!({"headers": {}}));
        assert_eq!(j["tags"]["team"], "growth");
        assert_eq!(j["completedOn"], 2000);
        assert_eq!(p.value.data_as_json(), json!("hello world"));
    }

    #[test]
    fn null_optional_objects_read_as_absent() {
        let p: Payload = serde_json::from_str(r#"{"headers": null, "data": null}"#).unwrap();
        assert_eq!(p, Payload::default());
        let p: Payload = serde_json::from_str(r#"{"headers": {"a": "b"}}"#).unwrap();
        assert_eq!(p.headers["a"], "b");
        assert!(serde_json::from_str::<Payload>(r#"{"headers": 3}"#).is_err());
        assert_eq!(
            serde_json::to_value(Payload::default()).unwrap(),
            json!({"headers": {}})
        );
    }

    #[test]
    fn corrupt_records_are_named() {
        let mut f = HashMap::new();
        f.insert("id".to_string(), "p1".to_string());
        f.insert("state".to_string(), "WEIRD".to_string());
        assert!(Promise::from_fields(&f).unwrap_err().0.contains("WEIRD"));
    }
}
