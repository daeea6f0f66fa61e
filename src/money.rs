//! Exact fixed-point money.
//!
//! Every amount (grants, balances, units, charges) is an [`Amount`]: an integer
//! count of 1/10_000ths, with a magnitude of at most 10^11 (raw 10^15). Every
//! credit cost is a [`Cost`]: an integer count of 1/1_000_000ths in (0, 10^6].
//! Both bounds keep every stored raw value below 2^53, so the Lua scripts can
//! hold them in doubles exactly. Products are computed in `i128` here; the Lua
//! library splits them into limbs to get the same exact answer.
//!
//! The rounding rule lives here and nowhere else: a source with cost `c` pays
//! `ceil(units × c)` at 4 digits, and covers the most units it can afford.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Fractional digits of an [`Amount`].
pub const AMOUNT_DIGITS: u32 = 4;
/// Raw units per whole amount (10^4).
pub const AMOUNT_SCALE: i64 = 10_000;
/// Largest magnitude of an amount, raw: 10^11 whole units.
pub const MAX_AMOUNT_RAW: i64 = 1_000_000_000_000_000;
/// Fractional digits of a [`Cost`].
pub const COST_DIGITS: u32 = 6;
/// Raw units per whole credit cost (10^6).
pub const COST_SCALE: i64 = 1_000_000;
/// Largest credit cost, raw: 10^6 credits per unit.
pub const MAX_COST_RAW: i64 = 1_000_000_000_000;

/// Why a decimal was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("not a decimal number")]
    NotANumber,
    #[error("more than {0} fractional digits")]
    TooManyDigits(u32),
    #[error("outside the allowed range (magnitude at most {0})")]
    OutOfRange(&'static str),
    #[error("must be greater than zero")]
    NotPositive,
}

/// An exact decimal with 4 fractional digits, |value| ≤ 10^11.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Amount(i64);

impl Amount {
    pub const ZERO: Amount = Amount(0);
    pub const MAX: Amount = Amount(MAX_AMOUNT_RAW);

    /// From a raw count of 1/10_000ths; `None` outside the bounds.
    pub fn from_raw(raw: i64) -> Option<Amount> {
        (raw.unsigned_abs() <= MAX_AMOUNT_RAW as u64).then_some(Amount(raw))
    }

    /// From a raw value computed in i128; `None` outside the bounds.
    pub fn from_raw_i128(raw: i128) -> Option<Amount> {
        i64::try_from(raw).ok().and_then(Amount::from_raw)
    }

    /// From whole units (test and example convenience).
    pub fn whole(n: i64) -> Amount {
        Amount::from_raw(n.saturating_mul(AMOUNT_SCALE)).expect("whole amount within bounds")
    }

    pub fn raw(self) -> i64 {
        self.0
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// |self| (always within bounds: the bounds are symmetric).
    pub fn abs(self) -> Amount {
        Amount(self.0.abs())
    }

    /// Parses a plain decimal string (`"25"`, `"-0.5"`, `"25.00"`).
    pub fn parse(s: &str) -> Result<Amount, MoneyError> {
        let raw = parse_decimal(s, AMOUNT_DIGITS)?;
        i64::try_from(raw)
            .ok()
            .and_then(Amount::from_raw)
            .ok_or(MoneyError::OutOfRange("1e11"))
    }

    /// From a float as JSON delivers it. The float's shortest round-trip
    /// representation is parsed as a decimal, so `0.1` is exactly 0.1: every
    /// in-range amount has at most 15 significant digits, which a double holds.
    pub fn from_f64(f: f64) -> Result<Amount, MoneyError> {
        if !f.is_finite() {
            return Err(MoneyError::NotANumber);
        }
        if f.abs() > 1e12 {
            return Err(MoneyError::OutOfRange("1e11"));
        }
        Amount::parse(&format!("{f}"))
    }

    /// The nearest double; exact in decimal form because the division of two
    /// integers below 2^53 is correctly rounded.
    pub fn to_f64(self) -> f64 {
        self.0 as f64 / AMOUNT_SCALE as f64
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        format_decimal(f, self.0 as i128, AMOUNT_DIGITS)
    }
}

impl FromStr for Amount {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Amount::parse(s)
    }
}

/// An exact credit cost per unit, 6 fractional digits, in (0, 10^6].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cost(i64);

impl Cost {
    /// The cost of a pool's own unit: 1.
    pub const ONE: Cost = Cost(COST_SCALE);

    pub fn from_raw(raw: i64) -> Result<Cost, MoneyError> {
        if raw <= 0 {
            Err(MoneyError::NotPositive)
        } else if raw > MAX_COST_RAW {
            Err(MoneyError::OutOfRange("1e6"))
        } else {
            Ok(Cost(raw))
        }
    }

    pub fn parse(s: &str) -> Result<Cost, MoneyError> {
        let raw = parse_decimal(s, COST_DIGITS)?;
        let raw = i64::try_from(raw).map_err(|_| MoneyError::OutOfRange("1e6"))?;
        Cost::from_raw(raw)
    }

    pub fn from_f64(f: f64) -> Result<Cost, MoneyError> {
        if !f.is_finite() {
            return Err(MoneyError::NotANumber);
        }
        if f.abs() > 1e7 {
            return Err(MoneyError::OutOfRange("1e6"));
        }
        Cost::parse(&format!("{f}"))
    }

    pub fn raw(self) -> i64 {
        self.0
    }

    pub fn to_f64(self) -> f64 {
        self.0 as f64 / COST_SCALE as f64
    }
}

impl fmt::Display for Cost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        format_decimal(f, self.0 as i128, COST_DIGITS)
    }
}

impl FromStr for Cost {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Cost::parse(s)
    }
}

/// What `units` (raw, ≥ 0) cost at `cost`, raw, rounded up to 4 digits:
/// `ceil(units × cost)`. Not bounded: callers compare it with what is available.
pub fn charge(units: i64, cost: Cost) -> i128 {
    let product = units as i128 * cost.0 as i128;
    let scale = COST_SCALE as i128;
    (product + scale - 1).div_euclid(scale)
}

/// The most units (raw) whose [`charge`] at `cost` fits in `available` (raw):
/// `floor(available / cost)`, because `ceil(u·c) ≤ a ⇔ u·c ≤ a` for integer `a`.
pub fn affordable_units(available: i64, cost: Cost) -> i128 {
    if available <= 0 {
        return 0;
    }
    (available as i128 * COST_SCALE as i128) / cost.0 as i128
}

/// How many units (raw) of `need` a source with `available` (raw) covers at
/// `cost`, and the exact charge it pays for them. Rounding happens per source.
pub fn cover(need: i64, available: i64, cost: Cost) -> (i64, i64) {
    let units = (need as i128).min(affordable_units(available, cost)).max(0) as i64;
    let paid = charge(units, cost) as i64; // ≤ available ≤ 10^15
    (units, paid)
}

fn parse_decimal(s: &str, digits: u32) -> Result<i128, MoneyError> {
    let s = s.trim();
    let (negative, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int_part, frac_part) = match body.split_once('.') {
        Some((i, f)) => (i, f),
        None => (body, ""),
    };
    let is_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if int_part.is_empty() || !is_digits(int_part) || !is_digits(frac_part) {
        return Err(MoneyError::NotANumber);
    }
    if body.contains('.') && frac_part.is_empty() {
        return Err(MoneyError::NotANumber);
    }
    let frac_trimmed = frac_part.trim_end_matches('0');
    if frac_trimmed.len() > digits as usize {
        return Err(MoneyError::TooManyDigits(digits));
    }
    let int_trimmed = int_part.trim_start_matches('0');
    if int_trimmed.len() > 20 {
        return Err(MoneyError::OutOfRange("bound"));
    }
    let mut value: i128 = 0;
    for b in int_trimmed.bytes() {
        value = value * 10 + (b - b'0') as i128;
    }
    for i in 0..digits as usize {
        let d = frac_trimmed.as_bytes().get(i).map_or(0, |b| b - b'0');
        value = value * 10 + d as i128;
    }
    Ok(if negative { -value } else { value })
}

fn format_decimal(f: &mut fmt::Formatter<'_>, raw: i128, digits: u32) -> fmt::Result {
    let scale = 10i128.pow(digits);
    let sign = if raw < 0 { "-" } else { "" };
    let abs = raw.abs();
    let (int, frac) = (abs / scale, abs % scale);
    if frac == 0 {
        return write!(f, "{sign}{int}");
    }
    let frac = format!("{:0width$}", frac, width = digits as usize);
    write!(f, "{sign}{int}.{}", frac.trim_end_matches('0'))
}

/// Accepts a JSON number or a decimal string.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrString {
    Int(i64),
    Float(f64),
    Str(String),
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let parsed = match NumberOrString::deserialize(d)? {
            NumberOrString::Int(i) => i
                .checked_mul(AMOUNT_SCALE)
                .and_then(Amount::from_raw)
                .ok_or(MoneyError::OutOfRange("1e11")),
            NumberOrString::Float(f) => Amount::from_f64(f),
            NumberOrString::Str(s) => Amount::parse(&s),
        };
        parsed.map_err(D::Error::custom)
    }
}

impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 % AMOUNT_SCALE == 0 {
            s.serialize_i64(self.0 / AMOUNT_SCALE)
        } else {
            s.serialize_f64(self.to_f64())
        }
    }
}

impl<'de> Deserialize<'de> for Cost {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let parsed = match NumberOrString::deserialize(d)? {
            NumberOrString::Int(i) => i
                .checked_mul(COST_SCALE)
                .ok_or(MoneyError::OutOfRange("1e6"))
                .and_then(Cost::from_raw),
            NumberOrString::Float(f) => Cost::from_f64(f),
            NumberOrString::Str(s) => Cost::parse(&s),
        };
        parsed.map_err(D::Error::custom)
    }
}

impl Serialize for Cost {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.to_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_equal_forms_to_one_amount() {
        let a = Amount::parse("25").unwrap();
        assert_eq!(a, Amount::parse("25.00").unwrap());
        assert_eq!(a, Amount::from_f64(25.0).unwrap());
        assert_eq!(a.raw(), 250_000);
        assert_eq!(Amount::from_f64(0.1).unwrap().raw(), 1_000);
        assert_eq!(Amount::from_f64(499.94).unwrap().to_string(), "499.94");
    }

    #[test]
    fn rejects_bad_decimals() {
        assert_eq!(Amount::parse("0.00001"), Err(MoneyError::TooManyDigits(4)));
        assert!(Amount::parse("1e3").is_err());
        assert!(Amount::parse("").is_err());
        assert!(Amount::parse("1.").is_err());
        assert!(Amount::parse("abc").is_err());
        assert!(Amount::parse("100000000000.0001").is_err());
        assert!(Amount::parse("100000000000").is_ok());
        assert!(Amount::from_f64(f64::NAN).is_err());
        assert!(Amount::from_f64(f64::INFINITY).is_err());
        assert!(Cost::parse("0").is_err());
        assert!(Cost::parse("0.0000001").is_err());
        assert!(Cost::parse("1000000.000001").is_err());
        assert_eq!(Cost::parse("0.333333").unwrap().raw(), 333_333);
    }

    #[test]
    fn charges_round_up_per_source() {
        let third = Cost::parse("0.333333").unwrap();
        assert_eq!(charge(Amount::whole(1).raw(), third), 3_334);
        let (units, paid) = cover(10_000, 3_334, third);
        assert_eq!((units, paid), (10_000, 3_334));
        // 100.398 credits do not fit in 100.
        let c = Cost::parse("0.6").unwrap();
        assert_eq!(charge(Amount::parse("167.33").unwrap().raw(), c), 1_003_980);
        let (units, paid) = cover(1_673_300, 1_000_000, c);
        assert!(paid <= 1_000_000);
        assert!(charge(units + 1, c) > 1_000_000);
    }

    #[test]
    fn serializes_exact_decimals() {
        let v = serde_json::to_string(&Amount::parse("499.94").unwrap()).unwrap();
        assert_eq!(v, "499.94");
        let v = serde_json::to_string(&Amount::whole(25)).unwrap();
        assert_eq!(v, "25");
        let a: Amount = serde_json::from_str("\"25.00\"").unwrap();
        assert_eq!(a, Amount::whole(25));
    }
}
