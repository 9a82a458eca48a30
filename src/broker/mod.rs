//! RabbitMQ, through lapin: the only module that imports lapin.
//!
//! It declares the topology of docs/contracts.md, turns deliveries into plain
//! [`Envelope`]s with an [`Incoming`] handle to settle them, and publishes
//! with publisher confirms: [`Publisher::publish`] returns only once the
//! broker confirmed the message with no `basic.return`.
//!
//! Reconnection is the caller's loop: every long-running task (trigger
//! consumer, relay) owns its connection, and on any connection error drops it
//! and connects again with backoff. Deliveries that were in flight are
//! redelivered by the broker, which the worker's steps are built to absorb.

mod check;
mod connect;
mod consume;
mod dead_letters;
mod publish;
mod topology;

use std::time::Duration;

pub use crate::config::QueueType;
pub use check::{Found, TopologyFinding};
pub use connect::Broker;
pub use consume::{EventListener, Incoming, ReceivedEvent, TriggerConsumer};
pub use dead_letters::{DeadLetter, DeadLetterQueue, PREVIEW_BYTES};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
pub use publish::Publisher;
use secrecy::{ExposeSecret, SecretString};

use crate::domain::{CompletionEvent, Envelope};
use crate::redact::redact_url;

pub const ERROR_HEADER: &str = "x-runbridge-error";

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot connect to RabbitMQ at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("rabbitmq: {0}")]
    Amqp(String),
    /// The broker confirmed but returned the message: no queue is bound for it.
    #[error("unroutable: exchange {exchange:?} has no queue bound for routing key {routing_key:?}")]
    Returned {
        exchange: String,
        routing_key: String,
    },
    #[error("the broker refused the message (nack)")]
    Nacked,
}

fn amqp(e: lapin::Error) -> BrokerError {
    BrokerError::Amqp(e.to_string())
}

#[derive(Clone)]
pub struct BrokerSettings {
    pub url: SecretString,
    /// Other nodes of the same cluster (`amqp.urls`): a connect tries the
    /// node that answered last first, then the others in order, so losing a
    /// node moves every process to the next one.
    pub fallback_urls: Vec<SecretString>,
    /// Which of `url` + `fallback_urls` answered last (shared by clones).
    pub last_node: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub triggers_queue: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub events_exchange: String,
    /// Operator commands (`{"action":"cancel",...}`).
    pub control_queue: String,
    pub delivery_limit: u32,
    pub prefetch: u16,
    /// The dead-letter queue's type (`amqp.dead_letter_queue_type`).
    pub dead_letter_queue_type: QueueType,
    pub connection_name: String,
    /// With `amqps://`: a PEM file of the CA(s) to trust instead of the
    /// system's roots (empty: the system's). Read at each connect, so a
    /// renewed CA file is picked up on reconnection.
    pub tls_ca_file: String,
}

impl std::fmt::Debug for BrokerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerSettings")
            .field("url", &redact_url(self.url.expose_secret()))
            .field("triggers_queue", &self.triggers_queue)
            .field("events_exchange", &self.events_exchange)
            .finish_non_exhaustive()
    }
}

fn header_str(props: &BasicProperties, name: &str) -> Option<String> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        // Broker-set counters such as a quorum queue's `x-delivery-count`.
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        AMQPValue::LongUInt(n) => Some(n.to_string()),
        _ => None,
    }
}

/// W3C trace context as the `traceparent` header, on events and on
/// triggers published with one.
fn with_traceparent(props: BasicProperties, traceparent: Option<&str>) -> BasicProperties {
    match traceparent {
        Some(tp) => {
            let mut h = FieldTable::default();
            h.insert("traceparent".into(), AMQPValue::LongString(tp.into()));
            props.with_headers(h)
        }
        None => props,
    }
}
