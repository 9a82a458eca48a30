//! The job routes: `jobs/create` and `jobs/get` (paged like the real API).

// Handlers return a finished error `Response` through `?`-style helpers; its
// size does not matter for an emulator.
#![allow(clippy::result_large_err)]

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::api::{Emu, gate, invalid, parse_body};
use super::model::{Job, now_ms};
use super::runs::{PAGE, page_token};

pub async fn create_job(
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
pub struct JobQuery {
    job_id: Option<u64>,
    page_token: Option<String>,
}

/// `jobs/get`: an unknown job is 400 `INVALID_PARAMETER_VALUE` "Job N does
/// not exist." (the SDK's override "Jobs InvalidParameterValue=>
/// ResourceDoesNotExist"); `tasks` come 100 a page, and later pages carry
/// only the rest of the tasks (the Databricks CLI's test server, after the
/// real API).
pub async fn get_job(
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
    let page = match page_token(q.page_token.as_deref()) {
        Ok(p) => p.unwrap_or(0),
        Err(r) => return r,
    };
    let Some(j) = emu.lock().jobs.get(&id).cloned() else {
        return invalid(format!("Job {id} does not exist."));
    };
    let mut settings = j.settings.clone();
    let tasks = settings
        .get("tasks")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let start = page * PAGE;
    let mut v = json!({
        "job_id": j.job_id,
        "creator_user_name": "emulator@runbridge.local",
        "run_as_user_name": "emulator@runbridge.local",
        "created_time": j.created_time,
    });
    if tasks.len() > PAGE {
        settings["tasks"] = json!(tasks.iter().skip(start).take(PAGE).collect::<Vec<_>>());
        if start + PAGE < tasks.len() {
            v["has_more"] = json!(true);
            v["next_page_token"] = json!((page + 1).to_string());
        }
        if page > 0
            && let Some(o) = settings.as_object_mut()
        {
            o.remove("parameters");
            o.remove("job_clusters");
            o.remove("environments");
        }
    }
    v["settings"] = settings;
    Json(v).into_response()
}
