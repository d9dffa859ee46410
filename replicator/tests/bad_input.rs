//! A peer that sends garbage, oversized lengths, a wrong version or breaks the protocol is
//! disconnected with a logged reason; the endpoint stays up and its memory stays bounded.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use replicator::frame::{Frame, FrameCodec, FrameKind, Hello};
use replicator::{Config, Endpoint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long the endpoint may take to drop a bad connection (handshake timeout is 2 × 400 ms).
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Every log line of this test process.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        tracing_subscriber::fmt()
            .with_writer(|| LogWriter)
            .with_ansi(false)
            .with_env_filter("info")
            .init();
    });
}

fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
}

async fn listening() -> Endpoint {
    capture_logs();
    Endpoint::start(Config::listen(vec![SocketAddr::from(([127, 0, 0, 1], 0))]))
        .await
        .unwrap()
}

/// Sends `bytes` on a fresh connection and waits until the endpoint closes it.
async fn send_and_expect_disconnect(endpoint: &Endpoint, bytes: &[u8]) {
    let mut socket = TcpStream::connect(endpoint.local_addrs()[0]).await.unwrap();
    // The endpoint may close before everything is written; that is the point.
    let _ = socket.write_all(bytes).await;
    let closed = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the endpoint kept a bad connection open");
}

fn encode(frame: &Frame) -> BytesMut {
    let mut wire = BytesMut::new();
    FrameCodec::new(1 << 20).encode(frame, &mut wire).unwrap();
    wire
}

fn hello() -> BytesMut {
    let hello = Hello {
        instance: 42,
        generation: 1,
        link: 0,
        session_window: 1 << 20,
        stream_window: 1 << 16,
        max_payload: 1 << 16,
    };
    encode(&Frame::new(FrameKind::Hello, 0, 0, hello.to_payload()))
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn garbage_is_disconnected_with_bad_magic_logged() {
    let endpoint = listening().await;

    send_and_expect_disconnect(&endpoint, &[0x5a; 4096]).await;

    assert!(logs().contains("checking frame magic"), "{}", logs());
}

#[tokio::test]
async fn wrong_version_is_disconnected_with_version_logged() {
    let endpoint = listening().await;
    let mut wire = hello();
    wire[4] = 9;

    send_and_expect_disconnect(&endpoint, &wire).await;

    assert!(
        logs().contains("checking frame version: found 9"),
        "{}",
        logs()
    );
}

#[tokio::test]
async fn oversized_length_is_disconnected_with_length_logged() {
    let endpoint = listening().await;
    let mut wire = hello();
    wire[20..24].copy_from_slice(&u32::MAX.to_be_bytes());

    send_and_expect_disconnect(&endpoint, &wire).await;

    assert!(
        logs().contains("4294967295 bytes exceeds maximum"),
        "{}",
        logs()
    );
}

#[tokio::test]
async fn data_beyond_credit_after_valid_hello_is_disconnected_with_credit_logged() {
    capture_logs();
    let mut config = Config::listen(vec![SocketAddr::from(([127, 0, 0, 1], 0))]);
    config.stream_window = 512 * 1024;
    let endpoint = Endpoint::start(config).await.unwrap();
    let _listener = endpoint.listen("svc").unwrap();
    let mut wire = hello();
    wire.extend_from_slice(&encode(&Frame::new(
        FrameKind::Open,
        1,
        0,
        Bytes::from_static(b"svc"),
    )));
    let flood = Bytes::from(vec![0u8; 1 << 20]);
    wire.extend_from_slice(&encode(&Frame::new(FrameKind::Data, 1, 1, flood.clone())));
    wire.extend_from_slice(&encode(&Frame::new(FrameKind::Data, 1, 2, flood.clone())));
    wire.extend_from_slice(&encode(&Frame::new(FrameKind::Data, 1, 3, flood)));

    send_and_expect_disconnect(&endpoint, &wire).await;

    assert!(logs().contains("exceed credit"), "{}", logs());
}

#[tokio::test]
async fn silent_connection_is_disconnected_after_handshake_timeout() {
    let endpoint = listening().await;

    send_and_expect_disconnect(&endpoint, &[]).await;

    assert!(logs().contains("no hello within"), "{}", logs());
}

#[tokio::test]
async fn many_hostile_peers_leave_memory_bounded_and_endpoint_serving() {
    capture_logs();
    let mut config = Config::listen(vec![SocketAddr::from(([127, 0, 0, 1], 0))]);
    config.session_window = 1 << 20;
    config.stream_window = 256 * 1024;
    config.max_payload = 256 * 1024;
    let endpoint = Endpoint::start(config).await.unwrap();
    let before = rss_kib();
    let mut oversized = hello();
    oversized[20..24].copy_from_slice(&(1u32 << 31).to_be_bytes());
    let mut ahead = hello();
    for seq in 1..64u64 {
        // Frames ahead of a gap: buffered up to the 1 MiB session window, then the link drops.
        let payload = Bytes::from(vec![1u8; 60 * 1024]);
        ahead.extend_from_slice(&encode(&Frame::new(FrameKind::Data, 1, seq * 2, payload)));
    }

    for _ in 0..20 {
        send_and_expect_disconnect(&endpoint, &oversized).await;
        send_and_expect_disconnect(&endpoint, &ahead).await;
        send_and_expect_disconnect(&endpoint, &[0xff; 256 * 1024]).await;
    }
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    let mut listener = endpoint.listen("svc").unwrap();
    let client = Endpoint::start(Config::connect(endpoint.local_addrs().to_vec()))
        .await
        .unwrap();
    assert!(client.wait_links_up(1, DISCONNECT_TIMEOUT).await);
    let mut stream = client.open("svc").await.unwrap();
    stream
        .send(Bytes::from_static(b"still here"))
        .await
        .unwrap();
    let mut accepted = tokio::time::timeout(DISCONNECT_TIMEOUT, listener.accept())
        .await
        .unwrap()
        .unwrap();

    assert!(grown_mib < 64, "memory grew by {grown_mib} MiB");
    assert!(logs().contains("reorder buffer over"), "{}", logs());
    assert_eq!(
        accepted.recv().await.unwrap(),
        Some(Bytes::from_static(b"still here"))
    );
}
