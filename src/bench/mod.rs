//! `creditgate bench`: the load generator that produces the published
//! figures. It seeds its own customers under a run prefix, drives load with a
//! live progress display, reports throughput and HDR latency percentiles
//! beside the baselines (a naive sidecar it serves itself, and the minimal
//! script by EVALSHA), and checks the books after every run.
//!
//! - [`load`]: the driver (closed loop or a fixed offered rate);
//! - [`http`]: the HTTP client, creditgate's routes, the naive routes, seeding;
//! - [`redis_side`]: the engine directly, the minimal script, Redis counters;
//! - [`naive`]: the naive sidecar and child processes;
//! - [`books`]: the books check; [`report`]: the table and the JSON.

pub mod books;
pub mod http;
pub mod load;
pub mod naive;
pub mod progress;
pub mod redis_side;
pub mod report;
pub mod soak;
pub mod sweep;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use redis::aio::ConnectionManager;

use crate::config::Config;
use crate::model::Catalog;
use crate::money::{Amount, AMOUNT_SCALE};
use books::{Balance, BooksReport, LiveLedger};
use load::{Measured, Mix, Op, Spec, Target};
use progress::{Progress, ProgressMode};
use report::{Machine, Report, Row};

/// The seed configuration, used when no `--config` is given.
pub const EXAMPLE_CONFIG: &str = include_str!("../../examples/creditgate.toml");

/// Customer ids: `<prefix>-<n>`.
#[derive(Debug, Clone)]
pub struct Ids {
    prefix: Arc<str>,
}

impl Ids {
    pub fn new(prefix: &str) -> Ids {
        Ids {
            prefix: prefix.into(),
        }
    }
    pub fn name(&self, i: usize) -> String {
        format!("{}-{i}", self.prefix)
    }
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub mode: Box<Mode>,
}

#[derive(Subcommand, Debug)]
pub enum Mode {
    /// Load a running sidecar over HTTP: check, consume, track, gate, or a mix.
    Http(HttpArgs),
    /// creditgate's engine on Redis directly (no HTTP), with a pipelining depth.
    Redis(RedisArgs),
    /// The baselines alone: a naive sidecar's /hello and /check_cm (served by
    /// the bench) and the minimal script by EVALSHA.
    Baseline(BaselineArgs),
    /// Everything in interleaved rounds on one Redis: the naive sidecar,
    /// creditgate's sidecar (started by the bench unless --url), the minimal
    /// script and the engine, with ratios.
    Suite(SuiteArgs),
    /// The reset sweep at scale: due customers swept while the consuming
    /// check runs at a fixed rate, with SLOWLOG and the p99 ratio.
    Sweep(sweep::SweepArgs),
    /// A long mixed load with Redis killed (`kill -9`) and started again on
    /// a schedule: no acknowledged debit lost, memory flat (issue 12).
    Soak(soak::SoakArgs),
    /// The naive baseline sidecar (started by `baseline` and `suite`).
    #[command(hide = true)]
    NaiveSidecar {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        redis_url: String,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 10s, 500ms or 2m"))?;
    if !(0.0..=86_400.0 * 7.0).contains(&(v * scale)) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

fn parse_amount(s: &str) -> Result<Amount, String> {
    Amount::parse(s).map_err(|e| e.to_string())
}

/// The load shape, shared by every mode.
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Customers to spread the load over (1: one hot customer).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub customers: u64,
    /// One-off buckets per customer.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub buckets: u64,
    /// What each bucket grants (in the pool's units).
    #[arg(long, default_value = "1000000000", value_parser = parse_amount)]
    pub grant: Amount,
    /// The feature each request uses.
    #[arg(long, default_value = "basic_message")]
    pub feature: String,
    /// The pool (a credit system, or the feature itself) the buckets feed.
    #[arg(long, default_value = "credits")]
    pub pool: String,
    /// Units of the feature per request.
    #[arg(long, default_value = "1", value_parser = parse_amount)]
    pub units: Amount,
    /// Concurrent requests: HTTP connections; in redis mode, connections
    /// (each with --pipeline requests in flight). Default 64 (HTTP), 1 (Redis).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// How long each row is measured (after the warm-up).
    #[arg(long, value_parser = parse_duration, conflicts_with = "requests")]
    pub duration: Option<Duration>,
    /// Measured requests per row instead of a duration.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Unmeasured load before each row (its requests still count in the books).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// A fixed offered rate (req/s, open loop; latency from the intended send
    /// time). Default: closed-loop saturation.
    #[arg(long)]
    pub rate: Option<f64>,
    /// A request without an answer by then is a timeout (outcome unknown).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Rounds (each row once per round, interleaved). Default 3 for suite, else 1.
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Customer ids are `<prefix>-<n>`; default `bench-<random>`. Reusing a
    /// prefix reuses its customers.
    #[arg(long)]
    pub run_prefix: Option<String>,
    /// Seed the customers, print the prefix, and stop.
    #[arg(long)]
    pub seed_only: bool,
    /// Remove the seeded customers afterwards (needs Redis access).
    #[arg(long)]
    pub cleanup: bool,
    /// Seeding / read-back concurrency.
    #[arg(long, default_value_t = 64)]
    pub seed_concurrency: usize,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    /// How often plain progress lines are printed.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub progress_every: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct OpArgs {
    /// The operation.
    #[arg(long, value_enum, default_value_t = Op::Consume, conflicts_with = "mix")]
    pub op: Op,
    /// A weighted mix instead, e.g. `check=1,consume=3,track=1,gate=1`.
    #[arg(long)]
    pub mix: Option<String>,
}

impl OpArgs {
    fn mix(&self) -> Result<Mix, String> {
        match &self.mix {
            Some(m) => Mix::parse(m),
            None => Ok(Mix::one(self.op)),
        }
    }
}

#[derive(Args, Debug)]
pub struct HttpArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub ops: OpArgs,
    /// The sidecar.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Bearer key for the application routes.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Bearer key for seeding (balances.create); default: --api-key.
    #[arg(long)]
    pub admin_key: Option<String>,
    /// The sidecar's Redis: enables --cleanup and Redis CPU figures.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// The sidecar's pid, for its CPU per request.
    #[arg(long)]
    pub sidecar_pid: Option<u32>,
}

#[derive(Args, Debug)]
pub struct RedisArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub ops: OpArgs,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// The catalog (features); default: examples/creditgate.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 64)]
    pub pipeline: usize,
}

#[derive(Args, Debug)]
pub struct BaselineArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Requests in flight per Redis connection for the script row
    /// (default: the HTTP concurrency).
    #[arg(long)]
    pub pipeline: Option<usize>,
    /// An already running naive sidecar instead of the bench's own.
    #[arg(long)]
    pub naive_url: Option<String>,
}

#[derive(Args, Debug)]
pub struct SuiteArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// creditgate's configuration; default: examples/creditgate.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// An already running creditgate sidecar on --redis-url instead of the
    /// bench's own.
    #[arg(long)]
    pub url: Option<String>,
    #[arg(long)]
    pub api_key: Option<String>,
    #[arg(long)]
    pub admin_key: Option<String>,
    /// The external sidecar's pid (with --url), for its CPU per request.
    #[arg(long)]
    pub sidecar_pid: Option<u32>,
    /// Requests in flight per Redis connection in the Redis rows (default:
    /// the HTTP concurrency, over one connection, as the sidecars use Redis).
    #[arg(long)]
    pub pipeline: Option<usize>,
}

/// `creditgate bench …`.
pub async fn run(args: BenchArgs) -> ExitCode {
    let r = match *args.mode {
        Mode::Http(a) => http_mode(a).await,
        Mode::Redis(a) => redis_mode(a).await,
        Mode::Baseline(a) => baseline_mode(a).await,
        Mode::Suite(a) => suite_mode(a).await,
        Mode::Sweep(a) => sweep::sweep_mode(a).await,
        Mode::Soak(a) => soak::soak_mode(a).await,
        Mode::NaiveSidecar { listen, redis_url } => {
            naive::serve(listen, &redis_url).await.map(|_| true)
        }
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("creditgate bench: {e}");
            ExitCode::from(2)
        }
    }
}

type RowFuture = Pin<Box<dyn Future<Output = Measured> + Send>>;
type RunRow = Box<dyn Fn(Spec, Option<Arc<LiveLedger>>, Progress) -> RowFuture + Send + Sync>;

/// One row of the plan: how to run it once, and what to measure around it.
struct Planned {
    name: String,
    system: &'static str,
    in_flight: usize,
    cost: i64,
    mix: Mix,
    ledger: Option<Arc<LiveLedger>>,
    sidecar_pid: Option<u32>,
    compare_to: Option<String>,
    run: RunRow,
}

fn planned<T: Target>(
    name: String,
    system: &'static str,
    target: Arc<T>,
    in_flight: usize,
    cost: i64,
    mix: Mix,
    ledger: Option<Arc<LiveLedger>>,
) -> Planned {
    Planned {
        name,
        system,
        in_flight,
        cost,
        mix,
        ledger,
        sidecar_pid: None,
        compare_to: None,
        run: Box::new(move |spec, ledger, progress| {
            let target = target.clone();
            Box::pin(async move { load::run(target, &spec, ledger, &progress).await })
        }),
    }
}

#[derive(Default, Clone)]
struct Usage {
    requests: u64,
    sidecar: f64,
    sidecar_known: bool,
    client: f64,
    redis_cpu: f64,
    script_calls: u64,
    script_usec: u64,
    redis_known: bool,
}

/// Runs the plan's rows `rounds` times, interleaved, and turns them into
/// report rows.
async fn execute(
    plan: &[Planned],
    load: &LoadArgs,
    rounds: usize,
    redis: Option<&ConnectionManager>,
    progress: &Progress,
) -> Vec<Row> {
    let mut merged: Vec<Measured> = plan.iter().map(|p| Measured::empty(&p.name)).collect();
    let mut usage = vec![Usage::default(); plan.len()];
    let duration = match (load.duration, load.requests) {
        (Some(d), _) => Some(d),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(10)),
    };
    for round in 0..rounds {
        for (i, p) in plan.iter().enumerate() {
            let spec = Spec {
                label: if rounds > 1 {
                    format!("{} #{}", p.name, round + 1)
                } else {
                    p.name.clone()
                },
                lanes: p.in_flight,
                customers: load.customers as usize,
                mix: p.mix.clone(),
                duration,
                requests: load.requests,
                warmup: load.warmup,
                rate: load.rate,
                timeout: load.timeout,
                cost: p.cost,
                seed: rand::random(),
            };
            let sc0 = naive::cpu_seconds(p.sidecar_pid);
            let cl0 = naive::cpu_seconds(None);
            let r0 = match redis {
                Some(c) => redis_side::server_snap(c).await,
                None => None,
            };
            let m = (p.run)(spec, p.ledger.clone(), progress.clone()).await;
            let u = &mut usage[i];
            let total = m.ok + m.warmup_requests + m.error_count();
            u.requests += total;
            if let (Some(a), Some(b)) = (sc0, naive::cpu_seconds(p.sidecar_pid)) {
                if p.sidecar_pid.is_some() {
                    u.sidecar += b - a;
                    u.sidecar_known = true;
                }
            }
            if let (Some(a), Some(b)) = (cl0, naive::cpu_seconds(None)) {
                u.client += b - a;
            }
            if let (Some(c), Some(a)) = (redis, r0) {
                if let Some(b) = redis_side::server_snap(c).await {
                    u.redis_cpu += b.cpu - a.cpu;
                    // Minus the two INFO calls of the snapshot itself.
                    u.script_calls += b.script_calls.saturating_sub(a.script_calls);
                    u.script_usec += b.script_usec.saturating_sub(a.script_usec);
                    u.redis_known = true;
                }
            }
            merged[i].merge(&m);
        }
    }
    let mut rows: Vec<Row> = plan
        .iter()
        .zip(&merged)
        .zip(&usage)
        .map(|((p, m), u)| {
            let mut r = Row::of(m, p.system, p.in_flight, load.rate);
            let per = |secs: f64| secs * 1e6 / u.requests.max(1) as f64;
            r.cpu_us_per_request.client = per(u.client);
            r.cpu_us_per_request.sidecar = u.sidecar_known.then(|| per(u.sidecar));
            if u.redis_known {
                r.cpu_us_per_request.redis = Some(per(u.redis_cpu));
                // Background calls (a sidecar's reset sweep) are not a row's.
                if u.script_calls * 10 >= u.requests.max(1) {
                    r.redis_script_us_per_call = Some(u.script_usec as f64 / u.script_calls as f64);
                    r.redis_script_calls_per_request =
                        Some(u.script_calls as f64 / u.requests.max(1) as f64);
                }
            }
            r
        })
        .collect();
    for (i, p) in plan.iter().enumerate() {
        if let Some(base) = &p.compare_to {
            if let Some(b) = rows.iter().find(|r| &r.name == base).cloned() {
                rows[i].compare(&b);
            }
        }
    }
    rows
}

fn prefix(load: &LoadArgs) -> Result<String, String> {
    let p = load
        .run_prefix
        .clone()
        .unwrap_or_else(|| format!("bench-{:06x}", rand::random::<u32>() & 0xff_ffff));
    crate::model::validate_id("--run-prefix", &format!("{p}-0")).map_err(|e| e.to_string())?;
    if p.contains(['{', '}']) {
        return Err("--run-prefix must not hold { or }".into());
    }
    Ok(p)
}

fn catalog_of(config: &Option<PathBuf>) -> Result<(Arc<Catalog>, String), String> {
    let text = match config {
        Some(p) => std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?,
        None => EXAMPLE_CONFIG.to_string(),
    };
    let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
    let c = Config::parse(&text, &BTreeMap::new(), now).map_err(|e| e.to_string())?;
    Ok((c.catalog, text))
}

fn whole(a: Amount, what: &str) -> Result<i64, String> {
    if a.raw() % AMOUNT_SCALE != 0 || a.raw() <= 0 {
        return Err(format!(
            "{what} must be a whole number above 0 for the baselines"
        ));
    }
    Ok(a.raw() / AMOUNT_SCALE)
}

fn fresh_balances(n: usize, load: &LoadArgs) -> Vec<Balance> {
    vec![
        Balance {
            spent: 0,
            remaining: load.grant.raw().saturating_mul(load.buckets as i64),
        };
        n
    ]
}

fn finish(mut report: Report, load: &LoadArgs) -> Result<bool, String> {
    report.ok = report.books.iter().all(|b| b.ok) && report.rows.iter().all(|r| r.requests > 0);
    report.print();
    if let Some(path) = &load.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    if !report.ok {
        if report.books.iter().any(|b| !b.ok) {
            eprintln!("creditgate bench: THE BOOKS DO NOT BALANCE (see above)");
        } else {
            eprintln!("creditgate bench: a row had no successful request");
        }
    }
    Ok(report.ok)
}

fn new_report(mode: &str, load: &LoadArgs, prefix: &str, rounds: usize) -> Report {
    Report {
        version: env!("CARGO_PKG_VERSION"),
        mode: mode.to_string(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: Machine::here(),
        run_prefix: prefix.to_string(),
        customers: load.customers as usize,
        buckets: load.buckets as usize,
        rounds,
        rows: vec![],
        books: vec![],
        sweep: None,
        ok: false,
    }
}

/// creditgate's customers over HTTP: seeded, the before-balances of any that
/// already existed, and the cost of one request (from a dry-run check).
async fn http_setup(
    cg: &http::Creditgate,
    admin: Option<hyper::header::HeaderValue>,
    load: &LoadArgs,
    progress: &Progress,
) -> Result<(Vec<Balance>, i64), String> {
    let n = load.customers as usize;
    let existed = http::seed(
        &cg.client,
        admin.clone(),
        &cg.ids,
        n,
        load.buckets as usize,
        &load.pool,
        &load.grant.to_string(),
        load.seed_concurrency,
        progress,
    )
    .await?;
    let before = if existed.iter().any(|e| *e) {
        http::read_back(
            &cg.client,
            admin,
            &cg.ids,
            n,
            &load.pool,
            load.seed_concurrency,
            progress,
            "reading balances before",
        )
        .await?
    } else {
        fresh_balances(n, load)
    };
    let cost = http_cost(cg).await?;
    Ok((before, cost))
}

/// What one request costs in the pool, from a dry-run check on customer 0.
async fn http_cost(cg: &http::Creditgate) -> Result<i64, String> {
    let body = cg.check_body(0, false);
    let mut conn = cg.client.conn();
    let bytes = cg
        .client
        .post(&mut conn, "/v1/balances.check", cg.auth.as_ref(), body)
        .await
        .map_err(|f| format!("the probe check failed: {}", f.kind()))?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if v["balance"]["feature_id"].as_str() != Some(cg.pool.as_str()) {
        return Err(format!(
            "a check of {:?} is not answered from pool {:?} (answer: {v})",
            cg.feature, cg.pool
        ));
    }
    let req = v["required_balance"]
        .as_f64()
        .ok_or("the probe check has no required_balance")?;
    Ok((req * AMOUNT_SCALE as f64).round() as i64)
}

fn creditgate_http(
    client: http::Client,
    auth: Option<hyper::header::HeaderValue>,
    ids: &Ids,
    load: &LoadArgs,
    cost: i64,
) -> http::Creditgate {
    http::Creditgate {
        client,
        auth,
        ids: ids.clone(),
        feature: load.feature.clone(),
        pool: load.pool.clone(),
        units: load.units.to_string(),
        cost,
    }
}

fn keys(
    api: &Option<String>,
    admin: &Option<String>,
) -> (
    Option<hyper::header::HeaderValue>,
    Option<hyper::header::HeaderValue>,
) {
    (
        http::bearer(&api.clone().or(admin.clone())),
        http::bearer(&admin.clone().or(api.clone())),
    )
}

async fn http_mode(a: HttpArgs) -> Result<bool, String> {
    let load = &a.load;
    let progress = Progress::new(load.progress, load.progress_every);
    let mix = a.ops.mix()?;
    let prefix = prefix(load)?;
    let ids = Ids::new(&prefix);
    let n = load.customers as usize;
    let client = http::Client::new(&a.url).await?;
    let (api, admin) = keys(&a.api_key, &a.admin_key);
    let mut cg = creditgate_http(client.clone(), api, &ids, load, 0);
    eprintln!("run prefix {prefix}: {n} customers on {}", a.url);
    let (before, cost) = http_setup(&cg, admin.clone(), load, &progress).await?;
    cg.cost = cost;
    if load.seed_only {
        println!("{prefix}");
        return Ok(true);
    }
    let redis = match &a.redis_url {
        Some(u) => Some(redis_side::connect(u).await?),
        None => None,
    };
    let ledger = Arc::new(LiveLedger::new(n));
    let in_flight = load.concurrency.unwrap_or(64).max(1);
    let mut p = planned(
        format!("creditgate http {}", mix.describe()),
        "creditgate",
        Arc::new(cg),
        in_flight,
        cost,
        mix,
        Some(ledger.clone()),
    );
    p.sidecar_pid = a.sidecar_pid;
    let rounds = load.rounds.unwrap_or(1).max(1);
    let rows = execute(&[p], load, rounds, redis.as_ref(), &progress).await;
    let after = http::read_back(
        &client,
        admin,
        &ids,
        n,
        &load.pool,
        load.seed_concurrency,
        &progress,
        "reading balances after",
    )
    .await?;
    let books = books::check("creditgate", &ledger.snapshot(), &before, &after, &|i| {
        ids.name(i)
    });
    if load.cleanup {
        match &redis {
            Some(c) => redis_side::cleanup_creditgate(c, &ids, n, &progress).await?,
            None => eprintln!(
                "--cleanup: the HTTP API cannot delete customers; give --redis-url (the sidecar's Redis) \
                 to remove them. The customers {prefix}-* remain."
            ),
        }
    }
    let mut report = new_report("http", load, &prefix, rounds);
    report.rows = rows;
    report.books = vec![books];
    finish(report, load)
}

async fn engines(
    url: &str,
    catalog: &Arc<Catalog>,
    n: usize,
    timeout: Duration,
) -> Result<Vec<Arc<dyn crate::Engine>>, String> {
    let mut v = Vec::new();
    for _ in 0..n.max(1) {
        v.push(redis_side::engine(url, catalog.clone(), timeout).await?);
    }
    Ok(v)
}

/// Seeds creditgate's customers through the engine; their before-balances.
async fn engine_setup(
    engine: &Arc<dyn crate::Engine>,
    ids: &Ids,
    load: &LoadArgs,
    progress: &Progress,
) -> Result<Vec<Balance>, String> {
    let n = load.customers as usize;
    let existed = redis_side::seed_engine(
        engine,
        ids,
        n,
        load.buckets as usize,
        &load.pool,
        load.grant,
        load.seed_concurrency,
        progress,
    )
    .await?;
    if existed.iter().any(|e| *e) {
        redis_side::read_back_engine(
            engine,
            ids,
            n,
            &load.pool,
            load.seed_concurrency,
            progress,
            "reading balances before",
        )
        .await
    } else {
        Ok(fresh_balances(n, load))
    }
}

/// The books of a load through the engine: the balances read back against
/// what the answers reported.
async fn engine_books(
    engine: &Arc<dyn crate::Engine>,
    ids: &Ids,
    load: &LoadArgs,
    ledger: &LiveLedger,
    before: &[Balance],
    progress: &Progress,
) -> Result<BooksReport, String> {
    let after = redis_side::read_back_engine(
        engine,
        ids,
        load.customers as usize,
        &load.pool,
        load.seed_concurrency,
        progress,
        "reading balances after",
    )
    .await?;
    Ok(books::check(
        "creditgate",
        &ledger.snapshot(),
        before,
        &after,
        &|i| ids.name(i),
    ))
}

async fn redis_mode(a: RedisArgs) -> Result<bool, String> {
    let load = &a.load;
    let progress = Progress::new(load.progress, load.progress_every);
    let mix = a.ops.mix()?;
    if mix.has(Op::Gate) {
        return Err("gate is an HTTP route: use http mode for it".into());
    }
    let prefix = prefix(load)?;
    let ids = Ids::new(&prefix);
    let n = load.customers as usize;
    let (catalog, _) = catalog_of(&a.config)?;
    let cost = redis_side::cost_in(&catalog, &load.feature, &load.pool, load.units)?;
    let conns = load.concurrency.unwrap_or(1).max(1);
    let pipeline = a.pipeline.max(1);
    let engines = engines(&a.redis_url, &catalog, conns, load.timeout).await?;
    eprintln!("run prefix {prefix}: {n} customers on {}", a.redis_url);
    let before = engine_setup(&engines[0], &ids, load, &progress).await?;
    if load.seed_only {
        println!("{prefix}");
        return Ok(true);
    }
    let redis = redis_side::connect(&a.redis_url).await?;
    let ledger = Arc::new(LiveLedger::new(n));
    let target = redis_side::EngineTarget {
        engines: engines.clone(),
        pipeline,
        ids: ids.clone(),
        feature: load.feature.clone(),
        pool: load.pool.clone(),
        units: load.units,
    };
    let p = planned(
        format!("creditgate engine {} ({conns}×{pipeline})", mix.describe()),
        "creditgate",
        Arc::new(target),
        conns * pipeline,
        cost,
        mix,
        Some(ledger.clone()),
    );
    let rounds = load.rounds.unwrap_or(1).max(1);
    let rows = execute(&[p], load, rounds, Some(&redis), &progress).await;
    let books = engine_books(&engines[0], &ids, load, &ledger, &before, &progress).await?;
    if load.cleanup {
        redis_side::cleanup_creditgate(&redis, &ids, n, &progress).await?;
    }
    let mut report = new_report("redis", load, &prefix, rounds);
    report.rows = rows;
    report.books = vec![books];
    finish(report, load)
}

/// The bench's own temporary directory (sidecar logs, configuration).
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> Result<TempDir, String> {
        let p = std::env::temp_dir().join(format!("creditgate-{prefix}-{}", std::process::id()));
        std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start_naive(redis_url: &str, dir: &std::path::Path) -> Result<naive::Sidecar, String> {
    let addr = naive::free_addr()?;
    naive::Sidecar::start(
        "naive-sidecar",
        &[
            "bench".into(),
            "naive-sidecar".into(),
            "--listen".into(),
            addr.to_string(),
            "--redis-url".into(),
            redis_url.into(),
        ],
        &[],
        addr,
        "",
        dir,
    )
    .await
}

/// The baseline system: the naive sidecar's rows and the minimal script's.
struct Baselines {
    rows: Vec<Planned>,
    ledger: Arc<LiveLedger>,
    seeded: i64,
}

#[allow(clippy::too_many_arguments)]
async fn baselines(
    redis_url: &str,
    naive_client: http::Client,
    naive_pid: Option<u32>,
    ids: &Ids,
    load: &LoadArgs,
    http_in_flight: usize,
    pipeline: usize,
    progress: &Progress,
) -> Result<Baselines, String> {
    let n = load.customers as usize;
    let credits = whole(load.units, "--units")?;
    let seeded = whole(load.grant, "--grant")? * load.buckets as i64;
    let redis = redis_side::connect(redis_url).await?;
    redis_side::seed_script(&redis, ids, n, seeded, progress).await?;
    let sha = redis_side::load_minimal(&redis).await?;
    let ledger = Arc::new(LiveLedger::new(n));
    let body = Arc::new(creditgate_http(naive_client.clone(), None, ids, load, 0));
    let cost = credits * AMOUNT_SCALE;
    let naive = |path: &'static str| {
        Arc::new(http::Naive {
            client: naive_client.clone(),
            path,
            body: body.clone(),
            cost,
        })
    };
    let mut hello = planned(
        "naive /hello".into(),
        "baseline",
        naive("/hello"),
        http_in_flight,
        cost,
        Mix::one(Op::Consume),
        None,
    );
    hello.sidecar_pid = naive_pid;
    let mut check_cm = planned(
        "naive /check_cm".into(),
        "baseline",
        naive("/check_cm"),
        http_in_flight,
        cost,
        Mix::one(Op::Consume),
        Some(ledger.clone()),
    );
    check_cm.sidecar_pid = naive_pid;
    check_cm.compare_to = Some("naive /hello".into());
    let script = redis_side::ScriptTarget {
        conns: vec![redis.clone()],
        pipeline,
        sha,
        ids: ids.clone(),
        credits,
    };
    let script = planned(
        format!("minimal script EVALSHA (1×{pipeline})"),
        "baseline",
        Arc::new(script),
        pipeline,
        cost,
        Mix::one(Op::Consume),
        Some(ledger.clone()),
    );
    Ok(Baselines {
        rows: vec![hello, check_cm, script],
        ledger,
        seeded,
    })
}

async fn baseline_books(
    b: &Baselines,
    redis: &ConnectionManager,
    ids: &Ids,
    load: &LoadArgs,
) -> Result<BooksReport, String> {
    let n = load.customers as usize;
    let after = redis_side::read_back_script(redis, ids, n, b.seeded).await?;
    let before = vec![Balance::default(); n];
    Ok(books::check(
        "baseline",
        &b.ledger.snapshot(),
        &before,
        &after,
        &|i| ids.name(i),
    ))
}

async fn baseline_mode(a: BaselineArgs) -> Result<bool, String> {
    let load = &a.load;
    let progress = Progress::new(load.progress, load.progress_every);
    let prefix = prefix(load)?;
    let ids = Ids::new(&prefix);
    let n = load.customers as usize;
    let dir = TempDir::new(&prefix)?;
    let in_flight = load.concurrency.unwrap_or(64).max(1);
    let pipeline = a.pipeline.unwrap_or(in_flight).max(1);
    let own = match &a.naive_url {
        Some(_) => None,
        None => Some(start_naive(&a.redis_url, &dir.0).await?),
    };
    let url = a
        .naive_url
        .clone()
        .unwrap_or_else(|| own.as_ref().map(|s| s.url.clone()).unwrap_or_default());
    let client = http::Client::new(&url).await?;
    eprintln!("run prefix {prefix}: {n} customers; naive sidecar {url}");
    let b = baselines(
        &a.redis_url,
        client,
        own.as_ref().map(|s| s.pid),
        &ids,
        load,
        in_flight,
        pipeline,
        &progress,
    )
    .await?;
    if load.seed_only {
        println!("{prefix}");
        return Ok(true);
    }
    let redis = redis_side::connect(&a.redis_url).await?;
    let rounds = load.rounds.unwrap_or(1).max(1);
    let rows = execute(&b.rows, load, rounds, Some(&redis), &progress).await;
    let books = baseline_books(&b, &redis, &ids, load).await?;
    if load.cleanup {
        redis_side::cleanup_script(&redis, &ids, n).await?;
    }
    drop(own);
    let mut report = new_report("baseline", load, &prefix, rounds);
    report.rows = rows;
    report.books = vec![books];
    finish(report, load)
}

async fn suite_mode(a: SuiteArgs) -> Result<bool, String> {
    let load = &a.load;
    let progress = Progress::new(load.progress, load.progress_every);
    let prefix = prefix(load)?;
    let ids = Ids::new(&prefix);
    let n = load.customers as usize;
    let dir = TempDir::new(&prefix)?;
    let in_flight = load.concurrency.unwrap_or(64).max(1);
    let pipeline = a.pipeline.unwrap_or(in_flight).max(1);
    let (catalog, config_text) = catalog_of(&a.config)?;
    let engine_cost = redis_side::cost_in(&catalog, &load.feature, &load.pool, load.units)?;

    // creditgate's sidecar (ours unless --url) and the naive one, on one Redis.
    let own_cg = match &a.url {
        Some(_) => None,
        None => {
            let path = dir.0.join("creditgate.toml");
            std::fs::write(&path, &config_text).map_err(|e| e.to_string())?;
            let addr = naive::free_addr()?;
            Some(
                naive::Sidecar::start(
                    "creditgate-serve",
                    &[
                        "serve".into(),
                        "--config".into(),
                        path.display().to_string(),
                    ],
                    &[
                        ("CREDITGATE_LISTEN".into(), addr.to_string()),
                        ("CREDITGATE_REDIS_URL".into(), a.redis_url.clone()),
                        ("RUST_LOG".into(), "warn".into()),
                    ],
                    addr,
                    "/readyz",
                    &dir.0,
                )
                .await?,
            )
        }
    };
    let cg_url = a
        .url
        .clone()
        .unwrap_or_else(|| own_cg.as_ref().map(|s| s.url.clone()).unwrap_or_default());
    let cg_pid = own_cg.as_ref().map(|s| s.pid).or(a.sidecar_pid);
    let naive_sc = start_naive(&a.redis_url, &dir.0).await?;
    eprintln!(
        "run prefix {prefix}: {n} customers; creditgate {cg_url}, naive {}, Redis {}",
        naive_sc.url, a.redis_url
    );

    // Seeding: creditgate's customers through the engine (same Redis), the
    // baseline's keys directly.
    let engine = redis_side::engine(&a.redis_url, catalog.clone(), load.timeout).await?;
    let before = engine_setup(&engine, &ids, load, &progress).await?;
    let (api, _) = keys(&a.api_key, &a.admin_key);
    let client = http::Client::new(&cg_url).await?;
    let cg = creditgate_http(client, api, &ids, load, 0);
    let http_cost = http_cost(&cg).await?;
    if http_cost != engine_cost {
        return Err(format!(
            "the sidecar prices a request at {http_cost}e-4, the catalog at {engine_cost}e-4: is --config the sidecar's?"
        ));
    }
    let cg = Arc::new(http::Creditgate {
        cost: http_cost,
        ..cg
    });
    let naive_client = http::Client::new(&naive_sc.url).await?;
    let b = baselines(
        &a.redis_url,
        naive_client,
        Some(naive_sc.pid),
        &ids,
        load,
        in_flight,
        pipeline,
        &progress,
    )
    .await?;
    if load.seed_only {
        println!("{prefix}");
        return Ok(true);
    }
    let ledger = Arc::new(LiveLedger::new(n));
    let mut consume = planned(
        "creditgate http consume".into(),
        "creditgate",
        cg.clone(),
        in_flight,
        http_cost,
        Mix::one(Op::Consume),
        Some(ledger.clone()),
    );
    consume.sidecar_pid = cg_pid;
    consume.compare_to = Some("naive /check_cm".into());
    let mut gate = planned(
        "creditgate http gate".into(),
        "creditgate",
        cg.clone(),
        in_flight,
        http_cost,
        Mix::one(Op::Gate),
        Some(ledger.clone()),
    );
    gate.sidecar_pid = cg_pid;
    gate.compare_to = Some("naive /check_cm".into());
    let script_name = b.rows[2].name.clone();
    let target = redis_side::EngineTarget {
        engines: vec![engine.clone()],
        pipeline,
        ids: ids.clone(),
        feature: load.feature.clone(),
        pool: load.pool.clone(),
        units: load.units,
    };
    let mut eng = planned(
        format!("creditgate engine consume (1×{pipeline})"),
        "creditgate",
        Arc::new(target),
        pipeline,
        engine_cost,
        Mix::one(Op::Consume),
        Some(ledger.clone()),
    );
    eng.compare_to = Some(script_name);
    let mut rows_plan = Vec::new();
    let mut base_rows = b.rows.into_iter();
    let (hello, check_cm, script) = (
        base_rows.next().expect("hello"),
        base_rows.next().expect("check_cm"),
        base_rows.next().expect("script"),
    );
    rows_plan.extend([hello, check_cm, consume, gate, script, eng]);
    let b = Baselines {
        rows: vec![],
        ledger: b.ledger,
        seeded: b.seeded,
    };
    let redis = redis_side::connect(&a.redis_url).await?;
    let rounds = load.rounds.unwrap_or(3).max(1);
    let rows = execute(&rows_plan, load, rounds, Some(&redis), &progress).await;
    let after = redis_side::read_back_engine(
        &engine,
        &ids,
        n,
        &load.pool,
        load.seed_concurrency,
        &progress,
        "reading balances after",
    )
    .await?;
    let cg_books = books::check("creditgate", &ledger.snapshot(), &before, &after, &|i| {
        ids.name(i)
    });
    let base_books = baseline_books(&b, &redis, &ids, load).await?;
    if load.cleanup {
        redis_side::cleanup_creditgate(&redis, &ids, n, &progress).await?;
        redis_side::cleanup_script(&redis, &ids, n).await?;
    }
    drop(naive_sc);
    drop(own_cg);
    let mut report = new_report("suite", load, &prefix, rounds);
    report.rows = rows;
    report.books = vec![cg_books, base_books];
    finish(report, load)
}
