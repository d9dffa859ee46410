//! Imports' records: a VM admitted like a create and recorded as `Creating` (held from every
//! other command while its disks arrive), then defined (`Stopped`) or rolled back
//! (`Deleting`, which removes what its host made). The bytes never pass through the engine
//! (`crate::import` carries them). A controller that dies mid-import leaves the record
//! `Creating`; its successor's takeover rolls it back like any unacknowledged create.

use tokio::sync::oneshot;

use super::Reply;
use super::actor::{Engine, Entry};
use super::effects::Waiter;
use crate::agents::Token;
use crate::error::ApiError;
use crate::import::Begun;
use crate::model::{VmSpec, VmState};
use crate::store::Stored;
use crate::vm::{PROVISION, VmEvent};

impl Engine {
    /// Admits the import of the VM `spec` describes and records it as `Creating`.
    pub(super) async fn import_begin(&mut self, spec: VmSpec) -> Result<Begun, ApiError> {
        let mut record = self.admit(spec)?;
        record.state_reason = "importing".into();
        let agent = self.agent_of(&record.node)?;
        let uuid = record.uuid.clone();
        tracing::info!(vm = %record.name, uuid = %uuid, node = %record.node, mode = record.mode.as_str(), "import begin");
        match self.ctx.writer.create_vm(&record, None).await {
            Ok(revision) => {
                let stored = Stored {
                    value: record.clone(),
                    revision,
                    key: String::new(),
                };
                self.vms.insert(uuid.clone(), Entry::new(stored));
            }
            Err(e) => {
                let err = self.after_store_error(&uuid, e).await;
                tracing::warn!(vm = %record.name, uuid = %uuid, error = %err, "import end: its record was not written");
                if self.vms.contains_key(&uuid) {
                    // The write applied after all: roll the record back.
                    let reason = format!("import failed: {err}");
                    let _ = self
                        .drive(&uuid, VmEvent::ProvisionFailed { reason }, None)
                        .await;
                }
                return Err(err);
            }
        }
        self.snapshotting.insert(uuid);
        Ok(Begun {
            token: Token {
                term: self.ctx.writer.term(),
                generation: record.generation,
            },
            record,
            agent,
        })
    }

    /// Ends import `uuid`: defines the VM once its disks are in place, or rolls it back and
    /// answers once its record is gone (or its removal failed).
    pub(super) async fn import_finish(
        &mut self,
        uuid: &str,
        outcome: Result<(), String>,
        reply: Reply<crate::model::VmRecord>,
    ) {
        self.snapshotting.remove(uuid);
        let Some(entry) = self.vms.get(uuid) else {
            let _ = reply.send(Err(ApiError::NotFound { vm: uuid.into() }));
            return;
        };
        let name = entry.record.name.clone();
        if entry.record.state != VmState::Creating {
            tracing::warn!(vm = %name, uuid = %uuid, state = entry.record.state.name(), "import end: the VM changed meanwhile");
            let _ = reply.send(Err(ApiError::FailedPrecondition(format!(
                "VM {name} is {} ({}); the import did not finish",
                entry.record.state.name(),
                entry.record.state_reason
            ))));
            return;
        }
        match outcome {
            Ok(()) => {
                tracing::info!(vm = %name, uuid = %uuid, "import: disks in place; defining the VM");
                self.waiters
                    .entry(uuid.to_string())
                    .or_default()
                    .push(Waiter::Created(reply));
                self.queue(uuid, PROVISION.to_vec());
            }
            Err(reason) => {
                tracing::warn!(vm = %name, uuid = %uuid, error = %reason, "import end: failed; removing what it made");
                let event = VmEvent::ProvisionFailed {
                    reason: format!("import failed: {reason}"),
                };
                if let Err(e) = self.drive(uuid, event, None).await {
                    tracing::warn!(vm = %name, uuid = %uuid, error = %e, "rolling back the import failed");
                    let _ = reply.send(Err(ApiError::Unavailable(format!(
                        "import failed ({reason}); rolling VM {name} back failed too ({e}): it stays listed as creating until the next controller takeover removes it"
                    ))));
                    return;
                }
                let (gone, removed) = oneshot::channel();
                self.waiters
                    .entry(uuid.to_string())
                    .or_default()
                    .push(Waiter::Deleted(gone));
                tokio::spawn(async move {
                    let outcome = match removed.await {
                        Ok(Ok(_)) => format!("import failed ({reason}); nothing was kept"),
                        Ok(Err(e)) => format!(
                            "import failed ({reason}); removing its VM failed too ({e}): it stays listed as deleting"
                        ),
                        Err(_) => format!("import failed ({reason})"),
                    };
                    let _ = reply.send(Err(ApiError::FailedPrecondition(outcome)));
                });
                self.settle(uuid);
            }
        }
    }
}
