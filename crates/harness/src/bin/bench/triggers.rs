//! B1 (trigger throughput against a lapin consumer that only acks), B2
//! (latency hiding with a slow Databricks) and B6 (worker memory with
//! promises in flight) all drain a pre-published queue with one worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use runbridge_harness::rss_kib;

use crate::lab::{
    Env, emulator, emulator_runs, publish_all, queue_state, raw_channel, stop, trigger_bodies,
};

pub(crate) struct Drain {
    pub(crate) rate: f64,
    pub(crate) seconds: f64,
    pub(crate) peak_rss_kib: u64,
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

/// B1's baseline: a plain lapin consumer on a queue declared by the same
/// topology code (quorum, same arguments), same prefetch, that only acks.
pub(crate) async fn baseline_consumer(
    env: &Env,
    tag: &str,
    n: usize,
    prefetch: u16,
) -> Result<f64> {
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
