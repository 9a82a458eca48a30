//! The main job, end to end.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

/// (a) one trigger → one run → the notebook's callback settles the promise →
/// exactly one `promise.resolved` event with the value, run id and tags.
#[tokio::test]
async fn trigger_runs_once_and_callback_emits_one_event() {
    let mut app = TestApp::spawn().await;
    let id = unique("nightly-sales");
    app.publish(&json!({
        "id": id, "job_id": JOB_CALLBACK,
        "job_parameters": {"date": "2026-11-23"},
        "tags": {"team": "growth"}
    }))
    .await;

    let (ev, v) = app.first_event(&id, Duration::from_secs(15)).await;
    assert_eq!(ev.routing_key, "promise.resolved");
    assert_eq!(
        ev.message_id.as_deref(),
        Some(format!("{id}/RESOLVED").as_str())
    );
    assert_eq!(
        ev.content_type.as_deref(),
        Some("application/cloudevents+json")
    );
    assert!(ev.persistent, "events are published persistent");
    assert_eq!(v["specversion"], "1.0");
    assert_eq!(v["type"], "io.runbridge.promise.resolved");
    assert_eq!(v["data"]["state"], "RESOLVED");
    assert_eq!(v["data"]["value"], "hello world");
    assert_eq!(v["data"]["tags"], json!({"team": "growth"}));
    assert_eq!(v["data"]["settled_by"], "callback");
    assert_eq!(v["data"]["job_id"], JOB_CALLBACK);

    let runs = app.runs_for(&id).await;
    assert_eq!(runs.len(), 1, "exactly one run: {runs:?}");
    assert_eq!(v["data"]["run_id"], runs[0]["run_id"]);
    // The run got the producer's parameter and the three bridge parameters.
    let params = &runs[0]["job_parameters"];
    assert_eq!(params["date"], "2026-11-23");
    assert_eq!(params["promise_id"], json!(id));
    let token = params["callback_token"].as_str().unwrap();
    // Bound to this promise's incarnation (docs/contracts.md, capability tokens).
    let created = app.promise(&id).await.unwrap().created_on;
    assert!(token.starts_with(&format!("v2.{created}.")), "{token}");
    assert_eq!(
        params["url"],
        json!(format!("{}/cb/{token}", app.sidecar_url))
    );
    assert_eq!(runs[0]["idempotency_token"].as_str().unwrap().len(), 64);

    let p = app.promise(&id).await.unwrap();
    assert_eq!(p.state.as_str(), "RESOLVED");
    assert_eq!(p.run_id.map(|r| r.get()), runs[0]["run_id"].as_u64());

    // No second event arrives for it.
    app.assert_no_event(&id, Duration::from_millis(1500), "no further event")
        .await;
    app.stop().await;
}

/// (b) the same trigger 5 times → one run, one promise, one event; after
/// settlement a re-publish starts nothing and answers reply_to with the
/// stored outcome.
#[tokio::test]
async fn duplicate_triggers_start_one_run_and_replay_the_outcome() {
    let mut app = TestApp::spawn().await;
    let id = unique("dup");
    for _ in 0..5 {
        app.publish(&trigger(&id, JOB_CALLBACK)).await;
    }
    let (_, v) = app.first_event(&id, Duration::from_secs(15)).await;
    assert_eq!(v["data"]["state"], "RESOLVED");
    app.assert_no_event(&id, Duration::from_millis(1500), "one event only")
        .await;
    assert_eq!(app.runs_for(&id).await.len(), 1);

    // After settlement: re-publish with reply_to.
    let mut reply = app.broker.listen(None, "").await.unwrap();
    app.publish_with(
        &trigger(&id, JOB_CALLBACK),
        None,
        Some(&reply.queue),
        Some("corr-42"),
    )
    .await;
    let r = tokio::time::timeout(Duration::from_secs(10), reply.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.correlation_id.as_deref(), Some("corr-42"));
    assert_eq!(
        r.message_id.as_deref(),
        Some(format!("{id}/RESOLVED").as_str())
    );
    let rv: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(rv["data"]["value"], "hello world");
    assert_eq!(
        app.runs_for(&id).await.len(),
        1,
        "no new run after settlement"
    );
    app.assert_no_event(&id, Duration::from_millis(500), "no new event")
        .await;
    app.stop().await;
}

/// reply_to + correlation_id on the first trigger: the completion also goes there.
#[tokio::test]
async fn completion_is_sent_to_reply_to() {
    let app = TestApp::spawn().await;
    let id = unique("rpc");
    let mut reply = app.broker.listen(None, "").await.unwrap();
    app.publish_with(
        &trigger(&id, JOB_CALLBACK),
        None,
        Some(&reply.queue),
        Some("c-1"),
    )
    .await;
    let r = tokio::time::timeout(Duration::from_secs(15), reply.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.correlation_id.as_deref(), Some("c-1"));
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["data"]["promise_id"], json!(id));
    app.stop().await;
}

/// A trigger whose reply_to names a queue other than a reply queue (here
/// another application's, in the same vhost) is dead-lettered saying why:
/// no run starts and nothing is published to that queue. A queue under
/// `amqp.reply_to_prefix` gets its reply.
#[tokio::test]
async fn reply_to_must_name_a_reply_queue() {
    let app = TestApp::spawn().await;
    let exchange = app.settings.amqp.events_exchange.clone();
    let orders = format!("{}.orders", app.name);
    let replies = format!("{}{}", app.settings.amqp.reply_to_prefix, app.name);
    for q in [&orders, &replies] {
        app.broker
            .declare_bound_queue(q, &exchange, "nothing.routes.here")
            .await
            .unwrap();
    }
    let refused = unique("reply-elsewhere");
    app.publish_with(
        &trigger(&refused, JOB_CALLBACK),
        None,
        Some(&orders),
        Some("c-1"),
    )
    .await;
    let dead = app.dead_letters(Duration::from_secs(15), 1).await;
    let why = dead[0]
        .headers
        .get("x-runbridge-error")
        .cloned()
        .unwrap_or_default();
    assert!(why.contains("reply_to"), "{why}");
    assert!(why.contains(&app.settings.amqp.reply_to_prefix), "{why}");

    let answered = unique("reply-ok");
    app.publish_with(
        &trigger(&answered, JOB_CALLBACK),
        None,
        Some(&replies),
        Some("c-2"),
    )
    .await;
    let mut reply = app.broker.consume_queue(&replies).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(15), reply.next())
        .await
        .expect("a reply in time")
        .expect("a reply");
    assert_eq!(r.correlation_id.as_deref(), Some("c-2"));

    // By now the refused trigger, published first, would have been answered.
    let mut other = app.broker.consume_queue(&orders).await.unwrap();
    let leaked = tokio::time::timeout(Duration::from_millis(500), other.next()).await;
    assert!(
        leaked.is_err(),
        "runbridge published into {orders}: {leaked:?}"
    );
    assert!(app.runs_for(&refused).await.is_empty(), "a run started");
    assert!(
        app.promise(&refused).await.is_none(),
        "a promise was stored"
    );
    app.stop().await;
}

/// (d) a callback that arrives before the worker recorded the run id still
/// settles the promise, and the run id is recorded afterwards.
#[tokio::test]
async fn callback_before_run_id_is_recorded_still_settles() {
    let mut app = TestApp::spawn().await;
    let id = unique("early");
    app.publish(&trigger(&id, JOB_EARLY)).await;
    let (_, v) = app.first_event(&id, Duration::from_secs(15)).await;
    assert_eq!(v["data"]["state"], "RESOLVED");
    assert_eq!(v["data"]["value"], "early bird");
    let runs = app.runs_for(&id).await;
    assert_eq!(runs.len(), 1);
    assert_eq!(
        runs[0]["callback_statuses"],
        json!([200]),
        "the early callback was accepted"
    );
    let p = eventually(Duration::from_secs(10), "run id recorded", || async {
        app.promise(&id).await.filter(|p| p.run_id.is_some())
    })
    .await;
    assert_eq!(p.run_id.map(|r| r.get()), runs[0]["run_id"].as_u64());
    app.assert_no_event(&id, Duration::from_millis(1000), "no further event")
        .await;
    app.stop().await;
}

/// Duplicate callbacks from the notebook make one settlement and one event.
#[tokio::test]
async fn duplicate_callbacks_make_one_event() {
    let mut app = TestApp::spawn().await;
    let id = unique("twice");
    app.publish(&trigger(&id, JOB_DUPLICATE)).await;
    let events = app.events_for(&id, Duration::from_secs(4)).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let runs = app.runs_for(&id).await;
    assert_eq!(
        runs[0]["callback_statuses"],
        json!([200, 200]),
        "second callback answered 200 (deduplicated)"
    );
    app.stop().await;
}

/// (g) malformed JSON and schema violations go to the dead-letter queue with
/// the reason, and create nothing.
#[tokio::test]
async fn malformed_triggers_are_dead_lettered_and_create_nothing() {
    let app = TestApp::spawn().await;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{not json".to_vec(), "not valid UTF-8 JSON"),
        (
            serde_json::to_vec(&json!({"job_id": JOB_CALLBACK})).unwrap(),
            "missing id",
        ),
        (
            serde_json::to_vec(&json!({"id": "both-x", "job_id": 1, "submit": {"tasks": []}}))
                .unwrap(),
            "both were given",
        ),
        (
            serde_json::to_vec(&json!({"id": "bad id!", "job_id": 1})).unwrap(),
            "may contain only",
        ),
    ];
    for (body, _) in &cases {
        app.publish_raw(body, None).await;
    }
    let dead = app.dead_letters(Duration::from_secs(15), cases.len()).await;
    assert_eq!(dead.len(), cases.len());
    for (body, reason) in &cases {
        let d = dead
            .iter()
            .find(|d| &d.body == body)
            .expect("dead letter for each body");
        let why = d.headers.get("x-runbridge-error").expect("reason header");
        assert!(why.contains(reason), "{why:?} should say {reason:?}");
    }
    assert!(app.promise("both-x").await.is_none(), "nothing created");
    let stats = app.emulator_stats().await;
    assert_eq!(stats["runs"], 0, "no run started: {stats}");
    app.stop().await;
}

/// (h) 429 with Retry-After and 503 are retried; the run starts exactly once,
/// even when Databricks created it and then answered 503.
#[tokio::test]
async fn transient_databricks_errors_are_retried_with_one_run() {
    let mut app = TestApp::spawn().await;
    app.inject(
        "jobs/run-now",
        json!([
            "too_many_requests",
            "unavailable",
            "unavailable_after_commit"
        ]),
    )
    .await;
    let id = unique("flaky");
    app.publish(&trigger(&id, JOB_CALLBACK)).await;
    let (_, v) = app.first_event(&id, Duration::from_secs(20)).await;
    assert_eq!(v["data"]["state"], "RESOLVED");
    // The run created by the "503 after commit" call may call back before the
    // worker's next retry; the run id is recorded only after that retry.
    let p = eventually(Duration::from_secs(15), "run id recorded", || async {
        app.promise(&id).await.filter(|p| p.run_id.is_some())
    })
    .await;
    let stats = app.emulator_stats().await;
    assert_eq!(
        stats["calls"]["jobs/run-now"], 4,
        "three faults then success: {stats}"
    );
    let runs = app.runs_for(&id).await;
    assert_eq!(runs.len(), 1, "one run per idempotency token");
    assert_eq!(
        p.run_id.map(|r| r.get()),
        runs[0]["run_id"].as_u64(),
        "the retry got the same run back"
    );
    app.stop().await;
}

/// (h) a permanent error (unknown job, 404) rejects the promise with the
/// Databricks error and emits promise.rejected.
#[tokio::test]
async fn unknown_job_rejects_with_the_databricks_error() {
    let mut app = TestApp::spawn().await;
    let id = unique("nojob");
    app.publish(&trigger(&id, JOB_UNKNOWN)).await;
    let (ev, v) = app.first_event(&id, Duration::from_secs(15)).await;
    assert_eq!(ev.routing_key, "promise.rejected");
    assert_eq!(v["data"]["state"], "REJECTED");
    assert_eq!(v["data"]["error"]["status"], 404);
    assert_eq!(v["data"]["error"]["error_code"], "RESOURCE_DOES_NOT_EXIST");
    assert_eq!(
        v["data"]["error"]["message"],
        format!("Job {JOB_UNKNOWN} does not exist.")
    );
    assert_eq!(v["data"]["settled_by"], "worker");
    assert!(app.runs_for(&id).await.is_empty());
    app.stop().await;
}

/// Triggers are processed concurrently: with a slow run-now, several launches
/// are in flight at the emulator at once.
#[tokio::test]
async fn triggers_are_processed_concurrently() {
    let mut app = TestApp::spawn().await;
    app.http
        .post(format!("{}/emulator/faults", app.emulator_url))
        .json(&json!({"launch_latency_ms": 300}))
        .send()
        .await
        .unwrap();
    let ids: Vec<String> = (0..8).map(|i| unique(&format!("conc{i}"))).collect();
    for id in &ids {
        app.publish(&trigger(id, JOB_CALLBACK)).await;
    }
    let events = app.events_for_all(&ids, Duration::from_secs(20)).await;
    assert!(
        ids.iter()
            .all(|id| events[id].len() == 1 && events[id][0]["data"]["state"] == "RESOLVED")
    );
    let stats = app.emulator_stats().await;
    assert!(
        stats["max_launches_in_flight"].as_u64().unwrap() >= 4,
        "launches overlapped: {stats}"
    );
    app.stop().await;
}

/// A one-time run (runs/submit) gets the bridge parameters in its notebook task.
#[tokio::test]
async fn submit_runs_get_callback_parameters() {
    let mut app = TestApp::spawn().await;
    let id = unique("submit");
    app.publish(&json!({
        "id": id,
        "submit": {
            "run_name": "one-off",
            "tasks": [{"task_key": "nb", "notebook_task": {"notebook_path": "/Shared/x", "base_parameters": {"k": "v"}}}]
        }
    }))
    .await;
    let (_, v) = app.first_event(&id, Duration::from_secs(15)).await;
    assert_eq!(v["data"]["state"], "RESOLVED");
    let runs = app.runs_for(&id).await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["run_type"], "SUBMIT_RUN");
    assert_eq!(runs[0]["params"]["k"], "v");
    app.stop().await;
}
