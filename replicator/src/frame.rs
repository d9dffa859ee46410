//! Frame codec: the unit every A-Link carries.
//!
//! # Wire format (version 1)
//!
//! Every frame is a fixed 28-byte header followed by `len` payload bytes. All integers are
//! big-endian.
//!
//! ```text
//!  0       4     5     6        8            12                     20           24        28
//!  +-------+-----+-----+--------+------------+----------------------+------------+---------+----------
//!  | magic | ver |kind | flags  | stream id  | sequence             | payload len| crc32   | payload …
//!  | "PVAL"| u8  | u8  | u16    | u32        | u64                  | u32        | u32     | len bytes
//!  +-------+-----+-----+--------+------------+----------------------+------------+---------+----------
//! ```
//!
//! - `magic` is the ASCII bytes `PVAL`; `ver` is [`VERSION`].
//! - `kind` is a [`FrameKind`]; 0 is [`FrameKind::Invalid`] and is never sent.
//! - `flags` is a [`Flags`] bit set; unknown bits are rejected.
//! - `stream id` and `sequence` are interpreted by the link layer (see `crate::link`): for
//!   sequenced kinds (`Open`, `Data`, `Close`) the sequence is the session sequence number; for
//!   control kinds it carries the kind's value (cumulative ack, credit, ping timestamp).
//! - `payload len` is bounded by the decoder's configured maximum; it is checked before any
//!   buffer is grown.
//! - `crc32` is the CRC-32 (IEEE, as computed by `crc32fast`) over header bytes 0..24 followed
//!   by the payload.
//!
//! # Example
//!
//! A `Data` frame on stream 1 with sequence 2 and payload `"hi"` encodes to 30 bytes:
//!
//! ```
//! use bytes::{Bytes, BytesMut};
//! use replicator::frame::{Flags, Frame, FrameCodec, FrameKind};
//!
//! let frame = Frame::new(FrameKind::Data, 1, 2, Bytes::from_static(b"hi"));
//! let mut wire = BytesMut::new();
//! FrameCodec::new(1024).encode(&frame, &mut wire).unwrap();
//! assert_eq!(
//!     &wire[..],
//!     &[
//!         0x50, 0x56, 0x41, 0x4c, // magic "PVAL"
//!         0x01, // version 1
//!         0x03, // kind Data
//!         0x00, 0x00, // flags: none
//!         0x00, 0x00, 0x00, 0x01, // stream id 1
//!         0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, // sequence 2
//!         0x00, 0x00, 0x00, 0x02, // payload length 2
//!         0x33, 0xcf, 0xf6, 0x90, // crc32 over bytes 0..24 and the payload
//!         0x68, 0x69, // payload "hi"
//!     ][..]
//! );
//! assert_eq!(FrameCodec::new(1024).decode(&mut wire).unwrap(), Some(frame));
//! # let _ = Flags::NONE;
//! ```
//!
//! # Payloads with a fixed layout
//!
//! `Hello` (30 bytes, sent first on every new connection, stream id 0, sequence 0):
//!
//! ```text
//!  0                8                16         18                22               26             30
//!  +----------------+----------------+----------+-----------------+----------------+--------------+
//!  | instance id    | generation     | link idx | session window  | stream window  | max payload  |
//!  | u64            | u64            | u16      | u32             | u32            | u32          |
//!  +----------------+----------------+----------+-----------------+----------------+--------------+
//! ```
//!
//! `Reset` (1 byte): a [`ResetReason`]; 0 is `Invalid`.
//!
//! # Decoding contract
//!
//! [`FrameCodec::decode`] returns `Ok(None)` when more bytes are needed and `Err` when the byte
//! stream is corrupt (bad magic, version, kind, flags, length or CRC). After an error the link
//! must be dropped: the codec does not try to resynchronise.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The four magic bytes that open every frame.
pub const MAGIC: [u8; 4] = *b"PVAL";
/// The wire format version this codec reads and writes.
pub const VERSION: u8 = 1;
/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 28;
/// Offset of the CRC field inside the header; the CRC covers the bytes before it.
const CRC_OFFSET: usize = 24;

/// Errors of the frame codec. Any of them means the byte stream is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The CRC in the header does not match the header and payload.
    #[error("checking frame crc: header says {expected:#010x}, computed {actual:#010x}")]
    CheckCrc {
        /// CRC carried in the header.
        expected: u32,
        /// CRC computed over the received bytes.
        actual: u32,
    },
    /// The flags field has bits this version does not define.
    #[error("checking frame flags: unknown bits {bits:#06x}")]
    CheckFlags {
        /// The offending flag bits.
        bits: u16,
    },
    /// The kind byte is 0 (`Invalid`) or not a known kind.
    #[error("checking frame kind: unknown kind {kind}")]
    CheckKind {
        /// The kind byte found.
        kind: u8,
    },
    /// The payload length exceeds the configured maximum.
    #[error("checking frame length: {len} bytes exceeds maximum {max}")]
    CheckLength {
        /// Length announced by the header.
        len: u64,
        /// Configured maximum payload length.
        max: usize,
    },
    /// The frame does not start with [`MAGIC`].
    #[error("checking frame magic: found {found:02x?}")]
    CheckMagic {
        /// The four bytes found instead.
        found: [u8; 4],
    },
    /// The version byte is not [`VERSION`].
    #[error("checking frame version: found {found}, supported {VERSION}")]
    CheckVersion {
        /// The version byte found.
        found: u8,
    },
    /// A `Hello` payload has the wrong size or invalid values.
    #[error("decoding hello payload: {len} bytes, expected {HELLO_LEN} with non-zero limits")]
    DecodeHello {
        /// Payload length found.
        len: usize,
    },
    /// A `Reset` payload is not one known reason byte.
    #[error("decoding reset payload: {found:02x?}")]
    DecodeReset {
        /// The payload found.
        found: Vec<u8>,
    },
    /// A frame to encode has a payload longer than the configured maximum.
    #[error("encoding frame: payload of {len} bytes exceeds maximum {max}")]
    EncodeLength {
        /// Payload length of the frame.
        len: usize,
        /// Configured maximum payload length.
        max: usize,
    },
    /// The byte stream ended in the middle of a frame.
    #[error("reading frame: stream ended with {buffered} bytes of an incomplete frame")]
    ReadEof {
        /// Bytes of the incomplete frame that were buffered.
        buffered: usize,
    },
}

/// What a frame means to the link layer. Byte value 0 is `Invalid` and never sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Never valid on the wire.
    Invalid = 0,
    /// Link handshake; payload is the sender's session identity.
    Hello = 1,
    /// Sequenced: opens a stream; payload is the service name.
    Open = 2,
    /// Sequenced: stream data.
    Data = 3,
    /// Sequenced: the sender will send no more data on the stream.
    Close = 4,
    /// Control: cumulative acknowledgement; `seq` is the next session sequence expected.
    Ack = 5,
    /// Control: stream credit; `seq` is the total stream bytes consumed by the receiver.
    Credit = 6,
    /// Control: the stream is unknown or abandoned at the sender of this frame.
    Reset = 7,
    /// Control: keepalive; `seq` is the sender's timestamp in microseconds.
    Ping = 8,
    /// Control: keepalive answer; `seq` echoes the ping's timestamp.
    Pong = 9,
}

impl FrameKind {
    /// Decodes a kind byte; `None` for 0 and unknown values.
    #[must_use]
    pub fn from_u8(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Hello),
            2 => Some(Self::Open),
            3 => Some(Self::Data),
            4 => Some(Self::Close),
            5 => Some(Self::Ack),
            6 => Some(Self::Credit),
            7 => Some(Self::Reset),
            8 => Some(Self::Ping),
            9 => Some(Self::Pong),
            _ => None,
        }
    }

    /// Whether frames of this kind carry a session sequence number and are acknowledged.
    #[must_use]
    pub fn is_sequenced(self) -> bool {
        matches!(self, Self::Open | Self::Data | Self::Close)
    }
}

/// Why a stream was reset: the one-byte payload of a [`FrameKind::Reset`] frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ResetReason {
    /// Never valid on the wire.
    Invalid = 0,
    /// The stream id is not known (closed, or from an earlier session).
    UnknownStream = 1,
    /// Nobody listens for the stream's service on this side.
    NoService = 2,
    /// The receiving application dropped the stream before its end.
    Abandoned = 3,
    /// This side already has its maximum number of streams open.
    TooManyStreams = 4,
}

impl ResetReason {
    /// The one-byte payload of a reset frame.
    #[must_use]
    pub fn payload(self) -> Bytes {
        Bytes::copy_from_slice(&[self as u8])
    }

    /// Decodes a reset frame's payload.
    ///
    /// # Errors
    /// [`FrameError::DecodeReset`] when the payload is not one known, non-zero reason byte.
    pub fn from_payload(payload: &[u8]) -> Result<Self, FrameError> {
        match payload {
            [1] => Ok(Self::UnknownStream),
            [2] => Ok(Self::NoService),
            [3] => Ok(Self::Abandoned),
            [4] => Ok(Self::TooManyStreams),
            _ => Err(FrameError::DecodeReset {
                found: payload.to_vec(),
            }),
        }
    }
}

/// Length of a `Hello` payload.
pub const HELLO_LEN: usize = 30;

/// The `Hello` payload: who is speaking on a new connection and what it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Random id of the sending endpoint instance (changes when the process restarts).
    pub instance: u64,
    /// Session generation of the sender (changes when it lost every link).
    pub generation: u64,
    /// Index of the link this connection belongs to.
    pub link: u16,
    /// Bytes of sequenced frames the sender buffers ahead of a gap (its session window).
    pub session_window: u32,
    /// Bytes of one stream the sender buffers before its application reads them.
    pub stream_window: u32,
    /// Largest payload the sender's decoder accepts.
    pub max_payload: u32,
}

impl Hello {
    /// Encodes the payload.
    #[must_use]
    pub fn to_payload(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(HELLO_LEN);
        out.put_u64(self.instance);
        out.put_u64(self.generation);
        out.put_u16(self.link);
        out.put_u32(self.session_window);
        out.put_u32(self.stream_window);
        out.put_u32(self.max_payload);
        out.freeze()
    }

    /// Decodes a payload.
    ///
    /// # Errors
    /// [`FrameError::DecodeHello`] for a wrong length or a zero window or payload limit.
    pub fn from_payload(mut payload: &[u8]) -> Result<Self, FrameError> {
        let len = payload.len();
        if len != HELLO_LEN {
            return Err(FrameError::DecodeHello { len });
        }
        let hello = Self {
            instance: payload.get_u64(),
            generation: payload.get_u64(),
            link: payload.get_u16(),
            session_window: payload.get_u32(),
            stream_window: payload.get_u32(),
            max_payload: payload.get_u32(),
        };
        if hello.session_window == 0 || hello.stream_window == 0 || hello.max_payload == 0 {
            return Err(FrameError::DecodeHello { len });
        }
        Ok(hello)
    }
}

/// Frame flag bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(u16);

impl Flags {
    /// No flag set.
    pub const NONE: Self = Self(0);
    /// The frame is a resend of a frame first sent on a link that failed.
    pub const RESENT: Self = Self(0x0001);
    const KNOWN: u16 = 0x0001;

    /// The raw bits.
    #[must_use]
    pub fn bits(self) -> u16 {
        self.0
    }

    /// Builds flags from raw bits, rejecting undefined bits.
    ///
    /// # Errors
    /// [`FrameError::CheckFlags`] when a bit outside the defined set is present.
    pub fn from_bits(bits: u16) -> Result<Self, FrameError> {
        if bits & !Self::KNOWN == 0 {
            Ok(Self(bits))
        } else {
            Err(FrameError::CheckFlags { bits })
        }
    }

    /// Whether every bit of `other` is set in `self`.
    #[must_use]
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union of two flag sets.
    #[must_use]
    pub fn with(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the frame means.
    pub kind: FrameKind,
    /// Flag bits.
    pub flags: Flags,
    /// Stream the frame belongs to (0 for link-level frames).
    pub stream: u32,
    /// Session sequence number, or the control kind's value.
    pub seq: u64,
    /// Payload bytes.
    pub payload: Bytes,
}

impl Frame {
    /// A frame without flags.
    #[must_use]
    pub fn new(kind: FrameKind, stream: u32, seq: u64, payload: Bytes) -> Self {
        Self {
            kind,
            flags: Flags::NONE,
            stream,
            seq,
            payload,
        }
    }

    /// Encodes the header, CRC included, for this frame's payload.
    ///
    /// The caller must have checked the payload length against its maximum (see
    /// [`FrameCodec::encode`]); a payload longer than `u32::MAX` is a programming error and
    /// is reported as [`FrameError::EncodeLength`].
    ///
    /// # Errors
    /// [`FrameError::EncodeLength`] when the payload does not fit the 32-bit length field.
    pub fn header(&self) -> Result<[u8; HEADER_LEN], FrameError> {
        let len = u32::try_from(self.payload.len()).map_err(|_| FrameError::EncodeLength {
            len: self.payload.len(),
            max: usize::try_from(u32::MAX).unwrap_or(usize::MAX),
        })?;
        let prefix = self.header_prefix(len);
        let mut header = [0u8; HEADER_LEN];
        header[..CRC_OFFSET].copy_from_slice(&prefix);
        header[CRC_OFFSET..].copy_from_slice(&crc_of(&prefix, &self.payload).to_be_bytes());
        Ok(header)
    }

    /// Header bytes 0..24: everything the CRC covers before the payload.
    fn header_prefix(&self, len: u32) -> [u8; CRC_OFFSET] {
        let mut prefix = [0u8; CRC_OFFSET];
        let mut cursor = &mut prefix[..];
        cursor.put_slice(&MAGIC);
        cursor.put_u8(VERSION);
        cursor.put_u8(self.kind as u8);
        cursor.put_u16(self.flags.bits());
        cursor.put_u32(self.stream);
        cursor.put_u64(self.seq);
        cursor.put_u32(len);
        prefix
    }
}

/// CRC-32 over a header prefix and a payload.
fn crc_of(header: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(header);
    hasher.update(payload);
    hasher.finalize()
}

/// A validated header whose payload has not fully arrived yet.
#[derive(Debug, Clone, Copy)]
struct Pending {
    kind: FrameKind,
    flags: Flags,
    stream: u32,
    seq: u64,
    len: usize,
    len32: u32,
    crc: u32,
}

/// Encoder and decoder of frames on [`BytesMut`] buffers.
///
/// The decoder keeps a validated header between calls, so a frame split across reads is
/// parsed once.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_payload: usize,
    pending: Option<Pending>,
}

impl FrameCodec {
    /// A codec accepting payloads of at most `max_payload` bytes.
    #[must_use]
    pub fn new(max_payload: usize) -> Self {
        Self {
            max_payload,
            pending: None,
        }
    }

    /// The configured maximum payload length.
    #[must_use]
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// How many more bytes `src` needs before the next frame can be complete.
    #[must_use]
    pub fn needed(&self, src: &BytesMut) -> usize {
        match self.pending {
            Some(pending) => pending.len.saturating_sub(src.len()),
            None => HEADER_LEN.saturating_sub(src.len()),
        }
    }

    /// Appends the encoded frame to `dst`.
    ///
    /// # Errors
    /// [`FrameError::EncodeLength`] when the payload exceeds the configured maximum.
    pub fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        if frame.payload.len() > self.max_payload {
            return Err(FrameError::EncodeLength {
                len: frame.payload.len(),
                max: self.max_payload,
            });
        }
        let header = frame.header()?;
        dst.reserve(HEADER_LEN + frame.payload.len());
        dst.put_slice(&header);
        dst.put_slice(&frame.payload);
        Ok(())
    }

    /// Takes one frame from the front of `src`.
    ///
    /// Returns `Ok(None)` when `src` does not hold a whole frame yet; the bytes stay in `src`
    /// (a validated header is consumed and remembered) and [`needed`](Self::needed) tells how
    /// many more are missing — the caller makes room for them (the decoder never grows `src`,
    /// so a peer cannot make it allocate). The payload is split off `src` without copying.
    ///
    /// # Errors
    /// Any [`FrameError`] of the `Check*` family: the stream is corrupt and must be dropped.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let pending = match self.pending {
            Some(pending) => pending,
            None => {
                if src.len() < HEADER_LEN {
                    return Ok(None);
                }
                let pending = self.parse_header(&src[..HEADER_LEN])?;
                src.advance(HEADER_LEN);
                self.pending = Some(pending);
                pending
            }
        };
        if src.len() < pending.len {
            return Ok(None);
        }
        self.pending = None;
        let payload = src.split_to(pending.len).freeze();
        let frame = Frame {
            kind: pending.kind,
            flags: pending.flags,
            stream: pending.stream,
            seq: pending.seq,
            payload,
        };
        let actual = crc_of(&frame.header_prefix(pending.len32), &frame.payload);
        if actual != pending.crc {
            return Err(FrameError::CheckCrc {
                expected: pending.crc,
                actual,
            });
        }
        Ok(Some(frame))
    }

    /// Like [`decode`](Self::decode), for when the byte stream has ended: a partial frame
    /// left in `src` is an error instead of `Ok(None)`.
    ///
    /// # Errors
    /// Those of `decode`, and [`FrameError::ReadEof`] for an incomplete trailing frame.
    pub fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() && self.pending.is_none() => Ok(None),
            None => {
                let header = if self.pending.is_some() {
                    HEADER_LEN
                } else {
                    0
                };
                Err(FrameError::ReadEof {
                    buffered: header + src.len(),
                })
            }
        }
    }

    /// Validates a complete header; the length is checked here, before anything is reserved.
    fn parse_header(&self, mut header: &[u8]) -> Result<Pending, FrameError> {
        let mut magic = [0u8; 4];
        header.copy_to_slice(&mut magic);
        if magic != MAGIC {
            return Err(FrameError::CheckMagic { found: magic });
        }
        let version = header.get_u8();
        if version != VERSION {
            return Err(FrameError::CheckVersion { found: version });
        }
        let kind_byte = header.get_u8();
        let kind =
            FrameKind::from_u8(kind_byte).ok_or(FrameError::CheckKind { kind: kind_byte })?;
        let flags = Flags::from_bits(header.get_u16())?;
        let stream = header.get_u32();
        let seq = header.get_u64();
        let len32 = header.get_u32();
        let crc = header.get_u32();
        let len = usize::try_from(len32)
            .ok()
            .filter(|len| *len <= self.max_payload)
            .ok_or(FrameError::CheckLength {
                len: u64::from(len32),
                max: self.max_payload,
            })?;
        Ok(Pending {
            kind,
            flags,
            stream,
            seq,
            len,
            len32,
            crc,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MAX: usize = 1024;

    fn data_frame(payload: &'static [u8]) -> Frame {
        Frame::new(FrameKind::Data, 7, 42, Bytes::from_static(payload))
    }

    fn encoded(frame: &Frame) -> BytesMut {
        let mut wire = BytesMut::new();
        FrameCodec::new(MAX).encode(frame, &mut wire).unwrap();
        wire
    }

    #[test]
    fn decode_whole_frame_returns_frame_and_consumes_bytes() {
        // Arrange
        let frame = data_frame(b"payload");
        let mut wire = encoded(&frame);
        let mut codec = FrameCodec::new(MAX);
        // Act
        let decoded = codec.decode(&mut wire);
        // Assert
        assert_eq!(decoded, Ok(Some(frame)));
        assert!(wire.is_empty());
    }

    #[test]
    fn decode_split_header_waits_then_returns_frame() {
        // Arrange
        let frame = data_frame(b"abc");
        let whole = encoded(&frame);
        let mut codec = FrameCodec::new(MAX);
        let mut wire = BytesMut::from(&whole[..10]);
        // Act
        let first = codec.decode(&mut wire);
        wire.extend_from_slice(&whole[10..]);
        let second = codec.decode(&mut wire);
        // Assert
        assert_eq!(first, Ok(None));
        assert_eq!(second, Ok(Some(frame)));
    }

    #[test]
    fn decode_pending_payload_waits_then_returns_frame() {
        // Arrange
        let frame = data_frame(b"0123456789");
        let whole = encoded(&frame);
        let mut codec = FrameCodec::new(MAX);
        let mut wire = BytesMut::from(&whole[..HEADER_LEN + 4]);
        // Act
        let first = codec.decode(&mut wire);
        let second = codec.decode(&mut wire);
        wire.extend_from_slice(&whole[HEADER_LEN + 4..]);
        let third = codec.decode(&mut wire);
        // Assert
        assert_eq!(first, Ok(None));
        assert_eq!(second, Ok(None));
        assert_eq!(third, Ok(Some(frame)));
    }

    #[test]
    fn decode_two_frames_in_one_buffer_returns_both_in_order() {
        // Arrange
        let one = data_frame(b"one");
        let two = Frame::new(FrameKind::Ack, 0, 9, Bytes::new());
        let mut wire = encoded(&one);
        wire.extend_from_slice(&encoded(&two));
        let mut codec = FrameCodec::new(MAX);
        // Act
        let first = codec.decode(&mut wire);
        let second = codec.decode(&mut wire);
        let third = codec.decode(&mut wire);
        // Assert
        assert_eq!(first, Ok(Some(one)));
        assert_eq!(second, Ok(Some(two)));
        assert_eq!(third, Ok(None));
    }

    #[test]
    fn decode_oversize_length_fails_before_reserving() {
        // Arrange
        let mut wire = encoded(&data_frame(b"x"));
        wire[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
        let capacity_before = wire.capacity();
        let mut codec = FrameCodec::new(MAX);
        // Act
        let decoded = codec.decode(&mut wire);
        // Assert
        assert_eq!(
            decoded,
            Err(FrameError::CheckLength {
                len: u64::from(u32::MAX),
                max: MAX
            })
        );
        assert_eq!(wire.capacity(), capacity_before);
    }

    #[test]
    fn decode_truncated_payload_at_eof_reports_read_eof() {
        // Arrange
        let whole = encoded(&data_frame(b"truncated"));
        let mut wire = BytesMut::from(&whole[..whole.len() - 3]);
        let mut codec = FrameCodec::new(MAX);
        // Act
        let decoded = codec.decode_eof(&mut wire);
        // Assert
        assert_eq!(
            decoded,
            Err(FrameError::ReadEof {
                buffered: whole.len() - 3
            })
        );
    }

    #[test]
    fn decode_eof_on_empty_buffer_returns_none() {
        // Arrange
        let mut wire = BytesMut::new();
        let mut codec = FrameCodec::new(MAX);
        // Act
        let decoded = codec.decode_eof(&mut wire);
        // Assert
        assert_eq!(decoded, Ok(None));
    }

    #[test]
    fn decode_flipped_crc_bit_reports_check_crc() {
        // Arrange
        let mut wire = encoded(&Frame::new(
            FrameKind::Data,
            1,
            2,
            Bytes::from_static(b"hi"),
        ));
        wire[CRC_OFFSET + 3] ^= 0x01;
        let mut codec = FrameCodec::new(MAX);
        // Act
        let decoded = codec.decode(&mut wire);
        // Assert
        assert_eq!(
            decoded,
            Err(FrameError::CheckCrc {
                expected: 0x33cf_f691,
                actual: 0x33cf_f690
            })
        );
    }

    #[test]
    fn decode_flipped_payload_bit_reports_check_crc() {
        // Arrange
        let mut wire = encoded(&data_frame(b"hi"));
        wire[HEADER_LEN] ^= 0x80;
        let mut codec = FrameCodec::new(MAX);
        // Act
        let decoded = codec.decode(&mut wire);
        // Assert
        assert!(matches!(decoded, Err(FrameError::CheckCrc { .. })));
    }

    #[test]
    fn decode_bad_magic_reports_check_magic() {
        // Arrange
        let mut wire = encoded(&data_frame(b"hi"));
        wire[0] = b'X';
        let mut codec = FrameCodec::new(MAX);
        // Act
        let decoded = codec.decode(&mut wire);
        // Assert
        assert_eq!(decoded, Err(FrameError::CheckMagic { found: *b"XVAL" }));
    }

    #[test]
    fn decode_wrong_version_reports_check_version() {
        // Arrange
        let mut wire = encoded(&data_frame(b"hi"));
        wire[4] = 2;
        let mut codec = FrameCodec::new(MAX);
        // Act
        let decoded = codec.decode(&mut wire);
        // Assert
        assert_eq!(decoded, Err(FrameError::CheckVersion { found: 2 }));
    }

    #[test]
    fn decode_invalid_kind_reports_check_kind() {
        // Arrange
        let mut wire = encoded(&data_frame(b"hi"));
        wire[5] = FrameKind::Invalid as u8;
        let mut codec = FrameCodec::new(MAX);
        // Act
        let decoded = codec.decode(&mut wire);
        // Assert
        assert_eq!(decoded, Err(FrameError::CheckKind { kind: 0 }));
    }

    #[test]
    fn decode_unknown_flag_reports_check_flags() {
        // Arrange
        let mut wire = encoded(&data_frame(b"hi"));
        wire[6] = 0x80;
        let mut codec = FrameCodec::new(MAX);
        // Act
        let decoded = codec.decode(&mut wire);
        // Assert
        assert_eq!(decoded, Err(FrameError::CheckFlags { bits: 0x8000 }));
    }

    #[test]
    fn encode_oversize_payload_reports_encode_length() {
        // Arrange
        let frame = Frame::new(FrameKind::Data, 1, 1, Bytes::from(vec![0u8; MAX + 1]));
        let mut wire = BytesMut::new();
        // Act
        let encoded = FrameCodec::new(MAX).encode(&frame, &mut wire);
        // Assert
        assert_eq!(
            encoded,
            Err(FrameError::EncodeLength {
                len: MAX + 1,
                max: MAX
            })
        );
        assert!(wire.is_empty());
    }

    #[test]
    fn encode_resent_flag_round_trips() {
        // Arrange
        let mut frame = data_frame(b"again");
        frame.flags = Flags::NONE.with(Flags::RESENT);
        let mut wire = encoded(&frame);
        // Act
        let decoded = FrameCodec::new(MAX).decode(&mut wire);
        // Assert
        assert_eq!(decoded, Ok(Some(frame)));
    }

    #[test]
    fn hello_round_trip_returns_same_values() {
        // Arrange
        let hello = Hello {
            instance: 1,
            generation: 2,
            link: 3,
            session_window: 4,
            stream_window: 5,
            max_payload: 6,
        };
        // Act
        let decoded = Hello::from_payload(&hello.to_payload());
        // Assert
        assert_eq!(decoded, Ok(hello));
    }

    #[test]
    fn hello_short_payload_reports_decode_hello() {
        // Arrange
        let payload = [0u8; 12];
        // Act
        let decoded = Hello::from_payload(&payload);
        // Assert
        assert_eq!(decoded, Err(FrameError::DecodeHello { len: 12 }));
    }

    #[test]
    fn reset_reason_zero_reports_decode_reset() {
        // Arrange
        let payload = [0u8];
        // Act
        let decoded = ResetReason::from_payload(&payload);
        // Assert
        assert_eq!(decoded, Err(FrameError::DecodeReset { found: vec![0] }));
    }

    #[test]
    fn reset_reason_round_trip_returns_same_reason() {
        // Arrange
        let reason = ResetReason::NoService;
        // Act
        let decoded = ResetReason::from_payload(&reason.payload());
        // Assert
        assert_eq!(decoded, Ok(reason));
    }

    #[test]
    fn kind_from_u8_zero_is_none() {
        // Arrange
        let byte = 0u8;
        // Act
        let kind = FrameKind::from_u8(byte);
        // Assert
        assert_eq!(kind, None);
    }

    fn arb_kind() -> impl Strategy<Value = FrameKind> {
        (1u8..=9).prop_map(|byte| FrameKind::from_u8(byte).unwrap_or(FrameKind::Data))
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let flags = prop_oneof![Just(Flags::NONE), Just(Flags::RESENT)];
        let payload = proptest::collection::vec(any::<u8>(), 0..300);
        (arb_kind(), flags, any::<u32>(), any::<u64>(), payload).prop_map(
            |(kind, flags, stream, seq, payload)| Frame {
                kind,
                flags,
                stream,
                seq,
                payload: Bytes::from(payload),
            },
        )
    }

    proptest! {
        #[test]
        fn prop_round_trip_split_anywhere_returns_same_frame(frame in arb_frame(), split in any::<usize>()) {
            let whole = encoded(&frame);
            let cut = split % whole.len();
            let mut codec = FrameCodec::new(MAX);
            let mut wire = BytesMut::from(&whole[..cut]);
            let first = codec.decode(&mut wire);
            wire.extend_from_slice(&whole[cut..]);
            let second = codec.decode(&mut wire);
            prop_assert_eq!(first, Ok(None));
            prop_assert_eq!(second, Ok(Some(frame)));
            prop_assert!(wire.is_empty());
        }

        #[test]
        fn prop_single_corrupted_byte_is_detected(frame in arb_frame(), index in any::<usize>(), xor in 1u8..=255) {
            let mut wire = encoded(&frame);
            let at = index % wire.len();
            wire[at] ^= xor;
            let decoded = FrameCodec::new(MAX).decode_eof(&mut wire);
            prop_assert!(decoded.is_err(), "corruption at {} went undetected: {:?}", at, decoded);
        }

        #[test]
        fn prop_truncated_frame_is_detected(frame in arb_frame(), cut in any::<usize>()) {
            let whole = encoded(&frame);
            let keep = 1 + cut % (whole.len() - 1);
            let mut wire = BytesMut::from(&whole[..keep]);
            let decoded = FrameCodec::new(MAX).decode_eof(&mut wire);
            prop_assert_eq!(decoded, Err(FrameError::ReadEof { buffered: keep }));
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut wire = BytesMut::from(&bytes[..]);
            let mut codec = FrameCodec::new(MAX);
            let _first = codec.decode(&mut wire);
            let _second = codec.decode_eof(&mut wire);
        }
    }
}
