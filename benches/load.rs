//! Load test of the sidecar: throughput and latency percentiles of each route
//! against a baseline (`GET /healthz`, no engine) measured in the same run, so
//! the ratios hold on a shared, noisy machine.
//!
//! `cargo bench --bench load -- [--seconds N] [--concurrency C] [--customers K]`
//!
//! The server runs on its own runtime thread; the client shares the machine's
//! cores with it, as a gateway beside the sidecar would.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use creditgate::config::Config;
use creditgate::server;

#[path = "support/mod.rs"]
mod support;
use support::{drive, print_header, Args, Stats};

const CONFIG: &str = include_str!("../examples/creditgate.toml");

/// Starts `creditgate serve` in this process on a free port, on its own
/// runtime thread; returns its base URL.
fn start_server(config_text: &str, env: BTreeMap<String, String>) -> String {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = std_listener.local_addr().unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let config = Config::parse(config_text, &env, 0).expect("bench config");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (state, _) = server::state_from_config(&config).await.expect("state");
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            server::run(listener, state, std::future::pending())
                .await
                .expect("serve");
        });
    });
    format!("http://{addr}")
}

async fn post(client: &reqwest::Client, url: &str, body: serde_json::Value) -> bool {
    match client.post(url).json(&body).send().await {
        Ok(r) => r.status().is_success(),
        Err(_) => false,
    }
}

/// Creates `k` customers on the seed plan plus a large one-off grant, so no
/// request in the run is denied for lack of balance.
async fn seed(client: &reqwest::Client, base: &str, k: usize) {
    for i in 0..k {
        let c = format!("cust-{i:06}");
        assert!(
            post(
                client,
                &format!("{base}/v1/customers.get_or_create"),
                serde_json::json!({"customer_id": c})
            )
            .await
        );
        assert!(
            post(
                client,
                &format!("{base}/v1/billing.attach"),
                serde_json::json!({"customer_id": c, "plan_id": "pro"})
            )
            .await
        );
        let top = serde_json::json!({"customer_id": c, "feature_id": "credits", "included_grant": 1_000_000_000});
        assert!(post(client, &format!("{base}/v1/balances.create"), top).await);
    }
}

async fn run_routes(label: &str, base: &str, args: &Args) -> Vec<(String, Stats)> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()
        .unwrap();
    seed(&client, base, args.customers).await;
    let k = args.customers;
    let mut results = Vec::new();
    let healthz = format!("{base}/healthz");
    let c = client.clone();
    let s = drive(args, move |_| {
        let (c, u) = (c.clone(), healthz.clone());
        async move {
            c.get(&u)
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false)
        }
    })
    .await;
    results.push((format!("{label} GET /healthz (baseline)"), s));
    for (name, path, body) in [
        (
            "POST /v1/check",
            "/v1/check",
            serde_json::json!({"feature_id": "premium_message"}),
        ),
        (
            "POST /v1/check send_event",
            "/v1/check",
            serde_json::json!({"feature_id": "basic_message", "send_event": true}),
        ),
        (
            "POST /v1/track",
            "/v1/track",
            serde_json::json!({"feature_id": "basic_message", "value": 0.5}),
        ),
    ] {
        let url = format!("{base}{path}");
        let c = client.clone();
        let body = Arc::new(body);
        let s = drive(args, move |i| {
            let (c, u, mut b) = (c.clone(), url.clone(), (*body).clone());
            b["customer_id"] = serde_json::json!(format!("cust-{:06}", i as usize % k));
            async move { post(&c, &u, b).await }
        })
        .await;
        results.push((format!("{label} {name}"), s));
    }
    results
}

fn main() {
    let args = Args::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    print_header("sidecar load", &args);
    let started = Instant::now();
    let mut all = Vec::new();
    let base = start_server(CONFIG, BTreeMap::new());
    rt.block_on(support::wait_http(
        &format!("{base}/readyz"),
        Duration::from_secs(10),
    ));
    all.extend(rt.block_on(run_routes("in-process", &base, &args)));
    let redis = match std::env::var_os("CREDITGATE_BENCH_SKIP_REDIS") {
        Some(_) => None,
        None => Some(support::RedisServer::start()),
    };
    if let Some(redis) = redis {
        let env = BTreeMap::from([("CREDITGATE_REDIS_URL".to_string(), redis.url())]);
        let base = start_server(CONFIG, env);
        rt.block_on(support::wait_http(
            &format!("{base}/readyz"),
            Duration::from_secs(10),
        ));
        all.extend(rt.block_on(run_routes("redis", &base, &args)));
        drop(redis);
    }
    support::print_table(&all);
    eprintln!("total {:.1}s", started.elapsed().as_secs_f64());
}
