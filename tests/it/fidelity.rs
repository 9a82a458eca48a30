//! Databricks as it really behaves (docs/databricks-fidelity.md): refused
//! credentials, jobs with and without job parameters, unknown runs,
//! multi-task runs, queued and skipped runs, the run page, and idempotency
//! tokens bound to one incarnation of a promise id. Each against the
//! emulator over HTTP, the real RabbitMQ and Redis.

use std::collections::BTreeMap;
use std::time::Duration;

use runbridge::domain::{IdempotencyToken, PromiseId, RunId};
use runbridge::store::{PromiseStore, Timeout};
use serde_json::{Value, json};

use crate::helpers::*;

const TOKEN: &str = "dapi-test";

async fn set_token(app: &TestApp, state: &str, html: bool) {
    let r = app
        .http
        .post(format!("{}/emulator/tokens", app.emulator_url))
        .json(&json!({"token": TOKEN, "state": state, "html": html}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
}

/// The emulator's record of the run with this id.
async fn run_numbered(app: &TestApp, run_id: &Value) -> Value {
    app.emulator_get("/emulator/runs").await["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| &r["run_id"] == run_id)
        .cloned()
        .unwrap_or_else(|| panic!("no run {run_id}"))
}

/// An event's value that is JSON (the event carries it parsed).
fn json_value(event: &Value) -> Value {
    match &event["data"]["value"] {
        Value::String(s) => serde_json::from_str(s).unwrap(),
        other => other.clone(),
    }
}

fn notebook(key: &str) -> Value {
    json!({"task_key": key, "notebook_task": {"notebook_path": format!("/Shared/{key}")}})
}

/// A credentials outage (the token revoked while triggers flow, answered
/// first as JSON `{"error_code": 403, ...}`, then as the older HTML page)
/// rejects nothing and dead-letters nothing: 100 triggers, each run once,
/// all resolved once the token is valid again.
#[tokio::test]
async fn a_revoked_token_holds_every_trigger_until_it_is_restored() {
    let mut app = TestApp::spawn_with(Options {
        // A small delivery limit: a held delivery must never spend it.
        overrides: vec![("amqp.delivery_limit", "2".into())],
        ..Default::default()
    })
    .await;
    let ids: Vec<String> = (0..100).map(|i| unique(&format!("cred-{i}"))).collect();
    for id in &ids[..30] {
        app.publish(&trigger(id, JOB_CALLBACK)).await;
    }
    set_token(&app, "revoked", false).await;
    for id in &ids[30..70] {
        app.publish(&trigger(id, JOB_CALLBACK)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    set_token(&app, "revoked", true).await;
    for id in &ids[70..] {
        app.publish(&trigger(id, JOB_CALLBACK)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // During the outage: nothing rejected.
    for id in &ids {
        if let Some(p) = app.promise(id).await {
            assert!(
                p.state.as_str() == "PENDING" || p.state.as_str() == "RESOLVED",
                "{id} is {} during the outage",
                p.state
            );
        }
    }
    set_token(&app, "valid", false).await;
    let events = app.events_for_all(&ids, Duration::from_secs(60)).await;
    for id in &ids {
        let evs = &events[id];
        assert!(
            evs.iter().all(|e| e["data"]["state"] == "RESOLVED"),
            "{id}: {evs:?}"
        );
        assert_eq!(app.runs_for(id).await.len(), 1, "{id} ran once");
    }
    assert!(
        app.dead_letters(Duration::from_millis(500), 1)
            .await
            .is_empty(),
        "nothing dead-lettered"
    );
    app.stop().await;
}

/// A genuine `PERMISSION_DENIED` on the job stays a refusal of that
/// trigger: REJECTED with Databricks' answer, not held.
#[tokio::test]
async fn permission_denied_on_the_job_rejects_the_trigger() {
    let mut app = TestApp::spawn().await;
    app.inject("jobs/run-now", json!(["permission_denied"]))
        .await;
    let id = unique("denied");
    app.publish(&trigger(&id, JOB_CALLBACK)).await;
    let (ev, v) = app.first_event(&id, Duration::from_secs(10)).await;
    assert_eq!(ev.routing_key, "promise.rejected");
    assert_eq!(v["data"]["error"]["status"], 403);
    assert_eq!(v["data"]["error"]["error_code"], "PERMISSION_DENIED");
    app.stop().await;
}

/// The hourly quota of created runs is "later", not "never".
#[tokio::test]
async fn the_hourly_run_quota_is_retried() {
    let mut app = TestApp::spawn().await;
    app.inject("jobs/run-now", json!(["job_quota"])).await;
    let id = unique("quota");
    app.publish(&trigger(&id, JOB_CALLBACK)).await;
    let (ev, _) = app.first_event(&id, Duration::from_secs(15)).await;
    assert_eq!(ev.routing_key, "promise.resolved");
    app.stop().await;
}

/// The emulator enforces Databricks' rule both ways: task parameters on a
/// job with job parameters, job parameters on a job without, are 400.
#[tokio::test]
async fn the_emulator_refuses_parameters_a_job_cannot_take() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let plain = app
        .create_job(json!({"name": "plain", "tasks": [notebook("nb")]}))
        .await;
    let with = app.create_job(json!({"name": "with", "tasks": [notebook("nb")], "parameters": [{"name": "date", "default": ""}]}),
    )
    .await;
    for (job, body) in [
        (plain, json!({"job_parameters": {"date": "d"}})),
        (with, json!({"notebook_params": {"date": "d"}})),
    ] {
        let mut b = body;
        b["job_id"] = json!(job);
        let r = app
            .http
            .post(format!("{}/api/2.2/jobs/run-now", app.emulator_url))
            .bearer_auth(TOKEN)
            .json(&b)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{b}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error_code"], "INVALID_PARAMETER_VALUE");
    }
    app.stop().await;
}

/// A job that defines no job parameters gets the callback values as task
/// parameters (`notebook_params`), and its run settles by callback.
#[tokio::test]
async fn a_job_without_job_parameters_gets_notebook_params() {
    let mut app = TestApp::spawn().await;
    let job = app.create_job(json!({"name": "plain", "tasks": [notebook("nb")],
               "tags": {"emulator.outcome": "callback", "emulator.delay_ms": "50", "emulator.value": "by callback"}}),
    )
    .await;
    let id = unique("plain");
    app.publish(&json!({"id": id, "job_id": job})).await;
    let (ev, v) = app.first_event(&id, Duration::from_secs(10)).await;
    assert_eq!(ev.routing_key, "promise.resolved");
    assert_eq!(v["data"]["settled_by"], "callback");
    assert_eq!(v["data"]["value"], "by callback");
    let run = &app.runs_for(&id).await[0];
    assert!(run["job_parameters"].is_null(), "{run}");
    assert_eq!(run["notebook_params"]["promise_id"], json!(id));
    assert!(run["notebook_params"]["callback_token"].is_string());
    app.stop().await;
}

/// A job with job parameters but not the callback ones: its run gets only
/// the parameters it defines, still runs, and settles through the
/// reconciler with its exit value.
#[tokio::test]
async fn a_job_that_cannot_receive_the_callback_values_settles_by_exit_value() {
    let mut app = TestApp::spawn().await;
    let job = app.create_job(json!({"name": "dated", "tasks": [notebook("nb")],
               "parameters": [{"name": "date", "default": "today"}],
               "tags": {"emulator.outcome": "success_no_callback", "emulator.delay_ms": "50", "emulator.value": "exited"}}),
    )
    .await;
    let id = unique("dated");
    app.publish(&json!({"id": id, "job_id": job, "job_parameters": {"date": "2026-11-29"}}))
        .await;
    let (ev, v) = app.first_event(&id, Duration::from_secs(10)).await;
    assert_eq!(ev.routing_key, "promise.resolved");
    assert_eq!(v["data"]["settled_by"], "reconciler");
    assert_eq!(v["data"]["value"], "exited");
    let run = run_numbered(&app, &v["data"]["run_id"]).await;
    assert_eq!(run["job_parameters"], json!({"date": "2026-11-29"}));
    app.stop().await;
}

/// Databricks answers a run it does not know with 400 "Run N does not
/// exist": the promise settles (run_not_found) instead of waiting for its
/// timeout.
#[tokio::test]
async fn an_unknown_run_settles_its_promise() {
    let mut app = TestApp::spawn().await;
    let id = unique("ghost");
    let pid = PromiseId::parse(&id).unwrap();
    let mut new = new_promise(&pid, Timeout::After(Duration::from_secs(600)));
    new.job_id = Some(JOB_CALLBACK);
    app.store.create(&new).await.unwrap();
    app.store
        .record_run(&pid, RunId::new(987_654_321).unwrap(), None)
        .await
        .unwrap();
    let (ev, v) = app.first_event(&id, Duration::from_secs(10)).await;
    assert_eq!(ev.routing_key, "promise.rejected");
    assert_eq!(v["data"]["error"]["reason"], "run_not_found");
    app.stop().await;
}

fn two_task_job() -> Value {
    json!({"name": "two", "tasks": [notebook("ingest"), notebook("report")],
           "tags": {"emulator.outcome": "success_no_callback", "emulator.delay_ms": "50",
                    "emulator.value.ingest": "rows=10", "emulator.value.report": "done"}})
}

/// A multi-task run without callback: with `reconciler.output_task_key` it
/// resolves with that task's exit value (read from the task run: the parent
/// has no output of its own).
#[tokio::test]
async fn a_multi_task_run_resolves_with_the_configured_tasks_exit_value() {
    let mut app = TestApp::spawn_with(Options {
        overrides: vec![("reconciler.output_task_key", "report".into())],
        ..Default::default()
    })
    .await;
    let job = app.create_job(two_task_job()).await;
    let id = unique("two");
    app.publish(&json!({"id": id, "job_id": job})).await;
    let (ev, v) = app.first_event(&id, Duration::from_secs(10)).await;
    assert_eq!(ev.routing_key, "promise.resolved");
    assert_eq!(v["data"]["value"], "done");
    // The parent's output is refused, as Databricks refuses it.
    let run = &app.runs_for(&id).await[0];
    let r = app
        .http
        .get(format!(
            "{}/api/2.2/jobs/runs/get-output?run_id={}",
            app.emulator_url, run["run_id"]
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .starts_with("Retrieving the output of runs with multiple tasks is not supported"),
        "{e}"
    );
    app.stop().await;
}

/// Without a configured task, every task's exit value, by task key; a run
/// of 150 tasks needs two pages of `runs/get`, and every task is there.
#[tokio::test]
async fn without_a_configured_task_every_tasks_exit_value_counts() {
    let mut app = TestApp::spawn().await;
    let job = app.create_job(two_task_job()).await;
    let id = unique("all-tasks");
    app.publish(&json!({"id": id, "job_id": job})).await;
    let (_, v) = app.first_event(&id, Duration::from_secs(10)).await;
    assert_eq!(
        json_value(&v),
        json!({"ingest": "rows=10", "report": "done"})
    );

    let tasks: Vec<Value> = (0..150).map(|i| notebook(&format!("t{i:03}"))).collect();
    let big = app.create_job(json!({"name": "big", "tasks": tasks,
               "tags": {"emulator.outcome": "success_no_callback", "emulator.delay_ms": "50", "emulator.value": "ok"}}),
    )
    .await;
    let id = unique("big");
    app.publish(&json!({"id": id, "job_id": big})).await;
    let (_, v) = app.first_event(&id, Duration::from_secs(20)).await;
    let value: BTreeMap<String, Value> = serde_json::from_value(json_value(&v)).unwrap();
    assert_eq!(value.len(), 150, "every page of tasks was read");
    assert_eq!(value["t149"], "ok");
    app.stop().await;
}

/// `max_concurrent_runs` with queueing: runs wait QUEUED, one at a time,
/// and a queued run is not timed out for missing heartbeats (it cannot
/// beat before it starts); without queueing the extra run is SKIPPED and
/// its promise rejected.
#[tokio::test]
async fn queued_runs_wait_their_turn_and_skipped_runs_are_rejected() {
    let mut app = TestApp::spawn().await;
    let queued = app
        .create_job(
            json!({"name": "one-at-a-time", "tasks": [notebook("nb")], "max_concurrent_runs": 1,
               "queue": {"enabled": true}, "parameters": [{"name": "promise_id", "default": ""},
               {"name": "url", "default": ""}, {"name": "callback_token", "default": ""}],
               "tags": {"emulator.outcome": "callback", "emulator.delay_ms": "1000"}}),
        )
        .await;
    let ids: Vec<String> = (0..4).map(|i| unique(&format!("queued-{i}"))).collect();
    for id in &ids {
        app.publish(&json!({"id": id, "job_id": queued, "heartbeat_seconds": 3}))
            .await;
    }
    let events = app.events_for_all(&ids, Duration::from_secs(30)).await;
    for id in &ids {
        assert_eq!(events[id][0]["data"]["state"], "RESOLVED", "{id}");
    }
    let stats = app.emulator_stats().await;
    assert_eq!(stats["max_active_runs"][queued.to_string()], 1);

    let skipping = app
        .create_job(
            json!({"name": "no-queue", "tasks": [notebook("nb")], "max_concurrent_runs": 1,
               "queue": {"enabled": false},
               "tags": {"emulator.outcome": "callback", "emulator.delay_ms": "1500"}}),
        )
        .await;
    let (first, second) = (unique("runs"), unique("skipped"));
    app.publish(&json!({"id": first, "job_id": skipping})).await;
    eventually(Duration::from_secs(5), "first run launched", || async {
        (!app.runs_for(&first).await.is_empty()).then_some(())
    })
    .await;
    app.publish(&json!({"id": second, "job_id": skipping}))
        .await;
    let (ev, v) = app.first_event(&second, Duration::from_secs(10)).await;
    assert_eq!(ev.routing_key, "promise.rejected");
    assert_eq!(
        v["data"]["error"]["result_state"],
        "MAXIMUM_CONCURRENT_RUNS_REACHED"
    );
    assert_eq!(
        v["data"]["error"]["termination_details"]["code"],
        "MAX_CONCURRENT_RUNS_EXCEEDED"
    );
    app.stop().await;
}

/// A job created through Jobs API 2.2 without limits queues, one run at a
/// time: `jobs/get` shows `max_concurrent_runs` 1 and queueing on, and
/// three triggers run one after another, each resolved.
#[tokio::test]
async fn a_job_created_without_limits_has_the_2_2_defaults() {
    let mut app = TestApp::spawn().await;
    let job = app
        .create_job(json!({"name": "defaults", "tasks": [notebook("nb")],
            "parameters": [{"name": "promise_id", "default": ""}, {"name": "url", "default": ""},
                           {"name": "callback_token", "default": ""}],
            "tags": {"emulator.outcome": "callback", "emulator.delay_ms": "300"}}))
        .await;
    let got: Value = app
        .http
        .get(format!(
            "{}/api/2.2/jobs/get?job_id={job}",
            app.emulator_url
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["settings"]["max_concurrent_runs"], 1, "{got}");
    assert_eq!(got["settings"]["queue"]["enabled"], true, "{got}");
    let ids: Vec<String> = (0..3).map(|i| unique(&format!("default-{i}"))).collect();
    for id in &ids {
        app.publish(&json!({"id": id, "job_id": job})).await;
    }
    let events = app.events_for_all(&ids, Duration::from_secs(30)).await;
    for id in &ids {
        assert_eq!(events[id][0]["data"]["state"], "RESOLVED", "{id}");
    }
    assert_eq!(
        app.emulator_stats().await["max_active_runs"][job.to_string()],
        1
    );
    app.stop().await;
}

/// A run settled by the reconciler carries its run page in the event.
#[tokio::test]
async fn events_carry_the_run_page() {
    let mut app = TestApp::spawn().await;
    let id = unique("page");
    app.publish(&trigger(&id, JOB_EXIT_ONLY)).await;
    let (_, v) = app.first_event(&id, Duration::from_secs(10)).await;
    let run = &app.runs_for(&id).await[0];
    let url = v["data"]["run_page_url"].as_str().expect("a run page url");
    assert!(url.ends_with(&format!("/run/{}", run["run_id"])), "{url}");
    app.stop().await;
}

/// A run that calls back before its first check links its page too: the
/// worker reads the page when it launches (no check comes here before the
/// callback: the first is ten minutes away).
#[tokio::test]
async fn a_callback_before_the_first_check_links_the_run_page() {
    let mut app = TestApp::spawn_with(Options {
        overrides: vec![("reconciler.first_poll_ms", "600000".into())],
        ..Default::default()
    })
    .await;
    let id = unique("page-cb");
    app.publish(&trigger(&id, JOB_CALLBACK)).await;
    let (_, v) = app.first_event(&id, Duration::from_secs(10)).await;
    assert_eq!(v["data"]["settled_by"], "callback");
    let run = &app.runs_for(&id).await[0];
    let url = v["data"]["run_page_url"].as_str().expect("a run page url");
    assert!(url.ends_with(&format!("/run/{}", run["run_id"])), "{url}");
    app.stop().await;
}

/// An id used again after its promise expired is a new incarnation: a new
/// token, so a new run (Databricks would hand back the old run, and its old
/// result, for the old token).
#[tokio::test]
async fn an_id_used_again_after_its_promise_expired_starts_a_new_run() {
    let mut app = TestApp::spawn().await;
    let id = unique("again");
    app.publish(&trigger(&id, JOB_CALLBACK)).await;
    let (_, first) = app.first_event(&id, Duration::from_secs(10)).await;
    // What the retention period's expiry does to a settled promise.
    let Some((key, mut conn)) = app.promise_key(&id).await else {
        // Under a Redis Cluster the key lives on another node; the cluster
        // run covers the rest of this file.
        app.stop().await;
        return;
    };
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(app.promise(&id).await.is_none());
    app.publish(&trigger(&id, JOB_CALLBACK)).await;
    let (_, second) = app.first_event(&id, Duration::from_secs(10)).await;
    let runs = app.runs_for(&id).await;
    assert_eq!(runs.len(), 2, "a second run for the second incarnation");
    assert_ne!(runs[0]["idempotency_token"], runs[1]["idempotency_token"]);
    assert_ne!(first["data"]["run_id"], second["data"]["run_id"]);
    app.stop().await;
}

/// A promise created before token versions (no `tv` field) keeps its
/// version-1 token: a worker upgraded while it was in flight finds the run
/// it launched, and launches no second one.
#[tokio::test]
async fn a_promise_from_before_the_upgrade_keeps_its_token() {
    let mut app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let id = unique("old");
    let pid = PromiseId::parse(&id).unwrap();
    let v1 = IdempotencyToken::derive("default", &pid);
    // The old worker created the promise and launched, then died before
    // recording the run.
    let mut new = new_promise(&pid, Timeout::After(Duration::from_secs(600)));
    new.job_id = Some(JOB_EXIT_ONLY);
    app.store.create(&new).await.unwrap();
    let Some((key, mut conn)) = app.promise_key(&id).await else {
        app.stop().await;
        return;
    };
    let _: () = redis::cmd("HDEL")
        .arg(&key)
        .arg("tv")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(app.promise(&id).await.unwrap().idempotency_token(), v1);
    let r: Value = app
        .http
        .post(format!("{}/api/2.2/jobs/run-now", app.emulator_url))
        .bearer_auth(TOKEN)
        .json(&json!({"job_id": JOB_EXIT_ONLY, "idempotency_token": v1.as_str()}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let old_run = r["run_id"].clone();
    // The new worker redelivers the trigger.
    let worker = tokio::spawn({
        let (s, sd) = (app.settings.clone(), app.shutdown.clone());
        async move {
            let _ = runbridge::startup::run_worker(&s, sd).await;
        }
    });
    app.publish(&json!({"id": id, "job_id": JOB_EXIT_ONLY}))
        .await;
    let (_, v) = app.first_event(&id, Duration::from_secs(10)).await;
    assert_eq!(v["data"]["run_id"], old_run);
    let all: Vec<Value> = app.emulator_get("/emulator/runs").await["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["idempotency_token"] == json!(v1.as_str()))
        .cloned()
        .collect();
    assert_eq!(all.len(), 1, "no second run");
    app.stop().await;
    let _ = worker.await;
}

/// Databricks retried the task (its `max_retries`): `runs/get` lists the
/// failed attempt and the retry as two entries of one task key. The run is
/// still a single-task run, and its value is the latest attempt's exit
/// value, as it is.
#[tokio::test]
async fn a_retried_single_task_run_resolves_with_its_latest_attempts_plain_value() {
    let mut app = TestApp::spawn().await;
    let job = app
        .create_job(json!({"name": "retried", "tasks": [notebook("nb")],
            "tags": {"emulator.outcome": "retry_then_exit", "emulator.delay_ms": "100",
                     "emulator.value": "second try"}}))
        .await;
    let id = unique("retried-exit");
    app.publish(&json!({"id": id, "job_id": job})).await;
    let (ev, v) = app.first_event(&id, Duration::from_secs(15)).await;
    assert_eq!(ev.routing_key, "promise.resolved");
    assert_eq!(v["data"]["value"], "second try");
    let run = &app.runs_for(&id).await[0];
    let attempts: Vec<(Value, Value)> = run["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["task_key"].clone(), t["attempt_number"].clone()))
        .collect();
    assert_eq!(attempts, [(json!("nb"), json!(0)), (json!("nb"), json!(1))]);
    app.stop().await;
}

/// `reconciler.output_task_key` names a task that was retried: its value
/// is read from the latest attempt, not the failed first one.
#[tokio::test]
async fn the_output_task_is_read_from_its_latest_attempt() {
    let mut app = TestApp::spawn_with(Options {
        overrides: vec![("reconciler.output_task_key", "ingest".into())],
        ..Default::default()
    })
    .await;
    let job = app
        .create_job(
            json!({"name": "two retried", "tasks": [notebook("ingest"), notebook("report")],
            "tags": {"emulator.outcome": "retry_then_exit", "emulator.delay_ms": "100",
                     "emulator.value.ingest": "rows=10", "emulator.value.report": "done"}}),
        )
        .await;
    let id = unique("retried-key");
    app.publish(&json!({"id": id, "job_id": job})).await;
    let (ev, v) = app.first_event(&id, Duration::from_secs(15)).await;
    assert_eq!(ev.routing_key, "promise.resolved");
    assert_eq!(v["data"]["value"], "rows=10");
    app.stop().await;
}

/// `get-output` refused for good (here 403 `PERMISSION_DENIED`, as many
/// times as it is asked): the run's verdict stands without an exit value,
/// once; the promise is not held, asking again at every check, until its
/// timeout.
#[tokio::test]
async fn a_refused_output_reads_as_no_value_once() {
    let mut app = TestApp::spawn().await;
    app.inject("jobs/runs/get-output", json!(vec!["permission_denied"; 20]))
        .await;
    let id = unique("no-output");
    app.publish(&json!({"id": id, "job_id": JOB_EXIT_ONLY, "timeout_seconds": 60}))
        .await;
    let (_, v) = app.first_event(&id, Duration::from_secs(15)).await;
    // Without a value, the policy for a success without output (reject).
    assert_eq!(v["data"]["state"], "REJECTED", "{v}");
    assert_eq!(v["data"]["error"]["reason"], "completed_without_callback");
    assert_eq!(
        app.emulator_stats().await["calls"]["jobs/runs/get-output"],
        1,
        "asked once"
    );
    app.stop().await;
}
