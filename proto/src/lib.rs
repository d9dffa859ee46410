//! Pairvisor's Protocol Buffers: the public API (`pairvisor.v1`) that pvctl and the console
//! use, and the agent's internal API (`pairvisor.agent.v1`) that the controllers call.
#![deny(missing_docs)]

pub mod auth;
pub mod transport;

/// Public API, served by the pair's elected controller.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("pairvisor.v1");
}

/// The public API's definition, as the browser console parses it to speak gRPC-Web.
pub const PUBLIC_API_PROTO: &str = include_str!("../proto/pairvisor/v1/api.proto");

/// Internal API of the per-host agent.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod agent {
    tonic::include_proto!("pairvisor.agent.v1");
}
