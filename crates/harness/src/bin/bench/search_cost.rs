//! B9: what a search for pending promises costs as settled ones pile up
//! (they are kept for the retention period): the same search among 1,000
//! and among 1,000,000 settled promises, on a private Redis.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{StreamExt, stream};
use runbridge::domain::{Payload, PromiseId, SettledBy, State};
use runbridge::store::{PromiseStore, RedisStore, SearchQuery, Settle, Timeout};
use runbridge_testkit::RedisServer;

use crate::lab::{Env, new_promise};
use crate::report::Row;

/// Pending promises the search finds.
const PENDING: usize = 100;

pub(crate) async fn b9(env: &Env, settled: usize) -> Result<Row> {
    let redis = RedisServer::ephemeral()
        .await
        .context("starting a private redis-server for B9")?;
    let s = env.settings(
        "b9",
        &[("redis.url", redis.url()), ("redis.pool_size", "64".into())],
    )?;
    let store = runbridge::startup::store(&s).await?;
    let prefix = format!("{}-b9", env.run_id);
    let pending: Vec<PromiseId> = (0..PENDING)
        .map(|i| PromiseId::parse(&format!("{prefix}-pending-{i:04}")))
        .collect::<Result<_, _>>()?;
    for id in &pending {
        store
            .create(&new_promise(
                id,
                Timeout::After(Duration::from_secs(86_400)),
            ))
            .await?;
    }
    let small_n = 1_000.min(settled);
    settle_many(&store, &prefix, 0..small_n).await?;
    let reps = 7;
    let small = searches(&store, reps).await?;
    let t = Instant::now();
    // In slices, the outboxes emptied after each (no relay runs here; a
    // million settlement entries would only cost memory).
    let mut from = small_n;
    while from < settled {
        let to = (from + 100_000).min(settled);
        settle_many(&store, &prefix, from..to).await?;
        trim_outboxes(&store, &redis.url()).await?;
        from = to;
    }
    let fill_s = t.elapsed().as_secs_f64();
    let large = searches(&store, reps).await?;
    drop(redis);
    let ratio = large / small;
    Ok(Row {
        id: "B9",
        cpu: Vec::new(),
        scenario: format!(
            "search for the {PENDING} pending promises among {settled} settled (every page, limit 1000; median of {reps})"
        ),
        runbridge: large,
        baseline: Some(small),
        unit: "ms per search",
        ratio: Some(ratio),
        target: "ratio ≤ 2".into(),
        met: ratio <= 2.0,
        notes: format!(
            "baseline: the same search among {small_n} settled; creating and settling the rest took {fill_s:.0} s"
        ),
    })
}

/// Creates and settles (RESOLVED) promises `range` of the bench's names.
async fn settle_many(
    store: &RedisStore,
    prefix: &str,
    range: std::ops::Range<usize>,
) -> Result<()> {
    let done: Vec<Result<()>> = stream::iter(range)
        .map(|i| async move {
            let id = PromiseId::parse(&format!("{prefix}-settled-{i:08}"))?;
            store
                .create(&new_promise(
                    &id,
                    Timeout::After(Duration::from_secs(86_400)),
                ))
                .await?;
            store
                .settle(&Settle {
                    id,
                    target: State::Resolved,
                    value: Payload::data("\"ok\""),
                    ikey: None,
                    strict: false,
                    settled_by: SettledBy::Operator,
                    cancel_run: false,
                    capability: None,
                })
                .await?;
            Ok(())
        })
        .buffer_unordered(512)
        .collect()
        .await;
    done.into_iter().collect()
}

async fn trim_outboxes(store: &RedisStore, url: &str) -> Result<()> {
    let mut c = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    for p in 0..store.keys().partitions() {
        let _: () = redis::cmd("XTRIM")
            .arg(store.keys().outbox(p))
            .arg("MAXLEN")
            .arg(0)
            .query_async(&mut c)
            .await?;
    }
    Ok(())
}

/// Median time of `reps` complete searches for PENDING (every page).
async fn searches(store: &RedisStore, reps: usize) -> Result<f64> {
    let mut times = Vec::new();
    for _ in 0..=reps {
        let t = Instant::now();
        let mut q = SearchQuery {
            id: runbridge::domain::IdPattern::any(),
            states: Some(vec![State::Pending]),
            limit: 1000,
            ..Default::default()
        };
        let mut found = 0;
        loop {
            let page = store.search(&q).await?;
            found += page.promises.len();
            match page.cursor {
                Some(c) => q.cursor = Some(c),
                None => break,
            }
        }
        if found != PENDING {
            bail!("B9: a search found {found} pending promises, not {PENDING}");
        }
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // The first, untimed: script loading and pool connections.
    times.remove(0);
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
