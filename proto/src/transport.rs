//! HTTP/2 tuning shared by every gRPC server and channel of the pair. h2's default 64 KiB
//! flow-control window makes a bulk stream (an export, an import, an ISO upload) stop for a
//! round trip every 64 KiB; larger windows let it run at memory speed. They bound only how
//! much a peer may send ahead, not what is allocated.

use tonic::transport::{Endpoint, Server};

/// Bytes a stream may send before its receiver acknowledges them.
pub const STREAM_WINDOW: u32 = 8 << 20;
/// Bytes all streams of a connection may send before acknowledgement.
pub const CONNECTION_WINDOW: u32 = 32 << 20;

/// `endpoint` with the pair's flow-control windows.
pub fn endpoint(endpoint: Endpoint) -> Endpoint {
    endpoint
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
}

/// A server builder with the pair's flow-control windows.
pub fn server() -> Server {
    Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
}
