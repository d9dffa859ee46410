//! The part of the pair's etcd state that both daemons read or write: host registrations (an
//! agent's, bound to its host lease), the pair's members, who serves with which term, and the
//! marks an agent leaves when a mirror to the peer broke, and the VM owner generations that
//! those marks are conditional on.
//! Values are JSON. The controller's own keys (VMs, requests, alerts) live in its `store`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Prefix of every key Pairvisor owns.
pub const PREFIX: &str = "/pairvisor/";
/// Prefix of host registrations: `nodes/<name>` → [`NodeRecord`], bound to the agent's lease.
pub const NODES: &str = "/pairvisor/nodes/";
/// Prefix of the pair's members: the same record without a lease, kept while a host is down
/// so that capacity still counts the smaller host.
pub const MEMBERS: &str = "/pairvisor/members/";
/// Who serves now, with its term: written by the elected controller once it has taken over.
pub const LEADER: &str = "/pairvisor/leader";

/// Prefix of stale marks: `stale/<vm uuid>` → [`StaleMark`], written by the agent of an HA
/// VM's host when its mirror to the peer broke, before the guest may see a write complete
/// that the peer lacks. A failover to the marked peer is refused while the mark stands.
pub const STALE: &str = "/pairvisor/stale/";

/// Key of a VM's stale mark.
pub fn stale_key(vm_uuid: &str) -> String {
    format!("{STALE}{vm_uuid}")
}

/// Prefix of VM owners: `owners/<vm uuid>` → the VM's ownership generation in decimal,
/// written by the controller in every write of the VM's record. A stale mark is written only
/// while it still holds the generation of the mirror path that broke: once the pair has moved
/// the VM (a failover raises the generation), a late mark from its old host is refused.
pub const OWNERS: &str = "/pairvisor/owners/";

/// Key of a VM's owner generation.
pub fn owner_key(vm_uuid: &str) -> String {
    format!("{OWNERS}{vm_uuid}")
}

/// The value of a VM's owner key for ownership generation `generation`.
pub fn owner_value(generation: u64) -> String {
    generation.to_string()
}

/// Key of a host registration.
pub fn node_key(name: &str) -> String {
    format!("{NODES}{name}")
}

/// Key of a pair member.
pub fn member_key(name: &str) -> String {
    format!("{MEMBERS}{name}")
}

/// Capacity of a storage group on one host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageGroupFacts {
    /// Size of its file system.
    pub total_bytes: u64,
    /// Free space.
    pub free_bytes: u64,
}

/// What an agent reports about its host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    /// Logical CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Storage groups by name.
    pub storage_groups: BTreeMap<String, StorageGroupFacts>,
    /// Business networks.
    pub networks: BTreeSet<String>,
    /// Boot images.
    pub boot_images: BTreeSet<String>,
    /// QEMU version.
    pub qemu_version: String,
    /// libvirt version.
    pub libvirt_version: String,
}

/// A host as its agent registers it under `nodes/<name>`, bound to the host lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node name.
    pub name: String,
    /// Address of the node's agent.
    pub agent_address: String,
    /// Host facts.
    pub facts: HostFacts,
}

/// The serving controller's announcement: who serves, where its API is, and its term.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// Node name.
    pub node: String,
    /// Its API address.
    pub api_address: String,
    /// Its term: the creation revision of its election key. Agents refuse older terms.
    #[serde(default)]
    pub term: i64,
}

/// A VM's copy on `peer` fell behind the one on `writer`: the mirror between them broke.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleMark {
    /// The host whose copy is current (the VM runs there).
    pub writer: String,
    /// The host whose copy is behind.
    pub peer: String,
    /// The mirror path that broke (its creation time, Unix ms): a mark older than the path of
    /// a mirror in sync since is obsolete.
    pub path: i64,
    /// When the mark was written.
    pub at_unix_ms: i64,
}

/// JSON of a record. Our records are plain structs of strings, numbers and maps with string
/// keys, so serializing them cannot fail.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_info_without_term_decodes_as_term_zero() {
        let text = br#"{"node":"n1","api_address":"10.0.0.2:7400"}"#;

        let info: LeaderInfo = serde_json::from_slice(text).unwrap();

        assert_eq!(info.term, 0);
    }
}
