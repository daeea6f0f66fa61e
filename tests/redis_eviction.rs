//! Startup refuses a Redis that may evict balances unless told to accept it;
//! a store that goes away answers `StoreUnavailable`. (Its own test binary:
//! it changes its server's configuration and finally stops it.)

mod common;

use common::redis::RedisServer;
use common::{amt, catalog};
use creditgate::engine::redis::{RedisEngine, RedisOptions};
use creditgate::{Engine, EngineError};

#[tokio::test]
async fn eviction_policy_and_unavailable_store() {
    let server = RedisServer::shared();
    let opts = RedisOptions::standalone(&server.url());

    // Nothing listens there.
    let gone = RedisOptions::standalone("unix:///nonexistent/creditgate/redis.sock");
    let err = RedisEngine::connect(gone, catalog(), None)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, EngineError::StoreUnavailable(_)), "{err:?}");

    assert_eq!(
        server
            .cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"])
            .trim(),
        "OK"
    );
    let err = RedisEngine::connect(opts.clone(), catalog(), None)
        .await
        .err()
        .unwrap();
    match err {
        EngineError::StoreUnavailable(m) => assert!(m.to_string().contains("allkeys-lru"), "{m}"),
        other => panic!("accepted an evicting Redis: {other:?}"),
    }
    let accepting = RedisOptions {
        accept_eviction: true,
        ..opts.clone()
    };
    let e = RedisEngine::connect(accepting, catalog(), None)
        .await
        .unwrap();
    assert!(e.create_customer("c").await.unwrap());

    assert_eq!(
        server
            .cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
            .trim(),
        "OK"
    );
    let e = RedisEngine::connect(opts, catalog(), None).await.unwrap();
    assert!(e.check("c", "api_call", amt("1")).await.unwrap().no_balance);

    // The server goes away: every call answers StoreUnavailable.
    server.stop_now();
    let err = e.check("c", "api_call", amt("1")).await.unwrap_err();
    assert!(matches!(err, EngineError::StoreUnavailable(_)), "{err:?}");
}
