//! The periodic reset task on Redis: it finds due customers through the
//! per-slot due index, resets each exactly once, shares shards between
//! sidecars through leases, and takes over a shard whose holder died.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::{namespace, RedisServer};
use common::{amt, catalog, start};
use creditgate::calendar::{ms_of, Interval};
use creditgate::engine::redis::{RedisEngine, RedisOptions};
use creditgate::model::{Grant, Retention};
use creditgate::{Clock, Engine, ManualClock};
use futures_util::StreamExt;

async fn engine_in(ns: &str, clock: &Arc<ManualClock>) -> RedisEngine {
    let opts = RedisOptions {
        namespace: ns.to_string(),
        retention: Retention::default(),
        ..RedisOptions::standalone(&RedisServer::shared().url())
    };
    let clock: Arc<dyn Clock> = clock.clone();
    RedisEngine::connect(opts, catalog(), Some(clock))
        .await
        .expect("connect")
}

/// `n` customers with 18-character ids, each with a monthly bucket anchored
/// at the start instant, created 64 at a time.
async fn monthly_customers(engine: &RedisEngine, n: usize) {
    let grant = Grant::new("api_call", amt("100"), Interval::Month);
    let made = futures_util::stream::iter(0..n)
        .map(|i| {
            let grant = &grant;
            async move {
                let c = format!("cus_{i:014}");
                engine.create_customer(&c).await.unwrap();
                engine.grant(&c, grant).await.unwrap();
            }
        })
        .buffer_unordered(64)
        .count()
        .await;
    assert_eq!(made, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sweep_resets_100k_due_customers_exactly_once() {
    let n: usize = std::env::var("SWEEP_CUSTOMERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let clock = Arc::new(ManualClock::new(start()));
    let engine = engine_in(&namespace(), &clock).await;
    monthly_customers(&engine, n).await;
    let server = RedisServer::shared();
    let nothing = engine.sweep_due().await.unwrap();
    assert_eq!(
        (nothing.customers_swept, nothing.resets_applied),
        (0, 0),
        "nothing due yet"
    );

    clock.set(ms_of(2027, 2, 1, 0, 0));
    server.cli(&["CONFIG", "SET", "slowlog-log-slower-than", "100"]);
    server.cli(&["CONFIG", "SET", "slowlog-max-len", "100000"]);
    server.cli(&["SLOWLOG", "RESET"]);
    let started = Instant::now();
    let report = engine.sweep_due().await.unwrap();
    let took = started.elapsed();
    assert_eq!(report.customers_swept, n as u64);
    assert_eq!(
        report.resets_applied, n as u64,
        "every customer reset exactly once"
    );

    // The longest command the sweep sent, from SLOWLOG (entries over 100 µs).
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let entries: Vec<Vec<redis::Value>> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(100_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut slow: Vec<(i64, String)> = entries
        .iter()
        .map(|e| {
            let micros = match &e[2] {
                redis::Value::Int(us) => *us,
                _ => 0,
            };
            let command = match &e[3] {
                redis::Value::Array(args) => match args.first() {
                    Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                    _ => String::new(),
                },
                _ => String::new(),
            };
            (micros, command)
        })
        .collect();
    slow.sort();
    let durations: Vec<i64> = slow.iter().map(|(us, _)| *us).collect();
    let longest = slow.last().cloned().unwrap_or((0, "none".into()));
    let p99_slow = durations
        .get(durations.len() * 99 / 100)
        .copied()
        .unwrap_or(0);
    eprintln!(
        "sweep of {n} due customers: {:.2} s ({:.0} customers/s); commands over 100 µs: {} \
         (p99 of those {} µs); longest: {} µs ({})",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        durations.len(),
        p99_slow,
        longest.0,
        longest.1
    );

    let again = engine.sweep_due().await.unwrap();
    assert_eq!(again.resets_applied, 0, "a second sweep finds nothing due");
    assert_eq!(
        engine.reset_due("cus_00000000000007").await.unwrap(),
        0,
        "nor does a lazy reset"
    );
    let b = engine.balances("cus_00000000000007").await.unwrap();
    assert_eq!(b.pools[0].next_reset_at, Some(ms_of(2027, 3, 1, 0, 0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sweepers_share_the_work_and_reset_each_customer_once() {
    let ns = namespace();
    let clock = Arc::new(ManualClock::new(start()));
    let a = engine_in(&ns, &clock).await;
    let b = engine_in(&ns, &clock).await;
    monthly_customers(&a, 2_000).await;
    clock.set(ms_of(2027, 2, 1, 0, 0));
    let (ra, rb) = tokio::join!(a.sweep_due(), b.sweep_due());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(
        ra.resets_applied + rb.resets_applied,
        2_000,
        "{ra:?} {rb:?}"
    );
    // A lazy reset racing the task: still one reset per customer.
    clock.set(ms_of(2027, 3, 1, 0, 0));
    let (lazy, swept) = tokio::join!(a.reset_due("cus_00000000000001"), b.sweep_due());
    assert_eq!(lazy.unwrap() as u64 + swept.unwrap().resets_applied, 2_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_sweepers_lease_lapses_and_the_shard_is_taken_over() {
    let ns = namespace();
    let clock = Arc::new(ManualClock::new(start()));
    let engine = engine_in(&ns, &clock).await;
    monthly_customers(&engine, 500).await;
    clock.set(ms_of(2027, 2, 1, 0, 0));
    // Another sidecar took shard 0's lease and died: its lease is short here.
    let server = RedisServer::shared();
    let lease = format!("{ns}cg2:sweep:0");
    assert_eq!(
        server
            .cli(&["SET", &lease, "dead-sidecar", "PX", "300"])
            .trim(),
        "OK"
    );
    let first = engine.sweep_due().await.unwrap();
    assert_eq!(first.shards_leased_elsewhere, 1);
    assert!(first.resets_applied < 500, "shard 0's customers waited");
    // Redis's own clock must pass the lease's TTL.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.cli(&["EXISTS", &lease]).trim() != "0" {
        assert!(Instant::now() < deadline, "lease did not lapse");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = engine.sweep_due().await.unwrap();
    assert_eq!(second.shards_leased_elsewhere, 0);
    assert_eq!(first.resets_applied + second.resets_applied, 500);
    // Leases are given back after a sweep, so the next sweep need not wait.
    assert_eq!(server.cli(&["EXISTS", &lease]).trim(), "0");
}
