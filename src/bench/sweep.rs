//! `creditgate bench sweep`: the reset sweep at scale. Seeds `--due`
//! customers whose monthly bucket is due (written through an engine on a
//! clock a month back), measures the consuming check's capacity, then runs
//! it at a fixed offered rate (half the capacity unless `--rate`) first
//! without and then during one sweep of every due customer, with Redis's
//! `SLOWLOG` armed at 2 ms. Reports the sweep's time, the slow commands and
//! the p99 ratio, and checks the books of the load.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::{stream, StreamExt};
use redis::aio::ConnectionManager;
use serde::Serialize;

use super::books::LiveLedger;
use super::load::{self, Measured, Mix, Op, Spec};
use super::progress::Progress;
use super::redis_side;
use super::report::Row;
use super::{
    catalog_of, engine_books, engine_setup, engines, execute, finish, new_report, planned, prefix,
};
use super::{Ids, LoadArgs};
use crate::calendar::{Interval, DAY_MS};
use crate::clock::{Clock, ManualClock, SystemClock};
use crate::engine::Engine;
use crate::model::Grant;
use crate::money::Amount;

#[derive(Args, Debug)]
pub struct SweepArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// The catalog (features); default: examples/creditgate.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Due customers swept alone (timed), each with one monthly bucket (due)
    /// and one one-off bucket of the pool.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub due: u64,
    /// Due customers swept during the fixed-rate load (enough for the sweep
    /// to outlast a few seconds of it).
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub due_during: u64,
    /// Requests in flight per connection for the load.
    #[arg(long, default_value_t = 64)]
    pub pipeline: usize,
    /// The slow-command bound checked with SLOWLOG (µs).
    #[arg(long, default_value_t = 2000)]
    pub slow_us: u64,
}

/// The sweep's figures, beside the report's rows.
#[derive(Debug, Clone, Serialize)]
pub struct SweepFigures {
    /// The sweep alone.
    pub due_customers: u64,
    pub customers_swept: u64,
    pub resets_applied: u64,
    pub sweep_seconds: f64,
    pub customers_per_second: f64,
    /// The sweep during the load.
    pub during_due_customers: u64,
    pub during_customers_swept: u64,
    pub during_sweep_seconds: f64,
    pub batch: usize,
    pub offered_rate: f64,
    pub capacity: f64,
    pub p99_without_us: u64,
    pub p99_during_us: u64,
    pub p99_ratio: f64,
    pub slow_bound_us: u64,
    pub slow_commands: u64,
    pub slowest_us: u64,
    pub slowest_command: Option<String>,
    /// Of those, the sweep's own calls (`reset_due_many`).
    pub slow_sweep_commands: u64,
    pub slowest_sweep_us: u64,
}

/// `n` customers created 33 days ago with a monthly bucket that first reset
/// 32 days ago (so one or two resets are due now) and a one-off bucket.
async fn seed_due(
    engine: &Arc<dyn Engine>,
    ids: &Ids,
    n: usize,
    pool: &str,
    created_at: i64,
    lanes: usize,
    progress: &Progress,
) -> Result<(), String> {
    let bar = progress.task("seeding due customers", n as u64);
    let monthly = Grant {
        balance_id: Some("monthly".into()),
        next_reset_at: Some(created_at + DAY_MS),
        ..Grant::new(pool, Amount::whole(1000), Interval::Month)
    };
    let one_off = Grant {
        balance_id: Some("topup".into()),
        ..Grant::new(pool, Amount::whole(500), Interval::OneOff)
    };
    let failed: Vec<String> = stream::iter(0..n)
        .map(|i| {
            let id = ids.name(i);
            let (bar, monthly, one_off) = (&bar, &monthly, &one_off);
            async move {
                let r = async {
                    engine.create_customer(&id).await?;
                    engine.grant(&id, monthly).await?;
                    engine.grant(&id, one_off).await
                }
                .await;
                bar.inc(1);
                r.err().map(|e| format!("seeding {id}: {e}"))
            }
        })
        .buffer_unordered(lanes.max(1))
        .filter_map(|e| async move { e })
        .take(1)
        .collect()
        .await;
    bar.finish();
    match failed.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// One sweep by `creditgate reset-due` (the cron path, its own process, so
/// its client-side CPU is not the load generator's): (customers swept,
/// resets applied, wall time).
async fn reset_due_process(
    config: &std::path::Path,
    redis_url: &str,
) -> Result<(u64, u64, Duration), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let out = tokio::process::Command::new(exe)
        .arg("reset-due")
        .arg("--config")
        .arg(config)
        .env("CREDITGATE_REDIS_URL", redis_url)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("creditgate reset-due: {e}"))?;
    let took = started.elapsed();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!("creditgate reset-due failed: {text}"));
    }
    // "swept N customers, applied M resets in …"
    let number_after = |word: &str| -> Option<u64> {
        let i = text.find(word)? + word.len();
        text[i..].split_whitespace().next()?.parse().ok()
    };
    match (
        number_after("swept "),
        number_after("applied "),
        number_after("resets in "),
    ) {
        // The sweep's own time, without the process's start.
        (Some(c), Some(r), Some(ms)) => Ok((c, r, Duration::from_millis(ms).min(took))),
        _ => Err(format!("creditgate reset-due said: {text}")),
    }
}

async fn config_get(conn: &ConnectionManager, key: &str) -> Result<String, String> {
    let mut c = conn.clone();
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(key)
        .query_async(&mut c)
        .await
        .map_err(|e| format!("CONFIG GET {key}: {e}"))?;
    Ok(v.get(1).cloned().unwrap_or_default())
}

async fn command(conn: &ConnectionManager, args: &[&str]) -> Result<redis::Value, String> {
    let mut c = conn.clone();
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut c)
        .await
        .map_err(|e| format!("{}: {e}", args.join(" ")))
}

/// (count, slowest µs, slowest command) of the SLOWLOG entries.
fn slow_entries(v: &redis::Value, only: &str) -> (u64, u64, Option<String>) {
    let redis::Value::Array(entries) = v else {
        return (0, 0, None);
    };
    let mut slowest = (0u64, None);
    let mut count = 0;
    for e in entries {
        let redis::Value::Array(f) = e else { continue };
        if !format!("{:?}", f.get(3)).contains(only) {
            continue;
        }
        count += 1;
        let us = match f.get(2) {
            Some(redis::Value::Int(u)) => *u as u64,
            _ => 0,
        };
        if us >= slowest.0 {
            let name = match f.get(3) {
                Some(redis::Value::Array(a)) => a
                    .iter()
                    .take(2)
                    .map(|x| match x {
                        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                        other => format!("{other:?}"),
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
                _ => String::new(),
            };
            slowest = (us, Some(name));
        }
    }
    (count, slowest.0, slowest.1)
}

pub async fn sweep_mode(a: SweepArgs) -> Result<bool, String> {
    let load = &a.load;
    let progress = Progress::new(load.progress, load.progress_every);
    let prefix = prefix(load)?;
    let ids = Ids::new(&prefix);
    let due_ids = Ids::new(&format!("{prefix}-due"));
    let n = load.customers as usize;
    let due_n = a.due as usize;
    let (catalog, config_text) = catalog_of(&a.config)?;
    let cost = redis_side::cost_in(&catalog, &load.feature, &load.pool, load.units)?;
    let conns = load.concurrency.unwrap_or(1).max(1);
    let pipeline = a.pipeline.max(1);
    let engines = engines(&a.redis_url, &catalog, conns, load.timeout).await?;
    let redis = redis_side::connect(&a.redis_url).await?;
    eprintln!(
        "run prefix {prefix}: {n} load customers and {due_n} due customers on {}",
        a.redis_url
    );
    let before = engine_setup(&engines[0], &ids, load, &progress).await?;
    let created_at = SystemClock.now_ms() - 33 * DAY_MS;
    let seeder = redis_side::engine_on(
        &a.redis_url,
        catalog.clone(),
        load.timeout,
        Some(Arc::new(ManualClock::new(created_at))),
    )
    .await?;
    let lanes = load.seed_concurrency.max(256);
    let during_ids = Ids::new(&format!("{prefix}-dur"));
    let during_n = a.due_during as usize;
    if load.seed_only {
        seed_due(
            &seeder, &due_ids, due_n, &load.pool, created_at, lanes, &progress,
        )
        .await?;
        println!("{prefix}");
        return Ok(true);
    }
    let dir = super::TempDir::new("sweep")?;
    let config = dir.0.join("creditgate.toml");
    std::fs::write(&config, &config_text).map_err(|e| e.to_string())?;

    // The sweep alone.
    seed_due(
        &seeder, &due_ids, due_n, &load.pool, created_at, lanes, &progress,
    )
    .await?;
    eprintln!("[sweep alone] {due_n} due customers");
    let (alone_swept, alone_resets, alone_took) = reset_due_process(&config, &a.redis_url).await?;
    eprintln!(
        "[sweep alone] {alone_swept} customers, {alone_resets} resets in {:.1}s",
        alone_took.as_secs_f64()
    );
    seed_due(
        &seeder,
        &during_ids,
        during_n,
        &load.pool,
        created_at,
        lanes,
        &progress,
    )
    .await?;

    let ledger = Arc::new(LiveLedger::new(n));
    let target = Arc::new(redis_side::EngineTarget {
        engines: engines.clone(),
        pipeline,
        ids: ids.clone(),
        feature: load.feature.clone(),
        pool: load.pool.clone(),
        units: load.units,
    });
    let mix = Mix::one(Op::Consume);
    let row = |name: String| {
        planned(
            name,
            "creditgate",
            target.clone(),
            conns * pipeline,
            cost,
            mix.clone(),
            Some(ledger.clone()),
        )
    };
    // Capacity (closed loop), then the offered rate.
    let saturate = LoadArgs {
        rate: None,
        ..load.clone()
    };
    let cap_rows = execute(
        &[row("consume, closed loop (capacity)".into())],
        &saturate,
        1,
        Some(&redis),
        &progress,
    )
    .await;
    let capacity = cap_rows[0].throughput;
    let rate = load.rate.unwrap_or((capacity / 2.0).max(1.0));
    let offered = LoadArgs {
        rate: Some(rate),
        ..load.clone()
    };
    // One second of the load at the offered rate; rows without and during
    // the sweep are made of the same chunks, the "without" ones half before
    // and half after the sweep, so both see the same server and client.
    let chunk = |label: &str, warm: bool| Spec {
        label: label.to_string(),
        lanes: conns * pipeline,
        customers: n,
        mix: mix.clone(),
        duration: Some(Duration::from_secs(1)),
        requests: None,
        warmup: if warm { load.warmup } else { Duration::ZERO },
        rate: Some(rate),
        timeout: load.timeout,
        cost,
        seed: rand::random(),
    };
    let quiet_label = format!("consume at {rate:.0}/s, no sweep");
    let mut quiet = Measured::empty(&quiet_label);
    let half = offered
        .duration
        .unwrap_or(Duration::from_secs(10))
        .as_secs()
        .div_ceil(2)
        .max(1);
    for i in 0..half {
        let m = load::run(
            target.clone(),
            &chunk(&quiet_label, i == 0),
            Some(ledger.clone()),
            &progress,
        )
        .await;
        quiet.merge(&m);
    }

    // The same load during one sweep of every due customer.
    let slow_before = config_get(&redis, "slowlog-log-slower-than").await?;
    command(
        &redis,
        &[
            "CONFIG",
            "SET",
            "slowlog-log-slower-than",
            &a.slow_us.to_string(),
        ],
    )
    .await?;
    command(&redis, &["SLOWLOG", "RESET"]).await?;
    let sweep = {
        let (config, url) = (config.clone(), a.redis_url.clone());
        tokio::spawn(async move { reset_due_process(&config, &url).await })
    };
    let label = format!("consume at {rate:.0}/s, during the sweep");
    let mut during = Measured::empty(&label);
    let mut first = true;
    while !sweep.is_finished() {
        let m = load::run(
            target.clone(),
            &chunk(&label, first),
            Some(ledger.clone()),
            &progress,
        )
        .await;
        first = false;
        during.merge(&m);
    }
    let (during_swept, _, during_took) = sweep.await.map_err(|e| e.to_string())??;
    let slow = command(&redis, &["SLOWLOG", "GET", "-1"]).await?;
    command(
        &redis,
        &["CONFIG", "SET", "slowlog-log-slower-than", &slow_before],
    )
    .await?;
    let slow_all = slow_entries(&slow, "");
    let slow_sweep = slow_entries(&slow, "reset_due_many");
    for _ in 0..half {
        let m = load::run(
            target.clone(),
            &chunk(&quiet_label, false),
            Some(ledger.clone()),
            &progress,
        )
        .await;
        quiet.merge(&m);
    }
    let quiet = [Row::of(&quiet, "creditgate", conns * pipeline, Some(rate))];
    let mut during_row = Row::of(&during, "creditgate", conns * pipeline, Some(rate));
    during_row.compare(&quiet[0]);

    let books = engine_books(&engines[0], &ids, load, &ledger, &before, &progress).await?;
    if load.cleanup {
        redis_side::cleanup_creditgate(&redis, &ids, n, &progress).await?;
        redis_side::cleanup_creditgate(&redis, &due_ids, due_n, &progress).await?;
        redis_side::cleanup_creditgate(&redis, &during_ids, during_n, &progress).await?;
    }
    let p99_without = quiet[0].latency_us.p99;
    let p99_during = during_row.latency_us.p99;
    let figures = SweepFigures {
        due_customers: a.due,
        customers_swept: alone_swept,
        resets_applied: alone_resets,
        sweep_seconds: alone_took.as_secs_f64(),
        customers_per_second: alone_swept as f64 / alone_took.as_secs_f64().max(1e-9),
        during_due_customers: a.due_during,
        during_customers_swept: during_swept,
        during_sweep_seconds: during_took.as_secs_f64(),
        batch: crate::engine::redis::SWEEP_BATCH,
        offered_rate: rate,
        capacity,
        p99_without_us: p99_without,
        p99_during_us: p99_during,
        p99_ratio: p99_during as f64 / p99_without.max(1) as f64,
        slow_bound_us: a.slow_us,
        slow_commands: slow_all.0,
        slowest_us: slow_all.1,
        slowest_command: slow_all.2,
        slow_sweep_commands: slow_sweep.0,
        slowest_sweep_us: slow_sweep.1,
    };
    let mut report = new_report("sweep", load, &prefix, 1);
    report.rows = cap_rows
        .into_iter()
        .chain(quiet)
        .chain([during_row])
        .collect();
    report.books = vec![books];
    report.sweep = Some(figures.clone());
    let swept_all =
        figures.customers_swept >= a.due && figures.during_customers_swept >= a.due_during;
    let ok = finish(report, load)?;
    if !swept_all {
        eprintln!(
            "creditgate bench: the sweeps reached {} of {} and {} of {} due customers",
            figures.customers_swept, a.due, figures.during_customers_swept, a.due_during
        );
    }
    Ok(ok && swept_all)
}
