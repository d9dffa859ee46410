//! A one-line progress display for long transfers, on a terminal only (none under cron).

use std::io::Write;
use std::time::Instant;

use crate::units::human;

/// A one-line progress display on stderr.
pub struct Progress {
    name: String,
    total: u64,
    started: Instant,
    last: Option<Instant>,
}

impl Progress {
    /// A display for `total` bytes of `name`.
    pub fn new(name: &str, total: u64) -> Progress {
        Progress {
            name: name.to_string(),
            total,
            started: Instant::now(),
            last: None,
        }
    }

    /// Shows `sent` of the total (at most five times a second, and at the end).
    pub fn show(&mut self, sent: u64) {
        if self
            .last
            .is_some_and(|l| l.elapsed().as_millis() < 200 && sent < self.total)
        {
            return;
        }
        self.last = Some(Instant::now());
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let percent = sent.saturating_mul(100) / self.total.max(1);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let rate = (sent as f64 / secs) as u64;
        eprint!(
            "\r{}: {percent:>3}% ({} of {}, {}/s)   ",
            self.name,
            human(sent),
            human(self.total),
            human(rate)
        );
        let _ = std::io::stderr().flush();
    }

    /// Ends the line.
    pub fn done(&mut self) {
        eprintln!();
    }
}
