//! The trigger worker: docs/contracts.md, handling a trigger, one delivery at a time, many at once.
//!
//! [`process`] is the unit of work: given a trigger's [`Envelope`] it runs
//! validate → create promise → launch → record run id, and returns a
//! [`Disposition`] saying what to do with the delivery. It sees only the
//! [`PromiseStore`] and [`Jobs`] traits, so tests call it directly.
//! Every step is safe to repeat: a redelivery after a crash anywhere finds the
//! promise, re-sends `run-now` with the same derived idempotency token (so
//! Databricks answers with the same run) and records the same run id.
//!
//! [`runner`] connects this to RabbitMQ: it consumes with a prefetch, runs
//! `process` concurrently for each delivery on a `TaskTracker`, and applies
//! the disposition (ack / requeue / dead-letter / reply-then-ack).

pub mod fanout;
pub mod launch;
pub mod retry;
pub mod runner;
mod schedule;

use serde_json::json;
use tracing::Instrument;
use tracing::field::Empty;
use url::Url;

use crate::databricks::{DatabricksError, Jobs, LaunchRequest};
use crate::domain::{
    CallbackSigner, CompletionEvent, Envelope, Launch, Payload, Promise, SettledBy, State, Trigger,
    TriggerError, TriggerRules, Work,
};
use crate::store::{
    CreateOutcome, Families, NewPromise, PromiseStore, RecordOutcome, Settle, StoreError, Timeout,
};
pub use launch::JobStyles;

use crate::domain::retry::RetryDefaults;

/// What to do with a delivery once [`process`] is done with it.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// The promise and its run id are recorded (or the promise is settled).
    Ack,
    /// A passing failure: put it back, after the configured pause.
    Requeue(String),
    /// The workspace refuses its credentials: keep the delivery and retry
    /// in place until they are accepted (never back to the queue, whose
    /// delivery limit would dead-letter it), however long the outage.
    Hold(String),
    /// Never retried: to the dead-letter queue with this reason.
    DeadLetter(Refusal, String),
    /// Already settled: send its stored outcome to the trigger's `reply_to`, then ack.
    ReplyThenAck(Box<CompletionEvent>),
}

/// What kind of refusal a dead letter is, decided where the cause is known
/// (the `reason` label of `runbridge_dead_lettered_total`; the message, which
/// names ids, goes in the `x-runbridge-error` header instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The body is not JSON.
    MalformedJson,
    /// JSON, but not a valid trigger.
    InvalidTrigger,
    UnknownWorkspace,
    /// A control-queue message that is not a valid command.
    InvalidControl,
    /// The stored record does not parse (not retryable).
    StoreError,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MalformedJson => "malformed_json",
            Refusal::InvalidTrigger => "invalid_trigger",
            Refusal::UnknownWorkspace => "unknown_workspace",
            Refusal::InvalidControl => "invalid_control",
            Refusal::StoreError => "store_error",
        }
    }
}

/// Names of the three parameters the run receives (docs/contracts.md, what a run receives).
#[derive(Debug, Clone)]
pub struct ParamNames {
    pub promise_id: String,
    pub url: String,
    pub callback_token: String,
}

impl Default for ParamNames {
    fn default() -> Self {
        Self {
            promise_id: "promise_id".into(),
            url: "url".into(),
            callback_token: "callback_token".into(),
        }
    }
}

/// Everything `process` needs; built once by `startup`.
#[derive(Clone)]
pub struct WorkerContext<S, J> {
    pub store: S,
    pub jobs: J,
    pub signer: CallbackSigner,
    pub rules: TriggerRules,
    /// The sidecar's public base URL, as notebooks reach it.
    pub public_url: Url,
    pub params: ParamNames,
    pub default_workspace: String,
    pub workspaces: Vec<String>,
    /// Each job's parameter style, learnt from `jobs/get`.
    pub job_styles: JobStyles,
    /// How long a fan-out step is leased (and how long after a parent's
    /// creation the schedule takes its first step, should the worker that
    /// created it not finish it).
    pub fanout_lease: std::time::Duration,
    /// Retry policies from the configuration (`[retry]`).
    pub retry_defaults: RetryDefaults,
}

fn store_failure(e: StoreError) -> Disposition {
    if e.is_retryable() {
        Disposition::Requeue(e.to_string())
    } else {
        Disposition::DeadLetter(Refusal::StoreError, e.to_string())
    }
}

impl<S: PromiseStore + Families, J: Jobs> WorkerContext<S, J> {
    /// `{public_url}/cb/{token}`: the capability URL handed to the run.
    pub fn callback_url(&self, token: &str) -> String {
        format!(
            "{}/cb/{token}",
            self.public_url.as_str().trim_end_matches('/')
        )
    }

    /// The launch, with the callback values where the job takes them.
    async fn launch_request(
        &self,
        t: &Trigger,
        run: &Launch,
        promise: &Promise,
    ) -> Result<LaunchRequest, DatabricksError> {
        let workspace = promise.workspace.as_str();
        let token = promise.callback_token(&self.signer);
        let extra = launch::callback_values(
            &self.params,
            t.id.as_str(),
            self.callback_url(token.expose()),
            token.expose(),
        );
        let style = match run {
            Launch::RunNow { job_id, .. } => {
                self.job_styles
                    .style(&self.jobs, workspace, *job_id)
                    .await?
            }
            Launch::Submit { .. } => None,
        };
        Ok(launch::launch_request(
            run,
            extra,
            style.as_ref(),
            &self.job_styles,
            workspace,
        ))
    }
}

pub(crate) fn new_promise(t: &Trigger, workspace: &str, defaults: &RetryDefaults) -> NewPromise {
    // A policy from the configuration applies where the trigger gives none
    // (a parent's own promise runs nothing and keeps none).
    let retry = match &t.work {
        Work::FanOut(_) => None,
        Work::Run(l) => t
            .retry
            .clone()
            .or_else(|| defaults.lookup(workspace, l.job_id())),
    };
    NewPromise {
        id: t.id.clone(),
        param: Payload::data(t.raw.clone()),
        timeout: Timeout::After(t.timeout),
        tags: t.tags.clone(),
        ikey_create: Some(t.id.to_string()),
        job_id: t.job_id(),
        workspace: workspace.to_owned(),
        reply_to: t.reply_to.clone(),
        correlation_id: t.correlation_id.clone(),
        traceparent: t.traceparent.clone(),
        heartbeat: t.heartbeat,
        cancel_on_timeout: t.cancel_on_timeout,
        parent: None,
        retry,
    }
}

/// A promise's trigger as it arrived (its `param.data`), read with the
/// limits it was accepted under (limits lowered since must not strand a
/// promise already running), in the trace the promise runs in.
pub(crate) fn stored_trigger(p: &Promise) -> Result<Trigger, TriggerError> {
    let env = Envelope {
        body: p.param.data.clone().unwrap_or_default().into_bytes(),
        message_id: Some(p.id.to_string()),
        ..Default::default()
    };
    let mut t = Trigger::parse(&env, &TriggerRules::accepted())?;
    // Checked again: a record written before the check existed may hold anything.
    t.traceparent = crate::telemetry::kept_traceparent(p.traceparent.clone());
    Ok(t)
}

/// What a promise records when Databricks refuses its launch (or the
/// launch of a later attempt) for good: its answer.
pub(crate) fn refusal(
    endpoint: &str,
    status: u16,
    body: &crate::databricks::ApiErrorBody,
) -> serde_json::Value {
    json!({
        "reason": "databricks_error",
        "endpoint": endpoint,
        "status": status,
        "error_code": body.error_code,
        "message": body.message,
    })
}

/// The stored outcome, addressed to this delivery's `reply_to`.
fn reply_for(p: &Promise, t: &Trigger) -> Disposition {
    let Some(reply_to) = &t.reply_to else {
        return Disposition::Ack;
    };
    match CompletionEvent::from_promise(p) {
        Ok(mut e) => {
            e.reply_to = Some(reply_to.clone());
            e.correlation_id = t.correlation_id.clone();
            Disposition::ReplyThenAck(Box::new(e))
        }
        Err(_) => Disposition::Ack,
    }
}

/// Handles one trigger (docs/contracts.md, handling a trigger). Never panics on input; every error
/// becomes a [`Disposition`] and is logged once, by the runner.
///
/// Its span (`process`, with `promise.id` and `databricks.run_id`) is a child
/// of the trigger's `traceparent` when there is one, so an exported trace
/// goes from the producer through this worker.
pub async fn process<S: PromiseStore + Families, J: Jobs>(
    ctx: &WorkerContext<S, J>,
    env: &Envelope,
) -> Disposition {
    let span = tracing::info_span!("process", promise.id = Empty, databricks.run_id = Empty);
    if let Some(tp) = &env.traceparent {
        crate::telemetry::continue_trace(&span, tp);
    }
    process_in_span(ctx, env).instrument(span).await
}

async fn process_in_span<S: PromiseStore + Families, J: Jobs>(
    ctx: &WorkerContext<S, J>,
    env: &Envelope,
) -> Disposition {
    // 1. Parse and validate.
    let t = match Trigger::parse(env, &ctx.rules) {
        Ok(t) => t,
        Err(e) => {
            let kind = match e {
                TriggerError::Json(_) => Refusal::MalformedJson,
                _ => Refusal::InvalidTrigger,
            };
            return Disposition::DeadLetter(kind, e.to_string());
        }
    };
    let span = tracing::Span::current();
    span.record("promise.id", t.id.as_str());
    let workspace = t
        .workspace
        .clone()
        .unwrap_or_else(|| ctx.default_workspace.clone());
    if !ctx.workspaces.contains(&workspace) {
        return Disposition::DeadLetter(
            Refusal::UnknownWorkspace,
            format!(
                "unknown workspace {workspace:?}: configured are {:?}",
                ctx.workspaces
            ),
        );
    }

    let run = match &t.work {
        Work::Run(run) => run,
        Work::FanOut(f) => return fanout::parent(ctx, &t, f, &workspace).await,
    };

    // 2. Create the promise (or find it).
    let promise = match ctx
        .store
        .create(&new_promise(&t, &workspace, &ctx.retry_defaults))
        .await
    {
        Ok(CreateOutcome::Created(p)) => p,
        Ok(CreateOutcome::Existing(p)) => {
            tracing::debug!(state = %p.state, "promise exists (redelivery or duplicate trigger)");
            p
        }
        Err(e) => return store_failure(e),
    };
    if promise.state.is_settled() {
        // Boxed: a launch's future is large, and this path is rare; kept
        // inline it grew every delivery's future past a thread's stack in
        // debug builds.
        Box::pin(record_called_back_run(ctx, &t, run, &promise)).await;
        launched("already_settled");
        return reply_for(&promise, &t);
    }
    launch_created(ctx, &t, run, &promise).await
}

/// A promise its run settled (by calling back) before the run's id was
/// recorded: the record failed (the store was away) and this redelivery,
/// or a fan-out step, finds the promise settled. The run exists, since it
/// called back, so `run-now` with the promise's token makes no second run:
/// Databricks answers with that run, and the promise records it (its
/// record, the console and the audit then name it). First attempts only (a
/// later attempt's run is recorded by its retry step). Best effort: a
/// failure leaves the promise without its run id, as before.
pub(crate) async fn record_called_back_run<S: PromiseStore + Families, J: Jobs>(
    ctx: &WorkerContext<S, J>,
    t: &Trigger,
    run: &Launch,
    promise: &Promise,
) {
    if promise.run_id.is_some()
        || promise.retry.attempt > 1
        || promise.settled_by.as_deref() != Some(SettledBy::Callback.as_str())
    {
        return;
    }
    let token = promise.idempotency_token();
    match launch(ctx, t, run, promise, &token).await {
        Ok(r) => match ctx.store.record_run(&t.id, r, None).await {
            Ok(_) => tracing::debug!(run_id = r.get(), "a called-back run's id recorded late"),
            Err(e) => tracing::debug!(error = %e, "a called-back run's id not recorded"),
        },
        Err(e) => tracing::debug!(error = %e, "a called-back run's id not asked for again"),
    }
}

/// Steps 3 to 5 for a created promise (a trigger's, or a parent's child):
/// launch unless a run is recorded, then record the run.
pub(crate) async fn launch_created<S: PromiseStore + Families, J: Jobs>(
    ctx: &WorkerContext<S, J>,
    t: &Trigger,
    run: &Launch,
    promise: &Promise,
) -> Disposition {
    let span = tracing::Span::current();
    if let Some(run) = promise.run_id {
        span.record("databricks.run_id", run.get());
        launched("already_launched");
        return Disposition::Ack;
    }

    // 3. Launch with the derived token: a repeat gets the same run back.
    let token = promise.idempotency_token();
    let result = launch(ctx, t, run, promise, &token).await;
    match result {
        Ok(run) => {
            span.record("databricks.run_id", run.get());
            launched("launched");
            crate::failpoint!("worker.after_launch");
            // 5. Record the run id (and its page), then ack.
            let page = run_page(ctx, &promise.workspace, run).await;
            match ctx.store.record_run(&t.id, run, page.as_deref()).await {
                Ok(RecordOutcome::Recorded(_)) => Disposition::Ack,
                Ok(RecordOutcome::NotFound) => {
                    tracing::warn!(
                        "promise vanished before its run id was recorded (expired or deleted)"
                    );
                    Disposition::Ack
                }
                Ok(RecordOutcome::Conflict(other)) => {
                    tracing::error!(other_run = %other, "promise already has another run id; keeping it");
                    Disposition::Ack
                }
                Err(e) => store_failure(e),
            }
        }
        // 4. Permanent refusal: the producer hears it through the event.
        Err(DatabricksError::Permanent {
            endpoint,
            status,
            body,
        }) => {
            let value = refusal(endpoint, status, &body);
            let settle = Settle {
                id: t.id.clone(),
                target: State::Rejected,
                value: Payload::data(value.to_string()),
                ikey: Some(format!("launch:{}", t.id)),
                strict: false,
                settled_by: SettledBy::Worker,
                cancel_run: false,
                capability: None,
            };
            tracing::warn!(status, error_code = %body.error_code, "databricks refused the launch; rejecting the promise");
            launched("refused");
            match ctx.store.settle(&settle).await {
                Ok(_) => Disposition::Ack,
                Err(e) => store_failure(e),
            }
        }
        Err(e @ DatabricksError::UnknownWorkspace(_)) => {
            Disposition::DeadLetter(Refusal::UnknownWorkspace, e.to_string())
        }
        Err(e @ DatabricksError::Credentials { .. }) => {
            launched("held_credentials");
            Disposition::Hold(e.to_string())
        }
        Err(e) => {
            launched("failed_for_now");
            Disposition::Requeue(e.to_string())
        }
    }
}

/// How long a launch waits for its run's page before it is recorded
/// without one.
const RUN_PAGE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The run's page, for its events to link: `run-now` and `runs/submit`
/// answer only the run id, so one `runs/get` follows (as Airflow's provider
/// reads the page after each launch). Best effort and bounded: without it,
/// the reconciler's first check records the page, and a callback before
/// that would publish no link.
async fn run_page<S: PromiseStore + Families, J: Jobs>(
    ctx: &WorkerContext<S, J>,
    workspace: &str,
    run: crate::domain::RunId,
) -> Option<String> {
    match tokio::time::timeout(RUN_PAGE_WAIT, ctx.jobs.get_run(workspace, run)).await {
        Ok(Ok(info)) => info.run_page_url.filter(|u| !u.is_empty()),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "the run's page was not read; the reconciler records it");
            None
        }
        Err(_) => None,
    }
}

/// Launches the run. A launch whose parameters Databricks refuses may have
/// been built from a stale idea of the job: its style is learnt again, and
/// if that changes the request, it is sent once more (same token).
pub(crate) async fn launch<S: PromiseStore + Families, J: Jobs>(
    ctx: &WorkerContext<S, J>,
    t: &Trigger,
    run: &Launch,
    promise: &Promise,
    token: &crate::domain::IdempotencyToken,
) -> Result<crate::domain::RunId, DatabricksError> {
    let workspace = promise.workspace.as_str();
    let req = ctx.launch_request(t, run, promise).await?;
    let result = ctx
        .jobs
        .launch(workspace, &req, token, t.traceparent.as_deref())
        .await;
    let (Err(DatabricksError::Permanent { status: 400, .. }), Launch::RunNow { job_id, .. }) =
        (&result, run)
    else {
        return result;
    };
    ctx.job_styles.forget(workspace, *job_id);
    match ctx.launch_request(t, run, promise).await {
        Ok(again) if again != req => {
            ctx.jobs
                .launch(workspace, &again, token, t.traceparent.as_deref())
                .await
        }
        _ => result,
    }
}

/// Launch attempts by outcome: `launched` (run-now/submit answered with a
/// run id, a retry included), `already_launched` / `already_settled` (a
/// redelivery or duplicate: nothing sent), `refused` (a permanent error,
/// promise rejected), `failed_for_now` (transient, retried),
/// `held_credentials` (the workspace refuses its credentials: held).
fn launched(outcome: &'static str) {
    metrics::counter!("runbridge_launches_total", "outcome" => outcome).increment(1);
}
