//! The checkpoint pauses of one FT run as a cumulative histogram, for the controller's
//! metrics and console: the last pause alone hides the slow ones that users feel.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use proto::agent as pb;

/// Upper bounds of the buckets, in microseconds: 1 ms to 1 s.
pub const BOUNDS_US: [u64; 10] = [
    1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000,
];

/// Pauses counted per bucket (not cumulative; the last slot is above every bound).
#[derive(Debug, Default)]
pub struct Pauses {
    counts: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Pauses {
    /// Counts one checkpoint's pause.
    pub fn record(&self, pause: Duration) {
        let us = u64::try_from(pause.as_micros()).unwrap_or(u64::MAX);
        let slot = BOUNDS_US
            .iter()
            .position(|bound| us <= *bound)
            .unwrap_or(BOUNDS_US.len());
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// The histogram as the agent reports it: cumulative counts per bound.
    pub fn report(&self) -> pb::PauseHistogram {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(BOUNDS_US.len());
        for (bound, count) in BOUNDS_US.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            buckets.push(pb::PauseBucket {
                le_us: *bound,
                count: cumulative,
            });
        }
        let above = self.counts[BOUNDS_US.len()].load(Ordering::Relaxed);
        pb::PauseHistogram {
            buckets,
            count: cumulative + above,
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_land_in_the_first_bucket_that_holds_them_cumulatively() {
        let pauses = Pauses::default();
        for ms in [0.5, 1.0, 1.5, 30.0, 2_000.0] {
            pauses.record(Duration::from_secs_f64(ms / 1000.0));
        }
        let report = pauses.report();
        let at = |bound: u64| {
            report
                .buckets
                .iter()
                .find(|b| b.le_us == bound)
                .map(|b| b.count)
        };
        assert_eq!(at(1_000), Some(2), "0.5 ms and exactly 1 ms");
        assert_eq!(at(2_000), Some(3));
        assert_eq!(at(20_000), Some(3));
        assert_eq!(at(50_000), Some(4));
        assert_eq!(at(1_000_000), Some(4), "2 s is above every bound");
        assert_eq!(report.count, 5);
        assert_eq!(report.sum_us, 500 + 1_000 + 1_500 + 30_000 + 2_000_000);
    }

    #[test]
    fn an_empty_run_reports_zeros_at_every_bound() {
        let report = Pauses::default().report();
        assert_eq!(report.buckets.len(), BOUNDS_US.len());
        assert!(report.buckets.iter().all(|b| b.count == 0));
        assert_eq!((report.count, report.sum_us), (0, 0));
    }
}
