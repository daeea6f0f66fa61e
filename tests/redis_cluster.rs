//! The Redis engine on a real three-master Redis Cluster: every function call stays
//! in one slot (customers spread over the nodes, each with its due index on
//! its own node), the library is on every primary (and reloaded on a node
//! that lost it), and answers match the in-process engine's.

mod common;

use std::sync::Arc;

use common::cluster::RedisCluster;
use common::{amt, catalog, start};
use creditgate::calendar::{Interval, DAY_MS};
use creditgate::engine::redis::{RedisEngine, RedisOptions, RedisTarget};
use creditgate::model::*;
use creditgate::{Clock, Engine, ManualClock, MemoryEngine};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_answers_like_memory() {
    let cluster = RedisCluster::start(3);
    let clock = Arc::new(ManualClock::new(start()));
    let opts = RedisOptions {
        target: RedisTarget::Cluster(cluster.urls()),
        ..RedisOptions::standalone("")
    };
    let dyn_clock: Arc<dyn Clock> = clock.clone();
    let red = RedisEngine::connect(opts, catalog(), Some(dyn_clock))
        .await
        .unwrap();
    let mem = MemoryEngine::new(catalog(), clock.clone(), Retention::default());
    let customers: Vec<String> = (0..12).map(|i| format!("cus {{{i}}}:é")).collect();
    let mut nodes = std::collections::BTreeSet::new();
    for c in &customers {
        for e in [&red as &dyn Engine, &mem] {
            assert!(e.create_customer(c).await.unwrap());
            let g = Grant {
                rollover: Some(RolloverConfig {
                    max: None,
                    max_percentage: Some(amt("50")),
                    duration: RolloverDuration::Month,
                    length: Some(2),
                }),
                ..Grant::new("ai_credits", amt("100"), Interval::Month)
            };
            e.grant(c, &g).await.unwrap();
            e.grant(c, &Grant::new("action1", amt("5"), Interval::OneOff))
                .await
                .unwrap();
        }
        let k = red.keys(c);
        let node = cluster.node_for(&k.customer);
        assert_eq!(cluster.node_for(&k.locks), node);
        assert_eq!(cluster.node_for(&k.due), node, "due index in the slot");
        nodes.insert(node);
    }
    assert!(nodes.len() > 1, "customers spread over several nodes");
    for round in 0..3 {
        for (i, c) in customers.iter().enumerate() {
            let units = amt(&format!("{}.25", 3 + i + round));
            let a = mem
                .track(c, "action1", units, OverageBehavior::Cap, Some("k"))
                .await;
            let b = red
                .track(c, "action1", units, OverageBehavior::Cap, Some("k"))
                .await;
            assert_eq!(a, b);
            let lock = format!("L{round}");
            let a = mem.reserve(c, &lock, "action2", amt("7"), None, None).await;
            let b = red.reserve(c, &lock, "action2", amt("7"), None, None).await;
            assert_eq!(a, b);
            let a = mem
                .finalize(c, &lock, FinalizeAction::Release, None, None)
                .await;
            let b = red
                .finalize(c, &lock, FinalizeAction::Release, None, None)
                .await;
            assert_eq!(a, b);
            assert_eq!(mem.balances(c).await, red.balances(c).await);
        }
        clock.advance(31 * DAY_MS);
    }
    // The sweep reads every slot's due index across the nodes.
    let r = red.sweep_due().await.unwrap();
    assert_eq!((r.customers_swept, r.resets_applied), (12, 12));
    assert_eq!(red.sweep_due().await.unwrap().customers_swept, 0);
    for c in &customers {
        assert_eq!(mem.balances(c).await, red.balances(c).await);
    }
    // A node that lost the library (FUNCTION FLUSH, a restart without
    // persistence): the next call on it loads it there and succeeds, and
    // readiness puts it back on every primary.
    let cli = |port: u16, args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let name = creditgate::engine::redis::LIBRARY_NAME;
    let c = &customers[0];
    let node = cluster.node_for(&red.keys(c).customer);
    assert_eq!(cli(node, &["FUNCTION", "FLUSH"]).trim(), "OK");
    assert!(!cli(node, &["FUNCTION", "LIST"]).contains(name));
    assert_eq!(mem.balances(c).await, red.balances(c).await);
    assert!(cli(node, &["FUNCTION", "LIST"]).contains(name));
    for &port in &cluster.ports {
        assert_eq!(cli(port, &["FUNCTION", "FLUSH"]).trim(), "OK");
    }
    use creditgate::engine::Readiness;
    assert!(red.readiness().ready().await);
    for &port in &cluster.ports {
        assert!(cli(port, &["FUNCTION", "LIST"]).contains(name), "{port}");
    }
}

/// The ledger on a three-primary cluster: each customer's entries go to its
/// own slot's stream (on its node), and the every-slot drain, sending one
/// command per stream since a cluster pipeline may not cross slots, moves
/// them all into the database; the books balance per customer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_streams_per_slot_drain_from_every_node() {
    use creditgate::engine::redis::keys;
    use creditgate::ledger::drain::{Drain, DrainOptions};
    use creditgate::ledger::store::LedgerStore;
    let cluster = RedisCluster::start(3);
    let clock = Arc::new(ManualClock::new(start()));
    let opts = RedisOptions {
        target: RedisTarget::Cluster(cluster.urls()),
        ledger_cap: Some(1_000_000),
        ..RedisOptions::standalone("")
    };
    let dyn_clock: Arc<dyn Clock> = clock.clone();
    let red = RedisEngine::connect(opts, catalog(), Some(dyn_clock))
        .await
        .unwrap();
    let customers: Vec<String> = (0..12).map(|i| format!("led {{{i}}}")).collect();
    let mut nodes = std::collections::BTreeSet::new();
    for (i, c) in customers.iter().enumerate() {
        red.create_customer(c).await.unwrap();
        red.grant(c, &Grant::new("ai_credits", amt("100"), Interval::Month))
            .await
            .unwrap();
        red.track(
            c,
            "action1",
            amt(&format!("{}", i + 1)),
            OverageBehavior::Cap,
            None,
        )
        .await
        .unwrap();
        nodes.insert(cluster.node_for(&keys::ledger_stream(&red.keys(c).due)));
    }
    assert!(nodes.len() > 1, "streams on several nodes");
    let dir = tempfile::tempdir().unwrap();
    let store = LedgerStore::open(&format!("sqlite://{}/l.db", dir.path().display()))
        .await
        .unwrap();
    let mut drain = Drain::new(
        red.connection(),
        store.clone(),
        red.ledger_streams(),
        DrainOptions {
            create_groups: false,
            cross_slot_pipelines: false,
            ..DrainOptions::default()
        },
    );
    let mut committed = 0;
    for _ in 0..100 {
        committed += drain.round().await.unwrap();
        if committed >= 24 {
            break;
        }
    }
    assert_eq!(committed, 24, "a grant and a track per customer");
    assert_eq!(drain.round().await.unwrap(), 0);
    for (i, c) in customers.iter().enumerate() {
        let entries = store.entries_of(c).await.unwrap();
        assert_eq!(entries.len(), 2, "{c}");
        let books = creditgate::ledger::replay(&entries);
        let b = red.balances(c).await.unwrap();
        let pool = b.pools.iter().find(|p| p.pool == "ai_credits").unwrap();
        let id = &pool.buckets[0].balance_id;
        assert_eq!(
            books.balances[id],
            pool.buckets[0].remaining.raw() as i128,
            "{c}"
        );
        assert_eq!(entries[1].units, amt(&format!("{}", i + 1)));
    }
}
