//! The rules that move balances, each in one place: deduction order, the two
//! deduction passes, refunds, lazy resets with rollover, lock release and
//! idempotency. Everything here is pure: a customer's state, the catalog and an
//! instant in, a new state and an answer out. The in-process engine runs these
//! functions directly; `lua/creditgate.lua` is their line-by-line twin, and the
//! differential test holds the two to identical answers.

use crate::calendar::{add_months, Period, MAX_INSTANT_MS};
use crate::error::{invalid, EngineError};
use crate::limits::{LimitDef, LimitDenial, LimitHold, LimitKind, LimitStatus, LimitsUpdate, View};
use crate::model::*;
use crate::money::{affordable_units, charge, cover, Amount, Cost, MAX_AMOUNT_RAW};

/// Boundaries older than this many periods before `now` can hold no live
/// rollover (a rollover lives at most 64 periods), so a lazy reset looks at
/// no more than this many, however long the customer was idle.
pub const ROLLOVER_WINDOW: i64 = 66;

/// A source that can pay: a bucket's own balance or one of its rollover rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    /// Index into the customer's buckets.
    pub bucket: usize,
    pub kind: SourceKind,
    pub cost: Cost,
}

/// The sources for one request, in deduction order.
#[derive(Debug, Default)]
pub struct Order {
    pub unlimited: Vec<Source>,
    pub rollovers: Vec<Source>,
    pub buckets: Vec<Source>,
}

/// The billing cycle `last_cycle` means for `feature` (`None`: any pool):
/// the period and anchor of the first periodic bucket in deduction order
/// (the feature's pools first); `None` when no bucket resets.
pub fn billing_cycle(
    catalog: &Catalog,
    buckets: &[Bucket],
    feature: Option<&str>,
) -> Option<(Period, i64)> {
    let pools = feature
        .and_then(|f| catalog.pools_for(f).ok())
        .unwrap_or_default();
    buckets
        .iter()
        .filter_map(|b| b.period().map(|p| (b, p)))
        .map(|(b, p)| {
            let pi = pools
                .iter()
                .position(|c| c.pool == b.pool)
                .unwrap_or(usize::MAX);
            (bucket_order_key(b, pi), p, b.anchor)
        })
        .min_by_key(|(k, _, _)| *k)
        .map(|(_, p, a)| (p, a))
}

/// Orders buckets within the pools: pool order first; within one pool,
/// buckets that reset before buckets that never reset, shorter period first,
/// sooner `expires_at` first (none last), older first.
pub fn bucket_order_key(b: &Bucket, pool_index: usize) -> (usize, u8, i64, i64, u64) {
    let period = b.period();
    (
        pool_index,
        u8::from(period.is_none()),
        period.map_or(0, |p| p.nominal_ms()),
        b.expires_at.unwrap_or(i64::MAX),
        b.seq,
    )
}

/// The deduction order for a request drawing on `pools` (from
/// [`Catalog::pools_for`]): unlimited buckets; then every live rollover of
/// those pools, soonest-expiring first (never last; ties in bucket order);
/// then the buckets in [`bucket_order_key`] order.
pub fn deduction_order(buckets: &[Bucket], pools: &[PoolCost]) -> Order {
    let mut members: Vec<(usize, usize)> = buckets
        .iter()
        .enumerate()
        .filter_map(|(i, b)| {
            pools
                .iter()
                .position(|p| p.pool == b.pool)
                .map(|pi| (i, pi))
        })
        .collect();
    members.sort_by_key(|&(i, pi)| bucket_order_key(&buckets[i], pi));
    let mut order = Order::default();
    let mut rollovers = Vec::new();
    for (rank, &(i, pi)) in members.iter().enumerate() {
        let b = &buckets[i];
        let cost = pools[pi].cost;
        if b.unlimited {
            order.unlimited.push(Source {
                bucket: i,
                kind: SourceKind::Bucket,
                cost,
            });
            continue;
        }
        order.buckets.push(Source {
            bucket: i,
            kind: SourceKind::Bucket,
            cost,
        });
        for (row_index, row) in b.rollovers.iter().enumerate() {
            let key = (row.expires_at.unwrap_or(i64::MAX), rank, row_index);
            let kind = SourceKind::Rollover {
                expires_at: row.expires_at,
            };
            rollovers.push((
                key,
                Source {
                    bucket: i,
                    kind,
                    cost,
                },
            ));
        }
    }
    rollovers.sort_by_key(|(key, _)| *key);
    order.rollovers = rollovers.into_iter().map(|(_, s)| s).collect();
    order
}

fn row_mut(b: &mut Bucket, expires_at: Option<i64>) -> Option<&mut RolloverRow> {
    b.rollovers.iter_mut().find(|r| r.expires_at == expires_at)
}

/// Adds to an entry list, merging entries for the same source.
fn record(entries: &mut Vec<Entry>, buckets: &[Bucket], src: Source, amount: i64, units: i64) {
    if amount == 0 && units == 0 {
        return;
    }
    let b = &buckets[src.bucket];
    if let Some(e) = entries
        .iter_mut()
        .find(|e| e.balance_id == b.id && e.source == src.kind)
    {
        e.amount = Amount::from_raw(e.amount.raw() + amount).unwrap_or(e.amount);
        e.units = Amount::from_raw(e.units.raw() + units).unwrap_or(e.units);
        return;
    }
    entries.push(Entry {
        balance_id: b.id.clone(),
        pool: b.pool.clone(),
        source: src.kind,
        amount: Amount::from_raw(amount).unwrap_or(Amount::MAX),
        units: Amount::from_raw(units).unwrap_or(Amount::MAX),
    });
}

/// Takes `units` (raw, ≥ 0) from `buckets` in `order`. Returns the entries and
/// the units nothing could pay for. Unlimited buckets absorb everything; then
/// pass one takes each source down to zero, pass two takes overage-allowed
/// buckets below zero down to their floor. Each source covers the most units
/// whose rounded-up charge it can afford, and pays exactly that charge.
pub fn deduct(
    buckets: &mut [Bucket],
    order: &Order,
    units: i64,
) -> Result<(Vec<Entry>, i64), EngineError> {
    let mut entries = Vec::new();
    if let Some(&src) = order.unlimited.first() {
        let paid = charge(units, src.cost);
        let b = &mut buckets[src.bucket];
        let next = b.remaining.raw() as i128 - paid;
        b.remaining = Amount::from_raw_i128(next).ok_or(EngineError::AmountOutOfRange)?;
        record(&mut entries, buckets, src, paid as i64, units);
        return Ok((entries, 0));
    }
    let mut need = units;
    for &src in order.rollovers.iter().chain(&order.buckets) {
        if need == 0 {
            break;
        }
        let b = &mut buckets[src.bucket];
        let available = match src.kind {
            SourceKind::Bucket => b.remaining.raw().max(0),
            SourceKind::Rollover { expires_at } => {
                row_mut(b, expires_at).map_or(0, |r| r.balance.raw())
            }
        };
        let (took, paid) = cover(need, available, src.cost);
        if took == 0 {
            continue;
        }
        match src.kind {
            SourceKind::Bucket => {
                b.remaining = Amount::from_raw(b.remaining.raw() - paid).unwrap_or(b.remaining)
            }
            SourceKind::Rollover { expires_at } => {
                if let Some(r) = row_mut(b, expires_at) {
                    r.balance = Amount::from_raw(r.balance.raw() - paid).unwrap_or(r.balance);
                }
            }
        }
        need -= took;
        record(&mut entries, buckets, src, paid, took);
    }
    for &src in &order.buckets {
        if need == 0 {
            break;
        }
        let b = &mut buckets[src.bucket];
        if !b.overage_allowed {
            continue;
        }
        let available = b.remaining.raw() - b.floor();
        let (took, paid) = cover(need, available, src.cost);
        if took == 0 {
            continue;
        }
        b.remaining = Amount::from_raw(b.remaining.raw() - paid).unwrap_or(b.remaining);
        need -= took;
        record(&mut entries, buckets, src, paid, took);
    }
    Ok((entries, need))
}

/// `overflow`: puts what is left below zero on the first non-unlimited bucket.
fn overflow(
    buckets: &mut [Bucket],
    order: &Order,
    entries: &mut Vec<Entry>,
    units: i64,
) -> Result<i64, EngineError> {
    let Some(&src) = order.buckets.first() else {
        return Ok(units);
    };
    let paid = charge(units, src.cost);
    let b = &mut buckets[src.bucket];
    let next = b.remaining.raw() as i128 - paid;
    b.remaining = Amount::from_raw_i128(next).ok_or(EngineError::AmountOutOfRange)?;
    record(entries, buckets, src, paid as i64, units);
    Ok(0)
}

/// Gives back `units` (raw, ≥ 0): unlimited buckets absorb everything (their
/// usage falls, never below zero); else first heals negative buckets up to
/// zero, then refills buckets up to their own grant, both in deduction order.
/// Rollovers are never refilled. Returns entries (negative) and the units that
/// fit nowhere.
pub fn refund(buckets: &mut [Bucket], order: &Order, units: i64) -> (Vec<Entry>, i64) {
    let mut entries = Vec::new();
    if let Some(&src) = order.unlimited.first() {
        let b = &mut buckets[src.bucket];
        let room = (b.granted.raw() - b.remaining.raw()).max(0) as i128;
        let back = charge(units, src.cost).min(room) as i64;
        b.remaining = Amount::from_raw(b.remaining.raw() + back).unwrap_or(b.remaining);
        record(&mut entries, buckets, src, -back, -units);
        return (entries, 0);
    }
    let mut need = units;
    for heal in [true, false] {
        for &src in &order.buckets {
            if need == 0 {
                break;
            }
            let b = &mut buckets[src.bucket];
            let r = b.remaining.raw();
            let room = if heal {
                -r
            } else if r >= 0 {
                b.granted.raw() - r
            } else {
                0
            };
            let (took, back) = cover(need, room, src.cost);
            if took == 0 {
                continue;
            }
            b.remaining = Amount::from_raw(r + back).unwrap_or(b.remaining);
            need -= took;
            record(&mut entries, buckets, src, -back, -took);
        }
    }
    (entries, need)
}

/// r(j): a bucket's `remaining` after `j` idle boundaries, from `r0`. Without
/// carried debt every reset restores the grant; with it, debt is paid off one
/// grant per period: r(j) = min(g, r0 + j·g).
fn remaining_after(r0: i64, g: i64, carry_debt: bool, j: i64) -> i128 {
    if j == 0 {
        r0 as i128
    } else if carry_debt && r0 < 0 {
        (g as i128).min(r0 as i128 + j as i128 * g as i128)
    } else {
        g as i128
    }
}

/// Σ_{j=0}^{k-1} max(0, r(j)): what `k` idle boundaries roll over, uncapped.
fn rolled_total(r0: i64, g: i64, carry_debt: bool, k: i64) -> i128 {
    let first = r0.max(0) as i128;
    if k <= 1 {
        return first;
    }
    if !(carry_debt && r0 < 0) {
        return first + (k - 1) as i128 * g as i128;
    }
    if g == 0 {
        return 0;
    }
    // r(j) > 0 from jp = floor(-r0 / g) + 1 on; r(jp) ≤ g, every later one is g.
    let jp = (-r0 as i128) / g as i128 + 1;
    if jp > (k - 1) as i128 {
        return 0;
    }
    remaining_after(r0, g, true, jp as i64) + ((k - 1) as i128 - jp) * g as i128
}

/// Keeps the newest rows up to `cap` (trimming the oldest first), merges rows
/// with one expiry, drops empty rows. `newest_first` is consumed.
fn fill(newest_first: Vec<RolloverRow>, cap: i64) -> Vec<RolloverRow> {
    let mut merged: Vec<RolloverRow> = Vec::new();
    for row in newest_first {
        match merged.last_mut() {
            Some(last) if last.expires_at == row.expires_at => {
                last.granted = Amount::from_raw(
                    last.granted
                        .raw()
                        .saturating_add(row.granted.raw())
                        .min(MAX_AMOUNT_RAW),
                )
                .unwrap_or(Amount::MAX);
                last.balance = Amount::from_raw(
                    last.balance
                        .raw()
                        .saturating_add(row.balance.raw())
                        .min(MAX_AMOUNT_RAW),
                )
                .unwrap_or(Amount::MAX);
            }
            _ => merged.push(row),
        }
    }
    let mut room = cap;
    let mut kept = Vec::new();
    for mut row in merged {
        let keep = row.balance.raw().min(room).max(0);
        let trimmed = row.balance.raw() - keep;
        room -= keep;
        if keep == 0 {
            continue;
        }
        row.balance = Amount::from_raw(keep).unwrap_or(Amount::ZERO);
        row.granted =
            Amount::from_raw((row.granted.raw() - trimmed).max(keep)).unwrap_or(row.balance);
        kept.push(row);
    }
    kept.reverse();
    kept
}

/// Applies every boundary of `b` at or before `now` at once. The result is
/// exactly what resetting at each boundary in turn (with no usage between)
/// would give, in bounded time: remaining follows [`remaining_after`]; the
/// rollover rows a boundary creates hold max(0, remaining) before it; only
/// the last [`ROLLOVER_WINDOW`] boundaries can still have live rows; and
/// oldest-first trimming to a cap after every boundary equals one newest-first
/// fill at the end. Returns whether the bucket reset.
pub fn reset_bucket(b: &mut Bucket, now: i64) -> bool {
    let (Some(period), Some(next)) = (b.period(), b.next_reset_at) else {
        return false;
    };
    if next > now {
        return false;
    }
    let first = period.last_index_at_or_before(b.anchor, next);
    let last = period.last_index_at_or_before(b.anchor, now);
    let k = last - first + 1;
    let (r0, g) = (b.remaining.raw(), b.granted.raw());
    let carry = b.carry_debt && !b.unlimited;
    if let Some(cfg) = b.rollover.clone() {
        let cap = cfg
            .cap(b.granted)
            .unwrap_or(MAX_AMOUNT_RAW)
            .min(MAX_AMOUNT_RAW);
        let mut rows: Vec<RolloverRow> = Vec::new();
        match cfg.lifetime_months() {
            Some(months) => {
                for j in (1.max(k - ROLLOVER_WINDOW + 1)..=k).rev() {
                    let boundary = period.boundary(b.anchor, first + j - 1);
                    let expires_at = add_months(boundary, months);
                    let amount = remaining_after(r0, g, carry, j - 1).max(0) as i64;
                    if expires_at > now && amount > 0 {
                        let amount = Amount::from_raw(amount).unwrap_or(Amount::MAX);
                        rows.push(RolloverRow {
                            expires_at: Some(expires_at),
                            granted: amount,
                            balance: amount,
                        });
                    }
                }
                rows.extend(
                    b.rollovers
                        .iter()
                        .rev()
                        .filter(|r| r.expires_at.is_none_or(|e| e > now))
                        .cloned(),
                );
            }
            None => {
                let added = rolled_total(r0, g, carry, k).min(MAX_AMOUNT_RAW as i128) as i64;
                let old = b.rollovers.iter().find(|r| r.expires_at.is_none());
                let (og, ob) = old.map_or((0, 0), |r| (r.granted.raw(), r.balance.raw()));
                let balance = ob.saturating_add(added).min(MAX_AMOUNT_RAW);
                let granted = og.saturating_add(added).min(MAX_AMOUNT_RAW);
                rows.push(RolloverRow {
                    expires_at: None,
                    granted: Amount::from_raw(granted).unwrap_or(Amount::MAX),
                    balance: Amount::from_raw(balance).unwrap_or(Amount::MAX),
                });
            }
        }
        b.rollovers = fill(rows, cap);
    }
    let r =
        remaining_after(r0, g, carry, k).clamp(-(MAX_AMOUNT_RAW as i128), MAX_AMOUNT_RAW as i128);
    b.remaining = Amount::from_raw_i128(r).unwrap_or(Amount::ZERO);
    b.next_reset_at = Some(period.boundary(b.anchor, last + 1).min(MAX_INSTANT_MS + 1));
    true
}

/// Returns a lock's held entries to their sources as of instant `at`: only to
/// a bucket that still exists, is live at `at`, has not reset since the hold
/// (same `next_reset_at`, not yet passed at `at`), never above its grant; a
/// rollover row only under the same conditions and never above its grant.
/// Returns the entries (negative) and the units that could not go back.
pub fn release_held(buckets: &mut [Bucket], lock: &Lock, at: i64) -> (Vec<Entry>, i64) {
    let mut entries = Vec::new();
    let mut lost = 0i64;
    for (held, marker) in &lock.held {
        let target = buckets.iter().position(|b| {
            b.id == held.balance_id
                && b.is_live(at)
                && b.next_reset_at == *marker
                && b.next_reset_at.is_none_or(|n| n > at)
        });
        let back = match (target, held.source) {
            (Some(i), SourceKind::Bucket) => {
                let b = &mut buckets[i];
                let back = held
                    .amount
                    .raw()
                    .min((b.granted.raw() - b.remaining.raw()).max(0));
                b.remaining = Amount::from_raw(b.remaining.raw() + back).unwrap_or(b.remaining);
                back
            }
            (Some(i), SourceKind::Rollover { expires_at }) => {
                match row_mut(&mut buckets[i], expires_at) {
                    Some(row) if expires_at.is_none_or(|e| e > at) => {
                        let back = held
                            .amount
                            .raw()
                            .min((row.granted.raw() - row.balance.raw()).max(0));
                        row.balance =
                            Amount::from_raw(row.balance.raw() + back).unwrap_or(row.balance);
                        back
                    }
                    _ => 0,
                }
            }
            (None, _) => 0,
        };
        let units = if back == held.amount.raw() {
            held.units.raw()
        } else {
            ((held.units.raw() as i128 * back as i128) / held.amount.raw().max(1) as i128) as i64
        };
        lost += held.units.raw() - units;
        if back > 0 || units > 0 {
            entries.push(Entry {
                amount: Amount::from_raw(-back).unwrap_or(Amount::ZERO),
                units: Amount::from_raw(-units).unwrap_or(Amount::ZERO),
                ..held.clone()
            });
        }
    }
    (entries, lost)
}

fn release_outcome(entries: Vec<Entry>, lost: i64) -> StoredOutcome {
    StoredOutcome {
        allowed: true,
        entries,
        uncovered: Amount::from_raw(lost).unwrap_or(Amount::ZERO),
        no_balance: false,
        insufficient: false,
        limit: None,
        shadow_denied: vec![],
    }
}

/// Applies everything due at `now`, in the order the events happened, so the
/// result never depends on when it runs: pending locks past their expiry are
/// released (each as of its own expiry); expired buckets are dropped; due
/// resets are applied; expired rollovers are dropped; finalized locks and
/// idempotency records past retention are forgotten. Returns the number of
/// buckets that reset.
pub fn prepare(state: &mut CustomerState, now: i64, retention: Retention) -> u32 {
    for (at, id) in expired_locks(state, now) {
        release_expired_lock(state, &id, at, now, retention);
    }
    expire(state, now);
    let resets = apply_resets(state, now);
    forget_finalized_locks(state, now);
    resets
}

/// The pending locks past their expiry at `now`, as `(expires_at, lock id)`
/// in the order they expired: the first step of [`prepare`].
pub fn expired_locks(state: &CustomerState, now: i64) -> Vec<(i64, String)> {
    let mut expired: Vec<(i64, String)> = state
        .locks
        .iter()
        .filter_map(|(id, l)| match (&l.state, l.expires_at) {
            (LockState::Pending, Some(e)) if e <= now => Some((e, id.clone())),
            _ => None,
        })
        .collect();
    expired.sort();
    expired
}

/// Releases one expired pending lock as of its own expiry `at` (its limit
/// holds as of `now`); the lock is kept as finalized until retention.
pub fn release_expired_lock(
    state: &mut CustomerState,
    id: &str,
    at: i64,
    now: i64,
    retention: Retention,
) {
    if let Some(lock) = state.locks.get(id).cloned() {
        let (entries, lost) = release_held(&mut state.buckets, &lock, at);
        release_expired_holds(state, &lock.limit_held, now);
        let forget_at = at.saturating_add(retention.finalized_lock_ms);
        let outcome = release_outcome(entries, lost);
        if let Some(l) = state.locks.get_mut(id) {
            l.state = LockState::Finalized { outcome, forget_at };
        }
    }
}

/// Drops expired buckets and expired rollover rows (the second step of
/// [`prepare`]). Dropping rows before the resets equals dropping them
/// after each reset: a reset keeps only rows live at `now` anyway.
pub fn expire(state: &mut CustomerState, now: i64) {
    state.buckets.retain(|b| b.is_live(now));
    for b in &mut state.buckets {
        b.rollovers.retain(|r| r.expires_at.is_none_or(|e| e > now));
    }
}

/// Applies every due reset (with its rollover); returns how many buckets
/// reset. Run after [`expire`].
pub fn apply_resets(state: &mut CustomerState, now: i64) -> u32 {
    let mut resets = 0;
    for b in &mut state.buckets {
        if reset_bucket(b, now) {
            resets += 1;
        }
        b.rollovers.retain(|r| r.expires_at.is_none_or(|e| e > now));
    }
    resets
}

/// Forgets finalized locks past their retention (no balance moves).
pub fn forget_finalized_locks(state: &mut CustomerState, now: i64) {
    state.locks.retain(
        |_, l| !matches!(l.state, LockState::Finalized { forget_at, .. } if forget_at <= now),
    );
}

/// An expired reservation's limit holds, given back as of `now` to windows
/// still current (the catalog is not needed: a window's anchor is found
/// from the stored window start).
fn release_expired_holds(state: &mut CustomerState, holds: &[LimitHold], now: i64) {
    for h in holds {
        if let Some(l) = state.limits.iter_mut().find(|l| l.def.id == h.id) {
            // The hold's window is current when `now` is before its end: use
            // the hold's own start as the anchor of that window.
            let v = l.view(h.window_start, now);
            l.give_back(&v, h.amount, h.window_start, true);
        }
    }
}

/// Frees idempotency records past their retention. Lookups already ignore
/// them, so this is memory hygiene only, run by the periodic task rather than
/// on every request (a busy customer may hold many records).
pub fn forget_expired_records(state: &mut CustomerState, now: i64) {
    state.idempotency.retain(|_, r| r.expires_at > now);
}

/// One pool's balance as shown to callers.
pub fn pool_balance(buckets: &[Bucket], pool: &str) -> PoolBalance {
    let mut members: Vec<&Bucket> = buckets.iter().filter(|b| b.pool == pool).collect();
    members.sort_by_key(|b| bucket_order_key(b, 0));
    let sum = |f: &dyn Fn(&Bucket) -> i128| -> Amount {
        let total: i128 = members.iter().map(|b| f(b)).sum();
        Amount::from_raw_i128(total.clamp(-(MAX_AMOUNT_RAW as i128), MAX_AMOUNT_RAW as i128))
            .unwrap_or(Amount::MAX)
    };
    let rows = |b: &Bucket, f: fn(&RolloverRow) -> i64| -> i128 {
        b.rollovers.iter().map(|r| f(r) as i128).sum()
    };
    let granted = sum(&|b| b.granted.raw() as i128 + rows(b, |r| r.granted.raw()));
    let remaining = sum(&|b| b.remaining.raw().max(0) as i128 + rows(b, |r| r.balance.raw()));
    let usage = sum(&|b| {
        (b.granted.raw() - b.remaining.raw()) as i128
            + rows(b, |r| r.granted.raw() - r.balance.raw())
    });
    let mut rollovers: Vec<RolloverRow> = members
        .iter()
        .flat_map(|b| b.rollovers.iter().cloned())
        .collect();
    rollovers.sort_by_key(|r| r.expires_at.unwrap_or(i64::MAX));
    PoolBalance {
        pool: pool.to_string(),
        owned: !members.is_empty(),
        granted,
        remaining,
        usage,
        unlimited: members.iter().any(|b| b.unlimited),
        overage_allowed: members.iter().any(|b| b.overage_allowed),
        next_reset_at: members.iter().filter_map(|b| b.next_reset_at).min(),
        buckets: members
            .iter()
            .map(|b| BucketView {
                balance_id: b.id.clone(),
                plan_id: b.plan_id.clone(),
                granted: b.granted,
                remaining: b.remaining,
                usage: b.usage(),
                unlimited: b.unlimited,
                overage_allowed: b.overage_allowed,
                interval: b.interval,
                interval_count: b.interval_count,
                anchor: b.anchor,
                next_reset_at: b.next_reset_at,
                expires_at: b.expires_at,
                carry_debt: b.carry_debt && !b.unlimited,
                rollovers: b.rollovers.clone(),
            })
            .collect(),
        rollovers,
    }
}

/// The answer of [`apply`]: what happened, and whether it came from a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub outcome: StoredOutcome,
    pub replayed: bool,
}

/// Runs one balance-moving request against a prepared state: idempotency
/// first (same key and same request → the remembered outcome, nothing
/// applied; same key, other request → `IdempotencyKeyReused`), then the
/// request itself, all or nothing. A refusal for lack of balance is
/// remembered; other errors are not.
pub fn apply(
    state: &mut CustomerState,
    catalog: &Catalog,
    op: &Op,
    idempotency_key: Option<&str>,
    now: i64,
    retention: Retention,
) -> Result<Applied, EngineError> {
    op.validate(now)?;
    let fingerprint = op.fingerprint();
    if let Some(key) = idempotency_key {
        validate_id("idempotency_key", key)?;
        // A record past its retention counts as absent (it is overwritten
        // below; `forget_expired_records` frees the rest).
        if let Some(rec) = state.idempotency.get(key).filter(|r| r.expires_at > now) {
            if rec.fingerprint != fingerprint {
                return Err(EngineError::IdempotencyKeyReused);
            }
            return Ok(Applied {
                outcome: rec.outcome.clone(),
                replayed: true,
            });
        }
    }
    let (outcome, replayed) = run(state, catalog, op, now, retention)?;
    if let (Some(key), false) = (idempotency_key, replayed) {
        let expires_at = now.saturating_add(retention.idempotency_ms);
        state.idempotency.insert(
            key.to_string(),
            IdempotencyRecord {
                fingerprint,
                outcome: outcome.clone(),
                expires_at,
            },
        );
    }
    Ok(Applied { outcome, replayed })
}

fn owned_pools(
    state: &CustomerState,
    catalog: &Catalog,
    feature: &str,
) -> Result<Vec<PoolCost>, EngineError> {
    let pools = catalog.pools_for(feature)?;
    Ok(pools
        .into_iter()
        .filter(|p| state.buckets.iter().any(|b| b.pool == p.pool))
        .collect())
}

fn outcome(allowed: bool, entries: Vec<Entry>, uncovered: i64) -> StoredOutcome {
    StoredOutcome {
        allowed,
        entries,
        uncovered: Amount::from_raw(uncovered).unwrap_or(Amount::MAX),
        no_balance: false,
        insufficient: false,
        limit: None,
        shadow_denied: vec![],
    }
}

fn no_balance(units: Amount, insufficient: bool) -> StoredOutcome {
    StoredOutcome {
        allowed: false,
        entries: vec![],
        uncovered: units.abs(),
        no_balance: true,
        insufficient,
        limit: None,
        shadow_denied: vec![],
    }
}

/// Dry-runs a consume: exactly what consume would answer at this instant.
/// The balance decides first (a request it refuses takes no limit room and
/// is `insufficient_balance`); then every enabled limit on the feature and
/// on each credit system that pays must have room for what the request
/// would take from it, or it is refused by the limit that frees last.
pub fn check(
    state: &CustomerState,
    catalog: &Catalog,
    feature: &str,
    units: Amount,
    now: i64,
) -> Result<StoredOutcome, EngineError> {
    check_with_takes(state, catalog, feature, units, now).map(|(out, _)| out)
}

fn check_with_takes(
    state: &CustomerState,
    catalog: &Catalog,
    feature: &str,
    units: Amount,
    now: i64,
) -> Result<(StoredOutcome, Vec<(usize, i64)>), EngineError> {
    validate_id("feature_id", feature)?;
    if units.is_negative() {
        return Err(invalid("required_balance", "must not be negative"));
    }
    let pools = owned_pools(state, catalog, feature)?;
    if pools.is_empty() {
        return Ok((no_balance(units, false), vec![]));
    }
    let mut work = state.buckets.clone();
    let order = deduction_order(&work, &pools);
    let (entries, rest) = deduct(&mut work, &order, units.raw())?;
    if rest > 0 {
        return Ok((outcome(false, vec![], rest), vec![]));
    }
    let judged = judge(state, catalog, feature, &entries, now)?;
    let mut out = match judged.blocked {
        Some(d) => {
            let mut out = outcome(false, vec![], units.raw());
            out.limit = Some(d);
            out
        }
        None => outcome(true, entries, 0),
    };
    out.shadow_denied = judged.shadow;
    let takes = if out.allowed { judged.takes } else { vec![] };
    Ok((out, takes))
}

// ---- limits (issue 13): see `crate::limits` and docs/limits.md ----

/// The anchor of the paying pool's first resetting bucket (deduction
/// order) for a limit: what `anchor = "billing_cycle"` windows follow.
pub fn billing_anchor(buckets: &[Bucket], catalog: &Catalog, def: &LimitDef) -> Option<i64> {
    let pools = catalog.pools_for(&def.feature_id).ok()?;
    buckets
        .iter()
        .filter(|b| b.period().is_some())
        .filter_map(|b| {
            pools
                .iter()
                .position(|p| p.pool == b.pool)
                .map(|pi| (bucket_order_key(b, pi), b.anchor))
        })
        .min()
        .map(|(_, a)| a)
}

/// The enabled limits a request on `feature` meets: those on the feature
/// itself (counting its units) and those on a credit system that can pay
/// for it (counting the credits charged to that pool).
pub fn applicable_limits(
    state: &CustomerState,
    catalog: &Catalog,
    feature: &str,
) -> Result<Vec<usize>, EngineError> {
    let pools = catalog.pools_for(feature)?;
    Ok(state
        .limits
        .iter()
        .enumerate()
        .filter(|(_, l)| {
            l.def.enabled
                && (l.def.feature_id == feature || pools.iter().any(|p| p.pool == l.def.feature_id))
        })
        .map(|(i, _)| i)
        .collect())
}

/// What entries take from one limit: units of the requested feature, or
/// credits charged to the limit's pool. Negative for refunds.
fn take_of(def: &LimitDef, feature: &str, entries: &[Entry]) -> i64 {
    if def.feature_id == feature {
        entries.iter().map(|e| e.units.raw()).sum()
    } else {
        entries
            .iter()
            .filter(|e| e.pool == def.feature_id)
            .map(|e| e.amount.raw())
            .sum()
    }
}

fn limit_view(state: &CustomerState, catalog: &Catalog, i: usize, now: i64) -> View {
    let l = &state.limits[i];
    let anchor = l.anchor_ms(billing_anchor(&state.buckets, catalog, &l.def));
    l.view(anchor, now)
}

struct Judged {
    /// The limit that refuses (the one that frees last), if any.
    blocked: Option<LimitDenial>,
    /// Shadow limits that would have refused.
    shadow: Vec<String>,
    /// (limit index, amount) to take if the request goes ahead.
    takes: Vec<(usize, i64)>,
}

fn judge(
    state: &CustomerState,
    catalog: &Catalog,
    feature: &str,
    entries: &[Entry],
    now: i64,
) -> Result<Judged, EngineError> {
    let mut judged = Judged {
        blocked: None,
        shadow: vec![],
        takes: vec![],
    };
    for i in applicable_limits(state, catalog, feature)? {
        let l = &state.limits[i];
        let amount = take_of(&l.def, feature, entries).max(0);
        let v = limit_view(state, catalog, i, now);
        if amount > l.room(&v) {
            if l.def.shadow {
                judged.shadow.push(l.def.id.clone());
            } else {
                let d = LimitDenial {
                    id: l.def.id.clone(),
                    frees_at: l.frees_at(&v, amount),
                };
                // The one that frees last (never: last of all) decides.
                let later = match (&judged.blocked, d.frees_at) {
                    (None, _) => true,
                    (Some(b), f) => match (b.frees_at, f) {
                        (None, _) => false,
                        (Some(_), None) => true,
                        (Some(a), Some(f)) => f > a,
                    },
                };
                if later {
                    judged.blocked = Some(d);
                }
            }
        }
        judged.takes.push((i, amount));
    }
    Ok(judged)
}

/// Whether no limit (shadow ones aside) would refuse these entries.
fn limits_fit(
    state: &CustomerState,
    catalog: &Catalog,
    feature: &str,
    entries: &[Entry],
    now: i64,
) -> Result<bool, EngineError> {
    Ok(judge(state, catalog, feature, entries, now)?
        .blocked
        .is_none())
}

/// Takes what a request took from its limits; answers the holds (what a
/// reservation gives back on release).
fn take_limits(
    state: &mut CustomerState,
    catalog: &Catalog,
    takes: &[(usize, i64)],
    now: i64,
) -> Vec<LimitHold> {
    let mut holds = vec![];
    for &(i, amount) in takes {
        let v = limit_view(state, catalog, i, now);
        let l = &mut state.limits[i];
        l.take(&v, amount);
        if amount > 0 {
            holds.push(LimitHold {
                id: l.def.id.clone(),
                window_start: v.start,
                amount,
            });
        }
    }
    holds
}

/// A refund gives room back to each window limit it was charged in, if
/// that window is still the current one; rates do not give back.
fn refund_limits(
    state: &mut CustomerState,
    catalog: &Catalog,
    feature: &str,
    entries: &[Entry],
    now: i64,
) -> Result<(), EngineError> {
    for i in applicable_limits(state, catalog, feature)? {
        let back = -take_of(&state.limits[i].def, feature, entries);
        if back > 0 {
            let v = limit_view(state, catalog, i, now);
            state.limits[i].give_back(&v, back, v.start, false);
        }
    }
    Ok(())
}

/// A released reservation gives back what it held of each limit: to a
/// window still current, and to a rate (never below now).
fn release_limits(state: &mut CustomerState, catalog: &Catalog, holds: &[LimitHold], now: i64) {
    for h in holds {
        if let Some(i) = state.limits.iter().position(|l| l.def.id == h.id) {
            let v = limit_view(state, catalog, i, now);
            state.limits[i].give_back(&v, h.amount, h.window_start, true);
        }
    }
}

/// The largest `u` in `[0, hi]` that `fits` (which must be monotone: a
/// deduction of more units never takes less from any limit).
fn largest_fitting(
    hi: i64,
    mut fits: impl FnMut(i64) -> Result<bool, EngineError>,
) -> Result<i64, EngineError> {
    if hi <= 0 || fits(hi)? {
        return Ok(hi.max(0));
    }
    let (mut lo, mut hi) = (0i64, hi);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// The enabled limits a request on `feature` meets, as answers and
/// headers show them.
pub fn limit_statuses(
    state: &CustomerState,
    catalog: &Catalog,
    feature: &str,
    now: i64,
) -> Vec<LimitStatus> {
    let Ok(list) = applicable_limits(state, catalog, feature) else {
        return vec![];
    };
    list.into_iter()
        .map(|i| {
            let l = &state.limits[i];
            let v = limit_view(state, catalog, i, now);
            let resets_at = match (l.def.kind, v.counter) {
                (LimitKind::Rate { .. }, _) => l.frees_at(&v, l.def.quota()),
                _ => Some(v.end),
            };
            LimitStatus {
                id: l.def.id.clone(),
                feature_id: l.def.feature_id.clone(),
                quota: Amount::from_raw(l.def.quota()).unwrap_or(Amount::MAX),
                remaining: Amount::from_raw(l.room(&v)).unwrap_or(Amount::MAX),
                window_ms: l.def.window_ms(),
                resets_at,
                shadow: l.def.shadow,
            }
        })
        .collect()
}

/// Replaces the customer's limits as `update` says (see
/// [`crate::limits::update_limits`]); nothing changes on error.
pub fn set_limits(state: &mut CustomerState, update: &LimitsUpdate) -> Result<(), EngineError> {
    state.limits = crate::limits::update_limits(&state.limits, update)?;
    Ok(())
}

fn run(
    state: &mut CustomerState,
    catalog: &Catalog,
    op: &Op,
    now: i64,
    retention: Retention,
) -> Result<(StoredOutcome, bool), EngineError> {
    match op {
        Op::Consume { feature, units } => {
            let (out, takes) = check_with_takes(state, catalog, feature, *units, now)?;
            if out.allowed {
                commit(state, catalog, feature, &out.entries)?;
                take_limits(state, catalog, &takes, now);
            }
            Ok((out, false))
        }
        Op::Reserve {
            lock_id,
            feature,
            units,
            expires_at,
        } => {
            if matches!(state.locks.get(lock_id), Some(l) if l.state == LockState::Pending) {
                return Err(EngineError::LockAlreadyExists(lock_id.clone()));
            }
            let (out, takes) = check_with_takes(state, catalog, feature, *units, now)?;
            if out.allowed {
                commit(state, catalog, feature, &out.entries)?;
                let limit_held = take_limits(state, catalog, &takes, now);
                let held = out
                    .entries
                    .iter()
                    .map(|e| {
                        let marker = state
                            .buckets
                            .iter()
                            .find(|b| b.id == e.balance_id)
                            .and_then(|b| b.next_reset_at);
                        (e.clone(), marker)
                    })
                    .collect();
                let lock = Lock {
                    feature: feature.clone(),
                    units: *units,
                    expires_at: *expires_at,
                    held,
                    state: LockState::Pending,
                    limit_held,
                };
                state.locks.insert(lock_id.clone(), lock);
            }
            Ok((out, false))
        }
        Op::Track {
            feature,
            units,
            behavior,
        } => Ok((
            track(state, catalog, feature, *units, *behavior, now)?,
            false,
        )),
        Op::Finalize {
            lock_id,
            action,
            override_units,
        } => {
            let lock = state
                .locks
                .get(lock_id)
                .cloned()
                .ok_or_else(|| EngineError::LockNotFound(lock_id.clone()))?;
            if let LockState::Finalized { outcome, .. } = lock.state {
                return Ok((outcome, true));
            }
            let out = match (action, override_units) {
                (FinalizeAction::Release, _) => {
                    let (entries, lost) = release_held(&mut state.buckets, &lock, now);
                    release_limits(state, catalog, &lock.limit_held, now);
                    release_outcome(entries, lost)
                }
                (FinalizeAction::Confirm, None) => outcome(true, vec![], 0),
                (FinalizeAction::Confirm, Some(v)) => {
                    let diff = v.raw() - lock.units.raw();
                    let diff = Amount::from_raw(diff).ok_or(EngineError::AmountOutOfRange)?;
                    let pools = owned_pools(state, catalog, &lock.feature)?;
                    if pools.is_empty() {
                        outcome(diff.is_zero(), vec![], diff.raw().abs())
                    } else {
                        track(
                            state,
                            catalog,
                            &lock.feature,
                            diff,
                            OverageBehavior::Cap,
                            now,
                        )?
                    }
                }
            };
            let forget_at = now.saturating_add(retention.finalized_lock_ms);
            if let Some(l) = state.locks.get_mut(lock_id) {
                l.state = LockState::Finalized {
                    outcome: out.clone(),
                    forget_at,
                };
            }
            Ok((out, false))
        }
    }
}

/// Applies entries that [`check`] computed on a copy (consume and reserve).
fn commit(
    state: &mut CustomerState,
    catalog: &Catalog,
    feature: &str,
    entries: &[Entry],
) -> Result<(), EngineError> {
    let pools = owned_pools(state, catalog, feature)?;
    let order = deduction_order(&state.buckets, &pools);
    let units: i64 = entries.iter().map(|e| e.units.raw()).sum();
    let (_, rest) = deduct(&mut state.buckets, &order, units)?;
    debug_assert_eq!(rest, 0);
    Ok(())
}

/// Track. Limits are hard caps in every mode: `reject` refuses (the
/// balance first, then the limits); `cap` takes the most both the balance
/// and every limit allow; `overflow` may overdraw the balance, never a
/// limit (what no limit allows is dropped, as `cap` drops it).
fn track(
    state: &mut CustomerState,
    catalog: &Catalog,
    feature: &str,
    units: Amount,
    behavior: OverageBehavior,
    now: i64,
) -> Result<StoredOutcome, EngineError> {
    let pools = owned_pools(state, catalog, feature)?;
    if pools.is_empty() {
        return Ok(no_balance(
            units,
            behavior == OverageBehavior::Reject && units.raw() > 0,
        ));
    }
    let mut work = state.buckets.clone();
    let order = deduction_order(&work, &pools);
    if units.raw() < 0 {
        let (entries, rest) = refund(&mut work, &order, -units.raw());
        state.buckets = work;
        refund_limits(state, catalog, feature, &entries, now)?;
        return Ok(outcome(rest == 0, entries, rest));
    }
    // What `u` units would take, on a fresh copy of the buckets.
    let attempt = |u: i64| -> Result<(Vec<Bucket>, Vec<Entry>, i64), EngineError> {
        let mut w = state.buckets.clone();
        let (mut entries, rest) = deduct(&mut w, &order, u)?;
        let rest = match behavior {
            OverageBehavior::Overflow if rest > 0 => overflow(&mut w, &order, &mut entries, rest)?,
            _ => rest,
        };
        Ok((w, entries, rest))
    };
    let (_, first, rest) = attempt(units.raw())?;
    if behavior == OverageBehavior::Reject && rest > 0 {
        let mut out = outcome(false, vec![], rest);
        out.insufficient = true;
        return Ok(out);
    }
    let judged = judge(state, catalog, feature, &first, now)?;
    let take = match (&judged.blocked, behavior) {
        (None, _) => units.raw(),
        (Some(d), OverageBehavior::Reject) => {
            let mut out = outcome(false, vec![], units.raw());
            out.limit = Some(d.clone());
            out.shadow_denied = judged.shadow;
            return Ok(out);
        }
        // The most the balance pays (cap) or all of it (overflow), then the
        // most every limit allows.
        (Some(_), _) => largest_fitting(units.raw() - rest, |u| {
            let (_, entries, _) = attempt(u)?;
            limits_fit(state, catalog, feature, &entries, now)
        })?,
    };
    let (work, entries, rest) = attempt(take)?;
    let judged = judge(state, catalog, feature, &entries, now)?;
    let dropped = units.raw() - take + rest;
    let mut out = outcome(dropped == 0, entries, dropped);
    out.shadow_denied = judged.shadow;
    state.buckets = work;
    take_limits(state, catalog, &judged.takes, now);
    Ok(out)
}

/// Adds a bucket. Validation per [`validate_grant`]; an existing balance id is
/// `BalanceAlreadyExists`; at most [`MAX_BUCKETS_PER_CUSTOMER`]. Generated ids
/// are `b<seq>`, skipping any the caller already took.
pub fn grant(
    state: &mut CustomerState,
    catalog: &Catalog,
    g: &Grant,
    now: i64,
) -> Result<String, EngineError> {
    let period = validate_grant(g, catalog, now)?;
    if let Some(id) = &g.balance_id {
        if state.buckets.iter().any(|b| &b.id == id) {
            return Err(EngineError::BalanceAlreadyExists(id.clone()));
        }
    }
    if state.buckets.len() >= MAX_BUCKETS_PER_CUSTOMER {
        return Err(EngineError::TooManyBuckets(MAX_BUCKETS_PER_CUSTOMER));
    }
    let seq = state.next_seq;
    let id = match &g.balance_id {
        Some(id) => id.clone(),
        None => {
            let mut n = seq;
            while state.buckets.iter().any(|b| b.id == format!("b{n}")) {
                n += 1;
            }
            format!("b{n}")
        }
    };
    let (anchor, next_reset_at) = match (period, g.next_reset_at) {
        (None, _) => (0, None),
        (Some(_), Some(first)) => (first, Some(first)),
        (Some(p), None) => (now, Some(p.boundary(now, 1))),
    };
    state.buckets.push(Bucket {
        id: id.clone(),
        seq,
        pool: g.pool.clone(),
        plan_id: g.plan_id.clone(),
        granted: g.granted,
        remaining: g.granted,
        interval: g.interval.unwrap_or(crate::calendar::Interval::OneOff),
        interval_count: g.interval_count.unwrap_or(1),
        anchor,
        next_reset_at,
        expires_at: g.expires_at,
        rollover: g.rollover.clone(),
        unlimited: g.unlimited,
        overage_allowed: g.overage_allowed,
        overage_floor: g.overage_floor,
        carry_debt: g.carry_debt,
        rollovers: vec![],
    });
    state.next_seq = seq + 1;
    Ok(id)
}

/// Sets a bucket's remaining, or adds to it. Without a balance id, the pool's
/// first bucket in deduction order.
pub fn update_bucket(
    state: &mut CustomerState,
    catalog: &Catalog,
    u: &BucketUpdate,
) -> Result<(), EngineError> {
    validate_id("feature_id", &u.pool)?;
    catalog
        .feature(&u.pool)
        .ok_or_else(|| EngineError::FeatureNotFound(u.pool.clone()))?;
    let mut members: Vec<usize> = (0..state.buckets.len())
        .filter(|&i| state.buckets[i].pool == u.pool)
        .collect();
    members.sort_by_key(|&i| bucket_order_key(&state.buckets[i], 0));
    let target = match &u.balance_id {
        Some(id) => members.into_iter().find(|&i| &state.buckets[i].id == id),
        None => members.first().copied(),
    }
    .ok_or(EngineError::BalanceNotFound)?;
    let b = &mut state.buckets[target];
    let next = match u.change {
        BalanceChange::SetRemaining(v) => v.raw() as i128,
        BalanceChange::AddToBalance(v) => b.remaining.raw() as i128 + v.raw() as i128,
    };
    b.remaining = Amount::from_raw_i128(next).ok_or(EngineError::AmountOutOfRange)?;
    Ok(())
}

/// The owned pools among those that pay for a feature (`costs`, from
/// [`Catalog::pools_for`]), each with its cost: what the balance shown in an
/// answer and [`retry_after_ms`] both look at.
pub fn owned_pool_views<'c, 'p>(
    costs: &'c [PoolCost],
    pools: &'p [PoolBalance],
) -> Vec<(&'c PoolCost, &'p PoolBalance)> {
    costs
        .iter()
        .filter_map(|c| {
            pools
                .iter()
                .find(|p| p.pool == c.pool && p.owned)
                .map(|p| (c, p))
        })
        .collect()
}

/// How many future resets [`retry_after_ms`] looks at: the first this many
/// boundaries after now, over all the paying buckets together. A request
/// that no reset among them would let through gets no `Retry-After`.
pub const RETRY_AFTER_HORIZON: usize = 64;

/// The boundaries of `b` that have passed by `t`, counted from its next
/// reset (0 before it).
fn boundaries_by(b: &BucketView, period: Period, t: i64) -> i64 {
    match b.next_reset_at {
        Some(next) if next <= t => {
            period.last_index_at_or_before(b.anchor, t)
                - period.last_index_at_or_before(b.anchor, next)
                + 1
        }
        _ => 0,
    }
}

/// Milliseconds until the earliest reset after which the pools that pay for
/// the feature would cover `units`, or `None` when none of the next
/// [`RETRY_AFTER_HORIZON`] resets would.
///
/// At each candidate instant (a paying bucket's reset boundary, in order)
/// the pools are projected with the reset rule itself: a bucket past `j` of
/// its boundaries holds [`remaining_after`] `j` (its grant, or with
/// `carry_debt` its debt paid off one grant per period), buckets and
/// rollovers expired by then are gone, the rest keep what they hold now;
/// each source covers as many units as it affords at its pool's cost, as
/// consume charges them. Rollovers a reset would create and overage below
/// zero are not counted, so the answer is never early.
pub fn retry_after_ms(
    costs: &[PoolCost],
    pools: &[PoolBalance],
    units: Amount,
    now: i64,
) -> Option<i64> {
    let owned = owned_pool_views(costs, pools);
    let live_at = |expires: Option<i64>, t: i64| expires.is_none_or(|e| e > t);
    let mut times: Vec<i64> = Vec::new();
    for b in owned.iter().flat_map(|(_, p)| p.buckets.iter()) {
        let (Some(period), Some(next)) =
            (Period::new(b.interval, b.interval_count), b.next_reset_at)
        else {
            continue;
        };
        let first = period.last_index_at_or_before(b.anchor, next);
        for k in 0..RETRY_AFTER_HORIZON as i64 {
            let t = period.boundary(b.anchor, first + k);
            if t > MAX_INSTANT_MS || !live_at(b.expires_at, t) {
                break;
            }
            if t > now {
                times.push(t);
            }
        }
    }
    times.sort_unstable();
    times.dedup();
    times.truncate(RETRY_AFTER_HORIZON);
    for t in times {
        let mut need = units.raw() as i128;
        for (c, p) in &owned {
            for b in p.buckets.iter().filter(|b| live_at(b.expires_at, t)) {
                if b.unlimited {
                    return Some(t - now);
                }
                let passed = Period::new(b.interval, b.interval_count)
                    .map_or(0, |period| boundaries_by(b, period, t));
                let held =
                    remaining_after(b.remaining.raw(), b.granted.raw(), b.carry_debt, passed)
                        .clamp(-(MAX_AMOUNT_RAW as i128), MAX_AMOUNT_RAW as i128);
                need -= affordable_units(held as i64, c.cost);
                for r in b.rollovers.iter().filter(|r| live_at(r.expires_at, t)) {
                    need -= affordable_units(r.balance.raw(), c.cost);
                }
            }
        }
        if need <= 0 {
            return Some(t - now);
        }
    }
    None
}
