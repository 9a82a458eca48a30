//! Completion events (DESIGN.md §5): a CloudEvents 1.0 structured JSON event
//! built from a settled promise.
//!
//! The event is a pure function of the settled record, so the relay, a
//! redelivered trigger's `reply_to` copy and a retried publish all produce the
//! same bytes with the same `id` (`<promise id>/<STATE>`), and consumers can
//! deduplicate on it.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

use super::ids::RunId;
use super::promise::{Promise, State};

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
        let event = json!({
            "specversion": "1.0",
            "id": id,
            "type": format!("io.runbridge.promise.{}", p.state.as_str().to_ascii_lowercase()),
            "source": format!("runbridge/{}", p.workspace),
            "subject": p.id.as_str(),
            "time": settled_at,
            "datacontenttype": "application/json",
            "data": {
                "promise_id": p.id.as_str(),
                "state": p.state,
                "value": value,
                "error": error,
                "run_id": p.run_id.map(RunId::get),
                "job_id": p.job_id,
                "run_page_url": p.run_page_url,
                "tags": p.tags,
                "created_at": rfc3339(p.created_on),
                "settled_at": settled_at,
                "settled_by": p.settled_by,
            }
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::PromiseId;
    use crate::domain::promise::Payload;
    use std::collections::BTreeMap;

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
