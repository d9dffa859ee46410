//! Fault tolerance (FT): Remus-style epoch checkpointing of a running guest to a standby QEMU
//! on the peer (notes/ft-checkpointing.md). Every epoch the primary is stopped, its device
//! state saved (`migrate file:` with `x-ignore-shared`: guest RAM lives in a shared file and is
//! not in the stream), the RAM pages changed since the last epoch found ([`dirty`]) and sent
//! with the device state to the peer, which applies them to the standby's RAM file and
//! acknowledges; only then does the primary resume. On failover the standby loads the last
//! committed device state and runs on from that instant: same boot, no reboot.

pub mod dirty;
pub mod epoch;
pub mod output;
pub mod qmp;
pub mod standby;
pub mod wire;

use std::path::{Path, PathBuf};

/// Errors locating an FT domain's RAM file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The QEMU process's mappings could not be read.
    #[error("reading the mappings of QEMU process {pid}")]
    Maps {
        /// The process.
        pid: u32,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No mapping of a RAM file under the memory backing directory.
    #[error("QEMU process {pid} maps no RAM file under {dir}: is its memory a shared file?")]
    NoRamFile {
        /// The process.
        pid: u32,
        /// Where the file was looked for.
        dir: String,
    },
}

/// The RAM file of the FT domain run by QEMU process `pid`: libvirt names it after the
/// domain's run-time ID (`<dir>/libvirt/qemu/<id>-<name>/pc.ram`), so it is read from the
/// process's mappings rather than predicted.
pub fn ram_file(pid: u32) -> Result<PathBuf, Error> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|source| Error::Maps { pid, source })?;
    ram_file_in(&maps, Path::new(crate::embed::MEMORY_BACKING_DIR)).ok_or_else(|| {
        Error::NoRamFile {
            pid,
            dir: crate::embed::MEMORY_BACKING_DIR.to_string(),
        }
    })
}

/// The first mapped file under `dir` named `pc.ram` in a `/proc/PID/maps` text.
fn ram_file_in(maps: &str, dir: &Path) -> Option<PathBuf> {
    maps.lines()
        .filter_map(|line| {
            line.find(" /")
                .map(|at| Path::new(line[at + 1..].trim_end()))
        })
        .find(|path| path.starts_with(dir) && path.file_name().is_some_and(|n| n == "pc.ram"))
        .map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_file_is_the_pc_ram_mapping_under_the_backing_dir() {
        let maps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234 /usr/bin/qemu-system-x86_64
7f0000000000-7f0010000000 rw-s 00000000 00:1a 99 /dev/shm/pairvisor/libvirt/qemu/qemu-embed-1-3-web 1/pc.ram
7f0010000000-7f0010001000 rw-p 00000000 00:00 0 
";
        assert_eq!(
            ram_file_in(maps, Path::new("/dev/shm/pairvisor")),
            Some(PathBuf::from(
                "/dev/shm/pairvisor/libvirt/qemu/qemu-embed-1-3-web 1/pc.ram"
            ))
        );
        assert_eq!(ram_file_in(maps, Path::new("/dev/shm/other")), None);
    }
}
