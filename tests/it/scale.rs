//! Running on several broker nodes: `amqp.urls` lists
//! more nodes of the cluster; a connect tries the node that answered last
//! first, then the others in turn.

use std::time::Duration;

use runbridge::broker::Broker;
use secrecy::SecretString;

use crate::helpers::*;

#[tokio::test]
async fn broker_connects_to_the_next_node_when_one_is_down() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let live = app.settings.amqp.url.clone();
    let dead = SecretString::from(format!(
        "amqp://guest:s3cret-pw@127.0.0.1:{}/%2f",
        free_port()
    ));
    let mut bs = runbridge::startup::broker_settings(&app.settings, "it-nodes");
    bs.url = dead.clone();
    bs.fallback_urls = vec![live.clone()];

    let b = Broker::connect(&bs).await.expect("the second node answers");
    b.declare_topology().await.unwrap();
    b.close().await;
    assert_eq!(
        bs.last_node.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the node that answered is remembered"
    );
    // Every clone starts with it now (no time lost on the dead node).
    let clone = bs.clone();
    let b = tokio::time::timeout(Duration::from_secs(5), Broker::connect(&clone))
        .await
        .expect("no detour")
        .unwrap();
    b.close().await;

    // All nodes down: one error naming each node, passwords redacted.
    bs.fallback_urls = vec![dead.clone()];
    let Err(e) = Broker::connect(&bs).await else {
        panic!("connected to nothing");
    };
    let msg = e.to_string();
    assert!(msg.contains("2 nodes"), "{msg}");
    assert!(msg.matches("127.0.0.1:").count() >= 2, "{msg}");
    assert!(!msg.contains("s3cret-pw"), "a password in an error: {msg}");
    app.stop().await;
}

/// A worker whose `amqp.url` node is down works through `amqp.urls`
/// (the list comes from a `RUNBRIDGE__AMQP__URLS` variable).
#[tokio::test]
async fn worker_runs_on_the_next_node() {
    let mut app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let live = secrecy::ExposeSecret::expose_secret(&app.settings.amqp.url).to_owned();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_runbridge"))
        .arg("worker")
        .envs(app.env_vars())
        .env(
            "RUNBRIDGE__AMQP__URL",
            format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port()),
        )
        .env("RUNBRIDGE__AMQP__URLS", &live)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let id = unique("next-node");
    app.publish(&trigger(&id, JOB_CALLBACK)).await;
    let (_, ev) = app.first_event(&id, Duration::from_secs(20)).await;
    assert_eq!(ev["data"]["state"], "RESOLVED");
    let _ = child.start_kill();
    let _ = child.wait().await;
    app.stop().await;
}

/// Five workers on one queue share 5,000 triggers evenly: each handled
/// within ±30 % of the mean. Every worker is consuming before the
/// first trigger is published, so none gets a head start. Run by
/// `make cluster-test` (ignored in `make test` for its length).
#[tokio::test]
#[ignore = "make cluster-test"]
async fn five_workers_share_the_queue_evenly() {
    const WORKERS: usize = 5;
    const TRIGGERS: usize = 5000;
    let mut app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let ports: Vec<u16> = (0..WORKERS).map(|_| free_port()).collect();
    let mut children: Vec<_> = ports
        .iter()
        .map(|port| {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_runbridge"))
                .arg("worker")
                .envs(app.env_vars())
                .env(
                    "RUNBRIDGE__WORKER__METRICS_LISTEN",
                    format!("127.0.0.1:{port}"),
                )
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap()
        })
        .collect();
    let queue = app.settings.amqp.triggers_queue.clone();
    eventually(
        Duration::from_secs(30),
        "five consumers on the trigger queue",
        || async {
            (app.broker.consumer_count(&queue).await.ok()? as usize == WORKERS).then_some(())
        },
    )
    .await;

    let ids: Vec<String> = (0..TRIGGERS)
        .map(|i| format!("{}-spread-{i}", app.name))
        .collect();
    for id in &ids {
        app.publish(&trigger(id, JOB_CALLBACK)).await;
    }
    let events = app.events_for_all(&ids, Duration::from_secs(300)).await;
    assert_eq!(events.len(), TRIGGERS);

    let mut handled = Vec::new();
    let mut owned = Vec::new();
    for port in &ports {
        let text = app
            .http
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let metric = |name: &str| -> f64 {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().last()?.parse().ok())
                .unwrap_or(0.0)
        };
        handled.push(metric("runbridge_triggers_consumed_total"));
        owned.push(metric("runbridge_partitions_owned") as u32);
    }
    let mean = handled.iter().sum::<f64>() / WORKERS as f64;
    println!("triggers handled per worker: {handled:?} (mean {mean:.0})");
    // The reconciler's and relay's share: each partition leased to one
    // worker, every worker within one of the others (16 / 5: 3 or 4).
    println!("partitions owned per worker: {owned:?}");
    let partitions = app.settings.redis.partitions;
    let workers = WORKERS as u32;
    assert_eq!(owned.iter().sum::<u32>(), partitions, "{owned:?}");
    assert!(
        owned
            .iter()
            .all(|n| (partitions / workers..=partitions.div_ceil(workers)).contains(n)),
        "{owned:?}"
    );
    assert!(
        handled.iter().sum::<f64>() >= TRIGGERS as f64,
        "{handled:?}"
    );
    for n in &handled {
        assert!(
            (n - mean).abs() <= 0.3 * mean,
            "a worker handled {n}, mean {mean:.0}: {handled:?}"
        );
    }
    for c in &mut children {
        let _ = c.start_kill();
        let _ = c.wait().await;
    }
    app.stop().await;
}

/// A three-node RabbitMQ cluster made here from private nodes (own names,
/// ports and directories, the installed Erlang cookie; needs root). Three
/// workers process 2,000 triggers while the node that leads the trigger
/// queue is killed with `kill -9`. Then the chaos checker's invariants must
/// hold: every trigger settled with exactly one Databricks run, its event
/// delivered (to a quorum queue, which survives the node), duplicates only
/// with the same event id. Run by `make cluster-test`.
#[tokio::test]
#[ignore = "make cluster-test"]
async fn trigger_queue_leader_killed_in_a_three_node_cluster() {
    use runbridge_testkit::RabbitNode;
    use std::collections::{BTreeMap, BTreeSet};

    const TRIGGERS: usize = 2000;
    let uid = std::process::Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "the cluster test runs private RabbitMQ nodes as the rabbitmq user: run it as root"
    );
    let base = std::env::temp_dir().join(unique("rabbit-cluster"));
    let mut nodes: Vec<RabbitNode> = (0..3)
        .map(|i| {
            RabbitNode::new(
                &unique(&format!("it-c{i}")),
                base.join(format!("n{i}")),
                None,
            )
            .unwrap()
        })
        .collect();
    for n in &mut nodes {
        n.start().await.expect("node starts");
    }
    nodes[1].join(&nodes[0]).expect("node 2 joins");
    nodes[2].join(&nodes[0]).expect("node 3 joins");
    let urls: Vec<String> = nodes.iter().map(RabbitNode::amqp_url).collect();

    let app = TestApp::spawn_with(Options {
        overrides: vec![("amqp.url", urls[0].clone())],
        amqp_urls: urls[1..].to_vec(),
        extra_workers: 2,
        ..Default::default()
    })
    .await;
    let check = format!("{}.check", app.name);
    app.broker
        .declare_bound_quorum_queue(&check, &app.settings.amqp.events_exchange, "promise.#")
        .await
        .unwrap();
    let ids: Vec<String> = (0..TRIGGERS)
        .map(|i| format!("{}-c-{i}", app.name))
        .collect();
    for id in &ids {
        app.publish(&trigger(id, JOB_CALLBACK)).await;
    }
    // Kill the trigger queue's leader while the work is under way.
    eventually(Duration::from_secs(60), "300 runs launched", || async {
        (app.emulator_stats().await["runs"].as_u64()? >= 300).then_some(())
    })
    .await;
    let queue = &app.settings.amqp.triggers_queue;
    let leader = nodes[0].queue_leader(queue).expect("a leader");
    let victim = nodes
        .iter()
        .position(|n| n.name == leader)
        .expect("a node of ours leads");
    println!("killing {leader}, the leader of {queue}");
    nodes[victim].kill9().await;
    let survivor = &nodes[(victim + 1) % 3];

    // Every event, read from the quorum queue on a surviving node.
    let mut bs = runbridge::startup::broker_settings(&app.settings, "it-check");
    bs.url = survivor.amqp_url().into();
    bs.fallback_urls = Vec::new();
    let reader = Broker::connect(&bs).await.expect("a surviving node");
    let mut events = reader.consume_queue(&check).await.unwrap();
    let mut by_promise: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut deliveries = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    while by_promise.len() < TRIGGERS {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Ok(Some(ev)) = tokio::time::timeout(left, events.next()).await else {
            break;
        };
        deliveries += 1;
        let v: serde_json::Value = serde_json::from_slice(&ev.body).unwrap();
        assert_eq!(v["data"]["state"], "RESOLVED", "{v}");
        by_promise
            .entry(v["subject"].as_str().unwrap().to_owned())
            .or_default()
            .insert(ev.message_id.unwrap_or_default());
    }
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| !by_promise.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} events lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(
        by_promise.values().all(|ev_ids| ev_ids.len() == 1),
        "a promise with two different event ids"
    );
    // Exactly one Databricks run per idempotency token.
    let runs = app.emulator_get("/emulator/runs").await["runs"]
        .as_array()
        .cloned()
        .unwrap();
    let mut per_promise: BTreeMap<String, usize> = BTreeMap::new();
    for r in &runs {
        if let Some(p) = r["params"]["promise_id"].as_str() {
            *per_promise.entry(p.to_owned()).or_default() += 1;
        }
    }
    assert_eq!(per_promise.len(), TRIGGERS, "a trigger without its run");
    assert!(
        per_promise.values().all(|n| *n == 1),
        "a token with two runs"
    );
    println!(
        "{TRIGGERS} triggers, {} runs, {deliveries} event deliveries ({} duplicates, same event id)",
        runs.len(),
        deliveries - TRIGGERS
    );
    reader.close().await;
    app.stop().await;
    drop(nodes);
    let _ = std::fs::remove_dir_all(&base);
}

async fn sentinel_master(sentinel_port: u16, name: &str) -> Option<u16> {
    let c = redis::Client::open(format!("redis://127.0.0.1:{sentinel_port}")).ok()?;
    let mut conn = c.get_multiplexed_async_connection().await.ok()?;
    let addr: Vec<String> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(name)
        .query_async(&mut conn)
        .await
        .ok()?;
    addr.get(1)?.parse().ok()
}

async fn sentinel_replicas(sentinel_port: u16, name: &str) -> Option<usize> {
    let c = redis::Client::open(format!("redis://127.0.0.1:{sentinel_port}")).ok()?;
    let mut conn = c.get_multiplexed_async_connection().await.ok()?;
    let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
        .arg("replicas")
        .arg(name)
        .query_async(&mut conn)
        .await
        .ok()?;
    Some(replicas.len())
}

/// A Redis of the test's own with its append-only file in `dir/sub`.
async fn durable_node(dir: &std::path::Path, port: u16, sub: &str, extra: &[&str]) -> RedisServer {
    let d = dir.join(sub);
    std::fs::create_dir_all(&d).unwrap();
    RedisServer::durable(port, &d, extra).await.unwrap()
}

/// `redis.mode = "sentinel"` with `redis.wait_replicas = 1`: a master, two
/// replicas and three Sentinels made here (private ports and directories).
/// Triggers run; the master is killed with `kill -9`; once the Sentinels
/// have promoted a replica, new triggers run again, each with one run and one
/// event, with no restart of the workers (connections are replaced and ask
/// the Sentinels anew). Run by `make cluster-test`.
#[tokio::test]
#[ignore = "make cluster-test"]
async fn sentinel_failover_moves_the_store_to_the_new_master() {
    const BATCH: usize = 300;
    let dir = std::env::temp_dir().join(unique("sentinel"));
    std::fs::create_dir_all(&dir).unwrap();
    let (m, r) = (free_port(), free_port());
    let mut master = durable_node(&dir, m, "m", &[]).await;
    let m_port = m.to_string();
    let replica_of = ["--replicaof", "127.0.0.1", m_port.as_str()];
    let _replica = durable_node(&dir, r, "r", &replica_of).await;
    // A second replica, so that the promoted one has a replica of its own
    // and `WAIT 1` keeps being answered after the failover.
    let r2 = free_port();
    let _replica2 = durable_node(&dir, r2, "r2", &replica_of).await;
    let mut sentinels = Vec::new();
    for i in 0..3 {
        let port = free_port();
        let conf = dir.join(format!("sentinel-{i}.conf"));
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nlogfile sentinel-{i}.log\nsentinel monitor rbm 127.0.0.1 {m} 2\n\
                 sentinel down-after-milliseconds rbm 1000\nsentinel failover-timeout rbm 5000\n\
                 sentinel parallel-syncs rbm 1\n",
                dir.display()
            ),
        )
        .unwrap();
        sentinels.push(
            RedisServer::start(&[conf.display().to_string(), "--sentinel".into()], port)
                .await
                .unwrap(),
        );
    }
    let s0 = sentinels[0].port();
    eventually(
        Duration::from_secs(20),
        "the Sentinels know the master",
        || async { (sentinel_master(s0, "rbm").await? == m).then_some(()) },
    )
    .await;
    // A Sentinel learns of replicas from the master's INFO (every 10 s): a
    // failover before every Sentinel knows both would find no replica.
    for s in &sentinels {
        eventually(
            Duration::from_secs(30),
            "the Sentinels know both replicas",
            || async { (sentinel_replicas(s.port(), "rbm").await? >= 2).then_some(()) },
        )
        .await;
    }

    let mut app = TestApp::spawn_with(Options {
        overrides: vec![
            ("redis.mode", "sentinel".into()),
            ("redis.sentinel_master", "rbm".into()),
            ("redis.url", format!("redis://127.0.0.1:{m}")),
            // Every transition replicated before it counts.
            ("redis.wait_replicas", "1".into()),
        ],
        redis_sentinels: sentinels
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}", s.port()))
            .collect(),
        ..Default::default()
    })
    .await;
    let name = app.name.clone();
    let batch =
        |tag: &str| -> Vec<String> { (0..BATCH).map(|i| format!("{name}-{tag}-{i}")).collect() };
    let before = batch("before");
    for id in &before {
        app.publish(&trigger(id, JOB_CALLBACK)).await;
    }
    app.events_for_all(&before, Duration::from_secs(120)).await;

    master.kill9();
    let promoted = eventually(Duration::from_secs(60), "a replica promoted", || async {
        let now = sentinel_master(s0, "rbm").await?;
        (now == r || now == r2).then_some(now)
    })
    .await;
    println!("master on {m} killed; the Sentinels promoted {promoted}");

    let after = batch("after");
    for id in &after {
        app.publish(&trigger(id, JOB_CALLBACK)).await;
    }
    let events = app.events_for_all(&after, Duration::from_secs(120)).await;
    for (id, evs) in &events {
        let ids: std::collections::BTreeSet<&str> =
            evs.iter().filter_map(|e| e["id"].as_str()).collect();
        assert_eq!(ids.len(), 1, "{id}: {ids:?}");
        assert_eq!(evs[0]["data"]["state"], "RESOLVED");
    }
    for id in after.iter().step_by(50) {
        assert_eq!(app.runs_for(id).await.len(), 1, "{id}");
    }
    // The test's own store answers from the promoted replica too, once the
    // connection to the dead master has failed its one command (callers
    // retry; the pool replaces it).
    let id = runbridge::domain::PromiseId::parse(&after[0]).unwrap();
    let p = eventually(
        Duration::from_secs(10),
        "a read through the new master",
        || async {
            runbridge::store::PromiseStore::get(&app.store, &id)
                .await
                .ok()
                .flatten()
        },
    )
    .await;
    assert_eq!(p.state, runbridge::domain::State::Resolved);
    app.stop().await;
    drop(sentinels);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `redis.wait_replicas`: a transition that no replica confirmed is reported
/// as a retryable error (the machine's Redis has no replica), while the write
/// itself stands, so the caller's retry finds it.
#[tokio::test]
async fn wait_replicas_reports_an_unreplicated_transition() {
    use runbridge::store::{CreateOutcome, PromiseStore, RedisStore, Timeout};
    let app = TestApp::spawn_with(Options {
        worker: false,
        // The machine's Redis, which has no replica (also under `make
        // cluster-test`, whose cluster primaries have one each).
        overrides: vec![("redis.url", "redis://127.0.0.1:6379".into())],
        ..Default::default()
    })
    .await;
    let s = &app.settings;
    let store = RedisStore::connect(&runbridge::store::StoreSettings {
        url: secrecy::ExposeSecret::expose_secret(&s.redis.url).to_owned(),
        keys: s.keys().unwrap(),
        retention: Duration::from_secs(60),
        pool_size: 2,
        response_timeout: Duration::from_secs(2),
        first_poll: Duration::from_secs(1),
        tls_ca_pem: None,
        topology: Default::default(),
        wait_replicas: 1,
        wait_timeout: Duration::from_millis(100),
    })
    .await
    .unwrap();
    let id = runbridge::domain::PromiseId::parse(&unique("unreplicated")).unwrap();
    let new = new_promise(&id, Timeout::After(Duration::from_secs(60)));
    let Err(e) = store.create(&new).await else {
        panic!("a transition no replica confirmed was reported as done");
    };
    assert!(e.to_string().contains("replicated to 0 of"), "{e}");
    // The write stands: the retry (here without WAIT) finds it.
    assert!(matches!(
        app.store.create(&new).await.unwrap(),
        CreateOutcome::Existing(_)
    ));
    app.stop().await;
}

/// Every event delivered to `queue`, by promise: its event ids and states.
/// Reads until `expected` promises have one, or nothing new came for
/// `quiet`, or `limit` passed.
async fn collect_events(
    reader: &Broker,
    queue: &str,
    expected: usize,
    limit: Duration,
    quiet: Duration,
) -> (
    std::collections::BTreeMap<String, (std::collections::BTreeSet<String>, Vec<String>)>,
    usize,
) {
    let mut events = reader.consume_queue(queue).await.unwrap();
    let mut by_promise = std::collections::BTreeMap::new();
    let mut deliveries = 0usize;
    let deadline = tokio::time::Instant::now() + limit;
    while by_promise.len() < expected {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Ok(Some(ev)) = tokio::time::timeout(left.min(quiet), events.next()).await else {
            break;
        };
        deliveries += 1;
        let v: serde_json::Value = serde_json::from_slice(&ev.body).unwrap();
        let (ids, states): &mut (std::collections::BTreeSet<String>, Vec<String>) = by_promise
            .entry(v["subject"].as_str().unwrap().to_owned())
            .or_default();
        ids.insert(ev.message_id.unwrap_or_default());
        states.push(v["data"]["state"].as_str().unwrap_or("").to_owned());
    }
    (by_promise, deliveries)
}

/// A Redis Cluster of the test's own (`scripts/redis-cluster.sh`: 3
/// primaries, 3 replicas, private ports and directory), removed when dropped.
struct RedisCluster {
    dir: std::path::PathBuf,
    seeds: Vec<String>,
}

impl RedisCluster {
    fn script() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/redis-cluster.sh")
    }

    fn up() -> RedisCluster {
        let dir = std::env::temp_dir().join(unique("redis-cluster"));
        let out = std::process::Command::new(Self::script())
            .arg("up")
            .arg(&dir)
            .output()
            .expect("scripts/redis-cluster.sh runs");
        assert!(
            out.status.success(),
            "redis cluster: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let seeds = std::fs::read_to_string(dir.join("seeds")).unwrap();
        let seeds = seeds.trim().split(',').map(str::to_owned).collect();
        RedisCluster { dir, seeds }
    }

    fn port(url: &str) -> u16 {
        url.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// `CLUSTER NODES` as (port, flags, master id / "-", id) per node, from
    /// the first node in `ports` that answers.
    async fn nodes(ports: &[u16]) -> Option<Vec<(u16, String, String, String)>> {
        for port in ports {
            let Ok(c) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
                continue;
            };
            let Ok(mut conn) = c.get_multiplexed_async_connection().await else {
                continue;
            };
            let Ok(text): redis::RedisResult<String> = redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut conn)
                .await
            else {
                continue;
            };
            return Some(
                text.lines()
                    .filter_map(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        let port = f.get(1)?.split('@').next()?.rsplit(':').next()?;
                        Some((
                            port.parse().ok()?,
                            f.get(2)?.to_string(),
                            f.get(3)?.to_string(),
                            f.first()?.to_string(),
                        ))
                    })
                    .collect(),
            );
        }
        None
    }

    fn ports(&self) -> Vec<u16> {
        self.seeds.iter().map(|s| Self::port(s)).collect()
    }

    fn kill9(&self, port: u16) {
        let pid = std::fs::read_to_string(self.dir.join(format!("{port}.pid"))).unwrap();
        let st = std::process::Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    fn restart(&self, port: u16) {
        let st = std::process::Command::new(Self::script())
            .arg("restart")
            .arg(&self.dir)
            .arg(port.to_string())
            .status()
            .unwrap();
        assert!(st.success(), "node {port} restarts");
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new(Self::script())
            .arg("down")
            .arg(&self.dir)
            .status();
    }
}

/// What a primary's `kill -9` cost, by the chaos checker's invariants.
#[derive(Debug, Default)]
struct KillReport {
    /// Triggers with no completion event at all.
    lost: usize,
    /// Promises with events of two different ids (settled twice: the first
    /// settlement was lost with the primary after its event went out).
    diverged: usize,
    /// Promises whose stored record is gone, pending, or in another state
    /// than their event says.
    record_mismatch: usize,
    /// Promises with more than one Databricks run (must be none).
    extra_runs: usize,
    /// A few of the promises above, with their events' states in order of
    /// delivery and the stored record's state, to tell what happened.
    examples: Vec<String>,
    states: std::collections::BTreeMap<String, usize>,
}

/// 3 workers, 2,000 triggers on a 6-node Redis Cluster; once 300 runs were
/// launched, a primary is killed with `kill -9` after its replica was cut
/// off for half a second; after its replica was promoted the node is restarted (it
/// rejoins as a replica). Every trigger's events, runs and stored promise
/// are then checked.
async fn redis_cluster_primary_killed(wait_replicas: u64) -> KillReport {
    use std::collections::BTreeMap;
    const TRIGGERS: usize = 2000;
    let cluster = RedisCluster::up();
    let ports = cluster.ports();
    let mut overrides = vec![("redis.wait_replicas", wait_replicas.to_string())];
    if wait_replicas > 0 {
        overrides.push(("redis.wait_timeout_ms", "500".into()));
    }
    let app = TestApp::spawn_with(Options {
        redis_cluster: cluster.seeds.clone(),
        extra_workers: 2,
        overrides,
        ..Default::default()
    })
    .await;
    let check = format!("{}.check", app.name);
    app.broker
        .declare_bound_queue(&check, &app.settings.amqp.events_exchange, "promise.#")
        .await
        .unwrap();
    let ids: Vec<String> = (0..TRIGGERS)
        .map(|i| format!("{}-k-{i}", app.name))
        .collect();
    // Published while the kill happens.
    let publisher = app.broker.publisher().await.unwrap();
    let publishing = tokio::spawn({
        let ids = ids.clone();
        async move {
            for id in &ids {
                let body = serde_json::to_vec(&trigger(id, JOB_CALLBACK)).unwrap();
                publisher
                    .publish_trigger(&body, None, None, None)
                    .await
                    .unwrap();
            }
        }
    });
    eventually(Duration::from_secs(120), "300 runs launched", || async {
        (app.emulator_stats().await["runs"].as_u64()? >= 300).then_some(())
    })
    .await;
    let nodes = RedisCluster::nodes(&ports).await.unwrap();
    let (victim, _, _, victim_id) = nodes
        .iter()
        .find(|(_, flags, _, _)| flags.contains("master"))
        .cloned()
        .unwrap();
    // Cut the victim's replication link for half a second first, as a
    // network partition between the two would: the replica is told a wrong
    // password for its primary, so it cannot reconnect, and its link is
    // dropped. The primary goes on acknowledging writes its replica never
    // gets, which is what a failover can lose.
    let (replica, _, _, _) = nodes
        .iter()
        .find(|(_, _, master, _)| *master == victim_id)
        .cloned()
        .unwrap();
    let redis_at = |port: u16| async move {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    };
    let mut on_replica = redis_at(replica).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("masterauth")
        .arg("not-the-password")
        .query_async(&mut on_replica)
        .await
        .unwrap();
    let cut: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("replica")
        .query_async(&mut redis_at(victim).await)
        .await
        .unwrap();
    assert_eq!(cut, 1, "the victim's replication link was cut");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let launched = app.emulator_stats().await["runs"].as_u64().unwrap_or(0);
    println!(
        "killing primary {victim} with kill -9 ({launched} runs launched; its replica {replica} cut off for 500 ms)"
    );
    cluster.kill9(victim);
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("masterauth")
        .arg("")
        .query_async(&mut on_replica)
        .await
        .unwrap();
    let survivors: Vec<u16> = ports.iter().copied().filter(|p| *p != victim).collect();
    eventually(Duration::from_secs(60), "its replica promoted", || async {
        let nodes = RedisCluster::nodes(&survivors).await?;
        let dead = nodes
            .iter()
            .any(|(p, f, _, _)| *p == victim && f.contains("fail"));
        // The former replica of the victim now leads: a master that is not the victim.
        let replica_led = nodes.iter().all(|(_, _, m, _)| *m != victim_id);
        (dead && replica_led).then_some(())
    })
    .await;
    cluster.restart(victim);
    eventually(
        Duration::from_secs(60),
        "the old primary rejoined as a replica",
        || async {
            let nodes = RedisCluster::nodes(&survivors).await?;
            nodes
                .iter()
                .any(|(p, f, m, _)| *p == victim && f.contains("slave") && m != "-")
                .then_some(())
        },
    )
    .await;
    println!("primary {victim} failed over and rejoined as a replica");
    publishing.await.unwrap();

    let (by_promise, deliveries) = collect_events(
        &app.broker,
        &check,
        TRIGGERS,
        Duration::from_secs(300),
        Duration::from_secs(45),
    )
    .await;
    let mut r = KillReport::default();
    let runs = app.emulator_get("/emulator/runs").await["runs"]
        .as_array()
        .cloned()
        .unwrap();
    let mut per_promise: BTreeMap<String, usize> = BTreeMap::new();
    for run in &runs {
        if let Some(p) = run["params"]["promise_id"].as_str() {
            *per_promise.entry(p.to_owned()).or_default() += 1;
        }
    }
    r.extra_runs = per_promise.values().filter(|n| **n > 1).count();
    for id in &ids {
        let Some((event_ids, states)) = by_promise.get(id) else {
            r.lost += 1;
            continue;
        };
        let last = states.last().cloned().unwrap_or_default();
        *r.states.entry(last.clone()).or_default() += 1;
        let stored = app.promise(id).await;
        let matches = stored.as_ref().is_some_and(|p| p.state.to_string() == last);
        if !matches {
            r.record_mismatch += 1;
        }
        if event_ids.len() > 1 {
            r.diverged += 1;
        }
        if (event_ids.len() > 1 || !matches) && r.examples.len() < 5 {
            r.examples.push(format!(
                "{id}: events {states:?}, stored {:?} by {:?}",
                stored.as_ref().map(|p| p.state.to_string()),
                stored.as_ref().and_then(|p| p.settled_by.clone())
            ));
        }
    }
    println!(
        "redis.wait_replicas = {wait_replicas}: {TRIGGERS} triggers, {} runs, {deliveries} event deliveries; \
         lost {}, settled twice {}, record gone or different {}, promises with two runs {}; final states {:?}",
        runs.len(),
        r.lost,
        r.diverged,
        r.record_mismatch,
        r.extra_runs,
        r.states
    );
    for e in &r.examples {
        println!("  e.g. {e}");
    }
    app.stop().await;
    drop(cluster);
    r
}

/// Without `WAIT`, Redis replicates asynchronously: what the killed primary
/// acknowledged but had not sent to its replica is gone. Measured, and
/// printed. A promise whose record the failover lost is, on redelivery, a
/// new incarnation with a new idempotency token (tokens are bound to the
/// creation time), so it may get a second run; no other promise may. Run by
/// `make cluster-test`.
#[tokio::test]
#[ignore = "make cluster-test"]
async fn redis_cluster_primary_killed_without_wait() {
    let r = redis_cluster_primary_killed(0).await;
    assert!(r.extra_runs <= r.record_mismatch, "{r:?}");
}

/// With `redis.wait_replicas = 1` every transition and every published
/// settlement reached the replica before it counted: the same kill loses
/// nothing, settles nothing twice, and every stored promise matches its
/// event. Run by `make cluster-test`.
#[tokio::test]
#[ignore = "make cluster-test"]
async fn redis_cluster_primary_killed_with_wait_loses_nothing() {
    let r = redis_cluster_primary_killed(1).await;
    assert_eq!(
        (r.lost, r.diverged, r.record_mismatch, r.extra_runs),
        (0, 0, 0, 0),
        "{r:?}"
    );
}
