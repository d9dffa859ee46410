//! Entry points for the fuzz targets in `replicator/fuzz` (feature `fuzzing`).
//!
//! They run the same code as a link's receive path, without sockets or a runtime.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use bytes::BytesMut;
use tokio::sync::{Notify, mpsc};

use crate::frame::{FrameCodec, FrameKind, Hello};
use crate::session::{Conn, Limits, Role, Session, SessionConfig};

/// Decodes `data` as a byte stream of frames, split into reads at the sizes given by its
/// first byte; never panics.
pub fn decode(data: &[u8]) {
    let Some((split, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(*split).max(1);
    let mut codec = FrameCodec::new(64 * 1024);
    let mut buf = BytesMut::new();
    for chunk in rest.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = codec.decode_eof(&mut buf);
}

/// Feeds `data` to a listening session as the bytes a peer sent on link 0: a `Hello`
/// handshake, then frames handed to the session exactly as a link reader does, until the
/// first decode or protocol error (where the real link would be dropped).
pub fn receive(data: &[u8]) {
    let limits = Limits {
        session_window: 256 * 1024,
        stream_window: 64 * 1024,
        max_payload: 64 * 1024,
    };
    let config = SessionConfig {
        role: Role::Listen,
        limits,
        max_streams: 4,
        accept_backlog: 2,
    };
    let mut session = Session::new(config, 1);
    let _incoming = session.listen("svc");
    let mut codec = FrameCodec::new(limits.max_payload);
    let mut buf = BytesMut::from(data);
    let Ok(Some(first)) = codec.decode(&mut buf) else {
        return;
    };
    let Ok(hello) = Hello::from_payload(&first.payload) else {
        return;
    };
    if first.kind != FrameKind::Hello || hello.link != 0 {
        return;
    }
    let (tx, mut written) = mpsc::unbounded_channel();
    let conn = Conn {
        id: 1,
        tx,
        stop: Arc::new(Notify::new()),
        queued: Arc::new(AtomicUsize::new(0)),
    };
    session.link_up(0, conn, &hello);
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        if session.on_frame(0, frame).is_err() {
            break;
        }
        session.flush_ack(0);
        // The writer would send these; drop them so the queue stays small.
        while written.try_recv().is_ok() {}
    }
    session.link_down(0, 1, "fuzz input ended");
}
