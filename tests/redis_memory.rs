//! Memory per customer: 100k customers with 18-character ids, each holding
//! one monthly and one one-off bucket with generated balance ids, created
//! through the engine (pipelined over the one multiplexed connection) on a
//! fresh server; prints the `used_memory` difference per customer.
//!
//! cargo test --release --test redis_memory -- --ignored --nocapture
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
    assert!(per < 400.0, "{per} bytes per customer");
}

/// Throughput of the hot path over the one multiplexed connection: 64 tasks
/// consuming on their own customers (one EVALSHA each).
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
