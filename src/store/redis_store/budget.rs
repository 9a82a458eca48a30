//! The workspaces' shared Databricks request budgets (`budget.lua`).

use super::*;

/// The shared Databricks request budget (see `databricks::RateBudget`).
impl RateBudget for RedisStore {
    fn try_acquire(
        &self,
        workspace: &str,
        class: CallClass,
        rate: f64,
        burst: u32,
    ) -> Pin<Box<dyn Future<Output = Result<Duration, String>> + Send + '_>> {
        let bucket = self.keys.budget(workspace, class.as_str());
        let pause = self.keys.budget_pause(workspace, class.as_str());
        Box::pin(async move {
            let mut conn = self.conn().await.map_err(|e| e.to_string())?;
            let wait: i64 = self
                .scripts
                .budget
                .key(bucket)
                .key(pause)
                .arg(rate)
                .arg(burst.max(1))
                .invoke_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Duration::from_millis(u64::try_from(wait).unwrap_or(0)))
        })
    }

    fn pause(
        &self,
        workspace: &str,
        class: CallClass,
        d: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        let key = self.keys.budget_pause(workspace, class.as_str());
        Box::pin(async move {
            let mut conn = self.conn().await.map_err(|e| e.to_string())?;
            // Never shorten a longer pause another worker already set.
            let ms = millis(d).max(1);
            let current: i64 = redis::cmd("PTTL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            if current < i64::try_from(ms).unwrap_or(i64::MAX) {
                let _: () = redis::cmd("SET")
                    .arg(&key)
                    .arg("1")
                    .arg("PX")
                    .arg(ms)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        })
    }
}
