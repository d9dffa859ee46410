//! The serving controller's engine: the one task that owns the pair's VM state.
//!
//! API handlers send it [`Command`]s with a reply channel; reads never do: they are answered
//! from the [`Snapshot`] it publishes after every change, so a read never waits behind an
//! agent call or an etcd write. The engine decides with the pure modules ([`crate::validate`],
//! [`crate::placement`], [`crate::vm`], [`crate::health`]), commits every new state through
//! the fenced [`Writer`] *before* it acts on it or replies, and hands agent calls to one task
//! per VM, so calls for different VMs run concurrently and a hung one stalls only its VM.
//!
//! One file per seam:
//! - `actor`: the loop, commands in, replies out, takeover;
//! - `lifecycle`: create, modify, delete, start and stop requests (validation, placement,
//!   request IDs);
//! - `effects`: persist fenced, then act: each VM's agent calls, their outcomes, waiters;
//! - `observe`: what agents and etcd report (domains, heartbeats, registrations) → host
//!   health, VM events, alerts (reconciliation);
//! - `fencing`: a lost host powered off through its BMC, and the gate HA failovers wait at;
//! - `isos`: the ISO library's records (uploads admitted and ended, deletions);
//! - `snapshots`: a VM's snapshots taken, deleted and restored through its host's agent;
//! - `ft`: FT VMs' figures from their primaries' reports, and their phase changes logged;
//! - `view`: the snapshot that reads are answered from.

mod actor;
mod alerts;
mod effects;
mod fencing;
mod ft;
mod import;
mod isos;
mod lifecycle;
mod observe;
mod protect;
mod snapshots;
mod view;

use std::sync::Arc;
use std::time::Duration;

use daemon::lease::LeaseView;
use tokio::sync::{mpsc, oneshot, watch};

use crate::agents::AgentPool;
use crate::config::Fencing;
use crate::error::ApiError;
use crate::health;
use crate::model::{Mode, VmRecord, VmSpec};
use crate::placement::Policy;
use crate::store::{Etcd, Writer};

pub use isos::IsoUpload;
pub use snapshots::Created;
pub use view::{FtRuntime, FtView, NodeView, NodesView, PathView, Snapshot};

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

/// A mutating request to the engine. `request` is the caller's request ID, if it gave one: a
/// retry with the same ID returns the first attempt's outcome instead of acting twice.
#[derive(Debug)]
pub enum Command {
    /// Create a VM.
    Create {
        /// What to create.
        spec: VmSpec,
        /// Request ID.
        request: Option<String>,
        /// Reply.
        reply: Reply<VmRecord>,
    },
    /// Delete a stopped VM (or record the intent, if its host is lost).
    Delete {
        /// Name or UUID.
        vm: String,
        /// Request ID.
        request: Option<String>,
        /// Reply: the UUID.
        reply: Reply<String>,
    },
    /// Change a stopped VM.
    Modify {
        /// Name or UUID.
        vm: String,
        /// The change.
        change: Modify,
        /// Request ID.
        request: Option<String>,
        /// Reply.
        reply: Reply<VmRecord>,
    },
    /// Power a VM off; replies once it is stopped (or the intent is recorded).
    PowerOff {
        /// Name or UUID.
        vm: String,
        /// Request ID.
        request: Option<String>,
        /// Reply.
        reply: Reply<VmRecord>,
    },
    /// Admit an ISO upload; replies with what the upload needs.
    IsoBegin {
        /// What the upload announced.
        header: crate::isos::Header,
        /// Reply.
        reply: Reply<IsoUpload>,
    },
    /// End an ISO upload: its verified SHA-256, or why it failed (its copies are removed).
    IsoFinish {
        /// The ISO.
        name: String,
        /// The outcome.
        outcome: Result<String, String>,
        /// Reply: the record as it stands now.
        reply: Reply<crate::model::IsoRecord>,
    },
    /// Delete an ISO no VM uses from every host.
    IsoDelete {
        /// The ISO.
        name: String,
        /// Reply.
        reply: Reply<()>,
    },
    /// Take a snapshot of a VM; replies once it is taken.
    SnapshotCreate {
        /// Name or UUID.
        vm: String,
        /// The admin's words.
        description: String,
        /// The consistency asked for.
        consistency: crate::snapshots::Ask,
        /// The request ID: a retry returns the first attempt's snapshot.
        request: Option<String>,
        /// Reply: the snapshot and warnings for the caller.
        reply: Reply<Created>,
    },
    /// Delete a VM's snapshot; replies once it is gone.
    SnapshotDelete {
        /// Name or UUID.
        vm: String,
        /// Snapshot ID.
        id: String,
        /// Reply.
        reply: Reply<()>,
    },
    /// Restore a stopped VM's disks from a snapshot; replies once they are written.
    SnapshotRestore {
        /// Name or UUID.
        vm: String,
        /// Snapshot ID.
        id: String,
        /// Reply.
        reply: Reply<VmRecord>,
    },
    /// Admit an export of a stopped VM, or of its snapshot: the VM is held (not started,
    /// deleted, changed or snapshotted) until [`Command::ExportEnd`].
    ExportBegin {
        /// Name or UUID.
        vm: String,
        /// The snapshot to export, if one.
        snapshot: Option<String>,
        /// Reply: what to read, and where.
        reply: Reply<crate::export::Plan>,
    },
    /// Admit an import: the VM of `spec` recorded as `Creating` and held until
    /// [`Command::ImportFinish`].
    ImportBegin {
        /// The VM to create.
        spec: crate::model::VmSpec,
        /// Reply: the record, its host's agent and the token.
        reply: Reply<crate::import::Begun>,
    },
    /// An import's disks are in place (or it failed): define the VM, or roll it back.
    ImportFinish {
        /// The VM's UUID.
        uuid: String,
        /// The outcome.
        outcome: Result<(), String>,
        /// Reply: the stopped VM, or why the import failed.
        reply: Reply<VmRecord>,
    },
    /// An export ended (however it ended): the VM is free again.
    ExportEnd {
        /// The VM's UUID.
        uuid: String,
        /// Reply.
        reply: Reply<()>,
    },
    /// Clear an open alert (an admin has seen it).
    ClearAlert {
        /// Its ID.
        id: String,
        /// The token name that clears it.
        by: String,
        /// Reply: the alert as cleared.
        reply: Reply<crate::store::Alert>,
    },
    /// Change the host-health timeouts.
    SetHealthConfig {
        /// The new configuration.
        config: health::Config,
        /// Reply.
        reply: Reply<health::Config>,
    },
    /// Shut a VM down; replies once it is stopped.
    Shutdown {
        /// Name or UUID.
        vm: String,
        /// Grace period before it is powered off.
        grace: Duration,
        /// Request ID.
        request: Option<String>,
        /// Reply.
        reply: Reply<VmRecord>,
    },
    /// Start a VM; replies once it runs.
    Start {
        /// Name or UUID.
        vm: String,
        /// Request ID.
        request: Option<String>,
        /// Reply.
        reply: Reply<VmRecord>,
    },
}

/// Sends commands to the engine and reads its snapshot; cheap to clone.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
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

    /// The engine's latest view of the pair: what reads are answered from.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
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
    /// Fenced writer; its term goes with every agent command.
    pub writer: Writer,
    /// The lease's status: agent commands wait while it is in doubt; `Alive` is quorum.
    pub lease_status: watch::Receiver<LeaseView>,
    /// Agent clients.
    pub agents: AgentPool,
    /// Capacity policy.
    pub policy: Policy,
    /// How lost hosts are fenced.
    pub fencing: Fencing,
    /// Local restarts of a crashed HA VM before it moves to the peer.
    pub max_restarts: u32,
}

/// Loads the pair's state and starts the engine task, which first finishes what a previous
/// serving controller left half done. Drop or abort the task to step down.
pub async fn start(ctx: Context) -> Result<(EngineHandle, tokio::task::JoinHandle<()>), ApiError> {
    let (tx, rx) = mpsc::channel(QUEUE);
    let (engine, snapshot) = actor::Engine::load(ctx).await?;
    let task = tokio::spawn(engine.run(rx));
    Ok((EngineHandle { tx, snapshot }, task))
}
