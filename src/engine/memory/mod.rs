//! The in-process engine: the rules of [`crate::rules`] over a map of
//! customers. The default when no Redis is configured, and the reference the
//! Redis engine is tested against.
//!
//! It keeps the usage ledger ([`crate::ledger`]) in memory beside the
//! balances: each shard holds its customers' entries under the same lock as
//! their state, and every change appends its entry in the same critical
//! section, so a query never disagrees with the balances. Both start over on
//! a restart. Deltas are computed generically: a [`Snapshot`] of the
//! customer's balances and limit counters before and after each step.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{BalanceDelete, Engine, SweepReport};
use crate::alerts::{self, AlertBasis, AlertDef, AlertsUpdate, DenialWindows, Level};
use crate::calendar::Period;
use crate::clock::Clock;
use crate::error::{invalid, EngineError};
use crate::ledger::{
    self, Aggregate, AggregateQuery, EventsListQuery, EventsPage, IdSequence, LedgerEntry,
    LedgerOp, Notice, RangeSpec, Snapshot,
};
use crate::limits::{LimitDef, LimitsUpdate};
use crate::model::*;
use crate::money::Amount;
use crate::rules;

pub mod lock_index;

pub use lock_index::MemoryLockIndex;

const SHARDS: usize = 64;

/// Balances that live only in this process.
pub struct MemoryEngine {
    catalog: Arc<Catalog>,
    clock: Arc<dyn Clock>,
    retention: Retention,
    shards: Vec<Mutex<Shard>>,
    /// Entry ids, taken inside a shard's lock (always after it).
    ids: Mutex<IdSequence>,
    /// Where notifications go as they are appended (webhook delivery);
    /// `None`: nobody listens.
    notices: Option<mpsc::UnboundedSender<Notice>>,
}

/// One shard: its customers and their ledgers (a deleted customer's ledger
/// stays).
#[derive(Default)]
struct Shard {
    customers: HashMap<String, CustomerState>,
    ledgers: HashMap<String, Vec<LedgerEntry>>,
    /// Per customer, each limit's last window with a denial (for
    /// `limit_reached` on a limit's first denial in a window).
    denials: HashMap<String, DenialWindows>,
}

/// What one entry says besides its deltas.
struct EntryMeta<'a> {
    op: LedgerOp,
    feature_id: Option<String>,
    units: Amount,
    idempotency_key: Option<&'a str>,
    lock_id: Option<String>,
    /// Append even without a delta (a finalize: the usage moment).
    always: bool,
    /// An alert's id (an `alert` entry).
    subject: Option<String>,
}

impl<'a> EntryMeta<'a> {
    fn new(op: LedgerOp) -> EntryMeta<'a> {
        EntryMeta {
            op,
            feature_id: None,
            units: Amount::ZERO,
            idempotency_key: None,
            lock_id: None,
            always: false,
            subject: None,
        }
    }
}

/// Appends entries to one customer's ledger.
struct Books<'l> {
    ids: &'l Mutex<IdSequence>,
    customer_id: &'l str,
    ledger: &'l mut Vec<LedgerEntry>,
    now: i64,
    notices: Option<&'l mpsc::UnboundedSender<Notice>>,
    /// The customer's limits' last denied windows (`None`: it has no limits).
    denials: Option<&'l mut DenialWindows>,
}

impl Books<'_> {
    /// Appends one entry for the change from `before` to `after`, unless
    /// nothing moved (and the entry is not `always`).
    fn append(
        &mut self,
        meta: EntryMeta<'_>,
        before: &Snapshot,
        after: &Snapshot,
        first: &[&str],
    ) -> Option<String> {
        let (balances, limits) = before.diff(after, first);
        if balances.is_empty() && limits.is_empty() && !meta.always {
            return None;
        }
        let id = self
            .ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next(self.now);
        self.ledger.push(LedgerEntry {
            id: id.clone(),
            at: self.now,
            customer_id: self.customer_id.to_string(),
            feature_id: meta.feature_id,
            op: meta.op,
            units: meta.units,
            balances,
            limits,
            idempotency_key: meta.idempotency_key.map(str::to_string),
            lock_id: meta.lock_id,
            subject: meta.subject,
        });
        Some(id)
    }

    /// Hands a notification entry to whoever listens.
    fn notify(&self, entry_id: Option<String>, kind: &'static str, data: impl serde::Serialize) {
        if let (Some(tx), Some(entry_id)) = (self.notices, entry_id) {
            let data = serde_json::to_value(data).unwrap_or_default();
            let _ = tx.send(Notice {
                entry_id,
                at: self.now,
                kind,
                data,
            });
        }
    }

    /// Appends a `limit_reached` entry (no balance moves) and notifies it.
    fn limit_reached(&mut self, state: &CustomerState, data: alerts::LimitReached) {
        let snap = Snapshot::of(state);
        let meta = EntryMeta {
            feature_id: Some(data.feature_id.clone()),
            subject: data.limit_id.clone(),
            always: true,
            ..EntryMeta::new(LedgerOp::LimitReached)
        };
        let id = self.append(meta, &snap, &snap, &[]);
        self.notify(id, alerts::LIMIT_REACHED, data);
    }

    /// `limit_reached` for each pool among `paid` (the pools the usage
    /// drew on) that it took from above zero to zero or below
    /// ([`alerts::pool_reached_zero`]); `before`: the buckets before it.
    fn pools_reached_zero(&mut self, state: &CustomerState, before: &[Bucket], paid: &[Entry]) {
        let mut pools: Vec<&str> = paid.iter().map(|e| e.pool.as_str()).collect();
        pools.sort_unstable();
        pools.dedup();
        for pool in pools {
            let (b, a) = (
                rules::pool_balance(before, pool),
                rules::pool_balance(&state.buckets, pool),
            );
            if b.unlimited || a.unlimited || !alerts::pool_reached_zero(b.remaining, a.remaining) {
                continue;
            }
            let data = alerts::LimitReached {
                customer_id: self.customer_id.to_string(),
                feature_id: pool.to_string(),
                limit_type: alerts::LimitType::Included,
                limit_id: None,
                window_start: None,
            };
            self.limit_reached(state, data);
        }
    }

    /// `limit_reached` when `out` was denied by a limit for the first time
    /// in that limit's window ([`alerts::DenialWindows`]). A window's start
    /// is its end less its length; a rate's, the instant floored to its
    /// period.
    fn limit_denied(&mut self, state: &CustomerState, out: &Outcome) {
        let (Some(denial), Some(denials)) = (&out.limit, self.denials.as_deref_mut()) else {
            return;
        };
        let Some(status) = out.limits.iter().find(|l| l.id == denial.id) else {
            return;
        };
        let period = status.window_ms.max(1);
        let floored = self.now - self.now.rem_euclid(period);
        let is_rate = state
            .limits
            .iter()
            .find(|l| l.def.id == denial.id)
            .is_some_and(|l| matches!(l.def.kind, crate::limits::LimitKind::Rate { .. }));
        let window_start = match status.resets_at {
            Some(end) if !is_rate => end - status.window_ms,
            _ => floored,
        };
        if !denials.record(&denial.id, window_start) {
            return;
        }
        let data = alerts::LimitReached {
            customer_id: self.customer_id.to_string(),
            feature_id: status.feature_id.clone(),
            limit_type: alerts::LimitType::UsageLimit,
            limit_id: Some(denial.id.clone()),
            window_start: Some(window_start),
        };
        self.limit_reached(state, data);
    }

    /// Runs the customer's alerts over the change of its buckets from
    /// `before` to the state's: each crossing appends an `alert` entry
    /// (subject: the alert's id); armed states are kept in the state.
    fn fire_alerts(&mut self, state: &mut CustomerState, before: &[Bucket]) {
        if state.alerts.is_empty() {
            return;
        }
        let mut features: Vec<String> = state
            .alerts
            .iter()
            .map(|a| a.def.feature_id.clone())
            .collect();
        features.sort();
        features.dedup();
        let mut alerts = std::mem::take(&mut state.alerts);
        let mut fired = vec![];
        for f in &features {
            if alerts.iter().filter(|a| &a.def.feature_id == f).count() == 0 {
                continue;
            }
            for i in alerts::decide_all(&mut alerts, f, |d| {
                Some((
                    level_of(before, &d.feature_id, d.basis)?,
                    level_of(&state.buckets, &d.feature_id, d.basis)?,
                ))
            }) {
                if !fired.contains(&i) {
                    fired.push(i);
                }
            }
        }
        state.alerts = alerts;
        let snap = Snapshot::of(state);
        for i in fired {
            let def = &state.alerts[i].def;
            let meta = EntryMeta {
                feature_id: Some(def.feature_id.clone()),
                subject: Some(def.id.clone()),
                always: true,
                ..EntryMeta::new(LedgerOp::Alert)
            };
            let id = self.append(meta, &snap, &snap, &[]);
            if let Some(after) = level_of(&state.buckets, &def.feature_id, def.basis) {
                let data = alerts::UsageAlertTriggered::new(self.customer_id, def, &after);
                self.notify(id, alerts::USAGE_ALERT_TRIGGERED, data);
            }
        }
    }

    /// Runs `f` on `state` and appends its entry (when `f` succeeds).
    fn record<T>(
        &mut self,
        state: &mut CustomerState,
        meta: EntryMeta<'_>,
        f: impl FnOnce(&mut CustomerState) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let before = Snapshot::of(state);
        let out = f(state)?;
        self.append(meta, &before, &Snapshot::of(state), &[]);
        Ok(out)
    }

    /// [`rules::prepare`] step by step, one entry per step that moved
    /// something: each expired lock (`lock_expired`), expiries (`expire`),
    /// resets with their rollover (`reset`). Returns how many buckets reset.
    fn prepare(&mut self, state: &mut CustomerState, retention: Retention) -> u32 {
        let now = self.now;
        for (at, id) in rules::expired_locks(state, now) {
            let feature = state.locks.get(&id).map(|l| l.feature.clone());
            let before = Snapshot::of(state);
            rules::release_expired_lock(state, &id, at, now, retention);
            let meta = EntryMeta {
                feature_id: feature,
                lock_id: Some(id),
                ..EntryMeta::new(LedgerOp::LockExpired)
            };
            self.append(meta, &before, &Snapshot::of(state), &[]);
        }
        let before = Snapshot::of(state);
        rules::expire(state, now);
        self.append(
            EntryMeta::new(LedgerOp::Expire),
            &before,
            &Snapshot::of(state),
            &[],
        );
        let before = Snapshot::of(state);
        let resets = rules::apply_resets(state, now);
        self.append(
            EntryMeta::new(LedgerOp::Reset),
            &before,
            &Snapshot::of(state),
            &[],
        );
        rules::forget_finalized_locks(state, now);
        resets
    }
}

impl MemoryEngine {
    pub fn new(catalog: Arc<Catalog>, clock: Arc<dyn Clock>, retention: Retention) -> MemoryEngine {
        MemoryEngine {
            catalog,
            clock,
            retention,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            ids: Mutex::default(),
            notices: None,
        }
    }

    /// Hands every notification entry (`alert`, `limit_reached`) to the
    /// receiver as it is appended (the webhook delivery's feed).
    pub fn with_notices(mut self) -> (MemoryEngine, mpsc::UnboundedReceiver<Notice>) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.notices = Some(tx);
        (self, rx)
    }

    /// Every ledger entry of the customer, oldest first (tests and audits).
    pub fn ledger_of(&self, customer_id: &str) -> Vec<LedgerEntry> {
        self.shard(customer_id)
            .ledgers
            .get(customer_id)
            .cloned()
            .unwrap_or_default()
    }

    /// The customer's state as stored (tests: replaying its ledger).
    pub fn state_of(&self, customer_id: &str) -> Option<CustomerState> {
        self.shard(customer_id).customers.get(customer_id).cloned()
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    fn shard(&self, customer_id: &str) -> MutexGuard<'_, Shard> {
        let mut h = DefaultHasher::new();
        customer_id.hash(&mut h);
        let shard = &self.shards[h.finish() as usize % SHARDS];
        // A panic while holding the lock cannot leave a half-applied state:
        // every rule works on a copy and commits by assignment.
        shard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the prepared state of an existing customer, with its
    /// ledger (the lazy steps already recorded).
    fn with_customer<T>(
        &self,
        customer_id: &str,
        f: impl FnOnce(&mut CustomerState, &mut Books<'_>) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        validate_id("customer_id", customer_id)?;
        let mut guard = self.shard(customer_id);
        // Read under the lock: one customer's changes are then in the
        // clock's order, so its windows and ids only move forward.
        let now = self.clock.now_ms();
        let shard = &mut *guard;
        let state = shard
            .customers
            .get_mut(customer_id)
            .ok_or(EngineError::CustomerNotFound)?;
        let ledger = shard.ledgers.entry(customer_id.to_string()).or_default();
        let denials = match state.limits.is_empty() {
            true => None,
            false => Some(shard.denials.entry(customer_id.to_string()).or_default()),
        };
        let mut books = Books {
            ids: &self.ids,
            customer_id,
            ledger,
            now,
            notices: self.notices.as_ref(),
            denials,
        };
        let watch = !state.alerts.is_empty();
        let before = if watch { state.buckets.clone() } else { vec![] };
        books.prepare(state, self.retention);
        if watch {
            books.fire_alerts(state, &before);
        }
        let before = if watch { state.buckets.clone() } else { vec![] };
        // No copy needed: every rule works on its own copy of the buckets and
        // commits by assignment only once it can no longer fail.
        let out = f(state, &mut books)?;
        if watch {
            books.fire_alerts(state, &before);
        }
        Ok(out)
    }

    /// Runs `f` on one customer's ledger (after its lazy steps, recorded)
    /// and its state, or on a deleted customer's ledger alone.
    fn with_ledger<T>(
        &self,
        customer_id: &str,
        f: impl FnOnce(&[LedgerEntry], Option<&CustomerState>) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        validate_id("customer_id", customer_id)?;
        let mut guard = self.shard(customer_id);
        // Read under the lock: one customer's changes are then in the
        // clock's order, so its windows and ids only move forward.
        let now = self.clock.now_ms();
        let shard = &mut *guard;
        match shard.customers.get_mut(customer_id) {
            Some(state) => {
                let ledger = shard.ledgers.entry(customer_id.to_string()).or_default();
                let mut books = Books {
                    ids: &self.ids,
                    customer_id,
                    ledger,
                    now,
                    notices: self.notices.as_ref(),
                    denials: None,
                };
                books.prepare(state, self.retention);
                f(books.ledger, Some(state))
            }
            None => match shard.ledgers.get(customer_id) {
                Some(ledger) => f(ledger, None),
                None => Err(EngineError::CustomerNotFound),
            },
        }
    }

    /// Every customer's entries (one shard lock at a time).
    fn all_entries(&self) -> Vec<LedgerEntry> {
        self.shards
            .iter()
            .flat_map(|s| {
                let s = s.lock().unwrap_or_else(|e| e.into_inner());
                s.ledgers.values().flatten().cloned().collect::<Vec<_>>()
            })
            .collect()
    }

    fn pools_of(&self, state: &CustomerState, feature: Option<&str>) -> Vec<PoolBalance> {
        let Some(Ok(pools)) = feature.map(|f| self.catalog.pools_for(f)) else {
            return vec![];
        };
        pools
            .iter()
            .map(|p| rules::pool_balance(&state.buckets, &p.pool))
            .collect()
    }
}

#[async_trait]
impl Engine for MemoryEngine {
    async fn create_customer(&self, customer_id: &str) -> Result<bool, EngineError> {
        validate_id("customer_id", customer_id)?;
        let mut shard = self.shard(customer_id);
        let now = self.clock.now_ms();
        if shard.customers.contains_key(customer_id) {
            return Ok(false);
        }
        let state = CustomerState {
            id: customer_id.to_string(),
            created_at: now,
            next_seq: 1,
            buckets: vec![],
            locks: BTreeMap::new(),
            idempotency: BTreeMap::new(),
            limits: vec![],
            alerts: vec![],
        };
        shard.customers.insert(customer_id.to_string(), state);
        Ok(true)
    }

    async fn grant(&self, customer_id: &str, grant: &Grant) -> Result<String, EngineError> {
        self.with_customer(customer_id, |s, books| {
            let now = books.now;
            books.record(s, EntryMeta::new(LedgerOp::Grant), |s| {
                rules::grant(s, &self.catalog, grant, now)
            })
        })
    }

    async fn update_bucket(
        &self,
        customer_id: &str,
        update: &BucketUpdate,
    ) -> Result<(), EngineError> {
        self.with_customer(customer_id, |s, books| {
            books.record(s, EntryMeta::new(LedgerOp::Update), |s| {
                rules::update_bucket(s, &self.catalog, update)
            })
        })
    }

    async fn check(
        &self,
        customer_id: &str,
        feature: &str,
        units: Amount,
    ) -> Result<Outcome, EngineError> {
        self.with_customer(customer_id, |s, books| {
            let now = books.now;
            let stored = rules::check(s, &self.catalog, feature, units, now)?;
            let mut out = Outcome::new(stored, false, self.pools_of(s, Some(feature)), now);
            out.limits = rules::limit_statuses(s, &self.catalog, feature, now);
            Ok(out)
        })
    }

    async fn apply(
        &self,
        customer_id: &str,
        op: &Op,
        key: Option<&str>,
    ) -> Result<Outcome, EngineError> {
        self.with_customer(customer_id, |s, books| {
            let now = books.now;
            let held = match op {
                Op::Finalize { lock_id, .. } => s.locks.get(lock_id).map_or(0, |l| l.units.raw()),
                _ => 0,
            };
            let before = Snapshot::of(s);
            let buckets_before = s.buckets.clone();
            let applied = rules::apply(s, &self.catalog, op, key, now, self.retention)?;
            if !applied.replayed {
                let entries = &applied.outcome.entries;
                let taken: i64 = entries.iter().map(|e| e.units.raw()).sum();
                let (ledger_op, units, lock_id, always) = match op {
                    Op::Consume { .. } => (LedgerOp::Consume, taken, None, false),
                    Op::Track { units, .. } if units.is_negative() => {
                        (LedgerOp::Refund, taken, None, false)
                    }
                    Op::Track { .. } => (LedgerOp::Track, taken, None, false),
                    Op::Reserve { lock_id, units, .. } => {
                        let held = if applied.outcome.allowed {
                            units.raw()
                        } else {
                            0
                        };
                        (LedgerOp::Reserve, held, Some(lock_id.clone()), false)
                    }
                    // The usage moment: the held units less what went back
                    // (a release gives back all it can), plus what an
                    // override took beyond them.
                    Op::Finalize { lock_id, .. } => (
                        LedgerOp::Finalize,
                        held + taken,
                        Some(lock_id.clone()),
                        true,
                    ),
                };
                let meta = EntryMeta {
                    op: ledger_op,
                    feature_id: op.feature(s).map(str::to_string),
                    units: Amount::from_raw(units).unwrap_or(Amount::ZERO),
                    idempotency_key: key,
                    lock_id,
                    always,
                    subject: None,
                };
                let first: Vec<&str> = entries.iter().map(|e| e.balance_id.as_str()).collect();
                books.append(meta, &before, &Snapshot::of(s), &first);
            }
            let pools = self.pools_of(s, op.feature(s));
            let mut out = Outcome::new(applied.outcome, applied.replayed, pools, now);
            if let Some(f) = op.feature(s) {
                out.limits = rules::limit_statuses(s, &self.catalog, f, now);
            }
            if !out.replayed {
                // Usage emptying a pool, or a limit's first denial in its
                // window (a delete or an expiry reaching zero is no limit).
                books.pools_reached_zero(s, &buckets_before, &out.entries);
                books.limit_denied(s, &out);
            }
            Ok(out)
        })
    }

    async fn balances(&self, customer_id: &str) -> Result<CustomerBalances, EngineError> {
        self.with_customer(customer_id, |s, _| {
            let pools = self
                .catalog
                .features()
                .iter()
                .filter(|f| s.buckets.iter().any(|b| b.pool == f.id))
                .map(|f| rules::pool_balance(&s.buckets, &f.id))
                .collect();
            Ok(CustomerBalances {
                customer_id: s.id.clone(),
                created_at: s.created_at,
                pools,
                limits: s.limits.iter().map(|l| l.def.clone()).collect(),
            })
        })
    }

    fn supports_limits(&self) -> bool {
        true
    }

    async fn set_limits(
        &self,
        customer_id: &str,
        update: &LimitsUpdate,
    ) -> Result<Vec<LimitDef>, EngineError> {
        // A limit dropped (or redefined) takes its counter off the books.
        self.with_customer(customer_id, |s, books| {
            books.record(s, EntryMeta::new(LedgerOp::Update), |s| {
                rules::set_limits(s, update)
            })?;
            Ok(s.limits.iter().map(|l| l.def.clone()).collect())
        })
    }

    fn supports_alerts(&self) -> bool {
        true
    }

    async fn set_alerts(
        &self,
        customer_id: &str,
        update: &AlertsUpdate,
    ) -> Result<Vec<AlertDef>, EngineError> {
        self.with_customer(customer_id, |s, _| {
            s.alerts = alerts::update_alerts(&s.alerts, update)?;
            Ok(s.alerts.iter().map(|a| a.def.clone()).collect())
        })
    }

    async fn alerts(&self, customer_id: &str) -> Result<Vec<AlertDef>, EngineError> {
        self.with_customer(customer_id, |s, _| {
            Ok(s.alerts.iter().map(|a| a.def.clone()).collect())
        })
    }

    async fn reset_due(&self, customer_id: &str) -> Result<u32, EngineError> {
        validate_id("customer_id", customer_id)?;
        let mut guard = self.shard(customer_id);
        // Read under the lock: one customer's changes are then in the
        // clock's order, so its windows and ids only move forward.
        let now = self.clock.now_ms();
        let shard = &mut *guard;
        let state = shard
            .customers
            .get_mut(customer_id)
            .ok_or(EngineError::CustomerNotFound)?;
        let mut books = Books {
            ids: &self.ids,
            customer_id,
            ledger: shard.ledgers.entry(customer_id.to_string()).or_default(),
            now,
            notices: self.notices.as_ref(),
            denials: None,
        };
        let resets = books.prepare(state, self.retention);
        rules::forget_expired_records(state, now);
        Ok(resets)
    }

    /// Visits every customer, one shard lock at a time, so no batch holds up
    /// requests to other shards for long.
    async fn sweep_due(&self) -> Result<SweepReport, EngineError> {
        let mut report = SweepReport::default();
        for shard in &self.shards {
            {
                let mut guard = shard.lock().unwrap_or_else(|e| e.into_inner());
                let now = self.clock.now_ms();
                let Shard {
                    customers, ledgers, ..
                } = &mut *guard;
                for (id, state) in customers.iter_mut() {
                    let mut books = Books {
                        ids: &self.ids,
                        customer_id: id,
                        ledger: ledgers.entry(id.clone()).or_default(),
                        now,
                        notices: self.notices.as_ref(),
                        denials: None,
                    };
                    let resets = books.prepare(state, self.retention);
                    rules::forget_expired_records(state, now);
                    report.customers_swept += 1;
                    report.resets_applied += resets as u64;
                }
            }
            tokio::task::yield_now().await;
        }
        Ok(report)
    }

    fn has_ledger(&self) -> bool {
        true
    }

    async fn events_list(&self, q: &EventsListQuery) -> Result<EventsPage, EngineError> {
        match &q.customer_id {
            Some(c) => self.with_ledger(c, |entries, _| ledger::list_events(entries, q)),
            None => ledger::list_events(&self.all_entries(), q),
        }
    }

    async fn events_aggregate(&self, q: &AggregateQuery) -> Result<Aggregate, EngineError> {
        let now = self.clock.now_ms();
        let first = q.feature_ids.first().map(String::as_str);
        match &q.customer_id {
            Some(c) => self.with_ledger(c, |entries, state| {
                let cycle = match q.range {
                    RangeSpec::LastCycle => {
                        state.and_then(|s| rules::billing_cycle(&self.catalog, &s.buckets, first))
                    }
                    _ => None,
                };
                ledger::aggregate(entries, q, q.range.resolve(now, cycle))
            }),
            None => ledger::aggregate(&self.all_entries(), q, q.range.resolve(now, None)),
        }
    }

    async fn delete_customer(&self, customer_id: &str) -> Result<(), EngineError> {
        self.with_customer(customer_id, |s, books| {
            let before = Snapshot::of(s);
            books.append(
                EntryMeta {
                    always: true,
                    ..EntryMeta::new(LedgerOp::DeleteCustomer)
                },
                &before,
                &Snapshot::default(),
                &[],
            );
            Ok(())
        })?;
        let mut shard = self.shard(customer_id);
        shard.customers.remove(customer_id);
        shard.denials.remove(customer_id);
        Ok(())
    }

    async fn delete_balance(
        &self,
        customer_id: &str,
        d: &BalanceDelete,
    ) -> Result<String, EngineError> {
        self.with_customer(customer_id, |s, books| {
            let i = find_balance(s, &self.catalog, d)?;
            let b = &s.buckets[i];
            let used =
                b.granted != b.remaining || b.rollovers.iter().any(|r| r.granted != r.balance);
            if used && !d.force {
                return Err(EngineError::BalanceInUse(b.id.clone()));
            }
            let id = b.id.clone();
            books.record(
                s,
                EntryMeta {
                    always: true,
                    ..EntryMeta::new(LedgerOp::DeleteBalance)
                },
                |s| {
                    s.buckets.remove(i);
                    Ok(())
                },
            )?;
            Ok(id)
        })
    }
}

/// An alert's level on `pool` over `buckets` for its basis; `None` when
/// the basis does not apply (an unlimited pool, no bucket of the basis, or
/// `usage_limit`, which this engine does not measure yet).
fn level_of(buckets: &[Bucket], pool: &str, basis: AlertBasis) -> Option<Level> {
    let p = rules::pool_balance(buckets, pool);
    if p.unlimited || p.buckets.is_empty() {
        return None;
    }
    let pick: Vec<&BucketView> = match basis {
        AlertBasis::Balance => {
            return Some(Level {
                usage: p.usage,
                remaining: p.remaining,
                granted: p.granted,
            })
        }
        AlertBasis::Included => p.buckets.iter().filter(|b| b.plan_id.is_some()).collect(),
        AlertBasis::Recurring => p
            .buckets
            .iter()
            .filter(|b| Period::new(b.interval, b.interval_count).is_some())
            .collect(),
        AlertBasis::UsageLimit => return None,
    };
    if pick.is_empty() {
        return None;
    }
    let sum = |f: fn(&BucketView) -> Amount| {
        Amount::from_raw_i128(pick.iter().map(|b| f(b).raw() as i128).sum())
    };
    Some(Level {
        usage: sum(|b| b.usage)?,
        remaining: sum(|b| b.remaining)?,
        granted: sum(|b| b.granted)?,
    })
}

/// The bucket `balances.delete` names: `balance_id` (of `feature_id`, when
/// given), else the one bucket of `feature_id` (of `interval`, when given).
fn find_balance(
    s: &CustomerState,
    catalog: &Catalog,
    d: &BalanceDelete,
) -> Result<usize, EngineError> {
    d.validate(catalog)?;
    let hits: Vec<usize> = (0..s.buckets.len())
        .filter(|&i| {
            let b = &s.buckets[i];
            d.balance_id.as_ref().is_none_or(|id| &b.id == id)
                && d.feature_id.as_ref().is_none_or(|f| &b.pool == f)
                && d.interval.is_none_or(|iv| b.interval == iv)
        })
        .collect();
    match hits.as_slice() {
        [] => Err(EngineError::BalanceNotFound),
        [i] => Ok(*i),
        _ => Err(invalid(
            "balance_id",
            "several balances of this feature match; name the one to delete by balance_id",
        )),
    }
}
