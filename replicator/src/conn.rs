//! One connection of a link: its TLS, the `Hello` handshake, then a reader that decodes
//! frames into the session and a writer that drains the link's queue in vectored batches
//! and sends keepalives. The link set ([`crate::link`]) dials and accepts; this runs what
//! it got until it fails.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::frame::{Frame, FrameCodec, FrameKind, HEADER_LEN, Hello};
use crate::link::{Inner, LinkError, chain};
use crate::session::{Conn, Outgoing};
use crate::stats::LinkCounters;
use crate::tls::{ReadHalf, WriteHalf, secure};

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
/// Aborts a task when dropped.
#[derive(Debug)]
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs one connection of `link`: handshake, then frames until it fails.
pub(crate) async fn run_conn(
    inner: &Arc<Inner>,
    link: usize,
    socket: TcpStream,
) -> Result<(), LinkError> {
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
