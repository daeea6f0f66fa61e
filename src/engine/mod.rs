//! The engine interface every store implements, and the clock it reads.

pub mod memory;

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use crate::error::EngineError;
use crate::model::*;
use crate::money::Amount;
use crate::rules::Op;

pub use memory::MemoryEngine;

/// Milliseconds UTC. Injected so tests move time instead of waiting for it.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}

/// The machine's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    }
}

/// A clock tests set and advance by hand.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(now_ms: i64) -> ManualClock {
        ManualClock(AtomicI64::new(now_ms))
    }
    pub fn set(&self, now_ms: i64) {
        self.0.store(now_ms, Ordering::SeqCst);
    }
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl<C: Clock> Clock for std::sync::Arc<C> {
    fn now_ms(&self) -> i64 {
        (**self).now_ms()
    }
}

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

    /// Track (a negative `units` refunds). `reject` refusals are `InsufficientBalance`.
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
