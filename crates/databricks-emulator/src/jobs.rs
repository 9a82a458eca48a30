//! The job routes: `jobs/create`, `jobs/get` (paged like the real API),
//! `jobs/list`, `jobs/update`, `jobs/reset`, `jobs/delete`. Each behaviour
//! modelled here, and its source, is listed in `docs/databricks-fidelity.md`.

// Handlers return a finished error `Response` through `?`-style helpers; its
// size does not matter for an emulator.
#![allow(clippy::result_large_err)]

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::gate::{get_params, post_params};
use super::model::{Emulator, Job, now_ms, with_defaults};
use super::request::{Emu, PAGE, Params, invalid, reply, unknown_job};
use super::view::list_page;

/// A job's settings as a request gives them: an object, `null`s dropped.
fn settings_of(v: Option<&Value>, name: &str) -> Result<Map<String, Value>, Response> {
    match v {
        None => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()),
        Some(_) => Err(invalid(format!("{name} must be an object"))),
    }
}

/// `jobs/create` fills in the 2.2 defaults (`max_concurrent_runs` 1,
/// queueing on) that `jobs/get` then shows.
pub async fn create_job(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = post_params(&emu, &version, &headers, "jobs/create", &body).await;
    reply(p.map(|p| {
        let settings = Value::Object(with_defaults(p.into_object()));
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
        json!({"job_id": job_id})
    }))
}

/// The job a request's `job_id` names.
fn find_job(emu: &Emulator, p: &Params) -> Result<Job, Response> {
    let id = p.required_int("job_id")?;
    emu.lock()
        .jobs
        .get(&id)
        .cloned()
        .ok_or_else(|| unknown_job(id))
}

/// A job as `jobs/get` and `jobs/list` show it, its settings as given.
fn job_json(j: &Job, settings: Value) -> Value {
    json!({
        "job_id": j.job_id,
        "creator_user_name": "emulator@runbridge.local",
        "run_as_user_name": "emulator@runbridge.local",
        "created_time": j.created_time,
        "settings": settings,
    })
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
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let p = get_params(
        &emu,
        &version,
        &headers,
        "jobs/get",
        query.as_deref(),
        &body,
    )
    .await;
    reply(p.and_then(|p| {
        let page = p.page_token()?.unwrap_or(0);
        let j = find_job(&emu, &p)?;
        let mut settings = j.settings.clone();
        let tasks = settings
            .get("tasks")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let start = page * PAGE;
        let mut more = false;
        if tasks.len() > PAGE {
            settings["tasks"] = json!(tasks.iter().skip(start).take(PAGE).collect::<Vec<_>>());
            more = start + PAGE < tasks.len();
            if page > 0
                && let Some(o) = settings.as_object_mut()
            {
                o.remove("parameters");
                o.remove("job_clusters");
                o.remove("environments");
            }
        }
        let mut v = job_json(&j, settings);
        if more {
            v["has_more"] = json!(true);
            v["next_page_token"] = json!((page + 1).to_string());
        }
        Ok(v)
    }))
}

/// `jobs/list`: newest job first, `limit` 1-100 (default 20), paged with
/// `next_page_token` / `prev_page_token` (or the deprecated `offset`,
/// "relative to the most recently created job"); `name` filters on the
/// exact name, case-insensitive; tasks and job clusters only with
/// `expand_tasks` (the SDK's `list`).
pub async fn list_jobs(
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
        "jobs/list",
        query.as_deref(),
        &body,
    )
    .await;
    reply(p.and_then(|p| {
        let expand = p.flag("expand_tasks")?.unwrap_or(false);
        let name = p.text("name")?.map(str::to_lowercase);
        let limit = p.int("limit")?.unwrap_or(20) as usize;
        if !(1..=100).contains(&limit) {
            return Err(invalid(
                "limit must be greater than 0 and less than or equal to 100",
            ));
        }
        let offset = p.offset()?;
        let inner = emu.lock();
        let matching: Vec<&Job> = inner
            .jobs
            .values()
            .rev()
            .filter(|j| {
                name.as_deref().is_none_or(|n| {
                    j.settings
                        .get("name")
                        .and_then(Value::as_str)
                        .is_some_and(|s| s.to_lowercase() == n)
                })
            })
            .collect();
        let jobs: Vec<Value> = matching
            .iter()
            .skip(offset)
            .take(limit)
            .map(|j| {
                let mut settings = j.settings.clone();
                if let Some(o) = settings.as_object_mut() {
                    if expand {
                        if let Some(t) = o.get_mut("tasks").and_then(Value::as_array_mut) {
                            t.truncate(PAGE);
                        }
                    } else {
                        o.remove("tasks");
                        o.remove("job_clusters");
                    }
                }
                job_json(j, settings)
            })
            .collect();
        Ok(list_page("jobs", jobs, matching.len(), offset, limit))
    }))
}

/// Replaces the job's settings and what its tags make the emulator do.
fn store_settings(emu: &Emulator, job_id: u64, settings: Value) {
    let behaviour = emu.behaviour_of_job(&settings);
    if let Some(j) = emu.lock().jobs.get_mut(&job_id) {
        j.settings = settings;
        j.behaviour = behaviour;
    }
}

/// `jobs/update`: "Top-level fields specified in new_settings are
/// completely replaced, except for arrays which are merged" by their key
/// (`task_key`, `job_cluster_key`); `fields_to_remove` drops top-level
/// fields, or one task or job cluster as `tasks/<key>` (the SDK's
/// `update`). Changes apply to future runs.
pub async fn update_job(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = post_params(&emu, &version, &headers, "jobs/update", &body).await;
    reply(p.and_then(|p| {
        let job = find_job(&emu, &p)?;
        let new = settings_of(p.value("new_settings"), "new_settings")?;
        let remove: Vec<String> = match p.value("fields_to_remove") {
            None => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| invalid("fields_to_remove must be a list of strings"))?,
            Some(_) => return Err(invalid("fields_to_remove must be a list of strings")),
        };
        let mut settings = job.settings.as_object().cloned().unwrap_or_default();
        for (k, v) in new {
            match (k.as_str(), settings.get_mut(&k), v) {
                ("tasks", Some(Value::Array(old)), Value::Array(add)) => {
                    merge(old, add, "task_key")
                }
                ("job_clusters", Some(Value::Array(old)), Value::Array(add)) => {
                    merge(old, add, "job_cluster_key")
                }
                (_, _, v) => {
                    settings.insert(k, v);
                }
            }
        }
        for f in remove {
            match f.split_once('/') {
                Some((list @ ("tasks" | "job_clusters"), key)) => {
                    let key_field = if list == "tasks" {
                        "task_key"
                    } else {
                        "job_cluster_key"
                    };
                    if let Some(Value::Array(items)) = settings.get_mut(list) {
                        items.retain(|i| i.get(key_field).and_then(Value::as_str) != Some(key));
                    }
                }
                Some(_) => {
                    return Err(invalid(format!(
                        "Removing the nested field {f} is not supported"
                    )));
                }
                None => {
                    settings.remove(&f);
                }
            }
        }
        store_settings(&emu, job.job_id, Value::Object(with_defaults(settings)));
        Ok(json!({}))
    }))
}

/// Entries of `add` replace those of `old` with the same `key`; the rest
/// are appended.
fn merge(old: &mut Vec<Value>, add: Vec<Value>, key: &str) {
    for item in add {
        let k = item.get(key).cloned();
        match old
            .iter_mut()
            .find(|o| k.is_some() && o.get(key) == k.as_ref())
        {
            Some(o) => *o = item,
            None => old.push(item),
        }
    }
}

/// `jobs/reset`: "Overwrite all settings for the given job"; what
/// `new_settings` leaves out takes its default again.
pub async fn reset_job(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = post_params(&emu, &version, &headers, "jobs/reset", &body).await;
    reply(p.and_then(|p| {
        let job = find_job(&emu, &p)?;
        if p.value("new_settings").is_none() {
            return Err(invalid("Missing required field: new_settings"));
        }
        let new = settings_of(p.value("new_settings"), "new_settings")?;
        store_settings(&emu, job.job_id, Value::Object(with_defaults(new)));
        Ok(json!({}))
    }))
}

/// `jobs/delete`: the job goes; its runs stay readable (as in the
/// workspace's run history) and `run-now` on it is refused as for any
/// unknown job.
pub async fn delete_job(
    State(emu): Emu,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = post_params(&emu, &version, &headers, "jobs/delete", &body).await;
    reply(p.and_then(|p| {
        let job = find_job(&emu, &p)?;
        emu.lock().jobs.remove(&job.job_id);
        Ok(json!({}))
    }))
}
