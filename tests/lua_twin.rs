//! The Lua twin held to the Rust by its text: the constants at the top of
//! `lua/creditgate.lua` equal the Rust constants they copy, and every
//! function's `-- ARGV[n] name:` block (the comment lines right above
//! `function FNS.<op>`) equals the named positions the engine encodes its
//! arguments at (`src/engine/redis/args.rs`).

use std::collections::BTreeMap;

use creditgate::calendar::{DAY_MS, HOUR_MS, MAX_INSTANT_MS, MINUTE_MS, NOMINAL_MONTH_MS};
use creditgate::engine::redis::{args, LIBRARY};
use creditgate::model::MAX_BUCKETS_PER_CUSTOMER;
use creditgate::money::{COST_SCALE, MAX_AMOUNT_RAW};
use creditgate::rules::ROLLOVER_WINDOW;

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
    let found = numeric_constants(LIBRARY);
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
        assert_eq!(found.get(name), Some(&value), "lua/creditgate.lua {name}");
    }
}

/// `-- ARGV[n] name: …` lines of a comment block: name → n.
fn argv_lines<'a>(lines: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for line in lines {
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

/// The ARGV block right above `function FNS.<op>(keys, args)`.
fn function_block(src: &str, op: &str) -> BTreeMap<String, usize> {
    let lines: Vec<&str> = src.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with(&format!("function FNS.{op}(keys, args)")))
        .unwrap_or_else(|| panic!("no function FNS.{op}"));
    let start = (0..at)
        .rev()
        .take_while(|&i| lines[i].starts_with("--"))
        .last()
        .unwrap_or(at);
    argv_lines(lines[start..at].iter().copied())
}

fn positions(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[test]
fn the_header_equals_its_positions() {
    let header: BTreeMap<String, usize> = argv_lines(
        LIBRARY
            .lines()
            .skip_while(|l| !l.starts_with("-- The functions."))
            .take_while(|l| l.starts_with("--")),
    );
    assert_eq!(
        header,
        positions(&[
            ("now", args::header::NOW),
            ("retention", args::header::RETENTION)
        ])
    );
    assert_eq!(args::header::NEXT, 3);
}

#[test]
fn function_blocks_equal_the_argument_positions() {
    use args::{check, consume, finalize, grant, reserve, set_limits, track, update_bucket};
    let cases = [
        (
            "grant",
            positions(&[
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
            "update_bucket",
            positions(&[
                ("pool", update_bucket::POOL),
                ("balance_id", update_bucket::BALANCE_ID),
                ("mode", update_bucket::MODE),
                ("amount", update_bucket::AMOUNT),
            ]),
        ),
        (
            "check",
            positions(&[
                ("feature_id", check::FEATURE_ID),
                ("units", check::UNITS),
                ("pools", check::POOLS),
            ]),
        ),
        (
            "consume",
            positions(&[
                ("idempotency_key", consume::IDEMPOTENCY_KEY),
                ("feature_id", consume::FEATURE_ID),
                ("units", consume::UNITS),
                ("pools", consume::POOLS),
            ]),
        ),
        (
            "track",
            positions(&[
                ("idempotency_key", track::IDEMPOTENCY_KEY),
                ("feature_id", track::FEATURE_ID),
                ("units", track::UNITS),
                ("behavior", track::BEHAVIOR),
                ("pools", track::POOLS),
            ]),
        ),
        (
            "reserve",
            positions(&[
                ("idempotency_key", reserve::IDEMPOTENCY_KEY),
                ("feature_id", reserve::FEATURE_ID),
                ("units", reserve::UNITS),
                ("lock_id", reserve::LOCK_ID),
                ("expires_at", reserve::EXPIRES_AT),
                ("pools", reserve::POOLS),
            ]),
        ),
        (
            "finalize",
            positions(&[
                ("idempotency_key", finalize::IDEMPOTENCY_KEY),
                ("lock_id", finalize::LOCK_ID),
                ("action", finalize::ACTION),
                ("override_units", finalize::OVERRIDE_UNITS),
            ]),
        ),
        (
            "set_limits",
            positions(&[
                ("expected", set_limits::EXPECTED),
                ("limits", set_limits::LIMITS),
            ]),
        ),
        ("balances", positions(&[])),
        ("reset_due", positions(&[])),
    ];
    for (op, want) in cases {
        assert_eq!(function_block(LIBRARY, op), want, "FNS.{op}");
    }
}

/// The stored and reply field names are the Rust names.
#[test]
fn lua_names_are_the_rust_names() {
    for name in [
        "overage_allowed",
        "carry_debt",
        "expires_at",
        "rollovers",
        "plan_id",
        "next_reset_at",
        "overage_floor",
        "interval_count",
        "unlimited",
        "anchor",
    ] {
        assert!(LIBRARY.contains(name), "lua/creditgate.lua lacks {name}");
    }
    for old in [
        "b.overage ",
        "b.carry ",
        "b.expires ",
        ".rows",
        "b.plan ",
        ".idx ",
    ] {
        assert!(
            !LIBRARY.contains(old),
            "lua/creditgate.lua still says {old:?}"
        );
    }
}
