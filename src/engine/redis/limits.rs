//! Limits in the Redis library (issue 13, lua/README.md § 11): a customer's
//! limits and their counters are one field of its hash, [`FIELD`], written
//! by `set_limits` and kept by every request that meets them; the record
//! carries a flag (`L`, field 5) so a customer without limits reads nothing
//! more. This module encodes that field (the Rust side of `set_limits`
//! computes the new list with [`crate::limits::update_limits`] from the list
//! it read) and decodes it and the limits element of outcome replies.
//!
//! A limit is `\x1f`-separated fields, limits joined by `\x1e`, trailing
//! empty fields dropped:
//! `id, feature_id, kind (f fixed | s sliding | r rate), flags (x disabled,
//! h shadow, b billing_cycle), source (u | r | p<plan id>), interval code,
//! interval_count ('' = 1), limit or rate (raw), burst (raw, rates),
//! c1, c2, c3` — the counter: a window's start ('' never), used, previous;
//! a rate's TAT as `c1 × rate_raw + c2` (0 ≤ c2 < rate_raw), so the Lua
//! never forms the 2^53-overflowing product `ms × rate_raw`. Integers in
//! base 36 (`-` for negatives), `''` for a zero count.

use crate::calendar::Interval;
use crate::error::{Cause, EngineError};
use crate::limits::*;
use crate::money::Amount;

/// The hash field holding a customer's limits (and the reply element's name).
pub const FIELD: &str = "\x1fL";

const US: char = '\x1f';
const RS: char = '\x1e';

fn e36(n: i128) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let neg = n < 0;
    let mut m = n.unsigned_abs();
    let mut out = vec![];
    loop {
        out.push(DIGITS[(m % 36) as usize]);
        m /= 36;
        if m == 0 {
            break;
        }
    }
    if neg {
        out.push(b'-');
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

fn d36(s: &str) -> Result<Option<i128>, EngineError> {
    if s.is_empty() {
        return Ok(None);
    }
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let n = i128::from_str_radix(digits, 36).map_err(|_| bad("base 36"))?;
    Ok(Some(if neg { -n } else { n }))
}

fn bad(what: &str) -> EngineError {
    EngineError::Internal(Cause::msg(format!("unexpected stored limit ({what})")))
}

fn amount(raw: i128) -> Result<Amount, EngineError> {
    i64::try_from(raw)
        .ok()
        .and_then(Amount::from_raw)
        .ok_or_else(|| bad("amount"))
}

/// The stored form of a customer's limits ('' none).
pub fn encode(list: &[ArmedLimit]) -> String {
    let parts: Vec<String> = list.iter().map(encode_one).collect();
    parts.join(&RS.to_string())
}

fn encode_one(l: &ArmedLimit) -> String {
    let d = &l.def;
    let mut flags = String::new();
    if !d.enabled {
        flags.push('x');
    }
    if d.shadow {
        flags.push('h');
    }
    let (kind, interval, count, q, burst) = match d.kind {
        LimitKind::Window {
            limit,
            interval,
            interval_count,
            anchor,
            window,
        } => {
            if anchor == Anchor::BillingCycle {
                flags.push('b');
            }
            let k = match window {
                WindowMode::Fixed => "f",
                WindowMode::Sliding => "s",
            };
            (k, interval, interval_count, limit.raw(), String::new())
        }
        LimitKind::Rate {
            rate,
            interval,
            interval_count,
            burst,
        } => (
            "r",
            interval,
            interval_count,
            rate.raw(),
            e36(burst.raw() as i128),
        ),
    };
    let source = match &d.source {
        LimitSource::UsageLimits => "u".to_string(),
        LimitSource::RateLimits => "r".to_string(),
        LimitSource::Plan(p) => format!("p{p}"),
    };
    let zero_empty = |n: i128| if n == 0 { String::new() } else { e36(n) };
    let (c1, c2, c3) = match l.counter {
        Counter::Window { start, used, prev } => (
            if start == i64::MIN {
                String::new()
            } else {
                e36(start as i128)
            },
            zero_empty(used as i128),
            zero_empty(prev as i128),
        ),
        Counter::Rate { tat } => {
            let r = (q as i128).max(1);
            (
                e36(tat.div_euclid(r)),
                zero_empty(tat.rem_euclid(r)),
                String::new(),
            )
        }
    };
    let fields = [
        d.id.clone(),
        d.feature_id.clone(),
        kind.to_string(),
        flags,
        source,
        e36(interval.code() as i128),
        if count == 1 {
            String::new()
        } else {
            e36(count as i128)
        },
        e36(q as i128),
        burst,
        c1,
        c2,
        c3,
    ];
    let s = fields.join(&US.to_string());
    s.trim_end_matches(US).to_string()
}

/// Decodes the stored limits.
pub fn decode(s: &str) -> Result<Vec<ArmedLimit>, EngineError> {
    if s.is_empty() {
        return Ok(vec![]);
    }
    s.split(RS).map(decode_one).collect()
}

fn decode_one(s: &str) -> Result<ArmedLimit, EngineError> {
    let f: Vec<&str> = s.split(US).collect();
    let field = |n: usize| -> &str { f.get(n - 1).copied().unwrap_or("") };
    let flags = field(4);
    let code = d36(field(6))?.unwrap_or(0);
    let interval = u8::try_from(code)
        .ok()
        .and_then(Interval::from_code)
        .ok_or_else(|| bad("interval"))?;
    let interval_count =
        u32::try_from(d36(field(7))?.unwrap_or(1)).map_err(|_| bad("interval_count"))?;
    let q = d36(field(8))?.unwrap_or(0);
    let source = match field(5) {
        "u" => LimitSource::UsageLimits,
        "r" => LimitSource::RateLimits,
        p => LimitSource::Plan(
            p.strip_prefix('p')
                .ok_or_else(|| bad("source"))?
                .to_string(),
        ),
    };
    let c1 = d36(field(10))?;
    let c2 = d36(field(11))?.unwrap_or(0);
    let c3 = d36(field(12))?.unwrap_or(0);
    let (kind, counter) = match field(3) {
        "r" => (
            LimitKind::Rate {
                rate: amount(q)?,
                interval,
                interval_count,
                burst: amount(d36(field(9))?.unwrap_or(0))?,
            },
            Counter::Rate {
                tat: c1.unwrap_or(0) * q.max(1) + c2,
            },
        ),
        k @ ("f" | "s") => (
            LimitKind::Window {
                limit: amount(q)?,
                interval,
                interval_count,
                anchor: if flags.contains('b') {
                    Anchor::BillingCycle
                } else {
                    Anchor::Utc
                },
                window: if k == "s" {
                    WindowMode::Sliding
                } else {
                    WindowMode::Fixed
                },
            },
            Counter::Window {
                start: c1.map_or(i64::MIN, |n| n as i64),
                used: c2 as i64,
                prev: c3 as i64,
            },
        ),
        _ => return Err(bad("kind")),
    };
    Ok(ArmedLimit {
        def: LimitDef {
            id: field(1).to_string(),
            feature_id: field(2).to_string(),
            kind,
            enabled: !flags.contains('x'),
            shadow: flags.contains('h'),
            source,
        },
        counter,
    })
}

/// What an outcome reply says of limits.
#[derive(Debug, Default)]
pub struct ReplyLimits {
    pub limit: Option<LimitDenial>,
    pub shadow_denied: Vec<String>,
    /// The customer's limits after the operation, when the reply shows a
    /// feature: the statuses are derived from them (`rules::limit_statuses`).
    pub armed: Vec<ArmedLimit>,
}

fn num(s: &str) -> Result<i64, EngineError> {
    s.parse().map_err(|_| bad("reply number"))
}

fn opt_num(s: &str) -> Result<Option<i64>, EngineError> {
    if s.is_empty() {
        Ok(None)
    } else {
        num(s).map(Some)
    }
}

/// Decodes the limits pair of an outcome reply: its name, after
/// [`FIELD`], is `<denying id>\x1f<frees_at>` `\x1e` `<shadow ids joined by
/// \x1f>`; its value the stored limits field after the operation (`''` when
/// the reply shows no feature). Redis formats no status: the sidecar derives
/// them.
pub fn decode_reply(head: &str, field: &str) -> Result<ReplyLimits, EngineError> {
    let mut out = ReplyLimits::default();
    let (denial, shadow) = head.split_once(RS).ok_or_else(|| bad("limits element"))?;
    if !denial.is_empty() {
        let (id, at) = denial.split_once(US).unwrap_or((denial, ""));
        out.limit = Some(LimitDenial {
            id: id.to_string(),
            frees_at: opt_num(at)?,
        });
    }
    if !shadow.is_empty() {
        out.shadow_denied = shadow.split(US).map(str::to_string).collect();
    }
    out.armed = decode(field)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(kind: LimitKind) -> LimitDef {
        LimitDef {
            id: "api_call:rate".into(),
            feature_id: "api_call".into(),
            kind,
            enabled: false,
            shadow: true,
            source: LimitSource::Plan("gated".into()),
        }
    }

    #[test]
    fn stored_limits_round_trip() {
        let list = vec![
            ArmedLimit {
                def: def(LimitKind::Rate {
                    rate: Amount::from_raw(50_000).unwrap(),
                    interval: Interval::Second,
                    interval_count: 1,
                    burst: Amount::from_raw(100_000).unwrap(),
                }),
                counter: Counter::Rate {
                    tat: 1_798_761_600_000i128 * 50_000 + 1234,
                },
            },
            ArmedLimit {
                def: LimitDef {
                    source: LimitSource::UsageLimits,
                    enabled: true,
                    shadow: false,
                    ..def(LimitKind::Window {
                        limit: Amount::from_raw(100_000).unwrap(),
                        interval: Interval::Minute,
                        interval_count: 5,
                        anchor: Anchor::BillingCycle,
                        window: WindowMode::Sliding,
                    })
                },
                counter: Counter::Window {
                    start: 1_798_761_600_000,
                    used: 30_000,
                    prev: 0,
                },
            },
            ArmedLimit::new(LimitDef {
                source: LimitSource::RateLimits,
                ..def(LimitKind::Window {
                    limit: Amount::from_raw(1).unwrap(),
                    interval: Interval::Day,
                    interval_count: 1,
                    anchor: Anchor::Utc,
                    window: WindowMode::Fixed,
                })
            }),
        ];
        let s = encode(&list);
        assert_eq!(decode(&s).unwrap(), list);
        assert!(decode("").unwrap().is_empty());
        assert_eq!(encode(&[]), "");
    }
}
