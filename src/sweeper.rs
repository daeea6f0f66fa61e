//! The periodic reset task: every `interval`, sweep the customers with
//! something due (resets, expired locks, expired rollovers) so idle balances
//! are on time. Correctness never depends on it: every operation applies the
//! same lazily first, and a customer reset lazily and by the task gets exactly
//! one reset, because each reset is one atomic step that only moves forward.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{Engine, SweepReport};
use crate::error::EngineError;
use crate::metrics::Metrics;

/// One sweep, timed and counted.
pub async fn sweep_once(
    engine: &dyn Engine,
    metrics: &Metrics,
) -> Result<(SweepReport, Duration), EngineError> {
    let started = Instant::now();
    let report = engine.sweep_due().await?;
    let took = started.elapsed();
    metrics.sweep(&report, took);
    tracing::debug!(
        customers = report.customers_swept,
        resets = report.resets_applied,
        leased_elsewhere = report.shards_leased_elsewhere,
        ms = took.as_millis() as u64,
        "reset sweep"
    );
    Ok((report, took))
}

/// Sweeps every `interval` until `shutdown` resolves. A failed sweep is
/// logged and retried at the next tick.
pub async fn run(
    engine: Arc<dyn Engine>,
    metrics: Arc<Metrics>,
    interval: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = ticker.tick() => {
                if let Err(e) = sweep_once(engine.as_ref(), &metrics).await {
                    tracing::warn!(error = %e, "reset sweep failed; retrying at the next tick");
                }
            }
        }
    }
}
