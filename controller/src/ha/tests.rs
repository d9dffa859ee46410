use super::*;

fn seen(mirror: Mirror, peer_up: bool) -> Observed<'static> {
    Observed {
        primary: "n0",
        peer: Some("n1"),
        peer_up,
        mirror,
        mirror_path: PATH,
        mark: None,
        protecting: false,
        now_unix_ms: 1_000,
    }
}

/// The serial of the mirror path in sync in these tests.
const PATH: i64 = 500;

fn both() -> Protection {
    Protection {
        current: ["n0".to_string(), "n1".to_string()].into(),
        sync: Sync::Protected { since_unix_ms: 10 },
        last_failover: None,
        mirror_path: PATH,
        restarts: 0,
        track_from_start: false,
        resume_standby: false,
    }
}

#[test]
fn observe_fresh_start_with_peer_up_protects() {
    let start = starting_on(&Protection::default(), "n0", false).unwrap();

    let decision = observe(&start, &seen(Mirror::Absent, true));

    assert!(decision.protect);
    let next = decision.protection.unwrap();
    assert_eq!(next.current, ["n0".to_string()].into());
    assert_eq!(next.sync.name(), "simplex");
}

#[test]
fn observe_ready_mirror_makes_peer_current() {
    let start = starting_on(&Protection::default(), "n0", false).unwrap();

    let decision = observe(&start, &seen(Mirror::Ready, true));

    assert!(!decision.protect);
    let next = decision.protection.unwrap();
    assert_eq!(next.current, ["n0".to_string(), "n1".to_string()].into());
    assert_eq!(
        next.sync,
        Sync::Protected {
            since_unix_ms: 1_000
        }
    );
}

#[test]
fn observe_ready_again_changes_nothing() {
    let decision = observe(&both(), &seen(Mirror::Ready, true));

    assert_eq!(decision.protection, None);
    assert!(!decision.protect);
}

#[test]
fn observe_syncing_keeps_peer_behind_and_shows_progress() {
    let decision = observe(
        &both(),
        &seen(
            Mirror::Syncing {
                done: 5,
                total: 10,
                verifying: false,
            },
            true,
        ),
    );

    let next = decision.protection.unwrap();
    assert_eq!(next.current, ["n0".to_string()].into());
    assert_eq!(
        next.sync,
        Sync::Syncing {
            done: 5,
            total: 10,
            since_unix_ms: 1_000,
            verifying: false,
        }
    );
}

#[test]
fn observe_failed_mirror_drops_peer_and_rebuilds_when_peer_up() {
    let decision = observe(
        &both(),
        &seen(
            Mirror::Failed {
                error: "Input/output error".into(),
            },
            true,
        ),
    );

    assert!(decision.protect);
    let next = decision.protection.unwrap();
    assert_eq!(next.current, ["n0".to_string()].into());
    assert!(
        matches!(next.sync, Sync::Simplex { ref reason, .. } if reason.contains("Input/output error"))
    );
}

#[test]
fn observe_peer_down_goes_simplex_without_protecting() {
    let decision = observe(&both(), &seen(Mirror::Absent, false));

    assert!(!decision.protect);
    let next = decision.protection.unwrap();
    assert_eq!(next.current, ["n0".to_string()].into());
    assert!(
        matches!(next.sync, Sync::Simplex { ref reason, .. } if reason.contains("n1 is not up"))
    );
}

#[test]
fn observe_protect_in_flight_is_not_sent_twice() {
    let mut observed = seen(Mirror::Absent, true);
    observed.protecting = true;

    let decision = observe(&both(), &observed);

    assert!(!decision.protect);
}

#[test]
fn observe_simplex_keeps_its_start_time() {
    let first = observe(&both(), &seen(Mirror::Absent, false))
        .protection
        .unwrap();
    let mut later = seen(Mirror::Absent, false);
    later.now_unix_ms = 9_000;

    let decision = observe(&first, &later);

    assert_eq!(decision.protection, None);
}

#[test]
fn starting_on_behind_host_is_refused() {
    let only_n1 = Protection {
        current: ["n1".to_string()].into(),
        ..Protection::default()
    };

    let start = starting_on(&only_n1, "n0", false);

    assert_eq!(start, None);
}

#[test]
fn starting_on_current_host_makes_only_it_current() {
    let start = starting_on(&both(), "n1", false).unwrap();

    assert_eq!(start.current, ["n1".to_string()].into());
    assert_eq!(start.sync, Sync::Off);
}

#[test]
fn failover_target_is_current_peer_that_is_up() {
    assert_eq!(
        failover_target(&both(), "n0", Some("n1"), true, None),
        Some("n1")
    );
}

#[test]
fn failover_target_none_when_peer_behind() {
    let only_n0 = Protection {
        current: ["n0".to_string()].into(),
        ..Protection::default()
    };

    assert_eq!(
        failover_target(&only_n0, "n0", Some("n1"), true, None),
        None
    );
}

#[test]
fn failover_target_none_when_peer_down() {
    assert_eq!(
        failover_target(&both(), "n0", Some("n1"), false, None),
        None
    );
}

#[test]
fn failed_over_makes_survivor_sole_current_copy() {
    let next = failed_over("n0", "n1", "host n0 lost", 77);

    assert_eq!(next.current, ["n1".to_string()].into());
    let failover = next.last_failover.unwrap();
    assert_eq!((failover.from.as_str(), failover.to.as_str()), ("n0", "n1"));
    assert_eq!(failover.decided_unix_ms, 77);
}

#[test]
fn running_records_failover_end_once() {
    let failed = failed_over("n0", "n1", "host n0 lost", 77);

    let ran = running(&failed, 99).unwrap();

    assert_eq!(
        ran.last_failover.as_ref().unwrap().running_unix_ms,
        Some(99)
    );
    assert_eq!(running(&ran, 120), None);
}

#[test]
fn observe_mark_on_the_running_path_drops_the_peer_though_qemu_says_ready() {
    let mut observed = seen(Mirror::Ready, true);
    observed.mark = Some(PATH);

    let decision = observe(&both(), &observed);

    let next = decision.protection.unwrap();
    assert_eq!(next.current, ["n0".to_string()].into());
    assert!(matches!(next.sync, Sync::Simplex { ref reason, .. } if reason.contains("stale mark")));
    assert!(!decision.clear_mark);
}

#[test]
fn observe_ready_newer_path_clears_an_obsolete_mark() {
    let mut observed = seen(Mirror::Ready, true);
    observed.mark = Some(PATH - 1);

    let decision = observe(&both(), &observed);

    assert!(decision.clear_mark);
    assert_eq!(decision.protection.unwrap().current.len(), 2);
}

#[test]
fn observe_ready_records_the_path_that_made_the_peer_current() {
    let start = starting_on(&Protection::default(), "n0", false).unwrap();

    let decision = observe(&start, &seen(Mirror::Ready, true));

    assert_eq!(decision.protection.unwrap().mirror_path, PATH);
}

#[test]
fn failover_target_none_when_marked_on_the_current_path() {
    assert_eq!(
        failover_target(&both(), "n0", Some("n1"), true, Some(PATH)),
        None
    );
}

#[test]
fn failover_target_ignores_a_mark_older_than_the_current_path() {
    assert_eq!(
        failover_target(&both(), "n0", Some("n1"), true, Some(PATH - 1)),
        Some("n1")
    );
}

#[test]
fn after_crash_with_restarts_left_restarts_here() {
    let decided = after_crash(&both(), "n0", false, Some("n1"), true, None, 1);

    assert_eq!(decided, Some(None));
}

#[test]
fn after_crash_without_restarts_left_moves_to_the_current_peer() {
    let mut once = both();
    once.restarts = 1;

    let decided = after_crash(&once, "n0", false, Some("n1"), true, None, 1);

    assert_eq!(decided, Some(Some("n1")));
}

#[test]
fn after_crash_without_restarts_and_peer_behind_stays_stopped() {
    let only_n0 = Protection {
        current: ["n0".to_string()].into(),
        restarts: 1,
        ..Protection::default()
    };

    let decided = after_crash(&only_n0, "n0", false, Some("n1"), true, None, 1);

    assert_eq!(decided, None);
}

#[test]
fn placed_crash_restart_counts_and_plain_start_resets() {
    let crash = Placement {
        relocate: None,
        why: "its QEMU died",
        crash: true,
        behind: false,
    };
    let plain = Placement {
        crash: false,
        ..crash
    };

    let restarted = placed(&both(), true, "n0", &crash, 5).unwrap();
    let started = placed(&restarted, true, "n0", &plain, 6).unwrap();

    assert_eq!((restarted.restarts, started.restarts), (1, 0));
}

#[test]
fn observe_disk_on_peer_makes_only_the_peer_current_and_alerts() {
    let decision = observe(&both(), &seen(Mirror::OnPeer, true));

    let next = decision.protection.unwrap();
    assert_eq!(next.current, ["n1".to_string()].into());
    assert!(
        matches!(&next.sync, Sync::Simplex { reason, .. } if reason.contains("disk on n0 failed")),
        "{:?}",
        next.sync
    );
    assert!(!decision.protect, "rebuilding would cut the guest's disk");
}

#[test]
fn starting_on_host_marked_behind_is_refused() {
    assert_eq!(starting_on(&both(), "n0", true), None);
}

#[test]
fn after_crash_on_host_marked_behind_moves_to_the_peer() {
    let decided = after_crash(&both(), "n0", true, Some("n1"), true, None, 1);

    assert_eq!(decided, Some(Some("n1")));
}

#[test]
fn marked_behind_ignores_marks_older_than_the_current_path() {
    assert!(marked_behind(&both(), Some(PATH)));
    assert!(!marked_behind(&both(), Some(PATH - 1)));
    assert!(!marked_behind(&both(), None));
}

#[test]
fn start_host_is_home_while_its_copy_is_current() {
    assert_eq!(
        start_host(&both(), "n0", false, Some(("n1", true, false))),
        Some("n0")
    );
    assert_eq!(
        start_host(&Protection::default(), "n0", false, None),
        Some("n0")
    );
}

#[test]
fn start_host_moves_to_the_peer_holding_the_only_current_copy() {
    let only_n1 = Protection {
        current: ["n1".to_string()].into(),
        ..Protection::default()
    };

    assert_eq!(
        start_host(&only_n1, "n0", false, Some(("n1", true, false))),
        Some("n1")
    );
    assert_eq!(
        start_host(&both(), "n0", true, Some(("n1", true, false))),
        Some("n1"),
        "a mark says the home copy is behind"
    );
}

#[test]
fn start_host_never_picks_a_behind_or_unusable_copy() {
    let only_n1 = Protection {
        current: ["n1".to_string()].into(),
        ..Protection::default()
    };

    assert_eq!(
        start_host(&only_n1, "n0", false, Some(("n1", false, false))),
        None
    );
    assert_eq!(
        start_host(&only_n1, "n0", false, Some(("n1", true, true))),
        None
    );
}

#[test]
fn progress_reports_share_rate_and_time_left() {
    let sync = Sync::Syncing {
        done: 40 << 20,
        total: 100 << 20,
        since_unix_ms: 10_000,
        verifying: false,
    };

    let progress = sync.progress(14_000).unwrap();

    assert_eq!(
        progress,
        Progress {
            percent: 40,
            bytes_per_second: 10 << 20,
            eta_seconds: Some(6),
        }
    );
}

#[test]
fn progress_without_elapsed_time_has_no_eta_and_mirror_overrun_caps_at_done() {
    let just_begun = Sync::Syncing {
        done: 0,
        total: 100,
        since_unix_ms: 5,
        verifying: false,
    };
    let overrun = Sync::Syncing {
        done: 150,
        total: 100,
        since_unix_ms: 0,
        verifying: false,
    };

    assert_eq!(just_begun.progress(5).unwrap().eta_seconds, None);
    assert_eq!(
        (
            overrun.progress(1000).unwrap().percent,
            overrun.progress(1000).unwrap().eta_seconds
        ),
        (100, Some(0))
    );
    assert_eq!(Sync::Off.progress(1000), None);
}

#[test]
fn placed_tracks_writes_from_start_only_when_another_copy_is_current() {
    let plain = Placement {
        relocate: None,
        why: "starting",
        crash: false,
        behind: false,
    };
    let only_n0 = Protection {
        current: ["n0".to_string()].into(),
        ..Protection::default()
    };

    let in_sync = placed(&both(), true, "n0", &plain, 5).unwrap();
    let alone = placed(&only_n0, true, "n0", &plain, 5).unwrap();
    let first = placed(&Protection::default(), true, "n0", &plain, 5).unwrap();

    assert!(in_sync.track_from_start);
    assert!(!alone.track_from_start);
    assert!(
        !first.track_from_start,
        "a new VM's replica holds nothing yet"
    );
}

#[test]
fn placed_failover_tracks_writes_when_the_left_copy_was_current() {
    let failover = Placement {
        relocate: Some("n1"),
        why: "host n0 lost",
        crash: false,
        behind: false,
    };
    let only_n1 = Protection {
        current: ["n1".to_string()].into(),
        ..Protection::default()
    };

    let from_both = placed(&both(), true, "n0", &failover, 5).unwrap();
    let after_pivot = placed(&only_n1, true, "n0", &failover, 5).unwrap();

    assert!(from_both.track_from_start);
    assert!(!after_pivot.track_from_start, "n0's copy was behind");
}

#[test]
fn placed_failover_resumes_the_standby_only_when_protected_with_the_target_current() {
    let failover = Placement {
        relocate: Some("n1"),
        why: "host n0 lost",
        crash: false,
        behind: false,
    };
    let syncing = Protection {
        sync: Sync::Syncing {
            done: 1,
            total: 2,
            since_unix_ms: 1,
            verifying: false,
        },
        ..both()
    };
    let n1_behind = Protection {
        current: ["n0".to_string()].into(),
        ..both()
    };

    assert!(
        placed(&both(), true, "n0", &failover, 5)
            .unwrap()
            .resume_standby
    );
    assert!(
        !placed(&syncing, true, "n0", &failover, 5)
            .unwrap()
            .resume_standby
    );
    assert!(
        !placed(&n1_behind, true, "n0", &failover, 5)
            .unwrap()
            .resume_standby
    );
}

#[test]
fn observe_verify_after_copy_restarts_the_phase_clock() {
    let copying = Protection {
        sync: Sync::Syncing {
            done: 10,
            total: 10,
            since_unix_ms: 100,
            verifying: false,
        },
        ..Protection::default()
    };
    let verifying = Mirror::Syncing {
        done: 2,
        total: 10,
        verifying: true,
    };

    let next = observe(&copying, &seen(verifying, true))
        .protection
        .unwrap();

    assert_eq!(
        next.sync,
        Sync::Syncing {
            done: 2,
            total: 10,
            since_unix_ms: 1_000,
            verifying: true,
        }
    );
    assert_eq!(next.sync.phase(), Some("verify"));
}

#[test]
fn agent_down_keeps_only_the_primary_current() {
    let next = agent_down(&both(), "n0", 7).unwrap();

    assert_eq!(next.current, ["n0".to_string()].into());
    assert!(
        matches!(&next.sync, Sync::Simplex { reason, .. } if reason.contains("agent on n0 is down")),
        "{:?}",
        next.sync
    );
    assert_eq!(agent_down(&next, "n0", 8), None, "already so");
}

#[test]
fn standby_target_is_the_current_peer_of_a_protected_vm() {
    assert_eq!(
        standby_target(&both(), "n0", Some("n1"), true, None),
        Some("n1")
    );
}

#[test]
fn standby_target_none_unless_protected_up_and_unmarked() {
    let simplex = Protection {
        sync: Sync::Simplex {
            reason: "the FT checkpoints ended".into(),
            since_unix_ms: 20,
        },
        ..both()
    };

    assert_eq!(standby_target(&simplex, "n0", Some("n1"), true, None), None);
    assert_eq!(standby_target(&both(), "n0", Some("n1"), false, None), None);
    assert_eq!(
        standby_target(&both(), "n0", Some("n1"), true, Some(PATH)),
        None
    );
    assert_eq!(standby_target(&both(), "n0", None, true, None), None);
}
