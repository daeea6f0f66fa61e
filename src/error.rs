//! The engine's typed errors. Every one leaves the customer's state unchanged.

use std::borrow::Cow;

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
    #[error("a balance with id {0:?} already exists")]
    BalanceAlreadyExists(String),
    #[error("a customer may hold at most {0} balances")]
    TooManyBuckets(usize),
    #[error("insufficient balance")]
    InsufficientBalance,
    #[error("a pending lock with id {0:?} already exists")]
    LockAlreadyExists(String),
    #[error("lock {0:?} not found")]
    LockNotFound(String),
    #[error("idempotency key already used for a different request")]
    IdempotencyKeyReused,
    #[error("the result would leave a balance outside ±1e11")]
    AmountOutOfRange,
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Shorthand for [`EngineError::InvalidInput`].
pub fn invalid(field: &'static str, reason: impl Into<Cow<'static, str>>) -> EngineError {
    EngineError::InvalidInput {
        field,
        reason: reason.into(),
    }
}

impl EngineError {
    /// A stable machine-readable code, shared by the HTTP API and the Lua replies.
    pub fn code(&self) -> &'static str {
        match self {
            EngineError::InvalidInput { .. } => "invalid_inputs",
            EngineError::CustomerNotFound => "customer_not_found",
            EngineError::FeatureNotFound(_) => "feature_not_found",
            EngineError::BalanceNotFound => "balance_not_found",
            EngineError::BalanceAlreadyExists(_) => "balance_already_exists",
            EngineError::TooManyBuckets(_) => "too_many_balances",
            EngineError::InsufficientBalance => "insufficient_balance",
            EngineError::LockAlreadyExists(_) => "lock_already_exists",
            EngineError::LockNotFound(_) => "lock_not_found",
            EngineError::IdempotencyKeyReused => "idempotency_key_reused",
            EngineError::AmountOutOfRange => "amount_out_of_range",
            EngineError::StoreUnavailable(_) => "store_unavailable",
            EngineError::Internal(_) => "internal_error",
        }
    }
}
