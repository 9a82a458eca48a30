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
//!
//! A page answers for one moment: each step returns its partition's
//! version (bumped by every create, settlement and indexing in it), and
//! once the page is collected the versions are read again. A partition
//! unchanged from its first step to that read held, at the moment the read
//! began, what its steps saw; the page keeps the steps before the first
//! partition that changed (at least its first step, one moment by itself)
//! and its cursor goes on from there.

use std::collections::HashSet;

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

/// A query as each step's script takes it.
struct Filter {
    phases: &'static str,
    pending: bool,
    states: String,
    pattern: String,
    job: String,
    workspace: String,
    tags: String,
    limit: usize,
}

/// One collection of a page: what it found, and the steps that found it.
struct Collected {
    out: Vec<Promise>,
    unreadable: usize,
    steps: Vec<Step>,
    /// Where the next page starts (none: the walk is done).
    cursor: Option<Position>,
}

/// Collections of one page before it settles for the steps that held still.
const COLLECTIONS: usize = 3;

impl RedisStore {
    pub(super) async fn search_indexes(&self, q: &SearchQuery) -> Result<SearchPage, StoreError> {
        let (pending, settled) = walks(q.states.as_ref());
        let partitions = self.keys.partitions();
        let start = match &q.cursor {
            None => Position::start(0, !pending),
            Some(c) => Position::decode(c, partitions).ok_or(StoreError::InvalidCursor)?,
        };
        if (start.settled && !settled) || (!start.settled && !pending) {
            // A cursor of another query's walk.
            return Err(StoreError::InvalidCursor);
        }
        let filter = Filter {
            phases: match (pending, settled) {
                (true, true) => "ps",
                (true, false) => "p",
                _ => "s",
            },
            pending,
            states: q.states.as_ref().map_or(String::new(), |s| {
                let mut out = String::from(",");
                for st in s {
                    out.push_str(st.as_str());
                    out.push(',');
                }
                out
            }),
            pattern: if q.id.is_any() {
                String::new()
            } else {
                q.id.as_str().to_owned()
            },
            job: q.job_id.map(|j| j.to_string()).unwrap_or_default(),
            workspace: q.workspace.clone().unwrap_or_default(),
            tags: if q.tags.is_empty() {
                String::new()
            } else {
                json(&q.tags)
            },
            limit: q.limit.max(1),
        };
        let mut attempt = 1;
        loop {
            let c = self.collect(&filter, start.clone()).await?;
            let changed = self.changed_since(&c.steps).await?;
            let Some(cut) = first_unsettled_step(&c.steps, &changed) else {
                return Ok(SearchPage {
                    promises: c.out,
                    cursor: c.cursor.map(|p| p.encode()),
                    unreadable: c.unreadable,
                });
            };
            if attempt == COLLECTIONS {
                // Writes kept landing: the steps before the first partition
                // that changed, and the next page goes on from there.
                let mut out = c.out;
                out.truncate(cut.found);
                return Ok(SearchPage {
                    promises: out,
                    cursor: Some(cut.from.encode()),
                    unreadable: cut.unreadable,
                });
            }
            attempt += 1;
        }
    }

    /// Walks from `at` until the page is full or every partition is read.
    async fn collect(&self, f: &Filter, mut at: Position) -> Result<Collected, StoreError> {
        let partitions = self.keys.partitions();
        let mut out: Vec<Promise> = Vec::new();
        let mut unreadable = 0;
        let mut steps: Vec<Step> = Vec::new();
        let cursor = loop {
            let p = at.partition;
            let mut call = Call::new(&self.scripts.search);
            call.key(self.keys.pending_by_second(p))
                .key(self.keys.pending_seconds(p))
                .key(self.keys.settled_order(p))
                .arg(self.keys.promise_prefix(p))
                .arg(if at.settled { "s" } else { "p" })
                .arg(at.at)
                .arg(&at.last)
                .arg(f.phases)
                .arg(f.limit - out.len())
                .arg(STEP_BUDGET)
                .arg(&f.states)
                .arg(&f.pattern)
                .arg(&f.job)
                .arg(&f.workspace)
                .arg(&f.tags);
            let reply = self.read(&call).await?;
            let (records, version, next) = step_reply(reply)?;
            steps.push(Step {
                partition: p,
                version,
                found: out.len(),
                unreadable,
                from: at.clone(),
            });
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
                None if p + 1 < partitions => Position::start(p + 1, !f.pending),
                None => break None,
            };
            if out.len() >= f.limit {
                break Some(at);
            }
        };
        Ok(Collected {
            out,
            unreadable,
            steps,
            cursor,
        })
    }

    /// The partitions of `steps` whose version is no longer the one their
    /// first step read. Nothing to read for a page of one partition read in
    /// one step.
    async fn changed_since(&self, steps: &[Step]) -> Result<HashSet<u32>, StoreError> {
        if steps.len() < 2 {
            return Ok(HashSet::new());
        }
        let mut first: Vec<(u32, u64)> = Vec::new();
        for s in steps {
            if !first.iter().any(|(p, _)| *p == s.partition) {
                first.push((s.partition, s.version));
            }
        }
        let conn = self.conn().await?;
        let now: Vec<Option<u64>> = try_join_all(first.iter().map(|(p, _)| {
            let mut conn = conn.clone();
            let key = self.keys.version(*p);
            async move {
                redis::cmd("GET")
                    .arg(key)
                    .query_async::<Option<u64>>(&mut conn)
                    .await
            }
        }))
        .await
        .map_err(unavailable)?;
        Ok(first
            .iter()
            .zip(now)
            .filter(|((_, then), now)| now.unwrap_or(0) != *then)
            .map(|((p, _), _)| *p)
            .collect())
    }
}

/// One step of a page: its partition, the version it read there, how many
/// promises (and unreadable records) the page had before it, and where it
/// began.
#[derive(Debug)]
struct Step {
    partition: u32,
    version: u64,
    found: usize,
    unreadable: usize,
    from: Position,
}

/// The first step the page must not keep: the first step of the first
/// partition that changed, but never the page's first step (one step is
/// one moment by itself). `None`: every partition held still.
fn first_unsettled_step<'a>(steps: &'a [Step], changed: &HashSet<u32>) -> Option<&'a Step> {
    let cut = steps.iter().position(|s| changed.contains(&s.partition))?;
    steps.get(cut.max(1))
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

/// `{records, version, [phase, position, last id]}`: each record's id and
/// its fields as a flat list, the partition's version, and where the
/// partition's walk goes on (settled or pending, the position, the last id;
/// none: it is done).
type StepReply = (Vec<(String, Vec<String>)>, u64, Option<(bool, u64, String)>);

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
        return Err(StoreError::Protocol("search: no version".into()));
    }
    let version: u64 = redis::from_redis_value(items.remove(0)).map_err(bad)?;
    if items.is_empty() {
        return Ok((records, version, None));
    }
    let (phase, at, last): (String, u64, String) =
        redis::from_redis_value(Value::Array(items)).map_err(bad)?;
    Ok((records, version, Some((phase == "s", at, last))))
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
