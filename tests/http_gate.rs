//! `/v1/gate` over the in-process engine and a ManualClock, through the router:
//! exact status, body and rate-limit headers.

mod common;

use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use common::http::*;
use creditgate::config::Config;
use creditgate::http::Auth;
use serde_json::json;

const DAY_S: i64 = 24 * 3600;
/// The seed plan attached at T0 (2027-01-01) resets on 2027-02-01.
const FEB_1_S: i64 = 31 * DAY_S;

const GATE: &str = r#"
[gate]
routes = [
  { prefix = "/chat", feature = "basic_message" },
  { prefix = "/chat/premium", feature = "premium_message" },
  { prefix = "/bulk", feature = "basic_message", cost = 3 },
]
"#;

fn gate_harness(gate: &str, auth: Auth) -> Harness {
    let config = Config::parse(&format!("{CONFIG}\n{gate}"), &BTreeMap::new(), T0).unwrap();
    harness_from(config, auth)
}

async fn gate_req(h: &Harness, method: Method, headers: &[(&str, &str)]) -> Answer {
    let mut req = Request::builder().method(method).uri("/v1/gate");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    h.send(req.body(Body::empty()).unwrap()).await
}

async fn gate(h: &Harness, headers: &[(&str, &str)]) -> Answer {
    gate_req(h, Method::GET, headers).await
}

fn hdr(a: &Answer, name: &str) -> Option<String> {
    a.headers.get(name).map(|v| v.to_str().unwrap().to_string())
}

/// The five rate-limit headers and Retry-After, as sent.
fn limits(a: &Answer) -> [Option<String>; 6] {
    [
        "ratelimit-policy",
        "ratelimit",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "retry-after",
    ]
    .map(|n| hdr(a, n))
}

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

const ALICE_PREMIUM: &[(&str, &str)] = &[
    ("x-customer-id", "alice"),
    ("x-feature-id", "premium_message"),
];

#[tokio::test]
async fn allowed_then_denied_with_exact_headers_then_allowed_after_the_reset() {
    let h = gate_harness(GATE, Auth::default());
    h.customer_on("alice", "pro").await;

    let a = gate(&h, ALICE_PREMIUM).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(
        a.json,
        json!({"allowed": true, "customer_id": "alice", "feature_id": "premium_message", "cost": 1})
    );
    assert_eq!(
        limits(&a),
        [
            s("\"credits\";q=200;w=2592000"),
            s(&format!("\"credits\";r=190;t={FEB_1_S}")),
            s("200"),
            s("190"),
            s(&FEB_1_S.to_string()),
            None,
        ]
    );
    assert_eq!(h.remaining("alice", "credits").await, json!(190));

    // An hour and a half later (t rounds up to whole seconds), 18 more.
    h.clock.advance(5_400_000 - 500);
    for _ in 0..18 {
        assert_eq!(gate(&h, ALICE_PREMIUM).await.status, StatusCode::OK);
    }
    let a = gate(&h, ALICE_PREMIUM).await;
    assert_eq!(a.status, StatusCode::OK);
    let t = FEB_1_S - 5_400 + 1;
    assert_eq!(hdr(&a, "ratelimit"), s(&format!("\"credits\";r=0;t={t}")));
    assert_eq!(h.remaining("alice", "credits").await, json!(0));

    let a = gate(&h, ALICE_PREMIUM).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.text);
    assert_eq!(
        a.json,
        json!({"message": "insufficient balance", "code": "insufficient_balance"})
    );
    assert_eq!(
        limits(&a),
        [
            s("\"credits\";q=200;w=2592000"),
            s(&format!("\"credits\";r=0;t={t}")),
            s("200"),
            s("0"),
            s(&t.to_string()),
            s(&t.to_string()),
        ]
    );
    assert_eq!(h.remaining("alice", "credits").await, json!(0));

    // At the reset the request goes through again.
    h.clock.set(T0 + FEB_1_S * 1000);
    let a = gate(&h, ALICE_PREMIUM).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    // February has 28 days.
    assert_eq!(
        hdr(&a, "ratelimit"),
        s(&format!("\"credits\";r=190;t={}", 28 * DAY_S))
    );
}

#[tokio::test]
async fn retry_after_is_the_first_reset_that_covers_the_cost_in_credits() {
    let h = gate_harness(GATE, Auth::default());
    h.post(
        "/v1/customers.get_or_create",
        json!({"customer_id": "carol"}),
    )
    .await;
    // 5 credits a day and 100 a month, both drained.
    for (id, n, interval) in [("daily", 5, "day"), ("monthly", 100, "month")] {
        let a = h
            .post(
                "/v1/balances.create",
                json!({"customer_id": "carol", "feature_id": "credits", "balance_id": id,
                       "included_grant": n, "reset": {"interval": interval}}),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    }
    let a = h
        .post(
            "/v1/balances.track",
            json!({"customer_id": "carol", "feature_id": "credits", "value": 105}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    h.clock.advance(1_000);

    // A premium message costs 10 credits: the daily reset (5) is not enough.
    let a = gate(
        &h,
        &[
            ("x-customer-id", "carol"),
            ("x-feature-id", "premium_message"),
        ],
    )
    .await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(hdr(&a, "retry-after"), s(&(FEB_1_S - 1).to_string()));
    // The pool's own next reset is the daily one.
    assert_eq!(
        hdr(&a, "ratelimit"),
        s(&format!("\"credits\";r=0;t={}", DAY_S - 1))
    );
    assert_eq!(hdr(&a, "ratelimit-policy"), s("\"credits\";q=105;w=86400"));
    // A basic message (1 credit) is let through by tomorrow's reset.
    let a = gate(
        &h,
        &[
            ("x-customer-id", "carol"),
            ("x-feature-id", "basic_message"),
        ],
    )
    .await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(hdr(&a, "retry-after"), s(&(DAY_S - 1).to_string()));
    // Six basic messages need 6 credits: the daily 5 are not enough.
    let a = gate(
        &h,
        &[
            ("x-customer-id", "carol"),
            ("x-feature-id", "basic_message"),
            ("x-cost", "6"),
        ],
    )
    .await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        hdr(&a, "retry-after"),
        s(&(DAY_S - 1).to_string()),
        "X-Cost is not trusted"
    );

    // Fractional costs: action1 costs 0.2 ai_credits; 1 credit a day, drained.
    h.post(
        "/v1/balances.create",
        json!({"customer_id": "carol", "feature_id": "ai_credits", "included_grant": 1,
               "reset": {"interval": "day"}}),
    )
    .await;
    for _ in 0..5 {
        let a = gate(
            &h,
            &[("x-customer-id", "carol"), ("x-feature-id", "action1")],
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    }
    let a = gate(
        &h,
        &[("x-customer-id", "carol"), ("x-feature-id", "action1")],
    )
    .await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(hdr(&a, "retry-after"), s(&DAY_S.to_string()));
    assert_eq!(
        hdr(&a, "ratelimit"),
        s(&format!("\"ai_credits\";r=0;t={DAY_S}"))
    );
}

/// A bucket carrying debt does not hold its grant after the first reset:
/// Retry-After names the reset that really lets the request through.
#[tokio::test]
async fn retry_after_is_never_early_for_a_bucket_carrying_debt() {
    let gate_50 = r#"
[gate]
routes = [{ prefix = "/big", feature = "api_call", cost = 50 }]
"#;
    let h = gate_harness(gate_50, Auth::default());
    h.post(
        "/v1/customers.get_or_create",
        json!({"customer_id": "erin"}),
    )
    .await;
    let a = h
        .post(
            "/v1/balances.create",
            json!({"customer_id": "erin", "feature_id": "api_call", "included_grant": 100,
                   "reset": {"interval": "month"}, "overage_allowed": true,
                   "overage_floor": -10, "carry_debt": true}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let a = h
        .post(
            "/v1/track",
            json!({"customer_id": "erin", "feature_id": "api_call", "value": 190,
                   "overage_behavior": "overflow"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let a = gate(&h, &[("x-customer-id", "erin"), ("x-original-uri", "/big")]).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    // -90 + 100 = 10 after Feb 1 (still short of 50); 100 after Mar 1.
    let mar_1_s = FEB_1_S + 28 * DAY_S;
    assert_eq!(hdr(&a, "retry-after"), s(&mar_1_s.to_string()));
    h.clock.set(T0 + FEB_1_S * 1000);
    let a = gate(&h, &[("x-customer-id", "erin"), ("x-original-uri", "/big")]).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(hdr(&a, "retry-after"), s(&(28 * DAY_S).to_string()));
    h.clock.set(T0 + mar_1_s * 1000);
    let a = gate(&h, &[("x-customer-id", "erin"), ("x-original-uri", "/big")]).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
}

#[tokio::test]
async fn no_retry_after_when_no_reset_will_help() {
    let h = gate_harness(GATE, Auth::default());
    h.post("/v1/customers.get_or_create", json!({"customer_id": "dan"}))
        .await;
    // A one-off grant of 15 credits: never resets.
    let a = h
        .post(
            "/v1/balances.create",
            json!({"customer_id": "dan", "feature_id": "credits", "included_grant": 15}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let premium = &[
        ("x-customer-id", "dan"),
        ("x-feature-id", "premium_message"),
    ];
    let a = gate(&h, premium).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        limits(&a),
        [
            s("\"credits\";q=15"),
            s("\"credits\";r=5"),
            s("15"),
            s("5"),
            None,
            None
        ]
    );
    let a = gate(&h, premium).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        limits(&a),
        [
            s("\"credits\";q=15"),
            s("\"credits\";r=5"),
            s("15"),
            s("5"),
            None,
            None
        ]
    );
    assert_eq!(h.remaining("dan", "credits").await, json!(5));
    // A feature the customer owns no pool for: denied, quota 0.
    let a = gate(&h, &[("x-customer-id", "dan"), ("x-feature-id", "action2")]).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(a.code(), "insufficient_balance");
    assert_eq!(
        limits(&a),
        [
            s("\"action2\";q=0"),
            s("\"action2\";r=0"),
            s("0"),
            s("0"),
            None,
            None
        ]
    );
}

#[tokio::test]
async fn no_retry_after_when_even_a_full_reset_cannot_cover_the_cost() {
    let h = gate_harness("[gate]\ntrust_cost_header = true", Auth::default());
    h.customer_on("erin", "pro").await;
    // 21 premium messages = 210 credits, more than the plan's 200 a month.
    let a = gate(
        &h,
        &[
            ("x-customer-id", "erin"),
            ("x-feature-id", "premium_message"),
            ("x-cost", "21"),
        ],
    )
    .await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        limits(&a),
        [
            s("\"credits\";q=200;w=2592000"),
            s(&format!("\"credits\";r=200;t={FEB_1_S}")),
            s("200"),
            s("200"),
            s(&FEB_1_S.to_string()),
            None
        ]
    );
    // 20 fit exactly.
    let a = gate(
        &h,
        &[
            ("x-customer-id", "erin"),
            ("x-feature-id", "premium_message"),
            ("x-cost", "20"),
        ],
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(h.remaining("erin", "credits").await, json!(0));
}

#[tokio::test]
async fn unknown_customer_is_denied_with_customer_not_found() {
    let h = gate_harness("[gate]\ndeny_status = 403", Auth::default());
    let a = gate(
        &h,
        &[
            ("x-customer-id", "ghost"),
            ("x-feature-id", "basic_message"),
        ],
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(
        a.json,
        json!({"message": "customer not found", "code": "customer_not_found"})
    );
    assert_eq!(
        limits(&a),
        [
            s("\"basic_message\";q=0"),
            s("\"basic_message\";r=0"),
            s("0"),
            s("0"),
            None,
            None
        ]
    );
    // The gate does not create customers.
    let c = h
        .post("/v1/customers.get", json!({"customer_id": "ghost"}))
        .await;
    assert_eq!(c.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn missing_or_malformed_headers_are_invalid_inputs() {
    let h = gate_harness(GATE, Auth::default());
    h.customer_on("alice", "pro").await;
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("x-feature-id", "basic_message")], "X-Customer-Id"),
        (
            &[("x-customer-id", ""), ("x-feature-id", "basic_message")],
            "x-customer-id",
        ),
        (&[("x-customer-id", "alice")], "x-feature-id"),
        (
            &[("x-customer-id", "alice"), ("x-feature-id", "nope")],
            "unknown feature",
        ),
        (
            &[("x-customer-id", "alice"), ("x-original-uri", "/unpriced")],
            "no [gate] route",
        ),
        (
            &[("x-customer-id", "alice"), ("x-original-uri", "/chat%zz")],
            "x-original-uri",
        ),
    ];
    for (headers, needle) in cases {
        let a = gate(&h, headers).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{headers:?}: {}", a.text);
        assert_eq!(a.code(), "invalid_inputs");
        assert!(
            a.json["message"]
                .as_str()
                .unwrap()
                .to_lowercase()
                .contains(&needle.to_lowercase()),
            "{headers:?}: {}",
            a.text
        );
        assert!(hdr(&a, "ratelimit").is_none());
    }
    // Non-ASCII bytes in a header.
    let req = Request::get("/v1/gate")
        .header(
            "x-customer-id",
            axum::http::HeaderValue::from_bytes(b"al\xffce").unwrap(),
        )
        .header("x-feature-id", "basic_message")
        .body(Body::empty())
        .unwrap();
    let a = h.send(req).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.code(), "invalid_inputs");
    assert_eq!(h.remaining("alice", "credits").await, json!(200));
}

#[tokio::test]
async fn route_table_longest_prefix_wins_and_the_feature_header_overrides_it() {
    let h = gate_harness(GATE, Auth::default());
    h.customer_on("alice", "pro").await;
    let mut left = 200;
    for (uri, credits) in [
        ("/chat/premium/stream?x=1", 10),
        ("/chat/basic", 1),
        ("/chat", 1),
        ("/chat/./premium", 10),
        ("/chat//premium", 10),
        ("/x/../chat/%70remium", 10),
        ("/bulk/import", 3),
    ] {
        let a = gate(&h, &[("x-customer-id", "alice"), ("x-original-uri", uri)]).await;
        assert_eq!(a.status, StatusCode::OK, "{uri}: {}", a.text);
        left -= credits;
        assert_eq!(h.remaining("alice", "credits").await, json!(left), "{uri}");
    }
    let a = gate(
        &h,
        &[("x-customer-id", "alice"), ("x-original-uri", "/bulk")],
    )
    .await;
    assert_eq!(a.json["cost"], json!(3));
    assert_eq!(a.json["feature_id"], "basic_message");
    left -= 3;
    // X-Feature-Id wins over the route; the cost is then 1.
    let a = gate(
        &h,
        &[
            ("x-customer-id", "alice"),
            ("x-feature-id", "basic_message"),
            ("x-original-uri", "/chat/premium"),
        ],
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    left -= 1;
    assert_eq!(h.remaining("alice", "credits").await, json!(left));
}

#[tokio::test]
async fn x_cost_is_honoured_only_when_trusted_and_then_must_be_positive() {
    let untrusted = gate_harness(GATE, Auth::default());
    untrusted.customer_on("alice", "pro").await;
    let a = gate(
        &untrusted,
        &[
            ("x-customer-id", "alice"),
            ("x-feature-id", "basic_message"),
            ("x-cost", "7"),
        ],
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json["cost"], json!(1));
    assert_eq!(untrusted.remaining("alice", "credits").await, json!(199));
    // Even a malformed X-Cost is ignored when not trusted.
    let a = gate(
        &untrusted,
        &[
            ("x-customer-id", "alice"),
            ("x-feature-id", "basic_message"),
            ("x-cost", "-3"),
        ],
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(untrusted.remaining("alice", "credits").await, json!(198));

    let trusted = gate_harness(
        "[gate]\ntrust_cost_header = true\ncost_header = \"X-Units\"\nroutes = [{ prefix = \"/p\", feature = \"premium_message\", cost = 2 }]",
        Auth::default(),
    );
    trusted.customer_on("alice", "pro").await;
    let a = gate(
        &trusted,
        &[
            ("x-customer-id", "alice"),
            ("x-feature-id", "basic_message"),
            ("x-units", "7.5"),
        ],
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json["cost"], json!(7.5));
    assert_eq!(trusted.remaining("alice", "credits").await, json!(192.5));
    // X-Units overrides the route's cost: 1 premium message = 10 credits.
    let a = gate(
        &trusted,
        &[
            ("x-customer-id", "alice"),
            ("x-original-uri", "/p"),
            ("x-units", "1"),
        ],
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(trusted.remaining("alice", "credits").await, json!(182.5));
    // Without it, the route's cost: 2 premium messages.
    let a = gate(
        &trusted,
        &[("x-customer-id", "alice"), ("x-original-uri", "/p")],
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        hdr(&a, "ratelimit"),
        s(&format!("\"credits\";r=162;t={FEB_1_S}")),
        "162.5 rounds down"
    );
    for bad in ["0", "-1", "abc", "0.00001"] {
        let a = gate(
            &trusted,
            &[
                ("x-customer-id", "alice"),
                ("x-feature-id", "basic_message"),
                ("x-units", bad),
            ],
        )
        .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{bad}: {}", a.text);
        assert_eq!(a.code(), "invalid_inputs");
        assert!(a.json["message"].as_str().unwrap().contains("x-units"));
    }
    assert_eq!(trusted.remaining("alice", "credits").await, json!(162.5));
}

#[tokio::test]
async fn an_idempotent_repeat_answers_the_original_and_charges_nothing() {
    let h = gate_harness(GATE, Auth::default());
    h.customer_on("alice", "pro").await;
    let keyed = [
        ("x-customer-id", "alice"),
        ("x-feature-id", "premium_message"),
        ("idempotency-key", "req-1"),
    ];
    let first = gate(&h, &keyed).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(hdr(&first, "idempotent-replayed"), None);
    let again = gate_req(&h, Method::POST, &keyed).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(hdr(&again, "idempotent-replayed"), s("true"));
    assert_eq!(
        hdr(&again, "ratelimit"),
        s(&format!("\"credits\";r=190;t={FEB_1_S}"))
    );
    assert_eq!(h.remaining("alice", "credits").await, json!(190));
    // The same key for a different request.
    let other = gate(
        &h,
        &[
            ("x-customer-id", "alice"),
            ("x-feature-id", "basic_message"),
            ("idempotency-key", "req-1"),
        ],
    )
    .await;
    assert_eq!(other.status, StatusCode::CONFLICT);
    assert_eq!(other.code(), "idempotency_key_reused");
    assert_eq!(h.remaining("alice", "credits").await, json!(190));

    // A denial replays as a denial.
    h.post(
        "/v1/balances.update",
        json!({"customer_id": "alice", "feature_id": "credits", "remaining": 3}),
    )
    .await;
    let keyed = [
        ("x-customer-id", "alice"),
        ("x-feature-id", "premium_message"),
        ("idempotency-key", "req-2"),
    ];
    assert_eq!(gate(&h, &keyed).await.status, StatusCode::TOO_MANY_REQUESTS);
    h.post(
        "/v1/balances.update",
        json!({"customer_id": "alice", "feature_id": "credits", "remaining": 50}),
    )
    .await;
    let a = gate(&h, &keyed).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(hdr(&a, "idempotent-replayed"), s("true"));
    assert_eq!(h.remaining("alice", "credits").await, json!(50));
}

#[tokio::test]
async fn the_gate_is_an_application_route_answering_every_method() {
    let auth = Auth {
        api_keys: vec!["sk_app".into()],
        admin_keys: vec!["sk_admin".into()],
    };
    let h = gate_harness(GATE, auth);
    let admin = [("authorization", "Bearer sk_admin")];
    for (path, body) in [
        (
            "/v1/customers.get_or_create",
            json!({"customer_id": "alice"}),
        ),
        (
            "/v1/billing.attach",
            json!({"customer_id": "alice", "plan_id": "pro"}),
        ),
    ] {
        let a = h.post_with(path, &body.to_string(), &admin).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    }
    let no_key = gate(&h, ALICE_PREMIUM).await;
    assert_eq!(no_key.status, StatusCode::UNAUTHORIZED);
    assert_eq!(no_key.code(), "no_secret_key");
    let bad_key = gate(
        &h,
        &[
            ("authorization", "Bearer nope"),
            ("x-customer-id", "alice"),
            ("x-feature-id", "premium_message"),
        ],
    )
    .await;
    assert_eq!(bad_key.status, StatusCode::UNAUTHORIZED);
    assert_eq!(bad_key.code(), "invalid_secret_key");
    let mut left = 200;
    for (key, method) in [
        ("Bearer sk_app", Method::GET),
        ("Bearer sk_app", Method::POST),
        ("Bearer sk_app", Method::DELETE),
        ("Bearer sk_app", Method::HEAD),
        ("Bearer sk_admin", Method::PUT),
    ] {
        let a = gate_req(
            &h,
            method.clone(),
            &[
                ("authorization", key),
                ("x-customer-id", "alice"),
                ("x-feature-id", "premium_message"),
            ],
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{method}: {}", a.text);
        left -= 10;
        assert_eq!(
            hdr(&a, "x-ratelimit-remaining"),
            s(&left.to_string()),
            "{method}"
        );
    }
}

#[tokio::test]
async fn custom_header_names_and_deny_status() {
    let h = gate_harness(
        "[gate]\ncustomer_header = \"X-Account\"\nfeature_header = \"X-Meter\"\nuri_header = \"X-Forwarded-Uri\"\ndeny_status = 402\nroutes = [{ prefix = \"/\", feature = \"premium_message\" }]",
        Auth::default(),
    );
    h.customer_on("alice", "pro").await;
    let a = gate(&h, ALICE_PREMIUM).await;
    assert_eq!(
        a.status,
        StatusCode::BAD_REQUEST,
        "the default names are not read"
    );
    assert!(a.text.contains("x-account"), "{}", a.text);
    let a = gate(&h, &[("x-account", "alice"), ("x-meter", "basic_message")]).await;
    assert_eq!(a.status, StatusCode::OK);
    let a = gate(
        &h,
        &[("x-account", "alice"), ("x-forwarded-uri", "/anything")],
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(h.remaining("alice", "credits").await, json!(189));
    h.post(
        "/v1/balances.update",
        json!({"customer_id": "alice", "feature_id": "credits", "remaining": 0}),
    )
    .await;
    let a = gate(&h, &[("x-account", "alice"), ("x-meter", "basic_message")]).await;
    assert_eq!(a.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(a.code(), "insufficient_balance");
}

#[tokio::test]
async fn gate_decisions_are_counted_in_metrics_and_documented_in_openapi() {
    let h = gate_harness(GATE, Auth::default());
    h.customer_on("alice", "pro").await;
    h.post(
        "/v1/balances.update",
        json!({"customer_id": "alice", "feature_id": "credits", "remaining": 25}),
    )
    .await;
    for _ in 0..3 {
        gate(&h, ALICE_PREMIUM).await;
    }
    gate(
        &h,
        &[
            ("x-customer-id", "ghost"),
            ("x-feature-id", "basic_message"),
        ],
    )
    .await;
    gate(&h, &[("x-customer-id", "alice")]).await;
    let m = h.get("/metrics").await.text;
    for line in [
        "creditgate_decisions_total{route=\"/v1/gate\",outcome=\"allowed\"} 2\n",
        "creditgate_decisions_total{route=\"/v1/gate\",outcome=\"denied\"} 2\n",
        "creditgate_decisions_total{route=\"/v1/gate\",outcome=\"error\"} 1\n",
    ] {
        assert!(m.contains(line), "{line} not in\n{m}");
    }
    let doc = h.get("/openapi.json").await;
    assert!(doc.json["paths"]["/v1/gate"]["get"].is_object());
    assert!(doc.json["components"]["schemas"]["GateAllowed"].is_object());
}
