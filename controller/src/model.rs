//! The pair's state as stored in etcd (JSON values) and seen by the pure decision modules.
//! No proto types here: the gRPC layer converts at the edge.

use serde::{Deserialize, Serialize};

pub use daemon::pair::{HostFacts, NodeRecord, StorageGroupFacts};

/// How a VM is protected against a host failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Fault tolerant: continuous checkpoints to the peer; no reboot on host failure.
    Ft,
    /// Highly available: synchronous disk mirror; restart on the peer on host failure.
    Ha,
    /// Runs on one node only.
    Unprotected,
}

impl Mode {
    /// Lower-case name, as users type it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Ft => "ft",
            Mode::Ha => "ha",
            Mode::Unprotected => "unprotected",
        }
    }

    /// Whether the VM's disks are mirrored synchronously to the peer: HA, and FT beneath its
    /// checkpoints (the standby's disk is the replica).
    pub fn mirrored(self) -> bool {
        matches!(self, Mode::Ha | Mode::Ft)
    }
}

/// Volume file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// Raw image.
    Raw,
    /// QCOW2 image.
    Qcow2,
}

impl DiskFormat {
    /// File extension of volumes in this format.
    pub fn extension(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// Where a VM boots from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Boot {
    /// A kernel boot image from the nodes' image libraries.
    Kernel {
        /// Image name.
        image: String,
    },
    /// An ISO of the pair's ISO library, attached as a CD-ROM.
    Iso {
        /// The ISO's name in the library. Records from before the library held a host path
        /// here (`path`): such a VM fails to start with the agent's clear refusal.
        #[serde(alias = "path")]
        name: String,
        /// The storage group that keeps it on each host (filled in when the VM is created).
        #[serde(default)]
        storage_group: String,
    },
}

/// An ISO of the pair's library, as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsoRecord {
    /// Its name, unique in the library.
    pub name: String,
    /// The storage group that keeps it on each host.
    pub storage_group: String,
    /// Its size.
    pub size_bytes: u64,
    /// Lowercase hex SHA-256, once every host verified its copy.
    pub sha256: String,
    /// Where it stands.
    pub state: IsoState,
    /// When the upload began.
    pub created_unix_ms: i64,
}

/// Where an ISO of the library stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IsoState {
    /// Being uploaded: not usable yet; removed if the upload fails.
    Uploading,
    /// On every host, verified: VMs may boot from it.
    Ready,
    /// Being deleted from the hosts.
    Deleting,
}

/// A disk a user asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRequest {
    /// Size in bytes.
    pub size_bytes: u64,
    /// Storage group.
    pub storage_group: String,
    /// Format.
    pub format: DiskFormat,
}

/// A disk of a VM, with the name of its volume on the nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Size in bytes.
    pub size_bytes: u64,
    /// Storage group.
    pub storage_group: String,
    /// Format.
    pub format: DiskFormat,
    /// Volume file name in the storage group.
    pub volume: String,
}

/// A NIC of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// Business network.
    pub network: String,
    /// Stable MAC address.
    pub mac: String,
}

/// What the pair does with a VM whose host is lost once the host returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Intent {
    /// Keep it running: start it again if it stopped.
    Resume,
    /// Power it off.
    PowerOff,
    /// Delete it with its volumes.
    Delete,
}

impl Intent {
    /// Short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Intent::Resume => "resume",
            Intent::PowerOff => "power off",
            Intent::Delete => "delete",
        }
    }
}

/// A VM's lifecycle state (see [`crate::vm`] for the transitions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "lowercase")]
pub enum VmState {
    /// Volumes and domain are being created; the create has not been acknowledged.
    Creating,
    /// Not running.
    Stopped,
    /// Being started.
    Starting,
    /// Running.
    Running,
    /// Being shut down; powered off at `deadline_unix_ms` if still running.
    Stopping {
        /// When the grace period ends.
        deadline_unix_ms: i64,
        /// Set once the VM has been powered off rather than asked.
        forced: bool,
    },
    /// Its domain and volumes are being removed.
    Deleting,
    /// Its domain is paused by QEMU (an I/O error, a full disk): the guest is frozen.
    Paused,
    /// Its host is lost: what runs there cannot be seen or commanded until the host returns.
    Lost {
        /// What to do once the host returns.
        intent: Intent,
    },
}

impl VmState {
    /// Short name for logs and messages.
    pub fn name(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping { .. } => "stopping",
            VmState::Deleting => "deleting",
            VmState::Paused => "paused",
            VmState::Lost { .. } => "lost",
        }
    }
}

/// What a user asks for when creating a VM (or the result of applying a modification).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Unique name.
    pub name: String,
    /// Protection mode.
    pub mode: Mode,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disks, in guest order.
    pub disks: Vec<DiskRequest>,
    /// Business networks, one NIC each.
    pub networks: Vec<String>,
    /// Boot source.
    pub boot: Boot,
}

/// A VM as stored in etcd under `vms/<uuid>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Stable UUID (also the libvirt domain UUID).
    pub uuid: String,
    /// Unique name (also the libvirt domain name).
    pub name: String,
    /// Protection mode.
    pub mode: Mode,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disks in guest order.
    pub disks: Vec<Disk>,
    /// NICs in guest order.
    pub nics: Vec<Nic>,
    /// Boot source.
    pub boot: Boot,
    /// Node the VM runs on or will start on.
    pub node: String,
    /// Ownership generation: raised each time the pair assigns where the VM runs (every
    /// start), committed before any agent is told; agents refuse commands of older ones.
    #[serde(default)]
    pub generation: u64,
    /// Lifecycle state.
    pub state: VmState,
    /// Why it is in that state.
    pub state_reason: String,
    /// Creation time.
    pub created_unix_ms: i64,
    /// Time of the last change.
    pub updated_unix_ms: i64,
    /// HA: which hosts hold a current copy of the disks, the mirror, the last failover.
    #[serde(default)]
    pub protection: crate::ha::Protection,
    /// Its snapshots, oldest first.
    #[serde(default)]
    pub snapshots: Vec<Snapshot>,
    /// The number the next snapshot's ID gets (IDs are never reused).
    #[serde(default)]
    pub next_snapshot: u64,
}

/// A snapshot of a VM's disks, kept on the host named.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Its ID, unique for the VM: "1", "2", ...
    pub id: String,
    /// The admin's words.
    #[serde(default)]
    pub description: String,
    /// When it was asked for.
    pub created_unix_ms: i64,
    /// How consistent its data is.
    pub consistency: Consistency,
    /// The hosts that hold its files: where it was taken, and the peer when it has a copy.
    pub nodes: Vec<String>,
    /// Bytes its files take.
    #[serde(default)]
    pub bytes: u64,
    /// Whether it holds only the changes since the snapshot before it.
    #[serde(default)]
    pub incremental: bool,
    /// How long the guest's disk I/O was held for it, in microseconds.
    #[serde(default)]
    pub freeze_us: u64,
    /// Where it stands.
    pub state: SnapshotState,
}

/// How consistent a snapshot's data is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// The disks as a power cut would leave them.
    Crash,
    /// The guest's file systems frozen by its guest agent first.
    Application,
}

/// Where a snapshot stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotState {
    /// Being taken.
    Creating,
    /// Taken: it can be restored.
    Ready,
    /// Being deleted.
    Deleting,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_state_stopping_serializes_with_phase_tag() {
        let state = VmState::Stopping {
            deadline_unix_ms: 5,
            forced: false,
        };

        let json = serde_json::to_string(&state).unwrap();

        assert_eq!(
            json,
            r#"{"phase":"stopping","deadline_unix_ms":5,"forced":false}"#
        );
    }

    #[test]
    fn boot_kernel_round_trips_through_json() {
        let boot = Boot::Kernel {
            image: "tiny".into(),
        };

        let back: Boot = serde_json::from_str(&serde_json::to_string(&boot).unwrap()).unwrap();

        assert_eq!(back, boot);
    }
}
