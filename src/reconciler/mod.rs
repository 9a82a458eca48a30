//! The reconciler (docs/contracts.md, the reconciler): callbacks are the accelerator, this is the
//! source of truth. Every tick, for every partition, it
//!
//! 1. **sweeps deadlines**: promises past their timeout or heartbeat deadline
//!    become `REJECTED_TIMEDOUT` (`expire.lua`), and with `cancel_on_timeout`
//!    their run is scheduled for cancellation in the same step;
//! 2. **checks runs**: pending promises with a run are looked up with
//!    `runs/get` on a backing-off schedule; a run that ended without a
//!    callback settles its promise (`settled_by: reconciler`), after a grace
//!    period that lets a late callback win;
//! 3. **cancels runs**: `runs/cancel`, retried until Databricks accepts it;
//! 4. **publishes held-back progress**: a `promise.progress` event whose
//!    interval is over (`progress_emit.lua`).
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
use crate::domain::ids::IdError;
use crate::domain::tags::{TagError, check_tags};
use crate::domain::{IdPattern, Payload, PromiseId, RunId, SettledBy, State};
use crate::partitions::Assignment;
use crate::shutdown::pause;
use crate::store::{
    Attempts, ExpireOutcome, Lifecycle, PendingCancel, PromiseStore, SearchQuery, Settle,
    SettleOutcome, StoreError,
};

mod verdict;
pub use verdict::{RunOutcome, Verdict, classify, verdict};

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
    pub progress_events: usize,
}

/// Why a run check did not finish; it comes back when its claim's lease
/// ends.
enum CheckError {
    /// The workspace refuses its credentials (already logged, once).
    Credentials,
    Other(String),
}

impl From<DatabricksError> for CheckError {
    fn from(e: DatabricksError) -> Self {
        match e {
            DatabricksError::Credentials { .. } => CheckError::Credentials,
            e => CheckError::Other(e.to_string()),
        }
    }
}

fn other(e: impl std::fmt::Display) -> CheckError {
    CheckError::Other(e.to_string())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl<S: PromiseStore + Lifecycle + Attempts, J: Jobs> Reconciler<S, J> {
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
            // Progress events held back by their interval, now due.
            r.progress_events += self.store.emit_due_progress(p, self.settings.batch).await?;
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
            // Logged once per outage by the client; the claim's lease brings
            // the check back.
            Err(CheckError::Credentials) => false,
            Err(CheckError::Other(e)) => {
                // The claim's lease brings it back; nothing else to do.
                tracing::warn!(promise.id = %id, error = %e, "run check failed; will retry");
                false
            }
        }
    }

    async fn reschedule(&self, id: &PromiseId, d: Duration) -> Result<(), CheckError> {
        self.store.reschedule_poll(id, d).await.map_err(other)
    }

    async fn try_check(&self, id: &PromiseId) -> Result<bool, CheckError> {
        let Some(p) = self.store.get(id).await.map_err(other)? else {
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
            Err(e) if e.is_unknown_run() => {
                // The run is gone (deleted, or older than Databricks keeps
                // runs): nothing will ever finish it.
                let value = json!({"reason": "run_not_found", "message": format!("run {run} does not exist in Databricks")});
                return self.settle(id, Verdict::Reject(value)).await;
            }
            Err(e) => return Err(e.into()),
        };
        // `run-now` answers only the run id: the run's page is recorded from
        // the first check, so later events carry it.
        if p.run_page_url.is_none()
            && let Some(url) = info.run_page_url.as_deref().filter(|u| !u.is_empty())
            && let Err(e) = self.store.record_run(id, run, Some(url)).await
        {
            tracing::debug!(promise.id = %id, error = %e, "run page url not recorded");
        }
        match classify(&info) {
            RunOutcome::Running => {
                self.reschedule(id, self.next_check(p.created_on, p.timeout))
                    .await?;
                Ok(false)
            }
            RunOutcome::Queued { reason } => {
                // A queued run has not started, so it cannot heartbeat: its
                // heartbeat deadline starts when it runs. Until then each
                // check pushes it forward, and checks come often enough to.
                let mut d = self.next_check(p.created_on, p.timeout);
                if let Some(hb) = p.heartbeat_seconds {
                    self.store.heartbeat(id, None).await.map_err(other)?;
                    d = d.min(Duration::from_millis(hb * 1000 / 2));
                }
                tracing::debug!(promise.id = %id, %reason, "run queued");
                self.reschedule(id, d).await?;
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
                self.reschedule(id, self.next_check(p.created_on, p.timeout))
                    .await?;
                Ok(false)
            }
            RunOutcome::Ended {
                result,
                message,
                details,
                end_time,
            } => {
                // A repaired run shows its previous ending until the repair
                // is under way: decide only once the repair this attempt
                // recorded is in its history.
                if let Some(repair) = p.retry.repair_id {
                    let h = self.jobs.get_run_history(&p.workspace, run).await?;
                    if !h.repair_history.iter().any(|r| r.id == Some(repair)) {
                        self.reschedule(id, self.settings.first_poll.min(Duration::from_secs(5)))
                            .await?;
                        return Ok(false);
                    }
                }
                let settle_at = end_time.max(1) + ms(self.settings.grace);
                let now = now_ms();
                if now < settle_at {
                    // Let a late callback win the race.
                    let d = Duration::from_millis(u64::try_from(settle_at - now).unwrap_or(0));
                    self.reschedule(id, d).await?;
                    return Ok(false);
                }
                let output = if result.starts_with("SUCCESS") {
                    self.output(&p.workspace, run, &info).await?
                } else {
                    None
                };
                let v = verdict(&self.settings, &result, &message, &details, output);
                if let Verdict::Reject(failure) = &v {
                    // The policy may give the promise another attempt.
                    let code = details.get("code").and_then(Value::as_str).unwrap_or("");
                    if crate::retry::fail_or_retry(&self.store, &p, &[&result, code], failure)
                        .await
                        .map_err(other)?
                    {
                        return Ok(false);
                    }
                }
                self.settle(id, v).await
            }
        }
    }

    /// The exit value that counts, read from each task's latest attempt
    /// (earlier attempts of a retried or repaired task are listed too):
    /// the configured task's, else the only task's, else every task's as a
    /// `{task_key: value}` JSON object (a multi-task parent has no output
    /// of its own: Databricks refuses `get-output` for it).
    async fn output(
        &self,
        workspace: &str,
        run: RunId,
        info: &RunInfo,
    ) -> Result<Option<String>, CheckError> {
        let task_run = |t: &crate::databricks::TaskRun| RunId::new(t.run_id).ok();
        let tasks = info.latest_tasks();
        if let Some(key) = &self.settings.output_task_key {
            return match tasks.iter().find(|t| &t.task_key == key) {
                Some(t) => {
                    self.task_output(workspace, task_run(t).unwrap_or(run))
                        .await
                }
                None if tasks.len() <= 1 => {
                    let only = tasks.first().and_then(|t| task_run(t)).unwrap_or(run);
                    self.task_output(workspace, only).await
                }
                None => {
                    tracing::warn!(run_id = run.get(), task_key = %key, "reconciler.output_task_key names no task of this run; no exit value");
                    Ok(None)
                }
            };
        }
        match tasks.as_slice() {
            [] => self.task_output(workspace, run).await,
            [only] => {
                self.task_output(workspace, task_run(only).unwrap_or(run))
                    .await
            }
            tasks => {
                let mut values = serde_json::Map::new();
                for t in tasks {
                    let v = match task_run(t) {
                        Some(r) => self.task_output(workspace, r).await?,
                        None => None,
                    };
                    values.insert(
                        t.task_key.clone(),
                        v.map(Value::String).unwrap_or(Value::Null),
                    );
                }
                if values.values().all(Value::is_null) {
                    return Ok(None);
                }
                Ok(Some(Value::Object(values).to_string()))
            }
        }
    }

    async fn task_output(&self, workspace: &str, run: RunId) -> Result<Option<String>, CheckError> {
        match self.jobs.get_output(workspace, run).await {
            Ok(v) => Ok(v),
            Err(e) if e.is_unknown_run() => Ok(None),
            // Refused for good (a permission, a task kind without output):
            // asking again at every check would only hold the promise
            // until its timeout. The run's verdict stands without a value.
            Err(e @ DatabricksError::Permanent { .. }) => {
                tracing::warn!(run_id = run.get(), error = %e, "the run's output was refused; settling without an exit value");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn settle(&self, id: &PromiseId, v: Verdict) -> Result<bool, CheckError> {
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
            capability: None,
        };
        match self.store.settle(&req).await.map_err(other)? {
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
            Err(e) if e.is_unknown_run() => {
                tracing::info!(run_id = c.run.get(), workspace = %c.workspace, "run to cancel no longer exists; nothing to cancel");
                let _ = self.store.cancel_done(c).await;
                false
            }
            Err(DatabricksError::Permanent { status, body, .. }) => {
                // A refusal (no permission on the run): retrying will not help.
                tracing::error!(run_id = c.run.get(), status, error_code = %body.error_code, message = %body.message, "runs/cancel refused; giving up on this run");
                let _ = self.store.cancel_done(c).await;
                false
            }
            Err(e) => {
                // Credentials refusals were logged by the client, once.
                if !matches!(e, DatabricksError::Credentials { .. }) {
                    tracing::warn!(run_id = c.run.get(), error = %e, "runs/cancel failed; retrying later");
                }
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
    pub id: Option<IdPattern>,
    pub tags: std::collections::BTreeMap<String, String>,
    pub job_id: Option<u64>,
}

/// Why a cancel filter was refused; the message states the rule.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error(transparent)]
    Id(#[from] IdError),
    #[error(transparent)]
    Tags(#[from] TagError),
}

impl CancelFilter {
    /// The filter a caller sent (the control queue, the HTTP API, the
    /// CLI): the id read as an id filter, the tags held to their limits.
    /// Whether it names anything is [`CancelFilter::is_empty`], which each
    /// caller answers in its own words.
    pub fn new(
        id: Option<&str>,
        tags: std::collections::BTreeMap<String, String>,
        job_id: Option<u64>,
    ) -> Result<Self, FilterError> {
        check_tags(&tags)?;
        Ok(Self {
            id: id.map(IdPattern::parse).transpose()?,
            tags,
            job_id,
        })
    }

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
    description = "cancel: every pending promise that matches an id (with * wildcards), tags, a job id, or several (all must match); needs at least one of them. retry: start the next attempt of the promise `id` (no wildcards) now, if it waits for one.",
    extend("anyOf" = [
        {"properties": {"action": {"const": "cancel"}}, "anyOf": [
            {"required": ["id"], "properties": {"id": {"type": "string"}}},
            {"required": ["tags"], "properties": {"tags": {"minProperties": 1}}},
            {"required": ["job_id"], "properties": {"job_id": {"type": "integer"}}}
        ]},
        {"properties": {"action": {"const": "retry"}, "id": {"type": "string", "pattern": "^[A-Za-z0-9._:/-]+$"}},
         "required": ["id"],
         "not": {"anyOf": [{"required": ["tags"]}, {"required": ["job_id"]}, {"required": ["reason"]}]}}
    ])
)]
pub struct ControlMessage {
    /// "cancel" or "retry".
    #[schemars(extend("enum" = ["cancel", "retry"]))]
    action: String,
    /// A promise id or (cancel only) a pattern with * wildcards.
    #[serde(default)]
    #[schemars(length(min = 1, max = 200), regex(pattern = r"^[A-Za-z0-9._:/*-]+$"))]
    id: Option<String>,
    /// Tags every matching promise has (cancel).
    #[serde(default)]
    tags: std::collections::BTreeMap<String, String>,
    /// The Databricks job the promises run (cancel).
    #[serde(default)]
    job_id: Option<u64>,
    /// Recorded as the promises' rejection (cancel).
    #[serde(default)]
    reason: Option<String>,
}

/// What a control message asks.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlCommand {
    /// Cancel what matches, with this reason.
    Cancel(CancelFilter, String),
    /// Start this promise's next attempt now.
    Retry(PromiseId),
}

/// Parses a control-queue message; the error says why it was refused.
pub fn parse_control(body: &[u8]) -> Result<ControlCommand, String> {
    let m: ControlMessage =
        serde_json::from_slice(body).map_err(|e| format!("not a control message: {e}"))?;
    match m.action.as_str() {
        "cancel" => {}
        "retry" => {
            if !m.tags.is_empty() || m.job_id.is_some() || m.reason.is_some() {
                return Err("retry takes only an id".into());
            }
            let id = m.id.ok_or("retry needs the promise's id")?;
            if id.contains('*') {
                return Err("retry takes one promise id, not a pattern".into());
            }
            return PromiseId::parse(&id)
                .map(ControlCommand::Retry)
                .map_err(|e| e.to_string());
        }
        other => {
            return Err(format!(
                "unknown action {other:?}: the actions are \"cancel\" and \"retry\""
            ));
        }
    }
    let f = CancelFilter::new(m.id.as_deref(), m.tags, m.job_id).map_err(|e| e.to_string())?;
    if f.is_empty() {
        return Err("cancel needs id, tags or job_id".into());
    }
    Ok(ControlCommand::Cancel(
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
    match f.id.as_ref().and_then(IdPattern::exact) {
        Some(id) if f.tags.is_empty() && f.job_id.is_none() => {
            if store.get(&id).await?.is_some_and(|p| !p.state.is_settled()) {
                targets.push(id);
            }
        }
        _ => {
            let mut q = SearchQuery {
                id: f.id.clone().unwrap_or_default(),
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
            capability: None,
        };
        if let SettleOutcome::Settled(_) = store.settle(&req).await? {
            report.cancelled += 1;
        }
    }
    Ok(report)
}

/// Hostile control messages: any bytes get an answer, no panic.
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
            if let Ok(ControlCommand::Cancel(filter, _)) = parse_control(&serde_json::to_vec(&v).unwrap()) {
                // Accepted filters always name something: never "cancel all".
                prop_assert!(!filter.is_empty());
            }
        }
    }
}
