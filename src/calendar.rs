//! Reset intervals and their boundaries, in milliseconds UTC.
//!
//! A bucket's boundaries are its anchor plus whole intervals. Calendar
//! intervals (month, quarter, semi_annual, year) keep the anchor's day and
//! time of day, clamped to the month's last day: anchored Jan 31, a monthly
//! bucket resets Feb 28 (29), Mar 31, Apr 30, May 31. Boundary `i` is always
//! computed from the anchor, never from boundary `i - 1`, so clamping in
//! February does not drift the day in March.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

pub const SECOND_MS: i64 = 1_000;
pub const MINUTE_MS: i64 = 60 * SECOND_MS;
pub const HOUR_MS: i64 = 60 * MINUTE_MS;
pub const DAY_MS: i64 = 24 * HOUR_MS;
pub const WEEK_MS: i64 = 7 * DAY_MS;
/// The nominal month used to compare periods and bound rollover lifetimes.
pub const NOMINAL_MONTH_MS: i64 = 31 * DAY_MS;
/// The latest instant accepted anywhere: 9999-12-31T23:59:59.999Z.
pub const MAX_INSTANT_MS: i64 = 253_402_300_799_999;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Interval {
    // The discriminants are the codes stored in Redis (`lua/grant.lua`,
    // `make_period` in `lua/creditgate.lua`): never renumber them.
    OneOff = 0,
    Minute = 1,
    Hour = 2,
    Day = 3,
    Week = 4,
    Month = 5,
    Quarter = 6,
    SemiAnnual = 7,
    Year = 8,
    /// Limits only (`crate::limits`); a bucket cannot reset every second.
    /// A new code, appended: the older ones keep theirs.
    Second = 9,
}

/// How one interval advances: a fixed number of milliseconds or of months.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Millis(i64),
    Months(i64),
}

impl Interval {
    pub const ALL: [Interval; 10] = [
        Interval::OneOff,
        Interval::Minute,
        Interval::Hour,
        Interval::Day,
        Interval::Week,
        Interval::Month,
        Interval::Quarter,
        Interval::SemiAnnual,
        Interval::Year,
        Interval::Second,
    ];

    /// The interval's stored code (0 one_off … 8 year, 9 second).
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The interval of a stored code.
    pub fn from_code(code: u8) -> Option<Interval> {
        Interval::ALL.into_iter().find(|i| i.code() == code)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Interval::OneOff => "one_off",
            Interval::Minute => "minute",
            Interval::Hour => "hour",
            Interval::Day => "day",
            Interval::Week => "week",
            Interval::Month => "month",
            Interval::Quarter => "quarter",
            Interval::SemiAnnual => "semi_annual",
            Interval::Year => "year",
            Interval::Second => "second",
        }
    }

    /// One interval's step; `None` for one_off.
    pub fn step(self) -> Option<Step> {
        Some(match self {
            Interval::OneOff => return None,
            Interval::Second => Step::Millis(SECOND_MS),
            Interval::Minute => Step::Millis(MINUTE_MS),
            Interval::Hour => Step::Millis(HOUR_MS),
            Interval::Day => Step::Millis(DAY_MS),
            Interval::Week => Step::Millis(WEEK_MS),
            Interval::Month => Step::Months(1),
            Interval::Quarter => Step::Months(3),
            Interval::SemiAnnual => Step::Months(6),
            Interval::Year => Step::Months(12),
        })
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Interval {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Interval::ALL
            .into_iter()
            .find(|i| i.as_str() == s)
            .ok_or_else(|| format!("unknown interval {s:?}"))
    }
}

/// A resetting period: an interval times a count (≥ 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub step: Step,
}

impl Period {
    /// `None` for one_off (it never resets).
    pub fn new(interval: Interval, count: u32) -> Option<Period> {
        let count = count as i64;
        interval.step().map(|s| Period {
            step: match s {
                Step::Millis(ms) => Step::Millis(ms * count),
                Step::Months(m) => Step::Months(m * count),
            },
        })
    }

    /// The nominal length used to order buckets and bound rollovers
    /// (months count 31 days).
    pub fn nominal_ms(self) -> i64 {
        match self.step {
            Step::Millis(ms) => ms,
            Step::Months(m) => m.saturating_mul(NOMINAL_MONTH_MS),
        }
    }

    /// Boundary `index` of a period anchored at `anchor`.
    pub fn boundary(self, anchor: i64, index: i64) -> i64 {
        match self.step {
            Step::Millis(ms) => anchor.saturating_add(index.saturating_mul(ms)),
            Step::Months(m) => add_months(anchor, index.saturating_mul(m)),
        }
    }

    /// The largest index whose boundary is at or before `t`.
    pub fn last_index_at_or_before(self, anchor: i64, t: i64) -> i64 {
        let mut i = match self.step {
            Step::Millis(ms) => (t - anchor).div_euclid(ms),
            Step::Months(m) => {
                let (ya, ma, _, _) = civil_from_ms(anchor);
                let (yt, mt, _, _) = civil_from_ms(t);
                ((yt - ya) * 12 + (mt - ma)).div_euclid(m)
            }
        };
        // The estimate is off by at most one step either way (day clamping).
        while self.boundary(anchor, i + 1) <= t {
            i += 1;
        }
        while self.boundary(anchor, i) > t {
            i -= 1;
        }
        i
    }
}

/// Adds `months` calendar months to an instant, keeping its day (clamped to
/// the target month's last day) and its time of day.
pub fn add_months(t: i64, months: i64) -> i64 {
    let (y, m, d, tod) = civil_from_ms(t);
    let total = y * 12 + (m - 1) + months;
    let (ny, nm) = (total.div_euclid(12), total.rem_euclid(12) + 1);
    let nd = d.min(days_in_month(ny, nm));
    days_from_civil(ny, nm, nd) * DAY_MS + tod
}

pub fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

pub fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(y) => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month 1-12, day 1-31, millisecond of the day) of an instant.
pub fn civil_from_ms(t: i64) -> (i64, i64, i64, i64) {
    let days = t.div_euclid(DAY_MS);
    let tod = t.rem_euclid(DAY_MS);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    (y, m, d, tod)
}

/// Milliseconds of a UTC date and time (test and example convenience).
pub fn ms_of(y: i64, m: i64, d: i64, hh: i64, mm: i64) -> i64 {
    days_from_civil(y, m, d) * DAY_MS + hh * HOUR_MS + mm * MINUTE_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_codes_are_the_stored_ones() {
        // Stored buckets hold these codes: this pins them.
        let codes: Vec<(Interval, u8)> = Interval::ALL.iter().map(|i| (*i, i.code())).collect();
        assert_eq!(
            codes,
            [
                (Interval::OneOff, 0),
                (Interval::Minute, 1),
                (Interval::Hour, 2),
                (Interval::Day, 3),
                (Interval::Week, 4),
                (Interval::Month, 5),
                (Interval::Quarter, 6),
                (Interval::SemiAnnual, 7),
                (Interval::Year, 8),
                (Interval::Second, 9),
            ]
        );
        assert_eq!(Interval::from_code(5), Some(Interval::Month));
        assert_eq!(Interval::from_code(9), Some(Interval::Second));
        assert_eq!(Interval::from_code(10), None);
    }

    #[test]
    fn month_end_clamps_without_drift() {
        let p = Period::new(Interval::Month, 1).unwrap();
        let anchor = ms_of(2027, 1, 31, 10, 0);
        let got: Vec<_> = (1..=4)
            .map(|i| civil_from_ms(p.boundary(anchor, i)))
            .collect();
        let want = [(2027, 2, 28), (2027, 3, 31), (2027, 4, 30), (2027, 5, 31)];
        for (g, w) in got.iter().zip(want) {
            assert_eq!((g.0, g.1, g.2), w);
            assert_eq!(g.3, 10 * HOUR_MS);
        }
        let leap = ms_of(2028, 1, 31, 0, 0);
        assert_eq!(civil_from_ms(p.boundary(leap, 1)).2, 29);
    }

    #[test]
    fn last_index_matches_boundaries() {
        let p = Period::new(Interval::Month, 1).unwrap();
        let anchor = ms_of(2027, 1, 31, 0, 0);
        for i in -3..30 {
            let b = p.boundary(anchor, i);
            assert_eq!(p.last_index_at_or_before(anchor, b), i);
            assert_eq!(p.last_index_at_or_before(anchor, b - 1), i - 1);
        }
        let w = Period::new(Interval::Week, 2).unwrap();
        assert_eq!(w.last_index_at_or_before(0, 2 * WEEK_MS - 1), 0);
        assert_eq!(w.last_index_at_or_before(0, 2 * WEEK_MS), 1);
        assert_eq!(w.last_index_at_or_before(0, -1), -1);
    }

    #[test]
    fn civil_round_trips() {
        for days in [-800_000i64, -1, 0, 1, 11_016, 59, 2_932_896] {
            let (y, m, d, _) = civil_from_ms(days * DAY_MS);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
