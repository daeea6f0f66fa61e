//! Requests into script arguments. Every script's ARGV is built by name: the
//! constants below are the positions its header in `lua/<script>.lua` lists
//! (`-- ARGV[n] name: …`), and `tests/lua_twin.rs` parses those headers and
//! holds them to these constants.

use crate::calendar::Interval;
use crate::model::{
    BalanceChange, BucketUpdate, Catalog, FinalizeAction, Grant, Op, Retention, RolloverDuration,
};

/// The header every script on a customer starts with.
pub mod header {
    pub const NOW: usize = 1;
    pub const IDEMPOTENCY_RETENTION_MS: usize = 2;
    pub const LOCK_RETENTION_MS: usize = 3;
    pub const CUSTOMER_ID: usize = 4;
    /// The first position after the header.
    pub const NEXT: usize = 5;
}

/// `lua/grant.lua`.
pub mod grant {
    pub const POOL: usize = 5;
    pub const BALANCE_ID: usize = 6;
    pub const PLAN_ID: usize = 7;
    pub const GRANTED: usize = 8;
    pub const INTERVAL: usize = 9;
    pub const INTERVAL_COUNT: usize = 10;
    pub const NEXT_RESET_AT: usize = 11;
    pub const EXPIRES_AT: usize = 12;
    pub const FLAGS: usize = 13;
    pub const OVERAGE_FLOOR: usize = 14;
    pub const ROLLOVER: usize = 15;
    pub const ROLLOVER_MAX: usize = 16;
    pub const ROLLOVER_MAX_PERCENTAGE: usize = 17;
    pub const ROLLOVER_LENGTH: usize = 18;
}

/// `lua/update_bucket.lua`.
pub mod update_bucket {
    pub const POOL: usize = 5;
    pub const BALANCE_ID: usize = 6;
    pub const MODE: usize = 7;
    pub const AMOUNT: usize = 8;
}

/// `lua/check.lua`.
pub mod check {
    pub const FEATURE_ID: usize = 5;
    pub const UNITS: usize = 6;
    /// Followed by that many (pool, cost) pairs.
    pub const POOL_COUNT: usize = 7;
}

/// `lua/apply.lua`.
pub mod apply {
    pub const OP: usize = 5;
    pub const IDEMPOTENCY_KEY: usize = 6;
    pub const FEATURE_ID: usize = 7;
    pub const UNITS: usize = 8;
    pub const MODE: usize = 9;
    pub const LOCK_ID: usize = 10;
    pub const EXPIRES_AT: usize = 11;
    /// Followed by that many (pool, cost) pairs.
    pub const POOL_COUNT: usize = 12;
}

/// ARGV under construction: values set at named positions (1-based, as Lua
/// counts), then a tail appended after the last one.
pub struct Argv(Vec<String>);

impl Argv {
    /// A script on a customer: the header filled, `len` positions in all
    /// before any tail.
    pub fn customer(len: usize, now: String, retention: Retention, customer_id: &str) -> Argv {
        let mut a = Argv(vec![String::new(); len]);
        a.set(header::NOW, now);
        a.set(
            header::IDEMPOTENCY_RETENTION_MS,
            retention.idempotency_ms.to_string(),
        );
        a.set(
            header::LOCK_RETENTION_MS,
            retention.finalized_lock_ms.to_string(),
        );
        a.set(header::CUSTOMER_ID, customer_id.to_string());
        a
    }

    pub fn set(&mut self, position: usize, value: impl Into<String>) {
        self.0[position - 1] = value.into();
    }

    /// Appends the pools that may pay for `feature` after `count_at`:
    /// their number, then (pool, cost raw) pairs in deduction order; -1 for
    /// an unknown feature (the script raises `feature_not_found` where the
    /// rules do).
    pub fn pools(&mut self, count_at: usize, catalog: &Catalog, feature: &str) {
        match catalog.pools_for(feature) {
            Ok(pools) => {
                self.set(count_at, pools.len().to_string());
                for p in pools {
                    self.0.push(p.pool);
                    self.0.push(p.cost.raw().to_string());
                }
            }
            Err(_) => self.set(count_at, "-1"),
        }
    }

    pub fn into_vec(self) -> Vec<String> {
        self.0
    }
}

fn opt_num(n: Option<i64>) -> String {
    n.map_or(String::new(), |n| n.to_string())
}

/// `lua/grant.lua`'s arguments.
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

/// `lua/update_bucket.lua`'s arguments.
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

/// `lua/apply.lua`'s arguments for one request.
pub fn apply(mut a: Argv, op: &Op, key: Option<&str>, catalog: &Catalog) -> Argv {
    use apply::*;
    a.set(IDEMPOTENCY_KEY, key.unwrap_or(""));
    match op {
        Op::Consume { feature, units } => {
            a.set(OP, "consume");
            a.set(FEATURE_ID, feature.clone());
            a.set(UNITS, units.raw().to_string());
        }
        Op::Track {
            feature,
            units,
            behavior,
        } => {
            a.set(OP, "track");
            a.set(FEATURE_ID, feature.clone());
            a.set(UNITS, units.raw().to_string());
            a.set(MODE, behavior.as_str());
        }
        Op::Reserve {
            lock_id,
            feature,
            units,
            expires_at,
        } => {
            a.set(OP, "reserve");
            a.set(FEATURE_ID, feature.clone());
            a.set(UNITS, units.raw().to_string());
            a.set(LOCK_ID, lock_id.clone());
            a.set(EXPIRES_AT, opt_num(*expires_at));
        }
        Op::Finalize {
            lock_id,
            action,
            override_units,
        } => {
            a.set(OP, "finalize");
            a.set(UNITS, opt_num(override_units.map(|u| u.raw())));
            a.set(
                MODE,
                match action {
                    FinalizeAction::Confirm => "confirm",
                    FinalizeAction::Release => "release",
                },
            );
            a.set(LOCK_ID, lock_id.clone());
            // The lock keeps the pools it was reserved from.
            a.set(POOL_COUNT, "0");
            return a;
        }
    }
    if let Some(f) = op.feature_id() {
        a.pools(POOL_COUNT, catalog, f);
    }
    a
}
