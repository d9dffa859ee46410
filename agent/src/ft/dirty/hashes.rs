//! [`PageHashes`]: dirty pages found by hashing every page of the RAM file (xxh3-64) and
//! comparing with the previous pass, through a read-only shared mapping of the file.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::thread;

use xxhash_rust::xxh3::xxh3_64;

use super::map::RamMap;
use super::{Dirty, DirtyTracker, Error, PAGE, check_size, open_ram, to_u64};

/// Bytes each thread of the first pass copies out of the mapping before hashing them: small
/// enough to still be in cache when hashed.
const COPY_CHUNK: usize = 1 << 20;

/// Content hashes: xxh3-64 per page compared with the previous pass. Hashing runs on
/// `threads` threads, each over a contiguous range of the file, straight from a read-only
/// shared mapping of it; only the pages answered are copied.
#[derive(Debug)]
pub struct PageHashes {
    /// The RAM file, for its size.
    file: File,
    /// Its path, for errors.
    path: PathBuf,
    /// Its first `pages` pages, mapped read-only.
    map: RamMap,
    /// Pages in the file, fixed at open.
    pages: usize,
    /// One page range per thread, contiguous and ascending.
    ranges: Vec<Range<usize>>,
    /// The hash of each page as last answered; empty before the first pass.
    hashes: Vec<u64>,
}

impl PageHashes {
    /// Opens and maps the RAM file and fixes its page count; nothing is read until
    /// [`DirtyTracker::scan`].
    pub fn open(path: &Path, threads: usize) -> Result<PageHashes, Error> {
        let (file, pages) = open_ram(path)?;
        let map = RamMap::new(&file, pages * PAGE).map_err(|source| Error::MapRam {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(PageHashes {
            file,
            path: path.to_path_buf(),
            map,
            pages,
            ranges: split(pages, threads),
            hashes: Vec::new(),
        })
    }

    /// Pages in the RAM file.
    pub fn pages(&self) -> u64 {
        to_u64(self.pages)
    }

    /// The first pass: copies the whole file into the result and records every page's hash.
    fn scan_all(&mut self) -> Dirty {
        let mut data = vec![0; self.pages * PAGE];
        let mut hashes = vec![0; self.pages];
        let ram = self.map.bytes();
        let data_parts = split_mut(&mut data, &self.ranges, PAGE);
        let hash_parts = split_mut(&mut hashes, &self.ranges, 1);
        let work = self
            .ranges
            .iter()
            .zip(data_parts.into_iter().zip(hash_parts));
        let work = work.map(|(range, (data, hashes))| {
            let ram = &ram[byte_range(range)];
            move || copy_all(ram, data, hashes)
        });
        run_parallel(work.collect());
        self.hashes = hashes;
        Dirty {
            pages: (0..to_u64(self.pages)).collect(),
            data,
        }
    }

    /// A later pass: hashes every page in place and answers those whose hash changed.
    fn scan_changed(&mut self) -> Dirty {
        let ram = self.map.bytes();
        let hash_parts = split_mut(&mut self.hashes, &self.ranges, 1);
        let work = self.ranges.iter().zip(hash_parts).map(|(range, hashes)| {
            let (ram, first) = (&ram[byte_range(range)], range.start);
            move || hash_changed(ram, first, hashes)
        });
        concat(run_parallel(work.collect()))
    }

    /// Fails if the file is now shorter than at open (touching the mapping past its end would
    /// raise SIGBUS); a longer file is scanned up to its old size.
    fn check_size(&self) -> Result<(), Error> {
        check_size(&self.file, &self.path, self.pages)
    }
}

impl DirtyTracker for PageHashes {
    fn name(&self) -> &'static str {
        "page-hashes"
    }

    fn runs_with_guest(&self) -> bool {
        true
    }

    fn scan(&mut self) -> Result<Dirty, Error> {
        if let Err(error) = self.check_size() {
            // Nothing was hashed, but the contract after a failed pass is a full one.
            self.hashes.clear();
            return Err(error);
        }
        if self.hashes.is_empty() {
            Ok(self.scan_all())
        } else {
            Ok(self.scan_changed())
        }
    }
}

/// Copies `ram` into `data` a chunk at a time and records the hash of each copied page (the
/// copy, not the mapping: the guest may be writing).
fn copy_all(ram: &[u8], data: &mut [u8], hashes: &mut [u64]) {
    let chunks = ram.chunks(COPY_CHUNK).zip(data.chunks_mut(COPY_CHUNK));
    for ((from, to), hashes) in chunks.zip(hashes.chunks_mut(COPY_CHUNK / PAGE)) {
        to.copy_from_slice(from);
        for (hash, page) in hashes.iter_mut().zip(to.chunks_exact(PAGE)) {
            *hash = xxh3_64(page);
        }
    }
}

/// Hashes the pages of `ram` (page `first` on), updates `hashes` (indexed from `first`) and
/// answers the pages whose hash changed, with their contents.
///
/// A page the guest writes meanwhile (pre-copy) may hash torn; the hash kept is that of the
/// copy answered, so the next pass compares the page with exactly what was sent.
fn hash_changed(ram: &[u8], first: usize, hashes: &mut [u64]) -> Dirty {
    let mut dirty = Dirty::default();
    let pages = hashes.iter_mut().zip(ram.chunks_exact(PAGE));
    for ((old, page), index) in pages.zip(to_u64(first)..) {
        if xxh3_64(page) == *old {
            continue;
        }
        let start = dirty.data.len();
        dirty.data.extend_from_slice(page);
        let copied = xxh3_64(&dirty.data[start..]);
        if copied == *old {
            // Changed back between the hash and the copy: nothing to send.
            dirty.data.truncate(start);
        } else {
            *old = copied;
            dirty.pages.push(index);
        }
    }
    dirty
}

/// The bytes of a page range.
fn byte_range(pages: &Range<usize>) -> Range<usize> {
    pages.start * PAGE..pages.end * PAGE
}

/// Runs `work` with the first item on this thread and the others on scoped threads, and
/// returns their results in the order given. A panicking worker panics the caller.
fn run_parallel<T: Send, F: FnOnce() -> T + Send>(work: Vec<F>) -> Vec<T> {
    let mut work = work.into_iter();
    thread::scope(|scope| {
        let first = work.next();
        let handles: Vec<_> = work.map(|job| scope.spawn(job)).collect();
        let mut results: Vec<T> = first.into_iter().map(|job| job()).collect();
        for handle in handles {
            match handle.join() {
                Ok(result) => results.push(result),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        results
    })
}

/// Concatenates per-thread results, which are in ascending, non-overlapping page ranges.
fn concat(mut parts: Vec<Dirty>) -> Dirty {
    if parts.len() == 1 {
        return parts.pop().unwrap_or_default();
    }
    let mut all = Dirty {
        pages: Vec::with_capacity(parts.iter().map(Dirty::len).sum()),
        data: Vec::with_capacity(parts.iter().map(Dirty::bytes).sum()),
    };
    for part in parts {
        all.pages.extend_from_slice(&part.pages);
        all.data.extend_from_slice(&part.data);
    }
    all
}

/// Splits `0..pages` into at most `parts` (at least one) contiguous ranges of near-equal size.
fn split(pages: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.clamp(1, pages.max(1));
    let (base, extra) = (pages / parts, pages % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let end = start + base + usize::from(i < extra);
            let range = start..end;
            start = end;
            range
        })
        .collect()
}

/// Splits `items` into the disjoint slices of `ranges` (in units of `unit` items).
fn split_mut<'a, T>(
    mut items: &'a mut [T],
    ranges: &[Range<usize>],
    unit: usize,
) -> Vec<&'a mut [T]> {
    ranges
        .iter()
        .map(|range| {
            let (part, rest) = std::mem::take(&mut items).split_at_mut(range.len() * unit);
            items = rest;
            part
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    use super::super::PAGE_BYTES;
    use super::super::tests::{contents, ram_file, write_page};
    use super::*;

    const TEST_PAGES: usize = 64;

    #[test]
    fn page_hashes_first_scan_answers_every_page() {
        let ram = ram_file(TEST_PAGES);
        let mut tracker = PageHashes::open(ram.path(), 2).expect("open");

        let dirty = tracker.scan().expect("scan");

        assert_eq!(
            dirty,
            Dirty {
                pages: (0..64).collect(),
                data: contents(&ram)
            }
        );
        assert_eq!(tracker.pages(), 64);
    }

    #[test]
    fn page_hashes_no_change_answers_nothing() {
        let ram = ram_file(TEST_PAGES);
        let mut tracker = PageHashes::open(ram.path(), 2).expect("open");
        tracker.scan().expect("first scan");

        let dirty = tracker.scan().expect("scan");

        assert_eq!(dirty, Dirty::default());
    }

    #[test]
    fn page_hashes_two_pages_written_answers_them_with_new_contents() {
        let ram = ram_file(TEST_PAGES);
        let mut tracker = PageHashes::open(ram.path(), 2).expect("open");
        tracker.scan().expect("first scan");
        ram.as_file()
            .write_all_at(b"xy", 3 * PAGE_BYTES + 100)
            .expect("write page 3");
        ram.as_file()
            .write_all_at(b"z", 40 * PAGE_BYTES)
            .expect("write page 40");

        let dirty = tracker.scan().expect("scan");

        let all = contents(&ram);
        let expected = [&all[3 * PAGE..4 * PAGE], &all[40 * PAGE..41 * PAGE]].concat();
        assert_eq!(
            dirty,
            Dirty {
                pages: vec![3, 40],
                data: expected
            }
        );
        assert_eq!(&dirty.page(0).1[100..102], b"xy");
    }

    #[test]
    fn page_hashes_page_changed_and_restored_answers_nothing() {
        let ram = ram_file(TEST_PAGES);
        let mut tracker = PageHashes::open(ram.path(), 2).expect("open");
        tracker.scan().expect("first scan");
        write_page(&ram, 7, 0xee);
        write_page(&ram, 7, 7);

        let dirty = tracker.scan().expect("scan");

        assert!(dirty.is_empty());
    }

    #[test]
    fn page_hashes_one_and_three_threads_answer_the_same() {
        let ram = ram_file(TEST_PAGES + 1);
        let mut one = PageHashes::open(ram.path(), 1).expect("open one");
        let mut three = PageHashes::open(ram.path(), 3).expect("open three");
        let firsts = (
            one.scan().expect("scan one"),
            three.scan().expect("scan three"),
        );
        write_page(&ram, 0, 0xaa);
        write_page(&ram, 21, 0xaa);
        write_page(&ram, 22, 0xaa);
        write_page(&ram, 44, 0xaa);
        write_page(&ram, 64, 0xaa);

        let seconds = (
            one.scan().expect("scan one"),
            three.scan().expect("scan three"),
        );

        assert_eq!(firsts.0, firsts.1);
        assert_eq!(seconds.0, seconds.1);
        assert_eq!(seconds.1.pages, vec![0, 21, 22, 44, 64]);
    }

    #[test]
    fn page_hashes_more_threads_than_pages_answers_every_page() {
        let ram = ram_file(2);
        let mut tracker = PageHashes::open(ram.path(), 8).expect("open");

        let dirty = tracker.scan().expect("scan");

        assert_eq!(dirty.pages, vec![0, 1]);
    }

    #[test]
    fn page_hashes_file_grown_after_open_scans_old_size() {
        let ram = ram_file(TEST_PAGES);
        let mut tracker = PageHashes::open(ram.path(), 2).expect("open");
        tracker.scan().expect("first scan");
        write_page(&ram, 70, 0xaa);

        let dirty = tracker.scan().expect("scan");

        assert!(dirty.is_empty());
    }

    #[test]
    fn page_hashes_file_truncated_after_open_fails() {
        let ram = ram_file(TEST_PAGES);
        let mut tracker = PageHashes::open(ram.path(), 2).expect("open");
        tracker.scan().expect("first scan");
        ram.as_file().set_len(10 * PAGE_BYTES).expect("truncate");

        let result = tracker.scan();

        assert!(
            matches!(
                result,
                Err(Error::RamShrank {
                    expected: 262_144,
                    actual: 40_960,
                    ..
                })
            ),
            "{result:?}"
        );
    }

    #[test]
    fn page_hashes_scan_after_failed_scan_answers_every_page() {
        let ram = ram_file(TEST_PAGES);
        let mut tracker = PageHashes::open(ram.path(), 2).expect("open");
        tracker.scan().expect("first scan");
        ram.as_file().set_len(10 * PAGE_BYTES).expect("truncate");
        tracker.scan().expect_err("scan of a shrunk file");
        ram.as_file().set_len(64 * PAGE_BYTES).expect("grow back");

        let dirty = tracker.scan().expect("scan");

        assert_eq!(dirty.pages, (0..64).collect::<Vec<u64>>());
    }

    #[test]
    fn page_hashes_size_not_page_multiple_fails() {
        let mut ram = ram_file(1);
        ram.write_all(b"x").expect("write");

        let result = PageHashes::open(ram.path(), 1);

        assert!(
            matches!(result, Err(Error::RamSize { len: 4097, .. })),
            "{result:?}"
        );
    }

    #[test]
    fn page_hashes_empty_file_fails() {
        let ram = ram_file(0);

        let result = PageHashes::open(ram.path(), 1);

        assert!(
            matches!(result, Err(Error::RamSize { len: 0, .. })),
            "{result:?}"
        );
    }

    #[test]
    fn hash_changed_changed_page_keeps_hash_of_copy() {
        let ram = [[1; PAGE], [2; PAGE]].concat();
        let mut hashes = vec![xxh3_64(&[1; PAGE]), 0];

        let dirty = hash_changed(&ram, 10, &mut hashes);

        assert_eq!(dirty.pages, vec![11]);
        assert_eq!(hashes, vec![xxh3_64(&[1; PAGE]), xxh3_64(&dirty.data)]);
    }

    #[test]
    fn split_uneven_pages_gives_contiguous_ranges() {
        let ranges = split(10, 3);

        assert_eq!(ranges, vec![0..4, 4..7, 7..10]);
    }
}
