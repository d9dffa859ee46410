//! Dirty-page finding for FT epochs: which 4 KiB pages of a guest's RAM changed since the
//! last pass, with their current contents.
//!
//! Guest RAM is a file (QEMU `memory-backend-file`, `share=on`, on tmpfs). Two trackers
//! implement [`DirtyTracker`]:
//!
//! * [`PageHashes`] hashes every page (xxh3-64) and compares with the previous pass. It works
//!   everywhere and misses nothing but a 64-bit hash collision; its cost is O(guest RAM) per
//!   pass. It hashes the file through a read-only shared mapping (`map`), so a pass copies
//!   only the changed pages.
//! * [`KernelMarks`] asks the kernel which pages QEMU's mapping of the file wrote since the
//!   last pass: from soft-dirty bits (pagemap bit 55, reset by `echo 4 >
//!   /proc/PID/clear_refs`, where the kernel has `CONFIG_MEM_SOFT_DIRTY=y`), or from the
//!   asynchronous userfaultfd write protection that `ftshim` sets up inside QEMU (Linux 6.7,
//!   read and reset by `PAGEMAP_SCAN`). Its cost is a walk of the mapping's page table plus the
//!   dirty pages, which it reads with positional reads. It only sees writes through that
//!   mapping: a hole punched into the file (balloon, discard) or a written page reclaimed to
//!   swap inside one epoch loses its mark, so it needs guests without balloon or discard, on
//!   a host whose guest RAM is not swapped out.
//!
//! Each tracker decides the page set and resets its reference to contents no newer than those
//! it answers (page hashes keep the hash of each copy they answer, kernel marks are reset
//! before the pages are read), so a page written after it was read is answered by the next
//! pass. After a failed pass the next pass answers every page.
//!
//! A soft-dirty pass must run while the guest is stopped: a write between reading the pagemap
//! and clearing the bits would be lost. The other passes may also run with the guest running
//! (pre-copy): page hashes keep the hash of the copy they answer, write-protect marks are read
//! and reset in one step, so a page written during the pass is answered by the next one, and
//! the paused pass then misses nothing.

mod hashes;
mod holes;
mod kernel;
mod map;
mod pagemap_scan;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

pub use hashes::{Helpers, PageHashes};
pub use holes::{is_hole, is_zero};
pub use kernel::KernelMarks;

/// The page size dirty tracking works in: 4 KiB, the x86-64 and pagemap granularity.
pub const PAGE: usize = 4096;

/// [`PAGE`] as a file offset unit.
const PAGE_BYTES: u64 = 4096;

/// Pages found changed by one pass: their indexes (ascending) and their contents (PAGE bytes
/// each, same order).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dirty {
    /// Page indexes in the RAM file, ascending.
    pub pages: Vec<u64>,
    /// The pages' contents, [`PAGE`] bytes each, in the order of `pages`.
    pub data: Vec<u8>,
}

impl Dirty {
    /// Number of changed pages.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether no page changed, so the epoch has no RAM to send.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Bytes of page contents, the RAM payload of the epoch.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// The `i`-th changed page: its index in the RAM file and its contents.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn page(&self, i: usize) -> (u64, &[u8]) {
        (self.pages[i], &self.data[i * PAGE..(i + 1) * PAGE])
    }
}

/// Errors from finding dirty pages.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing `4` to /proc/PID/clear_refs failed.
    #[error("clearing the soft-dirty bits through {path}: may the agent ptrace the QEMU process?")]
    ClearRefs {
        /// The clear_refs file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// /proc/PID/maps has no mapping of the RAM file.
    #[error(
        "QEMU process {pid} does not map the RAM file {path}: is its memory backend a \
         memory-backend-file with share=on and this mem-path, and is {pid} the right process?"
    )]
    FindMapping {
        /// The QEMU process.
        pid: u32,
        /// The RAM file.
        path: PathBuf,
    },
    /// Mapping the RAM file into the agent (read-only, shared) failed.
    #[error("mapping the guest RAM file {path} read-only: is the agent's address space full?")]
    MapRam {
        /// The RAM file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Opening /proc/PID/{maps,pagemap,clear_refs} failed.
    #[error("opening {path}: is the QEMU process running, and may the agent ptrace it?")]
    OpenProc {
        /// The /proc file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Opening the RAM file failed.
    #[error("opening the guest RAM file {path}")]
    OpenRam {
        /// The RAM file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The RAM file is shorter than when the tracker was opened.
    #[error(
        "the guest RAM file {path} shrank from {expected} to {actual} bytes: was the guest \
         restarted with another memory size? Open a new tracker"
    )]
    RamShrank {
        /// The RAM file.
        path: PathBuf,
        /// Its size when the tracker was opened.
        expected: u64,
        /// Its size now.
        actual: u64,
    },
    /// The RAM file's size is not a positive multiple of [`PAGE`].
    #[error(
        "the guest RAM file {path} is {len} bytes, not a positive multiple of 4096: is it a \
         guest's memory-backend-file?"
    )]
    RamSize {
        /// The RAM file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// Reading /proc/PID/maps failed.
    #[error("reading {path}: did the QEMU process exit?")]
    ReadMaps {
        /// The maps file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading /proc/PID/pagemap failed.
    #[error("reading {path}: did the QEMU process exit?")]
    ReadPagemap {
        /// The pagemap file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading pages of the RAM file failed.
    #[error("reading the guest RAM file {path}")]
    ReadRam {
        /// The RAM file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Finding the RAM file's data and holes (`lseek` SEEK_DATA/SEEK_HOLE) failed.
    #[error("finding which pages of the guest RAM file {path} hold data")]
    SeekData {
        /// The RAM file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// QEMU's mapping of the RAM file carries no write-protect marks.
    #[error(
        "the kernel does not track writes to {path} in QEMU process {pid}: was QEMU started \
         with the FT shim preloaded, on Linux 6.7 or later?"
    )]
    NotTracked {
        /// The QEMU process.
        pid: u32,
        /// The RAM file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The host swaps: a guest RAM page swapped out loses its mark.
    #[error(
        "the host has swap on (/proc/swaps): the kernel could move guest RAM out and drop its \
         write marks; turn swap off to use them"
    )]
    SwapOn,
    /// The kernel does not offer soft-dirty tracking (or its config cannot be read).
    #[error(
        "soft-dirty tracking is unavailable: /boot/config-<release> does not say \
         CONFIG_MEM_SOFT_DIRTY=y; use page hashes"
    )]
    SoftDirtyUnavailable,
    /// Reading the RAM file's metadata failed.
    #[error("reading the size of the guest RAM file {path}")]
    StatRam {
        /// The RAM file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Finds the pages of a RAM file changed since the previous pass.
pub trait DirtyTracker: Send + Sync + std::fmt::Debug {
    /// A short name for logs and metrics (`"page-hashes"`, `"soft-dirty"`).
    fn name(&self) -> &'static str;

    /// Whether a pass may run while the guest runs (pre-copy): page hashes may, soft-dirty
    /// may not (a write between reading the bits and clearing them would be lost).
    fn runs_with_guest(&self) -> bool;

    /// Pages changed since the last call (the first call answers every page), with their
    /// contents as read now.
    fn scan(&mut self) -> Result<Dirty, Error>;

    /// A way for other threads to speed up the pass running at the time, when the tracker
    /// takes help (page hashes do; soft-dirty reads too little to need it).
    fn helpers(&self) -> Option<Helpers> {
        None
    }
}

/// The tracker to use for a QEMU process: the kernel's soft-dirty bits where it has them, else
/// its write-protect marks where QEMU runs with the FT shim; page hashes when those cannot be
/// used (the log says why).
pub fn tracker_for(pid: u32, path: &Path, threads: usize) -> Result<Box<dyn DirtyTracker>, Error> {
    let marks = if KernelMarks::soft_dirty_available() {
        KernelMarks::soft_dirty(pid, path)
    } else {
        KernelMarks::written(pid, path)
    };
    match marks {
        Ok(tracker) => return Ok(Box::new(tracker)),
        Err(e) => {
            tracing::info!(pid, reason = %daemon::error_chain(&e), "FT: hashing the guest's RAM pages each epoch");
        }
    }
    Ok(Box::new(PageHashes::open(path, threads)?))
}

/// Opens a RAM file for reading and returns it with its page count.
fn open_ram(path: &Path) -> Result<(File, usize), Error> {
    let file = File::open(path).map_err(|source| Error::OpenRam {
        path: path.to_path_buf(),
        source,
    })?;
    let len = ram_len(&file, path)?;
    let pages = usize::try_from(len / PAGE_BYTES)
        .ok()
        .filter(|&pages| pages > 0 && len % PAGE_BYTES == 0);
    match pages {
        Some(pages) => Ok((file, pages)),
        None => Err(Error::RamSize {
            path: path.to_path_buf(),
            len,
        }),
    }
}

/// The RAM file's length now.
fn ram_len(file: &File, path: &Path) -> Result<u64, Error> {
    let meta = file.metadata().map_err(|source| Error::StatRam {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(meta.len())
}

/// Fails if the RAM file is now shorter than `pages` pages.
fn check_size(file: &File, path: &Path, pages: usize) -> Result<(), Error> {
    let expected = page_offset(pages);
    let actual = ram_len(file, path)?;
    if actual < expected {
        return Err(Error::RamShrank {
            path: path.to_path_buf(),
            expected,
            actual,
        });
    }
    Ok(())
}

/// The byte offset of page `page`.
fn page_offset(page: usize) -> u64 {
    to_u64(page) * PAGE_BYTES
}

/// Widens a count or index to u64 (usize is at most 64 bits on every Linux target).
fn to_u64(n: usize) -> u64 {
    n as u64
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    use tempfile::NamedTempFile;

    use super::*;

    /// A RAM file of `pages` pages, page `i` filled with byte `i`.
    pub(super) fn ram_file(pages: usize) -> NamedTempFile {
        let mut file = NamedTempFile::new().expect("create RAM file");
        let data: Vec<u8> = (0..pages)
            .flat_map(|i| [u8::try_from(i % 256).expect("byte"); PAGE])
            .collect();
        file.write_all(&data).expect("write RAM file");
        file
    }

    /// A file of `pages` pages, all holes, on tmpfs (/dev/shm) like guest RAM.
    pub(super) fn sparse(pages: usize) -> NamedTempFile {
        let file = NamedTempFile::new_in("/dev/shm").expect("create file in /dev/shm");
        file.as_file()
            .set_len(to_u64(pages) * PAGE_BYTES)
            .expect("size file");
        file
    }

    /// Fills page `page` of the RAM file with `byte`, through the file (not a mapping).
    pub(super) fn write_page(ram: &NamedTempFile, page: u64, byte: u8) {
        ram.as_file()
            .write_all_at(&[byte; PAGE], page * PAGE_BYTES)
            .expect("write page");
    }

    /// The RAM file's contents, read through the file.
    pub(super) fn contents(ram: &NamedTempFile) -> Vec<u8> {
        fs::read(ram.path()).expect("read RAM file")
    }

    #[test]
    fn dirty_page_returns_index_and_contents() {
        let dirty = Dirty {
            pages: vec![5, 9],
            data: [[1; PAGE], [2; PAGE]].concat(),
        };

        let page = dirty.page(1);

        assert_eq!(page, (9, &[2; PAGE][..]));
        assert_eq!((dirty.len(), dirty.bytes()), (2, 2 * PAGE));
    }
}
