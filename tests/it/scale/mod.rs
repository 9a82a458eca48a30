//! Running at scale and on clusters. Here: several broker nodes
//! (`amqp.urls` lists more nodes of the cluster; a connect tries the node
//! that answered last first, then the others in turn) and five workers on
//! one queue. Beside: a RabbitMQ cluster losing its queue leader
//! (`rabbit_cluster`), Redis Sentinel and `redis.wait_replicas`
//! (`sentinel`), a Redis Cluster losing a primary (`redis_cluster`). The
//! long ones are ignored in `make test` and run by `make cluster-test`.

mod rabbit_cluster;
mod redis_cluster;
mod sentinel;

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
