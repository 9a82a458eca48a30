//! A Redis Cluster of the test's own whose primary is killed with `kill -9`
//! under load, without and with `redis.wait_replicas`.

use std::time::Duration;

use runbridge::broker::Broker;

use crate::helpers::*;

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
