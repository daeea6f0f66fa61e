//! The lock-id → customer index in Redis, for a `finalize` that does not send
//! its customer (Autumn's SDK does not). One small key per lock id, outside
//! every customer's slot (its hash tag is the escaped lock id), never touched
//! by a script: `<ns>cg1:lock:{<escaped lock id>}` = `<customer id>\x1f<keep until ms>`
//! with a relative expiry (`PX`). The stored instant is also compared with
//! `now`, so an injected clock sees the same answers as the in-process index.

use async_trait::async_trait;
use redis::RedisError;

use super::keys::{escape, LAYOUT};
use super::Conn;
use crate::error::EngineError;
use crate::http::LockIndex;

/// [`LockIndex`] over the engine's shared connection.
#[derive(Clone)]
pub struct RedisLockIndex {
    conn: Conn,
    namespace: String,
}

impl RedisLockIndex {
    pub fn new(conn: Conn, namespace: &str) -> RedisLockIndex {
        RedisLockIndex {
            conn,
            namespace: namespace.to_string(),
        }
    }

    pub fn key(&self, lock_id: &str) -> String {
        format!("{}{LAYOUT}lock:{{{}}}", self.namespace, escape(lock_id))
    }
}

fn unavailable(e: RedisError) -> EngineError {
    EngineError::StoreUnavailable(e.to_string())
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
        let mut conn = self.conn.clone();
        let value = format!(
            "{customer_id}\x1f{}",
            keep_until.map_or(String::new(), |k| k.to_string())
        );
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(lock_id)).arg(value);
        if let Some(k) = keep_until {
            cmd.arg("PX").arg(k.saturating_sub(now).max(1));
        }
        cmd.query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    async fn claim(
        &self,
        lock_id: &str,
        customer_id: &str,
        keep_until: i64,
        now: i64,
    ) -> Result<bool, EngineError> {
        // One script on the one index key: read the holder, refuse if another
        // customer's entry is live, else write ours (never shortening our own).
        const CLAIM: &str = r#"
local v = redis.call('GET', KEYS[1])
local now, keep = tonumber(ARGV[3]), tonumber(ARGV[2])
if v then
  local sep = string.find(v, '\31', 1, true)
  local holder, until_s = string.sub(v, 1, sep - 1), string.sub(v, sep + 1)
  local until_ms = tonumber(until_s)
  local live = until_ms == nil or until_ms > now
  if holder ~= ARGV[1] and live then return 0 end
  if holder == ARGV[1] then
    if until_ms == nil then return 1 end
    if until_ms > keep then keep = until_ms end
  end
end
redis.call('SET', KEYS[1], ARGV[1] .. '\31' .. string.format('%d', keep), 'PX', math.max(keep - now, 1))
return 1
"#;
        let mut conn = self.conn.clone();
        let claimed: i64 = redis::Script::new(CLAIM)
            .key(self.key(lock_id))
            .arg(customer_id)
            .arg(keep_until)
            .arg(now)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(claimed == 1)
    }

    async fn lookup(&self, lock_id: &str, now: i64) -> Result<Option<String>, EngineError> {
        let mut conn = self.conn.clone();
        let v: Option<String> = redis::cmd("GET")
            .arg(self.key(lock_id))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(v.and_then(|v| {
            let (customer, until) = v.rsplit_once('\x1f')?;
            let live = until.parse::<i64>().map_or(true, |u| u > now);
            live.then(|| customer.to_string())
        }))
    }
}
