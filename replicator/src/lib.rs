//! A-Link replicator: framed, CRC32-checked streams over two links that survive the loss of one.
//!
//! Three layers:
//! - [`frame`]: the wire codec (header with magic, version, kind, flags, stream id, sequence,
//!   length and CRC32);
//! - [`link`]: the link set — dialing and accepting TCP connections (each run by `conn.rs`:
//!   [`tls`], handshake, frames, keepalives), failure detection, reconnects — and the
//!   [`Endpoint`] that owns the session (acks, resend, dedupe);
//! - [`stream`]: named streams with backpressure, and [`proxy`] to carry local TCP or Unix
//!   socket connections (QEMU NBD, migration) over them.
//!
//! [`stats`] has the observability snapshot; [`fault`] a fault-injection relay for tests and
//! benches. The crate knows nothing of hypervisors or policy: when every link is down a
//! stream reports [`StreamError::PeerUnreachable`] and the caller decides what that means.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use replicator::{Config, Endpoint};
//!
//! let links = vec!["10.101.0.1:7000".parse()?, "10.102.0.1:7000".parse()?];
//! let endpoint = Endpoint::start(Config::connect(links)).await?;
//! let mut stream = endpoint.open("checkpoints").await?;
//! stream.send(bytes::Bytes::from_static(b"epoch 1")).await?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod conn;
pub mod fault;
pub mod frame;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod link;
pub mod proxy;
mod session;
pub mod stats;
pub mod stream;
pub mod tls;

pub use link::{Config, Endpoint, LinkError, Role, StatsHandle};
pub use session::ProtocolError;
pub use stats::{EndpointStats, LinkState, LinkStats, StreamStats};
pub use stream::{Stream, StreamError, StreamListener, StreamReceiver, StreamSender};
pub use tls::{LinkTls, TlsError};
