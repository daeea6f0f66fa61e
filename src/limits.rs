//! Limits beside credits (issue 13): caps on what a customer may use of one
//! feature (or, in credits, of one credit system) independently of its
//! balance. Pure data and arithmetic, no I/O; [`crate::rules`] decides a
//! request with them in the same step as its deduction.
//!
//! Two kinds:
//! - **window**: at most `limit` units per `interval × interval_count`,
//!   `fixed` (one counter per window) or `sliding` (the two-window weighted
//!   estimate: `used = current + ceil(previous × (end − now) / length)`,
//!   see [`sliding_error_bound`]);
//! - **rate**: GCRA, `rate` units per period with a `burst`, one stored value
//!   (the theoretical arrival time, TAT) kept exactly as `ms × rate_raw`, so
//!   every step is integer arithmetic without rounding.
//!
//! Windows are anchored at UTC by default (`anchor = "utc"`: days at
//! midnight UTC, weeks on Monday, months on the 1st), or at the anchor of
//! the paying pool's resetting bucket (`anchor = "billing_cycle"`, falling
//! back to UTC when there is none), with the calendar's month-end clamping.
//! All amounts are raw fixed point ([`Amount`], ×10⁴).
//!
//! Core: depends on calendar, money and error only; [`crate::model`] holds
//! a customer's armed limits and validates specs against the catalog.

use serde::{Deserialize, Serialize};

use crate::calendar::{ms_of, Interval, Period, Step};
use crate::error::{invalid, EngineError};
use crate::money::Amount;

/// Most limits one customer may hold (plans' and its own together).
pub const MAX_LIMITS_PER_CUSTOMER: usize = 32;

/// Where windows start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Anchor {
    /// The UTC calendar (the default).
    #[default]
    Utc,
    /// The paying pool's resetting bucket's anchor; UTC without one.
    BillingCycle,
}

impl Anchor {
    pub fn as_str(self) -> &'static str {
        match self {
            Anchor::Utc => "utc",
            Anchor::BillingCycle => "billing_cycle",
        }
    }
}

/// How a window counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WindowMode {
    #[default]
    Fixed,
    Sliding,
}

impl WindowMode {
    pub fn as_str(self) -> &'static str {
        match self {
            WindowMode::Fixed => "fixed",
            WindowMode::Sliding => "sliding",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum LimitKind {
    Window {
        limit: Amount,
        interval: Interval,
        interval_count: u32,
        anchor: Anchor,
        window: WindowMode,
    },
    Rate {
        /// Units per period.
        rate: Amount,
        interval: Interval,
        interval_count: u32,
        burst: Amount,
    },
}

/// Which list a limit came from: `billing_controls.usage_limits`,
/// `billing_controls.rate_limits`, or a plan's `limits`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitSource {
    UsageLimits,
    RateLimits,
    Plan(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitDef {
    pub id: String,
    pub feature_id: String,
    pub kind: LimitKind,
    pub enabled: bool,
    pub shadow: bool,
    pub source: LimitSource,
}

impl LimitDef {
    /// The most the limit ever allows at once: `limit`, or a rate's `burst`.
    pub fn quota(&self) -> i64 {
        match self.kind {
            LimitKind::Window { limit, .. } => limit.raw(),
            LimitKind::Rate { burst, .. } => burst.raw(),
        }
    }

    /// The window's (or the rate's period's) nominal length, ms.
    pub fn window_ms(&self) -> i64 {
        match self.kind {
            LimitKind::Window {
                interval,
                interval_count,
                ..
            }
            | LimitKind::Rate {
                interval,
                interval_count,
                ..
            } => Period::new(interval, interval_count).map_or(0, |p| p.nominal_ms()),
        }
    }

    /// Same counting rule (a redefinition keeping these keeps the counter).
    fn same_shape(&self, other: &LimitDef) -> bool {
        self.feature_id == other.feature_id
            && match (self.kind, other.kind) {
                (
                    LimitKind::Window {
                        interval: a,
                        interval_count: b,
                        anchor: c,
                        window: d,
                        ..
                    },
                    LimitKind::Window {
                        interval: e,
                        interval_count: f,
                        anchor: g,
                        window: h,
                        ..
                    },
                ) => (a, b, c, d) == (e, f, g, h),
                (
                    LimitKind::Rate {
                        rate: a,
                        interval: b,
                        interval_count: c,
                        ..
                    },
                    LimitKind::Rate {
                        rate: d,
                        interval: e,
                        interval_count: f,
                        ..
                    },
                ) => (a, b, c) == (d, e, f),
                _ => false,
            }
    }
}

/// A limit's counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Counter {
    /// The window starting at `start` has `used`; `prev` is what the window
    /// just before it used (sliding windows weigh it in).
    Window { start: i64, used: i64, prev: i64 },
    /// GCRA's theoretical arrival time, in ms × rate_raw (0: never used).
    Rate { tat: i128 },
}

/// A limit and its counter, as a customer holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArmedLimit {
    pub def: LimitDef,
    pub counter: Counter,
}

/// Monday 1970-01-05: where UTC weeks start.
fn utc_anchor(interval: Interval) -> i64 {
    match interval {
        Interval::Week => ms_of(1970, 1, 5, 0, 0),
        _ => 0,
    }
}

/// The window `[start, end)` holding `t`.
pub fn window_at(interval: Interval, count: u32, anchor: i64, t: i64) -> (i64, i64) {
    let Some(p) = Period::new(interval, count) else {
        return (i64::MIN, i64::MAX);
    };
    let i = p.last_index_at_or_before(anchor, t);
    (p.boundary(anchor, i), p.boundary(anchor, i + 1))
}

fn ceil_div(a: i128, b: i128) -> i128 {
    if b == 0 {
        return 0;
    }
    let q = a.div_euclid(b);
    if a.rem_euclid(b) == 0 {
        q
    } else {
        q + 1
    }
}

/// One limit seen at one instant, with its window's anchor resolved.
#[derive(Debug, Clone, Copy)]
pub struct View {
    /// The counter as of now (a window's rolled to the current window).
    pub counter: Counter,
    /// Current window (window kind), or `(now, now)` (rate kind).
    pub start: i64,
    pub end: i64,
    pub now: i64,
    /// The anchor the windows count from.
    pub anchor: i64,
}

impl ArmedLimit {
    pub fn new(def: LimitDef) -> ArmedLimit {
        let counter = match def.kind {
            LimitKind::Window { .. } => Counter::Window {
                start: i64::MIN,
                used: 0,
                prev: 0,
            },
            LimitKind::Rate { .. } => Counter::Rate { tat: 0 },
        };
        ArmedLimit { def, counter }
    }

    /// The anchor its windows count from, given the paying pool's
    /// resetting bucket's anchor (if any).
    pub fn anchor_ms(&self, billing_anchor: Option<i64>) -> i64 {
        match self.def.kind {
            LimitKind::Window {
                anchor: Anchor::BillingCycle,
                interval,
                ..
            } => billing_anchor.unwrap_or_else(|| utc_anchor(interval)),
            LimitKind::Window { interval, .. } => utc_anchor(interval),
            LimitKind::Rate { .. } => 0,
        }
    }

    /// The limit at `now` (windows anchored at `anchor`).
    pub fn view(&self, anchor: i64, now: i64) -> View {
        match (self.def.kind, self.counter) {
            (
                LimitKind::Window {
                    interval,
                    interval_count,
                    ..
                },
                Counter::Window { start, used, prev },
            ) => {
                let (s, e) = window_at(interval, interval_count, anchor, now);
                let counter = if start == s {
                    Counter::Window { start, used, prev }
                } else {
                    // The window just before the current one is the stored
                    // one only when the stored one ends where this starts.
                    let (_, stored_end) = if start == i64::MIN {
                        (0, i64::MIN)
                    } else {
                        window_at(interval, interval_count, anchor, start)
                    };
                    let prev = if stored_end == s && start < s {
                        used
                    } else {
                        0
                    };
                    Counter::Window {
                        start: s,
                        used: 0,
                        prev,
                    }
                };
                View {
                    counter,
                    start: s,
                    end: e,
                    now,
                    anchor,
                }
            }
            (_, counter) => View {
                counter,
                start: now,
                end: now,
                now,
                anchor,
            },
        }
    }

    fn rate_params(&self) -> Option<(i128, i128, i128)> {
        match self.def.kind {
            LimitKind::Rate {
                rate,
                interval,
                interval_count,
                burst,
            } => {
                let p = match Period::new(interval, interval_count)?.step {
                    Step::Millis(ms) => ms as i128,
                    Step::Months(_) => return None,
                };
                Some((rate.raw() as i128, p, burst.raw() as i128))
            }
            _ => None,
        }
    }

    /// What the limit counts as used now (a sliding window's estimate).
    pub fn used(&self, v: &View) -> i64 {
        match v.counter {
            Counter::Window { used, prev, .. } => {
                let sliding = matches!(
                    self.def.kind,
                    LimitKind::Window {
                        window: WindowMode::Sliding,
                        ..
                    }
                );
                if !sliding || prev == 0 {
                    return used;
                }
                let len = (v.end - v.start) as i128;
                let w = ceil_div(prev as i128 * (v.end - v.now) as i128, len);
                (used as i128 + w).min(i64::MAX as i128) as i64
            }
            Counter::Rate { tat } => {
                let Some((r, p, _)) = self.rate_params() else {
                    return 0;
                };
                let now_s = v.now as i128 * r;
                let level = (tat.max(now_s) - now_s).max(0);
                ceil_div(level, p).min(i64::MAX as i128) as i64
            }
        }
    }

    /// Room now, raw, ≥ 0: the most a request may still take.
    pub fn room(&self, v: &View) -> i64 {
        match v.counter {
            Counter::Rate { tat } => {
                let Some((r, p, burst)) = self.rate_params() else {
                    return 0;
                };
                let now_s = v.now as i128 * r;
                let level = tat.max(now_s) - now_s;
                ((burst * p - level).max(0) / p).min(i64::MAX as i128) as i64
            }
            Counter::Window { .. } => (self.def.quota() - self.used(v)).max(0),
        }
    }

    /// Takes `amount` (raw, ≥ 0) at the view's instant.
    pub fn take(&mut self, v: &View, amount: i64) {
        self.counter = match v.counter {
            Counter::Window { start, used, prev } => Counter::Window {
                start,
                used: used.saturating_add(amount),
                prev,
            },
            Counter::Rate { tat } => {
                let Some((r, p, _)) = self.rate_params() else {
                    return;
                };
                let now_s = v.now as i128 * r;
                // Never past the last instant (+1): only a shadow limit,
                // which takes what it would refuse, gets there; the Lua
                // twin keeps the TAT below 2^53 ms this way.
                let cap = (crate::calendar::MAX_INSTANT_MS as i128 + 1) * r;
                Counter::Rate {
                    tat: (tat.max(now_s) + amount as i128 * p).min(cap),
                }
            }
        };
    }

    /// Gives back `amount` taken in the window starting at `window_start`,
    /// if that window is still the current one (never below zero). A rate
    /// gives back only when `rate_too` (a released reservation), never
    /// below now.
    pub fn give_back(&mut self, v: &View, amount: i64, window_start: i64, rate_too: bool) {
        match v.counter {
            Counter::Window { start, used, prev } => {
                if start == window_start {
                    self.counter = Counter::Window {
                        start,
                        used: used - amount.min(used).max(0),
                        prev,
                    };
                }
            }
            Counter::Rate { tat } => {
                let Some((r, p, _)) = self.rate_params() else {
                    return;
                };
                if rate_too {
                    let now_s = v.now as i128 * r;
                    let back = (tat - amount as i128 * p).max(now_s);
                    self.counter = Counter::Rate { tat: back.min(tat) };
                }
            }
        }
    }

    /// The earliest instant at which a request taking `amount` would fit
    /// (≥ now); `None` when it never can (more than the quota).
    pub fn frees_at(&self, v: &View, amount: i64) -> Option<i64> {
        if amount > self.def.quota() {
            return None;
        }
        if amount <= self.room(v) {
            return Some(v.now);
        }
        match (self.def.kind, v.counter) {
            (_, Counter::Rate { tat }) => {
                let (r, p, burst) = self.rate_params()?;
                // max(tat, t·r) + amount·p − t·r ≤ burst·p, with tat > t·r.
                let t = ceil_div(tat + (amount as i128 - burst) * p, r);
                Some((t as i64).max(v.now))
            }
            (
                LimitKind::Window {
                    window: WindowMode::Fixed,
                    ..
                },
                _,
            ) => Some(v.end),
            (
                LimitKind::Window {
                    interval,
                    interval_count,
                    ..
                },
                Counter::Window { used, prev, start },
            ) => {
                let r = (self.def.quota() - amount) as i128;
                // Within this window the previous one's weight decays:
                // ceil(prev·(end − t)/len) ≤ r − used.
                // The earliest t in [lo, end] of a window [.., end) of length
                // `len` with ceil(x·(end − t)/len) ≤ r, i.e.
                // end − t ≤ floor(r·len/x).
                let earliest = |x: i128, r: i128, lo: i64, end: i64, len: i64| -> Option<i64> {
                    if r < 0 {
                        return None;
                    }
                    if x == 0 {
                        return Some(lo);
                    }
                    let t = end as i128 - (r * len as i128) / x;
                    Some((t.clamp(lo as i128, end as i128)) as i64)
                };
                let len = v.end - start;
                if let Some(t) = earliest(prev as i128, r - used as i128, v.now, v.end, len) {
                    if t < v.end {
                        return Some(t);
                    }
                }
                // In the next window, this one's `used` is the weighted one.
                let (ns, ne) = window_at(interval, interval_count, v.anchor, v.end);
                earliest(used as i128, r, ns, ne, ne - ns)
            }
            _ => None,
        }
    }
}

/// The bound the sliding window's estimate keeps (tested against an exact
/// log in `tests/limits.rs`): with `prev` used in the previous window and
/// a fraction `f = (now − start) / length` of the current one elapsed, the
/// estimate differs from the exact count over the last `length` by at most
/// `prev × max(f, 1 − f)` plus one raw unit of rounding (the estimate rounds
/// up, toward denying). So it never exceeds `current + prev`, and never
/// falls below `current`.
pub fn sliding_error_bound(prev: i64, start: i64, end: i64, now: i64) -> i64 {
    let len = (end - start) as i128;
    let el = (now - start) as i128;
    let f = el.max(len - el);
    (ceil_div(prev as i128 * f, len) + 1) as i64
}

/// A limit as configured (`[[plans]] limits`) or sent
/// (`billing_controls.rate_limits`), before validation. Every field but
/// `feature_id` is optional here; `LimitSpec::build` (in [`crate::model`],
/// beside the catalog it checks against) says which the kind needs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    #[serde(default)]
    pub id: Option<String>,
    pub feature_id: String,
    /// `window` (default) or `rate`.
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub shadow: Option<bool>,
    #[serde(default)]
    pub limit: Option<Amount>,
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub interval_count: Option<u32>,
    #[serde(default)]
    pub anchor: Option<String>,
    #[serde(default)]
    pub window: Option<String>,
    #[serde(default)]
    pub rate: Option<Amount>,
    #[serde(default)]
    pub burst: Option<Amount>,
}

/// `premium_message:minute`, `premium_message:5minute`, `api_call:rate`.
pub fn derived_id(feature: &str, kind: &LimitKind) -> String {
    match kind {
        LimitKind::Window {
            interval,
            interval_count: 1,
            ..
        } => format!("{feature}:{interval}"),
        LimitKind::Window {
            interval,
            interval_count,
            ..
        } => format!("{feature}:{interval_count}{interval}"),
        LimitKind::Rate { .. } => format!("{feature}:rate"),
    }
}

/// The list a spec comes in, for naming fields in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitList {
    UsageLimits,
    RateLimits,
    Plan,
}

/// A change of a customer's limits: each list given replaces the
/// customer's list of that source; `None` leaves it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitsUpdate {
    pub usage_limits: Option<Vec<LimitDef>>,
    pub rate_limits: Option<Vec<LimitDef>>,
    /// A plan's limits (attach): replaces that plan's.
    pub plan: Option<(String, Vec<LimitDef>)>,
}

/// Applies an update to a customer's limits: unique ids, at most
/// [`MAX_LIMITS_PER_CUSTOMER`]; a limit redefined with the same id and the
/// same counting rule keeps its counter. All or nothing.
pub fn update_limits(
    current: &[ArmedLimit],
    u: &LimitsUpdate,
) -> Result<Vec<ArmedLimit>, EngineError> {
    let replaced = |s: &LimitSource| match s {
        LimitSource::UsageLimits => u.usage_limits.is_some(),
        LimitSource::RateLimits => u.rate_limits.is_some(),
        LimitSource::Plan(p) => u.plan.as_ref().is_some_and(|(q, _)| q == p),
    };
    let mut next: Vec<ArmedLimit> = current
        .iter()
        .filter(|l| !replaced(&l.def.source))
        .cloned()
        .collect();
    let incoming = [
        (u.usage_limits.as_ref(), "billing_controls.usage_limits.id"),
        (u.rate_limits.as_ref(), "billing_controls.rate_limits.id"),
        (u.plan.as_ref().map(|(_, l)| l), "plans.limits.id"),
    ];
    for (list, field) in incoming {
        for def in list.into_iter().flatten() {
            if next.iter().any(|l| l.def.id == def.id) {
                return Err(invalid(
                    field,
                    format!("{:?} is used by another limit of the customer", def.id),
                ));
            }
            let armed = match current
                .iter()
                .find(|l| l.def.id == def.id && l.def.same_shape(def))
            {
                Some(old) => ArmedLimit {
                    def: def.clone(),
                    counter: old.counter,
                },
                None => ArmedLimit::new(def.clone()),
            };
            next.push(armed);
        }
    }
    if next.len() > MAX_LIMITS_PER_CUSTOMER {
        return Err(invalid(
            "billing_controls",
            format!("a customer may hold at most {MAX_LIMITS_PER_CUSTOMER} limits"),
        ));
    }
    Ok(next)
}

/// A limit's state as answers and headers show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitStatus {
    pub id: String,
    pub feature_id: String,
    pub quota: Amount,
    pub remaining: Amount,
    /// The window's (or the rate period's) nominal length, ms.
    pub window_ms: i64,
    /// When the room is whole again: the window's end, or for a rate when
    /// the bucket is full.
    pub resets_at: Option<i64>,
    pub shadow: bool,
}

impl LimitStatus {
    /// room / quota, compared without division.
    pub fn tighter_than(&self, other: &LimitStatus) -> bool {
        (self.remaining.raw() as i128) * (other.quota.raw() as i128)
            < (other.remaining.raw() as i128) * (self.quota.raw() as i128)
    }
}

/// Why a request was denied by a limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitDenial {
    pub id: String,
    /// When the request would fit; `None` never (more than the quota).
    pub frees_at: Option<i64>,
}

/// What a pending reservation holds of one limit, to give back on release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitHold {
    pub id: String,
    /// The window it was taken in (a rate: the instant).
    pub window_start: i64,
    pub amount: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-process engine's memory per armed limit: this struct plus the
    /// id's and the feature id's bytes (docs/limits.md quotes it).
    #[test]
    fn an_armed_limit_is_small() {
        let size = std::mem::size_of::<ArmedLimit>();
        println!("size_of::<ArmedLimit>() = {size}");
        assert!(size <= 160, "{size}");
    }
}
