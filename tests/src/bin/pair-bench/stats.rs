//! The bench's numbers: milliseconds, nearest-rank percentiles, min/median/max of repeated
//! samples, and their rounding for the table and the JSON.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub(crate) fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Milliseconds from `origin` to `t`, negative when `t` is earlier.
pub(crate) fn signed_millis(t: Instant, origin: Instant) -> f64 {
    match t.checked_duration_since(origin) {
        Some(after) => millis(after),
        None => -millis(origin.duration_since(t)),
    }
}

/// Nearest-rank percentile `p` (1–100) of `sorted`; NaN when empty.
pub(crate) fn percentile(sorted: &[f64], p: usize) -> f64 {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted.get(rank - 1).copied().unwrap_or(f64::NAN)
}

/// Rounded to 0.1 ms (NaN becomes JSON null).
pub(crate) fn tenth(ms: f64) -> f64 {
    (ms * 10.0).round() / 10.0
}

/// min, median and max of `samples`.
pub(crate) fn summary(samples: &[f64]) -> (f64, f64, f64) {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let min = sorted.first().copied().unwrap_or(f64::NAN);
    let max = sorted.last().copied().unwrap_or(f64::NAN);
    (min, percentile(&sorted, 50), max)
}

pub(crate) fn summary_json(samples: &[f64]) -> Value {
    let (min, median, max) = summary(samples);
    json!({
        "min": tenth(min),
        "median": tenth(median),
        "max": tenth(max),
        "samples": samples.iter().map(|s| tenth(*s)).collect::<Vec<_>>(),
    })
}

pub(crate) fn summary_text(samples: &[f64]) -> String {
    let (min, median, max) = summary(samples);
    format!("min {min:.0} / median {median:.0} / max {max:.0}")
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn percentile_99_of_500_is_the_495th() {
        let sorted: Vec<f64> = (1..=500).map(f64::from).collect();

        let p99 = percentile(&sorted, 99);

        assert_eq!(p99, 495.0);
    }
}
