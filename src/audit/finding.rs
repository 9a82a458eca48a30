//! A finding as it is kept (one JSON record per finding in the workspace's
//! findings hash) and as it travels: a CloudEvents 1.0 event of type
//! `io.runbridge.audit.finding` on the events exchange, routing key
//! `audit.<kind>`, whose `id` is the finding's, so a later audit that sees
//! the same disagreement again publishes nothing new and a repeated publish
//! (after a crash) repeats the same id.

use chrono::{DateTime, SecondsFormat, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::classify::{FindingKind, PromiseSide, RunSide};

pub use crate::config::FindingAction as Action;

/// One finding, as stored and as the event's `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Finding {
    /// `audit/<kind>/<promise id>/<run id>`: the same disagreement always
    /// has the same id.
    pub id: String,
    pub kind: FindingKind,
    pub workspace: String,
    /// The promise the run names (or the pending promise, for `lost`).
    pub promise_id: String,
    /// What disagrees, in one sentence.
    pub reason: String,
    /// The promise as the store has it; null when there is none.
    pub promise: Option<PromiseSide>,
    /// The run as Databricks reports it.
    pub run: RunSide,
    /// What was done: `report`, `cancel` (the run) or `settle` (the promise).
    pub action: Action,
    /// When an audit first saw it (RFC 3339, UTC).
    #[schemars(extend("format" = "date-time"))]
    pub first_seen: String,
    /// When an audit last saw it.
    #[schemars(extend("format" = "date-time"))]
    pub last_seen: String,
    /// Its event was confirmed by the broker (kept records only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    #[schemars(skip)]
    pub published: bool,
}

pub fn finding_id(kind: FindingKind, promise_id: &str, run_id: u64) -> String {
    format!("audit/{kind}/{promise_id}/{run_id}")
}

pub fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The finding event as it travels. Its JSON Schema
/// (`docs/schemas/finding-event.schema.json`, `runbridge schema
/// finding-event`) is derived from this struct.
#[derive(Serialize, JsonSchema)]
#[schemars(
    title = "runbridge audit finding event",
    description = "Published to the events exchange with routing key audit.<kind>, as application/cloudevents+json, once per finding (a later audit that sees it again publishes nothing). The AMQP message_id equals `id`."
)]
pub struct FindingCloudEvent {
    #[schemars(extend("const" = "1.0"))]
    pub specversion: String,
    /// The finding's id: `audit/<kind>/<promise id>/<run id>`.
    pub id: String,
    #[schemars(extend("const" = "io.runbridge.audit.finding"))]
    #[serde(rename = "type")]
    pub kind: String,
    /// `runbridge/<workspace>`.
    pub source: String,
    /// The promise id.
    pub subject: String,
    /// When the audit first saw it.
    #[schemars(extend("format" = "date-time"))]
    pub time: String,
    #[schemars(extend("const" = "application/json"))]
    pub datacontenttype: String,
    pub data: Finding,
}

pub const EVENT_TYPE: &str = "io.runbridge.audit.finding";

/// The event of a finding: routing key and body.
pub fn event(f: &Finding) -> (String, Vec<u8>) {
    let mut data = f.clone();
    data.published = false;
    let e = FindingCloudEvent {
        specversion: "1.0".into(),
        id: f.id.clone(),
        kind: EVENT_TYPE.into(),
        source: format!("runbridge/{}", f.workspace),
        subject: f.promise_id.clone(),
        time: f.first_seen.clone(),
        datacontenttype: "application/json".into(),
        data,
    };
    (
        format!("audit.{}", f.kind),
        serde_json::to_vec(&e).unwrap_or_default(),
    )
}
