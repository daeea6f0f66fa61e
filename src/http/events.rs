//! The usage ledger's routes (issue 14): `events.list`, `events.aggregate`
//! in Autumn's shapes (the Python SDK 1.2.0's models parse them), and the
//! deletes (`customers.delete`, `balances.delete`). The query logic is in
//! [`crate::ledger`]; these handlers only translate.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::json::{ApiJson, Count, Millis, Obj};
use super::routes::{IntervalName, Success};
use super::AppState;
use crate::calendar::Interval;
use crate::engine::BalanceDelete;
use crate::ledger::{
    AggregateQuery, BinSize, EventsListQuery, GroupBy, LedgerEntry, Measure, RangeSpec,
};
use crate::money::Amount;

/// One feature id or several.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum FeatureIds {
    One(String),
    Many(Vec<String>),
}

impl FeatureIds {
    fn list(self) -> Vec<String> {
        match self {
            FeatureIds::One(f) => vec![f],
            FeatureIds::Many(v) => v,
        }
    }
}

/// `[start, end)` in ms since the epoch (UTC).
#[derive(Debug, Deserialize, ToSchema)]
pub struct CustomRangeBody {
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 253402300799999_i64)]
    pub start: Option<Millis>,
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 253402300799999_i64)]
    pub end: Option<Millis>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct EventsListBody {
    /// Absent: every customer's events.
    #[schema(example = "alice", min_length = 1, max_length = 256)]
    pub customer_id: Option<String>,
    /// One feature id or a list; absent: every feature.
    #[schema(value_type = Option<FeatureIds>)]
    pub feature_id: Option<FeatureIds>,
    #[schema(value_type = Option<CustomRangeBody>)]
    pub custom_range: Option<Obj<CustomRangeBody>>,
    /// `24h`, `7d`, `30d`, `90d` or `last_cycle` (not with `custom_range`).
    #[schema(example = "30d")]
    pub range: Option<String>,
    /// The `next_cursor` of the previous page; empty or absent: the first.
    pub start_cursor: Option<String>,
    /// 1 to 5000, default 50.
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 5000)]
    pub limit: Option<Count>,
    /// Entities are not supported (refused, never ignored).
    pub entity_id: Option<String>,
}

/// What one balance gave (positive) or got back (negative).
#[derive(Debug, Serialize, ToSchema)]
pub struct EventDeductionView {
    pub balance_id: String,
    /// The balance's pool.
    pub feature_id: String,
    pub plan_id: Option<String>,
    /// Always null (the reset at deduction time is not kept).
    #[schema(value_type = Option<Object>)]
    pub reset: Option<()>,
    #[schema(value_type = f64)]
    pub value: Amount,
}

/// creditgate's details of an event.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventProperties {
    /// `consume`, `track`, `refund` or `finalize`.
    pub op: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock_id: Option<String>,
}

/// One usage event: a ledger entry of a usage op.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    /// The ledger entry id (`<ms>-<seq>`).
    pub id: String,
    /// ms since the epoch.
    pub timestamp: i64,
    pub feature_id: String,
    pub customer_id: String,
    /// Units of the feature (negative: a refund).
    #[schema(value_type = f64)]
    pub value: Amount,
    pub properties: EventProperties,
    pub deductions: Option<Vec<EventDeductionView>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventsListResponse {
    pub list: Vec<EventView>,
    /// Pass as `start_cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

fn event_view(e: LedgerEntry) -> EventView {
    EventView {
        id: e.id,
        timestamp: e.at,
        feature_id: e.feature_id.unwrap_or_default(),
        customer_id: e.customer_id,
        value: e.units,
        properties: EventProperties {
            op: e.op.as_str(),
            idempotency_key: e.idempotency_key,
            lock_id: e.lock_id,
        },
        deductions: Some(
            e.balances
                .into_iter()
                .map(|d| EventDeductionView {
                    balance_id: d.balance_id,
                    feature_id: d.pool,
                    plan_id: d.plan_id,
                    reset: None,
                    value: Amount::from_raw(-d.amount.raw()).unwrap_or(Amount::ZERO),
                })
                .collect(),
        ),
    }
}

/// Every feature id known to the catalog, valid as an id.
fn features(s: &AppState, ids: Vec<String>) -> Result<Vec<String>, ApiError> {
    for f in &ids {
        crate::model::validate_id("feature_id", f)?;
        if s.service.catalog.feature(f).is_none() {
            return Err(crate::error::EngineError::FeatureNotFound(f.clone()).into());
        }
    }
    Ok(ids)
}

fn customer(id: Option<String>) -> Result<Option<String>, ApiError> {
    if let Some(c) = &id {
        crate::model::validate_id("customer_id", c)?;
    }
    Ok(id)
}

fn range_of(
    range: Option<String>,
    custom: Option<Obj<CustomRangeBody>>,
    now: i64,
    required: bool,
) -> Result<Option<RangeSpec>, ApiError> {
    match (range, custom) {
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "custom_range",
            "give range or custom_range, not both",
        )),
        (Some(r), None) => RangeSpec::parse(&r).map(Some).ok_or_else(|| {
            ApiError::invalid("range", "must be one of 24h, 7d, 30d, 90d, last_cycle")
        }),
        (None, Some(Obj(c))) => {
            let start = c.start.map(|m| m.0);
            let end = c.end.map(|m| m.0);
            for (field, v) in [("custom_range.start", start), ("custom_range.end", end)] {
                if let Some(v) = v {
                    crate::model::validate_instant(field, v)?;
                }
            }
            if required && (start.is_none() || end.is_none()) {
                return Err(ApiError::invalid(
                    "custom_range",
                    "needs both start and end (ms)",
                ));
            }
            let (start, end) = (start.unwrap_or(0), end.unwrap_or(now.max(0) + 1));
            if end <= start {
                return Err(ApiError::invalid(
                    "custom_range.end",
                    "must be after custom_range.start",
                ));
            }
            Ok(Some(RangeSpec::Custom { start, end }))
        }
        (None, None) if required => Err(ApiError::invalid("range", "give range or custom_range")),
        (None, None) => Ok(None),
    }
}

/// Usage events (consume, track, refund, finalize entries of the ledger),
/// newest first, in pages: `next_cursor` is the last event's id while more
/// follow.
#[utoipa::path(post, path = "/v1/events.list", request_body = EventsListBody,
    responses((status = 200, body = EventsListResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn events_list(
    State(s): State<AppState>,
    ApiJson(b): ApiJson<EventsListBody>,
) -> Result<Response, ApiError> {
    if b.entity_id.is_some() {
        return Err(ApiError::invalid("entity_id", "entities are not supported"));
    }
    let customer_id = customer(b.customer_id)?;
    let feature_ids = features(&s, b.feature_id.map(FeatureIds::list).unwrap_or_default())?;
    let now = s.service.clock.now_ms();
    let (start, end) = match range_of(b.range, b.custom_range, now, false)? {
        None => (None, None),
        // last_cycle needs the customer's bucket: the engine resolves it in
        // aggregate; a list takes the previous UTC month without one.
        Some(r) => {
            let (a, z) = r.resolve(now, None);
            (Some(a), Some(z))
        }
    };
    let limit = match b.limit {
        None => 50,
        Some(Count(n)) if (1..=crate::ledger::MAX_PAGE as u32).contains(&n) => n as usize,
        Some(_) => return Err(ApiError::invalid("limit", "must be 1 to 5000")),
    };
    let q = EventsListQuery {
        customer_id,
        feature_ids,
        start,
        end,
        cursor: b.start_cursor.filter(|c| !c.is_empty()),
        limit,
    };
    let page = s.engine().events_list(&q).await?;
    Ok(Json(EventsListResponse {
        list: page.entries.into_iter().map(event_view).collect(),
        next_cursor: page.next_cursor,
    })
    .into_response())
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct EventsAggregateBody {
    /// Absent: every customer's usage.
    #[schema(example = "alice", min_length = 1, max_length = 256)]
    pub customer_id: Option<String>,
    /// One feature id or a list (at least one).
    pub feature_id: FeatureIds,
    /// `24h`, `7d`, `30d`, `90d` or `last_cycle`; or give `custom_range`.
    #[schema(example = "30d")]
    pub range: Option<String>,
    #[schema(value_type = Option<CustomRangeBody>)]
    pub custom_range: Option<Obj<CustomRangeBody>>,
    /// `hour`, `day`, `week` (from Monday) or `month`, UTC; default `hour`
    /// for `24h`, else `day`.
    #[schema(example = "day")]
    pub bin_size: Option<String>,
    /// `$feature_id`, `$plan_id` or `$customer_id`.
    pub group_by: Option<String>,
    /// With `group_by`: the most groups per bin (default 9), the rest under `Other`.
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    pub max_groups: Option<Count>,
    /// `sum` (default) or `count`.
    pub measure: Option<String>,
    /// Only `UTC` (or absent).
    pub timezone: Option<String>,
    /// Not supported (refused unless empty).
    #[schema(value_type = Option<Object>)]
    pub filter_by: Option<BTreeMap<String, String>>,
    /// Not supported (refused).
    pub aggregate_on: Option<String>,
    /// Not supported (refused).
    pub entity_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AggregateBinView {
    /// The bin's start, ms.
    pub period: i64,
    /// feature id → sum (or count) in the bin.
    #[schema(value_type = Object)]
    pub values: BTreeMap<String, Amount>,
    /// With `group_by`: feature id → group → value.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub grouped_values: Option<BTreeMap<String, BTreeMap<String, Amount>>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AggregateTotalView {
    pub count: u64,
    #[schema(value_type = f64)]
    pub sum: Amount,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventsAggregateResponse {
    /// Every bin of the range, oldest first, empty ones included.
    pub list: Vec<AggregateBinView>,
    /// feature id → totals over the range.
    #[schema(value_type = Object)]
    pub total: BTreeMap<String, AggregateTotalView>,
}

/// Usage per bin over a range: the sum of units of usage entries (refunds
/// negative), exact decimals.
#[utoipa::path(post, path = "/v1/events.aggregate", request_body = EventsAggregateBody,
    responses((status = 200, body = EventsAggregateResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn events_aggregate(
    State(s): State<AppState>,
    ApiJson(b): ApiJson<EventsAggregateBody>,
) -> Result<Response, ApiError> {
    if b.entity_id.is_some() {
        return Err(ApiError::invalid("entity_id", "entities are not supported"));
    }
    if b.aggregate_on.is_some() {
        return Err(ApiError::invalid(
            "aggregate_on",
            "per-balance deductions are not supported; events.list has each event's",
        ));
    }
    if b.filter_by.as_ref().is_some_and(|f| !f.is_empty()) {
        return Err(ApiError::invalid(
            "filter_by",
            "event properties are not kept",
        ));
    }
    if b.timezone
        .as_deref()
        .is_some_and(|t| t != "UTC" && t != "Etc/UTC")
    {
        return Err(ApiError::invalid("timezone", "only UTC is supported"));
    }
    let customer_id = customer(b.customer_id)?;
    let feature_ids = features(&s, b.feature_id.list())?;
    if feature_ids.is_empty() {
        return Err(ApiError::invalid("feature_id", "name at least one feature"));
    }
    let now = s.service.clock.now_ms();
    let range = range_of(b.range.clone(), b.custom_range, now, true)?
        .ok_or_else(|| ApiError::invalid("range", "give range or custom_range"))?;
    let bin_size = match b.bin_size.as_deref() {
        Some(x) => BinSize::parse(x)
            .ok_or_else(|| ApiError::invalid("bin_size", "must be hour, day, week or month"))?,
        None if b.range.as_deref() == Some("24h") => BinSize::Hour,
        None => BinSize::Day,
    };
    let group_by = match b.group_by.as_deref() {
        None => None,
        Some(g) => Some(GroupBy::parse(g).ok_or_else(|| {
            ApiError::invalid(
                "group_by",
                "must be $feature_id, $plan_id or $customer_id (event properties are not kept)",
            )
        })?),
    };
    let max_groups = match b.max_groups {
        None => 9,
        Some(Count(n)) if (1..=1000).contains(&n) => n as usize,
        Some(_) => return Err(ApiError::invalid("max_groups", "must be 1 to 1000")),
    };
    let measure = match b.measure.as_deref() {
        None | Some("sum") => Measure::Sum,
        Some("count") => Measure::Count,
        Some(_) => return Err(ApiError::invalid("measure", "must be sum or count")),
    };
    let q = AggregateQuery {
        customer_id,
        feature_ids,
        range,
        bin_size,
        group_by,
        max_groups,
        measure,
    };
    let agg = s.engine().events_aggregate(&q).await?;
    Ok(Json(EventsAggregateResponse {
        list: agg
            .bins
            .into_iter()
            .map(|b| AggregateBinView {
                period: b.period,
                values: b.values,
                grouped_values: b.grouped,
            })
            .collect(),
        total: agg
            .totals
            .into_iter()
            .map(|(f, t)| {
                (
                    f,
                    AggregateTotalView {
                        count: t.count,
                        sum: t.sum,
                    },
                )
            })
            .collect(),
    })
    .into_response())
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct DeleteCustomerBody {
    #[schema(
        example = "alice",
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]+$"
    )]
    pub customer_id: String,
    /// Accepted and ignored (there is no Stripe here).
    pub delete_in_stripe: Option<bool>,
}

/// Deletes a customer: balances, locks, limits and due state go; its ledger
/// stays, with a `delete_customer` entry. Admin only.
#[utoipa::path(post, path = "/v1/customers.delete", request_body = DeleteCustomerBody,
    responses((status = 200, body = Success), (status = 404, body = ErrorBody)))]
pub async fn delete_customer(
    State(s): State<AppState>,
    ApiJson(b): ApiJson<DeleteCustomerBody>,
) -> Result<Response, ApiError> {
    s.engine().delete_customer(&b.customer_id).await?;
    Ok(Json(Success { success: true }).into_response())
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct DeleteBalanceBody {
    #[schema(
        example = "alice",
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]+$"
    )]
    pub customer_id: String,
    /// The balance's feature: with no `balance_id`, its one balance (of
    /// `interval`, when given).
    #[schema(example = "credits", min_length = 1, max_length = 256)]
    pub feature_id: Option<String>,
    #[schema(example = "b1", min_length = 1, max_length = 256)]
    pub balance_id: Option<String>,
    #[schema(value_type = Option<IntervalName>)]
    pub interval: Option<Interval>,
    /// Delete even when the balance was used this period.
    pub force: Option<bool>,
    /// Not supported (refused when true).
    pub recalculate_balances: Option<bool>,
    /// Not supported (refused).
    pub entity_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeleteBalanceResponse {
    pub success: bool,
    /// The deleted balance's id.
    pub balance_id: String,
}

/// Deletes one balance with no usage this period (409 `balance_in_use`
/// otherwise, unless `force: true`), with a `delete_balance` ledger entry.
/// Admin only.
#[utoipa::path(post, path = "/v1/balances.delete", request_body = DeleteBalanceBody,
    responses((status = 200, body = DeleteBalanceResponse), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_balance(
    State(s): State<AppState>,
    ApiJson(b): ApiJson<DeleteBalanceBody>,
) -> Result<Response, ApiError> {
    if b.entity_id.is_some() {
        return Err(ApiError::invalid("entity_id", "entities are not supported"));
    }
    if b.recalculate_balances == Some(true) {
        return Err(ApiError::invalid(
            "recalculate_balances",
            "is not supported",
        ));
    }
    let d = BalanceDelete {
        feature_id: b.feature_id,
        balance_id: b.balance_id,
        interval: b.interval,
        force: b.force.unwrap_or(false),
    };
    let id = s.engine().delete_balance(&b.customer_id, &d).await?;
    Ok(Json(DeleteBalanceResponse {
        success: true,
        balance_id: id,
    })
    .into_response())
}
