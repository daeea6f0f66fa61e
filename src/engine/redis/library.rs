//! The Lua contract as the engine loads it: one Redis Functions library
//! (`lua/creditgate.lua`), its name and version read from the file at
//! compile time, loading at startup on every primary (refusing Redis < 7.0
//! and a same-named library with other code), `FCALL` with one reload and
//! retry after "function not found", and the readiness probe.

use async_trait::async_trait;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{RedisError, Value};

use super::conn::{unavailable, Conn};
use super::guard::{is_transport, mono_ms, Guard, PROBE_EVERY};
use super::primaries::Primaries;
use crate::engine::Readiness;
use crate::error::{Cause, EngineError};

/// The library's source, exactly as `FUNCTION LOAD` receives it.
pub const LIBRARY: &str = include_str!("../../../lua/creditgate.lua");

/// The library name, from line 1 (`#!lua name=creditgate_<layout>_<version>`).
pub const LIBRARY_NAME: &str = library_name(LIBRARY);

/// The storage layout the library reads and writes (`cg2`): the key prefix
/// and the `cg:layout` marker's value.
pub const LAYOUT: &str = layout(LIBRARY_NAME);

/// The prefix of every function name (`<layout>_<version>_`, e.g.
/// `cg2_v7_`): line 2 of the file spells it out, a test holds the two equal.
pub const FUNCTION_PREFIX: &str = function_prefix(LIBRARY_NAME);

/// Redis Functions and `PEXPIRE … NX` need this version.
pub const MIN_REDIS: (u32, u32) = (7, 0);

const fn library_name(src: &'static str) -> &'static str {
    let b = src.as_bytes();
    let head = b"#!lua name=creditgate_";
    let mut i = 0;
    while i < head.len() {
        assert!(
            b[i] == head[i],
            "lua/creditgate.lua: line 1 must be #!lua name=creditgate_…"
        );
        i += 1;
    }
    let start = head.len() - "creditgate_".len();
    let mut end = head.len();
    while end < b.len() && b[end] != b'\n' && b[end] != b' ' && b[end] != b'\r' {
        end += 1;
    }
    let (_, rest) = b.split_at(start);
    let (name, _) = rest.split_at(end - start);
    match core::str::from_utf8(name) {
        Ok(s) => s,
        Err(_) => panic!("lua/creditgate.lua: library name not UTF-8"),
    }
}

/// `creditgate_cg2_v7` → `cg2_v7_`'s parts: what follows `creditgate_`.
const fn tail(name: &'static str) -> &'static [u8] {
    let (_, t) = name.as_bytes().split_at("creditgate_".len());
    t
}

const fn layout(name: &'static str) -> &'static str {
    let t = tail(name);
    let mut i = 0;
    while i < t.len() && t[i] != b'_' {
        i += 1;
    }
    assert!(
        i < t.len(),
        "library name must be creditgate_<layout>_<version>"
    );
    let (l, _) = t.split_at(i);
    match core::str::from_utf8(l) {
        Ok(s) => s,
        Err(_) => panic!(),
    }
}

const fn function_prefix(name: &'static str) -> &'static str {
    // The file's line 2 is `local FN = '<layout>_<version>_'`: the prefix is
    // the name's tail plus '_', which is exactly line 2's literal; read it
    // there, so a mismatch fails the unit test below rather than hiding.
    let b = LIBRARY.as_bytes();
    let mut i = 0;
    while b[i] != b'\n' {
        i += 1;
    }
    let head = b"\nlocal FN = '";
    let mut j = 0;
    while j < head.len() {
        assert!(
            b[i + j] == head[j],
            "lua/creditgate.lua: line 2 must be local FN = '<prefix>'"
        );
        j += 1;
    }
    let start = i + head.len();
    let mut end = start;
    while b[end] != b'\'' {
        end += 1;
    }
    let (_, rest) = b.split_at(start);
    let (p, _) = rest.split_at(end - start);
    let _ = name;
    match core::str::from_utf8(p) {
        Ok(s) => s,
        Err(_) => panic!(),
    }
}

/// Every function of the library, by its full name.
#[derive(Debug, Clone)]
pub struct Functions {
    pub create_customer: String,
    pub grant: String,
    pub update_bucket: String,
    pub check: String,
    pub consume: String,
    pub track: String,
    pub reserve: String,
    pub finalize: String,
    pub balances: String,
    pub reset_due: String,
    pub reset_due_many: String,
    pub lease: String,
    pub release: String,
    pub claim: String,
    pub migrate: String,
    pub migrate_key: String,
    pub set_limits: String,
    pub delete_customer: String,
    pub delete_balance: String,
}

impl Functions {
    pub fn new() -> Functions {
        let f = |op: &str| format!("{FUNCTION_PREFIX}{op}");
        Functions {
            create_customer: f("create_customer"),
            grant: f("grant"),
            update_bucket: f("update_bucket"),
            check: f("check"),
            consume: f("consume"),
            track: f("track"),
            reserve: f("reserve"),
            finalize: f("finalize"),
            balances: f("balances"),
            reset_due: f("reset_due"),
            reset_due_many: f("reset_due_many"),
            lease: f("lease"),
            release: f("release"),
            claim: f("claim"),
            migrate: f("migrate"),
            migrate_key: f("migrate_key"),
            set_limits: f("set_limits"),
            delete_customer: f("delete_customer"),
            delete_balance: f("delete_balance"),
        }
    }

    pub fn all(&self) -> [&str; 19] {
        [
            &self.create_customer,
            &self.grant,
            &self.update_bucket,
            &self.check,
            &self.consume,
            &self.track,
            &self.reserve,
            &self.finalize,
            &self.balances,
            &self.reset_due,
            &self.reset_due_many,
            &self.lease,
            &self.release,
            &self.claim,
            &self.migrate,
            &self.migrate_key,
            &self.set_limits,
            &self.delete_customer,
            &self.delete_balance,
        ]
    }
}

impl Default for Functions {
    fn default() -> Self {
        Functions::new()
    }
}

/// Where a command goes: the shared connection's own routing, or one
/// cluster node.
#[derive(Clone, Debug)]
pub(crate) enum Node {
    Routed,
    Address(String, u16),
    /// The primary serving this key's slot.
    SlotOf(String),
    /// The primary serving this slot.
    Slot(u16),
}

impl Node {
    /// The hash slot a command to this node is about, if any.
    fn slot(&self) -> Option<u16> {
        match self {
            Node::SlotOf(key) => Some(super::keys::key_slot(key) as u16),
            Node::Slot(s) => Some(*s),
            Node::Routed | Node::Address(..) => None,
        }
    }
}

/// The library on one connection, every call through its [`Guard`].
#[derive(Clone)]
pub struct Library {
    pub(crate) conn: Conn,
    pub(crate) functions: std::sync::Arc<Functions>,
    pub(crate) guard: std::sync::Arc<Guard>,
    /// On a cluster: the functions on customers go straight to the slot's
    /// primary ([`Primaries`]), not through the cluster client.
    pub(crate) primaries: Option<std::sync::Arc<Primaries>>,
}

fn internal(msg: String) -> EngineError {
    EngineError::Internal(Cause::msg(msg))
}

/// Whether a reply error says the server lacks the function (the library
/// was flushed, the server restarted without persistence, a failover).
pub fn is_function_not_found(e: &RedisError) -> bool {
    e.detail()
        .is_some_and(|d| d.starts_with("Function not found"))
        || e.to_string().contains("Function not found")
}

impl Library {
    /// The library on `conn`; every call bounded by `timeout`.
    /// `accept_eviction`: a server that may evict is served from anyway
    /// (see [`Library::safety_check`]).
    pub fn new(conn: Conn, timeout: std::time::Duration, accept_eviction: bool) -> Library {
        Library {
            conn: conn.clone(),
            functions: std::sync::Arc::new(Functions::new()),
            guard: Guard::new(timeout, accept_eviction, matches!(conn, Conn::Cluster(_))),
            primaries: None,
        }
    }

    /// Sends the functions on customers through `primaries`.
    pub fn deciding_through(mut self, primaries: std::sync::Arc<Primaries>) -> Library {
        self.primaries = Some(primaries);
        self
    }

    /// The guard every call goes through (the breaker's state, the deadline).
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// One command on `node`, within the bound and the breaker.
    pub(crate) async fn query(&self, node: &Node, cmd: redis::Cmd) -> Result<Value, RedisError> {
        self.guard
            .call(node.slot(), false, self.send(node, cmd))
            .await
    }

    /// One command on `node` past an open breaker (its probes).
    async fn probe(&self, node: &Node, cmd: redis::Cmd) -> Result<Value, RedisError> {
        self.guard
            .call(node.slot(), true, self.send(node, cmd))
            .await
    }

    /// The hash slot of `key` on a cluster (`None` on a standalone server,
    /// where there is one breaker).
    pub(crate) fn slot_of(&self, key: &str) -> Option<u16> {
        match self.conn {
            Conn::Cluster(_) => Some(super::keys::key_slot(key) as u16),
            Conn::Single(_) => None,
        }
    }

    async fn send(&self, node: &Node, cmd: redis::Cmd) -> Result<Value, RedisError> {
        let mut conn = self.conn.clone();
        match (&mut conn, node) {
            (Conn::Cluster(c), Node::Address(host, port)) => {
                c.route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: host.clone(),
                        port: *port,
                    }),
                )
                .await
            }
            (Conn::Cluster(c), Node::SlotOf(_) | Node::Slot(_)) => {
                let slot = node.slot().unwrap_or(0);
                c.route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                        redis::cluster_routing::Route::new(
                            slot,
                            redis::cluster_routing::SlotAddr::Master,
                        ),
                    )),
                )
                .await
            }
            _ => cmd.query_async::<Value>(&mut conn).await,
        }
    }

    /// The primaries: one node on a standalone server, every slot range's
    /// primary on a cluster (from `CLUSTER SLOTS`).
    pub(crate) async fn primaries(&self) -> Result<Vec<Node>, EngineError> {
        if let Conn::Single(_) = &self.conn {
            return Ok(vec![Node::Routed]);
        }
        let v = self
            .query(&Node::Routed, redis::cmd("CLUSTER").arg("SLOTS").clone())
            .await
            .map_err(unavailable)?;
        let mut out: Vec<(String, u16)> = vec![];
        if let Value::Array(ranges) = v {
            for r in ranges {
                let Value::Array(parts) = r else { continue };
                let Some(Value::Array(master)) = parts.get(2) else {
                    continue;
                };
                let host = match master.first() {
                    Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                    Some(Value::SimpleString(s)) => s.clone(),
                    _ => continue,
                };
                let Some(Value::Int(port)) = master.get(1) else {
                    continue;
                };
                let node = (host, *port as u16);
                if !out.contains(&node) {
                    out.push(node);
                }
            }
        }
        if out.is_empty() {
            return Err(internal("CLUSTER SLOTS named no primary".into()));
        }
        Ok(out.into_iter().map(|(h, p)| Node::Address(h, p)).collect())
    }

    /// Refuses a server older than [`MIN_REDIS`].
    async fn check_version(&self, node: &Node) -> Result<(), EngineError> {
        let v = self
            .query(node, redis::cmd("INFO").arg("server").clone())
            .await
            .map_err(unavailable)?;
        let text = match v {
            Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            Value::VerbatimString { text, .. } => text,
            other => format!("{other:?}"),
        };
        let version = text
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_default();
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if found < MIN_REDIS {
            return Err(EngineError::StoreUnavailable(Cause::msg(format!(
                "Redis {version} is too old: creditgate needs Redis {}.{} or later \
                 (Redis Functions)",
                MIN_REDIS.0, MIN_REDIS.1
            ))));
        }
        Ok(())
    }

    /// `FUNCTION LIST LIBRARYNAME <name> [WITHCODE]` on one node: `None`
    /// when the library is absent, else its code (empty without `code`).
    async fn listed(&self, node: &Node, code: bool) -> Result<Option<String>, RedisError> {
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LIST").arg("LIBRARYNAME").arg(LIBRARY_NAME);
        if code {
            cmd.arg("WITHCODE");
        }
        let v = self.query(node, cmd).await?;
        let Value::Array(libs) = v else {
            return Ok(None);
        };
        for lib in libs {
            let fields: Vec<(String, Value)> = match lib {
                Value::Array(items) => items
                    .chunks(2)
                    .filter_map(|kv| match (&kv[0], kv.get(1)) {
                        (Value::BulkString(k), Some(v)) => {
                            Some((String::from_utf8_lossy(k).into_owned(), v.clone()))
                        }
                        (Value::SimpleString(k), Some(v)) => Some((k.clone(), v.clone())),
                        _ => None,
                    })
                    .collect(),
                Value::Map(items) => items
                    .into_iter()
                    .filter_map(|(k, v)| match k {
                        Value::BulkString(k) => Some((String::from_utf8_lossy(&k).into_owned(), v)),
                        Value::SimpleString(k) => Some((k, v)),
                        _ => None,
                    })
                    .collect(),
                _ => continue,
            };
            let text = |name: &str| {
                fields
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| match v {
                        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                        Value::SimpleString(s) => s.clone(),
                        _ => String::new(),
                    })
            };
            if text("library_name").as_deref() == Some(LIBRARY_NAME) {
                return Ok(Some(text("library_code").unwrap_or_default()));
            }
        }
        Ok(None)
    }

    /// `FUNCTION LOAD` on one node; "already exists" (another sidecar won
    /// the race) is fine.
    async fn load_on(&self, node: &Node) -> Result<(), EngineError> {
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LOAD").arg(LIBRARY);
        match self.query(node, cmd).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("already exists") => Ok(()),
            Err(e) if e.is_io_error() || e.is_connection_refusal() || e.is_timeout() => {
                Err(unavailable(e))
            }
            Err(e) => Err(internal(format!("FUNCTION LOAD {LIBRARY_NAME}: {e}"))),
        }
    }

    /// Loads the library on the node serving `keys[0]` (after "function not
    /// found" on a connection of its own).
    pub(crate) async fn load_for(&self, keys: &[&str]) -> Result<(), RedisError> {
        let node = match (&self.conn, keys.first()) {
            (Conn::Cluster(_), Some(k)) => Node::SlotOf(k.to_string()),
            _ => Node::Routed,
        };
        let mut load = redis::cmd("FUNCTION");
        load.arg("LOAD").arg(LIBRARY);
        match self.send(&node, load).await {
            Err(e) if !e.to_string().contains("already exists") => Err(e),
            _ => Ok(()),
        }
    }

    /// At startup, on every primary: refuses Redis < 7.0, loads the library
    /// when absent, and refuses a library of this name whose code differs
    /// (a build changed the library without bumping its version).
    pub async fn load(&self) -> Result<(), EngineError> {
        for node in self.primaries().await? {
            self.check_version(&node).await?;
            match self.listed(&node, true).await.map_err(unavailable)? {
                None => self.load_on(&node).await?,
                Some(code) if code == LIBRARY => {}
                Some(_) => {
                    return Err(EngineError::StoreUnavailable(Cause::msg(format!(
                        "Redis holds a library {LIBRARY_NAME} with other code than this build's: \
                         a library change must bump its version (lua/creditgate.lua lines 1-2); \
                         FUNCTION DELETE {LIBRARY_NAME} once no sidecar uses it"
                    ))))
                }
            }
        }
        Ok(())
    }

    /// `FCALL function numkeys keys… args…` within the bound and the
    /// breaker; after "function not found" the library is loaded (on the
    /// node serving the first key, on a cluster) and the call is sent once
    /// more.
    pub async fn fcall(
        &self,
        function: &str,
        keys: &[&str],
        args: &[String],
    ) -> Result<Value, RedisError> {
        let slot = keys.first().and_then(|k| self.slot_of(k));
        self.guard
            .call(slot, false, self.fcall_once(function, keys, args))
            .await
    }

    /// [`Library::fcall`] of a function on a customer, whose `ARGV[1]` (the
    /// header's `now`) gains the deadline of a call sent now.
    pub async fn fcall_with_deadline(
        &self,
        function: &str,
        keys: &[&str],
        mut args: Vec<String>,
    ) -> Result<Value, RedisError> {
        if let Some(now) = args.first_mut() {
            *now = self.guard.with_deadline(std::mem::take(now));
        }
        self.fcall(function, keys, &args).await
    }

    async fn fcall_once(
        &self,
        function: &str,
        keys: &[&str],
        args: &[String],
    ) -> Result<Value, RedisError> {
        let cmd = || {
            let mut c = redis::cmd("FCALL");
            c.arg(function).arg(keys.len()).arg(keys).arg(args);
            c
        };
        if let (Some(p), Some(k)) = (&self.primaries, keys.first()) {
            let slot = super::keys::key_slot(k) as u16;
            return match p.query(slot, &cmd()).await {
                Err(e) if is_function_not_found(&e) => {
                    if self.load_for(keys).await.is_err() {
                        return Err(e);
                    }
                    p.query(slot, &cmd()).await
                }
                r => r,
            };
        }
        let mut conn = self.conn.clone();
        match cmd().query_async::<Value>(&mut conn).await {
            Err(e) if is_function_not_found(&e) => {
                if self.load_for(keys).await.is_err() {
                    return Err(e);
                }
                cmd().query_async::<Value>(&mut conn).await
            }
            r => r,
        }
    }

    /// The safety check every primary gets at connect and every few seconds
    /// after (and `/readyz` on each probe): a `TIME` round trip (the
    /// deadline's offset), `maxmemory-policy` (eviction turned on while
    /// serving makes the store unsafe unless `accept_eviction`), and the
    /// library's presence (loaded again where lost). Its `TIME` and
    /// `CONFIG` are sent past an open breaker. `Err`: why the store is not
    /// ready.
    pub async fn safety_check(&self) -> Result<(), String> {
        let nodes = match self.primaries_probe().await {
            Ok(n) => n,
            Err(e) => return Err(format!("Redis does not answer: {e}")),
        };
        let mut samples = vec![];
        let mut evicting = vec![];
        for node in &nodes {
            let sent = mono_ms();
            let t = self
                .probe(node, redis::cmd("TIME"))
                .await
                .map_err(|e| format!("Redis does not answer: {e}"))?;
            let received = mono_ms();
            if let Some(redis_ms) = time_ms(&t) {
                samples.push((sent, redis_ms, received));
            }
            let mut get = redis::cmd("CONFIG");
            get.arg("GET").arg("maxmemory-policy");
            match self.probe(node, get).await {
                Ok(v) => {
                    let policy = policy_of(&v);
                    if policy != "noeviction" {
                        evicting.push(policy);
                    }
                }
                // CONFIG renamed or refused (some managed services): what
                // startup could not read either; not a reason to stop.
                Err(e) if !is_transport(&e) => {}
                Err(e) => return Err(format!("Redis does not answer: {e}")),
            }
            match self.listed(node, false).await {
                Ok(Some(_)) => {}
                Ok(None) => self
                    .load_on(node)
                    .await
                    .map_err(|e| format!("cannot load the library: {e}"))?,
                Err(e) => return Err(format!("Redis does not answer: {e}")),
            }
        }
        self.guard.offsets(&samples);
        let reason = (!evicting.is_empty() && !self.guard.accept_eviction).then(|| {
            format!(
                "maxmemory-policy is {} (not noeviction): Redis may silently delete balances; \
                 set `maxmemory-policy noeviction`",
                evicting.join(", ")
            )
        });
        if let Ok(mut r) = self.guard.unsafe_reason.lock() {
            *r = reason.clone();
        }
        match reason {
            Some(r) => Err(r),
            None => Ok(()),
        }
    }

    /// Probes every open breaker once: a `PING` to the server, or on a
    /// cluster to each open slot's primary (whose answer closes that
    /// slot's breaker; the cluster client finds a promoted replica).
    async fn probe_open(&self) {
        use futures_util::StreamExt;
        let slots = self.guard.open_slots();
        if let Conn::Single(_) = &self.conn {
            let _ = self.probe(&Node::Routed, redis::cmd("PING")).await;
            return;
        }
        if let Some(&s) = slots.first() {
            let now = mono_ms();
            if now
                - self
                    .guard
                    .last_nudge
                    .load(std::sync::atomic::Ordering::Relaxed)
                >= 1000
            {
                self.guard
                    .last_nudge
                    .store(now, std::sync::atomic::Ordering::Relaxed);
                self.nudge_topology(s).await;
            }
        }
        futures_util::stream::iter(slots)
            .map(|s| async move {
                let ping = redis::cmd("PING");
                let _ = match &self.primaries {
                    Some(p) => self.guard.call(Some(s), true, p.query(s, &ping)).await,
                    None => self.probe(&Node::Slot(s), ping).await,
                };
            })
            .buffer_unordered(64)
            .collect::<Vec<()>>()
            .await;
    }

    /// Makes the cluster client learn the cluster's topology again. It
    /// reconnects to a node that stopped answering, but only a `MOVED`
    /// makes it read the slots again, and a dead primary sends none: after
    /// its replica took over, the client would keep calling the dead
    /// address. So a keyed read of `slot` goes to every primary
    /// `CLUSTER SLOTS` names now: those not serving the slot answer
    /// `MOVED`, and the client rebuilds its slot map.
    async fn nudge_topology(&self, slot: u16) {
        let tag = super::keys::slot_tags()
            .get(slot as usize)
            .cloned()
            .unwrap_or_default();
        let key = format!("cg2:probe:{{{tag}}}");
        let Ok(nodes) = self.primaries().await else {
            return;
        };
        let reads = nodes.iter().map(|node| {
            let mut exists = redis::cmd("EXISTS");
            exists.arg(&key);
            self.probe(node, exists)
        });
        futures_util::future::join_all(reads).await;
    }

    async fn primaries_probe(&self) -> Result<Vec<Node>, RedisError> {
        if let Conn::Single(_) = &self.conn {
            return Ok(vec![Node::Routed]);
        }
        self.probe(&Node::Routed, redis::cmd("PING")).await?;
        self.primaries()
            .await
            .map_err(|e| RedisError::from(std::io::Error::other(e.to_string())))
    }
}

/// `TIME`'s reply in ms.
fn time_ms(v: &Value) -> Option<i64> {
    let Value::Array(parts) = v else { return None };
    let num = |v: &Value| -> Option<i64> {
        match v {
            Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            Value::Int(i) => Some(*i),
            _ => None,
        }
    };
    Some(num(parts.first()?)? * 1000 + num(parts.get(1)?)? / 1000)
}

/// `CONFIG GET maxmemory-policy`'s value (RESP2 array or RESP3 map).
pub(crate) fn policy_of(v: &Value) -> String {
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        _ => String::new(),
    };
    match v {
        Value::Array(items) => items.get(1).map(text).unwrap_or_default(),
        Value::Map(items) => items.first().map(|(_, v)| text(v)).unwrap_or_default(),
        _ => String::new(),
    }
}

/// Runs [`Library::safety_check`] every `every` while the library's guard
/// lives, and probes an open breaker every [`PROBE_EVERY`] until Redis
/// answers. Logs an error on every check that finds the store unsafe.
pub fn spawn_safety_task(library: &Library, every: std::time::Duration) {
    let weak = std::sync::Arc::downgrade(&library.guard);
    let conn = library.conn.clone();
    let functions = library.functions.clone();
    let primaries = library.primaries.clone();
    tokio::spawn(async move {
        loop {
            let wait = {
                let Some(guard) = weak.upgrade() else { return };
                if guard.is_open() {
                    tokio::time::sleep(PROBE_EVERY).await;
                } else {
                    let opened = guard.opened.notified();
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = opened => {}
                    }
                }
                guard
            };
            let library = Library {
                conn: conn.clone(),
                functions: functions.clone(),
                guard: wait,
                primaries: primaries.clone(),
            };
            if library.guard.is_open() {
                library.probe_open().await;
                continue;
            }
            if let Err(reason) = library.safety_check().await {
                tracing::error!(%reason, "Redis is not safe to serve from: /readyz answers 503");
            }
        }
    });
}

/// Ready when the breaker is closed and the safety check passes now on
/// every primary ([`Library::safety_check`]: Redis answers, holds the
/// library, does not evict, and the deadline's offset is measured again).
/// Every command within the store timeout, so the probe answers within it.
#[async_trait]
impl Readiness for Library {
    async fn ready(&self) -> bool {
        !self.guard.is_open() && self.safety_check().await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_one_and_two_agree_and_name_the_layout() {
        let mut lines = LIBRARY.lines();
        let one = lines.next().unwrap();
        let two = lines.next().unwrap();
        assert_eq!(one, format!("#!lua name={LIBRARY_NAME}"));
        let (layout, version) = LIBRARY_NAME
            .strip_prefix("creditgate_")
            .unwrap()
            .split_once('_')
            .unwrap();
        assert_eq!(layout, LAYOUT);
        assert!(version.starts_with('v') && version[1..].parse::<u32>().is_ok());
        // Line 2 holds the function prefix, which must be the name's tail.
        assert!(
            two.starts_with(&format!("local FN = '{layout}_{version}_'")),
            "line 2 {two:?} disagrees with line 1 {one:?}"
        );
        assert_eq!(FUNCTION_PREFIX, format!("{layout}_{version}_"));
        assert_eq!(super::super::keys::LAYOUT, format!("{LAYOUT}:"));
    }

    #[test]
    fn every_function_is_registered() {
        for f in Functions::new().all() {
            let op = f.strip_prefix(FUNCTION_PREFIX).unwrap();
            assert!(
                LIBRARY.contains(&format!("register('{op}', FNS.{op})")),
                "{op} not registered"
            );
        }
        assert_eq!(LIBRARY.matches("\nregister('").count(), 19);
    }
}
