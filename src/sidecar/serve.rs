//! The sidecar's HTTP server: connection limits and timeouts that a
//! client cannot talk its way around.
//!
//! - At most `sidecar.max_connections` connections are served at once; one
//!   more is closed as soon as it is accepted (before any TLS handshake).
//! - A request's head must arrive within `sidecar.header_timeout_ms`, and a
//!   kept-alive connection must start its next request within the same
//!   time, else it is closed: a client trickling one header byte at a time
//!   cannot hold a connection (and its file descriptor) for long.
//! - A request body has `sidecar.body_timeout_ms` (enforced where bodies are
//!   read, with a 408).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use axum_server::accept::{Accept, DefaultAcceptor};
use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{AppState, healthz, metrics, router};
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
    pub header_timeout: Duration,
    /// At shutdown, how long requests in flight (a long-poll, say) may take
    /// to finish before their connections are closed.
    pub drain: Duration,
}

/// Accepts a connection only while fewer than the limit are open; the
/// permit lives as long as the connection.
#[derive(Clone)]
struct Limited<A> {
    inner: A,
    permits: Arc<Semaphore>,
}

impl<A, I, S> Accept<I, S> for Limited<A>
where
    A: Accept<I, S> + Clone + Send + 'static,
    A::Future: Send + 'static,
    I: Send + 'static,
    S: Send + 'static,
{
    type Stream = Counted<A::Stream>;
    type Service = A::Service;
    type Future = BoxFuture<'static, io::Result<(Self::Stream, Self::Service)>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        let permit = self.permits.clone().try_acquire_owned();
        let inner = self.inner.clone();
        Box::pin(async move {
            let Ok(permit) = permit else {
                metrics::counter!("runbridge_sidecar_connections_refused_total").increment(1);
                // Dropping the stream closes it at once.
                drop(stream);
                return Err(io::Error::other("sidecar.max_connections reached"));
            };
            let (stream, service) = inner.accept(stream, service).await?;
            Ok((
                Counted {
                    inner: stream,
                    _permit: permit,
                },
                service,
            ))
        })
    }
}

/// A connection that holds one of the listener's permits.
struct Counted<T> {
    inner: T,
    _permit: OwnedSemaphorePermit,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Serves until `shutdown`, then finishes in-flight requests. With `tls`,
/// HTTPS only (rustls; a plain-HTTP request fails its handshake).
pub async fn serve<S: Store>(
    listener: TcpListener,
    state: Arc<AppState<S>>,
    tls: Option<TlsPem>,
    limits: Limits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let addr = listener.local_addr()?;
    let app = router(state);
    let handle = axum_server::Handle::new();
    let on_shutdown = handle.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        // Stop accepting, let the requests in flight finish (for a while).
        on_shutdown.graceful_shutdown(Some(limits.drain));
    });
    let limited = Limited {
        inner: DefaultAcceptor,
        permits: Arc::new(Semaphore::new(limits.max_connections.max(1))),
    };
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
    let Some(pem) = tls else {
        tracing::info!(%addr, "sidecar listening (http)");
        return server
            .acceptor(limited)
            .serve(app.into_make_service())
            .await;
    };
    let config = axum_server::tls_rustls::RustlsConfig::from_pem(pem.cert, pem.key)
        .await
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("sidecar.tls_cert_file / tls_key_file: {e}"),
            )
        })?;
    tracing::info!(%addr, "sidecar listening (https)");
    server
        .acceptor(
            axum_server::tls_rustls::RustlsAcceptor::new(config)
                .handshake_timeout(limits.header_timeout)
                .acceptor(limited),
        )
        .serve(app.into_make_service())
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
