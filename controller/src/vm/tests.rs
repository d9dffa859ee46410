//! The VM state machine's transitions, one test per rule.
use super::*;

const STOPPING: VmState = VmState::Stopping {
    deadline_unix_ms: 1000,
    forced: false,
};

#[test]
fn stopped_start_defines_then_starts() {
    let t = transition(VmState::Stopped, "n0", &VmEvent::Start).unwrap();

    assert_eq!(t.state, VmState::Starting);
    assert_eq!(t.actions, vec![Action::DefineDomain, Action::StartDomain]);
}

#[test]
fn starting_start_succeeded_runs() {
    let t = transition(VmState::Starting, "n0", &VmEvent::StartSucceeded).unwrap();

    assert_eq!(t.state, VmState::Running);
}

#[test]
fn starting_start_failed_stops_with_reason() {
    let event = VmEvent::StartFailed {
        reason: "no such image".into(),
    };

    let t = transition(VmState::Starting, "n0", &event).unwrap();

    assert_eq!(t.state, VmState::Stopped);
    assert_eq!(t.reason.as_deref(), Some("start failed: no such image"));
}

#[test]
fn running_shutdown_presses_acpi_with_deadline() {
    let event = VmEvent::Shutdown {
        deadline_unix_ms: 1000,
    };

    let t = transition(VmState::Running, "n0", &event).unwrap();

    assert_eq!(t.state, STOPPING);
    assert_eq!(t.actions, vec![Action::AcpiShutdown]);
}

#[test]
fn stopping_tick_before_deadline_waits() {
    let t = transition(STOPPING, "n0", &VmEvent::Tick { now_unix_ms: 999 }).unwrap();

    assert_eq!(t.state, STOPPING);
    assert_eq!(t.actions, vec![]);
}

#[test]
fn stopping_tick_at_deadline_forces_power_off() {
    let t = transition(STOPPING, "n0", &VmEvent::Tick { now_unix_ms: 1000 }).unwrap();

    assert_eq!(
        t.state,
        VmState::Stopping {
            deadline_unix_ms: 1000,
            forced: true
        }
    );
    assert_eq!(t.actions, vec![Action::DestroyDomain]);
}

#[test]
fn stopping_domain_stopped_is_stopped_by_guest() {
    let event = VmEvent::DomainStopped {
        reason: "shutdown".into(),
    };

    let t = transition(STOPPING, "n0", &event).unwrap();

    assert_eq!(t.state, VmState::Stopped);
    assert_eq!(
        t.reason.as_deref(),
        Some("shut down by the guest on request")
    );
}

#[test]
fn running_power_off_destroys() {
    let t = transition(VmState::Running, "n0", &VmEvent::PowerOff).unwrap();

    assert_eq!(t.actions, vec![Action::DestroyDomain]);
}

#[test]
fn running_domain_crashed_stops_with_reason() {
    let event = VmEvent::DomainStopped {
        reason: "crashed".into(),
    };

    let t = transition(VmState::Running, "n0", &event).unwrap();

    assert_eq!(t.state, VmState::Stopped);
    assert_eq!(t.reason.as_deref(), Some("domain crashed"));
}

#[test]
fn stopped_domain_running_is_never_adopted() {
    let t = transition(VmState::Stopped, "n0", &VmEvent::DomainRunning).unwrap();

    assert_eq!(t.state, VmState::Stopped);
    assert_eq!(t.actions, vec![]);
}

#[test]
fn stopped_start_raises_generation() {
    let t = transition(VmState::Stopped, "n0", &VmEvent::Start).unwrap();

    assert!(t.reassign);
}

#[test]
fn running_host_lost_is_lost_with_resume() {
    let event = VmEvent::HostLost { node: "n0".into() };

    let t = transition(VmState::Running, "n0", &event).unwrap();

    assert_eq!(
        t.state,
        VmState::Lost {
            intent: Intent::Resume
        }
    );
    assert_eq!(t.reason.as_deref(), Some("host n0 down"));
}

#[test]
fn lost_power_off_records_intent_without_acting() {
    let state = VmState::Lost {
        intent: Intent::Resume,
    };

    let t = transition(state, "n0", &VmEvent::PowerOff).unwrap();

    assert_eq!(
        t.state,
        VmState::Lost {
            intent: Intent::PowerOff
        }
    );
    assert_eq!(t.actions, vec![]);
}

#[test]
fn lost_resume_domain_stopped_starts_again_with_new_generation() {
    let state = VmState::Lost {
        intent: Intent::Resume,
    };
    let event = VmEvent::DomainStopped {
        reason: "unknown".into(),
    };

    let t = transition(state, "n0", &event).unwrap();

    assert_eq!(t.state, VmState::Starting);
    assert_eq!(t.actions, vec![Action::DefineDomain, Action::StartDomain]);
    assert!(t.reassign);
}

#[test]
fn lost_resume_domain_running_runs_without_restart() {
    let state = VmState::Lost {
        intent: Intent::Resume,
    };

    let t = transition(state, "n0", &VmEvent::DomainRunning).unwrap();

    assert_eq!(t.state, VmState::Running);
    assert_eq!(t.actions, vec![]);
}

#[test]
fn lost_power_off_domain_running_destroys() {
    let state = VmState::Lost {
        intent: Intent::PowerOff,
    };

    let t = transition(state, "n0", &VmEvent::DomainRunning).unwrap();

    assert_eq!(t.actions, vec![Action::DestroyDomain]);
}

#[test]
fn lost_delete_domain_stopped_removes() {
    let state = VmState::Lost {
        intent: Intent::Delete,
    };
    let event = VmEvent::DomainStopped {
        reason: "unknown".into(),
    };

    let t = transition(state, "n0", &event).unwrap();

    assert_eq!(t.state, VmState::Deleting);
    assert_eq!(t.actions, REMOVE.to_vec());
}

#[test]
fn lost_start_is_refused_with_hint() {
    let state = VmState::Lost {
        intent: Intent::Resume,
    };

    let err = transition(state, "n0", &VmEvent::Start).unwrap_err();

    assert_eq!(
        err.to_string(),
        "cannot start a VM that is lost; its host is down: it starts again when the host returns"
    );
}

#[test]
fn running_domain_paused_by_io_error_is_paused_with_reason() {
    let event = VmEvent::DomainPaused {
        reason: "ioerror".into(),
    };

    let t = transition(VmState::Running, "n0", &event).unwrap();

    assert_eq!(t.state, VmState::Paused);
    assert!(t.reason.unwrap().starts_with("paused (io-error)"));
}

#[test]
fn stopping_host_lost_powers_off_when_back() {
    let t = transition(STOPPING, "n0", &VmEvent::HostLost { node: "n0".into() }).unwrap();

    assert_eq!(
        t.state,
        VmState::Lost {
            intent: Intent::PowerOff
        }
    );
}

#[test]
fn creating_provision_failed_removes() {
    let event = VmEvent::ProvisionFailed {
        reason: "disk full".into(),
    };

    let t = transition(VmState::Creating, "n0", &event).unwrap();

    assert_eq!(t.state, VmState::Deleting);
    assert_eq!(t.actions, REMOVE.to_vec());
}

#[test]
fn stopped_delete_removes_domain_volumes_record() {
    let t = transition(VmState::Stopped, "n0", &VmEvent::Delete).unwrap();

    assert_eq!(t.actions, REMOVE.to_vec());
}

#[test]
fn running_delete_is_refused_with_hint() {
    let err = transition(VmState::Running, "n0", &VmEvent::Delete).unwrap_err();

    assert_eq!(
        err.to_string(),
        "cannot delete a VM that is running; shut it down first"
    );
}

#[test]
fn running_start_is_refused() {
    let err = transition(VmState::Running, "n0", &VmEvent::Start).unwrap_err();

    assert_eq!(err.to_string(), "cannot start a VM that is running already");
}

#[test]
fn stopped_power_off_is_refused() {
    let err = transition(VmState::Stopped, "n0", &VmEvent::PowerOff).unwrap_err();

    assert_eq!(
        err.to_string(),
        "cannot power off a VM that is stopped already"
    );
}

#[test]
fn creating_takeover_rolls_back() {
    let t = transition(VmState::Creating, "n0", &VmEvent::Takeover).unwrap();

    assert_eq!(t.state, VmState::Deleting);
    assert_eq!(t.actions, REMOVE.to_vec());
}

#[test]
fn starting_takeover_starts_again() {
    let t = transition(VmState::Starting, "n0", &VmEvent::Takeover).unwrap();

    assert_eq!(t.actions, vec![Action::DefineDomain, Action::StartDomain]);
}

#[test]
fn forced_stopping_domain_running_destroys_again() {
    let state = VmState::Stopping {
        deadline_unix_ms: 0,
        forced: true,
    };

    let t = transition(state, "n0", &VmEvent::DomainRunning).unwrap();

    assert_eq!(t.state, state);
    assert_eq!(t.actions, vec![Action::DestroyDomain]);
}

#[test]
fn graceful_stopping_domain_running_waits() {
    let t = transition(STOPPING, "n0", &VmEvent::DomainRunning).unwrap();

    assert_eq!(t.actions, vec![]);
}

#[test]
fn starting_domain_stopped_gives_up_the_start() {
    let event = VmEvent::DomainStopped {
        reason: "shutoff".into(),
    };

    let t = transition(VmState::Starting, "n0", &event).unwrap();

    assert_eq!(t.state, VmState::Stopped);
    assert_eq!(
        t.reason.as_deref(),
        Some("start did not complete (domain shutoff)")
    );
}

#[test]
fn deleting_delete_powers_off_before_undefining() {
    let t = transition(VmState::Deleting, "n0", &VmEvent::Delete).unwrap();

    assert_eq!(t.actions[0], Action::DestroyDomain);
    assert_eq!(t.actions[1], Action::UndefineDomain);
}

#[test]
fn forced_stopping_takeover_destroys_again() {
    let state = VmState::Stopping {
        deadline_unix_ms: 0,
        forced: true,
    };

    let t = transition(state, "n0", &VmEvent::Takeover).unwrap();

    assert_eq!(t.actions, vec![Action::DestroyDomain]);
}

fn fail_over_event() -> VmEvent {
    VmEvent::FailOver {
        from: "n0".into(),
        to: "n1".into(),
        why: "host n0 lost".into(),
    }
}

#[test]
fn running_fail_over_starts_on_peer_with_new_generation() {
    let t = transition(VmState::Running, "n0", &fail_over_event()).unwrap();

    assert_eq!(t.state, VmState::Starting);
    assert_eq!(t.actions, vec![Action::DefineDomain, Action::StartDomain]);
    assert!(t.reassign);
    assert_eq!(t.relocate.as_deref(), Some("n1"));
    assert_eq!(t.reason.as_deref(), Some("host n0 lost"));
}

#[test]
fn failover_reason_says_whether_the_standby_resumes() {
    assert_eq!(
        failover_reason(true, "host n0 unreachable", "n1"),
        "host n0 unreachable; its standby on n1 resumes"
    );
    assert_eq!(
        failover_reason(false, "host n0 lost", "n1"),
        "host n0 lost; restarting on n1 from its replica"
    );
}

#[test]
fn lost_resume_fail_over_starts_on_peer() {
    let state = VmState::Lost {
        intent: Intent::Resume,
    };

    let t = transition(state, "n0", &fail_over_event()).unwrap();

    assert_eq!(t.relocate.as_deref(), Some("n1"));
}

#[test]
fn lost_power_off_fail_over_stays_lost() {
    let state = VmState::Lost {
        intent: Intent::PowerOff,
    };

    let t = transition(state, "n0", &fail_over_event()).unwrap();

    assert_eq!(t.state, state);
    assert_eq!(t.relocate, None);
    assert!(t.actions.is_empty());
}

#[test]
fn stopping_fail_over_is_lost_with_power_off() {
    let t = transition(STOPPING, "n0", &fail_over_event()).unwrap();

    assert_eq!(
        t.state,
        VmState::Lost {
            intent: Intent::PowerOff
        }
    );
    assert_eq!(t.relocate, None);
}

#[test]
fn stopped_fail_over_changes_nothing() {
    let t = transition(VmState::Stopped, "n0", &fail_over_event()).unwrap();

    assert_eq!(t.state, VmState::Stopped);
    assert!(!t.reassign);
}

#[test]
fn running_restart_starts_here_counted_as_a_crash() {
    let event = VmEvent::Restart {
        why: "its QEMU died (crashed), restart 1 of 1".into(),
    };

    let t = transition(VmState::Running, "n0", &event).unwrap();

    assert_eq!(t.state, VmState::Starting);
    assert!(t.reassign && t.crash);
    assert_eq!(t.relocate, None);
    assert_eq!(
        t.reason.as_deref(),
        Some("its QEMU died (crashed), restart 1 of 1; restarting it here")
    );
}
