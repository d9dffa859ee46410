//! The serving controller's engine: the one task that owns the pair's VM state.
//!
//! API handlers send it [`Command`]s with a reply channel. It decides with the pure modules
//! ([`crate::validate`], [`crate::placement`], [`crate::vm`]), commits every new state to etcd
//! through the fenced [`Writer`] *before* it acts on it or replies, then drives the agents.
//! Once a second it polls both agents in the background and feeds what they report, and the
//! clock, back into the VM state machine.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use crate::store::Etcd;
use proto::agent as pb;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::agents::{Agent, AgentPool};
use crate::error::{ApiError, chain};
use crate::model::{Disk, Mode, Nic, NodeRecord, VmRecord, VmSpec, VmState};
use crate::placement::{self, Candidate, Free, Inventory, NodeInventory, Policy};
use crate::store::{self, Stored, Writer};
use crate::validate;
use crate::vm::{self, Action, VmEvent};

/// How often the engine polls the agents and checks deadlines.
const TICK: Duration = Duration::from_secs(1);
/// Commands queued before API callers wait.
const QUEUE: usize = 64;

type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

/// A change to a stopped VM's size or mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Modify {
    /// New protection mode.
    pub mode: Option<Mode>,
    /// New vCPUs.
    pub vcpus: Option<u32>,
    /// New memory in MiB.
    pub memory_mib: Option<u64>,
}

/// A node as the serving controller sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// Its registration.
    pub record: NodeRecord,
    /// Whether its agent answered the last poll.
    pub reachable: bool,
    /// VMs running there.
    pub running_vms: u32,
}

/// The nodes, which one serves, and the capacity left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodesView {
    /// Registered nodes.
    pub nodes: Vec<NodeView>,
    /// The serving node.
    pub serving: String,
    /// Capacity left for new VMs.
    pub free: Free,
}

/// A request to the engine.
#[derive(Debug)]
pub enum Command {
    /// Create a VM.
    Create {
        /// What to create.
        spec: VmSpec,
        /// Reply.
        reply: Reply<VmRecord>,
    },
    /// Delete a stopped VM.
    Delete {
        /// Name or UUID.
        vm: String,
        /// Reply: the UUID.
        reply: Reply<String>,
    },
    /// Read a VM.
    Get {
        /// Name or UUID.
        vm: String,
        /// Reply.
        reply: Reply<VmRecord>,
    },
    /// List the VMs.
    List {
        /// Reply.
        reply: Reply<Vec<VmRecord>>,
    },
    /// Change a stopped VM.
    Modify {
        /// Name or UUID.
        vm: String,
        /// The change.
        change: Modify,
        /// Reply.
        reply: Reply<VmRecord>,
    },
    /// List the nodes.
    Nodes {
        /// Reply.
        reply: Reply<NodesView>,
    },
    /// Power a VM off; replies once it is stopped.
    PowerOff {
        /// Name or UUID.
        vm: String,
        /// Reply.
        reply: Reply<VmRecord>,
    },
    /// Shut a VM down; replies once it is stopped.
    Shutdown {
        /// Name or UUID.
        vm: String,
        /// Grace period before it is powered off.
        grace: Duration,
        /// Reply.
        reply: Reply<VmRecord>,
    },
    /// Start a VM; replies once it runs.
    Start {
        /// Name or UUID.
        vm: String,
        /// Reply.
        reply: Reply<VmRecord>,
    },
}

/// Sends commands to the engine; cheap to clone.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
}

impl EngineHandle {
    /// Sends the command built by `make` and waits for its reply.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| stepped_down())?;
        rx.await.map_err(|_| stepped_down())?
    }
}

fn stepped_down() -> ApiError {
    ApiError::Unavailable(
        "the serving controller stepped down while handling the request; retry to reach the new one"
            .into(),
    )
}

/// What the engine needs to run.
#[derive(Clone, Debug)]
pub struct Context {
    /// This controller's node.
    pub node: String,
    /// etcd client.
    pub client: Etcd,
    /// Fenced writer.
    pub writer: Writer,
    /// Agent clients.
    pub agents: AgentPool,
    /// Capacity policy.
    pub policy: Policy,
}

/// Loads the pair's state, finishes what a previous serving controller left half done, and
/// starts the engine task. Drop or abort the task to step down.
pub async fn start(ctx: Context) -> Result<(EngineHandle, tokio::task::JoinHandle<()>), ApiError> {
    let vms = store::load_vms(&ctx.client).await.map_err(store_error)?;
    let (tx, rx) = mpsc::channel(QUEUE);
    let (obs_tx, obs_rx) = mpsc::channel(4);
    let mut engine = Engine {
        vms: vms
            .into_iter()
            .map(|s| (s.value.uuid.clone(), Entry::new(s)))
            .collect(),
        members: BTreeMap::new(),
        nodes: BTreeMap::new(),
        waiters: HashMap::new(),
        observing: false,
        obs_tx,
        ctx,
    };
    let task = tokio::spawn(async move {
        engine.observe_now().await;
        engine.take_over().await;
        engine.run(rx, obs_rx).await;
    });
    Ok((EngineHandle { tx }, task))
}

fn store_error(e: store::Error) -> ApiError {
    match e {
        store::Error::NotLeader => stepped_down(),
        store::Error::NameTaken { name } => ApiError::AlreadyExists { name },
        other => ApiError::Unavailable(format!(
            "the pair's state store did not commit the change: {}",
            chain(&other)
        )),
    }
}

#[derive(Debug)]
struct Entry {
    record: VmRecord,
    revision: i64,
    /// When the engine last commanded this VM's domain; older agent reports are stale.
    last_command: Instant,
}

impl Entry {
    fn new(stored: Stored<VmRecord>) -> Entry {
        Entry {
            record: stored.value,
            revision: stored.revision,
            last_command: Instant::now(),
        }
    }
}

#[derive(Debug)]
struct NodeState {
    record: NodeRecord,
    /// `Some(domains)` if the agent answered the last poll.
    domains: Option<Vec<pb::DomainStatus>>,
}

/// One poll of every registered node's agent.
#[derive(Debug)]
struct Observation {
    started: Instant,
    /// `None` when etcd could not be read: keep what is known.
    view: Option<PairView>,
}

/// The pair's members (last known facts) and its live nodes with their agents' reports.
#[derive(Debug)]
struct PairView {
    members: Vec<NodeRecord>,
    nodes: Vec<NodeState>,
}

struct Engine {
    ctx: Context,
    vms: BTreeMap<String, Entry>,
    /// Every node of the pair with its last known facts, live or not.
    members: BTreeMap<String, NodeRecord>,
    /// The live nodes (registered under their controller's lease) and their agents' reports.
    nodes: BTreeMap<String, NodeState>,
    waiters: HashMap<String, Vec<Reply<VmRecord>>>,
    observing: bool,
    obs_tx: mpsc::Sender<Observation>,
}

impl Engine {
    async fn run(
        &mut self,
        mut commands: mpsc::Receiver<Command>,
        mut observations: mpsc::Receiver<Observation>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.handle(command).await,
                    None => return,
                },
                Some(observation) = observations.recv() => {
                    self.observing = false;
                    self.apply_observation(observation).await;
                }
                _ = tick.tick() => self.tick().await,
            }
        }
    }

    /// Feeds `Takeover` to every VM so half-done work is finished or rolled back.
    async fn take_over(&mut self) {
        let uuids: Vec<String> = self.vms.keys().cloned().collect();
        tracing::info!(node = %self.ctx.node, vms = uuids.len(), "takeover begin");
        for uuid in &uuids {
            if let Err(e) = self.drive(uuid, VmEvent::Takeover).await {
                tracing::warn!(vm = %uuid, node = %self.ctx.node, error = %e, "takeover of VM failed");
            }
        }
        tracing::info!(node = %self.ctx.node, vms = uuids.len(), "takeover end");
    }

    async fn tick(&mut self) {
        let now = crate::now_unix_ms();
        let stopping: Vec<String> = self
            .vms
            .iter()
            .filter(|(_, e)| matches!(e.record.state, VmState::Stopping { .. }))
            .map(|(uuid, _)| uuid.clone())
            .collect();
        for uuid in stopping {
            if let Err(e) = self.drive(&uuid, VmEvent::Tick { now_unix_ms: now }).await {
                tracing::warn!(vm = %uuid, error = %e, "deadline check failed");
            }
        }
        if !self.observing {
            self.observing = true;
            tokio::spawn(observe(
                self.ctx.client.clone(),
                self.ctx.agents.clone(),
                self.obs_tx.clone(),
            ));
        }
    }

    /// Polls the agents inline (used once, before takeover, so it starts from fresh facts).
    async fn observe_now(&mut self) {
        let (tx, mut rx) = mpsc::channel(1);
        observe(self.ctx.client.clone(), self.ctx.agents.clone(), tx).await;
        if let Some(observation) = rx.recv().await {
            self.apply_observation(observation).await;
        }
    }

    async fn apply_observation(&mut self, observation: Observation) {
        let Some(view) = observation.view else {
            return;
        };
        let mut events = Vec::new();
        for node in &view.nodes {
            let Some(domains) = &node.domains else {
                continue;
            };
            for (uuid, entry) in &self.vms {
                if entry.record.node != node.record.name || entry.last_command > observation.started
                {
                    continue;
                }
                let found = domains.iter().find(|d| &d.uuid == uuid);
                if let Some(event) = domain_event(found) {
                    events.push((uuid.clone(), event));
                }
            }
        }
        self.members = view
            .members
            .into_iter()
            .map(|m| (m.name.clone(), m))
            .collect();
        self.nodes = view
            .nodes
            .into_iter()
            .map(|n| (n.record.name.clone(), n))
            .collect();
        for (uuid, event) in events {
            if let Err(e) = self.drive(&uuid, event).await {
                tracing::warn!(vm = %uuid, error = %e, "applying agent report failed");
            }
        }
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Create { spec, reply } => {
                let result = self.create(spec).await;
                let _ = reply.send(result);
            }
            Command::Start { vm, reply } => {
                let result = self.start_vm(&vm).await;
                let _ = reply.send(result);
            }
            Command::Shutdown { vm, grace, reply } => {
                let deadline = crate::now_unix_ms()
                    .saturating_add(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX));
                self.stop_vm(
                    &vm,
                    VmEvent::Shutdown {
                        deadline_unix_ms: deadline,
                    },
                    reply,
                )
                .await;
            }
            Command::PowerOff { vm, reply } => self.stop_vm(&vm, VmEvent::PowerOff, reply).await,
            Command::Delete { vm, reply } => {
                let result = self.delete(&vm).await;
                let _ = reply.send(result);
            }
            Command::Modify { vm, change, reply } => {
                let result = self.modify(&vm, change).await;
                let _ = reply.send(result);
            }
            Command::Get { vm, reply } => {
                let _ = reply.send(self.find(&vm).map(|uuid| self.vms[&uuid].record.clone()));
            }
            Command::List { reply } => {
                let _ = reply.send(Ok(self.vms.values().map(|e| e.record.clone()).collect()));
            }
            Command::Nodes { reply } => {
                let _ = reply.send(Ok(self.nodes_view()));
            }
        }
    }

    /// The UUID of the VM named by `vm` (a name or a UUID).
    fn find(&self, vm: &str) -> Result<String, ApiError> {
        if self.vms.contains_key(vm) {
            return Ok(vm.to_string());
        }
        self.vms
            .iter()
            .find(|(_, e)| e.record.name == vm)
            .map(|(uuid, _)| uuid.clone())
            .ok_or_else(|| ApiError::NotFound { vm: vm.to_string() })
    }

    /// Every node of the pair with its last known facts: what validation and capacity count,
    /// so a node that is down still limits the pair (after a failover all VMs run on one).
    fn inventory(&self) -> Result<Inventory, ApiError> {
        if self.members.is_empty() {
            return Err(ApiError::Unavailable(
                "no node has registered yet; wait for the controllers and agents to start".into(),
            ));
        }
        if let Some(n) = self.members.values().find(|n| n.facts.cpus == 0) {
            return Err(ApiError::Unavailable(format!(
                "node {} has not reported its host facts yet; check its agent",
                n.name
            )));
        }
        Ok(Inventory {
            nodes: self
                .members
                .values()
                .map(|n| NodeInventory {
                    name: n.name.clone(),
                    facts: n.facts.clone(),
                })
                .collect(),
        })
    }

    /// The nodes of `inventory` whose agents answered the last poll: where a VM can go now.
    fn reachable(&self, inventory: &Inventory) -> Inventory {
        Inventory {
            nodes: inventory
                .nodes
                .iter()
                .filter(|n| self.nodes.get(&n.name).is_some_and(|s| s.domains.is_some()))
                .cloned()
                .collect(),
        }
    }

    fn nodes_view(&self) -> NodesView {
        let running = |node: &str| {
            let count = self
                .vms
                .values()
                .filter(|e| e.record.node == node && e.record.state == VmState::Running)
                .count();
            u32::try_from(count).unwrap_or(u32::MAX)
        };
        let inventory = self.inventory().unwrap_or_default();
        let nodes = self
            .members
            .values()
            .map(|member| {
                let live = self.nodes.get(&member.name);
                NodeView {
                    record: live.map_or_else(|| member.clone(), |n| n.record.clone()),
                    reachable: live.is_some_and(|n| n.domains.is_some()),
                    running_vms: running(&member.name),
                }
            })
            .collect();
        NodesView {
            nodes,
            serving: self.ctx.node.clone(),
            free: placement::free(
                &self.ctx.policy,
                &inventory,
                self.vms.values().map(|e| &e.record),
            ),
        }
    }

    fn agent_of(&self, node: &str) -> Result<Agent, ApiError> {
        let record = self.nodes.get(node).map(|n| &n.record).ok_or_else(|| {
            ApiError::Unavailable(format!(
                "node {node} is not registered: its controller is down or cut off; retry when it is back"
            ))
        })?;
        self.ctx
            .agents
            .get(node, &record.agent_address)
            .map_err(|e| ApiError::Internal(chain(&e)))
    }

    async fn create(&mut self, spec: VmSpec) -> Result<VmRecord, ApiError> {
        let inventory = self.inventory()?;
        validate::spec(&spec, &inventory)?;
        if self.vms.values().any(|e| e.record.name == spec.name) {
            return Err(ApiError::AlreadyExists { name: spec.name });
        }
        placement::check(
            &self.ctx.policy,
            &inventory,
            self.vms.values().map(|e| &e.record),
            &Candidate {
                mode: spec.mode,
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                new_disks: &spec.disks,
            },
        )?;
        let all: Vec<&VmRecord> = self.vms.values().map(|e| &e.record).collect();
        let node = placement::choose_node(&self.reachable(&inventory), &all).ok_or_else(|| {
            ApiError::Unavailable(
                "no node's agent answers right now, so the VM has nowhere to go; retry when a node is up"
                    .into(),
            )
        })?;
        let record = new_record(spec, node, crate::now_unix_ms());
        let uuid = record.uuid.clone();
        tracing::info!(vm = %record.name, uuid = %uuid, node = %record.node, mode = record.mode.as_str(), "create begin");
        let revision = match self.ctx.writer.create_vm(&record).await {
            Ok(revision) => revision,
            Err(e) => {
                let err = self.after_store_error(&uuid, e).await;
                if self.vms.contains_key(&uuid) {
                    // An attempt applied after all: roll back the unacknowledged create.
                    let _ = self.drive(&uuid, VmEvent::Delete).await;
                }
                return Err(err);
            }
        };
        self.vms.insert(
            uuid.clone(),
            Entry::new(Stored {
                value: record,
                revision,
            }),
        );
        if let Err(e) = self.provision(&uuid).await {
            tracing::warn!(vm = %uuid, error = %e, "create end: failed; rolling back");
            if let Err(rollback) = self.drive(&uuid, VmEvent::Delete).await {
                tracing::error!(vm = %uuid, error = %rollback, "rollback of failed create failed; it is retried at the next takeover");
            }
            return Err(e);
        }
        self.drive(&uuid, VmEvent::Provisioned).await?;
        let record = self.vms[&uuid].record.clone();
        tracing::info!(vm = %record.name, uuid = %uuid, node = %record.node, "create end: ok");
        Ok(record)
    }

    /// Creates the volumes and defines the domain of a VM being created.
    async fn provision(&mut self, uuid: &str) -> Result<(), ApiError> {
        let record = self.vms[uuid].record.clone();
        let agent = self.agent_of(&record.node)?;
        agent
            .create_volumes(&record)
            .await
            .map_err(ApiError::from)?;
        agent.define(&record).await.map_err(ApiError::from)?;
        Ok(())
    }

    async fn start_vm(&mut self, vm: &str) -> Result<VmRecord, ApiError> {
        let uuid = self.find(vm)?;
        self.drive(&uuid, VmEvent::Start).await?;
        let record = self.vms[&uuid].record.clone();
        match record.state {
            VmState::Running => Ok(record),
            _ => Err(ApiError::FailedPrecondition(format!(
                "VM {} did not start: {}",
                record.name, record.state_reason
            ))),
        }
    }

    /// Shuts down or powers off a VM; `reply` is answered once it is stopped.
    async fn stop_vm(&mut self, vm: &str, event: VmEvent, reply: Reply<VmRecord>) {
        let uuid = match self.find(vm) {
            Ok(uuid) => uuid,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        self.waiters.entry(uuid.clone()).or_default().push(reply);
        if let Err(e) = self.drive(&uuid, event).await {
            for waiter in self.waiters.remove(&uuid).unwrap_or_default() {
                let _ = waiter.send(Err(e.clone()));
            }
        }
        self.settle(&uuid);
    }

    async fn delete(&mut self, vm: &str) -> Result<String, ApiError> {
        let uuid = self.find(vm)?;
        self.drive(&uuid, VmEvent::Delete).await?;
        if self.vms.contains_key(&uuid) {
            return Err(ApiError::Internal(format!(
                "VM {vm} was not fully deleted; run vm-delete again"
            )));
        }
        Ok(uuid)
    }

    async fn modify(&mut self, vm: &str, change: Modify) -> Result<VmRecord, ApiError> {
        let uuid = self.find(vm)?;
        let entry = &self.vms[&uuid];
        let mut record = entry.record.clone();
        if record.state != VmState::Stopped {
            return Err(ApiError::FailedPrecondition(format!(
                "VM {} is {}; its mode, vCPUs and memory change only while it is stopped: shut it down first",
                record.name,
                record.state.name()
            )));
        }
        record.mode = change.mode.unwrap_or(record.mode);
        record.vcpus = change.vcpus.unwrap_or(record.vcpus);
        record.memory_mib = change.memory_mib.unwrap_or(record.memory_mib);
        validate::size(record.vcpus, record.memory_mib)?;
        let inventory = self.inventory()?;
        placement::check(
            &self.ctx.policy,
            &inventory,
            self.vms
                .values()
                .filter(|e| e.record.uuid != uuid)
                .map(|e| &e.record),
            &Candidate {
                mode: record.mode,
                vcpus: record.vcpus,
                memory_mib: record.memory_mib,
                new_disks: &[],
            },
        )?;
        record.updated_unix_ms = crate::now_unix_ms();
        let revision = match self.ctx.writer.update_vm(&record, entry.revision).await {
            Ok(revision) => revision,
            Err(e) => return Err(self.after_store_error(&uuid, e).await),
        };
        tracing::info!(vm = %record.name, mode = record.mode.as_str(), vcpus = record.vcpus, memory_mib = record.memory_mib, "VM modified");
        let entry = self
            .vms
            .get_mut(&uuid)
            .ok_or_else(|| ApiError::NotFound { vm: vm.into() })?;
        entry.record = record.clone();
        entry.revision = revision;
        Ok(record)
    }

    /// Applies `first` and the events its actions produce, persisting each new state before
    /// acting on it. Errors of the first event (e.g. a refused transition) are returned.
    async fn drive(&mut self, uuid: &str, first: VmEvent) -> Result<(), ApiError> {
        let mut queue = VecDeque::from([first]);
        let mut first_event = true;
        while let Some(event) = queue.pop_front() {
            let Some(entry) = self.vms.get(uuid) else {
                break;
            };
            let (name, node, from) = (
                entry.record.name.clone(),
                entry.record.node.clone(),
                entry.record.state,
            );
            let transition = match vm::transition(from, &event) {
                Ok(t) => t,
                Err(e) if first_event => {
                    return Err(ApiError::FailedPrecondition(format!("VM {name}: {e}")));
                }
                Err(e) => {
                    tracing::warn!(vm = %name, node = %node, error = %e, "ignoring follow-up event");
                    continue;
                }
            };
            first_event = false;
            if transition.state != from || transition.reason.is_some() {
                self.persist(uuid, transition.state, transition.reason.as_deref())
                    .await?;
                tracing::info!(vm = %name, node = %node, event = event.name(), from = from.name(), to = transition.state.name(), "VM state changed");
            }
            for action in transition.actions {
                match self.act(uuid, action).await {
                    // A failed start ends the actions: starting an old definition after a
                    // failed define would run what the user did not ask for.
                    Ok(Some(next @ VmEvent::StartFailed { .. })) => {
                        queue.push_back(next);
                        break;
                    }
                    Ok(Some(next)) => queue.push_back(next),
                    Ok(None) => {}
                    Err(e) => {
                        self.settle(uuid);
                        return Err(e);
                    }
                }
            }
            self.settle(uuid);
        }
        Ok(())
    }

    async fn persist(
        &mut self,
        uuid: &str,
        state: VmState,
        reason: Option<&str>,
    ) -> Result<(), ApiError> {
        let entry = self
            .vms
            .get(uuid)
            .ok_or_else(|| ApiError::NotFound { vm: uuid.into() })?;
        let mut record = entry.record.clone();
        record.state = state;
        if let Some(reason) = reason {
            record.state_reason = reason.to_string();
        }
        record.updated_unix_ms = crate::now_unix_ms();
        let revision = match self.ctx.writer.update_vm(&record, entry.revision).await {
            Ok(revision) => revision,
            Err(e) => return Err(self.after_store_error(uuid, e).await),
        };
        if let Some(entry) = self.vms.get_mut(uuid) {
            entry.record = record;
            entry.revision = revision;
        }
        Ok(())
    }

    /// Runs one action; returns the event its outcome produces, if any.
    async fn act(&mut self, uuid: &str, action: Action) -> Result<Option<VmEvent>, ApiError> {
        let Some(entry) = self.vms.get_mut(uuid) else {
            return Ok(None);
        };
        entry.last_command = Instant::now();
        let record = entry.record.clone();
        let (vm, node) = (record.name.as_str(), record.node.as_str());
        let op = action_name(action);
        if action == Action::RemoveRecord {
            let revision = entry.revision;
            if let Err(e) = self.ctx.writer.remove_vm(&record, revision).await {
                return Err(self.after_store_error(uuid, e).await);
            }
            self.vms.remove(uuid);
            tracing::info!(vm, node, "VM deleted");
            return Ok(None);
        }
        tracing::info!(vm, node, op, "begin");
        let outcome = match self.agent_of(node) {
            Err(e) => Err(e),
            Ok(agent) => match action {
                Action::DefineDomain => agent.define(&record).await.map(|_| None),
                Action::StartDomain => agent
                    .start(uuid)
                    .await
                    .map(|_| Some(VmEvent::StartSucceeded)),
                Action::AcpiShutdown => agent.shutdown(uuid).await.map(|_| None),
                Action::DestroyDomain => agent.destroy(uuid).await.map(|s| stopped_event(&s)),
                Action::UndefineDomain => agent.undefine(uuid).await.map(|()| None),
                Action::DeleteVolumes => agent.delete_volumes(&record).await.map(|()| None),
                Action::RemoveRecord => Ok(None),
            }
            .map_err(ApiError::from),
        };
        match outcome {
            Ok(next) => {
                tracing::info!(vm, node, op, "end: ok");
                Ok(next)
            }
            // A start that cannot proceed (define failed, agent unreachable) is a failed start.
            Err(e) if matches!(action, Action::DefineDomain | Action::StartDomain) => {
                tracing::warn!(vm, node, op, error = %e, "end: failed; the start fails");
                Ok(Some(VmEvent::StartFailed {
                    reason: e.to_string(),
                }))
            }
            // A lost ACPI press is not fatal: the grace deadline powers the VM off.
            Err(e) if action == Action::AcpiShutdown => {
                tracing::warn!(vm, node, op, error = %e, "end: failed; the VM is powered off at its deadline");
                Ok(None)
            }
            Err(e) => {
                tracing::warn!(vm, node, op, error = %e, "end: failed");
                Err(e)
            }
        }
    }

    /// After a failed write of VM `uuid`: unless this controller lost its role, re-reads the
    /// record, since an attempt may have applied (or another writer changed it), so the next
    /// write compares against what etcd holds. Returns the error for the caller.
    async fn after_store_error(&mut self, uuid: &str, e: store::Error) -> ApiError {
        if !matches!(e, store::Error::NotLeader) {
            match store::load_vm(&self.ctx.client, uuid).await {
                Ok(Some(stored)) => {
                    if let Some(entry) = self.vms.get_mut(uuid) {
                        entry.record = stored.value;
                        entry.revision = stored.revision;
                    } else {
                        self.vms.insert(uuid.to_string(), Entry::new(stored));
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

    /// Answers the shutdown/power-off waiters of a VM that has stopped or vanished.
    fn settle(&mut self, uuid: &str) {
        let result = match self.vms.get(uuid) {
            Some(e) if e.record.state == VmState::Stopped => Ok(e.record.clone()),
            Some(_) => return,
            None => Err(ApiError::NotFound { vm: uuid.into() }),
        };
        for waiter in self.waiters.remove(uuid).unwrap_or_default() {
            let _ = waiter.send(result.clone());
        }
    }
}

fn action_name(action: Action) -> &'static str {
    match action {
        Action::AcpiShutdown => "acpi-shutdown",
        Action::DeleteVolumes => "delete-volumes",
        Action::DefineDomain => "define",
        Action::DestroyDomain => "power-off",
        Action::RemoveRecord => "remove-record",
        Action::StartDomain => "start",
        Action::UndefineDomain => "undefine",
    }
}

/// The VM event an agent's report of a domain means, if any.
fn domain_event(found: Option<&pb::DomainStatus>) -> Option<VmEvent> {
    let Some(status) = found else {
        return Some(VmEvent::DomainStopped {
            reason: "undefined".into(),
        });
    };
    stopped_event(status).or(match status.state() {
        pb::DomainState::Running => Some(VmEvent::DomainRunning),
        _ => None,
    })
}

/// `DomainStopped` if `status` shows the domain stopped.
fn stopped_event(status: &pb::DomainStatus) -> Option<VmEvent> {
    match status.state() {
        pb::DomainState::Shutoff | pb::DomainState::Crashed | pb::DomainState::Undefined => {
            Some(VmEvent::DomainStopped {
                reason: status.reason.clone(),
            })
        }
        _ => None,
    }
}

/// Polls every registered node's agent and sends the result to the engine.
async fn observe(client: Etcd, agents: AgentPool, out: mpsc::Sender<Observation>) {
    let started = Instant::now();
    let read = async {
        let members = store::load_members(&client).await?;
        let nodes = store::load_nodes(&client).await?;
        Ok::<_, store::Error>((members, nodes))
    };
    let (members, records) = match read.await {
        Ok(read) => read,
        Err(e) => {
            tracing::warn!(error = %chain(&e), "reading the pair's nodes failed; keeping the last view");
            let _ = out
                .send(Observation {
                    started,
                    view: None,
                })
                .await;
            return;
        }
    };
    let polls = records.into_iter().map(|record| {
        let agents = agents.clone();
        async move {
            let domains = match agents.get(&record.name, &record.agent_address) {
                Ok(agent) => match agent.list_domains().await {
                    Ok(domains) => Some(domains),
                    Err(e) => {
                        tracing::debug!(node = %record.name, error = %e, "agent poll failed");
                        None
                    }
                },
                Err(_) => None,
            };
            NodeState { record, domains }
        }
    });
    let nodes = futures_join_all(polls).await;
    let view = PairView { members, nodes };
    let _ = out
        .send(Observation {
            started,
            view: Some(view),
        })
        .await;
}

/// Runs the futures concurrently and collects their outputs in order.
async fn futures_join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        if let Ok(output) = handle.await {
            outputs.push(output);
        }
    }
    outputs
}

/// A new VM record: fresh UUID, volume names and MACs, in state `Creating` on `node`.
fn new_record(spec: VmSpec, node: String, now_unix_ms: i64) -> VmRecord {
    let uuid = uuid::Uuid::new_v4().to_string();
    let disks = spec
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| Disk {
            size_bytes: d.size_bytes,
            storage_group: d.storage_group.clone(),
            format: d.format,
            volume: format!("{uuid}-disk{i}.{}", d.format.extension()),
        })
        .collect();
    let nics = spec
        .networks
        .iter()
        .map(|network| Nic {
            network: network.clone(),
            mac: random_mac(),
        })
        .collect();
    VmRecord {
        uuid,
        name: spec.name,
        mode: spec.mode,
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        disks,
        nics,
        boot: spec.boot,
        node,
        state: VmState::Creating,
        state_reason: "creating".into(),
        created_unix_ms: now_unix_ms,
        updated_unix_ms: now_unix_ms,
    }
}

/// A random locally administered MAC in QEMU's 52:54:00 range.
fn random_mac() -> String {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        bytes[0], bytes[1], bytes[2]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Boot, DiskFormat, DiskRequest};

    fn spec() -> VmSpec {
        VmSpec {
            name: "web".into(),
            mode: Mode::Ha,
            vcpus: 1,
            memory_mib: 256,
            disks: vec![
                DiskRequest {
                    size_bytes: 1 << 20,
                    storage_group: "sg0".into(),
                    format: DiskFormat::Raw,
                },
                DiskRequest {
                    size_bytes: 2 << 20,
                    storage_group: "sg0".into(),
                    format: DiskFormat::Qcow2,
                },
            ],
            networks: vec!["business".into()],
            boot: Boot::Kernel {
                image: "tiny".into(),
            },
        }
    }

    #[test]
    fn new_record_names_volumes_after_uuid_and_index() {
        let record = new_record(spec(), "n0".into(), 7);

        assert_eq!(
            record.disks[1].volume,
            format!("{}-disk1.qcow2", record.uuid)
        );
        assert_eq!(record.state, VmState::Creating);
    }

    #[test]
    fn new_record_gives_each_nic_a_qemu_mac() {
        let record = new_record(spec(), "n0".into(), 7);

        assert!(record.nics[0].mac.starts_with("52:54:00:"));
        assert_eq!(record.nics[0].mac.len(), 17);
    }

    #[test]
    fn domain_event_missing_domain_is_stopped() {
        let event = domain_event(None);

        assert_eq!(
            event,
            Some(VmEvent::DomainStopped {
                reason: "undefined".into()
            })
        );
    }

    #[test]
    fn domain_event_running_domain_is_running() {
        let status = pb::DomainStatus {
            state: pb::DomainState::Running.into(),
            ..Default::default()
        };

        let event = domain_event(Some(&status));

        assert_eq!(event, Some(VmEvent::DomainRunning));
    }

    #[test]
    fn domain_event_paused_domain_means_nothing() {
        let status = pb::DomainStatus {
            state: pb::DomainState::Paused.into(),
            ..Default::default()
        };

        let event = domain_event(Some(&status));

        assert_eq!(event, None);
    }
}
