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
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Cost of the frames queued for this connection's writer and not yet written.
    pub queued: Arc<AtomicUsize>,
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
    /// Where the next link choice starts looking (round-robin among equally loaded links).
    next_pick: std::cell::Cell<usize>,
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
            next_pick: std::cell::Cell::new(0),
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
    /// Ties (idle links) go round-robin, so that light traffic uses every link too.
    fn pick_link(&self) -> Option<usize> {
        let count = self.links.len();
        let start = self.next_pick.get();
        let picked = (0..count)
            .map(|step| (start + step) % count)
            .filter_map(|index| {
                let conn = self.links.get(index)?.conn.as_ref()?;
                Some((conn.queued.load(Ordering::Relaxed), index))
            })
            .min_by_key(|(queued, _)| *queued)
            .map(|(_, index)| index)?;
        self.next_pick.set(picked + 1);
        Some(picked)
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
            // Our ack may have been lost with a link: make the next flush repeat it.
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
                .map(|(index, slot)| {
                    let queued = slot
                        .conn
                        .as_ref()
                        .map_or(0, |conn| conn.queued.load(Ordering::Relaxed));
                    slot.counters.snapshot(index, queued)
                })
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
        conn.queued.fetch_add(outgoing.cost, Ordering::Relaxed);
        if let Err(mpsc::error::SendError(lost)) = conn.tx.send(outgoing) {
            // The writer is gone; the link is being torn down and resends what is unacked.
            conn.queued.fetch_sub(lost.cost, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc::UnboundedReceiver;

    use super::*;

    const WINDOW: usize = 64 * 1024;

    fn config(role: Role) -> SessionConfig {
        SessionConfig {
            role,
            limits: Limits {
                session_window: 4 * WINDOW,
                stream_window: WINDOW,
                max_payload: WINDOW,
            },
            max_streams: 4,
            accept_backlog: 4,
        }
    }

    /// Two sessions joined by `links` in-memory links (queues, no sockets).
    struct Pair {
        a: Session,
        b: Session,
        to_b: Vec<UnboundedReceiver<Outgoing>>,
        to_a: Vec<UnboundedReceiver<Outgoing>>,
        conn: u64,
    }

    impl Pair {
        fn new(links: usize) -> Self {
            let mut pair = Self {
                a: Session::new(config(Role::Connect), links),
                b: Session::new(config(Role::Listen), links),
                to_b: Vec::new(),
                to_a: Vec::new(),
                conn: 0,
            };
            for link in 0..links {
                let (to_b, to_a) = pair.connect(link);
                pair.to_b.push(to_b);
                pair.to_a.push(to_a);
            }
            pair
        }

        /// Brings `link` up on both sides; returns the queues (A→B, B→A).
        fn connect(
            &mut self,
            link: usize,
        ) -> (UnboundedReceiver<Outgoing>, UnboundedReceiver<Outgoing>) {
            let link16 = u16::try_from(link).unwrap();
            let (hello_a, hello_b) = (self.a.hello(link16), self.b.hello(link16));
            let (tx_a, rx_a) = mpsc::unbounded_channel();
            let (tx_b, rx_b) = mpsc::unbounded_channel();
            self.conn += 1;
            self.a.link_up(link, conn(self.conn, tx_a), &hello_b);
            self.b.link_up(link, conn(self.conn, tx_b), &hello_a);
            (rx_a, rx_b)
        }

        /// Frames queued by A on `link`, taken off the queue.
        fn take_a(&mut self, link: usize) -> Vec<Frame> {
            drain(&mut self.to_b[link])
        }

        /// Feeds everything A queued on `link` to B, then lets B ack.
        fn a_to_b(&mut self, link: usize) -> Result<(), ProtocolError> {
            let frames = self.take_a(link);
            feed(&mut self.b, link, frames)
        }

        /// Feeds everything B queued on `link` to A.
        fn b_to_a(&mut self, link: usize) -> Result<(), ProtocolError> {
            let frames = drain(&mut self.to_a[link]);
            feed(&mut self.a, link, frames)
        }

        /// Moves frames both ways on every link until nothing is queued.
        fn settle(&mut self) -> Result<(), ProtocolError> {
            for _ in 0..8 {
                for link in 0..self.to_b.len() {
                    self.a_to_b(link)?;
                    self.b_to_a(link)?;
                }
            }
            Ok(())
        }

        /// Opens a stream from A and accepts it on B.
        fn stream(&mut self) -> (Arc<StreamShared>, Arc<StreamShared>) {
            let mut incoming = self.b.listen("svc").unwrap();
            let opened = self.a.open("svc").unwrap();
            self.settle().unwrap();
            (opened, incoming.try_recv().unwrap())
        }
    }

    fn conn(id: u64, tx: mpsc::UnboundedSender<Outgoing>) -> Conn {
        Conn {
            id,
            tx,
            stop: Arc::new(Notify::new()),
            queued: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn drain(queue: &mut UnboundedReceiver<Outgoing>) -> Vec<Frame> {
        std::iter::from_fn(|| queue.try_recv().ok())
            .map(|outgoing| outgoing.frame)
            .collect()
    }

    fn feed(session: &mut Session, link: usize, frames: Vec<Frame>) -> Result<(), ProtocolError> {
        for frame in frames {
            session.on_frame(link, frame)?;
        }
        session.flush_ack(link);
        Ok(())
    }

    fn recv_all(session: &mut Session, shared: &StreamShared) -> Vec<u8> {
        let mut out = Vec::new();
        while let Ok(Received::Data(data)) = session.try_recv(shared) {
            out.extend_from_slice(&data);
        }
        out
    }

    fn open_many(session: &mut Session, count: usize) -> Vec<Arc<StreamShared>> {
        (0..count).map(|_| session.open("svc").unwrap()).collect()
    }

    fn data(byte: u8, len: usize) -> Bytes {
        Bytes::from(vec![byte; len])
    }

    #[test]
    fn try_send_in_order_delivers_bytes_to_peer_stream() {
        // Arrange
        let mut pair = Pair::new(1);
        let (tx, rx) = pair.stream();
        // Act
        pair.a.try_send(&tx, &Bytes::from_static(b"hello")).unwrap();
        pair.settle().unwrap();
        // Assert
        assert_eq!(
            pair.b.try_recv(&rx),
            Ok(Received::Data(Bytes::from_static(b"hello")))
        );
    }

    #[test]
    fn on_frame_reordered_across_links_delivers_in_order() {
        // Arrange
        let mut pair = Pair::new(2);
        let (tx, rx) = pair.stream();
        pair.a.try_send(&tx, &data(1, 100)).unwrap();
        pair.a.try_send(&tx, &data(2, 100)).unwrap();
        // Act: link 1 overtakes link 0.
        pair.a_to_b(1).unwrap();
        pair.a_to_b(0).unwrap();
        // Assert
        assert_eq!(
            recv_all(&mut pair.b, &rx),
            [vec![1u8; 100], vec![2u8; 100]].concat()
        );
    }

    #[test]
    fn on_frame_duplicate_sequence_is_dropped_once_counted() {
        // Arrange
        let mut pair = Pair::new(1);
        let (tx, rx) = pair.stream();
        pair.a.try_send(&tx, &data(7, 10)).unwrap();
        let frames = pair.take_a(0);
        // Act
        feed(&mut pair.b, 0, frames.clone()).unwrap();
        feed(&mut pair.b, 0, frames).unwrap();
        // Assert
        assert_eq!(recv_all(&mut pair.b, &rx), vec![7u8; 10]);
        assert_eq!(pair.b.stats().duplicates, 1);
    }

    #[test]
    fn link_down_resends_unacked_frames_on_survivor_exactly_once() {
        // Arrange
        let mut pair = Pair::new(2);
        let (tx, rx) = pair.stream();
        pair.a.try_send(&tx, &data(3, 100)).unwrap();
        pair.a.try_send(&tx, &data(4, 100)).unwrap();
        let lost_on_link0 = pair.take_a(0);
        // Act
        pair.a.link_down(0, 1, "test");
        let resent = pair.take_a(1);
        feed(&mut pair.b, 1, resent.clone()).unwrap();
        // Assert
        assert_eq!(lost_on_link0.len(), 1);
        assert!(
            resent
                .iter()
                .any(|frame| frame.flags.contains(Flags::RESENT))
        );
        assert_eq!(
            recv_all(&mut pair.b, &rx),
            [vec![3u8; 100], vec![4u8; 100]].concat()
        );
    }

    #[test]
    fn link_down_counts_retransmits_on_failed_link() {
        // Arrange
        let mut pair = Pair::new(2);
        let (tx, _rx) = pair.stream();
        pair.a.try_send(&tx, &data(3, 100)).unwrap();
        pair.a.try_send(&tx, &data(4, 100)).unwrap();
        // Act
        pair.a.link_down(0, 1, "test");
        // Assert
        assert_eq!(pair.a.stats().links[0].retransmits, 1);
    }

    #[test]
    fn link_down_last_link_fails_streams_with_peer_unreachable() {
        // Arrange
        let mut pair = Pair::new(1);
        let (tx, _rx) = pair.stream();
        // Act
        pair.a.link_down(0, 1, "test");
        // Assert
        assert_eq!(tx.error.get(), Some(&StreamError::PeerUnreachable));
        assert_eq!(
            pair.a.open("svc").unwrap_err(),
            StreamError::PeerUnreachable
        );
    }

    #[test]
    fn link_down_stale_connection_id_changes_nothing() {
        // Arrange
        let mut pair = Pair::new(1);
        let (tx, _rx) = pair.stream();
        // Act
        pair.a.link_down(0, 99, "test");
        // Assert
        assert_eq!(tx.error.get(), None);
        assert!(pair.a.any_link_up());
    }

    #[test]
    fn link_up_new_peer_generation_fails_streams_with_peer_reset() {
        // Arrange
        let mut pair = Pair::new(1);
        let (_tx, rx) = pair.stream();
        let mut hello = pair.a.hello(0);
        hello.generation += 1;
        let (queue, _keep) = mpsc::unbounded_channel();
        // Act
        let stops = pair.b.link_up(0, conn(50, queue), &hello);
        // Assert
        assert_eq!(rx.error.get(), Some(&StreamError::PeerReset));
        assert_eq!(stops.len(), 1);
    }

    #[test]
    fn try_send_beyond_stream_window_waits() {
        // Arrange
        let mut pair = Pair::new(1);
        let (tx, _rx) = pair.stream();
        pair.a.try_send(&tx, &data(1, WINDOW)).unwrap();
        // Act
        let queued = pair.a.try_send(&tx, &data(2, 1));
        // Assert
        assert_eq!(queued, Ok(false));
    }

    #[test]
    fn try_recv_consumed_window_sends_credit_that_unblocks_sender() {
        // Arrange
        let mut pair = Pair::new(1);
        let (tx, rx) = pair.stream();
        pair.a.try_send(&tx, &data(1, WINDOW)).unwrap();
        pair.settle().unwrap();
        // Act
        recv_all(&mut pair.b, &rx);
        pair.settle().unwrap();
        let queued = pair.a.try_send(&tx, &data(2, 1));
        // Assert
        assert_eq!(queued, Ok(true));
    }

    #[test]
    fn on_frame_data_beyond_credit_is_protocol_error() {
        // Arrange
        let mut pair = Pair::new(1);
        let (tx, _rx) = pair.stream();
        let frame = Frame::new(FrameKind::Data, tx.id, 1, data(0, WINDOW + 1));
        // Act
        let result = pair.b.on_frame(0, frame);
        // Assert
        assert_eq!(
            result,
            Err(ProtocolError::DeliverCredit {
                stream: tx.id,
                received: WINDOW as u64 + 1,
                allowed: WINDOW as u64
            })
        );
    }

    #[test]
    fn on_frame_reorder_beyond_session_window_is_protocol_error() {
        // Arrange
        let mut pair = Pair::new(1);
        let frame = Frame::new(FrameKind::Data, 1, 5, data(0, 4 * WINDOW));
        // Act
        let result = pair.b.on_frame(0, frame);
        // Assert
        assert_eq!(
            result,
            Err(ProtocolError::ReorderWindow {
                seq: 5,
                expected: 0,
                window: 4 * WINDOW
            })
        );
    }

    #[test]
    fn on_frame_ack_beyond_sent_is_protocol_error() {
        // Arrange
        let mut pair = Pair::new(1);
        let frame = Frame::new(FrameKind::Ack, 0, 10, Bytes::new());
        // Act
        let result = pair.a.on_frame(0, frame);
        // Assert
        assert_eq!(result, Err(ProtocolError::AcceptAck { ack: 10, sent: 0 }));
    }

    #[test]
    fn on_frame_ack_releases_unacked_bytes() {
        // Arrange
        let mut pair = Pair::new(1);
        let (tx, _rx) = pair.stream();
        pair.a.try_send(&tx, &data(1, 1000)).unwrap();
        // Act
        pair.settle().unwrap();
        // Assert
        assert_eq!(pair.a.stats().unacked_bytes, 0);
    }

    #[test]
    fn open_unknown_service_fails_with_open_refused() {
        // Arrange
        let mut pair = Pair::new(1);
        let opened = pair.a.open("nobody").unwrap();
        // Act
        pair.settle().unwrap();
        // Assert
        assert_eq!(
            opened.error.get(),
            Some(&StreamError::OpenRefused {
                service: "nobody".to_owned(),
                reason: ResetReason::NoService
            })
        );
    }

    #[test]
    fn on_frame_data_for_unknown_stream_replies_reset() {
        // Arrange
        let mut pair = Pair::new(1);
        let frame = Frame::new(FrameKind::Data, 9, 0, data(1, 4));
        // Act
        pair.b.on_frame(0, frame).unwrap();
        let replies = drain(&mut pair.to_a[0]);
        // Assert
        assert_eq!(
            replies.first().map(|f| (f.kind, f.stream)),
            Some((FrameKind::Reset, 9))
        );
    }

    #[test]
    fn on_frame_open_with_own_parity_is_protocol_error() {
        // Arrange
        let mut pair = Pair::new(1);
        let frame = Frame::new(FrameKind::Open, 2, 0, Bytes::from_static(b"svc"));
        // Act
        let result = pair.b.on_frame(0, frame);
        // Assert
        assert_eq!(result, Err(ProtocolError::OpenStream { stream: 2 }));
    }

    #[test]
    fn drop_rx_before_close_resets_sender_stream() {
        // Arrange
        let mut pair = Pair::new(1);
        let (tx, rx) = pair.stream();
        // Act
        pair.b.drop_rx(&rx);
        pair.settle().unwrap();
        // Assert
        assert_eq!(
            tx.error.get(),
            Some(&StreamError::Reset {
                reason: ResetReason::Abandoned
            })
        );
    }

    #[test]
    fn finish_delivers_fin_after_data() {
        // Arrange
        let mut pair = Pair::new(1);
        let (tx, rx) = pair.stream();
        pair.a.try_send(&tx, &data(5, 3)).unwrap();
        // Act
        pair.a.finish(&tx).unwrap();
        pair.settle().unwrap();
        // Assert
        assert_eq!(pair.b.try_recv(&rx), Ok(Received::Data(data(5, 3))));
        assert_eq!(pair.b.try_recv(&rx), Ok(Received::Fin));
    }

    #[test]
    fn try_send_after_finish_fails_with_send_finished() {
        // Arrange
        let mut pair = Pair::new(1);
        let (tx, _rx) = pair.stream();
        pair.a.finish(&tx).unwrap();
        // Act
        let result = pair.a.try_send(&tx, &data(1, 1));
        // Assert
        assert_eq!(result, Err(StreamError::SendFinished));
    }

    #[test]
    fn listen_twice_fails_with_listen_taken() {
        // Arrange
        let mut session = Session::new(config(Role::Listen), 1);
        let _first = session.listen("svc").unwrap();
        // Act
        let second = session.listen("svc");
        // Assert
        assert_eq!(
            second.unwrap_err(),
            StreamError::ListenTaken {
                service: "svc".to_owned()
            }
        );
    }

    #[test]
    fn open_over_max_streams_is_refused_by_peer() {
        // Arrange
        let mut pair = Pair::new(1);
        let _incoming = pair.b.listen("svc").unwrap();
        let opened = open_many(&mut pair.a, 5);
        // Act
        pair.settle().unwrap();
        // Assert
        assert_eq!(
            opened[4].error.get(),
            Some(&StreamError::OpenRefused {
                service: "svc".to_owned(),
                reason: ResetReason::TooManyStreams
            })
        );
    }

    #[test]
    fn chunk_limit_is_capped_by_half_the_peer_stream_window() {
        // Arrange
        let pair = Pair::new(1);
        // Act
        let limit = pair.a.chunk_limit(usize::MAX);
        // Assert
        assert_eq!(limit, WINDOW / 2);
    }
}
