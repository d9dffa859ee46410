//! The local disk fault watch: a protected guest that QEMU paused on an I/O error moves onto
//! the peer's copy of its disks and runs on, without seeing the error (issue 8).
//!
//! Every [`TICK`] the watch lists this host's domains (libvirt answers from its own state:
//! no QEMU monitor is touched unless a domain is paused on an I/O error). For such a
//! self-fencing (HA) domain it asks QEMU whether every disk's mirror is in sync
//! ([`mirror::pivot_plan`]); if so, it first records in etcd that this host's copy is behind
//! ([`Marker::mark_local_behind`]), then moves the disks and resumes the guest
//! ([`mirror::pivot`]). Whatever stops it short (a mirror not in sync, a lost lease, etcd
//! unreachable) leaves the guest paused: a paused guest loses nothing, a guest resumed on a
//! copy no one knows is current could. The controller sees the disks on the peer's copy in
//! the next listing and raises the simplex alert.
//!
//! One fault is the peer's, not the disk's: a resync's backup copies the old data of a
//! dirty extent into the peer's copy before the guest may overwrite it (copy-before-write),
//! and when the peer or the A-Links fail, QEMU fails the guest's write. Then the watch drops
//! the resync ([`mirror::stop`]: the resync bitmaps keep every write since the peer was in
//! sync, so the next resync is incremental again) and resumes the guest, whose parked write
//! QEMU retries on the local disk. Were the local disk the one failing, the retry fails too
//! and the guest pauses again, now with no resync, and the steps above follow.
//!
//! A snapshot's copy has the same copy-before-write; while its jobs run, the snapshot
//! (`snapshot/live.rs`) owns such a fault: it drops its copy and resumes the guest. The
//! watch waits for that and looks again: a retried write that fails once more is the disk's.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::libvirt::{DomainState, DomainStatus, Libvirt};
use crate::mirror::{self, PivotPlan};
use crate::stale::{LocalMark, Marker};

/// How often the watch looks at the domains: the longest a faulted guest stays paused
/// before the pivot begins.
pub const TICK: Duration = Duration::from_millis(100);
/// How long one QEMU monitor read may take before the watch tries again at a later tick.
const MONITOR_BUDGET: Duration = Duration::from_secs(2);
/// How long a guest left paused waits before the watch looks at it again (a mirror, the
/// lease or etcd may have come back).
const RETRY: Duration = Duration::from_secs(1);

/// Watches this host's domains for a protected guest paused on a disk error.
#[derive(Clone, Debug)]
pub struct Watch {
    /// This host.
    pub node: String,
    /// The host's libvirt.
    pub libvirt: Libvirt,
    /// Writes the mark that this host's copy is behind.
    pub marker: Marker,
}

/// What one look at a faulted domain came to (logged when it changes).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Moved,
    Resumed,
    /// A snapshot's copy broke the write: the snapshot drops it and resumes the guest.
    Snapshot,
    Waiting(String),
}

impl Watch {
    /// Runs until the process ends.
    pub async fn run(self) {
        let mut seen: HashMap<String, (Outcome, Instant)> = HashMap::new();
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let domains = match self.libvirt.list().await {
                Ok(domains) => domains,
                Err(e) => {
                    tracing::warn!(node = %self.node, error = %daemon::error_chain(&e), "disk fault watch: listing domains failed");
                    continue;
                }
            };
            let faulted: Vec<&DomainStatus> = domains.iter().filter(|d| faulted(d)).collect();
            seen.retain(|uuid, _| faulted.iter().any(|d| d.uuid == *uuid));
            for domain in faulted {
                let was = seen.get(&domain.uuid);
                if was.is_some_and(|(_, next)| Instant::now() < *next) {
                    continue;
                }
                let outcome = self.handle(&domain.uuid).await;
                if was.map(|(o, _)| o) != Some(&outcome) {
                    match &outcome {
                        Outcome::Waiting(why) => {
                            tracing::error!(vm = %domain.uuid, node = %self.node, op = "disk-pivot", "disk fault: the guest stays paused: {why}")
                        }
                        Outcome::Snapshot => {
                            tracing::info!(vm = %domain.uuid, node = %self.node, op = "disk-pivot", "disk fault during a snapshot's copy: the snapshot drops its copy and resumes the guest; looking again after it")
                        }
                        Outcome::Moved | Outcome::Resumed => {}
                    }
                }
                // Look again soon after a snapshot: its drop takes a poll or two.
                let next = match outcome {
                    Outcome::Snapshot => TICK,
                    _ => RETRY,
                };
                seen.insert(domain.uuid.clone(), (outcome, Instant::now() + next));
            }
        }
    }

    /// Moves the faulted domain `uuid` onto the peer's copy if it can.
    async fn handle(&self, uuid: &str) -> Outcome {
        let node = self.node.as_str();
        let plan = tokio::time::timeout(MONITOR_BUDGET, mirror::pivot_plan(&self.libvirt, uuid));
        let devices = match plan.await {
            Ok(Ok(PivotPlan::Move(devices))) => devices,
            Ok(Ok(PivotPlan::Resyncing(devices))) => return self.drop_resync(uuid, &devices).await,
            Ok(Ok(PivotPlan::Snapshotting(_))) => return Outcome::Snapshot,
            Ok(Ok(PivotPlan::OnPeer)) => {
                return Outcome::Waiting(
                    "its disks already run on the peer's copy and the path to it failed; it runs again only from the peer's copy".into(),
                );
            }
            Ok(Ok(PivotPlan::Stuck { device, why })) => {
                return Outcome::Waiting(format!(
                    "its disk {device} cannot move onto the peer's copy: {why}"
                ));
            }
            Ok(Err(e)) => return Outcome::Waiting(format!("reading its mirrors failed: {e}")),
            Err(_) => return Outcome::Waiting("its QEMU monitor did not answer".into()),
        };
        tracing::warn!(
            vm = uuid,
            node,
            op = "disk-pivot",
            ?devices,
            "disk pivot begin: a local disk failed under the guest; recording this host's copy as behind, then moving onto the peer's copy"
        );
        match self.marker.mark_local_behind(uuid).await {
            Ok(LocalMark::Written) => {}
            Ok(refused) => {
                let why = match refused {
                    LocalMark::Superseded => {
                        "this host lost its lease or the pair moved the VM (it may run elsewhere)"
                    }
                    LocalMark::PeerBehind => "the peer's copy was already marked behind",
                    _ => "this agent knows no mirror path of the VM (it restarted since)",
                };
                tracing::error!(
                    vm = uuid,
                    node,
                    op = "disk-pivot",
                    "disk pivot end: refused: {why}"
                );
                return Outcome::Waiting(why.into());
            }
            Err(e) => {
                tracing::warn!(vm = uuid, node, op = "disk-pivot", error = %daemon::error_chain(&e), "disk pivot end: not yet, etcd did not take the mark; retrying");
                return Outcome::Waiting(format!("recording the mark failed: {e}"));
            }
        }
        match mirror::pivot(&self.libvirt, node, uuid, &devices).await {
            Ok(()) => Outcome::Moved,
            Err(e) => Outcome::Waiting(format!("moving its disks failed: {e}")),
        }
    }

    /// Drops the resync whose copy into the peer's copy of `devices` broke a guest write of
    /// the domain `uuid`, and resumes the guest on its local disks (see the module doc).
    async fn drop_resync(&self, uuid: &str, devices: &[String]) -> Outcome {
        let node = self.node.as_str();
        tracing::warn!(
            vm = uuid,
            node,
            op = "resync-drop",
            ?devices,
            "resync drop begin: the copy into the peer's copy failed a guest write; stopping the resync, then resuming the guest on its local disks"
        );
        let dropped = match mirror::stop(&self.libvirt, node, uuid).await {
            Err(e) => Err(format!(
                "stopping the resync failed: {}",
                daemon::error_chain(&e)
            )),
            Ok(()) => self
                .libvirt
                .resume(uuid)
                .await
                .map(drop)
                .map_err(|e| format!("resuming the guest failed: {}", daemon::error_chain(&e))),
        };
        if let Err(why) = dropped {
            tracing::error!(
                vm = uuid,
                node,
                op = "resync-drop",
                "resync drop end: {why}"
            );
            return Outcome::Waiting(why);
        }
        tracing::warn!(
            vm = uuid,
            node,
            op = "resync-drop",
            "resync drop end: ok; the guest runs on its local disks, the peer's copy is behind until the next resync"
        );
        Outcome::Resumed
    }
}

/// Whether `domain` is a protected guest QEMU paused on an I/O error.
fn faulted(domain: &DomainStatus) -> bool {
    domain.self_fence && domain.state == DomainState::Paused && domain.reason == "ioerror"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(state: DomainState, reason: &str, self_fence: bool) -> DomainStatus {
        DomainStatus {
            uuid: "u".into(),
            name: "a".into(),
            state,
            reason: reason.into(),
            self_fence,
        }
    }

    #[test]
    fn faulted_protected_guest_paused_on_io_error() {
        assert!(faulted(&domain(DomainState::Paused, "ioerror", true)));
    }

    #[test]
    fn faulted_ignores_unprotected_and_other_pauses() {
        assert!(!faulted(&domain(DomainState::Paused, "ioerror", false)));
        assert!(!faulted(&domain(DomainState::Paused, "user", true)));
        assert!(!faulted(&domain(DomainState::Running, "booted", true)));
    }
}
