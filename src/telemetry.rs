//! Logging, trace export and metrics.
//!
//! Logs: human-readable by default, JSON with `log.format = "json"`
//! (`RUNBRIDGE__LOG__FORMAT=json`). `RUST_LOG` overrides the level filter.
//!
//! Traces: with `telemetry.otlp_endpoint` set, every span is also exported
//! over OTLP/HTTP (batched, in the background). [`continue_trace`] makes a
//! span the child of a W3C `traceparent` that came from outside (a trigger's
//! header, a notebook's callback), so the exported spans join that trace.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogSettings, TelemetrySection};

#[derive(Debug, thiserror::Error)]
#[error("telemetry.otlp_endpoint {endpoint:?}: {reason}")]
pub struct TelemetryError {
    endpoint: String,
    reason: String,
}

/// Keeps the trace exporter alive; [`Tracing::shutdown`] exports what is
/// still buffered (call it before the process exits).
#[must_use = "dropping it stops nothing, but shutdown() flushes the last spans"]
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
}

impl Tracing {
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "trace export: spans lost at shutdown");
        }
    }
}

/// Installs the process's subscriber: the log layer, and the OTLP layer
/// when `telemetry.otlp_endpoint` is set. Needs a Tokio runtime when
/// exporting (the batch exporter runs on it).
pub fn init(log: &LogSettings, telemetry: &TelemetrySection) -> Result<Tracing, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    // lapin logs every returned message with its whole body at WARN; the relay
    // handles returns itself (and event bodies may hold data that must not
    // reach logs), so only lapin's errors get through from that target.
    let filter = match "lapin::returned_messages=error".parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if log.format == crate::config::LogFormat::Json {
        fmt.json().flatten_event(true).boxed()
    } else {
        fmt.boxed()
    };
    let provider = match telemetry.otlp_endpoint.trim_end_matches('/') {
        "" => None,
        endpoint => {
            let exporter = SpanExporter::builder()
                .with_http()
                .with_endpoint(format!("{endpoint}/v1/traces"))
                .build()
                .map_err(|e| TelemetryError {
                    endpoint: endpoint.to_owned(),
                    reason: e.to_string(),
                })?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        Resource::builder()
                            .with_service_name(telemetry.service_name.clone())
                            .build(),
                    )
                    .build(),
            )
        }
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("runbridge"))
            .boxed()
    });
    // try_init: a second call (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .with(filter)
        .try_init();
    Ok(Tracing { provider })
}

/// Parses a W3C `traceparent` (`00-<trace id>-<parent span id>-<flags>`).
fn span_context(traceparent: &str) -> Option<SpanContext> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2
        || version == "ff"
        || trace.len() != 32
        || span.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    let trace = TraceId::from_hex(trace)
        .ok()
        .filter(|t| *t != TraceId::INVALID)?;
    let span = SpanId::from_hex(span)
        .ok()
        .filter(|s| *s != SpanId::INVALID)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(SpanContext::new(
        trace,
        span,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    ))
}

/// A `traceparent` as it arrived ([`crate::domain::trace`]): kept if well
/// formed, else dropped with a warning and counted in
/// `runbridge_traceparent_dropped_total`.
pub fn kept_traceparent(tp: Option<String>) -> Option<String> {
    crate::domain::trace::checked_traceparent(tp).unwrap_or_else(|length| {
        tracing::warn!(
            length,
            "dropped a traceparent that is not W3C trace context"
        );
        ::metrics::counter!("runbridge_traceparent_dropped_total").increment(1);
        None
    })
}

/// Makes `span` (not yet entered) a child of the remote `traceparent`; an
/// invalid header is ignored (the span starts a trace of its own).
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    if let Some(sc) = span_context(traceparent) {
        let cx = opentelemetry::Context::new().with_remote_span_context(sc);
        let _ = span.set_parent(cx);
    }
}

#[cfg(test)]
mod trace_tests {
    use super::*;

    #[test]
    fn traceparents_parse_or_are_ignored() {
        let sc = span_context("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
        ] {
            assert!(span_context(bad).is_none(), "{bad:?}");
        }
    }
}

/// Prometheus metrics (`GET /metrics` on the sidecar, and on the worker when
/// `worker.metrics_listen` is set). Names follow Prometheus conventions:
/// `runbridge_..._total` counters, `_seconds` in base units.
///
/// The recorder is the `metrics` crate's process-wide one, installed on first
/// use; instrumented code only calls `metrics::counter!` and friends, which
/// are no-ops until then (unit tests never install it).
pub mod metrics {
    use std::sync::OnceLock;

    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

    /// Latency buckets for `_seconds` histograms: 1 ms to 30 s.
    const BUCKETS: &[f64] = &[
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];

    /// Installs the recorder (once per process) and returns its handle;
    /// `None` if another recorder was installed first.
    pub fn handle() -> Option<&'static PrometheusHandle> {
        HANDLE
            .get_or_init(|| {
                let builder = PrometheusBuilder::new()
                    .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                    .ok()?;
                match builder.install_recorder() {
                    Ok(h) => Some(h),
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics recorder not installed; /metrics is empty");
                        None
                    }
                }
            })
            .as_ref()
    }

    /// The Prometheus text exposition of every metric so far.
    pub fn render() -> String {
        match handle() {
            Some(h) => {
                h.run_upkeep();
                h.render()
            }
            None => String::new(),
        }
    }
}
