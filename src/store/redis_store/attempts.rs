//! [`Attempts`] on Redis: retries (`attempt_failed.lua`,
//! `attempt_begin.lua`, `attempt_started.lua`, `retry_now.lua`, the `retries` schedule) and
//! progress (`progress.lua`, `progress_emit.lua`, the `progress` schedule).
//! Each step is one script on the promise's partition.

use super::*;

/// How long a claimed progress event is leased: long enough for one
/// script call, short enough that a worker dying between claim and
/// publish delays the event by little.
const PROGRESS_LEASE: Duration = Duration::from_secs(5);

/// The state a script answered with.
fn state_of(rest: Value) -> Result<State, StoreError> {
    let st: String =
        redis::from_redis_value(rest).map_err(|e| StoreError::Protocol(e.to_string()))?;
    st.parse()
        .map_err(|e: crate::domain::promise::UnknownState| StoreError::Protocol(e.to_string()))
}

/// The answer of an attempt's script: a status and the promise's state.
fn outcome(status: &str, rest: Value) -> Result<AttemptOutcome, StoreError> {
    Ok(match status {
        "WAITING" | "OK" => AttemptOutcome::Done,
        "STALE" => AttemptOutcome::Stale,
        "NOT_FOUND" => AttemptOutcome::NotFound,
        // `retry_now.lua`: not waiting, whether pending or settled.
        "NOT_WAITING" => match state_of(rest)? {
            State::Pending => AttemptOutcome::Stale,
            st => AttemptOutcome::Settled(st),
        },
        "SETTLED" => AttemptOutcome::Settled(state_of(rest)?),
        other => return Err(StoreError::Protocol(format!("attempt: {other}"))),
    })
}

impl Attempts for RedisStore {
    async fn attempt_failed(
        &self,
        id: &PromiseId,
        attempt: u32,
        failed: &serde_json::Value,
        delay: Duration,
    ) -> Result<AttemptOutcome, StoreError> {
        let p = self.keys.partition(id);
        let v = self
            .transition(
                Call::new(&self.scripts.attempt_failed)
                    .key(self.keys.promise(id))
                    .key(self.keys.deadlines(p))
                    .key(self.keys.polls(p))
                    .key(self.keys.retries(p))
                    .key(self.keys.runs(p))
                    .arg(id.as_str())
                    .arg(attempt)
                    .arg(failed.to_string())
                    .arg(millis(delay)),
            )
            .await?;
        let (status, rest) = split_reply(v)?;
        outcome(&status, rest)
    }

    async fn attempt_begin(
        &self,
        id: &PromiseId,
        attempt: u32,
        rerun: bool,
    ) -> Result<AttemptOutcome, StoreError> {
        let v = self
            .transition(
                Call::new(&self.scripts.attempt_begin)
                    .key(self.keys.promise(id))
                    .arg(id.as_str())
                    .arg(attempt)
                    .arg(if rerun { "1" } else { "0" }),
            )
            .await?;
        let (status, rest) = split_reply(v)?;
        outcome(&status, rest)
    }

    async fn attempt_started(
        &self,
        id: &PromiseId,
        attempt: u32,
        run: RunId,
        repair: Option<u64>,
    ) -> Result<AttemptOutcome, StoreError> {
        let p = self.keys.partition(id);
        let v = self
            .transition(
                Call::new(&self.scripts.attempt_started)
                    .key(self.keys.promise(id))
                    .key(self.keys.runs(p))
                    .key(self.keys.polls(p))
                    .key(self.keys.retries(p))
                    .key(self.keys.deadlines(p))
                    .key(self.keys.cancels(p))
                    .arg(id.as_str())
                    .arg(attempt)
                    .arg(run.get())
                    .arg(repair.map(|r| r.to_string()).unwrap_or_default())
                    .arg(self.first_poll_ms),
            )
            .await?;
        let (status, rest) = split_reply(v)?;
        outcome(&status, rest)
    }

    async fn claim_retries(
        &self,
        partition: u32,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<PromiseId>, StoreError> {
        Ok(ids(self
            .claim(self.keys.retries(partition), limit, lease)
            .await?))
    }

    async fn retry_later(&self, id: &PromiseId, delay: Duration) -> Result<(), StoreError> {
        self.reschedule(
            self.keys.retries(self.keys.partition(id)),
            id.as_str(),
            delay,
        )
        .await
    }

    async fn drop_retry(&self, id: &PromiseId) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: i64 = redis::cmd("ZREM")
            .arg(self.keys.retries(self.keys.partition(id)))
            .arg(id.as_str())
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn retry_now(&self, id: &PromiseId) -> Result<AttemptOutcome, StoreError> {
        let p = self.keys.partition(id);
        let v = self
            .transition(
                Call::new(&self.scripts.retry_now)
                    .key(self.keys.promise(id))
                    .key(self.keys.retries(p))
                    .arg(id.as_str()),
            )
            .await?;
        let (status, rest) = split_reply(v)?;
        outcome(&status, rest)
    }

    async fn progress(
        &self,
        id: &PromiseId,
        capability: Option<Incarnation>,
        members: &str,
        interval: Duration,
        history: u32,
    ) -> Result<ProgressOutcome, StoreError> {
        let p = self.keys.partition(id);
        let v = self
            .transition(
                Call::new(&self.scripts.progress)
                    .key(self.keys.promise(id))
                    .key(self.keys.deadlines(p))
                    .key(self.keys.outbox(p))
                    .key(self.keys.progress(p))
                    .arg(id.as_str())
                    .arg(members)
                    .arg(millis(interval))
                    .arg(history)
                    .arg(capability_arg(capability)),
            )
            .await?;
        let (status, rest) = split_reply(v)?;
        Ok(match status.as_str() {
            "NOT_OPENED" => ProgressOutcome::NotOpened,
            "OK" => ProgressOutcome::Recorded(
                redis::from_redis_value(rest).map_err(|e| StoreError::Protocol(e.to_string()))?,
            ),
            "NOT_FOUND" => ProgressOutcome::NotFound,
            "SETTLED" => ProgressOutcome::Settled(state_of(rest)?),
            other => return Err(StoreError::Protocol(format!("progress: {other}"))),
        })
    }

    async fn emit_due_progress(&self, partition: u32, limit: usize) -> Result<usize, StoreError> {
        let due = ids(self
            .claim(self.keys.progress(partition), limit, PROGRESS_LEASE)
            .await?);
        let mut emitted = 0;
        for id in due {
            let v = self
                .transition(
                    Call::new(&self.scripts.progress_emit)
                        .key(self.keys.promise(&id))
                        .key(self.keys.outbox(partition))
                        .key(self.keys.progress(partition))
                        .arg(id.as_str()),
                )
                .await?;
            if redis::from_redis_value::<i64>(v).unwrap_or(0) == 1 {
                emitted += 1;
            }
        }
        Ok(emitted)
    }
}
