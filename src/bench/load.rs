//! The load driver: lanes (one connection each, or several lanes sharing a
//! multiplexed connection), closed-loop saturation or a fixed offered rate,
//! warm-up, duration or request count, HDR latency, errors by kind, and the
//! ledger every answer is written into.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::books::LiveLedger;
use super::progress::Progress;

/// What one request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// `POST /v1/balances.check`, dry run.
    Check,
    /// `POST /v1/balances.check` with `send_event: true`.
    Consume,
    /// `POST /v1/track` (overage `cap`).
    Track,
    /// `/v1/gate` with `X-Customer-Id` / `X-Feature-Id`.
    Gate,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Check => "check",
            Op::Consume => "consume",
            Op::Track => "track",
            Op::Gate => "gate",
        }
    }

    /// Whether the request may charge (its outcome matters to the books).
    pub fn charges(self) -> bool {
        !matches!(self, Op::Check)
    }
}

/// Ops by weight: `check=1,consume=3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mix(pub Vec<(Op, u32)>);

impl Mix {
    pub fn one(op: Op) -> Mix {
        Mix(vec![(op, 1)])
    }

    pub fn parse(s: &str) -> Result<Mix, String> {
        let mut v = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, w) = part.split_once('=').unwrap_or((part, "1"));
            let op = <Op as clap::ValueEnum>::from_str(name.trim(), true)
                .map_err(|_| format!("unknown op {name:?} (check, consume, track, gate)"))?;
            let w: u32 = w
                .trim()
                .parse()
                .map_err(|_| format!("weight of {name} must be a whole number"))?;
            if w > 0 {
                v.push((op, w));
            }
        }
        if v.is_empty() {
            return Err("the mix names no op with a weight above 0".into());
        }
        Ok(Mix(v))
    }

    fn pick(&self, r: u64) -> Op {
        let total: u64 = self.0.iter().map(|(_, w)| *w as u64).sum();
        let mut x = r % total;
        for (op, w) in &self.0 {
            if x < *w as u64 {
                return *op;
            }
            x -= *w as u64;
        }
        self.0[0].0
    }

    pub fn describe(&self) -> String {
        if self.0.len() == 1 {
            return self.0[0].0.as_str().to_string();
        }
        self.0
            .iter()
            .map(|(o, w)| format!("{}={w}", o.as_str()))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn has(&self, op: Op) -> bool {
        self.0.iter().any(|(o, _)| *o == op)
    }
}

/// One request.
#[derive(Debug, Clone, Copy)]
pub struct Req {
    pub customer: usize,
    pub op: Op,
}

/// An answer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reply {
    pub allowed: bool,
    /// Raw, pool units: what the answer says it charged (0 for a dry run or
    /// a denial).
    pub charged: i64,
    /// The balance a denial's answer showed, when it shows one.
    pub remaining: Option<i64>,
    /// `false` for a dry run (a denial then is still checked).
    pub charging: bool,
}

/// A request that got no answer the books can use.
#[derive(Debug, Clone)]
pub enum Fail {
    /// An HTTP error status with the body's `code`.
    Status(u16, String),
    /// An engine error code (redis mode).
    Engine(String),
    Timeout,
    /// Could not connect: nothing was sent.
    Connect(String),
    /// The connection failed after the request may have been sent.
    Transport(String),
    /// An answer the bench could not read.
    Decode(String),
}

impl Fail {
    pub fn kind(&self) -> String {
        match self {
            Fail::Status(s, c) if c.is_empty() => format!("http {s}"),
            Fail::Status(s, c) => format!("http {s} {c}"),
            Fail::Engine(c) => format!("engine {c}"),
            Fail::Timeout => "timeout".into(),
            Fail::Connect(_) => "connect error".into(),
            Fail::Transport(_) => "connection error".into(),
            Fail::Decode(_) => "unreadable answer".into(),
        }
    }

    /// Whether the request may have charged anyway.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            Fail::Timeout | Fail::Transport(_) | Fail::Decode(_) => true,
            Fail::Status(_, c) | Fail::Engine(c) => {
                c == "store_unavailable" || c == "internal_error" || c.is_empty()
            }
            Fail::Connect(_) => false,
        }
    }
}

/// Something the load can be pointed at.
pub trait Target: Send + Sync + 'static {
    /// A lane's connection state.
    type Conn: Send + 'static;
    /// Opens (or shares) lane `lane`'s connection.
    fn open(&self, lane: usize) -> impl Future<Output = Result<Self::Conn, String>> + Send;
    fn call(
        &self,
        conn: &mut Self::Conn,
        req: Req,
    ) -> impl Future<Output = Result<Reply, Fail>> + Send;
    /// After a timeout: drop whatever the abandoned request left behind.
    fn abandon(&self, _conn: &mut Self::Conn) {}
}

/// How to drive one row.
#[derive(Debug, Clone)]
pub struct Spec {
    pub label: String,
    /// Concurrent request loops.
    pub lanes: usize,
    pub customers: usize,
    pub mix: Mix,
    pub duration: Option<Duration>,
    /// Measured requests (after the warm-up), instead of a duration.
    pub requests: Option<u64>,
    pub warmup: Duration,
    /// Offered rate (req/s, all lanes together); `None`: closed loop.
    pub rate: Option<f64>,
    pub timeout: Duration,
    /// What one charging request costs (raw, pool units).
    pub cost: i64,
    pub seed: u64,
}

/// What a row measured.
#[derive(Debug, Clone)]
pub struct Measured {
    pub label: String,
    /// Microseconds; from the intended send time under a fixed rate.
    pub hist: Histogram<u64>,
    pub ok: u64,
    pub allowed: u64,
    pub denied: u64,
    pub errors: BTreeMap<String, u64>,
    pub elapsed: Duration,
    /// Requests sent in the warm-up (not measured, but in the books).
    pub warmup_requests: u64,
}

impl Measured {
    pub fn empty(label: &str) -> Measured {
        Measured {
            label: label.to_string(),
            hist: new_hist(),
            ok: 0,
            allowed: 0,
            denied: 0,
            errors: BTreeMap::new(),
            elapsed: Duration::ZERO,
            warmup_requests: 0,
        }
    }

    /// Adds another round of the same row.
    pub fn merge(&mut self, o: &Measured) {
        let _ = self.hist.add(&o.hist);
        self.ok += o.ok;
        self.allowed += o.allowed;
        self.denied += o.denied;
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_insert(0) += v;
        }
        self.elapsed += o.elapsed;
        self.warmup_requests += o.warmup_requests;
    }

    pub fn throughput(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.ok as f64 / s
        } else {
            0.0
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

/// Counters the progress display reads.
#[derive(Default)]
pub struct Live {
    pub done: AtomicU64,
    pub errors: AtomicU64,
    pub stop: AtomicBool,
    issued: AtomicU64,
}

struct LaneOut {
    hist: Histogram<u64>,
    ok: u64,
    allowed: u64,
    denied: u64,
    errors: BTreeMap<String, u64>,
    warmup: u64,
    last: Instant,
}

/// xorshift64*: cheap and good enough to pick customers and ops.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() >> 11) % n.max(1) as u64) as usize
    }
}

/// Runs one row: stop issuing at the end, wait for what is in flight, so
/// every sent request is either answered or reported as unknown.
pub async fn run<T: Target>(
    target: Arc<T>,
    spec: &Spec,
    ledger: Option<Arc<LiveLedger>>,
    progress: &Progress,
) -> Measured {
    let live = Arc::new(Live::default());
    let start = Instant::now();
    let warm_end = start + spec.warmup;
    let bar = progress.load_bar(spec, live.clone());
    if let Some(d) = spec.duration {
        let live = live.clone();
        let end = warm_end + d;
        tokio::spawn(async move {
            tokio::time::sleep_until(end.into()).await;
            live.stop.store(true, Ordering::Relaxed);
        });
    }
    let mut handles = Vec::with_capacity(spec.lanes);
    for lane in 0..spec.lanes {
        let (target, live, ledger, spec) =
            (target.clone(), live.clone(), ledger.clone(), spec.clone());
        handles.push(tokio::spawn(async move {
            run_lane(
                &*target,
                lane,
                &spec,
                &live,
                ledger.as_deref(),
                start,
                warm_end,
            )
            .await
        }));
    }
    let mut m = Measured::empty(&spec.label);
    let mut last = warm_end;
    for h in handles {
        match h.await {
            Ok(o) => {
                let _ = m.hist.add(&o.hist);
                m.ok += o.ok;
                m.allowed += o.allowed;
                m.denied += o.denied;
                m.warmup_requests += o.warmup;
                for (k, v) in o.errors {
                    *m.errors.entry(k).or_insert(0) += v;
                }
                last = last.max(o.last);
            }
            Err(e) => *m.errors.entry(format!("lane panicked: {e}")).or_insert(0) += 1,
        }
    }
    live.stop.store(true, Ordering::Relaxed);
    m.elapsed = last.saturating_duration_since(warm_end);
    bar.finish(&m);
    m
}

async fn run_lane<T: Target>(
    target: &T,
    lane: usize,
    spec: &Spec,
    live: &Live,
    ledger: Option<&LiveLedger>,
    start: Instant,
    warm_end: Instant,
) -> LaneOut {
    let mut out = LaneOut {
        hist: new_hist(),
        ok: 0,
        allowed: 0,
        denied: 0,
        errors: BTreeMap::new(),
        warmup: 0,
        last: warm_end,
    };
    let fail = |out: &mut LaneOut, f: &Fail| {
        live.errors.fetch_add(1, Ordering::Relaxed);
        *out.errors.entry(f.kind()).or_insert(0) += 1;
    };
    let mut conn = loop {
        match target.open(lane).await {
            Ok(c) => break c,
            Err(e) => {
                fail(&mut out, &Fail::Connect(e));
                if live.stop.load(Ordering::Relaxed) {
                    return out;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let mut rng = Rng::new(spec.seed ^ ((lane as u64 + 1) << 20));
    // Open loop: this lane's share of the rate, its sends spread evenly.
    let interval = spec
        .rate
        .map(|r| Duration::from_secs_f64(spec.lanes as f64 / r.max(1e-9)));
    let mut next = spec
        .rate
        .map(|r| start + Duration::from_secs_f64(lane as f64 / r.max(1e-9)));
    loop {
        if live.stop.load(Ordering::Relaxed) {
            break;
        }
        let intended = match (next.as_mut(), interval) {
            (Some(n), Some(i)) => {
                let t = *n;
                *n += i;
                if t > Instant::now() {
                    tokio::time::sleep_until(t.into()).await;
                    if live.stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
                t
            }
            _ => Instant::now(),
        };
        let measured = intended >= warm_end;
        if measured {
            if let Some(max) = spec.requests {
                if live.issued.fetch_add(1, Ordering::Relaxed) >= max {
                    live.stop.store(true, Ordering::Relaxed);
                    break;
                }
            }
        }
        let req = Req {
            customer: rng.below(spec.customers),
            op: spec.mix.pick(rng.next_u64()),
        };
        let res = match tokio::time::timeout(spec.timeout, target.call(&mut conn, req)).await {
            Ok(r) => r,
            Err(_) => {
                target.abandon(&mut conn);
                Err(Fail::Timeout)
            }
        };
        let done = Instant::now();
        live.done.fetch_add(1, Ordering::Relaxed);
        if !measured {
            out.warmup += 1;
        }
        match res {
            Ok(reply) => {
                if let Some(l) = ledger {
                    if reply.allowed {
                        if reply.charging {
                            l.allowed(req.customer, reply.charged);
                        }
                    } else {
                        l.denied(req.customer, spec.cost, reply.remaining);
                    }
                }
                if measured {
                    out.ok += 1;
                    if reply.allowed {
                        out.allowed += 1;
                    } else {
                        out.denied += 1;
                    }
                    let us = done.saturating_duration_since(intended).as_micros() as u64;
                    out.hist.saturating_record(us.max(1));
                    out.last = done;
                }
            }
            Err(f) => {
                if let Some(l) = ledger {
                    if req.op.charges() && f.outcome_unknown() {
                        l.unknown(req.customer, spec.cost);
                    }
                }
                fail(&mut out, &f);
                if measured {
                    out.last = done;
                }
                if matches!(f, Fail::Connect(_)) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    out
}
