//! The sidecar: callbacks, the Durable Promise API, auth and bad input
//! (and the Resonate notebook).

use std::time::Duration;

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

/// A pending promise with a run that never finishes, and its callback URL.
async fn pending(app: &TestApp, prefix: &str) -> (String, String) {
    let id = unique(prefix);
    app.publish(&trigger(&id, JOB_NEVER)).await;
    let url = app.callback_url(&id).await;
    eventually(Duration::from_secs(10), "run id recorded", || async {
        app.promise(&id).await.filter(|p| p.run_id.is_some())
    })
    .await;
    (id, url)
}

/// The Resonate Databricks example's notebook, unchanged:
/// `requests.post(f"{url}/resolve", params={"id": promise_id, "value": "hello world"})`,
/// reading `url` and `promise_id` as notebook parameters. Played here with the
/// same HTTP request.
#[tokio::test]
async fn resonate_example_notebook_settles_the_promise() {
    let mut app = TestApp::spawn().await;
    let (id, _) = pending(&app, "resonate").await;
    let run = app.runs_for(&id).await.remove(0);
    let url = run["job_parameters"]["url"].as_str().unwrap();
    let promise_id = run["job_parameters"]["promise_id"].as_str().unwrap();
    let r = app
        .http
        .post(format!("{url}/resolve"))
        .query(&[("id", promise_id), ("value", "hello world")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (_, v) = app.first_event(&id, Duration::from_secs(10)).await;
    assert_eq!(v["data"]["value"], "hello world");
    app.stop().await;
}

/// (e) the same resolve twice: 200 deduplicated, one event; a conflicting
/// reject afterwards: 403, nothing changes.
#[tokio::test]
async fn repeat_resolve_is_deduplicated_and_conflicting_reject_is_403() {
    let mut app = TestApp::spawn().await;
    let (id, url) = pending(&app, "dedup").await;
    let resolve = || {
        app.http
            .post(format!("{url}/resolve"))
            .query(&[("id", id.as_str()), ("value", "42")])
            .send()
    };

    let first: Value = {
        let r = resolve().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.unwrap()
    };
    assert_eq!(first["deduplicated"], false);
    assert_eq!(first["state"], "RESOLVED");
    let second = resolve().await.unwrap();
    assert_eq!(second.status(), StatusCode::OK);
    let second: Value = second.json().await.unwrap();
    assert_eq!(second["deduplicated"], true);
    assert_eq!(second["completedOn"], first["completedOn"]);

    let before = app.promise(&id).await.unwrap();
    let r = app
        .http
        .post(format!("{url}/reject"))
        .query(&[("id", id.as_str()), ("error", "boom")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["reason"], "already_settled");
    assert_eq!(body["error"]["state"], "RESOLVED");
    // As Resonate's server answers it: the HTTP status as a number, and
    // its status code for "already resolved".
    assert_eq!(body["error"]["code"], 403);
    assert_eq!(body["error"]["status"], "4030");
    // What clients see (the relay notes the event's publication on the
    // record by itself, so the whole record may differ in that field).
    assert_eq!(
        app.promise(&id).await.unwrap().view(),
        before.view(),
        "the reject changed nothing"
    );

    let events = app.events_for(&id, Duration::from_secs(2)).await;
    assert_eq!(events.len(), 1, "one event for one settlement");
    assert_eq!(events[0].1["data"]["value"], 42);
    app.stop().await;
}

/// (f) wrong token, another promise's token, no token → 401 and nothing
/// changes; a 300 KiB body → 413.
#[tokio::test]
async fn bad_tokens_are_401_and_big_bodies_413() {
    let mut app = TestApp::spawn().await;
    let (a, url_a) = pending(&app, "auth-a").await;
    let (b, _url_b) = pending(&app, "auth-b").await;
    let before_a = app.promise(&a).await.unwrap();
    let before_b = app.promise(&b).await.unwrap();
    let base = app.sidecar_url.clone();
    let forged = format!("{base}/cb/v1.{}", "A".repeat(43));

    let cases = vec![
        (
            "wrong token",
            app.http
                .post(format!("{forged}/resolve"))
                .query(&[("id", a.as_str())]),
        ),
        (
            "token of another promise",
            app.http
                .post(format!("{url_a}/resolve"))
                .query(&[("id", b.as_str())]),
        ),
        (
            "no token",
            app.http
                .post(format!("{base}/resolve"))
                .query(&[("id", a.as_str())]),
        ),
        (
            "truncated token",
            app.http
                .post(format!("{}/resolve", &url_a[..url_a.len() - 1]))
                .query(&[("id", a.as_str())]),
        ),
        (
            "garbage bearer",
            app.http
                .post(format!("{base}/resolve"))
                .query(&[("id", a.as_str())])
                .bearer_auth("nope"),
        ),
        (
            "no token on read",
            app.http.get(format!("{base}/promises/{a}")),
        ),
    ];
    for (what, req) in cases {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{what}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            body["error"]["reason"], "unauthorized",
            "{what}: JSON error body"
        );
    }

    let big = "x".repeat(300 * 1024);
    let r = app
        .http
        .post(format!("{url_a}/resolve"))
        .header("content-type", "application/json")
        .body(json!({"id": a, "value": big}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["reason"], "payload_too_large");

    let r = app
        .http
        .post(format!("{url_a}/resolve"))
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let r = app
        .http
        .post(format!("{url_a}/resolve"))
        .header("content-type", "application/json")
        .body("{\"id\":")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    assert_eq!(app.promise(&a).await.unwrap().view(), before_a.view());
    assert_eq!(app.promise(&b).await.unwrap().view(), before_b.view());
    app.assert_no_event(&a, Duration::from_millis(800), "no further event")
        .await;
    app.stop().await;
}

/// The token is also accepted as Bearer and as the Basic-auth password, and
/// JSON bodies work like query strings.
#[tokio::test]
async fn bearer_basic_and_json_callbacks() {
    let app = TestApp::spawn().await;
    let (a, url_a) = pending(&app, "bearer").await;
    let token = url_a.rsplit('/').next().unwrap().to_string();
    let r = app
        .http
        .post(format!("{}/resolve", app.sidecar_url))
        .bearer_auth(&token)
        .json(&json!({"id": a, "value": {"rows": 3}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let p = app.promise(&a).await.unwrap();
    assert_eq!(p.value.data.as_deref(), Some(r#"{"rows":3}"#));

    let (b, url_b) = pending(&app, "basic").await;
    let token_b = url_b.rsplit('/').next().unwrap().to_string();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("notebook:{token_b}"));
    let r = app
        .http
        .post(format!("{}/reject", app.sidecar_url))
        .header("authorization", format!("Basic {basic}"))
        .query(&[("id", b.as_str()), ("error", "bad input")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(app.promise(&b).await.unwrap().state.as_str(), "REJECTED");
    app.stop().await;
}

/// The Durable Promise API as a Resonate SDK client uses it:
/// `PATCH {url}/promises/{id}` with `idempotency-key`, and the operator routes.
/// Clients generated from the Durable Promise OpenAPI document send `null`
/// for optional objects they leave unset: a create with `"headers": null`
/// (and `"tags": null`) gets the answer one without them gets, and a
/// promise without data has no `data` member rather than `"data": null`.
#[tokio::test]
async fn a_classic_create_with_null_optional_objects_is_one_without_them() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let base = app.sidecar_url.clone();
    let timeout = chrono::Utc::now().timestamp_millis() + 86_400_000;
    let create = |body: Value| {
        app.operator(app.http.post(format!("{base}/promises")))
            .json(&body)
            .send()
    };
    let (with_nulls, without) = (unique("nulls"), unique("absent"));
    let r = create(json!({"id": with_nulls, "param": {"headers": null, "data": null}, "timeout": timeout, "tags": null}))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let mut a: Value = r.json().await.unwrap();
    let r = create(json!({"id": without, "param": {}, "timeout": timeout}))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let mut b: Value = r.json().await.unwrap();
    assert_eq!(a["param"], json!({"headers": {}}), "no data member: {a}");
    assert_eq!(a["value"], json!({"headers": {}}), "no data member: {a}");
    for v in [&mut a, &mut b] {
        let o = v.as_object_mut().unwrap();
        o.remove("id");
        o.remove("createdOn");
    }
    assert_eq!(a, b);
    // A wrong type is still refused, and creates nothing.
    let bad = unique("bad");
    let r = create(json!({"id": bad, "param": {"headers": 3}, "timeout": timeout}))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = app
        .operator(app.http.get(format!("{base}/promises/{bad}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn durable_promise_api() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let base = app.sidecar_url.clone();
    let id = unique("api");
    // A day from now: within worker.max_timeout_seconds.
    let timeout = chrono::Utc::now().timestamp_millis() + 86_400_000;

    // Create: 201, then 200 deduplicated with the same key, 409 with another.
    let create = |key: &str| {
        app.operator(app.http.post(format!("{base}/promises")))
            .header("idempotency-key", key)
            .json(&json!({"id": id, "param": {"headers": {}, "data": "cGFyYW0="}, "timeout": timeout, "tags": {"k": "v"}}))
            .send()
    };
    let r = create("ik1").await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let created: Value = r.json().await.unwrap();
    assert_eq!(created["state"], "PENDING");
    assert_eq!(created["idempotencyKeyForCreate"], "ik1");
    assert_eq!(created["timeout"], timeout);
    assert_eq!(create("ik1").await.unwrap().status(), StatusCode::OK);
    assert_eq!(create("ik2").await.unwrap().status(), StatusCode::CONFLICT);

    // Read: stable fields across reads.
    let get = || {
        app.operator(app.http.get(format!("{base}/promises/{id}")))
            .send()
    };
    let a: Value = get().await.unwrap().json().await.unwrap();
    let b: Value = get().await.unwrap().json().await.unwrap();
    assert_eq!(a, b);
    assert_eq!(a["createdOn"], created["createdOn"]);
    assert_eq!(a["tags"], json!({"k": "v"}));

    // Search.
    let r: Value = app
        .operator(app.http.get(format!("{base}/promises")))
        .query(&[
            ("id", format!("{}*", &id[..10]).as_str()),
            ("state", "pending"),
            ("tags[k]", "v"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        r["promises"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == json!(id)),
        "{r}"
    );
    let none: Value = app
        .operator(app.http.get(format!("{base}/promises")))
        .query(&[("id", id.as_str()), ("state", "rejected")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(none["promises"], json!([]), "an empty list, never null");
    assert_eq!(
        app.operator(app.http.get(format!("{base}/promises")))
            .query(&[("state", "done")])
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );

    // Long-poll: a reader waiting with ?wait= sees the settlement.
    let waiter = {
        let req = app
            .operator(app.http.get(format!("{base}/promises/{id}")))
            .query(&[("wait", "10s")]);
        tokio::spawn(async move { req.send().await.unwrap().json::<Value>().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Complete as the Resonate SDK does: PATCH with idempotency-key.
    let patch = |state: &str, key: &str| {
        app.operator(app.http.patch(format!("{base}/promises/{id}")))
            .header("idempotency-key", key)
            .header("strict", "false")
            .json(&json!({"state": state, "value": {"headers": {}, "data": "\"done\""}}))
            .send()
    };
    let r = patch("RESOLVED", &id).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let settled: Value = r.json().await.unwrap();
    assert_eq!(settled["state"], "RESOLVED");
    assert_eq!(settled["settledBy"], "operator");
    let waited = waiter.await.unwrap();
    assert_eq!(waited["state"], "RESOLVED");
    // Same key: deduplicated; other key: 403.
    assert_eq!(
        patch("RESOLVED", &id)
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()["deduplicated"],
        true
    );
    assert_eq!(
        patch("REJECTED", "other-key").await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    // Unknown promise, bad state.
    let r = app
        .operator(
            app.http
                .get(format!("{base}/promises/{}", unique("missing"))),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["reason"],
        "not_found"
    );
    let r = app
        .operator(app.http.patch(format!("{base}/promises/{id}")))
        .json(&json!({"state": "PENDING"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    app.stop().await;
}

/// Heartbeats extend a pending promise and answer 403 once it is settled.
#[tokio::test]
async fn heartbeat_on_pending_and_settled() {
    let app = TestApp::spawn().await;
    let id = unique("hb");
    app.publish(
        &json!({"id": id, "job_id": JOB_NEVER, "heartbeat_seconds": 60, "timeout_seconds": 600}),
    )
    .await;
    let url = app.callback_url(&id).await;
    let r = app
        .http
        .post(format!("{url}/heartbeat"))
        .query(&[("id", id.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .http
        .post(format!("{url}/resolve"))
        .query(&[("id", id.as_str()), ("value", "v")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .http
        .post(format!("{url}/heartbeat"))
        .query(&[("id", id.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["state"],
        "RESOLVED"
    );
    app.stop().await;
}

/// /healthz and /readyz answer JSON; readyz checks Redis and the broker.
#[tokio::test]
async fn health_and_readiness() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let r = app
        .http
        .get(format!("{}/healthz", app.sidecar_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v = eventually(Duration::from_secs(10), "ready", || async {
        let r = app
            .http
            .get(format!("{}/readyz", app.sidecar_url))
            .send()
            .await
            .ok()?;
        (r.status() == StatusCode::OK).then_some(())?;
        r.json::<Value>().await.ok()
    })
    .await;
    assert_eq!(v, json!({"status": "ready", "redis": "ok", "broker": "ok"}));
    let r = app
        .http
        .get(format!("{}/nope", app.sidecar_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(r.json::<Value>().await.unwrap()["error"]["reason"].is_string());
    app.stop().await;
}
