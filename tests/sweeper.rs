//! The periodic reset task: one sweep resets every due customer exactly once,
//! and the loop ticks on (paused) tokio time until shut down.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{amt, Fx};
use creditgate::calendar::ms_of;
use creditgate::metrics::Metrics;
use creditgate::sweeper;

async fn due_customers(fx: &Fx, n: usize) {
    for i in 0..n {
        let c = format!("c{i}");
        fx.customer(&c).await;
        fx.monthly(&c, "api_call", "100").await;
        fx.track(&c, "api_call", "60").await;
    }
}

#[tokio::test]
async fn one_sweep_resets_each_due_customer_once() {
    let fx = Fx::memory();
    due_customers(&fx, 50).await;
    let metrics = Metrics::default();
    let (before, _) = sweeper::sweep_once(fx.engine.as_ref(), &metrics)
        .await
        .unwrap();
    assert_eq!(before.resets_applied, 0, "nothing is due yet");
    fx.clock.set(ms_of(2027, 2, 1, 0, 0));
    let (r, _) = sweeper::sweep_once(fx.engine.as_ref(), &metrics)
        .await
        .unwrap();
    assert_eq!(r.resets_applied, 50);
    let (again, _) = sweeper::sweep_once(fx.engine.as_ref(), &metrics)
        .await
        .unwrap();
    assert_eq!(again.resets_applied, 0, "a second sweep finds nothing due");
    // A lazy operation after the sweep finds nothing left to reset either.
    assert_eq!(fx.engine.reset_due("c7").await.unwrap(), 0);
    assert_eq!(fx.remaining("c7", "api_call").await, amt("100"));
    assert!(metrics
        .render()
        .contains("creditgate_resets_applied_total 50"));
}

#[tokio::test(start_paused = true)]
async fn the_task_ticks_until_shutdown() {
    let fx = Fx::memory();
    due_customers(&fx, 3).await;
    fx.clock.set(ms_of(2027, 2, 1, 0, 0));
    let metrics = Arc::new(Metrics::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(sweeper::run(
        fx.engine.clone(),
        metrics.clone(),
        Duration::from_secs(60),
        async move {
            let _ = stopped.await;
        },
    ));
    // Ticks at 0 s, 60 s and 120 s of paused time.
    tokio::time::sleep(Duration::from_secs(150)).await;
    stop.send(()).unwrap();
    task.await.unwrap();
    let text = metrics.render();
    assert!(text.contains("creditgate_reset_sweeps_total 3"), "{text}");
    assert!(text.contains("creditgate_resets_applied_total 3"), "{text}");
}
