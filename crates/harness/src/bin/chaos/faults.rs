//! The faults and their schedule. Every kind (and every crash point) is
//! injected once first, in an order drawn from the seed; then kinds are
//! drawn at random, one every `fault_every` to twice that, until publishing
//! ends. The same seed gives the same schedule.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use runbridge_testkit::{RabbitNode, RedisServer, rabbitmqctl};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::proxy::{LinkMode, Proxy};
use crate::supervisor::Procs;

/// Every fault kind `--faults` accepts.
pub const KINDS: [&str; 7] = [
    "kill", "crash", "broker", "node", "redis", "proxy", "emulator",
];

/// The crash points (src/failpoint.rs) and the process kind that has each.
pub const CRASH_POINTS: [(&str, &str); 8] = [
    ("worker.after_launch", "worker"),
    ("sidecar.after_settle", "sidecar"),
    ("relay.after_confirm", "worker"),
    ("worker.after_ack", "worker"),
    ("fanout.after_parent", "worker"),
    ("join.after_child_recorded", "worker"),
    ("retry.after_relaunch", "worker"),
    ("retry.after_repair", "worker"),
];

/// `--faults`: comma-separated kinds, all of them when not given.
pub fn parse(given: Option<&str>) -> Result<HashSet<String>> {
    let faults: HashSet<String> = given
        .unwrap_or(&KINDS.join(","))
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(f) = faults.iter().find(|f| !KINDS.contains(&f.as_str())) {
        bail!("unknown fault {f:?} (known: {})", KINDS.join(", "));
    }
    Ok(faults)
}

/// The servers a fault kills and restarts; the injector owns them while it
/// runs and hands them back.
pub struct Servers {
    pub redis: RedisServer,
    pub node: Option<RabbitNode>,
}

/// What the injector acts on.
pub struct Injector {
    pub faults: HashSet<String>,
    pub every: f64,
    pub seed: u64,
    pub procs: Procs,
    /// Its own handles: the proxies must outlive it (dropping one resets
    /// every connection through it).
    pub links: Vec<Arc<Proxy>>,
    pub vhost: String,
    pub node_name: Option<String>,
    pub servers: Servers,
}

/// How many faults of each kind were injected (a crash by its point).
pub type FaultCounts = Arc<Mutex<BTreeMap<String, usize>>>;

impl Injector {
    /// Injects faults until `stop` is set and the first cycle is complete.
    pub fn spawn(self, stop: Arc<AtomicBool>, log: FaultCounts) -> JoinHandle<Servers> {
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0x5eed);
        let kinds: Vec<&'static str> = ["kill", "broker", "node", "redis", "proxy", "crash"]
            .into_iter()
            .filter(|k| self.faults.contains(*k))
            .collect();
        let mut first: Vec<&'static str> =
            kinds.iter().copied().filter(|k| *k != "crash").collect();
        if kinds.contains(&"crash") {
            first.extend(CRASH_POINTS.iter().map(|_| "crash"));
        }
        for i in (1..first.len()).rev() {
            first.swap(i, rng.random_range(0..=i));
        }
        tokio::spawn(async move {
            let mut me = self;
            let mut crash_cycle = CRASH_POINTS.iter().cycle();
            let mut n = 0usize;
            // The first cycle (every kind, every crash point) always completes,
            // even if publishing ended first; after it, faults stop with publishing.
            let done = |n: usize| stop.load(Ordering::Relaxed) && n >= first.len();
            while !done(n) && !kinds.is_empty() {
                tokio::time::sleep(Duration::from_secs_f64(
                    me.every * (1.0 + rng.random::<f64>()),
                ))
                .await;
                if done(n) {
                    break;
                }
                let kind = first
                    .get(n)
                    .copied()
                    .unwrap_or_else(|| kinds[rng.random_range(0..kinds.len())]);
                n += 1;
                let label = match kind {
                    "crash" => {
                        let point = crash_cycle.next().copied().unwrap_or(CRASH_POINTS[0]);
                        me.crash(point, &mut rng).await
                    }
                    kind => me.inject(kind, &mut rng).await,
                };
                *log.lock().await.entry(label).or_default() += 1;
            }
            me.servers
        })
    }

    /// Restarts one process of the point's kind with the point armed to
    /// fire on its first pass.
    async fn crash(&mut self, (point, role): (&str, &str), rng: &mut StdRng) -> String {
        let mut ps = self.procs.lock().await;
        let candidates: Vec<usize> = (0..ps.len())
            .filter(|i| ps[*i].name.starts_with(role))
            .collect();
        if let Some(i) = candidates.get(rng.random_range(0..candidates.len().max(1))) {
            let p = &mut ps[*i];
            p.next_failpoint = Some(point.to_owned());
            p.kill();
        }
        format!("crash {point}")
    }

    /// One fault of `kind`; returns its label for the report.
    async fn inject(&mut self, kind: &str, rng: &mut StdRng) -> String {
        let mut label = kind.to_string();
        match kind {
            "kill" => {
                let mut ps = self.procs.lock().await;
                let n = ps.len();
                ps[rng.random_range(0..n)].kill();
            }
            "proxy" => {
                let link = &self.links[rng.random_range(0..self.links.len())];
                let mode = match rng.random_range(0..3) {
                    0 => LinkMode::Cut,
                    1 => LinkMode::Blackhole,
                    _ => LinkMode::Delay(rng.random_range(100..800)),
                };
                label = format!("proxy {} {mode:?}", link.name);
                link.set(mode);
                tokio::time::sleep(Duration::from_millis(rng.random_range(1500..4000))).await;
                link.set(LinkMode::Pass);
            }
            "node" => {
                if let Some(n) = self.servers.node.as_mut() {
                    n.kill9().await;
                    tokio::time::sleep(Duration::from_millis(500 + rng.random_range(0..1000)))
                        .await;
                    if let Err(e) = n.start().await {
                        eprintln!("[chaos] rabbitmq node restart failed: {e}");
                    }
                }
            }
            "broker" => {
                let _ = rabbitmqctl(
                    self.node_name.as_deref(),
                    &[
                        "close_all_connections",
                        "-p",
                        &self.vhost,
                        "chaos: connections dropped",
                    ],
                );
            }
            _ => {
                let redis = &mut self.servers.redis;
                redis.kill9();
                tokio::time::sleep(Duration::from_millis(500 + rng.random_range(0..1000))).await;
                if let Err(e) = redis.restart().await {
                    eprintln!("[chaos] redis restart failed: {e}");
                }
            }
        }
        label
    }
}
