//! The engine's snapshot: what `GetVm`, `ListVms`, `ListNodes` and `ListAlerts` are answered
//! from, published after every change so reads never wait on the engine.

use std::collections::BTreeMap;

use crate::error::ApiError;
use crate::ft::{self, FtPhase, FtSeen, Metrics};
use crate::health::{self, HostState};
use crate::model::{Mode, NodeRecord, VmRecord, VmState};
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

/// One A-Link as a host's agent last reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlinkView {
    /// Its name ("alink1", "alink2").
    pub name: String,
    /// Whether it is up.
    pub up: bool,
    /// Bytes sent since the agent started.
    pub bytes_sent: u64,
    /// Bytes received since the agent started.
    pub bytes_received: u64,
    /// Frames resent on the other link after this one failed.
    pub retransmits: u64,
    /// The last keepalive round trip, in microseconds.
    pub rtt_us: Option<u64>,
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
    /// Its side of each A-Link (empty when its agent did not answer).
    pub alinks: Vec<AlinkView>,
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

/// What the engine saw of an FT VM's checkpointing beyond its record (kept in memory only: a
/// new serving controller starts over from its own polls).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FtRuntime {
    /// Its primary's FT report in the last poll that counted, if it had one.
    pub seen: Option<FtSeen>,
    /// The figures from successive reports (their host is the one `seen` came from).
    pub metrics: Option<Metrics>,
}

impl FtRuntime {
    /// The last report, if it came from `node` (where the VM is recorded now).
    pub fn seen_on(&self, node: &str) -> Option<&FtSeen> {
        self.seen
            .as_ref()
            .filter(|_| self.metrics.as_ref().is_some_and(|m| m.node == node))
    }
}

/// An FT VM's phase and figures, for reads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FtView {
    /// Its phase (`None`: it does not run).
    pub phase: Option<FtPhase>,
    /// Its figures, once a primary reported.
    pub metrics: Option<Metrics>,
}

/// The engine's state as reads see it.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Every VM by UUID.
    pub vms: BTreeMap<String, VmRecord>,
    /// FT VMs' checkpointing by UUID, as last seen.
    pub ft: BTreeMap<String, FtRuntime>,
    /// Mirrored VMs' disk writes by UUID, as last reported.
    pub disk_writes: BTreeMap<String, Vec<proto::agent::DiskWrites>>,
    /// The nodes.
    pub nodes: NodesView,
    /// Open alerts by ID.
    pub alerts: BTreeMap<String, Alert>,
    /// The ISO library by name.
    pub isos: BTreeMap<String, crate::model::IsoRecord>,
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

    /// The phase and figures of `record` if it is an FT VM (`record` may be newer than the
    /// snapshot: a mutating call's reply).
    pub fn ft(&self, record: &VmRecord) -> Option<FtView> {
        if record.mode != Mode::Ft {
            return None;
        }
        let runtime = self.ft.get(&record.uuid);
        let seen = runtime.and_then(|r| r.seen_on(&record.node));
        Some(FtView {
            phase: ft::phase_of(record, seen),
            metrics: runtime.and_then(|r| r.metrics.clone()),
        })
    }
}

impl Snapshot {
    /// The writes to `record`'s mirrored disks as its host last reported them (none when
    /// it runs without mirrors).
    pub fn disk_writes(&self, record: &VmRecord) -> &[proto::agent::DiskWrites] {
        self.disk_writes
            .get(&record.uuid)
            .map_or(&[], Vec::as_slice)
    }
}

/// How many of `vms` count as running on `node` (running or paused there).
pub fn running_on<'a>(vms: impl Iterator<Item = &'a VmRecord>, node: &str) -> u32 {
    let count = vms
        .filter(|r| r.node == node && matches!(r.state, VmState::Running | VmState::Paused))
        .count();
    u32::try_from(count).unwrap_or(u32::MAX)
}
