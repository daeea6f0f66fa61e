//! The engine's typed errors. Every one leaves the customer's state unchanged.

use std::borrow::Cow;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("invalid {field}: {reason}")]
    InvalidInput {
        field: &'static str,
        reason: Cow<'static, str>,
    },
    #[error("customer not found")]
    CustomerNotFound,
    #[error("feature {0:?} not found")]
    FeatureNotFound(String),
    #[error("balance not found")]
    BalanceNotFound,
    #[error("plan {0:?} not found")]
    PlanNotFound(String),
    #[error("a balance with id {0:?} already exists")]
    BalanceAlreadyExists(String),
    #[error("a customer may hold at most {0} balances")]
    TooManyBuckets(usize),
    #[error("insufficient balance")]
    InsufficientBalance,
    #[error("usage limit {0:?} reached")]
    UsageLimitReached(String),
    #[error("this store does not keep limits yet (the Redis engine: see docs/limits.md); use the in-process engine for customers with limits")]
    LimitsUnsupported,
    /// The store keeps no usage ledger (the Redis engine, until its ledger
    /// lands): the usage queries and deletes, which must be on the ledger,
    /// are refused.
    #[error("this store keeps no usage ledger yet (the Redis engine: see docs/ledger.md); events.list, events.aggregate and deletes need the in-process engine for now")]
    LedgerNotConfigured,
    /// The store keeps no usage alerts (the Redis engine, for now).
    #[error("this store does not keep usage alerts yet (the Redis engine: see docs/alerts.md); use the in-process engine for customers with usage alerts")]
    AlertsUnsupported,
    /// `balances.delete` of a balance used this period, without `force`.
    #[error("balance {0:?} has usage this period; send force: true to delete it anyway")]
    BalanceInUse(String),
    #[error("a pending lock with id {0:?} already exists")]
    LockAlreadyExists(String),
    #[error("lock {0:?} not found")]
    LockNotFound(String),
    #[error("idempotency key already used for a different request")]
    IdempotencyKeyReused,
    #[error("the result would leave a balance outside ±1e11")]
    AmountOutOfRange,
    /// Not applied: the call was never sent (refused, the circuit open) or
    /// Redis refused it before running it (its deadline had passed, a
    /// replica not yet promoted, loading).
    #[error("store unavailable: {0}")]
    StoreUnavailable(#[source] Cause),
    /// Outcome unknown: a call that may change a balance was sent and no
    /// answer came in time. A retry with the same idempotency key settles
    /// it (replays if it ran, applies if it did not).
    #[error("store timeout, outcome unknown: {0}")]
    StoreTimeout(#[source] Cause),
    /// Not applied: Redis is out of memory (`maxmemory` under `noeviction`)
    /// and refused the write before running it.
    #[error("store full: {0}")]
    StoreFull(#[source] Cause),
    #[error("internal error: {0}")]
    Internal(#[source] Cause),
}

/// What went wrong below the engine (a Redis error, an I/O error, a reply
/// that makes no sense), kept whole: it displays as its source and hands on
/// that source's own chain, so logs show every level. Compared by message,
/// so errors stay comparable in tests.
#[derive(Clone)]
pub struct Cause(Arc<dyn std::error::Error + Send + Sync + 'static>);

impl Cause {
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Cause {
        Cause(Arc::new(e))
    }

    /// A cause that is only a message (nothing below it).
    pub fn msg(m: impl Into<String>) -> Cause {
        #[derive(Debug, thiserror::Error)]
        #[error("{0}")]
        struct Msg(String);
        Cause::new(Msg(m.into()))
    }

    /// The error it wraps.
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::fmt::Debug for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for Cause {
    fn eq(&self, other: &Cause) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Eq for Cause {}

/// Every message of an error's chain, outermost first, joined by `: `.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let m = s.to_string();
        if !out.ends_with(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        next = s.source();
    }
    out
}

/// Shorthand for [`EngineError::InvalidInput`].
pub fn invalid(field: &'static str, reason: impl Into<Cow<'static, str>>) -> EngineError {
    EngineError::InvalidInput {
        field,
        reason: reason.into(),
    }
}

impl EngineError {
    /// A failure of the store rather than an answer about the request
    /// (what `on_store_error` decides on).
    pub fn is_store_failure(&self) -> bool {
        matches!(
            self,
            EngineError::StoreUnavailable(_)
                | EngineError::StoreTimeout(_)
                | EngineError::StoreFull(_)
        )
    }

    /// The error's code: one row of [`Code::TABLE`].
    pub fn code(&self) -> Code {
        match self {
            EngineError::InvalidInput { .. } => Code::InvalidInputs,
            EngineError::CustomerNotFound => Code::CustomerNotFound,
            EngineError::FeatureNotFound(_) => Code::FeatureNotFound,
            EngineError::BalanceNotFound => Code::BalanceNotFound,
            EngineError::PlanNotFound(_) => Code::PlanNotFound,
            EngineError::BalanceAlreadyExists(_) => Code::BalanceAlreadyExists,
            EngineError::TooManyBuckets(_) => Code::TooManyBalances,
            EngineError::InsufficientBalance => Code::InsufficientBalance,
            EngineError::UsageLimitReached(_) => Code::UsageLimitReached,
            EngineError::LimitsUnsupported => Code::LimitsUnsupported,
            EngineError::LedgerNotConfigured => Code::LedgerNotConfigured,
            EngineError::AlertsUnsupported => Code::AlertsUnsupported,
            EngineError::BalanceInUse(_) => Code::BalanceInUse,
            EngineError::LockAlreadyExists(_) => Code::LockAlreadyExists,
            EngineError::LockNotFound(_) => Code::LockNotFound,
            EngineError::IdempotencyKeyReused => Code::IdempotencyKeyReused,
            EngineError::AmountOutOfRange => Code::AmountOutOfRange,
            EngineError::StoreUnavailable(_) => Code::StoreUnavailable,
            EngineError::StoreTimeout(_) => Code::StoreTimeout,
            EngineError::StoreFull(_) => Code::StoreFull,
            EngineError::Internal(_) => Code::InternalError,
        }
    }
}

/// Every error code creditgate answers, the one table the engines, the Lua
/// replies (`-CG <code> [detail]`) and the HTTP layer read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    InvalidInputs,
    InsufficientBalance,
    UsageLimitReached,
    LimitsUnsupported,
    LedgerNotConfigured,
    AlertsUnsupported,
    AmountOutOfRange,
    TooManyBalances,
    NoSecretKey,
    InvalidSecretKey,
    Forbidden,
    NotFound,
    CustomerNotFound,
    FeatureNotFound,
    PlanNotFound,
    BalanceNotFound,
    LockNotFound,
    MethodNotAllowed,
    IdempotencyKeyReused,
    LockAlreadyExists,
    BalanceAlreadyExists,
    BalanceInUse,
    PayloadTooLarge,
    InternalError,
    StoreUnavailable,
    StoreTimeout,
    StoreFull,
}

impl Code {
    /// Code, its wire name, and the HTTP status it answers with.
    pub const TABLE: [(Code, &'static str, u16); 27] = [
        (Code::InvalidInputs, "invalid_inputs", 400),
        (Code::InsufficientBalance, "insufficient_balance", 400),
        (Code::UsageLimitReached, "usage_limit_reached", 429),
        // The store cannot keep limits (the Redis engine, for now): a 4xx,
        // since retrying the same request can never succeed on it.
        (Code::LimitsUnsupported, "limits_unsupported", 400),
        // The store keeps no ledger (the Redis engine, for now): 400 like
        // limits_unsupported, since the same request can never succeed on
        // this store (501 would read as a server fault to retry elsewhere).
        (Code::LedgerNotConfigured, "ledger_not_configured", 400),
        // The store keeps no usage alerts (the Redis engine, for now): 400
        // like limits_unsupported.
        (Code::AlertsUnsupported, "alerts_unsupported", 400),
        // Bad input too: the request would take a balance out of bounds.
        (Code::AmountOutOfRange, "amount_out_of_range", 400),
        (Code::TooManyBalances, "too_many_balances", 400),
        (Code::NoSecretKey, "no_secret_key", 401),
        (Code::InvalidSecretKey, "invalid_secret_key", 401),
        (Code::Forbidden, "forbidden", 403),
        (Code::NotFound, "not_found", 404),
        (Code::CustomerNotFound, "customer_not_found", 404),
        (Code::FeatureNotFound, "feature_not_found", 404),
        (Code::PlanNotFound, "plan_not_found", 404),
        (Code::BalanceNotFound, "balance_not_found", 404),
        (Code::LockNotFound, "lock_not_found", 404),
        (Code::MethodNotAllowed, "method_not_allowed", 405),
        (Code::IdempotencyKeyReused, "idempotency_key_reused", 409),
        (Code::LockAlreadyExists, "lock_already_exists", 409),
        (Code::BalanceAlreadyExists, "balance_already_exists", 409),
        // balances.delete of a balance with usage this period (no force).
        (Code::BalanceInUse, "balance_in_use", 409),
        (Code::PayloadTooLarge, "payload_too_large", 413),
        (Code::InternalError, "internal_error", 500),
        (Code::StoreUnavailable, "store_unavailable", 503),
        // Sent, no answer in time: the outcome is unknown (a distinct code,
        // so a caller never takes it for "not applied").
        (Code::StoreTimeout, "store_timeout", 503),
        (Code::StoreFull, "store_full", 507),
    ];

    fn row(self) -> &'static (Code, &'static str, u16) {
        // Every variant has exactly one row (tested below).
        Code::TABLE
            .iter()
            .find(|r| r.0 == self)
            .unwrap_or(&Code::TABLE[22])
    }

    /// The wire name (`invalid_inputs`, …).
    pub fn as_str(self) -> &'static str {
        self.row().1
    }

    /// The HTTP status this code answers with.
    pub fn status(self) -> u16 {
        self.row().2
    }

    /// The code with this wire name.
    pub fn parse(name: &str) -> Option<Code> {
        Code::TABLE.iter().find(|r| r.1 == name).map(|r| r.0)
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_one_row_and_a_unique_name() {
        let mut names = std::collections::BTreeSet::new();
        for (code, name, _) in Code::TABLE {
            assert_eq!(Code::TABLE.iter().filter(|r| r.0 == code).count(), 1);
            assert!(names.insert(name), "{name} twice");
            assert_eq!(Code::parse(name), Some(code));
            assert_eq!(code.as_str(), name);
        }
        assert_eq!(Code::InternalError.status(), 500);
    }
}
