//! The guest's writes to each virtio disk and their total time (QMP `query-blockstats`):
//! under a synchronous mirror a write completes only once it is on both hosts, so their
//! mean time is the mirror's write latency.

use super::Error;
use crate::libvirt::Monitor;
use crate::qmp_block as qmp;

/// One disk's writes since its QEMU started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskWrites {
    /// Guest device, e.g. "vda".
    pub device: String,
    /// Writes completed.
    pub count: u64,
    /// Their total time in nanoseconds.
    pub total_ns: u64,
}

/// The writes to each of our virtio disks of the domain behind `m`.
pub(super) fn read(m: &Monitor<'_>) -> Result<Vec<DiskWrites>, Error> {
    let stats = qmp::query_blockstats(m)?;
    Ok(stats
        .into_iter()
        .filter_map(|entry| {
            Some(DiskWrites {
                device: qmp::device_of_qdev(&entry.qdev)?,
                count: entry.stats.wr_operations,
                total_ns: entry.stats.wr_total_time_ns,
            })
        })
        .collect())
}
