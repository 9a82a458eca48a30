//! The reconciler (DESIGN.md §8): callbacks are the accelerator, this is the
//! source of truth. Every tick, for every partition, it
//!
//! 1. **sweeps deadlines**: promises past their timeout or heartbeat deadline
//!    become `REJECTED_TIMEDOUT` (`expire.lua`), and with `cancel_on_timeout`
//!    their run is scheduled for cancellation in the same step;
//! 2. **checks runs**: pending promises with a run are looked up with
//!    `runs/get` on a backing-off schedule; a run that ended without a
//!    callback settles its promise (`settled_by: reconciler`), after a grace
//!    period that lets a late callback win;
//! 3. **cancels runs**: `runs/cancel`, retried until Databricks accepts it.
//!
//! All three read only what is due (sorted sets scored by due time), so a
//! tick costs what is due, not what is pending. Claims lease their items, so
//! any number of workers can reconcile together.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::config::NoCallbackPolicy;
use crate::databricks::{DatabricksError, Jobs, RunInfo};
use crate::domain::{Payload, PromiseId, RunId, SettledBy, State};
use crate::partitions::Assignment;
use crate::store::{
    ExpireOutcome, Lifecycle, PendingCancel, PromiseStore, SearchQuery, Settle, SettleOutcome,
    StoreError,
};
use crate::worker::runner::pause;

#[derive(Debug, Clone)]
pub struct ReconcilerSettings {
    pub tick: Duration,
    pub batch: usize,
    pub lease: Duration,
    pub first_poll: Duration,
    pub max_poll: Duration,
    pub grace: Duration,
    pub success_without_output: NoCallbackPolicy,
    pub success_with_failures: NoCallbackPolicy,
    pub output_task_key: Option<String>,
    pub cancel_retry_max: Duration,
    pub concurrency: usize,
}

/// Where a run is, as far as the promise cares.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    /// Not finished (including Databricks' own retries, `WAITING_FOR_RETRY`).
    Running,
    /// Finished with this result state.
    Ended {
        result: String,
        message: String,
        details: Value,
        end_time: i64,
    },
    /// A lifecycle state this version does not know: treated as running.
    Unknown(String),
}

const RUNNING: &[&str] = &[
    "QUEUED",
    "PENDING",
    "RUNNING",
    "TERMINATING",
    "WAITING_FOR_RETRY",
    "BLOCKED",
    "WAITING",
];

/// Reads `runs/get` (pure; unit-tested).
pub fn classify(run: &RunInfo) -> RunOutcome {
    let life = run
        .state
        .as_ref()
        .and_then(|s| s.life_cycle_state.clone())
        .or_else(|| run.status.as_ref().and_then(|s| s.state.clone()))
        .unwrap_or_default();
    let message = run
        .state
        .as_ref()
        .and_then(|s| s.state_message.clone())
        .unwrap_or_default();
    let details = run
        .status
        .as_ref()
        .and_then(|s| s.termination_details.clone())
        .unwrap_or(Value::Null);
    let ended = |result: String| RunOutcome::Ended {
        result,
        message: message.clone(),
        details: details.clone(),
        end_time: run.end_time,
    };
    match life.as_str() {
        l if RUNNING.contains(&l) => RunOutcome::Running,
        "TERMINATED" => {
            let result = run
                .state
                .as_ref()
                .and_then(|s| s.result_state.clone())
                .or_else(|| {
                    details
                        .get("code")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .unwrap_or_else(|| "UNKNOWN".into());
            ended(result)
        }
        "SKIPPED" | "INTERNAL_ERROR" => ended(
            run.state
                .as_ref()
                .and_then(|s| s.result_state.clone())
                .unwrap_or_else(|| life.clone()),
        ),
        other => RunOutcome::Unknown(other.to_owned()),
    }
}

/// What a finished run means for its promise.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Resolve(Payload),
    Reject(Value),
}

fn policy(p: NoCallbackPolicy, result: &str) -> Verdict {
    match p {
        NoCallbackPolicy::ResolveNull => Verdict::Resolve(Payload::data("null")),
        NoCallbackPolicy::Reject => Verdict::Reject(json!({
            "reason": "completed_without_callback",
            "result_state": result,
            "message": "the run finished without calling back and without an exit value",
        })),
    }
}

/// Decides a finished run's promise (pure; unit-tested). `output` is the
/// notebook's exit value, asked for only on success.
pub fn verdict(
    s: &ReconcilerSettings,
    result: &str,
    message: &str,
    details: &Value,
    output: Option<String>,
) -> Verdict {
    match (result, output) {
        ("SUCCESS" | "SUCCESS_WITH_FAILURES", Some(v)) => Verdict::Resolve(Payload::data(v)),
        ("SUCCESS", None) => policy(s.success_without_output, result),
        ("SUCCESS_WITH_FAILURES", None) => policy(s.success_with_failures, result),
        _ => Verdict::Reject(json!({
            "reason": "run_failed",
            "result_state": result,
            "state_message": message,
            "termination_details": details,
        })),
    }
}

pub struct Reconciler<S, J> {
    pub store: S,
    pub jobs: J,
    pub settings: ReconcilerSettings,
    /// The partitions to sweep (this worker's share; all by default).
    assignment: Assignment,
    /// Unknown lifecycle states already logged (logged once each).
    unknown_logged: Mutex<HashSet<String>>,
}

/// What one tick did (for logs and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TickReport {
    pub due_read: usize,
    pub timed_out: usize,
    pub polled: usize,
    pub settled: usize,
    pub cancels_sent: usize,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl<S: PromiseStore + Lifecycle, J: Jobs> Reconciler<S, J> {
    pub fn new(store: S, jobs: J, settings: ReconcilerSettings) -> Self {
        let assignment = Assignment::all(store.partitions());
        Self {
            store,
            jobs,
            settings,
            assignment,
            unknown_logged: Mutex::new(HashSet::new()),
        }
    }

    /// Sweeps only the partitions `assignment` names (the ones this worker
    /// leases).
    pub fn with_assignment(mut self, assignment: Assignment) -> Self {
        self.assignment = assignment;
        self
    }

    /// One pass over the assigned partitions.
    pub async fn tick(&self) -> Result<TickReport, StoreError> {
        let mut r = TickReport::default();
        for p in self.assignment.current() {
            let due = self.store.due_deadlines(p, self.settings.batch).await?;
            r.due_read += due.len();
            for id in due {
                if let ExpireOutcome::TimedOut(promise) = self.store.expire(&id).await? {
                    tracing::info!(promise.id = %id, reason = %promise.value.data.as_deref().unwrap_or(""), "promise timed out");
                    r.timed_out += 1;
                }
            }
            let polls = self
                .store
                .claim_polls(p, self.settings.batch, self.settings.lease)
                .await?;
            r.polled += polls.len();
            let settled: Vec<bool> = stream::iter(polls)
                .map(|id| async move { self.check(&id).await })
                .buffer_unordered(self.settings.concurrency.max(1))
                .collect()
                .await;
            r.settled += settled.into_iter().filter(|s| *s).count();
            let cancels = self
                .store
                .claim_cancels(p, self.settings.batch, self.settings.lease)
                .await?;
            let sent: Vec<bool> = stream::iter(cancels)
                .map(|c| async move { self.cancel(&c).await })
                .buffer_unordered(self.settings.concurrency.max(1))
                .collect()
                .await;
            r.cancels_sent += sent.into_iter().filter(|s| *s).count();
        }
        Ok(r)
    }

    /// Next check: a quarter of the run's age so far, between the first delay
    /// and the cap, and never after the deadline (the sweep has that).
    fn next_check(&self, created_on: i64, deadline: i64) -> Duration {
        let now = now_ms();
        let age = (now - created_on).max(0) / 4;
        let delay = age.clamp(ms(self.settings.first_poll), ms(self.settings.max_poll));
        let delay = delay.min((deadline - now).max(0));
        Duration::from_millis(u64::try_from(delay).unwrap_or(0))
    }

    /// Checks one promise's run; true if it settled the promise.
    async fn check(&self, id: &PromiseId) -> bool {
        match self.try_check(id).await {
            Ok(settled) => settled,
            Err(e) => {
                // The claim's lease brings it back; nothing else to do.
                tracing::warn!(promise.id = %id, error = %e, "run check failed; will retry");
                false
            }
        }
    }

    async fn try_check(&self, id: &PromiseId) -> Result<bool, String> {
        let Some(p) = self.store.get(id).await.map_err(|e| e.to_string())? else {
            return Ok(false);
        };
        let Some(run) = p.run_id else {
            return Ok(false);
        };
        if p.state.is_settled() {
            return Ok(false);
        }
        let info = match self.jobs.get_run(&p.workspace, run).await {
            Ok(i) => i,
            Err(DatabricksError::Permanent { status: 404, .. }) => {
                // The run is gone (deleted): nothing will ever finish it.
                let value = json!({"reason": "run_not_found", "message": format!("run {run} does not exist in Databricks")});
                return self.settle(id, Verdict::Reject(value)).await;
            }
            Err(e) => return Err(e.to_string()),
        };
        match classify(&info) {
            RunOutcome::Running => {
                let d = self.next_check(p.created_on, p.timeout);
                self.store
                    .reschedule_poll(id, d)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(false)
            }
            RunOutcome::Unknown(state) => {
                let first = self
                    .unknown_logged
                    .lock()
                    .map(|mut s| s.insert(state.clone()))
                    .unwrap_or(false);
                if first {
                    tracing::warn!(life_cycle_state = %state, "unknown run lifecycle state; treating it as running");
                }
                let d = self.next_check(p.created_on, p.timeout);
                self.store
                    .reschedule_poll(id, d)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(false)
            }
            RunOutcome::Ended {
                result,
                message,
                details,
                end_time,
            } => {
                let settle_at = end_time.max(1) + ms(self.settings.grace);
                let now = now_ms();
                if now < settle_at {
                    // Let a late callback win the race.
                    let d = Duration::from_millis(u64::try_from(settle_at - now).unwrap_or(0));
                    self.store
                        .reschedule_poll(id, d)
                        .await
                        .map_err(|e| e.to_string())?;
                    return Ok(false);
                }
                let output = if result.starts_with("SUCCESS") {
                    let task_run = self.output_run(&info).unwrap_or(run);
                    self.jobs
                        .get_output(&p.workspace, task_run)
                        .await
                        .map_err(|e| e.to_string())?
                } else {
                    None
                };
                self.settle(
                    id,
                    verdict(&self.settings, &result, &message, &details, output),
                )
                .await
            }
        }
    }

    /// The run whose notebook output counts: the configured task, else the
    /// only task, else the run itself.
    fn output_run(&self, info: &RunInfo) -> Option<RunId> {
        let task = match &self.settings.output_task_key {
            Some(key) => info.tasks.iter().find(|t| &t.task_key == key),
            None if info.tasks.len() == 1 => info.tasks.first(),
            None => None,
        };
        task.and_then(|t| RunId::new(t.run_id).ok())
    }

    async fn settle(&self, id: &PromiseId, v: Verdict) -> Result<bool, String> {
        let (target, value) = match v {
            Verdict::Resolve(p) => (State::Resolved, p),
            Verdict::Reject(e) => (State::Rejected, Payload::data(e.to_string())),
        };
        let req = Settle {
            id: id.clone(),
            target,
            value,
            ikey: Some(format!("reconciler:{id}")),
            strict: false,
            settled_by: SettledBy::Reconciler,
            cancel_run: false,
        };
        match self.store.settle(&req).await.map_err(|e| e.to_string())? {
            SettleOutcome::Settled(p) | SettleOutcome::TimedOut(p) => {
                tracing::info!(promise.id = %id, state = %p.state, "settled from the run's final state");
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Sends one `runs/cancel`; true if Databricks accepted it.
    async fn cancel(&self, c: &PendingCancel) -> bool {
        match self.jobs.cancel_run(&c.workspace, c.run).await {
            Ok(()) => {
                tracing::info!(run_id = c.run.get(), workspace = %c.workspace, "run cancelled");
                if let Err(e) = self.store.cancel_done(c).await {
                    tracing::warn!(error = %e, "could not clear a done cancellation; it will be sent again (harmless)");
                }
                true
            }
            Err(DatabricksError::Permanent { status, body, .. }) => {
                // Unknown run or workspace refusal: retrying will not help.
                tracing::error!(run_id = c.run.get(), status, error_code = %body.error_code, message = %body.message, "runs/cancel refused; giving up on this run");
                let _ = self.store.cancel_done(c).await;
                false
            }
            Err(e) => {
                tracing::warn!(run_id = c.run.get(), error = %e, "runs/cancel failed; retrying later");
                let _ = self
                    .store
                    .reschedule_cancel(
                        c,
                        self.settings.cancel_retry_max.min(Duration::from_secs(5)),
                    )
                    .await;
                false
            }
        }
    }

    /// Runs ticks until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        tracing::info!(
            tick_ms = self.settings.tick.as_millis() as u64,
            "reconciler running"
        );
        while !shutdown.is_cancelled() {
            let r = self.tick().await;
            metrics::counter!(
                "runbridge_reconciler_ticks_total",
                "result" => if r.is_ok() { "ok" } else { "failed" }
            )
            .increment(1);
            match r {
                Ok(r) => {
                    metrics::counter!("runbridge_reconciler_timed_out_total")
                        .increment(r.timed_out as u64);
                    metrics::counter!("runbridge_reconciler_runs_checked_total")
                        .increment(r.polled as u64);
                    metrics::counter!("runbridge_reconciler_settled_total")
                        .increment(r.settled as u64);
                    metrics::counter!("runbridge_reconciler_cancels_sent_total")
                        .increment(r.cancels_sent as u64);
                    if r != TickReport::default() {
                        tracing::debug!(?r, "reconciler tick");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reconciler tick failed; retrying next tick"),
            }
            pause(self.settings.tick, &shutdown).await;
        }
        tracing::info!("reconciler stopped");
    }
}

/// What to cancel: one id, or every pending promise matching a filter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CancelFilter {
    pub id: Option<String>,
    pub tags: std::collections::BTreeMap<String, String>,
    pub job_id: Option<u64>,
}

impl CancelFilter {
    pub fn is_empty(&self) -> bool {
        self.id.is_none() && self.tags.is_empty() && self.job_id.is_none()
    }
}

/// A message on the control queue. Its JSON Schema (in the AsyncAPI
/// document, `runbridge schema control`) is derived from this struct.
#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "runbridge control message",
    description = "Cancel every pending promise that matches: an id (with * wildcards), tags, a job id, or several (all must match). Needs at least one of them.",
    extend("anyOf" = [
        {"required": ["id"], "properties": {"id": {"type": "string"}}},
        {"required": ["tags"], "properties": {"tags": {"minProperties": 1}}},
        {"required": ["job_id"], "properties": {"job_id": {"type": "integer"}}}
    ])
)]
pub struct ControlMessage {
    /// The only action is "cancel".
    #[schemars(extend("const" = "cancel"))]
    action: String,
    /// A promise id or a pattern with * wildcards.
    #[serde(default)]
    #[schemars(length(min = 1, max = 200), regex(pattern = r"^[A-Za-z0-9._:/*-]+$"))]
    id: Option<String>,
    /// Tags every matching promise has.
    #[serde(default)]
    tags: std::collections::BTreeMap<String, String>,
    /// The Databricks job the promises run.
    #[serde(default)]
    job_id: Option<u64>,
    /// Recorded as the promises' rejection.
    #[serde(default)]
    reason: Option<String>,
}

/// Is this a valid id filter: an id, or an id pattern with `*` wildcards?
pub fn valid_id_filter(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 200
        && id.chars().all(|c| {
            c == '*' || c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '-')
        })
}

/// Parses a control-queue message; the error says why it was refused.
pub fn parse_control(body: &[u8]) -> Result<(CancelFilter, String), String> {
    let m: ControlMessage =
        serde_json::from_slice(body).map_err(|e| format!("not a control message: {e}"))?;
    if m.action != "cancel" {
        return Err(format!(
            "unknown action {:?}: the only action is \"cancel\"",
            m.action
        ));
    }
    if m.id.as_deref().is_some_and(|id| !valid_id_filter(id)) {
        return Err("id may use [A-Za-z0-9._:/-] and * wildcards".into());
    }
    let f = CancelFilter {
        id: m.id,
        tags: m.tags,
        job_id: m.job_id,
    };
    if f.is_empty() {
        return Err("cancel needs id, tags or job_id".into());
    }
    Ok((
        f,
        m.reason
            .unwrap_or_else(|| "canceled through the control queue".into()),
    ))
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct CancelReport {
    /// Pending promises that matched.
    pub matched: usize,
    /// Of those, how many this request cancelled (others settled meanwhile).
    pub cancelled: usize,
}

/// Cancels every pending promise matching `f` (`REJECTED_CANCELED`, one event
/// each, run cancellation scheduled in the same step). An id without `*` is a
/// single promise; an unknown or settled one is simply not matched.
pub async fn cancel_matching<S: PromiseStore>(
    store: &S,
    f: &CancelFilter,
    reason: &str,
    by: SettledBy,
) -> Result<CancelReport, StoreError> {
    let value = Payload::data(json!({"reason": "canceled", "message": reason}).to_string());
    let mut report = CancelReport::default();
    let mut targets: Vec<PromiseId> = Vec::new();
    match &f.id {
        Some(id) if !id.contains('*') && f.tags.is_empty() && f.job_id.is_none() => {
            if let Ok(id) = PromiseId::parse(id)
                && store.get(&id).await?.is_some_and(|p| !p.state.is_settled())
            {
                targets.push(id);
            }
        }
        _ => {
            let mut q = SearchQuery {
                id: f.id.clone().unwrap_or_else(|| "*".into()),
                states: Some(vec![State::Pending]),
                tags: f.tags.clone(),
                job_id: f.job_id,
                limit: 1000,
                cursor: None,
                workspace: None,
            };
            loop {
                let page = store.search(&q).await?;
                targets.extend(page.promises.into_iter().map(|p| p.id));
                match page.cursor {
                    Some(c) => q.cursor = Some(c),
                    None => break,
                }
            }
        }
    }
    report.matched = targets.len();
    for id in targets {
        let req = Settle {
            id,
            target: State::RejectedCanceled,
            value: value.clone(),
            ikey: None,
            strict: true,
            settled_by: by,
            cancel_run: true,
        };
        if let SettleOutcome::Settled(_) = store.settle(&req).await? {
            report.cancelled += 1;
        }
    }
    Ok(report)
}

/// Hostile control messages (issue 9): any bytes get an answer, no panic.
#[cfg(test)]
mod hostile {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: crate::domain::hostile_cases(), failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn any_bytes_get_an_answer(body in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_control(&body);
        }

        #[test]
        fn control_shaped_json_gets_an_answer(
            action in prop_oneof![Just("cancel".to_string()), "\\PC{0,10}"],
            id in prop::option::of("\\PC{0,220}"),
            job_id in prop::option::of(any::<i64>()),
            tag in prop::option::of(("\\PC{0,20}", "\\PC{0,20}")),
        ) {
            let mut v = serde_json::json!({ "action": action });
            if let Some(id) = id { v["id"] = id.into(); }
            if let Some(j) = job_id { v["job_id"] = j.into(); }
            if let Some((k, val)) = tag { v["tags"] = serde_json::json!({ k: val }); }
            if let Ok((filter, _)) = parse_control(&serde_json::to_vec(&v).unwrap()) {
                // Accepted filters always name something: never "cancel all".
                prop_assert!(!filter.is_empty());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::databricks::{RunState, RunStatus};

    fn settings() -> ReconcilerSettings {
        ReconcilerSettings {
            tick: Duration::from_secs(1),
            batch: 10,
            lease: Duration::from_secs(30),
            first_poll: Duration::from_secs(30),
            max_poll: Duration::from_secs(600),
            grace: Duration::from_secs(30),
            success_without_output: NoCallbackPolicy::Reject,
            success_with_failures: NoCallbackPolicy::Reject,
            output_task_key: None,
            cancel_retry_max: Duration::from_secs(60),
            concurrency: 4,
        }
    }

    fn run(life: &str, result: Option<&str>) -> RunInfo {
        RunInfo {
            run_id: 1,
            state: Some(RunState {
                life_cycle_state: Some(life.into()),
                result_state: result.map(Into::into),
                state_message: Some("msg".into()),
            }),
            status: Some(RunStatus {
                state: None,
                termination_details: Some(json!({"code": "RUN_EXECUTION_ERROR"})),
            }),
            end_time: 5,
            ..Default::default()
        }
    }

    #[test]
    fn lifecycle_states_classify() {
        for l in [
            "QUEUED",
            "PENDING",
            "RUNNING",
            "TERMINATING",
            "WAITING_FOR_RETRY",
            "BLOCKED",
        ] {
            assert_eq!(classify(&run(l, None)), RunOutcome::Running, "{l}");
        }
        assert!(
            matches!(classify(&run("TERMINATED", Some("FAILED"))), RunOutcome::Ended { result, .. } if result == "FAILED")
        );
        assert!(
            matches!(classify(&run("INTERNAL_ERROR", None)), RunOutcome::Ended { result, .. } if result == "INTERNAL_ERROR")
        );
        assert!(
            matches!(classify(&run("SKIPPED", Some("SKIPPED"))), RunOutcome::Ended { result, .. } if result == "SKIPPED")
        );
        assert_eq!(
            classify(&run("TELEPORTING", None)),
            RunOutcome::Unknown("TELEPORTING".into())
        );
        // Only the newer `status` block present.
        let r = RunInfo {
            run_id: 1,
            status: Some(RunStatus {
                state: Some("TERMINATED".into()),
                termination_details: Some(json!({"code": "SUCCESS"})),
            }),
            ..Default::default()
        };
        assert!(matches!(classify(&r), RunOutcome::Ended { result, .. } if result == "SUCCESS"));
    }

    #[test]
    fn verdicts() {
        let s = settings();
        assert_eq!(
            verdict(&s, "SUCCESS", "", &Value::Null, Some("42".into())),
            Verdict::Resolve(Payload::data("42"))
        );
        assert!(
            matches!(verdict(&s, "SUCCESS", "", &Value::Null, None), Verdict::Reject(v) if v["reason"] == "completed_without_callback")
        );
        let mut s2 = settings();
        s2.success_without_output = NoCallbackPolicy::ResolveNull;
        assert_eq!(
            verdict(&s2, "SUCCESS", "", &Value::Null, None),
            Verdict::Resolve(Payload::data("null"))
        );
        match verdict(
            &s,
            "FAILED",
            "Workload failed",
            &json!({"code": "RUN_EXECUTION_ERROR"}),
            None,
        ) {
            Verdict::Reject(v) => {
                assert_eq!(v["state_message"], "Workload failed");
                assert_eq!(v["termination_details"]["code"], "RUN_EXECUTION_ERROR");
                assert_eq!(v["result_state"], "FAILED");
            }
            other => panic!("{other:?}"),
        }
        for r in [
            "TIMEDOUT",
            "CANCELED",
            "INTERNAL_ERROR",
            "SKIPPED",
            "UPSTREAM_FAILED",
            "UPSTREAM_CANCELED",
        ] {
            assert!(
                matches!(verdict(&s, r, "", &Value::Null, None), Verdict::Reject(_)),
                "{r}"
            );
        }
        assert!(matches!(
            verdict(&s, "SUCCESS_WITH_FAILURES", "", &Value::Null, None),
            Verdict::Reject(_)
        ));
    }
}
