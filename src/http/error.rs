//! The one error type every route answers with: `{message, code}` and the
//! status Autumn uses for that code.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{chain, Cause, Code, EngineError};

/// An error answer. The `message` never carries an internal detail for 5xx.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// 400 `invalid_inputs`: the message names the field and why.
    InvalidInputs(String),
    /// 400 `insufficient_balance` (track with `reject`).
    InsufficientBalance,
    /// 429 `usage_limit_reached` (track with `reject`, refused by a limit):
    /// the body names the limit; `Retry-After` when it will free.
    UsageLimitReached {
        limit: String,
        retry_after_secs: Option<i64>,
    },
    /// 400 `limits_unsupported`: the store keeps no limits (Redis, for now).
    LimitsUnsupported,
    /// 400 `ledger_not_configured`: the store keeps no usage ledger.
    LedgerNotConfigured,
    /// 400 `alerts_unsupported`: the store keeps no usage alerts.
    AlertsUnsupported,
    /// 401 `no_secret_key`.
    NoSecretKey,
    /// 401 `invalid_secret_key`.
    InvalidSecretKey,
    /// 403 `forbidden`: an application key on an admin route.
    Forbidden,
    /// 404 with the given code (`customer_not_found`, `feature_not_found`,
    /// `plan_not_found`, `lock_not_found`, `balance_not_found`, `not_found`).
    NotFound { code: Code, message: String },
    /// 405 `method_not_allowed`.
    MethodNotAllowed,
    /// 409 with the given code (`idempotency_key_reused`,
    /// `lock_already_exists`, `balance_already_exists`).
    Conflict { code: Code, message: String },
    /// 413 `payload_too_large`.
    PayloadTooLarge,
    /// 500 `internal_error`; the detail is logged, never sent.
    Internal(Cause),
    /// 503 `store_unavailable`: not applied; the detail is logged, never sent.
    StoreUnavailable(Cause),
    /// 503 `store_timeout`: sent, no answer in time, the outcome unknown.
    StoreTimeout(Cause),
    /// 507 `store_full`: Redis out of memory, not applied.
    StoreFull(Cause),
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub message: String,
    pub code: String,
    /// With `usage_limit_reached`: the limit's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_id: Option<String>,
}

/// Marks a response whose error came from the store (for `/metrics`).
#[derive(Debug, Clone, Copy)]
pub struct StoreErrorMark;

/// The largest request body, in bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

impl ApiError {
    pub fn invalid(field: &str, reason: impl std::fmt::Display) -> ApiError {
        ApiError::InvalidInputs(format!("invalid {field}: {reason}"))
    }

    /// The status [`Code::TABLE`] gives this error's code.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.code().status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidInputs(_) => Code::InvalidInputs,
            ApiError::InsufficientBalance => Code::InsufficientBalance,
            ApiError::UsageLimitReached { .. } => Code::UsageLimitReached,
            ApiError::LimitsUnsupported => Code::LimitsUnsupported,
            ApiError::LedgerNotConfigured => Code::LedgerNotConfigured,
            ApiError::AlertsUnsupported => Code::AlertsUnsupported,
            ApiError::NoSecretKey => Code::NoSecretKey,
            ApiError::InvalidSecretKey => Code::InvalidSecretKey,
            ApiError::Forbidden => Code::Forbidden,
            ApiError::NotFound { code, .. } | ApiError::Conflict { code, .. } => *code,
            ApiError::MethodNotAllowed => Code::MethodNotAllowed,
            ApiError::PayloadTooLarge => Code::PayloadTooLarge,
            ApiError::Internal(_) => Code::InternalError,
            ApiError::StoreUnavailable(_) => Code::StoreUnavailable,
            ApiError::StoreTimeout(_) => Code::StoreTimeout,
            ApiError::StoreFull(_) => Code::StoreFull,
        }
    }

    pub fn message(&self) -> String {
        match self {
            ApiError::InvalidInputs(m) => m.clone(),
            ApiError::InsufficientBalance => "insufficient balance".into(),
            ApiError::UsageLimitReached { limit, .. } => format!("usage limit {limit:?} reached"),
            ApiError::LimitsUnsupported => EngineError::LimitsUnsupported.to_string(),
            ApiError::LedgerNotConfigured => EngineError::LedgerNotConfigured.to_string(),
            ApiError::AlertsUnsupported => EngineError::AlertsUnsupported.to_string(),
            ApiError::NoSecretKey => "no secret key: send Authorization: Bearer <key>".into(),
            ApiError::InvalidSecretKey => "invalid secret key".into(),
            ApiError::Forbidden => "this key may not use this route".into(),
            ApiError::NotFound { message, .. } | ApiError::Conflict { message, .. } => {
                message.clone()
            }
            ApiError::MethodNotAllowed => "method not allowed".into(),
            ApiError::PayloadTooLarge => format!("request body over {} bytes", MAX_BODY_BYTES),
            ApiError::Internal(_) => "internal error".into(),
            ApiError::StoreUnavailable(_) => {
                "store unavailable: the request was not applied; retrying is safe".into()
            }
            ApiError::StoreTimeout(_) => "store timeout: the outcome is unknown (the request \
                may have been applied); retry with the same Idempotency-Key to settle it: \
                it replays if the first attempt ran and applies if it did not"
                .into(),
            ApiError::StoreFull(_) => {
                "store full: Redis is out of memory; the request was not applied".into()
            }
        }
    }

    pub fn not_found(code: Code, message: impl Into<String>) -> ApiError {
        ApiError::NotFound {
            code,
            message: message.into(),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        match e {
            EngineError::InvalidInput { .. } => ApiError::InvalidInputs(e.to_string()),
            EngineError::AmountOutOfRange => ApiError::InvalidInputs(
                "invalid value: the result would leave a balance outside ±1e11".into(),
            ),
            EngineError::TooManyBuckets(n) => ApiError::InvalidInputs(format!(
                "invalid feature_id: a customer may hold at most {n} balances"
            )),
            EngineError::CustomerNotFound => {
                ApiError::not_found(Code::CustomerNotFound, "customer not found")
            }
            EngineError::FeatureNotFound(ref f) => {
                ApiError::not_found(Code::FeatureNotFound, format!("feature {f:?} not found"))
            }
            EngineError::BalanceNotFound => {
                ApiError::not_found(Code::BalanceNotFound, "balance not found")
            }
            EngineError::PlanNotFound(ref p) => {
                ApiError::not_found(Code::PlanNotFound, format!("plan {p:?} not found"))
            }
            EngineError::LockNotFound(ref l) => {
                ApiError::not_found(Code::LockNotFound, format!("lock {l:?} not found"))
            }
            EngineError::BalanceAlreadyExists(_)
            | EngineError::LockAlreadyExists(_)
            | EngineError::BalanceInUse(_)
            | EngineError::IdempotencyKeyReused => ApiError::Conflict {
                code: e.code(),
                message: e.to_string(),
            },
            EngineError::InsufficientBalance => ApiError::InsufficientBalance,
            EngineError::UsageLimitReached(limit) => ApiError::UsageLimitReached {
                limit,
                retry_after_secs: None,
            },
            EngineError::LimitsUnsupported => ApiError::LimitsUnsupported,
            EngineError::LedgerNotConfigured => ApiError::LedgerNotConfigured,
            EngineError::AlertsUnsupported => ApiError::AlertsUnsupported,
            EngineError::StoreUnavailable(d) => ApiError::StoreUnavailable(d),
            EngineError::StoreTimeout(d) => ApiError::StoreTimeout(d),
            EngineError::StoreFull(d) => ApiError::StoreFull(d),
            EngineError::Internal(d) => ApiError::Internal(d),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let store = matches!(
            self,
            ApiError::Internal(_)
                | ApiError::StoreUnavailable(_)
                | ApiError::StoreTimeout(_)
                | ApiError::StoreFull(_)
        );
        match &self {
            ApiError::Internal(d) | ApiError::StoreFull(d) => {
                let detail = chain(d);
                tracing::error!(code = self.code().as_str(), detail = %detail, "request failed")
            }
            ApiError::StoreUnavailable(d) | ApiError::StoreTimeout(d) => {
                let detail = chain(d);
                tracing::warn!(code = self.code().as_str(), detail = %detail, "request failed")
            }
            // Routine refusals (a missing key, a bad body, an unknown id, no
            // balance) are the client's doing and anyone can cause them by
            // the thousand: counted in metrics, logged at debug only, so the
            // log cannot be flooded.
            _ => tracing::debug!(
                code = self.code().as_str(),
                status = status.as_u16(),
                "request refused"
            ),
        }
        let (limit_id, retry) = match &self {
            ApiError::UsageLimitReached {
                limit,
                retry_after_secs,
            } => (Some(limit.clone()), *retry_after_secs),
            _ => (None, None),
        };
        let body = ErrorBody {
            message: self.message(),
            code: self.code().to_string(),
            limit_id,
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if let Some(secs) = retry {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs.max(0)),
            );
        }
        if store {
            resp.extensions_mut().insert(StoreErrorMark);
        }
        resp
    }
}
