//! The usage ledger (issue 14). This module is core (no I/O): what one
//! entry says, the usage queries' requests, answers and aggregation. Its
//! edges are the submodules [`codec`] (an entry as the stream holds it),
//! [`store`] (SQLite / PostgreSQL through sqlx) and [`drain`] (stream →
//! database). The in-process engine
//! keeps entries in memory beside its balances; on Redis they are appended to
//! a stream inside the same function call that changes a balance, and a
//! drain writes them to a database (`ledger::store`).
//!
//! Replaying a customer's entries from empty gives every balance's current
//! remaining (the sum of its `changes`) and every limit counter (the sum of
//! a window's `limits` amounts within its window; a rate's last `tat`).

pub mod codec;
pub mod drain;
pub mod store;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::calendar::{add_months, civil_from_ms, days_from_civil, Period};
use crate::error::{invalid, EngineError};
use crate::limits::Counter;
use crate::model::CustomerState;
use crate::money::{Amount, MAX_AMOUNT_RAW};

/// What made a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LedgerOp {
    /// `check` with `send_event`, or consume: units of a feature used.
    Consume,
    /// `track` with positive units.
    Track,
    /// `track` with negative units: given back.
    Refund,
    /// A reservation took its units (held, not yet final).
    Reserve,
    /// A reservation confirmed, released, or finalized with other units.
    Finalize,
    /// A lock released because it expired.
    LockExpired,
    /// A bucket granted (its whole balance is the change).
    Grant,
    /// A balance set or added to by an admin.
    Update,
    /// A bucket reset on its interval, with its rollover.
    Reset,
    /// A bucket or a rollover row expired.
    Expire,
    /// A balance deleted (its remaining leaves the books).
    DeleteBalance,
    /// A customer deleted (every balance leaves the books; its ledger stays).
    DeleteCustomer,
    /// A usage alert crossed its threshold (no balance moves).
    Alert,
    /// A pool reached zero, or a limit first denied in its window.
    LimitReached,
}

impl LedgerOp {
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerOp::Consume => "consume",
            LedgerOp::Track => "track",
            LedgerOp::Refund => "refund",
            LedgerOp::Reserve => "reserve",
            LedgerOp::Finalize => "finalize",
            LedgerOp::LockExpired => "lock_expired",
            LedgerOp::Grant => "grant",
            LedgerOp::Update => "update",
            LedgerOp::Reset => "reset",
            LedgerOp::Expire => "expire",
            LedgerOp::DeleteBalance => "delete_balance",
            LedgerOp::DeleteCustomer => "delete_customer",
            LedgerOp::Alert => "alert",
            LedgerOp::LimitReached => "limit_reached",
        }
    }

    pub fn parse(s: &str) -> Option<LedgerOp> {
        use LedgerOp::*;
        [
            Consume,
            Track,
            Refund,
            Reserve,
            Finalize,
            LockExpired,
            Grant,
            Update,
            Reset,
            Expire,
            DeleteBalance,
            DeleteCustomer,
            Alert,
            LimitReached,
        ]
        .into_iter()
        .find(|op| op.as_str() == s)
    }

    /// Whether the entry is usage of its feature (what `events.list` and
    /// `events.aggregate` count): consume, track, refund (negative), and a
    /// finalize's final units.
    pub fn is_usage(self) -> bool {
        matches!(
            self,
            LedgerOp::Consume | LedgerOp::Track | LedgerOp::Refund | LedgerOp::Finalize
        )
    }
}

/// One balance's change: `amount` is added to its remaining (negative:
/// spent), in the pool's units, raw fixed point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceDelta {
    pub balance_id: String,
    pub pool: String,
    /// The plan the balance came from, if any (`group_by: "$plan_id"`).
    pub plan_id: Option<String>,
    pub amount: Amount,
}

/// One limit counter's change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitDelta {
    pub limit_id: String,
    /// A window's start (the window the amount counts in); `None` for a rate.
    pub window_start: Option<i64>,
    /// Added to the window's used (negative: given back).
    pub amount: Amount,
    /// A rate's theoretical arrival time after the change (its counter).
    pub tat: Option<i128>,
}

/// One ledger entry. Entries of one customer are ordered by `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Unique and ordered: on Redis the stream entry id (`<ms>-<seq>`), in
    /// process a sequence number formatted the same way.
    pub id: String,
    /// The instant (ms) the change was decided at.
    pub at: i64,
    pub customer_id: String,
    /// The requested feature (`None` for grants, resets, deletes).
    pub feature_id: Option<String>,
    pub op: LedgerOp,
    /// Units of the feature: for usage ops ([`LedgerOp::is_usage`]) the
    /// units used (a refund negative, a finalize its final units: the held
    /// units less what went back); for a reserve the units held; else zero.
    pub units: Amount,
    pub balances: Vec<BalanceDelta>,
    pub limits: Vec<LimitDelta>,
    pub idempotency_key: Option<String>,
    /// A lock's id (reserve, finalize, lock_expired).
    pub lock_id: Option<String>,
    /// Alerts and limit_reached: the alert's name or the limit's id.
    pub subject: Option<String>,
}

/// An entry that is a notification (`alert`, `limit_reached`), with its
/// webhook event's type and data, handed to the delivery as it is appended
/// (the event's id is the entry's id, so a receiver deduplicates by it).
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub entry_id: String,
    pub at: i64,
    /// `balances.usage_alert_triggered` or `balances.limit_reached`.
    pub kind: &'static str,
    pub data: serde_json::Value,
}

// ---- ids ----

/// An entry id: `<ms>-<seq>`, as a Redis stream entry id.
pub fn format_id(ms: i64, seq: u64) -> String {
    format!("{ms}-{seq}")
}

/// `(ms, seq)` of an id from [`format_id`]; `None` when it is not one.
pub fn parse_id(id: &str) -> Option<(i64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    if ms.is_empty() || !ms.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// Strictly increasing ids, as a Redis stream gives them: the ms part is
/// never below the last one's (a clock set back keeps the last ms), the
/// sequence counts within one ms from 0.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdSequence {
    last: Option<(i64, u64)>,
}

impl IdSequence {
    pub fn next(&mut self, now: i64) -> String {
        let next = match self.last {
            Some((ms, seq)) if now <= ms => (ms, seq + 1),
            _ => (now.max(0), 0),
        };
        self.last = Some(next);
        format_id(next.0, next.1)
    }
}

// ---- the deltas, computed from a customer's state before and after ----

/// What the ledger compares before and after a change: each balance's total
/// (remaining plus its rollover rows' balances, raw) and each limit's counter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// balance id → (pool, plan id, total raw), in bucket order.
    pub balances: Vec<(String, String, Option<String>, i128)>,
    /// limit id → counter.
    pub limits: Vec<(String, Counter)>,
}

impl Snapshot {
    pub fn of(state: &CustomerState) -> Snapshot {
        Snapshot {
            balances: state
                .buckets
                .iter()
                .map(|b| {
                    let rows: i128 = b.rollovers.iter().map(|r| r.balance.raw() as i128).sum();
                    (
                        b.id.clone(),
                        b.pool.clone(),
                        b.plan_id.clone(),
                        b.remaining.raw() as i128 + rows,
                    )
                })
                .collect(),
            limits: state
                .limits
                .iter()
                .map(|l| (l.def.id.clone(), l.counter))
                .collect(),
        }
    }

    /// The deltas from `self` (before) to `after`: every balance whose total
    /// moved (a balance gone: minus its total; a new one: its total), every
    /// limit counter that moved. Balances named in `first` come first in
    /// that order (a request's deduction order), the rest in bucket order.
    pub fn diff(&self, after: &Snapshot, first: &[&str]) -> (Vec<BalanceDelta>, Vec<LimitDelta>) {
        let mut balances: Vec<BalanceDelta> = vec![];
        let delta = |id: &str, pool: &str, plan: &Option<String>, d: i128| BalanceDelta {
            balance_id: id.to_string(),
            pool: pool.to_string(),
            plan_id: plan.clone(),
            amount: clamp(d),
        };
        for (id, pool, plan, total) in &after.balances {
            let was = self.balances.iter().find(|b| &b.0 == id).map_or(0, |b| b.3);
            if total - was != 0 {
                balances.push(delta(id, pool, plan, total - was));
            }
        }
        for (id, pool, plan, total) in &self.balances {
            if *total != 0 && !after.balances.iter().any(|b| &b.0 == id) {
                balances.push(delta(id, pool, plan, -total));
            }
        }
        balances.sort_by_key(|d| {
            first
                .iter()
                .position(|f| *f == d.balance_id)
                .unwrap_or(usize::MAX)
        });
        let mut limits = vec![];
        for (id, counter) in &after.limits {
            let was = self.limits.iter().find(|l| &l.0 == id).map(|l| l.1);
            match (*counter, was) {
                (Counter::Window { start, used, .. }, was) => {
                    let before = match was {
                        Some(Counter::Window {
                            start: s0, used, ..
                        }) if s0 == start => used,
                        _ => 0,
                    };
                    // A window rolled over with nothing used in the new one
                    // needs no entry: replay reads a counter not in the
                    // books' window as zero.
                    if used != before {
                        limits.push(LimitDelta {
                            limit_id: id.clone(),
                            window_start: Some(start),
                            amount: clamp(used as i128 - before as i128),
                            tat: None,
                        });
                    }
                }
                (Counter::Rate { tat }, was) => {
                    if was != Some(*counter) && !(was.is_none() && tat == 0) {
                        limits.push(LimitDelta {
                            limit_id: id.clone(),
                            window_start: None,
                            amount: Amount::ZERO,
                            tat: Some(tat),
                        });
                    }
                }
            }
        }
        for (id, counter) in &self.limits {
            if after.limits.iter().any(|l| &l.0 == id) {
                continue;
            }
            match *counter {
                Counter::Window { start, used, .. } if used != 0 => limits.push(LimitDelta {
                    limit_id: id.clone(),
                    window_start: Some(start),
                    amount: clamp(-(used as i128)),
                    tat: None,
                }),
                Counter::Rate { tat } if tat != 0 => limits.push(LimitDelta {
                    limit_id: id.clone(),
                    window_start: None,
                    amount: Amount::ZERO,
                    tat: Some(0),
                }),
                _ => {}
            }
        }
        (balances, limits)
    }
}

fn clamp(raw: i128) -> Amount {
    Amount::from_raw_i128(raw.clamp(-(MAX_AMOUNT_RAW as i128), MAX_AMOUNT_RAW as i128))
        .unwrap_or(Amount::ZERO)
}

// ---- replay ----

/// A limit counter rebuilt from the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LimitBook {
    /// The window the last delta counted in (windows).
    pub window_start: Option<i64>,
    /// Used in that window (raw).
    pub used: i128,
    /// The last theoretical arrival time (rates).
    pub tat: Option<i128>,
}

/// What a customer's ledger replayed from empty says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Books {
    /// balance id → its total (remaining plus rollover balances), raw.
    pub balances: BTreeMap<String, i128>,
    pub limits: BTreeMap<String, LimitBook>,
}

/// Replays entries in id order: every balance's total is the sum of its
/// deltas; a window limit's delta for another window than the one its
/// counter is in starts that window from zero; a rate's counter is its last
/// `tat`. A live window counter `(start, used)` then equals the books when
/// `window_start == start`, else its `used` is zero (a window rolled over
/// with nothing used yet).
pub fn replay<'a>(entries: impl IntoIterator<Item = &'a LedgerEntry>) -> Books {
    let mut books = Books::default();
    for e in entries {
        for d in &e.balances {
            *books.balances.entry(d.balance_id.clone()).or_default() += d.amount.raw() as i128;
        }
        for d in &e.limits {
            let book = books.limits.entry(d.limit_id.clone()).or_default();
            if let Some(t) = d.tat {
                book.tat = Some(t);
            }
            if let Some(start) = d.window_start {
                if book.window_start != Some(start) {
                    book.window_start = Some(start);
                    book.used = 0;
                }
                book.used += d.amount.raw() as i128;
            }
        }
    }
    books
}

// ---- the usage queries: pure, over any slice or iterator of entries ----

/// The most entries one `events.list` page holds (Autumn's ceiling).
pub const MAX_PAGE: usize = 5000;
/// The most bins one aggregate answers.
pub const MAX_BINS: usize = 10_000;

/// `events.list`: one customer's usage entries, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventsListQuery {
    /// `None`: every customer's.
    pub customer_id: Option<String>,
    /// Empty: every feature.
    pub feature_ids: Vec<String>,
    /// `[start, end)` in ms; either side open when `None`.
    pub start: Option<i64>,
    pub end: Option<i64>,
    /// The `next_cursor` of the previous page; `None` for the first.
    pub cursor: Option<String>,
    /// 1 to [`MAX_PAGE`].
    pub limit: usize,
}

impl EventsListQuery {
    /// The cursor as an id (`None`: the first page), after checking it and
    /// the limit: what every store refuses before reading.
    pub fn checked_cursor(&self) -> Result<Option<(i64, u64)>, EngineError> {
        let cursor = match self.cursor.as_deref().filter(|c| !c.is_empty()) {
            Some(c) => Some(parse_id(c).ok_or_else(|| {
                invalid(
                    "start_cursor",
                    "is not a cursor this server gave (`<ms>-<seq>`)",
                )
            })?),
            None => None,
        };
        if self.limit == 0 || self.limit > MAX_PAGE {
            return Err(invalid("limit", format!("must be 1 to {MAX_PAGE}")));
        }
        Ok(cursor)
    }
}

/// One page of `events.list`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventsPage {
    pub entries: Vec<LedgerEntry>,
    /// The id of the page's last entry when more follow, else `None`.
    pub next_cursor: Option<String>,
}

fn id_key(e: &LedgerEntry) -> (i64, u64) {
    parse_id(&e.id).unwrap_or((e.at, 0))
}

fn mine(e: &LedgerEntry, customer: &Option<String>) -> bool {
    customer.as_ref().is_none_or(|c| &e.customer_id == c)
}

/// Whether an entry counts as usage of one of `features` (empty: any).
fn counts(e: &LedgerEntry, features: &[String]) -> bool {
    e.op.is_usage()
        && e.feature_id
            .as_ref()
            .is_some_and(|f| features.is_empty() || features.contains(f))
}

/// The page `q` asks for, from every entry of the customer (any order).
/// Only usage entries ([`LedgerOp::is_usage`]) are events.
pub fn list_events<'a>(
    entries: impl IntoIterator<Item = &'a LedgerEntry>,
    q: &EventsListQuery,
) -> Result<EventsPage, EngineError> {
    let cursor = q.checked_cursor()?;
    let mut hits: Vec<&LedgerEntry> = entries
        .into_iter()
        .filter(|e| mine(e, &q.customer_id) && counts(e, &q.feature_ids))
        .filter(|e| q.start.is_none_or(|s| e.at >= s) && q.end.is_none_or(|x| e.at < x))
        .filter(|e| cursor.is_none_or(|c| id_key(e) < c))
        .collect();
    hits.sort_by_key(|e| std::cmp::Reverse(id_key(e)));
    let more = hits.len() > q.limit;
    hits.truncate(q.limit);
    Ok(EventsPage {
        next_cursor: if more {
            hits.last().map(|e| e.id.clone())
        } else {
            None
        },
        entries: hits.into_iter().cloned().collect(),
    })
}

/// A bin's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinSize {
    Hour,
    Day,
    /// Weeks start on Monday 00:00 UTC.
    Week,
    /// Calendar months, UTC.
    Month,
}

impl BinSize {
    pub fn parse(s: &str) -> Option<BinSize> {
        match s {
            "hour" => Some(BinSize::Hour),
            "day" => Some(BinSize::Day),
            "week" => Some(BinSize::Week),
            "month" => Some(BinSize::Month),
            _ => None,
        }
    }

    /// The start of the bin holding `t`.
    pub fn start_of(self, t: i64) -> i64 {
        const HOUR: i64 = 3_600_000;
        const DAY: i64 = 86_400_000;
        // Monday 1970-01-05.
        const MONDAY: i64 = 4 * DAY;
        match self {
            BinSize::Hour => t.div_euclid(HOUR) * HOUR,
            BinSize::Day => t.div_euclid(DAY) * DAY,
            BinSize::Week => MONDAY + (t - MONDAY).div_euclid(7 * DAY) * 7 * DAY,
            BinSize::Month => {
                let (y, m, _, _) = civil_from_ms(t);
                days_from_civil(y, m, 1) * DAY
            }
        }
    }

    /// The grain a database sums usage by before it is folded into bins
    /// ([`aggregate_sums`]): UTC hours for hour bins, UTC days for the rest
    /// (days, Monday weeks and months are unions of UTC days).
    pub fn grain_ms(self) -> i64 {
        match self {
            BinSize::Hour => 3_600_000,
            _ => 86_400_000,
        }
    }

    /// The start of the bin after the one starting at `start`.
    pub fn next(self, start: i64) -> i64 {
        match self {
            BinSize::Hour => start + 3_600_000,
            BinSize::Day => start + 86_400_000,
            BinSize::Week => start + 7 * 86_400_000,
            BinSize::Month => add_months(start, 1),
        }
    }
}

/// The range an aggregate covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    /// The last this many ms up to now (`24h`, `7d`, `30d`, `90d`).
    Last(i64),
    /// The previous billing cycle of the customer's resetting bucket; without
    /// one, the previous calendar month (UTC).
    LastCycle,
    /// `[start, end)` in ms.
    Custom { start: i64, end: i64 },
}

impl RangeSpec {
    pub fn parse(s: &str) -> Option<RangeSpec> {
        const DAY: i64 = 86_400_000;
        match s {
            "24h" => Some(RangeSpec::Last(DAY)),
            "7d" => Some(RangeSpec::Last(7 * DAY)),
            "30d" => Some(RangeSpec::Last(30 * DAY)),
            "90d" => Some(RangeSpec::Last(90 * DAY)),
            "last_cycle" => Some(RangeSpec::LastCycle),
            _ => None,
        }
    }

    /// `[start, end)` at `now`. `cycle` is the customer's resetting
    /// bucket's period and anchor, for `last_cycle`.
    pub fn resolve(self, now: i64, cycle: Option<(Period, i64)>) -> (i64, i64) {
        match self {
            RangeSpec::Last(ms) => (now.saturating_sub(ms), now),
            RangeSpec::Custom { start, end } => (start, end),
            RangeSpec::LastCycle => match cycle {
                Some((p, anchor)) => {
                    let i = p.last_index_at_or_before(anchor, now);
                    (p.boundary(anchor, i - 1), p.boundary(anchor, i))
                }
                None => {
                    let this = BinSize::Month.start_of(now);
                    (add_months(this, -1), this)
                }
            },
        }
    }
}

/// What an aggregate groups each bin's values by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Feature,
    /// The plan of the first balance the entry drew from (deduction order);
    /// an entry drawing on no plan's balance groups under `"none"`.
    Plan,
    Customer,
}

impl GroupBy {
    pub fn parse(s: &str) -> Option<GroupBy> {
        match s {
            "$feature_id" => Some(GroupBy::Feature),
            "$plan_id" => Some(GroupBy::Plan),
            "$customer_id" => Some(GroupBy::Customer),
            _ => None,
        }
    }

    fn key(self, e: &LedgerEntry) -> String {
        match self {
            GroupBy::Feature => e.feature_id.clone().unwrap_or_default(),
            GroupBy::Customer => e.customer_id.clone(),
            GroupBy::Plan => e
                .balances
                .iter()
                .find_map(|d| d.plan_id.clone())
                .unwrap_or_else(|| "none".to_string()),
        }
    }
}

/// What each bin reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Measure {
    /// The sum of units (default).
    #[default]
    Sum,
    /// The number of entries.
    Count,
}

/// `events.aggregate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregateQuery {
    /// `None`: every customer's.
    pub customer_id: Option<String>,
    /// At least one.
    pub feature_ids: Vec<String>,
    pub range: RangeSpec,
    pub bin_size: BinSize,
    pub group_by: Option<GroupBy>,
    /// With `group_by`: the most groups per bin and feature; the rest are
    /// summed under `"Other"` (Autumn's default: 9).
    pub max_groups: usize,
    pub measure: Measure,
}

/// One bin of an aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregateBin {
    /// The bin's start (ms).
    pub period: i64,
    /// feature id → sum of units (or count), every requested feature.
    pub values: BTreeMap<String, Amount>,
    /// With `group_by`: feature id → group → value.
    pub grouped: Option<BTreeMap<String, BTreeMap<String, Amount>>>,
}

/// A feature's total over the whole range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AggregateTotal {
    pub count: u64,
    pub sum: Amount,
}

/// The answer of an aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate {
    /// The range covered, `[start, end)`.
    pub start: i64,
    pub end: i64,
    /// Every bin from the one holding `start` to the one holding `end - 1`,
    /// empty ones included, oldest first.
    pub bins: Vec<AggregateBin>,
    /// Every requested feature.
    pub totals: BTreeMap<String, AggregateTotal>,
}

/// The `max` largest groups (by value, then name), the rest summed under
/// `"Other"`.
fn top_groups(g: BTreeMap<String, i128>, max: usize) -> BTreeMap<String, Amount> {
    let mut v: Vec<(String, i128)> = g.into_iter().collect();
    if v.len() <= max {
        return v.into_iter().map(|(k, x)| (k, clamp(x))).collect();
    }
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let rest: i128 = v[max..].iter().map(|(_, x)| x).sum();
    v.truncate(max);
    let mut out: BTreeMap<String, Amount> = v.into_iter().map(|(k, x)| (k, clamp(x))).collect();
    *out.entry("Other".to_string()).or_insert(Amount::ZERO) =
        clamp(out.get("Other").map_or(0, |a| a.raw() as i128) + rest);
    out
}

/// The usage of one feature in one grain ([`BinSize::grain_ms`]) as a
/// database sums it: `at` lies in the grain and in the range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSum {
    pub feature_id: String,
    pub at: i64,
    /// The sum of the entries' units, raw.
    pub sum: i128,
    pub count: u64,
}

/// Aggregates the customer's usage entries in `[start, end)` (from
/// [`RangeSpec::resolve`]): per bin and feature the sum of units (refunds
/// negative), exact.
pub fn aggregate<'a>(
    entries: impl IntoIterator<Item = &'a LedgerEntry>,
    q: &AggregateQuery,
    range: (i64, i64),
) -> Result<Aggregate, EngineError> {
    let items = entries.into_iter().filter_map(|e| {
        if !mine(e, &q.customer_id) || !counts(e, &q.feature_ids) {
            return None;
        }
        let f = e.feature_id.as_deref()?;
        Some((
            f,
            e.at,
            e.units.raw() as i128,
            1,
            q.group_by.map(|g| g.key(e)),
        ))
    });
    fold(items, q, range)
}

/// [`aggregate`] from per-grain sums (a database's `GROUP BY`, when
/// nothing is grouped): the same answer as from the entries themselves.
pub fn aggregate_sums<'a>(
    sums: impl IntoIterator<Item = &'a UsageSum>,
    q: &AggregateQuery,
    range: (i64, i64),
) -> Result<Aggregate, EngineError> {
    if q.group_by.is_some() {
        return Err(EngineError::Internal(crate::error::Cause::msg(
            "aggregate_sums cannot group: aggregate the entries",
        )));
    }
    let items = sums
        .into_iter()
        .filter(|s| q.feature_ids.is_empty() || q.feature_ids.contains(&s.feature_id))
        .map(|s| (s.feature_id.as_str(), s.at, s.sum, s.count, None));
    fold(items, q, range)
}

/// Bins `(feature, at, sum of units, entries, group)` items.
fn fold<'a>(
    items: impl Iterator<Item = (&'a str, i64, i128, u64, Option<String>)>,
    q: &AggregateQuery,
    (start, end): (i64, i64),
) -> Result<Aggregate, EngineError> {
    if q.feature_ids.is_empty() {
        return Err(invalid("feature_id", "name at least one feature"));
    }
    if end <= start {
        return Err(invalid("custom_range", "end must be after start"));
    }
    let mut periods = vec![];
    let mut p = q.bin_size.start_of(start);
    while p < end {
        if periods.len() == MAX_BINS {
            return Err(invalid(
                "bin_size",
                format!("the range holds more than {MAX_BINS} bins; use larger bins"),
            ));
        }
        periods.push(p);
        p = q.bin_size.next(p);
    }
    let zero: BTreeMap<String, i128> = q.feature_ids.iter().map(|f| (f.clone(), 0)).collect();
    let mut sums: Vec<BTreeMap<String, i128>> = vec![zero.clone(); periods.len()];
    let mut groups: Vec<BTreeMap<String, BTreeMap<String, i128>>> =
        vec![BTreeMap::new(); periods.len()];
    let mut totals: BTreeMap<String, (u64, i128)> =
        q.feature_ids.iter().map(|f| (f.clone(), (0, 0))).collect();
    for (f, at, units, count, group) in items {
        if at < start || at >= end {
            continue;
        }
        let i = periods.partition_point(|&p| p <= at).saturating_sub(1);
        let v = match q.measure {
            Measure::Sum => units,
            Measure::Count => count as i128 * crate::money::AMOUNT_SCALE as i128,
        };
        *sums[i].entry(f.to_string()).or_default() += v;
        if let Some(g) = group {
            *groups[i]
                .entry(f.to_string())
                .or_default()
                .entry(g)
                .or_default() += v;
        }
        let t = totals.entry(f.to_string()).or_default();
        t.0 += count;
        t.1 += units;
    }
    let bins = periods
        .iter()
        .zip(sums)
        .zip(groups)
        .map(|((&period, values), grouped)| AggregateBin {
            period,
            values: values.into_iter().map(|(k, v)| (k, clamp(v))).collect(),
            grouped: q.group_by.map(|_| {
                grouped
                    .into_iter()
                    .map(|(f, g)| (f, top_groups(g, q.max_groups)))
                    .collect()
            }),
        })
        .collect();
    Ok(Aggregate {
        start,
        end,
        bins,
        totals: totals
            .into_iter()
            .map(|(f, (count, sum))| {
                (
                    f,
                    AggregateTotal {
                        count,
                        sum: clamp(sum),
                    },
                )
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calendar::ms_of;

    #[test]
    fn ids_strictly_increase_even_when_the_clock_goes_back() {
        let mut s = IdSequence::default();
        let ids: Vec<_> = [5, 5, 3, 9].iter().map(|&t| s.next(t)).collect();
        assert_eq!(ids, ["5-0", "5-1", "5-2", "9-0"]);
        assert_eq!(parse_id("9-0"), Some((9, 0)));
        assert_eq!(parse_id("9"), None);
        assert_eq!(parse_id("-1-0"), None);
    }

    #[test]
    fn bins_are_utc_hours_days_mondays_and_months() {
        let t = ms_of(2027, 3, 17, 13, 45); // a Wednesday
        assert_eq!(BinSize::Hour.start_of(t), ms_of(2027, 3, 17, 13, 0));
        assert_eq!(BinSize::Day.start_of(t), ms_of(2027, 3, 17, 0, 0));
        assert_eq!(BinSize::Week.start_of(t), ms_of(2027, 3, 15, 0, 0));
        assert_eq!(BinSize::Month.start_of(t), ms_of(2027, 3, 1, 0, 0));
        assert_eq!(
            BinSize::Month.next(ms_of(2027, 1, 1, 0, 0)),
            ms_of(2027, 2, 1, 0, 0)
        );
        // last_cycle without a resetting bucket: the previous UTC month.
        assert_eq!(
            RangeSpec::LastCycle.resolve(t, None),
            (ms_of(2027, 2, 1, 0, 0), ms_of(2027, 3, 1, 0, 0))
        );
    }

    #[test]
    fn groups_past_the_cap_are_summed_under_other() {
        let g: BTreeMap<String, i128> = [("a", 5), ("b", 9), ("c", 1), ("d", 2)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let top = top_groups(g, 2);
        let raw: Vec<(&str, i64)> = top.iter().map(|(k, v)| (k.as_str(), v.raw())).collect();
        assert_eq!(raw, [("Other", 3), ("a", 5), ("b", 9)]);
    }
}
