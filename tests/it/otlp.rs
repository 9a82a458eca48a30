//! OTLP trace export: a `runbridge all` process with
//! `telemetry.otlp_endpoint` set exports its spans to a stand-in OTLP/HTTP
//! collector run here. A trigger published with a `traceparent` produces a
//! worker span in that trace, child of the producer's span, and the
//! notebook's callback a sidecar span in the same trace.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::json;

use crate::helpers::*;

#[derive(Debug, Clone)]
struct ExportedSpan {
    service: String,
    name: String,
    trace_id: String,
    parent_span_id: String,
    attributes: Vec<(String, String)>,
}

/// An OTLP/HTTP collector that keeps what it is sent.
async fn collector() -> (String, Arc<Mutex<Vec<ExportedSpan>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let kept = spans.clone();
    let app = Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let kept = kept.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut out = kept.lock().unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                        .map(|v| match v {
                            AnyValue::StringValue(s) => s.clone(),
                            other => format!("{other:?}"),
                        })
                        .unwrap_or_default();
                    for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                        out.push(ExportedSpan {
                            service: service.clone(),
                            name: span.name,
                            trace_id: hex::encode(&span.trace_id),
                            parent_span_id: hex::encode(&span.parent_span_id),
                            attributes: span
                                .attributes
                                .into_iter()
                                .map(|kv| {
                                    let v = match kv.value.and_then(|v| v.value) {
                                        Some(AnyValue::StringValue(s)) => s,
                                        Some(AnyValue::IntValue(i)) => i.to_string(),
                                        other => format!("{other:?}"),
                                    };
                                    (kv.key, v)
                                })
                                .collect(),
                        });
                    }
                }
                // An empty ExportTraceServiceResponse.
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (url, spans)
}

#[tokio::test]
async fn spans_are_exported_in_the_triggers_trace() {
    let (endpoint, spans) = collector().await;
    let mut app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    // The child serves its own sidecar, so the notebook's callback reaches it.
    let port = free_port();
    let mut child = app
        .runbridge_all(port)
        .env("RUNBRIDGE__TELEMETRY__OTLP_ENDPOINT", &endpoint)
        .env("RUNBRIDGE__TELEMETRY__SERVICE_NAME", "runbridge-it")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn runbridge all");

    let id = unique("otlp");
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    app.publisher
        .publish_trigger_traced(
            &serde_json::to_vec(&json!({"id": id, "job_id": JOB_CALLBACK})).unwrap(),
            &format!("00-{trace_id}-{parent}-01"),
        )
        .await
        .unwrap();
    let (_, ev) = app.first_event(&id, Duration::from_secs(30)).await;
    assert_eq!(ev["data"]["settled_by"], "callback");

    // SIGTERM: the process shuts down and flushes what it has not exported.
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");

    let spans = spans.lock().unwrap().clone();
    let in_trace: Vec<&ExportedSpan> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let process = in_trace
        .iter()
        .find(|s| s.name == "process")
        .unwrap_or_else(|| panic!("no worker span in the trace; exported: {spans:#?}"));
    assert_eq!(process.service, "runbridge-it");
    assert_eq!(
        process.parent_span_id, parent,
        "the worker span is the producer's child"
    );
    assert!(
        process
            .attributes
            .iter()
            .any(|(k, v)| k == "promise.id" && v == &id),
        "{process:?}"
    );
    let callback = in_trace
        .iter()
        .find(|s| s.name == "callback")
        .unwrap_or_else(|| panic!("no callback span in the trace; exported: {spans:#?}"));
    assert!(
        callback
            .attributes
            .iter()
            .any(|(k, v)| k == "promise.id" && v == &id),
        "{callback:?}"
    );
    app.stop().await;
}
