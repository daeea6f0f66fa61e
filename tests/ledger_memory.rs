//! The in-process engine's usage ledger (issue 14): the books balance
//! (replaying a customer's ledger from empty gives every balance and limit
//! counter), the usage queries and the deletes, at the engine and over HTTP.

mod common;

use std::sync::Arc;

use common::http::{harness, harness_with, T0};
use creditgate::calendar::Interval;
use creditgate::engine::BalanceDelete;
use creditgate::http::Auth;
use creditgate::ledger::{self, LedgerOp};
use creditgate::limits::Counter;
use creditgate::model::{FinalizeAction, Grant, OverageBehavior, Retention};
use creditgate::{Amount, Clock, Engine, ManualClock, MemoryEngine};
use serde_json::json;

const DAY: i64 = 86_400_000;

fn engine() -> (Arc<ManualClock>, Arc<MemoryEngine>) {
    let config = common::http::config();
    let clock = Arc::new(ManualClock::new(T0));
    let engine = Arc::new(MemoryEngine::new(
        config.catalog.clone(),
        clock.clone(),
        Retention::default(),
    ));
    (clock, engine)
}

fn monthly(pool: &str, granted: i64) -> Grant {
    Grant {
        pool: pool.into(),
        granted: Amount::whole(granted),
        interval: Some(Interval::Month),
        ..Grant::default()
    }
}

/// Replays the customer's ledger and holds it to the state: every balance's
/// remaining plus rollover balances, every window counter, every rate.
fn assert_books_balance(e: &MemoryEngine, customer: &str) {
    let entries = e.ledger_of(customer);
    let books = ledger::replay(&entries);
    let state = e.state_of(customer).expect("customer");
    for b in &state.buckets {
        let total = b.remaining.raw() as i128
            + b.rollovers
                .iter()
                .map(|r| r.balance.raw() as i128)
                .sum::<i128>();
        assert_eq!(
            books.balances.get(&b.id).copied().unwrap_or(0),
            total,
            "balance {} of {customer}",
            b.id
        );
    }
    for (id, amount) in &books.balances {
        if !state.buckets.iter().any(|b| &b.id == id) {
            assert_eq!(*amount, 0, "a gone balance {id} left {amount} on the books");
        }
    }
    for l in &state.limits {
        let book = books.limits.get(&l.def.id).copied().unwrap_or_default();
        match l.counter {
            Counter::Window { start, used, .. } => {
                if book.window_start == Some(start) {
                    assert_eq!(book.used, used as i128, "limit {}", l.def.id);
                } else {
                    assert_eq!(used, 0, "limit {} window {start}", l.def.id);
                }
            }
            Counter::Rate { tat } => assert_eq!(book.tat.unwrap_or(0), tat),
        }
    }
    // Ids strictly increase.
    for w in entries.windows(2) {
        assert!(ledger::parse_id(&w[0].id).unwrap() < ledger::parse_id(&w[1].id).unwrap());
    }
}

/// A small deterministic generator (no dependency on a seed crate).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replaying_the_ledger_gives_every_balance_and_counter() {
    let (clock, e) = engine();
    let customers = ["c0", "c1", "c2", "c3"];
    for c in customers {
        e.create_customer(c).await.unwrap();
        let mut g = monthly("credits", 200);
        g.rollover = Some(creditgate::model::RolloverConfig {
            max: Some(Amount::whole(100)),
            max_percentage: None,
            duration: creditgate::model::RolloverDuration::Month,
            length: Some(2),
        });
        e.grant(c, &g).await.unwrap();
        e.grant(c, &monthly("premium_message", 5)).await.unwrap();
        let limits = creditgate::limits::LimitsUpdate {
            usage_limits: Some(vec![creditgate::limits::LimitSpec {
                feature_id: "credits".into(),
                limit: Some(Amount::whole(150)),
                interval: Some("day".into()),
                ..Default::default()
            }
            .build(
                creditgate::limits::LimitList::UsageLimits,
                creditgate::limits::LimitSource::UsageLimits,
                e.catalog(),
            )
            .unwrap()]),
            ..Default::default()
        };
        e.set_limits(c, &limits).await.unwrap();
    }
    // Several tasks at once, each driving its own mix on every customer;
    // one task moves the clock (past two months in all).
    let mut tasks = vec![];
    for t in 0..4u64 {
        let e = e.clone();
        let clock = clock.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = Rng(0x9e37_79b9_7f4a_7c15 ^ (t + 1));
            for i in 0..200 {
                let c = ["c0", "c1", "c2", "c3"][r.below(4) as usize];
                let units = Amount::whole(r.below(12) as i64 + 1);
                let feature = ["basic_message", "premium_message"][r.below(2) as usize];
                let lock = format!("l{t}-{i}");
                let _ = match r.below(8) {
                    0 => e
                        .grant(c, &monthly("credits", 20))
                        .await
                        .map(|_| ())
                        .or(Ok::<(), ()>(())),
                    1 | 2 => e
                        .track(c, feature, units, OverageBehavior::Cap, None)
                        .await
                        .map(|_| ())
                        .or(Ok(())),
                    3 => e
                        .track(
                            c,
                            feature,
                            Amount::whole(-(r.below(5) as i64)),
                            OverageBehavior::Cap,
                            None,
                        )
                        .await
                        .map(|_| ())
                        .or(Ok(())),
                    4 => e
                        .consume(c, feature, units, None)
                        .await
                        .map(|_| ())
                        .or(Ok(())),
                    5 => {
                        let expires = Some(clock.now_ms() + DAY);
                        let _ = e.reserve(c, &lock, feature, units, expires, None).await;
                        let action = if r.below(2) == 0 {
                            FinalizeAction::Confirm
                        } else {
                            FinalizeAction::Release
                        };
                        let over = (r.below(3) == 0).then(|| Amount::whole(r.below(9) as i64));
                        if r.below(4) != 0 {
                            let _ = e.finalize(c, &lock, action, over, None).await;
                        }
                        Ok(())
                    }
                    6 => {
                        // Replays append nothing.
                        let key = format!("k{}", r.below(5));
                        let _ = e
                            .track(c, feature, units, OverageBehavior::Cap, Some(&key))
                            .await;
                        Ok(())
                    }
                    _ => {
                        if t == 0 {
                            clock.advance(DAY / 2 + r.below(DAY as u64) as i64);
                        }
                        let _ = e.reset_due(c).await;
                        Ok(())
                    }
                };
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    clock.advance(40 * DAY);
    e.sweep_due().await.unwrap();
    let mut total = 0;
    let mut resets = 0;
    for c in customers {
        let entries = e.ledger_of(c);
        total += entries.len();
        resets += entries.iter().filter(|x| x.op == LedgerOp::Reset).count();
        assert_books_balance(&e, c);
    }
    assert!(total >= 300, "only {total} entries");
    assert!(resets >= 4, "only {resets} resets");
    // An idempotent replay appends nothing.
    let before = e.ledger_of("c0").len();
    e.grant("c0", &monthly("basic_message", 50)).await.unwrap();
    let a = e
        .track(
            "c0",
            "basic_message",
            Amount::whole(1),
            OverageBehavior::Cap,
            Some("once"),
        )
        .await
        .unwrap();
    let b = e
        .track(
            "c0",
            "basic_message",
            Amount::whole(1),
            OverageBehavior::Cap,
            Some("once"),
        )
        .await
        .unwrap();
    assert!(!a.replayed && b.replayed);
    assert_eq!(e.ledger_of("c0").len(), before + 2);
    assert_books_balance(&e, "c0");
}

#[tokio::test]
async fn a_reset_is_its_own_entry_and_deletes_leave_the_books_at_zero() {
    let (clock, e) = engine();
    e.create_customer("a").await.unwrap();
    let id = e.grant("a", &monthly("credits", 100)).await.unwrap();
    e.track(
        "a",
        "premium_message",
        Amount::whole(3),
        OverageBehavior::Cap,
        None,
    )
    .await
    .unwrap();
    clock.advance(32 * DAY);
    e.track(
        "a",
        "basic_message",
        Amount::whole(1),
        OverageBehavior::Cap,
        None,
    )
    .await
    .unwrap();
    let ops: Vec<LedgerOp> = e.ledger_of("a").iter().map(|x| x.op).collect();
    assert_eq!(
        ops,
        [
            LedgerOp::Grant,
            LedgerOp::Track,
            LedgerOp::Reset,
            LedgerOp::Track
        ]
    );
    let reset = &e.ledger_of("a")[2];
    assert_eq!(reset.balances[0].amount, Amount::whole(30));
    // Used this period: refused without force, nothing changes.
    let d = BalanceDelete {
        balance_id: Some(id.clone()),
        ..Default::default()
    };
    let err = e.delete_balance("a", &d).await.unwrap_err();
    assert_eq!(err.code().as_str(), "balance_in_use");
    assert_eq!(e.ledger_of("a").len(), 4);
    let forced = BalanceDelete { force: true, ..d };
    assert_eq!(e.delete_balance("a", &forced).await.unwrap(), id);
    let last = e.ledger_of("a").last().cloned().unwrap();
    assert_eq!(last.op, LedgerOp::DeleteBalance);
    assert_eq!(last.balances[0].amount, Amount::whole(-99));
    assert_books_balance(&e, "a");
    // A customer delete: its ledger stays, each balance leaves the books.
    e.grant("a", &monthly("premium_message", 7)).await.unwrap();
    e.delete_customer("a").await.unwrap();
    assert!(e.state_of("a").is_none());
    let entries = e.ledger_of("a");
    let last = entries.last().unwrap();
    assert_eq!(last.op, LedgerOp::DeleteCustomer);
    assert_eq!(last.balances[0].amount, Amount::whole(-7));
    assert!(ledger::replay(&entries).balances.values().all(|v| *v == 0));
    assert_eq!(
        e.balances("a").await.unwrap_err().code().as_str(),
        "customer_not_found"
    );
}

#[tokio::test]
async fn events_list_pages_newest_first_over_http() {
    let h = harness();
    h.customer_on("alice", "pro").await;
    for v in 1..=5 {
        let a = h
            .post(
                "/v1/track",
                json!({"customer_id": "alice", "feature_id": "premium_message", "value": v}),
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.text);
        h.clock.advance(1000);
    }
    h.post(
        "/v1/track",
        json!({"customer_id": "alice", "feature_id": "basic_message", "value": -1}),
    )
    .await;
    let page = h
        .post(
            "/v1/events.list",
            json!({"customer_id": "alice", "feature_id": "premium_message", "limit": 2.0, "start_cursor": ""}),
        )
        .await;
    assert_eq!(page.status, 200, "{}", page.text);
    let list = page.json["list"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["value"], 5);
    assert_eq!(list[1]["value"], 4);
    assert_eq!(list[0]["customer_id"], "alice");
    assert_eq!(list[0]["properties"]["op"], "track");
    assert_eq!(list[0]["deductions"][0]["value"], 50);
    assert_eq!(list[0]["deductions"][0]["feature_id"], "credits");
    let cursor = page.json["next_cursor"].as_str().unwrap().to_string();
    let mut seen = vec![5, 4];
    let mut cursor = Some(cursor);
    while let Some(c) = cursor {
        let p = h
            .post(
                "/v1/events.list",
                json!({"customer_id": "alice", "feature_id": ["premium_message"], "limit": 2, "start_cursor": c}),
            )
            .await;
        for e in p.json["list"].as_array().unwrap() {
            seen.push(e["value"].as_i64().unwrap());
        }
        cursor = p.json["next_cursor"].as_str().map(str::to_string);
    }
    assert_eq!(seen, [5, 4, 3, 2, 1]);
    // Every feature: the refund too, negative, newest first.
    let all = h
        .post("/v1/events.list", json!({"customer_id": "alice"}))
        .await;
    let list = all.json["list"].as_array().unwrap();
    assert_eq!(list.len(), 6);
    assert_eq!(list[0]["value"], -1);
    assert_eq!(list[0]["properties"]["op"], "refund");
    assert!(all.json["next_cursor"].is_null());
    // A range: the first two seconds only.
    let r = h
        .post(
            "/v1/events.list",
            json!({"customer_id": "alice", "custom_range": {"start": T0, "end": T0 + 2000}}),
        )
        .await;
    assert_eq!(r.json["list"].as_array().unwrap().len(), 2);
    // Bad input: named, 400.
    for (body, field) in [
        (json!({"customer_id": "alice", "limit": 0}), "limit"),
        (
            json!({"customer_id": "alice", "start_cursor": "x"}),
            "start_cursor",
        ),
        (json!({"customer_id": "alice", "range": "1y"}), "range"),
        (
            json!({"customer_id": "alice", "feature_id": 5}),
            "feature_id",
        ),
    ] {
        let a = h.post("/v1/events.list", body).await;
        assert_eq!(a.status, 400, "{}", a.text);
        assert_eq!(a.code(), "invalid_inputs");
        assert!(
            a.json["message"].as_str().unwrap().contains(field),
            "{}",
            a.text
        );
    }
    let a = h
        .post("/v1/events.list", json!({"customer_id": "nobody"}))
        .await;
    assert_eq!(a.status, 404);
    let a = h
        .post(
            "/v1/events.list",
            json!({"customer_id": "alice", "feature_id": "nope"}),
        )
        .await;
    assert_eq!(a.code(), "feature_not_found");
}

#[tokio::test]
async fn events_aggregate_bins_and_groups_over_http() {
    let h = harness();
    h.customer_on("alice", "pro").await;
    h.customer_on("bob", "pro").await;
    // Day 0: 2 + 3 premium, day 1: 4 basic, a refund of 1 basic on day 2.
    for (c, f, v) in [
        ("alice", "premium_message", 2.5),
        ("bob", "premium_message", 3.0),
    ] {
        h.post(
            "/v1/track",
            json!({"customer_id": c, "feature_id": f, "value": v}),
        )
        .await;
    }
    h.clock.advance(DAY);
    h.post(
        "/v1/track",
        json!({"customer_id": "alice", "feature_id": "basic_message", "value": 4}),
    )
    .await;
    h.clock.advance(DAY);
    h.post(
        "/v1/track",
        json!({"customer_id": "alice", "feature_id": "basic_message", "value": -1}),
    )
    .await;
    let a = h
        .post(
            "/v1/events.aggregate",
            json!({"customer_id": "alice", "feature_id": ["premium_message", "basic_message"],
                   "custom_range": {"start": T0, "end": T0 + 3 * DAY}, "bin_size": "day"}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let list = a.json["list"].as_array().unwrap();
    assert_eq!(list.len(), 3);
    assert_eq!(list[0]["period"], T0);
    assert_eq!(list[0]["values"]["premium_message"], 2.5);
    assert_eq!(list[0]["values"]["basic_message"], 0);
    assert_eq!(list[1]["values"]["basic_message"], 4);
    assert_eq!(list[2]["values"]["basic_message"], -1);
    assert_eq!(a.json["total"]["basic_message"]["sum"], 3);
    assert_eq!(a.json["total"]["basic_message"]["count"], 2);
    assert_eq!(a.json["total"]["premium_message"]["sum"], 2.5);
    // Every customer, grouped by customer.
    let g = h
        .post(
            "/v1/events.aggregate",
            json!({"feature_id": "premium_message", "range": "7d", "group_by": "$customer_id"}),
        )
        .await;
    assert_eq!(g.status, 200, "{}", g.text);
    let bins = g.json["list"].as_array().unwrap();
    let grouped: Vec<_> = bins
        .iter()
        .filter(|b| b["values"]["premium_message"] != 0)
        .collect();
    assert_eq!(grouped.len(), 1);
    assert_eq!(
        grouped[0]["grouped_values"]["premium_message"]["alice"],
        2.5
    );
    assert_eq!(grouped[0]["grouped_values"]["premium_message"]["bob"], 3);
    assert_eq!(g.json["total"]["premium_message"]["sum"], 5.5);
    // Plans: the pro plan's bucket paid; 24 hourly bins for 24h.
    let p = h
        .post(
            "/v1/events.aggregate",
            json!({"customer_id": "alice", "feature_id": "premium_message", "group_by": "$plan_id",
                   "custom_range": {"start": T0, "end": T0 + DAY}}),
        )
        .await;
    assert_eq!(p.status, 200, "{}", p.text);
    assert_eq!(
        p.json["list"][0]["grouped_values"]["premium_message"]["pro"], 2.5,
        "{}",
        p.text
    );
    let p = h
        .post(
            "/v1/events.aggregate",
            json!({"customer_id": "alice", "feature_id": "premium_message", "range": "24h"}),
        )
        .await;
    assert_eq!(p.json["list"].as_array().unwrap().len(), 24, "{}", p.text);
    // last_cycle: the previous month of the pro bucket holds day 0's usage.
    h.clock.advance(31 * DAY);
    let l = h
        .post(
            "/v1/events.aggregate",
            json!({"customer_id": "alice", "feature_id": "premium_message", "range": "last_cycle", "bin_size": "month"}),
        )
        .await;
    assert_eq!(l.status, 200, "{}", l.text);
    assert_eq!(l.json["total"]["premium_message"]["sum"], 2.5, "{}", l.text);
    for (body, field) in [
        (
            json!({"customer_id": "alice", "feature_id": "premium_message"}),
            "range",
        ),
        (
            json!({"customer_id": "alice", "feature_id": "premium_message", "range": "7d", "bin_size": "year"}),
            "bin_size",
        ),
        (
            json!({"customer_id": "alice", "feature_id": "premium_message", "range": "7d", "group_by": "properties.x"}),
            "group_by",
        ),
        (
            json!({"customer_id": "alice", "feature_id": "premium_message", "custom_range": {"start": T0, "end": T0}}),
            "custom_range",
        ),
        (
            json!({"customer_id": "alice", "feature_id": "premium_message", "range": "7d", "custom_range": {"start": T0, "end": T0 + 1}}),
            "custom_range",
        ),
        (json!({"customer_id": "alice", "range": "7d"}), "feature_id"),
    ] {
        let a = h.post("/v1/events.aggregate", body).await;
        assert_eq!(a.status, 400, "{}", a.text);
        assert_eq!(a.code(), "invalid_inputs");
        assert!(
            a.json["message"].as_str().unwrap().contains(field),
            "{}",
            a.text
        );
    }
}

#[tokio::test]
async fn deletes_are_admin_only_and_on_the_ledger_over_http() {
    let h = harness_with(Auth {
        api_keys: vec!["sk_app".into()],
        admin_keys: vec!["sk_admin".into()],
    });
    static ADMIN: [(&str, &str); 1] = [("authorization", "Bearer sk_admin")];
    static APP: [(&str, &str); 1] = [("authorization", "Bearer sk_app")];
    let (admin, app) = (&ADMIN, &APP);
    let post = |path: &'static str, body: serde_json::Value, key: &'static [(&str, &str)]| {
        let h = &h;
        async move { h.post_with(path, &body.to_string(), key).await }
    };
    let a = post(
        "/v1/billing.attach",
        json!({"customer_id": "alice", "plan_id": "pro"}),
        admin,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    post(
        "/v1/track",
        json!({"customer_id": "alice", "feature_id": "premium_message"}),
        app,
    )
    .await;
    let a = post(
        "/v1/balances.delete",
        json!({"customer_id": "alice", "feature_id": "credits"}),
        app,
    )
    .await;
    assert_eq!(a.status, 403);
    let a = post(
        "/v1/balances.delete",
        json!({"customer_id": "alice", "feature_id": "credits"}),
        admin,
    )
    .await;
    assert_eq!(a.status, 409, "{}", a.text);
    assert_eq!(a.code(), "balance_in_use");
    let a = post(
        "/v1/balances.delete",
        json!({"customer_id": "alice", "feature_id": "credits", "force": true}),
        admin,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["success"], true);
    assert_eq!(a.json["balance_id"], "pro:credits");
    let a = post(
        "/v1/balances.delete",
        json!({"customer_id": "alice", "feature_id": "credits"}),
        admin,
    )
    .await;
    assert_eq!(a.code(), "balance_not_found");
    let a = post("/v1/customers.delete", json!({"customer_id": "alice"}), app).await;
    assert_eq!(a.status, 403);
    let a = post(
        "/v1/customers.delete",
        json!({"customer_id": "alice"}),
        admin,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = post("/v1/customers.get", json!({"customer_id": "alice"}), app).await;
    assert_eq!(a.status, 404);
    // Its usage is still listed.
    let a = post("/v1/events.list", json!({"customer_id": "alice"}), app).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["list"].as_array().unwrap().len(), 1);
    let a = post(
        "/v1/customers.delete",
        json!({"customer_id": "alice"}),
        admin,
    )
    .await;
    assert_eq!(a.code(), "customer_not_found");
}

/// A store without a ledger (the Redis engine until its ledger lands):
/// every required method delegates, the ledger's stay the trait defaults.
struct NoLedger(Arc<MemoryEngine>);

#[async_trait::async_trait]
impl Engine for NoLedger {
    async fn create_customer(&self, c: &str) -> Result<bool, creditgate::EngineError> {
        self.0.create_customer(c).await
    }
    async fn grant(&self, c: &str, g: &Grant) -> Result<String, creditgate::EngineError> {
        self.0.grant(c, g).await
    }
    async fn update_bucket(
        &self,
        c: &str,
        u: &creditgate::model::BucketUpdate,
    ) -> Result<(), creditgate::EngineError> {
        self.0.update_bucket(c, u).await
    }
    async fn check(
        &self,
        c: &str,
        f: &str,
        u: Amount,
    ) -> Result<creditgate::model::Outcome, creditgate::EngineError> {
        self.0.check(c, f, u).await
    }
    async fn apply(
        &self,
        c: &str,
        op: &creditgate::model::Op,
        k: Option<&str>,
    ) -> Result<creditgate::model::Outcome, creditgate::EngineError> {
        self.0.apply(c, op, k).await
    }
    async fn balances(
        &self,
        c: &str,
    ) -> Result<creditgate::model::CustomerBalances, creditgate::EngineError> {
        self.0.balances(c).await
    }
    async fn reset_due(&self, c: &str) -> Result<u32, creditgate::EngineError> {
        self.0.reset_due(c).await
    }
    async fn sweep_due(&self) -> Result<creditgate::engine::SweepReport, creditgate::EngineError> {
        self.0.sweep_due().await
    }
}

#[tokio::test]
async fn a_store_without_a_ledger_answers_ledger_not_configured() {
    let config = common::http::config();
    let (clock, e) = engine();
    let state = creditgate::http::AppState::new(
        Arc::new(NoLedger(e)),
        config.catalog.clone(),
        clock.clone(),
    )
    .configured(&config);
    let router = creditgate::http::app(state);
    common::http::call(
        &router,
        "POST",
        "/v1/customers.get_or_create",
        json!({"customer_id": "a"}),
    )
    .await;
    for (path, body) in [
        ("/v1/events.list", json!({"customer_id": "a"})),
        (
            "/v1/events.aggregate",
            json!({"customer_id": "a", "feature_id": "credits", "range": "7d"}),
        ),
        ("/v1/customers.delete", json!({"customer_id": "a"})),
        (
            "/v1/balances.delete",
            json!({"customer_id": "a", "feature_id": "credits"}),
        ),
    ] {
        let a = common::http::call(&router, "POST", path, body).await;
        assert_eq!(a.status, 400, "{path}: {}", a.text);
        assert_eq!(a.code(), "ledger_not_configured", "{path}");
    }
    // The customer is untouched.
    let a = common::http::call(
        &router,
        "POST",
        "/v1/customers.get",
        json!({"customer_id": "a"}),
    )
    .await;
    assert_eq!(a.status, 200);
}
