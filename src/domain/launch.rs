//! What one run asks Databricks for (`job_id` with its parameters, or a
//! `runs/submit` body), parsed the same way for a trigger and for each
//! child of a parent, and the error that refuses either. Below `trigger`
//! and `fanout`, which both parse launches.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde_json::{Map, Value};

use super::ids::IdError;

/// What to ask Databricks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Launch {
    /// `jobs/run-now`. Parameters go where the producer put them; with neither
    /// given they go to `job_parameters` (Jobs API 2.2's default).
    RunNow { job_id: u64, params: Parameters },
    /// `jobs/runs/submit` with the producer's body.
    Submit { body: Map<String, Value> },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Parameters {
    Job(BTreeMap<String, String>),
    Notebook(BTreeMap<String, String>),
}

impl Launch {
    pub fn job_id(&self) -> Option<u64> {
        match self {
            Launch::RunNow { job_id, .. } => Some(*job_id),
            Launch::Submit { .. } => None,
        }
    }
}

/// Why a trigger was refused; its `Display` is the `x-runbridge-error` header.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TriggerError {
    #[error("body is not valid UTF-8 JSON: {0}")]
    Json(String),
    #[error("schema: {0}")]
    Schema(String),
    #[error("missing id: set \"id\" in the body or the AMQP message_id")]
    MissingId,
    #[error("invalid id: {0}")]
    Id(#[from] IdError),
    #[error("exactly one of \"job_id\", \"submit\" or \"children\" is required, {0}")]
    LaunchChoice(&'static str),
    #[error("{0}")]
    Invalid(String),
}

/// A run parameter's value as the schema states it (the parser turns each
/// into a string).
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)] // only describes; parsing goes through `param_map`
pub(super) enum ParamValue {
    String(String),
    Number(f64),
    Boolean(bool),
}

pub(super) fn param_map(
    name: &str,
    m: Map<String, Value>,
) -> Result<BTreeMap<String, String>, TriggerError> {
    m.into_iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s,
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => {
                    return Err(TriggerError::Invalid(format!(
                        "{name}.{k} must be a string, number or boolean, got {}",
                        kind(&other)
                    )));
                }
            };
            Ok((k, v))
        })
        .collect()
}

pub(super) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The launch of one run: `job_id` with its parameters, or a `submit`
/// body (a trigger's, or a child's).
pub(super) fn parse_launch(
    job_id: Option<Value>,
    job_parameters: Option<Map<String, Value>>,
    notebook_params: Option<Map<String, Value>>,
    submit: Option<Value>,
) -> Result<Launch, TriggerError> {
    match (job_id, submit) {
        (Some(_), Some(_)) => Err(TriggerError::LaunchChoice("both were given")),
        (None, None) => Err(TriggerError::LaunchChoice("neither was given")),
        (Some(job_id), None) => {
            let job_id = job_id
                .as_u64()
                .filter(|n| *n > 0)
                .ok_or_else(|| TriggerError::Invalid("job_id must be a positive integer".into()))?;
            let params = match (job_parameters, notebook_params) {
                (Some(_), Some(_)) => {
                    return Err(TriggerError::Invalid(
                        "give job_parameters or notebook_params, not both".into(),
                    ));
                }
                (Some(p), None) => Parameters::Job(param_map("job_parameters", p)?),
                (None, Some(p)) => Parameters::Notebook(param_map("notebook_params", p)?),
                (None, None) => Parameters::Job(BTreeMap::new()),
            };
            Ok(Launch::RunNow { job_id, params })
        }
        (None, Some(submit)) => {
            if job_parameters.is_some() || notebook_params.is_some() {
                return Err(TriggerError::Invalid(
                    "job_parameters/notebook_params go with job_id; put a submit run's parameters in its tasks".into(),
                ));
            }
            match submit {
                Value::Object(body) => Ok(Launch::Submit { body }),
                other => Err(TriggerError::Invalid(format!(
                    "submit must be a runs/submit body (an object), got {}",
                    kind(&other)
                ))),
            }
        }
    }
}

/// Tags as the contract limits them (a trigger's, or a child's).
pub(super) fn check_tags(tags: &BTreeMap<String, String>) -> Result<(), TriggerError> {
    super::tags::check_tags(tags).map_err(|e| TriggerError::Invalid(e.to_string()))
}

/// A workspace name as the contract limits it.
pub(super) fn check_workspace(ws: Option<&str>) -> Result<(), TriggerError> {
    match ws {
        Some(ws) if ws.is_empty() || ws.len() > 64 => Err(TriggerError::Invalid(
            "workspace must be 1-64 characters".into(),
        )),
        _ => Ok(()),
    }
}
