//! Capacity accounting and placement, as pure functions.
//!
//! Every VM of the pair must be able to run on either node (after a failover all run on one),
//! so demand is summed over all VMs, running or not, and checked against the *smaller* node.
//! A VM's demand carries everRun's overhead: FT +2 vCPUs, HA +1 vCPU, and +20 % memory;
//! each node keeps a system reserve.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::model::{DiskRequest, HostFacts, Mode, VmRecord};

/// A node and what it reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInventory {
    /// Node name.
    pub name: String,
    /// Its facts.
    pub facts: HostFacts,
}

/// The nodes that have reported facts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Nodes in name order.
    pub nodes: Vec<NodeInventory>,
}

impl Inventory {
    /// Names of the nodes whose facts fail `has`.
    pub fn nodes_lacking(&self, has: impl Fn(&HostFacts) -> bool) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| !has(&n.facts))
            .map(|n| n.name.clone())
            .collect()
    }

    /// The items every node has, sorted.
    pub fn common(&self, items: impl Fn(&HostFacts) -> BTreeSet<String>) -> Vec<String> {
        let mut sets = self.nodes.iter().map(|n| items(&n.facts));
        let Some(first) = sets.next() else {
            return Vec::new();
        };
        sets.fold(first, |acc, s| acc.intersection(&s).cloned().collect())
            .into_iter()
            .collect()
    }
}

/// The system reserve and vCPU overcommit, from the controller config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// vCPUs each node keeps for the system.
    pub reserve_vcpus: u32,
    /// Memory each node keeps for the system (MiB).
    pub reserve_memory_mib: u64,
    /// vCPUs per logical CPU (1 = no overcommit).
    pub vcpu_overcommit: u32,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            reserve_vcpus: 2,
            reserve_memory_mib: 4096,
            vcpu_overcommit: 1,
        }
    }
}

/// What a VM takes from a node, overhead included.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    /// vCPUs.
    pub vcpus: u64,
    /// Memory in MiB.
    pub memory_mib: u64,
}

/// A VM's demand: its vCPUs plus 2 (FT) or 1 (HA), and its memory plus 20 % (rounded up).
pub fn demand(mode: Mode, vcpus: u32, memory_mib: u64) -> Demand {
    let overhead = match mode {
        Mode::Ft => 2,
        Mode::Ha => 1,
        Mode::Unprotected => 0,
    };
    Demand {
        vcpus: u64::from(vcpus) + overhead,
        memory_mib: (memory_mib * 6).div_ceil(5),
    }
}

/// Free capacity on the smaller node, and which node limits each resource.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Free {
    /// vCPUs left.
    pub vcpus: u64,
    /// The node with the fewest vCPUs.
    pub vcpu_node: String,
    /// Memory left (MiB).
    pub memory_mib: u64,
    /// The node with the least memory.
    pub memory_node: String,
}

/// Capacity left on the smaller node after the reserve and the demand of `vms`.
pub fn free<'a>(
    policy: &Policy,
    inventory: &Inventory,
    vms: impl Iterator<Item = &'a VmRecord>,
) -> Free {
    let used = vms.fold(Demand::default(), |acc, vm| {
        let d = demand(vm.mode, vm.vcpus, vm.memory_mib);
        Demand {
            vcpus: acc.vcpus + d.vcpus,
            memory_mib: acc.memory_mib + d.memory_mib,
        }
    });
    let vcpus = inventory
        .nodes
        .iter()
        .map(|n| {
            let total = u64::from(n.facts.cpus) * u64::from(policy.vcpu_overcommit.max(1));
            (
                total.saturating_sub(u64::from(policy.reserve_vcpus)),
                &n.name,
            )
        })
        .min();
    let memory = inventory
        .nodes
        .iter()
        .map(|n| {
            let total = n.facts.memory_mib.saturating_sub(policy.reserve_memory_mib);
            (total, &n.name)
        })
        .min();
    let (vcpu_total, vcpu_node) = vcpus.map(|(t, n)| (t, n.clone())).unwrap_or_default();
    let (memory_total, memory_node) = memory.map(|(t, n)| (t, n.clone())).unwrap_or_default();
    Free {
        vcpus: vcpu_total.saturating_sub(used.vcpus),
        vcpu_node,
        memory_mib: memory_total.saturating_sub(used.memory_mib),
        memory_node,
    }
}

/// A VM being created or resized, as capacity sees it.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    /// Protection mode.
    pub mode: Mode,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disks still to be created (none when resizing).
    pub new_disks: &'a [DiskRequest],
}

/// Checks that `vm` fits next to `others` on the smaller node.
pub fn check<'a>(
    policy: &Policy,
    inventory: &Inventory,
    others: impl Iterator<Item = &'a VmRecord>,
    vm: &Candidate<'_>,
) -> Result<(), ApiError> {
    let need = demand(vm.mode, vm.vcpus, vm.memory_mib);
    let free = free(policy, inventory, others);
    if need.vcpus > free.vcpus {
        return Err(ApiError::ResourceExhausted {
            resource: "vCPUs".into(),
            needed: need.vcpus,
            available: free.vcpus,
            unit: "",
            node: free.vcpu_node,
            hint: "an FT VM takes 2 extra vCPUs and an HA VM 1; lower the vCPUs, change the mode or delete a VM",
        });
    }
    if need.memory_mib > free.memory_mib {
        return Err(ApiError::ResourceExhausted {
            resource: "memory".into(),
            needed: need.memory_mib,
            available: free.memory_mib,
            unit: " MiB",
            node: free.memory_node,
            hint: "every VM takes 20 % extra memory; lower the memory or delete a VM",
        });
    }
    storage(inventory, vm.new_disks)
}

/// Checks that each storage group has room for the new disks on the smaller node.
fn storage(inventory: &Inventory, new_disks: &[DiskRequest]) -> Result<(), ApiError> {
    let groups: BTreeSet<&str> = new_disks.iter().map(|d| d.storage_group.as_str()).collect();
    for group in groups {
        let need: u64 = new_disks
            .iter()
            .filter(|d| d.storage_group == group)
            .map(|d| d.size_bytes)
            .sum();
        let smallest = inventory
            .nodes
            .iter()
            .filter_map(|n| {
                n.facts
                    .storage_groups
                    .get(group)
                    .map(|g| (g.free_bytes, &n.name))
            })
            .min();
        if let Some((free_bytes, node)) = smallest
            && need > free_bytes
        {
            return Err(ApiError::ResourceExhausted {
                resource: format!("space in storage group {group}"),
                needed: need >> 20,
                available: free_bytes >> 20,
                unit: " MiB",
                node: node.clone(),
                hint: "use smaller disks or another storage group",
            });
        }
    }
    Ok(())
}

/// The node a new VM should run on: the one whose VMs take the least memory (then by name).
pub fn choose_node(inventory: &Inventory, vms: &[&VmRecord]) -> Option<String> {
    inventory
        .nodes
        .iter()
        .map(|n| {
            let load: u64 = vms
                .iter()
                .filter(|vm| vm.node == n.name)
                .map(|vm| demand(vm.mode, vm.vcpus, vm.memory_mib).memory_mib)
                .sum();
            (load, &n.name)
        })
        .min()
        .map(|(_, name)| name.clone())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{Boot, DiskFormat, StorageGroupFacts, VmState};

    pub(crate) fn facts(cpus: u32, memory_mib: u64) -> HostFacts {
        HostFacts {
            cpus,
            memory_mib,
            storage_groups: BTreeMap::from([(
                "sg0".to_string(),
                StorageGroupFacts {
                    total_bytes: 100 << 30,
                    free_bytes: 50 << 30,
                },
            )]),
            networks: BTreeSet::from(["business".to_string()]),
            boot_images: BTreeSet::from(["tiny".to_string()]),
            qemu_version: "10.0.2".into(),
            libvirt_version: "9.0.0".into(),
        }
    }

    /// Two nodes: n0 with 16 CPUs / 32 GiB, n1 with 8 CPUs / 16 GiB.
    pub(crate) fn inventory() -> Inventory {
        Inventory {
            nodes: vec![
                NodeInventory {
                    name: "n0".into(),
                    facts: facts(16, 32768),
                },
                NodeInventory {
                    name: "n1".into(),
                    facts: facts(8, 16384),
                },
            ],
        }
    }

    pub(crate) fn vm(name: &str, mode: Mode, vcpus: u32, memory_mib: u64, node: &str) -> VmRecord {
        VmRecord {
            uuid: format!("uuid-{name}"),
            name: name.into(),
            mode,
            vcpus,
            memory_mib,
            disks: vec![],
            nics: vec![],
            boot: Boot::Kernel {
                image: "tiny".into(),
            },
            node: node.into(),
            generation: 1,
            state: VmState::Stopped,
            state_reason: String::new(),
            created_unix_ms: 0,
            updated_unix_ms: 0,
            protection: crate::ha::Protection::default(),
            snapshots: Vec::new(),
            next_snapshot: 1,
        }
    }

    const POLICY: Policy = Policy {
        reserve_vcpus: 2,
        reserve_memory_mib: 4096,
        vcpu_overcommit: 1,
    };

    #[test]
    fn demand_ft_adds_two_vcpus_and_a_fifth_of_memory() {
        let d = demand(Mode::Ft, 4, 1000);

        assert_eq!(
            d,
            Demand {
                vcpus: 6,
                memory_mib: 1200
            }
        );
    }

    #[test]
    fn demand_ha_adds_one_vcpu() {
        let d = demand(Mode::Ha, 4, 1000);

        assert_eq!(d.vcpus, 5);
    }

    #[test]
    fn demand_unprotected_adds_no_vcpu() {
        let d = demand(Mode::Unprotected, 4, 1000);

        assert_eq!(d.vcpus, 4);
    }

    #[test]
    fn demand_memory_overhead_rounds_up() {
        let d = demand(Mode::Ha, 1, 1001);

        assert_eq!(d.memory_mib, 1202);
    }

    #[test]
    fn free_counts_smaller_node_minus_reserve_and_vms() {
        let vms = [vm("a", Mode::Ft, 2, 1000, "n0")];

        let f = free(&POLICY, &inventory(), vms.iter());

        assert_eq!(
            f,
            Free {
                vcpus: 8 - 2 - 4,
                vcpu_node: "n1".into(),
                memory_mib: 16384 - 4096 - 1200,
                memory_node: "n1".into(),
            }
        );
    }

    #[test]
    fn check_exactly_fitting_vcpus_is_accepted() {
        // n1: 8 CPUs - 2 reserve = 6 = 4 vCPUs + 2 FT overhead.
        let result = check(
            &POLICY,
            &inventory(),
            [].iter(),
            &Candidate {
                mode: Mode::Ft,
                vcpus: 4,
                memory_mib: 1024,
                new_disks: &[],
            },
        );

        assert_eq!(result, Ok(()));
    }

    #[test]
    fn check_one_vcpu_too_many_names_vcpus() {
        let result = check(
            &POLICY,
            &inventory(),
            [].iter(),
            &Candidate {
                mode: Mode::Ft,
                vcpus: 5,
                memory_mib: 1024,
                new_disks: &[],
            },
        );

        assert!(matches!(
            result,
            Err(ApiError::ResourceExhausted { ref resource, needed: 7, available: 6, ref node, .. })
                if resource == "vCPUs" && node == "n1"
        ));
    }

    #[test]
    fn check_exactly_fitting_memory_is_accepted() {
        // n1: 16384 - 4096 = 12288 MiB = 10240 * 1.2.
        let result = check(
            &POLICY,
            &inventory(),
            [].iter(),
            &Candidate {
                mode: Mode::Ha,
                vcpus: 1,
                memory_mib: 10240,
                new_disks: &[],
            },
        );

        assert_eq!(result, Ok(()));
    }

    #[test]
    fn check_memory_over_by_one_mib_names_memory() {
        let result = check(
            &POLICY,
            &inventory(),
            [].iter(),
            &Candidate {
                mode: Mode::Ha,
                vcpus: 1,
                memory_mib: 10241,
                new_disks: &[],
            },
        );

        assert!(matches!(
            result,
            Err(ApiError::ResourceExhausted { ref resource, needed: 12290, available: 12288, .. })
                if resource == "memory"
        ));
    }

    #[test]
    fn check_counts_existing_vms_overhead() {
        let others = [vm("a", Mode::Ha, 3, 1024, "n0")];

        let result = check(
            &POLICY,
            &inventory(),
            others.iter(),
            &Candidate {
                mode: Mode::Ha,
                vcpus: 2,
                memory_mib: 1024,
                new_disks: &[],
            },
        );

        assert!(matches!(
            result,
            Err(ApiError::ResourceExhausted {
                needed: 3,
                available: 2,
                ..
            })
        ));
    }

    #[test]
    fn check_disk_larger_than_free_space_names_storage_group() {
        let disks = [DiskRequest {
            size_bytes: 51 << 30,
            storage_group: "sg0".into(),
            format: DiskFormat::Raw,
        }];

        let result = check(
            &POLICY,
            &inventory(),
            [].iter(),
            &Candidate {
                mode: Mode::Ha,
                vcpus: 1,
                memory_mib: 1024,
                new_disks: &disks,
            },
        );

        assert!(matches!(
            result,
            Err(ApiError::ResourceExhausted { ref resource, .. }) if resource == "space in storage group sg0"
        ));
    }

    #[test]
    fn choose_node_picks_less_loaded_node() {
        let vms = [vm("a", Mode::Ha, 1, 1024, "n0")];

        let node = choose_node(&inventory(), &vms.iter().collect::<Vec<_>>());

        assert_eq!(node.as_deref(), Some("n1"));
    }

    #[test]
    fn choose_node_tie_picks_first_by_name() {
        let node = choose_node(&inventory(), &[]);

        assert_eq!(node.as_deref(), Some("n0"));
    }
}
