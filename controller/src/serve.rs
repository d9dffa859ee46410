//! The API port's HTTP server: serves the controller's routes ([`crate::front`]) on every
//! accepted connection, HTTP/2 or HTTP/1.1, with HTTP/1.1 upgrades for the console's VNC
//! websocket (tonic's own server does not pass upgrades on). At shutdown it stops accepting,
//! asks open connections to finish, and waits a bounded time for them.

use std::io;
use std::pin::pin;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt};

/// How long open connections (a console's event stream, say) get to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `router` on each connection of `incoming` until `shutdown` completes (or
/// `incoming` ends), then drains the open connections.
pub async fn run<S, IO>(incoming: S, router: axum::Router, shutdown: impl Future<Output = ()>)
where
    S: Stream<Item = io::Result<IO>>,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let builder = builder();
    let (stop_tx, stop_rx) = watch::channel(false);
    {
        let mut incoming = pin!(incoming);
        let mut shutdown = pin!(shutdown);
        loop {
            let io = tokio::select! {
                () = &mut shutdown => break,
                next = incoming.next() => match next {
                    None => break,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "an API connection failed before serving");
                        continue;
                    }
                    Some(Ok(io)) => io,
                },
            };
            serve_one(&builder, io, router.clone(), stop_rx.clone());
        }
    }
    drop(stop_rx);
    let _ = stop_tx.send(true);
    if tokio::time::timeout(DRAIN, stop_tx.closed()).await.is_err() {
        tracing::info!(
            open = stop_tx.receiver_count(),
            "API connections still open after the drain time; closing them"
        );
    }
}

/// The connection settings: tonic's HTTP/2 flow-control windows (exports and imports stream
/// disk images through this port), and hyper's timers so its header timeouts apply.
fn builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(proto::transport::STREAM_WINDOW)
        .initial_connection_window_size(proto::transport::CONNECTION_WINDOW);
    builder
}

/// Serves one connection on its own task; a change of `stop` asks it to finish gracefully.
fn serve_one<IO>(
    builder: &auto::Builder<TokioExecutor>,
    io: IO,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    let connection = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .into_owned();
    tokio::spawn(async move {
        let mut connection = pin!(connection);
        let mut stopping = false;
        loop {
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(e) = served {
                        tracing::debug!(error = %e, "an API connection ended with an error");
                    }
                    break;
                }
                changed = stop.changed(), if !stopping => {
                    stopping = true;
                    if changed.is_ok() {
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::oneshot;
    use tokio_stream::wrappers::TcpListenerStream;

    async fn start(router: axum::Router) -> (std::net::SocketAddr, oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(run(TcpListenerStream::new(listener), router, async {
            let _ = stopped.await;
        }));
        (at, stop)
    }

    async fn exchange(at: std::net::SocketAddr, request: &str) -> Vec<u8> {
        let mut tcp = TcpStream::connect(at).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut reply = Vec::new();
        tcp.read_to_end(&mut reply).await.unwrap();
        reply
    }

    #[tokio::test]
    async fn serves_http1_and_passes_upgrades_on() {
        let router = axum::Router::new()
            .route("/plain", get(|| async { "plain\n" }))
            .route(
                "/ws",
                get(|ws: axum::extract::ws::WebSocketUpgrade| async move {
                    ws.on_upgrade(|mut socket| async move {
                        let _ = socket
                            .send(axum::extract::ws::Message::Text("hi".into()))
                            .await;
                    })
                }),
            );
        let (at, _stop) = start(router).await;

        let plain = exchange(
            at,
            "GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        let plain = String::from_utf8_lossy(&plain);
        assert!(plain.starts_with("HTTP/1.1 200"), "{plain}");
        assert!(plain.ends_with("plain\n"), "{plain}");

        let upgraded = exchange(
            at,
            "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await;
        let text = String::from_utf8_lossy(&upgraded);
        assert!(text.starts_with("HTTP/1.1 101"), "{text}");
        assert!(
            text.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "the RFC 6455 accept key: {text}"
        );
        // The text frame "hi" the handler sent after the upgrade: FIN+text, length 2.
        assert!(upgraded.ends_with(b"\x81\x02hi"), "{text:?}");
    }

    #[tokio::test]
    async fn shutdown_stops_accepting() {
        let (at, stop) = start(axum::Router::new().route("/", get(|| async { "x" }))).await;
        stop.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(at).await.is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "still accepting after shutdown"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
