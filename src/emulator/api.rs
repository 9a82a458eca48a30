//! The emulator's HTTP surface: Jobs API 2.2 routes plus `/emulator/*` for
//! tests (faults, scripted faults, the full run table).

// Handlers return a finished error `Response` through `?`-style helpers; its
// size does not matter for an emulator.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::model::{Emulator, Faults, Injected, Job, Outcome, Run, now_ms};

type Emu = State<Arc<Emulator>>;

/// A Databricks error response: `{"error_code", "message"}`.
fn err(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error_code": code, "message": message.into()})),
    )
        .into_response()
}

fn invalid(message: impl Into<String>) -> Response {
    err(StatusCode::BAD_REQUEST, "INVALID_PARAMETER_VALUE", message)
}

pub fn router(emu: Arc<Emulator>) -> Router {
    Router::new()
        .route("/api/{version}/jobs/create", post(create_job))
        .route("/api/{version}/jobs/get", get(get_job))
        .route("/api/{version}/jobs/run-now", post(run_now))
        .route("/api/{version}/jobs/runs/submit", post(submit))
        .route("/api/{version}/jobs/runs/get", get(get_run))
        .route("/api/{version}/jobs/runs/get-output", get(get_output))
        .route("/api/{version}/jobs/runs/cancel", post(cancel))
        .route("/api/{version}/jobs/runs/list", get(list_runs))
        .route("/oidc/v1/token", post(oauth_token))
        .route("/emulator/faults", get(get_faults).post(set_faults))
        .route("/emulator/inject", post(inject))
        .route("/emulator/notifications", post(set_notify))
        .route("/emulator/runs", get(all_runs))
        .route("/emulator/stats", get(stats))
        .route("/emulator/calls", get(call_log))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .fallback(|| async {
            err(
                StatusCode::NOT_FOUND,
                "ENDPOINT_NOT_FOUND",
                "No API found for this path",
            )
        })
        .with_state(emu)
}

/// Version check, auth, then faults; `Err` is the response to send instead.
async fn gate(
    emu: &Emulator,
    version: &str,
    headers: &HeaderMap,
    endpoint: &str,
) -> Result<Option<Injected>, Response> {
    if version != "2.2" && version != "2.1" {
        return Err(err(
            StatusCode::NOT_FOUND,
            "ENDPOINT_NOT_FOUND",
            format!("No API found for 'api/{version}/jobs'"),
        ));
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // An OAuth access token the emulator issued: good until it expires.
    let oauth = bearer.and_then(|t| emu.lock().oauth_tokens.get(t).copied());
    if let Some(expires) = oauth
        && now_ms() >= expires
    {
        emu.lock().oauth_expired_refused += 1;
        return Err(err(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "Token expired. Please obtain a new token.",
        ));
    }
    let ok = oauth.is_some()
        || match (&emu.settings.token, bearer) {
            (_, None) => false,
            // With OAuth configured, only its tokens (or the PAT) pass.
            (None, Some(t)) => !t.is_empty() && emu.settings.oauth.is_none(),
            (Some(want), Some(t)) => want == t,
        };
    if !ok {
        return Err(err(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "Credential was not sent or was of an unsupported type for this API.",
        ));
    }
    match emu.fault_for(endpoint) {
        Some(Injected::TooManyRequests) => {
            let after = emu.faults().retry_after_s.max(1);
            let mut r = err(
                StatusCode::TOO_MANY_REQUESTS,
                "REQUEST_LIMIT_EXCEEDED",
                format!("Too many requests to {endpoint}. Please retry after {after} seconds."),
            );
            if let Ok(v) = after.to_string().parse() {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            Err(r)
        }
        Some(Injected::Unavailable) => Err(err(
            StatusCode::SERVICE_UNAVAILABLE,
            "TEMPORARILY_UNAVAILABLE",
            "The service is temporarily unavailable. Please retry.",
        )),
        Some(Injected::Slow) => {
            let ms = match emu.faults().slow_ms {
                0 => 3000,
                n => n,
            };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(None)
        }
        other => Ok(other),
    }
}

fn parse_body(body: &Bytes) -> Result<Map<String, Value>, Response> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(err(
            StatusCode::BAD_REQUEST,
            "MALFORMED_REQUEST",
            "Request body must be a JSON object",
        )),
        Err(e) => Err(err(
            StatusCode::BAD_REQUEST,
            "MALFORMED_REQUEST",
            format!("Could not parse request object: {e}"),
        )),
    }
}

fn string_map(v: Option<&Value>, name: &str) -> Result<Option<BTreeMap<String, String>>, Response> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                other => Ok((k.clone(), other.to_string())),
            })
            .collect::<Result<_, Response>>()
            .map(Some),
        Some(_) => Err(invalid(format!("{name} must be a map of strings"))),
    }
}

fn check_token(m: &Map<String, Value>) -> Result<Option<String>, Response> {
    match m.get("idempotency_token") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(t)) if t.len() <= 64 => Ok(Some(t.clone())),
        Some(Value::String(t)) => Err(invalid(format!(
            "Idempotency token {t} exceeds the maximum length of 64 characters"
        ))),
        Some(_) => Err(invalid("idempotency_token must be a string")),
    }
}

/// Creates the run, or finds the one with this token. Returns (run_id, new).
fn launch(
    emu: &Arc<Emulator>,
    token: Option<String>,
    make: impl FnOnce(u64) -> Run,
) -> (u64, bool) {
    let mut inner = emu.lock();
    if let Some(t) = &token
        && let Some(id) = inner.tokens.get(t)
    {
        return (*id, false);
    }
    // Each run has one task whose task run id is the next id (as in Jobs API
    // 2.1+, where get-output is asked of the task run): reserve both.
    inner.next_run_id += 2;
    let id = inner.next_run_id - 1;
    let run = make(id);
    inner.runs.insert(id, run);
    if let Some(t) = token {
        inner.tokens.insert(t, id);
    }
    (id, true)
}

async fn after_launch(
    emu: &Arc<Emulator>,
    run_id: u64,
    created: bool,
    fault: Option<Injected>,
) -> Option<Response> {
    // The run lives on its own task from the moment it exists: like a real
    // Databricks run, it does not depend on the caller waiting for the answer
    // (a client that gives up or dies must not leave it PENDING forever).
    let early_done = created.then(|| {
        let early = emu
            .lock()
            .runs
            .get(&run_id)
            .is_some_and(|r| r.behaviour.outcome == Outcome::EarlyCallback);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let emu = emu.clone();
        tokio::spawn(async move {
            if early {
                // The notebook calls back before the bridge hears the run id.
                emu.call_back(run_id, "resolve").await;
            }
            let _ = tx.send(());
            emu.execute(run_id, early).await;
        });
        rx
    });
    let latency = emu.faults().launch_latency_ms;
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if let Some(rx) = early_done {
        let _ = rx.await;
    }
    if fault == Some(Injected::UnavailableAfterCommit) {
        return Some(err(
            StatusCode::SERVICE_UNAVAILABLE,
            "TEMPORARILY_UNAVAILABLE",
            "The service is temporarily unavailable. Please retry.",
        ));
    }
    None
}

fn traceparent_of(h: &HeaderMap) -> Option<String> {
    h.get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn new_run(
    id: u64,
    job_id: Option<u64>,
    name: String,
    run_type: &'static str,
    token: Option<String>,
) -> Run {
    Run {
        run_id: id,
        job_id,
        run_name: name,
        run_type,
        idempotency_token: token,
        life_cycle_state: "PENDING",
        result_state: None,
        state_message: String::new(),
        start_time: now_ms(),
        end_time: 0,
        params: BTreeMap::new(),
        job_parameters: None,
        notebook_params: None,
        exit_value: None,
        callbacks_sent: 0,
        callback_statuses: Vec::new(),
        attempt_number: 0,
        traceparent: None,
        behaviour: Default::default(),
    }
}

/// Counts a launch request in flight for as long as it lives.
struct InFlight(Arc<Emulator>);

impl InFlight {
    fn new(emu: &Arc<Emulator>) -> Self {
        let mut inner = emu.lock();
        inner.launches_in_flight += 1;
        inner.max_launches_in_flight = inner.max_launches_in_flight.max(inner.launches_in_flight);
        Self(emu.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().launches_in_flight -= 1;
    }
}

async fn run_now(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _in_flight = InFlight::new(&emu);
    let fault = match gate(&emu, &version, &headers, "jobs/run-now").await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let m = match parse_body(&body) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let Some(job_id) = m.get("job_id").and_then(Value::as_u64) else {
        return invalid("Missing required field: job_id");
    };
    let token = match check_token(&m) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let (jp, np) = match (
        string_map(m.get("job_parameters"), "job_parameters"),
        string_map(m.get("notebook_params"), "notebook_params"),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    if jp.is_some() && np.is_some() {
        return invalid("job_parameters cannot be used together with notebook_params");
    }
    let Some(job) = emu.lock().jobs.get(&job_id).cloned() else {
        return err(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!("Job {job_id} does not exist."),
        );
    };
    let name = job
        .settings
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("job")
        .to_owned();
    let (run_id, created) = launch(&emu, token.clone(), |id| {
        let mut r = new_run(id, Some(job_id), name, "JOB_RUN", token);
        r.params = jp.clone().or(np.clone()).unwrap_or_default();
        r.job_parameters = jp;
        r.notebook_params = np;
        r.behaviour = job.behaviour.clone();
        r.traceparent = traceparent_of(&headers);
        r
    });
    if let Some(r) = after_launch(&emu, run_id, created, fault).await {
        return r;
    }
    Json(json!({"run_id": run_id, "number_in_job": run_id})).into_response()
}

async fn submit(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _in_flight = InFlight::new(&emu);
    let fault = match gate(&emu, &version, &headers, "jobs/runs/submit").await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let m = match parse_body(&body) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let token = match check_token(&m) {
        Ok(t) => t,
        Err(r) => return r,
    };
    // Parameters of the first notebook task (or a legacy top-level notebook_task).
    let tasks: Vec<Value> = m
        .get("tasks")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if tasks.is_empty() && !m.contains_key("notebook_task") {
        return invalid("At least one task is required");
    }
    let params = tasks
        .iter()
        .chain(std::iter::once(&Value::Object(m.clone())))
        .find_map(|t| t.get("notebook_task")?.get("base_parameters").cloned());
    let params = match string_map(params.as_ref(), "base_parameters") {
        Ok(p) => p.unwrap_or_default(),
        Err(r) => return r,
    };
    let behaviour = emu.behaviour_of_job(&Value::Object(m.clone()));
    let name = m
        .get("run_name")
        .and_then(Value::as_str)
        .unwrap_or("Untitled")
        .to_owned();
    let (run_id, created) = launch(&emu, token.clone(), |id| {
        let mut r = new_run(id, None, name, "SUBMIT_RUN", token);
        r.params = params;
        r.behaviour = behaviour;
        r
    });
    if let Some(r) = after_launch(&emu, run_id, created, fault).await {
        return r;
    }
    Json(json!({"run_id": run_id})).into_response()
}

fn run_json(emu: &Emulator, r: &Run) -> Value {
    let base = emu.base_url.lock().map(|b| b.clone()).unwrap_or_default();
    let (code, kind) = match r.result_state {
        Some("SUCCESS") => ("SUCCESS", "SUCCESS"),
        Some("FAILED") => ("RUN_EXECUTION_ERROR", "CLIENT_ERROR"),
        Some("CANCELED") => ("USER_CANCELED", "SUCCESS"),
        _ => ("", ""),
    };
    let mut v = json!({
        "job_id": r.job_id,
        "run_id": r.run_id,
        "number_in_job": r.run_id,
        "original_attempt_run_id": r.run_id,
                "attempt_number": r.attempt_number,
        "creator_user_name": "emulator@runbridge.local",
        "run_name": r.run_name,
        "run_type": r.run_type,
        "state": {
            "life_cycle_state": r.life_cycle_state,
            "state_message": r.state_message,
            "user_cancelled_or_timedout": r.result_state == Some("CANCELED"),
        },
        "status": { "state": r.life_cycle_state },
        "start_time": r.start_time,
        "end_time": r.end_time,
        "setup_duration": 0,
        "execution_duration": if r.end_time > 0 { r.end_time - r.start_time } else { 0 },
        "cleanup_duration": 0,
        "run_page_url": format!("{base}/#job/{}/run/{}", r.job_id.unwrap_or(0), r.run_id),
        "tasks": [{ "task_key": "notebook", "run_id": r.run_id + 1, "state": { "life_cycle_state": r.life_cycle_state } }],
    });
    if let Some(rs) = r.result_state {
        v["state"]["result_state"] = json!(rs);
        v["status"]["termination_details"] =
            json!({"code": code, "type": kind, "message": r.state_message});
    }
    if let Some(jp) = &r.job_parameters {
        v["job_parameters"] = json!(
            jp.iter()
                .map(|(k, val)| json!({"name": k, "value": val}))
                .collect::<Vec<_>>()
        );
        v["overriding_parameters"] = json!({"job_parameters": jp});
    }
    if let Some(np) = &r.notebook_params {
        v["overriding_parameters"] = json!({"notebook_params": np});
    }
    v
}

#[derive(Deserialize)]
struct RunQuery {
    run_id: Option<u64>,
}

fn find_run(emu: &Emulator, q: &RunQuery) -> Result<Run, Response> {
    let Some(id) = q.run_id else {
        return Err(invalid("Missing required field: run_id"));
    };
    emu.lock().runs.get(&id).cloned().ok_or_else(|| {
        err(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!("Run {id} does not exist."),
        )
    })
}

async fn get_run(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    Query(q): Query<RunQuery>,
) -> Response {
    if let Err(r) = gate(&emu, &version, &headers, "jobs/runs/get").await {
        return r;
    }
    match find_run(&emu, &q) {
        Ok(run) => Json(run_json(&emu, &run)).into_response(),
        Err(r) => r,
    }
}

async fn get_output(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    Query(q): Query<RunQuery>,
) -> Response {
    if let Err(r) = gate(&emu, &version, &headers, "jobs/runs/get-output").await {
        return r;
    }
    // The task run id (parent + 1) or the single-task parent itself.
    let parent = q.run_id.map(|id| {
        let inner = emu.lock();
        if inner.runs.contains_key(&id) {
            id
        } else {
            id.saturating_sub(1)
        }
    });
    match find_run(&emu, &RunQuery { run_id: parent }) {
        Ok(run) => {
            let mut v = json!({ "metadata": run_json(&emu, &run), "notebook_output": {} });
            if let Some(x) = &run.exit_value {
                v["notebook_output"] = json!({"result": x, "truncated": false});
            }
            if run.result_state == Some("FAILED") {
                v["error"] = json!(run.state_message);
            }
            Json(v).into_response()
        }
        Err(r) => r,
    }
}

async fn cancel(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = gate(&emu, &version, &headers, "jobs/runs/cancel").await {
        return r;
    }
    let m = match parse_body(&body) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let q = RunQuery {
        run_id: m.get("run_id").and_then(Value::as_u64),
    };
    let run = match find_run(&emu, &q) {
        Ok(r) => r,
        Err(r) => return r,
    };
    if run.life_cycle_state != "TERMINATED" {
        emu.set_state(
            run.run_id,
            "TERMINATING",
            None,
            "Run cancellation requested.",
        );
        let emu2 = emu.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            emu2.set_state(run.run_id, "TERMINATED", Some("CANCELED"), "Run cancelled.");
        });
    }
    Json(json!({})).into_response()
}

#[derive(Deserialize)]
struct ListQuery {
    job_id: Option<u64>,
    active_only: Option<bool>,
    completed_only: Option<bool>,
    offset: Option<usize>,
    limit: Option<usize>,
}

async fn list_runs(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Err(r) = gate(&emu, &version, &headers, "jobs/runs/list").await {
        return r;
    }
    if q.active_only == Some(true) && q.completed_only == Some(true) {
        return invalid("active_only and completed_only cannot both be true");
    }
    let limit = q.limit.unwrap_or(25);
    if !(1..=25).contains(&limit) {
        return invalid("limit must be between 1 and 25");
    }
    let offset = q.offset.unwrap_or(0);
    let inner = emu.lock();
    let matching: Vec<&Run> = inner
        .runs
        .values()
        .rev()
        .filter(|r| q.job_id.is_none_or(|j| r.job_id == Some(j)))
        .filter(|r| q.active_only != Some(true) || r.life_cycle_state != "TERMINATED")
        .filter(|r| q.completed_only != Some(true) || r.life_cycle_state == "TERMINATED")
        .collect();
    let page: Vec<Value> = matching
        .iter()
        .skip(offset)
        .take(limit)
        .map(|r| run_json(&emu, r))
        .collect();
    let has_more = matching.len() > offset + limit;
    let mut v = json!({ "has_more": has_more });
    if !page.is_empty() {
        v["runs"] = json!(page);
    }
    Json(v).into_response()
}

async fn create_job(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = gate(&emu, &version, &headers, "jobs/create").await {
        return r;
    }
    let m = match parse_body(&body) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let settings = Value::Object(m);
    let behaviour = emu.behaviour_of_job(&settings);
    let mut inner = emu.lock();
    inner.next_job_id += 1;
    let job_id = inner.next_job_id;
    inner.jobs.insert(
        job_id,
        Job {
            job_id,
            settings,
            created_time: now_ms(),
            behaviour,
        },
    );
    Json(json!({"job_id": job_id})).into_response()
}

#[derive(Deserialize)]
struct JobQuery {
    job_id: Option<u64>,
}

async fn get_job(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    Query(q): Query<JobQuery>,
) -> Response {
    if let Err(r) = gate(&emu, &version, &headers, "jobs/get").await {
        return r;
    }
    let Some(id) = q.job_id else {
        return invalid("Missing required field: job_id");
    };
    match emu.lock().jobs.get(&id) {
        Some(j) => Json(json!({
            "job_id": j.job_id,
            "creator_user_name": "emulator@runbridge.local",
            "settings": j.settings,
            "created_time": j.created_time,
        }))
        .into_response(),
        None => err(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!("Job {id} does not exist."),
        ),
    }
}

async fn get_faults(State(emu): Emu) -> Response {
    Json(emu.faults()).into_response()
}

async fn set_faults(State(emu): Emu, Json(f): Json<Faults>) -> Response {
    emu.set_faults(f.clone());
    Json(f).into_response()
}

#[derive(Deserialize)]
struct Inject {
    /// e.g. `jobs/run-now`
    endpoint: String,
    faults: Vec<Injected>,
}

async fn inject(State(emu): Emu, Json(i): Json<Inject>) -> Response {
    let mut inner = emu.lock();
    let q = inner.inject.entry(i.endpoint).or_insert_with(VecDeque::new);
    q.extend(i.faults);
    Json(json!({"queued": q.len()})).into_response()
}

async fn set_notify(State(emu): Emu, Json(t): Json<super::model::NotifyTarget>) -> Response {
    if let Ok(mut n) = emu.notify.lock() {
        *n = Some(t);
    }
    Json(json!({"ok": true})).into_response()
}

/// Every API request with its arrival time (ms) and the fault it got.
async fn call_log(State(emu): Emu) -> Response {
    let inner = emu.lock();
    let calls: Vec<Value> = inner
        .call_log
        .iter()
        .map(|(e, t, f)| json!({"endpoint": e, "at": t, "fault": f}))
        .collect();
    Json(json!({ "calls": calls })).into_response()
}

async fn all_runs(State(emu): Emu) -> Response {
    let inner = emu.lock();
    Json(json!({ "runs": inner.runs.values().collect::<Vec<_>>() })).into_response()
}

/// The workspace's OAuth token endpoint (client-credentials grant, client
/// authenticated with HTTP Basic), as Databricks serves it for service
/// principals. Errors as OAuth 2.0 (RFC 6749 §5.2) bodies.
async fn oauth_token(State(emu): Emu, headers: HeaderMap, body: Bytes) -> Response {
    let oauth_err = |status: StatusCode, error: &str, description: &str| {
        (
            status,
            Json(json!({"error": error, "error_description": description})),
        )
            .into_response()
    };
    let Some(client) = emu.settings.oauth.clone() else {
        return oauth_err(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            "No OAuth client is configured for this workspace",
        );
    };
    let form: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(&body).into_owned().collect();
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok());
    let (id, secret) = match basic.as_deref().and_then(|s| s.split_once(':')) {
        Some((i, s)) => (i.to_owned(), s.to_owned()),
        None => (
            form.get("client_id").cloned().unwrap_or_default(),
            form.get("client_secret").cloned().unwrap_or_default(),
        ),
    };
    if id != client.client_id || secret != client.client_secret {
        return oauth_err(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Client authentication failed",
        );
    }
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return oauth_err(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "Only client_credentials is supported",
        );
    }
    let ttl = client.token_ttl;
    let token = {
        let mut inner = emu.lock();
        let token = format!("emu-oauth-{}", inner.oauth_tokens.len() + 1);
        inner
            .oauth_tokens
            .insert(token.clone(), now_ms() + ttl.as_millis() as i64);
        token
    };
    Json(json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": ttl.as_secs(),
        "scope": form.get("scope").cloned().unwrap_or_else(|| "all-apis".into()),
    }))
    .into_response()
}

async fn stats(State(emu): Emu) -> Response {
    let inner = emu.lock();
    Json(json!({
        "oauth_tokens_issued": inner.oauth_tokens.len(),
        "oauth_expired_refused": inner.oauth_expired_refused,
        "calls": inner.calls,
        "runs": inner.runs.len(),
        "jobs": inner.jobs.len(),
        "max_launches_in_flight": inner.max_launches_in_flight,
    }))
    .into_response()
}
