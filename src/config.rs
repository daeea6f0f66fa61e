//! The sidecar's configuration: a TOML file plus `CREDITGATE_*` environment
//! overrides for every top-level setting.
//!
//! Parsing is a pure function of the file's text and a map of environment
//! variables ([`Config::parse`]), so tests pass a map instead of touching the
//! process environment. Every error names the key it is about, and is found
//! before a port is bound.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Deserialize;

use crate::model::{validate_grant, Catalog, FeatureDef, Plan, MAX_ID_CHARS};
use crate::money::Amount;

/// The prefix of every environment override.
pub const ENV_PREFIX: &str = "CREDITGATE_";

/// A configuration error: the key it is about and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "configuration key `{}`: {}", self.key, self.message)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// What the customer object reports as its `env` (the Autumn SDKs require
/// `sandbox` or `live`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeployEnv {
    Sandbox,
    #[default]
    Live,
}

impl DeployEnv {
    pub fn as_str(self) -> &'static str {
        match self {
            DeployEnv::Sandbox => "sandbox",
            DeployEnv::Live => "live",
        }
    }
}

/// The file as written (before validation).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_listen")]
    listen: String,
    #[serde(default)]
    redis_url: Option<String>,
    #[serde(default)]
    redis_cluster: Option<Vec<String>>,
    #[serde(default)]
    redis_ca_file: Option<String>,
    #[serde(default)]
    api_keys: Vec<String>,
    #[serde(default)]
    admin_keys: Vec<String>,
    #[serde(default)]
    log_format: LogFormat,
    #[serde(default = "default_idempotency_ttl")]
    idempotency_ttl_secs: u64,
    #[serde(default)]
    env: DeployEnv,
    #[serde(default = "default_reset_interval")]
    reset_interval_secs: u64,
    #[serde(default)]
    accept_eviction: bool,
    #[serde(default = "default_redis_timeout")]
    redis_timeout_ms: u64,
    #[serde(default = "default_header_timeout")]
    http_header_timeout_ms: u64,
    #[serde(default = "default_idle_timeout")]
    http_idle_timeout_ms: u64,
    #[serde(default)]
    max_connections: Option<u64>,
    #[serde(default)]
    features: Vec<FeatureDef>,
    #[serde(default)]
    plans: Vec<Plan>,
    #[serde(default)]
    gate: RawGate,
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}

fn default_idempotency_ttl() -> u64 {
    24 * 3600
}

fn default_reset_interval() -> u64 {
    60
}

fn default_redis_timeout() -> u64 {
    2000
}

fn default_header_timeout() -> u64 {
    10_000
}

fn default_idle_timeout() -> u64 {
    75_000
}

/// The kinds of the top-level settings, for parsing environment overrides.
#[derive(Clone, Copy)]
enum Kind {
    Str,
    List,
    Int,
    Bool,
}

const TOP_LEVEL: &[(&str, Kind)] = &[
    ("listen", Kind::Str),
    ("redis_url", Kind::Str),
    ("redis_cluster", Kind::List),
    ("redis_ca_file", Kind::Str),
    ("api_keys", Kind::List),
    ("admin_keys", Kind::List),
    ("log_format", Kind::Str),
    ("idempotency_ttl_secs", Kind::Int),
    ("env", Kind::Str),
    ("reset_interval_secs", Kind::Int),
    ("accept_eviction", Kind::Bool),
    ("redis_timeout_ms", Kind::Int),
    ("http_header_timeout_ms", Kind::Int),
    ("http_idle_timeout_ms", Kind::Int),
    ("max_connections", Kind::Int),
];

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub redis_url: Option<String>,
    /// Seed nodes of a Redis Cluster.
    pub redis_cluster: Option<Vec<String>>,
    /// PEM bundle of the certificates to trust for `rediss://` (instead of
    /// the system's roots).
    pub redis_ca_file: Option<std::path::PathBuf>,
    pub api_keys: Vec<String>,
    pub admin_keys: Vec<String>,
    pub log_format: LogFormat,
    /// How long idempotency records (and finalized locks) are remembered.
    pub idempotency_ttl_secs: u64,
    pub env: DeployEnv,
    /// How often the periodic reset task sweeps (seconds).
    pub reset_interval_secs: u64,
    /// Run on a Redis whose `maxmemory-policy` may evict balances.
    pub accept_eviction: bool,
    /// Bound on connecting to Redis and on each reply; past it a request
    /// answers 503 `store_unavailable` instead of hanging.
    pub redis_timeout_ms: u64,
    /// A client must send a request's headers within this (ms).
    pub http_header_timeout_ms: u64,
    /// An idle keep-alive connection is closed after this (ms).
    pub http_idle_timeout_ms: u64,
    /// Open connections at most; `None`: the open-file limit less a reserve.
    pub max_connections: Option<u64>,
    pub catalog: Arc<Catalog>,
    pub plans: Vec<Plan>,
    /// The forward-auth gate (`/v1/gate`).
    pub gate: GateConfig,
}

impl Config {
    /// Parses the file's text with the environment's overrides (only
    /// `CREDITGATE_*` variables are read; lists are comma-separated). `now`
    /// is the instant plan items are validated against.
    pub fn parse(
        text: &str,
        env: &BTreeMap<String, String>,
        now: i64,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::new("(file)", format!("not valid TOML: {}", e.message()))
        })?;
        for (name, value) in env {
            let Some(key) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let key = key.to_ascii_lowercase();
            let Some((_, kind)) = TOP_LEVEL.iter().find(|(k, _)| *k == key) else {
                if key == "features" || key == "plans" {
                    return Err(ConfigError::new(
                        name.clone(),
                        "features and plans come from the file only",
                    ));
                }
                continue;
            };
            let v = match kind {
                Kind::Str => toml::Value::String(value.clone()),
                Kind::List => toml::Value::Array(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| toml::Value::String(s.to_string()))
                        .collect(),
                ),
                Kind::Bool => toml::Value::Boolean(match value.trim() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(ConfigError::new(name.clone(), "must be true or false")),
                }),
                Kind::Int => toml::Value::Integer(
                    value
                        .trim()
                        .parse()
                        .map_err(|_| ConfigError::new(name.clone(), "must be a whole number"))?,
                ),
            };
            table.insert(key, v);
        }
        let raw: RawConfig =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let path = e.path().to_string();
                let key = if path == "." {
                    "(file)".to_string()
                } else {
                    path
                };
                ConfigError::new(key, e.into_inner().message().to_string())
            })?;
        Config::validate(raw, now)
    }

    /// Reads `path` and the process environment.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
        })?;
        let env: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        Config::parse(
            &text,
            &env,
            crate::clock::Clock::now_ms(&crate::clock::SystemClock),
        )
    }

    fn validate(raw: RawConfig, now: i64) -> Result<Config, ConfigError> {
        let listen: SocketAddr = raw.listen.parse().map_err(|_| {
            ConfigError::new(
                "listen",
                format!("{:?} is not an address like 127.0.0.1:8080", raw.listen),
            )
        })?;
        if raw.redis_url.is_some() && raw.redis_cluster.is_some() {
            return Err(ConfigError::new(
                "redis_cluster",
                "give redis_url or redis_cluster, not both",
            ));
        }
        if let Some(url) = &raw.redis_url {
            if !(url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("unix://"))
            {
                return Err(ConfigError::new(
                    "redis_url",
                    "must start with redis://, rediss:// or unix://",
                ));
            }
        }
        if let Some(nodes) = &raw.redis_cluster {
            if nodes.is_empty() {
                return Err(ConfigError::new(
                    "redis_cluster",
                    "must list at least one node",
                ));
            }
        }
        for (field, keys) in [("api_keys", &raw.api_keys), ("admin_keys", &raw.admin_keys)] {
            for (i, k) in keys.iter().enumerate() {
                if k.trim().is_empty() || k.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(ConfigError::new(
                        format!("{field}[{i}]"),
                        "must be non-empty, without spaces or control characters",
                    ));
                }
            }
        }
        if raw.idempotency_ttl_secs == 0 || raw.idempotency_ttl_secs > 366 * 24 * 3600 {
            return Err(ConfigError::new(
                "idempotency_ttl_secs",
                "must be between 1 and 31622400 (366 days)",
            ));
        }
        if raw.redis_timeout_ms == 0 || raw.redis_timeout_ms > 60_000 {
            return Err(ConfigError::new(
                "redis_timeout_ms",
                "must be between 1 and 60000",
            ));
        }
        for (key, v) in [
            ("http_header_timeout_ms", raw.http_header_timeout_ms),
            ("http_idle_timeout_ms", raw.http_idle_timeout_ms),
        ] {
            if v == 0 || v > 3_600_000 {
                return Err(ConfigError::new(key, "must be between 1 and 3600000"));
            }
        }
        if raw.max_connections == Some(0) {
            return Err(ConfigError::new("max_connections", "must be at least 1"));
        }
        if raw.reset_interval_secs == 0 || raw.reset_interval_secs > 24 * 3600 {
            return Err(ConfigError::new(
                "reset_interval_secs",
                "must be between 1 and 86400",
            ));
        }
        let catalog =
            Catalog::new(raw.features).map_err(|e| ConfigError::new("features", e.to_string()))?;
        let mut seen = std::collections::BTreeSet::new();
        for (p, plan) in raw.plans.iter().enumerate() {
            crate::model::validate_id("plans.id", &plan.id)
                .map_err(|e| ConfigError::new(format!("plans[{p}].id"), e.to_string()))?;
            if !seen.insert(plan.id.clone()) {
                return Err(ConfigError::new(
                    format!("plans[{p}].id"),
                    format!("{:?} is defined twice", plan.id),
                ));
            }
            if plan.items.len() > crate::model::MAX_BUCKETS_PER_CUSTOMER {
                return Err(ConfigError::new(
                    format!("plans[{p}].items"),
                    "at most 64 items",
                ));
            }
            for i in 0..plan.items.len() {
                let key = format!("plans[{p}].items[{i}]");
                if plan.balance_id(i).chars().count() > MAX_ID_CHARS {
                    return Err(ConfigError::new(
                        key,
                        "plan id and feature id together must fit in a 256-character balance id",
                    ));
                }
                let grant = plan.grant(i);
                validate_grant(&grant, &catalog, now)
                    .map_err(|e| ConfigError::new(key, e.to_string()))?;
            }
        }
        let gate = GateConfig::validate(raw.gate, &catalog)?;
        Ok(Config {
            listen,
            redis_url: raw.redis_url,
            redis_cluster: raw.redis_cluster,
            redis_ca_file: raw.redis_ca_file.map(Into::into),
            api_keys: raw.api_keys,
            admin_keys: raw.admin_keys,
            log_format: raw.log_format,
            idempotency_ttl_secs: raw.idempotency_ttl_secs,
            env: raw.env,
            reset_interval_secs: raw.reset_interval_secs,
            accept_eviction: raw.accept_eviction,
            redis_timeout_ms: raw.redis_timeout_ms,
            http_header_timeout_ms: raw.http_header_timeout_ms,
            http_idle_timeout_ms: raw.http_idle_timeout_ms,
            max_connections: raw.max_connections,
            catalog: Arc::new(catalog),
            plans: raw.plans,
            gate,
        })
    }

    pub fn plan(&self, id: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.id == id)
    }
}

/// `[gate]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGate {
    #[serde(default = "default_customer_header")]
    customer_header: String,
    #[serde(default = "default_feature_header")]
    feature_header: String,
    #[serde(default = "default_cost_header")]
    cost_header: String,
    #[serde(default = "default_uri_header")]
    uri_header: String,
    #[serde(default)]
    trust_cost_header: bool,
    #[serde(default = "default_deny_status")]
    deny_status: u16,
    #[serde(default)]
    routes: Vec<RawGateRoute>,
}

impl Default for RawGate {
    fn default() -> Self {
        RawGate {
            customer_header: default_customer_header(),
            feature_header: default_feature_header(),
            cost_header: default_cost_header(),
            uri_header: default_uri_header(),
            trust_cost_header: false,
            deny_status: default_deny_status(),
            routes: vec![],
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateRoute {
    prefix: String,
    feature: String,
    #[serde(default)]
    cost: Option<Amount>,
}

fn default_customer_header() -> String {
    "X-Customer-Id".into()
}
fn default_feature_header() -> String {
    "X-Feature-Id".into()
}
fn default_cost_header() -> String {
    "X-Cost".into()
}
fn default_uri_header() -> String {
    "X-Original-URI".into()
}
fn default_deny_status() -> u16 {
    429
}

/// One row of the gate's route table: requests whose original path starts
/// with `prefix` use `feature` and cost `cost` units of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateRoute {
    pub prefix: String,
    pub feature: String,
    pub cost: Amount,
}

/// The forward-auth gate's settings (`[gate]`). Header names are stored
/// lower-case, as HTTP compares them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateConfig {
    /// Default `X-Customer-Id`.
    pub customer_header: String,
    /// Default `X-Feature-Id`; when present it wins over the route table.
    pub feature_header: String,
    /// Default `X-Cost`; read only with `trust_cost_header`.
    pub cost_header: String,
    /// Default `X-Original-URI`: the original request's path (and query),
    /// matched against the route table.
    pub uri_header: String,
    pub trust_cost_header: bool,
    /// The status of a denial (default 429; nginx needs 403).
    pub deny_status: u16,
    /// Longest matching prefix first.
    pub routes: Vec<GateRoute>,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            customer_header: "x-customer-id".into(),
            feature_header: "x-feature-id".into(),
            cost_header: "x-cost".into(),
            uri_header: "x-original-uri".into(),
            trust_cost_header: false,
            deny_status: 429,
            routes: vec![],
        }
    }
}

/// An HTTP header name (an RFC 9110 token), lower-cased as HTTP compares
/// them; `None` when `v` is not one.
fn header_name(v: &str) -> Option<String> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    (!v.is_empty() && v.chars().all(token)).then(|| v.to_ascii_lowercase())
}

impl GateConfig {
    fn validate(raw: RawGate, catalog: &Catalog) -> Result<GateConfig, ConfigError> {
        let header = |key: &str, v: &str| -> Result<String, ConfigError> {
            header_name(v).ok_or_else(|| {
                ConfigError::new(
                    format!("gate.{key}"),
                    format!("{v:?} is not an HTTP header name"),
                )
            })
        };
        if !(400..=499).contains(&raw.deny_status) {
            return Err(ConfigError::new(
                "gate.deny_status",
                "must be a 4xx status (429 by default; 403 behind nginx auth_request)",
            ));
        }
        let mut routes = Vec::with_capacity(raw.routes.len());
        for (i, r) in raw.routes.into_iter().enumerate() {
            let key = format!("gate.routes[{i}]");
            if !r.prefix.starts_with('/') || r.prefix.chars().any(|c| c.is_control() || c == ' ') {
                return Err(ConfigError::new(
                    format!("{key}.prefix"),
                    "must start with / and hold no spaces or control characters",
                ));
            }
            if routes.iter().any(|x: &GateRoute| x.prefix == r.prefix) {
                return Err(ConfigError::new(
                    format!("{key}.prefix"),
                    format!("{:?} is listed twice", r.prefix),
                ));
            }
            if catalog.feature(&r.feature).is_none() {
                return Err(ConfigError::new(
                    format!("{key}.feature"),
                    format!("unknown feature {:?}", r.feature),
                ));
            }
            let cost = r.cost.unwrap_or(Amount::whole(1));
            if cost.raw() <= 0 {
                return Err(ConfigError::new(
                    format!("{key}.cost"),
                    "must be greater than zero",
                ));
            }
            routes.push(GateRoute {
                prefix: r.prefix,
                feature: r.feature,
                cost,
            });
        }
        // Longest prefix first, so the first match is the longest.
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Ok(GateConfig {
            customer_header: header("customer_header", &raw.customer_header)?,
            feature_header: header("feature_header", &raw.feature_header)?,
            cost_header: header("cost_header", &raw.cost_header)?,
            uri_header: header("uri_header", &raw.uri_header)?,
            trust_cost_header: raw.trust_cost_header,
            deny_status: raw.deny_status,
            routes,
        })
    }

    /// The route of the longest prefix `path` starts with.
    pub fn route_for(&self, path: &str) -> Option<&GateRoute> {
        self.routes.iter().find(|r| path.starts_with(&r.prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
        [[features]]
        id = "basic_message"
        [[features]]
        id = "premium_message"
        [[features]]
        id = "credits"
        type = "credit_system"
        credit_schema = [
          { metered_feature_id = "basic_message", credit_cost = 1 },
          { metered_feature_id = "premium_message", credit_cost = 10 },
        ]
        [[plans]]
        id = "pro"
        items = [{ feature_id = "credits", included = 200, interval = "month" }]
    "#;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_the_seed_with_defaults() {
        let c = Config::parse(SEED, &env(&[]), 0).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert!(c.redis_url.is_none());
        assert_eq!(c.plans[0].balance_id(0), "pro:credits");
        assert_eq!(c.plans[0].items[0].included, Amount::whole(200));
        assert_eq!(c.idempotency_ttl_secs, 86_400);
    }

    #[test]
    fn env_overrides_top_level_keys() {
        let e = env(&[
            ("CREDITGATE_LISTEN", "0.0.0.0:9000"),
            ("CREDITGATE_API_KEYS", "sk_a, sk_b"),
            ("CREDITGATE_IDEMPOTENCY_TTL_SECS", "60"),
            ("OTHER", "x"),
        ]);
        let c = Config::parse(SEED, &e, 0).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.api_keys, vec!["sk_a", "sk_b"]);
        assert_eq!(c.idempotency_ttl_secs, 60);
    }

    #[test]
    fn errors_name_the_key() {
        let both = env(&[
            ("CREDITGATE_REDIS_URL", "redis://a"),
            ("CREDITGATE_REDIS_CLUSTER", "a:1"),
        ]);
        assert_eq!(
            Config::parse(SEED, &both, 0).unwrap_err().key,
            "redis_cluster"
        );
        let e = Config::parse("listen = \"nope\"", &env(&[]), 0).unwrap_err();
        assert_eq!(e.key, "listen");
        let e = Config::parse("listen = 5", &env(&[]), 0).unwrap_err();
        assert_eq!(e.key, "listen");
        let e = Config::parse("lisen = \"a\"", &env(&[]), 0).unwrap_err();
        assert!(e.message.contains("lisen"), "{e}");
        let e =
            Config::parse(SEED, &env(&[("CREDITGATE_IDEMPOTENCY_TTL_SECS", "x")]), 0).unwrap_err();
        assert_eq!(e.key, "CREDITGATE_IDEMPOTENCY_TTL_SECS");
        let bad_plan = format!(
            "{SEED}\n[[plans]]\nid = \"x\"\nitems = [{{ feature_id = \"nope\", included = 1 }}]"
        );
        let e = Config::parse(&bad_plan, &env(&[]), 0).unwrap_err();
        assert_eq!(e.key, "plans[1].items[0]");
        assert!(e.message.contains("nope"), "{e}");
        let bad_amount = SEED.replace("included = 200", "included = 0.00001");
        let e = Config::parse(&bad_amount, &env(&[]), 0).unwrap_err();
        assert_eq!(e.key, "plans[0].items[0].included");
    }

    #[test]
    fn gate_defaults_routes_and_errors() {
        let c = Config::parse(SEED, &env(&[]), 0).unwrap();
        assert_eq!(c.gate, GateConfig::default());
        let text = format!(
            "{SEED}\n[gate]\ndeny_status = 403\ncustomer_header = \"X-User\"\ntrust_cost_header = true\nroutes = [{{ prefix = \"/chat\", feature = \"basic_message\" }}, {{ prefix = \"/chat/premium\", feature = \"premium_message\", cost = 2 }}]"
        );
        let c = Config::parse(&text, &env(&[]), 0).unwrap();
        assert_eq!(c.gate.deny_status, 403);
        assert_eq!(c.gate.customer_header, "x-user");
        assert!(c.gate.trust_cost_header);
        let r = c.gate.route_for("/chat/premium/x").unwrap();
        assert_eq!(
            (r.feature.as_str(), r.cost),
            ("premium_message", Amount::whole(2))
        );
        let r = c.gate.route_for("/chat/basic").unwrap();
        assert_eq!(
            (r.feature.as_str(), r.cost),
            ("basic_message", Amount::whole(1))
        );
        assert!(c.gate.route_for("/other").is_none());
        for (bad, key) in [
            ("[gate]\ndeny_status = 200", "gate.deny_status"),
            (
                "[gate]\nfeature_header = \"bad header\"",
                "gate.feature_header",
            ),
            (
                "[gate]\nroutes = [{ prefix = \"x\", feature = \"credits\" }]",
                "gate.routes[0].prefix",
            ),
            (
                "[gate]\nroutes = [{ prefix = \"/x\", feature = \"nope\" }]",
                "gate.routes[0].feature",
            ),
            (
                "[gate]\nroutes = [{ prefix = \"/x\", feature = \"credits\", cost = 0 }]",
                "gate.routes[0].cost",
            ),
        ] {
            let e = Config::parse(&format!("{SEED}\n{bad}"), &env(&[]), 0).unwrap_err();
            assert_eq!(e.key, key, "{bad}: {e}");
        }
    }

    #[test]
    fn repeated_features_in_a_plan_get_distinct_ids() {
        let text = format!(
            "{SEED}\n[[plans]]\nid = \"two\"\nitems = [{{ feature_id = \"credits\", included = 1, interval = \"month\" }}, {{ feature_id = \"credits\", included = 5 }}]"
        );
        let c = Config::parse(&text, &env(&[]), 0).unwrap();
        let p = c.plan("two").unwrap();
        assert_eq!(p.balance_id(0), "two:credits");
        assert_eq!(p.balance_id(1), "two:credits:2");
    }
}
