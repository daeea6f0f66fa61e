//! The engine interface every store implements, and the ports the edges
//! (HTTP, the reset task) need from a store besides it: readiness and the
//! lock-id index. Both engines sit below: [`memory`] (in process) and
//! [`redis`] (Redis Functions on one customer's slot).

pub mod memory;
pub mod redis;

use async_trait::async_trait;

use crate::alerts::{AlertDef, AlertsUpdate};
use crate::calendar::Interval;
use crate::error::EngineError;
use crate::ledger::{Aggregate, AggregateQuery, EventsListQuery, EventsPage};
use crate::limits::{LimitDef, LimitsUpdate};
use crate::model::*;
use crate::money::Amount;

pub use memory::{MemoryEngine, MemoryLockIndex};
pub use redis::RedisEngine;

/// What one sweep of the periodic reset task did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Customers the sweep applied `reset_due` to.
    pub customers_swept: u64,
    /// Buckets that reset.
    pub resets_applied: u64,
    /// Index shards skipped because another sweeper held their lease.
    pub shards_leased_elsewhere: u64,
}

/// Which balance `balances.delete` removes: `balance_id`, or the one
/// balance of `feature_id` (of that reset `interval`, when given).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BalanceDelete {
    pub feature_id: Option<String>,
    pub balance_id: Option<String>,
    pub interval: Option<Interval>,
    /// Delete even when the balance was used this period.
    pub force: bool,
}

impl BalanceDelete {
    /// The input checks either engine makes before looking for the
    /// balance: valid ids, a known feature, and one of the two named.
    pub fn validate(&self, catalog: &Catalog) -> Result<(), EngineError> {
        if let Some(f) = &self.feature_id {
            crate::model::validate_id("feature_id", f)?;
            catalog
                .feature(f)
                .ok_or_else(|| EngineError::FeatureNotFound(f.clone()))?;
        }
        if let Some(id) = &self.balance_id {
            crate::model::validate_id("balance_id", id)?;
        }
        if self.feature_id.is_none() && self.balance_id.is_none() {
            return Err(crate::error::invalid(
                "balance_id",
                "give balance_id or feature_id",
            ));
        }
        Ok(())
    }
}

/// A store of customers' balances. Every method applies the customer's due
/// resets (and expired locks) first, then acts atomically.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Creates the customer; `false` when it already existed (nothing changes).
    async fn create_customer(&self, customer_id: &str) -> Result<bool, EngineError>;
    /// Adds a bucket; returns its balance id.
    async fn grant(&self, customer_id: &str, grant: &Grant) -> Result<String, EngineError>;
    /// Sets a bucket's remaining or adds to it.
    async fn update_bucket(
        &self,
        customer_id: &str,
        update: &BucketUpdate,
    ) -> Result<(), EngineError>;
    /// The exact dry run of consume; changes no balance.
    async fn check(
        &self,
        customer_id: &str,
        feature: &str,
        units: Amount,
    ) -> Result<Outcome, EngineError>;
    /// Consume, track, reserve or finalize, with an optional idempotency key.
    /// `track` with `reject` answers `insufficient: true` rather than an error
    /// here, so a caller can tell a replayed refusal; see [`Engine::track`].
    async fn apply(
        &self,
        customer_id: &str,
        op: &Op,
        idempotency_key: Option<&str>,
    ) -> Result<Outcome, EngineError>;
    /// Every owned pool's balance.
    async fn balances(&self, customer_id: &str) -> Result<CustomerBalances, EngineError>;
    /// Applies due resets, releases expired locks, forgets old records.
    /// Returns how many buckets reset.
    async fn reset_due(&self, customer_id: &str) -> Result<u32, EngineError>;
    /// Applies [`Engine::reset_due`] to every customer with something due
    /// now, in bounded batches: the periodic reset task. Correctness never
    /// depends on it, since every operation does the same lazily first; it
    /// keeps idle customers' balances (and what gateways read) on time.
    async fn sweep_due(&self) -> Result<SweepReport, EngineError>;

    /// Whether the store keeps limits (`crate::limits`). One that does not
    /// refuses every limit with [`EngineError::LimitsUnsupported`], so a
    /// limit is never silently ignored.
    fn supports_limits(&self) -> bool {
        false
    }

    /// Replaces the customer's limit lists the update names; answers every
    /// limit the customer then holds. All or nothing.
    async fn set_limits(
        &self,
        customer_id: &str,
        update: &LimitsUpdate,
    ) -> Result<Vec<LimitDef>, EngineError> {
        let _ = (customer_id, update);
        Err(EngineError::LimitsUnsupported)
    }

    /// Whether the store keeps usage alerts (`crate::alerts`). One that
    /// does not refuses every alert with [`EngineError::AlertsUnsupported`].
    fn supports_alerts(&self) -> bool {
        false
    }

    /// Replaces the customer's alert lists the update names; answers every
    /// alert the customer then holds. All or nothing.
    async fn set_alerts(
        &self,
        customer_id: &str,
        update: &AlertsUpdate,
    ) -> Result<Vec<AlertDef>, EngineError> {
        let _ = (customer_id, update);
        Err(EngineError::AlertsUnsupported)
    }

    /// Every alert the customer holds (a store without alerts: none).
    async fn alerts(&self, customer_id: &str) -> Result<Vec<AlertDef>, EngineError> {
        let _ = customer_id;
        Ok(vec![])
    }

    /// Whether the store keeps the usage ledger (`crate::ledger`). One
    /// that does not answers the usage queries and deletes with
    /// [`EngineError::LedgerNotConfigured`].
    fn has_ledger(&self) -> bool {
        false
    }

    /// `events.list`: a page of usage entries, newest first.
    async fn events_list(&self, q: &EventsListQuery) -> Result<EventsPage, EngineError> {
        let _ = q;
        Err(EngineError::LedgerNotConfigured)
    }

    /// `events.aggregate`: usage per bin over the query's range, resolved at
    /// the store's now.
    async fn events_aggregate(&self, q: &AggregateQuery) -> Result<Aggregate, EngineError> {
        let _ = q;
        Err(EngineError::LedgerNotConfigured)
    }

    /// Deletes a customer: balances, locks, limits, idempotency records and
    /// due state go; its ledger stays, ending with a `delete_customer` entry.
    async fn delete_customer(&self, customer_id: &str) -> Result<(), EngineError> {
        let _ = customer_id;
        Err(EngineError::LedgerNotConfigured)
    }

    /// Deletes one balance (unused this period, or with `force`), with a
    /// `delete_balance` entry; answers its id.
    async fn delete_balance(
        &self,
        customer_id: &str,
        delete: &BalanceDelete,
    ) -> Result<String, EngineError> {
        let _ = (customer_id, delete);
        Err(EngineError::LedgerNotConfigured)
    }

    async fn consume(
        &self,
        customer_id: &str,
        feature: &str,
        units: Amount,
        key: Option<&str>,
    ) -> Result<Outcome, EngineError> {
        let op = Op::Consume {
            feature: feature.into(),
            units,
        };
        self.apply(customer_id, &op, key).await
    }

    /// Track (a negative `units` refunds). `reject` refusals are
    /// `InsufficientBalance`, or `UsageLimitReached` for a limit.
    async fn track(
        &self,
        customer_id: &str,
        feature: &str,
        units: Amount,
        behavior: OverageBehavior,
        key: Option<&str>,
    ) -> Result<Outcome, EngineError> {
        let op = Op::Track {
            feature: feature.into(),
            units,
            behavior,
        };
        let out = self.apply(customer_id, &op, key).await?;
        if out.insufficient {
            return Err(EngineError::InsufficientBalance);
        }
        if let Some(d) = &out.limit {
            return Err(EngineError::UsageLimitReached(d.id.clone()));
        }
        Ok(out)
    }

    async fn reserve(
        &self,
        customer_id: &str,
        lock_id: &str,
        feature: &str,
        units: Amount,
        expires_at: Option<i64>,
        key: Option<&str>,
    ) -> Result<Outcome, EngineError> {
        let op = Op::Reserve {
            lock_id: lock_id.into(),
            feature: feature.into(),
            units,
            expires_at,
        };
        self.apply(customer_id, &op, key).await
    }

    async fn finalize(
        &self,
        customer_id: &str,
        lock_id: &str,
        action: FinalizeAction,
        override_units: Option<Amount>,
        key: Option<&str>,
    ) -> Result<Outcome, EngineError> {
        let op = Op::Finalize {
            lock_id: lock_id.into(),
            action,
            override_units,
        };
        self.apply(customer_id, &op, key).await
    }
}

/// Whether the store can serve (reachable, its code loaded). Kept outside the
/// [`Engine`] trait; the in-process engine is always ready.
#[async_trait]
pub trait Readiness: Send + Sync + 'static {
    async fn ready(&self) -> bool;
}

/// Always ready: the in-process engine.
pub struct AlwaysReady;

#[async_trait]
impl Readiness for AlwaysReady {
    async fn ready(&self) -> bool {
        true
    }
}

/// Finding a lock's customer from its id alone: Autumn's `finalize` does not
/// send `customer_id`. A reserve records `lock_id → customer_id`; a finalize
/// without a customer looks it up. The engine keeps lock ids unique per
/// customer; the index makes them unique across customers while it remembers
/// them: a reserve first *claims* the id, and a claim for an id another
/// customer holds is refused (409 `lock_already_exists`), so a finalize
/// without `customer_id` can never reach another customer's lock.
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
    /// Claims `lock_id` for `customer_id` until `keep_until` unless another
    /// customer holds it (a live entry): `false` then, and nothing changes.
    /// One atomic step, so two customers racing for one id cannot both win.
    async fn claim(
        &self,
        lock_id: &str,
        customer_id: &str,
        keep_until: i64,
        now: i64,
    ) -> Result<bool, EngineError>;
    /// The customer that last reserved `lock_id`, if remembered.
    async fn lookup(&self, lock_id: &str, now: i64) -> Result<Option<String>, EngineError>;
}
