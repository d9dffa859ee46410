//! Loopback integration tests: two endpoints in one process over 127.0.0.1, with fault
//! relays standing in for pulled cables.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use replicator::fault::Relay;
use replicator::proxy::{Egress, Ingress, LocalAddr, Target};
use replicator::{Config, Endpoint, LinkState, StreamError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Time for links to come up on a loaded machine.
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound for operations that must not hang.
const NO_HANG: Duration = Duration::from_secs(20);
/// Link timeout used here (the library default).
const LINK_TIMEOUT: Duration = Duration::from_millis(400);
const MIB: usize = 1024 * 1024;

fn loopback(links: usize) -> Vec<SocketAddr> {
    vec![SocketAddr::from(([127, 0, 0, 1], 0)); links]
}

async fn server(config: Config) -> Endpoint {
    Endpoint::start(config).await.unwrap()
}

/// A listening and a connecting endpoint, connected directly.
async fn pair(links: usize) -> (Endpoint, Endpoint) {
    let server = server(Config::listen(loopback(links))).await;
    let client = Endpoint::start(Config::connect(server.local_addrs().to_vec()))
        .await
        .unwrap();
    assert!(client.wait_links_up(links, LINK_UP_TIMEOUT).await);
    (server, client)
}

/// Like `pair(2)`, with every link going through a relay that can be cut.
async fn relayed_pair() -> (Endpoint, Endpoint, Vec<Relay>) {
    let server = server(Config::listen(loopback(2))).await;
    let mut relays = Vec::new();
    for addr in server.local_addrs() {
        relays.push(Relay::start(*addr).await.unwrap());
    }
    let dial = relays.iter().map(Relay::addr).collect();
    let client = Endpoint::start(Config::connect(dial)).await.unwrap();
    assert!(client.wait_links_up(2, LINK_UP_TIMEOUT).await);
    (server, client, relays)
}

fn pattern(len: usize) -> Bytes {
    (0..len)
        .map(|i| u8::try_from((i * 7 + i / 4099) % 251).unwrap())
        .collect::<Vec<u8>>()
        .into()
}

async fn wait_link(endpoint: &Endpoint, link: usize, state: LinkState) {
    tokio::time::timeout(NO_HANG, async {
        while endpoint.stats().links[link].state != state {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("link {link} never became {state:?}"));
}

#[tokio::test]
async fn stream_small_message_and_finish_arrive() {
    let (server, client) = pair(2).await;
    let mut listener = server.listen("svc").unwrap();
    let mut stream = client.open("svc").await.unwrap();

    stream.send(Bytes::from_static(b"hello")).await.unwrap();
    stream.finish().unwrap();
    let mut accepted = listener.accept().await.unwrap();

    assert_eq!(accepted.service(), "svc");
    assert_eq!(
        accepted.recv().await.unwrap(),
        Some(Bytes::from_static(b"hello"))
    );
    assert_eq!(accepted.recv().await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_with_link_cut_and_restored_is_identical_and_link_returns() {
    let (server, client, relays) = relayed_pair().await;
    let mut listener = server.listen("bulk").unwrap();
    let data = pattern(64 * MIB);
    let expected = data.clone();
    let receiver = tokio::spawn(async move {
        let mut stream = listener.accept().await.unwrap();
        let mut got = Vec::with_capacity(64 * MIB);
        while let Some(chunk) = stream.recv().await.unwrap() {
            got.extend_from_slice(&chunk);
        }
        got
    });
    let mut stream = client.open("bulk").await.unwrap();

    stream.send(data.slice(..16 * MIB)).await.unwrap();
    relays[0].cut();
    stream.send(data.slice(16 * MIB..32 * MIB)).await.unwrap();
    wait_link(&client, 0, LinkState::Down).await;
    relays[0].restore();
    wait_link(&client, 0, LinkState::Up).await;
    let sent_before = client.stats().links[0].bytes_sent;
    stream.send(data.slice(32 * MIB..)).await.unwrap();
    stream.finish().unwrap();
    let got = tokio::time::timeout(NO_HANG, receiver)
        .await
        .unwrap()
        .unwrap();

    assert!(got == expected, "received bytes differ from sent bytes");
    let stats = client.stats();
    // At least the first up and the return after the cut; a box too loaded to send a
    // keepalive within the link timeout may drop and restore the link once more.
    assert!(stats.links[0].ups >= 2, "link 0 never returned: {stats:?}");
    assert!(
        stats.links[0].bytes_sent > sent_before,
        "link 0 should carry data again: {stats:?}"
    );
}

#[tokio::test]
async fn both_links_cut_reports_peer_unreachable_on_both_sides() {
    let (server, client, relays) = relayed_pair().await;
    let mut listener = server.listen("svc").unwrap();
    let mut stream = client.open("svc").await.unwrap();
    stream.send(Bytes::from_static(b"x")).await.unwrap();
    let mut accepted = listener.accept().await.unwrap();
    assert_eq!(
        accepted.recv().await.unwrap(),
        Some(Bytes::from_static(b"x"))
    );

    relays[0].cut();
    relays[1].cut();
    let client_side = tokio::time::timeout(NO_HANG, stream.recv()).await.unwrap();
    let server_side = tokio::time::timeout(NO_HANG, accepted.recv())
        .await
        .unwrap();

    assert_eq!(client_side, Err(StreamError::PeerUnreachable));
    assert_eq!(server_side, Err(StreamError::PeerUnreachable));
    assert_eq!(
        stream.send(Bytes::from_static(b"y")).await,
        Err(StreamError::PeerUnreachable)
    );
}

#[tokio::test]
async fn links_come_back_after_both_were_cut_and_new_streams_work() {
    let (server, client, relays) = relayed_pair().await;
    let mut listener = server.listen("svc").unwrap();
    relays[0].cut();
    relays[1].cut();
    wait_link(&client, 0, LinkState::Down).await;
    wait_link(&client, 1, LinkState::Down).await;

    relays[0].restore();
    relays[1].restore();
    assert!(client.wait_links_up(2, LINK_UP_TIMEOUT).await);
    let mut stream = client.open("svc").await.unwrap();
    stream.send(Bytes::from_static(b"again")).await.unwrap();
    let mut accepted = tokio::time::timeout(NO_HANG, listener.accept())
        .await
        .unwrap()
        .unwrap();

    assert_eq!(
        accepted.recv().await.unwrap(),
        Some(Bytes::from_static(b"again"))
    );
}

#[tokio::test]
async fn open_without_listener_fails_with_open_refused() {
    let (_server, client) = pair(1).await;
    let mut stream = client.open("nobody").await.unwrap();

    let result = tokio::time::timeout(NO_HANG, stream.recv()).await.unwrap();

    assert!(
        matches!(result, Err(StreamError::OpenRefused { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn open_with_no_peer_fails_with_peer_unreachable_after_timeout() {
    let client = Endpoint::start(Config::connect(vec![SocketAddr::from(([127, 0, 0, 1], 9))]))
        .await
        .unwrap();

    let result = tokio::time::timeout(NO_HANG, client.open("svc"))
        .await
        .unwrap();

    assert_eq!(result.unwrap_err(), StreamError::PeerUnreachable);
}

#[tokio::test]
async fn slow_reader_blocks_sender_and_bounds_buffered_bytes() {
    // A starved test runtime must not read as a dead peer (which ends the send instead of
    // blocking it): this test is about flow control, not failure detection.
    let patient = Duration::from_secs(5);
    let mut config = Config::listen(loopback(2));
    config.stream_window = 256 * 1024;
    config.link_timeout = patient;
    let server = server(config).await;
    let mut config = Config::connect(server.local_addrs().to_vec());
    config.link_timeout = patient;
    let client = Endpoint::start(config).await.unwrap();
    assert!(client.wait_links_up(2, LINK_UP_TIMEOUT).await);
    let mut listener = server.listen("svc").unwrap();
    let mut stream = client.open("svc").await.unwrap();

    let blocked =
        tokio::time::timeout(Duration::from_millis(500), stream.send(pattern(4 * MIB))).await;
    let accepted = listener.accept().await.unwrap();
    let stats = server.stats();

    assert!(
        blocked.is_err(),
        "send should wait for the reader, it returned {blocked:?}"
    );
    assert!(
        stats.streams[0].recv_backlog_bytes <= 256 * 1024,
        "{stats:?}"
    );
    drop(accepted);
}

#[tokio::test]
async fn dropped_receiver_resets_the_sender() {
    let (server, client) = pair(1).await;
    let mut listener = server.listen("svc").unwrap();
    let mut stream = client.open("svc").await.unwrap();
    stream.send(Bytes::from_static(b"x")).await.unwrap();
    drop(listener.accept().await.unwrap());

    let result = tokio::time::timeout(NO_HANG, stream.recv()).await.unwrap();

    assert!(
        matches!(result, Err(StreamError::Reset { .. })),
        "{result:?}"
    );
}

async fn echo_tcp() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = socket.into_split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    });
    addr
}

async fn round_trip<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    socket: S,
    data: &[u8],
) -> Vec<u8> {
    let (mut rd, mut wr) = tokio::io::split(socket);
    let writing = async {
        wr.write_all(data).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let reading = rd.read_to_end(&mut back);
    let ((), read) = tokio::join!(writing, reading);
    read.unwrap();
    back
}

#[tokio::test]
async fn proxy_tcp_ingress_to_tcp_target_round_trips_and_half_closes() {
    let (server, client) = pair(2).await;
    let _egress = Egress::start(
        server.listen("echo").unwrap(),
        Target::Tcp(echo_tcp().await),
    );
    let ingress = Ingress::bind(
        &client,
        LocalAddr::Tcp("127.0.0.1:0".parse().unwrap()),
        "echo",
    )
    .await
    .unwrap();
    let LocalAddr::Tcp(local) = ingress.local_addr().clone() else {
        panic!("tcp ingress")
    };
    let data = pattern(3 * MIB);

    let socket = tokio::net::TcpStream::connect(local).await.unwrap();
    let back = tokio::time::timeout(NO_HANG, round_trip(socket, &data))
        .await
        .unwrap();

    assert!(back == data, "echoed bytes differ");
}

#[tokio::test]
async fn proxy_unix_ingress_to_unix_target_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let target_path = dir.path().join("target.sock");
    let target = tokio::net::UnixListener::bind(&target_path).unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = target.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = socket.into_split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    });
    let (server, client) = pair(2).await;
    let _egress = Egress::start(server.listen("unix").unwrap(), Target::Unix(target_path));
    let local = dir.path().join("ingress.sock");
    let _ingress = Ingress::bind(&client, LocalAddr::Unix(local.clone()), "unix")
        .await
        .unwrap();

    let socket = tokio::net::UnixStream::connect(&local).await.unwrap();
    let back = tokio::time::timeout(NO_HANG, round_trip(socket, b"over a unix socket"))
        .await
        .unwrap();

    assert_eq!(back, b"over a unix socket");
}

#[tokio::test]
async fn proxy_unreachable_target_closes_the_local_connection() {
    let (server, client) = pair(1).await;
    let _egress = Egress::start(
        server.listen("dead").unwrap(),
        Target::Tcp("127.0.0.1:9".parse().unwrap()),
    );
    let ingress = Ingress::bind(
        &client,
        LocalAddr::Tcp("127.0.0.1:0".parse().unwrap()),
        "dead",
    )
    .await
    .unwrap();
    let LocalAddr::Tcp(local) = ingress.local_addr().clone() else {
        panic!("tcp ingress")
    };

    let mut socket = tokio::net::TcpStream::connect(local).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(NO_HANG, socket.read(&mut buf))
        .await
        .unwrap();

    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test]
async fn stats_report_rtt_and_traffic_per_link() {
    let (server, client) = pair(2).await;
    let mut listener = server.listen("svc").unwrap();
    let mut stream = client.open("svc").await.unwrap();
    stream.send(pattern(MIB)).await.unwrap();
    let mut accepted = listener.accept().await.unwrap();
    accepted.recv().await.unwrap();

    tokio::time::sleep(LINK_TIMEOUT).await;
    let stats = client.stats();

    assert!(stats.peer_connected);
    assert!(
        stats
            .links
            .iter()
            .all(|link| link.state == LinkState::Up && link.rtt_us.is_some()),
        "{stats:?}"
    );
    assert!(stats.links.iter().map(|link| link.bytes_sent).sum::<u64>() > MIB as u64);
    assert_eq!(stats.streams.len(), 1);
}

/// A hold that reports when it is entered and returns once `release` is sent.
fn gate() -> (
    replicator::proxy::Hold,
    tokio::sync::mpsc::UnboundedReceiver<()>,
    tokio::sync::watch::Sender<bool>,
) {
    let (entered_tx, entered) = tokio::sync::mpsc::unbounded_channel();
    let (release, released) = tokio::sync::watch::channel(false);
    let hold: replicator::proxy::Hold = std::sync::Arc::new(move || {
        let entered_tx = entered_tx.clone();
        let mut released = released.clone();
        Box::pin(async move {
            let _ = entered_tx.send(());
            let _ = released.wait_for(|r| *r).await;
        })
    });
    (hold, entered, release)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_holding_keeps_the_local_side_open_until_released_when_both_links_die() {
    let (server, client, relays) = relayed_pair().await;
    let _egress = Egress::start(
        server.listen("held").unwrap(),
        Target::Tcp(echo_tcp().await),
    );
    let (hold, mut entered, release) = gate();
    let ingress = Ingress::bind_holding(
        &client,
        LocalAddr::Tcp("127.0.0.1:0".parse().unwrap()),
        "held",
        Some(hold),
    )
    .await
    .unwrap();
    let LocalAddr::Tcp(local) = ingress.local_addr().clone() else {
        panic!("tcp ingress")
    };
    let mut socket = tokio::net::TcpStream::connect(local).await.unwrap();
    socket.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    tokio::time::timeout(NO_HANG, socket.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();

    for relay in &relays {
        relay.cut();
    }
    let _ = socket.write_all(b"lost").await;
    tokio::time::timeout(NO_HANG, entered.recv())
        .await
        .unwrap()
        .unwrap();
    let mut byte = [0u8; 1];
    let while_held = tokio::time::timeout(LINK_TIMEOUT * 2, socket.read(&mut byte)).await;
    release.send(true).unwrap();
    let after = tokio::time::timeout(NO_HANG, socket.read(&mut byte))
        .await
        .unwrap();

    assert_eq!(&echoed, b"ping");
    assert!(
        while_held.is_err(),
        "the local side learned of the peer's end while held: {while_held:?}"
    );
    assert!(
        matches!(after, Ok(0) | Err(_)),
        "not closed after release: {after:?}"
    );
}

#[tokio::test]
async fn proxy_holding_closed_locally_first_is_not_held() {
    let (server, client) = pair(1).await;
    let _egress = Egress::start(
        server.listen("quiet").unwrap(),
        Target::Tcp(echo_tcp().await),
    );
    let (hold, mut entered, _release) = gate();
    let ingress = Ingress::bind_holding(
        &client,
        LocalAddr::Tcp("127.0.0.1:0".parse().unwrap()),
        "quiet",
        Some(hold),
    )
    .await
    .unwrap();
    let LocalAddr::Tcp(local) = ingress.local_addr().clone() else {
        panic!("tcp ingress")
    };

    let socket = tokio::net::TcpStream::connect(local).await.unwrap();
    let back = tokio::time::timeout(NO_HANG, round_trip(socket, b"bye"))
        .await
        .unwrap();

    assert_eq!(back, b"bye");
    assert!(
        entered.try_recv().is_err(),
        "a connection its client closed was held"
    );
}
