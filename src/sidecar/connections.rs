//! What one connection may hold of the sidecar, whatever protocol it speaks.
//!
//! Every accepted connection passes through [`Limited`]:
//! - it takes one of `sidecar.max_connections` permits, or is closed at
//!   once (before any TLS handshake);
//! - an address past its share (`sidecar.max_connections_per_client`) is
//!   closed at once too, but only when the listener is under pressure:
//!   when granting it would leave fewer than a share of free slots for
//!   everyone else. A busy address (a workspace behind one NAT address, a
//!   proxy) may use what nobody else needs, and no address can take the
//!   last slots;
//! - its service counts the requests in flight on it (a request is in
//!   flight until its response body has been sent or dropped), and a
//!   connection with none for the idle time (`sidecar.header_timeout_ms`)
//!   reads end-of-stream, which closes it.
//!
//! The idle rule is what HTTP/1's header timeout does for a kept-alive
//! connection, made to hold for HTTP/2 as well: an HTTP/2 client that
//! answers the server's pings, or sends its own frames, keeps bytes
//! flowing without asking for anything, so idleness is counted in
//! requests, not bytes. A long-poll is a request in flight and is never
//! cut by it.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum_server::accept::Accept;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::task::AtomicWaker;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Accepts a connection only within the listener's and its client's
/// limits; see the module's documentation.
#[derive(Clone)]
pub(super) struct Limited<A> {
    inner: A,
    permits: Arc<Semaphore>,
    clients: Arc<Clients>,
    idle: Duration,
}

impl<A> Limited<A> {
    pub(super) fn new(inner: A, max_connections: usize, per_client: usize, idle: Duration) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(max_connections.max(1))),
            clients: Arc::new(Clients {
                max: per_client.max(1),
                open: Mutex::new(HashMap::new()),
            }),
            idle,
        }
    }
}

fn refuse(reason: &'static str) -> io::Error {
    metrics::counter!("runbridge_sidecar_connections_refused_total", "reason" => reason)
        .increment(1);
    io::Error::other(reason)
}

impl<A, S> Accept<TcpStream, S> for Limited<A>
where
    A: Accept<TcpStream, S> + Clone + Send + 'static,
    A::Future: Send + 'static,
    S: Send + 'static,
{
    type Stream = Counted<A::Stream>;
    type Service = Tracked<A::Service>;
    type Future = BoxFuture<'static, io::Result<(Self::Stream, Self::Service)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        // Dropping the stream (on a refusal) closes it at once.
        let permit = self.permits.clone().try_acquire_owned();
        // Free slots once this one is granted.
        let free = self.permits.available_permits();
        let client = stream
            .peer_addr()
            .ok()
            .map(|a| Clients::take(&self.clients, a.ip(), free));
        let inner = self.inner.clone();
        let idle = self.idle;
        Box::pin(async move {
            let Ok(permit) = permit else {
                return Err(refuse("max_connections"));
            };
            let client = match client {
                Some(Some(slot)) => Some(slot),
                Some(None) => return Err(refuse("max_connections_per_client")),
                // No peer address: the socket is already gone.
                None => None,
            };
            let (stream, service) = inner.accept(stream, service).await?;
            let activity = Arc::new(Activity::new());
            Ok((
                Counted {
                    inner: stream,
                    idle,
                    timer: Box::pin(tokio::time::sleep(idle)),
                    activity: activity.clone(),
                    _permit: permit,
                    _client: client,
                },
                Tracked {
                    inner: service,
                    activity,
                },
            ))
        })
    }
}

/// Connections open per client address. An address has an entry only while
/// it has a connection open, so the map holds at most `max_connections`.
struct Clients {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl Clients {
    /// A slot for one more connection of `ip`, or `None` when it already
    /// holds its share and `free` (the listener's slots left once this one
    /// is granted) is less than a share.
    fn take(this: &Arc<Self>, ip: IpAddr, free: usize) -> Option<ClientSlot> {
        let mut open = this.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= this.max && free < this.max {
            if *n == 0 {
                open.remove(&ip);
            }
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            clients: this.clone(),
            ip,
        })
    }
}

/// One connection's place in its client's share.
struct ClientSlot {
    clients: Arc<Clients>,
    ip: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.clients.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// The requests in flight on one connection, and since when it has had none.
struct Activity {
    in_flight: AtomicUsize,
    idle_since: Mutex<Instant>,
    /// The connection's reader, woken when the last request ends so that it
    /// starts counting the idle time.
    reader: AtomicWaker,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            reader: AtomicWaker::new(),
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// When the connection is to be closed as idle (`None` while a request
    /// is in flight).
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        (self.in_flight.load(Ordering::SeqCst) == 0)
            .then(|| *self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) + idle)
    }
}

/// A request in flight; dropped with its response body.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
            self.0.reader.wake();
        }
    }
}

/// A connection: one of the listener's permits and of its client's slots,
/// and end-of-stream once idle.
pub(super) struct Counted<T> {
    inner: T,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    activity: Arc<Activity>,
    _permit: OwnedSemaphorePermit,
    _client: Option<ClientSlot>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let deadline = this.activity.idle_deadline(this.idle);
        if deadline.is_some_and(|d| Instant::now() >= d) {
            // Whatever the client sends meanwhile (pings, settings), it has
            // asked for nothing: end-of-stream closes the connection.
            metrics::counter!("runbridge_sidecar_connections_idle_closed_total").increment(1);
            return Poll::Ready(Ok(()));
        }
        this.activity.reader.register(cx.waker());
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if read.is_pending()
            && let Some(d) = deadline
        {
            this.timer.as_mut().reset(d);
            if this.timer.as_mut().poll(cx).is_ready() {
                metrics::counter!("runbridge_sidecar_connections_idle_closed_total").increment(1);
                return Poll::Ready(Ok(()));
            }
        }
        read
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

/// A connection's service: each request is in flight from its call until
/// its response body is done.
#[derive(Clone)]
pub(super) struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, B> tower_service::Service<axum::http::Request<B>> for Tracked<S>
where
    S: tower_service::Service<axum::http::Request<B>, Response = axum::http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = axum::http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        let busy = self.activity.begin();
        let answer = self.inner.call(req);
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| Body::new(Finishing { body, _busy: busy })))
        })
    }
}

/// A response body that holds its request in flight until it is dropped.
struct Finishing {
    body: Body,
    _busy: InFlight,
}

impl http_body::Body for Finishing {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares_of(max: usize) -> Arc<Clients> {
        Arc::new(Clients {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    #[test]
    fn under_pressure_a_client_holds_at_most_its_share_and_gets_it_back() {
        let clients = shares_of(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = Clients::take(&clients, a, 0).expect("first");
        let _second = Clients::take(&clients, a, 0).expect("second");
        assert!(Clients::take(&clients, a, 1).is_none(), "a third of a");
        assert!(
            Clients::take(&clients, b, 0).is_some(),
            "b has its own share"
        );
        drop(first);
        assert!(Clients::take(&clients, a, 0).is_some(), "a slot comes back");
    }

    #[test]
    fn past_its_share_a_client_uses_what_nobody_else_needs() {
        let clients = shares_of(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..5)
            .map(|_| Clients::take(&clients, a, 2).expect("free slots left for others"))
            .collect();
        assert_eq!(held.len(), 5);
        assert!(Clients::take(&clients, a, 1).is_none(), "the last slots");
    }

    #[test]
    fn an_address_with_nothing_open_leaves_no_entry() {
        let clients = shares_of(2);
        drop(Clients::take(&clients, "10.0.0.1".parse().unwrap(), 0));
        assert!(clients.open.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn idle_counts_from_the_last_request_in_flight() {
        let idle = Duration::from_secs(5);
        let a = Arc::new(Activity::new());
        assert!(a.idle_deadline(idle).is_some(), "idle before any request");
        let one = a.begin();
        let two = a.begin();
        drop(one);
        assert_eq!(a.idle_deadline(idle), None, "one still in flight");
        let before = Instant::now();
        drop(two);
        let d = a.idle_deadline(idle).expect("idle again");
        assert!(d >= before + idle, "counted from the end of the last one");
    }
}
