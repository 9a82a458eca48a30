//! A three-node RabbitMQ cluster of private nodes whose trigger-queue
//! leader is killed with `kill -9` under load.

use std::time::Duration;

use runbridge::broker::Broker;

use crate::helpers::*;

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
