//! The pair's event log: committed changes in etcd, turned into API events.
//!
//! Any controller can serve `WatchEvents` from its own etcd watch (with previous values), so the
//! log needs no writes of its own, is ordered by store revision, survives a change of serving
//! controller, and can be resumed from a revision. A change of an FT VM's record that moves
//! its phase ([`crate::ft`]) tells that too, as a second event of the same revision.

use proto::v1 as pb;

use crate::ft;
use crate::ha::{Protection, Sync};
use crate::model::{NodeRecord, VmRecord, VmState};
use crate::store::{ALERTS, Alert, LEADER, NODES, VMS};
use daemon::pair::LeaderInfo;

/// One committed change of a key.
#[derive(Clone, Copy, Debug)]
pub struct Change<'a> {
    /// Store revision of the change.
    pub revision: i64,
    /// The key.
    pub key: &'a str,
    /// The new value, or `None` for a delete.
    pub value: Option<&'a [u8]>,
    /// The previous value, if there was one.
    pub prev: Option<&'a [u8]>,
    /// Wall-clock time to stamp events that carry none.
    pub now_unix_ms: i64,
}

/// The API events a change means, in order: none, one, or (an FT VM's change of phase) two.
pub fn from_change(change: &Change<'_>) -> Vec<pb::Event> {
    if change.key.starts_with(VMS) {
        let new: Option<VmRecord> = change.value.and_then(|v| serde_json::from_slice(v).ok());
        let old: Option<VmRecord> = change.prev.and_then(|v| serde_json::from_slice(v).ok());
        let records = (new.as_ref(), old.as_ref());
        vm_event(change, records)
            .into_iter()
            .chain(ft_event(change, records))
            .collect()
    } else if change.key.starts_with(NODES) {
        node_event(change).into_iter().collect()
    } else if change.key == LEADER {
        leader_event(change).into_iter().collect()
    } else if change.key.starts_with(ALERTS) {
        alert_event(change).into_iter().collect()
    } else {
        Vec::new()
    }
}

/// A VM record after and before a change (`None`: absent, or unreadable).
type Records<'a> = (Option<&'a VmRecord>, Option<&'a VmRecord>);

/// The phase change of an FT VM that `change` means, if any (derived from the records alone).
fn ft_event(change: &Change<'_>, (new, old): Records<'_>) -> Option<pb::Event> {
    let phase = |record: Option<&VmRecord>| record.and_then(|r| ft::phase_of(r, None));
    let moved = ft::transition(phase(old), phase(new))?;
    let vm = new.or(old)?;
    Some(pb::Event {
        revision: change.revision,
        kind: pb::EventKind::VmFt.into(),
        vm_uuid: vm.uuid.clone(),
        vm_name: vm.name.clone(),
        node: vm.node.clone(),
        state: vm_state_to_pb(vm.state).into(),
        message: ft::message(&moved, &vm.protection, &vm.state_reason),
        unix_ms: if new.is_some() {
            vm.updated_unix_ms
        } else {
            change.now_unix_ms
        },
        alert_id: String::new(),
    })
}

/// A protection change at `now_unix_ms` in words: `simplex → protected; current copies on n0,
/// n1`, or the sync's progress with its rate and time left.
fn protection_message(old: &Protection, new: &Protection, now_unix_ms: i64) -> String {
    let copies: Vec<&str> = new.current.iter().map(String::as_str).collect();
    let detail = match (&new.sync, new.sync.progress(now_unix_ms)) {
        (Sync::Syncing { done, total, .. }, Some(p)) => {
            let eta = p
                .eta_seconds
                .map_or_else(|| "ETA unknown".to_string(), |s| format!("ETA {s} s"));
            format!(
                " ({}) {}% ({done} of {total} bytes, {} bytes/s, {eta})",
                new.sync.phase().unwrap_or_default(),
                p.percent,
                p.bytes_per_second
            )
        }
        (Sync::Simplex { reason, .. }, _) => format!(" ({reason})"),
        _ => String::new(),
    };
    format!(
        "{} → {}{detail}; current copies on {}",
        old.sync.name(),
        new.sync.name(),
        copies.join(", ")
    )
}

fn vm_event(change: &Change<'_>, (new, old): Records<'_>) -> Option<pb::Event> {
    let (kind, vm, message) = match (new, old) {
        (Some(new), None) => (
            pb::EventKind::VmCreated,
            new,
            format!("created on {}", new.node),
        ),
        (Some(new), Some(old)) if new.state != old.state => (
            pb::EventKind::VmChanged,
            new,
            format!(
                "{} → {}: {}",
                old.state.name(),
                new.state.name(),
                new.state_reason
            ),
        ),
        (Some(new), Some(old)) if new.protection != old.protection => (
            pb::EventKind::VmProtection,
            new,
            protection_message(&old.protection, &new.protection, new.updated_unix_ms),
        ),
        (Some(new), Some(_)) => (
            pb::EventKind::VmChanged,
            new,
            format!(
                "modified: {} vCPUs, {} MiB, mode {}",
                new.vcpus,
                new.memory_mib,
                new.mode.as_str()
            ),
        ),
        (None, Some(old)) => (pb::EventKind::VmDeleted, old, "deleted".to_string()),
        (None, None) => return None,
    };
    Some(pb::Event {
        revision: change.revision,
        kind: kind.into(),
        vm_uuid: vm.uuid.clone(),
        vm_name: vm.name.clone(),
        node: vm.node.clone(),
        state: vm_state_to_pb(vm.state).into(),
        message,
        unix_ms: if new.is_some() {
            vm.updated_unix_ms
        } else {
            change.now_unix_ms
        },
        alert_id: String::new(),
    })
}

fn node_event(change: &Change<'_>) -> Option<pb::Event> {
    let (kind, raw, message) = match (change.value, change.prev) {
        (Some(value), None) => (
            pb::EventKind::NodeUp,
            value,
            "node up: its agent registered the host",
        ),
        (None, Some(prev)) => (
            pb::EventKind::NodeDown,
            prev,
            "node down: its host lease expired",
        ),
        _ => return None,
    };
    let node: NodeRecord = serde_json::from_slice(raw).ok()?;
    Some(pb::Event {
        revision: change.revision,
        kind: kind.into(),
        node: node.name,
        message: message.into(),
        unix_ms: change.now_unix_ms,
        ..Default::default()
    })
}

fn alert_event(change: &Change<'_>) -> Option<pb::Event> {
    let (kind, raw, verb) = match (change.value, change.prev) {
        (Some(value), _) => (pb::EventKind::AlertRaised, value, "alert".to_string()),
        (None, Some(prev)) => (pb::EventKind::AlertCleared, prev, "cleared".to_string()),
        (None, None) => return None,
    };
    let alert: Alert = serde_json::from_slice(raw).ok()?;
    // An admin's clear rewrites the alert marked cleared: its cause stays.
    let (kind, verb) = if alert.open() {
        (kind, verb)
    } else {
        (
            pb::EventKind::AlertCleared,
            format!("cleared by {} (its cause remains)", alert.cleared_by),
        )
    };
    Some(pb::Event {
        revision: change.revision,
        kind: kind.into(),
        vm_uuid: alert.vm,
        node: alert.node,
        message: format!("{verb}: {}", alert.message),
        unix_ms: change.now_unix_ms,
        alert_id: alert.id,
        ..Default::default()
    })
}

fn leader_event(change: &Change<'_>) -> Option<pb::Event> {
    let value = change.value?;
    let leader: LeaderInfo = serde_json::from_slice(value).ok()?;
    Some(pb::Event {
        revision: change.revision,
        kind: pb::EventKind::ControllerElected.into(),
        message: format!(
            "controller on {} serves the API (term {})",
            leader.node, leader.term
        ),
        node: leader.node,
        unix_ms: change.now_unix_ms,
        ..Default::default()
    })
}

/// The API's name for a VM state.
pub fn vm_state_to_pb(state: VmState) -> pb::VmState {
    match state {
        VmState::Creating => pb::VmState::Creating,
        VmState::Stopped => pb::VmState::Stopped,
        VmState::Starting => pb::VmState::Starting,
        VmState::Running => pb::VmState::Running,
        VmState::Stopping { .. } => pb::VmState::Stopping,
        VmState::Deleting => pb::VmState::Deleting,
        VmState::Paused => pb::VmState::Paused,
        VmState::Lost { .. } => pb::VmState::Lost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Mode;
    use crate::placement::tests::vm;

    fn json(record: &VmRecord) -> Vec<u8> {
        serde_json::to_vec(record).unwrap()
    }

    /// The one event of a change.
    fn only(events: Vec<pb::Event>) -> pb::Event {
        assert_eq!(events.len(), 1, "{events:?}");
        events.into_iter().next().unwrap()
    }

    fn change<'a>(key: &'a str, value: Option<&'a [u8]>, prev: Option<&'a [u8]>) -> Change<'a> {
        Change {
            revision: 42,
            key,
            value,
            prev,
            now_unix_ms: 1,
        }
    }

    #[test]
    fn from_change_new_vm_is_created_event() {
        let record = vm("web", Mode::Ha, 1, 256, "n0");
        let value = json(&record);

        let event = only(from_change(&change("/pairvisor/vms/u", Some(&value), None)));

        assert_eq!(event.kind(), pb::EventKind::VmCreated);
        assert_eq!(event.vm_name, "web");
        assert_eq!(event.revision, 42);
    }

    #[test]
    fn from_change_state_change_says_from_and_to() {
        let old = vm("web", Mode::Ha, 1, 256, "n0");
        let mut new = old.clone();
        new.state = VmState::Running;
        new.state_reason = "started".into();
        let (old, new) = (json(&old), json(&new));

        let event = only(from_change(&change(
            "/pairvisor/vms/u",
            Some(&new),
            Some(&old),
        )));

        assert_eq!(event.kind(), pb::EventKind::VmChanged);
        assert_eq!(event.message, "stopped → running: started");
        assert_eq!(event.state(), pb::VmState::Running);
    }

    #[test]
    fn from_change_protection_change_is_protection_event_with_progress() {
        let old = vm("web", Mode::Ha, 1, 256, "n0");
        let mut new = old.clone();
        new.protection.current = ["n0".to_string()].into();
        new.protection.sync = Sync::Syncing {
            done: 4 << 20,
            total: 16 << 20,
            since_unix_ms: 1,
            verifying: false,
        };
        new.updated_unix_ms = 2_001;
        let (old, new) = (json(&old), json(&new));

        let event = only(from_change(&change(
            "/pairvisor/vms/u",
            Some(&new),
            Some(&old),
        )));

        assert_eq!(event.kind(), pb::EventKind::VmProtection);
        assert_eq!(
            event.message,
            "off → syncing (copy) 25% (4194304 of 16777216 bytes, 2097152 bytes/s, ETA 6 s); current copies on n0"
        );
    }

    #[test]
    fn from_change_deleted_vm_is_named_from_previous_value() {
        let old = json(&vm("web", Mode::Ha, 1, 256, "n0"));

        let event = only(from_change(&change("/pairvisor/vms/u", None, Some(&old))));

        assert_eq!(event.kind(), pb::EventKind::VmDeleted);
        assert_eq!(event.vm_name, "web");
    }

    #[test]
    fn from_change_leader_key_is_controller_elected() {
        let value = br#"{"node":"n1","api_address":"10.0.0.2:7400","term":9}"#;

        let event = only(from_change(&change("/pairvisor/leader", Some(value), None)));

        assert_eq!(event.kind(), pb::EventKind::ControllerElected);
        assert_eq!(event.node, "n1");
    }

    #[test]
    fn from_change_alert_delete_is_cleared_event() {
        let alert = br#"{"id":"path/n0/alink1","node":"n0","vm":"","message":"alink1 silent","raised_unix_ms":5}"#;

        let event = only(from_change(&change(
            "/pairvisor/alerts/path/n0/alink1",
            None,
            Some(alert),
        )));

        assert_eq!(event.kind(), pb::EventKind::AlertCleared);
        assert_eq!(event.alert_id, "path/n0/alink1");
    }

    #[test]
    fn from_change_alert_cleared_by_an_admin_is_cleared_event() {
        let alert = br#"{"id":"host/n1","node":"n1","vm":"","message":"host n1 is lost","raised_unix_ms":5,"cleared_by":"ops"}"#;

        let event = only(from_change(&change(
            "/pairvisor/alerts/host/n1",
            Some(alert),
            None,
        )));

        assert_eq!(event.kind(), pb::EventKind::AlertCleared);
        assert_eq!(
            event.message,
            "cleared by ops (its cause remains): host n1 is lost"
        );
    }

    #[test]
    fn from_change_campaign_key_is_no_event() {
        let value = br#"{"node":"n1","api_address":"10.0.0.2:7400"}"#;

        let events = from_change(&change("/pairvisor/serving/694d", Some(value), None));

        assert_eq!(events, vec![]);
    }

    #[test]
    fn from_change_name_reservation_is_no_event() {
        let events = from_change(&change("/pairvisor/names/web", Some(b"u"), None));

        assert_eq!(events, vec![]);
    }

    /// FT VM `web` running on n0, checkpointed to n1.
    fn protected_ft() -> VmRecord {
        let mut record = vm("web", Mode::Ft, 1, 256, "n0");
        record.state = VmState::Running;
        record.protection.current = ["n0".to_string(), "n1".to_string()].into();
        record.protection.sync = Sync::Protected { since_unix_ms: 1 };
        record
    }

    #[test]
    fn from_change_ft_failover_is_state_change_then_ft_phase() {
        let old = protected_ft();
        let mut new = old.clone();
        new.state = VmState::Starting;
        new.state_reason = "host n0 lost; restarting on n1 from its replica".into();
        new.node = "n1".into();
        new.protection = crate::ha::failed_over("n0", "n1", "host n0 lost", 5);
        let (old, new) = (json(&old), json(&new));

        let events = from_change(&change("/pairvisor/vms/u", Some(&new), Some(&old)));

        let kinds: Vec<pb::EventKind> = events.iter().map(pb::Event::kind).collect();
        assert_eq!(kinds, [pb::EventKind::VmChanged, pb::EventKind::VmFt]);
        assert_eq!(
            events[1].message,
            "FT protected → failing-over: moving from n0 to n1 (host n0 lost)"
        );
    }

    #[test]
    fn from_change_ft_first_checkpoint_is_protection_then_ft_phase() {
        let mut old = protected_ft();
        old.protection.sync = Sync::Syncing {
            done: 4,
            total: 4,
            since_unix_ms: 1,
            verifying: false,
        };
        let new = protected_ft();
        let (old, new) = (json(&old), json(&new));

        let events = from_change(&change("/pairvisor/vms/u", Some(&new), Some(&old)));

        assert_eq!(events[1].kind(), pb::EventKind::VmFt);
        assert_eq!(events[1].message, "FT syncing → protected");
    }

    #[test]
    fn from_change_ha_protection_change_has_no_ft_event() {
        let mut old = protected_ft();
        old.mode = Mode::Ha;
        let mut new = old.clone();
        new.protection.sync = Sync::Simplex {
            reason: "gone".into(),
            since_unix_ms: 2,
        };
        let (old, new) = (json(&old), json(&new));

        let events = from_change(&change("/pairvisor/vms/u", Some(&new), Some(&old)));

        assert_eq!(only(events).kind(), pb::EventKind::VmProtection);
    }
}
