//! The Autumn-compatible routes: request bodies, the engine call each makes,
//! and the answers.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::json::{ApiJson, Count, Millis, Obj};
use super::store_error;
use super::views::{self, BalanceView, CustomerView, DeductionView};
use super::AppState;
use crate::alerts::{AlertList, AlertSource, AlertSpec, AlertsUpdate, ArmedAlert};
use crate::calendar::Interval;
use crate::limits::{LimitList, LimitSource, LimitSpec, LimitsUpdate};
use crate::metrics::Decision;
use crate::model::{
    BalanceChange, BucketUpdate, FinalizeAction, Grant, Op, Outcome, OverageBehavior,
    RolloverConfig, RolloverDuration,
};
use crate::money::Amount;

/// The header that marks an answer replayed from an idempotency record.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

// The enums as the document names them (the model's types stay free of the
// OpenAPI generator).

/// A reset interval.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum IntervalName {
    OneOff,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Quarter,
    SemiAnnual,
    Year,
}

/// How long rollovers live.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum RolloverDurationName {
    Month,
    Forever,
}

/// What track does with units no balance covers.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum OverageBehaviorName {
    Cap,
    Reject,
    Overflow,
}

/// What finalize does with a lock.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum FinalizeActionName {
    Confirm,
    Release,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CustomerBody {
    #[schema(
        example = "alice",
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]+$"
    )]
    pub customer_id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Success {
    pub success: bool,
}

/// `{customer_id}` → the customer, created when new.
#[utoipa::path(post, path = "/v1/customers.get_or_create", request_body = CustomerBody,
    responses((status = 200, body = CustomerView), (status = 400, body = ErrorBody)))]
pub async fn get_or_create(
    State(s): State<AppState>,
    ApiJson(b): ApiJson<CustomerBody>,
) -> Result<Response, ApiError> {
    s.engine().create_customer(&b.customer_id).await?;
    let balances = s.engine().balances(&b.customer_id).await?;
    let alerts = s.engine().alerts(&b.customer_id).await?;
    Ok(Json(CustomerView::of(&balances, &alerts, s.env.as_str())).into_response())
}

/// `{customer_id}` → the customer; 404 `customer_not_found`.
#[utoipa::path(post, path = "/v1/customers.get", request_body = CustomerBody,
    responses((status = 200, body = CustomerView), (status = 404, body = ErrorBody)))]
pub async fn get_customer(
    State(s): State<AppState>,
    ApiJson(b): ApiJson<CustomerBody>,
) -> Result<Response, ApiError> {
    let balances = s.engine().balances(&b.customer_id).await?;
    let alerts = s.engine().alerts(&b.customer_id).await?;
    Ok(Json(CustomerView::of(&balances, &alerts, s.env.as_str())).into_response())
}

/// One of Autumn's `billing_controls.usage_limits`: a fixed window of a
/// day, week, month or year.
#[derive(Debug, Deserialize, ToSchema)]
pub struct UsageLimitBody {
    #[schema(example = "premium_message", min_length = 1, max_length = 256)]
    pub feature_id: String,
    /// Required; > 0.
    #[schema(value_type = Option<f64>, example = 100)]
    pub limit: Option<Amount>,
    /// `day`, `week`, `month` or `year`.
    #[schema(example = "day")]
    pub interval: Option<String>,
    /// Default true.
    pub enabled: Option<bool>,
    /// `utc` (default) or `billing_cycle`.
    pub anchor: Option<String>,
    /// Default `<feature_id>:<interval>`.
    #[schema(min_length = 1, max_length = 256)]
    pub id: Option<String>,
    /// Autumn's event filter: not supported (refused, never ignored).
    #[schema(value_type = Option<Object>)]
    pub filter: Option<serde_json::Value>,
}

/// One of creditgate's `billing_controls.rate_limits`: a window (fixed or
/// sliding, `second` to `year`) or a rate (GCRA), optionally in shadow mode.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RateLimitBody {
    #[schema(example = "premium_message", min_length = 1, max_length = 256)]
    pub feature_id: String,
    /// `window` (default) or `rate`.
    #[schema(example = "window")]
    pub kind: Option<String>,
    /// Default `<feature_id>:<interval>` (a window) or `<feature_id>:rate`.
    #[schema(min_length = 1, max_length = 256)]
    pub id: Option<String>,
    /// Default true.
    pub enabled: Option<bool>,
    /// Default false: never denies; counts what it would deny.
    pub shadow: Option<bool>,
    /// Window: units per window (> 0).
    #[schema(value_type = Option<f64>)]
    pub limit: Option<Amount>,
    /// second, minute, hour, day, week (both kinds); month, quarter,
    /// semi_annual, year (windows).
    #[schema(example = "minute")]
    pub interval: Option<String>,
    #[schema(value_type = Option<u32>)]
    pub interval_count: Option<Count>,
    /// Window: `utc` (default) or `billing_cycle`.
    pub anchor: Option<String>,
    /// Window: `fixed` (default) or `sliding`.
    pub window: Option<String>,
    /// Rate: units per interval (> 0).
    #[schema(value_type = Option<f64>)]
    pub rate: Option<Amount>,
    /// Rate: the most at once (≥ 1; default `rate`).
    #[schema(value_type = Option<f64>)]
    pub burst: Option<Amount>,
}

/// The limit lists `customers.update` replaces (a list not named is kept).
#[derive(Debug, Deserialize, ToSchema)]
pub struct BillingControlsBody {
    #[schema(value_type = Option<Vec<UsageLimitBody>>)]
    pub usage_limits: Option<Vec<Obj<UsageLimitBody>>>,
    #[schema(value_type = Option<Vec<RateLimitBody>>)]
    pub rate_limits: Option<Vec<Obj<RateLimitBody>>>,
    /// Autumn's usage alerts (`threshold`, `threshold_type`, `feature_id`,
    /// `enabled`, `basis`, `name`): replaces the customer's own alerts.
    #[schema(value_type = Option<Vec<Object>>)]
    pub usage_alerts: Option<Vec<Obj<AlertSpec>>>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct UpdateCustomerBody {
    #[schema(
        example = "alice",
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]+$"
    )]
    pub customer_id: String,
    #[schema(value_type = Option<BillingControlsBody>)]
    pub billing_controls: Option<Obj<BillingControlsBody>>,
}

/// Sets the customer's limits: each list of `billing_controls` given
/// replaces the customer's list of that name; all or nothing.
#[utoipa::path(post, path = "/v1/customers.update", request_body = UpdateCustomerBody,
    responses((status = 200, body = CustomerView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn update_customer(
    State(s): State<AppState>,
    ApiJson(b): ApiJson<UpdateCustomerBody>,
) -> Result<Response, ApiError> {
    crate::model::validate_id("customer_id", &b.customer_id)?;
    let catalog = &s.service.catalog;
    let mut update = LimitsUpdate::default();
    let mut alerts_update = AlertsUpdate::default();
    if let Some(Obj(bc)) = b.billing_controls {
        if let Some(list) = bc.usage_alerts {
            let mut defs = vec![];
            for Obj(a) in list {
                defs.push(a.build(AlertList::Customer, AlertSource::Customer, |f| {
                    catalog.feature(f).is_some()
                })?);
            }
            alerts_update.usage_alerts = Some(defs);
        }
        if let Some(list) = bc.usage_limits {
            let mut defs = vec![];
            for Obj(u) in list {
                if u.filter.is_some() {
                    return Err(ApiError::invalid(
                        "billing_controls.usage_limits.filter",
                        "event filters are not supported",
                    ));
                }
                let spec = LimitSpec {
                    id: u.id,
                    feature_id: u.feature_id,
                    enabled: u.enabled,
                    limit: u.limit,
                    interval: u.interval,
                    anchor: u.anchor,
                    ..LimitSpec::default()
                };
                defs.push(spec.build(LimitList::UsageLimits, LimitSource::UsageLimits, catalog)?);
            }
            update.usage_limits = Some(defs);
        }
        if let Some(list) = bc.rate_limits {
            let mut defs = vec![];
            for Obj(r) in list {
                let spec = LimitSpec {
                    id: r.id,
                    feature_id: r.feature_id,
                    kind: r.kind,
                    enabled: r.enabled,
                    shadow: r.shadow,
                    limit: r.limit,
                    interval: r.interval,
                    interval_count: r.interval_count.map(|c| c.0),
                    anchor: r.anchor,
                    window: r.window,
                    rate: r.rate,
                    burst: r.burst,
                };
                defs.push(spec.build(LimitList::RateLimits, LimitSource::RateLimits, catalog)?);
            }
            update.rate_limits = Some(defs);
        }
    }
    // Everything is decided before anything is stored: a store without
    // alerts refuses the request whole, and the alert list is checked
    // against the customer's current alerts (ids, count) first.
    if alerts_update.usage_alerts.is_some() {
        if !s.engine().supports_alerts() {
            return Err(ApiError::AlertsUnsupported);
        }
        let current: Vec<ArmedAlert> = s
            .engine()
            .alerts(&b.customer_id)
            .await?
            .into_iter()
            .map(ArmedAlert::new)
            .collect();
        crate::alerts::update_alerts(&current, &alerts_update)?;
    }
    if update.usage_limits.is_some() || update.rate_limits.is_some() {
        s.engine().set_limits(&b.customer_id, &update).await?;
    }
    if alerts_update.usage_alerts.is_some() {
        s.engine()
            .set_alerts(&b.customer_id, &alerts_update)
            .await?;
    }
    let balances = s.engine().balances(&b.customer_id).await?;
    let alerts = s.engine().alerts(&b.customer_id).await?;
    Ok(Json(CustomerView::of(&balances, &alerts, s.env.as_str())).into_response())
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct AttachBody {
    #[schema(
        example = "alice",
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]+$"
    )]
    pub customer_id: String,
    #[schema(
        example = "pro",
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]+$"
    )]
    pub plan_id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AttachResponse {
    pub success: bool,
    pub customer_id: String,
    #[schema(value_type = Option<String>)]
    pub payment_url: Option<()>,
}

/// Grants the plan's buckets anchored now (creating the customer if new);
/// attaching a plan the customer already has changes nothing.
#[utoipa::path(post, path = "/v1/billing.attach", request_body = AttachBody,
    responses((status = 200, body = AttachResponse), (status = 404, body = ErrorBody)))]
pub async fn attach(
    State(s): State<AppState>,
    ApiJson(b): ApiJson<AttachBody>,
) -> Result<Response, ApiError> {
    s.service.attach(&b.customer_id, &b.plan_id).await?;
    Ok(Json(AttachResponse {
        success: true,
        customer_id: b.customer_id,
        payment_url: None,
    })
    .into_response())
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ResetBody {
    #[schema(value_type = IntervalName)]
    pub interval: Interval,
    #[schema(value_type = Option<u32>)]
    pub interval_count: Option<Count>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct RolloverBody {
    #[schema(value_type = Option<f64>, minimum = 0.0, maximum = 100000000000.0, multiple_of = 0.0001)]
    pub max: Option<Amount>,
    #[schema(value_type = Option<f64>, minimum = 0.0, maximum = 100.0, multiple_of = 0.0001)]
    pub max_percentage: Option<Amount>,
    /// `month` (default) or `forever`.
    #[schema(value_type = Option<RolloverDurationName>)]
    pub duration: Option<RolloverDuration>,
    /// Months; ignored for `forever`.
    #[schema(value_type = Option<u32>)]
    pub length: Option<Count>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateBalanceBody {
    #[schema(
        example = "alice",
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]+$"
    )]
    pub customer_id: String,
    #[schema(
        example = "premium_message",
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]+$"
    )]
    pub feature_id: String,
    #[schema(value_type = Option<f64>, minimum = 0.0, maximum = 100000000000.0, multiple_of = 0.0001)]
    pub included_grant: Option<Amount>,
    #[serde(default)]
    pub unlimited: Option<bool>,
    /// Absent: a one-off balance.
    pub reset: Option<ResetBody>,
    pub rollover: Option<RolloverBody>,
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 253402300799999_i64)]
    pub expires_at: Option<Millis>,
    /// The first boundary, and the anchor of later ones.
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 253402300799999_i64)]
    pub next_reset_at: Option<Millis>,
    #[schema(
        example = "pro:credits",
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]+$"
    )]
    pub balance_id: Option<String>,
    /// creditgate extension: allow going below zero.
    pub overage_allowed: Option<bool>,
    /// creditgate extension: how far below zero (≤ 0).
    #[schema(value_type = Option<f64>, minimum = -100000000000.0, maximum = 0.0, multiple_of = 0.0001)]
    pub overage_floor: Option<Amount>,
    /// creditgate extension: carry debt across resets.
    pub carry_debt: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreateBalanceResponse {
    pub success: bool,
    pub balance_id: String,
}

/// Grants a bucket; an existing `balance_id` is 409 `balance_already_exists`.
#[utoipa::path(post, path = "/v1/balances.create", request_body = CreateBalanceBody,
    responses((status = 200, body = CreateBalanceResponse), (status = 409, body = ErrorBody)))]
pub async fn create_balance(
    State(s): State<AppState>,
    ApiJson(b): ApiJson<CreateBalanceBody>,
) -> Result<Response, ApiError> {
    let rollover = b.rollover.map(|r| {
        let duration = r.duration.unwrap_or_default();
        RolloverConfig {
            max: r.max,
            max_percentage: r.max_percentage,
            duration,
            length: match duration {
                RolloverDuration::Forever => None,
                RolloverDuration::Month => r.length.map(|c| c.0),
            },
        }
    });
    let grant = Grant {
        pool: b.feature_id,
        balance_id: b.balance_id,
        plan_id: None,
        granted: b.included_grant.unwrap_or(Amount::ZERO),
        interval: b.reset.as_ref().map(|r| r.interval),
        interval_count: b.reset.as_ref().and_then(|r| r.interval_count).map(|c| c.0),
        next_reset_at: b.next_reset_at.map(|m| m.0),
        expires_at: b.expires_at.map(|m| m.0),
        rollover,
        unlimited: b.unlimited.unwrap_or(false),
        overage_allowed: b.overage_allowed.unwrap_or(false),
        overage_floor: b.overage_floor,
        carry_debt: b.carry_debt.unwrap_or(false),
    };
    let id = s.engine().grant(&b.customer_id, &grant).await?;
    Ok(Json(CreateBalanceResponse {
        success: true,
        balance_id: id,
    })
    .into_response())
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct UpdateBalanceBody {
    #[schema(
        example = "alice",
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]+$"
    )]
    pub customer_id: String,
    #[schema(
        example = "premium_message",
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]+$"
    )]
    pub feature_id: String,
    #[schema(
        example = "pro:credits",
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]+$"
    )]
    pub balance_id: Option<String>,
    #[schema(value_type = Option<f64>, minimum = -100000000000.0, maximum = 100000000000.0, multiple_of = 0.0001)]
    pub remaining: Option<Amount>,
    #[schema(value_type = Option<f64>, minimum = -100000000000.0, maximum = 100000000000.0, multiple_of = 0.0001)]
    pub add_to_balance: Option<Amount>,
}

/// Sets a bucket's remaining or adds to it (without `balance_id`: the pool's
/// first bucket in deduction order).
#[utoipa::path(post, path = "/v1/balances.update", request_body = UpdateBalanceBody,
    responses((status = 200, body = Success), (status = 404, body = ErrorBody)))]
pub async fn update_balance(
    State(s): State<AppState>,
    ApiJson(b): ApiJson<UpdateBalanceBody>,
) -> Result<Response, ApiError> {
    let change = match (b.remaining, b.add_to_balance) {
        (Some(v), None) => BalanceChange::SetRemaining(v),
        (None, Some(v)) => BalanceChange::AddToBalance(v),
        _ => {
            return Err(ApiError::invalid(
                "remaining",
                "give exactly one of remaining and add_to_balance",
            ))
        }
    };
    let update = BucketUpdate {
        pool: b.feature_id,
        balance_id: b.balance_id,
        change,
    };
    s.engine().update_bucket(&b.customer_id, &update).await?;
    Ok(Json(Success { success: true }).into_response())
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct LockBody {
    /// Default true when `lock` is given.
    pub enabled: Option<bool>,
    #[schema(
        example = "lk1",
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]+$"
    )]
    pub lock_id: Option<String>,
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 253402300799999_i64)]
    pub expires_at: Option<Millis>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CheckBody {
    #[schema(
        example = "alice",
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]+$"
    )]
    pub customer_id: String,
    #[schema(
        example = "premium_message",
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]+$"
    )]
    pub feature_id: String,
    /// Default 1.
    #[schema(value_type = Option<f64>, minimum = 0.0, maximum = 100000000000.0, multiple_of = 0.0001)]
    pub required_balance: Option<Amount>,
    /// Consume atomically (all or nothing).
    pub send_event: Option<bool>,
    /// Reserve under `lock_id` until finalized or expired.
    pub lock: Option<LockBody>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CheckResponse {
    pub allowed: bool,
    pub customer_id: String,
    #[schema(value_type = Option<String>)]
    pub entity_id: Option<()>,
    /// In the units of `balance` (credits when it is a credit system).
    #[schema(value_type = f64)]
    pub required_balance: Amount,
    pub balance: Option<BalanceView>,
    /// The feature and every credit system containing it → Balance, or null when not owned.
    #[schema(value_type = Object)]
    pub balances: BTreeMap<String, Option<BalanceView>>,
    #[schema(value_type = Option<Object>)]
    pub flag: Option<()>,
    /// On a denial: `insufficient_balance` or `usage_limit_reached`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    /// With `usage_limit_reached`: the limit that refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_id: Option<String>,
    /// With `usage_limit_reached`: when the request would fit (ms; null never).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<Option<i64>>,
    /// Shadow limits that would have denied this request.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shadow_denied: Vec<String>,
    /// The armed limits on the feature and its paying pools, after the request.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<views::LimitStatusView>,
}

impl CheckResponse {
    /// The answer under `on_store_error = "allow"` when the store failed:
    /// allowed, no balance known.
    fn unrecorded(customer_id: String, required: Amount) -> CheckResponse {
        CheckResponse {
            allowed: true,
            customer_id,
            entity_id: None,
            required_balance: required,
            balance: None,
            balances: BTreeMap::new(),
            flag: None,
            code: None,
            limit_id: None,
            retry_at: None,
            shadow_denied: vec![],
            limits: vec![],
        }
    }
}

/// The `Idempotency-Key` header, checked whether or not the request uses it
/// (as the OpenAPI document states it): 1 to 256 visible ASCII characters,
/// spaces only inside.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(IDEMPOTENCY_HEADER) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::invalid(
            "Idempotency-Key",
            "must be 1 to 256 visible ASCII characters (spaces only inside)",
        )
    };
    let s = v.to_str().map_err(|_| bad())?;
    let visible = |b: u8| b.is_ascii_graphic();
    let ok = !s.is_empty()
        && s.len() <= crate::model::MAX_ID_CHARS
        && s.bytes().all(|b| b == b' ' || visible(b))
        && s.bytes().next().is_some_and(visible)
        && s.bytes().last().is_some_and(visible);
    if !ok {
        return Err(bad());
    }
    Ok(Some(s.to_string()))
}

fn replayed(mut resp: Response, replayed: bool) -> Response {
    if replayed {
        resp.headers_mut()
            .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    resp
}

fn decision(mut resp: Response, allowed: bool) -> Response {
    resp.extensions_mut()
        .insert(Decision(if allowed { "allowed" } else { "denied" }));
    resp
}

/// Check (dry run), consume (`send_event`) or reserve (`lock`).
#[utoipa::path(post, path = "/v1/check", request_body = CheckBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "with send_event or lock", min_length = 1, max_length = 256, pattern = r"^[!-~]([ -~]*[!-~])?$")),
    responses((status = 200, body = CheckResponse), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn check(
    State(s): State<AppState>,
    headers: HeaderMap,
    ApiJson(b): ApiJson<CheckBody>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let required = b.required_balance.unwrap_or(Amount::whole(1));
    if required.is_negative() {
        return Err(ApiError::invalid(
            "required_balance",
            "must not be negative",
        ));
    }
    let costs = s.service.catalog.pools_for(&b.feature_id)?;
    // A lock's fields are checked even when it is disabled, as the document
    // states them.
    if let Some(l) = &b.lock {
        if let Some(id) = &l.lock_id {
            crate::model::validate_id("lock.lock_id", id)?;
        }
        if let Some(e) = l.expires_at {
            crate::model::validate_instant("lock.expires_at", e.0)?;
        }
    }
    let lock = b.lock.filter(|l| l.enabled.unwrap_or(true));
    let applies = lock.is_some() || b.send_event.unwrap_or(false);
    let out: Outcome = if let Some(lock) = &lock {
        let lock_id = lock
            .lock_id
            .as_deref()
            .ok_or_else(|| ApiError::invalid("lock.lock_id", "is required"))?;
        s.service
            .reserve(
                &b.customer_id,
                lock_id,
                &b.feature_id,
                required,
                lock.expires_at.map(|m| m.0),
                key.as_deref(),
            )
            .await?
    } else {
        let decided = if b.send_event.unwrap_or(false) {
            s.engine()
                .consume(&b.customer_id, &b.feature_id, required, key.as_deref())
                .await
        } else {
            s.engine()
                .check(&b.customer_id, &b.feature_id, required)
                .await
        };
        match decided {
            Ok(out) => out,
            Err(e) if store_error::fails_open(&s, &b.feature_id, &e) => {
                let body = CheckResponse::unrecorded(b.customer_id, required);
                return Ok(store_error::mark(&s, &e, Json(body).into_response()));
            }
            Err(e) => return Err(e.into()),
        }
    };
    // Coverage is judged on the balances before this request took its part.
    let spent = if applies && !out.replayed {
        views::spent_by_pool(&out.entries)
    } else {
        BTreeMap::new()
    };
    let chosen = views::choose_balance(&costs, &out.pools, required, &spent);
    let body = CheckResponse {
        allowed: out.allowed,
        customer_id: b.customer_id,
        entity_id: None,
        required_balance: chosen.as_ref().map_or(required, |c| c.1),
        balance: chosen.map(|c| BalanceView::of(c.0)),
        balances: views::balances_map(&out.pools),
        flag: None,
        code: (!out.allowed).then_some(if out.limit.is_some() {
            "usage_limit_reached"
        } else {
            "insufficient_balance"
        }),
        limit_id: out.limit.as_ref().map(|d| d.id.clone()),
        retry_at: out.limit.as_ref().map(|d| d.frees_at),
        shadow_denied: out.shadow_denied.clone(),
        limits: out.limits.iter().map(views::LimitStatusView::of).collect(),
    };
    if !out.replayed {
        for id in &out.shadow_denied {
            s.metrics.shadow_denial(id);
        }
    }
    Ok(decision(
        replayed(Json(body).into_response(), out.replayed),
        out.allowed,
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct TrackBody {
    #[schema(
        example = "alice",
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]+$"
    )]
    pub customer_id: String,
    #[schema(
        example = "premium_message",
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]+$"
    )]
    pub feature_id: String,
    /// Default 1; negative refunds.
    #[schema(value_type = Option<f64>, minimum = -100000000000.0, maximum = 100000000000.0, multiple_of = 0.0001)]
    pub value: Option<Amount>,
    /// `cap` (default), `reject` or `overflow`.
    #[schema(value_type = Option<OverageBehaviorName>)]
    pub overage_behavior: Option<OverageBehavior>,
    #[schema(
        example = "fuzz-1",
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]+$"
    )]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TrackResponse {
    pub customer_id: String,
    #[schema(value_type = f64)]
    pub value: Amount,
    pub balance: Option<BalanceView>,
    /// The feature and every credit system containing it → Balance, or null when not owned.
    #[schema(value_type = Object)]
    pub balances: BTreeMap<String, Option<BalanceView>>,
    pub deductions: Vec<DeductionView>,
    /// Shadow limits that would have denied this request.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shadow_denied: Vec<String>,
}

/// Records usage (a negative value refunds). `reject` without enough
/// balance is 400 `insufficient_balance`, nothing charged.
#[utoipa::path(post, path = "/v1/track", request_body = TrackBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "scoped to the customer", min_length = 1, max_length = 256, pattern = r"^[!-~]([ -~]*[!-~])?$")),
    responses((status = 200, body = TrackResponse), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn track(
    State(s): State<AppState>,
    headers: HeaderMap,
    ApiJson(b): ApiJson<TrackBody>,
) -> Result<Response, ApiError> {
    let key = match (idempotency_key(&headers)?, b.idempotency_key) {
        (Some(h), Some(body)) if h != body => {
            return Err(ApiError::invalid(
                "idempotency_key",
                "differs from the Idempotency-Key header",
            ))
        }
        (h, body) => h.or(body),
    };
    let value = b.value.unwrap_or(Amount::whole(1));
    let costs = s.service.catalog.pools_for(&b.feature_id)?;
    let op = Op::Track {
        feature: b.feature_id.clone(),
        units: value,
        behavior: b.overage_behavior.unwrap_or_default(),
    };
    let out = match s.engine().apply(&b.customer_id, &op, key.as_deref()).await {
        Ok(out) => out,
        Err(e) if store_error::fails_open(&s, &b.feature_id, &e) => {
            let body = TrackResponse {
                customer_id: b.customer_id,
                value,
                balance: None,
                balances: BTreeMap::new(),
                deductions: vec![],
                shadow_denied: vec![],
            };
            return Ok(store_error::mark(&s, &e, Json(body).into_response()));
        }
        Err(e) => return Err(e.into()),
    };
    if !out.replayed {
        for id in &out.shadow_denied {
            s.metrics.shadow_denial(id);
        }
    }
    if out.insufficient {
        let resp = decision(ApiError::InsufficientBalance.into_response(), false);
        return Ok(replayed(resp, out.replayed));
    }
    if let Some(d) = &out.limit {
        let err = ApiError::UsageLimitReached {
            limit: d.id.clone(),
            retry_after_secs: d.frees_at.map(|t| ((t - out.at).max(0) + 999) / 1000),
        };
        let resp = decision(err.into_response(), false);
        return Ok(replayed(resp, out.replayed));
    }
    let spent = if out.replayed {
        BTreeMap::new()
    } else {
        views::spent_by_pool(&out.entries)
    };
    let chosen = views::choose_balance(&costs, &out.pools, value, &spent);
    let body = TrackResponse {
        customer_id: b.customer_id,
        value,
        balance: chosen.map(|c| BalanceView::of(c.0)),
        balances: views::balances_map(&out.pools),
        deductions: views::deductions(&out),
        shadow_denied: out.shadow_denied.clone(),
    };
    Ok(decision(
        replayed(Json(body).into_response(), out.replayed),
        out.allowed,
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct FinalizeBody {
    #[schema(
        example = "lk1",
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]+$"
    )]
    pub lock_id: String,
    /// `confirm` or `release`.
    #[schema(value_type = FinalizeActionName)]
    pub action: FinalizeAction,
    /// Confirm with this amount instead of the held one.
    #[schema(value_type = Option<f64>, minimum = 0.0, maximum = 100000000000.0, multiple_of = 0.0001)]
    pub override_value: Option<Amount>,
    /// Optional: without it the lock is found through the lock index.
    #[schema(
        example = "alice",
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]+$"
    )]
    pub customer_id: Option<String>,
}

/// Confirms or releases a lock; finalizing twice answers the first outcome.
#[utoipa::path(post, path = "/v1/balances.finalize", request_body = FinalizeBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "scoped to the customer", min_length = 1, max_length = 256, pattern = r"^[!-~]([ -~]*[!-~])?$")),
    responses((status = 200, body = Success), (status = 404, body = ErrorBody)))]
pub async fn finalize(
    State(s): State<AppState>,
    headers: HeaderMap,
    ApiJson(b): ApiJson<FinalizeBody>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let (_, out) = s
        .service
        .finalize(
            b.customer_id,
            &b.lock_id,
            b.action,
            b.override_value,
            key.as_deref(),
        )
        .await?;
    Ok(replayed(
        Json(Success { success: true }).into_response(),
        out.replayed,
    ))
}

/// Process up.
#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Success)))]
pub async fn healthz() -> Json<Success> {
    Json(Success { success: true })
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Ready {
    pub ready: bool,
    /// With a ledger drain (Redis and `[ledger] url`): entries in the
    /// streams not yet in the database at its last round.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ledger_backlog: Option<u64>,
    /// With a ledger drain: whether its last round failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ledger_drain_failing: Option<bool>,
}

/// Store reachable and its code (the Redis library) loaded: 200, else 503.
#[utoipa::path(get, path = "/readyz", responses((status = 200, body = Ready), (status = 503, body = Ready)))]
pub async fn readyz(State(s): State<AppState>) -> Response {
    let ready = s.readiness.ready().await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let drain = s.ledger_drain.as_ref();
    let body = Ready {
        ready,
        ledger_backlog: drain.and_then(|d| d.backlog()),
        ledger_drain_failing: drain.map(|d| d.failing()),
    };
    (status, Json(body)).into_response()
}

/// Prometheus text.
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain", body = String)))]
pub async fn metrics(State(s): State<AppState>) -> Response {
    if let Some(d) = &s.ledger_drain {
        s.metrics
            .ledger_drain(d.backlog(), d.committed(), d.failing());
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        s.metrics.render(),
    )
        .into_response()
}
