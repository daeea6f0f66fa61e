//! Webhook delivery against a local receiver (127.0.0.1:0) that fails the
//! first attempts of every event with 500 and then accepts, deduplicating
//! by `webhook-id`: every event arrives, correctly signed (checked with
//! `creditgate::webhooks::verify_headers` and independently with hmac), with
//! the same id on every attempt, accepted exactly once per id.

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
    let _ = r.attempts.send(Attempt {
        id: id.clone(),
        timestamp: h("webhook-timestamp"),
        signature: h("webhook-signature"),
        body: body.to_vec(),
        headers: headers.clone(),
    });
    if n <= r.fail_first {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let mut accepted = r.accepted.lock().unwrap();
    if !accepted.contains(&id) {
        accepted.push(id);
    }
    StatusCode::NO_CONTENT
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
