//! The audit: runs started outside runbridge, or left behind, found in the
//! workspace and dealt with as `[audit.actions]` says (docs/operating.md).

use std::time::Duration;

use runbridge::broker::{EventListener, ReceivedEvent};
use runbridge::domain::State;
use serde_json::{Value, json};

use crate::helpers::*;

/// Settings that let an audit see what a test just did: every 300 ms, a
/// grace of one second, a pending promise lost one second after its run ended.
fn audited() -> Vec<(&'static str, String)> {
    vec![
        ("audit.interval_ms", "300".into()),
        ("audit.grace_ms", "1000".into()),
        ("audit.lost_after_ms", "1000".into()),
    ]
}

async fn spawn_audited(extra: Vec<(&'static str, String)>) -> (TestApp, EventListener) {
    let mut overrides = audited();
    overrides.extend(extra);
    let app = TestApp::spawn_with(Options {
        overrides,
        ..Default::default()
    })
    .await;
    let findings = findings_listener(&app).await;
    (app, findings)
}

async fn findings_listener(app: &TestApp) -> EventListener {
    app.broker
        .listen(Some(&app.settings.amqp.events_exchange), "audit.#")
        .await
        .expect("listen for findings")
}

/// The emulator's record of run `run_id`.
async fn emulator_run(app: &TestApp, run_id: u64) -> Value {
    app.emulator_get("/emulator/runs").await["runs"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .find(|r| r["run_id"] == json!(run_id))
        .expect("the run is in the emulator")
}

async fn wait_cancelled(app: &TestApp, run_id: u64) -> Value {
    eventually(Duration::from_secs(20), "the run cancelled", || async {
        let r = emulator_run(app, run_id).await;
        (r["result_state"] == "CANCELED" && r["life_cycle_state"] == "TERMINATED").then_some(r)
    })
    .await
}

/// The next finding event of `kind` for promise `id` (others are skipped).
async fn next_finding(
    findings: &mut EventListener,
    kind: &str,
    id: &str,
) -> (ReceivedEvent, Value) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let ev = tokio::time::timeout(left, findings.next())
            .await
            .unwrap_or_else(|_| panic!("no {kind} finding for {id} within 20 s"))
            .expect("listener open");
        let v: Value = serde_json::from_slice(&ev.body).expect("finding JSON");
        if v["data"]["kind"] == kind && v["subject"] == id {
            return (ev, v);
        }
    }
}

/// No second event with the same id while several more audits run.
async fn assert_not_repeated(findings: &mut EventListener, event_id: &str) {
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(Some(ev)) = tokio::time::timeout_at(until, findings.next()).await {
        assert_ne!(
            ev.message_id.as_deref(),
            Some(event_id),
            "a re-audit repeated the finding"
        );
    }
}

#[tokio::test]
async fn an_orphan_started_by_hand_for_a_settled_promise_is_found_and_cancelled() {
    let (mut app, mut findings) = spawn_audited(vec![]).await;
    let id = unique("orphan");
    app.publish(&trigger(&id, JOB_CALLBACK)).await;
    let (_, v) = app.first_event(&id, Duration::from_secs(20)).await;
    assert_eq!(v["data"]["state"], "RESOLVED");

    // Someone runs the job again by hand with the settled promise's id.
    let run = app.run_by_hand(JOB_NEVER, json!({"promise_id": id})).await;
    let (ev, f) = next_finding(&mut findings, "orphan", &id).await;
    assert_eq!(ev.routing_key, "audit.orphan");
    assert_eq!(f["type"], "io.runbridge.audit.finding");
    assert_eq!(f["id"], format!("audit/orphan/{id}/{run}"));
    assert_eq!(ev.message_id.as_deref(), f["id"].as_str());
    assert_eq!(f["data"]["run"]["run_id"], run);
    assert_eq!(f["data"]["promise"]["state"], "RESOLVED");
    assert_eq!(f["data"]["action"], "cancel");
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/schemas/finding-event.schema.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let errors: Vec<String> = jsonschema::validator_for(&schema)
        .unwrap()
        .iter_errors(&f)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "the event breaks docs/schemas/finding-event.schema.json: {errors:?}"
    );
    wait_cancelled(&app, run).await;
    assert_not_repeated(&mut findings, f["id"].as_str().unwrap()).await;
    assert_eq!(app.promise(&id).await.unwrap().state, State::Resolved);
    app.stop().await;
}

#[tokio::test]
async fn a_duplicate_is_cancelled_and_its_promise_left_alone() {
    let (app, mut findings) = spawn_audited(vec![]).await;
    let id = unique("dup");
    app.publish(&trigger(&id, JOB_NEVER)).await;
    wait_run_recorded(&app, &id).await;
    let own = app.promise(&id).await.unwrap().run_id.unwrap().get();

    let extra = app.run_by_hand(JOB_NEVER, json!({"promise_id": id})).await;
    let (_, f) = next_finding(&mut findings, "duplicate", &id).await;
    assert_eq!(f["data"]["run"]["run_id"], extra);
    assert_eq!(f["data"]["promise"]["run_id"], own);
    wait_cancelled(&app, extra).await;

    let p = app.promise(&id).await.unwrap();
    assert_eq!(p.state, State::Pending, "the promise is undisturbed");
    assert_eq!(p.run_id.map(|r| r.get()), Some(own));
    assert_eq!(emulator_run(&app, own).await["life_cycle_state"], "RUNNING");
    app.stop().await;
}

#[tokio::test]
async fn a_mismatch_is_reported_with_both_sides_and_nothing_changes() {
    let (mut app, mut findings) = spawn_audited(vec![]).await;
    let param = |name: &str| json!({"name": name, "default": ""});
    let job = app
        .create_job(json!({
            "name": unique("raises-after-callback"),
            "tasks": [{"task_key": "nb", "notebook_task": {"notebook_path": "/nb"}}],
            "parameters": [param("promise_id"), param("url"), param("callback_token")],
            "tags": {"emulator.outcome": "callback_then_fail", "emulator.delay_ms": "50"},
        }))
        .await;
    let id = unique("mismatch");
    app.publish(&trigger(&id, job)).await;
    let (_, v) = app.first_event(&id, Duration::from_secs(20)).await;
    assert_eq!(v["data"]["state"], "RESOLVED", "the notebook called back");

    let (_, f) = next_finding(&mut findings, "mismatch", &id).await;
    assert_eq!(f["data"]["promise"]["state"], "RESOLVED");
    assert_eq!(f["data"]["promise"]["settled_by"], "callback");
    assert_eq!(f["data"]["run"]["state"], "ENDED");
    assert_eq!(f["data"]["run"]["result"], "FAILED");
    assert_eq!(f["data"]["action"], "report");
    let p = app.promise(&id).await.unwrap();
    assert_eq!(p.state, State::Resolved, "nothing changed");
    app.assert_no_event(
        &id,
        Duration::from_millis(800),
        "no second completion event",
    )
    .await;
    app.stop().await;
}

/// The reconciler's first check of a run is ten minutes away (as if its
/// check had fallen off the schedule): the run ends, the promise stays
/// pending, and only the audit notices.
#[tokio::test]
async fn a_lost_promise_is_settled_from_its_run() {
    let (mut app, mut findings) = spawn_audited(vec![
        ("reconciler.first_poll_ms", "600000".into()),
        ("reconciler.max_poll_ms", "600000".into()),
    ])
    .await;
    let id = unique("lost");
    app.publish(&trigger(&id, JOB_EXIT_ONLY)).await;
    let (_, f) = next_finding(&mut findings, "lost", &id).await;
    assert_eq!(f["data"]["promise"]["state"], "PENDING");
    assert_eq!(f["data"]["run"]["result"], "SUCCESS");
    assert_eq!(f["data"]["action"], "settle");
    let (_, v) = app.first_event(&id, Duration::from_secs(20)).await;
    assert_eq!(v["data"]["state"], "RESOLVED");
    assert_eq!(v["data"]["settled_by"], "reconciler");
    assert_eq!(v["data"]["value"], "exit value");
    app.stop().await;
}

/// An operator cancels a promise while its worker is between `run-now`
/// and recording the run, and the worker dies there: nothing recorded the
/// run, so nothing would cancel it. The audit sees an active run whose
/// promise is cancelled and cancels it.
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn an_operators_cancel_in_the_launch_window_leaves_no_run_going() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        overrides: audited(),
        ..Default::default()
    })
    .await;
    let marker = app.failpoint_marker();
    let mut first = app.spawn_worker("worker.after_launch=pause");
    let id = unique("window");
    app.publish(&trigger(&id, JOB_NEVER)).await;
    app.wait_failpoint("worker.after_launch", Duration::from_secs(20))
        .await;
    let r = app
        .operator(
            app.http
                .post(format!("{}/promises/cancel", app.sidecar_url)),
        )
        .json(&json!({"id": id, "reason": "not needed"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    first.start_kill().expect("SIGKILL");
    let _ = first.wait().await;
    let p = app.promise(&id).await.unwrap();
    assert_eq!(p.state, State::RejectedCanceled);
    assert!(p.run_id.is_none(), "the run was never recorded");

    let mut second = app.spawn_worker("");
    let runs = app.runs_for(&id).await;
    assert_eq!(runs.len(), 1);
    let run = runs[0]["run_id"].as_u64().unwrap();
    wait_cancelled(&app, run).await;
    assert_eq!(app.runs_for(&id).await.len(), 1, "no second run");
    second.start_kill().ok();
    let _ = std::fs::remove_file(&marker);
    app.stop().await;
}

/// A job whose first run for a promise fails and whose later runs exit
/// with `value` without calling back.
async fn fails_once_job(app: &TestApp, value: &str) -> u64 {
    let param = |name: &str| json!({"name": name, "default": ""});
    app.create_job(json!({
        "name": unique("fails-once"),
        "tasks": [{"task_key": "nb", "notebook_task": {"notebook_path": "/nb"}}],
        "parameters": [param("promise_id"), param("url"), param("callback_token")],
        "max_concurrent_runs": 10,
        "tags": {
            "emulator.outcome": "success_no_callback",
            "emulator.delay_ms": "50",
            "emulator.value": value,
            "emulator.fail_attempts": "1",
        },
    }))
    .await
}

async fn adopt_over_http(app: &TestApp, id: &str, run: u64) -> (reqwest::StatusCode, Value) {
    let r = app
        .operator(app.http.post(format!("{}/promises/adopt", app.sidecar_url)))
        .json(&json!({"id": id, "run_id": run}))
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap())
}

/// The first run failed and the promise waits an hour for its retry; a
/// person re-runs the job from the UI and an operator adopts that run.
#[tokio::test]
async fn an_adopted_run_settles_its_promise_and_the_event_names_it() {
    let (mut app, _) = spawn_audited(vec![]).await;
    let job = fails_once_job(&app, "done by hand").await;
    let id = unique("adopt");
    let mut t = trigger(&id, job);
    t["retry"] = json!({"max_attempts": 3, "backoff": {"initial_seconds": 3600}});
    app.publish(&t).await;
    let p = eventually(
        Duration::from_secs(20),
        "the first attempt failed",
        || async { app.promise(&id).await.filter(|p| p.retry.next_at.is_some()) },
    )
    .await;
    let first = p.retry.failed[0]["run_id"].as_u64().unwrap();

    // Re-run with the promise's id (the emulator fails only the first run
    // of a promise).
    let by_hand = app.run_by_hand(job, json!({"promise_id": id})).await;
    let (status, body) = adopt_over_http(&app, &id, by_hand).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    assert_eq!(body["state"], "PENDING");

    let (_, v) = app.first_event(&id, Duration::from_secs(20)).await;
    assert_eq!(v["data"]["state"], "RESOLVED");
    assert_eq!(v["data"]["value"], "done by hand");
    assert_eq!(
        v["data"]["run_id"], by_hand,
        "the event names the adopted run"
    );
    let attempts = v["data"]["attempts"].as_array().unwrap();
    assert_eq!(attempts[0]["run_id"], first);
    assert_eq!(
        app.runs_for(&id).await.len(),
        2,
        "the first and the adopted: no retry was launched"
    );
    app.stop().await;
}

#[tokio::test]
async fn adoption_is_refused_with_the_reason_and_changes_nothing() {
    let (mut app, _) = spawn_audited(vec![]).await;
    let pending = unique("adopt-pending");
    app.publish(&trigger(&pending, JOB_NEVER)).await;
    wait_run_recorded(&app, &pending).await;
    let before = app.promise(&pending).await.unwrap();
    let other_job = app.run_by_hand(JOB_CALLBACK, json!({})).await;
    let (status, body) = adopt_over_http(&app, &pending, other_job).await;
    assert_eq!(status, reqwest::StatusCode::CONFLICT, "{body}");
    let said = body["error"]["message"].as_str().unwrap();
    assert!(
        said.contains(&format!("job {JOB_CALLBACK}")) && said.contains(&format!("job {JOB_NEVER}")),
        "{said}"
    );
    let (status, body) = adopt_over_http(&app, &pending, 987_654_321).await;
    assert_eq!(status, reqwest::StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{body}"
    );
    assert_eq!(
        app.promise(&pending).await.unwrap(),
        before,
        "nothing changed"
    );

    let settled = unique("adopt-settled");
    app.publish(&trigger(&settled, JOB_CALLBACK)).await;
    app.first_event(&settled, Duration::from_secs(20)).await;
    let again = app.run_by_hand(JOB_CALLBACK, json!({})).await;
    let (status, body) = adopt_over_http(&app, &settled, again).await;
    assert_eq!(status, reqwest::StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already settled"),
        "{body}"
    );
    app.stop().await;
}

/// `runbridge audit`: a table and exit 1 when something is found, exit 0
/// when nothing is; `--fix` cancels the orphan. The worker's own audit is
/// off here, so only the command acts.
#[tokio::test]
async fn runbridge_audit_prints_what_it_finds_and_fix_applies_the_actions() {
    let app = TestApp::spawn_with(Options {
        overrides: vec![
            ("audit.enabled", "false".into()),
            ("audit.grace_ms", "500".into()),
        ],
        ..Default::default()
    })
    .await;
    let audit = |args: &[&str]| {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_runbridge"));
        c.arg("audit").args(args).envs(app.env_vars());
        c
    };
    let out = audit(&["--since", "1h"]).output().await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 finding(s)"));

    let id = unique("cli-orphan");
    let run = app.run_by_hand(JOB_NEVER, json!({"promise_id": id})).await;
    let text = eventually(Duration::from_secs(20), "the orphan reported", || async {
        let out = audit(&["--since", "1h"]).output().await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.code() == Some(1) && text.contains("orphan")).then_some(text)
    })
    .await;
    assert!(
        text.contains(&run.to_string()) && text.contains(&id),
        "{text}"
    );
    assert!(text.contains("KIND") && text.contains("report"), "{text}");
    assert_eq!(
        emulator_run(&app, run).await["life_cycle_state"],
        "RUNNING",
        "a report changes nothing"
    );

    let out = audit(&["--since", "1h", "--fix", "--json"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let f: Value =
        serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(f["kind"], "orphan");
    assert_eq!(f["action"], "cancel");
    wait_cancelled(&app, run).await;
    let bad = audit(&["--since", "3w"]).output().await.unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("units"));
    app.stop().await;
}
