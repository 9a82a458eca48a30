//! Search from the partitions' indexes (search.lua), never the keyspace:
//! pending promises from their creation seconds, settled ones from the
//! settled order. A search's cost follows what it walks — a search for
//! pending promises does not grow with the settled ones kept for the
//! retention period.
//!
//! The partitions are visited in order. One step (one script call) reads
//! one consistent snapshot of a stretch of one partition; a page may take
//! several steps, and the cursor says where the next one starts
//! (docs/contracts.md, searching, for what that guarantees).

use super::*;

/// Index entries one step examines at most, so that a search with a
/// selective filter never holds Redis for long: a step returns what it
/// found, and the next step goes on.
const STEP_BUDGET: usize = 500;

/// The layout of the search indexes, as the marker key records it.
const INDEX_VERSION: &str = "1";

/// Where a search stands: a partition, the walk it is in, and the position
/// reached there.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    partition: u32,
    settled: bool,
    /// Creation second (pending) or settlement ms (settled).
    at: u64,
    /// The last id returned at `at`, or empty: from the start of `at`.
    last: String,
}

impl Position {
    fn start(partition: u32, settled: bool) -> Self {
        Self {
            partition,
            settled,
            at: 0,
            last: String::new(),
        }
    }

    fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!(
            "i1:{}:{}:{}:{}",
            self.partition,
            if self.settled { 's' } else { 'p' },
            self.at,
            self.last
        ))
    }

    /// Only what [`Position::encode`] writes: anything else (a cursor of
    /// the keyspace walk an older version handed out, or a forged one) is
    /// refused rather than guessed at.
    fn decode(c: &str, partitions: u32) -> Option<Self> {
        let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(c).ok()?).ok()?;
        let mut parts = raw.splitn(5, ':');
        if parts.next()? != "i1" {
            return None;
        }
        let partition: u32 = parts.next()?.parse().ok()?;
        let settled = match parts.next()? {
            "p" => false,
            "s" => true,
            _ => return None,
        };
        let at = parts.next()?.parse().ok()?;
        let last = parts.next()?.to_owned();
        if partition >= partitions || (!last.is_empty() && PromiseId::parse(&last).is_err()) {
            return None;
        }
        Some(Self {
            partition,
            settled,
            at,
            last,
        })
    }
}

/// The walks a query needs: pending, settled, or both (pending first).
fn walks(states: Option<&Vec<State>>) -> (bool, bool) {
    match states {
        None => (true, true),
        Some(s) => (
            s.contains(&State::Pending),
            s.iter().any(|st| *st != State::Pending),
        ),
    }
}

impl RedisStore {
    pub(super) async fn search_indexes(&self, q: &SearchQuery) -> Result<SearchPage, StoreError> {
        let (pending, settled) = walks(q.states.as_ref());
        let partitions = self.keys.partitions();
        let mut at = match &q.cursor {
            None => Position::start(0, !pending),
            Some(c) => Position::decode(c, partitions).ok_or(StoreError::InvalidCursor)?,
        };
        if (at.settled && !settled) || (!at.settled && !pending) {
            // A cursor of another query's walk.
            return Err(StoreError::InvalidCursor);
        }
        let phases = match (pending, settled) {
            (true, true) => "ps",
            (true, false) => "p",
            _ => "s",
        };
        let states = q.states.as_ref().map_or(String::new(), |s| {
            let mut out = String::from(",");
            for st in s {
                out.push_str(st.as_str());
                out.push(',');
            }
            out
        });
        let pattern = if q.id.is_any() { "" } else { q.id.as_str() };
        let tags = if q.tags.is_empty() {
            String::new()
        } else {
            json(&q.tags)
        };
        let job = q.job_id.map(|j| j.to_string()).unwrap_or_default();
        let limit = q.limit.max(1);
        let mut out: Vec<Promise> = Vec::new();
        let mut unreadable = 0;
        loop {
            let p = at.partition;
            let mut call = Call::new(&self.scripts.search);
            call.key(self.keys.pending_by_second(p))
                .key(self.keys.pending_seconds(p))
                .key(self.keys.settled_order(p))
                .arg(self.keys.promise_prefix(p))
                .arg(if at.settled { "s" } else { "p" })
                .arg(at.at)
                .arg(&at.last)
                .arg(phases)
                .arg(limit - out.len())
                .arg(STEP_BUDGET)
                .arg(&states)
                .arg(pattern)
                .arg(&job)
                .arg(q.workspace.as_deref().unwrap_or(""))
                .arg(&tags);
            let reply = self.read(&call).await?;
            let (records, next) = step_reply(reply)?;
            for (id, flat) in records {
                match Promise::from_fields(&to_map(flat)) {
                    Ok(promise) => out.push(promise),
                    Err(e) => {
                        unreadable_record(&format!("{}{id}", self.keys.promise_prefix(p)), &e);
                        unreadable += 1;
                    }
                }
            }
            at = match next {
                Some((settled, at, last)) => Position {
                    partition: p,
                    settled,
                    at,
                    last,
                },
                None if p + 1 < partitions => Position::start(p + 1, !pending),
                None => {
                    return Ok(SearchPage {
                        promises: out,
                        cursor: None,
                        unreadable,
                    });
                }
            };
            if out.len() >= limit {
                return Ok(SearchPage {
                    promises: out,
                    cursor: Some(at.encode()),
                    unreadable,
                });
            }
        }
    }
}

impl RedisStore {
    /// A deployment holding nothing yet (no outbox, no pending promise in
    /// any partition) starts with the indexes: marked as indexed, so no
    /// worker walks the keyspace for it. Called at every connect: one
    /// `EXISTS`, and for a deployment not marked yet one pipeline per
    /// partition.
    pub(super) async fn mark_indexed_if_new(&self) -> Result<(), StoreError> {
        let marked: bool = redis::cmd("EXISTS")
            .arg(self.keys.search_indexes())
            .query_async(&mut self.conn().await?)
            .await
            .map_err(unavailable)?;
        if marked {
            return Ok(());
        }
        let used = self
            .per_partition(|p, pipe| {
                pipe.cmd("EXISTS")
                    .arg(self.keys.outbox(p))
                    .arg(self.keys.pending_seconds(p))
                    .arg(self.keys.deadlines(p));
            })
            .await?
            .iter()
            .flatten()
            .any(|v| redis::from_redis_value::<u64>(v.clone()).unwrap_or(0) > 0);
        if !used {
            let _: () = redis::cmd("SET")
                .arg(self.keys.search_indexes())
                .arg(INDEX_VERSION)
                .arg("NX")
                .query_async(&mut self.conn().await?)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    /// Puts promises stored by a version without search indexes into them,
    /// once per deployment: a walk of the keyspace (every primary, `SCAN`),
    /// one small script per promise. Later runs see the marker and return at
    /// once. Safe beside running workers and sidecars: each promise is read
    /// and indexed in one step, and settling it removes it from the pending
    /// index as for any other. Returns how many promises it indexed.
    pub async fn index_existing(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn().await?;
        let marker = self.keys.search_indexes();
        let have: Option<String> = redis::cmd("GET")
            .arg(&marker)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if have.as_deref() == Some(INDEX_VERSION) {
            return Ok(0);
        }
        let pattern = self.keys.promise_pattern("*");
        let mut indexed = 0;
        for address in self.scan_nodes().await? {
            let mut cursor: u64 = 0;
            loop {
                let mut cmd = redis::cmd("SCAN");
                cmd.arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(500);
                let (next, keys): (u64, Vec<String>) = conn
                    .query_on_address(address.as_ref().map(|(h, p)| (h.as_str(), *p)), &cmd)
                    .await
                    .map_err(unavailable)?;
                for key in keys {
                    let Some(id) = key
                        .rsplit_once(":promise:")
                        .and_then(|(_, id)| PromiseId::parse(id).ok())
                    else {
                        continue;
                    };
                    let p = self.keys.partition(&id);
                    let mut call = Call::new(&self.scripts.index_one);
                    call.key(self.keys.promise(&id))
                        .key(self.keys.pending_by_second(p))
                        .key(self.keys.pending_seconds(p))
                        .key(self.keys.settled_order(p))
                        .arg(id.as_str())
                        .arg(self.retention_ms);
                    let n: u64 = redis::from_redis_value(self.transition(&call).await?)
                        .map_err(|e| StoreError::Protocol(format!("index_one: {e}")))?;
                    indexed += n;
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        let _: () = redis::cmd("SET")
            .arg(&marker)
            .arg(INDEX_VERSION)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(indexed)
    }
}

/// `{records, [phase, position, last id]}`: each record's id and its fields
/// as a flat list, and where the partition's walk goes on (settled or
/// pending, the position, the last id; none: it is done).
type StepReply = (Vec<(String, Vec<String>)>, Option<(bool, u64, String)>);

fn step_reply(v: Value) -> Result<StepReply, StoreError> {
    fn bad(e: impl std::fmt::Display) -> StoreError {
        StoreError::Protocol(format!("search: {e}"))
    }
    let mut items: Vec<Value> = redis::from_redis_value(v).map_err(bad)?;
    if items.is_empty() {
        return Err(StoreError::Protocol("search: empty reply".into()));
    }
    let records: Vec<(String, Vec<String>)> =
        redis::from_redis_value(items.remove(0)).map_err(bad)?;
    if items.is_empty() {
        return Ok((records, None));
    }
    let (phase, at, last): (String, u64, String) =
        redis::from_redis_value(Value::Array(items)).map_err(bad)?;
    Ok((records, Some((phase == "s", at, last))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip_and_refusals() {
        let p = Position {
            partition: 3,
            settled: true,
            at: 1_764_460_000_123,
            last: "a:b/c-1".into(),
        };
        assert_eq!(Position::decode(&p.encode(), 16), Some(p.clone()));
        // A partition this deployment does not have, a foreign id, an old
        // keyspace cursor: refused.
        assert_eq!(Position::decode(&p.encode(), 3), None);
        let forged = URL_SAFE_NO_PAD.encode("i1:0:p:5:a b");
        assert_eq!(Position::decode(&forged, 16), None);
        let old = URL_SAFE_NO_PAD.encode("0:0:0");
        assert_eq!(Position::decode(&old, 16), None);
    }

    #[test]
    fn walks_follow_the_states() {
        assert_eq!(walks(None), (true, true));
        assert_eq!(walks(Some(&vec![State::Pending])), (true, false));
        assert_eq!(walks(Some(&vec![State::Resolved])), (false, true));
        assert_eq!(
            walks(Some(&vec![State::Pending, State::RejectedTimedout])),
            (true, true)
        );
    }
}
