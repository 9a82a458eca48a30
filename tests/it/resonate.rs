//! Resonate's protocol on the sidecar, driven by Resonate's own SDKs: the
//! TypeScript SDK from npm (`tests/resonate/sdk.mjs`: create, create again,
//! get, search, settle, settle again, a kind runbridge does not offer, a
//! wrong token) and the Python SDK of both lines from PyPI (0.6 on the
//! classic routes, `tests/resonate/sdk_06.py`; 0.8 on the protocol
//! endpoint, `tests/resonate/sdk_08.py`), then checked here: the store holds
//! what the SDK was told, and the settlement wrote exactly one completion
//! event, as a classic settle does.

use std::path::PathBuf;
use std::time::Duration;

use runbridge::domain::State;
use serde_json::json;

use crate::helpers::*;

/// Where `make ui-test-deps` installs the SDK (with the browser test's
/// packages), or a message saying how to get it.
fn sdk_modules() -> PathBuf {
    let modules = node_modules();
    assert!(
        modules.join("@resonatehq/sdk").exists(),
        "the Resonate SDK test needs @resonatehq/sdk under {}: run `make ui-test-deps` (part of `make test`)",
        modules.display()
    );
    modules
}

#[tokio::test]
async fn resonates_own_sdk_works_against_the_sidecar_unchanged() {
    let modules = sdk_modules();
    let mut app = TestApp::spawn_with(Options {
        worker: true,
        ..Default::default()
    })
    .await;
    let id = unique("resonate-sdk");
    let (status, log) = run_node(
        "tests/resonate/sdk.mjs",
        &[
            ("SIDECAR_URL", app.sidecar_url.as_ref()),
            ("TOKEN", app.operator_token.as_ref()),
            ("ID", id.as_ref()),
            ("NODE_PATH", modules.as_os_str()),
        ],
        Duration::from_secs(60),
    )
    .await;
    assert!(status.success(), "the SDK test failed:\n{log}");
    assert!(log.trim_end().ends_with("ok"), "{log}");

    let p = app.promise(&id).await.expect("stored");
    assert_eq!(p.state, State::Resolved, "{log}");
    assert_eq!(
        p.tags.get("suite").map(String::as_str),
        Some("resonate-sdk")
    );
    assert_eq!(p.settled_by.as_deref(), Some("operator"));
    let events = app.events_for(&id, Duration::from_secs(3)).await;
    assert_eq!(events.len(), 1, "one event for one settlement: {events:?}");
    assert_eq!(events[0].1["data"]["state"], json!("RESOLVED"));
    app.stop().await;
}

/// Envelopes that are not the protocol's get a plain 400; a kind it does
/// not know is a 400 in the envelope; without credentials, a 401 in it.
#[tokio::test]
async fn malformed_envelopes_are_refused_and_change_nothing() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let post = |body: serde_json::Value, token: Option<&str>| {
        let rb = app.http.post(format!("{}/", app.sidecar_url)).json(&body);
        match token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
        .send()
    };
    let r = post(json!({"kind": "promise.get"}), Some(&app.operator_token))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let head = json!({"corrId": "c1", "version": "2026-04-01"});
    let r = post(
        json!({"kind": "promise.explode", "head": head, "data": {}}),
        Some(&app.operator_token),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["head"]["corrId"], "c1");
    assert_eq!(v["head"]["status"], 400);
    let id = unique("resonate-noauth");
    let create = json!({"kind": "promise.create", "head": head, "data": {"id": id, "param": {}, "tags": {}, "timeoutAt": chrono::Utc::now().timestamp_millis() + 60_000}});
    let r = post(create.clone(), None).await.unwrap();
    assert_eq!(r.status(), 401);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (v["kind"].as_str(), v["head"]["status"].as_u64()),
        (Some("promise.create"), Some(401))
    );
    assert!(app.promise(&id).await.is_none(), "nothing was created");
    // The token in head.auth, as the SDK sends it, is enough.
    let mut with_auth = create;
    with_auth["head"]["auth"] = json!(app.operator_token);
    let r = post(with_auth, None).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(app.promise(&id).await.is_some());
}

/// The Python of a virtualenv `make resonate-sdk-deps` (part of `make
/// test`) made with one `resonate-sdk`, or a message saying how to get it.
fn resonate_python(venv: &str) -> PathBuf {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(venv)
        .join("bin/python");
    assert!(
        python.exists(),
        "the Resonate Python SDK test needs {}: run `make resonate-sdk-deps` (part of `make test`)",
        python.display()
    );
    python
}

/// Runs one of the Python SDK scripts against a fresh app; then the store
/// holds the resolved promise with the script's tag, and its settlement
/// wrote one event.
async fn python_sdk_settles_one_promise(venv: &str, script: &str, suite: &str) {
    let python = resonate_python(venv);
    let mut app = TestApp::spawn_with(Options {
        worker: true,
        ..Default::default()
    })
    .await;
    let id = unique(suite);
    let (status, log) = run_script(
        &python,
        script,
        &[
            ("SIDECAR_URL", app.sidecar_url.as_ref()),
            ("TOKEN", app.operator_token.as_ref()),
            ("ID", id.as_ref()),
        ],
        Duration::from_secs(60),
    )
    .await;
    assert!(status.success(), "the SDK test failed:\n{log}");
    assert!(log.trim_end().ends_with("ok"), "{log}");
    let p = app.promise(&id).await.expect("stored");
    assert_eq!(p.state, State::Resolved, "{log}");
    assert_eq!(p.tags.get("suite").map(String::as_str), Some(suite));
    let events = app.events_for(&id, Duration::from_secs(3)).await;
    assert_eq!(events.len(), 1, "one event for one settlement: {events:?}");
    app.stop().await;
}

/// `resonate-sdk` 0.6 on the classic routes: its refusals (409 for
/// another idempotency key, 404, 403 for a settled promise) arrive as
/// its `ResonateStoreError` with Resonate's numeric codes.
#[tokio::test]
async fn resonates_python_sdk_of_the_classic_line_reads_every_answer() {
    python_sdk_settles_one_promise("resonate-py06", "tests/resonate/sdk_06.py", "resonate-py06")
        .await;
}

/// `resonate-sdk` 0.8 on the protocol endpoint.
#[tokio::test]
async fn resonates_python_sdk_of_the_current_line_works_unchanged() {
    python_sdk_settles_one_promise("resonate-py08", "tests/resonate/sdk_08.py", "resonate-py08")
        .await;
}
