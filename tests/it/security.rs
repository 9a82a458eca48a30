//! Secure by default: what an attacker on the network, or a deployment
//! that forgot a setting, gets. Each test names the hole it keeps shut.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

/// Runs `runbridge <args>` with exactly `env` (nothing inherited but PATH)
/// and a unique key prefix and queue names, so that a build that wrongly
/// starts touches nothing shared. `Ok((code, stderr))` when it exits within
/// 20 s; `Err(stderr so far)` when it is still running (it started).
async fn start(args: &[&str], env: &[(String, String)]) -> Result<(i32, String), String> {
    let name = unique("sec");
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_runbridge"));
    c.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUNBRIDGE__REDIS__KEY_PREFIX", &name)
        .env(
            "RUNBRIDGE__AMQP__TRIGGERS_QUEUE",
            format!("{name}.triggers"),
        )
        .env(
            "RUNBRIDGE__AMQP__DEAD_LETTER_EXCHANGE",
            format!("{name}.dlx"),
        )
        .env("RUNBRIDGE__AMQP__DEAD_LETTER_QUEUE", format!("{name}.dead"))
        .env("RUNBRIDGE__AMQP__EVENTS_EXCHANGE", format!("{name}.events"))
        .env("RUNBRIDGE__AMQP__CONTROL_QUEUE", format!("{name}.control"))
        .env("RUNBRIDGE__SIDECAR__LISTEN", "127.0.0.1:0")
        .envs(env.iter().cloned())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = c.spawn().expect("runbridge runs");
    let mut stderr = child.stderr.take().expect("stderr");
    let read = tokio::spawn(async move {
        let mut s = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut s).await;
        s
    });
    match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
        Ok(status) => {
            let code = status.expect("wait").code().unwrap_or(-1);
            Ok((code, read.await.unwrap_or_default()))
        }
        Err(_) => {
            let _ = child.kill().await;
            Err(read.await.unwrap_or_default())
        }
    }
}

/// The runtime stage of the Dockerfile, read as the image is built: the
/// config files it copies (into a fresh directory standing for /app/config)
/// and the environment it sets.
fn image_runtime(dir: &Path) -> Vec<(String, String)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile");
    let stage = text.rsplit("\nFROM ").next().expect("a runtime stage");
    let mut env = Vec::new();
    for line in stage.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.first() {
            Some(&"COPY") if !line.contains("--from") => {
                let (sources, dest) = words[1..].split_at(words.len() - 2);
                if !dest[0].contains("config") {
                    continue;
                }
                for src in sources {
                    let from = root.join(src);
                    if from.is_dir() {
                        for f in std::fs::read_dir(&from).expect("config dir") {
                            let f = f.expect("entry").path();
                            std::fs::copy(&f, dir.join(f.file_name().expect("name")))
                                .expect("copy");
                        }
                    } else {
                        std::fs::copy(&from, dir.join(from.file_name().expect("name")))
                            .expect("copy");
                    }
                }
            }
            Some(&"ENV") => {
                for kv in &words[1..] {
                    let (k, v) = kv.split_once('=').expect("ENV k=v");
                    env.push((k.to_owned(), v.to_owned()));
                }
            }
            _ => {}
        }
    }
    for (k, v) in env.iter_mut() {
        if k == "RUNBRIDGE_CONFIG_DIR" {
            *v = dir.display().to_string();
        }
    }
    env
}

/// The image started as it is shipped (`runbridge all`, its own config
/// directory and environment, no secrets given) refuses to start and says
/// which setting to provide; so does a bare `runbridge all`, and so does
/// the image given the development secrets committed in the repository.
#[tokio::test]
async fn the_images_default_start_refuses_the_development_secrets() {
    let dir = std::env::temp_dir().join(unique("rb-image-config"));
    std::fs::create_dir_all(&dir).unwrap();
    let image = image_runtime(&dir);

    let refused = start(&["all"], &image)
        .await
        .unwrap_or_else(|log| panic!("the image's default start started:\n{log}"));
    assert_ne!(refused.0, 0);
    assert!(
        refused.1.contains("RUNBRIDGE__AUTH__CALLBACK_SECRETS"),
        "says which setting to provide: {}",
        refused.1
    );

    // The committed secrets, given outright, are refused too.
    let mut with_dev = image.clone();
    with_dev.push((
        "RUNBRIDGE__AUTH__CALLBACK_SECRETS".into(),
        "local-dev-callback-secret-0123456789abcdef".into(),
    ));
    with_dev.push(("DATABRICKS_TOKEN".into(), "dapi-local-emulator".into()));
    with_dev.push(("DATABRICKS_HOST".into(), "http://127.0.0.1:9".into()));
    let refused = start(&["sidecar"], &with_dev)
        .await
        .unwrap_or_else(|log| panic!("the image started with the development secrets:\n{log}"));
    assert_ne!(refused.0, 0);
    assert!(refused.1.contains("config/local.toml"), "{}", refused.1);

    // The binary with the repository's config directory and no
    // RUNBRIDGE_ENV is not in development mode either.
    let bare = [(
        "RUNBRIDGE_CONFIG_DIR".to_string(),
        config_dir().display().to_string(),
    )];
    let refused = start(&["sidecar"], &bare)
        .await
        .unwrap_or_else(|log| panic!("a bare runbridge started:\n{log}"));
    assert_ne!(refused.0, 0);
    assert!(
        refused.1.contains("RUNBRIDGE__AUTH__CALLBACK_SECRETS"),
        "{}",
        refused.1
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An operator token list with an empty item (a trailing comma), a
/// one-character token, a token of spaces or with a line break, or one of too
/// few different characters stops the sidecar at start-up, naming the
/// setting.
#[tokio::test]
async fn an_empty_or_short_operator_token_is_refused_at_start_up() {
    let local = |tokens: &str| {
        vec![
            ("RUNBRIDGE_ENV".to_string(), "local".to_string()),
            (
                "RUNBRIDGE_CONFIG_DIR".to_string(),
                config_dir().display().to_string(),
            ),
            (
                "RUNBRIDGE__AUTH__OPERATOR_TOKENS".to_string(),
                tokens.to_string(),
            ),
        ]
    };
    for (tokens, says) in [
        ("tokA-0123456789abcdef,", "entry 2 is empty"),
        (",tokA-0123456789abcdef", "entry 1 is empty"),
        ("x", "at least 16"),
        ("                ", "whitespace"),
        (
            "tokA-0123456789abcdef\n",
            "whitespace or a control character",
        ),
        ("tok\u{7f}A-0123456789abcdef", "control character"),
        ("aaaaaaaaaaaaaaaaaaaa", "1 different characters"),
        ("abababababababab", "2 different characters"),
    ] {
        let (code, log) = start(&["sidecar"], &local(tokens))
            .await
            .unwrap_or_else(|log| panic!("started with operator tokens {tokens:?}:\n{log}"));
        assert_ne!(code, 0);
        assert!(log.contains("auth.operator_tokens"), "{tokens:?}: {log}");
        assert!(log.contains(says), "{tokens:?}: {log}");
    }
}

/// `POST /promises` with a deadline far past the longest allowed is a 400
/// and writes nothing: the id stays free (a later valid create gets 201).
#[tokio::test]
async fn a_huge_timeout_is_a_400_with_nothing_written() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let id = format!("{}-huge", app.name);
    let create = |timeout: Value| {
        app.operator(app.http.post(format!("{}/promises", app.sidecar_url)))
            .json(&json!({"id": id, "timeout": timeout}))
            .send()
    };
    let r = create(json!(100_000_000_000_000_000i64)).await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_timeout_seconds"),
        "{body}"
    );
    let r = app
        .operator(app.http.get(format!("{}/promises/{id}", app.sidecar_url)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "nothing was written");
    let in_a_day = chrono::Utc::now().timestamp_millis() + 86_400_000;
    let r = create(json!(in_a_day)).await.unwrap();
    assert_eq!(r.status(), 201);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["timeout"], json!(in_a_day));
    app.stop().await;
}

/// A record nobody can read (planted in Redis by hand, as an old bug or a
/// foreign writer would leave it) is left out of searches, the console's
/// promise list and bulk cancel, which all keep working; reading it by id
/// says what it is.
#[tokio::test]
async fn a_corrupt_record_leaves_search_and_the_console_working() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let tag = app.name.clone();
    let mut ids = Vec::new();
    for i in 0..3 {
        let id = format!("{}-ok-{i}", app.name);
        let r = app
            .operator(app.http.post(format!("{}/promises", app.sidecar_url)))
            .json(&json!({"id": id, "tags": {"batch": tag}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        ids.push(id);
    }
    let bad = format!("{}-corrupt", app.name);
    let Some((key, mut conn)) = app.promise_key(&bad).await else {
        eprintln!("skipped: planting a record needs the standalone Redis");
        app.stop().await;
        return;
    };
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg(&[
            ("id", bad.as_str()),
            ("state", "PENDING"),
            ("created", "1764400000000"),
            ("timeout", "1e+17"),
            ("tags", "{\"batch\": not json"),
        ])
        .query_async(&mut conn)
        .await
        .unwrap();
    // In the pending index too, as a record written by runbridge would be:
    // searches walk the indexes, not the keyspace.
    let keys = app.settings.keys().unwrap();
    let p = keys.partition(&runbridge::domain::PromiseId::parse(&bad).unwrap());
    let _: () = redis::pipe()
        .cmd("HSET")
        .arg(keys.pending_in_second(p, 1_764_400_000))
        .arg(&bad)
        .arg("")
        .cmd("ZADD")
        .arg(keys.pending_seconds(p))
        .arg(1_764_400_000)
        .arg(1_764_400_000)
        .query_async(&mut conn)
        .await
        .unwrap();

    let r = app
        .operator(
            app.http
                .get(format!("{}/promises?id=*&limit=1000", app.sidecar_url)),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let page: Value = r.json().await.unwrap();
    let found: Vec<&str> = page["promises"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["id"].as_str())
        .collect();
    for id in &ids {
        assert!(found.contains(&id.as_str()), "{id} in {found:?}");
    }
    assert!(!found.contains(&bad.as_str()));

    let r = app
        .operator(
            app.http
                .get(format!("{}/ui/promises?id=*", app.sidecar_url)),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    assert!(html.contains(&ids[0]), "{html}");
    assert!(html.contains(r#"id="unreadable""#), "{html}");

    let r = app
        .operator(
            app.http
                .post(format!("{}/promises/cancel", app.sidecar_url)),
        )
        .json(&json!({"tags": {"batch": tag}, "reason": "test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let report: Value = r.json().await.unwrap();
    assert_eq!(report["matched"], json!(3), "{report}");

    let r = app
        .operator(app.http.get(format!("{}/promises/{bad}", app.sidecar_url)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["reason"], "unreadable_record", "{body}");
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    app.stop().await;
}

/// A search cursor this sidecar did not hand out is the caller's mistake
/// (400), however it is forged; so is a wait that overflows.
#[tokio::test]
async fn malformed_cursors_and_waits_are_400s() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    for cursor in [
        "abc".to_string(),
        "%%%".to_string(),
        b64("-1:0"),
        b64("1:18446744073709551615:0"),
        b64("1:2:3:4"),
    ] {
        let r = app
            .operator(
                app.http
                    .get(format!("{}/promises?cursor={cursor}", app.sidecar_url)),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "cursor {cursor}");
    }
    let r = app
        .operator(app.http.get(format!(
            "{}/promises/{}-x?wait=307445734561825861m",
            app.sidecar_url, app.name
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    app.stop().await;
}

/// A logged-in console cookie opens `/ui` until logout, and never again
/// after it (the session is deleted on the server, not only in the
/// browser); it is never an API credential.
#[tokio::test]
async fn a_console_cookie_stops_working_after_logout() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let cookie = crate::ui::log_in(&app).await;
    let (status, page) = crate::ui::get(&app, "/ui/promises", Some(&cookie)).await;
    assert_eq!(status, 200);
    let csrf = crate::ui::csrf_of(&page);
    let value = cookie.split_once('=').unwrap().1.to_owned();
    let r = app
        .http
        .get(format!("{}/promises", app.sidecar_url))
        .bearer_auth(&value)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the session id is no API credential");

    let r = crate::ui::post_form(&app, "/ui/logout", Some(&cookie), &[("csrf", &csrf)]).await;
    assert_eq!(r.status(), 303);
    for path in ["/ui", "/ui/promises", "/ui/dead-letters"] {
        let (status, _) = crate::ui::get(&app, path, Some(&cookie)).await;
        assert_eq!(status, 401, "{path} with the cookie after logout");
    }
    app.stop().await;
}

/// A session ends after `sidecar.session_idle_seconds` unused, and after
/// `sidecar.session_max_seconds` however busy it is.
#[tokio::test]
async fn a_console_cookie_stops_working_after_its_expiry() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        overrides: vec![
            ("sidecar.session_idle_seconds", "1".into()),
            ("sidecar.session_max_seconds", "3".into()),
        ],
        ..Default::default()
    })
    .await;
    // Idle: unused for longer than a second.
    let cookie = crate::ui::log_in(&app).await;
    assert_eq!(crate::ui::get(&app, "/ui", Some(&cookie)).await.0, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        crate::ui::get(&app, "/ui", Some(&cookie)).await.0,
        401,
        "idle past session_idle_seconds"
    );

    // Absolute: used every 300 ms (well within the idle limit), it still
    // ends, between 3 s and the 8 s this test allows.
    let cookie = crate::ui::log_in(&app).await;
    let opened = tokio::time::Instant::now();
    let mut uses = 0;
    loop {
        let status = crate::ui::get(&app, "/ui", Some(&cookie)).await.0;
        if status == 401 {
            break;
        }
        assert_eq!(status, 200);
        uses += 1;
        assert!(
            opened.elapsed() < Duration::from_secs(8),
            "the session outlived session_max_seconds"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        uses >= 5,
        "the session was kept alive by use first ({uses})"
    );
    app.stop().await;
}

/// Pages allow only their one script (by hash: no 'unsafe-inline'), and
/// every response forbids sniffing and referrers.
#[tokio::test]
async fn pages_allow_no_inline_script_and_responses_forbid_sniffing() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let r = app
        .http
        .get(format!("{}/ui/login", app.sidecar_url))
        .send()
        .await
        .unwrap();
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    let script_src = csp
        .split(';')
        .map(str::trim)
        .find(|d| d.starts_with("script-src"))
        .unwrap_or_else(|| panic!("no script-src in {csp}"));
    assert!(!script_src.contains("unsafe-inline"), "{csp}");
    assert!(script_src.contains("'sha256-"), "{csp}");
    for path in ["/ui/login", "/promises", "/healthz", "/no-such-route"] {
        let r = app
            .http
            .get(format!("{}{path}", app.sidecar_url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(r.headers()["referrer-policy"], "no-referrer", "{path}");
    }
    app.stop().await;
}

/// An id with a "." or ".." segment is refused, so that no link of one
/// promise can resolve to another.
#[tokio::test]
async fn ids_with_dot_segments_are_refused() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    for id in ["decoy/../xss-7", "a/./b", "..", "x/.."] {
        let r = app
            .operator(app.http.post(format!("{}/promises", app.sidecar_url)))
            .json(&json!({"id": id}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{id}");
    }
    app.stop().await;
}

/// Viewing the dead letters ten times leaves each where it was, with the
/// delivery count it had.
#[tokio::test]
async fn viewing_dead_letters_leaves_their_delivery_count_unchanged() {
    let app = TestApp::spawn().await;
    let dlq = runbridge::broker::DeadLetterQueue::new(runbridge::startup::broker_settings(
        &app.settings,
        "it-count",
    ));
    app.publish_raw(br#"{"id": "dead-1", "job_id": "not a number"}"#, None)
        .await;
    eventually(Duration::from_secs(20), "dead-lettered", || async {
        (dlq.count().await.ok()? == 1).then_some(())
    })
    .await;
    for i in 0..10 {
        let r = app
            .operator(app.http.get(format!("{}/ui/dead-letters", app.sidecar_url)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.text().await.unwrap().contains("not a number"), "view {i}");
    }
    assert_eq!(dlq.count().await.unwrap(), 1);
    let letters = app.dead_letters(Duration::from_secs(5), 1).await;
    assert_eq!(letters.len(), 1);
    // A quorum queue's count of earlier deliveries (absent: none).
    let count = letters[0]
        .headers
        .get("x-delivery-count")
        .map_or(0, |n| n.parse::<i64>().unwrap());
    assert_eq!(count, 0, "ten views raised the delivery count");
    app.stop().await;
}

/// When the store fails, the console says so without its internal error
/// (which the log has): no Redis address, no OS error on the page.
#[tokio::test]
async fn console_error_pages_do_not_show_internal_errors() {
    let mut redis = RedisServer::ephemeral().await.unwrap();
    let port = redis.port();
    let app = TestApp::spawn_with(Options {
        worker: false,
        overrides: vec![
            ("redis.url", format!("redis://127.0.0.1:{port}")),
            ("redis.response_timeout_ms", "500".into()),
        ],
        ..Default::default()
    })
    .await;
    let r = app
        .operator(app.http.get(format!("{}/ui/promises", app.sidecar_url)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    redis.kill9();
    for path in ["/ui", "/ui/promises", "/ui/promises/some-id"] {
        let r = app
            .operator(app.http.get(format!("{}{path}", app.sidecar_url)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "{path}");
        let page = r.text().await.unwrap();
        assert!(page.contains("is unavailable"), "{path}: {page}");
        for internal in [
            "127.0.0.1",
            &port.to_string(),
            "os error",
            "refused",
            "redis unavailable",
        ] {
            assert!(
                !page.contains(internal),
                "{path} shows {internal:?}: {page}"
            );
        }
    }
    app.stop().await;
}

/// A dead-letter queue an earlier version declared as a quorum queue is
/// used as it is: declaring the topology still succeeds, dead letters keep
/// reaching it, and `runbridge check` says it differs.
#[tokio::test]
async fn an_existing_quorum_dead_letter_queue_is_used_as_it_is() {
    let app = TestApp::spawn_with(Options {
        overrides: vec![("amqp.dead_letter_queue_type", "quorum".into())],
        ..Default::default()
    })
    .await;
    let mut upgraded = app.settings.clone();
    upgraded.amqp.dead_letter_queue_type = runbridge::config::DeadLetterQueueType::Classic;
    let bs = runbridge::startup::broker_settings(&upgraded, "it-upgrade");
    let broker = runbridge::broker::Broker::connect(&bs).await.unwrap();
    broker
        .declare_topology()
        .await
        .expect("an existing quorum dead-letter queue does not stop a worker");
    let dlq = broker
        .check_topology()
        .await
        .into_iter()
        .find(|f| f.object == format!("queue {}", bs.dead_letter_queue))
        .unwrap();
    assert!(
        matches!(dlq.state, runbridge::broker::Found::Wrong),
        "{}",
        dlq.detail
    );
    broker.close().await;
    app.publish_raw(br#"{"id": "dead-2", "job_id": "x"}"#, None)
        .await;
    let queue = runbridge::broker::DeadLetterQueue::new(bs);
    eventually(Duration::from_secs(20), "dead-lettered", || async {
        (queue.count().await.ok()? == 1).then_some(())
    })
    .await;
    app.stop().await;
}
