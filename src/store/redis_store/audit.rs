//! What the audit keeps per workspace (lease, last audit, walk cursor,
//! findings; all under the workspace's hash tag) and the two changes it
//! makes (a run's cancel, a run check made due), each one command or one
//! short script.

use super::*;

impl Audits for RedisStore {
    async fn hold_audit(
        &self,
        workspace: &str,
        member: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.hold_lease(self.keys.audit_lease(workspace), member, ttl)
            .await
    }

    async fn last_audit(&self, workspace: &str) -> Result<Option<i64>, StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("GET")
            .arg(self.keys.audit_last(workspace))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn audit_done(&self, workspace: &str, began: i64) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: () = redis::cmd("SET")
            .arg(self.keys.audit_last(workspace))
            .arg(began)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn pending_runs(
        &self,
        workspace: &str,
        count: usize,
    ) -> Result<Vec<(RunId, PromiseId)>, StoreError> {
        let mut conn = self.conn().await?;
        let at: Option<String> = redis::cmd("GET")
            .arg(self.keys.audit_cursor(workspace))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let (mut partition, mut cursor) = at
            .as_deref()
            .and_then(|a| a.split_once(':'))
            .and_then(|(p, c)| Some((p.parse::<u32>().ok()?, c.parse::<u64>().ok()?)))
            .filter(|(p, _)| *p < self.keys.partitions())
            .unwrap_or((0, 0));
        let mut out = Vec::new();
        // At most one pass over the partitions per call.
        for _ in 0..=self.keys.partitions() {
            let (next, pairs): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
                .arg(self.keys.runs(partition))
                .arg(cursor)
                .arg("COUNT")
                .arg(count.max(1))
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            out.extend(pairs.into_iter().filter_map(|(run, id)| {
                Some((RunId::parse(&run).ok()?, PromiseId::parse(&id).ok()?))
            }));
            cursor = next;
            if cursor == 0 {
                partition = (partition + 1) % self.keys.partitions();
            }
            if out.len() >= count {
                break;
            }
        }
        let _: () = redis::cmd("SET")
            .arg(self.keys.audit_cursor(workspace))
            .arg(format!("{partition}:{cursor}"))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(out)
    }

    async fn audit_active(&self, workspace: &str) -> Result<Vec<u64>, StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("SMEMBERS")
            .arg(self.keys.audit_active(workspace))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn set_audit_active(&self, workspace: &str, runs: &[u64]) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let key = self.keys.audit_active(workspace);
        // One auditor per workspace writes it: a pipeline, no transaction.
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(&key).ignore();
        for chunk in runs.chunks(1000) {
            pipe.cmd("SADD").arg(&key).arg(chunk).ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        Ok(())
    }

    async fn schedule_cancel(
        &self,
        promise: &PromiseId,
        workspace: &str,
        run: RunId,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let now = chrono::Utc::now().timestamp_millis();
        // NX: a cancel already scheduled (and maybe leased) keeps its time.
        let _: i64 = redis::cmd("ZADD")
            .arg(self.keys.cancels(self.keys.partition(promise)))
            .arg("NX")
            .arg(now)
            .arg(format!("{run}:{workspace}"))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn check_run_now(&self, id: &PromiseId) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let p = self.keys.partition(id);
        let done: i64 = self
            .scripts
            .check_run_now
            .key(self.keys.promise(id))
            .key(self.keys.polls(p))
            .arg(id.as_str())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(done == 1)
    }

    async fn finding(&self, workspace: &str, id: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("HGET")
            .arg(self.keys.audit_findings(workspace))
            .arg(id)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn put_finding(
        &self,
        workspace: &str,
        id: &str,
        record: &str,
        cap: usize,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let key = self.keys.audit_findings(workspace);
        // One auditor per workspace (its lease) writes here, so the size
        // read and the write need not be one step.
        let (known, len): (bool, usize) = redis::pipe()
            .cmd("HEXISTS")
            .arg(&key)
            .arg(id)
            .cmd("HLEN")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if !known && len >= cap {
            return Ok(false);
        }
        let _: i64 = redis::cmd("HSET")
            .arg(&key)
            .arg(id)
            .arg(record)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(true)
    }

    async fn findings(&self, workspace: &str) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("HVALS")
            .arg(self.keys.audit_findings(workspace))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn drop_findings(&self, workspace: &str, ids: &[String]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        let _: i64 = redis::cmd("HDEL")
            .arg(self.keys.audit_findings(workspace))
            .arg(ids)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn adopt_run(
        &self,
        id: &PromiseId,
        run: RunId,
        first_poll: Duration,
        replaced: &str,
    ) -> Result<AdoptOutcome, StoreError> {
        let mut conn = self.conn().await?;
        let p = self.keys.partition(id);
        let r: Vec<String> = self
            .scripts
            .adopt
            .key(self.keys.promise(id))
            .key(self.keys.runs(p))
            .key(self.keys.polls(p))
            .key(self.keys.retries(p))
            .arg(id.as_str())
            .arg(run.get())
            .arg(millis(first_poll))
            .arg(replaced)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let second = || r.get(1).cloned().unwrap_or_default();
        match r.first().map(String::as_str) {
            Some("OK") => Ok(AdoptOutcome::Adopted),
            Some("NOT_FOUND") => Ok(AdoptOutcome::NotFound),
            Some("SETTLED") => second()
                .parse()
                .map(AdoptOutcome::Settled)
                .map_err(|e| StoreError::Protocol(format!("adopt: {e}"))),
            Some("LAUNCHING") => Ok(AdoptOutcome::Launching),
            Some("TAKEN") => Ok(AdoptOutcome::Taken(second())),
            other => Err(StoreError::Protocol(format!("adopt answered {other:?}"))),
        }
    }
}
