//! The VM lifecycle state machine: `(state, event) -> (state, actions)`, pure.
//!
//! ```text
//!              Provisioned                Start                StartSucceeded
//!  Creating ───────────────► Stopped ─────────────► Starting ─────────────────► Running
//!     │ Takeover                ▲  ▲ StartFailed        │ PowerOff                 │ │
//!     ▼                         │  └────────────────────┤                          │ │ Shutdown
//!  Deleting ◄───────────────────┘ Delete                ▼          PowerOff        │ ▼
//!     (undefine, delete          ◄──DomainStopped─── Stopping ◄──────────────────┘
//!      volumes, remove)                               (ACPI; destroy at deadline)
//! ```
//! A running domain reported for a stopped VM is adopted (`Stopped --DomainRunning--> Running`);
//! a domain found stopped under a running VM stops it (`Running --DomainStopped--> Stopped`).
//! Agent reports older than the engine's last command to the VM are dropped, so a report of a
//! stopped domain during `Starting` means the start did not take (`--> Stopped`), and one of a
//! running domain during a forced stop means the power-off must be sent again. Removal powers
//! the domain off first, in case a start raced the delete.
//! `Takeover` is fed to every VM when a controller starts serving: it finishes or rolls back
//! whatever the previous serving controller left half done.

use crate::model::VmState;

/// Something that happened to a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// API: delete the VM.
    Delete,
    /// The agent reports the domain running.
    DomainRunning,
    /// The agent reports the domain stopped, with libvirt's reason.
    DomainStopped {
        /// libvirt's reason, e.g. "shutdown", "crashed", "destroyed".
        reason: String,
    },
    /// API: power the VM off now.
    PowerOff,
    /// The VM's volumes and domain exist.
    Provisioned,
    /// API: shut the VM down, powering it off at the deadline.
    Shutdown {
        /// End of the grace period.
        deadline_unix_ms: i64,
    },
    /// API: start the VM.
    Start,
    /// The agent could not start the domain.
    StartFailed {
        /// Why.
        reason: String,
    },
    /// The agent started the domain.
    StartSucceeded,
    /// This controller just became the serving one.
    Takeover,
    /// Time passed.
    Tick {
        /// Now.
        now_unix_ms: i64,
    },
}

impl VmEvent {
    /// Short name for logs and messages.
    pub fn name(&self) -> &'static str {
        match self {
            VmEvent::Delete => "delete",
            VmEvent::DomainRunning => "domain-running",
            VmEvent::DomainStopped { .. } => "domain-stopped",
            VmEvent::PowerOff => "power off",
            VmEvent::Provisioned => "provisioned",
            VmEvent::Shutdown { .. } => "shut down",
            VmEvent::Start => "start",
            VmEvent::StartFailed { .. } => "start-failed",
            VmEvent::StartSucceeded => "start-succeeded",
            VmEvent::Takeover => "takeover",
            VmEvent::Tick { .. } => "tick",
        }
    }
}

/// What the engine must do, in order, after a transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Press the domain's ACPI power button.
    AcpiShutdown,
    /// Delete the VM's volumes.
    DeleteVolumes,
    /// (Re)define the domain from the VM record.
    DefineDomain,
    /// Power the domain off.
    DestroyDomain,
    /// Remove the VM's record from the store.
    RemoveRecord,
    /// Start the domain.
    StartDomain,
    /// Remove the domain's definition.
    UndefineDomain,
}

/// The outcome of an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The new state.
    pub state: VmState,
    /// The new state reason, when it changes.
    pub reason: Option<String>,
    /// Actions to run, in order.
    pub actions: Vec<Action>,
}

/// Errors of the state machine.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The event is not allowed in the state.
    #[error("cannot {event} a VM that is {from}{hint}", event = event.name(), from = from.name())]
    InvalidTransition {
        /// The state.
        from: VmState,
        /// The event.
        event: VmEvent,
        /// What to do instead, starting with "; ".
        hint: &'static str,
    },
}

/// Removal: power off (a start may have raced the delete), undefine, delete volumes, forget.
const REMOVE: [Action; 4] = [
    Action::DestroyDomain,
    Action::UndefineDomain,
    Action::DeleteVolumes,
    Action::RemoveRecord,
];

fn to(state: VmState, actions: &[Action]) -> Result<Transition, Error> {
    Ok(Transition {
        state,
        reason: None,
        actions: actions.to_vec(),
    })
}

fn to_because(state: VmState, reason: &str, actions: &[Action]) -> Result<Transition, Error> {
    Ok(Transition {
        state,
        reason: Some(reason.to_string()),
        actions: actions.to_vec(),
    })
}

fn refuse(from: VmState, event: &VmEvent, hint: &'static str) -> Result<Transition, Error> {
    Err(Error::InvalidTransition {
        from,
        event: event.clone(),
        hint,
    })
}

/// Why a domain stopped, in words, from libvirt's reason and whether we forced it off.
fn stop_reason(libvirt_reason: &str, forced: Option<bool>) -> String {
    match (forced, libvirt_reason) {
        (Some(true), _) => "powered off".into(),
        (Some(false), _) => "shut down by the guest on request".into(),
        (None, "crashed" | "failed") => format!("domain {libvirt_reason}"),
        (None, "shutdown") => "shut down by the guest".into(),
        (None, other) => format!("stopped outside Pairvisor ({other})"),
    }
}

/// Applies `event` to a VM in `state`.
pub fn transition(state: VmState, event: &VmEvent) -> Result<Transition, Error> {
    use VmEvent as E;
    use VmState as S;
    match (state, event) {
        // Creating --Provisioned--> Stopped
        (S::Creating, E::Provisioned) => to_because(S::Stopped, "created", &[]),
        // Creating --Takeover|Delete--> Deleting: the create was never acknowledged; roll back.
        (S::Creating, E::Takeover | E::Delete) => {
            to_because(S::Deleting, "rolling back an unfinished create", &REMOVE)
        }
        // Creating --Tick|Domain*--> Creating
        (S::Creating, E::Tick { .. } | E::DomainRunning | E::DomainStopped { .. }) => {
            to(state, &[])
        }
        (
            S::Creating,
            E::Start | E::StartSucceeded | E::StartFailed { .. } | E::Shutdown { .. } | E::PowerOff,
        ) => refuse(state, event, "; wait until it is created"),

        // Stopped --Start--> Starting
        (S::Stopped, E::Start) => to_because(
            S::Starting,
            "starting",
            &[Action::DefineDomain, Action::StartDomain],
        ),
        // Stopped --Delete--> Deleting
        (S::Stopped, E::Delete) => to_because(S::Deleting, "deleting", &REMOVE),
        // Stopped --DomainRunning--> Running: a domain runs that we thought stopped; adopt it.
        (S::Stopped, E::DomainRunning) => to_because(S::Running, "found running on its node", &[]),
        // Stopped --Tick|DomainStopped|Takeover--> Stopped
        (S::Stopped, E::Tick { .. } | E::DomainStopped { .. } | E::Takeover) => to(state, &[]),
        (S::Stopped, E::Shutdown { .. } | E::PowerOff) => refuse(state, event, " already"),
        (S::Stopped, E::Provisioned | E::StartSucceeded | E::StartFailed { .. }) => {
            refuse(state, event, "")
        }

        // Starting --StartSucceeded|DomainRunning--> Running
        (S::Starting, E::StartSucceeded | E::DomainRunning) => {
            to_because(S::Running, "started", &[])
        }
        // Starting --StartFailed--> Stopped
        (S::Starting, E::StartFailed { reason }) => {
            to_because(S::Stopped, &format!("start failed: {reason}"), &[])
        }
        // Starting --Takeover--> Starting: start again (define and start are idempotent).
        (S::Starting, E::Takeover) => to(state, &[Action::DefineDomain, Action::StartDomain]),
        // Starting --PowerOff--> Stopping (forced)
        (S::Starting, E::PowerOff) => to_because(
            S::Stopping {
                deadline_unix_ms: 0,
                forced: true,
            },
            "powering off",
            &[Action::DestroyDomain],
        ),
        // Starting --DomainStopped--> Stopped: a report taken after the last start command
        // (older ones are dropped) shows the start did not take.
        (S::Starting, E::DomainStopped { reason }) => to_because(
            S::Stopped,
            &format!("start did not complete (domain {reason})"),
            &[],
        ),
        // Starting --Tick--> Starting
        (S::Starting, E::Tick { .. }) => to(state, &[]),
        (S::Starting, E::Start | E::Shutdown { .. } | E::Delete | E::Provisioned) => {
            refuse(state, event, "; wait until it runs, or power it off")
        }

        // Running --Shutdown--> Stopping
        (S::Running, E::Shutdown { deadline_unix_ms }) => to_because(
            S::Stopping {
                deadline_unix_ms: *deadline_unix_ms,
                forced: false,
            },
            "shutting down",
            &[Action::AcpiShutdown],
        ),
        // Running --PowerOff--> Stopping (forced)
        (S::Running, E::PowerOff) => to_because(
            S::Stopping {
                deadline_unix_ms: 0,
                forced: true,
            },
            "powering off",
            &[Action::DestroyDomain],
        ),
        // Running --DomainStopped--> Stopped: the guest powered off, or QEMU died.
        (S::Running, E::DomainStopped { reason }) => {
            to_because(S::Stopped, &stop_reason(reason, None), &[])
        }
        // Running --Tick|DomainRunning|Takeover--> Running
        (S::Running, E::Tick { .. } | E::DomainRunning | E::Takeover) => to(state, &[]),
        (S::Running, E::Start | E::StartSucceeded | E::Provisioned) => {
            refuse(state, event, " already")
        }
        (S::Running, E::Delete | E::StartFailed { .. }) => {
            refuse(state, event, "; shut it down first")
        }

        // Stopping --Tick past deadline--> Stopping (forced): the grace period is over.
        (
            S::Stopping {
                deadline_unix_ms,
                forced: false,
            },
            E::Tick { now_unix_ms },
        ) if *now_unix_ms >= deadline_unix_ms => to_because(
            S::Stopping {
                deadline_unix_ms,
                forced: true,
            },
            "grace period over; powering off",
            &[Action::DestroyDomain],
        ),
        // Stopping (forced) --DomainRunning--> Stopping: the power-off did not take; again.
        (S::Stopping { forced: true, .. }, E::DomainRunning) => to(state, &[Action::DestroyDomain]),
        // Stopping --Tick|DomainRunning--> Stopping: the guest is still shutting down.
        (S::Stopping { .. }, E::Tick { .. } | E::DomainRunning) => to(state, &[]),
        // Stopping --DomainStopped--> Stopped
        (S::Stopping { forced, .. }, E::DomainStopped { reason }) => {
            to_because(S::Stopped, &stop_reason(reason, Some(forced)), &[])
        }
        // Stopping --PowerOff--> Stopping (forced)
        (S::Stopping { .. }, E::PowerOff) => to_because(
            S::Stopping {
                deadline_unix_ms: 0,
                forced: true,
            },
            "powering off",
            &[Action::DestroyDomain],
        ),
        // Stopping --Shutdown--> Stopping: already on its way down.
        (S::Stopping { .. }, E::Shutdown { .. }) => to(state, &[]),
        // Stopping --Takeover--> Stopping: a forced stop is forced again; a graceful one keeps its deadline.
        (S::Stopping { forced, .. }, E::Takeover) => to(
            state,
            if forced {
                &[Action::DestroyDomain]
            } else {
                &[]
            },
        ),
        (
            S::Stopping { .. },
            E::Start | E::Delete | E::Provisioned | E::StartSucceeded | E::StartFailed { .. },
        ) => refuse(state, event, "; wait until it has stopped"),

        // Deleting --Delete|Takeover--> Deleting: removal is idempotent; run it again.
        (S::Deleting, E::Delete | E::Takeover) => to(state, &REMOVE),
        // Deleting --Tick|Domain*--> Deleting
        (S::Deleting, E::Tick { .. } | E::DomainRunning | E::DomainStopped { .. }) => {
            to(state, &[])
        }
        (
            S::Deleting,
            E::Start
            | E::Shutdown { .. }
            | E::PowerOff
            | E::Provisioned
            | E::StartSucceeded
            | E::StartFailed { .. },
        ) => refuse(state, event, "; it is being deleted"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STOPPING: VmState = VmState::Stopping {
        deadline_unix_ms: 1000,
        forced: false,
    };

    #[test]
    fn stopped_start_defines_then_starts() {
        let t = transition(VmState::Stopped, &VmEvent::Start).unwrap();

        assert_eq!(t.state, VmState::Starting);
        assert_eq!(t.actions, vec![Action::DefineDomain, Action::StartDomain]);
    }

    #[test]
    fn starting_start_succeeded_runs() {
        let t = transition(VmState::Starting, &VmEvent::StartSucceeded).unwrap();

        assert_eq!(t.state, VmState::Running);
    }

    #[test]
    fn starting_start_failed_stops_with_reason() {
        let event = VmEvent::StartFailed {
            reason: "no such image".into(),
        };

        let t = transition(VmState::Starting, &event).unwrap();

        assert_eq!(t.state, VmState::Stopped);
        assert_eq!(t.reason.as_deref(), Some("start failed: no such image"));
    }

    #[test]
    fn running_shutdown_presses_acpi_with_deadline() {
        let event = VmEvent::Shutdown {
            deadline_unix_ms: 1000,
        };

        let t = transition(VmState::Running, &event).unwrap();

        assert_eq!(t.state, STOPPING);
        assert_eq!(t.actions, vec![Action::AcpiShutdown]);
    }

    #[test]
    fn stopping_tick_before_deadline_waits() {
        let t = transition(STOPPING, &VmEvent::Tick { now_unix_ms: 999 }).unwrap();

        assert_eq!(t.state, STOPPING);
        assert_eq!(t.actions, vec![]);
    }

    #[test]
    fn stopping_tick_at_deadline_forces_power_off() {
        let t = transition(STOPPING, &VmEvent::Tick { now_unix_ms: 1000 }).unwrap();

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

        let t = transition(STOPPING, &event).unwrap();

        assert_eq!(t.state, VmState::Stopped);
        assert_eq!(
            t.reason.as_deref(),
            Some("shut down by the guest on request")
        );
    }

    #[test]
    fn running_power_off_destroys() {
        let t = transition(VmState::Running, &VmEvent::PowerOff).unwrap();

        assert_eq!(t.actions, vec![Action::DestroyDomain]);
    }

    #[test]
    fn running_domain_crashed_stops_with_reason() {
        let event = VmEvent::DomainStopped {
            reason: "crashed".into(),
        };

        let t = transition(VmState::Running, &event).unwrap();

        assert_eq!(t.state, VmState::Stopped);
        assert_eq!(t.reason.as_deref(), Some("domain crashed"));
    }

    #[test]
    fn stopped_domain_running_is_adopted() {
        let t = transition(VmState::Stopped, &VmEvent::DomainRunning).unwrap();

        assert_eq!(t.state, VmState::Running);
    }

    #[test]
    fn stopped_delete_removes_domain_volumes_record() {
        let t = transition(VmState::Stopped, &VmEvent::Delete).unwrap();

        assert_eq!(t.actions, REMOVE.to_vec());
    }

    #[test]
    fn running_delete_is_refused_with_hint() {
        let err = transition(VmState::Running, &VmEvent::Delete).unwrap_err();

        assert_eq!(
            err.to_string(),
            "cannot delete a VM that is running; shut it down first"
        );
    }

    #[test]
    fn running_start_is_refused() {
        let err = transition(VmState::Running, &VmEvent::Start).unwrap_err();

        assert_eq!(err.to_string(), "cannot start a VM that is running already");
    }

    #[test]
    fn stopped_power_off_is_refused() {
        let err = transition(VmState::Stopped, &VmEvent::PowerOff).unwrap_err();

        assert_eq!(
            err.to_string(),
            "cannot power off a VM that is stopped already"
        );
    }

    #[test]
    fn creating_takeover_rolls_back() {
        let t = transition(VmState::Creating, &VmEvent::Takeover).unwrap();

        assert_eq!(t.state, VmState::Deleting);
        assert_eq!(t.actions, REMOVE.to_vec());
    }

    #[test]
    fn starting_takeover_starts_again() {
        let t = transition(VmState::Starting, &VmEvent::Takeover).unwrap();

        assert_eq!(t.actions, vec![Action::DefineDomain, Action::StartDomain]);
    }

    #[test]
    fn forced_stopping_domain_running_destroys_again() {
        let state = VmState::Stopping {
            deadline_unix_ms: 0,
            forced: true,
        };

        let t = transition(state, &VmEvent::DomainRunning).unwrap();

        assert_eq!(t.state, state);
        assert_eq!(t.actions, vec![Action::DestroyDomain]);
    }

    #[test]
    fn graceful_stopping_domain_running_waits() {
        let t = transition(STOPPING, &VmEvent::DomainRunning).unwrap();

        assert_eq!(t.actions, vec![]);
    }

    #[test]
    fn starting_domain_stopped_gives_up_the_start() {
        let event = VmEvent::DomainStopped {
            reason: "shutoff".into(),
        };

        let t = transition(VmState::Starting, &event).unwrap();

        assert_eq!(t.state, VmState::Stopped);
        assert_eq!(
            t.reason.as_deref(),
            Some("start did not complete (domain shutoff)")
        );
    }

    #[test]
    fn deleting_delete_powers_off_before_undefining() {
        let t = transition(VmState::Deleting, &VmEvent::Delete).unwrap();

        assert_eq!(t.actions[0], Action::DestroyDomain);
        assert_eq!(t.actions[1], Action::UndefineDomain);
    }

    #[test]
    fn forced_stopping_takeover_destroys_again() {
        let state = VmState::Stopping {
            deadline_unix_ms: 0,
            forced: true,
        };

        let t = transition(state, &VmEvent::Takeover).unwrap();

        assert_eq!(t.actions, vec![Action::DestroyDomain]);
    }
}
