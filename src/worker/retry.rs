//! The next attempt of a promise waiting for one (docs/contracts.md,
//! retries): a loop over this worker's partitions takes each due retry
//! (leased, so a worker that dies mid-step leaves it to come back) and
//! starts the attempt the promise's policy asks for.
//!
//! Every step is safe to repeat:
//! - `rerun` launches with the token of the promise and the attempt
//!   number, so a repeat gets the same run back from Databricks;
//! - `repair` sends the run's latest repair id as this worker knows it.
//!   Databricks refuses a stale one, so a repeat after a repair that was
//!   made but not recorded is refused; the run's `repair_history` then
//!   names that repair, and it is recorded as the attempt. It sends the
//!   launch's parameters again: a repair runs with the job's settings, and
//!   the original run's parameters are not applied to it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{WorkerContext, launch, refusal, stored_trigger};
use crate::databricks::{DatabricksError, Jobs};
use crate::domain::{
    IdempotencyToken, Payload, Promise, PromiseId, RetryMode, SettledBy, State, Trigger,
};
use crate::partitions::Assignment;
use crate::reconciler::{RunOutcome, classify};
use crate::store::{AttemptOutcome, Attempts, Families, PromiseStore, Settle, StoreError};

/// How soon a repair refused because its run is still ending is tried again.
const RUN_ENDING: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Databricks(#[from] DatabricksError),
}

/// The trigger a promise was created from, with the trace it ran in: its
/// own, or for a child, child n of its parent's.
async fn trigger_of<S: PromiseStore>(
    store: &S,
    p: &Promise,
) -> Result<Option<Trigger>, StoreError> {
    let from = match &p.parent {
        None => p.clone(),
        Some(of) => match store.get(&of.parent).await? {
            Some(parent) => parent,
            None => return Ok(None),
        },
    };
    let Ok(t) = stored_trigger(&from) else {
        return Ok(None);
    };
    let mut t = match &p.parent {
        None => t,
        Some(of) => match t.child(of.index as usize) {
            Some(c) => c,
            None => return Ok(None),
        },
    };
    t.traceparent = p.traceparent.clone();
    Ok(Some(t))
}

/// Settles a promise whose next attempt cannot start.
async fn refuse<S: PromiseStore>(
    store: &S,
    p: &Promise,
    n: u32,
    value: serde_json::Value,
) -> Result<(), StoreError> {
    tracing::warn!(promise.id = %p.id, attempt = n, reason = %value, "the next attempt cannot start; rejecting the promise");
    store
        .settle(&Settle {
            id: p.id.clone(),
            target: State::Rejected,
            value: Payload::data(value.to_string()),
            ikey: Some(format!("retry:{}:{n}", p.id)),
            strict: false,
            settled_by: SettledBy::Worker,
            cancel_run: false,
            capability: None,
        })
        .await?;
    Ok(())
}

/// Starts attempt `n` as a new run.
async fn rerun<S: PromiseStore + Families + Attempts, J: Jobs>(
    ctx: &WorkerContext<S, J>,
    p: &Promise,
    n: u32,
) -> Result<(), RetryError> {
    let Some(t) = trigger_of(&ctx.store, p).await? else {
        let why = json!({"reason": "retry_impossible", "message": "the promise's trigger can no longer be read"});
        return Ok(refuse(&ctx.store, p, n, why).await?);
    };
    let Some(run) = t.launch() else {
        return Ok(());
    };
    let token = IdempotencyToken::for_attempt(&p.idempotency_token(), &p.id, n);
    match launch(ctx, &t, run, p, &token).await {
        Ok(run) => {
            crate::failpoint!("retry.after_relaunch");
            ctx.store.attempt_started(&p.id, n, run, None).await?;
            tracing::info!(promise.id = %p.id, attempt = n, run_id = run.get(), "attempt started (rerun)");
            Ok(())
        }
        Err(DatabricksError::Permanent {
            endpoint,
            status,
            body,
        }) => Ok(refuse(&ctx.store, p, n, refusal(endpoint, status, &body)).await?),
        Err(e) => Err(e.into()),
    }
}

/// Starts attempt `n` as a repair of the promise's run.
async fn repair<S: PromiseStore + Families + Attempts, J: Jobs>(
    ctx: &WorkerContext<S, J>,
    p: &Promise,
    n: u32,
) -> Result<(), RetryError> {
    let Some(run) = p.run_id else {
        let why = json!({"reason": "retry_impossible", "message": "no run to repair"});
        return Ok(refuse(&ctx.store, p, n, why).await?);
    };
    // A repair runs with the job's settings, not the run's overrides: it
    // carries the parameters of the promise's launch (the callback values
    // with them) again, or the repaired notebook has none.
    let Some(t) = trigger_of(&ctx.store, p).await? else {
        let why = json!({"reason": "retry_impossible", "message": "the promise's trigger can no longer be read"});
        return Ok(refuse(&ctx.store, p, n, why).await?);
    };
    let Some(launched) = t.launch() else {
        return Ok(());
    };
    let request = ctx.launch_request(&t, launched, p).await?;
    let refused = match ctx
        .jobs
        .repair_run(&p.workspace, run, p.retry.repair_id, &request)
        .await
    {
        Ok(repair) => {
            crate::failpoint!("retry.after_repair");
            ctx.store
                .attempt_started(&p.id, n, run, Some(repair))
                .await?;
            tracing::info!(promise.id = %p.id, attempt = n, run_id = run.get(), repair_id = repair, "attempt started (repair)");
            return Ok(());
        }
        Err(DatabricksError::Permanent {
            endpoint,
            status,
            body,
        }) => refusal(endpoint, status, &body),
        Err(e) => return Err(e.into()),
    };
    // Refused: the repair this step asks for may exist already (made, then
    // the worker died or the answer was lost), or the run is still ending.
    let info = ctx.jobs.get_run_history(&p.workspace, run).await?;
    match info.latest_repair_id() {
        Some(latest) if Some(latest) != p.retry.repair_id => {
            ctx.store
                .attempt_started(&p.id, n, run, Some(latest))
                .await?;
            tracing::info!(promise.id = %p.id, attempt = n, repair_id = latest, "attempt found already started (repair)");
            Ok(())
        }
        _ if !matches!(classify(&info), RunOutcome::Ended { .. }) => {
            ctx.store.retry_later(&p.id, RUN_ENDING).await?;
            Ok(())
        }
        _ => Ok(refuse(&ctx.store, p, n, refused).await?),
    }
}

/// One due retry: the promise's next attempt, if it still waits for one.
pub async fn step<S: PromiseStore + Families + Attempts, J: Jobs>(
    ctx: &WorkerContext<S, J>,
    id: &PromiseId,
) -> Result<(), RetryError> {
    let p = match ctx.store.get(id).await? {
        Some(p) if !p.state.is_settled() && (p.retry.next_at.is_some() || p.retry.launching) => p,
        // Settled while waiting (or never waiting): nothing to start.
        _ => return Ok(ctx.store.drop_retry(id).await?),
    };
    let Some(policy) = p.retry.policy.clone() else {
        return Ok(ctx.store.drop_retry(id).await?);
    };
    // An attempt begun before a crash is finished, not begun again.
    let n = if p.retry.launching {
        p.retry.attempt
    } else {
        p.retry.attempt + 1
    };
    let is_rerun = policy.mode() == RetryMode::Rerun;
    match ctx.store.attempt_begin(&p.id, n, is_rerun).await? {
        AttemptOutcome::Done => {}
        AttemptOutcome::Stale => return Ok(()),
        AttemptOutcome::Settled(_) | AttemptOutcome::NotFound => {
            return Ok(ctx.store.drop_retry(id).await?);
        }
    }
    match policy.mode() {
        RetryMode::Rerun => rerun(ctx, &p, n).await,
        RetryMode::Repair => repair(ctx, &p, n).await,
    }
}

/// Starts due attempts of this worker's partitions every `tick`, until
/// `shutdown`.
pub async fn run<S: PromiseStore + Families + Attempts, J: Jobs>(
    ctx: Arc<WorkerContext<S, J>>,
    assignment: Assignment,
    tick: Duration,
    batch: usize,
    shutdown: CancellationToken,
) {
    let lease = ctx.fanout_lease;
    super::schedule::run(
        "retries",
        assignment,
        tick,
        shutdown,
        |p| {
            let ctx = ctx.clone();
            async move { ctx.store.claim_retries(p, batch, lease).await }
        },
        |id| {
            let ctx = ctx.clone();
            async move { step(&ctx, &id).await }
        },
    )
    .await
}
