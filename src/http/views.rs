//! The answer shapes the Autumn SDKs parse: Balance (with breakdown and
//! rollovers), the customer object, deductions, and the rule that picks the
//! `balance` a check or track answers with.

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

use crate::calendar::{Interval, MAX_INSTANT_MS};
use crate::limits::{LimitDef, LimitKind, LimitSource, LimitStatus};
use crate::model::{BucketView, Entry, Outcome, PoolBalance, PoolCost};
use crate::money::{charge, Amount};

/// A pool's balance as Autumn shows it, in the pool's units.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BalanceView {
    pub feature_id: String,
    /// Includes live rollovers.
    #[schema(value_type = f64)]
    pub granted: Amount,
    /// Includes live rollovers; never below 0 (debt shows in `usage`).
    #[schema(value_type = f64)]
    pub remaining: Amount,
    #[schema(value_type = f64)]
    pub usage: Amount,
    pub unlimited: bool,
    pub overage_allowed: bool,
    /// Always null.
    #[schema(value_type = Option<f64>)]
    pub max_purchase: Option<()>,
    pub next_reset_at: Option<i64>,
    pub breakdown: Vec<BreakdownView>,
    pub rollovers: Vec<RolloverView>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BreakdownView {
    pub id: String,
    pub plan_id: Option<String>,
    #[schema(value_type = f64)]
    pub included_grant: Amount,
    /// Always 0.
    #[schema(value_type = f64)]
    pub prepaid_grant: Amount,
    /// The bucket's own remaining (without rollovers), never below 0.
    #[schema(value_type = f64)]
    pub remaining: Amount,
    #[schema(value_type = f64)]
    pub usage: Amount,
    pub unlimited: bool,
    /// Null for a one-off bucket.
    pub reset: Option<ResetView>,
    /// Always null.
    #[schema(value_type = Option<f64>)]
    pub price: Option<()>,
    pub expires_at: Option<i64>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResetView {
    pub interval: String,
    pub interval_count: u32,
    pub resets_at: Option<i64>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RolloverView {
    #[schema(value_type = f64)]
    pub granted: Amount,
    #[schema(value_type = f64)]
    pub balance: Amount,
    /// A never-expiring rollover shows 253402300799999 (9999-12-31): the
    /// Python SDK rejects a null here.
    pub expires_at: i64,
}

fn reset_of(b: &BucketView) -> Option<ResetView> {
    (b.interval != Interval::OneOff).then(|| ResetView {
        interval: b.interval.as_str().to_string(),
        interval_count: b.interval_count,
        resets_at: b.next_reset_at,
    })
}

fn non_negative(a: Amount) -> Amount {
    if a.is_negative() {
        Amount::ZERO
    } else {
        a
    }
}

impl BalanceView {
    pub fn of(p: &PoolBalance) -> BalanceView {
        BalanceView {
            feature_id: p.pool.clone(),
            granted: p.granted,
            remaining: non_negative(p.remaining),
            usage: p.usage,
            unlimited: p.unlimited,
            overage_allowed: p.overage_allowed,
            max_purchase: None,
            next_reset_at: p.next_reset_at,
            breakdown: p
                .buckets
                .iter()
                .map(|b| BreakdownView {
                    id: b.balance_id.clone(),
                    plan_id: b.plan_id.clone(),
                    included_grant: b.granted,
                    prepaid_grant: Amount::ZERO,
                    remaining: non_negative(b.remaining),
                    usage: b.usage,
                    unlimited: b.unlimited,
                    reset: reset_of(b),
                    price: None,
                    expires_at: b.expires_at,
                })
                .collect(),
            rollovers: p
                .rollovers
                .iter()
                .map(|r| RolloverView {
                    granted: r.granted,
                    balance: r.balance,
                    expires_at: r.expires_at.unwrap_or(MAX_INSTANT_MS),
                })
                .collect(),
        }
    }
}

/// `balances` of a check or track: the feature and every credit system
/// containing it, null when the customer owns none of it.
pub fn balances_map(pools: &[PoolBalance]) -> BTreeMap<String, Option<BalanceView>> {
    pools
        .iter()
        .map(|p| (p.pool.clone(), p.owned.then(|| BalanceView::of(p))))
        .collect()
}

/// The pool Autumn answers `balance` with, and `required` in its units:
/// the feature's own balance if owned and it alone covers the request; else
/// the first owned credit system (catalog order) containing the feature that
/// covers it; else the first owned credit system containing it; else the
/// feature's own balance if owned; else none.
///
/// `spent` is what this request took from each pool (raw, pool units), so
/// coverage is judged on the balances as they were before it.
pub fn choose_balance<'a>(
    costs: &[PoolCost],
    pools: &'a [PoolBalance],
    required: Amount,
    spent: &BTreeMap<String, i64>,
) -> Option<(&'a PoolBalance, Amount)> {
    let candidates = crate::rules::owned_pool_views(costs, pools);
    let needed = |c: &PoolCost| charge(required.abs().raw(), c.cost);
    let covers = |c: &PoolCost, p: &PoolBalance| {
        p.unlimited
            || (p.remaining.raw() as i128 + *spent.get(&p.pool).unwrap_or(&0) as i128) >= needed(c)
    };
    let own = costs.first().map(|c| c.pool.as_str());
    let is_own = |c: &PoolCost| Some(c.pool.as_str()) == own;
    let pick = candidates
        .iter()
        .find(|(c, p)| is_own(c) && covers(c, p))
        .or_else(|| candidates.iter().find(|(c, p)| !is_own(c) && covers(c, p)))
        .or_else(|| candidates.iter().find(|(c, _)| !is_own(c)))
        .or_else(|| candidates.iter().find(|(c, _)| is_own(c)))?;
    let (c, p) = pick;
    let shown = if is_own(c) {
        required
    } else {
        let n = Amount::from_raw_i128(charge(required.raw().abs(), c.cost)).unwrap_or(Amount::MAX);
        if required.is_negative() {
            Amount::from_raw(-n.raw()).unwrap_or(n)
        } else {
            n
        }
    };
    Some((p, shown))
}

/// What each pool gave (positive) or got back (negative), raw.
pub fn spent_by_pool(entries: &[Entry]) -> BTreeMap<String, i64> {
    let mut m = BTreeMap::new();
    for e in entries {
        *m.entry(e.pool.clone()).or_insert(0) += e.amount.raw();
    }
    m
}

/// One bucket's part of a track.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeductionView {
    pub balance_id: String,
    /// The pool the bucket feeds.
    pub feature_id: String,
    pub plan_id: Option<String>,
    pub reset: Option<ResetView>,
    /// In the bucket's pool units; negative for a refund.
    #[schema(value_type = f64)]
    pub value: Amount,
}

/// Entries merged per bucket (a bucket's rollover rows count as the bucket),
/// in the order they were charged.
pub fn deductions(out: &Outcome) -> Vec<DeductionView> {
    let mut list: Vec<DeductionView> = Vec::new();
    for e in &out.entries {
        if let Some(d) = list.iter_mut().find(|d| d.balance_id == e.balance_id) {
            d.value = Amount::from_raw(d.value.raw() + e.amount.raw()).unwrap_or(d.value);
            continue;
        }
        let bucket = out
            .pools
            .iter()
            .flat_map(|p| p.buckets.iter())
            .find(|b| b.balance_id == e.balance_id);
        list.push(DeductionView {
            balance_id: e.balance_id.clone(),
            feature_id: e.pool.clone(),
            plan_id: bucket.and_then(|b| b.plan_id.clone()),
            reset: bucket.and_then(reset_of),
            value: e.amount,
        });
    }
    list
}

/// The customer object, with every field the SDKs require.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CustomerView {
    pub id: String,
    #[schema(value_type = Option<String>)]
    pub name: Option<()>,
    #[schema(value_type = Option<String>)]
    pub email: Option<()>,
    #[schema(value_type = Option<String>)]
    pub fingerprint: Option<()>,
    #[schema(value_type = Option<String>)]
    pub stripe_id: Option<()>,
    pub created_at: i64,
    /// `sandbox` or `live` (configuration key `env`).
    pub env: &'static str,
    pub send_email_receipts: bool,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub billing_controls: BillingControlsView,
    #[schema(value_type = Object)]
    pub flags: serde_json::Map<String, serde_json::Value>,
    #[schema(value_type = Vec<Object>)]
    pub subscriptions: Vec<serde_json::Value>,
    #[schema(value_type = Vec<Object>)]
    pub purchases: Vec<serde_json::Value>,
    #[schema(value_type = Vec<Object>)]
    pub licenses: Vec<serde_json::Value>,
    /// Every pool the customer owns.
    pub balances: BTreeMap<String, BalanceView>,
}

impl CustomerView {
    pub fn of(
        b: &crate::model::CustomerBalances,
        alerts: &[crate::alerts::AlertDef],
        env: &'static str,
    ) -> CustomerView {
        CustomerView {
            id: b.customer_id.clone(),
            name: None,
            email: None,
            fingerprint: None,
            stripe_id: None,
            created_at: b.created_at,
            env,
            send_email_receipts: false,
            metadata: Default::default(),
            billing_controls: BillingControlsView::of(&b.limits, alerts),
            flags: Default::default(),
            subscriptions: vec![],
            purchases: vec![],
            licenses: vec![],
            balances: b
                .pools
                .iter()
                .filter(|p| p.owned)
                .map(|p| (p.pool.clone(), BalanceView::of(p)))
                .collect(),
        }
    }
}

/// A customer's limits: Autumn's `usage_limits` (the shape its SDKs parse)
/// and creditgate's own `rate_limits` (every other limit, plans' too, with
/// their `plan_id`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BillingControlsView {
    pub usage_limits: Vec<UsageLimitView>,
    pub rate_limits: Vec<RateLimitView>,
    /// Autumn's `usage_alerts`, with the response-only `source`.
    pub usage_alerts: Vec<UsageAlertView>,
}

/// One usage alert as Autumn's SDK parses it, plus creditgate's `id` and
/// (for a plan's) `plan_id`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UsageAlertView {
    pub id: String,
    pub feature_id: String,
    #[schema(value_type = f64)]
    pub threshold: Amount,
    /// `usage`, `usage_percentage`, `remaining` or `remaining_percentage`.
    pub threshold_type: &'static str,
    pub enabled: bool,
    /// `balance`, `included`, `recurring` or `usage_limit`.
    pub basis: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `customer` or `plan`.
    pub source: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan_id: Option<String>,
}

impl UsageAlertView {
    pub fn of(a: &crate::alerts::AlertDef) -> UsageAlertView {
        UsageAlertView {
            id: a.id.clone(),
            feature_id: a.feature_id.clone(),
            threshold: a.threshold,
            threshold_type: a.threshold_type.as_str(),
            enabled: a.enabled,
            basis: a.basis.as_str(),
            name: a.name.clone(),
            source: a.source.as_str(),
            plan_id: a.source.plan_id().map(str::to_string),
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UsageLimitView {
    pub id: String,
    pub feature_id: String,
    #[schema(value_type = f64)]
    pub limit: Amount,
    pub interval: String,
    pub enabled: bool,
    pub anchor: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RateLimitView {
    pub id: String,
    pub feature_id: String,
    /// `window` or `rate`.
    pub kind: &'static str,
    pub enabled: bool,
    pub shadow: bool,
    pub interval: String,
    pub interval_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<f64>)]
    pub limit: Option<Amount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anchor: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<f64>)]
    pub rate: Option<Amount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<f64>)]
    pub burst: Option<Amount>,
    /// Granted by this plan on attach (not replaced by `customers.update`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan_id: Option<String>,
}

impl BillingControlsView {
    pub fn of(limits: &[LimitDef], alerts: &[crate::alerts::AlertDef]) -> BillingControlsView {
        let mut v = BillingControlsView {
            usage_limits: vec![],
            rate_limits: vec![],
            usage_alerts: alerts.iter().map(UsageAlertView::of).collect(),
        };
        for l in limits {
            match (&l.source, l.kind) {
                (
                    LimitSource::UsageLimits,
                    LimitKind::Window {
                        limit,
                        interval,
                        anchor,
                        ..
                    },
                ) => v.usage_limits.push(UsageLimitView {
                    id: l.id.clone(),
                    feature_id: l.feature_id.clone(),
                    limit,
                    interval: interval.as_str().to_string(),
                    enabled: l.enabled,
                    anchor: anchor.as_str().to_string(),
                }),
                (source, kind) => {
                    let plan_id = match source {
                        LimitSource::Plan(p) => Some(p.clone()),
                        _ => None,
                    };
                    let base = RateLimitView {
                        id: l.id.clone(),
                        feature_id: l.feature_id.clone(),
                        kind: "window",
                        enabled: l.enabled,
                        shadow: l.shadow,
                        interval: String::new(),
                        interval_count: 1,
                        limit: None,
                        anchor: None,
                        window: None,
                        rate: None,
                        burst: None,
                        plan_id,
                    };
                    v.rate_limits.push(match kind {
                        LimitKind::Window {
                            limit,
                            interval,
                            interval_count,
                            anchor,
                            window,
                        } => RateLimitView {
                            interval: interval.as_str().to_string(),
                            interval_count,
                            limit: Some(limit),
                            anchor: Some(anchor.as_str()),
                            window: Some(window.as_str()),
                            ..base
                        },
                        LimitKind::Rate {
                            rate,
                            interval,
                            interval_count,
                            burst,
                        } => RateLimitView {
                            kind: "rate",
                            interval: interval.as_str().to_string(),
                            interval_count,
                            rate: Some(rate),
                            burst: Some(burst),
                            ..base
                        },
                    });
                }
            }
        }
        v
    }
}

/// A limit's state in a check answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LimitStatusView {
    pub id: String,
    pub feature_id: String,
    #[schema(value_type = f64)]
    pub limit: Amount,
    #[schema(value_type = f64)]
    pub remaining: Amount,
    pub resets_at: Option<i64>,
    pub shadow: bool,
}

impl LimitStatusView {
    pub fn of(l: &LimitStatus) -> LimitStatusView {
        LimitStatusView {
            id: l.id.clone(),
            feature_id: l.feature_id.clone(),
            limit: l.quota,
            remaining: l.remaining,
            resets_at: l.resets_at,
            shadow: l.shadow,
        }
    }
}
