//! Replies into answers: the library's flat outcome replies and compact
//! pool strings (lua/README.md § 6.2, § 7), decoded into the same types the
//! in-process engine gives, and function errors (`-CG <code>[ detail]
//! @<now>`) into typed errors and the instant they were decided at.

use redis::{ErrorKind, RedisError, Value};

use super::conn::unavailable;
use crate::calendar::{Interval, Period, MAX_INSTANT_MS};
use crate::error::{invalid, Cause, Code, EngineError};
use crate::model::*;
use crate::money::Amount;
use crate::rules;

/// Positions in an outcome reply (0-based).
pub mod outcome {
    pub const FLAGS: usize = 0;
    pub const UNCOVERED: usize = 1;
    pub const NOW: usize = 2;
    pub const ENTRIES: usize = 3;
    pub const FEATURE: usize = 4;
    /// (pool, pool string) pairs from here to the end.
    pub const POOLS: usize = 5;
    pub const ALLOWED: i64 = 1;
    pub const NO_BALANCE: i64 = 2;
    pub const INSUFFICIENT: i64 = 4;
    pub const REPLAYED: i64 = 8;
}

const US: char = '\x1f';
const RS: char = '\x1e';
const GS: char = '\x1d';

/// Decodes an outcome reply; the pools shown are those the reply carries
/// (the feature's, in deduction order). Returns the outcome (its `at` is the
/// instant the function used).
pub(crate) fn decode_outcome(v: Value, catalog: &Catalog) -> Result<Outcome, EngineError> {
    use outcome::*;
    let items = array(v)?;
    if items.len() < POOLS || !(items.len() - POOLS).is_multiple_of(2) {
        return Err(bad_reply("outcome"));
    }
    let flags = int(&items[FLAGS])?;
    let uncovered = amount(int(&items[UNCOVERED])?)?;
    let at = int(&items[NOW])?;
    let entries = decode_entries(&string(&items[ENTRIES])?)?;
    let mut pools = vec![];
    let mut lim = super::limits::ReplyLimits::default();
    let mut all = vec![];
    for pair in items[POOLS..].chunks(2) {
        let pool = string(&pair[0])?;
        if let Some(head) = pool.strip_prefix(super::limits::FIELD) {
            // A customer with limits: the denial, shadow denials, the limits.
            lim = super::limits::decode_reply(head, &string(&pair[1])?)?;
            continue;
        }
        let buckets = decode_pool(&pool, &bytes(&pair[1])?)?;
        pools.push(rules::pool_balance(&buckets, &pool));
        all.extend(buckets);
    }
    // The statuses, derived here from the limits after the operation and the
    // pools' buckets (a billing_cycle window's anchor), exactly as the
    // in-process engine derives them: Redis formats none.
    let limits = if lim.armed.is_empty() {
        vec![]
    } else {
        let feature = string(&items[FEATURE])?;
        let state = CustomerState {
            id: String::new(),
            created_at: at,
            next_seq: 0,
            buckets: all,
            locks: Default::default(),
            idempotency: Default::default(),
            limits: std::mem::take(&mut lim.armed),
            alerts: vec![],
        };
        rules::limit_statuses(&state, catalog, &feature, at)
    };
    Ok(Outcome {
        allowed: flags & ALLOWED != 0,
        entries,
        uncovered,
        no_balance: flags & NO_BALANCE != 0,
        insufficient: flags & INSUFFICIENT != 0,
        replayed: flags & REPLAYED != 0,
        pools,
        at,
        limit: lim.limit,
        shadow_denied: lim.shadow_denied,
        limits,
    })
}

/// Entries `pool \x1f balance id \x1f kind \x1f amount \x1f units`, joined by
/// `\x1e`; kind `''` a bucket, `r` a never-expiring rollover row, `r<ms>`
/// one that expires then.
fn decode_entries(s: &str) -> Result<Vec<Entry>, EngineError> {
    if s.is_empty() {
        return Ok(vec![]);
    }
    s.split(RS)
        .map(|e| {
            let f: Vec<&str> = e.split(US).collect();
            if f.len() != 5 {
                return Err(bad_reply("entry"));
            }
            let source = match f[2] {
                "" => SourceKind::Bucket,
                "r" => SourceKind::Rollover { expires_at: None },
                k => SourceKind::Rollover {
                    expires_at: Some(
                        k.strip_prefix('r')
                            .and_then(|n| n.parse().ok())
                            .ok_or_else(|| bad_reply("entry kind"))?,
                    ),
                },
            };
            Ok(Entry {
                pool: f[0].to_string(),
                balance_id: f[1].to_string(),
                source,
                amount: amount(f[3].parse().map_err(|_| bad_reply("entry amount"))?)?,
                units: amount(f[4].parse().map_err(|_| bad_reply("entry units"))?)?,
            })
        })
        .collect()
}

/// A stored integer: base 36, `-` for negatives; `None` when empty.
fn b36(s: &[u8]) -> Result<Option<i64>, EngineError> {
    if s.is_empty() {
        return Ok(None);
    }
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    let text = std::str::from_utf8(digits).map_err(|_| bad_reply("base 36"))?;
    let n = i64::from_str_radix(text, 36).map_err(|_| bad_reply("base 36"))?;
    Ok(Some(if neg { -n } else { n }))
}

fn req(s: &[u8]) -> Result<i64, EngineError> {
    b36(s)?.ok_or_else(|| bad_reply("missing number"))
}

fn text(s: &[u8]) -> Result<String, EngineError> {
    String::from_utf8(s.to_vec()).map_err(|_| bad_reply("utf-8"))
}

/// Decodes a pool string (lua/README.md § 6.2): the pool's buckets in
/// [`rules::bucket_order_key`] order, each with every field of
/// [`Bucket`]; `seq` is the position (the stored order is the order).
pub(crate) fn decode_pool(pool: &str, s: &[u8]) -> Result<Vec<Bucket>, EngineError> {
    if s.is_empty() {
        return Ok(vec![]);
    }
    let mut out = vec![];
    for (i, b) in s.split(|&c| c == RS as u8).enumerate() {
        let f: Vec<&[u8]> = b.split(|&c| c == US as u8).collect();
        let field = |n: usize| -> &[u8] { f.get(n - 1).copied().unwrap_or(b"") };
        let remaining = field(1).strip_prefix(b"!").unwrap_or(field(1));
        let code = b36(field(4))?.unwrap_or(0);
        let interval = u8::try_from(code)
            .ok()
            .and_then(Interval::from_code)
            .ok_or_else(|| bad_reply("interval"))?;
        let interval_count =
            u32::try_from(b36(field(5))?.unwrap_or(1)).map_err(|_| bad_reply("count"))?;
        let anchor = b36(field(6))?.unwrap_or(0);
        let next_reset_at = match (Period::new(interval, interval_count), b36(field(7))?) {
            (Some(p), Some(index)) => Some(p.boundary(anchor, index).min(MAX_INSTANT_MS + 1)),
            _ => None,
        };
        let flags = field(9);
        let rollover = match field(11) {
            b"" => None,
            r => {
                let parts: Vec<&[u8]> = r.split(|&c| c == b'/').collect();
                if parts.len() != 3 {
                    return Err(bad_reply("rollover setting"));
                }
                let opt_amount = |p: &[u8]| -> Result<Option<Amount>, EngineError> {
                    b36(p)?.map(amount).transpose()
                };
                let length = b36(parts[2])?;
                Some(RolloverConfig {
                    max: opt_amount(parts[0])?,
                    max_percentage: opt_amount(parts[1])?,
                    duration: if length.is_some() {
                        RolloverDuration::Month
                    } else {
                        RolloverDuration::Forever
                    },
                    length: length.map(|l| l as u32),
                })
            }
        };
        let mut rollovers = vec![];
        if !field(13).is_empty() {
            for row in field(13).split(|&c| c == GS as u8) {
                let r: Vec<&[u8]> = row.split(|&c| c == b',').collect();
                if r.len() != 3 {
                    return Err(bad_reply("rollover row"));
                }
                rollovers.push(RolloverRow {
                    expires_at: b36(r[0])?,
                    granted: amount(req(r[1])?)?,
                    balance: amount(req(r[2])?)?,
                });
            }
        }
        let plan = text(field(12))?;
        out.push(Bucket {
            id: text(field(2))?,
            seq: i as u64,
            pool: pool.to_string(),
            plan_id: (!plan.is_empty()).then_some(plan),
            granted: amount(req(field(3))?)?,
            remaining: amount(req(remaining)?)?,
            interval,
            interval_count,
            anchor,
            next_reset_at,
            expires_at: b36(field(8))?,
            rollover,
            unlimited: flags.contains(&b'u'),
            overage_allowed: flags.contains(&b'o'),
            overage_floor: b36(field(10))?.map(amount).transpose()?,
            carry_debt: flags.contains(&b'd'),
            rollovers,
        });
    }
    Ok(out)
}

/// A balances reply decoded: creation instant, the instant used, every
/// owned pool's buckets, the customer's limits.
pub(crate) type Balances = (i64, i64, Vec<Bucket>, Vec<crate::limits::ArmedLimit>);

/// Decodes a balances reply `{created_at, now, pool, pool string, …}` (and
/// the limits, under the name `\x1fL`, for a customer holding some).
pub(crate) fn decode_balances(v: Value) -> Result<Balances, EngineError> {
    let items = array(v)?;
    if items.len() < 2 || !items.len().is_multiple_of(2) {
        return Err(bad_reply("balances"));
    }
    let created_at = int(&items[0])?;
    let at = int(&items[1])?;
    let mut buckets = vec![];
    let mut limits = vec![];
    for pair in items[2..].chunks(2) {
        let name = string(&pair[0])?;
        if name == super::limits::FIELD {
            limits = super::limits::decode(&string(&pair[1])?)?;
            continue;
        }
        buckets.extend(decode_pool(&name, &bytes(&pair[1])?)?);
    }
    Ok((created_at, at, buckets, limits))
}

/// What a request named, to fill typed errors' details.
#[derive(Default)]
pub(crate) struct Ctx<'a> {
    /// The function may change state: a transport failure after sending is
    /// an unknown outcome ([`EngineError::StoreTimeout`]), not "unavailable".
    pub writes: bool,
    pub feature: &'a str,
    pub balance_id: &'a str,
    pub lock_id: &'a str,
}

impl Ctx<'_> {
    /// The context of a function that may change state.
    pub fn writing() -> Self {
        Ctx {
            writes: true,
            ..Ctx::default()
        }
    }
}

/// The fields a function's `invalid_inputs` may name (its first word).
const INVALID_FIELDS: [&str; 5] = [
    "expires_at",
    "next_reset_at",
    "op",
    "argument",
    "balance_id",
];

/// A `-CG …` error's detail without its trailing ` @<now>`, and that instant.
fn split_instant(detail: &str) -> (&str, Option<i64>) {
    match detail.rsplit_once(" @") {
        Some((rest, at)) if !at.is_empty() && at.bytes().all(|b| b.is_ascii_digit()) => {
            (rest, at.parse().ok())
        }
        _ => (detail, None),
    }
}

/// The instant a function error says it was decided at.
pub(crate) fn error_instant(e: &RedisError) -> Option<i64> {
    (e.code() == Some("CG"))
        .then(|| split_instant(e.detail().unwrap_or("")).1)
        .flatten()
}

/// Maps a function's reply error: `-CG <code> [detail] @<now>` (a code of
/// [`Code::TABLE`]) to its typed error, anything else to unavailable or
/// internal.
pub(crate) fn map_error(e: RedisError, ctx: &Ctx<'_>) -> EngineError {
    if e.code() == Some("CG") {
        let (detail, _) = split_instant(e.detail().unwrap_or(""));
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
            Some(Code::StoreUnavailable) => EngineError::StoreUnavailable(Cause::msg(
                "the call reached Redis after its deadline and applied nothing",
            )),
            // The ledger's stream is at its cap (the drain is behind): the
            // call refused before writing anything.
            Some(Code::StoreFull) => EngineError::StoreFull(Cause::msg(format!(
                "the ledger stream is full (the drain is behind): {rest}"
            ))),
            Some(Code::BalanceInUse) => EngineError::BalanceInUse(rest.to_string()),
            Some(Code::InvalidInputs) => {
                let (field, reason) = rest.split_once(' ').unwrap_or((rest, ""));
                let field = INVALID_FIELDS
                    .into_iter()
                    .find(|f| *f == field)
                    .unwrap_or("argument");
                invalid(field, reason.to_string())
            }
            _ => EngineError::Internal(Cause::msg(format!("function error: {detail}"))),
        };
    }
    store_failure(e, ctx.writes)
}

/// A reply or transport error that is not a function's own, by what it
/// says about the call's effect: refused before running (unsent, loading, a
/// replica, the cluster reconfiguring) is "not applied"; `-OOM` is
/// [`EngineError::StoreFull`]; a call that `writes`, sent with no answer in
/// time (or its connection dropped), is an unknown outcome.
pub(crate) fn store_failure(e: RedisError, writes: bool) -> EngineError {
    use redis::ServerErrorKind as S;
    if e.code() == Some("OOM") {
        return EngineError::StoreFull(Cause::new(e));
    }
    match e.kind() {
        // Refusals before running: loading, a replica, the cluster down or
        // moving the slot (a redirect the client did not follow in time).
        ErrorKind::Server(
            S::BusyLoading
            | S::ReadOnly
            | S::ClusterDown
            | S::MasterDown
            | S::TryAgain
            | S::Moved
            | S::Ask,
        ) => unavailable(e),
        ErrorKind::Server(_) | ErrorKind::UnexpectedReturnType | ErrorKind::Parse => {
            EngineError::Internal(Cause::new(e))
        }
        _ if writes && !e.is_connection_refusal() => EngineError::StoreTimeout(Cause::new(e)),
        _ => unavailable(e),
    }
}

fn bad_reply(what: &str) -> EngineError {
    EngineError::Internal(Cause::msg(format!("unexpected function reply ({what})")))
}

pub(crate) fn array(v: Value) -> Result<Vec<Value>, EngineError> {
    match v {
        Value::Array(a) => Ok(a),
        _ => Err(bad_reply("array")),
    }
}

fn bytes(v: &Value) -> Result<Vec<u8>, EngineError> {
    match v {
        Value::BulkString(b) => Ok(b.clone()),
        Value::SimpleString(s) => Ok(s.clone().into_bytes()),
        Value::Nil => Ok(vec![]),
        _ => Err(bad_reply("string")),
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

fn amount(raw: i64) -> Result<Amount, EngineError> {
    Amount::from_raw(raw).ok_or_else(|| bad_reply("amount out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_string_decodes_into_buckets() {
        // lua/README.md § 6.2's example.
        let s = b"h5a8\x1fb1\x1flfls\x1f5\x1f\x1fmyc87pc0\x1f1\x1f\x1f\x1f\x1f\x1fpro\x1e!-2s\x1ftop\x1f2s\x1f\x1f\x1f\x1f\x1f\x1fod\x1f-1\x1f\x1f\x1f";
        let b = decode_pool("api_call", s).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].remaining.raw(), 800_000);
        assert_eq!(b[0].granted.raw(), 1_000_000);
        assert_eq!(b[0].interval, Interval::Month);
        assert_eq!(b[0].anchor, 1_798_761_600_000);
        assert_eq!(
            b[0].next_reset_at,
            Some(crate::calendar::ms_of(2027, 2, 1, 0, 0))
        );
        assert_eq!(b[0].plan_id.as_deref(), Some("pro"));
        assert_eq!(b[1].remaining.raw(), -100);
        assert!(b[1].overage_allowed && b[1].carry_debt && !b[1].unlimited);
        assert_eq!(b[1].overage_floor.map(|f| f.raw()), Some(-1));
        assert_eq!(b[1].seq, 1);
    }

    #[test]
    fn errors_carry_their_instant() {
        assert_eq!(
            split_instant("invalid_inputs expires_at must be in the future @1798761600000"),
            (
                "invalid_inputs expires_at must be in the future",
                Some(1_798_761_600_000)
            )
        );
        assert_eq!(
            split_instant("customer_not_found"),
            ("customer_not_found", None)
        );
    }
}
