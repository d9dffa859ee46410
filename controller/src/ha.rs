//! HA protection of a VM's disks, pure: which hosts hold a current copy, how the mirror to
//! the peer stands, and what to do about it.
//!
//! ```text
//!                 mirror syncing              mirror ready
//!   (start) ──► Syncing ─────────────► Syncing ─────────────► Protected
//!     │ peer down    ▲ peer back: export + mirror  │ mirror failed / gone, peer down
//!     ▼              │                             ▼
//!   Simplex ◄────────┴───────────────────────── Simplex (alert)
//!
//!   host of a running VM lost, peer current and up ──► fail over: start on the peer
//!   host lost, peer behind or down                  ──► lost until the host returns
//!   disk failed under the VM, mirror ready           ──► Simplex: the guest runs on the
//!                                                        peer's copy, only the peer current
//! ```
//!
//! The rule that keeps every acknowledged write: a VM may start only on a host whose copy is
//! *current*. A start makes only its own host current (the new QEMU writes before any mirror
//! exists); the peer becomes current again only when its mirror reports ready (every write
//! then completes on both hosts), and stops being current as soon as the mirror is seen broken.
//! Both changes are committed to etcd (fenced) before anything acts on them. Between a break
//! and the controller seeing it, the primary's agent holds the guest's writes until it has
//! left a stale mark in etcd ([`daemon::pair::StaleMark`]): a mark on the mirror path that
//! made the peer current takes the peer's copy out of the current ones at once, and a
//! failover commits only if the marks are as the engine read them. When the primary's own
//! disk fails, its agent marks the primary's copy behind instead and moves the guest onto the
//! peer's copy; a mark naming a host keeps every start off that host's copy.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Where a protected VM's disks are current and how its mirror stands, stored with the VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Protection {
    /// Hosts whose copy holds every write the guest saw acknowledged.
    #[serde(default)]
    pub current: BTreeSet<String>,
    /// The mirror to the peer.
    #[serde(default)]
    pub sync: Sync,
    /// The last time the VM was restarted on the peer because its host was lost.
    #[serde(default)]
    pub last_failover: Option<Failover>,
    /// The mirror path (its serial) whose sync made the peer current; a stale mark on it or
    /// a later path means the peer is behind.
    #[serde(default)]
    pub mirror_path: i64,
    /// Restarts on the same host after its QEMU died on its own, since the last start that
    /// was not one.
    #[serde(default)]
    pub restarts: u32,
    /// Whether the last (re)start came while another host's copy was current too: that copy
    /// then equals (at least) the disks the new QEMU starts from, so the agent tracks the
    /// guest's writes from the start and the first mirror copies only those (then verifies).
    #[serde(default)]
    pub track_from_start: bool,
    /// FT: the last failover came while the VM was protected, i.e. its standby on the new
    /// host had committed a checkpoint of the run that died: the start there resumes that
    /// standby (same boot) instead of booting from the disks.
    #[serde(default)]
    pub resume_standby: bool,
}

/// The mirror to the peer, as last seen.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "lowercase")]
pub enum Sync {
    /// Not running (the VM is stopped, or not protected).
    #[default]
    Off,
    /// The copy (or, once it is done, the verify) runs: `done` of `total` bytes are on the
    /// peer (or found equal).
    Syncing {
        /// Bytes copied (or verified).
        done: u64,
        /// Bytes to copy (or verify).
        total: u64,
        /// When this phase began.
        since_unix_ms: i64,
        /// Whether the verify runs (the copy is done).
        #[serde(default)]
        verifying: bool,
    },
    /// In sync: every write is on both hosts before the guest sees it complete.
    Protected {
        /// Since when.
        since_unix_ms: i64,
    },
    /// Running on one copy only.
    Simplex {
        /// Why, in words.
        reason: String,
        /// Since when.
        since_unix_ms: i64,
    },
}

impl Sync {
    /// Short name: off, syncing, protected, simplex.
    pub fn name(&self) -> &'static str {
        match self {
            Sync::Off => "off",
            Sync::Syncing { .. } => "syncing",
            Sync::Protected { .. } => "protected",
            Sync::Simplex { .. } => "simplex",
        }
    }

    /// A sync's phase: "copy" or "verify"; `None` when no sync runs.
    pub fn phase(&self) -> Option<&'static str> {
        match self {
            Sync::Syncing {
                verifying: true, ..
            } => Some("verify"),
            Sync::Syncing { .. } => Some("copy"),
            _ => None,
        }
    }

    /// How far a sync has come at `now_unix_ms`: its share, average rate and time left;
    /// `None` when no sync runs.
    pub fn progress(&self, now_unix_ms: i64) -> Option<Progress> {
        let Sync::Syncing {
            done,
            total,
            since_unix_ms,
            ..
        } = self
        else {
            return None;
        };
        // A mirror's count grows past the total with the writes it copies meanwhile.
        let counted = (*done).min(*total);
        let percent = (counted * 100).checked_div(*total).unwrap_or(0);
        let elapsed_ms = u64::try_from(now_unix_ms.saturating_sub(*since_unix_ms)).unwrap_or(0);
        let bytes_per_second = (done.saturating_mul(1000))
            .checked_div(elapsed_ms)
            .unwrap_or(0);
        let eta_seconds = (total - counted).checked_div(bytes_per_second);
        Some(Progress {
            percent,
            bytes_per_second,
            eta_seconds,
        })
    }
}

/// A sync's progress, for the API, events and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Share copied, 0–100.
    pub percent: u64,
    /// Average rate since the sync began.
    pub bytes_per_second: u64,
    /// Time left at that rate; `None` until a rate is known.
    pub eta_seconds: Option<u64>,
}

/// A failover: the VM restarted on the peer of its lost host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failover {
    /// The lost host.
    pub from: String,
    /// The host it restarted on.
    pub to: String,
    /// Why.
    pub reason: String,
    /// When the failover was decided (the host judged lost).
    pub decided_unix_ms: i64,
    /// When the VM ran again on `to`.
    #[serde(default)]
    pub running_unix_ms: Option<i64>,
}

/// The mirror of a running VM's disks as its host's agent reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mirror {
    /// No mirror runs.
    Absent,
    /// The copy or the verify runs (summed over the VM's disks).
    Syncing {
        /// Bytes copied (or verified).
        done: u64,
        /// Bytes to copy (or verify).
        total: u64,
        /// Whether every syncing disk is verifying (its copy is done).
        verifying: bool,
    },
    /// Every disk's mirror is ready and actively synced.
    Ready,
    /// A disk's mirror failed.
    Failed {
        /// QEMU's or the agent's words.
        error: String,
    },
    /// The primary's disk failed and the guest runs on the peer's copy through the A-Links.
    OnPeer,
}

/// What a running HA VM needs now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The protection to commit, when it changes.
    pub protection: Option<Protection>,
    /// Whether to (re)build the mirror: export the replica on the peer, then mirror to it.
    pub protect: bool,
    /// Whether the VM's stale mark is obsolete (older than the mirror now in sync): remove
    /// it with the protection.
    pub clear_mark: bool,
}

/// What the engine knows of a running HA VM and its peer at one poll.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed<'a> {
    /// The host the VM runs on.
    pub primary: &'a str,
    /// The other host of the pair, if there is one.
    pub peer: Option<&'a str>,
    /// Whether the peer is up with its agent answering.
    pub peer_up: bool,
    /// The mirror as the primary's agent reports it.
    pub mirror: Mirror,
    /// The serial of the path the primary's mirrors write through (0: none).
    pub mirror_path: i64,
    /// The path serial named by a stale mark on this VM's mirror to the peer, if there is one.
    pub mark: Option<i64>,
    /// Whether a protect step is already under way (sent, not yet answered).
    pub protecting: bool,
    /// Now.
    pub now_unix_ms: i64,
}

/// Steps the protection of a running HA VM with what the last poll saw.
pub fn observe(current: &Protection, seen: &Observed<'_>) -> Decision {
    let mut next = current.clone();
    let only_primary: BTreeSet<String> = [seen.primary.to_string()].into();
    let mut protect = false;
    // A mark on the running path: it broke, whatever QEMU says yet.
    let broken = seen.mark.is_some_and(|path| path >= seen.mirror_path);
    let mirror = match &seen.mirror {
        Mirror::Ready | Mirror::Syncing { .. } if broken => Mirror::Failed {
            error: "the path to the peer broke (stale mark)".into(),
        },
        other => other.clone(),
    };
    let clear_mark = seen.mark.is_some() && !broken && mirror == Mirror::Ready;
    match (&mirror, seen.peer) {
        (Mirror::OnPeer, Some(peer)) => {
            next.current = [peer.to_string()].into();
            let reason = format!(
                "the disk on {} failed; the guest runs on {peer}'s copy through the A-Links",
                seen.primary
            );
            next.sync = simplex(&current.sync, &reason, seen.now_unix_ms);
        }
        (_, None) => {
            next.current = only_primary;
            next.sync = simplex(
                &current.sync,
                "the pair has no second host",
                seen.now_unix_ms,
            );
        }
        (Mirror::Ready, Some(peer)) => {
            next.current = [seen.primary.to_string(), peer.to_string()].into();
            next.mirror_path = seen.mirror_path;
            if !matches!(current.sync, Sync::Protected { .. }) {
                next.sync = Sync::Protected {
                    since_unix_ms: seen.now_unix_ms,
                };
            }
        }
        (
            Mirror::Syncing {
                done,
                total,
                verifying,
            },
            Some(_),
        ) => {
            next.current = only_primary;
            // The rate and time left are per phase: the verify counts from 0 again.
            let since_unix_ms = match current.sync {
                Sync::Syncing {
                    since_unix_ms,
                    verifying: was,
                    ..
                } if was == *verifying => since_unix_ms,
                _ => seen.now_unix_ms,
            };
            next.sync = Sync::Syncing {
                done: *done,
                total: *total,
                since_unix_ms,
                verifying: *verifying,
            };
        }
        (Mirror::Absent | Mirror::Failed { .. }, Some(peer)) => {
            next.current = only_primary;
            let reason = match (&mirror, seen.peer_up) {
                (Mirror::Failed { error }, _) => format!("the mirror to {peer} failed: {error}"),
                (_, false) => format!("host {peer} is not up; the VM runs on one copy"),
                _ => format!("no mirror to {peer} yet"),
            };
            next.sync = simplex(&current.sync, &reason, seen.now_unix_ms);
            protect = seen.peer_up && !seen.protecting;
        }
    }
    Decision {
        protection: (next != *current || clear_mark).then_some(next),
        protect,
        clear_mark,
    }
}

/// The protection of a running HA VM whose host `primary` runs on without its agent: the
/// mirror's path to the peer lives in the agent, so the guest may be writing to its own copy
/// alone; only `primary`'s copy stays current. `None` if that is already so.
pub fn agent_down(current: &Protection, primary: &str, now_unix_ms: i64) -> Option<Protection> {
    if current.current.iter().all(|host| host == primary) {
        return None;
    }
    let reason = format!(
        "the agent on {primary} is down; the mirror ran through it, so the peer's copy may be behind"
    );
    Some(Protection {
        current: [primary.to_string()].into(),
        sync: simplex(&current.sync, &reason, now_unix_ms),
        ..current.clone()
    })
}

/// Simplex for `reason`, keeping the time it began if it already was simplex.
fn simplex(was: &Sync, reason: &str, now_unix_ms: i64) -> Sync {
    let since_unix_ms = match was {
        Sync::Simplex { since_unix_ms, .. } => *since_unix_ms,
        _ => now_unix_ms,
    };
    Sync::Simplex {
        reason: reason.to_string(),
        since_unix_ms,
    }
}

/// The protection of a VM about to start on `node`: only that host's copy stays current,
/// since the new QEMU writes before any mirror exists. `None` when `node`'s copy is not current
/// (or a stale mark says it is behind, `behind`): starting there would lose acknowledged writes.
pub fn starting_on(current: &Protection, node: &str, behind: bool) -> Option<Protection> {
    if behind || (!current.current.is_empty() && !current.current.contains(node)) {
        return None;
    }
    Some(Protection {
        current: [node.to_string()].into(),
        sync: Sync::Off,
        last_failover: current.last_failover.clone(),
        mirror_path: 0,
        restarts: current.restarts,
        track_from_start: current.current.iter().any(|host| host != node),
        // A (re)start here is a new run: no standby holds a checkpoint of it yet.
        resume_standby: false,
    })
}

/// Where a stopped protected VM whose home is `node` starts: there if its copy there is
/// current (`node_behind`: a stale mark says it is not), else on `peer` if the copy there is
/// current and the peer is usable (after a failover back or a local disk fault, the home copy
/// may be behind while the peer's holds every write). `None`: nowhere yet.
pub fn start_host<'a>(
    current: &Protection,
    node: &'a str,
    node_behind: bool,
    peer: Option<(&'a str, bool, bool)>,
) -> Option<&'a str> {
    let usable = |host: &str, behind: bool| {
        !behind && (current.current.is_empty() || current.current.contains(host))
    };
    if usable(node, node_behind) {
        return Some(node);
    }
    let (peer, peer_usable, peer_behind) = peer?;
    (peer_usable && usable(peer, peer_behind)).then_some(peer)
}

/// The protection committed when a VM is (re)placed on `node` (`protected`: HA or FT): a
/// failover to `relocate` keeps only the survivor's copy current, a start only `node`'s.
/// `None` when `node`'s copy is behind: starting there would lose acknowledged writes.
pub fn placed(
    current: &Protection,
    protected: bool,
    node: &str,
    placement: &Placement<'_>,
    now_unix_ms: i64,
) -> Option<Protection> {
    match placement.relocate {
        Some(to) => Some(Protection {
            // The copy left behind on `node` holds every write `to`'s does if it was current.
            track_from_start: current.current.contains(node),
            // Protected (for FT: checkpointed in this run) up to the failover, on `to` too.
            resume_standby: matches!(current.sync, Sync::Protected { .. })
                && current.current.contains(to),
            ..failed_over(node, to, placement.why, now_unix_ms)
        }),
        None if protected => {
            let mut next = starting_on(current, node, placement.behind)?;
            next.restarts = if placement.crash {
                current.restarts + 1
            } else {
                0
            };
            Some(next)
        }
        None => Some(current.clone()),
    }
}

/// How a VM is (re)placed: where it moves, why, and whether it restarts after a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement<'a> {
    /// The host it moves to, if it moves.
    pub relocate: Option<&'a str>,
    /// Why, for the failover record.
    pub why: &'a str,
    /// Whether this is a restart after its QEMU died on its own.
    pub crash: bool,
    /// Whether a stale mark says the copy on the host it starts on is behind.
    pub behind: bool,
}

/// Whether a stale mark on path `mark` (if any) says a copy is behind: it names the path that
/// made the copies current, or a later one.
pub fn marked_behind(current: &Protection, mark: Option<i64>) -> bool {
    mark.is_some_and(|path| path >= current.mirror_path)
}

/// What to do when the QEMU of a running HA VM on `node` died on its own (the host is fine):
/// restart it there (`Some(None)`) while it has restarts left and its copy there is current
/// (`here_behind`: a stale mark says it is not), else move it to the peer (`Some(Some(peer))`)
/// when the peer may take it, else leave it stopped (`None`).
pub fn after_crash<'a>(
    current: &Protection,
    node: &str,
    here_behind: bool,
    peer: Option<&'a str>,
    peer_up: bool,
    mark: Option<i64>,
    max_restarts: u32,
) -> Option<Option<&'a str>> {
    let here_current = current.current.is_empty() || current.current.contains(node);
    if current.restarts < max_restarts && here_current && !here_behind {
        return Some(None);
    }
    failover_target(current, node, peer, peer_up, mark).map(Some)
}

/// Where an FT VM whose QEMU died on `node` resumes at once: the peer, when its standby holds
/// a checkpoint of the run that died (protected, the peer's copy current, no stale mark) and
/// it is up. Resuming keeps the guest's boot, which a restart from the disks would not.
pub fn standby_target<'a>(
    current: &Protection,
    node: &str,
    peer: Option<&'a str>,
    peer_up: bool,
    mark: Option<i64>,
) -> Option<&'a str> {
    let protected = matches!(current.sync, Sync::Protected { .. });
    protected
        .then(|| failover_target(current, node, peer, peer_up, mark))
        .flatten()
}

/// Where an HA VM whose host `lost` is lost restarts: the peer, if its copy is current (and
/// no stale mark, `mark`, names the path that made it so or a later one) and it is up. `None`
/// means the VM waits for its host.
pub fn failover_target<'a>(
    current: &Protection,
    lost: &str,
    peer: Option<&'a str>,
    peer_up: bool,
    mark: Option<i64>,
) -> Option<&'a str> {
    let peer = peer?;
    let marked = marked_behind(current, mark);
    (peer != lost && peer_up && !marked && current.current.contains(peer)).then_some(peer)
}

/// The protection committed with a failover from `from` to `to` (`why`, in words), decided at
/// `now_unix_ms`.
pub fn failed_over(from: &str, to: &str, why: &str, now_unix_ms: i64) -> Protection {
    Protection {
        current: [to.to_string()].into(),
        sync: Sync::Simplex {
            reason: format!("moved from {from}; running on {to} alone"),
            since_unix_ms: now_unix_ms,
        },
        last_failover: Some(Failover {
            from: from.to_string(),
            to: to.to_string(),
            reason: why.to_string(),
            decided_unix_ms: now_unix_ms,
            running_unix_ms: None,
        }),
        mirror_path: 0,
        restarts: 0,
        track_from_start: false,
        resume_standby: false,
    }
}

/// The protection once a failed-over VM runs again: the failover's downtime ends.
pub fn running(current: &Protection, now_unix_ms: i64) -> Option<Protection> {
    let failover = current.last_failover.as_ref()?;
    if failover.running_unix_ms.is_some() {
        return None;
    }
    let mut next = current.clone();
    if let Some(f) = next.last_failover.as_mut() {
        f.running_unix_ms = Some(now_unix_ms);
    }
    Some(next)
}

#[cfg(test)]
mod tests;
