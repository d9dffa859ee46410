//! Device-state deltas. QEMU's device state at a checkpoint (`xen-save-devices-state` output,
//! tens of KB of device registers and queues) differs from the previous epoch's in a few
//! hundred bytes. After the first commit of a stream the primary sends only
//! the blocks that changed since the state its standby last acknowledged, with a hash of the
//! whole new state: the standby rebuilds the state from its own copy and refuses the epoch if
//! the base or the result is not what the primary had, so a resumed standby never loads a
//! state the primary did not save.

/// The hash that proves a rebuilt state equal to the primary's: xxh3-64.
fn state_hash(state: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(state)
}

/// Comparison granularity: small enough that a changed register costs little, large enough
/// that the run headers stay small.
pub const BLOCK: usize = 64;

/// Errors rebuilding a device state from a delta.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The delta was taken against another epoch's state than the one held here.
    #[error("the delta is against epoch {delta}, but the standby holds epoch {held}")]
    Base {
        /// The epoch the primary diffed against.
        delta: u64,
        /// The epoch whose state the standby holds.
        held: u64,
    },
    /// The base state has another length than the primary's.
    #[error("the delta is for a {delta}-byte state, but the standby's is {held} bytes")]
    Length {
        /// The length the primary's base had.
        delta: usize,
        /// The length of the standby's copy.
        held: usize,
    },
    /// A run falls outside the state.
    #[error("a {len}-byte run at offset {offset} falls outside the {state}-byte state")]
    Run {
        /// Where the run starts.
        offset: usize,
        /// How long it is.
        len: usize,
        /// The state's length.
        state: usize,
    },
    /// The rebuilt state is not the one the primary saved.
    #[error(
        "the rebuilt device state does not match the primary's (hash {got:#x}, expected {want:#x})"
    )]
    Hash {
        /// Hash of what was rebuilt.
        got: u64,
        /// Hash the primary sent.
        want: u64,
    },
}

/// What changed in a device state since the state of epoch `base`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delta {
    /// The epoch whose state this delta applies to.
    pub base: u64,
    /// Length of both states (a delta is only taken between states of equal length).
    pub len: usize,
    /// xxh3-64 of the new state.
    pub hash: u64,
    /// Changed byte ranges: offset and the new bytes there, in increasing order.
    pub runs: Vec<(usize, Vec<u8>)>,
}

impl Delta {
    /// The delta from `old` (epoch `base`) to `new`, or `None` when a full state is as cheap:
    /// the lengths differ (a device's section grew or shrank) or most blocks changed.
    pub fn between(base: u64, old: &[u8], new: &[u8]) -> Option<Delta> {
        if old.len() != new.len() {
            return None;
        }
        let mut runs: Vec<(usize, Vec<u8>)> = Vec::new();
        let mut changed = 0;
        for (index, (a, b)) in old.chunks(BLOCK).zip(new.chunks(BLOCK)).enumerate() {
            if a == b {
                continue;
            }
            let offset = index * BLOCK;
            changed += b.len();
            match runs.last_mut() {
                Some((start, bytes)) if *start + bytes.len() == offset => {
                    bytes.extend_from_slice(b)
                }
                _ => runs.push((offset, b.to_vec())),
            }
        }
        (changed <= new.len() / 2).then(|| Delta {
            base,
            len: new.len(),
            hash: state_hash(new),
            runs,
        })
    }

    /// Rebuilds the new state from `held`, the state of epoch `held_epoch`.
    pub fn apply(&self, held_epoch: u64, held: &[u8]) -> Result<Vec<u8>, Error> {
        if self.base != held_epoch {
            return Err(Error::Base {
                delta: self.base,
                held: held_epoch,
            });
        }
        if self.len != held.len() {
            return Err(Error::Length {
                delta: self.len,
                held: held.len(),
            });
        }
        let mut state = held.to_vec();
        for (offset, bytes) in &self.runs {
            let run = Error::Run {
                offset: *offset,
                len: bytes.len(),
                state: state.len(),
            };
            let end = offset.checked_add(bytes.len()).ok_or(run.clone())?;
            state
                .get_mut(*offset..end)
                .ok_or(run)?
                .copy_from_slice(bytes);
        }
        let got = state_hash(&state);
        if got != self.hash {
            return Err(Error::Hash {
                got,
                want: self.hash,
            });
        }
        Ok(state)
    }

    /// Bytes of state the delta carries.
    pub fn carried(&self) -> usize {
        self.runs.iter().map(|(_, bytes)| bytes.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| u8::try_from(i * 7 % 251).unwrap_or(0))
            .collect()
    }

    #[test]
    fn a_delta_carries_only_the_changed_blocks_and_rebuilds_the_state() {
        let old = state(10_000);
        let mut new = old.clone();
        new[5] ^= 1;
        new[BLOCK * 3 + 1] ^= 1;
        new[BLOCK * 4] ^= 1; // adjacent to the block before: one run
        new[9_999] ^= 1; // the short last block

        let delta = Delta::between(4, &old, &new).unwrap();

        let starts: Vec<usize> = delta.runs.iter().map(|(o, _)| *o).collect();
        assert_eq!(starts, vec![0, BLOCK * 3, 9_984]);
        assert_eq!(delta.carried(), BLOCK + 2 * BLOCK + 16);
        assert_eq!(delta.apply(4, &old).unwrap(), new);
    }

    #[test]
    fn equal_states_give_an_empty_delta() {
        let old = state(1_000);

        let delta = Delta::between(1, &old, &old).unwrap();

        assert!(delta.runs.is_empty());
        assert_eq!(delta.apply(1, &old).unwrap(), old);
    }

    #[test]
    fn another_length_or_mostly_changed_state_is_sent_whole() {
        let old = state(1_000);
        assert_eq!(Delta::between(1, &old, &state(1_064)), None);
        let new: Vec<u8> = old.iter().map(|b| b ^ 0xff).collect();
        assert_eq!(Delta::between(1, &old, &new), None);
    }

    #[test]
    fn a_delta_against_another_base_is_refused() {
        let old = state(1_000);
        let mut new = old.clone();
        new[0] ^= 1;
        let delta = Delta::between(3, &old, &new).unwrap();

        assert_eq!(delta.apply(2, &old), Err(Error::Base { delta: 3, held: 2 }));
        assert_eq!(
            delta.apply(3, &old[..999]),
            Err(Error::Length {
                delta: 1_000,
                held: 999
            })
        );
        // The right epoch number but other bytes (a bug, or a stale copy): the hash catches it.
        let mut other = old.clone();
        other[500] ^= 1;
        assert!(matches!(delta.apply(3, &other), Err(Error::Hash { .. })));
    }

    #[test]
    fn a_run_outside_the_state_is_refused() {
        let old = state(100);
        let delta = Delta {
            base: 1,
            len: 100,
            hash: 0,
            runs: vec![(90, vec![0; 20])],
        };

        assert!(matches!(delta.apply(1, &old), Err(Error::Run { .. })));
        let wrapping = Delta {
            runs: vec![(usize::MAX, vec![0; 2])],
            ..delta
        };
        assert!(matches!(wrapping.apply(1, &old), Err(Error::Run { .. })));
    }
}
