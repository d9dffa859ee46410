//! TLS on the A-Links: both sides present a certificate and admit only one that chains to
//! the CA given (the pair's agents' CA, which signs nothing but the two hosts' certificates);
//! the dialing side also checks that the listener's certificate names the peer. Built from
//! PEM bytes: where they come from is the caller's business.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// An A-Link's TLS setup that could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM input holds no certificate or key, or a malformed one.
    #[error("the {what} PEM: {reason}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the setup (a key that does not match its certificate, say).
    #[error("setting up TLS")]
    Setup(#[from] tokio_rustls::rustls::Error),
    /// The peer name is not a DNS name.
    #[error("the peer name {0:?} is not a DNS name")]
    PeerName(String),
}

/// One side's TLS for its A-Links.
#[derive(Clone, Debug)]
pub enum LinkTls {
    /// The listening side: serves its certificate, requires the dialer's.
    Listen(Arc<ServerConfig>),
    /// The dialing side: presents its certificate, requires the listener's, naming the peer.
    Connect {
        /// The client setup.
        config: Arc<ClientConfig>,
        /// The name the listener's certificate must carry.
        peer: ServerName<'static>,
    },
}

impl LinkTls {
    /// The listening side's TLS: this host's certificate chain and key, and the CA the
    /// dialer's certificate must chain to.
    pub fn listen(cert: &[u8], key: &[u8], ca: &[u8]) -> Result<LinkTls, TlsError> {
        let provider = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider.clone())
                .build()
                .map_err(|e| TlsError::Pem {
                    what: "CA",
                    reason: e.to_string(),
                })?;
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain(cert)?, private_key(key)?)?;
        Ok(LinkTls::Listen(Arc::new(config)))
    }

    /// The dialing side's TLS: this host's certificate chain and key, the CA the listener's
    /// certificate must chain to, and the name it must carry (the peer host's).
    pub fn connect(cert: &[u8], key: &[u8], ca: &[u8], peer: &str) -> Result<LinkTls, TlsError> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(ca)?)
            .with_client_auth_cert(chain(cert)?, private_key(key)?)?;
        let peer = ServerName::try_from(peer.to_string())
            .map_err(|_| TlsError::PeerName(peer.to_string()))?;
        Ok(LinkTls::Connect {
            config: Arc::new(config),
            peer,
        })
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn chain(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what: "certificate",
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what: "certificate",
            reason: "no certificate in it".into(),
        });
    }
    Ok(certs)
}

fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem {
        what: "private key",
        reason: e.to_string(),
    })
}

fn roots(pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in chain(pem).map_err(|e| match e {
        TlsError::Pem { reason, .. } => TlsError::Pem { what: "CA", reason },
        other => other,
    })? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// The read half of a link's connection, TLS or not.
pub(crate) type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of a link's connection, TLS or not.
pub(crate) type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// `socket` as read and write halves: plain, or after the TLS handshake of `tls`.
pub(crate) async fn secure(
    tls: Option<&LinkTls>,
    socket: TcpStream,
) -> std::io::Result<(ReadHalf, WriteHalf)> {
    match tls {
        None => {
            let (rd, wr) = socket.into_split();
            Ok((Box::new(rd), Box::new(wr)))
        }
        Some(LinkTls::Listen(config)) => {
            let stream = TlsAcceptor::from(Arc::clone(config)).accept(socket).await?;
            let (rd, wr) = tokio::io::split(stream);
            Ok((Box::new(rd), Box::new(wr)))
        }
        Some(LinkTls::Connect { config, peer }) => {
            let stream = TlsConnector::from(Arc::clone(config))
                .connect(peer.clone(), socket)
                .await?;
            let (rd, wr) = tokio::io::split(stream);
            Ok((Box::new(rd), Box::new(wr)))
        }
    }
}
