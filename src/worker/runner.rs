//! The consume loop: RabbitMQ deliveries in, [`process`] on each, dispositions
//! applied. Concurrency is bounded by the channel prefetch; every delivery is
//! a task on a `TaskTracker`, so shutdown can stop consuming and then drain
//! in-flight work with a time limit.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Disposition, Refusal, WorkerContext, process};
use crate::broker::{Broker, BrokerError, BrokerSettings, Incoming, Publisher};
use crate::databricks::Jobs;
use crate::domain::SettledBy;
use crate::reconciler::{ControlCommand, cancel_matching, parse_control};
use crate::shutdown::{pause, reconnect_backoff};
use crate::store::{Attempts, Families, PromiseStore};

#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// Pause before a failed delivery goes back to the queue.
    pub requeue_delay: Duration,
    /// Retries in place, with a doubling pause from `requeue_delay`, before a
    /// failing delivery goes back to the queue.
    pub retries_in_place: u32,
    /// How long shutdown waits for in-flight deliveries.
    pub drain_timeout: Duration,
    pub consumer_tag: String,
}

/// The longest pause between two tries of a held delivery: how soon after
/// the credentials are fixed its trigger runs.
const HOLD_MAX_PAUSE: Duration = Duration::from_secs(10);

/// Which queue a delivery came from: it decides the unit of work.
#[derive(Debug, Clone, Copy)]
enum Queue {
    Triggers,
    Control,
}

/// One control-queue command: cancel by id, tags, job id or id wildcard;
/// or retry one waiting promise now.
async fn control<S: PromiseStore + Attempts, J: Jobs>(
    ctx: &WorkerContext<S, J>,
    body: &[u8],
) -> Disposition {
    let (filter, reason) = match parse_control(body) {
        Ok(ControlCommand::Cancel(filter, reason)) => (filter, reason),
        Ok(ControlCommand::Retry(id)) => {
            return match ctx.store.retry_now(&id).await {
                Ok(outcome) => {
                    tracing::info!(promise.id = %id, ?outcome, "control: retry");
                    Disposition::Ack
                }
                Err(e) if e.is_retryable() => Disposition::Requeue(e.to_string()),
                Err(e) => Disposition::DeadLetter(Refusal::StoreError, e.to_string()),
            };
        }
        Err(reason) => return Disposition::DeadLetter(Refusal::InvalidControl, reason),
    };
    match cancel_matching(&ctx.store, &filter, &reason, SettledBy::Operator).await {
        Ok(r) => {
            tracing::info!(
                ?filter,
                matched = r.matched,
                cancelled = r.cancelled,
                "control: cancel"
            );
            Disposition::Ack
        }
        Err(e) if e.is_retryable() => Disposition::Requeue(e.to_string()),
        Err(e) => Disposition::DeadLetter(Refusal::StoreError, e.to_string()),
    }
}

/// Deliveries by queue and what became of them.
fn count(queue: Queue, d: &Disposition) {
    let q = match queue {
        Queue::Triggers => "triggers",
        Queue::Control => "control",
    };
    metrics::counter!("runbridge_deliveries_total", "queue" => q).increment(1);
    if matches!(queue, Queue::Triggers) {
        metrics::counter!("runbridge_triggers_consumed_total").increment(1);
    }
    match d {
        Disposition::DeadLetter(kind, _) => {
            metrics::counter!("runbridge_dead_lettered_total", "queue" => q, "reason" => kind.as_str())
                .increment(1);
        }
        Disposition::Requeue(_) | Disposition::Hold(_) => {
            metrics::counter!("runbridge_requeued_total", "queue" => q).increment(1);
        }
        Disposition::Ack | Disposition::ReplyThenAck(_) => {}
    }
}

async fn handle<S: PromiseStore + Families + Attempts, J: Jobs>(
    ctx: Arc<WorkerContext<S, J>>,
    queue: Queue,
    inc: Incoming,
    publisher: Arc<Publisher>,
    requeue_delay: Duration,
    retries_in_place: u32,
    shutdown: CancellationToken,
) {
    // A passing failure (Redis or Databricks away) is retried here, holding
    // the delivery, with a growing pause: requeueing at once would spend the
    // queue's delivery limit during an outage and dead-letter good messages.
    let mut attempt = 0u32;
    let disposition = loop {
        let outcome = match queue {
            Queue::Triggers => process(&ctx, &inc.envelope).await,
            Queue::Control => control(&ctx, &inc.envelope.body).await,
        };
        match outcome {
            Disposition::Requeue(reason)
                if attempt < retries_in_place && !shutdown.is_cancelled() =>
            {
                attempt += 1;
                let wait =
                    (requeue_delay * 2u32.pow(attempt.min(6) - 1)).min(Duration::from_secs(30));
                tracing::warn!(%reason, attempt, wait_ms = wait.as_millis() as u64, "delivery failed for now; retrying in place");
                if !pause(wait, &shutdown).await {
                    break Disposition::Requeue(reason);
                }
            }
            // Held for as long as the credentials are refused: quietly
            // (the client logged the outage once), never spending the
            // queue's delivery limit.
            Disposition::Hold(reason) => {
                attempt += 1;
                let wait = (requeue_delay * 2u32.pow(attempt.min(6) - 1)).min(HOLD_MAX_PAUSE);
                tracing::debug!(%reason, attempt, "delivery held: workspace credentials refused");
                if !pause(wait, &shutdown).await {
                    break Disposition::Requeue(reason);
                }
            }
            other => break other,
        }
    };
    count(queue, &disposition);
    let result = match disposition {
        Disposition::Ack => {
            let r = inc.ack().await;
            crate::failpoint!("worker.after_ack");
            r
        }
        Disposition::Requeue(reason) | Disposition::Hold(reason) => {
            tracing::warn!(%reason, redelivered = inc.redelivered, "delivery still failing; back to the queue");
            inc.requeue().await
        }
        Disposition::DeadLetter(_, reason) => {
            tracing::warn!(%reason, "delivery refused; dead-lettering");
            inc.dead_letter(&publisher, &reason).await
        }
        Disposition::ReplyThenAck(event) => match publisher.publish_reply(&event).await {
            Ok(_) => inc.ack().await,
            Err(e @ BrokerError::Returned { .. }) => {
                tracing::warn!(error = %e, "reply_to queue does not exist; the stored outcome was not re-sent");
                inc.ack().await
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not re-send the stored outcome; requeueing");
                pause(requeue_delay, &shutdown).await;
                inc.requeue().await
            }
        },
    };
    if let Err(e) = result {
        // The delivery stays unacked and comes back after reconnection.
        tracing::warn!(error = %e, "could not settle the delivery with the broker");
    }
}

/// Consumes triggers until `shutdown`, reconnecting on any broker failure.
pub async fn run<S: PromiseStore + Families + Attempts, J: Jobs>(
    ctx: Arc<WorkerContext<S, J>>,
    broker_settings: BrokerSettings,
    settings: RunnerSettings,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let mut backoff = reconnect_backoff();
    let mut current: Option<Broker> = None;
    'connect: while !shutdown.is_cancelled() {
        let broker = tokio::select! {
            _ = shutdown.cancelled() => break,
            b = Broker::connect(&broker_settings) => b,
        };
        let setup = async {
            let broker = broker?;
            broker.declare_topology().await?;
            let publisher = Arc::new(broker.publisher().await?);
            let consumer = broker.consume_triggers(&settings.consumer_tag).await?;
            let control = broker
                .consume_control(&format!("{}-control", settings.consumer_tag))
                .await?;
            Ok::<_, BrokerError>((broker, publisher, consumer, control))
        };
        let (broker, publisher, mut consumer, mut control) = match setup.await {
            Ok(x) => x,
            Err(e) => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(error = %e, wait_ms = wait.as_millis() as u64, "broker not available; retrying");
                pause(wait, &shutdown).await;
                continue;
            }
        };
        backoff = reconnect_backoff();
        tracing::info!(queue = %broker_settings.triggers_queue, prefetch = broker_settings.prefetch, "consuming triggers");
        current = Some(broker);
        loop {
            tokio::select! {
                                _ = shutdown.cancelled() => {
                    consumer.cancel().await;
                    control.cancel().await;
                    break 'connect;
                }
                next = control.next() => match next {
                    Some(Ok(inc)) => {
                        tracker.spawn(handle(
                            ctx.clone(),
                            Queue::Control,
                            inc,
                            publisher.clone(),
                            settings.requeue_delay,
                            settings.retries_in_place,
                            shutdown.clone(),
                        ));
                    }
                    _ => {
                        tracing::warn!("control consumer ended; reconnecting");
                        break;
                    }
                },
                next = consumer.next() => match next {
                    Some(Ok(inc)) => {
                                                tracker.spawn(handle(
                            ctx.clone(),
                            Queue::Triggers,
                            inc,
                            publisher.clone(),
                            settings.requeue_delay,
                            settings.retries_in_place,
                            shutdown.clone(),
                        ));
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "trigger consumer failed; reconnecting");
                        break;
                    }
                    None => {
                        tracing::warn!("trigger consumer ended; reconnecting");
                        break;
                    }
                }
            }
        }
    }
    tracker.close();
    if tokio::time::timeout(settings.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = tracker.len(),
            "drain timed out; unfinished deliveries will be redelivered"
        );
    }
    if let Some(b) = current {
        b.close().await;
    }
    tracing::info!("trigger consumer stopped");
}
