//! Observability: plain snapshot structs of links and streams.
//!
//! [`crate::Endpoint::stats`] returns an [`EndpointStats`]; the agent maps it to its own
//! (protobuf) types. Counters are cumulative since the endpoint started.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

/// State of one A-Link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// No connection; dialing or waiting for the peer to dial.
    Down,
    /// Connected, handshake in progress.
    Connecting,
    /// Connected and carrying frames.
    Up,
}

/// Snapshot of one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStats {
    /// Position of the link in the configuration.
    pub index: usize,
    /// Current state.
    pub state: LinkState,
    /// Bytes written to the socket (headers included).
    pub bytes_sent: u64,
    /// Bytes read from the socket.
    pub bytes_received: u64,
    /// Frames written.
    pub frames_sent: u64,
    /// Frames read.
    pub frames_received: u64,
    /// Frames first sent on this link that had to be resent on another one after it failed.
    pub retransmits: u64,
    /// Last keepalive round-trip time in microseconds (`None` before the first answer).
    pub rtt_us: Option<u64>,
    /// Times the link came up.
    pub ups: u64,
    /// Times the link went down after having been up.
    pub downs: u64,
    /// Bytes queued for the link's writer, not yet on the socket.
    pub queued_bytes: usize,
}

/// Snapshot of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStats {
    /// Stream id (odd: opened by the dialing side, even: by the listening side).
    pub id: u32,
    /// Service name the stream was opened with.
    pub service: String,
    /// Bytes sent that the peer application has not consumed yet.
    pub send_backlog_bytes: u64,
    /// Bytes received that the local application has not consumed yet.
    pub recv_backlog_bytes: usize,
}

/// Snapshot of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointStats {
    /// One entry per configured link, in configuration order.
    pub links: Vec<LinkStats>,
    /// Open streams, by id.
    pub streams: Vec<StreamStats>,
    /// Whether a peer session is established (at least one link up).
    pub peer_connected: bool,
    /// Bytes of sequenced frames sent and not yet acknowledged by the peer.
    pub unacked_bytes: usize,
    /// Bytes of frames received ahead of a gap, waiting for it to fill.
    pub reorder_bytes: usize,
    /// Duplicate frames received and dropped (resends of frames that had arrived).
    pub duplicates: u64,
}

/// Live counters of one link, shared by its tasks and the session.
#[derive(Debug, Default)]
pub(crate) struct LinkCounters {
    state: AtomicU8,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) frames_sent: AtomicU64,
    pub(crate) frames_received: AtomicU64,
    pub(crate) retransmits: AtomicU64,
    pub(crate) rtt_us: AtomicU64,
    pub(crate) ups: AtomicU64,
    pub(crate) downs: AtomicU64,
}

impl LinkCounters {
    pub(crate) fn set_state(&self, state: LinkState) {
        let value = match state {
            LinkState::Down => 0,
            LinkState::Connecting => 1,
            LinkState::Up => 2,
        };
        self.state.store(value, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, value: usize) {
        counter.fetch_add(u64::try_from(value).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, index: usize, queued_bytes: usize) -> LinkStats {
        let state = match self.state.load(Ordering::Relaxed) {
            2 => LinkState::Up,
            1 => LinkState::Connecting,
            _ => LinkState::Down,
        };
        let rtt = self.rtt_us.load(Ordering::Relaxed);
        LinkStats {
            index,
            state,
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            frames_sent: self.frames_sent.load(Ordering::Relaxed),
            frames_received: self.frames_received.load(Ordering::Relaxed),
            retransmits: self.retransmits.load(Ordering::Relaxed),
            rtt_us: (rtt != 0).then_some(rtt),
            ups: self.ups.load(Ordering::Relaxed),
            downs: self.downs.load(Ordering::Relaxed),
            queued_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_fresh_counters_reports_down_without_rtt() {
        // Arrange
        let counters = LinkCounters::default();
        // Act
        let stats = counters.snapshot(3, 0);
        // Assert
        assert_eq!(stats.index, 3);
        assert_eq!(stats.state, LinkState::Down);
        assert_eq!(stats.rtt_us, None);
    }

    #[test]
    fn snapshot_after_set_state_up_reports_up() {
        // Arrange
        let counters = LinkCounters::default();
        counters.set_state(LinkState::Up);
        // Act
        let stats = counters.snapshot(0, 0);
        // Assert
        assert_eq!(stats.state, LinkState::Up);
    }
}
