//! A capability token opens one incarnation of a promise id: the promise
//! it was handed out for, never one created later under the same id.

use std::time::Duration;

use runbridge::domain::PromiseId;

use crate::helpers::*;

/// The callback URL of the `n`th run of `id` (0: the first).
async fn nth_callback_url(app: &TestApp, id: &str, n: usize) -> String {
    eventually(
        Duration::from_secs(20),
        "the run's callback url",
        || async {
            app.runs_for(id)
                .await
                .get(n)
                .and_then(|r| r["params"]["url"].as_str().map(str::to_owned))
        },
    )
    .await
}

async fn post(app: &TestApp, url: String, id: &str) -> u16 {
    app.http
        .post(url)
        .query(&[("id", id), ("value", "v")])
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A run's token, kept by Databricks in the run's parameters long after the
/// promise expired, does not settle (nor heartbeat, nor read) the promise
/// created again under the same id; that promise's own run's token does.
#[tokio::test]
async fn an_old_runs_token_does_not_open_the_id_used_again() {
    let app = TestApp::spawn_with(Options {
        overrides: vec![("redis.retention_seconds", "2".into())],
        ..Default::default()
    })
    .await;
    let id = unique("reused");
    app.publish(&trigger(&id, JOB_NEVER)).await;
    let old = nth_callback_url(&app, &id, 0).await;
    assert_eq!(post(&app, format!("{old}/resolve"), &id).await, 200);
    eventually(
        Duration::from_secs(30),
        "the settled promise expired",
        || async { app.promise(&id).await.is_none().then_some(()) },
    )
    .await;

    app.publish(&trigger(&id, JOB_NEVER)).await;
    let new = nth_callback_url(&app, &id, 1).await;
    assert_ne!(old, new, "a new incarnation gets a new token");
    for route in ["resolve", "reject", "heartbeat"] {
        assert_eq!(
            post(&app, format!("{old}/{route}"), &id).await,
            401,
            "{route} with the old run's token"
        );
    }
    let read = app
        .http
        .get(format!("{old}/promises/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 401, "a read with the old run's token");
    let p = app.promise(&id).await.unwrap();
    assert_eq!(p.state.as_str(), "PENDING");
    assert_eq!(p.activity.heartbeats, 0, "no heartbeat was counted");

    assert_eq!(post(&app, format!("{new}/resolve"), &id).await, 200);
    assert_eq!(app.promise(&id).await.unwrap().state.as_str(), "RESOLVED");
    app.stop().await;
}

/// Promises created before tokens were bound (token version 2 in the
/// record) keep opening with the token of the id alone that their runs
/// hold; that kind of token opens no promise created since.
#[tokio::test]
async fn tokens_handed_out_before_binding_keep_working_for_their_promises() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let signer = signer_of(LOCAL_CALLBACK_SECRET);
    let (older, newer) = (unique("older"), unique("newer"));
    app.create_promise(&older).await;
    app.create_promise(&newer).await;
    // As an earlier version wrote it.
    let Some((key, mut conn)) = app.promise_key(&older).await else {
        // Under a Redis Cluster the key lives on another node; the
        // standalone run covers this test.
        app.stop().await;
        return;
    };
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("tv")
        .arg("2")
        .query_async(&mut conn)
        .await
        .unwrap();

    let legacy = |id: &str| {
        let t = signer.sign_legacy(&PromiseId::parse(id).unwrap());
        format!("{}/cb/{}", app.sidecar_url, t.expose())
    };
    assert_eq!(
        post(&app, format!("{}/resolve", legacy(&newer)), &newer).await,
        401
    );
    assert_eq!(app.promise(&newer).await.unwrap().state.as_str(), "PENDING");
    assert_eq!(
        post(&app, format!("{}/resolve", legacy(&older)), &older).await,
        200
    );
    assert_eq!(
        app.promise(&older).await.unwrap().state.as_str(),
        "RESOLVED"
    );
    app.stop().await;
}
