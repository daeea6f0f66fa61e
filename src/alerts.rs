//! Usage alerts and `balances.limit_reached` (issue 14), core part: what an
//! alert is, its validation, how a customer's alert lists are replaced, and
//! the pure decisions — does this change fire this alert, does it re-arm it,
//! did this pool just reach zero, is this a limit's first denial in its
//! window. No I/O, no clock: the engines call these inside the same step
//! that changes a balance and record what fires as a ledger entry
//! ([`crate::ledger::LedgerOp::Alert`], [`crate::ledger::LedgerOp::LimitReached`]);
//! [`crate::webhooks`] delivers the events.
//!
//! The shape is Autumn's `billing_controls.usage_alerts` as the Python SDK
//! (`autumn-sdk` 1.2.0, `UpdateCustomerUsageAlertRequestBody` and the plan's
//! `PlanUsageAlert`) defines it:
//!
//! | field | SDK | here |
//! |---|---|---|
//! | `threshold` | number, required | required; exact decimal ([`Amount`]) |
//! | `threshold_type` | required: `usage`, `usage_percentage`, `remaining`, `remaining_percentage` | the same ([`ThresholdType`]) |
//! | `feature_id` | optional | required (an alert measures one feature's pool) |
//! | `enabled` | optional, default `true` | the same |
//! | `basis` | optional, default `balance`: `balance`, `included`, `recurring`, `usage_limit` — what 100 % means | the same ([`AlertBasis`]) |
//! | `filter` | optional `{properties}`, only with basis `usage_limit` | refused, as the limits' `filter` is |
//! | `name` | optional label telling alerts on one feature apart | the same |
//! | `source` | response only: `customer` or `plan` | [`AlertSource`] |
//!
//! Depends on money and error only (below [`crate::model`], as
//! [`crate::limits`] is): a spec is checked against the catalog through a
//! `known_feature` predicate the caller passes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{invalid, EngineError};
use crate::money::{Amount, AMOUNT_SCALE};

/// Most alerts one customer may hold (plans' and its own together).
pub const MAX_ALERTS_PER_CUSTOMER: usize = 32;

/// The longest feature id or name (the model's id bound).
const MAX_ID_CHARS: usize = 256;

/// What the threshold measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThresholdType {
    /// Fires when usage reaches the threshold (an absolute count).
    Usage,
    /// Fires when usage reaches the threshold percent of the basis.
    UsagePercentage,
    /// Fires when the remaining balance falls to the threshold or below.
    Remaining,
    /// Fires when the remaining balance falls to the threshold percent of
    /// the basis or below.
    RemainingPercentage,
}

impl ThresholdType {
    pub const ALL: [ThresholdType; 4] = [
        ThresholdType::Usage,
        ThresholdType::UsagePercentage,
        ThresholdType::Remaining,
        ThresholdType::RemainingPercentage,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ThresholdType::Usage => "usage",
            ThresholdType::UsagePercentage => "usage_percentage",
            ThresholdType::Remaining => "remaining",
            ThresholdType::RemainingPercentage => "remaining_percentage",
        }
    }

    pub fn parse(s: &str) -> Option<ThresholdType> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    pub fn is_percentage(self) -> bool {
        matches!(
            self,
            ThresholdType::UsagePercentage | ThresholdType::RemainingPercentage
        )
    }

    /// Usage alerts fire as usage grows; remaining alerts as the balance
    /// shrinks.
    pub fn is_remaining(self) -> bool {
        matches!(
            self,
            ThresholdType::Remaining | ThresholdType::RemainingPercentage
        )
    }
}

/// What 100 % means for a percentage threshold (Autumn's `basis`), and so
/// which amounts the engine measures for the alert ([`Level`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AlertBasis {
    /// Every grant on the feature's pool (the default).
    #[default]
    Balance,
    /// The plan allowance only (buckets granted by a plan).
    Included,
    /// Grants that reset.
    Recurring,
    /// The cap of the usage limit on the same feature: the level is the
    /// limit's window (used, room, cap) instead of the pool's.
    UsageLimit,
}

impl AlertBasis {
    pub const ALL: [AlertBasis; 4] = [
        AlertBasis::Balance,
        AlertBasis::Included,
        AlertBasis::Recurring,
        AlertBasis::UsageLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertBasis::Balance => "balance",
            AlertBasis::Included => "included",
            AlertBasis::Recurring => "recurring",
            AlertBasis::UsageLimit => "usage_limit",
        }
    }

    pub fn parse(s: &str) -> Option<AlertBasis> {
        Self::ALL.into_iter().find(|b| b.as_str() == s)
    }
}

/// Which list an alert came from: the customer's own
/// (`billing_controls.usage_alerts`) or a plan's (`[[plans]] usage_alerts`).
/// Answers show it as Autumn's response-only `source` ([`AlertSource::as_str`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertSource {
    Customer,
    Plan(String),
}

impl AlertSource {
    /// `customer` or `plan`, as Autumn's `source`.
    pub fn as_str(&self) -> &'static str {
        match self {
            AlertSource::Customer => "customer",
            AlertSource::Plan(_) => "plan",
        }
    }

    pub fn plan_id(&self) -> Option<&str> {
        match self {
            AlertSource::Plan(p) => Some(p),
            AlertSource::Customer => None,
        }
    }
}

/// A validated alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertDef {
    /// Unique among the customer's alerts: `<feature_id>:<name>` when named,
    /// else `<feature_id>:<threshold_type>:<threshold>` (plus `:<basis>`
    /// when the basis is not `balance`). The ledger entry's `subject` and
    /// the webhook payload carry it.
    pub id: String,
    pub feature_id: String,
    /// An absolute count (`usage`, `remaining`) or a percentage, 0–100.
    pub threshold: Amount,
    pub threshold_type: ThresholdType,
    pub basis: AlertBasis,
    pub enabled: bool,
    pub name: Option<String>,
    pub source: AlertSource,
}

/// An alert as configured (`[[plans]] usage_alerts`) or sent
/// (`billing_controls.usage_alerts`), before validation; every field
/// optional so that [`AlertSpec::build`] names what is missing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AlertSpec {
    #[serde(default)]
    pub feature_id: Option<String>,
    #[serde(default)]
    pub threshold: Option<Amount>,
    #[serde(default)]
    pub threshold_type: Option<String>,
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub basis: Option<String>,
    /// Autumn's event filter: refused (never ignored), as for limits.
    #[serde(default)]
    pub filter: Option<Present>,
    #[serde(default)]
    pub name: Option<String>,
}

/// A field given with any value (its content is not kept): what a refused
/// field needs to be told apart from an absent one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Present;

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| Present)
    }
}

/// The list a spec comes in, for naming fields in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertList {
    /// `billing_controls.usage_alerts.<field>`
    Customer,
    /// `plans.usage_alerts.<field>`
    Plan,
}

/// The field an error names: `billing_controls.usage_alerts.threshold`,
/// `plans.usage_alerts.threshold`.
pub fn field(list: AlertList, name: &'static str) -> &'static str {
    macro_rules! names {
        ($($n:literal),*) => {
            match (list, name) {
                $(
                    (AlertList::Customer, $n) => concat!("billing_controls.usage_alerts.", $n),
                    (AlertList::Plan, $n) => concat!("plans.usage_alerts.", $n),
                )*
                (AlertList::Customer, _) => "billing_controls.usage_alerts",
                (AlertList::Plan, _) => "plans.usage_alerts",
            }
        };
    }
    names!(
        "feature_id",
        "threshold",
        "threshold_type",
        "basis",
        "filter",
        "name"
    )
}

fn check_id(field: &'static str, id: &str) -> Result<(), EngineError> {
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

/// 100 %.
fn hundred() -> Amount {
    Amount::whole(100)
}

impl AlertSpec {
    /// Validates the spec into an alert. `known_feature` says whether the
    /// catalog holds a feature (or credit system) id. Errors are
    /// [`EngineError::InvalidInput`] naming the field (HTTP: 400
    /// `invalid_inputs`).
    ///
    /// Thresholds: `usage` > 0; `remaining` ≥ 0 (0: the pool ran out);
    /// `usage_percentage` in (0, 100]; `remaining_percentage` in [0, 100].
    pub fn build(
        &self,
        list: AlertList,
        source: AlertSource,
        known_feature: impl Fn(&str) -> bool,
    ) -> Result<AlertDef, EngineError> {
        let f = |n| field(list, n);
        let feature_id = match &self.feature_id {
            None => return Err(invalid(f("feature_id"), "is required")),
            Some(id) => id,
        };
        check_id(f("feature_id"), feature_id)?;
        if !known_feature(feature_id) {
            return Err(invalid(
                f("feature_id"),
                format!("unknown feature {feature_id:?}"),
            ));
        }
        let threshold_type = match self.threshold_type.as_deref() {
            None => return Err(invalid(f("threshold_type"), "is required")),
            Some(s) => ThresholdType::parse(s).ok_or_else(|| {
                invalid(
                    f("threshold_type"),
                    "must be usage, usage_percentage, remaining or remaining_percentage",
                )
            })?,
        };
        let basis = match self.basis.as_deref() {
            None => AlertBasis::Balance,
            Some(s) => AlertBasis::parse(s).ok_or_else(|| {
                invalid(
                    f("basis"),
                    "must be balance, included, recurring or usage_limit",
                )
            })?,
        };
        if self.filter.is_some() {
            return Err(invalid(f("filter"), "event filters are not supported"));
        }
        let threshold = match self.threshold {
            None => return Err(invalid(f("threshold"), "is required")),
            Some(t) => t,
        };
        if threshold.is_negative() {
            return Err(invalid(f("threshold"), "must not be negative"));
        }
        if !threshold_type.is_remaining() && threshold.is_zero() {
            return Err(invalid(
                f("threshold"),
                "must be greater than zero for a usage alert",
            ));
        }
        if threshold_type.is_percentage() && threshold > hundred() {
            return Err(invalid(f("threshold"), "is a percentage: at most 100"));
        }
        if let Some(name) = &self.name {
            check_id(f("name"), name)?;
        }
        let id = derived_id(
            feature_id,
            self.name.as_deref(),
            threshold,
            threshold_type,
            basis,
        );
        if id.chars().count() > MAX_ID_CHARS {
            return Err(invalid(
                f("name"),
                "feature id and name together must fit in 256 characters",
            ));
        }
        Ok(AlertDef {
            id,
            feature_id: feature_id.clone(),
            threshold,
            threshold_type,
            basis,
            enabled: self.enabled.unwrap_or(true),
            name: self.name.clone(),
            source,
        })
    }
}

/// `premium_message:low` (named), `premium_message:usage_percentage:80`,
/// `credits:remaining:0:recurring`.
pub fn derived_id(
    feature_id: &str,
    name: Option<&str>,
    threshold: Amount,
    threshold_type: ThresholdType,
    basis: AlertBasis,
) -> String {
    match (name, basis) {
        (Some(n), _) => format!("{feature_id}:{n}"),
        (None, AlertBasis::Balance) => {
            format!("{feature_id}:{}:{threshold}", threshold_type.as_str())
        }
        (None, b) => format!(
            "{feature_id}:{}:{threshold}:{}",
            threshold_type.as_str(),
            b.as_str()
        ),
    }
}

/// An alert and whether it may fire (`armed`): it disarms when it fires and
/// re-arms when its level moves back across the threshold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArmedAlert {
    pub def: AlertDef,
    pub armed: bool,
}

impl ArmedAlert {
    pub fn new(def: AlertDef) -> ArmedAlert {
        ArmedAlert { def, armed: true }
    }
}

impl AlertDef {
    /// Same measurement (a redefinition keeping these keeps the armed state).
    fn same_shape(&self, other: &AlertDef) -> bool {
        (
            &self.feature_id,
            self.threshold,
            self.threshold_type,
            self.basis,
        ) == (
            &other.feature_id,
            other.threshold,
            other.threshold_type,
            other.basis,
        )
    }

    /// Whether the alert's condition holds at `level`: usage at or above
    /// the threshold, or remaining at or below it (a percentage of
    /// `granted`, compared without division). A percentage of nothing
    /// (`granted` ≤ 0) never holds.
    pub fn tripped(&self, level: &Level) -> bool {
        let t = self.threshold.raw() as i128;
        let pct = |v: Amount| v.raw() as i128 * 100 * AMOUNT_SCALE as i128;
        let of_granted = t * level.granted.raw() as i128;
        match self.threshold_type {
            ThresholdType::Usage => level.usage >= self.threshold,
            ThresholdType::Remaining => level.remaining <= self.threshold,
            _ if level.granted.raw() <= 0 => false,
            ThresholdType::UsagePercentage => pct(level.usage) >= of_granted,
            ThresholdType::RemainingPercentage => pct(level.remaining) <= of_granted,
        }
    }

    /// Whether `before → after` moves in the alert's direction: usage grew
    /// (usage alerts) or the remaining balance shrank (remaining alerts).
    pub fn moved_toward(&self, before: &Level, after: &Level) -> bool {
        if self.threshold_type.is_remaining() {
            after.remaining < before.remaining
        } else {
            after.usage > before.usage
        }
    }
}

/// What an alert measures, at one instant, on its [`AlertBasis`]: the
/// pool's (or with `usage_limit` the limit window's) usage this period, its
/// remaining balance, and what 100 % is (`granted`: every grant, the plan's
/// allowance, or the resetting grants; the limit's cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Level {
    pub usage: Amount,
    pub remaining: Amount,
    pub granted: Amount,
}

/// What a change does to one alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Record an alert entry and send `balances.usage_alert_triggered`.
    pub fires: bool,
    /// The alert's armed state after the change.
    pub armed: bool,
}

/// Decides one alert for one change of its level.
///
/// - It **fires** when the change crosses its threshold: not tripped
///   before, tripped after. It also fires when it is armed, already tripped
///   before and the change moves further in its direction — an alert
///   defined past its threshold (or re-armed by a reset the engine applied
///   before `before`) fires on the next use.
/// - Firing **disarms** it: further use past the threshold never fires
///   again.
/// - It **re-arms** when a change leaves it un-tripped: a reset, a top-up,
///   a refund, a larger grant moving the level back across the threshold.
/// - A disabled alert never fires, but its armed state follows the level
///   as if it did: enabling it later does not replay a crossing that
///   happened while it was off.
pub fn decide(alert: &AlertDef, before: &Level, after: &Level, armed: bool) -> Decision {
    let was = alert.tripped(before);
    let is = alert.tripped(after);
    let crossed = is && (!was || (armed && alert.moved_toward(before, after)));
    Decision {
        fires: alert.enabled && crossed,
        armed: !crossed && (armed || !is),
    }
}

/// Decides every alert of the customer on `feature_id` for one change,
/// updating their armed state; returns the indexes of those that fire.
/// `level` gives an alert's level before and after (the engine resolves the
/// basis); `None` skips the alert (its basis does not apply: no usage limit
/// on the feature, say).
pub fn decide_all(
    alerts: &mut [ArmedAlert],
    feature_id: &str,
    level: impl Fn(&AlertDef) -> Option<(Level, Level)>,
) -> Vec<usize> {
    let mut fired = vec![];
    for (i, a) in alerts.iter_mut().enumerate() {
        if a.def.feature_id != feature_id {
            continue;
        }
        let Some((before, after)) = level(&a.def) else {
            continue;
        };
        let d = decide(&a.def, &before, &after, a.armed);
        a.armed = d.armed;
        if d.fires {
            fired.push(i);
        }
    }
    fired
}

/// A change of a customer's alerts: each list given replaces the
/// customer's list of that source; `None` leaves it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertsUpdate {
    /// `billing_controls.usage_alerts` (`Some(vec![])` removes them all).
    pub usage_alerts: Option<Vec<AlertDef>>,
    /// A plan's alerts (attach): replaces that plan's.
    pub plan: Option<(String, Vec<AlertDef>)>,
}

/// Applies an update to a customer's alerts, like
/// [`crate::limits::update_limits`]: only the lists it names are replaced;
/// ids unique across the customer, at most [`MAX_ALERTS_PER_CUSTOMER`]; an
/// alert redefined with the same id and the same measurement keeps its
/// armed state (so re-sending the list does not fire again). All or nothing.
pub fn update_alerts(
    current: &[ArmedAlert],
    u: &AlertsUpdate,
) -> Result<Vec<ArmedAlert>, EngineError> {
    let replaced = |s: &AlertSource| match s {
        AlertSource::Customer => u.usage_alerts.is_some(),
        AlertSource::Plan(p) => u.plan.as_ref().is_some_and(|(q, _)| q == p),
    };
    let mut next: Vec<ArmedAlert> = current
        .iter()
        .filter(|a| !replaced(&a.def.source))
        .cloned()
        .collect();
    let incoming = [
        (u.usage_alerts.as_ref(), AlertList::Customer),
        (u.plan.as_ref().map(|(_, l)| l), AlertList::Plan),
    ];
    for (list, which) in incoming {
        for def in list.into_iter().flatten() {
            if next.iter().any(|a| a.def.id == def.id) {
                return Err(invalid(
                    field(which, "name"),
                    format!(
                        "{:?} is used by another alert of the customer (give each alert on a feature its own name or threshold)",
                        def.id
                    ),
                ));
            }
            let armed = current
                .iter()
                .find(|a| a.def.id == def.id && a.def.same_shape(def))
                .is_none_or(|old| old.armed);
            next.push(ArmedAlert {
                def: def.clone(),
                armed,
            });
        }
    }
    if next.len() > MAX_ALERTS_PER_CUSTOMER {
        return Err(invalid(
            "billing_controls.usage_alerts",
            format!("a customer may hold at most {MAX_ALERTS_PER_CUSTOMER} alerts"),
        ));
    }
    Ok(next)
}

/// `balances.limit_reached` for a pool: it fires when a change takes the
/// pool's remaining from above zero to zero or below. (Unlimited pools have
/// no remaining to reach: the engine does not ask.) A top-up or a reset
/// that lifts it above zero makes the next emptying fire again.
pub fn pool_reached_zero(before_remaining: Amount, after_remaining: Amount) -> bool {
    before_remaining.raw() > 0 && after_remaining.raw() <= 0
}

/// `balances.limit_reached` for a limit: it fires on the limit's first
/// denial in a window. `last_denied_window` is the start of the window of
/// the limit's last recorded denial (`None`: never); a rate limit passes
/// the start of its period (`now` floored to `interval × interval_count`).
/// Windows only move forward: a denial in a window starting at or before
/// the last one recorded does not fire.
pub fn first_denial_in_window(last_denied_window: Option<i64>, window_start: i64) -> bool {
    last_denied_window.is_none_or(|w| window_start > w)
}

/// The per-limit "last denied window" a customer keeps (limit id → window
/// start), with the rule of [`first_denial_in_window`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenialWindows(pub BTreeMap<String, i64>);

impl DenialWindows {
    /// Records a denial by `limit_id` in the window starting at
    /// `window_start`; `true` when it is the limit's first in that window
    /// (send `balances.limit_reached`).
    pub fn record(&mut self, limit_id: &str, window_start: i64) -> bool {
        let last = self.0.get(limit_id).copied();
        if !first_denial_in_window(last, window_start) {
            return false;
        }
        self.0.insert(limit_id.to_string(), window_start);
        true
    }

    /// Forgets limits the customer no longer holds.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.0.retain(|id, _| keep(id));
    }
}

/// Which limit `balances.limit_reached` reports. Autumn's are `included`,
/// `max_purchase` and `spend_limit`; creditgate sends `included` (a pool
/// reached zero) and its own `usage_limit` (a window or rate limit denied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitType {
    Included,
    UsageLimit,
}

/// The event types creditgate sends (the names Autumn's SDK lists for
/// `webhooks.create`'s `events`).
pub const USAGE_ALERT_TRIGGERED: &str = "balances.usage_alert_triggered";
pub const LIMIT_REACHED: &str = "balances.limit_reached";

/// `data` of `balances.usage_alert_triggered`: Autumn's fields
/// (`customer_id`, `feature_id`, `usage_alert {name, threshold,
/// threshold_type}`) plus creditgate's `id`, `basis`, `source` and the
/// level after the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageAlertTriggered {
    pub customer_id: String,
    pub feature_id: String,
    pub usage_alert: UsageAlertPayload,
    /// The level that tripped it.
    pub usage: Amount,
    pub remaining: Amount,
    pub granted: Amount,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageAlertPayload {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub threshold: Amount,
    pub threshold_type: ThresholdType,
    pub basis: AlertBasis,
    /// `customer` or `plan`.
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan_id: Option<String>,
}

impl UsageAlertTriggered {
    pub fn new(customer_id: &str, alert: &AlertDef, after: &Level) -> UsageAlertTriggered {
        UsageAlertTriggered {
            customer_id: customer_id.to_string(),
            feature_id: alert.feature_id.clone(),
            usage_alert: UsageAlertPayload {
                id: alert.id.clone(),
                name: alert.name.clone(),
                threshold: alert.threshold,
                threshold_type: alert.threshold_type,
                basis: alert.basis,
                source: alert.source.as_str().to_string(),
                plan_id: alert.source.plan_id().map(str::to_string),
            },
            usage: after.usage,
            remaining: after.remaining,
            granted: after.granted,
        }
    }
}

/// `data` of `balances.limit_reached`: Autumn's fields (`customer_id`,
/// `feature_id`, `limit_type`) plus the limit's id and window for a limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitReached {
    pub customer_id: String,
    pub feature_id: String,
    pub limit_type: LimitType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_id: Option<String>,
    /// The window's start (ms) for a limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_start: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(n: i64) -> Amount {
        Amount::whole(n)
    }

    fn known(f: &str) -> bool {
        matches!(f, "premium_message" | "credits")
    }

    fn spec(feature: &str, threshold: i64, ty: &str) -> AlertSpec {
        AlertSpec {
            feature_id: Some(feature.into()),
            threshold: Some(a(threshold)),
            threshold_type: Some(ty.into()),
            ..AlertSpec::default()
        }
    }

    fn alert(threshold: i64, ty: ThresholdType) -> AlertDef {
        spec("credits", threshold, ty.as_str())
            .build(AlertList::Customer, AlertSource::Customer, known)
            .unwrap()
    }

    fn lvl(usage: i64, granted: i64) -> Level {
        Level {
            usage: a(usage),
            remaining: a(granted - usage),
            granted: a(granted),
        }
    }

    fn err_field(e: EngineError) -> &'static str {
        match e {
            EngineError::InvalidInput { field, .. } => field,
            other => panic!("not an input error: {other:?}"),
        }
    }

    #[test]
    fn builds_with_autumns_defaults() {
        let d = spec("credits", 80, "usage_percentage")
            .build(AlertList::Customer, AlertSource::Customer, known)
            .unwrap();
        assert_eq!(d.id, "credits:usage_percentage:80");
        assert_eq!(d.basis, AlertBasis::Balance);
        assert!(d.enabled);
        assert_eq!(d.name, None);
        assert_eq!(d.source.as_str(), "customer");
        let named = AlertSpec {
            name: Some("low".into()),
            basis: Some("recurring".into()),
            enabled: Some(false),
            ..spec("credits", 0, "remaining")
        }
        .build(AlertList::Plan, AlertSource::Plan("pro".into()), known)
        .unwrap();
        assert_eq!(named.id, "credits:low");
        assert_eq!(named.basis, AlertBasis::Recurring);
        assert!(!named.enabled);
        assert_eq!(named.source.plan_id(), Some("pro"));
        let based = AlertSpec {
            basis: Some("included".into()),
            threshold: Some(Amount::parse("12.5").unwrap()),
            ..spec("credits", 0, "remaining_percentage")
        }
        .build(AlertList::Customer, AlertSource::Customer, known)
        .unwrap();
        assert_eq!(based.id, "credits:remaining_percentage:12.5:included");
    }

    #[test]
    fn every_bad_field_is_named() {
        let cases: Vec<(AlertSpec, &str)> = vec![
            (
                AlertSpec {
                    feature_id: None,
                    ..spec("credits", 1, "usage")
                },
                "billing_controls.usage_alerts.feature_id",
            ),
            (
                spec("nope", 1, "usage"),
                "billing_controls.usage_alerts.feature_id",
            ),
            (
                spec("", 1, "usage"),
                "billing_controls.usage_alerts.feature_id",
            ),
            (
                AlertSpec {
                    threshold: None,
                    ..spec("credits", 1, "usage")
                },
                "billing_controls.usage_alerts.threshold",
            ),
            (
                spec("credits", 0, "usage"),
                "billing_controls.usage_alerts.threshold",
            ),
            (
                spec("credits", -1, "remaining"),
                "billing_controls.usage_alerts.threshold",
            ),
            (
                spec("credits", 101, "usage_percentage"),
                "billing_controls.usage_alerts.threshold",
            ),
            (
                spec("credits", 101, "remaining_percentage"),
                "billing_controls.usage_alerts.threshold",
            ),
            (
                spec("credits", 0, "usage_percentage"),
                "billing_controls.usage_alerts.threshold",
            ),
            (
                spec("credits", 1, "percent"),
                "billing_controls.usage_alerts.threshold_type",
            ),
            (
                AlertSpec {
                    threshold_type: None,
                    ..spec("credits", 1, "usage")
                },
                "billing_controls.usage_alerts.threshold_type",
            ),
            (
                AlertSpec {
                    basis: Some("wallet".into()),
                    ..spec("credits", 1, "usage")
                },
                "billing_controls.usage_alerts.basis",
            ),
            (
                AlertSpec {
                    filter: Some(Present),
                    basis: Some("usage_limit".into()),
                    ..spec("credits", 1, "usage")
                },
                "billing_controls.usage_alerts.filter",
            ),
            (
                AlertSpec {
                    name: Some("a\u{7}".into()),
                    ..spec("credits", 1, "usage")
                },
                "billing_controls.usage_alerts.name",
            ),
            (
                AlertSpec {
                    name: Some("x".repeat(250)),
                    ..spec("credits", 1, "usage")
                },
                "billing_controls.usage_alerts.name",
            ),
        ];
        for (s, want) in cases {
            let e = s
                .build(AlertList::Customer, AlertSource::Customer, known)
                .unwrap_err();
            assert_eq!(err_field(e), want, "{s:?}");
        }
        let e = spec("nope", 1, "usage")
            .build(AlertList::Plan, AlertSource::Plan("p".into()), known)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid plans.usage_alerts.feature_id: unknown feature \"nope\""
        );
        // The boundaries themselves are fine.
        for (t, ty) in [
            (100, "usage_percentage"),
            (100, "remaining_percentage"),
            (0, "remaining_percentage"),
            (0, "remaining"),
        ] {
            spec("credits", t, ty)
                .build(AlertList::Customer, AlertSource::Customer, known)
                .unwrap();
        }
    }

    #[test]
    fn the_spec_parses_autumns_json_and_rejects_unknown_keys() {
        let s: AlertSpec = serde_json::from_value(serde_json::json!({
            "feature_id": "credits", "threshold": 80.0, "threshold_type": "usage_percentage",
            "name": "eighty", "enabled": true, "basis": "balance"
        }))
        .unwrap();
        let d = s
            .build(AlertList::Customer, AlertSource::Customer, known)
            .unwrap();
        assert_eq!((d.threshold, d.id.as_str()), (a(80), "credits:eighty"));
        let e = serde_json::from_value::<AlertSpec>(serde_json::json!({
            "feature_id": "credits", "threshold": 1, "threshold_type": "usage", "treshold": 2
        }))
        .unwrap_err();
        assert!(e.to_string().contains("treshold"), "{e}");
        // A filter of any shape is noticed, and refused by build.
        let f: AlertSpec = serde_json::from_value(serde_json::json!({
            "feature_id": "credits", "threshold": 1, "threshold_type": "usage",
            "basis": "usage_limit", "filter": {"properties": {"model": "gpt-4"}}
        }))
        .unwrap();
        assert_eq!(f.filter, Some(Present));
        let e = f
            .build(AlertList::Customer, AlertSource::Customer, known)
            .unwrap_err();
        assert_eq!(err_field(e), "billing_controls.usage_alerts.filter");
    }

    #[test]
    fn usage_alert_fires_once_per_crossing_and_rearms_on_reset() {
        let al = alert(80, ThresholdType::Usage);
        let steps = [
            (lvl(0, 100), lvl(50, 100), false, true),
            (lvl(50, 100), lvl(80, 100), true, false), // reaches it: fires
            (lvl(80, 100), lvl(95, 100), false, false), // further: silent
            (lvl(95, 100), lvl(85, 100), false, false), // refund, still past
            (lvl(85, 100), lvl(0, 100), false, true),  // reset: re-armed
            (lvl(0, 100), lvl(100, 100), true, false), // crosses again
        ];
        let mut armed = true;
        for (i, (b, af, fires, arm)) in steps.into_iter().enumerate() {
            let d = decide(&al, &b, &af, armed);
            assert_eq!((d.fires, d.armed), (fires, arm), "step {i}");
            armed = d.armed;
        }
    }

    #[test]
    fn remaining_alerts_fire_as_the_balance_falls() {
        let al = alert(10, ThresholdType::Remaining);
        assert!(decide(&al, &lvl(80, 100), &lvl(90, 100), true).fires);
        assert!(!decide(&al, &lvl(80, 100), &lvl(89, 100), true).fires);
        // A top-up lifts remaining back above 10: re-armed.
        let d = decide(&al, &lvl(90, 100), &lvl(90, 150), false);
        assert_eq!((d.fires, d.armed), (false, true));
        // Zero threshold: fires when it runs out (and with overage below).
        let zero = alert(0, ThresholdType::Remaining);
        assert!(decide(&zero, &lvl(99, 100), &lvl(100, 100), true).fires);
        assert!(decide(&zero, &lvl(99, 100), &lvl(120, 100), true).fires);
        assert!(!decide(&zero, &lvl(98, 100), &lvl(99, 100), true).fires);
    }

    #[test]
    fn percentages_are_of_the_basis_and_exact() {
        let u = alert(80, ThresholdType::UsagePercentage);
        assert!(u.tripped(&lvl(80, 100)));
        assert!(!u.tripped(&Level {
            usage: Amount::from_raw(79_9999).unwrap(),
            ..lvl(0, 100)
        }));
        assert!(u.tripped(&lvl(160, 200)));
        assert!(!u.tripped(&lvl(159, 200)));
        // Nothing granted: no percentage holds.
        assert!(!u.tripped(&lvl(5, 0)));
        let r = alert(25, ThresholdType::RemainingPercentage);
        assert!(r.tripped(&lvl(75, 100)));
        assert!(!r.tripped(&lvl(74, 100)));
        assert!(!r.tripped(&lvl(0, 0)));
        // A lower grant (an admin update) can trip it with no usage change:
        // a crossing all the same.
        assert!(decide(&u, &lvl(50, 100), &lvl(50, 60), true).fires);
        // A larger grant re-arms it.
        let d = decide(&u, &lvl(90, 100), &lvl(90, 200), false);
        assert_eq!((d.fires, d.armed), (false, true));
        // 100 % of usage with overage: fires at the grant, not before.
        let full = alert(100, ThresholdType::UsagePercentage);
        assert!(!decide(&full, &lvl(0, 10), &lvl(9, 10), true).fires);
        assert!(decide(&full, &lvl(9, 10), &lvl(12, 10), true).fires);
    }

    #[test]
    fn an_alert_defined_past_its_threshold_fires_on_the_next_use_only() {
        let al = alert(50, ThresholdType::Usage);
        // Armed (new), already past: no move, no fire.
        let d = decide(&al, &lvl(60, 100), &lvl(60, 100), true);
        assert_eq!((d.fires, d.armed), (false, true));
        // A refund (moving away) does not fire either.
        assert!(!decide(&al, &lvl(60, 100), &lvl(55, 100), true).fires);
        let d = decide(&al, &lvl(60, 100), &lvl(61, 100), true);
        assert_eq!((d.fires, d.armed), (true, false));
        assert!(!decide(&al, &lvl(61, 100), &lvl(70, 100), false).fires);
    }

    #[test]
    fn disabled_alerts_never_fire_and_do_not_replay_when_enabled() {
        let mut al = alert(50, ThresholdType::Usage);
        al.enabled = false;
        let d = decide(&al, &lvl(0, 100), &lvl(60, 100), true);
        assert_eq!((d.fires, d.armed), (false, false));
        // Enabled again while past: the crossing happened while disabled,
        // so further use is silent until the level comes back.
        al.enabled = true;
        assert!(!decide(&al, &lvl(60, 100), &lvl(70, 100), d.armed).fires);
        let back = decide(&al, &lvl(70, 100), &lvl(0, 100), d.armed);
        assert!(back.armed);
        assert!(decide(&al, &lvl(0, 100), &lvl(50, 100), back.armed).fires);
    }

    #[test]
    fn decide_all_touches_only_the_feature_and_skips_missing_bases() {
        let mut alerts = vec![
            ArmedAlert::new(alert(10, ThresholdType::Usage)),
            ArmedAlert::new(
                spec("premium_message", 10, "usage")
                    .build(AlertList::Customer, AlertSource::Customer, known)
                    .unwrap(),
            ),
            ArmedAlert::new(
                AlertSpec {
                    basis: Some("usage_limit".into()),
                    ..spec("credits", 5, "usage")
                }
                .build(AlertList::Customer, AlertSource::Customer, known)
                .unwrap(),
            ),
        ];
        let fired = decide_all(&mut alerts, "credits", |d| {
            (d.basis != AlertBasis::UsageLimit).then(|| (lvl(0, 100), lvl(20, 100)))
        });
        assert_eq!(fired, vec![0]);
        assert!(!alerts[0].armed);
        assert!(alerts[1].armed && alerts[2].armed);
    }

    fn customer(defs: &[AlertDef]) -> Option<Vec<AlertDef>> {
        Some(defs.to_vec())
    }

    #[test]
    fn update_replaces_only_the_lists_it_names_and_keeps_armed_state() {
        let own = alert(80, ThresholdType::Usage);
        let plan = AlertSpec {
            name: Some("low".into()),
            ..spec("credits", 10, "remaining")
        }
        .build(AlertList::Plan, AlertSource::Plan("pro".into()), known)
        .unwrap();
        let s = update_alerts(
            &[],
            &AlertsUpdate {
                usage_alerts: customer(std::slice::from_ref(&own)),
                plan: Some(("pro".into(), vec![plan.clone()])),
            },
        )
        .unwrap();
        assert_eq!(s.len(), 2);
        let mut s = s;
        s[0].armed = false; // it fired
                            // Re-sending the same customer list keeps it disarmed; the plan's is kept.
        let t = update_alerts(
            &s,
            &AlertsUpdate {
                usage_alerts: customer(std::slice::from_ref(&own)),
                plan: None,
            },
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        let own_now = t.iter().find(|a| a.def.id == own.id).unwrap();
        assert!(!own_now.armed);
        assert!(t.iter().any(|a| a.def == plan));
        // A changed measurement under the same id (a name) starts armed.
        let renamed = |threshold| {
            AlertSpec {
                name: Some("n".into()),
                ..spec("credits", threshold, "usage")
            }
            .build(AlertList::Customer, AlertSource::Customer, known)
            .unwrap()
        };
        let mut u = update_alerts(
            &[],
            &AlertsUpdate {
                usage_alerts: Some(vec![renamed(5)]),
                plan: None,
            },
        )
        .unwrap();
        u[0].armed = false;
        let v = update_alerts(
            &u,
            &AlertsUpdate {
                usage_alerts: Some(vec![renamed(6)]),
                plan: None,
            },
        )
        .unwrap();
        assert!(v[0].armed);
        // Nothing named: nothing changes; an empty list removes the list.
        assert_eq!(update_alerts(&t, &AlertsUpdate::default()).unwrap(), t);
        let w = update_alerts(
            &t,
            &AlertsUpdate {
                usage_alerts: Some(vec![]),
                plan: None,
            },
        )
        .unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].def.source, AlertSource::Plan("pro".into()));
        // Another plan's list leaves "pro"'s.
        let x = update_alerts(
            &w,
            &AlertsUpdate {
                usage_alerts: None,
                plan: Some(("team".into(), vec![])),
            },
        )
        .unwrap();
        assert_eq!(x, w);
    }

    #[test]
    fn update_refuses_duplicates_and_too_many_all_or_nothing() {
        let own = alert(80, ThresholdType::Usage);
        let e = update_alerts(
            &[],
            &AlertsUpdate {
                usage_alerts: Some(vec![own.clone(), own.clone()]),
                plan: None,
            },
        )
        .unwrap_err();
        assert_eq!(err_field(e), "billing_controls.usage_alerts.name");
        // A plan's alert colliding with the customer's own.
        let mut same = own.clone();
        same.source = AlertSource::Plan("pro".into());
        let current = vec![ArmedAlert::new(own.clone())];
        let e = update_alerts(
            &current,
            &AlertsUpdate {
                usage_alerts: None,
                plan: Some(("pro".into(), vec![same])),
            },
        )
        .unwrap_err();
        assert_eq!(err_field(e), "plans.usage_alerts.name");
        let many: Vec<AlertDef> = (1..=33).map(|t| alert(t, ThresholdType::Usage)).collect();
        let e = update_alerts(
            &current,
            &AlertsUpdate {
                usage_alerts: Some(many.clone()),
                plan: None,
            },
        )
        .unwrap_err();
        assert_eq!(err_field(e), "billing_controls.usage_alerts");
        assert_eq!(
            update_alerts(
                &[],
                &AlertsUpdate {
                    usage_alerts: Some(many[..32].to_vec()),
                    plan: None,
                }
            )
            .unwrap()
            .len(),
            32
        );
    }

    #[test]
    fn limit_reached_rules() {
        assert!(pool_reached_zero(a(1), a(0)));
        assert!(pool_reached_zero(a(1), a(-5)));
        assert!(pool_reached_zero(Amount::from_raw(1).unwrap(), a(0)));
        assert!(!pool_reached_zero(a(0), a(0)), "already empty");
        assert!(!pool_reached_zero(a(0), a(-1)), "overage past zero again");
        assert!(!pool_reached_zero(a(5), a(1)));
        assert!(!pool_reached_zero(a(-1), a(3)), "a top-up");
        assert!(first_denial_in_window(None, 0));
        assert!(first_denial_in_window(Some(0), 60_000));
        assert!(!first_denial_in_window(Some(60_000), 60_000));
        assert!(!first_denial_in_window(Some(60_000), 0));
        let mut w = DenialWindows::default();
        assert!(w.record("m", 0));
        assert!(!w.record("m", 0));
        assert!(w.record("n", 0), "per limit");
        assert!(w.record("m", 60_000));
        assert!(!w.record("m", 0), "an older window never fires");
        w.retain(|id| id == "n");
        assert_eq!(w.0.len(), 1);
    }

    #[test]
    fn payloads_serialize_in_autumns_shape() {
        let mut al = AlertSpec {
            name: Some("eighty".into()),
            ..spec("credits", 80, "usage_percentage")
        }
        .build(AlertList::Plan, AlertSource::Plan("pro".into()), known)
        .unwrap();
        let v =
            serde_json::to_value(UsageAlertTriggered::new("alice", &al, &lvl(160, 200))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "customer_id": "alice", "feature_id": "credits",
                "usage_alert": {"id": "credits:eighty", "name": "eighty", "threshold": 80,
                    "threshold_type": "usage_percentage", "basis": "balance",
                    "source": "plan", "plan_id": "pro"},
                "usage": 160, "remaining": 40, "granted": 200
            })
        );
        al.name = None;
        al.source = AlertSource::Customer;
        let v = serde_json::to_value(UsageAlertTriggered::new("alice", &al, &lvl(1, 2))).unwrap();
        assert!(v["usage_alert"].get("name").is_none());
        assert!(v["usage_alert"].get("plan_id").is_none());
        let l = LimitReached {
            customer_id: "alice".into(),
            feature_id: "credits".into(),
            limit_type: LimitType::Included,
            limit_id: None,
            window_start: None,
        };
        assert_eq!(
            serde_json::to_value(l).unwrap(),
            serde_json::json!({"customer_id": "alice", "feature_id": "credits", "limit_type": "included"})
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn ty() -> impl Strategy<Value = ThresholdType> {
            prop::sample::select(ThresholdType::ALL.to_vec())
        }

        /// A walk of levels: each step uses, refunds, resets or re-grants.
        fn walk() -> impl Strategy<Value = Vec<Level>> {
            prop::collection::vec((0i64..4, 0i64..40, 1i64..200), 1..60).prop_map(|steps| {
                let mut l = lvl(0, 100);
                let mut out = vec![l];
                for (kind, n, g) in steps {
                    l = match kind {
                        0 => Level {
                            usage: a(l.usage.raw() / 10_000 + n),
                            remaining: a(l.remaining.raw() / 10_000 - n),
                            ..l
                        },
                        1 => {
                            let back = n.min(l.usage.raw() / 10_000);
                            Level {
                                usage: a(l.usage.raw() / 10_000 - back),
                                remaining: a(l.remaining.raw() / 10_000 + back),
                                ..l
                            }
                        }
                        2 => lvl(0, l.granted.raw() / 10_000),
                        _ => lvl(l.usage.raw() / 10_000, g),
                    };
                    out.push(l);
                }
                out
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

            /// From an un-tripped start, an alert fires exactly once per
            /// crossing (un-tripped → tripped), never twice without an
            /// un-tripped level between.
            #[test]
            fn fires_exactly_once_per_crossing(
                t in ty(), threshold in 1i64..100, levels in walk()
            ) {
                let al = alert(threshold, t);
                prop_assume!(!al.tripped(&levels[0]));
                let mut armed = true;
                let mut fired_since_clear = false;
                for w in levels.windows(2) {
                    let d = decide(&al, &w[0], &w[1], armed);
                    let crossing = !al.tripped(&w[0]) && al.tripped(&w[1]);
                    prop_assert_eq!(d.fires, crossing);
                    if d.fires {
                        prop_assert!(!fired_since_clear);
                        fired_since_clear = true;
                    }
                    if !al.tripped(&w[1]) {
                        fired_since_clear = false;
                        prop_assert!(d.armed, "re-armed once back across");
                    }
                    if al.tripped(&w[1]) {
                        prop_assert!(!d.armed);
                    }
                    armed = d.armed;
                }
            }

            /// From any start and any armed state, fires never exceed
            /// crossings + 1 (the one fire of an alert defined past its
            /// threshold), and a firing change always ends tripped.
            #[test]
            fn fires_are_bounded_by_crossings(
                t in ty(), threshold in 1i64..100, levels in walk(), armed0: bool, skip in 0usize..30
            ) {
                let al = alert(threshold, t);
                let levels = &levels[skip.min(levels.len() - 1)..];
                let mut armed = armed0;
                let (mut fires, mut crossings) = (0, 0);
                for w in levels.windows(2) {
                    let d = decide(&al, &w[0], &w[1], armed);
                    if d.fires {
                        fires += 1;
                        prop_assert!(al.tripped(&w[1]));
                    }
                    if !al.tripped(&w[0]) && al.tripped(&w[1]) {
                        crossings += 1;
                    }
                    armed = d.armed;
                }
                prop_assert!(fires <= crossings + 1);
            }

            /// Percentages agree with the exact rational comparison.
            #[test]
            fn percentages_match_rationals(
                usage in -1_000_000i64..2_000_000, granted in 1i64..2_000_000, pct in 1i64..=100
            ) {
                let l = Level {
                    usage: Amount::from_raw(usage).unwrap(),
                    remaining: Amount::from_raw(granted - usage).unwrap(),
                    granted: Amount::from_raw(granted).unwrap(),
                };
                let u = alert(pct, ThresholdType::UsagePercentage);
                prop_assert_eq!(u.tripped(&l), usage as i128 * 100 >= pct as i128 * granted as i128);
                let r = alert(pct, ThresholdType::RemainingPercentage);
                prop_assert_eq!(r.tripped(&l), (granted - usage) as i128 * 100 <= pct as i128 * granted as i128);
            }

            /// A pool fires limit_reached at most once between two moments
            /// above zero.
            #[test]
            fn pool_zero_fires_once_per_emptying(steps in prop::collection::vec(-50i64..50, 1..80)) {
                let mut rem = 10i64;
                let mut fired_since_positive = false;
                for s in steps {
                    let next = rem - s;
                    let f = pool_reached_zero(a(rem), a(next));
                    if f {
                        prop_assert!(!fired_since_positive);
                        fired_since_positive = true;
                    }
                    if next > 0 {
                        fired_since_positive = false;
                    }
                    rem = next;
                }
            }
        }
    }
}
