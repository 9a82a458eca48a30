//! Logging: human-readable by default, JSON with `log.format = "json"`
//! (`RUNBRIDGE__LOG__FORMAT=json`). `RUST_LOG` overrides the level filter.

use tracing_subscriber::EnvFilter;

pub fn init(format: &str, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // lapin logs every returned message with its whole body at WARN; the relay
    // handles returns itself (and event bodies may hold data that must not
    // reach logs), so only lapin's errors get through from that target.
    let filter = match "lapin::returned_messages=error".parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // try_init: a second call (tests) keeps the first subscriber.
    let _ = if format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
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
