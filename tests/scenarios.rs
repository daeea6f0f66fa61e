//! The model's must-pass scenarios (issue 2), on every engine.

mod common;

use std::sync::Arc;

use common::{amt, catalog, start, Fx};
use creditgate::calendar::{civil_from_ms, ms_of, Interval, DAY_MS, HOUR_MS, MINUTE_MS};
use creditgate::model::*;
use creditgate::Clock;
use creditgate::EngineError;

async fn seed_plan(fx: Fx) {
    fx.customer("c").await;
    fx.monthly("c", "credits", "200").await;
    assert!(fx.consume("c", "premium_message", "15").await.allowed);
    assert!(fx.consume("c", "basic_message", "50").await.allowed);
    assert_eq!(fx.remaining("c", "credits").await, amt("0"));
    let denied = fx.consume("c", "basic_message", "1").await;
    assert!(!denied.allowed);
    assert!(denied.entries.is_empty());
    assert_eq!(fx.pool("c", "credits").await.usage, amt("200"));

    // A premium request at 3 credits, used 6 times, costs exactly 18.
    fx.customer("r").await;
    fx.one_off("r", "req_credits", "100").await;
    let out = fx.track("r", "premium_request", "6").await;
    assert_eq!(
        out.entries.iter().map(|e| e.amount).collect::<Vec<_>>(),
        vec![amt("18")]
    );
    assert_eq!(fx.remaining("r", "req_credits").await, amt("82"));

    // Monetary credits: 500 cents, 3 cents a unit, 7 units.
    fx.customer("m").await;
    fx.one_off("m", "req_credits", "500").await;
    fx.track("m", "premium_request", "7").await;
    assert_eq!(fx.remaining("m", "req_credits").await, amt("479"));
}

async fn check_costs_without_deducting(fx: Fx) {
    fx.customer("c").await;
    fx.monthly("c", "ai_credits", "100").await;
    let e = &fx.engine;
    let a = e.check("c", "action1", amt("50.75")).await.unwrap();
    assert!(a.allowed);
    assert_eq!(a.entries[0].amount, amt("10.15"));
    let b = e.check("c", "action2", amt("50.75")).await.unwrap();
    assert!(b.allowed);
    assert_eq!(b.entries[0].amount, amt("30.45"));
    let c = e.check("c", "action2", amt("167.33")).await.unwrap();
    assert!(!c.allowed, "100.398 credits do not fit in 100");
    assert_eq!(fx.remaining("c", "ai_credits").await, amt("100"));
}

async fn consume_is_exact_and_all_or_nothing(fx: Fx) {
    fx.customer("c").await;
    fx.monthly("c", "ai_credits", "1000").await;
    assert!(fx.consume("c", "action1", "25.75").await.allowed);
    assert_eq!(fx.remaining("c", "ai_credits").await, amt("994.85"));
    fx.consume("c", "action1", "10.5").await;
    fx.consume("c", "action2", "15.25").await;
    assert_eq!(fx.remaining("c", "ai_credits").await, amt("983.60"));
    assert!(!fx.consume("c", "action1", "10000").await.allowed);
    assert_eq!(fx.remaining("c", "ai_credits").await, amt("983.6"));
}

async fn unowned_features_are_never_allowed(fx: Fx) {
    fx.customer("c").await;
    fx.monthly("c", "action1", "100").await;
    let out = fx.engine.check("c", "action2", amt("1")).await.unwrap();
    assert!(!out.allowed);
    assert!(out.no_balance);
    fx.customer("nobody").await;
    let out = fx
        .engine
        .check("nobody", "action1", amt("1"))
        .await
        .unwrap();
    assert!(!out.allowed && out.no_balance);
    assert!(!fx.consume("nobody", "action1", "0").await.allowed);
    let err = fx
        .engine
        .check("ghost", "action1", amt("1"))
        .await
        .unwrap_err();
    assert_eq!(err, EngineError::CustomerNotFound);
    let err = fx
        .engine
        .check("c", "no_such_feature", amt("1"))
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::FeatureNotFound(_)));
}

async fn feature_pool_before_credit_system(fx: Fx) {
    fx.customer("c").await;
    fx.monthly("c", "action1", "100").await;
    fx.monthly("c", "ai_credits", "200").await;
    fx.track("c", "action1", "40.5").await;
    assert_eq!(fx.remaining("c", "action1").await, amt("59.5"));
    assert_eq!(fx.remaining("c", "ai_credits").await, amt("200"));
    let out = fx.track("c", "action1", "80").await;
    assert_eq!(fx.remaining("c", "action1").await, amt("0"));
    assert_eq!(fx.remaining("c", "ai_credits").await, amt("195.9"));
    assert_eq!(out.entries.len(), 2);
    assert_eq!(
        (out.entries[0].amount, out.entries[0].units),
        (amt("59.5"), amt("59.5"))
    );
    assert_eq!(
        (out.entries[1].amount, out.entries[1].units),
        (amt("4.1"), amt("20.5"))
    );
    fx.track("c", "action1", "50.75").await;
    assert_eq!(fx.remaining("c", "ai_credits").await, amt("185.75"));
}

async fn monthly_before_one_off(fx: Fx) {
    fx.customer("c").await;
    let m = fx.monthly("c", "api_call", "500").await;
    let l = fx.one_off("c", "api_call", "200").await;
    fx.track("c", "api_call", "100").await;
    assert_eq!(fx.bucket("c", "api_call", &m).await.remaining, amt("400"));
    assert_eq!(fx.bucket("c", "api_call", &l).await.remaining, amt("200"));
    fx.track("c", "api_call", "450").await;
    assert_eq!(fx.bucket("c", "api_call", &m).await.remaining, amt("0"));
    assert_eq!(fx.bucket("c", "api_call", &l).await.remaining, amt("150"));
}

async fn overage_then_refunds_heal_first(fx: Fx) {
    fx.customer("c").await;
    let m = fx.monthly("c", "api_call", "100").await;
    let l = fx.one_off("c", "api_call", "50").await;
    let o = fx
        .grant(
            "c",
            Grant {
                overage_allowed: true,
                ..Grant::new("api_call", amt("0"), Interval::Month)
            },
        )
        .await;
    let out = fx.track("c", "api_call", "180").await;
    assert!(out.allowed);
    assert_eq!(fx.bucket("c", "api_call", &m).await.remaining, amt("0"));
    assert_eq!(fx.bucket("c", "api_call", &l).await.remaining, amt("0"));
    assert_eq!(fx.bucket("c", "api_call", &o).await.remaining, amt("-30"));
    assert_eq!(
        fx.pool("c", "api_call").await.remaining,
        amt("0"),
        "debt never shows as remaining"
    );
    fx.track("c", "api_call", "-20").await;
    assert_eq!(fx.bucket("c", "api_call", &o).await.remaining, amt("-10"));
    assert_eq!(fx.bucket("c", "api_call", &m).await.remaining, amt("0"));
    fx.track("c", "api_call", "-20").await;
    assert_eq!(fx.bucket("c", "api_call", &o).await.remaining, amt("0"));
    assert_eq!(fx.bucket("c", "api_call", &m).await.remaining, amt("10"));
    fx.track("c", "api_call", "-50").await;
    assert_eq!(fx.bucket("c", "api_call", &m).await.remaining, amt("60"));
    assert_eq!(fx.bucket("c", "api_call", &l).await.remaining, amt("0"));
}

async fn cap_drops_the_rest(fx: Fx) {
    fx.customer("c").await;
    fx.one_off("c", "api_call", "20").await;
    let out = fx.track("c", "api_call", "50").await;
    assert_eq!(out.uncovered, amt("30"));
    let p = fx.pool("c", "api_call").await;
    assert_eq!((p.remaining, p.usage), (amt("0"), amt("20")));

    fx.customer("d").await;
    fx.monthly("d", "api_call", "5").await;
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let e = fx.engine.clone();
            tokio::spawn(async move {
                e.track("d", "api_call", amt("10"), OverageBehavior::Cap, None)
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let p = fx.pool("d", "api_call").await;
    assert_eq!((p.remaining, p.usage), (amt("0"), amt("5")));
}

async fn concurrent_consumes_never_overdraw(fx: Fx) {
    fx.customer("c").await;
    fx.monthly("c", "api_call", "200").await;
    let tasks: Vec<_> = (0..150)
        .map(|_| {
            let e = fx.engine.clone();
            tokio::spawn(async move {
                e.consume("c", "api_call", amt("2"), None)
                    .await
                    .unwrap()
                    .allowed
            })
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        allowed += t.await.unwrap() as u32;
    }
    assert_eq!(allowed, 100);
    assert_eq!(fx.remaining("c", "api_call").await, amt("0"));
}

fn rollover(max: Option<&str>, pct: Option<&str>, length: u32) -> Option<RolloverConfig> {
    Some(RolloverConfig {
        max: max.map(amt),
        max_percentage: pct.map(amt),
        duration: RolloverDuration::Month,
        length: Some(length),
    })
}

async fn rollover_is_capped_and_spent_first(fx: Fx) {
    fx.customer("c").await;
    let g = Grant {
        rollover: rollover(Some("500"), None, 1),
        ..Grant::new("api_call", amt("400"), Interval::Month)
    };
    let id = fx.grant("c", g).await;
    fx.track("c", "api_call", "250").await;
    let next = fx.pool("c", "api_call").await.next_reset_at.unwrap();
    fx.clock.set(next);
    let p = fx.pool("c", "api_call").await;
    assert_eq!(p.remaining, amt("550"));
    assert_eq!(p.granted, amt("550"));
    assert_eq!(p.rollovers.len(), 1);
    assert_eq!(p.rollovers[0].balance, amt("150"));
    let out = fx.track("c", "api_call", "100").await;
    assert!(matches!(out.entries[0].source, SourceKind::Rollover { .. }));
    assert_eq!(
        fx.pool("c", "api_call").await.rollovers[0].balance,
        amt("50")
    );
    assert_eq!(fx.bucket("c", "api_call", &id).await.remaining, amt("400"));
}

async fn rollover_percentage_cap(fx: Fx) {
    fx.customer("c").await;
    let g = Grant {
        rollover: rollover(None, Some("50"), 1),
        ..Grant::new("api_call", amt("200"), Interval::Month)
    };
    fx.grant("c", g).await;
    fx.track("c", "api_call", "50").await;
    fx.clock.set(ms_of(2027, 2, 1, 0, 0));
    let p = fx.pool("c", "api_call").await;
    assert_eq!(p.rollovers[0].balance, amt("100"));
    assert_eq!(p.remaining, amt("300"));
}

async fn lazy_reset(fx: Fx) {
    fx.customer("c").await;
    fx.monthly("c", "api_call", "100").await;
    fx.track("c", "api_call", "60").await;
    let next = fx.pool("c", "api_call").await.next_reset_at.unwrap();
    fx.clock.set(next + 1);
    let out = fx.engine.check("c", "api_call", amt("1")).await.unwrap();
    assert_eq!(out.pool("api_call").unwrap().remaining, amt("100"));
    fx.track("c", "api_call", "20").await;
    assert_eq!(fx.remaining("c", "api_call").await, amt("80"));
}

async fn exact_decimals(fx: Fx) {
    fx.customer("c").await;
    fx.one_off("c", "ai_credits", "500").await;
    fx.track("c", "action1", "0.1").await;
    fx.track("c", "action1", "0.2").await;
    assert_eq!(fx.remaining("c", "ai_credits").await, amt("499.94"));
    assert_eq!(fx.remaining("c", "ai_credits").await.to_string(), "499.94");
}

async fn rounding_up_per_source(fx: Fx) {
    fx.customer("c").await;
    fx.one_off("c", "thirds", "10").await;
    let out = fx.track("c", "third", "1").await;
    assert_eq!(out.entries[0].amount, amt("0.3334"));
    assert_eq!(fx.remaining("c", "thirds").await, amt("9.6666"));
    let out = fx.track("c", "third", "-1").await;
    assert_eq!(out.entries[0].amount, amt("-0.3334"));
    assert_eq!(fx.remaining("c", "thirds").await, amt("10"));
}

async fn month_end_clamps(fx: Fx) {
    for (year, feb) in [(2027, 28), (2028, 29)] {
        let c = format!("c{year}");
        fx.clock.set(ms_of(year, 1, 1, 0, 0));
        fx.customer(&c).await;
        let first = ms_of(year, 1, 31, 12, 0);
        fx.grant(
            &c,
            Grant {
                next_reset_at: Some(first),
                ..Grant::new("api_call", amt("10"), Interval::Month)
            },
        )
        .await;
        let mut seen = vec![];
        let mut t = first;
        for _ in 0..4 {
            fx.clock.set(t);
            t = fx.pool(&c, "api_call").await.next_reset_at.unwrap();
            let (_, m, d, tod) = civil_from_ms(t);
            assert_eq!(tod, 12 * HOUR_MS);
            seen.push((m, d));
        }
        assert_eq!(seen, vec![(2, feb), (3, 31), (4, 30), (5, 31)]);
    }
}

/// A fresh customer holding monthly 10 + hourly 5.
async fn lock_customer(fx: &Fx, id: &str) {
    fx.customer(id).await;
    fx.monthly(id, "api_call", "10").await;
    fx.grant(id, Grant::new("api_call", amt("5"), Interval::Hour))
        .await;
}

async fn reservations(fx: Fx) {
    let e = fx.engine.clone();
    let cases: [(&str, FinalizeAction, Option<&str>, &str); 4] = [
        ("a", FinalizeAction::Release, None, "15"),
        ("b", FinalizeAction::Confirm, None, "7"),
        ("c", FinalizeAction::Confirm, Some("5"), "10"),
        ("d", FinalizeAction::Confirm, Some("11"), "4"),
    ];
    for (c, action, over, want) in cases {
        lock_customer(&fx, c).await;
        let held = e
            .reserve(c, "L1", "api_call", amt("8"), None, None)
            .await
            .unwrap();
        assert!(held.allowed);
        assert_eq!(fx.remaining(c, "api_call").await, amt("7"));
        let first = e
            .finalize(c, "L1", action, over.map(amt), None)
            .await
            .unwrap();
        assert_eq!(fx.remaining(c, "api_call").await, amt(want), "customer {c}");
        let again = e
            .finalize(c, "L1", FinalizeAction::Release, None, None)
            .await
            .unwrap();
        assert_eq!(
            again.entries, first.entries,
            "finalizing twice returns the first outcome"
        );
        assert_eq!(fx.remaining(c, "api_call").await, amt(want));
    }
    lock_customer(&fx, "e").await;
    let expiry = start() + MINUTE_MS;
    e.reserve("e", "L1", "api_call", amt("8"), Some(expiry), None)
        .await
        .unwrap();
    let err = e
        .reserve("e", "L1", "api_call", amt("1"), None, None)
        .await
        .unwrap_err();
    assert_eq!(err, EngineError::LockAlreadyExists("L1".into()));
    assert_eq!(fx.remaining("e", "api_call").await, amt("7"));
    fx.clock.advance(2 * MINUTE_MS);
    assert_eq!(fx.remaining("e", "api_call").await, amt("15"));
    let err = e
        .finalize("e", "nope", FinalizeAction::Confirm, None, None)
        .await
        .unwrap_err();
    assert_eq!(err, EngineError::LockNotFound("nope".into()));
}

async fn idempotent_track(fx: Fx) {
    fx.customer("c").await;
    fx.monthly("c", "api_call", "10").await;
    let e = &fx.engine;
    let first = e
        .track("c", "api_call", amt("3"), OverageBehavior::Cap, Some("k"))
        .await
        .unwrap();
    let again = e
        .track("c", "api_call", amt("3.0"), OverageBehavior::Cap, Some("k"))
        .await
        .unwrap();
    assert!(!first.replayed && again.replayed);
    assert_eq!(first.entries, again.entries);
    assert_eq!(fx.remaining("c", "api_call").await, amt("7"));
    let err = e
        .track("c", "api_call", amt("4"), OverageBehavior::Cap, Some("k"))
        .await
        .unwrap_err();
    assert_eq!(err, EngineError::IdempotencyKeyReused);
    assert_eq!(fx.remaining("c", "api_call").await, amt("7"));
    // A refusal for lack of balance is remembered too.
    let err = e
        .track(
            "c",
            "api_call",
            amt("50"),
            OverageBehavior::Reject,
            Some("r"),
        )
        .await
        .unwrap_err();
    assert_eq!(err, EngineError::InsufficientBalance);
    fx.engine
        .update_bucket(
            "c",
            &BucketUpdate {
                pool: "api_call".into(),
                balance_id: None,
                change: BalanceChange::AddToBalance(amt("100")),
            },
        )
        .await
        .unwrap();
    let err = e
        .track(
            "c",
            "api_call",
            amt("50"),
            OverageBehavior::Reject,
            Some("r"),
        )
        .await
        .unwrap_err();
    assert_eq!(
        err,
        EngineError::InsufficientBalance,
        "the remembered refusal, not a new charge"
    );
    assert_eq!(fx.remaining("c", "api_call").await, amt("107"));
    // Records are scoped to the customer.
    fx.customer("d").await;
    fx.monthly("d", "api_call", "10").await;
    let other = e
        .track("d", "api_call", amt("3"), OverageBehavior::Cap, Some("k"))
        .await
        .unwrap();
    assert!(!other.replayed);
    // And forgotten after the retention time.
    fx.clock.advance(25 * HOUR_MS);
    let later = e
        .track("c", "api_call", amt("4"), OverageBehavior::Cap, Some("k"))
        .await
        .unwrap();
    assert!(!later.replayed);
}

async fn reject_and_overflow(fx: Fx) {
    fx.customer("c").await;
    let id = fx.monthly("c", "api_call", "10").await;
    let e = &fx.engine;
    let err = e
        .track("c", "api_call", amt("11"), OverageBehavior::Reject, None)
        .await
        .unwrap_err();
    assert_eq!(err, EngineError::InsufficientBalance);
    assert_eq!(fx.remaining("c", "api_call").await, amt("10"));
    let out = e
        .track("c", "api_call", amt("12"), OverageBehavior::Overflow, None)
        .await
        .unwrap();
    assert!(out.allowed);
    assert_eq!(fx.bucket("c", "api_call", &id).await.remaining, amt("-2"));
    assert_eq!(fx.pool("c", "api_call").await.usage, amt("12"));
}

async fn unlimited_absorbs(fx: Fx) {
    fx.customer("c").await;
    fx.monthly("c", "api_call", "10").await;
    let u = fx
        .grant(
            "c",
            Grant {
                unlimited: true,
                ..Grant::new("api_call", amt("0"), Interval::Month)
            },
        )
        .await;
    let out = fx.consume("c", "api_call", "1000").await;
    assert!(out.allowed);
    assert_eq!(out.entries.len(), 1);
    assert_eq!(out.entries[0].balance_id, u);
    let p = fx.pool("c", "api_call").await;
    assert!(p.unlimited);
    assert_eq!(p.usage, amt("1000"));
    assert_eq!(fx.bucket("c", "api_call", "b1").await.remaining, amt("10"));
}

async fn carried_debt(fx: Fx) {
    fx.customer("c").await;
    let g = Grant {
        overage_allowed: true,
        carry_debt: true,
        ..Grant::new("api_call", amt("100"), Interval::Month)
    };
    let id = fx.grant("c", g).await;
    fx.track("c", "api_call", "175").await;
    assert_eq!(fx.bucket("c", "api_call", &id).await.remaining, amt("-75"));
    fx.clock.set(ms_of(2027, 2, 1, 0, 0));
    assert_eq!(fx.bucket("c", "api_call", &id).await.remaining, amt("25"));
    fx.customer("f").await;
    let id = fx
        .grant(
            "f",
            Grant {
                overage_allowed: true,
                ..Grant::new("api_call", amt("100"), Interval::Month)
            },
        )
        .await;
    fx.track("f", "api_call", "175").await;
    fx.clock.set(ms_of(2027, 3, 1, 0, 0));
    assert_eq!(
        fx.bucket("f", "api_call", &id).await.remaining,
        amt("100"),
        "debt forgiven by default"
    );
}

/// Retry-After is never early: a bucket carrying debt does not refill to
/// its grant at the next reset, so the first reset that lets the request
/// through is the one the reset rule says, not the first one.
async fn retry_after_follows_carried_debt(fx: Fx) {
    fx.customer("c").await;
    let g = Grant {
        overage_allowed: true,
        overage_floor: Some(amt("-10")),
        carry_debt: true,
        ..Grant::new("api_call", amt("100"), Interval::Month)
    };
    let id = fx.grant("c", g).await;
    fx.engine
        .track("c", "api_call", amt("190"), OverageBehavior::Overflow, None)
        .await
        .unwrap();
    assert_eq!(fx.bucket("c", "api_call", &id).await.remaining, amt("-90"));
    let denied = fx.consume("c", "api_call", "50").await;
    assert!(!denied.allowed);
    let costs = catalog().pools_for("api_call").unwrap();
    let now = fx.clock.now_ms();
    let wait = creditgate::rules::retry_after_ms(&costs, &denied.pools, amt("50"), now);
    let (feb, mar) = (ms_of(2027, 2, 1, 0, 0), ms_of(2027, 3, 1, 0, 0));
    assert_eq!(wait, Some(mar - now), "the second reset, not the first");
    // The answer holds against the engine itself: denied after the first
    // reset (10 left, 10 more of overage), allowed after the second.
    fx.clock.set(feb);
    assert!(!fx.consume("c", "api_call", "50").await.allowed);
    fx.clock.set(mar);
    assert!(fx.consume("c", "api_call", "50").await.allowed);
}

async fn expiring_grants(fx: Fx) {
    fx.customer("c").await;
    let g = Grant {
        expires_at: Some(start() + DAY_MS),
        ..Grant::new("api_call", amt("10"), Interval::OneOff)
    };
    fx.grant("c", g).await;
    fx.one_off("c", "api_call", "5").await;
    let out = fx.consume("c", "api_call", "3").await;
    assert_eq!(out.entries[0].balance_id, "b1", "sooner expiry first");
    fx.clock.advance(DAY_MS);
    assert_eq!(fx.remaining("c", "api_call").await, amt("5"));
    assert_eq!(fx.pool("c", "api_call").await.buckets.len(), 1);
}

async fn bad_input_changes_nothing(fx: Fx) {
    fx.customer("c").await;
    fx.monthly("c", "api_call", "10").await;
    let e = &fx.engine;
    let month = |g: Grant| Grant {
        interval: Some(Interval::Month),
        ..g
    };
    let base = Grant::new("api_call", amt("1"), Interval::Month);
    // Each bad grant with the error it must get: invalid input naming the
    // field, or the typed error.
    let invalid = |field: &'static str| Err::<(), _>(field);
    let bad: Vec<(Grant, Result<(), &'static str>)> = vec![
        (
            Grant {
                granted: amt("-1"),
                ..base.clone()
            },
            invalid("included_grant"),
        ),
        (
            Grant {
                granted: amt("0"),
                ..base.clone()
            },
            invalid("included_grant"),
        ),
        (
            Grant {
                interval_count: Some(0),
                ..base.clone()
            },
            invalid("interval_count"),
        ),
        (
            Grant {
                pool: "".into(),
                ..base.clone()
            },
            invalid("feature_id"),
        ),
        (
            Grant {
                pool: "x".repeat(257),
                ..base.clone()
            },
            invalid("feature_id"),
        ),
        (
            Grant {
                balance_id: Some("a\nb".into()),
                ..base.clone()
            },
            invalid("balance_id"),
        ),
        (
            Grant {
                pool: "unknown".into(),
                ..base.clone()
            },
            Ok(()),
        ),
        (
            Grant {
                rollover: rollover(None, None, 65),
                ..base.clone()
            },
            invalid("rollover.length"),
        ),
        (
            Grant {
                rollover: rollover(Some("1"), Some("1"), 1),
                ..base.clone()
            },
            invalid("rollover"),
        ),
        (
            Grant {
                rollover: rollover(None, Some("101"), 1),
                ..base.clone()
            },
            invalid("rollover.max_percentage"),
        ),
        (
            Grant {
                rollover: rollover(None, None, 1),
                interval: Some(Interval::OneOff),
                ..base.clone()
            },
            invalid("rollover"),
        ),
        (
            Grant {
                rollover: rollover(None, None, 3),
                ..Grant::new("api_call", amt("1"), Interval::Day)
            },
            invalid("rollover.length"),
        ),
        (
            Grant {
                expires_at: Some(start() + DAY_MS),
                ..month(base.clone())
            },
            invalid("expires_at"),
        ),
        (
            Grant {
                overage_floor: Some(amt("-5")),
                ..base.clone()
            },
            invalid("overage_floor"),
        ),
    ];
    let field_of = |e: EngineError| match e {
        EngineError::InvalidInput { field, .. } => field,
        other => panic!("expected invalid input, got {other:?}"),
    };
    for (g, want) in bad {
        let err = e.grant("c", &g).await.expect_err("a bad grant is refused");
        match want {
            Err(field) => assert_eq!(field_of(err), field, "{g:?}"),
            // `Ok` marks the one that is not invalid input: an unknown pool.
            Ok(()) => assert_eq!(err, EngineError::FeatureNotFound("unknown".into())),
        }
    }
    // A day bucket may keep rollovers for two months (62 periods), not three.
    let ok = Grant {
        rollover: rollover(None, None, 2),
        ..Grant::new("api_call", amt("1"), Interval::Day)
    };
    assert!(e.grant("c", &ok).await.is_ok());
    let err = e
        .consume("c", "api_call", amt("-1"), None)
        .await
        .unwrap_err();
    assert_eq!(field_of(err), "required_balance");
    let err = e
        .track("c", "", amt("1"), OverageBehavior::Cap, None)
        .await
        .unwrap_err();
    assert_eq!(field_of(err), "feature_id");
    for id in ["".to_string(), "c".repeat(257), "bell\u{7}".to_string()] {
        let err = e.create_customer(&id).await.unwrap_err();
        assert_eq!(field_of(err), "customer_id", "{id:?}");
    }
    let up = BucketUpdate {
        pool: "api_call".into(),
        balance_id: None,
        change: BalanceChange::SetRemaining(creditgate::Amount::MAX),
    };
    assert!(e.update_bucket("c", &up).await.is_ok());
    let up = BucketUpdate {
        change: BalanceChange::AddToBalance(amt("1")),
        ..up
    };
    assert_eq!(
        e.update_bucket("c", &up).await.unwrap_err(),
        EngineError::AmountOutOfRange
    );
    assert_eq!(fx.pool("c", "api_call").await.buckets.len(), 2);
}

async fn too_many_buckets(fx: Fx) {
    fx.customer("c").await;
    for _ in 0..MAX_BUCKETS_PER_CUSTOMER {
        fx.one_off("c", "api_call", "1").await;
    }
    let err = fx
        .engine
        .grant("c", &Grant::new("api_call", amt("1"), Interval::OneOff))
        .await
        .unwrap_err();
    assert_eq!(err, EngineError::TooManyBuckets(64));
    let dup = Grant {
        balance_id: Some("b1".into()),
        ..Grant::new("action1", amt("1"), Interval::OneOff)
    };
    assert!(matches!(
        fx.engine.grant("c", &dup).await,
        Err(EngineError::BalanceAlreadyExists(_)) | Err(EngineError::TooManyBuckets(_))
    ));
}

async fn shared_engine_is_send(fx: Fx) {
    let e: Arc<dyn creditgate::Engine> = fx.engine.clone();
    fx.customer("c").await;
    let h = tokio::spawn(async move { e.balances("c").await.unwrap().pools.len() });
    assert_eq!(h.await.unwrap(), 0);
}

on_every_engine!(
    seed_plan,
    check_costs_without_deducting,
    consume_is_exact_and_all_or_nothing,
    unowned_features_are_never_allowed,
    feature_pool_before_credit_system,
    monthly_before_one_off,
    overage_then_refunds_heal_first,
    cap_drops_the_rest,
    concurrent_consumes_never_overdraw,
    rollover_is_capped_and_spent_first,
    rollover_percentage_cap,
    lazy_reset,
    exact_decimals,
    rounding_up_per_source,
    month_end_clamps,
    reservations,
    idempotent_track,
    reject_and_overflow,
    unlimited_absorbs,
    carried_debt,
    retry_after_follows_carried_debt,
    expiring_grants,
    bad_input_changes_nothing,
    too_many_buckets,
    shared_engine_is_send,
);
