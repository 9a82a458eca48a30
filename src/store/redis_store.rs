//! [`PromiseStore`] and [`Outbox`] on Redis, through deadpool-redis.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::pool::{Conn, Manager, Pool, Source};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::future::try_join_all;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{AsyncConnectionConfig, Script, Value};

use std::future::Future;
use std::pin::Pin;

use super::*;
use crate::databricks::{CallClass, RateBudget};
use crate::domain::promise::field;
use crate::keys::Keys;
use crate::redact::redact_url;

mod attempts;
mod audit;
mod budget;
mod families;
mod insights;
mod leases;
mod outbox;
mod promises;
mod schedules;
mod search;
mod sessions;

pub use insights::PartitionStats;

const COMMON: &str = include_str!("lua/common.lua");

fn script(body: &str) -> Script {
    Script::new(&format!("{COMMON}\n{body}"))
}

struct Scripts {
    create: Script,
    record_run: Script,
    settle: Script,
    heartbeat: Script,
    outbox_ack: Script,
    expire: Script,
    claim: Script,
    reschedule: Script,
    due: Script,
    budget: Script,
    lease: Script,
    announce: Script,
    session_open: Script,
    session_touch: Script,
    create_parent: Script,
    child_settled: Script,
    cancel_child: Script,
    fanout_done: Script,
    attempt_failed: Script,
    attempt_begin: Script,
    attempt_started: Script,
    retry_now: Script,
    progress: Script,
    progress_emit: Script,
    search: Script,
    index_one: Script,
    check_run_now: Script,
    adopt: Script,
}

impl Scripts {
    fn load() -> Self {
        Self {
            create: script(include_str!("lua/create.lua")),
            record_run: script(include_str!("lua/record_run.lua")),
            settle: script(include_str!("lua/settle.lua")),
            heartbeat: script(include_str!("lua/heartbeat.lua")),
            outbox_ack: script(include_str!("lua/outbox_ack.lua")),
            expire: script(include_str!("lua/expire.lua")),
            claim: script(include_str!("lua/claim.lua")),
            reschedule: script(include_str!("lua/reschedule.lua")),
            due: script(include_str!("lua/due.lua")),
            budget: script(include_str!("lua/budget.lua")),
            lease: script(include_str!("lua/lease.lua")),
            announce: script(include_str!("lua/announce.lua")),
            session_open: script(include_str!("lua/session_open.lua")),
            session_touch: script(include_str!("lua/session_touch.lua")),
            create_parent: script(include_str!("lua/create_parent.lua")),
            child_settled: script(include_str!("lua/child_settled.lua")),
            cancel_child: script(include_str!("lua/cancel_child.lua")),
            fanout_done: script(include_str!("lua/fanout_done.lua")),
            attempt_failed: script(include_str!("lua/attempt_failed.lua")),
            attempt_begin: script(include_str!("lua/attempt_begin.lua")),
            attempt_started: script(include_str!("lua/attempt_started.lua")),
            retry_now: script(include_str!("lua/retry_now.lua")),
            progress: script(include_str!("lua/progress.lua")),
            progress_emit: script(include_str!("lua/progress_emit.lua")),
            search: script(include_str!("lua/search.lua")),
            index_one: script(include_str!("lua/index_one.lua")),
            check_run_now: script(include_str!("lua/check_run_now.lua")),
            adopt: script(include_str!("lua/adopt.lua")),
        }
    }
}

/// A script call that can travel in a pipeline (redis-rs's own invocation
/// cannot), so that a transition and its `WAIT` go together: to the same
/// node, over the same connection, and, should a cluster client resend them
/// to a promoted replica, again together (a `WAIT` resent alone would count
/// the replicas of a node that never saw the write).
struct Call<'a> {
    script: &'a Script,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl<'a> Call<'a> {
    fn new(script: &'a Script) -> Self {
        Self {
            script,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }

    fn key(&mut self, k: impl redis::ToRedisArgs) -> &mut Self {
        k.write_redis_args(&mut self.keys);
        self
    }

    fn arg(&mut self, a: impl redis::ToRedisArgs) -> &mut Self {
        a.write_redis_args(&mut self.args);
        self
    }

    fn evalsha(&self) -> redis::Cmd {
        let mut c = redis::cmd("EVALSHA");
        c.arg(self.script.get_hash())
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        c
    }
}

fn is_noscript(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// Settings the store needs from config.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub url: String,
    pub keys: Keys,
    pub retention: Duration,
    pub pool_size: usize,
    pub response_timeout: Duration,
    /// Delay before the first `runs/get` check of a newly recorded run.
    pub first_poll: Duration,
    /// PEM CA(s) to trust for `rediss://` instead of the system's roots.
    pub tls_ca_pem: Option<Vec<u8>>,
    /// One Redis, a Sentinel deployment, or a Redis Cluster.
    pub topology: Topology,
    /// Replicas every transition must reach before it counts (`WAIT`); 0: none.
    pub wait_replicas: u64,
    pub wait_timeout: Duration,
}

/// Which Redis deployment the store talks to (`redis.mode`).
#[derive(Debug, Clone, Default)]
pub enum Topology {
    /// The Redis at `url`.
    #[default]
    Standalone,
    /// The master the Sentinels name; `url` then gives only the master's
    /// password and database.
    Sentinel(SentinelSettings),
    /// A Redis Cluster, found from these seed nodes' URLs (`url` when empty).
    Cluster { seeds: Vec<String> },
}

#[derive(Debug, Clone)]
pub struct SentinelSettings {
    pub sentinels: Vec<String>,
    pub master: String,
}

/// Where the store's connections come from.
#[derive(Clone)]
enum Backend {
    /// A pool of multiplexed connections to one node (fixed, or the
    /// Sentinels' master).
    Node { pool: Pool, source: Source },
    /// The cluster connection (it keeps one multiplexed connection per node).
    Cluster(ClusterConnection),
}

#[derive(Clone)]
pub struct RedisStore {
    backend: Backend,
    wait_replicas: u64,
    wait_timeout: Duration,
    keys: Keys,
    retention_ms: i64,
    first_poll_ms: u64,
    scripts: Arc<Scripts>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("keys", &self.keys)
            .finish()
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn to_map(flat: Vec<String>) -> HashMap<String, String> {
    let mut m = HashMap::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        m.insert(k, v);
    }
    m
}

/// Script replies are `{STATUS, [field, value, ...]}`.
fn split_reply(v: Value) -> Result<(String, Value), StoreError> {
    let mut items: Vec<Value> =
        redis::from_redis_value(v).map_err(|e| StoreError::Protocol(e.to_string()))?;
    if items.is_empty() {
        return Err(StoreError::Protocol("empty reply".into()));
    }
    let rest = if items.len() > 1 {
        items.remove(1)
    } else {
        Value::Nil
    };
    let status: String = redis::from_redis_value(items.remove(0))
        .map_err(|e| StoreError::Protocol(e.to_string()))?;
    Ok((status, rest))
}

fn record(v: Value) -> Result<Promise, StoreError> {
    let flat: Vec<String> =
        redis::from_redis_value(v).map_err(|e| StoreError::Protocol(e.to_string()))?;
    Ok(Promise::from_fields(&to_map(flat))?)
}

/// One settlement (each is one outbox entry), by state and who settled it.
fn count_settled(p: &Promise) {
    metrics::counter!(
        "runbridge_promises_settled_total",
        "state" => p.state.as_str(),
        "settled_by" => p.settled_by.clone().unwrap_or_else(|| "unknown".into()),
    )
    .increment(1);
}

fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

impl RedisStore {
    /// Builds the pool and checks that Redis answers, so a wrong URL fails at
    /// start-up with the URL (password redacted) in the message.
    pub async fn connect(s: &StoreSettings) -> Result<Self, StoreError> {
        let shown = redact_url(&s.url);
        let conn_cfg = AsyncConnectionConfig::new()
            .set_response_timeout(Some(s.response_timeout))
            .set_connection_timeout(Some(Duration::from_secs(3)));
        let client = match &s.tls_ca_pem {
            None => redis::Client::open(s.url.as_str()),
            Some(ca) => redis::Client::build_with_tls(
                s.url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            ),
        }
        .map_err(|e| StoreError::Unavailable(format!("redis url {shown}: {e}")))?;
        let source = match &s.topology {
            Topology::Standalone => Source::Fixed(Box::new(client)),
            Topology::Cluster { seeds } => {
                return Self::connect_cluster(s, seeds).await;
            }
            Topology::Sentinel(sn) => {
                let node = redis::IntoConnectionInfo::into_connection_info(s.url.as_str())
                    .map_err(|e| StoreError::Unavailable(format!("redis url {shown}: {e}")))?;
                let info = redis::sentinel::SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(node.redis_settings().clone());
                let sentinel = redis::sentinel::SentinelClient::build(
                    sn.sentinels.clone(),
                    sn.master.clone(),
                    Some(info),
                    redis::sentinel::SentinelServerType::Master,
                )
                .map_err(|e| {
                    StoreError::Unavailable(format!(
                        "redis.sentinels: {}",
                        e.to_string().replace(&s.url, &shown)
                    ))
                })?;
                Source::Sentinel(Arc::new(tokio::sync::Mutex::new(sentinel)))
            }
        };
        let manager = Manager::new(source.clone(), conn_cfg);
        let pool = Pool::builder(manager)
            .max_size(s.pool_size)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool_redis::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Unavailable(format!("redis pool for {shown}: {e}")))?;
        Self::ready(s, Backend::Node { pool, source }).await
    }

    /// A Redis Cluster: redis-rs learns the slot map from any seed that
    /// answers and routes each command (each Lua script: all its keys share
    /// one partition's hash tag) to the primary owning its slot.
    async fn connect_cluster(s: &StoreSettings, seeds: &[String]) -> Result<Self, StoreError> {
        let seeds: Vec<&str> = if seeds.is_empty() {
            vec![s.url.as_str()]
        } else {
            seeds.iter().map(String::as_str).collect()
        };
        let shown = seeds
            .iter()
            .map(|u| redact_url(u))
            .collect::<Vec<_>>()
            .join(",");
        let mut builder = ClusterClientBuilder::new(seeds)
            .connection_timeout(Duration::from_secs(3))
            .response_timeout(s.response_timeout);
        if let Some(ca) = &s.tls_ca_pem {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.clone()),
            });
        }
        let client = builder
            .build()
            .map_err(|e| StoreError::Unavailable(format!("redis cluster {shown}: {e}")))?;
        let conn = client.get_async_connection().await.map_err(|e| {
            StoreError::Unavailable(format!("cannot reach redis cluster at {shown}: {e}"))
        })?;
        Self::ready(s, Backend::Cluster(conn)).await
    }

    async fn ready(s: &StoreSettings, backend: Backend) -> Result<Self, StoreError> {
        let shown = redact_url(&s.url);
        let store = Self {
            backend,
            wait_replicas: s.wait_replicas,
            wait_timeout: s.wait_timeout,
            keys: s.keys.clone(),
            retention_ms: i64::try_from(s.retention.as_millis()).unwrap_or(i64::MAX),
            first_poll_ms: u64::try_from(s.first_poll.as_millis()).unwrap_or(u64::MAX),
            scripts: Arc::new(Scripts::load()),
        };
        store
            .ping()
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot reach redis at {shown}: {e}")))?;
        store.mark_indexed_if_new().await?;
        Ok(store)
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// With `redis.wait_replicas` above 0, the `WAIT` that follows a write
    /// in its pipeline: until what this connection wrote, the write included,
    /// reached that many replicas, so a failover cannot lose it.
    fn wait_cmd(&self) -> Option<redis::Cmd> {
        (self.wait_replicas > 0).then(|| {
            let mut c = redis::cmd("WAIT");
            c.arg(self.wait_replicas)
                .arg(u64::try_from(self.wait_timeout.as_millis()).unwrap_or(u64::MAX));
            c
        })
    }

    /// The reply of a `WAIT` sent by [`wait_cmd`](Self::wait_cmd). Not
    /// replicated in time: the write still stands, but the caller gets a
    /// retryable error, and its retry finds the write (every transition is
    /// idempotent).
    fn check_replicated(&self, reply: Option<Value>) -> Result<(), StoreError> {
        let n: u64 = reply
            .and_then(|v| redis::from_redis_value(v).ok())
            .unwrap_or(0);
        if n < self.wait_replicas {
            return Err(StoreError::Unavailable(format!(
                "written, but replicated to {n} of redis.wait_replicas = {} within {:?}",
                self.wait_replicas, self.wait_timeout
            )));
        }
        Ok(())
    }

    /// Runs a state transition's script, followed in the same pipeline by
    /// its `WAIT` when `redis.wait_replicas` asks for one. A Redis that lost
    /// its script cache (restarted) gets the script again.
    async fn transition(&self, call: &Call<'_>) -> Result<Value, StoreError> {
        let mut pipe = redis::pipe();
        pipe.add_command(call.evalsha());
        let wait = self.wait_cmd();
        if let Some(w) = &wait {
            pipe.add_command(w.clone());
        }
        let mut conn = self.conn().await?;
        let mut r: redis::RedisResult<Vec<Value>> = pipe.query_async(&mut conn).await;
        if matches!(&r, Err(e) if is_noscript(e)) {
            call.script
                .load_async(&mut conn)
                .await
                .map_err(unavailable)?;
            r = pipe.query_async(&mut conn).await;
        }
        let mut replies = r.map_err(unavailable)?.into_iter();
        let value = replies
            .next()
            .ok_or_else(|| StoreError::Protocol("no reply to a script".into()))?;
        if wait.is_some() {
            self.check_replicated(replies.next())?;
        }
        Ok(value)
    }

    /// Runs a script that only reads (no `WAIT`: it wrote nothing to wait
    /// for). A Redis that lost its script cache gets the script again.
    async fn read(&self, call: &Call<'_>) -> Result<Value, StoreError> {
        let cmd = call.evalsha();
        let mut conn = self.conn().await?;
        match cmd.query_async(&mut conn).await {
            Err(e) if is_noscript(&e) => {
                call.script
                    .load_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                cmd.query_async(&mut conn).await.map_err(unavailable)
            }
            r => r.map_err(unavailable),
        }
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        match &self.backend {
            Backend::Node { pool, .. } => {
                pool.get().await.map(Conn::from_pool).map_err(unavailable)
            }
            Backend::Cluster(c) => Ok(Conn::Cluster(c.clone())),
        }
    }

    fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster(_))
    }

    /// One pipeline per partition, sent concurrently, replies in partition
    /// order. (A pipeline goes to one node; on a cluster the partitions'
    /// slots are spread over the primaries.)
    async fn per_partition(
        &self,
        build: impl Fn(u32, &mut redis::Pipeline),
    ) -> Result<Vec<Vec<Value>>, StoreError> {
        let conn = self.conn().await?;
        try_join_all((0..self.keys.partitions()).map(|p| {
            let mut pipe = redis::pipe();
            build(p, &mut pipe);
            let mut conn = conn.clone();
            async move { pipe.query_async::<Vec<Value>>(&mut conn).await }
        }))
        .await
        .map_err(unavailable)
    }

    /// The server's clock, in milliseconds.
    async fn server_time_ms(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn().await?;
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// The primaries to visit for a per-node command (`SCAN`): `None` (the
    /// connection's one node) unless on a cluster.
    async fn scan_nodes(&self) -> Result<Vec<Option<(String, u16)>>, StoreError> {
        if !self.is_cluster() {
            return Ok(vec![None]);
        }
        let mut conn = self.conn().await?;
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(cluster_primaries(&nodes).into_iter().map(Some).collect())
    }

    /// An outbox reader for one relay consumer, on its own connection (its
    /// blocking reads must not hold up the shared pool).
    pub async fn outbox(
        &self,
        group: &str,
        consumer: &str,
        block: Duration,
    ) -> Result<RedisOutbox, StoreError> {
        let cfg = AsyncConnectionConfig::new()
            .set_response_timeout(Some(block + Duration::from_secs(5)))
            .set_connection_timeout(Some(Duration::from_secs(3)));
        let conn = match &self.backend {
            Backend::Node { source, .. } => {
                Conn::own(source.connect(&cfg).await.map_err(unavailable)?)
            }
            // A cluster relay polls without blocking (see `read_new`), so it
            // can share the cluster connection.
            Backend::Cluster(c) => Conn::Cluster(c.clone()),
        };
        let mut outbox = RedisOutbox {
            conn,
            store: self.clone(),
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            groups_ready: false,
            reclaim_cursor: vec!["0-0".to_owned(); self.keys.partitions() as usize],
        };
        outbox.ensure_groups().await?;
        Ok(outbox)
    }

    /// Number of entries waiting in all outbox streams (for tests and status).
    pub async fn outbox_len(&self) -> Result<u64, StoreError> {
        let replies = self
            .per_partition(|p, pipe| {
                pipe.cmd("XLEN").arg(self.keys.outbox(p));
            })
            .await?;
        Ok(replies
            .iter()
            .flatten()
            .map(|v| redis::from_redis_value::<u64>(v.clone()).unwrap_or(0))
            .sum())
    }

    /// Per partition: pending promises (the deadline set holds every pending
    /// one), how overdue the earliest deadline is, outbox entries, and the
    /// oldest outbox entry's age. Five cheap commands per partition, a
    /// pipeline each; for the metrics gauges.
    pub async fn partition_stats(&self) -> Result<Vec<PartitionStats>, StoreError> {
        let replies = self
            .per_partition(|p, pipe| {
                pipe.cmd("ZCARD").arg(self.keys.deadlines(p));
                pipe.cmd("ZRANGE")
                    .arg(self.keys.deadlines(p))
                    .arg(0)
                    .arg(0)
                    .arg("WITHSCORES");
                pipe.cmd("ZRANGE")
                    .arg(self.keys.pending_seconds(p))
                    .arg(0)
                    .arg(0)
                    .arg("WITHSCORES");
                pipe.cmd("XLEN").arg(self.keys.outbox(p));
                pipe.cmd("XRANGE")
                    .arg(self.keys.outbox(p))
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(1);
            })
            .await?;
        let now_ms = self.server_time_ms().await?;
        let mut out = Vec::new();
        for (p, chunk) in replies.iter().enumerate() {
            let n = |v: &Value| redis::from_redis_value::<u64>(v.clone()).unwrap_or(0);
            // Entry ids are "<ms>-<seq>": the oldest entry's time is in its id.
            let earliest_deadline = redis::from_redis_value::<Vec<(String, f64)>>(chunk[1].clone())
                .ok()
                .and_then(|v| v.first().map(|(_, score)| *score as u64));
            let oldest_second = redis::from_redis_value::<Vec<(String, f64)>>(chunk[2].clone())
                .ok()
                .and_then(|v| v.first().map(|(_, score)| *score as u64));
            let oldest_ms = redis::from_redis_value::<Vec<(String, Value)>>(chunk[4].clone())
                .ok()
                .and_then(|e| e.first().map(|(id, _)| id.clone()))
                .and_then(|id| id.split('-').next()?.parse::<u64>().ok());
            let pending = n(&chunk[0]);
            out.push(PartitionStats {
                partition: p as u32,
                pending,
                overdue: earliest_deadline
                    .filter(|d| *d < now_ms)
                    .map(|d| Duration::from_millis(now_ms - d)),
                // Counted to the second; a partition with nothing pending has
                // no age, whatever a count left by a backstop expiry says.
                oldest_pending_age: oldest_second
                    .filter(|_| pending > 0)
                    .map(|s| Duration::from_millis(now_ms.saturating_sub(s * 1000))),
                outbox: n(&chunk[3]),
                outbox_oldest_age: oldest_ms
                    .map(|ms| Duration::from_millis(now_ms.saturating_sub(ms))),
            });
        }
        Ok(out)
    }
}

impl RedisStore {
    /// Notes when a completion event came back unroutable (`Some(ms)`), or
    /// that events are routed again (`None`).
    pub async fn note_events_unroutable(&self, at: Option<i64>) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let key = self.keys.events_unroutable();
        let _: () = match at {
            Some(ms) => {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(ms)
                    .query_async(&mut conn)
                    .await
            }
            None => redis::cmd("DEL").arg(&key).query_async(&mut conn).await,
        }
        .map_err(unavailable)?;
        Ok(())
    }

    /// When a completion event last came back unroutable, if none was
    /// routed since (`runbridge check`).
    pub async fn events_unroutable(&self) -> Result<Option<i64>, StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("GET")
            .arg(self.keys.events_unroutable())
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    /// A server setting (`CONFIG GET`), for `runbridge check`: `Ok(None)`
    /// when the server will not say (managed services often rename or
    /// refuse CONFIG).
    pub async fn server_setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn().await?;
        let r: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg(name)
            .query_async(&mut conn)
            .await;
        match r {
            Ok(v) => Ok(v.get(1).cloned()),
            Err(e)
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) =>
            {
                Ok(None)
            }
            Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
                Err(unavailable(e))
            }
            Err(_) => Ok(None),
        }
    }
}

fn ids(v: Vec<String>) -> Vec<PromiseId> {
    v.into_iter()
        .filter_map(|s| match PromiseId::parse(&s) {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::error!(member = %s, error = %e, "foreign member in a schedule; ignored");
                None
            }
        })
        .collect()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The primaries that serve slots, from `CLUSTER NODES`, in address order.
fn cluster_primaries(nodes: &str) -> Vec<(String, u16)> {
    let mut out: Vec<(String, u16)> = nodes
        .lines()
        .filter_map(|line| {
            // <id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link> <slot>...
            let f: Vec<&str> = line.split_whitespace().collect();
            let flags = f.get(2)?;
            let serves_slots = f.len() > 8;
            let primary = flags.split(',').any(|x| x == "master")
                && !flags.split(',').any(|x| x == "fail" || x == "noaddr");
            if !(primary && serves_slots) {
                return None;
            }
            let addr = f.get(1)?.split(['@', ',']).next()?;
            let (host, port) = addr.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect();
    out.sort();
    out
}

/// How long a cluster relay waits after a round that found nothing new.
pub const CLUSTER_IDLE_POLL: Duration = Duration::from_millis(50);

/// One relay's view of the outbox streams (a consumer in one group).
pub struct RedisOutbox {
    conn: Conn,
    store: RedisStore,
    group: String,
    consumer: String,
    groups_ready: bool,
    reclaim_cursor: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_primaries_are_the_live_primaries_with_slots() {
        let nodes = "\
820d 127.0.0.1:28005@28015 slave 1d61 0 1795496715850 6 connected
4193 127.0.0.1:28002@28012 master - 0 1795496716552 3 connected 10923-16383
b161 127.0.0.1:28000@28010 myself,master - 0 1795496715000 1 connected 0-5460
dead 127.0.0.1:28009@28019 master,fail - 0 1795496715000 1 connected 5461-10922
1d61 127.0.0.1:28001@28011,host.example master - 0 1795496715850 2 connected 5461-10922
12da 127.0.0.1:28004@28014 master - 0 1795496715850 5 connected
";
        assert_eq!(
            cluster_primaries(nodes),
            vec![
                ("127.0.0.1".to_owned(), 28000),
                ("127.0.0.1".to_owned(), 28001),
                ("127.0.0.1".to_owned(), 28002),
            ]
        );
    }
}
