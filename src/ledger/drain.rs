//! The drain: Redis streams → the ledger's database.
//!
//! Protocol (docs/ledger-store.md):
//! - `XGROUP CREATE <stream> creditgate-ledger 0 MKSTREAM` once per stream
//!   (`BUSYGROUP` ignored; at `0` so nothing written before is skipped);
//! - on start, and after any failure, this consumer's own pending entries
//!   are read again first (`XREADGROUP … 0`), after `XAUTOCLAIM` has moved
//!   to it every other consumer's entries idle for `claim_idle_ms` (a
//!   killed drain's); then new entries (`XREADGROUP … >`);
//! - entries are decoded and written with [`LedgerStore::insert_batch`] in
//!   one transaction; then, and only then, `XACK` and `XDEL` what it
//!   committed. A drain killed between the two writes again on restart: a
//!   no-op by the primary key. A database that fails leaves everything
//!   pending: nothing is acknowledged, the round is retried with backoff.
//! - an entry that does not decode is copied to `<stream>:dead` (same hash
//!   tag, so the same cluster slot) and acknowledged, so it cannot block
//!   the stream; it is logged.
//!
//! The backlog ([`backlog`]) is the streams' total `XLEN`: acknowledged
//! entries are deleted, so what is left is what is not in the database.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::streams::StreamReadReply;

use crate::ledger::codec;
use crate::ledger::store::{LedgerStore, StoreError};
use crate::ledger::LedgerEntry;

/// The consumer group every drain reads in.
pub const GROUP: &str = "creditgate-ledger";

/// Why a drain round failed (retried by [`Drain::run`]).
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("ledger drain: redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("ledger drain: {0}")]
    Store(#[from] StoreError),
}

/// How a drain reads.
#[derive(Debug, Clone)]
pub struct DrainOptions {
    /// This drain's consumer name in the group (stable across restarts, so
    /// a restarted drain finds its own pending entries).
    pub consumer: String,
    /// Entries read per stream per round, and so per database write at most.
    pub batch: usize,
    /// Another consumer's entry idle this long is claimed (ms).
    pub claim_idle_ms: u64,
    /// Pause after a round that found nothing.
    pub idle_poll: Duration,
    /// First pause after a failure (doubled up to 5 s).
    pub retry_min: Duration,
    /// Create the group on every stream first (`XGROUP CREATE … MKSTREAM`).
    /// Off for the every-slot drain of `serve`: the library creates a
    /// slot's stream with its group on its first entry, and 16,384 empty
    /// streams would only cost memory.
    pub create_groups: bool,
    /// Whether one pipeline may name streams of different slots: yes on a
    /// standalone server; no on a cluster, where the streams are asked for
    /// concurrently instead (the cluster client pipelines the commands it
    /// has in flight to each node, so a round is still a few round trips
    /// per primary).
    pub cross_slot_pipelines: bool,
    /// How often a busy drain looks at every stream's length again; in
    /// between, its rounds read only the streams the last look found
    /// non-empty. Zero: every round looks (a few streams). The every-slot
    /// drain looks every 250 ms: 16,384 `XLEN` are ~7 ms of Redis, which
    /// back-to-back rounds would pay dozens of times a second.
    pub scan_every: Duration,
    /// The shortest time from one busy round's start to the next: entries
    /// pile up meanwhile, so each stream read, acknowledgement and delete
    /// carries several (over 16,384 slot streams a customer's entries are
    /// spread thin). Zero: back to back.
    pub min_round: Duration,
}

impl Default for DrainOptions {
    fn default() -> Self {
        DrainOptions {
            consumer: "drain".into(),
            batch: 500,
            claim_idle_ms: 30_000,
            idle_poll: Duration::from_millis(100),
            retry_min: Duration::from_millis(50),
            create_groups: true,
            cross_slot_pipelines: true,
            scan_every: Duration::ZERO,
            min_round: Duration::ZERO,
        }
    }
}

/// How often the drain over every slot's stream looks at them all again
/// (when it found nothing, and while busy): each look is 16 pipelines of
/// 1,024 `XLEN`, ~4-7 ms of Redis (BENCHMARKS.md).
pub const EVERY_SLOT_LOOK: Duration = Duration::from_millis(250);

/// The every-slot drain's shortest busy round ([`DrainOptions::min_round`]):
/// an entry reaches the database within about this.
pub const EVERY_SLOT_MIN_ROUND: Duration = Duration::from_millis(1000);

impl DrainOptions {
    /// The drain over every slot's stream (`serve`, `creditgate ledger
    /// drain`): no group creation (the library creates a slot's stream with
    /// its group on its first entry; 16,384 empty streams would only cost
    /// memory), a look every [`EVERY_SLOT_LOOK`], busy rounds at most every
    /// [`EVERY_SLOT_MIN_ROUND`]; `cross_slot_pipelines` off on a cluster.
    pub fn every_slot(
        consumer: String,
        batch: usize,
        claim_idle_ms: u64,
        cross_slot_pipelines: bool,
    ) -> DrainOptions {
        DrainOptions {
            consumer,
            batch,
            claim_idle_ms,
            idle_poll: EVERY_SLOT_LOOK,
            scan_every: EVERY_SLOT_LOOK,
            min_round: EVERY_SLOT_MIN_ROUND,
            create_groups: false,
            cross_slot_pipelines,
            ..DrainOptions::default()
        }
    }
}

/// What the drain has done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainStats {
    /// Entries read and committed (including rewrites of stored ones).
    pub committed: u64,
    /// Of those, rows new in the database.
    pub inserted: u64,
    /// Entries that did not decode (moved to `<stream>:dead`).
    pub dead: u64,
    /// Rounds that failed and were retried.
    pub failures: u64,
}

/// Streams whose length one pipeline asks for (the every-slot drain asks
/// for 16,384 in 16 round trips).
const XLEN_CHUNK: usize = 1024;

/// Streams one read pipeline asks for (each answers up to `batch` entries).
const READ_CHUNK: usize = 64;

/// Runs `cmds` and answers their replies in order: one pipeline, or (when
/// a pipeline may not cross slots) every command concurrently.
async fn query_all<C: ConnectionLike + Clone + Send + Sync + 'static, T: redis::FromRedisValue>(
    conn: &mut C,
    cmds: Vec<redis::Cmd>,
    one_pipeline: bool,
) -> Result<Vec<T>, redis::RedisError> {
    if one_pipeline {
        let mut pipe = redis::pipe();
        for c in cmds {
            pipe.add_command(c);
        }
        return pipe.query_async(conn).await;
    }
    futures_util::future::try_join_all(cmds.into_iter().map(|c| {
        let mut conn = conn.clone();
        async move { c.query_async::<T>(&mut conn).await }
    }))
    .await
}

/// One drain over a set of stream keys, on a standalone server
/// ([`ConnectionManager`]) or a cluster (any [`ConnectionLike`] that routes
/// each key to its node).
pub struct Drain<C = ConnectionManager> {
    conn: C,
    store: LedgerStore,
    streams: Vec<String>,
    opts: DrainOptions,
    /// Read this consumer's pending entries (`0`) before new ones (`>`).
    recovering: bool,
    last_claim: Option<std::time::Instant>,
    /// The streams the last look found non-empty, and when it looked.
    known: Vec<String>,
    last_scan: Option<std::time::Instant>,
    pub stats: DrainStats,
    status: Arc<DrainStatus>,
}

/// What a running drain shows outside (`/readyz`, `/metrics`): updated
/// every round.
#[derive(Debug, Default)]
pub struct DrainStatus {
    /// Entries in the streams at the last round's start (not yet in the
    /// database), or `u64::MAX` before the first round.
    backlog: AtomicU64,
    /// Whether the last round failed (Redis or the database).
    failing: AtomicBool,
    /// Entries committed since start.
    committed: AtomicU64,
}

impl DrainStatus {
    fn new() -> DrainStatus {
        DrainStatus {
            backlog: AtomicU64::new(u64::MAX),
            ..DrainStatus::default()
        }
    }

    /// The backlog at the last round, `None` before the first.
    pub fn backlog(&self) -> Option<u64> {
        Some(self.backlog.load(Ordering::Relaxed)).filter(|n| *n != u64::MAX)
    }

    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> Drain<C> {
    pub fn new(conn: C, store: LedgerStore, streams: Vec<String>, opts: DrainOptions) -> Drain<C> {
        Drain {
            conn,
            store,
            streams,
            opts,
            recovering: true,
            last_claim: None,
            known: vec![],
            last_scan: None,
            stats: DrainStats::default(),
            status: Arc::new(DrainStatus::new()),
        }
    }

    /// What this drain shows while it runs.
    pub fn status(&self) -> Arc<DrainStatus> {
        self.status.clone()
    }

    /// Creates the group on every stream (idempotent), when
    /// [`DrainOptions::create_groups`].
    pub async fn prepare(&mut self) -> Result<(), DrainError> {
        if !self.opts.create_groups {
            return Ok(());
        }
        for s in &self.streams {
            let r: Result<(), _> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(s)
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut self.conn)
                .await;
            match r {
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                other => other?,
            }
        }
        Ok(())
    }

    /// The streams holding entries (pending ones included: an entry is
    /// deleted only once committed), by pipelined `XLEN`.
    async fn non_empty(&mut self) -> Result<Vec<String>, DrainError> {
        let lens = lengths(
            &mut self.conn,
            &self.streams,
            self.opts.cross_slot_pipelines,
        )
        .await?;
        self.status
            .backlog
            .store(lens.iter().sum(), Ordering::Relaxed);
        Ok(self
            .streams
            .iter()
            .zip(lens)
            .filter(|(_, n)| *n > 0)
            .map(|(s, _)| s.clone())
            .collect())
    }

    /// Moves other consumers' entries idle for `claim_idle_ms` to this one.
    async fn claim(&mut self, streams: &[String]) -> Result<(), DrainError> {
        for s in streams {
            let mut cursor = "0-0".to_string();
            loop {
                let (next, ids, _deleted): (String, Vec<String>, Vec<String>) =
                    redis::cmd("XAUTOCLAIM")
                        .arg(s)
                        .arg(GROUP)
                        .arg(&self.opts.consumer)
                        .arg(self.opts.claim_idle_ms)
                        .arg(&cursor)
                        .arg("COUNT")
                        .arg(self.opts.batch)
                        .arg("JUSTID")
                        .query_async(&mut self.conn)
                        .await?;
                if !ids.is_empty() {
                    self.recovering = true;
                }
                if next == "0-0" {
                    break;
                }
                cursor = next;
            }
        }
        self.last_claim = Some(std::time::Instant::now());
        Ok(())
    }

    /// One round: claim if due, read up to `batch` entries per stream,
    /// write them, acknowledge and delete them. Returns how many entries
    /// were committed.
    pub async fn round(&mut self) -> Result<usize, DrainError> {
        let look = self.recovering
            || self
                .last_scan
                .is_none_or(|t| t.elapsed() >= self.opts.scan_every);
        if look {
            self.known = self.non_empty().await?;
            self.last_scan = Some(std::time::Instant::now());
        }
        let streams = std::mem::take(&mut self.known);
        let claim_every = Duration::from_millis(self.opts.claim_idle_ms.max(100));
        if self.last_claim.is_none_or(|t| t.elapsed() >= claim_every) {
            self.claim(&streams).await?;
        }
        let start = if self.recovering { "0" } else { ">" };
        let mut entries: Vec<LedgerEntry> = Vec::new();
        let mut done: HashMap<String, Vec<String>> = HashMap::new();
        let mut dead: Vec<(String, String, String)> = Vec::new();
        // One pipeline per chunk of streams (no BLOCK: a multiplexed
        // connection shared with decisions must never wait on one).
        for chunk in streams.chunks(READ_CHUNK) {
            let cmds = chunk
                .iter()
                .map(|s| {
                    let mut c = redis::cmd("XREADGROUP");
                    c.arg("GROUP")
                        .arg(GROUP)
                        .arg(&self.opts.consumer)
                        .arg("COUNT")
                        .arg(self.opts.batch)
                        .arg("STREAMS")
                        .arg(s)
                        .arg(start);
                    c
                })
                .collect();
            let replies: Vec<Option<StreamReadReply>> =
                query_all(&mut self.conn, cmds, self.opts.cross_slot_pipelines).await?;
            for (s, reply) in chunk.iter().zip(replies) {
                for key in reply.map(|r| r.keys).unwrap_or_default() {
                    for id in key.ids {
                        // A pending entry deleted meanwhile comes back empty.
                        if let Some(raw) = id.get::<String>(codec::STREAM_FIELD) {
                            match codec::decode(&id.id, &raw) {
                                Ok(e) => entries.push(e),
                                Err(err) => {
                                    tracing::error!(stream = %s, id = %id.id, error = %err,
                                        "ledger entry does not decode: moved to the dead-letter stream");
                                    dead.push((s.clone(), id.id.clone(), raw));
                                }
                            }
                        }
                        done.entry(s.clone()).or_default().push(id.id);
                    }
                }
            }
        }
        // Until the next look, read again only where entries were found
        // (after reading pending entries, everywhere: new ones wait there).
        self.known = if self.recovering {
            streams
        } else {
            streams
                .into_iter()
                .filter(|s| done.contains_key(s))
                .collect()
        };
        if done.is_empty() {
            // Nothing pending left: read new entries from now on.
            self.recovering = false;
            return Ok(0);
        }
        let inserted = self.store.insert_batch(&entries).await?;
        // Committed: only now acknowledge and delete.
        let mut cmds = vec![];
        for (s, id, raw) in &dead {
            let mut c = redis::cmd("XADD");
            c.arg(format!("{s}:dead"))
                .arg("*")
                .arg("id")
                .arg(id)
                .arg(codec::STREAM_FIELD)
                .arg(raw);
            cmds.push(c);
        }
        for (s, ids) in &done {
            let mut ack = redis::cmd("XACK");
            ack.arg(s).arg(GROUP).arg(ids);
            let mut del = redis::cmd("XDEL");
            del.arg(s).arg(ids);
            cmds.extend([ack, del]);
        }
        let _: Vec<redis::Value> =
            query_all(&mut self.conn, cmds, self.opts.cross_slot_pipelines).await?;
        self.stats.committed += entries.len() as u64;
        self.status
            .committed
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        self.stats.inserted += inserted;
        self.stats.dead += dead.len() as u64;
        Ok(entries.len() + dead.len())
    }

    /// Runs rounds until `shutdown` completes; a failed round is logged and
    /// retried with backoff (nothing is acknowledged that is not committed).
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> DrainStats {
        tokio::pin!(shutdown);
        let mut backoff = self.opts.retry_min;
        let mut prepared = false;
        loop {
            let began = std::time::Instant::now();
            // A round that found nothing pending turns to new entries: the
            // next one reads them at once.
            let was_recovering = self.recovering;
            let step = async {
                if !prepared {
                    self.prepare().await?;
                }
                self.round().await
            };
            let pause = tokio::select! {
                _ = &mut shutdown => return self.stats,
                r = step => match r {
                    Ok(n) => {
                        prepared = true;
                        self.status.failing.store(false, Ordering::Relaxed);
                        backoff = self.opts.retry_min;
                        if n > 0 {
                            self.opts.min_round.saturating_sub(began.elapsed())
                        } else if was_recovering {
                            Duration::ZERO
                        } else {
                            self.opts.idle_poll
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "ledger drain round failed; retrying");
                        self.stats.failures += 1;
                        self.status.failing.store(true, Ordering::Relaxed);
                        self.recovering = true;
                        let b = backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        b
                    }
                },
            };
            if !pause.is_zero() {
                tokio::select! {
                    _ = &mut shutdown => return self.stats,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }

    /// See [`backlog`].
    pub async fn backlog(&mut self) -> Result<u64, DrainError> {
        let lens = lengths(
            &mut self.conn,
            &self.streams,
            self.opts.cross_slot_pipelines,
        )
        .await?;
        Ok(lens.iter().sum())
    }
}

/// Every stream's `XLEN`, in order, [`XLEN_CHUNK`] per pipeline (or
/// concurrently when a pipeline may not cross slots).
async fn lengths<C: ConnectionLike + Clone + Send + Sync + 'static>(
    conn: &mut C,
    streams: &[String],
    one_pipeline: bool,
) -> Result<Vec<u64>, DrainError> {
    let mut out = Vec::with_capacity(streams.len());
    for chunk in streams.chunks(XLEN_CHUNK) {
        let cmds = chunk
            .iter()
            .map(|s| {
                let mut c = redis::cmd("XLEN");
                c.arg(s);
                c
            })
            .collect();
        out.extend(query_all::<C, u64>(conn, cmds, one_pipeline).await?);
    }
    Ok(out)
}

/// Entries in the streams not yet in the database (unread or unacknowledged):
/// the sum of `XLEN` (acknowledged entries are deleted). Pipelines cross
/// slots: a standalone server.
pub async fn backlog<C: ConnectionLike + Clone + Send + Sync + 'static>(
    conn: &mut C,
    streams: &[String],
) -> Result<u64, DrainError> {
    Ok(lengths(conn, streams, true).await?.iter().sum())
}
