//! The loop the worker's schedules of due steps share (fan-out steps,
//! retries): every `tick`, for each partition this worker leases, claim
//! what is due (leased: a step whose worker died comes due again by itself)
//! and take up to four steps at once, until `shutdown`. A step cut short by
//! shutdown is taken again by whoever leases its partition next, so every
//! step must be safe to repeat.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use futures_util::{StreamExt, stream};
use tokio_util::sync::CancellationToken;

use crate::domain::PromiseId;
use crate::partitions::Assignment;
use crate::shutdown::pause;
use crate::store::StoreError;

/// Steps taken at once per partition.
const AT_ONCE: usize = 4;

/// One round over the partitions `assignment` names now.
async fn round<C, CF, S, SF, T, E>(assignment: &Assignment, name: &str, claim: &C, step: &S)
where
    C: Fn(u32) -> CF,
    CF: Future<Output = Result<Vec<PromiseId>, StoreError>>,
    S: Fn(PromiseId) -> SF,
    SF: Future<Output = Result<T, E>>,
    E: Display,
{
    for partition in assignment.current() {
        let due = match claim(partition).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(partition, schedule = name, error = %e, "schedule unreadable; retrying");
                return;
            }
        };
        let _: Vec<()> = stream::iter(due)
            .map(|id| async move {
                let shown = id.to_string();
                if let Err(e) = step(id).await {
                    tracing::warn!(promise.id = %shown, schedule = name, error = %e, "step unfinished; taken again after its lease");
                }
            })
            .buffer_unordered(AT_ONCE)
            .collect()
            .await;
    }
}

/// Takes the due steps of `name`'s schedule every `tick` until `shutdown`:
/// `claim(partition)` leases what is due, `step(id)` takes one.
pub async fn run<C, CF, S, SF, T, E>(
    name: &'static str,
    assignment: Assignment,
    tick: Duration,
    shutdown: CancellationToken,
    claim: C,
    step: S,
) where
    C: Fn(u32) -> CF,
    CF: Future<Output = Result<Vec<PromiseId>, StoreError>>,
    S: Fn(PromiseId) -> SF,
    SF: Future<Output = Result<T, E>>,
    E: Display,
{
    while !shutdown.is_cancelled() {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = round(&assignment, name, &claim, &step) => {}
        }
        pause(tick, &shutdown).await;
    }
}
