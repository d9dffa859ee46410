//! Facts about this host that the controllers place VMs by.

use std::path::Path;

/// Logical CPUs this process may use.
pub fn cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

/// Total memory of this host in MiB, from /proc/meminfo.
pub fn memory_mib() -> std::io::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    parse_mem_total_mib(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no MemTotal in /proc/meminfo",
        )
    })
}

fn parse_mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Names of the complete boot images in `dir` (subdirectories with kernel, initrd, cmdline).
pub fn boot_images(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| images::BootImage::open(&e.path()).is_ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_mem_total_converts_kib_to_mib() {
        let text = "MemTotal:       24576000 kB\nMemFree:        1000 kB\n";

        let mib = parse_mem_total_mib(text);

        assert_eq!(mib, Some(24000));
    }

    #[test]
    fn parse_mem_total_missing_line_is_none() {
        let mib = parse_mem_total_mib("MemFree: 1 kB\n");

        assert_eq!(mib, None);
    }
}
