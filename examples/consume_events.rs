//! A downstream consumer: a durable queue bound to `runbridge.events`,
//! processing each completion event once. Events are delivered at least once
//! (a relay that crashes between the broker's confirm and its outbox ack
//! publishes again), always with the same `message_id` (`<promise id>/<state>`),
//! so deduplicating by it makes the processing exactly-once.
//!
//! ```text
//! cargo run --example consume_events -- 'promise.#'
//! ```
//! Environment: `AMQP_URL`, `EVENTS_EXCHANGE` (default `runbridge.events`),
//! `QUEUE` (default `example.events`).

use std::collections::HashSet;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let binding = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "promise.#".into());
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let exchange = std::env::var("EVENTS_EXCHANGE").unwrap_or_else(|_| "runbridge.events".into());
    let queue = std::env::var("QUEUE").unwrap_or_else(|_| "example.events".into());

    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(32, BasicQosOptions::default()).await?;
    // Durable: events published while this consumer is down wait for it.
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        binding.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let mut deliveries = ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    println!("consuming {binding} from {exchange} via {queue}");

    // In production this set lives where the processing's effects live (a
    // unique key in the same database transaction), not in memory.
    let mut seen: HashSet<String> = HashSet::new();
    while let Some(d) = deliveries.next().await {
        let d = d?;
        let id = d
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned())
            .unwrap_or_default();
        if seen.insert(id.clone()) {
            let event: serde_json::Value = serde_json::from_slice(&d.data)?;
            println!(
                "{id}: {} (run {}, settled by {})",
                event["data"]["state"], event["data"]["run_id"], event["data"]["settled_by"]
            );
        } else {
            println!("{id}: duplicate delivery, skipped");
        }
        // Ack after processing: a crash before this redelivers, and the
        // message id catches the repeat.
        d.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}
