//! `creditgate bench` runs briefly (small counts, a second or two per row)
//! against a real `creditgate serve` on the in-process engine and against a
//! private redis-server, and its books check passes; a tampered run and
//! inconsistent ledgers show the check fails. Speed is never asserted here.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use creditgate::bench::books::{self, Balance, CustomerLedger};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_creditgate");

/// `creditgate serve` on the example configuration and a free port; killed on drop.
struct Serve {
    child: Child,
    addr: String,
}

impl Serve {
    fn start(env: &[(&str, &str)]) -> Serve {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/creditgate.toml");
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--config")
            .arg(config)
            .env("CREDITGATE_LISTEN", &addr)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let s = Serve {
            child: cmd.spawn().expect("start creditgate serve"),
            addr,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http(&s.addr, "GET", "/healthz", "").0 != 200 {
            assert!(Instant::now() < deadline, "creditgate serve did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request on a fresh connection: (status, body); 0 when refused.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

fn bench(args: &[&str]) -> Output {
    let out = Command::new(BIN)
        .arg("bench")
        .args(args)
        .args(["--progress", "plain", "--progress-every", "1s"])
        .stdin(Stdio::null())
        .output()
        .expect("run creditgate bench");
    eprintln!(
        "--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn report(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("the JSON report")).unwrap()
}

fn books_ok(r: &Value) -> bool {
    let b = r["books"].as_array().unwrap();
    !b.is_empty() && b.iter().all(|b| b["ok"] == true)
}

#[test]
fn http_mode_on_the_in_process_engine_balances_its_books() {
    let serve = Serve::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let url = serve.url();
    // Small grants: the customers run dry, so denials happen and are checked.
    let out = bench(&[
        "http",
        "--url",
        &url,
        "--customers",
        "8",
        "--grant",
        "60",
        "--duration",
        "1500ms",
        "--warmup",
        "300ms",
        "--concurrency",
        "8",
        "--run-prefix",
        "t-http",
        "--mix",
        "check=1,consume=3,track=1,gate=1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "bench http failed");
    let r = report(&json);
    assert!(books_ok(&r), "{r:#}");
    let row = &r["rows"][0];
    assert!(row["requests"].as_u64().unwrap() > 0);
    assert!(
        row["denied"].as_u64().unwrap() > 0,
        "the grants should run out"
    );
    assert!(row["latency_us"]["p99"].as_u64().unwrap() > 0);
    assert_eq!(r["books"][0]["charged"], r["books"][0]["spent"]);

    // The same customers again (their balances are read back first), at a
    // fixed offered rate, until a request count.
    let out = bench(&[
        "http",
        "--url",
        &url,
        "--customers",
        "8",
        "--grant",
        "60",
        "--requests",
        "300",
        "--rate",
        "400",
        "--warmup",
        "0s",
        "--concurrency",
        "4",
        "--run-prefix",
        "t-http",
        "--op",
        "consume",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "bench http --rate failed");
    let r = report(&json);
    assert!(books_ok(&r), "{r:#}");
    assert_eq!(r["rows"][0]["rate"], 400.0);
}

#[test]
fn a_run_whose_balances_move_behind_its_back_fails_the_books() {
    let serve = Serve::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let url = serve.url();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Someone else charges customer 0 throughout: the answers the bench saw
    // no longer add up to what the balance shows spent.
    let tamper = {
        let (addr, stop) = (serve.addr.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut charged = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = r#"{"customer_id":"t-tamper-0","feature_id":"basic_message","value":1}"#;
                if http(&addr, "POST", "/v1/track", body).0 == 200 {
                    charged += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            charged
        })
    };
    let out = bench(&[
        "http",
        "--url",
        &url,
        "--customers",
        "2",
        "--duration",
        "1500ms",
        "--warmup",
        "0s",
        "--concurrency",
        "2",
        "--run-prefix",
        "t-tamper",
        "--json",
        json.to_str().unwrap(),
    ]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(tamper.join().unwrap() > 0, "the tamperer never charged");
    assert_eq!(out.status.code(), Some(1), "a mismatch must exit non-zero");
    let r = report(&json);
    assert!(!books_ok(&r));
    assert_eq!(r["books"][0]["examples"][0]["customer"], "t-tamper-0");
    assert_eq!(r["books"][0]["examples"][0]["kind"], "charged");
    assert!(String::from_utf8_lossy(&out.stderr).contains("BOOKS DO NOT BALANCE"));
}

#[test]
fn redis_mode_balances_its_books_and_cleans_up() {
    let server = RedisServer::shared();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = bench(&[
        "redis",
        "--redis-url",
        &server.url(),
        "--customers",
        "10",
        "--buckets",
        "2",
        "--grant",
        "40",
        "--requests",
        "2000",
        "--warmup",
        "200ms",
        "--pipeline",
        "8",
        "--concurrency",
        "2",
        "--mix",
        "check=1,consume=3,track=1",
        "--run-prefix",
        "t-redis",
        "--cleanup",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "bench redis failed");
    let r = report(&json);
    assert!(books_ok(&r), "{r:#}");
    assert!(r["rows"][0]["denied"].as_u64().unwrap() > 0);
    // 10 customers × 2 buckets × 40 credits, all spent by 2000 requests.
    assert_eq!(r["books"][0]["spent"], "800");
    assert!(r["rows"][0]["redis_script_us_per_call"].as_f64().is_some());
    let left = server.cli(&["--scan", "--pattern", "cg2:{t-redis-*"]);
    assert_eq!(left.trim(), "", "--cleanup left keys behind");
}

#[test]
fn sweep_mode_sweeps_every_due_customer_under_load_and_reports_slowlog() {
    let server = RedisServer::shared();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = bench(&[
        "sweep",
        "--redis-url",
        &server.url(),
        "--due",
        "300",
        "--due-during",
        "300",
        "--customers",
        "5",
        "--duration",
        "500ms",
        "--warmup",
        "100ms",
        "--pipeline",
        "4",
        "--run-prefix",
        "t-sweep",
        "--cleanup",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "bench sweep failed");
    let r = report(&json);
    assert!(books_ok(&r), "{r:#}");
    let s = &r["sweep"];
    // Other tests' customers may be due on the shared server too.
    assert!(s["customers_swept"].as_u64().unwrap() >= 300, "{s:#}");
    // Created 33 days ago, first reset a day later: every due customer's
    // monthly bucket has one or two resets due.
    assert!(s["resets_applied"].as_u64().unwrap() >= 300, "{s:#}");
    assert!(s["p99_during_us"].as_u64().unwrap() > 0);
    assert!(s["slow_commands"].is_u64());
    assert_eq!(r["rows"].as_array().unwrap().len(), 3);
    let left = server.cli(&["--scan", "--pattern", "cg2:{t-sweep-*"]);
    assert_eq!(left.trim(), "", "--cleanup left keys behind");
}

#[test]
fn suite_runs_every_row_beside_the_baselines_and_balances_both_books() {
    let server = RedisServer::shared();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = bench(&[
        "suite",
        "--redis-url",
        &server.url(),
        "--customers",
        "10",
        "--grant",
        "200",
        "--duration",
        "700ms",
        "--warmup",
        "200ms",
        "--rounds",
        "2",
        "--concurrency",
        "4",
        "--run-prefix",
        "t-suite",
        "--cleanup",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "bench suite failed");
    let r = report(&json);
    assert!(books_ok(&r), "{r:#}");
    assert_eq!(r["books"].as_array().unwrap().len(), 2);
    let rows = r["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "naive /hello",
            "naive /check_cm",
            "creditgate http consume",
            "creditgate http gate",
            "minimal script EVALSHA (1×4)",
            "creditgate engine consume (1×4)",
        ]
    );
    for row in rows {
        assert!(row["requests"].as_u64().unwrap() > 0, "{row:#}");
    }
    assert_eq!(rows[2]["compared_to"], "naive /check_cm");
    assert!(rows[2]["throughput_ratio"].as_f64().unwrap() > 0.0);
    assert!(rows[2]["cpu_us_per_request"]["sidecar"].as_f64().is_some());
    assert_eq!(rows[5]["compared_to"], "minimal script EVALSHA (1×4)");
    assert_eq!(
        server.cli(&["--scan", "--pattern", "*t-suite-*"]).trim(),
        "",
        "--cleanup left keys behind"
    );
}

#[test]
fn baseline_mode_runs_alone() {
    let server = RedisServer::shared();
    let out = bench(&[
        "baseline",
        "--redis-url",
        &server.url(),
        "--customers",
        "5",
        "--grant",
        "30",
        "--requests",
        "200",
        "--warmup",
        "0s",
        "--concurrency",
        "2",
        "--run-prefix",
        "t-base",
        "--cleanup",
    ]);
    assert!(out.status.success(), "bench baseline failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("naive /check_cm"), "{stdout}");
    assert!(stdout.contains("books [baseline]: OK"), "{stdout}");
}

#[test]
fn soak_mode_restarts_its_redis_and_still_balances_its_books() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("soak.json");
    let out = bench(&[
        "soak",
        "--duration",
        "5s",
        "--restart-every",
        "2s",
        "--warmup",
        "1s",
        "--sample-every",
        "1s",
        "--customers",
        "20",
        "--concurrency",
        "4",
        "--json",
        json.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = report(&json);
    assert_eq!(r["books_ok"], true, "{text}");
    assert!(r["restarts"].as_u64().unwrap() >= 1, "{r}");
    assert!(r["applied"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(
        r["balances_spent"].as_i64().unwrap(),
        (r["applied"].as_u64().unwrap() + r["unknown_settled_applied"].as_u64().unwrap()) as i64
    );
}

#[test]
fn bad_arguments_are_refused_before_any_load() {
    let out = bench(&[
        "redis",
        "--redis-url",
        "redis://127.0.0.1:1",
        "--mix",
        "gate=1",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let out = bench(&["http", "--mix", "refund=1"]);
    assert_eq!(out.status.code(), Some(2));
}

fn ledger(charged: i64) -> CustomerLedger {
    CustomerLedger {
        charged,
        allowed: 1,
        ..CustomerLedger::default()
    }
}

fn spent(spent: i64, remaining: i64) -> Balance {
    Balance { spent, remaining }
}

fn name(i: usize) -> String {
    format!("c-{i}")
}

#[test]
fn books_balance_when_answers_match_the_balances() {
    let l = [ledger(30_000), ledger(0)];
    let r = books::check(
        "t",
        &l,
        &[spent(0, 50_000); 2],
        &[spent(30_000, 20_000), spent(0, 50_000)],
        &name,
    );
    assert!(r.ok, "{r:?}");
    assert_eq!((r.charged.as_str(), r.spent.as_str()), ("3", "3"));
}

#[test]
fn books_catch_a_charge_the_answers_did_not_report() {
    let r = books::check(
        "t",
        &[ledger(30_000)],
        &[spent(0, 50_000)],
        &[spent(40_000, 10_000)],
        &name,
    );
    assert!(!r.ok);
    assert_eq!(r.mismatches, 1);
    assert_eq!(r.examples[0].kind, "charged");
    assert_eq!(r.examples[0].customer, "c-0");
    // And an answer that claimed a charge the balance never took.
    let r = books::check(
        "t",
        &[ledger(30_000)],
        &[spent(0, 50_000)],
        &[spent(20_000, 30_000)],
        &name,
    );
    assert!(!r.ok);
}

#[test]
fn books_allow_unknown_requests_only_up_to_what_they_could_charge() {
    let l = CustomerLedger {
        unknown: 2,
        unknown_max: 20_000,
        ..ledger(30_000)
    };
    for (s, ok) in [
        (30_000, true),
        (40_000, true),
        (50_000, true),
        (50_001, false),
    ] {
        let r = books::check(
            "t",
            std::slice::from_ref(&l),
            &[spent(0, 0)],
            &[spent(s, 0)],
            &name,
        );
        assert_eq!(r.ok, ok, "spent {s}: {r:?}");
        assert_eq!(r.unknown, 2);
    }
}

#[test]
fn books_catch_a_denial_while_the_balance_sufficed() {
    // Denied a request of 1 credit, yet 5 credits are left after the run.
    let l = CustomerLedger {
        denied: 1,
        min_denied_cost: Some(10_000),
        ..ledger(0)
    };
    let r = books::check(
        "t",
        std::slice::from_ref(&l),
        &[spent(0, 50_000)],
        &[spent(0, 50_000)],
        &name,
    );
    assert!(!r.ok);
    assert_eq!(r.examples[0].kind, "denied_with_enough_balance");
    // Below the cost after the run: a legal denial.
    let r = books::check(
        "t",
        &[l],
        &[spent(0, 50_000)],
        &[spent(45_000, 5_000)],
        &name,
    );
    assert_eq!(r.mismatches, 1, "the charge itself does not balance: {r:?}");
    let ok = CustomerLedger {
        charged: 45_000,
        denied: 1,
        min_denied_cost: Some(10_000),
        ..ledger(0)
    };
    let r = books::check(
        "t",
        &[ok],
        &[spent(0, 50_000)],
        &[spent(45_000, 5_000)],
        &name,
    );
    assert!(r.ok, "{r:?}");
    // A denial whose own answer showed enough balance.
    let l = CustomerLedger {
        denied: 1,
        denials_with_enough: 1,
        ..ledger(0)
    };
    let r = books::check("t", &[l], &[spent(0, 0)], &[spent(0, 0)], &name);
    assert_eq!(r.examples[0].kind, "denial_reported_enough");
}

#[test]
fn live_ledger_adds_up_what_lanes_report() {
    let l = books::LiveLedger::new(2);
    l.allowed(0, 10_000);
    l.allowed(0, 10_000);
    l.denied(1, 10_000, Some(5_000));
    l.denied(1, 20_000, None);
    l.unknown(1, 10_000);
    let s = l.snapshot();
    assert_eq!(s[0].charged, 20_000);
    assert_eq!(s[1].min_denied_cost, Some(10_000));
    assert_eq!(s[1].denials_with_enough, 0);
    assert_eq!((s[1].unknown, s[1].unknown_max), (1, 10_000));
}
