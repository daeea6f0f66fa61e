//! `/openapi.json`, generated from the route annotations and body types,
//! then completed by [`Completed`]: every `/v1` operation documents every
//! error status the server can answer (in the one shape `{message, code}`)
//! and the bearer security scheme, so the document and the server agree
//! (held to it by the schemathesis run in `tests/fuzz/run.sh`).

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Document, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::error::ErrorBody;
use super::events::*;
use super::gate::*;
use super::routes::*;
use super::views::*;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "creditgate",
        description = "Autumn-compatible credit and rate limiting sidecar"
    ),
    paths(
        get_or_create,
        get_customer,
        update_customer,
        attach,
        create_balance,
        update_balance,
        check,
        track,
        finalize,
        events_list,
        events_aggregate,
        delete_customer,
        delete_balance,
        gate,
        healthz,
        readyz,
        metrics
    ),
    components(schemas(
        ErrorBody,
        CustomerView,
        BillingControlsView,
        UsageAlertView,
        UsageLimitView,
        RateLimitView,
        LimitStatusView,
        BalanceView,
        BreakdownView,
        ResetView,
        RolloverView,
        DeductionView,
        CheckResponse,
        TrackResponse,
        AttachResponse,
        CreateBalanceResponse,
        Success,
        GateAllowed,
        Ready,
        FeatureIds,
        CustomRangeBody,
        EventsListResponse,
        EventView,
        EventProperties,
        EventDeductionView,
        EventsAggregateResponse,
        AggregateBinView,
        AggregateTotalView,
        DeleteBalanceResponse
    )),
    modifiers(&Completed)
)]
pub struct ApiDoc;

/// The error statuses every `/v1` route may answer, with the codes behind
/// them (see `Code::TABLE`).
const ERRORS: [(&str, &str); 9] = [
    (
        "400",
        "invalid_inputs (naming the field), insufficient_balance (track with reject), limits_unsupported (a store without limits; every engine of this build keeps them), ledger_not_configured (events.* and deletes on a store without a usage ledger: the Redis engine, for now), alerts_unsupported (billing_controls.usage_alerts, or attaching a plan with usage_alerts, on a store without alerts: the Redis engine, for now)",
    ),
    (
        "429",
        "usage_limit_reached (track with reject refused by a limit; limit_id, Retry-After)",
    ),
    ("401", "no_secret_key, invalid_secret_key"),
    (
        "404",
        "customer_not_found, feature_not_found, plan_not_found, balance_not_found, lock_not_found",
    ),
    (
        "409",
        "idempotency_key_reused, lock_already_exists, balance_already_exists, balance_in_use (balances.delete of a balance used this period, without force)",
    ),
    ("413", "payload_too_large (a body over 64 KiB)"),
    ("500", "internal_error (never a detail)"),
    (
        "503",
        "store_unavailable (not applied: retrying is safe), store_timeout (sent, no answer in time: the outcome is unknown; a retry with the same Idempotency-Key settles it)",
    ),
    (
        "507",
        "store_full (Redis out of memory under noeviction: not applied)",
    ),
];

/// The routes only admin keys may use (403 `forbidden` for an api key).
const ADMIN: [&str; 6] = [
    "/v1/billing.attach",
    "/v1/customers.delete",
    "/v1/balances.delete",
    "/v1/customers.update",
    "/v1/balances.create",
    "/v1/balances.update",
];

/// Adds the error answers and the security scheme to the generated document.
struct Completed;

impl Modify for Completed {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        let error = |what: &str| {
            ResponseBuilder::new()
                .description(what)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for (path, item) in doc.paths.paths.iter_mut() {
            if !path.starts_with("/v1/") {
                continue;
            }
            // The gate answers every method a gateway may send.
            if path == "/v1/gate" {
                if let Some(get) = item.get.clone() {
                    let with_id = |m: &str| {
                        let mut op = get.clone();
                        op.operation_id = Some(format!("gate_{m}"));
                        Some(op)
                    };
                    item.post = with_id("post");
                    item.put = with_id("put");
                    item.delete = with_id("delete");
                    item.patch = with_id("patch");
                    item.head = with_id("head");
                    item.options = with_id("options");
                    item.trace = with_id("trace");
                }
            }
            let ops = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
                &mut item.head,
                &mut item.options,
                &mut item.trace,
            ];
            for op in ops.into_iter().flatten() {
                let responses = &mut op.responses.responses;
                for (status, what) in ERRORS {
                    responses
                        .entry(status.to_string())
                        .or_insert_with(|| error(what).into());
                }
                if ADMIN.contains(&path.as_str()) {
                    responses
                        .entry("403".to_string())
                        .or_insert_with(|| error("forbidden: an api key on an admin route").into());
                }
                op.security = Some(vec![SecurityRequirement::new(
                    "bearer",
                    Vec::<String>::new(),
                )]);
            }
        }
    }
}

/// The document as JSON. `/v1/check` also answers at `/v1/balances.check`
/// and `/v1/entitled`; `/v1/track` at `/v1/balances.track` and `/v1/events`.
pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
