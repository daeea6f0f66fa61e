//! The usage ledger (issue 14), core part: what one entry says, and the
//! usage queries' requests and answers. No I/O here: the in-process engine
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

use serde::{Deserialize, Serialize};

use crate::money::Amount;

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
    /// Units of the feature (negative for a refund); zero when not usage.
    pub units: Amount,
    pub balances: Vec<BalanceDelta>,
    pub limits: Vec<LimitDelta>,
    pub idempotency_key: Option<String>,
    /// A lock's id (reserve, finalize, lock_expired).
    pub lock_id: Option<String>,
    /// Alerts and limit_reached: the alert's name or the limit's id.
    pub subject: Option<String>,
}
