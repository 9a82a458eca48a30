//! Every Redis key runbridge uses comes from here (docs/contracts.md, the Redis layout).
//!
//! All keys of one promise and of its partition share the hash tag `{p<N>}`,
//! so each Lua script touches a single slot and the layout runs unchanged on
//! Redis Cluster. `N` is FNV-1a (32-bit) of the promise id modulo the
//! partition count: stable across versions and platforms, which matters
//! because changing it would orphan every stored promise.

use crate::domain::PromiseId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
    partitions: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("redis.key_prefix must be 1-64 characters of [A-Za-z0-9_.:-], got {0:?}")]
    Prefix(String),
    #[error("redis.partitions must be between 1 and 16384, got {0}")]
    Partitions(u32),
}

/// FNV-1a, 32-bit. Written out rather than taken from a crate so that the
/// partition of a promise can never change under a dependency upgrade.
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

impl Keys {
    pub fn new(prefix: &str, partitions: u32) -> Result<Self, KeysError> {
        // The prefix goes into SCAN patterns, so glob characters are refused.
        if prefix.is_empty()
            || prefix.len() > 64
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'))
        {
            return Err(KeysError::Prefix(prefix.to_owned()));
        }
        if partitions == 0 || partitions > 16_384 {
            return Err(KeysError::Partitions(partitions));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            partitions,
        })
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    pub fn partition(&self, id: &PromiseId) -> u32 {
        fnv1a32(id.as_str().as_bytes()) % self.partitions
    }

    pub fn promise(&self, id: &PromiseId) -> String {
        self.promise_prefix(self.partition(id)) + id.as_str()
    }

    pub fn deadlines(&self, partition: u32) -> String {
        format!("{}:{{p{partition}}}:deadlines", self.prefix)
    }

    /// Pending promises counted by the second they were created in (hash:
    /// second → count), and those seconds in order (sorted set, score = the
    /// second): the oldest pending promise's age in O(log n), at a cost per
    /// second with pending promises, not per promise.
    pub fn pending_by_second(&self, partition: u32) -> String {
        format!("{}:{{p{partition}}}:pending_by_second", self.prefix)
    }

    /// The ids of the promises created in one second and still pending
    /// (hash: id → ""): what searches walk, in creation order.
    pub fn pending_in_second(&self, partition: u32, second: u64) -> String {
        format!("{}:{second}", self.pending_by_second(partition))
    }

    pub fn pending_seconds(&self, partition: u32) -> String {
        format!("{}:{{p{partition}}}:pending_seconds", self.prefix)
    }

    /// Settlements in one minute (`minute` = Unix seconds / 60), a hash
    /// state → count that expires after two hours: the console's settle rate.
    pub fn settled_in_minute(&self, partition: u32, minute: i64) -> String {
        format!("{}:{{p{partition}}}:settled:{minute}", self.prefix)
    }

    /// Settled promises by settlement time (sorted set, score = ms): what
    /// searches walk for settled states. Entries older than the retention
    /// leave at the next settlement of the partition, as their records expire.
    pub fn settled_order(&self, partition: u32) -> String {
        format!("{}:{{p{partition}}}:settled_order", self.prefix)
    }

    /// A partition's version: +1 at every create, settlement or indexing in
    /// it (the scripts name it from a key of the partition: `common.lua`'s
    /// `version_key`), so a search can tell a partition changed meanwhile.
    pub fn version(&self, partition: u32) -> String {
        format!("{}:{{p{partition}}}:version", self.prefix)
    }

    /// The beginning of every promise key of a partition (searches add the id).
    pub fn promise_prefix(&self, partition: u32) -> String {
        format!("{}:{{p{partition}}}:promise:", self.prefix)
    }

    pub fn outbox(&self, partition: u32) -> String {
        format!("{}:{{p{partition}}}:outbox", self.prefix)
    }

    pub fn runs(&self, partition: u32) -> String {
        format!("{}:{{p{partition}}}:runs", self.prefix)
    }

    /// Pending promises with a run, by time of their next `runs/get` check.
    pub fn polls(&self, partition: u32) -> String {
        format!("{}:{{p{partition}}}:polls", self.prefix)
    }

    /// Runs to cancel (`<run_id>:<workspace>`), by time of the next attempt.
    pub fn cancels(&self, partition: u32) -> String {
        format!("{}:{{p{partition}}}:cancels", self.prefix)
    }

    /// Promises waiting for their next attempt, scored by when it is due.
    pub fn retries(&self, partition: u32) -> String {
        format!("{}:{{p{partition}}}:retries", self.prefix)
    }

    /// Promises with a progress event scheduled, scored by when it is due.
    pub fn progress(&self, partition: u32) -> String {
        format!("{}:{{p{partition}}}:progress", self.prefix)
    }

    /// A parent's children (hash, in the parent's partition): `i<n>` each
    /// child's id, and as their outcomes arrive `s<n>` state, `v<n>` value
    /// data, `done` how many, `first` the decisive one.
    pub fn children(&self, parent: &PromiseId) -> String {
        format!(
            "{}:{{p{}}}:children:{}",
            self.prefix,
            self.partition(parent),
            parent
        )
    }

    /// Parents whose next fan-out step (launching children) is due, by time.
    pub fn fanout(&self, partition: u32) -> String {
        format!("{}:{{p{partition}}}:fanout", self.prefix)
    }

    /// A workspace's shared token bucket for one class of calls. The hash tag
    /// is the workspace, so bucket and pause live in one slot.
    pub fn budget(&self, workspace: &str, class: &str) -> String {
        format!("{}:{{ws:{workspace}}}:budget:{class}", self.prefix)
    }

    /// Set (with an expiry) while a workspace answered a call class with
    /// 429 and that class must be left alone.
    pub fn budget_pause(&self, workspace: &str, class: &str) -> String {
        format!("{}:{{ws:{workspace}}}:pause:{class}", self.prefix)
    }

    /// When a completion event last came back unroutable (ms; absent once
    /// one is routed again): no queue was bound to the events exchange.
    /// Written by the relays, read by `runbridge check`.
    pub fn events_unroutable(&self) -> String {
        format!("{}:{{events}}:unroutable", self.prefix)
    }

    /// The worker auditing a workspace (string, with an expiry; see
    /// `audit`): one at a time, in the workspace's slot.
    pub fn audit_lease(&self, workspace: &str) -> String {
        format!("{}:{{ws:{workspace}}}:audit:lease", self.prefix)
    }

    /// When the workspace's last audit began (epoch ms): the next one
    /// lists the runs started since then, less an overlap.
    pub fn audit_last(&self, workspace: &str) -> String {
        format!("{}:{{ws:{workspace}}}:audit:last", self.prefix)
    }

    /// Where the audit's walk of the pending promises' runs stands
    /// (`<partition>:<HSCAN cursor>`).
    pub fn audit_cursor(&self, workspace: &str) -> String {
        format!("{}:{{ws:{workspace}}}:audit:cursor", self.prefix)
    }

    /// The runs the workspace's last audit saw active (set of run ids): the
    /// next audit reads those no longer active, which have ended since.
    pub fn audit_active(&self, workspace: &str) -> String {
        format!("{}:{{ws:{workspace}}}:audit:active", self.prefix)
    }

    /// The workspace's audit findings (hash: finding id → JSON record).
    pub fn audit_findings(&self, workspace: &str) -> String {
        format!("{}:{{ws:{workspace}}}:audit:findings", self.prefix)
    }

    /// The worker owning a partition (string, with an expiry; see
    /// `partitions`). In the partition's slot, like everything of it.
    pub fn lease(&self, partition: u32) -> String {
        format!("{}:{{p{partition}}}:lease", self.prefix)
    }

    /// Live workers (sorted set: name → until when it counts as live).
    pub fn members(&self) -> String {
        format!("{}:{{members}}:workers", self.prefix)
    }

    /// How many partitions each live worker holds (hash: name → count).
    pub fn members_owned(&self) -> String {
        format!("{}:{{members}}:owned", self.prefix)
    }

    /// One console session (hash: csrf, op, expires), named by the SHA-256
    /// of the cookie's value, so reading Redis gives no usable cookie.
    pub fn session(&self, id_hash: &str) -> String {
        format!("{}:{{sessions}}:{id_hash}", self.prefix)
    }

    /// Set once every promise stored before searches had indexes is in
    /// them (the version of that layout).
    pub fn search_indexes(&self) -> String {
        format!("{}:{{index}}:search_indexes", self.prefix)
    }

    /// SCAN pattern for promise keys whose id matches `id_glob` (`*` only;
    /// ids cannot contain other glob characters).
    pub fn promise_pattern(&self, id_glob: &str) -> String {
        format!("{}:{{p*}}:promise:{id_glob}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_design() {
        let k = Keys::new("rb", 16).unwrap();
        let id = PromiseId::parse("nightly-sales-2026-11-23").unwrap();
        let n = k.partition(&id);
        assert!(n < 16);
        assert_eq!(
            k.promise(&id),
            format!("rb:{{p{n}}}:promise:nightly-sales-2026-11-23")
        );
        assert_eq!(k.deadlines(n), format!("rb:{{p{n}}}:deadlines"));
        assert_eq!(
            k.promise_prefix(n) + id.as_str(),
            k.promise(&id),
            "searches build promise keys from the prefix"
        );
        assert_eq!(k.pending_in_second(3, 17), "rb:{p3}:pending_by_second:17");
        assert_eq!(k.settled_order(3), "rb:{p3}:settled_order");
        assert_eq!(k.outbox(3), "rb:{p3}:outbox");
        assert_eq!(k.runs(3), "rb:{p3}:runs");
        assert_eq!(k.polls(3), "rb:{p3}:polls");
        assert_eq!(k.cancels(3), "rb:{p3}:cancels");
        assert_eq!(k.lease(3), "rb:{p3}:lease");
        assert_eq!(k.fanout(3), "rb:{p3}:fanout");
        assert_eq!(
            k.children(&id),
            format!("rb:{{p{n}}}:children:nightly-sales-2026-11-23")
        );
    }

    #[test]
    fn partition_is_stable() {
        // Reference values of FNV-1a 32 (from the FNV test vectors).
        assert_eq!(fnv1a32(b""), 0x811c9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9cf968);
    }

    #[test]
    fn bad_prefix_or_partitions() {
        assert!(Keys::new("rb*", 16).is_err());
        assert!(Keys::new("", 16).is_err());
        assert!(Keys::new("rb", 0).is_err());
    }
}
