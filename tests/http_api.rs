//! The HTTP API over the in-process engine, driven through the router.

mod common;

use axum::http::StatusCode;
use common::http::*;
use creditgate::http::Auth;
use serde_json::{json, Value};

const MONTH_MS: i64 = 31 * 24 * 3_600_000;

#[tokio::test]
async fn seed_plan_over_http() {
    let h = harness();
    h.customer_on("alice", "pro").await;
    // Attaching again changes nothing.
    h.customer_on("alice", "pro").await;
    assert_eq!(h.remaining("alice", "credits").await, json!(200));
    let c = h
        .post("/v1/customers.get", json!({"customer_id": "alice"}))
        .await;
    assert_eq!(
        c.json["balances"]["credits"]["breakdown"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        c.json["balances"]["credits"]["breakdown"][0]["id"],
        "pro:credits"
    );
    assert_eq!(
        c.json["balances"]["credits"]["breakdown"][0]["plan_id"],
        "pro"
    );

    let a = h
        .post(
            "/v1/check",
            json!({"customer_id": "alice", "feature_id": "premium_message"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json["allowed"], true);
    assert_eq!(a.json["required_balance"], json!(10), "shown in credits");
    assert_eq!(a.json["balance"]["feature_id"], "credits");
    assert_eq!(a.json["balances"]["premium_message"], Value::Null);
    assert_eq!(a.json["balances"]["credits"]["remaining"], json!(200));
    assert_eq!(a.json["entity_id"], Value::Null);
    assert_eq!(a.json["flag"], Value::Null);

    for _ in 0..15 {
        let a = h
            .post("/v1/check", json!({"customer_id": "alice", "feature_id": "premium_message", "send_event": true}))
            .await;
        assert_eq!(a.json["allowed"], true, "{}", a.text);
    }
    for _ in 0..50 {
        let a = h
            .post(
                "/v1/entitled",
                json!({"customer_id": "alice", "feature_id": "basic_message", "send_event": true}),
            )
            .await;
        assert_eq!(a.json["allowed"], true, "{}", a.text);
    }
    assert_eq!(h.remaining("alice", "credits").await, json!(0));
    let a = h
        .post(
            "/v1/balances.check",
            json!({"customer_id": "alice", "feature_id": "basic_message", "send_event": true}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json["allowed"], false);
    assert_eq!(a.json["balance"]["remaining"], json!(0));
    assert_eq!(a.json["balance"]["usage"], json!(200));
}

#[tokio::test]
async fn customer_object_has_every_field_the_sdks_require() {
    let h = harness();
    let a = h
        .post(
            "/v1/customers.get_or_create",
            json!({"customer_id": "c", "name": "ignored"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    for field in [
        "id",
        "name",
        "email",
        "fingerprint",
        "stripe_id",
        "created_at",
        "env",
        "send_email_receipts",
        "metadata",
        "billing_controls",
        "flags",
        "subscriptions",
        "purchases",
        "licenses",
        "balances",
    ] {
        assert!(a.json.get(field).is_some(), "missing {field}: {}", a.text);
    }
    assert_eq!(a.json["created_at"], json!(T0));
    assert_eq!(a.json["env"], "live");
    assert_eq!(a.json["balances"], json!({}));
    let missing = h
        .post("/v1/customers.get", json!({"customer_id": "nobody"}))
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.code(), "customer_not_found");
}

#[tokio::test]
async fn amounts_are_exact_decimals_in_and_out() {
    let h = harness();
    h.post("/v1/customers.get_or_create", json!({"customer_id": "d"}))
        .await;
    let a = h
        .post(
            "/v1/balances.create",
            json!({"customer_id": "d", "feature_id": "ai_credits", "included_grant": 500.0}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json["success"], true);
    h.post(
        "/v1/track",
        json!({"customer_id": "d", "feature_id": "action1", "value": 0.1}),
    )
    .await;
    let a = h
        .post(
            "/v1/track",
            json!({"customer_id": "d", "feature_id": "action1", "value": "0.2"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert!(a.text.contains("\"remaining\":499.94,"), "{}", a.text);
    assert_eq!(a.json["deductions"][0]["value"], json!(0.04));
    assert_eq!(a.json["deductions"][0]["feature_id"], "ai_credits");
    assert_eq!(a.json["deductions"][0]["plan_id"], Value::Null);
    assert_eq!(a.json["deductions"][0]["reset"], Value::Null);
    assert_eq!(a.json["balance"]["breakdown"][0]["reset"], Value::Null);
}

#[tokio::test]
async fn balance_prefers_the_feature_then_credit_systems_that_cover() {
    let h = harness();
    h.post("/v1/customers.get_or_create", json!({"customer_id": "p"}))
        .await;
    h.post("/v1/balances.create", json!({"customer_id": "p", "feature_id": "action2", "included_grant": 5, "reset": {"interval": "month"}})).await;
    h.post(
        "/v1/balances.create",
        json!({"customer_id": "p", "feature_id": "ai_credits", "included_grant": 100}),
    )
    .await;
    let small = h
        .post(
            "/v1/check",
            json!({"customer_id": "p", "feature_id": "action2", "required_balance": 5}),
        )
        .await;
    assert_eq!(small.json["balance"]["feature_id"], "action2");
    assert_eq!(small.json["required_balance"], json!(5));
    let big = h
        .post(
            "/v1/check",
            json!({"customer_id": "p", "feature_id": "action2", "required_balance": 10}),
        )
        .await;
    assert_eq!(big.json["allowed"], true, "5 own + 5 × 0.6 credits");
    assert_eq!(
        big.json["balance"]["feature_id"], "ai_credits",
        "{}",
        big.text
    );
    assert_eq!(big.json["required_balance"], json!(6));
    assert_eq!(big.json["balances"]["action2"]["remaining"], json!(5));
    // A consume that empties the feature's own balance still answers with it.
    let c = h
        .post("/v1/check", json!({"customer_id": "p", "feature_id": "action2", "required_balance": 5, "send_event": true}))
        .await;
    assert_eq!(c.json["balance"]["feature_id"], "action2");
    assert_eq!(c.json["balance"]["remaining"], json!(0));
    // Nothing owned → null balance, not allowed.
    h.post(
        "/v1/customers.get_or_create",
        json!({"customer_id": "none"}),
    )
    .await;
    let n = h
        .post(
            "/v1/check",
            json!({"customer_id": "none", "feature_id": "action1"}),
        )
        .await;
    assert_eq!(n.json["allowed"], false);
    assert_eq!(n.json["balance"], Value::Null);
    assert_eq!(
        n.json["balances"],
        json!({"action1": null, "ai_credits": null})
    );
}

#[tokio::test]
async fn track_idempotency_over_the_header_and_body() {
    let h = harness();
    h.customer_on("i", "pro").await;
    let key = [("idempotency-key", "k1")];
    let body = r#"{"customer_id":"i","feature_id":"basic_message","value":25}"#;
    let first = h.post_with("/v1/track", body, &key).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    assert!(!first.replayed());
    // The same request with 25.0 is the same request: replayed, not charged.
    let again = h
        .post_with(
            "/v1/balances.track",
            r#"{"customer_id":"i","feature_id":"basic_message","value":25.0}"#,
            &key,
        )
        .await;
    assert_eq!(again.status, StatusCode::OK);
    assert!(again.replayed());
    assert_eq!(again.json["deductions"], first.json["deductions"]);
    assert_eq!(h.remaining("i", "credits").await, json!(175));
    // The same key with another request.
    let other = h
        .post_with(
            "/v1/track",
            r#"{"customer_id":"i","feature_id":"basic_message","value":26}"#,
            &key,
        )
        .await;
    assert_eq!(other.status, StatusCode::CONFLICT);
    assert_eq!(other.code(), "idempotency_key_reused");
    // Body key equal to the header: fine; different: 400.
    let same = h
        .post_with(
            "/v1/track",
            r#"{"customer_id":"i","feature_id":"basic_message","value":25,"idempotency_key":"k1"}"#,
            &key,
        )
        .await;
    assert!(same.replayed());
    let diff = h
        .post_with(
            "/v1/track",
            r#"{"customer_id":"i","feature_id":"basic_message","value":25,"idempotency_key":"k2"}"#,
            &key,
        )
        .await;
    assert_eq!(diff.status, StatusCode::BAD_REQUEST);
    assert_eq!(diff.code(), "invalid_inputs");
    assert!(diff.json["message"]
        .as_str()
        .unwrap()
        .contains("idempotency_key"));
    // A body-only key works the same way; keys are scoped per customer.
    let b1 = h.post("/v1/events", json!({"customer_id": "i", "feature_id": "basic_message", "value": 5, "idempotency_key": "b"})).await;
    let b2 = h.post("/v1/events", json!({"customer_id": "i", "feature_id": "basic_message", "value": 5, "idempotency_key": "b"})).await;
    assert!(!b1.replayed() && b2.replayed());
    assert_eq!(h.remaining("i", "credits").await, json!(170));
    h.customer_on("j", "pro").await;
    let j = h
        .post_with("/v1/track", body.replace("\"i\"", "\"j\"").as_str(), &key)
        .await;
    assert!(!j.replayed());
    assert_eq!(h.remaining("j", "credits").await, json!(175));
}

#[tokio::test]
async fn reject_answers_insufficient_balance_and_replays_it() {
    let h = harness();
    h.customer_on("r", "pro").await;
    let body = r#"{"customer_id":"r","feature_id":"premium_message","value":21,"overage_behavior":"reject"}"#;
    let key = [("idempotency-key", "rej")];
    let a = h.post_with("/v1/track", body, &key).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.code(), "insufficient_balance");
    assert!(!a.replayed());
    let b = h.post_with("/v1/track", body, &key).await;
    assert_eq!(b.status, StatusCode::BAD_REQUEST);
    assert_eq!(b.code(), "insufficient_balance");
    assert!(b.replayed());
    assert_eq!(h.remaining("r", "credits").await, json!(200));
    // cap takes what there is and reports the total actually charged.
    let c = h
        .post(
            "/v1/track",
            json!({"customer_id": "r", "feature_id": "premium_message", "value": 21}),
        )
        .await;
    assert_eq!(c.status, StatusCode::OK);
    assert_eq!(c.json["value"], json!(21));
    assert_eq!(c.json["deductions"][0]["value"], json!(200));
    assert_eq!(c.json["balance"]["remaining"], json!(0));
}

#[tokio::test]
async fn check_with_send_event_is_idempotent() {
    let h = harness();
    h.customer_on("s", "pro").await;
    let key = [("Idempotency-Key", "ck")];
    let body = r#"{"customer_id":"s","feature_id":"premium_message","required_balance":3,"send_event":true}"#;
    let a = h.post_with("/v1/check", body, &key).await;
    let b = h.post_with("/v1/check", body, &key).await;
    assert_eq!(
        (a.json["allowed"].clone(), b.json["allowed"].clone()),
        (json!(true), json!(true))
    );
    assert!(!a.replayed() && b.replayed());
    assert_eq!(h.remaining("s", "credits").await, json!(170));
    // The same key on a track is another request.
    let t = h
        .post_with(
            "/v1/track",
            r#"{"customer_id":"s","feature_id":"premium_message","value":3}"#,
            &key,
        )
        .await;
    assert_eq!(t.code(), "idempotency_key_reused");
}

#[tokio::test]
async fn lock_and_finalize_without_customer_id() {
    let h = harness();
    h.post("/v1/customers.get_or_create", json!({"customer_id": "l"}))
        .await;
    h.post("/v1/balances.create", json!({"customer_id": "l", "feature_id": "action1", "included_grant": 10, "reset": {"interval": "month", "interval_count": 1.0}})).await;
    h.post("/v1/balances.create", json!({"customer_id": "l", "feature_id": "action1", "included_grant": 5, "reset": {"interval": "hour"}})).await;
    let reserve = |id: &'static str| {
        json!({"customer_id": "l", "feature_id": "action1", "required_balance": 8.0, "send_event": true,
               "lock": {"enabled": true, "lock_id": id, "expires_at": (T0 + 3_600_000) as f64}})
    };
    let a = h.post("/v1/check", reserve("lk1")).await;
    assert_eq!(a.json["allowed"], true, "{}", a.text);
    assert_eq!(h.remaining("l", "action1").await, json!(7));
    let dup = h.post("/v1/check", reserve("lk1")).await;
    assert_eq!(dup.status, StatusCode::CONFLICT);
    assert_eq!(dup.code(), "lock_already_exists");
    let f = h
        .post(
            "/v1/balances.finalize",
            json!({"lock_id": "lk1", "action": "release"}),
        )
        .await;
    assert_eq!(f.status, StatusCode::OK, "{}", f.text);
    assert_eq!(f.json, json!({"success": true}));
    assert_eq!(h.remaining("l", "action1").await, json!(15));
    // Finalizing twice answers the first outcome and changes nothing.
    let f2 = h
        .post(
            "/v1/balances.finalize",
            json!({"lock_id": "lk1", "action": "release"}),
        )
        .await;
    assert_eq!(f2.status, StatusCode::OK);
    assert!(f2.replayed());
    assert_eq!(h.remaining("l", "action1").await, json!(15));
    // Confirm with an override of 5 on a hold of 8: 10 left.
    h.post("/v1/check", reserve("lk2")).await;
    let f = h
        .post(
            "/v1/balances.finalize",
            json!({"lock_id": "lk2", "action": "confirm", "override_value": 5.0}),
        )
        .await;
    assert_eq!(f.status, StatusCode::OK, "{}", f.text);
    assert_eq!(h.remaining("l", "action1").await, json!(10));
    let unknown = h
        .post(
            "/v1/balances.finalize",
            json!({"lock_id": "nope", "action": "confirm"}),
        )
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.code(), "lock_not_found");
    let with_customer = h
        .post(
            "/v1/balances.finalize",
            json!({"lock_id": "nope", "action": "confirm", "customer_id": "l"}),
        )
        .await;
    assert_eq!(with_customer.code(), "lock_not_found");
    let bad_action = h
        .post(
            "/v1/balances.finalize",
            json!({"lock_id": "lk2", "action": "keep"}),
        )
        .await;
    assert_eq!(bad_action.code(), "invalid_inputs");
    assert!(bad_action.json["message"]
        .as_str()
        .unwrap()
        .contains("action"));
}

#[tokio::test]
async fn a_lock_id_another_customer_holds_is_refused() {
    let h = harness();
    for c in ["a", "b"] {
        h.post("/v1/customers.get_or_create", json!({"customer_id": c}))
            .await;
        h.post(
            "/v1/balances.create",
            json!({"customer_id": c, "feature_id": "action1", "included_grant": 10}),
        )
        .await;
    }
    let reserve = |c: &'static str| {
        json!({"customer_id": c, "feature_id": "action1", "required_balance": 4, "send_event": true,
               "lock": {"enabled": true, "lock_id": "shared", "expires_at": T0 + 3_600_000}})
    };
    assert_eq!(
        h.post("/v1/check", reserve("a")).await.json["allowed"],
        true
    );
    let b = h.post("/v1/check", reserve("b")).await;
    assert_eq!(b.status, StatusCode::CONFLICT, "{}", b.text);
    assert_eq!(b.code(), "lock_already_exists");
    assert_eq!(
        h.remaining("b", "action1").await,
        json!(10),
        "b was not charged"
    );
    // A finalize without customer_id reaches a's lock, never b's balance.
    let f = h
        .post(
            "/v1/balances.finalize",
            json!({"lock_id": "shared", "action": "release"}),
        )
        .await;
    assert_eq!(f.status, StatusCode::OK, "{}", f.text);
    assert_eq!(h.remaining("a", "action1").await, json!(10));
    assert_eq!(h.remaining("b", "action1").await, json!(10));
    // Once a's finalized lock is forgotten, b may use the id.
    h.clock.advance(25 * 3_600_000);
    let later = json!({"customer_id": "b", "feature_id": "action1", "required_balance": 4, "send_event": true,
                       "lock": {"enabled": true, "lock_id": "shared"}});
    assert_eq!(h.post("/v1/check", later).await.json["allowed"], true);
}

#[tokio::test]
async fn an_expired_lock_returns_its_hold_at_the_next_operation() {
    let h = harness();
    h.customer_on("e", "pro").await;
    let a = h
        .post(
            "/v1/check",
            json!({"customer_id": "e", "feature_id": "basic_message", "required_balance": 50,
            "lock": {"lock_id": "x", "expires_at": T0 + 60_000}}),
        )
        .await;
    assert_eq!(a.json["allowed"], true, "{}", a.text);
    assert_eq!(h.remaining("e", "credits").await, json!(150));
    h.clock.advance(120_000);
    assert_eq!(h.remaining("e", "credits").await, json!(200));
}

#[tokio::test]
async fn rollover_shows_and_never_expiring_rows_get_a_far_date() {
    let h = harness();
    h.customer_on("ro", "roll").await;
    h.post(
        "/v1/track",
        json!({"customer_id": "ro", "feature_id": "action1", "value": 250}),
    )
    .await;
    h.clock.advance(MONTH_MS);
    let c = h
        .post("/v1/customers.get", json!({"customer_id": "ro"}))
        .await;
    let b = &c.json["balances"]["action1"];
    assert_eq!(b["remaining"], json!(550), "{}", c.text);
    assert_eq!(b["granted"], json!(550));
    assert_eq!(b["rollovers"][0]["balance"], json!(150));
    assert!(b["rollovers"][0]["expires_at"].as_i64().unwrap() > T0 + MONTH_MS);

    h.post("/v1/customers.get_or_create", json!({"customer_id": "f"}))
        .await;
    let a = h
        .post("/v1/balances.create", json!({"customer_id": "f", "feature_id": "action2", "included_grant": 10,
            "reset": {"interval": "day"}, "rollover": {"duration": "forever", "length": 1.0, "max": null}}))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    h.post(
        "/v1/track",
        json!({"customer_id": "f", "feature_id": "action2", "value": 4}),
    )
    .await;
    h.clock.advance(24 * 3_600_000);
    let c = h
        .post("/v1/customers.get", json!({"customer_id": "f"}))
        .await;
    let r = &c.json["balances"]["action2"]["rollovers"][0];
    assert_eq!(
        r["expires_at"],
        json!(253_402_300_799_999_i64),
        "{}",
        c.text
    );
    assert_eq!(r["balance"], json!(6));
}

#[tokio::test]
async fn remaining_never_shows_below_zero() {
    let h = harness();
    h.post("/v1/customers.get_or_create", json!({"customer_id": "o"}))
        .await;
    h.post("/v1/balances.create", json!({"customer_id": "o", "feature_id": "action1", "included_grant": 10, "overage_allowed": true, "reset": {"interval": "month"}})).await;
    let a = h
        .post(
            "/v1/track",
            json!({"customer_id": "o", "feature_id": "action1", "value": 25}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json["balance"]["remaining"], json!(0));
    assert_eq!(a.json["balance"]["usage"], json!(25));
    assert_eq!(a.json["balance"]["breakdown"][0]["remaining"], json!(0));
    assert_eq!(a.json["deductions"][0]["value"], json!(25));
}

#[tokio::test]
async fn balances_create_and_update() {
    let h = harness();
    h.post("/v1/customers.get_or_create", json!({"customer_id": "u"}))
        .await;
    let body = json!({"customer_id": "u", "feature_id": "action1", "included_grant": 50.0, "balance_id": "top",
        "reset": {"interval": "month", "interval_count": 1.0}, "next_reset_at": (T0 + 10 * 86_400_000) as f64,
        "expires_at": 1_900_000_000_000.0});
    let a = h.post("/v1/balances.create", body.clone()).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json["balance_id"], "top");
    let dup = h.post("/v1/balances.create", body).await;
    assert_eq!(dup.status, StatusCode::CONFLICT);
    assert_eq!(dup.code(), "balance_already_exists");
    let c = h
        .post("/v1/customers.get", json!({"customer_id": "u"}))
        .await;
    let b = &c.json["balances"]["action1"];
    assert_eq!(b["next_reset_at"], json!(T0 + 10 * 86_400_000));
    assert_eq!(
        b["breakdown"][0]["expires_at"],
        json!(1_900_000_000_000_i64)
    );
    assert_eq!(
        b["breakdown"][0]["reset"],
        json!({"interval": "month", "interval_count": 1, "resets_at": T0 + 10 * 86_400_000})
    );

    let a = h
        .post(
            "/v1/balances.update",
            json!({"customer_id": "u", "feature_id": "action1", "remaining": 12.5}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(h.remaining("u", "action1").await, json!(12.5));
    h.post("/v1/balances.update", json!({"customer_id": "u", "feature_id": "action1", "balance_id": "top", "add_to_balance": "2.5"})).await;
    assert_eq!(h.remaining("u", "action1").await, json!(15));
    let both = h.post("/v1/balances.update", json!({"customer_id": "u", "feature_id": "action1", "remaining": 1, "add_to_balance": 1})).await;
    assert_eq!(both.code(), "invalid_inputs");
    let none = h.post("/v1/balances.update", json!({"customer_id": "u", "feature_id": "action1", "balance_id": "zz", "remaining": 1})).await;
    assert_eq!(none.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn lazy_reset_shows_after_the_boundary() {
    let h = harness();
    h.post("/v1/customers.get_or_create", json!({"customer_id": "z"}))
        .await;
    h.post("/v1/balances.create", json!({"customer_id": "z", "feature_id": "action1", "included_grant": 100, "reset": {"interval": "month"}})).await;
    h.post(
        "/v1/track",
        json!({"customer_id": "z", "feature_id": "action1", "value": 60}),
    )
    .await;
    h.clock.advance(MONTH_MS);
    let a = h
        .post(
            "/v1/check",
            json!({"customer_id": "z", "feature_id": "action1"}),
        )
        .await;
    assert_eq!(a.json["balance"]["remaining"], json!(100));
    let t = h
        .post(
            "/v1/track",
            json!({"customer_id": "z", "feature_id": "action1", "value": 20}),
        )
        .await;
    assert_eq!(t.json["balance"]["remaining"], json!(80));
}

#[tokio::test]
async fn bad_input_answers_the_documented_errors_and_writes_nothing() {
    let h = harness();
    h.customer_on("b", "pro").await;
    let cases: Vec<(&str, String, StatusCode, &str, &str)> = vec![
        ("/v1/check", "{not json".into(), StatusCode::BAD_REQUEST, "invalid_inputs", "malformed"),
        ("/v1/check", "".into(), StatusCode::BAD_REQUEST, "invalid_inputs", "body"),
        ("/v1/check", "[1]".into(), StatusCode::BAD_REQUEST, "invalid_inputs", "body"),
        ("/v1/check", r#"{"customer_id":"b"}"#.into(), StatusCode::BAD_REQUEST, "invalid_inputs", "feature_id"),
        ("/v1/check", r#"{"customer_id":7,"feature_id":"basic_message"}"#.into(), StatusCode::BAD_REQUEST, "invalid_inputs", "customer_id"),
        ("/v1/check", r#"{"customer_id":"b","feature_id":"nope"}"#.into(), StatusCode::NOT_FOUND, "feature_not_found", "nope"),
        ("/v1/check", r#"{"customer_id":"ghost","feature_id":"basic_message"}"#.into(), StatusCode::NOT_FOUND, "customer_not_found", ""),
        ("/v1/track", r#"{"customer_id":"ghost","feature_id":"basic_message"}"#.into(), StatusCode::NOT_FOUND, "customer_not_found", ""),
        ("/v1/track", r#"{"customer_id":"b","feature_id":"basic_message","value":1e12}"#.into(), StatusCode::BAD_REQUEST, "invalid_inputs", "value"),
        ("/v1/track", r#"{"customer_id":"b","feature_id":"basic_message","value":0.00001}"#.into(), StatusCode::BAD_REQUEST, "invalid_inputs", "value"),
        ("/v1/track", r#"{"customer_id":"b","feature_id":"basic_message","value":"abc"}"#.into(), StatusCode::BAD_REQUEST, "invalid_inputs", "value"),
        ("/v1/track", r#"{"customer_id":"b","feature_id":"basic_message","overage_behavior":"maybe"}"#.into(), StatusCode::BAD_REQUEST, "invalid_inputs", "overage_behavior"),
        ("/v1/check", r#"{"customer_id":"b","feature_id":"basic_message","required_balance":-1}"#.into(), StatusCode::BAD_REQUEST, "invalid_inputs", "required_balance"),
        ("/v1/customers.get_or_create", r#"{"customer_id":""}"#.into(), StatusCode::BAD_REQUEST, "invalid_inputs", "customer_id"),
        ("/v1/customers.get_or_create", format!(r#"{{"customer_id":"{}"}}"#, "x".repeat(300)), StatusCode::BAD_REQUEST, "invalid_inputs", "customer_id"),
        ("/v1/customers.get_or_create", r#"{"customer_id":"a\u0001b"}"#.into(), StatusCode::BAD_REQUEST, "invalid_inputs", "customer_id"),
        ("/v1/billing.attach", r#"{"customer_id":"b","plan_id":"gold"}"#.into(), StatusCode::NOT_FOUND, "plan_not_found", "gold"),
        ("/v1/balances.create", r#"{"customer_id":"b","feature_id":"action1","included_grant":-5}"#.into(), StatusCode::BAD_REQUEST, "invalid_inputs", "included_grant"),
        ("/v1/balances.create", r#"{"customer_id":"b","feature_id":"action1","included_grant":5,"reset":{"interval":"fortnight"}}"#.into(), StatusCode::BAD_REQUEST, "invalid_inputs", "reset.interval"),
        ("/v1/balances.create", r#"{"customer_id":"b","feature_id":"action1","included_grant":5,"reset":{"interval":"day","interval_count":0}}"#.into(), StatusCode::BAD_REQUEST, "invalid_inputs", "interval_count"),
        ("/v1/balances.create", r#"{"customer_id":"b","feature_id":"action1","included_grant":5,"expires_at":1.5}"#.into(), StatusCode::BAD_REQUEST, "invalid_inputs", "expires_at"),
        ("/v1/balances.create", r#"{"customer_id":"b","feature_id":"action1","included_grant":5,"rollover":{"length":1}}"#.into(), StatusCode::BAD_REQUEST, "invalid_inputs", "rollover"),
        ("/v1/check", r#"{"customer_id":"b","feature_id":"basic_message","lock":{"enabled":true}}"#.into(), StatusCode::BAD_REQUEST, "invalid_inputs", "lock.lock_id"),
    ];
    for (path, body, status, code, mention) in cases {
        let a = h.post_with(path, &body, &[]).await;
        assert_eq!(a.status, status, "{path} {body}: {}", a.text);
        assert_eq!(a.code(), code, "{path} {body}: {}", a.text);
        let message = a.json["message"].as_str().unwrap();
        assert!(message.contains(mention), "{path} {body}: {message}");
        assert_eq!(
            a.json.as_object().unwrap().len(),
            2,
            "only message and code: {}",
            a.text
        );
    }
    assert_eq!(h.remaining("b", "credits").await, json!(200));
    let c = h
        .post("/v1/customers.get", json!({"customer_id": "b"}))
        .await;
    assert_eq!(
        c.json["balances"].as_object().unwrap().len(),
        1,
        "nothing granted: {}",
        c.text
    );
}

#[tokio::test]
async fn bodies_over_64_kib_are_refused() {
    let h = harness();
    h.customer_on("big", "pro").await;
    let padding = "x".repeat(70 * 1024);
    let body = format!(r#"{{"customer_id":"big","feature_id":"basic_message","pad":"{padding}"}}"#);
    // No Content-Length here: the limit holds while reading.
    let a = h.post_with("/v1/track", &body, &[]).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(a.code(), "payload_too_large");
    // Just under the limit is fine (unknown fields ignored).
    let small = format!(
        r#"{{"customer_id":"big","feature_id":"basic_message","pad":"{}"}}"#,
        "x".repeat(60 * 1024)
    );
    assert_eq!(
        h.post_with("/v1/track", &small, &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(h.remaining("big", "credits").await, json!(199));
}

#[tokio::test]
async fn auth_keys_and_roles() {
    let h = harness_with(Auth {
        api_keys: vec!["sk_app".into()],
        admin_keys: vec!["ak_admin".into()],
    });
    let body = r#"{"customer_id":"k"}"#;
    let none = h.post_with("/v1/customers.get_or_create", body, &[]).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(none.code(), "no_secret_key");
    let wrong = h
        .post_with(
            "/v1/customers.get_or_create",
            body,
            &[("authorization", "Bearer sk_other")],
        )
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.code(), "invalid_secret_key");
    let app = h
        .post_with(
            "/v1/customers.get_or_create",
            body,
            &[("authorization", "Bearer sk_app")],
        )
        .await;
    assert_eq!(app.status, StatusCode::OK);
    let attach = r#"{"customer_id":"k","plan_id":"pro"}"#;
    let forbidden = h
        .post_with(
            "/v1/billing.attach",
            attach,
            &[("authorization", "Bearer sk_app")],
        )
        .await;
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
    assert_eq!(forbidden.code(), "forbidden");
    for admin_route in ["/v1/balances.create", "/v1/balances.update"] {
        let f = h
            .post_with(admin_route, "{}", &[("authorization", "Bearer sk_app")])
            .await;
        assert_eq!(f.code(), "forbidden", "{admin_route}");
    }
    let admin = h
        .post_with(
            "/v1/billing.attach",
            attach,
            &[("authorization", "Bearer ak_admin")],
        )
        .await;
    assert_eq!(admin.status, StatusCode::OK);
    let check = h
        .post_with(
            "/v1/check",
            r#"{"customer_id":"k","feature_id":"basic_message"}"#,
            &[
                ("authorization", "Bearer ak_admin"),
                ("x-api-version", "2.5.0"),
            ],
        )
        .await;
    assert_eq!(check.json["allowed"], true);
    // Health and readiness need no key.
    assert_eq!(h.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(h.get("/readyz").await.json, json!({"ready": true}));
}

#[tokio::test]
async fn openapi_metrics_and_unknown_routes() {
    let h = harness();
    let doc = h.get("/openapi.json").await;
    assert_eq!(doc.status, StatusCode::OK);
    for path in [
        "/v1/check",
        "/v1/track",
        "/v1/balances.finalize",
        "/v1/billing.attach",
        "/v1/customers.get_or_create",
    ] {
        assert!(
            doc.json["paths"][path]["post"].is_object(),
            "{path} missing"
        );
    }
    assert!(
        doc.json["components"]["schemas"]["BalanceView"]["properties"]["rollovers"].is_object()
    );

    h.customer_on("m", "pro").await;
    h.post(
        "/v1/check",
        json!({"customer_id": "m", "feature_id": "basic_message"}),
    )
    .await;
    h.post(
        "/v1/check",
        json!({"customer_id": "m", "feature_id": "premium_message", "required_balance": 21}),
    )
    .await;
    h.post(
        "/v1/check",
        json!({"customer_id": "ghost", "feature_id": "basic_message"}),
    )
    .await;
    let m = h.get("/metrics").await;
    assert!(
        m.text
            .contains("creditgate_decisions_total{route=\"/v1/check\",outcome=\"allowed\"} 1"),
        "{}",
        m.text
    );
    assert!(m
        .text
        .contains("creditgate_decisions_total{route=\"/v1/check\",outcome=\"denied\"} 1"));
    assert!(m
        .text
        .contains("creditgate_decisions_total{route=\"/v1/check\",outcome=\"error\"} 1"));
    assert!(m
        .text
        .contains("creditgate_request_duration_seconds_count{route=\"/v1/check\"} 3"));
    assert!(m.text.contains("creditgate_store_errors_total 0"));

    let nf = h.post("/v1/nothing", json!({})).await;
    assert_eq!(nf.status, StatusCode::NOT_FOUND);
    assert_eq!(nf.code(), "not_found");
    let wrong_method = h.get("/v1/check").await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong_method.code(), "method_not_allowed");
}

/// One sample of the Prometheus text format: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// A strict reader of the Prometheus text exposition (version 0.0.4): every
/// line is a `# HELP`, a `# TYPE` (counter, gauge or histogram) or a sample
/// `name{label="value",…} value` of a family typed before it; panics on
/// anything else. Returns the samples and each family's type.
fn parse_exposition(text: &str) -> (Vec<Sample>, std::collections::BTreeMap<String, String>) {
    fn is_name(s: &str) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    let mut types = std::collections::BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            assert!(is_name(name) && !help.is_empty(), "{line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(is_name(name), "{line}");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "{line}"
            );
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line}");
        let (series, value) = line.rsplit_once(' ').expect("sample value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value in {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, vec![]),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let mut labels = vec![];
                let mut rest = body;
                while !rest.is_empty() {
                    let (key, after) = rest.split_once("=\"").expect("label=\"");
                    assert!(is_name(key), "{line}");
                    let mut value = String::new();
                    let mut chars = after.char_indices();
                    let end = loop {
                        match chars.next().expect("closing quote") {
                            (_, '\\') => value.push(chars.next().expect("escape").1),
                            (i, '"') => break i,
                            (_, c) => value.push(c),
                        }
                    };
                    labels.push((key.to_string(), value));
                    rest = after[end + 1..]
                        .strip_prefix(',')
                        .unwrap_or(&after[end + 1..]);
                }
                (name, labels)
            }
        };
        assert!(is_name(name), "{line}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "{name} has no TYPE before it");
        samples.push((name.to_string(), labels, value));
    }
    (samples, types)
}

#[tokio::test]
async fn the_metrics_exposition_parses_and_counts() {
    let h = harness();
    h.customer_on("p", "pro").await;
    for _ in 0..4 {
        h.post(
            "/v1/check",
            json!({"customer_id": "p", "feature_id": "basic_message"}),
        )
        .await;
    }
    h.post(
        "/v1/track",
        json!({"customer_id": "p", "feature_id": "premium_message", "value": 1000}),
    )
    .await;
    h.get("/healthz").await;
    h.get("/no/such/route").await;
    let m = h.get("/metrics").await;
    assert_eq!(m.status, StatusCode::OK);
    let (samples, types) = parse_exposition(&m.text);
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let found: Vec<_> = samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && l.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .collect();
        assert_eq!(found.len(), 1, "{name} {labels:?} in\n{}", m.text);
        found[0].2
    };
    for (name, kind) in [
        ("creditgate_decisions_total", "counter"),
        ("creditgate_request_duration_seconds", "histogram"),
        ("creditgate_store_errors_total", "counter"),
        ("creditgate_reset_sweeps_total", "counter"),
        ("creditgate_customers_swept_total", "counter"),
        ("creditgate_resets_applied_total", "counter"),
        ("creditgate_sweep_duration_seconds_total", "gauge"),
        ("creditgate_last_sweep_duration_seconds", "gauge"),
    ] {
        assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
    }
    let check = [("route", "/v1/check")];
    let decided = |outcome| {
        value(
            "creditgate_decisions_total",
            &[check[0], ("outcome", outcome)],
        )
    };
    assert_eq!(decided("allowed"), 4.0);
    assert_eq!(decided("denied"), 0.0);
    assert_eq!(
        value(
            "creditgate_decisions_total",
            &[("route", "/v1/track"), ("outcome", "denied")]
        ),
        1.0
    );
    assert_eq!(
        value("creditgate_request_duration_seconds_count", &check),
        4.0
    );
    assert_eq!(
        value(
            "creditgate_request_duration_seconds_count",
            &[("route", "/healthz")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "creditgate_request_duration_seconds_count",
            &[("route", "unmatched")]
        ),
        1.0
    );
    // Buckets: the configured bounds, cumulative, +Inf equal to the count.
    let buckets: Vec<(String, f64)> = samples
        .iter()
        .filter(|(n, l, _)| {
            n == "creditgate_request_duration_seconds_bucket"
                && l[0] == ("route".into(), "/v1/check".into())
        })
        .map(|(_, l, v)| (l[1].1.clone(), *v))
        .collect();
    let bounds: Vec<String> = creditgate::metrics::LATENCY_BUCKETS
        .iter()
        .map(|b| b.to_string())
        .chain(["+Inf".to_string()])
        .collect();
    assert_eq!(
        buckets.iter().map(|(le, _)| le.clone()).collect::<Vec<_>>(),
        bounds
    );
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
    assert_eq!(buckets.last().unwrap().1, 4.0);
    assert!(value("creditgate_request_duration_seconds_sum", &check) > 0.0);
    assert_eq!(value("creditgate_store_errors_total", &[]), 0.0);
    assert_eq!(value("creditgate_reset_sweeps_total", &[]), 0.0);
}
