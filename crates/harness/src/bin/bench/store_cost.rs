//! What the store costs: B5 Redis memory per pending promise, B7 the
//! deadline sweep with many promises pending.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{StreamExt, stream};
use runbridge::domain::PromiseId;
use runbridge::reconciler::Reconciler;
use runbridge::store::{Lifecycle, PromiseStore, RedisStore, Timeout};
use runbridge_testkit::RedisServer;

use crate::lab::{Env, new_promise, pending_promises};
use crate::report::Row;

pub(crate) async fn b5(env: &Env, n: usize) -> Result<Vec<Row>> {
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

/// Median time of `reps` sweeps, each over 100 freshly due promises.
pub(crate) async fn sweeps(
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

pub(crate) async fn b7(env: &Env, pending: usize) -> Result<Row> {
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
