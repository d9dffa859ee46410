//! The deterministic pair simulator: two hosts (each an agent and a controller), a witness,
//! an in-memory etcd with leases and revisions ([`store`]), a virtual clock, delayed messages,
//! and faults: `kill`, `pause`, `power_off`, `isolate`, `cut_path`, `kill_witness`,
//! `etcd_election`, `recover`. The models call the real decision code — lease validity
//! (`daemon::lease::Validity`), host health (`crate::health`), the VM state machine
//! (`crate::vm`) and the agents' fencing rule (`daemon::fence`) — in the order the daemons do:
//! a controller acts only while its lease is confirmed, persists every decision with a fenced
//! write before commanding an agent, and sends its term and the VM's generation along.
//!
//! VM `a` is HA: the serving controller fails it over when its host is lost and its copy on
//! the peer is current (`crate::ha`, the mirror taken as ready whenever the peer is up), and
//! its agent stops it when the host lease is in doubt (self-fence). `World::make_ft` makes it
//! FT: a failover's start then resumes the standby when the record says so, and its phases
//! (`crate::ft`) are traced.
//!
//! An FT primary's epochs fail when its standby cannot commit them (the peer down, both
//! A-Links cut, or the standby resumed); its output is then held until its stale mark lands,
//! conditional on its host lease and its VM's owner generation (`stale/`, `owners/` in the
//! store), and a failover commits only while no mark stands. The serving controller resumes
//! an FT VM's standby as soon as the primary's host is unreachable (`health::Host::unreachable`),
//! without waiting for its lease.
//!
//! Every step checks two safety properties:
//! - **one owner**: no VM runs on two powered hosts at once, and no ownership generation is
//!   started on two hosts; for an FT VM "runs" means its output flows (a run whose output is
//!   held forever may linger: nobody ever sees it);
//! - **no old term acts**: once a command of some term and generation ran for a VM (on any
//!   host), no command of an older term or generation for that VM runs anywhere.
//!
//! Split-brain cases are written here first (`scenarios`), then in the daemons.

mod model;
mod scenarios;
mod store;

use std::collections::{BTreeMap, BTreeSet};

use crate::model::VmState;
pub use model::World;

/// The two hosts' names.
pub const HOSTS: [&str; 2] = ["n0", "n1"];
/// Role links between the hosts that carry heartbeats besides management.
pub const ROLE_PATHS: [&str; 3] = ["priv0", "alink1", "alink2"];

/// A VM as the simulated pair stores it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SimVm {
    /// Its state.
    pub state: VmState,
    /// Its host: 0 or 1.
    pub host: usize,
    /// Its ownership generation.
    pub generation: u64,
    /// HA: restarted on the peer when its host is lost, and stopped by its agent when the
    /// host lease cannot be renewed.
    #[serde(default)]
    pub protected: bool,
    /// HA: which hosts' copies are current (`crate::ha`).
    #[serde(default)]
    pub protection: crate::ha::Protection,
    /// FT (with `protected`): a failover's start resumes the standby on the new host when the
    /// record says it holds a checkpoint of the run (`Protection::resume_standby`).
    #[serde(default)]
    pub ft: bool,
}

/// A command carried out by an agent, for the property checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Executed {
    /// When.
    pub at_ms: u64,
    /// The agent's host.
    pub host: usize,
    /// The VM.
    pub vm: String,
    /// Start (true) or power-off.
    pub start: bool,
    /// Its term and generation.
    pub term: i64,
    /// Its generation.
    pub generation: u64,
    /// A start that resumed an FT standby instead of booting.
    pub resume: bool,
}

/// The safety properties, checked on a world.
pub fn violations(world: &World) -> Vec<String> {
    let mut found = world.violations.clone();
    let mut running: BTreeMap<&str, usize> = BTreeMap::new();
    for (index, host) in world.hosts.iter().enumerate() {
        if !host.power {
            continue;
        }
        for vm in host.agent.domains.keys() {
            if host.agent.held.contains(vm) {
                continue;
            }
            *running.entry(vm.as_str()).or_default() += 1;
            if running[vm.as_str()] > 1 {
                found.push(format!(
                    "t={} VM {vm} runs on two hosts (also on {})",
                    world.now_ms, HOSTS[index]
                ));
            }
        }
    }
    let mut owners: BTreeMap<(&str, u64), BTreeSet<usize>> = BTreeMap::new();
    for e in world.executed.iter().filter(|e| e.start) {
        owners
            .entry((e.vm.as_str(), e.generation))
            .or_default()
            .insert(e.host);
    }
    for ((vm, generation), hosts) in owners {
        if hosts.len() > 1 {
            found.push(format!(
                "VM {vm} generation {generation} was started on two hosts"
            ));
        }
    }
    found
}
