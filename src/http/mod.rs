//! The Autumn-compatible HTTP API over any [`Engine`].
//!
//! [`app`] builds the router from an [`AppState`]; tests drive it directly
//! with `tower::ServiceExt::oneshot`, and [`crate::server::run`] serves it.

pub mod error;
pub mod events;
pub mod gate;
pub mod json;
pub mod openapi;
pub mod routes;
pub mod serve;
pub mod store_error;
pub mod views;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, on, post};
use axum::Router;

use crate::clock::Clock;
use crate::config::{Config, DeployEnv, GateConfig};
use crate::engine::{AlwaysReady, Engine, LockIndex, Readiness};
use crate::error::Code;
use crate::ledger::drain::DrainStatus;
use crate::metrics::Metrics;
use crate::model::{Catalog, Plan, StoreErrorPolicy};
use crate::service::Service;

pub use error::ApiError;

/// Bearer keys. Both lists empty: no authentication.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    pub api_keys: Vec<String>,
    pub admin_keys: Vec<String>,
}

/// Who a key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Api,
    Admin,
}

impl Auth {
    pub fn is_open(&self) -> bool {
        self.api_keys.is_empty() && self.admin_keys.is_empty()
    }

    fn role(&self, key: &str) -> Option<Role> {
        // Every key is compared in full, so timing tells nothing about which matched.
        let admin = self
            .admin_keys
            .iter()
            .fold(false, |acc, k| acc | ct_eq(k.as_bytes(), key.as_bytes()));
        let api = self
            .api_keys
            .iter()
            .fold(false, |acc, k| acc | ct_eq(k.as_bytes(), key.as_bytes()));
        if admin {
            Some(Role::Admin)
        } else if api {
            Some(Role::Api)
        } else {
            None
        }
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Everything a request needs, behind one `Arc`: axum clones the state for
/// every middleware and handler a request passes, and one reference count is
/// cheaper than six (the profile of a consuming check showed the drops).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The state's parts: the service (engine, catalog, plans, clock, lock index)
/// and what only HTTP uses.
#[derive(Clone)]
pub struct Shared {
    pub service: Arc<Service>,
    pub auth: Arc<Auth>,
    pub readiness: Arc<dyn Readiness>,
    pub metrics: Arc<Metrics>,
    pub env: DeployEnv,
    /// The forward-auth gate's settings.
    pub gate: Arc<GateConfig>,
    /// What decisions answer when the store fails (a feature may override).
    pub on_store_error: StoreErrorPolicy,
    /// The ledger drain this process runs (Redis with `[ledger] url`), for
    /// `/readyz` and `/metrics`.
    pub ledger_drain: Option<Arc<DrainStatus>>,
}

impl AppState {
    /// A state over `engine` with no plans, no authentication, the in-memory
    /// lock index and always ready. `catalog` must be the engine's.
    pub fn new(engine: Arc<dyn Engine>, catalog: Arc<Catalog>, clock: Arc<dyn Clock>) -> AppState {
        AppState(Arc::new(Shared {
            service: Arc::new(Service::new(engine, catalog, clock)),
            auth: Arc::new(Auth::default()),
            readiness: Arc::new(AlwaysReady),
            metrics: Arc::new(Metrics::new(ROUTES)),
            env: DeployEnv::Live,
            gate: Arc::new(GateConfig::default()),
            on_store_error: StoreErrorPolicy::Deny,
            ledger_drain: None,
        }))
    }

    /// The parts, for the builder methods below (before the state is shared).
    fn parts_mut(&mut self) -> &mut Shared {
        Arc::make_mut(&mut self.0)
    }

    fn service_mut(&mut self) -> &mut Service {
        Arc::make_mut(&mut self.parts_mut().service)
    }

    /// Takes plans, keys, env and retention from a configuration.
    pub fn configured(mut self, config: &Config) -> AppState {
        let service = self.service_mut();
        service.plans = Arc::new(config.plans.clone());
        service.lock_retention_ms = (config.idempotency_ttl_secs as i64).saturating_mul(1000);
        self.parts_mut().auth = Arc::new(Auth {
            api_keys: config.api_keys.clone(),
            admin_keys: config.admin_keys.clone(),
        });
        self.parts_mut().env = config.env;
        self.parts_mut().gate = Arc::new(config.gate.clone());
        self.parts_mut().on_store_error = config.on_store_error;
        self
    }

    pub fn with_gate(mut self, gate: GateConfig) -> AppState {
        self.parts_mut().gate = Arc::new(gate);
        self
    }

    pub fn with_plans(mut self, plans: Vec<Plan>) -> AppState {
        self.service_mut().plans = Arc::new(plans);
        self
    }

    pub fn with_auth(mut self, auth: Auth) -> AppState {
        self.parts_mut().auth = Arc::new(auth);
        self
    }

    pub fn with_lock_index(mut self, index: Arc<dyn LockIndex>) -> AppState {
        self.service_mut().lock_index = index;
        self
    }

    pub fn with_ledger_drain(mut self, status: Arc<DrainStatus>) -> AppState {
        self.parts_mut().ledger_drain = Some(status);
        self
    }

    pub fn with_readiness(mut self, readiness: Arc<dyn Readiness>) -> AppState {
        self.parts_mut().readiness = readiness;
        self
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.service.engine
    }
}

/// Every path [`app`] routes, so [`Metrics`] can register each one's handles
/// up front (a test holds this list to the router's).
pub const ROUTES: &[&str] = &[
    "/v1/billing.attach",
    "/v1/balances.create",
    "/v1/balances.update",
    "/v1/customers.update",
    "/v1/customers.delete",
    "/v1/balances.delete",
    "/v1/customers.get_or_create",
    "/v1/customers.get",
    "/v1/balances.check",
    "/v1/check",
    "/v1/entitled",
    "/v1/balances.track",
    "/v1/track",
    "/v1/events",
    "/v1/balances.finalize",
    "/v1/events.list",
    "/v1/events.aggregate",
    "/v1/gate",
    "/v1/gate/{*path}",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
];

/// The router: the application routes behind bearer auth (api or admin
/// keys), the admin routes behind their own layer (admin keys only), plus
/// health, readiness, metrics and the OpenAPI document.
pub fn app(state: AppState) -> Router {
    let admin = Router::new()
        .route("/v1/billing.attach", post(routes::attach))
        .route("/v1/balances.create", post(routes::create_balance))
        .route("/v1/balances.update", post(routes::update_balance))
        .route("/v1/customers.update", post(routes::update_customer))
        .route("/v1/customers.delete", post(events::delete_customer))
        .route("/v1/balances.delete", post(events::delete_balance))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    let application = Router::new()
        .route("/v1/customers.get_or_create", post(routes::get_or_create))
        .route("/v1/customers.get", post(routes::get_customer))
        .route("/v1/balances.check", post(routes::check))
        .route("/v1/check", post(routes::check))
        .route("/v1/entitled", post(routes::check))
        .route("/v1/balances.track", post(routes::track))
        .route("/v1/track", post(routes::track))
        .route("/v1/events", post(routes::track))
        .route("/v1/balances.finalize", post(routes::finalize))
        .route("/v1/events.list", post(events::events_list))
        .route("/v1/events.aggregate", post(events::events_aggregate))
        .route("/v1/gate", on(gate::METHODS, gate::gate))
        .route("/v1/gate/{*path}", on(gate::METHODS, gate::gate))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(admin)
        .merge(application)
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(openapi::serve))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                ApiError::Internal(crate::error::Cause::msg("handler panicked")).into_response()
            },
        ))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found(Code::NotFound, "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// The role of the request's bearer key; `Ok(None)` when authentication is
/// off (both key lists empty).
fn caller(s: &AppState, req: &Request) -> Result<Option<Role>, ApiError> {
    if s.auth.is_open() {
        return Ok(None);
    }
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(header) = header.map(str::trim).filter(|h| !h.is_empty()) else {
        return Err(ApiError::NoSecretKey);
    };
    let key = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .unwrap_or(header)
        .trim();
    s.auth.role(key).map(Some).ok_or(ApiError::InvalidSecretKey)
}

/// Application routes: any api or admin key.
async fn require_key(State(s): State<AppState>, req: Request, next: Next) -> Response {
    match caller(&s, &req) {
        Ok(_) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Admin routes: admin keys only.
async fn require_admin(State(s): State<AppState>, req: Request, next: Next) -> Response {
    match caller(&s, &req) {
        Ok(None | Some(Role::Admin)) => next.run(req).await,
        Ok(Some(Role::Api)) => ApiError::Forbidden.into_response(),
        Err(e) => e.into_response(),
    }
}
/// One debug line per request, the latency histogram, decisions and store
/// errors, through handles registered up front (no allocation). Never logs a
/// key or a body.
async fn observe(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map(MatchedPath::as_str);
    let m = s.metrics.route(route);
    debug_assert!(
        route.is_none_or(|r| s.metrics.knows(r)),
        "{route:?} is missing from http::ROUTES"
    );
    let method = req.method().clone();
    let start = Instant::now();
    let resp = next.run(req).await;
    let elapsed = start.elapsed();
    m.latency(elapsed);
    if let Some(d) = resp.extensions().get::<crate::metrics::Decision>() {
        m.decision(d.0);
    } else if !resp.status().is_success() {
        m.decision("error");
    }
    if resp.extensions().get::<error::StoreErrorMark>().is_some() {
        s.metrics.store_error();
    }
    let route = route.unwrap_or(crate::metrics::UNMATCHED);
    tracing::debug!(%method, route, status = resp.status().as_u16(), micros = elapsed.as_micros() as u64, "request");
    resp
}

#[cfg(test)]
mod tests {
    /// [`super::ROUTES`] is the router's list of paths: every `.route("…"`
    /// in this file is in it, and nothing else.
    #[test]
    fn routes_lists_every_path_the_router_serves() {
        let source = include_str!("mod.rs");
        let code = &source[..source.find("#[cfg(test)]").unwrap()];
        let mut routed: Vec<&str> = code
            .split(".route(\"")
            .skip(1)
            .map(|rest| &rest[..rest.find('"').unwrap()])
            .collect();
        routed.sort_unstable();
        let mut listed = super::ROUTES.to_vec();
        listed.sort_unstable();
        assert_eq!(routed, listed);
    }
}
