//! The workspace request budget, shared by every worker through Redis.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

async fn calls(app: &TestApp, endpoint: &str) -> Vec<(i64, Value)> {
    let v = app.emulator_get("/emulator/calls").await;
    v["calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["endpoint"] == endpoint)
        .map(|c| (c["at"].as_i64().unwrap(), c["fault"].clone()))
        .collect()
}

/// The most requests that arrived within any window of `window_ms`.
fn max_in_window(times: &[i64], window_ms: i64) -> usize {
    let mut t: Vec<i64> = times.to_vec();
    t.sort_unstable();
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..t.len() {
        while t[hi] - t[lo] >= window_ms {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

#[test]
fn window_counting() {
    assert_eq!(max_in_window(&[0, 10, 999, 1000, 1500], 1000), 3);
    assert_eq!(max_in_window(&[0, 10, 999, 1000, 1500], 2000), 5);
    assert_eq!(max_in_window(&[], 1000), 0);
}

/// Three workers with a shared launch budget of R/s: over 1,000 triggers the
/// emulator never sees more than the budget (+ the burst) in any 2 s window.
#[tokio::test]
async fn three_workers_share_one_launch_budget() {
    // Well below what three workers reach on two cores (about 100
    // launches/s against a Redis Cluster, 250 against one Redis), so the
    // budget is what limits them, and the bound below fails without it on
    // either: a budget above the machine's pace would test nothing.
    const RATE: usize = 50;
    const BURST: usize = 10;
    let mut app = TestApp::spawn_with(Options {
        extra_workers: 2,
        overrides: vec![
            ("databricks.launch_per_second", RATE.to_string()),
            ("databricks.burst", BURST.to_string()),
            ("amqp.prefetch", "64".into()),
            ("reconciler.first_poll_ms", "600000".into()),
        ],
        ..Default::default()
    })
    .await;
    let batch = unique("rate");
    let ids: Vec<String> = (0..1000).map(|i| format!("{batch}-{i:04}")).collect();
    for id in &ids {
        app.publish(&trigger(id, JOB_CALLBACK)).await;
    }
    let events = app.events_for_all(&ids, Duration::from_secs(90)).await;
    assert_eq!(events.len(), 1000);
    let launches: Vec<i64> = calls(&app, "jobs/run-now")
        .await
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(launches.len(), 1000, "one launch per trigger");
    // Counted on arrival at the emulator, over 2 s windows: the budget allows
    // 2·R + burst. A scheduling stall on this 2-core machine can bunch
    // requests that were granted evenly: 20 more are allowed for that
    // (without a shared budget the peak is ~500 in 2 s against one Redis,
    // ~150-190 against a Redis Cluster, both above).
    const STALL: usize = 20;
    let peak = max_in_window(&launches, 2000);
    let allowed = 2 * RATE + BURST + STALL;
    assert!(
        peak <= allowed,
        "peak {peak} launches in 2 s over a budget of {RATE}/s + {BURST} (allowed {allowed})"
    );
    assert!(
        peak >= RATE,
        "the budget was actually used (peak {peak} in 2 s)"
    );
    app.stop().await;
}

/// A 429 with Retry-After: 2 pauses the whole workspace: no launch from any
/// of three workers reaches the emulator in the next 2 s, beyond requests
/// already on the wire when the 429 was answered (allowed 0.5 s to arrive).
#[tokio::test]
async fn a_429_pauses_every_worker() {
    let app = TestApp::spawn_with(Options {
        extra_workers: 2,
        overrides: vec![
            ("databricks.launch_per_second", "40".into()),
            ("databricks.burst", "5".into()),
            ("reconciler.first_poll_ms", "600000".into()),
        ],
        ..Default::default()
    })
    .await;
    app.http
        .post(format!("{}/emulator/faults", app.emulator_url))
        .json(&json!({"retry_after_s": 2}))
        .send()
        .await
        .unwrap();
    // Enough triggers that launches are still flowing well after the pause,
    // shared budget or not.
    let batch = unique("pause");
    for i in 0..600 {
        app.publish(&trigger(&format!("{batch}-{i:04}"), JOB_CALLBACK))
            .await;
    }
    eventually(Duration::from_secs(20), "launches flowing", || async {
        (calls(&app, "jobs/run-now").await.len() >= 30).then_some(())
    })
    .await;
    app.inject("jobs/run-now", json!(["too_many_requests"]))
        .await;
    // Until the 429 was answered and launches resumed after its 2 s.
    let (t429, launches) = eventually(
        Duration::from_secs(30),
        "429 answered and launches resumed",
        || async {
            let launches = calls(&app, "jobs/run-now").await;
            let t429 = launches
                .iter()
                .find(|(_, f)| f == "too_many_requests")
                .map(|(t, _)| *t)?;
            launches
                .iter()
                .any(|(t, _)| *t >= t429 + 2000)
                .then_some((t429, launches))
        },
    )
    .await;
    // Requests that passed the budget before the pause existed are already on
    // their way; on a loaded 2-core machine they can take a few hundred ms to
    // arrive. Anything later than this was sent during the pause.
    let on_the_wire = 500;
    let during: Vec<i64> = launches
        .iter()
        .map(|(t, _)| *t - t429)
        .filter(|dt| *dt > on_the_wire && *dt < 2000)
        .collect();
    assert!(
        during.is_empty(),
        "{} launches arrived during the 2 s pause, at +ms {during:?}",
        during.len()
    );
    app.stop().await;
}

/// Databricks limits requests per endpoint: a 429 on `runs/get` (a check)
/// holds the checks for its `Retry-After: 10`, and launches go on during it.
#[tokio::test]
async fn a_429_on_checks_does_not_hold_launches() {
    let app = TestApp::spawn_with(Options {
        overrides: vec![
            ("reconciler.first_poll_ms", "200".into()),
            ("reconciler.max_poll_ms", "500".into()),
        ],
        ..Default::default()
    })
    .await;
    app.http
        .post(format!("{}/emulator/faults", app.emulator_url))
        .json(&json!({"retry_after_s": 10}))
        .send()
        .await
        .unwrap();
    let first = unique("checked");
    app.publish(&trigger(&first, JOB_NEVER)).await;
    eventually(Duration::from_secs(20), "the run checked", || async {
        (!calls(&app, "jobs/runs/get").await.is_empty()).then_some(())
    })
    .await;
    app.inject("jobs/runs/get", json!(["too_many_requests"]))
        .await;
    let t429 = eventually(Duration::from_secs(20), "the 429 answered", || async {
        calls(&app, "jobs/runs/get")
            .await
            .iter()
            .find(|(_, f)| f == "too_many_requests")
            .map(|(t, _)| *t)
    })
    .await;
    let launched_before = calls(&app, "jobs/run-now").await.len();
    let batch = unique("during");
    for i in 0..5 {
        app.publish(&trigger(&format!("{batch}-{i}"), JOB_NEVER))
            .await;
    }
    let launches = eventually(Duration::from_secs(30), "five more launches", || async {
        let l = calls(&app, "jobs/run-now").await;
        (l.len() >= launched_before + 5).then_some(l)
    })
    .await;
    let late: Vec<i64> = launches[launched_before..]
        .iter()
        .map(|(t, _)| *t - t429)
        .filter(|dt| *dt >= 10_000)
        .collect();
    assert!(
        late.is_empty(),
        "launches waited for the checks' 10 s pause: at +ms {late:?}"
    );
    app.stop().await;
}
