//! A small Prometheus text registry: decisions by route and outcome, a
//! request latency histogram by route, store errors. Hand-rolled: three
//! metric families do not need a metrics framework.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Latency bucket bounds, in seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// What a decision route answered, attached to its response as an extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision(pub &'static str);

/// Outcomes a decision route reports.
const OUTCOMES: [&str; 3] = ["allowed", "denied", "error"];

/// One route's counters: atomics, so recording never takes a lock once the
/// route has been seen.
#[derive(Default)]
struct RouteStats {
    decisions: [AtomicU64; OUTCOMES.len()],
    /// Cumulative: bucket i counts requests at or under `LATENCY_BUCKETS[i]`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

#[derive(Default)]
pub struct Metrics {
    routes: RwLock<BTreeMap<String, Arc<RouteStats>>>,
    store_errors: AtomicU64,
    sweeps: AtomicU64,
    customers_swept: AtomicU64,
    resets_applied: AtomicU64,
    /// Microseconds the last sweep took.
    last_sweep_us: AtomicU64,
    sweep_us_total: AtomicU64,
}

impl Metrics {
    /// The route's counters; a write lock only the first time a route is seen
    /// (routes are matched paths, so there are few).
    fn route(&self, route: &str) -> Arc<RouteStats> {
        if let Some(r) = self
            .routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(route)
        {
            return r.clone();
        }
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        routes.entry(route.to_string()).or_default().clone()
    }

    pub fn decision(&self, route: &str, outcome: &'static str) {
        let i = OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(OUTCOMES.len() - 1);
        self.route(route).decisions[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn latency(&self, route: &str, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let r = self.route(route);
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                r.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        r.count.fetch_add(1, Ordering::Relaxed);
        r.sum_ns.fetch_add(
            elapsed.as_nanos().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    /// Records one sweep of the periodic reset task.
    pub fn sweep(&self, report: &crate::engine::SweepReport, took: Duration) {
        let us = took.as_micros() as u64;
        self.sweeps.fetch_add(1, Ordering::Relaxed);
        self.customers_swept
            .fetch_add(report.customers_swept, Ordering::Relaxed);
        self.resets_applied
            .fetch_add(report.resets_applied, Ordering::Relaxed);
        self.last_sweep_us.store(us, Ordering::Relaxed);
        self.sweep_us_total.fetch_add(us, Ordering::Relaxed);
    }

    pub fn store_error(&self) {
        self.store_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP creditgate_decisions_total Decisions answered, by route and outcome.\n",
        );
        out.push_str("# TYPE creditgate_decisions_total counter\n");
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        for (route, r) in routes.iter() {
            for (i, outcome) in OUTCOMES.iter().enumerate() {
                let n = r.decisions[i].load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "creditgate_decisions_total{{route=\"{}\",outcome=\"{outcome}\"}} {n}",
                        escape(route)
                    );
                }
            }
        }
        out.push_str("# HELP creditgate_request_duration_seconds Request latency, by route.\n");
        out.push_str("# TYPE creditgate_request_duration_seconds histogram\n");
        for (route, h) in routes.iter() {
            let r = escape(route);
            let count = h.count.load(Ordering::Relaxed);
            for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "creditgate_request_duration_seconds_bucket{{route=\"{r}\",le=\"{bound}\"}} {}",
                    h.buckets[i].load(Ordering::Relaxed)
                );
            }
            let _ = writeln!(
                out,
                "creditgate_request_duration_seconds_bucket{{route=\"{r}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "creditgate_request_duration_seconds_sum{{route=\"{r}\"}} {}",
                h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
            );
            let _ = writeln!(
                out,
                "creditgate_request_duration_seconds_count{{route=\"{r}\"}} {count}"
            );
        }
        drop(routes);
        out.push_str(
            "# HELP creditgate_store_errors_total Requests that failed in the store (5xx).\n",
        );
        out.push_str("# TYPE creditgate_store_errors_total counter\n");
        let _ = writeln!(
            out,
            "creditgate_store_errors_total {}",
            self.store_errors.load(Ordering::Relaxed)
        );
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (name, kind, help, value) in [
            (
                "creditgate_reset_sweeps_total",
                "counter",
                "Sweeps of the periodic reset task.",
                load(&self.sweeps) as f64,
            ),
            (
                "creditgate_customers_swept_total",
                "counter",
                "Customers the reset task applied due resets to.",
                load(&self.customers_swept) as f64,
            ),
            (
                "creditgate_resets_applied_total",
                "counter",
                "Bucket resets applied by the reset task.",
                load(&self.resets_applied) as f64,
            ),
            (
                "creditgate_sweep_duration_seconds_total",
                "counter",
                "Time spent sweeping.",
                load(&self.sweep_us_total) as f64 / 1e6,
            ),
            (
                "creditgate_last_sweep_duration_seconds",
                "gauge",
                "How long the last sweep took.",
                load(&self.last_sweep_us) as f64 / 1e6,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_cumulative_buckets() {
        let m = Metrics::default();
        m.decision("/v1/check", "allowed");
        m.decision("/v1/check", "allowed");
        m.decision("/v1/check", "denied");
        m.latency("/v1/check", Duration::from_micros(300));
        m.latency("/v1/check", Duration::from_millis(30));
        m.store_error();
        let text = m.render();
        assert!(
            text.contains(
                "creditgate_decisions_total{route=\"/v1/check\",outcome=\"allowed\"} 2\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("creditgate_decisions_total{route=\"/v1/check\",outcome=\"denied\"} 1\n")
        );
        assert!(text.contains(
            "creditgate_request_duration_seconds_bucket{route=\"/v1/check\",le=\"0.0005\"} 1\n"
        ));
        assert!(text.contains(
            "creditgate_request_duration_seconds_bucket{route=\"/v1/check\",le=\"0.05\"} 2\n"
        ));
        assert!(text.contains("creditgate_request_duration_seconds_count{route=\"/v1/check\"} 2\n"));
        assert!(text.contains("creditgate_store_errors_total 1\n"));
    }
}
