//! Databricks authentication conventions: OAuth machine-to-machine
//! against the emulator's token endpoint, including refresh after expiry.

use std::time::Duration;

use runbridge::emulator::OAuthClient;
use serde_json::json;

use crate::helpers::*;

/// A service principal whose access tokens live 2 s: triggers spread over
/// more than two lifetimes all launch, the worker fetched new tokens as the
/// old ones neared expiry, and no request was refused for an expired token
/// (it refreshes early, not after a 401).
#[tokio::test]
async fn oauth_m2m_fetches_and_refreshes_tokens() {
    let mut app = TestApp::spawn_with(Options {
        emulator_oauth: Some(OAuthClient {
            client_id: "sp-runbridge".into(),
            client_secret: "oauth-secret-for-tests".into(),
            token_ttl: Duration::from_secs(2),
        }),
        overrides: vec![
            ("databricks.workspaces.default.token", "".into()),
            (
                "databricks.workspaces.default.client_id",
                "sp-runbridge".into(),
            ),
            (
                "databricks.workspaces.default.client_secret",
                "oauth-secret-for-tests".into(),
            ),
        ],
        ..Default::default()
    })
    .await;
    let batch = unique("oauth");
    let mut ids = Vec::new();
    for i in 0..6 {
        let id = format!("{batch}-{i}");
        app.publish(&json!({"id": id, "job_id": JOB_CALLBACK}))
            .await;
        ids.push(id);
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    let events = app.events_for_all(&ids, Duration::from_secs(20)).await;
    assert!(events.values().all(|e| e[0]["data"]["state"] == "RESOLVED"));
    let stats = app.emulator_stats().await;
    let issued = stats["oauth_tokens_issued"].as_u64().unwrap();
    assert!(
        issued >= 3,
        "over ~5 s with 2 s tokens (refreshed 0.4 s early) expected ≥ 3 tokens, got {issued}"
    );
    assert_eq!(stats["oauth_expired_refused"], 0, "{stats}");
    app.stop().await;
}

/// A wrong client secret launches nothing and keeps the triggers (an
/// operator's mistake, like a bad token: retried, not rejected).
#[tokio::test]
async fn oauth_with_a_wrong_secret_keeps_the_trigger_pending() {
    let app = TestApp::spawn_with(Options {
        emulator_oauth: Some(OAuthClient {
            client_id: "sp-runbridge".into(),
            client_secret: "the-right-secret".into(),
            token_ttl: Duration::from_secs(60),
        }),
        overrides: vec![
            ("databricks.workspaces.default.token", "".into()),
            (
                "databricks.workspaces.default.client_id",
                "sp-runbridge".into(),
            ),
            (
                "databricks.workspaces.default.client_secret",
                "wrong".into(),
            ),
        ],
        ..Default::default()
    })
    .await;
    let id = unique("oauth-bad");
    app.publish(&json!({"id": id, "job_id": JOB_CALLBACK}))
        .await;
    eventually(Duration::from_secs(10), "promise created", || async {
        app.promise(&id).await.map(|_| ())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let p = app.promise(&id).await.unwrap();
    assert_eq!(p.state.as_str(), "PENDING");
    assert!(p.run_id.is_none());
    assert!(app.runs_for(&id).await.is_empty());
    assert_eq!(app.emulator_stats().await["oauth_tokens_issued"], 0);
    app.stop().await;
}
