//! The run's private world: its own Redis (append-only, fsync always, so a
//! `kill -9` loses nothing acknowledged), its own vhost (on the machine's
//! RabbitMQ, or on a private node when the `node` fault is on), proxies on
//! every link runbridge uses, the emulator, and the environment every
//! runbridge process gets.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use runbridge::broker::{Broker, BrokerSettings};
use runbridge::config::Settings;
use runbridge_harness::config_dir;
use runbridge_testkit::{RabbitNode, RedisServer, rabbitmqctl, restartable_port};

use crate::Args;
use crate::faults::Servers;
use crate::proxy::Proxy;
use crate::supervisor::Proc;
use crate::workload::JOBS;

/// The independent consumer's queue, bound to every completion event.
pub const EVENTS_QUEUE: &str = "chaos.events";

pub struct Lab {
    pub root: PathBuf,
    bin: PathBuf,
    /// The private node's name, when there is one.
    pub node_name: Option<String>,
    pub vhost: String,
    pub emu_port: u16,
    sidecar_ports: Vec<u16>,
    /// Redis, RabbitMQ and the emulator, as runbridge reaches them.
    pub proxies: Vec<Arc<Proxy>>,
    /// The environment of every runbridge process.
    env: Vec<(String, String)>,
    /// The harness's own view (direct, not through the proxies).
    pub settings: Settings,
    pub bs: BrokerSettings,
    /// The private Redis, direct (the audit's lost plant edits a schedule).
    pub redis_url: String,
}

impl Lab {
    /// Starts the private servers and declares the topology; drops the
    /// `node` fault (loudly) when it was not asked for by name and a private
    /// node cannot start here.
    pub async fn start(
        args: &Args,
        seed: u64,
        bin: PathBuf,
        faults: &mut HashSet<String>,
    ) -> Result<(Lab, Servers)> {
        let config_dir = config_dir();
        let root = std::env::temp_dir().join(format!("runbridge-chaos-{seed}"));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("redis"))?;
        println!(
            "[chaos] seed {seed}, {} triggers at {}/s, faults {:?}, logs in {}",
            args.triggers,
            args.rate,
            faults,
            root.display()
        );

        let redis_port = args.redis_port.unwrap_or_else(restartable_port);
        let redis = RedisServer::durable(redis_port, &root.join("redis"), &[])
            .await
            .context("starting the private redis-server")?;

        let node = private_node(args, seed, &root, faults).await?;
        let node_name = node.as_ref().map(|n| n.name.clone());
        let amqp_port = node.as_ref().map_or(5672, |n| n.port);
        let vhost = format!("chaos-{seed}");
        let ctl = node_name.as_deref();
        let _ = rabbitmqctl(ctl, &["delete_vhost", &vhost]);
        rabbitmqctl(ctl, &["add_vhost", &vhost])?;
        rabbitmqctl(
            ctl,
            &["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"],
        )?;

        let emu_port = restartable_port();
        let sidecar_ports: Vec<u16> = (0..args.sidecars).map(|_| restartable_port()).collect();
        // runbridge reaches Redis, RabbitMQ and the emulator only through
        // these proxies; the harness's own connections go direct.
        let proxies = vec![
            Proxy::start("redis", redis_port).await?,
            Proxy::start("rabbitmq", amqp_port).await?,
            Proxy::start("emulator", emu_port).await?,
        ];
        let env = runbridge_env(
            &config_dir,
            (proxies[0].port, proxies[1].port, proxies[2].port),
            &vhost,
            sidecar_ports[0],
        );

        // The independent consumer's queue exists before any event can be published.
        let settings = Settings::load_from(
            &config_dir,
            "local",
            &[
                ("redis.url", format!("redis://127.0.0.1:{redis_port}")),
                ("redis.key_prefix", "chaos".into()),
                (
                    "amqp.url",
                    format!("amqp://guest:guest@127.0.0.1:{amqp_port}/{vhost}"),
                ),
            ],
        )?;
        let bs = runbridge::startup::broker_settings(&settings, "chaos");
        let b = Broker::connect(&bs).await?;
        b.declare_topology().await?;
        b.declare_bound_queue(EVENTS_QUEUE, &bs.events_exchange, "promise.#")
            .await?;
        b.declare_bound_queue(crate::audit::FINDINGS_QUEUE, &bs.events_exchange, "audit.#")
            .await?;
        b.close().await;

        let lab = Lab {
            root,
            bin,
            node_name,
            vhost,
            emu_port,
            sidecar_ports,
            proxies,
            env,
            settings,
            bs,
            redis_url: format!("redis://127.0.0.1:{redis_port}"),
        };
        Ok((lab, Servers { redis, node }))
    }

    /// `rabbitmqctl -n` target: the private node, or the machine's.
    pub fn ctl_node(&self) -> Option<&str> {
        self.node_name.as_deref()
    }

    /// The emulator, with the run's jobs and, when `api_faults`, 429s, 503s
    /// and slow answers at random; started once it listens.
    pub async fn emulator(&self, api_faults: bool) -> Result<Proc> {
        let mut args = vec![
            "emulate".to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", self.emu_port),
        ];
        for job in JOBS.iter().chain(&crate::audit::JOBS) {
            args.extend(["--job".to_string(), job.to_string()]);
        }
        args.extend(crate::workload::job_flags());
        if api_faults {
            args.extend(
                [
                    "--fault-429-rate",
                    "0.1",
                    "--fault-503-rate",
                    "0.05",
                    "--fault-slow-rate",
                    "0.05",
                    "--fault-slow-ms",
                    "1500",
                ]
                .map(String::from),
            );
        }
        let mut p = Proc::new(
            "emulator".into(),
            self.bin.clone(),
            args,
            self.env.clone(),
            self.root.join("emulator.log"),
        );
        p.spawn()?;
        runbridge_testkit::wait_port(
            self.emu_port,
            std::time::Duration::from_secs(10),
            "emulator",
        )
        .await?;
        Ok(p)
    }

    /// The sidecars and workers, not started yet; with `crash`, each has
    /// its kind's crash points armed at a low rate.
    pub fn processes(&self, workers: usize, crash: bool) -> Vec<Proc> {
        let mut procs = Vec::new();
        for (i, port) in self.sidecar_ports.iter().enumerate() {
            let env = [("RUNBRIDGE__SIDECAR__LISTEN", format!("127.0.0.1:{port}"))];
            procs.push(self.runbridge("sidecar", i, &env, crash.then_some(SIDECAR_CRASHES)));
        }
        for i in 0..workers {
            // Notebooks of worker i call back sidecar i mod S.
            let sidecar = self.sidecar_ports[i % self.sidecar_ports.len()];
            let env = [(
                "RUNBRIDGE__SIDECAR__PUBLIC_URL",
                format!("http://127.0.0.1:{sidecar}"),
            )];
            procs.push(self.runbridge("worker", i, &env, crash.then_some(WORKER_CRASHES)));
        }
        procs
    }
}

impl Lab {
    /// `runbridge <kind>` number `i`, not started: the common environment
    /// with `env` over it, and `crashes` armed (`RUNBRIDGE_FAILPOINTS`).
    fn runbridge(
        &self,
        kind: &str,
        i: usize,
        env: &[(&str, String)],
        crashes: Option<&str>,
    ) -> Proc {
        let mut all = self.env.clone();
        all.retain(|(k, _)| !env.iter().any(|(over, _)| k == over));
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
        if let Some(c) = crashes {
            all.push(("RUNBRIDGE_FAILPOINTS".into(), c.into()));
        }
        let name = format!("{kind}-{i}");
        let log = self.root.join(format!("{name}.log"));
        Proc::new(name, self.bin.clone(), vec![kind.into()], all, log)
    }
}

/// The crash points armed in every sidecar and worker with `crash`, each
/// firing at a low rate (besides the `crash` fault, which arms one at a time).
const SIDECAR_CRASHES: &str = "sidecar.after_settle=abort@0.003";
const WORKER_CRASHES: &str = "worker.after_launch=abort@0.003,worker.after_ack=abort@0.002,relay.after_confirm=abort@0.003,fanout.after_parent=abort@0.02,join.after_child_recorded=abort@0.002,retry.after_relaunch=abort@0.03,retry.after_repair=abort@0.03";

/// The private RabbitMQ node the `node` fault kills, started; none when the
/// fault is off (or dropped because it cannot run here).
async fn private_node(
    args: &Args,
    seed: u64,
    root: &std::path::Path,
    faults: &mut HashSet<String>,
) -> Result<Option<RabbitNode>> {
    if !faults.contains("node") {
        return Ok(None);
    }
    let mut n = match RabbitNode::new(&format!("chaos-{seed}"), root.join("rabbitmq"), None) {
        Ok(n) => n,
        // Asked for by name: an error. By default: run without it, loudly.
        Err(e) if args.faults.is_none() => {
            println!("[chaos] NOTE: the node fault is skipped: {e}");
            faults.remove("node");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    n.start().await?;
    println!(
        "[chaos] private RabbitMQ node {} on port {}",
        n.name, n.port
    );
    Ok(Some(n))
}

/// The environment of every runbridge process: everything through the
/// proxies, short timers so that recovery happens within the run, JSON logs
/// at `warn` (what the panic check reads).
fn runbridge_env(
    config_dir: &std::path::Path,
    (redis_via, amqp_via, emu_via): (u16, u16, u16),
    vhost: &str,
    first_sidecar: u16,
) -> Vec<(String, String)> {
    [
        ("RUNBRIDGE_ENV", "local".to_string()),
        ("RUNBRIDGE_CONFIG_DIR", config_dir.display().to_string()),
        (
            "RUNBRIDGE__REDIS__URL",
            format!("redis://127.0.0.1:{redis_via}"),
        ),
        ("RUNBRIDGE__REDIS__KEY_PREFIX", "chaos".into()),
        (
            "RUNBRIDGE__AMQP__URL",
            format!("amqp://guest:guest@127.0.0.1:{amqp_via}/{vhost}"),
        ),
        ("DATABRICKS_HOST", format!("http://127.0.0.1:{emu_via}")),
        ("DATABRICKS_TOKEN", "dapi-chaos".into()),
        ("RUNBRIDGE__DATABRICKS__LAUNCH_PER_SECOND", "0".into()),
        ("RUNBRIDGE__DATABRICKS__POLL_PER_SECOND", "0".into()),
        ("RUNBRIDGE__DATABRICKS__CANCEL_PER_SECOND", "0".into()),
        ("RUNBRIDGE__DATABRICKS__RETRY_MAX_DELAY_MS", "2000".into()),
        ("RUNBRIDGE__DATABRICKS__RETRY_MAX_TIMES", "8".into()),
        ("RUNBRIDGE__WORKER__REQUEUE_DELAY_MS", "500".into()),
        ("RUNBRIDGE__RELAY__RECLAIM_IDLE_MS", "3000".into()),
        ("RUNBRIDGE__RELAY__RECLAIM_INTERVAL_MS", "1000".into()),
        ("RUNBRIDGE__RECONCILER__TICK_MS", "500".into()),
        ("RUNBRIDGE__RECONCILER__FIRST_POLL_MS", "3000".into()),
        ("RUNBRIDGE__RECONCILER__GRACE_MS", "1500".into()),
        ("RUNBRIDGE__RECONCILER__LEASE_MS", "5000".into()),
        ("RUNBRIDGE__LOG__FORMAT", "json".into()),
        // CHAOS_RUST_LOG raises it to look into a failed run.
        (
            "RUST_LOG",
            std::env::var("CHAOS_RUST_LOG").unwrap_or_else(|_| "warn".into()),
        ),
        (
            "RUNBRIDGE__SIDECAR__PUBLIC_URL",
            format!("http://127.0.0.1:{first_sidecar}"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .chain(
        crate::audit::ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .collect()
}
