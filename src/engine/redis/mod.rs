//! The Redis engine: every operation is one atomic Lua script (EVALSHA) on
//! one customer's keys. The scripts (`lua/`) are the twin of
//! [`crate::rules`]; this engine only validates input that needs neither
//! clock nor state, resolves the catalog into arguments, and decodes replies
//! into the same answers the in-process engine gives.
//!
//! One module per idea: [`conn`] (targets and the shared connection),
//! [`scripts`] (loading, EVALSHA, readiness), [`args`] (requests into
//! arguments at named positions), [`reply`] (replies and errors into
//! answers), [`sweep`] (the due index under leases), [`keys`] (the layout),
//! [`lock_index`] (the lock-id index); this file is the [`Engine`] impl.

pub mod args;
pub mod conn;
pub mod keys;
pub mod lock_index;
pub mod reply;
pub mod scripts;
pub mod sweep;

use std::sync::Arc;

use async_trait::async_trait;
use redis::{RedisError, Value};

use crate::clock::{Clock, SystemClock};
use crate::engine::{Engine, SweepReport};
use crate::error::{invalid, EngineError};
use crate::model::*;
use crate::money::Amount;
use crate::rules;

use args::Argv;
use conn::unavailable;
use reply::{decode_buckets, decode_outcome, int, map_error, string, Ctx};
use scripts::Script;

pub use conn::{Conn, RedisOptions, RedisTarget, Tls};
pub use keys::{customer_keys, CustomerKeys, LAYOUT};
pub use lock_index::RedisLockIndex;
pub use scripts::{Loaded, Scripts, LIB_LUA};
pub use sweep::{SWEEP_LEASE_MS, SWEEP_SHARDS};

/// Balances kept in Redis.
pub struct RedisEngine {
    conn: Conn,
    scripts: Loaded,
    catalog: Arc<Catalog>,
    /// `None`: the scripts read Redis `TIME`, one clock for every sidecar.
    clock: Option<Arc<dyn Clock>>,
    retention: Retention,
    namespace: String,
    /// Identifies this process's sweeper in shard leases.
    sweeper_id: String,
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
        let conn = conn::open(&opts.target, opts.timeout, &opts.tls).await?;
        conn::check_eviction(&conn, opts.accept_eviction).await?;
        let scripts = Loaded::new(conn.clone());
        scripts.load().await?;
        Ok(RedisEngine {
            conn,
            scripts,
            catalog,
            clock,
            retention: opts.retention,
            namespace: opts.namespace,
            sweeper_id: format!("{:016x}", rand::random::<u64>()),
        })
    }

    pub fn scripts(&self) -> &Scripts {
        &self.scripts.scripts
    }

    /// Loads every script again (what readiness does after a server lost them).
    pub async fn load_scripts(&self) -> Result<(), EngineError> {
        self.scripts.load().await
    }

    /// The readiness probe: the store answers and holds the scripts.
    pub fn readiness(&self) -> Loaded {
        self.scripts.clone()
    }

    /// The lock-id → customer index, on the same connection and namespace.
    pub fn lock_index(&self) -> RedisLockIndex {
        RedisLockIndex::new(self.scripts.clone(), &self.namespace)
    }

    /// A clone of the shared connection.
    pub fn connection(&self) -> Conn {
        self.conn.clone()
    }

    pub fn keys(&self, customer_id: &str) -> CustomerKeys {
        customer_keys(&self.namespace, customer_id)
    }

    /// The instant to pass (`''`: the script reads Redis `TIME`) and, for
    /// checks made before the script, the best local guess of it.
    fn now(&self) -> (i64, String) {
        match &self.clock {
            Some(c) => {
                let now = c.now_ms();
                (now, now.to_string())
            }
            None => (SystemClock.now_ms(), String::new()),
        }
    }

    fn argv(&self, len: usize, now: String, customer_id: &str) -> Argv {
        Argv::customer(len, now, self.retention, customer_id)
    }

    /// Runs a script on a customer's keys.
    async fn run(
        &self,
        script: &Script,
        customer_id: &str,
        args: Argv,
        ctx: &Ctx<'_>,
    ) -> Result<Value, EngineError> {
        let k = self.keys(customer_id);
        self.scripts
            .eval(script, &[&k.customer, &k.locks, &k.due], &args.into_vec())
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
}

#[async_trait]
impl Engine for RedisEngine {
    async fn create_customer(&self, customer_id: &str) -> Result<bool, EngineError> {
        validate_id("customer_id", customer_id)?;
        let (_, now) = self.now();
        let k = self.keys(customer_id);
        let v = self
            .scripts
            .eval(&self.scripts().create_customer, &[&k.customer], &[now])
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
        let a = args::grant(self.argv(args::grant::ROLLOVER_LENGTH, now, customer_id), g);
        let ctx = Ctx {
            feature: &g.pool,
            balance_id: g.balance_id.as_deref().unwrap_or(""),
            ..Ctx::default()
        };
        let v = self
            .run(&self.scripts().grant, customer_id, a, &ctx)
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
        let a = args::update_bucket(self.argv(args::update_bucket::AMOUNT, now, customer_id), u);
        let ctx = Ctx {
            feature: &u.pool,
            ..Ctx::default()
        };
        self.run(&self.scripts().update_bucket, customer_id, a, &ctx)
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
        let mut a = self.argv(args::check::POOL_COUNT, now, customer_id);
        a.set(args::check::FEATURE_ID, feature);
        a.set(args::check::UNITS, units.raw().to_string());
        a.pools(args::check::POOL_COUNT, &self.catalog, feature);
        let ctx = Ctx {
            feature,
            ..Ctx::default()
        };
        let v = self
            .run(&self.scripts().check, customer_id, a, &ctx)
            .await?;
        decode_outcome(&self.catalog, v)
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
        let a = args::apply(
            self.argv(args::apply::POOL_COUNT, now, customer_id),
            op,
            key,
            &self.catalog,
        );
        let lock_id = match op {
            Op::Reserve { lock_id, .. } | Op::Finalize { lock_id, .. } => lock_id.as_str(),
            _ => "",
        };
        let ctx = Ctx {
            feature: op.feature_id().unwrap_or(""),
            lock_id,
            ..Ctx::default()
        };
        let v = self
            .run(&self.scripts().apply, customer_id, a, &ctx)
            .await?;
        decode_outcome(&self.catalog, v)
    }

    async fn balances(&self, customer_id: &str) -> Result<CustomerBalances, EngineError> {
        validate_id("customer_id", customer_id)?;
        let (_, now) = self.now();
        let a = self.argv(args::header::CUSTOMER_ID, now, customer_id);
        let v = self
            .run(&self.scripts().balances, customer_id, a, &Ctx::default())
            .await?;
        let mut items = reply::array(v)?.into_iter();
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
        let a = self.argv(args::header::CUSTOMER_ID, now, customer_id);
        let v = self
            .run(&self.scripts().reset_due, customer_id, a, &Ctx::default())
            .await?;
        Ok(int(&v)? as u32)
    }

    /// Reads the due index slot by slot (16 leased shards of 1024 slots) and
    /// applies `reset_due` to every customer due now; see [`sweep`].
    async fn sweep_due(&self) -> Result<SweepReport, EngineError> {
        self.sweep().await
    }
}
