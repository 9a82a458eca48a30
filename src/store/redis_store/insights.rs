//! The console's overview and the metrics gauges: reads over every
//! partition, for people, on no hot path.

use super::*;

impl Insights for RedisStore {
    /// A pipeline per partition, sent together: the pending count, the
    /// per-second pending counts and the outbox length, and the last 60
    /// minutes' settlement counts.
    async fn overview(&self) -> Result<Overview, StoreError> {
        let minute_now = chrono::Utc::now().timestamp().div_euclid(60);
        let minutes: Vec<i64> = (minute_now - 59..=minute_now).collect();
        let replies = self
            .per_partition(|p, pipe| {
                pipe.cmd("ZCARD").arg(self.keys.deadlines(p));
                pipe.cmd("HGETALL").arg(self.keys.pending_by_second(p));
                pipe.cmd("XLEN").arg(self.keys.outbox(p));
                for m in &minutes {
                    pipe.cmd("HGETALL").arg(self.keys.settled_in_minute(p, *m));
                }
            })
            .await?;
        let secs = self.server_time_ms().await? / 1000;
        let mut out = Overview {
            settled_per_minute: vec![BTreeMap::new(); minutes.len()],
            ..Default::default()
        };
        let mut by_second: BTreeMap<u64, u64> = BTreeMap::new();
        for chunk in &replies {
            let n = |v: &Value| redis::from_redis_value::<u64>(v.clone()).unwrap_or(0);
            out.pending += n(&chunk[0]);
            let seconds: HashMap<u64, i64> =
                redis::from_redis_value(chunk[1].clone()).unwrap_or_default();
            for (s, count) in seconds {
                if count > 0 {
                    *by_second.entry(s).or_default() += count as u64;
                }
            }
            out.outbox += n(&chunk[2]);
            for (i, v) in chunk[3..].iter().enumerate() {
                let counts: HashMap<String, u64> =
                    redis::from_redis_value(v.clone()).unwrap_or_default();
                for (state, c) in counts {
                    *out.settled_per_minute[i].entry(state).or_default() += c;
                }
            }
        }
        out.pending_ages = by_second
            .into_iter()
            .map(|(s, c)| (Duration::from_secs(secs.saturating_sub(s)), c))
            .collect();
        Ok(out)
    }
}

/// One partition's sizes, for the metrics gauges.
#[derive(Debug, Clone)]
pub struct PartitionStats {
    pub partition: u32,
    pub pending: u64,
    /// How far past its deadline the most overdue pending promise is (the
    /// reconciler should have timed it out: a sweep is not running).
    pub overdue: Option<Duration>,
    /// Age of the oldest pending promise (to the second: counted per
    /// creation second, not per promise).
    pub oldest_pending_age: Option<Duration>,
    pub outbox: u64,
    pub outbox_oldest_age: Option<Duration>,
}
