//! [`PromiseStore`] on Redis: one Lua script per transition, and search.

use super::*;

/// `create_record`'s first five arguments (common.lua).
pub(super) fn creation_args(inv: &mut Call<'_>, new: &NewPromise, retention_ms: i64) {
    let (rel, abs) = match new.timeout {
        Timeout::After(d) => (d.as_millis() as i64, 0),
        Timeout::At(ms) => (0, ms.max(1)),
    };
    inv.arg(new.id.as_str())
        .arg(rel)
        .arg(abs)
        .arg(retention_ms)
        .arg(
            new.heartbeat
                .map(|d| d.as_secs().to_string())
                .unwrap_or_default(),
        );
}

/// The record's fields as `create_record` takes them (empty values are
/// not written).
pub(super) fn field_pairs(new: &NewPromise) -> Vec<(&'static str, String)> {
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    vec![
        (field::PARAM, json(&new.param)),
        (
            field::TAGS,
            if new.tags.is_empty() {
                String::new()
            } else {
                json(&new.tags)
            },
        ),
        (field::IKEY_CREATE, opt(&new.ikey_create)),
        (
            field::JOB_ID,
            new.job_id.map(|j| j.to_string()).unwrap_or_default(),
        ),
        (field::WORKSPACE, new.workspace.clone()),
        (field::REPLY_TO, opt(&new.reply_to)),
        (field::CORRELATION_ID, opt(&new.correlation_id)),
        (field::TRACEPARENT, opt(&new.traceparent)),
        (
            field::CANCEL_ON_TIMEOUT,
            if new.cancel_on_timeout { "1" } else { "0" }.into(),
        ),
        (
            field::PARENT,
            new.parent
                .as_ref()
                .map(|c| c.parent.to_string())
                .unwrap_or_default(),
        ),
        (
            field::RETRY,
            new.retry
                .as_ref()
                .map(|r| r.to_stored())
                .unwrap_or_default(),
        ),
        (
            field::PARENT_INDEX,
            new.parent
                .as_ref()
                .map(|c| c.index.to_string())
                .unwrap_or_default(),
        ),
    ]
}

impl RedisStore {
    /// Runs a creation script and reads its answer.
    pub(super) async fn created(&self, inv: &Call<'_>) -> Result<CreateOutcome, StoreError> {
        let v = self.transition(inv).await?;
        let (status, rest) = split_reply(v)?;
        let promise = record(rest)?;
        match status.as_str() {
            "CREATED" => {
                metrics::counter!("runbridge_promises_created_total").increment(1);
                Ok(CreateOutcome::Created(promise))
            }
            "EXISTS" => Ok(CreateOutcome::Existing(promise)),
            other => Err(StoreError::Protocol(format!("create: {other}"))),
        }
    }
}

impl PromiseStore for RedisStore {
    async fn create(&self, new: &NewPromise) -> Result<CreateOutcome, StoreError> {
        let p = self.keys.partition(&new.id);
        let mut inv = Call::new(&self.scripts.create);
        inv.key(self.keys.promise(&new.id))
            .key(self.keys.deadlines(p))
            .key(self.keys.pending_by_second(p))
            .key(self.keys.pending_seconds(p));
        creation_args(&mut inv, new, self.retention_ms);
        for (k, v) in field_pairs(new) {
            inv.arg(k).arg(v);
        }
        self.created(&inv).await
    }

    async fn record_run(
        &self,
        id: &PromiseId,
        run: RunId,
        run_page_url: Option<&str>,
    ) -> Result<RecordOutcome, StoreError> {
        let p = self.keys.partition(id);
        let v = self
            .transition(
                Call::new(&self.scripts.record_run)
                    .key(self.keys.promise(id))
                    .key(self.keys.runs(p))
                    .key(self.keys.polls(p))
                    .key(self.keys.cancels(p))
                    .arg(run.get())
                    .arg(run_page_url.unwrap_or(""))
                    .arg(id.as_str())
                    .arg(self.first_poll_ms),
            )
            .await?;
        let (status, rest) = split_reply(v)?;
        let rest: Option<String> =
            redis::from_redis_value(rest).map_err(|e| StoreError::Protocol(e.to_string()))?;
        match status.as_str() {
            "OK" => {
                let st = rest.unwrap_or_default();
                let st = st
                    .parse::<State>()
                    .map_err(|e| StoreError::Protocol(e.to_string()))?;
                Ok(RecordOutcome::Recorded(st))
            }
            "NOT_FOUND" => Ok(RecordOutcome::NotFound),
            "CONFLICT" => Ok(RecordOutcome::Conflict(rest.unwrap_or_default())),
            other => Err(StoreError::Protocol(format!("record_run: {other}"))),
        }
    }

    async fn settle(&self, req: &Settle) -> Result<SettleOutcome, StoreError> {
        // The value of a promise found past its timeout: the same reason the
        // deadline sweep gives (expire.lua).
        let timed_out =
            Payload::data(r#"{"reason":"timeout","message":"the promise passed its timeout"}"#);
        let mut inv = Call::new(&self.scripts.settle);
        for k in self.settle_keys(&req.id) {
            inv.key(k);
        }
        inv.arg(req.id.as_str())
            .arg(req.target.as_str())
            .arg(json(&req.value))
            .arg(req.ikey.as_deref().unwrap_or(""))
            .arg(if req.strict { "1" } else { "0" })
            .arg(req.settled_by.as_str())
            .arg(self.retention_ms)
            .arg(json(&timed_out))
            .arg(if req.cancel_run { "1" } else { "0" });
        let v = self.transition(&inv).await?;
        let (status, rest) = split_reply(v)?;
        if status == "NOT_FOUND" {
            return Ok(SettleOutcome::NotFound);
        }
        let promise = record(rest)?;
        if matches!(status.as_str(), "SETTLED" | "TIMEDOUT") {
            count_settled(&promise);
        }
        Ok(match status.as_str() {
            "SETTLED" => SettleOutcome::Settled(promise),
            "TIMEDOUT" => SettleOutcome::TimedOut(promise),
            "DEDUP" => SettleOutcome::Deduplicated(promise),
            "ALREADY" => SettleOutcome::AlreadySettled(promise),
            other => return Err(StoreError::Protocol(format!("settle: {other}"))),
        })
    }

    async fn heartbeat(&self, id: &PromiseId) -> Result<HeartbeatOutcome, StoreError> {
        let p = self.keys.partition(id);
        let v = self
            .transition(
                Call::new(&self.scripts.heartbeat)
                    .key(self.keys.promise(id))
                    .key(self.keys.deadlines(p))
                    .arg(id.as_str()),
            )
            .await?;
        let (status, rest) = split_reply(v)?;
        Ok(match status.as_str() {
            "NOT_FOUND" => HeartbeatOutcome::NotFound,
            "OK" => HeartbeatOutcome::Extended(record(rest)?),
            "SETTLED" => HeartbeatOutcome::Settled(record(rest)?),
            other => return Err(StoreError::Protocol(format!("heartbeat: {other}"))),
        })
    }

    async fn get(&self, id: &PromiseId) -> Result<Option<Promise>, StoreError> {
        let mut conn = self.conn().await?;
        let m: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.keys.promise(id))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if m.is_empty() {
            return Ok(None);
        }
        Ok(Some(Promise::from_fields(&m)?))
    }

    async fn search(&self, q: &SearchQuery) -> Result<SearchPage, StoreError> {
        // Cursor: which node (on a cluster, the index into its primaries in
        // address order; else 0), its SCAN cursor, and how many matches of
        // that batch were already returned, so a batch larger than the page
        // is never skipped. A failover between pages may repeat or skip
        // promises of the nodes that changed.
        let (mut node, mut scan, mut skip) = match &q.cursor {
            None => (0usize, 0u64, 0usize),
            Some(c) => decode_cursor(c).ok_or(StoreError::InvalidCursor)?,
        };
        let nodes = self.scan_nodes().await?;
        let pattern = self
            .keys
            .promise_pattern(if q.id.is_empty() { "*" } else { &q.id });
        let limit = q.limit.max(1);
        let mut conn = self.conn().await?;
        let mut out = Vec::new();
        let mut unreadable = 0;
        while let Some(address) = nodes.get(node) {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(scan)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500);
            let (next, mut batch): (u64, Vec<String>) = conn
                .query_on_address(address.as_ref().map(|(h, p)| (h.as_str(), *p)), &cmd)
                .await
                .map_err(|e| {
                    if e.to_string().contains("invalid cursor") {
                        StoreError::InvalidCursor
                    } else {
                        unavailable(e)
                    }
                })?;
            batch.sort();
            let mut matched = Vec::new();
            for key in batch {
                let m: HashMap<String, String> = redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                if m.is_empty() {
                    continue; // expired between SCAN and HGETALL
                }
                let p = match Promise::from_fields(&m) {
                    Ok(p) => p,
                    Err(e) => {
                        unreadable_record(&key, &e);
                        unreadable += 1;
                        continue;
                    }
                };
                let state_ok = q.states.as_ref().is_none_or(|s| s.contains(&p.state));
                let tags_ok = q.tags.iter().all(|(k, v)| p.tags.get(k) == Some(v));
                let job_ok = q.job_id.is_none_or(|j| p.job_id == Some(j));
                let ws_ok = q.workspace.as_ref().is_none_or(|w| &p.workspace == w);
                if state_ok && tags_ok && job_ok && ws_ok {
                    matched.push(p);
                }
            }
            let room = limit - out.len();
            let available = matched.len().saturating_sub(skip);
            if available > room {
                out.extend(matched.into_iter().skip(skip).take(room));
                return Ok(SearchPage {
                    promises: out,
                    cursor: Some(encode_cursor(node, scan, skip + room)),
                    unreadable,
                });
            }
            out.extend(matched.into_iter().skip(skip));
            skip = 0;
            scan = next;
            if scan == 0 {
                node += 1;
            }
            if out.len() == limit && node < nodes.len() {
                return Ok(SearchPage {
                    promises: out,
                    cursor: Some(encode_cursor(node, scan, 0)),
                    unreadable,
                });
            }
        }
        Ok(SearchPage {
            promises: out,
            cursor: None,
            unreadable,
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
