//! [`PromiseStore`] and [`Outbox`] on Redis, through deadpool-redis.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::pool::{Conn, Manager, Pool, Source};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{AsyncConnectionConfig, Script, Value};

use std::future::Future;
use std::pin::Pin;

use super::*;
use crate::databricks::{CallClass, RateBudget};
use crate::domain::promise::field;
use crate::keys::Keys;

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
        }
    }
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
    /// Follow a Sentinel deployment: its Sentinels' URLs and the master's
    /// name. `url` then gives only the master's password and database.
    pub sentinel: Option<SentinelSettings>,
    /// Replicas every transition must reach before it counts (`WAIT`); 0: none.
    pub wait_replicas: u64,
    pub wait_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct SentinelSettings {
    pub sentinels: Vec<String>,
    pub master: String,
}

#[derive(Clone)]
pub struct RedisStore {
    pool: Pool,
    source: Source,
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

/// The URL with any password replaced, for error messages and logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<unparseable url>".into(),
    }
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
        let source = match &s.sentinel {
            None => Source::Fixed(Box::new(client)),
            Some(sn) => {
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
        let store = Self {
            pool,
            source,
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

    /// With `redis.wait_replicas` above 0: waits (Redis `WAIT`) until what
    /// this connection wrote, the transition just made included, reached that
    /// many replicas, so a failover cannot lose it. If it did not within
    /// `wait_timeout`, the write still stands but the caller gets a retryable
    /// error, and its retry finds the write (every transition is idempotent).
    async fn replicated(&self, conn: &mut Conn) -> Result<(), StoreError> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        let n: u64 = redis::cmd("WAIT")
            .arg(self.wait_replicas)
            .arg(u64::try_from(self.wait_timeout.as_millis()).unwrap_or(u64::MAX))
            .query_async(conn)
            .await
            .map_err(unavailable)?;
        if n < self.wait_replicas {
            return Err(StoreError::Unavailable(format!(
                "written, but replicated to {n} of redis.wait_replicas = {} within {:?}",
                self.wait_replicas, self.wait_timeout
            )));
        }
        Ok(())
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        self.pool
            .get()
            .await
            .map(Conn::from_pool)
            .map_err(unavailable)
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
        let conn = self.source.connect(&cfg).await.map_err(unavailable)?;
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
        let mut conn = self.conn().await?;
        let mut total = 0u64;
        for p in 0..self.keys.partitions() {
            let n: u64 = redis::cmd("XLEN")
                .arg(self.keys.outbox(p))
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            total += n;
        }
        Ok(total)
    }

    /// Per partition: pending promises (the deadline set holds every pending
    /// one), how overdue the earliest deadline is, outbox entries, and the
    /// oldest outbox entry's age. Four cheap commands per partition, one
    /// pipeline; for the metrics gauges.
    pub async fn partition_stats(&self) -> Result<Vec<PartitionStats>, StoreError> {
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        for p in 0..self.keys.partitions() {
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
        }
        pipe.cmd("TIME");
        let mut replies: Vec<Value> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        let (secs, micros): (u64, u64) = replies
            .pop()
            .and_then(|t| redis::from_redis_value::<(u64, u64)>(t).ok())
            .unwrap_or_default();
        let now_ms = secs * 1000 + micros / 1000;
        let mut out = Vec::new();
        for (p, chunk) in replies.chunks(5).enumerate() {
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
    /// One pipelined round trip: per partition the pending count, the
    /// per-second pending counts and the outbox length, and the last 60
    /// minutes' settlement counts.
    async fn overview(&self) -> Result<Overview, StoreError> {
        let minute_now = chrono::Utc::now().timestamp().div_euclid(60);
        let minutes: Vec<i64> = (minute_now - 59..=minute_now).collect();
        let mut pipe = redis::pipe();
        for p in 0..self.keys.partitions() {
            pipe.cmd("ZCARD").arg(self.keys.deadlines(p));
            pipe.cmd("HGETALL").arg(self.keys.pending_by_second(p));
            pipe.cmd("XLEN").arg(self.keys.outbox(p));
            for m in &minutes {
                pipe.cmd("HGETALL").arg(self.keys.settled_in_minute(p, *m));
            }
        }
        pipe.cmd("TIME");
        let mut conn = self.conn().await?;
        let mut replies: Vec<Value> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        let (secs, _): (u64, u64) = replies
            .pop()
            .and_then(|t| redis::from_redis_value(t).ok())
            .unwrap_or_default();
        let mut out = Overview {
            settled_per_minute: vec![BTreeMap::new(); minutes.len()],
            ..Default::default()
        };
        let mut by_second: BTreeMap<u64, u64> = BTreeMap::new();
        for chunk in replies.chunks(3 + minutes.len()) {
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
        let mut inv = self.scripts.create.prepare_invoke();
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
        let mut conn = self.conn().await?;
        let v: Value = inv.invoke_async(&mut conn).await.map_err(unavailable)?;
        self.replicated(&mut conn).await?;
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
        let mut conn = self.conn().await?;
        let v: Value = self
            .scripts
            .record_run
            .key(self.keys.promise(id))
            .key(self.keys.runs(p))
            .key(self.keys.polls(p))
            .key(self.keys.cancels(p))
            .arg(run.get())
            .arg(run_page_url.unwrap_or(""))
            .arg(id.as_str())
            .arg(self.first_poll_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        self.replicated(&mut conn).await?;
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
        let mut inv = self.scripts.settle.prepare_invoke();
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
        let mut conn = self.conn().await?;
        let v: Value = inv.invoke_async(&mut conn).await.map_err(unavailable)?;
        self.replicated(&mut conn).await?;
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
        let mut conn = self.conn().await?;
        let v: Value = self
            .scripts
            .heartbeat
            .key(self.keys.promise(id))
            .key(self.keys.deadlines(p))
            .arg(id.as_str())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        self.replicated(&mut conn).await?;
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
        // Cursor: SCAN cursor plus how many matches of that batch were already
        // returned, so a batch larger than the page is never skipped.
        let (mut scan, mut skip) = match &q.cursor {
            None => (0u64, 0usize),
            Some(c) => decode_cursor(c).ok_or_else(|| StoreError::Protocol("bad cursor".into()))?,
        };
        let pattern = self
            .keys
            .promise_pattern(if q.id.is_empty() { "*" } else { &q.id });
        let limit = q.limit.max(1);
        let mut conn = self.conn().await?;
        let mut out = Vec::new();
        loop {
            let (next, mut batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(scan)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
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
                let p = Promise::from_fields(&m)?;
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
                let cursor = encode_cursor(scan, skip + room);
                return Ok(SearchPage {
                    promises: out,
                    cursor: Some(cursor),
                });
            }
            out.extend(matched.into_iter().skip(skip));
            skip = 0;
            scan = next;
            if scan == 0 {
                return Ok(SearchPage {
                    promises: out,
                    cursor: None,
                });
            }
            if out.len() == limit {
                return Ok(SearchPage {
                    promises: out,
                    cursor: Some(encode_cursor(scan, 0)),
                });
            }
        }
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
        let mut inv = self.scripts.expire.prepare_invoke();
        for k in self.settle_keys(id) {
            inv.key(k);
        }
        inv.arg(id.as_str()).arg(self.retention_ms);
        let mut conn = self.conn().await?;
        let v: Value = inv.invoke_async(&mut conn).await.map_err(unavailable)?;
        self.replicated(&mut conn).await?;
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
        // one HGET per partition, in one pipeline.
        let mut pipe = redis::pipe();
        for p in 0..self.keys.partitions() {
            pipe.hget(self.keys.runs(p), run.get());
        }
        let mut conn = self.conn().await?;
        let found: Vec<Option<String>> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        let Some(id) = found.into_iter().flatten().next() else {
            return Ok(None);
        };
        let id = PromiseId::parse(&id).map_err(|e| StoreError::Protocol(e.to_string()))?;
        self.reschedule_poll(&id, Duration::ZERO).await?;
        Ok(Some(id))
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

fn encode_cursor(scan: u64, skip: usize) -> String {
    URL_SAFE_NO_PAD.encode(format!("{scan}:{skip}"))
}

fn decode_cursor(c: &str) -> Option<(u64, usize)> {
    let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(c).ok()?).ok()?;
    let (a, b) = raw.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// One relay's view of the outbox streams (a consumer in one group).
pub struct RedisOutbox {
    conn: MultiplexedConnection,
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
    async fn read_new(
        &mut self,
        count: usize,
        block: Duration,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        if !self.groups_ready {
            self.ensure_groups().await?;
        }
        let keys: Vec<String> = (0..self.store.keys.partitions())
            .map(|p| self.store.keys.outbox(p))
            .collect();
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&keys);
        for _ in &keys {
            cmd.arg(">");
        }
        let r: redis::RedisResult<Option<StreamReadReply>> = cmd.query_async(&mut self.conn).await;
        let reply = self.retry_groups(r).await?;
        let mut out = Vec::new();
        for k in reply.map(|r| r.keys).unwrap_or_default() {
            let Some(p) = self.partition_of(&k.key) else {
                continue;
            };
            for s in k.ids {
                out.push(self.entry(p, s));
            }
        }
        Ok(out)
    }

    async fn reclaim(
        &mut self,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        if !self.groups_ready {
            self.ensure_groups().await?;
        }
        let mut out = Vec::new();
        for p in 0..self.store.keys.partitions() {
            let start = self.reclaim_cursor[p as usize].clone();
            let r: redis::RedisResult<StreamAutoClaimReply> = redis::cmd("XAUTOCLAIM")
                .arg(self.store.keys.outbox(p))
                .arg(&self.group)
                .arg(&self.consumer)
                .arg(min_idle.as_millis() as u64)
                .arg(start)
                .arg("COUNT")
                .arg(count)
                .query_async(&mut self.conn)
                .await;
            let reply = self.retry_groups(r).await?;
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
        assert_eq!(decode_cursor(&encode_cursor(1234, 7)), Some((1234, 7)));
        assert_eq!(decode_cursor("!!"), None);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("redis://:hunter2@127.0.0.1:6379/0"),
            "redis://:***@127.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
