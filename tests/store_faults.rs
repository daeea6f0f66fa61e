//! The sidecar on a Redis that fails: paused (`SIGSTOP`), killed (`kill -9`)
//! and restarted, switched to eviction, out of memory. Every answer is one
//! of "applied", "not applied" (and then truly not applied) or "outcome
//! unknown" (and then settled by a retry with the same key); every answer
//! comes within the timeout; the breaker lets requests through again soon
//! after Redis returns; `on_store_error = "allow"` answers allowed and says
//! the decision was not recorded (docs/store-failures.md).
//!
//! Each test starts its own redis-server on its own TCP port (TCP, so a
//! dead server is a refused connection, as in production).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::Router;
use common::http::{call, Answer, CONFIG};
use common::redis::spawn_watched;
use creditgate::config::Config;
use creditgate::http::app;
use creditgate::server::state_from_config;
use serde_json::{json, Value};

/// A redis-server this test controls: its pid (for signals), its port and
/// directory (kept across a restart, with the AOF when `aof`).
struct Redis {
    port: u16,
    dir: tempfile::TempDir,
    aof: bool,
    pid: i32,
    watchdog: Option<(Child, ChildStdin)>,
}

impl Redis {
    fn start(aof: bool) -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = Redis {
            port,
            dir: tempfile::tempdir().unwrap(),
            aof,
            pid: 0,
            watchdog: None,
        };
        r.launch();
        r
    }

    /// Starts the server under a watchdog shell that kills it when our end
    /// of its stdin closes (this process ending for any reason).
    fn launch(&mut self) {
        let dir = self.dir.path().display().to_string();
        let pidfile = PathBuf::from(&dir).join("pid");
        let _ = std::fs::remove_file(&pidfile);
        let aof = if self.aof {
            "--appendonly yes --appendfsync always"
        } else {
            "--appendonly no"
        };
        let script = format!(
            "redis-server --port {port} --bind 127.0.0.1 --save '' {aof} --dir '{dir}' \
             --maxmemory-policy noeviction >>'{dir}/log' 2>&1 & pid=$!; echo $pid >'{dir}/pid'; \
             cat >/dev/null; kill -CONT $pid 2>/dev/null; kill -9 $pid 2>/dev/null; wait $pid",
            port = self.port
        );
        let mut child = spawn_watched(&script);
        let stdin = child.stdin.take().unwrap();
        self.watchdog = Some((child, stdin));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(p) = std::fs::read_to_string(&pidfile) {
                if let Ok(p) = p.trim().parse() {
                    self.pid = p;
                    if self.cli(&["PING"]).trim() == "PONG" {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {}", self.pid);
    }

    /// `kill -9`, and waits until the port refuses connections.
    fn kill(&mut self) {
        self.signal("-9");
        if let Some((mut child, mut stdin)) = self.watchdog.take() {
            let _ = stdin.flush();
            drop(stdin);
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some((mut child, stdin)) = self.watchdog.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }
}

fn config(text: &str, redis: &Redis, extra: &[(&str, &str)]) -> Config {
    let mut env = BTreeMap::from([
        ("CREDITGATE_REDIS_URL".to_string(), redis.url()),
        ("CREDITGATE_REDIS_TIMEOUT_MS".to_string(), "300".to_string()),
    ]);
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    Config::parse(text, &env, 0).expect("config")
}

async fn router(config: &Config) -> Router {
    let (state, in_process) = state_from_config(config).await.expect("state");
    assert!(!in_process);
    app(state)
}

/// A customer with a one-off balance of `granted` action1.
async fn seed(router: &Router, customer: &str, granted: i64) {
    let a = call(
        router,
        "POST",
        "/v1/customers.get_or_create",
        json!({ "customer_id": customer }),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let a = call(
        router,
        "POST",
        "/v1/balances.create",
        json!({ "customer_id": customer, "feature_id": "action1", "included_grant": granted }),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
}

async fn track(router: &Router, customer: &str, key: &str) -> Answer {
    common::http::track_keyed(router, customer, key).await
}

async fn remaining(router: &Router, customer: &str) -> Value {
    let a = call(
        router,
        "POST",
        "/v1/customers.get",
        json!({ "customer_id": customer }),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    a.json["balances"]["action1"]["remaining"].clone()
}

/// What an answer claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    Applied,
    NotApplied,
    Unknown,
}

fn claim(a: &Answer) -> Claim {
    match (a.status.as_u16(), a.code()) {
        (200, _) => Claim::Applied,
        (503, "store_unavailable") => Claim::NotApplied,
        (503, "store_timeout") => Claim::Unknown,
        _ => panic!("unexpected answer {} {}", a.status, a.text),
    }
}

/// Retries `key` until Redis answers; whether the retry replayed.
async fn settle(router: &Router, customer: &str, key: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let a = track(router, customer, key).await;
        if a.status == StatusCode::OK {
            return a.replayed();
        }
        assert!(Instant::now() < deadline, "{key} never settled: {}", a.text);
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_under_keyed_load_leaves_every_debit_settled_exactly_once() {
    let redis = Redis::start(false);
    let router = router(&config(CONFIG, &redis, &[])).await;
    const GRANTED: i64 = 1_000_000;
    seed(&router, "paused", GRANTED).await;

    // 16 workers send keyed debits of 1 while Redis is paused for 1.5 s.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..16 {
        let router = router.clone();
        let stop = stop.clone();
        workers.spawn(async move {
            let mut answers = vec![];
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("w{w}-{i}");
                let started = Instant::now();
                let a = track(&router, "paused", &key).await;
                let took = started.elapsed();
                // Hung Redis: every answer still within the timeout (300 ms)
                // and a margin.
                assert!(took < Duration::from_millis(700), "{key} took {took:?}");
                let c = claim(&a);
                answers.push((key, c));
                if c != Claim::Applied {
                    // An open breaker answers at once: pace the refusals.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                i += 1;
            }
            answers
        });
    }
    // Some debits go through first, then the pause, then more after it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.signal("-STOP");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.signal("-CONT");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answers = vec![];
    while let Some(r) = workers.join_next().await {
        answers.extend(r.unwrap());
    }

    let count = |c: Claim| answers.iter().filter(|(_, x)| *x == c).count();
    let (applied, not_applied, unknown) = (
        count(Claim::Applied),
        count(Claim::NotApplied),
        count(Claim::Unknown),
    );
    eprintln!("applied {applied}, not applied {not_applied}, unknown {unknown}");
    assert!(unknown > 0, "the pause timed some calls out");
    assert!(not_applied > 0, "the open breaker refused some unsent");

    // Every claim is settled by a retry with the same key: an applied one
    // replays, a not-applied one applies now (never a replay), an unknown
    // one does either.
    let mut unknown_ran = 0;
    for (key, c) in &answers {
        let replayed = settle(&router, "paused", key).await;
        match c {
            Claim::Applied => assert!(replayed, "{key}: applied, but its retry applied again"),
            Claim::NotApplied => {
                assert!(!replayed, "{key}: answered not applied, but it had been")
            }
            Claim::Unknown => unknown_ran += usize::from(replayed),
        }
    }
    eprintln!("of {unknown} unknown outcomes, {unknown_ran} had run before the client gave up");
    // Each key was charged exactly once, whatever its first answer.
    assert_eq!(
        remaining(&router, "paused").await,
        json!(GRANTED - answers.len() as i64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_killed_every_answer_comes_within_the_timeout_and_service_returns_after_it() {
    let mut redis = Redis::start(true);
    let router = router(&config(CONFIG, &redis, &[])).await;
    seed(&router, "killed", 1000).await;
    assert_eq!(track(&router, "killed", "k0").await.status, StatusCode::OK);

    redis.kill();
    // The bound: at 300 ms, every answer (requests, /readyz) well within a
    // second, whatever the reconnect backoff is doing.
    let bound = Duration::from_millis(300 + 400);
    let mut slowest = Duration::ZERO;
    for i in 0..40 {
        let started = Instant::now();
        let a = track(&router, "killed", &format!("dead-{i}")).await;
        slowest = slowest.max(started.elapsed());
        let c = claim(&a);
        assert_ne!(c, Claim::Applied);
        let started = Instant::now();
        let r = call(&router, "GET", "/readyz", Value::Null).await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    eprintln!("slowest answer with Redis dead: {slowest:?}");
    assert!(slowest < bound, "an answer took {slowest:?}");
    // By now the breaker is open: refusals are unsent, so "not applied".
    assert_eq!(
        claim(&track(&router, "killed", "dead-open").await),
        Claim::NotApplied
    );

    redis.launch();
    let back = Instant::now();
    let deadline = back + Duration::from_secs(10);
    loop {
        let a = track(&router, "killed", "after").await;
        if a.status == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no success 10 s after Redis returned"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = back.elapsed();
    eprintln!("first success {took:?} after Redis was back");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // The AOF kept the acknowledged debit; nothing refused was applied.
    assert_eq!(remaining(&router, "killed").await, json!(998));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_turned_on_while_serving_makes_readyz_503_until_it_is_fixed() {
    let redis = Redis::start(false);
    let router = router(&config(
        CONFIG,
        &redis,
        &[("CREDITGATE_REDIS_SAFETY_CHECK_MS", "50")],
    ))
    .await;
    let ready = |want: StatusCode| {
        let router = router.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if call(&router, "GET", "/readyz", Value::Null).await.status == want {
                    return;
                }
                assert!(Instant::now() < deadline, "/readyz never answered {want}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    ready(StatusCode::OK).await;
    redis.cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    ready(StatusCode::SERVICE_UNAVAILABLE).await;
    redis.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    ready(StatusCode::OK).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_answers_507_store_full_and_writes_nothing() {
    let redis = Redis::start(false);
    let router = router(&config(CONFIG, &redis, &[])).await;
    seed(&router, "full", 100).await;
    assert_eq!(
        track(&router, "full", "before").await.status,
        StatusCode::OK
    );
    // maxmemory below what Redis holds: under noeviction every write is
    // refused (a filler SET shows it) until the limit is lifted.
    let used: u64 = redis
        .cli(&["INFO", "memory"])
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    redis.cli(&["CONFIG", "SET", "maxmemory", &(used / 2).to_string()]);
    assert!(redis.cli(&["SET", "filler", "x"]).contains("OOM"));
    let a = track(&router, "full", "while-full").await;
    assert_eq!(
        (a.status.as_u16(), a.code()),
        (507, "store_full"),
        "{}",
        a.text
    );
    let a = call(
        &router,
        "POST",
        "/v1/check",
        json!({"customer_id": "full", "feature_id": "action1", "send_event": true}),
    )
    .await;
    assert_eq!((a.status.as_u16(), a.code()), (507, "store_full"));
    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    assert_eq!(
        remaining(&router, "full").await,
        json!(99),
        "nothing written"
    );
    // The refused key was never used: its retry applies.
    let a = track(&router, "full", "while-full").await;
    assert!(a.status == StatusCode::OK && !a.replayed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_store_error_allow_answers_allowed_unrecorded_per_feature() {
    let redis = Redis::start(false);
    // Deny at the top level; action1 fails open on its own.
    let text = CONFIG.replace(
        "[[features]]\nid = \"action1\"\n",
        "[[features]]\nid = \"action1\"\non_store_error = \"allow\"\n",
    );
    assert_ne!(text, CONFIG);
    let router = router(&config(&text, &redis, &[])).await;
    seed(&router, "open", 100).await;
    let check =
        |feature: &str| json!({"customer_id": "open", "feature_id": feature, "send_event": true});

    // Paused: the first call times out, so it may have been recorded.
    redis.signal("-STOP");
    let a = call(&router, "POST", "/v1/check", check("action1")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json["allowed"], json!(true));
    assert_eq!(a.headers["creditgate-recorded"], "unknown");
    assert_eq!(a.headers["creditgate-store-error"], "store_timeout");
    redis.signal("-CONT");
    redis.cli(&["PING"]);

    let mut redis = redis;
    redis.kill();
    // Dead: until the breaker opens, the errors vary; then not recorded.
    let mut a = track(&router, "open", "t0").await;
    for i in 1..10 {
        if a.headers
            .get("creditgate-recorded")
            .is_some_and(|v| v == "false")
        {
            break;
        }
        a = track(&router, "open", &format!("t{i}")).await;
    }
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.headers["creditgate-recorded"], "false");
    assert_eq!(a.headers["creditgate-store-error"], "store_unavailable");
    // A feature without the override is denied.
    let a = call(&router, "POST", "/v1/check", check("action2")).await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
    );
    let m = call(&router, "GET", "/metrics", Value::Null).await.text;
    let allowed = |code: &str| {
        m.lines()
            .find(|l| {
                l.starts_with(&format!(
                    "creditgate_store_error_allowed_total{{code=\"{code}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(allowed("store_timeout") >= 1.0, "{m}");
    assert!(allowed("store_unavailable") >= 1.0, "{m}");
}
