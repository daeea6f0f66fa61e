//! The Redis engine's usage ledger (issue 14): every function that changes a
//! balance or a limit counter appends its entry to the slot's stream in the
//! same call; the drain copies the streams into SQLite; replaying a
//! customer's entries from the database gives every balance and counter the
//! engine holds. The stream's cap refuses before anything is written.

mod common;

use std::sync::Arc;

use common::http::T0;
use common::redis::{namespace, RedisServer};
use creditgate::calendar::Interval;
use creditgate::engine::redis::keys;
use creditgate::engine::redis::{RedisEngine, RedisOptions};
use creditgate::ledger::drain::{Drain, DrainOptions};
use creditgate::ledger::store::LedgerStore;
use creditgate::ledger::{self, LedgerEntry, LedgerOp};
use creditgate::limits::Counter;
use creditgate::model::{
    BalanceChange, BucketUpdate, FinalizeAction, Grant, OverageBehavior, Retention,
};
use creditgate::{Amount, Clock, Engine, EngineError, ManualClock};

const DAY: i64 = 86_400_000;

struct Fx {
    clock: Arc<ManualClock>,
    engine: Arc<RedisEngine>,
    ns: String,
    conn: redis::aio::ConnectionManager,
    store: LedgerStore,
    _dir: tempfile::TempDir,
}

async fn fx(cap: u64) -> Fx {
    fx_on(cap, None).await
}

/// [`fx`] with the ledger in the database at `url` (default: a SQLite file
/// in a temp dir).
async fn fx_on(cap: u64, url: Option<String>) -> Fx {
    let config = common::http::config();
    let clock = Arc::new(ManualClock::new(T0));
    let ns = namespace();
    let opts = RedisOptions {
        namespace: ns.clone(),
        retention: Retention::default(),
        ledger_cap: Some(cap),
        ..RedisOptions::standalone(&RedisServer::shared().url())
    };
    let c: Arc<dyn Clock> = clock.clone();
    let engine = RedisEngine::connect(opts, config.catalog.clone(), Some(c))
        .await
        .expect("connect the redis engine");
    let client = redis::Client::open(RedisServer::shared().url()).unwrap();
    let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = url.unwrap_or_else(|| format!("sqlite://{}/ledger.db", dir.path().display()));
    let store = LedgerStore::open(&url).await.unwrap();
    Fx {
        clock,
        engine: Arc::new(engine),
        ns,
        conn,
        store,
        _dir: dir,
    }
}

impl Fx {
    fn stream_of(&self, customer: &str) -> String {
        keys::ledger_stream(&self.engine.keys(customer).due)
    }

    /// Drains every slot's stream of the namespace into the store until
    /// none holds an entry; returns how many were committed.
    async fn drain(&self) -> u64 {
        let streams = keys::ledger_streams(&self.ns);
        let opts = DrainOptions {
            create_groups: false,
            ..DrainOptions::default()
        };
        let mut d = Drain::new(self.conn.clone(), self.store.clone(), streams, opts);
        // A round that finds nothing pending turns to new entries: the
        // next one reads them.
        for _ in 0..1000 {
            if d.round().await.unwrap() == 0 && d.backlog().await.unwrap() == 0 {
                return d.stats.committed;
            }
        }
        panic!("the drain did not empty the streams")
    }

    async fn entries(&self, customer: &str) -> Vec<LedgerEntry> {
        self.store.entries_of(customer).await.unwrap()
    }

    /// Replays the customer's entries from the database and holds them to
    /// what Redis holds: every balance's remaining plus rollover balances,
    /// every window counter, every rate.
    async fn assert_books_balance(&self, customer: &str) {
        let entries = self.entries(customer).await;
        let books = ledger::replay(&entries);
        let b = self.engine.balances(customer).await.unwrap();
        let mut seen = vec![];
        for p in &b.pools {
            for x in &p.buckets {
                let total = x.remaining.raw() as i128
                    + x.rollovers
                        .iter()
                        .map(|r| r.balance.raw() as i128)
                        .sum::<i128>();
                assert_eq!(
                    books.balances.get(&x.balance_id).copied().unwrap_or(0),
                    total,
                    "balance {} of {customer}",
                    x.balance_id
                );
                seen.push(x.balance_id.clone());
            }
        }
        for (id, amount) in &books.balances {
            if !seen.contains(id) {
                assert_eq!(*amount, 0, "a gone balance {id} left {amount} on the books");
            }
        }
        let mut conn = self.conn.clone();
        let field: Option<String> = redis::cmd("HGET")
            .arg(&self.engine.keys(customer).customer)
            .arg(keys_limits_field())
            .query_async(&mut conn)
            .await
            .unwrap();
        let limits = creditgate::engine::redis::limits::decode(&field.unwrap_or_default()).unwrap();
        for l in &limits {
            let book = books.limits.get(&l.def.id).copied().unwrap_or_default();
            match l.counter {
                Counter::Window { start, used, .. } => {
                    if book.window_start == Some(start) {
                        assert_eq!(book.used, used as i128, "limit {} of {customer}", l.def.id);
                    } else {
                        assert_eq!(used, 0, "limit {} window {start} of {customer}", l.def.id);
                    }
                }
                Counter::Rate { tat } => {
                    assert_eq!(
                        book.tat.unwrap_or(0),
                        tat,
                        "rate {} of {customer}",
                        l.def.id
                    )
                }
            }
        }
        for w in entries.windows(2) {
            assert!(ledger::parse_id(&w[0].id).unwrap() < ledger::parse_id(&w[1].id).unwrap());
        }
    }
}

fn keys_limits_field() -> &'static str {
    creditgate::engine::redis::limits::FIELD
}

fn monthly(pool: &str, granted: i64) -> Grant {
    Grant {
        pool: pool.into(),
        granted: Amount::whole(granted),
        interval: Some(Interval::Month),
        ..Grant::default()
    }
}

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

fn limits(catalog: &creditgate::model::Catalog, rate: bool) -> creditgate::limits::LimitsUpdate {
    use creditgate::limits::{LimitList, LimitSource, LimitSpec};
    let window = LimitSpec {
        feature_id: "credits".into(),
        limit: Some(Amount::whole(150)),
        interval: Some("day".into()),
        ..Default::default()
    }
    .build(LimitList::UsageLimits, LimitSource::UsageLimits, catalog)
    .unwrap();
    let rate = rate.then(|| {
        vec![LimitSpec {
            feature_id: "premium_message".into(),
            kind: Some("rate".into()),
            rate: Some(Amount::whole(7)),
            interval: Some("hour".into()),
            burst: Some(Amount::whole(9)),
            ..Default::default()
        }
        .build(LimitList::RateLimits, LimitSource::RateLimits, catalog)
        .unwrap()]
    });
    creditgate::limits::LimitsUpdate {
        usage_limits: Some(vec![window]),
        rate_limits: rate,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replaying_the_drained_ledger_gives_every_balance_and_counter() {
    let f = fx(1_000_000).await;
    let e = f.engine.clone();
    let config = common::http::config();
    // Ids with escapes: the entry carries the id, not the key's tag.
    let customers = ["c0", "c1", "c 2%{x}", "c3"];
    for (i, c) in customers.iter().enumerate() {
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
        let expiring = Grant {
            expires_at: Some(T0 + 10 * DAY),
            ..monthly("premium_message", 1000)
        };
        let expiring = Grant {
            interval: None,
            ..expiring
        };
        e.grant(c, &expiring).await.unwrap();
        if i < 2 {
            e.set_limits(c, &limits(&config.catalog, i == 0))
                .await
                .unwrap();
        }
    }
    let mut tasks = vec![];
    for t in 0..4u64 {
        let e = e.clone();
        let clock = f.clock.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = Rng(0x9e37_79b9_7f4a_7c15 ^ (t + 1));
            for i in 0..200 {
                let c = ["c0", "c1", "c 2%{x}", "c3"][r.below(4) as usize];
                let units = Amount::whole(r.below(12) as i64 + 1);
                let feature = ["basic_message", "premium_message"][r.below(2) as usize];
                let lock = format!("l{t}-{i}");
                match r.below(9) {
                    0 if r.below(2) == 0 => {
                        let _ = e.grant(c, &monthly("credits", 20)).await;
                    }
                    0 => {
                        let change = if r.below(2) == 0 {
                            BalanceChange::AddToBalance(Amount::whole(r.below(7) as i64))
                        } else {
                            BalanceChange::SetRemaining(Amount::whole(50 + r.below(50) as i64))
                        };
                        let u = BucketUpdate {
                            pool: "credits".into(),
                            balance_id: None,
                            change,
                        };
                        let _ = e.update_bucket(c, &u).await;
                    }
                    1 | 2 => {
                        let _ = e.track(c, feature, units, OverageBehavior::Cap, None).await;
                    }
                    3 => {
                        let back = Amount::whole(-(r.below(5) as i64));
                        let _ = e.track(c, feature, back, OverageBehavior::Cap, None).await;
                    }
                    4 => {
                        let _ = e.consume(c, feature, units, None).await;
                    }
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
                    }
                    6 => {
                        let key = format!("k{}", r.below(5));
                        let _ = e
                            .track(c, feature, units, OverageBehavior::Cap, Some(&key))
                            .await;
                    }
                    7 => {
                        let _ = e
                            .track(c, feature, units, OverageBehavior::Overflow, None)
                            .await;
                    }
                    _ => {
                        if t == 0 {
                            clock.advance(DAY / 2 + r.below(DAY as u64) as i64);
                        }
                        let _ = e.reset_due(c).await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    f.clock.advance(40 * DAY);
    e.sweep_due().await.unwrap();
    let committed = f.drain().await;
    let mut total = 0;
    let mut ops = std::collections::BTreeMap::<&'static str, usize>::new();
    for c in customers {
        let entries = f.entries(c).await;
        total += entries.len();
        for x in &entries {
            assert_eq!(x.customer_id, c);
            *ops.entry(x.op.as_str()).or_default() += 1;
        }
        f.assert_books_balance(c).await;
    }
    assert_eq!(
        total as u64, committed,
        "every drained entry is a customer's"
    );
    assert!(total >= 300, "only {total} entries: {ops:?}");
    for op in [
        LedgerOp::Grant,
        LedgerOp::Track,
        LedgerOp::Refund,
        LedgerOp::Consume,
        LedgerOp::Reserve,
        LedgerOp::Finalize,
        LedgerOp::LockExpired,
        LedgerOp::Reset,
        LedgerOp::Expire,
        LedgerOp::Update,
    ] {
        assert!(
            ops.get(op.as_str()).copied().unwrap_or(0) > 0,
            "no {op:?} entry: {ops:?}"
        );
    }
}

#[tokio::test]
async fn each_change_is_its_own_entry_and_a_replay_appends_nothing() {
    let f = fx(1_000_000).await;
    let e = &f.engine;
    e.create_customer("a").await.unwrap();
    let id = e.grant("a", &monthly("credits", 100)).await.unwrap();
    // The hot path (no limits, no key): premium at 10 credits each.
    let t = e
        .track(
            "a",
            "premium_message",
            Amount::whole(3),
            OverageBehavior::Cap,
            None,
        )
        .await
        .unwrap();
    assert!(t.allowed);
    f.clock.advance(32 * DAY);
    e.track(
        "a",
        "basic_message",
        Amount::whole(1),
        OverageBehavior::Cap,
        Some("once"),
    )
    .await
    .unwrap();
    let again = e
        .track(
            "a",
            "basic_message",
            Amount::whole(1),
            OverageBehavior::Cap,
            Some("once"),
        )
        .await
        .unwrap();
    assert!(again.replayed);
    // A denial appends nothing.
    let denied = e
        .consume("a", "premium_message", Amount::whole(1000), None)
        .await
        .unwrap();
    assert!(!denied.allowed);
    f.drain().await;
    let entries = f.entries("a").await;
    let ops: Vec<LedgerOp> = entries.iter().map(|x| x.op).collect();
    assert_eq!(
        ops,
        [
            LedgerOp::Grant,
            LedgerOp::Track,
            LedgerOp::Reset,
            LedgerOp::Track
        ]
    );
    let track = &entries[1];
    assert_eq!(track.feature_id.as_deref(), Some("premium_message"));
    assert_eq!(track.units, Amount::whole(3));
    assert_eq!(track.balances.len(), 1);
    assert_eq!(track.balances[0].balance_id, id);
    assert_eq!(track.balances[0].pool, "credits");
    assert_eq!(track.balances[0].amount, Amount::whole(-30));
    assert_eq!(track.at, T0);
    assert_eq!(entries[2].balances[0].amount, Amount::whole(30));
    assert_eq!(entries[3].idempotency_key.as_deref(), Some("once"));
    assert_eq!(entries[3].at, T0 + 32 * DAY);
    f.assert_books_balance("a").await;
}

#[tokio::test]
async fn a_full_stream_refuses_before_writing_and_drains_back_to_service() {
    let f = fx(3).await;
    let e = &f.engine;
    e.create_customer("a").await.unwrap();
    e.grant("a", &monthly("credits", 100)).await.unwrap();
    for _ in 0..2 {
        e.consume("a", "basic_message", Amount::whole(1), None)
            .await
            .unwrap();
    }
    let before = e.balances("a").await.unwrap();
    // The stream holds 3 (the grant, two consumes): the fast path and the
    // general path (a key) both refuse, and nothing moves.
    for key in [None, Some("k")] {
        let err = e
            .consume("a", "basic_message", Amount::whole(1), key)
            .await
            .unwrap_err();
        assert!(matches!(err, EngineError::StoreFull(_)), "{err:?}");
        assert_eq!(err.code().as_str(), "store_full");
    }
    let err = e.grant("a", &monthly("credits", 1)).await.unwrap_err();
    assert!(matches!(err, EngineError::StoreFull(_)), "{err:?}");
    assert_eq!(e.balances("a").await.unwrap(), before, "nothing moved");
    // Reads and denials write no entry: still answered.
    let denied = e
        .check("a", "premium_message", Amount::whole(1000))
        .await
        .unwrap();
    assert!(!denied.allowed);
    let mut conn = f.conn.clone();
    let len: u64 = redis::cmd("XLEN")
        .arg(f.stream_of("a"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 3);
    assert_eq!(f.drain().await, 3);
    e.consume("a", "basic_message", Amount::whole(1), Some("k"))
        .await
        .unwrap();
    f.drain().await;
    assert_eq!(f.entries("a").await.len(), 4);
    f.assert_books_balance("a").await;
}

/// `serve`'s wiring: Redis with `[ledger] url` runs the drain over every
/// slot's stream; `events.list` and `events.aggregate` answer from the
/// database once it caught up; `/readyz` and `/metrics` show the backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_drains_every_slot_into_the_database_and_answers_usage_queries_from_it() {
    use axum::http::StatusCode;
    use common::http::{call, CONFIG};
    use serde_json::json;
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let text = format!("{CONFIG}\n[ledger]\nurl = \"sqlite://{}\"\n", db.display());
    let env =
        std::collections::BTreeMap::from([("CREDITGATE_REDIS_URL".to_string(), server.url())]);
    let config = creditgate::config::Config::parse(&text, &env, 0).expect("config");
    let (state, in_process) = creditgate::server::state_from_config(&config)
        .await
        .expect("state");
    assert!(!in_process);
    let router = creditgate::http::app(state);
    for c in ["alice", "b%o{b}"] {
        let a = call(
            &router,
            "POST",
            "/v1/customers.get_or_create",
            json!({"customer_id": c}),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        let a = call(
            &router,
            "POST",
            "/v1/billing.attach",
            json!({"customer_id": c, "plan_id": "pro"}),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    }
    for v in 1..=3 {
        let a = call(
            &router,
            "POST",
            "/v1/track",
            json!({"customer_id": "alice", "feature_id": "premium_message", "value": v}),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    }
    let a = call(
        &router,
        "POST",
        "/v1/track",
        json!({"customer_id": "b%o{b}", "feature_id": "basic_message", "value": 2}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let a = call(
        &router,
        "POST",
        "/v1/track",
        json!({"customer_id": "alice", "feature_id": "basic_message", "value": -1}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    // The drain catches up: the backlog reaches 0 and alice's five usage
    // entries are in the database (awaited, bounded).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let list = loop {
        let ready = call(&router, "GET", "/readyz", json!(null)).await;
        let page = call(
            &router,
            "POST",
            "/v1/events.list",
            json!({"customer_id": "alice"}),
        )
        .await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.text);
        let list = page.json["list"].as_array().unwrap().clone();
        if ready.json["ledger_backlog"] == 0 && list.len() == 4 {
            assert_eq!(ready.json["ledger_drain_failing"], false);
            break list;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the drain did not catch up: {} / {}",
            ready.text,
            page.text
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let values: Vec<_> = list.iter().map(|e| e["value"].clone()).collect();
    assert_eq!(
        values,
        [json!(-1), json!(3), json!(2), json!(1)],
        "newest first"
    );
    assert_eq!(list[0]["properties"]["op"], "refund");
    assert_eq!(list[1]["customer_id"], "alice");
    assert_eq!(list[1]["deductions"][0]["feature_id"], "credits");
    assert_eq!(list[1]["deductions"][0]["value"], 30);
    assert_eq!(
        list[1]["deductions"][0]["plan_id"], "pro",
        "the hot path names the plan"
    );
    // Pages: two, then the rest.
    let p = call(
        &router,
        "POST",
        "/v1/events.list",
        json!({"customer_id": "alice", "limit": 3}),
    )
    .await;
    assert_eq!(p.json["list"].as_array().unwrap().len(), 3);
    let c = p.json["next_cursor"].as_str().unwrap().to_string();
    let p = call(
        &router,
        "POST",
        "/v1/events.list",
        json!({"customer_id": "alice", "limit": 3, "start_cursor": c}),
    )
    .await;
    assert_eq!(p.json["list"][0]["value"], 1);
    assert!(p.json["next_cursor"].is_null());
    // A customer id needing escapes in its key tag is its own.
    let b = call(
        &router,
        "POST",
        "/v1/events.list",
        json!({"customer_id": "b%o{b}"}),
    )
    .await;
    assert_eq!(b.json["list"].as_array().unwrap().len(), 1, "{}", b.text);
    assert_eq!(b.json["list"][0]["customer_id"], "b%o{b}");
    // Aggregates: by SQL sums, and grouped from the entries.
    let agg = call(
        &router,
        "POST",
        "/v1/events.aggregate",
        json!({"customer_id": "alice", "feature_id": ["premium_message", "basic_message"], "range": "24h", "bin_size": "day"}),
    )
    .await;
    assert_eq!(agg.status, StatusCode::OK, "{}", agg.text);
    assert_eq!(
        agg.json["total"]["premium_message"]["sum"], 6,
        "{}",
        agg.text
    );
    assert_eq!(
        agg.json["total"]["premium_message"]["count"], 3,
        "{}",
        agg.text
    );
    assert_eq!(
        agg.json["total"]["basic_message"]["sum"], -1,
        "{}",
        agg.text
    );
    let g = call(
        &router,
        "POST",
        "/v1/events.aggregate",
        json!({"feature_id": "basic_message", "range": "24h", "group_by": "$customer_id"}),
    )
    .await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.text);
    let bins = g.json["list"].as_array().unwrap();
    let sum_of = |who: &str| -> f64 {
        bins.iter()
            .filter_map(|b| b["grouped_values"]["basic_message"][who].as_f64())
            .sum()
    };
    assert_eq!(
        (sum_of("alice"), sum_of("b%o{b}")),
        (-1.0, 2.0),
        "{}",
        g.text
    );
    let last = call(
        &router,
        "POST",
        "/v1/events.aggregate",
        json!({"customer_id": "alice", "feature_id": "premium_message", "range": "last_cycle"}),
    )
    .await;
    assert_eq!(last.status, StatusCode::OK, "{}", last.text);
    let metrics = call(&router, "GET", "/metrics", json!(null)).await;
    assert!(
        metrics.text.contains("creditgate_ledger_backlog 0\n"),
        "{}",
        metrics.text
    );
    assert!(
        metrics.text.contains("creditgate_ledger_drain_failing 0\n"),
        "{}",
        metrics.text
    );
    // A delete over HTTP: one call, its entry drained like the others.
    let d = call(
        &router,
        "POST",
        "/v1/customers.delete",
        json!({"customer_id": "b%o{b}"}),
    )
    .await;
    assert_eq!(d.status, StatusCode::OK, "{}", d.text);
    assert_eq!(d.json["success"], true);
    let gone = call(
        &router,
        "POST",
        "/v1/customers.get",
        json!({"customer_id": "b%o{b}"}),
    )
    .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND, "{}", gone.text);
    // The entries are in the file itself.
    let store = LedgerStore::open(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    assert_eq!(
        store
            .entries_of("alice")
            .await
            .unwrap()
            .iter()
            .filter(|e| e.op.is_usage())
            .count(),
        4
    );
}

/// A ledger database that cannot be opened is a configuration error naming
/// `ledger.url`, before anything is served.
#[tokio::test]
async fn a_ledger_that_cannot_be_opened_stops_the_start() {
    let server = RedisServer::shared();
    let text = format!(
        "{}\n[ledger]\nurl = \"sqlite:///nonexistent-dir/x/ledger.db\"\n",
        common::http::CONFIG
    );
    let env =
        std::collections::BTreeMap::from([("CREDITGATE_REDIS_URL".to_string(), server.url())]);
    let config = creditgate::config::Config::parse(&text, &env, 0).expect("config");
    let err = match creditgate::server::state_from_config(&config).await {
        Ok(_) => panic!("a ledger that cannot be opened must stop the start"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("ledger.url"), "{err}");
}

/// The crash test (issue 14): tracks and refunds at 64-way concurrency with
/// the drain running; mid-way the drain is killed (its task aborted: read,
/// maybe written, not acknowledged) and the database goes away (`down`);
/// the load goes on into the streams; the database comes back (`up`) and a
/// drain under another consumer name claims the dead one's entries. Then:
/// the books balance for every customer, every acknowledged request is in
/// the database exactly once, and no entry is there twice.
async fn crash_test(f: Fx, mut down: impl FnMut(), mut up: impl FnMut()) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const TASKS: u64 = 64;
    const OPS: u64 = 30;
    let e = f.engine.clone();
    let customers: Vec<String> = (0..8).map(|i| format!("crash-{i}")).collect();
    for c in &customers {
        e.create_customer(c).await.unwrap();
        e.grant(c, &monthly("credits", 1_000_000)).await.unwrap();
    }
    let streams = keys::ledger_streams(&f.ns);
    let opts = |consumer: &str| DrainOptions {
        consumer: consumer.into(),
        batch: 50,
        claim_idle_ms: 200,
        idle_poll: std::time::Duration::from_millis(10),
        create_groups: false,
        ..DrainOptions::default()
    };
    let first = Drain::new(
        f.conn.clone(),
        f.store.clone(),
        streams.clone(),
        opts("one"),
    );
    let first_status = first.status();
    let first = tokio::spawn(first.run(std::future::pending()));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = vec![];
    for t in 0..TASKS {
        let (e, customers, done) = (e.clone(), customers.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut r = Rng(0x2545_f491_4f6c_dd1d ^ (t + 1));
            let mut acked = vec![];
            for i in 0..OPS {
                let c = customers[r.below(8) as usize].clone();
                let units = if r.below(4) == 0 {
                    -(r.below(3) as i64 + 1)
                } else {
                    r.below(5) as i64 + 1
                };
                let feature = ["basic_message", "premium_message"][r.below(2) as usize];
                let key = format!("crash-{t}-{i}");
                let a = e
                    .track(
                        &c,
                        feature,
                        Amount::whole(units),
                        OverageBehavior::Cap,
                        Some(&key),
                    )
                    .await
                    .expect("the streams take the load while the database is away");
                assert!(!a.replayed);
                if i % 7 == 0 {
                    // A retry with the same key: answered, not charged again.
                    let again = e
                        .track(
                            &c,
                            feature,
                            Amount::whole(units),
                            OverageBehavior::Cap,
                            Some(&key),
                        )
                        .await
                        .unwrap();
                    assert!(again.replayed);
                }
                // A refund with nothing to give back changes nothing: no
                // entry (the ledger records changes).
                let moved = a.entries.iter().any(|x| x.amount != Amount::ZERO);
                acked.push((c, key, moved));
                done.fetch_add(1, Ordering::Relaxed);
            }
            acked
        }));
    }
    let total = (TASKS * OPS) as usize;
    let reach = |n: usize| {
        let done = done.clone();
        async move {
            while done.load(Ordering::Relaxed) < n {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        }
    };
    reach(total / 3).await;
    // Killed while working: it has committed entries, and more keep coming.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while first_status.committed() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first drain committed nothing"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let committed_before_kill = first_status.committed();
    first.abort();
    let _ = first.await;
    down();
    reach(2 * total / 3).await;
    let mut conn = f.conn.clone();
    let waiting = creditgate::ledger::drain::backlog(&mut conn, &streams)
        .await
        .unwrap();
    assert!(
        waiting > 0,
        "entries wait in the streams while nothing drains"
    );
    up();
    let second = Drain::new(
        f.conn.clone(),
        f.store.clone(),
        streams.clone(),
        opts("two"),
    );
    let second = tokio::spawn(second.run(std::future::pending()));
    let mut acked = vec![];
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert_eq!(acked.len(), total);
    // Awaited (bounded): the streams empty into the database.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while creditgate::ledger::drain::backlog(&mut conn, &streams)
        .await
        .unwrap()
        > 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the drain did not catch up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    second.abort();
    let mut by_key: std::collections::HashMap<String, usize> = Default::default();
    let mut ids = std::collections::HashSet::new();
    for c in &customers {
        f.assert_books_balance(c).await;
        for entry in f.entries(c).await {
            assert!(
                ids.insert((entry.customer_id.clone(), entry.id.clone())),
                "{} twice",
                entry.id
            );
            if let Some(k) = entry.idempotency_key {
                assert_eq!(entry.customer_id, *c);
                *by_key.entry(k).or_default() += 1;
            }
        }
    }
    let mut moved = 0;
    for (c, key, changed) in &acked {
        if *changed {
            assert_eq!(by_key.get(key), Some(&1), "{key} of {c} exactly once");
            moved += 1;
        } else {
            assert_eq!(by_key.get(key), None, "{key} of {c} changed nothing");
        }
    }
    assert!(moved > total / 2, "most requests moved a balance: {moved}");
    println!(
        "crash test: {total} acknowledged requests ({moved} moved a balance); the first drain \
         committed {committed_before_kill} before it was killed; {waiting} entries waited in the \
         streams while the database was down; every one stored once"
    );
    assert_eq!(
        by_key.len(),
        moved,
        "no entry of a request never acknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_test_into_postgres_killed_mid_load() {
    let Some(pg) = common::postgres::Postgres::start() else {
        return;
    };
    let url = pg.database("crash");
    let f = fx_on(1_000_000, Some(url)).await;
    let pg = std::sync::Mutex::new(pg);
    crash_test(
        f,
        || pg.lock().unwrap().stop(),
        || pg.lock().unwrap().resume(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_test_into_sqlite_locked_mid_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let f = fx_on(1_000_000, Some(format!("sqlite://{}", path.display()))).await;
    // "Down": another process holds SQLite's write lock (past the store's
    // busy timeout) until "up" releases it.
    let holder = std::sync::Mutex::new(None::<std::process::Child>);
    let down = || {
        let mut child = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import sqlite3,sys; c=sqlite3.connect('{}', isolation_level=None); c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read(); c.execute('COMMIT')",
                path.display()
            ))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 holds the lock");
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked");
        *holder.lock().unwrap() = Some(child);
    };
    let up = || {
        if let Some(mut child) = holder.lock().unwrap().take() {
            drop(child.stdin.take());
            child.wait().unwrap();
        }
    };
    crash_test(f, down, up).await;
}

/// Deletes on Redis (issue 14): a balance used this period only with
/// `force`; a customer's hash, locks and due entry go; each delete is its
/// entry, so the customer's ledger replays to zero; without a ledger both
/// refuse (a delete must be on the record).
#[tokio::test]
async fn deletes_go_on_the_ledger_and_replay_to_zero() {
    use creditgate::engine::BalanceDelete;
    let f = fx(1_000_000).await;
    let e = &f.engine;
    let config = common::http::config();
    e.create_customer("del").await.unwrap();
    let used = e.grant("del", &monthly("credits", 200)).await.unwrap();
    let unused = e
        .grant(
            "del",
            &Grant {
                interval: None,
                ..monthly("credits", 50)
            },
        )
        .await
        .unwrap();
    e.set_limits("del", &limits(&config.catalog, true))
        .await
        .unwrap();
    e.track(
        "del",
        "premium_message",
        Amount::whole(2),
        OverageBehavior::Cap,
        None,
    )
    .await
    .unwrap();
    e.reserve("del", "lk", "basic_message", Amount::whole(3), None, None)
        .await
        .unwrap();
    let by_id = |id: &str, force: bool| BalanceDelete {
        feature_id: None,
        balance_id: Some(id.to_string()),
        interval: None,
        force,
    };
    let err = e
        .delete_balance("del", &by_id(&used, false))
        .await
        .unwrap_err();
    assert_eq!(err.code().as_str(), "balance_in_use", "{err}");
    let several = BalanceDelete {
        feature_id: Some("credits".into()),
        balance_id: None,
        interval: None,
        force: true,
    };
    let err = e.delete_balance("del", &several).await.unwrap_err();
    assert_eq!(err.code().as_str(), "invalid_inputs", "{err}");
    assert!(err.to_string().contains("balance_id"), "{err}");
    let err = e
        .delete_balance("del", &by_id("nope", true))
        .await
        .unwrap_err();
    assert_eq!(err.code().as_str(), "balance_not_found");
    // Refusals wrote nothing: only the grants, the track and the reserve
    // (new limits with every counter at zero move nothing).
    assert_eq!(f.drain().await, 4);
    let one_off = BalanceDelete {
        feature_id: Some("credits".into()),
        balance_id: None,
        interval: Some(Interval::OneOff),
        force: false,
    };
    assert_eq!(e.delete_balance("del", &one_off).await.unwrap(), unused);
    assert_eq!(
        e.delete_balance("del", &by_id(&used, true)).await.unwrap(),
        used
    );
    f.drain().await;
    f.assert_books_balance("del").await;
    let ops: Vec<_> = f.entries("del").await.iter().map(|x| x.op).collect();
    assert_eq!(
        &ops[ops.len() - 2..],
        [LedgerOp::DeleteBalance, LedgerOp::DeleteBalance]
    );
    // The customer, with its lock pending and its limits' counters moved.
    e.grant("del", &monthly("premium_message", 9))
        .await
        .unwrap();
    e.track(
        "del",
        "premium_message",
        Amount::whole(1),
        OverageBehavior::Cap,
        None,
    )
    .await
    .unwrap();
    e.delete_customer("del").await.unwrap();
    assert_eq!(
        e.balances("del").await.unwrap_err().code().as_str(),
        "customer_not_found"
    );
    let mut conn = f.conn.clone();
    let k = e.keys("del");
    let (exists, due): (u32, Option<f64>) = redis::pipe()
        .cmd("EXISTS")
        .arg(&k.customer)
        .arg(format!("{}:l", k.customer))
        .cmd("ZSCORE")
        .arg(&k.due)
        .arg("del")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((exists, due), (0, None), "hash, locks and due entry gone");
    f.drain().await;
    let entries = f.entries("del").await;
    let last = entries.last().unwrap();
    assert_eq!(last.op, LedgerOp::DeleteCustomer);
    let books = ledger::replay(&entries);
    assert!(books.balances.values().all(|v| *v == 0), "{books:?}");
    assert!(
        books
            .limits
            .values()
            .all(|l| l.used == 0 && l.tat.unwrap_or(0) == 0),
        "{books:?}"
    );
    // A customer that is not there: named, nothing written.
    let err = e.delete_customer("del").await.unwrap_err();
    assert_eq!(err.code().as_str(), "customer_not_found");
    assert_eq!(f.drain().await, 0);
    // Without a ledger: refused, the customer kept.
    let opts = RedisOptions {
        namespace: f.ns.clone(),
        ..RedisOptions::standalone(&RedisServer::shared().url())
    };
    let plain = RedisEngine::connect(opts, config.catalog.clone(), None)
        .await
        .unwrap();
    plain.create_customer("kept").await.unwrap();
    let err = plain.delete_customer("kept").await.unwrap_err();
    assert_eq!(err.code().as_str(), "ledger_not_configured");
    assert!(plain.balances("kept").await.is_ok());
}

/// Drain throughput over every slot's stream, as `serve` drains:
/// `cargo test --release --test redis_ledger -- --ignored --nocapture throughput`.
/// 40,000 tracks by 64 tasks on 4,000 customers (so ~3,700 slot streams hold
/// entries), then the drain alone, timed until the database holds them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn drain_throughput_over_every_slot() {
    let pg = common::postgres::Postgres::start();
    let mut targets = vec![("sqlite", None)];
    if let Some(pg) = &pg {
        targets.push(("postgres", Some(pg.database("throughput"))));
    }
    for (name, url) in targets {
        let f = fx_on(10_000_000, url).await;
        let e = f.engine.clone();
        const CUSTOMERS: usize = 4000;
        const TRACKS: usize = 40_000;
        for i in 0..CUSTOMERS {
            let c = format!("tp-{i}");
            e.create_customer(&c).await.unwrap();
            e.grant(&c, &monthly("credits", 1_000_000)).await.unwrap();
        }
        // The grants are drained first, untimed.
        let grants = f.drain().await;
        assert_eq!(grants, CUSTOMERS as u64);
        let mut tasks = vec![];
        for t in 0..64 {
            let e = e.clone();
            tasks.push(tokio::spawn(async move {
                for i in (t..TRACKS).step_by(64) {
                    let c = format!("tp-{}", i % CUSTOMERS);
                    e.track(
                        &c,
                        "basic_message",
                        Amount::whole(1),
                        OverageBehavior::Cap,
                        None,
                    )
                    .await
                    .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let streams = keys::ledger_streams(&f.ns);
        let mut conn = f.conn.clone();
        let holding = {
            let mut n = 0;
            for chunk in streams.chunks(1024) {
                let mut p = redis::pipe();
                for s in chunk {
                    p.cmd("XLEN").arg(s);
                }
                let lens: Vec<u64> = p.query_async(&mut conn).await.unwrap();
                n += lens.iter().filter(|l| **l > 0).count();
            }
            n
        };
        let defaults = DrainOptions::default();
        let opts =
            DrainOptions::every_slot("tp".into(), defaults.batch, defaults.claim_idle_ms, true);
        let before = f.store.count().await.unwrap();
        let started = std::time::Instant::now();
        let d = Drain::new(f.conn.clone(), f.store.clone(), streams, opts);
        let status = d.status();
        let task = tokio::spawn(d.run(std::future::pending()));
        // Watched through the drain's own counter (a COUNT(*) every few ms
        // would compete with it for the database).
        while status.committed() < TRACKS as u64 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let took = started.elapsed();
        task.abort();
        assert_eq!(f.store.count().await.unwrap(), before + TRACKS as u64);
        println!(
            "{name}: {TRACKS} entries in {holding} slot streams drained in {:.2} s: {:.0} entries/s",
            took.as_secs_f64(),
            TRACKS as f64 / took.as_secs_f64()
        );
    }
}
