//! The Redis engine: every operation is one atomic function call (`FCALL`)
//! of the Redis Functions library `lua/creditgate.lua` on one customer's
//! keys. The library is the twin of [`crate::rules`]; this engine only
//! validates input that needs neither clock nor state, resolves the catalog
//! into arguments, and decodes replies into the same answers the in-process
//! engine gives.
//!
//! One module per idea: [`conn`] (targets and the shared connection),
//! [`guard`] (the bound on every call, the breaker, the deadline),
//! [`library`] (loading, `FCALL`, readiness), [`args`] (requests into
//! arguments at named positions), [`reply`] (replies and errors into
//! answers), [`sweep`] (the due index under leases), [`keys`] (the layout),
//! [`layout`] (the layout marker and `creditgate migrate`), [`lock_index`]
//! (the lock-id index); this file is the [`Engine`] impl.

pub mod args;
pub mod conn;
pub mod guard;
pub mod keys;
pub mod layout;
pub mod library;
pub mod limits;
pub mod lock_index;
pub mod primaries;
pub mod replicas;
pub mod reply;
pub mod sweep;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use redis::Value;

use crate::clock::{Clock, SystemClock};
use crate::engine::{Engine, SweepReport};
use crate::error::{invalid, Cause, EngineError};
use crate::ledger::store::LedgerStore;
use crate::ledger::{self, Aggregate, AggregateQuery, EventsListQuery, EventsPage, RangeSpec};
use crate::limits::{LimitDef, LimitsUpdate};
use crate::model::*;
use crate::money::Amount;
use crate::rules;

use args::{Argv, OpFunction};
use conn::unavailable;
use reply::{decode_balances, decode_outcome, error_instant, int, map_error, string, Ctx};

pub use conn::{Conn, RedisOptions, RedisTarget, Tls};
pub use keys::{customer_keys, CustomerKeys, LAYOUT};
pub use layout::{migrate, MigrateReport};
pub use library::{Functions, Library, LIBRARY, LIBRARY_NAME};
pub use lock_index::RedisLockIndex;
pub use sweep::{SWEEP_BATCH, SWEEP_LEASE_MS, SWEEP_SHARDS};

const NO_INSTANT: i64 = i64::MIN;

/// The customer record's field of the customer hash (lua/README.md § 5.1).
const RECORD_FIELD: &str = "\x1f";

/// Balances kept in Redis.
pub struct RedisEngine {
    conn: Conn,
    library: Library,
    catalog: Arc<Catalog>,
    /// `None`: the functions read Redis `TIME`, one clock for every sidecar.
    clock: Option<Arc<dyn Clock>>,
    /// The retention argument every customer function gets.
    retention: String,
    namespace: String,
    /// Identifies this process's sweeper in shard leases.
    sweeper_id: String,
    /// The instant the store used for the last call answered.
    last_instant: AtomicI64,
    /// Writes wait for replicas (`redis_wait_replicas`), when set.
    replica_wait: Option<replicas::ReplicaWait>,
    /// The ledger's database (`[ledger] url`), which the usage queries
    /// read; the library writes the entries to the streams and the drain
    /// moves them here.
    ledger: Option<LedgerStore>,
    /// The functions append ledger entries (a stream cap is configured).
    writes_ledger: bool,
}

impl RedisEngine {
    /// Connects, checks `maxmemory-policy`, refuses Redis < 7.0, loads the
    /// library where it is missing, and refuses data of another layout.
    pub async fn connect(
        opts: RedisOptions,
        catalog: Arc<Catalog>,
        clock: Option<Arc<dyn Clock>>,
    ) -> Result<RedisEngine, EngineError> {
        if opts.namespace.contains(['{', '}']) {
            return Err(invalid("redis.namespace", "must not hold { or }"));
        }
        let conn = conn::open(&opts.target, opts.timeout, &opts.tls).await?;
        conn::check_eviction(&conn, opts.accept_eviction).await?;
        let mut library = Library::new(conn.clone(), opts.timeout, opts.accept_eviction);
        if let RedisTarget::Cluster(seeds) = &opts.target {
            let p = primaries::Primaries::connect(seeds.clone(), opts.timeout, opts.tls.clone())
                .await
                .map_err(unavailable)?;
            library = library.deciding_through(p);
        }
        library.load().await?;
        layout::check(&library, &opts.namespace).await?;
        // The first deadline offset, then the check every few seconds.
        let _ = library.safety_check().await;
        library::spawn_safety_task(&library, opts.safety_interval);
        let replica_wait = match opts.wait_replicas {
            0 => None,
            n => Some(replicas::ReplicaWait::new(
                &opts.target,
                n,
                (opts.timeout.as_millis() as u64 / 2).max(1),
                opts.wait_pool,
            )?),
        };
        Ok(RedisEngine {
            conn,
            library,
            catalog,
            clock,
            retention: args::retention_with_ledger(opts.retention, opts.ledger_cap),
            namespace: opts.namespace,
            sweeper_id: format!("{:016x}", rand::random::<u64>()),
            last_instant: AtomicI64::new(NO_INSTANT),
            replica_wait,
            ledger: None,
            writes_ledger: opts.ledger_cap.is_some(),
        })
    }

    /// Answers the usage queries from `store` (the database the drain
    /// writes the streams into).
    pub fn with_ledger(mut self, store: LedgerStore) -> RedisEngine {
        self.ledger = Some(store);
        self
    }

    /// Every slot's ledger stream under this engine's namespace (what the
    /// drain reads).
    pub fn ledger_streams(&self) -> Vec<String> {
        keys::ledger_streams(&self.namespace)
    }

    /// Deletes must be on the record: only when the functions append
    /// entries.
    fn ledger_written(&self) -> Result<(), EngineError> {
        if self.writes_ledger {
            Ok(())
        } else {
            Err(EngineError::LedgerNotConfigured)
        }
    }

    fn ledger_store(&self) -> Result<&LedgerStore, EngineError> {
        self.ledger.as_ref().ok_or(EngineError::LedgerNotConfigured)
    }

    /// The library's function names.
    pub fn functions(&self) -> &Functions {
        &self.library.functions
    }

    /// Loads the library where missing (what readiness does after a server
    /// lost it).
    pub async fn load_library(&self) -> Result<(), EngineError> {
        self.library.load().await
    }

    /// The readiness probe: the store answers and holds the library.
    pub fn readiness(&self) -> Library {
        self.library.clone()
    }

    /// The lock-id → customer index, on the same connection and namespace.
    pub fn lock_index(&self) -> RedisLockIndex {
        RedisLockIndex::new(self.library.clone(), &self.namespace)
    }

    /// A clone of the shared connection.
    pub fn connection(&self) -> Conn {
        self.conn.clone()
    }

    pub fn keys(&self, customer_id: &str) -> CustomerKeys {
        customer_keys(&self.namespace, customer_id)
    }

    /// The instant the store decided the last answered call at (every reply
    /// and every function error carries it; a request refused before any
    /// call keeps the previous one). For a reference that replays a
    /// sequential workload at the store's instants, as the differential
    /// test does without an injected clock; answers to check and apply
    /// carry their own in [`Outcome::at`].
    pub fn last_instant(&self) -> Option<i64> {
        match self.last_instant.load(Ordering::Relaxed) {
            NO_INSTANT => None,
            t => Some(t),
        }
    }

    fn note(&self, at: i64) {
        self.last_instant.store(at, Ordering::Relaxed);
    }

    /// The instant to pass (`''`: the function reads Redis `TIME`) and, for
    /// checks made before the call, the best local guess of it.
    fn now(&self) -> (i64, String) {
        match &self.clock {
            Some(c) => {
                let now = c.now_ms();
                (now, now.to_string())
            }
            None => (SystemClock.now_ms(), String::new()),
        }
    }

    /// The store's clock, for a refusal decided before any function call
    /// whose order depends on the instant (see [`RedisEngine::refuse_at`]).
    async fn store_time(&self) -> Result<i64, EngineError> {
        let v = self
            .library
            .query(&library::Node::Routed, redis::cmd("TIME"))
            .await
            .map_err(unavailable)?;
        let (secs, micros): (i64, i64) =
            redis::from_redis_value(v).map_err(|e| EngineError::Internal(Cause::new(e)))?;
        let t = secs * 1000 + micros / 1000;
        self.note(t);
        Ok(t)
    }

    fn argv(&self, len: usize, now: String) -> Argv {
        Argv::customer(len, now, &self.retention)
    }

    /// Runs a function on a customer's keys (`KEYS[1]` the customer hash,
    /// `KEYS[2]` its slot's due index); notes an error's instant.
    async fn run(
        &self,
        function: &str,
        customer_id: &str,
        args: Argv,
        ctx: &Ctx<'_>,
    ) -> Result<Value, EngineError> {
        let k = self.keys(customer_id);
        let keys = [k.customer.as_str(), k.due.as_str()];
        let reply = match &self.replica_wait {
            Some(wait) if ctx.writes => {
                wait.fcall(&self.library, function, &keys, args.into_vec())
                    .await
            }
            _ => {
                self.library
                    .fcall_with_deadline(function, &keys, args.into_vec())
                    .await
            }
        };
        reply.map_err(|e| {
            if let Some(at) = error_instant(&e) {
                self.note(at);
            }
            map_error(e, ctx)
        })
    }

    /// A `{value, now}` reply: the value, the instant noted.
    fn pair(&self, v: Value) -> Result<Value, EngineError> {
        let mut items = reply::array(v)?.into_iter();
        let value = items.next().unwrap_or(Value::Nil);
        self.note(int(&items.next().unwrap_or(Value::Nil))?);
        Ok(value)
    }

    /// The error for input refused before the function: `CustomerNotFound`
    /// first, as the in-process engine checks the customer before the input.
    async fn refuse(&self, customer_id: &str, err: EngineError) -> EngineError {
        let mut exists = redis::cmd("EXISTS");
        exists.arg(self.keys(customer_id).customer);
        match self.library.query(&library::Node::Routed, exists).await {
            Ok(Value::Int(0)) => EngineError::CustomerNotFound,
            Ok(_) => err,
            Err(e) => unavailable(e),
        }
    }

    /// Input refused before the call without an injected clock: the checks
    /// that need the clock come before some that do not, so the error the
    /// rules give depends on the instant. `validate` reruns every check at
    /// the store's own instant, which the reference then replays.
    async fn refuse_at(
        &self,
        customer_id: &str,
        err: EngineError,
        validate: impl FnOnce(i64) -> Result<(), EngineError>,
    ) -> EngineError {
        let err = match self.clock {
            Some(_) => err,
            None => match self.store_time().await {
                Ok(t) => validate(t).err().unwrap_or(err),
                Err(e) => return e,
            },
        };
        self.refuse(customer_id, err).await
    }
}

#[async_trait]
impl Engine for RedisEngine {
    async fn create_customer(&self, customer_id: &str) -> Result<bool, EngineError> {
        validate_id("customer_id", customer_id)?;
        let (_, now) = self.now();
        let k = self.keys(customer_id);
        let v = self
            .library
            .fcall_with_deadline(&self.functions().create_customer, &[&k.customer], vec![now])
            .await
            .map_err(|e| map_error(e, &Ctx::writing()))?;
        Ok(int(&self.pair(v)?)? == 1)
    }

    async fn grant(&self, customer_id: &str, g: &Grant) -> Result<String, EngineError> {
        validate_id("customer_id", customer_id)?;
        let (now_ms, now) = self.now();
        let pre = match self.clock {
            Some(_) => validate_grant(g, &self.catalog, now_ms).map(|_| ()),
            None => validate_grant_shape(g, &self.catalog),
        };
        if let Err(e) = pre {
            let catalog = &self.catalog;
            return Err(self
                .refuse_at(customer_id, e, |t| {
                    validate_grant(g, catalog, t).map(|_| ())
                })
                .await);
        }
        let a = args::grant(self.argv(args::grant::ROLLOVER_LENGTH, now), g);
        let ctx = Ctx {
            feature: &g.pool,
            balance_id: g.balance_id.as_deref().unwrap_or(""),
            ..Ctx::writing()
        };
        let v = self
            .run(&self.functions().grant, customer_id, a, &ctx)
            .await?;
        string(&self.pair(v)?)
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
        let a = args::update_bucket(self.argv(args::update_bucket::AMOUNT, now), u);
        let ctx = Ctx {
            feature: &u.pool,
            ..Ctx::writing()
        };
        let v = self
            .run(&self.functions().update_bucket, customer_id, a, &ctx)
            .await?;
        self.pair(v)?;
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
        let mut a = self.argv(args::check::UNITS, now);
        a.set(args::check::FEATURE_ID, feature);
        a.set(args::check::UNITS, units.raw().to_string());
        a.pools(&self.catalog, feature);
        let ctx = Ctx {
            feature,
            ..Ctx::default()
        };
        let v = self
            .run(&self.functions().check, customer_id, a, &ctx)
            .await?;
        let out = decode_outcome(v, &self.catalog)?;
        self.note(out.at);
        Ok(out)
    }

    async fn apply(
        &self,
        customer_id: &str,
        op: &Op,
        key: Option<&str>,
    ) -> Result<Outcome, EngineError> {
        validate_id("customer_id", customer_id)?;
        let (now_ms, now) = self.now();
        let validate = |now: Option<i64>| {
            op.validate_shape().and_then(|_| match key {
                Some(k) => {
                    // `Op::validate` checks a reservation's expiry before the key.
                    if let Some(now) = now {
                        op.validate(now)?;
                    }
                    validate_id("idempotency_key", k)
                }
                None => Ok(()),
            })
        };
        let injected = self.clock.as_ref().map(|_| now_ms);
        if let Err(e) = validate(injected) {
            return Err(self.refuse_at(customer_id, e, |t| validate(Some(t))).await);
        }
        let (function, a) = args::apply(now, &self.retention, op, key, &self.catalog);
        let f = self.functions();
        let function = match function {
            OpFunction::Consume => &f.consume,
            OpFunction::Track => &f.track,
            OpFunction::Reserve => &f.reserve,
            OpFunction::Finalize => &f.finalize,
        };
        let lock_id = match op {
            Op::Reserve { lock_id, .. } | Op::Finalize { lock_id, .. } => lock_id.as_str(),
            _ => "",
        };
        let ctx = Ctx {
            feature: op.feature_id().unwrap_or(""),
            lock_id,
            ..Ctx::writing()
        };
        let v = self.run(function, customer_id, a, &ctx).await?;
        let out = decode_outcome(v, &self.catalog)?;
        self.note(out.at);
        Ok(out)
    }

    async fn balances(&self, customer_id: &str) -> Result<CustomerBalances, EngineError> {
        validate_id("customer_id", customer_id)?;
        let (_, now) = self.now();
        let a = self.argv(args::header::RETENTION, now);
        let v = self
            .run(&self.functions().balances, customer_id, a, &Ctx::default())
            .await?;
        let (created_at, at, buckets, limits) = decode_balances(v)?;
        self.note(at);
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
            limits: limits.into_iter().map(|l| l.def).collect(),
        })
    }

    fn supports_limits(&self) -> bool {
        true
    }

    /// Reads the customer's limits, computes the new list as the in-process
    /// engine does ([`crate::limits::update_limits`]: counters kept for a
    /// limit redefined with the same counting rule), and writes it if the
    /// stored list has not changed since (a request in between moved a
    /// counter: read again).
    async fn set_limits(
        &self,
        customer_id: &str,
        update: &LimitsUpdate,
    ) -> Result<Vec<LimitDef>, EngineError> {
        validate_id("customer_id", customer_id)?;
        let key = self.keys(customer_id).customer;
        for _ in 0..64 {
            let mut read = redis::cmd("HMGET");
            read.arg(&key).arg(RECORD_FIELD).arg(limits::FIELD);
            let v = self
                .library
                .query(&library::Node::Routed, read)
                .await
                .map_err(unavailable)?;
            let fields = reply::array(v)?;
            if matches!(fields.first(), None | Some(Value::Nil)) {
                return Err(EngineError::CustomerNotFound);
            }
            let current = match fields.get(1) {
                Some(Value::Nil) | None => String::new(),
                Some(v) => string(v)?,
            };
            let next = crate::limits::update_limits(&limits::decode(&current)?, update)?;
            let (_, now) = self.now();
            let mut a = self.argv(args::set_limits::LIMITS, now);
            a.set(args::set_limits::EXPECTED, current);
            a.set(args::set_limits::LIMITS, limits::encode(&next));
            let v = self
                .run(
                    &self.functions().set_limits,
                    customer_id,
                    a,
                    &Ctx::writing(),
                )
                .await?;
            if int(&self.pair(v)?)? == 1 {
                return Ok(next.into_iter().map(|l| l.def).collect());
            }
        }
        Err(EngineError::StoreUnavailable(Cause::msg(
            "the customer's limits kept changing while being replaced",
        )))
    }

    async fn reset_due(&self, customer_id: &str) -> Result<u32, EngineError> {
        validate_id("customer_id", customer_id)?;
        let (_, now) = self.now();
        let a = self.argv(args::header::RETENTION, now);
        let v = self
            .run(&self.functions().reset_due, customer_id, a, &Ctx::writing())
            .await?;
        Ok(int(&self.pair(v)?)? as u32)
    }

    /// Reads the due index slot by slot (16 leased shards of 1024 slots) and
    /// applies `reset_due` to every customer due now; see [`sweep`].
    async fn sweep_due(&self) -> Result<SweepReport, EngineError> {
        self.sweep().await
    }

    fn has_ledger(&self) -> bool {
        self.ledger.is_some()
    }

    /// One call (`delete_customer`): the customer's hash, locks and due
    /// entry go, with a `delete_customer` entry on its slot's stream. Only
    /// with the ledger on: a delete must be on the record.
    async fn delete_customer(&self, customer_id: &str) -> Result<(), EngineError> {
        self.ledger_written()?;
        validate_id("customer_id", customer_id)?;
        let (_, now) = self.now();
        let a = self.argv(args::header::RETENTION, now);
        let v = self
            .run(
                &self.functions().delete_customer,
                customer_id,
                a,
                &Ctx::writing(),
            )
            .await?;
        self.pair(v)?;
        Ok(())
    }

    /// One call (`delete_balance`), with a `delete_balance` entry; the
    /// inputs the function trusts are checked here first, as the
    /// in-process engine checks them.
    async fn delete_balance(
        &self,
        customer_id: &str,
        d: &crate::engine::BalanceDelete,
    ) -> Result<String, EngineError> {
        self.ledger_written()?;
        validate_id("customer_id", customer_id)?;
        d.validate(&self.catalog)?;
        let (_, now) = self.now();
        let mut a = self.argv(args::delete_balance::FORCE, now);
        use args::delete_balance as at;
        a.set(at::POOL, d.feature_id.clone().unwrap_or_default());
        a.set(at::BALANCE_ID, d.balance_id.clone().unwrap_or_default());
        a.set(
            at::INTERVAL,
            d.interval.map_or(String::new(), |i| (i as u8).to_string()),
        );
        a.set(at::FORCE, if d.force { "1" } else { "" }.to_string());
        let v = self
            .run(
                &self.functions().delete_balance,
                customer_id,
                a,
                &Ctx::writing(),
            )
            .await?;
        string(&self.pair(v)?)
    }

    /// From the database: what the drain has committed (entries still in a
    /// stream are not yet visible; `/readyz` shows that backlog).
    async fn events_list(&self, q: &EventsListQuery) -> Result<EventsPage, EngineError> {
        let store = self.ledger_store()?;
        if let Some(c) = &q.customer_id {
            validate_id("customer_id", c)?;
        }
        q.checked_cursor()?;
        store.events(q).await.map_err(ledger_unavailable)
    }

    /// From the database: per-grain sums by SQL when nothing is grouped,
    /// else the usage entries' columns, folded into bins as the in-process
    /// engine folds its entries. `last_cycle` reads the customer's
    /// buckets for its billing cycle.
    async fn events_aggregate(&self, q: &AggregateQuery) -> Result<Aggregate, EngineError> {
        let store = self.ledger_store()?;
        if let Some(c) = &q.customer_id {
            validate_id("customer_id", c)?;
        }
        let (now, cycle) = match (&q.customer_id, q.range) {
            (Some(c), RangeSpec::LastCycle) => {
                let (_, now) = self.now();
                let a = self.argv(args::header::RETENTION, now);
                let v = self
                    .run(&self.functions().balances, c, a, &Ctx::default())
                    .await?;
                let (_, at, buckets, _) = decode_balances(v)?;
                let first = q.feature_ids.first().map(String::as_str);
                (at, rules::billing_cycle(&self.catalog, &buckets, first))
            }
            _ => {
                let now = match &self.clock {
                    Some(clock) => clock.now_ms(),
                    None => self.store_time().await?,
                };
                (now, None)
            }
        };
        let (start, end) = q.range.resolve(now, cycle);
        let customer = q.customer_id.as_deref();
        if q.group_by.is_none() {
            let sums = store
                .usage_sums(customer, &q.feature_ids, start, end, q.bin_size.grain_ms())
                .await
                .map_err(ledger_unavailable)?;
            ledger::aggregate_sums(&sums, q, (start, end))
        } else {
            let with_balances = q.group_by == Some(ledger::GroupBy::Plan);
            let entries = store
                .usage(customer, &q.feature_ids, start, end, with_balances)
                .await
                .map_err(ledger_unavailable)?;
            ledger::aggregate(&entries, q, (start, end))
        }
    }
}

/// The ledger's database failed: the store is unavailable (503), the
/// cause kept.
fn ledger_unavailable(e: crate::ledger::store::StoreError) -> EngineError {
    EngineError::StoreUnavailable(Cause::new(e))
}
