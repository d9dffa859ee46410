//! Effects: persist fenced, then act.
//!
//! [`Engine::drive`] applies an event to a VM's state machine, commits the new state (and,
//! for a start, the VM's new ownership generation) through the fenced writer, and only then
//! queues the transition's agent calls as a [`Batch`]. Each VM runs one batch at a time on a
//! task of its own, so calls for different VMs run concurrently and a hung call stalls only
//! its VM; the outcome comes back to the actor as [`Done`] and is fed to the state machine.
//! Every call carries the serving term and the VM's generation; an agent that refuses them
//! means another controller serves, and the engine steps down.

use std::collections::VecDeque;
use std::time::Duration;

use daemon::lease::{LeaseStatus, LeaseView};
use proto::agent as pb;
use tokio::sync::watch;
use tokio::time::Instant;

use super::Reply;
use super::actor::{Engine, Internal};
use crate::agents::{self, Agent, Token};
use crate::error::{ApiError, chain};
use crate::model::{Intent, Mode, VmRecord, VmState};
use crate::store::{self, Tag};
use crate::vm::{self, Action, VmEvent};

/// How long an agent call waits for the serving role to leave doubt before failing.
const DOUBT_WAIT: Duration = Duration::from_secs(10);

/// Agent calls for one VM, run in order on a task of their own.
#[derive(Debug)]
pub(crate) struct Batch {
    actions: Vec<Action>,
    record: VmRecord,
    token: Token,
}

/// The agents a batch talks to: the VM's host's, and its peer's (HA replica calls).
struct Agents {
    host: Result<Agent, ApiError>,
    peer: Option<(String, Result<Agent, ApiError>)>,
}

/// What a batch did.
#[derive(Debug)]
pub(crate) struct Done {
    uuid: String,
    /// Events its outcomes mean, in order.
    events: Vec<VmEvent>,
    /// Whether it reached `RemoveRecord`: the record goes next.
    remove: bool,
    /// The failure that ended it early, if any.
    error: Option<ApiError>,
    /// Whether an agent refused our term.
    fenced: bool,
}

/// What a caller waits for.
#[derive(Debug)]
pub(crate) enum Waiter {
    /// The VM to run.
    Running(Reply<VmRecord>),
    /// The VM to be stopped, or its power-off recorded while its host is lost.
    Stopped(Reply<VmRecord>),
    /// The VM to be created (stopped with its volumes and domain).
    Created(Reply<VmRecord>),
    /// The VM to be gone, or its deletion recorded while its host is lost.
    Deleted(Reply<String>),
}

/// The API's error for a store failure.
pub(crate) fn store_error(e: store::Error) -> ApiError {
    match e {
        store::Error::NotLeader => super::stepped_down(),
        store::Error::NameTaken { name } => ApiError::AlreadyExists { name },
        other => ApiError::Unavailable(format!(
            "the pair's state store did not commit the change: {}",
            chain(&other)
        )),
    }
}

impl Engine {
    /// Applies `event` to VM `uuid`: commits the new state (with `tag` for an API request)
    /// before queueing its actions. Errors are the caller's (e.g. a refused transition).
    pub(crate) async fn drive(
        &mut self,
        uuid: &str,
        event: VmEvent,
        tag: Option<Tag>,
    ) -> Result<(), ApiError> {
        let Some(entry) = self.vms.get(uuid) else {
            return Err(ApiError::NotFound { vm: uuid.into() });
        };
        let (name, node, from) = (
            entry.record.name.clone(),
            entry.record.node.clone(),
            entry.record.state,
        );
        let transition = vm::transition(from, &node, &event)
            .map_err(|e| ApiError::FailedPrecondition(format!("VM {name}: {e}")))?;
        let changed = transition.state != from || transition.reason.is_some();
        // Persist before acting, always: even an unchanged state is written again before its
        // actions, so a controller that lost its role cannot act on it.
        if changed || !transition.actions.is_empty() {
            self.persist(uuid, &transition, tag.as_ref()).await?;
            if let Some(tag) = tag {
                self.remember(tag);
            }
        }
        if changed {
            tracing::info!(vm = %name, node = %node, event = event.name(), from = from.name(), to = transition.state.name(), "VM state changed");
        }
        let mut actions = transition.actions;
        if let Some(entry) = self.vms.get(uuid) {
            actions.extend(super::protect::after_stop(
                entry.record.mode,
                from,
                transition.state,
            ));
        }
        if !actions.is_empty() {
            self.queue(uuid, actions);
        }
        self.settle(uuid);
        Ok(())
    }

    async fn persist(
        &mut self,
        uuid: &str,
        transition: &vm::Transition,
        tag: Option<&Tag>,
    ) -> Result<(), ApiError> {
        let entry = self
            .vms
            .get(uuid)
            .ok_or_else(|| ApiError::NotFound { vm: uuid.into() })?;
        let mut record = entry.record.clone();
        record.state = transition.state;
        if let Some(reason) = &transition.reason {
            record.state_reason.clone_from(reason);
        }
        let now = crate::now_unix_ms();
        if transition.reassign {
            record.generation += 1;
            let behind = self.marked_behind(&record, &record.node);
            record.protection = super::protect::placed(&record, transition, behind, now)?;
            if let Some(to) = &transition.relocate {
                record.node.clone_from(to);
            }
        }
        if transition.state == VmState::Running
            && let Some(protection) = crate::ha::running(&record.protection, now)
        {
            record.protection = protection;
        }
        if transition.state == VmState::Stopped {
            // No mirror runs without QEMU; which copies are current stays as it was.
            record.protection.sync = crate::ha::Sync::Off;
        }
        record.updated_unix_ms = now;
        // A failover commits only if no stale mark appeared since the engine read them.
        let guard = transition
            .relocate
            .is_some()
            .then(|| self.mark_guard(uuid, false));
        let revision = match self
            .ctx
            .writer
            .update_vm_marked(&record, entry.revision, tag, guard.as_ref())
            .await
        {
            Ok(revision) => revision,
            Err(e) => {
                let err = self.after_store_error(uuid, e).await;
                // The write may have applied after all (the re-read shows it): carry on.
                if self.vms.get(uuid).is_some_and(|e| e.record == record) {
                    return Ok(());
                }
                return Err(err);
            }
        };
        if let Some(entry) = self.vms.get_mut(uuid) {
            entry.record = record;
            entry.revision = revision;
        }
        Ok(())
    }

    /// Queues `actions` for VM `uuid` under the current record and token; starts them if
    /// nothing runs for it.
    pub(crate) fn queue(&mut self, uuid: &str, actions: Vec<Action>) {
        let term = self.ctx.writer.term();
        let Some(entry) = self.vms.get_mut(uuid) else {
            return;
        };
        entry.queued.push_back(Batch {
            actions,
            token: Token {
                term,
                generation: entry.record.generation,
            },
            record: entry.record.clone(),
        });
        self.run_next(uuid);
    }

    fn run_next(&mut self, uuid: &str) {
        let Some(entry) = self.vms.get_mut(uuid) else {
            return;
        };
        if entry.busy {
            return;
        }
        let Some(batch) = entry.queued.pop_front() else {
            return;
        };
        entry.busy = true;
        entry.last_command = Instant::now();
        let agents = Agents {
            host: self.agent_of(&batch.record.node),
            peer: self
                .peer_of(&batch.record.node)
                .map(|peer| (peer.clone(), self.agent_of(&peer))),
        };
        let lease = self.ctx.lease_status.clone();
        let out = self.internal.clone();
        self.tasks.spawn(async move {
            let done = run_batch(agents, lease, batch).await;
            let _ = out.send(Internal::Effect(done)).await;
        });
    }

    /// The agent of `node`, at the address its registration (or last record) gives.
    pub(crate) fn agent_of(&self, node: &str) -> Result<Agent, ApiError> {
        let record = self
            .registered
            .get(node)
            .or_else(|| self.members.get(node))
            .ok_or_else(|| {
                ApiError::Unavailable(format!("node {node} has never registered: start its agent"))
            })?;
        self.ctx
            .agents
            .get(node, &record.agent_address)
            .map_err(|e| ApiError::Internal(chain(&e)))
    }

    /// Feeds a finished batch's outcome back into the VM's state machine.
    pub(crate) async fn effect_done(&mut self, done: Done) {
        let uuid = done.uuid.clone();
        if done.fenced {
            self.fenced = true;
        }
        if let Some(entry) = self.vms.get_mut(&uuid) {
            entry.busy = false;
            entry.last_command = Instant::now();
        }
        for event in done.events {
            if let Err(e) = self.drive(&uuid, event, None).await {
                tracing::warn!(vm = %uuid, error = %e, "ignoring an agent outcome");
            }
        }
        if done.remove {
            self.remove(&uuid).await;
        }
        if let Some(error) = done.error {
            self.fail_waiters(&uuid, &error);
        }
        self.run_next(&uuid);
        self.settle(&uuid);
    }

    /// Removes VM `uuid`'s record once its domain and volumes are gone.
    async fn remove(&mut self, uuid: &str) {
        let Some(entry) = self.vms.get(uuid) else {
            return;
        };
        let (record, revision) = (entry.record.clone(), entry.revision);
        match self.ctx.writer.remove_vm(&record, revision).await {
            Ok(()) => {
                self.vms.remove(uuid);
                self.removed.insert(uuid.to_string(), Instant::now());
                tracing::info!(vm = %record.name, node = %record.node, "VM deleted");
            }
            Err(e) => {
                let e = self.after_store_error(uuid, e).await;
                tracing::warn!(vm = %record.name, error = %e, "removing the VM record failed; retried at the next takeover");
                self.fail_waiters(uuid, &e);
            }
        }
    }

    /// After a failed write of VM `uuid`: unless this controller lost its role, re-reads the
    /// record, since an attempt may have applied (or another writer changed it), so the next
    /// write compares against what etcd holds. Returns the error for the caller.
    pub(crate) async fn after_store_error(&mut self, uuid: &str, e: store::Error) -> ApiError {
        self.note_store_error(&e);
        if !matches!(e, store::Error::NotLeader) {
            match store::load_vm(&self.ctx.client, uuid).await {
                Ok(Some(stored)) => {
                    if let Some(entry) = self.vms.get_mut(uuid) {
                        entry.record = stored.value;
                        entry.revision = stored.revision;
                    } else {
                        self.vms
                            .insert(uuid.to_string(), super::actor::Entry::new(stored));
                    }
                }
                Ok(None) => {
                    self.vms.remove(uuid);
                }
                Err(reread) => {
                    tracing::warn!(vm = %uuid, error = %chain(&reread), "re-reading VM after a failed write failed");
                }
            }
        }
        store_error(e)
    }

    /// A fenced write failing because our election key is gone means another controller may
    /// serve: stop acting and step down.
    pub(crate) fn note_store_error(&mut self, e: &store::Error) {
        if matches!(e, store::Error::NotLeader) && !self.fenced {
            tracing::error!(node = %self.ctx.node, term = self.ctx.writer.term(), "a fenced write found this controller's election key gone");
            self.fenced = true;
        }
    }

    /// Answers the waiters of VM `uuid` whose wait is over.
    pub(crate) fn settle(&mut self, uuid: &str) {
        let Some(waiters) = self.waiters.remove(uuid) else {
            return;
        };
        let record = self.vms.get(uuid).map(|e| e.record.clone());
        let mut still = Vec::new();
        for waiter in waiters {
            if let Some(waiter) = answer(waiter, uuid, record.as_ref()) {
                still.push(waiter);
            }
        }
        if !still.is_empty() {
            self.waiters.insert(uuid.to_string(), still);
        }
    }

    /// Answers every waiter of VM `uuid` with `error`.
    pub(crate) fn fail_waiters(&mut self, uuid: &str, error: &ApiError) {
        for waiter in self.waiters.remove(uuid).unwrap_or_default() {
            match waiter {
                Waiter::Running(r) | Waiter::Stopped(r) | Waiter::Created(r) => {
                    let _ = r.send(Err(error.clone()));
                }
                Waiter::Deleted(r) => {
                    let _ = r.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Answers `waiter` if `record` (the VM now, `None` once deleted) ends its wait; gives it back
/// otherwise.
fn answer(waiter: Waiter, uuid: &str, record: Option<&VmRecord>) -> Option<Waiter> {
    let Some(record) = record else {
        match waiter {
            Waiter::Deleted(reply) => {
                let _ = reply.send(Ok(uuid.to_string()));
            }
            Waiter::Running(reply) | Waiter::Stopped(reply) | Waiter::Created(reply) => {
                let _ = reply.send(Err(ApiError::NotFound { vm: uuid.into() }));
            }
        }
        return None;
    };
    let failed = |reply: Reply<VmRecord>, what: &str| {
        let _ = reply.send(Err(ApiError::FailedPrecondition(format!(
            "VM {} {what}: {}",
            record.name, record.state_reason
        ))));
    };
    match (waiter, record.state) {
        (Waiter::Running(reply), VmState::Running) => {
            let _ = reply.send(Ok(record.clone()));
        }
        (Waiter::Running(reply), VmState::Stopped | VmState::Paused | VmState::Lost { .. }) => {
            failed(reply, "did not start")
        }
        (
            Waiter::Stopped(reply),
            VmState::Stopped
            | VmState::Lost {
                intent: Intent::PowerOff | Intent::Delete,
            },
        ) => {
            let _ = reply.send(Ok(record.clone()));
        }
        (Waiter::Created(reply), VmState::Stopped) => {
            let _ = reply.send(Ok(record.clone()));
        }
        (Waiter::Created(reply), VmState::Deleting) => failed(reply, "was not created"),
        (
            Waiter::Deleted(reply),
            VmState::Lost {
                intent: Intent::Delete,
            },
        ) => {
            let _ = reply.send(Ok(uuid.to_string()));
        }
        (waiter, _) => return Some(waiter),
    }
    None
}

/// Runs a batch's agent calls in order; stops at the first failure.
async fn run_batch(agents: Agents, mut lease: watch::Receiver<LeaseView>, batch: Batch) -> Done {
    let record = &batch.record;
    let mut done = Done {
        uuid: record.uuid.clone(),
        events: Vec::new(),
        remove: false,
        error: None,
        fenced: false,
    };
    let provisioning = batch.actions.contains(&Action::CreateVolumes);
    let mut actions: VecDeque<Action> = batch.actions.iter().copied().collect();
    while let Some(action) = actions.pop_front() {
        if action == Action::RemoveRecord {
            done.remove = true;
            break;
        }
        let (vm, op) = (record.name.as_str(), action.name());
        let peer = agents.peer.as_ref().map_or("", |(name, _)| name.as_str());
        let (node, agent) = match (action, &agents.peer) {
            (
                Action::ExportReplica | Action::PrepareStandby | Action::DiscardStandby,
                Some((peer, agent)),
            ) => (peer.as_str(), agent),
            (Action::ExportReplica | Action::PrepareStandby | Action::DiscardStandby, None) => (
                "",
                &Err(ApiError::FailedPrecondition(
                    "the pair has no second host to hold the replica".into(),
                )),
            ),
            _ => (record.node.as_str(), &agents.host),
        };
        tracing::info!(vm, node, op, generation = batch.token.generation, "begin");
        let outcome = match (agent, wait_out_doubt(&mut lease).await) {
            (Err(e), _) => Err(e.clone()),
            (_, Err(e)) => Err(e),
            (Ok(agent), Ok(())) => call(agent, action, record, peer, batch.token)
                .await
                .map_err(|e| {
                    done.fenced |= matches!(e, agents::Error::Fenced { .. });
                    ApiError::from(e)
                }),
        };
        match outcome {
            Ok(event) => {
                tracing::info!(vm, node, op, "end: ok");
                done.events.extend(event);
                if action == Action::DeleteVolumes && record.mode != Mode::Unprotected {
                    delete_replica(agents.peer.as_ref(), record, batch.token).await;
                }
            }
            // A start that cannot proceed (define failed, agent unreachable) is a failed start;
            // a failed provisioning rolls the create back. Either ends the batch: starting an
            // old definition after a failed define would run what the user did not ask for.
            Err(e) if provisioning => {
                tracing::warn!(vm, node, op, error = %e, "end: failed; the create is rolled back");
                done.events.push(VmEvent::ProvisionFailed {
                    reason: e.to_string(),
                });
                return done;
            }
            // Only a refusal is a failed start; a timeout or an unreachable agent leaves the
            // outcome unknown, and the next report of the domain decides.
            Err(e @ ApiError::FailedPrecondition(_))
                if matches!(action, Action::DefineDomain | Action::StartDomain) =>
            {
                tracing::warn!(vm, node, op, error = %e, "end: failed; the start fails");
                done.events.push(VmEvent::StartFailed {
                    reason: e.to_string(),
                });
                return done;
            }
            // A lost ACPI press is not fatal: the grace deadline powers the VM off.
            Err(e) if action == Action::AcpiShutdown => {
                tracing::warn!(vm, node, op, error = %e, "end: failed; the VM is powered off at its deadline");
            }
            // The VM is stopped either way: a standby left on the peer only holds memory until
            // the next start replaces it, so a call waiting behind this one must not fail.
            Err(e) if action == Action::DiscardStandby => {
                tracing::warn!(vm, node, op, error = %e, "end: failed; the standby stays on {node} until the VM starts again");
            }
            Err(e) => {
                tracing::warn!(vm, node, op, error = %e, "end: failed");
                done.error = Some(e);
                return done;
            }
        }
    }
    if provisioning {
        done.events.push(VmEvent::Provisioned);
    }
    done
}

/// Removes a deleted HA VM's replica from the peer: best effort, since the peer may be gone
/// for good; what is left is logged for the admin.
async fn delete_replica(
    peer: Option<&(String, Result<Agent, ApiError>)>,
    record: &VmRecord,
    token: Token,
) {
    let Some((node, agent)) = peer else { return };
    let vm = record.name.as_str();
    tracing::info!(vm, node, op = "delete-replica", "begin");
    let outcome = match agent {
        Ok(agent) => match agent.unexport_replica(&record.uuid, token).await {
            Ok(()) => agent
                .delete_volumes(record, token)
                .await
                .map_err(ApiError::from),
            Err(e) => Err(ApiError::from(e)),
        },
        Err(e) => Err(e.clone()),
    };
    match outcome {
        Ok(()) => tracing::info!(vm, node, op = "delete-replica", "end: ok"),
        Err(e) => {
            tracing::warn!(vm, node, op = "delete-replica", error = %e, "end: failed; the replica's volumes stay on {node}: delete them by hand")
        }
    }
}

/// Waits while the serving role's lease is in doubt (an etcd election): a controller that may
/// have lost its role must not act. The status is worked out now, not taken from the last
/// renewal. Fails if the doubt outlasts [`DOUBT_WAIT`] or the lease expired.
async fn wait_out_doubt(lease: &mut watch::Receiver<LeaseView>) -> Result<(), ApiError> {
    let waited = tokio::time::timeout(
        DOUBT_WAIT,
        lease.wait_for(|view| view.status() != LeaseStatus::Doubt),
    )
    .await;
    match waited {
        Ok(Ok(view)) if view.status() == LeaseStatus::Alive => Ok(()),
        _ => Err(ApiError::Unavailable(
            "this controller's serving lease is in doubt or expired; not acting".into(),
        )),
    }
}

/// One agent call; returns the VM event its result means, if any.
async fn call(
    agent: &Agent,
    action: Action,
    record: &VmRecord,
    peer: &str,
    token: Token,
) -> Result<Option<VmEvent>, agents::Error> {
    let uuid = record.uuid.as_str();
    match action {
        Action::CreateVolumes => agent.create_volumes(record, token).await.map(|()| None),
        Action::DefineDomain => agent.define(record, token).await.map(|_| None),
        Action::StartDomain => agent
            .start(
                uuid,
                token,
                record.mode.mirrored() && record.protection.track_from_start,
                record.mode == Mode::Ft && record.protection.resume_standby,
            )
            .await
            .map(|_| Some(VmEvent::StartSucceeded)),
        Action::AcpiShutdown => agent.shutdown(uuid, token).await.map(|_| None),
        Action::DestroyDomain => agent.destroy(uuid, token).await.map(|s| stopped_event(&s)),
        Action::UndefineDomain => agent.undefine(uuid, token).await.map(|()| None),
        Action::DeleteVolumes => agent.delete_volumes(record, token).await.map(|()| None),
        Action::ExportReplica => agent.export_replica(record, token).await.map(|()| None),
        Action::StartMirror => agent.start_mirror(record, peer, token).await.map(|_| None),
        Action::PrepareStandby => agent.prepare_standby(record, token).await.map(|_| None),
        Action::StartEpochs => agent.start_epochs(uuid, token).await.map(|_| None),
        Action::DiscardStandby => agent.unexport_replica(uuid, token).await.map(|()| None),
        Action::RemoveRecord => Ok(None),
    }
}

/// `DomainStopped` if `status` shows the domain stopped.
pub(crate) fn stopped_event(status: &pb::DomainStatus) -> Option<VmEvent> {
    match status.state() {
        pb::DomainState::Shutoff | pb::DomainState::Crashed | pb::DomainState::Undefined => {
            Some(VmEvent::DomainStopped {
                reason: status.reason.clone(),
            })
        }
        _ => None,
    }
}
