//! A small NBD client for the verify pass: the fixed-newstyle handshake, `GO` for one export,
//! then `READ`s answered by simple replies. The wire format (header boxes, an encoded
//! example) is documented in [`crate::nbd::proto`], whose constants this uses.
//!
//! It never sends `DISC`; it just closes. Through an A-Link ingress that holds connections
//! whose *peer* side ends first (a broken mirror path), closing first from this side is what
//! marks the end as ours: the server might otherwise close before the ingress saw us go, and
//! the ingress would record the peer's copy as behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::nbd::proto;

/// How long one handshake step or one read may take: a healthy peer answers a 1 MiB read in
/// milliseconds; a link that stalls this long is broken.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest option reply data accepted (the server's are a few bytes).
const MAX_OPTION_REPLY: u32 = 4096;
/// NBD command: read.
#[cfg(test)]
const CMD_READ: u16 = 0;

/// Errors of the NBD client; each ends the connection.
#[derive(Debug, thiserror::Error)]
pub(super) enum Error {
    /// The socket could not be connected.
    #[error("connecting to the peer's NBD server through {}", socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the connection failed.
    #[error("NBD {step}")]
    Io {
        /// What the client was doing.
        step: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server broke the protocol.
    #[error("NBD {step}: {reason}")]
    Protocol {
        /// What the client was doing.
        step: &'static str,
        /// What was wrong.
        reason: &'static str,
    },
    /// The server answered a read (or digest) with an error.
    #[error("NBD read of {length} bytes at offset {offset} failed with error {errno}")]
    ReadFailed {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        length: u32,
        /// The NBD error (an errno).
        errno: u32,
    },
    /// The server refused the export.
    #[error("the peer's NBD server refused export {export}: {message} (reply {kind:#x})")]
    Refused {
        /// The export.
        export: String,
        /// The option reply type.
        kind: u32,
        /// The server's message.
        message: String,
    },
    /// The server did not answer in time.
    #[error("NBD {step}: no answer within {} s", IO_TIMEOUT.as_secs())]
    TimedOut {
        /// What the client was doing.
        step: &'static str,
    },
}

/// A connection in the transmission phase, reading one export.
#[derive(Debug)]
pub(super) struct Client<S> {
    stream: S,
    size: u64,
    cookie: u64,
}

impl Client<UnixStream> {
    /// Connects to the NBD server behind `socket` and opens `export`.
    pub(super) async fn connect(socket: &Path, export: &str) -> Result<Self, Error> {
        let stream = timed("connect", UnixStream::connect(socket))
            .await?
            .map_err(|source| Error::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        Client::open(stream, export).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Runs the handshake on `stream` and opens `export` with `GO`.
    pub(super) async fn open(mut stream: S, export: &str) -> Result<Self, Error> {
        let mut greeting = [0u8; 18];
        read_exact(&mut stream, &mut greeting, "handshake").await?;
        if greeting[..8] != proto::NBD_MAGIC.to_be_bytes()
            || greeting[8..16] != proto::OPTION_MAGIC.to_be_bytes()
        {
            return Err(protocol("handshake", "not an NBD newstyle server"));
        }
        let flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        if flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol("handshake", "server is not fixed newstyle"));
        }
        let client_flags = proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES;
        write_all(&mut stream, &client_flags.to_be_bytes(), "handshake").await?;
        write_all(&mut stream, &go_option(export), "GO option").await?;
        let size = read_go_replies(&mut stream, export).await?;
        Ok(Client {
            stream,
            size,
            cookie: 0,
        })
    }

    /// The export's size in bytes.
    pub(super) fn size(&self) -> u64 {
        self.size
    }

    /// The [`proto::digest`] of `length` bytes at `offset`, computed by the server: only 8
    /// bytes cross the link (our own command, [`proto::CMD_DIGEST`]).
    pub(super) async fn digest(&mut self, offset: u64, length: u32) -> Result<u64, Error> {
        let reply = self.call(proto::CMD_DIGEST, offset, length, 8).await?;
        let mut digest = [0u8; 8];
        digest.copy_from_slice(&reply);
        Ok(u64::from_be_bytes(digest))
    }

    /// Reads `length` bytes at `offset`.
    #[cfg(test)]
    pub(super) async fn read(&mut self, offset: u64, length: u32) -> Result<Vec<u8>, Error> {
        self.call(CMD_READ, offset, length, length).await
    }

    /// Sends command `kind` for `length` bytes at `offset` and reads its reply's `reply_len`
    /// bytes of data.
    async fn call(
        &mut self,
        kind: u16,
        offset: u64,
        length: u32,
        reply_len: u32,
    ) -> Result<Vec<u8>, Error> {
        self.cookie += 1;
        let request = request(kind, self.cookie, offset, length);
        write_all(&mut self.stream, &request, "read request").await?;
        let mut reply = [0u8; 16];
        read_exact(&mut self.stream, &mut reply, "read reply").await?;
        if reply[..4] != proto::SIMPLE_REPLY_MAGIC.to_be_bytes() {
            return Err(protocol("read reply", "bad simple reply magic"));
        }
        if reply[8..] != self.cookie.to_be_bytes() {
            return Err(protocol("read reply", "reply to another request"));
        }
        let errno = u32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]);
        if errno != 0 {
            return Err(Error::ReadFailed {
                offset,
                length,
                errno,
            });
        }
        let mut data = vec![0u8; usize::try_from(reply_len).unwrap_or(0)];
        read_exact(&mut self.stream, &mut data, "read data").await?;
        Ok(data)
    }
}

/// Reads the replies to `GO` up to its `ACK`; returns the export's size.
async fn read_go_replies<S: AsyncRead + Unpin>(stream: &mut S, export: &str) -> Result<u64, Error> {
    let mut size = None;
    loop {
        let mut header = [0u8; 20];
        read_exact(stream, &mut header, "GO reply").await?;
        let (option, kind, length) = decode_option_reply(&header)?;
        if option != proto::OPT_GO {
            return Err(protocol("GO reply", "reply to another option"));
        }
        let mut data = vec![0u8; usize::try_from(length).unwrap_or(0)];
        read_exact(stream, &mut data, "GO reply data").await?;
        match kind {
            proto::REP_ACK => {
                return size.ok_or(protocol("GO reply", "no export size before the ACK"));
            }
            proto::REP_INFO => size = export_size(&data).or(size),
            kind if kind & 0x8000_0000 != 0 => {
                return Err(Error::Refused {
                    export: export.to_string(),
                    kind,
                    message: String::from_utf8_lossy(&data).into_owned(),
                });
            }
            _ => {}
        }
    }
}

/// An option reply header: option, reply type, data length.
fn decode_option_reply(header: &[u8; 20]) -> Result<(u32, u32, u32), Error> {
    let word = |at: usize| {
        u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    if header[..8] != proto::REPLY_MAGIC.to_be_bytes() {
        return Err(protocol("GO reply", "bad option reply magic"));
    }
    let length = word(16);
    if length > MAX_OPTION_REPLY {
        return Err(protocol("GO reply", "option reply data too long"));
    }
    Ok((word(8), word(12), length))
}

/// The size in an `INFO_EXPORT` item (`None` for other items).
fn export_size(data: &[u8]) -> Option<u64> {
    let (kind, rest) = data.split_first_chunk::<2>()?;
    let (size, _flags) = rest.split_first_chunk::<8>()?;
    (u16::from_be_bytes(*kind) == proto::INFO_EXPORT).then(|| u64::from_be_bytes(*size))
}

/// The `GO` option for `export`, asking for no particular information.
fn go_option(export: &str) -> Vec<u8> {
    let name = export.as_bytes();
    let name_len = u32::try_from(name.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(16 + 6 + name.len());
    out.extend_from_slice(&proto::OPTION_MAGIC.to_be_bytes());
    out.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    out.extend_from_slice(&name_len.saturating_add(6).to_be_bytes());
    out.extend_from_slice(&name_len.to_be_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(&0u16.to_be_bytes());
    out
}

/// A `READ` request.
fn request(kind: u16, cookie: u64, offset: u64, length: u32) -> [u8; proto::REQUEST_LEN] {
    let mut out = [0u8; proto::REQUEST_LEN];
    out[..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..24].copy_from_slice(&offset.to_be_bytes());
    out[24..].copy_from_slice(&length.to_be_bytes());
    out
}

fn protocol(step: &'static str, reason: &'static str) -> Error {
    Error::Protocol { step, reason }
}

/// `future`, or [`Error::TimedOut`] after [`IO_TIMEOUT`].
async fn timed<T>(step: &'static str, future: impl Future<Output = T>) -> Result<T, Error> {
    tokio::time::timeout(IO_TIMEOUT, future)
        .await
        .map_err(|_| Error::TimedOut { step })
}

async fn read_exact<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
    step: &'static str,
) -> Result<(), Error> {
    timed(step, stream.read_exact(buf))
        .await?
        .map(drop)
        .map_err(|source| Error::Io { step, source })
}

async fn write_all<S: AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &[u8],
    step: &'static str,
) -> Result<(), Error> {
    timed(step, stream.write_all(buf))
        .await?
        .map_err(|source| Error::Io { step, source })
}

#[cfg(test)]
mod tests {
    use tokio::io::DuplexStream;

    use super::*;

    /// What the agent's NBD server sends up to the end of a `GO` for a 1 MiB export.
    fn server_greeting_and_go() -> Vec<u8> {
        let mut out = proto::handshake().to_vec();
        let info = proto::info_export(1 << 20, proto::TX_HAS_FLAGS);
        out.extend(proto::option_reply(proto::OPT_GO, proto::REP_INFO, &info));
        let sizes = proto::info_block_size(1, 4096, 32 << 20);
        out.extend(proto::option_reply(proto::OPT_GO, proto::REP_INFO, &sizes));
        out.extend(proto::option_reply(proto::OPT_GO, proto::REP_ACK, &[]));
        out
    }

    /// The client's end of a scripted server, everything it says queued up front, and the
    /// server's end (kept open: what the client sends lands there).
    async fn scripted(server_says: &[u8]) -> (DuplexStream, DuplexStream) {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        theirs.write_all(server_says).await.unwrap();
        (ours, theirs)
    }

    #[test]
    fn go_option_encodes_name_and_no_requests() {
        let bytes = go_option("d0");

        assert_eq!(
            bytes,
            [
                b'I', b'H', b'A', b'V', b'E', b'O', b'P', b'T', 0, 0, 0, 7, 0, 0, 0, 8, 0, 0, 0, 2,
                b'd', b'0', 0, 0
            ]
        );
    }

    #[test]
    fn read_request_decodes_as_a_read() {
        let bytes = request(CMD_READ, 7, 8192, 4096);

        let request = proto::decode_request(&bytes).unwrap();

        assert_eq!(
            request,
            proto::Request {
                flags: 0,
                command: proto::Command::Read,
                cookie: 7,
                offset: 8192,
                length: 4096,
            }
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn open_reads_the_export_size() {
        let (ours, _theirs) = scripted(&server_greeting_and_go()).await;

        let client = Client::open(ours, "a.raw").await.unwrap();

        assert_eq!(client.size(), 1 << 20);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn open_unknown_export_is_refused_with_the_message() {
        let mut says = proto::handshake().to_vec();
        says.extend(proto::option_reply(
            proto::OPT_GO,
            proto::REP_ERR_UNKNOWN,
            b"no such export",
        ));
        let (ours, _theirs) = scripted(&says).await;

        let err = Client::open(ours, "a.raw").await.unwrap_err();

        assert!(
            matches!(&err, Error::Refused { message, .. } if message == "no such export"),
            "{err:?}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn open_ack_without_size_is_a_protocol_error() {
        let mut says = proto::handshake().to_vec();
        says.extend(proto::option_reply(proto::OPT_GO, proto::REP_ACK, &[]));
        let (ours, _theirs) = scripted(&says).await;

        let err = Client::open(ours, "a.raw").await.unwrap_err();

        assert!(matches!(err, Error::Protocol { .. }), "{err:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn open_truncated_handshake_is_an_io_error() {
        let (ours, theirs) = scripted(&proto::handshake()[..10]).await;
        drop(theirs);

        let err = Client::open(ours, "a.raw").await.unwrap_err();

        assert!(matches!(err, Error::Io { .. }), "{err:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn read_returns_the_data_after_a_simple_reply() {
        let mut says = server_greeting_and_go();
        says.extend(proto::simple_reply(0, 1));
        says.extend(b"abcd");
        let (ours, _theirs) = scripted(&says).await;
        let mut client = Client::open(ours, "a.raw").await.unwrap();

        let data = client.read(0, 4).await.unwrap();

        assert_eq!(data, b"abcd");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn digest_reads_eight_bytes_after_a_simple_reply() {
        let mut says = server_greeting_and_go();
        says.extend(proto::simple_reply(0, 1));
        says.extend(0x0102_0304_0506_0708u64.to_be_bytes());
        let (ours, _theirs) = scripted(&says).await;
        let mut client = Client::open(ours, "a.raw").await.unwrap();

        let digest = client.digest(0, 1 << 20).await.unwrap();

        assert_eq!(digest, 0x0102_0304_0506_0708);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn read_error_reply_is_read_failed() {
        let mut says = server_greeting_and_go();
        says.extend(proto::simple_reply(proto::EIO, 1));
        let (ours, _theirs) = scripted(&says).await;
        let mut client = Client::open(ours, "a.raw").await.unwrap();

        let err = client.read(4096, 4).await.unwrap_err();

        assert!(
            matches!(
                err,
                Error::ReadFailed {
                    offset: 4096,
                    length: 4,
                    errno: 5
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn read_reply_with_another_cookie_is_a_protocol_error() {
        let mut says = server_greeting_and_go();
        says.extend(proto::simple_reply(0, 9));
        let (ours, _theirs) = scripted(&says).await;
        let mut client = Client::open(ours, "a.raw").await.unwrap();

        let err = client.read(0, 4).await.unwrap_err();

        assert!(matches!(err, Error::Protocol { .. }), "{err:?}");
    }
}
