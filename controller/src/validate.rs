//! Validation of VM specs against everRun's per-VM limits and what both nodes offer.
//! Pure: every error names the field and says what is allowed.

use crate::error::ApiError;
use crate::model::{Boot, DiskFormat, Mode, VmSpec};
use crate::placement::Inventory;

/// Longest VM name.
pub const MAX_NAME_LEN: usize = 64;
/// Most vCPUs per VM.
pub const MAX_VCPUS: u32 = 20;
/// Least memory per VM (MiB).
pub const MIN_MEMORY_MIB: u64 = 128;
/// Most memory per VM (MiB): 256 GiB.
pub const MAX_MEMORY_MIB: u64 = 256 * 1024;
/// Most disks per VM.
pub const MAX_DISKS: usize = 12;
/// Most networks per VM.
pub const MAX_NETWORKS: usize = 20;
/// Disk sizes are whole MiB.
pub const DISK_SIZE_UNIT: u64 = 1 << 20;
/// Largest disk: 16 TiB.
pub const MAX_DISK_BYTES: u64 = 16 << 40;

/// Checks a VM name: 1–64 letters, digits, '-', '_' or '.', starting with a letter or digit.
pub fn name(name: &str) -> Result<(), ApiError> {
    let rule = "use 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit";
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(ApiError::invalid(
            "name",
            format!("{name:?} has {} characters; {rule}", name.len()),
        ));
    }
    let first_ok = name.starts_with(|c: char| c.is_ascii_alphanumeric());
    let rest_ok = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !first_ok || !rest_ok {
        return Err(ApiError::invalid(
            "name",
            format!("{name:?} is not allowed; {rule}"),
        ));
    }
    Ok(())
}

/// Checks vCPUs and memory.
pub fn size(vcpus: u32, memory_mib: u64) -> Result<(), ApiError> {
    if !(1..=MAX_VCPUS).contains(&vcpus) {
        return Err(ApiError::invalid(
            "vcpus",
            format!("{vcpus} is out of range; a VM has 1 to {MAX_VCPUS} vCPUs"),
        ));
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
        return Err(ApiError::invalid(
            "memory",
            format!(
                "{memory_mib} MiB is out of range; a VM has {MIN_MEMORY_MIB} MiB to {MAX_MEMORY_MIB} MiB (256 GiB)"
            ),
        ));
    }
    Ok(())
}

/// A protected VM's disks must be raw: the replica on the peer is served byte for byte, and a
/// qcow2 file is smaller than the disk it holds.
pub fn protected_formats(
    mode: Mode,
    formats: impl IntoIterator<Item = DiskFormat>,
) -> Result<(), ApiError> {
    if mode == Mode::Unprotected {
        return Ok(());
    }
    match formats.into_iter().position(|f| f == DiskFormat::Qcow2) {
        Some(i) => Err(ApiError::invalid(
            format!("disks[{i}].format"),
            format!(
                "a {} VM's disks are mirrored to the peer and must be raw for now; use raw, or mode unprotected",
                mode.as_str()
            ),
        )),
        None => Ok(()),
    }
}

/// Checks a whole spec for a new VM against the limits and the nodes' inventory.
pub fn spec(spec: &VmSpec, inventory: &Inventory) -> Result<(), ApiError> {
    name(&spec.name)?;
    size(spec.vcpus, spec.memory_mib)?;
    disks(spec, inventory)?;
    networks(spec, inventory)?;
    boot(&spec.boot, inventory)
}

fn disks(spec: &VmSpec, inventory: &Inventory) -> Result<(), ApiError> {
    if spec.disks.is_empty() || spec.disks.len() > MAX_DISKS {
        return Err(ApiError::invalid(
            "disks",
            format!(
                "{} disks given; a VM has 1 to {MAX_DISKS}",
                spec.disks.len()
            ),
        ));
    }
    protected_formats(spec.mode, spec.disks.iter().map(|d| d.format))?;
    for (i, disk) in spec.disks.iter().enumerate() {
        let field = format!("disks[{i}]");
        if disk.size_bytes == 0
            || !disk.size_bytes.is_multiple_of(DISK_SIZE_UNIT)
            || disk.size_bytes > MAX_DISK_BYTES
        {
            return Err(ApiError::invalid(
                format!("{field}.size"),
                format!(
                    "{} bytes is not allowed; use a whole number of MiB from 1 MiB to 16 TiB",
                    disk.size_bytes
                ),
            ));
        }
        let missing =
            inventory.nodes_lacking(|f| f.storage_groups.contains_key(&disk.storage_group));
        if !missing.is_empty() {
            return Err(ApiError::invalid(
                format!("{field}.storage_group"),
                format!(
                    "storage group {:?} is not known on {}; known on all nodes: {}",
                    disk.storage_group,
                    missing.join(", "),
                    inventory
                        .common(|f| f.storage_groups.keys().cloned().collect())
                        .join(", ")
                ),
            ));
        }
    }
    Ok(())
}

fn networks(spec: &VmSpec, inventory: &Inventory) -> Result<(), ApiError> {
    if spec.networks.len() > MAX_NETWORKS {
        return Err(ApiError::invalid(
            "networks",
            format!(
                "{} networks given; a VM has at most {MAX_NETWORKS}",
                spec.networks.len()
            ),
        ));
    }
    for (i, network) in spec.networks.iter().enumerate() {
        let missing = inventory.nodes_lacking(|f| f.networks.contains(network));
        if !missing.is_empty() {
            return Err(ApiError::invalid(
                format!("networks[{i}]"),
                format!(
                    "network {network:?} is not known on {}; known on all nodes: {}",
                    missing.join(", "),
                    inventory
                        .common(|f| f.networks.iter().cloned().collect())
                        .join(", ")
                ),
            ));
        }
    }
    Ok(())
}

fn boot(boot: &Boot, inventory: &Inventory) -> Result<(), ApiError> {
    match boot {
        Boot::Kernel { image } => {
            let missing = inventory.nodes_lacking(|f| f.boot_images.contains(image));
            if missing.is_empty() {
                Ok(())
            } else {
                Err(ApiError::invalid(
                    "boot.kernel_image",
                    format!(
                        "boot image {image:?} is not installed on {}; installed on all nodes: {}",
                        missing.join(", "),
                        inventory
                            .common(|f| f.boot_images.iter().cloned().collect())
                            .join(", ")
                    ),
                ))
            }
        }
        // Resolved against the ISO library (`crate::isos::resolve_boot`).
        Boot::Iso { .. } => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DiskRequest;
    use crate::placement::tests::inventory;

    fn good() -> VmSpec {
        VmSpec {
            name: "web-1".into(),
            mode: Mode::Ha,
            vcpus: 1,
            memory_mib: 256,
            disks: vec![DiskRequest {
                size_bytes: 16 << 20,
                storage_group: "sg0".into(),
                format: DiskFormat::Raw,
            }],
            networks: vec!["business".into()],
            boot: Boot::Kernel {
                image: "tiny".into(),
            },
        }
    }

    fn field_of(result: Result<(), ApiError>) -> String {
        match result {
            Err(ApiError::InvalidArgument { field, .. }) => field,
            other => format!("not an invalid argument: {other:?}"),
        }
    }

    #[test]
    fn spec_good_is_accepted() {
        let result = spec(&good(), &inventory());

        assert_eq!(result, Ok(()));
    }

    #[test]
    fn name_at_max_length_is_accepted() {
        let result = name(&"a".repeat(MAX_NAME_LEN));

        assert_eq!(result, Ok(()));
    }

    #[test]
    fn name_over_max_length_is_refused() {
        let result = name(&"a".repeat(MAX_NAME_LEN + 1));

        assert_eq!(field_of(result), "name");
    }

    #[test]
    fn name_empty_is_refused() {
        let result = name("");

        assert_eq!(field_of(result), "name");
    }

    #[test]
    fn name_with_slash_is_refused() {
        let result = name("a/b");

        assert_eq!(field_of(result), "name");
    }

    #[test]
    fn name_starting_with_dash_is_refused() {
        let result = name("-a");

        assert_eq!(field_of(result), "name");
    }

    #[test]
    fn size_max_vcpus_is_accepted() {
        let result = size(MAX_VCPUS, 1024);

        assert_eq!(result, Ok(()));
    }

    #[test]
    fn size_max_vcpus_plus_one_is_refused() {
        let result = size(MAX_VCPUS + 1, 1024);

        assert_eq!(field_of(result), "vcpus");
    }

    #[test]
    fn size_zero_vcpus_is_refused() {
        let result = size(0, 1024);

        assert_eq!(field_of(result), "vcpus");
    }

    #[test]
    fn size_max_memory_is_accepted() {
        let result = size(1, MAX_MEMORY_MIB);

        assert_eq!(result, Ok(()));
    }

    #[test]
    fn size_max_memory_plus_one_is_refused() {
        let result = size(1, MAX_MEMORY_MIB + 1);

        assert_eq!(field_of(result), "memory");
    }

    #[test]
    fn size_below_min_memory_is_refused() {
        let result = size(1, MIN_MEMORY_MIB - 1);

        assert_eq!(field_of(result), "memory");
    }

    #[test]
    fn spec_max_disks_is_accepted() {
        let mut s = good();
        s.disks = vec![s.disks[0].clone(); MAX_DISKS];

        let result = spec(&s, &inventory());

        assert_eq!(result, Ok(()));
    }

    #[test]
    fn spec_max_disks_plus_one_is_refused() {
        let mut s = good();
        s.disks = vec![s.disks[0].clone(); MAX_DISKS + 1];

        let result = spec(&s, &inventory());

        assert_eq!(field_of(result), "disks");
    }

    #[test]
    fn spec_without_disks_is_refused() {
        let mut s = good();
        s.disks.clear();

        let result = spec(&s, &inventory());

        assert_eq!(field_of(result), "disks");
    }

    #[test]
    fn spec_disk_not_whole_mib_is_refused() {
        let mut s = good();
        s.disks[0].size_bytes = DISK_SIZE_UNIT + 512;

        let result = spec(&s, &inventory());

        assert_eq!(field_of(result), "disks[0].size");
    }

    #[test]
    fn spec_ha_qcow2_disk_is_refused() {
        let mut s = good();
        s.disks[0].format = DiskFormat::Qcow2;

        let result = spec(&s, &inventory());

        assert_eq!(field_of(result), "disks[0].format");
    }

    #[test]
    fn spec_unprotected_qcow2_disk_is_accepted() {
        let mut s = good();
        s.mode = Mode::Unprotected;
        s.disks[0].format = DiskFormat::Qcow2;

        let result = spec(&s, &inventory());

        assert!(result.is_ok(), "{result:?}");
    }

    #[test]
    fn spec_unknown_storage_group_is_refused() {
        let mut s = good();
        s.disks[0].storage_group = "fast".into();

        let result = spec(&s, &inventory());

        assert_eq!(field_of(result), "disks[0].storage_group");
    }

    #[test]
    fn spec_max_networks_is_accepted() {
        let mut s = good();
        s.networks = vec!["business".into(); MAX_NETWORKS];

        let result = spec(&s, &inventory());

        assert_eq!(result, Ok(()));
    }

    #[test]
    fn spec_max_networks_plus_one_is_refused() {
        let mut s = good();
        s.networks = vec!["business".into(); MAX_NETWORKS + 1];

        let result = spec(&s, &inventory());

        assert_eq!(field_of(result), "networks");
    }

    #[test]
    fn spec_unknown_network_is_refused() {
        let mut s = good();
        s.networks = vec!["dmz".into()];

        let result = spec(&s, &inventory());

        assert_eq!(field_of(result), "networks[0]");
    }

    #[test]
    fn spec_unknown_boot_image_is_refused() {
        let mut s = good();
        s.boot = Boot::Kernel {
            image: "debian".into(),
        };

        let result = spec(&s, &inventory());

        assert_eq!(field_of(result), "boot.kernel_image");
    }
}
