//! The link set: two or more TCP connections between the hosts' A-Link addresses.
//!
//! An [`Endpoint`] runs one task per configured link. On the [`Role::Listen`] side it
//! accepts connections on the link's address; on the [`Role::Connect`] side it dials the
//! peer's address and redials whenever the connection is lost. Every new connection starts
//! with a `Hello` exchange (see [`crate::frame`]), then carries frames of the shared session
//! (see the protocol notes in `session.rs`, summarised here):
//!
//! - sequenced frames are spread over the up links (the one with the fewest queued bytes);
//! - each is acknowledged by a cumulative `Ack`; unacknowledged frames of a link that fails
//!   are resent on a surviving one, and the receiver drops duplicates by sequence number;
//! - each link sends a `Ping` every `keepalive_interval` and answers the peer's; a link is
//!   declared down on a socket error, on a decode or protocol error (with the reason logged),
//!   or when nothing arrives for `link_timeout`;
//! - when every link is down, every stream fails with
//!   [`StreamError::PeerUnreachable`]; the links
//!   keep reconnecting and new streams can be opened once one is back.
//!
//! ```text
//!  Connect side                         Listen side
//!   dial link i ───── TCP ────────────►  accept on link i address
//!   Hello{instance, generation, i} ◄──►  Hello{instance, generation, i}
//!   frames (Open/Data/Close/Ack/Credit/Reset/Ping/Pong) in both directions
//!   … error or silence > link_timeout: drop, resend on survivors, redial
//! ```

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use crate::conn::run_conn;
use crate::frame::FrameError;
pub use crate::session::Role;
use crate::session::{Limits, ProtocolError, Session, SessionConfig};
use crate::stats::{EndpointStats, LinkState};
use crate::stream::{Stream, StreamError, StreamListener};
use crate::tls::LinkTls;

/// Most connections per link that may be in their handshake at once (listen side).
const MAX_HANDSHAKES: usize = 8;

/// Errors of the link set.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A link's listening socket could not be bound.
    #[error("binding link {link} on {addr}")]
    Bind {
        /// Link index.
        link: usize,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is unusable.
    #[error("checking link configuration: {reason}")]
    CheckConfig {
        /// What is wrong.
        reason: &'static str,
    },
    /// The peer closed the connection.
    #[error("reading from link: connection closed by the peer")]
    Closed,
    /// The byte stream from the peer is corrupt (bad magic, version, length or CRC).
    #[error("decoding frame from link")]
    Decode {
        /// What the decoder rejected.
        #[source]
        source: FrameError,
    },
    /// A frame to send could not be encoded.
    #[error("encoding frame for link")]
    Encode {
        /// What the encoder rejected.
        #[source]
        source: FrameError,
    },
    /// The handshake failed: no `Hello`, a malformed one, or one for another link.
    #[error("exchanging hello on link {link}: {reason}")]
    Handshake {
        /// Link index.
        link: usize,
        /// What was wrong.
        reason: String,
    },
    /// The peer broke the session protocol.
    #[error("processing frame from link")]
    Protocol {
        /// The violation.
        #[source]
        source: ProtocolError,
    },
    /// Reading from the socket failed.
    #[error("reading from link")]
    Read {
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Nothing arrived for longer than the link timeout.
    #[error("watching link: silent for more than {timeout:?}")]
    Silence {
        /// The configured timeout.
        timeout: Duration,
    },
    /// The connection was replaced or closed by the session (or the endpoint shut down).
    #[error("running link: connection stopped by the session")]
    Stopped,
    /// Writing to the socket failed.
    #[error("writing to link")]
    Write {
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake of a link failed: the peer's certificate is not of the pair, or
    /// the peer speaks no (or other) TLS.
    #[error("TLS handshake on link {link}")]
    Tls {
        /// Index of the link.
        link: usize,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Configuration of an [`Endpoint`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Whether this side listens or dials.
    pub role: Role,
    /// One address per link: where to listen (listen side) or whom to dial (connect side).
    pub links: Vec<SocketAddr>,
    /// A link with no frame or keepalive for this long is declared down (default 400 ms).
    pub link_timeout: Duration,
    /// Keepalive period per link (default 100 ms); must be well under `link_timeout`.
    pub keepalive_interval: Duration,
    /// Pause between dial attempts of the connect side (default 100 ms).
    pub reconnect_interval: Duration,
    /// Largest frame payload accepted from the peer (default 1 MiB).
    pub max_payload: usize,
    /// Largest data chunk sent in one frame (default 256 KiB).
    pub chunk_size: usize,
    /// Bytes of sequenced frames buffered ahead of a gap; the peer keeps at most this much
    /// unacknowledged (default 32 MiB).
    pub session_window: usize,
    /// Bytes of one stream buffered before the application reads them (default 8 MiB).
    pub stream_window: usize,
    /// Most streams open at once (default 32). What a peer can make this side buffer is at
    /// most `session_window + max_streams * stream_window` (288 MiB with the defaults).
    pub max_streams: usize,
    /// Streams opened by the peer and not accepted yet, per service (default 16).
    pub accept_backlog: usize,
    /// TLS on every link, of this side's role (default none: plain TCP).
    pub tls: Option<LinkTls>,
}

impl Config {
    /// Defaults for a side with `role` and one address per link.
    #[must_use]
    pub fn new(role: Role, links: Vec<SocketAddr>) -> Self {
        Self {
            role,
            links,
            link_timeout: Duration::from_millis(400),
            keepalive_interval: Duration::from_millis(100),
            reconnect_interval: Duration::from_millis(100),
            max_payload: 1024 * 1024,
            chunk_size: 256 * 1024,
            session_window: 32 * 1024 * 1024,
            stream_window: 8 * 1024 * 1024,
            max_streams: 32,
            accept_backlog: 16,
            tls: None,
        }
    }

    /// The same configuration with TLS on every link.
    #[must_use]
    pub fn with_tls(mut self, tls: LinkTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Defaults for the listening side.
    #[must_use]
    pub fn listen(links: Vec<SocketAddr>) -> Self {
        Self::new(Role::Listen, links)
    }

    /// Defaults for the dialing side.
    #[must_use]
    pub fn connect(links: Vec<SocketAddr>) -> Self {
        Self::new(Role::Connect, links)
    }

    fn check(&self) -> Result<(), LinkError> {
        let fail = |reason| Err(LinkError::CheckConfig { reason });
        if self.links.is_empty() || self.links.len() > usize::from(u16::MAX) {
            return fail("between 1 and 65535 links are needed");
        }
        let twice = self
            .keepalive_interval
            .checked_mul(2)
            .unwrap_or(Duration::MAX);
        if self.keepalive_interval.is_zero() || twice > self.link_timeout {
            return fail("keepalive_interval must be non-zero and at most half of link_timeout");
        }
        if self.max_payload < 4096 || u32::try_from(self.max_payload).is_err() {
            return fail("max_payload must be between 4 KiB and 4 GiB");
        }
        if self.stream_window < 8192 || u32::try_from(self.stream_window).is_err() {
            return fail("stream_window must be between 8 KiB and 4 GiB");
        }
        if self.session_window < 2 * self.stream_window.min(self.max_payload)
            || u32::try_from(self.session_window).is_err()
        {
            return fail(
                "session_window must be at least twice min(stream_window, max_payload) and under 4 GiB",
            );
        }
        if self.chunk_size == 0 || self.max_streams == 0 {
            return fail("chunk_size and max_streams must be non-zero");
        }
        match (&self.tls, self.role) {
            (Some(LinkTls::Listen(_)), Role::Connect)
            | (Some(LinkTls::Connect { .. }), Role::Listen) => {
                fail("the TLS side must match the role (listen or connect)")
            }
            _ => Ok(()),
        }
    }
}

/// Shared state of an endpoint: the session behind its mutex, and the configuration.
#[derive(Debug)]
pub(crate) struct Inner {
    session: Mutex<Session>,
    pub(crate) config: Config,
    pub(crate) next_conn: AtomicU64,
    epoch: Instant,
}

impl Inner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Session> {
        // A panic while holding the lock leaves consistent-enough counters; keep serving.
        self.session.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn micros(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// One side of an A-Link set: the links, the session and its streams.
///
/// Dropping the endpoint stops its tasks and fails its streams with
/// [`StreamError::EndpointClosed`].
#[derive(Debug)]
pub struct Endpoint {
    inner: Arc<Inner>,
    local_addrs: Vec<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Endpoint {
    /// Binds the listening sockets (listen side) and starts one task per link.
    ///
    /// # Errors
    /// [`LinkError::CheckConfig`] for an unusable configuration, [`LinkError::Bind`] when a
    /// listening address cannot be bound.
    pub async fn start(config: Config) -> Result<Self, LinkError> {
        config.check()?;
        let session_config = SessionConfig {
            role: config.role,
            limits: Limits {
                session_window: config.session_window,
                stream_window: config.stream_window,
                max_payload: config.max_payload,
            },
            max_streams: config.max_streams,
            accept_backlog: config.accept_backlog,
        };
        let session = Session::new(session_config, config.links.len());
        let inner = Arc::new(Inner {
            session: Mutex::new(session),
            config: config.clone(),
            next_conn: AtomicU64::new(1),
            epoch: Instant::now(),
        });
        let mut local_addrs = Vec::with_capacity(config.links.len());
        let mut tasks = Vec::with_capacity(config.links.len());
        for (link, addr) in config.links.iter().copied().enumerate() {
            match config.role {
                Role::Listen => {
                    let listener = TcpListener::bind(addr)
                        .await
                        .map_err(|source| LinkError::Bind { link, addr, source })?;
                    local_addrs.push(listener.local_addr().unwrap_or(addr));
                    tasks.push(tokio::spawn(listen_link(
                        Arc::clone(&inner),
                        link,
                        listener,
                    )));
                }
                Role::Connect => {
                    local_addrs.push(addr);
                    tasks.push(tokio::spawn(dial_link(Arc::clone(&inner), link, addr)));
                }
            }
        }
        info!(role = ?config.role, links = config.links.len(), "endpoint started");
        Ok(Self {
            inner,
            local_addrs,
            tasks,
        })
    }

    /// The link addresses: bound listening addresses (listen side, with the actual port when
    /// port 0 was configured) or the dialed addresses (connect side).
    #[must_use]
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Opens a stream to `service` on the peer, waiting up to the link timeout for a link.
    ///
    /// # Errors
    /// [`StreamError::PeerUnreachable`] when no link comes up in time,
    /// [`StreamError::OpenName`] for an empty or over-long name.
    pub async fn open(&self, service: &str) -> Result<Stream, StreamError> {
        Self::open_with(&self.inner, service).await
    }

    pub(crate) async fn open_with(
        inner: &Arc<Inner>,
        service: &str,
    ) -> Result<Stream, StreamError> {
        let deadline = tokio::time::Instant::now() + inner.config.link_timeout;
        loop {
            let wake = inner.lock().up_wake();
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match inner.lock().open(service) {
                Ok(shared) => return Ok(Stream::new(Arc::clone(inner), shared)),
                Err(StreamError::PeerUnreachable) if tokio::time::Instant::now() < deadline => {}
                Err(error) => return Err(error),
            }
            // Either a link came up or the deadline passed; both are re-checked above.
            let _woken = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    pub(crate) fn inner(&self) -> Arc<Inner> {
        Arc::clone(&self.inner)
    }

    /// Starts accepting streams the peer opens for `service`.
    ///
    /// # Errors
    /// [`StreamError::ListenTaken`] when the service already has a listener,
    /// [`StreamError::OpenName`] for an empty or over-long name.
    pub fn listen(&self, service: &str) -> Result<StreamListener, StreamError> {
        let incoming = self.inner.lock().listen(service)?;
        Ok(StreamListener::new(
            Arc::clone(&self.inner),
            service.to_owned(),
            incoming,
        ))
    }

    /// Snapshot of links and streams.
    #[must_use]
    pub fn stats(&self) -> EndpointStats {
        self.inner.lock().stats()
    }

    /// A handle that reads this endpoint's stats from elsewhere (a metrics task).
    #[must_use]
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle {
            inner: Arc::clone(&self.inner),
        }
    }

    /// Waits until a peer session is established and at least `links` links are up.
    /// Returns whether that happened within `timeout`.
    pub async fn wait_links_up(&self, links: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let wake = self.inner.lock().up_wake();
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let stats = self.stats();
            let up = stats
                .links
                .iter()
                .filter(|link| link.state == LinkState::Up)
                .count();
            if stats.peer_connected && up >= links {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            // Links can also come up without a wake-up (replacement); poll at a short period.
            let poll = tokio::time::Instant::now() + Duration::from_millis(20);
            let _woken = tokio::time::timeout_at(poll.min(deadline), notified).await;
        }
    }

    /// Stops every link and fails every stream with [`StreamError::EndpointClosed`].
    pub fn shutdown(&self) {
        for task in &self.tasks {
            task.abort();
        }
        let stops = self.inner.lock().shutdown();
        for stop in stops {
            stop.notify_one();
        }
        info!("endpoint shut down");
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Reads an endpoint's stats; see [`Endpoint::stats_handle`].
#[derive(Debug, Clone)]
pub struct StatsHandle {
    inner: Arc<Inner>,
}

impl StatsHandle {
    /// Snapshot of links and streams.
    #[must_use]
    pub fn get(&self) -> EndpointStats {
        self.inner.lock().stats()
    }
}

/// Dials link `link` forever, running each connection until it fails.
async fn dial_link(inner: Arc<Inner>, link: usize, addr: SocketAddr) {
    let connect_timeout = inner.config.link_timeout * 2;
    let mut failures = 0u64;
    loop {
        match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(socket)) => {
                failures = 0;
                debug!(link, %addr, "connected");
                let counters = inner.lock().counters(link);
                if let Some(counters) = &counters {
                    counters.set_state(LinkState::Connecting);
                }
                if let Err(error) = run_conn(&inner, link, socket).await {
                    // Connections that were up are logged by the session as "link down".
                    debug!(link, %addr, reason = %chain(&error), "connection ended");
                }
                if let Some(counters) = &counters {
                    counters.set_state(LinkState::Down);
                }
            }
            Ok(Err(error)) => {
                failures += 1;
                if failures == 1 {
                    info!(link, %addr, reason = %error, "dialing link failed; retrying");
                }
            }
            Err(_elapsed) => {
                failures += 1;
                if failures == 1 {
                    info!(link, %addr, "dialing link timed out; retrying");
                }
            }
        }
        tokio::time::sleep(inner.config.reconnect_interval).await;
    }
}

/// Accepts connections for link `link` forever; each runs in its own task so that a
/// misbehaving client cannot hold the link.
async fn listen_link(inner: Arc<Inner>, link: usize, listener: TcpListener) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) if conns.len() < MAX_HANDSHAKES => {
                    let inner = Arc::clone(&inner);
                    conns.spawn(async move {
                        if let Err(error) = run_conn(&inner, link, socket).await {
                            // Failures are logged where they happen (handshake, link down).
                            debug!(link, %peer, reason = %chain(&error), "connection ended");
                        }
                    });
                }
                Ok((_socket, peer)) => warn!(link, %peer, "refusing connection: too many connections in progress"),
                Err(error) => {
                    warn!(link, reason = %error, "accepting on link failed");
                    tokio::time::sleep(inner.config.reconnect_interval).await;
                }
            },
            Some(_) = conns.join_next() => {}
        }
    }
}

/// An error and its sources, joined with ": ".
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
