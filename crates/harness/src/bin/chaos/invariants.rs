//! What must hold after any run, whatever the faults: every valid trigger
//! launched exactly one Databricks run (one per idempotency token) and
//! settled its promise; every settlement reached the independent consumer as
//! an event (duplicates only with the same event id and body); exactly the
//! malformed triggers were dead-lettered; every parent settled once and
//! consistently with its children ([`crate::families`]); no run of a settled
//! promise is still going; no process panicked or ended other than by our
//! hand, a crash point, or a clean exit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Result;
use runbridge::broker::Broker;
use runbridge::store::{PromiseStore, RedisStore, SearchQuery};
use runbridge_testkit::rabbitmqctl;
use serde_json::Value;

use crate::families;
use crate::lab::Lab;
use crate::retries;
use crate::supervisor::Proc;
use crate::workload::{ParentPlan, RetryPlan};

/// What the run did, as the check needs it.
#[derive(Clone, Copy)]
pub struct Run<'a> {
    pub seed: u64,
    /// Triggers the run meant to publish.
    pub wanted: usize,
    pub published: usize,
    pub valid_ids: &'a HashSet<String>,
    pub malformed_ids: &'a HashSet<String>,
    pub parents: &'a [ParentPlan],
    pub retrying: &'a HashMap<String, RetryPlan>,
    pub chatty: &'a HashSet<String>,
    pub emu_port: u16,
    pub procs: &'a [Proc],
    pub faults: &'a BTreeMap<String, usize>,
    pub rss: &'a str,
    /// The disagreements planted for the audit to find, and when.
    pub plants: &'a crate::audit::Plants,
    pub planted: &'a crate::audit::Planted,
    /// When the run began (ms): the final audit lists from there.
    pub started_ms: i64,
}

/// The emulator's record of every run.
async fn emulator_runs(emu_port: u16) -> Result<Vec<Value>> {
    let runs: Value = reqwest::get(format!("http://127.0.0.1:{emu_port}/emulator/runs"))
        .await?
        .json()
        .await?;
    Ok(runs["runs"].as_array().cloned().unwrap_or_default())
}

/// The quiet period: waits until every expected promise (`valid`) is
/// settled, the trigger queue drained and no run is still going (a
/// cancelled child's run ends when its cancel lands), for as long as
/// promises keep settling: it gives up after `limit` without one more
/// settled (a stuck run), or five times `limit` in all. A parent with a
/// small `max_concurrency` created late settles its children a few at a
/// time, slowly under the crash points that keep firing. Then up to 30 s
/// for the relays to publish the last settlements.
pub async fn wait_quiet(lab: &Lab, store: &RedisStore, valid: usize, limit: Duration) {
    let start = Instant::now();
    let mut last_progress = Instant::now();
    let mut best = 0usize;
    while last_progress.elapsed() < limit && start.elapsed() < limit * 5 {
        let promises = all_promises(store).await.unwrap_or_default();
        let settled = promises.iter().filter(|p| p.state.is_settled()).count();
        if settled > best {
            best = settled;
            last_progress = Instant::now();
        }
        // Quiet means settled *and* the trigger queue drained: a re-published
        // copy or a redelivery after a crash may still be on its way to a
        // worker (which acks it as a duplicate). A copy that never drains is
        // still reported by the check.
        if promises.len() == valid
            && settled == promises.len()
            && queue_depth(lab.ctl_node(), &lab.vhost, &lab.bs.triggers_queue).unwrap_or(1) == 0
            && emulator_runs(lab.emu_port)
                .await
                .map(|r| families::active_runs(&r).is_empty())
                .unwrap_or(false)
        {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!("[chaos] quiet after {:.0}s", start.elapsed().as_secs_f64());
    let outbox_deadline = Instant::now() + Duration::from_secs(30);
    while store.outbox_len().await.unwrap_or(1) > 0 && Instant::now() < outbox_deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Over the second half of the run, for the worker process that lived
/// longest in it: RSS at its first and last sample there, and the change.
pub fn rss_report(samples: &[(f64, u32, u64)]) -> String {
    let Some(end) = samples.iter().map(|s| s.0).reduce(f64::max) else {
        return "no samples".into();
    };
    let half = end / 2.0;
    let mut by_pid: BTreeMap<u32, Vec<(f64, u64)>> = BTreeMap::new();
    for (t, pid, kb) in samples.iter().filter(|s| s.0 >= half) {
        by_pid.entry(*pid).or_default().push((*t, *kb));
    }
    let Some((pid, s)) = by_pid.iter().max_by(|a, b| {
        let span = |v: &Vec<(f64, u64)>| {
            v.last().map(|l| l.0).unwrap_or(0.0) - v.first().map(|f| f.0).unwrap_or(0.0)
        };
        span(a.1).total_cmp(&span(b.1))
    }) else {
        return "no samples".into();
    };
    let (first, last) = (s[0], s[s.len() - 1]);
    let peak = s.iter().map(|x| x.1).max().unwrap_or(0);
    format!(
        "pid {pid}: {} KiB at {:.0}s, {} KiB at {:.0}s (peak {peak} KiB, change {:+.1} %)",
        first.1,
        first.0,
        last.1,
        last.0,
        (last.1 as f64 - first.1 as f64) * 100.0 / first.1.max(1) as f64
    )
}

/// Every promise of the run (its key prefix is the run's own).
pub async fn all_promises(store: &RedisStore) -> Result<Vec<runbridge::domain::Promise>> {
    let mut q = SearchQuery {
        id: runbridge::domain::IdPattern::any(),
        limit: 1000,
        ..Default::default()
    };
    let mut out = Vec::new();
    loop {
        let page = store.search(&q).await?;
        out.extend(page.promises);
        match page.cursor {
            Some(c) => q.cursor = Some(c),
            None => return Ok(out),
        }
    }
}

/// What is left in the trigger queue once every process has stopped (so
/// nothing is unacked): each message's id, how often it was delivered and
/// its promise's state, to tell a late duplicate from a lost trigger.
async fn leftover_triggers(bs: &runbridge::broker::BrokerSettings, store: &RedisStore) -> String {
    let Ok(b) = Broker::connect(bs).await else {
        return "(could not connect to inspect them)".into();
    };
    let mut out = Vec::new();
    if let Ok(mut l) = b.consume_queue(&bs.triggers_queue).await {
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(3), l.next()).await {
            let v: Value = serde_json::from_slice(&m.body).unwrap_or(Value::Null);
            let id = v["id"].as_str().unwrap_or("<no id>").to_owned();
            let state = match runbridge::domain::PromiseId::parse(&id) {
                Ok(pid) => match store.get(&pid).await {
                    Ok(Some(p)) => p.state.to_string(),
                    Ok(None) => "no promise".into(),
                    Err(e) => format!("store error {e}"),
                },
                Err(_) => "invalid id".into(),
            };
            out.push(format!(
                "{id} (delivery count {}, promise {state})",
                m.headers
                    .get("x-delivery-count")
                    .map(String::as_str)
                    .unwrap_or("0")
            ));
        }
    }
    b.close().await;
    out.join(", ")
}

/// Messages ready in a queue, by `rabbitmqctl`.
pub fn queue_depth(node: Option<&str>, vhost: &str, queue: &str) -> Result<u64> {
    let out = rabbitmqctl(
        node,
        &["list_queues", "-q", "-p", vhost, "name", "messages"],
    )?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            (it.next()? == queue)
                .then(|| it.next()?.parse().ok())
                .flatten()
        })
        .next()
        .unwrap_or(0))
}

/// Checks every invariant over what the run left behind, prints the
/// report table and each violation; returns how many invariants were violated.
pub async fn check(run: &Run<'_>, lab: &Lab, store: &RedisStore) -> Result<usize> {
    let Run {
        seed,
        wanted,
        published,
        valid_ids,
        malformed_ids,
        parents,
        retrying,
        chatty,
        emu_port,
        procs,
        faults,
        rss,
        plants,
        planted,
        started_ms,
    } = *run;
    let (bs, node, vhost) = (&lab.bs, lab.ctl_node(), lab.vhost.as_str());
    let mut violations: Vec<String> = Vec::new();

    // Runs and idempotency tokens, from the emulator's record.
    let runs = emulator_runs(emu_port).await?;
    let mut per_token: HashMap<String, usize> = HashMap::new();
    let mut per_promise: HashMap<String, usize> = HashMap::new();
    for r in &runs {
        // Runs started by hand (the audit's plants) have no token.
        if let Some(t) = r["idempotency_token"].as_str() {
            *per_token.entry(t.to_owned()).or_default() += 1;
        }
        *per_promise
            .entry(r["params"]["promise_id"].as_str().unwrap_or("").to_owned())
            .or_default() += 1;
    }
    let max_per_token = per_token.values().copied().max().unwrap_or(0);
    // A rerun policy makes one run per attempt (checked in `retries`).
    let planted_ids: HashSet<&String> = plants.ids().into_iter().collect();
    let duplicate_runs = per_promise
        .iter()
        .filter(|(id, n)| **n > 1 && retrying.get(*id).is_none_or(|r| r.mode != "rerun"))
        .filter(|(id, _)| !planted_ids.contains(id))
        .count();
    if max_per_token > 1 {
        violations.push(format!("{max_per_token} runs for one idempotency token"));
    }
    if duplicate_runs > 0 {
        violations.push(format!("{duplicate_runs} promises with more than one run"));
    }
    let launched: HashSet<&String> = per_promise.keys().collect();
    let not_launched = valid_ids.iter().filter(|id| !launched.contains(id)).count();
    if not_launched > 0 {
        violations.push(format!(
            "{not_launched} valid triggers never launched a run"
        ));
    }

    // Final promise records.
    let promises = all_promises(store).await?;
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    for p in &promises {
        *by_state.entry(p.state.to_string()).or_default() += 1;
    }
    let pending = by_state.get("PENDING").copied().unwrap_or(0);
    if pending > 0 {
        violations.push(format!("{pending} promises left pending"));
    }
    let ids: HashSet<String> = promises.iter().map(|p| p.id.to_string()).collect();
    let missing = valid_ids.difference(&ids).count();
    if missing > 0 {
        violations.push(format!("{missing} valid triggers have no promise"));
    }
    let by_id: HashMap<String, &runbridge::domain::Promise> =
        promises.iter().map(|p| (p.id.to_string(), p)).collect();
    let family_violations = families::check(parents, &by_id, &per_promise);
    let inconsistent_parents = family_violations.len();
    violations.extend(family_violations.into_iter().take(20));
    if inconsistent_parents > 20 {
        violations.push(format!(
            "{} more inconsistent parents",
            inconsistent_parents - 20
        ));
    }
    let mut parents_by_state: BTreeMap<String, usize> = BTreeMap::new();
    for plan in parents {
        if let Some(p) = by_id.get(&plan.id) {
            *parents_by_state.entry(p.state.to_string()).or_default() += 1;
        }
    }
    let retry_violations = retries::check_retries(retrying, &by_id, &runs);
    let wrong_retries = retry_violations.len();
    violations.extend(retry_violations.into_iter().take(20));
    let mut retries_by_state: BTreeMap<String, usize> = BTreeMap::new();
    for id in retrying.keys() {
        if let Some(p) = by_id.get(id) {
            *retries_by_state.entry(p.state.to_string()).or_default() += 1;
        }
    }
    let cancelled_children = promises
        .iter()
        .filter(|p| p.parent.is_some() && p.settled_by.as_deref() == Some("parent"))
        .count();
    let still_running: Vec<String> = families::active_runs(&runs)
        .into_iter()
        .filter(|id| by_id.get(id).is_some_and(|p| p.state.is_settled()))
        .collect();
    if !still_running.is_empty() {
        violations.push(format!(
            "{} runs still going after their promise settled: {:?}",
            still_running.len(),
            still_running.iter().take(5).collect::<Vec<_>>()
        ));
    }

    // The audit: what it found during the run and at the end.
    let (audit_violations, audit_rows) = crate::audit::check(
        lab,
        store,
        plants,
        planted,
        &runs,
        &by_id,
        started_ms - 60_000,
    )
    .await?;
    violations.extend(audit_violations);

    // Every event the independent consumer received.
    let b = Broker::connect(bs).await?;
    let mut l = b.consume_queue("chaos.events").await?;
    let mut events: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut received = 0usize;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(5), l.next()).await {
        received += 1;
        let id = ev.message_id.unwrap_or_default();
        order.push(id.clone());
        events.entry(id).or_default().push(ev.body);
    }
    let (progress_violations, most_progress) = retries::check_progress(chatty, &order, &events);
    violations.extend(progress_violations);
    let progress_events = events.keys().filter(|k| k.contains("/progress/")).count();
    // The settlement checks below count completion events only.
    events.retain(|k, _| !k.contains("/progress/"));
    let triggers_left = queue_depth(node, vhost, &bs.triggers_queue)?;
    // Dead letters, by trigger id: exactly the malformed ones (a copy of one
    // re-published after a lost confirm counts once).
    let mut dl = b.consume_queue(&bs.dead_letter_queue).await?;
    let mut dead_ids: HashSet<String> = HashSet::new();
    let mut dead = 0usize;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(3), dl.next()).await {
        dead += 1;
        let v: Value = serde_json::from_slice(&ev.body).unwrap_or(Value::Null);
        dead_ids.insert(v["id"].as_str().unwrap_or("<no id>").to_owned());
    }
    b.close().await;
    let mut lost = 0usize;
    let mut wrong_state = 0usize;
    for p in promises.iter().filter(|p| p.state.is_settled()) {
        let want = format!("{}/{}", p.id, p.state);
        if !events.contains_key(&want) {
            lost += 1;
        }
        // Another event id for the same promise would mean a second settlement.
        for s in runbridge::domain::State::ALL {
            let other = format!("{}/{}", p.id, s);
            if s != p.state && events.contains_key(&other) {
                wrong_state += 1;
            }
        }
    }
    let differing = events
        .values()
        .filter(|bodies| bodies.iter().any(|b| b != &bodies[0]))
        .count();
    if lost > 0 {
        violations.push(format!("{lost} settlements without an event"));
    }
    if wrong_state > 0 {
        violations.push(format!(
            "{wrong_state} events for a state the promise did not end in (settled twice)"
        ));
    }
    if differing > 0 {
        violations.push(format!(
            "{differing} event ids delivered with different bodies"
        ));
    }
    let settled = promises.iter().filter(|p| p.state.is_settled()).count();
    if events.len() != settled {
        violations.push(format!(
            "{} distinct event ids for {settled} settled promises",
            events.len()
        ));
    }
    if triggers_left > 0 {
        violations.push(format!(
            "{triggers_left} triggers still in the queue: {}",
            leftover_triggers(bs, store).await
        ));
    }
    let wrongly_dead: Vec<&String> = dead_ids.difference(malformed_ids).collect();
    if !wrongly_dead.is_empty() {
        violations.push(format!(
            "{} valid triggers dead-lettered: {:?}",
            wrongly_dead.len(),
            wrongly_dead.iter().take(5).collect::<Vec<_>>()
        ));
    }
    let not_dead = malformed_ids.difference(&dead_ids).count();
    if not_dead > 0 {
        violations.push(format!("{not_dead} malformed triggers not dead-lettered"));
    }
    if published != wanted {
        violations.push(format!("published {published} of {wanted}"));
    }

    // Processes: killed by us, aborted at a failpoint, or a clean exit 1 at
    // start-up during an outage are expected; a panic never is.
    let mut panics = 0;
    for p in procs {
        let log = std::fs::read_to_string(&p.log).unwrap_or_default();
        let n = log.matches("panicked").count();
        if n > 0 {
            panics += n;
            violations.push(format!(
                "{} panicked {n} times (see {})",
                p.name,
                p.log.display()
            ));
        }
        for e in &p.exits {
            if !(e == "SIGKILL" || e == "SIGABRT" || e == "exit 1" || e == "final exit 0") {
                violations.push(format!("{} ended with {e}", p.name));
            }
        }
    }
    let restarts: usize = procs
        .iter()
        .map(|p| p.exits.iter().filter(|e| !e.starts_with("final")).count())
        .sum();
    let aborts: usize = procs
        .iter()
        .map(|p| p.exits.iter().filter(|e| *e == "SIGABRT").count())
        .sum();

    println!();
    println!("| chaos run (seed {seed}) | value |");
    println!("|---|---|");
    let rows: Vec<(String, String)> = vec![
        ("triggers published".into(), published.to_string()),
        (
            "  of which malformed (dead-lettered by design)".into(),
            malformed_ids.len().to_string(),
        ),
        (
            "distinct runs launched".into(),
            per_promise.len().to_string(),
        ),
        (
            "runs per idempotency token (max)".into(),
            max_per_token.to_string(),
        ),
        ("duplicate runs".into(), duplicate_runs.to_string()),
        ("promises settled by state".into(), format!("{by_state:?}")),
        (
            "parents (children each) by state".into(),
            format!(
                "{} ({}) {parents_by_state:?}",
                parents.len(),
                parents.first().map_or(0, |p| p.children)
            ),
        ),
        (
            "children cancelled by their parent".into(),
            cancelled_children.to_string(),
        ),
        (
            "retrying triggers by state / wrong".into(),
            format!("{} {retries_by_state:?} / {wrong_retries}", retrying.len()),
        ),
        (
            "chatty runs / progress events (most for one run)".into(),
            format!("{} / {progress_events} ({most_progress})", chatty.len()),
        ),
        (
            "inconsistent parents".into(),
            inconsistent_parents.to_string(),
        ),
        ("promises left pending".into(), pending.to_string()),
        ("events received".into(), received.to_string()),
        (
            "distinct completion event ids".into(),
            events.len().to_string(),
        ),
        ("events lost".into(), lost.to_string()),
        (
            "dead-lettered (messages / distinct triggers)".into(),
            format!("{dead} / {}", dead_ids.len()),
        ),
        ("faults injected".into(), format!("{faults:?}")),
        (
            "process exits (restarted) / failpoint aborts".into(),
            format!("{restarts} / {aborts}"),
        ),
        ("panics".into(), panics.to_string()),
        (
            "worker RSS, second half (longest-lived process)".into(),
            rss.to_string(),
        ),
    ];
    let rows: Vec<(String, String)> = rows
        .into_iter()
        .chain(audit_rows)
        .chain([("violations".into(), violations.len().to_string())])
        .collect();
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
    for v in &violations {
        println!("VIOLATION: {v}");
    }
    Ok(violations.len())
}
