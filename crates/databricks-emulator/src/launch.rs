//! The launch routes: `jobs/run-now` and `jobs/runs/submit`. A run is
//! created (or found by its idempotency token) under one lock, admitted
//! against its job's `max_concurrent_runs`, and played on a task of its own.
//! Each behaviour modelled here, and its source, is listed in
//! `docs/databricks-fidelity.md`.

// Handlers return a finished error `Response` through `?`-style helpers; its
// size does not matter for an emulator.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::gate::gate;
use super::model::{Emulator, Injected, Inner, Job, Outcome, Run, TaskRun, now_ms, task_kind};
use super::request::{Emu, Params, err, invalid, string_map};

/// What both launch routes start with: auth and faults, the JSON body, and
/// its idempotency token.
async fn launch_prelude(
    emu: &Emulator,
    version: &str,
    headers: &HeaderMap,
    endpoint: &str,
    body: &Bytes,
) -> Result<(Option<Injected>, Params, Option<String>), Response> {
    let fault = gate(emu, version, headers, endpoint).await?;
    let p = Params::post(body)?;
    let token = match p.text("idempotency_token")? {
        None => None,
        Some(t) if t.len() <= 64 => Some(t.to_owned()),
        Some(t) => {
            return Err(invalid(format!(
                "Idempotency token {t} exceeds the maximum length of 64 characters"
            )));
        }
    };
    Ok((fault, p, token))
}

/// A new run: PENDING, or QUEUED / SKIPPED when its job is at its
/// `max_concurrent_runs` (queued with queueing on, skipped with it off; a
/// limit of 0 skips every run, queue or not: the SDK's `JobSettings`
/// docstring "Setting this value to 0 causes all new runs to be skipped").
fn admit(inner: &Inner, job: Option<&Job>, run: &mut Run) {
    let Some(job) = job else { return };
    let max = job.max_concurrent_runs();
    let queued_ahead = inner.oldest_queued(job.job_id).is_some();
    if max > 0 && inner.active_runs(job.job_id) < max && !queued_ahead {
        return;
    }
    if max > 0 && job.queue_enabled() {
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

/// Why a token cannot start or find a run: the run it started was
/// deleted ("If a run with the provided token is deleted, an error is
/// returned": `idempotency_token` in the SDK's `run_now` and `submit`).
fn deleted_token(token: &str) -> Response {
    invalid(format!(
        "The run started with idempotency token {token} was deleted; use another token"
    ))
}

/// Creates the run (with one run id per task), or finds the one with this
/// token. Returns (run_id, new).
fn launch(
    emu: &Arc<Emulator>,
    token: Option<String>,
    job: Option<&Job>,
    tasks: &[Value],
    make: impl FnOnce(u64) -> Run,
) -> Result<(u64, bool), Response> {
    let mut inner = emu.lock();
    if let Some(t) = &token
        && let Some(id) = inner.tokens.get(t).copied()
    {
        if !inner.runs.contains_key(&id) {
            return Err(deleted_token(t));
        }
        return Ok((id, false));
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
            attempt_number: 0,
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
    Ok((id, true))
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

pub async fn run_now(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _in_flight = InFlight::new(&emu);
    let (fault, p, token) =
        match launch_prelude(&emu, &version, &headers, "jobs/run-now", &body).await {
            Ok(x) => x,
            Err(r) => return r,
        };
    let job_id = match p.required_int("job_id") {
        Ok(id) => id,
        Err(r) => return r,
    };
    let (jp, np) = match (
        p.string_map("job_parameters"),
        p.string_map("notebook_params"),
    ) {
        (Ok(a), Ok(b)) => (a, b),
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
    let launched = launch(&emu, token.clone(), Some(&job), &tasks, |id| {
        let mut r = new_run(id, Some(job_id), name, "JOB_RUN", token);
        r.params = job.notebook_sees(jp.as_ref(), np.as_ref());
        r.job_parameters = jp;
        r.notebook_params = np;
        r.behaviour = job.behaviour.clone();
        r.traceparent = traceparent_of(&headers);
        r
    });
    let (run_id, created) = match launched {
        Ok(x) => x,
        Err(r) => return r,
    };
    if let Some(r) = after_launch(&emu, run_id, created, fault).await {
        return r;
    }
    Json(json!({"run_id": run_id, "number_in_job": run_id})).into_response()
}

/// `runs/submit`: a one-time run of the tasks it names. Jobs API 2.2 takes
/// only the multi-task form (`tasks`; "Updating from Jobs API 2.1 to 2.2"),
/// so a top-level `notebook_task` is refused on 2.2 and read as one task on
/// 2.1.
pub async fn submit(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _in_flight = InFlight::new(&emu);
    let (fault, p, token) =
        match launch_prelude(&emu, &version, &headers, "jobs/runs/submit", &body).await {
            Ok(x) => x,
            Err(r) => return r,
        };
    let mut tasks: Vec<Value> = p
        .value("tasks")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if tasks.is_empty() {
        match p.value("notebook_task") {
            Some(nb) if version == "2.1" => {
                tasks.push(json!({"task_key": "notebook", "notebook_task": nb}))
            }
            Some(_) => {
                return invalid(
                    "Jobs API 2.2 submits tasks in the multi-task form: put the notebook_task in tasks[]",
                );
            }
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
    let name = match p.text("run_name") {
        Ok(n) => n.unwrap_or("Untitled").to_owned(),
        Err(r) => return r,
    };
    let settings = Value::Object(p.into_object());
    let behaviour = emu.behaviour_of_job(&settings);
    let launched = launch(&emu, token.clone(), None, &tasks, |id| {
        let mut r = new_run(id, None, name, "SUBMIT_RUN", token);
        r.params = params;
        r.behaviour = behaviour;
        r
    });
    let (run_id, created) = match launched {
        Ok(x) => x,
        Err(r) => return r,
    };
    if let Some(r) = after_launch(&emu, run_id, created, fault).await {
        return r;
    }
    Json(json!({"run_id": run_id})).into_response()
}
