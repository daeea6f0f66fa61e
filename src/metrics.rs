//! The metrics HTTP and the reset task record: decisions by route and
//! outcome, a request latency histogram by route, store errors, the reset
//! task's sweeps. Recorded through the [`metrics`] facade's handles and
//! rendered as Prometheus text by `metrics-exporter-prometheus`.
//!
//! Each [`Metrics`] owns its own recorder (no global recorder: tests run many
//! apps in one process). Every handle is registered once, when the
//! [`Metrics`] is built — one per (route, outcome) for the routes it is
//! given, and the `unmatched` route — so recording a request looks the
//! matched path up in a fixed table and bumps atomics: no registry look-up,
//! no allocation for counters. (The exporter's histogram appends each sample
//! to a lock-free block list that [`Metrics::upkeep`] or a render folds into
//! the buckets; [`crate::server::run`] runs the upkeep every few seconds.)

use std::collections::HashMap;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Recorder, SharedString};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::Code;

/// Latency bucket bounds, in seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The route label of a request no route matched.
pub const UNMATCHED: &str = "unmatched";

/// What a decision route answered, attached to its response as an extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision(pub &'static str);

/// Outcomes a decision route reports; anything else counts as `error`.
const OUTCOMES: [&str; 3] = ["allowed", "denied", "error"];

const DECISIONS: &str = "creditgate_decisions_total";
const LATENCY: &str = "creditgate_request_duration_seconds";
const STORE_ERRORS: &str = "creditgate_store_errors_total";
const SWEEPS: &str = "creditgate_reset_sweeps_total";
const CUSTOMERS_SWEPT: &str = "creditgate_customers_swept_total";
const RESETS_APPLIED: &str = "creditgate_resets_applied_total";
const SWEEP_SECONDS: &str = "creditgate_sweep_duration_seconds_total";
const LAST_SWEEP_SECONDS: &str = "creditgate_last_sweep_duration_seconds";
const SHADOW_DENIALS: &str = "creditgate_shadow_denials_total";
const LEDGER_BACKLOG: &str = "creditgate_ledger_backlog";
const LEDGER_COMMITTED: &str = "creditgate_ledger_committed";
const LEDGER_FAILING: &str = "creditgate_ledger_drain_failing";
const STORE_ERROR_ALLOWED: &str = "creditgate_store_error_allowed_total";

/// The store failures `on_store_error = "allow"` answers allowed.
const STORE_FAILURES: [Code; 3] = [Code::StoreUnavailable, Code::StoreTimeout, Code::StoreFull];

const META: metrics::Metadata<'static> =
    metrics::Metadata::new("creditgate", Level::INFO, Some(module_path!()));

/// One route's handles.
pub struct RouteMetrics {
    latency: Histogram,
    /// By [`OUTCOMES`]; only for the API's `/v1/` routes, as before.
    decisions: Option<[Counter; OUTCOMES.len()]>,
}

impl RouteMetrics {
    pub fn latency(&self, elapsed: Duration) {
        self.latency.record(elapsed.as_secs_f64());
    }

    /// Counts a decision; an outcome other than `allowed` or `denied` counts
    /// as `error`. A route without decisions ignores it.
    pub fn decision(&self, outcome: &str) {
        if let Some(counters) = &self.decisions {
            let i = OUTCOMES
                .iter()
                .position(|o| *o == outcome)
                .unwrap_or(OUTCOMES.len() - 1);
            counters[i].increment(1);
        }
    }

    pub fn has_decisions(&self) -> bool {
        self.decisions.is_some()
    }
}

pub struct Metrics {
    /// Kept for the one family registered on demand: shadow denials by
    /// limit id (ids are the operator's, not known up front).
    recorder: metrics_exporter_prometheus::PrometheusRecorder,
    handle: PrometheusHandle,
    routes: HashMap<&'static str, RouteMetrics>,
    unmatched: RouteMetrics,
    store_errors: Counter,
    store_error_allowed: [Counter; STORE_FAILURES.len()],
    sweeps: Counter,
    customers_swept: Counter,
    resets_applied: Counter,
    /// A gauge only because the facade's counters count whole numbers.
    sweep_seconds: Gauge,
    last_sweep_seconds: Gauge,
}

impl Default for Metrics {
    /// No routes but `unmatched` (the reset task's metrics, for tests and
    /// `reset-due`).
    fn default() -> Self {
        Metrics::new(&[])
    }
}

impl Metrics {
    /// A registry with handles for `routes` (matched paths, e.g.
    /// `/v1/check`), the `unmatched` route and the reset task.
    pub fn new(routes: &[&'static str]) -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(LATENCY.to_string()), &LATENCY_BUCKETS)
            .expect("the latency buckets are not empty")
            .build_recorder();
        let describe = |name: &'static str, help: &'static str| {
            recorder.describe_counter(
                KeyName::from_const_str(name),
                None,
                SharedString::const_str(help),
            );
        };
        describe(DECISIONS, "Decisions answered, by route and outcome.");
        describe(LATENCY, "Request latency, by route.");
        describe(STORE_ERRORS, "Requests that failed in the store (5xx).");
        describe(SWEEPS, "Sweeps of the periodic reset task.");
        describe(
            CUSTOMERS_SWEPT,
            "Customers the reset task applied due resets to.",
        );
        describe(RESETS_APPLIED, "Bucket resets applied by the reset task.");
        describe(SWEEP_SECONDS, "Time spent sweeping.");
        describe(LAST_SWEEP_SECONDS, "How long the last sweep took.");
        describe(
            STORE_ERROR_ALLOWED,
            "Decisions allowed unrecorded because the store failed (on_store_error = allow), by code.",
        );
        for (name, help) in [
            (
                LEDGER_BACKLOG,
                "Ledger entries in the Redis streams not yet in the database.",
            ),
            (
                LEDGER_COMMITTED,
                "Ledger entries the drain committed to the database since start.",
            ),
            (
                LEDGER_FAILING,
                "1 while the ledger drain's rounds fail (Redis or the database), else 0.",
            ),
        ] {
            recorder.describe_gauge(
                KeyName::from_const_str(name),
                None,
                SharedString::const_str(help),
            );
        }
        describe(
            SHADOW_DENIALS,
            "Requests a shadow limit would have denied, by limit id.",
        );
        let counter =
            |name: &'static str| recorder.register_counter(&Key::from_static_name(name), &META);
        let gauge =
            |name: &'static str| recorder.register_gauge(&Key::from_static_name(name), &META);
        let route = |route: &'static str| RouteMetrics {
            latency: recorder.register_histogram(
                &Key::from_parts(LATENCY, vec![Label::new("route", route)]),
                &META,
            ),
            decisions: route.starts_with("/v1/").then(|| {
                OUTCOMES.map(|outcome| {
                    recorder.register_counter(
                        &Key::from_parts(
                            DECISIONS,
                            vec![Label::new("route", route), Label::new("outcome", outcome)],
                        ),
                        &META,
                    )
                })
            }),
        };
        Metrics {
            handle: recorder.handle(),
            routes: routes.iter().map(|r| (*r, route(r))).collect(),
            unmatched: route(UNMATCHED),
            store_errors: counter(STORE_ERRORS),
            store_error_allowed: STORE_FAILURES.map(|code| {
                recorder.register_counter(
                    &Key::from_parts(STORE_ERROR_ALLOWED, vec![Label::new("code", code.as_str())]),
                    &META,
                )
            }),
            sweeps: counter(SWEEPS),
            customers_swept: counter(CUSTOMERS_SWEPT),
            resets_applied: counter(RESETS_APPLIED),
            sweep_seconds: gauge(SWEEP_SECONDS),
            last_sweep_seconds: gauge(LAST_SWEEP_SECONDS),
            recorder,
        }
    }

    /// Sets the ledger drain's gauges (registered on the first call, so a
    /// sidecar without a ledger shows none): entries in the streams not yet
    /// in the database, entries committed, and whether it is failing.
    pub fn ledger_drain(&self, backlog: Option<u64>, committed: u64, failing: bool) {
        let gauge = |name: &'static str| {
            self.recorder
                .register_gauge(&Key::from_static_name(name), &META)
        };
        if let Some(b) = backlog {
            gauge(LEDGER_BACKLOG).set(b as f64);
        }
        gauge(LEDGER_COMMITTED).set(committed as f64);
        gauge(LEDGER_FAILING).set(if failing { 1.0 } else { 0.0 });
    }

    /// Counts one request the shadow limit `id` would have denied.
    pub fn shadow_denial(&self, id: &str) {
        let key = Key::from_parts(SHADOW_DENIALS, vec![Label::new("limit", id.to_string())]);
        self.recorder.register_counter(&key, &META).increment(1);
    }

    /// The handles of a matched path (`None`: no route matched). A path
    /// this registry was not built with counts as `unmatched`.
    pub fn route(&self, matched: Option<&str>) -> &RouteMetrics {
        matched
            .and_then(|m| self.routes.get(m))
            .unwrap_or(&self.unmatched)
    }

    /// Whether `route` has handles of its own.
    pub fn knows(&self, route: &str) -> bool {
        self.routes.contains_key(route)
    }

    /// Records one sweep of the periodic reset task.
    pub fn sweep(&self, report: &crate::engine::SweepReport, took: Duration) {
        self.sweeps.increment(1);
        self.customers_swept.increment(report.customers_swept);
        self.resets_applied.increment(report.resets_applied);
        self.last_sweep_seconds.set(took.as_secs_f64());
        self.sweep_seconds.increment(took.as_secs_f64());
    }

    pub fn store_error(&self) {
        self.store_errors.increment(1);
    }

    /// Counts one decision allowed because the store failed with `code`.
    pub fn store_error_allowed(&self, code: Code) {
        if let Some(i) = STORE_FAILURES.iter().position(|c| *c == code) {
            self.store_error_allowed[i].increment(1);
        }
    }

    /// Folds the histograms' pending samples into their buckets (a render
    /// does it too); run every few seconds so they do not pile up between
    /// scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_cumulative_buckets() {
        let m = Metrics::new(&["/v1/check", "/healthz"]);
        let check = m.route(Some("/v1/check"));
        check.decision("allowed");
        check.decision("allowed");
        check.decision("denied");
        check.latency(Duration::from_micros(300));
        check.latency(Duration::from_millis(30));
        m.route(Some("/healthz")).decision("allowed");
        m.route(None).latency(Duration::from_secs(2));
        m.route(Some("/not/registered"))
            .latency(Duration::from_secs(2));
        m.store_error();
        let text = m.render();
        for line in [
            "creditgate_decisions_total{route=\"/v1/check\",outcome=\"allowed\"} 2\n",
            "creditgate_decisions_total{route=\"/v1/check\",outcome=\"denied\"} 1\n",
            "creditgate_decisions_total{route=\"/v1/check\",outcome=\"error\"} 0\n",
            "creditgate_request_duration_seconds_bucket{route=\"/v1/check\",le=\"0.0005\"} 1\n",
            "creditgate_request_duration_seconds_bucket{route=\"/v1/check\",le=\"0.05\"} 2\n",
            "creditgate_request_duration_seconds_bucket{route=\"/v1/check\",le=\"+Inf\"} 2\n",
            "creditgate_request_duration_seconds_count{route=\"/v1/check\"} 2\n",
            "creditgate_request_duration_seconds_bucket{route=\"unmatched\",le=\"1\"} 0\n",
            "creditgate_request_duration_seconds_count{route=\"unmatched\"} 2\n",
            "creditgate_request_duration_seconds_count{route=\"/healthz\"} 0\n",
            "creditgate_store_errors_total 1\n",
            "# TYPE creditgate_request_duration_seconds histogram\n",
            "# HELP creditgate_decisions_total Decisions answered, by route and outcome.\n",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        assert!(
            !text.contains("route=\"/healthz\",outcome"),
            "no decisions outside /v1/: {text}"
        );
    }

    #[test]
    fn each_registry_is_its_own() {
        let a = Metrics::default();
        let b = Metrics::default();
        a.store_error();
        assert!(a.render().contains("creditgate_store_errors_total 1\n"));
        assert!(b.render().contains("creditgate_store_errors_total 0\n"));
    }
}
