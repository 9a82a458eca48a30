//! Retry policies (repair and rerun) and progress events, against
//! RabbitMQ, Redis and the emulator over HTTP.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

/// A job that fails its first `fail` attempts (per promise), then calls
/// back with "done"; `extra` tags added (e.g. `emulator.progress`).
async fn flaky_job(app: &TestApp, fail: u32, delay_ms: u64, extra: Value) -> u64 {
    let param = |name: &str| json!({"name": name, "default": ""});
    let mut tags = json!({
        "emulator.outcome": "callback",
        "emulator.delay_ms": delay_ms.to_string(),
        "emulator.value": "done",
        "emulator.fail_attempts": fail.to_string(),
    });
    if let Value::Object(m) = extra {
        for (k, v) in m {
            tags[k] = v;
        }
    }
    app.create_job(json!({
        "name": unique("flaky"),
        "tasks": [
            {"task_key": "extract", "notebook_task": {"notebook_path": "/extract"}},
            {"task_key": "load", "notebook_task": {"notebook_path": "/load"}},
        ],
        "parameters": [param("promise_id"), param("url"), param("callback_token")],
        "tags": tags,
    }))
    .await
}

fn retrying(id: &str, job: u64, max: u32, mode: &str) -> Value {
    json!({
        "id": id,
        "job_id": job,
        "retry": {"max_attempts": max, "mode": mode, "backoff": {"initial_seconds": 0.2}},
    })
}

/// The token the app's default workspace uses (the emulator's API wants it).
fn workspace_token(app: &TestApp) -> String {
    app.overrides
        .iter()
        .find(|(k, _)| *k == "databricks.workspaces.default.token")
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// `GET /promises/{id}` as an operator.
async fn api_get(app: &TestApp, id: &str) -> Value {
    app.operator(app.http.get(format!("{}/promises/{id}", app.sidecar_url)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Fails twice, succeeds on the third attempt under `repair`: one run, two
/// repairs whose `latest_repair_id` chain is the emulator's, the promise
/// RESOLVED once with three attempts, one settlement event.
#[tokio::test]
async fn repair_mode_repairs_one_run_until_it_succeeds() {
    let mut app = TestApp::spawn().await;
    let job = flaky_job(&app, 2, 100, json!({"emulator.fail_task": "load"})).await;
    let id = unique("repair");
    app.publish(&retrying(&id, job, 3, "repair")).await;
    let (_, ev) = app.first_event(&id, Duration::from_secs(60)).await;
    assert_eq!(ev["data"]["state"], "RESOLVED", "{ev}");
    assert_eq!(ev["data"]["value"], "done");
    assert_eq!(ev["data"]["attempt"], 3);
    // The repaired task called back: a repair runs with the job's settings
    // and only the repair's parameters, so runbridge sends the callback
    // values again with it.
    assert_eq!(
        app.promise(&id).await.unwrap().settled_by.as_deref(),
        Some("callback"),
        "the repaired notebook had its promise id, URL and token"
    );
    let attempts = ev["data"]["attempts"].as_array().unwrap().clone();
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    let runs = app.runs_for(&id).await;
    assert_eq!(runs.len(), 1, "one run for every attempt: {runs:?}");
    let run = &runs[0];
    let run_id = run["run_id"].as_u64().unwrap();
    let repairs: Vec<u64> = run["repairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(repairs.len(), 2, "{run}");
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(a["attempt"], i as u64 + 1);
        assert_eq!(a["run_id"], run_id);
    }
    assert_eq!(attempts[0]["repair_id"], Value::Null);
    assert_eq!(attempts[1]["repair_id"], repairs[0]);
    assert_eq!(attempts[2]["repair_id"], repairs[1]);
    assert_eq!(attempts[0]["failure"]["result_state"], "FAILED");
    // Only the failed task ran again: extract kept its first task run.
    let history: Value = app
        .http
        .get(format!("{}/api/2.2/jobs/runs/get", app.emulator_url))
        .query(&[
            ("run_id", run_id.to_string()),
            ("include_history", "true".into()),
        ])
        .bearer_auth(workspace_token(&app))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = history["repair_history"].as_array().unwrap();
    assert_eq!(items.len(), 3, "{history}");
    assert_eq!(items[0]["type"], "ORIGINAL");
    assert_eq!(items[0]["task_run_ids"].as_array().unwrap().len(), 2);
    assert_eq!(items[1]["task_run_ids"].as_array().unwrap().len(), 1);
    assert_eq!(items[2]["id"], repairs[1]);
    app.assert_no_event(&id, Duration::from_secs(2), "one settlement")
        .await;
    app.stop().await;
}

/// The emulator refuses a stale or missing `latest_repair_id`, and a run in
/// progress, as the Jobs API documents.
#[tokio::test]
async fn the_emulator_checks_latest_repair_id() {
    let mut app = TestApp::spawn().await;
    let job = flaky_job(&app, 5, 50, json!({})).await;
    let id = unique("stale");
    // No retry policy: the run fails and the promise is rejected.
    app.publish(&json!({"id": id, "job_id": job})).await;
    let (_, ev) = app.first_event(&id, Duration::from_secs(30)).await;
    assert_eq!(ev["data"]["state"], "REJECTED");
    let run_id = ev["data"]["run_id"].as_u64().unwrap();
    let repair = |latest: Option<u64>| {
        let mut body = json!({"run_id": run_id, "rerun_all_failed_tasks": true});
        if let Some(l) = latest {
            body["latest_repair_id"] = json!(l);
        }
        app.http
            .post(format!("{}/api/2.2/jobs/runs/repair", app.emulator_url))
            .bearer_auth(workspace_token(&app))
            .json(&body)
            .send()
    };
    let first = repair(None).await.unwrap();
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.unwrap();
    let r1 = first["repair_id"].as_u64().unwrap();
    let in_progress = repair(Some(r1)).await.unwrap();
    assert_eq!(
        in_progress.status(),
        400,
        "a run in progress is not repaired"
    );
    // Found by its id: repaired without parameters, its notebook now sees
    // the job's defaults, not the promise id.
    eventually(Duration::from_secs(10), "the repaired run ends", || async {
        let runs = app.emulator_get("/emulator/runs").await;
        let run = runs["runs"]
            .as_array()?
            .iter()
            .find(|r| r["run_id"] == run_id)?
            .clone();
        (run["life_cycle_state"] == "TERMINATED").then_some(())
    })
    .await;
    for stale in [None, Some(r1 + 1000)] {
        let r = repair(stale).await.unwrap();
        assert_eq!(r.status(), 400, "stale {stale:?}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error_code"], "INVALID_PARAMETER_VALUE");
    }
    assert_eq!(repair(Some(r1)).await.unwrap().status(), 200);
    app.stop().await;
}

/// Fails twice under `rerun`: three runs with three distinct tokens, the
/// promise RESOLVED by the third.
#[tokio::test]
async fn rerun_mode_starts_a_new_run_per_attempt() {
    let mut app = TestApp::spawn().await;
    let job = flaky_job(&app, 2, 100, json!({})).await;
    let id = unique("rerun");
    app.publish(&retrying(&id, job, 3, "rerun")).await;
    let (_, ev) = app.first_event(&id, Duration::from_secs(60)).await;
    assert_eq!(ev["data"]["state"], "RESOLVED", "{ev}");
    let runs = app.runs_for(&id).await;
    assert_eq!(runs.len(), 3, "{runs:?}");
    let tokens: std::collections::BTreeSet<&str> = runs
        .iter()
        .map(|r| r["idempotency_token"].as_str().unwrap())
        .collect();
    assert_eq!(tokens.len(), 3, "one token per attempt: {tokens:?}");
    let attempts = ev["data"]["attempts"].as_array().unwrap();
    let run_ids: Vec<u64> = attempts
        .iter()
        .map(|a| a["run_id"].as_u64().unwrap())
        .collect();
    let mut emulated: Vec<u64> = runs.iter().map(|r| r["run_id"].as_u64().unwrap()).collect();
    emulated.sort();
    assert_eq!(run_ids, emulated);
    assert_eq!(ev["data"]["run_id"], run_ids[2]);
    app.assert_no_event(&id, Duration::from_secs(2), "one settlement")
        .await;
    app.stop().await;
}

/// An exhausted policy settles REJECTED with the last failure; a result
/// the policy does not name settles at once.
#[tokio::test]
async fn exhausted_or_unlisted_failures_settle() {
    let mut app = TestApp::spawn().await;
    let job = flaky_job(&app, 5, 50, json!({})).await;
    let id = unique("exhausted");
    app.publish(&retrying(&id, job, 2, "rerun")).await;
    let (_, ev) = app.first_event(&id, Duration::from_secs(60)).await;
    assert_eq!(ev["data"]["state"], "REJECTED", "{ev}");
    assert_eq!(ev["data"]["error"]["result_state"], "FAILED");
    assert_eq!(ev["data"]["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(app.runs_for(&id).await.len(), 2);

    let id = unique("unlisted");
    let mut t = retrying(&id, job, 5, "rerun");
    t["retry"]["on"] = json!(["CLUSTER_ERROR"]);
    app.publish(&t).await;
    let (_, ev) = app.first_event(&id, Duration::from_secs(60)).await;
    assert_eq!(ev["data"]["state"], "REJECTED");
    assert_eq!(ev["data"]["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(app.runs_for(&id).await.len(), 1, "no second run");
    app.stop().await;
}

/// A notebook's `reject` without `final` is retried at once (the
/// reconciler need not see the run end); with `final` it settles.
#[tokio::test]
async fn a_non_final_notebook_rejection_is_retried_and_an_operator_can_hurry_it() {
    let mut app = TestApp::spawn().await;
    let job = flaky_job(&app, 0, 60_000, json!({})).await;
    let id = unique("nbreject");
    let mut t = retrying(&id, job, 3, "rerun");
    t["retry"]["backoff"] = json!({"initial_seconds": 3600});
    t["timeout_seconds"] = json!(7200);
    app.publish(&t).await;
    wait_run_recorded(&app, &id).await;
    let url = app.callback_url(&id).await;
    let r = app
        .http
        .post(format!("{url}/reject"))
        .query(&[("id", id.as_str()), ("error", "transient")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let p = api_get(&app, &id).await;
    assert_eq!(p["state"], "PENDING");
    assert_eq!(p["attempts"].as_array().unwrap().len(), 1, "{p}");
    assert!(p["nextAttemptAt"].as_i64().is_some(), "{p}");
    // An hour's backoff; the operator asks for the retry now.
    let r = app
        .operator(app.http.post(format!("{}/promises/retry", app.sidecar_url)))
        .json(&json!({"id": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    eventually(Duration::from_secs(15), "the second run", || async {
        (app.runs_for(&id).await.len() == 2).then_some(())
    })
    .await;
    let p = api_get(&app, &id).await;
    assert_eq!(p["attempt"], 2, "{p}");
    // Not waiting any more: a second retry is refused.
    let r = app
        .operator(app.http.post(format!("{}/promises/retry", app.sidecar_url)))
        .json(&json!({"id": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    // Final: settles.
    let url = app.callback_url(&id).await;
    let r = app
        .http
        .post(format!("{url}/reject"))
        .query(&[
            ("id", id.as_str()),
            ("error", "bad input"),
            ("final", "true"),
        ])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let (_, ev) = app.first_event(&id, Duration::from_secs(10)).await;
    assert_eq!(ev["data"]["state"], "REJECTED");
    assert_eq!(ev["data"]["attempts"].as_array().unwrap().len(), 2);
    app.stop().await;
}

/// 1,000 updates in 10 s with a 1 s interval: at most ~11 progress events,
/// in order, the last carrying the latest values, none after settlement.
#[tokio::test]
async fn chatty_progress_is_coalesced_and_stops_at_settlement() {
    let mut app = TestApp::spawn().await;
    let job = flaky_job(&app, 0, 10_000, json!({"emulator.progress": "1000"})).await;
    let id = unique("chatty");
    app.publish(&json!({"id": id, "job_id": job})).await;
    let events = app.events_for(&id, Duration::from_secs(25)).await;
    let bodies: Vec<&Value> = events.iter().map(|(_, v)| v).collect();
    let settled = bodies
        .iter()
        .position(|v| v["type"] == "io.runbridge.promise.resolved")
        .expect("settled");
    let progress: Vec<&&Value> = bodies
        .iter()
        .filter(|v| v["type"] == "io.runbridge.promise.progress")
        .collect();
    assert!(
        (5..=12).contains(&progress.len()),
        "{} progress events",
        progress.len()
    );
    assert!(
        bodies[settled + 1..].is_empty(),
        "nothing after the settlement: {:?}",
        bodies
            .iter()
            .map(|v| (v["type"].clone(), v["id"].clone()))
            .collect::<Vec<_>>()
    );
    let seqs: Vec<u64> = progress
        .iter()
        .map(|v| v["data"]["progress"]["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    let last = progress.last().unwrap();
    assert_eq!(
        last["id"],
        format!("{id}/progress/{}", seqs.last().unwrap())
    );
    assert_eq!(
        *seqs.last().unwrap(),
        1000,
        "the last carries the latest update: {seqs:?}"
    );
    assert_eq!(last["data"]["attempt"], 1);
    assert!(last["data"]["run_id"].as_u64().is_some());
    // The promise keeps the latest and a short history.
    let p = api_get(&app, &id).await;
    assert_eq!(p["progress"]["seq"].as_u64(), Some(1000));
    assert_eq!(p["progressHistory"].as_array().unwrap().len(), 20);
    app.stop().await;
}

/// A bad update is refused with a reason and changes nothing.
#[tokio::test]
async fn bad_progress_is_refused() {
    let app = TestApp::spawn().await;
    let job = flaky_job(&app, 0, 60_000, json!({})).await;
    let id = unique("badprogress");
    app.publish(&json!({"id": id, "job_id": job})).await;
    wait_run_recorded(&app, &id).await;
    let url = app.callback_url(&id).await;
    let r = app
        .http
        .post(format!("{url}/progress"))
        .query(&[("id", id.as_str())])
        .json(&json!({"percent": 140}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let p = api_get(&app, &id).await;
    assert!(p.get("progress").is_none(), "{p}");
    let r = app
        .http
        .post(format!("{}/progress", app.sidecar_url))
        .query(&[("id", id.as_str())])
        .json(&json!({"percent": 40}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "no token, no progress");
    app.stop().await;
}

/// Under `rerun`, a worker SIGKILLed after the second relaunch's `run-now`
/// returned and before the run was recorded: the next worker launches that
/// attempt again with the same token and gets the same run. Three attempts,
/// exactly three runs, one settlement.
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a_worker_killed_during_the_second_relaunch_still_makes_three_runs() {
    let mut app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let job = flaky_job(&app, 2, 1500, json!({})).await;
    let marker = app.failpoint_marker();
    // The first relaunch goes on; the second pauses after run-now answered.
    let mut first = app.spawn_worker("retry.after_relaunch=pause#2");
    let id = unique("killed-relaunch");
    app.publish(&retrying(&id, job, 3, "rerun")).await;
    // What this waits for: a worker process started under the test's load,
    // two 1.5 s runs each found failed by a check, two relaunches. Here it
    // takes 10 s, also beside four busy loops on two cores; a loaded `make
    // test` took over 30 s once, so the bound is the one the settlement
    // below has.
    app.wait_failpoint("retry.after_relaunch", Duration::from_secs(60))
        .await;
    assert_eq!(app.runs_for(&id).await.len(), 3, "the third run exists");
    first.start_kill().expect("SIGKILL");
    assert!(!first.wait().await.unwrap().success());
    let p = app.promise(&id).await.unwrap();
    assert_eq!(p.retry.attempt, 3, "the third attempt has begun");
    assert!(
        p.retry.launching && p.run_id.is_none(),
        "its run was never recorded"
    );

    let mut second = app.spawn_worker("");
    let (ev, v) = app.first_event(&id, Duration::from_secs(60)).await;
    assert_eq!(v["data"]["state"], "RESOLVED", "{v}");
    let runs = app.runs_for(&id).await;
    assert_eq!(runs.len(), 3, "still exactly three runs: {runs:?}");
    let tokens: std::collections::BTreeSet<&str> = runs
        .iter()
        .map(|r| r["idempotency_token"].as_str().unwrap())
        .collect();
    assert_eq!(tokens.len(), 3);
    let more = app.events_for(&id, Duration::from_secs(2)).await;
    assert!(
        more.iter().all(|(e, _)| e.message_id == ev.message_id),
        "duplicates only with the same event id"
    );
    second.start_kill().ok();
    let _ = std::fs::remove_file(&marker);
    app.stop().await;
}

/// The control queue's `retry` and `runbridge promise retry` start a
/// waiting promise's next attempt now; the CLI says why when it is not
/// waiting, and changes nothing.
#[tokio::test]
async fn retry_now_by_control_queue_and_cli() {
    let app = TestApp::spawn().await;
    let job = flaky_job(&app, 0, 60_000, json!({})).await;
    let id = unique("hurry");
    let mut t = retrying(&id, job, 3, "rerun");
    t["retry"]["backoff"] = json!({"initial_seconds": 3600});
    t["timeout_seconds"] = json!(7200);
    app.publish(&t).await;
    let reject = |n: usize| {
        let (app, id) = (&app, id.clone());
        async move {
            eventually(Duration::from_secs(15), "the attempt's run", || async {
                (app.runs_for(&id).await.len() == n).then_some(())
            })
            .await;
            wait_run_recorded(app, &id).await;
            let url = app.callback_url(&id).await;
            let r = app
                .http
                .post(format!("{url}/reject"))
                .query(&[("id", id.as_str()), ("error", "transient")])
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202, "attempt {n} retried");
        }
    };
    reject(1).await;
    app.publisher
        .publish_control(
            &app.settings.amqp.control_queue,
            json!({"action": "retry", "id": id}).to_string().as_bytes(),
        )
        .await
        .unwrap();
    reject(2).await;
    let cli = |args: Vec<String>| {
        let app = &app;
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_runbridge"))
                .args(args)
                .envs(app.env_vars())
                .output()
                .await
                .unwrap()
        }
    };
    let out = cli(vec!["promise".into(), "retry".into(), id.clone()]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(Duration::from_secs(15), "the third run", || async {
        (app.runs_for(&id).await.len() == 3).then_some(())
    })
    .await;
    let p = api_get(&app, &id).await;
    assert_eq!(p["attempt"], 3, "{p}");
    // Running, not waiting: refused with the reason, nothing changes.
    wait_run_recorded(&app, &id).await;
    let out = cli(vec!["promise".into(), "retry".into(), id.clone()]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not waiting for a retry"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(app.runs_for(&id).await.len(), 3);
    app.stop().await;
}
