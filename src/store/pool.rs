//! The connection pool: deadpool over redis-rs multiplexed connections
//! (what deadpool-redis pools), without a round trip per checkout; and
//! [`Conn`], which is either such a connection or a Redis Cluster
//! connection (no pool: it multiplexes per node on its own).
//!
//! deadpool-redis's own manager checks every connection it hands out with a
//! pipelined `UNWATCH` + `PING`, one extra round trip per pool checkout. The
//! store checks out a connection for every operation, so that doubled the
//! commands Redis served and most of the worker's context switches
//! (measured in `make bench`, B1: 607k EVALSHA and 652k UNWATCH). runbridge
//! never uses `WATCH` (every transition is one Lua script), so there is no
//! watch state to clear; and a `PING` proves little about the next command.
//! Instead a connection is replaced once a command on it fails for a reason
//! other than Redis's answer (I/O error, dropped connection, timeout): the
//! failing command reports an error as before (callers retry), and the next
//! checkout gets a fresh connection.
//!
//! A checkout is also not exclusive: [`Conn`] is a clone of the pooled
//! multiplexed connection, and the pool object goes back at once. Commands
//! of concurrent operations then share a few connections and leave in one
//! write (redis-rs pipelines what is queued on a multiplexed connection);
//! holding a connection per operation allowed at most `pool_size` commands in
//! flight, each in its own write and wake-up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use redis::AsyncConnectionConfig;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

/// A connection that remembers whether a command on it (or on a clone of
/// it) failed.
pub struct Tracked {
    conn: MultiplexedConnection,
    broken: Arc<AtomicBool>,
}

/// True for failures of the connection, false for errors Redis answered
/// with (a script error, `NOSCRIPT`, a wrong type), after which the
/// connection is as good as before.
fn connection_failed(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error()
}

/// Where connections go: one Redis, or whichever node the Sentinels name
/// master at the moment a connection is made (so after a failover every
/// replaced connection goes to the new master).
#[derive(Clone)]
pub enum Source {
    Fixed(Box<redis::Client>),
    Sentinel(Arc<tokio::sync::Mutex<redis::sentinel::SentinelClient>>),
}

impl Source {
    pub async fn client(&self) -> Result<redis::Client, RedisError> {
        match self {
            Source::Fixed(c) => Ok((**c).clone()),
            Source::Sentinel(s) => {
                let mut sentinel = s.lock().await;
                // Boxed: the Sentinel client's future nests deeply, and every
                // future that makes a connection would otherwise carry it.
                Box::pin(sentinel.async_get_client()).await
            }
        }
    }

    pub async fn connect(
        &self,
        config: &AsyncConnectionConfig,
    ) -> Result<MultiplexedConnection, RedisError> {
        self.client()
            .await?
            .get_multiplexed_async_connection_with_config(config)
            .await
    }
}

/// Creates multiplexed connections (as deadpool-redis's manager does, but
/// from a client built here, so `rediss://` can trust a private CA and a
/// Sentinel deployment is followed); recycles for free.
pub struct Manager {
    source: Source,
    config: AsyncConnectionConfig,
}

impl Manager {
    pub fn new(source: Source, config: AsyncConnectionConfig) -> Self {
        Self { source, config }
    }
}

impl managed::Manager for Manager {
    type Type = Tracked;
    type Error = RedisError;

    async fn create(&self) -> Result<Tracked, RedisError> {
        Ok(Tracked {
            conn: self.source.connect(&self.config).await?,
            broken: Arc::new(AtomicBool::new(false)),
        })
    }

    async fn recycle(&self, c: &mut Tracked, _: &Metrics) -> RecycleResult<RedisError> {
        if c.broken.load(Ordering::Relaxed) {
            Err(RecycleError::message(
                "a command on it failed; replacing it",
            ))
        } else {
            Ok(())
        }
    }
}

pub type Pool = managed::Pool<Manager>;

/// A connection for one operation: a clone of a pooled multiplexed
/// connection (one Redis, or the Sentinels' master), or of the one cluster
/// connection (redis-rs routes each command to the primary that owns its
/// key's slot, follows MOVED/ASK and refreshes the slot map after a
/// failover; it multiplexes per node, so it needs no pool).
#[derive(Clone)]
pub enum Conn {
    Node {
        conn: MultiplexedConnection,
        broken: Arc<AtomicBool>,
    },
    Cluster(ClusterConnection),
}

impl Conn {
    /// Takes a connection from the pool and returns it at once: the clone
    /// shares it with every other operation that took it.
    pub(super) fn from_pool(obj: managed::Object<Manager>) -> Self {
        Conn::Node {
            conn: obj.conn.clone(),
            broken: obj.broken.clone(),
        }
    }

    /// A connection of its own (the relay's blocking reads), not pooled.
    pub(super) fn own(conn: MultiplexedConnection) -> Self {
        Conn::Node {
            conn,
            broken: Arc::new(AtomicBool::new(false)),
        }
    }

    fn note<T>(&self, r: &Result<T, RedisError>) {
        if let (Conn::Node { broken, .. }, Err(e)) = (self, r)
            && connection_failed(e)
        {
            broken.store(true, Ordering::Relaxed);
        }
    }

    /// Sends `cmd` to the cluster node at `host:port` (for per-node
    /// commands such as `SCAN`); on one Redis, to it.
    pub async fn query_on_address<T: redis::FromRedisValue>(
        &mut self,
        address: Option<(&str, u16)>,
        cmd: &Cmd,
    ) -> Result<T, RedisError> {
        match (self, address) {
            (Conn::Cluster(c), Some((host, port))) => {
                let v = c
                    .route_command(
                        cmd.clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.to_owned(),
                            port,
                        }),
                    )
                    .await?;
                Ok(redis::from_redis_value(v)?)
            }
            (conn, _) => cmd.query_async(conn).await,
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let r = match self {
                Conn::Node { conn, .. } => conn.req_packed_command(cmd).await,
                Conn::Cluster(c) => c.req_packed_command(cmd).await,
            };
            self.note(&r);
            r
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let r = match self {
                Conn::Node { conn, .. } => conn.req_packed_commands(cmd, offset, count).await,
                Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count).await,
            };
            self.note(&r);
            r
        })
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node { conn, .. } => conn.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::{ErrorKind, ServerErrorKind};

    #[test]
    fn server_answers_keep_the_connection() {
        let e = RedisError::from((ErrorKind::Server(ServerErrorKind::NoScript), "NOSCRIPT"));
        assert!(!connection_failed(&e));
        let e = RedisError::from((ErrorKind::Server(ServerErrorKind::ResponseError), "ERR"));
        assert!(!connection_failed(&e));
    }

    #[test]
    fn io_failures_replace_it() {
        let e = RedisError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(connection_failed(&e));
        let e = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(connection_failed(&e));
    }
}
