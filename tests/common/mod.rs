//! Shared test fixtures: one catalog, and an engine per kind behind one
//! interface, so every scenario runs on every engine from one definition.
#![allow(dead_code)]

pub mod cluster;
pub mod http;
pub mod postgres;
pub mod redis;

use std::sync::Arc;

use creditgate::calendar::Interval;
use creditgate::model::*;
use creditgate::{Amount, Engine, ManualClock, MemoryEngine};

/// 2027-01-01T00:00Z: every test starts here.
pub fn start() -> i64 {
    http::T0
}

pub fn amt(s: &str) -> Amount {
    Amount::parse(s).expect("test amount")
}

/// The catalog every test uses: the example configuration's.
pub fn catalog() -> Arc<Catalog> {
    http::config().catalog
}

/// An engine and the clock it reads.
pub struct Fx {
    pub engine: Arc<dyn Engine>,
    pub clock: Arc<ManualClock>,
}

impl Fx {
    pub fn memory() -> Fx {
        let clock = Arc::new(ManualClock::new(start()));
        let engine = MemoryEngine::new(catalog(), clock.clone(), Retention::default());
        Fx {
            engine: Arc::new(engine),
            clock,
        }
    }

    /// The Redis engine on this test binary's own redis-server.
    pub async fn redis() -> Fx {
        let clock = Arc::new(ManualClock::new(start()));
        let engine = redis::engine(catalog(), clock.clone(), Retention::default()).await;
        Fx {
            engine: Arc::new(engine),
            clock,
        }
    }

    /// The Redis engine on a real three-master Redis Cluster, one per test
    /// binary (its nodes die with the process), in a fresh key namespace.
    pub async fn cluster() -> Fx {
        static CLUSTER: std::sync::OnceLock<cluster::RedisCluster> = std::sync::OnceLock::new();
        let nodes = CLUSTER
            .get_or_init(|| cluster::RedisCluster::start(3))
            .urls();
        let clock = Arc::new(ManualClock::new(start()));
        let opts = creditgate::engine::redis::RedisOptions {
            target: creditgate::engine::redis::RedisTarget::Cluster(nodes),
            namespace: redis::namespace(),
            ..creditgate::engine::redis::RedisOptions::standalone("")
        };
        let dyn_clock: Arc<dyn creditgate::Clock> = clock.clone();
        let engine =
            creditgate::engine::redis::RedisEngine::connect(opts, catalog(), Some(dyn_clock))
                .await
                .expect("connect the redis engine to the cluster");
        Fx {
            engine: Arc::new(engine),
            clock,
        }
    }

    pub async fn customer(&self, id: &str) -> &Self {
        self.engine
            .create_customer(id)
            .await
            .expect("create customer");
        self
    }

    pub async fn grant(&self, customer: &str, g: Grant) -> String {
        self.engine.grant(customer, &g).await.expect("grant")
    }

    pub async fn monthly(&self, customer: &str, pool: &str, n: &str) -> String {
        self.grant(customer, Grant::new(pool, amt(n), Interval::Month))
            .await
    }

    pub async fn one_off(&self, customer: &str, pool: &str, n: &str) -> String {
        self.grant(customer, Grant::new(pool, amt(n), Interval::OneOff))
            .await
    }

    pub async fn pool(&self, customer: &str, pool: &str) -> PoolBalance {
        let b = self.engine.balances(customer).await.expect("balances");
        b.pools
            .into_iter()
            .find(|p| p.pool == pool)
            .unwrap_or_else(|| panic!("no pool {pool}"))
    }

    pub async fn remaining(&self, customer: &str, pool: &str) -> Amount {
        self.pool(customer, pool).await.remaining
    }

    /// A bucket's own remaining (may be negative).
    pub async fn bucket(&self, customer: &str, pool: &str, id: &str) -> BucketView {
        let p = self.pool(customer, pool).await;
        p.buckets
            .into_iter()
            .find(|b| b.balance_id == id)
            .unwrap_or_else(|| panic!("no bucket {id}"))
    }

    pub async fn track(&self, customer: &str, feature: &str, units: &str) -> Outcome {
        self.engine
            .track(customer, feature, amt(units), OverageBehavior::Cap, None)
            .await
            .expect("track")
    }

    pub async fn consume(&self, customer: &str, feature: &str, units: &str) -> Outcome {
        self.engine
            .consume(customer, feature, amt(units), None)
            .await
            .expect("consume")
    }
}

/// Generates one `#[tokio::test]` per engine for each named scenario
/// `async fn name(fx: Fx)`.
#[macro_export]
macro_rules! on_every_engine {
    ($($name:ident),* $(,)?) => {
        mod memory_engine {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Fx::memory()).await
                }
            )*
        }
        mod redis_engine {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Fx::redis().await).await
                }
            )*
        }
        mod redis_cluster_engine {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Fx::cluster().await).await
                }
            )*
        }
    };
}
