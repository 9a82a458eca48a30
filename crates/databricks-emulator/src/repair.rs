//! `jobs/runs/repair` and a run's `repair_history` (`runs/get` with
//! `include_history=true`).
//!
//! What is modelled, and from where (`docs/databricks-fidelity.md` lists
//! it too):
//! - a repair re-runs tasks "as part of the original job run": the run id
//!   stays, the rerun tasks get new task run ids, and the answer is
//!   `{"repair_id": N}` (`RepairRunResponse` in Databricks' Python SDK);
//! - "the run must not be in progress" (the SDK's `run_id` doc);
//! - `latest_repair_id` "is not required when repairing a run for the first
//!   time, but must be provided on subsequent requests": a missing or stale
//!   one is refused, so two clients (or one retrying after a crash) cannot
//!   both repair the same failure;
//! - `rerun_all_failed_tasks` and `rerun_tasks`: "only one of" them;
//! - the repaired tasks run with the job's current settings and the
//!   repair's own `job_parameters` / `notebook_params`; the overriding
//!   parameters of the original `run-now` are not applied again
//!   (Databricks support's answer relayed in apache/airflow#46704, and why
//!   the Airflow provider sends `job_parameters` with every repair since
//!   apache/airflow#67055). A repair that sends none runs with the job's
//!   defaults;
//! - each rerun task gets a new entry in the run's `tasks`, with the same
//!   `task_key`, a new run id and the next `attempt_number`; the earlier
//!   attempts stay listed (runs of live workspaces in apache/airflow#72313
//!   and #69998);
//! - `repair_history` (rendered in `view`): an `ORIGINAL` item, then one `REPAIR` item (with its
//!   `id`) per repair, each with start and end time, state, status and the
//!   task run ids that ran in it (`RepairHistoryItem`).
//!
//! The error codes of the refusals are not documented; the emulator answers
//! 400 `INVALID_PARAMETER_VALUE` (stale id, bad request) and 400
//! `INVALID_STATE` (run in progress), and runbridge does not rely on which.

#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::gate::post_params;
use super::model::{Emulator, RepairRecord, now_ms};
use super::request::{Emu, err, find_run, invalid};

/// Parameters by name, as a request carries them.
type Named = BTreeMap<String, String>;

/// Why a repair is refused, as the API answers it.
fn refuse(code: &str, message: String) -> Response {
    err(StatusCode::BAD_REQUEST, code, message)
}

impl Emulator {
    /// Starts a repair of `run_id` re-running `rerun` (task keys; `None`:
    /// every task that did not succeed). Returns the repair id.
    fn start_repair(
        self: &Arc<Self>,
        run_id: u64,
        latest: Option<u64>,
        rerun: Option<Vec<String>>,
        (jp, np): (Option<Named>, Option<Named>),
    ) -> Result<u64, Response> {
        let mut inner = self.lock();
        let job = inner
            .runs
            .get(&run_id)
            .and_then(|r| r.job_id)
            .and_then(|j| inner.jobs.get(&j).cloned());
        let next_repair = inner.next_repair_id + 1;
        let mut next_task_run = inner.next_run_id;
        let Some(run) = inner.runs.get_mut(&run_id) else {
            return Err(invalid(format!("Run {run_id} does not exist.")));
        };
        if !matches!(run.life_cycle_state, "TERMINATED" | "SKIPPED") {
            return Err(refuse(
                "INVALID_STATE",
                format!(
                    "Run {run_id} is in progress: a run can be repaired only once it has ended."
                ),
            ));
        }
        let last = run.repairs.last().and_then(|r| r.id);
        if last != latest {
            return Err(refuse(
                "INVALID_PARAMETER_VALUE",
                match last {
                    Some(l) => format!(
                        "latest_repair_id must be the ID of the latest repair of run {run_id} ({l})"
                    ),
                    None => format!("Run {run_id} has no repair; omit latest_repair_id"),
                },
            ));
        }
        let keys: Vec<String> = match rerun {
            Some(keys) => {
                if let Some(k) = keys
                    .iter()
                    .find(|k| !run.tasks.iter().any(|t| &t.task_key == *k))
                {
                    return Err(invalid(format!("Task {k} does not exist in run {run_id}")));
                }
                keys
            }
            None => run
                .latest_tasks()
                .into_iter()
                .filter(|t| t.result_state != Some("SUCCESS"))
                .map(|t| t.task_key.clone())
                .collect(),
        };
        if keys.is_empty() {
            return Err(invalid(format!(
                "Run {run_id} has no failed tasks to repair"
            )));
        }
        if run.original.is_none() {
            run.original = Some(run.as_played());
        }
        // A job's run: the repaired tasks see the job's settings with the
        // repair's parameters (a one-time run's are in its task definitions).
        if let Some(job) = &job {
            run.params = job.notebook_sees(jp.as_ref(), np.as_ref());
        }
        let mut task_run_ids = Vec::new();
        for k in &keys {
            next_task_run += 1;
            run.add_attempt(k, next_task_run);
            task_run_ids.push(next_task_run);
        }
        let new_tasks = task_run_ids.clone();
        run.repairs.push(RepairRecord {
            id: Some(next_repair),
            start_time: now_ms(),
            end_time: 0,
            life_cycle_state: "PENDING",
            result_state: None,
            task_run_ids,
        });
        let was = run.life_cycle_state;
        run.life_cycle_state = "PENDING";
        run.result_state = None;
        run.state_message = String::new();
        run.end_time = 0;
        run.exit_value = None;
        let job = run.job_id;
        for t in new_tasks {
            inner.task_parent.insert(t, run_id);
        }
        inner.next_run_id = next_task_run;
        inner.next_repair_id = next_repair;
        inner.moved(job, run_id, Some(was), "PENDING");
        Ok(next_repair)
    }
}

pub async fn repair(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = match post_params(&emu, &version, &headers, "jobs/runs/repair", &body).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let run_id = match find_run(&emu, &p) {
        Ok(r) => r.run_id,
        Err(r) => return r,
    };
    let (latest, all_failed) = match (p.int("latest_repair_id"), p.flag("rerun_all_failed_tasks")) {
        (Ok(l), Ok(a)) => (l, a.unwrap_or(false)),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let tasks: Option<Vec<String>> = p.value("rerun_tasks").and_then(Value::as_array).map(|a| {
        a.iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    });
    let rerun = match (all_failed, tasks) {
        (true, Some(t)) if !t.is_empty() => {
            return invalid("Only one of rerun_tasks or rerun_all_failed_tasks can be used");
        }
        (true, _) => None,
        (false, Some(t)) if !t.is_empty() => Some(t),
        (false, _) => return invalid("Either rerun_tasks or rerun_all_failed_tasks must be set"),
    };
    let params = match (
        p.string_map("job_parameters"),
        p.string_map("notebook_params"),
    ) {
        (Ok(jp), Ok(np)) => (jp, np),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    match emu.start_repair(run_id, latest, rerun, params) {
        Ok(repair_id) => {
            let emu2 = emu.clone();
            tokio::spawn(async move { emu2.execute(run_id, false).await });
            Json(json!({"repair_id": repair_id})).into_response()
        }
        Err(r) => r,
    }
}
