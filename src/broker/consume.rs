//! Consuming: triggers and control commands (acked by the worker through
//! [`Incoming`]), and listeners on the events exchange or any queue.

use super::*;

impl Broker {
    /// Starts consuming triggers with the configured prefetch.
    pub async fn consume_triggers(
        &self,
        consumer_tag: &str,
    ) -> Result<TriggerConsumer, BrokerError> {
        self.consume_acked(&self.settings.triggers_queue, consumer_tag)
            .await
    }

    /// Starts consuming operator commands from the control queue.
    pub async fn consume_control(
        &self,
        consumer_tag: &str,
    ) -> Result<TriggerConsumer, BrokerError> {
        self.consume_acked(&self.settings.control_queue, consumer_tag)
            .await
    }

    pub(super) async fn consume_acked(
        &self,
        queue: &str,
        consumer_tag: &str,
    ) -> Result<TriggerConsumer, BrokerError> {
        let ch = self.channel().await.map_err(amqp)?;
        ch.basic_qos(self.settings.prefetch, BasicQosOptions::default())
            .await
            .map_err(amqp)?;
        let consumer = ch
            .basic_consume(
                queue.into(),
                consumer_tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp)?;
        Ok(TriggerConsumer {
            channel: ch,
            consumer,
        })
    }

    /// Listens on the events exchange (`binding` e.g. `promise.#`), or with
    /// `exchange = None` on a fresh server-named queue only (a `reply_to` target).
    pub async fn listen(
        &self,
        exchange: Option<&str>,
        binding: &str,
    ) -> Result<EventListener, BrokerError> {
        let ch = self.channel().await.map_err(amqp)?;
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(amqp)?;
        let name = q.name().as_str().to_owned();
        if let Some(x) = exchange {
            ch.queue_bind(
                name.as_str().into(),
                x.into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp)?;
        }
        Self::listen_on(ch, &name).await
    }

    /// Auto-ack consumer on `queue`, owning its channel.
    pub(super) async fn listen_on(ch: Channel, queue: &str) -> Result<EventListener, BrokerError> {
        let consumer = ch
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(amqp)?;
        Ok(EventListener {
            _channel: ch,
            consumer,
            queue: queue.to_owned(),
        })
    }

    pub fn events_exchange(&self) -> &str {
        &self.settings.events_exchange
    }

    /// Consumes an existing queue (auto-ack), e.g. the dead-letter queue.
    pub async fn consume_queue(&self, queue: &str) -> Result<EventListener, BrokerError> {
        let ch = self.channel().await.map_err(amqp)?;
        Self::listen_on(ch, queue).await
    }
}

pub struct TriggerConsumer {
    pub(super) channel: Channel,
    pub(super) consumer: lapin::Consumer,
}

impl TriggerConsumer {
    /// The next delivery; `None` when the consumer or its connection ended
    /// (the caller reconnects).
    pub async fn next(&mut self) -> Option<Result<Incoming, BrokerError>> {
        match self.consumer.next().await? {
            Ok(d) => Some(Ok(Incoming::from_delivery(d))),
            Err(e) => Some(Err(amqp(e))),
        }
    }

    /// Stops new deliveries (shutdown); unacked ones go back to the queue
    /// when the channel closes.
    pub async fn cancel(&self) {
        let _ = self
            .channel
            .basic_cancel(self.consumer.tag(), Default::default())
            .await;
    }
}

/// One trigger delivery: its envelope and what the worker decides about it.
pub struct Incoming {
    pub envelope: Envelope,
    pub redelivered: bool,
    pub(super) delivery: Delivery,
}

impl Incoming {
    pub(super) fn from_delivery(d: Delivery) -> Self {
        let p = &d.properties;
        let s = |v: &Option<ShortString>| v.as_ref().map(|s| s.as_str().to_owned());
        let envelope = Envelope {
            body: d.data.clone(),
            message_id: s(p.message_id()),
            reply_to: s(p.reply_to()),
            correlation_id: s(p.correlation_id()),
            traceparent: crate::telemetry::kept_traceparent(header_str(p, "traceparent")),
        };
        Self {
            envelope,
            redelivered: d.redelivered,
            delivery: d,
        }
    }

    pub async fn ack(&self) -> Result<(), BrokerError> {
        self.delivery
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(amqp)
    }

    /// Back to the queue for another try (counts toward the delivery limit).
    pub async fn requeue(&self) -> Result<(), BrokerError> {
        self.delivery
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(amqp)
    }

    /// Copies the message to the dead-letter exchange with the reason in
    /// `x-runbridge-error` (confirmed), then acks the original.
    pub async fn dead_letter(
        &self,
        publisher: &Publisher,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let mut headers = self
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        headers.insert(
            ERROR_HEADER.into(),
            AMQPValue::LongString(reason.chars().take(1000).collect::<String>().into()),
        );
        let props = self
            .delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        publisher
            .raw_publish(
                &publisher.dead_letter_exchange,
                &publisher.triggers_queue,
                &self.delivery.data,
                props,
                false,
            )
            .await?;
        self.ack().await
    }
}

/// A private, exclusive, auto-delete queue bound to the events exchange, for
/// `trigger --wait` and tests: receives what consumers of the exchange receive.
pub struct EventListener {
    pub(super) _channel: Channel,
    pub(super) consumer: lapin::Consumer,
    pub queue: String,
}

/// An event as a listener received it.
#[derive(Debug, Clone)]
pub struct ReceivedEvent {
    pub routing_key: String,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub content_type: Option<String>,
    pub persistent: bool,
    /// Headers as text: strings (e.g. `x-runbridge-error`, `traceparent`)
    /// and broker counters (a quorum queue's `x-delivery-count`).
    pub headers: std::collections::BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl EventListener {
    pub async fn next(&mut self) -> Option<ReceivedEvent> {
        let d = self.consumer.next().await?.ok()?;
        let s = |v: &Option<ShortString>| v.as_ref().map(|s| s.as_str().to_owned());
        let headers = d
            .properties
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .keys()
                    .filter_map(|k| {
                        header_str(&d.properties, k.as_str()).map(|v| (k.as_str().to_owned(), v))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(ReceivedEvent {
            routing_key: d.routing_key.as_str().to_owned(),
            message_id: s(d.properties.message_id()),
            correlation_id: s(d.properties.correlation_id()),
            content_type: s(d.properties.content_type()),
            persistent: *d.properties.delivery_mode() == Some(2),
            headers,
            body: d.data,
        })
    }
}
