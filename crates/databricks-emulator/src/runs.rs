//! The routes that read and end runs: `jobs/runs/get`,
//! `jobs/runs/get-output`, `jobs/runs/cancel`, `jobs/runs/cancel-all`,
//! `jobs/runs/delete`, `jobs/runs/list`. Each behaviour modelled here, and
//! its source, is listed in `docs/databricks-fidelity.md`.

// Handlers return a finished error `Response` through `?`-style helpers; its
// size does not matter for an emulator.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::gate::{get_params, post_params};
use super::model::{Emulator, Run};
use super::request::{Emu, Params, find_run, invalid, reply, unknown_job, unknown_run};
use super::view::{history_json, list_page, run_json};

/// A run that has ended holds nothing any more.
fn finished(r: &Run) -> bool {
    matches!(r.life_cycle_state, "TERMINATED" | "SKIPPED")
}

pub async fn get_run(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let p = get_params(
        &emu,
        &version,
        &headers,
        "jobs/runs/get",
        query.as_deref(),
        &body,
    )
    .await;
    reply(p.and_then(|p| {
        let page = p.page_token()?.unwrap_or(0);
        let history = p.flag("include_history")?.unwrap_or(false);
        let run = find_run(&emu, &p)?;
        let mut v = run_json(&emu, &run, Some(page));
        if history {
            v["repair_history"] = history_json(&run);
        }
        Ok(v)
    }))
}

/// `runs/get-output` of a task run, or of a run with one task (its latest
/// attempt); the parent of several tasks is refused as Databricks refuses
/// it.
pub async fn get_output(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let endpoint = "jobs/runs/get-output";
    let p = match get_params(&emu, &version, &headers, endpoint, query.as_deref(), &body).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let id = match p.required_int("run_id") {
        Ok(id) => id,
        Err(r) => return r,
    };
    let (run, task) = {
        let inner = emu.lock();
        match inner.task_parent.get(&id).and_then(|p| inner.runs.get(p)) {
            Some(parent) => {
                let task = parent.tasks.iter().find(|t| t.run_id == id).cloned();
                (parent.clone(), task)
            }
            None => match inner.runs.get(&id) {
                Some(r) if r.latest_tasks().len() > 1 => {
                    return invalid(
                        "Retrieving the output of runs with multiple tasks is not supported. Please retrieve the output of each individual task run instead.",
                    );
                }
                Some(r) => (r.clone(), r.latest_tasks().first().map(|t| (*t).clone())),
                None => return unknown_run(id),
            },
        }
    };
    let mut meta = run_json(&emu, &run, None);
    if let Some(t) = &task {
        meta["run_id"] = json!(t.run_id);
        meta["task_key"] = json!(t.task_key);
        meta["attempt_number"] = json!(t.attempt_number);
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

impl Emulator {
    /// Cancels a run that has not ended: TERMINATING at once (with the
    /// CANCELED result when its task had started), TERMINATED shortly after.
    pub fn cancel_run(self: &Arc<Self>, run: &Run) {
        if finished(run) {
            return;
        }
        let started = matches!(
            run.life_cycle_state,
            "RUNNING" | "TERMINATING" | "WAITING_FOR_RETRY"
        );
        self.set_state(
            run.run_id,
            "TERMINATING",
            started.then_some("CANCELED"),
            "Run cancellation requested.",
        );
        let emu = self.clone();
        let run_id = run.run_id;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            emu.set_state(run_id, "TERMINATED", Some("CANCELED"), "Run cancelled.");
        });
    }
}

pub async fn cancel(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = match post_params(&emu, &version, &headers, "jobs/runs/cancel", &body).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    match find_run(&emu, &p) {
        Ok(run) => {
            emu.cancel_run(&run);
            Json(json!({})).into_response()
        }
        Err(r) => r,
    }
}

/// `runs/cancel-all`: every active run of `job_id` ("The runs are canceled
/// asynchronously, so it doesn't prevent new runs from being started"), or
/// with `all_queued_runs` and no job, every queued run of the workspace
/// (the SDK's `cancel_all_runs`). One of the two is required.
pub async fn cancel_all(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = match post_params(&emu, &version, &headers, "jobs/runs/cancel-all", &body).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let (job, all_queued) = match (p.int("job_id"), p.flag("all_queued_runs")) {
        (Ok(j), Ok(q)) => (j, q.unwrap_or(false)),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let runs: Vec<Run> = {
        let inner = emu.lock();
        match job {
            Some(j) if !inner.jobs.contains_key(&j) => return unknown_job(j),
            Some(j) => inner
                .runs
                .values()
                .filter(|r| r.job_id == Some(j) && !finished(r))
                .filter(|r| !all_queued || r.life_cycle_state == "QUEUED")
                .cloned()
                .collect(),
            None if all_queued => inner
                .runs
                .values()
                .filter(|r| r.life_cycle_state == "QUEUED")
                .cloned()
                .collect(),
            None => return invalid("Either job_id or all_queued_runs must be set"),
        }
    };
    for run in &runs {
        emu.cancel_run(run);
    }
    Json(json!({})).into_response()
}

/// `runs/delete`: "Deletes a non-active run. Returns an error if the run is
/// active." Its task runs go with it; the idempotency token that started it
/// is then refused (see `launch`).
pub async fn delete_run(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = match post_params(&emu, &version, &headers, "jobs/runs/delete", &body).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let run = match find_run(&emu, &p) {
        Ok(r) => r,
        Err(r) => return r,
    };
    if !finished(&run) {
        return invalid(format!(
            "Run {} is active: only a run that has ended can be deleted",
            run.run_id
        ));
    }
    let mut inner = emu.lock();
    inner.runs.remove(&run.run_id);
    for t in &run.tasks {
        inner.task_parent.remove(&t.run_id);
    }
    Json(json!({})).into_response()
}

/// `runs/list`, newest first, paged by `limit` (1-25, default 20) with
/// `next_page_token` / `prev_page_token` (or the deprecated `offset`);
/// filters `job_id`, `active_only`, `completed_only`, `run_type`,
/// `start_time_from` / `start_time_to` (epoch ms, inclusive), and tasks
/// listed only with `expand_tasks` (the SDK's `list_runs`).
pub async fn list_runs(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let endpoint = "jobs/runs/list";
    let p = match get_params(&emu, &version, &headers, endpoint, query.as_deref(), &body).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    reply(list(&emu, &p))
}

fn list(emu: &Emulator, p: &Params) -> Result<Value, Response> {
    let job = p.int("job_id")?;
    let active_only = p.flag("active_only")?.unwrap_or(false);
    let completed_only = p.flag("completed_only")?.unwrap_or(false);
    let expand = p.flag("expand_tasks")?.unwrap_or(false);
    let from = p.int("start_time_from")?.unwrap_or(0) as i64;
    let to = p.int("start_time_to")?.map_or(i64::MAX, |t| t as i64);
    let run_type = p.text("run_type")?;
    if active_only && completed_only {
        return Err(invalid(
            "active_only and completed_only cannot both be true",
        ));
    }
    // A limit of 0 means the maximum.
    let limit = match p.int("limit")?.unwrap_or(20) {
        0 => 25,
        n => n as usize,
    };
    if !(1..=25).contains(&limit) {
        return Err(invalid("limit must be between 1 and 25"));
    }
    let offset = p.offset()?;
    let inner = emu.lock();
    let matching: Vec<&Run> = inner
        .runs
        .values()
        .rev()
        .filter(|r| job.is_none_or(|j| r.job_id == Some(j)))
        .filter(|r| !active_only || !finished(r))
        .filter(|r| !completed_only || finished(r))
        .filter(|r| (from..=to).contains(&r.start_time))
        .filter(|r| run_type.is_none_or(|t| r.run_type == t))
        .collect();
    let page: Vec<Value> = matching
        .iter()
        .skip(offset)
        .take(limit)
        .map(|r| {
            let mut v = run_json(emu, r, None);
            if !expand && let Some(o) = v.as_object_mut() {
                o.remove("tasks");
                o.remove("has_more");
            }
            v
        })
        .collect();
    Ok(list_page("runs", page, matching.len(), offset, limit))
}
