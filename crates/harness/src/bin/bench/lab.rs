//! The bench's environment: its settings, the child processes it starts
//! (emulator, worker, sidecar), publishing, and the RabbitMQ and Redis
//! helpers the scenarios share.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::{StreamExt, stream};
use runbridge::broker::{Broker, BrokerSettings};
use runbridge::config::Settings;
use runbridge::domain::{CallbackSigner, Promise, PromiseId, RunId};
use runbridge::store::{CreateOutcome, NewPromise, PromiseStore, RedisStore, Timeout};
use runbridge_testkit::free_port;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

pub(crate) struct Env {
    pub(crate) bin: PathBuf,
    pub(crate) config_dir: PathBuf,
    pub(crate) logs: PathBuf,
    pub(crate) run_id: String,
    pub(crate) vhost: String,
    pub(crate) redis_url: String,
}

impl Env {
    pub(crate) fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.vhost)
    }

    /// Settings as a runbridge process of scenario `tag` sees them.
    /// What sets scenario `tag` apart: its Redis prefix and broker names.
    pub(crate) fn overrides(&self, tag: &str) -> Vec<(&'static str, String)> {
        vec![
            ("redis.url", self.redis_url.clone()),
            ("redis.key_prefix", format!("{}-{tag}", self.run_id)),
            ("amqp.url", self.amqp_url()),
            ("amqp.triggers_queue", format!("{tag}.triggers")),
            ("amqp.dead_letter_queue", format!("{tag}.triggers.dead")),
            ("amqp.dead_letter_exchange", format!("{tag}.dlx")),
            ("amqp.events_exchange", format!("{tag}.events")),
            ("amqp.control_queue", format!("{tag}.control")),
        ]
    }

    pub(crate) fn settings(&self, tag: &str, extra: &[(&str, String)]) -> Result<Settings> {
        let mut o: Vec<(&str, String)> = self.overrides(tag);
        o.extend(extra.iter().cloned());
        Ok(Settings::load_from(&self.config_dir, "local", &o)?)
    }

    /// The same settings as environment variables for a child process
    /// (`section.key` is `RUNBRIDGE__SECTION__KEY`).
    pub(crate) fn child_env(
        &self,
        tag: &str,
        emulator: Option<u16>,
        extra: &[(&str, &str)],
    ) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            ("RUNBRIDGE_ENV".into(), "local".into()),
            (
                "RUNBRIDGE_CONFIG_DIR".into(),
                self.config_dir.display().to_string(),
            ),
        ];
        env.extend(self.overrides(tag).into_iter().map(|(k, v)| {
            (
                format!("RUNBRIDGE__{}", k.replace('.', "__").to_uppercase()),
                v,
            )
        }));
        env.extend([
            // The emulator is the only Databricks here; no request budget.
            (
                "RUNBRIDGE__DATABRICKS__LAUNCH_PER_SECOND".into(),
                "0".into(),
            ),
            ("RUNBRIDGE__DATABRICKS__POLL_PER_SECOND".into(), "0".into()),
            (
                "RUNBRIDGE__DATABRICKS__CANCEL_PER_SECOND".into(),
                "0".into(),
            ),
            ("DATABRICKS_TOKEN".into(), "dapi-bench".into()),
            ("RUST_LOG".into(), "warn".into()),
            // Every notebook of a scenario calls from this one address, as
            // a workspace behind one NAT address would: the sidecar's
            // per-address share is not what the scenarios measure.
            (
                "RUNBRIDGE__SIDECAR__MAX_CONNECTIONS_PER_CLIENT".into(),
                "1024".into(),
            ),
        ]);
        if let Some(p) = emulator {
            env.push(("DATABRICKS_HOST".into(), format!("http://127.0.0.1:{p}")));
        }
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    }

    pub(crate) fn spawn(
        &self,
        name: &str,
        args: &[&str],
        env: &[(String, String)],
    ) -> Result<Child> {
        let log = std::fs::File::create(self.logs.join(format!("{name}.log")))?;
        Command::new(&self.bin)
            .args(args)
            .envs(env.iter().cloned())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} {args:?}", self.bin.display()))
    }
}

/// Waits for a listener the bench started (20 s: a release build starts in
/// well under one).
pub(crate) async fn wait_port(port: u16, what: &str) -> Result<()> {
    runbridge_testkit::wait_port(port, Duration::from_secs(20), what).await
}

/// An emulator child process; `launch_latency_ms` is added to every run-now.
pub(crate) async fn emulator(env: &Env, tag: &str, launch_latency_ms: u64) -> Result<(Child, u16)> {
    let port = free_port();
    let child = env.spawn(
        &format!("{tag}-emulator"),
        &[
            "emulate",
            "--listen",
            &format!("127.0.0.1:{port}"),
            // Job 1: stays RUNNING, never calls back (the trigger path alone).
            "--job",
            "1:never_finish:0",
            "--launch-latency-ms",
            &launch_latency_ms.to_string(),
        ],
        &env.child_env(tag, None, &[]),
    )?;
    wait_port(port, "emulator").await?;
    Ok((child, port))
}

pub(crate) async fn emulator_runs(client: &reqwest::Client, port: u16) -> Result<u64> {
    let v: Value = client
        .get(format!("http://127.0.0.1:{port}/emulator/stats"))
        .send()
        .await?
        .json()
        .await?;
    Ok(v["runs"].as_u64().unwrap_or(0))
}

/// Publishes `bodies` to the triggers queue of `bs`, confirms pipelined.
pub(crate) async fn publish_all(bs: &BrokerSettings, bodies: Vec<Vec<u8>>) -> Result<()> {
    let b = Broker::connect(bs).await?;
    b.declare_topology().await?;
    let p = Arc::new(b.publisher().await?);
    let results: Vec<_> = stream::iter(bodies)
        .map(|body| {
            let p = p.clone();
            async move { p.publish_trigger(&body, None, None, None).await }
        })
        .buffer_unordered(512)
        .collect()
        .await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    b.close().await;
    if failed > 0 {
        bail!("{failed} triggers were not confirmed by the broker");
    }
    Ok(())
}

pub(crate) fn trigger_bodies(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            serde_json::to_vec(&json!({
                "id": format!("{prefix}-{i:07}"),
                "job_id": 1,
                "timeout_seconds": 3600,
                "tags": {"bench": prefix},
            }))
            .unwrap_or_default()
        })
        .collect()
}

pub(crate) async fn raw_channel(url: &str) -> Result<(lapin::Connection, lapin::Channel)> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    Ok((conn, ch))
}

/// Ready messages and consumers of a queue (passive declare).
pub(crate) async fn queue_state(ch: &lapin::Channel, queue: &str) -> Result<(u32, u32)> {
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?;
    Ok((q.message_count(), q.consumer_count()))
}

pub(crate) async fn stop(c: &mut Child) {
    if let Some(pid) = c.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    if tokio::time::timeout(Duration::from_secs(30), c.wait())
        .await
        .is_err()
    {
        let _ = c.start_kill();
    }
}

/// `n` pending promises with run ids, created through the store as the
/// worker would; returns them as created (recording the run changes
/// nothing a bench reads of them), in order.
pub(crate) async fn pending_promises(
    store: &RedisStore,
    prefix: &str,
    n: usize,
    timeout: Timeout,
) -> Result<Vec<Promise>> {
    let ids: Vec<PromiseId> = (0..n)
        .map(|i| PromiseId::parse(&format!("{prefix}-{i:07}")))
        .collect::<Result<_, _>>()?;
    let results: Vec<Result<Promise>> = stream::iter(ids.iter().enumerate())
        .map(|(i, id)| async move {
            let (CreateOutcome::Created(p) | CreateOutcome::Existing(p)) =
                store.create(&new_promise(id, timeout)).await?;
            store
                .record_run(id, RunId::new(1_000_000 + i as u64)?, None)
                .await?;
            Ok(p)
        })
        .buffered(256)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Each promise's capability token (bound to its creation time, so read
/// from the store: for promises something else created), in the order of
/// `ids`; `None` for one not found.
pub(crate) async fn callback_tokens(
    store: &RedisStore,
    signer: &CallbackSigner,
    ids: &[PromiseId],
) -> Result<Vec<Option<String>>> {
    let found: Vec<Result<Option<String>>> = stream::iter(ids)
        .map(|id| async move {
            Ok(store
                .get(id)
                .await?
                .map(|p| p.callback_token(signer).expose().to_owned()))
        })
        .buffered(256)
        .collect()
        .await;
    found.into_iter().collect()
}

pub(crate) fn new_promise(id: &PromiseId, timeout: Timeout) -> NewPromise {
    NewPromise {
        job_id: Some(1),
        ..NewPromise::bare(id.clone(), timeout, "default")
    }
}

pub(crate) async fn delete_keys(url: &str, pattern: &str) -> Result<()> {
    let client = redis::Client::open(url)?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut c)
            .await?;
        if !keys.is_empty() {
            let _: () = redis::cmd("UNLINK").arg(&keys).query_async(&mut c).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// Waits until `worker` consumes `queue` (its consumer appears), within
/// `limit`: the moment a drain's clock starts.
pub(crate) async fn consuming(
    worker: &mut Child,
    ch: &lapin::Channel,
    queue: &str,
    limit: std::time::Instant,
) -> Result<std::time::Instant> {
    loop {
        if std::time::Instant::now() > limit {
            bail!("the worker never started consuming {queue} (see its log)");
        }
        if let Ok(Some(status)) = worker.try_wait() {
            bail!("the worker exited: {status}");
        }
        if matches!(queue_state(ch, queue).await, Ok((_, c)) if c > 0) {
            return Ok(std::time::Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until `queue` is empty and the emulator (or responder) on
/// `port` holds `n` runs, within `limit`.
pub(crate) async fn drained(
    ch: &lapin::Channel,
    queue: &str,
    http: &reqwest::Client,
    port: u16,
    n: usize,
    limit: std::time::Instant,
) -> Result<()> {
    loop {
        if std::time::Instant::now() > limit {
            bail!("{n} triggers of {queue} were not drained in time");
        }
        let (ready, _) = queue_state(ch, queue).await?;
        if ready == 0 && emulator_runs(http, port).await? >= n as u64 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
