//! The NBD wire format the replica server speaks: the fixed-newstyle handshake, option
//! haggling (`GO`, `INFO`, `EXPORT_NAME`, `LIST`, `ABORT`; everything else is refused as
//! unsupported, so clients fall back to simple replies), and transmission with simple replies.
//! All numbers are big-endian.
//!
//! ```text
//!  handshake (server → client), 18 bytes
//!   0                8                16      18
//!   +----------------+----------------+-------+
//!   | "NBDMAGIC"     | "IHAVEOPT"     | flags |   flags: FIXED_NEWSTYLE | NO_ZEROES
//!   +----------------+----------------+-------+
//!  client flags (client → server), 4 bytes: C_FIXED_NEWSTYLE | C_NO_ZEROES
//!
//!  option (client → server), 16 bytes + data
//!   0                8         12        16
//!   +----------------+---------+---------+------ - -
//!   | "IHAVEOPT"     | option  | length  | data
//!   +----------------+---------+---------+------ - -
//!  option reply (server → client), 20 bytes + data
//!   0                8         12        16        20
//!   +----------------+---------+---------+---------+------ - -
//!   | 0x3e889045565a9| option  | type    | length  | data
//!   +----------------+---------+---------+---------+------ - -
//!
//!  request (client → server), 28 bytes (+ data for WRITE)
//!   0          4       6       8                16               24        28
//!   +----------+-------+-------+----------------+----------------+---------+
//!   | 25609513 | flags | type  | cookie         | offset         | length  |
//!   +----------+-------+-------+----------------+----------------+---------+
//!  simple reply (server → client), 16 bytes (+ data for a successful READ)
//!   0          4          8                16
//!   +----------+----------+----------------+
//!   | 67446698 | error    | cookie         |
//!   +----------+----------+----------------+
//!
//!  example: a 4 KiB write at offset 8192, cookie 7, FUA:
//!   25 60 95 13 00 01 00 01 00 00 00 00 00 00 00 07 00 00 00 00 00 00 20 00 00 00 10 00
//! ```

/// "NBDMAGIC".
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": opens the handshake's second half and every option.
pub const OPTION_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Opens every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Opens every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Opens every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: no 124 zero bytes after an `EXPORT_NAME` reply.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
/// Client flag: no zeroes.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags: flags are valid.
pub const TX_HAS_FLAGS: u16 = 1;
/// Transmission flags: read-only export.
pub const TX_READ_ONLY: u16 = 1 << 1;
/// Transmission flags: FLUSH is understood.
pub const TX_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flags: FUA is understood.
pub const TX_SEND_FUA: u16 = 1 << 3;
/// Transmission flags: TRIM is understood.
pub const TX_SEND_TRIM: u16 = 1 << 5;
/// Transmission flags: WRITE_ZEROES is understood.
pub const TX_SEND_WRITE_ZEROES: u16 = 1 << 6;

/// Option: the old way to pick an export and start transmission.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the handshake.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and start transmission.
pub const OPT_GO: u32 = 7;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export's name (to `LIST`).
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of information (to `INFO` and `GO`).
pub const REP_INFO: u32 = 3;
/// Option reply error: unsupported option.
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
/// Option reply error: malformed option.
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
/// Option reply error: no such export.
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

/// Information item: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information item: block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command flag: force unit access (durable before the reply).
pub const CMD_FLAG_FUA: u16 = 1;

/// Error: I/O error.
pub const EIO: u32 = 5;
/// Error: invalid argument (out of range, too long).
pub const EINVAL: u32 = 22;
/// Error: no space left.
pub const ENOSPC: u32 = 28;
/// Error: operation not supported.
pub const ENOTSUP: u32 = 95;
/// Error: the export is read-only.
pub const EPERM: u32 = 1;

/// Length of a request header.
pub const REQUEST_LEN: usize = 28;
/// Length of an option header.
pub const OPTION_LEN: usize = 16;

/// Errors decoding what a client sent: each ends the connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The client did not ask for fixed newstyle.
    #[error("client flags {0:#x} lack fixed newstyle")]
    ClientFlags(u32),
    /// A magic number is wrong.
    #[error("bad {what} magic {got:#x}")]
    Magic {
        /// Which magic.
        what: &'static str,
        /// What arrived.
        got: u64,
    },
    /// An option's data is malformed.
    #[error("malformed {option} option: {reason}")]
    Option {
        /// The option's name.
        option: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// An option's data is longer than we accept.
    #[error("option data of {0} bytes is too long")]
    OptionTooLong(u32),
}

/// A command of the transmission phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Read `length` bytes.
    Read,
    /// Write `length` bytes (which follow the header).
    Write,
    /// Disconnect.
    Disconnect,
    /// Make every completed write durable.
    Flush,
    /// Discard a range (may read back as zeroes).
    Trim,
    /// Write zeroes to a range.
    WriteZeroes,
    /// Ours, outside the standard's numbers ([`CMD_DIGEST`]): reply with the range's
    /// [`digest`] (8 bytes) instead of its bytes.
    Digest,
    /// Any other command (answered ENOTSUP).
    Other(u16),
}

/// Wire number of [`Command::Digest`]: the verify compares both copies of a disk by digests
/// computed where each copy lies, so that only 8 bytes per extent cross the A-Links.
pub const CMD_DIGEST: u16 = 0x5076;

/// The digest of an extent, computed the same way on both hosts (64-bit xxh3: fast, and a
/// chance of 2^-64 that two different extents look equal).
pub fn digest(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

impl Command {
    fn from_wire(kind: u16) -> Command {
        match kind {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disconnect,
            3 => Command::Flush,
            4 => Command::Trim,
            6 => Command::WriteZeroes,
            CMD_DIGEST => Command::Digest,
            other => Command::Other(other),
        }
    }
}

/// A request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags (e.g. [`CMD_FLAG_FUA`]).
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Byte count.
    pub length: u32,
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(b)
}

/// Decodes a request header.
pub fn decode_request(bytes: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
    let magic = u32_at(bytes, 0);
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::Magic {
            what: "request",
            got: u64::from(magic),
        });
    }
    Ok(Request {
        flags: u16_at(bytes, 4),
        command: Command::from_wire(u16_at(bytes, 6)),
        cookie: u64_at(bytes, 8),
        offset: u64_at(bytes, 16),
        length: u32_at(bytes, 24),
    })
}

/// The server's handshake.
pub fn handshake() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&OPTION_MAGIC.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// Checks the client's flags; returns whether it asked for no zeroes.
pub fn client_flags(flags: u32) -> Result<bool, ProtoError> {
    if flags & CLIENT_FIXED_NEWSTYLE == 0 {
        return Err(ProtoError::ClientFlags(flags));
    }
    Ok(flags & CLIENT_NO_ZEROES != 0)
}

/// An option header: the option and its data length.
pub fn decode_option(bytes: &[u8; OPTION_LEN], max_len: u32) -> Result<(u32, u32), ProtoError> {
    let magic = u64_at(bytes, 0);
    if magic != OPTION_MAGIC {
        return Err(ProtoError::Magic {
            what: "option",
            got: magic,
        });
    }
    let length = u32_at(bytes, 12);
    if length > max_len {
        return Err(ProtoError::OptionTooLong(length));
    }
    Ok((u32_at(bytes, 8), length))
}

/// An option reply.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// The export name of a `GO` or `INFO` option's data (its information requests are ignored:
/// the server always sends size, flags and block sizes).
pub fn go_export_name(data: &[u8]) -> Result<String, ProtoError> {
    let invalid = |reason| ProtoError::Option {
        option: "GO/INFO",
        reason,
    };
    if data.len() < 6 {
        return Err(invalid("shorter than its fixed fields"));
    }
    let name_len = usize::try_from(u32_at(data, 0)).unwrap_or(usize::MAX);
    let name_end = name_len
        .checked_add(4)
        .filter(|end| *end + 2 <= data.len())
        .ok_or(invalid("name longer than the data"))?;
    let requests = usize::from(u16_at(data, name_end));
    if name_end + 2 + 2 * requests != data.len() {
        return Err(invalid("information requests do not match the length"));
    }
    String::from_utf8(data[4..name_end].to_vec()).map_err(|_| invalid("name is not UTF-8"))
}

/// The `INFO_EXPORT` item: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out
}

/// The `INFO_BLOCK_SIZE` item: minimum, preferred and maximum block sizes.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out.extend_from_slice(&minimum.to_be_bytes());
    out.extend_from_slice(&preferred.to_be_bytes());
    out.extend_from_slice(&maximum.to_be_bytes());
    out
}

/// The reply to `EXPORT_NAME`: size and flags (and 124 zero bytes unless the client asked for
/// none).
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

/// A simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&cookie.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FUA_WRITE: [u8; REQUEST_LEN] = [
        0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0x20, 0, 0,
        0, 0x10, 0,
    ];

    fn go_data(name: &str, requests: u16) -> Vec<u8> {
        let mut data = Vec::new();
        data.extend_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&requests.to_be_bytes());
        for _ in 0..requests {
            data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        }
        data
    }

    #[test]
    fn decode_request_reads_documented_example() {
        let request = decode_request(&FUA_WRITE).unwrap();

        assert_eq!(
            request,
            Request {
                flags: CMD_FLAG_FUA,
                command: Command::Write,
                cookie: 7,
                offset: 8192,
                length: 4096,
            }
        );
    }

    #[test]
    fn decode_request_bad_magic_is_refused() {
        let mut bytes = FUA_WRITE;
        bytes[0] = 0;

        let err = decode_request(&bytes).unwrap_err();

        assert_eq!(
            err,
            ProtoError::Magic {
                what: "request",
                got: 0x0060_9513
            }
        );
    }

    #[test]
    fn decode_request_unknown_command_is_other() {
        let mut bytes = FUA_WRITE;
        bytes[7] = 9;

        let request = decode_request(&bytes).unwrap();

        assert_eq!(request.command, Command::Other(9));
    }

    #[test]
    fn handshake_starts_with_both_magics_and_flags() {
        let bytes = handshake();

        assert_eq!(&bytes[..8], b"NBDMAGIC");
        assert_eq!(&bytes[8..16], b"IHAVEOPT");
        assert_eq!(bytes[16..], [0, 3]);
    }

    #[test]
    fn client_flags_without_fixed_newstyle_are_refused() {
        let err = client_flags(CLIENT_NO_ZEROES).unwrap_err();

        assert_eq!(err, ProtoError::ClientFlags(2));
    }

    #[test]
    fn decode_option_too_long_is_refused() {
        let mut bytes = [0u8; OPTION_LEN];
        bytes[..8].copy_from_slice(b"IHAVEOPT");
        bytes[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        bytes[12..].copy_from_slice(&5000u32.to_be_bytes());

        let err = decode_option(&bytes, 4096).unwrap_err();

        assert_eq!(err, ProtoError::OptionTooLong(5000));
    }

    #[test]
    fn go_export_name_reads_name_with_requests() {
        let name = go_export_name(&go_data("disk0", 2)).unwrap();

        assert_eq!(name, "disk0");
    }

    #[test]
    fn go_export_name_truncated_is_refused() {
        let data = go_data("disk0", 1);

        let err = go_export_name(&data[..data.len() - 1]).unwrap_err();

        assert!(matches!(err, ProtoError::Option { .. }));
    }

    #[test]
    fn go_export_name_length_past_the_end_is_refused() {
        let mut data = go_data("disk0", 0);
        data[3] = 200;

        let err = go_export_name(&data).unwrap_err();

        assert_eq!(
            err,
            ProtoError::Option {
                option: "GO/INFO",
                reason: "name longer than the data"
            }
        );
    }

    #[test]
    fn option_reply_carries_its_length() {
        let bytes = option_reply(OPT_GO, REP_ACK, &[]);

        assert_eq!(bytes.len(), 20);
        assert_eq!(&bytes[16..], [0, 0, 0, 0]);
    }

    #[test]
    fn simple_reply_echoes_cookie() {
        let bytes = simple_reply(EIO, 0x0102_0304_0506_0708);

        assert_eq!(&bytes[4..8], [0, 0, 0, 5]);
        assert_eq!(&bytes[8..], [1, 2, 3, 4, 5, 6, 7, 8]);
    }

    proptest::proptest! {
        /// Whatever a client sends, decoding answers (an error at worst) and never panics.
        #[test]
        fn decoders_never_panic_on_arbitrary_bytes(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            header in proptest::array::uniform28(proptest::prelude::any::<u8>()),
            option in proptest::array::uniform16(proptest::prelude::any::<u8>()),
        ) {
            let _ = go_export_name(&data);
            let _ = decode_request(&header);
            let _ = decode_option(&option, 4096);
        }
    }

    #[test]
    fn export_name_reply_without_zeroes_is_ten_bytes() {
        let bytes = export_name_reply(1 << 20, TX_HAS_FLAGS, true);

        assert_eq!(bytes.len(), 10);
    }
}
