//! How runs look on the wire: `state` and `status` of a lifecycle, a run
//! as `runs/get` and `runs/list` show it, its `repair_history`.

use serde_json::{Value, json};

use super::model::{Emulator, RepairRecord, Run};
use super::request::PAGE;

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
        // TERMINATING already carries the result of a run whose task started
        // ("the result state is available if the run had a task and managed
        // to start it": `RunResultState` in the Jobs API reference); the v2
        // `termination_details` come once it has ended.
        state["result_state"] = json!(rs);
        if life != "TERMINATING" {
            let (code, kind) = termination(rs);
            status["termination_details"] = json!({"code": code, "type": kind, "message": message});
        }
    }
    (state, status)
}

/// A run as `runs/get` shows it; `page` is the index of the page of tasks
/// (100 each) and `None` when the caller does not page (`runs/list`, which
/// lists tasks only with `expand_tasks`). `tasks` holds one entry per
/// attempt of a task: each retry and each repair adds one with the same
/// `task_key`, its own `run_id` and the next `attempt_number` (runs read
/// from live workspaces in apache/airflow#72313 and #69998).
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
            let mut task = json!({
                "task_key": t.task_key,
                "run_id": t.run_id,
                "state": state,
                "status": status,
                "attempt_number": t.attempt_number,
                "run_page_url": page_url(t.run_id),
            });
            // A one-time run's tasks are its definition: each notebook
            // task shows its base parameters (the emulator keeps one map
            // for the run's notebook tasks).
            if r.run_type == "SUBMIT_RUN" && t.kind == "notebook_task" {
                task["notebook_task"] = json!({"base_parameters": r.params});
            }
            task
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

/// A page of a list (`jobs/list`, `runs/list`): its items under `key`
/// (absent when there are none, as Databricks leaves empty lists out),
/// `has_more`, and the tokens of the next and previous pages (offsets).
pub fn list_page(key: &str, items: Vec<Value>, total: usize, offset: usize, limit: usize) -> Value {
    let has_more = total > offset + limit;
    let mut v = json!({ "has_more": has_more });
    if !items.is_empty() {
        v[key] = json!(items);
    }
    if has_more {
        v["next_page_token"] = json!((offset + limit).to_string());
    }
    if offset > 0 {
        v["prev_page_token"] = json!(offset.saturating_sub(limit).to_string());
    }
    v
}

fn item_json(kind: &str, r: &RepairRecord) -> Value {
    let (state, status) = state_json(r.life_cycle_state, r.result_state, "");
    let mut v = json!({
        "type": kind,
        "start_time": r.start_time,
        "end_time": r.end_time,
        "state": state,
        "status": status,
        "task_run_ids": r.task_run_ids,
    });
    if let Some(id) = r.id {
        v["id"] = json!(id);
    }
    v
}

/// The run's `repair_history`: the original play and each repair. A run
/// never repaired has its one `ORIGINAL` item.
pub fn history_json(run: &Run) -> Value {
    let original = run.original.clone().unwrap_or_else(|| run.as_played());
    let mut items = vec![item_json("ORIGINAL", &original)];
    items.extend(run.repairs.iter().map(|r| item_json("REPAIR", r)));
    Value::Array(items)
}

#[cfg(test)]
mod tests {
    use super::state_json;

    #[test]
    fn terminating_carries_the_result_and_termination_details_wait_for_the_end() {
        let (state, status) = state_json("TERMINATING", Some("SUCCESS"), "");
        assert_eq!(state["result_state"], "SUCCESS");
        assert_eq!(status["state"], "TERMINATING");
        assert!(status.get("termination_details").is_none());
        let (state, status) = state_json("TERMINATED", Some("CANCELED"), "Run cancelled.");
        assert_eq!(state["result_state"], "CANCELED");
        assert_eq!(status["termination_details"]["code"], "USER_CANCELED");
        let (state, _) = state_json("RUNNING", None, "");
        assert!(state.get("result_state").is_none());
    }
}
