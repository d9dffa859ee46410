//! Pairvisor's controller: the pair's brain. Both hosts run one; they elect the serving one
//! through etcd, which holds the pair's state. The serving controller decides (validation,
//! capacity, placement, the VM state machine), persists every decision before acting on it,
//! and drives the agents; the other forwards API calls to it and takes over when it dies.
#![deny(missing_docs)]

pub mod agents;
pub mod api;
pub mod audit;
pub mod auth;
pub mod bmc;
pub mod config;
pub mod console;
pub mod engine;
pub mod error;
pub mod events;
pub mod export;
pub mod feed;
pub mod front;
pub mod ft;
pub mod ha;
pub mod health;
pub mod import;
pub mod incoming;
pub mod isos;
pub mod membership;
pub mod metrics;
pub mod model;
pub mod ova;
pub mod placement;
pub mod serve;
pub mod serving;
#[cfg(test)]
mod sim;
pub mod snapshots;
pub mod status;
pub mod store;
pub mod validate;
pub mod vm;
pub mod vnc;

pub use daemon::now_unix_ms;

/// A counter or duration as a float, for rates and metrics (they stay far below 2^53).
#[allow(
    clippy::cast_precision_loss,
    reason = "counts and durations far below 2^53"
)]
pub(crate) fn as_f64(n: u64) -> f64 {
    n as f64
}
