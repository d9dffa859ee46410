//! Loopback integration tests: two endpoints in one process over 127.0.0.1.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use replicator::{Config, Endpoint};

const LINK_UP_TIMEOUT: Duration = Duration::from_secs(5);

fn any_port() -> Vec<SocketAddr> {
    vec![
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SocketAddr::from(([127, 0, 0, 1], 0)),
    ]
}

async fn pair() -> (Endpoint, Endpoint) {
    let server = Endpoint::start(Config::listen(any_port())).await.unwrap();
    let client = Endpoint::start(Config::connect(server.local_addrs().to_vec()))
        .await
        .unwrap();
    assert!(client.wait_links_up(2, LINK_UP_TIMEOUT).await);
    assert!(server.wait_links_up(2, LINK_UP_TIMEOUT).await);
    (server, client)
}

#[tokio::test]
async fn stream_small_message_arrives() {
    let (server, client) = pair().await;
    let mut listener = server.listen("svc").unwrap();
    let mut stream = client.open("svc").await.unwrap();
    stream.send(Bytes::from_static(b"hello")).await.unwrap();
    stream.finish().unwrap();
    let mut accepted = listener.accept().await.unwrap();
    assert_eq!(
        accepted.recv().await.unwrap(),
        Some(Bytes::from_static(b"hello"))
    );
    assert_eq!(accepted.recv().await.unwrap(), None);
}
