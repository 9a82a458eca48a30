//! The dead-letter queue for the console: count, browse (every message
//! returned in place with one nack), republish-then-ack.

use std::sync::Arc;

use super::*;

/// What a browse keeps of a body: a dead letter may be a trigger refused
/// for its size (1 MiB and more, kept intact), and a page lists many.
pub const PREVIEW_BYTES: usize = 4096;

/// A message in the dead-letter queue, as the operator console shows it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Identifies the message for a later republish: SHA-256 of its body
    /// and why it was refused (two identical dead letters are interchangeable).
    pub fingerprint: String,
    pub message_id: Option<String>,
    /// The `x-runbridge-error` header (absent: the delivery limit was passed).
    pub error: Option<String>,
    /// The body's first [`PREVIEW_BYTES`] as text (lossy for bytes that
    /// are not UTF-8); the whole of it when `size` is no larger.
    pub body: String,
    /// The body's size in bytes.
    pub size: usize,
}

impl DeadLetter {
    /// Is `body` the whole body?
    pub fn is_whole(&self) -> bool {
        self.size <= PREVIEW_BYTES
    }
}

pub(super) fn fingerprint(body: &[u8], error: Option<&str>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(body);
    h.update([0u8]);
    h.update(error.unwrap_or("").as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// The console's way to the dead-letter queue: one AMQP connection, kept
/// between views (the overview counts dead letters on every refresh) and
/// opened again once lost, and one walk at a time.
pub struct DeadLetterQueue {
    settings: BrokerSettings,
    connection: tokio::sync::Mutex<Option<Arc<Broker>>>,
    /// A walk holds what it took unacked until it ends, so two at once would
    /// each see the queue without what the other holds (concurrent views
    /// showed 0, 3, 1, 1, 1, 0 of six letters).
    walking: tokio::sync::Mutex<()>,
}

impl DeadLetterQueue {
    pub fn new(settings: BrokerSettings) -> Self {
        Self {
            settings,
            connection: tokio::sync::Mutex::new(None),
            walking: tokio::sync::Mutex::new(()),
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.settings.dead_letter_queue
    }

    /// The kept connection, or a new one when there is none or it was lost.
    async fn broker(&self) -> Result<Arc<Broker>, BrokerError> {
        let mut kept = self.connection.lock().await;
        if let Some(b) = kept.as_ref().filter(|b| b.is_connected()) {
            return Ok(b.clone());
        }
        if let Some(lost) = kept.take() {
            tracing::warn!(status = ?lost.conn.status(), "console: the dead-letter queue's connection was lost; opening another");
            // Bounded: a connection that is gone may never confirm a close.
            let _ = tokio::time::timeout(Duration::from_secs(2), lost.close()).await;
        }
        let b = Arc::new(Broker::connect(&self.settings).await?);
        *kept = Some(b.clone());
        Ok(b)
    }

    /// Closes the kept connection (at shutdown).
    pub async fn close(&self) {
        if let Some(b) = self.connection.lock().await.take() {
            b.close().await;
        }
    }

    /// Messages in the dead-letter queue.
    pub async fn count(&self) -> Result<u32, BrokerError> {
        let b = self.broker().await?;
        Ok(b.inspect_queue(self.name()).await?.message_count())
    }

    async fn walk(&self) -> Result<DeadLetterWalk<'_>, BrokerError> {
        let turn = self.walking.lock().await;
        let broker = self.broker().await?;
        let channel = broker.channel().await.map_err(amqp)?;
        Ok(DeadLetterWalk {
            channel,
            queue: self.name(),
            _turn: turn,
        })
    }

    /// Up to `limit` dead letters, left in the queue, each with a preview of
    /// its body.
    pub async fn browse(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        let mut walk = self.walk().await?;
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

    /// Publishes `body` to the trigger queue in place of the dead letter
    /// with this fingerprint (its message id, reply_to, correlation_id and
    /// traceparent kept; persistent; confirmed), and only then acks the
    /// dead letter. `body`: the new body, or `None` to publish the message's
    /// own. `false` when no dead letter has that fingerprint any more.
    pub async fn republish(&self, wanted: &str, body: Option<&[u8]>) -> Result<bool, BrokerError> {
        let mut walk = self.walk().await?;
        let publisher = match self.broker().await?.publisher().await {
            Ok(p) => p,
            Err(e) => {
                walk.finish(None).await;
                return Err(e);
            }
        };
        let (found, passed_over) = walk.find(wanted).await;
        let outcome = match found {
            None => Ok(false),
            Some(d) => replace(&publisher, &self.settings, &walk.channel, &d, body).await,
        };
        walk.finish(passed_over).await;
        publisher.close().await;
        outcome
    }

    /// The whole body of the dead letter with this fingerprint, left in the
    /// queue; `None` when there is none any more.
    pub async fn body(&self, wanted: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        let mut walk = self.walk().await?;
        let (found, passed_over) = walk.find(wanted).await;
        let last = found.as_ref().map(|d| d.delivery_tag).or(passed_over);
        walk.finish(last).await;
        Ok(found.map(|d| d.data))
    }
}

/// A walk through the dead-letter queue without acknowledging anything:
/// [`DeadLetterWalk::finish`] closes the channel, and every message it did
/// not ack goes back to the queue. It takes one message at a time with
/// `basic.get` (a consumer's prefetch would bring every message of the walk
/// into memory at once, and dead letters may be large).
struct DeadLetterWalk<'a> {
    channel: Channel,
    queue: &'a str,
    /// This walk's turn ([`DeadLetterQueue::walking`]), held until it is dropped.
    _turn: tokio::sync::MutexGuard<'a, ()>,
}

impl DeadLetterWalk<'_> {
    /// Takes dead letters until the one with this fingerprint, looking at
    /// 1,000 at most: that one (not acked), and the tag of the last one
    /// passed over.
    async fn find(&mut self, wanted: &str) -> (Option<Delivery>, Option<u64>) {
        let mut passed_over = None;
        for _ in 0..1000 {
            let Some((d, letter)) = self.next().await else {
                break;
            };
            if letter.fingerprint == wanted {
                return (Some(d), passed_over);
            }
            passed_over = Some(d.delivery_tag);
        }
        (None, passed_over)
    }

    /// The next dead letter (the delivery, whole, for a republish), or
    /// `None` when the queue has no more that this walk has not taken.
    async fn next(&mut self) -> Option<(Delivery, DeadLetter)> {
        let got = self
            .channel
            .basic_get(self.queue.into(), BasicGetOptions { no_ack: false })
            .await;
        let Ok(Some(m)) = got else { return None };
        let d = m.delivery;
        let error = header_str(&d.properties, ERROR_HEADER);
        let mut end = d.data.len().min(PREVIEW_BYTES);
        // A preview ends on a character boundary where the text is UTF-8.
        while end > 0 && end < d.data.len() && (d.data[end] & 0xC0) == 0x80 {
            end -= 1;
        }
        let letter = DeadLetter {
            fingerprint: fingerprint(&d.data, error.as_deref()),
            message_id: d
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned()),
            error,
            body: String::from_utf8_lossy(&d.data[..end]).into_owned(),
            size: d.data.len(),
        };
        Some((d, letter))
    }

    /// Returns every message it did not ack with one `basic.nack` (requeue):
    /// on a classic queue they keep their places and no count changes; on a
    /// quorum queue from RabbitMQ 4.3 a nack does not count as a failed
    /// delivery (a channel closing with them unacked would, before 4.3).
    async fn finish(self, last_tag: Option<u64>) {
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
        // The connection stays for the next view; the channel goes.
        let _ = self.channel.close(200, "browsed".into()).await;
    }
}

/// Publishes the dead letter `d` (or `body` in its place) to the trigger
/// queue, confirmed, and only then acks it on the walk's channel.
async fn replace(
    publisher: &Publisher,
    settings: &BrokerSettings,
    channel: &Channel,
    d: &Delivery,
    body: Option<&[u8]>,
) -> Result<bool, BrokerError> {
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
    publisher
        .raw_publish(
            "",
            &settings.triggers_queue,
            body.unwrap_or(&d.data),
            props,
            true,
        )
        .await?;
    // Published and confirmed: only now is the dead letter removed.
    channel
        .basic_ack(d.delivery_tag, BasicAckOptions::default())
        .await
        .map(|_| true)
        .map_err(amqp)
}
