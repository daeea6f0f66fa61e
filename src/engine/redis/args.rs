//! Requests into function arguments. Every function's ARGV is built by
//! name: the constants below are the positions its comment block in
//! `lua/creditgate.lua` lists (`-- ARGV[n] name: …` above `function
//! FNS.<op>`), and `tests/lua_twin.rs` parses those blocks and holds them to
//! these constants.

use crate::calendar::Interval;
use crate::model::{
    BalanceChange, BucketUpdate, Catalog, FinalizeAction, Grant, Op, Retention, RolloverDuration,
};

/// The header every function on a customer starts with.
pub mod header {
    /// `''`: the function reads Redis `TIME` (production).
    pub const NOW: usize = 1;
    /// `''` (24 h for both), `<ms>` (both), or `<idempotency ms>,<finalized lock ms>`.
    pub const RETENTION: usize = 2;
    /// The first position after the header.
    pub const NEXT: usize = 3;
}

pub mod grant {
    pub const POOL: usize = 3;
    pub const BALANCE_ID: usize = 4;
    pub const PLAN_ID: usize = 5;
    pub const GRANTED: usize = 6;
    pub const INTERVAL: usize = 7;
    pub const INTERVAL_COUNT: usize = 8;
    pub const NEXT_RESET_AT: usize = 9;
    pub const EXPIRES_AT: usize = 10;
    pub const FLAGS: usize = 11;
    pub const OVERAGE_FLOOR: usize = 12;
    pub const ROLLOVER: usize = 13;
    pub const ROLLOVER_MAX: usize = 14;
    pub const ROLLOVER_MAX_PERCENTAGE: usize = 15;
    pub const ROLLOVER_LENGTH: usize = 16;
}

pub mod update_bucket {
    pub const POOL: usize = 3;
    pub const BALANCE_ID: usize = 4;
    pub const MODE: usize = 5;
    pub const AMOUNT: usize = 6;
}

pub mod check {
    pub const FEATURE_ID: usize = 3;
    pub const UNITS: usize = 4;
    /// (pool, cost) pairs from here to the end.
    pub const POOLS: usize = 5;
}

pub mod consume {
    pub const IDEMPOTENCY_KEY: usize = 3;
    pub const FEATURE_ID: usize = 4;
    pub const UNITS: usize = 5;
    pub const POOLS: usize = 6;
}

pub mod track {
    pub const IDEMPOTENCY_KEY: usize = 3;
    pub const FEATURE_ID: usize = 4;
    pub const UNITS: usize = 5;
    pub const BEHAVIOR: usize = 6;
    pub const POOLS: usize = 7;
}

pub mod reserve {
    pub const IDEMPOTENCY_KEY: usize = 3;
    pub const FEATURE_ID: usize = 4;
    pub const UNITS: usize = 5;
    pub const LOCK_ID: usize = 6;
    pub const EXPIRES_AT: usize = 7;
    pub const POOLS: usize = 8;
}

pub mod finalize {
    pub const IDEMPOTENCY_KEY: usize = 3;
    pub const LOCK_ID: usize = 4;
    pub const ACTION: usize = 5;
    pub const OVERRIDE_UNITS: usize = 6;
}

pub mod delete_balance {
    /// `''` any pool.
    pub const POOL: usize = 3;
    /// `''` any balance id.
    pub const BALANCE_ID: usize = 4;
    /// An interval code (`calendar::Interval as u8`), `''` any.
    pub const INTERVAL: usize = 5;
    /// `1`: even when used this period.
    pub const FORCE: usize = 6;
}

pub mod set_limits {
    /// The stored limits the update was computed from (`''` none).
    pub const EXPECTED: usize = 3;
    /// The new stored limits (`''` none).
    pub const LIMITS: usize = 4;
}

/// The retention argument: `''` for the default (24 h both), else as
/// [`header::RETENTION`] says; with the ledger on, its third part is the
/// per-stream cap (lua/README.md § 12).
pub fn retention_with_ledger(r: Retention, ledger_cap: Option<u64>) -> String {
    match ledger_cap {
        None => retention(r),
        Some(cap) => format!("{},{},{cap}", r.idempotency_ms, r.finalized_lock_ms),
    }
}

/// The retention argument without the ledger.
pub fn retention(r: Retention) -> String {
    const DEFAULT: i64 = 86_400_000;
    if r.idempotency_ms == DEFAULT && r.finalized_lock_ms == DEFAULT {
        String::new()
    } else if r.idempotency_ms == r.finalized_lock_ms {
        r.idempotency_ms.to_string()
    } else {
        format!("{},{}", r.idempotency_ms, r.finalized_lock_ms)
    }
}

/// ARGV under construction: values set at named positions (1-based, as Lua
/// counts), then pools appended after the last one.
pub struct Argv(Vec<String>);

impl Argv {
    /// A function on a customer: the header filled, `len` positions in all
    /// before any pools.
    pub fn customer(len: usize, now: String, retention: &str) -> Argv {
        let mut a = Argv(vec![String::new(); len.max(header::RETENTION)]);
        a.set(header::NOW, now);
        a.set(header::RETENTION, retention);
        a
    }

    pub fn set(&mut self, position: usize, value: impl Into<String>) {
        self.0[position - 1] = value.into();
    }

    /// Appends the pools that may pay for `feature`: (pool, cost raw) pairs
    /// in deduction order; none for an unknown feature (the function raises
    /// `feature_not_found` where the rules do).
    pub fn pools(&mut self, catalog: &Catalog, feature: &str) {
        if let Ok(pools) = catalog.pools_for(feature) {
            for p in pools {
                self.0.push(p.pool);
                self.0.push(p.cost.raw().to_string());
            }
        }
    }

    pub fn into_vec(self) -> Vec<String> {
        self.0
    }
}

fn opt_num(n: Option<i64>) -> String {
    n.map_or(String::new(), |n| n.to_string())
}

/// `grant`'s arguments.
pub fn grant(mut a: Argv, g: &Grant) -> Argv {
    use grant::*;
    let flags = format!(
        "{}{}{}",
        if g.unlimited { "u" } else { "" },
        if g.overage_allowed { "o" } else { "" },
        if g.carry_debt { "d" } else { "" }
    );
    a.set(POOL, g.pool.clone());
    a.set(BALANCE_ID, g.balance_id.clone().unwrap_or_default());
    a.set(PLAN_ID, g.plan_id.clone().unwrap_or_default());
    a.set(GRANTED, g.granted.raw().to_string());
    a.set(
        INTERVAL,
        g.interval.unwrap_or(Interval::OneOff).code().to_string(),
    );
    a.set(INTERVAL_COUNT, g.interval_count.unwrap_or(1).to_string());
    a.set(NEXT_RESET_AT, opt_num(g.next_reset_at));
    a.set(EXPIRES_AT, opt_num(g.expires_at));
    a.set(FLAGS, flags);
    a.set(OVERAGE_FLOOR, opt_num(g.overage_floor.map(|f| f.raw())));
    if let Some(r) = &g.rollover {
        a.set(
            ROLLOVER,
            match r.duration {
                RolloverDuration::Month => "month",
                RolloverDuration::Forever => "forever",
            },
        );
        a.set(ROLLOVER_MAX, opt_num(r.max.map(|m| m.raw())));
        a.set(
            ROLLOVER_MAX_PERCENTAGE,
            opt_num(r.max_percentage.map(|m| m.raw())),
        );
        a.set(ROLLOVER_LENGTH, opt_num(r.length.map(i64::from)));
    }
    a
}

/// `update_bucket`'s arguments.
pub fn update_bucket(mut a: Argv, u: &BucketUpdate) -> Argv {
    use update_bucket::*;
    let (mode, v) = match u.change {
        BalanceChange::SetRemaining(v) => ("set", v),
        BalanceChange::AddToBalance(v) => ("add", v),
    };
    a.set(POOL, u.pool.clone());
    a.set(BALANCE_ID, u.balance_id.clone().unwrap_or_default());
    a.set(MODE, mode);
    a.set(AMOUNT, v.raw().to_string());
    a
}

/// Which function runs a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpFunction {
    Consume,
    Track,
    Reserve,
    Finalize,
}

/// The function and arguments of one request, after `header`.
pub fn apply(
    now: String,
    retention: &str,
    op: &Op,
    key: Option<&str>,
    catalog: &Catalog,
) -> (OpFunction, Argv) {
    let key = key.unwrap_or("").to_string();
    match op {
        Op::Consume { feature, units } => {
            let mut a = Argv::customer(consume::UNITS, now, retention);
            a.set(consume::IDEMPOTENCY_KEY, key);
            a.set(consume::FEATURE_ID, feature.clone());
            a.set(consume::UNITS, units.raw().to_string());
            a.pools(catalog, feature);
            (OpFunction::Consume, a)
        }
        Op::Track {
            feature,
            units,
            behavior,
        } => {
            let mut a = Argv::customer(track::BEHAVIOR, now, retention);
            a.set(track::IDEMPOTENCY_KEY, key);
            a.set(track::FEATURE_ID, feature.clone());
            a.set(track::UNITS, units.raw().to_string());
            a.set(track::BEHAVIOR, behavior.as_str());
            a.pools(catalog, feature);
            (OpFunction::Track, a)
        }
        Op::Reserve {
            lock_id,
            feature,
            units,
            expires_at,
        } => {
            let mut a = Argv::customer(reserve::EXPIRES_AT, now, retention);
            a.set(reserve::IDEMPOTENCY_KEY, key);
            a.set(reserve::FEATURE_ID, feature.clone());
            a.set(reserve::UNITS, units.raw().to_string());
            a.set(reserve::LOCK_ID, lock_id.clone());
            a.set(reserve::EXPIRES_AT, opt_num(*expires_at));
            a.pools(catalog, feature);
            (OpFunction::Reserve, a)
        }
        Op::Finalize {
            lock_id,
            action,
            override_units,
        } => {
            let mut a = Argv::customer(finalize::OVERRIDE_UNITS, now, retention);
            a.set(finalize::IDEMPOTENCY_KEY, key);
            a.set(finalize::LOCK_ID, lock_id.clone());
            a.set(
                finalize::ACTION,
                match action {
                    FinalizeAction::Confirm => "confirm",
                    FinalizeAction::Release => "release",
                },
            );
            a.set(
                finalize::OVERRIDE_UNITS,
                opt_num(override_units.map(|u| u.raw())),
            );
            (OpFunction::Finalize, a)
        }
    }
}
