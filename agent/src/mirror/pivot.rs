//! Local disk fault: the guest moves onto the peer's copy of its disks and never sees the
//! error (issue 8, "local disk fault"; measured in notes/disk-paths.md's style on QEMU 10.0.2).
//!
//! A protected domain's disks stop the guest on an I/O error (`error_policy='stop'`, see
//! `domain.rs`): QEMU parks the failed request and pauses the VM (`io-error`). While every
//! disk's mirror is in sync, the peer's copy holds every write the guest saw complete, so
//! `block-job-complete` on each mirror swaps the peer's NBD node in for the local disk (the
//! job replaces its source with its target), and `cont` re-issues the parked request, now on
//! the peer's copy. Measured: 1–2 ms from the complete to `cont`; the guest's counter goes on
//! with no gap and the same boot.
//!
//! ```text
//!  before:  guest ─► ua-vda ─► mirror filter ─► local volume (failing)
//!                                   └─► pv-peer-vda (nbd) ─► A-Links ─► peer's volume
//!  after:   guest ─► ua-vda ─► pv-peer-vda (nbd) ─► A-Links ─► peer's volume
//! ```
//!
//! All or nothing: every disk moves, or none does and the guest stays paused. A disk left on
//! the failing host would make neither host's copy complete. The caller records first that
//! this host's copy is behind (a stale mark naming it), so no later start uses it.

use serde::de::IgnoredAny;
use serde_json::json;

use super::qmp::{BlockInfo, BlockJob, execute, query_blocks, query_jobs};
use std::time::{Duration, Instant};

use super::{BACKUP_PREFIX, Error, JOB_PREFIX, PEER_PREFIX, Wait, wait_ended};
use crate::libvirt::Monitor;
use crate::snapshot::live::JOB_PREFIX as SNAPSHOT_JOB_PREFIX;

/// How long a completing mirror may take to end, and how often to look: the guest is paused
/// meanwhile, so look often (a ready mirror ends within milliseconds).
const COMPLETE_WAIT: Wait = Wait {
    timeout: Duration::from_secs(30),
    poll: Duration::from_millis(2),
};

/// What a look at a domain stopped on an I/O error says can be done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Every disk's mirror is in sync: these disks (guest devices) can move to the peer.
    Move(Vec<String>),
    /// Every disk already runs on the peer's copy: the error came from the path to it.
    OnPeer,
    /// A resync's backup copies these disks (guest devices) into the peer's copy. Its
    /// copy-before-write breaks a guest write whose old data it cannot copy there (the peer
    /// or the A-Links failed), so the error is the peer's: the local copy is current and
    /// whole, and the guest runs on once the resync is dropped.
    Resyncing(Vec<String>),
    /// A snapshot's backup copies these disks (guest devices): its copy-before-write broke
    /// the write if the snapshot's target failed, and the snapshot drops its copy and resumes
    /// the guest itself (`snapshot/live.rs`). A local disk that failed fails the retried
    /// write again, once the snapshot's jobs are gone, and the guest moves then.
    Snapshotting(Vec<String>),
    /// A disk cannot move: the guest must stay paused.
    Stuck {
        /// Guest device.
        device: String,
        /// Why, in words.
        why: String,
    },
}

/// Reads the domain's disks and mirrors and says whether they can move to the peer.
pub fn plan(m: &Monitor<'_>) -> Result<Plan, Error> {
    let blocks = query_blocks(m)?;
    let jobs = query_jobs(m)?;
    Ok(plan_of(&blocks, &jobs))
}

/// [`plan`] on what QEMU showed.
fn plan_of(blocks: &[BlockInfo], jobs: &[BlockJob]) -> Plan {
    let snapshotting: Vec<String> = jobs
        .iter()
        .filter_map(|j| j.device.strip_prefix(SNAPSHOT_JOB_PREFIX).map(String::from))
        .collect();
    if !snapshotting.is_empty() {
        return Plan::Snapshotting(snapshotting);
    }
    let disks = disks_of(blocks);
    if disks.is_empty() {
        return Plan::Stuck {
            device: String::new(),
            why: "the domain shows no disk of ours".into(),
        };
    }
    if disks.iter().all(|(_, on_peer)| *on_peer) {
        return Plan::OnPeer;
    }
    let resyncing: Vec<String> = jobs
        .iter()
        .filter_map(|j| j.device.strip_prefix(BACKUP_PREFIX).map(String::from))
        .collect();
    if !resyncing.is_empty() {
        return Plan::Resyncing(resyncing);
    }
    let mut moving = Vec::new();
    for (device, on_peer) in disks {
        if on_peer {
            continue;
        }
        let job = format!("{JOB_PREFIX}{device}");
        match jobs.iter().find(|j| j.device == job) {
            Some(j) if j.in_sync() => moving.push(device),
            Some(j) => {
                return Plan::Stuck {
                    why: format!(
                        "its mirror is not in sync ({:?}{})",
                        j.status,
                        j.error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    ),
                    device,
                };
            }
            None => {
                return Plan::Stuck {
                    device,
                    why: "it has no mirror to the peer".into(),
                };
            }
        }
    }
    Plan::Move(moving)
}

/// Where a pivot's time went, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timing {
    /// Completing the mirrors: the disks now use the peer's copy.
    pub switch_ms: u128,
    /// Resuming the guest (QEMU re-issues the parked request).
    pub resume_ms: u128,
}

/// Moves each of `devices` onto the peer's copy (see the module doc) and resumes the guest.
/// The guest stays paused if any step fails.
pub fn move_and_resume(m: &Monitor<'_>, devices: &[String]) -> Result<Timing, Error> {
    let started = Instant::now();
    for device in devices {
        let job = format!("{JOB_PREFIX}{device}");
        execute::<IgnoredAny>(m, "block-job-complete", &json!({"device": job}))?;
        let ended = wait_ended(m, &job, COMPLETE_WAIT)?;
        if let Some(error) = ended.as_ref().and_then(|j| j.error.clone()) {
            return Err(Error::PivotFailed {
                device: device.clone(),
                error,
            });
        }
        if ended.is_some() {
            execute::<IgnoredAny>(m, "job-dismiss", &json!({"id": job}))?;
        }
    }
    let blocks = query_blocks(m)?;
    if let Some((device, _)) = disks_of(&blocks)
        .into_iter()
        .find(|(d, on_peer)| devices.contains(d) && !on_peer)
    {
        return Err(Error::PivotFailed {
            device,
            error: "the disk still uses the local volume after its mirror completed".into(),
        });
    }
    let switch_ms = started.elapsed().as_millis();
    m.resume()?;
    Ok(Timing {
        switch_ms,
        resume_ms: started.elapsed().as_millis() - switch_ms,
    })
}

/// Our disks (guest device, whether it runs on the peer's copy), from `query-block`.
fn disks_of(blocks: &[BlockInfo]) -> Vec<(String, bool)> {
    blocks
        .iter()
        .filter_map(|b| {
            let device = super::qmp::device_of_block(b)?;
            let inserted = b.inserted.as_ref()?;
            Some((device, inserted.node_name.starts_with(PEER_PREFIX)))
        })
        .collect()
}

/// The guest devices of `blocks` whose disk runs on the peer's copy.
pub(super) fn on_peer(blocks: &[BlockInfo]) -> Vec<String> {
    disks_of(blocks)
        .into_iter()
        .filter_map(|(device, on_peer)| on_peer.then_some(device))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::qmp::{Inserted, JobStatus};
    use super::*;

    fn block(device: &str, node: &str) -> BlockInfo {
        BlockInfo {
            qdev: format!("/machine/peripheral/ua-{device}/virtio-backend"),
            inserted: Some(Inserted {
                node_name: node.into(),
                file: String::new(),
            }),
        }
    }

    fn mirror(device: &str, ready: bool) -> BlockJob {
        BlockJob {
            device: format!("{JOB_PREFIX}{device}"),
            status: if ready {
                JobStatus::Ready
            } else {
                JobStatus::Running
            },
            len: 1,
            offset: 1,
            ready,
            actively_synced: ready,
            error: None,
        }
    }

    #[test]
    fn plan_all_mirrors_in_sync_moves_every_disk() {
        let blocks = [
            block("vda", "libvirt-2-format"),
            block("vdb", "libvirt-1-format"),
        ];

        let plan = plan_of(&blocks, &[mirror("vda", true), mirror("vdb", true)]);

        assert_eq!(plan, Plan::Move(vec!["vda".into(), "vdb".into()]));
    }

    #[test]
    fn plan_one_mirror_syncing_moves_nothing() {
        let blocks = [
            block("vda", "libvirt-2-format"),
            block("vdb", "libvirt-1-format"),
        ];

        let plan = plan_of(&blocks, &[mirror("vda", true), mirror("vdb", false)]);

        assert!(
            matches!(&plan, Plan::Stuck { device, .. } if device == "vdb"),
            "{plan:?}"
        );
    }

    #[test]
    fn plan_disk_without_mirror_moves_nothing() {
        let plan = plan_of(&[block("vda", "libvirt-1-format")], &[]);

        assert!(
            matches!(&plan, Plan::Stuck { why, .. } if why.contains("no mirror")),
            "{plan:?}"
        );
    }

    #[test]
    fn plan_backup_running_or_failed_is_the_resyncs_fault() {
        let blocks = [
            block("vda", "libvirt-2-format"),
            block("vdb", "libvirt-1-format"),
        ];
        let failed = BlockJob {
            device: format!("{BACKUP_PREFIX}vdb"),
            status: JobStatus::Concluded,
            ready: false,
            error: Some("Input/output error".into()),
            ..mirror("vdb", false)
        };

        let plan = plan_of(&blocks, &[mirror("vda", true), failed]);

        assert_eq!(plan, Plan::Resyncing(vec!["vdb".into()]));
    }

    #[test]
    fn plan_snapshot_copy_running_leaves_the_guest_to_the_snapshot() {
        let blocks = [block("vda", "libvirt-1-format")];
        let snapshot = BlockJob {
            device: format!("{SNAPSHOT_JOB_PREFIX}vda"),
            ..mirror("vda", false)
        };

        let plan = plan_of(&blocks, &[mirror("vda", true), snapshot]);

        assert_eq!(plan, Plan::Snapshotting(vec!["vda".into()]));
    }

    #[test]
    fn plan_every_disk_on_peer_is_on_peer() {
        let plan = plan_of(&[block("vda", &format!("{PEER_PREFIX}vda"))], &[]);

        assert_eq!(plan, Plan::OnPeer);
    }

    #[test]
    fn on_peer_lists_moved_disks_only() {
        let blocks = [
            block("vda", &format!("{PEER_PREFIX}vda")),
            block("vdb", "libvirt-1-format"),
        ];

        assert_eq!(on_peer(&blocks), vec!["vda".to_string()]);
    }
}
