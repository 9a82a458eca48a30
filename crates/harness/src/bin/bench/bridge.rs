//! B8: runbridge against the bridge a team writes by hand
//! (`bench/baselines/python_bridge`: a pika worker and a Flask app under
//! gunicorn, one process each), on the same emulator, broker and Redis.
//!
//! Each side, in turn: `n + rate·seconds` triggers pre-published; its
//! worker drains them (the trigger loop); then `n` resolves over 64
//! keep-alive connections until an independent consumer has all `n` events
//! (the callback loop, end to end); then resolves at `rate` per second, each
//! timed until its event arrives (callback → event latency).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use runbridge::broker::Broker;
use runbridge_testkit::free_port;
use tokio::process::{Child, Command};

use crate::lab::{
    Env, callback_tokens, consuming, drained, emulator, publish_all, raw_channel, stop,
    trigger_bodies, wait_port,
};
use crate::measure::{closed_loop, event_index, failures, percentile};
use crate::report::Row;

/// One side's figures.
struct Side {
    trigger_rate: f64,
    callback_rate: f64,
    p50: f64,
    p99: f64,
}

/// Where the Python bridge and its virtualenv are (`make bench` makes it).
pub(crate) struct Python {
    pub(crate) interpreter: PathBuf,
    pub(crate) dir: PathBuf,
}

pub(crate) async fn b8(
    env: &Env,
    py: &Python,
    n: usize,
    rate: u64,
    seconds: u64,
) -> Result<Vec<Row>> {
    let hand = side(env, "b8py", Some(py), n, rate, seconds)
        .await
        .context("B8, the Python bridge")?;
    let rb = side(env, "b8rb", None, n, rate, seconds)
        .await
        .context("B8, runbridge")?;
    let t = rb.trigger_rate / hand.trigger_rate;
    let c = rb.callback_rate / hand.callback_rate;
    let lower = rb.p50 < hand.p50 && rb.p99 < hand.p99;
    let row = |scenario: String,
               a: f64,
               b: f64,
               unit: &'static str,
               ratio: Option<f64>,
               target: &str,
               met: bool| Row {
        id: "B8",
        cpu: Vec::new(),
        scenario,
        runbridge: a,
        baseline: Some(b),
        unit,
        ratio,
        target: target.into(),
        met,
        notes: String::new(),
    };
    let mut rows = vec![
        row(
            format!(
                "trigger loop, {} triggers: runbridge worker vs the Python worker (pika, redis-py, requests)",
                n as u64 + rate * seconds
            ),
            rb.trigger_rate,
            hand.trigger_rate,
            "triggers/s",
            Some(t),
            "ratio ≥ 10",
            t >= 10.0,
        ),
        row(
            format!(
                "callback loop, {n} resolves over 64 connections until every event is out: runbridge sidecar and relay vs the Flask app"
            ),
            rb.callback_rate,
            hand.callback_rate,
            "resolves/s",
            Some(c),
            "ratio ≥ 10",
            c >= 10.0,
        ),
    ];
    for (name, a, b) in [("p50", rb.p50, hand.p50), ("p99", rb.p99, hand.p99)] {
        rows.push(row(
            format!("callback → event latency {name}, {rate} resolves/s for {seconds} s"),
            a,
            b,
            "ms",
            Some(a / b),
            "lower than the baseline's",
            a < b,
        ));
    }
    rows[0].notes = format!(
        "one process each side for each loop; latency lower at both percentiles: {}",
        if lower { "yes" } else { "no" }
    );
    Ok(rows)
}

async fn side(
    env: &Env,
    tag: &str,
    py: Option<&Python>,
    n: usize,
    rate: u64,
    seconds: u64,
) -> Result<Side> {
    let total = n + (rate * seconds) as usize;
    let (_emu, emu_port) = emulator(env, tag, 0).await?;
    let s = env.settings(tag, &[])?;
    let bs = runbridge::startup::broker_settings(&s, "bench");
    // Topology (queues, the events exchange) and the independent consumer,
    // bound before anything is settled.
    let b = Broker::connect(&bs).await?;
    b.declare_topology().await?;
    let mut listener = b.listen(Some(&bs.events_exchange), "promise.#").await?;
    let prefix = format!("{}-{tag}", env.run_id);
    publish_all(&bs, trigger_bodies(&prefix, total)).await?;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let callback_base = format!("http://{listen}");
    // Each side's settings, for its worker and its callback server alike.
    let vars = match py {
        Some(_) => python_env(
            env,
            tag,
            &bs.triggers_queue,
            &bs.events_exchange,
            emu_port,
            &callback_base,
        ),
        None => env.child_env(
            tag,
            Some(emu_port),
            &[("RUNBRIDGE__SIDECAR__LISTEN", listen.as_str())],
        ),
    };
    let mut worker = match py {
        Some(py) => python(
            env,
            py,
            &format!("{tag}-worker"),
            &[py.dir.join("worker.py").display().to_string()],
            &vars,
        )?,
        None => env.spawn(&format!("{tag}-worker"), &["worker"], &vars)?,
    };

    // The trigger loop: from the first consumer until every run exists.
    let (_conn, ch) = raw_channel(&env.amqp_url()).await?;
    let http = reqwest::Client::new();
    let limit = Instant::now() + Duration::from_secs(600);
    let start = consuming(&mut worker, &ch, &bs.triggers_queue, limit)
        .await
        .with_context(|| tag.to_string())?;
    drained(&ch, &bs.triggers_queue, &http, emu_port, total, limit)
        .await
        .with_context(|| tag.to_string())?;
    let trigger_rate = total as f64 / start.elapsed().as_secs_f64();

    // The callback side.
    let signer = runbridge::startup::signer(&s)?;
    let mut server = match py {
        Some(py) => python(
            env,
            py,
            &format!("{tag}-app"),
            &[
                "-m".into(),
                "gunicorn".into(),
                "--chdir".into(),
                py.dir.display().to_string(),
                "-w".into(),
                "1".into(),
                "-k".into(),
                "gthread".into(),
                "--threads".into(),
                "16".into(),
                "-b".into(),
                listen.clone(),
                "app:app".into(),
            ],
            &vars,
        )?,
        None => env.spawn(&format!("{tag}-sidecar"), &["sidecar"], &vars)?,
    };
    wait_port(port, "callback server").await?;
    // The runbridge worker's relay joins its consumer group.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // runbridge's tokens are bound to each promise's creation time: read
    // before the clock starts.
    let tokens = match py {
        Some(_) => Vec::new(),
        None => {
            let ids = (0..total)
                .map(|i| runbridge::domain::PromiseId::parse(&format!("{prefix}-{i:07}")))
                .collect::<Result<Vec<_>, _>>()?;
            let store = runbridge::startup::store(&s).await?;
            callback_tokens(&store, &signer, &ids).await?
        }
    };
    let url = |i: usize| {
        let id = format!("{prefix}-{i:07}");
        match (py, tokens.get(i)) {
            (Some(_), _) => format!("{callback_base}/resolve?id={id}&value=ok"),
            (None, Some(Some(token))) => {
                format!("{callback_base}/cb/{token}/resolve?id={id}&value=ok")
            }
            (None, _) => String::new(),
        }
    };
    let t = Instant::now();
    let loads: Vec<String> = (0..n).map(url).collect();
    let received = Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    let events = tokio::spawn(async move {
        let mut seen = HashSet::new();
        let mut at = Vec::new();
        while seen.len() < total {
            let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(30), listener.next()).await
            else {
                break;
            };
            let Some(i) = event_index(ev.message_id.as_deref()) else {
                continue;
            };
            if seen.insert(i) {
                counter.store(seen.len(), Ordering::Relaxed);
                at.push((i, Instant::now()));
            }
        }
        at
    });
    closed_loop(Arc::new(loads), 64).await?;
    // The latency phase starts once the closed loop's events are all out,
    // so it measures an idle bridge.
    let wait_out = Instant::now() + Duration::from_secs(120);
    while received.load(Ordering::Relaxed) < n && Instant::now() < wait_out {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let clients: Vec<reqwest::Client> = (0..32)
        .map(|_| {
            reqwest::Client::builder()
                .http1_only()
                .build()
                .unwrap_or_default()
        })
        .collect();
    let mut sent = Vec::new();
    let t1 = Instant::now();
    let mut sends = Vec::new();
    for (k, i) in (n..total).enumerate() {
        tokio::time::sleep_until((t1 + interval * k as u32).into()).await;
        let c = clients[k % clients.len()].clone();
        let u = url(i);
        sent.push((i, Instant::now()));
        sends.push(tokio::spawn(async move {
            matches!(c.post(u).send().await, Ok(r) if r.status().is_success())
        }));
    }
    let failed = failures(sends).await;
    let arrived = events.await?;
    stop(&mut server).await;
    stop(&mut worker).await;
    b.close().await;
    if failed > 0 {
        bail!("{tag}: {failed} timed resolves failed");
    }
    let got: std::collections::HashMap<usize, Instant> = arrived.into_iter().collect();
    // The callback loop is done when the last of its n events arrived.
    let loop_events: Vec<&Instant> = (0..n).filter_map(|i| got.get(&i)).collect();
    let Some(all_out) = loop_events.iter().max().filter(|_| loop_events.len() == n) else {
        bail!(
            "{tag}: only {} of {n} events of the callback loop arrived",
            loop_events.len()
        );
    };
    let callback_rate = n as f64 / all_out.duration_since(t).as_secs_f64();
    let mut lat: Vec<f64> = Vec::new();
    for (i, at) in &sent {
        let Some(ev) = got.get(i) else {
            bail!("{tag}: the event of timed resolve {i} never arrived");
        };
        lat.push(ev.duration_since(*at).as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    Ok(Side {
        trigger_rate,
        callback_rate,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
    })
}

fn python_env(
    env: &Env,
    tag: &str,
    queue: &str,
    exchange: &str,
    emu_port: u16,
    callback_base: &str,
) -> Vec<(String, String)> {
    [
        ("BRIDGE_AMQP_URL", env.amqp_url()),
        ("BRIDGE_TRIGGERS_QUEUE", queue.to_owned()),
        ("BRIDGE_EVENTS_EXCHANGE", exchange.to_owned()),
        ("BRIDGE_REDIS_URL", env.redis_url.clone()),
        ("BRIDGE_KEY_PREFIX", format!("{}-{tag}", env.run_id)),
        ("DATABRICKS_HOST", format!("http://127.0.0.1:{emu_port}")),
        ("DATABRICKS_TOKEN", "dapi-bench".to_owned()),
        ("BRIDGE_CALLBACK_URL", callback_base.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn python(
    env: &Env,
    py: &Python,
    name: &str,
    args: &[String],
    vars: &[(String, String)],
) -> Result<Child> {
    let log = std::fs::File::create(env.logs.join(format!("{name}.log")))?;
    Command::new(&py.interpreter)
        .args(args)
        .envs(vars.iter().cloned())
        .current_dir(&py.dir)
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} {args:?}", py.interpreter.display()))
}

/// The Python bridge beside the config directory's checkout, and the
/// virtualenv `make bench` installs its requirements into.
pub(crate) fn locate(config_dir: &Path, interpreter: Option<PathBuf>) -> Result<Python> {
    let root = config_dir
        .parent()
        .context("the config directory has no parent")?;
    let dir = root.join("bench/baselines/python_bridge");
    let interpreter = interpreter.unwrap_or_else(|| root.join("target/benchvenv/bin/python"));
    if !interpreter.exists() || !dir.join("worker.py").exists() {
        bail!(
            "B8 needs {} and the bridge in {} (make bench installs its requirements)",
            interpreter.display(),
            dir.display()
        );
    }
    Ok(Python { interpreter, dir })
}
