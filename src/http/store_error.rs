//! `on_store_error`: what a decision answers when the store fails.
//!
//! Under `deny` (the default) the store's error is the answer (503
//! `store_unavailable` / `store_timeout`, 507 `store_full`). Under `allow`
//! (Autumn's fail-open), set at the top level or per feature, check, track
//! and the gate answer allowed for every store failure, with headers saying
//! the decision was not recorded (`Creditgate-Recorded: false`) or, after a
//! timeout, may have been (`unknown`), and the failure's code; the metric
//! `creditgate_store_error_allowed_total{code}` counts them. A reservation
//! (`check` with `lock`) and finalize never fail open: a lock the store does
//! not hold cannot be finalized later.

use axum::http::{HeaderName, HeaderValue};
use axum::response::Response;

use super::AppState;
use crate::error::EngineError;
use crate::model::StoreErrorPolicy;

/// `false`: not recorded; `unknown`: a timeout, it may have been.
pub const RECORDED_HEADER: &str = "creditgate-recorded";
/// The store failure's code (`store_unavailable`, `store_timeout`, `store_full`).
pub const STORE_ERROR_HEADER: &str = "creditgate-store-error";

/// Whether a decision on `feature` that failed with `e` is answered allowed.
pub fn fails_open(s: &AppState, feature: &str, e: &EngineError) -> bool {
    e.is_store_failure()
        && s.service
            .catalog
            .feature(feature)
            .and_then(|f| f.on_store_error)
            .unwrap_or(s.on_store_error)
            == StoreErrorPolicy::Allow
}

/// Marks an allowed answer given because the store failed with `e`.
pub fn mark(s: &AppState, e: &EngineError, mut resp: Response) -> Response {
    let code = e.code();
    tracing::warn!(code = code.as_str(), detail = %crate::error::chain(e), "store failed: allowed unrecorded (on_store_error = allow)");
    s.metrics.store_error_allowed(code);
    let recorded = if matches!(e, EngineError::StoreTimeout(_)) {
        "unknown"
    } else {
        "false"
    };
    let h = resp.headers_mut();
    h.insert(
        HeaderName::from_static(RECORDED_HEADER),
        HeaderValue::from_static(recorded),
    );
    h.insert(
        HeaderName::from_static(STORE_ERROR_HEADER),
        HeaderValue::from_static(code.as_str()),
    );
    resp.extensions_mut()
        .insert(crate::metrics::Decision("allowed"));
    resp
}
