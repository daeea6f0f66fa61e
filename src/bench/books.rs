//! The books check: after the load, what the answers reported as charged
//! must equal what the balances show spent, customer by customer, and no
//! denial may have come from a customer that still had enough balance.
//!
//! All amounts are raw fixed-point (×10⁴, [`crate::money::AMOUNT_SCALE`]) in
//! the paying pool's units. The load only ever takes from one-off buckets
//! (no resets, no refunds), so a customer's balance only goes down during a
//! run: a denial of cost `c` was legal only if the balance was below `c`
//! then, hence the final balance must be below the smallest denied cost.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use serde::Serialize;

/// What the answers said about one customer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CustomerLedger {
    /// Sum of what allowed answers reported as charged.
    pub charged: i64,
    pub allowed: u64,
    pub denied: u64,
    /// The smallest cost a denial was for (`None`: no denial).
    pub min_denied_cost: Option<i64>,
    /// Denials whose own answer showed a balance covering the cost.
    pub denials_with_enough: u64,
    /// Charging requests whose outcome is unknown (timed out, connection
    /// lost after sending, or the sidecar lost its store mid-request).
    pub unknown: u64,
    /// The most those unknown requests could have charged.
    pub unknown_max: i64,
}

/// A customer's balance in the paying pool, as read back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Balance {
    /// What the balance shows used.
    pub spent: i64,
    /// What is left (≥ 0 with the default load).
    pub remaining: i64,
}

/// One customer whose books do not balance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    pub customer: String,
    /// `charged`, `denied_with_enough_balance` or `denial_reported_enough`.
    pub kind: &'static str,
    pub charged: String,
    pub spent: String,
    pub unknown: u64,
    pub detail: String,
}

/// The verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BooksReport {
    pub system: String,
    pub ok: bool,
    pub customers: usize,
    pub allowed: u64,
    pub denied: u64,
    pub charged: String,
    pub spent: String,
    /// Requests whose outcome is unknown (reported apart, allowed for).
    pub unknown: u64,
    pub mismatches: usize,
    /// The first few mismatches.
    pub examples: Vec<Mismatch>,
}

fn amount(raw: i64) -> String {
    crate::money::Amount::from_raw(raw).map_or_else(|| format!("{raw}e-4"), |a| a.to_string())
}

/// Checks every customer's books. `before` and `after` are the balances read
/// back before and after the load; `name(i)` names customer `i`.
pub fn check(
    system: &str,
    ledgers: &[CustomerLedger],
    before: &[Balance],
    after: &[Balance],
    name: &dyn Fn(usize) -> String,
) -> BooksReport {
    const EXAMPLES: usize = 10;
    let mut r = BooksReport {
        system: system.to_string(),
        customers: ledgers.len(),
        ..BooksReport::default()
    };
    let (mut charged_total, mut spent_total) = (0i128, 0i128);
    let push = |r: &mut BooksReport, m: Mismatch| {
        r.mismatches += 1;
        if r.examples.len() < EXAMPLES {
            r.examples.push(m);
        }
    };
    for (i, l) in ledgers.iter().enumerate() {
        let (b, a) = match (before.get(i), after.get(i)) {
            (Some(b), Some(a)) => (b, a),
            _ => {
                push(
                    &mut r,
                    Mismatch {
                        customer: name(i),
                        kind: "missing_balance",
                        charged: amount(l.charged),
                        spent: "?".into(),
                        unknown: l.unknown,
                        detail: "no balance read back".into(),
                    },
                );
                continue;
            }
        };
        let spent = a.spent - b.spent;
        r.allowed += l.allowed;
        r.denied += l.denied;
        r.unknown += l.unknown;
        charged_total += l.charged as i128;
        spent_total += spent as i128;
        let fits = spent >= l.charged && spent - l.charged <= l.unknown_max;
        if !fits {
            push(
                &mut r,
                Mismatch {
                    customer: name(i),
                    kind: "charged",
                    charged: amount(l.charged),
                    spent: amount(spent),
                    unknown: l.unknown,
                    detail: if l.unknown == 0 {
                        "answers charged ≠ balance spent".into()
                    } else {
                        format!(
                            "spent − charged must lie in [0, {}] ({} unknown requests)",
                            amount(l.unknown_max),
                            l.unknown
                        )
                    },
                },
            );
        }
        if let Some(c) = l.min_denied_cost {
            if a.remaining >= c {
                push(
                    &mut r,
                    Mismatch {
                        customer: name(i),
                        kind: "denied_with_enough_balance",
                        charged: amount(l.charged),
                        spent: amount(spent),
                        unknown: l.unknown,
                        detail: format!(
                            "denied a request of {} but still holds {} after the run",
                            amount(c),
                            amount(a.remaining)
                        ),
                    },
                );
            }
        }
        if l.denials_with_enough > 0 {
            push(
                &mut r,
                Mismatch {
                    customer: name(i),
                    kind: "denial_reported_enough",
                    charged: amount(l.charged),
                    spent: amount(spent),
                    unknown: l.unknown,
                    detail: format!(
                        "{} denials whose answer showed enough balance",
                        l.denials_with_enough
                    ),
                },
            );
        }
    }
    r.charged = amount(charged_total.clamp(i64::MIN as i128, i64::MAX as i128) as i64);
    r.spent = amount(spent_total.clamp(i64::MIN as i128, i64::MAX as i128) as i64);
    r.ok = r.mismatches == 0;
    r
}

/// The ledger the load writes into while it runs: one slot per customer,
/// shared by every worker.
pub struct LiveLedger {
    charged: Vec<AtomicI64>,
    allowed: Vec<AtomicU64>,
    denied: Vec<AtomicU64>,
    min_denied: Vec<AtomicI64>,
    denials_with_enough: Vec<AtomicU64>,
    unknown: Vec<AtomicU64>,
    unknown_max: Vec<AtomicI64>,
}

fn atomics<T: Default>(n: usize) -> Vec<T> {
    (0..n).map(|_| T::default()).collect()
}

impl LiveLedger {
    pub fn new(customers: usize) -> LiveLedger {
        LiveLedger {
            charged: atomics(customers),
            allowed: atomics(customers),
            denied: atomics(customers),
            min_denied: (0..customers).map(|_| AtomicI64::new(i64::MAX)).collect(),
            denials_with_enough: atomics(customers),
            unknown: atomics(customers),
            unknown_max: atomics(customers),
        }
    }

    pub fn allowed(&self, c: usize, charged: i64) {
        self.allowed[c].fetch_add(1, Ordering::Relaxed);
        self.charged[c].fetch_add(charged, Ordering::Relaxed);
    }

    /// A denial of `cost`; `remaining` is the balance its answer showed.
    pub fn denied(&self, c: usize, cost: i64, remaining: Option<i64>) {
        self.denied[c].fetch_add(1, Ordering::Relaxed);
        self.min_denied[c].fetch_min(cost, Ordering::Relaxed);
        if remaining.is_some_and(|r| r >= cost) {
            self.denials_with_enough[c].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn unknown(&self, c: usize, at_most: i64) {
        self.unknown[c].fetch_add(1, Ordering::Relaxed);
        self.unknown_max[c].fetch_add(at_most, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Vec<CustomerLedger> {
        (0..self.charged.len())
            .map(|i| {
                let m = self.min_denied[i].load(Ordering::Relaxed);
                CustomerLedger {
                    charged: self.charged[i].load(Ordering::Relaxed),
                    allowed: self.allowed[i].load(Ordering::Relaxed),
                    denied: self.denied[i].load(Ordering::Relaxed),
                    min_denied_cost: (m != i64::MAX).then_some(m),
                    denials_with_enough: self.denials_with_enough[i].load(Ordering::Relaxed),
                    unknown: self.unknown[i].load(Ordering::Relaxed),
                    unknown_max: self.unknown_max[i].load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}
