//! `GET /metrics` counts what happened.
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
pub fn value(s: &BTreeMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
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

pub async fn scrape(app: &TestApp) -> BTreeMap<String, f64> {
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
    // Created a moment ago (its deadline is what lies in the past).
    assert!(s.contains_key("runbridge_promises_oldest_pending_age_seconds"));
    assert!(value(&s, "runbridge_promises_oldest_pending_age_seconds", &[]) < 60.0);
    app.stop().await;
}

/// The oldest pending promise's age follows the oldest promise still
/// pending: it grows while that one waits, drops to the next one's age when
/// it settles (whichever way: completion or timeout), and is gone, with its
/// per-second counters, when nothing is pending.
#[tokio::test]
async fn oldest_pending_age_follows_the_oldest_pending_promise() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let oldest = || async {
        app.store
            .partition_stats()
            .await
            .unwrap()
            .iter()
            .filter_map(|p| p.oldest_pending_age)
            .max()
    };
    let create = |id: String, timeout: Option<i64>| {
        let mut body = json!({ "id": id });
        if let Some(t) = timeout {
            body["timeout"] = json!(t);
        }
        app.operator(app.http.post(format!("{}/promises", app.sidecar_url)))
            .json(&body)
            .send()
    };
    assert_eq!(oldest().await, None, "nothing pending yet");
    let first = unique("first");
    assert_eq!(create(first.clone(), None).await.unwrap().status(), 201);
    let waited = eventually(
        Duration::from_secs(10),
        "the first promise to age 3 s",
        || async { oldest().await.filter(|a| *a >= Duration::from_secs(3)) },
    )
    .await;
    assert!(waited < Duration::from_secs(8), "{waited:?}");
    // A second one that times out (no reconciler here settles it by itself).
    let second = unique("second");
    let soon = chrono::Utc::now().timestamp_millis() + 100;
    assert_eq!(
        create(second.clone(), Some(soon)).await.unwrap().status(),
        201
    );
    let r = app
        .operator(
            app.http
                .patch(format!("{}/promises/{first}", app.sidecar_url)),
        )
        .json(&json!({"state": "RESOLVED"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let now = oldest().await.expect("the second is pending");
    assert!(
        now < Duration::from_secs(3),
        "the first no longer counts: {now:?}"
    );
    // The deadline sweep settles the second.
    let id = runbridge::domain::PromiseId::parse(&second).unwrap();
    eventually(
        Duration::from_secs(5),
        "the second promise to time out",
        || async {
            match runbridge::store::Lifecycle::expire(&app.store, &id)
                .await
                .unwrap()
            {
                runbridge::store::ExpireOutcome::TimedOut(_) => Some(()),
                _ => None, // not due yet (its 100 ms deadline)
            }
        },
    )
    .await;
    assert_eq!(oldest().await, None, "nothing pending");
    // No count is left behind.
    let mut conn = redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*pending_*", app.name))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.is_empty(), "left behind: {keys:?}");
    app.stop().await;
}
