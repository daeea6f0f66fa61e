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
//!   failures: they never trip it.
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

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
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
    failures: AtomicU32,
    open: AtomicBool,
    /// Wakes the background task when the breaker opens.
    pub(crate) opened: Notify,
    /// Lower bound of (Redis `TIME` − [`mono_ms`]), min over the primaries;
    /// [`UNKNOWN`] when no usable measurement exists.
    offset: AtomicI64,
    /// Why the store is unsafe to serve from (eviction turned on), if it is.
    pub(crate) unsafe_reason: Mutex<Option<String>>,
}

impl Guard {
    pub fn new(timeout: Duration, accept_eviction: bool) -> Arc<Guard> {
        Arc::new(Guard {
            timeout,
            accept_eviction,
            failures: AtomicU32::new(0),
            open: AtomicBool::new(false),
            opened: Notify::new(),
            offset: AtomicI64::new(UNKNOWN),
            unsafe_reason: Mutex::new(None),
        })
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    /// Runs one call within the bound and the breaker. `probe`: the
    /// breaker's own probe, sent while it is open.
    pub(crate) async fn call<T>(
        &self,
        probe: bool,
        fut: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, RedisError> {
        if !probe && self.is_open() {
            return Err(refused(CIRCUIT_OPEN));
        }
        let r = match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(timed_out()),
        };
        match &r {
            Err(e) if is_transport(e) => self.failed(),
            _ => self.succeeded(),
        }
        r
    }

    fn failed(&self) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= BREAKER_THRESHOLD && !self.open.swap(true, Ordering::Relaxed) {
            tracing::error!(
                failures = n,
                "Redis failed {n} times in a row: circuit open, requests refused unsent until a probe succeeds"
            );
            self.opened.notify_one();
        }
    }

    fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if self.open.swap(false, Ordering::Relaxed) {
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
        let g = Guard::new(Duration::from_millis(50), false);
        for _ in 0..BREAKER_THRESHOLD {
            let r: Result<(), _> = g.call(false, async { Err(timed_out()) }).await;
            assert!(r.unwrap_err().is_timeout());
        }
        assert!(g.is_open());
        let sent = std::cell::Cell::new(false);
        let r: Result<(), _> = g
            .call(false, async {
                sent.set(true);
                Ok(())
            })
            .await;
        assert!(r.unwrap_err().is_connection_refusal());
        assert!(!sent.get(), "an open breaker sends nothing");
        let r: Result<(), _> = g.call(true, async { Ok(()) }).await;
        assert!(r.is_ok());
        assert!(!g.is_open(), "a successful probe closes it");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_is_bounded_by_the_timeout() {
        let g = Guard::new(Duration::from_millis(300), false);
        let r: Result<(), _> = g
            .call(false, async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok(())
            })
            .await;
        let e = r.unwrap_err();
        assert!(e.is_timeout() && !e.is_connection_refusal());
    }

    #[test]
    fn the_deadline_is_the_lower_bound_of_the_offset_plus_four_fifths_of_the_timeout() {
        let g = Guard::new(Duration::from_millis(300), false);
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
