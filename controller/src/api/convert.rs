//! Translation between the public API's messages and the controller's model: requests into
//! specs (refused with an [`ApiError`] a user can act on), records and views into replies.

use std::time::Duration;

use proto::v1 as pb;

use crate::engine::{FtView, NodesView};
use crate::error::ApiError;
use crate::events::vm_state_to_pb;
use crate::ft::FtPhase;
use crate::health::{self, HostState};
use crate::model::{Boot, DiskFormat, DiskRequest, Mode, VmRecord, VmSpec};
use crate::store::Alert;

/// Grace period of a shutdown when the request gives none.
const DEFAULT_GRACE: Duration = Duration::from_secs(60);
/// Longest grace period a shutdown may ask for.
const MAX_GRACE_SECONDS: u32 = 3600;

/// A client's stream that broke mid-way (an upload, an import).
pub(super) fn broke_off(status: &tonic::Status) -> ApiError {
    ApiError::Unavailable(format!(
        "the upload broke off ({}); nothing was kept",
        status.message()
    ))
}

pub(super) fn grace_from_pb(seconds: u32) -> Result<Duration, ApiError> {
    match seconds {
        0 => Ok(DEFAULT_GRACE),
        s if s <= MAX_GRACE_SECONDS => Ok(Duration::from_secs(u64::from(s))),
        s => Err(ApiError::invalid(
            "grace_seconds",
            format!(
                "{s} is too long; give 1 to {MAX_GRACE_SECONDS} seconds, or 0 for the default of 60"
            ),
        )),
    }
}

pub(super) fn mode_from_pb(mode: i32) -> Result<Mode, ApiError> {
    match pb::ProtectionMode::try_from(mode) {
        Ok(pb::ProtectionMode::Ft) => Ok(Mode::Ft),
        Ok(pb::ProtectionMode::Ha) => Ok(Mode::Ha),
        Ok(pb::ProtectionMode::Unprotected) => Ok(Mode::Unprotected),
        Ok(pb::ProtectionMode::Invalid) | Err(_) => Err(ApiError::invalid(
            "mode",
            "choose a protection mode: ft, ha or unprotected",
        )),
    }
}

fn mode_to_pb(mode: Mode) -> pb::ProtectionMode {
    match mode {
        Mode::Ft => pb::ProtectionMode::Ft,
        Mode::Ha => pb::ProtectionMode::Ha,
        Mode::Unprotected => pb::ProtectionMode::Unprotected,
    }
}

pub(super) fn format_from_pb(format: i32) -> Result<DiskFormat, ApiError> {
    match pb::DiskFormat::try_from(format) {
        Ok(pb::DiskFormat::Invalid | pb::DiskFormat::Raw) => Ok(DiskFormat::Raw),
        Ok(pb::DiskFormat::Qcow2) => Ok(DiskFormat::Qcow2),
        Err(_) => Err(ApiError::invalid("disks.format", "choose raw or qcow2")),
    }
}

fn format_to_pb(format: DiskFormat) -> pb::DiskFormat {
    match format {
        DiskFormat::Raw => pb::DiskFormat::Raw,
        DiskFormat::Qcow2 => pb::DiskFormat::Qcow2,
    }
}

/// The model's VM spec for a create request.
pub(super) fn spec_from_pb(message: pb::CreateVmRequest) -> Result<VmSpec, ApiError> {
    let disks = message
        .disks
        .iter()
        .map(|d| {
            Ok(DiskRequest {
                size_bytes: d.size_bytes,
                storage_group: d.storage_group.clone(),
                format: format_from_pb(d.format)?,
            })
        })
        .collect::<Result<_, ApiError>>()?;
    let boot = match message.boot {
        Some(pb::create_vm_request::Boot::KernelImage(image)) => Boot::Kernel { image },
        Some(pb::create_vm_request::Boot::Iso(name)) => Boot::Iso {
            name,
            storage_group: String::new(),
        },
        None => {
            return Err(ApiError::invalid(
                "boot",
                "give a boot source: a kernel image (e.g. tiny) or an ISO of the library",
            ));
        }
    };
    Ok(VmSpec {
        name: message.name,
        mode: mode_from_pb(message.mode)?,
        vcpus: message.vcpus,
        memory_mib: message.memory_mib,
        disks,
        networks: message.networks,
        boot,
    })
}

/// The API's view of a VM record.
pub(super) fn vm_to_pb(
    vm: &VmRecord,
    ft: Option<FtView>,
    writes: &[proto::agent::DiskWrites],
) -> pb::Vm {
    let deadline = match vm.state {
        crate::model::VmState::Stopping {
            deadline_unix_ms,
            forced: false,
        } => deadline_unix_ms,
        _ => 0,
    };
    pb::Vm {
        uuid: vm.uuid.clone(),
        name: vm.name.clone(),
        mode: mode_to_pb(vm.mode).into(),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        disks: vm
            .disks
            .iter()
            .zip(0u32..)
            .map(|(d, index)| pb::Disk {
                index,
                size_bytes: d.size_bytes,
                storage_group: d.storage_group.clone(),
                format: format_to_pb(d.format).into(),
                volume: d.volume.clone(),
            })
            .collect(),
        nics: vm
            .nics
            .iter()
            .map(|n| pb::Nic {
                network: n.network.clone(),
                mac: n.mac.clone(),
            })
            .collect(),
        boot: Some(match &vm.boot {
            Boot::Kernel { image } => pb::vm::Boot::KernelImage(image.clone()),
            Boot::Iso { name, .. } => pb::vm::Boot::Iso(name.clone()),
        }),
        state: vm_state_to_pb(vm.state).into(),
        state_reason: vm.state_reason.clone(),
        node: vm.node.clone(),
        created_unix_ms: vm.created_unix_ms,
        updated_unix_ms: vm.updated_unix_ms,
        shutdown_deadline_unix_ms: deadline,
        protection: (vm.mode != crate::model::Mode::Unprotected)
            .then(|| protection_to_pb(&vm.protection, writes)),
        ft: ft.map(|ft| ft_to_pb(&ft)),
    }
}

fn ft_to_pb(ft: &FtView) -> pb::FtInfo {
    let phase = match ft.phase {
        None => pb::FtPhase::Off,
        Some(FtPhase::Starting) => pb::FtPhase::Starting,
        Some(FtPhase::Syncing) => pb::FtPhase::Syncing,
        Some(FtPhase::Protected) => pb::FtPhase::Protected,
        Some(FtPhase::Simplex) => pb::FtPhase::Simplex,
        Some(FtPhase::FailingOver) => pb::FtPhase::FailingOver,
        Some(FtPhase::Failed) => pb::FtPhase::Failed,
    };
    let metrics = ft.metrics.clone().unwrap_or_default();
    pb::FtInfo {
        phase: phase.into(),
        epochs_per_second: metrics.epochs_per_second,
        last_pause_ms: metrics.last_pause_ms,
        committed_epoch: metrics.committed_epoch,
        last_error: metrics.last_error.unwrap_or_default(),
        waiting_for_mirror: metrics.waiting_for_mirror,
        pause_histogram: buckets(&metrics.pauses),
        pause_count: metrics.pauses.count,
        pause_sum_ms: as_ms(metrics.pauses.sum_us),
        epoch_histogram: buckets(&metrics.epochs),
        epoch_count: metrics.epochs.count,
        epoch_sum_ms: as_ms(metrics.epochs.sum_us),
    }
}

/// A histogram's buckets with their bounds in milliseconds.
fn buckets(histogram: &crate::ft::DurationHistogram) -> Vec<pb::DurationBucket> {
    histogram
        .buckets
        .iter()
        .map(|(le_us, count)| pb::DurationBucket {
            le_ms: as_ms(*le_us),
            count: *count,
        })
        .collect()
}

/// Microseconds as milliseconds.
fn as_ms(us: u64) -> f64 {
    crate::as_f64(us) / 1000.0
}

fn writes_to_pb(w: &proto::agent::DiskWrites) -> pb::DiskWrites {
    pb::DiskWrites {
        device: w.device.clone(),
        count: w.count,
        total_seconds: crate::as_f64(w.total_ns) / 1e9,
    }
}

fn protection_to_pb(
    p: &crate::ha::Protection,
    writes: &[proto::agent::DiskWrites],
) -> pb::Protection {
    use crate::ha::Sync;
    let (reason, since_unix_ms, done, total) = match &p.sync {
        Sync::Off => (String::new(), 0, 0, 0),
        Sync::Syncing {
            done,
            total,
            since_unix_ms,
            ..
        } => (String::new(), *since_unix_ms, *done, *total),
        Sync::Protected { since_unix_ms } => (String::new(), *since_unix_ms, 0, 0),
        Sync::Simplex {
            reason,
            since_unix_ms,
        } => (reason.clone(), *since_unix_ms, 0, 0),
    };
    let progress = p.sync.progress(crate::now_unix_ms());
    pb::Protection {
        state: p.sync.name().to_string(),
        reason,
        since_unix_ms,
        sync_done_bytes: done,
        sync_total_bytes: total,
        sync_bytes_per_second: progress.map_or(0, |g| g.bytes_per_second),
        sync_eta_seconds: progress.and_then(|g| g.eta_seconds),
        sync_percent: progress.map_or(0, |g| u32::try_from(g.percent).unwrap_or(100)),
        sync_phase: p.sync.phase().unwrap_or_default().to_string(),
        disk_writes: writes.iter().map(writes_to_pb).collect(),
        current_on: p.current.iter().cloned().collect(),
        last_failover: p.last_failover.as_ref().map(|f| pb::Failover {
            from_node: f.from.clone(),
            to_node: f.to.clone(),
            reason: f.reason.clone(),
            decided_unix_ms: f.decided_unix_ms,
            running_unix_ms: f.running_unix_ms.unwrap_or(0),
        }),
    }
}

pub(super) fn nodes_to_pb(view: &NodesView) -> pb::ListNodesResponse {
    let nodes = view
        .nodes
        .iter()
        .map(|n| {
            let role = if n.record.name == view.serving {
                pb::NodeRole::Serving
            } else {
                pb::NodeRole::Standby
            };
            let state = match n.health {
                HostState::Up => pb::NodeState::Up,
                HostState::Suspect => pb::NodeState::Suspect,
                HostState::Lost => pb::NodeState::Lost,
                HostState::Fenced => pb::NodeState::Fenced,
            };
            let facts = &n.record.facts;
            pb::Node {
                name: n.record.name.clone(),
                role: role.into(),
                state: state.into(),
                api_address: n.api_address.clone(),
                cpus: facts.cpus,
                memory_mib: facts.memory_mib,
                storage_groups: facts
                    .storage_groups
                    .iter()
                    .map(|(name, g)| pb::StorageGroup {
                        name: name.clone(),
                        total_bytes: g.total_bytes,
                        free_bytes: g.free_bytes,
                    })
                    .collect(),
                networks: facts.networks.iter().cloned().collect(),
                boot_images: facts.boot_images.iter().cloned().collect(),
                qemu_version: facts.qemu_version.clone(),
                libvirt_version: facts.libvirt_version.clone(),
                running_vms: n.running_vms,
                state_reason: n.health_reason.clone(),
                lease_alive: n.lease_alive,
                agent_up: n.agent_up,
                controller_up: n.controller_up,
                paths: n
                    .paths
                    .iter()
                    .map(|p| pb::HeartbeatPath {
                        name: p.name.clone(),
                        up: p.up,
                        ms_since_heard: p.since_ms,
                    })
                    .collect(),
                alinks: n
                    .alinks
                    .iter()
                    .map(|l| pb::Alink {
                        name: l.name.clone(),
                        up: l.up,
                        bytes_sent: l.bytes_sent,
                        bytes_received: l.bytes_received,
                        retransmits: l.retransmits,
                        rtt_us: l.rtt_us,
                    })
                    .collect(),
            }
        })
        .collect();
    pb::ListNodesResponse {
        nodes,
        capacity: Some(pb::Capacity {
            free_vcpus: u32::try_from(view.free.vcpus).unwrap_or(u32::MAX),
            free_memory_mib: view.free.memory_mib,
        }),
        // Asked of etcd by the caller: not part of the engine's view.
        quorum: Vec::new(),
    }
}

pub(super) fn alert_to_pb(alert: &Alert) -> pb::Alert {
    pb::Alert {
        id: alert.id.clone(),
        node: alert.node.clone(),
        vm_uuid: alert.vm.clone(),
        message: alert.message.clone(),
        raised_unix_ms: alert.raised_unix_ms,
        cleared_by: alert.cleared_by.clone(),
    }
}

pub(super) fn health_config_to_pb(config: health::Config) -> pb::HealthConfig {
    pb::HealthConfig {
        path_timeout_ms: config.path_timeout_ms,
        lost_confirm_ms: config.lost_confirm_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> pb::CreateVmRequest {
        pb::CreateVmRequest {
            name: "web".into(),
            mode: pb::ProtectionMode::Ft.into(),
            vcpus: 2,
            memory_mib: 512,
            disks: vec![pb::DiskRequest {
                size_bytes: 1 << 20,
                storage_group: "sg0".into(),
                format: pb::DiskFormat::Invalid.into(),
            }],
            networks: vec![],
            boot: Some(pb::create_vm_request::Boot::KernelImage("tiny".into())),
        }
    }

    #[test]
    fn spec_from_pb_defaults_disk_format_to_raw() {
        let spec = spec_from_pb(request()).unwrap();

        assert_eq!(spec.disks[0].format, DiskFormat::Raw);
        assert_eq!(spec.mode, Mode::Ft);
    }

    #[test]
    fn spec_from_pb_without_mode_is_refused() {
        let message = pb::CreateVmRequest {
            mode: pb::ProtectionMode::Invalid.into(),
            ..request()
        };

        let err = spec_from_pb(message).unwrap_err();

        assert_eq!(
            err.to_string(),
            "mode: choose a protection mode: ft, ha or unprotected"
        );
    }

    #[test]
    fn spec_from_pb_without_boot_is_refused() {
        let message = pb::CreateVmRequest {
            boot: None,
            ..request()
        };

        let err = spec_from_pb(message).unwrap_err();

        assert!(matches!(err, ApiError::InvalidArgument { ref field, .. } if field == "boot"));
    }

    #[test]
    fn grace_zero_means_default() {
        let grace = grace_from_pb(0).unwrap();

        assert_eq!(grace, DEFAULT_GRACE);
    }

    #[test]
    fn grace_over_an_hour_is_refused() {
        let err = grace_from_pb(MAX_GRACE_SECONDS + 1).unwrap_err();

        assert!(matches!(err, ApiError::InvalidArgument { .. }));
    }
}
