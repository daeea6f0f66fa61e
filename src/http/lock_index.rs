//! Finding a lock's customer from its id alone: Autumn's `finalize` does not
//! send `customer_id`. A reserve records `lock_id → customer_id`; a finalize
//! without a customer looks it up.
//!
//! This is a seam: [`MemoryLockIndex`] serves the in-process engine; a
//! Redis-backed index (one key per lock id, e.g. `cg1:{<escaped lock id>}:lockidx`,
//! with a TTL, so it stays cluster-safe) plugs in through the same trait.
//! Lock ids are unique per customer only; when two customers reuse one lock
//! id, the most recent reserve wins the index (send `customer_id` to be exact).

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::error::EngineError;

#[async_trait]
pub trait LockIndex: Send + Sync + 'static {
    /// Records (or refreshes) `lock_id → customer_id`. `keep_until` (ms) is
    /// when the entry may be forgotten; `None` keeps it until a later record
    /// sets a time (a pending lock without expiry).
    async fn record(
        &self,
        lock_id: &str,
        customer_id: &str,
        keep_until: Option<i64>,
        now: i64,
    ) -> Result<(), EngineError>;
    /// The customer that last reserved `lock_id`, if remembered.
    async fn lookup(&self, lock_id: &str, now: i64) -> Result<Option<String>, EngineError>;
}

/// The in-process index: a map, pruned of entries past their time.
#[derive(Default)]
pub struct MemoryLockIndex {
    map: Mutex<HashMap<String, (String, Option<i64>)>>,
}

const PRUNE_EVERY: usize = 4096;

#[async_trait]
impl LockIndex for MemoryLockIndex {
    async fn record(
        &self,
        lock_id: &str,
        customer_id: &str,
        keep_until: Option<i64>,
        now: i64,
    ) -> Result<(), EngineError> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() % PRUNE_EVERY == PRUNE_EVERY - 1 {
            map.retain(|_, (_, until)| until.is_none_or(|u| u > now));
        }
        map.insert(lock_id.to_string(), (customer_id.to_string(), keep_until));
        Ok(())
    }

    async fn lookup(&self, lock_id: &str, now: i64) -> Result<Option<String>, EngineError> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        Ok(map
            .get(lock_id)
            .filter(|(_, until)| until.is_none_or(|u| u > now))
            .map(|(c, _)| c.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn remembers_until_its_time() {
        let idx = MemoryLockIndex::default();
        idx.record("l1", "c1", None, 0).await.unwrap();
        assert_eq!(idx.lookup("l1", 10).await.unwrap().as_deref(), Some("c1"));
        idx.record("l1", "c1", Some(100), 10).await.unwrap();
        assert_eq!(idx.lookup("l1", 99).await.unwrap().as_deref(), Some("c1"));
        assert_eq!(idx.lookup("l1", 100).await.unwrap(), None);
        assert_eq!(idx.lookup("other", 0).await.unwrap(), None);
    }
}
