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
use crate::partitions::{Leases, Membership};
use crate::redact::redact_url;

mod sessions;

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

impl Insights for RedisStore {
    /// A pipeline per partition, sent together: the pending count, the
    /// per-second pending counts and the outbox length, and the last 60
    /// minutes' settlement counts.
    async fn overview(&self) -> Result<Overview, StoreError> {
        let minute_now = chrono::Utc::now().timestamp().div_euclid(60);
        let minutes: Vec<i64> = (minute_now - 59..=minute_now).collect();
        let replies = self
            .per_partition(|p, pipe| {
                pipe.cmd("ZCARD").arg(self.keys.deadlines(p));
                pipe.cmd("HGETALL").arg(self.keys.pending_by_second(p));
                pipe.cmd("XLEN").arg(self.keys.outbox(p));
                for m in &minutes {
                    pipe.cmd("HGETALL").arg(self.keys.settled_in_minute(p, *m));
                }
            })
            .await?;
        let secs = self.server_time_ms().await? / 1000;
        let mut out = Overview {
            settled_per_minute: vec![BTreeMap::new(); minutes.len()],
            ..Default::default()
        };
        let mut by_second: BTreeMap<u64, u64> = BTreeMap::new();
        for chunk in &replies {
            let n = |v: &Value| redis::from_redis_value::<u64>(v.clone()).unwrap_or(0);
            out.pending += n(&chunk[0]);
            let seconds: HashMap<u64, i64> =
                redis::from_redis_value(chunk[1].clone()).unwrap_or_default();
            for (s, count) in seconds {
                if count > 0 {
                    *by_second.entry(s).or_default() += count as u64;
                }
            }
            out.outbox += n(&chunk[2]);
            for (i, v) in chunk[3..].iter().enumerate() {
                let counts: HashMap<String, u64> =
                    redis::from_redis_value(v.clone()).unwrap_or_default();
                for (state, c) in counts {
                    *out.settled_per_minute[i].entry(state).or_default() += c;
                }
            }
        }
        out.pending_ages = by_second
            .into_iter()
            .map(|(s, c)| (Duration::from_secs(secs.saturating_sub(s)), c))
            .collect();
        Ok(out)
    }
}

/// One partition's sizes, for the metrics gauges.
#[derive(Debug, Clone)]
pub struct PartitionStats {
    pub partition: u32,
    pub pending: u64,
    /// How far past its deadline the most overdue pending promise is (the
    /// reconciler should have timed it out: a sweep is not running).
    pub overdue: Option<Duration>,
    /// Age of the oldest pending promise (to the second: counted per
    /// creation second, not per promise).
    pub oldest_pending_age: Option<Duration>,
    pub outbox: u64,
    pub outbox_oldest_age: Option<Duration>,
}

impl PromiseStore for RedisStore {
    async fn create(&self, new: &NewPromise) -> Result<CreateOutcome, StoreError> {
        let p = self.keys.partition(&new.id);
        let (rel, abs) = match new.timeout {
            Timeout::After(d) => (d.as_millis() as i64, 0),
            Timeout::At(ms) => (0, ms.max(1)),
        };
        let mut inv = Call::new(&self.scripts.create);
        inv.key(self.keys.promise(&new.id))
            .key(self.keys.deadlines(p))
            .key(self.keys.pending_by_second(p))
            .key(self.keys.pending_seconds(p))
            .arg(new.id.as_str())
            .arg(rel)
            .arg(abs)
            .arg(self.retention_ms)
            .arg(
                new.heartbeat
                    .map(|d| d.as_secs().to_string())
                    .unwrap_or_default(),
            );
        let pairs: [(&str, String); 9] = [
            (field::PARAM, json(&new.param)),
            (
                field::TAGS,
                if new.tags.is_empty() {
                    String::new()
                } else {
                    json(&new.tags)
                },
            ),
            (
                field::IKEY_CREATE,
                new.ikey_create.clone().unwrap_or_default(),
            ),
            (
                field::JOB_ID,
                new.job_id.map(|j| j.to_string()).unwrap_or_default(),
            ),
            (field::WORKSPACE, new.workspace.clone()),
            (field::REPLY_TO, new.reply_to.clone().unwrap_or_default()),
            (
                field::CORRELATION_ID,
                new.correlation_id.clone().unwrap_or_default(),
            ),
            (
                field::TRACEPARENT,
                new.traceparent.clone().unwrap_or_default(),
            ),
            (
                field::CANCEL_ON_TIMEOUT,
                if new.cancel_on_timeout { "1" } else { "0" }.into(),
            ),
        ];
        for (k, v) in pairs {
            inv.arg(k).arg(v);
        }
        let v = self.transition(&inv).await?;
        let (status, rest) = split_reply(v)?;
        let promise = record(rest)?;
        match status.as_str() {
            "CREATED" => {
                metrics::counter!("runbridge_promises_created_total").increment(1);
                Ok(CreateOutcome::Created(promise))
            }
            "EXISTS" => Ok(CreateOutcome::Existing(promise)),
            other => Err(StoreError::Protocol(format!("create: {other}"))),
        }
    }

    async fn record_run(
        &self,
        id: &PromiseId,
        run: RunId,
        run_page_url: Option<&str>,
    ) -> Result<RecordOutcome, StoreError> {
        let p = self.keys.partition(id);
        let v = self
            .transition(
                Call::new(&self.scripts.record_run)
                    .key(self.keys.promise(id))
                    .key(self.keys.runs(p))
                    .key(self.keys.polls(p))
                    .key(self.keys.cancels(p))
                    .arg(run.get())
                    .arg(run_page_url.unwrap_or(""))
                    .arg(id.as_str())
                    .arg(self.first_poll_ms),
            )
            .await?;
        let (status, rest) = split_reply(v)?;
        let rest: Option<String> =
            redis::from_redis_value(rest).map_err(|e| StoreError::Protocol(e.to_string()))?;
        match status.as_str() {
            "OK" => {
                let st = rest.unwrap_or_default();
                let st = st
                    .parse::<State>()
                    .map_err(|e| StoreError::Protocol(e.to_string()))?;
                Ok(RecordOutcome::Recorded(st))
            }
            "NOT_FOUND" => Ok(RecordOutcome::NotFound),
            "CONFLICT" => Ok(RecordOutcome::Conflict(rest.unwrap_or_default())),
            other => Err(StoreError::Protocol(format!("record_run: {other}"))),
        }
    }

    async fn settle(&self, req: &Settle) -> Result<SettleOutcome, StoreError> {
        // The value of a promise found past its timeout: the same reason the
        // deadline sweep gives (expire.lua).
        let timed_out =
            Payload::data(r#"{"reason":"timeout","message":"the promise passed its timeout"}"#);
        let mut inv = Call::new(&self.scripts.settle);
        for k in self.settle_keys(&req.id) {
            inv.key(k);
        }
        inv.arg(req.id.as_str())
            .arg(req.target.as_str())
            .arg(json(&req.value))
            .arg(req.ikey.as_deref().unwrap_or(""))
            .arg(if req.strict { "1" } else { "0" })
            .arg(req.settled_by.as_str())
            .arg(self.retention_ms)
            .arg(json(&timed_out))
            .arg(if req.cancel_run { "1" } else { "0" });
        let v = self.transition(&inv).await?;
        let (status, rest) = split_reply(v)?;
        if status == "NOT_FOUND" {
            return Ok(SettleOutcome::NotFound);
        }
        let promise = record(rest)?;
        if matches!(status.as_str(), "SETTLED" | "TIMEDOUT") {
            count_settled(&promise);
        }
        Ok(match status.as_str() {
            "SETTLED" => SettleOutcome::Settled(promise),
            "TIMEDOUT" => SettleOutcome::TimedOut(promise),
            "DEDUP" => SettleOutcome::Deduplicated(promise),
            "ALREADY" => SettleOutcome::AlreadySettled(promise),
            other => return Err(StoreError::Protocol(format!("settle: {other}"))),
        })
    }

    async fn heartbeat(&self, id: &PromiseId) -> Result<HeartbeatOutcome, StoreError> {
        let p = self.keys.partition(id);
        let v = self
            .transition(
                Call::new(&self.scripts.heartbeat)
                    .key(self.keys.promise(id))
                    .key(self.keys.deadlines(p))
                    .arg(id.as_str()),
            )
            .await?;
        let (status, rest) = split_reply(v)?;
        Ok(match status.as_str() {
            "NOT_FOUND" => HeartbeatOutcome::NotFound,
            "OK" => HeartbeatOutcome::Extended(record(rest)?),
            "SETTLED" => HeartbeatOutcome::Settled(record(rest)?),
            other => return Err(StoreError::Protocol(format!("heartbeat: {other}"))),
        })
    }

    async fn get(&self, id: &PromiseId) -> Result<Option<Promise>, StoreError> {
        let mut conn = self.conn().await?;
        let m: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.keys.promise(id))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if m.is_empty() {
            return Ok(None);
        }
        Ok(Some(Promise::from_fields(&m)?))
    }

    async fn search(&self, q: &SearchQuery) -> Result<SearchPage, StoreError> {
        // Cursor: which node (on a cluster, the index into its primaries in
        // address order; else 0), its SCAN cursor, and how many matches of
        // that batch were already returned, so a batch larger than the page
        // is never skipped. A failover between pages may repeat or skip
        // promises of the nodes that changed.
        let (mut node, mut scan, mut skip) = match &q.cursor {
            None => (0usize, 0u64, 0usize),
            Some(c) => decode_cursor(c).ok_or(StoreError::InvalidCursor)?,
        };
        let nodes = self.scan_nodes().await?;
        let pattern = self
            .keys
            .promise_pattern(if q.id.is_empty() { "*" } else { &q.id });
        let limit = q.limit.max(1);
        let mut conn = self.conn().await?;
        let mut out = Vec::new();
        let mut unreadable = 0;
        while let Some(address) = nodes.get(node) {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(scan)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500);
            let (next, mut batch): (u64, Vec<String>) = conn
                .query_on_address(address.as_ref().map(|(h, p)| (h.as_str(), *p)), &cmd)
                .await
                .map_err(|e| {
                    if e.to_string().contains("invalid cursor") {
                        StoreError::InvalidCursor
                    } else {
                        unavailable(e)
                    }
                })?;
            batch.sort();
            let mut matched = Vec::new();
            for key in batch {
                let m: HashMap<String, String> = redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                if m.is_empty() {
                    continue; // expired between SCAN and HGETALL
                }
                let p = match Promise::from_fields(&m) {
                    Ok(p) => p,
                    Err(e) => {
                        unreadable_record(&key, &e);
                        unreadable += 1;
                        continue;
                    }
                };
                let state_ok = q.states.as_ref().is_none_or(|s| s.contains(&p.state));
                let tags_ok = q.tags.iter().all(|(k, v)| p.tags.get(k) == Some(v));
                let job_ok = q.job_id.is_none_or(|j| p.job_id == Some(j));
                let ws_ok = q.workspace.as_ref().is_none_or(|w| &p.workspace == w);
                if state_ok && tags_ok && job_ok && ws_ok {
                    matched.push(p);
                }
            }
            let room = limit - out.len();
            let available = matched.len().saturating_sub(skip);
            if available > room {
                out.extend(matched.into_iter().skip(skip).take(room));
                return Ok(SearchPage {
                    promises: out,
                    cursor: Some(encode_cursor(node, scan, skip + room)),
                    unreadable,
                });
            }
            out.extend(matched.into_iter().skip(skip));
            skip = 0;
            scan = next;
            if scan == 0 {
                node += 1;
            }
            if out.len() == limit && node < nodes.len() {
                return Ok(SearchPage {
                    promises: out,
                    cursor: Some(encode_cursor(node, scan, 0)),
                    unreadable,
                });
            }
        }
        Ok(SearchPage {
            promises: out,
            cursor: None,
            unreadable,
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

impl RedisStore {
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

impl RedisStore {
    /// Takes due members of a schedule and leases them (`claim.lua`).
    async fn claim(
        &self,
        schedule: String,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn().await?;
        self.scripts
            .claim
            .key(schedule)
            .arg(limit)
            .arg(millis(lease))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    /// Moves a member still in a schedule to `delay` from now (`reschedule.lua`).
    async fn reschedule(
        &self,
        schedule: String,
        member: &str,
        delay: Duration,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: i64 = self
            .scripts
            .reschedule
            .key(schedule)
            .arg(member)
            .arg(millis(delay))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The keys of `settle_record` (common.lua), in its order. The last is
    /// this minute's settlement counts (by this process's clock: a skew
    /// between hosts moves a count to a neighbouring minute, nothing more).
    fn settle_keys(&self, id: &PromiseId) -> [String; 9] {
        let p = self.keys.partition(id);
        let minute = chrono::Utc::now().timestamp().div_euclid(60);
        [
            self.keys.promise(id),
            self.keys.deadlines(p),
            self.keys.outbox(p),
            self.keys.runs(p),
            self.keys.polls(p),
            self.keys.cancels(p),
            self.keys.pending_by_second(p),
            self.keys.pending_seconds(p),
            self.keys.settled_in_minute(p, minute),
        ]
    }
}

impl Lifecycle for RedisStore {
    fn partitions(&self) -> u32 {
        self.keys.partitions()
    }

    async fn due_deadlines(
        &self,
        partition: u32,
        limit: usize,
    ) -> Result<Vec<PromiseId>, StoreError> {
        let mut conn = self.conn().await?;
        let v: Vec<String> = self
            .scripts
            .due
            .key(self.keys.deadlines(partition))
            .arg(limit)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(ids(v))
    }

    async fn expire(&self, id: &PromiseId) -> Result<ExpireOutcome, StoreError> {
        let mut inv = Call::new(&self.scripts.expire);
        for k in self.settle_keys(id) {
            inv.key(k);
        }
        inv.arg(id.as_str()).arg(self.retention_ms);
        let v = self.transition(&inv).await?;
        let (status, rest) = split_reply(v)?;
        Ok(match status.as_str() {
            "TIMEDOUT" => {
                let p = record(rest)?;
                count_settled(&p);
                ExpireOutcome::TimedOut(Box::new(p))
            }
            "NOT_DUE" => ExpireOutcome::NotDue,
            "SETTLED" | "GONE" => ExpireOutcome::Settled,
            other => return Err(StoreError::Protocol(format!("expire: {other}"))),
        })
    }

    async fn claim_polls(
        &self,
        partition: u32,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<PromiseId>, StoreError> {
        Ok(ids(self
            .claim(self.keys.polls(partition), limit, lease)
            .await?))
    }

    async fn reschedule_poll(&self, id: &PromiseId, delay: Duration) -> Result<(), StoreError> {
        self.reschedule(self.keys.polls(self.keys.partition(id)), id.as_str(), delay)
            .await
    }

    async fn claim_cancels(
        &self,
        partition: u32,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<PendingCancel>, StoreError> {
        let v = self
            .claim(self.keys.cancels(partition), limit, lease)
            .await?;
        Ok(v.into_iter()
            .filter_map(|member| {
                let (run, ws) = member.split_once(':')?;
                let run = RunId::parse(run).ok()?;
                Some(PendingCancel {
                    partition,
                    workspace: ws.to_owned(),
                    run,
                    member,
                })
            })
            .collect())
    }

    async fn reschedule_cancel(
        &self,
        c: &PendingCancel,
        delay: Duration,
    ) -> Result<(), StoreError> {
        self.reschedule(self.keys.cancels(c.partition), &c.member, delay)
            .await
    }

    async fn cancel_done(&self, c: &PendingCancel) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: i64 = redis::cmd("ZREM")
            .arg(self.keys.cancels(c.partition))
            .arg(&c.member)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn poll_run_now(&self, run: RunId) -> Result<Option<PromiseId>, StoreError> {
        // The run index is per partition and the run id does not say which:
        // one HGET per partition, sent together.
        let found = self
            .per_partition(|p, pipe| {
                pipe.hget(self.keys.runs(p), run.get());
            })
            .await?;
        let Some(id) = found
            .into_iter()
            .flatten()
            .find_map(|v| redis::from_redis_value::<Option<String>>(v).ok().flatten())
        else {
            return Ok(None);
        };
        let id = PromiseId::parse(&id).map_err(|e| StoreError::Protocol(e.to_string()))?;
        self.reschedule_poll(&id, Duration::ZERO).await?;
        Ok(Some(id))
    }
}

/// Partition leases (see `partitions`): one key each, one script call.
impl Leases for RedisStore {
    async fn announce(
        &self,
        member: &str,
        ttl: Duration,
        holding: usize,
    ) -> Result<Membership, StoreError> {
        let mut conn = self.conn().await?;
        let (live, fewest): (usize, usize) = self
            .scripts
            .announce
            .key(self.keys.members())
            .key(self.keys.members_owned())
            .arg(member)
            .arg(millis(ttl).max(1))
            .arg(holding)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(Membership { live, fewest })
    }

    async fn leave(&self, member: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: (i64, i64) = self
            .scripts
            .announce
            .key(self.keys.members())
            .key(self.keys.members_owned())
            .arg(member)
            .arg("leave")
            .arg(0)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn hold(&self, partition: u32, member: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let held: i64 = self
            .scripts
            .lease
            .key(self.keys.lease(partition))
            .arg(member)
            .arg(millis(ttl).max(1))
            .arg("hold")
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(held == 1)
    }

    async fn release(&self, partition: u32, member: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: i64 = self
            .scripts
            .lease
            .key(self.keys.lease(partition))
            .arg(member)
            .arg(0)
            .arg("release")
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

/// The shared Databricks request budget (see `databricks::RateBudget`).
impl RateBudget for RedisStore {
    fn try_acquire(
        &self,
        workspace: &str,
        class: CallClass,
        rate: f64,
        burst: u32,
    ) -> Pin<Box<dyn Future<Output = Result<Duration, String>> + Send + '_>> {
        let bucket = self.keys.budget(workspace, class.as_str());
        let pause = self.keys.budget_pause(workspace);
        Box::pin(async move {
            let mut conn = self.conn().await.map_err(|e| e.to_string())?;
            let wait: i64 = self
                .scripts
                .budget
                .key(bucket)
                .key(pause)
                .arg(rate)
                .arg(burst.max(1))
                .invoke_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Duration::from_millis(u64::try_from(wait).unwrap_or(0)))
        })
    }

    fn pause(
        &self,
        workspace: &str,
        d: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        let key = self.keys.budget_pause(workspace);
        Box::pin(async move {
            let mut conn = self.conn().await.map_err(|e| e.to_string())?;
            // Never shorten a longer pause another worker already set.
            let ms = millis(d).max(1);
            let current: i64 = redis::cmd("PTTL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            if current < i64::try_from(ms).unwrap_or(i64::MAX) {
                let _: () = redis::cmd("SET")
                    .arg(&key)
                    .arg("1")
                    .arg("PX")
                    .arg(ms)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        })
    }
}

/// Far above any SCAN batch of `COUNT 500` (Redis may return more than
/// COUNT, never millions).
const MAX_CURSOR_SKIP: usize = 1 << 24;

fn encode_cursor(node: usize, scan: u64, skip: usize) -> String {
    URL_SAFE_NO_PAD.encode(format!("{scan}:{skip}:{node}"))
}

/// `scan:skip[:node]` (cursors of one Redis, from before clusters, have no node).
fn decode_cursor(c: &str) -> Option<(usize, u64, usize)> {
    let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(c).ok()?).ok()?;
    let mut parts = raw.split(':');
    let scan = parts.next()?.parse().ok()?;
    let skip = parts.next()?.parse().ok()?;
    let node = match parts.next() {
        Some(n) => n.parse().ok()?,
        None => 0,
    };
    // A page holds at most 1,000 promises, so no cursor this store hands
    // out skips more than one SCAN batch could give; a bigger number is forged.
    (parts.next().is_none() && skip <= MAX_CURSOR_SKIP).then_some((node, scan, skip))
}

/// The primaries that serve slots, from `CLUSTER NODES`, in address order
/// (so a search cursor's node index means the same node on the next page).
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

impl RedisOutbox {
    async fn ensure_groups(&mut self) -> Result<(), StoreError> {
        for p in 0..self.store.keys.partitions() {
            // From 0, not $: entries written before the group existed are announced too.
            let r: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(self.store.keys.outbox(p))
                .arg(&self.group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut self.conn)
                .await;
            match r {
                Ok(()) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(unavailable(e)),
            }
        }
        self.groups_ready = true;
        Ok(())
    }

    fn entry(&self, partition: u32, s: StreamId) -> OutboxEntry {
        let fields: HashMap<String, String> = s
            .map
            .into_iter()
            .filter_map(|(k, v)| redis::from_redis_value::<String>(v).ok().map(|v| (k, v)))
            .collect();
        OutboxEntry {
            partition,
            entry_id: s.id,
            promise: Promise::from_fields(&fields),
        }
    }

    fn partition_of(&self, key: &str) -> Option<u32> {
        (0..self.store.keys.partitions()).find(|p| self.store.keys.outbox(*p) == key)
    }

    /// `cmd` in a pipeline, followed by the store's `WAIT` if it has one.
    fn with_wait(&self, cmd: redis::Cmd) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        if let Some(w) = self.store.wait_cmd() {
            pipe.add_command(w);
        }
        pipe
    }

    /// `XREADGROUP` of new entries of these partitions' streams.
    fn read_cmd(&self, partitions: &[u32], count: usize, block: Option<Duration>) -> redis::Cmd {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count);
        if let Some(b) = block {
            cmd.arg("BLOCK").arg(b.as_millis() as u64);
        }
        cmd.arg("STREAMS");
        for p in partitions {
            cmd.arg(self.store.keys.outbox(*p));
        }
        for _ in partitions {
            cmd.arg(">");
        }
        cmd
    }

    async fn retry_groups<T>(&mut self, r: redis::RedisResult<T>) -> Result<T, StoreError> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                // A Redis that lost its data (or a stream deleted by hand) has no
                // group: recreate it on the next round.
                if e.code() == Some("NOGROUP") {
                    self.groups_ready = false;
                }
                Err(unavailable(e))
            }
        }
    }
}

impl Outbox for RedisOutbox {
    /// On one Redis: one `XREADGROUP` over the partitions' streams, blocking
    /// up to `block`. On a cluster the streams live on different primaries
    /// and one command cannot name them all (CROSSSLOT), so each partition
    /// is read on its own, without blocking (a blocked read would hold up
    /// the node's shared connection), and an empty round waits
    /// [`CLUSTER_IDLE_POLL`] (at most `block`) before returning.
    async fn read_new(
        &mut self,
        partitions: &[u32],
        count: usize,
        block: Duration,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        if !self.groups_ready {
            self.ensure_groups().await?;
        }
        if partitions.is_empty() {
            tokio::time::sleep(block).await;
            return Ok(Vec::new());
        }
        // Each read is followed in its pipeline by the WAIT, if any (see
        // below).
        let replies = if self.store.is_cluster() {
            try_join_all(partitions.iter().map(|p| {
                let pipe = self.with_wait(self.read_cmd(&[*p], count, None));
                let mut conn = self.conn.clone();
                async move { pipe.query_async::<Vec<Value>>(&mut conn).await }
            }))
            .await
        } else {
            let pipe = self.with_wait(self.read_cmd(partitions, count, Some(block)));
            pipe.query_async::<Vec<Value>>(&mut self.conn)
                .await
                .map(|r| vec![r])
        };
        let replies = self.retry_groups(replies).await?;
        let mut out = Vec::new();
        for reply in replies {
            let mut reply = reply.into_iter();
            let read: Option<StreamReadReply> = reply
                .next()
                .map(redis::from_redis_value)
                .transpose()
                .map_err(|e| StoreError::Protocol(e.to_string()))?
                .flatten();
            let keys = read.map(|r| r.keys).unwrap_or_default();
            // With redis.wait_replicas, publish only settlements the replicas
            // have: a primary lost before replicating one would otherwise
            // leave an event for a settlement that no longer exists.
            // XREADGROUP is a write (it records the delivery), so the WAIT
            // after it covers everything it returned. Not replicated in time:
            // an error, and the entries come back through reclaim.
            if !keys.is_empty() && self.store.wait_replicas > 0 {
                self.store.check_replicated(reply.next())?;
            }
            for k in keys {
                let Some(p) = self.partition_of(&k.key) else {
                    continue;
                };
                for s in k.ids {
                    out.push(self.entry(p, s));
                }
            }
        }
        if out.is_empty() && self.store.is_cluster() {
            tokio::time::sleep(block.min(CLUSTER_IDLE_POLL)).await;
        }
        Ok(out)
    }

    async fn reclaim(
        &mut self,
        partitions: &[u32],
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        if !self.groups_ready {
            self.ensure_groups().await?;
        }
        let mut out = Vec::new();
        for &p in partitions {
            let start = self.reclaim_cursor[p as usize].clone();
            let mut cmd = redis::cmd("XAUTOCLAIM");
            cmd.arg(self.store.keys.outbox(p))
                .arg(&self.group)
                .arg(&self.consumer)
                .arg(min_idle.as_millis() as u64)
                .arg(start)
                .arg("COUNT")
                .arg(count);
            // Followed by the WAIT, as a read is (XAUTOCLAIM is a write too).
            let r = self
                .with_wait(cmd)
                .query_async::<Vec<Value>>(&mut self.conn)
                .await;
            let mut replies = self.retry_groups(r).await?.into_iter();
            let reply: StreamAutoClaimReply = replies
                .next()
                .map(redis::from_redis_value)
                .transpose()
                .map_err(|e| StoreError::Protocol(e.to_string()))?
                .ok_or_else(|| StoreError::Protocol("no reply to XAUTOCLAIM".into()))?;
            if !reply.claimed.is_empty() && self.store.wait_replicas > 0 {
                self.store.check_replicated(replies.next())?;
            }
            self.reclaim_cursor[p as usize] = reply.next_stream_id;
            for s in reply.claimed {
                out.push(self.entry(p, s));
            }
        }
        Ok(out)
    }

    async fn ack(&mut self, entry: &OutboxEntry, published: bool) -> Result<(), StoreError> {
        let mut inv = self.store.scripts.outbox_ack.prepare_invoke();
        inv.key(self.store.keys.outbox(entry.partition));
        // The promise notes when its event went out (if it is still there).
        match (&entry.promise, published) {
            (Ok(p), true) => inv.key(self.store.keys.promise(&p.id)),
            _ => &mut inv,
        };
        let _: i64 = inv
            .arg(&self.group)
            .arg(&entry.entry_id)
            .invoke_async(&mut self.conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip() {
        assert_eq!(
            decode_cursor(&encode_cursor(2, 1234, 7)),
            Some((2, 1234, 7))
        );
        // A cursor of one Redis from before clusters: node 0.
        let old = URL_SAFE_NO_PAD.encode("1234:7");
        assert_eq!(decode_cursor(&old), Some((0, 1234, 7)));
        assert_eq!(decode_cursor("!!"), None);
        assert_eq!(decode_cursor(&URL_SAFE_NO_PAD.encode("1:2:3:4")), None);
    }

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
