//! The final report: one row per measured target (rounds merged), ratios to
//! the baselines, the books, printed as a table and written as JSON.

use std::collections::BTreeMap;

use serde::Serialize;

use super::books::BooksReport;
use super::load::Measured;

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

/// CPU spent per answered request, µs, by process.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Cpu {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<f64>,
    /// The bench itself (client, progress).
    pub client: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: String,
    /// `creditgate` or `baseline`.
    pub system: &'static str,
    /// Concurrent requests (connections × pipeline).
    pub in_flight: usize,
    pub rate: Option<f64>,
    pub seconds: f64,
    pub requests: u64,
    pub throughput: f64,
    /// µs; from the intended send time under `--rate`.
    pub latency_us: Latency,
    pub allowed: u64,
    pub denied: u64,
    pub errors: BTreeMap<String, u64>,
    pub warmup_requests: u64,
    pub cpu_us_per_request: Cpu,
    /// Redis-side µs per script call (INFO commandstats), and calls per request.
    pub redis_script_us_per_call: Option<f64>,
    pub redis_script_calls_per_request: Option<f64>,
    /// The row this one is compared with, and the ratios.
    pub compared_to: Option<String>,
    pub throughput_ratio: Option<f64>,
    pub p99_ratio: Option<f64>,
}

impl Row {
    pub fn of(m: &Measured, system: &'static str, in_flight: usize, rate: Option<f64>) -> Row {
        let h = &m.hist;
        let q = |x: f64| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(x)
            }
        };
        Row {
            name: m.label.clone(),
            system,
            in_flight,
            rate,
            seconds: m.elapsed.as_secs_f64(),
            requests: m.ok,
            throughput: m.throughput(),
            latency_us: Latency {
                p50: q(0.50),
                p90: q(0.90),
                p99: q(0.99),
                p999: q(0.999),
                max: if h.is_empty() { 0 } else { h.max() },
                mean: if h.is_empty() { 0.0 } else { h.mean() },
            },
            allowed: m.allowed,
            denied: m.denied,
            errors: m.errors.clone(),
            warmup_requests: m.warmup_requests,
            cpu_us_per_request: Cpu::default(),
            redis_script_us_per_call: None,
            redis_script_calls_per_request: None,
            compared_to: None,
            throughput_ratio: None,
            p99_ratio: None,
        }
    }

    pub fn compare(&mut self, base: &Row) {
        self.compared_to = Some(base.name.clone());
        if base.throughput > 0.0 {
            self.throughput_ratio = Some(self.throughput / base.throughput);
        }
        if base.latency_us.p99 > 0 {
            self.p99_ratio = Some(self.latency_us.p99 as f64 / base.latency_us.p99 as f64);
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub os: String,
    pub kernel: String,
    pub cpu: String,
}

impl Machine {
    pub fn here() -> Machine {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_default();
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            os: std::env::consts::OS.to_string(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            cpu,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub version: &'static str,
    pub mode: String,
    pub command: String,
    pub machine: Machine,
    pub run_prefix: String,
    pub customers: usize,
    pub buckets: usize,
    pub rounds: usize,
    pub rows: Vec<Row>,
    pub books: Vec<BooksReport>,
    /// `bench sweep`'s figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sweep: Option<super::sweep::SweepFigures>,
    pub ok: bool,
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

impl Report {
    /// The human table (stdout).
    pub fn print(&self) {
        println!();
        println!(
            "creditgate bench {} · {} customers × {} one-off bucket(s) · {} round(s) · {} cores · prefix {}",
            self.mode, self.customers, self.buckets, self.rounds, self.machine.cores, self.run_prefix
        );
        let w = self
            .rows
            .iter()
            .map(|r| r.name.chars().count())
            .max()
            .unwrap_or(3)
            .max(3);
        println!(
            "{:<w$} {:>9} {:>7} {:>7} {:>7} {:>8} {:>8} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}",
            "row",
            "req/s",
            "p50µs",
            "p90µs",
            "p99µs",
            "p99.9µs",
            "maxµs",
            "errors",
            "×base",
            "p99×",
            "cpu:sc",
            "redis",
            "client",
            "r.µs/c"
        );
        for r in &self.rows {
            let l = &r.latency_us;
            println!(
                "{:<w$} {:>9.0} {:>7} {:>7} {:>7} {:>8} {:>8} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}",
                r.name,
                r.throughput,
                l.p50,
                l.p90,
                l.p99,
                l.p999,
                l.max,
                r.errors.values().sum::<u64>(),
                opt(r.throughput_ratio, 2),
                opt(r.p99_ratio, 2),
                opt(r.cpu_us_per_request.sidecar, 1),
                opt(r.cpu_us_per_request.redis, 1),
                format!("{:.1}", r.cpu_us_per_request.client),
                opt(r.redis_script_us_per_call, 2),
            );
        }
        println!(
            "  ×base, p99×: throughput and p99 ratio to the row named in `compared_to`; cpu: µs of CPU per \
             request in the sidecar process, Redis and this bench; r.µs/c: Redis µs per script call"
        );
        for r in &self.rows {
            if let Some(b) = &r.compared_to {
                println!("  {} compared to {}", r.name, b);
            }
            for (k, v) in &r.errors {
                println!("  {}: {v} × {k}", r.name);
            }
        }
        if let Some(f) = &self.sweep {
            println!(
                "sweep alone: {} of {} due customers in {:.1} s ({:.0}/s, {} per call), {} resets; \
                 during the load: {} of {} in {:.1} s; at {:.0} req/s (half of {:.0}) p99 {} µs \
                 during against {} µs without: {:.2}×; {} command(s) over {} µs{}, of them {} \
                 sweep call(s) (slowest {} µs)",
                f.customers_swept,
                f.due_customers,
                f.sweep_seconds,
                f.customers_per_second,
                f.batch,
                f.resets_applied,
                f.during_customers_swept,
                f.during_due_customers,
                f.during_sweep_seconds,
                f.offered_rate,
                f.capacity,
                f.p99_during_us,
                f.p99_without_us,
                f.p99_ratio,
                f.slow_commands,
                f.slow_bound_us,
                match &f.slowest_command {
                    Some(c) => format!(" (slowest {} µs: {c})", f.slowest_us),
                    None => String::new(),
                },
                f.slow_sweep_commands,
                f.slowest_sweep_us
            );
        }
        for b in &self.books {
            println!(
                "books [{}]: {} — {} customers, {} allowed, {} denied, charged {} = spent {}, {} unknown",
                b.system,
                if b.ok { "OK" } else { "MISMATCH" },
                b.customers,
                b.allowed,
                b.denied,
                b.charged,
                b.spent,
                b.unknown
            );
            for m in &b.examples {
                println!(
                    "  {} {}: charged {} spent {} ({})",
                    m.customer, m.kind, m.charged, m.spent, m.detail
                );
            }
            if b.mismatches > b.examples.len() {
                println!("  … {} mismatches in all", b.mismatches);
            }
        }
    }
}
