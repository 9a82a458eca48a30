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

use std::time::Duration;

pub use check::{Found, TopologyFinding};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
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

/// A RabbitMQ queue type, as `x-queue-type` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// Not replicated, durable on its node; a message returned unacked
    /// keeps its place and gains no delivery count, so the console can
    /// browse it for free.
    Classic,
    /// Replicated (Raft). Before RabbitMQ 4.3 every return of a message,
    /// browsing included, raises its delivery count.
    Quorum,
}

impl QueueType {
    fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// A durable quorum queue's arguments.
fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// The dead-letter queue's: its configured type, no delivery limit (a dead
/// letter is never dropped for having been looked at).
fn dead_letter_args(s: &BrokerSettings) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(s.dead_letter_queue_type.as_str().into()),
    );
    args
}

/// The trigger queue's: quorum, the delivery limit, dead letters to the DLX.
fn triggers_args(s: &BrokerSettings) -> FieldTable {
    let mut args = quorum_args();
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(i64::from(s.delivery_limit)),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(s.dead_letter_exchange.as_str().into()),
    );
    args
}

/// The control queue's: quorum, dead letters to the DLX.
fn control_args(s: &BrokerSettings) -> FieldTable {
    let mut args = quorum_args();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(s.dead_letter_exchange.as_str().into()),
    );
    args
}

/// One connection to the broker.
pub struct Broker {
    conn: Connection,
    settings: BrokerSettings,
    /// Every channel opened on `conn`, so that [`Broker::close`] closes
    /// them (and waits for the broker to confirm) before the connection: a
    /// channel still closing when the connection goes makes lapin log an
    /// error for what is a clean stop.
    channels: std::sync::Mutex<Vec<Channel>>,
}

impl Broker {
    /// A new channel on this connection, closed by [`Broker::close`].
    async fn channel(&self) -> Result<Channel, lapin::Error> {
        let ch = self.conn.create_channel().await?;
        if let Ok(mut open) = self.channels.lock() {
            open.retain(|c| c.status().connected());
            open.push(ch.clone());
        }
        Ok(ch)
    }

    /// Connects to the node that answered last, else to the next ones in
    /// turn; the error names every node tried (passwords redacted).
    pub async fn connect(settings: &BrokerSettings) -> Result<Self, BrokerError> {
        use std::sync::atomic::Ordering;
        let urls: Vec<&SecretString> = std::iter::once(&settings.url)
            .chain(&settings.fallback_urls)
            .collect();
        let first = settings.last_node.load(Ordering::Relaxed) % urls.len();
        let mut failures = Vec::new();
        for i in (0..urls.len()).map(|k| (first + k) % urls.len()) {
            match Self::connect_to(settings, urls[i]).await {
                Ok(b) => {
                    if i != first {
                        tracing::info!(node = %redact_url(urls[i].expose_secret()), "connected to another broker node");
                    }
                    settings.last_node.store(i, Ordering::Relaxed);
                    return Ok(b);
                }
                Err(e) => failures.push(e),
            }
        }
        Err(match failures.len() {
            1 => failures.remove(0),
            _ => BrokerError::Connect {
                url: format!("{} nodes", failures.len()),
                reason: failures
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            },
        })
    }

    async fn connect_to(
        settings: &BrokerSettings,
        url: &SecretString,
    ) -> Result<Self, BrokerError> {
        let props = ConnectionProperties::default()
            .with_connection_name(settings.connection_name.clone().into());
        let failed = |reason: String| BrokerError::Connect {
            url: redact_url(url.expose_secret()),
            reason,
        };
        let tls =
            OwnedTLSConfig {
                identity: None,
                cert_chain: match settings.tls_ca_file.as_str() {
                    "" => None,
                    path => Some(std::fs::read_to_string(path).map_err(|e| {
                        failed(format!("cannot read amqp.tls_ca_file {path:?}: {e}"))
                    })?),
                },
            };
        let runtime = lapin::runtime::default_runtime().map_err(|e| failed(e.to_string()))?;
        let conn = tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect_with_config(url.expose_secret(), props, tls, runtime),
        )
        .await
        .map_err(|_| failed("timed out after 10s".into()))?
        .map_err(|e| failed(e.to_string()))?;
        Ok(Self {
            conn,
            settings: settings.clone(),
            channels: Default::default(),
        })
    }

    /// Declares the trigger queue (quorum, delivery limit, dead-lettering),
    /// the dead-letter exchange and queue, and the events exchange. Safe to
    /// repeat; a queue declared earlier with other arguments is a clear error.
    pub async fn declare_topology(&self) -> Result<(), BrokerError> {
        let s = &self.settings;
        let ch = self.channel().await.map_err(amqp)?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare(
            s.dead_letter_exchange.as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(amqp)?;
        ch.exchange_declare(
            s.events_exchange.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(amqp)?;
        let ch = self.declare_dead_letter_queue(ch).await?;
        ch.queue_declare(
            s.triggers_queue.as_str().into(),
            QueueDeclareOptions::durable(),
            triggers_args(s),
        )
        .await
        .map_err(|e| {
            BrokerError::Amqp(format!(
                "declaring {:?} (an existing queue with other arguments must be deleted or renamed): {e}",
                s.triggers_queue
            ))
        })?;
        ch.queue_declare(
            s.control_queue.as_str().into(),
            QueueDeclareOptions::durable(),
            control_args(s),
        )
        .await
        .map_err(amqp)?;
        let _ = ch.close(200, "topology declared".into()).await;
        Ok(())
    }

    /// The dead-letter queue and its binding, on `ch`; the channel to go on
    /// with (the broker closes one that a declaration failed on).
    async fn declare_dead_letter_queue(&self, ch: Channel) -> Result<Channel, BrokerError> {
        let s = &self.settings;
        let queue = s.dead_letter_queue.as_str();
        // A classic queue lives on one node: with that node down it can be
        // neither declared nor bound, and RabbitMQ drops what is
        // dead-lettered meanwhile. Triggers and events must not wait for it.
        let node_down = |e: &lapin::Error| e.to_string().contains("down or inaccessible");
        let ch = match ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::durable(),
                dead_letter_args(s),
            )
            .await
        {
            Ok(_) => ch,
            // It exists with other arguments: an earlier version declared it
            // a quorum queue. Dead letters stay where they are.
            Err(e) if e.to_string().contains("PRECONDITION_FAILED") => {
                tracing::warn!(
                    queue,
                    wanted = s.dead_letter_queue_type.as_str(),
                    "the dead-letter queue exists with another type and is used as it is; on a quorum queue before RabbitMQ 4.3 each view in the console raises its messages' delivery counts (runbridge check says how to change it)"
                );
                self.channel().await.map_err(amqp)?
            }
            Err(e) if node_down(&e) => {
                tracing::warn!(queue, error = %e, "the dead-letter queue's node is down: until it is back, RabbitMQ drops what is dead-lettered (a quorum dead-letter queue, amqp.dead_letter_queue_type, is replicated)");
                return self.channel().await.map_err(amqp);
            }
            Err(e) => return Err(amqp(e)),
        };
        match ch
            .queue_bind(
                queue.into(),
                s.dead_letter_exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            Ok(()) => Ok(ch),
            Err(e) if node_down(&e) => {
                tracing::warn!(queue, error = %e, "the dead-letter queue's node is down: until it is back, RabbitMQ drops what is dead-lettered");
                self.channel().await.map_err(amqp)
            }
            Err(e) => Err(amqp(e)),
        }
    }

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

    async fn consume_acked(
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

    /// A channel in confirm mode.
    pub async fn publisher(&self) -> Result<Publisher, BrokerError> {
        let ch = self.channel().await.map_err(amqp)?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp)?;
        Ok(Publisher {
            channel: ch,
            events_exchange: self.settings.events_exchange.clone(),
            dead_letter_exchange: self.settings.dead_letter_exchange.clone(),
            triggers_queue: self.settings.triggers_queue.clone(),
        })
    }

    pub fn is_connected(&self) -> bool {
        self.conn.status().connected()
    }

    /// Closes every channel it opened, then the connection.
    pub async fn close(&self) {
        let open: Vec<Channel> = self
            .channels
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default();
        for ch in open.iter().filter(|c| c.status().connected()) {
            let _ = ch.close(200, "shutting down".into()).await;
        }
        let _ = self.conn.close(200, "shutting down".into()).await;
    }
}

pub struct TriggerConsumer {
    channel: Channel,
    consumer: lapin::Consumer,
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

/// One trigger delivery: its envelope and what the worker decides about it.
pub struct Incoming {
    pub envelope: Envelope,
    pub redelivered: bool,
    delivery: Delivery,
}

impl Incoming {
    fn from_delivery(d: Delivery) -> Self {
        let p = &d.properties;
        let s = |v: &Option<ShortString>| v.as_ref().map(|s| s.as_str().to_owned());
        let envelope = Envelope {
            body: d.data.clone(),
            message_id: s(p.message_id()),
            reply_to: s(p.reply_to()),
            correlation_id: s(p.correlation_id()),
            traceparent: header_str(p, "traceparent"),
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

/// A confirm-mode channel.
pub struct Publisher {
    channel: Channel,
    events_exchange: String,
    dead_letter_exchange: String,
    triggers_queue: String,
}

impl Publisher {
    async fn raw_publish(
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

    fn event_props(e: &CompletionEvent) -> BasicProperties {
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

/// A private, exclusive, auto-delete queue bound to the events exchange, for
/// `trigger --wait` and tests: receives what consumers of the exchange receive.
pub struct EventListener {
    _channel: Channel,
    consumer: lapin::Consumer,
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
    /// String-valued headers (e.g. `x-runbridge-error`, `traceparent`).
    pub headers: std::collections::BTreeMap<String, String>,
    /// `x-delivery-count`: how often a quorum queue delivered the message
    /// before without it being acked (`None`: never, or not a quorum queue).
    pub delivery_count: Option<i64>,
    /// The broker's `redelivered` flag.
    pub redelivered: bool,
    pub body: Vec<u8>,
}

impl Broker {
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
    async fn listen_on(ch: Channel, queue: &str) -> Result<EventListener, BrokerError> {
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

    /// A queue's message and consumer counts (a passive declare: nothing
    /// changes; an error if the queue does not exist).
    async fn inspect_queue(&self, queue: &str) -> Result<lapin::Queue, BrokerError> {
        let ch = self.channel().await.map_err(amqp)?;
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(amqp);
        let _ = ch.close(200, "inspected".into()).await;
        q
    }

    /// How many consumers a queue has.
    pub async fn consumer_count(&self, queue: &str) -> Result<u32, BrokerError> {
        Ok(self.inspect_queue(queue).await?.consumer_count())
    }

    pub fn events_exchange(&self) -> &str {
        &self.settings.events_exchange
    }

    /// Consumes an existing queue (auto-ack), e.g. the dead-letter queue.
    pub async fn consume_queue(&self, queue: &str) -> Result<EventListener, BrokerError> {
        let ch = self.channel().await.map_err(amqp)?;
        Self::listen_on(ch, queue).await
    }

    /// Declares a durable queue bound to `exchange` with `binding`: a
    /// consumer's event queue, which keeps events while nobody is connected.
    pub async fn declare_bound_queue(
        &self,
        queue: &str,
        exchange: &str,
        binding: &str,
    ) -> Result<(), BrokerError> {
        self.declare_bound_queue_with(queue, exchange, binding, FieldTable::default())
            .await
    }

    /// The same as a quorum queue, which survives the loss of a minority of
    /// a cluster's nodes.
    pub async fn declare_bound_quorum_queue(
        &self,
        queue: &str,
        exchange: &str,
        binding: &str,
    ) -> Result<(), BrokerError> {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        self.declare_bound_queue_with(queue, exchange, binding, args)
            .await
    }

    async fn declare_bound_queue_with(
        &self,
        queue: &str,
        exchange: &str,
        binding: &str,
        args: FieldTable,
    ) -> Result<(), BrokerError> {
        let ch = self.channel().await.map_err(amqp)?;
        ch.queue_declare(queue.into(), QueueDeclareOptions::durable(), args)
            .await
            .map_err(amqp)?;
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            binding.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp)?;
        let _ = ch.close(200, "declared".into()).await;
        Ok(())
    }

    /// Deletes the queues and exchanges of this topology (test clean-up,
    /// decommissioning). Messages in them are lost: never on a live deployment.
    pub async fn delete_topology(&self, extra_queues: &[&str]) -> Result<(), BrokerError> {
        let s = &self.settings;
        let ch = self.channel().await.map_err(amqp)?;
        for q in [
            s.triggers_queue.as_str(),
            s.dead_letter_queue.as_str(),
            s.control_queue.as_str(),
        ]
        .into_iter()
        .chain(extra_queues.iter().copied())
        {
            ch.queue_delete(q.into(), Default::default())
                .await
                .map_err(amqp)?;
        }
        for x in [s.events_exchange.as_str(), s.dead_letter_exchange.as_str()] {
            ch.exchange_delete(x.into(), Default::default())
                .await
                .map_err(amqp)?;
        }
        let _ = ch.close(200, "deleted".into()).await;
        Ok(())
    }
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
            delivery_count: d.properties.headers().as_ref().and_then(|h| {
                match h.inner().get("x-delivery-count")? {
                    AMQPValue::LongLongInt(n) => Some(*n),
                    AMQPValue::LongInt(n) => Some(i64::from(*n)),
                    AMQPValue::ShortInt(n) => Some(i64::from(*n)),
                    AMQPValue::LongUInt(n) => Some(i64::from(*n)),
                    _ => None,
                }
            }),
            redelivered: d.redelivered,
            body: d.data,
        })
    }
}

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

fn fingerprint(body: &[u8], error: Option<&str>) -> String {
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
    broker: Broker,
    channel: Channel,
    consumer: lapin::Consumer,
}

impl DeadLetterWalk {
    async fn start(settings: &BrokerSettings, limit: usize) -> Result<Self, BrokerError> {
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
    async fn next(&mut self) -> Option<(Delivery, DeadLetter)> {
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
