//! Property tests of the in-process engine over random operation sequences
//! and clock jumps. Cases: `PROPTEST_CASES` (default 2048 per property).

mod common;

use std::collections::BTreeMap;

use common::{amt, catalog, start};
use creditgate::calendar::{add_months, Interval, DAY_MS, HOUR_MS};
use creditgate::model::Op;
use creditgate::model::*;
use creditgate::money::{Amount, AMOUNT_SCALE};
use creditgate::{Engine, ManualClock, MemoryEngine};
use proptest::prelude::*;
use std::sync::Arc;

const FEATURES: [&str; 6] = [
    "action1",
    "action2",
    "ai_credits",
    "api_call",
    "third",
    "thirds",
];

#[derive(Debug, Clone)]
enum Step {
    Grant(Grant),
    Consume(usize, i64),
    Check(usize, i64),
    Track(usize, i64, OverageBehavior),
    Reserve(u8, usize, i64, Option<i64>),
    Finalize(u8, bool, Option<i64>),
    Jump(i64),
}

fn pools() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "action1",
        "action2",
        "ai_credits",
        "api_call",
        "thirds",
    ])
}

fn grant(allow_debt: bool) -> impl Strategy<Value = Grant> {
    (
        pools(),
        0i64..=2_000,
        prop::sample::select(vec![
            Interval::OneOff,
            Interval::Month,
            Interval::Hour,
            Interval::Day,
            Interval::Week,
        ]),
        prop::option::weighted(0.4, (prop::option::of(0i64..500), any::<bool>(), 1u32..=2)),
        any::<bool>(),
        prop::option::weighted(0.2, 0i64..50),
        0u8..10,
    )
        .prop_map(move |(pool, n, interval, roll, carry, floor, flags)| {
            let resets = interval != Interval::OneOff;
            let rollover = roll
                .filter(|_| resets)
                .map(|(max, forever, length)| RolloverConfig {
                    max: max.map(Amount::whole),
                    max_percentage: None,
                    duration: if forever {
                        RolloverDuration::Forever
                    } else {
                        RolloverDuration::Month
                    },
                    length: (!forever).then_some(length),
                });
            let unlimited = flags == 0 && rollover.is_none();
            let overage_allowed = allow_debt && (flags == 1 || flags == 2 || n == 0);
            let expires_at = (flags == 3 && !resets).then_some(start() + 3 * DAY_MS);
            Grant {
                pool: pool.into(),
                granted: Amount::from_raw(n * AMOUNT_SCALE / 4).unwrap(),
                interval: Some(interval),
                rollover,
                unlimited,
                overage_allowed,
                overage_floor: floor.filter(|_| overage_allowed).map(|f| Amount::whole(-f)),
                carry_debt: allow_debt && carry && overage_allowed,
                expires_at,
                ..Grant::default()
            }
        })
}

fn units() -> impl Strategy<Value = i64> {
    prop_oneof![0i64..=50_000, 0i64..=5_000_000, Just(10_000)]
}

fn step(allow_debt: bool) -> impl Strategy<Value = Step> {
    let f = 0..FEATURES.len();
    let behavior = if allow_debt {
        prop::sample::select(vec![
            OverageBehavior::Cap,
            OverageBehavior::Reject,
            OverageBehavior::Overflow,
        ])
    } else {
        prop::sample::select(vec![OverageBehavior::Cap, OverageBehavior::Reject])
    };
    prop_oneof![
        2 => grant(allow_debt).prop_map(Step::Grant),
        3 => (f.clone(), units()).prop_map(|(f, u)| Step::Consume(f, u)),
        2 => (f.clone(), units()).prop_map(|(f, u)| Step::Check(f, u)),
        3 => (f.clone(), units(), behavior).prop_map(|(f, u, b)| Step::Track(f, u, b)),
        1 => (f.clone(), -2_000_000i64..0).prop_map(|(f, u)| Step::Track(f, u, OverageBehavior::Cap)),
        1 => (0u8..3, f, units(), prop::option::of(1i64..3 * HOUR_MS)).prop_map(|(l, f, u, e)| Step::Reserve(l, f, u, e)),
        1 => (0u8..3, any::<bool>(), prop::option::of(0i64..100_000)).prop_map(|(l, c, o)| Step::Finalize(l, c, o)),
        1 => prop_oneof![1i64..HOUR_MS, HOUR_MS..40 * DAY_MS, 40 * DAY_MS..800 * DAY_MS].prop_map(Step::Jump),
    ]
}

fn engine() -> (MemoryEngine, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(start()));
    (
        MemoryEngine::new(catalog(), clock.clone(), Retention::default()),
        clock,
    )
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

/// Per pool: Σ signed bucket remaining + Σ rollover balances, raw.
async fn totals(e: &MemoryEngine) -> BTreeMap<String, i128> {
    let b = e.balances("c").await.unwrap();
    b.pools
        .iter()
        .map(|p| {
            let t = p
                .buckets
                .iter()
                .map(|b| b.remaining.raw() as i128)
                .sum::<i128>()
                + p.rollovers
                    .iter()
                    .map(|r| r.balance.raw() as i128)
                    .sum::<i128>();
            (p.pool.clone(), t)
        })
        .collect()
}

fn op_of(s: &Step) -> Option<Op> {
    let feat = |f: &usize| FEATURES[*f].to_string();
    let a = |u: &i64| Amount::from_raw(*u).unwrap();
    Some(match s {
        Step::Consume(f, u) => Op::Consume {
            feature: feat(f),
            units: a(u),
        },
        Step::Track(f, u, b) => Op::Track {
            feature: feat(f),
            units: a(u),
            behavior: *b,
        },
        Step::Reserve(l, f, u, e) => Op::Reserve {
            lock_id: format!("L{l}"),
            feature: feat(f),
            units: a(u),
            expires_at: e.map(|e| start() + e),
        },
        Step::Finalize(l, confirm, o) => Op::Finalize {
            lock_id: format!("L{l}"),
            action: if *confirm {
                FinalizeAction::Confirm
            } else {
                FinalizeAction::Release
            },
            override_units: o.map(|o| Amount::from_raw(o).unwrap()),
        },
        _ => return None,
    })
}

/// Runs `steps`, checking conservation, floors, atomicity and check = consume
/// after each. Returns nothing; panics (fails the case) on a violation.
async fn run_checked(steps: Vec<Step>, allow_debt: bool) {
    let (e, clock) = engine();
    e.create_customer("c").await.unwrap();
    for s in &steps {
        if let Step::Jump(ms) = s {
            clock.advance(*ms);
            continue;
        }
        if let Step::Grant(g) = s {
            let _ = e.grant("c", g).await;
            continue;
        }
        let before = totals(&e).await;
        let before_state = e.balances("c").await.unwrap();
        if let Step::Check(f, u) = s {
            let feature = FEATURES[*f];
            let units = Amount::from_raw(*u).unwrap();
            let checked = e.check("c", feature, units).await;
            let consumed = e.consume("c", feature, units, None).await;
            match (checked, consumed) {
                (Ok(c), Ok(d)) => {
                    assert_eq!(c.allowed, d.allowed, "check and consume disagree");
                    assert_eq!(c.entries, d.entries, "check and consume took differently");
                }
                (c, d) => assert_eq!(c.map(|o| o.allowed), d.map(|o| o.allowed)),
            }
            continue;
        }
        let op = op_of(s).unwrap();
        let result = e.apply("c", &op, None).await;
        let after = totals(&e).await;
        // Conservation: what the answer reports equals what moved, per pool.
        let mut reported: BTreeMap<String, i128> = BTreeMap::new();
        if let Ok(out) = &result {
            for en in &out.entries {
                *reported.entry(en.pool.clone()).or_default() += en.amount.raw() as i128;
            }
            let replayed_finalize = out.replayed;
            if !replayed_finalize {
                for (pool, t) in &after {
                    let moved = before.get(pool).copied().unwrap_or(0) - t;
                    assert_eq!(
                        moved,
                        reported.get(pool).copied().unwrap_or(0),
                        "conservation in {pool} for {s:?}"
                    );
                }
            }
            // All or nothing: a refused consume, reserve or reject changes nothing.
            let refused = match s {
                Step::Consume(..) | Step::Reserve(..) => !out.allowed,
                Step::Track(_, _, OverageBehavior::Reject) => out.insufficient,
                _ => false,
            };
            // Refunds and releases never lift a bucket above its grant.
            let was: BTreeMap<&str, &BucketView> = before_state
                .pools
                .iter()
                .flat_map(|p| &p.buckets)
                .map(|b| (b.balance_id.as_str(), b))
                .collect();
            for p in e.balances("c").await.unwrap().pools {
                for b in &p.buckets {
                    let refunded = out
                        .entries
                        .iter()
                        .any(|en| en.balance_id == b.balance_id && en.amount.is_negative());
                    if let (true, Some(old)) = (refunded, was.get(b.balance_id.as_str())) {
                        assert!(
                            b.remaining <= b.granted.max(old.remaining),
                            "refund lifted {b:?} above its grant"
                        );
                    }
                }
            }
            if refused {
                assert_eq!(
                    e.balances("c").await.unwrap(),
                    before_state,
                    "refusal changed balances"
                );
                assert!(out.entries.is_empty());
            }
        } else {
            assert_eq!(
                e.balances("c").await.unwrap(),
                before_state,
                "an error changed balances"
            );
        }
        if !allow_debt {
            for p in e.balances("c").await.unwrap().pools {
                for b in p.buckets.iter().filter(|b| !b.unlimited) {
                    assert!(b.remaining.raw() >= 0, "bucket below its floor: {b:?}");
                }
            }
        }
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn conservation_and_atomicity(steps in prop::collection::vec(step(true), 1..40)) {
        block_on(run_checked(steps, true));
    }

    #[test]
    fn no_bucket_below_its_floor(steps in prop::collection::vec(step(false), 1..40)) {
        block_on(run_checked(steps, false));
    }

    /// Jumping k periods at once equals stepping through every boundary.
    #[test]
    fn lazy_reset_equals_stepwise(
        grants in prop::collection::vec(grant(true), 1..5),
        spend in prop::collection::vec((0..FEATURES.len(), units()), 0..6),
        periods in 1i64..80,
    ) {
        // Every day, week and month boundary falls on an hour boundary.
        let stops = (1..=periods).map(|h| start() + h * HOUR_MS).collect();
        let (lazy, eager) = block_on(lazy_and_stepwise(&grants, &spend, stops, start() + periods * HOUR_MS + 7));
        prop_assert_eq!(lazy, eager);
    }

    /// Months of idleness: one jump equals stepping month by month.
    #[test]
    fn lazy_monthly_reset_equals_stepwise(
        grants in prop::collection::vec(grant(true), 1..5),
        spend in prop::collection::vec((0..FEATURES.len(), units()), 0..6),
        months in 1i64..140,
    ) {
        let monthly: Vec<Grant> = grants
            .into_iter()
            .filter(|g| !matches!(g.interval, Some(Interval::Hour | Interval::Day | Interval::Week)))
            .collect();
        let stops = (1..=months).map(|m| add_months(start(), m)).collect();
        let (lazy, eager) = block_on(lazy_and_stepwise(&monthly, &spend, stops, add_months(start(), months) + 5));
        prop_assert_eq!(lazy, eager);
    }
}

/// The same customer on two engines: one jumps straight to `target`, the
/// other stops at every instant of `stops` first. Returns both balances.
async fn lazy_and_stepwise(
    grants: &[Grant],
    spend: &[(usize, i64)],
    stops: Vec<i64>,
    target: i64,
) -> (CustomerBalances, CustomerBalances) {
    let (lazy, lazy_clock) = engine();
    let (eager, eager_clock) = engine();
    for e in [&lazy, &eager] {
        e.create_customer("c").await.unwrap();
        for g in grants {
            let _ = e.grant("c", g).await;
        }
        for (f, u) in spend {
            let units = Amount::from_raw(*u).unwrap();
            let _ = e
                .track("c", FEATURES[*f], units, OverageBehavior::Overflow, None)
                .await;
        }
    }
    for t in stops {
        eager_clock.set(t);
        eager.reset_due("c").await.unwrap();
    }
    eager_clock.set(target);
    lazy_clock.set(target);
    (
        lazy.balances("c").await.unwrap(),
        eager.balances("c").await.unwrap(),
    )
}

#[test]
fn uncapped_forever_rollover_grows_and_stays_bounded() {
    block_on(async {
        let (e, clock) = engine();
        e.create_customer("c").await.unwrap();
        let g = Grant {
            rollover: Some(RolloverConfig {
                max: None,
                max_percentage: None,
                duration: RolloverDuration::Forever,
                length: None,
            }),
            ..Grant::new("api_call", amt("100000000000"), Interval::Minute)
        };
        e.grant("c", &g).await.unwrap();
        clock.advance(3 * creditgate::calendar::MINUTE_MS);
        let p = e.balances("c").await.unwrap().pools.remove(0);
        assert_eq!(p.rollovers.len(), 1);
        assert_eq!(
            p.rollovers[0].balance,
            amt("100000000000"),
            "capped at the money bound, not an error"
        );
        clock.advance(10 * 365 * DAY_MS);
        let p = e.balances("c").await.unwrap().pools.remove(0);
        // Each of bucket and rollover holds the bound; the pool total shows clamped to it.
        assert_eq!(p.rollovers[0].balance, Amount::MAX);
        assert_eq!(p.remaining, Amount::MAX);
    });
}
