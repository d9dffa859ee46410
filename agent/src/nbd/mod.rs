//! The replica side of a mirrored disk: an NBD server in the agent. For an HA VM the host that
//! runs it mirrors each disk synchronously (QEMU `blockdev-mirror`, `copy-mode:
//! write-blocking`) to an export of the peer's replica volume here; a guest write completes
//! only once this server has made it durable. (FT's epoch-buffered writes, held until their
//! epoch commits, are to join the same server.)

pub mod proto;
mod server;

pub use server::{Error, Export, Exports, MAX_IO, serve, serve_unix};
