//! Console sessions in Redis: one hash per session, its TTL the idle
//! expiry, its `expires` field the absolute one (checked by the script that
//! extends the TTL, so activity never keeps a session past it).

use super::{Call, RedisStore, unavailable};
use crate::store::{ConsoleSession, Sessions, StoreError};
use redis::Value;
use std::time::Duration;

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Sessions for RedisStore {
    async fn open_session(
        &self,
        id_hash: &str,
        session: &ConsoleSession,
        idle: Duration,
        absolute: Duration,
    ) -> Result<(), StoreError> {
        let mut call = Call::new(&self.scripts.session_open);
        call.key(self.keys.session(id_hash))
            .arg(&session.csrf)
            .arg(&session.operator)
            .arg(ms(idle))
            .arg(ms(absolute));
        self.transition(&call).await.map(drop)
    }

    async fn touch_session(
        &self,
        id_hash: &str,
        idle: Duration,
    ) -> Result<Option<ConsoleSession>, StoreError> {
        let mut call = Call::new(&self.scripts.session_touch);
        call.key(self.keys.session(id_hash)).arg(ms(idle));
        match self.transition(&call).await? {
            Value::Nil => Ok(None),
            Value::Array(v) => {
                let mut fields = v
                    .into_iter()
                    .map(|x| redis::from_redis_value::<String>(x).map_err(unavailable));
                match (fields.next(), fields.next()) {
                    (Some(csrf), Some(operator)) => Ok(Some(ConsoleSession {
                        csrf: csrf?,
                        operator: operator?,
                    })),
                    _ => Err(StoreError::Protocol("session_touch: short reply".into())),
                }
            }
            other => Err(StoreError::Protocol(format!("session_touch: {other:?}"))),
        }
    }

    async fn close_session(&self, id_hash: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("DEL")
            .arg(self.keys.session(id_hash))
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)
    }
}
