//! The bench's numbers: milliseconds, medians, and their rounding for the table and the JSON.

use std::time::Duration;

pub(crate) fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The controllers' Unix time `unix_ms` as ms after `origin_unix_ms`.
pub(crate) fn ms_after(unix_ms: i64, origin_unix_ms: i64) -> f64 {
    (unix_ms - origin_unix_ms) as f64
}

/// The median of `samples` (the mean of the middle two of an even count); `None` if empty.
pub(crate) fn median(samples: &[f64]) -> Option<f64> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[mid]),
        _ => Some(f64::midpoint(sorted[mid - 1], sorted[mid])),
    }
}

/// The lower median of `samples` (the middle one, or the lower of the middle two).
pub(crate) fn median_u64(samples: &[u64]) -> Option<u64> {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len().checked_sub(1)? / 2).copied()
}

/// Rounded to 0.1.
pub(crate) fn tenth(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        let samples = [4.0, 1.0, 3.0, 2.0];

        let m = median(&samples);

        assert_eq!(m, Some(2.5));
    }

    #[test]
    fn median_u64_of_an_even_count_is_the_lower_middle() {
        let samples = [40, 10, 30, 20];

        let m = median_u64(&samples);

        assert_eq!(m, Some(20));
    }

    #[test]
    fn median_of_nothing_is_none() {
        let m = median(&[]);

        assert_eq!(m, None);
    }
}
