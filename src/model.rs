//! The credit model: catalog, buckets, rollovers, locks, and what the engine
//! answers. Pure data plus validation; the rules that move balances live in
//! [`crate::rules`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::calendar::{Interval, Period, MAX_INSTANT_MS};
use crate::error::{invalid, EngineError};
use crate::limits::{
    derived_id, Anchor, ArmedLimit, LimitDef, LimitDenial, LimitHold, LimitKind, LimitList,
    LimitSource, LimitSpec, LimitStatus, WindowMode,
};
use crate::money::{Amount, Cost};

/// Most buckets one customer may hold.
pub const MAX_BUCKETS_PER_CUSTOMER: usize = 64;
/// Longest id (customer, feature, balance, plan, lock, idempotency key), in
/// characters (so at most 1 KiB of UTF-8): what a JSON Schema `maxLength`
/// can say, so the OpenAPI document and the server agree.
pub const MAX_ID_CHARS: usize = 256;
/// A rollover may live at most this many of its bucket's periods.
pub const MAX_ROLLOVER_PERIODS: i64 = 64;

/// Rejects empty ids, ids over 256 characters and ids holding control characters.
pub fn validate_id(field: &'static str, id: &str) -> Result<(), EngineError> {
    if id.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if id.chars().count() > MAX_ID_CHARS {
        return Err(invalid(field, "must be at most 256 characters"));
    }
    if id.chars().any(char::is_control) {
        return Err(invalid(field, "must not hold control characters"));
    }
    Ok(())
}

/// Rejects instants outside [0, 9999-12-31].
pub fn validate_instant(field: &'static str, t: i64) -> Result<(), EngineError> {
    if !(0..=MAX_INSTANT_MS).contains(&t) {
        return Err(invalid(
            field,
            "must be a millisecond timestamp between 1970 and 9999",
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FeatureType {
    #[default]
    Metered,
    CreditSystem,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditSchemaItem {
    pub metered_feature_id: String,
    pub credit_cost: Cost,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureDef {
    pub id: String,
    #[serde(default, rename = "type")]
    pub kind: FeatureType,
    #[serde(default)]
    pub credit_schema: Vec<CreditSchemaItem>,
    /// What a decision on this feature answers when the store fails; `None`:
    /// the top-level `on_store_error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_store_error: Option<StoreErrorPolicy>,
}

/// What a decision answers when the store fails (unavailable, timed out,
/// circuit open, out of memory).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreErrorPolicy {
    /// Refuse: 503/507 with the store's code (fail closed).
    #[default]
    Deny,
    /// Allow, unrecorded, and say so in a header (Autumn's fail-open).
    Allow,
}

/// A pool that can pay for a feature, with the cost of one unit in that pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolCost {
    pub pool: String,
    pub cost: Cost,
}

/// The features and credit systems, in configuration order.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    features: Vec<FeatureDef>,
    index: BTreeMap<String, usize>,
}

impl Catalog {
    /// Validates and indexes the features: unique ids, credit schemas naming
    /// known metered features, no credit system inside a credit system.
    pub fn new(features: Vec<FeatureDef>) -> Result<Catalog, EngineError> {
        let mut index = BTreeMap::new();
        for (i, f) in features.iter().enumerate() {
            validate_id("features.id", &f.id)?;
            if index.insert(f.id.clone(), i).is_some() {
                return Err(invalid(
                    "features.id",
                    format!("{:?} is defined twice", f.id),
                ));
            }
        }
        for f in &features {
            match f.kind {
                FeatureType::Metered if !f.credit_schema.is_empty() => {
                    return Err(invalid(
                        "features.credit_schema",
                        format!("{:?} is metered and cannot have a credit schema", f.id),
                    ));
                }
                FeatureType::CreditSystem => {
                    let mut seen = std::collections::BTreeSet::new();
                    for item in &f.credit_schema {
                        match index.get(&item.metered_feature_id).map(|&i| &features[i]) {
                            None => {
                                return Err(invalid(
                                    "features.credit_schema",
                                    format!(
                                        "{:?} names unknown feature {:?}",
                                        f.id, item.metered_feature_id
                                    ),
                                ))
                            }
                            Some(inner) if inner.kind == FeatureType::CreditSystem => {
                                return Err(invalid(
                                    "features.credit_schema",
                                    format!(
                                        "{:?} contains credit system {:?}; credit systems cannot nest",
                                        f.id, inner.id
                                    ),
                                ))
                            }
                            Some(_) => {}
                        }
                        if !seen.insert(&item.metered_feature_id) {
                            return Err(invalid(
                                "features.credit_schema",
                                format!("{:?} lists {:?} twice", f.id, item.metered_feature_id),
                            ));
                        }
                    }
                }
                FeatureType::Metered => {}
            }
        }
        Ok(Catalog { features, index })
    }

    pub fn feature(&self, id: &str) -> Option<&FeatureDef> {
        self.index.get(id).map(|&i| &self.features[i])
    }

    pub fn features(&self) -> &[FeatureDef] {
        &self.features
    }

    /// The pools that may pay for `feature`, in deduction order: the feature's
    /// own pool (cost 1), then each credit system containing it in catalog
    /// order. A credit system's own id draws on that pool alone, in credits.
    pub fn pools_for(&self, feature: &str) -> Result<Vec<PoolCost>, EngineError> {
        let def = self
            .feature(feature)
            .ok_or_else(|| EngineError::FeatureNotFound(feature.to_string()))?;
        let mut pools = vec![PoolCost {
            pool: def.id.clone(),
            cost: Cost::ONE,
        }];
        if def.kind == FeatureType::Metered {
            for cs in &self.features {
                if let Some(item) = cs
                    .credit_schema
                    .iter()
                    .find(|i| i.metered_feature_id == feature)
                {
                    pools.push(PoolCost {
                        pool: cs.id.clone(),
                        cost: item.credit_cost,
                    });
                }
            }
        }
        Ok(pools)
    }
}

/// How long unused credits roll over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RolloverDuration {
    #[default]
    Month,
    Forever,
}

/// A bucket's rollover setting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloverConfig {
    /// Cap on the bucket's live rollovers, in the pool's units.
    #[serde(default)]
    pub max: Option<Amount>,
    /// Cap as a percentage (0..=100) of the bucket's grant.
    #[serde(default)]
    pub max_percentage: Option<Amount>,
    #[serde(default)]
    pub duration: RolloverDuration,
    /// Lifetime in months, for `duration = month` (default 1).
    #[serde(default)]
    pub length: Option<u32>,
}

impl RolloverConfig {
    /// The cap on a bucket's live rollovers, raw; `None` when uncapped.
    pub fn cap(&self, granted: Amount) -> Option<i64> {
        if let Some(max) = self.max {
            return Some(max.raw());
        }
        self.max_percentage
            .map(|pct| ((granted.raw() as i128 * pct.raw() as i128) / 1_000_000) as i64)
    }

    /// Months a rollover lives; `None` for forever.
    pub fn lifetime_months(&self) -> Option<i64> {
        match self.duration {
            RolloverDuration::Forever => None,
            RolloverDuration::Month => Some(self.length.unwrap_or(1) as i64),
        }
    }
}

/// Unused credits carried past a reset. `expires_at: None` never expires; a
/// bucket keeps its never-expiring rollovers as one row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloverRow {
    pub expires_at: Option<i64>,
    pub granted: Amount,
    pub balance: Amount,
}

/// A grant feeding one pool of one customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    pub id: String,
    /// Creation order within the customer: "older first" compares this.
    pub seq: u64,
    pub pool: String,
    pub plan_id: Option<String>,
    pub granted: Amount,
    /// May be negative (overage, carried debt, or an unlimited bucket's usage).
    pub remaining: Amount,
    pub interval: Interval,
    pub interval_count: u32,
    /// The instant periods count from; for one_off buckets, unused (0).
    pub anchor: i64,
    /// The next boundary; `None` for one_off.
    pub next_reset_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub rollover: Option<RolloverConfig>,
    pub unlimited: bool,
    pub overage_allowed: bool,
    /// How far below zero overage may go (raw ≤ 0); `None` is unbounded
    /// (down to the money bound).
    pub overage_floor: Option<Amount>,
    pub carry_debt: bool,
    /// Oldest first.
    pub rollovers: Vec<RolloverRow>,
}

impl Bucket {
    pub fn period(&self) -> Option<Period> {
        Period::new(self.interval, self.interval_count)
    }

    /// The lowest `remaining` may reach through overage.
    pub fn floor(&self) -> i64 {
        if !self.overage_allowed {
            0
        } else {
            self.overage_floor
                .map_or(-crate::money::MAX_AMOUNT_RAW, |f| f.raw())
        }
    }

    pub fn usage(&self) -> Amount {
        Amount::from_raw(self.granted.raw() - self.remaining.raw()).unwrap_or(Amount::MAX)
    }

    pub fn is_live(&self, now: i64) -> bool {
        self.expires_at.is_none_or(|e| e > now)
    }
}

/// What a caller asks to grant.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Grant {
    pub pool: String,
    pub balance_id: Option<String>,
    pub plan_id: Option<String>,
    pub granted: Amount,
    /// `OneOff` never resets.
    pub interval: Option<Interval>,
    pub interval_count: Option<u32>,
    /// The first boundary; also the anchor of later ones.
    pub next_reset_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub rollover: Option<RolloverConfig>,
    pub unlimited: bool,
    pub overage_allowed: bool,
    /// ≤ 0; only with `overage_allowed`.
    pub overage_floor: Option<Amount>,
    pub carry_debt: bool,
}

impl Grant {
    /// A grant of `n` to `pool` resetting every `interval` (test convenience).
    pub fn new(pool: &str, granted: Amount, interval: Interval) -> Grant {
        Grant {
            pool: pool.into(),
            granted,
            interval: Some(interval),
            ..Grant::default()
        }
    }
}

/// How `update_bucket` changes a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalanceChange {
    SetRemaining(Amount),
    AddToBalance(Amount),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketUpdate {
    pub pool: String,
    /// Without it, the pool's first bucket in deduction order.
    pub balance_id: Option<String>,
    pub change: BalanceChange,
}

/// What `track` does with units no source can pay for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, Hash)]
#[serde(rename_all = "snake_case")]
pub enum OverageBehavior {
    /// Take what both passes allow; drop and report the rest.
    #[default]
    Cap,
    /// All or nothing: `InsufficientBalance`.
    Reject,
    /// Both passes, then the rest below zero on the first non-unlimited bucket.
    Overflow,
}

impl OverageBehavior {
    pub fn as_str(self) -> &'static str {
        match self {
            OverageBehavior::Cap => "cap",
            OverageBehavior::Reject => "reject",
            OverageBehavior::Overflow => "overflow",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalizeAction {
    Confirm,
    Release,
}

/// Which part of a bucket an entry moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum SourceKind {
    Bucket,
    /// The rollover row of the bucket with this expiry (`None`: never).
    Rollover {
        expires_at: Option<i64>,
    },
}

/// What one source gave (positive) or got back (negative).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub balance_id: String,
    pub pool: String,
    pub source: SourceKind,
    /// In the pool's units.
    pub amount: Amount,
    /// Units of the requested feature covered.
    pub units: Amount,
}

/// The answer of consume, check, track, reserve and finalize.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// For consume/check/reserve: the request was granted in full. For track:
    /// nothing was dropped.
    pub allowed: bool,
    pub entries: Vec<Entry>,
    /// Units nothing paid for: denied, dropped by `cap`, or (refunds, releases)
    /// that fit nowhere.
    pub uncovered: Amount,
    /// No pool that could pay is owned by the customer.
    pub no_balance: bool,
    /// Refused for lack of balance (`track` with `reject`); nothing applied.
    pub insufficient: bool,
    /// Answered from an idempotency record; nothing was applied.
    pub replayed: bool,
    /// The balances of the pools involved, after the operation.
    pub pools: Vec<PoolBalance>,
    /// The instant (ms) the store decided at: the engine's clock, or on
    /// Redis without an injected clock, Redis `TIME` as the function read it.
    pub at: i64,
    /// Refused by this limit (the balance would have covered it).
    pub limit: Option<LimitDenial>,
    /// Shadow limits that would have refused it.
    pub shadow_denied: Vec<String>,
    /// The enabled limits on the feature and on the pools that can pay,
    /// after the operation (answers and RateLimit headers).
    pub limits: Vec<LimitStatus>,
}

/// A bucket as balances show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketView {
    pub balance_id: String,
    pub plan_id: Option<String>,
    pub granted: Amount,
    pub remaining: Amount,
    pub usage: Amount,
    pub unlimited: bool,
    pub overage_allowed: bool,
    pub interval: Interval,
    pub interval_count: u32,
    /// The instant periods count from (0 for one_off).
    pub anchor: i64,
    pub next_reset_at: Option<i64>,
    pub expires_at: Option<i64>,
    /// A reset keeps debt (remaining below zero) instead of forgiving it.
    pub carry_debt: bool,
    pub rollovers: Vec<RolloverRow>,
}

/// One pool's balance: `remaining` is the sum over live buckets of
/// max(0, remaining) plus live rollovers; `granted` includes the rollovers'
/// grants; `usage` is what was used this period, debt included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolBalance {
    pub pool: String,
    pub owned: bool,
    pub granted: Amount,
    pub remaining: Amount,
    pub usage: Amount,
    pub unlimited: bool,
    pub overage_allowed: bool,
    pub next_reset_at: Option<i64>,
    pub buckets: Vec<BucketView>,
    pub rollovers: Vec<RolloverRow>,
}

/// A customer's balances, one entry per owned pool, in catalog order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerBalances {
    pub customer_id: String,
    pub created_at: i64,
    pub pools: Vec<PoolBalance>,
    /// Its limits (definitions; an engine without limits: none).
    #[serde(default)]
    pub limits: Vec<LimitDef>,
}

/// A lock's held entries and state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    pub feature: String,
    pub units: Amount,
    pub expires_at: Option<i64>,
    /// What each source gave, with the bucket's `next_reset_at` at hold time
    /// (a bucket that has reset since gets nothing back).
    pub held: Vec<(Entry, Option<i64>)>,
    pub state: LockState,
    /// What it holds of the customer's limits (given back on release).
    #[serde(default)]
    pub limit_held: Vec<LimitHold>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockState {
    Pending,
    Finalized {
        outcome: StoredOutcome,
        forget_at: i64,
    },
}

impl Outcome {
    pub fn new(stored: StoredOutcome, replayed: bool, pools: Vec<PoolBalance>, at: i64) -> Outcome {
        Outcome {
            allowed: stored.allowed,
            entries: stored.entries,
            uncovered: stored.uncovered,
            no_balance: stored.no_balance,
            insufficient: stored.insufficient,
            replayed,
            pools,
            at,
            limit: stored.limit,
            shadow_denied: stored.shadow_denied,
            limits: vec![],
        }
    }

    /// The balance of one pool after the operation.
    pub fn pool(&self, pool: &str) -> Option<&PoolBalance> {
        self.pools.iter().find(|p| p.pool == pool)
    }
}

/// An outcome as remembered by idempotency records and finalized locks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredOutcome {
    pub allowed: bool,
    pub entries: Vec<Entry>,
    pub uncovered: Amount,
    pub no_balance: bool,
    /// The request was refused for lack of balance (`track` with `reject`).
    pub insufficient: bool,
    /// The request was refused by this limit (balance sufficed).
    #[serde(default)]
    pub limit: Option<LimitDenial>,
    /// Shadow limits that would have refused it.
    #[serde(default)]
    pub shadow_denied: Vec<String>,
}

/// A remembered idempotent request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub fingerprint: String,
    pub outcome: StoredOutcome,
    pub expires_at: i64,
}

/// Everything the engine keeps for one customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerState {
    pub id: String,
    pub created_at: i64,
    /// The next bucket `seq`.
    pub next_seq: u64,
    pub buckets: Vec<Bucket>,
    pub locks: BTreeMap<String, Lock>,
    pub idempotency: BTreeMap<String, IdempotencyRecord>,
    /// Its limits with their counters (plans' and its own).
    #[serde(default)]
    pub limits: Vec<ArmedLimit>,
    /// Its usage alerts with their armed state (plans' and its own).
    #[serde(default)]
    pub alerts: Vec<crate::alerts::ArmedAlert>,
}

/// Retention times, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub idempotency_ms: i64,
    pub finalized_lock_ms: i64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            idempotency_ms: 24 * 3_600_000,
            finalized_lock_ms: 24 * 3_600_000,
        }
    }
}

/// Checks a grant against the rules; returns the bucket's period (if any).
pub fn validate_grant(
    g: &Grant,
    catalog: &Catalog,
    now: i64,
) -> Result<Option<Period>, EngineError> {
    check_grant(g, catalog, Some(now))
}

/// [`validate_grant`] without the checks against the clock (a grant's
/// first reset and expiry in the future), for a store that checks those
/// at its own instant.
pub fn validate_grant_shape(g: &Grant, catalog: &Catalog) -> Result<(), EngineError> {
    check_grant(g, catalog, None).map(|_| ())
}

fn check_grant(
    g: &Grant,
    catalog: &Catalog,
    now: Option<i64>,
) -> Result<Option<Period>, EngineError> {
    validate_id("feature_id", &g.pool)?;
    catalog
        .feature(&g.pool)
        .ok_or_else(|| EngineError::FeatureNotFound(g.pool.clone()))?;
    if let Some(id) = &g.balance_id {
        validate_id("balance_id", id)?;
    }
    if let Some(id) = &g.plan_id {
        validate_id("plan_id", id)?;
    }
    if g.granted.is_negative() {
        return Err(invalid("included_grant", "must not be negative"));
    }
    if g.granted.is_zero() && !g.unlimited && !g.overage_allowed {
        return Err(invalid(
            "included_grant",
            "must be greater than zero unless the balance is unlimited or allows overage",
        ));
    }
    let interval = g.interval.unwrap_or(Interval::OneOff);
    if interval == Interval::Second {
        return Err(invalid(
            "interval",
            "second is for limits only; a balance resets at most every minute",
        ));
    }
    let count = g.interval_count.unwrap_or(1);
    if count == 0 {
        return Err(invalid("interval_count", "must be at least 1"));
    }
    if count > 1000 {
        return Err(invalid("interval_count", "must be at most 1000"));
    }
    let period = Period::new(interval, count);
    if let Some(t) = g.next_reset_at {
        validate_instant("next_reset_at", t)?;
        if period.is_none() {
            return Err(invalid("next_reset_at", "a one_off balance never resets"));
        }
        if now.is_some_and(|now| t <= now) {
            return Err(invalid("next_reset_at", "must be in the future"));
        }
    }
    if let Some(e) = g.expires_at {
        validate_instant("expires_at", e)?;
        if let Some(now) = now {
            if e <= now {
                return Err(invalid("expires_at", "must be in the future"));
            }
            if let Some(p) = period {
                let first = g.next_reset_at.unwrap_or_else(|| p.boundary(now, 1));
                if e < first {
                    return Err(invalid("expires_at", "must not be before the first reset"));
                }
            }
        }
    }
    if let Some(f) = g.overage_floor {
        if !g.overage_allowed {
            return Err(invalid("overage_floor", "needs overage_allowed"));
        }
        if f.raw() > 0 {
            return Err(invalid("overage_floor", "must be zero or below"));
        }
    }
    if let Some(r) = &g.rollover {
        let Some(p) = period else {
            return Err(invalid(
                "rollover",
                "a balance that never resets cannot roll over",
            ));
        };
        if g.unlimited {
            return Err(invalid("rollover", "an unlimited balance cannot roll over"));
        }
        if r.max.is_some() && r.max_percentage.is_some() {
            return Err(invalid("rollover", "give max or max_percentage, not both"));
        }
        if r.max.is_some_and(|m| m.is_negative()) {
            return Err(invalid("rollover.max", "must not be negative"));
        }
        if r.max_percentage
            .is_some_and(|m| m.is_negative() || m > Amount::whole(100))
        {
            return Err(invalid(
                "rollover.max_percentage",
                "must be between 0 and 100",
            ));
        }
        match r.duration {
            RolloverDuration::Forever if r.length.is_some() => {
                return Err(invalid(
                    "rollover.length",
                    "a forever rollover has no length",
                ));
            }
            RolloverDuration::Forever => {}
            RolloverDuration::Month => {
                let months = r.length.unwrap_or(1) as i64;
                if months == 0 {
                    return Err(invalid("rollover.length", "must be at least 1 month"));
                }
                let life = months * crate::calendar::NOMINAL_MONTH_MS;
                let periods = (life + p.nominal_ms() - 1) / p.nominal_ms();
                if periods > MAX_ROLLOVER_PERIODS {
                    return Err(invalid(
                        "rollover.length",
                        "a rollover may live at most 64 of its balance's periods",
                    ));
                }
            }
        }
    }
    Ok(period)
}

/// One item of a plan: a bucket `billing.attach` grants, anchored at the
/// moment of attachment.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanItem {
    pub feature_id: String,
    /// The grant per period (default 0: only valid with `unlimited` or
    /// `overage_allowed`).
    #[serde(default)]
    pub included: Amount,
    /// Default `one_off`: granted once, never resets.
    #[serde(default = "one_off")]
    pub interval: Interval,
    #[serde(default)]
    pub interval_count: Option<u32>,
    #[serde(default)]
    pub rollover: Option<RolloverConfig>,
    #[serde(default)]
    pub unlimited: bool,
    #[serde(default)]
    pub overage_allowed: bool,
    #[serde(default)]
    pub overage_floor: Option<Amount>,
    #[serde(default)]
    pub carry_debt: bool,
}

fn one_off() -> Interval {
    Interval::OneOff
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub id: String,
    #[serde(default)]
    pub items: Vec<PlanItem>,
    /// Limits granted on attach (see `docs/limits.md`).
    #[serde(default)]
    pub limits: Vec<LimitSpec>,
    /// Usage alerts granted on attach (see `docs/alerts.md`; validated by
    /// the configuration, not yet armed by the engines).
    #[serde(default)]
    pub usage_alerts: Vec<crate::alerts::AlertSpec>,
}

impl Plan {
    /// The deterministic balance id of item `index`: `<plan>:<feature>`, and
    /// `<plan>:<feature>:<n>` for the n-th (n ≥ 2) item on the same feature.
    /// Deterministic ids make a racing double attach collide on
    /// `BalanceAlreadyExists` instead of granting twice.
    pub fn balance_id(&self, index: usize) -> String {
        let feature = &self.items[index].feature_id;
        let nth = self.items[..index]
            .iter()
            .filter(|i| &i.feature_id == feature)
            .count()
            + 1;
        if nth == 1 {
            format!("{}:{}", self.id, feature)
        } else {
            format!("{}:{}:{}", self.id, feature, nth)
        }
    }

    /// The grant of item `index`, anchored at the engine's now.
    pub fn grant(&self, index: usize) -> Grant {
        let item = &self.items[index];
        let mut rollover = item.rollover.clone();
        // A forever rollover carries no length (Autumn sends one anyway).
        if let Some(r) = &mut rollover {
            if r.duration == RolloverDuration::Forever {
                r.length = None;
            }
        }
        Grant {
            pool: item.feature_id.clone(),
            balance_id: Some(self.balance_id(index)),
            plan_id: Some(self.id.clone()),
            granted: item.included,
            interval: Some(item.interval),
            interval_count: item.interval_count,
            next_reset_at: None,
            expires_at: None,
            rollover,
            unlimited: item.unlimited,
            overage_allowed: item.overage_allowed,
            overage_floor: item.overage_floor,
            carry_debt: item.carry_debt,
        }
    }
}

/// A request that moves balances, as the rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Consume {
        feature: String,
        units: Amount,
    },
    Track {
        feature: String,
        units: Amount,
        behavior: OverageBehavior,
    },
    Reserve {
        lock_id: String,
        feature: String,
        units: Amount,
        expires_at: Option<i64>,
    },
    Finalize {
        lock_id: String,
        action: FinalizeAction,
        override_units: Option<Amount>,
    },
}

impl Op {
    /// The canonical form an idempotency record compares: parsed values, so
    /// `25` and `25.0` are the same request.
    pub fn fingerprint(&self) -> String {
        match self {
            Op::Consume { feature, units } => format!("consume\x1f{feature}\x1f{}", units.raw()),
            Op::Track {
                feature,
                units,
                behavior,
            } => {
                format!(
                    "track\x1f{feature}\x1f{}\x1f{}",
                    units.raw(),
                    behavior.as_str()
                )
            }
            Op::Reserve {
                lock_id,
                feature,
                units,
                expires_at,
            } => format!(
                "reserve\x1f{lock_id}\x1f{feature}\x1f{}\x1f{}",
                units.raw(),
                expires_at.map_or(String::new(), |e| e.to_string())
            ),
            Op::Finalize {
                lock_id,
                action,
                override_units,
            } => format!(
                "finalize\x1f{lock_id}\x1f{}\x1f{}",
                matches!(action, FinalizeAction::Confirm) as u8,
                override_units.map_or(String::new(), |u| u.raw().to_string())
            ),
        }
    }

    /// The feature the request names (finalize names a lock instead).
    pub fn feature_id(&self) -> Option<&str> {
        match self {
            Op::Consume { feature, .. }
            | Op::Track { feature, .. }
            | Op::Reserve { feature, .. } => Some(feature),
            Op::Finalize { .. } => None,
        }
    }

    /// The feature whose pools the answer shows (finalize: the lock's).
    pub fn feature<'a>(&'a self, state: &'a CustomerState) -> Option<&'a str> {
        match self {
            Op::Consume { feature, .. }
            | Op::Track { feature, .. }
            | Op::Reserve { feature, .. } => Some(feature),
            Op::Finalize { lock_id, .. } => state.locks.get(lock_id).map(|l| l.feature.as_str()),
        }
    }

    /// Every check of the request that needs no clock (ids, signs,
    /// instants in range). The Redis engine runs this before its function,
    /// which checks the rest against its own `now`.
    pub fn validate_shape(&self) -> Result<(), EngineError> {
        match self {
            Op::Consume { feature, units } | Op::Reserve { feature, units, .. } => {
                validate_id("feature_id", feature)?;
                if units.is_negative() {
                    return Err(invalid("required_balance", "must not be negative"));
                }
            }
            Op::Track { feature, .. } => validate_id("feature_id", feature)?,
            Op::Finalize { override_units, .. } => {
                if override_units.is_some_and(|u| u.is_negative()) {
                    return Err(invalid("override_value", "must not be negative"));
                }
            }
        }
        match self {
            Op::Reserve {
                lock_id,
                expires_at,
                ..
            } => {
                validate_id("lock_id", lock_id)?;
                if let Some(e) = *expires_at {
                    validate_instant("expires_at", e)?;
                }
            }
            Op::Finalize { lock_id, .. } => validate_id("lock_id", lock_id)?,
            _ => {}
        }
        Ok(())
    }

    /// [`Op::validate_shape`] plus the checks against `now`.
    pub fn validate(&self, now: i64) -> Result<(), EngineError> {
        self.validate_shape()?;
        if let Op::Reserve {
            expires_at: Some(e),
            ..
        } = self
        {
            if *e <= now {
                return Err(invalid("expires_at", "must be in the future"));
            }
        }
        Ok(())
    }
}

fn field(list: LimitList, name: &'static str) -> &'static str {
    macro_rules! names {
        ($($n:literal),*) => {
            match (list, name) {
                $(
                    (LimitList::UsageLimits, $n) => concat!("billing_controls.usage_limits.", $n),
                    (LimitList::RateLimits, $n) => concat!("billing_controls.rate_limits.", $n),
                    (LimitList::Plan, $n) => concat!("plans.limits.", $n),
                )*
                _ => name,
            }
        };
    }
    names!(
        "id",
        "feature_id",
        "kind",
        "limit",
        "interval",
        "interval_count",
        "anchor",
        "window",
        "rate",
        "burst"
    )
}

// Validation of a limit spec lives here, beside the catalog it checks
// against (the limits module stays below the model).
impl LimitSpec {
    /// Validates the spec into a limit. Autumn's `usage_limits` allow only
    /// windows of a day, week, month or year.
    pub fn build(
        &self,
        list: LimitList,
        source: LimitSource,
        catalog: &Catalog,
    ) -> Result<LimitDef, EngineError> {
        let f = |n| field(list, n);
        validate_id(f("feature_id"), &self.feature_id)?;
        if catalog.feature(&self.feature_id).is_none() {
            return Err(invalid(
                f("feature_id"),
                format!("unknown feature {:?}", self.feature_id),
            ));
        }
        let kind = self.kind.as_deref().unwrap_or("window");
        let interval: Interval = match &self.interval {
            None => return Err(invalid(f("interval"), "is required")),
            Some(s) => s.parse().map_err(|e: String| invalid(f("interval"), e))?,
        };
        let count = self.interval_count.unwrap_or(1);
        if count == 0 || count > 1000 {
            return Err(invalid(f("interval_count"), "must be between 1 and 1000"));
        }
        let positive = |name, v: Option<Amount>| match v {
            None => Err(invalid(f(name), "is required")),
            Some(a) if a.raw() <= 0 => Err(invalid(f(name), "must be greater than zero")),
            Some(a) => Ok(a),
        };
        let only = |name, given: bool, k: &str| {
            if given {
                Err(invalid(f(name), format!("is not a field of a {k} limit")))
            } else {
                Ok(())
            }
        };
        let kind = match kind {
            "window" => {
                only("rate", self.rate.is_some(), "window")?;
                only("burst", self.burst.is_some(), "window")?;
                let allowed = match list {
                    LimitList::UsageLimits => matches!(
                        interval,
                        Interval::Day | Interval::Week | Interval::Month | Interval::Year
                    ),
                    _ => interval != Interval::OneOff,
                };
                if !allowed {
                    return Err(invalid(
                        f("interval"),
                        match list {
                            LimitList::UsageLimits => {
                                "usage_limits take day, week, month or year (shorter windows go in rate_limits)"
                            }
                            _ => "a window limit needs a resetting interval (second to year)",
                        },
                    ));
                }
                if list == LimitList::UsageLimits && count != 1 {
                    return Err(invalid(
                        f("interval_count"),
                        "usage_limits count one interval",
                    ));
                }
                let anchor = match self.anchor.as_deref() {
                    None | Some("utc") => Anchor::Utc,
                    Some("billing_cycle") => Anchor::BillingCycle,
                    Some(_) => return Err(invalid(f("anchor"), "must be utc or billing_cycle")),
                };
                let window = match self.window.as_deref() {
                    None | Some("fixed") => WindowMode::Fixed,
                    Some("sliding") if list != LimitList::UsageLimits => WindowMode::Sliding,
                    Some(_) => return Err(invalid(f("window"), "must be fixed or sliding")),
                };
                LimitKind::Window {
                    limit: positive("limit", self.limit)?,
                    interval,
                    interval_count: count,
                    anchor,
                    window,
                }
            }
            "rate" if list != LimitList::UsageLimits => {
                only("limit", self.limit.is_some(), "rate")?;
                only("anchor", self.anchor.is_some(), "rate")?;
                only("window", self.window.is_some(), "rate")?;
                if !matches!(
                    interval,
                    Interval::Second
                        | Interval::Minute
                        | Interval::Hour
                        | Interval::Day
                        | Interval::Week
                ) {
                    return Err(invalid(
                        f("interval"),
                        "a rate's period is second, minute, hour, day or week",
                    ));
                }
                let rate = positive("rate", self.rate)?;
                let burst = self.burst.unwrap_or(rate);
                if burst < Amount::whole(1) {
                    return Err(invalid(f("burst"), "must be at least one request (1 unit)"));
                }
                LimitKind::Rate {
                    rate,
                    interval,
                    interval_count: count,
                    burst,
                }
            }
            _ => {
                return Err(invalid(
                    f("kind"),
                    match list {
                        LimitList::UsageLimits => "usage_limits are windows",
                        _ => "must be window or rate",
                    },
                ))
            }
        };
        let id = match &self.id {
            Some(id) => {
                validate_id(f("id"), id)?;
                id.clone()
            }
            None => derived_id(&self.feature_id, &kind),
        };
        if id.chars().count() > crate::model::MAX_ID_CHARS {
            return Err(invalid(f("id"), "must be at most 256 characters"));
        }
        Ok(LimitDef {
            id,
            feature_id: self.feature_id.clone(),
            kind,
            enabled: self.enabled.unwrap_or(true),
            shadow: self.shadow.unwrap_or(false),
            source,
        })
    }
}
