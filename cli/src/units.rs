//! Sizes as admins type them: a number with an optional binary suffix (K, M, G, T, with or
//! without "iB"/"B"); a bare number means MiB.

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
}
