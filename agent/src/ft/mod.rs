//! Fault tolerance (FT): Remus-style epoch checkpointing of a running guest to a standby QEMU
//! on the peer (notes/ft-checkpointing.md). Every epoch the primary is stopped, its device
//! state saved (`xen-save-devices-state`: guest RAM lives in a shared file and is not in the
//! state, see [`ramblocks`]), the RAM pages changed since the last epoch found ([`dirty`]) and sent
//! with the device state to the peer, which applies them to the standby's RAM file and
//! acknowledges; only then does the primary resume. On failover the standby loads the last
//! committed device state and runs on from that instant: same boot, no reboot.

pub mod dirty;
pub mod epoch;
pub mod histogram;
pub mod netbuf;
pub mod output;
pub mod qmp;
pub mod ramblocks;
pub mod standby;
pub mod state_delta;
pub mod wire;

use std::path::{Path, PathBuf};

/// The file name of the FT shim (crate `ftshim`), which FT guests' QEMU preloads so that the
/// kernel tracks their RAM writes ([`dirty::KernelMarks`]).
pub const SHIM_FILE: &str = "libpvftshim.so";

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
    /// No mapping of a libvirt RAM file.
    #[error(
        "QEMU process {pid} maps no libvirt RAM file (.../libvirt/qemu/<domain>/pc.ram): is its memory a shared file?"
    )]
    NoRamFile {
        /// The process.
        pid: u32,
    },
}

/// The RAM file of the FT domain run by QEMU process `pid`: libvirt names it after the
/// domain's run-time ID (`<ram_dir>/libvirt/qemu/<id>-<name>/pc.ram`), so it is read from
/// the process's mappings rather than predicted.
pub fn ram_file(pid: u32) -> Result<PathBuf, Error> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|source| Error::Maps { pid, source })?;
    ram_file_in(&maps).ok_or(Error::NoRamFile { pid })
}

/// The first mapped libvirt RAM file (`.../libvirt/qemu/<domain>/pc.ram`) in a
/// `/proc/PID/maps` text.
fn ram_file_in(maps: &str) -> Option<PathBuf> {
    maps.lines()
        .filter_map(|line| {
            line.find(" /")
                .map(|at| Path::new(line[at + 1..].trim_end()))
        })
        .find(|path| {
            path.file_name().is_some_and(|n| n == "pc.ram")
                && path
                    .parent()
                    .and_then(Path::parent)
                    .is_some_and(|dir| dir.ends_with("libvirt/qemu"))
        })
        .map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_file_is_the_libvirt_pc_ram_mapping() {
        let maps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234 /usr/bin/qemu-system-x86_64
7f0000000000-7f0010000000 rw-s 00000000 00:1a 99 /dev/shm/pairvisor/libvirt/qemu/qemu-embed-1-3-web 1/pc.ram
7f0010000000-7f0010001000 rw-p 00000000 00:00 0 
";
        assert_eq!(
            ram_file_in(maps),
            Some(PathBuf::from(
                "/dev/shm/pairvisor/libvirt/qemu/qemu-embed-1-3-web 1/pc.ram"
            ))
        );
        assert_eq!(
            ram_file_in("7f00-7f10 rw-s 00000000 00:1a 99 /dev/shm/other/pc.ram\n"),
            None
        );
    }
}
