//! The sidecar on a real Redis, wired from configuration as `serve` wires it:
//! it serves, reports ready, and when Redis goes away it answers 503
//! (`store_unavailable` or `store_timeout`) within the timeout, and says
//! so on `/readyz` and `/metrics`. A Redis that cannot be reached at startup
//! is a configuration error naming the key.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::http::{call, CONFIG};
use common::redis::RedisServer;
use creditgate::config::Config;
use creditgate::http::app;
use creditgate::server::state_from_config;
use serde_json::{json, Value};

fn config(redis_url: &str, timeout_ms: u64) -> Config {
    let env = BTreeMap::from([
        ("CREDITGATE_REDIS_URL".to_string(), redis_url.to_string()),
        (
            "CREDITGATE_REDIS_TIMEOUT_MS".to_string(),
            timeout_ms.to_string(),
        ),
    ]);
    Config::parse(CONFIG, &env, 0).expect("config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_redis_and_answers_503_quickly_when_it_goes_away() {
    let server = RedisServer::shared();
    let timeout_ms = 300;
    let (state, in_process) = state_from_config(&config(&server.url(), timeout_ms))
        .await
        .unwrap();
    assert!(!in_process);
    let router = app(state);
    let c = json!({"customer_id": "outage"});
    assert_eq!(
        call(&router, "POST", "/v1/customers.get_or_create", c)
            .await
            .status,
        StatusCode::OK
    );
    let attach = json!({"customer_id": "outage", "plan_id": "pro"});
    assert_eq!(
        call(&router, "POST", "/v1/billing.attach", attach)
            .await
            .status,
        StatusCode::OK
    );
    let check =
        json!({"customer_id": "outage", "feature_id": "premium_message", "send_event": true});
    let a = call(&router, "POST", "/v1/check", check.clone()).await;
    let (status, body) = (a.status, a.json);
    assert_eq!(
        (status, body["allowed"].clone()),
        (StatusCode::OK, json!(true))
    );
    assert_eq!(body["balance"]["remaining"], json!(190));
    assert_eq!(
        call(&router, "GET", "/readyz", Value::Null).await.status,
        StatusCode::OK
    );
    assert!(
        server.cli(&["EXISTS", "cg2:{outage}"]).trim() == "1",
        "balances live in Redis"
    );

    server.stop_now();
    let started = Instant::now();
    let a = call(&router, "POST", "/v1/check", check).await;
    let (status, body) = (a.status, a.json);
    let took = started.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // A debit on a connection that just died may have been sent: unknown
    // (`store_timeout`) is the honest answer then; refused is "not applied".
    // tests/store_faults.rs tells the two apart.
    assert!(
        body["code"] == json!("store_unavailable") || body["code"] == json!("store_timeout"),
        "{body}"
    );
    // The bound is the feature: an answer within a few times the timeout.
    assert!(
        took < Duration::from_millis(6 * timeout_ms),
        "answered after {took:?}"
    );
    assert_eq!(
        call(&router, "GET", "/readyz", Value::Null).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let text = call(&router, "GET", "/metrics", Value::Null).await.text;
    assert!(!text.contains("creditgate_store_errors_total 0"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_a_redis_cluster_from_configuration() {
    let cluster = common::cluster::RedisCluster::start(3);
    let env = BTreeMap::from([(
        "CREDITGATE_REDIS_CLUSTER".to_string(),
        cluster.urls().join(","),
    )]);
    let config = Config::parse(CONFIG, &env, 0).expect("config");
    let (state, in_process) = state_from_config(&config).await.unwrap();
    assert!(!in_process);
    let router = app(state);
    for i in 0..20 {
        let c = format!("cluster-{i}");
        let attach = json!({"customer_id": c, "plan_id": "pro"});
        assert_eq!(
            call(&router, "POST", "/v1/billing.attach", attach)
                .await
                .status,
            StatusCode::OK
        );
        let track = json!({"customer_id": c, "feature_id": "premium_message", "value": 2});
        let a = call(&router, "POST", "/v1/track", track).await;
        let (status, body) = (a.status, a.json);
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["balance"]["remaining"], json!(180));
    }
    // The customers landed on more than one node, each on its slot's node.
    let nodes: std::collections::BTreeSet<u16> = (0..20)
        .map(|i| cluster.node_for(&format!("cg2:{{cluster-{i}}}")))
        .collect();
    assert!(nodes.len() > 1);
    assert_eq!(
        call(&router, "GET", "/readyz", Value::Null).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn an_unreachable_redis_at_startup_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = format!("unix://{}", dir.path().join("no.sock").display());
    let err = match state_from_config(&config(&nowhere, 200)).await {
        Err(e) => e,
        Ok(_) => panic!("connected to nothing"),
    };
    assert_eq!(err.key, "redis_url");
}
