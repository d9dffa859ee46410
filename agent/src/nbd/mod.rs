//! The replica side of a mirrored disk: an NBD server in the agent. For an HA VM the host that
//! runs it mirrors each disk synchronously (QEMU `blockdev-mirror`, `copy-mode:
//! write-blocking`) to an export of the peer's replica volume here; a guest write completes
//! only once this server has made it durable. For an FT VM the export is in epoch mode
//! ([`epoch`]): writes are held, and reach the file only when their epoch commits.

pub mod epoch;
pub mod proto;
mod server;

pub use epoch::{EpochApplied, MAX_HELD};
pub use server::{Error, Export, Exports, MAX_IO, serve, serve_unix};
