//! [`Lifecycle`] on Redis: what the reconciler works from (due deadlines,
//! checks and cancellations, each claimed with a lease).

use super::*;

impl RedisStore {
    /// Takes due members of a schedule and leases them (`claim.lua`).
    pub(super) async fn claim(
        &self,
        schedule: String,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn().await?;
        self.scripts
            .claim
            .key(schedule)
            .arg(limit)
            .arg(millis(lease))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    /// Moves a member still in a schedule to `delay` from now (`reschedule.lua`).
    pub(super) async fn reschedule(
        &self,
        schedule: String,
        member: &str,
        delay: Duration,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: i64 = self
            .scripts
            .reschedule
            .key(schedule)
            .arg(member)
            .arg(millis(delay))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The keys of `settle_record` (common.lua), in its order. The last is
    /// this minute's settlement counts (by this process's clock: a skew
    /// between hosts moves a count to a neighbouring minute, nothing more).
    pub(super) fn settle_keys(&self, id: &PromiseId) -> [String; 10] {
        let p = self.keys.partition(id);
        let minute = chrono::Utc::now().timestamp().div_euclid(60);
        [
            self.keys.promise(id),
            self.keys.deadlines(p),
            self.keys.outbox(p),
            self.keys.runs(p),
            self.keys.polls(p),
            self.keys.cancels(p),
            self.keys.pending_by_second(p),
            self.keys.pending_seconds(p),
            self.keys.settled_in_minute(p, minute),
            self.keys.settled_order(p),
        ]
    }
}

impl Lifecycle for RedisStore {
    fn partitions(&self) -> u32 {
        self.keys.partitions()
    }

    async fn due_deadlines(
        &self,
        partition: u32,
        limit: usize,
    ) -> Result<Vec<PromiseId>, StoreError> {
        let mut conn = self.conn().await?;
        let v: Vec<String> = self
            .scripts
            .due
            .key(self.keys.deadlines(partition))
            .arg(limit)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(ids(v))
    }

    async fn expire(&self, id: &PromiseId) -> Result<ExpireOutcome, StoreError> {
        let mut inv = Call::new(&self.scripts.expire);
        for k in self.settle_keys(id) {
            inv.key(k);
        }
        inv.arg(id.as_str()).arg(self.retention_ms);
        let v = self.transition(&inv).await?;
        let (status, rest) = split_reply(v)?;
        Ok(match status.as_str() {
            "TIMEDOUT" => {
                let p = record(rest)?;
                count_settled(&p);
                ExpireOutcome::TimedOut(Box::new(p))
            }
            "NOT_DUE" => ExpireOutcome::NotDue,
            "SETTLED" | "GONE" => ExpireOutcome::Settled,
            other => return Err(StoreError::Protocol(format!("expire: {other}"))),
        })
    }

    async fn claim_polls(
        &self,
        partition: u32,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<PromiseId>, StoreError> {
        Ok(ids(self
            .claim(self.keys.polls(partition), limit, lease)
            .await?))
    }

    async fn reschedule_poll(&self, id: &PromiseId, delay: Duration) -> Result<(), StoreError> {
        self.reschedule(self.keys.polls(self.keys.partition(id)), id.as_str(), delay)
            .await
    }

    async fn claim_cancels(
        &self,
        partition: u32,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<PendingCancel>, StoreError> {
        let v = self
            .claim(self.keys.cancels(partition), limit, lease)
            .await?;
        Ok(v.into_iter()
            .filter_map(|member| {
                let (run, ws) = member.split_once(':')?;
                let run = RunId::parse(run).ok()?;
                Some(PendingCancel {
                    partition,
                    workspace: ws.to_owned(),
                    run,
                    member,
                })
            })
            .collect())
    }

    async fn reschedule_cancel(
        &self,
        c: &PendingCancel,
        delay: Duration,
    ) -> Result<(), StoreError> {
        self.reschedule(self.keys.cancels(c.partition), &c.member, delay)
            .await
    }

    async fn cancel_done(&self, c: &PendingCancel) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: i64 = redis::cmd("ZREM")
            .arg(self.keys.cancels(c.partition))
            .arg(&c.member)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn poll_run_now(&self, run: RunId) -> Result<Option<PromiseId>, StoreError> {
        // The run index is per partition and the run id does not say which:
        // one HGET per partition, sent together.
        let found = self
            .per_partition(|p, pipe| {
                pipe.hget(self.keys.runs(p), run.get());
            })
            .await?;
        let Some(id) = found
            .into_iter()
            .flatten()
            .find_map(|v| redis::from_redis_value::<Option<String>>(v).ok().flatten())
        else {
            return Ok(None);
        };
        let id = PromiseId::parse(&id).map_err(|e| StoreError::Protocol(e.to_string()))?;
        self.reschedule_poll(&id, Duration::ZERO).await?;
        Ok(Some(id))
    }
}
