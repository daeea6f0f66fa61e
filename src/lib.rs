//! creditgate: exact, atomic credit and rate limiting.
//!
//! The tree reads as the architecture:
//! - [`money`] and [`calendar`]: fixed-point amounts and reset boundaries;
//! - [`model`]: the domain (catalog, buckets, rollovers, locks, answers);
//! - [`rules`]: every rule that moves a balance, pure and in one place;
//! - [`engine`]: the async interface and the in-process engine.

pub mod bench;
pub mod calendar;
pub mod config;
pub mod engine;
pub mod error;
pub mod http;
pub mod model;
pub mod money;
pub mod rules;
pub mod server;
pub mod store;
pub mod sweeper;

pub use engine::{Clock, Engine, ManualClock, MemoryEngine, SystemClock};
pub use error::EngineError;
pub use money::{Amount, Cost};
