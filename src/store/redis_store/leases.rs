//! Partition leases and worker membership (`lease.lua`, `announce.lua`).

use super::*;

/// Partition leases (see `partitions`): one key each, one script call.
impl Leases for RedisStore {
    async fn announce(
        &self,
        member: &str,
        ttl: Duration,
        holding: usize,
    ) -> Result<Membership, StoreError> {
        let mut conn = self.conn().await?;
        let (live, fewest): (usize, usize) = self
            .scripts
            .announce
            .key(self.keys.members())
            .key(self.keys.members_owned())
            .arg(member)
            .arg(millis(ttl).max(1))
            .arg(holding)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(Membership { live, fewest })
    }

    async fn leave(&self, member: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: (i64, i64) = self
            .scripts
            .announce
            .key(self.keys.members())
            .key(self.keys.members_owned())
            .arg(member)
            .arg("leave")
            .arg(0)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn hold(&self, partition: u32, member: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.hold_lease(self.keys.lease(partition), member, ttl)
            .await
    }

    async fn release(&self, partition: u32, member: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: i64 = self
            .scripts
            .lease
            .key(self.keys.lease(partition))
            .arg(member)
            .arg(0)
            .arg("release")
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

impl RedisStore {
    /// Takes the lease `key` if it is free, or renews it if `member` holds
    /// it (`lease.lua`); false while another member holds it. A partition's
    /// lease and a workspace's audit lease alike.
    pub(super) async fn hold_lease(
        &self,
        key: String,
        member: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let held: i64 = self
            .scripts
            .lease
            .key(key)
            .arg(member)
            .arg(millis(ttl).max(1))
            .arg("hold")
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(held == 1)
    }
}
