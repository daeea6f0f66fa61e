//! creditgate: exact, atomic credit and rate limiting.
//!
//! The tree reads as the architecture. Dependencies point from the edges to
//! the core, never back:
//!
//! ```text
//!   main.rs (CLI) ──> server (wiring) ──> http ──> service ──> engine ──> rules ──> model ──> money, calendar
//!                          │                         │            │                   │
//!                          ├──> config ──────────────┴────────────┴──> clock, error ──┘
//!                          └──> sweeper ──> metrics
//! ```
//!
//! The core (no I/O, no async):
//! - [`money`]: fixed-point amounts and costs, the rounding rule;
//! - [`calendar`]: intervals and reset boundaries (month-end clamping);
//! - [`model`]: the domain — catalog, buckets, rollovers, locks, plans,
//!   requests ([`model::Op`]) and answers, and their validation;
//! - [`limits`]: windowed caps and smooth rates beside the balances, their
//!   counters and validation;
//! - [`ledger`]: the usage ledger's entries (what changed, by whom, when);
//! - [`alerts`]: usage alerts and `limit_reached` — the shape, validation,
//!   and the crossing / re-arm decisions;
//! - [`rules`]: every rule that moves a balance, pure and in one place, and
//!   the `Retry-After` projection built on the same reset rule;
//! - [`clock`]: the injectable clock; [`error`]: typed errors and the one
//!   table of error codes.
//!
//! Between core and edges:
//! - [`engine`]: the async [`Engine`] trait and the ports the edges need
//!   besides it (readiness, the lock-id index), with both engines side by
//!   side: [`engine::memory`] (in process) and [`engine::redis`];
//! - [`service`]: what a request does beyond one engine call — plan attach,
//!   reserve with the lock-id claim, finalize's lookup, Retry-After;
//! - [`metrics`]: what HTTP and the reset task both record (`metrics`
//!   handles registered up front, rendered by the Prometheus exporter).
//!
//! The edges:
//! - [`http`]: the axum API (routes, Autumn-shaped views, the gate, errors,
//!   auth, OpenAPI) — the only module besides `server` and `main` that
//!   knows axum;
//! - [`config`]: TOML and `CREDITGATE_*` layered by figment, strict (unknown
//!   keys are errors with their path), validated before a port is bound;
//! - [`sweeper`]: the periodic reset task;
//! - [`webhooks`]: Standard Webhooks signing and the delivery worker;
//! - [`server`]: wiring a configuration to an engine and serving it.

pub mod alerts;
pub mod bench;
pub mod calendar;
pub mod clock;
pub mod config;
pub mod engine;
pub mod error;
pub mod http;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod money;
pub mod rules;
pub mod server;
pub mod service;
pub mod sweeper;
pub mod webhooks;

pub use clock::{Clock, ManualClock, SystemClock};
pub use engine::{Engine, MemoryEngine};
pub use error::EngineError;
pub use money::{Amount, Cost};
