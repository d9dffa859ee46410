//! VM snapshots on this host: each disk's generations form a qcow2 chain next to its volume
//! (`GROUP/.snapshots/VOLUME/ID.qcow2`, see [`chain`]). The first generation holds the disk's
//! used data; a later one holds only what changed since its parent, which its header names as
//! its backing file.
//!
//! Why backing chains of separate files, filled by dirty bitmaps, rather than qcow2 external
//! snapshots that put an overlay on top of the running disk: the running disk's block graph
//! stays as it is (raw or qcow2, under the HA mirror or the FT epochs), a generation can be
//! deleted, restored or copied as a file while the VM runs, and a failed snapshot leaves the
//! disk untouched. A running domain's disks are copied by QEMU at one instant (`live`); a
//! stopped one's by `qemu-img convert`, which writes only what differs from the parent.

pub mod chain;
pub mod live;
pub mod transfer;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use self::chain::Chain;
use crate::domain::{self, DiskFormat};
use crate::libvirt::{self, DomainState, Libvirt};
use crate::storage::{self, StorageGroups, fs_space};

/// Room kept free beyond a snapshot's data: qcow2 metadata per disk.
const METADATA_BYTES: u64 = 2 << 20;

/// Errors of snapshot operations; each names what to look at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A volume's group or name is unusable.
    #[error(transparent)]
    Storage(#[from] storage::Error),
    /// libvirt failed.
    #[error(transparent)]
    Libvirt(#[from] libvirt::Error),
    /// A QMP command failed.
    #[error(transparent)]
    Qmp(#[from] crate::qmp_block::Error),
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `qemu-img` failed.
    #[error("qemu-img {args}: {stderr}")]
    QemuImg {
        /// Its arguments.
        args: String,
        /// Its error output.
        stderr: String,
    },
    /// The domain has no disk of that guest device.
    #[error("domain {uuid} has no disk {device}")]
    DiskUnknown {
        /// Domain UUID.
        uuid: String,
        /// Guest device.
        device: String,
    },
    /// The disk runs on the peer's copy, not on its local file.
    #[error(
        "disk {device} of domain {uuid} runs on the peer's copy (its local disk failed); snapshots resume once it runs on a local disk again"
    )]
    NotLocal {
        /// Domain UUID.
        uuid: String,
        /// Guest device.
        device: String,
    },
    /// The copy-before-write failed a guest write: the guest paused on an I/O error.
    #[error("the snapshot's copy failed a guest write")]
    GuestWriteBroken,
    /// QEMU's copy failed.
    #[error("QEMU's snapshot copy {job} failed: {error}")]
    CopyFailed {
        /// The job(s).
        job: String,
        /// QEMU's words.
        error: String,
    },
    /// The snapshot would not fit; nothing was written.
    #[error(
        "the snapshot needs about {needed} bytes in storage group {group} but only {free} are free; delete old snapshots or free space there"
    )]
    NoSpace {
        /// Storage group.
        group: String,
        /// Bytes needed (data plus metadata).
        needed: u64,
        /// Bytes free.
        free: u64,
    },
    /// The snapshot is not on this host.
    #[error("snapshot {id} is not on this host ({} is missing)", path.display())]
    Missing {
        /// Snapshot ID.
        id: String,
        /// The file looked for.
        path: PathBuf,
    },
    /// A restore was asked for a running domain.
    #[error("domain {uuid} runs; a snapshot is restored only while the VM is stopped")]
    Running {
        /// Domain UUID.
        uuid: String,
    },
}

/// A volume of the VM, in disk order.
#[derive(Clone, Debug)]
pub struct SnapVolume {
    /// Storage group.
    pub group: String,
    /// Volume name.
    pub name: String,
    /// Format.
    pub format: DiskFormat,
    /// Virtual size.
    pub size_bytes: u64,
}

/// What a snapshot took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Taken {
    /// Bytes its files take on disk.
    pub bytes: u64,
    /// Whether every disk's copy holds only changes since the parent.
    pub incremental: bool,
    /// How long the guest's disk I/O was held (zero for a stopped VM).
    pub freeze: Duration,
}

/// The chain of each volume.
fn chains(groups: &StorageGroups, volumes: &[SnapVolume]) -> Result<Vec<Chain>, Error> {
    volumes
        .iter()
        .map(|v| {
            let dir = groups.group_dir(&v.group)?;
            Ok(Chain {
                group: v.group.clone(),
                volume: groups.volume_path(&v.group, &v.name)?,
                dir: dir.join(chain::DIR).join(&v.name),
                format: v.format,
                size_bytes: v.size_bytes,
            })
        })
        .collect()
}

/// Takes snapshot `id` of VM `uuid`'s volumes on top of `parent` (the newest snapshot on this
/// host, if any): live if its domain runs, from the files if it is stopped.
pub async fn take(
    libvirt: &Libvirt,
    groups: &StorageGroups,
    uuid: &str,
    id: &str,
    parent: Option<&str>,
    volumes: &[SnapVolume],
) -> Result<Taken, Error> {
    let chains = chains(groups, volumes)?;
    // A parent this host lacks (taken before a failover) cannot carry the new one.
    let parent = parent.filter(|p| chains.iter().all(|c| c.file(p).is_file()));
    for chain in &chains {
        chain::sweep(&chain.dir);
    }
    let state = libvirt.status(uuid).await?.state;
    let running = !matches!(state, DomainState::Shutoff | DomainState::Undefined);
    let result = if running {
        take_live(libvirt, groups, uuid, id, parent, &chains).await
    } else {
        take_offline(groups, id, parent, &chains).await
    };
    if result.is_err() {
        // IDs are never reused: whatever carries this ID is from this failed attempt.
        for chain in &chains {
            let _ = std::fs::remove_file(chain.creating(id));
            let _ = std::fs::remove_file(chain.file(id));
        }
    }
    result
}

async fn take_live(
    libvirt: &Libvirt,
    groups: &StorageGroups,
    uuid: &str,
    id: &str,
    parent: Option<&str>,
    chains: &[Chain],
) -> Result<Taken, Error> {
    let disks = chains
        .iter()
        .enumerate()
        .map(|(index, c)| live::Disk {
            device: domain::virtio_disk_name(index),
            path: c.volume.clone(),
            format: c.format,
        })
        .collect();
    let plans = live::plan(libvirt, uuid, disks, parent.map(str::to_string)).await?;
    let needs = chains
        .iter()
        .zip(&plans)
        .map(|(c, p)| match p.changed {
            Some(changed) => Ok(changed),
            None => chain::allocated(&c.volume).map_err(io_err("reading the size of", &c.volume)),
        })
        .collect::<Result<Vec<u64>, Error>>()?;
    check_space(groups, chains, &needs)?;
    let incremental = plans.iter().all(|p| p.changed.is_some());
    let mut disks = Vec::with_capacity(chains.len());
    for (chain, plan) in chains.iter().zip(plans) {
        let base = plan.changed.and(parent);
        disks.push((plan, chain.create_target(id, base).await?));
    }
    let freeze = live::copy(libvirt, uuid, id, parent, disks).await?;
    let bytes = finish_all(chains, id)?;
    Ok(Taken {
        bytes,
        incremental,
        freeze,
    })
}

async fn take_offline(
    groups: &StorageGroups,
    id: &str,
    parent: Option<&str>,
    chains: &[Chain],
) -> Result<Taken, Error> {
    // What differs from the parent is known only once read: count the whole volume.
    let needs = chains
        .iter()
        .map(|c| chain::allocated(&c.volume).map_err(io_err("reading the size of", &c.volume)))
        .collect::<Result<Vec<u64>, Error>>()?;
    check_space(groups, chains, &needs)?;
    for chain in chains {
        chain.copy_offline(id, parent).await?;
    }
    let bytes = chains
        .iter()
        .map(|c| chain::allocated(&c.file(id)).unwrap_or(0))
        .sum();
    Ok(Taken {
        bytes,
        incremental: parent.is_some(),
        freeze: Duration::ZERO,
    })
}

/// Renames every disk's copy into place; returns their bytes on disk.
fn finish_all(chains: &[Chain], id: &str) -> Result<u64, Error> {
    let mut bytes = 0;
    for chain in chains {
        let file = chain.finish(id)?;
        bytes += chain::allocated(&file).map_err(io_err("reading the size of", &file))?;
    }
    Ok(bytes)
}

/// Refuses a snapshot whose data (`needs`, per chain) would not fit in its groups.
fn check_space(groups: &StorageGroups, chains: &[Chain], needs: &[u64]) -> Result<(), Error> {
    let mut by_group: BTreeMap<&str, u64> = BTreeMap::new();
    for (chain, need) in chains.iter().zip(needs) {
        let total = by_group.entry(chain.group.as_str()).or_default();
        *total = total.saturating_add(*need).saturating_add(METADATA_BYTES);
    }
    for (group, needed) in by_group {
        let dir = groups.group_dir(group)?;
        let (_, free) = fs_space(dir).map_err(io_err("reading free space of", dir))?;
        if needed > free {
            return Err(Error::NoSpace {
                group: group.to_string(),
                needed,
                free,
            });
        }
    }
    Ok(())
}

/// Generation `id` of `volume`: its path inside the storage group and its file.
pub fn generation(
    groups: &StorageGroups,
    volume: &SnapVolume,
    id: &str,
) -> Result<(String, PathBuf), Error> {
    let chain = chains(groups, std::slice::from_ref(volume))?
        .pop()
        .ok_or_else(|| Error::Missing {
            id: id.to_string(),
            path: PathBuf::from(&volume.name),
        })?;
    let path = format!("{}/{}/{}", chain::DIR, volume.name, chain::file_name(id));
    Ok((path, chain.file(id)))
}

/// Deletes snapshot `id` from every volume's chain (rebasing the generations built on it).
pub async fn delete(groups: &StorageGroups, id: &str, volumes: &[SnapVolume]) -> Result<(), Error> {
    for chain in chains(groups, volumes)? {
        chain.remove(id).await?;
    }
    Ok(())
}

/// Writes snapshot `id` over VM `uuid`'s volumes; its domain must not run.
pub async fn restore(
    libvirt: &Libvirt,
    groups: &StorageGroups,
    uuid: &str,
    id: &str,
    volumes: &[SnapVolume],
) -> Result<(), Error> {
    let state = libvirt.status(uuid).await?.state;
    if !matches!(state, DomainState::Shutoff | DomainState::Undefined) {
        return Err(Error::Running {
            uuid: uuid.to_string(),
        });
    }
    let chains = chains(groups, volumes)?;
    if let Some(missing) = chains.iter().find(|c| !c.file(id).is_file()) {
        return Err(Error::Missing {
            id: id.to_string(),
            path: missing.file(id),
        });
    }
    // Every disk's copy is written first, then all are renamed: a failure part way leaves
    // every volume as it was, never some restored and some not.
    let mut written = Vec::with_capacity(chains.len());
    for chain in &chains {
        match chain.restore_to_temp(id).await {
            Ok(tmp) => written.push(tmp),
            Err(e) => {
                for tmp in &written {
                    let _ = std::fs::remove_file(tmp);
                }
                return Err(e);
            }
        }
    }
    for (chain, tmp) in chains.iter().zip(&written) {
        chain.replace_volume(tmp)?;
    }
    Ok(())
}

pub(crate) fn io_err(
    op: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { op, path, source }
}
