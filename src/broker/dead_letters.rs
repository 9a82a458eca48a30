//! The dead-letter queue for the console: count, browse (every message
//! returned in place with one nack), republish-then-ack.

use super::*;

/// A message in the dead-letter queue, as the operator console shows it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Identifies the message for a later republish: SHA-256 of its body
    /// and why it was refused (two identical dead letters are interchangeable).
    pub fingerprint: String,
    pub message_id: Option<String>,
    /// The `x-runbridge-error` header (absent: the delivery limit was passed).
    pub error: Option<String>,
    /// The body as text (lossy for bytes that are not UTF-8).
    pub body: String,
}

pub(super) fn fingerprint(body: &[u8], error: Option<&str>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(body);
    h.update([0u8]);
    h.update(error.unwrap_or("").as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// Messages in the dead-letter queue (`settings.dead_letter_queue`).
pub async fn dead_letter_count(settings: &BrokerSettings) -> Result<u32, BrokerError> {
    let b = Broker::connect(settings).await?;
    let q = b.inspect_queue(&settings.dead_letter_queue).await;
    b.close().await;
    Ok(q?.message_count())
}

/// A walk through the dead-letter queue without acknowledging anything:
/// [`DeadLetterWalk::finish`] closes the channel, and every message it did
/// not ack goes back to the queue.
struct DeadLetterWalk {
    pub(super) broker: Broker,
    pub(super) channel: Channel,
    pub(super) consumer: lapin::Consumer,
}

impl DeadLetterWalk {
    pub(super) async fn start(
        settings: &BrokerSettings,
        limit: usize,
    ) -> Result<Self, BrokerError> {
        let broker = Broker::connect(settings).await?;
        let channel = broker.channel().await.map_err(amqp)?;
        channel
            .basic_qos(limit.clamp(1, 1000) as u16, BasicQosOptions::default())
            .await
            .map_err(amqp)?;
        let consumer = channel
            .basic_consume(
                settings.dead_letter_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp)?;
        Ok(Self {
            broker,
            channel,
            consumer,
        })
    }

    /// The next dead letter, or `None` when the queue gives nothing more
    /// within a moment (browsing never waits for new ones).
    pub(super) async fn next(&mut self) -> Option<(Delivery, DeadLetter)> {
        let next = tokio::time::timeout(Duration::from_millis(300), self.consumer.next()).await;
        let Ok(Some(Ok(d))) = next else { return None };
        let error = header_str(&d.properties, ERROR_HEADER);
        let letter = DeadLetter {
            fingerprint: fingerprint(&d.data, error.as_deref()),
            message_id: d
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned()),
            error,
            body: String::from_utf8_lossy(&d.data).into_owned(),
        };
        Some((d, letter))
    }

    /// Returns every message it did not ack with one `basic.nack` (requeue):
    /// on a classic queue they keep their places and no count changes; on a
    /// quorum queue from RabbitMQ 4.3 a nack does not count as a failed
    /// delivery (a channel closing with them unacked would, before 4.3).
    pub(super) async fn finish(self, last_tag: Option<u64>) {
        if let Some(tag) = last_tag {
            let _ = self
                .channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await;
        }
        let _ = self.channel.close(200, "browsed".into()).await;
        self.broker.close().await;
    }
}

/// Up to `limit` dead letters, left in the queue.
pub async fn browse_dead_letters(
    settings: &BrokerSettings,
    limit: usize,
) -> Result<Vec<DeadLetter>, BrokerError> {
    let mut walk = DeadLetterWalk::start(settings, limit).await?;
    let mut seen = Vec::new();
    let mut last_tag = None;
    while seen.len() < limit {
        match walk.next().await {
            Some((d, letter)) => {
                last_tag = Some(d.delivery_tag);
                seen.push(letter);
            }
            None => break,
        }
    }
    walk.finish(last_tag).await;
    Ok(seen)
}

/// Publishes `body` to the trigger queue in place of the dead letter with
/// this fingerprint (its message id, reply_to, correlation_id and
/// traceparent kept; persistent; confirmed), and only then acks the dead
/// letter. `false` when no dead letter has that fingerprint any more.
pub async fn republish_dead_letter(
    settings: &BrokerSettings,
    wanted: &str,
    body: &[u8],
) -> Result<bool, BrokerError> {
    let publishing = Broker::connect(settings).await?;
    let publisher = publishing.publisher().await?;
    let mut walk = DeadLetterWalk::start(settings, 1000).await?;
    let mut outcome = Ok(false);
    let mut passed_over = None;
    for _ in 0..1000 {
        let Some((d, letter)) = walk.next().await else {
            break;
        };
        if letter.fingerprint != wanted {
            passed_over = Some(d.delivery_tag);
            continue;
        }
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        if let Some(m) = d.properties.message_id() {
            props = props.with_message_id(m.clone());
        }
        if let Some(r) = d.properties.reply_to() {
            props = props.with_reply_to(r.clone());
        }
        if let Some(c) = d.properties.correlation_id() {
            props = props.with_correlation_id(c.clone());
        }
        let props = with_traceparent(props, header_str(&d.properties, "traceparent").as_deref());
        outcome = match publisher
            .raw_publish("", &settings.triggers_queue, body, props, true)
            .await
        {
            // Published and confirmed: only now is the dead letter removed.
            Ok(()) => walk
                .channel
                .basic_ack(d.delivery_tag, BasicAckOptions::default())
                .await
                .map(|_| true)
                .map_err(amqp),
            Err(e) => Err(e),
        };
        break;
    }
    walk.finish(passed_over).await;
    publishing.close().await;
    outcome
}
