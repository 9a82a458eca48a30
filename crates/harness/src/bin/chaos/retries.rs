//! What must hold for triggers with a retry policy and for chatty
//! notebooks, checked from the final records, the emulator's runs and the
//! consumer's events (not with runbridge's own retry code):
//! - a flaky job's promise ends as its policy says (resolved on the third
//!   attempt with three, rejected when two are exhausted), with every
//!   attempt recorded; `rerun` made exactly one run per attempt, `repair`
//!   one run with a repair per later attempt;
//! - no progress event is seen for the first time after its promise's
//!   completion event, and a chatty notebook's updates were coalesced.

use std::collections::{HashMap, HashSet};

use runbridge::domain::{Promise, State};
use serde_json::Value;

use crate::workload::{FLAKY_FAILS, RetryPlan};

/// `sidecar.progress_interval_ms` in the chaos run (the default).
const INTERVAL_MS: i64 = 1000;

/// The most progress events a chatty run may give over `span_ms` between
/// its first and last update carried: an event after the first goes out
/// at least an interval after the one before it and carries an update
/// that arrived after that one went out, so the updates of every other
/// event are more than an interval apart.
fn most_allowed(span_ms: i64) -> usize {
    2 * usize::try_from(span_ms / INTERVAL_MS).unwrap_or(0) + 3
}

/// One message per violation, naming the promise.
pub fn check_retries(
    plans: &HashMap<String, RetryPlan>,
    promises: &HashMap<String, &Promise>,
    runs: &[Value],
) -> Vec<String> {
    let mut runs_of: HashMap<&str, Vec<&Value>> = HashMap::new();
    for r in runs {
        if let Some(id) = r["params"]["promise_id"].as_str() {
            runs_of.entry(id).or_default().push(r);
        }
    }
    let mut out = Vec::new();
    for (id, plan) in plans {
        let Some(p) = promises.get(id) else { continue };
        let want = if plan.max_attempts > FLAKY_FAILS {
            State::Resolved
        } else {
            State::Rejected
        };
        if p.state != want {
            out.push(format!(
                "{id}: {} after {} attempts ({}), expected {want}",
                p.state, plan.max_attempts, plan.mode
            ));
        }
        let attempts = p.attempts().len();
        if attempts != plan.max_attempts as usize {
            out.push(format!(
                "{id}: {attempts} attempts recorded, expected {}",
                plan.max_attempts
            ));
        }
        let runs = runs_of.get(id.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        match plan.mode {
            "rerun" if runs.len() != plan.max_attempts as usize => out.push(format!(
                "{id}: {} runs for {} rerun attempts",
                runs.len(),
                plan.max_attempts
            )),
            "repair" => {
                let repairs = runs
                    .first()
                    .and_then(|r| r["repairs"].as_array())
                    .map_or(0, Vec::len);
                if runs.len() != 1 || repairs + 1 != plan.max_attempts as usize {
                    out.push(format!(
                        "{id}: {} runs and {repairs} repairs for {} repair attempts",
                        runs.len(),
                        plan.max_attempts
                    ));
                }
            }
            _ => {}
        }
    }
    out
}

/// The promise an event id belongs to, and whether it is a progress event.
fn promise_of(event_id: &str) -> (&str, bool) {
    match event_id.rfind("/progress/") {
        Some(i) => (&event_id[..i], true),
        None => (
            event_id.rsplit_once('/').map_or(event_id, |(p, _)| p),
            false,
        ),
    }
}

/// Checks the order of first sightings in `order` (event ids as the
/// consumer received them) and each chatty promise's count against the
/// span of its updates (`bodies`: each event id's body); returns the
/// violations and the most progress events one chatty promise had.
pub fn check_progress(
    chatty: &HashSet<String>,
    order: &[String],
    bodies: &HashMap<String, Vec<Vec<u8>>>,
) -> (Vec<String>, usize) {
    let mut seen: HashSet<&str> = HashSet::new();
    let mut completed: HashSet<&str> = HashSet::new();
    let mut per_promise: HashMap<&str, usize> = HashMap::new();
    let mut span: HashMap<&str, (i64, i64)> = HashMap::new();
    let mut late = Vec::new();
    for id in order {
        if !seen.insert(id.as_str()) {
            continue; // a duplicate of one seen before
        }
        let (promise, progress) = promise_of(id);
        if !progress {
            completed.insert(promise);
        } else {
            *per_promise.entry(promise).or_default() += 1;
            let at = bodies
                .get(id)
                .and_then(|b| b.first())
                .and_then(|b| serde_json::from_slice::<Value>(b).ok())
                .and_then(|v| v["data"]["progress"]["at"].as_i64())
                .unwrap_or(0);
            let s = span.entry(promise).or_insert((at, at));
            *s = (s.0.min(at), s.1.max(at));
            if completed.contains(promise) {
                late.push(id.clone());
            }
        }
    }
    let mut out = Vec::new();
    if !late.is_empty() {
        out.push(format!(
            "{} progress events first seen after their promise's completion event: {:?}",
            late.len(),
            late.iter().take(5).collect::<Vec<_>>()
        ));
    }
    let mut most = 0;
    for id in chatty {
        let n = per_promise.get(id.as_str()).copied().unwrap_or(0);
        most = most.max(n);
        let (first, last) = span.get(id.as_str()).copied().unwrap_or((0, 0));
        if n > most_allowed(last - first) {
            out.push(format!(
                "{id}: {n} progress events over {} ms of updates (coalescing allows {})",
                last - first,
                most_allowed(last - first)
            ));
        }
    }
    (out, most)
}
