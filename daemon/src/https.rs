//! The public API's TLS listener. tonic's own TLS offers only `h2` by ALPN, so a client that
//! offers only `http/1.1` (`curl --http1.1`, a browser's WebSocket, many monitoring checks)
//! fails the handshake. This listener offers both and hands the TLS streams to tonic's
//! server, which already speaks HTTP/1.1 beside HTTP/2. Handshakes run concurrently, each
//! within a time limit, so one slow or silent client holds up no other.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause after a failed accept (out of file descriptors, say) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Handshaken connections waiting for the server to take them.
const QUEUE: usize = 64;

/// A TLS setup that could not be built.
#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    /// The certificate or key PEM is malformed or empty.
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
}

/// The server's TLS from its certificate chain and key (PEM), offering HTTP/2 and HTTP/1.1.
pub fn server_config(cert: &[u8], key: &[u8]) -> Result<Arc<ServerConfig>, HttpsError> {
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| HttpsError::Pem {
            what: "certificate",
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(HttpsError::Pem {
            what: "certificate",
            reason: "no certificate in it".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| HttpsError::Pem {
        what: "key",
        reason: e.to_string(),
    })?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS connections `listener` accepts, for `Server::serve_with_incoming`; accepting stops
/// when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(QUEUE);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an API connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "API TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "API TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::TlsConnector;
    use tokio_rustls::rustls::pki_types::ServerName;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};
    use tokio_stream::StreamExt;

    /// A listener on loopback with a self-signed certificate for `localhost`, and a client
    /// trusting it that offers `alpn`.
    async fn pair(alpn: &[&[u8]]) -> (TlsStream<TcpStream>, Option<Vec<u8>>) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let config = server_config(
            cert.cert.pem().as_bytes(),
            cert.signing_key.serialize_pem().as_bytes(),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let mut connections = incoming(listener, config);

        let mut roots = RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let mut client = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tcp = TcpStream::connect(at).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = TlsConnector::from(Arc::new(client))
            .connect(name, tcp)
            .await
            .unwrap();
        let protocol = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        tls.write_all(b"ping").await.unwrap();
        let mut served = connections.next().await.unwrap().unwrap();
        let mut got = [0u8; 4];
        served.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        (served, protocol)
    }

    #[tokio::test]
    async fn a_client_offering_only_http1_is_served_http1() {
        let (_, protocol) = pair(&[b"http/1.1"]).await;
        assert_eq!(protocol.as_deref(), Some(&b"http/1.1"[..]));
    }

    #[tokio::test]
    async fn a_client_offering_both_gets_http2() {
        let (_, protocol) = pair(&[b"h2", b"http/1.1"]).await;
        assert_eq!(protocol.as_deref(), Some(&b"h2"[..]));
    }

    #[tokio::test]
    async fn a_client_offering_no_alpn_is_served() {
        let (_, protocol) = pair(&[]).await;
        assert_eq!(protocol, None);
    }

    #[test]
    fn a_key_that_is_not_pem_is_refused_with_what_was_wrong() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let refused = server_config(cert.cert.pem().as_bytes(), b"not a key");
        assert!(
            matches!(refused, Err(HttpsError::Pem { what: "key", .. })),
            "{refused:?}"
        );
    }
}
