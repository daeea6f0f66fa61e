//! The Redis engine: every operation is one atomic Lua script (EVALSHA) on
//! one customer's keys. The scripts (`lua/`) are the twin of
//! [`crate::rules`]; this module only validates input that needs neither
//! clock nor state, resolves the catalog into arguments, and decodes replies
//! into the same answers the in-process engine gives.
//!
//! Connections: one multiplexed connection ([`ConnectionManager`] for a
//! standalone server, [`ClusterConnection`] for a cluster) shared by every
//! request: no pool, no per-request PING. Nothing here needs exclusive or
//! blocking use of a connection, so there is no deadpool.

pub mod keys;
pub mod lock_index;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Value};

use crate::calendar::Interval;
use crate::engine::{Clock, Engine, SweepReport, SystemClock};
use crate::error::{invalid, EngineError};
use crate::model::*;
use crate::money::Amount;
use crate::rules::{self, Op};

pub use keys::{customer_keys, CustomerKeys, LAYOUT};
pub use lock_index::RedisLockIndex;

/// The shared library, prepended to every operation script.
pub const LIB_LUA: &str = include_str!("../../lua/lib.lua");

/// One operation script: the library plus the operation, and its SHA1.
#[derive(Debug, Clone)]
pub struct Script {
    pub name: &'static str,
    pub body: String,
    pub sha: String,
}

impl Script {
    /// The body is exactly `"$(cat lua/lib.lua lua/<op>.lua)"` (trailing
    /// newlines dropped, as the shell does), so a script loaded with
    /// `redis-cli SCRIPT LOAD` has the same SHA as the engine's.
    fn new(name: &'static str, op: &str) -> Script {
        let body = format!("{LIB_LUA}{op}").trim_end_matches('\n').to_string();
        let sha = sha1_smol::Sha1::from(&body).digest().to_string();
        Script { name, body, sha }
    }
}

/// Every operation script.
#[derive(Debug, Clone)]
pub struct Scripts {
    pub create_customer: Script,
    pub grant: Script,
    pub update_bucket: Script,
    pub check: Script,
    pub apply: Script,
    pub balances: Script,
    pub reset_due: Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        Scripts {
            create_customer: Script::new(
                "create_customer",
                include_str!("../../lua/create_customer.lua"),
            ),
            grant: Script::new("grant", include_str!("../../lua/grant.lua")),
            update_bucket: Script::new(
                "update_bucket",
                include_str!("../../lua/update_bucket.lua"),
            ),
            check: Script::new("check", include_str!("../../lua/check.lua")),
            apply: Script::new("apply", include_str!("../../lua/apply.lua")),
            balances: Script::new("balances", include_str!("../../lua/balances.lua")),
            reset_due: Script::new("reset_due", include_str!("../../lua/reset_due.lua")),
        }
    }

    pub fn all(&self) -> [&Script; 7] {
        [
            &self.create_customer,
            &self.grant,
            &self.update_bucket,
            &self.check,
            &self.apply,
            &self.balances,
            &self.reset_due,
        ]
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts::new()
    }
}

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
    /// Bound on connecting and on each reply; past it a call answers
    /// `StoreUnavailable` rather than hanging.
    pub timeout: Duration,
}

impl RedisOptions {
    pub fn standalone(url: &str) -> RedisOptions {
        RedisOptions {
            target: RedisTarget::Standalone(url.to_string()),
            namespace: String::new(),
            accept_eviction: false,
            retention: Retention::default(),
            timeout: Duration::from_secs(2),
        }
    }
}

/// Balances kept in Redis.
pub struct RedisEngine {
    conn: Conn,
    catalog: Arc<Catalog>,
    /// `None`: the scripts read Redis `TIME`, one clock for every sidecar.
    clock: Option<Arc<dyn Clock>>,
    retention: Retention,
    namespace: String,
    scripts: Scripts,
    /// Identifies this process's sweeper in shard leases.
    sweeper_id: String,
}

/// The due index is swept in this many shards of consecutive slots, each
/// under its own lease, so several sidecars share the work.
pub const SWEEP_SHARDS: usize = 16;
/// Reset scripts a sweep keeps in flight at once.
const SWEEP_CONCURRENCY: usize = 32;
/// How long a sweeper keeps a shard's lease (ms).
pub const SWEEP_LEASE_MS: u64 = 30_000;
/// Due customers read per slot and round.
const SWEEP_BATCH: usize = 100;
/// Slots read per pipelined round trip.
const SWEEP_PIPELINE: usize = 256;

/// Maps a connection-level failure.
fn unavailable(e: RedisError) -> EngineError {
    EngineError::StoreUnavailable(e.to_string())
}

impl RedisEngine {
    /// Connects, checks `maxmemory-policy`, and loads the scripts.
    pub async fn connect(
        opts: RedisOptions,
        catalog: Arc<Catalog>,
        clock: Option<Arc<dyn Clock>>,
    ) -> Result<RedisEngine, EngineError> {
        if opts.namespace.contains(['{', '}']) {
            return Err(invalid("redis.namespace", "must not hold { or }"));
        }
        let conn = match &opts.target {
            RedisTarget::Standalone(url) => {
                let client = redis::Client::open(url.as_str()).map_err(unavailable)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(opts.timeout)
                    .set_response_timeout(opts.timeout)
                    .set_number_of_retries(2)
                    .set_factor(2)
                    .set_max_delay(500);
                Conn::Single(Box::new(
                    ConnectionManager::new_with_config(client, config)
                        .await
                        .map_err(unavailable)?,
                ))
            }
            RedisTarget::Cluster(urls) => {
                let client =
                    redis::cluster::ClusterClient::new(urls.clone()).map_err(unavailable)?;
                Conn::Cluster(client.get_async_connection().await.map_err(unavailable)?)
            }
        };
        let engine = RedisEngine {
            conn,
            catalog,
            clock,
            retention: opts.retention,
            namespace: opts.namespace,
            scripts: Scripts::new(),
            sweeper_id: format!("{:016x}", rand::random::<u64>()),
        };
        engine.check_eviction(opts.accept_eviction).await?;
        engine.load_scripts().await?;
        Ok(engine)
    }

    async fn check_eviction(&self, accept: bool) -> Result<(), EngineError> {
        let mut conn = self.conn.clone();
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
            Err(EngineError::StoreUnavailable(format!(
                "maxmemory-policy is {policy}, not noeviction: Redis could silently delete \
                 balances (set accept_eviction to run anyway)"
            )))
        }
    }

    /// Loads every script (standalone); a cluster loads them on first use.
    pub async fn load_scripts(&self) -> Result<(), EngineError> {
        if let Conn::Single(_) = &self.conn {
            let mut c = self.conn.clone();
            for s in self.scripts.all() {
                let sha: String = redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(&s.body)
                    .query_async(&mut c)
                    .await
                    .map_err(unavailable)?;
                if sha != s.sha {
                    return Err(EngineError::Internal(format!("{} sha mismatch", s.name)));
                }
            }
        }
        Ok(())
    }

    pub fn scripts(&self) -> &Scripts {
        &self.scripts
    }

    /// The lock-id → customer index, on the same connection and namespace.
    pub fn lock_index(&self) -> RedisLockIndex {
        RedisLockIndex::new(self.conn.clone(), &self.namespace)
    }

    /// A clone of the shared connection.
    pub fn connection(&self) -> Conn {
        self.conn.clone()
    }

    pub fn keys(&self, customer_id: &str) -> CustomerKeys {
        customer_keys(&self.namespace, customer_id)
    }

    fn now(&self) -> (i64, String) {
        match &self.clock {
            Some(c) => {
                let now = c.now_ms();
                (now, now.to_string())
            }
            None => (SystemClock.now_ms(), String::new()),
        }
    }

    /// EVALSHA, and EVAL (which also caches the script) after NOSCRIPT.
    async fn eval(&self, script: &Script, keys: &[&str], args: &[String]) -> RedisResultV {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&script.sha).arg(keys.len()).arg(keys).arg(args);
        match cmd.query_async::<Value>(&mut conn).await {
            Err(e) if e.kind() == ErrorKind::NoScriptError => {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(&script.body).arg(keys.len()).arg(keys).arg(args);
                cmd.query_async::<Value>(&mut conn).await
            }
            r => r,
        }
    }

    /// Runs a script on a customer: the standard header (now, retentions,
    /// customer id) then `args`.
    async fn run(
        &self,
        script: &Script,
        customer_id: &str,
        now: String,
        args: Vec<String>,
        ctx: &Ctx<'_>,
    ) -> Result<Value, EngineError> {
        let k = self.keys(customer_id);
        let mut all = vec![
            now,
            self.retention.idempotency_ms.to_string(),
            self.retention.finalized_lock_ms.to_string(),
            customer_id.to_string(),
        ];
        all.extend(args);
        self.eval(script, &[&k.customer, &k.locks, &k.due], &all)
            .await
            .map_err(|e| map_error(e, ctx))
    }

    /// The error for input refused before the script: `CustomerNotFound`
    /// first, as the in-process engine checks the customer before the input.
    async fn refuse(&self, customer_id: &str, err: EngineError) -> EngineError {
        let mut conn = self.conn.clone();
        let exists: Result<i64, RedisError> = redis::cmd("EXISTS")
            .arg(self.keys(customer_id).customer)
            .query_async(&mut conn)
            .await;
        match exists {
            Ok(0) => EngineError::CustomerNotFound,
            Ok(_) => err,
            Err(e) => unavailable(e),
        }
    }

    /// `reset_due` for the sweeper: an index entry whose customer is gone is
    /// dropped rather than failing the sweep.
    async fn sweep_one(&self, customer: &str) -> Result<u32, EngineError> {
        match self.reset_due(customer).await {
            Err(EngineError::CustomerNotFound) | Err(EngineError::InvalidInput { .. }) => {
                let k = self.keys(customer);
                let mut conn = self.conn.clone();
                redis::cmd("ZREM")
                    .arg(&k.due)
                    .arg(customer)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(unavailable)?;
                Ok(0)
            }
            other => other,
        }
    }

    fn lease_key(&self, shard: usize) -> String {
        format!("{}{LAYOUT}sweep:{shard}", self.namespace)
    }

    /// Takes (or, if this sweeper already holds it, renews) a shard's lease:
    /// one atomic script on the lease key alone, so it is cluster-safe. A
    /// sweeper that dies mid-shard simply stops renewing: its lease lapses
    /// after [`SWEEP_LEASE_MS`] and the next sweep, anyone's, takes the shard.
    async fn lease(&self, shard: usize) -> Result<bool, EngineError> {
        const TAKE_OR_RENEW: &str = "local v = redis.call('GET', KEYS[1]) \
            if v == false or v == ARGV[1] then \
              redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end return 0";
        let mut conn = self.conn.clone();
        let took: i64 = redis::Script::new(TAKE_OR_RENEW)
            .key(self.lease_key(shard))
            .arg(&self.sweeper_id)
            .arg(SWEEP_LEASE_MS)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(took == 1)
    }

    /// Gives a shard's lease back if this sweeper still holds it, so the next
    /// sweep need not wait for it to lapse.
    async fn release_lease(&self, shard: usize) -> Result<(), EngineError> {
        const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
            return redis.call('DEL', KEYS[1]) end return 0";
        let mut conn = self.conn.clone();
        redis::Script::new(RELEASE)
            .key(self.lease_key(shard))
            .arg(&self.sweeper_id)
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The customers due at or before `now` in the due-index keys `keys`:
    /// one pipelined round trip on a standalone server; on a cluster (where a
    /// pipeline may not cross slots) one concurrent query per key.
    async fn due_members(&self, keys: &[String], now: i64) -> Result<Vec<String>, EngineError> {
        let query = |k: &str| {
            let mut c = redis::cmd("ZRANGEBYSCORE");
            c.arg(k)
                .arg("-inf")
                .arg(now)
                .arg("LIMIT")
                .arg(0)
                .arg(SWEEP_BATCH);
            c
        };
        let mut conn = self.conn.clone();
        if let Conn::Cluster(_) = &self.conn {
            let mut tasks = tokio::task::JoinSet::new();
            for k in keys {
                let cmd = query(k);
                let mut conn = conn.clone();
                tasks.spawn(async move { cmd.query_async::<Vec<String>>(&mut conn).await });
            }
            let mut out = vec![];
            while let Some(r) = tasks.join_next().await {
                let r = r.map_err(|e| EngineError::Internal(e.to_string()))?;
                out.extend(r.map_err(unavailable)?);
            }
            return Ok(out);
        }
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.add_command(query(k));
        }
        let found: Vec<Vec<String>> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        Ok(found.into_iter().flatten().collect())
    }

    fn pool_args(&self, feature: &str) -> Vec<String> {
        match self.catalog.pools_for(feature) {
            Ok(pools) => {
                let mut out = vec![pools.len().to_string()];
                for p in pools {
                    out.push(p.pool);
                    out.push(p.cost.raw().to_string());
                }
                out
            }
            Err(_) => vec!["-1".into()],
        }
    }

    fn decode_outcome(&self, v: Value) -> Result<Outcome, EngineError> {
        let items = array(v)?;
        if items.len() != 6 {
            return Err(bad_reply("outcome"));
        }
        let mut it = items.into_iter();
        let allowed = int(&it.next().unwrap_or(Value::Nil))? == 1;
        let uncovered = amount(int(&it.next().unwrap_or(Value::Nil))?)?;
        let flags = string(&it.next().unwrap_or(Value::Nil))?;
        let mut entries = vec![];
        for e in array(it.next().unwrap_or(Value::Nil))? {
            let f = array(e)?;
            if f.len() != 6 {
                return Err(bad_reply("entry"));
            }
            let source = match string(&f[2])?.as_str() {
                "bucket" => SourceKind::Bucket,
                _ => SourceKind::Rollover {
                    expires_at: opt_int(&f[3])?,
                },
            };
            entries.push(Entry {
                balance_id: string(&f[0])?,
                pool: string(&f[1])?,
                source,
                amount: amount(int(&f[4])?)?,
                units: amount(int(&f[5])?)?,
            });
        }
        let feature = string(&it.next().unwrap_or(Value::Nil))?;
        let buckets = decode_buckets(it.next().unwrap_or(Value::Nil))?;
        let pools = if feature.is_empty() {
            vec![]
        } else {
            self.catalog
                .pools_for(&feature)
                .map(|ps| {
                    ps.iter()
                        .map(|p| rules::pool_balance(&buckets, &p.pool))
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(Outcome {
            allowed,
            entries,
            uncovered,
            no_balance: flags.contains('n'),
            insufficient: flags.contains('i'),
            replayed: flags.contains('r'),
            pools,
        })
    }
}

type RedisResultV = Result<Value, RedisError>;

/// What a request named, to fill typed errors' details.
#[derive(Default)]
struct Ctx<'a> {
    feature: &'a str,
    balance_id: &'a str,
    lock_id: &'a str,
}

const INVALID_FIELDS: [&str; 4] = ["expires_at", "next_reset_at", "op", "argument"];

fn map_error(e: RedisError, ctx: &Ctx<'_>) -> EngineError {
    if e.code() == Some("CG") {
        let detail = e.detail().unwrap_or("");
        let (code, rest) = detail.split_once(' ').unwrap_or((detail, ""));
        return match code {
            "customer_not_found" => EngineError::CustomerNotFound,
            "feature_not_found" => EngineError::FeatureNotFound(ctx.feature.to_string()),
            "balance_not_found" => EngineError::BalanceNotFound,
            "balance_already_exists" => {
                EngineError::BalanceAlreadyExists(ctx.balance_id.to_string())
            }
            "too_many_balances" => EngineError::TooManyBuckets(MAX_BUCKETS_PER_CUSTOMER),
            "insufficient_balance" => EngineError::InsufficientBalance,
            "lock_already_exists" => EngineError::LockAlreadyExists(ctx.lock_id.to_string()),
            "lock_not_found" => EngineError::LockNotFound(ctx.lock_id.to_string()),
            "idempotency_key_reused" => EngineError::IdempotencyKeyReused,
            "amount_out_of_range" => EngineError::AmountOutOfRange,
            "invalid_inputs" => {
                let (field, reason) = rest.split_once(' ').unwrap_or((rest, ""));
                let field = INVALID_FIELDS
                    .into_iter()
                    .find(|f| *f == field)
                    .unwrap_or("argument");
                invalid(field, reason.to_string())
            }
            _ => EngineError::Internal(format!("script error: {detail}")),
        };
    }
    match e.kind() {
        ErrorKind::ResponseError | ErrorKind::TypeError => EngineError::Internal(e.to_string()),
        _ => unavailable(e),
    }
}

fn bad_reply(what: &str) -> EngineError {
    EngineError::Internal(format!("unexpected script reply ({what})"))
}

fn array(v: Value) -> Result<Vec<Value>, EngineError> {
    match v {
        Value::Array(a) => Ok(a),
        _ => Err(bad_reply("array")),
    }
}

fn string(v: &Value) -> Result<String, EngineError> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).map_err(|_| bad_reply("utf-8")),
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Int(i) => Ok(i.to_string()),
        _ => Err(bad_reply("string")),
    }
}

fn int(v: &Value) -> Result<i64, EngineError> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad_reply("integer")),
        _ => Err(bad_reply("integer")),
    }
}

fn opt_int(v: &Value) -> Result<Option<i64>, EngineError> {
    match v {
        Value::BulkString(b) if b.is_empty() => Ok(None),
        Value::Nil => Ok(None),
        _ => int(v).map(Some),
    }
}

fn amount(raw: i64) -> Result<Amount, EngineError> {
    Amount::from_raw(raw).ok_or_else(|| bad_reply("amount out of range"))
}

/// Decodes bucket views (see `bucket_view` in lua/lib.lua) into buckets that
/// [`rules::pool_balance`] can show. Fields a view does not carry (anchor,
/// rollover setting, floor, carried debt) do not affect what it shows.
fn decode_buckets(v: Value) -> Result<Vec<Bucket>, EngineError> {
    let mut out = vec![];
    for b in array(v)? {
        let f = array(b)?;
        if f.len() != 13 {
            return Err(bad_reply("bucket"));
        }
        let rows_raw = array(f[12].clone())?;
        let mut rollovers = vec![];
        for r in rows_raw.chunks(3) {
            if r.len() != 3 {
                return Err(bad_reply("rollover"));
            }
            rollovers.push(RolloverRow {
                expires_at: opt_int(&r[0])?,
                granted: amount(int(&r[1])?)?,
                balance: amount(int(&r[2])?)?,
            });
        }
        let plan = string(&f[3])?;
        out.push(Bucket {
            id: string(&f[0])?,
            seq: int(&f[1])? as u64,
            pool: string(&f[2])?,
            plan_id: (!plan.is_empty()).then_some(plan),
            granted: amount(int(&f[4])?)?,
            remaining: amount(int(&f[5])?)?,
            interval: string(&f[6])?
                .parse::<Interval>()
                .map_err(|_| bad_reply("interval"))?,
            interval_count: int(&f[7])? as u32,
            anchor: 0,
            next_reset_at: opt_int(&f[8])?,
            expires_at: opt_int(&f[9])?,
            rollover: None,
            unlimited: int(&f[10])? == 1,
            overage_allowed: int(&f[11])? == 1,
            overage_floor: None,
            carry_debt: false,
            rollovers,
        });
    }
    Ok(out)
}

fn opt_str(s: &Option<String>) -> String {
    s.clone().unwrap_or_default()
}

fn opt_num(n: Option<i64>) -> String {
    n.map_or(String::new(), |n| n.to_string())
}

fn interval_code(i: Interval) -> usize {
    Interval::ALL.iter().position(|x| *x == i).unwrap_or(0)
}

#[async_trait]
impl Engine for RedisEngine {
    async fn create_customer(&self, customer_id: &str) -> Result<bool, EngineError> {
        validate_id("customer_id", customer_id)?;
        let (_, now) = self.now();
        let k = self.keys(customer_id);
        let v = self
            .eval(&self.scripts.create_customer, &[&k.customer], &[now])
            .await
            .map_err(|e| map_error(e, &Ctx::default()))?;
        Ok(int(&v)? == 1)
    }

    async fn grant(&self, customer_id: &str, g: &Grant) -> Result<String, EngineError> {
        validate_id("customer_id", customer_id)?;
        let (now_ms, now) = self.now();
        if let Err(e) = validate_grant(g, &self.catalog, now_ms) {
            return Err(self.refuse(customer_id, e).await);
        }
        let flags = format!(
            "{}{}{}",
            if g.unlimited { "u" } else { "" },
            if g.overage_allowed { "o" } else { "" },
            if g.carry_debt { "d" } else { "" }
        );
        let (ro, ro_max, ro_pct, ro_len) = match &g.rollover {
            None => (String::new(), String::new(), String::new(), String::new()),
            Some(r) => (
                match r.duration {
                    RolloverDuration::Month => "month".to_string(),
                    RolloverDuration::Forever => "forever".to_string(),
                },
                opt_num(r.max.map(|a| a.raw())),
                opt_num(r.max_percentage.map(|a| a.raw())),
                opt_num(r.length.map(i64::from)),
            ),
        };
        let args = vec![
            g.pool.clone(),
            opt_str(&g.balance_id),
            opt_str(&g.plan_id),
            g.granted.raw().to_string(),
            interval_code(g.interval.unwrap_or(Interval::OneOff)).to_string(),
            g.interval_count.unwrap_or(1).to_string(),
            opt_num(g.next_reset_at),
            opt_num(g.expires_at),
            flags,
            opt_num(g.overage_floor.map(|a| a.raw())),
            ro,
            ro_max,
            ro_pct,
            ro_len,
        ];
        let ctx = Ctx {
            feature: &g.pool,
            balance_id: g.balance_id.as_deref().unwrap_or(""),
            ..Ctx::default()
        };
        let v = self
            .run(&self.scripts.grant, customer_id, now, args, &ctx)
            .await?;
        string(&v)
    }

    async fn update_bucket(&self, customer_id: &str, u: &BucketUpdate) -> Result<(), EngineError> {
        validate_id("customer_id", customer_id)?;
        let (_, now) = self.now();
        let pre = validate_id("feature_id", &u.pool).and_then(|_| {
            self.catalog
                .feature(&u.pool)
                .map(|_| ())
                .ok_or_else(|| EngineError::FeatureNotFound(u.pool.clone()))
        });
        if let Err(e) = pre {
            return Err(self.refuse(customer_id, e).await);
        }
        let (mode, v) = match u.change {
            BalanceChange::SetRemaining(v) => ("set", v),
            BalanceChange::AddToBalance(v) => ("add", v),
        };
        let args = vec![
            u.pool.clone(),
            opt_str(&u.balance_id),
            mode.to_string(),
            v.raw().to_string(),
        ];
        let ctx = Ctx {
            feature: &u.pool,
            ..Ctx::default()
        };
        self.run(&self.scripts.update_bucket, customer_id, now, args, &ctx)
            .await?;
        Ok(())
    }

    async fn check(
        &self,
        customer_id: &str,
        feature: &str,
        units: Amount,
    ) -> Result<Outcome, EngineError> {
        validate_id("customer_id", customer_id)?;
        let (_, now) = self.now();
        let pre = validate_id("feature_id", feature).and_then(|_| {
            if units.is_negative() {
                Err(invalid("required_balance", "must not be negative"))
            } else {
                Ok(())
            }
        });
        if let Err(e) = pre {
            return Err(self.refuse(customer_id, e).await);
        }
        let mut args = vec![feature.to_string(), units.raw().to_string()];
        args.extend(self.pool_args(feature));
        let ctx = Ctx {
            feature,
            ..Ctx::default()
        };
        let v = self
            .run(&self.scripts.check, customer_id, now, args, &ctx)
            .await?;
        self.decode_outcome(v)
    }

    async fn apply(
        &self,
        customer_id: &str,
        op: &Op,
        key: Option<&str>,
    ) -> Result<Outcome, EngineError> {
        validate_id("customer_id", customer_id)?;
        let (now_ms, now) = self.now();
        let pre = op.validate_shape().and_then(|_| match key {
            Some(k) => {
                // `Op::validate` checks a reservation's expiry before the key.
                if let (
                    Op::Reserve {
                        expires_at: Some(e),
                        ..
                    },
                    true,
                ) = (op, !now.is_empty())
                {
                    if *e <= now_ms {
                        return Err(invalid("expires_at", "must be in the future"));
                    }
                }
                validate_id("idempotency_key", k)
            }
            None => Ok(()),
        });
        if let Err(e) = pre {
            return Err(self.refuse(customer_id, e).await);
        }
        let key_arg = key.unwrap_or("").to_string();
        let (name, feature, units, mode, lock_id, expires) = match op {
            Op::Consume { feature, units } => {
                ("consume", feature.as_str(), Some(*units), "", "", None)
            }
            Op::Track {
                feature,
                units,
                behavior,
            } => (
                "track",
                feature.as_str(),
                Some(*units),
                behavior.as_str(),
                "",
                None,
            ),
            Op::Reserve {
                lock_id,
                feature,
                units,
                expires_at,
            } => (
                "reserve",
                feature.as_str(),
                Some(*units),
                "",
                lock_id.as_str(),
                *expires_at,
            ),
            Op::Finalize {
                lock_id,
                action,
                override_units,
            } => (
                "finalize",
                "",
                *override_units,
                match action {
                    FinalizeAction::Confirm => "confirm",
                    FinalizeAction::Release => "release",
                },
                lock_id.as_str(),
                None,
            ),
        };
        let mut args = vec![
            name.to_string(),
            key_arg,
            feature.to_string(),
            opt_num(units.map(|u| u.raw())),
            mode.to_string(),
            lock_id.to_string(),
            opt_num(expires),
        ];
        if name == "finalize" {
            args.push("0".into());
        } else {
            args.extend(self.pool_args(feature));
        }
        let ctx = Ctx {
            feature,
            lock_id,
            ..Ctx::default()
        };
        let v = self
            .run(&self.scripts.apply, customer_id, now, args, &ctx)
            .await?;
        self.decode_outcome(v)
    }

    async fn balances(&self, customer_id: &str) -> Result<CustomerBalances, EngineError> {
        validate_id("customer_id", customer_id)?;
        let (_, now) = self.now();
        let v = self
            .run(
                &self.scripts.balances,
                customer_id,
                now,
                vec![],
                &Ctx::default(),
            )
            .await?;
        let mut items = array(v)?.into_iter();
        let created_at = int(&items.next().unwrap_or(Value::Nil))?;
        let buckets = decode_buckets(items.next().unwrap_or(Value::Nil))?;
        let pools = self
            .catalog
            .features()
            .iter()
            .filter(|f| buckets.iter().any(|b| b.pool == f.id))
            .map(|f| rules::pool_balance(&buckets, &f.id))
            .collect();
        Ok(CustomerBalances {
            customer_id: customer_id.to_string(),
            created_at,
            pools,
        })
    }

    async fn reset_due(&self, customer_id: &str) -> Result<u32, EngineError> {
        validate_id("customer_id", customer_id)?;
        let (_, now) = self.now();
        let v = self
            .run(
                &self.scripts.reset_due,
                customer_id,
                now,
                vec![],
                &Ctx::default(),
            )
            .await?;
        Ok(int(&v)? as u32)
    }

    /// Reads the due index slot by slot (16 leased shards of 1024 slots) and
    /// applies `reset_due` to every customer due now. A customer's entry moves
    /// to its next due instant in the same script, so it is swept once.
    async fn sweep_due(&self) -> Result<SweepReport, EngineError> {
        let mut report = SweepReport::default();
        let tags = keys::slot_tags();
        let per_shard = keys::SLOTS / SWEEP_SHARDS;
        for shard in 0..SWEEP_SHARDS {
            if !self.lease(shard).await? {
                report.shards_leased_elsewhere += 1;
                continue;
            }
            let slots: Vec<String> = tags[shard * per_shard..(shard + 1) * per_shard]
                .iter()
                .map(|t| format!("{}{LAYOUT}due:{{{t}}}", self.namespace))
                .collect();
            for chunk in slots.chunks(SWEEP_PIPELINE) {
                let mut swept = std::collections::HashSet::new();
                loop {
                    // Renewing per round keeps a long shard ours; losing the
                    // lease (we stalled past it) hands the shard over.
                    if !self.lease(shard).await? {
                        report.shards_leased_elsewhere += 1;
                        break;
                    }
                    let now = self.now().0;
                    let due = self.due_members(chunk, now).await?;
                    // Every entry swept moves past `now`; one that did not
                    // (it cannot, but never loop on it) waits for the next sweep.
                    let due: Vec<String> = due
                        .into_iter()
                        .filter(|c| swept.insert(c.clone()))
                        .collect();
                    if due.is_empty() {
                        break;
                    }
                    // Each reset is its own short script; several in flight
                    // share the multiplexed connection.
                    type Reset<'a> = std::pin::Pin<
                        Box<dyn std::future::Future<Output = Result<u32, EngineError>> + Send + 'a>,
                    >;
                    let resets: Vec<Reset<'_>> = due
                        .iter()
                        .map(|c| Box::pin(self.sweep_one(c)) as Reset<'_>)
                        .collect();
                    let results: Vec<Result<u32, EngineError>> = futures_util::stream::iter(resets)
                        .buffer_unordered(SWEEP_CONCURRENCY)
                        .collect()
                        .await;
                    for r in results {
                        report.customers_swept += 1;
                        report.resets_applied += r? as u64;
                    }
                }
            }
            self.release_lease(shard).await?;
        }
        Ok(report)
    }
}

/// Ready when the store answers and the scripts are loaded. A probe sends
/// one `SCRIPT EXISTS` (not the script bodies); only when the server lost
/// them (a restart, `SCRIPT FLUSH`) does it load them again. On a cluster,
/// scripts load on first use on each node, so answering is enough.
#[async_trait::async_trait]
impl crate::http::Readiness for RedisEngine {
    async fn ready(&self) -> bool {
        let mut conn = self.conn.clone();
        if let Conn::Cluster(_) = &self.conn {
            let pong: Result<String, RedisError> = redis::cmd("PING").query_async(&mut conn).await;
            return pong.is_ok();
        }
        let mut exists = redis::cmd("SCRIPT");
        exists.arg("EXISTS");
        for script in self.scripts.all() {
            exists.arg(&script.sha);
        }
        match exists.query_async::<Vec<i64>>(&mut conn).await {
            Ok(found) if found.iter().all(|&f| f == 1) => true,
            Ok(_) => self.load_scripts().await.is_ok(),
            Err(_) => false,
        }
    }
}
