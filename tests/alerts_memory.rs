//! Usage alerts on the in-process engine over HTTP (issue 14): an alert
//! set through `customers.update` fires once per crossing, recorded as an
//! `alert` ledger entry in the same call, and re-arms when a refund moves
//! the level back. Redis-free.

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use common::http::{config, Harness, T0};
use creditgate::http::{app, AppState, Auth};
use creditgate::ledger::LedgerOp;
use creditgate::model::Retention;
use creditgate::{ManualClock, MemoryEngine};
use serde_json::{json, Value};

/// The HTTP harness, keeping the engine to read its ledger.
fn harness() -> (Harness, Arc<MemoryEngine>) {
    let config = config();
    let clock = Arc::new(ManualClock::new(T0));
    let engine = Arc::new(MemoryEngine::new(
        config.catalog.clone(),
        clock.clone(),
        Retention::default(),
    ));
    let state = AppState::new(engine.clone(), config.catalog.clone(), clock.clone())
        .configured(&config)
        .with_auth(Auth::default());
    let router = app(state.clone());
    (
        Harness {
            clock,
            state,
            router,
        },
        engine,
    )
}

const ALERT_ID: &str = "credits:usage:150";

async fn track(h: &Harness, units: f64) {
    let a = h
        .post(
            "/v1/track",
            json!({"customer_id": "c", "feature_id": "basic_message", "value": units}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
}

fn fired(engine: &MemoryEngine) -> usize {
    engine
        .ledger_of("c")
        .iter()
        .filter(|e| e.op == LedgerOp::Alert && e.subject.as_deref() == Some(ALERT_ID))
        .count()
}

async fn update(h: &Harness, alerts: Value) -> common::http::Answer {
    h.post(
        "/v1/customers.update",
        json!({"customer_id": "c", "billing_controls": {"usage_alerts": alerts}}),
    )
    .await
}

#[tokio::test]
async fn an_alert_fires_once_per_crossing_and_re_arms_after_a_refund() {
    let (h, e) = harness();
    h.customer_on("c", "pro").await;
    let a = update(
        &h,
        json!([{"feature_id": "credits", "threshold": 150, "threshold_type": "usage"}]),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let shown = &a.json["billing_controls"]["usage_alerts"];
    assert_eq!(shown[0]["id"], ALERT_ID);
    assert_eq!(shown[0]["threshold"], json!(150));
    assert_eq!(shown[0]["threshold_type"], "usage");
    assert_eq!(shown[0]["basis"], "balance");
    assert_eq!(shown[0]["enabled"], true);
    assert_eq!(shown[0]["source"], "customer");
    let g = h
        .post("/v1/customers.get", json!({"customer_id": "c"}))
        .await;
    assert_eq!(g.json["billing_controls"]["usage_alerts"], *shown);

    track(&h, 100.0).await;
    assert_eq!(fired(&e), 0, "below the threshold");
    track(&h, 60.0).await; // usage 160 of 200: crosses 150
    assert_eq!(fired(&e), 1);
    track(&h, 20.0).await; // further use past it is silent
    assert_eq!(fired(&e), 1);
    track(&h, -50.0).await; // a refund back to usage 130 re-arms it
    assert_eq!(fired(&e), 1);
    track(&h, 30.0).await; // usage 160 again: the next crossing
    assert_eq!(fired(&e), 2);

    // Re-sending the same list keeps it disarmed: no second fire.
    let a = update(
        &h,
        json!([{"feature_id": "credits", "threshold": 150, "threshold_type": "usage"}]),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    track(&h, 1.0).await;
    assert_eq!(fired(&e), 2);
}

#[tokio::test]
async fn bad_alerts_answer_400_naming_the_field_and_store_nothing() {
    let (h, _) = harness();
    h.customer_on("c", "pro").await;
    let cases = [
        (
            json!([{"feature_id": "credits", "threshold": 150, "threshold_type": "sometimes"}]),
            "billing_controls.usage_alerts.threshold_type",
        ),
        (
            json!([{"feature_id": "nope", "threshold": 150, "threshold_type": "usage"}]),
            "billing_controls.usage_alerts.feature_id",
        ),
        (
            json!([{"feature_id": "credits", "threshold": 150, "threshold_type": "usage_percentage"}]),
            "billing_controls.usage_alerts.threshold",
        ),
        (
            json!([{"threshold": 150, "threshold_type": "usage"}]),
            "billing_controls.usage_alerts.feature_id",
        ),
        (
            json!([
                {"feature_id": "credits", "threshold": 150, "threshold_type": "usage"},
                {"feature_id": "credits", "threshold": 150, "threshold_type": "usage"}
            ]),
            "billing_controls.usage_alerts.name",
        ),
    ];
    for (alerts, field) in cases {
        let a = h
            .post(
                "/v1/customers.update",
                json!({"customer_id": "c", "billing_controls": {
                    "usage_alerts": alerts,
                    "usage_limits": [{"feature_id": "premium_message", "limit": 5, "interval": "day"}]
                }}),
            )
            .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.text);
        assert_eq!(a.code(), "invalid_inputs", "{}", a.text);
        assert!(a.text.contains(field), "{field}: {}", a.text);
        let g = h
            .post("/v1/customers.get", json!({"customer_id": "c"}))
            .await;
        assert_eq!(g.json["billing_controls"]["usage_alerts"], json!([]));
        assert_eq!(
            g.json["billing_controls"]["usage_limits"],
            json!([]),
            "nothing stored"
        );
    }
}
