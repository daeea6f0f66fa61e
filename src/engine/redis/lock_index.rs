//! The lock-id → customer index in Redis, for a `finalize` that does not send
//! its customer (Autumn's SDK does not). One small key per lock id, outside
//! every customer's slot (its hash tag is the escaped lock id), never touched
//! by a customer's function (the library's `claim` runs on it alone):
//! `<ns>cg2:lock:{<escaped lock id>}` = `<customer id>\x1f<keep until ms>`
//! with a relative expiry (`PX`). The stored instant is also compared with
//! `now`, so an injected clock sees the same answers as the in-process index.

use async_trait::async_trait;

use super::conn::unavailable;
use super::keys::{escape, LAYOUT};
use super::library::Library;
use super::reply::int;
use crate::engine::LockIndex;
use crate::error::EngineError;

/// [`LockIndex`] over the engine's shared connection.
#[derive(Clone)]
pub struct RedisLockIndex {
    library: Library,
    namespace: String,
}

impl RedisLockIndex {
    pub fn new(library: Library, namespace: &str) -> RedisLockIndex {
        RedisLockIndex {
            library,
            namespace: namespace.to_string(),
        }
    }

    pub fn key(&self, lock_id: &str) -> String {
        format!("{}{LAYOUT}lock:{{{}}}", self.namespace, escape(lock_id))
    }
}

#[async_trait]
impl LockIndex for RedisLockIndex {
    async fn record(
        &self,
        lock_id: &str,
        customer_id: &str,
        keep_until: Option<i64>,
        now: i64,
    ) -> Result<(), EngineError> {
        let mut conn = self.library.conn.clone();
        let value = format!(
            "{customer_id}\x1f{}",
            keep_until.map_or(String::new(), |k| k.to_string())
        );
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(lock_id)).arg(value);
        if let Some(k) = keep_until {
            cmd.arg("PX").arg(k.saturating_sub(now).max(1));
        }
        self.library
            .guard
            .call(
                self.library.slot_of(&self.key(lock_id)),
                false,
                cmd.query_async::<()>(&mut conn),
            )
            .await
            .map_err(unavailable)
    }

    async fn claim(
        &self,
        lock_id: &str,
        customer_id: &str,
        keep_until: i64,
        now: i64,
    ) -> Result<bool, EngineError> {
        // One function on the one index key (`claim`): read the holder,
        // refuse if another customer's entry is live, else write ours (never
        // shortening our own). Reply {1|0, now}.
        let key = self.key(lock_id);
        let claimed = self
            .library
            .fcall(
                &self.library.functions.claim,
                &[&key],
                &[
                    customer_id.to_string(),
                    keep_until.to_string(),
                    now.to_string(),
                ],
            )
            .await
            .map_err(unavailable)?;
        let first = super::reply::array(claimed)?.into_iter().next();
        Ok(int(&first.unwrap_or(redis::Value::Nil))? == 1)
    }

    async fn lookup(&self, lock_id: &str, now: i64) -> Result<Option<String>, EngineError> {
        let mut conn = self.library.conn.clone();
        let mut get = redis::cmd("GET");
        get.arg(self.key(lock_id));
        let v: Option<String> = self
            .library
            .guard
            .call(
                self.library.slot_of(&self.key(lock_id)),
                false,
                get.query_async(&mut conn),
            )
            .await
            .map_err(unavailable)?;
        Ok(v.and_then(|v| {
            let (customer, until) = v.rsplit_once('\x1f')?;
            let live = until.parse::<i64>().map_or(true, |u| u > now);
            live.then(|| customer.to_string())
        }))
    }
}
