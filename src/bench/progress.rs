//! Live progress: an `indicatif` bar on a terminal, plain periodic lines on
//! stderr otherwise (CI logs), or nothing.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::load::{Live, Measured, Spec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar on a terminal, plain lines otherwise.
    Auto,
    Bar,
    Plain,
    Off,
}

#[derive(Debug, Clone)]
pub struct Progress {
    bar: bool,
    plain: bool,
    every: Duration,
}

impl Progress {
    pub fn new(mode: ProgressMode, every: Duration) -> Progress {
        let tty = std::io::stderr().is_terminal();
        let (bar, plain) = match mode {
            ProgressMode::Auto => (tty, !tty),
            ProgressMode::Bar => (true, false),
            ProgressMode::Plain => (false, true),
            ProgressMode::Off => (false, false),
        };
        Progress { bar, plain, every }
    }

    fn make_bar(&self, len: u64, prefix: &str) -> Option<ProgressBar> {
        if !self.bar {
            return None;
        }
        let b = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr_with_hz(5));
        b.set_style(
            ProgressStyle::with_template("{prefix:>28} [{bar:30.cyan/blue}] {msg}")
                .expect("progress template")
                .progress_chars("=> "),
        );
        b.set_prefix(prefix.to_string());
        Some(b)
    }

    /// A row's bar: requests, rate and errors while it runs.
    pub fn load_bar(&self, spec: &Spec, live: Arc<Live>) -> LoadBar {
        let by_time = spec.requests.is_none();
        let len = match spec.requests {
            Some(n) => n,
            None => (spec.warmup + spec.duration.unwrap_or_default()).as_millis() as u64,
        };
        let bar = self.make_bar(len, &spec.label);
        if bar.is_none() && !self.plain {
            return LoadBar { bar, tick: None };
        }
        let label = spec.label.clone();
        let warmup = spec.warmup;
        let (b2, plain, every) = (bar.clone(), self.plain, self.every);
        let tick = tokio::spawn(async move {
            let start = Instant::now();
            let (mut last_t, mut last_n) = (start, 0u64);
            let step = if plain {
                every
            } else {
                Duration::from_millis(200)
            };
            loop {
                tokio::time::sleep(step).await;
                let now = Instant::now();
                let n = live.done.load(Ordering::Relaxed);
                let errors = live.errors.load(Ordering::Relaxed);
                let rate = (n - last_n) as f64 / now.duration_since(last_t).as_secs_f64();
                (last_t, last_n) = (now, n);
                let phase = if now.duration_since(start) < warmup {
                    " (warm-up)"
                } else {
                    ""
                };
                let msg = format!("{n} req  {rate:.0}/s  {errors} errors{phase}");
                if let Some(b) = &b2 {
                    b.set_position(if by_time {
                        now.duration_since(start).as_millis() as u64
                    } else {
                        n
                    });
                    b.set_message(msg);
                } else {
                    eprintln!(
                        "[{label}] {:.1}s {msg}",
                        now.duration_since(start).as_secs_f64()
                    );
                }
            }
        });
        LoadBar {
            bar,
            tick: Some(tick),
        }
    }

    /// A counted task's bar (seeding, reading back, cleaning up).
    pub fn task(&self, what: &str, total: u64) -> TaskBar {
        let bar = self.make_bar(total, what);
        TaskBar {
            bar,
            done: AtomicU64::new(0),
            plain: self.plain,
            every: self.every,
            what: what.to_string(),
            total,
            started: Instant::now(),
            last_line: AtomicU64::new(0),
        }
    }
}

pub struct LoadBar {
    bar: Option<ProgressBar>,
    tick: Option<tokio::task::JoinHandle<()>>,
}

impl LoadBar {
    pub fn finish(self, m: &Measured) {
        let shown = self.bar.is_some() || self.tick.is_some();
        if let Some(t) = self.tick {
            t.abort();
        }
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
        if !shown {
            return;
        }
        eprintln!(
            "[{}] done: {} req in {:.1}s, {:.0}/s, {} errors",
            m.label,
            m.ok,
            m.elapsed.as_secs_f64(),
            m.throughput(),
            m.error_count()
        );
    }
}

pub struct TaskBar {
    bar: Option<ProgressBar>,
    done: AtomicU64,
    plain: bool,
    every: Duration,
    what: String,
    total: u64,
    started: Instant,
    last_line: AtomicU64,
}

impl TaskBar {
    pub fn inc(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(b) = &self.bar {
            b.set_position(done);
            b.set_message(format!("{done}/{}", self.total));
        } else if self.plain {
            let secs =
                self.started.elapsed().as_millis() as u64 / self.every.as_millis().max(1) as u64;
            if self.last_line.fetch_max(secs, Ordering::Relaxed) < secs {
                eprintln!("[{}] {done}/{}", self.what, self.total);
            }
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if self.bar.is_some() || self.plain {
            eprintln!(
                "[{}] {} in {:.1}s",
                self.what,
                self.done.load(Ordering::Relaxed),
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}
