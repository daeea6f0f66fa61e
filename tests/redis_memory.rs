//! Memory of layout cg2, measured through the engine on a fresh server
//! (`used_memory` differences), against the targets of issue 10:
//!
//! - per customer: 100k customers with 18-character ids, each holding one
//!   monthly and one one-off bucket with generated balance ids: at most 250 B;
//! - per idempotency record: 36-character keys on 18-character customers
//!   (1 000 customers × 100 keyed tracks, one entry each): at most 100 B.
//!
//! cargo test --release --test redis_memory -- --ignored --nocapture --test-threads 1
//! (`MEMORY_CUSTOMERS` overrides the count.)

mod common;

use std::sync::Arc;

use common::redis::RedisServer;
use common::{amt, catalog};
use creditgate::calendar::Interval;
use creditgate::engine::redis::{RedisEngine, RedisOptions};
use creditgate::model::{Grant, Retention};
use creditgate::Engine;

fn used_memory(server: &RedisServer) -> i64 {
    let info = server.cli(&["INFO", "memory"]);
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn bytes_per_customer() {
    let n: usize = std::env::var("MEMORY_CUSTOMERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let server = RedisServer::shared();
    assert_eq!(server.cli(&["FLUSHALL"]).trim(), "OK");
    let opts = RedisOptions {
        retention: Retention::default(),
        ..RedisOptions::standalone(&server.url())
    };
    // Production settings: no namespace, Redis TIME as the clock.
    let engine = Arc::new(RedisEngine::connect(opts, catalog(), None).await.unwrap());
    let before = used_memory(server);
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let workers = 64;
    for w in 0..workers {
        let e = engine.clone();
        tasks.spawn(async move {
            for i in (w..n).step_by(workers) {
                let id = format!("cus_{i:014}");
                assert_eq!(id.len(), 18);
                e.create_customer(&id).await.unwrap();
                e.grant(&id, &Grant::new("api_call", amt("1000"), Interval::Month))
                    .await
                    .unwrap();
                e.grant(&id, &Grant::new("ai_credits", amt("500"), Interval::OneOff))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let elapsed = started.elapsed();
    let after = used_memory(server);
    let per = (after - before) as f64 / n as f64;
    let sample = engine.keys("cus_00000000000000");
    println!(
        "{n} customers: used_memory {before} -> {after}: {per:.1} bytes per customer \
         ({:.0} scripts/s)",
        (3 * n) as f64 / elapsed.as_secs_f64()
    );
    println!(
        "sample: HGETALL {} -> {:?}",
        sample.customer,
        server.cli(&["HGETALL", &sample.customer])
    );
    println!(
        "encoding {} ; due {} holds {} members",
        server.cli(&["OBJECT", "ENCODING", &sample.customer]).trim(),
        sample.due,
        server.cli(&["ZCARD", &sample.due]).trim()
    );
    assert!(per <= 250.0, "{per} bytes per customer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn bytes_per_idempotency_record() {
    let (customers, per_customer) = (1_000usize, 100usize);
    let server = RedisServer::shared();
    assert_eq!(server.cli(&["FLUSHALL"]).trim(), "OK");
    let opts = RedisOptions::standalone(&server.url());
    let engine = Arc::new(RedisEngine::connect(opts, catalog(), None).await.unwrap());
    for i in 0..customers {
        let id = format!("cus_{i:014}");
        engine.create_customer(&id).await.unwrap();
        engine
            .grant(&id, &Grant::new("api_call", amt("1000"), Interval::Month))
            .await
            .unwrap();
    }
    let before = used_memory(server);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..64usize {
        let e = engine.clone();
        tasks.spawn(async move {
            let mut n = w as u64;
            for j in (w..customers * per_customer).step_by(64) {
                let id = format!("cus_{:014}", j % customers);
                n = n
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let key = format!(
                    "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                    n >> 32,
                    (n >> 16) & 0xffff,
                    n & 0xffff,
                    j & 0xffff,
                    j
                );
                assert_eq!(key.len(), 36);
                e.track(
                    &id,
                    "api_call",
                    amt("1"),
                    creditgate::model::OverageBehavior::Overflow,
                    Some(&key),
                )
                .await
                .unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let after = used_memory(server);
    let records = (customers * per_customer) as f64;
    let per = (after - before) as f64 / records;
    println!(
        "{customers} customers x {per_customer} records (36-char keys): {per:.1} bytes per record"
    );
    assert!(per <= 100.0, "{per} bytes per idempotency record");
}

/// Throughput of the hot path over the one multiplexed connection: 64 tasks
/// consuming on their own customers (one FCALL each).
///
/// cargo test --release --test redis_memory -- --ignored --nocapture consume_throughput
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn consume_throughput() {
    let server = RedisServer::shared();
    let opts = RedisOptions::standalone(&server.url());
    let engine = Arc::new(RedisEngine::connect(opts, catalog(), None).await.unwrap());
    let workers = 64;
    let per = 2_000;
    for w in 0..workers {
        let id = format!("tp_{w}");
        engine.create_customer(&id).await.unwrap();
        engine
            .grant(
                &id,
                &Grant::new("ai_credits", amt("1000000"), Interval::Month),
            )
            .await
            .unwrap();
    }
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let e = engine.clone();
        tasks.spawn(async move {
            let id = format!("tp_{w}");
            for _ in 0..per {
                assert!(
                    e.consume(&id, "action1", amt("1"), None)
                        .await
                        .unwrap()
                        .allowed
                );
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} consumes in {secs:.2} s: {:.0} consumes/s over one multiplexed connection",
        workers * per,
        (workers * per) as f64 / secs
    );
}
