//! The HTTP tests' harness: the example configuration on a MemoryEngine
//! (or any engine) with a ManualClock, and the one request helper, over
//! `oneshot`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use creditgate::config::Config;
use creditgate::http::{app, AppState, Auth};
use creditgate::model::Retention;
use creditgate::{ManualClock, MemoryEngine};
use serde_json::Value;
use tower::ServiceExt;

/// Every HTTP test starts at the scenarios' epoch, 2027-01-01T00:00Z.
pub const T0: i64 = 1_798_761_600_000;

/// The one catalog fixture: the example configuration.
pub const CONFIG: &str = include_str!("../../examples/creditgate.toml");

pub struct Harness {
    pub clock: Arc<ManualClock>,
    pub state: AppState,
    pub router: Router,
}

pub fn config() -> Config {
    Config::parse(CONFIG, &BTreeMap::new(), T0).expect("test config")
}

pub fn harness() -> Harness {
    harness_with(Auth::default())
}

pub fn harness_with(auth: Auth) -> Harness {
    harness_from(config(), auth)
}

/// A harness over `config`: the in-process engine on a ManualClock at T0.
pub fn harness_from(config: Config, auth: Auth) -> Harness {
    let clock = Arc::new(ManualClock::new(T0));
    let engine = Arc::new(MemoryEngine::new(
        config.catalog.clone(),
        clock.clone(),
        Retention::default(),
    ));
    let state = AppState::new(engine, config.catalog.clone(), clock.clone())
        .configured(&config)
        .with_auth(auth);
    let router = app(state.clone());
    Harness {
        clock,
        state,
        router,
    }
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub text: String,
    pub json: Value,
}

impl Answer {
    pub fn code(&self) -> &str {
        self.json["code"].as_str().unwrap_or("")
    }
    pub fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }
}

/// The one request helper: sends `req` to `router` and reads the answer.
pub async fn send(router: &Router, req: Request<Body>) -> Answer {
    let resp = router.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        text,
        json,
    }
}

/// `method path` with a JSON body (none for `Value::Null`).
pub async fn call(router: &Router, method: &str, path: &str, body: Value) -> Answer {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    let body = match body {
        Value::Null => Body::empty(),
        v => Body::from(v.to_string()),
    };
    send(router, req.body(body).unwrap()).await
}

/// A keyed debit of one `action1` (the `Idempotency-Key` header).
pub async fn track_keyed(router: &Router, customer: &str, key: &str) -> Answer {
    let req = Request::post("/v1/track")
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(Body::from(
            serde_json::json!({ "customer_id": customer, "feature_id": "action1", "value": 1 })
                .to_string(),
        ))
        .unwrap();
    send(router, req).await
}

impl Harness {
    pub async fn send(&self, req: Request<Body>) -> Answer {
        send(&self.router, req).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.post_with(path, &body.to_string(), &[]).await
    }

    pub async fn post_with(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> Answer {
        let mut req = Request::post(path).header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req.body(Body::from(body.to_string())).unwrap())
            .await
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(Request::get(path).body(Body::empty()).unwrap())
            .await
    }

    /// Creates `customer` and attaches `plan`.
    pub async fn customer_on(&self, customer: &str, plan: &str) {
        let a = self
            .post(
                "/v1/customers.get_or_create",
                serde_json::json!({ "customer_id": customer }),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        let a = self
            .post(
                "/v1/billing.attach",
                serde_json::json!({ "customer_id": customer, "plan_id": plan }),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    }

    pub async fn remaining(&self, customer: &str, pool: &str) -> Value {
        let a = self
            .post(
                "/v1/customers.get",
                serde_json::json!({ "customer_id": customer }),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        a.json["balances"][pool]["remaining"].clone()
    }
}
