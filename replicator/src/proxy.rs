//! Proxy mode: carry local TCP or Unix socket connections over the A-Links.
//!
//! On one host an [`Ingress`] listens on a local address; each connection it accepts opens a
//! stream to a service on the peer. On the peer an [`Egress`] accepts the streams of that
//! service and connects each to a configured [`Target`]. Bytes are copied both ways; the end
//! of one direction (EOF, `shutdown(SHUT_WR)`) is carried as the stream's finish, and a
//! failure on either side closes both. This is how QEMU's NBD and migration traffic crosses
//! the A-Links.
//!
//! ```text
//!  host A                                                  host B
//!  qemu ──► Ingress(127.0.0.1:10809) ══ stream "nbd" ══► Egress ──► qemu-nbd (unix socket)
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use crate::link::{Endpoint, Inner, chain};
use crate::stream::{Stream, StreamError, StreamListener};

/// Bytes read from a local socket per stream chunk.
const READ_SIZE: usize = 256 * 1024;

/// Errors of the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The local listening socket could not be bound.
    #[error("binding proxy listener on {addr}")]
    Bind {
        /// The local address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The target could not be reached from the egress side.
    #[error("connecting proxy target {target}")]
    Connect {
        /// The target.
        target: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading from or writing to the local socket failed.
    #[error("copying proxy connection bytes")]
    Socket {
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Opening or using the stream failed.
    #[error("carrying proxy connection over stream")]
    Stream {
        /// Cause.
        #[source]
        source: StreamError,
    },
}

/// A local listening address of an [`Ingress`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalAddr {
    /// A TCP address (port 0 picks a free port).
    Tcp(SocketAddr),
    /// A Unix socket path; it must not exist yet.
    Unix(PathBuf),
}

/// Where an [`Egress`] connects each carried connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "tcp:{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// What an ingress does with a local connection whose peer side ended or failed while the
/// local side was still open: the local side stays open, and nothing more reaches it, until
/// the future completes; then it is closed. The caller decides what must happen before its
/// local client may learn that the peer is gone (HA: the peer's copy recorded as behind).
pub type Hold = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The local side of a proxy: listens, and opens one stream per accepted connection.
/// Dropping it stops listening and closes its connections.
#[derive(Debug)]
pub struct Ingress {
    local: LocalAddr,
    task: JoinHandle<()>,
}

impl Ingress {
    /// Listens on `local`; each connection is carried to `service` on the peer.
    ///
    /// # Errors
    /// [`ProxyError::Bind`] when `local` cannot be bound.
    pub async fn bind(
        endpoint: &Endpoint,
        local: LocalAddr,
        service: &str,
    ) -> Result<Self, ProxyError> {
        Self::bind_holding(endpoint, local, service, None).await
    }

    /// Like [`Ingress::bind`], but a connection whose peer side ends first is held open as
    /// [`Hold`] says before it is closed.
    ///
    /// # Errors
    /// [`ProxyError::Bind`] when `local` cannot be bound.
    pub async fn bind_holding(
        endpoint: &Endpoint,
        local: LocalAddr,
        service: &str,
        hold: Option<Hold>,
    ) -> Result<Self, ProxyError> {
        let inner = endpoint.inner();
        let service = service.to_owned();
        let (local, task) = match local {
            LocalAddr::Tcp(addr) => {
                let listener =
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| ProxyError::Bind {
                            addr: addr.to_string(),
                            source,
                        })?;
                let bound = listener.local_addr().unwrap_or(addr);
                (
                    LocalAddr::Tcp(bound),
                    tokio::spawn(ingress_tcp(listener, inner, service, hold)),
                )
            }
            LocalAddr::Unix(path) => {
                let listener = UnixListener::bind(&path).map_err(|source| ProxyError::Bind {
                    addr: path.display().to_string(),
                    source,
                })?;
                (
                    LocalAddr::Unix(path),
                    tokio::spawn(ingress_unix(listener, inner, service, hold)),
                )
            }
        };
        info!(?local, "proxy ingress listening");
        Ok(Self { local, task })
    }

    /// The bound local address (with the actual port for TCP port 0).
    #[must_use]
    pub fn local_addr(&self) -> &LocalAddr {
        &self.local
    }
}

impl Drop for Ingress {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn ingress_tcp(
    listener: TcpListener,
    inner: Arc<Inner>,
    service: String,
    hold: Option<Hold>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    let _ = socket.set_nodelay(true);
                    conns.spawn(carry_local(Arc::clone(&inner), service.clone(), socket, peer.to_string(), hold.clone()));
                }
                Err(error) => warn!(reason = %error, "proxy ingress accept failed"),
            },
            Some(_) = conns.join_next() => {}
        }
    }
}

async fn ingress_unix(
    listener: UnixListener,
    inner: Arc<Inner>,
    service: String,
    hold: Option<Hold>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => {
                    conns.spawn(carry_local(Arc::clone(&inner), service.clone(), socket, "unix".to_owned(), hold.clone()));
                }
                Err(error) => warn!(reason = %error, "proxy ingress accept failed"),
            },
            Some(_) = conns.join_next() => {}
        }
    }
}

async fn carry_local<S>(
    inner: Arc<Inner>,
    service: String,
    socket: S,
    peer: String,
    hold: Option<Hold>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let result = async {
        let stream = match Endpoint::open_with(&inner, &service).await {
            Ok(stream) => stream,
            Err(source) => {
                // The peer is out of reach before a byte moved: held like any other end.
                if let Some(hold) = &hold {
                    hold().await;
                }
                return Err(ProxyError::Stream { source });
            }
        };
        debug!(
            service,
            peer,
            stream = stream.id(),
            "proxy connection carried"
        );
        match hold {
            Some(hold) => pump_holding(socket, stream, hold).await,
            None => pump(socket, stream).await,
        }
    }
    .await;
    match result {
        Ok(()) => debug!(service, peer, "proxy connection done"),
        Err(error) => warn!(service, peer, reason = %chain(&error), "proxy connection failed"),
    }
}

/// The peer side of a proxy: connects each stream of a service to a target.
/// Dropping it stops accepting and closes its connections.
#[derive(Debug)]
pub struct Egress {
    task: JoinHandle<()>,
}

impl Egress {
    /// Accepts the streams of `listener` and connects each to `target`.
    #[must_use]
    pub fn start(listener: StreamListener, target: Target) -> Self {
        info!(service = listener.service(), %target, "proxy egress serving");
        Self {
            task: tokio::spawn(egress(listener, target)),
        }
    }
}

impl Drop for Egress {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn egress(mut listener: StreamListener, target: Target) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    conns.spawn(carry_remote(stream, target.clone()));
                }
                Err(error) => {
                    info!(reason = %error, "proxy egress stopped");
                    return;
                }
            },
            Some(_) = conns.join_next() => {}
        }
    }
}

async fn carry_remote(stream: Stream, target: Target) {
    let id = stream.id();
    let result = match &target {
        Target::Tcp(addr) => match TcpStream::connect(addr).await {
            Ok(socket) => {
                let _ = socket.set_nodelay(true);
                pump(socket, stream).await
            }
            Err(source) => Err(ProxyError::Connect {
                target: target.to_string(),
                source,
            }),
        },
        Target::Unix(path) => match UnixStream::connect(path).await {
            Ok(socket) => pump(socket, stream).await,
            Err(source) => Err(ProxyError::Connect {
                target: target.to_string(),
                source,
            }),
        },
    };
    match result {
        Ok(()) => debug!(stream = id, %target, "proxy connection done"),
        Err(error) => {
            warn!(stream = id, %target, reason = %chain(&error), "proxy connection failed")
        }
    }
}

/// Like [`pump`], but when the peer side ends (finish or failure) while the local side is
/// open, awaits `hold` before the local side learns of it. Unlike [`pump`] a peer's finish
/// ends the connection (no half-close): a held connection serves a request/reply protocol
/// (NBD) whose server never half-closes.
async fn pump_holding<S>(socket: S, stream: Stream, hold: Hold) -> Result<(), ProxyError>
where
    S: AsyncRead + AsyncWrite,
{
    let (mut socket_rd, mut socket_wr) = tokio::io::split(socket);
    let (mut tx, mut rx) = stream.split();
    let local_closed = AtomicBool::new(false);
    let upstream = async {
        loop {
            let mut buf = BytesMut::with_capacity(READ_SIZE);
            let read = socket_rd
                .read_buf(&mut buf)
                .await
                .map_err(|source| ProxyError::Socket { source })?;
            if read == 0 {
                local_closed.store(true, Ordering::SeqCst);
                return tx.finish().map_err(|source| ProxyError::Stream { source });
            }
            tx.send(buf.freeze())
                .await
                .map_err(|source| ProxyError::Stream { source })?;
        }
    };
    let downstream = async {
        while let Some(data) = rx
            .recv()
            .await
            .map_err(|source| ProxyError::Stream { source })?
        {
            socket_wr
                .write_all(&data)
                .await
                .map_err(|source| ProxyError::Socket { source })?;
        }
        Ok(())
    };
    // Runs until the peer side ends; a local failure ends everything at once.
    let peer_end = {
        tokio::pin!(upstream, downstream);
        let mut upstream_done = false;
        loop {
            tokio::select! {
                sent = &mut upstream, if !upstream_done => match sent {
                    Ok(()) => upstream_done = true,
                    Err(error @ ProxyError::Socket { .. }) => return Err(error),
                    Err(error) => break Err(error),
                },
                received = &mut downstream => break received,
            }
        }
    };
    if matches!(peer_end, Err(ProxyError::Socket { .. })) || local_closed.load(Ordering::SeqCst) {
        return peer_end;
    }
    hold().await;
    let _ = socket_wr.shutdown().await;
    peer_end
}

/// Copies between a socket and a stream in both directions until both ends finished or
/// either fails.
async fn pump<S>(socket: S, stream: Stream) -> Result<(), ProxyError>
where
    S: AsyncRead + AsyncWrite,
{
    let (mut socket_rd, mut socket_wr) = tokio::io::split(socket);
    let (mut tx, mut rx) = stream.split();
    let upstream = async {
        loop {
            let mut buf = BytesMut::with_capacity(READ_SIZE);
            let read = socket_rd
                .read_buf(&mut buf)
                .await
                .map_err(|source| ProxyError::Socket { source })?;
            if read == 0 {
                return tx.finish().map_err(|source| ProxyError::Stream { source });
            }
            tx.send(buf.freeze())
                .await
                .map_err(|source| ProxyError::Stream { source })?;
        }
    };
    let downstream = async {
        while let Some(data) = rx
            .recv()
            .await
            .map_err(|source| ProxyError::Stream { source })?
        {
            socket_wr
                .write_all(&data)
                .await
                .map_err(|source| ProxyError::Socket { source })?;
        }
        socket_wr
            .shutdown()
            .await
            .map_err(|source| ProxyError::Socket { source })
    };
    tokio::try_join!(upstream, downstream).map(|_| ())
}
