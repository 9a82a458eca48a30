//! A producer: publish one trigger and wait for its completion event on a
//! private reply queue (`reply_to` + `correlation_id`), as a backend would.
//!
//! ```text
//! cargo run --example produce_and_wait -- 101 '{"date": "2026-11-23"}'
//! ```
//! With a third argument, a list of parameter sets, it publishes a parent
//! trigger instead: the job runs once per set (laid over the parameters),
//! at most 5 at a time, and the one answer carries every value in order
//! (or names the child that failed; the others are then cancelled):
//! ```text
//! cargo run --example produce_and_wait -- 101 '{"env": "prod"}' '[{"date": "2026-11-01"}, {"date": "2026-11-02"}]'
//! ```
//! (`make demo` starts a worker, a sidecar and the emulator with job 101.)
//! Environment: `AMQP_URL` (default the local broker), `TRIGGERS_QUEUE`
//! (default `runbridge.triggers`).

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let job_id: u64 = args.next().unwrap_or_else(|| "101".into()).parse()?;
    let params: serde_json::Value =
        serde_json::from_str(&args.next().unwrap_or_else(|| "{}".into()))?;
    let for_each: Option<serde_json::Value> =
        args.next().map(|a| serde_json::from_str(&a)).transpose()?;
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let queue = std::env::var("TRIGGERS_QUEUE").unwrap_or_else(|_| "runbridge.triggers".into());

    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    // A server-named, exclusive queue for the answer.
    let reply = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut answers = ch
        .basic_consume(
            reply.name().as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;

    // The id makes the trigger idempotent: publish it again (after a lost
    // confirm, a crash) and runbridge starts nothing new.
    let id = format!("example-{}", std::process::id());
    let mut body = serde_json::json!({
        "id": id,
        "job_id": job_id,
        "job_parameters": params,
        "timeout_seconds": 3600,
        "tags": {"source": "produce_and_wait"},
    });
    if let Some(sets) = for_each {
        // A parent trigger: children <id>/0, <id>/1, ... joined by "all".
        body["for_each"] = sets;
        body["max_concurrency"] = 5.into();
    }
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &serde_json::to_vec(&body)?,
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_reply_to(reply.name().clone())
                .with_correlation_id(id.as_str().into()),
        )
        .await?
        .await?;
    if !confirm.is_ack() {
        return Err("the broker did not accept the trigger".into());
    }
    println!("published {id}; waiting for its event");

    while let Some(d) = answers.next().await {
        let d = d?;
        if d.properties.correlation_id().as_ref().map(|c| c.as_str()) != Some(id.as_str()) {
            continue; // not ours
        }
        let event: serde_json::Value = serde_json::from_slice(&d.data)?;
        println!("{}", serde_json::to_string_pretty(&event)?);
        break;
    }
    conn.close(200, "done".into()).await?;
    Ok(())
}
