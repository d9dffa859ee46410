//! The FT stream between a primary's epoch loop and the peer's standby receiver, one stream
//! per VM (over the A-Links, replicator service `ft`). Each message is a frame: kind (1 byte),
//! payload length (4 bytes, big-endian), payload.
//!
//! ```text
//!  primary                                   standby
//!  Hello{vm}                 ───────────►
//!                            ◄───────────    Welcome{ram_bytes, committed}
//!  Pages{pages, data} ...    ───────────►    held (applied at once before the first commit)
//!  Commit{epoch, device}     ───────────►    pages → RAM file, disk writes → disk, device kept
//!                            ◄───────────    Ack{epoch} | Nack{epoch, reason}
//!  Pages ...                 ───────────►
//!  CommitDelta{epoch, delta} ───────────►    as Commit, the device state rebuilt from the last
//!                            ◄───────────    Ack | Nack
//! ```
//!
//! After its first acknowledged commit a stream's primary sends device states as deltas
//! against the last one acknowledged ([`super::state_delta`]).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::dirty::PAGE;
use super::state_delta::Delta;

/// Largest payload accepted: a batch of pages or a device state (~0.4 MB) stays far below.
pub const MAX_PAYLOAD: usize = 64 << 20;
/// Pages per `Pages` message: 4 MiB of RAM per frame.
pub const PAGES_PER_MESSAGE: usize = 1024;

const HELLO: u8 = 1;
const WELCOME: u8 = 2;
const PAGES: u8 = 3;
const COMMIT: u8 = 4;
const ACK: u8 = 5;
const NACK: u8 = 6;
const COMMIT_DELTA: u8 = 7;

/// Errors reading or writing the FT stream.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The stream failed or closed.
    #[error("FT stream I/O")]
    Io(#[from] std::io::Error),
    /// The other side sent a frame we cannot read: the stream is unusable.
    #[error("malformed FT message: {0}")]
    Malformed(String),
}

/// One message of the FT stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// The primary names the VM whose standby it feeds.
    Hello {
        /// The VM's UUID.
        vm: String,
    },
    /// The standby is ready: its RAM size, and the last epoch it committed (0: none yet).
    Welcome {
        /// Bytes of the standby's RAM file.
        ram_bytes: u64,
        /// Last committed epoch.
        committed: u64,
    },
    /// RAM pages of the epoch under way: indexes (4 KiB pages) and their contents.
    Pages {
        /// Page indexes.
        pages: Vec<u64>,
        /// `PAGE` bytes per index, in the same order.
        data: Vec<u8>,
    },
    /// The end of an epoch: its device state; the standby applies the epoch and answers.
    Commit {
        /// The epoch's number (1, 2, ...).
        epoch: u64,
        /// QEMU's device state at the checkpoint (`xen-save-devices-state` output).
        device_state: Vec<u8>,
    },
    /// The end of an epoch whose device state is given as a delta against the state of the
    /// last epoch the standby acknowledged.
    CommitDelta {
        /// The epoch's number.
        epoch: u64,
        /// What changed in the device state.
        delta: Delta,
    },
    /// The epoch is applied on the standby.
    Ack {
        /// The epoch.
        epoch: u64,
    },
    /// The epoch could not be applied; the standby is no longer usable.
    Nack {
        /// The epoch.
        epoch: u64,
        /// Why, for the primary's log and alert.
        reason: String,
    },
}

/// Writes one message.
pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, message: &Message) -> Result<(), Error> {
    let (kind, payload) = encode(message);
    let length = u32::try_from(payload.len())
        .ok()
        .filter(|len| (*len as usize) <= MAX_PAYLOAD)
        .ok_or_else(|| Error::Malformed(format!("{}-byte payload to send", payload.len())))?;
    let mut header = [0u8; 5];
    header[0] = kind;
    header[1..].copy_from_slice(&length.to_be_bytes());
    w.write_all(&header).await?;
    w.write_all(&payload).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one message.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Message, Error> {
    let mut header = [0u8; 5];
    r.read_exact(&mut header).await?;
    let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if length > MAX_PAYLOAD {
        return Err(Error::Malformed(format!(
            "{length}-byte payload (at most {MAX_PAYLOAD})"
        )));
    }
    let mut payload = vec![0u8; length];
    r.read_exact(&mut payload).await?;
    decode(header[0], payload)
}

fn encode(message: &Message) -> (u8, Vec<u8>) {
    match message {
        Message::Hello { vm } => (HELLO, vm.as_bytes().to_vec()),
        Message::Welcome {
            ram_bytes,
            committed,
        } => (
            WELCOME,
            [ram_bytes.to_be_bytes(), committed.to_be_bytes()].concat(),
        ),
        Message::Pages { pages, data } => {
            let mut payload = Vec::with_capacity(4 + pages.len() * 8 + data.len());
            // A batch beyond u32 pages would also exceed MAX_PAYLOAD: `write` refuses it.
            let count = u32::try_from(pages.len()).unwrap_or(u32::MAX);
            payload.extend_from_slice(&count.to_be_bytes());
            for page in pages {
                payload.extend_from_slice(&page.to_be_bytes());
            }
            payload.extend_from_slice(data);
            (PAGES, payload)
        }
        Message::Commit {
            epoch,
            device_state,
        } => (COMMIT, [&epoch.to_be_bytes()[..], device_state].concat()),
        Message::CommitDelta { epoch, delta } => (COMMIT_DELTA, encode_delta(*epoch, delta)),
        Message::Ack { epoch } => (ACK, epoch.to_be_bytes().to_vec()),
        Message::Nack { epoch, reason } => {
            (NACK, [&epoch.to_be_bytes()[..], reason.as_bytes()].concat())
        }
    }
}

fn decode(kind: u8, payload: Vec<u8>) -> Result<Message, Error> {
    match kind {
        HELLO => Ok(Message::Hello {
            vm: text(payload, "Hello")?,
        }),
        WELCOME => {
            let ram_bytes = u64_at(&payload, 0, "Welcome")?;
            let committed = u64_at(&payload, 8, "Welcome")?;
            Ok(Message::Welcome {
                ram_bytes,
                committed,
            })
        }
        PAGES => decode_pages(&payload),
        COMMIT => Ok(Message::Commit {
            epoch: u64_at(&payload, 0, "Commit")?,
            device_state: payload[8..].to_vec(),
        }),
        COMMIT_DELTA => decode_delta(&payload),
        ACK => Ok(Message::Ack {
            epoch: u64_at(&payload, 0, "Ack")?,
        }),
        NACK => {
            let epoch = u64_at(&payload, 0, "Nack")?;
            Ok(Message::Nack {
                epoch,
                reason: text(payload[8..].to_vec(), "Nack")?,
            })
        }
        other => Err(Error::Malformed(format!("unknown message kind {other}"))),
    }
}

fn decode_pages(payload: &[u8]) -> Result<Message, Error> {
    let count = payload
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| Error::Malformed("Pages without a count".into()))?;
    let data_at = 4 + count * 8;
    if payload.len() != data_at + count * PAGE {
        return Err(Error::Malformed(format!(
            "Pages of {count} pages is {} bytes long",
            payload.len()
        )));
    }
    let pages = (0..count)
        .map(|i| u64_at(payload, 4 + i * 8, "Pages"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Message::Pages {
        pages,
        data: payload[data_at..].to_vec(),
    })
}

/// `epoch, base, len, hash` (u64 each), the run count (u32), then per run its offset (u64),
/// length (u32) and bytes. Lengths beyond u32 would also exceed `MAX_PAYLOAD`: `write`
/// refuses the frame.
fn encode_delta(epoch: u64, delta: &Delta) -> Vec<u8> {
    let mut payload = Vec::with_capacity(36 + delta.runs.len() * 12 + delta.carried());
    for field in [epoch, delta.base, delta.len as u64, delta.hash] {
        payload.extend_from_slice(&field.to_be_bytes());
    }
    let count = u32::try_from(delta.runs.len()).unwrap_or(u32::MAX);
    payload.extend_from_slice(&count.to_be_bytes());
    for (offset, bytes) in &delta.runs {
        payload.extend_from_slice(&(*offset as u64).to_be_bytes());
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        payload.extend_from_slice(&len.to_be_bytes());
        payload.extend_from_slice(bytes);
    }
    payload
}

fn decode_delta(payload: &[u8]) -> Result<Message, Error> {
    let what = "CommitDelta";
    let epoch = u64_at(payload, 0, what)?;
    let base = u64_at(payload, 8, what)?;
    let len = usize_of(u64_at(payload, 16, what)?, what)?;
    let hash = u64_at(payload, 24, what)?;
    let count = u32_at(payload, 32, what)?;
    let mut at = 36;
    let mut runs = Vec::new();
    for _ in 0..count {
        let offset = usize_of(u64_at(payload, at, what)?, what)?;
        let run = u32_at(payload, at + 8, what)? as usize;
        at += 12;
        let bytes = payload
            .get(at..at + run)
            .ok_or_else(|| Error::Malformed(format!("{what} run of {run} bytes cut short")))?;
        runs.push((offset, bytes.to_vec()));
        at += run;
    }
    if at != payload.len() {
        return Err(Error::Malformed(format!(
            "{what} has {} bytes after its runs",
            payload.len() - at
        )));
    }
    Ok(Message::CommitDelta {
        epoch,
        delta: Delta {
            base,
            len,
            hash,
            runs,
        },
    })
}

fn u32_at(payload: &[u8], at: usize, what: &str) -> Result<u32, Error> {
    bytes_at(payload, at, what).map(u32::from_be_bytes)
}

fn usize_of(value: u64, what: &str) -> Result<usize, Error> {
    usize::try_from(value).map_err(|_| Error::Malformed(format!("{what} length {value}")))
}

fn u64_at(payload: &[u8], at: usize, what: &str) -> Result<u64, Error> {
    bytes_at(payload, at, what).map(u64::from_be_bytes)
}

/// The `N` bytes of `payload` at `at`, or a malformed-`what` error when it is too short.
fn bytes_at<const N: usize>(payload: &[u8], at: usize, what: &str) -> Result<[u8; N], Error> {
    payload
        .get(at..at + N)
        .and_then(|b| <[u8; N]>::try_from(b).ok())
        .ok_or_else(|| Error::Malformed(format!("{what} too short ({} bytes)", payload.len())))
}

fn text(payload: Vec<u8>, what: &str) -> Result<String, Error> {
    String::from_utf8(payload).map_err(|_| Error::Malformed(format!("{what} text is not UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn round_trip(message: Message) -> Message {
        let mut buf = Vec::new();
        write(&mut buf, &message).await.unwrap();
        read(&mut buf.as_slice()).await.unwrap()
    }

    #[tokio::test]
    async fn every_message_round_trips() {
        let messages = [
            Message::Hello { vm: "vm-1".into() },
            Message::Welcome {
                ram_bytes: 256 << 20,
                committed: 7,
            },
            Message::Pages {
                pages: vec![3, 40],
                data: (0..=250u8).cycle().take(2 * PAGE).collect(),
            },
            Message::Commit {
                epoch: 9,
                device_state: vec![1, 2, 3],
            },
            Message::CommitDelta {
                epoch: 10,
                delta: Delta {
                    base: 9,
                    len: 4096,
                    hash: 0x1234,
                    runs: vec![(0, vec![1; 64]), (640, vec![2; 128])],
                },
            },
            Message::Ack { epoch: 9 },
            Message::Nack {
                epoch: 10,
                reason: "disk full".into(),
            },
        ];
        for message in messages {
            assert_eq!(round_trip(message.clone()).await, message);
        }
    }

    #[tokio::test]
    async fn pages_whose_length_disagrees_with_the_count_are_refused() {
        let mut frame = vec![PAGES, 0, 0, 0, 4 + 8 + 10];
        frame.extend_from_slice(&1u32.to_be_bytes());
        frame.extend_from_slice(&5u64.to_be_bytes());
        frame.extend_from_slice(&[0u8; 10]);

        let error = read(&mut frame.as_slice()).await.unwrap_err();

        assert!(matches!(error, Error::Malformed(_)), "{error:?}");
    }

    #[tokio::test]
    async fn a_delta_whose_runs_disagree_with_its_length_is_refused() {
        let delta = Delta {
            base: 1,
            len: 100,
            hash: 0,
            runs: vec![(0, vec![7; 10])],
        };
        let mut payload = encode_delta(2, &delta);
        payload.pop();
        let mut frame = vec![COMMIT_DELTA];
        frame.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        frame.extend_from_slice(&payload);
        assert!(matches!(
            read(&mut frame.as_slice()).await,
            Err(Error::Malformed(_))
        ));
        payload.extend_from_slice(&[7, 0]);
        let mut frame = vec![COMMIT_DELTA];
        frame.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        frame.extend_from_slice(&payload);
        assert!(matches!(
            read(&mut frame.as_slice()).await,
            Err(Error::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn an_oversized_or_unknown_frame_is_refused() {
        let huge = [COMMIT, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read(&mut huge.as_slice()).await,
            Err(Error::Malformed(_))
        ));
        let unknown = [99, 0, 0, 0, 0];
        assert!(matches!(
            read(&mut unknown.as_slice()).await,
            Err(Error::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn a_truncated_frame_is_an_io_error() {
        let frame = [ACK, 0, 0, 0, 8, 0, 0];
        assert!(matches!(
            read(&mut frame.as_slice()).await,
            Err(Error::Io(_))
        ));
    }
}
