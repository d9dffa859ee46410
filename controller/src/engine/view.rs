//! The engine's snapshot: what `GetVm`, `ListVms`, `ListNodes` and `ListAlerts` are answered
//! from, published after every change so reads never wait on the engine.

use std::collections::BTreeMap;

use crate::error::ApiError;
use crate::health::{self, HostState};
use crate::model::{NodeRecord, VmRecord, VmState};
use crate::placement::Free;
use crate::store::Alert;

/// What one host hears of the other on one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathView {
    /// Path name.
    pub name: String,
    /// Whether the listener heard the host within the path timeout.
    pub up: bool,
    /// Milliseconds since the last heartbeat, if any was heard.
    pub since_ms: Option<u64>,
}

/// A node as the serving controller sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// Its registration (or last known record).
    pub record: NodeRecord,
    /// Its health.
    pub health: HostState,
    /// Why.
    pub health_reason: String,
    /// Whether its host lease (its registration) is alive.
    pub lease_alive: bool,
    /// Whether its agent answered the last poll.
    pub agent_up: bool,
    /// Whether its controller is registered (alive).
    pub controller_up: bool,
    /// Its controller's API address (empty while it is down).
    pub api_address: String,
    /// What the other host hears of it on each path.
    pub paths: Vec<PathView>,
    /// VMs running there.
    pub running_vms: u32,
}

/// The nodes, which one serves, and the capacity left.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodesView {
    /// The pair's nodes.
    pub nodes: Vec<NodeView>,
    /// The serving node.
    pub serving: String,
    /// Capacity left for new VMs.
    pub free: Free,
}

/// The engine's state as reads see it.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Every VM by UUID.
    pub vms: BTreeMap<String, VmRecord>,
    /// The nodes.
    pub nodes: NodesView,
    /// Open alerts by ID.
    pub alerts: BTreeMap<String, Alert>,
    /// The host-health timeouts.
    pub health_config: health::Config,
}

impl Snapshot {
    /// The VM named by `vm` (a name or a UUID).
    pub fn vm(&self, vm: &str) -> Result<VmRecord, ApiError> {
        self.vms
            .get(vm)
            .or_else(|| self.vms.values().find(|r| r.name == vm))
            .cloned()
            .ok_or_else(|| ApiError::NotFound { vm: vm.to_string() })
    }
}

/// How many of `vms` count as running on `node` (running or paused there).
pub fn running_on<'a>(vms: impl Iterator<Item = &'a VmRecord>, node: &str) -> u32 {
    let count = vms
        .filter(|r| r.node == node && matches!(r.state, VmState::Running | VmState::Paused))
        .count();
    u32::try_from(count).unwrap_or(u32::MAX)
}
