//! [`PageHashes`]: dirty pages found by hashing every page of the RAM file (xxh3-64) and
//! comparing with the previous pass, through a read-only shared mapping of the file.
//!
//! Holes of the file (pages the guest never wrote, see `holes`) are not read: they hash as a
//! zero page.
//!
//! A later pass works through the file in chunks that threads claim one at a time: the
//! tracker's own threads and any a caller lends through [`Helpers`] while the pass runs (the
//! epoch loop lends one once QEMU has saved the device state and its core is free).

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;

use super::holes::{self, runs};
use super::map::RamMap;
use super::{Dirty, DirtyTracker, Error, PAGE, check_size, open_ram, to_u64};

/// Bytes each thread of the first pass copies out of the mapping before hashing them: small
/// enough to still be in cache when hashed.
const COPY_CHUNK: usize = 1 << 20;

/// Pages a thread of a later pass claims at a time (4 MiB): small enough for a helper that
/// joins late to find work, large enough that claiming costs nothing.
const CLAIM_PAGES: usize = 1024;

/// The xxh3-64 hash of a page.
fn page_hash(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// Content hashes: xxh3-64 per page compared with the previous pass, hashed straight from a
/// read-only shared mapping of the file; only the pages answered are copied.
#[derive(Debug)]
pub struct PageHashes {
    /// The RAM file, for its size.
    file: File,
    /// Its path, for errors.
    path: PathBuf,
    /// The mapping and the hash of each page as last answered.
    ram: Arc<Ram>,
    /// Threads of the tracker's own per pass.
    threads: usize,
    /// Whether the hashes hold a complete pass (false before the first, and after a failure).
    hashed: bool,
    /// Where the running pass is lent to helpers.
    helpers: Helpers,
    /// The data ranges found by an earlier pass, reused while they still hold.
    known: Option<KnownData>,
}

/// Data ranges of the RAM file as found once, with the file's allocated blocks then. They
/// still hold when the file has as many blocks and every page outside them is still a hole
/// (`holes::still_holes`): no page turned into data, and so, the count being equal, none
/// turned into a hole. Checking that is far cheaper than finding the ranges again.
#[derive(Debug)]
struct KnownData {
    blocks: u64,
    ranges: Vec<Range<usize>>,
}

/// The mapped file and its pages' hashes, shared with the threads of a pass. A pass hands
/// each page range to one thread at a time, so a hash is only ever written by one.
#[derive(Debug)]
struct Ram {
    /// The file's first `pages` pages, mapped read-only.
    map: RamMap,
    /// Pages in the file, fixed at open.
    pages: usize,
    /// The hash of each page as last answered.
    hashes: Vec<AtomicU64>,
    /// The hash of a page of zeros, which every hole has.
    zero: u64,
}

impl PageHashes {
    /// Opens and maps the RAM file and fixes its page count; nothing is read until
    /// [`DirtyTracker::scan`]. Each pass runs on `threads` threads of its own.
    pub fn open(path: &Path, threads: usize) -> Result<PageHashes, Error> {
        let (file, pages) = open_ram(path)?;
        let map = RamMap::new(&file, pages * PAGE).map_err(|source| Error::MapRam {
            path: path.to_path_buf(),
            source,
        })?;
        let hashes = (0..pages).map(|_| AtomicU64::new(0)).collect();
        Ok(PageHashes {
            file,
            path: path.to_path_buf(),
            ram: Arc::new(Ram {
                map,
                pages,
                hashes,
                zero: page_hash(&[0; PAGE]),
            }),
            threads: threads.max(1),
            hashed: false,
            helpers: Helpers::default(),
            known: None,
        })
    }

    /// Pages in the RAM file.
    pub fn pages(&self) -> u64 {
        to_u64(self.ram.pages)
    }

    /// The first pass: copies the whole file into the result (holes as zeros, unread) and
    /// records every page's hash.
    fn scan_all(&mut self, data_ranges: &[Range<usize>]) -> Dirty {
        let ram = &*self.ram;
        let ranges = split(ram.pages, self.threads);
        let mut data = vec![0; ram.pages * PAGE];
        let mut parts = Vec::with_capacity(ranges.len());
        let mut rest = data.as_mut_slice();
        for range in &ranges {
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(range.len() * PAGE);
            parts.push((range.clone(), part));
            rest = tail;
        }
        thread::scope(|scope| {
            for (range, data) in parts {
                scope.spawn(move || copy_all(ram, range, data, data_ranges));
            }
        });
        self.hashed = true;
        Dirty {
            pages: (0..self.pages()).collect(),
            data,
        }
    }

    /// A later pass: hashes every page in place and answers those whose hash changed. Runs
    /// on the tracker's threads and on those lent through [`Helpers`] meanwhile.
    fn scan_changed(&mut self, data_ranges: Vec<Range<usize>>) -> Dirty {
        let pass = Arc::new(Pass::new(self.ram.clone(), data_ranges));
        self.helpers.lend(Some(pass.clone()));
        thread::scope(|scope| {
            for _ in 1..self.threads {
                scope.spawn(|| pass.work());
            }
            pass.work();
        });
        self.helpers.lend(None);
        pass.wait()
    }

    /// Fails if the file is now shorter than at open (touching the mapping past its end would
    /// raise SIGBUS); a longer file is scanned up to its old size.
    fn check_size(&self) -> Result<(), Error> {
        check_size(&self.file, &self.path, self.ram.pages)
    }

    /// The page ranges of the file that hold data now, or a superset of them: those of an
    /// earlier pass if they still hold ([`KnownData`]), else found again (tmpfs walks every
    /// data page to answer, milliseconds for a guest that touched 100 MiB). A page counted as
    /// data that is a hole only costs its reading; a page with data is never taken for a hole.
    fn data_ranges(&mut self) -> Result<Vec<Range<usize>>, Error> {
        let failed = |source| Error::SeekData {
            path: self.path.clone(),
            source,
        };
        // Read before the ranges: a page allocated meanwhile changes the count, and the next
        // pass finds the ranges again.
        let blocks = self.file.metadata().map_err(failed)?.blocks();
        if let Some(known) = &self.known
            && known.blocks == blocks
            && holes::still_holes(&self.file, self.ram.pages, &known.ranges).map_err(failed)?
        {
            return Ok(known.ranges.clone());
        }
        let ranges = holes::data_ranges(&self.file, self.ram.pages).map_err(failed)?;
        self.known = Some(KnownData {
            blocks,
            ranges: ranges.clone(),
        });
        Ok(ranges)
    }
}

impl DirtyTracker for PageHashes {
    fn name(&self) -> &'static str {
        "page-hashes"
    }

    fn runs_with_guest(&self) -> bool {
        true
    }

    fn helpers(&self) -> Option<Helpers> {
        Some(self.helpers.clone())
    }

    fn scan(&mut self) -> Result<Dirty, Error> {
        let data_ranges = match self.check_size().and_then(|()| self.data_ranges()) {
            Ok(ranges) => ranges,
            Err(error) => {
                // Nothing was hashed, but the contract after a failed pass is a full one.
                self.hashed = false;
                return Err(error);
            }
        };
        if self.hashed {
            Ok(self.scan_changed(data_ranges))
        } else {
            Ok(self.scan_all(&data_ranges))
        }
    }
}

/// Lends threads to the pass a [`PageHashes`] tracker runs now. Clone it before the pass
/// starts (the pass owns the tracker); [`Helpers::help`] then works on that pass.
#[derive(Clone, Debug, Default)]
pub struct Helpers(Arc<Mutex<Option<Arc<Pass>>>>);

impl Helpers {
    /// Hashes chunks of the running pass until none is left unclaimed; returns at once when
    /// no pass runs.
    pub fn help(&self) {
        let pass = lock(&self.0).clone();
        if let Some(pass) = pass {
            pass.work();
        }
    }

    fn lend(&self, pass: Option<Arc<Pass>>) {
        *lock(&self.0) = pass;
    }
}

/// One later pass: page ranges claimed in order by whichever thread comes, their results
/// gathered until every range is done.
#[derive(Debug)]
struct Pass {
    ram: Arc<Ram>,
    /// The page ranges holding data when the pass began; the rest hash as zeros.
    data_ranges: Vec<Range<usize>>,
    /// Ranges of [`CLAIM_PAGES`] pages (the last one shorter).
    claims: usize,
    /// The next range to claim.
    next: AtomicUsize,
    /// Ranges done and what they found.
    done: Mutex<Done>,
    /// Signalled when the last range is done.
    all_done: Condvar,
}

#[derive(Debug, Default)]
struct Done {
    count: usize,
    parts: Vec<(usize, Dirty)>,
}

impl Pass {
    fn new(ram: Arc<Ram>, data_ranges: Vec<Range<usize>>) -> Pass {
        let claims = ram.pages.div_ceil(CLAIM_PAGES);
        Pass {
            ram,
            data_ranges,
            claims,
            next: AtomicUsize::new(0),
            done: Mutex::new(Done::default()),
            all_done: Condvar::new(),
        }
    }

    /// Claims and hashes ranges until none is left.
    fn work(&self) {
        loop {
            let claim = self.next.fetch_add(1, Ordering::Relaxed);
            if claim >= self.claims {
                return;
            }
            let first = claim * CLAIM_PAGES;
            let pages = first..(first + CLAIM_PAGES).min(self.ram.pages);
            let dirty = hash_changed(&self.ram, pages, &self.data_ranges);
            let mut done = lock(&self.done);
            done.parts.push((claim, dirty));
            done.count += 1;
            if done.count == self.claims {
                self.all_done.notify_all();
            }
        }
    }

    /// Waits until every range is done (helpers may still hash the last ones) and answers
    /// what they found, in page order.
    fn wait(&self) -> Dirty {
        let mut done = lock(&self.done);
        while done.count < self.claims {
            done = self
                .all_done
                .wait(done)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let mut parts = std::mem::take(&mut done.parts);
        drop(done);
        parts.sort_unstable_by_key(|(claim, _)| *claim);
        concat(parts.into_iter().map(|(_, dirty)| dirty).collect())
    }
}

/// Locks `mutex`, whatever a panicking holder left in it (the data stays consistent: every
/// update is one push or one store).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Copies pages `range` of `ram` into `data` (zeros) a chunk at a time and records the hash
/// of each copied page (the copy, not the mapping: the guest may be writing). Holes are left
/// zero, unread.
fn copy_all(ram: &Ram, range: Range<usize>, data: &mut [u8], data_ranges: &[Range<usize>]) {
    let base = range.start;
    for (run, is_data) in runs(range, data_ranges) {
        let to = &mut data[byte_range(&(run.start - base..run.end - base))];
        if is_data {
            copy_run(ram, run, to);
        } else {
            for hash in &ram.hashes[run] {
                hash.store(ram.zero, Ordering::Relaxed);
            }
        }
    }
}

/// Copies pages `range` of `ram`, all data, into `data` and records their hashes.
fn copy_run(ram: &Ram, range: Range<usize>, data: &mut [u8]) {
    let from = &ram.map.bytes()[byte_range(&range)];
    let hashes = &ram.hashes[range];
    let chunks = from.chunks(COPY_CHUNK).zip(data.chunks_mut(COPY_CHUNK));
    for ((from, to), hashes) in chunks.zip(hashes.chunks(COPY_CHUNK / PAGE)) {
        to.copy_from_slice(from);
        for (hash, page) in hashes.iter().zip(to.chunks_exact(PAGE)) {
            hash.store(page_hash(page), Ordering::Relaxed);
        }
    }
}

/// Hashes pages `range` of `ram`, updates their hashes and answers the pages whose hash
/// changed, with their contents. Pages outside `data_ranges` are holes, zeros unread.
fn hash_changed(ram: &Ram, range: Range<usize>, data_ranges: &[Range<usize>]) -> Dirty {
    let mut dirty = Dirty::default();
    for (run, is_data) in runs(range, data_ranges) {
        if is_data {
            hash_run(ram, run, &mut dirty);
        } else {
            zero_run(ram, run, &mut dirty);
        }
    }
    dirty
}

/// [`hash_changed`] for pages `range`, all data: hashes them through the mapping.
///
/// A page the guest writes meanwhile (pre-copy) may hash torn; the hash kept is that of the
/// copy answered, so the next pass compares the page with exactly what was sent.
fn hash_run(ram: &Ram, range: Range<usize>, dirty: &mut Dirty) {
    let bytes = &ram.map.bytes()[byte_range(&range)];
    let pages = ram.hashes[range.clone()]
        .iter()
        .zip(bytes.chunks_exact(PAGE));
    for ((hash, page), index) in pages.zip(to_u64(range.start)..) {
        let old = hash.load(Ordering::Relaxed);
        if page_hash(page) == old {
            continue;
        }
        let start = dirty.data.len();
        dirty.data.extend_from_slice(page);
        let copied = page_hash(&dirty.data[start..]);
        if copied == old {
            // Changed back between the hash and the copy: nothing to send.
            dirty.data.truncate(start);
        } else {
            hash.store(copied, Ordering::Relaxed);
            dirty.pages.push(index);
        }
    }
}

/// [`hash_changed`] for pages `range`, all holes: a page whose last answer was not zeros
/// (its data was punched out) is answered as zeros.
fn zero_run(ram: &Ram, range: Range<usize>, dirty: &mut Dirty) {
    for (hash, index) in ram.hashes[range.clone()].iter().zip(to_u64(range.start)..) {
        if hash.load(Ordering::Relaxed) != ram.zero {
            hash.store(ram.zero, Ordering::Relaxed);
            dirty.pages.push(index);
            dirty.data.resize(dirty.data.len() + PAGE, 0);
        }
    }
}

/// The bytes of a page range.
fn byte_range(pages: &Range<usize>) -> Range<usize> {
    pages.start * PAGE..pages.end * PAGE
}

/// Concatenates results of ascending, non-overlapping page ranges.
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    use tempfile::NamedTempFile;

    use super::super::PAGE_BYTES;
    use super::super::tests::{contents, ram_file, sparse, write_page};
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
    fn a_lent_helper_finds_the_same_pages() {
        const LAST: u64 = 3 * 1024 + 4;
        let ram = ram_file(3 * CLAIM_PAGES + 5);
        let mut tracker = PageHashes::open(ram.path(), 1).expect("open");
        tracker.scan().expect("first scan");
        let helpers = tracker.helpers().expect("page hashes take helpers");
        for page in [0, 1500, 2048, LAST] {
            write_page(&ram, page, 0xcc);
        }

        let dirty = thread::scope(|scope| {
            let scanning = scope.spawn(|| tracker.scan().expect("scan"));
            // Helps with whatever is left of the pass, or finds none running: both are fine.
            while !scanning.is_finished() {
                helpers.help();
            }
            scanning.join().expect("scan thread")
        });

        assert_eq!(dirty.pages, vec![0, 1500, 2048, LAST]);
        assert!(dirty.data[..PAGE].iter().all(|&b| b == 0xcc));
        helpers.help();
        assert!(tracker.scan().expect("scan").is_empty());
    }

    /// Punches page `page` of `ram` out: it becomes a hole again, as a balloon or discard
    /// leaves it.
    #[allow(unsafe_code)]
    fn punch(ram: &NamedTempFile, page: u64) {
        let offset = libc::off_t::try_from(page * PAGE_BYTES).expect("offset");
        let len = libc::off_t::try_from(PAGE_BYTES).expect("len");
        // SAFETY: fallocate only acts on the descriptor, which `ram` keeps open; it touches
        // no memory of this process.
        let rc = unsafe {
            libc::fallocate(
                ram.as_file().as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        assert_eq!(rc, 0, "punch: {}", std::io::Error::last_os_error());
    }

    #[test]
    fn page_hashes_leave_holes_unread_and_answer_them_as_zeros() {
        let ram = sparse(3 * CLAIM_PAGES);
        write_page(&ram, 5, 0x11);
        write_page(&ram, 2000, 0x22);
        let mut tracker = PageHashes::open(ram.path(), 2).expect("open");

        let first = tracker.scan().expect("first scan");

        assert_eq!(first.len(), 3 * CLAIM_PAGES);
        assert_eq!(first.data, contents(&ram));
        // The holes were not read through the mapping, which would have filled them.
        let data = holes::data_ranges(ram.as_file(), 3 * CLAIM_PAGES).expect("ranges");
        assert_eq!(data, vec![5..6, 2000..2001]);
        assert!(tracker.scan().expect("second scan").is_empty());
    }

    #[test]
    fn page_hashes_answer_a_hole_written_and_a_page_punched() {
        let ram = sparse(2 * CLAIM_PAGES);
        write_page(&ram, 10, 0x33);
        let mut tracker = PageHashes::open(ram.path(), 1).expect("open");
        tracker.scan().expect("first scan");
        write_page(&ram, 1500, 0x44);
        punch(&ram, 10);

        let dirty = tracker.scan().expect("scan");

        assert_eq!(dirty.pages, vec![10, 1500]);
        assert!(dirty.page(0).1.iter().all(|&b| b == 0));
        assert!(dirty.page(1).1.iter().all(|&b| b == 0x44));
        assert!(tracker.scan().expect("scan again").is_empty());
    }

    #[test]
    fn page_hashes_reusing_known_ranges_still_see_new_data_and_punches() {
        let ram = sparse(2 * CLAIM_PAGES);
        write_page(&ram, 10, 0x33);
        let mut tracker = PageHashes::open(ram.path(), 1).expect("open");
        tracker.scan().expect("first scan");
        assert!(tracker.scan().expect("known ranges").is_empty());

        write_page(&ram, 1500, 0x44);
        assert_eq!(tracker.scan().expect("scan").pages, vec![1500]);
        write_page(&ram, 10, 0x55);
        assert_eq!(tracker.scan().expect("scan").pages, vec![10]);
        punch(&ram, 10);
        let dirty = tracker.scan().expect("scan");

        assert_eq!(dirty.pages, vec![10]);
        assert!(dirty.page(0).1.iter().all(|&b| b == 0));
        let known = tracker.known.as_ref().expect("ranges known");
        assert_eq!(known.ranges, vec![1500..1501]);
        assert!(tracker.scan().expect("scan again").is_empty());
    }

    #[test]
    fn split_uneven_pages_gives_contiguous_ranges() {
        let ranges = split(10, 3);

        assert_eq!(ranges, vec![0..4, 4..7, 7..10]);
    }
}
