//! `creditgate bench soak`: a long mixed load with Redis killed and started
//! again on a schedule. The bench starts its own redis-server (AOF with
//! `appendfsync always`, so an acknowledged write survives `kill -9`) and a
//! creditgate sidecar on it, seeds customers, and runs keyed debits
//! (`track`, the key in the body) beside dry-run checks. Every
//! `--restart-every` it kills Redis (`kill -9`) and starts it again on the
//! same port and directory. Every answer is sorted: applied (200),
//! not applied (`store_unavailable`, `store_full`), unknown
//! (`store_timeout`, a dropped connection), and each unknown key is retried
//! at once until it settles (within its retention: a retry after the
//! idempotency record expired would charge again). The books then must balance exactly: what
//! every customer's balance shows spent equals its acknowledged debits plus
//! its settled unknown ones — less means an acknowledged debit was lost,
//! more that a "not applied" answer was not true. Redis's `used_memory` and
//! the sidecar's resident memory are sampled to show they stay flat after
//! the warm-up (idempotency records are kept `--idempotency-ttl` so they
//! reach a steady state).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use super::http::{self, Client};
use super::load::Fail;
use super::naive::{free_addr, Sidecar};
use super::progress::{Progress, ProgressMode};
use super::{parse_duration, Ids};

#[derive(Args, Debug)]
pub struct SoakArgs {
    /// How long the load runs.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub duration: Duration,
    /// Redis is killed (`kill -9`) and started again this often.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub restart_every: Duration,
    /// Memory samples before this are the warm-up.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub warmup: Duration,
    #[arg(long, default_value_t = 1000)]
    pub customers: usize,
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// The sidecar's `idempotency_ttl_secs`.
    #[arg(long, default_value_t = 60)]
    pub idempotency_ttl: u64,
    /// The sidecar's `redis_timeout_ms`.
    #[arg(long, default_value_t = 300)]
    pub redis_timeout_ms: u64,
    /// The redis-server binary.
    #[arg(long, default_value = "redis-server")]
    pub redis_server: String,
    /// How often memory is sampled.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub sample_every: Duration,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    /// How often plain progress lines are printed (seeding, reading back).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub progress_every: Duration,
}

/// One memory sample.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub at_secs: f64,
    pub redis_used_memory: u64,
    pub sidecar_rss: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct SoakReport {
    pub seconds: f64,
    pub restarts: u32,
    /// Seconds from each restart's `redis-server` answering PING to the
    /// first applied debit after it.
    pub recoveries_secs: Vec<f64>,
    pub requests: u64,
    pub applied: u64,
    pub not_applied: u64,
    pub unknown: u64,
    pub dry_checks: u64,
    /// Dry runs answered with a store error (a read: nothing to settle).
    pub dry_checks_refused: u64,
    pub other_errors: u64,
    pub unknown_settled_applied: u64,
    /// Unknown outcomes still unsettled when their key's retention ran out
    /// (then the books cannot tell; a failure).
    pub unsettled: u64,
    pub expected_spent: i64,
    pub balances_spent: i64,
    pub customers_off: usize,
    pub books_ok: bool,
    pub samples: Vec<Sample>,
    pub redis_memory_after_warmup: (u64, u64),
    pub sidecar_rss_after_warmup: (u64, u64),
}

/// A directory of the run's own, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, String> {
        let p = std::env::temp_dir().join(format!(
            "creditgate-soak-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(TempDir(p))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The bench's own redis-server under a watchdog shell (killed with the bench).
struct Redis {
    port: u16,
    dir: PathBuf,
    bin: String,
    shell: Option<Child>,
    pid: u32,
}

impl Redis {
    fn start(bin: &str, dir: &Path) -> Result<Redis, String> {
        let port = free_addr()?.port();
        let mut r = Redis {
            port,
            dir: dir.to_path_buf(),
            bin: bin.to_string(),
            shell: None,
            pid: 0,
        };
        r.launch()?;
        Ok(r)
    }

    fn launch(&mut self) -> Result<(), String> {
        let script = format!(
            "'{bin}' --port {port} --bind 127.0.0.1 --save '' --appendonly yes --appendfsync always \
             --dir '{dir}' --maxmemory-policy noeviction >>'{dir}/redis.log' 2>&1 & pid=$!; echo $pid; \
             cat >/dev/null; kill -9 $pid 2>/dev/null; wait $pid",
            bin = self.bin,
            port = self.port,
            dir = self.dir.display()
        );
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bin))?;
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        self.pid = line
            .trim()
            .parse()
            .map_err(|_| "no pid from the redis-server shell".to_string())?;
        self.shell = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.cli(&["PING"]).trim() != "PONG" {
            if Instant::now() > deadline {
                return Err(format!(
                    "redis-server on {} did not answer PING (is {} installed?)",
                    self.port, self.bin
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// `kill -9`, then the same server again on the same port and AOF.
    fn restart(&mut self) -> Result<(), String> {
        let _ = Command::new("kill")
            .args(["-9", &self.pid.to_string()])
            .status();
        if let Some(mut shell) = self.shell.take() {
            drop(shell.stdin.take());
            let _ = shell.wait();
        }
        self.launch()
    }

    fn cli(&self, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    fn used_memory(&self) -> u64 {
        self.cli(&["INFO", "memory"])
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut shell) = self.shell.take() {
            drop(shell.stdin.take());
            let _ = shell.wait();
        }
    }
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// What the workers saw.
#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    applied: AtomicU64,
    not_applied: AtomicU64,
    unknown: AtomicU64,
    dry: AtomicU64,
    dry_refused: AtomicU64,
    other: AtomicU64,
    /// Per customer: acknowledged debits.
    acked: Vec<AtomicU64>,
    /// Per customer: unknown outcomes settled by a retry of their key.
    settled: Vec<AtomicU64>,
    /// (customer, key) of unknown outcomes that did not settle in time.
    unknown_keys: Mutex<Vec<(usize, String)>>,
    /// Set on each restart; the first applied debit after it takes it.
    restarted_at: Mutex<Option<Instant>>,
    recoveries: Mutex<Vec<f64>>,
}

/// Retries an unknown outcome's key until an answer settles it (it
/// replays if the first attempt ran, applies if it did not): at once, as a
/// client must, within the key's retention — a retry after the record
/// expired would charge again.
async fn settle(
    client: &Client,
    conn: &mut http::Conn,
    ids: &Ids,
    tally: &Tally,
    customer: usize,
    key: &str,
    ttl: Duration,
) {
    let deadline = Instant::now() + ttl / 2;
    while Instant::now() < deadline {
        if client
            .post(conn, "/v1/track", None, track_body(ids, customer, key))
            .await
            .is_ok()
        {
            tally.settled[customer].fetch_add(1, Ordering::Relaxed);
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tally
        .unknown_keys
        .lock()
        .unwrap()
        .push((customer, key.to_string()));
}

fn track_body(ids: &Ids, customer: usize, key: &str) -> String {
    format!(
        "{{\"customer_id\":\"{}\",\"feature_id\":\"action1\",\"value\":1,\"idempotency_key\":\"{key}\"}}",
        ids.name(customer)
    )
}

pub async fn soak_mode(a: SoakArgs) -> Result<bool, String> {
    if a.customers == 0 || a.concurrency == 0 {
        return Err("--customers and --concurrency must be at least 1".into());
    }
    let progress = Progress::new(a.progress, a.progress_every);
    let dir = TempDir::new()?;
    let mut redis = Redis::start(&a.redis_server, dir.path())?;
    let addr = free_addr()?;
    let config = dir.path().join("creditgate.toml");
    std::fs::write(&config, super::EXAMPLE_CONFIG).map_err(|e| e.to_string())?;
    let env = vec![
        ("CREDITGATE_LISTEN".to_string(), addr.to_string()),
        (
            "CREDITGATE_REDIS_URL".to_string(),
            format!("redis://127.0.0.1:{}", redis.port),
        ),
        (
            "CREDITGATE_IDEMPOTENCY_TTL_SECS".to_string(),
            a.idempotency_ttl.to_string(),
        ),
        (
            "CREDITGATE_REDIS_TIMEOUT_MS".to_string(),
            a.redis_timeout_ms.to_string(),
        ),
        (
            "CREDITGATE_RESET_INTERVAL_SECS".to_string(),
            "3600".to_string(),
        ),
    ];
    let args = vec![
        "serve".to_string(),
        "--config".to_string(),
        config.display().to_string(),
    ];
    let sidecar = Sidecar::start("creditgate", &args, &env, addr, "/readyz", dir.path()).await?;
    let client = Client::new(&sidecar.url).await?;
    let ids = Ids::new(&format!("soak{:x}", rand::random::<u32>()));
    http::seed(
        &client,
        None,
        &ids,
        a.customers,
        1,
        "action1",
        "1000000000",
        a.concurrency.min(32),
        &progress,
    )
    .await?;

    let tally = Arc::new(Tally {
        acked: (0..a.customers).map(|_| AtomicU64::new(0)).collect(),
        settled: (0..a.customers).map(|_| AtomicU64::new(0)).collect(),
        ..Tally::default()
    });
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..a.concurrency {
        let (client, ids, tally, stop) = (client.clone(), ids.clone(), tally.clone(), stop.clone());
        let customers = a.customers;
        let ttl = Duration::from_secs(a.idempotency_ttl);
        workers.spawn(async move {
            let mut conn = client.conn();
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                let customer = ((w as u64 * 7919 + n * 104_729) % customers as u64) as usize;
                tally.requests.fetch_add(1, Ordering::Relaxed);
                // Three keyed debits to one dry-run check.
                if n % 4 == 3 {
                    let body = format!(
                        "{{\"customer_id\":\"{}\",\"feature_id\":\"action1\"}}",
                        ids.name(customer)
                    );
                    match client.post(&mut conn, "/v1/check", None, body).await {
                        Ok(_) => tally.dry.fetch_add(1, Ordering::Relaxed),
                        Err(_) => tally.dry_refused.fetch_add(1, Ordering::Relaxed),
                    };
                } else {
                    let key = format!("w{w}-{n}");
                    let r = client
                        .post(
                            &mut conn,
                            "/v1/track",
                            None,
                            track_body(&ids, customer, &key),
                        )
                        .await;
                    match r {
                        Ok(_) => {
                            tally.applied.fetch_add(1, Ordering::Relaxed);
                            tally.acked[customer].fetch_add(1, Ordering::Relaxed);
                            if let Some(t) = tally.restarted_at.lock().unwrap().take() {
                                tally
                                    .recoveries
                                    .lock()
                                    .unwrap()
                                    .push(t.elapsed().as_secs_f64());
                            }
                        }
                        Err(Fail::Status(_, c))
                            if c == "store_unavailable" || c == "store_full" =>
                        {
                            tally.not_applied.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(Fail::Status(503, c)) if c == "store_timeout" => {
                            tally.unknown.fetch_add(1, Ordering::Relaxed);
                            settle(&client, &mut conn, &ids, &tally, customer, &key, ttl).await;
                        }
                        Err(Fail::Transport(_)) | Err(Fail::Timeout) => {
                            tally.unknown.fetch_add(1, Ordering::Relaxed);
                            settle(&client, &mut conn, &ids, &tally, customer, &key, ttl).await;
                        }
                        Err(_) => {
                            tally.other.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                n += 1;
            }
        });
    }

    let mut samples = vec![];
    let mut restarts = 0;
    let mut next_restart = started + a.restart_every;
    let mut next_sample = started;
    let end = started + a.duration;
    while Instant::now() < end {
        let now = Instant::now();
        if now >= next_sample {
            samples.push(Sample {
                at_secs: started.elapsed().as_secs_f64(),
                redis_used_memory: redis.used_memory(),
                sidecar_rss: rss_bytes(sidecar.pid),
            });
            eprintln!(
                "{}",
                format_args!(
                "[soak] {:>5.0}s {} requests, {} applied, {} not applied, {} unknown, {} restarts",
                started.elapsed().as_secs_f64(),
                tally.requests.load(Ordering::Relaxed),
                tally.applied.load(Ordering::Relaxed),
                tally.not_applied.load(Ordering::Relaxed),
                tally.unknown.load(Ordering::Relaxed),
                restarts
            )
            );
            next_sample = now + a.sample_every;
        }
        // No restart in the run's last moments: the load must see Redis back.
        let tail = a.restart_every.min(Duration::from_secs(10)) / 2;
        if now >= next_restart && now + tail < end {
            redis.restart()?;
            *tally.restarted_at.lock().unwrap() = Some(Instant::now());
            restarts += 1;
            next_restart = now + a.restart_every;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    while workers.join_next().await.is_some() {}
    let seconds = started.elapsed().as_secs_f64();

    let settled: Vec<u64> = tally
        .settled
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .collect();
    let unsettled = std::mem::take(&mut *tally.unknown_keys.lock().unwrap());
    let balances = http::read_back(
        &client,
        None,
        &ids,
        a.customers,
        "action1",
        a.concurrency.min(32),
        &progress,
        "reading balances after",
    )
    .await?;
    let unit = crate::money::AMOUNT_SCALE;
    let mut off = 0;
    let (mut expected, mut spent) = (0i64, 0i64);
    for (i, b) in balances.iter().enumerate() {
        let want = (tally.acked[i].load(Ordering::Relaxed) + settled[i]) as i64 * unit;
        expected += want;
        spent += b.spent;
        if b.spent != want {
            off += 1;
        }
    }
    let after: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at_secs >= a.warmup.as_secs_f64())
        .collect();
    let span = |f: fn(&Sample) -> u64| {
        (
            after.iter().map(|s| f(s)).min().unwrap_or(0),
            after.iter().map(|s| f(s)).max().unwrap_or(0),
        )
    };
    let report = SoakReport {
        seconds,
        restarts,
        recoveries_secs: tally.recoveries.lock().unwrap().clone(),
        requests: tally.requests.load(Ordering::Relaxed),
        applied: tally.applied.load(Ordering::Relaxed),
        not_applied: tally.not_applied.load(Ordering::Relaxed),
        unknown: tally.unknown.load(Ordering::Relaxed),
        dry_checks: tally.dry.load(Ordering::Relaxed),
        dry_checks_refused: tally.dry_refused.load(Ordering::Relaxed),
        other_errors: tally.other.load(Ordering::Relaxed),
        unknown_settled_applied: settled.iter().sum(),
        unsettled: unsettled.len() as u64,
        expected_spent: expected / unit,
        balances_spent: spent / unit,
        customers_off: off,
        books_ok: off == 0 && unsettled.is_empty(),
        redis_memory_after_warmup: span(|s| s.redis_used_memory),
        sidecar_rss_after_warmup: span(|s| s.sidecar_rss),
        samples,
    };
    print_report(&report, &a);
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(report.books_ok)
}

fn print_report(r: &SoakReport, a: &SoakArgs) {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "\ncreditgate bench soak · {:.0} s · {} customers · concurrency {} · Redis kill -9 every {:?} ({} restarts)",
        r.seconds, a.customers, a.concurrency, a.restart_every, r.restarts
    );
    println!(
        "requests {} · debits applied {} · not applied {} · unknown {} (settled by their retries) · dry checks {} (+{} refused) · other errors {}",
        r.requests, r.applied, r.not_applied, r.unknown, r.dry_checks, r.dry_checks_refused, r.other_errors
    );
    let rec: Vec<String> = r
        .recoveries_secs
        .iter()
        .map(|s| format!("{:.0} ms", s * 1000.0))
        .collect();
    println!("first applied debit after each restart: {}", rec.join(", "));
    println!(
        "Redis used_memory after warm-up: {:.1}–{:.1} MiB · sidecar RSS after warm-up: {:.1}–{:.1} MiB",
        mib(r.redis_memory_after_warmup.0),
        mib(r.redis_memory_after_warmup.1),
        mib(r.sidecar_rss_after_warmup.0),
        mib(r.sidecar_rss_after_warmup.1)
    );
    println!(
        "books: {} — spent {} = acknowledged {} + settled unknown {} ({} unsettled){}",
        if r.books_ok { "OK" } else { "MISMATCH" },
        r.balances_spent,
        r.applied,
        r.unknown_settled_applied,
        r.unsettled,
        if r.books_ok {
            String::new()
        } else {
            format!(" expected (off on {} customers)", r.customers_off)
        }
    );
}
