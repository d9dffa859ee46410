//! The ISO library's records: an upload admitted and then made ready or undone, a deletion
//! carried out on every host before its record goes. The bytes of an upload never pass
//! through the engine (`crate::isos::upload` carries them); the engine only decides and
//! persists, so a VM creation and an ISO deletion can never race.

use proto::agent as pb;

use super::Reply;
use super::actor::{Engine, Internal};
use super::effects::store_error;
use crate::agents::Agent;
use crate::error::{ApiError, chain};
use crate::isos::{self, Header};
use crate::model::{IsoRecord, IsoState};
use crate::store;

/// An admitted upload: its record, the term its agent calls carry and every host's agent.
#[derive(Debug)]
pub struct IsoUpload {
    /// The record, in state `Uploading`.
    pub record: IsoRecord,
    /// The serving term.
    pub term: i64,
    /// Every node of the pair with its agent.
    pub targets: Vec<(String, Agent)>,
}

impl Engine {
    /// Admits an upload and records it as `Uploading`.
    pub(super) async fn iso_begin(&mut self, header: Header) -> Result<IsoUpload, ApiError> {
        let inventory = self.inventory()?;
        let usable = self.usable(&inventory);
        let down: Vec<&str> = inventory
            .nodes
            .iter()
            .filter(|n| !usable.nodes.iter().any(|u| u.name == n.name))
            .map(|n| n.name.as_str())
            .collect();
        if !down.is_empty() {
            return Err(ApiError::Unavailable(format!(
                "the ISO library keeps a copy on every host, and node {} is not up with its agent answering; retry when it is",
                down.join(", ")
            )));
        }
        let record = isos::admit(&header, &self.isos, &inventory, crate::now_unix_ms())?;
        let targets = inventory
            .nodes
            .iter()
            .map(|n| Ok((n.name.clone(), self.agent_of(&n.name)?)))
            .collect::<Result<Vec<_>, ApiError>>()?;
        self.ctx
            .writer
            .create_iso(&record)
            .await
            .map_err(|e| match e {
                store::Error::NameTaken { name } => ApiError::IsoExists { name },
                other => store_error(other),
            })?;
        tracing::info!(iso = %record.name, group = %record.storage_group, size = record.size_bytes, "ISO upload begin");
        self.isos.insert(record.name.clone(), record.clone());
        Ok(IsoUpload {
            record,
            term: self.ctx.writer.term(),
            targets,
        })
    }

    /// Ends an upload: ready with its verified SHA-256, or removed from every host.
    pub(super) async fn iso_finish(
        &mut self,
        name: &str,
        outcome: Result<String, String>,
    ) -> Result<IsoRecord, ApiError> {
        let mut record = self
            .isos
            .get(name)
            .filter(|r| r.state == IsoState::Uploading)
            .cloned()
            .ok_or_else(|| ApiError::IsoNotFound { name: name.into() })?;
        match outcome {
            Ok(sha256) => {
                record.state = IsoState::Ready;
                record.sha256 = sha256;
                self.ctx
                    .writer
                    .put_iso(&record)
                    .await
                    .map_err(store_error)?;
                tracing::info!(iso = %record.name, group = %record.storage_group, sha256 = %record.sha256, "ISO upload end: ready on every host");
                self.isos.insert(record.name.clone(), record.clone());
                Ok(record)
            }
            Err(reason) => {
                tracing::warn!(iso = %record.name, group = %record.storage_group, error = %reason, "ISO upload end: failed; removing its copies");
                self.remove_iso(record.clone(), None).await;
                Ok(record)
            }
        }
    }

    /// Deletes an ISO no VM uses from every host; replies once its record is gone.
    pub(super) async fn iso_delete(&mut self, name: &str, reply: Reply<()>) {
        let vms = self.vms.values().map(|e| &e.record);
        match isos::check_delete(name, &self.isos, vms) {
            Ok(record) => {
                let record = record.clone();
                self.remove_iso(record, Some(reply)).await;
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Finishes what a previous serving controller left: uploads it never ended and
    /// deletions it never completed are removed.
    pub(super) async fn resume_isos(&mut self) {
        let unfinished: Vec<IsoRecord> = self
            .isos
            .values()
            .filter(|r| r.state != IsoState::Ready)
            .cloned()
            .collect();
        for record in unfinished {
            tracing::info!(iso = %record.name, state = ?record.state, "ISO left unfinished by an earlier controller; removing it");
            self.remove_iso(record, None).await;
        }
    }

    /// Marks `record` as `Deleting` and deletes its copies on every host in the background;
    /// [`Engine::iso_removed`] removes the record once all are gone.
    async fn remove_iso(&mut self, mut record: IsoRecord, reply: Option<Reply<()>>) {
        record.state = IsoState::Deleting;
        if let Err(e) = self.ctx.writer.put_iso(&record).await {
            let e = store_error(e);
            tracing::warn!(iso = %record.name, error = %e, "ISO delete end: failed to record the deletion");
            if let Some(reply) = reply {
                let _ = reply.send(Err(e));
            }
            return;
        }
        tracing::info!(iso = %record.name, group = %record.storage_group, "ISO delete begin");
        self.isos.insert(record.name.clone(), record.clone());
        let agents: Vec<Result<Agent, ApiError>> =
            self.members.keys().map(|n| self.agent_of(n)).collect();
        let term = self.ctx.writer.term();
        let out = self.internal.clone();
        self.tasks.spawn(async move {
            let iso = pb::IsoRef {
                storage_group: record.storage_group.clone(),
                name: record.name.clone(),
            };
            let mut errors = Vec::new();
            for agent in agents {
                let deleted = match agent {
                    Ok(agent) => agent
                        .delete_iso(iso.clone(), term)
                        .await
                        .map_err(|e| chain(&e)),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = deleted {
                    errors.push(e);
                }
            }
            let result = if errors.is_empty() {
                Ok(())
            } else {
                Err(errors.join("; "))
            };
            let _ = out
                .send(Internal::IsoRemoved {
                    name: record.name,
                    result,
                    reply,
                })
                .await;
        });
    }

    /// An ISO's copies are deleted (or some could not be): its record goes, or stays
    /// `Deleting` for a retry.
    pub(super) async fn iso_removed(
        &mut self,
        name: String,
        result: Result<(), String>,
        reply: Option<Reply<()>>,
    ) {
        let outcome = match result {
            Ok(()) => match self.ctx.writer.remove_iso(&name).await {
                Ok(()) => {
                    self.isos.remove(&name);
                    tracing::info!(iso = %name, "ISO delete end: removed from every host");
                    Ok(())
                }
                Err(e) => {
                    let e = store_error(e);
                    tracing::warn!(iso = %name, error = %e, "ISO delete end: copies removed, record kept");
                    Err(e)
                }
            },
            Err(reason) => {
                tracing::warn!(iso = %name, error = %reason, "ISO delete end: failed; it stays listed as deleting, retry `pvctl iso-delete`");
                Err(ApiError::Unavailable(format!(
                    "ISO {name} could not be deleted from every host ({reason}); retry once the hosts are up"
                )))
            }
        };
        if let Some(reply) = reply {
            let _ = reply.send(outcome);
        }
    }
}
