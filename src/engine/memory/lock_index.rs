//! The in-process [`LockIndex`]: a map from lock id to customer, pruned of
//! entries past their time.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::engine::LockIndex;
use crate::error::EngineError;

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

    async fn claim(
        &self,
        lock_id: &str,
        customer_id: &str,
        keep_until: i64,
        now: i64,
    ) -> Result<bool, EngineError> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let held_by_other = map
            .get(lock_id)
            .is_some_and(|(c, until)| c != customer_id && until.is_none_or(|u| u > now));
        if held_by_other {
            return Ok(false);
        }
        let until = match map.get(lock_id) {
            // Our own entry: never shorten it.
            Some((c, until)) if c == customer_id => until.map(|u| u.max(keep_until)),
            _ => Some(keep_until),
        };
        map.insert(lock_id.to_string(), (customer_id.to_string(), until));
        Ok(true)
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

    #[tokio::test]
    async fn a_claim_on_another_customers_live_id_is_refused() {
        let idx = MemoryLockIndex::default();
        assert!(idx.claim("l1", "c1", 100, 0).await.unwrap());
        assert!(!idx.claim("l1", "c2", 100, 50).await.unwrap());
        assert_eq!(idx.lookup("l1", 50).await.unwrap().as_deref(), Some("c1"));
        assert!(
            idx.claim("l1", "c1", 200, 50).await.unwrap(),
            "the holder may claim again"
        );
        assert!(
            idx.claim("l1", "c2", 300, 200).await.unwrap(),
            "free once lapsed"
        );
        assert_eq!(idx.lookup("l1", 250).await.unwrap().as_deref(), Some("c2"));
    }
}
