//! What one run of the workspace says about its promise, as a pure
//! function ([`classify_run`]): the audit reads the runs and the promises,
//! this decides. Unit-tested case by case below.
//!
//! A run is the bridge's when it carries a promise id in its parameters
//! (the configured `databricks.param_promise_id`); the callback token
//! beside it names the incarnation of the id it was launched for (`v2.<created
//! ms>.<mac>`: the token is read for that number only, never kept).

use serde::Serialize;
use serde_json::Value;

use crate::databricks::RunInfo;
use crate::domain::{Promise, SettledBy, State};
use crate::reconciler::{RunOutcome, classify};

/// The four ways the workspace and the promises can disagree.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// An active run nobody waits for: its promise is settled, expired or
    /// unknown, or the run is not the promise's current attempt.
    Orphan,
    /// A run for a promise that already has its run (a second run for one
    /// attempt).
    Duplicate,
    /// A settled promise whose run ended otherwise.
    Mismatch,
    /// A pending promise whose run is gone, or ended long ago.
    Lost,
}

impl FindingKind {
    pub const ALL: [FindingKind; 4] = [
        FindingKind::Orphan,
        FindingKind::Duplicate,
        FindingKind::Mismatch,
        FindingKind::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::Orphan => "orphan",
            FindingKind::Duplicate => "duplicate",
            FindingKind::Mismatch => "mismatch",
            FindingKind::Lost => "lost",
        }
    }
}

impl std::fmt::Display for FindingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The run's side of a finding, as Databricks reported it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct RunSide {
    pub run_id: u64,
    pub job_id: Option<u64>,
    /// `JOB_RUN`, `WORKFLOW_RUN` or `SUBMIT_RUN`.
    pub run_type: Option<String>,
    /// `ACTIVE`, `QUEUED`, `ENDED`, or `GONE` (Databricks no longer has it).
    pub state: String,
    /// The result state of an ended run (`SUCCESS`, `FAILED`, ...).
    pub result: Option<String>,
    /// Epoch ms.
    pub start_time: i64,
    /// Epoch ms; 0 while the run goes on.
    pub end_time: i64,
    pub run_page_url: Option<String>,
}

impl RunSide {
    pub fn of(run: &RunInfo) -> Self {
        let (state, result) = match classify(run) {
            RunOutcome::Ended { result, .. } => ("ENDED", Some(result)),
            RunOutcome::Queued { .. } => ("QUEUED", None),
            RunOutcome::Running | RunOutcome::Unknown(_) => ("ACTIVE", None),
        };
        Self {
            run_id: run.run_id,
            job_id: run.job_id,
            run_type: run.run_type.clone(),
            state: state.into(),
            result,
            start_time: run.start_time,
            end_time: run.end_time,
            run_page_url: run.run_page_url.clone().filter(|u| !u.is_empty()),
        }
    }

    /// A run Databricks answered "does not exist" for.
    pub fn gone(run_id: u64) -> Self {
        Self {
            run_id,
            job_id: None,
            run_type: None,
            state: "GONE".into(),
            result: None,
            start_time: 0,
            end_time: 0,
            run_page_url: None,
        }
    }

    pub fn is_active(&self) -> bool {
        matches!(self.state.as_str(), "ACTIVE" | "QUEUED")
    }
}

/// The promise's side of a finding, as the store has it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct PromiseSide {
    pub id: String,
    pub state: String,
    pub settled_by: Option<String>,
    /// The run the promise follows now.
    pub run_id: Option<u64>,
    /// The attempt it is on (1 for the first).
    pub attempt: u32,
    /// Epoch ms.
    pub created_on: i64,
    pub completed_on: Option<i64>,
}

impl PromiseSide {
    pub fn of(p: &Promise) -> Self {
        Self {
            id: p.id.to_string(),
            state: p.state.to_string(),
            settled_by: p.settled_by.clone(),
            run_id: p.run_id.map(|r| r.get()),
            attempt: p.retry.attempt.max(1),
            created_on: p.created_on,
            completed_on: p.completed_on,
        }
    }
}

/// What the audit decided about one run, or one pending promise.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub kind: FindingKind,
    /// One sentence for people: what disagrees, with both sides.
    pub reason: String,
}

fn found(kind: FindingKind, reason: String) -> Option<Verdict> {
    Some(Verdict { kind, reason })
}

/// How long after a moment something is still "just now".
#[derive(Debug, Clone, Copy)]
pub struct Margins {
    /// Now, epoch ms.
    pub now: i64,
    /// A run started, or a promise settled, less than this ago is left
    /// alone: its run id may not be recorded yet, its cancel not sent yet.
    pub grace_ms: i64,
    /// A pending promise whose run ended more than this ago is lost (the
    /// reconciler checks a run at least every `reconciler.max_poll_ms`).
    pub lost_after_ms: i64,
}

impl Margins {
    fn since(&self, at: i64) -> i64 {
        self.now.saturating_sub(at)
    }
}

/// The creation time a callback token is bound to (`v2.<ms>.<mac>`);
/// `None` for an older token of the id alone, or none.
pub fn incarnation_of(token: Option<&str>) -> Option<i64> {
    let rest = token?.strip_prefix("v2.")?;
    let (ms, _) = rest.split_once('.')?;
    ms.parse().ok()
}

fn earlier_attempt(p: &Promise, run_id: u64) -> bool {
    p.retry
        .failed
        .iter()
        .any(|f| f.get("run_id").and_then(Value::as_u64) == Some(run_id))
}

/// A settled promise whose (current) run ended otherwise: resolved while
/// the run failed, or rejected by a callback, an operator or the worker
/// while it succeeded. The reconciler's own settlements read this very run,
/// and a run cancelled after its promise settled (an orphan's cancel) is
/// no disagreement.
fn mismatch(p: &Promise, run: &RunSide) -> Option<Verdict> {
    let result = run.result.as_deref()?;
    let by = p.settled_by.as_deref().unwrap_or("");
    if by == SettledBy::Reconciler.as_str() {
        return None;
    }
    let success = result.starts_with("SUCCESS");
    let cancelled_after =
        result == "CANCELED" && run.end_time >= p.completed_on.unwrap_or(i64::MAX);
    match p.state {
        State::Resolved if !success && !cancelled_after => found(
            FindingKind::Mismatch,
            format!(
                "the promise was resolved (by {by}) but its run {} ended {result}",
                run.run_id
            ),
        ),
        State::Rejected if success => found(
            FindingKind::Mismatch,
            format!(
                "the promise was rejected (by {by}) but its run {} ended {result}",
                run.run_id
            ),
        ),
        _ => None,
    }
}

/// Classifies one run that names `promise` (as found in the store: `None`
/// when there is no such promise) and, through its callback token, the
/// incarnation `created` of the id.
pub fn classify_run(
    m: &Margins,
    run: &RunSide,
    created: Option<i64>,
    promise: Option<&Promise>,
) -> Option<Verdict> {
    let active = run.is_active();
    let settled_long_ago = |p: &Promise| p.completed_on.is_some_and(|c| m.since(c) >= m.grace_ms);
    let young = m.since(run.start_time) < m.grace_ms;
    let Some(p) = promise else {
        return (active && !young).then(|| Verdict {
            kind: FindingKind::Orphan,
            reason: format!(
                "run {} is active and its promise is unknown (expired, deleted or never created)",
                run.run_id
            ),
        });
    };
    if let Some(c) = created
        && c != p.created_on
    {
        return (active && !young).then(|| Verdict {
            kind: FindingKind::Orphan,
            reason: format!(
                "run {} is active and was launched for an earlier promise of this id (created at {c}, the promise now was created at {})",
                run.run_id, p.created_on
            ),
        });
    }
    let current = p.run_id.map(|r| r.get()) == Some(run.run_id);
    // A repair keeps the run: the current run may be an earlier attempt's too.
    if !current && earlier_attempt(p, run.run_id) {
        return (active && !young).then(|| Verdict {
            kind: FindingKind::Orphan,
            reason: format!(
                "run {} is active and belongs to an earlier attempt (the promise is on attempt {})",
                run.run_id,
                p.retry.attempt.max(1)
            ),
        });
    }
    // A settled promise that recorded no run, and a run launched for this
    // very incarnation (its callback token says so): the promise's own
    // run, which called back before its id was recorded.
    let unrecorded_own =
        p.run_id.is_none() && p.state.is_settled() && created == Some(p.created_on);
    if unrecorded_own || current {
        if p.state.is_settled() {
            if active && settled_long_ago(p) {
                return found(
                    FindingKind::Orphan,
                    format!(
                        "run {} is active and its promise settled {} (by {}) {} s ago",
                        run.run_id,
                        p.state,
                        p.settled_by.as_deref().unwrap_or("?"),
                        m.since(p.completed_on.unwrap_or(m.now)) / 1000
                    ),
                );
            }
            return if active { None } else { mismatch(p, run) };
        }
        // Waiting for its next attempt (or launching it), a promise's run
        // has ended by design.
        let between_attempts = p.retry.next_at.is_some() || p.retry.launching;
        if run.state == "ENDED"
            && !between_attempts
            && run.end_time > 0
            && m.since(run.end_time) >= m.lost_after_ms
        {
            return found(
                FindingKind::Lost,
                format!(
                    "the promise is pending but its run {} ended {} {} s ago",
                    run.run_id,
                    run.result.as_deref().unwrap_or("?"),
                    m.since(run.end_time) / 1000
                ),
            );
        }
        return None;
    }
    // A run the promise does not know. Just started, its id may be on its
    // way to the store (a launch records it right after run-now answers).
    if young {
        return None;
    }
    match (p.state.is_settled(), p.run_id) {
        (true, _) if active => found(
            FindingKind::Orphan,
            format!(
                "run {} is active and is not its promise's run; the promise settled {}",
                run.run_id, p.state
            ),
        ),
        (_, Some(r)) => found(
            FindingKind::Duplicate,
            format!(
                "run {} is a second run for the promise, whose run is {r}{}",
                run.run_id,
                if active { "" } else { " (it has ended)" }
            ),
        ),
        (true, None) => found(
            FindingKind::Orphan,
            format!(
                "run {} ran for a promise that settled {} without a run",
                run.run_id, p.state
            ),
        ),
        // Pending, launched and not recorded yet: the trigger's redelivery
        // launches with the same token and records this run.
        (false, None) => None,
    }
}

/// A pending promise's recorded run that Databricks no longer has.
pub fn gone(run_id: u64) -> Verdict {
    Verdict {
        kind: FindingKind::Lost,
        reason: format!(
            "the promise is pending but its run {run_id} no longer exists in Databricks"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::RunId;

    const NOW: i64 = 10_000_000;
    const M: Margins = Margins {
        now: NOW,
        grace_ms: 60_000,
        lost_after_ms: 600_000,
    };

    fn promise(state: State, run: Option<u64>) -> Promise {
        let fields = [("id", "p1"), ("state", "PENDING")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let mut p = Promise::from_fields(&fields).unwrap();
        p.state = state;
        p.created_on = 1_000;
        p.run_id = run.map(|r| RunId::new(r).unwrap());
        if state.is_settled() {
            p.completed_on = Some(NOW - 120_000);
            p.settled_by = Some("callback".into());
        }
        p
    }

    fn run(id: u64, state: &str, result: Option<&str>, started_ago: i64) -> RunSide {
        RunSide {
            run_id: id,
            job_id: Some(1),
            run_type: Some("JOB_RUN".into()),
            state: state.into(),
            result: result.map(str::to_owned),
            start_time: NOW - started_ago,
            end_time: if state == "ENDED" { NOW - 1_000_000 } else { 0 },
            run_page_url: None,
        }
    }

    fn kind(v: Option<Verdict>) -> Option<FindingKind> {
        v.map(|v| v.kind)
    }

    #[test]
    fn an_active_run_of_a_settled_or_unknown_promise_is_an_orphan() {
        let r = run(7, "ACTIVE", None, 300_000);
        let settled = promise(State::Resolved, Some(7));
        assert_eq!(
            kind(classify_run(&M, &r, None, Some(&settled))),
            Some(FindingKind::Orphan)
        );
        assert_eq!(
            kind(classify_run(&M, &r, None, None)),
            Some(FindingKind::Orphan)
        );
        // Out of band, for a settled promise with another run.
        let other = promise(State::RejectedCanceled, Some(3));
        assert_eq!(
            kind(classify_run(&M, &r, None, Some(&other))),
            Some(FindingKind::Orphan)
        );
        // An earlier incarnation of the id.
        let pending = promise(State::Pending, Some(7));
        assert_eq!(
            kind(classify_run(&M, &r, Some(999), Some(&pending))),
            Some(FindingKind::Orphan)
        );
        assert_eq!(
            kind(classify_run(&M, &r, Some(1_000), Some(&pending))),
            None
        );
    }

    #[test]
    fn runs_and_settlements_within_the_grace_period_are_left_alone() {
        let young = run(7, "ACTIVE", None, 1_000);
        assert_eq!(classify_run(&M, &young, None, None), None);
        let mut just = promise(State::RejectedCanceled, Some(7));
        just.completed_on = Some(NOW - 1_000);
        let r = run(7, "ACTIVE", None, 300_000);
        assert_eq!(
            classify_run(&M, &r, None, Some(&just)),
            None,
            "its cancel may not be sent yet"
        );
        // Not recorded yet: a launch records its run right after run-now.
        let launching = promise(State::Pending, None);
        assert_eq!(classify_run(&M, &young, None, Some(&launching)), None);
        assert_eq!(
            classify_run(&M, &r, None, Some(&launching)),
            None,
            "a redelivery records it"
        );
    }

    #[test]
    fn a_second_run_for_a_promise_with_its_run_is_a_duplicate() {
        let p = promise(State::Pending, Some(3));
        let extra = run(7, "ACTIVE", None, 300_000);
        assert_eq!(
            kind(classify_run(&M, &extra, None, Some(&p))),
            Some(FindingKind::Duplicate)
        );
        let ended = run(7, "ENDED", Some("SUCCESS"), 3_000_000);
        let settled = promise(State::Resolved, Some(3));
        assert_eq!(
            kind(classify_run(&M, &ended, None, Some(&settled))),
            Some(FindingKind::Duplicate)
        );
        // The promise's own run is no duplicate of itself.
        let own = run(3, "ACTIVE", None, 300_000);
        assert_eq!(classify_run(&M, &own, None, Some(&p)), None);
    }

    #[test]
    fn an_earlier_attempts_active_run_is_an_orphan_and_its_ended_one_is_not() {
        let mut p = promise(State::Pending, Some(9));
        p.retry.attempt = 2;
        p.retry.failed = vec![serde_json::json!({"attempt": 1, "run_id": 7})];
        let r = run(7, "ACTIVE", None, 300_000);
        let v = classify_run(&M, &r, None, Some(&p)).unwrap();
        assert_eq!(v.kind, FindingKind::Orphan);
        assert!(v.reason.contains("attempt 2"), "{}", v.reason);
        let ended = run(7, "ENDED", Some("FAILED"), 3_000_000);
        assert_eq!(classify_run(&M, &ended, None, Some(&p)), None);
        // A repair's attempt goes on in the same run: it is the current one.
        p.run_id = Some(RunId::new(7).unwrap());
        assert_eq!(classify_run(&M, &r, None, Some(&p)), None);
    }

    #[test]
    fn a_settlement_the_run_contradicts_is_a_mismatch() {
        let failed = run(7, "ENDED", Some("FAILED"), 3_000_000);
        let resolved = promise(State::Resolved, Some(7));
        let v = classify_run(&M, &failed, None, Some(&resolved)).unwrap();
        assert_eq!(v.kind, FindingKind::Mismatch);
        assert!(
            v.reason.contains("resolved (by callback)") && v.reason.contains("FAILED"),
            "{}",
            v.reason
        );
        let ok = run(7, "ENDED", Some("SUCCESS"), 3_000_000);
        let mut rejected = promise(State::Rejected, Some(7));
        rejected.settled_by = Some("operator".into());
        assert_eq!(
            kind(classify_run(&M, &ok, None, Some(&rejected))),
            Some(FindingKind::Mismatch)
        );
        // Agreements, and the reconciler's own reading of the run.
        assert_eq!(classify_run(&M, &ok, None, Some(&resolved)), None);
        rejected.settled_by = Some("reconciler".into());
        assert_eq!(classify_run(&M, &ok, None, Some(&rejected)), None);
        let cancelled = promise(State::RejectedCanceled, Some(7));
        assert_eq!(classify_run(&M, &ok, None, Some(&cancelled)), None);
        // Cancelled after the promise resolved (an orphan's cancel).
        let mut late = run(7, "ENDED", Some("CANCELED"), 3_000_000);
        late.end_time = NOW - 10;
        assert_eq!(classify_run(&M, &late, None, Some(&resolved)), None);
    }

    #[test]
    fn a_pending_promise_whose_run_ended_long_ago_is_lost() {
        let mut p = promise(State::Pending, Some(7));
        let ended = run(7, "ENDED", Some("SUCCESS"), 3_000_000);
        assert_eq!(
            kind(classify_run(&M, &ended, None, Some(&p))),
            Some(FindingKind::Lost)
        );
        // Unless it waits for its next attempt.
        p.retry.next_at = Some(NOW + 600_000);
        assert_eq!(classify_run(&M, &ended, None, Some(&p)), None);
        p.retry.next_at = None;
        let mut recent = ended.clone();
        recent.end_time = NOW - 1_000;
        assert_eq!(
            classify_run(&M, &recent, None, Some(&p)),
            None,
            "the reconciler has it"
        );
    }

    #[test]
    fn a_settled_promises_unrecorded_run_with_its_token_is_its_own() {
        let mut p = promise(State::Resolved, None);
        p.created_on = 1_000;
        let ended = run(7, "ENDED", Some("SUCCESS"), 3_000_000);
        assert_eq!(
            classify_run(&M, &ended, Some(1_000), Some(&p)),
            None,
            "it called back"
        );
        let failed = run(7, "ENDED", Some("FAILED"), 3_000_000);
        assert_eq!(
            kind(classify_run(&M, &failed, Some(1_000), Some(&p))),
            Some(FindingKind::Mismatch)
        );
        // Without the token (started by hand), it is no run of the promise.
        assert_eq!(
            kind(classify_run(&M, &ended, None, Some(&p))),
            Some(FindingKind::Orphan)
        );
        // Still going after its promise was cancelled (the launch window).
        let mut cancelled = promise(State::RejectedCanceled, None);
        cancelled.created_on = 1_000;
        let active = run(7, "ACTIVE", None, 300_000);
        assert_eq!(
            kind(classify_run(&M, &active, Some(1_000), Some(&cancelled))),
            Some(FindingKind::Orphan)
        );
    }

    #[test]
    fn the_incarnation_is_read_from_a_bound_token_only() {
        assert_eq!(
            incarnation_of(Some("v2.1700000000123.abcDEF")),
            Some(1_700_000_000_123)
        );
        assert_eq!(incarnation_of(Some("v1.abcDEF")), None);
        assert_eq!(incarnation_of(Some("v2.x.abc")), None);
        assert_eq!(incarnation_of(None), None);
    }
}
