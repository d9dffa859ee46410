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

use std::collections::VecDeque;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use crate::frame::{Frame, FrameCodec, FrameError, FrameKind, HEADER_LEN, Hello};
pub use crate::session::Role;
use crate::session::{Conn, Limits, Outgoing, ProtocolError, Session, SessionConfig};
use crate::stats::{EndpointStats, LinkCounters, LinkState};
use crate::stream::{Stream, StreamError, StreamListener};
use crate::tls::{LinkTls, ReadHalf, WriteHalf, secure};

/// Bytes of free space a link's read buffer offers to each read.
const READ_CHUNK: usize = 256 * 1024;
/// Size of a link's receive buffer allocations (at least two largest frames).
const RECV_BUFFER: usize = 4 * 1024 * 1024;
/// Filled receive buffers kept for reuse per link (see `RecvBuffers`).
const RECV_SPARES: usize = 4;
/// Most frames one writer system call gathers.
const WRITE_BATCH_FRAMES: usize = 64;
/// Most bytes one writer batch gathers.
const WRITE_BATCH_BYTES: usize = 4 * 1024 * 1024;
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
    next_conn: AtomicU64,
    epoch: Instant,
}

impl Inner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Session> {
        // A panic while holding the lock leaves consistent-enough counters; keep serving.
        self.session.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn micros(&self) -> u64 {
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

/// Aborts a task when dropped.
#[derive(Debug)]
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
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

/// Runs one connection of `link`: handshake, then frames until it fails.
async fn run_conn(inner: &Arc<Inner>, link: usize, socket: TcpStream) -> Result<(), LinkError> {
    let Some(counters) = inner.lock().counters(link) else {
        return Err(LinkError::CheckConfig {
            reason: "link index out of range",
        });
    };
    if let Err(error) = socket.set_nodelay(true) {
        debug!(link, reason = %error, "setting TCP_NODELAY failed");
    }
    let timeout = inner.config.link_timeout * 2;
    let secured = tokio::time::timeout(timeout, secure(inner.config.tls.as_ref(), socket)).await;
    let (mut rd, mut wr) = match secured {
        Ok(Ok(halves)) => halves,
        Ok(Err(source)) => {
            warn!(link, reason = %source, "TLS handshake failed; connection closed");
            return Err(LinkError::Tls { link, source });
        }
        Err(_) => {
            let source = std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no TLS handshake within {timeout:?}"),
            );
            warn!(link, reason = %source, "TLS handshake failed; connection closed");
            return Err(LinkError::Tls { link, source });
        }
    };
    let mut codec = FrameCodec::new(inner.config.max_payload);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let hello = match handshake(inner, link, &mut rd, &mut wr, &mut codec, &mut buf).await {
        Ok(hello) => hello,
        Err(error) => {
            warn!(link, reason = %chain(&error), "handshake failed; connection closed");
            return Err(error);
        }
    };
    let size = RECV_BUFFER.max(2 * (inner.config.max_payload + HEADER_LEN));
    let buf = RecvBuffers::new(size, &buf);
    let (tx, rx) = mpsc::unbounded_channel();
    let stop = Arc::new(Notify::new());
    let id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
    let queued = Arc::new(AtomicUsize::new(0));
    let conn = Conn {
        id,
        tx,
        stop: Arc::clone(&stop),
        queued: Arc::clone(&queued),
    };
    let stops = {
        let mut session = inner.lock();
        if session.is_shut_down() {
            return Err(LinkError::Stopped);
        }
        session.link_up(link, conn, &hello)
    };
    for old in stops {
        old.notify_one();
    }
    let writer = Writer {
        inner: Arc::clone(inner),
        counters: Arc::clone(&counters),
        queued,
        rx,
    };
    let mut writer = AbortOnDrop(tokio::spawn(writer.run(wr)));
    let reader = Reader {
        inner,
        link,
        conn: id,
        counters: &counters,
        codec,
        buf,
    };
    let result = reader.run(&mut rd, &stop, &mut writer.0).await;
    drop(writer);
    let reason = match &result {
        Ok(()) => "stopped".to_owned(),
        Err(error) => chain(error),
    };
    inner.lock().link_down(link, id, &reason);
    result
}

/// Sends our `Hello` and reads the peer's.
async fn handshake(
    inner: &Inner,
    link: usize,
    rd: &mut ReadHalf,
    wr: &mut WriteHalf,
    codec: &mut FrameCodec,
    buf: &mut BytesMut,
) -> Result<Hello, LinkError> {
    let timeout = inner.config.link_timeout * 2;
    let link16 = u16::try_from(link).map_err(|_| LinkError::CheckConfig {
        reason: "link index over 65535",
    })?;
    let ours = inner.lock().hello(link16);
    let frame = Frame::new(FrameKind::Hello, 0, 0, ours.to_payload());
    let mut out = BytesMut::new();
    codec
        .encode(&frame, &mut out)
        .map_err(|source| LinkError::Encode { source })?;
    let exchange = async {
        wr.write_all(&out)
            .await
            .map_err(|source| LinkError::Write { source })?;
        wr.flush()
            .await
            .map_err(|source| LinkError::Write { source })?;
        loop {
            if let Some(frame) = codec
                .decode(buf)
                .map_err(|source| LinkError::Decode { source })?
            {
                return Ok(frame);
            }
            buf.reserve(codec.needed(buf).max(HEADER_LEN));
            let read = rd
                .read_buf(buf)
                .await
                .map_err(|source| LinkError::Read { source })?;
            if read == 0 {
                return Err(LinkError::Closed);
            }
        }
    };
    let frame = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| LinkError::Handshake {
            link,
            reason: format!("no hello within {timeout:?}"),
        })??;
    if frame.kind != FrameKind::Hello || frame.stream != 0 {
        return Err(LinkError::Handshake {
            link,
            reason: format!("first frame is {:?}, not Hello", frame.kind),
        });
    }
    let hello =
        Hello::from_payload(&frame.payload).map_err(|source| LinkError::Decode { source })?;
    if usize::from(hello.link) != link {
        return Err(LinkError::Handshake {
            link,
            reason: format!("peer says this is link {}", hello.link),
        });
    }
    Ok(hello)
}

/// The receiving half of a running connection.
struct Reader<'a> {
    inner: &'a Arc<Inner>,
    link: usize,
    conn: u64,
    counters: &'a LinkCounters,
    codec: FrameCodec,
    buf: RecvBuffers,
}

/// Receive buffers that recycle their allocations.
///
/// Decoded payloads are handed to the application as slices of the buffer they were read
/// into, so a buffer cannot be reused while any of them lives. Filled buffers are kept as
/// spares (up to [`RECV_SPARES`]); when the active one is full, the oldest spare whose
/// payloads have all been dropped is reclaimed, and only if none is free is a fresh one
/// allocated. Fresh allocations cost a page fault per page, which showed as ~10-15 % of
/// the receiver's CPU in perf.
struct RecvBuffers {
    active: BytesMut,
    spares: VecDeque<BytesMut>,
    size: usize,
}

impl RecvBuffers {
    fn new(size: usize, leftover: &[u8]) -> Self {
        let mut active = BytesMut::with_capacity(size);
        active.extend_from_slice(leftover);
        Self {
            active,
            spares: VecDeque::new(),
            size,
        }
    }

    /// Ensures room for `need` more bytes after the buffered ones.
    fn make_room(&mut self, need: usize) {
        if self.active.capacity() - self.active.len() >= need {
            return;
        }
        let want = self.size.max(need + self.active.len());
        let reclaimed = self
            .spares
            .iter_mut()
            .position(|spare| spare.try_reclaim(want));
        let mut next = match reclaimed.and_then(|index| self.spares.remove(index)) {
            Some(spare) => spare,
            None => {
                if self.spares.len() >= RECV_SPARES {
                    // Still referenced by unread payloads; it is freed when they are.
                    self.spares.pop_front();
                }
                BytesMut::with_capacity(want)
            }
        };
        next.extend_from_slice(&self.active);
        self.active.clear();
        let full = std::mem::replace(&mut self.active, next);
        self.spares.push_back(full);
    }
}

impl Reader<'_> {
    async fn run(
        mut self,
        rd: &mut ReadHalf,
        stop: &Notify,
        writer: &mut JoinHandle<Result<(), LinkError>>,
    ) -> Result<(), LinkError> {
        let timeout = self.inner.config.link_timeout;
        let mut deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.process()? {
                // Let the application read what was delivered before reading more: its
                // promptness is what lets `RecvBuffers` reuse memory.
                tokio::task::yield_now().await;
            }
            let need = READ_CHUNK.max(self.codec.needed(&self.buf.active));
            self.buf.make_room(need);
            tokio::select! {
                biased;
                () = stop.notified() => return Err(LinkError::Stopped),
                ended = &mut *writer => {
                    return match ended {
                        Ok(Err(error)) => Err(error),
                        _ => Err(LinkError::Stopped),
                    };
                }
                read = rd.read_buf(&mut self.buf.active) => {
                    let read = read.map_err(|source| LinkError::Read { source })?;
                    if read == 0 {
                        self.codec.decode_eof(&mut self.buf.active).map_err(|source| LinkError::Decode { source })?;
                        return Err(LinkError::Closed);
                    }
                    LinkCounters::add(&self.counters.bytes_received, read);
                    deadline = tokio::time::Instant::now() + timeout;
                }
                () = tokio::time::sleep_until(deadline) => return Err(LinkError::Silence { timeout }),
            }
        }
    }

    /// Decodes every whole frame in the buffer and hands them to the session in one lock.
    /// Returns whether any frame was decoded.
    fn process(&mut self) -> Result<bool, LinkError> {
        let mut frames = Vec::new();
        while let Some(frame) = self
            .codec
            .decode(&mut self.buf.active)
            .map_err(|source| LinkError::Decode { source })?
        {
            frames.push(frame);
        }
        if frames.is_empty() {
            return Ok(false);
        }
        LinkCounters::add(&self.counters.frames_received, frames.len());
        let mut session = self.inner.lock();
        if !session.is_current(self.link, self.conn) {
            return Err(LinkError::Stopped);
        }
        for frame in frames {
            if frame.kind == FrameKind::Pong {
                let rtt = self.inner.micros().saturating_sub(frame.seq).max(1);
                self.counters.rtt_us.store(rtt, Ordering::Relaxed);
                continue;
            }
            session
                .on_frame(self.link, frame)
                .map_err(|source| LinkError::Protocol { source })?;
        }
        session.flush_ack(self.link);
        Ok(true)
    }
}

/// The sending half of a running connection: drains the queue, sends keepalives.
struct Writer {
    inner: Arc<Inner>,
    counters: Arc<LinkCounters>,
    queued: Arc<AtomicUsize>,
    rx: mpsc::UnboundedReceiver<Outgoing>,
}

impl Writer {
    async fn run(mut self, mut wr: WriteHalf) -> Result<(), LinkError> {
        let mut ping = tokio::time::interval(self.inner.config.keepalive_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch: Vec<Outgoing> = Vec::with_capacity(WRITE_BATCH_FRAMES);
        let mut chunks: VecDeque<Bytes> = VecDeque::with_capacity(2 * WRITE_BATCH_FRAMES);
        loop {
            tokio::select! {
                biased;
                _ = ping.tick() => {
                    let frame = Frame::new(FrameKind::Ping, 0, self.inner.micros(), Bytes::new());
                    batch.push(Outgoing { frame, cost: 0 });
                }
                next = self.rx.recv() => match next {
                    Some(outgoing) => batch.push(outgoing),
                    None => return Ok(()),
                },
            }
            let mut bytes = 0usize;
            while batch.len() < WRITE_BATCH_FRAMES && bytes < WRITE_BATCH_BYTES {
                match self.rx.try_recv() {
                    Ok(outgoing) => {
                        bytes += outgoing.frame.payload.len();
                        batch.push(outgoing);
                    }
                    Err(_) => break,
                }
            }
            let frames = batch.len();
            let (total, cost) = encode_batch(&mut batch, &mut chunks)?;
            write_chunks(&mut wr, &mut chunks)
                .await
                .map_err(|source| LinkError::Write { source })?;
            // TLS may hold the batch's last record until flushed; plain TCP holds nothing.
            wr.flush()
                .await
                .map_err(|source| LinkError::Write { source })?;
            self.queued.fetch_sub(cost, Ordering::Relaxed);
            LinkCounters::add(&self.counters.bytes_sent, total);
            LinkCounters::add(&self.counters.frames_sent, frames);
        }
    }
}

/// Turns a batch of frames into header and payload chunks; returns (bytes, queued cost).
fn encode_batch(
    batch: &mut Vec<Outgoing>,
    chunks: &mut VecDeque<Bytes>,
) -> Result<(usize, usize), LinkError> {
    let mut headers = BytesMut::with_capacity(batch.len() * HEADER_LEN);
    for outgoing in batch.iter() {
        let header = outgoing
            .frame
            .header()
            .map_err(|source| LinkError::Encode { source })?;
        headers.extend_from_slice(&header);
    }
    let mut total = 0usize;
    let mut cost = 0usize;
    for outgoing in batch.drain(..) {
        chunks.push_back(headers.split_to(HEADER_LEN).freeze());
        total += HEADER_LEN + outgoing.frame.payload.len();
        cost += outgoing.cost;
        if !outgoing.frame.payload.is_empty() {
            chunks.push_back(outgoing.frame.payload);
        }
    }
    Ok((total, cost))
}

/// Writes every chunk with vectored writes.
async fn write_chunks(wr: &mut WriteHalf, chunks: &mut VecDeque<Bytes>) -> std::io::Result<()> {
    while !chunks.is_empty() {
        let written = {
            let slices: Vec<IoSlice<'_>> = chunks
                .iter()
                .take(128)
                .map(|chunk| IoSlice::new(chunk))
                .collect();
            wr.write_vectored(&slices).await?
        };
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut left = written;
        while left > 0 {
            let Some(front) = chunks.front_mut() else {
                break;
            };
            if front.len() <= left {
                left -= front.len();
                chunks.pop_front();
            } else {
                bytes::Buf::advance(front, left);
                left = 0;
            }
        }
    }
    Ok(())
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
