//! B1 (trigger throughput against a lapin consumer that only acks), B1′
//! (the same, with one HTTP call per trigger on both sides), B2 (latency
//! hiding with a slow Databricks) and B6 (worker memory with promises in
//! flight) all drain a pre-published queue with one worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use runbridge_harness::rss_kib;

use crate::cpu::{PerOp, Watched};
use crate::lab::{
    Env, consuming, drained, emulator, publish_all, raw_channel, stop, trigger_bodies, wait_port,
};

pub(crate) struct Drain {
    pub(crate) rate: f64,
    pub(crate) seconds: f64,
    pub(crate) peak_rss_kib: u64,
    /// CPU per trigger, by process, over the drain.
    pub(crate) cpu: PerOp,
}

/// What answers the worker's Databricks calls.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Databricks {
    /// The emulator, adding this many ms to every `run-now`.
    Emulator { launch_latency_ms: u64 },
    /// The bench's minimal responder ([`responder`]): no emulator cost.
    Responder,
}

/// B1′'s minimal responder (`bench responder`, a child process): `run-now`
/// answers `{"run_id": n}` at once, `jobs/get` describes a job with the three
/// job parameters (so the worker launches without a retry), and
/// `/emulator/stats` counts the runs as the emulator's does. Nothing is
/// stored: the least an HTTP peer can do.
pub(crate) async fn responder(listen: &str) -> Result<()> {
    use axum::routing::{get, post};
    let runs = Arc::new(AtomicU64::new(0));
    let app = axum::Router::new()
        .route(
            "/api/2.2/jobs/run-now",
            post(
                |axum::extract::State(runs): axum::extract::State<Arc<AtomicU64>>| async move {
                    let n = runs.fetch_add(1, Ordering::Relaxed) + 1;
                    axum::Json(serde_json::json!({"run_id": n, "number_in_job": n}))
                },
            ),
        )
        .route(
            "/api/2.2/jobs/get",
            get(|| async {
                axum::Json(
                    serde_json::json!({"job_id": 1, "settings": {"name": "bench", "parameters": [
                        {"name": "promise_id", "default": ""},
                        {"name": "url", "default": ""},
                        {"name": "callback_token", "default": ""}
                    ]}}),
                )
            }),
        )
        .route(
            "/emulator/stats",
            get(
                |axum::extract::State(runs): axum::extract::State<Arc<AtomicU64>>| async move {
                    axum::Json(serde_json::json!({"runs": runs.load(Ordering::Relaxed)}))
                },
            ),
        )
        .with_state(runs);
    let l = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(l, app).await?;
    Ok(())
}

/// Starts the responder as a child process of this binary.
pub(crate) async fn spawn_responder(env: &Env, tag: &str) -> Result<(tokio::process::Child, u16)> {
    let port = runbridge_testkit::free_port();
    let log = std::fs::File::create(env.logs.join(format!("{tag}-responder.log")))?;
    let child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["responder", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    wait_port(port, "responder").await?;
    Ok((child, port))
}

/// Pre-publishes `n` triggers, starts one `runbridge worker` with
/// `prefetch`, and times from its consumer's appearance until the queue is
/// empty and the emulator holds a run for each. Samples the worker's RSS
/// throughout and for `hold` afterwards (the reconciler then checks the
/// runs it just launched).
pub(crate) async fn drain_with_worker(
    env: &Env,
    tag: &str,
    n: usize,
    prefetch: u32,
    databricks: Databricks,
    hold: Duration,
    extra_env: &[(&str, &str)],
) -> Result<Drain> {
    let (peer, emu_port, peer_name) = match databricks {
        Databricks::Emulator { launch_latency_ms } => {
            let (c, p) = emulator(env, tag, launch_latency_ms).await?;
            (c, p, "emulator")
        }
        Databricks::Responder => {
            let (c, p) = spawn_responder(env, tag).await?;
            (c, p, "responder")
        }
    };
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
    let watched = Watched::with_services(&[("worker", worker.id()), (peer_name, peer.id())]);
    let limit = Instant::now() + Duration::from_secs(300);
    let start = consuming(&mut worker, &ch, &bs.triggers_queue, limit)
        .await
        .with_context(|| tag.to_string())?;
    let cpu_start = watched.snapshot();
    drained(&ch, &bs.triggers_queue, &http, emu_port, n, limit)
        .await
        .with_context(|| tag.to_string())?;
    let seconds = start.elapsed().as_secs_f64();
    let cpu = cpu_start.per_op(&watched.snapshot(), n);
    tokio::time::sleep(hold).await;
    sampling.abort();
    stop(&mut worker).await;
    Ok(Drain {
        rate: n as f64 / seconds,
        seconds,
        peak_rss_kib: peak.load(Ordering::Relaxed),
        cpu,
    })
}

/// B1's baseline: a plain lapin consumer on a queue declared by the same
/// topology code (quorum, same arguments), same prefetch, that only acks.
/// B1′'s (`responder` given): the same consumer makes one HTTP `POST` of the
/// trigger to the responder's `run-now` per message, then acks; as many
/// calls in flight as the prefetch lets messages be unacknowledged, as the
/// worker has. Returns triggers per second and CPU per trigger.
pub(crate) async fn baseline_consumer(
    env: &Env,
    tag: &str,
    n: usize,
    prefetch: u16,
    responder: bool,
) -> Result<(f64, PerOp)> {
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
    let s = env.settings(tag, &[])?;
    let bs = runbridge::startup::broker_settings(&s, "bench");
    publish_all(&bs, trigger_bodies(&format!("{}-{tag}", env.run_id), n)).await?;
    let peer = if responder {
        Some(spawn_responder(env, tag).await?)
    } else {
        None
    };
    let url = peer
        .as_ref()
        .map(|(_, port)| format!("http://127.0.0.1:{port}/api/2.2/jobs/run-now"));
    let http = reqwest::Client::new();
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
    let watched = Watched::with_services(&[("responder", peer.as_ref().and_then(|(c, _)| c.id()))]);
    let cpu_start = watched.snapshot();
    let start = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await
            .context("baseline consumer stalled")?
            .context("baseline consumer ended")??;
        match &url {
            None => {
                d.ack(BasicAckOptions::default()).await?;
            }
            Some(url) => {
                let (http, url) = (http.clone(), url.clone());
                calls.spawn(async move {
                    let r = http.post(url).body(d.data.clone()).send().await?;
                    let _ = r.error_for_status()?.bytes().await?;
                    d.ack(BasicAckOptions::default()).await?;
                    anyhow::Ok(())
                });
                // Finished calls are collected as they go, so the set stays small.
                while let Some(done) = calls.try_join_next() {
                    done??;
                }
            }
        }
    }
    while let Some(done) = calls.join_next().await {
        done??;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    Ok((rate, cpu_start.per_op(&watched.snapshot(), n)))
}
