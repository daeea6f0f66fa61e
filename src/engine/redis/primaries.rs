//! The decisions' own route to a cluster's primaries: one multiplexed
//! connection per primary and a slot table, read without a lock on every
//! call and rebuilt in the background.
//!
//! Why not the cluster client for these: when a primary dies, redis-rs's
//! `ClusterConnection` retries it and rebuilds its slot map under a lock
//! that every request waits on, so for the seconds of a failover every
//! shard's requests stall past the timeout (measured: tests/redis_failover.rs
//! failed on live shards). Here a call to a dead primary fails on its own
//! connection only, and asks for a rebuild; the other primaries' calls go
//! on. The cluster client still serves everything off the decision path
//! (loading the library, the safety check, the sweep, the lock index).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Value};

use super::conn::Tls;
use super::guard::mono_ms;
use super::keys::SLOTS;

/// At most one rebuild this often, however many calls ask.
const REBUILD_EVERY_MS: i64 = 50;

struct Table {
    /// Slot → index into `nodes`; `u16::MAX`: no primary known.
    owner: Vec<u16>,
    nodes: Vec<(String, ConnectionManager)>,
}

/// The slot table and the primaries' connections.
pub struct Primaries {
    seeds: Vec<String>,
    timeout: Duration,
    tls: Tls,
    table: RwLock<Arc<Table>>,
    rebuilding: AtomicBool,
    last_rebuild: AtomicI64,
}

impl Primaries {
    /// Reads the slot table from the first seed that answers and connects
    /// to every primary.
    pub async fn connect(
        seeds: Vec<String>,
        timeout: Duration,
        tls: Tls,
    ) -> Result<Arc<Primaries>, RedisError> {
        let p = Arc::new(Primaries {
            seeds,
            timeout,
            tls,
            table: RwLock::new(Arc::new(Table {
                owner: vec![u16::MAX; SLOTS],
                nodes: vec![],
            })),
            rebuilding: AtomicBool::new(false),
            last_rebuild: AtomicI64::new(i64::MIN),
        });
        p.rebuild().await?;
        Ok(p)
    }

    fn table(&self) -> Arc<Table> {
        self.table
            .read()
            .map(|t| t.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// The address (`host:port`) of the primary serving `slot`, as a URL.
    pub fn url_of(&self, slot: u16) -> Option<String> {
        let table = self.table();
        let i = *table.owner.get(slot as usize)?;
        let (addr, _) = table.nodes.get(i as usize)?;
        Some(self.url(addr))
    }

    /// `cmd` on the primary serving `slot`. A redirect or a failed
    /// connection asks for a rebuild of the table (in the background).
    pub async fn query(self: &Arc<Self>, slot: u16, cmd: &redis::Cmd) -> Result<Value, RedisError> {
        let table = self.table();
        let Some((_, conn)) = table
            .owner
            .get(slot as usize)
            .and_then(|&i| table.nodes.get(i as usize))
        else {
            self.rebuild_soon();
            return Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("no primary known for slot {slot}"),
            )));
        };
        let mut conn = conn.clone();
        let r = cmd.query_async::<Value>(&mut conn).await;
        if let Err(e) = &r {
            if e.is_io_error()
                || e.is_connection_refusal()
                || e.is_connection_dropped()
                || matches!(
                    e.code(),
                    Some("MOVED" | "ASK" | "CLUSTERDOWN" | "READONLY" | "TRYAGAIN" | "MASTERDOWN")
                )
            {
                self.rebuild_soon();
            }
        }
        r
    }

    /// Starts a rebuild unless one runs or ran within the last
    /// [`REBUILD_EVERY_MS`].
    pub fn rebuild_soon(self: &Arc<Self>) {
        let now = mono_ms();
        let last = self.last_rebuild.load(Ordering::Relaxed);
        if now.saturating_sub(last) < REBUILD_EVERY_MS
            || self.rebuilding.swap(true, Ordering::Relaxed)
        {
            return;
        }
        self.last_rebuild.store(now, Ordering::Relaxed);
        let me = self.clone();
        tokio::spawn(async move {
            let _ = me.rebuild().await;
            me.rebuilding.store(false, Ordering::Relaxed);
        });
    }

    /// Reads `CLUSTER SLOTS` from a primary that answers (then the seeds)
    /// and swaps in the new table, keeping the connections of primaries it
    /// still names.
    async fn rebuild(&self) -> Result<(), RedisError> {
        let old = self.table();
        let mut ranges = None;
        let mut last_err = None;
        let known = old.nodes.iter().map(|(a, c)| (a.clone(), Some(c.clone())));
        let seeds = self.seeds.iter().map(|s| (s.clone(), None));
        for (addr, conn) in known.chain(seeds) {
            let conn = match conn {
                Some(c) => c,
                None => match self.open(&addr).await {
                    Ok(c) => c,
                    Err(e) => {
                        last_err = Some(e);
                        continue;
                    }
                },
            };
            let mut c = conn.clone();
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SLOTS");
            let slots = cmd.query_async::<Value>(&mut c);
            match tokio::time::timeout(self.timeout, slots).await {
                Ok(Ok(v)) => {
                    ranges = Some(parse_slots(&v));
                    break;
                }
                Ok(Err(e)) => last_err = Some(e),
                Err(_) => {}
            }
        }
        let Some(ranges) = ranges else {
            return Err(last_err.unwrap_or_else(|| {
                RedisError::from(std::io::Error::other(
                    "no cluster node answered CLUSTER SLOTS",
                ))
            }));
        };
        let mut nodes: Vec<(String, ConnectionManager)> = vec![];
        let mut owner = vec![u16::MAX; SLOTS];
        for (lo, hi, addr) in ranges {
            let i = match nodes.iter().position(|(a, _)| *a == addr) {
                Some(i) => i,
                None => {
                    let kept = old.nodes.iter().find(|(a, _)| *a == addr);
                    let conn = match kept {
                        Some((_, c)) => c.clone(),
                        None => match self.open(&addr).await {
                            Ok(c) => c,
                            Err(_) => continue,
                        },
                    };
                    nodes.push((addr, conn));
                    nodes.len() - 1
                }
            };
            for s in lo..=hi.min(SLOTS as u16 - 1) {
                owner[s as usize] = i as u16;
            }
        }
        let table = Arc::new(Table { owner, nodes });
        match self.table.write() {
            Ok(mut t) => *t = table,
            Err(e) => *e.into_inner() = table,
        }
        Ok(())
    }

    /// A connection to `addr` (`host:port`, or a seed URL), each attempt and
    /// reply bounded by a fraction of the timeout.
    async fn open(&self, addr: &str) -> Result<ConnectionManager, RedisError> {
        let url = self.url(addr);
        let client = if url.starts_with("rediss://") && self.tls.ca_bundle.is_some() {
            redis::Client::build_with_tls(url.as_str(), self.tls.certificates())?
        } else {
            redis::Client::open(url.as_str())?
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout / 4))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100));
        match tokio::time::timeout(
            self.timeout,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to {addr}"),
            ))),
        }
    }

    /// The URL of `addr` (`host:port`, or a seed's URL as it is): the
    /// seeds' scheme and credentials.
    fn url(&self, addr: &str) -> String {
        if addr.contains("://") {
            addr.to_string()
        } else {
            let scheme = if self.seeds.iter().any(|s| s.starts_with("rediss://")) {
                "rediss"
            } else {
                "redis"
            };
            // Credentials, if any, are the seeds'.
            let auth = self
                .seeds
                .first()
                .and_then(|s| s.split_once("://"))
                .and_then(|(_, rest)| rest.split_once('@'))
                .map(|(auth, _)| format!("{auth}@"))
                .unwrap_or_default();
            format!("{scheme}://{auth}{addr}")
        }
    }
}

/// `CLUSTER SLOTS` as (first slot, last slot, primary `host:port`).
fn parse_slots(v: &Value) -> Vec<(u16, u16, String)> {
    let Value::Array(ranges) = v else {
        return vec![];
    };
    let int = |v: Option<&Value>| match v {
        Some(Value::Int(i)) => Some(*i),
        _ => None,
    };
    ranges
        .iter()
        .filter_map(|r| {
            let Value::Array(parts) = r else { return None };
            let lo = int(parts.first())? as u16;
            let hi = int(parts.get(1))? as u16;
            let Some(Value::Array(primary)) = parts.get(2) else {
                return None;
            };
            let host = match primary.first()? {
                Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                Value::SimpleString(s) => s.clone(),
                _ => return None,
            };
            let port = int(primary.get(1))?;
            Some((lo, hi, format!("{host}:{port}")))
        })
        .collect()
}
