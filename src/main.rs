//! `creditgate serve --config FILE` runs the Autumn-compatible sidecar;
//! `creditgate demo` prints the seed example on the in-process engine.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use creditgate::config::{Config, LogFormat};
use creditgate::model::Retention;
use creditgate::service::Service;
use creditgate::{Amount, Clock, Engine, MemoryEngine, SystemClock};

// glibc malloc cost a fifth of the sidecar's CPU per decision and its arena
// locks put threads to sleep; mimalloc's thread-local heaps do neither.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "creditgate",
    version,
    about = "Exact credit and rate limiting, Autumn-compatible"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API.
    Serve {
        /// The TOML configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Apply due resets once for every customer (for cron), then exit.
    ResetDue {
        /// The TOML configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Convert the configured Redis's data of the previous storage layout
    /// (cg1) to this build's; stop every sidecar first. Idempotent.
    Migrate {
        /// The TOML configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the Redis Functions library this build loads, and its version.
    Scripts {
        /// Print only the library name (creditgate_<layout>_<version>).
        #[arg(long)]
        name: bool,
    },
    /// The usage ledger's database side.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Print the seed example on the in-process engine.
    Demo,
    /// Load-test a sidecar, the engine or the baselines; check the books.
    Bench(creditgate::bench::BenchArgs),
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Drain the ledger's Redis streams into `[ledger] url` until SIGINT or
    /// SIGTERM (the same drain `serve` will run; running it alone is safe
    /// beside it: entries are keyed by their stream id).
    Drain {
        /// The TOML configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Stream keys to drain (default: every slot's ledger stream, which
        /// is what the library writes and `serve` drains).
        #[arg(long = "stream")]
        streams: Vec<String>,
        /// This drain's consumer name (default: the host name and pid).
        #[arg(long)]
        consumer: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("creditgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve { config } => runtime.block_on(serve(config)),
        Command::ResetDue { config } => runtime.block_on(reset_due(config)),
        Command::Migrate { config } => runtime.block_on(migrate(config)),
        Command::Scripts { name } => scripts(name),
        Command::Ledger {
            command:
                LedgerCommand::Drain {
                    config,
                    streams,
                    consumer,
                },
        } => runtime.block_on(ledger_drain(config, streams, consumer)),
        Command::Demo => runtime.block_on(demo()),
        Command::Bench(args) => runtime.block_on(creditgate::bench::run(args)),
    }
}

/// Logs go to stderr: as text, coloured only when stderr is a terminal (a
/// file or a pipe gets plain text), or as JSON lines.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Reads the configuration and builds the state it describes; a bad
/// configuration or an unusable store ends the process with status 2
/// before any port is bound.
async fn load(
    path: &std::path::Path,
) -> Result<(Config, creditgate::http::AppState, bool), ExitCode> {
    let config = Config::load(path).map_err(|e| {
        eprintln!("creditgate: {e}");
        ExitCode::from(2)
    })?;
    init_logging(config.log_format);
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let (state, in_process) = creditgate::server::state_from_config(&config)
        .await
        .map_err(|e| {
            eprintln!("creditgate: {e}");
            ExitCode::from(2)
        })?;
    Ok((config, state, in_process))
}

async fn serve(path: PathBuf) -> ExitCode {
    let (config, state, in_process) = match load(&path).await {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    if in_process {
        tracing::warn!(
            "NO REDIS CONFIGURED: running on the in-process engine; balances live only in this process \
             and are lost when it exits"
        );
    }
    if config.api_keys.is_empty() && config.admin_keys.is_empty() {
        tracing::warn!(
            "api_keys and admin_keys are both empty: every route is open without authentication"
        );
    }
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("creditgate: cannot listen on {}: {e}", config.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener
        .local_addr()
        .map_or_else(|_| config.listen.to_string(), |a| a.to_string());
    tracing::info!(%addr, "creditgate listening");
    // One signal stops both the server and the reset task.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        creditgate::server::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let sweeper = tokio::spawn(creditgate::sweeper::run(
        state.engine().clone(),
        state.metrics.clone(),
        std::time::Duration::from_secs(config.reset_interval_secs),
        stopped(stop_rx.clone()),
    ));
    let limits = creditgate::server::conn_limits(&config);
    tracing::info!(
        max_connections = limits.max_connections,
        header_timeout_ms = limits.header_read_timeout.as_millis() as u64,
        idle_timeout_ms = limits.idle_timeout.as_millis() as u64,
        "connection limits"
    );
    let served =
        creditgate::server::run_with_limits(listener, state, limits, stopped(stop_rx)).await;
    let _ = sweeper.await;
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("creditgate: server error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `creditgate reset-due`: one sweep, for cron. Without Redis there is
/// nothing to sweep (balances live only inside a serving process, whose own
/// task sweeps them): says so and fails.
async fn reset_due(path: PathBuf) -> ExitCode {
    let (_, state, in_process) = match load(&path).await {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    if in_process {
        eprintln!(
            "creditgate: reset-due: nothing to sweep: no redis_url or redis_cluster is configured, \
             so balances live only inside a serving process (`creditgate serve` sweeps its own \
             every reset_interval_secs)"
        );
        return ExitCode::FAILURE;
    }
    match creditgate::sweeper::sweep_once(state.engine().as_ref(), &state.metrics).await {
        Ok((r, took)) => {
            println!(
                "swept {} customers, applied {} resets in {} ms ({} shards leased elsewhere)",
                r.customers_swept,
                r.resets_applied,
                took.as_millis(),
                r.shards_leased_elsewhere
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("creditgate: reset sweep failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `creditgate migrate`: cg1 → cg2, then says what moved.
async fn migrate(path: PathBuf) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("creditgate: {e}");
            return ExitCode::from(2);
        }
    };
    match creditgate::server::migrate(&config).await {
        Ok(r) => {
            println!(
                "migrated to layout {}: {} customers, {} idempotency records, {} lock receipts, \
                 {} lock ids; {} old index keys removed",
                creditgate::engine::redis::library::LAYOUT,
                r.customers,
                r.idempotency_records,
                r.receipts,
                r.lock_ids,
                r.removed
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("creditgate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `creditgate ledger drain`: the drain alone, until a signal.
async fn ledger_drain(path: PathBuf, streams: Vec<String>, consumer: Option<String>) -> ExitCode {
    use creditgate::ledger::drain::{Drain, DrainOptions};
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("creditgate: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_format);
    let Some(ledger) = config.ledger.clone() else {
        eprintln!("creditgate: ledger drain: no [ledger] url is configured");
        return ExitCode::from(2);
    };
    let Some(redis_url) = config.redis_url.clone() else {
        eprintln!("creditgate: ledger drain: needs redis_url (the streams live in Redis)");
        return ExitCode::from(2);
    };
    let store = match creditgate::ledger::store::LedgerStore::open(&ledger.url).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("creditgate: {e}");
            return ExitCode::from(2);
        }
    };
    let timeout = std::time::Duration::from_millis(config.redis_timeout_ms);
    let conn = match redis::Client::open(redis_url.as_str()) {
        Ok(client) => {
            let c = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout));
            redis::aio::ConnectionManager::new_with_config(client, c).await
        }
        Err(e) => Err(e),
    };
    let conn = match conn {
        Ok(c) => c,
        Err(e) => {
            eprintln!("creditgate: ledger drain: redis: {e}");
            return ExitCode::FAILURE;
        }
    };
    let consumer = consumer.unwrap_or_else(creditgate::server::drain_consumer);
    let every_slot = streams.is_empty();
    let streams = if every_slot {
        creditgate::engine::redis::keys::ledger_streams("")
    } else {
        streams
    };
    tracing::info!(%consumer, streams = streams.len(), "ledger drain started");
    let opts = if every_slot {
        DrainOptions::every_slot(consumer, ledger.batch, ledger.claim_idle_ms, true)
    } else {
        DrainOptions {
            consumer,
            batch: ledger.batch,
            claim_idle_ms: ledger.claim_idle_ms,
            ..DrainOptions::default()
        }
    };
    let stats = Drain::new(conn, store.clone(), streams, opts)
        .run(creditgate::server::shutdown_signal())
        .await;
    store.close().await;
    tracing::info!(
        committed = stats.committed,
        inserted = stats.inserted,
        dead = stats.dead,
        failures = stats.failures,
        "ledger drain stopped"
    );
    ExitCode::SUCCESS
}

/// `creditgate scripts`: the library (`FUNCTION LOAD` takes it as is).
fn scripts(name_only: bool) -> ExitCode {
    use creditgate::engine::redis::{LIBRARY, LIBRARY_NAME};
    if name_only {
        println!("{LIBRARY_NAME}");
    } else {
        eprintln!(
            "{LIBRARY_NAME} (layout {}, functions {}*): load with FUNCTION LOAD, call with FCALL",
            creditgate::engine::redis::library::LAYOUT,
            creditgate::engine::redis::library::FUNCTION_PREFIX
        );
        print!("{LIBRARY}");
    }
    ExitCode::SUCCESS
}

/// The seed, from the example configuration: credits with basic_message = 1
/// and premium_message = 10, a plan of 200 credits a month; 15 premium + 50
/// basic leave 0, the next basic is denied.
async fn demo() -> ExitCode {
    const EXAMPLE: &str = include_str!("../examples/creditgate.toml");
    let config = match Config::parse(EXAMPLE, &Default::default(), SystemClock.now_ms()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("creditgate demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let run = async {
        let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new(
            config.catalog.clone(),
            Arc::new(SystemClock),
            Retention::default(),
        ));
        let mut service = Service::new(
            engine.clone(),
            config.catalog.clone(),
            Arc::new(SystemClock),
        );
        service.plans = Arc::new(config.plans.clone());
        service.attach("alice", "pro").await?;
        println!(
            "plan: 200 credits a month; basic_message = 1 credit, premium_message = 10 credits"
        );
        for _ in 0..15 {
            engine
                .consume("alice", "premium_message", Amount::whole(1), None)
                .await?;
        }
        for _ in 0..50 {
            engine
                .consume("alice", "basic_message", Amount::whole(1), None)
                .await?;
        }
        let left = engine.balances("alice").await?;
        let credits = left
            .pools
            .iter()
            .find(|p| p.pool == "credits")
            .map_or(Amount::ZERO, |p| p.remaining);
        println!("after 15 premium + 50 basic messages: {credits} credits left");
        let next = engine
            .consume("alice", "basic_message", Amount::whole(1), None)
            .await?;
        println!(
            "next basic message: {}",
            if next.allowed { "allowed" } else { "denied" }
        );
        Ok::<_, creditgate::EngineError>(())
    };
    match run.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("creditgate demo: {e}");
            ExitCode::FAILURE
        }
    }
}
