//! Differential test: random workloads give identical answers on the
//! in-process engine (the reference, `rules.rs`) and the Redis engine (the
//! Functions library `lua/creditgate.lua`): every step's result (Ok/Err,
//! entries, allowed, uncovered, replayed, pools, the instant decided at) and
//! every customer's balances after every step.
//!
//! Cases: `PROPTEST_CASES` (default 1000), each a sequence of up to 60 steps
//! across three customers (one with `{`, `}`, `:`, a space and UTF-8 in its
//! id), every feature and credit system of the test catalog.
//!
//! Most cases inject one clock into both engines, with jumps from seconds
//! to years. About one case in five runs as production does, without an
//! injected clock: the library reads Redis `TIME`, every reply and error
//! reports the instant it used, and the reference replays each step at that
//! instant ([`RedisEngine::last_instant`], [`Outcome::at`]). There clock
//! jumps become real pauses of a few ms, and instants in requests lie
//! 1–25 ms ahead, so resets, expiries and lock releases fall due during
//! the case, on the hot path as well as in the sweep-free lazy path.

mod common;

use std::sync::Arc;

use common::{catalog, start};
use creditgate::calendar::{Interval, DAY_MS, HOUR_MS, MINUTE_MS};
use creditgate::engine::redis::RedisEngine;
use creditgate::limits::LimitSpec;
use creditgate::model::Op;
use creditgate::model::*;
use creditgate::{Amount, Clock, Engine, EngineError, ManualClock, MemoryEngine};
use proptest::prelude::*;

const CUSTOMERS: [&str; 3] = ["c0", "c1", "we{ir}d: é"];
const FEATURES: [&str; 9] = [
    "action1",
    "action2",
    "ai_credits",
    "api_call",
    "third",
    "thirds",
    "premium_message",
    "credits",
    "nope",
];
const POOLS: [&str; 6] = [
    "action1",
    "ai_credits",
    "api_call",
    "thirds",
    "credits",
    "action2",
];
const LOCKS: [&str; 4] = ["L1", "L2", "L3", "L{1}: é"];
const KEYS: [&str; 3] = ["k1", "k2", "k3"];

#[derive(Debug, Clone)]
enum Step {
    Create(usize),
    Grant(usize, Grant),
    Update(usize, BucketUpdate),
    Check(usize, &'static str, Amount),
    Apply(usize, Op, Option<&'static str>),
    Advance(i64),
    ResetDue(usize),
    /// Repeats the last `Apply` with the same idempotency key (k1 if none).
    Repeat,
    /// Replaces the customer's `rate_limits` list (issue 13).
    Limits(usize, Vec<LimitSpec>),
}

/// A limit on a feature or credit system the workload uses: fixed or
/// sliding windows (UTC or billing-cycle anchored) and rates, some shadow,
/// some disabled.
fn limit_spec() -> impl Strategy<Value = LimitSpec> {
    let feature =
        prop::sample::select(&["api_call", "action1", "ai_credits", "action2", "third"][..]);
    let window = (
        prop::sample::select(&["second", "minute", "hour", "day", "week", "month"][..]),
        prop_oneof![3 => Just(1u32), 1 => 2u32..4],
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.3),
        1i64..3_000_000,
    )
        .prop_map(|(i, n, billing, sliding, limit)| LimitSpec {
            interval: Some(i.into()),
            interval_count: Some(n),
            anchor: Some(if billing { "billing_cycle" } else { "utc" }.into()),
            window: Some(if sliding { "sliding" } else { "fixed" }.into()),
            limit: Amount::from_raw(limit),
            ..LimitSpec::default()
        });
    let rate = (
        prop::sample::select(&["second", "minute", "hour"][..]),
        1i64..500_000,
        10_000i64..3_000_000,
    )
        .prop_map(|(i, r, b)| LimitSpec {
            kind: Some("rate".into()),
            interval: Some(i.into()),
            rate: Amount::from_raw(r),
            burst: Amount::from_raw(b),
            ..LimitSpec::default()
        });
    (
        feature,
        prop_oneof![2 => window, 1 => rate],
        prop::bool::weighted(0.15),
        prop::bool::weighted(0.1),
        prop::option::weighted(0.5, prop::sample::select(&["l1", "l2", "l3"][..])),
    )
        .prop_map(|(f, spec, shadow, off, id)| LimitSpec {
            feature_id: f.into(),
            shadow: Some(shadow),
            enabled: Some(!off),
            id: id.map(String::from),
            ..spec
        })
}

fn raw_amount() -> impl Strategy<Value = i64> {
    prop_oneof![
        6 => 0i64..2_000_000,             // 0..200 with 4 digits
        3 => (0i64..300).prop_map(|n| n * 10_000),
        1 => 0i64..=1_000_000_000_000_000, // the whole range
        1 => Just(1_000_000_000_000_000i64),
    ]
}

fn amount() -> impl Strategy<Value = Amount> {
    raw_amount().prop_map(|r| Amount::from_raw(r).unwrap())
}

fn interval() -> impl Strategy<Value = Interval> {
    prop_oneof![
        4 => Just(Interval::OneOff),
        1 => Just(Interval::Minute),
        2 => Just(Interval::Hour),
        1 => Just(Interval::Day),
        1 => Just(Interval::Week),
        4 => Just(Interval::Month),
        1 => Just(Interval::Quarter),
        1 => Just(Interval::Year),
    ]
}

fn rollover() -> impl Strategy<Value = Option<RolloverConfig>> {
    let cap = prop_oneof![
        Just((None, None)),
        (0i64..3_000_000).prop_map(|m| (Some(Amount::from_raw(m).unwrap()), None)),
        (0i64..=1_000_000).prop_map(|p| (None, Some(Amount::from_raw(p).unwrap()))),
    ];
    prop_oneof![
        3 => Just(None),
        2 => (cap.clone(), 0u32..4).prop_map(|((max, pct), len)| Some(RolloverConfig {
            max,
            max_percentage: pct,
            duration: RolloverDuration::Month,
            length: (len > 0).then_some(len),
        })),
        1 => cap.prop_map(|(max, pct)| Some(RolloverConfig {
            max,
            max_percentage: pct,
            duration: RolloverDuration::Forever,
            length: None,
        })),
    ]
}

fn grant() -> impl Strategy<Value = Grant> {
    (
        (
            pool(),
            prop::option::weighted(0.15, prop::sample::select(&["x", "y", "b2"][..])),
            prop::option::weighted(0.2, Just("pro")),
            prop_oneof![8 => 0i64..5_000_000, 1 => Just(0i64), 1 => 0i64..=1_000_000_000_000_000],
            interval(),
            prop::option::weighted(0.2, 1u32..4),
        ),
        (
            prop::option::weighted(0.1, 1i64..90 * DAY_MS),
            prop::option::weighted(0.15, 1i64..400 * DAY_MS),
            rollover(),
            prop::bool::weighted(0.08),
            prop::bool::weighted(0.25),
            prop::option::weighted(0.4, -2_000_000i64..=0),
            prop::bool::weighted(0.3),
        ),
    )
        .prop_map(
            |((pool, bid, plan, granted, iv, count), (next, exp, ro, unl, ovg, floor, debt))| {
                Grant {
                    pool: pool.into(),
                    balance_id: bid.map(String::from),
                    plan_id: plan.map(String::from),
                    granted: Amount::from_raw(granted).unwrap(),
                    interval: Some(iv),
                    interval_count: count,
                    // Offsets from now; made absolute when the step runs.
                    next_reset_at: next,
                    expires_at: exp,
                    rollover: ro,
                    unlimited: unl,
                    overage_allowed: ovg,
                    overage_floor: floor.filter(|_| ovg).map(|f| Amount::from_raw(f).unwrap()),
                    carry_debt: debt,
                }
            },
        )
}

fn behavior() -> impl Strategy<Value = OverageBehavior> {
    prop_oneof![
        Just(OverageBehavior::Cap),
        Just(OverageBehavior::Reject),
        Just(OverageBehavior::Overflow)
    ]
}

fn key() -> impl Strategy<Value = Option<&'static str>> {
    prop_oneof![
        40 => prop::option::weighted(0.3, prop::sample::select(&KEYS[..])),
        1 => prop::sample::select(&["", "bad\u{1}key", "\u{85}"][..]).prop_map(Some),
    ]
}

fn customer() -> impl Strategy<Value = usize> + Clone {
    prop_oneof![5 => Just(0usize), 2 => Just(1usize), 2 => Just(2usize)]
}

fn feature() -> impl Strategy<Value = &'static str> + Clone {
    prop_oneof![
        8 => Just("api_call"),
        6 => Just("action1"),
        3 => Just("action2"),
        2 => Just("third"),
        2 => Just("ai_credits"),
        1 => prop::sample::select(&FEATURES[4..]),
    ]
}

fn pool() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        6 => Just("api_call"),
        4 => Just("ai_credits"),
        3 => Just("action1"),
        1 => prop::sample::select(&POOLS[..]),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let c = customer();
    let f = feature();
    prop_oneof![
        1 => c.clone().prop_map(Step::Create),
        4 => (c.clone(), grant()).prop_map(|(c, g)| Step::Grant(c, g)),
        1 => (c.clone(), pool(),
              prop::option::weighted(0.5, prop::sample::select(&["b1", "b2", "x"][..])),
              prop::bool::ANY, raw_amount(), prop::bool::ANY)
            .prop_map(|(c, pool, bid, set, v, neg)| {
                let v = Amount::from_raw(if neg { -v } else { v }).unwrap();
                Step::Update(c, BucketUpdate {
                    pool: pool.into(),
                    balance_id: bid.map(String::from),
                    change: if set { BalanceChange::SetRemaining(v) } else { BalanceChange::AddToBalance(v) },
                })
            }),
        3 => (c.clone(), f.clone(), amount()).prop_map(|(c, f, u)| Step::Check(c, f, u)),
        4 => (c.clone(), f.clone(), amount(), key()).prop_map(|(c, f, u, k)| {
            Step::Apply(c, Op::Consume { feature: f.into(), units: u }, k)
        }),
        6 => (c.clone(), f.clone(), amount(), prop::bool::weighted(0.25), behavior(), key())
            .prop_map(|(c, f, u, neg, b, k)| {
                let units = if neg { Amount::from_raw(-u.raw()).unwrap() } else { u };
                Step::Apply(c, Op::Track { feature: f.into(), units, behavior: b }, k)
            }),
        3 => (c.clone(), prop::sample::select(&LOCKS[..]), f.clone(), amount(),
              prop::option::weighted(0.5, -MINUTE_MS..2 * HOUR_MS), key())
            .prop_map(|(c, l, f, u, e, k)| Step::Apply(c, Op::Reserve {
                lock_id: l.into(), feature: f.into(), units: u, expires_at: e,
            }, k)),
        3 => (c.clone(), prop::sample::select(&LOCKS[..]), prop::bool::ANY,
              prop::option::weighted(0.4, amount()), key())
            .prop_map(|(c, l, confirm, o, k)| Step::Apply(c, Op::Finalize {
                lock_id: l.into(),
                action: if confirm { FinalizeAction::Confirm } else { FinalizeAction::Release },
                override_units: o,
            }, k)),
        4 => prop_oneof![
            4 => 1i64..2 * MINUTE_MS,
            3 => 1i64..DAY_MS,
            2 => 1i64..40 * DAY_MS,
            1 => 1i64..3 * 365 * DAY_MS,
        ].prop_map(Step::Advance),
        1 => c.clone().prop_map(Step::ResetDue),
        2 => Just(Step::Repeat),
        2 => (c, prop::collection::vec(limit_spec(), 0..4)).prop_map(|(c, l)| Step::Limits(c, l)),
    ]
}

/// Makes a step's relative instants absolute at `now`.
fn at(step: &Step, now: i64) -> Step {
    match step {
        Step::Grant(c, g) => Step::Grant(
            *c,
            Grant {
                next_reset_at: g.next_reset_at.map(|d| now + d),
                expires_at: g.expires_at.map(|d| now + d),
                ..g.clone()
            },
        ),
        Step::Apply(
            c,
            Op::Reserve {
                lock_id,
                feature,
                units,
                expires_at,
            },
            k,
        ) => Step::Apply(
            *c,
            Op::Reserve {
                lock_id: lock_id.clone(),
                feature: feature.clone(),
                units: *units,
                expires_at: expires_at.map(|d| now + d),
            },
            *k,
        ),
        s => s.clone(),
    }
}

#[derive(Debug, PartialEq)]
enum Answer {
    Created(Result<bool, EngineError>),
    Granted(Result<String, EngineError>),
    Updated(Result<(), EngineError>),
    Outcome(Result<Outcome, EngineError>),
    Resets(Result<u32, EngineError>),
    Limits(Result<Vec<creditgate::limits::LimitDef>, EngineError>),
    Moved,
}

/// Without an injected clock: instants in requests lie 1–25 ms ahead of
/// `now` (a past one stays in the past).
fn at_real_time(step: &Step, now: i64) -> Step {
    let soon = |d: i64| if d <= 0 { now + d } else { now + 1 + d % 25 };
    match step {
        Step::Grant(c, g) => Step::Grant(
            *c,
            Grant {
                next_reset_at: g.next_reset_at.map(soon),
                expires_at: g.expires_at.map(soon),
                ..g.clone()
            },
        ),
        Step::Apply(
            c,
            Op::Reserve {
                lock_id,
                feature,
                units,
                expires_at,
            },
            k,
        ) => Step::Apply(
            *c,
            Op::Reserve {
                lock_id: lock_id.clone(),
                feature: feature.clone(),
                units: *units,
                expires_at: expires_at.map(soon),
            },
            *k,
        ),
        s => s.clone(),
    }
}

async fn run(e: &dyn Engine, clock: &ManualClock, step: &Step) -> Answer {
    match step {
        Step::Create(c) => Answer::Created(e.create_customer(CUSTOMERS[*c]).await),
        Step::Grant(c, g) => Answer::Granted(e.grant(CUSTOMERS[*c], g).await),
        Step::Update(c, u) => Answer::Updated(e.update_bucket(CUSTOMERS[*c], u).await),
        Step::Check(c, f, u) => Answer::Outcome(e.check(CUSTOMERS[*c], f, *u).await),
        Step::Apply(c, op, k) => Answer::Outcome(e.apply(CUSTOMERS[*c], op, *k).await),
        Step::ResetDue(c) => Answer::Resets(e.reset_due(CUSTOMERS[*c]).await),
        Step::Repeat => Answer::Moved,
        Step::Limits(c, specs) => {
            use creditgate::limits::{LimitList, LimitSource, LimitsUpdate};
            let defs: Result<Vec<_>, _> = specs
                .iter()
                .map(|s| s.build(LimitList::RateLimits, LimitSource::RateLimits, &catalog()))
                .collect();
            match defs {
                Ok(defs) => {
                    let u = LimitsUpdate {
                        rate_limits: Some(defs),
                        ..LimitsUpdate::default()
                    };
                    Answer::Limits(e.set_limits(CUSTOMERS[*c], &u).await)
                }
                Err(_) => Answer::Moved,
            }
        }
        Step::Advance(ms) => {
            clock.advance(*ms);
            Answer::Moved
        }
    }
}

/// One step on Redis (on its own clock), then on the reference at the
/// instant Redis used.
async fn replay(
    red: &RedisEngine,
    mem: &MemoryEngine,
    clock: &ManualClock,
    step: &Step,
) -> (Answer, Answer) {
    if let Step::Advance(ms) = step {
        tokio::time::sleep(std::time::Duration::from_millis((*ms % 4) as u64)).await;
        return (Answer::Moved, Answer::Moved);
    }
    let b = run(red, clock, step).await;
    if let Some(t) = red.last_instant() {
        clock.set(t);
    }
    let a = run(mem, clock, step).await;
    (a, b)
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn redis_answers_like_memory(
        grants in prop::collection::vec((customer(), grant()), 1..6),
        steps in prop::collection::vec(step(), 1..60),
        start_customers in prop_oneof![1 => 1usize..3, 4 => Just(3usize)],
        redis_time in prop::bool::weighted(0.2),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mem_clock = Arc::new(ManualClock::new(start()));
            let red_clock = Arc::new(ManualClock::new(start()));
            let mem = MemoryEngine::new(catalog(), mem_clock.clone(), Retention::default());
            let red = if redis_time {
                tally_name("cases without an injected clock");
                common::redis::engine_on_redis_time(catalog(), Retention::default()).await
            } else {
                common::redis::engine(catalog(), red_clock.clone(), Retention::default()).await
            };
            for c in CUSTOMERS.iter().take(start_customers) {
                red.create_customer(c).await.unwrap();
                if redis_time {
                    mem_clock.set(red.last_instant().expect("create_customer reports its instant"));
                }
                mem.create_customer(c).await.unwrap();
            }
            let grants = grants.into_iter().map(|(c, g)| Step::Grant(c, g));
            let mut last_apply: Option<Step> = None;
            for (i, s) in grants.chain(steps).enumerate() {
                let s = match s {
                    Step::Repeat => match &last_apply {
                        Some(Step::Apply(c, op, k)) => Step::Apply(*c, op.clone(), Some(k.unwrap_or("k1"))),
                        _ => Step::Repeat,
                    },
                    s if redis_time => at_real_time(&s, mem_clock.now_ms()),
                    s => at(&s, mem_clock.now_ms()),
                };
                if let Step::Apply(..) = s {
                    last_apply = Some(s.clone());
                }
                let (a, b) = if redis_time {
                    replay(&red, &mem, &mem_clock, &s).await
                } else {
                    (run(&mem, &mem_clock, &s).await, run(&red, &red_clock, &s).await)
                };
                tally(&a);
                prop_assert_eq!(&a, &b, "step {} {:?}", i, s);
                for c in CUSTOMERS {
                    let b = red.balances(c).await;
                    if redis_time {
                        mem_clock.set(red.last_instant().expect("balances report their instant"));
                    }
                    let a = mem.balances(c).await;
                    if let Ok(bal) = &a {
                        let rows: usize = bal.pools.iter().map(|p| p.rollovers.len()).sum();
                        if rows > 0 {
                            tally_name(if rows > 1 { "balances with 2+ rollover rows" } else { "balances with a rollover row" });
                        }
                        if bal.pools.iter().any(|p| p.buckets.iter().any(|b| b.remaining.is_negative())) {
                            tally_name("balances with a negative bucket");
                        }
                    }
                    prop_assert_eq!(a, b, "balances of {} after step {} {:?}", c, i, s);
                }
            }
            Ok(())
        })?;
        if std::env::var("DIFF_STATS").is_ok() {
            let mut st = STATS.lock().unwrap().clone();
            st.sort();
            eprintln!("{st:#?}");
        }
    }
}

static STATS: std::sync::Mutex<Vec<(String, u64)>> = std::sync::Mutex::new(Vec::new());

fn tally_name(k: &str) {
    let mut s = STATS.lock().unwrap();
    match s.iter_mut().find(|(n, _)| n == k) {
        Some(e) => e.1 += 1,
        None => s.push((k.to_string(), 1)),
    }
}

fn tally(a: &Answer) {
    if let Answer::Outcome(Ok(o)) = a {
        if o.limit.is_some() {
            tally_name("outcome refused by a limit");
        }
        if !o.shadow_denied.is_empty() {
            tally_name("outcome with shadow denials");
        }
        if !o.limits.is_empty() {
            tally_name("outcome with limit statuses");
        }
    }
    let k = match a {
        Answer::Outcome(Ok(o)) if !o.entries.is_empty() => format!(
            "outcome entries={} replayed={}",
            o.entries.len().min(3),
            o.replayed
        ),
        Answer::Outcome(Ok(o)) => {
            format!("outcome empty allowed={} nb={}", o.allowed, o.no_balance)
        }
        Answer::Outcome(Err(e)) => format!("outcome err {}", e.code()),
        Answer::Granted(Err(e)) => format!("grant err {}", e.code()),
        Answer::Granted(Ok(_)) => "grant ok".into(),
        other => format!("{:?}", other).chars().take(30).collect(),
    };
    let mut s = STATS.lock().unwrap();
    match s.iter_mut().find(|(n, _)| *n == k) {
        Some(e) => e.1 += 1,
        None => s.push((k, 1)),
    }
}
