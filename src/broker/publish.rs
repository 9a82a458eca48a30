//! Publishing with confirms: a publish counts only once the broker
//! confirmed it and returned nothing.

use super::*;

/// A confirm-mode channel.
pub struct Publisher {
    pub(super) channel: Channel,
    pub(super) events_exchange: String,
    pub(super) dead_letter_exchange: String,
    pub(super) triggers_queue: String,
}

impl Publisher {
    /// Closes its channel (a publisher made for one message, on a
    /// connection that stays open).
    pub async fn close(&self) {
        let _ = self.channel.close(200, "published".into()).await;
    }

    pub(super) async fn raw_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
        mandatory: bool,
    ) -> Result<(), BrokerError> {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory,
                    ..Default::default()
                },
                body,
                props,
            )
            .await
            .map_err(amqp)?
            .await
            .map_err(amqp)?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(BrokerError::Returned {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
            }),
            Confirmation::Nack(_) => Err(BrokerError::Nacked),
            Confirmation::NotRequested => {
                Err(BrokerError::Amqp("channel is not in confirm mode".into()))
            }
        }
    }

    pub(super) fn event_props(e: &CompletionEvent) -> BasicProperties {
        let props = BasicProperties::default()
            .with_message_id(e.id.as_str().into())
            .with_content_type(crate::domain::event::CONTENT_TYPE.into())
            .with_delivery_mode(2)
            .with_type(
                format!(
                    "io.runbridge.promise.{}",
                    e.state.as_str().to_ascii_lowercase()
                )
                .into(),
            );
        with_traceparent(props, e.traceparent.as_deref())
    }

    /// Publishes a completion event to the events exchange (mandatory,
    /// persistent, confirmed, `message_id` = event id).
    pub async fn publish_event(&self, e: &CompletionEvent) -> Result<(), BrokerError> {
        self.raw_publish(
            &self.events_exchange,
            &e.routing_key,
            &e.body,
            Self::event_props(e),
            true,
        )
        .await
    }

    /// Publishes another kind of event (an audit finding) to the events
    /// exchange: persistent, mandatory, confirmed, `message_id` = `id`.
    pub async fn publish_other_event(
        &self,
        routing_key: &str,
        id: &str,
        kind: &str,
        body: &[u8],
    ) -> Result<(), BrokerError> {
        let props = BasicProperties::default()
            .with_message_id(id.into())
            .with_content_type(crate::domain::event::CONTENT_TYPE.into())
            .with_delivery_mode(2)
            .with_type(kind.into());
        self.raw_publish(&self.events_exchange, routing_key, body, props, true)
            .await
    }

    /// Sends the event to the trigger's `reply_to` queue with its
    /// `correlation_id` (RPC over RabbitMQ). `Ok(false)` if it has none.
    pub async fn publish_reply(&self, e: &CompletionEvent) -> Result<bool, BrokerError> {
        let Some(reply_to) = &e.reply_to else {
            return Ok(false);
        };
        let mut props = Self::event_props(e);
        if let Some(c) = &e.correlation_id {
            props = props.with_correlation_id(c.as_str().into());
        }
        self.raw_publish("", reply_to, &e.body, props, true).await?;
        Ok(true)
    }

    /// Publishes an operator command to the control queue.
    pub async fn publish_control(&self, queue: &str, body: &[u8]) -> Result<(), BrokerError> {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        self.raw_publish("", queue, body, props, true).await
    }

    /// Publishes a trigger (the `trigger` CLI and tests).
    pub async fn publish_trigger(
        &self,
        body: &[u8],
        message_id: Option<&str>,
        reply_to: Option<&str>,
        correlation_id: Option<&str>,
    ) -> Result<(), BrokerError> {
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        if let Some(m) = message_id {
            props = props.with_message_id(m.into());
        }
        if let Some(r) = reply_to {
            props = props.with_reply_to(r.into());
        }
        if let Some(c) = correlation_id {
            props = props.with_correlation_id(c.into());
        }
        self.raw_publish("", &self.triggers_queue, body, props, true)
            .await
    }

    /// Publishes a trigger carrying a W3C `traceparent` header (the trace
    /// the promise, the Databricks request and the event then continue).
    pub async fn publish_trigger_traced(
        &self,
        body: &[u8],
        traceparent: &str,
    ) -> Result<(), BrokerError> {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let props = with_traceparent(props, Some(traceparent));
        self.raw_publish("", &self.triggers_queue, body, props, true)
            .await
    }

    pub fn is_connected(&self) -> bool {
        self.channel.status().connected()
    }
}
