//! Named streams over the link set, with backpressure.
//!
//! A stream is opened by service name with [`crate::Endpoint::open`] and accepted on the peer
//! from the [`StreamListener`] that [`crate::Endpoint::listen`] returned for that name. Each
//! direction is an ordered, exactly-once byte sequence delivered in chunks ([`Bytes`]).
//!
//! Backpressure: a sender may have at most the receiver's stream window (see
//! [`crate::link::Config::stream_window`]) of bytes that the receiving application has not
//! read yet; [`StreamSender::send`] waits for credit beyond that. The receiver never buffers
//! more than its window per stream, and never more than `max_streams` streams, whatever the
//! peer does: a peer exceeding the window is disconnected.
//!
//! Ending: [`StreamSender::finish`] (or dropping the sender) ends the sending direction; the
//! peer's [`StreamReceiver::recv`] then returns `Ok(None)` after the last byte. Dropping a
//! receiver before the end resets the stream at the peer ([`StreamError::Reset`]).

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::frame::ResetReason;
use crate::link::Inner;
use crate::session::{Received, StreamShared};

/// Errors of stream operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The endpoint was shut down.
    #[error("using stream: the endpoint is shut down")]
    EndpointClosed,
    /// Another listener already serves this service name.
    #[error("listening on service {service:?}: it already has a listener")]
    ListenTaken {
        /// The service name.
        service: String,
    },
    /// The service name is empty or longer than 255 bytes.
    #[error("opening stream: service name of {len} bytes (1..=255 allowed)")]
    OpenName {
        /// Length of the name given.
        len: usize,
    },
    /// The peer refused the stream: no listener for the service, or too many streams.
    #[error("opening stream to service {service:?}: refused by the peer ({reason:?})")]
    OpenRefused {
        /// The service name.
        service: String,
        /// Why the peer refused.
        reason: ResetReason,
    },
    /// The peer restarted or dropped the session after losing every link; the stream is gone.
    #[error("using stream: the peer reset the session")]
    PeerReset,
    /// Every link to the peer is down; the stream is gone. The caller decides what that means.
    #[error("using stream: peer unreachable, every link is down")]
    PeerUnreachable,
    /// The peer abandoned the stream.
    #[error("using stream: reset by the peer ({reason:?})")]
    Reset {
        /// Why the peer reset it.
        reason: ResetReason,
    },
    /// Data was sent after the sending direction was finished.
    #[error("sending on stream: the sending direction is finished")]
    SendFinished,
}

/// Both directions of a stream. [`split`](Self::split) gives independent halves.
#[derive(Debug)]
pub struct Stream {
    tx: StreamSender,
    rx: StreamReceiver,
}

impl Stream {
    pub(crate) fn new(inner: Arc<Inner>, shared: Arc<StreamShared>) -> Self {
        let tx = StreamSender {
            inner: Arc::clone(&inner),
            shared: Arc::clone(&shared),
        };
        let rx = StreamReceiver { inner, shared };
        Self { tx, rx }
    }

    /// The stream id.
    #[must_use]
    pub fn id(&self) -> u32 {
        self.tx.shared.id
    }

    /// The service name the stream was opened with.
    #[must_use]
    pub fn service(&self) -> &str {
        &self.tx.shared.service
    }

    /// Separates the sending and receiving halves.
    #[must_use]
    pub fn split(self) -> (StreamSender, StreamReceiver) {
        (self.tx, self.rx)
    }

    /// See [`StreamSender::send`].
    ///
    /// # Errors
    /// See [`StreamSender::send`].
    pub async fn send(&mut self, data: Bytes) -> Result<(), StreamError> {
        self.tx.send(data).await
    }

    /// See [`StreamSender::finish`].
    ///
    /// # Errors
    /// See [`StreamSender::finish`].
    pub fn finish(&mut self) -> Result<(), StreamError> {
        self.tx.finish()
    }

    /// See [`StreamReceiver::recv`].
    ///
    /// # Errors
    /// See [`StreamReceiver::recv`].
    pub async fn recv(&mut self) -> Result<Option<Bytes>, StreamError> {
        self.rx.recv().await
    }
}

/// Sending half of a stream. Dropping it finishes the direction.
#[derive(Debug)]
pub struct StreamSender {
    inner: Arc<Inner>,
    shared: Arc<StreamShared>,
}

impl StreamSender {
    /// Sends `data`, waiting while the peer's window is full.
    ///
    /// Returns once every byte is queued on a link; delivery is guaranteed while at least one
    /// link stays up (otherwise the stream fails with [`StreamError::PeerUnreachable`]).
    ///
    /// # Errors
    /// [`StreamError::PeerUnreachable`], [`StreamError::PeerReset`], [`StreamError::Reset`],
    /// [`StreamError::EndpointClosed`], or [`StreamError::SendFinished`] after `finish`.
    pub async fn send(&mut self, mut data: Bytes) -> Result<(), StreamError> {
        let chunk_limit = self.inner.lock().chunk_limit(self.inner.config.chunk_size);
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(chunk_limit));
            loop {
                let queued = {
                    let mut session = self.inner.lock();
                    if let Some(error) = self.shared.error.get() {
                        return Err(error.clone());
                    }
                    session.try_send(&self.shared, &chunk)?
                };
                if queued {
                    break;
                }
                self.shared.tx_wake.notified().await;
            }
        }
        Ok(())
    }

    /// Ends the sending direction; the peer reads the end after the data sent before.
    ///
    /// # Errors
    /// The stream's failure, if it already failed.
    pub fn finish(&mut self) -> Result<(), StreamError> {
        if let Some(error) = self.shared.error.get() {
            return Err(error.clone());
        }
        self.inner.lock().finish(&self.shared)
    }
}

impl Drop for StreamSender {
    fn drop(&mut self) {
        self.inner.lock().drop_tx(&self.shared);
    }
}

/// Receiving half of a stream. Dropping it before the end resets the stream at the peer.
#[derive(Debug)]
pub struct StreamReceiver {
    inner: Arc<Inner>,
    shared: Arc<StreamShared>,
}

impl StreamReceiver {
    /// The next bytes of the stream, in order; `Ok(None)` once the peer finished and
    /// everything was read.
    ///
    /// # Errors
    /// [`StreamError::PeerUnreachable`], [`StreamError::PeerReset`], [`StreamError::Reset`],
    /// [`StreamError::OpenRefused`] or [`StreamError::EndpointClosed`].
    pub async fn recv(&mut self) -> Result<Option<Bytes>, StreamError> {
        loop {
            let received = self.inner.lock().try_recv(&self.shared)?;
            match received {
                Received::Data(data) => return Ok(Some(data)),
                Received::Fin => return Ok(None),
                Received::Empty => {}
            }
            if let Some(error) = self.shared.error.get() {
                return Err(error.clone());
            }
            self.shared.rx_wake.notified().await;
        }
    }
}

impl Drop for StreamReceiver {
    fn drop(&mut self) {
        self.inner.lock().drop_rx(&self.shared);
    }
}

/// Streams opened by the peer for one service name.
#[derive(Debug)]
pub struct StreamListener {
    inner: Arc<Inner>,
    service: String,
    incoming: mpsc::Receiver<Arc<StreamShared>>,
}

impl StreamListener {
    pub(crate) fn new(
        inner: Arc<Inner>,
        service: String,
        incoming: mpsc::Receiver<Arc<StreamShared>>,
    ) -> Self {
        Self {
            inner,
            service,
            incoming,
        }
    }

    /// The service name this listener serves.
    #[must_use]
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The next stream the peer opened for this service.
    ///
    /// # Errors
    /// [`StreamError::EndpointClosed`] once the endpoint is shut down.
    pub async fn accept(&mut self) -> Result<Stream, StreamError> {
        match self.incoming.recv().await {
            Some(shared) => Ok(Stream::new(Arc::clone(&self.inner), shared)),
            None => Err(StreamError::EndpointClosed),
        }
    }
}

impl Drop for StreamListener {
    fn drop(&mut self) {
        self.inner.lock().unlisten(&self.service);
        self.incoming.close();
        while let Ok(shared) = self.incoming.try_recv() {
            // Dropping an unaccepted stream finishes it and resets it at the peer.
            drop(Stream::new(Arc::clone(&self.inner), shared));
        }
    }
}
