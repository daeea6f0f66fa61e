//! `/openapi.json`, generated from the route annotations and body types.

use axum::Json;
use utoipa::OpenApi;

use super::error::ErrorBody;
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
        attach,
        create_balance,
        update_balance,
        check,
        track,
        finalize,
        gate,
        healthz,
        readyz,
        metrics
    ),
    components(schemas(
        ErrorBody,
        CustomerView,
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
        Ready
    ))
)]
pub struct ApiDoc;

/// The document as JSON. `/v1/check` also answers at `/v1/balances.check`
/// and `/v1/entitled`; `/v1/track` at `/v1/balances.track` and `/v1/events`.
pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
