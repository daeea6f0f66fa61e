//! Wiring: the engine a configuration asks for, and serving the router with
//! graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, ConfigError};
use crate::engine::redis::{Conn, RedisOptions, RedisTarget, Tls};
use crate::engine::{
    AlwaysReady, Engine, LockIndex, MemoryEngine, MemoryLockIndex, Readiness, RedisEngine,
};
use crate::http::serve::{self, ConnLimits};
use crate::http::{self, AppState};
use crate::ledger::drain::{Drain, DrainOptions};
use crate::ledger::store::LedgerStore;
use crate::model::Retention;

/// What the HTTP layer needs from a store: the engine, its readiness probe,
/// and the lock-id → customer index `finalize` uses without a customer id.
pub struct Backend {
    pub engine: Arc<dyn Engine>,
    pub readiness: Arc<dyn Readiness>,
    pub lock_index: Arc<dyn LockIndex>,
    /// `true` when balances live only in this process.
    pub in_process: bool,
    /// Redis with `[ledger] url`: the drain moving the streams' entries
    /// into the database, to be run beside the server.
    pub ledger_drain: Option<Drain<Conn>>,
}

/// The engine a configuration asks for.
///
/// - No `redis_url` / `redis_cluster`: the in-process [`MemoryEngine`]
///   (always ready, [`MemoryLockIndex`]); the caller warns loudly that
///   balances live only in this process.
/// - `redis_url` or `redis_cluster`: the [`RedisEngine`], whose functions read
///   Redis `TIME` so every sidecar shares one clock; its readiness probes the
///   library on every primary (reloading it where lost); its lock index is a
///   Redis key per lock; data of another storage layout is refused.
///   A store that cannot be reached, or that may evict balances, is an error
///   naming the key, before any port is bound.
pub async fn build_engine(config: &Config, clock: Arc<dyn Clock>) -> Result<Backend, ConfigError> {
    let Some((key, opts)) = redis_options(config)? else {
        if config.ledger.is_some() {
            // The in-process ledger lives beside the balances (both start
            // over together); a database would outlive what it describes.
            tracing::warn!(
                "[ledger] url is ignored by the in-process engine: its ledger is kept in memory beside its balances"
            );
        }
        let engine = MemoryEngine::new(config.catalog.clone(), clock, retention(config));
        // Alerts and limit_reached entries are delivered as they are
        // appended, signed (src/webhooks.rs).
        let engine = match &config.webhooks {
            Some(w) => {
                let (engine, notices) = engine.with_notices();
                crate::webhooks::spawn_delivery(w.clone(), notices);
                engine
            }
            None => engine,
        };
        return Ok(Backend {
            engine: Arc::new(engine),
            readiness: Arc::new(AlwaysReady),
            lock_index: Arc::new(MemoryLockIndex::default()),
            in_process: true,
            ledger_drain: None,
        });
    };
    if config.webhooks.is_some() {
        tracing::warn!(
            "[webhooks] are delivered by the in-process engine only: the Redis engine records no alerts yet (issue 14), so nothing will be sent"
        );
    }
    // The database first: a ledger that cannot be opened stops the start
    // before any entry is written to a stream nobody drains.
    let store = match &config.ledger {
        Some(l) => Some(
            LedgerStore::open(&l.url)
                .await
                .map_err(|e| ConfigError::new("ledger.url", e.to_string()))?,
        ),
        None => None,
    };
    let mut engine = RedisEngine::connect(opts, config.catalog.clone(), None)
        .await
        .map_err(|e| ConfigError::new(key, format!("cannot use this Redis: {e}")))?;
    let ledger_drain = match (store, &config.ledger) {
        (Some(store), Some(l)) => {
            engine = engine.with_ledger(store.clone());
            let conn = engine.connection();
            let cross_slot = !matches!(conn, Conn::Cluster(_));
            Some(Drain::new(
                conn,
                store,
                engine.ledger_streams(),
                DrainOptions::every_slot(drain_consumer(), l.batch, l.claim_idle_ms, cross_slot),
            ))
        }
        _ => None,
    };
    let engine = Arc::new(engine);
    Ok(Backend {
        lock_index: Arc::new(engine.lock_index()),
        readiness: Arc::new(engine.readiness()),
        engine,
        in_process: false,
        ledger_drain,
    })
}

/// A drain's consumer name: the host and the process, unique among the
/// sidecars; a restarted process's pending entries are claimed by any
/// drain once idle for `claim_idle_ms`.
pub fn drain_consumer() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

fn retention(config: &Config) -> Retention {
    Retention {
        idempotency_ms: (config.idempotency_ttl_secs as i64).saturating_mul(1000),
        finalized_lock_ms: (config.idempotency_ttl_secs as i64).saturating_mul(1000),
    }
}

/// The Redis a configuration names (and the key naming it), if any.
fn redis_options(config: &Config) -> Result<Option<(&'static str, RedisOptions)>, ConfigError> {
    let target = match (&config.redis_url, &config.redis_cluster) {
        (Some(url), _) => Some(("redis_url", RedisTarget::Standalone(url.clone()))),
        (None, Some(nodes)) => Some(("redis_cluster", RedisTarget::Cluster(nodes.clone()))),
        (None, None) => None,
    };
    let Some((key, target)) = target else {
        return Ok(None);
    };
    let retention = retention(config);
    let opts = RedisOptions {
        target,
        namespace: String::new(),
        accept_eviction: config.accept_eviction,
        retention,
        timeout: Duration::from_millis(config.redis_timeout_ms),
        safety_interval: Duration::from_millis(config.redis_safety_check_ms),
        wait_replicas: config.redis_wait_replicas,
        wait_pool: config.redis_wait_pool,
        tls: Tls {
            ca_bundle: match &config.redis_ca_file {
                None => None,
                Some(path) => Some(std::fs::read(path).map_err(|e| {
                    ConfigError::new(
                        "redis_ca_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?),
            },
        },
        ledger_cap: config.ledger.as_ref().map(|l| l.stream_max),
    };
    Ok(Some((key, opts)))
}

/// `creditgate migrate`: converts the configured Redis's data of the
/// previous storage layout to this build's (stop every sidecar first).
pub async fn migrate(config: &Config) -> Result<crate::engine::redis::MigrateReport, ConfigError> {
    let Some((key, opts)) = redis_options(config)? else {
        return Err(ConfigError::new(
            "redis_url",
            "migrate needs a Redis (redis_url or redis_cluster)",
        ));
    };
    crate::engine::redis::migrate(opts, &config.catalog)
        .await
        .map_err(|e| ConfigError::new(key, format!("migration failed: {e}")))
}

/// The state a configuration describes, on the system clock.
pub async fn state_from_config(config: &Config) -> Result<(AppState, bool), ConfigError> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let backend = build_engine(config, clock.clone()).await?;
    let mut state = AppState::new(backend.engine, config.catalog.clone(), clock)
        .configured(config)
        .with_readiness(backend.readiness)
        .with_lock_index(backend.lock_index);
    if let Some(drain) = backend.ledger_drain {
        // Runs for the process's life: it acknowledges only what the
        // database committed, so stopping it anywhere loses nothing.
        state = state.with_ledger_drain(drain.status());
        tokio::spawn(drain.run(std::future::pending()));
    }
    Ok((state, backend.in_process))
}

/// How often the metrics' histograms fold their pending samples into buckets.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// Serves the API on `listener` until `shutdown` resolves, then stops
/// accepting and finishes in-flight requests before returning. Runs the
/// metrics' upkeep meanwhile.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = ConnLimits::for_open_files(serve::raise_open_file_limit());
    run_with_limits(listener, state, limits, shutdown).await
}

/// [`run`] under explicit connection limits.
pub async fn run_with_limits(
    listener: tokio::net::TcpListener,
    state: AppState,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let metrics = state.metrics.clone();
    let upkeep = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(METRICS_UPKEEP);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            metrics.upkeep();
        }
    });
    let served = serve::serve(listener, http::app(state), limits, shutdown).await;
    upkeep.abort();
    served
}

/// The connection limits a configuration asks for, under the open-file
/// limit (raised to the hard limit first): the cap is `max_connections`
/// if given, but never above the open-file limit less a reserve.
pub fn conn_limits(config: &Config) -> ConnLimits {
    let open_files = serve::raise_open_file_limit();
    let defaults = ConnLimits::for_open_files(open_files);
    ConnLimits {
        header_read_timeout: Duration::from_millis(config.http_header_timeout_ms),
        idle_timeout: Duration::from_millis(config.http_idle_timeout_ms),
        max_connections: config
            .max_connections
            .map_or(defaults.max_connections, |m| {
                (m as usize).min(defaults.max_connections)
            }),
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
