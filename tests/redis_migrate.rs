//! `creditgate migrate` on data written by the previous layout: the cg1
//! scripts (kept in `tests/fixtures/cg1/` for exactly this) write real
//! customers — monthly and one-off buckets, rollover rows, a pending lock,
//! a finalized lock's receipt, an idempotency record, the lock-id index —
//! while the in-process engine does the same at the same instants. A cg2
//! sidecar refuses that data until it is migrated; after the migration the
//! new engine shows the same balances, the pending lock finalizes, the
//! receipt and the idempotent retry replay, exactly as the reference does.
//! A second run finds nothing left to do.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::redis::{namespace, RedisServer};
use common::{amt, catalog, start};
use creditgate::calendar::{ms_of, Interval};
use creditgate::engine::redis::keys::layout_keys;
use creditgate::engine::redis::{migrate, RedisEngine, RedisOptions};
use creditgate::engine::LockIndex;
use creditgate::model::*;
use creditgate::{Clock, Engine, EngineError, ManualClock, MemoryEngine};

/// The cg1 scripts: `lua/lib.lua` + `lua/<op>.lua` as the cg1 engine sent them.
fn cg1_script(op: &str) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cg1");
    let lib = std::fs::read_to_string(dir.join("lib.lua")).unwrap();
    let body = std::fs::read_to_string(dir.join(format!("{op}.lua"))).unwrap();
    format!("{lib}{body}").trim_end_matches('\n').to_string()
}

/// The cg1 engine's calls, by EVAL, on one customer.
struct Cg1<'a> {
    conn: redis::aio::MultiplexedConnection,
    ns: &'a str,
}

impl Cg1<'_> {
    async fn eval(&self, op: &str, customer: &str, now: i64, rest: &[&str]) -> redis::Value {
        let k = layout_keys(self.ns, "cg1:", customer);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(cg1_script(op));
        if op == "create_customer" {
            cmd.arg(1).arg(&k.customer).arg(now);
        } else {
            cmd.arg(3)
                .arg(&k.customer)
                .arg(&k.locks)
                .arg(&k.due)
                .arg(now)
                .arg(86_400_000)
                .arg(86_400_000)
                .arg(customer)
                .arg(rest);
        }
        let mut c = self.conn.clone();
        cmd.query_async(&mut c).await.expect("cg1 script")
    }
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn opts(ns: &str) -> RedisOptions {
    RedisOptions {
        namespace: ns.to_string(),
        ..RedisOptions::standalone(&RedisServer::shared().url())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cg1_data_migrates_and_answers_as_before() {
    let ns = namespace();
    let server = RedisServer::shared();
    let client = redis::Client::open(server.url()).unwrap();
    let cg1 = Cg1 {
        conn: client.get_multiplexed_async_connection().await.unwrap(),
        ns: &ns,
    };
    let clock = Arc::new(ManualClock::new(start()));
    let mem = MemoryEngine::new(catalog(), clock.clone(), Retention::default());
    let t0 = start();
    let (a, b) = ("cus_000000000000a1", "we{ir}d: é");
    // Customer a: a monthly api_call bucket with a rollover, a one-off
    // ai_credits top-up; customer b: one monthly ai_credits bucket.
    for c in [a, b] {
        cg1.eval("create_customer", c, t0, &[]).await;
        mem.create_customer(c).await.unwrap();
    }
    let g = |pool: &str, granted: &str, interval: &str, ro: &[&str]| {
        let mut v: Vec<String> = vec![
            pool.into(),
            String::new(),
            "pro".into(),
            granted.into(),
            interval.into(),
            "1".into(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ];
        v.extend(ro.iter().map(|s| s.to_string()));
        v
    };
    let monthly = g("api_call", "1000000", "5", &["month", "", "500000", "2"]);
    cg1.eval("grant", a, t0, &refs(&monthly)).await;
    mem.grant(
        a,
        &Grant {
            plan_id: Some("pro".into()),
            rollover: Some(RolloverConfig {
                max: None,
                max_percentage: Some(amt("50")),
                duration: RolloverDuration::Month,
                length: Some(2),
            }),
            ..Grant::new("api_call", amt("100"), Interval::Month)
        },
    )
    .await
    .unwrap();
    let topup = g("ai_credits", "50000000", "0", &[]);
    cg1.eval("grant", a, t0, &refs(&topup)).await;
    mem.grant(
        a,
        &Grant {
            plan_id: Some("pro".into()),
            ..Grant::new("ai_credits", amt("5000"), Interval::OneOff)
        },
    )
    .await
    .unwrap();
    let bm = g("ai_credits", "2000000", "5", &[]);
    cg1.eval("grant", b, t0, &refs(&bm)).await;
    mem.grant(
        b,
        &Grant {
            plan_id: Some("pro".into()),
            ..Grant::new("ai_credits", amt("200"), Interval::Month)
        },
    )
    .await
    .unwrap();
    // Use 30 api_call in January; the February reset rolls 50 % over.
    let apply = |op: &str, key: &str, feature: &str, units: &str, mode: &str, lock: &str| {
        let mut v: Vec<String> = [op, key, feature, units, mode, lock, ""]
            .iter()
            .map(|s| s.to_string())
            .collect();
        match catalog().pools_for(feature) {
            Ok(ps) => {
                v.push(ps.len().to_string());
                for p in ps {
                    v.push(p.pool);
                    v.push(p.cost.raw().to_string());
                }
            }
            Err(_) => v.push("0".into()),
        }
        v
    };
    cg1.eval(
        "apply",
        a,
        t0,
        &refs(&apply("track", "", "api_call", "300000", "cap", "")),
    )
    .await;
    mem.track(a, "api_call", amt("30"), OverageBehavior::Cap, None)
        .await
        .unwrap();
    let t1 = ms_of(2027, 2, 1, 0, 0) + 1000;
    clock.set(t1);
    cg1.eval("reset_due", a, t1, &[]).await;
    mem.reset_due(a).await.unwrap();
    // An idempotent consume, a pending lock, a finalized one (its receipt).
    cg1.eval(
        "apply",
        a,
        t1,
        &refs(&apply("consume", "k7", "action1", "30000", "", "")),
    )
    .await;
    let first = mem
        .consume(a, "action1", amt("3"), Some("k7"))
        .await
        .unwrap();
    cg1.eval(
        "apply",
        a,
        t1,
        &refs(&apply("reserve", "", "action2", "70000", "", "L1")),
    )
    .await;
    mem.reserve(a, "L1", "action2", amt("7"), None, None)
        .await
        .unwrap();
    cg1.eval(
        "apply",
        b,
        t1,
        &refs(&apply("reserve", "", "action1", "20000", "", "L2")),
    )
    .await;
    mem.reserve(b, "L2", "action1", amt("2"), None, None)
        .await
        .unwrap();
    let fin = apply("finalize", "", "", "", "confirm", "L2");
    cg1.eval("apply", b, t1, &refs(&fin)).await;
    mem.finalize(b, "L2", FinalizeAction::Confirm, None, None)
        .await
        .unwrap();
    // The lock-id index as the cg1 service wrote it.
    let mut c = cg1.conn.clone();
    redis::cmd("SET")
        .arg(format!("{ns}cg1:lock:{{L1}}"))
        .arg(format!("{a}\x1f"))
        .query_async::<()>(&mut c)
        .await
        .unwrap();

    // A cg2 sidecar refuses the cg1 data, saying what to do.
    let dyn_clock: Arc<dyn Clock> = clock.clone();
    let refused = RedisEngine::connect(opts(&ns), catalog(), Some(dyn_clock.clone()))
        .await
        .err()
        .expect("a cg2 engine refuses cg1 data");
    let msg = refused.to_string();
    assert!(
        msg.contains("layout cg1") && msg.contains("creditgate migrate"),
        "{msg}"
    );

    let report = migrate(opts(&ns), &catalog()).await.unwrap();
    assert_eq!(report.customers, 2, "{report:?}");
    assert_eq!(report.idempotency_records, 1, "{report:?}");
    assert_eq!(report.receipts, 1, "{report:?}");
    assert_eq!(report.lock_ids, 1, "{report:?}");
    let left = server.cli(&["--scan", "--pattern", &format!("{ns}cg1:*")]);
    assert_eq!(left.trim(), "", "cg1 keys left: {left}");
    // Idempotent: a second run finds nothing.
    let again = migrate(opts(&ns), &catalog()).await.unwrap();
    assert_eq!(again, Default::default());

    let red = RedisEngine::connect(opts(&ns), catalog(), Some(dyn_clock))
        .await
        .expect("the migrated data is cg2");
    for c in [a, b] {
        assert_eq!(red.balances(c).await, mem.balances(c).await, "{c}");
    }
    let rows = red
        .balances(a)
        .await
        .unwrap()
        .pools
        .into_iter()
        .find(|p| p.pool == "api_call")
        .unwrap()
        .rollovers;
    assert_eq!(rows.len(), 1, "the rollover row moved: {rows:?}");
    // The idempotent retry replays the first answer.
    let retry = red.consume(a, "action1", amt("3"), Some("k7")).await;
    let want = mem.consume(a, "action1", amt("3"), Some("k7")).await;
    assert_eq!(retry, want);
    assert!(retry.as_ref().unwrap().replayed);
    assert_eq!(retry.unwrap().entries, first.entries);
    assert_eq!(
        red.consume(a, "action1", amt("4"), Some("k7")).await,
        Err(EngineError::IdempotencyKeyReused)
    );
    // The finalized lock's receipt replays; the pending lock finalizes.
    assert_eq!(
        red.finalize(b, "L2", FinalizeAction::Confirm, None, None)
            .await,
        mem.finalize(b, "L2", FinalizeAction::Confirm, None, None)
            .await
    );
    assert_eq!(
        red.lock_index().lookup("L1", t1).await.unwrap().as_deref(),
        Some(a)
    );
    let done = red
        .finalize(a, "L1", FinalizeAction::Confirm, Some(amt("5")), None)
        .await;
    assert_eq!(
        done,
        mem.finalize(a, "L1", FinalizeAction::Confirm, Some(amt("5")), None)
            .await
    );
    assert!(!done.unwrap().replayed);
    // A month later both reset alike (the due index moved too).
    clock.set(ms_of(2027, 3, 1, 0, 0) + 1);
    let swept = red.sweep_due().await.unwrap();
    assert_eq!(swept.customers_swept, 2);
    for c in [a, b] {
        assert_eq!(red.balances(c).await, mem.balances(c).await, "{c}");
    }
}

#[tokio::test]
async fn a_sidecar_refuses_a_layout_it_does_not_know() {
    let ns = namespace();
    let server = RedisServer::shared();
    server.cli(&["SET", &format!("{ns}cg:layout"), "cg3"]);
    let err = RedisEngine::connect(opts(&ns), catalog(), None)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("layout cg3"), "{err}");
    // An empty namespace gets the marker.
    let fresh = namespace();
    RedisEngine::connect(opts(&fresh), catalog(), None)
        .await
        .unwrap();
    assert_eq!(
        server.cli(&["GET", &format!("{fresh}cg:layout")]).trim(),
        "cg2"
    );
}

#[test]
fn the_cli_prints_the_library_and_migrates_from_a_configuration() {
    let bin = env!("CARGO_BIN_EXE_creditgate");
    let out = std::process::Command::new(bin)
        .arg("scripts")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        creditgate::engine::redis::LIBRARY,
        "stdout is the library exactly (FUNCTION LOAD takes it as is)"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("creditgate_cg2_v7"));
    let name = std::process::Command::new(bin)
        .args(["scripts", "--name"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(name.stdout).unwrap(),
        "creditgate_cg2_v7\n"
    );

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("creditgate.toml");
    std::fs::write(
        &config,
        format!(
            "redis_url = \"{}\"\n{}",
            RedisServer::shared().url(),
            common::http::CONFIG
        ),
    )
    .unwrap();
    let out = std::process::Command::new(bin)
        .args(["migrate", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("migrated to layout cg2: 0 customers"),
        "{text}"
    );
}
