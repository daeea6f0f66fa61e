//! Recording a request's metrics allocates nothing for its counters: the
//! handles are registered when the registry is built, and a request only
//! looks its matched path up in a fixed table. The exporter's histogram
//! keeps each sample in a block list (one block per 64 samples) until the
//! upkeep folds them into buckets; that is bounded here too.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use creditgate::metrics::Metrics;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Allocations on this thread while `f` runs.
fn allocations(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

#[test]
fn recording_decisions_and_store_errors_allocates_nothing() {
    let m = Metrics::new(creditgate::http::ROUTES);
    let n = allocations(|| {
        for i in 0..10_000 {
            let route = m.route(Some(if i % 2 == 0 { "/v1/check" } else { "/v1/gate" }));
            route.decision(["allowed", "denied", "error"][i % 3]);
            m.route(None).decision("error");
            m.store_error();
        }
    });
    assert_eq!(n, 0);
    let n = allocations(|| {
        for _ in 0..6_400 {
            m.route(Some("/v1/track"))
                .latency(Duration::from_micros(250));
        }
    });
    assert!(
        n <= 6_400 / 64 + 8,
        "{n} allocations for 6400 latency samples"
    );
    m.upkeep();
    assert!(m
        .render()
        .contains("creditgate_request_duration_seconds_count{route=\"/v1/track\"} 6400\n"));
}
