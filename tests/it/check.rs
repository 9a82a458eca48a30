//! `runbridge check` (the binary) against the emulator, the real RabbitMQ
//! with the test's topology, and Redis: a ready job passes; a job that
//! cannot receive the callback values, a refused token and a Redis that
//! evicts keys fail, each saying what to change.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

/// `runbridge check` with the app's settings and `env`; (exit code, stdout).
async fn check(app: &TestApp, args: &[String], env: &[(&str, String)]) -> (i32, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_runbridge"))
            .arg("check")
            .args(args)
            .envs(app.env_vars())
            .envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())))
            .output(),
    )
    .await
    .expect("check ends")
    .expect("runbridge runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn line<'a>(out: &'a str, area: &str, item: &str) -> &'a str {
    out.lines()
        .find(|l| l.contains(area) && l.contains(item))
        .unwrap_or_else(|| panic!("no line for {area} {item} in\n{out}"))
}

#[tokio::test]
async fn check_says_what_is_ready_and_what_to_change() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let ready = app
        .create_job(
            json!({"name": "ready", "max_concurrent_runs": 20, "queue": {"enabled": true},
               "parameters": [{"name": "promise_id", "default": ""}, {"name": "url", "default": ""},
                              {"name": "callback_token", "default": ""}],
               "tasks": [{"task_key": "nb", "notebook_task": {"notebook_path": "/Shared/nb"}}]}),
        )
        .await;
    let (code, out) = check(&app, &["--job-id".into(), ready.to_string()], &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        line(&out, "rabbitmq", ".triggers").starts_with("ok"),
        "{out}"
    );
    assert!(
        line(&out, "redis", "maxmemory-policy").starts_with("ok"),
        "{out}"
    );
    assert!(
        line(&out, "workspace default", "credentials").starts_with("ok"),
        "{out}"
    );
    assert!(
        line(&out, &format!("job {ready}"), "parameters").starts_with("ok"),
        "{out}"
    );
    assert!(out.contains("\nready ("), "{out}");

    let unready = app
        .create_job(
            json!({"name": "unready", "parameters": [{"name": "date", "default": ""}],
               "tasks": [{"task_key": "nb", "notebook_task": {"notebook_path": "/Shared/nb"}}]}),
        )
        .await;
    let (code, out) = check(&app, &["--job-id".into(), unready.to_string()], &[]).await;
    assert_eq!(code, 1, "{out}");
    let params = line(&out, &format!("job {unready}"), "parameters");
    assert!(
        params.starts_with("FAIL")
            && params.contains("add job parameters promise_id, url, callback_token"),
        "{out}"
    );
    // Created without limits: Jobs API 2.2's defaults, one run at a time,
    // the rest queued.
    let concurrency = line(&out, &format!("job {unready}"), "concurrency");
    assert!(
        concurrency.starts_with("warn") && concurrency.contains("queueing on"),
        "{out}"
    );
    let (code, out) = check(&app, &["--job-id".into(), "424242".into()], &[]).await;
    assert_eq!(code, 1);
    assert!(
        line(&out, "job 424242", "exists").contains("does not exist"),
        "{out}"
    );

    // A refused token.
    let (code, out) = check(
        &app,
        &[],
        &[(
            "RUNBRIDGE__DATABRICKS__WORKSPACES__DEFAULT__TOKEN",
            "dapi-revoked".into(),
        )],
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        line(&out, "workspace default", "credentials").contains("Invalid access token"),
        "{out}"
    );

    // A Redis of the test's own that evicts keys under memory pressure.
    let redis = RedisServer::ephemeral_with(&["--maxmemory-policy", "allkeys-lru"])
        .await
        .unwrap();
    let port = redis.port();
    let (code, out) = check(
        &app,
        &[],
        &[
            ("RUNBRIDGE__REDIS__URL", format!("redis://127.0.0.1:{port}")),
            ("RUNBRIDGE__REDIS__MODE", "standalone".into()),
        ],
    )
    .await;
    assert_eq!(code, 1, "{out}");
    let policy = line(&out, "redis", "maxmemory-policy");
    assert!(
        policy.starts_with("FAIL")
            && policy.contains("allkeys-lru")
            && policy.contains("noeviction"),
        "{out}"
    );
    app.stop().await;
}

/// With no queue bound to the events exchange, a completion event comes
/// back unroutable and `runbridge check` says so; once a queue is bound and
/// the event is routed, it says all is well.
#[tokio::test]
async fn check_warns_while_nobody_listens_to_the_events() {
    let app = TestApp::spawn_with(Options {
        unheard: true,
        ..Default::default()
    })
    .await;
    let id = unique("unheard");
    app.publish(&trigger(&id, JOB_CALLBACK)).await;
    eventually(Duration::from_secs(20), "the relay noted it", || async {
        app.store.events_unroutable().await.ok().flatten()
    })
    .await;
    let (_, out) = check(&app, &[], &[]).await;
    let l = line(&out, "rabbitmq", "event listeners");
    assert!(l.starts_with("warn") && l.contains("promise.#"), "{out}");

    let mut heard = app
        .broker
        .listen(Some(&app.settings.amqp.events_exchange), "promise.#")
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(20), heard.next())
        .await
        .expect("the kept event arrives")
        .unwrap();
    assert_eq!(
        ev.message_id.as_deref(),
        Some(format!("{id}/RESOLVED").as_str())
    );
    eventually(
        Duration::from_secs(20),
        "the relay noted it routed",
        || async {
            app.store
                .events_unroutable()
                .await
                .ok()
                .filter(Option::is_none)
        },
    )
    .await;
    let (_, out) = check(&app, &[], &[]).await;
    assert!(
        line(&out, "rabbitmq", "event listeners").starts_with("ok"),
        "{out}"
    );
    app.stop().await;
}
