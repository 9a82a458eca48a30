//! W3C trace context: a trigger's `traceparent` reaches the Databricks
//! request and the completion event.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn traceparent_follows_trigger_to_run_and_event() {
    let mut app = TestApp::spawn().await;
    let id = unique("traced");
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let tp = format!("00-{trace_id}-00f067aa0ba902b7-01");
    app.publisher
        .publish_trigger_traced(
            &serde_json::to_vec(&json!({"id": id, "job_id": JOB_CALLBACK})).unwrap(),
            &tp,
        )
        .await
        .unwrap();
    let (ev, v) = app.first_event(&id, Duration::from_secs(15)).await;
    assert_eq!(v["data"]["state"], "RESOLVED");
    // The event's header carries the same trace.
    let ev_tp = ev.headers.get("traceparent").expect("event traceparent");
    assert_eq!(ev_tp.split('-').nth(1), Some(trace_id));
    // So did the run-now request Databricks (the emulator) received.
    let runs = app.runs_for(&id).await;
    assert_eq!(runs.len(), 1);
    let run_tp = runs[0]["traceparent"]
        .as_str()
        .expect("run-now traceparent");
    assert_eq!(run_tp.split('-').nth(1), Some(trace_id));
    // And the promise keeps it.
    assert_eq!(
        app.promise(&id).await.unwrap().traceparent.as_deref(),
        Some(tp.as_str())
    );
    app.stop().await;
}

/// Without one, nothing is invented.
#[tokio::test]
async fn no_traceparent_no_header() {
    let mut app = TestApp::spawn().await;
    let id = unique("untraced");
    app.publish(&json!({"id": id, "job_id": JOB_CALLBACK}))
        .await;
    let (ev, _) = app.first_event(&id, Duration::from_secs(15)).await;
    assert!(!ev.headers.contains_key("traceparent"));
    assert!(app.runs_for(&id).await[0]["traceparent"].is_null());
    app.stop().await;
}
