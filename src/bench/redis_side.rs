//! The Redis side: creditgate's engine as a load target (through the
//! [`Engine`] trait only, so the switch from EVALSHA to FCALL changes nothing
//! here), the minimal two-bucket script by EVALSHA, seeding, reading back,
//! cleaning up, and the server's own counters (CPU, script µs per call).
//!
//! Every path into the Redis engine's module is in this file.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{stream, StreamExt};
use redis::aio::ConnectionManager;

use super::books::Balance;
use super::load::{Fail, Op, Reply, Req, Target};
use super::progress::Progress;
use super::Ids;
use crate::calendar::Interval;
use crate::engine::redis::{customer_keys, RedisEngine, RedisOptions, RedisTarget};
use crate::error::EngineError;
use crate::model::{Catalog, Grant, Outcome, OverageBehavior};
use crate::money::Amount;
use crate::Engine;

/// The minimal decision the baseline measures (the same text as the shared
/// `two_bucket_strings.lua`, hence the same SHA).
pub const MINIMAL_SCRIPT: &str = include_str!("two_bucket_strings.lua");

/// A multiplexed connection, as the naive sidecar uses.
pub async fn connect(url: &str) -> Result<ConnectionManager, String> {
    let client = redis::Client::open(url).map_err(|e| format!("--redis-url {url:?}: {e}"))?;
    ConnectionManager::new(client)
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))
}

/// creditgate's Redis engine on `url` (empty namespace: the sidecar's keys).
pub async fn engine(
    url: &str,
    catalog: Arc<Catalog>,
    timeout: Duration,
) -> Result<Arc<dyn Engine>, String> {
    engine_on(url, catalog, timeout, None).await
}

/// The engine on `url`, on `clock` (None: Redis's own `TIME`).
pub async fn engine_on(
    url: &str,
    catalog: Arc<Catalog>,
    timeout: Duration,
    clock: Option<Arc<dyn crate::Clock>>,
) -> Result<Arc<dyn Engine>, String> {
    let opts = RedisOptions {
        target: RedisTarget::Standalone(url.to_string()),
        timeout,
        ..RedisOptions::standalone(url)
    };
    let e = RedisEngine::connect(opts, catalog, clock)
        .await
        .map_err(|e| format!("creditgate's engine on {url}: {e}"))?;
    Ok(Arc::new(e))
}

fn engine_fail(e: EngineError) -> Fail {
    Fail::Engine(e.code().to_string())
}

/// creditgate's engine, no HTTP: `pipeline` lanes share each engine (its one
/// multiplexed connection).
pub struct EngineTarget {
    pub engines: Vec<Arc<dyn Engine>>,
    pub pipeline: usize,
    pub ids: Ids,
    pub feature: String,
    pub pool: String,
    pub units: Amount,
}

impl EngineTarget {
    fn reply(&self, out: &Outcome, charging: bool) -> Reply {
        let charged = if out.allowed && charging {
            out.entries
                .iter()
                .filter(|e| e.pool == self.pool)
                .map(|e| e.amount.raw())
                .sum()
        } else {
            0
        };
        Reply {
            allowed: out.allowed,
            charged,
            remaining: out
                .pools
                .iter()
                .find(|p| p.pool == self.pool && p.owned)
                .map(|p| p.remaining.raw()),
            charging,
        }
    }
}

impl Target for EngineTarget {
    type Conn = Arc<dyn Engine>;

    async fn open(&self, lane: usize) -> Result<Self::Conn, String> {
        Ok(self.engines[(lane / self.pipeline.max(1)) % self.engines.len()].clone())
    }

    async fn call(&self, e: &mut Self::Conn, req: Req) -> Result<Reply, Fail> {
        let id = self.ids.name(req.customer);
        match req.op {
            Op::Check => e
                .check(&id, &self.feature, self.units)
                .await
                .map(|o| self.reply(&o, false)),
            Op::Consume | Op::Gate => e
                .consume(&id, &self.feature, self.units, None)
                .await
                .map(|o| self.reply(&o, true)),
            Op::Track => {
                let op = crate::model::Op::Track {
                    feature: self.feature.clone(),
                    units: self.units,
                    behavior: OverageBehavior::Cap,
                };
                e.apply(&id, &op, None).await.map(|o| Reply {
                    allowed: true,
                    ..self.reply(&o, true)
                })
            }
        }
        .map_err(engine_fail)
    }
}

/// What `units` of `feature` cost in `pool` (raw), from the catalog.
pub fn cost_in(catalog: &Catalog, feature: &str, pool: &str, units: Amount) -> Result<i64, String> {
    let pools = catalog.pools_for(feature).map_err(|e| e.to_string())?;
    let c = pools
        .iter()
        .find(|p| p.pool == pool)
        .ok_or_else(|| format!("feature {feature:?} is not paid from pool {pool:?}"))?;
    i64::try_from(crate::money::charge(units.raw(), c.cost)).map_err(|e| e.to_string())
}

/// Seeds through the engine: each customer with `buckets` one-off buckets.
/// Returns, per customer, whether it already held them.
#[allow(clippy::too_many_arguments)]
pub async fn seed_engine(
    engine: &Arc<dyn Engine>,
    ids: &Ids,
    customers: usize,
    buckets: usize,
    pool: &str,
    grant: Amount,
    lanes: usize,
    progress: &Progress,
) -> Result<Vec<bool>, String> {
    let bar = progress.task("seeding customers (engine)", customers as u64);
    let results: Vec<Result<bool, String>> = stream::iter(0..customers)
        .map(|i| {
            let id = ids.name(i);
            let bar = &bar;
            async move {
                engine
                    .create_customer(&id)
                    .await
                    .map_err(|e| format!("create {id}: {e}"))?;
                let mut existed = false;
                for j in 0..buckets {
                    let g = Grant {
                        balance_id: Some(format!("bench-{j}")),
                        ..Grant::new(pool, grant, Interval::OneOff)
                    };
                    match engine.grant(&id, &g).await {
                        Ok(_) => {}
                        Err(EngineError::BalanceAlreadyExists(_)) => existed = true,
                        Err(e) => return Err(format!("grant {id}: {e}")),
                    }
                }
                bar.inc(1);
                Ok(existed)
            }
        })
        .buffered(lanes.max(1))
        .collect()
        .await;
    bar.finish();
    results.into_iter().collect()
}

/// Every customer's balance in `pool`, through the engine.
pub async fn read_back_engine(
    engine: &Arc<dyn Engine>,
    ids: &Ids,
    customers: usize,
    pool: &str,
    lanes: usize,
    progress: &Progress,
    what: &str,
) -> Result<Vec<Balance>, String> {
    let bar = progress.task(what, customers as u64);
    let results: Vec<Result<Balance, String>> = stream::iter(0..customers)
        .map(|i| {
            let id = ids.name(i);
            let bar = &bar;
            async move {
                let b = engine
                    .balances(&id)
                    .await
                    .map_err(|e| format!("balances {id}: {e}"))?;
                bar.inc(1);
                Ok(b.pools
                    .iter()
                    .find(|p| p.pool == pool && p.owned)
                    .map_or_else(Balance::default, |p| Balance {
                        spent: p.usage.raw(),
                        remaining: p.remaining.raw(),
                    }))
            }
        })
        .buffered(lanes.max(1))
        .collect()
        .await;
    bar.finish();
    results.into_iter().collect()
}

/// Deletes creditgate's keys of every bench customer (the HTTP API has no
/// delete): the customer hash, its pending locks, its due-index entry.
pub async fn cleanup_creditgate(
    conn: &ConnectionManager,
    ids: &Ids,
    customers: usize,
    progress: &Progress,
) -> Result<(), String> {
    let bar = progress.task("removing creditgate customers", customers as u64);
    for chunk in (0..customers).collect::<Vec<_>>().chunks(500) {
        let mut p = redis::pipe();
        for &i in chunk {
            let id = ids.name(i);
            let k = customer_keys("", &id);
            p.cmd("DEL").arg(&k.customer).arg(&k.locks).ignore();
            p.cmd("ZREM").arg(&k.due).arg(&k.tag).ignore();
        }
        let mut c = conn.clone();
        p.query_async::<()>(&mut c)
            .await
            .map_err(|e| format!("cleanup: {e}"))?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish();
    Ok(())
}

fn script_keys(ids: &Ids, i: usize) -> (String, String) {
    let id = ids.name(i);
    (format!("{{{id}}}:monthly"), format!("{{{id}}}:oneoff"))
}

/// Seeds the minimal script's keys: `{id}:oneoff` = the customer's grant
/// (a one-off bucket), no monthly bucket.
pub async fn seed_script(
    conn: &ConnectionManager,
    ids: &Ids,
    customers: usize,
    credits: i64,
    progress: &Progress,
) -> Result<(), String> {
    let bar = progress.task("seeding baseline keys", customers as u64);
    for chunk in (0..customers).collect::<Vec<_>>().chunks(1000) {
        let mut p = redis::pipe();
        for &i in chunk {
            let (m, o) = script_keys(ids, i);
            p.cmd("DEL").arg(&m).ignore();
            p.cmd("SET").arg(&o).arg(credits).ignore();
        }
        let mut c = conn.clone();
        p.query_async::<()>(&mut c)
            .await
            .map_err(|e| format!("seeding baseline keys: {e}"))?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish();
    Ok(())
}

/// The minimal script's balances (spent = seeded − left), raw.
pub async fn read_back_script(
    conn: &ConnectionManager,
    ids: &Ids,
    customers: usize,
    seeded: i64,
) -> Result<Vec<Balance>, String> {
    let mut out = Vec::with_capacity(customers);
    for chunk in (0..customers).collect::<Vec<_>>().chunks(1000) {
        let mut p = redis::pipe();
        for &i in chunk {
            let (m, o) = script_keys(ids, i);
            p.cmd("MGET").arg(&m).arg(&o);
        }
        let mut c = conn.clone();
        let got: Vec<(Option<i64>, Option<i64>)> = p
            .query_async(&mut c)
            .await
            .map_err(|e| format!("reading baseline keys: {e}"))?;
        for (m, o) in got {
            let left = m.unwrap_or(0) + o.unwrap_or(0);
            out.push(Balance {
                spent: (seeded - left) * crate::money::AMOUNT_SCALE,
                remaining: left * crate::money::AMOUNT_SCALE,
            });
        }
    }
    Ok(out)
}

pub async fn cleanup_script(
    conn: &ConnectionManager,
    ids: &Ids,
    customers: usize,
) -> Result<(), String> {
    for chunk in (0..customers).collect::<Vec<_>>().chunks(1000) {
        let mut p = redis::pipe();
        for &i in chunk {
            let (m, o) = script_keys(ids, i);
            p.cmd("DEL").arg(&m).arg(&o).ignore();
        }
        let mut c = conn.clone();
        p.query_async::<()>(&mut c)
            .await
            .map_err(|e| format!("cleanup: {e}"))?;
    }
    Ok(())
}

/// Loads the minimal script; its SHA.
pub async fn load_minimal(conn: &ConnectionManager) -> Result<String, String> {
    let mut c = conn.clone();
    redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(MINIMAL_SCRIPT)
        .query_async(&mut c)
        .await
        .map_err(|e| format!("SCRIPT LOAD: {e}"))
}

/// The minimal script by EVALSHA, `pipeline` lanes per connection.
pub struct ScriptTarget {
    pub conns: Vec<ConnectionManager>,
    pub pipeline: usize,
    pub sha: String,
    pub ids: Ids,
    /// Whole credits per request.
    pub credits: i64,
}

impl Target for ScriptTarget {
    type Conn = ConnectionManager;

    async fn open(&self, lane: usize) -> Result<Self::Conn, String> {
        Ok(self.conns[(lane / self.pipeline.max(1)) % self.conns.len()].clone())
    }

    async fn call(&self, c: &mut Self::Conn, req: Req) -> Result<Reply, Fail> {
        let (m, o) = script_keys(&self.ids, req.customer);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.sha).arg(2).arg(&m).arg(&o).arg(self.credits);
        let (allowed, left): (i64, i64) = cmd.query_async(c).await.map_err(|e| {
            if e.is_timeout() {
                Fail::Timeout
            } else if e.is_io_error() || e.is_connection_dropped() {
                Fail::Transport(e.to_string())
            } else {
                Fail::Engine(e.code().unwrap_or("error").to_string())
            }
        })?;
        Ok(Reply {
            allowed: allowed == 1,
            charged: if allowed == 1 {
                self.credits * crate::money::AMOUNT_SCALE
            } else {
                0
            },
            remaining: Some(left * crate::money::AMOUNT_SCALE),
            charging: true,
        })
    }
}

/// The server's counters at one instant.
#[derive(Debug, Clone, Default)]
pub struct ServerSnap {
    /// used_cpu_sys + used_cpu_user, seconds.
    pub cpu: f64,
    /// Script commands (evalsha, eval, fcall, fcall_ro): calls and µs.
    pub script_calls: u64,
    pub script_usec: u64,
}

fn info_fields(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Reads INFO cpu and commandstats (nothing is reset on the server).
pub async fn server_snap(conn: &ConnectionManager) -> Option<ServerSnap> {
    let mut c = conn.clone();
    let cpu: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(&mut c)
        .await
        .ok()?;
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .ok()?;
    let f = info_fields(&cpu);
    let num = |k: &str| f.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let mut s = ServerSnap {
        cpu: num("used_cpu_sys") + num("used_cpu_user"),
        ..ServerSnap::default()
    };
    for (k, v) in info_fields(&stats) {
        if !matches!(
            k.as_str(),
            "cmdstat_evalsha" | "cmdstat_eval" | "cmdstat_fcall" | "cmdstat_fcall_ro"
        ) {
            continue;
        }
        for part in v.split(',') {
            match part.split_once('=') {
                Some(("calls", n)) => s.script_calls += n.parse::<u64>().unwrap_or(0),
                Some(("usec", n)) => s.script_usec += n.parse::<u64>().unwrap_or(0),
                _ => {}
            }
        }
    }
    Some(s)
}
