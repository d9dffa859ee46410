//! The simulated world: hosts, network, processes, delayed messages, and the agent and
//! controller models driven by the real decision code.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use daemon::fence::{State as FenceState, Token};
use daemon::lease::{self, LeaseStatus, LeaseView, Validity};
use tokio::time::Instant;

mod ft_output;
mod roles;

use super::store::Store;
use super::{Executed, HOSTS, ROLE_PATHS, SimVm};
use crate::ft::{self, FtPhase};
use crate::health;
use crate::model::VmState;

/// Virtual time per step.
pub const STEP_MS: u64 = 50;
/// TTL of every lease (the lab's).
const TTL_MS: u64 = 2000;
/// Renewal period, as `daemon::lease::keep`: renewals go out on this beat whether or not the
/// earlier ones were answered.
const RENEW_MS: u64 = TTL_MS / 10;
/// A renewal unanswered this long is given up (`daemon::lease::ATTEMPT_TIMEOUT`).
const ATTEMPT_MS: u64 = 700;
/// Reports of a VM this soon after a command to it are stale (the engine drops reports taken
/// before its last command finished).
const REPORT_QUIET_MS: u64 = 600;

/// A process's condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proc {
    /// Running.
    Running,
    /// Stopped by SIGSTOP: holds everything, does nothing.
    Paused,
    /// Gone.
    Dead,
}

/// A lease a process holds, and its view of it.
#[derive(Clone, Debug)]
struct Held {
    id: i64,
    validity: Validity,
    next_renew_ms: u64,
}

/// An agent: its fence, the domains it runs (VM → generation, and whether it self-fences
/// them), its host lease, and the output of its FT domains.
#[derive(Clone, Debug, Default)]
pub struct Agent {
    pub fence: FenceState,
    pub domains: BTreeMap<String, (u64, bool)>,
    lease: Option<Held>,
    /// FT domains whose output is held: their epochs ended (or their agent died) and no
    /// stale mark has let them run alone; a run the pair moved elsewhere stays here for good.
    pub held: BTreeSet<String>,
    /// FT domains that run alone after their stale mark landed (their output flows).
    pub simplex: BTreeSet<String>,
}

/// A controller's role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Not serving.
    Standby,
    /// Serving under `term`, fenced by election key `key`.
    Serving {
        /// Election key.
        key: String,
        /// Its creation revision.
        term: i64,
    },
}

/// A controller: its lease, role, view of host health and its VMs' last command times.
#[derive(Clone, Debug)]
pub struct Controller {
    lease: Option<Held>,
    pub role: Role,
    pub health: [health::Host; 2],
    last_command_ms: BTreeMap<String, u64>,
    /// Commands decided (and persisted) but not yet sent: a process paused between its write
    /// and its call sends them when it resumes, as an engine's batch in flight would.
    outbox: Vec<Message>,
    pub step_downs: u32,
}

impl Default for Controller {
    fn default() -> Controller {
        Controller {
            lease: None,
            role: Role::Standby,
            health: [health::Host::default(), health::Host::default()],
            last_command_ms: BTreeMap::new(),
            outbox: Vec::new(),
            step_downs: 0,
        }
    }
}

/// A simulated host.
#[derive(Clone, Debug)]
pub struct Host {
    pub power: bool,
    pub etcd: bool,
    pub agent_proc: Proc,
    pub controller_proc: Proc,
    pub agent: Agent,
    pub controller: Controller,
}

impl Default for Host {
    fn default() -> Host {
        Host {
            power: true,
            etcd: true,
            agent_proc: Proc::Running,
            controller_proc: Proc::Running,
            agent: Agent::default(),
            controller: Controller::default(),
        }
    }
}

/// Who sent a keep-alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holder {
    Agent,
    Controller,
}

/// A message in flight.
#[derive(Clone, Debug)]
enum Message {
    /// A lease renewal on its way to etcd (`answer: None`) or back (`Some`).
    KeepAlive {
        host: usize,
        holder: Holder,
        lease: i64,
        sent_ms: u64,
        answer: Option<Option<u64>>,
    },
    /// A command on its way to an agent.
    Command {
        host: usize,
        vm: String,
        start: bool,
        self_fence: bool,
        /// FT: the start resumes the standby there.
        resume: bool,
        token: Token,
    },
}

/// An API request waiting for the serving controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Start a VM.
    Start(String),
    /// Power a VM off.
    PowerOff(String),
}

/// The whole simulated pair.
#[derive(Debug)]
pub struct World {
    pub now_ms: u64,
    pub store: Store,
    pub hosts: [Host; 2],
    pub witness: bool,
    /// etcd answers no one before this (a Raft election in progress).
    etcd_down_until_ms: u64,
    /// Management links that are cut: pairs of (0 = n0, 1 = n1, 2 = witness), lower first.
    cuts: BTreeSet<(usize, usize)>,
    /// Role links (heartbeat paths) that are cut.
    paths_down: BTreeSet<&'static str>,
    messages: Vec<(u64, Message)>,
    seed: u64,
    /// Largest one-way delay of a message, in ms.
    pub max_delay_ms: u64,
    pub requests: VecDeque<Request>,
    pub executed: Vec<Executed>,
    pub violations: Vec<String>,
    pub trace: Vec<String>,
    /// The phases each FT VM went through, as its stored record says (`crate::ft`).
    pub ft_phases: BTreeMap<String, Vec<Option<FtPhase>>>,
    health_config: health::Config,
    base: Instant,
}

impl World {
    /// A healthy pair with VMs `a` (HA, on n0) and `b` (on n1), stopped, and message delays up to
    /// `max_delay_ms`, drawn from `seed`.
    pub fn new(seed: u64, max_delay_ms: u64) -> World {
        let mut store = Store::default();
        for (name, host, protected) in [("a", 0, true), ("b", 1, false)] {
            let vm = SimVm {
                state: VmState::Stopped,
                host,
                generation: 1,
                protected,
                protection: crate::ha::Protection::default(),
                ft: false,
            };
            store.put(&vm_key(name), &encode(&vm), None);
            store.put(&owner_key(name), "1", None);
        }
        World {
            now_ms: 0,
            store,
            hosts: [Host::default(), Host::default()],
            witness: true,
            etcd_down_until_ms: 0,
            cuts: BTreeSet::new(),
            paths_down: BTreeSet::new(),
            messages: Vec::new(),
            seed: seed | 1,
            max_delay_ms,
            requests: VecDeque::new(),
            executed: Vec::new(),
            violations: Vec::new(),
            trace: Vec::new(),
            ft_phases: BTreeMap::new(),
            health_config: health::Config::default(),
            base: Instant::now(),
        }
    }

    /// Runs for `ms` of virtual time.
    pub fn run(&mut self, ms: u64) {
        let end = self.now_ms + ms;
        while self.now_ms < end {
            self.step();
        }
    }

    /// The host whose controller believes it serves and holds a confirmed lease, if one does.
    pub fn serving(&self) -> Option<usize> {
        (0..2).find(|&h| {
            let c = &self.hosts[h].controller;
            self.hosts[h].power
                && self.hosts[h].controller_proc == Proc::Running
                && matches!(c.role, Role::Serving { .. })
                && self.status(c.lease.as_ref()) == LeaseStatus::Alive
        })
    }

    /// The VM `name` as stored.
    pub fn vm(&self, name: &str) -> SimVm {
        decode(
            &self
                .store
                .get(&vm_key(name))
                .map(|kv| kv.value.clone())
                .unwrap_or_default(),
        )
        .unwrap_or(SimVm {
            state: VmState::Stopped,
            host: 0,
            generation: 0,
            protected: false,
            protection: crate::ha::Protection::default(),
            ft: false,
        })
    }

    /// Makes the protected VM `name` FT (before it starts).
    pub fn make_ft(&mut self, name: &str) {
        let vm = SimVm {
            ft: true,
            ..self.vm(name)
        };
        self.store.put(&vm_key(name), &encode(&vm), None);
    }

    /// Appends each FT VM's phase to its trace when it changed.
    fn trace_ft(&mut self) {
        for name in ["a", "b"] {
            let vm = self.vm(name);
            if !vm.ft {
                continue;
            }
            let node = HOSTS[vm.host];
            let phase = ft::phase(&ft::Seen {
                state: vm.state,
                protection: &vm.protection,
                ft: None,
                failing_over: ft::failover_in_progress(vm.state, node, &vm.protection),
            });
            let phases = self.ft_phases.entry(name.to_string()).or_default();
            if phases.last() != Some(&phase) {
                phases.push(phase);
            }
        }
    }

    // ----- faults -----

    /// kill -9 of a host's controller.
    pub fn kill_controller(&mut self, host: usize) {
        self.hosts[host].controller_proc = Proc::Dead;
        self.hosts[host].controller = Controller::default();
        self.note(&format!("kill controller {}", HOSTS[host]));
    }

    /// kill -9 of a host's agent (its guests run on; an FT guest's output stays held, as no
    /// epoch commits it any more).
    pub fn kill_agent(&mut self, host: usize) {
        self.hosts[host].agent_proc = Proc::Dead;
        self.hosts[host].agent.lease = None;
        let running: Vec<String> = self.hosts[host].agent.domains.keys().cloned().collect();
        for vm in running {
            if self.vm(&vm).ft && !self.hosts[host].agent.simplex.contains(&vm) {
                self.hosts[host].agent.held.insert(vm);
            }
        }
        self.note(&format!("kill agent {}", HOSTS[host]));
    }

    /// SIGSTOP (`true`) or SIGCONT of a host's controller.
    pub fn pause_controller(&mut self, host: usize, paused: bool) {
        if self.hosts[host].controller_proc != Proc::Dead {
            self.hosts[host].controller_proc = if paused { Proc::Paused } else { Proc::Running };
        }
        self.note(&format!(
            "{} controller {}",
            if paused { "pause" } else { "resume" },
            HOSTS[host]
        ));
    }

    /// A power cut: every process and guest of the host is gone.
    pub fn power_off(&mut self, host: usize) {
        self.hosts[host] = Host {
            power: false,
            etcd: false,
            agent_proc: Proc::Dead,
            controller_proc: Proc::Dead,
            ..Host::default()
        };
        self.note(&format!("power off {}", HOSTS[host]));
    }

    /// Power back on: etcd, agent and controller start (the agent keeps its fence file).
    pub fn power_on(&mut self, host: usize) {
        let fence = self.hosts[host].agent.fence.clone();
        self.hosts[host] = Host::default();
        self.hosts[host].agent.fence = fence;
        self.note(&format!("power on {}", HOSTS[host]));
    }

    /// Restarts whatever process of a powered host is dead.
    pub fn restart_processes(&mut self, host: usize) {
        let h = &mut self.hosts[host];
        if !h.power {
            return;
        }
        if h.agent_proc == Proc::Dead {
            h.agent_proc = Proc::Running;
        }
        if h.controller_proc == Proc::Dead {
            h.controller_proc = Proc::Running;
        }
        h.etcd = true;
    }

    /// Cuts `host` off from the other host on every path, and from the witness unless
    /// `keep_witness`.
    pub fn isolate(&mut self, host: usize, keep_witness: bool) {
        self.cuts.insert((0, 1));
        self.paths_down.extend(ROLE_PATHS);
        if !keep_witness {
            self.cuts.insert((host, 2));
        }
        self.note(&format!(
            "isolate {} (keep witness: {keep_witness})",
            HOSTS[host]
        ));
    }

    /// Cuts one heartbeat path between the hosts ("mgmt" cuts their management link).
    pub fn cut_path(&mut self, path: &'static str) {
        if path == "mgmt" {
            self.cuts.insert((0, 1));
        } else {
            self.paths_down.insert(path);
        }
        self.note(&format!("cut path {path}"));
    }

    /// The witness's etcd member dies (`false`) or returns.
    pub fn set_witness(&mut self, up: bool) {
        self.witness = up;
        self.note(&format!("witness {}", if up { "up" } else { "down" }));
    }

    /// etcd elects a new Raft leader: nobody is answered for `ms`, then every lease is
    /// extended by its TTL.
    pub fn etcd_election(&mut self, ms: u64) {
        self.etcd_down_until_ms = self.now_ms + ms;
        self.note(&format!("etcd leader election for {ms} ms"));
    }

    /// Heals every cut and path.
    pub fn heal(&mut self) {
        self.cuts.clear();
        self.paths_down.clear();
        self.note("heal");
    }

    // ----- the step -----

    fn step(&mut self) {
        self.now_ms += STEP_MS;
        if self.now_ms == self.etcd_down_until_ms {
            self.store.promote(self.now_ms);
        }
        if self.etcd_running() {
            self.store.expire(self.now_ms);
        }
        self.deliver();
        for host in 0..2 {
            if self.hosts[host].power && self.hosts[host].agent_proc == Proc::Running {
                self.agent_step(host);
            }
            if self.hosts[host].power && self.hosts[host].controller_proc == Proc::Running {
                self.controller_step(host);
            }
        }
        self.trace_ft();
    }

    /// Whether etcd has a quorum at all (outside an election).
    fn etcd_running(&self) -> bool {
        self.now_ms >= self.etcd_down_until_ms && !self.quorum_members().is_empty()
    }

    /// The etcd members in the majority partition.
    fn quorum_members(&self) -> Vec<usize> {
        let alive = [self.hosts[0].etcd, self.hosts[1].etcd, self.witness];
        let linked = |a: usize, b: usize| a == b || !self.cuts.contains(&(a.min(b), a.max(b)));
        (0..3)
            .filter(|&m| alive[m] && (0..3).any(|o| o != m && alive[o] && linked(m, o)))
            .collect()
    }

    /// Whether a process on `host` can use etcd now.
    fn etcd_from(&self, host: usize) -> bool {
        self.now_ms >= self.etcd_down_until_ms
            && self
                .quorum_members()
                .iter()
                .any(|&m| m == host || !self.cuts.contains(&(host.min(m), host.max(m))))
    }

    /// Whether `from` reaches `to` over management.
    fn mgmt(&self, from: usize, to: usize) -> bool {
        from == to || !self.cuts.contains(&(from.min(to), from.max(to)))
    }

    fn random(&mut self, below: u64) -> u64 {
        // xorshift64: deterministic for a seed.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        if below == 0 { 0 } else { self.seed % below }
    }

    fn send(&mut self, message: Message) {
        let delay = self.random(self.max_delay_ms + 1);
        self.messages.push((self.now_ms + delay, message));
    }

    fn at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    fn status(&self, held: Option<&Held>) -> LeaseStatus {
        held.map_or(LeaseStatus::Expired, |h| {
            h.validity.status(self.at(self.now_ms))
        })
    }

    /// Whether the agent on `host` must self-fence now: the agent's own rule.
    fn self_fence_due(&self, host: usize) -> bool {
        let view = self.hosts[host]
            .agent
            .lease
            .as_ref()
            .map_or(LeaseView::NONE, |h| LeaseView::from(h.validity));
        lease::self_fence_due(view, self.at(self.now_ms))
    }

    fn note(&mut self, text: &str) {
        self.trace.push(format!("t={} {text}", self.now_ms));
    }

    fn deliver(&mut self) {
        let now = self.now_ms;
        let (due, later): (Vec<_>, Vec<_>) =
            self.messages.drain(..).partition(|(at, _)| *at <= now);
        self.messages = later;
        for (_, message) in due {
            self.handle(message);
        }
    }

    fn handle(&mut self, message: Message) {
        match message {
            Message::KeepAlive {
                host,
                holder,
                lease,
                sent_ms,
                answer: None,
            } => {
                // At etcd: renewed if some member of the majority is reachable (the keeper
                // sends each renewal to every member), else the request is lost.
                if self.etcd_from(host) {
                    let answer = self.store.keep_alive(self.now_ms, lease);
                    self.send(Message::KeepAlive {
                        host,
                        holder,
                        lease,
                        sent_ms,
                        answer: Some(answer),
                    });
                }
            }
            Message::KeepAlive {
                host,
                holder,
                lease,
                sent_ms,
                answer: Some(answer),
            } => self.renewed(host, holder, lease, sent_ms, answer),
            Message::Command {
                host,
                vm,
                start,
                self_fence,
                resume,
                token,
            } => self.execute(host, &vm, (start, self_fence, resume), token),
        }
    }

    fn held_mut(&mut self, host: usize, holder: Holder) -> Option<&mut Held> {
        let h = &mut self.hosts[host];
        match holder {
            Holder::Agent => h.agent.lease.as_mut(),
            Holder::Controller => h.controller.lease.as_mut(),
        }
    }

    /// A renewal's answer reaches its holder (if it still runs and holds that lease).
    fn renewed(
        &mut self,
        host: usize,
        holder: Holder,
        lease: i64,
        sent_ms: u64,
        answer: Option<u64>,
    ) {
        let running = self.hosts[host].power
            && match holder {
                Holder::Agent => self.hosts[host].agent_proc == Proc::Running,
                Holder::Controller => self.hosts[host].controller_proc == Proc::Running,
            };
        // The keeper gave the renewal up: a late answer is dropped with its task.
        if !running || self.now_ms > sent_ms + ATTEMPT_MS {
            return;
        }
        let sent = self.at(sent_ms);
        let Some(held) = self.held_mut(host, holder).filter(|h| h.id == lease) else {
            return;
        };
        match answer {
            Some(_) => held.validity.confirmed(sent),
            None => self.lease_lost(host, holder),
        }
    }

    fn lease_lost(&mut self, host: usize, holder: Holder) {
        match holder {
            Holder::Agent => self.hosts[host].agent.lease = None,
            Holder::Controller => {
                let c = &mut self.hosts[host].controller;
                if matches!(c.role, Role::Serving { .. }) {
                    c.step_downs += 1;
                }
                c.lease = None;
                c.role = Role::Standby;
                self.note(&format!(
                    "controller {} lease expired: standby",
                    HOSTS[host]
                ));
            }
        }
    }

    /// Grants a lease (and registers) when the holder has none; renews it on schedule.
    fn keep_lease(&mut self, host: usize, holder: Holder) {
        let now = self.now_ms;
        let has = match holder {
            Holder::Agent => self.hosts[host].agent.lease.is_some(),
            Holder::Controller => self.hosts[host].controller.lease.is_some(),
        };
        if !has {
            if !self.etcd_from(host) {
                return;
            }
            let id = self.store.grant(now, TTL_MS);
            let key = match holder {
                Holder::Agent => format!("nodes/{}", HOSTS[host]),
                Holder::Controller => format!("controllers/{}", HOSTS[host]),
            };
            self.store.put(&key, "up", Some(id));
            let held = Held {
                id,
                validity: Validity::granted(self.at(now), Duration::from_millis(TTL_MS)),
                next_renew_ms: now + RENEW_MS,
            };
            match holder {
                Holder::Agent => self.hosts[host].agent.lease = Some(held),
                Holder::Controller => self.hosts[host].controller.lease = Some(held),
            }
            return;
        }
        let Some(held) = self.held_mut(host, holder) else {
            return;
        };
        if now < held.next_renew_ms {
            return;
        }
        held.next_renew_ms = now + RENEW_MS;
        let lease = held.id;
        self.send(Message::KeepAlive {
            host,
            holder,
            lease,
            sent_ms: now,
            answer: None,
        });
    }
}

/// The VM's owner generation key (`daemon::pair::OWNERS`), written with every VM commit.
fn owner_key(name: &str) -> String {
    format!("owners/{name}")
}

/// The VM's stale mark key (`daemon::pair::STALE`).
fn stale_key(name: &str) -> String {
    format!("stale/{name}")
}

fn vm_key(name: &str) -> String {
    format!("vms/{name}")
}

fn encode(vm: &SimVm) -> String {
    serde_json::to_string(vm).unwrap_or_default()
}

fn decode(text: &str) -> Option<SimVm> {
    serde_json::from_str(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_timing_is_the_keepers() {
        let ttl = Duration::from_millis(TTL_MS);

        assert_eq!(Duration::from_millis(RENEW_MS), lease::renew_period(ttl));
        assert_eq!(Duration::from_millis(ATTEMPT_MS), lease::ATTEMPT_TIMEOUT);
    }
}
