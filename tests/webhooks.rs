//! Webhook delivery against a local receiver (127.0.0.1:0) that fails the
//! first attempts of every event with 500 and then accepts, deduplicating
//! by `webhook-id`: every event arrives, correctly signed (checked with
//! `creditgate::webhooks::verify_headers` and independently with hmac), with
//! the same id on every attempt, accepted exactly once per id.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine as _;
use creditgate::webhooks::{verify_headers, Deliverer, Endpoint, Event, Secret, WebhookConfig};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::mpsc;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One attempt as the receiver saw it.
#[derive(Debug, Clone)]
struct Attempt {
    id: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
    headers: HeaderMap,
}

#[derive(Clone)]
struct Receiver {
    /// Attempts to refuse per id before accepting.
    fail_first: usize,
    seen: Arc<Mutex<BTreeMap<String, usize>>>,
    /// Ids accepted (the deduplicating receiver's side effects).
    accepted: Arc<Mutex<Vec<String>>>,
    attempts: mpsc::UnboundedSender<Attempt>,
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let id = h("webhook-id");
    let n = {
        let mut seen = r.seen.lock().unwrap();
        let n = seen.entry(id.clone()).or_default();
        *n += 1;
        *n
    };
    let status = if n <= r.fail_first {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        let mut accepted = r.accepted.lock().unwrap();
        if !accepted.contains(&id) {
            accepted.push(id.clone());
        }
        StatusCode::NO_CONTENT
    };
    // Reported once its effect is recorded, so a test that has seen an
    // attempt sees what it did.
    let _ = r.attempts.send(Attempt {
        id,
        timestamp: h("webhook-timestamp"),
        signature: h("webhook-signature"),
        body: body.to_vec(),
        headers: headers.clone(),
    });
    status
}

async fn start(fail_first: usize) -> (String, Receiver, mpsc::UnboundedReceiver<Attempt>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let r = Receiver {
        fail_first,
        seen: Arc::default(),
        accepted: Arc::default(),
        attempts: tx,
    };
    let app = axum::Router::new()
        .route("/hook", post(receive))
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, r, rx)
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn config(url: &str, max_attempts: u32) -> WebhookConfig {
    WebhookConfig {
        endpoints: vec![Endpoint {
            url: url.to_string(),
            secret: Secret::parse(SECRET).unwrap(),
        }],
        max_attempts,
        backoff: Duration::from_millis(5),
        timeout: Duration::from_secs(5),
    }
}

fn event(i: usize) -> Event {
    Event {
        id: format!("1764667800000-{i}"),
        kind: "balances.usage_alert_triggered".into(),
        at_ms: 1_764_667_800_000,
        data: serde_json::json!({
            "customer_id": format!("c{i}"), "feature_id": "credits",
            "usage_alert": {"threshold": 80, "threshold_type": "usage_percentage"}
        }),
    }
}

/// The signature computed here, from the spec, with hmac directly.
fn independent_signature(id: &str, ts: &str, body: &[u8]) -> String {
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.trim_start_matches("whsec_"))
        .unwrap();
    let mut m = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    m.update(format!("{id}.{ts}.").as_bytes());
    m.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes())
    )
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Attempt>) -> Attempt {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("an attempt within 20 s")
        .expect("the receiver runs")
}

#[tokio::test]
async fn retried_events_arrive_signed_with_one_id_and_are_accepted_once() {
    const FAIL: usize = 2;
    const EVENTS: usize = 5;
    let (url, receiver, mut rx) = start(FAIL).await;
    let (deliverer, queue) = Deliverer::new(config(&url, 5), 2);
    let stats = deliverer.stats();
    let worker = tokio::spawn(deliverer.run());
    let sender = tokio::spawn(async move {
        for i in 0..EVENTS {
            queue.send(event(i)).await.unwrap();
        }
        // Dropping the queue lets the worker finish once drained.
    });
    let secret = Secret::parse(SECRET).unwrap();
    let mut per_id: BTreeMap<String, Vec<Attempt>> = BTreeMap::new();
    for _ in 0..EVENTS * (FAIL + 1) {
        let a = next(&mut rx).await;
        per_id.entry(a.id.clone()).or_default().push(a);
    }
    sender.await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), worker)
        .await
        .expect("the worker ends once the queue is dropped and drained")
        .unwrap();
    assert_eq!(per_id.len(), EVENTS);
    for i in 0..EVENTS {
        let e = event(i);
        let attempts = &per_id[&e.id];
        assert_eq!(
            attempts.len(),
            FAIL + 1,
            "{}: {FAIL} refused, then accepted",
            e.id
        );
        for a in attempts {
            assert_eq!(a.id, e.id, "the same webhook-id on every attempt");
            assert_eq!(a.body, e.body());
            verify_headers(&secret, &a.headers, &a.body, now_secs(), 300).unwrap();
            assert_eq!(
                a.signature,
                independent_signature(&a.id, &a.timestamp, &a.body)
            );
            let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
            assert_eq!(v["type"], "balances.usage_alert_triggered");
            assert_eq!(v["data"]["customer_id"], format!("c{i}"));
        }
    }
    let mut accepted = receiver.accepted.lock().unwrap().clone();
    accepted.sort();
    let mut want: Vec<String> = (0..EVENTS).map(|i| event(i).id).collect();
    want.sort();
    assert_eq!(accepted, want, "each id accepted exactly once");
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(stats.delivered.load(Relaxed), EVENTS as u64);
    assert_eq!(stats.failed_attempts.load(Relaxed), (EVENTS * FAIL) as u64);
    assert_eq!(stats.gave_up.load(Relaxed), 0);
    assert!(rx.try_recv().is_err(), "no attempt after acceptance");
}

#[tokio::test]
async fn gives_up_after_max_attempts_and_counts_it() {
    let (url, receiver, mut rx) = start(usize::MAX).await;
    let (deliverer, queue) = Deliverer::new(config(&url, 3), 1);
    let stats = deliverer.stats();
    let worker = tokio::spawn(deliverer.run());
    queue.send(event(7)).await.unwrap();
    drop(queue);
    for _ in 0..3 {
        assert_eq!(next(&mut rx).await.id, event(7).id);
    }
    tokio::time::timeout(Duration::from_secs(20), worker)
        .await
        .unwrap()
        .unwrap();
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(stats.gave_up.load(Relaxed), 1);
    assert_eq!(stats.failed_attempts.load(Relaxed), 3);
    assert_eq!(stats.delivered.load(Relaxed), 0);
    assert!(receiver.accepted.lock().unwrap().is_empty());
    assert!(rx.try_recv().is_err(), "exactly max_attempts");
}

#[tokio::test]
async fn an_unreachable_endpoint_is_retried_then_given_up() {
    // A port nothing listens on (bound, then closed).
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    drop(l);
    let (deliverer, queue) = Deliverer::new(config(&url, 2), 1);
    let stats = deliverer.stats();
    let worker = tokio::spawn(deliverer.run());
    queue.send(event(1)).await.unwrap();
    drop(queue);
    tokio::time::timeout(Duration::from_secs(20), worker)
        .await
        .unwrap()
        .unwrap();
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(stats.gave_up.load(Relaxed), 1);
    assert_eq!(stats.failed_attempts.load(Relaxed), 2);
}

/// The whole path as `serve` builds it (`server::build_engine` with a
/// `[webhooks]` section, the in-process engine): alerts set through
/// `customers.update` and `balances.limit_reached` arrive at a receiver
/// that refuses every event's first attempts, signed, once per crossing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_and_limits_reached_through_the_api_arrive_once_per_crossing() {
    use axum::http::StatusCode as S;
    use creditgate::config::Config;
    use creditgate::http::{app, AppState};
    use serde_json::json;

    use common::http;

    const FAIL: usize = 2;
    let (url, receiver, mut rx) = start(FAIL).await;
    let text = format!(
        "{}\n[webhooks]\nmax_attempts = 5\nbackoff_ms = 5\nendpoints = [{{ url = \"{url}\", secret = \"{SECRET}\" }}]\n",
        http::CONFIG
    );
    let config = Config::parse(&text, &BTreeMap::new(), http::T0).unwrap();
    let clock = Arc::new(creditgate::ManualClock::new(http::T0));
    let backend = creditgate::server::build_engine(&config, clock.clone())
        .await
        .unwrap();
    let state =
        AppState::new(backend.engine, config.catalog.clone(), clock.clone()).configured(&config);
    let h = http::Harness {
        clock,
        router: app(state.clone()),
        state,
    };
    h.customer_on("c", "pro").await;
    let a = h
        .post(
            "/v1/customers.update",
            json!({"customer_id": "c", "billing_controls": {
                "usage_alerts": [{"feature_id": "credits", "threshold": 150, "threshold_type": "usage"}],
                "usage_limits": [{"feature_id": "premium_message", "limit": 1, "interval": "day"}]
            }}),
        )
        .await;
    assert_eq!(a.status, S::OK, "{}", a.text);
    let consume = |feature: &'static str| json!({"customer_id": "c", "feature_id": feature, "required_balance": 1, "send_event": true});
    // The limit: one premium message a day; the second is its first denial
    // in the window (an event), the third is silent.
    for allowed in [true, false, false] {
        let a = h
            .post("/v1/balances.check", consume("premium_message"))
            .await;
        assert_eq!(a.status, S::OK, "{}", a.text);
        assert_eq!(a.json["allowed"], allowed, "{}", a.text);
    }
    let track =
        |units: i64| json!({"customer_id": "c", "feature_id": "basic_message", "value": units});
    // Credits used 10 of 200: 150 more crosses the alert's 150, a refund
    // re-arms it, the next use crosses again; then the pool runs dry.
    for units in [150, -50, 50, 100] {
        let a = h.post("/v1/track", track(units)).await;
        assert_eq!(a.status, S::OK, "{}", a.text);
    }
    // Four events, each refused FAIL times and then accepted.
    let secret = Secret::parse(SECRET).unwrap();
    let mut per_id: BTreeMap<String, Vec<Attempt>> = BTreeMap::new();
    for _ in 0..4 * (FAIL + 1) {
        let a = next(&mut rx).await;
        verify_headers(&secret, &a.headers, &a.body, now_secs(), 300).unwrap();
        assert_eq!(
            a.signature,
            independent_signature(&a.id, &a.timestamp, &a.body)
        );
        per_id.entry(a.id.clone()).or_default().push(a);
    }
    assert_eq!(per_id.len(), 4, "{:?}", per_id.keys());
    let mut bodies: Vec<serde_json::Value> = vec![];
    for (id, attempts) in &per_id {
        assert_eq!(attempts.len(), FAIL + 1, "{id}");
        assert!(attempts.iter().all(|a| a.body == attempts[0].body), "{id}");
        bodies.push(serde_json::from_slice(&attempts[0].body).unwrap());
    }
    // Ids are ledger entry ids, ordered as the entries were appended.
    let kinds: Vec<(&str, &str)> = bodies
        .iter()
        .map(|b| {
            (
                b["type"].as_str().unwrap(),
                b["data"]["limit_type"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("balances.limit_reached", "usage_limit"),
            ("balances.usage_alert_triggered", ""),
            ("balances.usage_alert_triggered", ""),
            ("balances.limit_reached", "included"),
        ]
    );
    assert_eq!(bodies[0]["data"]["feature_id"], "premium_message");
    assert_eq!(bodies[0]["data"]["customer_id"], "c");
    assert!(bodies[0]["data"]["limit_id"].is_string());
    for b in &bodies[1..3] {
        assert_eq!(b["data"]["customer_id"], "c");
        assert_eq!(b["data"]["feature_id"], "credits");
        assert_eq!(b["data"]["usage_alert"]["threshold"], json!(150));
        assert_eq!(b["data"]["usage_alert"]["threshold_type"], "usage");
        assert_eq!(b["data"]["usage"], json!(160));
    }
    assert_eq!(bodies[3]["data"]["feature_id"], "credits");
    let mut accepted = receiver.accepted.lock().unwrap().clone();
    accepted.sort();
    assert_eq!(accepted, per_id.keys().cloned().collect::<Vec<_>>());
    assert!(rx.try_recv().is_err(), "no attempt beyond these");
}
