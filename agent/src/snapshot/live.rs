//! A running domain's disks copied at one instant, without stopping the guest: one QMP
//! `transaction` starts a `blockdev-backup` per disk (QEMU copies each block before the guest
//! overwrites it, so the copy is the disk as it was at the transaction) and adds the dirty
//! bitmap `pv-snap-ID` that records the guest's writes from that instant on. The next
//! snapshot then copies only what that bitmap marks (`sync=bitmap`) on top of this one. A
//! bitmap lives as long as the QEMU process: after a restart, a failover or the deletion of
//! the newest generation there is no bitmap for the chain's head, and the copy is full.
//! Targets are opened with `backing: null` (their header names the parent, which QEMU must
//! not open) and `detect-zeroes: on` (zeros stored as data take no space in the copy).
//!
//! The copy-before-write that fixes the instant has a failure mode of its own: when QEMU cannot
//! write a block's old data into the target (the target's file system filled up or failed),
//! it fails the guest's write instead (QEMU 10's `blockdev-backup` exposes no `on-cbw-error`),
//! and the guest pauses on an I/O error. The copy is then dropped (its wait sees the pause):
//! the jobs are cancelled, which removes the filter, the guest is resumed, and QEMU retries its
//! parked write on the disk alone. The snapshot fails; the guest never sees the error. Until
//! the jobs have ended the disk fault watch leaves such a guest to this module (its plan is
//! `Snapshotting`), so an HA guest does not move onto the peer's copy for a snapshot's fault.
//!
//! A raw disk is copied from its file node, below the format node: an HA mirror's job holds
//! the format node (QEMU refuses a backup from it: "block device is in use by block job"),
//! not the file node, and for raw both read the same bytes. A qcow2 disk (never mirrored: a
//! protected VM's disks are raw) is copied from its format node.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::IgnoredAny;
use serde_json::{Value, json};

use super::Error;
use crate::domain::DiskFormat;
use crate::libvirt::{DomainState, Libvirt, Monitor};
use crate::qmp_block::{self as qmp, JobStatus, disk_file, find_bitmap, source_node};

/// Prefix of the snapshots' bitmaps; the snapshot ID follows.
const BITMAP_PREFIX: &str = "pv-snap-";
/// Prefix of the backup jobs' IDs and target nodes; the guest device follows.
pub const JOB_PREFIX: &str = "pv-snap-job-";
const TARGET_PREFIX: &str = "pv-snap-target-";
/// How often the jobs are looked at.
const POLL: Duration = Duration::from_millis(200);
/// How long the copy may take before it is given up.
const JOB_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long cancelled jobs may take to end, and how often to look (the guest is paused).
const CANCEL_TIMEOUT: Duration = Duration::from_secs(30);
const CANCEL_POLL: Duration = Duration::from_millis(10);

/// What QEMU has for one disk before the snapshot.
#[derive(Clone, Debug)]
pub struct DiskPlan {
    /// Guest device, e.g. "vda".
    pub device: String,
    /// The node on top of the disk.
    pub node: String,
    /// Bytes the parent's bitmap marks, if the parent has one: the copy is then incremental.
    pub changed: Option<u64>,
}

/// A disk to copy: its guest device, image file and format.
#[derive(Clone, Debug)]
pub struct Disk {
    /// Guest device, e.g. "vda".
    pub device: String,
    /// The volume's path, as QEMU opened it.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
}

/// Looks up the node each disk is copied from and whether `parent`'s bitmap is there.
pub async fn plan(
    libvirt: &Libvirt,
    uuid: &str,
    disks: Vec<Disk>,
    parent: Option<String>,
) -> Result<Vec<DiskPlan>, Error> {
    let vm = uuid.to_string();
    libvirt
        .with_monitor(uuid, move |m| {
            let blocks = qmp::query_blocks(m)?;
            let nodes = qmp::query_nodes(m)?;
            disks
                .into_iter()
                .map(
                    |Disk {
                         device,
                         path,
                         format,
                     }| {
                        let unknown = || Error::DiskUnknown {
                            uuid: vm.clone(),
                            device: device.clone(),
                        };
                        let top = source_node(&blocks, &device).ok_or_else(unknown)?;
                        // A disk moved onto the peer's copy (its local disk failed) is not the
                        // local file any more: copying that would copy stale data.
                        if disk_file(&blocks, &device).map(Path::new) != Some(path.as_path()) {
                            return Err(Error::NotLocal {
                                uuid: vm.clone(),
                                device: device.clone(),
                            });
                        }
                        let node = match format {
                            DiskFormat::Qcow2 => top,
                            DiskFormat::Raw => nodes
                                .iter()
                                .find(|n| n.drv == "file" && Path::new(&n.file) == path)
                                .map(|n| n.node_name.clone())
                                .ok_or_else(unknown)?,
                        };
                        let changed = parent.as_ref().and_then(|p| {
                            find_bitmap(&nodes, &bitmap_name(p))
                                .filter(|(holder, b)| *holder == node && !b.inconsistent)
                                .map(|(_, b)| b.count)
                        });
                        Ok(DiskPlan {
                            device,
                            node,
                            changed,
                        })
                    },
                )
                .collect()
        })
        .await
}

/// Copies every disk of `plans` into its target file at one instant; returns how long the
/// transaction that fixed that instant took (the guest's I/O is drained during it).
pub async fn copy(
    libvirt: &Libvirt,
    uuid: &str,
    id: &str,
    parent: Option<&str>,
    disks: Vec<(DiskPlan, PathBuf)>,
) -> Result<Duration, Error> {
    let plans: Vec<DiskPlan> = disks.iter().map(|(p, _)| p.clone()).collect();
    let (new_bitmap, parent_bitmap) = (bitmap_name(id), parent.map(bitmap_name));
    let started = {
        let new_bitmap = new_bitmap.clone();
        libvirt
            .with_monitor(uuid, move |m| {
                start(m, &disks, &new_bitmap, parent_bitmap.as_deref())
            })
            .await
    };
    let freeze = match started {
        Ok(freeze) => freeze,
        Err(e) => {
            // The transaction is all or nothing, but the targets were added before it.
            let _ = end(libvirt, uuid, &plans, &new_bitmap, false).await;
            return Err(e);
        }
    };
    let mut outcome = wait(libvirt, uuid, &plans).await;
    if let Err(Error::GuestWriteBroken) = outcome {
        outcome = drop_copy(libvirt, uuid, &plans).await;
    }
    let ended = end(libvirt, uuid, &plans, &new_bitmap, outcome.is_ok()).await;
    outcome?;
    ended.map(|()| freeze)
}

fn start(
    m: &Monitor<'_>,
    disks: &[(DiskPlan, PathBuf)],
    new_bitmap: &str,
    parent_bitmap: Option<&str>,
) -> Result<Duration, Error> {
    let mut actions = Vec::new();
    for (plan, target) in disks {
        let node = format!("{TARGET_PREFIX}{}", plan.device);
        let add = json!({"driver": "qcow2", "node-name": node, "backing": null,
            "detect-zeroes": "on",
            "file": {"driver": "file", "filename": target.to_string_lossy()}});
        qmp::execute::<IgnoredAny>(m, "blockdev-add", &add)?;
        actions.push(json!({"type": "block-dirty-bitmap-add",
            "data": {"node": plan.node, "name": new_bitmap, "persistent": false}}));
        let mut backup = json!({"job-id": format!("{JOB_PREFIX}{}", plan.device),
            "device": plan.node, "target": node, "sync": "full", "auto-dismiss": false});
        if let (Some(_), Some(parent)) = (plan.changed, parent_bitmap) {
            backup["sync"] = Value::from("bitmap");
            backup["bitmap"] = Value::from(parent);
            // The parent's bitmap is removed only once every copy succeeded.
            backup["bitmap-mode"] = Value::from("never");
        }
        actions.push(json!({"type": "blockdev-backup", "data": backup}));
    }
    let began = Instant::now();
    qmp::transaction(m, &actions)?;
    Ok(began.elapsed())
}

/// Waits until every job has concluded; the first failure is the error, and a guest paused
/// on an I/O error meanwhile is [`Error::GuestWriteBroken`].
async fn wait(libvirt: &Libvirt, uuid: &str, plans: &[DiskPlan]) -> Result<(), Error> {
    let ids: Vec<String> = plans
        .iter()
        .map(|p| format!("{JOB_PREFIX}{}", p.device))
        .collect();
    let deadline = Instant::now() + JOB_TIMEOUT;
    loop {
        let jobs = libvirt
            .with_monitor(uuid, |m| qmp::query_jobs(m).map_err(Error::from))
            .await?;
        let ours: Vec<_> = jobs.iter().filter(|j| ids.contains(&j.device)).collect();
        let status = libvirt.status(uuid).await?;
        if status.state == DomainState::Paused && status.reason == "ioerror" {
            return Err(Error::GuestWriteBroken);
        }
        if let Some(failed) = ours.iter().find(|j| j.error.is_some()) {
            return Err(Error::CopyFailed {
                job: failed.device.clone(),
                error: failed.error.clone().unwrap_or_default(),
            });
        }
        if ours.len() < ids.len() {
            return Err(Error::CopyFailed {
                job: ids.join(", "),
                error: "the job vanished before it concluded".into(),
            });
        }
        if ours.iter().all(|j| j.status == JobStatus::Concluded) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::CopyFailed {
                job: ids.join(", "),
                error: format!("not done within {JOB_TIMEOUT:?}"),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Drops a copy whose copy-before-write broke a guest write (see the module doc): cancels the
/// jobs, waits until they have ended (their filters gone), then resumes the guest; the error
/// the snapshot fails with. The jobs stay listed (not dismissed) until then, so the disk
/// fault watch keeps its hands off.
async fn drop_copy(libvirt: &Libvirt, uuid: &str, plans: &[DiskPlan]) -> Result<(), Error> {
    let ids: Vec<String> = plans
        .iter()
        .map(|p| format!("{JOB_PREFIX}{}", p.device))
        .collect();
    tracing::warn!(vm = uuid, op = "snapshot-drop", jobs = ?ids, "snapshot drop begin: the copy into the snapshot failed a guest write; cancelling the copy, then resuming the guest");
    let resumed = async {
        let cancel = ids.clone();
        libvirt
            .with_monitor(uuid, move |m| {
                for id in &cancel {
                    let _ = qmp::execute::<IgnoredAny>(
                        m,
                        "block-job-cancel",
                        &json!({"device": id, "force": true}),
                    );
                }
                Ok::<_, Error>(())
            })
            .await?;
        ended(libvirt, uuid, &ids).await?;
        libvirt.resume(uuid).await?;
        Ok::<_, Error>(())
    }
    .await;
    match &resumed {
        Ok(()) => tracing::warn!(
            vm = uuid,
            op = "snapshot-drop",
            "snapshot drop end: ok; the guest runs on, the snapshot is not kept"
        ),
        Err(e) => {
            tracing::error!(vm = uuid, op = "snapshot-drop", error = %e, "snapshot drop end: failed; the guest stays paused")
        }
    }
    resumed?;
    Err(Error::CopyFailed {
        job: ids.join(", "),
        error: "writing into the snapshot failed a guest write; the snapshot was dropped and the guest resumed (is the storage group's file system full or failing?)".into(),
    })
}

/// Waits until none of the jobs `ids` runs any more.
async fn ended(libvirt: &Libvirt, uuid: &str, ids: &[String]) -> Result<(), Error> {
    let deadline = Instant::now() + CANCEL_TIMEOUT;
    loop {
        let jobs = libvirt
            .with_monitor(uuid, |m| qmp::query_jobs(m).map_err(Error::from))
            .await?;
        let running = jobs
            .iter()
            .any(|j| ids.contains(&j.device) && j.status != JobStatus::Concluded);
        if !running {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::CopyFailed {
                job: ids.join(", "),
                error: format!("not ended within {CANCEL_TIMEOUT:?} of its cancel"),
            });
        }
        tokio::time::sleep(CANCEL_POLL).await;
    }
}

/// Dismisses the jobs and removes the targets. After a copy that `succeeded` only the new
/// snapshot's bitmap stays; after a failed one the new bitmap goes and the parent's stays: it
/// still marks every change since the parent.
async fn end(
    libvirt: &Libvirt,
    uuid: &str,
    plans: &[DiskPlan],
    new_bitmap: &str,
    succeeded: bool,
) -> Result<(), Error> {
    let plans = plans.to_vec();
    let new_bitmap = new_bitmap.to_string();
    libvirt
        .with_monitor(uuid, move |m| {
            for plan in &plans {
                let job = format!("{JOB_PREFIX}{}", plan.device);
                let _ = qmp::execute::<IgnoredAny>(m, "block-job-cancel", &json!({"device": job}));
                let _ = qmp::execute::<IgnoredAny>(m, "job-dismiss", &json!({"id": job}));
                let node = format!("{TARGET_PREFIX}{}", plan.device);
                let _ = qmp::execute::<IgnoredAny>(m, "blockdev-del", &json!({"node-name": node}));
            }
            let nodes = qmp::query_nodes(m)?;
            for node in nodes
                .iter()
                .filter(|n| plans.iter().any(|p| p.node == n.node_name))
            {
                for bitmap in &node.bitmaps {
                    let new = bitmap.name == new_bitmap;
                    let ours = bitmap.name.starts_with(BITMAP_PREFIX);
                    if ours && new != succeeded {
                        qmp::execute::<IgnoredAny>(
                            m,
                            "block-dirty-bitmap-remove",
                            &json!({"node": node.node_name, "name": bitmap.name}),
                        )?;
                    }
                }
            }
            Ok(())
        })
        .await
}

fn bitmap_name(id: &str) -> String {
    format!("{BITMAP_PREFIX}{id}")
}
