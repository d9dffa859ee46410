//! An FT VM's phase, pure: what the controller already knows of it (the VM's state, its HA
//! protection, whether a failover is under way, and its primary agent's last FT report)
//! turned into one of six phases, and a phase change turned into the lifecycle event it means.
//! Plus the FT figures (epoch rate, last pause) computed from successive agent reports.
//!
//! ```text
//!          start              mirror syncing         first checkpoint committed
//!  (off) ───────► Starting ─────────────────► Syncing ──────────────────────► Protected
//!                    │ no mirror yet,           ▲  │ mirror or epochs            │ │
//!                    ▼ peer away                │  ▼ failed, peer away           │ │
//!                 Simplex ──────────────────────┘ Simplex ◄─────────────────────┘ │
//!                    ▲                                 epoch failed, mirror broke  │
//!                    │ runs on the peer: its standby resumed                       │ host lost or
//!                    │ (it held a checkpoint of the run), else booted              │ QEMU died, the
//!                    │ from the disks                                              ▼ peer's copy current
//!                    └─────────────────────────────────────────────────────── FailingOver
//!                                                                                 │ the start on
//!   Starting, Syncing, Simplex ──host lost, only its copy current──► Failed ◄─────┘ the peer failed
//!   Failed ──its host back, the VM seen running──► Simplex, Syncing, Protected
//!   any ──stopped, stopping, deleted──► (off)
//! ```
//!
//! The phase follows the VM's record (committed in etcd) and the last FT report of its
//! primary: the event log ([`crate::events`]) derives it from the records alone (no report
//! there), which agrees once the engine has committed what the report means: an ended epoch
//! loop breaks the mirror ([`crate::engine`] commits simplex), a first checkpoint makes it
//! protected. Every phase change is logged by the engine (the old phase's end, the new one's
//! begin) and told once in the event log.

use std::fmt;

use crate::as_f64;
use crate::ha::{Protection, Sync};
use crate::model::{Intent, Mode, VmRecord, VmState};

/// Where an FT VM stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FtPhase {
    /// Being started (or restarted where it is); no protection is built yet.
    Starting,
    /// Its disks' mirror copies (or verifies), or the first checkpoint has not committed on
    /// the standby yet.
    Syncing,
    /// Checkpointed: the standby on the peer holds every state the guest let out.
    Protected,
    /// It runs on one host only: the mirror or the epochs failed, or the peer is away.
    Simplex,
    /// Its host was lost (or its QEMU kept dying) with the peer's copy current: it moves to
    /// the peer.
    FailingOver,
    /// It should run and does not (or cannot be seen to), and no failover brings it back: a
    /// failover's start failed, or its host was lost while only that host's copy was current.
    Failed,
}

impl FtPhase {
    /// Short name, as operators read it: starting, syncing, protected, simplex,
    /// failing-over, failed.
    pub fn name(self) -> &'static str {
        match self {
            FtPhase::Starting => "starting",
            FtPhase::Syncing => "syncing",
            FtPhase::Protected => "protected",
            FtPhase::Simplex => "simplex",
            FtPhase::FailingOver => "failing-over",
            FtPhase::Failed => "failed",
        }
    }

    /// Whether entering this phase is bad news (logged as a warning).
    pub fn alarming(self) -> bool {
        match self {
            FtPhase::Simplex | FtPhase::FailingOver | FtPhase::Failed => true,
            FtPhase::Starting | FtPhase::Syncing | FtPhase::Protected => false,
        }
    }
}

/// The name of a phase that may be none: "off" when the VM does not run.
pub fn name_of(phase: Option<FtPhase>) -> &'static str {
    phase.map_or("off", FtPhase::name)
}

impl fmt::Display for FtPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The FT side of a running VM as its primary's agent last reported it (no proto types here:
/// the engine converts).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FtSeen {
    /// The last epoch committed on the standby (0: none yet in this run).
    pub committed_epoch: u64,
    /// The last checkpoint's pause of the guest, in microseconds.
    pub last_pause_us: u64,
    /// Why the epochs ended, when they did (the guest then runs unprotected).
    pub error: String,
    /// Whether the epochs wait for the disks' mirrors to be in sync.
    pub waiting_for_mirror: bool,
    /// Every checkpoint pause of the run.
    pub pauses: DurationHistogram,
    /// Every epoch's length of the run, commit to commit.
    pub epochs: DurationHistogram,
}

/// Durations of one run (checkpoint pauses, epoch lengths) as a cumulative histogram.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DurationHistogram {
    /// `(bound in µs, durations of at most it)`, bounds ascending.
    pub buckets: Vec<(u64, u64)>,
    /// All durations, above the last bound too.
    pub count: u64,
    /// Their sum in µs.
    pub sum_us: u64,
}

/// What the phase is derived from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen<'a> {
    /// The VM's state.
    pub state: VmState,
    /// Its HA protection.
    pub protection: &'a Protection,
    /// Its primary agent's last FT report, if there is one.
    pub ft: Option<&'a FtSeen>,
    /// Whether a failover is under way ([`failover_in_progress`]).
    pub failing_over: bool,
}

/// Whether VM `state` on `node` with `protection` is failing over: it starts on the host a
/// failover chose and has not run there yet, or its host is lost while the peer's copy is
/// current (the failover waits for the fence).
pub fn failover_in_progress(state: VmState, node: &str, protection: &Protection) -> bool {
    match state {
        VmState::Starting => pending_failover(protection).is_some_and(|to| to == node),
        VmState::Lost {
            intent: Intent::Resume,
        } => protection.current.iter().any(|host| host != node),
        VmState::Creating
        | VmState::Stopped
        | VmState::Running
        | VmState::Stopping { .. }
        | VmState::Deleting
        | VmState::Paused
        | VmState::Lost { .. } => false,
    }
}

/// The host a failover that has not run the VM yet moves it to.
fn pending_failover(protection: &Protection) -> Option<&str> {
    protection
        .last_failover
        .as_ref()
        .filter(|f| f.running_unix_ms.is_none())
        .map(|f| f.to.as_str())
}

/// The phase of an FT VM; `None` when it does not run (created, stopped, stopping, deleted,
/// or lost with a power-off or delete due).
pub fn phase(seen: &Seen<'_>) -> Option<FtPhase> {
    match seen.state {
        VmState::Starting | VmState::Lost { .. } if seen.failing_over => Some(FtPhase::FailingOver),
        VmState::Starting => Some(FtPhase::Starting),
        VmState::Lost {
            intent: Intent::Resume,
        } => Some(FtPhase::Failed),
        VmState::Running | VmState::Paused => Some(running(seen)),
        // A failover whose start failed leaves the VM stopped before it ever ran on the peer.
        VmState::Stopped if pending_failover(seen.protection).is_some() => Some(FtPhase::Failed),
        VmState::Creating
        | VmState::Stopped
        | VmState::Stopping { .. }
        | VmState::Deleting
        | VmState::Lost { .. } => None,
    }
}

/// The phase of a running FT VM: its protection, unless its epochs ended (then it runs on
/// one host whatever the mirror says yet).
fn running(seen: &Seen<'_>) -> FtPhase {
    if seen.ft.is_some_and(|ft| !ft.error.is_empty()) {
        return FtPhase::Simplex;
    }
    match seen.protection.sync {
        Sync::Off => FtPhase::Starting,
        Sync::Syncing { .. } => FtPhase::Syncing,
        Sync::Protected { .. } => FtPhase::Protected,
        Sync::Simplex { .. } => FtPhase::Simplex,
    }
}

/// The phase of `record` if it is an FT VM (`None` for another mode or a VM that does not
/// run), with its primary's last FT report `ft`.
pub fn phase_of(record: &VmRecord, ft: Option<&FtSeen>) -> Option<FtPhase> {
    if record.mode != Mode::Ft {
        return None;
    }
    phase(&Seen {
        state: record.state,
        protection: &record.protection,
        ft,
        failing_over: failover_in_progress(record.state, &record.node, &record.protection),
    })
}

/// The lifecycle event a phase change means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FtEvent {
    /// The VM starts (where it is recorded).
    StartBegin,
    /// Its protection is being built: the mirror syncs, the first checkpoint is awaited.
    SyncBegin,
    /// The first checkpoint committed on the standby (or protection seen again).
    Protected,
    /// It runs on one host: protection was lost, or could not be built yet.
    Unprotected,
    /// It leaves its host for the peer.
    FailoverBegin,
    /// It runs on the peer after a failover.
    FailoverDone,
    /// The failover's start failed, or no copy could take over.
    FailoverFailed,
    /// It stopped running, outside a failover (host lost with only its copy current).
    Failed,
    /// It is no longer meant to run (stopped, being deleted).
    Stopped,
}

impl FtEvent {
    /// Short name for logs and events.
    pub fn name(self) -> &'static str {
        match self {
            FtEvent::StartBegin => "ft-start-begin",
            FtEvent::SyncBegin => "ft-sync-begin",
            FtEvent::Protected => "ft-protected",
            FtEvent::Unprotected => "ft-unprotected",
            FtEvent::FailoverBegin => "ft-failover-begin",
            FtEvent::FailoverDone => "ft-failover-done",
            FtEvent::FailoverFailed => "ft-failover-failed",
            FtEvent::Failed => "ft-failed",
            FtEvent::Stopped => "ft-stopped",
        }
    }
}

/// A change of an FT VM's phase and what it means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    /// The phase before (`None`: off).
    pub from: Option<FtPhase>,
    /// The phase now (`None`: off).
    pub to: Option<FtPhase>,
    /// The lifecycle event to emit.
    pub event: FtEvent,
}

/// The event a change of phase from `old` to `new` means; `None` when the phase is the same.
pub fn transition(old: Option<FtPhase>, new: Option<FtPhase>) -> Option<Change> {
    use FtPhase as P;
    let event = match (old, new) {
        (a, b) if a == b => return None,
        // * --stopped, deleted--> off
        (_, None) => FtEvent::Stopped,
        // off, Failed, Simplex --Start|Restart--> Starting
        (_, Some(P::Starting)) => FtEvent::StartBegin,
        // FailingOver --runs on the peer--> Syncing | Protected | Simplex
        (Some(P::FailingOver), Some(P::Syncing | P::Protected | P::Simplex)) => {
            FtEvent::FailoverDone
        }
        // Starting, Simplex, Protected --mirror syncing, or awaiting the first checkpoint--> Syncing
        (
            None | Some(P::Starting | P::Simplex | P::Protected | P::Failed | P::Syncing),
            Some(P::Syncing),
        ) => FtEvent::SyncBegin,
        // Syncing --first checkpoint committed--> Protected
        (
            None | Some(P::Starting | P::Syncing | P::Simplex | P::Failed | P::Protected),
            Some(P::Protected),
        ) => FtEvent::Protected,
        // Protected, Syncing, Starting --epoch failed, mirror broke, peer away--> Simplex
        (
            None | Some(P::Starting | P::Syncing | P::Protected | P::Failed | P::Simplex),
            Some(P::Simplex),
        ) => FtEvent::Unprotected,
        // * --host lost or QEMU died, peer current--> FailingOver
        (_, Some(P::FailingOver)) => FtEvent::FailoverBegin,
        // FailingOver --start on the peer failed--> Failed
        (Some(P::FailingOver), Some(P::Failed)) => FtEvent::FailoverFailed,
        // Starting, Syncing, Protected, Simplex --host lost, only its copy current--> Failed
        (
            None | Some(P::Starting | P::Syncing | P::Protected | P::Simplex | P::Failed),
            Some(P::Failed),
        ) => FtEvent::Failed,
    };
    Some(Change {
        from: old,
        to: new,
        event,
    })
}

/// A change in words for the event log: `protected → failing-over: moving from n0 to n1 (host
/// n0 lost)`. `protection` and `state_reason` are the VM's after the change.
pub fn message(change: &Change, protection: &Protection, state_reason: &str) -> String {
    let head = format!("FT {} → {}", name_of(change.from), name_of(change.to));
    let failover = protection.last_failover.as_ref();
    let detail = match change.event {
        FtEvent::FailoverBegin => failover
            .filter(|f| f.running_unix_ms.is_none())
            .map(|f| format!("moving from {} to {} ({})", f.from, f.to, f.reason)),
        FtEvent::FailoverDone => failover.map(|f| {
            let how = if protection.resume_standby {
                "its standby resumed from the last checkpoint (same boot)"
            } else {
                "booted from its disks (no standby held a checkpoint of the run)"
            };
            let downtime = f
                .running_unix_ms
                .map(|at| format!(" after {} ms", at.saturating_sub(f.decided_unix_ms)))
                .unwrap_or_default();
            format!("running on {}{downtime}: {how}", f.to)
        }),
        FtEvent::Unprotected => match &protection.sync {
            Sync::Simplex { reason, .. } => Some(reason.clone()),
            Sync::Off | Sync::Syncing { .. } | Sync::Protected { .. } => None,
        },
        FtEvent::FailoverFailed | FtEvent::Failed | FtEvent::Stopped => {
            (!state_reason.is_empty()).then(|| state_reason.to_string())
        }
        FtEvent::StartBegin | FtEvent::SyncBegin | FtEvent::Protected => None,
    };
    match detail {
        Some(detail) => format!("{head}: {detail}"),
        None => head,
    }
}

/// The FT figures of a VM, from successive reports of its primary.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    /// The host whose reports these are.
    pub node: String,
    /// When the last report was taken, on the engine's monotonic clock (ms).
    pub observed_ms: u64,
    /// The last epoch committed on the standby.
    pub committed_epoch: u64,
    /// Epochs committed per second between the last two reports; `None` until two reports
    /// of the same run were seen.
    pub epochs_per_second: Option<f64>,
    /// The last checkpoint's pause of the guest, in milliseconds; `None` before the first.
    pub last_pause_ms: Option<f64>,
    /// The last error that ended the VM's epochs, as long as this controller has seen one.
    pub last_error: Option<String>,
    /// Whether the epochs wait for the mirrors.
    pub waiting_for_mirror: bool,
    /// The run's checkpoint pauses.
    pub pauses: DurationHistogram,
    /// The run's epoch lengths.
    pub epochs: DurationHistogram,
}

/// The figures after report `seen` from `node` at `now_ms` (monotonic), given the last ones.
/// The rate counts from the previous report of the same host and run: a new host or a
/// committed epoch that went back (a new run) restarts it.
pub fn metrics(prev: Option<&Metrics>, node: &str, seen: &FtSeen, now_ms: u64) -> Metrics {
    let same_run = prev.filter(|p| p.node == node && p.committed_epoch <= seen.committed_epoch);
    let epochs_per_second = same_run.and_then(|p| {
        let elapsed_ms = now_ms.checked_sub(p.observed_ms).filter(|ms| *ms > 0)?;
        let epochs = seen.committed_epoch - p.committed_epoch;
        Some(as_f64(epochs) * 1000.0 / as_f64(elapsed_ms))
    });
    let last_error = if seen.error.is_empty() {
        prev.and_then(|p| p.last_error.clone())
    } else {
        Some(seen.error.clone())
    };
    Metrics {
        node: node.to_string(),
        observed_ms: now_ms,
        committed_epoch: seen.committed_epoch,
        epochs_per_second,
        last_pause_ms: (seen.committed_epoch > 0).then(|| as_f64(seen.last_pause_us) / 1000.0),
        last_error,
        waiting_for_mirror: seen.waiting_for_mirror,
        pauses: seen.pauses.clone(),
        epochs: seen.epochs.clone(),
    }
}

/// The figures once no primary reports on the VM (it stopped, or its host is away): no rate
/// or wait any more; the last epoch, pause and error stay for the operator.
pub fn unreported(prev: &Metrics) -> Metrics {
    Metrics {
        epochs_per_second: None,
        waiting_for_mirror: false,
        ..prev.clone()
    }
}

#[cfg(test)]
mod tests;
