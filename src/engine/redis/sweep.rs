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
                    let calls: Vec<Batch<'_>> = batches
                        .iter()
                        .map(|(k, ms)| Box::pin(self.sweep_batch(k, ms)) as Batch<'_>)
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
