//! The sidecar's configuration: a TOML file plus `CREDITGATE_*` environment
//! overrides for every top-level setting.
//!
//! Layering is [`figment`]'s: defaults (the serde defaults of the file's
//! shape) ← the file ← `CREDITGATE_*` variables. Parsing is a pure function
//! of the file's text and a map of environment variables ([`Config::parse`]),
//! so tests pass a map instead of touching the process environment. Every
//! error names the key it is about (its path, e.g. `features[2].credit_shema`,
//! or the variable, e.g. `CREDITGATE_REDIS_TIMEOUT_MS`; a TOML syntax error
//! its line and column), and is found before a port is bound. A
//! `CREDITGATE_*` variable that names no key is not an error (scripts set
//! their own) but a [`ConfigWarning`] the caller logs.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::Deserialize;

use crate::model::{validate_grant, Catalog, FeatureDef, Plan, StoreErrorPolicy, MAX_ID_CHARS};
use crate::money::Amount;

/// The prefix of every environment override.
pub const ENV_PREFIX: &str = "CREDITGATE_";

/// Top-level keys that come from the file only.
const FILE_ONLY: [&str; 5] = ["features", "plans", "gate", "webhooks", "ledger"];

/// A configuration error: the key it is about and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The key's path (`features[2].credit_schema`), the environment
    /// variable (`CREDITGATE_LISTEN`), or `(file)` for the file as a whole.
    pub key: String,
    pub message: String,
    /// Line and column (1-based) of a TOML syntax error.
    pub at: Option<(usize, usize)>,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            key: key.into(),
            message: message.into(),
            at: None,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some((line, column)) => write!(
                f,
                "configuration file line {line}, column {column}: {}",
                self.message
            ),
            None if self.key == FILE_KEY => write!(f, "configuration file: {}", self.message),
            None => write!(f, "configuration key `{}`: {}", self.key, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The key of an error about the file as a whole.
const FILE_KEY: &str = "(file)";

/// Something in the environment that is not an error but is probably a
/// mistake: a `CREDITGATE_*` variable that names no configuration key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    pub variable: String,
    /// The variable of the nearest key, when one is close.
    pub did_you_mean: Option<String>,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "environment variable {} names no configuration key and is ignored",
            self.variable
        )?;
        if let Some(close) = &self.did_you_mean {
            write!(f, "; did you mean {close}?")?;
        }
        Ok(())
    }
}

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

/// The file as written (before validation). Its fields are the top-level
/// keys, and so the `CREDITGATE_*` variables: an environment value is a
/// string, which the `env_*` readers of the non-string settings accept
/// besides their TOML type.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    listen: String,
    redis_url: Option<String>,
    #[serde(deserialize_with = "env_list::optional")]
    redis_cluster: Option<Vec<String>>,
    redis_ca_file: Option<String>,
    #[serde(deserialize_with = "env_list::required")]
    api_keys: Vec<String>,
    #[serde(deserialize_with = "env_list::required")]
    admin_keys: Vec<String>,
    log_format: LogFormat,
    #[serde(deserialize_with = "env_int")]
    idempotency_ttl_secs: u64,
    env: DeployEnv,
    #[serde(deserialize_with = "env_int")]
    reset_interval_secs: u64,
    #[serde(deserialize_with = "env_bool")]
    accept_eviction: bool,
    #[serde(deserialize_with = "env_int")]
    redis_timeout_ms: u64,
    #[serde(deserialize_with = "env_int")]
    redis_safety_check_ms: u64,
    #[serde(deserialize_with = "env_int")]
    redis_wait_replicas: u64,
    #[serde(deserialize_with = "env_int")]
    redis_wait_pool: u64,
    on_store_error: StoreErrorPolicy,
    #[serde(deserialize_with = "env_int")]
    http_header_timeout_ms: u64,
    #[serde(deserialize_with = "env_int")]
    http_idle_timeout_ms: u64,
    #[serde(deserialize_with = "env_int_opt")]
    max_connections: Option<u64>,
    features: Vec<FeatureDef>,
    plans: Vec<Plan>,
    gate: RawGate,
    ledger: RawLedger,
    webhooks: RawWebhooks,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            listen: "127.0.0.1:8080".into(),
            redis_url: None,
            redis_cluster: None,
            redis_ca_file: None,
            api_keys: vec![],
            admin_keys: vec![],
            log_format: LogFormat::Text,
            idempotency_ttl_secs: 24 * 3600,
            env: DeployEnv::Live,
            reset_interval_secs: 60,
            accept_eviction: false,
            redis_timeout_ms: 2000,
            redis_safety_check_ms: 5000,
            redis_wait_replicas: 0,
            redis_wait_pool: 32,
            on_store_error: StoreErrorPolicy::Deny,
            http_header_timeout_ms: 10_000,
            http_idle_timeout_ms: 75_000,
            max_connections: None,
            features: vec![],
            plans: vec![],
            ledger: RawLedger::default(),
            gate: RawGate::default(),
            webhooks: RawWebhooks::default(),
        }
    }
}

/// A whole number: a TOML integer, or (from the environment) its digits.
fn env_int<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a whole number")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom("must be a whole number, not negative"))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u64, E> {
            v.trim()
                .parse()
                .map_err(|_| E::custom(format!("must be a whole number, not {v:?}")))
        }
    }
    d.deserialize_any(V)
}

/// A boolean: TOML `true`/`false`, or (from the environment) `true`, `false`,
/// `1` or `0`.
/// An optional whole number (see [`env_int`]).
fn env_int_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    env_int(d).map(Some)
}

fn env_bool<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("true or false")
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<bool, E> {
            Ok(v)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<bool, E> {
            match v.trim() {
                "true" | "1" => Ok(true),
                "false" | "0" => Ok(false),
                _ => Err(E::custom(format!(
                    "must be true or false (or 1 or 0), not {v:?}"
                ))),
            }
        }
    }
    d.deserialize_any(V)
}

/// A list of strings: a TOML array, or (from the environment) one string of
/// comma-separated items (blank items dropped).
mod env_list {
    use std::fmt;

    use serde::de::{Error, SeqAccess, Visitor};
    use serde::Deserializer;

    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of strings (comma-separated in the environment)")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
            while let Some(item) = seq.next_element::<String>()? {
                out.push(item);
            }
            Ok(out)
        }
        fn visit_str<E: Error>(self, v: &str) -> Result<Vec<String>, E> {
            Ok(v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect())
        }
    }

    pub fn required<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        d.deserialize_any(V)
    }

    pub fn optional<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
        d.deserialize_any(V).map(Some)
    }
}

/// The field names of a struct's `Deserialize` (what serde's derive passes
/// to `deserialize_struct`): the top-level keys, read from [`RawConfig`]
/// itself rather than repeated in a list.
fn struct_fields<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    use serde::de::{Error, Visitor};
    use serde::forward_to_deserialize_any;
    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Probe<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(Error::custom("probed"))
        }
        forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// The file, parsed by `toml` (for the line and column of a syntax error),
/// as a figment provider.
struct FileProvider(toml::Table);

/// The metadata name of the file's values.
const FILE_SOURCE: &str = "configuration file";
/// The metadata name of the environment's values.
const ENV_SOURCE: &str = "environment";

impl Provider for FileProvider {
    fn metadata(&self) -> Metadata {
        Metadata::named(FILE_SOURCE)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let dict = Value::serialize(&self.0)?
            .into_dict()
            .ok_or_else(|| figment::Error::from("the file is not a table".to_string()))?;
        Ok(Profile::Default.collect(dict))
    }
}

/// The `CREDITGATE_*` variables that name top-level keys, as strings (figment's
/// own `Env` provider reads only the process environment; this one reads the
/// map [`Config::parse`] is given). An error about one names the variable.
struct EnvProvider(Dict);

impl Provider for EnvProvider {
    fn metadata(&self) -> Metadata {
        Metadata::named(ENV_SOURCE).interpolater(|_: &Profile, keys: &[&str]| {
            format!(
                "{ENV_PREFIX}{}",
                keys.first()
                    .copied()
                    .unwrap_or_default()
                    .to_ascii_uppercase()
            )
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.0.clone()))
    }
}

/// Splits the environment into overrides of top-level keys and warnings
/// about `CREDITGATE_*` variables that name none; a variable for a
/// file-only key is an error.
fn env_overrides(
    env: &BTreeMap<String, String>,
) -> Result<(Dict, Vec<ConfigWarning>), ConfigError> {
    let keys = struct_fields::<RawConfig>();
    let settable = || keys.iter().filter(|k| !FILE_ONLY.contains(k));
    let mut dict = Dict::new();
    let mut warnings = Vec::new();
    for (name, value) in env {
        let Some(key) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let key = key.to_ascii_lowercase();
        if FILE_ONLY.contains(&key.as_str()) {
            return Err(ConfigError::new(
                name.clone(),
                "features, plans, [gate], [webhooks] and [ledger] come from the file only",
            ));
        }
        if settable().any(|k| *k == key) {
            dict.insert(key, Value::from(value.clone()));
            continue;
        }
        let nearest = settable()
            .map(|k| (strsim::levenshtein(k, &key), k))
            .min()
            .filter(|(distance, k)| *distance <= 2.max(k.len() / 4));
        warnings.push(ConfigWarning {
            variable: name.clone(),
            did_you_mean: nearest.map(|(_, k)| format!("{ENV_PREFIX}{}", k.to_ascii_uppercase())),
        });
    }
    Ok((dict, warnings))
}

/// The key a figment error is about: the variable for an environment value,
/// else the path (`features[2].credit_schema`), else `(file)`.
fn figment_error(e: figment::Error) -> ConfigError {
    let from_env = e
        .metadata
        .as_ref()
        .is_some_and(|m| m.name == ENV_SOURCE && !e.path.is_empty());
    let key = if from_env {
        let md = e.metadata.as_ref().expect("checked above");
        md.interpolate(&Profile::Default, &e.path)
    } else if e.path.is_empty() {
        FILE_KEY.to_string()
    } else {
        let mut key = String::new();
        for part in &e.path {
            if part.parse::<usize>().is_ok() {
                key.push_str(&format!("[{part}]"));
            } else {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(part);
            }
        }
        key
    };
    let message = match &e.kind {
        figment::error::Kind::UnknownField(field, expected) => format!(
            "unknown field `{field}`; expected {}",
            figment::error::OneOf(expected)
        ),
        kind => kind.to_string(),
    };
    ConfigError::new(key, message)
}

/// The 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

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
    /// Bound on every Redis call, reconnecting included; past it a request
    /// answers 503 `store_timeout` (outcome unknown) for a write, 503
    /// `store_unavailable` for a read (docs/store-failures.md).
    pub redis_timeout_ms: u64,
    /// How often the Redis safety check runs (eviction policy, the
    /// library, the deadline's clock offset).
    pub redis_safety_check_ms: u64,
    /// Writes wait for this many replicas' acknowledgement (0: never);
    /// docs/store-failures.md.
    pub redis_wait_replicas: u32,
    /// Connections waiting writes take (each waits on its own).
    pub redis_wait_pool: usize,
    /// What decisions answer when the store fails; a feature's own
    /// `on_store_error` overrides it.
    pub on_store_error: StoreErrorPolicy,
    /// A client must send a request's headers within this (ms).
    pub http_header_timeout_ms: u64,
    /// An idle keep-alive connection is closed after this (ms).
    pub http_idle_timeout_ms: u64,
    /// Open connections at most; `None`: the open-file limit less a reserve.
    pub max_connections: Option<u64>,
    pub catalog: Arc<Catalog>,
    pub plans: Vec<Plan>,
    /// `[ledger]`: `None` when it names no `url` (no ledger).
    pub ledger: Option<LedgerConfig>,
    /// The forward-auth gate (`/v1/gate`).
    pub gate: GateConfig,
    /// `[webhooks]`: `None` without endpoints (no deliveries).
    pub webhooks: Option<crate::webhooks::WebhookConfig>,
    /// `CREDITGATE_*` variables that name no key (logged at startup).
    pub warnings: Vec<ConfigWarning>,
}

impl Config {
    /// Parses the file's text with the environment's overrides (only
    /// `CREDITGATE_*` variables are read; lists are comma-separated). `now`
    /// is the instant plan items are validated against. Variables that name
    /// no key end up in [`Config::warnings`].
    pub fn parse(
        text: &str,
        env: &BTreeMap<String, String>,
        now: i64,
    ) -> Result<Config, ConfigError> {
        let file: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError {
            key: FILE_KEY.to_string(),
            message: format!("not valid TOML: {}", e.message().trim_end()),
            at: e.span().map(|s| line_column(text, s.start)),
        })?;
        let (overrides, warnings) = env_overrides(env)?;
        let raw: RawConfig = Figment::new()
            .merge(FileProvider(file))
            .merge(EnvProvider(overrides))
            .extract()
            .map_err(figment_error)?;
        let mut config = Config::validate(raw, now)?;
        config.warnings = warnings;
        Ok(config)
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
        if raw.redis_wait_replicas > 16 {
            return Err(ConfigError::new("redis_wait_replicas", "must be 0 to 16"));
        }
        if raw.redis_wait_pool == 0 || raw.redis_wait_pool > 1024 {
            return Err(ConfigError::new(
                "redis_wait_pool",
                "must be between 1 and 1024",
            ));
        }
        if raw.redis_wait_replicas > 0 && raw.redis_ca_file.is_some() {
            return Err(ConfigError::new(
                "redis_wait_replicas",
                "is not supported with redis_ca_file (its connection pool trusts the system's roots only)",
            ));
        }
        if raw.redis_safety_check_ms < 10 || raw.redis_safety_check_ms > 3_600_000 {
            return Err(ConfigError::new(
                "redis_safety_check_ms",
                "must be between 10 and 3600000",
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
            let mut ids = std::collections::BTreeSet::new();
            for (i, spec) in plan.limits.iter().enumerate() {
                let key = format!("plans[{p}].limits[{i}]");
                let def = spec
                    .build(
                        crate::limits::LimitList::Plan,
                        crate::limits::LimitSource::Plan(plan.id.clone()),
                        &catalog,
                    )
                    .map_err(|e| ConfigError::new(key.clone(), e.to_string()))?;
                if !ids.insert(def.id.clone()) {
                    return Err(ConfigError::new(
                        key,
                        format!("limit id {:?} is defined twice in the plan", def.id),
                    ));
                }
            }
            let mut alert_ids = std::collections::BTreeSet::new();
            for (i, spec) in plan.usage_alerts.iter().enumerate() {
                let key = format!("plans[{p}].usage_alerts[{i}]");
                let def = spec
                    .build(
                        crate::alerts::AlertList::Plan,
                        crate::alerts::AlertSource::Plan(plan.id.clone()),
                        |f| catalog.feature(f).is_some(),
                    )
                    .map_err(|e| ConfigError::new(key.clone(), e.to_string()))?;
                if !alert_ids.insert(def.id.clone()) {
                    return Err(ConfigError::new(
                        key,
                        format!("alert {:?} is defined twice in the plan", def.id),
                    ));
                }
            }
            if plan.usage_alerts.len() > crate::alerts::MAX_ALERTS_PER_CUSTOMER {
                return Err(ConfigError::new(
                    format!("plans[{p}].usage_alerts"),
                    "at most 32 alerts",
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
        let webhooks = raw.webhooks.validate()?;
        let ledger = LedgerConfig::validate(raw.ledger)?;
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
            redis_safety_check_ms: raw.redis_safety_check_ms,
            redis_wait_replicas: raw.redis_wait_replicas as u32,
            redis_wait_pool: raw.redis_wait_pool as usize,
            on_store_error: raw.on_store_error,
            http_header_timeout_ms: raw.http_header_timeout_ms,
            http_idle_timeout_ms: raw.http_idle_timeout_ms,
            max_connections: raw.max_connections,
            catalog: Arc::new(catalog),
            plans: raw.plans,
            gate,
            webhooks,
            ledger,
            warnings: vec![],
        })
    }

    pub fn plan(&self, id: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.id == id)
    }
}

/// `[webhooks]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawWebhooks {
    endpoints: Vec<RawEndpoint>,
    max_attempts: u32,
    backoff_ms: u64,
    timeout_ms: u64,
}

impl Default for RawWebhooks {
    fn default() -> Self {
        RawWebhooks {
            endpoints: vec![],
            max_attempts: 8,
            backoff_ms: 1000,
            timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    url: String,
    secret: String,
}

impl RawWebhooks {
    fn validate(self) -> Result<Option<crate::webhooks::WebhookConfig>, ConfigError> {
        use std::time::Duration;
        if self.max_attempts == 0 || self.max_attempts > 100 {
            return Err(ConfigError::new(
                "webhooks.max_attempts",
                "must be between 1 and 100",
            ));
        }
        for (key, v) in [
            ("webhooks.backoff_ms", self.backoff_ms),
            ("webhooks.timeout_ms", self.timeout_ms),
        ] {
            if v == 0 || v > 3_600_000 {
                return Err(ConfigError::new(key, "must be between 1 and 3600000"));
            }
        }
        let mut endpoints = Vec::with_capacity(self.endpoints.len());
        for (i, e) in self.endpoints.into_iter().enumerate() {
            let key = format!("webhooks.endpoints[{i}]");
            let rest = e
                .url
                .strip_prefix("https://")
                .or_else(|| e.url.strip_prefix("http://"));
            if rest.is_none_or(|r| {
                r.is_empty() || r.chars().any(|c| c.is_whitespace() || c.is_control())
            }) {
                return Err(ConfigError::new(
                    format!("{key}.url"),
                    "must be an http:// or https:// URL without spaces",
                ));
            }
            let secret = crate::webhooks::Secret::parse(&e.secret).map_err(|_| {
                ConfigError::new(
                    format!("{key}.secret"),
                    "must be whsec_ followed by base64 (the Standard Webhooks form)",
                )
            })?;
            endpoints.push(crate::webhooks::Endpoint { url: e.url, secret });
        }
        if endpoints.is_empty() {
            return Ok(None);
        }
        Ok(Some(crate::webhooks::WebhookConfig {
            endpoints,
            max_attempts: self.max_attempts,
            backoff: Duration::from_millis(self.backoff_ms),
            timeout: Duration::from_millis(self.timeout_ms),
        }))
    }
}

/// `[ledger]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLedger {
    url: Option<String>,
    batch: u64,
    stream_max: u64,
    claim_idle_ms: u64,
}

impl Default for RawLedger {
    fn default() -> Self {
        RawLedger {
            url: None,
            batch: 500,
            stream_max: 1_000_000,
            claim_idle_ms: 30_000,
        }
    }
}

/// The usage ledger's database and drain (`[ledger]`; docs/ledger-store.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerConfig {
    /// `sqlite://path` (created if missing) or `postgres://…`.
    pub url: String,
    /// Entries per database write at most (per stream per round).
    pub batch: usize,
    /// Entries one stream holds at most before writes refuse.
    pub stream_max: u64,
    /// A drain claims another's pending entries idle this long (ms).
    pub claim_idle_ms: u64,
}

impl LedgerConfig {
    fn validate(raw: RawLedger) -> Result<Option<LedgerConfig>, ConfigError> {
        let Some(url) = raw.url else {
            return Ok(None);
        };
        if !(url.starts_with("sqlite://")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err(ConfigError::new(
                "ledger.url",
                "must start with sqlite:// or postgres://",
            ));
        }
        if raw.batch == 0 || raw.batch > 10_000 {
            return Err(ConfigError::new(
                "ledger.batch",
                "must be between 1 and 10000",
            ));
        }
        if raw.stream_max < 1_000 || raw.stream_max > 1_000_000_000 {
            return Err(ConfigError::new(
                "ledger.stream_max",
                "must be between 1000 and 1000000000",
            ));
        }
        if raw.claim_idle_ms < 100 || raw.claim_idle_ms > 86_400_000 {
            return Err(ConfigError::new(
                "ledger.claim_idle_ms",
                "must be between 100 and 86400000",
            ));
        }
        Ok(Some(LedgerConfig {
            url,
            batch: raw.batch as usize,
            stream_max: raw.stream_max,
            claim_idle_ms: raw.claim_idle_ms,
        }))
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
    fn every_section_rejects_unknown_keys_with_their_path() {
        for (text, key) in [
            (
                SEED.replace("credit_schema = [", "credit_shema = ["),
                "features[2].credit_shema",
            ),
            (
                SEED.replace("type = \"credit_system\"", "typ = \"credit_system\""),
                "features[2].typ",
            ),
            (
                SEED.replace("credit_cost = 10 }", "credit_cost = 10, cost = 1 }"),
                "features[2].credit_schema[1].cost",
            ),
            (
                SEED.replace("interval = \"month\" }", "interval = \"month\", rollover = { max = 5, lenght = 2 } }"),
                "plans[0].items[0].rollover.lenght",
            ),
            (
                SEED.replace("included = 200", "include = 200"),
                "plans[0].items[0].include",
            ),
            (format!("{SEED}\n[gate]\ndeny = 403"), "gate.deny"),
            (
                format!("{SEED}\n[gate]\nroutes = [{{ prefix = \"/x\", feature = \"credits\", costs = 2 }}]"),
                "gate.routes[0].costs",
            ),
            (format!("redis_urll = \"redis://x\"\n{SEED}"), "redis_urll"),
        ] {
            let e = Config::parse(&text, &env(&[]), 0).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            let field = key.rsplit('.').next().unwrap();
            assert!(
                e.to_string().contains(&format!("unknown field `{field}`")),
                "{e}"
            );
        }
        // The misleading message of old ("is metered and cannot have a
        // credit schema") is gone: the typo is named instead.
        let typ = SEED.replace("type = \"credit_system\"", "typ = \"credit_system\"");
        let e = Config::parse(&typ, &env(&[]), 0).unwrap_err();
        assert!(!e.message.contains("metered"), "{e}");
        assert!(e.message.contains("`type`"), "names what was expected: {e}");
    }

    #[test]
    fn toml_syntax_errors_give_line_and_column() {
        let text = "listen = \"127.0.0.1:8080\"\n\n[[features]]\nid = \"a\"\n    kind == 2\n";
        let e = Config::parse(text, &env(&[]), 0).unwrap_err();
        assert_eq!(e.at, Some((5, 11)), "the second `=`: {e}");
        let shown = e.to_string();
        assert!(
            shown.starts_with("configuration file line 5, column 11: "),
            "{shown}"
        );
        let e = Config::parse("listen = \"no end", &env(&[]), 0).unwrap_err();
        assert_eq!(e.at.map(|(line, _)| line), Some(1), "{e}");
    }

    #[test]
    fn env_lists_booleans_and_numbers() {
        let e = env(&[
            ("CREDITGATE_API_KEYS", "sk_a,sk_b"),
            ("CREDITGATE_ADMIN_KEYS", " sk_admin ,, "),
            ("CREDITGATE_REDIS_CLUSTER", "redis://a:1,redis://b:2"),
            ("CREDITGATE_ACCEPT_EVICTION", "1"),
            ("CREDITGATE_REDIS_TIMEOUT_MS", " 250 "),
            ("CREDITGATE_LOG_FORMAT", "json"),
            ("CREDITGATE_ENV", "sandbox"),
        ]);
        let c = Config::parse(&format!("api_keys = [\"file\"]\n{SEED}"), &e, 0).unwrap();
        assert_eq!(c.api_keys, vec!["sk_a", "sk_b"], "the environment wins");
        assert_eq!(c.admin_keys, vec!["sk_admin"]);
        assert_eq!(
            c.redis_cluster,
            Some(vec!["redis://a:1".to_string(), "redis://b:2".to_string()])
        );
        assert!(c.accept_eviction);
        assert_eq!(c.redis_timeout_ms, 250);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.env, DeployEnv::Sandbox);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        for v in ["true", "false", "0"] {
            let c = Config::parse(SEED, &env(&[("CREDITGATE_ACCEPT_EVICTION", v)]), 0).unwrap();
            assert_eq!(c.accept_eviction, v == "true");
        }
        for (name, value) in [
            ("CREDITGATE_ACCEPT_EVICTION", "yes"),
            ("CREDITGATE_RESET_INTERVAL_SECS", "-1"),
            ("CREDITGATE_LOG_FORMAT", "xml"),
        ] {
            let e = Config::parse(SEED, &env(&[(name, value)]), 0).unwrap_err();
            assert_eq!(e.key, name, "{e}");
        }
        // The file keeps its own types: a string is no list there.
        let e = Config::parse(
            &format!("accept_eviction = \"maybe\"\n{SEED}"),
            &env(&[]),
            0,
        )
        .unwrap_err();
        assert_eq!(e.key, "accept_eviction");
        for name in ["CREDITGATE_FEATURES", "CREDITGATE_PLANS", "CREDITGATE_GATE"] {
            let e = Config::parse(SEED, &env(&[(name, "x")]), 0).unwrap_err();
            assert_eq!(e.key, name, "{e}");
            assert!(e.message.contains("file only"), "{e}");
        }
    }

    #[test]
    fn unknown_creditgate_variables_are_warnings_with_a_suggestion() {
        let e = env(&[
            ("CREDITGATE_REDIS_URLL", "redis://127.0.0.1:6379"),
            ("CREDITGATE_SDK_JS", "1"),
            ("CREDITGATE_LISTEN", "127.0.0.1:9000"),
            ("OTHER_REDIS_URLL", "x"),
        ]);
        let c = Config::parse(SEED, &e, 0).unwrap();
        assert!(c.redis_url.is_none(), "a misspelt variable sets nothing");
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(
            c.warnings,
            vec![
                ConfigWarning {
                    variable: "CREDITGATE_REDIS_URLL".into(),
                    did_you_mean: Some("CREDITGATE_REDIS_URL".into()),
                },
                ConfigWarning {
                    variable: "CREDITGATE_SDK_JS".into(),
                    did_you_mean: None,
                },
            ]
        );
        assert_eq!(
            c.warnings[0].to_string(),
            "environment variable CREDITGATE_REDIS_URLL names no configuration key and is ignored; \
             did you mean CREDITGATE_REDIS_URL?"
        );
    }

    #[test]
    fn plan_usage_alerts_are_validated_naming_the_key() {
        let text = SEED.replace(
            "interval = \"month\" }]",
            "interval = \"month\" }]\nusage_alerts = [{ feature_id = \"credits\", threshold = 80, threshold_type = \"usage_percentage\", name = \"eighty\" }, { feature_id = \"credits\", threshold = 0, threshold_type = \"remaining\" }]",
        );
        let c = Config::parse(&text, &env(&[]), 0).unwrap();
        assert_eq!(c.plans[0].usage_alerts.len(), 2);
        for (from, to, key) in [
            (
                "threshold = 80",
                "threshold = 180",
                "plans[0].usage_alerts[0]",
            ),
            (
                "\"credits\", threshold = 0",
                "\"nope\", threshold = 0",
                "plans[0].usage_alerts[1]",
            ),
            (
                "\"usage_percentage\"",
                "\"percent\"",
                "plans[0].usage_alerts[0]",
            ),
            (
                "name = \"eighty\"",
                "nam = \"eighty\"",
                "plans[0].usage_alerts[0].nam",
            ),
        ] {
            let e = Config::parse(&text.replace(from, to), &env(&[]), 0).unwrap_err();
            assert_eq!(e.key, key, "{to}: {e}");
        }
        let e = Config::parse(
            &text.replace("threshold = 80", "threshold = 180"),
            &env(&[]),
            0,
        )
        .unwrap_err();
        assert!(e.message.contains("plans.usage_alerts.threshold"), "{e}");
        let twice = text.replace(
            "threshold = 0, threshold_type = \"remaining\"",
            "threshold = 80, threshold_type = \"usage\", name = \"eighty\"",
        );
        let e = Config::parse(&twice, &env(&[]), 0).unwrap_err();
        assert_eq!(e.key, "plans[0].usage_alerts[1]", "{e}");
    }

    #[test]
    fn webhooks_section_defaults_and_errors() {
        let c = Config::parse(SEED, &env(&[]), 0).unwrap();
        assert!(c.webhooks.is_none(), "no endpoints: no deliveries");
        let text = format!(
            "{SEED}\n[webhooks]\nmax_attempts = 3\nbackoff_ms = 50\nendpoints = [{{ url = \"https://example.com/hook\", secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\" }}]"
        );
        let w = Config::parse(&text, &env(&[]), 0)
            .unwrap()
            .webhooks
            .unwrap();
        assert_eq!(w.endpoints.len(), 1);
        assert_eq!(w.max_attempts, 3);
        assert_eq!(w.backoff, std::time::Duration::from_millis(50));
        assert_eq!(w.timeout, std::time::Duration::from_secs(10));
        for (from, to, key) in [
            (
                "max_attempts = 3",
                "max_attempts = 0",
                "webhooks.max_attempts",
            ),
            ("backoff_ms = 50", "backoff_ms = 0", "webhooks.backoff_ms"),
            (
                "https://example.com/hook",
                "ftp://x",
                "webhooks.endpoints[0].url",
            ),
            (
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                "whsec_!!",
                "webhooks.endpoints[0].secret",
            ),
            ("secret =", "secrt =", "webhooks.endpoints[0].secrt"),
            ("backoff_ms = 50", "backof_ms = 50", "webhooks.backof_ms"),
        ] {
            let e = Config::parse(&text.replace(from, to), &env(&[]), 0).unwrap_err();
            assert_eq!(e.key, key, "{to}: {e}");
        }
        let e = Config::parse(SEED, &env(&[("CREDITGATE_WEBHOOKS", "x")]), 0).unwrap_err();
        assert_eq!(e.key, "CREDITGATE_WEBHOOKS");
    }

    #[test]
    fn ledger_section_defaults_bounds_and_unknown_keys() {
        let c = Config::parse(SEED, &env(&[]), 0).unwrap();
        assert_eq!(c.ledger, None, "no url: no ledger");
        let c = Config::parse(
            &format!("{SEED}\n[ledger]\nurl = \"sqlite:///var/lib/cg/ledger.db\""),
            &env(&[]),
            0,
        )
        .unwrap();
        assert_eq!(
            c.ledger,
            Some(LedgerConfig {
                url: "sqlite:///var/lib/cg/ledger.db".into(),
                batch: 500,
                stream_max: 1_000_000,
                claim_idle_ms: 30_000,
            })
        );
        let text = format!("{SEED}\n[ledger]\nurl = \"postgres://u@h/db\"\nbatch = 50\nstream_max = 5000\nclaim_idle_ms = 1000");
        let l = Config::parse(&text, &env(&[]), 0).unwrap().ledger.unwrap();
        assert_eq!((l.batch, l.stream_max, l.claim_idle_ms), (50, 5000, 1000));
        for (bad, key) in [
            ("url = \"mysql://x\"", "ledger.url"),
            ("url = \"sqlite://x\"\nbatch = 0", "ledger.batch"),
            ("url = \"sqlite://x\"\nstream_max = 10", "ledger.stream_max"),
            (
                "url = \"sqlite://x\"\nclaim_idle_ms = 1",
                "ledger.claim_idle_ms",
            ),
            ("url = \"sqlite://x\"\nbatch = -1", "ledger.batch"),
            ("url = \"sqlite://x\"\nbatchs = 5", "ledger.batchs"),
        ] {
            let e = Config::parse(&format!("{SEED}\n[ledger]\n{bad}"), &env(&[]), 0).unwrap_err();
            assert_eq!(e.key, key, "{bad}: {e}");
        }
        let e = Config::parse(SEED, &env(&[("CREDITGATE_LEDGER", "x")]), 0).unwrap_err();
        assert!(e.message.contains("file only"), "{e}");
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
