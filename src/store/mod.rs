//! The promise store: durable promises in Redis (docs/contracts.md, the Redis layout).
//!
//! This module is the only one that speaks to Redis. The rest of the code sees
//! the [`PromiseStore`] and [`Outbox`] traits and plain domain types, so the
//! worker, relay and sidecar logic can be called with any implementation.
//!
//! Every state transition is one Lua script (`lua/*.lua`) that reads, decides
//! and writes atomically on one hash-tagged slot; a settlement writes its
//! outbox entry in the same script, so there is no settled promise without its
//! event and no event without its settlement. Scripts run with EVALSHA and are
//! re-loaded transparently after a NOSCRIPT (a restarted Redis has an empty
//! script cache).

mod pool;
pub mod redis_store;

use serde_json::Value;
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

pub use redis_store::{RedisStore, SentinelSettings, StoreSettings, Topology};

use crate::domain::fanout::JoinState;
use crate::domain::promise::CorruptRecord;
use crate::domain::promise::{ChildOf, Family};
use crate::domain::{IdPattern, Incarnation, Payload, Promise, PromiseId, RunId, SettledBy, State};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis could not be reached or answered with an error; worth retrying.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// A record that does not parse: a bug or a foreign writer; not retryable.
    #[error(transparent)]
    Corrupt(#[from] CorruptRecord),
    #[error("unexpected reply from redis script: {0}")]
    Protocol(String),
    /// A search cursor this store did not hand out (the caller's mistake).
    #[error("invalid search cursor")]
    InvalidCursor,
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// A capability's claim as the store's scripts check it (`state_if_opened` in
/// common.lua): '' no token, 'v1' a token of the id alone, else the
/// creation ms a token is bound to.
pub(crate) fn capability_arg(c: Option<Incarnation>) -> String {
    match c {
        None => String::new(),
        Some(Incarnation::Legacy) => "v1".into(),
        Some(Incarnation::Created(ms)) => ms.to_string(),
    }
}

/// A promise to create.
#[derive(Debug, Clone)]
pub struct NewPromise {
    pub id: PromiseId,
    pub param: Payload,
    pub timeout: Timeout,
    pub tags: BTreeMap<String, String>,
    pub ikey_create: Option<String>,
    pub job_id: Option<u64>,
    pub workspace: String,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    pub traceparent: Option<String>,
    pub heartbeat: Option<Duration>,
    pub cancel_on_timeout: bool,
    /// Set on a child of a parent trigger.
    pub parent: Option<ChildOf>,
    /// The retry policy the promise keeps for its life.
    pub retry: Option<crate::domain::RetryPolicy>,
}

impl NewPromise {
    /// A promise with nothing but an id, a deadline and a workspace: no
    /// parameters, tags, job, reply address or heartbeat (what `POST
    /// /promises` creates before its body's fields are applied).
    pub fn bare(id: PromiseId, timeout: Timeout, workspace: impl Into<String>) -> Self {
        Self {
            id,
            param: Payload::default(),
            timeout,
            tags: BTreeMap::new(),
            ikey_create: None,
            job_id: None,
            workspace: workspace.into(),
            reply_to: None,
            correlation_id: None,
            traceparent: None,
            heartbeat: None,
            cancel_on_timeout: false,
            parent: None,
            retry: None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Timeout {
    /// From now, by Redis's clock.
    After(Duration),
    /// Milliseconds since the epoch (the Durable Promise API's `timeout`).
    At(i64),
}

#[derive(Debug, Clone)]
pub enum CreateOutcome {
    Created(Promise),
    Existing(Promise),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordOutcome {
    /// Recorded (or already recorded with this run id); the promise's state now.
    Recorded(State),
    NotFound,
    /// The promise already has another run id; nothing changed.
    Conflict(String),
}

/// A request to settle a promise.
#[derive(Debug, Clone)]
pub struct Settle {
    pub id: PromiseId,
    pub target: State,
    pub value: Payload,
    pub ikey: Option<String>,
    pub strict: bool,
    pub settled_by: SettledBy,
    /// Also cancel the promise's Databricks run (scheduled in the same step).
    pub cancel_run: bool,
    /// What the caller's capability token opens, checked against the record
    /// in the same step; `None`: no token (an operator, the bridge itself).
    pub capability: Option<Incarnation>,
}

#[derive(Debug, Clone)]
pub enum SettleOutcome {
    /// This request settled it; one outbox entry was written.
    Settled(Promise),
    /// It was past its timeout: it is now REJECTED_TIMEDOUT (one outbox entry).
    TimedOut(Promise),
    /// The same completion was already applied; nothing changed.
    Deduplicated(Promise),
    /// Settled otherwise before; nothing changed.
    AlreadySettled(Promise),
    NotFound,
    /// The capability token opens another incarnation of this id (one that
    /// expired before the id was used again); nothing changed.
    NotOpened,
}

#[derive(Debug, Clone)]
pub enum HeartbeatOutcome {
    Extended(Promise),
    Settled(Promise),
    NotFound,
    /// As [`SettleOutcome::NotOpened`].
    NotOpened,
}

#[derive(Debug, Clone, Default)]
pub struct SearchQuery {
    /// Id, or id pattern with `*` wildcards.
    pub id: IdPattern,
    pub states: Option<Vec<State>>,
    pub tags: BTreeMap<String, String>,
    pub job_id: Option<u64>,
    /// Only promises of this Databricks workspace.
    pub workspace: Option<String>,
    pub limit: usize,
    pub cursor: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SearchPage {
    pub promises: Vec<Promise>,
    pub cursor: Option<String>,
    /// Records on this page's stretch of keys that could not be read and
    /// were left out (see [`unreadable_record`]).
    pub unreadable: usize,
}

/// A stored record that does not parse (written by a foreign writer or an
/// older bug) is left out of searches rather than failing them: counted in
/// `runbridge_store_unreadable_records_total` and logged once per key and
/// process, so one bad record neither hides every other promise nor floods
/// the log.
pub fn unreadable_record(key: &str, error: &CorruptRecord) {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static LOGGED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    metrics::counter!("runbridge_store_unreadable_records_total").increment(1);
    let first = LOGGED
        .get_or_init(Default::default)
        .lock()
        .map(|mut seen| seen.len() < 10_000 && seen.insert(key.to_owned()))
        .unwrap_or(false);
    if first {
        tracing::error!(key, %error, "unreadable promise record left out of searches; delete or repair the key");
    }
}

/// Promise operations, each atomic and safe to repeat.
pub trait PromiseStore: Clone + Send + Sync + 'static {
    fn create(
        &self,
        new: &NewPromise,
    ) -> impl Future<Output = Result<CreateOutcome, StoreError>> + Send;
    fn record_run(
        &self,
        id: &PromiseId,
        run: RunId,
        run_page_url: Option<&str>,
    ) -> impl Future<Output = Result<RecordOutcome, StoreError>> + Send;
    fn settle(
        &self,
        req: &Settle,
    ) -> impl Future<Output = Result<SettleOutcome, StoreError>> + Send;
    /// A heartbeat; `capability` as for [`Settle::capability`].
    fn heartbeat(
        &self,
        id: &PromiseId,
        capability: Option<Incarnation>,
    ) -> impl Future<Output = Result<HeartbeatOutcome, StoreError>> + Send;
    fn get(
        &self,
        id: &PromiseId,
    ) -> impl Future<Output = Result<Option<Promise>, StoreError>> + Send;
    fn search(
        &self,
        q: &SearchQuery,
    ) -> impl Future<Output = Result<SearchPage, StoreError>> + Send;
    /// Is the store reachable (readiness)?
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// What the deadline sweep did with one due promise.
#[derive(Debug, Clone)]
pub enum ExpireOutcome {
    /// It was due: now REJECTED_TIMEDOUT (one outbox entry; run cancel scheduled
    /// if `cancel_on_timeout`).
    TimedOut(Box<Promise>),
    /// A heartbeat moved it; its deadline score was corrected.
    NotDue,
    /// Settled or gone meanwhile; removed from the deadline index.
    Settled,
}

/// A run cancellation waiting in a partition's schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingCancel {
    pub partition: u32,
    pub member: String,
    pub run: RunId,
    pub workspace: String,
}

/// The schedules the reconciler works from (docs/contracts.md, the reconciler). Each read takes
/// only what is due; each claim leases what it took, so several workers can
/// reconcile the same partitions without doing the same work twice.
pub trait Lifecycle: Clone + Send + Sync + 'static {
    fn partitions(&self) -> u32;
    /// Promise ids whose deadline (timeout or heartbeat) has passed.
    fn due_deadlines(
        &self,
        partition: u32,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<PromiseId>, StoreError>> + Send;
    fn expire(
        &self,
        id: &PromiseId,
    ) -> impl Future<Output = Result<ExpireOutcome, StoreError>> + Send;
    /// Due run checks, leased for `lease`.
    fn claim_polls(
        &self,
        partition: u32,
        limit: usize,
        lease: Duration,
    ) -> impl Future<Output = Result<Vec<PromiseId>, StoreError>> + Send;
    fn reschedule_poll(
        &self,
        id: &PromiseId,
        delay: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Due run cancellations, leased for `lease`.
    fn claim_cancels(
        &self,
        partition: u32,
        limit: usize,
        lease: Duration,
    ) -> impl Future<Output = Result<Vec<PendingCancel>, StoreError>> + Send;
    fn reschedule_cancel(
        &self,
        c: &PendingCancel,
        delay: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn cancel_done(&self, c: &PendingCancel)
    -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Makes the pending promise of this run due for a check now (job
    /// notifications); its id, if the run belongs to a pending promise.
    fn poll_run_now(
        &self,
        run: RunId,
    ) -> impl Future<Output = Result<Option<PromiseId>, StoreError>> + Send;
}

/// Partition leases and worker membership, as the store keeps them (what
/// `partitions` shares out).
pub trait Leases: Send + Sync + 'static {
    /// Announces `member` as live for `ttl`, holding `holding` partitions,
    /// and forgets members silent for longer.
    fn announce(
        &self,
        member: &str,
        ttl: Duration,
        holding: usize,
    ) -> impl Future<Output = Result<Membership, StoreError>> + Send;
    /// Removes `member` from the live set (a clean shutdown).
    fn leave(&self, member: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Takes the partition's lease if free, or renews it if `member` holds
    /// it; false if another member holds it.
    fn hold(
        &self,
        partition: u32,
        member: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Gives the lease back if `member` holds it.
    fn release(
        &self,
        partition: u32,
        member: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// What the live workers look like (this one included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Membership {
    pub live: usize,
    /// The fewest partitions a live worker said it holds.
    pub fewest: usize,
}

/// What adopting a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdoptOutcome {
    Adopted,
    NotFound,
    Settled(State),
    /// An attempt is being launched right now.
    Launching,
    /// Another pending promise follows this run.
    Taken(String),
}

/// What the audit (`audit`) keeps and changes in the store. Findings are
/// stored as the audit's JSON records; the store does not read them.
pub trait Audits: Clone + Send + Sync + 'static {
    /// Takes or renews the workspace's audit lease for `ttl`; false while
    /// another worker holds it.
    fn hold_audit(
        &self,
        workspace: &str,
        member: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// When the last audit of the workspace began (epoch ms).
    fn last_audit(
        &self,
        workspace: &str,
    ) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;
    fn audit_done(
        &self,
        workspace: &str,
        began: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Up to about `count` (run, promise) pairs of pending promises with a
    /// run, continuing the walk where the last call left it (over every
    /// partition, then from the start again).
    fn pending_runs(
        &self,
        workspace: &str,
        count: usize,
    ) -> impl Future<Output = Result<Vec<(RunId, PromiseId)>, StoreError>> + Send;
    /// The runs the last audit saw active.
    fn audit_active(
        &self,
        workspace: &str,
    ) -> impl Future<Output = Result<Vec<u64>, StoreError>> + Send;
    /// Replaces them with `runs`.
    fn set_audit_active(
        &self,
        workspace: &str,
        runs: &[u64],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Schedules `run` for cancellation in the promise's partition, where
    /// the reconciler sends every cancel.
    fn schedule_cancel(
        &self,
        promise: &PromiseId,
        workspace: &str,
        run: RunId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Makes a pending promise's run check due now, putting it back on the
    /// schedule if it fell off; false if the promise is not pending with a run.
    fn check_run_now(
        &self,
        id: &PromiseId,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    fn finding(
        &self,
        workspace: &str,
        id: &str,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;
    /// Stores a finding's record; false (nothing stored) when the
    /// workspace already keeps `cap` findings and this one is new.
    fn put_finding(
        &self,
        workspace: &str,
        id: &str,
        record: &str,
        cap: usize,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    fn findings(
        &self,
        workspace: &str,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
    fn drop_findings(
        &self,
        workspace: &str,
        ids: &[String],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The pending promise `id` follows `run` from now on (`adopt.lua`);
    /// `replaced` is the attempt entry its previous run gets, if it had one
    /// (`ATTEMPT` and `RUN` stand for its attempt number and run id).
    fn adopt_run(
        &self,
        id: &PromiseId,
        run: RunId,
        first_poll: Duration,
        replaced: &str,
    ) -> impl Future<Output = Result<AdoptOutcome, StoreError>> + Send;
}

/// One child as its parent's record lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildEntry {
    pub index: u32,
    pub id: PromiseId,
    /// The outcome the parent has recorded (`None`: none yet, though the
    /// child may have settled a moment ago).
    pub state: Option<State>,
}

impl ChildEntry {
    pub fn view(&self) -> crate::domain::promise::ChildView {
        crate::domain::promise::ChildView {
            index: self.index,
            id: self.id.to_string(),
            state: self.state,
        }
    }
}

/// What cancelling a child did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildCancel {
    /// Cancelled now (with its run), or written cancelled before it ever
    /// started.
    Cancelled,
    /// Settled already; nothing changed.
    Already,
    /// Pending without a recorded run: left for the parent's fan-out step,
    /// which learns its run first.
    Unlaunched,
}

/// What a child's outcome did at its parent.
#[derive(Debug, Clone, PartialEq)]
pub enum ChildReport {
    /// The parent is gone (expired after its retention).
    Gone,
    /// The parent does not list this promise as this child.
    NotAChild,
    /// Recorded; the parent was settled already.
    ParentSettled,
    /// Recorded; what the parent's children say now.
    Join(JoinState),
}

/// Parents and children (docs/contracts.md, parent triggers). A parent and
/// its children live in different partitions; each step touches one and is
/// safe to repeat, so a crash between steps is mended by doing them again.
pub trait Families: Clone + Send + Sync + 'static {
    /// Creates a parent (as [`PromiseStore::create`]) with its children's
    /// ids and its first fan-out step scheduled `first_step_in` from now.
    fn create_parent(
        &self,
        new: &NewPromise,
        family: &Family,
        children: &[PromiseId],
        first_step_in: Duration,
    ) -> impl Future<Output = Result<CreateOutcome, StoreError>> + Send;
    /// Records a settled child's outcome at its parent (once; a repeat
    /// answers the same) and widens the parent's window.
    fn child_settled(
        &self,
        child: &Promise,
    ) -> impl Future<Output = Result<ChildReport, StoreError>> + Send;
    /// Cancels a child of a settled parent with its run; one never created
    /// is written cancelled, so it is never launched.
    fn cancel_child(
        &self,
        parent: &Promise,
        child: &ChildEntry,
    ) -> impl Future<Output = Result<ChildCancel, StoreError>> + Send;
    /// Makes the parent's fan-out step due now.
    fn schedule_fanout(
        &self,
        parent: &PromiseId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// A parent's children in order, with the outcomes it has recorded.
    fn children(
        &self,
        parent: &PromiseId,
    ) -> impl Future<Output = Result<Vec<ChildEntry>, StoreError>> + Send;
    /// Parents whose fan-out step is due, leased for `lease`.
    fn claim_fanouts(
        &self,
        partition: u32,
        limit: usize,
        lease: Duration,
    ) -> impl Future<Output = Result<Vec<PromiseId>, StoreError>> + Send;
    /// A fan-out step over the window `launched` is done: a pending parent
    /// leaves the schedule unless the window grew meanwhile; a settled one
    /// only when `settled_step` (its own step found no child left to
    /// cancel), else it is scheduled again at once.
    fn fanout_done(
        &self,
        parent: &PromiseId,
        launched: u32,
        settled_step: bool,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Everything the sidecar and reconciler need from a store.
/// What became of an attempt's transition (`attempt_failed.lua`,
/// `attempt_started.lua`).
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptOutcome {
    /// Done (or done before: the same step repeated).
    Done,
    /// The promise settled meanwhile (its state).
    Settled(State),
    /// The promise is at another attempt than the caller saw.
    Stale,
    NotFound,
}

/// What became of a progress update.
#[derive(Debug, Clone, PartialEq)]
pub enum ProgressOutcome {
    /// Stored, with this number.
    Recorded(u64),
    Settled(State),
    NotFound,
    /// As [`SettleOutcome::NotOpened`].
    NotOpened,
}

/// Retries and progress (docs/contracts.md, retries and progress), each
/// step one script on the promise's partition.
pub trait Attempts: Clone + Send + Sync + 'static {
    /// The current attempt failed in a way the policy retries: record it
    /// (`failed`, a JSON object) and schedule the next after `delay`.
    fn attempt_failed(
        &self,
        id: &PromiseId,
        attempt: u32,
        failed: &Value,
        delay: Duration,
    ) -> impl Future<Output = Result<AttemptOutcome, StoreError>> + Send;
    /// Attempt `attempt` begins, before its run is launched (a rerun
    /// forgets the old run): `Done` (or done before), `Settled`, `Stale`.
    fn attempt_begin(
        &self,
        id: &PromiseId,
        attempt: u32,
        rerun: bool,
    ) -> impl Future<Output = Result<AttemptOutcome, StoreError>> + Send;
    /// Attempt `attempt` runs as `run` (a repair of it with `repair`).
    fn attempt_started(
        &self,
        id: &PromiseId,
        attempt: u32,
        run: RunId,
        repair: Option<u64>,
    ) -> impl Future<Output = Result<AttemptOutcome, StoreError>> + Send;
    /// Due retries of a partition, leased for `lease`.
    fn claim_retries(
        &self,
        partition: u32,
        limit: usize,
        lease: Duration,
    ) -> impl Future<Output = Result<Vec<PromiseId>, StoreError>> + Send;
    /// Takes a due retry again after `delay` (its run is still ending).
    fn retry_later(
        &self,
        id: &PromiseId,
        delay: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Forgets a scheduled retry (its promise settled or is gone).
    fn drop_retry(&self, id: &PromiseId) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// An operator's "retry now": `Done`, or `Settled`/`Stale` (not waiting).
    fn retry_now(
        &self,
        id: &PromiseId,
    ) -> impl Future<Output = Result<AttemptOutcome, StoreError>> + Send;
    /// A progress update: its fields as JSON object members.
    fn progress(
        &self,
        id: &PromiseId,
        capability: Option<Incarnation>,
        members: &str,
        interval: Duration,
        history: u32,
    ) -> impl Future<Output = Result<ProgressOutcome, StoreError>> + Send;
    /// Publishes the progress events of a partition that are due; how many.
    fn emit_due_progress(
        &self,
        partition: u32,
        limit: usize,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;
}

pub trait Store:
    PromiseStore + Lifecycle + Insights + Sessions + Families + Attempts + Audits
{
}
impl<T: PromiseStore + Lifecycle + Insights + Sessions + Families + Attempts + Audits> Store for T {}

/// A logged-in operator console session, kept on the server: the browser
/// holds only a random id, so logging out or expiring ends it for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSession {
    /// The CSRF token of this session's forms (random, per session).
    pub csrf: String,
    /// Which operator token logged in (a fingerprint, never the token): a
    /// session ends when its token is removed from the configuration.
    pub operator: String,
}

/// Console sessions. `id_hash` is a hash of the cookie's value: the store
/// never holds a value a browser could present.
pub trait Sessions: Clone + Send + Sync + 'static {
    /// Stores a new session that ends after `idle` without use, and after
    /// `absolute` whatever happens.
    fn open_session(
        &self,
        id_hash: &str,
        session: &ConsoleSession,
        idle: Duration,
        absolute: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The live session, its idle expiry pushed back by `idle` (never past
    /// its absolute expiry); `None` if unknown, logged out or expired.
    fn touch_session(
        &self,
        id_hash: &str,
        idle: Duration,
    ) -> impl Future<Output = Result<Option<ConsoleSession>, StoreError>> + Send;
    fn close_session(&self, id_hash: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The whole store at a glance (the operator console's overview).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overview {
    /// Pending promises now.
    pub pending: u64,
    /// Pending promises by age: (age, how many), one row per creation
    /// second, oldest first.
    pub pending_ages: Vec<(Duration, u64)>,
    /// Settlements per minute over the last hour, oldest minute first:
    /// state (`RESOLVED`, ...) → count.
    pub settled_per_minute: Vec<BTreeMap<String, u64>>,
    /// Events not yet confirmed by the broker.
    pub outbox: u64,
}

impl Overview {
    pub fn oldest_pending_age(&self) -> Option<Duration> {
        self.pending_ages.first().map(|(age, _)| *age)
    }

    /// Settlements in the last hour, by state.
    pub fn settled_last_hour(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for minute in &self.settled_per_minute {
            for (state, n) in minute {
                *out.entry(state.clone()).or_default() += n;
            }
        }
        out
    }
}

/// Reads over every partition, for people (not on any hot path).
pub trait Insights: Clone + Send + Sync + 'static {
    fn overview(&self) -> impl Future<Output = Result<Overview, StoreError>> + Send;
}

/// One outbox entry: where it lives, and the settled promise it announces.
#[derive(Debug, Clone)]
pub struct OutboxEntry {
    pub partition: u32,
    pub entry_id: String,
    pub promise: Result<Promise, CorruptRecord>,
}

/// The outbox streams as the relay sees them.
pub trait Outbox: Send + Sync + 'static {
    /// New entries of these partitions for this consumer, waiting up to
    /// `block` for some.
    fn read_new(
        &mut self,
        partitions: &[u32],
        count: usize,
        block: Duration,
    ) -> impl Future<Output = Result<Vec<OutboxEntry>, StoreError>> + Send;
    /// Entries another consumer took and left idle for `min_idle` (a dead relay's).
    fn reclaim(
        &mut self,
        partitions: &[u32],
        min_idle: Duration,
        count: usize,
    ) -> impl Future<Output = Result<Vec<OutboxEntry>, StoreError>> + Send;
    /// Remove an entry once the broker confirmed its event (`published`;
    /// the promise records when) or it was dropped as unreadable.
    fn ack(
        &mut self,
        entry: &OutboxEntry,
        published: bool,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}
