//! Load test of the Lua scripts through the Redis engine (one EVALSHA per
//! decision on one multiplexed connection), against baselines measured in the
//! same run on the same connection: `PING`, and an `EVALSHA` of a script that
//! returns at once (the cost of the script call itself).
//!
//! `cargo bench --bench scripts -- [--seconds N] [--concurrency C] [--customers K]`

use std::sync::Arc;
use std::time::Instant;

use creditgate::calendar::Interval;
use creditgate::engine::redis::{RedisEngine, RedisOptions};
use creditgate::model::{Grant, OverageBehavior};
use creditgate::{Amount, Engine};

#[path = "support/mod.rs"]
mod support;
use support::{catalog, drive, print_header, print_table, Args};

fn main() {
    let args = Args::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    print_header("scripts load", &args);
    let started = Instant::now();
    let redis = support::RedisServer::start();
    let rows = rt.block_on(async {
        let engine = Arc::new(
            RedisEngine::connect(RedisOptions::standalone(&redis.url()), catalog(), None)
                .await
                .expect("connect"),
        );
        let k = args.customers;
        // Each customer: a monthly grant of 200 and a large one-off top-up,
        // the seed's shape, so nothing in the run is denied.
        for i in 0..k {
            let c = format!("cust-{i:06}");
            engine.create_customer(&c).await.unwrap();
            engine
                .grant(
                    &c,
                    &Grant::new("credits", Amount::whole(200), Interval::Month),
                )
                .await
                .unwrap();
            engine
                .grant(
                    &c,
                    &Grant::new("credits", Amount::whole(1_000_000_000), Interval::OneOff),
                )
                .await
                .unwrap();
        }
        let customer = move |i: u64| format!("cust-{:06}", i as usize % k);
        let mut rows = Vec::new();

        let conn = engine.connection();
        let s = drive(&args, move |_| {
            let mut c = conn.clone();
            async move {
                redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            }
        })
        .await;
        rows.push(("PING (baseline)".to_string(), s));

        let conn = engine.connection();
        let noop = redis::Script::new("return 1");
        let s = drive(&args, move |_| {
            let (mut c, script) = (conn.clone(), noop.clone());
            async move { script.invoke_async::<_, i64>(&mut c).await.is_ok() }
        })
        .await;
        rows.push(("EVALSHA return 1".to_string(), s));

        let e = engine.clone();
        let s = drive(&args, move |i| {
            let (e, c) = (e.clone(), customer(i));
            async move {
                e.check(&c, "premium_message", Amount::whole(1))
                    .await
                    .is_ok_and(|o| o.allowed)
            }
        })
        .await;
        rows.push(("check premium_message (2 pools, 2 buckets)".to_string(), s));

        let e = engine.clone();
        let s = drive(&args, move |i| {
            let (e, c) = (e.clone(), customer(i));
            async move {
                e.consume(&c, "basic_message", Amount::whole(1), None)
                    .await
                    .is_ok_and(|o| o.allowed)
            }
        })
        .await;
        rows.push(("consume basic_message".to_string(), s));

        let e = engine.clone();
        let s = drive(&args, move |i| {
            let (e, c) = (e.clone(), customer(i));
            let key = format!("k{i}");
            async move {
                e.track(
                    &c,
                    "basic_message",
                    Amount::whole(1),
                    OverageBehavior::Cap,
                    Some(&key),
                )
                .await
                .is_ok()
            }
        })
        .await;
        rows.push(("track with an idempotency key".to_string(), s));
        rows
    });
    print_table(&rows);
    drop(redis);
    eprintln!("total {:.1}s", started.elapsed().as_secs_f64());
}
