//! [`Families`] on Redis: a parent's record and children hash live in the
//! parent's partition, each child in its own; every script here touches one
//! partition (`create_parent.lua`, `child_settled.lua`, `fanout_done.lua`
//! the parent's, `cancel_child.lua` the child's).

use super::promises::{creation_args, field_pairs};
use super::*;
use crate::domain::fanout::{ChildOutcome, JoinState};
use crate::domain::promise::Family;

fn protocol(e: impl std::fmt::Display) -> StoreError {
    StoreError::Protocol(e.to_string())
}

fn state(s: &str) -> Result<State, StoreError> {
    s.parse::<State>().map_err(protocol)
}

/// `(id, state, data)` triples of `child_settled.lua`'s answers.
fn outcome(
    index: u32,
    id: Option<String>,
    st: Option<String>,
    data: Option<String>,
) -> Result<ChildOutcome, StoreError> {
    Ok(ChildOutcome {
        index,
        id: id.ok_or_else(|| protocol("child without an id"))?,
        state: state(&st.ok_or_else(|| protocol("child without a state"))?)?,
        data,
    })
}

impl Families for RedisStore {
    async fn create_parent(
        &self,
        new: &NewPromise,
        family: &Family,
        children: &[PromiseId],
        first_step_in: Duration,
    ) -> Result<CreateOutcome, StoreError> {
        let p = self.keys.partition(&new.id);
        let mut inv = Call::new(&self.scripts.create_parent);
        inv.key(self.keys.promise(&new.id))
            .key(self.keys.deadlines(p))
            .key(self.keys.pending_by_second(p))
            .key(self.keys.pending_seconds(p))
            .key(self.keys.children(&new.id))
            .key(self.keys.fanout(p));
        creation_args(&mut inv, new, self.retention_ms);
        inv.arg(millis(first_step_in)).arg(children.len());
        for c in children {
            inv.arg(c.as_str());
        }
        let mut pairs = field_pairs(new);
        pairs.extend([
            (field::CHILDREN, family.children.to_string()),
            (field::JOIN, family.join.as_str().to_owned()),
            (
                field::FAIL_FAST,
                if family.fail_fast { "1" } else { "0" }.to_owned(),
            ),
            (
                field::MAX_CONCURRENCY,
                family
                    .max_concurrency
                    .map(|m| m.to_string())
                    .unwrap_or_default(),
            ),
            (field::WINDOW, family.launched.to_string()),
        ]);
        for (k, v) in &pairs {
            inv.arg(*k).arg(v);
        }
        self.created(&inv, new, pairs).await
    }

    async fn child_settled(&self, child: &Promise) -> Result<ChildReport, StoreError> {
        let Some(of) = &child.parent else {
            return Ok(ChildReport::NotAChild);
        };
        let parent = &of.parent;
        let mut inv = Call::new(&self.scripts.child_settled);
        inv.key(self.keys.promise(parent))
            .key(self.keys.children(parent))
            .key(self.keys.fanout(self.keys.partition(parent)))
            .arg(parent.as_str())
            .arg(of.index)
            .arg(child.id.as_str())
            .arg(child.state.as_str())
            .arg(if child.value.data.is_some() { "1" } else { "0" })
            .arg(child.value.data.as_deref().unwrap_or(""));
        let v = self.transition(&inv).await?;
        let items: Vec<Option<String>> = redis::from_redis_value(v).map_err(protocol)?;
        let mut it = items.into_iter();
        let status = it.next().flatten().unwrap_or_default();
        Ok(match status.as_str() {
            "GONE" => ChildReport::Gone,
            "NOT_A_CHILD" => ChildReport::NotAChild,
            "SETTLED" => ChildReport::ParentSettled,
            "OPEN" => ChildReport::Join(JoinState::Open),
            "DECISIVE" => {
                let index = it
                    .next()
                    .flatten()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| protocol("decisive child without an index"))?;
                let (id, st, data) = (
                    it.next().flatten(),
                    it.next().flatten(),
                    it.next().flatten(),
                );
                ChildReport::Join(JoinState::Decisive(outcome(index, id, st, data)?))
            }
            "COMPLETE" => {
                let rest: Vec<Option<String>> = it.collect();
                let all = rest
                    .chunks(3)
                    .enumerate()
                    .map(|(n, c)| {
                        outcome(
                            u32::try_from(n).unwrap_or(u32::MAX),
                            c.first().cloned().flatten(),
                            c.get(1).cloned().flatten(),
                            c.get(2).cloned().flatten(),
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                ChildReport::Join(JoinState::Complete(all))
            }
            other => return Err(protocol(format!("child_settled: {other}"))),
        })
    }

    async fn cancel_child(
        &self,
        parent: &Promise,
        child: &ChildEntry,
    ) -> Result<ChildCancel, StoreError> {
        let value = Payload::data(
            serde_json::json!({
                "reason": "parent_settled",
                "message": format!("parent {} is {}", parent.id, parent.state),
                "parent": parent.id.as_str(),
                "parent_state": parent.state,
            })
            .to_string(),
        );
        let mut inv = Call::new(&self.scripts.cancel_child);
        for k in self.settle_keys(&child.id) {
            inv.key(k);
        }
        inv.arg(child.id.as_str())
            .arg(json(&value))
            .arg(self.retention_ms)
            .arg(parent.id.as_str())
            .arg(child.index);
        let v = self.transition(&inv).await?;
        let (status, _) = split_reply(v)?;
        match status.as_str() {
            "CANCELED" | "WRITTEN" => {
                metrics::counter!(
                    "runbridge_promises_settled_total",
                    "state" => State::RejectedCanceled.as_str(),
                    "settled_by" => SettledBy::Parent.as_str(),
                )
                .increment(1);
                Ok(ChildCancel::Cancelled)
            }
            "ALREADY" => Ok(ChildCancel::Already),
            "UNLAUNCHED" => Ok(ChildCancel::Unlaunched),
            other => Err(protocol(format!("cancel_child: {other}"))),
        }
    }

    async fn schedule_fanout(&self, parent: &PromiseId) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: () = redis::cmd("ZADD")
            .arg(self.keys.fanout(self.keys.partition(parent)))
            .arg(chrono::Utc::now().timestamp_millis())
            .arg(parent.as_str())
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn children(&self, parent: &PromiseId) -> Result<Vec<ChildEntry>, StoreError> {
        let mut conn = self.conn().await?;
        let flat: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.keys.children(parent))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let mut out = Vec::new();
        for (k, id) in &flat {
            let Some(n) = k.strip_prefix('i').and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            out.push(ChildEntry {
                index: n,
                id: PromiseId::parse(id).map_err(protocol)?,
                state: flat.get(&format!("s{n}")).map(|s| state(s)).transpose()?,
            });
        }
        out.sort_by_key(|c| c.index);
        Ok(out)
    }

    async fn claim_fanouts(
        &self,
        partition: u32,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<PromiseId>, StoreError> {
        let ids = self
            .claim(self.keys.fanout(partition), limit, lease)
            .await?;
        Ok(ids
            .iter()
            .filter_map(|id| PromiseId::parse(id).ok())
            .collect())
    }

    async fn fanout_done(
        &self,
        parent: &PromiseId,
        launched: u32,
        settled_step: bool,
    ) -> Result<(), StoreError> {
        let mut inv = Call::new(&self.scripts.fanout_done);
        inv.key(self.keys.promise(parent))
            .key(self.keys.fanout(self.keys.partition(parent)))
            .arg(parent.as_str())
            .arg(launched)
            .arg(if settled_step { "1" } else { "0" });
        self.transition(&inv).await?;
        Ok(())
    }
}
