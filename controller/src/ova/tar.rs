//! The tar (ustar) framing of an OVA: a 512-byte header before each file, its bytes padded
//! to 512, and two zero blocks at the end. Sizes from 8 GiB on use the base-256 size field
//! that GNU tar, Python and the OVF tools read. Reading accepts plain files only: an OVA
//! holds nothing else, and tar's extension headers could rename or resize what follows.

/// Bytes of a tar block.
pub const BLOCK: u64 = 512;

/// The zero blocks that end an archive.
pub const TRAILER: [u8; 1024] = [0; 1024];

/// The largest size the octal field holds (11 digits).
const OCTAL_MAX: u64 = 0o777_7777_7777;

/// Bytes a file of `size` takes in the archive: its header, its bytes and their padding.
pub fn entry_len(size: u64) -> u64 {
    BLOCK + size.div_ceil(BLOCK) * BLOCK
}

/// The zero bytes that pad a file of `size` to a whole block.
pub fn padding(size: u64) -> Vec<u8> {
    // The remainder is below 512, so it fits any usize.
    let rest = usize::try_from(size % BLOCK).unwrap_or(0);
    vec![0; if rest == 0 { 0 } else { 512 - rest }]
}

/// The header of a regular file `name` (at most 100 bytes) of `size` bytes, written at
/// `mtime` (seconds since the epoch).
pub fn header(name: &str, size: u64, mtime: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    let name = name.as_bytes();
    let n = name.len().min(100);
    h[..n].copy_from_slice(&name[..n]);
    octal(&mut h[100..108], 0o644);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    if size <= OCTAL_MAX {
        octal(&mut h[124..136], size);
    } else {
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    octal(&mut h[136..148], mtime.min(OCTAL_MAX));
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    // The checksum is the byte sum with its own field read as spaces.
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    octal(&mut h[148..155], u64::from(sum));
    h[155] = b' ';
    h
}

/// Why a tar header cannot be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The header's checksum does not match its bytes.
    #[error("a tar header's checksum does not match: the archive is corrupt")]
    Checksum,
    /// A numeric field is not a number.
    #[error("a tar header's {field} field is unreadable: the archive is corrupt")]
    Field {
        /// The field.
        field: &'static str,
    },
    /// The entry is not a plain file.
    #[error(
        "entry {name} is of tar type {kind:?}; an OVA holds plain files in ustar or GNU format only (pax or long-name headers are not read): re-create it with `tar --format=gnu -cf FILE.ova` and names under 100 characters"
    )]
    NotAFile {
        /// Its name.
        name: String,
        /// Its type flag.
        kind: char,
    },
}

/// A file's header as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its name (with the ustar prefix, if any).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

/// Reads header block `h`: `None` for a zero block (the archive's end).
pub fn parse_header(h: &[u8; 512]) -> Result<Option<Entry>, Error> {
    if h.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let stored = read_octal(&h[148..156]).ok_or(Error::Field { field: "checksum" })?;
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| u64::from(if (148..156).contains(&i) { b' ' } else { b }))
        .sum();
    if sum != stored {
        return Err(Error::Checksum);
    }
    let mut name = text(&h[..100]);
    if &h[257..262] == b"ustar" {
        let prefix = text(&h[345..500]);
        if !prefix.is_empty() {
            name = format!("{prefix}/{name}");
        }
    }
    // GNU tar writes `./NAME` when given `.`; the descriptor's references have no prefix.
    if let Some(plain) = name.strip_prefix("./") {
        name = plain.to_string();
    }
    let kind = h[156];
    if kind != b'0' && kind != 0 {
        return Err(Error::NotAFile {
            name,
            kind: char::from(kind),
        });
    }
    let size = if h[124] & 0x80 != 0 {
        let mut size = [0u8; 8];
        size.copy_from_slice(&h[128..136]);
        if h[124..128] != [0x80, 0, 0, 0] {
            return Err(Error::Field { field: "size" });
        }
        u64::from_be_bytes(size)
    } else {
        read_octal(&h[124..136]).ok_or(Error::Field { field: "size" })?
    };
    Ok(Some(Entry { name, size }))
}

/// A NUL-terminated text field.
fn text(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// An octal field, with optional leading spaces and a NUL or space after the digits.
fn read_octal(field: &[u8]) -> Option<u64> {
    let digits: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| b != 0 && b != b' ')
        .collect();
    let text = std::str::from_utf8(&digits).ok()?;
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

/// Writes `value` as zero-padded octal digits ending in NUL across `field`.
fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    let text = &text.as_bytes()[text.len().saturating_sub(digits)..];
    field[..digits].copy_from_slice(text);
    field[digits] = 0;
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, data) in files {
            out.extend_from_slice(&header(name, data.len() as u64, 1_700_000_000));
            out.extend_from_slice(data);
            out.extend_from_slice(&padding(data.len() as u64));
        }
        out.extend_from_slice(&TRAILER);
        out
    }

    #[test]
    fn gnu_tar_lists_and_extracts_what_we_write() {
        let dir = tempfile::tempdir().expect("temp dir");
        let bytes = archive(&[
            ("vm.ovf", b"<Envelope/>\n"),
            ("vm-disk1.vmdk", &[7u8; 1000]),
        ]);
        let path = dir.path().join("vm.ova");
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(&bytes))
            .expect("archive written");
        let expected: u64 = entry_len(12) + entry_len(1000) + 1024;
        assert_eq!(bytes.len() as u64, expected);

        let out = std::process::Command::new("tar")
            .args(["-xf", "vm.ova"])
            .current_dir(dir.path())
            .output()
            .expect("tar runs");

        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ovf = std::fs::read(dir.path().join("vm.ovf")).expect("ovf extracted");
        assert_eq!(ovf, b"<Envelope/>\n");
        let disk = std::fs::read(dir.path().join("vm-disk1.vmdk")).expect("disk extracted");
        assert_eq!(disk, vec![7u8; 1000]);
    }

    #[test]
    fn a_size_past_the_octal_field_uses_base_256() {
        let h = header("big.vmdk", 9 << 30, 0);

        assert_eq!(h[124], 0x80);
        assert_eq!(
            u64::from_be_bytes(h[128..136].try_into().expect("8 bytes")),
            9 << 30
        );
    }

    #[test]
    fn headers_read_back_what_we_write_and_what_gnu_tar_writes() {
        assert_eq!(
            parse_header(&header("vm.ovf", 12, 5)).unwrap(),
            Some(Entry {
                name: "vm.ovf".into(),
                size: 12
            })
        );
        assert_eq!(
            parse_header(&header("big.vmdk", 9 << 30, 0))
                .unwrap()
                .unwrap()
                .size,
            9 << 30
        );
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("a.vmdk"), [1u8; 700]).expect("file");
        let out = std::process::Command::new("tar")
            .args(["--format=ustar", "-cf", "-", "a.vmdk"])
            .current_dir(dir.path())
            .output()
            .expect("tar runs");
        let block: [u8; 512] = out.stdout[..512].try_into().expect("a block");

        assert_eq!(
            parse_header(&block).unwrap(),
            Some(Entry {
                name: "a.vmdk".into(),
                size: 700
            })
        );
    }

    #[test]
    fn a_damaged_header_a_link_and_the_end_are_told_apart() {
        let mut damaged = header("vm.ovf", 12, 5);
        damaged[3] ^= 1;
        let mut link = header("x", 0, 0);
        link[156] = b'2';
        link[148..156].copy_from_slice(b"        ");
        let sum: u32 = link.iter().map(|&b| u32::from(b)).sum();
        octal(&mut link[148..155], u64::from(sum));

        assert_eq!(parse_header(&damaged), Err(Error::Checksum));
        assert!(matches!(
            parse_header(&link),
            Err(Error::NotAFile { kind: '2', .. })
        ));
        assert_eq!(parse_header(&[0; 512]), Ok(None));
        let dotted = parse_header(&header("./vm.ovf", 1, 0)).unwrap().unwrap();
        assert_eq!(dotted.name, "vm.ovf");
    }

    #[test]
    fn padding_fills_to_a_block() {
        assert!(padding(1024).is_empty());
        assert_eq!(padding(1).len(), 511);
        assert_eq!(entry_len(0), 512);
        assert_eq!(entry_len(513), 1536);
    }
}
