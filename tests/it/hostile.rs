//! Hostile and poisonous triggers (issue 9): nothing a producer publishes
//! blocks the queue or stops valid work.

use std::collections::BTreeSet;
use std::time::Duration;

use runbridge::broker::dead_letter_count;

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
    let bs = runbridge::startup::broker_settings(&app.settings, "it-count");
    let dead = eventually(
        Duration::from_secs(120),
        "every malformed message dead-lettered",
        || async {
            let n = dead_letter_count(&bs).await.ok()? as usize;
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
