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
    /// Runs a creation script and reads its answer. `sent` are the
    /// field/value pairs the script was given (after `creation_args`): a new
    /// record is those plus the few fields the script decides, so it is
    /// built here rather than read back (Redis answers a create with three
    /// values instead of the whole record). The fields set here are those
    /// `create_record` (common.lua) writes itself; the test
    /// `what_a_create_answers_is_what_a_read_finds` holds the two together.
    pub(super) async fn created(
        &self,
        inv: &Call<'_>,
        new: &NewPromise,
        sent: Vec<(&'static str, String)>,
    ) -> Result<CreateOutcome, StoreError> {
        let v = self.transition(inv).await?;
        let mut items: Vec<Value> =
            redis::from_redis_value(v).map_err(|e| StoreError::Protocol(e.to_string()))?;
        if items.is_empty() {
            return Err(StoreError::Protocol("create: empty reply".into()));
        }
        let status: String = redis::from_redis_value(items.remove(0))
            .map_err(|e| StoreError::Protocol(e.to_string()))?;
        match status.as_str() {
            "CREATED" => {
                let decided: Vec<String> = redis::from_redis_value(Value::Array(items))
                    .map_err(|e| StoreError::Protocol(e.to_string()))?;
                let [created, timeout] = <[String; 2]>::try_from(decided).map_err(|d| {
                    StoreError::Protocol(format!("create: {} values, not 2", d.len()))
                })?;
                let mut fields: HashMap<String, String> = sent
                    .into_iter()
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect();
                fields.extend([
                    (field::ID.to_owned(), new.id.as_str().to_owned()),
                    (field::STATE.to_owned(), State::Pending.as_str().to_owned()),
                    (field::CREATED.to_owned(), created),
                    (field::TIMEOUT.to_owned(), timeout),
                    (field::TOKEN_VERSION.to_owned(), "3".to_owned()),
                ]);
                if let Some(hb) = new.heartbeat {
                    fields.insert(field::HEARTBEAT.to_owned(), hb.as_secs().to_string());
                }
                metrics::counter!("runbridge_promises_created_total").increment(1);
                Ok(CreateOutcome::Created(Promise::from_fields(&fields)?))
            }
            "EXISTS" => Ok(CreateOutcome::Existing(record(
                items.pop().unwrap_or(Value::Nil),
            )?)),
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
        let pairs = field_pairs(new);
        for (k, v) in &pairs {
            inv.arg(*k).arg(v);
        }
        self.created(&inv, new, pairs).await
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
            .arg(if req.cancel_run { "1" } else { "0" })
            .arg(capability_arg(req.capability));
        let v = self.transition(&inv).await?;
        let (status, rest) = split_reply(v)?;
        match status.as_str() {
            "NOT_FOUND" => return Ok(SettleOutcome::NotFound),
            "NOT_OPENED" => return Ok(SettleOutcome::NotOpened),
            _ => {}
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

    async fn heartbeat(
        &self,
        id: &PromiseId,
        capability: Option<Incarnation>,
    ) -> Result<HeartbeatOutcome, StoreError> {
        let p = self.keys.partition(id);
        let v = self
            .transition(
                Call::new(&self.scripts.heartbeat)
                    .key(self.keys.promise(id))
                    .key(self.keys.deadlines(p))
                    .arg(id.as_str())
                    .arg(capability_arg(capability)),
            )
            .await?;
        let (status, rest) = split_reply(v)?;
        Ok(match status.as_str() {
            "NOT_FOUND" => HeartbeatOutcome::NotFound,
            "NOT_OPENED" => HeartbeatOutcome::NotOpened,
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
        self.search_indexes(q).await
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
