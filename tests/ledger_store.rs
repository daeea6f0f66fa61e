//! The ledger's database side on real parts: SQLite in a temp dir, a real
//! PostgreSQL started by the harness (tests/common/postgres.rs), a real
//! redis-server for the drain.

mod common;

use std::time::{Duration, Instant};

use common::postgres::Postgres;
use common::redis::{namespace, RedisServer};
use creditgate::ledger::drain::{Drain, DrainOptions};
use creditgate::ledger::store::LedgerStore;
use creditgate::ledger::{codec, BalanceDelta, LedgerEntry, LedgerOp, LimitDelta};
use creditgate::Amount;

fn entry(customer: &str, ms: i64, seq: i64, feature: &str) -> LedgerEntry {
    LedgerEntry {
        id: codec::format_id(ms, seq),
        at: ms,
        customer_id: customer.into(),
        feature_id: Some(feature.into()),
        op: LedgerOp::Track,
        units: Amount::whole(3),
        balances: vec![BalanceDelta {
            balance_id: "pro:credits".into(),
            pool: "credits".into(),
            plan_id: Some("pro".into()),
            amount: Amount::whole(-30),
        }],
        limits: vec![LimitDelta {
            limit_id: "per_min".into(),
            window_start: Some(ms - ms % 60_000),
            amount: Amount::whole(3),
            tat: Some(123_456_789_012_345_678_901),
        }],
        idempotency_key: Some(format!("k-{ms}-{seq}")),
        lock_id: None,
        subject: None,
    }
}

async fn sqlite() -> (tempfile::TempDir, LedgerStore) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/ledger.db", dir.path().display());
    (dir, LedgerStore::open(&url).await.unwrap())
}

async fn store_behaves(store: &LedgerStore) {
    let mut batch = vec![];
    for i in 0..50 {
        batch.push(entry(
            "alice",
            1_000 + i,
            0,
            if i % 2 == 0 { "a" } else { "b" },
        ));
        batch.push(entry("bob", 1_000 + i, 1, "a"));
    }
    batch.push(entry("alice", 1_049, 7, "a"));
    assert_eq!(store.insert_batch(&batch).await.unwrap(), 101);
    assert_eq!(
        store.insert_batch(&batch).await.unwrap(),
        0,
        "twice: stored once"
    );
    assert_eq!(store.count().await.unwrap(), 101);
    let alice = store.entries_of("alice").await.unwrap();
    assert_eq!(alice.len(), 51);
    assert_eq!(alice[0], batch[0], "the round trip keeps every field");
    // Newest first, by id (ms then seq, as integers: 1049-7 after 1049-0).
    let all = store
        .fetch("alice", &[], 0, i64::MAX, None, None)
        .await
        .unwrap();
    assert_eq!(all[0].id, "1049-7");
    assert_eq!(all[1].id, "1049-0");
    // Pagination: pages of 7 of feature a, cursor = the last id.
    let a = vec!["a".to_string()];
    let mut seen = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let page = store
            .fetch("alice", &a, 0, i64::MAX, cursor.as_deref(), Some(7))
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        cursor = Some(page.last().unwrap().id.clone());
        seen.extend(page);
    }
    assert_eq!(seen.len(), 26);
    assert!(seen
        .windows(2)
        .all(|w| codec::parse_id(&w[0].id).unwrap() > codec::parse_id(&w[1].id).unwrap()));
    assert!(seen.iter().all(|e| e.feature_id.as_deref() == Some("a")));
    // The time range is [start, end).
    let ranged = store
        .fetch("alice", &[], 1_010, 1_020, None, None)
        .await
        .unwrap();
    assert_eq!(ranged.len(), 10);
    let both = ["a".to_string(), "b".to_string()];
    assert_eq!(
        store
            .fetch("alice", &both, 0, i64::MAX, None, None)
            .await
            .unwrap()
            .len(),
        51
    );
}

/// The database's per-grain sums give the same aggregate as the entries
/// themselves, for every bin size and measure, over a range that starts and
/// ends mid-hour; refunds (negative units) and other customers' and
/// features' entries included.
async fn sums_agree(store: &LedgerStore) {
    use creditgate::ledger::RangeSpec;
    use creditgate::ledger::{aggregate, aggregate_sums, AggregateQuery, BinSize, Measure};
    let t0 = creditgate::calendar::ms_of(2027, 1, 30, 22, 0);
    let mut all = vec![];
    for i in 0..400i64 {
        let mut e = entry(
            "sums",
            t0 + i * 17 * 60_000,
            0,
            ["a", "b"][(i % 2) as usize],
        );
        if i % 7 == 0 {
            e.op = LedgerOp::Refund;
            e.units = Amount::whole(-2);
        }
        if i % 11 == 0 {
            e.op = LedgerOp::Grant; // not usage
        }
        all.push(e);
        all.push(entry("other", t0 + i * 60_000, 1, "a"));
    }
    store.insert_batch(&all).await.unwrap();
    let (start, end) = (t0 + 25 * 60_000, t0 + 390 * 17 * 60_000 + 7);
    for bin_size in [BinSize::Hour, BinSize::Day, BinSize::Week, BinSize::Month] {
        for measure in [Measure::Sum, Measure::Count] {
            let q = AggregateQuery {
                customer_id: Some("sums".into()),
                feature_ids: vec!["a".into(), "b".into()],
                range: RangeSpec::Custom { start, end },
                bin_size,
                group_by: None,
                max_groups: 9,
                measure,
            };
            let want = aggregate(&all, &q, (start, end)).unwrap();
            let sums = store
                .usage_sums(
                    Some("sums"),
                    &q.feature_ids,
                    start,
                    end,
                    bin_size.grain_ms(),
                )
                .await
                .unwrap();
            let got = aggregate_sums(&sums, &q, (start, end)).unwrap();
            assert_eq!(got, want, "{bin_size:?} {measure:?}");
            let rows = store
                .usage(Some("sums"), &q.feature_ids, start, end, false)
                .await
                .unwrap();
            assert_eq!(aggregate(&rows, &q, (start, end)).unwrap(), want);
        }
    }
    assert!(
        aggregate(
            &all,
            &AggregateQuery {
                customer_id: Some("sums".into()),
                feature_ids: vec!["a".into()],
                range: RangeSpec::Custom { start, end },
                bin_size: BinSize::Day,
                group_by: None,
                max_groups: 9,
                measure: Measure::Sum,
            },
            (start, end)
        )
        .unwrap()
        .totals["a"]
            .count
            > 100
    );
}

#[tokio::test]
async fn sqlite_round_trip_idempotence_and_pages() {
    let (_dir, store) = sqlite().await;
    store_behaves(&store).await;
    sums_agree(&store).await;
    assert!(LedgerStore::open("mysql://x").await.is_err());
}

#[tokio::test]
async fn postgres_round_trip_idempotence_and_pages() {
    let Some(pg) = Postgres::start() else { return };
    let store = LedgerStore::open(&pg.database("pages")).await.unwrap();
    store_behaves(&store).await;
    // Reopening runs the migrations again: a no-op.
    let again = LedgerStore::open(&format!("postgres://postgres@127.0.0.1:{}/pages", pg.port))
        .await
        .unwrap();
    assert_eq!(again.count().await.unwrap(), 101);
    sums_agree(&store).await;
}

async fn redis() -> redis::aio::ConnectionManager {
    let client = redis::Client::open(RedisServer::shared().url()).unwrap();
    redis::aio::ConnectionManager::new(client).await.unwrap()
}

/// XADDs `n` encoded entries of `customers` to `stream`; returns them.
async fn produce(
    conn: &mut redis::aio::ConnectionManager,
    stream: &str,
    n: usize,
) -> Vec<LedgerEntry> {
    let mut pipe = redis::pipe();
    for i in 0..n {
        let e = entry(&format!("c{}", i % 16), 0, 0, "a");
        pipe.cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg(codec::STREAM_FIELD)
            .arg(codec::encode(&e));
    }
    let ids: Vec<String> = pipe.query_async(conn).await.unwrap();
    ids.into_iter()
        .enumerate()
        .map(|(i, id)| LedgerEntry {
            id,
            ..entry(&format!("c{}", i % 16), 0, 0, "a")
        })
        .collect()
}

fn opts(consumer: &str) -> DrainOptions {
    DrainOptions {
        consumer: consumer.into(),
        batch: 100,
        claim_idle_ms: 200,
        idle_poll: Duration::from_millis(20),
        ..DrainOptions::default()
    }
}

async fn wait_for(store: &LedgerStore, n: u64, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while store.count().await.unwrap_or(0) < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} entries in {secs} s",
            store.count().await.unwrap_or(0)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) until the streams hold nothing.
async fn wait_trimmed(conn: &mut redis::aio::ConnectionManager, streams: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while creditgate::ledger::drain::backlog(conn, streams)
        .await
        .unwrap()
        > 0
    {
        assert!(Instant::now() < deadline, "the streams are trimmed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every produced entry is stored exactly once, and the streams are empty.
async fn exactly_once(
    store: &LedgerStore,
    conn: &mut redis::aio::ConnectionManager,
    streams: &[String],
    produced: &[LedgerEntry],
) {
    assert_eq!(store.count().await.unwrap(), produced.len() as u64);
    let mut stored = vec![];
    for c in 0..16 {
        stored.extend(store.entries_of(&format!("c{c}")).await.unwrap());
    }
    let mut want = produced.to_vec();
    let key = |e: &LedgerEntry| (e.customer_id.clone(), codec::parse_id(&e.id).unwrap());
    want.sort_by_key(key);
    stored.sort_by_key(key);
    assert_eq!(stored, want);
    assert_eq!(
        creditgate::ledger::drain::backlog(conn, streams)
            .await
            .unwrap(),
        0,
        "the streams are trimmed"
    );
}

async fn drain_survives_kills(store: LedgerStore) {
    let mut conn = redis().await;
    let ns = namespace();
    let streams = vec![
        format!("{ns}cg2:ledger:{{0}}"),
        format!("{ns}cg2:ledger:{{1}}"),
    ];
    // Written before any group exists: not skipped.
    let mut produced = produce(&mut conn, &streams[0], 300).await;
    let (stop, rx) = tokio::sync::watch::channel(false);
    let shutdown = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let d = Drain::new(conn.clone(), store.clone(), streams.clone(), opts("one"));
    let task = tokio::spawn(d.run(shutdown(rx.clone())));
    produced.extend(produce(&mut conn, &streams[1], 700).await);
    wait_for(&store, 100, 20).await;
    task.abort(); // killed mid-way: read, maybe written, maybe not acknowledged
    let _ = task.await;
    produced.extend(produce(&mut conn, &streams[0], 500).await);
    // Restarted under another name: claims the dead one's pending entries.
    let d = Drain::new(conn.clone(), store.clone(), streams.clone(), opts("two"));
    let task = tokio::spawn(d.run(shutdown(rx.clone())));
    wait_for(&store, produced.len() as u64, 30).await;
    // Stopped only once it has trimmed what it wrote: a drain stopped between
    // its commit and its XACK leaves those entries in the stream (they are
    // read again, and written once, by the next drain).
    wait_trimmed(&mut conn, &streams).await;
    stop.send(true).unwrap();
    let stats = task.await.unwrap();
    assert_eq!(stats.dead, 0);
    exactly_once(&store, &mut conn, &streams, &produced).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_into_sqlite_exactly_once_across_kills_and_a_locked_database() {
    let (dir, store) = sqlite().await;
    drain_survives_kills(store.clone()).await;
    // The database unavailable mid-way: a writer holds SQLite's lock past
    // the busy timeout; the drain fails, retries, acknowledges nothing.
    let mut conn = redis().await;
    let streams = vec![format!("{}cg2:ledger:{{0}}", namespace())];
    let before = store.count().await.unwrap();
    let path = dir.path().join("ledger.db");
    let lock = std::thread::spawn(move || {
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import sqlite3,time; c=sqlite3.connect('{}', isolation_level=None); c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(7); c.execute('COMMIT')",
                path.display()
            ))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        out.wait_with_output().unwrap()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let produced = produce(&mut conn, &streams[0], 400).await;
    let (stop, rx) = tokio::sync::watch::channel(false);
    let d = Drain::new(conn.clone(), store.clone(), streams.clone(), opts("locked"));
    let task = tokio::spawn(d.run(async move {
        let mut rx = rx;
        let _ = rx.wait_for(|s| *s).await;
    }));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        creditgate::ledger::drain::backlog(&mut conn, &streams)
            .await
            .unwrap()
            >= 400,
        "nothing acknowledged while locked"
    );
    let _ = lock.join();
    wait_for(&store, before + 400, 30).await;
    stop.send(true).unwrap();
    let stats = task.await.unwrap();
    assert!(
        stats.failures >= 1,
        "the locked database failed a round: {stats:?}"
    );
    assert_eq!(store.count().await.unwrap(), before + 400);
    let _ = produced;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_into_postgres_exactly_once_across_kills_and_a_database_restart() {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    let url = pg.database("drain");
    let store = LedgerStore::open(&url).await.unwrap();
    drain_survives_kills(store.clone()).await;
    // The database stopped mid-way, then restarted.
    let mut conn = redis().await;
    let streams = vec![format!("{}cg2:ledger:{{0}}", namespace())];
    let before = store.count().await.unwrap();
    pg.stop();
    let produced = produce(&mut conn, &streams[0], 400).await;
    let (stop, rx) = tokio::sync::watch::channel(false);
    let d = Drain::new(conn.clone(), store.clone(), streams.clone(), opts("pgdown"));
    let task = tokio::spawn(d.run(async move {
        let mut rx = rx;
        let _ = rx.wait_for(|s| *s).await;
    }));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        creditgate::ledger::drain::backlog(&mut conn, &streams)
            .await
            .unwrap(),
        400,
        "nothing acknowledged while down"
    );
    pg.resume();
    wait_for(&store, before + 400, 60).await;
    stop.send(true).unwrap();
    // (The round in flight may simply have waited for a connection, up to
    // the store's acquire timeout, rather than failed: either way nothing
    // was acknowledged, as the backlog above shows.)
    task.await.unwrap();
    assert_eq!(store.count().await.unwrap(), before + 400);
    let _ = produced;
}

/// `cargo test --test ledger_store -- --ignored --nocapture throughput`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput() {
    let pg = Postgres::start();
    let (_dir, sqlite) = sqlite().await;
    let mut stores = vec![("sqlite", sqlite)];
    if let Some(pg) = &pg {
        stores.push((
            "postgres",
            LedgerStore::open(&pg.database("bench")).await.unwrap(),
        ));
    }
    for (name, store) in stores {
        let mut conn = redis().await;
        let streams = vec![format!("{}cg2:ledger:{{0}}", namespace())];
        let n = 100_000;
        for _ in 0..n / 10_000 {
            produce(&mut conn, &streams[0], 10_000).await;
        }
        let (stop, rx) = tokio::sync::watch::channel(false);
        let d = Drain::new(
            conn.clone(),
            store.clone(),
            streams.clone(),
            DrainOptions {
                batch: 500,
                ..opts("bench")
            },
        );
        let t = Instant::now();
        let task = tokio::spawn(d.run(async move {
            let mut rx = rx;
            let _ = rx.wait_for(|s| *s).await;
        }));
        wait_for(&store, n as u64, 300).await;
        let took = t.elapsed();
        stop.send(true).unwrap();
        task.await.unwrap();
        println!(
            "drain into {name}: {n} entries in {:.2} s = {:.0} entries/s (batch 500)",
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64()
        );
    }
}

/// A month of minute-level entries for one customer (30 × 1 440 = 43 200),
/// read back from SQLite and aggregated per day: the totals are exact, and
/// the time it takes is printed (a figure, not an assertion).
/// `cargo test --release --test ledger_store -- --ignored --nocapture a_month`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn a_month_of_minutes_aggregates_per_day() {
    use creditgate::ledger::{aggregate_sums, AggregateQuery, BinSize, Measure, RangeSpec};
    let (_dir, store) = sqlite().await;
    let start = creditgate::calendar::ms_of(2027, 1, 1, 0, 0);
    let minutes = 30 * 1_440;
    let all: Vec<LedgerEntry> = (0..minutes)
        .map(|i| entry("alice", start + i * 60_000, 0, "premium_message"))
        .collect();
    for chunk in all.chunks(1_000) {
        store.insert_batch(chunk).await.unwrap();
    }
    let end = start + minutes * 60_000;
    let q = AggregateQuery {
        customer_id: Some("alice".into()),
        feature_ids: vec!["premium_message".into()],
        range: RangeSpec::Custom { start, end },
        bin_size: BinSize::Day,
        group_by: None,
        max_groups: 9,
        measure: Measure::Sum,
    };
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let sums = store
            .usage_sums(
                Some("alice"),
                &q.feature_ids,
                start,
                end,
                q.bin_size.grain_ms(),
            )
            .await
            .unwrap();
        let a = aggregate_sums(&sums, &q, (start, end)).unwrap();
        best = best.min(t.elapsed());
        assert_eq!(a.bins.len(), 30);
        assert!(a
            .bins
            .iter()
            .all(|b| b.values["premium_message"] == Amount::whole(3 * 1_440)));
        assert_eq!(a.totals["premium_message"].count, minutes as u64);
        assert_eq!(a.totals["premium_message"].sum, Amount::whole(3 * minutes));
    }
    println!(
        "events.aggregate, a month of minute-level entries (43 200) summed per day by SQLite: best of 5 {:.1} ms",
        best.as_secs_f64() * 1e3
    );
}
