//! What only the Redis engine has: loading the library and reloading it
//! after `FUNCTION FLUSH` or a restart, the key layout, the due index,
//! hash-tag isolation.

mod common;

use std::sync::Arc;

use common::redis::{engine, RedisServer};
use common::{amt, catalog, start};
use creditgate::calendar::{Interval, DAY_MS};
use creditgate::engine::redis::keys::{escape, slot};
use creditgate::model::*;
use creditgate::{Engine, ManualClock};

fn fresh_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(start()))
}

#[tokio::test]
async fn the_library_reloads_after_function_flush() {
    use creditgate::engine::redis::LIBRARY_NAME;
    let e = engine(catalog(), fresh_clock(), Retention::default()).await;
    e.create_customer("c").await.unwrap();
    e.grant("c", &Grant::new("api_call", amt("10"), Interval::Month))
        .await
        .unwrap();
    let server = RedisServer::shared();
    let listed = || server.cli(&["FUNCTION", "LIST", "LIBRARYNAME", LIBRARY_NAME]);
    assert!(listed().contains(LIBRARY_NAME));
    assert_eq!(server.cli(&["FUNCTION", "FLUSH"]).trim(), "OK");
    // (Not asserting the library is gone here: other tests share this
    // server and may reload it at any moment.)
    let out = e.consume("c", "api_call", amt("3"), None).await.unwrap();
    assert!(out.allowed);
    assert_eq!(out.pool("api_call").unwrap().remaining, amt("7"));
    // Reloaded by the call itself.
    assert!(listed().contains(LIBRARY_NAME));
    let out = e.consume("c", "api_call", amt("3"), None).await.unwrap();
    assert_eq!(out.pool("api_call").unwrap().remaining, amt("4"));
    // Readiness probes FUNCTION LIST and reloads what the server lost.
    use creditgate::engine::Readiness;
    assert!(e.readiness().ready().await);
    assert_eq!(server.cli(&["FUNCTION", "FLUSH"]).trim(), "OK");
    assert!(
        e.readiness().ready().await,
        "ready again once the library is reloaded"
    );
    assert!(listed().contains(LIBRARY_NAME));
}

/// A redis-server on a TCP port of our choosing, so it can be restarted on
/// the same address (without persistence: data and functions are gone).
fn tcp_server(port: u16, dir: &std::path::Path) -> std::process::Child {
    let script = format!(
        "redis-server --port {port} --bind 127.0.0.1 --save '' --appendonly no \
         --dir '{}' >/dev/null 2>&1 & pid=$!; cat >/dev/null; kill $pid; wait $pid",
        dir.display()
    );
    let child = common::redis::spawn_watched(&script);
    wait_for_pong(port);
    child
}

fn wait_for_pong(port: u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "PING"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).trim() == "PONG" {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "redis-server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[tokio::test]
async fn a_restart_without_persistence_reloads_the_library_on_the_next_call() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut first = tcp_server(port, dir.path());
    let opts =
        creditgate::engine::redis::RedisOptions::standalone(&format!("redis://127.0.0.1:{port}"));
    let clock: Arc<dyn creditgate::Clock> = fresh_clock();
    let e = creditgate::engine::redis::RedisEngine::connect(opts, catalog(), Some(clock))
        .await
        .unwrap();
    assert!(e.create_customer("c").await.unwrap());
    drop(first.stdin.take());
    first.wait().unwrap();
    let mut second = tcp_server(port, dir.path());
    // The data went with the old process; the library is loaded again by
    // the first call that misses it.
    let mut answer = e.create_customer("c").await;
    for _ in 0..20 {
        if answer.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        answer = e.create_customer("c").await;
    }
    assert!(answer.unwrap(), "a fresh server: the customer is new again");
    assert!(e.balances("c").await.unwrap().pools.is_empty());
    drop(second.stdin.take());
    second.wait().unwrap();
}

fn ns_of(e: &creditgate::engine::redis::RedisEngine) -> String {
    let k = e.keys("x");
    k.customer.split("cg2:").next().unwrap().to_string()
}

#[tokio::test]
async fn key_layout_and_due_index() {
    let clock = fresh_clock();
    let e = engine(catalog(), clock.clone(), Retention::default()).await;
    let server = RedisServer::shared();
    let ns = ns_of(&e);
    e.create_customer("cus_1").await.unwrap();
    let k = e.keys("cus_1");
    assert_eq!(k.customer, format!("{ns}cg2:{{cus_1}}"));
    assert_eq!(k.locks, format!("{ns}cg2:{{cus_1}}:l"));
    let tag = k.due.split('{').nth(1).unwrap().trim_end_matches('}');
    assert_eq!(slot(tag), slot("cus_1"), "the due index shares the slot");
    // A one-off bucket is never due: no entry.
    e.grant("cus_1", &Grant::new("api_call", amt("5"), Interval::OneOff))
        .await
        .unwrap();
    assert_eq!(server.cli(&["ZSCORE", &k.due, "cus_1"]).trim(), "");
    // A monthly one is due at its next reset.
    e.grant(
        "cus_1",
        &Grant::new("api_call", amt("100"), Interval::Month),
    )
    .await
    .unwrap();
    let next = e.balances("cus_1").await.unwrap().pools[0]
        .next_reset_at
        .unwrap();
    assert_eq!(
        server.cli(&["ZSCORE", &k.due, "cus_1"]).trim(),
        next.to_string()
    );
    // A pending lock expiring sooner moves it earlier; its release moves it back.
    let soon = start() + DAY_MS;
    e.reserve("cus_1", "L", "api_call", amt("1"), Some(soon), None)
        .await
        .unwrap();
    assert_eq!(
        server.cli(&["ZSCORE", &k.due, "cus_1"]).trim(),
        soon.to_string()
    );
    clock.set(soon);
    assert_eq!(e.reset_due("cus_1").await.unwrap(), 0);
    assert_eq!(
        server.cli(&["ZSCORE", &k.due, "cus_1"]).trim(),
        next.to_string()
    );
    assert_eq!(
        server
            .cli(&["EXISTS", &format!("{}:f:L", k.customer)])
            .trim(),
        "1",
        "the released lock's receipt"
    );
    let ttl: i64 = server
        .cli(&["PTTL", &format!("{}:f:L", k.customer)])
        .trim()
        .parse()
        .unwrap();
    assert!(
        ttl > 0 && ttl <= 24 * 3_600_000,
        "relative expiry, got {ttl}"
    );
    // The reset moves it a month on.
    clock.set(next);
    assert_eq!(e.reset_due("cus_1").await.unwrap(), 1);
    let later = e.balances("cus_1").await.unwrap().pools[0]
        .next_reset_at
        .unwrap();
    assert!(later > next);
    assert_eq!(
        server.cli(&["ZSCORE", &k.due, "cus_1"]).trim(),
        later.to_string()
    );
    // Fields: the record and one compact field per pool.
    let fields = server.cli(&["HKEYS", &k.customer]);
    let mut fields: Vec<&str> = fields.lines().collect();
    fields.sort();
    assert_eq!(fields, vec!["\u{1f}", "api_call"]);
    assert_eq!(
        server.cli(&["OBJECT", "ENCODING", &k.customer]).trim(),
        "listpack"
    );
}

#[tokio::test]
async fn hash_tags_keep_customers_apart() {
    let e = engine(catalog(), fresh_clock(), Retention::default()).await;
    let ids = ["a}b", "a", "a%7Db", "{a}", "a:b", "a b", "é", "a:l"];
    for id in ids {
        assert!(e.create_customer(id).await.unwrap());
    }
    let mut keys: Vec<String> = ids.iter().map(|id| e.keys(id).customer).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), ids.len());
    for id in ids {
        let k = e.keys(id);
        // The tag is exactly the escaped id.
        let tag = k
            .customer
            .split('{')
            .nth(1)
            .unwrap()
            .split('}')
            .next()
            .unwrap();
        assert_eq!(tag, escape(id));
        assert!(!e.create_customer(id).await.unwrap(), "exists: {id}");
    }
    e.grant("a", &Grant::new("api_call", amt("5"), Interval::OneOff))
        .await
        .unwrap();
    for id in ids.iter().filter(|i| **i != "a") {
        assert!(e.balances(id).await.unwrap().pools.is_empty(), "{id}");
    }
}

#[tokio::test]
async fn lock_index_finds_a_locks_customer() {
    use creditgate::engine::LockIndex;
    let e = engine(catalog(), fresh_clock(), Retention::default()).await;
    let idx = e.lock_index();
    let t = start();
    assert_eq!(idx.lookup("L{1}", t).await.unwrap(), None);
    idx.record("L{1}", "cus:a", None, t).await.unwrap();
    assert_eq!(
        idx.lookup("L{1}", t + DAY_MS).await.unwrap().as_deref(),
        Some("cus:a")
    );
    idx.record("L{1}", "cus:a", Some(t + 100), t).await.unwrap();
    assert_eq!(
        idx.lookup("L{1}", t + 99).await.unwrap().as_deref(),
        Some("cus:a")
    );
    assert_eq!(idx.lookup("L{1}", t + 100).await.unwrap(), None);
    let server = RedisServer::shared();
    let pttl: i64 = server
        .cli(&["PTTL", &idx.key("L{1}")])
        .trim()
        .parse()
        .unwrap();
    assert!(pttl > 0 && pttl <= 100, "relative expiry, got {pttl}");
    assert!(idx.key("L{1}").ends_with("cg2:lock:{L%7B1%7D}"));
}

#[tokio::test]
async fn lock_index_refuses_a_claim_on_another_customers_live_id() {
    use creditgate::engine::LockIndex;
    let e = engine(catalog(), fresh_clock(), Retention::default()).await;
    let idx = e.lock_index();
    // Whole days, so the keys' real TTLs never lapse during the test.
    let (t, d) = (start(), DAY_MS);
    assert!(idx.claim("L", "cus:a", t + 10 * d, t).await.unwrap());
    assert!(!idx
        .claim("L", "cus:b", t + 50 * d, t + 5 * d)
        .await
        .unwrap());
    assert_eq!(
        idx.lookup("L", t + 5 * d).await.unwrap().as_deref(),
        Some("cus:a")
    );
    assert!(
        idx.claim("L", "cus:a", t + 5 * d, t + d).await.unwrap(),
        "the holder claims again"
    );
    assert_eq!(
        idx.lookup("L", t + 9 * d).await.unwrap().as_deref(),
        Some("cus:a"),
        "never shortened"
    );
    // A pending lock without expiry is kept until finalized.
    idx.record("L", "cus:a", None, t).await.unwrap();
    assert!(!idx
        .claim("L", "cus:b", t + 50 * d, t + 20 * d)
        .await
        .unwrap());
    idx.record("L", "cus:a", Some(t + 30 * d), t + 20 * d)
        .await
        .unwrap();
    assert!(
        idx.claim("L", "cus:b", t + 50 * d, t + 30 * d)
            .await
            .unwrap(),
        "free once lapsed"
    );
    assert_eq!(
        idx.lookup("L", t + 31 * d).await.unwrap().as_deref(),
        Some("cus:b")
    );
}

#[tokio::test]
async fn sweep_resets_each_due_customer_once() {
    let clock = fresh_clock();
    let e = engine(catalog(), clock.clone(), Retention::default()).await;
    for i in 0..50 {
        let c = format!("c{i}");
        e.create_customer(&c).await.unwrap();
        e.grant(&c, &Grant::new("api_call", amt("100"), Interval::Month))
            .await
            .unwrap();
        e.grant(&c, &Grant::new("ai_credits", amt("5"), Interval::OneOff))
            .await
            .unwrap();
        e.track(&c, "api_call", amt("60"), OverageBehavior::Cap, None)
            .await
            .unwrap();
    }
    let none = e.sweep_due().await.unwrap();
    assert_eq!((none.customers_swept, none.resets_applied), (0, 0));
    clock.set(creditgate::calendar::ms_of(2027, 2, 1, 0, 0));
    let r = e.sweep_due().await.unwrap();
    assert_eq!((r.customers_swept, r.resets_applied), (50, 50));
    assert_eq!(r.shards_leased_elsewhere, 0);
    let again = e.sweep_due().await.unwrap();
    assert_eq!(again.resets_applied, 0, "a second sweep finds nothing due");
    assert_eq!(e.reset_due("c7").await.unwrap(), 0);
    let p = e.balances("c7").await.unwrap();
    let api = p.pools.iter().find(|p| p.pool == "api_call").unwrap();
    assert_eq!(api.remaining, amt("100"));
    // A second sweeper on the same keys: leases were given back after the
    // sweep, so it may sweep every shard, and finds nothing left to do.
    let other = creditgate::engine::redis::RedisEngine::connect(
        creditgate::engine::redis::RedisOptions {
            namespace: ns_of(&e),
            ..creditgate::engine::redis::RedisOptions::standalone(&RedisServer::shared().url())
        },
        catalog(),
        None,
    )
    .await
    .unwrap();
    let r = other.sweep_due().await.unwrap();
    assert_eq!((r.shards_leased_elsewhere, r.resets_applied), (0, 0));
}

#[tokio::test]
async fn without_a_clock_the_functions_read_redis_time() {
    let server = RedisServer::shared();
    let opts = creditgate::engine::redis::RedisOptions {
        namespace: common::redis::namespace(),
        ..creditgate::engine::redis::RedisOptions::standalone(&server.url())
    };
    let e = creditgate::engine::redis::RedisEngine::connect(opts, catalog(), None)
        .await
        .unwrap();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    e.create_customer("c").await.unwrap();
    e.grant("c", &Grant::new("api_call", amt("10"), Interval::Day))
        .await
        .unwrap();
    let b = e.balances("c").await.unwrap();
    let after = before + 60_000;
    assert!((before - 1_000..after).contains(&b.created_at), "{b:?}");
    let next = b.pools[0].next_reset_at.unwrap();
    assert!((before + DAY_MS - 1_000..after + DAY_MS).contains(&next));
    let out = e
        .consume("c", "api_call", amt("4"), Some("k"))
        .await
        .unwrap();
    assert_eq!(out.pool("api_call").unwrap().remaining, amt("6"));
    let again = e
        .consume("c", "api_call", amt("4"), Some("k"))
        .await
        .unwrap();
    assert!(again.replayed);
}
