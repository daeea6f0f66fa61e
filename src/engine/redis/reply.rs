//! Replies into answers: the outcome and bucket views the scripts return,
//! decoded into the same types the in-process engine gives, and script
//! errors (`-CG <code> [detail]`) into typed errors.

use redis::{ErrorKind, RedisError, Value};

use super::conn::unavailable;
use crate::calendar::Interval;
use crate::error::{invalid, Cause, Code, EngineError};
use crate::model::*;
use crate::money::Amount;
use crate::rules;

/// Decodes an outcome reply (see `outcome_reply` in lua/lib.lua); the pools
/// shown are those of the feature the reply names.
pub(crate) fn decode_outcome(catalog: &Catalog, v: Value) -> Result<Outcome, EngineError> {
    let items = array(v)?;
    if items.len() != 6 {
        return Err(bad_reply("outcome"));
    }
    let mut it = items.into_iter();
    let allowed = int(&it.next().unwrap_or(Value::Nil))? == 1;
    let uncovered = amount(int(&it.next().unwrap_or(Value::Nil))?)?;
    let flags = string(&it.next().unwrap_or(Value::Nil))?;
    let mut entries = vec![];
    for e in array(it.next().unwrap_or(Value::Nil))? {
        let f = array(e)?;
        if f.len() != 6 {
            return Err(bad_reply("entry"));
        }
        let source = match string(&f[2])?.as_str() {
            "bucket" => SourceKind::Bucket,
            _ => SourceKind::Rollover {
                expires_at: opt_int(&f[3])?,
            },
        };
        entries.push(Entry {
            balance_id: string(&f[0])?,
            pool: string(&f[1])?,
            source,
            amount: amount(int(&f[4])?)?,
            units: amount(int(&f[5])?)?,
        });
    }
    let feature = string(&it.next().unwrap_or(Value::Nil))?;
    let buckets = decode_buckets(it.next().unwrap_or(Value::Nil))?;
    let pools = if feature.is_empty() {
        vec![]
    } else {
        catalog
            .pools_for(&feature)
            .map(|ps| {
                ps.iter()
                    .map(|p| rules::pool_balance(&buckets, &p.pool))
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(Outcome {
        allowed,
        entries,
        uncovered,
        no_balance: flags.contains('n'),
        insufficient: flags.contains('i'),
        replayed: flags.contains('r'),
        pools,
    })
}

/// What a request named, to fill typed errors' details.
#[derive(Default)]
pub(crate) struct Ctx<'a> {
    pub feature: &'a str,
    pub balance_id: &'a str,
    pub lock_id: &'a str,
}

/// The fields a script's `invalid_inputs` may name (its first word).
const INVALID_FIELDS: [&str; 4] = ["expires_at", "next_reset_at", "op", "argument"];

/// Maps a script's reply error: `-CG <code> [detail]` (a code of
/// [`Code::TABLE`]) to its typed error, anything else to unavailable or
/// internal.
pub(crate) fn map_error(e: RedisError, ctx: &Ctx<'_>) -> EngineError {
    if e.code() == Some("CG") {
        let detail = e.detail().unwrap_or("");
        let (code, rest) = detail.split_once(' ').unwrap_or((detail, ""));
        return match Code::parse(code) {
            Some(Code::CustomerNotFound) => EngineError::CustomerNotFound,
            Some(Code::FeatureNotFound) => EngineError::FeatureNotFound(ctx.feature.to_string()),
            Some(Code::BalanceNotFound) => EngineError::BalanceNotFound,
            Some(Code::BalanceAlreadyExists) => {
                EngineError::BalanceAlreadyExists(ctx.balance_id.to_string())
            }
            Some(Code::TooManyBalances) => EngineError::TooManyBuckets(MAX_BUCKETS_PER_CUSTOMER),
            Some(Code::InsufficientBalance) => EngineError::InsufficientBalance,
            Some(Code::LockAlreadyExists) => {
                EngineError::LockAlreadyExists(ctx.lock_id.to_string())
            }
            Some(Code::LockNotFound) => EngineError::LockNotFound(ctx.lock_id.to_string()),
            Some(Code::IdempotencyKeyReused) => EngineError::IdempotencyKeyReused,
            Some(Code::AmountOutOfRange) => EngineError::AmountOutOfRange,
            Some(Code::InvalidInputs) => {
                let (field, reason) = rest.split_once(' ').unwrap_or((rest, ""));
                let field = INVALID_FIELDS
                    .into_iter()
                    .find(|f| *f == field)
                    .unwrap_or("argument");
                invalid(field, reason.to_string())
            }
            _ => EngineError::Internal(Cause::msg(format!("script error: {detail}"))),
        };
    }
    match e.kind() {
        ErrorKind::Server(_) | ErrorKind::UnexpectedReturnType | ErrorKind::Parse => {
            EngineError::Internal(Cause::new(e))
        }
        _ => unavailable(e),
    }
}

fn bad_reply(what: &str) -> EngineError {
    EngineError::Internal(Cause::msg(format!("unexpected script reply ({what})")))
}

pub(crate) fn array(v: Value) -> Result<Vec<Value>, EngineError> {
    match v {
        Value::Array(a) => Ok(a),
        _ => Err(bad_reply("array")),
    }
}

pub(crate) fn string(v: &Value) -> Result<String, EngineError> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).map_err(|_| bad_reply("utf-8")),
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Int(i) => Ok(i.to_string()),
        _ => Err(bad_reply("string")),
    }
}

pub(crate) fn int(v: &Value) -> Result<i64, EngineError> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad_reply("integer")),
        _ => Err(bad_reply("integer")),
    }
}

fn opt_int(v: &Value) -> Result<Option<i64>, EngineError> {
    match v {
        Value::BulkString(b) if b.is_empty() => Ok(None),
        Value::Nil => Ok(None),
        _ => int(v).map(Some),
    }
}

fn amount(raw: i64) -> Result<Amount, EngineError> {
    Amount::from_raw(raw).ok_or_else(|| bad_reply("amount out of range"))
}

/// Positions in a bucket view (`bucket_view` in lua/lib.lua).
mod view {
    pub const ID: usize = 0;
    pub const SEQ: usize = 1;
    pub const POOL: usize = 2;
    pub const PLAN_ID: usize = 3;
    pub const GRANTED: usize = 4;
    pub const REMAINING: usize = 5;
    pub const INTERVAL: usize = 6;
    pub const INTERVAL_COUNT: usize = 7;
    pub const NEXT_RESET_AT: usize = 8;
    pub const EXPIRES_AT: usize = 9;
    pub const UNLIMITED: usize = 10;
    pub const OVERAGE_ALLOWED: usize = 11;
    /// Flat (expires_at, granted, balance) triples.
    pub const ROLLOVERS: usize = 12;
    pub const ANCHOR: usize = 13;
    pub const CARRY_DEBT: usize = 14;
    pub const LEN: usize = 15;
}

/// Decodes bucket views (see `bucket_view` in lua/lib.lua) into buckets that
/// [`rules::pool_balance`] can show and [`rules::retry_after_ms`] can
/// project. Fields a view does not carry (the rollover setting, the overage
/// floor) affect neither.
pub(crate) fn decode_buckets(v: Value) -> Result<Vec<Bucket>, EngineError> {
    let mut out = vec![];
    for b in array(v)? {
        let f = array(b)?;
        if f.len() != view::LEN {
            return Err(bad_reply("bucket"));
        }
        let rows_raw = array(f[view::ROLLOVERS].clone())?;
        let mut rollovers = vec![];
        for r in rows_raw.chunks(3) {
            if r.len() != 3 {
                return Err(bad_reply("rollover"));
            }
            rollovers.push(RolloverRow {
                expires_at: opt_int(&r[0])?,
                granted: amount(int(&r[1])?)?,
                balance: amount(int(&r[2])?)?,
            });
        }
        let plan = string(&f[view::PLAN_ID])?;
        out.push(Bucket {
            id: string(&f[view::ID])?,
            seq: int(&f[view::SEQ])? as u64,
            pool: string(&f[view::POOL])?,
            plan_id: (!plan.is_empty()).then_some(plan),
            granted: amount(int(&f[view::GRANTED])?)?,
            remaining: amount(int(&f[view::REMAINING])?)?,
            interval: string(&f[view::INTERVAL])?
                .parse::<Interval>()
                .map_err(|_| bad_reply("interval"))?,
            interval_count: int(&f[view::INTERVAL_COUNT])? as u32,
            anchor: int(&f[view::ANCHOR])?,
            next_reset_at: opt_int(&f[view::NEXT_RESET_AT])?,
            expires_at: opt_int(&f[view::EXPIRES_AT])?,
            rollover: None,
            unlimited: int(&f[view::UNLIMITED])? == 1,
            overage_allowed: int(&f[view::OVERAGE_ALLOWED])? == 1,
            overage_floor: None,
            carry_debt: int(&f[view::CARRY_DEBT])? == 1,
            rollovers,
        });
    }
    Ok(out)
}
