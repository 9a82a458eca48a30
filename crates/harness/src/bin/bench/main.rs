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
//! Scenarios (ids as in bench/results.md): B1 trigger throughput and B1′
//! the same with one HTTP call per trigger on both sides, B2 latency hiding,
//! B3 settle throughput, B4 settle → event latency, B5 Redis memory per
//! pending promise, B6 worker RSS with 10,000 promises in flight, B7 deadline
//! sweep cost with 1,000,000 pending, B8 against a hand-written Python
//! bridge, B9 a search among 1,000,000 settled, B11 the Databricks calls of
//! one audit. `--smoke` runs every scenario
//! with a few hundred messages, to keep the harness working (`make test`);
//! its numbers mean nothing and nothing asserts on timings.
//!
//! The parts: [`lab`] (settings, child processes, publishing), the scenarios
//! by what they load ([`triggers`]: B1, B1′, B2, B6; [`settle`]: B3, B4;
//! [`store_cost`]: B5, B7; [`bridge`]: B8; [`search_cost`]: B9;
//! [`audit_cost`]: B11), [`cpu`]
//! (CPU per operation by process), [`measure`] (load and statistics) and
//! [`report`] (the table, the JSON, the chart).

mod audit_cost;
mod bridge;
mod cpu;
mod lab;
mod measure;
mod report;
mod search_cost;
mod settle;
mod store_cost;
mod triggers;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Parser, Subcommand};
use runbridge_harness::{config_dir, runbridge_bin};
use runbridge_testkit::rabbitmqctl;
use serde_json::json;

use crate::lab::{Env, delete_keys};
use crate::measure::median_round;
use crate::report::{Curves, Row, machine, markdown, svg};
use crate::settle::{b3, b4, baseline_server};
use crate::store_cost::{b5, b7};
use crate::triggers::{Databricks, baseline_consumer, drain_with_worker, responder};

#[derive(Parser, Debug)]
#[command(about = "runbridge benchmarks, each against a baseline measured in the same run")]
struct Args {
    /// A few hundred messages per scenario: checks the harness, measures nothing.
    #[arg(long)]
    pub(crate) smoke: bool,
    /// Where results.json, results.md and latency.svg go.
    #[arg(long, default_value = "bench")]
    pub(crate) out: PathBuf,
    /// Only these scenarios, e.g. `B1,B4`.
    #[arg(long)]
    pub(crate) only: Option<String>,
    /// The runbridge binary (default: next to this one).
    #[arg(long)]
    pub(crate) bin: Option<PathBuf>,
    /// B8's Python (default: target/benchvenv/bin/python, which `make
    /// bench` makes with the hand-written bridge's requirements).
    #[arg(long)]
    pub(crate) python: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) cmd: Option<Cmd>,
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
    /// B1′'s minimal Databricks: `run-now` answers a run id at once.
    Responder {
        #[arg(long)]
        listen: String,
    },
}

/// Sizes of one profile.
pub(crate) struct Sizes {
    pub(crate) b1_triggers: usize,
    pub(crate) b2_triggers: usize,
    pub(crate) b3_resolves: usize,
    pub(crate) b4_rate: u64,
    pub(crate) b4_seconds: u64,
    pub(crate) b5_promises: usize,
    pub(crate) b7_pending: usize,
    pub(crate) b9_settled: usize,
    pub(crate) b11_runs: usize,
    pub(crate) b8_triggers: usize,
    pub(crate) b8_rate: u64,
    pub(crate) b8_seconds: u64,
    /// Rounds of B1 and B3 (runbridge, then its baseline); the round with
    /// the median ratio is reported. The machine's noise moves one round's
    /// ratio by ±0.07.
    pub(crate) rounds: usize,
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
            b9_settled: 1_000_000,
            b11_runs: 2_000,
            b8_triggers: 5_000,
            b8_rate: 100,
            b8_seconds: 10,
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
            b9_settled: 3_000,
            b11_runs: 100,
            b8_triggers: 200,
            b8_rate: 50,
            b8_seconds: 2,
            rounds: 1,
        }
    }
}

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
        Some(Cmd::Responder { ref listen }) => rt.block_on(responder(listen)),
        None => rt.block_on(run(&args)),
    }
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
    let python = if want("B8") {
        Some(bridge::locate(&env.config_dir, args.python.clone())?)
    } else {
        None
    };
    let result = scenarios(&env, &sizes, &want, python.as_ref()).await;
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

/// Triggers in flight (the worker's prefetch, the baselines' QoS).
const PREFETCH: u16 = 256;

/// B1 (`prime` false: the worker against the emulator, the baseline only
/// acks) or B1′ (both make one HTTP call per trigger to the same minimal
/// responder): the round with the median ratio, CPU per trigger beside it.
async fn b1(env: &Env, sz: &Sizes, prime: bool) -> Result<Option<Row>> {
    let (id, what) = if prime {
        (
            "B1′",
            "both sides POST each trigger to the same minimal responder, then ack",
        )
    } else {
        (
            "B1",
            "a lapin consumer that only acks; the worker's emulator shares the cores",
        )
    };
    println!(
        "[bench] {id}: {} triggers, one worker vs {what}",
        sz.b1_triggers
    );
    let mut rounds = Vec::new();
    for r in 0..sz.rounds {
        let t = if prime { "b1p" } else { "b1" };
        let (base, base_cpu) =
            baseline_consumer(env, &format!("{t}base{r}"), sz.b1_triggers, PREFETCH, prime).await?;
        // Default reconciler settings: its first checks come 30 s after launch.
        let d = drain_with_worker(
            env,
            &format!("{t}r{r}"),
            sz.b1_triggers,
            u32::from(PREFETCH),
            if prime {
                Databricks::Responder
            } else {
                Databricks::Emulator {
                    launch_latency_ms: 0,
                }
            },
            Duration::ZERO,
            &[],
        )
        .await?;
        let ratio = d.rate / base;
        let target = if prime { 0.6 } else { 0.5 };
        rounds.push((
            Row {
                id,
                cpu: vec![("runbridge", d.cpu), ("baseline", base_cpu)],
                scenario: format!(
                    "trigger throughput: {} pre-published triggers, one worker, prefetch {PREFETCH}; baseline: {what}",
                    sz.b1_triggers
                ),
                runbridge: d.rate,
                baseline: Some(base),
                unit: "triggers/s",
                ratio: Some(ratio),
                target: format!("ratio ≥ {target}"),
                met: ratio >= target,
                notes: format!("drained in {:.1} s", d.seconds),
            },
            (),
        ));
    }
    Ok(median_round(rounds).map(|r| r.0))
}

async fn scenarios(
    env: &Env,
    sz: &Sizes,
    want: &dyn Fn(&str) -> bool,
    python: Option<&bridge::Python>,
) -> Result<(Vec<Row>, Curves)> {
    let mut rows = Vec::new();
    let mut curves = Curves::default();
    if want("B1") {
        rows.extend(b1(env, sz, false).await?);
    }
    if want("B1'") || want("B1′") {
        rows.extend(b1(env, sz, true).await?);
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
            Databricks::Emulator {
                launch_latency_ms: 200,
            },
            Duration::from_secs(5),
            &checks,
        )
        .await?;
        let ideal = f64::from(PREFETCH) / 0.2;
        let ratio = d.rate / ideal;
        if want("B2") {
            rows.push(Row {
                id: "B2",
                cpu: Vec::new(),
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
                cpu: Vec::new(),
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
    if let Some(py) = python {
        println!(
            "[bench] B8: runbridge vs the hand-written Python bridge, {} triggers, then {}/s for {} s",
            sz.b8_triggers, sz.b8_rate, sz.b8_seconds
        );
        rows.extend(bridge::b8(env, py, sz.b8_triggers, sz.b8_rate, sz.b8_seconds).await?);
    }
    if want("B9") {
        println!(
            "[bench] B9: search for 100 pending among {} settled (private Redis)",
            sz.b9_settled
        );
        rows.push(search_cost::b9(env, sz.b9_settled).await?);
    }
    if want("B11") {
        println!(
            "[bench] B11: one audit of {} runs started in its window",
            sz.b11_runs
        );
        rows.push(audit_cost::b11(env, sz.b11_runs).await?);
    }
    Ok((rows, curves))
}
