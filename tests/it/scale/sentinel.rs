//! Redis Sentinel failover, and `redis.wait_replicas` on a Redis without
//! replicas.

use std::time::Duration;

use crate::helpers::*;

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
