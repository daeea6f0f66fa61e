//! What stands between a request and a Redis that is slow, gone or unsafe:
//! one bound on every call, a circuit breaker, the deadline each call
//! carries on Redis's own clock, and the safety state the background check
//! keeps (docs/store-failures.md).
//!
//! - **The bound.** Every call is raced against `timeout`. The client's own
//!   timeouts bound each attempt, but a request that waits on a reconnect
//!   (with its backoff) could wait several of them; this one cannot.
//! - **The breaker.** [`BREAKER_THRESHOLD`] transport failures in a row
//!   open it: calls are refused at once, unsent (an honest "not applied"),
//!   and the background task probes Redis every [`PROBE_EVERY`] until one
//!   answers, then closes it. Function errors and `-OOM` are answers, not
//!   failures: they never trip it. On a standalone server there is one
//!   breaker; on a cluster one per hash slot, so a primary that fails (and
//!   its customers) never stops the other shards' customers.
//! - **The deadline.** A call that Redis starts after the client stopped
//!   waiting must not apply: the header's `now` carries `@<deadline>`, on
//!   Redis `TIME` (lua/README.md § 5). The offset between this process's
//!   monotonic clock and Redis `TIME` is measured with a `TIME` round trip
//!   at connect and on every safety check; its lower bound (`TIME` minus
//!   the local instant the reply arrived) makes the deadline never later
//!   than the instant the client gives up, on Redis's clock. When no
//!   measurement is narrower than half the timeout (a slow link, Redis far
//!   away), no deadline is sent: a timed-out call's outcome then stays
//!   unknown until its retry settles it.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use redis::RedisError;
use tokio::sync::Notify;

/// Transport failures in a row that open the breaker.
pub const BREAKER_THRESHOLD: u32 = 5;

/// How often an open breaker probes Redis.
pub const PROBE_EVERY: Duration = Duration::from_millis(100);

/// The message a call refused by the open breaker carries.
pub const CIRCUIT_OPEN: &str = "circuit open: Redis failed repeatedly; not sent (probing)";

/// The message of a call that got no reply within the timeout.
pub const NO_REPLY: &str = "no reply within redis_timeout_ms";

const UNKNOWN: i64 = i64::MIN;

/// Hash slots of a cluster.
const SLOTS: usize = 16384;

/// One breaker: transport failures in a row, and whether it is open.
#[derive(Default)]
struct Breaker {
    failures: AtomicU32,
    open: AtomicBool,
}

/// Milliseconds on this process's monotonic clock.
pub fn mono_ms() -> i64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as i64
}

/// Shared by every clone of the library on one connection.
pub struct Guard {
    pub timeout: Duration,
    /// Serve from a server that may evict (startup and the safety check
    /// then only warn).
    pub accept_eviction: bool,
    /// One on a standalone server, one per hash slot on a cluster.
    breakers: Box<[Breaker]>,
    /// How many breakers are open.
    open: AtomicUsize,
    /// Wakes the background task when the breaker opens.
    pub(crate) opened: Notify,
    /// Lower bound of (Redis `TIME` − [`mono_ms`]), min over the primaries;
    /// [`UNKNOWN`] when no usable measurement exists.
    offset: AtomicI64,
    /// Why the store is unsafe to serve from (eviction turned on), if it is.
    pub(crate) unsafe_reason: Mutex<Option<String>>,
    /// When the probe last made the cluster client reread the topology.
    pub(crate) last_nudge: AtomicI64,
}

impl Guard {
    /// `cluster`: one breaker per hash slot.
    pub fn new(timeout: Duration, accept_eviction: bool, cluster: bool) -> Arc<Guard> {
        let n = if cluster { SLOTS } else { 1 };
        Arc::new(Guard {
            timeout,
            accept_eviction,
            breakers: (0..n).map(|_| Breaker::default()).collect(),
            open: AtomicUsize::new(0),
            opened: Notify::new(),
            offset: AtomicI64::new(UNKNOWN),
            unsafe_reason: Mutex::new(None),
            last_nudge: AtomicI64::new(i64::MIN / 2),
        })
    }

    /// Whether any breaker is open.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed) > 0
    }

    /// The cluster's slots whose breakers are open (`[0]` on a standalone
    /// server when its breaker is).
    pub fn open_slots(&self) -> Vec<u16> {
        if !self.is_open() {
            return vec![];
        }
        (0..self.breakers.len())
            .filter(|&i| self.breakers[i].open.load(Ordering::Relaxed))
            .map(|i| i as u16)
            .collect()
    }

    /// The breaker a call on `slot` goes through: the one on a standalone
    /// server; on a cluster the slot's, none for a call on no slot (a
    /// command to a named node).
    fn breaker(&self, slot: Option<u16>) -> Option<&Breaker> {
        match self.breakers.len() {
            1 => self.breakers.first(),
            _ => slot.and_then(|s| self.breakers.get(s as usize)),
        }
    }

    /// Runs one call on `slot` within the bound and that slot's breaker.
    /// `probe`: the breaker's own probe, sent while it is open.
    pub(crate) async fn call<T>(
        &self,
        slot: Option<u16>,
        probe: bool,
        fut: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, RedisError> {
        let breaker = self.breaker(slot);
        if !probe && breaker.is_some_and(|b| b.open.load(Ordering::Relaxed)) {
            return Err(refused(CIRCUIT_OPEN));
        }
        let r = match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(timed_out()),
        };
        if let Some(b) = breaker {
            match &r {
                Err(e) if is_transport(e) => self.failed(b),
                _ => self.succeeded(b),
            }
        }
        r
    }

    fn failed(&self, b: &Breaker) {
        let n = b.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= BREAKER_THRESHOLD && !b.open.swap(true, Ordering::Relaxed) {
            if self.open.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::error!(
                    failures = n,
                    "Redis failed {n} times in a row: circuit open, requests refused unsent until a probe succeeds"
                );
            }
            self.opened.notify_one();
        }
    }

    fn succeeded(&self, b: &Breaker) {
        if b.failures.load(Ordering::Relaxed) != 0 {
            b.failures.store(0, Ordering::Relaxed);
        }
        if b.open.load(Ordering::Relaxed)
            && b.open.swap(false, Ordering::Relaxed)
            && self.open.fetch_sub(1, Ordering::Relaxed) == 1
        {
            tracing::warn!("Redis answers again: circuit closed");
        }
    }

    /// Records a `TIME` round trip: `sent` and `received` on [`mono_ms`],
    /// `redis_ms` what Redis answered. Narrow enough measurements update the
    /// offset's lower bound (the smallest over the primaries of one round).
    pub(crate) fn offsets(&self, samples: &[(i64, i64, i64)]) {
        let limit = self.timeout.as_millis() as i64 / 2;
        let mut lower: Option<i64> = None;
        for &(sent, redis_ms, received) in samples {
            if received - sent >= limit {
                self.offset.store(UNKNOWN, Ordering::Relaxed);
                tracing::warn!(
                    round_trip_ms = received - sent,
                    "a TIME round trip took half the store timeout or more: calls carry no deadline until one is faster"
                );
                return;
            }
            let o = redis_ms - received;
            lower = Some(lower.map_or(o, |l| l.min(o)));
        }
        if let Some(o) = lower {
            self.offset.store(o, Ordering::Relaxed);
        }
    }

    /// The header's `now` with the deadline of a call sent now: on Redis's
    /// clock, a fifth of the timeout before this process gives up, so a call
    /// that starts just before it still has its reply back in time.
    pub fn with_deadline(&self, now: String) -> String {
        let offset = self.offset.load(Ordering::Relaxed);
        if offset == UNKNOWN {
            return now;
        }
        let budget = self.timeout.as_millis() as i64;
        let deadline = mono_ms() + offset + budget - budget / 5;
        format!("{now}@{deadline}")
    }

    pub fn unsafe_reason(&self) -> Option<String> {
        self.unsafe_reason.lock().map(|r| r.clone()).unwrap_or(None)
    }
}

/// A failure of the transport (not an answer from Redis).
pub fn is_transport(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

/// An error for a call refused before it was sent.
fn refused(msg: &'static str) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::ConnectionRefused,
        msg,
    ))
}

fn timed_out() -> RedisError {
    RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, NO_REPLY))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_breaker_opens_after_the_threshold_and_refuses_unsent() {
        let g = Guard::new(Duration::from_millis(50), false, false);
        for _ in 0..BREAKER_THRESHOLD {
            let r: Result<(), _> = g.call(None, false, async { Err(timed_out()) }).await;
            assert!(r.unwrap_err().is_timeout());
        }
        assert!(g.is_open());
        assert_eq!(g.open_slots(), vec![0]);
        let sent = std::cell::Cell::new(false);
        let r: Result<(), _> = g
            .call(Some(7), false, async {
                sent.set(true);
                Ok(())
            })
            .await;
        assert!(r.unwrap_err().is_connection_refusal());
        assert!(!sent.get(), "an open breaker sends nothing");
        let r: Result<(), _> = g.call(None, true, async { Ok(()) }).await;
        assert!(r.is_ok());
        assert!(!g.is_open(), "a successful probe closes it");
    }

    #[tokio::test]
    async fn on_a_cluster_a_failing_slot_opens_only_its_own_breaker() {
        let g = Guard::new(Duration::from_millis(50), false, true);
        for _ in 0..BREAKER_THRESHOLD {
            let _: Result<(), _> = g.call(Some(5), false, async { Err(timed_out()) }).await;
        }
        assert_eq!(g.open_slots(), vec![5]);
        let r: Result<(), _> = g.call(Some(5), false, async { Ok(()) }).await;
        assert!(r.unwrap_err().is_connection_refusal());
        let r: Result<(), _> = g.call(Some(6), false, async { Ok(()) }).await;
        assert!(r.is_ok(), "another slot's calls go through");
        let r: Result<(), _> = g.call(None, false, async { Ok(()) }).await;
        assert!(r.is_ok(), "a command on no slot has no breaker");
        let _: Result<(), _> = g.call(Some(5), true, async { Ok(()) }).await;
        assert!(!g.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_is_bounded_by_the_timeout() {
        let g = Guard::new(Duration::from_millis(300), false, false);
        let r: Result<(), _> = g
            .call(None, false, async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok(())
            })
            .await;
        let e = r.unwrap_err();
        assert!(e.is_timeout() && !e.is_connection_refusal());
    }

    #[test]
    fn the_deadline_is_the_lower_bound_of_the_offset_plus_four_fifths_of_the_timeout() {
        let g = Guard::new(Duration::from_millis(300), false, false);
        assert_eq!(
            g.with_deadline("5".into()),
            "5",
            "no measurement, no deadline"
        );
        // Sent at 100, Redis said 10_050, received at 110: offset in
        // [9_940, 9_950]; the lower bound is 9_940, the smaller of two nodes'.
        g.offsets(&[(100, 10_050, 110), (100, 10_045, 104)]);
        let now = mono_ms();
        let d: i64 = g.with_deadline(String::new())[1..].parse().unwrap();
        assert!((d - (now + 9_940 + 240)).abs() <= 1, "{d}");
        // A round trip of half the timeout or more: no deadline at all.
        g.offsets(&[(0, 10_000, 150)]);
        assert_eq!(g.with_deadline("".into()), "");
    }
}
