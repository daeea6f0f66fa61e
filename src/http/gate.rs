//! `/v1/gate`: forward authentication for gateways (nginx `auth_request`,
//! Traefik ForwardAuth, Envoy ext_authz).
//!
//! The gateway asks before forwarding a request; the gate consumes the
//! request's cost atomically and answers 200 (forward it) or the configured
//! deny status (refuse it), with the RateLimit headers of
//! draft-ietf-httpapi-ratelimit-headers (revision 09 and later) and the older
//! `X-RateLimit-*` trio on both, and `Retry-After` on a denial when a reset
//! will let the request through.
//!
//! Which pool the headers describe when several can pay (a feature's own
//! balance and the credit systems containing it): the pool the check route
//! answers as `balance` ([`views::choose_balance`]) — the feature's own
//! balance if it alone covers the request, else the first credit system that
//! does, else the first owned credit system, else the feature's own balance.
//! Quota and remaining are in that pool's units, rounded down.

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::routes::REPLAYED_HEADER;
use super::views;
use super::AppState;
use crate::calendar::{Period, Step};
use crate::error::EngineError;
use crate::metrics::Decision;
use crate::model::{Outcome, PoolCost};
use crate::money::{Amount, AMOUNT_SCALE};

/// What `w` counts a month as (30 days), so the policy stays the same from
/// one month to the next; `t` gives the exact time to the next reset.
pub const WINDOW_MONTH_SECS: i64 = 30 * 24 * 3600;

/// The body of an allowed answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct GateAllowed {
    pub allowed: bool,
    pub customer_id: String,
    pub feature_id: String,
    /// The units of `feature_id` consumed.
    #[schema(value_type = f64)]
    pub cost: Amount,
}

/// What a request asks the gate.
struct Ask {
    customer: String,
    feature: String,
    cost: Amount,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| ApiError::invalid(name, "must be visible ASCII")),
    }
}

fn required<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
    match header(headers, name)? {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(ApiError::invalid(name, "header is required")),
    }
}

/// The path of an original request URI, percent-decoded with `.`/`..`
/// segments resolved and repeated slashes merged — the path nginx itself
/// routes by — so `/chat/./premium` or `/chat/%70remium` cannot be priced as
/// `/chat`.
pub fn normalize_path(uri: &str) -> Option<String> {
    let raw = uri.split(['?', '#']).next().unwrap_or("");
    // An absolute-form URI: keep its path.
    let raw = match raw.find("://") {
        Some(i) => raw[i + 3..].find('/').map_or("/", |j| &raw[i + 3 + j..]),
        None => raw,
    };
    if !raw.starts_with('/') {
        return None;
    }
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    let path = String::from_utf8(decoded).ok()?;
    if path.chars().any(char::is_control) {
        return None;
    }
    let mut segments: Vec<&str> = Vec::new();
    let trailing = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    Some(out)
}

/// `/v1/gate/<original path>` (Envoy's `path_prefix` appends the original
/// path): the original path when no URI header says otherwise.
fn path_suffix(uri: &Uri) -> Option<&str> {
    let pq = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    pq.strip_prefix(GATE_PATH)
        .filter(|rest| rest.starts_with('/'))
}

/// The methods the gate answers: every standard one a gateway forwards
/// (the OpenAPI document lists them all); any other is 405.
pub const METHODS: axum::routing::MethodFilter = axum::routing::MethodFilter::GET
    .or(axum::routing::MethodFilter::POST)
    .or(axum::routing::MethodFilter::PUT)
    .or(axum::routing::MethodFilter::DELETE)
    .or(axum::routing::MethodFilter::PATCH)
    .or(axum::routing::MethodFilter::HEAD)
    .or(axum::routing::MethodFilter::OPTIONS)
    .or(axum::routing::MethodFilter::TRACE);

/// The gate's path.
pub const GATE_PATH: &str = "/v1/gate";

fn ask(s: &AppState, headers: &HeaderMap, suffix: Option<&str>) -> Result<Ask, ApiError> {
    let g = &s.gate;
    let customer = required(headers, &g.customer_header)?.to_string();
    crate::model::validate_id("customer", &customer)
        .map_err(|e| ApiError::invalid(&g.customer_header, e))?;
    let (feature, mut cost) = match header(headers, &g.feature_header)? {
        Some(f) if !f.is_empty() => (f.to_string(), Amount::whole(1)),
        _ => {
            let uri = header(headers, &g.uri_header)?
                .filter(|u| !u.is_empty())
                .or(suffix);
            let Some(uri) = uri else {
                return Err(ApiError::invalid(
                    &g.feature_header,
                    format!("header is required when {} is absent", g.uri_header),
                ));
            };
            let path = normalize_path(uri)
                .ok_or_else(|| ApiError::invalid(&g.uri_header, "is not a valid request path"))?;
            let route = g.route_for(&path).ok_or_else(|| {
                ApiError::invalid(
                    &g.uri_header,
                    format!(
                        "no [gate] route matches it, and {} is absent",
                        g.feature_header
                    ),
                )
            })?;
            (route.feature.clone(), route.cost)
        }
    };
    if s.service.catalog.feature(&feature).is_none() {
        return Err(ApiError::invalid(
            &g.feature_header,
            format!("unknown feature {feature:?}"),
        ));
    }
    if g.trust_cost_header {
        if let Some(c) = header(headers, &g.cost_header)? {
            let c = Amount::parse(c).map_err(|e| ApiError::invalid(&g.cost_header, e))?;
            if c.raw() <= 0 {
                return Err(ApiError::invalid(
                    &g.cost_header,
                    "must be greater than zero",
                ));
            }
            cost = c;
        }
    }
    Ok(Ask {
        customer,
        feature,
        cost,
    })
}

/// Consumes the request's cost and answers allowed (200) or denied
/// (`[gate] deny_status`, default 429) with rate-limit headers. Also mounted
/// at `/v1/gate/*path`, where `path` stands for the original request path
/// when the URI header is absent.
#[utoipa::path(get, path = "/v1/gate",
    description = "Answers every method. Customer, feature and cost come from headers set by the gateway (X-Customer-Id, X-Feature-Id or the [gate] route table matched against X-Original-URI, X-Cost only with trust_cost_header).",
    params(
        ("X-Customer-Id" = String, Header, description = "set by the gateway from authenticated context", min_length = 1, max_length = 256, pattern = r"^[!-~]([ -~]*[!-~])?$"),
        ("X-Feature-Id" = Option<String>, Header, description = "or a [gate] route matching X-Original-URI"),
        ("X-Original-URI" = Option<String>, Header, description = "the original request's path"),
        ("X-Cost" = Option<f64>, Header, description = "only with [gate] trust_cost_header = true; > 0"),
        ("Idempotency-Key" = Option<String>, Header, description = "scoped to the customer", min_length = 1, max_length = 256, pattern = r"^[!-~]([ -~]*[!-~])?$"),
    ),
    responses(
        (status = 200, body = GateAllowed, description = "allowed; RateLimit-Policy, RateLimit, X-RateLimit-* headers"),
        (status = 400, body = ErrorBody, description = "invalid_inputs: a missing or malformed header"),
        (status = 429, body = ErrorBody, description = "denied ([gate] deny_status): insufficient_balance or customer_not_found; Retry-After when a reset will allow it"),
    ))]
pub async fn gate(
    axum::extract::State(s): axum::extract::State<AppState>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let ask = ask(&s, &headers, path_suffix(&uri))?;
    let key = super::routes::idempotency_key(&headers)?;
    let costs = s.service.catalog.pools_for(&ask.feature)?;
    let deny = StatusCode::from_u16(s.gate.deny_status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
    let out = match s
        .engine()
        .consume(&ask.customer, &ask.feature, ask.cost, key.as_deref())
        .await
    {
        Ok(out) => out,
        Err(EngineError::CustomerNotFound) => {
            let mut resp = denial(deny, "customer_not_found", "customer not found", None);
            limits(&s, &ask, &costs, None).apply(resp.headers_mut());
            return Ok(resp);
        }
        Err(e) if super::store_error::fails_open(&s, &ask.feature, &e) => {
            let body = GateAllowed {
                allowed: true,
                customer_id: ask.customer.clone(),
                feature_id: ask.feature.clone(),
                cost: ask.cost,
            };
            return Ok(super::store_error::mark(&s, &e, Json(body).into_response()));
        }
        Err(e) => return Err(e.into()),
    };
    let lim = limits(&s, &ask, &costs, Some(&out));
    let mut resp = if out.allowed {
        let mut r = Json(GateAllowed {
            allowed: true,
            customer_id: ask.customer.clone(),
            feature_id: ask.feature.clone(),
            cost: ask.cost,
        })
        .into_response();
        r.extensions_mut().insert(Decision("allowed"));
        r
    } else if let Some(d) = &out.limit {
        let message = format!("usage limit {:?} reached", d.id);
        denial(deny, "usage_limit_reached", &message, Some(&d.id))
    } else {
        let message = if out.no_balance {
            format!("the customer has no balance for {:?}", ask.feature)
        } else {
            "insufficient balance".to_string()
        };
        denial(deny, "insufficient_balance", &message, None)
    };
    if !out.replayed {
        for id in &out.shadow_denied {
            s.metrics.shadow_denial(id);
        }
    }
    lim.apply(resp.headers_mut());
    if out.replayed {
        resp.headers_mut()
            .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    Ok(resp)
}

fn denial(status: StatusCode, code: &str, message: &str, limit_id: Option<&str>) -> Response {
    let mut r = (
        status,
        Json(ErrorBody {
            message: message.to_string(),
            code: code.to_string(),
            limit_id: limit_id.map(str::to_string),
        }),
    )
        .into_response();
    r.extensions_mut().insert(Decision("denied"));
    r
}

/// The rate-limit figures of one answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Limits {
    /// The policy name: the pool's id (the feature's id when none is owned).
    pub policy: String,
    /// `None` for an unlimited pool: no quota to advertise.
    pub quota: Option<i64>,
    pub remaining: i64,
    /// Seconds to the pool's next reset; `None` when it never resets.
    pub reset: Option<i64>,
    /// The pool's period in seconds (months count 30 days).
    pub window: Option<i64>,
    /// On a denial: seconds until a reset lets the request through.
    pub retry_after: Option<i64>,
    /// One policy per armed limit on the feature and its paying pools
    /// (shadow limits aside), after the balance's.
    pub limit_policies: Vec<Policy>,
}

/// One constraint's figures (a limit's), in whole units rounded down.
#[derive(Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub quota: i64,
    pub remaining: i64,
    pub window: Option<i64>,
    pub reset: Option<i64>,
}

impl Limits {
    pub fn apply(&self, h: &mut HeaderMap) {
        let mut set = |name: &'static str, v: String| {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(HeaderName::from_static(name), v);
            }
        };
        // Every constraint: the balance's pool (when it has a quota), then
        // each limit. `RateLimit` and the X- trio describe the tightest: the
        // smallest fraction of room left (ties: the first).
        let mut all: Vec<Policy> = Vec::new();
        if let Some(q) = self.quota {
            all.push(Policy {
                name: self.policy.clone(),
                quota: q,
                remaining: self.remaining,
                window: self.window,
                reset: self.reset,
            });
        }
        all.extend(self.limit_policies.iter().map(|p| Policy {
            name: p.name.clone(),
            quota: p.quota,
            remaining: p.remaining,
            window: p.window,
            reset: p.reset,
        }));
        let tightest = all
            .iter()
            .enumerate()
            .fold(None::<usize>, |best, (i, p)| match best {
                Some(b)
                    if (p.remaining as i128) * (all[b].quota as i128)
                        >= (all[b].remaining as i128) * (p.quota as i128) =>
                {
                    Some(b)
                }
                _ => Some(i),
            });
        if let Some(t) = tightest {
            let policy = all
                .iter()
                .map(|p| {
                    let mut s = format!("{};q={}", sf_string(&p.name), p.quota);
                    if let Some(w) = p.window {
                        s.push_str(&format!(";w={w}"));
                    }
                    s
                })
                .collect::<Vec<_>>()
                .join(", ");
            let p = &all[t];
            let mut now = format!("{};r={}", sf_string(&p.name), p.remaining);
            if let Some(t) = p.reset {
                now.push_str(&format!(";t={t}"));
            }
            set("ratelimit-policy", policy);
            set("ratelimit", now);
            set("x-ratelimit-limit", p.quota.to_string());
            set("x-ratelimit-remaining", p.remaining.to_string());
            if let Some(t) = p.reset {
                set("x-ratelimit-reset", t.to_string());
            }
        }
        if let Some(r) = self.retry_after {
            set("retry-after", r.to_string());
        }
    }
}

/// A Structured Fields string: printable ASCII, `"` and `\` escaped; any
/// other character becomes `_`.
pub fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('_'),
        }
    }
    out.push('"');
    out
}

fn whole_floor(a: Amount) -> i64 {
    a.raw().max(0).div_euclid(AMOUNT_SCALE)
}

fn secs_until(t: i64, now: i64) -> i64 {
    let ms = (t - now).max(0);
    (ms + 999) / 1000
}

fn window_secs(p: Period) -> i64 {
    match p.step {
        Step::Millis(ms) => (ms / 1000).max(1),
        Step::Months(m) => m.saturating_mul(WINDOW_MONTH_SECS),
    }
}

fn limits(s: &AppState, ask: &Ask, costs: &[PoolCost], out: Option<&Outcome>) -> Limits {
    let now = s.service.clock.now_ms();
    let empty = Limits {
        policy: ask.feature.clone(),
        quota: Some(0),
        remaining: 0,
        reset: None,
        window: None,
        retry_after: None,
        limit_policies: vec![],
    };
    let Some(out) = out else {
        return empty;
    };
    let limit_policies: Vec<Policy> = out
        .limits
        .iter()
        .filter(|l| !l.shadow)
        .map(|l| Policy {
            name: l.id.clone(),
            quota: whole_floor(l.quota),
            remaining: whole_floor(l.remaining),
            window: Some((l.window_ms / 1000).max(1)),
            reset: l.resets_at.map(|t| secs_until(t, out.at)),
        })
        .collect();
    // Coverage is judged on the balances before this request took its part.
    let spent = if out.allowed && !out.replayed {
        views::spent_by_pool(&out.entries)
    } else {
        Default::default()
    };
    // From the constraint that blocks: a limit's frees-at, else the
    // balance's next reset that covers the request.
    let retry_after = match &out.limit {
        Some(d) => d.frees_at.map(|t| secs_until(t, out.at)),
        None => (!out.allowed)
            .then(|| s.service.retry_after_secs(costs, out, ask.cost))
            .flatten(),
    };
    let Some((p, _)) = views::choose_balance(costs, &out.pools, ask.cost, &spent) else {
        return Limits {
            retry_after,
            limit_policies,
            ..empty
        };
    };
    let window = p
        .buckets
        .iter()
        .filter(|b| b.next_reset_at.is_some() && b.next_reset_at == p.next_reset_at)
        .find_map(|b| Period::new(b.interval, b.interval_count))
        .map(window_secs);
    Limits {
        policy: p.pool.clone(),
        quota: (!p.unlimited).then(|| whole_floor(p.granted)),
        remaining: whole_floor(p.remaining),
        reset: p.next_reset_at.map(|t| secs_until(t, now)),
        window,
        retry_after,
        limit_policies,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_like_nginx() {
        assert_eq!(
            normalize_path("/chat/premium?x=1").unwrap(),
            "/chat/premium"
        );
        assert_eq!(normalize_path("/chat/./premium").unwrap(), "/chat/premium");
        assert_eq!(normalize_path("/chat//premium").unwrap(), "/chat/premium");
        assert_eq!(
            normalize_path("/x/../chat/%70remium").unwrap(),
            "/chat/premium"
        );
        assert_eq!(normalize_path("/chat/").unwrap(), "/chat/");
        assert_eq!(normalize_path("/..").unwrap(), "/");
        assert_eq!(normalize_path("http://h:1/a/b?q").unwrap(), "/a/b");
        assert!(normalize_path("chat").is_none());
        assert!(normalize_path("/a%0Ab").is_none());
        assert!(normalize_path("/a%zz").is_none());
    }

    #[test]
    fn structured_field_strings_are_escaped() {
        assert_eq!(sf_string("credits"), "\"credits\"");
        assert_eq!(sf_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(sf_string("café"), "\"caf_\"");
    }
}
