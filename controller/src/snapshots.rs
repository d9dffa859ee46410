//! Snapshot rules: which snapshots may be taken, deleted or restored, and what a new one is.
//! Pure: the engine applies them to a VM's record and carries them out through its host's
//! agent.

use crate::error::ApiError;
use crate::model::{Consistency, Mode, Snapshot, SnapshotState, VmRecord, VmState};

/// Snapshots a VM keeps at most.
pub const MAX_SNAPSHOTS: usize = 16;
/// Longest description kept.
pub const MAX_DESCRIPTION: usize = 256;

/// The consistency a caller asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    /// Application-consistent when the guest has an agent, else crash-consistent (warned).
    Auto,
    /// Crash-consistent.
    Crash,
    /// Application-consistent, or refused.
    Application,
}

/// A snapshot to take: its record (state `Creating`), the snapshot it builds on and what the
/// caller should be told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    /// The new record.
    pub snapshot: Snapshot,
    /// The newest snapshot on the VM's host, whose changes since it the new one holds.
    pub parent: Option<String>,
    /// Whether to copy it to the peer: the VM is protected and the peer holds the parent.
    pub replicate: bool,
    /// Warnings for the caller (e.g. the fallback to crash consistency).
    pub warnings: Vec<String>,
}

/// Plans a new snapshot of `vm`, whose host's peer is `peer`. Pairvisor's domains have no
/// guest-agent channel yet, so every guest counts as having no agent: application
/// consistency is refused and the default falls back to crash consistency with a warning.
pub fn plan(
    vm: &VmRecord,
    peer: Option<&str>,
    description: &str,
    ask: Ask,
    now_unix_ms: i64,
) -> Result<Planned, ApiError> {
    if !matches!(vm.state, VmState::Running | VmState::Stopped) {
        return Err(ApiError::FailedPrecondition(format!(
            "VM {} is {}; a snapshot is taken while it runs or is stopped",
            vm.name,
            vm.state.name()
        )));
    }
    if let Some(busy) = vm
        .snapshots
        .iter()
        .find(|s| s.state != SnapshotState::Ready)
    {
        return Err(ApiError::FailedPrecondition(format!(
            "VM {}'s snapshot {} is {}; if no operation on it runs any more, delete it with pvctl vm-snapshot-delete {} {}",
            vm.name,
            busy.id,
            state_name(busy.state),
            vm.name,
            busy.id
        )));
    }
    if vm.snapshots.len() >= MAX_SNAPSHOTS {
        let oldest = &vm.snapshots[0];
        return Err(ApiError::FailedPrecondition(format!(
            "VM {} has {MAX_SNAPSHOTS} snapshots, the most it keeps; delete the oldest first: pvctl vm-snapshot-delete {} {}",
            vm.name, vm.name, oldest.id
        )));
    }
    if description.len() > MAX_DESCRIPTION {
        return Err(ApiError::invalid(
            "description",
            format!(
                "{} characters; at most {MAX_DESCRIPTION}",
                description.len()
            ),
        ));
    }
    let mut warnings = Vec::new();
    match ask {
        Ask::Application => {
            return Err(ApiError::FailedPrecondition(format!(
                "VM {} has no guest agent, so its file systems cannot be frozen for an application-consistent snapshot; take a crash-consistent one with --consistency crash",
                vm.name
            )));
        }
        Ask::Auto => warnings.push(format!(
            "VM {} has no guest agent: the snapshot is crash-consistent (the disks as a power cut would leave them)",
            vm.name
        )),
        Ask::Crash => {}
    }
    let parent = vm
        .snapshots
        .iter()
        .rev()
        .find(|s| s.nodes.contains(&vm.node));
    // The peer's copy of an incremental needs the parent there too.
    let replicate = vm.mode != Mode::Unprotected
        && peer.is_some_and(|p| parent.is_none_or(|s| s.nodes.iter().any(|n| n == p)));
    let parent = parent.map(|s| s.id.clone());
    Ok(Planned {
        snapshot: Snapshot {
            id: vm.next_snapshot.max(1).to_string(),
            description: description.to_string(),
            created_unix_ms: now_unix_ms,
            consistency: Consistency::Crash,
            nodes: vec![vm.node.clone()],
            bytes: 0,
            incremental: false,
            freeze_us: 0,
            state: SnapshotState::Creating,
        },
        parent,
        replicate,
        warnings,
    })
}

/// The snapshot `id` of `vm`, if it may be deleted. The engine runs one snapshot operation
/// per VM, so when it asks no operation runs: a snapshot left `Creating` or `Deleting` (by a
/// failed write or an earlier controller) may be deleted too.
pub fn check_delete<'a>(vm: &'a VmRecord, id: &str) -> Result<&'a Snapshot, ApiError> {
    find(vm, id)
}

/// The snapshot `id` of `vm`, if it may be restored now.
pub fn check_restore<'a>(vm: &'a VmRecord, id: &str) -> Result<&'a Snapshot, ApiError> {
    let snapshot = find(vm, id)?;
    if vm.state != VmState::Stopped {
        return Err(ApiError::FailedPrecondition(format!(
            "VM {} is {}; a snapshot is restored only while the VM is stopped: shut it down first",
            vm.name,
            vm.state.name()
        )));
    }
    if snapshot.state != SnapshotState::Ready {
        return Err(ApiError::FailedPrecondition(format!(
            "VM {}'s snapshot {id} is {}; only a taken snapshot can be restored",
            vm.name,
            state_name(snapshot.state)
        )));
    }
    if !snapshot.nodes.contains(&vm.node) {
        let kept = snapshot.nodes.join(", ");
        return Err(ApiError::FailedPrecondition(format!(
            "VM {}'s snapshot {id} is kept on {kept}, but its disks are on {} now; it can be restored once the VM is back on {kept}",
            vm.name, vm.node
        )));
    }
    Ok(snapshot)
}

fn find<'a>(vm: &'a VmRecord, id: &str) -> Result<&'a Snapshot, ApiError> {
    vm.snapshots
        .iter()
        .find(|s| s.id == id)
        .ok_or_else(|| ApiError::SnapshotNotFound {
            vm: vm.name.clone(),
            id: id.to_string(),
        })
}

/// The state's name for messages.
pub fn state_name(state: SnapshotState) -> &'static str {
    match state {
        SnapshotState::Creating => "being taken",
        SnapshotState::Ready => "ready",
        SnapshotState::Deleting => "being deleted",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Mode;
    use crate::placement::tests::vm;

    fn with_snapshots(count: u64) -> VmRecord {
        let mut record = vm("web", Mode::Ha, 1, 256, "n0");
        record.state = VmState::Running;
        for n in 1..=count {
            record.snapshots.push(Snapshot {
                id: n.to_string(),
                description: String::new(),
                created_unix_ms: 0,
                consistency: Consistency::Crash,
                nodes: vec!["n0".into()],
                bytes: 1,
                incremental: n > 1,
                freeze_us: 0,
                state: SnapshotState::Ready,
            });
        }
        record.next_snapshot = count + 1;
        record
    }

    #[test]
    fn plan_builds_on_the_newest_snapshot_with_the_next_id() {
        let planned = plan(&with_snapshots(2), Some("n1"), "nightly", Ask::Crash, 9).unwrap();

        assert_eq!(planned.snapshot.id, "3");
        assert_eq!(planned.parent.as_deref(), Some("2"));
        // The peer lacks the parent: a copy there could not be read.
        assert!(!planned.replicate);
        assert_eq!(planned.snapshot.state, SnapshotState::Creating);
        assert!(planned.warnings.is_empty());
    }

    #[test]
    fn plan_ignores_snapshots_kept_on_the_other_host() {
        let mut record = with_snapshots(2);
        record.node = "n1".into();

        let planned = plan(&record, Some("n0"), "", Ask::Crash, 9).unwrap();

        assert_eq!(planned.parent, None);
        assert_eq!(planned.snapshot.nodes, ["n1"]);
        assert!(
            planned.replicate,
            "a full snapshot of an HA VM goes to the peer"
        );
    }

    #[test]
    fn plan_copies_to_a_peer_that_holds_the_parent_but_not_for_unprotected_vms() {
        let mut record = with_snapshots(1);
        record.snapshots[0].nodes.push("n1".into());
        let mut unprotected = record.clone();
        unprotected.mode = Mode::Unprotected;

        assert!(
            plan(&record, Some("n1"), "", Ask::Crash, 9)
                .unwrap()
                .replicate
        );
        assert!(
            !plan(&unprotected, Some("n1"), "", Ask::Crash, 9)
                .unwrap()
                .replicate
        );
    }

    #[test]
    fn seventeenth_snapshot_is_refused_naming_the_oldest() {
        let err = plan(&with_snapshots(16), None, "", Ask::Crash, 9).unwrap_err();

        assert_eq!(
            err.to_string(),
            "VM web has 16 snapshots, the most it keeps; delete the oldest first: pvctl vm-snapshot-delete web 1"
        );
    }

    #[test]
    fn application_consistency_without_guest_agent_is_refused_and_auto_warns() {
        let record = with_snapshots(0);

        let refused = plan(&record, None, "", Ask::Application, 9).unwrap_err();
        let auto = plan(&record, None, "", Ask::Auto, 9).unwrap();

        assert!(refused.to_string().contains("no guest agent"), "{refused}");
        assert_eq!(auto.snapshot.consistency, Consistency::Crash);
        assert!(
            auto.warnings[0].contains("crash-consistent"),
            "{:?}",
            auto.warnings
        );
    }

    #[test]
    fn plan_while_another_snapshot_runs_or_the_vm_starts_is_refused() {
        let mut busy = with_snapshots(1);
        busy.snapshots[0].state = SnapshotState::Deleting;
        let mut starting = with_snapshots(0);
        starting.state = VmState::Starting;

        let busy = plan(&busy, None, "", Ask::Crash, 9).unwrap_err();
        let starting = plan(&starting, None, "", Ask::Crash, 9).unwrap_err();

        assert!(busy.to_string().contains("being deleted"), "{busy}");
        assert!(starting.to_string().contains("is starting"), "{starting}");
    }

    #[test]
    fn restore_needs_a_stopped_vm_on_the_snapshots_host() {
        let running = with_snapshots(1);
        let mut moved = with_snapshots(1);
        moved.state = VmState::Stopped;
        moved.node = "n1".into();
        let mut stopped = with_snapshots(1);
        stopped.state = VmState::Stopped;

        let err = check_restore(&running, "1").unwrap_err();
        assert!(err.to_string().contains("shut it down first"), "{err}");
        let err = check_restore(&moved, "1").unwrap_err();
        assert!(err.to_string().contains("kept on n0"), "{err}");
        assert_eq!(check_restore(&stopped, "1").unwrap().id, "1");
        assert!(matches!(
            check_restore(&stopped, "7"),
            Err(ApiError::SnapshotNotFound { .. })
        ));
    }
}
