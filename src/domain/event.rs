//! Completion events (docs/contracts.md, completion events): a CloudEvents 1.0 structured JSON event
//! built from a settled promise.
//!
//! The event is a pure function of the settled record, so the relay, a
//! redelivered trigger's `reply_to` copy and a retried publish all produce the
//! same bytes with the same `id` (`<promise id>/<STATE>`), and consumers can
//! deduplicate on it.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use schemars::JsonSchema;
use serde::Serialize;
use serde_json::Value;

use super::ids::RunId;
use super::promise::{Promise, SettledBy, State};

pub const CONTENT_TYPE: &str = "application/cloudevents+json";

#[derive(Debug, Clone, PartialEq)]
pub struct CompletionEvent {
    pub id: String,
    pub state: State,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    pub traceparent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("promise {0} is still pending: there is no completion event")]
pub struct NotSettled(pub String);

fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The event body as it travels: a CloudEvents 1.0 structured JSON event.
/// Its JSON Schema (`docs/schemas/event.schema.json`, `runbridge schema
/// event`) is derived from this struct, which is also what the relay
/// serialises, so the document cannot drift from the bytes.
#[derive(Serialize, JsonSchema)]
#[schemars(
    title = "runbridge completion event",
    description = "Published to the events exchange (routing key promise.<state in lower case>) once per settlement, as application/cloudevents+json. The AMQP message_id equals `id`."
)]
pub struct CloudEvent {
    /// Always "1.0".
    #[schemars(extend("const" = "1.0"))]
    pub specversion: String,
    /// `<promise id>/<STATE>`: stable across redelivery, for deduplication.
    pub id: String,
    /// `io.runbridge.promise.<state in lower case>`.
    #[schemars(regex(
        pattern = r"^io\.runbridge\.promise\.(resolved|rejected|rejected_canceled|rejected_timedout)$"
    ))]
    #[serde(rename = "type")]
    pub kind: String,
    /// `runbridge/<workspace>`.
    pub source: String,
    /// The promise id.
    pub subject: String,
    /// When the promise settled (RFC 3339, UTC, milliseconds).
    #[schemars(extend("format" = "date-time"))]
    pub time: String,
    /// Always "application/json".
    #[schemars(extend("const" = "application/json"))]
    pub datacontenttype: String,
    pub data: EventData,
}

/// The event's `data`: what happened to the promise.
#[derive(Serialize, JsonSchema)]
pub struct EventData {
    pub promise_id: String,
    /// Never PENDING.
    #[schemars(extend("not" = {"const": "PENDING"}))]
    pub state: State,
    /// The resolved value (JSON when the notebook sent JSON, else a string);
    /// null for a rejection.
    pub value: Value,
    /// The rejection's error (for a Databricks failure, its error body or the
    /// run's state message); null when resolved.
    pub error: Value,
    /// The Databricks run, when one was recorded before the promise settled.
    pub run_id: Option<u64>,
    pub job_id: Option<u64>,
    pub run_page_url: Option<String>,
    pub tags: BTreeMap<String, String>,
    #[schemars(extend("format" = "date-time"))]
    pub created_at: String,
    #[schemars(extend("format" = "date-time"))]
    pub settled_at: String,
    /// Who settled it.
    #[schemars(with = "Option<SettledBy>")]
    pub settled_by: Option<String>,
    /// A child's parent promise (only on a child of a parent trigger).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// How many children a parent has (only on a parent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub children: Option<u32>,
    /// The attempt that settled it (1 without retries; none on a parent,
    /// which runs nothing itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Every attempt, oldest first: `attempt`, `run_id`, `repair_id`,
    /// `started_on`, and for one that failed `ended_on` and `failure` (only
    /// with a retry policy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<Value>>,
}

/// A `promise.progress` event: what a running notebook last said of its
/// progress. Never a settlement; at most one per promise per
/// `sidecar.progress_interval_ms`, none after the promise settled.
#[derive(Serialize, JsonSchema)]
#[schemars(
    title = "runbridge progress event",
    description = "Published to the events exchange with routing key promise.progress, as application/cloudevents+json, while the promise is PENDING. The AMQP message_id equals `id`."
)]
pub struct ProgressCloudEvent {
    #[schemars(extend("const" = "1.0"))]
    pub specversion: String,
    /// `<promise id>/progress/<seq>`: one per update number.
    pub id: String,
    #[schemars(extend("const" = "io.runbridge.promise.progress"))]
    #[serde(rename = "type")]
    pub kind: String,
    /// `runbridge/<workspace>`.
    pub source: String,
    pub subject: String,
    /// When the update arrived.
    #[schemars(extend("format" = "date-time"))]
    pub time: String,
    #[schemars(extend("const" = "application/json"))]
    pub datacontenttype: String,
    pub data: ProgressData,
}

#[derive(Serialize, JsonSchema)]
pub struct ProgressData {
    pub promise_id: String,
    /// Always PENDING.
    #[schemars(extend("const" = "PENDING"))]
    pub state: State,
    /// The update: `seq` (its number, from 1), `at` (ms), and what the
    /// notebook sent: `percent`, `stage`, `message`, `metrics`.
    pub progress: Value,
    pub run_id: Option<u64>,
    pub job_id: Option<u64>,
    pub run_page_url: Option<String>,
    /// The attempt running (1 without retries).
    pub attempt: u32,
    pub tags: BTreeMap<String, String>,
    /// A child's parent (only on a child of a parent trigger).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// The routing key of progress events.
pub const PROGRESS_ROUTING_KEY: &str = "promise.progress";

impl CompletionEvent {
    pub fn from_promise(p: &Promise) -> Result<Self, NotSettled> {
        if !p.state.is_settled() {
            return Err(NotSettled(p.id.to_string()));
        }
        let id = format!("{}/{}", p.id, p.state);
        let data = p.value.data_as_json();
        let (value, error) = if p.state.is_rejection() {
            (Value::Null, data)
        } else {
            (data, Value::Null)
        };
        let settled_at = rfc3339(p.completed_on.unwrap_or(p.created_on));
        let event = CloudEvent {
            specversion: "1.0".into(),
            id: id.clone(),
            kind: format!(
                "io.runbridge.promise.{}",
                p.state.as_str().to_ascii_lowercase()
            ),
            source: format!("runbridge/{}", p.workspace),
            subject: p.id.to_string(),
            time: settled_at.clone(),
            datacontenttype: "application/json".into(),
            data: EventData {
                promise_id: p.id.to_string(),
                state: p.state,
                value,
                error,
                run_id: p.run_id.map(RunId::get),
                job_id: p.job_id,
                run_page_url: p.run_page_url.clone(),
                tags: p.tags.clone(),
                created_at: rfc3339(p.created_on),
                settled_at,
                settled_by: p.settled_by.clone(),
                parent: p.parent.as_ref().map(|c| c.parent.to_string()),
                children: p.family.as_ref().map(|f| f.children),
                attempt: p.family.is_none().then_some(p.retry.attempt),
                attempts: p.retry.policy.as_ref().map(|_| p.attempts()),
            },
        };
        let mut body = serde_json::to_vec(&event).unwrap_or_default();
        body.shrink_to_fit();
        Ok(Self {
            id,
            state: p.state,
            routing_key: p.state.routing_key(),
            body,
            reply_to: p.reply_to.clone(),
            correlation_id: p.correlation_id.clone(),
            traceparent: p.traceparent.clone(),
        })
    }
}

impl CompletionEvent {
    /// The `promise.progress` event of a PENDING promise's latest update
    /// (`None`: settled, or no update). Not sent to `reply_to`: that
    /// address waits for the one answer.
    pub fn progress(p: &Promise) -> Option<Self> {
        let progress = p.progress.as_ref().filter(|_| !p.state.is_settled())?;
        let id = format!("{}/progress/{}", p.id, progress.seq);
        let at = progress
            .latest
            .get("at")
            .and_then(Value::as_i64)
            .unwrap_or(p.created_on);
        let event = ProgressCloudEvent {
            specversion: "1.0".into(),
            id: id.clone(),
            kind: "io.runbridge.promise.progress".into(),
            source: format!("runbridge/{}", p.workspace),
            subject: p.id.to_string(),
            time: rfc3339(at),
            datacontenttype: "application/json".into(),
            data: ProgressData {
                promise_id: p.id.to_string(),
                state: p.state,
                progress: progress.latest.clone(),
                run_id: p.run_id.map(RunId::get),
                job_id: p.job_id,
                run_page_url: p.run_page_url.clone(),
                attempt: p.retry.attempt,
                tags: p.tags.clone(),
                parent: p.parent.as_ref().map(|c| c.parent.to_string()),
            },
        };
        Some(Self {
            id,
            state: p.state,
            routing_key: PROGRESS_ROUTING_KEY.into(),
            body: serde_json::to_vec(&event).unwrap_or_default(),
            reply_to: None,
            correlation_id: p.correlation_id.clone(),
            traceparent: p.traceparent.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::PromiseId;
    use crate::domain::promise::Payload;

    fn promise(state: State, data: &str) -> Promise {
        Promise {
            id: PromiseId::parse("p1").unwrap(),
            state,
            param: Payload::default(),
            value: Payload::data(data),
            timeout: 0,
            tags: BTreeMap::from([("team".into(), "growth".into())]),
            ikey_create: None,
            ikey_complete: None,
            created_on: 1_700_000_000_000,
            completed_on: Some(1_700_000_001_000),
            run_id: Some(RunId::new(42).unwrap()),
            job_id: Some(123),
            workspace: "default".into(),
            run_page_url: None,
            reply_to: None,
            correlation_id: None,
            traceparent: None,
            settled_by: Some("callback".into()),
            heartbeat_seconds: None,
            cancel_on_timeout: true,
            token_version: 3,
            activity: Default::default(),
            parent: None,
            family: None,
            retry: Default::default(),
            progress: None,
        }
    }

    #[test]
    fn resolved_event_shape() {
        let e = CompletionEvent::from_promise(&promise(State::Resolved, "hello world")).unwrap();
        assert_eq!(e.id, "p1/RESOLVED");
        assert_eq!(e.routing_key, "promise.resolved");
        let v: Value = serde_json::from_slice(&e.body).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["type"], "io.runbridge.promise.resolved");
        assert_eq!(v["source"], "runbridge/default");
        assert_eq!(v["time"], "2023-11-14T22:13:21.000Z");
        assert_eq!(v["data"]["value"], "hello world");
        assert_eq!(v["data"]["error"], Value::Null);
        assert_eq!(v["data"]["run_id"], 42);
        assert_eq!(v["data"]["tags"]["team"], "growth");
        assert_eq!(v["data"]["settled_by"], "callback");
    }

    #[test]
    fn rejection_carries_error_not_value() {
        let e = CompletionEvent::from_promise(&promise(
            State::Rejected,
            r#"{"error_code":"RESOURCE_DOES_NOT_EXIST","message":"no job"}"#,
        ))
        .unwrap();
        let v: Value = serde_json::from_slice(&e.body).unwrap();
        assert_eq!(v["data"]["value"], Value::Null);
        assert_eq!(v["data"]["error"]["error_code"], "RESOURCE_DOES_NOT_EXIST");
    }

    #[test]
    fn pending_has_no_event() {
        assert!(CompletionEvent::from_promise(&promise(State::Pending, "x")).is_err());
    }

    #[test]
    fn same_record_same_bytes() {
        let p = promise(State::Resolved, "1");
        assert_eq!(
            CompletionEvent::from_promise(&p).unwrap(),
            CompletionEvent::from_promise(&p).unwrap()
        );
    }
}
