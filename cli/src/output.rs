//! How pvctl shows API objects: aligned text for people, JSON (`--json`) for scripts.

use proto::v1 as pb;
use serde_json::{Value, json};

use crate::units::{human, utc};

/// Lower-case name of a protection mode.
pub fn mode_name(mode: pb::ProtectionMode) -> &'static str {
    match mode {
        pb::ProtectionMode::Ft => "ft",
        pb::ProtectionMode::Ha => "ha",
        pb::ProtectionMode::Unprotected => "unprotected",
        pb::ProtectionMode::Invalid => "invalid",
    }
}

/// Lower-case name of a VM state.
pub fn state_name(state: pb::VmState) -> &'static str {
    match state {
        pb::VmState::Creating => "creating",
        pb::VmState::Stopped => "stopped",
        pb::VmState::Starting => "starting",
        pb::VmState::Running => "running",
        pb::VmState::Stopping => "stopping",
        pb::VmState::Deleting => "deleting",
        pb::VmState::Paused => "paused",
        pb::VmState::Lost => "lost",
        pb::VmState::Invalid => "invalid",
    }
}

fn event_kind_name(kind: pb::EventKind) -> &'static str {
    match kind {
        pb::EventKind::VmCreated => "vm-created",
        pb::EventKind::VmChanged => "vm-changed",
        pb::EventKind::VmProtection => "vm-protection",
        pb::EventKind::VmFt => "vm-ft",
        pb::EventKind::VmDeleted => "vm-deleted",
        pb::EventKind::NodeUp => "node-up",
        pb::EventKind::NodeDown => "node-down",
        pb::EventKind::ControllerElected => "controller-elected",
        pb::EventKind::AlertRaised => "alert-raised",
        pb::EventKind::AlertCleared => "alert-cleared",
        pb::EventKind::Invalid => "invalid",
    }
}

fn boot_json(vm: &pb::Vm) -> Value {
    match &vm.boot {
        Some(pb::vm::Boot::KernelImage(image)) => json!({ "kernel_image": image }),
        Some(pb::vm::Boot::Iso(name)) => json!({ "iso": name }),
        None => Value::Null,
    }
}

/// A VM as JSON.
pub fn vm_json(vm: &pb::Vm) -> Value {
    json!({
        "uuid": vm.uuid,
        "name": vm.name,
        "mode": mode_name(vm.mode()),
        "state": state_name(vm.state()),
        "state_reason": vm.state_reason,
        "node": vm.node,
        "vcpus": vm.vcpus,
        "memory_mib": vm.memory_mib,
        "disks": vm.disks.iter().map(|d| json!({
            "index": d.index,
            "size_bytes": d.size_bytes,
            "storage_group": d.storage_group,
            "format": if d.format() == pb::DiskFormat::Qcow2 { "qcow2" } else { "raw" },
            "volume": d.volume,
        })).collect::<Vec<_>>(),
        "nics": vm.nics.iter().map(|n| json!({ "network": n.network, "mac": n.mac })).collect::<Vec<_>>(),
        "boot": boot_json(vm),
        "created_unix_ms": vm.created_unix_ms,
        "updated_unix_ms": vm.updated_unix_ms,
        "protection": vm.protection.as_ref().map(protection_json),
        "ft": vm.ft.as_ref().map(ft_json),
    })
}

/// Lower-case name of an FT VM's phase.
pub fn ft_phase_name(phase: pb::FtPhase) -> &'static str {
    match phase {
        pb::FtPhase::Off => "off",
        pb::FtPhase::Starting => "starting",
        pb::FtPhase::Syncing => "syncing",
        pb::FtPhase::Protected => "protected",
        pb::FtPhase::Simplex => "simplex",
        pb::FtPhase::FailingOver => "failing-over",
        pb::FtPhase::Failed => "failed",
        pb::FtPhase::Invalid => "invalid",
    }
}

fn ft_json(ft: &pb::FtInfo) -> Value {
    json!({
        "phase": ft_phase_name(ft.phase()),
        "epochs_per_second": ft.epochs_per_second,
        "last_pause_ms": ft.last_pause_ms,
        "committed_epoch": ft.committed_epoch,
        "last_error": ft.last_error,
        "waiting_for_mirror": ft.waiting_for_mirror,
        "pauses": histogram_json(&ft.pause_histogram, ft.pause_count, ft.pause_sum_ms),
        "epochs": histogram_json(&ft.epoch_histogram, ft.epoch_count, ft.epoch_sum_ms),
    })
}

fn histogram_json(buckets: &[pb::DurationBucket], count: u64, sum_ms: f64) -> Value {
    json!({
        "count": count,
        "sum_ms": sum_ms,
        "buckets": buckets.iter()
            .map(|b| json!({ "le_ms": b.le_ms, "count": b.count }))
            .collect::<Vec<_>>(),
    })
}

/// An FT VM's checkpointing in a line: `protected, epoch 1234, 9.8 epochs/s, last pause
/// 3.2 ms`, with the wait for the mirrors and the last error when there are.
pub fn ft_text(ft: &pb::FtInfo) -> String {
    let mut parts = vec![ft_phase_name(ft.phase()).to_string()];
    if ft.committed_epoch > 0 {
        parts.push(format!("epoch {}", ft.committed_epoch));
    }
    if let Some(rate) = ft.epochs_per_second {
        parts.push(format!("{rate:.1} epochs/s"));
    }
    if let Some(pause) = ft.last_pause_ms {
        parts.push(format!("last pause {pause:.1} ms"));
    }
    if ft.pause_count > 0 {
        #[allow(clippy::cast_precision_loss, reason = "counts far below 2^53")]
        let mean = ft.pause_sum_ms / ft.pause_count as f64;
        parts.push(format!(
            "mean pause {mean:.1} ms over {} checkpoints",
            ft.pause_count
        ));
    }
    if ft.epoch_count > 0 {
        #[allow(clippy::cast_precision_loss, reason = "counts far below 2^53")]
        let mean = ft.epoch_sum_ms / ft.epoch_count as f64;
        parts.push(format!("mean epoch {mean:.0} ms"));
    }
    if ft.waiting_for_mirror {
        parts.push("waiting for the mirror".into());
    }
    if !ft.last_error.is_empty() {
        parts.push(format!("last error: {}", ft.last_error));
    }
    parts.join(", ")
}

fn protection_json(p: &pb::Protection) -> Value {
    json!({
        "state": p.state,
        "reason": p.reason,
        "since_unix_ms": p.since_unix_ms,
        "sync_done_bytes": p.sync_done_bytes,
        "sync_total_bytes": p.sync_total_bytes,
        "sync_phase": p.sync_phase,
        "sync_percent": p.sync_percent,
        "sync_bytes_per_second": p.sync_bytes_per_second,
        "sync_eta_seconds": p.sync_eta_seconds,
        "current_on": p.current_on,
        "disk_writes": p.disk_writes.iter()
            .map(|w| json!({ "device": w.device, "count": w.count, "total_seconds": w.total_seconds }))
            .collect::<Vec<_>>(),
        "last_failover": p.last_failover.as_ref().map(|f| json!({
            "from": f.from_node,
            "to": f.to_node,
            "reason": f.reason,
            "decided_unix_ms": f.decided_unix_ms,
            "running_unix_ms": f.running_unix_ms,
            "downtime_ms": (f.running_unix_ms > 0).then(|| f.running_unix_ms - f.decided_unix_ms),
        })),
    })
}

/// A protected VM's protection in a few words: `protected (copies on n0, n1)`,
/// `syncing 42% (4.0 MiB of 9.5 MiB, 1.2 MiB/s, ETA 5 s)`, `simplex: host n1 is not up`.
pub fn protection_text(p: &pb::Protection) -> String {
    let copies = if p.current_on.is_empty() {
        String::new()
    } else {
        format!(" (current copies on {})", p.current_on.join(", "))
    };
    match p.state.as_str() {
        "syncing" => {
            let percent = p.sync_percent;
            let eta = p
                .sync_eta_seconds
                .map_or_else(|| "ETA unknown".to_string(), |s| format!("ETA {s} s"));
            let phase = if p.sync_phase.is_empty() {
                String::new()
            } else {
                format!(" ({})", p.sync_phase)
            };
            format!(
                "syncing{phase} {percent}% ({} of {}, {}/s, {eta}){copies}",
                human(p.sync_done_bytes),
                human(p.sync_total_bytes),
                human(p.sync_bytes_per_second)
            )
        }
        "simplex" => format!("simplex: {}{copies}", p.reason),
        other => format!("{other}{copies}"),
    }
}

/// The mirrored disks' writes in a line: `vda 1234 writes, mean 0.8 ms` per disk (each
/// write completes only once on both hosts: the mirror's write latency).
pub fn writes_text(writes: &[pb::DiskWrites]) -> String {
    writes
        .iter()
        .map(|w| {
            if w.count == 0 {
                return format!("{} none yet", w.device);
            }
            #[allow(clippy::cast_precision_loss, reason = "counts far below 2^53")]
            let mean_ms = w.total_seconds * 1000.0 / w.count as f64;
            format!("{} {} writes, mean {mean_ms:.2} ms", w.device, w.count)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A failover in a line: when, why, and the downtime once the VM ran again.
pub fn failover_text(f: &pb::Failover) -> String {
    let downtime = if f.running_unix_ms > 0 {
        format!(
            ", running again after {} ms",
            f.running_unix_ms - f.decided_unix_ms
        )
    } else {
        ", still starting".into()
    };
    format!(
        "{} → {} at {} ({}){downtime}",
        f.from_node,
        f.to_node,
        utc(f.decided_unix_ms),
        f.reason
    )
}

/// A VM as a block of `key: value` lines.
pub fn vm_text(vm: &pb::Vm) -> String {
    let disks: Vec<String> = vm
        .disks
        .iter()
        .map(|d| format!("{} in {}", human(d.size_bytes), d.storage_group))
        .collect();
    let nics: Vec<String> = vm
        .nics
        .iter()
        .map(|n| format!("{} ({})", n.network, n.mac))
        .collect();
    let boot = match &vm.boot {
        Some(pb::vm::Boot::KernelImage(image)) => format!("kernel image {image}"),
        Some(pb::vm::Boot::Iso(name)) => format!("ISO {name} (library)"),
        None => "-".into(),
    };
    let mut protection = String::new();
    if let Some(ft) = &vm.ft {
        protection = format!("ft:      {}\n", ft_text(ft));
    }
    if let Some(p) = &vm.protection {
        protection.push_str(&format!("protect: {}\n", protection_text(p)));
        if let Some(f) = &p.last_failover {
            protection.push_str(&format!("failover: {}\n", failover_text(f)));
        }
        if !p.disk_writes.is_empty() {
            protection.push_str(&format!("writes:  {}\n", writes_text(&p.disk_writes)));
        }
    }
    format!(
        "name:    {}\nuuid:    {}\nstate:   {} ({})\nnode:    {}\nmode:    {}\n{protection}vcpus:   {}\nmemory:  {} MiB\ndisks:   {}\nnics:    {}\nboot:    {}\n",
        vm.name,
        vm.uuid,
        state_name(vm.state()),
        vm.state_reason,
        vm.node,
        mode_name(vm.mode()),
        vm.vcpus,
        vm.memory_mib,
        if disks.is_empty() {
            "-".into()
        } else {
            disks.join(", ")
        },
        if nics.is_empty() {
            "-".into()
        } else {
            nics.join(", ")
        },
        boot,
    )
}

/// A VM's protection in a table cell: an FT VM's phase, an HA VM's protection state, or `-`.
fn protection_cell(vm: &pb::Vm) -> String {
    match (&vm.ft, &vm.protection) {
        (Some(ft), _) => ft_phase_name(ft.phase()).into(),
        (None, Some(p)) => p.state.clone(),
        (None, None) => "-".into(),
    }
}

/// VMs as an aligned table.
pub fn vms_table(vms: &[pb::Vm]) -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "STATE".into(),
        "MODE".into(),
        "PROTECTION".into(),
        "NODE".into(),
        "VCPUS".into(),
        "MEMORY".into(),
        "REASON".into(),
    ]];
    rows.extend(vms.iter().map(|vm| {
        [
            vm.name.clone(),
            state_name(vm.state()).into(),
            mode_name(vm.mode()).into(),
            protection_cell(vm),
            vm.node.clone(),
            vm.vcpus.to_string(),
            format!("{} MiB", vm.memory_mib),
            vm.state_reason.clone(),
        ]
    }));
    table(&rows)
}

/// Lower-case name of a host's health.
pub fn node_state_name(state: pb::NodeState) -> &'static str {
    match state {
        pb::NodeState::Up => "up",
        pb::NodeState::Suspect => "suspect",
        pb::NodeState::Lost => "lost",
        pb::NodeState::Fenced => "fenced",
        pb::NodeState::Invalid => "invalid",
    }
}

fn role_name(role: pb::NodeRole) -> &'static str {
    if role == pb::NodeRole::Serving {
        "serving"
    } else {
        "standby"
    }
}

fn up_down(up: bool) -> &'static str {
    if up { "up" } else { "down" }
}

/// A heartbeat path in a few characters: `alink1 up (40 ms)`, `priv0 SILENT (never)`.
fn path_text(p: &pb::HeartbeatPath) -> String {
    let heard = p
        .ms_since_heard
        .map_or_else(|| "never".to_string(), |ms| format!("{ms} ms"));
    if p.up {
        format!("{} up ({heard})", p.name)
    } else {
        format!("{} SILENT ({heard})", p.name)
    }
}

/// Nodes and capacity as JSON.
pub fn nodes_json(resp: &pb::ListNodesResponse) -> Value {
    json!({
        "nodes": resp.nodes.iter().map(|n| json!({
            "name": n.name,
            "role": role_name(n.role()),
            "state": node_state_name(n.state()),
            "state_reason": n.state_reason,
            "lease_alive": n.lease_alive,
            "agent_up": n.agent_up,
            "controller_up": n.controller_up,
            "paths": n.paths.iter().map(|p| json!({
                "name": p.name, "up": p.up, "ms_since_heard": p.ms_since_heard,
            })).collect::<Vec<_>>(),
            "alinks": n.alinks.iter().map(|l| json!({
                "name": l.name, "up": l.up, "bytes_sent": l.bytes_sent,
                "bytes_received": l.bytes_received, "retransmits": l.retransmits,
                "rtt_us": l.rtt_us,
            })).collect::<Vec<_>>(),
            "api_address": n.api_address,
            "cpus": n.cpus,
            "memory_mib": n.memory_mib,
            "storage_groups": n.storage_groups.iter().map(|g| json!({
                "name": g.name, "total_bytes": g.total_bytes, "free_bytes": g.free_bytes,
            })).collect::<Vec<_>>(),
            "networks": n.networks,
            "boot_images": n.boot_images,
            "qemu_version": n.qemu_version,
            "libvirt_version": n.libvirt_version,
            "running_vms": n.running_vms,
        })).collect::<Vec<_>>(),
        "capacity": resp.capacity.as_ref().map(|c| json!({
            "free_vcpus": c.free_vcpus, "free_memory_mib": c.free_memory_mib,
        })),
        "quorum": resp.quorum.iter().map(|m| json!({
            "name": m.name, "endpoint": m.endpoint, "up": m.up, "leader": m.leader,
        })).collect::<Vec<_>>(),
    })
}

/// The quorum's members in a line: `n0 up (leader), n1 up, w down`.
fn quorum_text(quorum: &[pb::QuorumMember]) -> String {
    quorum
        .iter()
        .map(|m| {
            let state = if m.up { "up" } else { "down" };
            let leads = if m.leader { " (leader)" } else { "" };
            format!("{} {state}{leads}", m.name)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Nodes as a table, each node's health and heartbeat paths, then the free capacity.
pub fn nodes_text(resp: &pb::ListNodesResponse) -> String {
    let mut rows = vec![[
        "NODE".to_string(),
        "ROLE".into(),
        "HEALTH".into(),
        "AGENT".into(),
        "CONTROLLER".into(),
        "CPUS".into(),
        "MEMORY".into(),
        "VMS".into(),
        "STORAGE".into(),
        "QEMU/LIBVIRT".into(),
    ]];
    rows.extend(resp.nodes.iter().map(|n| {
        let storage: Vec<String> = n
            .storage_groups
            .iter()
            .map(|g| format!("{} {} free", g.name, human(g.free_bytes)))
            .collect();
        [
            n.name.clone(),
            role_name(n.role()).into(),
            node_state_name(n.state()).into(),
            up_down(n.agent_up).into(),
            up_down(n.controller_up).into(),
            n.cpus.to_string(),
            format!("{} MiB", n.memory_mib),
            n.running_vms.to_string(),
            storage.join(", "),
            format!("{}/{}", n.qemu_version, n.libvirt_version),
        ]
    }));
    let mut text = table(&rows);
    for n in &resp.nodes {
        let paths: Vec<String> = n.paths.iter().map(path_text).collect();
        let state = node_state_name(n.state());
        let health = if n.state_reason.is_empty() || n.state_reason == state {
            state.to_string()
        } else {
            format!("{state} ({})", n.state_reason)
        };
        text.push_str(&format!(
            "\n{}: {health}; host lease {}\n  heartbeats heard from {}: {}\n",
            n.name,
            if n.lease_alive { "alive" } else { "expired" },
            n.name,
            if paths.is_empty() {
                "no report".to_string()
            } else {
                paths.join(", ")
            },
        ));
        for l in &n.alinks {
            let rtt = l.rtt_us.map_or("-".to_string(), |us| format!("{us} us"));
            text.push_str(&format!(
                "  {} {}: sent {}, received {}, {} retransmits, rtt {rtt}\n",
                l.name,
                if l.up { "up" } else { "down" },
                human(l.bytes_sent),
                human(l.bytes_received),
                l.retransmits
            ));
        }
    }
    if !resp.quorum.is_empty() {
        text.push_str(&format!("\netcd quorum: {}\n", quorum_text(&resp.quorum)));
    }
    if let Some(c) = &resp.capacity {
        text.push_str(&format!(
            "\nfree for new VMs (smaller node, overhead included): {} vCPUs, {} MiB\n",
            c.free_vcpus, c.free_memory_mib
        ));
    }
    text
}

/// Alerts as JSON.
pub fn alerts_json(alerts: &[pb::Alert]) -> Value {
    Value::Array(
        alerts
            .iter()
            .map(|a| {
                json!({
                    "id": a.id, "node": a.node, "vm_uuid": a.vm_uuid,
                    "message": a.message, "raised_unix_ms": a.raised_unix_ms,
                    "cleared_by": a.cleared_by,
                })
            })
            .collect(),
    )
}

/// Alerts as lines, or a line saying there are none.
pub fn alerts_text(alerts: &[pb::Alert]) -> String {
    if alerts.is_empty() {
        return "no open alerts\n".into();
    }
    alerts
        .iter()
        .map(|a| {
            let cleared = if a.cleared_by.is_empty() {
                String::new()
            } else {
                format!(" (cleared by {})", a.cleared_by)
            };
            format!("{:<40} {}{cleared}\n", a.id, a.message)
        })
        .collect()
}

/// An event as JSON.
pub fn event_json(e: &pb::Event) -> Value {
    json!({
        "revision": e.revision,
        "kind": event_kind_name(e.kind()),
        "vm_uuid": e.vm_uuid,
        "vm_name": e.vm_name,
        "node": e.node,
        "state": state_name(e.state()),
        "message": e.message,
        "unix_ms": e.unix_ms,
        "alert_id": e.alert_id,
    })
}

/// An event as one line.
pub fn event_text(e: &pb::Event) -> String {
    let subject = if e.vm_name.is_empty() {
        e.node.clone()
    } else {
        format!("{} on {}", e.vm_name, e.node)
    };
    format!(
        "{:>8} {:<18} {} {}",
        e.revision,
        event_kind_name(e.kind()),
        subject,
        e.message
    )
}

/// Left-aligned columns separated by two spaces.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_text_shows_each_disks_mean_write_time() {
        let writes = [
            pb::DiskWrites {
                device: "vda".into(),
                count: 400,
                total_seconds: 0.5,
            },
            pb::DiskWrites {
                device: "vdb".into(),
                count: 0,
                total_seconds: 0.0,
            },
        ];
        assert_eq!(
            writes_text(&writes),
            "vda 400 writes, mean 1.25 ms; vdb none yet"
        );
    }

    #[test]
    fn protection_text_syncing_shows_share_bytes_rate_and_eta() {
        let p = pb::Protection {
            state: "syncing".into(),
            sync_done_bytes: 4 << 20,
            sync_total_bytes: 16 << 20,
            sync_percent: 25,
            sync_phase: "copy".into(),
            sync_bytes_per_second: 2 << 20,
            sync_eta_seconds: Some(6),
            current_on: vec!["n1".into()],
            ..Default::default()
        };

        assert_eq!(
            protection_text(&p),
            format!(
                "syncing (copy) 25% ({} of {}, {}/s, ETA 6 s) (current copies on n1)",
                human(4 << 20),
                human(16 << 20),
                human(2 << 20)
            )
        );
    }

    #[test]
    fn table_aligns_columns() {
        let rows = [
            ["A".to_string(), "B".to_string()],
            ["long".to_string(), "x".to_string()],
        ];

        let text = table(&rows);

        assert_eq!(text, "A     B\nlong  x\n");
    }

    #[test]
    fn path_text_silent_path_is_shouted() {
        let path = pb::HeartbeatPath {
            name: "alink1".into(),
            up: false,
            ms_since_heard: Some(4200),
        };

        let text = path_text(&path);

        assert_eq!(text, "alink1 SILENT (4200 ms)");
    }

    #[test]
    fn vm_json_names_state_and_mode() {
        let vm = pb::Vm {
            name: "web".into(),
            mode: pb::ProtectionMode::Ft.into(),
            state: pb::VmState::Running.into(),
            ..Default::default()
        };

        let value = vm_json(&vm);

        assert_eq!(value["state"], "running");
        assert_eq!(value["mode"], "ft");
    }

    fn ft_vm() -> pb::Vm {
        pb::Vm {
            name: "web".into(),
            mode: pb::ProtectionMode::Ft.into(),
            state: pb::VmState::Running.into(),
            node: "n1".into(),
            protection: Some(pb::Protection {
                state: "protected".into(),
                current_on: vec!["n0".into(), "n1".into()],
                last_failover: Some(pb::Failover {
                    from_node: "n0".into(),
                    to_node: "n1".into(),
                    reason: "host n0 lost".into(),
                    decided_unix_ms: 1_000,
                    running_unix_ms: 1_450,
                }),
                ..Default::default()
            }),
            ft: Some(pb::FtInfo {
                phase: pb::FtPhase::Protected.into(),
                epochs_per_second: Some(9.84),
                last_pause_ms: Some(3.25),
                committed_epoch: 1234,
                last_error: "the standby refused epoch 17".into(),
                waiting_for_mirror: false,
                pause_histogram: vec![pb::DurationBucket {
                    le_ms: 5.0,
                    count: 3,
                }],
                pause_count: 4,
                pause_sum_ms: 14.0,
                epoch_histogram: vec![pb::DurationBucket {
                    le_ms: 200.0,
                    count: 3,
                }],
                epoch_count: 3,
                epoch_sum_ms: 360.0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn ft_text_shows_phase_epoch_rate_pause_and_last_error() {
        let text = ft_text(&ft_vm().ft.unwrap());

        assert_eq!(
            text,
            "protected, epoch 1234, 9.8 epochs/s, last pause 3.2 ms, mean pause 3.5 ms over 4 checkpoints, mean epoch 120 ms, last error: the standby refused epoch 17"
        );
    }

    #[test]
    fn quorum_text_names_each_member_its_state_and_the_leader() {
        let member = |name: &str, up, leader| pb::QuorumMember {
            name: name.into(),
            endpoint: String::new(),
            up,
            leader,
        };
        let quorum = [
            member("n0", true, true),
            member("n1", false, false),
            member("w", true, false),
        ];

        assert_eq!(quorum_text(&quorum), "n0 up (leader), n1 down, w up");
    }

    #[test]
    fn ft_text_before_any_checkpoint_is_the_phase_and_the_wait() {
        let ft = pb::FtInfo {
            phase: pb::FtPhase::Syncing.into(),
            waiting_for_mirror: true,
            ..Default::default()
        };

        assert_eq!(ft_text(&ft), "syncing, waiting for the mirror");
    }

    #[test]
    fn vm_text_ft_vm_shows_ft_protection_and_last_failover() {
        let text = vm_text(&ft_vm());

        assert!(
            text.contains("\nft:      protected, epoch 1234")
                && text.contains("\nprotect: protected (current copies on n0, n1)\n")
                && text.contains("\nfailover: n0 → n1 at "),
            "{text}"
        );
    }

    #[test]
    fn vm_json_ft_vm_has_ft_block() {
        let value = vm_json(&ft_vm());

        assert_eq!(value["ft"]["phase"], "protected");
        assert_eq!(value["ft"]["epochs_per_second"], 9.84);
        assert_eq!(value["ft"]["last_pause_ms"], 3.25);
        assert_eq!(value["ft"]["committed_epoch"], 1234);
        assert_eq!(value["ft"]["pauses"]["count"], 4);
        assert_eq!(value["ft"]["pauses"]["buckets"][0]["le_ms"], 5.0);
        assert_eq!(value["ft"]["epochs"]["count"], 3);
        assert_eq!(value["protection"]["last_failover"]["downtime_ms"], 450);
    }

    #[test]
    fn vm_json_ha_vm_has_no_ft_block() {
        let vm = pb::Vm {
            mode: pb::ProtectionMode::Ha.into(),
            ..Default::default()
        };

        assert_eq!(vm_json(&vm)["ft"], Value::Null);
    }

    #[test]
    fn vms_table_ft_vm_shows_its_phase() {
        let text = vms_table(&[ft_vm()]);

        assert_eq!(
            text,
            "NAME  STATE    MODE  PROTECTION  NODE  VCPUS  MEMORY  REASON\nweb   running  ft    protected   n1    0      0 MiB\n"
        );
    }
}
