//! `GET /metrics` counts what happened (issue 6, metrics).
//!
//! The recorder is process-wide; nextest runs each test in its own process,
//! and the test compares readings taken before and after its own run anyway.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

/// Every sample of the exposition, `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// The sum over every sample of `name` whose labels include all of `labels`.
fn value(s: &BTreeMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.iter()
        .filter(|(k, _)| {
            let (n, rest) = k.split_once('{').unwrap_or((k.as_str(), ""));
            n == name
                && labels
                    .iter()
                    .all(|(lk, lv)| rest.contains(&format!("{lk}=\"{lv}\"")))
        })
        .map(|(_, v)| v)
        .sum()
}

async fn scrape(app: &TestApp) -> BTreeMap<String, f64> {
    let r = app
        .http
        .get(format!("{}/metrics", app.sidecar_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    samples(&r.text().await.unwrap())
}

/// Five triggers that call back, one for an unknown job, one that is not
/// JSON: the counters say exactly that.
#[tokio::test]
async fn metrics_count_what_happened() {
    let mut app = TestApp::spawn().await;
    let before = scrape(&app).await;
    let batch = unique("metrics");
    let ok: Vec<String> = (0..5).map(|i| format!("{batch}-ok-{i}")).collect();
    for id in &ok {
        app.publish(&json!({"id": id, "job_id": JOB_CALLBACK}))
            .await;
    }
    let refused = format!("{batch}-nojob");
    app.publish(&json!({"id": refused, "job_id": JOB_UNKNOWN}))
        .await;
    app.publish_raw(b"{not json", None).await;
    let mut all = ok.clone();
    all.push(refused.clone());
    app.events_for_all(&all, Duration::from_secs(20)).await;

    // The relay counts after the confirm; the dead letter after its publish.
    let after = eventually(Duration::from_secs(10), "counters caught up", || async {
        let s = scrape(&app).await;
        let d = |n: &str, l: &[(&str, &str)]| value(&s, n, l) - value(&before, n, l);
        (d("runbridge_events_published_total", &[]) >= 6.0
            && d("runbridge_triggers_consumed_total", &[]) >= 7.0)
            .then_some(s)
    })
    .await;
    let d = |n: &str, l: &[(&str, &str)]| value(&after, n, l) - value(&before, n, l);

    assert_eq!(d("runbridge_triggers_consumed_total", &[]), 7.0);
    assert_eq!(
        d(
            "runbridge_dead_lettered_total",
            &[("queue", "triggers"), ("reason", "malformed_json")]
        ),
        1.0
    );
    assert_eq!(d("runbridge_dead_lettered_total", &[]), 1.0);
    assert_eq!(
        d("runbridge_launches_total", &[("outcome", "launched")]),
        5.0
    );
    assert_eq!(
        d("runbridge_launches_total", &[("outcome", "refused")]),
        1.0
    );
    assert_eq!(d("runbridge_promises_created_total", &[]), 6.0);
    assert_eq!(
        d(
            "runbridge_promises_settled_total",
            &[("state", "RESOLVED"), ("settled_by", "callback")]
        ),
        5.0
    );
    assert_eq!(
        d(
            "runbridge_promises_settled_total",
            &[("state", "REJECTED"), ("settled_by", "worker")]
        ),
        1.0
    );
    assert_eq!(
        d(
            "runbridge_databricks_requests_total",
            &[("endpoint", "api/2.2/jobs/run-now"), ("status", "200")]
        ),
        5.0
    );
    assert_eq!(
        d(
            "runbridge_databricks_requests_total",
            &[("endpoint", "api/2.2/jobs/run-now"), ("status", "404")]
        ),
        1.0
    );
    assert_eq!(
        d(
            "runbridge_databricks_request_duration_seconds_count",
            &[("endpoint", "api/2.2/jobs/run-now")]
        ),
        6.0
    );
    assert_eq!(
        d(
            "runbridge_events_published_total",
            &[("routing_key", "promise.resolved")]
        ),
        5.0
    );
    assert_eq!(
        d(
            "runbridge_events_published_total",
            &[("routing_key", "promise.rejected")]
        ),
        1.0
    );
    app.stop().await;
}

/// The store gauges: a promise 60 s past its deadline that no sweep settles
/// (reconciler off) shows as pending and overdue by at least 60 s.
#[tokio::test]
async fn overdue_and_pending_gauges() {
    let app = TestApp::spawn_with(Options {
        overrides: vec![("reconciler.enabled", "false".into())],
        ..Default::default()
    })
    .await;
    let id = unique("overdue");
    let deadline = chrono::Utc::now().timestamp_millis() - 60_000;
    let r = app
        .http
        .post(format!("{}/promises", app.sidecar_url))
        .bearer_auth(&app.operator_token)
        .json(&json!({"id": id, "timeout": deadline}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // The worker samples the store every 5 s (and once at start).
    let s = eventually(Duration::from_secs(12), "overdue gauge", || async {
        let s = scrape(&app).await;
        (value(&s, "runbridge_promises_overdue_seconds", &[]) >= 60.0).then_some(s)
    })
    .await;
    assert!(value(&s, "runbridge_promises_pending", &[]) >= 1.0);
    assert!(value(&s, "runbridge_promises_overdue_seconds", &[]) < 120.0);
    app.stop().await;
}
