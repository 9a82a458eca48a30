//! The workload: triggers drawn from the seed (1 % malformed, jobs by
//! weight), published at a steady rate through every outage.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use runbridge::broker::{Broker, BrokerSettings, Publisher};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// The emulator's jobs, by id: outcome, notebook time (ms) and result.
pub const JOBS: [&str; 4] = [
    "1:callback:300:ok",
    "2:duplicate_callback:300:twice",
    "3:fail:300",
    "4:early_callback:100:early",
];

/// The trigger bodies, in publishing order, and their ids by kind.
pub struct Plan {
    pub bodies: Vec<Value>,
    pub valid_ids: HashSet<String>,
    pub malformed_ids: HashSet<String>,
}

impl Plan {
    pub fn draw(seed: u64, triggers: usize) -> Plan {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut plan = Plan {
            bodies: Vec::with_capacity(triggers),
            valid_ids: HashSet::new(),
            malformed_ids: HashSet::new(),
        };
        for i in 0..triggers {
            let id = format!("c{seed}-{i:06}");
            if rng.random::<f64>() < 0.01 {
                // Both job_id and submit: refused and dead-lettered. It has an
                // id, so a re-published copy (lost confirm) is recognised as
                // the same.
                let id = format!("{id}-malformed");
                plan.bodies
                    .push(json!({"id": id, "job_id": 1, "submit": {"tasks": []}}));
                plan.malformed_ids.insert(id);
            } else {
                let job = match rng.random::<f64>() {
                    r if r < 0.80 => 1,
                    r if r < 0.90 => 2,
                    r if r < 0.95 => 3,
                    _ => 4,
                };
                plan.bodies.push(json!({
                    "id": id, "job_id": job, "timeout_seconds": 3600,
                    "tags": {"chaos": seed.to_string()},
                }));
                plan.valid_ids.insert(id);
            }
        }
        plan
    }
}

/// Publishes `bodies` at `rate` per second with confirms, reconnecting and
/// retrying each until it is confirmed; counts each in `published`.
pub fn publish(
    bs: BrokerSettings,
    bodies: Vec<Value>,
    rate: f64,
    published: Arc<AtomicUsize>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let interval = Duration::from_secs_f64(1.0 / rate.max(0.1));
        let start = Instant::now();
        let mut conn: Option<(Broker, Publisher)> = None;
        for (i, body) in bodies.iter().enumerate() {
            tokio::time::sleep_until((start + interval * i as u32).into()).await;
            let bytes = serde_json::to_vec(body).unwrap_or_default();
            loop {
                let Some((_, p)) = conn.as_ref() else {
                    conn = connect(&bs).await;
                    if conn.is_none() {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    continue;
                };
                match p.publish_trigger(&bytes, None, None, None).await {
                    Ok(()) => break,
                    Err(_) => conn = None,
                }
            }
            published.fetch_add(1, Ordering::Relaxed);
        }
    })
}

async fn connect(bs: &BrokerSettings) -> Option<(Broker, Publisher)> {
    let b = Broker::connect(bs).await.ok()?;
    let p = b.publisher().await.ok()?;
    Some((b, p))
}
