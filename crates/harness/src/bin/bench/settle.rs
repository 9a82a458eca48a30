//! B3 (settle throughput against an axum handler doing one Redis SET) and
//! B4 (settle → event latency at a steady rate).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use runbridge::broker::Broker;
use runbridge::store::Timeout;
use runbridge_testkit::free_port;
use tokio::process::Command;

use crate::cpu::Watched;
use crate::lab::{Env, pending_promises, stop, wait_port};
use crate::measure::{closed_loop, event_index, failures, percentile};
use crate::report::{Curves, Row};

/// B3's baseline server (run as a child process, like the sidecar): the
/// least an HTTP settle endpoint could do, one `SET` per request on a shared
/// multiplexed connection (no pool checkout at all).
pub(crate) async fn baseline_server(listen: &str, redis_url: &str) -> Result<()> {
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
pub(crate) async fn b3(env: &Env, tag: &str, n: usize) -> Result<(Row, Vec<f64>, Vec<f64>)> {
    const CONNS: usize = 64;
    let s = env.settings(tag, &[])?;
    let store = runbridge::startup::store(&s).await?;
    let signer = runbridge::startup::signer(&s)?;
    let promises = pending_promises(
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
    let urls: Vec<String> = promises
        .iter()
        .map(|p| {
            format!(
                "http://{listen}/cb/{}/resolve?id={}&value=ok",
                p.callback_token(&signer).expose(),
                p.id
            )
        })
        .collect();
    let watched = Watched::with_services(&[("sidecar", sidecar.id())]);
    let before = watched.snapshot();
    let (rb_rate, rb_lat) = closed_loop(Arc::new(urls), CONNS).await?;
    let rb_cpu = before.per_op(&watched.snapshot(), n);
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
    let watched = Watched::with_services(&[("baseline server", base.id())]);
    let before = watched.snapshot();
    let (base_rate, base_lat) = closed_loop(Arc::new(burls), CONNS).await?;
    let base_cpu = before.per_op(&watched.snapshot(), n);
    stop(&mut base).await;
    let ratio = rb_rate / base_rate;
    let row = Row {
        id: "B3",
        cpu: vec![("runbridge", rb_cpu), ("baseline", base_cpu)],
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

pub(crate) async fn b4(
    env: &Env,
    rate: u64,
    seconds: u64,
    curves: &mut Curves,
) -> Result<Vec<Row>> {
    let tag = "b4";
    let n = (rate * seconds) as usize;
    let s = env.settings(tag, &[])?;
    let store = runbridge::startup::store(&s).await?;
    let signer = runbridge::startup::signer(&s)?;
    let prefix = format!("{}-b4", env.run_id);
    let promises = pending_promises(
        &store,
        &prefix,
        n,
        Timeout::After(Duration::from_secs(3600)),
    )
    .await?;
    // Signed before the clock starts, as a run holds its token before it calls.
    let tokens: Vec<String> = promises
        .iter()
        .map(|p| p.callback_token(&signer).expose().to_owned())
        .collect();
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
            let Some(i) = event_index(ev.message_id.as_deref()) else {
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
    for (i, (p, token)) in promises.iter().zip(&tokens).enumerate() {
        tokio::time::sleep_until((t0 + interval * i as u32).into()).await;
        let url = format!("http://{listen}/cb/{token}/resolve?id={}&value=ok", p.id);
        let (clients, sent_at, answered) = (clients.clone(), sent_at.clone(), answered.clone());
        sends.push(tokio::spawn(async move {
            sent_at[i].store(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            let ok = matches!(clients[i % clients.len()].post(url).send().await, Ok(r) if r.status().is_success());
            answered[i].store(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            ok
        }));
    }
    let failed = failures(sends).await;
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
            cpu: Vec::new(),
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
            cpu: Vec::new(),
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
