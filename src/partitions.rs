//! Which partitions this worker's reconciler and relay work on.
//!
//! Every partition (docs/contracts.md, the Redis layout) is owned by one worker at a time through a
//! lease in Redis (`<prefix>:{p<N>}:lease`, the owner's name with an
//! expiry). Workers announce themselves in a member set every round, and
//! each aims at a fair share: the partition count divided by the live
//! members, rounded up. A round renews the leases held, gives back those
//! above the share (another worker joined) and takes free ones up to it (a
//! worker left, or its leases ran out because it died). So the partitions
//! spread evenly, and a dead worker's partitions are taken over within
//! about one lease period.
//!
//! Leases make the work efficient, not correct: every item the reconciler
//! handles is still claimed on its own (`claim.lua`), and the relay reads
//! through a consumer group, so two workers that both believe they own a
//! partition (a lease lost in a Redis failover, a paused process) duplicate
//! effort, never outcomes. That is why a lease is dropped here only when a
//! renewal answers "not yours", or when it could not be renewed before it
//! would have run out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::keys::fnv1a32;
use crate::store::StoreError;
pub use crate::store::{Leases, Membership};

/// The most partitions a worker should own when `members` share
/// `partitions`: the count divided by the workers, rounded up.
pub fn fair_share(partitions: u32, members: usize) -> usize {
    (partitions as usize).div_ceil(members.max(1))
}

/// How many partitions to keep: the fair share; but while some worker holds
/// fewer than the count divided by the workers rounded down, the rounded-
/// down number, so that it can take what the others give back. So every
/// worker ends up within one partition of every other.
pub fn keep(partitions: u32, m: Membership) -> usize {
    let low = partitions as usize / m.live.max(1);
    if m.fewest < low {
        low
    } else {
        fair_share(partitions, m.live)
    }
}

/// The partitions to work on now, as the ownership task last decided.
#[derive(Clone, Debug)]
pub struct Assignment(watch::Receiver<Vec<u32>>);

impl Assignment {
    /// Every partition, always (one process on its own, tests).
    pub fn all(partitions: u32) -> Self {
        let (tx, rx) = watch::channel((0..partitions).collect());
        // The receiver keeps the last value after the sender is gone.
        drop(tx);
        Self(rx)
    }

    pub fn current(&self) -> Vec<u32> {
        self.0.borrow().clone()
    }
}

/// When the work a lease is for last went round: the relay marks it after
/// each read-and-publish round. A worker whose relay is stuck (its broker
/// connection is gone, say) gives its partitions up, so that another
/// worker's relay publishes their events.
#[derive(Clone, Debug)]
pub struct Progress(Arc<std::sync::Mutex<Instant>>);

impl Default for Progress {
    fn default() -> Self {
        Self(Arc::new(std::sync::Mutex::new(Instant::now())))
    }
}

impl Progress {
    pub fn mark(&self) {
        if let Ok(mut t) = self.0.lock() {
            *t = Instant::now();
        }
    }

    fn since(&self) -> Duration {
        self.0.lock().map(|t| t.elapsed()).unwrap_or_default()
    }
}

#[derive(Debug, Clone)]
pub struct OwnershipSettings {
    /// This worker's name (unique among the workers).
    pub member: String,
    pub partitions: u32,
    /// How long a lease (and a membership) lasts without renewal.
    pub lease: Duration,
}

/// What one round changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RoundReport {
    pub members: usize,
    /// How many partitions this worker keeps this round (see [`keep`]).
    pub share: usize,
    pub taken: Vec<u32>,
    pub released: Vec<u32>,
    pub lost: Vec<u32>,
}

/// One worker's leases.
pub struct Ownership<L> {
    leases: L,
    settings: OwnershipSettings,
    /// Held partitions and until when the lease is surely ours.
    held: BTreeMap<u32, Instant>,
    tx: watch::Sender<Vec<u32>>,
    /// The relay's progress, if leases depend on it.
    progress: Option<Progress>,
    /// Out of the member set because the work stalled.
    stalled: bool,
}

impl<L: Leases> Ownership<L> {
    pub fn new(leases: L, settings: OwnershipSettings) -> (Self, Assignment) {
        let (tx, rx) = watch::channel(Vec::new());
        let o = Self {
            leases,
            settings,
            held: BTreeMap::new(),
            tx,
            progress: None,
            stalled: false,
        };
        (o, Assignment(rx))
    }

    /// Holds leases only while `progress` was marked within a lease period.
    pub fn with_progress(mut self, progress: Progress) -> Self {
        self.progress = Some(progress);
        self
    }

    pub fn owned(&self) -> Vec<u32> {
        self.held.keys().copied().collect()
    }

    /// Renew, give back above the fair share, take up to it; then publish.
    /// While the work stalls: give everything back and leave the member set
    /// (the others then share the partitions among themselves).
    pub async fn round(&mut self) -> Result<RoundReport, StoreError> {
        let started = Instant::now();
        let stalled_for = self
            .progress
            .as_ref()
            .map(Progress::since)
            .filter(|d| *d > self.settings.lease);
        if let Some(d) = stalled_for {
            let mut report = RoundReport::default();
            if !self.stalled {
                tracing::warn!(
                    stalled_ms = d.as_millis() as u64,
                    owned = ?self.owned(),
                    "the relay made no progress for a lease period; giving the partitions to other workers"
                );
                report.released = self.owned();
                self.release_all().await;
                self.stalled = true;
            }
            return Ok(report);
        }
        if std::mem::take(&mut self.stalled) {
            tracing::info!("the relay makes progress again; taking a share of the partitions");
        }
        // A lease we could not renew is given up once it may have run out:
        // by then another worker may hold it.
        self.held.retain(|_, until| *until > started);
        let mut report = RoundReport::default();
        let result = self.step(started, &mut report).await;
        self.tx.send_replace(self.owned());
        metrics::gauge!("runbridge_partitions_owned").set(self.held.len() as f64);
        result.map(|()| report)
    }

    async fn step(&mut self, started: Instant, report: &mut RoundReport) -> Result<(), StoreError> {
        let OwnershipSettings {
            member,
            partitions,
            lease,
        } = self.settings.clone();
        let m = self
            .leases
            .announce(&member, lease, self.held.len())
            .await?;
        report.members = m.live;
        report.share = keep(partitions, m);
        for p in self.owned() {
            if self.leases.hold(p, &member, lease).await? {
                self.held.insert(p, started + lease);
            } else {
                self.held.remove(&p);
                report.lost.push(p);
            }
        }
        // Above the share: give back the highest-numbered ones.
        while self.held.len() > report.share {
            let Some((&p, _)) = self.held.last_key_value() else {
                break;
            };
            self.leases.release(p, &member).await?;
            self.held.remove(&p);
            report.released.push(p);
        }
        // Below it: try the others, each worker from its own starting point,
        // so that workers starting together rarely compete.
        let start = fnv1a32(member.as_bytes()) % partitions.max(1);
        for i in 0..partitions {
            if self.held.len() >= report.share {
                break;
            }
            let p = (start + i) % partitions;
            if !self.held.contains_key(&p) && self.leases.hold(p, &member, lease).await? {
                self.held.insert(p, started + lease);
                report.taken.push(p);
            }
        }
        Ok(())
    }

    /// Gives every lease back and leaves the member set, so that the others
    /// take over at once instead of after a lease period.
    pub async fn release_all(&mut self) {
        for p in self.owned() {
            if let Err(e) = self.leases.release(p, &self.settings.member).await {
                tracing::debug!(partition = p, error = %e, "lease not given back; it runs out");
            }
        }
        self.held.clear();
        self.tx.send_replace(Vec::new());
        if let Err(e) = self.leases.leave(&self.settings.member).await {
            tracing::debug!(error = %e, "membership not withdrawn; it runs out");
        }
    }

    /// Rounds every third of a lease period until `shutdown`, then
    /// [`release_all`](Self::release_all).
    pub async fn run(mut self, shutdown: CancellationToken) {
        let every = self.settings.lease / 3;
        while !shutdown.is_cancelled() {
            match self.round().await {
                Ok(r) if !(r.taken.is_empty() && r.released.is_empty() && r.lost.is_empty()) => {
                    tracing::info!(
                        members = r.members,
                        share = r.share,
                        owned = ?self.owned(),
                        taken = ?r.taken,
                        released = ?r.released,
                        lost = ?r.lost,
                        "partition ownership changed"
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, owned = ?self.owned(), "partition leases not renewed; retrying")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(every) => {}
            }
        }
        self.release_all().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    /// Leases in memory, with a clock the test moves.
    #[derive(Clone, Default)]
    struct Mem {
        inner: Arc<Mutex<MemState>>,
    }

    #[derive(Default)]
    struct MemState {
        now: Duration,
        members: HashMap<String, (Duration, usize)>,
        leases: HashMap<u32, (String, Duration)>,
        down: bool,
    }

    impl Mem {
        fn advance(&self, d: Duration) {
            self.inner.lock().unwrap().now += d;
        }
        fn owner(&self, p: u32) -> Option<String> {
            let s = self.inner.lock().unwrap();
            s.leases
                .get(&p)
                .filter(|(_, until)| *until > s.now)
                .map(|(m, _)| m.clone())
        }
        fn check(&self) -> Result<(), StoreError> {
            if self.inner.lock().unwrap().down {
                return Err(StoreError::Unavailable("down".into()));
            }
            Ok(())
        }
    }

    impl Leases for Mem {
        async fn announce(
            &self,
            member: &str,
            ttl: Duration,
            holding: usize,
        ) -> Result<Membership, StoreError> {
            self.check()?;
            let mut s = self.inner.lock().unwrap();
            let now = s.now;
            s.members.insert(member.into(), (now + ttl, holding));
            s.members.retain(|_, (until, _)| *until > now);
            Ok(Membership {
                live: s.members.len(),
                fewest: s.members.values().map(|(_, n)| *n).min().unwrap_or(0),
            })
        }
        async fn leave(&self, member: &str) -> Result<(), StoreError> {
            self.inner.lock().unwrap().members.remove(member);
            Ok(())
        }
        async fn hold(&self, p: u32, member: &str, ttl: Duration) -> Result<bool, StoreError> {
            self.check()?;
            let free_or_mine = self.owner(p).is_none_or(|m| m == member);
            let mut s = self.inner.lock().unwrap();
            if free_or_mine {
                let until = s.now + ttl;
                s.leases.insert(p, (member.into(), until));
            }
            Ok(free_or_mine)
        }
        async fn release(&self, p: u32, member: &str) -> Result<(), StoreError> {
            if self.owner(p).as_deref() == Some(member) {
                self.inner.lock().unwrap().leases.remove(&p);
            }
            Ok(())
        }
    }

    fn worker(mem: &Mem, name: &str) -> Ownership<Mem> {
        Ownership::new(
            mem.clone(),
            OwnershipSettings {
                member: name.into(),
                partitions: 16,
                lease: Duration::from_secs(10),
            },
        )
        .0
    }

    /// Rounds of every worker until a pass changes nothing (after two: a
    /// worker sees a newcomer only in the pass after it announced itself).
    async fn settle(ws: &mut [Ownership<Mem>]) {
        for pass in 0..10 {
            let mut changed = false;
            for w in ws.iter_mut() {
                let r = w.round().await.unwrap();
                changed |= !(r.taken.is_empty() && r.released.is_empty());
            }
            if !changed && pass >= 1 {
                return;
            }
        }
        panic!("ownership did not settle");
    }

    fn assert_partitioned(ws: &[Ownership<Mem>], mem: &Mem) {
        let mut all: Vec<u32> = ws.iter().flat_map(|w| w.owned()).collect();
        all.sort();
        assert_eq!(
            all,
            (0..16).collect::<Vec<_>>(),
            "each partition owned once"
        );
        for w in ws {
            for p in w.owned() {
                assert_eq!(mem.owner(p).as_deref(), Some(w.settings.member.as_str()));
            }
        }
    }

    #[test]
    fn keep_gives_way_to_a_starved_worker() {
        let m = |live, fewest| Membership { live, fewest };
        assert_eq!(keep(16, m(5, 3)), 4);
        assert_eq!(keep(16, m(5, 0)), 3);
        assert_eq!(keep(16, m(1, 16)), 16);
        assert_eq!(keep(2, m(5, 0)), 1);
    }

    #[test]
    fn fair_share_rounds_up() {
        assert_eq!(fair_share(16, 1), 16);
        assert_eq!(fair_share(16, 3), 6);
        assert_eq!(fair_share(16, 5), 4);
        assert_eq!(fair_share(16, 0), 16);
        assert_eq!(fair_share(2, 5), 1);
    }

    #[tokio::test]
    async fn workers_split_the_partitions_and_rebalance_when_one_joins() {
        let mem = Mem::default();
        let mut ws = vec![worker(&mem, "a"), worker(&mem, "b")];
        settle(&mut ws).await;
        assert_partitioned(&ws, &mem);
        assert_eq!(ws[0].owned().len(), 8);
        ws.push(worker(&mem, "c"));
        settle(&mut ws).await;
        assert_partitioned(&ws, &mem);
        // 16 / 3: five or six each.
        let sizes: Vec<usize> = ws.iter().map(|w| w.owned().len()).collect();
        assert!(sizes.iter().all(|n| (5..=6).contains(n)), "{sizes:?}");
        // And five workers: three or four each.
        ws.push(worker(&mem, "d"));
        ws.push(worker(&mem, "e"));
        settle(&mut ws).await;
        assert_partitioned(&ws, &mem);
        let sizes: Vec<usize> = ws.iter().map(|w| w.owned().len()).collect();
        assert!(sizes.iter().all(|n| (3..=4).contains(n)), "{sizes:?}");
    }

    #[tokio::test]
    async fn a_dead_workers_partitions_are_taken_over_after_its_lease() {
        let mem = Mem::default();
        let mut ws = vec![worker(&mem, "a"), worker(&mem, "b"), worker(&mem, "c")];
        settle(&mut ws).await;
        let dead = ws.pop().unwrap().owned();
        assert!(!dead.is_empty());
        // Before the lease runs out the survivors cannot take them.
        mem.advance(Duration::from_secs(5));
        settle(&mut ws).await;
        for p in &dead {
            assert_eq!(mem.owner(*p).as_deref(), Some("c"));
        }
        mem.advance(Duration::from_secs(6));
        settle(&mut ws).await;
        assert_partitioned(&ws, &mem);
    }

    #[tokio::test]
    async fn a_clean_stop_hands_over_at_once() {
        let mem = Mem::default();
        let mut ws = vec![worker(&mem, "a"), worker(&mem, "b")];
        settle(&mut ws).await;
        let mut gone = ws.pop().unwrap();
        gone.release_all().await;
        assert!(gone.owned().is_empty());
        settle(&mut ws).await;
        assert_partitioned(&ws, &mem);
    }

    #[tokio::test]
    async fn a_worker_whose_relay_stalls_hands_its_partitions_over() {
        let mem = Mem::default();
        let progress = Progress::default();
        let stuck = Ownership::new(
            mem.clone(),
            OwnershipSettings {
                member: "stuck".into(),
                partitions: 16,
                lease: Duration::from_millis(100),
            },
        )
        .0
        .with_progress(progress.clone());
        let mut ws = vec![stuck, worker(&mem, "b")];
        settle(&mut ws).await;
        assert_eq!(ws[0].owned().len(), 8);
        // No mark for longer than a lease: it leaves, b takes everything.
        tokio::time::sleep(Duration::from_millis(150)).await;
        settle(&mut ws).await;
        assert!(ws[0].owned().is_empty());
        assert_eq!(ws[1].owned().len(), 16);
        assert_partitioned(&ws[1..], &mem);
        // Progress again: it takes its share back.
        progress.mark();
        settle(&mut ws).await;
        assert_partitioned(&ws, &mem);
        assert_eq!(ws[0].owned().len(), 8);
    }

    #[tokio::test]
    async fn unrenewed_leases_are_dropped_once_they_may_have_run_out() {
        let mem = Mem::default();
        let (mut w, assignment) = Ownership::new(
            mem.clone(),
            OwnershipSettings {
                member: "a".into(),
                partitions: 4,
                lease: Duration::from_millis(200),
            },
        );
        w.round().await.unwrap();
        assert_eq!(assignment.current(), vec![0, 1, 2, 3]);
        mem.inner.lock().unwrap().down = true;
        // Redis away: still ours until the lease may have run out...
        assert!(w.round().await.is_err());
        assert_eq!(assignment.current().len(), 4);
        tokio::time::sleep(Duration::from_millis(250)).await;
        // ...then given up, so that two owners are unlikely.
        assert!(w.round().await.is_err());
        assert!(assignment.current().is_empty());
    }
}
