//! The queues and exchanges runbridge declares, and their arguments.

use super::*;

/// A durable quorum queue's arguments.
pub(super) fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// The dead-letter queue's: its configured type, no delivery limit (a dead
/// letter is never dropped for having been looked at).
pub(super) fn dead_letter_args(s: &BrokerSettings) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(s.dead_letter_queue_type.as_str().into()),
    );
    args
}

/// The trigger queue's: quorum, the delivery limit, dead letters to the DLX.
pub(super) fn triggers_args(s: &BrokerSettings) -> FieldTable {
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
pub(super) fn control_args(s: &BrokerSettings) -> FieldTable {
    let mut args = quorum_args();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(s.dead_letter_exchange.as_str().into()),
    );
    args
}

impl Broker {
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
    pub(super) async fn declare_dead_letter_queue(
        &self,
        ch: Channel,
    ) -> Result<Channel, BrokerError> {
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

    /// A queue's message and consumer counts (a passive declare: nothing
    /// changes; an error if the queue does not exist).
    pub(super) async fn inspect_queue(&self, queue: &str) -> Result<lapin::Queue, BrokerError> {
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

    pub(super) async fn declare_bound_queue_with(
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
