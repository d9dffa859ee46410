//! Durations of one FT run as cumulative histograms, for the controller's metrics and
//! console: each checkpoint's pause (the last pause alone hides the slow ones users feel)
//! and each epoch's length, commit to commit (how far behind the standby can fall).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use proto::agent as pb;

/// Bucket bounds of checkpoint pauses, in microseconds: 1 ms to 1 s.
pub const PAUSE_BOUNDS_US: &[u64] = &[
    1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000,
];

/// Bucket bounds of epoch lengths, in microseconds: 10 ms to 10 s.
pub const EPOCH_BOUNDS_US: &[u64] = &[
    10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000, 2_000_000, 5_000_000, 10_000_000,
];

/// Durations counted per bucket (not cumulative; the last slot is above every bound).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
}

impl Histogram {
    /// An empty histogram with buckets up to each of `bounds` (µs, ascending).
    pub fn new(bounds: &'static [u64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Counts one duration.
    pub fn record(&self, duration: Duration) {
        let us = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        let slot = self
            .bounds
            .iter()
            .position(|bound| us <= *bound)
            .unwrap_or(self.bounds.len());
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// The histogram as the agent reports it: cumulative counts per bound.
    pub fn report(&self) -> pb::DurationHistogram {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(self.bounds.len());
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            buckets.push(pb::DurationBucket {
                le_us: *bound,
                count: cumulative,
            });
        }
        let above = self.counts[self.bounds.len()].load(Ordering::Relaxed);
        pb::DurationHistogram {
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
    fn durations_land_in_the_first_bucket_that_holds_them_cumulatively() {
        let pauses = Histogram::new(PAUSE_BOUNDS_US);
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
        let report = Histogram::new(EPOCH_BOUNDS_US).report();
        assert_eq!(report.buckets.len(), EPOCH_BOUNDS_US.len());
        assert!(report.buckets.iter().all(|b| b.count == 0));
        assert_eq!((report.count, report.sum_us), (0, 0));
    }
}
