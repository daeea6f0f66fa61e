//! `redis_wait_replicas`: writes that wait for replicas' acknowledgement.
//!
//! Redis replicates asynchronously: a primary that dies after answering a
//! write but before its replicas received it loses that write when a
//! replica takes over. `WAIT n timeout` blocks until `n` replicas have
//! every write the *same connection* made, so it cannot run inside a
//! function, and it blocks the connection it runs on — on the shared
//! multiplexed connection it would hold up every other request. So each
//! waiting write takes a connection of its own from a small pool
//! (`deadpool-redis`): its `FCALL`, then `WAIT` on the same connection. On
//! a cluster each primary has its pool, found through the decisions' slot
//! table ([`super::primaries`]). Fewer than `n` acknowledgements within the wait's timeout
//! make the answer an unknown outcome (`store_timeout`): the write is on
//! the primary but a failover could still lose it; a retry with the same
//! idempotency key settles it.

use std::collections::HashMap;
use std::sync::Mutex;

use redis::{RedisError, Value};

use super::conn::RedisTarget;
use super::keys::key_slot;
use super::library::{is_function_not_found, Library};
use crate::error::{Cause, EngineError};

/// The pools of connections waiting writes take.
enum Pool {
    Single(deadpool_redis::Pool),
    /// By primary URL, made on first use.
    Cluster(Mutex<HashMap<String, deadpool_redis::Pool>>),
}

/// Waiting for replicas: the pool, how many, and for how long.
pub struct ReplicaWait {
    pool: Pool,
    replicas: u32,
    wait_ms: u64,
    size: usize,
}

impl ReplicaWait {
    /// A pool of `size` connections to `target`. TLS with a private CA is
    /// not supported here (the pool opens plain or system-rooted TLS
    /// connections from the URL).
    pub fn new(
        target: &RedisTarget,
        replicas: u32,
        wait_ms: u64,
        size: usize,
    ) -> Result<ReplicaWait, EngineError> {
        let cause = |e: &dyn std::fmt::Display| {
            EngineError::StoreUnavailable(Cause::msg(format!("the replica-wait pool: {e}")))
        };
        let pool = match target {
            RedisTarget::Standalone(url) => {
                Pool::Single(pool_for(url, size).map_err(|e| cause(&e))?)
            }
            RedisTarget::Cluster(_) => Pool::Cluster(Mutex::new(HashMap::new())),
        };
        Ok(ReplicaWait {
            pool,
            replicas,
            wait_ms,
            size,
        })
    }

    /// The pool to the primary serving `keys[0]`'s slot.
    fn pool(&self, library: &Library, keys: &[&str]) -> Result<deadpool_redis::Pool, RedisError> {
        match &self.pool {
            Pool::Single(p) => Ok(p.clone()),
            Pool::Cluster(pools) => {
                let slot = keys.first().map_or(0, |k| key_slot(k) as u16);
                let url = library
                    .primaries
                    .as_ref()
                    .and_then(|p| p.url_of(slot))
                    .ok_or_else(|| refused(format!("no primary known for slot {slot}")))?;
                let mut pools = pools.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(p) = pools.get(&url) {
                    return Ok(p.clone());
                }
                let p = pool_for(&url, self.size).map_err(|e| refused(e.to_string()))?;
                pools.insert(url, p.clone());
                Ok(p)
            }
        }
    }

    /// `FCALL` on a pooled connection, then `WAIT` on the same one; within
    /// the library's bound and breaker, the header's `now` gaining the
    /// deadline as on the shared connection.
    pub async fn fcall(
        &self,
        library: &Library,
        function: &str,
        keys: &[&str],
        mut args: Vec<String>,
    ) -> Result<Value, RedisError> {
        if let Some(now) = args.first_mut() {
            *now = library.guard().with_deadline(std::mem::take(now));
        }
        let slot = keys.first().and_then(|k| library.slot_of(k));
        library
            .guard()
            .call(
                slot,
                false,
                self.fcall_and_wait(library, function, keys, &args),
            )
            .await
    }

    async fn fcall_and_wait(
        &self,
        library: &Library,
        function: &str,
        keys: &[&str],
        args: &[String],
    ) -> Result<Value, RedisError> {
        let mut fcall = redis::cmd("FCALL");
        fcall.arg(function).arg(keys.len()).arg(keys).arg(args);
        let mut wait = redis::cmd("WAIT");
        wait.arg(self.replicas).arg(self.wait_ms);
        let pool = self.pool(library, keys)?;
        let mut c = pool.get().await.map_err(|e| {
            if let Some(p) = &library.primaries {
                p.rebuild_soon();
            }
            pool_error(e)
        })?;
        let value = match fcall.query_async::<Value>(&mut c).await {
            Err(e) if is_function_not_found(&e) => {
                library.load_for(keys).await?;
                fcall.query_async::<Value>(&mut c).await?
            }
            Err(e) => {
                if let Some(p) = &library.primaries {
                    p.rebuild_soon();
                }
                return Err(e);
            }
            Ok(v) => v,
        };
        let acked: i64 = wait.query_async(&mut c).await?;
        if acked < i64::from(self.replicas) {
            return Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "written on the primary, but {acked} of {} replicas acknowledged it within {} ms: a failover may lose it",
                    self.replicas, self.wait_ms
                ),
            )));
        }
        Ok(value)
    }
}

fn pool_for(url: &str, size: usize) -> Result<deadpool_redis::Pool, String> {
    let manager = deadpool_redis::Manager::new(url).map_err(|e| e.to_string())?;
    deadpool_redis::Pool::builder(manager)
        .max_size(size)
        .build()
        .map_err(|e| e.to_string())
}

fn refused(msg: String) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::ConnectionRefused,
        msg,
    ))
}

/// A pool that could not hand out a connection: nothing was sent.
fn pool_error(e: deadpool_redis::PoolError) -> RedisError {
    match e {
        deadpool_redis::PoolError::Backend(e) => e,
        other => refused(format!("no pooled connection: {other}")),
    }
}
