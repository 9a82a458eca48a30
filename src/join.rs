//! Fan-in: what a settlement means for its family (docs/contracts.md,
//! parent triggers).
//!
//! The relay calls [`after_settlement`] for every settled child or parent
//! once its event is confirmed, and removes the outbox entry only after it
//! returned: a crash in between brings the entry back, and every step here
//! is safe to repeat.
//!
//! - A **child** reports its outcome to its parent (`child_settled.lua`,
//!   which records it once); when the children's outcomes decide the parent
//!   ([`decide`]), the parent is settled (`settle.lua`, idempotency key
//!   `join`): one settlement whoever gets there first.
//! - A **parent**, however it settled (its join, an operator, its timeout),
//!   cancels every child whose outcome it has not recorded, with its run
//!   (`cancel_child.lua`; a child never created is written cancelled, so it
//!   is never launched; a child created but without a recorded run is left
//!   to the parent's fan-out step, which learns its run before cancelling
//!   it, since a worker may have launched it and died before recording
//!   it): no child outlives its parent.

use futures_util::StreamExt;
use futures_util::stream;

use crate::domain::fanout::decide;
use crate::domain::{Payload, Promise, SettledBy};
use crate::store::{
    ChildCancel, ChildEntry, ChildReport, Families, PromiseStore, Settle, SettleOutcome, StoreError,
};

/// How many children are cancelled (or read) at once.
const CANCELS_AT_ONCE: usize = 16;

/// The family's follow-up of a confirmed settlement.
pub async fn after_settlement<S: PromiseStore + Families>(
    store: &S,
    p: &Promise,
) -> Result<(), StoreError> {
    if p.parent.is_some() {
        report(store, p).await?;
    }
    if p.family.is_some() && cancel_children(store, p).await? > 0 {
        // Their runs are learnt, then they are cancelled, by the parent's
        // fan-out step (crate::worker::fanout).
        store.schedule_fanout(&p.id).await?;
    }
    Ok(())
}

/// A settled child's outcome reaches its parent, which settles if that
/// decides it.
pub async fn report<S: PromiseStore + Families>(
    store: &S,
    child: &Promise,
) -> Result<(), StoreError> {
    let Some(of) = &child.parent else {
        return Ok(());
    };
    let state = match store.child_settled(child).await? {
        ChildReport::Join(state) => state,
        ChildReport::Gone => {
            tracing::debug!(promise.id = %child.id, parent = %of.parent, "the parent is gone");
            return Ok(());
        }
        ChildReport::NotAChild => {
            tracing::warn!(promise.id = %child.id, parent = %of.parent, "the parent does not list this child");
            return Ok(());
        }
        ChildReport::ParentSettled => return Ok(()),
    };
    crate::failpoint!("join.after_child_recorded");
    let Some(parent) = store.get(&of.parent).await? else {
        return Ok(());
    };
    let Some(family) = &parent.family else {
        return Ok(());
    };
    let Some(outcome) = decide(family.join, family.fail_fast, &state) else {
        return Ok(());
    };
    let settle = Settle {
        id: parent.id.clone(),
        target: outcome.state,
        value: Payload::data(outcome.value.to_string()),
        ikey: Some("join".into()),
        strict: false,
        settled_by: SettledBy::Join,
        cancel_run: false,
        capability: None,
    };
    let label = match store.settle(&settle).await? {
        SettleOutcome::Settled(_) => outcome.label,
        SettleOutcome::TimedOut(_) => "timed_out",
        _ => return Ok(()),
    };
    tracing::info!(promise.id = %parent.id, join = family.join.as_str(), outcome = label, "parent settled by its children");
    metrics::counter!("runbridge_joins_total", "join" => family.join.as_str(), "outcome" => label)
        .increment(1);
    Ok(())
}

/// Cancels every child of a settled parent that has not settled, with its
/// run. Returns how many were left because they have no recorded run.
pub async fn cancel_children<S: PromiseStore + Families>(
    store: &S,
    parent: &Promise,
) -> Result<u64, StoreError> {
    let open: Vec<_> = store
        .children(&parent.id)
        .await?
        .into_iter()
        .filter(|c| c.state.is_none())
        .collect();
    let results: Vec<Result<ChildCancel, StoreError>> = stream::iter(open)
        .map(|c| async move { store.cancel_child(parent, &c).await })
        .buffer_unordered(CANCELS_AT_ONCE)
        .collect()
        .await;
    let (mut cancelled, mut unlaunched) = (0u64, 0u64);
    for r in results {
        match r? {
            ChildCancel::Cancelled => cancelled += 1,
            ChildCancel::Unlaunched => unlaunched += 1,
            ChildCancel::Already => {}
        }
    }
    if cancelled + unlaunched > 0 {
        tracing::info!(promise.id = %parent.id, state = %parent.state, cancelled, unlaunched, "children cancelled with their parent");
    }
    Ok(unlaunched)
}

/// A parent's children in order with their states now: the outcome the
/// parent recorded, else the child's own record (`None`: not created yet).
/// For people (the API, the console, the CLI), not for deciding anything.
pub async fn children_now<S: PromiseStore + Families>(
    store: &S,
    parent: &crate::domain::PromiseId,
) -> Result<Vec<ChildEntry>, StoreError> {
    let recorded = store.children(parent).await?;
    let results: Vec<Result<ChildEntry, StoreError>> = stream::iter(recorded)
        .map(|mut c| async move {
            if c.state.is_none() {
                c.state = store.get(&c.id).await?.map(|p| p.state);
            }
            Ok(c)
        })
        .buffered(CANCELS_AT_ONCE)
        .collect()
        .await;
    results.into_iter().collect()
}
