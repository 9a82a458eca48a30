//! The outbox relay: settled promises → completion events on RabbitMQ.
//!
//! A settlement's Lua script appends the settled record to its partition's
//! outbox stream in the same step as the state change. The relay reads the
//! streams as one consumer of a shared consumer group (any number of workers
//! may run one), publishes each event persistent + mandatory with publisher
//! confirms, and removes the entry only after a confirm with no
//! `basic.return` (at-least-once; the stable event id lets consumers
//! deduplicate). Entries a relay took and never acknowledged (it died, or the
//! broker was away) are taken over with XAUTOCLAIM after `reclaim_idle`.

use std::time::Duration;

use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, BrokerError, BrokerSettings, Publisher};
use crate::domain::CompletionEvent;
use crate::partitions::{Assignment, Progress};
use crate::shutdown::{pause, reconnect_backoff};
use crate::store::{Families, Outbox, OutboxEntry, PromiseStore, RedisStore};

#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub group: String,
    pub consumer: String,
    pub batch: usize,
    pub block: Duration,
    pub reclaim_idle: Duration,
    pub reclaim_interval: Duration,
}

/// What became of one entry.
#[derive(Debug, PartialEq, Eq)]
pub enum Published {
    /// Confirmed: the entry can go.
    Confirmed,
    /// Entry is unreadable: logged and dropped (it can never be published).
    Dropped,
    /// Not routed (no queue bound): kept for a later try.
    Kept,
    /// Refused by the broker (nack): kept, and the relay reconnects. A
    /// channel that published while a quorum queue's leader was being
    /// elected was seen refusing every later message (RabbitMQ 3.10); a
    /// fresh channel, maybe on another node, does not.
    Refused,
    /// The connection failed: kept, and the relay reconnects.
    Broken,
}

/// Publishes one entry's event (and its `reply_to` copy).
pub async fn publish_entry(publisher: &Publisher, entry: &OutboxEntry) -> Published {
    let promise = match &entry.promise {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(entry = %entry.entry_id, partition = entry.partition, error = %e, "unreadable outbox entry dropped");
            return Published::Dropped;
        }
    };
    let event = match CompletionEvent::from_promise(promise) {
        Ok(e) => e,
        // A pending promise's entry is a progress event (progress.lua).
        Err(_) => match CompletionEvent::progress(promise) {
            Some(e) => e,
            None => {
                tracing::error!(entry = %entry.entry_id, "outbox entry of a pending promise without progress dropped");
                return Published::Dropped;
            }
        },
    };
    match publisher.publish_event(&event).await {
        Ok(()) => {}
        // Nobody listens to progress (no queue bound to promise.progress):
        // an update nobody hears is superseded by the next, not kept.
        Err(BrokerError::Returned { .. })
            if event.routing_key == crate::domain::event::PROGRESS_ROUTING_KEY =>
        {
            metrics::counter!("runbridge_events_returned_total").increment(1);
            return Published::Dropped;
        }
        Err(e @ (BrokerError::Returned { .. } | BrokerError::Nacked)) => {
            let what = if matches!(e, BrokerError::Nacked) {
                "runbridge_events_nacked_total"
            } else {
                "runbridge_events_returned_total"
            };
            metrics::counter!(what).increment(1);
            tracing::warn!(event.id = %event.id, error = %e, "event not accepted; kept in the outbox for a later try");
            return if matches!(e, BrokerError::Nacked) {
                Published::Refused
            } else {
                Published::Kept
            };
        }
        Err(e) => {
            tracing::warn!(event.id = %event.id, error = %e, "publishing failed; kept in the outbox");
            return Published::Broken;
        }
    }
    match publisher.publish_reply(&event).await {
        Ok(_) => {}
        // The RPC caller is gone; its reply has nowhere to go. The event itself was confirmed.
        Err(e @ BrokerError::Returned { .. }) => {
            tracing::warn!(event.id = %event.id, error = %e, "reply_to queue is gone; reply dropped");
        }
        Err(e) => {
            tracing::warn!(event.id = %event.id, error = %e, "reply publish failed; kept in the outbox");
            return Published::Broken;
        }
    }
    metrics::counter!("runbridge_events_published_total", "routing_key" => event.routing_key.clone())
        .increment(1);
    tracing::debug!(event.id = %event.id, routing_key = %event.routing_key, "event published");
    Published::Confirmed
}

/// How a batch went, for the relay loop.
#[derive(Debug, PartialEq, Eq)]
enum Round {
    Healthy,
    /// The broker connection broke.
    Broken,
    /// The broker refused some events (nack).
    Refused,
}

/// A settlement of a parent or a child is followed up in its family
/// ([`crate::join`]) once its event is confirmed or kept for want of a
/// listener, before its entry goes; if that fails the entry stays, and
/// comes back (event and follow-up again) once reclaimed.
async fn follow_up<S: PromiseStore + Families>(store: &S, entry: &OutboxEntry) -> bool {
    let Ok(p) = &entry.promise else { return true };
    if !p.state.is_settled() || (p.parent.is_none() && p.family.is_none()) {
        return true;
    }
    match crate::join::after_settlement(store, p).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(promise.id = %p.id, error = %e, "family follow-up failed; the entry stays for a later try");
            false
        }
    }
}

/// A progress entry whose promise's completion event has been confirmed
/// since (this entry failed and came back): published now it would follow
/// the completion event, so it is dropped. Read errors publish it (a
/// progress event is harmless).
async fn is_stale_progress<S: PromiseStore>(store: &S, entry: &OutboxEntry) -> bool {
    let Ok(p) = &entry.promise else { return false };
    if p.state.is_settled() {
        return false;
    }
    matches!(store.get(&p.id).await, Ok(Some(now)) if now.activity.published_on.is_some())
}

/// Whether a batch's events found a queue: some came back unroutable, or
/// some were confirmed and none came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Routing {
    Unroutable,
    Routed,
    Unknown,
}

/// Publishes a batch concurrently (confirms awaited together), follows up
/// families, and acks what was confirmed.
async fn publish_batch<O: Outbox, S: PromiseStore + Families>(
    publisher: &Publisher,
    outbox: &mut O,
    store: &S,
    entries: Vec<OutboxEntry>,
) -> Result<(Round, Routing), crate::store::StoreError> {
    // Checked first, so that the publishes below start in stream order (a
    // progress event before its promise's completion event).
    let stale = join_all(entries.iter().map(|e| is_stale_progress(store, e))).await;
    let results = join_all(entries.iter().zip(stale).map(|(e, stale)| async move {
        if stale {
            return Published::Dropped;
        }
        publish_entry(publisher, e).await
    }))
    .await;
    // A settlement's family moves on whether or not anyone listens: an
    // event kept because no queue is bound (unroutable) is followed up as
    // a confirmed one is (the follow-up is idempotent; a kept entry comes
    // back and is followed up again until its event is confirmed).
    let settled: Vec<&OutboxEntry> = entries
        .iter()
        .zip(&results)
        .filter(|(_, r)| matches!(r, Published::Confirmed | Published::Kept))
        .map(|(e, _)| e)
        .collect();
    let followed = join_all(settled.into_iter().map(|e| follow_up(store, e))).await;
    let mut followed = followed.into_iter();
    let routing = if results.contains(&Published::Kept) {
        Routing::Unroutable
    } else if results.contains(&Published::Confirmed) {
        Routing::Routed
    } else {
        Routing::Unknown
    };
    let mut round = Round::Healthy;
    for (entry, r) in entries.iter().zip(results) {
        let follow_failed =
            matches!(r, Published::Confirmed | Published::Kept) && followed.next() == Some(false);
        if r == Published::Confirmed && follow_failed {
            continue;
        }
        match r {
            Published::Confirmed | Published::Dropped => {
                crate::failpoint!("relay.after_confirm");
                outbox.ack(entry, matches!(r, Published::Confirmed)).await?
            }
            Published::Kept => {}
            Published::Refused if round == Round::Healthy => round = Round::Refused,
            Published::Refused => {}
            Published::Broken => round = Round::Broken,
        }
    }
    Ok((round, routing))
}

/// Runs the relay until `shutdown`, reconnecting to Redis and RabbitMQ as
/// needed. It relays the outbox streams of the partitions `assignment` names (this
/// worker's share; they change as workers come and go), marking `progress`
/// after every round that read and published without losing the broker.
pub async fn run(
    store: RedisStore,
    broker_settings: BrokerSettings,
    settings: RelaySettings,
    assignment: Assignment,
    progress: Progress,
    shutdown: CancellationToken,
) {
    let mut backoff = reconnect_backoff();
    while !shutdown.is_cancelled() {
        let setup = async {
            let broker = Broker::connect(&broker_settings)
                .await
                .map_err(|e| e.to_string())?;
            broker.declare_topology().await.map_err(|e| e.to_string())?;
            let publisher = broker.publisher().await.map_err(|e| e.to_string())?;
            let outbox = store
                .outbox(&settings.group, &settings.consumer, settings.block)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((broker, publisher, outbox))
        };
        let (broker, publisher, mut outbox) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = setup => match r {
                Ok(x) => x,
                Err(e) => {
                    let wait = backoff.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(error = %e, wait_ms = wait.as_millis() as u64, "relay cannot start; retrying");
                    pause(wait, &shutdown).await;
                    continue;
                }
            }
        };
        backoff = reconnect_backoff();
        tracing::info!(consumer = %settings.consumer, "outbox relay running");
        let mut last_reclaim = tokio::time::Instant::now() - settings.reclaim_interval;
        // What this relay last noted of the listeners, for `runbridge check`
        // (written when it changes, and each round that finds none).
        let mut noted_routed: Option<bool> = None;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let owned = assignment.current();
            let round = async {
                let mut entries = Vec::new();
                if last_reclaim.elapsed() >= settings.reclaim_interval {
                    last_reclaim = tokio::time::Instant::now();
                    entries = outbox
                        .reclaim(&owned, settings.reclaim_idle, settings.batch)
                        .await?;
                    if !entries.is_empty() {
                        tracing::info!(n = entries.len(), "reclaimed idle outbox entries");
                    }
                }
                if entries.is_empty() {
                    entries = outbox
                        .read_new(&owned, settings.batch, settings.block)
                        .await?;
                }
                publish_batch(&publisher, &mut outbox, &store, entries).await
            };
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = round => r,
            };
            let outcome = match outcome {
                Ok((round, routing)) => {
                    let note = match routing {
                        Routing::Unroutable => Some(Some(chrono::Utc::now().timestamp_millis())),
                        Routing::Routed if noted_routed != Some(true) => Some(None),
                        _ => None,
                    };
                    if let Some(at) = note {
                        match store.note_events_unroutable(at).await {
                            Ok(()) => noted_routed = Some(at.is_none()),
                            Err(e) => {
                                tracing::debug!(error = %e, "could not note whether events are routed")
                            }
                        }
                    }
                    Ok(round)
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok(Round::Healthy) => progress.mark(),
                Ok(Round::Broken) => {
                    tracing::warn!("broker connection lost; relay reconnecting");
                    break;
                }
                Ok(Round::Refused) => {
                    tracing::warn!(
                        "the broker refused events; relay reconnecting with a fresh channel"
                    );
                    pause(backoff.next().unwrap_or(Duration::from_secs(1)), &shutdown).await;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbox read failed; relay reconnecting");
                    pause(backoff.next().unwrap_or(Duration::from_secs(1)), &shutdown).await;
                    break;
                }
            }
            if !publisher.is_connected() {
                tracing::warn!("broker channel closed; relay reconnecting");
                break;
            }
        }
        broker.close().await;
    }
    tracing::info!("outbox relay stopped");
}
