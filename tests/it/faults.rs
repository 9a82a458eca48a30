//! Crashes and outages.

use std::time::Duration;

use reqwest::StatusCode;
use runbridge::broker::Broker;
use serde_json::{Value, json};

use crate::helpers::*;

/// (c) The worker is SIGKILLed after `run-now` returned and before the run id
/// was recorded and the trigger acked. On restart the redelivery converges:
/// the same idempotency token gets the same run back, one settlement, one
/// distinct event id.
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn worker_killed_after_launch_converges_on_one_run() {
    let mut app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let marker = app.failpoint_marker();
    let mut first = app.spawn_worker("worker.after_launch=pause");
    let id = unique("killed");
    app.publish(&trigger(&id, JOB_SLOW_CALLBACK)).await;

    app.wait_failpoint("worker.after_launch", Duration::from_secs(20))
        .await;
    assert_eq!(app.runs_for(&id).await.len(), 1, "run-now returned");
    first.start_kill().expect("SIGKILL"); // tokio's kill is SIGKILL on Unix
    let status = first.wait().await.unwrap();
    assert!(!status.success(), "killed, not exited: {status:?}");
    assert!(
        app.promise(&id).await.unwrap().run_id.is_none(),
        "the run id was never recorded"
    );

    let mut second = app.spawn_worker("");
    let (ev, v) = app.first_event(&id, Duration::from_secs(30)).await;
    assert_eq!(
        ev.message_id.as_deref(),
        Some(format!("{id}/RESOLVED").as_str())
    );
    assert_eq!(v["data"]["state"], "RESOLVED");
    let runs = app.runs_for(&id).await;
    assert_eq!(runs.len(), 1, "still exactly one run");
    let stats = app.emulator_stats().await;
    assert_eq!(
        stats["calls"]["jobs/run-now"], 2,
        "the redelivery asked again, with the same token: {stats}"
    );
    let p = eventually(
        Duration::from_secs(10),
        "run id recorded after restart",
        || async { app.promise(&id).await.filter(|p| p.run_id.is_some()) },
    )
    .await;
    assert_eq!(p.run_id.map(|r| r.get()), runs[0]["run_id"].as_u64());
    let more = app.events_for(&id, Duration::from_secs(2)).await;
    assert!(
        more.iter().all(|(e, _)| e.message_id == ev.message_id),
        "duplicates only with the same event id"
    );
    second.start_kill().ok();
    let _ = std::fs::remove_file(&marker);
    app.stop().await;
}

/// The run calls back while its worker is between `run-now` and recording
/// the run, and the worker dies there: the promise is settled without its
/// run id. The redelivery asks again with the same token (Databricks
/// answers the same run) and records it.
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a_run_that_called_back_before_it_was_recorded_is_recorded_on_redelivery() {
    let mut app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let marker = app.failpoint_marker();
    let mut first = app.spawn_worker("worker.after_launch=pause");
    let id = unique("called-back");
    app.publish(&trigger(&id, JOB_CALLBACK)).await;
    let (_, v) = app.first_event(&id, Duration::from_secs(20)).await;
    assert_eq!(v["data"]["settled_by"], "callback");
    app.wait_failpoint("worker.after_launch", Duration::from_secs(20))
        .await;
    first.start_kill().expect("SIGKILL");
    let _ = first.wait().await;
    assert!(app.promise(&id).await.unwrap().run_id.is_none());

    let mut second = app.spawn_worker("");
    let runs = app.runs_for(&id).await;
    assert_eq!(runs.len(), 1);
    let p = eventually(Duration::from_secs(20), "the run id recorded", || async {
        app.promise(&id).await.filter(|p| p.run_id.is_some())
    })
    .await;
    assert_eq!(p.run_id.map(|r| r.get()), runs[0]["run_id"].as_u64());
    assert_eq!(app.runs_for(&id).await.len(), 1, "no second run");
    assert_eq!(p.state, runbridge::domain::State::Resolved);
    second.start_kill().ok();
    let _ = std::fs::remove_file(&marker);
    app.stop().await;
}

/// (i) With the broker unreachable the event stays in the outbox; when the
/// broker is back it is published, once. Uses a private vhost whose
/// permissions are revoked (connections closed and refused), never the
/// shared one.
#[tokio::test]
async fn relay_keeps_events_while_broker_is_unreachable() {
    let vhost = unique("it-vhost");
    rabbitmqctl(&["add_vhost", &vhost]);
    rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    let app = TestApp::spawn_with(Options {
        worker: true,
        vhost: Some(vhost.clone()),
        ..Default::default()
    })
    .await;
    let sink = format!("{}.sink", app.name);
    app.broker
        .declare_bound_queue(&sink, &app.settings.amqp.events_exchange, "promise.#")
        .await
        .unwrap();

    // Cut the broker off: no permission to connect, existing connections closed.
    rabbitmqctl(&["clear_permissions", "-p", &vhost, "guest"]);
    rabbitmqctl(&["close_all_connections", "-p", &vhost, "test outage"]);

    // Settle a promise through the sidecar (it needs only Redis).
    let id = unique("outage");
    let base = &app.sidecar_url;
    let r = app
        .operator(app.http.post(format!("{base}/promises")))
        .json(&json!({"id": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = app
        .operator(app.http.patch(format!("{base}/promises/{id}")))
        .json(&json!({"state": "RESOLVED", "value": {"data": "kept"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // The relay cannot publish: the event waits in the outbox.
    assert_eq!(app.store.outbox_len().await.unwrap(), 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        app.store.outbox_len().await.unwrap(),
        1,
        "kept while the broker is away"
    );

    // The broker comes back.
    rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    eventually(Duration::from_secs(30), "outbox drained", || async {
        (app.store.outbox_len().await.ok()? == 0).then_some(())
    })
    .await;
    let broker = Broker::connect(&runbridge::startup::broker_settings(&app.settings, "test2"))
        .await
        .unwrap();
    let mut l = broker.consume_queue(&sink).await.unwrap();
    let mut got = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(3), l.next()).await {
        let v: Value = serde_json::from_slice(&ev.body).unwrap();
        if v["subject"] == json!(id) {
            got.push(ev);
        }
    }
    assert_eq!(got.len(), 1, "published once when the broker returned");
    assert_eq!(
        got[0].message_id.as_deref(),
        Some(format!("{id}/RESOLVED").as_str())
    );
    broker.close().await;
    app.stop().await;
    rabbitmqctl(&["delete_vhost", &vhost]);
}

/// SIGTERM: every long-running subcommand stops consuming, drains and exits 0.
#[tokio::test]
async fn every_subcommand_shuts_down_on_sigterm() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    type Case = (&'static str, Vec<String>, Vec<(String, String)>);
    let cases: Vec<Case> = vec![
        ("worker", vec!["worker".into()], vec![]),
        (
            "sidecar",
            vec!["sidecar".into()],
            vec![(
                "RUNBRIDGE__SIDECAR__LISTEN".into(),
                format!("127.0.0.1:{}", free_port()),
            )],
        ),
        (
            "all",
            vec!["all".into()],
            vec![(
                "RUNBRIDGE__SIDECAR__LISTEN".into(),
                format!("127.0.0.1:{}", free_port()),
            )],
        ),
        (
            "emulate",
            vec![
                "emulate".into(),
                "--listen".into(),
                format!("127.0.0.1:{}", free_port()),
            ],
            vec![],
        ),
    ];
    for (name, args, extra) in cases {
        let log = std::env::temp_dir().join(format!("{}-{name}.log", app.name));
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_runbridge"))
            .args(&args)
            .envs(app.env_vars())
            .envs(extra)
            .env("RUST_LOG", "info")
            .env("RUNBRIDGE__LOG__FORMAT", "json")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let started = |needle: &'static str| {
            let log = log.clone();
            move || {
                let log = log.clone();
                async move {
                    std::fs::read_to_string(&log)
                        .ok()
                        .filter(|s| s.contains(needle))
                        .map(|_| ())
                }
            }
        };
        let needle = match name {
            "worker" | "all" => "consuming triggers",
            "sidecar" => "sidecar listening",
            _ => "emulator listening",
        };
        eventually(
            Duration::from_secs(20),
            &format!("{name} started"),
            started(needle),
        )
        .await;
        let pid = child.id().unwrap().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .unwrap_or_else(|_| panic!("{name} did not exit within 20 s of SIGTERM"))
            .unwrap();
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(status.success(), "{name} exited with {status:?}:\n{out}");
        assert!(
            out.contains("SIGTERM: shutting down"),
            "{name} logged the signal:\n{out}"
        );
        assert!(!out.contains("panicked"), "{name} panicked:\n{out}");
        let _ = std::fs::remove_file(&log);
    }
    app.stop().await;
}

/// A Redis that forgot its scripts (restarted, or `SCRIPT FLUSH`): the next
/// transition gets `NOSCRIPT`, loads the script and goes on, so a trigger
/// still runs to its event. (Every node of a cluster is flushed.)
#[tokio::test]
async fn transitions_reload_scripts_redis_forgot() {
    use secrecy::ExposeSecret;
    let mut app = TestApp::spawn().await;
    let id = unique("noscript");
    app.publish(&trigger(&format!("{id}-warm"), JOB_CALLBACK))
        .await;
    app.first_event(&format!("{id}-warm"), Duration::from_secs(30))
        .await;
    let nodes = redis_cluster_seeds()
        .unwrap_or_else(|| vec![app.settings.redis.url.expose_secret().to_owned()]);
    for node in nodes {
        let mut conn = redis::Client::open(node)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    app.publish(&trigger(&id, JOB_CALLBACK)).await;
    let (_, ev) = app.first_event(&id, Duration::from_secs(30)).await;
    assert_eq!(ev["data"]["state"], "RESOLVED", "{ev}");
    assert_eq!(app.runs_for(&id).await.len(), 1);
    app.stop().await;
}
