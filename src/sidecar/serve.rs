//! The sidecar's HTTP server: connection limits and timeouts that a
//! client cannot talk its way around.
//!
//! - At most `sidecar.max_connections` connections are served at once, and
//!   a client address past its share (`sidecar.max_connections_per_client`)
//!   only while a share stays free for others; one more is closed as soon
//!   as it is accepted (before any TLS handshake). See `connections`.
//! - A request's head must arrive within `sidecar.header_timeout_ms`, and a
//!   connection (HTTP/1 or HTTP/2) with no request in flight for the same
//!   time is closed: a client trickling one header byte at a time, or
//!   answering HTTP/2 pings without asking for anything, cannot hold a
//!   connection (and its file descriptor) for long.
//! - Plain HTTP is HTTP/1 only unless `sidecar.allow_h2c`: HTTP/2 is for
//!   HTTPS, where ALPN offers it.
//! - A request body has `sidecar.body_timeout_ms` (enforced where bodies are
//!   read, with a 408).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use axum_server::accept::DefaultAcceptor;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::connections::Limited;
use super::{AppState, Routes, healthz, metrics, routes};
use crate::store::Store;

/// The sidecar's certificate chain and private key, PEM.
pub struct TlsPem {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

/// Limits of the listener (`[sidecar]` settings).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    /// How long a request head may take, and a connection may have no
    /// request in flight.
    pub header_timeout: Duration,
    /// Serve HTTP/2 over plain HTTP (h2c).
    pub allow_h2c: bool,
    /// At shutdown, how long requests in flight (a long-poll, say) may take
    /// to finish before their connections are closed.
    pub drain: Duration,
}

/// Serves until `shutdown`, then finishes in-flight requests. With `tls`,
/// HTTPS only (rustls; a plain-HTTP request fails its handshake). With an
/// `operator` listener, `listener` serves only the notebook's routes and
/// `operator` the operator's (each with the health checks), under the same
/// limits and TLS.
pub async fn serve<S: Store>(
    listener: TcpListener,
    operator: Option<TcpListener>,
    state: Arc<AppState<S>>,
    tls: Option<TlsPem>,
    limits: Limits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let tls = match tls {
        None => None,
        Some(pem) => Some(
            axum_server::tls_rustls::RustlsConfig::from_pem(pem.cert, pem.key)
                .await
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("sidecar.tls_cert_file / tls_key_file: {e}"),
                    )
                })?,
        ),
    };
    let Some(operator) = operator else {
        let app = routes(state, Routes::All);
        return serve_one("sidecar", listener, app, tls, limits, shutdown).await;
    };
    let notebook = routes(state.clone(), Routes::Notebook);
    let internal = routes(state, Routes::Operator);
    tokio::try_join!(
        serve_one(
            "sidecar",
            listener,
            notebook,
            tls.clone(),
            limits,
            shutdown.clone()
        ),
        serve_one("operator", operator, internal, tls, limits, shutdown),
    )
    .map(|_| ())
}

/// One listener serving `app`.
async fn serve_one(
    name: &'static str,
    listener: TcpListener,
    app: Router,
    tls: Option<axum_server::tls_rustls::RustlsConfig>,
    limits: Limits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let addr = listener.local_addr()?;
    let handle = axum_server::Handle::new();
    let on_shutdown = handle.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        // Stop accepting, let the requests in flight finish (for a while).
        on_shutdown.graceful_shutdown(Some(limits.drain));
    });
    let limited = Limited::new(
        DefaultAcceptor,
        limits.max_connections,
        limits.max_connections_per_client,
        limits.header_timeout,
    );
    let mut server = axum_server::from_tcp(listener.into_std()?)?
        .handle(handle)
        .first_request_timeout(limits.header_timeout);
    server
        .http_builder()
        .http1()
        .header_read_timeout(limits.header_timeout);
    server
        .http_builder()
        .http2()
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(limits.header_timeout);
    // Refused and timed-out connections are expected under attack and
    // counted; they are not errors worth a log line each.
    let server =
        server.accept_error_handler(|_, e| tracing::debug!(error = %e, "connection not served"));
    // The client's address reaches the handlers (the login throttle).
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    let Some(config) = tls else {
        tracing::info!(%addr, h2c = limits.allow_h2c, "{name} listening (http)");
        let server = if limits.allow_h2c {
            server
        } else {
            server.http1_only()
        };
        return server.acceptor(limited).serve(app).await;
    };
    tracing::info!(%addr, "{name} listening (https)");
    server
        .acceptor(
            axum_server::tls_rustls::RustlsAcceptor::new(config)
                .handshake_timeout(limits.header_timeout)
                .acceptor(limited),
        )
        .serve(app)
        .await
}

/// The worker's own `/metrics` (and `/healthz`) listener: the worker serves
/// no other HTTP, and axum stays inside this module.
pub async fn serve_metrics(listener: TcpListener, shutdown: CancellationToken) -> io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "metrics listening");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
