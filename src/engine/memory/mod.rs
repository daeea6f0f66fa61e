//! The in-process engine: the rules of [`crate::rules`] over a map of
//! customers. The default when no Redis is configured, and the reference the
//! Redis engine is tested against.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::{Engine, SweepReport};
use crate::clock::Clock;
use crate::error::EngineError;
use crate::limits::{LimitDef, LimitsUpdate};
use crate::model::*;
use crate::money::Amount;
use crate::rules;

pub mod lock_index;

pub use lock_index::MemoryLockIndex;

const SHARDS: usize = 64;

/// Balances that live only in this process.
pub struct MemoryEngine {
    catalog: Arc<Catalog>,
    clock: Arc<dyn Clock>,
    retention: Retention,
    shards: Vec<Mutex<HashMap<String, CustomerState>>>,
}

impl MemoryEngine {
    pub fn new(catalog: Arc<Catalog>, clock: Arc<dyn Clock>, retention: Retention) -> MemoryEngine {
        MemoryEngine {
            catalog,
            clock,
            retention,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    fn shard(&self, customer_id: &str) -> MutexGuard<'_, HashMap<String, CustomerState>> {
        let mut h = DefaultHasher::new();
        customer_id.hash(&mut h);
        let shard = &self.shards[h.finish() as usize % SHARDS];
        // A panic while holding the lock cannot leave a half-applied state:
        // every rule works on a copy and commits by assignment.
        shard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the prepared state of an existing customer.
    fn with_customer<T>(
        &self,
        customer_id: &str,
        f: impl FnOnce(&mut CustomerState, i64) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        validate_id("customer_id", customer_id)?;
        let now = self.clock.now_ms();
        let mut shard = self.shard(customer_id);
        let state = shard
            .get_mut(customer_id)
            .ok_or(EngineError::CustomerNotFound)?;
        rules::prepare(state, now, self.retention);
        // No copy needed: every rule works on its own copy of the buckets and
        // commits by assignment only once it can no longer fail.
        f(state, now)
    }

    fn pools_of(&self, state: &CustomerState, feature: Option<&str>) -> Vec<PoolBalance> {
        let Some(Ok(pools)) = feature.map(|f| self.catalog.pools_for(f)) else {
            return vec![];
        };
        pools
            .iter()
            .map(|p| rules::pool_balance(&state.buckets, &p.pool))
            .collect()
    }
}

#[async_trait]
impl Engine for MemoryEngine {
    async fn create_customer(&self, customer_id: &str) -> Result<bool, EngineError> {
        validate_id("customer_id", customer_id)?;
        let now = self.clock.now_ms();
        let mut shard = self.shard(customer_id);
        if shard.contains_key(customer_id) {
            return Ok(false);
        }
        let state = CustomerState {
            id: customer_id.to_string(),
            created_at: now,
            next_seq: 1,
            buckets: vec![],
            locks: BTreeMap::new(),
            idempotency: BTreeMap::new(),
            limits: vec![],
        };
        shard.insert(customer_id.to_string(), state);
        Ok(true)
    }

    async fn grant(&self, customer_id: &str, grant: &Grant) -> Result<String, EngineError> {
        self.with_customer(customer_id, |s, now| {
            rules::grant(s, &self.catalog, grant, now)
        })
    }

    async fn update_bucket(
        &self,
        customer_id: &str,
        update: &BucketUpdate,
    ) -> Result<(), EngineError> {
        self.with_customer(customer_id, |s, _| {
            rules::update_bucket(s, &self.catalog, update)
        })
    }

    async fn check(
        &self,
        customer_id: &str,
        feature: &str,
        units: Amount,
    ) -> Result<Outcome, EngineError> {
        self.with_customer(customer_id, |s, now| {
            let stored = rules::check(s, &self.catalog, feature, units, now)?;
            let mut out = Outcome::new(stored, false, self.pools_of(s, Some(feature)), now);
            out.limits = rules::limit_statuses(s, &self.catalog, feature, now);
            Ok(out)
        })
    }

    async fn apply(
        &self,
        customer_id: &str,
        op: &Op,
        key: Option<&str>,
    ) -> Result<Outcome, EngineError> {
        self.with_customer(customer_id, |s, now| {
            let applied = rules::apply(s, &self.catalog, op, key, now, self.retention)?;
            let pools = self.pools_of(s, op.feature(s));
            let mut out = Outcome::new(applied.outcome, applied.replayed, pools, now);
            if let Some(f) = op.feature(s) {
                out.limits = rules::limit_statuses(s, &self.catalog, f, now);
            }
            Ok(out)
        })
    }

    async fn balances(&self, customer_id: &str) -> Result<CustomerBalances, EngineError> {
        self.with_customer(customer_id, |s, _| {
            let pools = self
                .catalog
                .features()
                .iter()
                .filter(|f| s.buckets.iter().any(|b| b.pool == f.id))
                .map(|f| rules::pool_balance(&s.buckets, &f.id))
                .collect();
            Ok(CustomerBalances {
                customer_id: s.id.clone(),
                created_at: s.created_at,
                pools,
                limits: s.limits.iter().map(|l| l.def.clone()).collect(),
            })
        })
    }

    fn supports_limits(&self) -> bool {
        true
    }

    async fn set_limits(
        &self,
        customer_id: &str,
        update: &LimitsUpdate,
    ) -> Result<Vec<LimitDef>, EngineError> {
        self.with_customer(customer_id, |s, _| {
            rules::set_limits(s, update)?;
            Ok(s.limits.iter().map(|l| l.def.clone()).collect())
        })
    }

    async fn reset_due(&self, customer_id: &str) -> Result<u32, EngineError> {
        validate_id("customer_id", customer_id)?;
        let now = self.clock.now_ms();
        let mut shard = self.shard(customer_id);
        let state = shard
            .get_mut(customer_id)
            .ok_or(EngineError::CustomerNotFound)?;
        let resets = rules::prepare(state, now, self.retention);
        rules::forget_expired_records(state, now);
        Ok(resets)
    }

    /// Visits every customer, one shard lock at a time, so no batch holds up
    /// requests to other shards for long.
    async fn sweep_due(&self) -> Result<SweepReport, EngineError> {
        let mut report = SweepReport::default();
        for shard in &self.shards {
            let now = self.clock.now_ms();
            {
                let mut customers = shard.lock().unwrap_or_else(|e| e.into_inner());
                for state in customers.values_mut() {
                    let resets = rules::prepare(state, now, self.retention);
                    rules::forget_expired_records(state, now);
                    report.customers_swept += 1;
                    report.resets_applied += resets as u64;
                }
            }
            tokio::task::yield_now().await;
        }
        Ok(report)
    }
}
