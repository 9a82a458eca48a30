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
//!
//! The parts: [`lab`] sets up that world, [`supervisor`] keeps the runbridge
//! processes running, [`workload`] publishes, [`faults`] injects on a
//! schedule, [`proxy`] carries the links, [`audit`] plants one disagreement
//! of each kind for the workers' audit to find, and [`invariants`] checks
//! what happened.

mod audit;
mod families;
mod faults;
mod invariants;
mod lab;
mod proxy;
mod retries;
mod supervisor;
mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use runbridge_harness::runbridge_bin;
use runbridge_testkit::rabbitmqctl;
use tokio::sync::Mutex;

use faults::{FaultCounts, Injector};
use invariants::Run;
use lab::Lab;
use supervisor::Procs;
use workload::Plan;

#[derive(Parser, Debug, Clone)]
#[command(about = "Fault-injection run with invariant checks")]
pub struct Args {
    /// Seed of the workload and fault schedule (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, default_value_t = 1000)]
    pub triggers: usize,
    /// Parent triggers published among the triggers.
    #[arg(long, default_value_t = 0)]
    pub parents: usize,
    /// Children per parent.
    #[arg(long, default_value_t = 20)]
    pub children: usize,
    /// Triggers published per second.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 3)]
    pub workers: usize,
    #[arg(long, default_value_t = 2)]
    pub sidecars: usize,
    /// Comma-separated: kill, crash, broker (connections dropped), node (a
    /// private RabbitMQ node killed with -9 and restarted; needs root), redis,
    /// proxy, emulator. Default: all (`node` left out, with a message, where
    /// a private RabbitMQ node cannot be started).
    #[arg(long)]
    pub faults: Option<String>,
    /// Seconds between faults (drawn between 1x and 2x this).
    #[arg(long, default_value_t = 2.0)]
    pub fault_every: f64,
    /// Once publishing is done, how long to wait for the next promise to
    /// settle before giving up on the rest (five times this in all).
    #[arg(long, default_value_t = 120)]
    pub quiet_seconds: u64,
    /// Port of the private Redis (default: a free one).
    #[arg(long)]
    pub redis_port: Option<u16>,
    /// The runbridge binary (default: next to this one).
    #[arg(long)]
    pub bin: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let seed = args
        .seed
        .unwrap_or_else(|| chrono::Utc::now().timestamp_millis() as u64);
    let mut faults = faults::parse(args.faults.as_deref())?;
    let bin = runbridge_bin(args.bin.as_ref(), "make chaos")?;
    let started_ms = chrono::Utc::now().timestamp_millis();
    let (lab, servers) = Lab::start(&args, seed, bin, &mut faults).await?;
    let mut emulator = lab.emulator(faults.contains("emulator")).await?;

    // Workers and sidecars, supervised.
    let mut procs = lab.processes(args.workers, faults.contains("crash"));
    for p in &mut procs {
        p.spawn()?;
    }
    let procs: Procs = Arc::new(Mutex::new(procs));
    let stop_supervisor = Arc::new(AtomicBool::new(false));
    let supervisor = tokio::spawn(supervisor::supervise(
        procs.clone(),
        stop_supervisor.clone(),
    ));

    // The workload, the faults and the memory samples, until publishing ends.
    let plan = Plan::draw(seed, args.triggers, args.parents, args.children);
    let plants = audit::Plants::new(seed);
    let expected_promises = plan.promises() + plants.ids().len();
    let Plan {
        bodies,
        valid_ids,
        malformed_ids,
        parents,
        retrying,
        chatty,
    } = plan;
    let published = Arc::new(AtomicUsize::new(0));
    let publishing = workload::publish(lab.bs.clone(), bodies, args.rate, published.clone());
    let fault_counts = FaultCounts::default();
    let stop_faults = Arc::new(AtomicBool::new(false));
    let injecting = Injector {
        faults: faults.clone(),
        every: args.fault_every,
        seed,
        procs: procs.clone(),
        links: lab.proxies.clone(),
        vhost: lab.vhost.clone(),
        node_name: lab.node_name.clone(),
        servers,
    }
    .spawn(stop_faults.clone(), fault_counts.clone());
    let sampling = tokio::spawn(supervisor::sample_rss(procs.clone(), stop_faults.clone()));
    // The audit's plants, a few seconds in, while the faults go on.
    let planting = tokio::spawn(audit::plant(
        lab.bs.clone(),
        runbridge::startup::store(&lab.settings).await?,
        lab.redis_url.clone(),
        lab.emu_port,
        audit::Plants::new(seed),
        Duration::from_secs(3),
    ));
    publishing.await?;
    println!(
        "[chaos] published {} triggers; faults stop now, quiet period while promises settle (up to {}s without one)",
        published.load(Ordering::Relaxed),
        args.quiet_seconds
    );
    stop_faults.store(true, Ordering::Relaxed);
    let mut servers = injecting.await?;
    let samples = sampling.await?;
    let planted = planting.await?;
    let rss = invariants::rss_report(&samples);
    // The whole series, kept beside the logs (which go on success) to look at
    // the shape: a leak climbs, a backlog after an outage spikes and recedes.
    let csv: String = samples
        .iter()
        .map(|(t, pid, kb)| format!("{t:.1},{pid},{kb}\n"))
        .collect();
    let _ = std::fs::write(
        std::env::temp_dir().join(format!("runbridge-chaos-{seed}-rss.csv")),
        format!("seconds,pid,rss_kib\n{csv}"),
    );
    if servers.redis.is_down() {
        servers.redis.restart().await?;
    }
    if let Some(n) = servers.node.as_mut().filter(|n| n.is_down()) {
        n.start().await?;
    }

    // Quiet period, then stop everything and check. A Redis the last fault
    // restarted may still be loading its AOF (LOADING) for a moment.
    let store = {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            match runbridge::startup::store(&lab.settings).await {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() < deadline => {
                    println!("[chaos] store not ready yet ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    invariants::wait_quiet(
        &lab,
        &store,
        expected_promises,
        Duration::from_secs(args.quiet_seconds),
    )
    .await;
    // The audit works through what the faults left it; its findings of the
    // plants are waited for (bounded) before the processes stop.
    audit::wait_found(
        &store,
        &planted,
        Duration::from_secs(args.quiet_seconds * 3),
    )
    .await;
    stop_supervisor.store(true, Ordering::Relaxed);
    let _ = supervisor.await;
    let mut ps = procs.lock().await;
    supervisor::stop_all(&mut ps).await;
    let counts = fault_counts.lock().await.clone();
    let run = Run {
        seed,
        wanted: args.triggers + args.parents,
        published: published.load(Ordering::Relaxed),
        valid_ids: &valid_ids,
        malformed_ids: &malformed_ids,
        parents: &parents,
        retrying: &retrying,
        chatty: &chatty,
        emu_port: lab.emu_port,
        procs: &ps,
        faults: &counts,
        rss: &rss,
        plants: &plants,
        planted: &planted,
        started_ms,
    };
    let violations = invariants::check(&run, &lab, &store).await?;

    servers.redis.kill9();
    if let Some(mut c) = emulator.child.take() {
        let _ = c.start_kill();
    }
    let _ = rabbitmqctl(lab.ctl_node(), &["delete_vhost", &lab.vhost]);
    if let Some(n) = servers.node.as_mut() {
        n.kill9().await;
    }
    if violations > 0 {
        println!(
            "[chaos] FAILED: {violations} invariant(s) violated (seed {seed}; logs in {})",
            lab.root.display()
        );
        std::process::exit(1);
    }
    println!("[chaos] all invariants hold (seed {seed})");
    let _ = std::fs::remove_dir_all(&lab.root);
    Ok(())
}
