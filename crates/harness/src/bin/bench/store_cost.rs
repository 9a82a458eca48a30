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

/// B5 and B5+ for ids of 29 characters (the bench's own) and of 64.
pub(crate) async fn b5(env: &Env, n: usize) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for id_len in [29, 64] {
        rows.extend(b5_ids(env, n, id_len).await?);
    }
    Ok(rows)
}

/// `n` pending promises with run ids and ids of `id_len` characters: the
/// record (`MEMORY USAGE` over a sample) and, for B5+, every per-partition
/// key holding an entry for them, divided by `n`.
async fn b5_ids(env: &Env, n: usize, id_len: usize) -> Result<Vec<Row>> {
    // Short tags: with the run's name they make the 29-character ids.
    let tag = if id_len <= 29 { "b5" } else { "b5w" };
    let s = env.settings(tag, &[])?;
    let store = runbridge::startup::store(&s).await?;
    let client = redis::Client::open(env.redis_url.as_str())?;
    let c = client.get_multiplexed_async_connection().await?;
    // `<run>-b5-0000001`, padded with x to `id_len`.
    let base = format!("{}-{tag}", env.run_id);
    let pad = id_len.saturating_sub(base.len() + 8);
    let prefix = format!("{base}{}", "x".repeat(pad));
    let ids: Vec<_> = pending_promises(
        &store,
        &prefix,
        n,
        Timeout::After(Duration::from_secs(3600)),
    )
    .await?
    .into_iter()
    .map(|p| p.id)
    .collect();
    let shown = ids[0].as_str().len();
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
    // Its entries in the partition indexes: deadline and poll schedules,
    // run ids, and the pending count and ids by creation second.
    let mut index = 0u64;
    let mut conn = c.clone();
    for p in 0..keys.partitions() {
        let mut per_partition = vec![
            keys.deadlines(p),
            keys.polls(p),
            keys.runs(p),
            keys.pending_by_second(p),
            keys.pending_seconds(p),
        ];
        let seconds: Vec<u64> = redis::cmd("ZRANGE")
            .arg(keys.pending_seconds(p))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await?;
        per_partition.extend(
            seconds
                .into_iter()
                .map(|sec| keys.pending_in_second(p, sec)),
        );
        for key in per_partition {
            index += usage(key).await?;
        }
    }
    let per_index = index as f64 / n as f64;
    let total = hash + per_index;
    Ok(vec![
        Row {
            id: "B5",
            cpu: Vec::new(),
            scenario: format!(
                "Redis memory per pending promise, ids of {shown} characters: the record (MEMORY USAGE of {k} of {n}, empty payload)"
            ),
            runbridge: hash,
            baseline: None,
            unit: "bytes",
            ratio: None,
            target: "≤ 512 bytes".into(),
            met: hash <= 512.0,
            notes: format!(
                "key prefix of {}; its index entries (deadline and poll sets, run-id hash, pending count and ids by creation second) add {per_index:.0} bytes each promise",
                env.run_id.len() + tag.len() + 1,
            ),
        },
        Row {
            id: "B5+",
            cpu: Vec::new(),
            scenario: format!("the same with its index entries, ids of {shown} characters"),
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
        cpu: Vec::new(),
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
