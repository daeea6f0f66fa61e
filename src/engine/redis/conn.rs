//! Where Redis is and the one multiplexed connection every path shares:
//! [`ConnectionManager`] on a standalone server, [`ClusterConnection`] on a
//! cluster, behind one [`Conn`] enum. No pool, no per-request PING: nothing
//! creditgate sends needs exclusive or blocking use of a connection.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

use crate::error::{Cause, EngineError};
use crate::model::Retention;

/// A multiplexed connection to a standalone server or a cluster.
#[derive(Clone)]
pub enum Conn {
    Single(Box<ConnectionManager>),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Where Redis is.
#[derive(Debug, Clone)]
pub enum RedisTarget {
    /// `redis://host:port/db` or `unix:///path/to/socket`.
    Standalone(String),
    /// Seed node URLs of a cluster.
    Cluster(Vec<String>),
}

/// How to reach Redis and what to accept from it.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub target: RedisTarget,
    /// Prefixed to every key before the layout version (empty in production;
    /// tests use it to share one server). Must not hold `{` or `}`.
    pub namespace: String,
    /// Run even when `maxmemory-policy` is not `noeviction` (balances may be
    /// evicted silently).
    pub accept_eviction: bool,
    pub retention: Retention,
    /// Bound on every call, reconnecting included: past it a call that may
    /// write answers `StoreTimeout` (outcome unknown), a read
    /// `StoreUnavailable`; see [`super::guard`].
    pub timeout: Duration,
    /// How often the safety check runs (eviction, the library, the
    /// deadline's clock offset).
    pub safety_interval: Duration,
    /// Writes wait for this many replicas' acknowledgement (`WAIT`, on a
    /// pooled connection of their own; [`super::replicas`]); 0: never.
    pub wait_replicas: u32,
    /// Connections in that pool.
    pub wait_pool: usize,
    /// TLS for `rediss://` targets.
    pub tls: Tls,
    /// The ledger (issue 14): `Some(cap)` makes every function append its
    /// entries to the slot's stream, refusing past `cap` entries per stream.
    pub ledger_cap: Option<u64>,
}

impl RedisOptions {
    pub fn standalone(url: &str) -> RedisOptions {
        RedisOptions {
            target: RedisTarget::Standalone(url.to_string()),
            namespace: String::new(),
            accept_eviction: false,
            retention: Retention::default(),
            timeout: Duration::from_secs(2),
            safety_interval: Duration::from_secs(5),
            wait_replicas: 0,
            wait_pool: 32,
            tls: Tls::default(),
            ledger_cap: None,
        }
    }
}

/// Maps a connection-level failure.
pub(crate) fn unavailable(e: RedisError) -> EngineError {
    EngineError::StoreUnavailable(Cause::new(e))
}

/// TLS settings for `rediss://` targets.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// PEM certificates to trust instead of the system's roots (a managed
    /// Redis's or a private CA's bundle).
    pub ca_bundle: Option<Vec<u8>>,
}

impl Tls {
    pub(crate) fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: None,
            root_cert: self.ca_bundle.clone(),
        }
    }
}

/// rustls needs one process-wide crypto provider; ring, installed once.
fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Opens the connection `target` names; each reply bounded by `timeout`.
/// `rediss://` URLs speak TLS (trusting `tls.ca_bundle` when given, else
/// the system's roots); a user and password in the URL authenticate.
pub async fn open(target: &RedisTarget, timeout: Duration, tls: &Tls) -> Result<Conn, EngineError> {
    install_crypto_provider();
    Ok(match target {
        RedisTarget::Standalone(url) => {
            let client = if url.starts_with("rediss://") && tls.ca_bundle.is_some() {
                redis::Client::build_with_tls(url.as_str(), tls.certificates())
            } else {
                redis::Client::open(url.as_str())
            }
            .map_err(unavailable)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(2)
                .set_min_delay(Duration::from_millis(10))
                .set_max_delay(Duration::from_millis(500));
            Conn::Single(Box::new(
                ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(unavailable)?,
            ))
        }
        RedisTarget::Cluster(urls) => {
            // The client retries a failing node (16 times by default, with
            // backoff) and rebuilds its slot map under a lock every request
            // waits on: its own bounds must be well inside ours, or one dead
            // primary stalls every shard's requests past the timeout
            // (tests/redis_failover.rs).
            let mut builder = redis::cluster::ClusterClientBuilder::new(urls.clone())
                .connection_timeout(timeout / 4)
                .response_timeout(timeout / 2)
                .retries(4)
                .min_retry_wait(5)
                .max_retry_wait(timeout.as_millis() as u64 / 8);
            if tls.ca_bundle.is_some() {
                builder = builder.certs(tls.certificates());
            }
            let client = builder.build().map_err(unavailable)?;
            Conn::Cluster(client.get_async_connection().await.map_err(unavailable)?)
        }
    })
}

/// Refuses a server whose `maxmemory-policy` may evict balances, unless
/// `accept` (then it only warns).
pub async fn check_eviction(conn: &Conn, accept: bool) -> Result<(), EngineError> {
    let mut conn = conn.clone();
    let reply: Result<Vec<String>, RedisError> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(&mut conn)
        .await;
    let policy = match reply {
        Ok(v) => v.get(1).cloned().unwrap_or_default(),
        Err(e) if e.is_io_error() || e.is_connection_refusal() => return Err(unavailable(e)),
        Err(e) => format!("unknown ({e})"),
    };
    if policy == "noeviction" {
        return Ok(());
    }
    tracing::warn!(
        policy = %policy,
        "REDIS MAY EVICT BALANCES: maxmemory-policy is not noeviction; \
         set `maxmemory-policy noeviction` on the server"
    );
    if accept {
        Ok(())
    } else {
        Err(EngineError::StoreUnavailable(Cause::msg(format!(
            "maxmemory-policy is {policy}, not noeviction: Redis could silently delete \
                 balances (set accept_eviction to run anyway)"
        ))))
    }
}
