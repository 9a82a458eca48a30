//! The generated contracts: the copies under docs/ are the
//! code's current output, and real messages and real HTTP answers validate
//! against them: triggers and completion events off the broker against the
//! JSON Schemas, every sidecar answer against the OpenAPI document's schema
//! for its route, method and status.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use runbridge::config::Settings;
use runbridge::schemas;
use serde_json::{Value, json};

use crate::helpers::*;

fn docs_file(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs").join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn docs_json(rel: &str) -> Value {
    serde_json::from_str(&docs_file(rel)).unwrap()
}

/// `runbridge schema ...` prints the document and a newline; so is each file.
fn printed(text: String) -> String {
    format!("{}\n", text.trim_end())
}

#[test]
fn docs_hold_the_generated_documents() {
    let pretty = |v: Value| printed(serde_json::to_string_pretty(&v).unwrap());
    let amqp = Settings::defaults().unwrap().amqp;
    for (file, generated) in [
        ("schemas/trigger.schema.json", pretty(schemas::trigger())),
        ("schemas/event.schema.json", pretty(schemas::event())),
        ("schemas/control.schema.json", pretty(schemas::control())),
        (
            "schemas/progress-event.schema.json",
            pretty(schemas::progress_event()),
        ),
        (
            "schemas/finding-event.schema.json",
            pretty(schemas::finding_event()),
        ),
        (
            "openapi.json",
            printed(runbridge::sidecar::openapi::document()),
        ),
        (
            "asyncapi.yaml",
            printed(schemas::to_yaml(&schemas::asyncapi(&amqp))),
        ),
    ] {
        assert!(
            docs_file(file) == generated,
            "docs/{file} is out of date with the code: run `make docs` and commit it"
        );
    }
}

fn validator(schema: &Value) -> jsonschema::Validator {
    jsonschema::validator_for(schema).unwrap()
}

fn assert_valid(v: &jsonschema::Validator, instance: &Value, what: &str) {
    let errors: Vec<String> = v
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} breaks its schema: {errors:?}\n{instance}"
    );
}

/// The OpenAPI document as the sidecar serves it, and the operations a test
/// has checked an answer of.
struct OpenApi {
    doc: Value,
    seen: BTreeSet<(String, String)>,
}

impl OpenApi {
    /// Validates a real answer against the document's schema for the
    /// route's `template`, `method` and the answer's status; returns the body.
    async fn check(&mut self, method: &str, template: &str, r: reqwest::Response) -> Value {
        let status = r.status().as_u16().to_string();
        let text = r.text().await.unwrap();
        let op = &self.doc["paths"][template][method];
        assert!(
            op.is_object(),
            "{method} {template} is not in the OpenAPI document"
        );
        let answer = &op["responses"][&status];
        assert!(
            answer.is_object(),
            "{method} {template} answered {status}, which the document does not list: {text}"
        );
        self.seen.insert((method.to_owned(), template.to_owned()));
        let Some(schema) = answer["content"]["application/json"]["schema"].as_object() else {
            return Value::Null;
        };
        // The schema's $refs point at #/components/...: validate from a root
        // that carries the document's components.
        let root = json!({"allOf": [schema], "components": self.doc["components"]});
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {template} {status}: not JSON ({e}): {text}"));
        assert_valid(
            &validator(&root),
            &body,
            &format!("{method} {template} {status}"),
        );
        body
    }

    fn unseen(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (path, ops) in self.doc["paths"].as_object().unwrap() {
            for method in ops.as_object().unwrap().keys() {
                if !self.seen.contains(&(method.clone(), path.clone())) {
                    out.push(format!("{method} {path}"));
                }
            }
        }
        out
    }
}

#[tokio::test]
async fn real_messages_and_answers_match_the_documents() {
    let mut app = TestApp::spawn().await;
    let trigger_schema = validator(&docs_json("schemas/trigger.schema.json"));
    let event_schema = validator(&docs_json("schemas/event.schema.json"));
    let http = app.http.clone();
    let base = app.sidecar_url.clone();

    // The document the sidecar serves is the one in docs/.
    let served: Value = http
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(served, docs_json("openapi.json"));
    let mut api = OpenApi {
        doc: served,
        seen: BTreeSet::new(),
    };
    let r = http
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap();
    api.check("get", "/openapi.json", r).await;

    // Triggers of every kind: they validate, and so do their events.
    let resolved = unique("doc-ok");
    let failed = unique("doc-fail");
    let unknown = unique("doc-unknown");
    let never = unique("doc-never");
    let submit = unique("doc-submit");
    let bodies = [
        json!({"id": resolved, "job_id": JOB_CALLBACK, "job_parameters": {"date": "2026-11-24", "n": 3},
               "timeout_seconds": 600, "heartbeat_seconds": 300, "cancel_on_timeout": true, "tags": {"team": "growth"}}),
        json!({"id": failed, "job_id": JOB_FAIL, "notebook_params": {"flag": true}}),
        json!({"id": unknown, "job_id": JOB_UNKNOWN}),
        json!({"id": never, "job_id": JOB_NEVER, "tags": {"kind": "doc"}}),
        json!({"id": submit, "submit": {"run_name": "one-off", "tasks": [{"task_key": "t",
               "notebook_task": {"notebook_path": "/x"}, "existing_cluster_id": "c"}]}}),
    ];
    for b in &bodies {
        assert_valid(&trigger_schema, b, "trigger");
        app.publish(b).await;
    }
    let events = app
        .events_for_all(
            &[resolved.clone(), failed.clone(), unknown.clone()],
            Duration::from_secs(30),
        )
        .await;
    for (id, evs) in &events {
        for e in evs {
            assert_valid(&event_schema, e, &format!("event of {id}"));
        }
    }
    assert_eq!(events[&resolved][0]["data"]["state"], "RESOLVED");
    assert_eq!(events[&failed][0]["data"]["state"], "REJECTED");
    assert_eq!(events[&unknown][0]["data"]["state"], "REJECTED");

    // Capability routes, on the promise whose run never finishes.
    let url = app.callback_url(&never).await;
    let token_path = |suffix: &str| format!("{url}{suffix}");
    let r = http
        .post(token_path("/heartbeat"))
        .query(&[("id", &never)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    api.check("post", "/cb/{token}/heartbeat", r).await;
    let r = http
        .get(token_path(&format!("/promises/{never}")))
        .send()
        .await
        .unwrap();
    api.check("get", "/cb/{token}/promises/{id}", r).await;
    let r = http
        .post(token_path("/progress"))
        .query(&[("id", &never)])
        .json(&json!({"percent": 40, "stage": "load", "metrics": {"rows": 3}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    api.check("post", "/cb/{token}/progress", r).await;
    let r = app
        .operator(http.post(format!("{base}/promises/retry")))
        .json(&json!({"id": never}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CONFLICT,
        "no retry policy, not waiting"
    );
    api.check("post", "/promises/retry", r).await;
    let r = app
        .operator(http.post(format!("{base}/promises/adopt")))
        .json(&json!({"id": never, "run_id": 987_654_321u64}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT, "no such run");
    api.check("post", "/promises/adopt", r).await;
    let r = http
        .post(token_path("/resolve"))
        .query(&[("id", never.as_str()), ("value", "{\"rows\": 3}")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    api.check("post", "/cb/{token}/resolve", r).await;
    let r = http
        .post(token_path("/reject"))
        .json(&json!({"id": never, "error": "late"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    api.check("post", "/cb/{token}/reject", r).await;
    let r = http
        .patch(token_path(&format!("/promises/{never}")))
        .json(&json!({"state": "RESOLVED", "value": {"data": "{\"rows\": 3}"}}))
        .send()
        .await
        .unwrap();
    api.check("patch", "/cb/{token}/promises/{id}", r).await;
    // The progress event comes first, then the completion event.
    let progress_schema = validator(&docs_json("schemas/progress-event.schema.json"));
    let (_, progress) = app.first_event(&never, Duration::from_secs(15)).await;
    assert_eq!(progress["type"], "io.runbridge.promise.progress");
    assert_valid(&progress_schema, &progress, "progress event");
    let (_, ev) = app.first_event(&never, Duration::from_secs(15)).await;
    assert_valid(&event_schema, &ev, "callback event");

    // The same token as a bearer on the plain routes; bad input on them.
    let token = url.rsplit('/').next().unwrap().to_owned();
    let r = http
        .post(format!("{base}/heartbeat"))
        .bearer_auth(&token)
        .query(&[("id", &never)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    api.check("post", "/heartbeat", r).await;
    let r = http
        .post(format!("{base}/progress"))
        .bearer_auth(&token)
        .query(&[("id", &never)])
        .json(&json!({"percent": 100}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "no progress after settlement"
    );
    api.check("post", "/progress", r).await;
    let r = http
        .post(format!("{base}/resolve"))
        .bearer_auth(&token)
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    api.check("post", "/resolve", r).await;
    let r = http
        .post(format!("{base}/reject"))
        .query(&[("id", &never)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    api.check("post", "/reject", r).await;

    // The operator API.
    let bare = unique("doc-bare");
    let create = || {
        app.operator(http.post(format!("{base}/promises")))
            .header("idempotency-key", "k1")
            .json(&json!({"id": bare, "param": {"headers": {"a": "b"}, "data": "in"}, "tags": {"kind": "doc"}}))
            .send()
    };
    let r = create().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    api.check("post", "/promises", r).await;
    let r = create().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    api.check("post", "/promises", r).await;
    let r = app
        .operator(http.post(format!("{base}/promises")))
        .json(&json!({"id": bare}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    api.check("post", "/promises", r).await;
    let r = app
        .operator(http.get(format!("{base}/promises")))
        .query(&[("id", "doc-*"), ("state", "pending"), ("limit", "1")])
        .send()
        .await
        .unwrap();
    let page = api.check("get", "/promises", r).await;
    // One, or more only when they were created in the current second (the
    // contract: that second is read whole).
    let found = page["promises"].as_array().cloned().unwrap_or_default();
    let seconds: std::collections::BTreeSet<i64> = found
        .iter()
        .filter_map(|p| p["createdOn"].as_i64())
        .map(|ms| ms / 1000)
        .collect();
    assert!(
        found.len() == 1 || (found.len() > 1 && seconds.len() == 1),
        "{page}"
    );
    let r = app
        .operator(http.get(format!("{base}/promises")))
        .query(&[("limit", "0")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    api.check("get", "/promises", r).await;
    let r = app
        .operator(http.get(format!("{base}/promises/{bare}")))
        .query(&[("wait", "10ms")])
        .send()
        .await
        .unwrap();
    api.check("get", "/promises/{id}", r).await;
    let r = app
        .operator(http.get(format!("{base}/promises/no-such-{bare}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    api.check("get", "/promises/{id}", r).await;
    let r = http
        .get(format!("{base}/promises/{bare}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    api.check("get", "/promises/{id}", r).await;
    let r = app
        .operator(http.post(format!("{base}/promises/cancel")))
        .json(&json!({"tags": {"kind": "doc"}, "id": "doc-bare-*", "reason": "schema test"}))
        .send()
        .await
        .unwrap();
    let report = api.check("post", "/promises/cancel", r).await;
    assert_eq!(report["cancelled"], 1, "{report}");
    let r = app
        .operator(http.patch(format!("{base}/promises/{bare}")))
        .json(&json!({"state": "RESOLVED"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let err = api.check("patch", "/promises/{id}", r).await;
    assert_eq!(err["error"]["state"], "REJECTED_CANCELED");
    let r = app
        .operator(http.patch(format!("{base}/promises/{bare}")))
        .json(&json!({"state": "SOMETHING"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    api.check("patch", "/promises/{id}", r).await;
    let big = "x".repeat(app.settings.sidecar.body_limit_bytes + 1);
    let r = app
        .operator(http.patch(format!("{base}/promises/{bare}")))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    api.check("patch", "/promises/{id}", r).await;

    // Notifications (not configured in tests: refused) and operations.
    let r = http
        .post(format!("{base}/databricks/notifications"))
        .json(&json!({"event_type": "jobs.on_success", "run": {"run_id": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    api.check("post", "/databricks/notifications", r).await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        api.check("get", path, r).await;
    }

    // Every documented operation was answered at least once above, so a
    // route the document promises but the sidecar lacks cannot hide.
    assert_eq!(
        api.unseen(),
        Vec::<String>::new(),
        "operations not exercised"
    );
    app.stop().await;
}
