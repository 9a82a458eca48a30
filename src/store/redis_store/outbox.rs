//! The outbox streams, read by a relay in a consumer group.

use super::*;

impl RedisOutbox {
    pub(super) async fn ensure_groups(&mut self) -> Result<(), StoreError> {
        for p in 0..self.store.keys.partitions() {
            // From 0, not $: entries written before the group existed are announced too.
            let r: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(self.store.keys.outbox(p))
                .arg(&self.group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut self.conn)
                .await;
            match r {
                Ok(()) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(unavailable(e)),
            }
        }
        self.groups_ready = true;
        Ok(())
    }

    pub(super) fn entry(&self, partition: u32, s: StreamId) -> OutboxEntry {
        let fields: HashMap<String, String> = s
            .map
            .into_iter()
            .filter_map(|(k, v)| redis::from_redis_value::<String>(v).ok().map(|v| (k, v)))
            .collect();
        OutboxEntry {
            partition,
            entry_id: s.id,
            promise: Promise::from_fields(&fields),
        }
    }

    pub(super) fn partition_of(&self, key: &str) -> Option<u32> {
        (0..self.store.keys.partitions()).find(|p| self.store.keys.outbox(*p) == key)
    }

    /// `cmd` in a pipeline, followed by the store's `WAIT` if it has one.
    pub(super) fn with_wait(&self, cmd: redis::Cmd) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        if let Some(w) = self.store.wait_cmd() {
            pipe.add_command(w);
        }
        pipe
    }

    /// `XREADGROUP` of new entries of these partitions' streams.
    pub(super) fn read_cmd(
        &self,
        partitions: &[u32],
        count: usize,
        block: Option<Duration>,
    ) -> redis::Cmd {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count);
        if let Some(b) = block {
            cmd.arg("BLOCK").arg(b.as_millis() as u64);
        }
        cmd.arg("STREAMS");
        for p in partitions {
            cmd.arg(self.store.keys.outbox(*p));
        }
        for _ in partitions {
            cmd.arg(">");
        }
        cmd
    }

    pub(super) async fn retry_groups<T>(
        &mut self,
        r: redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                // A Redis that lost its data (or a stream deleted by hand) has no
                // group: recreate it on the next round.
                if e.code() == Some("NOGROUP") {
                    self.groups_ready = false;
                }
                Err(unavailable(e))
            }
        }
    }
}

impl Outbox for RedisOutbox {
    /// On one Redis: one `XREADGROUP` over the partitions' streams, blocking
    /// up to `block`. On a cluster the streams live on different primaries
    /// and one command cannot name them all (CROSSSLOT), so each partition
    /// is read on its own, without blocking (a blocked read would hold up
    /// the node's shared connection), and an empty round waits
    /// [`CLUSTER_IDLE_POLL`] (at most `block`) before returning.
    async fn read_new(
        &mut self,
        partitions: &[u32],
        count: usize,
        block: Duration,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        if !self.groups_ready {
            self.ensure_groups().await?;
        }
        if partitions.is_empty() {
            tokio::time::sleep(block).await;
            return Ok(Vec::new());
        }
        // Each read is followed in its pipeline by the WAIT, if any (see
        // below).
        let replies = if self.store.is_cluster() {
            try_join_all(partitions.iter().map(|p| {
                let pipe = self.with_wait(self.read_cmd(&[*p], count, None));
                let mut conn = self.conn.clone();
                async move { pipe.query_async::<Vec<Value>>(&mut conn).await }
            }))
            .await
        } else {
            let pipe = self.with_wait(self.read_cmd(partitions, count, Some(block)));
            pipe.query_async::<Vec<Value>>(&mut self.conn)
                .await
                .map(|r| vec![r])
        };
        let replies = self.retry_groups(replies).await?;
        let mut out = Vec::new();
        for reply in replies {
            let mut reply = reply.into_iter();
            let read: Option<StreamReadReply> = reply
                .next()
                .map(redis::from_redis_value)
                .transpose()
                .map_err(|e| StoreError::Protocol(e.to_string()))?
                .flatten();
            let keys = read.map(|r| r.keys).unwrap_or_default();
            // With redis.wait_replicas, publish only settlements the replicas
            // have: a primary lost before replicating one would otherwise
            // leave an event for a settlement that no longer exists.
            // XREADGROUP is a write (it records the delivery), so the WAIT
            // after it covers everything it returned. Not replicated in time:
            // an error, and the entries come back through reclaim.
            if !keys.is_empty() && self.store.wait_replicas > 0 {
                self.store.check_replicated(reply.next())?;
            }
            for k in keys {
                let Some(p) = self.partition_of(&k.key) else {
                    continue;
                };
                for s in k.ids {
                    out.push(self.entry(p, s));
                }
            }
        }
        if out.is_empty() && self.store.is_cluster() {
            tokio::time::sleep(block.min(CLUSTER_IDLE_POLL)).await;
        }
        Ok(out)
    }

    async fn reclaim(
        &mut self,
        partitions: &[u32],
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        if !self.groups_ready {
            self.ensure_groups().await?;
        }
        let mut out = Vec::new();
        for &p in partitions {
            let start = self.reclaim_cursor[p as usize].clone();
            let mut cmd = redis::cmd("XAUTOCLAIM");
            cmd.arg(self.store.keys.outbox(p))
                .arg(&self.group)
                .arg(&self.consumer)
                .arg(min_idle.as_millis() as u64)
                .arg(start)
                .arg("COUNT")
                .arg(count);
            // Followed by the WAIT, as a read is (XAUTOCLAIM is a write too).
            let r = self
                .with_wait(cmd)
                .query_async::<Vec<Value>>(&mut self.conn)
                .await;
            let mut replies = self.retry_groups(r).await?.into_iter();
            let reply: StreamAutoClaimReply = replies
                .next()
                .map(redis::from_redis_value)
                .transpose()
                .map_err(|e| StoreError::Protocol(e.to_string()))?
                .ok_or_else(|| StoreError::Protocol("no reply to XAUTOCLAIM".into()))?;
            if !reply.claimed.is_empty() && self.store.wait_replicas > 0 {
                self.store.check_replicated(replies.next())?;
            }
            self.reclaim_cursor[p as usize] = reply.next_stream_id;
            for s in reply.claimed {
                out.push(self.entry(p, s));
            }
        }
        Ok(out)
    }

    async fn ack(&mut self, entry: &OutboxEntry, published: bool) -> Result<(), StoreError> {
        let mut inv = self.store.scripts.outbox_ack.prepare_invoke();
        inv.key(self.store.keys.outbox(entry.partition));
        // The promise notes when its completion event went out (if it is
        // still there; a progress entry's promise is pending).
        match (&entry.promise, published) {
            (Ok(p), true) if p.state.is_settled() => inv.key(self.store.keys.promise(&p.id)),
            _ => &mut inv,
        };
        let _: i64 = inv
            .arg(&self.group)
            .arg(&entry.entry_id)
            .invoke_async(&mut self.conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
