//! Webhook delivery (issue 14), signed per Standard Webhooks
//! (<https://www.standardwebhooks.com/>): every request carries
//! `webhook-id` (the event's id, the same on every retry, so receivers
//! deduplicate by it), `webhook-timestamp` (Unix seconds of the attempt)
//! and `webhook-signature: v1,<base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))>`,
//! where the key is the base64 after `whsec_` in the endpoint's secret.
//!
//! [`Deliverer`] takes [`Event`]s from a bounded channel and POSTs each to
//! every configured endpoint, retrying with exponential backoff until an
//! endpoint answers 2xx or `max_attempts` is spent (then it logs and counts
//! the give-up): at least once per endpoint. The HTTP client is reqwest with
//! rustls (no default features): receivers are https, and reqwest was
//! already in the tree for the tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::mpsc;

/// A signing secret: `whsec_<base64>` (the prefix optional, as the
/// reference libraries accept it).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the secret is not whsec_ followed by base64")]
    BadSecret,
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("webhook-timestamp is not a whole number of seconds")]
    BadTimestamp,
    #[error("webhook-timestamp is more than the tolerance away from now")]
    Stale,
    #[error("no v1 signature matches")]
    BadSignature,
}

impl Secret {
    pub fn parse(s: &str) -> Result<Secret, VerifyError> {
        let b = s.strip_prefix("whsec_").unwrap_or(s);
        match B64.decode(b) {
            Ok(k) if !k.is_empty() => Ok(Secret(k)),
            _ => Err(VerifyError::BadSecret),
        }
    }

    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(id.as_bytes());
        m.update(b".");
        m.update(timestamp.to_string().as_bytes());
        m.update(b".");
        m.update(body);
        m
    }

    /// `v1,<base64 signature>`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        format!(
            "v1,{}",
            B64.encode(self.mac(id, timestamp, body).finalize().into_bytes())
        )
    }
}

/// Verifies a delivery as a receiver does: the timestamp within
/// `tolerance_secs` of `now_secs` (the spec's libraries use 300), and one of
/// the space-separated `v1,` signatures matching (compared in constant
/// time).
pub fn verify(
    secret: &Secret,
    id: &str,
    timestamp: &str,
    signatures: &str,
    body: &[u8],
    now_secs: i64,
    tolerance_secs: i64,
) -> Result<(), VerifyError> {
    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| VerifyError::BadTimestamp)?;
    if (now_secs - ts).abs() > tolerance_secs {
        return Err(VerifyError::Stale);
    }
    for sig in signatures.split(' ') {
        let Some(("v1", b64)) = sig.split_once(',') else {
            continue;
        };
        let Ok(raw) = B64.decode(b64) else { continue };
        if secret.mac(id, ts, body).verify_slice(&raw).is_ok() {
            return Ok(());
        }
    }
    Err(VerifyError::BadSignature)
}

/// [`verify`] from request headers (`webhook-id`, `webhook-timestamp`,
/// `webhook-signature`).
pub fn verify_headers(
    secret: &Secret,
    headers: &hyper::HeaderMap,
    body: &[u8],
    now_secs: i64,
    tolerance_secs: i64,
) -> Result<(), VerifyError> {
    let h = |name: &'static str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .ok_or(VerifyError::MissingHeader(name))
    };
    verify(
        secret,
        h("webhook-id")?,
        h("webhook-timestamp")?,
        h("webhook-signature")?,
        body,
        now_secs,
        tolerance_secs,
    )
}

/// One event to deliver. `id` is stable (the ledger entry's id: the same
/// event always has the same id, so a redelivery after a restart is
/// deduplicated too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    /// `balances.usage_alert_triggered`, `balances.limit_reached`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The instant of the change (ms).
    pub at_ms: i64,
    pub data: serde_json::Value,
}

impl Event {
    /// The body sent: `{"type", "timestamp" (RFC 3339), "data"}`, the
    /// payload structure Standard Webhooks recommends.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "type": self.kind,
            "timestamp": rfc3339(self.at_ms),
            "data": self.data,
        }))
        .expect("a JSON value serializes")
    }
}

/// `2026-12-02T09:30:00.000Z`.
pub fn rfc3339(ms: i64) -> String {
    let (y, m, d, tod) = crate::calendar::civil_from_ms(ms);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        tod / 3_600_000,
        tod / 60_000 % 60,
        tod / 1000 % 60,
        tod % 1000
    )
}

/// One receiver.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: String,
    pub secret: Secret,
}

/// `[webhooks]`, validated.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub endpoints: Vec<Endpoint>,
    /// Attempts per event per endpoint, the first included (≥ 1).
    pub max_attempts: u32,
    /// The first retry's delay; each next one doubles (capped at
    /// [`MAX_BACKOFF`]).
    pub backoff: Duration,
    /// Bound on one attempt.
    pub timeout: Duration,
}

/// The longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// The wait before attempt `attempt + 1` (attempt counts from 1).
pub fn backoff_delay(base: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1u32 << (attempt.saturating_sub(1)).min(20))
        .min(MAX_BACKOFF)
}

/// What the deliverer did (counters read by tests and `/metrics` wiring).
#[derive(Debug, Default)]
pub struct DeliveryStats {
    /// Events accepted (2xx) by an endpoint.
    pub delivered: AtomicU64,
    /// Attempts that failed (not 2xx, or no answer).
    pub failed_attempts: AtomicU64,
    /// (event, endpoint) pairs given up after `max_attempts`.
    pub gave_up: AtomicU64,
}

/// The sending side of the bounded queue.
#[derive(Clone)]
pub struct Queue(mpsc::Sender<Event>);

impl Queue {
    /// Waits for room (back-pressure on the ledger drain, which acknowledges
    /// entries only once queued).
    pub async fn send(&self, e: Event) -> Result<(), Event> {
        self.0.send(e).await.map_err(|e| e.0)
    }

    /// Without waiting; the event back when the queue is full or closed.
    pub fn try_send(&self, e: Event) -> Result<(), Event> {
        self.0.try_send(e).map_err(|e| match e {
            mpsc::error::TrySendError::Full(e) | mpsc::error::TrySendError::Closed(e) => e,
        })
    }
}

/// The delivery worker.
pub struct Deliverer {
    config: Arc<WebhookConfig>,
    client: reqwest::Client,
    stats: Arc<DeliveryStats>,
    rx: mpsc::Receiver<Event>,
}

impl Deliverer {
    /// A worker and its queue (`capacity` events at most waiting).
    pub fn new(config: WebhookConfig, capacity: usize) -> (Deliverer, Queue) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("the rustls client builds");
        (
            Deliverer {
                config: Arc::new(config),
                client,
                stats: Arc::default(),
                rx,
            },
            Queue(tx),
        )
    }

    pub fn stats(&self) -> Arc<DeliveryStats> {
        self.stats.clone()
    }

    /// Runs until every [`Queue`] is dropped and the queue is drained. Each
    /// event goes to every endpoint concurrently (one slow endpoint does
    /// not hold up the others); events are taken in order.
    pub async fn run(mut self) {
        let mut tasks = tokio::task::JoinSet::new();
        while let Some(event) = self.rx.recv().await {
            let event = Arc::new(event);
            for endpoint in self.config.endpoints.clone() {
                let (client, config, stats, event) = (
                    self.client.clone(),
                    self.config.clone(),
                    self.stats.clone(),
                    event.clone(),
                );
                tasks.spawn(async move {
                    deliver(&client, &config, &stats, &endpoint, &event).await;
                });
            }
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// Starts delivery of `notices` (the ledger's notification entries, in
/// order) to `config`'s endpoints: a [`Deliverer`] and the task feeding it.
/// Each event's id is its entry's id. The feed waits while the delivery's
/// queue is full; both stop when the engine (the notices' sender) is gone.
pub fn spawn_delivery(
    config: WebhookConfig,
    mut notices: mpsc::UnboundedReceiver<crate::ledger::Notice>,
) -> Arc<DeliveryStats> {
    let (deliverer, queue) = Deliverer::new(config, 1024);
    let stats = deliverer.stats();
    tokio::spawn(deliverer.run());
    tokio::spawn(async move {
        while let Some(n) = notices.recv().await {
            let event = Event {
                id: n.entry_id,
                kind: n.kind.to_string(),
                at_ms: n.at,
                data: n.data,
            };
            if queue.send(event).await.is_err() {
                return;
            }
        }
    });
    stats
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// One event to one endpoint, with its retries; `true` once accepted.
pub async fn deliver(
    client: &reqwest::Client,
    config: &WebhookConfig,
    stats: &DeliveryStats,
    endpoint: &Endpoint,
    event: &Event,
) -> bool {
    let body = event.body();
    for attempt in 1..=config.max_attempts.max(1) {
        // A fresh timestamp and signature per attempt, the same id.
        let ts = now_secs();
        let sig = endpoint.secret.sign(&event.id, ts, &body);
        let sent = client
            .post(&endpoint.url)
            .header("content-type", "application/json")
            .header("webhook-id", &event.id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sig)
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                stats.delivered.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            outcome => {
                stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                let why = match outcome {
                    Ok(r) => r.status().to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::debug!(event = %event.id, url = %endpoint.url, attempt, %why, "webhook attempt failed");
            }
        }
        if attempt < config.max_attempts {
            tokio::time::sleep(backoff_delay(config.backoff, attempt)).await;
        }
    }
    stats.gave_up.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(event = %event.id, kind = %event.kind, url = %endpoint.url,
        attempts = config.max_attempts, "webhook delivery given up");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_the_published_test_vectors() {
        // Standard Webhooks' (and Svix's) published vector.
        let s = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let sig = s.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        // The reference Rust library's own test_sign.
        let s2 = Secret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        assert_eq!(
            s2.sign(
                "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
                1649367553,
                br#"{"email":"test@example.com","username":"test_user"}"#
            ),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let ok = |sigs: &str, now| verify(&s, id, "1614265330", sigs, body, now, 300);
        assert_eq!(ok(&sig, 1614265330), Ok(()));
        assert_eq!(ok(&format!("v1,bm9wZQ== {sig}"), 1614265330 + 300), Ok(()));
        assert_eq!(ok(&sig, 1614265330 + 301), Err(VerifyError::Stale));
        assert_eq!(
            ok("v1,bm9wZQ==", 1614265330),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            ok(&sig.replace("v1,", "v2,"), 1614265330),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            verify(&s, id, "1614265330", &sig, b"{}", 1614265330, 300),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            verify(&s, "other", "1614265330", &sig, body, 1614265330, 300),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            verify(&s, id, "x", &sig, body, 1614265330, 300),
            Err(VerifyError::BadTimestamp)
        );
        // Without the prefix, the same key.
        assert_eq!(
            Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap(),
            s
        );
        assert_eq!(Secret::parse("whsec_!!"), Err(VerifyError::BadSecret));
        assert_eq!(Secret::parse("whsec_"), Err(VerifyError::BadSecret));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Duration::from_millis(100);
        assert_eq!(backoff_delay(b, 1), b);
        assert_eq!(backoff_delay(b, 2), b * 2);
        assert_eq!(backoff_delay(b, 4), b * 8);
        assert_eq!(backoff_delay(b, 60), MAX_BACKOFF);
    }

    #[test]
    fn bodies_carry_type_timestamp_and_data() {
        let e = Event {
            id: "1764667800000-0".into(),
            kind: "balances.limit_reached".into(),
            at_ms: crate::calendar::ms_of(2026, 12, 2, 9, 30) + 5_007,
            data: serde_json::json!({"customer_id": "alice"}),
        };
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "balances.limit_reached",
                "timestamp": "2026-12-02T09:30:05.007Z", "data": {"customer_id": "alice"}})
        );
    }
}
