//! The promise state machine, proven against a model.
//!
//! `Model` is the Durable Promise specification's transitions written out in
//! plain Rust: create-if-absent, settle (resolve / reject / cancel) with
//! idempotency keys and `strict`, the timeout (a pending promise past its
//! timeout is `REJECTED_TIMEDOUT` whatever is asked of it, and a
//! non-strict request on it is answered as a duplicate), the deadline sweep
//! and heartbeats. A proptest generates random sequences of operations on a
//! few promises, some of them sent concurrently from several tasks, runs them
//! against the real Redis-backed store, and checks every answer against the
//! model. A concurrent group passes if some order of its operations explains
//! every answer (linearizability); the states each such order leaves are all
//! kept as possibilities. At the end every promise's stored state must be one
//! the model allows, and the outbox must hold exactly one entry per settled
//! promise (none for a pending one).
//!
//! Timeouts are either far away or already passed (`Timeout::At(1)`), so the
//! model needs no clock. `PROPTEST_CASES` sets the number of cases (10,000 by
//! default; `make fuzz` runs more).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures_util::future::join_all;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use runbridge::domain::{Payload, PromiseId, SettledBy, State};
use runbridge::store::{
    CreateOutcome, ExpireOutcome, HeartbeatOutcome, Lifecycle, PromiseStore, RedisStore, Settle,
    SettleOutcome, Timeout,
};

use crate::helpers::*;

/// Promises per case (operations name them by index).
const IDS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    Create {
        id: usize,
        ikey: Option<u8>,
        /// Created with a timeout already passed.
        expired: bool,
    },
    Settle {
        id: usize,
        target: State,
        ikey: Option<u8>,
        strict: bool,
    },
    /// The reconciler's deadline sweep on this promise.
    Expire {
        id: usize,
    },
    Heartbeat {
        id: usize,
    },
    Get {
        id: usize,
    },
}

impl Op {
    fn id(&self) -> usize {
        match self {
            Op::Create { id, .. }
            | Op::Settle { id, .. }
            | Op::Expire { id }
            | Op::Heartbeat { id }
            | Op::Get { id } => *id,
        }
    }
}

/// A step: one operation, or several sent at once from separate tasks.
#[derive(Debug, Clone)]
enum Step {
    One(Op),
    Together(Vec<Op>),
}

/// What the store answered, reduced to what the model predicts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Created,
    Existing(State),
    Settled(State),
    TimedOut,
    Deduplicated(State),
    AlreadySettled(State),
    NotFound,
    SweptTimedOut,
    NotDue,
    SweptSettledOrGone,
    Extended,
    HeartbeatOnSettled(State),
    Got(Option<State>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct MPromise {
    state: State,
    /// The idempotency key of the completion that settled it.
    ikey_complete: Option<u8>,
    past_timeout: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Model {
    promises: BTreeMap<usize, MPromise>,
}

impl Model {
    fn apply(&mut self, op: &Op) -> Answer {
        match op {
            Op::Create { id, expired, .. } => match self.promises.get(id) {
                Some(p) => Answer::Existing(p.state),
                None => {
                    self.promises.insert(
                        *id,
                        MPromise {
                            state: State::Pending,
                            ikey_complete: None,
                            past_timeout: *expired,
                        },
                    );
                    Answer::Created
                }
            },
            Op::Settle {
                id,
                target,
                ikey,
                strict,
            } => {
                let Some(p) = self.promises.get_mut(id) else {
                    return Answer::NotFound;
                };
                if p.state == State::Pending {
                    if p.past_timeout && *target != State::RejectedTimedout {
                        p.state = State::RejectedTimedout;
                        p.ikey_complete = None;
                        return Answer::TimedOut;
                    }
                    p.state = *target;
                    p.ikey_complete = *ikey;
                    return Answer::Settled(*target);
                }
                // Settled already: the specification's idempotency table.
                // The same completion again (same key; with `strict`, the
                // same state too) is a duplicate; so is any non-strict
                // request on a promise that timed out.
                let same_key = ikey.is_some() && *ikey == p.ikey_complete;
                let repeat = same_key && (!strict || p.state == *target);
                let on_timeout = p.state == State::RejectedTimedout && !strict;
                if repeat || on_timeout {
                    Answer::Deduplicated(p.state)
                } else {
                    Answer::AlreadySettled(p.state)
                }
            }
            Op::Expire { id } => match self.promises.get_mut(id) {
                None => Answer::SweptSettledOrGone,
                Some(p) if p.state != State::Pending => Answer::SweptSettledOrGone,
                Some(p) if p.past_timeout => {
                    p.state = State::RejectedTimedout;
                    p.ikey_complete = None;
                    Answer::SweptTimedOut
                }
                Some(_) => Answer::NotDue,
            },
            Op::Heartbeat { id } => match self.promises.get(id) {
                None => Answer::NotFound,
                Some(p) if p.state == State::Pending => Answer::Extended,
                Some(p) => Answer::HeartbeatOnSettled(p.state),
            },
            Op::Get { id } => Answer::Got(self.promises.get(id).map(|p| p.state)),
        }
    }
}

/// Runs one operation against the store.
async fn run(store: &RedisStore, ids: &[PromiseId], op: &Op) -> Answer {
    let key = |k: &Option<u8>| k.map(|k| format!("ik-{k}"));
    let id = ids[op.id()].clone();
    match op {
        Op::Create { ikey, expired, .. } => {
            let mut new = new_promise(
                &id,
                if *expired {
                    Timeout::At(1)
                } else {
                    Timeout::After(Duration::from_secs(3600))
                },
            );
            new.param = Payload::data("{}");
            new.ikey_create = key(ikey);
            match store.create(&new).await.unwrap() {
                CreateOutcome::Created(_) => Answer::Created,
                CreateOutcome::Existing(p) => Answer::Existing(p.state),
            }
        }
        Op::Settle {
            target,
            ikey,
            strict,
            ..
        } => {
            let req = Settle {
                id,
                target: *target,
                value: Payload::data("\"v\""),
                ikey: key(ikey),
                strict: *strict,
                settled_by: SettledBy::Operator,
                cancel_run: *target == State::RejectedCanceled,
                capability: None,
            };
            match store.settle(&req).await.unwrap() {
                SettleOutcome::Settled(p) => Answer::Settled(p.state),
                SettleOutcome::TimedOut(_) => Answer::TimedOut,
                SettleOutcome::Deduplicated(p) => Answer::Deduplicated(p.state),
                SettleOutcome::AlreadySettled(p) => Answer::AlreadySettled(p.state),
                SettleOutcome::NotFound => Answer::NotFound,
                SettleOutcome::NotOpened => unreachable!("no capability was given"),
            }
        }
        Op::Expire { .. } => match store.expire(&id).await.unwrap() {
            ExpireOutcome::TimedOut(_) => Answer::SweptTimedOut,
            ExpireOutcome::NotDue => Answer::NotDue,
            ExpireOutcome::Settled => Answer::SweptSettledOrGone,
        },
        Op::Heartbeat { .. } => match store.heartbeat(&id, None).await.unwrap() {
            HeartbeatOutcome::Extended(_) => Answer::Extended,
            HeartbeatOutcome::Settled(p) => Answer::HeartbeatOnSettled(p.state),
            HeartbeatOutcome::NotFound => Answer::NotFound,
            HeartbeatOutcome::NotOpened => unreachable!("no capability was given"),
        },
        Op::Get { .. } => Answer::Got(store.get(&id).await.unwrap().map(|p| p.state)),
    }
}

fn op() -> impl Strategy<Value = Op> {
    let id = 0..IDS;
    let ikey = prop::option::of(0u8..2);
    let target = prop_oneof![
        Just(State::Resolved),
        Just(State::Rejected),
        Just(State::RejectedCanceled),
    ];
    prop_oneof![
        3 => (id.clone(), ikey.clone(), prop::bool::weighted(0.3))
            .prop_map(|(id, ikey, expired)| Op::Create { id, ikey, expired }),
        5 => (id.clone(), target, ikey, any::<bool>())
            .prop_map(|(id, target, ikey, strict)| Op::Settle { id, target, ikey, strict }),
        1 => id.clone().prop_map(|id| Op::Expire { id }),
        1 => id.clone().prop_map(|id| Op::Heartbeat { id }),
        1 => id.prop_map(|id| Op::Get { id }),
    ]
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        3 => op().prop_map(Step::One),
        1 => prop::collection::vec(op(), 2..=3).prop_map(Step::Together),
    ];
    prop::collection::vec(step, 1..10)
}

/// Every order of `ops` (at most 3 of them).
fn orders(n: usize) -> Vec<Vec<usize>> {
    match n {
        1 => vec![vec![0]],
        2 => vec![vec![0, 1], vec![1, 0]],
        _ => vec![
            vec![0, 1, 2],
            vec![0, 2, 1],
            vec![1, 0, 2],
            vec![1, 2, 0],
            vec![2, 0, 1],
            vec![2, 1, 0],
        ],
    }
}

/// The outbox entries written since `seen` (per partition, the last entry id
/// looked at), counted by promise id.
async fn new_outbox_entries(
    conn: &mut redis::aio::MultiplexedConnection,
    store: &RedisStore,
    seen: &mut HashMap<u32, String>,
) -> HashMap<String, usize> {
    let mut count = HashMap::new();
    for p in 0..store.partitions() {
        let start = seen
            .get(&p)
            .map(|s| format!("({s}"))
            .unwrap_or_else(|| "-".into());
        let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
            .arg(store.keys().outbox(p))
            .arg(start)
            .arg("+")
            .query_async(conn)
            .await
            .unwrap();
        if let Some((last, _)) = entries.last() {
            seen.insert(p, last.clone());
        }
        for (_, fields) in entries {
            *count
                .entry(fields.get("id").cloned().unwrap_or_default())
                .or_default() += 1;
        }
    }
    count
}

/// 10,000 random cases (more with `PROPTEST_CASES`); see the module docs.
#[test]
fn store_agrees_with_the_promise_model() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The machine's Redis (a cluster's raw outbox reads would need routing).
    let app = rt.block_on(TestApp::spawn_with(Options {
        worker: false,
        overrides: vec![("redis.url", "redis://127.0.0.1:6379".into())],
        ..Default::default()
    }));
    let store = app.store.clone();
    let conn = rt.block_on(async {
        redis::Client::open("redis://127.0.0.1:6379")
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    });
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(10_000);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    // The runner takes a `Fn`: the case counter and the outbox position
    // live in cells.
    let case = std::cell::Cell::new(0u64);
    let seen = std::cell::RefCell::new(HashMap::new());
    let result = runner.run(&steps(), |steps| {
        case.set(case.get() + 1);
        let case = case.get();
        let ids: Vec<PromiseId> = (0..IDS)
            .map(|i| PromiseId::parse(&format!("{}-c{case}-p{i}", app.name)).unwrap())
            .collect();
        rt.block_on(async {
            // Every model state the answers so far allow.
            let mut models = vec![Model::default()];
            for step in &steps {
                let ops: Vec<&Op> = match step {
                    Step::One(op) => vec![op],
                    Step::Together(ops) => ops.iter().collect(),
                };
                let answers: Vec<Answer> = join_all(ops.iter().map(|op| {
                    let (store, ids) = (store.clone(), ids.clone());
                    async move { run(&store, &ids, op).await }
                }))
                .await;
                let mut next = Vec::new();
                for m in &models {
                    for order in orders(ops.len()) {
                        let mut m = m.clone();
                        let mut predicted = vec![None; ops.len()];
                        for i in order {
                            predicted[i] = Some(m.apply(ops[i]));
                        }
                        let predicted: Vec<Answer> = predicted.into_iter().flatten().collect();
                        if predicted == answers && !next.contains(&m) {
                            next.push(m);
                        }
                    }
                }
                if next.is_empty() {
                    return Err(TestCaseError::fail(format!(
                        "{step:?} answered {answers:?}; the model allows none of it from {models:?}"
                    )));
                }
                models = next;
            }
            // The stored states, and one outbox entry per settled promise.
            let mut stored = Vec::new();
            for id in &ids {
                stored.push(store.get(id).await.unwrap().map(|p| p.state));
            }
            // Taken out of its cell for the await, and put back.
            let mut positions = seen.take();
            let outbox = new_outbox_entries(&mut conn.clone(), &store, &mut positions).await;
            seen.replace(positions);
            let explained = models.iter().any(|m| {
                (0..IDS).all(|i| {
                    let want = m.promises.get(&i).map(|p| p.state);
                    let entries = outbox.get(ids[i].as_str()).copied().unwrap_or(0);
                    let settled = want.is_some_and(|s| s != State::Pending);
                    stored[i] == want && entries == usize::from(settled)
                })
            });
            if !explained {
                return Err(TestCaseError::fail(format!(
                    "stored {stored:?}, outbox entries {outbox:?}; the model allows {models:?}"
                )));
            }
            Ok(())
        })
    });
    rt.block_on(app.stop());
    if let Err(e) = result {
        panic!("{e}");
    }
    println!("{cases} cases: the store agreed with the model");
}

/// A create answers with the new promise built from what it sent, not read
/// back from Redis: that answer must be the record a read then finds, field
/// for field, for a trigger's promise with every optional field set, a
/// child, and a parent.
#[tokio::test]
async fn what_a_create_answers_is_what_a_read_finds() {
    use runbridge::domain::promise::{ChildOf, Family};
    use runbridge::domain::retry::RetryMessage;
    use runbridge::domain::{Join, RetryPolicy};
    use runbridge::store::{Families, NewPromise};
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let id = |s: &str| PromiseId::parse(&format!("{}-{s}", app.name)).unwrap();
    let retry: RetryMessage =
        serde_json::from_value(serde_json::json!({"max_attempts": 3})).unwrap();
    let full = NewPromise {
        param: Payload::data(r#"{"job_id": 7}"#),
        tags: BTreeMap::from([("team".to_string(), "data".to_string())]),
        ikey_create: Some("ik".into()),
        job_id: Some(7),
        reply_to: Some("replies".into()),
        correlation_id: Some("c-1".into()),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        heartbeat: Some(Duration::from_secs(30)),
        cancel_on_timeout: true,
        retry: Some(RetryPolicy::parse(&retry, true).unwrap()),
        ..new_promise(&id("full"), Timeout::After(Duration::from_secs(600)))
    };
    let child = NewPromise {
        parent: Some(ChildOf {
            parent: id("parent"),
            index: 2,
        }),
        ..new_promise(&id("parent/2"), Timeout::At(4_102_444_800_000))
    };
    for new in [&full, &child] {
        let CreateOutcome::Created(answered) = app.store.create(new).await.unwrap() else {
            panic!("{} created", new.id);
        };
        let read = app.store.get(&new.id).await.unwrap().expect("stored");
        assert_eq!(answered, read, "{}", new.id);
    }
    let family = Family {
        children: 3,
        join: Join::All,
        fail_fast: false,
        max_concurrency: Some(2),
        launched: 2,
    };
    let kids: Vec<PromiseId> = (0..3).map(|n| id(&format!("parent/{n}"))).collect();
    let parent = new_promise(&id("parent"), Timeout::After(Duration::from_secs(600)));
    let CreateOutcome::Created(answered) = app
        .store
        .create_parent(&parent, &family, &kids, Duration::from_secs(60))
        .await
        .unwrap()
    else {
        panic!("parent created");
    };
    let read = app.store.get(&parent.id).await.unwrap().expect("stored");
    assert_eq!(answered, read, "parent");
}
