//! Snapshots of a VM: each request is checked by [`crate::snapshots`], its new state
//! persisted in the VM's record (fenced) before its host's agent acts, and the agent call runs
//! on a task of its own; the outcome comes back as [`SnapshotDone`]. One snapshot operation
//! runs per VM at a time, and the VM is not started, deleted or changed meanwhile.

use std::collections::BTreeSet;

use super::Reply;
use super::actor::{Engine, Internal};
use crate::agents::{Agent, Token};
use crate::error::{ApiError, chain};
use crate::model::{Snapshot, SnapshotState, VmRecord};
use crate::snapshots::{self, Ask};
use crate::store::Tag;

/// The request record's name for taking a snapshot.
const CREATE_OP: &str = "snapshot-create";

/// A taken snapshot and what the caller should be told.
pub type Created = (Snapshot, Vec<String>);

/// What a snapshot operation was.
#[derive(Debug)]
pub(super) enum SnapshotOp {
    /// Taking one on top of `parent`, copied to `peer` if given, with the warnings for its
    /// caller.
    Take {
        /// The snapshot it builds on.
        parent: Option<String>,
        /// The peer to copy it to.
        peer: Option<String>,
        /// Warnings.
        warnings: Vec<String>,
        /// The caller.
        reply: Reply<Created>,
    },
    /// Deleting one; no caller when a takeover cleans up.
    Delete(Option<Reply<()>>),
    /// Restoring one.
    Restore(Reply<VmRecord>),
}

/// An agent's answer to a snapshot operation.
#[derive(Debug)]
pub(super) struct SnapshotDone {
    uuid: String,
    id: String,
    op: SnapshotOp,
    result: Result<Option<proto::agent::SnapshotTaken>, ApiError>,
}

impl Engine {
    /// Takes a snapshot of a running or stopped VM. A retry of request `request` is answered
    /// with the snapshot its first attempt took, never takes a second.
    pub(super) async fn snapshot_create(
        &mut self,
        vm: &str,
        description: &str,
        ask: Ask,
        request: Option<String>,
        reply: Reply<Created>,
    ) {
        if let Some(answer) = self.snapshot_replayed(request.as_deref()) {
            let _ = reply.send(answer);
            return;
        }
        let planned = match self.snapshot_vm(vm).and_then(|uuid| {
            let record = &self.vms[&uuid].record;
            let peer = self.peer_of(&record.node);
            snapshots::plan(
                record,
                peer.as_deref(),
                description,
                ask,
                crate::now_unix_ms(),
            )
            .map(|p| (uuid, p, peer))
        }) {
            Ok(planned) => planned,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let (uuid, planned, peer) = planned;
        let id = planned.snapshot.id.clone();
        let next = self.vms[&uuid].record.next_snapshot.max(1) + 1;
        let snapshot = planned.snapshot.clone();
        let tag = self.tag(request, CREATE_OP, &uuid).map(|mut tag| {
            tag.record.snapshot.clone_from(&id);
            tag
        });
        let record = match self
            .save_tagged(&uuid, tag, |r| {
                r.snapshots.push(snapshot);
                r.next_snapshot = next;
            })
            .await
        {
            Ok(record) => record,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        tracing::info!(vm = %record.name, node = %record.node, snapshot = %id, parent = ?planned.parent, "snapshot begin");
        let op = SnapshotOp::Take {
            parent: planned.parent,
            peer: peer.filter(|_| planned.replicate),
            warnings: planned.warnings,
            reply,
        };
        self.run_snapshot(record, id, op);
    }

    /// The answer to a retry of request `id` whose first attempt took a snapshot: the
    /// snapshot once it is ready; until then, retry. `None` when no attempt took one that is
    /// still listed (a failed one left nothing): the request is then taken anew.
    fn snapshot_replayed(&self, id: Option<&str>) -> Option<Result<Created, ApiError>> {
        let (request, _) = self.requests.get(id?)?;
        if request.op != CREATE_OP {
            return None;
        }
        let record = &self.vms.get(&request.vm)?.record;
        let snapshot = record.snapshots.iter().find(|s| s.id == request.snapshot)?;
        tracing::info!(vm = %record.name, snapshot = %snapshot.id, "snapshot request retried: answering with the first attempt's snapshot");
        Some(match snapshot.state {
            SnapshotState::Ready => Ok((snapshot.clone(), Vec::new())),
            _ => Err(ApiError::Unavailable(format!(
                "snapshot {} of VM {}, which this request began, is still being taken; retry",
                snapshot.id, record.name
            ))),
        })
    }

    /// Deletes a snapshot.
    pub(super) async fn snapshot_delete(&mut self, vm: &str, id: &str, reply: Reply<()>) {
        let checked = self
            .snapshot_vm(vm)
            .and_then(|uuid| snapshots::check_delete(&self.vms[&uuid].record, id).map(|_| uuid));
        match checked {
            Ok(uuid) => self.delete_snapshot(&uuid, id, Some(reply)).await,
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Restores a snapshot over a stopped VM's disks. The record first says that only this
    /// host's copy is current: the peer's no longer equals the disks the VM will start from.
    pub(super) async fn snapshot_restore(&mut self, vm: &str, id: &str, reply: Reply<VmRecord>) {
        let checked = self.snapshot_vm(vm).and_then(|uuid| {
            if self.vms[&uuid].busy {
                return Err(ApiError::Unavailable(format!(
                    "VM {vm} is busy with its agent; retry in a moment"
                )));
            }
            snapshots::check_restore(&self.vms[&uuid].record, id).map(|_| uuid)
        });
        let uuid = match checked {
            Ok(uuid) => uuid,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let record = match self
            .save(&uuid, |r| {
                r.protection.current = BTreeSet::from([r.node.clone()]);
                r.protection.track_from_start = false;
            })
            .await
        {
            Ok(record) => record,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        tracing::info!(vm = %record.name, node = %record.node, snapshot = %id, "snapshot restore begin");
        self.run_snapshot(record, id.to_string(), SnapshotOp::Restore(reply));
    }

    /// A snapshot left being taken or deleted by an earlier serving controller is deleted:
    /// what the agent kept of it is not known. One per VM, as every snapshot operation (two
    /// deletions at once could rebase onto a file the other removes); others left so are
    /// deleted by `vm-snapshot-delete`.
    pub(super) async fn resume_snapshots(&mut self) {
        let unfinished: Vec<(String, String)> = self
            .vms
            .iter()
            .filter_map(|(uuid, e)| {
                e.record
                    .snapshots
                    .iter()
                    .find(|s| s.state != SnapshotState::Ready)
                    .map(|s| (uuid.clone(), s.id.clone()))
            })
            .collect();
        for (uuid, id) in unfinished {
            tracing::info!(vm = %uuid, snapshot = %id, "snapshot left unfinished by an earlier controller; deleting it");
            self.delete_snapshot(&uuid, &id, None).await;
        }
    }

    /// Admits an export of `vm` (its snapshot `snapshot` if given): the host to read, held
    /// like a snapshot operation until the export ends.
    pub(super) fn export_begin(
        &mut self,
        vm: &str,
        snapshot: Option<String>,
    ) -> Result<crate::export::Plan, ApiError> {
        let uuid = self.snapshot_vm(vm)?;
        if self.vms[&uuid].busy {
            return Err(ApiError::Unavailable(format!(
                "VM {vm} is busy with its agent; retry in a moment"
            )));
        }
        let record = self.vms[&uuid].record.clone();
        let node = crate::export::check(&record, snapshot.as_deref(), |n| self.node_usable(n))?;
        let agent = self.agent_of(&node)?;
        let token = Token {
            term: self.ctx.writer.term(),
            generation: record.generation,
        };
        self.snapshotting.insert(uuid);
        Ok(crate::export::Plan {
            record,
            node,
            agent,
            snapshot,
            token,
        })
    }

    /// Whether VM `uuid` has a snapshot operation or an export running: it must not start,
    /// go or change.
    pub(super) fn snapshot_busy(&self, uuid: &str) -> Result<(), ApiError> {
        match self.snapshotting.contains(uuid) {
            true => Err(ApiError::FailedPrecondition(format!(
                "VM {} has a snapshot operation or an export running, or is being imported; retry once it ends",
                self.vms.get(uuid).map_or(uuid, |e| e.record.name.as_str())
            ))),
            false => Ok(()),
        }
    }

    async fn delete_snapshot(&mut self, uuid: &str, id: &str, reply: Option<Reply<()>>) {
        let saved = self
            .save(uuid, |r| {
                if let Some(s) = r.snapshots.iter_mut().find(|s| s.id == id) {
                    s.state = SnapshotState::Deleting;
                }
            })
            .await;
        match saved {
            Ok(record) => {
                tracing::info!(vm = %record.name, node = %record.node, snapshot = %id, "snapshot delete begin");
                self.run_snapshot(record, id.to_string(), SnapshotOp::Delete(reply));
            }
            Err(e) => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(e));
                }
            }
        }
    }

    /// The UUID of `vm`, if no snapshot operation runs for it.
    fn snapshot_vm(&self, vm: &str) -> Result<String, ApiError> {
        let uuid = self.find(vm)?;
        self.snapshot_busy(&uuid)?;
        Ok(uuid)
    }

    /// Runs `op` on snapshot `id` through the agents of the hosts that keep it: the VM's
    /// host takes and restores; a deletion runs on every copy, and only the VM's host's must
    /// succeed (a copy left on a lost peer is never listed or restored again).
    fn run_snapshot(&mut self, record: VmRecord, id: String, op: SnapshotOp) {
        let nodes = record
            .snapshots
            .iter()
            .find(|s| s.id == id)
            .map_or_else(|| vec![record.node.clone()], |s| s.nodes.clone());
        let agents: Vec<(String, Result<Agent, ApiError>)> = nodes
            .into_iter()
            .map(|n| {
                let agent = self.agent_of(&n);
                (n, agent)
            })
            .collect();
        let home = self.agent_of(&record.node);
        let token = Token {
            term: self.ctx.writer.term(),
            generation: record.generation,
        };
        self.snapshotting.insert(record.uuid.clone());
        let out = self.internal.clone();
        self.tasks.spawn(async move {
            let result = match &op {
                SnapshotOp::Take { parent, peer, .. } => match home {
                    Ok(agent) => agent
                        .take_snapshot(&record, &id, parent.as_deref(), peer.is_some(), token)
                        .await
                        .map(Some)
                        .map_err(ApiError::from),
                    Err(e) => Err(e),
                },
                SnapshotOp::Restore(_) => match home {
                    Ok(agent) => agent
                        .restore_snapshot(&record, &id, token)
                        .await
                        .map(|()| None)
                        .map_err(ApiError::from),
                    Err(e) => Err(e),
                },
                SnapshotOp::Delete(_) => delete_everywhere(&record, &id, agents, token).await,
            };
            let done = SnapshotDone {
                uuid: record.uuid,
                id,
                op,
                result,
            };
            let _ = out.send(Internal::Snapshot(done)).await;
        });
    }

    /// An agent answered a snapshot operation: the record follows, then the caller.
    pub(super) async fn snapshot_done(&mut self, done: SnapshotDone) {
        let SnapshotDone {
            uuid,
            id,
            op,
            result,
        } = done;
        self.snapshotting.remove(&uuid);
        let name = self
            .vms
            .get(&uuid)
            .map_or_else(|| uuid.clone(), |e| e.record.name.clone());
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => e.to_string(),
        };
        match op {
            SnapshotOp::Take {
                peer,
                mut warnings,
                reply,
                ..
            } => {
                let saved = match result {
                    Ok(taken) => {
                        let taken = taken.unwrap_or_default();
                        let copied = peer.filter(|_| taken.replicated);
                        if !taken.replicate_error.is_empty() {
                            warnings.push(format!(
                                "the snapshot is kept on this VM's host only: copying it to its peer failed ({})",
                                taken.replicate_error
                            ));
                        }
                        self.save(&uuid, |r| {
                            if let Some(s) = r.snapshots.iter_mut().find(|s| s.id == id) {
                                s.state = SnapshotState::Ready;
                                s.bytes = taken.bytes;
                                s.incremental = taken.incremental;
                                s.freeze_us = taken.freeze_us;
                                s.nodes.extend(copied);
                            }
                        })
                        .await
                        .and_then(|r| {
                            r.snapshots.into_iter().find(|s| s.id == id).ok_or_else(|| {
                                ApiError::SnapshotNotFound {
                                    vm: name.clone(),
                                    id: id.clone(),
                                }
                            })
                        })
                    }
                    Err(e) => {
                        let _ = self
                            .save(&uuid, |r| r.snapshots.retain(|s| s.id != id))
                            .await;
                        Err(e)
                    }
                };
                tracing::info!(vm = %name, snapshot = %id, outcome = %outcome, "snapshot end");
                let _ = reply.send(saved.map(|s| (s, warnings)));
            }
            SnapshotOp::Delete(reply) => {
                let saved = match result {
                    Ok(_) => self
                        .save(&uuid, |r| r.snapshots.retain(|s| s.id != id))
                        .await
                        .map(drop),
                    Err(e) => Err(e),
                };
                tracing::info!(vm = %name, snapshot = %id, outcome = %outcome, "snapshot delete end");
                if let Some(reply) = reply {
                    let _ = reply.send(saved);
                }
            }
            SnapshotOp::Restore(reply) => {
                tracing::info!(vm = %name, snapshot = %id, outcome = %outcome, "snapshot restore end");
                let restored = result.and_then(|_| {
                    self.vms
                        .get(&uuid)
                        .map(|e| e.record.clone())
                        .ok_or_else(|| ApiError::NotFound { vm: name.clone() })
                });
                let _ = reply.send(restored);
            }
        }
    }

    /// Changes VM `uuid`'s record with `change` and persists it (fenced).
    async fn save(
        &mut self,
        uuid: &str,
        change: impl FnOnce(&mut VmRecord),
    ) -> Result<VmRecord, ApiError> {
        self.save_tagged(uuid, None, change).await
    }

    /// [`Engine::save`], recording in the same transaction that request `tag` applied.
    async fn save_tagged(
        &mut self,
        uuid: &str,
        tag: Option<Tag>,
        change: impl FnOnce(&mut VmRecord),
    ) -> Result<VmRecord, ApiError> {
        let entry = self
            .vms
            .get(uuid)
            .ok_or_else(|| ApiError::NotFound { vm: uuid.into() })?;
        let mut record = entry.record.clone();
        change(&mut record);
        record.updated_unix_ms = crate::now_unix_ms();
        match self
            .ctx
            .writer
            .update_vm(&record, entry.revision, tag.as_ref())
            .await
        {
            Ok(revision) => {
                if let Some(entry) = self.vms.get_mut(uuid) {
                    entry.record = record.clone();
                    entry.revision = revision;
                }
                if let Some(tag) = tag {
                    self.remember(tag);
                }
                Ok(record)
            }
            Err(e) => {
                let e = self.after_store_error(uuid, e).await;
                tracing::warn!(vm = %uuid, error = %chain(&e), "saving the VM's snapshots failed");
                Err(e)
            }
        }
    }
}

/// Deletes snapshot `id` on every host that keeps it; fails only if the VM's host fails.
async fn delete_everywhere(
    record: &VmRecord,
    id: &str,
    agents: Vec<(String, Result<Agent, ApiError>)>,
    token: Token,
) -> Result<Option<proto::agent::SnapshotTaken>, ApiError> {
    for (node, agent) in agents {
        let deleted = match agent {
            Ok(agent) => agent
                .delete_snapshot(record, id, token)
                .await
                .map_err(ApiError::from),
            Err(e) => Err(e),
        };
        match deleted {
            Ok(()) => {}
            Err(e) if node == record.node => return Err(e),
            Err(e) => {
                tracing::warn!(vm = %record.name, node = %node, snapshot = %id, error = %e, "snapshot copy not deleted on the peer; it is no longer listed and is never restored");
            }
        }
    }
    Ok(None)
}
