//! FT's epoch-buffered writes. While an export is in epoch mode its writes are not applied to
//! the file but held in memory, in arrival order: the peer's disk must stay equal to the
//! disk as of the last committed epoch, so an epoch's writes may only land once the FT
//! receiver has the primary's checkpoint (RAM and device state) for that epoch. Reads see the
//! held writes on top of the file. A commit applies the log and `fdatasync`s; a failover drops
//! it, because it belongs to an epoch that never committed.
//!
//! ```text
//!  primary QEMU (mirror)      NBD server (this)            FT receiver
//!    |-- WRITE/ZEROES -------->| held in the log, reply 0     |
//!    |-- FLUSH --------------->| reply 0, nothing synced      |
//!    |  (stop: in-flight I/O drained; checkpoint sent) ------>|
//!    |                         |<------- commit_epoch --------| checkpoint applied
//!    |                         | apply log in order, fdatasync|
//!    |<----------------- ack: the primary resumes -------------|
//!    ...  primary dies mid-epoch:
//!    |                         |<------- end_epochs ----------| failover: log dropped
//! ```
//!
//! The commit must come before the ack that lets the primary resume: the log has no epoch
//! marks, so writes that arrived after the checkpoint would be committed with it.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use super::server::write_zeroes;

/// The most memory an export's held writes may take (payloads plus a small fixed cost per
/// write, zeroes included); a write that would exceed it is refused with `ENOSPC`.
pub const MAX_HELD: u64 = 256 << 20;
/// What one held write costs besides its payload: its log entry and its extent.
const ENTRY_COST: u64 = 64;

/// What a commit applied to the file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpochApplied {
    /// Held writes (and write-zeroes) applied.
    pub writes: usize,
    /// Bytes they covered, zeroes included.
    pub bytes: u64,
}

/// A held write that did not fit under the cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Full {
    /// Bytes held already.
    pub held: u64,
    /// What the refused write would have added.
    pub asked: u64,
}

/// The writes of the open epoch, in arrival order.
#[derive(Debug)]
pub(super) struct Log {
    writes: Vec<Held>,
    /// The ranges the held writes touch, `start → end`, merged: a read that touches none of
    /// them skips the overlay.
    extents: BTreeMap<u64, u64>,
    /// Memory charged against `max`.
    cost: u64,
    max: u64,
}

#[derive(Debug)]
struct Held {
    offset: u64,
    change: Change,
}

#[derive(Debug)]
enum Change {
    Data(Vec<u8>),
    Zeroes(u64),
}

impl Held {
    fn len(&self) -> u64 {
        match &self.change {
            Change::Data(data) => data.len() as u64,
            Change::Zeroes(length) => *length,
        }
    }
}

impl Log {
    /// An empty log that holds at most `max` bytes.
    pub fn new(max: u64) -> Log {
        Log {
            writes: Vec::new(),
            extents: BTreeMap::new(),
            cost: 0,
            max,
        }
    }

    /// Holds `data` for `offset`.
    pub fn hold_write(&mut self, offset: u64, data: Vec<u8>) -> Result<(), Full> {
        let cost = data.len() as u64 + ENTRY_COST;
        self.hold(
            cost,
            Held {
                offset,
                change: Change::Data(data),
            },
        )
    }

    /// Holds `length` zeroes for `offset`.
    pub fn hold_zeroes(&mut self, offset: u64, length: u64) -> Result<(), Full> {
        self.hold(
            ENTRY_COST,
            Held {
                offset,
                change: Change::Zeroes(length),
            },
        )
    }

    fn hold(&mut self, cost: u64, held: Held) -> Result<(), Full> {
        let full = Full {
            held: self.cost,
            asked: cost,
        };
        let total = self.cost.checked_add(cost).ok_or(full)?;
        if total > self.max {
            return Err(full);
        }
        self.cost = total;
        self.cover(held.offset, held.offset.saturating_add(held.len()));
        self.writes.push(held);
        Ok(())
    }

    /// Adds `[start, end)` to the extents, merging what it overlaps or adjoins.
    fn cover(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // Extents are disjoint, so sorted by end as by start: walk back from the last one
        // that starts at or before `end` while they still reach `start`.
        let merged: Vec<(u64, u64)> = self
            .extents
            .range(..=end)
            .rev()
            .take_while(|(_, e)| **e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        let (mut start, mut end) = (start, end);
        for (s, e) in merged {
            self.extents.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.extents.insert(start, end);
    }

    /// Whether a held write touches `[start, end)`.
    fn touches(&self, start: u64, end: u64) -> bool {
        self.extents
            .range(..end)
            .next_back()
            .is_some_and(|(_, e)| *e > start)
    }

    /// Lays the held writes that overlap `buf` (the file's bytes from `offset`) over it, in
    /// arrival order.
    pub fn overlay(&self, offset: u64, buf: &mut [u8]) {
        let end = offset + buf.len() as u64;
        if !self.touches(offset, end) {
            return;
        }
        for held in &self.writes {
            let from = held.offset.max(offset);
            let to = held.offset.saturating_add(held.len()).min(end);
            if from >= to {
                continue;
            }
            let target = &mut buf[index(from - offset)..index(to - offset)];
            match &held.change {
                Change::Data(data) => target
                    .copy_from_slice(&data[index(from - held.offset)..index(to - held.offset)]),
                Change::Zeroes(_) => target.fill(0),
            }
        }
    }

    /// Writes the held writes to `file` in arrival order, then `fdatasync`s it. The log is
    /// left as it was: applying it again (after a failure) gives the same file.
    pub fn apply(&self, file: &File) -> std::io::Result<EpochApplied> {
        for held in &self.writes {
            match &held.change {
                Change::Data(data) => file.write_all_at(data, held.offset)?,
                Change::Zeroes(length) => write_zeroes(file, held.offset, *length)?,
            }
        }
        file.sync_data()?;
        Ok(EpochApplied {
            writes: self.writes.len(),
            bytes: self.writes.iter().map(Held::len).sum(),
        })
    }

    /// Drops the held writes; returns how many there were.
    pub fn clear(&mut self) -> usize {
        let dropped = self.writes.len();
        self.writes.clear();
        self.extents.clear();
        self.cost = 0;
        dropped
    }

    /// How many writes are held.
    pub fn len(&self) -> usize {
        self.writes.len()
    }
}

/// An index into a buffer, from a difference already bounded by the buffer's length.
fn index(n: u64) -> usize {
    usize::try_from(n).expect("bounded by a buffer's length")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_of_overlapping_writes_applies_them_in_arrival_order() {
        let mut log = Log::new(MAX_HELD);
        log.hold_write(2, b"aaaa".to_vec()).unwrap();
        log.hold_write(4, b"bb".to_vec()).unwrap();
        let mut buf = *b"........";

        log.overlay(0, &mut buf);

        assert_eq!(&buf, b"..aabb..");
    }

    #[test]
    fn overlay_of_a_range_inside_a_write_copies_its_middle() {
        let mut log = Log::new(MAX_HELD);
        log.hold_write(10, b"abcdef".to_vec()).unwrap();
        let mut buf = *b"...";

        log.overlay(12, &mut buf);

        assert_eq!(&buf, b"cde");
    }

    #[test]
    fn overlay_of_zeroes_after_a_write_clears_it() {
        let mut log = Log::new(MAX_HELD);
        log.hold_write(0, b"abcd".to_vec()).unwrap();
        log.hold_zeroes(1, 2).unwrap();
        let mut buf = *b"....";

        log.overlay(0, &mut buf);

        assert_eq!(&buf, b"a\0\0d");
    }

    #[test]
    fn overlay_of_an_untouched_range_leaves_it() {
        let mut log = Log::new(MAX_HELD);
        log.hold_write(0, b"abcd".to_vec()).unwrap();
        log.hold_write(8, b"efgh".to_vec()).unwrap();
        let mut buf = *b"....";

        log.overlay(4, &mut buf);

        assert_eq!(&buf, b"....");
    }

    #[test]
    fn cover_of_adjoining_and_overlapping_ranges_merges_them() {
        let mut log = Log::new(MAX_HELD);
        log.hold_write(0, vec![1; 4]).unwrap();
        log.hold_write(8, vec![1; 4]).unwrap();
        log.hold_write(20, vec![1; 4]).unwrap();

        log.hold_write(3, vec![1; 5]).unwrap();

        assert_eq!(
            log.extents
                .iter()
                .map(|(s, e)| (*s, *e))
                .collect::<Vec<_>>(),
            [(0, 12), (20, 24)]
        );
    }

    #[test]
    fn hold_write_past_the_cap_is_full_and_not_held() {
        let mut log = Log::new(6000);
        log.hold_write(0, vec![1; 4096]).unwrap();

        let held = log.hold_write(4096, vec![2; 4096]);

        assert_eq!(
            held,
            Err(Full {
                held: 4096 + ENTRY_COST,
                asked: 4096 + ENTRY_COST
            })
        );
        assert_eq!(log.len(), 1);
    }

    #[test]
    fn clear_drops_the_writes_and_their_cost() {
        let mut log = Log::new(6000);
        log.hold_write(0, vec![1; 4096]).unwrap();

        let dropped = log.clear();

        assert_eq!(dropped, 1);
        assert_eq!(log.hold_write(0, vec![1; 4096]), Ok(()));
    }
}
