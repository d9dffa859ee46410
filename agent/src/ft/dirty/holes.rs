//! Which pages of a guest RAM file hold data: the rest are holes, pages nobody has written,
//! which read as zeros and which only a write can fill.
//!
//! A guest touches only part of its RAM for a long time (a 256 MiB guest that booted and
//! runs a program touches under half), and tmpfs keeps the rest as holes. Page hashes skip
//! the holes instead of reading them, which both halves the paused scan for such a guest and
//! keeps the holes unallocated (a read fault through a shared mapping would fill them); the
//! standby skips writing zero pages into holes, so its copy stays as sparse as the primary's.
//!
//! `lseek(SEEK_DATA/SEEK_HOLE)` answers from the file's page cache index: tmpfs counts a
//! swapped-out page as data and a page allocated but never written as a hole, so "hole" means
//! "reads as zeros" exactly. A file system without hole support answers the whole file as
//! data, which only costs the saving.

use std::fs::File;
use std::io;
use std::ops::Range;

use super::{PAGE, PAGE_BYTES, to_u64};
use crate::seek::seek;

/// The ranges of pages among the file's first `pages` that hold data, ascending and
/// disjoint. A page partly data counts as data.
pub(super) fn data_ranges(file: &File, pages: usize) -> io::Result<Vec<Range<usize>>> {
    let end = to_u64(pages) * PAGE_BYTES;
    let mut ranges = Vec::new();
    let mut offset = 0;
    while offset < end {
        let Some(start) = seek(file, offset, libc::SEEK_DATA)? else {
            break;
        };
        if start >= end {
            break;
        }
        let stop = seek(file, start, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        // Both lie within the first `pages` pages, so they fit a usize.
        let first = usize::try_from(start / PAGE_BYTES).unwrap_or(pages);
        let last = usize::try_from(stop.div_ceil(PAGE_BYTES))
            .unwrap_or(pages)
            .max(first + 1);
        ranges.push(first..last);
        offset = to_u64(last) * PAGE_BYTES;
    }
    Ok(ranges)
}

/// Whether every page outside `data` (ascending, disjoint page ranges) among the file's first
/// `pages` is still a hole. Each gap costs one `SEEK_DATA` from its start, which walks only the
/// empty index up to the next data: much cheaper than [`data_ranges`], which walks every data
/// page of the file.
pub(super) fn still_holes(file: &File, pages: usize, data: &[Range<usize>]) -> io::Result<bool> {
    let mut gap_start = 0;
    let ends = data
        .iter()
        .map(|d| (d.start, d.end))
        .chain([(pages, pages)]);
    for (gap_end, next) in ends {
        if gap_end > gap_start {
            match seek(file, to_u64(gap_start) * PAGE_BYTES, libc::SEEK_DATA)? {
                // No data at or after the gap: every later gap is a hole too.
                None => return Ok(true),
                Some(found) if found < to_u64(gap_end) * PAGE_BYTES => return Ok(false),
                Some(_) => {}
            }
        }
        gap_start = next;
    }
    Ok(true)
}

/// Whether the page at `offset` (page-aligned) is a hole of the file: it reads as zeros and
/// writing zeros there would only allocate it.
pub fn is_hole(file: &File, offset: u64) -> io::Result<bool> {
    Ok(seek(file, offset, libc::SEEK_DATA)?.is_none_or(|data| data >= offset + PAGE_BYTES))
}

/// Whether a page's bytes are all zero.
pub fn is_zero(page: &[u8]) -> bool {
    debug_assert_eq!(page.len(), PAGE);
    page.iter().all(|&b| b == 0)
}

/// Splits `range` into its runs of data and holes by `data` (from [`data_ranges`]): each run
/// with whether it holds data, in order, covering `range` exactly.
pub(super) fn runs(range: Range<usize>, data: &[Range<usize>]) -> Vec<(Range<usize>, bool)> {
    let mut runs = Vec::new();
    let mut at = range.start;
    let first = data.partition_point(|d| d.end <= range.start);
    for d in &data[first..] {
        if at >= range.end {
            break;
        }
        let start = d.start.clamp(at, range.end);
        if start > at {
            runs.push((at..start, false));
        }
        let end = d.end.min(range.end);
        if end > start {
            runs.push((start..end, true));
        }
        at = end.max(start);
    }
    if at < range.end {
        runs.push((at..range.end, false));
    }
    runs
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::super::tests::sparse;
    use super::*;

    #[test]
    fn still_holes_until_a_gap_gets_data() {
        let file = sparse(64);
        for page in [3u64, 4, 40] {
            file.as_file()
                .write_all_at(b"x", page * PAGE_BYTES)
                .expect("write");
        }
        let data = data_ranges(file.as_file(), 64).expect("ranges");
        assert!(still_holes(file.as_file(), 64, &data).expect("check"));
        // Claiming more data than there is is fine: only the gaps are checked.
        assert!(still_holes(file.as_file(), 64, &[0..10, 40..41]).expect("check"));

        for page in [0u64, 20, 63] {
            let file = sparse(64);
            for written in [3u64, 4, 40, page] {
                file.as_file()
                    .write_all_at(b"y", written * PAGE_BYTES + 100)
                    .expect("write");
            }
            assert!(
                !still_holes(file.as_file(), 64, &data).expect("check"),
                "data in page {page} went unseen"
            );
        }
    }

    #[test]
    fn data_ranges_of_written_pages() {
        let file = sparse(64);
        for page in [3u64, 4, 5, 40, 63] {
            file.as_file()
                .write_all_at(b"x", page * PAGE_BYTES + 7)
                .expect("write");
        }

        let ranges = data_ranges(file.as_file(), 64).expect("ranges");

        assert_eq!(ranges, vec![3..6, 40..41, 63..64]);
        assert_eq!(
            data_ranges(file.as_file(), 41).expect("prefix"),
            vec![3..6, 40..41]
        );
        assert!(is_hole(file.as_file(), 6 * PAGE_BYTES).expect("hole"));
        assert!(!is_hole(file.as_file(), 40 * PAGE_BYTES).expect("data"));
    }

    #[test]
    fn a_page_read_through_the_file_stays_a_hole() {
        let file = sparse(4);
        let mut page = [1u8; PAGE];
        file.as_file()
            .read_exact_at(&mut page, PAGE_BYTES)
            .expect("read");

        assert!(is_zero(&page));
        assert!(data_ranges(file.as_file(), 4).expect("ranges").is_empty());
    }

    #[test]
    fn a_file_without_holes_is_all_data() {
        let file = sparse(8);
        file.as_file()
            .write_all_at(&vec![9; 8 * PAGE], 0)
            .expect("fill");

        assert_eq!(data_ranges(file.as_file(), 8).expect("ranges"), vec![0..8]);
        assert!(!is_hole(file.as_file(), 0).expect("data"));
    }

    #[test]
    fn runs_cover_the_range_in_order() {
        let data = [2..4, 6..7, 9..12];

        assert_eq!(
            runs(0..10, &data),
            vec![
                (0..2, false),
                (2..4, true),
                (4..6, false),
                (6..7, true),
                (7..9, false),
                (9..10, true)
            ]
        );
        assert_eq!(
            runs(3..8, &data),
            vec![(3..4, true), (4..6, false), (6..7, true), (7..8, false)]
        );
        assert_eq!(runs(12..14, &data), vec![(12..14, false)]);
        assert_eq!(runs(0..4, &[]), vec![(0..4, false)]);
        assert_eq!(runs(10..11, &data), vec![(10..11, true)]);
    }
}
