//! FT output in the simulated pair: when an FT primary's epochs fail, what its agent does
//! with the guest's output, and the serving controller's takeover of an unreachable host's
//! FT VMs. The agent side follows `agent::stale` and `agent::ft::epoch`; the controller side
//! `engine::protect` (its decision is the real `ha::standby_target`).

use super::{Proc, World, owner_key, stale_key};
use crate::ha;
use crate::health::HostState;
use crate::model::{Intent, VmState};
use crate::sim::HOSTS;
use crate::vm::VmEvent;

impl World {
    /// The FT runs of the agent on `host`: a primary whose epochs fail holds its output until
    /// its stale mark lands (on its registration and the run's owner generation); a simplex
    /// run checkpoints again once its standby can take epochs (re-protection: the pair
    /// removes the mark only after that, see [`World::checkpointing`]).
    pub(super) fn ft_epochs(&mut self, host: usize) {
        let runs: Vec<(String, u64)> = self.hosts[host]
            .agent
            .domains
            .iter()
            .map(|(vm, (generation, _))| (vm.clone(), *generation))
            .filter(|(vm, _)| self.vm(vm).ft)
            .collect();
        for (vm, generation) in runs {
            let agent = &self.hosts[host].agent;
            if agent.simplex.contains(&vm) {
                let reprotected = self.owner_is(&vm, generation) && !self.epochs_fail(host, &vm);
                if reprotected {
                    self.hosts[host].agent.simplex.remove(&vm);
                    self.note(&format!("{} checkpoints {vm} again", HOSTS[host]));
                }
                continue;
            }
            if !agent.held.contains(&vm) {
                if !self.epochs_fail(host, &vm) {
                    continue;
                }
                self.hosts[host].agent.held.insert(vm.clone());
                self.note(&format!(
                    "{}: {vm}'s epochs fail, its output is held until its standby is marked stale",
                    HOSTS[host]
                ));
            }
            self.try_mark(host, &vm, generation);
        }
    }

    /// Whether the run of FT VM `vm` on `host` checkpoints (its output flows only for epochs
    /// its standby acknowledged): what the engine waits for, a committed epoch, before it
    /// counts the VM protected and removes its stale mark (`engine::protect::protection_of`).
    pub(super) fn checkpointing(&self, host: usize, vm: &str) -> bool {
        let h = &self.hosts[host];
        h.power
            && h.agent_proc == Proc::Running
            && h.agent.domains.contains_key(vm)
            && !h.agent.held.contains(vm)
            && !h.agent.simplex.contains(vm)
    }

    /// Whether the standby of `vm` can no longer commit epochs of the run on `host`: its host
    /// is down, its agent is not running, both A-Links are cut, or it was resumed.
    pub(super) fn epochs_fail(&self, host: usize, vm: &str) -> bool {
        let peer = &self.hosts[1 - host];
        let alinks_cut = ["alink1", "alink2"]
            .iter()
            .all(|p| self.paths_down.contains(p));
        !peer.power
            || peer.agent_proc != Proc::Running
            || alinks_cut
            || peer.agent.domains.contains_key(vm)
    }

    /// One attempt at the stale mark of `vm`'s run of `generation` on `host`, while the host's
    /// registration is bound to the agent's lease: written only while the VM's owner
    /// generation is the run's, and then the run goes simplex and its output flows; refused,
    /// the agent destroys the run (its held output with it).
    fn try_mark(&mut self, host: usize, vm: &str, generation: u64) {
        if !self.etcd_from(host) {
            return;
        }
        let lease = self.hosts[host].agent.lease.as_ref().map(|h| h.id);
        let registered = lease.is_some()
            && self
                .store
                .get(&format!("nodes/{}", HOSTS[host]))
                .and_then(|kv| kv.lease)
                == lease;
        if !registered {
            return;
        }
        if !self.owner_is(vm, generation) {
            let agent = &mut self.hosts[host].agent;
            agent.domains.remove(vm);
            agent.held.remove(vm);
            self.note(&format!(
                "{}: {vm}'s mark is refused, the pair moved it: its run is destroyed",
                HOSTS[host]
            ));
            return;
        }
        self.store.put(&stale_key(vm), HOSTS[host], None);
        let agent = &mut self.hosts[host].agent;
        agent.held.remove(vm);
        agent.simplex.insert(vm.to_string());
        self.note(&format!(
            "{} marks {vm}'s standby stale: the run goes on alone",
            HOSTS[host]
        ));
    }

    /// Whether `vm`'s owner generation is `generation`.
    fn owner_is(&self, vm: &str, generation: u64) -> bool {
        self.store
            .get(&owner_key(vm))
            .is_some_and(|kv| kv.value == generation.to_string())
    }

    /// Whether a stale mark of `vm` stands (the sim's mirror path is always 1).
    pub(super) fn mark_of(&self, vm: &str) -> Option<i64> {
        self.store.get(&stale_key(vm)).map(|_| 1)
    }

    /// The takeover the judge on `judge` decides for the FT VMs of `judged` when that host is
    /// unreachable (lost or not): each protected one resumes its standby on the peer.
    pub(super) fn ft_takeover(&mut self, judge: usize, judged: usize, key: &str, term: i64) {
        let health = &self.hosts[judge].controller.health;
        let peer = 1 - judged;
        if !health[judged].unreachable {
            return;
        }
        let peer_up = health[peer].state == HostState::Up;
        for vm in ["a", "b"] {
            let record = self.vm(vm);
            if !record.ft
                || record.host != judged
                || !matches!(
                    record.state,
                    VmState::Running
                        | VmState::Paused
                        | VmState::Lost {
                            intent: Intent::Resume
                        }
                )
            {
                continue;
            }
            let Some(to) = ha::standby_target(
                &record.protection,
                HOSTS[judged],
                Some(HOSTS[peer]),
                peer_up,
                self.mark_of(vm),
            ) else {
                continue;
            };
            self.note(&format!(
                "{} takes {vm} over: {} is unreachable",
                HOSTS[judge], HOSTS[judged]
            ));
            let event = VmEvent::FailOver {
                from: HOSTS[judged].into(),
                to: to.into(),
                why: format!("host {} unreachable", HOSTS[judged]),
            };
            self.drive(judge, key, term, vm, &event);
        }
    }
}
