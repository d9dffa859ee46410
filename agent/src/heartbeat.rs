//! Heartbeats on every path between the two hosts.
//!
//! The agent (the process that outlives a controller crash) sends a small UDP datagram to its
//! peer on each configured path (priv0, both A-Links, management) every interval, and records
//! when it last heard the peer on each. The controllers read these records (`GetPeerHealth`)
//! and judge host health from them (`controller::health`): this module only measures.
//!
//! Wire format (version 1), big-endian:
//! ```text
//!  0        4     5      6                14       15          15+n     16+n
//!  +--------+-----+------+----------------+--------+-----------+--------+----------+
//!  | "PVHB" | ver | kind | sequence (u64) | n (u8) | node name | m (u8) | path name|
//!  +--------+-----+------+----------------+--------+-----------+--------+----------+
//!  kind: 0 invalid, 1 beat.
//!  example: node "n0", path "priv0", sequence 7:
//!  50 56 48 42 01 01 00 00 00 00 00 00 00 07 02 6e 30 05 70 72 69 76 30
//! ```

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::{Instant, MissedTickBehavior};

/// Magic bytes that open every heartbeat.
const MAGIC: &[u8; 4] = b"PVHB";
/// Wire format version.
const VERSION: u8 = 1;
/// Kind: a heartbeat.
const KIND_BEAT: u8 = 1;
/// Pause before binding a path's address again (its interface may come up later).
const REBIND: Duration = Duration::from_secs(1);
/// Largest datagram we read.
const MAX_DATAGRAM: usize = 600;

/// Errors decoding a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The datagram does not start with the magic bytes.
    #[error("not a heartbeat (bad magic)")]
    Magic,
    /// A name is not UTF-8.
    #[error("heartbeat {field} is not UTF-8")]
    Name {
        /// Which name.
        field: &'static str,
    },
    /// The datagram ends before its fields do.
    #[error("heartbeat truncated at byte {at}")]
    Truncated {
        /// Where it ended.
        at: usize,
    },
    /// The kind is not one we know.
    #[error("unknown heartbeat kind {0}")]
    UnknownKind(u8),
    /// The version is not one we speak.
    #[error("unsupported heartbeat version {0}")]
    Version(u8),
}

/// One heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Beat {
    /// Sender's sequence number.
    pub sequence: u64,
    /// Sender's node name.
    pub node: String,
    /// Sender's name for the path.
    pub path: String,
}

impl Beat {
    /// The datagram for this beat (names longer than 255 bytes are cut).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.node.len() + self.path.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(KIND_BEAT);
        out.extend_from_slice(&self.sequence.to_be_bytes());
        for name in [&self.node, &self.path] {
            let bytes = &name.as_bytes()[..name.len().min(255)];
            out.push(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
            out.extend_from_slice(bytes);
        }
        out
    }

    /// Decodes a datagram.
    pub fn decode(bytes: &[u8]) -> Result<Beat, DecodeError> {
        let mut reader = Reader { bytes, at: 0 };
        if reader.take(4)? != MAGIC {
            return Err(DecodeError::Magic);
        }
        let version = reader.byte()?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let kind = reader.byte()?;
        if kind != KIND_BEAT {
            return Err(DecodeError::UnknownKind(kind));
        }
        let mut sequence = [0u8; 8];
        sequence.copy_from_slice(reader.take(8)?);
        Ok(Beat {
            sequence: u64::from_be_bytes(sequence),
            node: reader.name("node name")?,
            path: reader.name("path name")?,
        })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at + n;
        let slice = self.bytes.get(self.at..end).ok_or(DecodeError::Truncated {
            at: self.bytes.len(),
        })?;
        self.at = end;
        Ok(slice)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn name(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = usize::from(self.byte()?);
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Name { field })
    }
}

/// One path to the peer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathConfig {
    /// Path name: priv0, alink1, alink2, mgmt.
    pub name: String,
    /// This host's address on the path.
    pub local: IpAddr,
    /// The peer's address on the path.
    pub peer: IpAddr,
}

/// What this host hears of its peer on one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathReport {
    /// Path name.
    pub name: String,
    /// Time since the last heartbeat heard, if any was.
    pub since_heard: Option<Duration>,
    /// The peer's node name, from its heartbeats.
    pub peer: String,
    /// Why sending fails, if it does.
    pub send_error: String,
}

#[derive(Debug, Default)]
struct PathRecord {
    last_heard: Option<Instant>,
    peer: String,
    send_error: String,
}

/// The heartbeat records of every path; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Heartbeats {
    paths: Arc<Vec<(String, Mutex<PathRecord>)>>,
}

impl Heartbeats {
    /// Starts one sender/receiver task per path on UDP `port`, beating every `interval`.
    pub fn start(node: &str, port: u16, interval: Duration, paths: &[PathConfig]) -> Heartbeats {
        let heartbeats = Heartbeats {
            paths: Arc::new(
                paths
                    .iter()
                    .map(|p| (p.name.clone(), Mutex::default()))
                    .collect(),
            ),
        };
        for (index, path) in paths.iter().enumerate() {
            tokio::spawn(run_path(
                heartbeats.clone(),
                index,
                node.to_string(),
                path.clone(),
                port,
                interval,
            ));
        }
        heartbeats
    }

    /// What this host hears of its peer on each path, now.
    pub fn report(&self) -> Vec<PathReport> {
        let now = Instant::now();
        self.paths
            .iter()
            .map(|(name, record)| {
                let record = lock(record);
                PathReport {
                    name: name.clone(),
                    since_heard: record.last_heard.map(|t| now.saturating_duration_since(t)),
                    peer: record.peer.clone(),
                    send_error: record.send_error.clone(),
                }
            })
            .collect()
    }

    fn update(&self, index: usize, f: impl FnOnce(&mut PathRecord)) {
        if let Some((_, record)) = self.paths.get(index) {
            f(&mut lock(record));
        }
    }
}

fn lock(record: &Mutex<PathRecord>) -> std::sync::MutexGuard<'_, PathRecord> {
    record
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Binds the path's address (retrying while its interface is missing), then beats and listens.
async fn run_path(
    heartbeats: Heartbeats,
    index: usize,
    node: String,
    path: PathConfig,
    port: u16,
    interval: Duration,
) {
    let local = SocketAddr::new(path.local, port);
    let socket = loop {
        match UdpSocket::bind(local).await {
            Ok(socket) => break socket,
            Err(e) => {
                heartbeats.update(index, |r| r.send_error = format!("binding {local}: {e}"));
                tokio::time::sleep(REBIND).await;
            }
        }
    };
    tracing::info!(path = %path.name, %local, peer = %path.peer, "heartbeats on path");
    let peer = SocketAddr::new(path.peer, port);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut beat = Beat {
        sequence: 0,
        node,
        path: path.name.clone(),
    };
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            _ = tick.tick() => {
                beat.sequence += 1;
                let error = match socket.send_to(&beat.encode(), peer).await {
                    Ok(_) => String::new(),
                    Err(e) => e.to_string(),
                };
                heartbeats.update(index, |r| r.send_error = error);
            }
            received = socket.recv_from(&mut buf) => {
                let Ok((len, from)) = received else { continue };
                if from.ip() != path.peer {
                    continue;
                }
                match Beat::decode(&buf[..len]) {
                    Ok(heard) => heartbeats.update(index, |r| {
                        r.last_heard = Some(Instant::now());
                        r.peer = heard.node;
                    }),
                    Err(e) => tracing::debug!(path = %path.name, %from, error = %e, "ignoring a datagram"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat() -> Beat {
        Beat {
            sequence: 7,
            node: "n0".into(),
            path: "priv0".into(),
        }
    }

    #[test]
    fn encode_matches_documented_example() {
        let bytes = beat().encode();

        assert_eq!(
            bytes,
            [
                0x50, 0x56, 0x48, 0x42, 1, 1, 0, 0, 0, 0, 0, 0, 0, 7, 2, b'n', b'0', 5, b'p', b'r',
                b'i', b'v', b'0'
            ]
        );
    }

    #[test]
    fn decode_round_trips_encode() {
        let decoded = Beat::decode(&beat().encode()).unwrap();

        assert_eq!(decoded, beat());
    }

    #[test]
    fn decode_truncated_name_is_refused() {
        let bytes = beat().encode();

        let err = Beat::decode(&bytes[..bytes.len() - 2]).unwrap_err();

        assert_eq!(err, DecodeError::Truncated { at: 21 });
    }

    #[test]
    fn decode_bad_magic_is_refused() {
        let mut bytes = beat().encode();
        bytes[0] = b'X';

        let err = Beat::decode(&bytes).unwrap_err();

        assert_eq!(err, DecodeError::Magic);
    }

    #[test]
    fn decode_newer_version_is_refused() {
        let mut bytes = beat().encode();
        bytes[4] = 2;

        let err = Beat::decode(&bytes).unwrap_err();

        assert_eq!(err, DecodeError::Version(2));
    }

    #[test]
    fn decode_kind_zero_is_refused() {
        let mut bytes = beat().encode();
        bytes[5] = 0;

        let err = Beat::decode(&bytes).unwrap_err();

        assert_eq!(err, DecodeError::UnknownKind(0));
    }

    #[test]
    fn decode_empty_datagram_is_truncated() {
        let err = Beat::decode(&[]).unwrap_err();

        assert_eq!(err, DecodeError::Truncated { at: 0 });
    }
}
