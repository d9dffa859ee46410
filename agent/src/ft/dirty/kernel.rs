//! [`KernelMarks`]: dirty pages found from the marks the kernel keeps on QEMU's mapping of the
//! RAM file, and the parsing of /proc/PID/maps that finds that mapping. Two kinds of marks:
//!
//! * soft-dirty bits (/proc/PID/pagemap bit 55, cleared through /proc/PID/clear_refs), where
//!   the kernel is built with them;
//! * asynchronous userfaultfd write protection, which `ftshim` sets up inside QEMU: the kernel
//!   marks each page written, and `PAGEMAP_SCAN` reports the marked pages and protects them
//!   again in one step ([`super::pagemap_scan`], Linux 6.7).

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::pagemap_scan::{self, PageRegion};
use super::{Dirty, DirtyTracker, Error, PAGE, PAGE_BYTES, check_size, open_ram, to_u64};

/// Size of one /proc/PID/pagemap entry.
const PAGEMAP_ENTRY: usize = 8;

/// Pagemap entries read at a time (512 KiB covering 256 MiB of guest RAM).
const PAGEMAP_CHUNK: usize = 64 * 1024;

/// Pagemap bit 55: the page was written since the last `clear_refs` (or its VMA is new).
const SOFT_DIRTY_BIT: u64 = 1 << 55;

/// Written to /proc/PID/clear_refs to clear the soft-dirty bits of every page of the process.
const CLEAR_SOFT_DIRTY: &[u8] = b"4";

/// The host's active swap areas, one per line after a header.
const SWAPS: &str = "/proc/swaps";

/// The kernel config line that makes soft-dirty tracking work.
const SOFT_DIRTY_CONFIG: &str = "CONFIG_MEM_SOFT_DIRTY=y";

/// The kernel's marks on the QEMU process's mapping of the RAM file: which pages it wrote
/// since the last pass.
#[derive(Debug)]
pub struct KernelMarks {
    /// The QEMU process.
    pid: u32,
    /// The RAM file, read for page contents.
    ram: File,
    /// Its path, canonical, for matching /proc/PID/maps and for errors.
    path: PathBuf,
    /// Its device and inode, for matching /proc/PID/maps.
    id: FileId,
    /// Pages in the file, fixed at open.
    pages: usize,
    /// /proc/PID/maps, kept open so a reused PID cannot be mistaken for QEMU.
    maps: ProcFile,
    /// /proc/PID/pagemap.
    pagemap: ProcFile,
    /// The kind of marks.
    marks: Marks,
    /// Whether the next pass must answer every page (the first one, or after a failure).
    full: bool,
    /// Pagemap read buffer kept across passes.
    entries: Vec<u8>,
}

/// The marks a [`KernelMarks`] reads.
#[derive(Debug)]
enum Marks {
    /// Soft-dirty bits, reset through /proc/PID/clear_refs (open for writing). A write between
    /// reading the bits and clearing them would be lost: the guest must be stopped.
    SoftDirty(ProcFile),
    /// Userfaultfd write-protect marks, read and reset in one atomic step: the guest may run.
    Written,
}

/// An open /proc file and its path, for errors.
#[derive(Debug)]
struct ProcFile {
    /// The open file.
    file: File,
    /// Its path.
    path: PathBuf,
}

/// A file's identity as /proc/PID/maps shows it: device major, minor and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    /// Device major number.
    major: u64,
    /// Device minor number.
    minor: u64,
    /// Inode number.
    inode: u64,
}

/// One line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    /// First virtual address.
    start: u64,
    /// Virtual address after the last byte.
    end: u64,
    /// Offset in the file of `start`.
    offset: u64,
    /// The mapped file.
    id: FileId,
    /// The mapped file's path as the kernel shows it (may carry " (deleted)").
    path: String,
}

impl KernelMarks {
    /// Attaches to the soft-dirty bits of QEMU process `pid`'s mapping of the RAM file at
    /// `path`; fails when the kernel lacks them or QEMU does not map the file.
    pub fn soft_dirty(pid: u32, path: &Path) -> Result<KernelMarks, Error> {
        if !KernelMarks::soft_dirty_available() {
            return Err(Error::SoftDirtyUnavailable);
        }
        let clear_refs = ProcFile::open(PathBuf::from(format!("/proc/{pid}/clear_refs")), true)?;
        KernelMarks::attach(pid, path, Marks::SoftDirty(clear_refs))
    }

    /// Attaches to the write-protect marks of QEMU process `pid`'s mapping of the RAM file at
    /// `path`; fails unless `ftshim` registered that mapping (QEMU started without it, or a
    /// kernel older than 6.7).
    pub fn written(pid: u32, path: &Path) -> Result<KernelMarks, Error> {
        let tracker = KernelMarks::attach(pid, path, Marks::Written)?;
        for mapping in tracker.mappings()? {
            let (start, end) = tracker.file_range(&mapping);
            pagemap_scan::written(&tracker.pagemap.file, start, end, false, &mut Vec::new())
                .map_err(|source| Error::NotTracked {
                    pid,
                    path: tracker.path.clone(),
                    source,
                })?;
        }
        Ok(tracker)
    }

    /// Whether the kernel tracks soft-dirty bits: `/boot/config-$(uname -r)` says
    /// `CONFIG_MEM_SOFT_DIRTY=y`. Without a readable config file (e.g. a kernel that only
    /// has /proc/config.gz, which needs gzip) it answers false and callers use page hashes.
    pub fn soft_dirty_available() -> bool {
        let config = fs::read_to_string("/proc/sys/kernel/osrelease")
            .and_then(|release| fs::read_to_string(format!("/boot/config-{}", release.trim())));
        config.is_ok_and(|config| config_has_soft_dirty(&config))
            && Path::new("/proc/self/pagemap").exists()
    }

    /// Attaches to `pid`'s mapping of the RAM file at `path` to read `marks`.
    fn attach(pid: u32, path: &Path, marks: Marks) -> Result<KernelMarks, Error> {
        let swaps = fs::read_to_string(SWAPS).map_err(|source| Error::OpenProc {
            path: SWAPS.into(),
            source,
        })?;
        if swaps.lines().count() > 1 {
            return Err(Error::SwapOn);
        }
        let (ram, pages) = open_ram(path)?;
        let meta = ram.metadata().map_err(|source| Error::StatRam {
            path: path.to_path_buf(),
            source,
        })?;
        let path = fs::canonicalize(path).map_err(|source| Error::OpenRam {
            path: path.to_path_buf(),
            source,
        })?;
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let tracker = KernelMarks {
            pid,
            ram,
            path,
            id: FileId {
                major: dev_major(meta.dev()),
                minor: dev_minor(meta.dev()),
                inode: meta.ino(),
            },
            pages,
            maps: ProcFile::open(proc_dir.join("maps"), false)?,
            pagemap: ProcFile::open(proc_dir.join("pagemap"), false)?,
            marks,
            full: true,
            entries: Vec::new(),
        };
        tracker.mappings()?;
        Ok(tracker)
    }

    /// QEMU's current mappings of the RAM file (re-read each pass: QEMU may remap).
    fn mappings(&self) -> Result<Vec<Mapping>, Error> {
        let mut text = Vec::new();
        let mut file = &self.maps.file;
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.read_to_end(&mut text))
            .map_err(|source| Error::ReadMaps {
                path: self.maps.path.clone(),
                source,
            })?;
        let path = self.path.to_string_lossy();
        let found: Vec<Mapping> = parse_maps(&String::from_utf8_lossy(&text))
            .into_iter()
            .filter(|m| m.id.inode == self.id.inode && (m.id == self.id || m.path == path))
            .collect();
        if found.is_empty() {
            return Err(Error::FindMapping {
                pid: self.pid,
                path: self.path.clone(),
            });
        }
        Ok(found)
    }

    /// The addresses `[start, end)` of `mapping` that lie within the file.
    fn file_range(&self, mapping: &Mapping) -> (u64, u64) {
        let first_file_page = mapping.offset / PAGE_BYTES;
        let count = (mapping.end.saturating_sub(mapping.start) / PAGE_BYTES)
            .min(to_u64(self.pages).saturating_sub(first_file_page));
        (mapping.start, mapping.start + count * PAGE_BYTES)
    }

    /// The file pages written in any of `mappings` since the last pass, ascending; the marks
    /// are reset for the pages answered.
    fn marked_pages(&mut self, mappings: &[Mapping]) -> Result<Vec<u64>, Error> {
        let mut pages = Vec::new();
        if matches!(self.marks, Marks::SoftDirty(_)) {
            for mapping in mappings {
                self.mapping_soft_dirty(mapping, &mut pages)?;
            }
            self.clear_refs()?;
        } else {
            for mapping in mappings {
                self.mapping_written(mapping, &mut pages)?;
            }
        }
        pages.sort_unstable();
        pages.dedup();
        Ok(pages)
    }

    /// Appends the file pages of `mapping` written since the last pass, and protects them
    /// again.
    fn mapping_written(&self, mapping: &Mapping, pages: &mut Vec<u64>) -> Result<(), Error> {
        let (start, end) = self.file_range(mapping);
        let mut regions: Vec<PageRegion> = Vec::new();
        pagemap_scan::written(&self.pagemap.file, start, end, true, &mut regions).map_err(
            |source| Error::ReadPagemap {
                path: self.pagemap.path.clone(),
                source,
            },
        )?;
        let first_file_page = mapping.offset / PAGE_BYTES;
        for region in regions {
            let first = (region.start.max(start) - mapping.start) / PAGE_BYTES;
            let last = (region.end.min(end) - mapping.start) / PAGE_BYTES;
            pages.extend((first..last).map(|page| first_file_page + page));
        }
        Ok(())
    }

    /// Appends the file pages of `mapping` (within the file) whose entries are soft-dirty.
    fn mapping_soft_dirty(&mut self, mapping: &Mapping, pages: &mut Vec<u64>) -> Result<(), Error> {
        let first_file_page = mapping.offset / PAGE_BYTES;
        let (start, end) = self.file_range(mapping);
        let count = (end - start) / PAGE_BYTES;
        let first_vpage = mapping.start / PAGE_BYTES;
        let mut done = 0;
        while done < count {
            let n = (count - done).min(to_u64(PAGEMAP_CHUNK));
            let entries = self.read_pagemap(first_vpage + done, n)?;
            let dirty = entries
                .chunks_exact(PAGEMAP_ENTRY)
                .map(pagemap_entry)
                .map(is_soft_dirty);
            let offsets = first_file_page + done..;
            pages.extend(
                dirty
                    .zip(offsets)
                    .filter_map(|(dirty, page)| dirty.then_some(page)),
            );
            done += n;
        }
        Ok(())
    }

    /// Reads `count` pagemap entries from virtual page `vpage` on.
    fn read_pagemap(&mut self, vpage: u64, count: u64) -> Result<&[u8], Error> {
        let len = usize::try_from(count)
            .unwrap_or(PAGEMAP_CHUNK)
            .min(PAGEMAP_CHUNK)
            * PAGEMAP_ENTRY;
        self.entries.resize(len, 0);
        let offset = vpage * to_u64(PAGEMAP_ENTRY);
        self.pagemap
            .file
            .read_exact_at(&mut self.entries, offset)
            .map_err(|source| Error::ReadPagemap {
                path: self.pagemap.path.clone(),
                source,
            })?;
        Ok(&self.entries)
    }

    /// Clears the soft-dirty bits of every page of the QEMU process.
    fn clear_refs(&self) -> Result<(), Error> {
        let Marks::SoftDirty(clear_refs) = &self.marks else {
            return Ok(());
        };
        (&clear_refs.file)
            .write_all(CLEAR_SOFT_DIRTY)
            .map_err(|source| Error::ClearRefs {
                path: clear_refs.path.clone(),
                source,
            })
    }

    /// One pass: decides the page set, resets the marks, then reads the contents.
    fn pass(&mut self) -> Result<Dirty, Error> {
        check_size(&self.ram, &self.path, self.pages)?;
        let mappings = self.mappings()?;
        let marked = self.marked_pages(&mappings)?;
        let pages = if self.full {
            (0..to_u64(self.pages)).collect()
        } else {
            marked
        };
        let data = read_pages(&self.ram, &self.path, &pages)?;
        Ok(Dirty { pages, data })
    }
}

impl DirtyTracker for KernelMarks {
    fn name(&self) -> &'static str {
        match self.marks {
            Marks::SoftDirty(_) => "soft-dirty",
            Marks::Written => "uffd-written",
        }
    }

    fn runs_with_guest(&self) -> bool {
        matches!(self.marks, Marks::Written)
    }

    fn scan(&mut self) -> Result<Dirty, Error> {
        let dirty = self.pass();
        // The bits may be cleared already, with the pages unread: only a full pass is safe then.
        self.full = dirty.is_err();
        dirty
    }
}

impl ProcFile {
    /// Opens a /proc file for reading, or for writing when `write`.
    fn open(path: PathBuf, write: bool) -> Result<ProcFile, Error> {
        let file = File::options().read(!write).write(write).open(&path);
        match file {
            Ok(file) => Ok(ProcFile { file, path }),
            Err(source) => Err(Error::OpenProc { path, source }),
        }
    }
}

/// Reads the given pages (ascending), one read per run of consecutive pages.
fn read_pages(file: &File, path: &Path, pages: &[u64]) -> Result<Vec<u8>, Error> {
    let mut data = vec![0; pages.len() * PAGE];
    let mut rest = data.as_mut_slice();
    for run in pages.chunk_by(|a, b| a + 1 == *b) {
        let (bytes, tail) = std::mem::take(&mut rest).split_at_mut(run.len() * PAGE);
        rest = tail;
        file.read_exact_at(bytes, run[0] * PAGE_BYTES)
            .map_err(|source| Error::ReadRam {
                path: path.to_path_buf(),
                source,
            })?;
    }
    Ok(data)
}

/// Decodes one pagemap entry (native byte order, 8 bytes).
fn pagemap_entry(bytes: &[u8]) -> u64 {
    let mut entry = [0; PAGEMAP_ENTRY];
    entry.copy_from_slice(bytes);
    u64::from_ne_bytes(entry)
}

/// Whether a pagemap entry says the page may have been written since the last `clear_refs`.
///
/// Only bit 55 counts, present or not: a non-present entry has it set when its VMA is new
/// since the last clear (QEMU remapped the file), and then the page must be sent. A page that
/// is neither present (bit 63) nor swapped (bit 62) and has no bit 55 was not written.
fn is_soft_dirty(entry: u64) -> bool {
    entry & SOFT_DIRTY_BIT != 0
}

/// Whether a kernel config text enables soft-dirty tracking.
fn config_has_soft_dirty(config: &str) -> bool {
    config.lines().any(|line| line.trim() == SOFT_DIRTY_CONFIG)
}

/// Parses /proc/PID/maps text, skipping lines it cannot read.
fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_maps_line).collect()
}

/// Parses one /proc/PID/maps line: `start-end perms offset major:minor inode [path]`. The path
/// is everything after the fifth field, spaces included.
fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut rest = line;
    let mut field = || {
        rest = rest.trim_start_matches(' ');
        let end = rest.find(' ').unwrap_or(rest.len());
        let (field, tail) = rest.split_at(end);
        rest = tail;
        field
    };
    let (range, _perms, offset, dev, inode) = (field(), field(), field(), field(), field());
    let (start, end) = range.split_once('-')?;
    let (major, minor) = dev.split_once(':')?;
    let hex = |text: &str| u64::from_str_radix(text, 16).ok();
    Some(Mapping {
        start: hex(start)?,
        end: hex(end)?,
        offset: hex(offset)?,
        id: FileId {
            major: hex(major)?,
            minor: hex(minor)?,
            inode: inode.parse().ok()?,
        },
        path: rest.trim_start_matches(' ').to_owned(),
    })
}

/// The major number of a `st_dev` (glibc's `gnu_dev_major`).
fn dev_major(dev: u64) -> u64 {
    ((dev >> 8) & 0xfff) | ((dev >> 32) & 0xffff_f000)
}

/// The minor number of a `st_dev` (glibc's `gnu_dev_minor`).
fn dev_minor(dev: u64) -> u64 {
    (dev & 0xff) | ((dev >> 12) & 0xffff_ff00)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_maps_line_shared_file_mapping_reads_every_field() {
        let line = "7f1c2a000000-7f1c3a000000 rw-s 00000000 00:1a 123 /dev/shm/x/pc.ram";

        let mapping = parse_maps_line(line);

        let id = FileId {
            major: 0,
            minor: 0x1a,
            inode: 123,
        };
        let expected = Mapping {
            start: 0x7f1c_2a00_0000,
            end: 0x7f1c_3a00_0000,
            offset: 0,
            id,
            path: "/dev/shm/x/pc.ram".into(),
        };
        assert_eq!(mapping, Some(expected));
    }

    #[test]
    fn parse_maps_line_path_with_spaces_keeps_them() {
        let line = "1000-3000 rw-s 00002000 fd:01 4242                       /dev/shm/my vm/pc ram";

        let mapping = parse_maps_line(line);

        assert_eq!(
            mapping.map(|m| (m.offset, m.id.major, m.id.minor, m.path)),
            Some((0x2000, 0xfd, 1, "/dev/shm/my vm/pc ram".into()))
        );
    }

    #[test]
    fn parse_maps_anonymous_and_garbage_lines_are_kept_or_skipped() {
        let text = "1000-2000 rw-p 00000000 00:00 0 \nnot a mapping\n3000-4000 r--p 00000000 00:00 0                  [stack]\n";

        let mappings = parse_maps(text);

        let paths: Vec<&str> = mappings.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(paths, vec!["", "[stack]"]);
    }

    #[test]
    fn is_soft_dirty_present_with_bit_55_is_dirty() {
        let entry = (1 << 63) | (1 << 55) | 0x1234;

        assert!(is_soft_dirty(entry));
    }

    #[test]
    fn is_soft_dirty_present_without_bit_55_is_clean() {
        let entry = (1 << 63) | 0x1234;

        assert!(!is_soft_dirty(entry));
    }

    #[test]
    fn is_soft_dirty_not_present_not_swapped_is_clean() {
        assert!(!is_soft_dirty(0));
    }

    #[test]
    fn is_soft_dirty_swapped_with_bit_55_is_dirty() {
        let entry = (1 << 62) | (1 << 55);

        assert!(is_soft_dirty(entry));
    }

    #[test]
    fn pagemap_entry_native_bytes_decode() {
        let bytes = ((1u64 << 63) | (1 << 55)).to_ne_bytes();

        assert_eq!(pagemap_entry(&bytes), 0x8080_0000_0000_0000);
    }

    #[test]
    fn config_has_soft_dirty_set_or_not_set() {
        let set = "CONFIG_X=y\nCONFIG_MEM_SOFT_DIRTY=y\n";
        let unset = "CONFIG_X=y\n# CONFIG_MEM_SOFT_DIRTY is not set\n";

        assert_eq!(
            (config_has_soft_dirty(set), config_has_soft_dirty(unset)),
            (true, false)
        );
    }

    #[test]
    fn dev_major_minor_small_numbers_split() {
        let dev = (259 << 8) | 3;

        assert_eq!((dev_major(dev), dev_minor(dev)), (259, 3));
    }

    #[test]
    fn dev_major_minor_large_numbers_split_like_glibc() {
        let (major, minor): (u64, u64) = (0x1234_5abc, 0x6789_a0bc);
        let dev = ((major & 0xfff) << 8)
            | ((major & !0xfff) << 32)
            | (minor & 0xff)
            | ((minor & !0xff) << 12);

        assert_eq!((dev_major(dev), dev_minor(dev)), (major, minor));
    }
}
