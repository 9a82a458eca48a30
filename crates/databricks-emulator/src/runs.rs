//! The run routes: `jobs/run-now`, `jobs/runs/submit`, `jobs/runs/get`,
//! `jobs/runs/get-output`, `jobs/runs/cancel`, `jobs/runs/list`
//! (`jobs/runs/repair` is in `repair`). Each
//! behaviour modelled here, and its source, is listed in
//! `docs/databricks-fidelity.md`.

// Handlers return a finished error `Response` through `?`-style helpers; its
// size does not matter for an emulator.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::api::{Emu, err, gate, invalid, parse_body};
use super::model::{Emulator, Injected, Job, Outcome, Run, TaskRun, now_ms, task_kind};

/// Jobs API 2.2 pages a run's `tasks` (and a job's) this many at a time.
pub const PAGE: usize = 100;

/// A `page_token` (the emulator's are page numbers or offsets); an empty
/// one is none.
pub fn page_token(t: Option<&str>) -> Result<Option<usize>, Response> {
    match t.filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(t) => t
            .parse()
            .map(Some)
            .map_err(|_| invalid(format!("Invalid page token: {t}"))),
    }
}

/// What both launch routes start with: auth and faults, the JSON body, and
/// its idempotency token.
async fn launch_prelude(
    emu: &Emulator,
    version: &str,
    headers: &HeaderMap,
    endpoint: &str,
    body: &Bytes,
) -> Result<(Option<Injected>, Map<String, Value>, Option<String>), Response> {
    let fault = gate(emu, version, headers, endpoint).await?;
    let m = parse_body(body)?;
    let token = check_token(&m)?;
    Ok((fault, m, token))
}

pub(crate) fn string_map(
    v: Option<&Value>,
    name: &str,
) -> Result<Option<BTreeMap<String, String>>, Response> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(
            m.iter()
                .map(|(k, v)| match v {
                    Value::String(s) => (k.clone(), s.clone()),
                    other => (k.clone(), other.to_string()),
                })
                .collect(),
        )),
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

/// A new run: PENDING, or QUEUED / SKIPPED when its job is at its
/// `max_concurrent_runs` (queued with queueing on, skipped with it off).
fn admit(inner: &super::model::Inner, job: Option<&Job>, run: &mut Run) {
    let Some(job) = job else { return };
    let Some(max) = job.max_concurrent_runs() else {
        return;
    };
    let queued_ahead = inner.oldest_queued(job.job_id).is_some();
    if inner.active_runs(job.job_id) < max && !queued_ahead {
        return;
    }
    if job.queue_enabled() {
        run.life_cycle_state = "QUEUED";
        run.queue_reason = Some("MAX_CONCURRENT_RUNS_REACHED".into());
        run.state_message = format!("Queued due to reaching maximum concurrent runs of {max}.");
    } else {
        run.life_cycle_state = "SKIPPED";
        run.result_state = Some("MAXIMUM_CONCURRENT_RUNS_REACHED");
        run.state_message = format!(
            "Skipping this run because the limit of {max} maximum concurrent runs has been reached."
        );
        run.end_time = now_ms();
    }
}

/// Creates the run (with one run id per task), or finds the one with this
/// token. Returns (run_id, new).
fn launch(
    emu: &Arc<Emulator>,
    token: Option<String>,
    job: Option<&Job>,
    tasks: &[Value],
    make: impl FnOnce(u64) -> Run,
) -> (u64, bool) {
    let mut inner = emu.lock();
    if let Some(t) = &token
        && let Some(id) = inner.tokens.get(t)
    {
        return (*id, false);
    }
    let id = inner.next_run_id + 1;
    inner.next_run_id += 1 + tasks.len() as u64;
    let mut run = make(id);
    if let Some(promise) = run
        .params
        .get(&emu.settings.promise_param)
        .filter(|p| !p.is_empty())
    {
        let n = inner.runs_per_promise.entry(promise.clone()).or_default();
        run.earlier_runs = *n;
        *n += 1;
    }
    run.tasks = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| TaskRun {
            task_key: t
                .get("task_key")
                .and_then(Value::as_str)
                .unwrap_or("task")
                .to_owned(),
            run_id: id + 1 + i as u64,
            kind: task_kind(t),
            result_state: None,
            exit_value: None,
        })
        .collect();
    for t in &run.tasks {
        inner.task_parent.insert(t.run_id, id);
    }
    admit(&inner, job, &mut run);
    let (job_id, state) = (run.job_id, run.life_cycle_state);
    inner.runs.insert(id, run);
    inner.moved(job_id, id, None, state);
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
    let skipped = emu
        .lock()
        .runs
        .get(&run_id)
        .is_some_and(|r| r.life_cycle_state == "SKIPPED");
    let early_done = (created && !skipped).then(|| {
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
        tasks: Vec::new(),
        queue_reason: None,
        traceparent: None,
        earlier_runs: 0,
        original: None,
        repairs: Vec::new(),
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

/// What the run's notebook receives. A job with job parameters passes its
/// defaults overlaid with the run's values, under the names it defines
/// (an undefined name is accepted, as the Databricks CLI's test server
/// accepts it, but reaches no notebook); a job without passes its first
/// notebook task's `base_parameters` overlaid with `notebook_params`.
/// What a run's notebook sees: the job's parameters (their defaults,
/// overridden by `jp`) when it defines any, else its notebook task's
/// `base_parameters` overridden by `np`. A run-now and a repair alike: a
/// repair runs with the job's settings and the repair's own parameters,
/// not the original run's.
pub(crate) fn notebook_sees(
    job: &Job,
    jp: Option<&BTreeMap<String, String>>,
    np: Option<&BTreeMap<String, String>>,
) -> BTreeMap<String, String> {
    let defined = job.parameters();
    if !defined.is_empty() {
        return defined
            .into_iter()
            .map(|(name, default)| {
                let v = jp.and_then(|p| p.get(&name)).cloned().unwrap_or(default);
                (name, v)
            })
            .collect();
    }
    let mut p: BTreeMap<String, String> = job
        .tasks()
        .iter()
        .find_map(|t| t.get("notebook_task")?.get("base_parameters").cloned())
        .and_then(|v| string_map(Some(&v), "base_parameters").ok().flatten())
        .unwrap_or_default();
    p.extend(np.cloned().unwrap_or_default());
    p
}

pub async fn run_now(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _in_flight = InFlight::new(&emu);
    let (fault, m, token) =
        match launch_prelude(&emu, &version, &headers, "jobs/run-now", &body).await {
            Ok(x) => x,
            Err(r) => return r,
        };
    let Some(job_id) = m.get("job_id").and_then(Value::as_u64) else {
        return invalid("Missing required field: job_id");
    };
    let (jp, np) = match (
        string_map(m.get("job_parameters"), "job_parameters"),
        string_map(m.get("notebook_params"), "notebook_params"),
    ) {
        (Ok(a), Ok(b)) => (a.filter(|p| !p.is_empty()), b.filter(|p| !p.is_empty())),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let Some(job) = emu.lock().jobs.get(&job_id).cloned() else {
        // 404 as the Databricks CLI's test server answers run-now, with
        // the message the real API gives ("Job N does not exist.").
        return err(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!("Job {job_id} does not exist."),
        );
    };
    // "If a job uses job parameters, it cannot use task parameters": the
    // rule the Databricks CLI checks before run-now, both ways.
    let has_job_params = !job.parameters().is_empty();
    if has_job_params && np.is_some() {
        return invalid(format!(
            "Job {job_id} defines job parameters, so it cannot be run with task parameters (notebook_params): pass job_parameters"
        ));
    }
    if !has_job_params && jp.is_some() {
        return invalid(format!(
            "Job {job_id} does not define job parameters, so it cannot be run with job_parameters: pass task parameters (notebook_params), or define the parameters on the job"
        ));
    }
    let name = job
        .settings
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("job")
        .to_owned();
    let tasks = job.tasks();
    let (run_id, created) = launch(&emu, token.clone(), Some(&job), &tasks, |id| {
        let mut r = new_run(id, Some(job_id), name, "JOB_RUN", token);
        r.params = notebook_sees(&job, jp.as_ref(), np.as_ref());
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

pub async fn submit(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _in_flight = InFlight::new(&emu);
    let (fault, m, token) =
        match launch_prelude(&emu, &version, &headers, "jobs/runs/submit", &body).await {
            Ok(x) => x,
            Err(r) => return r,
        };
    let mut tasks: Vec<Value> = m
        .get("tasks")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if tasks.is_empty() {
        // A legacy one-task body: its top-level task is the run's task.
        match m.get("notebook_task") {
            Some(nb) => tasks.push(json!({"task_key": "notebook", "notebook_task": nb})),
            None => return invalid("At least one task is required"),
        }
    }
    // What the first notebook task receives.
    let params = tasks
        .iter()
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
    let (run_id, created) = launch(&emu, token.clone(), None, &tasks, |id| {
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

/// `status.state` (Jobs API 2.2; the SDK's `RunLifecycleStateV2State`) for
/// a deprecated `life_cycle_state`.
fn v2_state(life: &str) -> &'static str {
    match life {
        "QUEUED" => "QUEUED",
        "PENDING" => "PENDING",
        "RUNNING" => "RUNNING",
        "TERMINATING" => "TERMINATING",
        "BLOCKED" => "BLOCKED",
        "WAITING_FOR_RETRY" => "WAITING",
        _ => "TERMINATED",
    }
}

/// `termination_details` (code, type) of a result state.
fn termination(result: &str) -> (&'static str, &'static str) {
    match result {
        "SUCCESS" => ("SUCCESS", "SUCCESS"),
        "CANCELED" => ("USER_CANCELED", "SUCCESS"),
        "MAXIMUM_CONCURRENT_RUNS_REACHED" => ("MAX_CONCURRENT_RUNS_EXCEEDED", "CLIENT_ERROR"),
        "UPSTREAM_FAILED" => ("SKIPPED", "CLIENT_ERROR"),
        _ => ("RUN_EXECUTION_ERROR", "CLIENT_ERROR"),
    }
}

pub fn state_json(life: &str, result: Option<&str>, message: &str) -> (Value, Value) {
    let mut state = json!({
        "life_cycle_state": life,
        "state_message": message,
        "user_cancelled_or_timedout": result == Some("CANCELED"),
    });
    let mut status = json!({ "state": v2_state(life) });
    if let Some(rs) = result {
        state["result_state"] = json!(rs);
        let (code, kind) = termination(rs);
        status["termination_details"] = json!({"code": code, "type": kind, "message": message});
    }
    (state, status)
}

/// A run as `runs/get` shows it; `page` is the index of the page of tasks
/// (100 each) and `None` when the caller does not page (`runs/list`).
pub fn run_json(emu: &Emulator, r: &Run, page: Option<usize>) -> Value {
    let base = emu.base_url.lock().map(|b| b.clone()).unwrap_or_default();
    let page_url = |run_id: u64| {
        format!(
            "{base}/?o=1234567890123456#job/{}/run/{run_id}",
            r.job_id.unwrap_or(0)
        )
    };
    let (mut state, mut status) = state_json(r.life_cycle_state, r.result_state, &r.state_message);
    if let Some(q) = &r.queue_reason {
        state["queue_reason"] = json!(r.state_message);
        status["queue_details"] = json!({"code": q, "message": r.state_message});
    }
    let start = page.unwrap_or(0) * PAGE;
    let tasks: Vec<Value> = r
        .tasks
        .iter()
        .skip(start)
        .take(PAGE)
        .map(|t| {
            let (life, result) = match (r.life_cycle_state, t.result_state) {
                (_, Some(rs)) => ("TERMINATED", Some(rs)),
                ("QUEUED" | "SKIPPED", _) => (r.life_cycle_state, None),
                (life, None) => (life, None),
            };
            let (state, status) = state_json(life, result, "");
            json!({
                "task_key": t.task_key,
                "run_id": t.run_id,
                "state": state,
                "status": status,
                "attempt_number": r.attempt_number,
                "run_page_url": page_url(t.run_id),
            })
        })
        .collect();
    let mut v = json!({
        "job_id": r.job_id,
        "run_id": r.run_id,
        "number_in_job": r.run_id,
        "original_attempt_run_id": r.run_id,
        "attempt_number": r.attempt_number,
        "creator_user_name": "emulator@runbridge.local",
        "run_name": r.run_name,
        "run_type": r.run_type,
        "state": state,
        "status": status,
        "start_time": r.start_time,
        "end_time": r.end_time,
        "setup_duration": 0,
        "execution_duration": if r.end_time > 0 { r.end_time - r.start_time } else { 0 },
        "cleanup_duration": 0,
        "run_page_url": page_url(r.run_id),
        "tasks": tasks,
    });
    if page.is_some() && start + PAGE < r.tasks.len() {
        v["next_page_token"] = json!((page.unwrap_or(0) + 1).to_string());
    }
    if page.is_none() && r.tasks.len() > PAGE {
        v["has_more"] = json!(true);
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
pub struct RunQuery {
    run_id: Option<u64>,
    page_token: Option<String>,
    include_history: Option<bool>,
}

/// A run id Databricks does not know: 400 `INVALID_PARAMETER_VALUE` "Run N
/// does not exist." (the SDK's override "Job Runs
/// InvalidParameterValue=>ResourceDoesNotExist" matches exactly this).
fn unknown_run(id: u64) -> Response {
    invalid(format!("Run {id} does not exist."))
}

pub fn find_run(emu: &Emulator, id: Option<u64>) -> Result<Run, Response> {
    let Some(id) = id else {
        return Err(invalid("Missing required field: run_id"));
    };
    emu.lock()
        .runs
        .get(&id)
        .cloned()
        .ok_or_else(|| unknown_run(id))
}

pub async fn get_run(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    Query(q): Query<RunQuery>,
) -> Response {
    if let Err(r) = gate(&emu, &version, &headers, "jobs/runs/get").await {
        return r;
    }
    let page = match page_token(q.page_token.as_deref()) {
        Ok(p) => p.unwrap_or(0),
        Err(r) => return r,
    };
    match find_run(&emu, q.run_id) {
        Ok(run) => {
            let mut v = run_json(&emu, &run, Some(page));
            if q.include_history == Some(true) {
                v["repair_history"] = super::repair::history_json(&run);
            }
            Json(v).into_response()
        }
        Err(r) => r,
    }
}

/// `runs/get-output` of a task run, or of a run with one task; the parent of
/// several tasks is refused as Databricks refuses it.
pub async fn get_output(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    Query(q): Query<RunQuery>,
) -> Response {
    if let Err(r) = gate(&emu, &version, &headers, "jobs/runs/get-output").await {
        return r;
    }
    let Some(id) = q.run_id else {
        return invalid("Missing required field: run_id");
    };
    let (run, task) = {
        let inner = emu.lock();
        match inner.task_parent.get(&id).and_then(|p| inner.runs.get(p)) {
            Some(parent) => {
                let task = parent.tasks.iter().find(|t| t.run_id == id).cloned();
                (parent.clone(), task)
            }
            None => match inner.runs.get(&id) {
                Some(r) if r.tasks.len() > 1 => {
                    return invalid(
                        "Retrieving the output of runs with multiple tasks is not supported. Please retrieve the output of each individual task run instead.",
                    );
                }
                Some(r) => (r.clone(), r.tasks.first().cloned()),
                None => return unknown_run(id),
            },
        }
    };
    let mut meta = run_json(&emu, &run, None);
    if let Some(t) = &task {
        meta["run_id"] = json!(t.run_id);
        meta["task_key"] = json!(t.task_key);
    }
    let mut v = json!({ "metadata": meta });
    let exit = task.as_ref().and_then(|t| t.exit_value.clone());
    if task.as_ref().is_some_and(|t| t.kind == "notebook_task") {
        v["notebook_output"] = match exit {
            Some(x) => json!({"result": x, "truncated": false}),
            None => json!({}),
        };
    }
    if task.as_ref().and_then(|t| t.result_state) == Some("FAILED") {
        v["error"] = json!(run.state_message);
    }
    Json(v).into_response()
}

pub async fn cancel(
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
    let run = match find_run(&emu, m.get("run_id").and_then(Value::as_u64)) {
        Ok(r) => r,
        Err(r) => return r,
    };
    if !matches!(run.life_cycle_state, "TERMINATED" | "SKIPPED") {
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
pub struct ListQuery {
    job_id: Option<u64>,
    active_only: Option<bool>,
    completed_only: Option<bool>,
    offset: Option<usize>,
    limit: Option<usize>,
    page_token: Option<String>,
}

/// `runs/list`, newest first, paged by `limit` (1-25, default 20) with
/// `next_page_token` / `prev_page_token` (or the deprecated `offset`).
pub async fn list_runs(
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
    // A limit of 0 means the maximum.
    let limit = match q.limit.unwrap_or(20) {
        0 => 25,
        n => n,
    };
    if !(1..=25).contains(&limit) {
        return invalid("limit must be between 1 and 25");
    }
    let offset = match page_token(q.page_token.as_deref()) {
        Ok(o) => o.or(q.offset).unwrap_or(0),
        Err(r) => return r,
    };
    let inner = emu.lock();
    let finished = |r: &&Run| matches!(r.life_cycle_state, "TERMINATED" | "SKIPPED");
    let matching: Vec<&Run> = inner
        .runs
        .values()
        .rev()
        .filter(|r| q.job_id.is_none_or(|j| r.job_id == Some(j)))
        .filter(|r| q.active_only != Some(true) || !finished(r))
        .filter(|r| q.completed_only != Some(true) || finished(r))
        .collect();
    let page: Vec<Value> = matching
        .iter()
        .skip(offset)
        .take(limit)
        .map(|r| run_json(&emu, r, None))
        .collect();
    let has_more = matching.len() > offset + limit;
    let mut v = json!({ "has_more": has_more });
    if !page.is_empty() {
        v["runs"] = json!(page);
    }
    if has_more {
        v["next_page_token"] = json!((offset + limit).to_string());
    }
    if offset > 0 {
        v["prev_page_token"] = json!(offset.saturating_sub(limit).to_string());
    }
    Json(v).into_response()
}
