//! Session core: sequencing, acknowledgement, resend, dedupe and stream flow control — no I/O.
//!
//! The link tasks (`crate::link`) feed decoded frames in and carry [`Outgoing`] frames out
//! through per-connection queues; the stream handles (`crate::stream`) call in to send and
//! receive. Everything here runs under one mutex, held briefly.
//!
//! # Protocol
//!
//! Sequenced frames (`Open`, `Data`, `Close`) of all streams share one session sequence
//! space. Each is kept in the unacked queue, together with the link it went out on, until a
//! cumulative `Ack` covers it. The receiver delivers sequenced frames strictly in sequence
//! order (so a stream's `Open` always precedes its data), buffers frames that arrive ahead of
//! a gap, and drops any it has seen (dedupe by sequence).
//!
//! ```text
//!  A (sender)                      link 1            link 2                 B (receiver)
//!    Data seq 7  ───────────────────►X (link 1 dies, 7 lost)
//!    Data seq 8  ─────────────────────────────────────►  buffered: 8 is ahead of gap 7
//!    … no frame or ping on link 1 for link_timeout: link 1 down
//!    resend 7 (RESENT) ───────────────────────────────►  deliver 7, 8; Ack 9
//!    ◄────────────────────────────────────────────────── Ack 9: 7, 8 leave the unacked queue
//! ```
//!
//! Flow control is per stream: the receiver grants `stream_window` bytes beyond what its
//! application has consumed and reports the consumed total in `Credit` frames (cumulative,
//! so a `Credit` lost with a link is repaired by the next one). The sender also keeps at most
//! the peer's `session_window` bytes unacknowledged, which bounds the receiver's reorder
//! buffer. A peer that exceeds either limit is a protocol error: the link is dropped.
//!
//! A session is bound to the peer's (instance, generation) from its `Hello`. When the last
//! link goes down every stream fails with `PeerUnreachable` and the local generation moves
//! on; a `Hello` with a different peer identity fails every stream with `PeerReset`. Either
//! way both sides restart the sequence space at 0, so no frame crosses session generations.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};

use crate::frame::{Flags, Frame, FrameKind, Hello, ResetReason};
use crate::stats::{EndpointStats, LinkCounters, LinkState, StreamStats};
use crate::stream::StreamError;

/// Accounting cost of a frame beyond its payload, so that empty frames are not free.
pub(crate) const FRAME_COST: usize = 64;
/// Longest service name.
pub(crate) const MAX_NAME_LEN: usize = 255;

/// Protocol violations by the peer. Any of them drops the link it came in on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// An `Ack` acknowledged frames that were never sent.
    #[error("accepting ack {ack}: only {sent} frames were sent")]
    AcceptAck {
        /// Acknowledged sequence.
        ack: u64,
        /// Next sequence this side would send.
        sent: u64,
    },
    /// A `Credit` reported more bytes consumed than were sent on the stream.
    #[error("accepting credit for stream {stream}: {consumed} consumed but {sent} sent")]
    AcceptCredit {
        /// Stream id.
        stream: u32,
        /// Consumed total reported.
        consumed: u64,
        /// Bytes sent on the stream.
        sent: u64,
    },
    /// A control frame of a kind the session does not take (`Hello` after the handshake).
    #[error("accepting frame: unexpected {kind:?}")]
    AcceptKind {
        /// Kind received.
        kind: FrameKind,
    },
    /// Data or `Close` arrived after the stream's `Close`.
    #[error("delivering to stream {stream}: data after close")]
    DeliverAfterClose {
        /// Stream id.
        stream: u32,
    },
    /// Stream data beyond the credit this side granted.
    #[error("delivering to stream {stream}: {received} bytes received exceed credit {allowed}")]
    DeliverCredit {
        /// Stream id.
        stream: u32,
        /// Bytes received on the stream including this frame.
        received: u64,
        /// Bytes the peer was allowed to send.
        allowed: u64,
    },
    /// An `Open` for an id this side allocates, or one already open, or a bad name.
    #[error("opening stream {stream}: invalid id or name")]
    OpenStream {
        /// Stream id.
        stream: u32,
    },
    /// Frames ahead of a gap exceed the session window.
    #[error("buffering frame {seq} ahead of {expected}: reorder buffer over {window} bytes")]
    ReorderWindow {
        /// Sequence of the frame.
        seq: u64,
        /// Sequence expected next.
        expected: u64,
        /// Session window in bytes.
        window: usize,
    },
    /// A `Reset` payload could not be decoded.
    #[error("accepting reset for stream {stream}")]
    ResetPayload {
        /// Stream id.
        stream: u32,
        /// Why decoding failed.
        #[source]
        source: crate::frame::FrameError,
    },
}

/// Which side of the link set this is; decides stream id parity and who dials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Listens on every link address; allocates even stream ids.
    Listen,
    /// Dials every link address; allocates odd stream ids.
    Connect,
}

/// Receive limits one side announces in its `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub session_window: usize,
    pub stream_window: usize,
    pub max_payload: usize,
}

impl Limits {
    fn from_hello(hello: &Hello) -> Self {
        let to_usize = |v: u32| usize::try_from(v).unwrap_or(usize::MAX);
        Self {
            session_window: to_usize(hello.session_window),
            stream_window: to_usize(hello.stream_window),
            max_payload: to_usize(hello.max_payload),
        }
    }
}

/// A session endpoint's identity as carried in `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    pub instance: u64,
    pub generation: u64,
}

/// A frame queued for a link writer, with its accounting cost.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub frame: Frame,
    pub cost: usize,
}

/// A registered connection of a link.
#[derive(Debug)]
pub(crate) struct Conn {
    pub id: u64,
    pub tx: mpsc::UnboundedSender<Outgoing>,
    pub stop: Arc<Notify>,
}

/// State of one stream shared between the session and the stream handles.
#[derive(Debug)]
pub(crate) struct StreamShared {
    pub id: u32,
    pub service: String,
    pub tx_wake: Notify,
    pub rx_wake: Notify,
    pub error: OnceLock<StreamError>,
}

impl StreamShared {
    fn fail(&self, error: StreamError) {
        // The first failure wins; later ones add nothing.
        let _already = self.error.set(error);
        self.tx_wake.notify_one();
        self.rx_wake.notify_one();
    }
}

#[derive(Debug)]
struct StreamEntry {
    shared: Arc<StreamShared>,
    // Send side.
    sent: u64,
    peer_consumed: u64,
    local_fin: bool,
    tx_dropped: bool,
    tx_waiting: bool,
    // Receive side.
    rx: VecDeque<Bytes>,
    rx_bytes: usize,
    received: u64,
    consumed: u64,
    credit_sent: u64,
    remote_fin: bool,
    rx_dropped: bool,
}

impl StreamEntry {
    fn new(shared: Arc<StreamShared>) -> Self {
        Self {
            shared,
            sent: 0,
            peer_consumed: 0,
            local_fin: false,
            tx_dropped: false,
            tx_waiting: false,
            rx: VecDeque::new(),
            rx_bytes: 0,
            received: 0,
            consumed: 0,
            credit_sent: 0,
            remote_fin: false,
            rx_dropped: false,
        }
    }

    fn finished(&self) -> bool {
        (self.local_fin || self.tx_dropped)
            && ((self.remote_fin && self.rx.is_empty()) || self.rx_dropped)
    }
}

#[derive(Debug)]
struct Sent {
    frame: Frame,
    link: usize,
    cost: usize,
}

#[derive(Debug)]
struct LinkSlot {
    conn: Option<Conn>,
    counters: Arc<LinkCounters>,
}

/// Result of a receive attempt on a stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Received {
    /// Bytes in order.
    Data(Bytes),
    /// The peer finished the stream and everything was read.
    Fin,
    /// Nothing yet; wait on `rx_wake`.
    Empty,
}

/// Tunables of the session.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionConfig {
    pub role: Role,
    pub limits: Limits,
    pub max_streams: usize,
    pub accept_backlog: usize,
}

/// The session state; see the module doc.
#[derive(Debug)]
pub(crate) struct Session {
    cfg: SessionConfig,
    me: Identity,
    peer: Option<Identity>,
    peer_limits: Limits,
    links: Vec<LinkSlot>,
    next_seq: u64,
    unacked: VecDeque<Sent>,
    unacked_bytes: usize,
    expected: u64,
    ack_sent: u64,
    reorder: BTreeMap<u64, (Frame, usize)>,
    reorder_bytes: usize,
    duplicates: u64,
    streams: HashMap<u32, StreamEntry>,
    next_stream: u32,
    services: HashMap<String, mpsc::Sender<Arc<StreamShared>>>,
    up_wake: Arc<Notify>,
    shut_down: bool,
}

fn random_u64() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    hasher.finish()
}

impl Session {
    pub(crate) fn new(cfg: SessionConfig, links: usize) -> Self {
        let links = (0..links)
            .map(|_| LinkSlot {
                conn: None,
                counters: Arc::new(LinkCounters::default()),
            })
            .collect();
        Self {
            cfg,
            me: Identity {
                instance: random_u64(),
                generation: 1,
            },
            peer: None,
            peer_limits: cfg.limits,
            links,
            next_seq: 0,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            expected: 0,
            ack_sent: 0,
            reorder: BTreeMap::new(),
            reorder_bytes: 0,
            duplicates: 0,
            streams: HashMap::new(),
            next_stream: if cfg.role == Role::Connect { 1 } else { 2 },
            services: HashMap::new(),
            up_wake: Arc::new(Notify::new()),
            shut_down: false,
        }
    }

    /// The `Hello` this side sends on link `link`.
    pub(crate) fn hello(&self, link: u16) -> Hello {
        let to_u32 = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        Hello {
            instance: self.me.instance,
            generation: self.me.generation,
            link,
            session_window: to_u32(self.cfg.limits.session_window),
            stream_window: to_u32(self.cfg.limits.stream_window),
            max_payload: to_u32(self.cfg.limits.max_payload),
        }
    }

    pub(crate) fn counters(&self, link: usize) -> Option<Arc<LinkCounters>> {
        self.links.get(link).map(|slot| Arc::clone(&slot.counters))
    }

    pub(crate) fn up_wake(&self) -> Arc<Notify> {
        Arc::clone(&self.up_wake)
    }

    pub(crate) fn any_link_up(&self) -> bool {
        self.links.iter().any(|slot| slot.conn.is_some())
    }

    pub(crate) fn is_shut_down(&self) -> bool {
        self.shut_down
    }

    /// Largest data chunk a stream may put in one frame.
    pub(crate) fn chunk_limit(&self, wanted: usize) -> usize {
        let limits = self.peer_limits;
        let by_window = limits.stream_window / 2;
        let by_session = limits.session_window.saturating_sub(FRAME_COST) / 2;
        wanted
            .min(limits.max_payload)
            .min(self.cfg.limits.max_payload)
            .min(by_window)
            .min(by_session)
            .max(1)
    }

    // ---- links ---------------------------------------------------------------------------

    /// Registers a connection whose peer sent `hello`. Returns the stop signals of
    /// connections that must close because the peer's session changed.
    pub(crate) fn link_up(&mut self, link: usize, conn: Conn, hello: &Hello) -> Vec<Arc<Notify>> {
        let peer = Identity {
            instance: hello.instance,
            generation: hello.generation,
        };
        let mut stops = Vec::new();
        if self.peer.is_some_and(|bound| bound != peer) {
            info!(link, "peer session changed: begin reset of the session");
            for (index, slot) in self.links.iter_mut().enumerate() {
                if let Some(old) = slot.conn.take() {
                    slot.counters.set_state(LinkState::Down);
                    slot.counters.downs.fetch_add(1, Ordering::Relaxed);
                    debug!(
                        link = index,
                        conn = old.id,
                        "closing connection of the old peer session"
                    );
                    stops.push(old.stop);
                }
            }
            let failed = self.reset_session(&StreamError::PeerReset);
            info!(
                link,
                failed_streams = failed,
                "peer session changed: reset done"
            );
        }
        if self.peer.is_none() {
            self.peer = Some(peer);
            self.peer_limits = Limits::from_hello(hello);
            info!(
                link,
                peer_instance = peer.instance,
                peer_generation = peer.generation,
                "peer session bound"
            );
        }
        let Some(slot) = self.links.get_mut(link) else {
            return stops;
        };
        let replaced = slot.conn.replace(conn);
        slot.counters.set_state(LinkState::Up);
        slot.counters.ups.fetch_add(1, Ordering::Relaxed);
        info!(link, "link up");
        if let Some(old) = replaced {
            stops.push(old.stop);
            self.resend_from(link);
        }
        self.up_wake.notify_waiters();
        self.wake_blocked_senders();
        stops
    }

    /// Removes connection `conn` of `link` after it failed; resends its unacknowledged frames
    /// on the surviving links, or fails every stream when none is left.
    pub(crate) fn link_down(&mut self, link: usize, conn: u64, reason: &str) {
        let Some(slot) = self.links.get_mut(link) else {
            return;
        };
        if slot.conn.as_ref().is_none_or(|current| current.id != conn) {
            return;
        }
        slot.conn = None;
        slot.counters.set_state(LinkState::Down);
        slot.counters.downs.fetch_add(1, Ordering::Relaxed);
        warn!(link, reason, "link down");
        if self.any_link_up() {
            self.resend_from(link);
        } else if self.peer.is_some() {
            info!(
                streams = self.streams.len(),
                "every link is down: begin failing streams (peer unreachable)"
            );
            let failed = self.reset_session(&StreamError::PeerUnreachable);
            self.me.generation += 1;
            info!(
                failed_streams = failed,
                generation = self.me.generation,
                "every link is down: streams failed"
            );
        }
    }

    /// Resends every unacked frame last sent on `link` on the least loaded other link,
    /// then repeats the current ack and stream credits.
    fn resend_from(&mut self, link: usize) {
        let pending = self.unacked.iter().filter(|sent| sent.link == link).count();
        info!(
            from_link = link,
            frames = pending,
            "begin resend of unacknowledged frames"
        );
        let mut resent = 0usize;
        for index in 0..self.unacked.len() {
            if self.unacked[index].link != link {
                continue;
            }
            let Some(target) = self.pick_link() else {
                break;
            };
            let sent = &mut self.unacked[index];
            sent.link = target;
            sent.frame.flags = sent.frame.flags.with(Flags::RESENT);
            let outgoing = Outgoing {
                frame: sent.frame.clone(),
                cost: sent.cost,
            };
            push(&self.links, target, outgoing);
            resent += 1;
        }
        if let Some(slot) = self.links.get(link) {
            LinkCounters::add(&slot.counters.retransmits, resent);
        }
        self.send_control(None, FrameKind::Ack, 0, self.expected, Bytes::new());
        self.ack_sent = self.expected;
        let credits: Vec<(u32, u64)> = self
            .streams
            .iter()
            .map(|(id, entry)| (*id, entry.consumed))
            .collect();
        for (id, consumed) in credits {
            self.send_control(None, FrameKind::Credit, id, consumed, Bytes::new());
        }
        info!(from_link = link, frames = resent, "resend done");
    }

    /// The up link with the fewest queued bytes.
    fn pick_link(&self) -> Option<usize> {
        self.links
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.conn.is_some())
            .min_by_key(|(_, slot)| slot.counters.queued.load(Ordering::Relaxed))
            .map(|(index, _)| index)
    }

    /// Fails every stream with `error` and restarts the sequence space.
    fn reset_session(&mut self, error: &StreamError) -> usize {
        let failed = self.streams.len();
        for (_, entry) in self.streams.drain() {
            entry.shared.fail(error.clone());
        }
        self.peer = None;
        self.next_seq = 0;
        self.unacked.clear();
        self.unacked_bytes = 0;
        self.expected = 0;
        self.ack_sent = 0;
        self.reorder.clear();
        self.reorder_bytes = 0;
        failed
    }

    /// Closes every connection and fails every stream; the endpoint is going away.
    pub(crate) fn shutdown(&mut self) -> Vec<Arc<Notify>> {
        self.shut_down = true;
        let stops = self
            .links
            .iter_mut()
            .filter_map(|slot| slot.conn.take().map(|conn| conn.stop))
            .collect();
        self.reset_session(&StreamError::EndpointClosed);
        self.services.clear();
        stops
    }

    fn send_control(
        &self,
        link: Option<usize>,
        kind: FrameKind,
        stream: u32,
        seq: u64,
        payload: Bytes,
    ) {
        let target = link.filter(|index| self.links.get(*index).is_some_and(|s| s.conn.is_some()));
        if let Some(target) = target.or_else(|| self.pick_link()) {
            let cost = FRAME_COST + payload.len();
            push(
                &self.links,
                target,
                Outgoing {
                    frame: Frame::new(kind, stream, seq, payload),
                    cost,
                },
            );
        }
    }

    fn send_sequenced(&mut self, kind: FrameKind, stream: u32, payload: Bytes) {
        let Some(link) = self.pick_link() else {
            return;
        };
        let frame = Frame::new(kind, stream, self.next_seq, payload);
        self.next_seq += 1;
        let cost = frame.payload.len() + FRAME_COST;
        self.unacked_bytes += cost;
        self.unacked.push_back(Sent {
            frame: frame.clone(),
            link,
            cost,
        });
        push(&self.links, link, Outgoing { frame, cost });
    }

    // ---- receive path ----------------------------------------------------------------------

    /// Whether `conn` is still the registered connection of `link`.
    pub(crate) fn is_current(&self, link: usize, conn: u64) -> bool {
        self.links
            .get(link)
            .and_then(|slot| slot.conn.as_ref())
            .is_some_and(|c| c.id == conn)
    }

    /// Takes one frame received on `link`.
    ///
    /// # Errors
    /// A [`ProtocolError`] when the peer broke the protocol; the caller drops the link.
    pub(crate) fn on_frame(&mut self, link: usize, frame: Frame) -> Result<(), ProtocolError> {
        match frame.kind {
            FrameKind::Open | FrameKind::Data | FrameKind::Close => self.on_sequenced(frame),
            FrameKind::Ack => self.on_ack(frame.seq),
            FrameKind::Credit => self.on_credit(frame.stream, frame.seq),
            FrameKind::Reset => self.on_reset(frame.stream, &frame.payload),
            FrameKind::Ping => {
                self.send_control(Some(link), FrameKind::Pong, 0, frame.seq, Bytes::new());
                Ok(())
            }
            FrameKind::Pong => Ok(()),
            FrameKind::Hello | FrameKind::Invalid => {
                Err(ProtocolError::AcceptKind { kind: frame.kind })
            }
        }
    }

    /// Sends a cumulative ack on `link` if frames were delivered since the last one.
    pub(crate) fn flush_ack(&mut self, link: usize) {
        if self.expected != self.ack_sent {
            self.ack_sent = self.expected;
            self.send_control(Some(link), FrameKind::Ack, 0, self.expected, Bytes::new());
        }
    }

    fn on_sequenced(&mut self, frame: Frame) -> Result<(), ProtocolError> {
        let seq = frame.seq;
        if seq < self.expected || self.reorder.contains_key(&seq) {
            self.duplicates += 1;
            self.ack_sent = u64::MAX;
            return Ok(());
        }
        if seq > self.expected {
            let cost = frame.payload.len() + FRAME_COST;
            let window = self.cfg.limits.session_window;
            if self.reorder_bytes + cost > window {
                return Err(ProtocolError::ReorderWindow {
                    seq,
                    expected: self.expected,
                    window,
                });
            }
            self.reorder_bytes += cost;
            self.reorder.insert(seq, (frame, cost));
            return Ok(());
        }
        self.deliver(frame)?;
        self.expected += 1;
        while let Some((next, cost)) = self.reorder.remove(&self.expected) {
            self.reorder_bytes -= cost;
            self.deliver(next)?;
            self.expected += 1;
        }
        Ok(())
    }

    fn deliver(&mut self, frame: Frame) -> Result<(), ProtocolError> {
        match frame.kind {
            FrameKind::Open => self.deliver_open(frame.stream, &frame.payload),
            FrameKind::Data => self.deliver_data(frame.stream, frame.payload),
            FrameKind::Close => self.deliver_close(frame.stream),
            kind => Err(ProtocolError::AcceptKind { kind }),
        }
    }

    fn is_peer_id(&self, id: u32) -> bool {
        let mine_odd = self.cfg.role == Role::Connect;
        id != 0 && (id % 2 == 1) != mine_odd
    }

    fn deliver_open(&mut self, id: u32, name: &[u8]) -> Result<(), ProtocolError> {
        let service = std::str::from_utf8(name)
            .ok()
            .filter(|s| !s.is_empty() && s.len() <= MAX_NAME_LEN);
        let (Some(service), true, false) =
            (service, self.is_peer_id(id), self.streams.contains_key(&id))
        else {
            return Err(ProtocolError::OpenStream { stream: id });
        };
        if self.streams.len() >= self.cfg.max_streams {
            warn!(stream = id, service, "refusing stream: too many streams");
            self.send_control(
                None,
                FrameKind::Reset,
                id,
                0,
                ResetReason::TooManyStreams.payload(),
            );
            return Ok(());
        }
        let shared = Arc::new(StreamShared {
            id,
            service: service.to_owned(),
            tx_wake: Notify::new(),
            rx_wake: Notify::new(),
            error: OnceLock::new(),
        });
        let accepted = self
            .services
            .get(service)
            .is_some_and(|tx| tx.try_send(Arc::clone(&shared)).is_ok());
        if accepted {
            debug!(stream = id, service, "stream opened by peer");
            self.streams.insert(id, StreamEntry::new(shared));
        } else {
            warn!(
                stream = id,
                service, "refusing stream: no listener for the service or its backlog is full"
            );
            self.send_control(
                None,
                FrameKind::Reset,
                id,
                0,
                ResetReason::NoService.payload(),
            );
        }
        Ok(())
    }

    fn deliver_data(&mut self, id: u32, payload: Bytes) -> Result<(), ProtocolError> {
        let window = self.cfg.limits.stream_window;
        let Some(entry) = self.streams.get_mut(&id) else {
            self.send_control(
                None,
                FrameKind::Reset,
                id,
                0,
                ResetReason::UnknownStream.payload(),
            );
            return Ok(());
        };
        if entry.remote_fin {
            return Err(ProtocolError::DeliverAfterClose { stream: id });
        }
        let len = payload.len() as u64;
        let allowed = entry.consumed + window as u64;
        if entry.received + len > allowed {
            return Err(ProtocolError::DeliverCredit {
                stream: id,
                received: entry.received + len,
                allowed,
            });
        }
        entry.received += len;
        if entry.rx_dropped {
            entry.consumed += len;
            let consumed = entry.consumed;
            self.maybe_credit(id, consumed);
            return Ok(());
        }
        if !payload.is_empty() {
            entry.rx_bytes += payload.len();
            entry.rx.push_back(payload);
            entry.shared.rx_wake.notify_one();
        }
        Ok(())
    }

    fn deliver_close(&mut self, id: u32) -> Result<(), ProtocolError> {
        let Some(entry) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        if entry.remote_fin {
            return Err(ProtocolError::DeliverAfterClose { stream: id });
        }
        entry.remote_fin = true;
        entry.shared.rx_wake.notify_one();
        self.remove_if_finished(id);
        Ok(())
    }

    fn on_ack(&mut self, ack: u64) -> Result<(), ProtocolError> {
        if ack > self.next_seq {
            return Err(ProtocolError::AcceptAck {
                ack,
                sent: self.next_seq,
            });
        }
        let mut freed = false;
        while self
            .unacked
            .front()
            .is_some_and(|sent| sent.frame.seq < ack)
        {
            if let Some(sent) = self.unacked.pop_front() {
                self.unacked_bytes -= sent.cost;
                freed = true;
            }
        }
        if freed {
            self.wake_blocked_senders();
        }
        Ok(())
    }

    fn on_credit(&mut self, id: u32, consumed: u64) -> Result<(), ProtocolError> {
        let Some(entry) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        if consumed > entry.sent {
            return Err(ProtocolError::AcceptCredit {
                stream: id,
                consumed,
                sent: entry.sent,
            });
        }
        if consumed > entry.peer_consumed {
            entry.peer_consumed = consumed;
            entry.shared.tx_wake.notify_one();
        }
        Ok(())
    }

    fn on_reset(&mut self, id: u32, payload: &[u8]) -> Result<(), ProtocolError> {
        let reason = ResetReason::from_payload(payload)
            .map_err(|source| ProtocolError::ResetPayload { stream: id, source })?;
        if let Some(entry) = self.streams.remove(&id) {
            warn!(
                stream = id,
                service = entry.shared.service,
                ?reason,
                "stream reset by peer"
            );
            let error = match reason {
                ResetReason::NoService | ResetReason::TooManyStreams if entry.received == 0 => {
                    StreamError::OpenRefused {
                        service: entry.shared.service.clone(),
                        reason,
                    }
                }
                _ => StreamError::Reset { reason },
            };
            entry.shared.fail(error);
        }
        Ok(())
    }

    fn wake_blocked_senders(&mut self) {
        for entry in self.streams.values_mut() {
            if entry.tx_waiting {
                entry.tx_waiting = false;
                entry.shared.tx_wake.notify_one();
            }
        }
    }

    fn maybe_credit(&mut self, id: u32, consumed: u64) {
        let threshold = (self.cfg.limits.stream_window / 4) as u64;
        let Some(entry) = self.streams.get_mut(&id) else {
            return;
        };
        if consumed - entry.credit_sent >= threshold.max(1) {
            entry.credit_sent = consumed;
            self.send_control(None, FrameKind::Credit, id, consumed, Bytes::new());
        }
    }

    fn remove_if_finished(&mut self, id: u32) {
        if self.streams.get(&id).is_some_and(StreamEntry::finished) {
            self.streams.remove(&id);
            debug!(stream = id, "stream finished");
        }
    }

    // ---- stream handle operations ------------------------------------------------------------

    /// Registers a listener for `service`.
    pub(crate) fn listen(
        &mut self,
        service: &str,
    ) -> Result<mpsc::Receiver<Arc<StreamShared>>, StreamError> {
        if self.shut_down {
            return Err(StreamError::EndpointClosed);
        }
        check_name(service)?;
        if self.services.get(service).is_some_and(|tx| !tx.is_closed()) {
            return Err(StreamError::ListenTaken {
                service: service.to_owned(),
            });
        }
        let (tx, rx) = mpsc::channel(self.cfg.accept_backlog.max(1));
        self.services.insert(service.to_owned(), tx);
        Ok(rx)
    }

    /// Removes the listener of `service`.
    pub(crate) fn unlisten(&mut self, service: &str) {
        self.services.remove(service);
    }

    /// Opens a stream to `service` on the peer.
    pub(crate) fn open(&mut self, service: &str) -> Result<Arc<StreamShared>, StreamError> {
        if self.shut_down {
            return Err(StreamError::EndpointClosed);
        }
        check_name(service)?;
        if !self.any_link_up() || self.peer.is_none() {
            return Err(StreamError::PeerUnreachable);
        }
        let id = self.next_stream;
        // Ids keep their parity; 2^31 streams per endpoint lifetime is not a practical limit.
        self.next_stream = self.next_stream.wrapping_add(2).max(2 - id % 2);
        let shared = Arc::new(StreamShared {
            id,
            service: service.to_owned(),
            tx_wake: Notify::new(),
            rx_wake: Notify::new(),
            error: OnceLock::new(),
        });
        self.streams
            .insert(id, StreamEntry::new(Arc::clone(&shared)));
        self.send_sequenced(
            FrameKind::Open,
            id,
            Bytes::copy_from_slice(service.as_bytes()),
        );
        Ok(shared)
    }

    /// Queues `chunk` on stream `id` if the windows allow; `Ok(false)` means wait on `tx_wake`.
    pub(crate) fn try_send(
        &mut self,
        shared: &StreamShared,
        chunk: &Bytes,
    ) -> Result<bool, StreamError> {
        let id = shared.id;
        let any_up = self.any_link_up();
        let Some(entry) = self.streams.get_mut(&id) else {
            return Err(stream_gone(shared));
        };
        if entry.local_fin {
            return Err(StreamError::SendFinished);
        }
        let len = chunk.len() as u64;
        let stream_ok =
            entry.sent + len <= entry.peer_consumed + self.peer_limits.stream_window as u64;
        let cost = chunk.len() + FRAME_COST;
        let session_ok = self.unacked_bytes + cost <= self.peer_limits.session_window;
        if !(stream_ok && session_ok) {
            entry.tx_waiting = true;
            return Ok(false);
        }
        if !any_up {
            return Err(StreamError::PeerUnreachable);
        }
        entry.sent += len;
        self.send_sequenced(FrameKind::Data, id, chunk.clone());
        Ok(true)
    }

    /// Sends the stream's `Close` once.
    pub(crate) fn finish(&mut self, shared: &StreamShared) -> Result<(), StreamError> {
        let id = shared.id;
        let Some(entry) = self.streams.get_mut(&id) else {
            return Err(stream_gone(shared));
        };
        if entry.local_fin {
            return Ok(());
        }
        entry.local_fin = true;
        self.send_sequenced(FrameKind::Close, id, Bytes::new());
        self.remove_if_finished(id);
        Ok(())
    }

    /// Takes the next received bytes of stream `id`.
    pub(crate) fn try_recv(&mut self, shared: &StreamShared) -> Result<Received, StreamError> {
        let id = shared.id;
        let Some(entry) = self.streams.get_mut(&id) else {
            return match shared.error.get() {
                Some(error) => Err(error.clone()),
                None => Ok(Received::Fin),
            };
        };
        let Some(data) = entry.rx.pop_front() else {
            if entry.remote_fin {
                self.remove_if_finished(id);
                return Ok(Received::Fin);
            }
            return Ok(Received::Empty);
        };
        entry.rx_bytes -= data.len();
        entry.consumed += data.len() as u64;
        let consumed = entry.consumed;
        self.maybe_credit(id, consumed);
        Ok(Received::Data(data))
    }

    /// The application dropped the sending half: finish the stream.
    pub(crate) fn drop_tx(&mut self, shared: &StreamShared) {
        let id = shared.id;
        if let Some(entry) = self.streams.get_mut(&id) {
            entry.tx_dropped = true;
            if !entry.local_fin {
                entry.local_fin = true;
                self.send_sequenced(FrameKind::Close, id, Bytes::new());
            }
            self.remove_if_finished(id);
        }
    }

    /// The application dropped the receiving half: discard further data, tell the peer.
    pub(crate) fn drop_rx(&mut self, shared: &StreamShared) {
        let id = shared.id;
        let Some(entry) = self.streams.get_mut(&id) else {
            return;
        };
        entry.rx_dropped = true;
        let unread = entry.rx_bytes;
        entry.consumed += unread as u64;
        entry.rx.clear();
        entry.rx_bytes = 0;
        let abandoned = !entry.remote_fin;
        let consumed = entry.consumed;
        if abandoned {
            self.send_control(
                None,
                FrameKind::Reset,
                id,
                0,
                ResetReason::Abandoned.payload(),
            );
        }
        self.maybe_credit(id, consumed);
        self.remove_if_finished(id);
    }

    /// Snapshot for [`EndpointStats`].
    pub(crate) fn stats(&self) -> EndpointStats {
        let mut streams: Vec<StreamStats> = self
            .streams
            .iter()
            .map(|(id, entry)| StreamStats {
                id: *id,
                service: entry.shared.service.clone(),
                send_backlog_bytes: entry.sent - entry.peer_consumed,
                recv_backlog_bytes: entry.rx_bytes,
            })
            .collect();
        streams.sort_by_key(|stream| stream.id);
        EndpointStats {
            links: self
                .links
                .iter()
                .enumerate()
                .map(|(index, slot)| slot.counters.snapshot(index))
                .collect(),
            streams,
            peer_connected: self.peer.is_some() && self.any_link_up(),
            unacked_bytes: self.unacked_bytes,
            reorder_bytes: self.reorder_bytes,
            duplicates: self.duplicates,
        }
    }
}

fn push(links: &[LinkSlot], link: usize, outgoing: Outgoing) {
    if let Some(slot) = links.get(link)
        && let Some(conn) = &slot.conn
    {
        slot.counters
            .queued
            .fetch_add(outgoing.cost, Ordering::Relaxed);
        if let Err(mpsc::error::SendError(lost)) = conn.tx.send(outgoing) {
            // The writer is gone; the link is being torn down and resends what is unacked.
            slot.counters.queued.fetch_sub(lost.cost, Ordering::Relaxed);
        }
    }
}

fn stream_gone(shared: &StreamShared) -> StreamError {
    shared
        .error
        .get()
        .cloned()
        .unwrap_or(StreamError::SendFinished)
}

fn check_name(service: &str) -> Result<(), StreamError> {
    if service.is_empty() || service.len() > MAX_NAME_LEN {
        return Err(StreamError::OpenName { len: service.len() });
    }
    Ok(())
}
