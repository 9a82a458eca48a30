//! `make bench`: runbridge measured against baselines taken in the same run,
//! on the same RabbitMQ, Redis and emulator (bench/README.md).
//!
//! Absolute numbers on a shared 2-core machine drift from run to run; each
//! scenario therefore measures its own baseline right beside runbridge and
//! reports the ratio. runbridge runs as it does in production: `runbridge
//! worker`, `runbridge sidecar` and `runbridge emulate` as child processes of
//! the binary next to this one (build both with `--release`).
//!
//! The baselines speak lapin, redis and axum directly. That is the point of a
//! baseline (the least a bridge could do with the same services), so this
//! binary is the one place outside `broker`/`store`/`sidecar` that imports
//! those crates (ARCHITECTURE.md).
//!
//! Scenarios (ids as in bench/results.md): B1 trigger throughput, B2 latency hiding,
//! B3 settle throughput, B4 settle → event latency, B5 Redis memory per
//! pending promise, B6 worker RSS with 10,000 promises in flight, B7 deadline
//! sweep cost with 1,000,000 pending. `--smoke` runs every scenario with a
//! few hundred messages, to keep the harness working (`make test`); its
//! numbers mean nothing and nothing asserts on timings.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use futures_util::{StreamExt, stream};
use runbridge::broker::{Broker, BrokerSettings};
use runbridge::config::Settings;
use runbridge::domain::{Payload, PromiseId, RunId};
use runbridge::reconciler::Reconciler;
use runbridge::store::{Lifecycle, NewPromise, PromiseStore, RedisStore, Timeout};
use runbridge_harness::{config_dir, rss_kib, runbridge_bin};
use runbridge_testkit::{RedisServer, free_port, rabbitmqctl};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

#[derive(Parser, Debug)]
#[command(about = "runbridge benchmarks, each against a baseline measured in the same run")]
struct Args {
    /// A few hundred messages per scenario: checks the harness, measures nothing.
    #[arg(long)]
    smoke: bool,
    /// Where results.json, results.md and latency.svg go.
    #[arg(long, default_value = "bench")]
    out: PathBuf,
    /// Only these scenarios, e.g. `B1,B4`.
    #[arg(long)]
    only: Option<String>,
    /// The runbridge binary (default: next to this one).
    #[arg(long)]
    bin: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// B3's baseline: an axum handler doing one Redis SET per request.
    BaselineServer {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        redis_url: String,
    },
}

/// Sizes of one profile.
struct Sizes {
    b1_triggers: usize,
    b2_triggers: usize,
    b3_resolves: usize,
    b4_rate: u64,
    b4_seconds: u64,
    b5_promises: usize,
    b7_pending: usize,
    /// Rounds of B1 and B3 (runbridge, then its baseline); the round with
    /// the median ratio is reported. The machine's noise moves one round's
    /// ratio by ±0.07.
    rounds: usize,
}

impl Sizes {
    fn full() -> Self {
        Self {
            b1_triggers: 20_000,
            b2_triggers: 10_000,
            b3_resolves: 20_000,
            b4_rate: 1_000,
            b4_seconds: 30,
            b5_promises: 10_000,
            b7_pending: 1_000_000,
            rounds: 3,
        }
    }
    fn smoke() -> Self {
        Self {
            b1_triggers: 300,
            b2_triggers: 300,
            b3_resolves: 300,
            b4_rate: 100,
            b4_seconds: 2,
            b5_promises: 300,
            b7_pending: 3_000,
            rounds: 1,
        }
    }
}

/// One row of the results table.
#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    id: &'static str,
    scenario: String,
    runbridge: f64,
    baseline: Option<f64>,
    unit: &'static str,
    /// runbridge / baseline (or the absolute figure when there is no baseline).
    ratio: Option<f64>,
    target: String,
    met: bool,
    notes: String,
}

/// Latency samples for the chart, in milliseconds.
#[derive(Default)]
struct Curves(Vec<(String, Vec<f64>)>);

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.cmd {
        Some(Cmd::BaselineServer {
            ref listen,
            ref redis_url,
        }) => rt.block_on(baseline_server(listen, redis_url)),
        None => rt.block_on(run(&args)),
    }
}

// ---------------------------------------------------------------------------
// Environment: settings, child processes, services.

struct Env {
    bin: PathBuf,
    config_dir: PathBuf,
    logs: PathBuf,
    run_id: String,
    vhost: String,
    redis_url: String,
}

impl Env {
    fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.vhost)
    }

    /// Settings as a runbridge process of scenario `tag` sees them.
    /// What sets scenario `tag` apart: its Redis prefix and broker names.
    fn overrides(&self, tag: &str) -> Vec<(&'static str, String)> {
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

    fn settings(&self, tag: &str, extra: &[(&str, String)]) -> Result<Settings> {
        let mut o: Vec<(&str, String)> = self.overrides(tag);
        o.extend(extra.iter().cloned());
        Ok(Settings::load_from(&self.config_dir, "local", &o)?)
    }

    /// The same settings as environment variables for a child process
    /// (`section.key` is `RUNBRIDGE__SECTION__KEY`).
    fn child_env(
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
        ]);
        if let Some(p) = emulator {
            env.push(("DATABRICKS_HOST".into(), format!("http://127.0.0.1:{p}")));
        }
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    }

    fn spawn(&self, name: &str, args: &[&str], env: &[(String, String)]) -> Result<Child> {
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
async fn wait_port(port: u16, what: &str) -> Result<()> {
    runbridge_testkit::wait_port(port, Duration::from_secs(20), what).await
}

/// An emulator child process; `launch_latency_ms` is added to every run-now.
async fn emulator(env: &Env, tag: &str, launch_latency_ms: u64) -> Result<(Child, u16)> {
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

async fn emulator_runs(client: &reqwest::Client, port: u16) -> Result<u64> {
    let v: Value = client
        .get(format!("http://127.0.0.1:{port}/emulator/stats"))
        .send()
        .await?
        .json()
        .await?;
    Ok(v["runs"].as_u64().unwrap_or(0))
}

// ---------------------------------------------------------------------------
// Publishing and raw AMQP helpers (the baselines' side).

/// Publishes `bodies` to the triggers queue of `bs`, confirms pipelined.
async fn publish_all(bs: &BrokerSettings, bodies: Vec<Vec<u8>>) -> Result<()> {
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

fn trigger_bodies(prefix: &str, n: usize) -> Vec<Vec<u8>> {
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

async fn raw_channel(url: &str) -> Result<(lapin::Connection, lapin::Channel)> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    Ok((conn, ch))
}

/// Ready messages and consumers of a queue (passive declare).
async fn queue_state(ch: &lapin::Channel, queue: &str) -> Result<(u32, u32)> {
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

// ---------------------------------------------------------------------------
// B1 / B2 / B6: the trigger path.

struct Drain {
    rate: f64,
    seconds: f64,
    peak_rss_kib: u64,
}

/// Pre-publishes `n` triggers, starts one `runbridge worker` with
/// `prefetch`, and times from its consumer's appearance until the queue is
/// empty and the emulator holds a run for each. Samples the worker's RSS
/// throughout and for `hold` afterwards (the reconciler then checks the
/// runs it just launched).
async fn drain_with_worker(
    env: &Env,
    tag: &str,
    n: usize,
    prefetch: u32,
    launch_latency_ms: u64,
    hold: Duration,
    extra_env: &[(&str, &str)],
) -> Result<Drain> {
    let (_emu, emu_port) = emulator(env, tag, launch_latency_ms).await?;
    let s = env.settings(tag, &[])?;
    let bs = runbridge::startup::broker_settings(&s, "bench");
    publish_all(&bs, trigger_bodies(&format!("{}-{tag}", env.run_id), n)).await?;
    let prefetch = prefetch.to_string();
    let mut vars = vec![("RUNBRIDGE__AMQP__PREFETCH", prefetch.as_str())];
    vars.extend_from_slice(extra_env);
    let mut worker = env.spawn(
        &format!("{tag}-worker"),
        &["worker"],
        &env.child_env(tag, Some(emu_port), &vars),
    )?;
    let pid = worker.id().unwrap_or(0);
    let (_conn, ch) = raw_channel(&env.amqp_url()).await?;
    let http = reqwest::Client::new();
    let peak = Arc::new(AtomicU64::new(0));
    let sampling = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Some(kb) = rss_kib(pid) {
                    peak.fetch_max(kb, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let limit = Instant::now() + Duration::from_secs(300);
    let start = loop {
        if Instant::now() > limit {
            bail!("{tag}: the worker never started consuming (see its log)");
        }
        if let Ok(Some(status)) = worker.try_wait() {
            bail!("{tag}: the worker exited: {status}");
        }
        if let Ok((_, consumers)) = queue_state(&ch, &bs.triggers_queue).await
            && consumers > 0
        {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    loop {
        if Instant::now() > limit {
            bail!("{tag}: the worker did not drain {n} triggers in 300 s");
        }
        let (ready, _) = queue_state(&ch, &bs.triggers_queue).await?;
        if ready == 0 && emulator_runs(&http, emu_port).await? >= n as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    tokio::time::sleep(hold).await;
    sampling.abort();
    stop(&mut worker).await;
    Ok(Drain {
        rate: n as f64 / seconds,
        seconds,
        peak_rss_kib: peak.load(Ordering::Relaxed),
    })
}

async fn stop(c: &mut Child) {
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

/// B1's baseline: a plain lapin consumer on a queue declared by the same
/// topology code (quorum, same arguments), same prefetch, that only acks.
async fn baseline_consumer(env: &Env, tag: &str, n: usize, prefetch: u16) -> Result<f64> {
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
    let s = env.settings(tag, &[])?;
    let bs = runbridge::startup::broker_settings(&s, "bench");
    publish_all(&bs, trigger_bodies(&format!("{}-{tag}", env.run_id), n)).await?;
    let (_conn, ch) = raw_channel(&env.amqp_url()).await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            bs.triggers_queue.as_str().into(),
            "baseline".into(),
            BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await?;
    let start = Instant::now();
    let mut acked = 0usize;
    while acked < n {
        let d = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await
            .context("baseline consumer stalled")?
            .context("baseline consumer ended")??;
        d.ack(BasicAckOptions::default()).await?;
        acked += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------
// B3 / B4: the settle path.

/// `n` pending promises with run ids, created through the store as the
/// worker would; returns their ids.
async fn pending_promises(
    store: &RedisStore,
    prefix: &str,
    n: usize,
    timeout: Timeout,
) -> Result<Vec<PromiseId>> {
    let ids: Vec<PromiseId> = (0..n)
        .map(|i| PromiseId::parse(&format!("{prefix}-{i:07}")))
        .collect::<Result<_, _>>()?;
    let results: Vec<Result<()>> = stream::iter(ids.iter().enumerate())
        .map(|(i, id)| async move {
            store.create(&new_promise(id, timeout)).await?;
            store
                .record_run(id, RunId::new(1_000_000 + i as u64)?, None)
                .await?;
            Ok(())
        })
        .buffer_unordered(256)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    Ok(ids)
}

fn new_promise(id: &PromiseId, timeout: Timeout) -> NewPromise {
    NewPromise {
        id: id.clone(),
        param: Payload::default(),
        timeout,
        tags: BTreeMap::new(),
        ikey_create: None,
        job_id: Some(1),
        workspace: "default".into(),
        reply_to: None,
        correlation_id: None,
        traceparent: None,
        heartbeat: None,
        cancel_on_timeout: false,
    }
}

/// Closed-loop load: `conns` keep-alive HTTP/1.1 connections, each sending
/// the next request as soon as the last was answered. Returns requests per
/// second and every request's latency (ms).
async fn closed_loop(urls: Arc<Vec<String>>, conns: usize) -> Result<(f64, Vec<f64>)> {
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let (urls, next, errors) = (urls.clone(), next.clone(), errors.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .http1_only()
                    .pool_max_idle_per_host(1)
                    .build()
                    .unwrap_or_default();
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(u) = urls.get(i) else { break };
                    let t = Instant::now();
                    match client.post(u).send().await {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.bytes().await;
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::with_capacity(urls.len());
    for t in tasks {
        all.extend(t.await?);
    }
    let rate = urls.len() as f64 / start.elapsed().as_secs_f64();
    let e = errors.load(Ordering::Relaxed);
    if e > 0 {
        bail!("{e} of {} requests failed", urls.len());
    }
    Ok((rate, all))
}

/// B3's baseline server (run as a child process, like the sidecar): the
/// least an HTTP settle endpoint could do, one `SET` per request on a shared
/// multiplexed connection (no pool checkout at all).
async fn baseline_server(listen: &str, redis_url: &str) -> Result<()> {
    use axum::extract::{Path as AxPath, State};
    use axum::http::StatusCode;
    use redis::AsyncCommands;
    let conn = redis::Client::open(redis_url)?
        .get_multiplexed_async_connection()
        .await?;
    let app = axum::Router::new()
        .route(
            "/cb/{token}/resolve",
            axum::routing::post(
                |State(mut c): State<redis::aio::MultiplexedConnection>,
                 AxPath(token): AxPath<String>| async move {
                    let r: redis::RedisResult<()> =
                        c.set(format!("bench-baseline:{token}"), "RESOLVED").await;
                    match r {
                        Ok(()) => (StatusCode::OK, "{\"state\":\"RESOLVED\"}"),
                        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "redis error"),
                    }
                },
            ),
        )
        .with_state(conn);
    let l = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(l, app).await?;
    Ok(())
}

/// One B3 round: the row, and the request latencies of runbridge and the baseline.
async fn b3(env: &Env, tag: &str, n: usize) -> Result<(Row, Vec<f64>, Vec<f64>)> {
    const CONNS: usize = 64;
    let s = env.settings(tag, &[])?;
    let store = runbridge::startup::store(&s).await?;
    let signer = runbridge::startup::signer(&s)?;
    let ids = pending_promises(
        &store,
        &format!("{}-{tag}", env.run_id),
        n,
        Timeout::After(Duration::from_secs(3600)),
    )
    .await?;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut sidecar = env.spawn(
        &format!("{tag}-sidecar"),
        &["sidecar"],
        &env.child_env(
            tag,
            None,
            &[("RUNBRIDGE__SIDECAR__LISTEN", listen.as_str())],
        ),
    )?;
    wait_port(port, "sidecar").await?;
    let urls: Vec<String> = ids
        .iter()
        .map(|id| {
            format!(
                "http://{listen}/cb/{}/resolve?id={id}&value=ok",
                signer.sign(id).expose()
            )
        })
        .collect();
    let (rb_rate, rb_lat) = closed_loop(Arc::new(urls), CONNS).await?;
    stop(&mut sidecar).await;

    let bport = free_port();
    let blisten = format!("127.0.0.1:{bport}");
    let me = std::env::current_exe()?;
    let blog = std::fs::File::create(env.logs.join(format!("{tag}-baseline.log")))?;
    let mut base = Command::new(me)
        .args([
            "baseline-server",
            "--listen",
            &blisten,
            "--redis-url",
            &env.redis_url,
        ])
        .stdout(blog.try_clone()?)
        .stderr(blog)
        .kill_on_drop(true)
        .spawn()?;
    wait_port(bport, "baseline server").await?;
    let burls: Vec<String> = (0..n)
        .map(|i| format!("http://{blisten}/cb/{}-{tag}-{i}/resolve", env.run_id))
        .collect();
    let (base_rate, base_lat) = closed_loop(Arc::new(burls), CONNS).await?;
    stop(&mut base).await;
    let ratio = rb_rate / base_rate;
    let row = Row {
        id: "B3",
        scenario: format!("settle throughput: {n} resolves over {CONNS} keep-alive connections"),
        runbridge: rb_rate,
        baseline: Some(base_rate),
        unit: "resolves/s",
        ratio: Some(ratio),
        target: "ratio ≥ 0.6".into(),
        met: ratio >= 0.6,
        notes: String::new(),
    };
    Ok((row, rb_lat, base_lat))
}

/// The round with the median ratio, its notes listing every round's ratio.
fn median_round<T>(mut rounds: Vec<(Row, T)>) -> Option<(Row, T)> {
    rounds.sort_by(|a, b| {
        a.0.ratio
            .unwrap_or(f64::NAN)
            .total_cmp(&b.0.ratio.unwrap_or(f64::NAN))
    });
    let ratios: Vec<String> = rounds
        .iter()
        .map(|r| format!("{:.2}", r.0.ratio.unwrap_or(f64::NAN)))
        .collect();
    let n = rounds.len();
    let (mut row, extra) = rounds.into_iter().nth(n / 2)?;
    let rounds_note = format!("median of {n} rounds (ratios {})", ratios.join(", "));
    row.notes = if row.notes.is_empty() {
        rounds_note
    } else {
        format!("{rounds_note}; {}", row.notes)
    };
    Some((row, extra))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn b4(env: &Env, rate: u64, seconds: u64, curves: &mut Curves) -> Result<Vec<Row>> {
    let tag = "b4";
    let n = (rate * seconds) as usize;
    let s = env.settings(tag, &[])?;
    let store = runbridge::startup::store(&s).await?;
    let signer = runbridge::startup::signer(&s)?;
    let prefix = format!("{}-b4", env.run_id);
    let ids = pending_promises(
        &store,
        &prefix,
        n,
        Timeout::After(Duration::from_secs(3600)),
    )
    .await?;
    // The independent consumer, bound before anything is settled.
    let bs = runbridge::startup::broker_settings(&s, "bench");
    let b = Broker::connect(&bs).await?;
    b.declare_topology().await?;
    let mut listener = b.listen(Some(&bs.events_exchange), "promise.#").await?;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let env_vars = env.child_env(
        tag,
        None,
        &[("RUNBRIDGE__SIDECAR__LISTEN", listen.as_str())],
    );
    let mut sidecar = env.spawn("b4-sidecar", &["sidecar"], &env_vars)?;
    // The worker runs the relay (its trigger queue stays empty).
    let mut worker = env.spawn("b4-worker", &["worker"], &env_vars)?;
    wait_port(port, "sidecar").await?;
    // Let the worker's relay join its consumer group.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let t0 = Instant::now();
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let answered: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let clients: Arc<Vec<reqwest::Client>> = Arc::new(
        (0..32)
            .map(|_| {
                reqwest::Client::builder()
                    .http1_only()
                    .build()
                    .unwrap_or_default()
            })
            .collect(),
    );
    let receiving = tokio::spawn(async move {
        let mut got: Vec<(usize, u64)> = Vec::with_capacity(n);
        let mut seen = std::collections::HashSet::new();
        while seen.len() < n {
            let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(30), listener.next()).await
            else {
                break;
            };
            let at = t0.elapsed().as_nanos() as u64;
            let Some(mid) = ev.message_id else { continue };
            let Some(i) = mid
                .split('/')
                .next()
                .and_then(|id| id.rsplit('-').next())
                .and_then(|x| x.parse::<usize>().ok())
            else {
                continue;
            };
            if seen.insert(i) {
                got.push((i, at));
            }
        }
        got
    });
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let mut sends = Vec::with_capacity(n);
    for (i, id) in ids.iter().enumerate() {
        tokio::time::sleep_until((t0 + interval * i as u32).into()).await;
        let url = format!(
            "http://{listen}/cb/{}/resolve?id={id}&value=ok",
            signer.sign(id).expose()
        );
        let (clients, sent_at, answered) = (clients.clone(), sent_at.clone(), answered.clone());
        sends.push(tokio::spawn(async move {
            sent_at[i].store(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            let ok = matches!(clients[i % clients.len()].post(url).send().await, Ok(r) if r.status().is_success());
            answered[i].store(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            ok
        }));
    }
    let mut failed = 0;
    for s in sends {
        if !s.await.unwrap_or(false) {
            failed += 1;
        }
    }
    let offered = n as f64 / t0.elapsed().as_secs_f64();
    let got = receiving.await?;
    stop(&mut sidecar).await;
    stop(&mut worker).await;
    b.close().await;
    if failed > 0 {
        bail!("B4: {failed} resolves failed");
    }
    if got.len() < n {
        bail!("B4: {} of {n} events arrived", got.len());
    }
    let mut ev: Vec<f64> = got
        .iter()
        .map(|(i, at)| (*at as f64 - sent_at[*i].load(Ordering::Relaxed) as f64) / 1e6)
        .collect();
    let mut http: Vec<f64> = (0..n)
        .map(|i| {
            (answered[i].load(Ordering::Relaxed) as f64 - sent_at[i].load(Ordering::Relaxed) as f64)
                / 1e6
        })
        .collect();
    ev.sort_by(f64::total_cmp);
    http.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&ev, 0.5), percentile(&ev, 0.99));
    let notes = format!(
        "offered {offered:.0}/s; HTTP answer p50 {:.2} ms, p99 {:.2} ms; event p99.9 {:.2} ms, max {:.2} ms",
        percentile(&http, 0.5),
        percentile(&http, 0.99),
        percentile(&ev, 0.999),
        ev.last().copied().unwrap_or(f64::NAN)
    );
    curves.0.push(("B4 settle → event received".into(), ev));
    curves.0.push(("B4 settle → HTTP answer".into(), http));
    Ok(vec![
        Row {
            id: "B4",
            scenario: format!("settle → event latency p50, {rate} resolves/s for {seconds} s"),
            runbridge: p50,
            baseline: None,
            unit: "ms",
            ratio: None,
            target: "p50 ≤ 2 ms".into(),
            met: p50 <= 2.0,
            notes: notes.clone(),
        },
        Row {
            id: "B4",
            scenario: format!("settle → event latency p99, {rate} resolves/s for {seconds} s"),
            runbridge: p99,
            baseline: None,
            unit: "ms",
            ratio: None,
            target: "p99 ≤ 10 ms".into(),
            met: p99 <= 10.0,
            notes: String::new(),
        },
    ])
}

// ---------------------------------------------------------------------------
// B5: Redis memory per pending promise.

async fn b5(env: &Env, n: usize) -> Result<Vec<Row>> {
    let s = env.settings("b5", &[])?;
    let store = runbridge::startup::store(&s).await?;
    let client = redis::Client::open(env.redis_url.as_str())?;
    let c = client.get_multiplexed_async_connection().await?;
    let prefix = format!("{}-b5", env.run_id);
    let ids = pending_promises(
        &store,
        &prefix,
        n,
        Timeout::After(Duration::from_secs(3600)),
    )
    .await?;
    let keys = store.keys().clone();
    let usage = |key: String| {
        let mut c = c.clone();
        async move {
            let m: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(key)
                .arg("SAMPLES")
                .arg(0)
                .query_async(&mut c)
                .await?;
            Ok::<u64, redis::RedisError>(m.unwrap_or(0))
        }
    };
    // The promise record: MEMORY USAGE over a sample of promise hashes.
    let k = ids.len().min(500);
    let mut sample = 0u64;
    for id in ids.iter().step_by((ids.len() / k.max(1)).max(1)).take(k) {
        sample += usage(keys.promise(id)).await?;
    }
    let hash = sample as f64 / k.max(1) as f64;
    // Its entries in the partition indexes (deadline, poll schedule, run id).
    let mut index = 0u64;
    for p in 0..keys.partitions() {
        for key in [keys.deadlines(p), keys.polls(p), keys.runs(p)] {
            index += usage(key).await?;
        }
    }
    let per_index = index as f64 / n as f64;
    let total = hash + per_index;
    Ok(vec![
        Row {
            id: "B5",
            scenario: format!(
                "Redis memory per pending promise: the record (MEMORY USAGE of {k} of {n}, empty payload)"
            ),
            runbridge: hash,
            baseline: None,
            unit: "bytes",
            ratio: None,
            target: "≤ 512 bytes".into(),
            met: hash <= 512.0,
            notes: format!(
                "ids of {} characters, key prefix of {}; with its index entries (deadline and poll sets, run-id hash: {per_index:.0} bytes each promise) a pending promise costs {total:.0} bytes in all",
                ids[0].as_str().len(),
                prefix.len()
            ),
        },
        Row {
            id: "B5+",
            scenario: "the same, record plus its index entries".into(),
            runbridge: total,
            baseline: None,
            unit: "bytes",
            ratio: None,
            target: "≤ 512 bytes".into(),
            met: total <= 512.0,
            notes: String::new(),
        },
    ])
}

// ---------------------------------------------------------------------------
// B7: the deadline sweep follows what is due, not what is pending.

/// Median time of `reps` sweeps, each over 100 freshly due promises.
async fn sweeps(
    store: &RedisStore,
    reconciler: &Reconciler<RedisStore, runbridge::databricks::Client>,
    prefix: &str,
    reps: usize,
) -> Result<f64> {
    let mut times = Vec::new();
    // One sweep first, untimed: script loading and pool connections.
    reconciler.tick().await?;
    for r in 0..reps {
        let now = chrono::Utc::now().timestamp_millis();
        let ids: Vec<PromiseId> = (0..100)
            .map(|i| PromiseId::parse(&format!("{prefix}-due-{r}-{i:03}")))
            .collect::<Result<_, _>>()?;
        for id in &ids {
            store.create(&new_promise(id, Timeout::At(now - 1))).await?;
        }
        let t = Instant::now();
        let report = reconciler.tick().await?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        if report.timed_out != 100 {
            bail!(
                "B7: a sweep timed out {} promises, not 100",
                report.timed_out
            );
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

async fn b7(env: &Env, pending: usize) -> Result<Row> {
    let redis = RedisServer::ephemeral()
        .await
        .context("starting a private redis-server for B7")?;
    let s = env.settings(
        "b7",
        &[("redis.url", redis.url()), ("redis.pool_size", "64".into())],
    )?;
    let store = runbridge::startup::store(&s).await?;
    let jobs = runbridge::startup::jobs_client(&s, None)?;
    let reconciler = Reconciler::new(
        store.clone(),
        jobs,
        runbridge::startup::reconciler_settings(&s),
    );
    let prefix = format!("{}-b7", env.run_id);
    let reps = 7;
    // Baseline first, on an empty Redis: 100 pending, all due.
    let small = sweeps(&store, &reconciler, &format!("{prefix}-small"), reps).await?;
    let t = Instant::now();
    let filled: Vec<Result<()>> = stream::iter(0..pending)
        .map(|i| {
            let store = store.clone();
            let prefix = prefix.clone();
            async move {
                let id = PromiseId::parse(&format!("{prefix}-{i:08}"))?;
                store
                    .create(&new_promise(
                        &id,
                        Timeout::After(Duration::from_secs(86_400)),
                    ))
                    .await?;
                Ok(())
            }
        })
        .buffer_unordered(512)
        .collect()
        .await;
    filled.into_iter().collect::<Result<Vec<()>>>()?;
    let fill_s = t.elapsed().as_secs_f64();
    let deadlines: u64 = {
        let client = redis::Client::open(redis.url())?;
        let mut c = client.get_multiplexed_async_connection().await?;
        let mut total = 0u64;
        for p in 0..store.partitions() {
            let n: u64 = redis::cmd("ZCARD")
                .arg(store.keys().deadlines(p))
                .query_async(&mut c)
                .await?;
            total += n;
        }
        total
    };
    let large = sweeps(&store, &reconciler, &format!("{prefix}-large"), reps).await?;
    drop(redis);
    let ratio = large / small;
    Ok(Row {
        id: "B7",
        scenario: format!("deadline sweep, 100 due among {pending} pending (median of {reps})"),
        runbridge: large,
        baseline: Some(small),
        unit: "ms per sweep",
        ratio: Some(ratio),
        target: "ratio ≤ 2".into(),
        met: ratio <= 2.0,
        notes: format!(
            "baseline: the same sweep with 100 pending; {deadlines} entries in the deadline sets; filling took {fill_s:.0} s"
        ),
    })
}

// ---------------------------------------------------------------------------
// The run.

fn machine() -> Value {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let rabbit = rabbitmqctl(None, &["version"])
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let redis = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .find_map(|w| w.strip_prefix("v=").map(str::to_owned))
                .unwrap_or_default()
        })
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_owned))
        })
        .unwrap_or_default();
    json!({"cores": cores, "cpu": cpu, "rabbitmq": rabbit, "redis": redis})
}

async fn run(args: &Args) -> Result<()> {
    let sizes = if args.smoke {
        Sizes::smoke()
    } else {
        Sizes::full()
    };
    let only: Option<Vec<String>> = args
        .only
        .as_ref()
        .map(|o| o.split(',').map(|s| s.trim().to_uppercase()).collect());
    let want = |id: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == id));
    let bin = runbridge_bin(args.bin.as_ref(), "make bench")?;
    let run_id = format!("bench{}", chrono::Utc::now().timestamp_millis());
    let logs = std::env::temp_dir().join(&run_id);
    std::fs::create_dir_all(&logs)?;
    std::fs::create_dir_all(&args.out)?;
    let vhost = run_id.clone();
    rabbitmqctl(None, &["add_vhost", &vhost])?;
    rabbitmqctl(
        None,
        &["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"],
    )?;
    let env = Env {
        bin,
        config_dir: config_dir(),
        logs: logs.clone(),
        run_id: run_id.clone(),
        vhost: vhost.clone(),
        redis_url: "redis://127.0.0.1:6379".into(),
    };
    println!(
        "[bench] {} profile, run {run_id}, logs in {}",
        if args.smoke { "smoke" } else { "full" },
        logs.display()
    );
    let started = Instant::now();
    let result = scenarios(&env, &sizes, &want).await;
    // Clean up whatever happened: the vhost and every key of this run.
    let _ = rabbitmqctl(None, &["delete_vhost", &vhost]);
    let _ = delete_keys(&env.redis_url, &format!("{run_id}*")).await;
    let _ = delete_keys(&env.redis_url, &format!("bench-baseline:{run_id}*")).await;
    let (rows, curves) = result?;
    let m = machine();
    let date = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let doc = json!({
        "date": date,
        "profile": if args.smoke { "smoke" } else { "full" },
        "machine": m,
        "seconds": started.elapsed().as_secs_f64(),
        "results": rows,
    });
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&doc)? + "\n",
    )?;
    let md = markdown(&rows, &m, &date);
    std::fs::write(args.out.join("results.md"), &md)?;
    std::fs::write(args.out.join("latency.svg"), svg(&curves))?;
    println!("\n{md}");
    println!(
        "[bench] done in {:.0} s: {}/results.json, results.md, latency.svg",
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    let _ = std::fs::remove_dir_all(&logs);
    Ok(())
}

async fn delete_keys(url: &str, pattern: &str) -> Result<()> {
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

async fn scenarios(
    env: &Env,
    sz: &Sizes,
    want: &dyn Fn(&str) -> bool,
) -> Result<(Vec<Row>, Curves)> {
    let mut rows = Vec::new();
    let mut curves = Curves::default();
    const PREFETCH: u16 = 256;
    if want("B1") {
        println!(
            "[bench] B1: {} triggers, one worker vs a lapin consumer that only acks",
            sz.b1_triggers
        );
        let mut rounds = Vec::new();
        for r in 0..sz.rounds {
            let base =
                baseline_consumer(env, &format!("b1base{r}"), sz.b1_triggers, PREFETCH).await?;
            // Default reconciler settings: its first checks come 30 s after launch.
            let d = drain_with_worker(
                env,
                &format!("b1r{r}"),
                sz.b1_triggers,
                u32::from(PREFETCH),
                0,
                Duration::ZERO,
                &[],
            )
            .await?;
            let ratio = d.rate / base;
            rounds.push((
                Row {
                    id: "B1",
                    scenario: format!(
                        "trigger throughput: {} pre-published triggers, one worker, prefetch {PREFETCH}",
                        sz.b1_triggers
                    ),
                    runbridge: d.rate,
                    baseline: Some(base),
                    unit: "triggers/s",
                    ratio: Some(ratio),
                    target: "ratio ≥ 0.5".into(),
                    met: ratio >= 0.5,
                    notes: format!("drained in {:.1} s", d.seconds),
                },
                (),
            ));
        }
        rows.extend(median_round(rounds).map(|r| r.0));
    }
    if want("B2") || want("B6") {
        println!(
            "[bench] B2/B6: {} triggers, emulator adds 200 ms to every run-now",
            sz.b2_triggers
        );
        // Checks start 1 s after launch, so B6 sees the reconciler at work too.
        let checks = [
            ("RUNBRIDGE__RECONCILER__FIRST_POLL_MS", "1000"),
            ("RUNBRIDGE__RECONCILER__TICK_MS", "500"),
        ];
        let d = drain_with_worker(
            env,
            "b2",
            sz.b2_triggers,
            u32::from(PREFETCH),
            200,
            Duration::from_secs(5),
            &checks,
        )
        .await?;
        let ideal = f64::from(PREFETCH) / 0.2;
        let ratio = d.rate / ideal;
        if want("B2") {
            rows.push(Row {
                id: "B2",
                scenario: format!(
                    "latency hiding: run-now takes 200 ms, in-flight limit {PREFETCH}"
                ),
                runbridge: d.rate,
                baseline: Some(ideal),
                unit: "triggers/s",
                ratio: Some(ratio),
                target: "ratio ≥ 0.9 (baseline = ideal, limit / 0.2 s)".into(),
                met: ratio >= 0.9,
                notes: format!("drained {} in {:.1} s", sz.b2_triggers, d.seconds),
            });
        }
        if want("B6") {
            let mib = d.peak_rss_kib as f64 / 1024.0;
            rows.push(Row {
                id: "B6",
                scenario: format!("worker peak RSS while launching {} promises and checking them", sz.b2_triggers),
                runbridge: mib,
                baseline: None,
                unit: "MiB",
                ratio: None,
                target: "≤ 64 MiB".into(),
                met: mib <= 64.0,
                notes: "the B2 run, sampled every 50 ms, through the drain and 5 s of reconciler checks after".into(),
            });
        }
    }
    if want("B3") {
        println!(
            "[bench] B3: {} resolves, sidecar vs axum + one SET",
            sz.b3_resolves
        );
        let mut rounds = Vec::new();
        for r in 0..sz.rounds {
            let (row, rb, base) = b3(env, &format!("b3r{r}"), sz.b3_resolves).await?;
            rounds.push((row, (rb, base)));
        }
        if let Some((row, (rb, base))) = median_round(rounds) {
            rows.push(row);
            curves.0.push(("B3 resolve, runbridge sidecar".into(), rb));
            curves.0.push(("B3 baseline: axum + one SET".into(), base));
        }
    }
    if want("B4") {
        println!(
            "[bench] B4: {} resolves/s for {} s, until an independent consumer has the event",
            sz.b4_rate, sz.b4_seconds
        );
        rows.extend(b4(env, sz.b4_rate, sz.b4_seconds, &mut curves).await?);
    }
    if want("B5") {
        println!(
            "[bench] B5: Redis memory of {} pending promises",
            sz.b5_promises
        );
        rows.extend(b5(env, sz.b5_promises).await?);
    }
    if want("B7") {
        println!(
            "[bench] B7: deadline sweep with {} pending (private Redis)",
            sz.b7_pending
        );
        rows.push(b7(env, sz.b7_pending).await?);
    }
    Ok((rows, curves))
}

fn fmt_num(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn markdown(rows: &[Row], m: &Value, date: &str) -> String {
    let mut s = format!(
        "Measured {date} on {} cores ({}), RabbitMQ {}, Redis {}.\n\n",
        m["cores"],
        m["cpu"].as_str().unwrap_or("?"),
        m["rabbitmq"].as_str().unwrap_or("?"),
        m["redis"].as_str().unwrap_or("?")
    );
    s.push_str("| id | scenario | runbridge | baseline | ratio | target | met |\n|---|---|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} {} | {} | {} | {} | {} |\n",
            r.id,
            r.scenario,
            fmt_num(r.runbridge),
            r.unit,
            r.baseline
                .map(|b| format!("{} {}", fmt_num(b), r.unit))
                .unwrap_or_else(|| "–".into()),
            r.ratio
                .map(|x| format!("{x:.2}"))
                .unwrap_or_else(|| "–".into()),
            r.target,
            if r.met { "yes" } else { "**no**" },
        ));
    }
    let notes: Vec<String> = rows
        .iter()
        .filter(|r| !r.notes.is_empty())
        .map(|r| format!("- {}: {}", r.id, r.notes))
        .collect();
    if !notes.is_empty() {
        s.push('\n');
        s.push_str(&notes.join("\n"));
        s.push('\n');
    }
    s
}

/// Cumulative distributions on a log-scale latency axis, as plain SVG.
fn svg(curves: &Curves) -> String {
    let (w, h, ml, mr, mt, mb) = (760.0, 420.0, 60.0, 20.0, 30.0, 110.0);
    let (pw, ph) = (w - ml - mr, h - mt - mb);
    let (lo, hi) = (0.05f64.log10(), 1000f64.log10());
    let x = |ms: f64| ml + ((ms.max(0.05).log10() - lo) / (hi - lo)).clamp(0.0, 1.0) * pw;
    let y = |q: f64| mt + (1.0 - q) * ph;
    let colors = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    ];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{ml}\" y=\"18\" font-size=\"14\">Latency distributions (cumulative), make bench</text>\n"
    );
    for ms in [0.1, 1.0, 10.0, 100.0, 1000.0] {
        let xx = x(ms);
        s.push_str(&format!(
            "<line x1=\"{xx:.1}\" y1=\"{mt}\" x2=\"{xx:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{xx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{ms} ms</text>\n",
            mt + ph,
            mt + ph + 15.0
        ));
    }
    for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
        let yy = y(q);
        s.push_str(&format!(
            "<line x1=\"{ml}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{q}</text>\n",
            ml + pw,
            ml - 5.0,
            yy + 4.0
        ));
    }
    for (k, (name, data)) in curves.0.iter().enumerate() {
        let mut d = data.clone();
        d.sort_by(f64::total_cmp);
        if d.is_empty() {
            continue;
        }
        let step = (d.len() / 400).max(1);
        let pts: Vec<String> = d
            .iter()
            .enumerate()
            .step_by(step)
            .chain(std::iter::once((d.len() - 1, &d[d.len() - 1])))
            .map(|(i, v)| format!("{:.1},{:.1}", x(*v), y((i + 1) as f64 / d.len() as f64)))
            .collect();
        let c = colors[k % colors.len()];
        s.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n",
            pts.join(" ")
        ));
        let ly = mt + ph + 35.0 + 16.0 * k as f64;
        let sorted_p50 = percentile(&d, 0.5);
        let sorted_p99 = percentile(&d, 0.99);
        s.push_str(&format!(
            "<line x1=\"{ml}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{c}\" stroke-width=\"3\"/><text x=\"{:.1}\" y=\"{:.1}\">{} (p50 {:.2} ms, p99 {:.2} ms, n={})</text>\n",
            ly - 4.0,
            ml + 20.0,
            ly - 4.0,
            ml + 26.0,
            ly,
            xml_escape(name),
            sorted_p50,
            sorted_p99,
            d.len()
        ));
    }
    s.push_str("</svg>\n");
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
