//! The engine actor: owns the pair's state, takes commands, agent outcomes and observations
//! one at a time, and publishes a snapshot after each.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use super::effects::{Batch, Done, Waiter};
use super::fencing::{FenceDone, Fences};
use super::observe::{self, DomainsPoll, HealthPoll};
use super::view::{self, FtRuntime, NodeView, NodesView, Snapshot};
use super::{Command, Context, Reply};
use crate::error::{ApiError, chain};
use crate::ft::FtPhase;
use crate::health;
use crate::model::{IsoRecord, NodeRecord, VmRecord, VmState};
use crate::placement;
use crate::store::{self, Alert, RequestRecord, Stored};
use crate::vm::VmEvent;

/// How often deadlines are checked and domains polled.
const TICK: Duration = Duration::from_secs(1);
/// How often host health is polled (heartbeats go every 100 ms).
const HEALTH_TICK: Duration = Duration::from_millis(200);
/// TTL of the lease request records expire with.
const REQUEST_LEASE_TTL: i64 = 600;
/// A fresh request lease is granted this often, so records live 5 to 10 minutes.
const REQUEST_LEASE_RENEW: Duration = Duration::from_secs(300);
/// Time for one attempt at a fresh request lease (the actor waits on it; the old lease still
/// serves for minutes).
const REQUEST_LEASE_BUDGET: Duration = Duration::from_secs(2);
/// How long a removal is remembered: longer than any domain poll takes.
const REMOVAL_MEMORY: Duration = Duration::from_secs(60);
/// How often etcd's alarms are checked (a full space quota makes the pair read-only).
const ALARM_CHECK: Duration = Duration::from_secs(10);

/// Something the engine's own tasks report.
#[derive(Debug)]
pub(super) enum Internal {
    /// A VM's agent calls finished.
    Effect(Done),
    /// The agents' domain lists.
    Domains(DomainsPoll),
    /// The agents' heartbeat reports.
    Health(HealthPoll),
    /// A lost host's fence ended.
    Fence(FenceDone),
    /// An alarm check ended: the members that hit etcd's space quota (none: all is well) and
    /// how reclaiming the space went.
    SpaceAlarm {
        /// The members that raised the alarm.
        members: Vec<u64>,
        /// The reclaim's outcome.
        reclaimed: Result<(), String>,
    },
    /// An agent answered a snapshot operation.
    Snapshot(super::snapshots::SnapshotDone),
    /// An ISO's copies were deleted from the hosts (or some could not be).
    IsoRemoved {
        /// The ISO.
        name: String,
        /// The outcome.
        result: Result<(), String>,
        /// The caller waiting for it, if any.
        reply: Option<Reply<()>>,
    },
}

/// A VM and what the engine does with it.
#[derive(Debug)]
pub(super) struct Entry {
    pub record: VmRecord,
    pub revision: i64,
    /// When the engine last commanded this VM's domain; older agent reports are stale.
    pub last_command: Instant,
    /// Whether a batch of agent calls runs for it.
    pub busy: bool,
    /// Batches waiting for the running one.
    pub queued: VecDeque<Batch>,
}

impl Entry {
    pub fn new(stored: Stored<VmRecord>) -> Entry {
        Entry {
            record: stored.value,
            revision: stored.revision,
            last_command: Instant::now(),
            busy: false,
            queued: VecDeque::new(),
        }
    }
}

/// The engine's state.
pub(super) struct Engine {
    pub ctx: Context,
    pub vms: BTreeMap<String, Entry>,
    /// Every node of the pair with its last known record, live or not.
    pub members: BTreeMap<String, NodeRecord>,
    /// Live host registrations (their agents' leases hold).
    pub registered: BTreeMap<String, NodeRecord>,
    /// Registered controllers: node → API address.
    pub controllers: BTreeMap<String, String>,
    /// Host health by node.
    pub hosts: BTreeMap<String, health::Host>,
    /// The last health poll, for the view.
    pub last_health: Option<HealthPoll>,
    /// The VMs' stale marks (mark, mod revision), as the last domain poll read them.
    pub marks: BTreeMap<String, (daemon::pair::StaleMark, i64)>,
    /// Lost hosts and their fences.
    pub fences: Fences,
    /// FT VMs' checkpointing as their primaries report it, by UUID (memory only).
    pub ft: BTreeMap<String, FtRuntime>,
    /// FT VMs' phases as last logged, by UUID.
    pub ft_phases: BTreeMap<String, Option<FtPhase>>,
    /// Mirrored VMs' disk writes as their hosts last reported them, by UUID (memory only).
    pub disk_writes: BTreeMap<String, Vec<proto::agent::DiskWrites>>,
    pub health_config: health::Config,
    pub alerts: BTreeMap<String, Alert>,
    /// The ISO library, by name.
    pub isos: BTreeMap<String, IsoRecord>,
    /// VMs with a snapshot operation running, by UUID.
    pub snapshotting: BTreeSet<String>,
    /// Applied requests by ID, with when they were learned (forgotten after their lease).
    pub requests: HashMap<String, (RequestRecord, Instant)>,
    /// VMs removed lately: a domain report taken before a removal is not an unknown domain.
    pub removed: HashMap<String, Instant>,
    pub request_lease: (i64, Instant),
    pub waiters: HashMap<String, Vec<Waiter>>,
    pub internal: mpsc::Sender<Internal>,
    pub polling_domains: bool,
    pub polling_health: bool,
    last_alarm_check: Instant,
    checking_alarms: bool,
    /// Every task the engine starts (agent calls, polls, maintenance): aborted with the engine,
    /// so nothing it started acts after a step-down.
    pub tasks: JoinSet<()>,
    /// Set when an agent refused our term: another controller serves; step down.
    pub fenced: bool,
    pub started: Instant,
    snapshot: watch::Sender<Arc<Snapshot>>,
    internal_rx: Option<mpsc::Receiver<Internal>>,
}

fn store_error(e: store::Error) -> ApiError {
    super::effects::store_error(e)
}

impl Engine {
    /// Loads the pair's state from etcd.
    pub async fn load(ctx: Context) -> Result<(Engine, watch::Receiver<Arc<Snapshot>>), ApiError> {
        let client = &ctx.client;
        let vms = store::load_vms(client).await.map_err(store_error)?;
        let members = store::load_members(client).await.map_err(store_error)?;
        let alerts = store::load_alerts(client).await.map_err(store_error)?;
        let isos = store::load_isos(client).await.map_err(store_error)?;
        let requests = store::load_requests(client).await.map_err(store_error)?;
        let health_config = store::load_health_config(client)
            .await
            .map_err(store_error)?;
        let (lease, _) = daemon::lease::grant(client, REQUEST_LEASE_TTL, store::REQUEST_BUDGET)
            .await
            .map_err(|e| ApiError::Unavailable(chain(&e)))?;
        let (internal, internal_rx) = mpsc::channel(64);
        let (snapshot, rx) = watch::channel(Arc::new(Snapshot::default()));
        let mut engine = Engine {
            vms: vms
                .into_iter()
                .map(|s| (s.value.uuid.clone(), Entry::new(s)))
                .collect(),
            members: members.into_iter().map(|m| (m.name.clone(), m)).collect(),
            // Filled from the registrations' watch before the takeover (`run`).
            registered: BTreeMap::new(),
            controllers: BTreeMap::new(),
            hosts: BTreeMap::new(),
            last_health: None,
            marks: BTreeMap::new(),
            fences: Fences::default(),
            ft: BTreeMap::new(),
            ft_phases: BTreeMap::new(),
            disk_writes: BTreeMap::new(),
            health_config,
            alerts: alerts.into_iter().map(|a| (a.id.clone(), a)).collect(),
            isos: isos.into_iter().map(|i| (i.name.clone(), i)).collect(),
            snapshotting: BTreeSet::new(),
            requests: requests
                .into_iter()
                .map(|(id, record)| (id, (record, Instant::now())))
                .collect(),
            removed: HashMap::new(),
            request_lease: (lease, Instant::now()),
            waiters: HashMap::new(),
            internal,
            polling_domains: false,
            polling_health: false,
            last_alarm_check: Instant::now(),
            checking_alarms: false,
            tasks: JoinSet::new(),
            fenced: false,
            started: Instant::now(),
            snapshot,
            internal_rx: Some(internal_rx),
            ctx,
        };
        engine.track_ft(false);
        engine.publish();
        Ok((engine, rx))
    }

    /// Runs until the command channel closes or an agent refuses our term.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let Some(mut internal) = self.internal_rx.take() else {
            return;
        };
        let mut registrations = observe::watch_registrations(self.ctx.client.clone());
        let first = match registrations.wait_for(|r| r.nodes.is_some()).await {
            Ok(first) => first.clone(),
            Err(_) => return,
        };
        self.registrations_changed(first).await;
        self.take_over().await;
        self.track_ft(true);
        self.publish();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut health_tick = tokio::time::interval(HEALTH_TICK);
        health_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.handle(command).await,
                    None => return,
                },
                Some(message) = internal.recv() => self.internal(message).await,
                Ok(()) = registrations.changed() => {
                    let latest = registrations.borrow_and_update().clone();
                    self.registrations_changed(latest).await;
                }
                _ = tick.tick() => self.tick().await,
                _ = health_tick.tick() => self.poll_health(),
            }
            if self.fenced {
                self.step_down_fenced();
                return;
            }
            self.track_ft(true);
            self.publish();
        }
    }

    /// Feeds `Takeover` to every VM so half-done work is finished or rolled back.
    async fn take_over(&mut self) {
        let uuids: Vec<String> = self.vms.keys().cloned().collect();
        tracing::info!(node = %self.ctx.node, vms = uuids.len(), term = self.ctx.writer.term(), "takeover begin");
        let owned = match store::load_owners(&self.ctx.client).await {
            Ok(owned) => owned,
            Err(e) => {
                tracing::warn!(node = %self.ctx.node, error = %chain(&e), "reading the VMs' owner generations failed; writing each VM's if missing");
                BTreeSet::new()
            }
        };
        let unowned = self
            .vms
            .values()
            .filter(|e| !owned.contains(&e.record.uuid));
        for entry in unowned {
            if let Err(e) = self.ctx.writer.claim_owner(&entry.record).await {
                tracing::warn!(vm = %entry.record.name, node = %self.ctx.node, error = %chain(&e), "writing the VM's owner generation failed; its stale marks wait until its record is written again");
            }
        }
        for uuid in &uuids {
            if let Err(e) = self.drive(uuid, VmEvent::Takeover, None).await {
                tracing::warn!(vm = %uuid, node = %self.ctx.node, error = %e, "takeover of VM failed");
            }
        }
        self.resume_isos().await;
        self.resume_snapshots().await;
        tracing::info!(node = %self.ctx.node, vms = uuids.len(), "takeover end: ok");
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Create {
                spec,
                request,
                reply,
            } => self.create(spec, request, reply).await,
            Command::Start { vm, request, reply } => self.start_vm(&vm, request, reply).await,
            Command::Shutdown {
                vm,
                grace,
                request,
                reply,
            } => {
                let deadline = crate::now_unix_ms()
                    .saturating_add(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX));
                let event = VmEvent::Shutdown {
                    deadline_unix_ms: deadline,
                };
                self.stop_vm(&vm, event, request, reply).await;
            }
            Command::PowerOff { vm, request, reply } => {
                self.stop_vm(&vm, VmEvent::PowerOff, request, reply).await;
            }
            Command::Delete { vm, request, reply } => self.delete(&vm, request, reply).await,
            Command::Modify {
                vm,
                change,
                request,
                reply,
            } => {
                let result = self.modify(&vm, change, request).await;
                let _ = reply.send(result);
            }
            Command::IsoBegin { header, reply } => {
                let _ = reply.send(self.iso_begin(header).await);
            }
            Command::IsoFinish {
                name,
                outcome,
                reply,
            } => {
                let _ = reply.send(self.iso_finish(&name, outcome).await);
            }
            Command::IsoDelete { name, reply } => self.iso_delete(&name, reply).await,
            Command::SnapshotCreate {
                vm,
                description,
                consistency,
                request,
                reply,
            } => {
                self.snapshot_create(&vm, &description, consistency, request, reply)
                    .await;
            }
            Command::SnapshotDelete { vm, id, reply } => {
                self.snapshot_delete(&vm, &id, reply).await;
            }
            Command::SnapshotRestore { vm, id, reply } => {
                self.snapshot_restore(&vm, &id, reply).await;
            }
            Command::ExportBegin {
                vm,
                snapshot,
                reply,
            } => {
                let _ = reply.send(self.export_begin(&vm, snapshot));
            }
            Command::ImportBegin { spec, reply } => {
                let _ = reply.send(self.import_begin(spec).await);
            }
            Command::ImportFinish {
                uuid,
                outcome,
                reply,
            } => self.import_finish(&uuid, outcome, reply).await,
            Command::ExportEnd { uuid, reply } => {
                self.snapshotting.remove(&uuid);
                let _ = reply.send(Ok(()));
            }
            Command::ClearAlert { id, by, reply } => {
                let result = self.clear_by_admin(&id, &by).await;
                let _ = reply.send(result);
            }
            Command::SetHealthConfig { config, reply } => {
                let result = self.set_health_config(config).await;
                let _ = reply.send(result);
            }
        }
    }

    async fn internal(&mut self, message: Internal) {
        match message {
            Internal::Effect(done) => self.effect_done(done).await,
            Internal::Domains(poll) => {
                self.polling_domains = false;
                self.apply_domains(poll).await;
            }
            Internal::Health(poll) => {
                self.polling_health = false;
                self.apply_health(poll).await;
            }
            Internal::Fence(done) => self.fence_done(done).await,
            Internal::Snapshot(done) => self.snapshot_done(done).await,
            Internal::IsoRemoved {
                name,
                result,
                reply,
            } => self.iso_removed(name, result, reply).await,
            Internal::SpaceAlarm { members, reclaimed } => {
                self.checking_alarms = false;
                if !members.is_empty() {
                    self.space_alarm(&members, reclaimed).await;
                }
            }
        }
    }

    /// Checks etcd's alarms in the background, reclaiming space after a NOSPACE alarm.
    fn check_alarms(&mut self) {
        if self.checking_alarms || self.last_alarm_check.elapsed() < ALARM_CHECK {
            return;
        }
        self.last_alarm_check = Instant::now();
        self.checking_alarms = true;
        let (etcd, out, node) = (
            self.ctx.client.clone(),
            self.internal.clone(),
            self.ctx.node.clone(),
        );
        self.tasks.spawn(async move {
            let members = match etcd.space_alarms().await {
                Ok(members) => members,
                Err(e) => {
                    tracing::debug!(error = %chain(&e), "reading etcd's alarms failed");
                    Vec::new()
                }
            };
            if members.is_empty() {
                let _ = out
                    .send(Internal::SpaceAlarm {
                        members,
                        reclaimed: Ok(()),
                    })
                    .await;
                return;
            }
            tracing::error!(
                node,
                ?members,
                "reclaim begin: etcd reached its space quota and refuses writes; compacting and defragmenting"
            );
            let reclaimed = etcd.reclaim_space(&members).await.map_err(|e| chain(&e));
            match &reclaimed {
                Ok(()) => tracing::warn!(node, "reclaim end: ok, etcd accepts writes again"),
                Err(e) => {
                    tracing::error!(node, error = %e, "reclaim end: failed; etcd stays read-only: defragment it and disarm the alarm by hand")
                }
            }
            let _ = out.send(Internal::SpaceAlarm { members, reclaimed }).await;
        });
    }

    /// Reports a space-quota alarm as an alert (an event), once etcd takes writes again.
    async fn space_alarm(&mut self, members: &[u64], reclaimed: Result<(), String>) {
        let members: Vec<String> = members.iter().map(|m| format!("{m:x}")).collect();
        let message = match reclaimed {
            Ok(()) => format!(
                "etcd reached its space quota (members {}) and refused writes; history was compacted and the members defragmented: raise --quota-backend-bytes if it recurs",
                members.join(", ")
            ),
            Err(e) => format!(
                "etcd reached its space quota (members {}) and refuses writes; reclaiming failed ({e}): run etcdctl defrag and etcdctl alarm disarm",
                members.join(", ")
            ),
        };
        self.raise("etcd/space", "", "", message).await;
    }

    async fn tick(&mut self) {
        let now = crate::now_unix_ms();
        let stopping: Vec<String> = self
            .vms
            .iter()
            .filter(|(_, e)| matches!(e.record.state, VmState::Stopping { forced: false, .. }))
            .map(|(uuid, _)| uuid.clone())
            .collect();
        for uuid in stopping {
            if let Err(e) = self
                .drive(&uuid, VmEvent::Tick { now_unix_ms: now }, None)
                .await
            {
                tracing::warn!(vm = %uuid, error = %e, "deadline check failed");
            }
        }
        while self.tasks.try_join_next().is_some() {}
        self.forget_old();
        self.renew_request_lease().await;
        self.check_alarms();
        self.poll_domains();
    }

    /// Forgets request IDs whose records have expired and removals no report can predate.
    fn forget_old(&mut self) {
        let request_life = Duration::from_secs(REQUEST_LEASE_TTL.unsigned_abs());
        self.requests
            .retain(|_, (_, learned)| learned.elapsed() < request_life);
        self.removed
            .retain(|_, removed| removed.elapsed() < REMOVAL_MEMORY);
    }

    /// Grants a fresh lease for request records every few minutes (each record lives 5 to
    /// 10 minutes: long enough for any retry).
    async fn renew_request_lease(&mut self) {
        if self.request_lease.1.elapsed() < REQUEST_LEASE_RENEW {
            return;
        }
        match daemon::lease::grant(&self.ctx.client, REQUEST_LEASE_TTL, REQUEST_LEASE_BUDGET).await
        {
            Ok((lease, _)) => self.request_lease = (lease, Instant::now()),
            Err(e) => {
                tracing::warn!(error = %chain(&e), "granting a request lease failed; keeping the old one")
            }
        }
    }

    async fn set_health_config(
        &mut self,
        config: health::Config,
    ) -> Result<health::Config, ApiError> {
        config
            .check()
            .map_err(|e| ApiError::invalid("health_config", e.to_string()))?;
        if let Err(e) = self.ctx.writer.put_health_config(&config).await {
            self.note_store_error(&e);
            return Err(store_error(e));
        }
        tracing::info!(
            path_timeout_ms = config.path_timeout_ms,
            lost_confirm_ms = config.lost_confirm_ms,
            "health configuration changed"
        );
        self.health_config = config;
        Ok(config)
    }

    /// An agent refused our term, or a fenced write found our election key gone: another
    /// controller may serve. The engine stops; `serving` then gives the role up.
    fn step_down_fenced(&self) {
        tracing::error!(node = %self.ctx.node, term = self.ctx.writer.term(), "step-down begin: fenced (an agent refused this controller's term, or its election key is gone)");
    }

    /// Every node of the pair with its last known facts: what validation and capacity count,
    /// so a node that is down still limits the pair (after a failover all VMs run on one).
    pub fn inventory(&self) -> Result<placement::Inventory, ApiError> {
        if self.members.is_empty() {
            return Err(ApiError::Unavailable(
                "no host has registered yet; wait for the agents to start".into(),
            ));
        }
        if let Some(n) = self.members.values().find(|n| n.facts.cpus == 0) {
            return Err(ApiError::Unavailable(format!(
                "node {} has not reported its host facts yet; check its agent",
                n.name
            )));
        }
        Ok(placement::Inventory {
            nodes: self
                .members
                .values()
                .map(|n| placement::NodeInventory {
                    name: n.name.clone(),
                    facts: n.facts.clone(),
                })
                .collect(),
        })
    }

    /// The UUID of the VM named by `vm` (a name or a UUID).
    pub fn find(&self, vm: &str) -> Result<String, ApiError> {
        if self.vms.contains_key(vm) {
            return Ok(vm.to_string());
        }
        self.vms
            .iter()
            .find(|(_, e)| e.record.name == vm)
            .map(|(uuid, _)| uuid.clone())
            .ok_or_else(|| ApiError::NotFound { vm: vm.to_string() })
    }

    /// Publishes the current state for reads.
    fn publish(&self) {
        let snapshot = Snapshot {
            vms: self
                .vms
                .iter()
                .map(|(uuid, e)| (uuid.clone(), e.record.clone()))
                .collect(),
            ft: self.ft.clone(),
            disk_writes: self.disk_writes.clone(),
            nodes: self.nodes_view(),
            alerts: self.alerts.clone(),
            isos: self.isos.clone(),
            health_config: self.health_config,
        };
        self.snapshot.send_replace(Arc::new(snapshot));
    }

    fn nodes_view(&self) -> NodesView {
        let inventory = self.inventory().unwrap_or_default();
        let nodes = self
            .members
            .values()
            .map(|member| {
                let host = self.hosts.get(&member.name).cloned().unwrap_or_default();
                NodeView {
                    record: self
                        .registered
                        .get(&member.name)
                        .cloned()
                        .unwrap_or_else(|| member.clone()),
                    health: host.state,
                    health_reason: host.reason,
                    lease_alive: self.registered.contains_key(&member.name),
                    agent_up: self
                        .last_health
                        .as_ref()
                        .is_some_and(|p| p.answered(&member.name)),
                    controller_up: self.controllers.contains_key(&member.name),
                    api_address: self
                        .controllers
                        .get(&member.name)
                        .cloned()
                        .unwrap_or_default(),
                    paths: self.path_views(&member.name),
                    alinks: self
                        .last_health
                        .as_ref()
                        .map(|p| p.alinks_of(&member.name))
                        .unwrap_or_default(),
                    running_vms: view::running_on(
                        self.vms.values().map(|e| &e.record),
                        &member.name,
                    ),
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
}
