//! The ISO library's rules: which uploads are admitted, which deletions refused, and how a
//! VM's boot ISO is resolved. A VM names an ISO of the library, never a host path, so no
//! guest can be given an arbitrary file of a host. Pure: the engine applies these to its
//! state; `upload` carries the bytes.

pub mod upload;

use std::collections::BTreeMap;

use crate::error::ApiError;
use crate::model::{Boot, IsoRecord, IsoState, VmRecord};
use crate::placement::Inventory;
use crate::validate;

/// What an upload announces before its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The ISO's name.
    pub name: String,
    /// The storage group to keep it in; empty means the first one every node has.
    pub storage_group: String,
    /// Its size.
    pub size_bytes: u64,
}

/// Admits an upload to `nodes` (every node of the pair, which must all be usable): the new
/// record, in state `Uploading`.
pub fn admit(
    header: &Header,
    isos: &BTreeMap<String, IsoRecord>,
    nodes: &Inventory,
    now_unix_ms: i64,
) -> Result<IsoRecord, ApiError> {
    validate::name(&header.name)?;
    if isos.contains_key(&header.name) {
        return Err(ApiError::IsoExists {
            name: header.name.clone(),
        });
    }
    if header.size_bytes == 0 {
        return Err(ApiError::invalid("size_bytes", "the ISO is empty"));
    }
    let groups = nodes.common(|f| f.storage_groups.keys().cloned().collect());
    let group = if header.storage_group.is_empty() {
        groups.first().cloned().ok_or_else(|| {
            ApiError::FailedPrecondition(
                "no storage group is configured on every node, so the ISO has nowhere to go".into(),
            )
        })?
    } else if groups.contains(&header.storage_group) {
        header.storage_group.clone()
    } else {
        return Err(ApiError::invalid(
            "storage_group",
            format!(
                "{:?} is not a storage group of every node; groups on all nodes: {}",
                header.storage_group,
                groups.join(", ")
            ),
        ));
    };
    for node in &nodes.nodes {
        let free = node
            .facts
            .storage_groups
            .get(&group)
            .map_or(0, |g| g.free_bytes);
        if free < header.size_bytes {
            return Err(ApiError::ResourceExhausted {
                resource: format!("space in storage group {group}"),
                needed: header.size_bytes,
                available: free,
                unit: " bytes",
                node: node.name.clone(),
                hint: "delete unused ISOs or volumes there",
            });
        }
    }
    Ok(IsoRecord {
        name: header.name.clone(),
        storage_group: group,
        size_bytes: header.size_bytes,
        sha256: String::new(),
        state: IsoState::Uploading,
        created_unix_ms: now_unix_ms,
    })
}

/// The names of the VMs that boot from ISO `name`, sorted.
pub fn users<'a>(name: &str, vms: impl IntoIterator<Item = &'a VmRecord>) -> Vec<String> {
    let mut users: Vec<String> = vms
        .into_iter()
        .filter(|vm| matches!(&vm.boot, Boot::Iso { name: iso, .. } if iso == name))
        .map(|vm| vm.name.clone())
        .collect();
    users.sort();
    users
}

/// Checks that ISO `name` may be deleted: it exists, is not being uploaded and no VM boots
/// from it. A deletion that failed part way (`Deleting`) may be retried.
pub fn check_delete<'a>(
    name: &str,
    isos: &'a BTreeMap<String, IsoRecord>,
    vms: impl IntoIterator<Item = &'a VmRecord>,
) -> Result<&'a IsoRecord, ApiError> {
    let iso = isos.get(name).ok_or_else(|| ApiError::IsoNotFound {
        name: name.to_string(),
    })?;
    if iso.state == IsoState::Uploading {
        return Err(ApiError::FailedPrecondition(format!(
            "ISO {name} is being uploaded; delete it once the upload ends"
        )));
    }
    let users = users(name, vms);
    if !users.is_empty() {
        return Err(ApiError::FailedPrecondition(format!(
            "ISO {name} is in use by VM {}; delete those VMs first",
            users.join(", ")
        )));
    }
    Ok(iso)
}

/// Resolves a spec's boot ISO against the library: it must be ready; the VM then records
/// the storage group that keeps it.
pub fn resolve_boot(boot: &mut Boot, isos: &BTreeMap<String, IsoRecord>) -> Result<(), ApiError> {
    let Boot::Iso {
        name,
        storage_group,
    } = boot
    else {
        return Ok(());
    };
    if name.starts_with('/') || name.contains('/') {
        return Err(ApiError::invalid(
            "boot.iso",
            format!(
                "{name:?} is a path; a VM boots only from an ISO of the library: upload it with `pvctl iso-add FILE`, then name it"
            ),
        ));
    }
    match isos.get(name.as_str()) {
        Some(iso) if iso.state == IsoState::Ready => {
            storage_group.clone_from(&iso.storage_group);
            Ok(())
        }
        Some(iso) => Err(ApiError::FailedPrecondition(format!(
            "ISO {name} is not ready ({}); retry once its upload ends",
            match iso.state {
                IsoState::Uploading => "being uploaded",
                IsoState::Ready | IsoState::Deleting => "being deleted",
            }
        ))),
        None => Err(ApiError::IsoNotFound { name: name.clone() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Mode;
    use crate::placement::tests::inventory;

    fn header(name: &str, size_bytes: u64) -> Header {
        Header {
            name: name.into(),
            storage_group: String::new(),
            size_bytes,
        }
    }

    fn ready(name: &str) -> IsoRecord {
        IsoRecord {
            name: name.into(),
            storage_group: "sg0".into(),
            size_bytes: 4096,
            sha256: "ab".into(),
            state: IsoState::Ready,
            created_unix_ms: 1,
        }
    }

    fn library(isos: &[IsoRecord]) -> BTreeMap<String, IsoRecord> {
        isos.iter().map(|i| (i.name.clone(), i.clone())).collect()
    }

    fn vm_booting(name: &str, iso: &str) -> VmRecord {
        let mut vm = crate::placement::tests::vm(name, Mode::Ha, 1, 256, "n0");
        vm.boot = Boot::Iso {
            name: iso.into(),
            storage_group: "sg0".into(),
        };
        vm
    }

    #[test]
    fn admit_picks_the_common_group_and_starts_uploading() {
        let record = admit(
            &header("rescue.iso", 4096),
            &BTreeMap::new(),
            &inventory(),
            7,
        )
        .unwrap();

        assert_eq!(record.storage_group, "sg0");
        assert_eq!(record.state, IsoState::Uploading);
        assert_eq!(record.created_unix_ms, 7);
    }

    #[test]
    fn admit_of_a_taken_name_is_refused() {
        let isos = library(&[ready("rescue.iso")]);

        let err = admit(&header("rescue.iso", 4096), &isos, &inventory(), 7).unwrap_err();

        assert_eq!(
            err,
            ApiError::IsoExists {
                name: "rescue.iso".into()
            }
        );
    }

    #[test]
    fn admit_of_a_path_or_bad_name_is_refused() {
        for name in ["/srv/rescue.iso", "../x", ".hidden", ""] {
            let err = admit(&header(name, 4096), &BTreeMap::new(), &inventory(), 7).unwrap_err();
            assert!(
                matches!(err, ApiError::InvalidArgument { .. }),
                "{name}: {err}"
            );
        }
    }

    #[test]
    fn admit_of_an_iso_larger_than_a_nodes_free_space_names_the_node() {
        let err = admit(
            &header("big.iso", 1 << 40),
            &BTreeMap::new(),
            &inventory(),
            7,
        )
        .unwrap_err();

        assert!(
            matches!(&err, ApiError::ResourceExhausted { node, .. } if node == "n0"),
            "{err}"
        );
    }

    #[test]
    fn admit_into_an_unknown_group_lists_the_groups() {
        let mut h = header("a.iso", 4096);
        h.storage_group = "fast".into();

        let err = admit(&h, &BTreeMap::new(), &inventory(), 7).unwrap_err();

        assert_eq!(
            err.to_string(),
            "storage_group: \"fast\" is not a storage group of every node; groups on all nodes: sg0"
        );
    }

    #[test]
    fn delete_of_an_iso_in_use_names_the_vms() {
        let isos = library(&[ready("rescue.iso")]);
        let vms = [
            vm_booting("web", "rescue.iso"),
            vm_booting("db", "rescue.iso"),
        ];

        let err = check_delete("rescue.iso", &isos, &vms).unwrap_err();

        assert_eq!(
            err.to_string(),
            "ISO rescue.iso is in use by VM db, web; delete those VMs first"
        );
    }

    #[test]
    fn delete_of_an_unused_iso_is_allowed_and_of_an_unknown_one_refused() {
        let isos = library(&[ready("rescue.iso")]);
        let vms = [vm_booting("web", "other.iso")];

        assert_eq!(
            check_delete("rescue.iso", &isos, &vms).unwrap().name,
            "rescue.iso"
        );
        assert!(matches!(
            check_delete("none.iso", &isos, &vms),
            Err(ApiError::IsoNotFound { .. })
        ));
    }

    #[test]
    fn resolve_boot_records_the_group_of_a_ready_iso() {
        let mut boot = Boot::Iso {
            name: "rescue.iso".into(),
            storage_group: String::new(),
        };

        resolve_boot(&mut boot, &library(&[ready("rescue.iso")])).unwrap();

        assert_eq!(
            boot,
            Boot::Iso {
                name: "rescue.iso".into(),
                storage_group: "sg0".into()
            }
        );
    }

    #[test]
    fn resolve_boot_refuses_host_paths_and_unready_isos() {
        let mut uploading = ready("new.iso");
        uploading.state = IsoState::Uploading;
        let isos = library(&[ready("rescue.iso"), uploading]);
        let boot = |name: &str| Boot::Iso {
            name: name.into(),
            storage_group: String::new(),
        };

        let path = resolve_boot(&mut boot("/etc/shadow"), &isos).unwrap_err();
        let missing = resolve_boot(&mut boot("none.iso"), &isos).unwrap_err();
        let unready = resolve_boot(&mut boot("new.iso"), &isos).unwrap_err();

        assert!(matches!(&path, ApiError::InvalidArgument { field, .. } if field == "boot.iso"));
        assert!(matches!(missing, ApiError::IsoNotFound { .. }));
        assert!(matches!(unready, ApiError::FailedPrecondition(_)));
    }
}
