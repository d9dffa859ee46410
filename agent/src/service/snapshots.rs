//! Snapshot requests: each passes the fence for its VM, then runs the [`snapshot`] module;
//! every one logs a begin and an end line with the VM, the snapshot and the outcome.
//!
//! Each runs on a task of its own ([`detached`]): a controller that dies mid-call does not
//! cut it short, which would leave QEMU's copy jobs running into files its successor deletes.
//! One VM's operations run one at a time ([`Locks`]): that successor's cleanup waits for the
//! operation its predecessor began.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use proto::agent as pb;
use tonic::Status;
use tracing::Instrument;

use super::{Error, Inner, disk_format, invalid, plain_name, uuid_invalid};
use crate::snapshot::{self, SnapVolume, Taken, transfer};

/// One lock per VM for its snapshot operations.
#[derive(Debug, Default)]
pub(super) struct Locks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl Locks {
    /// Waits until no other snapshot operation of VM `uuid` runs; holds it off until dropped.
    async fn hold(&self, uuid: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = Arc::clone(
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(uuid.to_string())
                .or_default(),
        );
        lock.lock_owned().await
    }
}

/// Runs `work` to its end on a task of its own, whether or not its caller waits for it.
pub(super) async fn detached<T: Send + 'static>(
    work: impl Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Status> {
    match tokio::spawn(work).await {
        Ok(outcome) => outcome.map_err(Status::from),
        Err(e) => Err(Status::internal(format!(
            "the agent's snapshot task failed: {e}"
        ))),
    }
}

impl Inner {
    /// Takes a snapshot of a VM's volumes.
    pub(super) async fn take_snapshot(
        &self,
        req: pb::TakeSnapshotRequest,
    ) -> Result<pb::SnapshotTaken, Error> {
        let _held = self.snapshots.hold(&req.vm_uuid).await;
        let volumes = self.checked(
            "take-snapshot",
            &req.vm_uuid,
            &req.id,
            &req.volumes,
            req.fence,
        )?;
        if !req.parent.is_empty() && !plain_name(&req.parent) {
            return Err(invalid(format!("{:?} is not a snapshot ID", req.parent)));
        }
        let parent = (!req.parent.is_empty()).then_some(req.parent.as_str());
        tracing::info!(vm = %req.vm_uuid, node = %self.node, snapshot = %req.id, parent = ?parent, "snapshot begin");
        let taken = snapshot::take(
            &self.deps.libvirt,
            &self.deps.storage,
            &req.vm_uuid,
            &req.id,
            parent,
            &volumes,
        )
        // The copy's own recovery (a dropped copy, see snapshot::live) logs within this span.
        .instrument(tracing::info_span!("snapshot", node = %self.node, snapshot = %req.id))
        .await;
        match &taken {
            Ok(Taken {
                bytes,
                incremental,
                freeze,
            }) => {
                tracing::info!(vm = %req.vm_uuid, node = %self.node, snapshot = %req.id, bytes, incremental, freeze_ms = freeze.as_secs_f64() * 1e3, "snapshot end: taken");
            }
            Err(e) => {
                tracing::warn!(vm = %req.vm_uuid, node = %self.node, snapshot = %req.id, error = %daemon::error_chain(e), "snapshot end: failed, nothing kept");
            }
        }
        let taken = taken?;
        let replicated = if req.replicate {
            self.replicate(&req, &volumes).await
        } else {
            Ok(false)
        };
        Ok(pb::SnapshotTaken {
            bytes: taken.bytes,
            incremental: taken.incremental,
            freeze_us: u64::try_from(taken.freeze.as_micros()).unwrap_or(u64::MAX),
            replicated: replicated.as_ref().is_ok_and(|r| *r),
            replicate_error: replicated.err().unwrap_or_default(),
        })
    }

    /// Copies snapshot `req.id`'s files to the peer over the A-Links, logging begin and end.
    async fn replicate(
        &self,
        req: &pb::TakeSnapshotRequest,
        volumes: &[SnapVolume],
    ) -> Result<bool, String> {
        let Some(replicas) = &self.deps.replicas else {
            return Err("this host has no A-Links to its peer".into());
        };
        tracing::info!(vm = %req.vm_uuid, node = %self.node, snapshot = %req.id, "snapshot copy to peer begin");
        let socket = replicas.peer_files_socket();
        let mut outcome = Ok(true);
        for volume in volumes {
            let sent = match snapshot::generation(&self.deps.storage, volume, &req.id) {
                Ok((path, file)) => transfer::send(socket, &volume.group, &path, &file)
                    .await
                    .map_err(|e| daemon::error_chain(&e)),
                Err(e) => Err(daemon::error_chain(&e)),
            };
            if let Err(e) = sent {
                outcome = Err(e);
                break;
            }
        }
        match &outcome {
            Ok(_) => {
                tracing::info!(vm = %req.vm_uuid, node = %self.node, snapshot = %req.id, "snapshot copy to peer end: ok");
            }
            Err(e) => {
                tracing::warn!(vm = %req.vm_uuid, node = %self.node, snapshot = %req.id, error = %e, "snapshot copy to peer end: failed; the snapshot is kept on this host only");
            }
        }
        outcome
    }

    /// Deletes a snapshot of a VM's volumes.
    pub(super) async fn delete_snapshot(&self, req: pb::SnapshotCommand) -> Result<(), Error> {
        let _held = self.snapshots.hold(&req.vm_uuid).await;
        let volumes = self.checked(
            "delete-snapshot",
            &req.vm_uuid,
            &req.id,
            &req.volumes,
            req.fence,
        )?;
        tracing::info!(vm = %req.vm_uuid, node = %self.node, snapshot = %req.id, "snapshot delete begin");
        let deleted = snapshot::delete(&self.deps.storage, &req.id, &volumes).await;
        log_end(
            "snapshot delete end",
            &req,
            &self.node,
            deleted.as_ref().err(),
        );
        Ok(deleted?)
    }

    /// Writes a snapshot over a stopped VM's volumes.
    pub(super) async fn restore_snapshot(&self, req: pb::SnapshotCommand) -> Result<(), Error> {
        let _held = self.snapshots.hold(&req.vm_uuid).await;
        let volumes = self.checked(
            "restore-snapshot",
            &req.vm_uuid,
            &req.id,
            &req.volumes,
            req.fence,
        )?;
        tracing::info!(vm = %req.vm_uuid, node = %self.node, snapshot = %req.id, "snapshot restore begin");
        let restored = snapshot::restore(
            &self.deps.libvirt,
            &self.deps.storage,
            &req.vm_uuid,
            &req.id,
            &volumes,
        )
        .await;
        log_end(
            "snapshot restore end",
            &req,
            &self.node,
            restored.as_ref().err(),
        );
        Ok(restored?)
    }

    /// Checks a request's names and passes the fence for its VM: the volumes it names.
    fn checked(
        &self,
        op: &'static str,
        vm: &str,
        id: &str,
        volumes: &[pb::VolumeRef],
        fence: Option<pb::Fence>,
    ) -> Result<Vec<SnapVolume>, Error> {
        if uuid_invalid(vm) {
            return Err(invalid(format!("vm_uuid {vm:?} is not a UUID")));
        }
        if !plain_name(id) {
            return Err(invalid(format!("{id:?} is not a snapshot ID")));
        }
        if volumes.is_empty() {
            return Err(invalid("a snapshot needs the VM's volumes"));
        }
        let volumes = volumes
            .iter()
            .map(|v| {
                Ok(SnapVolume {
                    group: v.storage_group.clone(),
                    name: v.volume.clone(),
                    format: disk_format(v.format())?,
                    size_bytes: v.size_bytes,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        self.admit(op, vm, fence)?;
        Ok(volumes)
    }
}

fn log_end(what: &str, req: &pb::SnapshotCommand, node: &str, error: Option<&snapshot::Error>) {
    match error {
        None => {
            tracing::info!(vm = %req.vm_uuid, node = %node, snapshot = %req.id, "{what}: ok");
        }
        Some(e) => {
            tracing::warn!(vm = %req.vm_uuid, node = %node, snapshot = %req.id, error = %daemon::error_chain(e), "{what}: failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_vms_operations_wait_for_each_other_and_not_for_another_vms() {
        let locks = Locks::default();
        let first = locks.hold("a").await;

        let other_vm = tokio::time::timeout(Duration::from_secs(5), locks.hold("b")).await;
        let same_vm = tokio::time::timeout(Duration::from_millis(50), locks.hold("a")).await;

        assert!(other_vm.is_ok(), "another VM's operation waited");
        assert!(same_vm.is_err(), "the same VM's operation did not wait");
        drop(first);
        let after = tokio::time::timeout(Duration::from_secs(5), locks.hold("a")).await;
        assert!(after.is_ok(), "the lock was not released");
    }

    #[tokio::test]
    async fn detached_work_runs_to_its_end_when_its_caller_leaves() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let call = detached(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = tx.send("done");
            Ok(())
        });

        // The caller gives up at once.
        let _ = tokio::time::timeout(Duration::from_millis(1), call).await;

        assert_eq!(rx.await, Ok("done"));
    }
}
