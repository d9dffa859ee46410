use super::*;
use crate::ha::{self, Mirror, Observed, Placement};
use crate::placement::tests::vm;

const N0: &str = "n0";
const N1: &str = "n1";

/// FT VM `web` running on n0, checkpointed to n1.
fn protected() -> VmRecord {
    let mut record = vm("web", Mode::Ft, 1, 256, N0);
    record.state = VmState::Running;
    record.protection = Protection {
        current: [N0.to_string(), N1.to_string()].into(),
        sync: Sync::Protected { since_unix_ms: 10 },
        mirror_path: 7,
        ..Protection::default()
    };
    record
}

/// `record` failed over from its host to the peer at 1 000 ms, as the engine commits it.
fn failed_over(record: &VmRecord) -> VmRecord {
    let placement = Placement {
        relocate: Some(N1),
        why: "host n0 lost",
        crash: false,
        behind: false,
    };
    let mut next = record.clone();
    next.protection = ha::placed(&record.protection, true, N0, &placement, 1_000).unwrap();
    next.node = N1.into();
    next.state = VmState::Starting;
    next
}

/// `record` running again after its start at 1 400 ms.
fn runs(record: &VmRecord) -> VmRecord {
    let mut next = record.clone();
    next.state = VmState::Running;
    if let Some(protection) = ha::running(&record.protection, 1_400) {
        next.protection = protection;
    }
    next
}

/// `record` after a poll of its host that shows `mirror`, the peer up.
fn observed(record: &VmRecord, mirror: Mirror) -> VmRecord {
    let seen = Observed {
        primary: &record.node,
        peer: Some(if record.node == N0 { N1 } else { N0 }),
        peer_up: true,
        mirror,
        mirror_path: 8,
        mark: None,
        protecting: false,
        now_unix_ms: 2_000,
    };
    let mut next = record.clone();
    if let Some(protection) = ha::observe(&record.protection, &seen).protection {
        next.protection = protection;
    }
    next
}

fn report(committed_epoch: u64, error: &str) -> FtSeen {
    FtSeen {
        committed_epoch,
        last_pause_us: 2_500,
        error: error.into(),
        waiting_for_mirror: false,
        pauses: DurationHistogram::default(),
        epochs: DurationHistogram::default(),
    }
}

fn event(old: Option<FtPhase>, new: Option<FtPhase>) -> Option<FtEvent> {
    transition(old, new).map(|c| c.event)
}

#[test]
fn phase_of_failover_of_protected_vm_goes_failing_over_simplex_syncing_protected() {
    let before = protected();
    let moving = failed_over(&before);
    let resumed = runs(&moving);
    let syncing = observed(
        &resumed,
        Mirror::Syncing {
            done: 1,
            total: 4,
            verifying: false,
        },
    );
    let again = observed(&syncing, Mirror::Ready);

    let phases = [&before, &moving, &resumed, &syncing, &again].map(|r| phase_of(r, None));

    assert_eq!(
        phases,
        [
            Some(FtPhase::Protected),
            Some(FtPhase::FailingOver),
            Some(FtPhase::Simplex),
            Some(FtPhase::Syncing),
            Some(FtPhase::Protected),
        ]
    );
    assert!(resumed.protection.resume_standby);
}

#[test]
fn transition_failing_over_to_simplex_says_the_standby_resumed() {
    let resumed = runs(&failed_over(&protected()));
    let change = transition(Some(FtPhase::FailingOver), Some(FtPhase::Simplex)).unwrap();

    let text = message(&change, &resumed.protection, &resumed.state_reason);

    assert_eq!(change.event, FtEvent::FailoverDone);
    assert_eq!(
        text,
        "FT failing-over → simplex: running on n1 after 400 ms: its standby resumed from the last checkpoint (same boot)"
    );
}

#[test]
fn phase_of_failed_epoch_is_simplex_at_once() {
    let record = protected();

    let phase = phase_of(&record, Some(&report(40, "the standby refused epoch 41")));

    assert_eq!(phase, Some(FtPhase::Simplex));
    assert_eq!(
        event(Some(FtPhase::Protected), phase),
        Some(FtEvent::Unprotected)
    );
}

#[test]
fn phase_of_failover_whose_start_failed_is_failed() {
    let mut record = failed_over(&protected());
    record.state = VmState::Stopped;
    record.state_reason = "start failed: no standby and no disks".into();
    record.protection.sync = Sync::Off;

    let phase = phase_of(&record, None);

    assert_eq!(phase, Some(FtPhase::Failed));
    assert_eq!(
        event(Some(FtPhase::FailingOver), phase),
        Some(FtEvent::FailoverFailed)
    );
}

#[test]
fn phase_of_lost_host_with_peer_current_is_failing_over() {
    let mut record = protected();
    record.state = VmState::Lost {
        intent: Intent::Resume,
    };

    assert_eq!(phase_of(&record, None), Some(FtPhase::FailingOver));
}

#[test]
fn phase_of_lost_host_with_only_its_copy_current_is_failed() {
    let mut record = protected();
    record.protection.current = [N0.to_string()].into();
    record.state = VmState::Lost {
        intent: Intent::Resume,
    };

    assert_eq!(phase_of(&record, None), Some(FtPhase::Failed));
}

#[test]
fn phase_of_fresh_start_is_starting_until_protection_is_seen() {
    let mut record = vm("web", Mode::Ft, 1, 256, N0);
    record.state = VmState::Starting;
    let starting = phase_of(&record, None);
    record.state = VmState::Running;

    let running = phase_of(&record, None);

    assert_eq!(
        (starting, running),
        (Some(FtPhase::Starting), Some(FtPhase::Starting))
    );
}

#[test]
fn phase_of_stopped_vm_is_off() {
    assert_eq!(phase_of(&vm("web", Mode::Ft, 1, 256, N0), None), None);
}

#[test]
fn phase_of_ha_vm_is_none() {
    let mut record = protected();
    record.mode = Mode::Ha;

    assert_eq!(phase_of(&record, None), None);
}

#[test]
fn transition_same_phase_is_no_event() {
    assert_eq!(
        transition(Some(FtPhase::Protected), Some(FtPhase::Protected)),
        None
    );
}

#[test]
fn transition_off_to_starting_is_start_begin() {
    assert_eq!(
        event(None, Some(FtPhase::Starting)),
        Some(FtEvent::StartBegin)
    );
}

#[test]
fn transition_starting_to_syncing_is_sync_begin() {
    assert_eq!(
        event(Some(FtPhase::Starting), Some(FtPhase::Syncing)),
        Some(FtEvent::SyncBegin)
    );
}

#[test]
fn transition_simplex_to_syncing_is_sync_begin() {
    assert_eq!(
        event(Some(FtPhase::Simplex), Some(FtPhase::Syncing)),
        Some(FtEvent::SyncBegin)
    );
}

#[test]
fn transition_syncing_to_protected_is_protected() {
    assert_eq!(
        event(Some(FtPhase::Syncing), Some(FtPhase::Protected)),
        Some(FtEvent::Protected)
    );
}

#[test]
fn transition_starting_to_simplex_is_unprotected() {
    assert_eq!(
        event(Some(FtPhase::Starting), Some(FtPhase::Simplex)),
        Some(FtEvent::Unprotected)
    );
}

#[test]
fn transition_protected_to_failing_over_is_failover_begin() {
    assert_eq!(
        event(Some(FtPhase::Protected), Some(FtPhase::FailingOver)),
        Some(FtEvent::FailoverBegin)
    );
}

#[test]
fn transition_failing_over_to_protected_is_failover_done() {
    assert_eq!(
        event(Some(FtPhase::FailingOver), Some(FtPhase::Protected)),
        Some(FtEvent::FailoverDone)
    );
}

#[test]
fn transition_simplex_to_failed_is_failed() {
    assert_eq!(
        event(Some(FtPhase::Simplex), Some(FtPhase::Failed)),
        Some(FtEvent::Failed)
    );
}

#[test]
fn transition_failed_to_simplex_is_unprotected() {
    assert_eq!(
        event(Some(FtPhase::Failed), Some(FtPhase::Simplex)),
        Some(FtEvent::Unprotected)
    );
}

#[test]
fn transition_failed_to_starting_is_start_begin() {
    assert_eq!(
        event(Some(FtPhase::Failed), Some(FtPhase::Starting)),
        Some(FtEvent::StartBegin)
    );
}

#[test]
fn transition_protected_to_off_is_stopped() {
    assert_eq!(
        event(Some(FtPhase::Protected), None),
        Some(FtEvent::Stopped)
    );
}

#[test]
fn message_failover_begin_names_both_hosts_and_why() {
    let moving = failed_over(&protected());
    let change = transition(Some(FtPhase::Protected), Some(FtPhase::FailingOver)).unwrap();

    let text = message(&change, &moving.protection, &moving.state_reason);

    assert_eq!(
        text,
        "FT protected → failing-over: moving from n0 to n1 (host n0 lost)"
    );
}

#[test]
fn message_unprotected_gives_the_simplex_reason() {
    let mut record = protected();
    record.protection.sync = Sync::Simplex {
        reason: "the mirror to n1 failed: gone".into(),
        since_unix_ms: 5,
    };
    let change = transition(Some(FtPhase::Protected), Some(FtPhase::Simplex)).unwrap();

    let text = message(&change, &record.protection, "");

    assert_eq!(
        text,
        "FT protected → simplex: the mirror to n1 failed: gone"
    );
}

#[test]
fn metrics_rate_is_epochs_between_two_reports_per_second() {
    let first = metrics(None, N0, &report(100, ""), 10_000);

    let second = metrics(Some(&first), N0, &report(125, ""), 12_000);

    assert_eq!(second.epochs_per_second, Some(12.5));
    assert_eq!(second.last_pause_ms, Some(2.5));
    assert_eq!(second.committed_epoch, 125);
}

#[test]
fn metrics_first_report_has_no_rate() {
    let first = metrics(None, N0, &report(100, ""), 10_000);

    assert_eq!(first.epochs_per_second, None);
}

#[test]
fn metrics_new_run_restarts_the_rate() {
    let old = metrics(None, N1, &report(900, ""), 10_000);

    let new = metrics(Some(&old), N1, &report(3, ""), 11_000);

    assert_eq!(new.epochs_per_second, None);
}

#[test]
fn metrics_other_host_restarts_the_rate() {
    let old = metrics(None, N0, &report(10, ""), 10_000);

    let new = metrics(Some(&old), N1, &report(20, ""), 11_000);

    assert_eq!(new.epochs_per_second, None);
}

#[test]
fn metrics_no_checkpoint_yet_has_no_pause() {
    let first = metrics(None, N0, &report(0, ""), 10_000);

    assert_eq!(first.last_pause_ms, None);
}

#[test]
fn metrics_keep_the_last_error_after_a_new_run() {
    let failed = metrics(None, N0, &report(40, "standby refused"), 10_000);

    let again = metrics(Some(&failed), N0, &report(0, ""), 11_000);

    assert_eq!(again.last_error.as_deref(), Some("standby refused"));
}

#[test]
fn unreported_drops_the_rate_and_keeps_the_epoch() {
    let first = metrics(None, N0, &report(100, ""), 10_000);
    let second = metrics(Some(&first), N0, &report(110, ""), 11_000);

    let gone = unreported(&second);

    assert_eq!((gone.epochs_per_second, gone.committed_epoch), (None, 110));
}
