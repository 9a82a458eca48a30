//! What every handler shares below the routes: error answers, and a
//! request's fields read as Databricks reads them.
//!
//! Databricks' REST API is defined in protobuf and read by its JSON mapping
//! (the Jobs API reference lists `job_id` and `run_id` as int64), so:
//! - an int64 may arrive as a JSON number or as a decimal string;
//! - a field sent as `null` is a field not sent (a client that sends
//!   `"dbt_task": null` beside its `notebook_task` submits a notebook task);
//! - a GET takes its fields from the query string and, as Airflow's
//!   Databricks provider sends them from its deferrable operators and
//!   trigger (`_a_do_api_call`), from a JSON body; booleans in a query
//!   string come as `true`/`false` in any case (Python's `requests` writes
//!   `True`).

// Handlers return a finished error `Response` through `?`-style helpers; its
// size does not matter for an emulator.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::model::{Emulator, Run};

pub type Emu = State<Arc<Emulator>>;

/// Jobs API 2.2 pages a run's `tasks` (and a job's) this many at a time.
pub const PAGE: usize = 100;

/// A Databricks error response: `{"error_code", "message"}`.
pub fn err(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error_code": code, "message": message.into()})),
    )
        .into_response()
}

pub fn invalid(message: impl Into<String>) -> Response {
    err(StatusCode::BAD_REQUEST, "INVALID_PARAMETER_VALUE", message)
}

fn malformed(message: impl Into<String>) -> Response {
    err(StatusCode::BAD_REQUEST, "MALFORMED_REQUEST", message)
}

/// A handler's answer: its JSON, or the error it met.
pub fn reply(r: Result<Value, Response>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(r) => r,
    }
}

/// A request's fields, `null`s dropped.
#[derive(Debug, Default)]
pub struct Params(Map<String, Value>);

impl Params {
    /// A POST: its JSON body (an empty body is no fields).
    pub fn post(body: &Bytes) -> Result<Self, Response> {
        Self::body(body).map(Self::without_nulls)
    }

    /// A GET: its query string, then the fields of a JSON body if it has one.
    pub fn get(query: Option<&str>, body: &Bytes) -> Result<Self, Response> {
        let mut m: Map<String, Value> = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
            .collect();
        m.extend(Self::body(body)?);
        Ok(Self::without_nulls(m))
    }

    fn body(body: &Bytes) -> Result<Map<String, Value>, Response> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Map::new());
        }
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err(malformed("Request body must be a JSON object")),
            Err(e) => Err(malformed(format!("Could not parse request object: {e}"))),
        }
    }

    fn without_nulls(m: Map<String, Value>) -> Self {
        Self(drop_nulls(m))
    }

    /// The fields as an object (a job's settings, a submitted run).
    pub fn into_object(self) -> Map<String, Value> {
        self.0
    }

    pub fn value(&self, name: &str) -> Option<&Value> {
        self.0.get(name)
    }

    /// An int64 field: a JSON number or a decimal string.
    pub fn int(&self, name: &str) -> Result<Option<u64>, Response> {
        int_of(self.0.get(name), name)
    }

    /// An int64 field the request cannot go without.
    pub fn required_int(&self, name: &str) -> Result<u64, Response> {
        self.int(name)?
            .ok_or_else(|| invalid(format!("Missing required field: {name}")))
    }

    /// A bool field: JSON `true`/`false`, or the words in any case.
    pub fn flag(&self, name: &str) -> Result<Option<bool>, Response> {
        match self.0.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(other) => Err(invalid(format!(
                "Invalid value for {name}: {other} is not a boolean"
            ))),
        }
    }

    pub fn text(&self, name: &str) -> Result<Option<&str>, Response> {
        match self.0.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(invalid(format!(
                "Invalid value for {name}: {other} is not a string"
            ))),
        }
    }

    /// A `map<string, string>` field (`job_parameters`, `notebook_params`);
    /// an empty map is none.
    pub fn string_map(&self, name: &str) -> Result<Option<BTreeMap<String, String>>, Response> {
        string_map(self.0.get(name), name).map(|m| m.filter(|m| !m.is_empty()))
    }

    /// Where a list's page starts: its page token, else the deprecated
    /// `offset`, else the top.
    pub fn offset(&self) -> Result<usize, Response> {
        match self.page_token()? {
            Some(o) => Ok(o),
            None => Ok(self.int("offset")?.unwrap_or(0) as usize),
        }
    }

    /// A page token (the emulator's are offsets); an empty one is none.
    pub fn page_token(&self) -> Result<Option<usize>, Response> {
        match self.text("page_token")?.filter(|t| !t.is_empty()) {
            None => Ok(None),
            Some(t) => t
                .parse()
                .map(Some)
                .map_err(|_| invalid(format!("Invalid page token: {t}"))),
        }
    }
}

/// An object without its `null` fields, at any depth (a task's
/// `"dbt_task": null` is no dbt task).
fn drop_nulls(m: Map<String, Value>) -> Map<String, Value> {
    m.into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k, without_null_fields(v)))
        .collect()
}

fn without_null_fields(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(drop_nulls(m)),
        Value::Array(a) => Value::Array(a.into_iter().map(without_null_fields).collect()),
        other => other,
    }
}

pub fn int_of(v: Option<&Value>, name: &str) -> Result<Option<u64>, Response> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| invalid(format!("Invalid value for {name}: {n}"))),
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| invalid(format!("Invalid value for {name}: {s:?} is not an integer"))),
        Some(other) => Err(invalid(format!(
            "Invalid value for {name}: {other} is not an integer"
        ))),
    }
}

/// A `map<string, string>`; values of other JSON types are read as their
/// JSON text.
pub fn string_map(
    v: Option<&Value>,
    name: &str,
) -> Result<Option<BTreeMap<String, String>>, Response> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| match v {
                    Value::String(s) => (k.clone(), s.clone()),
                    other => (k.clone(), other.to_string()),
                })
                .collect(),
        )),
        Some(_) => Err(invalid(format!("{name} must be a map of strings"))),
    }
}

/// A run id Databricks does not know: 400 `INVALID_PARAMETER_VALUE` "Run N
/// does not exist." (the SDK's override "Job Runs
/// InvalidParameterValue=>ResourceDoesNotExist" matches exactly this).
pub fn unknown_run(id: u64) -> Response {
    invalid(format!("Run {id} does not exist."))
}

/// A job id Databricks does not know, as `jobs/get` answers it (400
/// `INVALID_PARAMETER_VALUE` "Job N does not exist.", which the SDK's
/// override "Jobs InvalidParameterValue=>ResourceDoesNotExist" reads).
pub fn unknown_job(id: u64) -> Response {
    invalid(format!("Job {id} does not exist."))
}

/// The run the request's `run_id` names.
pub fn find_run(emu: &Emulator, p: &Params) -> Result<Run, Response> {
    let id = p.required_int("run_id")?;
    emu.lock()
        .runs
        .get(&id)
        .cloned()
        .ok_or_else(|| unknown_run(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int64s_come_as_numbers_or_strings_and_nulls_are_absent() {
        let p = Params::post(&Bytes::from_static(
            br#"{"job_id": "42", "run_id": 7, "dbt_task": null, "bad": "x7",
                 "tasks": [{"task_key": "t", "dbt_task": null, "notebook_task": {"notebook_path": "/x", "source": null}}]}"#,
        ))
        .unwrap();
        assert_eq!(p.int("job_id").unwrap(), Some(42));
        assert_eq!(p.int("run_id").unwrap(), Some(7));
        assert!(p.value("dbt_task").is_none());
        assert_eq!(
            p.value("tasks").unwrap(),
            &serde_json::json!([{"task_key": "t", "notebook_task": {"notebook_path": "/x"}}])
        );
        assert!(p.int("bad").is_err());
        assert!(p.required_int("missing").is_err());
    }

    #[test]
    fn a_get_reads_its_query_then_its_json_body() {
        let p = Params::get(
            Some("run_id=5&include_history=True&active_only=false"),
            &Bytes::from_static(br#"{"run_id": 9}"#),
        )
        .unwrap();
        assert_eq!(p.int("run_id").unwrap(), Some(9));
        assert_eq!(p.flag("include_history").unwrap(), Some(true));
        assert_eq!(p.flag("active_only").unwrap(), Some(false));
        let empty = Params::get(Some("run_id=5"), &Bytes::new()).unwrap();
        assert_eq!(empty.int("run_id").unwrap(), Some(5));
        assert!(Params::get(None, &Bytes::from_static(b"[1]")).is_err());
    }
}
