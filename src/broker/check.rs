//! `runbridge check`'s look at RabbitMQ: is the topology there, with the
//! arguments runbridge needs (quorum queues, the delivery limit, dead
//! letters to the DLX)? It changes nothing: a missing queue is reported,
//! not declared, and an existing one is re-declared only with exactly the
//! arguments it must already have, which RabbitMQ refuses (406
//! PRECONDITION_FAILED) when they differ, and otherwise leaves as it is.

use lapin::ExchangeKind;
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

use super::Broker;
use super::topology::{control_args, dead_letter_args, triggers_args};

/// One object of the topology and what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyFinding {
    /// e.g. `queue runbridge.triggers`
    pub object: String,
    pub state: Found,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Present, with runbridge's arguments.
    Ready,
    /// Not declared yet: a worker declares it when it starts.
    Missing,
    /// Present with other arguments (or not checkable): must change.
    Wrong,
}

impl Broker {
    /// Each exchange and queue of the configured topology, checked.
    pub async fn check_topology(&self) -> Vec<TopologyFinding> {
        let s = &self.settings;
        let mut out = Vec::new();
        for (name, kind) in [
            (&s.dead_letter_exchange, ExchangeKind::Fanout),
            (&s.events_exchange, ExchangeKind::Topic),
        ] {
            out.push(self.check_exchange(name, kind).await);
        }
        let queues: [(&String, FieldTable, String); 3] = [
            (
                &s.triggers_queue,
                triggers_args(s),
                format!(
                    "quorum, delivery limit {}, dead letters to {}",
                    s.delivery_limit, s.dead_letter_exchange
                ),
            ),
            (
                &s.dead_letter_queue,
                dead_letter_args(s),
                s.dead_letter_queue_type.as_str().into(),
            ),
            (
                &s.control_queue,
                control_args(s),
                format!("quorum, dead letters to {}", s.dead_letter_exchange),
            ),
        ];
        for (name, args, want) in queues {
            out.push(self.check_queue(name, args, want).await);
        }
        out
    }

    /// Whether the events exchange is declared (a passive declare, which
    /// needs no configure permission): until a worker has declared it, an
    /// event and a trigger's reply have nowhere to go.
    pub async fn events_exchange_declared(&self) -> bool {
        let s = &self.settings;
        self.check_exchange(&s.events_exchange, ExchangeKind::Topic)
            .await
            .state
            == Found::Ready
    }

    async fn check_exchange(&self, name: &str, kind: ExchangeKind) -> TopologyFinding {
        let object = format!("exchange {name}");
        let Ok(ch) = self.channel().await else {
            return TopologyFinding {
                object,
                state: Found::Wrong,
                detail: "no channel".into(),
            };
        };
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let r = ch
            .exchange_declare(name.into(), kind, passive, FieldTable::default())
            .await;
        let _ = ch.close(200, "checked".into()).await;
        match r {
            Ok(()) => TopologyFinding {
                object,
                state: Found::Ready,
                detail: "present".into(),
            },
            Err(_) => TopologyFinding {
                object,
                state: Found::Missing,
                detail: "not declared yet: a runbridge worker declares it when it starts".into(),
            },
        }
    }

    async fn check_queue(&self, name: &str, args: FieldTable, want: String) -> TopologyFinding {
        let object = format!("queue {name}");
        let fail = |detail: String| TopologyFinding {
            object: object.clone(),
            state: Found::Wrong,
            detail,
        };
        let Ok(ch) = self.channel().await else {
            return fail("no channel".into());
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let found = ch
            .queue_declare(name.into(), passive, FieldTable::default())
            .await;
        let _ = ch.close(200, "checked".into()).await;
        let q = match found {
            Ok(q) => q,
            Err(_) => {
                return TopologyFinding {
                    object,
                    state: Found::Missing,
                    detail: format!(
                        "not declared yet ({want}): a runbridge worker declares it when it starts"
                    ),
                };
            }
        };
        let Ok(ch) = self.channel().await else {
            return fail("no channel".into());
        };
        let same = ch
            .queue_declare(name.into(), QueueDeclareOptions::durable(), args)
            .await;
        let _ = ch.close(200, "checked".into()).await;
        match same {
            Ok(_) => TopologyFinding {
                object,
                state: Found::Ready,
                detail: format!(
                    "{want}; {} ready, {} consumers",
                    q.message_count(),
                    q.consumer_count()
                ),
            },
            Err(e) => fail(format!(
                "exists with other arguments than runbridge's ({want}): {e}; delete or rename it (after moving its messages away), and a worker declares it again"
            )),
        }
    }
}
