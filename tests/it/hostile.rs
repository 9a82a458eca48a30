//! Hostile and poisonous triggers: nothing a producer publishes
//! blocks the queue or stops valid work.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::helpers::*;

/// 10,000 malformed messages of several kinds with 100 valid triggers
/// among them: every malformed one is dead-lettered with its reason, and
/// every valid one runs once to its event.
#[tokio::test]
async fn a_flood_of_malformed_messages_is_dead_lettered_while_valid_triggers_run() {
    const MALFORMED: usize = 10_000;
    const VALID_EVERY: usize = 100;
    let mut app = TestApp::spawn().await;
    let bad: [&[u8]; 5] = [
        b"{not json",
        b"\xff\xfe\x00binary",
        br#"{"job_id": 1}"#,
        br#"{"id": "bad id!", "job_id": 1}"#,
        br#"[1, 2, 3]"#,
    ];
    let mut valid = Vec::new();
    for i in 0..MALFORMED {
        app.publish_raw(bad[i % bad.len()], None).await;
        if i % VALID_EVERY == 0 {
            let id = format!("{}-ok-{i}", app.name);
            app.publish(&trigger(&id, JOB_CALLBACK)).await;
            valid.push(id);
        }
    }
    let events = app.events_for_all(&valid, Duration::from_secs(180)).await;
    for (id, evs) in &events {
        let ids: BTreeSet<&str> = evs.iter().filter_map(|e| e["id"].as_str()).collect();
        assert_eq!(ids.len(), 1, "{id}");
        assert_eq!(evs[0]["data"]["state"], "RESOLVED", "{id}");
    }
    let dlq = runbridge::broker::DeadLetterQueue::new(runbridge::startup::broker_settings(
        &app.settings,
        "it-count",
    ));
    let dead = eventually(
        Duration::from_secs(120),
        "every malformed message dead-lettered",
        || async {
            let n = dlq.count().await.ok()? as usize;
            (n == MALFORMED).then_some(n)
        },
    )
    .await;
    assert_eq!(dead, MALFORMED);
    // Each with its reason.
    for d in app.dead_letters(Duration::from_secs(10), 50).await {
        assert!(d.headers.contains_key("x-runbridge-error"), "{d:?}");
    }
    assert_eq!(
        app.emulator_stats().await["runs"].as_u64(),
        Some(valid.len() as u64),
        "one run per valid trigger, none for the rest"
    );
    app.stop().await;
}

/// A trigger whose every attempt fails for a passing reason (its
/// workspace's Databricks never answers) is requeued until the queue's
/// delivery limit, then dead-lettered; triggers behind it run meanwhile.
#[tokio::test]
async fn a_trigger_that_always_fails_is_dead_lettered_at_the_delivery_limit() {
    let mut app = TestApp::spawn_with(Options {
        overrides: vec![
            ("amqp.delivery_limit", "3".into()),
            ("worker.retries_in_place", "0".into()),
            ("databricks.retry_max_times", "0".into()),
            // A workspace nothing listens for.
            (
                "databricks.workspaces.broken.host",
                "http://127.0.0.1:9".into(),
            ),
            ("databricks.workspaces.broken.token", "dapi-broken".into()),
        ],
        ..Default::default()
    })
    .await;
    let poison = format!("{}-poison", app.name);
    let mut body = trigger(&poison, JOB_CALLBACK);
    body["workspace"] = "broken".into();
    app.publish(&body).await;
    let behind: Vec<String> = (0..20)
        .map(|i| format!("{}-behind-{i}", app.name))
        .collect();
    for id in &behind {
        app.publish(&trigger(id, JOB_CALLBACK)).await;
    }
    app.events_for_all(&behind, Duration::from_secs(60)).await;
    let dead = app.dead_letters(Duration::from_secs(60), 1).await;
    assert_eq!(dead.len(), 1, "the poison trigger dead-lettered");
    let v: serde_json::Value = serde_json::from_slice(&dead[0].body).unwrap();
    assert_eq!(v["id"], poison.as_str());
    // The broker's delivery limit put it there, not a refusal by the worker
    // (which would say why in x-runbridge-error).
    assert!(
        !dead[0].headers.contains_key("x-runbridge-error"),
        "{:?}",
        dead[0].headers
    );
    // Its promise waits, pending, for an operator (nothing ran).
    let p = app.promise(&poison).await.expect("its promise");
    assert_eq!(p.state, runbridge::domain::State::Pending);
    assert!(p.run_id.is_none());
    app.stop().await;
}

/// A sidecar of the test's own on a free port, with these callback
/// secrets, against the same store; stopped with `shutdown`.
async fn sidecar_with_secrets(
    app: &TestApp,
    secrets: &[&str],
    shutdown: &tokio_util::sync::CancellationToken,
) -> String {
    let mut s = app.settings.clone();
    s.auth.callback_secrets = secrets.iter().map(|x| x.to_string().into()).collect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let sd = shutdown.clone();
    tokio::spawn(async move {
        runbridge::startup::run_sidecar(&s, Some(listener), sd)
            .await
            .unwrap();
    });
    url
}

/// A pending promise made directly in the store (no run needed).
async fn pending_promise(app: &TestApp, tag: &str) -> runbridge::domain::PromiseId {
    use runbridge::store::{PromiseStore, Timeout};
    let id = runbridge::domain::PromiseId::parse(&unique(tag)).unwrap();
    let new = new_promise(&id, Timeout::After(Duration::from_secs(600)));
    app.store.create(&new).await.unwrap();
    id
}

/// Rotating the callback secret: while old and new are both configured,
/// tokens of either settle their promise; once the old one is removed its
/// tokens are refused. And tampered tokens (padded, a letter's case
/// flipped, another promise's) are refused without changing anything.
#[tokio::test]
async fn callback_secret_rotation_and_tampered_tokens() {
    use runbridge::domain::CallbackToken;
    const OLD: &str = LOCAL_CALLBACK_SECRET;
    const NEW: &str = "rotated-callback-secret-fedcba9876543210-xyz";
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let (old, new) = (signer_of(OLD), signer_of(NEW));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let both = sidecar_with_secrets(&app, &[NEW, OLD], &shutdown).await;
    let only_new = sidecar_with_secrets(&app, &[NEW], &shutdown).await;
    let resolve = |base: &str, token: &CallbackToken, id: &str| {
        app.http
            .post(format!("{base}/cb/{}/resolve", token.expose()))
            .query(&[("id", id), ("value", "v")])
    };
    let ready = |base: String| {
        let http = app.http.clone();
        async move {
            eventually(Duration::from_secs(10), "sidecar up", || async {
                let r = http.get(format!("{base}/healthz")).send().await.ok()?;
                r.status().is_success().then_some(())
            })
            .await;
        }
    };
    ready(both.clone()).await;
    ready(only_new.clone()).await;

    // Rotation under way: tokens handed out before and after both work.
    for signer in [&old, &new] {
        let id = pending_promise(&app, "rot").await;
        let r = resolve(&both, &app.token_from(signer, &id).await, id.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            app.promise(id.as_str()).await.unwrap().state.to_string(),
            "RESOLVED"
        );
    }
    // The old secret removed: its tokens are refused, the new ones work.
    let id = pending_promise(&app, "rot-old").await;
    let r = resolve(&only_new, &app.token_from(&old, &id).await, id.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        app.promise(id.as_str()).await.unwrap().state.to_string(),
        "PENDING"
    );
    let r = resolve(&only_new, &app.token_from(&new, &id).await, id.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Tampering, against the app's own sidecar (OLD signs there).
    let a = pending_promise(&app, "tamper-a").await;
    let b = pending_promise(&app, "tamper-b").await;
    let good = app.token_from(&old, &a).await.expose().to_owned();
    let flipped: String = {
        // Flip the case of the last letter of the MAC part.
        let i = good.rfind(|c: char| c.is_ascii_alphabetic()).unwrap();
        let mut t = good.clone();
        let c = t.remove(i);
        let c = if c.is_ascii_lowercase() {
            c.to_ascii_uppercase()
        } else {
            c.to_ascii_lowercase()
        };
        t.insert(i, c);
        t
    };
    let base = app.sidecar_url.clone();
    for (what, token, id) in [
        ("padded", format!("{good}A"), a.as_str()),
        ("padded with '='", format!("{good}="), a.as_str()),
        ("case flipped", flipped, a.as_str()),
        ("another promise's", good.clone(), b.as_str()),
        ("empty MAC", "v1.".to_string(), a.as_str()),
    ] {
        let r = app
            .http
            .post(format!("{base}/cb/{token}/resolve"))
            .query(&[("id", id), ("value", "v")])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{what}");
    }
    for id in [&a, &b] {
        assert_eq!(
            app.promise(id.as_str()).await.unwrap().state.to_string(),
            "PENDING"
        );
    }
    shutdown.cancel();
    app.stop().await;
}

/// 1,000 resolves of one promise at once, with different values: exactly
/// one settles it, the other 999 are answered as repeats of a completion
/// already applied (a notebook's callback is idempotent), the stored value
/// is the winner's, and one event goes out.
#[tokio::test]
async fn a_thousand_concurrent_resolves_settle_once() {
    // A thousand notebooks, from this one address: the per-address share
    // is not what this test is about.
    let mut app = TestApp::spawn_with(Options {
        overrides: vec![("sidecar.max_connections_per_client", "1024".into())],
        ..Default::default()
    })
    .await;
    let id = unique("stampede");
    app.publish(&trigger(&id, JOB_NEVER)).await;
    let url = app.callback_url(&id).await;
    let answers = futures_util::future::join_all((0..1000).map(|i| {
        let req = app
            .http
            .post(format!("{url}/resolve"))
            .query(&[("id", id.as_str()), ("value", &format!("\"v{i}\""))]);
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap();
            (i, status, body)
        }
    }))
    .await;
    assert!(
        answers.iter().all(|(_, s, _)| *s == 200),
        "every callback answered 200"
    );
    let winners: Vec<usize> = answers
        .iter()
        .filter(|(_, _, b)| b["deduplicated"] == false)
        .map(|(i, _, _)| *i)
        .collect();
    assert_eq!(winners.len(), 1, "exactly one settled it: {winners:?}");
    let stored = app.promise(&id).await.unwrap();
    assert_eq!(
        stored.value.data.as_deref(),
        Some(format!("\"v{}\"", winners[0]).as_str())
    );
    let events = app.events_for(&id, Duration::from_secs(5)).await;
    assert_eq!(events.len(), 1, "one event");
    app.stop().await;
}

/// A client that sends its headers and then trickles its body (slowloris)
/// gets 408 once `sidecar.body_timeout_ms` passed, and nothing changes.
#[tokio::test]
async fn a_slow_body_times_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn_with(Options {
        worker: false,
        overrides: vec![("sidecar.body_timeout_ms", "300".into())],
        ..Default::default()
    })
    .await;
    let id = pending_promise(&app, "slow").await;
    let signer = signer_of(LOCAL_CALLBACK_SECRET);
    let token = app.token_from(&signer, &id).await;
    let addr = app.sidecar_url.trim_start_matches("http://").to_owned();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let body = format!(r#"{{"id":"{id}","value":"v"}}"#);
    let head = format!(
        "POST /cb/{}/resolve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        token.expose(),
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body.as_bytes()[..3]).await.unwrap();
    // The rest never comes; the answer must, bounded.
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("an answer before the test's bound")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert_eq!(
        app.promise(id.as_str()).await.unwrap().state.to_string(),
        "PENDING"
    );
    app.stop().await;
}

/// Odd promise ids on every route that takes one: path-like (`..`, `%2F`),
/// unicode, 201 characters. Each gets a clear 4xx and opens nothing; a
/// valid token of one promise never reaches another. Oversized headers
/// are refused and the sidecar keeps serving.
#[tokio::test]
async fn odd_ids_and_oversized_headers_are_refused() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let owned = pending_promise(&app, "owned").await;
    let signer = signer_of(LOCAL_CALLBACK_SECRET);
    let token = app.token_from(&signer, &owned).await;
    let base = app.sidecar_url.clone();
    let long = "a".repeat(201);
    let dotted = format!("{}/../{}", owned.as_str(), owned.as_str());
    for (what, id) in [
        ("dot-dot", dotted.as_str()),
        ("encoded slash", "a%2F..%2Fb"),
        ("unicode", "promesse-é"),
        ("201 characters", long.as_str()),
        ("empty", ""),
    ] {
        // A callback with the owned promise's token and another id.
        let r = app
            .http
            .post(format!("{base}/cb/{}/resolve", token.expose()))
            .query(&[("id", id), ("value", "v")])
            .send()
            .await
            .unwrap();
        assert!(
            matches!(r.status().as_u16(), 400 | 401),
            "{what}: callback answered {}",
            r.status()
        );
        // The operator API: a clear 400 for what is no id, 404 for an id
        // that names nothing.
        // Percent-encoded, so that the id arrives as one path segment (a
        // client would resolve `..` itself).
        let segment: String = url::form_urlencoded::byte_serialize(id.as_bytes()).collect();
        let r = app
            .operator(app.http.get(format!("{base}/promises/{segment}")))
            .send()
            .await
            .unwrap();
        assert!(
            matches!(r.status().as_u16(), 400 | 404),
            "{what}: GET answered {}",
            r.status()
        );
    }
    assert_eq!(
        app.promise(owned.as_str()).await.unwrap().state.to_string(),
        "PENDING"
    );
    // A 1 MiB header: refused (431 or the connection closed), never served.
    let big = "x".repeat(1 << 20);
    let r = app
        .http
        .get(format!("{base}/healthz"))
        .header("x-big", big)
        .send()
        .await;
    if let Ok(r) = r {
        assert_eq!(r.status().as_u16(), 431, "an oversized header");
    }
    let r = app
        .http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "still serving");
    app.stop().await;
}

/// A whole trigger → run → callback → event cycle through `runbridge all`
/// at `RUST_LOG=trace`, with a password on Redis (a private Redis with
/// `requirepass`) and on RabbitMQ (a user and vhost of the test's own): no
/// log line carries the capability token, the callback secret, the
/// Databricks token, the operator token, or either password.
#[tokio::test]
async fn no_secret_reaches_the_logs_at_trace() {
    const REDIS_PASSWORD: &str = "redis-pw-5f3a9c1e7d";
    const AMQP_PASSWORD: &str = "amqp-pw-8b2d4f6a0c";
    const DATABRICKS_TOKEN: &str = "dapi-secret-token-77e1c0ffee";
    const CALLBACK_SECRET: &str = LOCAL_CALLBACK_SECRET;
    // A private Redis with a password.
    let redis = RedisServer::ephemeral_with(&["--requirepass", REDIS_PASSWORD])
        .await
        .unwrap();
    let redis_port = redis.port();
    // A RabbitMQ user with a password, on a vhost of the test's own.
    let vhost = unique("it-secrets");
    let user = unique("it-user");
    rabbitmqctl(&["add_vhost", &vhost]);
    rabbitmqctl(&["add_user", &user, AMQP_PASSWORD]);
    rabbitmqctl(&["set_permissions", "-p", &vhost, &user, ".*", ".*", ".*"]);

    let mut app = TestApp::spawn_with(Options {
        worker: false,
        overrides: vec![
            (
                "redis.url",
                format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_port}"),
            ),
            (
                "amqp.url",
                format!("amqp://{user}:{AMQP_PASSWORD}@127.0.0.1:5672/{vhost}"),
            ),
        ],
        databricks_token: Some(DATABRICKS_TOKEN.into()),
        ..Default::default()
    })
    .await;
    // `runbridge all` serves the callbacks itself: its own sidecar port.
    let port = free_port();
    let log_path = std::env::temp_dir().join(format!("{}-trace.log", app.name));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = app
        .runbridge_all(port)
        .env("RUNBRIDGE__AUTH__OPERATOR_TOKENS", "it-operator-token")
        .env("RUST_LOG", "trace")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();

    let id = unique("secrets");
    app.publish(&trigger(&id, JOB_CALLBACK)).await;
    let (_, ev) = app.first_event(&id, Duration::from_secs(60)).await;
    assert_eq!(ev["data"]["state"], "RESOLVED");
    let url = app.callback_url(&id).await;
    let token = url.rsplit("/cb/").next().unwrap().to_owned();
    assert!(
        url.starts_with(&format!("http://127.0.0.1:{port}/cb/")),
        "{url}"
    );
    // Also an operator call and a refused callback, which log errors.
    let r = app
        .http
        .get(format!("http://127.0.0.1:{port}/promises/{id}"))
        .bearer_auth("it-operator-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .http
        .post(format!("http://127.0.0.1:{port}/cb/{token}x/resolve"))
        .query(&[("id", id.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    nix_term(&mut child).await;
    let text = std::fs::read_to_string(&log_path).unwrap();
    // The log is the trace of this very cycle.
    assert!(text.contains(&id), "the trace names the promise");
    assert!(text.contains("TRACE"), "trace level was on");
    for (what, secret) in [
        ("capability token", token.as_str()),
        ("callback secret", CALLBACK_SECRET),
        ("Databricks token", DATABRICKS_TOKEN),
        ("operator token", "it-operator-token"),
        ("Redis password", REDIS_PASSWORD),
        ("AMQP password", AMQP_PASSWORD),
    ] {
        let leaks: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(secret))
            .take(3)
            .collect();
        assert!(leaks.is_empty(), "the {what} is in the log: {leaks:?}");
    }
    println!(
        "{} log lines at trace, no secret in any",
        text.lines().count()
    );
    app.stop().await;
    drop(redis);
    rabbitmqctl(&["delete_user", &user]);
    rabbitmqctl(&["delete_vhost", &vhost]);
    let _ = std::fs::remove_file(&log_path);
}

/// SIGTERM, then the exit (bounded).
async fn nix_term(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
}
