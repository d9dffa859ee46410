//! HTTP/2 tuning shared by every gRPC server and channel of the pair. h2's default 64 KiB
//! flow-control window makes a bulk stream (an export, an import, an ISO upload) stop for a
//! round trip every 64 KiB; larger windows let it run at memory speed. They bound only how
//! much a peer may send ahead, not what is allocated.
//!
//! And TLS from the pair's certificates ([`TlsFiles`]): the agent API admits only clients
//! with a controller's certificate. (The public API's TLS, for everyone, is `daemon::https`.)

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

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

/// The endpoint of `address` (host:port, or a URI with its scheme) with the pair's windows:
/// `https` with `tls`, else `http`.
pub fn endpoint_at(
    address: &str,
    tls: Option<&ClientTlsConfig>,
) -> Result<Endpoint, tonic::transport::Error> {
    let uri = match (address.contains("://"), tls) {
        (true, _) => address.to_string(),
        (false, Some(_)) => format!("https://{address}"),
        (false, None) => format!("http://{address}"),
    };
    let at = Endpoint::from_shared(uri)?;
    let at = match tls {
        Some(tls) => at.tls_config(tls.clone())?,
        None => at,
    };
    Ok(endpoint(at))
}

/// A server builder with the pair's flow-control windows.
pub fn server() -> Server {
    Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
}

/// The files of one side of a mutually authenticated TLS connection.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// This side's certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA certificate (PEM) the other side's certificate must chain to: for a server,
    /// the CA of the clients it admits; for a client, the CA of the servers it trusts.
    pub ca: PathBuf,
}

/// A TLS file that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading TLS file {path}")]
pub struct TlsError {
    /// The file.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

impl TlsFiles {
    /// A server's TLS: this side's identity, and only clients whose certificate chains to
    /// `ca` (a client without one is refused in the handshake).
    pub fn server(&self) -> Result<ServerTlsConfig, TlsError> {
        Ok(ServerTlsConfig::new()
            .identity(self.identity()?)
            .client_ca_root(Certificate::from_pem(read(&self.ca)?)))
    }

    /// A client's TLS that trusts servers whose certificate chains to `ca` and shows no
    /// certificate of its own (a controller forwarding to its peer's public API).
    pub fn trusting(&self) -> Result<ClientTlsConfig, TlsError> {
        trusting(&self.ca)
    }

    /// A client's TLS: servers whose certificate chains to `ca`, and this side's identity.
    pub fn client(&self) -> Result<ClientTlsConfig, TlsError> {
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)?))
            .identity(self.identity()?))
    }

    fn identity(&self) -> Result<Identity, TlsError> {
        Ok(Identity::from_pem(read(&self.cert)?, read(&self.key)?))
    }
}

/// A client's TLS that trusts servers whose certificate chains to the CA in file `ca`.
pub fn trusting(ca: &Path) -> Result<ClientTlsConfig, TlsError> {
    Ok(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?)))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError {
        path: path.to_path_buf(),
        source,
    })
}
