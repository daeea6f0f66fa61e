//! The Lua contract as the engine loads it: every script of `lua/`, its SHA,
//! loading at startup, EVALSHA with the body resent once after `NOSCRIPT`,
//! and the readiness probe that reloads what the server lost.

use async_trait::async_trait;
use redis::{ErrorKind, RedisError, ServerErrorKind, Value};

use super::conn::{unavailable, Conn};
use crate::engine::Readiness;
use crate::error::{Cause, EngineError};

/// The shared library, prepended to every operation script.
pub const LIB_LUA: &str = include_str!("../../../lua/lib.lua");

/// One script: its body (for an operation, the library plus the operation)
/// and its SHA1.
#[derive(Debug, Clone)]
pub struct Script {
    pub name: &'static str,
    /// Whether the body is `lua/lib.lua` followed by `lua/<name>.lua`
    /// (an operation on a customer) rather than `lua/<name>.lua` alone.
    pub with_library: bool,
    pub body: String,
    pub sha: String,
}

impl Script {
    /// An operation script: the body is exactly `"$(cat lua/lib.lua
    /// lua/<op>.lua)"` (trailing newlines dropped, as the shell does), so a
    /// script loaded with `redis-cli SCRIPT LOAD` has the same SHA as the
    /// engine's.
    fn operation(name: &'static str, op: &str) -> Script {
        Script::new(name, true, &format!("{LIB_LUA}{op}"))
    }

    /// A script that stands alone (no library): `"$(cat lua/<name>.lua)"`.
    fn standalone(name: &'static str, body: &str) -> Script {
        Script::new(name, false, body)
    }

    fn new(name: &'static str, with_library: bool, body: &str) -> Script {
        let body = body.trim_end_matches('\n').to_string();
        let sha = sha1_smol::Sha1::from(&body).digest().to_string();
        Script {
            name,
            with_library,
            body,
            sha,
        }
    }
}

/// Every script of `lua/`.
#[derive(Debug, Clone)]
pub struct Scripts {
    pub create_customer: Script,
    pub grant: Script,
    pub update_bucket: Script,
    pub check: Script,
    pub apply: Script,
    pub balances: Script,
    pub reset_due: Script,
    pub lease_take: Script,
    pub lease_release: Script,
    pub lock_claim: Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        Scripts {
            create_customer: Script::operation(
                "create_customer",
                include_str!("../../../lua/create_customer.lua"),
            ),
            grant: Script::operation("grant", include_str!("../../../lua/grant.lua")),
            update_bucket: Script::operation(
                "update_bucket",
                include_str!("../../../lua/update_bucket.lua"),
            ),
            check: Script::operation("check", include_str!("../../../lua/check.lua")),
            apply: Script::operation("apply", include_str!("../../../lua/apply.lua")),
            balances: Script::operation("balances", include_str!("../../../lua/balances.lua")),
            reset_due: Script::operation("reset_due", include_str!("../../../lua/reset_due.lua")),
            lease_take: Script::standalone(
                "lease_take",
                include_str!("../../../lua/lease_take.lua"),
            ),
            lease_release: Script::standalone(
                "lease_release",
                include_str!("../../../lua/lease_release.lua"),
            ),
            lock_claim: Script::standalone(
                "lock_claim",
                include_str!("../../../lua/lock_claim.lua"),
            ),
        }
    }

    pub fn all(&self) -> [&Script; 10] {
        [
            &self.create_customer,
            &self.grant,
            &self.update_bucket,
            &self.check,
            &self.apply,
            &self.balances,
            &self.reset_due,
            &self.lease_take,
            &self.lease_release,
            &self.lock_claim,
        ]
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts::new()
    }
}

/// The loaded scripts on one connection.
#[derive(Clone)]
pub struct Loaded {
    pub(crate) conn: Conn,
    pub(crate) scripts: std::sync::Arc<Scripts>,
}

impl Loaded {
    pub fn new(conn: Conn) -> Loaded {
        Loaded {
            conn,
            scripts: std::sync::Arc::new(Scripts::new()),
        }
    }

    /// Loads every script (standalone); a cluster loads them on first use
    /// on each node.
    pub async fn load(&self) -> Result<(), EngineError> {
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
                    return Err(EngineError::Internal(Cause::msg(format!(
                        "{} sha mismatch",
                        s.name
                    ))));
                }
            }
        }
        Ok(())
    }

    /// EVALSHA, and EVAL (which also caches the script) after NOSCRIPT.
    pub async fn eval(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[String],
    ) -> Result<Value, RedisError> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&script.sha).arg(keys.len()).arg(keys).arg(args);
        match cmd.query_async::<Value>(&mut conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(&script.body).arg(keys.len()).arg(keys).arg(args);
                cmd.query_async::<Value>(&mut conn).await
            }
            r => r,
        }
    }
}

/// Ready when the store answers and the scripts are loaded. A probe sends
/// one `SCRIPT EXISTS` (not the script bodies); only when the server lost
/// them (a restart, `SCRIPT FLUSH`) does it load them again. On a cluster,
/// scripts load on first use on each node, so answering is enough.
#[async_trait]
impl Readiness for Loaded {
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
            Ok(_) => self.load().await.is_ok(),
            Err(_) => false,
        }
    }
}
