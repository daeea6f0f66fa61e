//! The Lua twin held to the Rust by its text: the constants at the top of
//! `lua/lib.lua` equal the Rust constants they copy, and every script's
//! `-- ARGV[n] name:` header equals the named positions the engine encodes
//! its arguments at (`src/engine/redis/args.rs`).

use std::collections::BTreeMap;
use std::path::Path;

use creditgate::calendar::{DAY_MS, HOUR_MS, MAX_INSTANT_MS, MINUTE_MS, NOMINAL_MONTH_MS};
use creditgate::engine::redis::args;
use creditgate::model::MAX_BUCKETS_PER_CUSTOMER;
use creditgate::money::{COST_SCALE, MAX_AMOUNT_RAW};
use creditgate::rules::ROLLOVER_WINDOW;

fn lua(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("lua").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `local NAME = <integer or product of integers and earlier names>` lines
/// of the library's top level, evaluated.
fn numeric_constants(src: &str) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for line in src.lines() {
        let Some(rest) = line.strip_prefix("local ") else {
            continue;
        };
        let Some((name, expr)) = rest.split_once(" = ") else {
            continue;
        };
        if !name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            continue;
        }
        let expr = expr.split("--").next().unwrap_or("").trim();
        let value = expr.split('*').map(str::trim).try_fold(1i64, |acc, f| {
            f.parse::<i64>()
                .ok()
                .or_else(|| out.get(f).copied())
                .map(|v| acc * v)
        });
        if let Some(v) = value {
            out.insert(name.to_string(), v);
        }
    }
    out
}

#[test]
fn library_constants_equal_the_rust_ones() {
    let found = numeric_constants(&lua("lib.lua"));
    let want: [(&str, i64); 10] = [
        ("MAX", MAX_AMOUNT_RAW),
        ("HUGE", 1 << 53),
        ("SCALE", COST_SCALE),
        ("MINUTE", MINUTE_MS),
        ("HOUR", HOUR_MS),
        ("DAY", DAY_MS),
        ("NOMINAL_MONTH", NOMINAL_MONTH_MS),
        ("MAX_INSTANT", MAX_INSTANT_MS),
        ("MAX_BUCKETS", MAX_BUCKETS_PER_CUSTOMER as i64),
        ("ROLLOVER_WINDOW", ROLLOVER_WINDOW),
    ];
    for (name, value) in want {
        assert_eq!(found.get(name), Some(&value), "lua/lib.lua {name}");
    }
}

/// `-- ARGV[n] name: …` lines of a script's header: name → n.
fn argv_header(src: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for line in src.lines().take_while(|l| l.starts_with("--")) {
        let Some(rest) = line.strip_prefix("-- ARGV[") else {
            continue;
        };
        let Some((n, rest)) = rest.split_once("] ") else {
            continue;
        };
        let Some((name, _)) = rest.split_once(':') else {
            continue;
        };
        if let Ok(n) = n.parse::<usize>() {
            assert!(out.insert(name.to_string(), n).is_none(), "{name} twice");
        }
    }
    out
}

fn positions(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[test]
fn script_headers_equal_the_argument_positions() {
    let header = [
        ("now", args::header::NOW),
        (
            "idempotency_retention_ms",
            args::header::IDEMPOTENCY_RETENTION_MS,
        ),
        ("lock_retention_ms", args::header::LOCK_RETENTION_MS),
        ("customer_id", args::header::CUSTOMER_ID),
    ];
    let with_header = |rest: &[(&str, usize)]| {
        let mut all = positions(&header);
        all.extend(positions(rest));
        all
    };
    use args::{apply, check, grant, update_bucket};
    let cases = [
        (
            "grant.lua",
            with_header(&[
                ("pool", grant::POOL),
                ("balance_id", grant::BALANCE_ID),
                ("plan_id", grant::PLAN_ID),
                ("granted", grant::GRANTED),
                ("interval", grant::INTERVAL),
                ("interval_count", grant::INTERVAL_COUNT),
                ("next_reset_at", grant::NEXT_RESET_AT),
                ("expires_at", grant::EXPIRES_AT),
                ("flags", grant::FLAGS),
                ("overage_floor", grant::OVERAGE_FLOOR),
                ("rollover", grant::ROLLOVER),
                ("rollover_max", grant::ROLLOVER_MAX),
                ("rollover_max_percentage", grant::ROLLOVER_MAX_PERCENTAGE),
                ("rollover_length", grant::ROLLOVER_LENGTH),
            ]),
        ),
        (
            "update_bucket.lua",
            with_header(&[
                ("pool", update_bucket::POOL),
                ("balance_id", update_bucket::BALANCE_ID),
                ("mode", update_bucket::MODE),
                ("amount", update_bucket::AMOUNT),
            ]),
        ),
        (
            "check.lua",
            with_header(&[
                ("feature_id", check::FEATURE_ID),
                ("units", check::UNITS),
                ("pool_count", check::POOL_COUNT),
            ]),
        ),
        (
            "apply.lua",
            with_header(&[
                ("op", apply::OP),
                ("idempotency_key", apply::IDEMPOTENCY_KEY),
                ("feature_id", apply::FEATURE_ID),
                ("units", apply::UNITS),
                ("mode", apply::MODE),
                ("lock_id", apply::LOCK_ID),
                ("expires_at", apply::EXPIRES_AT),
                ("pool_count", apply::POOL_COUNT),
            ]),
        ),
        ("balances.lua", with_header(&[])),
        ("reset_due.lua", with_header(&[])),
    ];
    for (script, want) in cases {
        assert_eq!(argv_header(&lua(script)), want, "lua/{script}");
    }
}
