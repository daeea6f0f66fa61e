//! What the benches share: arguments, a closed-loop load driver with latency
//! percentiles, the tests' redis-server harness, the catalog fixture, and
//! the report table.
#![allow(dead_code)]

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Args {
    pub seconds: f64,
    pub concurrency: usize,
    pub customers: usize,
}

impl Args {
    /// `--seconds N --concurrency C --customers K` after `cargo bench ... --`.
    pub fn from_env() -> Args {
        let mut a = Args {
            seconds: 3.0,
            concurrency: 32,
            customers: 1000,
        };
        let argv: Vec<String> = std::env::args().collect();
        let mut i = 1;
        while i < argv.len() {
            let v = argv.get(i + 1).cloned().unwrap_or_default();
            match argv[i].as_str() {
                "--seconds" => a.seconds = v.parse().expect("--seconds N"),
                "--concurrency" => a.concurrency = v.parse().expect("--concurrency C"),
                "--customers" => a.customers = v.parse().expect("--customers K"),
                _ => {
                    i += 1;
                    continue;
                }
            }
            i += 2;
        }
        a
    }
}

pub struct Stats {
    pub ok: u64,
    pub failed: u64,
    pub elapsed: Duration,
    /// Sorted latencies, microseconds.
    pub latencies: Vec<u32>,
}

impl Stats {
    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile(&self, p: f64) -> u32 {
        if self.latencies.is_empty() {
            return 0;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i]
    }
}

/// Runs `concurrency` workers, each sending one request after another for
/// `seconds` (after a short warm-up). `f(i)` makes request number `i`.
pub async fn drive<F, Fut>(args: &Args, f: F) -> Stats
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let f = Arc::new(f);
    let counter = Arc::new(AtomicU64::new(0));
    // Warm-up: connections, caches, script loads.
    let warm = Instant::now() + Duration::from_millis(300);
    let mut handles = Vec::new();
    for _ in 0..args.concurrency {
        let (f, counter) = (f.clone(), counter.clone());
        handles.push(tokio::spawn(async move {
            while Instant::now() < warm {
                f(counter.fetch_add(1, Ordering::Relaxed)).await;
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let mut handles = Vec::new();
    for _ in 0..args.concurrency {
        let (f, counter) = (f.clone(), counter.clone());
        handles.push(tokio::spawn(async move {
            let (mut lat, mut ok, mut failed) = (Vec::with_capacity(100_000), 0u64, 0u64);
            loop {
                let t = Instant::now();
                if t >= deadline {
                    break;
                }
                if f(counter.fetch_add(1, Ordering::Relaxed)).await {
                    ok += 1;
                    lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                } else {
                    failed += 1;
                }
            }
            (lat, ok, failed)
        }));
    }
    let mut stats = Stats {
        ok: 0,
        failed: 0,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
    };
    for h in handles {
        let (lat, ok, failed) = h.await.unwrap();
        stats.latencies.extend(lat);
        stats.ok += ok;
        stats.failed += failed;
    }
    stats.elapsed = start.elapsed();
    stats.latencies.sort_unstable();
    stats
}

pub fn print_header(what: &str, args: &Args) {
    eprintln!(
        "{what}: {} s per row, {} concurrent clients, {} customers, {} cores",
        args.seconds,
        args.concurrency,
        args.customers,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
}

/// Prints one row per measurement; the ratio column compares throughput with
/// the nearest baseline row above it (rows whose name says "baseline").
pub fn print_table(rows: &[(String, Stats)]) {
    println!(
        "{:<52} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "what", "req/s", "p50 µs", "p99 µs", "p99.9 µs", "failed", "×base"
    );
    let mut base = None;
    for (name, s) in rows {
        if name.contains("baseline") {
            base = Some(s.per_second());
        }
        let ratio = base.map_or(String::from("-"), |b| format!("{:.2}", s.per_second() / b));
        println!(
            "{:<52} {:>10.0} {:>8} {:>8} {:>8} {:>8} {:>7}",
            name,
            s.per_second(),
            s.percentile(0.50),
            s.percentile(0.99),
            s.percentile(0.999),
            s.failed,
            ratio
        );
    }
}

/// Polls `url` until it answers 2xx (bounded).
pub async fn wait_http(url: &str, within: Duration) {
    let deadline = Instant::now() + within;
    let client = reqwest::Client::new();
    loop {
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{url} did not become ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The tests' redis-server harness (private, on a unix socket in a temp dir,
/// killed with the process): one harness for tests and benches.
#[path = "../../tests/common/redis.rs"]
mod redis_server;
pub use redis_server::RedisServer;

/// The catalog of the example configuration, the one catalog fixture.
pub fn catalog() -> std::sync::Arc<creditgate::model::Catalog> {
    creditgate::config::Config::parse(
        include_str!("../../examples/creditgate.toml"),
        &Default::default(),
        0,
    )
    .expect("the example configuration")
    .catalog
}
