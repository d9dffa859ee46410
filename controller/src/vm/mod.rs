//! The VM lifecycle state machine: `(state, event) -> (state, actions)`, pure.
//!
//! ```text
//!              Provisioned                Start                StartSucceeded
//!  Creating ───────────────► Stopped ─────────────► Starting ─────────────────► Running ◄─┐
//!     │ Takeover, Delete,       ▲  ▲ StartFailed        │ PowerOff          DomainPaused │ │ DomainRunning
//!     │ ProvisionFailed         │  └────────────────────┤                      ▼         │ │
//!     ▼                         │ Delete                ▼          PowerOff   Paused ────┘ │ Shutdown
//!  Deleting ◄───────────────────┘               ◄──DomainStopped─── Stopping ◄─────────────┘
//!     (undefine, delete                             (ACPI; destroy at deadline)
//!      volumes, remove)
//!
//!  Starting, Running, Paused, Stopping ──HostLost──► Lost { resume | power off | delete }
//!  Lost ──first report once the host is back──► Running / Starting (resume), Stopped /
//!        Stopping (power off), Deleting (delete)
//!  Starting, Running, Paused, Lost (resume) ──FailOver──► Starting on the peer (HA: the
//!        host is lost and the peer's copy is current; new generation, new node)
//! ```
//! A domain found stopped under a running VM stops it (`Running --DomainStopped--> Stopped`);
//! a domain found running under a stopped VM is never adopted (`Stopped --DomainRunning-->
//! Stopped`; the reconciler raises an alert instead). Agent reports older than the engine's last
//! command to the VM are dropped, so a report of a stopped domain during `Starting` means the
//! start did not take, and one of a running domain during a forced stop means the power-off
//! must be sent again. Removal powers the domain off first, in case a start raced the delete.
//! `Takeover` is fed to every VM when a controller starts serving: it finishes or rolls back
//! whatever the previous serving controller left half done. Power-off and delete of a VM whose
//! host is lost record the intent; it is carried out once the host is back.
//! A transition that assigns where the VM runs (every start) has `reassign` set: the engine
//! raises the VM's ownership generation in the same fenced write that commits the new state.

use crate::model::{Intent, VmState};

/// Something that happened to a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// API: delete the VM.
    Delete,
    /// The agent reports the domain paused, with libvirt's reason.
    DomainPaused {
        /// libvirt's reason, e.g. "ioerror".
        reason: String,
    },
    /// The agent reports the domain running.
    DomainRunning,
    /// The agent reports the domain stopped, with libvirt's reason.
    DomainStopped {
        /// libvirt's reason, e.g. "shutdown", "crashed", "destroyed".
        reason: String,
    },
    /// The VM cannot run on its host any more (the host was lost, or its QEMU kept dying) and
    /// its disks are current on the peer, which is up: restart it there (HA).
    FailOver {
        /// The host it leaves.
        from: String,
        /// The peer it restarts on.
        to: String,
        /// Why and how, in words: "host n0 lost; restarting on n1 from its replica"
        /// ([`failover_reason`]).
        why: String,
    },
    /// Its QEMU died on its own and it has local restarts left: start it again where it is
    /// (HA: recover locally first).
    Restart {
        /// Why, in words.
        why: String,
    },
    /// The VM's host was judged lost (`crate::health`).
    HostLost {
        /// The host.
        node: String,
    },
    /// API: power the VM off now.
    PowerOff,
    /// Creating the VM's volumes or domain failed.
    ProvisionFailed {
        /// Why.
        reason: String,
    },
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
            VmEvent::DomainPaused { .. } => "domain-paused",
            VmEvent::DomainRunning => "domain-running",
            VmEvent::DomainStopped { .. } => "domain-stopped",
            VmEvent::FailOver { .. } => "fail-over",
            VmEvent::Restart { .. } => "restart",
            VmEvent::HostLost { .. } => "host-lost",
            VmEvent::PowerOff => "power off",
            VmEvent::ProvisionFailed { .. } => "provision-failed",
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
    /// Create the VM's volumes.
    CreateVolumes,
    /// Delete the VM's volumes.
    DeleteVolumes,
    /// (Re)define the domain from the VM record.
    DefineDomain,
    /// Power the domain off.
    DestroyDomain,
    /// FT: stop the VM's standby QEMU on the peer (and stop serving its replicas there): a VM
    /// stopped on purpose needs neither until it starts again, which prepares both anew.
    DiscardStandby,
    /// HA and FT: serve the VM's volumes on the peer, for its mirror.
    ExportReplica,
    /// FT: a standby QEMU of the VM on the peer, waiting for checkpoints.
    PrepareStandby,
    /// Remove the VM's record from the store.
    RemoveRecord,
    /// Start the domain.
    StartDomain,
    /// FT: checkpoint the running domain to its standby every epoch.
    StartEpochs,
    /// HA and FT: mirror the running domain's disks to the peer.
    StartMirror,
    /// Remove the domain's definition.
    UndefineDomain,
}

impl Action {
    /// Short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Action::AcpiShutdown => "acpi-shutdown",
            Action::CreateVolumes => "create-volumes",
            Action::DeleteVolumes => "delete-volumes",
            Action::DefineDomain => "define",
            Action::DestroyDomain => "power-off",
            Action::DiscardStandby => "discard-standby",
            Action::ExportReplica => "export-replica",
            Action::PrepareStandby => "prepare-standby",
            Action::RemoveRecord => "remove-record",
            Action::StartDomain => "start",
            Action::StartEpochs => "start-epochs",
            Action::StartMirror => "start-mirror",
            Action::UndefineDomain => "undefine",
        }
    }
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
    /// Whether this transition assigns where the VM runs: raise its ownership generation.
    pub reassign: bool,
    /// The host the VM moves to (a failover), committed with the new generation.
    pub relocate: Option<String>,
    /// Whether this is a restart after its QEMU died on its own (counted against the VM's
    /// local restarts).
    pub crash: bool,
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
pub const REMOVE: [Action; 4] = [
    Action::DestroyDomain,
    Action::UndefineDomain,
    Action::DeleteVolumes,
    Action::RemoveRecord,
];

/// Provisioning of a new VM: its volumes, then its domain definition.
pub const PROVISION: [Action; 2] = [Action::CreateVolumes, Action::DefineDomain];

/// HA protection of a running VM: the peer serves its replica, then the mirror starts.
pub const PROTECT: [Action; 2] = [Action::ExportReplica, Action::StartMirror];

/// FT protection of a running VM: the peer serves the replica, a standby starts there (its
/// replica first applies what an ended epoch still held, before the new mirror writes),
/// then the mirror, then the epochs (which begin once the mirror is in sync).
pub const PROTECT_FT: [Action; 4] = [
    Action::ExportReplica,
    Action::PrepareStandby,
    Action::StartMirror,
    Action::StartEpochs,
];

/// A (re)start where the VM is recorded: define, then start.
const START: [Action; 2] = [Action::DefineDomain, Action::StartDomain];

const FORCED: VmState = VmState::Stopping {
    deadline_unix_ms: 0,
    forced: true,
};

fn to(state: VmState, actions: &[Action]) -> Result<Transition, Error> {
    Ok(Transition {
        state,
        reason: None,
        actions: actions.to_vec(),
        reassign: false,
        relocate: None,
        crash: false,
    })
}

fn to_because(state: VmState, reason: &str, actions: &[Action]) -> Result<Transition, Error> {
    Ok(Transition {
        state,
        reason: Some(reason.to_string()),
        actions: actions.to_vec(),
        reassign: false,
        relocate: None,
        crash: false,
    })
}

/// A start: the VM gets a new ownership generation before any agent hears of it.
fn start_because(reason: &str) -> Result<Transition, Error> {
    to_starting(reason.to_string(), None, false)
}

/// A restart where the VM is, after its QEMU died on its own (new generation).
fn restart(why: &str) -> Result<Transition, Error> {
    to_starting(format!("{why}; restarting it here"), None, true)
}

/// A failover: the VM leaves its host and starts on `to`, under a new generation, from its
/// copy there (`why` says why and how).
fn fail_over(to: &str, why: &str) -> Result<Transition, Error> {
    to_starting(why.to_string(), Some(to.to_string()), false)
}

/// The reason a failover from a host that `cause` to `to` gives: an FT VM whose standby is
/// protected resumes it there (same boot); any other VM restarts from its disks' replica.
pub fn failover_reason(resumes_standby: bool, cause: &str, to: &str) -> String {
    if resumes_standby {
        format!("{cause}; its standby on {to} resumes")
    } else {
        format!("{cause}; restarting on {to} from its replica")
    }
}

/// Every (re)start: define and start under a new generation, on `relocate` if it moves.
fn to_starting(reason: String, relocate: Option<String>, crash: bool) -> Result<Transition, Error> {
    Ok(Transition {
        state: VmState::Starting,
        reason: Some(reason),
        actions: START.to_vec(),
        reassign: true,
        relocate,
        crash,
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

/// Why a domain is paused, in words, from libvirt's reason.
fn pause_reason(libvirt_reason: &str) -> String {
    match libvirt_reason {
        "ioerror" => "paused (io-error): a disk of the VM failed or is full".into(),
        other => format!("paused ({other})"),
    }
}

/// A graceful shutdown: press the ACPI button; the deadline forces a power-off.
fn shut_down(deadline_unix_ms: i64) -> Result<Transition, Error> {
    to_because(
        VmState::Stopping {
            deadline_unix_ms,
            forced: false,
        },
        "shutting down",
        &[Action::AcpiShutdown],
    )
}

/// A forced stop: pull the plug now.
fn power_off() -> Result<Transition, Error> {
    to_because(FORCED, "powering off", &[Action::DestroyDomain])
}

fn lost_because(node: &str, intent: Intent) -> Result<Transition, Error> {
    let reason = match intent {
        Intent::Resume => format!("host {node} down"),
        Intent::PowerOff => format!("host {node} down; powered off when it returns"),
        Intent::Delete => format!("host {node} down; deleted when it returns"),
    };
    to_because(VmState::Lost { intent }, &reason, &[])
}

/// Applies `event` to a VM in `state` on `node`.
pub fn transition(state: VmState, node: &str, event: &VmEvent) -> Result<Transition, Error> {
    use VmEvent as E;
    use VmState as S;
    match state {
        S::Creating => creating(event),
        S::Stopped => stopped(event),
        S::Starting => starting(node, event),
        S::Running => running(node, event),
        S::Paused => paused(node, event),
        S::Stopping {
            deadline_unix_ms,
            forced,
        } => stopping(deadline_unix_ms, forced, node, event),
        S::Deleting => match event {
            // Deleting --Delete|Takeover--> Deleting: removal is idempotent; run it again.
            E::Delete | E::Takeover => to(state, &REMOVE),
            // Deleting --Tick|Domain*|HostLost--> Deleting
            E::Tick { .. }
            | E::DomainRunning
            | E::DomainStopped { .. }
            | E::DomainPaused { .. }
            | E::HostLost { .. }
            | E::FailOver { .. }
            | E::Restart { .. } => to(state, &[]),
            E::Start
            | E::Shutdown { .. }
            | E::PowerOff
            | E::Provisioned
            | E::ProvisionFailed { .. }
            | E::StartSucceeded
            | E::StartFailed { .. } => refuse(state, event, "; it is being deleted"),
        },
        S::Lost { intent } => lost(intent, node, event),
    }
}

fn creating(event: &VmEvent) -> Result<Transition, Error> {
    use VmEvent as E;
    let state = VmState::Creating;
    match event {
        // Creating --Provisioned--> Stopped
        E::Provisioned => to_because(VmState::Stopped, "created", &[]),
        // Creating --ProvisionFailed--> Deleting: undo what was made.
        E::ProvisionFailed { reason } => to_because(
            VmState::Deleting,
            &format!("create failed: {reason}; removing it"),
            &REMOVE,
        ),
        // Creating --Takeover|Delete--> Deleting: the create was never acknowledged; roll back.
        E::Takeover | E::Delete => to_because(
            VmState::Deleting,
            "rolling back an unfinished create",
            &REMOVE,
        ),
        // Creating --Tick|Domain*|HostLost--> Creating: provisioning ends it either way.
        E::Tick { .. }
        | E::DomainRunning
        | E::DomainStopped { .. }
        | E::DomainPaused { .. }
        | E::HostLost { .. }
        | E::FailOver { .. }
        | E::Restart { .. } => to(state, &[]),
        E::Start | E::StartSucceeded | E::StartFailed { .. } | E::Shutdown { .. } | E::PowerOff => {
            refuse(state, event, "; wait until it is created")
        }
    }
}

fn stopped(event: &VmEvent) -> Result<Transition, Error> {
    use VmEvent as E;
    let state = VmState::Stopped;
    match event {
        // Stopped --Start--> Starting (new generation)
        E::Start => start_because("starting"),
        // Stopped --Delete--> Deleting
        E::Delete => to_because(VmState::Deleting, "deleting", &REMOVE),
        // Stopped --DomainRunning|DomainPaused--> Stopped: never adopted (the reconciler alerts).
        // Stopped --Tick|DomainStopped|Takeover|HostLost--> Stopped
        E::DomainRunning
        | E::DomainPaused { .. }
        | E::Tick { .. }
        | E::DomainStopped { .. }
        | E::Takeover
        | E::HostLost { .. }
        | E::FailOver { .. }
        | E::Restart { .. } => to(state, &[]),
        E::Shutdown { .. } | E::PowerOff => refuse(state, event, " already"),
        E::Provisioned | E::ProvisionFailed { .. } | E::StartSucceeded | E::StartFailed { .. } => {
            refuse(state, event, "")
        }
    }
}

fn starting(node: &str, event: &VmEvent) -> Result<Transition, Error> {
    use VmEvent as E;
    let state = VmState::Starting;
    match event {
        // Starting --StartSucceeded|DomainRunning--> Running
        E::StartSucceeded | E::DomainRunning => to_because(VmState::Running, "started", &[]),
        // Starting --StartFailed--> Stopped
        E::StartFailed { reason } => {
            to_because(VmState::Stopped, &format!("start failed: {reason}"), &[])
        }
        // Starting --Takeover--> Starting: start again (define and start are idempotent).
        E::Takeover => to(state, &START),
        // Starting --PowerOff--> Stopping (forced)
        E::PowerOff => power_off(),
        // Starting --DomainStopped--> Stopped: a report taken after the last start command
        // (older ones are dropped) shows the start did not take.
        E::DomainStopped { reason } => to_because(
            VmState::Stopped,
            &format!("start did not complete (domain {reason})"),
            &[],
        ),
        // Starting --DomainPaused--> Paused
        E::DomainPaused { reason } => to_because(VmState::Paused, &pause_reason(reason), &[]),
        // Starting --HostLost--> Lost (resume)
        E::HostLost { .. } => lost_because(node, Intent::Resume),
        // Starting --FailOver--> Starting on the peer (new generation)
        E::FailOver { to, why, .. } => fail_over(to, why),
        // Starting --Restart--> Starting here (new generation; its QEMU died on its own)
        E::Restart { why } => restart(why),
        // Starting --Tick--> Starting
        E::Tick { .. } => to(state, &[]),
        E::Start | E::Shutdown { .. } | E::Delete | E::Provisioned | E::ProvisionFailed { .. } => {
            refuse(state, event, "; wait until it runs, or power it off")
        }
    }
}

fn running(node: &str, event: &VmEvent) -> Result<Transition, Error> {
    use VmEvent as E;
    let state = VmState::Running;
    match event {
        // Running --Shutdown--> Stopping
        E::Shutdown { deadline_unix_ms } => shut_down(*deadline_unix_ms),
        // Running --PowerOff--> Stopping (forced)
        E::PowerOff => power_off(),
        // Running --DomainStopped--> Stopped: the guest powered off, or QEMU died.
        E::DomainStopped { reason } => {
            to_because(VmState::Stopped, &stop_reason(reason, None), &[])
        }
        // Running --DomainPaused--> Paused: QEMU froze the guest (an I/O error, a full disk).
        E::DomainPaused { reason } => to_because(VmState::Paused, &pause_reason(reason), &[]),
        // Running --HostLost--> Lost (resume)
        E::HostLost { .. } => lost_because(node, Intent::Resume),
        // Running --FailOver--> Starting on the peer (new generation)
        E::FailOver { to, why, .. } => fail_over(to, why),
        // Running --Restart--> Starting here (new generation; its QEMU died on its own)
        E::Restart { why } => restart(why),
        // Running --Tick|DomainRunning|Takeover--> Running
        E::Tick { .. } | E::DomainRunning | E::Takeover => to(state, &[]),
        E::Start | E::StartSucceeded | E::Provisioned => refuse(state, event, " already"),
        E::Delete | E::StartFailed { .. } | E::ProvisionFailed { .. } => {
            refuse(state, event, "; shut it down first")
        }
    }
}

fn paused(node: &str, event: &VmEvent) -> Result<Transition, Error> {
    use VmEvent as E;
    let state = VmState::Paused;
    match event {
        // Paused --DomainRunning--> Running: resumed.
        E::DomainRunning => to_because(VmState::Running, "resumed", &[]),
        // Paused --DomainStopped--> Stopped
        E::DomainStopped { reason } => {
            to_because(VmState::Stopped, &stop_reason(reason, None), &[])
        }
        // Paused --PowerOff--> Stopping (forced)
        E::PowerOff => power_off(),
        // Paused --Shutdown--> Stopping: a frozen guest will not answer; the deadline forces it.
        E::Shutdown { deadline_unix_ms } => shut_down(*deadline_unix_ms),
        // Paused --HostLost--> Lost (resume)
        E::HostLost { .. } => lost_because(node, Intent::Resume),
        // Paused --FailOver--> Starting on the peer (new generation)
        E::FailOver { to, why, .. } => fail_over(to, why),
        // Paused --Restart--> Starting here (new generation; its QEMU died on its own)
        E::Restart { why } => restart(why),
        // Paused --Tick|DomainPaused|Takeover--> Paused
        E::Tick { .. } | E::DomainPaused { .. } | E::Takeover => to(state, &[]),
        E::Start | E::StartSucceeded | E::Provisioned => refuse(
            state,
            event,
            "; QEMU paused it (see its reason): fix the cause, or power it off",
        ),
        E::Delete | E::StartFailed { .. } | E::ProvisionFailed { .. } => {
            refuse(state, event, "; power it off first")
        }
    }
}

fn stopping(
    deadline_unix_ms: i64,
    forced: bool,
    node: &str,
    event: &VmEvent,
) -> Result<Transition, Error> {
    use VmEvent as E;
    let state = VmState::Stopping {
        deadline_unix_ms,
        forced,
    };
    match event {
        // Stopping --Tick past deadline--> Stopping (forced): the grace period is over.
        E::Tick { now_unix_ms } if !forced && *now_unix_ms >= deadline_unix_ms => to_because(
            VmState::Stopping {
                deadline_unix_ms,
                forced: true,
            },
            "grace period over; powering off",
            &[Action::DestroyDomain],
        ),
        // Stopping (forced) --DomainRunning|DomainPaused--> Stopping: the power-off did not take.
        E::DomainRunning | E::DomainPaused { .. } if forced => to(state, &[Action::DestroyDomain]),
        // Stopping --Tick|DomainRunning|DomainPaused--> Stopping: still shutting down.
        E::Tick { .. } | E::DomainRunning | E::DomainPaused { .. } => to(state, &[]),
        // Stopping --DomainStopped--> Stopped
        E::DomainStopped { reason } => {
            to_because(VmState::Stopped, &stop_reason(reason, Some(forced)), &[])
        }
        // Stopping --PowerOff--> Stopping (forced)
        E::PowerOff => power_off(),
        // Stopping --Shutdown--> Stopping: already on its way down.
        E::Shutdown { .. } => to(state, &[]),
        // Stopping --Takeover--> Stopping: a forced stop is forced again; a graceful one keeps
        // its deadline.
        E::Takeover => to(
            state,
            if forced {
                &[Action::DestroyDomain]
            } else {
                &[]
            },
        ),
        // Stopping --HostLost|FailOver--> Lost (power off): it was on its way down anyway.
        E::HostLost { .. } | E::FailOver { .. } => lost_because(node, Intent::PowerOff),
        // Stopping --Restart--> Stopping: it was on its way down anyway.
        E::Restart { .. } => to(state, &[]),
        E::Start
        | E::Delete
        | E::Provisioned
        | E::ProvisionFailed { .. }
        | E::StartSucceeded
        | E::StartFailed { .. } => refuse(state, event, "; wait until it has stopped"),
    }
}

fn lost(intent: Intent, node: &str, event: &VmEvent) -> Result<Transition, Error> {
    use VmEvent as E;
    let state = VmState::Lost { intent };
    match (intent, event) {
        // Lost (resume) --DomainRunning--> Running: it ran on while its host was cut off.
        (Intent::Resume, E::DomainRunning) => {
            to_because(VmState::Running, "running again: its host returned", &[])
        }
        // Lost (resume) --DomainPaused--> Paused
        (Intent::Resume, E::DomainPaused { reason }) => {
            to_because(VmState::Paused, &pause_reason(reason), &[])
        }
        // Lost (resume) --DomainStopped--> Starting: its host lost power; start it again there.
        (Intent::Resume, E::DomainStopped { .. }) => {
            start_because("its host returned; starting it again")
        }
        // Lost (power off) --DomainRunning|DomainPaused--> Stopping (forced)
        (Intent::PowerOff, E::DomainRunning | E::DomainPaused { .. }) => to_because(
            FORCED,
            "its host returned; powering off",
            &[Action::DestroyDomain],
        ),
        // Lost (power off) --DomainStopped--> Stopped
        (Intent::PowerOff, E::DomainStopped { .. }) => {
            to_because(VmState::Stopped, "powered off (its host returned)", &[])
        }
        // Lost (delete) --Domain*--> Deleting
        (Intent::Delete, E::DomainRunning | E::DomainPaused { .. } | E::DomainStopped { .. }) => {
            to_because(VmState::Deleting, "its host returned; deleting", &REMOVE)
        }
        // Lost (resume) --FailOver--> Starting on the peer (new generation)
        (Intent::Resume, E::FailOver { to, why, .. }) => fail_over(to, why),
        (Intent::PowerOff | Intent::Delete, E::FailOver { .. }) | (_, E::Restart { .. }) => {
            to(state, &[])
        }
        // Lost --PowerOff--> Lost (power off), unless a delete is already due.
        (Intent::Resume | Intent::PowerOff, E::PowerOff) => lost_because(node, Intent::PowerOff),
        (Intent::Delete, E::PowerOff) => to(state, &[]),
        // Lost --Delete--> Lost (delete)
        (_, E::Delete) => lost_because(node, Intent::Delete),
        // Lost --Tick|Takeover|HostLost|late outcomes--> Lost: the first report after the host
        // returns decides.
        (
            _,
            E::Tick { .. }
            | E::Takeover
            | E::HostLost { .. }
            | E::StartSucceeded
            | E::StartFailed { .. }
            | E::Provisioned
            | E::ProvisionFailed { .. },
        ) => to(state, &[]),
        (_, E::Start) => refuse(
            state,
            event,
            "; its host is down: it starts again when the host returns",
        ),
        (_, E::Shutdown { .. }) => refuse(
            state,
            event,
            "; its host is down: power it off instead, which is done when the host returns",
        ),
    }
}

#[cfg(test)]
mod tests;
