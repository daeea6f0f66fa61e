//! The stream codec: one [`LedgerEntry`] as one compact string, as the
//! Redis functions append it (`XADD <stream> MAXLEN … * e <encoded>`) and the
//! drain reads it back. The entry's `id` is not in the string: it is the
//! stream entry id Redis assigns (`<ms>-<seq>`), given to [`decode`].
//!
//! Fields are separated by `\x1f` (unit separator), the items of a list by
//! `\x1e` (record separator), an item's sub-fields by `\x1d` (group
//! separator). Integers are decimal (amounts are raw fixed point, 1/10_000ths:
//! see [`crate::money`]); an empty field is `None` (or an empty list). Ids
//! never hold control characters ([`crate::model::validate_id`]), so the
//! separators cannot occur inside a field; an optional string is never
//! `Some("")` (ids are non-empty).
//!
//! | # | field             | encoding                                                   |
//! |---|-------------------|------------------------------------------------------------|
//! | 0 | version           | `1`                                                        |
//! | 1 | `at`              | ms, decimal (`i64`)                                        |
//! | 2 | `customer_id`     | text, required                                             |
//! | 3 | `feature_id`      | text; empty = `None`                                       |
//! | 4 | `op`              | [`LedgerOp::as_str`] (`consume`, `track`, …)               |
//! | 5 | `units`           | raw amount, decimal (`-10000` = -1)                        |
//! | 6 | `balances`        | items `balance_id ⅹ pool ⅹ plan_id ⅹ amount` (ⅹ = `\x1d`), joined by `\x1e`; `plan_id` empty = `None` |
//! | 7 | `limits`          | items `limit_id ⅹ window_start ⅹ amount ⅹ tat`, joined by `\x1e`; `window_start`, `tat` empty = `None` (`tat` is an `i128`) |
//! | 8 | `idempotency_key` | text; empty = `None`                                       |
//! | 9 | `lock_id`         | text; empty = `None`                                       |
//! | 10| `subject`         | text; empty = `None`                                       |
//!
//! Example (separators shown as `|`, `;`, `,`): a track of 3 premium
//! messages paid by 30 credits from `pro:credits` with key `req-1` is
//! `1|1798761600000|alice|premium_message|track|30000|pro:credits,credits,pro,-300000||req-1||`.

use crate::ledger::{BalanceDelta, LedgerEntry, LedgerOp, LimitDelta};
use crate::money::Amount;

/// Separates an entry's fields.
pub const FIELD: char = '\x1f';
/// Separates a list's items.
pub const ITEM: char = '\x1e';
/// Separates an item's sub-fields.
pub const SUB: char = '\x1d';
/// The layout's version, the first field.
pub const VERSION: &str = "1";
/// The number of fields of version 1.
pub const FIELDS: usize = 11;
/// The stream entry's field name the encoded entry is stored under.
pub const STREAM_FIELD: &str = "e";

/// Why a string is not an encoded entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("not a stream entry id (<ms>-<seq>): {0:?}")]
    BadId(String),
    #[error("unknown layout version {0:?} (this build reads version 1)")]
    Version(String),
    #[error("{found} fields, expected {expected}")]
    FieldCount { expected: usize, found: usize },
    #[error("{field}: {found} sub-fields, expected {expected}")]
    SubFieldCount {
        field: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("{field}: must not be empty")]
    Empty { field: &'static str },
    #[error("{field}: not a decimal integer: {value:?}")]
    BadInteger { field: &'static str, value: String },
    #[error("{field}: amount out of range: {value}")]
    AmountOutOfRange { field: &'static str, value: i64 },
    #[error("unknown op {0:?}")]
    UnknownOp(String),
}

/// A stream entry id `<ms>-<seq>` as two integers (both at most `i64::MAX`,
/// so they fit the database's BIGINT columns), compared as Redis compares
/// them.
pub fn parse_id(id: &str) -> Result<(i64, i64), CodecError> {
    let bad = || CodecError::BadId(id.to_string());
    let (ms, seq) = id.split_once('-').ok_or_else(bad)?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(ms) || !digits(seq) {
        return Err(bad());
    }
    Ok((
        ms.parse().map_err(|_| bad())?,
        seq.parse().map_err(|_| bad())?,
    ))
}

/// The id `<ms>-<seq>`.
pub fn format_id(ms: i64, seq: i64) -> String {
    format!("{ms}-{seq}")
}

/// The entry without its id, in the layout above.
pub fn encode(e: &LedgerEntry) -> String {
    let mut s = String::with_capacity(96);
    let opt = |o: &Option<String>| o.clone().unwrap_or_default();
    s.push_str(VERSION);
    for field in [
        e.at.to_string(),
        e.customer_id.clone(),
        opt(&e.feature_id),
        e.op.as_str().to_string(),
        e.units.raw().to_string(),
        encode_balances(&e.balances),
        encode_limits(&e.limits),
        opt(&e.idempotency_key),
        opt(&e.lock_id),
        opt(&e.subject),
    ] {
        s.push(FIELD);
        s.push_str(&field);
    }
    s
}

/// Field 6 alone (the store keeps it as its `balances` column).
pub fn encode_balances(balances: &[BalanceDelta]) -> String {
    let items: Vec<String> = balances
        .iter()
        .map(|b| {
            [
                b.balance_id.as_str(),
                b.pool.as_str(),
                b.plan_id.as_deref().unwrap_or(""),
                &b.amount.raw().to_string(),
            ]
            .join(&SUB.to_string())
        })
        .collect();
    items.join(&ITEM.to_string())
}

/// Field 7 alone (the store keeps it as its `limits` column).
pub fn encode_limits(limits: &[LimitDelta]) -> String {
    let items: Vec<String> = limits
        .iter()
        .map(|l| {
            [
                l.limit_id.clone(),
                l.window_start.map(|w| w.to_string()).unwrap_or_default(),
                l.amount.raw().to_string(),
                l.tat.map(|t| t.to_string()).unwrap_or_default(),
            ]
            .join(&SUB.to_string())
        })
        .collect();
    items.join(&ITEM.to_string())
}

/// The entry `s` encodes, with the stream entry id `id`.
pub fn decode(id: &str, s: &str) -> Result<LedgerEntry, CodecError> {
    parse_id(id)?;
    let fields: Vec<&str> = s.split(FIELD).collect();
    if fields[0] != VERSION {
        return Err(CodecError::Version(
            fields[0].chars().take(16).collect::<String>(),
        ));
    }
    if fields.len() != FIELDS {
        return Err(CodecError::FieldCount {
            expected: FIELDS,
            found: fields.len(),
        });
    }
    let op = LedgerOp::parse(fields[4]).ok_or_else(|| CodecError::UnknownOp(fields[4].into()))?;
    Ok(LedgerEntry {
        id: id.to_string(),
        at: int("at", fields[1])?,
        customer_id: required("customer_id", fields[2])?,
        feature_id: optional(fields[3]),
        op,
        units: amount("units", fields[5])?,
        balances: decode_balances(fields[6])?,
        limits: decode_limits(fields[7])?,
        idempotency_key: optional(fields[8]),
        lock_id: optional(fields[9]),
        subject: optional(fields[10]),
    })
}

/// Field 6 alone.
pub fn decode_balances(s: &str) -> Result<Vec<BalanceDelta>, CodecError> {
    items(s, "balances", 4)
        .map(|parts| {
            let parts = parts?;
            Ok(BalanceDelta {
                balance_id: required("balances.balance_id", parts[0])?,
                pool: required("balances.pool", parts[1])?,
                plan_id: optional(parts[2]),
                amount: amount("balances.amount", parts[3])?,
            })
        })
        .collect()
}

/// Field 7 alone.
pub fn decode_limits(s: &str) -> Result<Vec<LimitDelta>, CodecError> {
    items(s, "limits", 4)
        .map(|parts| {
            let parts = parts?;
            Ok(LimitDelta {
                limit_id: required("limits.limit_id", parts[0])?,
                window_start: match parts[1] {
                    "" => None,
                    w => Some(int("limits.window_start", w)?),
                },
                amount: amount("limits.amount", parts[2])?,
                tat: match parts[3] {
                    "" => None,
                    t => Some(int("limits.tat", t)?),
                },
            })
        })
        .collect()
}

/// The items of a list field, each split into exactly `n` sub-fields.
fn items<'a>(
    s: &'a str,
    field: &'static str,
    n: usize,
) -> impl Iterator<Item = Result<Vec<&'a str>, CodecError>> + 'a {
    s.split(ITEM)
        .filter(move |_| !s.is_empty())
        .map(move |item| {
            let parts: Vec<&str> = item.split(SUB).collect();
            if parts.len() == n {
                Ok(parts)
            } else {
                Err(CodecError::SubFieldCount {
                    field,
                    expected: n,
                    found: parts.len(),
                })
            }
        })
}

fn optional(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn required(field: &'static str, s: &str) -> Result<String, CodecError> {
    optional(s).ok_or(CodecError::Empty { field })
}

/// A decimal integer: an optional `-` and digits only (no `+`, no spaces).
fn int<T: std::str::FromStr>(field: &'static str, s: &str) -> Result<T, CodecError> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CodecError::BadInteger {
            field,
            value: s.chars().take(32).collect(),
        });
    }
    s.parse().map_err(|_| CodecError::BadInteger {
        field,
        value: s.chars().take(32).collect(),
    })
}

fn amount(field: &'static str, s: &str) -> Result<Amount, CodecError> {
    let raw: i64 = int(field, s)?;
    Amount::from_raw(raw).ok_or(CodecError::AmountOutOfRange { field, value: raw })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> LedgerEntry {
        LedgerEntry {
            id: "1798761600000-3".into(),
            at: 1_798_761_600_000,
            customer_id: "alice".into(),
            feature_id: Some("premium_message".into()),
            op: LedgerOp::Track,
            units: Amount::whole(3),
            balances: vec![
                BalanceDelta {
                    balance_id: "pro:credits".into(),
                    pool: "credits".into(),
                    plan_id: Some("pro".into()),
                    amount: Amount::whole(-30),
                },
                BalanceDelta {
                    balance_id: "b_top".into(),
                    pool: "credits".into(),
                    plan_id: None,
                    amount: Amount::from_raw(-5).unwrap(),
                },
            ],
            limits: vec![
                LimitDelta {
                    limit_id: "per_min".into(),
                    window_start: Some(1_798_761_600_000),
                    amount: Amount::whole(3),
                    tat: None,
                },
                LimitDelta {
                    limit_id: "rate".into(),
                    window_start: None,
                    amount: Amount::whole(1),
                    tat: Some(i128::from(i64::MAX) * 1000),
                },
            ],
            idempotency_key: Some("req-1".into()),
            lock_id: None,
            subject: None,
        }
    }

    #[test]
    fn the_documented_example() {
        let mut e = sample();
        e.balances.truncate(1);
        e.limits.clear();
        let shown = encode(&e)
            .replace(FIELD, "|")
            .replace(ITEM, ";")
            .replace(SUB, ",");
        assert_eq!(
            shown,
            "1|1798761600000|alice|premium_message|track|30000|pro:credits,credits,pro,-300000||req-1||"
        );
        assert_eq!(decode(&e.id, &encode(&e)).unwrap(), e);
    }

    #[test]
    fn round_trips_the_sample_and_an_empty_entry() {
        let e = sample();
        assert_eq!(decode(&e.id, &encode(&e)).unwrap(), e);
        let bare = LedgerEntry {
            id: "0-0".into(),
            at: 0,
            customer_id: "c".into(),
            feature_id: None,
            op: LedgerOp::DeleteCustomer,
            units: Amount::ZERO,
            balances: vec![],
            limits: vec![],
            idempotency_key: None,
            lock_id: None,
            subject: None,
        };
        assert_eq!(decode("0-0", &encode(&bare)).unwrap(), bare);
        assert_eq!(encode(&bare).matches(FIELD).count(), FIELDS - 1);
    }

    #[test]
    fn ids_parse_as_two_integers() {
        assert_eq!(
            parse_id("1798761600000-12").unwrap(),
            (1_798_761_600_000, 12)
        );
        assert_eq!(format_id(5, 0), "5-0");
        for bad in ["", "1", "1-", "-1", "a-1", "1-b", "1-2-3", "+1-2", "1- 2"] {
            assert_eq!(parse_id(bad), Err(CodecError::BadId(bad.into())), "{bad}");
        }
        // Past i64: refused, not wrapped.
        assert!(parse_id("9223372036854775808-0").is_err());
    }

    #[test]
    fn malformed_input_is_a_typed_error() {
        let good = encode(&sample());
        let id = "1-0";
        let with = |i: usize, v: &str| {
            let mut f: Vec<&str> = good.split(FIELD).collect();
            f[i] = v;
            f.join(&FIELD.to_string())
        };
        assert_eq!(decode("x", &good), Err(CodecError::BadId("x".into())));
        assert_eq!(decode(id, ""), Err(CodecError::Version("".into())));
        assert_eq!(
            decode(id, &with(0, "2")),
            Err(CodecError::Version("2".into()))
        );
        assert_eq!(
            decode(id, &format!("{good}{FIELD}")),
            Err(CodecError::FieldCount {
                expected: FIELDS,
                found: FIELDS + 1
            })
        );
        assert_eq!(
            decode(id, "1\x1f2"),
            Err(CodecError::FieldCount {
                expected: FIELDS,
                found: 2
            })
        );
        assert!(matches!(
            decode(id, &with(1, "12a")),
            Err(CodecError::BadInteger { field: "at", .. })
        ));
        assert!(matches!(
            decode(id, &with(1, "")),
            Err(CodecError::BadInteger { field: "at", .. })
        ));
        assert!(matches!(
            decode(id, &with(1, "+5")),
            Err(CodecError::BadInteger { field: "at", .. })
        ));
        assert_eq!(
            decode(id, &with(2, "")),
            Err(CodecError::Empty {
                field: "customer_id"
            })
        );
        assert_eq!(
            decode(id, &with(4, "spend")),
            Err(CodecError::UnknownOp("spend".into()))
        );
        assert_eq!(
            decode(id, &with(5, "1000000000000000001")),
            Err(CodecError::AmountOutOfRange {
                field: "units",
                value: 1_000_000_000_000_000_001
            })
        );
        assert_eq!(
            decode(id, &with(6, "a\x1db\x1d-1")),
            Err(CodecError::SubFieldCount {
                field: "balances",
                expected: 4,
                found: 3
            })
        );
        assert_eq!(
            decode(id, &with(6, "\x1dpool\x1d\x1d1")),
            Err(CodecError::Empty {
                field: "balances.balance_id"
            })
        );
        assert!(matches!(
            decode(id, &with(7, "l\x1dx\x1d1\x1d")),
            Err(CodecError::BadInteger {
                field: "limits.window_start",
                ..
            })
        ));
        // An empty item inside a list is malformed, not skipped.
        assert!(matches!(
            decode(id, &with(6, "a\x1dp\x1d\x1d1\x1e")),
            Err(CodecError::SubFieldCount { .. })
        ));
    }

    fn text() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9:_.\\- é]{1,16}"
    }

    fn amount_strategy() -> impl Strategy<Value = Amount> {
        (-crate::money::MAX_AMOUNT_RAW..=crate::money::MAX_AMOUNT_RAW)
            .prop_map(|r| Amount::from_raw(r).unwrap())
    }

    fn entry() -> impl Strategy<Value = LedgerEntry> {
        let balance = (
            text(),
            text(),
            proptest::option::of(text()),
            amount_strategy(),
        )
            .prop_map(|(balance_id, pool, plan_id, amount)| BalanceDelta {
                balance_id,
                pool,
                plan_id,
                amount,
            });
        let limit = (
            text(),
            proptest::option::of(any::<i64>()),
            amount_strategy(),
            proptest::option::of(any::<i128>()),
        )
            .prop_map(|(limit_id, window_start, amount, tat)| LimitDelta {
                limit_id,
                window_start,
                amount,
                tat,
            });
        let ops = Just(()).prop_flat_map(|_| {
            prop::sample::select(
                [
                    "consume",
                    "track",
                    "refund",
                    "reserve",
                    "finalize",
                    "lock_expired",
                    "grant",
                    "update",
                    "reset",
                    "expire",
                    "delete_balance",
                    "delete_customer",
                    "alert",
                    "limit_reached",
                ]
                .to_vec(),
            )
        });
        (
            (any::<u32>(), any::<u16>(), any::<i64>(), text()),
            proptest::option::of(text()),
            ops,
            amount_strategy(),
            prop::collection::vec(balance, 0..4),
            prop::collection::vec(limit, 0..3),
            (
                proptest::option::of(text()),
                proptest::option::of(text()),
                proptest::option::of(text()),
            ),
        )
            .prop_map(
                |(
                    (ms, seq, at, customer_id),
                    feature_id,
                    op,
                    units,
                    balances,
                    limits,
                    (idempotency_key, lock_id, subject),
                )| LedgerEntry {
                    id: format_id(ms.into(), seq.into()),
                    at,
                    customer_id,
                    feature_id,
                    op: LedgerOp::parse(op).unwrap(),
                    units,
                    balances,
                    limits,
                    idempotency_key,
                    lock_id,
                    subject,
                },
            )
    }

    proptest! {
        #[test]
        fn every_entry_round_trips(e in entry()) {
            let s = encode(&e);
            prop_assert_eq!(s.split(FIELD).count(), FIELDS);
            prop_assert_eq!(decode(&e.id, &s).unwrap(), e);
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,200}", id in "[0-9]{1,5}-[0-9]{1,3}") {
            let _ = decode(&id, &s);
        }

        #[test]
        fn a_mutated_entry_decodes_or_errs_without_panicking(e in entry(), at in 0usize..400, byte in any::<u8>()) {
            let mut b = encode(&e).into_bytes();
            let i = at % b.len();
            b[i] = byte;
            if let Ok(s) = String::from_utf8(b) {
                let _ = decode(&e.id, &s);
            }
        }
    }
}
