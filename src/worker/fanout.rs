//! Fan-out: launching a parent trigger's children (docs/contracts.md,
//! parent triggers).
//!
//! A parent trigger is handled like any trigger up to its promise: the
//! worker creates the parent (its children's ids listed beside it, its
//! first fan-out step scheduled a lease away), takes that step itself, and
//! acks. A **fan-out step** makes sure every child inside the parent's
//! window (all of them, or `max_concurrency` more than have settled) has a
//! promise and a run, exactly as a trigger's would: `create` finds a child
//! already made, `run-now` with the child's derived token finds its run. So
//! a step can be repeated, interrupted or taken twice at once; none of that
//! makes a second run.
//!
//! What brings the next step: a child settling widens the window
//! (`child_settled.lua`) and schedules the parent; [`run`] takes due
//! parents of this worker's partitions from the fanout schedule, leased so
//! that a step whose worker died comes due again.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream;
use tokio_util::sync::CancellationToken;

use super::{Disposition, WorkerContext, launch_created, new_promise, reply_for, store_failure};
use crate::databricks::Jobs;
use crate::domain::fanout::FanOut;
use crate::domain::promise::{ChildOf, Family};
use crate::domain::{Payload, Promise, PromiseId, State, Trigger};
use crate::partitions::Assignment;
use crate::store::{CreateOutcome, Families, PromiseStore, StoreError, Timeout};

/// How many children one step launches at once.
const LAUNCHES_AT_ONCE: usize = 16;

/// Why a fan-out step did not finish; the schedule brings it back.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A child could not be launched for now (Databricks or Redis away).
    #[error("child {child}: {reason}")]
    Child { child: String, reason: String },
}

/// Handles a parent trigger: the parent's promise, then its first step.
pub(super) async fn parent<S: PromiseStore + Families, J: Jobs>(
    ctx: &WorkerContext<S, J>,
    t: &Trigger,
    f: &FanOut,
    workspace: &str,
) -> Disposition {
    if let Some(ws) = f
        .children
        .iter()
        .filter_map(|c| c.workspace.as_ref())
        .find(|ws| !ctx.workspaces.contains(ws))
    {
        return Disposition::DeadLetter(
            super::Refusal::UnknownWorkspace,
            format!(
                "a child names unknown workspace {ws:?}: configured are {:?}",
                ctx.workspaces
            ),
        );
    }
    let family = Family {
        children: u32::try_from(f.children.len()).unwrap_or(u32::MAX),
        join: f.join,
        fail_fast: f.fail_fast,
        max_concurrency: f.max_concurrency,
        launched: f.first_window(),
    };
    // The parent runs nothing: its children heartbeat, not it.
    let new = crate::store::NewPromise {
        heartbeat: None,
        ..new_promise(t, workspace, &ctx.retry_defaults)
    };
    let ids: Vec<PromiseId> = f.children.iter().map(|c| c.id.clone()).collect();
    let created = ctx
        .store
        .create_parent(&new, &family, &ids, ctx.fanout_lease)
        .await;
    let promise = match created {
        Ok(CreateOutcome::Created(p) | CreateOutcome::Existing(p)) => p,
        Err(e) => return store_failure(e),
    };
    if promise.state.is_settled() {
        return reply_for(&promise, t);
    }
    if promise.family.is_none() {
        tracing::warn!("a promise with this id exists and is not a parent; nothing fanned out");
        return Disposition::Ack;
    }
    crate::failpoint!("fanout.after_parent");
    // The schedule takes the step again if this one does not finish.
    match step(ctx, &promise.id).await {
        Ok(n) => tracing::debug!(children = n, "fanned out"),
        Err(e) => tracing::warn!(error = %e, "fan-out step unfinished; the schedule retries it"),
    }
    Disposition::Ack
}

/// One fan-out step for a parent: every child in its window has a promise
/// and a run. Returns how many children it looked at.
pub async fn step<S: PromiseStore + Families, J: Jobs>(
    ctx: &WorkerContext<S, J>,
    parent: &PromiseId,
) -> Result<usize, StepError> {
    let Some(p) = ctx.store.get(parent).await? else {
        ctx.store.fanout_done(parent, 0, true).await?;
        return Ok(0);
    };
    let Some(family) = p.family.clone() else {
        ctx.store.fanout_done(parent, 0, true).await?;
        return Ok(0);
    };
    if p.state.is_settled() {
        return cancel_unlaunched(ctx, &p, family.launched).await;
    }
    let t = stored_trigger(&p)?;
    let recorded = ctx.store.children(parent).await?;
    let todo: Vec<u32> = (0..family.launched)
        .filter(|n| {
            recorded
                .get(*n as usize)
                .is_none_or(|c| c.index != *n || c.state.is_none())
        })
        .collect();
    let n = todo.len();
    let (p, t) = (&p, &t);
    let results: Vec<Result<(), StepError>> = stream::iter(todo)
        .map(|i| async move { ensure_child(ctx, p, t, i).await })
        .buffer_unordered(LAUNCHES_AT_ONCE)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    ctx.store
        .fanout_done(parent, family.launched, false)
        .await?;
    Ok(n)
}

/// A settled parent's children that were created but have no recorded run
/// (launched by a worker that died before recording it, or launching right
/// now): each is launched again with its token, which answers with its run
/// if it has one (or starts it, to be cancelled at once), so that it is
/// cancelled with its run and none is left running.
async fn cancel_unlaunched<S: PromiseStore + Families, J: Jobs>(
    ctx: &WorkerContext<S, J>,
    p: &Promise,
    launched: u32,
) -> Result<usize, StepError> {
    let t = stored_trigger(p)?;
    let open: Vec<u32> = ctx
        .store
        .children(&p.id)
        .await?
        .into_iter()
        .filter(|c| c.state.is_none() && c.index < launched)
        .map(|c| c.index)
        .collect();
    let t = &t;
    let results: Vec<Result<(), StepError>> = stream::iter(open)
        .map(|n| async move {
            let Some(child) = t.child(n as usize) else {
                return Ok(());
            };
            let Some(c) = ctx.store.get(&child.id).await? else {
                return Ok(());
            };
            let ours = c
                .parent
                .as_ref()
                .is_some_and(|o| o.parent == p.id && o.index == n);
            if !ours || c.run_id.is_some() {
                return Ok(());
            }
            if c.state.is_settled() {
                if let Some(run) = child.launch() {
                    Box::pin(super::record_called_back_run(ctx, &child, run, &c)).await;
                }
                return Ok(());
            }
            launch_child(ctx, &child, &c).await
        })
        .buffer_unordered(LAUNCHES_AT_ONCE)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    let left = crate::join::cancel_children(&ctx.store, p).await?;
    if left > 0 {
        return Err(StepError::Child {
            child: format!("{}/*", p.id),
            reason: format!("{left} children still without a recorded run"),
        });
    }
    ctx.store.fanout_done(&p.id, launched, true).await?;
    Ok(0)
}

/// A child's workspace: its own, else the parent's, else the default.
fn workspace_of<S, J>(ctx: &WorkerContext<S, J>, child: &Trigger) -> String {
    child
        .workspace
        .clone()
        .unwrap_or_else(|| ctx.default_workspace.clone())
}

/// Launches a child's created promise as a trigger's would be (steps 3 to
/// 5), as a step's result.
async fn launch_child<S: PromiseStore + Families, J: Jobs>(
    ctx: &WorkerContext<S, J>,
    child: &Trigger,
    promise: &Promise,
) -> Result<(), StepError> {
    let Some(run) = child.launch() else {
        return Ok(());
    };
    match launch_created(ctx, child, run, promise).await {
        Disposition::Ack | Disposition::ReplyThenAck(_) => Ok(()),
        Disposition::Requeue(reason)
        | Disposition::Hold(reason)
        | Disposition::DeadLetter(_, reason) => Err(StepError::Child {
            child: child.id.to_string(),
            reason,
        }),
    }
}

/// The parent's trigger as it arrived (`super::stored_trigger`), or the
/// step's error.
fn stored_trigger(p: &Promise) -> Result<Trigger, StepError> {
    super::stored_trigger(p).map_err(|e| StepError::Child {
        child: format!("{}/*", p.id),
        reason: format!("the parent's stored trigger does not parse: {e}"),
    })
}

/// Child `n` has a promise (deadline: the parent's) and a run.
async fn ensure_child<S: PromiseStore + Families, J: Jobs>(
    ctx: &WorkerContext<S, J>,
    parent: &Promise,
    t: &Trigger,
    n: u32,
) -> Result<(), StepError> {
    let Some(child) = t.child(n as usize) else {
        return Ok(());
    };
    let workspace = workspace_of(ctx, &child);
    let of = ChildOf {
        parent: parent.id.clone(),
        index: n,
    };
    let new = crate::store::NewPromise {
        timeout: Timeout::At(parent.timeout),
        parent: Some(of.clone()),
        ..new_promise(&child, &workspace, &ctx.retry_defaults)
    };
    let promise = match ctx.store.create(&new).await? {
        CreateOutcome::Created(p) => p,
        CreateOutcome::Existing(p) if p.parent.as_ref() == Some(&of) => p,
        CreateOutcome::Existing(other) => {
            // The id belongs to a promise that is not this child: the
            // parent hears of a child that could not start.
            let refused = Promise {
                state: State::Rejected,
                value: Payload::data(
                    serde_json::json!({
                        "reason": "child_id_taken",
                        "message": format!("promise {} already exists and is not child {n} of {}", other.id, parent.id),
                    })
                    .to_string(),
                ),
                parent: Some(of),
                ..other
            };
            crate::join::report(&ctx.store, &refused).await?;
            return Ok(());
        }
    };
    if promise.state.is_settled() {
        if let Some(run) = child.launch() {
            Box::pin(super::record_called_back_run(ctx, &child, run, &promise)).await;
        }
        return Ok(());
    }
    launch_child(ctx, &child, &promise).await
}

/// Takes due fan-out steps of this worker's partitions every `tick`, until
/// `shutdown`.
pub async fn run<S: PromiseStore + Families, J: Jobs>(
    ctx: Arc<WorkerContext<S, J>>,
    assignment: Assignment,
    tick: Duration,
    batch: usize,
    shutdown: CancellationToken,
) {
    let lease = ctx.fanout_lease;
    super::schedule::run(
        "fanout",
        assignment,
        tick,
        shutdown,
        |p| {
            let ctx = ctx.clone();
            async move { ctx.store.claim_fanouts(p, batch, lease).await }
        },
        |id| {
            let ctx = ctx.clone();
            async move { step(&ctx, &id).await }
        },
    )
    .await
}
