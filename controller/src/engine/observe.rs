//! Observation and reconciliation: what etcd and the agents report, turned into host health,
//! VM events and alerts.
//!
//! - Registrations (`nodes/`, bound to each agent's host lease, and `controllers/`) are
//!   watched: a host lease that expires shows at once.
//! - Every 200 ms both agents are asked what they hear of their peer on each heartbeat path;
//!   with the registrations and this controller's own quorum that is one
//!   [`health::Observation`] per host, stepped through [`health::step`].
//! - Every second both agents list their domains. Per VM recorded on a host that is not lost,
//!   the report becomes a VM event; a report older than the engine's last command to that VM
//!   is dropped. A domain no VM record claims, one running on the other host than its VM's
//!   record says, or one running under a stopped VM raises an alert and is never adopted.

use std::collections::BTreeMap;

use daemon::etcd::{Etcd, WatchSpec, Watched};
use daemon::lease::LeaseStatus;
use daemon::pair::{NodeRecord, StaleMark};
use proto::agent as pb;
use tokio::sync::watch;
use tokio::time::Instant;

use super::actor::{Engine, Internal};
use super::effects::stopped_event;
use super::fencing::held;
use super::view::{AlinkView, PathView};
use crate::error::chain;
use crate::health::{self, HostState, Observation, PathHeard};
use crate::model::{Intent, VmState};
use crate::store::{self, CONTROLLERS, ControllerRecord, NODES};
use crate::vm::VmEvent;

/// A VM left `Deleting` by a removal that failed is tried again after this long.
const REMOVAL_RETRY: std::time::Duration = std::time::Duration::from_secs(10);
/// Pause before reloading the registrations after a failed read.
const RELOAD: std::time::Duration = std::time::Duration::from_millis(500);

/// The live registrations: hosts (agents' leases) and controllers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Registrations {
    /// Host registrations by node, once loaded.
    pub nodes: Option<BTreeMap<String, NodeRecord>>,
    /// Registered controllers: node → API address.
    pub controllers: BTreeMap<String, String>,
}

/// One poll of every member's domains.
#[derive(Debug)]
pub(crate) struct DomainsPoll {
    pub(super) started: Instant,
    /// Per node: its domains, or `None` if its agent did not answer.
    nodes: BTreeMap<String, Option<Vec<pb::DomainStatus>>>,
    /// The stale marks, read before the domains (`None` if etcd did not answer): a mark
    /// written after a mirror was listed ready is never missed.
    pub(super) marks: Option<BTreeMap<String, (StaleMark, i64)>>,
}

impl DomainsPoll {
    /// What `node`'s agent reported of domain `uuid`, if it answered and has it.
    pub(super) fn domain(&self, node: &str, uuid: &str) -> Option<&pb::DomainStatus> {
        self.nodes
            .get(node)?
            .as_ref()?
            .iter()
            .find(|d| d.uuid == uuid)
    }

    /// Whether `node`'s agent answered this poll.
    pub(super) fn answered(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(Option::is_some)
    }
}

/// One poll of every member's heartbeat report.
#[derive(Debug)]
pub(crate) struct HealthPoll {
    now_ms: u64,
    /// Per node: its agent's report, or `None` if it did not answer.
    reports: BTreeMap<String, Option<pb::PeerHealth>>,
    /// Whether this controller's lease is confirmed (it holds quorum).
    quorum: bool,
}

impl HealthPoll {
    /// Whether `node`'s agent answered this poll.
    pub fn answered(&self, node: &str) -> bool {
        self.reports.get(node).is_some_and(Option::is_some)
    }

    /// `node`'s side of each A-Link, from its own report (none if it did not answer).
    pub fn alinks_of(&self, node: &str) -> Vec<AlinkView> {
        let Some(Some(report)) = self.reports.get(node) else {
            return Vec::new();
        };
        report
            .alinks
            .iter()
            .map(|l| AlinkView {
                name: format!("alink{}", l.index.saturating_add(1)),
                up: l.up,
                bytes_sent: l.bytes_sent,
                bytes_received: l.bytes_received,
                retransmits: l.retransmits,
                rtt_us: l.rtt_us,
            })
            .collect()
    }

    /// What the host other than `node` hears of it on each path; `None` if that host's agent
    /// did not answer (or there is no other host).
    fn heard_of(&self, node: &str) -> Option<Vec<PathHeard>> {
        let (_, report) = self.reports.iter().find(|(name, _)| *name != node)?;
        let report = report.as_ref()?;
        Some(
            report
                .paths
                .iter()
                .map(|p| PathHeard {
                    name: p.name.clone(),
                    since_ms: p.heard.then_some(p.ms_since_heard),
                })
                .collect(),
        )
    }
}

/// Watches the registrations; the receiver sees each change (nothing until the first load).
pub(crate) fn watch_registrations(etcd: Etcd) -> watch::Receiver<Registrations> {
    let (tx, rx) = watch::channel(Registrations::default());
    tokio::spawn(follow_registrations(etcd, tx));
    rx
}

async fn follow_registrations(etcd: Etcd, out: watch::Sender<Registrations>) {
    loop {
        let loaded = async {
            let (nodes, revision) = store::load_prefix_at::<NodeRecord>(&etcd, NODES).await?;
            let controllers = store::load_controllers(&etcd).await?;
            Ok::<_, store::Error>((nodes, controllers, revision))
        };
        let (nodes, controllers, revision) = match loaded.await {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::warn!(error = %chain(&e), "loading registrations failed; retrying");
                tokio::time::sleep(RELOAD).await;
                continue;
            }
        };
        let mut current = Registrations {
            nodes: Some(
                nodes
                    .into_iter()
                    .map(|s| (s.value.name.clone(), s.value))
                    .collect(),
            ),
            controllers: controllers
                .into_iter()
                .map(|c| (c.name, c.api_address))
                .collect(),
        };
        out.send_replace(current.clone());
        // From the nodes' read revision on: the controllers, read later, may see changes
        // again, which converge to the same state when applied in order.
        let mut changes = etcd.watch(WatchSpec {
            key: store::PREFIX.to_string(),
            prefix: true,
            start_revision: revision + 1,
        });
        loop {
            let watched = tokio::select! {
                watched = changes.recv() => watched,
                () = out.closed() => return,
            };
            let Some(Watched::Events(events)) = watched else {
                break;
            };
            if apply_registrations(&mut current, &events) {
                out.send_replace(current.clone());
            }
        }
        tokio::time::sleep(RELOAD).await;
    }
}

/// Applies watched changes of registration keys to `current`; whether anything changed.
fn apply_registrations(current: &mut Registrations, events: &[etcd_client::Event]) -> bool {
    let mut changed = false;
    for event in events {
        let Some(kv) = event.kv() else { continue };
        let key = String::from_utf8_lossy(kv.key());
        let put = matches!(event.event_type(), etcd_client::EventType::Put);
        if let Some(name) = key.strip_prefix(NODES) {
            let nodes = current.nodes.get_or_insert_with(BTreeMap::new);
            match (put, serde_json::from_slice::<NodeRecord>(kv.value())) {
                (true, Ok(record)) => {
                    nodes.insert(name.to_string(), record);
                }
                (true, Err(_)) => continue,
                (false, _) => {
                    nodes.remove(name);
                }
            }
            changed = true;
        } else if let Some(name) = key.strip_prefix(CONTROLLERS) {
            match (put, serde_json::from_slice::<ControllerRecord>(kv.value())) {
                (true, Ok(record)) => {
                    current
                        .controllers
                        .insert(name.to_string(), record.api_address);
                }
                (true, Err(_)) => continue,
                (false, _) => {
                    current.controllers.remove(name);
                }
            }
            changed = true;
        }
    }
    changed
}

impl Engine {
    /// Takes the latest registrations: live hosts (also the pair's members) and controllers.
    /// A registration that went away (a host's or a controller's lease expired; a host is
    /// lost only once both have) is judged at once, with the last heartbeat poll, rather than
    /// at the next poll.
    pub(super) async fn registrations_changed(&mut self, latest: Registrations) {
        let controller_gone = self
            .controllers
            .keys()
            .any(|name| !latest.controllers.contains_key(name));
        self.controllers = latest.controllers;
        let Some(nodes) = latest.nodes else {
            return;
        };
        for (name, record) in &nodes {
            self.members.insert(name.clone(), record.clone());
        }
        let gone = controller_gone || self.registered.keys().any(|name| !nodes.contains_key(name));
        self.registered = nodes;
        if gone && let Some(mut poll) = self.last_health.take() {
            poll.now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.apply_health(poll).await;
        }
    }

    /// Starts a poll of every member's domains, unless one runs.
    pub(super) fn poll_domains(&mut self) {
        if self.polling_domains {
            return;
        }
        self.polling_domains = true;
        let agents: Vec<_> = self
            .members
            .keys()
            .map(|name| (name.clone(), self.agent_of(name).ok()))
            .collect();
        let out = self.internal.clone();
        let etcd = self.ctx.client.clone();
        self.tasks.spawn(async move {
            let started = Instant::now();
            let marks = match store::load_marks(&etcd).await {
                Ok(marks) => Some(marks),
                Err(e) => {
                    tracing::warn!(error = %chain(&e), "reading stale marks failed; keeping the last ones");
                    None
                }
            };
            let polls = agents.into_iter().map(|(name, agent)| async move {
                let domains = match agent {
                    Some(agent) => agent.list_domains().await.ok(),
                    None => None,
                };
                (name, domains)
            });
            let nodes = join_all(polls).await.into_iter().collect();
            let poll = DomainsPoll {
                started,
                nodes,
                marks,
            };
            let _ = out.send(Internal::Domains(poll)).await;
        });
    }

    /// Starts a poll of every member's heartbeat report, unless one runs.
    pub(super) fn poll_health(&mut self) {
        if self.polling_health {
            return;
        }
        self.polling_health = true;
        let agents: Vec<_> = self
            .members
            .keys()
            .map(|name| (name.clone(), self.agent_of(name).ok()))
            .collect();
        let quorum = self.ctx.lease_status.borrow().status() == LeaseStatus::Alive;
        let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let out = self.internal.clone();
        self.tasks.spawn(async move {
            let polls = agents.into_iter().map(|(name, agent)| async move {
                let report = match agent {
                    Some(agent) => agent.peer_health().await.ok(),
                    None => None,
                };
                (name, report)
            });
            let reports = join_all(polls).await.into_iter().collect();
            let poll = HealthPoll {
                now_ms,
                reports,
                quorum,
            };
            let _ = out.send(Internal::Health(poll)).await;
        });
    }

    /// Steps every member's health with the poll, then acts on what changed: every decision
    /// (which peer can take a VM) sees this poll on both hosts.
    pub(super) async fn apply_health(&mut self, poll: HealthPoll) {
        let names: Vec<String> = self.members.keys().cloned().collect();
        for node in &names {
            let observation = Observation {
                now_ms: poll.now_ms,
                lease_alive: self.registered.contains_key(node),
                paths: poll.heard_of(node),
                agent_answers: poll.answered(node),
                controller_alive: self.controllers.contains_key(node),
                quorum: poll.quorum,
            };
            let host = self.hosts.get(node).cloned().unwrap_or_default();
            let event = health::Event::Observed(observation);
            let (next, actions) = health::step(&host, &self.health_config, &event);
            self.hosts.insert(node.clone(), next);
            for action in &actions {
                Self::log_health(node, action);
            }
        }
        self.last_health = Some(poll);
        for node in &names {
            self.enforce_health(node).await;
        }
    }

    /// Logs a change of `node`'s health. What it means (alerts, lost VMs) is applied by
    /// [`Engine::enforce_health`] on every poll, so a failed write is retried, not lost.
    pub(super) fn log_health(node: &str, action: &health::Action) {
        match action {
            health::Action::Degraded { state, reason } => {
                tracing::warn!(node, state = state.name(), %reason, "host health changed");
            }
            health::Action::Recovered { was_lost } => {
                tracing::info!(node, was_lost, "host health changed: up");
            }
            health::Action::PathSilent { .. }
            | health::Action::PathHeard { .. }
            | health::Action::Lost => {}
        }
    }

    /// Makes the pair reflect `node`'s health: an alert per silent path and one for a degraded
    /// host, and its VMs lost while it is. Idempotent.
    pub(super) async fn enforce_health(&mut self, node: &str) {
        let host = self.hosts.get(node).cloned().unwrap_or_default();
        let listener = self
            .members
            .keys()
            .find(|name| *name != node)
            .cloned()
            .unwrap_or_default();
        for path in &host.silent_paths {
            let message = format!(
                "heartbeat path {path}: {listener} hears nothing from {node}; check the link"
            );
            self.raise(&format!("path/{node}/{path}"), node, "", message)
                .await;
        }
        let prefix = format!("path/{node}/");
        let healed: Vec<String> = self
            .alerts
            .keys()
            .filter(|id| {
                id.strip_prefix(&prefix)
                    .is_some_and(|path| !host.silent_paths.contains(path))
            })
            .cloned()
            .collect();
        for id in healed {
            self.clear(&id).await;
        }
        let id = format!("host/{node}");
        match host.state {
            HostState::Up => self.clear(&id).await,
            state => {
                let message = format!("host {node} is {}: {}", state.name(), host.reason);
                self.raise(&id, node, "", message).await;
            }
        }
        // FT VMs first: a lost host's other VMs wait for its fence, these need not.
        self.ft_takeover(node).await;
        self.follow_health(node, host.state).await;
    }

    /// Every VM recorded on `node` that still counts as running there is lost until the host
    /// returns; an HA VM fails over instead once the fence gate opens ([`super::fencing`]).
    pub(super) async fn host_lost(&mut self, node: &str) {
        let gate_open = self.failover_gate(node);
        // A VM already lost is failed over once its peer can take it.
        let events: Vec<(String, VmEvent)> = self
            .vms
            .iter()
            .filter(|(_, e)| e.record.node == node)
            .filter_map(|(uuid, e)| {
                let event = held(self.lost_event(&e.record, node), gate_open);
                let due = match e.record.state {
                    VmState::Starting
                    | VmState::Running
                    | VmState::Paused
                    | VmState::Stopping { .. } => true,
                    VmState::Lost {
                        intent: Intent::Resume,
                    } => matches!(event, VmEvent::FailOver { .. }),
                    _ => false,
                };
                due.then(|| (uuid.clone(), event))
            })
            .collect();
        if events.is_empty() {
            return;
        }
        tracing::warn!(
            node,
            vms = events.len(),
            "host lost begin: protected VMs fail over, the others wait for the host"
        );
        let mut failed = 0;
        for (uuid, event) in events {
            let name = self
                .vms
                .get(&uuid)
                .map(|e| e.record.name.clone())
                .unwrap_or_default();
            let failover = matches!(event, VmEvent::FailOver { .. });
            if let VmEvent::FailOver { to, .. } = &event {
                tracing::warn!(vm = %name, node, to = %to, "failover begin: its disks are current on {to}");
            }
            match self.drive(&uuid, event, None).await {
                Ok(()) if failover => {
                    tracing::warn!(vm = %name, node, "failover end: ok; committed, starting on the peer")
                }
                Ok(()) => {}
                Err(e) => {
                    failed += 1;
                    tracing::warn!(vm = %name, node, error = %e, "failover or marking lost failed; retried at the next poll");
                }
            }
        }
        tracing::warn!(node, failed, "host lost end");
    }

    /// Reconciles every VM with what its host's agent reports, and raises or clears the
    /// alerts for domains that no record explains.
    pub(super) async fn apply_domains(&mut self, mut poll: DomainsPoll) {
        if let Some(marks) = poll.marks.take() {
            self.marks = marks;
        }
        let mut events = Vec::new();
        let mut alerts = BTreeMap::new();
        for (node, domains) in &poll.nodes {
            let Some(domains) = domains else { continue };
            if self
                .hosts
                .get(node)
                .is_some_and(|h| matches!(h.state, HostState::Lost | HostState::Fenced))
            {
                continue;
            }
            self.reconcile_node(node, domains, poll.started, &mut events);
            self.unexplained(node, domains, poll.started, &mut alerts);
        }
        for (uuid, event) in events {
            if let Err(e) = self.drive(&uuid, event, None).await {
                tracing::warn!(vm = %uuid, error = %e, "applying agent report failed");
            }
        }
        self.sync_domain_alerts(alerts, &poll).await;
        self.observe_protection(&poll).await;
        self.observe_ft(&poll);
        self.observe_disk_writes(&poll);
    }

    /// Keeps each running VM's disk writes as its host reports them (the mirrors' write
    /// latency); a VM its host does not report keeps none.
    fn observe_disk_writes(&mut self, poll: &DomainsPoll) {
        self.disk_writes = self
            .vms
            .iter()
            .filter_map(|(uuid, entry)| {
                let domain = poll.domain(&entry.record.node, uuid)?;
                (!domain.disk_writes.is_empty()).then(|| (uuid.clone(), domain.disk_writes.clone()))
            })
            .collect();
    }

    /// The VM events `node`'s report means for the VMs recorded there.
    fn reconcile_node(
        &self,
        node: &str,
        domains: &[pb::DomainStatus],
        started: Instant,
        events: &mut Vec<(String, VmEvent)>,
    ) {
        for (uuid, entry) in &self.vms {
            if entry.record.node != node || entry.busy || entry.last_command > started {
                continue;
            }
            // A removal that failed (the agent was away) is tried again once it answers.
            if entry.record.state == VmState::Deleting
                && entry.last_command.elapsed() >= REMOVAL_RETRY
            {
                events.push((uuid.clone(), VmEvent::Delete));
                continue;
            }
            let found = domains.iter().find(|d| &d.uuid == uuid);
            if let Some(event) = domain_event(found) {
                events.push((uuid.clone(), self.recovery(&entry.record, event)));
            }
        }
    }

    /// Whether `node`'s report of `domain`, taken at `started`, may predate the engine's last
    /// word on it (a command to its VM, or the VM's removal): then it explains nothing.
    fn stale_report(&self, domain: &str, started: Instant) -> bool {
        let commanded = self
            .vms
            .get(domain)
            .is_some_and(|e| e.busy || e.last_command > started);
        let removed = self.removed.get(domain).is_some_and(|at| *at > started);
        commanded || removed
    }

    /// Alerts for `node`'s domains that no record explains: unknown, misplaced, or running
    /// under a stopped VM.
    fn unexplained(
        &self,
        node: &str,
        domains: &[pb::DomainStatus],
        started: Instant,
        alerts: &mut BTreeMap<String, (String, String, String)>,
    ) {
        for domain in domains {
            if self.stale_report(&domain.uuid, started) {
                // Undecided: keep what is open about it as it is.
                for open in self.alerts.values().filter(|a| {
                    a.id.starts_with("domain/")
                        && a.id.ends_with(&format!("/{node}/{}", domain.uuid))
                }) {
                    alerts.insert(
                        open.id.clone(),
                        (open.node.clone(), open.vm.clone(), open.message.clone()),
                    );
                }
                continue;
            }
            let active = matches!(
                domain.state(),
                pb::DomainState::Running | pb::DomainState::Paused | pb::DomainState::ShuttingDown
            );
            let name = &domain.name;
            match self.vms.get(&domain.uuid).map(|e| &e.record) {
                None => {
                    let message = format!(
                        "domain {name} ({}) on {node} belongs to no VM of the pair: it was made outside Pairvisor and is not adopted; remove it with virsh, or create a VM for it",
                        domain.uuid
                    );
                    alerts.insert(
                        format!("domain/unknown/{node}/{}", domain.uuid),
                        (node.to_string(), String::new(), message),
                    );
                }
                // An FT VM's standby waits on the other host by design.
                Some(record)
                    if record.node != node
                        && active
                        && domain
                            .ft
                            .as_ref()
                            .is_none_or(|ft| ft.role() != pb::FtRole::Standby) =>
                {
                    let message = format!(
                        "VM {} runs on {node}, but the pair records it on {}: a second copy; power off the one on {node}",
                        record.name, record.node
                    );
                    alerts.insert(
                        format!("domain/misplaced/{node}/{}", domain.uuid),
                        (node.to_string(), record.uuid.clone(), message),
                    );
                }
                Some(record) if record.state == VmState::Stopped && active => {
                    let message = format!(
                        "VM {} is stopped, but its domain runs on {node} (started outside Pairvisor): not adopted; start the VM to adopt it, or power the domain off",
                        record.name
                    );
                    alerts.insert(
                        format!("domain/unadopted/{node}/{}", domain.uuid),
                        (node.to_string(), record.uuid.clone(), message),
                    );
                }
                Some(_) => {}
            }
        }
    }

    /// What the other host hears of `node` on each path, for the view.
    pub(super) fn path_views(&self, node: &str) -> Vec<PathView> {
        let timeout = self.health_config.path_timeout_ms;
        self.last_health
            .as_ref()
            .and_then(|p| p.heard_of(node))
            .unwrap_or_default()
            .into_iter()
            .map(|p| PathView {
                up: p.since_ms.is_some_and(|ms| ms < timeout),
                name: p.name,
                since_ms: p.since_ms,
            })
            .collect()
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
        pb::DomainState::Paused => Some(VmEvent::DomainPaused {
            reason: status.reason.clone(),
        }),
        _ => None,
    })
}

/// Runs the futures concurrently and collects their outputs in order.
async fn join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn domain_event_paused_domain_carries_reason() {
        let status = pb::DomainStatus {
            state: pb::DomainState::Paused.into(),
            reason: "ioerror".into(),
            ..Default::default()
        };

        let event = domain_event(Some(&status));

        assert_eq!(
            event,
            Some(VmEvent::DomainPaused {
                reason: "ioerror".into()
            })
        );
    }

    #[test]
    fn heard_of_reads_the_other_hosts_report() {
        let report = pb::PeerHealth {
            node: "n1".into(),
            paths: vec![pb::PathHealth {
                name: "alink1".into(),
                heard: true,
                ms_since_heard: 40,
                ..Default::default()
            }],
            ..Default::default()
        };
        let poll = HealthPoll {
            now_ms: 0,
            reports: BTreeMap::from([("n0".into(), None), ("n1".into(), Some(report))]),
            quorum: true,
        };

        let heard = poll.heard_of("n0");

        assert_eq!(
            heard,
            Some(vec![PathHeard {
                name: "alink1".into(),
                since_ms: Some(40)
            }])
        );
    }
}
