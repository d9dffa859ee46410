//! A-Link TLS over loopback: two hosts with certificates of one CA connect and carry data;
//! a dialer whose certificate another CA signed, one without TLS, and a listener whose
//! certificate names another host are refused.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use replicator::{Config, Endpoint, LinkState, LinkTls};

/// Time for links to come up on a loaded machine.
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused dialer keeps trying in these tests: many handshakes.
const REFUSED_FOR: Duration = Duration::from_secs(2);

/// A CA and the PEM of its certificate.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A host's certificate and key, PEM.
struct Host {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.as_ref().pem()
    }

    /// A host certificate for `name`, good for server and client use.
    fn host(&self, name: &str) -> Host {
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Host {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// `config` with a link timeout for a loaded test machine: these tests are about TLS, not
/// failure detection, and a starved test runtime (3 MiB through debug-built rustls on one
/// thread) must not read as a dead peer (it did under two busy cores at the default 400 ms).
fn patient(config: Config) -> Config {
    Config {
        link_timeout: Duration::from_secs(5),
        ..config
    }
}

fn loopback(links: usize) -> Vec<SocketAddr> {
    vec![SocketAddr::from(([127, 0, 0, 1], 0)); links]
}

async fn listener(ca: &Ca, host: &Host) -> Endpoint {
    let tls = LinkTls::listen(
        host.cert.as_bytes(),
        host.key.as_bytes(),
        ca.pem().as_bytes(),
    )
    .unwrap();
    Endpoint::start(patient(Config::listen(loopback(2)).with_tls(tls)))
        .await
        .unwrap()
}

async fn dialer(server: &Endpoint, ca: &Ca, host: &Host, peer: &str) -> Endpoint {
    let tls = LinkTls::connect(
        host.cert.as_bytes(),
        host.key.as_bytes(),
        ca.pem().as_bytes(),
        peer,
    )
    .unwrap();
    Endpoint::start(patient(
        Config::connect(server.local_addrs().to_vec()).with_tls(tls),
    ))
    .await
    .unwrap()
}

/// Whether any link of `endpoint` comes up within [`REFUSED_FOR`].
async fn any_link_up(endpoint: &Endpoint) -> bool {
    let deadline = tokio::time::Instant::now() + REFUSED_FOR;
    while tokio::time::Instant::now() < deadline {
        if endpoint
            .stats()
            .links
            .iter()
            .any(|l| l.state == LinkState::Up)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn hosts_of_one_ca_carry_a_stream_over_tls() {
    let ca = Ca::new("agents");
    let server = listener(&ca, &ca.host("n0")).await;
    let client = dialer(&server, &ca, &ca.host("n1"), "n0").await;
    assert!(client.wait_links_up(2, LINK_UP_TIMEOUT).await);
    let mut incoming = server.listen("svc").unwrap();
    let mut stream = client.open("svc").await.unwrap();
    let payload: Bytes = (0..3 * 1024 * 1024u32)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect::<Vec<u8>>()
        .into();

    stream.send(payload.clone()).await.unwrap();
    stream.finish().unwrap();
    let mut accepted = incoming.accept().await.unwrap();
    let mut received = Vec::new();
    while let Some(chunk) = accepted.recv().await.unwrap() {
        received.extend_from_slice(&chunk);
    }

    assert_eq!(received.len(), payload.len());
    assert!(received == payload[..], "the payload changed on the way");
}

#[tokio::test]
async fn dialer_of_another_ca_is_refused() {
    let ca = Ca::new("agents");
    let other = Ca::new("intruders");
    let server = listener(&ca, &ca.host("n0")).await;
    // It trusts the listener, but its own certificate is not the pair's.
    let intruder = other.host("n1");
    let tls = LinkTls::connect(
        intruder.cert.as_bytes(),
        intruder.key.as_bytes(),
        ca.pem().as_bytes(),
        "n0",
    )
    .unwrap();
    let client = Endpoint::start(Config::connect(server.local_addrs().to_vec()).with_tls(tls))
        .await
        .unwrap();

    assert!(
        !any_link_up(&client).await,
        "a link came up with a foreign certificate"
    );
    assert!(!any_link_up(&server).await);
}

#[tokio::test]
async fn dialer_without_tls_is_refused() {
    let ca = Ca::new("agents");
    let server = listener(&ca, &ca.host("n0")).await;
    let client = Endpoint::start(Config::connect(server.local_addrs().to_vec()))
        .await
        .unwrap();

    assert!(!any_link_up(&client).await, "a plain dialer got a link");
    assert!(!any_link_up(&server).await);
}

#[tokio::test]
async fn listener_naming_another_host_is_refused() {
    let ca = Ca::new("agents");
    // The pair's CA signed it, but for another host than the peer the dialer expects.
    let server = listener(&ca, &ca.host("n7")).await;
    let client = dialer(&server, &ca, &ca.host("n1"), "n0").await;

    assert!(
        !any_link_up(&client).await,
        "a link came up to the wrong host"
    );
}

#[test]
fn malformed_pem_is_named() {
    let ca = Ca::new("agents");
    let host = ca.host("n0");

    let no_key = LinkTls::listen(host.cert.as_bytes(), b"", ca.pem().as_bytes());
    let no_ca = LinkTls::connect(host.cert.as_bytes(), host.key.as_bytes(), b"junk", "n1");

    let Err(no_key) = no_key else {
        panic!("built without a key")
    };
    let Err(no_ca) = no_ca else {
        panic!("built without a CA")
    };
    assert!(no_key.to_string().contains("private key"), "{no_key}");
    assert!(no_ca.to_string().contains("CA"), "{no_ca}");
}
