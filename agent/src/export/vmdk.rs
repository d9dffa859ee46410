//! A raw disk written as a stream-optimized VMDK, the disk format every OVA consumer reads.
//!
//! We write it rather than `qemu-img convert`, which deflates every grain at zlib's default
//! level on one thread: about 50 MB/s on data that does not shrink, the export's whole cost.
//! Here grains are deflated at the fast level on every core, and a grain whose sampled byte
//! entropy says it would not shrink (already-compressed or encrypted data) is kept in stored
//! deflate blocks: still the zlib stream the format requires, written at memory speed. Holes
//! and all-zero grains are left out (an unallocated grain reads as zeros).
//!
//! The layout is qemu-img's, which VMware and VirtualBox import: sector 0 the header, sectors
//! 1–20 the descriptor, the redundant grain directory and its tables, the grain directory and
//! its tables, then from `grain_offset` each grain with data as a 12-byte marker (its first
//! sector in the disk, its compressed length), its zlib stream, padding to a sector. The
//! directories are written last, at the front, once every grain's place is known.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

use flate2::Compression;
use flate2::write::ZlibEncoder;

use crate::seek;

const SECTOR: u64 = 512;
const SECTOR_BYTES: usize = 512;
/// Sectors per grain (64 KiB), and grain table entries per table: qemu-img's and VMware's.
const GRAIN_SECTORS: u64 = 128;
const GRAIN_BYTES: u64 = GRAIN_SECTORS * SECTOR;
const GRAIN_USIZE: usize = 64 << 10;
const GTES_PER_GT: u32 = 512;
const DESCRIPTOR_OFFSET: u64 = 1;
const DESCRIPTOR_SECTORS: u64 = 20;
/// Grains read and compressed together: 4 MiB, shared among the cores.
const BATCH_GRAINS: u64 = 64;
/// Sampled byte entropy (bits per byte) above which deflate would not shrink a grain.
const INCOMPRESSIBLE_BITS: f64 = 7.8;

/// Header flags: newline detection, redundant grain directory, compressed grains, markers.
const FLAGS: u32 = 1 | (1 << 1) | (1 << 16) | (1 << 17);

/// Where everything goes in the file, in sectors, for a disk of `capacity` sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    capacity: u64,
    grains: u64,
    tables: u64,
    table_sectors: u64,
    directory_sectors: u64,
    redundant_directory: u64,
    directory: u64,
    grain_offset: u64,
}

impl Layout {
    fn new(capacity_bytes: u64) -> Layout {
        let capacity = capacity_bytes / SECTOR;
        let grains = capacity.div_ceil(GRAIN_SECTORS);
        let tables = grains.div_ceil(u64::from(GTES_PER_GT));
        let table_sectors = (u64::from(GTES_PER_GT) * 4).div_ceil(SECTOR);
        let directory_sectors = (tables * 4).div_ceil(SECTOR);
        let redundant_directory = DESCRIPTOR_OFFSET + DESCRIPTOR_SECTORS;
        let directory = redundant_directory + directory_sectors + table_sectors * tables;
        let grain_offset = (directory + directory_sectors + table_sectors * tables)
            .next_multiple_of(GRAIN_SECTORS);
        Layout {
            capacity,
            grains,
            tables,
            table_sectors,
            directory_sectors,
            redundant_directory,
            directory,
            grain_offset,
        }
    }

    /// The sparse extent header, sector 0.
    fn header(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(SECTOR_BYTES);
        h.extend_from_slice(b"KDMV");
        h.extend_from_slice(&3u32.to_le_bytes());
        h.extend_from_slice(&FLAGS.to_le_bytes());
        for field in [
            self.capacity,
            GRAIN_SECTORS,
            DESCRIPTOR_OFFSET,
            DESCRIPTOR_SECTORS,
        ] {
            h.extend_from_slice(&field.to_le_bytes());
        }
        h.extend_from_slice(&GTES_PER_GT.to_le_bytes());
        for field in [self.redundant_directory, self.directory, self.grain_offset] {
            h.extend_from_slice(&field.to_le_bytes());
        }
        // Filler, the newline check bytes, the compression algorithm (deflate).
        h.extend_from_slice(&[0, b'\n', b' ', b'\r', b'\n']);
        h.extend_from_slice(&1u16.to_le_bytes());
        h.resize(SECTOR_BYTES, 0);
        h
    }

    /// The text descriptor, padded to its sectors.
    fn descriptor(&self, extent_name: &str, cid: u32) -> Vec<u8> {
        let cylinders = self.capacity / (63 * 16);
        let text = format!(
            "# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID=ffffffff\n\
             createType=\"streamOptimized\"\n\n# Extent description\n\
             RW {} SPARSE \"{extent_name}\"\n\n# The Disk Data Base\n#DDB\n\n\
             ddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"{cylinders}\"\n\
             ddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\n\
             ddb.adapterType = \"ide\"\nddb.toolsVersion = \"2147483647\"\n",
            self.capacity
        );
        let mut bytes = text.into_bytes();
        bytes.resize(usize_of(DESCRIPTOR_SECTORS * SECTOR).unwrap_or(0), 0);
        bytes
    }

    /// A grain directory at sector `at` followed by its tables, holding `entries`.
    fn directory_at(&self, at: u64, entries: &[u32]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let first_table = at + self.directory_sectors;
        for t in 0..self.tables {
            out.extend_from_slice(&sector_u32(first_table + t * self.table_sectors)?.to_le_bytes());
        }
        out.resize(usize_of(self.directory_sectors * SECTOR)?, 0);
        for entry in entries {
            out.extend_from_slice(&entry.to_le_bytes());
        }
        let tables_bytes = self.tables * self.table_sectors * SECTOR;
        out.resize(usize_of(self.directory_sectors * SECTOR + tables_bytes)?, 0);
        Ok(out)
    }
}

/// What a write produced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Grains with data.
    pub grains: u64,
    /// Of them, grains kept in stored deflate blocks (they would not shrink).
    pub stored: u64,
    /// The file's length in bytes.
    pub bytes: u64,
}

/// Writes the first `capacity` bytes of raw `source` (a multiple of 512; past its end it
/// reads as zeros) as a stream-optimized VMDK into the empty file `out`, whose descriptor
/// names it `extent_name`.
pub fn write(source: &File, capacity: u64, out: &File, extent_name: &str) -> io::Result<Written> {
    if !capacity.is_multiple_of(SECTOR) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a disk of {capacity} bytes is not a whole number of 512-byte sectors"),
        ));
    }
    let layout = Layout::new(capacity);
    let mut entries = vec![0u32; usize_of(layout.tables * u64::from(GTES_PER_GT))?];
    let mut written = Written::default();
    let mut at = layout.grain_offset;
    let mut grain = 0;
    while grain < layout.grains {
        // Skip holes: jump to the grain holding the next data, if any.
        let Some(data) = seek::next_data(source, grain * GRAIN_BYTES)? else {
            break;
        };
        let next = data / GRAIN_BYTES;
        if next > grain {
            grain = next;
            continue;
        }
        let count = BATCH_GRAINS.min(layout.grains - grain);
        let start = grain * GRAIN_BYTES;
        let len = (count * GRAIN_BYTES).min(capacity - start);
        let mut batch = vec![0u8; usize_of(len)?];
        read_full(source, &mut batch, start)?;
        let encoded = encode_batch(&batch);
        let mut chunk = Vec::with_capacity(batch.len() + batch.len() / 64);
        for (i, record) in (grain..).zip(encoded) {
            let Some(Encoded { zlib, stored }) = record? else {
                continue;
            };
            entries[usize_of(i)?] = sector_u32(at + usize_to_u64(chunk.len()) / SECTOR)?;
            chunk.extend_from_slice(&(i * GRAIN_SECTORS).to_le_bytes());
            chunk.extend_from_slice(&u32::try_from(zlib.len()).unwrap_or(u32::MAX).to_le_bytes());
            chunk.extend_from_slice(&zlib);
            chunk.resize(chunk.len().next_multiple_of(SECTOR_BYTES), 0);
            written.grains += 1;
            written.stored += u64::from(stored);
        }
        out.write_all_at(&chunk, at * SECTOR)?;
        at += usize_to_u64(chunk.len()) / SECTOR;
        grain += count;
    }
    let cid = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    out.write_all_at(&layout.header(), 0)?;
    out.write_all_at(
        &layout.descriptor(extent_name, cid),
        DESCRIPTOR_OFFSET * SECTOR,
    )?;
    for directory in [layout.redundant_directory, layout.directory] {
        out.write_all_at(
            &layout.directory_at(directory, &entries)?,
            directory * SECTOR,
        )?;
    }
    written.bytes = at * SECTOR;
    out.set_len(written.bytes)?;
    Ok(written)
}

/// Each grain of `batch` deflated, `None` for an all-zero grain,
/// the grains shared among the cores.
fn encode_batch(batch: &[u8]) -> Vec<io::Result<Option<Encoded>>> {
    let grains: Vec<&[u8]> = batch.chunks(GRAIN_USIZE).collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = grains.len().div_ceil(cores).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = grains
            .chunks(per)
            .map(|part| scope.spawn(move || part.iter().map(|g| encode(g)).collect::<Vec<_>>()))
            .collect();
        workers
            .into_iter()
            .flat_map(|w| {
                w.join().unwrap_or_else(|_| {
                    vec![Err(io::Error::other("a compression thread panicked"))]
                })
            })
            .collect()
    })
}

/// A grain with data, deflated.
struct Encoded {
    /// Its zlib stream.
    zlib: Vec<u8>,
    /// Whether it is in stored blocks (it would not shrink).
    stored: bool,
}

/// One grain as a zlib stream; `None` when it is all zeros.
fn encode(grain: &[u8]) -> io::Result<Option<Encoded>> {
    if grain.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    if incompressible(grain) {
        return Ok(Some(Encoded {
            zlib: stored(grain),
            stored: true,
        }));
    }
    let mut encoder = ZlibEncoder::new(Vec::with_capacity(grain.len() + 64), Compression::fast());
    encoder.write_all(grain)?;
    Ok(Some(Encoded {
        zlib: encoder.finish()?,
        stored: false,
    }))
}

/// `bytes` as a zlib stream of stored deflate blocks (RFC 1950/1951): a copy and a checksum.
fn stored(bytes: &[u8]) -> Vec<u8> {
    const BLOCK: usize = 0xffff;
    let blocks = bytes.len().div_ceil(BLOCK).max(1);
    let mut out = Vec::with_capacity(bytes.len() + 5 * blocks + 6);
    // CMF: deflate with a 32 KiB window; FLG: fastest, no dictionary, a multiple of 31.
    out.extend_from_slice(&[0x78, 0x01]);
    let mut pieces = bytes.chunks(BLOCK).peekable();
    if pieces.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(piece) = pieces.next() {
        let last = u8::from(pieces.peek().is_none());
        // A piece is at most 0xffff bytes long.
        let len = u16::try_from(piece.len()).unwrap_or(u16::MAX);
        out.push(last);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(piece);
    }
    let mut adler = simd_adler32::Adler32::new();
    adler.write(bytes);
    out.extend_from_slice(&adler.finish().to_be_bytes());
    out
}

/// Whether deflate would not shrink `grain`, judged by the entropy of every 8th byte.
fn incompressible(grain: &[u8]) -> bool {
    let mut counts = [0u32; 256];
    let mut samples = 0u32;
    for &b in grain.iter().step_by(8) {
        counts[usize::from(b)] += 1;
        samples += 1;
    }
    let n = f64::from(samples.max(1));
    let bits: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    bits > INCOMPRESSIBLE_BITS
}

/// Fills `buf` from `file` at `offset`; what lies past the file's end stays zero.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + usize_to_u64(done)) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A sector number as the format's 32-bit entries hold it.
fn sector_u32(sector: u64) -> io::Result<u32> {
    u32::try_from(sector).map_err(|_| {
        io::Error::new(
            io::ErrorKind::FileTooLarge,
            "the VMDK would pass 2 TiB, the most its grain tables can address",
        )
    })
}

fn usize_of(n: u64) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too large"))
}

fn usize_to_u64(n: usize) -> u64 {
    n as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_matches_qemu_img_for_8_mib() {
        // From `qemu-img convert -O vmdk -o subformat=streamOptimized` of an 8 MiB disk.
        let layout = Layout::new(8 << 20);

        assert_eq!(layout.capacity, 0x4000);
        assert_eq!(layout.redundant_directory, 21);
        assert_eq!(layout.directory, 26);
        assert_eq!(layout.grain_offset, 128);
    }

    #[test]
    fn random_bytes_are_incompressible_and_text_is_not() {
        let random = random(GRAIN_USIZE);
        let text: Vec<u8> = b"COUNTER 42 the quick brown fox\n"
            .iter()
            .copied()
            .cycle()
            .take(GRAIN_USIZE)
            .collect();

        assert!(incompressible(&random));
        assert!(!incompressible(&text));
    }

    fn random(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect()
    }

    fn qemu_img(args: &[&std::ffi::OsStr]) -> std::process::Output {
        std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img runs")
    }

    #[test]
    fn qemu_img_reads_back_every_byte_of_a_sparse_disk() {
        let dir = tempfile::tempdir().expect("dir");
        let (raw, out) = (dir.path().join("d.raw"), dir.path().join("d.vmdk"));
        // 8 MiB and three sectors: the last grain is partial. Random data at the start,
        // text at 1 MiB, one odd sector at 3 MiB, a hole to the last sector, which holds data.
        let capacity = (8 << 20) + 3 * 512;
        let file = File::create(&raw).expect("raw");
        file.set_len(capacity).expect("size");
        file.write_all_at(&random(GRAIN_USIZE), 0).expect("random");
        let text = b"COUNTER 42\n".repeat(12_000);
        file.write_all_at(&text, 1 << 20).expect("text");
        file.write_all_at(&[7u8; 512], (3 << 20) + 512)
            .expect("sector");
        file.write_all_at(b"last", capacity - 4).expect("last");

        let written = write(
            &File::open(&raw).expect("open"),
            capacity,
            &File::create_new(&out).expect("out"),
            "d.vmdk",
        )
        .expect("written");

        assert_eq!(written.stored, 1, "{written:?}");
        // The random grain, three of text (132 000 bytes), the odd sector's, the last.
        assert_eq!(written.grains, 6, "{written:?}");
        assert_eq!(std::fs::metadata(&out).expect("size").len(), written.bytes);
        let compared = qemu_img(&[
            "compare".as_ref(),
            "-f".as_ref(),
            "raw".as_ref(),
            "-F".as_ref(),
            "vmdk".as_ref(),
            raw.as_os_str(),
            out.as_os_str(),
        ]);
        assert!(compared.status.success(), "{compared:?}");
        let info = qemu_img(&[
            "info".as_ref(),
            "-f".as_ref(),
            "vmdk".as_ref(),
            "--output=json".as_ref(),
            out.as_os_str(),
        ]);
        let info = String::from_utf8_lossy(&info.stdout);
        assert!(
            info.contains("\"create-type\": \"streamOptimized\""),
            "{info}"
        );
        assert!(
            info.contains(&format!("\"virtual-size\": {capacity}")),
            "{info}"
        );
        let checked = qemu_img(&[
            "check".as_ref(),
            "-f".as_ref(),
            "vmdk".as_ref(),
            out.as_os_str(),
        ]);
        assert!(checked.status.success(), "{checked:?}");
    }

    #[test]
    fn a_stored_grain_inflates_to_its_bytes() {
        let bytes = random(GRAIN_USIZE + 3);

        let zlib = stored(&bytes);
        let mut inflated = Vec::new();
        let mut decoder = flate2::read::ZlibDecoder::new(zlib.as_slice());
        std::io::Read::read_to_end(&mut decoder, &mut inflated).expect("a valid zlib stream");

        assert_eq!(inflated, bytes);
    }

    #[test]
    fn an_empty_disk_is_headers_only() {
        let dir = tempfile::tempdir().expect("dir");
        let raw = dir.path().join("d.raw");
        let file = File::create(&raw).expect("raw");
        file.set_len(64 << 20).expect("size");

        let written = write(
            &file,
            64 << 20,
            &File::create_new(dir.path().join("d.vmdk")).expect("out"),
            "d.vmdk",
        )
        .expect("written");

        assert_eq!(written.grains, 0);
        assert_eq!(written.bytes, Layout::new(64 << 20).grain_offset * SECTOR);
    }

    #[test]
    fn a_size_in_part_sectors_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let file = File::create(dir.path().join("d.raw")).expect("raw");

        let refused = write(&file, 1000, &file, "d.vmdk");

        assert_eq!(
            refused.map_err(|e| e.kind()),
            Err(io::ErrorKind::InvalidInput)
        );
    }
}
