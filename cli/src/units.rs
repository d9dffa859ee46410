//! Sizes as admins type them (a number with an optional binary suffix: K, M, G, T, with or
//! without "iB"/"B"; a bare number means MiB), and times as they read them (UTC).

use anyhow::{Context, bail};

/// Parses a size to bytes; a bare number is MiB.
pub fn parse_bytes(text: &str) -> anyhow::Result<u64> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(split);
    let number: u64 = digits
        .parse()
        .with_context(|| format!("size {text:?}: expected a number like 512M or 2G"))?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => 20,
        "K" | "KB" | "KIB" => 10,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        other => bail!("size {text:?}: unknown unit {other:?}; use K, M, G or T"),
    };
    number
        .checked_mul(1u64 << shift)
        .with_context(|| format!("size {text:?} is too large"))
}

/// Parses a size to MiB; it must be a whole number of MiB.
pub fn parse_mib(text: &str) -> anyhow::Result<u64> {
    let bytes = parse_bytes(text)?;
    if !bytes.is_multiple_of(1 << 20) {
        bail!("size {text:?} is not a whole number of MiB");
    }
    Ok(bytes >> 20)
}

/// Formats bytes with the largest binary unit that keeps one decimal.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut whole = bytes;
    while whole >= 1024 && unit + 1 < UNITS.len() {
        whole /= 1024;
        unit += 1;
    }
    let divisor = 1u64 << (10 * unit);
    let tenths = (bytes % divisor) * 10 / divisor;
    if tenths == 0 {
        format!("{whole} {}", UNITS[unit])
    } else {
        format!("{whole}.{tenths} {}", UNITS[unit])
    }
}

/// A Unix time in milliseconds as UTC, e.g. `2026-12-01 15:04:05 UTC`.
pub fn utc(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let (days, day_secs) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        day_secs / 3600,
        day_secs % 3600 / 60,
        day_secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_bytes_bare_number_is_mib() {
        let bytes = parse_bytes("16").unwrap();

        assert_eq!(bytes, 16 << 20);
    }

    #[test]
    fn parse_bytes_gib_suffix() {
        let bytes = parse_bytes("2GiB").unwrap();

        assert_eq!(bytes, 2 << 30);
    }

    #[test]
    fn parse_bytes_unknown_unit_is_refused() {
        let err = parse_bytes("2X").unwrap_err();

        assert!(err.to_string().contains("unknown unit"));
    }

    #[test]
    fn parse_mib_of_fractional_mib_is_refused() {
        let err = parse_mib("1536K").unwrap_err();

        assert!(err.to_string().contains("whole number of MiB"));
    }

    #[test]
    fn human_shows_one_decimal() {
        let text = human(1536 << 20);

        assert_eq!(text, "1.5 GiB");
    }

    #[test]
    fn utc_formats_a_known_instant() {
        assert_eq!(utc(1_796_137_445_000), "2026-12-01 15:04:05 UTC");
    }

    #[test]
    fn utc_formats_epoch_and_leap_day() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }
}
