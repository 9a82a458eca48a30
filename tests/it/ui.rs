//! The operator console against a live sidecar with real data:
//! promises made by real triggers (resolved, pending, refused), a real
//! dead letter in RabbitMQ.
//!
//! - without the operator token every console route answers 401 and shows
//!   no data; a form without its CSRF token changes nothing;
//! - dead letters are listed with their reason and can be republished after
//!   editing (the dead letter leaves the queue only once the new trigger is
//!   confirmed, and the trigger then runs);
//! - in a real headless browser (tests/ui/console.e2e.mjs: Debian's
//!   chromium and playwright-core, which `make test` installs): log in, read
//!   the overview, find a promise by search, open it, cancel it with the
//!   keyboard, see its state change, log out. The overview's screenshot is
//!   saved to target/ui/overview.png (`make ui-screenshot` copies it to docs/).

use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{COOKIE, LOCATION};
use runbridge::domain::State;
use serde_json::json;

use crate::helpers::*;

/// A client that does not follow redirects (to see the 303s and cookies).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The login form as `http` gets it: the whole `Set-Cookie` line of its
/// cookie, and the form's CSRF token.
pub async fn login_form_from(http: &reqwest::Client, app: &TestApp) -> (String, String) {
    let r = http
        .get(format!("{}/ui/login", app.sidecar_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    let page = r.text().await.unwrap();
    let at = page.find(r#"name="csrf" value=""#).unwrap() + 19;
    (set, page[at..at + 32].to_owned())
}

/// The login form: its cookie (`rb_login=...`) and the form's CSRF token.
pub async fn login_form(app: &TestApp) -> (String, String) {
    let (set, csrf) = login_form_from(&client(), app).await;
    (set.split(';').next().unwrap().to_owned(), csrf)
}

/// Posts a console form (with the session or login cookie, if any).
pub async fn post_form(
    app: &TestApp,
    path: &str,
    cookie: Option<&str>,
    fields: &[(&str, &str)],
) -> reqwest::Response {
    let mut rb = client().post(format!("{}{path}", app.sidecar_url));
    if let Some(c) = cookie {
        rb = rb.header(COOKIE, c);
    }
    rb.form(fields).send().await.unwrap()
}

pub async fn post_login(app: &TestApp, cookie: &str, csrf: &str, token: &str) -> reqwest::Response {
    post_form(
        app,
        "/ui/login",
        Some(cookie),
        &[("csrf", csrf), ("token", token)],
    )
    .await
}

/// The `Set-Cookie` line of the cookie `name` in this answer.
fn set_cookie(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|c| c.starts_with(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} cookie"))
}

/// Logs in through the form; the session cookie.
pub async fn log_in(app: &TestApp) -> String {
    let (login_cookie, csrf) = login_form(app).await;
    let r = post_login(app, &login_cookie, &csrf, &app.operator_token).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let cookie = set_cookie(&r, "rb_session");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(cookie.contains(attr), "cookie without {attr}: {cookie}");
    }
    cookie.split(';').next().unwrap().to_owned()
}

/// The page's CSRF token (every form carries the same one).
pub fn csrf_of(html: &str) -> String {
    let at = html
        .find(r#"name="csrf" value=""#)
        .expect("a form with a CSRF token")
        + 19;
    html[at..at + 64].to_owned()
}

pub async fn get(app: &TestApp, path: &str, cookie: Option<&str>) -> (StatusCode, String) {
    let mut rb = client().get(format!("{}{path}", app.sidecar_url));
    if let Some(c) = cookie {
        rb = rb.header(COOKIE, c);
    }
    let r = rb.send().await.unwrap();
    (r.status(), r.text().await.unwrap())
}

/// A pending promise (run that never finishes), a resolved one, a dead letter.
async fn real_data(app: &mut TestApp) -> (String, String) {
    let pending = unique("console-pending");
    let resolved = unique("console-done");
    app.publish(&json!({"id": pending, "job_id": JOB_NEVER, "tags": {"team": "growth"}}))
        .await;
    app.publish(&trigger(&resolved, JOB_CALLBACK)).await;
    app.publish_raw(br#"{"id": "console-bad", "job_id": "not a number"}"#, None)
        .await;
    app.first_event(&resolved, Duration::from_secs(15)).await;
    app.callback_url(&pending).await;
    (pending, resolved)
}

#[tokio::test]
async fn console_is_closed_without_the_token_and_forms_need_csrf() {
    let mut app = TestApp::spawn().await;
    let (pending, resolved) = real_data(&mut app).await;

    // No token, a wrong cookie, a wrong bearer: 401 and nothing of the data.
    // The cookie of earlier versions held the operator token itself: it is
    // no credential now.
    let old_cookie = format!("rb_operator={}", app.operator_token);
    let bad_cookie = old_cookie.as_str();
    for path in [
        "/ui".to_owned(),
        "/ui/overview".to_owned(),
        "/ui/promises".to_owned(),
        format!("/ui/promises?id={pending}"),
        format!("/ui/promises/{pending}"),
        format!("/ui/promises/{resolved}"),
        "/ui/dead-letters".to_owned(),
        "/ui/login".to_owned(),
    ] {
        for cookie in [
            None,
            Some(bad_cookie),
            Some(&format!("rb_session={}", "ab".repeat(32))),
        ] {
            let (status, body) = get(&app, &path, cookie).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "GET {path} ({cookie:?})");
            for secret in [
                pending.as_str(),
                resolved.as_str(),
                "console-bad",
                "count-pending",
            ] {
                assert!(!body.contains(secret), "GET {path} shows {secret}");
            }
        }
    }
    for path in ["/ui/act", "/ui/logout", "/ui/dead-letters/republish"] {
        let fields = [
            ("id", pending.as_str()),
            ("action", "cancel"),
            ("confirm", "yes"),
        ];
        let r = post_form(&app, path, None, &fields).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "POST {path}");
    }
    // Logging in needs the login form's own CSRF token and cookie...
    let (login_cookie, csrf) = login_form(&app).await;
    for (cookie, token) in [("rb_login=", csrf.as_str()), (login_cookie.as_str(), "")] {
        let r = post_login(&app, cookie, token, &app.operator_token).await;
        assert_eq!(
            r.status(),
            StatusCode::FORBIDDEN,
            "login CSRF {cookie:?} {token:?}"
        );
        assert!(
            !r.headers()
                .get_all("set-cookie")
                .iter()
                .any(|c| c.to_str().unwrap().starts_with("rb_session="))
        );
    }
    // ...and an operator token.
    let r = post_login(&app, &login_cookie, &csrf, "op-token-guess").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(
        !r.headers()
            .get_all("set-cookie")
            .iter()
            .any(|c| c.to_str().unwrap().starts_with("rb_session="))
    );

    // Two heartbeats from the notebook (for the timeline below).
    let url = app.callback_url(&pending).await;
    for _ in 0..2 {
        let r = app
            .http
            .post(format!("{url}/heartbeat"))
            .query(&[("id", &pending)])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }

    // Logged in, a state-changing form without (or with a wrong) CSRF token
    // is refused and changes nothing.
    let cookie = log_in(&app).await;
    let (status, page) = get(&app, &format!("/ui/promises/{pending}"), Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
    let csrf = csrf_of(&page);
    for bad in [
        "",
        "0000000000000000000000000000000000000000000000000000000000000000",
    ] {
        let fields = [
            ("csrf", bad),
            ("id", pending.as_str()),
            ("action", "cancel"),
            ("confirm", "yes"),
        ];
        let r = post_form(&app, "/ui/act", Some(&cookie), &fields).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "csrf {bad:?}");
    }
    assert_eq!(app.promise(&pending).await.unwrap().state, State::Pending);
    // Nor without ticking the confirmation.
    let fields = [
        ("csrf", csrf.as_str()),
        ("id", pending.as_str()),
        ("action", "cancel"),
    ];
    let r = post_form(&app, "/ui/act", Some(&cookie), &fields).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(app.promise(&pending).await.unwrap().state, State::Pending);
    // With both: resolved by hand, by an operator; one event.
    let fields = [
        ("csrf", csrf.as_str()),
        ("id", pending.as_str()),
        ("action", "resolve"),
        ("value", "{\"rows\": 7}"),
        ("confirm", "yes"),
    ];
    let r = post_form(&app, "/ui/act", Some(&cookie), &fields).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let (_, ev) = app.first_event(&pending, Duration::from_secs(10)).await;
    assert_eq!(ev["data"]["state"], "RESOLVED");
    assert_eq!(ev["data"]["settled_by"], "operator");
    assert_eq!(ev["data"]["value"]["rows"], 7);
    let (_, page) = get(&app, r.headers()[LOCATION].to_str().unwrap(), Some(&cookie)).await;
    assert!(page.contains(r#"id="promise-state">RESOLVED"#), "{page}");
    // The timeline: launched (with its time), the heartbeats, the settlement
    // by an operator, and (once the relay's confirm is recorded) the event.
    let page = eventually(
        Duration::from_secs(10),
        "the event's publication on the timeline",
        || async {
            let (_, page) = get(&app, &format!("/ui/promises/{pending}"), Some(&cookie)).await;
            page.contains("published (routing key").then_some(page)
        },
    )
    .await;
    assert!(page.contains("UTC: launched as Databricks run"), "{page}");
    assert!(page.contains("the last of 2 heartbeats"), "{page}");
    assert!(page.contains("RESOLVED by operator"), "{page}");
    app.stop().await;
}

#[tokio::test]
async fn dead_letters_are_listed_and_republished_after_editing() {
    let mut app = TestApp::spawn().await;
    let id = unique("console-fixed");
    app.publish_raw(
        format!(r#"{{"id": "{id}", "job_id": "one"}}"#).as_bytes(),
        Some("dl-message-1"),
    )
    .await;
    let cookie = log_in(&app).await;
    let page = eventually(
        Duration::from_secs(10),
        "the dead letter listed",
        || async {
            let (status, page) = get(&app, "/ui/dead-letters", Some(&cookie)).await;
            (status == StatusCode::OK && page.contains("dl-message-1")).then_some(page)
        },
    )
    .await;
    assert!(page.contains("job_id must be a positive integer"), "{page}");
    // Browsing left it in the queue: it is still listed.
    let (_, again) = get(&app, "/ui/dead-letters", Some(&cookie)).await;
    assert!(again.contains("dl-message-1"));
    let at = page.find(r#"name="fingerprint" value=""#).unwrap() + 26;
    let fingerprint = &page[at..at + 32];
    let csrf = csrf_of(&page);

    // A wrong CSRF token: nothing published, nothing removed.
    let (status, _) = republish(&app, &cookie, fingerprint, "x", "{}").await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let fixed = json!({"id": id, "job_id": JOB_CALLBACK}).to_string();
    let (status, to) = republish(&app, &cookie, fingerprint, &csrf, &fixed).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(to.contains("Republished"), "{to}");
    // The edited trigger runs; the dead letter is gone.
    let (ev, v) = app.first_event(&id, Duration::from_secs(15)).await;
    assert_eq!(v["data"]["state"], "RESOLVED");
    assert_eq!(
        ev.message_id.as_deref(),
        Some(format!("{id}/RESOLVED").as_str())
    );
    let (_, after) = get(&app, "/ui/dead-letters", Some(&cookie)).await;
    assert!(!after.contains("dl-message-1"), "{after}");
    // Republishing it again finds nothing, and publishes nothing.
    let (_, to) = republish(&app, &cookie, fingerprint, &csrf, &fixed).await;
    assert!(
        to.contains("no+longer") || to.contains("no%20longer"),
        "{to}"
    );
    assert_eq!(app.runs_for(&id).await.len(), 1);
    app.stop().await;
}

/// Posts the republish form; its status and where it sends the browser next.
async fn republish(
    app: &TestApp,
    cookie: &str,
    fingerprint: &str,
    csrf: &str,
    body: &str,
) -> (StatusCode, String) {
    let fields = [
        ("csrf", csrf),
        ("fingerprint", fingerprint),
        ("body", body),
        ("confirm", "yes"),
    ];
    let r = post_form(app, "/ui/dead-letters/republish", Some(cookie), &fields).await;
    let to = r
        .headers()
        .get(LOCATION)
        .map(|l| l.to_str().unwrap().to_owned());
    (r.status(), to.unwrap_or_default())
}

/// What the browser test needs, or a message saying how to get it.
fn browser_tools() -> (PathBuf, PathBuf) {
    let chromium = std::env::var("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/usr/bin/chromium"));
    let modules = node_modules();
    assert!(
        chromium.exists() && modules.join("playwright-core").exists(),
        "the browser test needs chromium ({}) and playwright-core under {}: run `make ui-test-deps` (part of `make test`)",
        chromium.display(),
        modules.display()
    );
    (chromium, modules)
}

#[tokio::test]
async fn console_in_a_real_browser() {
    let (chromium, modules) = browser_tools();
    let mut app = TestApp::spawn_with(Options {
        overrides: vec![
            ("audit.interval_ms", "300".into()),
            ("audit.grace_ms", "500".into()),
        ],
        ..Default::default()
    })
    .await;
    let (pending, _) = real_data(&mut app).await;
    // A run started by hand for a promise nobody made: the audit's orphan.
    let orphan_of = unique("never-made");
    let orphan_run = app
        .run_by_hand(JOB_NEVER, serde_json::json!({"promise_id": orphan_of}))
        .await
        .to_string();
    eventually(
        Duration::from_secs(20),
        "the audit kept the orphan",
        || async {
            runbridge::audit::kept_findings(&app.store, "default", 10)
                .await
                .unwrap()
                .into_iter()
                .find(|f| f.promise_id == orphan_of)
        },
    )
    .await;
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/ui");
    std::fs::create_dir_all(&out).unwrap();
    let shot = out.join("overview.png");
    let _ = std::fs::remove_file(&shot);
    let (status, log) = run_node(
        "tests/ui/console.e2e.mjs",
        &[
            ("BASE_URL", app.sidecar_url.as_ref()),
            ("TOKEN", app.operator_token.as_ref()),
            ("PROMISE_ID", pending.as_ref()),
            ("ORPHAN_PROMISE", orphan_of.as_ref()),
            ("ORPHAN_RUN", orphan_run.as_ref()),
            ("SCREENSHOT", shot.as_os_str()),
            ("CHROMIUM", chromium.as_os_str()),
            ("PLAYWRIGHT_MODULES", modules.as_os_str()),
        ],
        Duration::from_secs(120),
    )
    .await;
    assert!(status.success(), "browser test failed:\n{log}");
    assert!(!log.contains("FAIL"), "{log}");
    // What the browser did really happened.
    let p = app.promise(&pending).await.unwrap();
    assert_eq!(p.state, State::RejectedCanceled, "{log}");
    assert_eq!(p.settled_by.as_deref(), Some("operator"));
    let png = std::fs::read(&shot).expect("the screenshot was saved");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    app.stop().await;
}

/// Five dead letters of 8 MiB each (triggers refused for their size, kept
/// intact) and a promise whose parameter is 250 KB nested 126 deep: their
/// console pages stay small (previews and a cut, never whole bodies or a
/// pretty-print that indents every level), a whole body is a download, and
/// six views at once each list every dead letter (browsing is serialised).
#[tokio::test]
async fn pages_over_the_largest_stored_inputs_stay_small() {
    const BIG: usize = 8 << 20;
    let app = TestApp::spawn().await;
    for i in 0..5 {
        let mut body =
            format!(r#"{{"id": "{}-big-{i}", "job_id": 1, "pad": ""#, app.name).into_bytes();
        body.resize(BIG - 2, b'"');
        body.extend_from_slice(b"\"}");
        app.publish_raw(&body, Some(&format!("dl-big-{i}"))).await;
    }
    let cookie = log_in(&app).await;
    let page = eventually(Duration::from_secs(30), "five dead letters", || async {
        let (status, page) = get(&app, "/ui/dead-letters", Some(&cookie)).await;
        (status == StatusCode::OK && (0..5).all(|i| page.contains(&format!("dl-big-{i}"))))
            .then_some(page)
    })
    .await;
    // 4,096 bytes of `"` escape to 24 KiB each: five of them and the page.
    assert!(page.len() < 256 * 1024, "a {} byte page", page.len());
    assert_eq!(page.matches("8388608 bytes; the first 4096").count(), 5);
    let at = page.find("/ui/dead-letters/body?fingerprint=").unwrap() + 34;
    let fingerprint = page[at..at + 32].to_owned();
    let whole = client()
        .get(format!(
            "{}/ui/dead-letters/body?fingerprint={fingerprint}",
            app.sidecar_url
        ))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(whole.status(), StatusCode::OK);
    assert!(
        whole.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment")
    );
    assert_eq!(whole.bytes().await.unwrap().len(), BIG);

    let views = (0..6).map(|_| get(&app, "/ui/dead-letters", Some(&cookie)));
    for (status, page) in futures_util::future::join_all(views).await {
        assert_eq!(status, StatusCode::OK);
        let seen = (0..5)
            .filter(|i| page.contains(&format!("dl-big-{i}")))
            .count();
        assert_eq!(seen, 5, "a view saw {seen} of 5");
    }

    // 126 levels of nesting, padded to 250 KB.
    let id = format!("{}-deep", app.name);
    let mut deep = String::new();
    for _ in 0..126 {
        deep.push_str(r#"{"a":["#);
    }
    deep.push_str(&format!("\"{}\"", "x".repeat(250_000)));
    for _ in 0..126 {
        deep.push_str("]}");
    }
    let r = app
        .operator(app.http.post(format!("{}/promises", app.sidecar_url)))
        .json(&json!({"id": id, "param": {"data": deep}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
    let (status, page) = get(&app, &format!("/ui/promises/{id}"), Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.len() < 256 * 1024, "a {} byte page", page.len());
    assert!(page.contains("are shown"), "the value is cut");
    app.stop().await;
}

/// Under HTTPS (here a TLS-terminating proxy: an https public URL) the
/// console's cookies, the login form's included, are `Secure` and named
/// `__Host-…` (kept by a browser only when this host set them over HTTPS,
/// with `Path=/` and no `Domain`), and a plain `rb_session` cookie, which
/// a sibling subdomain could plant, opens nothing.
#[tokio::test]
async fn console_cookies_under_https_are_secure_host_cookies() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        overrides: vec![("sidecar.public_url", "https://runbridge.example.com".into())],
        ..Default::default()
    })
    .await;
    let (set, csrf) = login_form_from(&client(), &app).await;
    let host_cookie = |c: &str, name: &str| {
        assert!(c.starts_with(&format!("__Host-{name}=")), "{c}");
        for attr in ["; Secure", "; Path=/;", "; HttpOnly", "; SameSite=Strict"] {
            assert!(c.contains(attr), "{name} without {attr}: {c}");
        }
        assert!(!c.contains("Domain"), "{c}");
    };
    host_cookie(&set, "rb_login");
    let login_cookie = set.split(';').next().unwrap().to_owned();

    let r = post_login(&app, &login_cookie, &csrf, &app.operator_token).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let session = set_cookie(&r, "__Host-rb_session");
    host_cookie(&session, "rb_session");
    let pair = session.split(';').next().unwrap().to_owned();
    assert_eq!(get(&app, "/ui", Some(&pair)).await.0, StatusCode::OK);
    let unprefixed = pair.trim_start_matches("__Host-");
    assert_eq!(
        get(&app, "/ui", Some(unprefixed)).await.0,
        StatusCode::UNAUTHORIZED
    );
    app.stop().await;
}

/// The console's AMQP connections in `vhost`: (name, connected_at) of each.
/// `list_connections` lists every vhost's, and other tests' sidecars run
/// beside this one.
fn console_connections(vhost: &str) -> Vec<(String, String)> {
    let out = runbridge_testkit::rabbitmqctl(
        None,
        &[
            "list_connections",
            "vhost",
            "name",
            "connected_at",
            "client_properties",
            "--formatter",
            "json",
        ],
    )
    .unwrap();
    let all: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
    all.iter()
        .filter(|c| c["vhost"] == vhost)
        .filter(|c| {
            c["client_properties"]
                .to_string()
                .contains("sidecar-console")
        })
        .map(|c| (c["name"].to_string(), c["connected_at"].to_string()))
        .collect()
}

/// The console reads the dead-letter queue on one AMQP connection that it
/// keeps: list views, downloads and overview refreshes (which count dead
/// letters every few seconds) open no new one.
#[tokio::test]
async fn dead_letter_views_share_one_kept_connection() {
    let vhost = unique("it-console");
    rabbitmqctl(&["add_vhost", &vhost]);
    rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    let app = TestApp::spawn_with(Options {
        vhost: Some(vhost.clone()),
        ..Default::default()
    })
    .await;
    let cookie = log_in(&app).await;
    let (status, page) = get(&app, "/ui/dead-letters", Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let first = console_connections(&vhost);
    assert_eq!(first.len(), 1, "one console connection kept: {first:?}");
    for _ in 0..3 {
        assert_eq!(
            get(&app, "/ui/dead-letters", Some(&cookie)).await.0,
            StatusCode::OK
        );
        assert_eq!(
            get(&app, "/ui/overview", Some(&cookie)).await.0,
            StatusCode::OK
        );
    }
    assert_eq!(
        console_connections(&vhost),
        first,
        "the views opened connections of their own"
    );
    app.stop().await;
    rabbitmqctl(&["delete_vhost", &vhost]);
}
