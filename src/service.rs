//! What a request does beyond one engine call, shared by every edge (the
//! Autumn-shaped routes and the gate): attaching a plan, a reserve with its
//! claim on the lock id across customers, finalize's lookup of a lock's
//! customer, and `Retry-After`. It knows the engine only through its trait
//! and ports, and nothing of HTTP.

use std::sync::Arc;

use crate::alerts::{AlertList, AlertSource, AlertsUpdate};
use crate::clock::Clock;
use crate::engine::{Engine, LockIndex, MemoryLockIndex};
use crate::error::{invalid, EngineError};
use crate::limits::{LimitList, LimitSource, LimitsUpdate};
use crate::model::{Catalog, FinalizeAction, Outcome, Plan, PoolCost, MAX_BUCKETS_PER_CUSTOMER};
use crate::money::Amount;
use crate::rules;

/// How long a reserve's claim on a lock id lasts before the reserve itself
/// records the lock's real lifetime (ms).
pub const CLAIM_MS: i64 = 60_000;

/// The engine with what the edges need around it.
#[derive(Clone)]
pub struct Service {
    pub engine: Arc<dyn Engine>,
    pub catalog: Arc<Catalog>,
    pub plans: Arc<Vec<Plan>>,
    pub clock: Arc<dyn Clock>,
    pub lock_index: Arc<dyn LockIndex>,
    /// How long a finalized lock stays findable by id alone (ms).
    pub lock_retention_ms: i64,
}

impl Service {
    /// A service over `engine` with no plans and the in-memory lock index.
    /// `catalog` must be the engine's.
    pub fn new(engine: Arc<dyn Engine>, catalog: Arc<Catalog>, clock: Arc<dyn Clock>) -> Service {
        Service {
            engine,
            catalog,
            plans: Arc::new(vec![]),
            clock,
            lock_index: Arc::new(MemoryLockIndex::default()),
            lock_retention_ms: 24 * 3_600_000,
        }
    }

    /// Grants the plan's buckets anchored now, creating the customer if new.
    /// Attaching a plan the customer already has changes nothing; a racing
    /// double attach cannot grant twice (plan buckets have deterministic
    /// ids, see [`Plan::balance_id`]).
    pub async fn attach(&self, customer_id: &str, plan_id: &str) -> Result<(), EngineError> {
        let plan = self
            .plans
            .iter()
            .find(|p| p.id == plan_id)
            .ok_or_else(|| EngineError::PlanNotFound(plan_id.to_string()))?;
        // A store without limits refuses a plan with limits before anything
        // is stored: a limit is never silently dropped.
        let limits = plan
            .limits
            .iter()
            .map(|spec| {
                spec.build(
                    LimitList::Plan,
                    LimitSource::Plan(plan.id.clone()),
                    &self.catalog,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !limits.is_empty() && !self.engine.supports_limits() {
            return Err(EngineError::LimitsUnsupported);
        }
        // The same for the plan's usage alerts.
        let alerts = plan
            .usage_alerts
            .iter()
            .map(|spec| {
                spec.build(AlertList::Plan, AlertSource::Plan(plan.id.clone()), |f| {
                    self.catalog.feature(f).is_some()
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !alerts.is_empty() && !self.engine.supports_alerts() {
            return Err(EngineError::AlertsUnsupported);
        }
        self.engine.create_customer(customer_id).await?;
        if !alerts.is_empty() {
            let source = AlertSource::Plan(plan.id.clone());
            let held = self.engine.alerts(customer_id).await?;
            if !held.iter().any(|a| a.source == source) {
                let update = AlertsUpdate {
                    plan: Some((plan.id.clone(), alerts)),
                    ..AlertsUpdate::default()
                };
                self.engine.set_alerts(customer_id, &update).await?;
            }
        }
        let current = self.engine.balances(customer_id).await?;
        let has_plan_limits = current
            .limits
            .iter()
            .any(|l| l.source == LimitSource::Plan(plan.id.clone()));
        if !limits.is_empty() && !has_plan_limits {
            let update = LimitsUpdate {
                plan: Some((plan.id.clone(), limits)),
                ..LimitsUpdate::default()
            };
            self.engine.set_limits(customer_id, &update).await?;
        }
        let held: Vec<&str> = current
            .pools
            .iter()
            .flat_map(|p| p.buckets.iter())
            .map(|x| x.balance_id.as_str())
            .collect();
        let attached = current
            .pools
            .iter()
            .flat_map(|p| p.buckets.iter())
            .any(|x| x.plan_id.as_deref() == Some(plan.id.as_str()));
        if attached {
            return Ok(());
        }
        let missing: Vec<usize> = (0..plan.items.len())
            .filter(|&i| !held.contains(&plan.balance_id(i).as_str()))
            .collect();
        if held.len() + missing.len() > MAX_BUCKETS_PER_CUSTOMER {
            return Err(invalid(
                "plan_id",
                format!("the customer would hold more than {MAX_BUCKETS_PER_CUSTOMER} balances"),
            ));
        }
        for i in missing {
            match self.engine.grant(customer_id, &plan.grant(i)).await {
                // A racing attach granted it first: already attached.
                Ok(_) | Err(EngineError::BalanceAlreadyExists(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reserves `units` under `lock_id`. The id is claimed across customers
    /// first (briefly: a refused reserve lets the claim lapse), so a
    /// finalize without a customer id finds only this customer's lock; an
    /// id another customer holds is `LockAlreadyExists`.
    pub async fn reserve(
        &self,
        customer_id: &str,
        lock_id: &str,
        feature: &str,
        units: Amount,
        expires_at: Option<i64>,
        key: Option<&str>,
    ) -> Result<Outcome, EngineError> {
        let now = self.clock.now_ms();
        let claim_until = now.saturating_add(CLAIM_MS);
        if !self
            .lock_index
            .claim(lock_id, customer_id, claim_until, now)
            .await?
        {
            return Err(EngineError::LockAlreadyExists(lock_id.to_string()));
        }
        let out = self
            .engine
            .reserve(customer_id, lock_id, feature, units, expires_at, key)
            .await?;
        if out.allowed {
            let keep = expires_at.map(|e| e.saturating_add(self.lock_retention_ms));
            self.lock_index
                .record(lock_id, customer_id, keep, self.clock.now_ms())
                .await?;
        }
        Ok(out)
    }

    /// Confirms or releases a lock; without `customer_id` the lock's
    /// customer is looked up by its id. Answers the customer and the outcome.
    pub async fn finalize(
        &self,
        customer_id: Option<String>,
        lock_id: &str,
        action: FinalizeAction,
        override_units: Option<Amount>,
        key: Option<&str>,
    ) -> Result<(String, Outcome), EngineError> {
        crate::model::validate_id("lock_id", lock_id)?;
        let now = self.clock.now_ms();
        let customer = match customer_id {
            Some(c) => c,
            None => self
                .lock_index
                .lookup(lock_id, now)
                .await?
                .ok_or_else(|| EngineError::LockNotFound(lock_id.to_string()))?,
        };
        let out = self
            .engine
            .finalize(&customer, lock_id, action, override_units, key)
            .await?;
        self.lock_index
            .record(
                lock_id,
                &customer,
                Some(now.saturating_add(self.lock_retention_ms)),
                now,
            )
            .await?;
        Ok((customer, out))
    }

    /// Seconds (rounded up) until a reset lets a denied request of `units`
    /// through, from the pools the answer carries; `None` when none will
    /// within [`rules::RETRY_AFTER_HORIZON`] resets. See
    /// [`rules::retry_after_ms`].
    pub fn retry_after_secs(
        &self,
        costs: &[PoolCost],
        out: &Outcome,
        units: Amount,
    ) -> Option<i64> {
        // The store's instant, not ours: the reset boundaries are in its time.
        rules::retry_after_ms(costs, &out.pools, units, out.at).map(|ms| (ms + 999) / 1000)
    }
}
