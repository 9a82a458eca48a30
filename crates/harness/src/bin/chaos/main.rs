//! `make chaos`: run a workload against real child processes while injecting
//! faults, then check invariants over everything that happened (the shape of
//! RabbitMQ's Jepsen suite). Built only with the `failpoints` feature.
//!
//! Set-up: a private Redis (AOF, fsync always, own port and dir), a private
//! vhost on the machine's RabbitMQ, the emulator with notebook and API faults,
//! W `runbridge worker` and S `runbridge sidecar` child processes, and an
//! independent consumer queue bound to `runbridge.events` declared before
//! anything runs. Faults come from a schedule drawn from `--seed`, so a
//! failing run can be replayed.
//!
//! runbridge reaches Redis, RabbitMQ and the emulator through TCP proxies in
//! this process, which can cut, blackhole or delay a link.
//! The `node` fault kills a private RabbitMQ node with `kill -9` and
//! restarts it (`runbridge_testkit::RabbitNode`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use runbridge::broker::Broker;
use runbridge::config::Settings;
use runbridge::store::{PromiseStore, SearchQuery};
use runbridge_harness::{config_dir, rss_kib, runbridge_bin};
use runbridge_testkit::{RabbitNode, RedisServer, rabbitmqctl, restartable_port};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

#[derive(Parser, Debug, Clone)]
#[command(about = "Fault-injection run with invariant checks")]
struct Args {
    /// Seed of the workload and fault schedule (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 1000)]
    triggers: usize,
    /// Triggers published per second.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    #[arg(long, default_value_t = 3)]
    workers: usize,
    #[arg(long, default_value_t = 2)]
    sidecars: usize,
    /// Comma-separated: kill, crash, broker (connections dropped), node (a
    /// private RabbitMQ node killed with -9 and restarted; needs root), redis,
    /// proxy, emulator. Default: all (`node` left out, with a message, where
    /// a private RabbitMQ node cannot be started).
    #[arg(long)]
    faults: Option<String>,
    /// Seconds between faults (drawn between 1x and 2x this).
    #[arg(long, default_value_t = 2.0)]
    fault_every: f64,
    /// How long to wait for everything to settle once publishing is done.
    #[arg(long, default_value_t = 120)]
    quiet_seconds: u64,
    /// Port of the private Redis (default: a free one).
    #[arg(long)]
    redis_port: Option<u16>,
    /// The runbridge binary (default: next to this one).
    #[arg(long)]
    bin: Option<PathBuf>,
}

/// A supervised child process: restarted whenever it exits, until stopped.
struct Proc {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    exits: Vec<String>,
    killed_by_us: usize,
    /// Armed for the next start only: a crash point that fires on first pass.
    next_failpoint: Option<String>,
}

impl Proc {
    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut env = self.env.clone();
        if let Some(fp) = self.next_failpoint.take() {
            env.retain(|(k, _)| k != "RUNBRIDGE_FAILPOINTS");
            env.push(("RUNBRIDGE_FAILPOINTS".into(), format!("{fp}=abort")));
        }
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(env)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }
}

#[derive(Default)]
struct FaultLog {
    counts: BTreeMap<String, usize>,
}

/// The crash points (src/failpoint.rs) and the process kind that has each.
const CRASH_POINTS: [(&str, &str); 4] = [
    ("worker.after_launch", "worker"),
    ("sidecar.after_settle", "sidecar"),
    ("relay.after_confirm", "worker"),
    ("worker.after_ack", "worker"),
];

fn exit_kind(s: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (_, Some(9)) => "SIGKILL".into(),
        (_, Some(6)) => "SIGABRT".into(),
        (_, Some(n)) => format!("signal {n}"),
        _ => "unknown".into(),
    }
}

async fn supervise(procs: Arc<Mutex<Vec<Proc>>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        {
            let mut ps = procs.lock().await;
            for p in ps.iter_mut() {
                let exited = match p.child.as_mut().map(Child::try_wait) {
                    Some(Ok(Some(status))) => Some(exit_kind(&status)),
                    _ => None,
                };
                if let Some(kind) = exited {
                    p.exits.push(kind);
                    p.child = None;
                }
                if p.child.is_none()
                    && let Err(e) = p.spawn()
                {
                    eprintln!("[chaos] cannot restart {}: {e}", p.name);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
}

/// What a proxied link does right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkMode {
    Pass,
    /// Existing connections are reset and new ones refused.
    Cut,
    /// Nothing flows either way (a partition); when it ends, the stalled
    /// connections are reset, as a real partition's would time out.
    Blackhole,
    /// Every chunk waits this long before it is forwarded.
    Delay(u64),
}

/// A TCP proxy the harness puts between runbridge and Redis, RabbitMQ or the
/// emulator (netem and toxiproxy are not available here). It never drops
/// bytes mid-stream (TCP does not): a blackhole stalls, then resets.
struct Proxy {
    name: &'static str,
    port: u16,
    mode: tokio::sync::watch::Sender<(LinkMode, u64)>,
}

impl Proxy {
    async fn start(name: &'static str, upstream: u16) -> Result<Arc<Self>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        // (mode, generation): a new generation resets every open connection.
        let (tx, rx) = tokio::sync::watch::channel((LinkMode::Pass, 0u64));
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let rx = rx.clone();
                let (mode, generation) = *rx.borrow();
                if mode == LinkMode::Cut {
                    drop(down);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::select! {
                        _ = pump(dr, uw, rx.clone()) => {}
                        _ = pump(ur, dw, rx.clone()) => {}
                        _ = reset_on_new_generation(rx, generation) => {}
                    }
                });
            }
        });
        Ok(Arc::new(Self {
            name,
            port,
            mode: tx,
        }))
    }

    fn set(&self, mode: LinkMode) {
        self.mode.send_modify(|(m, g)| {
            // Cutting, or ending a blackhole, resets open connections.
            if mode == LinkMode::Cut || *m == LinkMode::Blackhole {
                *g += 1;
            }
            *m = mode;
        });
    }
}

async fn reset_on_new_generation(
    mut rx: tokio::sync::watch::Receiver<(LinkMode, u64)>,
    generation: u64,
) {
    while rx.changed().await.is_ok() {
        if rx.borrow().1 != generation {
            return;
        }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut rx: tokio::sync::watch::Receiver<(LinkMode, u64)>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            let mode = rx.borrow().0;
            match mode {
                LinkMode::Pass => break,
                LinkMode::Delay(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    break;
                }
                // Hold the bytes until the link heals (then the connection is reset).
                LinkMode::Blackhole | LinkMode::Cut => {
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let seed = args
        .seed
        .unwrap_or_else(|| chrono::Utc::now().timestamp_millis() as u64);
    let mut faults: HashSet<String> = args
        .faults
        .as_deref()
        .unwrap_or("kill,crash,broker,node,redis,proxy,emulator")
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    for f in &faults {
        if ![
            "kill", "crash", "broker", "node", "redis", "proxy", "emulator",
        ]
        .contains(&f.as_str())
        {
            bail!("unknown fault {f:?}");
        }
    }
    let bin = runbridge_bin(args.bin.as_ref(), "make chaos")?;
    let config_dir = config_dir();
    let root = std::env::temp_dir().join(format!("runbridge-chaos-{seed}"));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("redis"))?;
    println!(
        "[chaos] seed {seed}, {} triggers at {}/s, faults {:?}, logs in {}",
        args.triggers,
        args.rate,
        faults,
        root.display()
    );

    // Private Redis and vhost.
    let redis_port = match args.redis_port {
        Some(p) => p,
        None => restartable_port(),
    };
    // Append-only with fsync always: a kill -9 loses nothing acknowledged.
    let mut redis_args: Vec<std::ffi::OsString> = [
        "--port",
        &redis_port.to_string(),
        "--bind",
        "127.0.0.1",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
        "--dir",
    ]
    .map(Into::into)
    .into();
    redis_args.push(root.join("redis").into());
    let redis = RedisServer::start(redis_args, redis_port)
        .await
        .context("starting the private redis-server")?;
    // The broker: a private node when the node fault is on (it gets killed),
    // else a private vhost on the shared node.
    let node = if faults.contains("node") {
        match RabbitNode::new(&format!("chaos-{seed}"), root.join("rabbitmq"), None) {
            Ok(n) => Some(n),
            // Asked for by name: an error. By default: run without it, loudly.
            Err(e) if args.faults.is_none() => {
                println!("[chaos] NOTE: the node fault is skipped: {e}");
                faults.remove("node");
                None
            }
            Err(e) => return Err(e),
        }
    } else {
        None
    };
    let mut node = match node {
        Some(mut n) => {
            n.start().await?;
            println!(
                "[chaos] private RabbitMQ node {} on port {}",
                n.name, n.port
            );
            Some(n)
        }
        None => None,
    };
    let node_name = node.as_ref().map(|n| n.name.clone());
    let ctl_node = node_name.as_deref();
    let amqp_port = node.as_ref().map_or(5672, |n| n.port);
    let vhost = format!("chaos-{seed}");
    let _ = rabbitmqctl(ctl_node, &["delete_vhost", &vhost]);
    rabbitmqctl(ctl_node, &["add_vhost", &vhost])?;
    rabbitmqctl(
        ctl_node,
        &["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"],
    )?;

    let emu_port = restartable_port();
    let sidecar_ports: Vec<u16> = (0..args.sidecars).map(|_| restartable_port()).collect();
    // runbridge reaches Redis, RabbitMQ and the emulator only through these
    // proxies; the harness's own connections go direct.
    let proxies = vec![
        Proxy::start("redis", redis_port).await?,
        Proxy::start("rabbitmq", amqp_port).await?,
        Proxy::start("emulator", emu_port).await?,
    ];
    let (redis_via, amqp_via, emu_via) = (proxies[0].port, proxies[1].port, proxies[2].port);
    let mut common: Vec<(String, String)> = vec![
        ("RUNBRIDGE_ENV".into(), "local".into()),
        (
            "RUNBRIDGE_CONFIG_DIR".into(),
            config_dir.display().to_string(),
        ),
        (
            "RUNBRIDGE__REDIS__URL".into(),
            format!("redis://127.0.0.1:{redis_via}"),
        ),
        ("RUNBRIDGE__REDIS__KEY_PREFIX".into(), "chaos".into()),
        (
            "RUNBRIDGE__AMQP__URL".into(),
            format!("amqp://guest:guest@127.0.0.1:{amqp_via}/{vhost}"),
        ),
        (
            "DATABRICKS_HOST".into(),
            format!("http://127.0.0.1:{emu_via}"),
        ),
        ("DATABRICKS_TOKEN".into(), "dapi-chaos".into()),
        (
            "RUNBRIDGE__DATABRICKS__LAUNCH_PER_SECOND".into(),
            "0".into(),
        ),
        ("RUNBRIDGE__DATABRICKS__POLL_PER_SECOND".into(), "0".into()),
        (
            "RUNBRIDGE__DATABRICKS__CANCEL_PER_SECOND".into(),
            "0".into(),
        ),
        (
            "RUNBRIDGE__DATABRICKS__RETRY_MAX_DELAY_MS".into(),
            "2000".into(),
        ),
        ("RUNBRIDGE__DATABRICKS__RETRY_MAX_TIMES".into(), "8".into()),
        ("RUNBRIDGE__WORKER__REQUEUE_DELAY_MS".into(), "500".into()),
        ("RUNBRIDGE__RELAY__RECLAIM_IDLE_MS".into(), "3000".into()),
        (
            "RUNBRIDGE__RELAY__RECLAIM_INTERVAL_MS".into(),
            "1000".into(),
        ),
        ("RUNBRIDGE__RECONCILER__TICK_MS".into(), "500".into()),
        ("RUNBRIDGE__RECONCILER__FIRST_POLL_MS".into(), "3000".into()),
        ("RUNBRIDGE__RECONCILER__GRACE_MS".into(), "1500".into()),
        ("RUNBRIDGE__RECONCILER__LEASE_MS".into(), "5000".into()),
        ("RUNBRIDGE__LOG__FORMAT".into(), "json".into()),
        ("RUST_LOG".into(), "warn".into()),
    ];
    common.push((
        "RUNBRIDGE__SIDECAR__PUBLIC_URL".into(),
        format!("http://127.0.0.1:{}", sidecar_ports[0]),
    ));

    // The independent consumer's queue exists before any event can be published.
    let settings = Settings::load_from(
        &config_dir,
        "local",
        &[
            ("redis.url", format!("redis://127.0.0.1:{redis_port}")),
            ("redis.key_prefix", "chaos".into()),
            (
                "amqp.url",
                format!("amqp://guest:guest@127.0.0.1:{amqp_port}/{vhost}"),
            ),
        ],
    )?;
    let bs = runbridge::startup::broker_settings(&settings, "chaos");
    {
        let b = Broker::connect(&bs).await?;
        b.declare_topology().await?;
        b.declare_bound_queue("chaos.events", &bs.events_exchange, "promise.#")
            .await?;
        b.close().await;
    }

    // The emulator: notebook outcomes by job, API faults by rate.
    let emu_faults = faults.contains("emulator");
    let mut emu_args = vec![
        "emulate".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{emu_port}"),
        "--job".into(),
        "1:callback:300:ok".into(),
        "--job".into(),
        "2:duplicate_callback:300:twice".into(),
        "--job".into(),
        "3:fail:300".into(),
        "--job".into(),
        "4:early_callback:100:early".into(),
    ];
    if emu_faults {
        emu_args.extend(
            [
                "--fault-429-rate",
                "0.1",
                "--fault-503-rate",
                "0.05",
                "--fault-slow-rate",
                "0.05",
                "--fault-slow-ms",
                "1500",
            ]
            .map(String::from),
        );
    }
    let mut emulator = Proc {
        name: "emulator".into(),
        program: bin.clone(),
        args: emu_args,
        env: common.clone(),
        log: root.join("emulator.log"),
        child: None,
        exits: vec![],
        killed_by_us: 0,
        next_failpoint: None,
    };
    emulator.spawn()?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", emu_port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Workers and sidecars, supervised.
    let crash = faults.contains("crash");
    let mut procs = Vec::new();
    for (i, port) in sidecar_ports.iter().enumerate() {
        let mut env = common.clone();
        env.push((
            "RUNBRIDGE__SIDECAR__LISTEN".into(),
            format!("127.0.0.1:{port}"),
        ));
        if crash {
            env.push((
                "RUNBRIDGE_FAILPOINTS".into(),
                "sidecar.after_settle=abort@0.003".into(),
            ));
        }
        procs.push(Proc {
            name: format!("sidecar-{i}"),
            program: bin.clone(),
            args: vec!["sidecar".into()],
            env,
            log: root.join(format!("sidecar-{i}.log")),
            child: None,
            exits: vec![],
            killed_by_us: 0,
            next_failpoint: None,
        });
    }
    for i in 0..args.workers {
        let mut env = common.clone();
        // Notebooks of worker i call back sidecar i mod S.
        env.retain(|(k, _)| k != "RUNBRIDGE__SIDECAR__PUBLIC_URL");
        env.push((
            "RUNBRIDGE__SIDECAR__PUBLIC_URL".into(),
            format!(
                "http://127.0.0.1:{}",
                sidecar_ports[i % sidecar_ports.len()]
            ),
        ));
        if crash {
            env.push(("RUNBRIDGE_FAILPOINTS".into(), "worker.after_launch=abort@0.003,worker.after_ack=abort@0.002,relay.after_confirm=abort@0.003".into()));
        }
        procs.push(Proc {
            name: format!("worker-{i}"),
            program: bin.clone(),
            args: vec!["worker".into()],
            env,
            log: root.join(format!("worker-{i}.log")),
            child: None,
            exits: vec![],
            killed_by_us: 0,
            next_failpoint: None,
        });
    }
    for p in &mut procs {
        p.spawn()?;
    }
    let procs = Arc::new(Mutex::new(procs));
    let stop_supervisor = Arc::new(AtomicBool::new(false));
    let supervisor = tokio::spawn(supervise(procs.clone(), stop_supervisor.clone()));

    // Publisher: steady rate, 1 % malformed, jobs by weight; retries through outages.
    let mut rng = StdRng::seed_from_u64(seed);
    let mut plan = Vec::with_capacity(args.triggers);
    for i in 0..args.triggers {
        let id = format!("c{seed}-{i:06}");
        let x: f64 = rng.random();
        let body = if x < 0.01 {
            // Both job_id and submit: refused and dead-lettered. It has an id,
            // so a re-published copy (lost confirm) is recognised as the same.
            (
                json!({"id": format!("{id}-malformed"), "job_id": 1, "submit": {"tasks": []}}),
                true,
            )
        } else {
            let job = match rng.random::<f64>() {
                r if r < 0.80 => 1,
                r if r < 0.90 => 2,
                r if r < 0.95 => 3,
                _ => 4,
            };
            (
                json!({"id": id, "job_id": job, "timeout_seconds": 3600, "tags": {"chaos": seed.to_string()}}),
                false,
            )
        };
        plan.push(body);
    }
    let malformed_ids: HashSet<String> = plan
        .iter()
        .filter(|(_, m)| *m)
        .filter_map(|(b, _)| b["id"].as_str().map(str::to_owned))
        .collect();
    let valid_ids: HashSet<String> = plan
        .iter()
        .filter(|(_, m)| !*m)
        .filter_map(|(b, _)| b["id"].as_str().map(str::to_owned))
        .collect();
    let published = Arc::new(AtomicUsize::new(0));
    let publishing = {
        let (bs, published, rate) = (bs.clone(), published.clone(), args.rate);
        tokio::spawn(async move {
            let interval = Duration::from_secs_f64(1.0 / rate.max(0.1));
            let start = Instant::now();
            let mut conn: Option<(Broker, runbridge::broker::Publisher)> = None;
            for (i, (body, _)) in plan.iter().enumerate() {
                let due = start + interval * i as u32;
                tokio::time::sleep_until(due.into()).await;
                let bytes = serde_json::to_vec(body).unwrap_or_default();
                loop {
                    if conn.is_none() {
                        match Broker::connect(&bs).await {
                            Ok(b) => match b.publisher().await {
                                Ok(p) => conn = Some((b, p)),
                                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                            },
                            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                        }
                        continue;
                    }
                    let Some((_, p)) = conn.as_ref() else {
                        continue;
                    };
                    match p.publish_trigger(&bytes, None, None, None).await {
                        Ok(()) => break,
                        Err(_) => conn = None,
                    }
                }
                published.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    // Faults, from the same seed.
    let fault_log = Arc::new(Mutex::new(FaultLog::default()));
    let stop_faults = Arc::new(AtomicBool::new(false));
    let faulting = {
        // The fault task gets its own handles: the proxies must outlive it
        // (dropping one resets every connection through it).
        let links = proxies.clone();
        let (procs, fault_log, stop, faults, vhost, node_name) = (
            procs.clone(),
            fault_log.clone(),
            stop_faults.clone(),
            faults.clone(),
            vhost.clone(),
            node_name.clone(),
        );
        let mut node = node.take();
        let every = args.fault_every;
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        let mut kinds: Vec<&'static str> = Vec::new();
        for k in ["kill", "broker", "node", "redis", "proxy", "crash"] {
            if faults.contains(k) {
                kinds.push(k);
            }
        }
        // Every kind (and every crash point) once first, in an order drawn
        // from the seed; then at random.
        let mut first: Vec<&'static str> =
            kinds.iter().copied().filter(|k| *k != "crash").collect();
        if kinds.contains(&"crash") {
            first.extend(CRASH_POINTS.iter().map(|_| "crash"));
        }
        for i in (1..first.len()).rev() {
            first.swap(i, rng.random_range(0..=i));
        }
        let mut crash_cycle = CRASH_POINTS.iter().cycle();
        let mut redis = redis;
        tokio::spawn(async move {
            let mut n = 0usize;
            // The first cycle (every kind, every crash point) always completes,
            // even if publishing ended first; after it, faults stop with publishing.
            let done = |n: usize| stop.load(Ordering::Relaxed) && n >= first.len();
            while !done(n) && !kinds.is_empty() {
                tokio::time::sleep(Duration::from_secs_f64(every * (1.0 + rng.random::<f64>())))
                    .await;
                if done(n) {
                    break;
                }
                let kind = first
                    .get(n)
                    .copied()
                    .unwrap_or_else(|| kinds[rng.random_range(0..kinds.len())]);
                n += 1;
                let mut label = kind.to_string();
                match kind {
                    "kill" => {
                        let mut ps = procs.lock().await;
                        let n = ps.len();
                        let p = &mut ps[rng.random_range(0..n)];
                        if let Some(c) = p.child.as_mut() {
                            let _ = c.start_kill();
                            p.killed_by_us += 1;
                        }
                    }
                    "crash" => {
                        // Restart one process with this point armed to fire on first pass.
                        let (point, role) = crash_cycle.next().copied().unwrap_or(CRASH_POINTS[0]);
                        label = format!("crash {point}");
                        let mut ps = procs.lock().await;
                        let candidates: Vec<usize> = (0..ps.len())
                            .filter(|i| ps[*i].name.starts_with(role))
                            .collect();
                        if let Some(i) =
                            candidates.get(rng.random_range(0..candidates.len().max(1)))
                        {
                            let p = &mut ps[*i];
                            p.next_failpoint = Some(point.to_owned());
                            if let Some(c) = p.child.as_mut() {
                                let _ = c.start_kill();
                                p.killed_by_us += 1;
                            }
                        }
                    }
                    "proxy" => {
                        let link = &links[rng.random_range(0..links.len())];
                        let mode = match rng.random_range(0..3) {
                            0 => LinkMode::Cut,
                            1 => LinkMode::Blackhole,
                            _ => LinkMode::Delay(rng.random_range(100..800)),
                        };
                        label = format!("proxy {} {mode:?}", link.name);
                        link.set(mode);
                        tokio::time::sleep(Duration::from_millis(rng.random_range(1500..4000)))
                            .await;
                        link.set(LinkMode::Pass);
                    }
                    "node" => {
                        if let Some(n) = node.as_mut() {
                            n.kill9().await;
                            tokio::time::sleep(Duration::from_millis(
                                500 + rng.random_range(0..1000),
                            ))
                            .await;
                            if let Err(e) = n.start().await {
                                eprintln!("[chaos] rabbitmq node restart failed: {e}");
                            }
                        }
                    }
                    "broker" => {
                        let _ = rabbitmqctl(
                            node_name.as_deref(),
                            &[
                                "close_all_connections",
                                "-p",
                                &vhost,
                                "chaos: connections dropped",
                            ],
                        );
                    }
                    _ => {
                        redis.kill9();
                        tokio::time::sleep(Duration::from_millis(500 + rng.random_range(0..1000)))
                            .await;
                        if let Err(e) = redis.restart().await {
                            eprintln!("[chaos] redis restart failed: {e}");
                        }
                    }
                }
                *fault_log.lock().await.counts.entry(label).or_default() += 1;
            }
            (redis, node)
        })
    };

    // Worker memory: VmRSS of every live worker process every 2 s.
    let rss_samples: Arc<Mutex<Vec<(f64, u32, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let sampling = {
        let (procs, samples, stop) = (procs.clone(), rss_samples.clone(), stop_faults.clone());
        let t0 = Instant::now();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for p in procs
                    .lock()
                    .await
                    .iter()
                    .filter(|p| p.name.starts_with("worker"))
                {
                    if let Some(pid) = p.child.as_ref().and_then(Child::id)
                        && let Some(kb) = rss_kib(pid)
                    {
                        samples
                            .lock()
                            .await
                            .push((t0.elapsed().as_secs_f64(), pid, kb));
                    }
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };
    publishing.await?;
    println!(
        "[chaos] published {} triggers; faults stop now, quiet period up to {}s",
        published.load(Ordering::Relaxed),
        args.quiet_seconds
    );
    stop_faults.store(true, Ordering::Relaxed);
    let (mut redis, mut node) = faulting.await?;
    let _ = sampling.await;
    let rss = rss_report(&rss_samples.lock().await);
    // The whole series, kept beside the logs (which go on success) to look at
    // the shape: a leak climbs, a backlog after an outage spikes and recedes.
    let csv: String = rss_samples
        .lock()
        .await
        .iter()
        .map(|(t, pid, kb)| format!("{t:.1},{pid},{kb}\n"))
        .collect();
    let _ = std::fs::write(
        std::env::temp_dir().join(format!("runbridge-chaos-{seed}-rss.csv")),
        format!("seconds,pid,rss_kib\n{csv}"),
    );
    if redis.is_down() {
        redis.restart().await?;
    }
    if let Some(n) = node.as_mut().filter(|n| n.is_down()) {
        n.start().await?;
    }

    // Quiet period: until every valid trigger's promise is settled, bounded.
    let store = runbridge::startup::store(&settings).await?;
    let deadline = Instant::now() + Duration::from_secs(args.quiet_seconds);
    while Instant::now() < deadline {
        let promises = all_promises(&store).await.unwrap_or_default();
        let settled = promises.iter().filter(|p| p.state.is_settled()).count();
        // Quiet means settled *and* the trigger queue drained: a re-published
        // copy or a redelivery after a crash may still be on its way to a
        // worker (which acks it as a duplicate). A copy that never drains is
        // still reported by the check below.
        if promises.len() == valid_ids.len()
            && settled == promises.len()
            && queue_depth(ctl_node, &vhost, &bs.triggers_queue).unwrap_or(1) == 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Let the relays publish the last settlements.
    let outbox_deadline = Instant::now() + Duration::from_secs(30);
    while store.outbox_len().await.unwrap_or(1) > 0 && Instant::now() < outbox_deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop_supervisor.store(true, Ordering::Relaxed);
    let _ = supervisor.await;

    // Stop everything with SIGTERM and record how each ended.
    let mut ps = procs.lock().await;
    for p in ps.iter_mut() {
        if let Some(c) = p.child.as_mut()
            && let Some(pid) = c.id()
        {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    for p in ps.iter_mut() {
        if let Some(mut c) = p.child.take() {
            match tokio::time::timeout(Duration::from_secs(30), c.wait()).await {
                Ok(Ok(s)) => p.exits.push(format!("final {}", exit_kind(&s))),
                _ => p.exits.push("final: did not stop on SIGTERM".into()),
            }
        }
    }

    let report = check(
        &args,
        seed,
        &bs,
        ctl_node,
        &vhost,
        &store,
        &valid_ids,
        &malformed_ids,
        published.load(Ordering::Relaxed),
        emu_port,
        &ps,
        &fault_log.lock().await.counts,
        &rss,
    )
    .await?;
    redis.kill9();
    drop(proxies);
    if let Some(mut c) = emulator.child.take() {
        let _ = c.start_kill();
    }
    let _ = rabbitmqctl(ctl_node, &["delete_vhost", &vhost]);
    if let Some(n) = node.as_mut() {
        n.kill9().await;
    }
    if report > 0 {
        println!(
            "[chaos] FAILED: {report} invariant(s) violated (seed {seed}; logs in {})",
            root.display()
        );
        std::process::exit(1);
    }
    println!("[chaos] all invariants hold (seed {seed})");
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

/// Over the second half of the run, for the worker process that lived
/// longest in it: RSS at its first and last sample there, and the change.
fn rss_report(samples: &[(f64, u32, u64)]) -> String {
    let Some(end) = samples.iter().map(|s| s.0).reduce(f64::max) else {
        return "no samples".into();
    };
    let half = end / 2.0;
    let mut by_pid: BTreeMap<u32, Vec<(f64, u64)>> = BTreeMap::new();
    for (t, pid, kb) in samples.iter().filter(|s| s.0 >= half) {
        by_pid.entry(*pid).or_default().push((*t, *kb));
    }
    let Some((pid, s)) = by_pid.iter().max_by(|a, b| {
        let span = |v: &Vec<(f64, u64)>| {
            v.last().map(|l| l.0).unwrap_or(0.0) - v.first().map(|f| f.0).unwrap_or(0.0)
        };
        span(a.1).total_cmp(&span(b.1))
    }) else {
        return "no samples".into();
    };
    let (first, last) = (s[0], s[s.len() - 1]);
    let peak = s.iter().map(|x| x.1).max().unwrap_or(0);
    format!(
        "pid {pid}: {} KiB at {:.0}s, {} KiB at {:.0}s (peak {peak} KiB, change {:+.1} %)",
        first.1,
        first.0,
        last.1,
        last.0,
        (last.1 as f64 - first.1 as f64) * 100.0 / first.1.max(1) as f64
    )
}

async fn all_promises(
    store: &runbridge::store::RedisStore,
) -> Result<Vec<runbridge::domain::Promise>> {
    let mut q = SearchQuery {
        id: "*".into(),
        limit: 1000,
        ..Default::default()
    };
    let mut out = Vec::new();
    loop {
        let page = store.search(&q).await?;
        out.extend(page.promises);
        match page.cursor {
            Some(c) => q.cursor = Some(c),
            None => return Ok(out),
        }
    }
}

/// What is left in the trigger queue once every process has stopped (so
/// nothing is unacked): each message's id, how often it was delivered and
/// its promise's state, to tell a late duplicate from a lost trigger.
async fn leftover_triggers(
    bs: &runbridge::broker::BrokerSettings,
    store: &runbridge::store::RedisStore,
) -> String {
    let Ok(b) = Broker::connect(bs).await else {
        return "(could not connect to inspect them)".into();
    };
    let mut out = Vec::new();
    if let Ok(mut l) = b.consume_queue(&bs.triggers_queue).await {
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(3), l.next()).await {
            let v: Value = serde_json::from_slice(&m.body).unwrap_or(Value::Null);
            let id = v["id"].as_str().unwrap_or("<no id>").to_owned();
            let state = match runbridge::domain::PromiseId::parse(&id) {
                Ok(pid) => match store.get(&pid).await {
                    Ok(Some(p)) => p.state.to_string(),
                    Ok(None) => "no promise".into(),
                    Err(e) => format!("store error {e}"),
                },
                Err(_) => "invalid id".into(),
            };
            out.push(format!(
                "{id} (delivery count {}, promise {state})",
                m.headers
                    .get("x-delivery-count")
                    .map(String::as_str)
                    .unwrap_or("0")
            ));
        }
    }
    b.close().await;
    out.join(", ")
}

fn queue_depth(node: Option<&str>, vhost: &str, queue: &str) -> Result<u64> {
    let out = rabbitmqctl(
        node,
        &["list_queues", "-q", "-p", vhost, "name", "messages"],
    )?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            (it.next()? == queue)
                .then(|| it.next()?.parse().ok())
                .flatten()
        })
        .next()
        .unwrap_or(0))
}

#[allow(clippy::too_many_arguments)]
async fn check(
    args: &Args,
    seed: u64,
    bs: &runbridge::broker::BrokerSettings,
    node: Option<&str>,
    vhost: &str,
    store: &runbridge::store::RedisStore,
    valid_ids: &HashSet<String>,
    malformed_ids: &HashSet<String>,
    published: usize,
    emu_port: u16,
    procs: &[Proc],
    faults: &BTreeMap<String, usize>,
    rss: &str,
) -> Result<usize> {
    let mut violations: Vec<String> = Vec::new();

    // Runs and idempotency tokens, from the emulator's record.
    let runs: Value = reqwest::get(format!("http://127.0.0.1:{emu_port}/emulator/runs"))
        .await?
        .json()
        .await?;
    let runs = runs["runs"].as_array().cloned().unwrap_or_default();
    let mut per_token: HashMap<String, usize> = HashMap::new();
    let mut per_promise: HashMap<String, usize> = HashMap::new();
    for r in &runs {
        *per_token
            .entry(r["idempotency_token"].as_str().unwrap_or("none").to_owned())
            .or_default() += 1;
        *per_promise
            .entry(r["params"]["promise_id"].as_str().unwrap_or("").to_owned())
            .or_default() += 1;
    }
    let max_per_token = per_token.values().copied().max().unwrap_or(0);
    let duplicate_runs = per_promise.values().filter(|n| **n > 1).count();
    if max_per_token > 1 {
        violations.push(format!("{max_per_token} runs for one idempotency token"));
    }
    if duplicate_runs > 0 {
        violations.push(format!("{duplicate_runs} promises with more than one run"));
    }
    let launched: HashSet<&String> = per_promise.keys().collect();
    let not_launched = valid_ids.iter().filter(|id| !launched.contains(id)).count();
    if not_launched > 0 {
        violations.push(format!(
            "{not_launched} valid triggers never launched a run"
        ));
    }

    // Final promise records.
    let promises = all_promises(store).await?;
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    for p in &promises {
        *by_state.entry(p.state.to_string()).or_default() += 1;
    }
    let pending = by_state.get("PENDING").copied().unwrap_or(0);
    if pending > 0 {
        violations.push(format!("{pending} promises left pending"));
    }
    let ids: HashSet<String> = promises.iter().map(|p| p.id.to_string()).collect();
    let missing = valid_ids.difference(&ids).count();
    if missing > 0 {
        violations.push(format!("{missing} valid triggers have no promise"));
    }

    // Every event the independent consumer received.
    let b = Broker::connect(bs).await?;
    let mut l = b.consume_queue("chaos.events").await?;
    let mut events: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    let mut received = 0usize;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(5), l.next()).await {
        received += 1;
        events
            .entry(ev.message_id.unwrap_or_default())
            .or_default()
            .push(ev.body);
    }
    let triggers_left = queue_depth(node, vhost, &bs.triggers_queue)?;
    // Dead letters, by trigger id: exactly the malformed ones (a copy of one
    // re-published after a lost confirm counts once).
    let mut dl = b.consume_queue(&bs.dead_letter_queue).await?;
    let mut dead_ids: HashSet<String> = HashSet::new();
    let mut dead = 0usize;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(3), dl.next()).await {
        dead += 1;
        let v: Value = serde_json::from_slice(&ev.body).unwrap_or(Value::Null);
        dead_ids.insert(v["id"].as_str().unwrap_or("<no id>").to_owned());
    }
    b.close().await;
    let mut lost = 0usize;
    let mut wrong_state = 0usize;
    for p in promises.iter().filter(|p| p.state.is_settled()) {
        let want = format!("{}/{}", p.id, p.state);
        if !events.contains_key(&want) {
            lost += 1;
        }
        // Another event id for the same promise would mean a second settlement.
        for s in runbridge::domain::State::ALL {
            let other = format!("{}/{}", p.id, s);
            if s != p.state && events.contains_key(&other) {
                wrong_state += 1;
            }
        }
    }
    let differing = events
        .values()
        .filter(|bodies| bodies.iter().any(|b| b != &bodies[0]))
        .count();
    if lost > 0 {
        violations.push(format!("{lost} settlements without an event"));
    }
    if wrong_state > 0 {
        violations.push(format!(
            "{wrong_state} events for a state the promise did not end in (settled twice)"
        ));
    }
    if differing > 0 {
        violations.push(format!(
            "{differing} event ids delivered with different bodies"
        ));
    }
    let settled = promises.iter().filter(|p| p.state.is_settled()).count();
    if events.len() != settled {
        violations.push(format!(
            "{} distinct event ids for {settled} settled promises",
            events.len()
        ));
    }
    if triggers_left > 0 {
        violations.push(format!(
            "{triggers_left} triggers still in the queue: {}",
            leftover_triggers(bs, store).await
        ));
    }
    let wrongly_dead: Vec<&String> = dead_ids.difference(malformed_ids).collect();
    if !wrongly_dead.is_empty() {
        violations.push(format!(
            "{} valid triggers dead-lettered: {:?}",
            wrongly_dead.len(),
            wrongly_dead.iter().take(5).collect::<Vec<_>>()
        ));
    }
    let not_dead = malformed_ids.difference(&dead_ids).count();
    if not_dead > 0 {
        violations.push(format!("{not_dead} malformed triggers not dead-lettered"));
    }
    if published != args.triggers {
        violations.push(format!("published {published} of {}", args.triggers));
    }

    // Processes: killed by us, aborted at a failpoint, or a clean exit 1 at
    // start-up during an outage are expected; a panic never is.
    let mut panics = 0;
    for p in procs {
        let log = std::fs::read_to_string(&p.log).unwrap_or_default();
        let n = log.matches("panicked").count();
        if n > 0 {
            panics += n;
            violations.push(format!(
                "{} panicked {n} times (see {})",
                p.name,
                p.log.display()
            ));
        }
        for e in &p.exits {
            if !(e == "SIGKILL" || e == "SIGABRT" || e == "exit 1" || e == "final exit 0") {
                violations.push(format!("{} ended with {e}", p.name));
            }
        }
    }
    let restarts: usize = procs
        .iter()
        .map(|p| p.exits.iter().filter(|e| !e.starts_with("final")).count())
        .sum();
    let aborts: usize = procs
        .iter()
        .map(|p| p.exits.iter().filter(|e| *e == "SIGABRT").count())
        .sum();

    println!();
    println!("| chaos run (seed {seed}) | value |");
    println!("|---|---|");
    let rows: Vec<(String, String)> = vec![
        ("triggers published".into(), published.to_string()),
        (
            "  of which malformed (dead-lettered by design)".into(),
            malformed_ids.len().to_string(),
        ),
        (
            "distinct runs launched".into(),
            per_promise.len().to_string(),
        ),
        (
            "runs per idempotency token (max)".into(),
            max_per_token.to_string(),
        ),
        ("duplicate runs".into(), duplicate_runs.to_string()),
        ("promises settled by state".into(), format!("{by_state:?}")),
        ("promises left pending".into(), pending.to_string()),
        ("events received".into(), received.to_string()),
        ("distinct event ids".into(), events.len().to_string()),
        ("events lost".into(), lost.to_string()),
        (
            "dead-lettered (messages / distinct triggers)".into(),
            format!("{dead} / {}", dead_ids.len()),
        ),
        ("faults injected".into(), format!("{faults:?}")),
        (
            "process exits (restarted) / failpoint aborts".into(),
            format!("{restarts} / {aborts}"),
        ),
        ("panics".into(), panics.to_string()),
        (
            "worker RSS, second half (longest-lived process)".into(),
            rss.to_string(),
        ),
        ("violations".into(), violations.len().to_string()),
    ];
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
    for v in &violations {
        println!("VIOLATION: {v}");
    }
    Ok(violations.len())
}
