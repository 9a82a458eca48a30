//! The workload: triggers drawn from the seed (1 % malformed, jobs by
//! weight, some with a retry policy, some with a chatty notebook) and
//! parent triggers among them (every join policy, with and without
//! fail_fast and max_concurrency), published at a steady rate through every
//! outage.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use runbridge::broker::{Broker, BrokerSettings, Publisher};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// The emulator's jobs, by id: outcome, notebook time (ms) and result.
/// Job 5 never finishes: only children whose parent another child decides
/// run it, so only a parent's cancel ends it. Job 6 fails the first
/// [`FLAKY_FAILS`] attempts of each promise ([`JOB_FLAGS`]); job 7's
/// notebook sends [`CHATTY_UPDATES`] progress updates over its 2 s.
pub const JOBS: [&str; 7] = [
    "1:callback:300:ok",
    "2:duplicate_callback:300:twice",
    "3:fail:300",
    "4:early_callback:100:early",
    "5:never_finish:0",
    "6:callback:300:ok",
    "7:callback:2000:chatty",
];
pub const FLAKY: u64 = 6;
pub const FLAKY_FAILS: u32 = 2;
pub const CHATTY: u64 = 7;
pub const CHATTY_UPDATES: u32 = 200;
/// The emulator flags that make jobs 6 and 7 what they are.
pub fn job_flags() -> Vec<String> {
    vec![
        "--job-fail-attempts".into(),
        format!("{FLAKY}={FLAKY_FAILS}"),
        "--job-progress".into(),
        format!("{CHATTY}={CHATTY_UPDATES}"),
    ]
}

/// A trigger of the flaky job with a retry policy: with 3 attempts it
/// resolves on the third, with 2 it is rejected when they are exhausted.
#[derive(Debug, Clone)]
pub struct RetryPlan {
    pub mode: &'static str,
    pub max_attempts: u32,
}

/// Job 3's runs fail; 1, 2 and 4 resolve.
const FAILING: u64 = 3;
const NEVER: u64 = 5;

/// A parent trigger of the plan.
#[derive(Debug, Clone)]
pub struct ParentPlan {
    pub id: String,
    pub join: &'static str,
    pub fail_fast: bool,
    pub children: usize,
}

impl ParentPlan {
    pub fn child_id(&self, n: usize) -> String {
        format!("{}/{n}", self.id)
    }
}

/// The trigger bodies, in publishing order, and their ids by kind.
pub struct Plan {
    pub bodies: Vec<Value>,
    /// Triggers of one run each.
    pub valid_ids: HashSet<String>,
    pub malformed_ids: HashSet<String>,
    pub parents: Vec<ParentPlan>,
    /// Triggers with a retry policy (of the flaky job), by id.
    pub retrying: HashMap<String, RetryPlan>,
    /// Triggers of the chatty job.
    pub chatty: HashSet<String>,
}

/// The jobs of a parent's children. A never-finishing child comes only
/// after the child that decides its parent under fail_fast (the first
/// failing one under `all`, the first resolving one under `any`): children
/// start in order, so that child always gets a slot and the parent always
/// settles, and the never-finishing ones must be cancelled by it.
fn children_jobs(rng: &mut StdRng, join: &str, fail_fast: bool, n: usize) -> Vec<u64> {
    let mut jobs: Vec<u64> = (0..n)
        .map(|_| match rng.random::<f64>() {
            r if r < 0.70 => 1,
            r if r < 0.80 => 2,
            r if r < 0.90 => FAILING,
            _ => 4,
        })
        .collect();
    let decisive = match (join, fail_fast) {
        ("all", true) => jobs.iter().position(|j| *j == FAILING),
        ("any", true) => jobs.iter().position(|j| *j != FAILING),
        _ => None,
    };
    if let Some(k) = decisive {
        for j in jobs.iter_mut().skip(k + 1) {
            if rng.random::<f64>() < 0.3 {
                *j = NEVER;
            }
        }
    }
    jobs
}

impl Plan {
    pub fn draw(seed: u64, triggers: usize, parents: usize, children: usize) -> Plan {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut plan = Plan {
            bodies: Vec::with_capacity(triggers + parents),
            valid_ids: HashSet::new(),
            malformed_ids: HashSet::new(),
            parents: Vec::with_capacity(parents),
            retrying: HashMap::new(),
            chatty: HashSet::new(),
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
                    r if r < 0.74 => 1,
                    r if r < 0.84 => 2,
                    r if r < 0.89 => 3,
                    r if r < 0.94 => 4,
                    r if r < 0.97 => FLAKY,
                    _ => CHATTY,
                };
                let mut body = json!({
                    "id": id, "job_id": job, "timeout_seconds": 3600,
                    "tags": {"chaos": seed.to_string()},
                });
                if job == FLAKY {
                    let r = RetryPlan {
                        mode: if rng.random::<bool>() {
                            "repair"
                        } else {
                            "rerun"
                        },
                        max_attempts: rng.random_range(2..=3),
                    };
                    body["retry"] = json!({"max_attempts": r.max_attempts, "mode": r.mode,
                        "backoff": {"initial_seconds": 0.5, "multiplier": 2}});
                    plan.retrying.insert(id.clone(), r);
                }
                if job == CHATTY {
                    plan.chatty.insert(id.clone());
                }
                plan.bodies.push(body);
                plan.valid_ids.insert(id);
            }
        }
        for j in 0..parents {
            let id = format!("c{seed}-p{j:04}");
            let join = ["all", "all_settled", "any"][rng.random_range(0..3)];
            let fail_fast = join != "all_settled" && rng.random::<f64>() < 0.7;
            let max_concurrency = (rng.random::<f64>() < 0.5).then(|| rng.random_range(2..=6u32));
            let n = children.max(1);
            let kids: Vec<Value> = children_jobs(&mut rng, join, fail_fast, n)
                .into_iter()
                .map(|job| json!({"job_id": job}))
                .collect();
            let mut body = json!({
                "id": id, "children": kids, "join": join, "fail_fast": fail_fast,
                "timeout_seconds": 3600, "tags": {"chaos": seed.to_string()},
            });
            if let Some(m) = max_concurrency {
                body["max_concurrency"] = json!(m);
            }
            // Among the triggers, at a place drawn from the seed.
            let at = rng.random_range(0..=plan.bodies.len());
            plan.bodies.insert(at, body);
            plan.parents.push(ParentPlan {
                id,
                join,
                fail_fast,
                children: n,
            });
        }
        plan
    }

    /// How many promises the run makes: one per valid trigger, per parent
    /// and per child (a child cancelled before it started is one too).
    pub fn promises(&self) -> usize {
        self.valid_ids.len() + self.parents.iter().map(|p| 1 + p.children).sum::<usize>()
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
