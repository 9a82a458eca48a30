//! The audit under chaos. The workers audit the workspace throughout the
//! run; early on this module plants one disagreement of each kind from
//! outside runbridge, the way they happen in production:
//!
//! - **orphan**: a run started by hand for a promise already settled;
//! - **duplicate**: a second run started by hand for a pending promise;
//! - **mismatch**: a notebook that calls back, then fails (job 8);
//! - **lost**: a pending promise whose run check is taken off the schedule
//!   (`ZREM` of its polls entry), so only the audit can notice its run end.
//!
//! At the end it checks, from the finding events an independent queue
//! received: each planted disagreement was found (how long after it became
//! visible is reported: it is how the audit keeps up under the faults, not
//! a bound), and every other finding is confirmed by the emulator's record
//! (no false finding). Then it
//! audits once more, report-only, and holds the audit's counts by kind
//! against the checker's own, computed from the emulator's record of every
//! run and the store's promises.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use runbridge::audit::{Auditor, FindingKind, Mode};
use runbridge::broker::{Broker, BrokerSettings};
use runbridge::config::Settings;
use runbridge::domain::{Promise, PromiseId, State};
use runbridge::store::{PromiseStore, RedisStore};
use serde_json::{Value, json};

use crate::lab::Lab;

/// The queue bound to every finding event, declared before anything runs.
pub const FINDINGS_QUEUE: &str = "chaos.findings";
/// Job 8 calls back, then fails; job 9 exits with a value after 8 s
/// without calling back (time to take its check off the schedule); job 10
/// does the same after a minute (a promise pending long enough for its
/// duplicate to be found as one).
pub const JOBS: [&str; 3] = [
    "8:callback_then_fail:300:ok",
    "9:success_no_callback:8000:exit",
    "10:success_no_callback:60000:long",
];
const NEVER: u64 = 5;
/// The audit's settings in the workers: an audit every 3 s, listing the
/// runs started since the last one from 5 s before it; a run or a
/// settlement younger than 15 s left alone (a cancel held up by a fault
/// must not read as an orphan); a run ended 90 s ago with its promise
/// pending is lost (under these faults the reconciler was seen settling a
/// run 50 s after it ended: a partition's lease handed over after a kill,
/// Redis restarting, the emulator's 429 pauses).
pub const ENV: [(&str, &str); 5] = [
    ("RUNBRIDGE__AUDIT__INTERVAL_MS", "3000"),
    ("RUNBRIDGE__AUDIT__OVERLAP_MS", "5000"),
    ("RUNBRIDGE__AUDIT__GRACE_MS", "15000"),
    ("RUNBRIDGE__AUDIT__LOST_AFTER_MS", "90000"),
    ("RUNBRIDGE__AUDIT__LOOKBACK_MS", "3600000"),
];
const GRACE_MS: i64 = 15_000;
const LOST_AFTER_MS: i64 = 90_000;

/// The planted disagreements' promise ids.
pub struct Plants {
    pub orphan: String,
    pub duplicate: String,
    pub mismatch: String,
    pub lost: String,
}

impl Plants {
    pub fn new(seed: u64) -> Self {
        let id = |k: &str| format!("plant-{seed}-{k}");
        Self {
            orphan: id("orphan"),
            duplicate: id("duplicate"),
            mismatch: id("mismatch"),
            lost: id("lost"),
        }
    }

    pub fn ids(&self) -> [&String; 4] {
        [&self.orphan, &self.duplicate, &self.mismatch, &self.lost]
    }
}

/// When each planted disagreement became visible (ms) and its run.
#[derive(Debug, Default)]
pub struct Planted {
    pub visible_at: BTreeMap<FindingKind, (i64, u64)>,
    pub failures: Vec<String>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn wait_for<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> Result<T> {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if std::time::Instant::now() > deadline {
            bail!("{what}: not within 180 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn promise(store: &RedisStore, id: &str) -> Option<Promise> {
    store.get(&PromiseId::parse(id).ok()?).await.ok().flatten()
}

/// `run-now` as a person sends it (no idempotency token), straight to the
/// emulator; retried past its injected 429s and 503s, which it answers
/// before it creates anything.
async fn run_by_hand(emu_port: u16, job: u64, promise_id: &str) -> Result<u64> {
    let http = reqwest::Client::new();
    for _ in 0..50 {
        let r = http
            .post(format!("http://127.0.0.1:{emu_port}/api/2.2/jobs/run-now"))
            .bearer_auth("dapi-chaos")
            .json(&json!({"job_id": job, "job_parameters": {"promise_id": promise_id}}))
            .send()
            .await;
        if let Ok(r) = r
            && r.status().is_success()
        {
            let v: Value = r.json().await?;
            return v["run_id"].as_u64().context("run-now answered no run id");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("run-now by hand refused 50 times")
}

/// Publishes the planted triggers `after` the start, then plants each
/// disagreement once its promise is where it must be.
pub async fn plant(
    bs: BrokerSettings,
    store: RedisStore,
    redis_url: String,
    emu_port: u16,
    plants: Plants,
    after: Duration,
) -> Planted {
    tokio::time::sleep(after).await;
    let mut out = Planted::default();
    if let Err(e) = plant_all(&bs, &store, &redis_url, emu_port, &plants, &mut out).await {
        out.failures.push(format!("planting stopped: {e:#}"));
    }
    out
}

async fn plant_all(
    bs: &BrokerSettings,
    store: &RedisStore,
    redis_url: &str,
    emu_port: u16,
    p: &Plants,
    out: &mut Planted,
) -> Result<()> {
    // The broker, Redis and the emulator come and go under the faults:
    // every step is retried until it goes through.
    for body in [
        json!({"id": p.orphan, "job_id": 1}),
        json!({"id": p.duplicate, "job_id": 10}),
        json!({"id": p.mismatch, "job_id": 8}),
        json!({"id": p.lost, "job_id": 9}),
    ] {
        let bytes = serde_json::to_vec(&body)?;
        wait_for("publishing a planted trigger", || async {
            let b = Broker::connect(bs).await.ok()?;
            let sent = match b.publisher().await {
                Ok(p) => p.publish_trigger(&bytes, None, None, None).await.ok(),
                Err(_) => None,
            };
            b.close().await;
            sent
        })
        .await?;
    }

    // lost: its check off the schedule while its run goes on (8 s).
    let run = wait_for("the lost plant's run recorded", || async {
        promise(store, &p.lost).await.and_then(|x| x.run_id)
    })
    .await?;
    let id = PromiseId::parse(&p.lost)?;
    let keys = store.keys();
    let polls = keys.polls(keys.partition(&id));
    let client = redis::Client::open(redis_url)?;
    wait_for("taking the lost plant's check off the schedule", || async {
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("ZREM")
            .arg(&polls)
            .arg(&p.lost)
            .query_async::<i64>(&mut conn)
            .await
            .ok()
    })
    .await?;
    // Visible once its run has ended and lost_after has passed.
    out.visible_at.insert(
        FindingKind::Lost,
        (now_ms() + 8_000 + LOST_AFTER_MS, run.get()),
    );

    // orphan: a run by hand once its promise is settled.
    wait_for("the orphan plant's promise settled", || async {
        promise(store, &p.orphan)
            .await
            .filter(|x| x.state.is_settled())
    })
    .await?;
    let orphan = run_by_hand(emu_port, NEVER, &p.orphan).await?;
    out.visible_at
        .insert(FindingKind::Orphan, (now_ms() + GRACE_MS, orphan));

    // duplicate: a second run by hand once the first is recorded.
    wait_for("the duplicate plant's run recorded", || async {
        promise(store, &p.duplicate).await.and_then(|x| x.run_id)
    })
    .await?;
    let dup = run_by_hand(emu_port, NEVER, &p.duplicate).await?;
    out.visible_at
        .insert(FindingKind::Duplicate, (now_ms() + GRACE_MS, dup));

    // mismatch: visible when the promise resolves (its run fails right
    // after) and names its run (a callback can come before the record).
    let settled = wait_for("the mismatch plant's promise settled", || async {
        promise(store, &p.mismatch)
            .await
            .filter(|x| x.state.is_settled() && x.run_id.is_some())
    })
    .await?;
    let run = settled.run_id.map_or(0, |r| r.get());
    out.visible_at
        .insert(FindingKind::Mismatch, (now_ms(), run));
    Ok(())
}

/// Waits, up to `limit`, until the workers' audit has kept a finding of
/// each plant (its kind and run).
pub async fn wait_found(store: &RedisStore, planted: &Planted, limit: Duration) {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        let kept = runbridge::audit::kept_findings(store, "default", 100_000)
            .await
            .unwrap_or_default();
        let all = planted
            .visible_at
            .iter()
            .all(|(kind, (_, run))| kept.iter().any(|f| f.kind == *kind && f.run.run_id == *run));
        if all {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!(
        "[chaos] the audit's findings of the plants waited for {:.0}s",
        start.elapsed().as_secs_f64()
    );
}

fn kind_of(text: &str) -> Option<FindingKind> {
    FindingKind::ALL.into_iter().find(|k| k.as_str() == text)
}

fn ended(r: &Value) -> bool {
    matches!(
        r["life_cycle_state"].as_str(),
        Some("TERMINATED" | "SKIPPED" | "INTERNAL_ERROR")
    )
}

/// The checker's own reading of one run at the end, from the emulator's
/// record and the store's promise.
fn read_run(r: &Value, by_id: &HashMap<String, &Promise>) -> Option<FindingKind> {
    let pid = r["params"]["promise_id"]
        .as_str()
        .filter(|s| !s.is_empty())?;
    let run_id = r["run_id"].as_u64().unwrap_or(0);
    let result = r["result_state"].as_str().unwrap_or("");
    let Some(p) = by_id.get(pid) else {
        return (!ended(r)).then_some(FindingKind::Orphan);
    };
    let current = p.run_id.map(|x| x.get()) == Some(run_id);
    let earlier = !current
        && p.retry
            .failed
            .iter()
            .any(|f| f["run_id"].as_u64() == Some(run_id));
    // Launched by runbridge for this promise (its callback token names the
    // promise's creation), for a settled promise that recorded no run.
    let token_own = p.run_id.is_none()
        && p.state.is_settled()
        && runbridge::audit::incarnation_of(r["params"]["callback_token"].as_str())
            == Some(p.created_on);
    if current || (!earlier && token_own) {
        let by = p.settled_by.as_deref().unwrap_or("");
        let cancelled_after = result == "CANCELED"
            && r["end_time"].as_i64().unwrap_or(0) >= p.completed_on.unwrap_or(i64::MAX);
        return match p.state {
            State::Pending if ended(r) && p.retry.next_at.is_none() && !p.retry.launching => {
                Some(FindingKind::Lost)
            }
            s if s.is_settled() && !ended(r) => Some(FindingKind::Orphan),
            State::Resolved
                if ended(r)
                    && by != "reconciler"
                    && !result.starts_with("SUCCESS")
                    && !cancelled_after =>
            {
                Some(FindingKind::Mismatch)
            }
            State::Rejected if ended(r) && by != "reconciler" && result.starts_with("SUCCESS") => {
                Some(FindingKind::Mismatch)
            }
            _ => None,
        };
    }
    if earlier {
        return (!ended(r)).then_some(FindingKind::Orphan);
    }
    match (p.state.is_settled(), p.run_id.is_some(), ended(r)) {
        (true, _, false) => Some(FindingKind::Orphan),
        (_, true, _) => Some(FindingKind::Duplicate),
        (true, false, true) => Some(FindingKind::Orphan),
        (false, false, _) => None,
    }
}

/// The checker's own reading of the end state, by kind: what the final
/// audit must agree with.
pub fn expected_counts(
    runs: &[Value],
    by_id: &HashMap<String, &Promise>,
) -> BTreeMap<FindingKind, usize> {
    let mut out: BTreeMap<FindingKind, usize> = FindingKind::ALL.iter().map(|k| (*k, 0)).collect();
    for k in runs.iter().filter_map(|r| read_run(r, by_id)) {
        *out.entry(k).or_default() += 1;
    }
    out
}

/// A finding the audit made during the run, of nothing planted, held
/// against the emulator's record of its run and the promise's record: an
/// orphan's run was still going when it was found, its promise settled
/// (or unknown) by then; a lost promise's run had ended `lost_after`
/// before and the promise was still pending; a duplicate or a mismatch is
/// still one at the end.
fn confirmed(v: &Value, runs: &HashMap<u64, &Value>, by_id: &HashMap<String, &Promise>) -> bool {
    let found =
        chrono::DateTime::parse_from_rfc3339(v["data"]["first_seen"].as_str().unwrap_or(""))
            .map(|t| t.timestamp_millis())
            .unwrap_or(0);
    let Some(r) = v["data"]["run"]["run_id"]
        .as_u64()
        .and_then(|id| runs.get(&id))
    else {
        return false;
    };
    let end = r["end_time"].as_i64().unwrap_or(0);
    let p = by_id.get(v["subject"].as_str().unwrap_or(""));
    match kind_of(v["data"]["kind"].as_str().unwrap_or("")) {
        Some(FindingKind::Orphan) => {
            let going = !ended(r) || end >= found;
            let settled_before = p.is_none_or(|p| p.completed_on.is_some_and(|c| c <= found));
            going && settled_before
        }
        Some(FindingKind::Lost) => {
            ended(r)
                && end <= found - LOST_AFTER_MS
                && p.is_some_and(|p| p.completed_on.is_none_or(|c| c >= found))
        }
        Some(k) => read_run(r, by_id) == Some(k),
        None => false,
    }
}

/// Everything about the audit that must hold; one message per violation,
/// and the report's rows.
pub async fn check(
    lab: &Lab,
    store: &RedisStore,
    plants: &Plants,
    planted: &Planted,
    runs: &[Value],
    by_id: &HashMap<String, &Promise>,
    since: i64,
) -> Result<(Vec<String>, Vec<(String, String)>)> {
    let mut violations: Vec<String> = planted.failures.clone();
    let planted_ids: HashSet<&String> = plants.ids().into_iter().collect();

    // The finding events of the whole run.
    let b = Broker::connect(&lab.bs).await?;
    let mut l = b.consume_queue(FINDINGS_QUEUE).await?;
    let mut first: HashMap<String, Value> = HashMap::new();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(3), l.next()).await {
        let v: Value = serde_json::from_slice(&ev.body).unwrap_or(Value::Null);
        first
            .entry(v["id"].as_str().unwrap_or("").to_owned())
            .or_insert(v);
    }
    b.close().await;
    let mut latencies: Vec<String> = Vec::new();
    for (kind, (visible, run)) in &planted.visible_at {
        let found = first.values().find(|v| {
            kind_of(v["data"]["kind"].as_str().unwrap_or("")) == Some(*kind)
                && v["data"]["run"]["run_id"].as_u64() == Some(*run)
        });
        match found {
            None => violations.push(format!("the planted {kind} (run {run}) was never found")),
            Some(v) => {
                let seen = chrono::DateTime::parse_from_rfc3339(
                    v["data"]["first_seen"].as_str().unwrap_or(""),
                )
                .map(|t| t.timestamp_millis())
                .unwrap_or(i64::MAX);
                // Reported, not asserted: it measures how the audit keeps
                // up under the faults (an interval, a lease hand-over after
                // a killed holder, an audit of the backlog since the last
                // one that finished), which a loaded machine stretches.
                let late = seen - visible;
                latencies.push(format!("{kind} {:.1}s", late as f64 / 1000.0));
            }
        }
    }
    for kind in FindingKind::ALL {
        if !planted.visible_at.contains_key(&kind) && planted.failures.is_empty() {
            violations.push(format!("no {kind} was planted"));
        }
    }
    let by_run: HashMap<u64, &Value> = runs
        .iter()
        .filter_map(|r| Some((r["run_id"].as_u64()?, r)))
        .collect();
    let (genuine, false_findings): (Vec<&Value>, Vec<&Value>) = first
        .values()
        .filter(|v| !planted_ids.contains(&v["subject"].as_str().unwrap_or("").to_owned()))
        .partition(|v| confirmed(v, &by_run, by_id));
    if !false_findings.is_empty() {
        violations.push(format!(
            "{} findings the emulator's record does not confirm: {:?}",
            false_findings.len(),
            false_findings
                .iter()
                .take(5)
                .map(|v| format!(
                    "{} ({})",
                    v["id"].as_str().unwrap_or(""),
                    v["data"]["reason"].as_str().unwrap_or("")
                ))
                .collect::<Vec<_>>()
        ));
    }
    let genuine_text: Vec<String> = genuine
        .iter()
        .take(5)
        .map(|v| v["data"]["reason"].as_str().unwrap_or("").to_owned())
        .collect();

    // One more audit, report-only, straight to the emulator, against the
    // checker's own counts.
    let settings = Settings::load_from(
        &runbridge_harness::config_dir(),
        "local",
        &[
            ("redis.key_prefix", "chaos".into()),
            (
                "databricks.workspaces.default.host",
                format!("http://127.0.0.1:{}", lab.emu_port),
            ),
            ("databricks.workspaces.default.token", "dapi-chaos".into()),
            ("databricks.poll_per_second", "0".into()),
        ],
    )?;
    let jobs = runbridge::startup::jobs_client(&settings, None)?;
    let mut audit_settings = runbridge::startup::audit_settings(&settings);
    // Everything has settled: nothing is "just now" any more.
    audit_settings.grace = Duration::ZERO;
    audit_settings.lost_after = Duration::ZERO;
    audit_settings.max_pages = 100_000;
    let auditor = Auditor::new(store.clone(), jobs, audit_settings);
    let report = auditor.audit("default", since, Mode::ReportOnly).await?;
    let mut audited: BTreeMap<FindingKind, usize> =
        FindingKind::ALL.iter().map(|k| (*k, 0)).collect();
    for f in &report.findings {
        *audited.entry(f.kind).or_default() += 1;
    }
    let expected = expected_counts(runs, by_id);
    if audited != expected {
        violations.push(format!(
            "the final audit counts {audited:?}, the checker {expected:?}: {:?}",
            report
                .findings
                .iter()
                .map(|f| format!("{} {}", f.kind, f.reason))
                .collect::<Vec<_>>()
        ));
    }
    let rows = vec![
        (
            "audit: planted found (after visible)".to_string(),
            format!("{}/4 ({})", latencies.len(), latencies.join(", ")),
        ),
        (
            "audit: other findings confirmed by the record / not".to_string(),
            format!(
                "{} {genuine_text:?} / {}",
                genuine.len(),
                false_findings.len()
            ),
        ),
        (
            "audit at the end (runs read / calls) vs checker".to_string(),
            format!(
                "{} / {}: {audited:?} vs {expected:?}",
                report.runs_seen, report.calls
            ),
        ),
    ];
    Ok((violations, rows))
}
