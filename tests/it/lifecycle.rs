//! The whole run lifecycle: runs that end without calling back,
//! deadlines and heartbeats, cancellation by every path, notifications,
//! several workspaces, and a sweep whose cost follows what is due.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use runbridge::domain::{IdempotencyToken, PromiseId};
use runbridge::reconciler::Reconciler;
use runbridge::store::{PromiseStore, Timeout};
use serde_json::{Value, json};

use crate::helpers::*;

fn only_event(
    events: Vec<(runbridge::broker::ReceivedEvent, Value)>,
) -> (runbridge::broker::ReceivedEvent, Value) {
    assert_eq!(
        events.len(),
        1,
        "exactly one event: {:?}",
        events.iter().map(|e| &e.1).collect::<Vec<_>>()
    );
    events.into_iter().next().unwrap()
}

/// A run that fails without calling back ends REJECTED with the emulator's
/// state message, settled by the reconciler, with one event.
#[tokio::test]
async fn failed_run_without_callback_is_rejected_by_the_reconciler() {
    let mut app = TestApp::spawn().await;
    let id = unique("fails");
    app.publish(&trigger(&id, JOB_FAIL)).await;
    let (ev, v) = only_event(app.events_for(&id, Duration::from_secs(6)).await);
    assert_eq!(ev.routing_key, "promise.rejected");
    assert_eq!(v["data"]["settled_by"], "reconciler");
    assert_eq!(v["data"]["error"]["reason"], "run_failed");
    assert_eq!(v["data"]["error"]["result_state"], "FAILED");
    assert_eq!(
        v["data"]["error"]["state_message"],
        "Workload failed, see run output for details"
    );
    assert_eq!(
        v["data"]["error"]["termination_details"]["code"],
        "RUN_EXECUTION_ERROR"
    );
    app.stop().await;
}

/// A notebook that only calls `dbutils.notebook.exit(value)` needs no
/// callback: the exit value resolves the promise.
#[tokio::test]
async fn exit_value_without_callback_resolves() {
    let mut app = TestApp::spawn().await;
    let id = unique("exit");
    app.publish(&trigger(&id, JOB_EXIT_ONLY)).await;
    let (ev, v) = only_event(app.events_for(&id, Duration::from_secs(6)).await);
    assert_eq!(ev.routing_key, "promise.resolved");
    assert_eq!(v["data"]["value"], "exit value");
    assert_eq!(v["data"]["settled_by"], "reconciler");
    app.stop().await;
}

/// Success with neither callback nor exit value follows the configured
/// policy: REJECTED completed_without_callback by default, or null.
#[tokio::test]
async fn success_without_output_follows_the_policy() {
    let mut app = TestApp::spawn().await;
    let id = unique("quiet");
    app.publish(&trigger(&id, JOB_NO_OUTPUT)).await;
    let (_, v) = app.first_event(&id, Duration::from_secs(6)).await;
    assert_eq!(v["data"]["state"], "REJECTED");
    assert_eq!(v["data"]["error"]["reason"], "completed_without_callback");
    app.stop().await;

    let mut app = TestApp::spawn_with(Options {
        overrides: vec![("reconciler.success_without_output", "resolve_null".into())],
        ..Default::default()
    })
    .await;
    let id = unique("quiet-null");
    app.publish(&trigger(&id, JOB_NO_OUTPUT)).await;
    let (_, v) = app.first_event(&id, Duration::from_secs(6)).await;
    assert_eq!(v["data"]["state"], "RESOLVED");
    assert_eq!(v["data"]["value"], Value::Null);
    app.stop().await;
}

/// Databricks' own retry is not the end of a run: WAITING_FOR_RETRY keeps the
/// promise pending (while the reconciler checks it), and the callback of the
/// second attempt settles it.
#[tokio::test]
async fn databricks_retries_keep_the_promise_pending() {
    let mut app = TestApp::spawn().await;
    let id = unique("retried");
    app.publish(&trigger(&id, JOB_RETRIED)).await;
    eventually(
        Duration::from_secs(10),
        "the run waiting for retry",
        || async {
            let runs = app.runs_for(&id).await;
            (runs.first()?["life_cycle_state"] == "WAITING_FOR_RETRY").then_some(())
        },
    )
    .await;
    let gets_before = app.emulator_stats().await["calls"]["jobs/runs/get"]
        .as_u64()
        .unwrap_or(0);
    eventually(
        Duration::from_secs(5),
        "a check during the retry",
        || async {
            (app.emulator_stats().await["calls"]["jobs/runs/get"].as_u64()? > gets_before)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        app.promise(&id).await.unwrap().state.as_str(),
        "PENDING",
        "still pending during Databricks' retry"
    );
    let (_, v) = app.first_event(&id, Duration::from_secs(10)).await;
    assert_eq!(v["data"]["state"], "RESOLVED");
    assert_eq!(v["data"]["value"], "second attempt");
    assert_eq!(v["data"]["settled_by"], "callback");
    assert_eq!(run_of(&app, &id).await["attempt_number"], 1);
    app.stop().await;
}

async fn run_of(app: &TestApp, id: &str) -> Value {
    app.runs_for(id).await.into_iter().next().expect("a run")
}

/// A notebook that stops heartbeating: REJECTED_TIMEDOUT before the overall
/// timeout, its run cancelled, and a late callback gets 403 and changes nothing.
#[tokio::test]
async fn missed_heartbeat_times_out_and_cancels_the_run() {
    let mut app = TestApp::spawn().await;
    let id = unique("silent");
    app.publish(
        &json!({"id": id, "job_id": JOB_NEVER, "heartbeat_seconds": 1, "timeout_seconds": 600}),
    )
    .await;
    let url = app.callback_url(&id).await;
    wait_run_recorded(&app, &id).await;
    let r = app
        .http
        .post(format!("{url}/heartbeat"))
        .query(&[("id", id.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let (ev, v) = app.first_event(&id, Duration::from_secs(8)).await;
    assert_eq!(ev.routing_key, "promise.rejected_timedout");
    assert_eq!(v["data"]["settled_by"], "timeout");
    assert_eq!(v["data"]["error"]["reason"], "heartbeat");
    let p = app.promise(&id).await.unwrap();
    assert!(
        p.completed_on.unwrap() < p.timeout,
        "ended before the overall timeout"
    );
    wait_run_cancelled(&app, &id).await;

    let r = app
        .http
        .post(format!("{url}/resolve"))
        .query(&[("id", id.as_str()), ("value", "late")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["state"],
        "REJECTED_TIMEDOUT"
    );
    assert_eq!(
        app.promise(&id).await.unwrap().view(),
        p.view(),
        "the late callback changed nothing"
    );
    app.assert_no_event(&id, Duration::from_millis(800), "no further event")
        .await;
    app.stop().await;
}

/// The overall timeout without heartbeats, and cancel_on_timeout=false keeps the run.
#[tokio::test]
async fn overall_timeout_rejects_and_respects_cancel_on_timeout() {
    let mut app = TestApp::spawn().await;
    let a = unique("timeout");
    let b = unique("timeout-keep");
    app.publish(&json!({"id": a, "job_id": JOB_NEVER, "timeout_seconds": 1}))
        .await;
    app.publish(
        &json!({"id": b, "job_id": JOB_NEVER, "timeout_seconds": 1, "cancel_on_timeout": false}),
    )
    .await;
    let events = app
        .events_for_all(&[a.clone(), b.clone()], Duration::from_secs(8))
        .await;
    assert_eq!(events[&a][0]["data"]["error"]["reason"], "timeout");
    assert_eq!(events[&b][0]["data"]["state"], "REJECTED_TIMEDOUT");
    wait_run_cancelled(&app, &a).await;
    tokio::time::sleep(Duration::from_millis(800)).await; // a few reconciler ticks
    assert_eq!(
        run_of(&app, &b).await["life_cycle_state"],
        "RUNNING",
        "cancel_on_timeout=false leaves the run alone"
    );
    app.stop().await;
}

/// Cancel by each of the three paths: operator PATCH, the CLI, the control
/// queue. Each ends REJECTED_CANCELED with its run cancelled and one event.
#[tokio::test]
async fn cancel_by_api_cli_and_control_queue() {
    let mut app = TestApp::spawn().await;
    let ids: Vec<String> = ["cancel-api", "cancel-cli", "cancel-ctl"]
        .iter()
        .map(|p| unique(p))
        .collect();
    for id in &ids {
        app.publish(&trigger(id, JOB_NEVER)).await;
    }
    for id in &ids {
        wait_run_recorded(&app, id).await;
    }
    // 1. Operator API.
    let r = app
        .operator(
            app.http
                .patch(format!("{}/promises/{}", app.sidecar_url, ids[0])),
        )
        .json(&json!({"state": "REJECTED_CANCELED", "value": {"data": "operator said so"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // 2. CLI.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_runbridge"))
        .args(["promise", "cancel", &ids[1]])
        .envs(app.env_vars())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report, json!({"matched": 1, "cancelled": 1}));
    // 3. Control queue.
    app.publisher
        .publish_control(
            &app.settings.amqp.control_queue,
            json!({"action": "cancel", "id": ids[2]})
                .to_string()
                .as_bytes(),
        )
        .await
        .unwrap();

    let events = app.events_for_all(&ids, Duration::from_secs(10)).await;
    for id in &ids {
        assert_eq!(events[id].len(), 1);
        assert_eq!(events[id][0]["data"]["state"], "REJECTED_CANCELED");
        assert_eq!(events[id][0]["data"]["settled_by"], "operator");
        wait_run_cancelled(&app, id).await;
    }
    app.assert_no_event(&ids[0], Duration::from_millis(800), "no second event")
        .await;

    // Cancelling what is unknown or settled is a no-op answer, not an error.
    let r: Value = app
        .operator(
            app.http
                .post(format!("{}/promises/cancel", app.sidecar_url)),
        )
        .json(&json!({"id": ids[0]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r, json!({"matched": 0, "cancelled": 0}));
    let r = app
        .operator(
            app.http
                .post(format!("{}/promises/cancel", app.sidecar_url)),
        )
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    app.stop().await;
}

/// Bulk cancel by tag over 500 pending promises, with 500 others not
/// matching: exactly the 500 and their runs are cancelled.
#[tokio::test]
async fn bulk_cancel_by_tag_cancels_exactly_the_matches() {
    let mut app = TestApp::spawn_with(Options {
        overrides: vec![
            ("amqp.prefetch", "128".into()),
            ("reconciler.first_poll_ms", "600000".into()),
        ],
        ..Default::default()
    })
    .await;
    let batch = unique("b");
    let mut hit = Vec::new();
    let mut miss = Vec::new();
    for i in 0..1000 {
        let id = format!("{batch}-{i:04}");
        let group = if i % 2 == 0 { "cancel-me" } else { "keep-me" };
        app.publish(
            &json!({"id": id, "job_id": JOB_NEVER, "tags": {"group": group, "batch": batch}}),
        )
        .await;
        if i % 2 == 0 {
            hit.push(id)
        } else {
            miss.push(id)
        }
    }
    eventually(Duration::from_secs(60), "1000 runs recorded", || async {
        let n = app.emulator_stats().await["runs"].as_u64()?;
        (n == 1000).then_some(())
    })
    .await;
    for id in hit.iter().chain(&miss) {
        wait_run_recorded(&app, id).await;
    }
    let r: Value = app
        .operator(
            app.http
                .post(format!("{}/promises/cancel", app.sidecar_url)),
        )
        .json(&json!({"tags": {"group": "cancel-me", "batch": batch}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r, json!({"matched": 500, "cancelled": 500}));
    let events = app.events_for_all(&hit, Duration::from_secs(30)).await;
    assert!(
        hit.iter().all(
            |id| events[id].len() == 1 && events[id][0]["data"]["state"] == "REJECTED_CANCELED"
        )
    );
    let runs = eventually(Duration::from_secs(30), "500 runs cancelled", || async {
        let v = app.emulator_get("/emulator/runs").await;
        let runs = v["runs"].as_array()?.clone();
        (runs
            .iter()
            .filter(|r| r["result_state"] == "CANCELED")
            .count()
            == 500)
            .then_some(runs)
    })
    .await;
    for r in &runs {
        let pid = r["params"]["promise_id"].as_str().unwrap().to_string();
        let cancelled = r["result_state"] == "CANCELED";
        assert_eq!(
            cancelled,
            hit.contains(&pid),
            "{pid}: only the matching runs are cancelled"
        );
    }
    for id in &miss {
        assert_eq!(app.promise(id).await.unwrap().state.as_str(), "PENDING");
    }
    app.stop().await;
}

/// A job notification for a finished run settles its promise on the next
/// tick, without waiting for the backing-off schedule (here 10 minutes).
#[tokio::test]
async fn job_notification_triggers_an_immediate_check() {
    let mut app = TestApp::spawn_with(Options {
        overrides: vec![
            ("reconciler.first_poll_ms", "600000".into()),
            (
                "auth.notification_password",
                "hook-secret-0123456789".into(),
            ),
        ],
        ..Default::default()
    })
    .await;
    let url = format!("{}/databricks/notifications", app.sidecar_url);
    let r = app
        .http
        .post(&url)
        .basic_auth("databricks", Some("wrong"))
        .json(&json!({"event_type": "jobs.on_success", "run": {"run_id": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    app.http
        .post(format!("{}/emulator/notifications", app.emulator_url))
        .json(&json!({"url": url, "username": "databricks", "password": "hook-secret-0123456789"}))
        .send()
        .await
        .unwrap();
    let id = unique("notified");
    app.publish(&trigger(&id, JOB_FAIL)).await;
    let (_, v) = app.first_event(&id, Duration::from_secs(8)).await;
    assert_eq!(v["data"]["state"], "REJECTED");
    assert_eq!(v["data"]["settled_by"], "reconciler");
    app.stop().await;
}

/// A trigger's `workspace` picks a configured workspace; the idempotency
/// token includes it; an unknown workspace is dead-lettered.
#[tokio::test]
async fn workspace_selects_credentials_and_token() {
    let mut app = TestApp::spawn_with(Options {
        overrides: vec![
            ("databricks.workspaces.analytics.host", "{emulator}".into()),
            ("databricks.workspaces.analytics.token", "dapi-test".into()),
        ],
        ..Default::default()
    })
    .await;
    let id = unique("ws");
    app.publish(&json!({"id": id, "job_id": JOB_CALLBACK, "workspace": "analytics"}))
        .await;
    let (_, v) = app.first_event(&id, Duration::from_secs(10)).await;
    assert_eq!(v["source"], "runbridge/analytics");
    let run = run_of(&app, &id).await;
    let pid = PromiseId::parse(&id).unwrap();
    let created = app.promise(&id).await.unwrap().created_on;
    assert_eq!(
        run["idempotency_token"],
        IdempotencyToken::derive_v2("analytics", &pid, created).as_str()
    );
    assert_ne!(
        run["idempotency_token"],
        IdempotencyToken::derive_v2("default", &pid, created).as_str()
    );

    let bad = unique("ws-bad");
    let body = json!({"id": bad, "job_id": JOB_CALLBACK, "workspace": "nope"});
    app.publish(&body).await;
    let dead = app.dead_letters(Duration::from_secs(10), 1).await;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].headers["x-runbridge-error"].contains("unknown workspace \"nope\""),
        "{:?}",
        dead[0].headers
    );
    assert!(app.promise(&bad).await.is_none());
    app.stop().await;
}

/// A sweep over 100,000 pending promises of which 10 are due reads only those 10.
#[tokio::test]
async fn sweep_reads_only_what_is_due() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let new = |id: String, after: Duration| {
        new_promise(&PromiseId::parse(&id).unwrap(), Timeout::After(after))
    };
    let store = app.store.clone();
    futures_util::stream::iter(0..100_000)
        .map(|i| {
            let store = store.clone();
            let p = new(format!("bulk-{i:06}"), Duration::from_secs(3600));
            async move { store.create(&p).await.unwrap() }
        })
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await;
    for i in 0..10 {
        store
            .create(&new(format!("due-{i}"), Duration::from_millis(100)))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reconciler = Reconciler::new(
        store.clone(),
        runbridge::startup::jobs_client(&app.settings, None).unwrap(),
        runbridge::startup::reconciler_settings(&app.settings),
    );
    let report = reconciler.tick().await.unwrap();
    assert_eq!(report.due_read, 10, "{report:?}");
    assert_eq!(report.timed_out, 10, "{report:?}");
    let again = reconciler.tick().await.unwrap();
    assert_eq!(again.due_read, 0, "{again:?}");
    app.stop().await;
}
