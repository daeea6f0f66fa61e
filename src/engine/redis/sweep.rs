//! The periodic reset task's side in Redis: the per-slot due index read
//! slot by slot, in leased shards so several sidecars share the work.

use futures_util::StreamExt;

use super::args;
use super::conn::{unavailable, Conn};
use super::keys::{self, LAYOUT};
use super::reply::{array, int, map_error, Ctx};
use super::RedisEngine;
use crate::engine::SweepReport;
use crate::error::{Cause, EngineError};

/// The due index is swept in this many shards of consecutive slots, each
/// under its own lease, so several sidecars share the work.
pub const SWEEP_SHARDS: usize = 16;
/// Customers one `reset_due_many` call resets (all of one slot, so the call
/// is cluster-safe). It bounds how long one sweep call holds Redis: a due
/// reset costs 30–70 µs inside Redis, so a batch stays near half a
/// millisecond, far under the 2 ms slow-command bound, while saving the
/// per-call invocation and round trip of one call per customer
/// (BENCHMARKS.md, the sweep).
pub const SWEEP_BATCH: usize = 8;
/// Sweep calls in flight at once: two keep Redis busy between round trips
/// without queueing more than one batch ahead of the decisions.
const SWEEP_CONCURRENCY: usize = 2;
/// How long a sweeper keeps a shard's lease (ms).
pub const SWEEP_LEASE_MS: u64 = 30_000;
/// Due customers read per slot and round.
const SWEEP_READ: usize = 100;
/// Slots read per pipelined round trip.
const SWEEP_PIPELINE: usize = 256;
/// How often the sweep looks at how busy Redis is without it.
const PACE_PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// How long it pauses to look (its own calls stopped).
const PACE_PROBE: std::time::Duration = std::time::Duration::from_millis(50);
/// Redis busier than this without the sweep (a fraction of a core) means
/// decisions are running: the sweep yields.
const PACE_BUSY: f64 = 0.05;
/// The share of each sweep lane's time spent in a call while it yields.
const PACE_SHARE: f64 = 0.01;
/// The longest pause after a call while yielding: the sweep never stops
/// (two lanes of 8 customers per 100 ms at least: 160 a second).
const PACE_MAX_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Paces the sweep by Redis's own load, so that it runs at full speed on an
/// idle server and yields to decisions on a busy one (BENCHMARKS.md, the
/// sweep). Every [`PACE_PROBE_EVERY`] it stops for [`PACE_PROBE`] and reads
/// Redis's CPU time (`INFO cpu`) across the pause: what Redis spent then
/// was for others. Busier than [`PACE_BUSY`], each sweep call is followed
/// by a pause that keeps the lane's share of its time at [`PACE_SHARE`]
/// (at most [`PACE_MAX_PAUSE`]). Correctness never waits on the sweep (a
/// customer's due resets apply lazily on its next request), so under load
/// it may take its time.
/// Standalone servers only (on a cluster each primary would need its own
/// probe): there the sweep runs unpaced.
struct Pacer {
    next_probe: std::time::Instant,
    yielding: bool,
}

impl Pacer {
    fn new() -> Pacer {
        Pacer {
            next_probe: std::time::Instant::now(),
            yielding: false,
        }
    }

    async fn probe(&mut self, engine: &RedisEngine) {
        if !matches!(engine.conn, Conn::Single(_)) || std::time::Instant::now() < self.next_probe {
            return;
        }
        let cpu = || async {
            let mut info = redis::cmd("INFO");
            info.arg("cpu");
            let v = engine
                .library
                .query(&super::library::Node::Routed, info)
                .await
                .ok()?;
            let text = match v {
                redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
                redis::Value::VerbatimString { text, .. } => text,
                _ => return None,
            };
            let field = |name: &str| -> Option<f64> {
                text.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse().ok())
            };
            Some(field("used_cpu_user:")? + field("used_cpu_sys:")?)
        };
        let started = std::time::Instant::now();
        let before = cpu().await;
        tokio::time::sleep(PACE_PROBE).await;
        let after = cpu().await;
        if let (Some(b), Some(a)) = (before, after) {
            let busy = (a - b) / started.elapsed().as_secs_f64();
            self.yielding = busy > PACE_BUSY;
        }
        self.next_probe = std::time::Instant::now() + PACE_PROBE_EVERY;
    }

    /// The pause after a call that took `took`.
    fn after(&self, took: std::time::Duration) -> Option<std::time::Duration> {
        self.yielding
            .then(|| took.mul_f64(1.0 / PACE_SHARE - 1.0).min(PACE_MAX_PAUSE))
    }
}

impl RedisEngine {
    /// One sweep call: `reset_due_many` on up to [`SWEEP_BATCH`] members of
    /// one slot's due index (customer tags). A customer that is gone has its
    /// entry dropped by the call. Returns (resets applied, customers gone).
    async fn sweep_batch(
        &self,
        due_key: &str,
        members: &[String],
    ) -> Result<(u64, u64), EngineError> {
        let customers: Vec<String> = members
            .iter()
            .map(|m| keys::customer_key_of_tag(&self.namespace, LAYOUT, m))
            .collect();
        let mut keys: Vec<&str> = Vec::with_capacity(customers.len() + 1);
        keys.push(due_key);
        keys.extend(customers.iter().map(String::as_str));
        let (_, now) = self.now();
        let a = self.argv(args::header::RETENTION, now);
        let v = self
            .library
            .fcall(&self.library.functions.reset_due_many, &keys, &a.into_vec())
            .await
            .map_err(|e| map_error(e, &Ctx::default()))?;
        let items = array(v)?;
        let field = |i: usize| items.get(i).map_or(Ok(0), int);
        let (resets, gone, at) = (field(0)?, field(1)?, field(2)?);
        self.note(at);
        Ok((resets.max(0) as u64, gone.max(0) as u64))
    }

    fn lease_key(&self, shard: usize) -> String {
        format!("{}{LAYOUT}sweep:{shard}", self.namespace)
    }

    /// Takes (or, if this sweeper already holds it, renews) a shard's lease:
    /// one atomic function (`lease`) on the lease key alone, so it is cluster-safe. A
    /// sweeper that dies mid-shard simply stops renewing: its lease lapses
    /// after [`SWEEP_LEASE_MS`] and the next sweep, anyone's, takes the shard.
    async fn lease(&self, shard: usize) -> Result<bool, EngineError> {
        let key = self.lease_key(shard);
        let took = self
            .library
            .fcall(
                &self.library.functions.lease,
                &[&key],
                &[self.sweeper_id.clone(), SWEEP_LEASE_MS.to_string()],
            )
            .await
            .map_err(unavailable)?;
        Ok(int(&took)? == 1)
    }

    /// Gives a shard's lease back if this sweeper still holds it, so the next
    /// sweep need not wait for it to lapse.
    async fn release_lease(&self, shard: usize) -> Result<(), EngineError> {
        let key = self.lease_key(shard);
        self.library
            .fcall(
                &self.library.functions.release,
                &[&key],
                std::slice::from_ref(&self.sweeper_id),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The customers due at or before `now` in the due-index keys `keys`:
    /// one pipelined round trip on a standalone server; on a cluster (where a
    /// pipeline may not cross slots) one concurrent query per key.
    async fn due_members(
        &self,
        keys: &[String],
        now: i64,
    ) -> Result<Vec<(String, String)>, EngineError> {
        let query = |k: &str| {
            let mut c = redis::cmd("ZRANGEBYSCORE");
            c.arg(k)
                .arg("-inf")
                .arg(now)
                .arg("LIMIT")
                .arg(0)
                .arg(SWEEP_READ);
            c
        };
        let mut conn = self.conn.clone();
        if let Conn::Cluster(_) = &self.conn {
            let mut tasks = tokio::task::JoinSet::new();
            for k in keys {
                let cmd = query(k);
                let mut conn = conn.clone();
                let k = k.clone();
                tasks.spawn(async move {
                    cmd.query_async::<Vec<String>>(&mut conn)
                        .await
                        .map(|m| (k, m))
                });
            }
            let mut out = vec![];
            while let Some(r) = tasks.join_next().await {
                let r = r.map_err(|e| EngineError::Internal(Cause::new(e)))?;
                let (k, members) = r.map_err(unavailable)?;
                out.extend(members.into_iter().map(|m| (k.clone(), m)));
            }
            return Ok(out);
        }
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.add_command(query(k));
        }
        let found: Vec<Vec<String>> = self
            .library
            .guard
            .call(None, false, pipe.query_async(&mut conn))
            .await
            .map_err(unavailable)?;
        Ok(keys
            .iter()
            .zip(found)
            .flat_map(|(k, ms)| ms.into_iter().map(move |m| (k.clone(), m)))
            .collect())
    }

    /// Reads the due index slot by slot (16 leased shards of 1024 slots) and
    /// applies `reset_due` to every customer due now. A customer's entry moves
    /// to its next due instant in the same call, so it is swept once.
    pub(super) async fn sweep(&self) -> Result<SweepReport, EngineError> {
        let mut report = SweepReport::default();
        let mut pacer = Pacer::new();
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
                    let due: Vec<(String, String)> = due
                        .into_iter()
                        .filter(|c| swept.insert(c.clone()))
                        .collect();
                    if due.is_empty() {
                        break;
                    }
                    // Members come grouped by slot; each batch is one
                    // slot's, a few calls in flight on the shared connection.
                    let mut batches: Vec<(&str, Vec<String>)> = vec![];
                    for (k, m) in &due {
                        match batches.last_mut() {
                            Some((bk, ms)) if *bk == k.as_str() && ms.len() < SWEEP_BATCH => {
                                ms.push(m.clone())
                            }
                            _ => batches.push((k.as_str(), vec![m.clone()])),
                        }
                    }
                    // Boxed: the trait's future must not carry the
                    // closure's higher-ranked lifetimes.
                    type Batch<'a> = std::pin::Pin<
                        Box<
                            dyn std::future::Future<Output = Result<(u64, u64), EngineError>>
                                + Send
                                + 'a,
                        >,
                    >;
                    pacer.probe(self).await;
                    let pacer = &pacer;
                    let calls: Vec<Batch<'_>> = batches
                        .iter()
                        .map(|(k, ms)| {
                            Box::pin(async move {
                                let started = std::time::Instant::now();
                                let r = self.sweep_batch(k, ms).await;
                                if let Some(pause) = pacer.after(started.elapsed()) {
                                    tokio::time::sleep(pause).await;
                                }
                                r
                            }) as Batch<'_>
                        })
                        .collect();
                    let results: Vec<Result<(u64, u64), EngineError>> =
                        futures_util::stream::iter(calls)
                            .buffer_unordered(SWEEP_CONCURRENCY)
                            .collect()
                            .await;
                    report.customers_swept += due.len() as u64;
                    for r in results {
                        let (resets, _gone) = r?;
                        report.resets_applied += resets;
                    }
                }
            }
            self.release_lease(shard).await?;
        }
        Ok(report)
    }
}
