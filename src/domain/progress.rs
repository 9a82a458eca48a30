//! A notebook's progress update (docs/contracts.md, progress), parsed once
//! at the edge: `POST {url}/progress?id=..` with a small JSON body.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The largest update body accepted.
pub const MAX_PROGRESS_BYTES: usize = 4096;
const MAX_STAGE: usize = 200;
const MAX_MESSAGE: usize = 1000;
const MAX_METRICS: usize = 32;
const MAX_METRIC_NAME: usize = 64;

/// What a notebook sends. Every field is optional; an empty body is a
/// heartbeat that says nothing new.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "runbridge progress update")]
pub struct ProgressMessage {
    /// How far the run is, 0 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub percent: Option<f64>,
    /// What it is doing (at most 200 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 200))]
    pub stage: Option<String>,
    /// Free text (at most 1,000 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1000))]
    pub message: Option<String>,
    /// Named numbers (at most 32; names 1-64 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<BTreeMap<String, f64>>,
}

/// A checked update, as JSON object members (without the braces) for the
/// store to add its number and time to.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressUpdate(String);

impl ProgressUpdate {
    /// Parses an update body (empty: an empty update); the error says why
    /// it was refused.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        if body.len() > MAX_PROGRESS_BYTES {
            return Err(format!(
                "a progress update is at most {MAX_PROGRESS_BYTES} bytes, got {}",
                body.len()
            ));
        }
        let m: ProgressMessage = if body.iter().all(u8::is_ascii_whitespace) {
            ProgressMessage::default()
        } else {
            let v: serde_json::Value =
                serde_json::from_slice(body).map_err(|e| format!("not a progress update: {e}"))?;
            if !v.is_object() {
                return Err("not a progress update: the body must be a JSON object".into());
            }
            serde_json::from_value(v).map_err(|e| format!("not a progress update: {e}"))?
        };
        if let Some(p) = m.percent
            && !(0.0..=100.0).contains(&p)
        {
            return Err("percent must be between 0 and 100".into());
        }
        if m.stage
            .as_ref()
            .is_some_and(|s| s.chars().count() > MAX_STAGE)
        {
            return Err(format!("stage is at most {MAX_STAGE} characters"));
        }
        if m.message
            .as_ref()
            .is_some_and(|s| s.chars().count() > MAX_MESSAGE)
        {
            return Err(format!("message is at most {MAX_MESSAGE} characters"));
        }
        if let Some(metrics) = &m.metrics {
            if metrics.len() > MAX_METRICS {
                return Err(format!("at most {MAX_METRICS} metrics"));
            }
            if let Some((k, _)) = metrics.iter().find(|(k, v)| {
                k.is_empty() || k.chars().count() > MAX_METRIC_NAME || !v.is_finite()
            }) {
                return Err(format!(
                    "metric {k:?}: names are 1-{MAX_METRIC_NAME} characters, values finite numbers"
                ));
            }
        }
        let object = serde_json::to_string(&m).map_err(|e| e.to_string())?;
        Ok(Self(object[1..object.len() - 1].to_owned()))
    }

    /// The members, e.g. `"percent":50.0,"stage":"load"` (may be empty).
    pub fn members(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_parse_to_members() {
        let u =
            ProgressUpdate::parse(br#"{"percent": 50, "stage": "load", "metrics": {"rows": 10}}"#)
                .unwrap();
        let v: serde_json::Value = serde_json::from_str(&format!("{{{}}}", u.members())).unwrap();
        assert_eq!(v["percent"], 50.0);
        assert_eq!(v["metrics"]["rows"], 10.0);
        assert_eq!(ProgressUpdate::parse(b"").unwrap().members(), "");
        assert_eq!(ProgressUpdate::parse(b"{}").unwrap().members(), "");
    }

    #[test]
    fn bad_updates_are_refused_with_a_reason() {
        for (body, why) in [
            (r#"{"percent": 101}"#.to_string(), "percent"),
            (
                r#"{"percent": "half"}"#.to_string(),
                "not a progress update",
            ),
            (r#"{"eta": 5}"#.to_string(), "not a progress update"),
            (format!(r#"{{"stage": "{}"}}"#, "x".repeat(201)), "stage"),
            (r#"{"metrics": {"": 1}}"#.to_string(), "metric"),
            ("[1]".to_string(), "not a progress update"),
            (
                format!(r#"{{"message": "{}"}}"#, "x".repeat(5000)),
                "at most 4096 bytes",
            ),
        ] {
            let e = ProgressUpdate::parse(body.as_bytes()).unwrap_err();
            assert!(e.contains(why), "{body}: {e}");
        }
    }
}
