//! The HTTP side: a cheap HTTP/1.1 client (one kept-alive connection per
//! lane, no pool, no URL parsing per request), creditgate's routes as load
//! targets, the naive sidecar's routes, and seeding / reading back customers
//! through the admin API.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use super::books::Balance;
use super::load::{Fail, Op, Reply, Req, Target};
use super::progress::Progress;
use super::Ids;

type Body = http_body_util::Either<Full<Bytes>, Empty<Bytes>>;

/// Where a sidecar is.
#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    host: HeaderValue,
    /// The URL's path, without a trailing slash (usually empty).
    prefix: String,
}

/// A lane's connection, opened on first use and again after a failure.
pub struct Conn(Option<SendRequest<Body>>);

fn raw(x: f64) -> i64 {
    (x * crate::money::AMOUNT_SCALE as f64).round() as i64
}

/// `{message, code}`.
#[derive(Deserialize)]
struct ErrorAnswer {
    #[serde(default)]
    code: String,
}

impl Client {
    /// `http://host:port[/prefix]`.
    pub async fn new(url: &str) -> Result<Client, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("--url {url:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("--url {url:?}: only http:// is supported"));
        }
        let auth = uri
            .authority()
            .ok_or_else(|| format!("--url {url:?} has no host"))?;
        let port = auth.port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((auth.host(), port))
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", auth.host()))?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", auth.host()))?;
        Ok(Client {
            addr,
            host: HeaderValue::from_str(auth.as_str()).map_err(|e| e.to_string())?,
            prefix: uri.path().trim_end_matches('/').to_string(),
        })
    }

    pub fn conn(&self) -> Conn {
        Conn(None)
    }

    async fn connect(&self) -> Result<SendRequest<Body>, Fail> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| Fail::Connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Fail::Connect(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(send)
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        auth: Option<&HeaderValue>,
        body: Option<String>,
    ) -> Request<Body> {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.prefix))
            .header(HOST, self.host.clone());
        if let Some(a) = auth {
            b = b.header(AUTHORIZATION, a.clone());
        }
        let body = match body {
            Some(s) => {
                b = b.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                Body::Left(Full::new(Bytes::from(s)))
            }
            None => Body::Right(Empty::new()),
        };
        b.body(body).expect("a valid request")
    }

    /// Sends on the lane's connection (reconnecting when needed); the status,
    /// and the body.
    pub async fn send(&self, conn: &mut Conn, req: Request<Body>) -> Result<(u16, Bytes), Fail> {
        if conn.0.as_ref().is_none_or(|s| s.is_closed()) {
            conn.0 = Some(self.connect().await?);
        }
        let s = conn.0.as_mut().expect("connected");
        if s.ready().await.is_err() {
            conn.0 = None;
            return Err(Fail::Transport("connection closed".into()));
        }
        let resp = match s.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                conn.0 = None;
                return Err(Fail::Transport(e.to_string()));
            }
        };
        let status = resp.status().as_u16();
        match resp.into_body().collect().await {
            Ok(b) => Ok((status, b.to_bytes())),
            Err(e) => {
                conn.0 = None;
                Err(Fail::Transport(e.to_string()))
            }
        }
    }

    /// POSTs JSON; a non-2xx answer is `Fail::Status` with its code.
    pub async fn post(
        &self,
        conn: &mut Conn,
        path: &str,
        auth: Option<&HeaderValue>,
        body: String,
    ) -> Result<Bytes, Fail> {
        let req = self.request(Method::POST, path, auth, Some(body));
        let (status, bytes) = self.send(conn, req).await?;
        if (200..300).contains(&status) {
            Ok(bytes)
        } else {
            Err(status_fail(status, &bytes))
        }
    }

    pub async fn get_status(&self, path: &str) -> Result<u16, Fail> {
        let mut c = self.conn();
        let req = self.request(Method::GET, path, None, None);
        self.send(&mut c, req).await.map(|(s, _)| s)
    }
}

fn status_fail(status: u16, bytes: &[u8]) -> Fail {
    let code = serde_json::from_slice::<ErrorAnswer>(bytes)
        .map(|e| e.code)
        .unwrap_or_default();
    Fail::Status(status, code)
}

pub fn bearer(key: &Option<String>) -> Option<HeaderValue> {
    key.as_ref()
        .and_then(|k| HeaderValue::from_str(&format!("Bearer {k}")).ok())
}

/// A JSON string literal.
fn js(s: &str) -> String {
    serde_json::to_string(s).expect("a string")
}

/// creditgate's application routes.
pub struct Creditgate {
    pub client: Client,
    pub auth: Option<HeaderValue>,
    pub ids: Ids,
    pub feature: String,
    /// The pool the customers' buckets are in.
    pub pool: String,
    /// Units of `feature` per request, as written in the body.
    pub units: String,
    /// What one request costs in `pool` (raw), for the gate's answers.
    pub cost: i64,
}

#[derive(Deserialize)]
struct PoolAnswer {
    feature_id: String,
    remaining: f64,
}

#[derive(Deserialize)]
struct CheckAnswer {
    allowed: bool,
    required_balance: f64,
    balance: Option<PoolAnswer>,
}

#[derive(Deserialize)]
struct Deduction {
    feature_id: String,
    value: f64,
}

#[derive(Deserialize)]
struct TrackAnswer {
    deductions: Vec<Deduction>,
}

impl Creditgate {
    /// The consuming check's body, shared with the naive sidecar.
    pub fn check_body(&self, customer: usize, send_event: bool) -> String {
        format!(
            "{{\"customer_id\":{},\"feature_id\":{},\"required_balance\":{}{}}}",
            js(&self.ids.name(customer)),
            js(&self.feature),
            self.units,
            if send_event {
                ",\"send_event\":true"
            } else {
                ""
            }
        )
    }

    async fn check(
        &self,
        conn: &mut Conn,
        customer: usize,
        send_event: bool,
    ) -> Result<Reply, Fail> {
        let body = self.check_body(customer, send_event);
        let bytes = self
            .client
            .post(conn, "/v1/balances.check", self.auth.as_ref(), body)
            .await?;
        let a: CheckAnswer =
            serde_json::from_slice(&bytes).map_err(|e| Fail::Decode(e.to_string()))?;
        let in_pool = a.balance.as_ref().filter(|b| b.feature_id == self.pool);
        Ok(Reply {
            allowed: a.allowed,
            charged: if a.allowed && send_event && in_pool.is_some() {
                raw(a.required_balance)
            } else {
                0
            },
            remaining: in_pool.map(|b| raw(b.remaining)),
            charging: send_event,
        })
    }

    async fn track(&self, conn: &mut Conn, customer: usize) -> Result<Reply, Fail> {
        let body = format!(
            "{{\"customer_id\":{},\"feature_id\":{},\"value\":{}}}",
            js(&self.ids.name(customer)),
            js(&self.feature),
            self.units
        );
        let bytes = self
            .client
            .post(conn, "/v1/track", self.auth.as_ref(), body)
            .await?;
        let a: TrackAnswer =
            serde_json::from_slice(&bytes).map_err(|e| Fail::Decode(e.to_string()))?;
        let charged = a
            .deductions
            .iter()
            .filter(|d| d.feature_id == self.pool)
            .map(|d| raw(d.value))
            .sum();
        // A `cap` track never refuses: it charges what fits.
        Ok(Reply {
            allowed: true,
            charged,
            remaining: None,
            charging: true,
        })
    }

    async fn gate(&self, conn: &mut Conn, customer: usize) -> Result<Reply, Fail> {
        let mut req = self
            .client
            .request(Method::POST, "/v1/gate", self.auth.as_ref(), None);
        let h = req.headers_mut();
        h.insert(
            "x-customer-id",
            HeaderValue::from_str(&self.ids.name(customer))
                .map_err(|e| Fail::Decode(e.to_string()))?,
        );
        h.insert(
            "x-feature-id",
            HeaderValue::from_str(&self.feature).map_err(|e| Fail::Decode(e.to_string()))?,
        );
        let (status, bytes) = self.client.send(conn, req).await?;
        match status {
            200 => Ok(Reply {
                allowed: true,
                charged: self.cost,
                remaining: None,
                charging: true,
            }),
            _ => match status_fail(status, &bytes) {
                Fail::Status(_, c) if c == "insufficient_balance" => Ok(Reply {
                    allowed: false,
                    charged: 0,
                    remaining: None,
                    charging: true,
                }),
                f => Err(f),
            },
        }
    }
}

impl Target for Creditgate {
    type Conn = Conn;

    async fn open(&self, _lane: usize) -> Result<Conn, String> {
        Ok(self.client.conn())
    }

    async fn call(&self, conn: &mut Conn, req: Req) -> Result<Reply, Fail> {
        match req.op {
            Op::Check => self.check(conn, req.customer, false).await,
            Op::Consume => self.check(conn, req.customer, true).await,
            Op::Track => self.track(conn, req.customer).await,
            Op::Gate => self.gate(conn, req.customer).await,
        }
    }

    fn abandon(&self, conn: &mut Conn) {
        conn.0 = None;
    }
}

/// The naive sidecar's routes: `/hello` (parse, answer) and `/check_cm`
/// (parse, one minimal-script call), fed the consuming check's body.
pub struct Naive {
    pub client: Client,
    pub path: &'static str,
    pub body: Arc<Creditgate>,
    /// What an allowed `/check_cm` charges (raw): `required_balance` credits.
    pub cost: i64,
}

#[derive(Deserialize)]
struct NaiveAnswer {
    allowed: bool,
    remaining: Option<i64>,
}

impl Target for Naive {
    type Conn = Conn;

    async fn open(&self, _lane: usize) -> Result<Conn, String> {
        Ok(self.client.conn())
    }

    async fn call(&self, conn: &mut Conn, req: Req) -> Result<Reply, Fail> {
        let body = self.body.check_body(req.customer, true);
        let bytes = self.client.post(conn, self.path, None, body).await?;
        let a: NaiveAnswer =
            serde_json::from_slice(&bytes).map_err(|e| Fail::Decode(e.to_string()))?;
        let charging = a.remaining.is_some();
        Ok(Reply {
            allowed: a.allowed,
            charged: if a.allowed && charging { self.cost } else { 0 },
            remaining: a.remaining.map(|r| r * crate::money::AMOUNT_SCALE),
            charging,
        })
    }

    fn abandon(&self, conn: &mut Conn) {
        conn.0 = None;
    }
}

/// Runs `f(conn, i)` for every customer on `lanes` connections, with a bar.
async fn each_customer<F, Fut, T>(
    client: &Client,
    customers: usize,
    lanes: usize,
    bar: Arc<super::progress::TaskBar>,
    f: F,
) -> Result<Vec<T>, String>
where
    F: Fn(Conn, usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = (Conn, Result<T, String>)> + Send,
    T: Send + Default + Clone + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..lanes.clamp(1, customers.max(1)) {
        let (client, next, f, bar) = (client.clone(), next.clone(), f.clone(), bar.clone());
        handles.push(tokio::spawn(async move {
            let mut conn = client.conn();
            let mut got = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= customers {
                    return Ok(got);
                }
                let (c, r) = f(conn, i).await;
                conn = c;
                got.push((i, r?));
                bar.inc(1);
            }
        }));
    }
    let mut out = vec![T::default(); customers];
    for h in handles {
        let got: Result<Vec<(usize, T)>, String> = h.await.map_err(|e| e.to_string())?;
        for (i, v) in got? {
            out[i] = v;
        }
    }
    Ok(out)
}

/// Creates every customer with `buckets` one-off buckets of `grant` in
/// `pool` (ids `bench-0`, `bench-1`, …). Returns, per customer, whether it
/// already held them (a reused run prefix).
#[allow(clippy::too_many_arguments)]
pub async fn seed(
    client: &Client,
    admin: Option<HeaderValue>,
    ids: &Ids,
    customers: usize,
    buckets: usize,
    pool: &str,
    grant: &str,
    lanes: usize,
    progress: &Progress,
) -> Result<Vec<bool>, String> {
    let bar = Arc::new(progress.task("seeding customers (http)", customers as u64));
    let (ids, pool, grant, admin) = (
        ids.clone(),
        pool.to_string(),
        grant.to_string(),
        Arc::new(admin),
    );
    let client2 = client.clone();
    let out = each_customer(client, customers, lanes, bar.clone(), move |mut conn, i| {
        let (client, ids, pool, grant, admin) = (
            client2.clone(),
            ids.clone(),
            pool.clone(),
            grant.clone(),
            admin.clone(),
        );
        async move {
            let id = js(&ids.name(i));
            let r = async {
                let body = format!("{{\"customer_id\":{id}}}");
                client
                    .post(&mut conn, "/v1/customers.get_or_create", (*admin).as_ref(), body)
                    .await
                    .map_err(|f| format!("customers.get_or_create: {}", f.kind()))?;
                let mut existed = false;
                for j in 0..buckets {
                    let body = format!(
                        "{{\"customer_id\":{id},\"feature_id\":{},\"included_grant\":{grant},\"balance_id\":\"bench-{j}\"}}",
                        js(&pool)
                    );
                    match client
                        .post(&mut conn, "/v1/balances.create", (*admin).as_ref(), body)
                        .await
                    {
                        Ok(_) => {}
                        Err(Fail::Status(409, c)) if c == "balance_already_exists" => existed = true,
                        Err(f) => return Err(format!("balances.create: {}", f.kind())),
                    }
                }
                Ok(existed)
            }
            .await;
            (conn, r)
        }
    })
    .await;
    bar.finish();
    out
}

#[derive(Deserialize)]
struct CustomerAnswer {
    balances: std::collections::BTreeMap<String, UsageAnswer>,
}

#[derive(Deserialize)]
struct UsageAnswer {
    usage: f64,
    remaining: f64,
}

/// Every customer's balance in `pool`, through `customers.get`.
#[allow(clippy::too_many_arguments)]
pub async fn read_back(
    client: &Client,
    auth: Option<HeaderValue>,
    ids: &Ids,
    customers: usize,
    pool: &str,
    lanes: usize,
    progress: &Progress,
    what: &str,
) -> Result<Vec<Balance>, String> {
    let bar = Arc::new(progress.task(what, customers as u64));
    let (ids, pool, auth) = (ids.clone(), pool.to_string(), Arc::new(auth));
    let client2 = client.clone();
    let out = each_customer(client, customers, lanes, bar.clone(), move |mut conn, i| {
        let (client, ids, pool, auth) = (client2.clone(), ids.clone(), pool.clone(), auth.clone());
        async move {
            let body = format!("{{\"customer_id\":{}}}", js(&ids.name(i)));
            let r = match client
                .post(&mut conn, "/v1/customers.get", (*auth).as_ref(), body)
                .await
            {
                Ok(bytes) => serde_json::from_slice::<CustomerAnswer>(&bytes)
                    .map_err(|e| format!("customers.get: {e}"))
                    .map(|c| {
                        c.balances
                            .get(&pool)
                            .map_or_else(Balance::default, |b| Balance {
                                spent: raw(b.usage),
                                remaining: raw(b.remaining),
                            })
                    }),
                Err(f) => Err(format!("customers.get {}: {}", ids.name(i), f.kind())),
            };
            (conn, r)
        }
    })
    .await;
    bar.finish();
    out
}
