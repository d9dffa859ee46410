//! The agent and controller models: what each process does on a step, in the daemons' order
//! (the controller acts only on a confirmed lease, persists fenced before commanding, and sends
//! its term and the VM's generation; the agent admits by the fencing rule).

use daemon::fence::Token;
use daemon::lease::LeaseStatus;

use super::{
    Holder, Message, Proc, REPORT_QUIET_MS, Request, Role, World, encode, owner_key, stale_key,
    vm_key,
};
use crate::ha;
use crate::health::{self, HostState, Observation, PathHeard};
use crate::model::VmState;
use crate::sim::store::LEADER;
use crate::sim::{Executed, HOSTS, ROLE_PATHS, SimVm};
use crate::vm::{self, Action, VmEvent};

impl World {
    pub(super) fn agent_step(&mut self, host: usize) {
        self.keep_lease(host, Holder::Agent);
        self.self_fence(host);
        self.ft_epochs(host);
        if self.etcd_from(host)
            && let Some(term) = self.store.get(LEADER).and_then(|kv| kv.value.parse().ok())
            && let Some(raised) = self.hosts[host].agent.fence.observe(term)
        {
            self.hosts[host].agent.fence = raised;
        }
    }

    /// The agent stops its self-fencing domains once its host lease will not surely hold for
    /// the self-fence margin longer: the pair may restart them on the peer when it expires.
    fn self_fence(&mut self, host: usize) {
        if !self.self_fence_due(host) {
            return;
        }
        let agent = &self.hosts[host].agent;
        let fenced: Vec<String> = agent
            .domains
            .iter()
            .filter(|(_, (_, self_fence))| *self_fence)
            .map(|(vm, _)| vm.clone())
            .collect();
        for vm in fenced {
            self.hosts[host].agent.domains.remove(&vm);
            self.note(&format!(
                "{} self-fences {vm}: its host lease is in doubt",
                HOSTS[host]
            ));
        }
    }

    /// A command reaches an agent: the fence decides, then it runs.
    pub(super) fn execute(
        &mut self,
        host: usize,
        vm: &str,
        (start, self_fence, resume): (bool, bool, bool),
        token: Token,
    ) {
        if !self.hosts[host].power || self.hosts[host].agent_proc != Proc::Running {
            return;
        }
        let agent = &mut self.hosts[host].agent;
        match agent.fence.admit(token, vm) {
            Err(refusal) => {
                self.note(&format!("{} refused {vm}: {refusal}", HOSTS[host]));
                return;
            }
            Ok(Some(raised)) => agent.fence = raised,
            Ok(None) => {}
        }
        if start {
            agent
                .domains
                .insert(vm.to_string(), (token.generation, self_fence));
        } else {
            agent.domains.remove(vm);
        }
        // A new run (or none): nothing of an old one's output state carries over.
        agent.held.remove(vm);
        agent.simplex.remove(vm);
        let newest = self
            .executed
            .iter()
            .filter(|e| e.vm == vm)
            .map(|e| (e.term, e.generation))
            .max();
        if let Some((term, generation)) = newest
            && (token.term < term || token.generation < generation)
        {
            self.violations.push(format!(
                "t={} {} ran VM {vm}'s command of term {} generation {} after one of term {term} generation {generation} ran",
                self.now_ms, HOSTS[host], token.term, token.generation
            ));
        }
        self.executed.push(Executed {
            at_ms: self.now_ms,
            host,
            vm: vm.to_string(),
            start,
            term: token.term,
            generation: token.generation,
            resume,
        });
    }

    pub(super) fn controller_step(&mut self, host: usize) {
        for message in std::mem::take(&mut self.hosts[host].controller.outbox) {
            self.send(message);
        }
        self.keep_lease(host, Holder::Controller);
        let status = self.status(self.hosts[host].controller.lease.as_ref());
        if status != LeaseStatus::Alive || !self.etcd_from(host) {
            return;
        }
        if self.hosts[host].controller.role == Role::Standby {
            self.campaign(host);
        }
        if let Role::Serving { key, term } = self.hosts[host].controller.role.clone() {
            self.serve(host, &key, term);
        }
    }

    fn campaign(&mut self, host: usize) {
        let Some(lease) = self.hosts[host].controller.lease.as_ref().map(|h| h.id) else {
            return;
        };
        let Some((key, term)) = self.store.campaign(lease, HOSTS[host]) else {
            return;
        };
        if self
            .store
            .elected()
            .is_some_and(|(elected, _)| elected == key)
            && self
                .store
                .put_fenced(&key, term, LEADER, &term.to_string())
                .is_some()
        {
            self.note(&format!("{} serves, term {term}", HOSTS[host]));
            self.hosts[host].controller.role = Role::Serving { key, term };
        }
    }

    /// One round of the serving controller: host health, reconciliation, API requests.
    fn serve(&mut self, host: usize, key: &str, term: i64) {
        for (judged, name) in HOSTS.iter().enumerate() {
            let observation = self.observe(host, judged);
            let before = self.hosts[host].controller.health[judged].clone();
            let (next, actions) = health::step(
                &before,
                &self.health_config,
                &health::Event::Observed(observation),
            );
            self.hosts[host].controller.health[judged] = next;
            self.ft_takeover(host, judged, key, term);
            if actions.contains(&health::Action::Lost) {
                self.note(&format!("{} judges {name} lost", HOSTS[host]));
                for vm in ["a", "b"] {
                    if self.vm(vm).host == judged {
                        let event = self.lost_event(host, vm, judged);
                        self.drive(host, key, term, vm, &event);
                    }
                }
            }
        }
        self.reconcile(host, key, term);
        if let Some(request) = self.requests.pop_front() {
            let (vm, event) = match &request {
                Request::Start(vm) => (vm.clone(), VmEvent::Start),
                Request::PowerOff(vm) => (vm.clone(), VmEvent::PowerOff),
            };
            self.drive(host, key, term, &vm, &event);
        }
    }

    /// What the judge on `judge` sees of host `judged`.
    fn observe(&self, judge: usize, judged: usize) -> Observation {
        let other = 1 - judged;
        let up = |h: usize| self.hosts[h].power && self.hosts[h].agent_proc == Proc::Running;
        let other_answers = up(other) && self.mgmt(judge, other);
        let paths = other_answers.then(|| {
            ROLE_PATHS
                .iter()
                .map(|p| (*p, !self.paths_down.contains(p)))
                .chain(std::iter::once(("mgmt", self.mgmt(0, 1))))
                .map(|(name, link)| PathHeard {
                    name: name.to_string(),
                    since_ms: (link && up(judged)).then_some(0),
                })
                .collect()
        });
        let judge_lease = self.hosts[judge].controller.lease.as_ref();
        Observation {
            now_ms: self.now_ms,
            lease_alive: self
                .store
                .get(&format!("nodes/{}", HOSTS[judged]))
                .is_some(),
            paths,
            agent_answers: up(judged) && self.mgmt(judge, judged),
            controller_alive: self
                .store
                .get(&format!("controllers/{}", HOSTS[judged]))
                .is_some(),
            quorum: self.status(judge_lease) == LeaseStatus::Alive,
        }
    }

    /// Feeds each VM its host's report, unless the host is lost or the VM was just commanded.
    fn reconcile(&mut self, host: usize, key: &str, term: i64) {
        for vm in ["a", "b"] {
            let record = self.vm(vm);
            let judged = record.host;
            let health = self.hosts[host].controller.health[judged].state;
            let answers = self.hosts[judged].power
                && self.hosts[judged].agent_proc == Proc::Running
                && self.mgmt(host, judged);
            let quiet = self.hosts[host]
                .controller
                .last_command_ms
                .get(vm)
                .is_some_and(|t| self.now_ms < t + REPORT_QUIET_MS + self.max_delay_ms);
            if !answers || quiet || matches!(health, HostState::Lost | HostState::Fenced) {
                continue;
            }
            let running = self.hosts[judged].agent.domains.contains_key(vm);
            let event = if running {
                VmEvent::DomainRunning
            } else {
                VmEvent::DomainStopped {
                    reason: "shutoff".into(),
                }
            };
            self.drive(host, key, term, vm, &event);
            if running && record.protected && record.state == VmState::Running {
                self.observe_mirror(host, key, term, vm);
            }
        }
    }

    /// What the loss of host `judged` means for VM `vm`, as the engine decides it: a failover
    /// when `vm` is HA and its copy on the peer is current and the peer up, else lost.
    fn lost_event(&self, judge: usize, vm: &str, judged: usize) -> VmEvent {
        let record = self.vm(vm);
        let peer = 1 - judged;
        let peer_up = self.hosts[judge].controller.health[peer].state == HostState::Up;
        match ha::failover_target(
            &record.protection,
            HOSTS[judged],
            Some(HOSTS[peer]),
            peer_up,
            self.mark_of(vm),
        ) {
            Some(to) if record.protected => VmEvent::FailOver {
                from: HOSTS[judged].into(),
                to: to.into(),
                why: format!("host {} lost", HOSTS[judged]),
            },
            _ => VmEvent::HostLost {
                node: HOSTS[judged].into(),
            },
        }
    }

    /// The mirror of HA VM `vm`, taken as ready whenever the peer is up (the data path is not
    /// simulated): commits which copies are current, fenced.
    fn observe_mirror(&mut self, host: usize, key: &str, term: i64, vm: &str) {
        let mut record = self.vm(vm);
        let peer = 1 - record.host;
        let peer_up = self.hosts[host].controller.health[peer].state == HostState::Up
            && self.hosts[peer].power
            && self.hosts[peer].agent_proc == Proc::Running;
        let seen = ha::Observed {
            primary: HOSTS[record.host],
            peer: Some(HOSTS[peer]),
            peer_up,
            mirror: if peer_up {
                ha::Mirror::Ready
            } else {
                ha::Mirror::Absent
            },
            mirror_path: 1,
            mark: None,
            protecting: false,
            now_unix_ms: i64::try_from(self.now_ms).unwrap_or(i64::MAX),
        };
        if let Some(protection) = ha::observe(&record.protection, &seen).protection {
            record.protection = protection;
            self.commit(host, key, term, vm, &record);
        }
        // Re-protected (the sim's mirror is in sync once epochs can run; an FT primary must
        // checkpoint again first): the obsolete stale mark goes, as the engine removes it
        // with the new protection.
        let synced = peer_up
            && !self.epochs_fail(record.host, vm)
            && (!record.ft || self.checkpointing(record.host, vm));
        if synced && self.mark_of(vm).is_some() && self.vm(vm).protection.current.len() == 2 {
            self.store.delete(&stale_key(vm));
            self.note(&format!(
                "{vm} is protected again: its stale mark is removed"
            ));
        }
    }

    /// The engine's drive: transition, fenced persist, then the commands.
    pub(super) fn drive(&mut self, host: usize, key: &str, term: i64, vm: &str, event: &VmEvent) {
        let mut record = self.vm(vm);
        let Ok(transition) = vm::transition(record.state, HOSTS[record.host], event) else {
            return;
        };
        let changed = transition.state != record.state || transition.reason.is_some();
        if !changed && transition.actions.is_empty() {
            return;
        }
        record.state = transition.state;
        if transition.reassign {
            record.generation += 1;
            let now = i64::try_from(self.now_ms).unwrap_or(i64::MAX);
            let relocate = transition.relocate.as_deref();
            let placement = ha::Placement {
                relocate,
                why: transition.reason.as_deref().unwrap_or("moved"),
                crash: transition.crash,
                behind: false,
            };
            let Some(protection) = ha::placed(
                &record.protection,
                record.protected,
                HOSTS[record.host],
                &placement,
                now,
            ) else {
                self.note(&format!("{vm}: start refused, its copy is behind"));
                return;
            };
            record.protection = protection;
            if let Some(to) = relocate {
                record.host = HOSTS.iter().position(|h| *h == to).unwrap_or(record.host);
            }
        }
        // A failover commits only while no stale mark stands (the engine's mark guard).
        if transition.relocate.is_some() && self.mark_of(vm).is_some() {
            self.note(&format!("{vm}: failover refused, a stale mark stands"));
            return;
        }
        if !self.commit(host, key, term, vm, &record) {
            return;
        }
        let token = Token {
            term,
            generation: record.generation,
        };
        for action in transition.actions {
            let start = match action {
                Action::StartDomain => true,
                Action::DestroyDomain | Action::AcpiShutdown => false,
                _ => continue,
            };
            self.hosts[host]
                .controller
                .last_command_ms
                .insert(vm.to_string(), self.now_ms);
            self.hosts[host].controller.outbox.push(Message::Command {
                host: record.host,
                vm: vm.to_string(),
                start,
                self_fence: record.protected,
                resume: start && record.ft && record.protection.resume_standby,
                token,
            });
        }
    }

    /// The fenced write of `vm`'s record; a refused one steps the controller down.
    fn commit(&mut self, host: usize, key: &str, term: i64, vm: &str, record: &SimVm) -> bool {
        let written = self
            .store
            .put_fenced(key, term, &vm_key(vm), &encode(record));
        if written.is_some() {
            // The same transaction writes the owner generation (`store::Writer`).
            self.store
                .put(&owner_key(vm), &record.generation.to_string(), None);
        } else {
            // Our election key is gone: step down at once, as the engine does.
            let c = &mut self.hosts[host].controller;
            c.role = Role::Standby;
            c.step_downs += 1;
            if let Some(lease) = c.lease.take() {
                self.store.revoke(lease.id);
            }
            self.note(&format!("{} fenced write refused: steps down", HOSTS[host]));
            return false;
        }
        true
    }
}
