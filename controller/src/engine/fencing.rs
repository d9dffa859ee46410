//! Fencing: a lost host is powered off through its BMC before its HA VMs restart on the peer,
//! so a host that only looks dead (hung, cut off) can never run them a second time.
//!
//! ```text
//!  host Lost (once per Lost episode)
//!   ├─ BMC configured: "fence begin" ─► wait fence_delay ─► power off ─► status off?
//!   │     ├─ yes: "fence end: ok", health Lost --FenceConfirmed--> Fenced, alert fence/<host>
//!   │     └─ no answer / refused: "fence end: failed", alert fence/<host>, fallback below
//!   └─ no BMC: fallback below
//!  fallback: the host's lease has expired (that is part of Lost); its agent stopped its HA
//!            guests before it could (self-fence); wait its self-fence margin more
//!  host Up or Suspect again ─► the episode ends (a fence still running is aborted)
//! ```
//! The gate ([`failover_allowed`]): an HA VM of a lost host fails over only when the host is
//! `Fenced`, or when no fence runs (no BMC, or its fence failed) and the host has been lost
//! for at least the self-fence margin of the agents' host lease. Until then
//! [`held`] turns its failover into "lost" (it waits, marked lost, and fails over once the
//! gate opens). Only the serving controller fences, and the fence task dies with its engine;
//! the fence delay, set on one host only, keeps two controllers that both believe they serve
//! from powering each other off at the same moment.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::actor::{Engine, Internal};
use crate::bmc::{self, Bmc};
use crate::error::chain;
use crate::health::{self, HostState};
use crate::vm::VmEvent;

/// How a lost host's fence stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fence {
    /// No BMC is configured for the host.
    NoBmc,
    /// The fence runs: its delay, the power-off, the status reads.
    Running,
    /// The BMC confirmed the host is powered off.
    Confirmed,
    /// The BMC did not answer, refused, or still says on.
    Failed,
}

/// One Lost episode of a host: it begins when the host is judged lost and ends when it is
/// heard again.
#[derive(Debug)]
struct Episode {
    /// Tells a fence's outcome from one of an earlier episode.
    id: u64,
    /// When this controller judged the host lost (its lease had expired by then).
    lost_at: Instant,
    /// How its fence stands.
    fence: Fence,
    /// The running fence task.
    task: Option<AbortHandle>,
    /// Whether the fallback opening the gate was logged.
    fallback_logged: bool,
}

/// The hosts' Lost episodes.
#[derive(Debug, Default)]
pub(super) struct Fences {
    episodes: BTreeMap<String, Episode>,
    next_id: u64,
}

/// A fence's outcome, sent back by its task.
#[derive(Debug)]
pub(crate) struct FenceDone {
    node: String,
    episode: u64,
    /// The BMC's address, for the logs.
    bmc: String,
    /// How long the power-off and status reads took (the delay not counted).
    took: Duration,
    result: Result<(), bmc::Error>,
}

/// Whether the HA VMs of a host in `state`, whose fence stands at `fence` and which was judged
/// lost `lost_for` ago, may fail over: only once it is surely off (see the module doc).
pub(super) fn failover_allowed(
    state: HostState,
    fence: Fence,
    lost_for: Duration,
    margin: Duration,
) -> bool {
    match (state, fence) {
        (HostState::Fenced, _) | (HostState::Lost, Fence::Confirmed) => true,
        (HostState::Lost, Fence::Running) => false,
        (HostState::Lost, Fence::NoBmc | Fence::Failed) => lost_for >= margin,
        (HostState::Up | HostState::Suspect, _) => false,
    }
}

/// `event` unless it is a failover the gate holds back: then the VM is lost until it opens.
pub(super) fn held(event: VmEvent, gate_open: bool) -> VmEvent {
    match event {
        VmEvent::FailOver { from, .. } if !gate_open => VmEvent::HostLost { node: from },
        event => event,
    }
}

/// The alert that tells how a host's fence went.
fn alert_id(node: &str) -> String {
    format!("fence/{node}")
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Engine {
    /// Fences and fails over as `node`'s health says: a lost host is fenced once per episode
    /// and its VMs are lost (HA ones fail over through the gate); a host heard again ends its
    /// episode.
    pub(super) async fn follow_health(&mut self, node: &str, state: HostState) {
        match state {
            HostState::Lost => {
                self.begin_fence(node);
                self.host_lost(node).await;
            }
            HostState::Fenced => self.host_lost(node).await,
            HostState::Up | HostState::Suspect => self.end_fence(node, state).await,
        }
    }

    /// Starts a Lost episode of `node` unless one runs: its fence when it has a BMC.
    fn begin_fence(&mut self, node: &str) {
        if self.fences.episodes.contains_key(node) {
            return;
        }
        let id = self.fences.next_id;
        self.fences.next_id += 1;
        // A controller never powers its own host off.
        let bmc = (node != self.ctx.node)
            .then(|| self.ctx.fencing.bmcs.get(node).cloned())
            .flatten();
        let (fence, task) = match bmc {
            Some(bmc) => (Fence::Running, Some(self.spawn_fence(node, id, bmc))),
            None => {
                tracing::warn!(
                    node,
                    margin_ms = millis(self.ctx.fencing.self_fence_margin),
                    "fence: no BMC configured for the host; its HA VMs fail over once it has been lost for its self-fence margin"
                );
                (Fence::NoBmc, None)
            }
        };
        let episode = Episode {
            id,
            lost_at: Instant::now(),
            fence,
            task,
            fallback_logged: false,
        };
        self.fences.episodes.insert(node.to_string(), episode);
    }

    /// Runs the fence of `node` on the engine's tasks (after the fence delay); its outcome
    /// comes back as [`Internal::Fence`].
    fn spawn_fence(&mut self, node: &str, episode: u64, bmc: Bmc) -> AbortHandle {
        let delay = self.ctx.fencing.delay;
        tracing::warn!(
            node,
            bmc = %bmc.address,
            delay_ms = millis(delay),
            "fence begin: powering the lost host off through its BMC; its HA VMs wait for it"
        );
        let (out, node) = (self.internal.clone(), node.to_string());
        self.tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            let started = Instant::now();
            let result = bmc.fence().await;
            let done = FenceDone {
                node,
                episode,
                bmc: bmc.address,
                took: started.elapsed(),
                result,
            };
            let _ = out.send(Internal::Fence(done)).await;
        })
    }

    /// Ends `node`'s Lost episode, aborting a fence that still runs; clears the fence's
    /// alert once the host is up.
    async fn end_fence(&mut self, node: &str, state: HostState) {
        if let Some(episode) = self.fences.episodes.remove(node)
            && let Some(task) = episode.task
        {
            task.abort();
            tracing::warn!(
                node,
                state = state.name(),
                "fence end: aborted; the host is no longer lost"
            );
        }
        if state == HostState::Up {
            self.clear(&alert_id(node)).await;
        }
    }

    /// Applies a fence's outcome: the host `Fenced`, or the fallback; then its HA VMs fail
    /// over if the gate opened.
    pub(super) async fn fence_done(&mut self, done: FenceDone) {
        let Some(episode) = self
            .fences
            .episodes
            .get_mut(&done.node)
            .filter(|e| e.id == done.episode)
        else {
            return;
        };
        episode.task = None;
        let (node, took_ms) = (done.node.as_str(), millis(done.took));
        let message = match &done.result {
            Ok(()) => {
                episode.fence = Fence::Confirmed;
                tracing::warn!(node, bmc = %done.bmc, took_ms, "fence end: ok; the host is powered off");
                self.fence_confirmed(node);
                format!(
                    "host {node} was lost and powered off by its fence (BMC {}); its HA VMs fail over",
                    done.bmc
                )
            }
            Err(e) => {
                episode.fence = Fence::Failed;
                let margin_ms = millis(self.ctx.fencing.self_fence_margin);
                tracing::error!(node, bmc = %done.bmc, took_ms, error = %chain(e), "fence end: failed; the BMC did not answer or refused; fallback: its HA VMs fail over once its lease expired plus its self-fence margin ({margin_ms} ms)");
                format!(
                    "fencing host {node} through its BMC {} failed ({}); its HA VMs fail over on its expired lease plus the self-fence margin instead: check the BMC",
                    done.bmc,
                    chain(e)
                )
            }
        };
        self.raise(&alert_id(node), node, "", message).await;
        self.enforce_health(node).await;
    }

    /// Steps `node`'s health with its fence's confirmation: `Lost → Fenced`.
    fn fence_confirmed(&mut self, node: &str) {
        let host = self.hosts.get(node).cloned().unwrap_or_default();
        let event = health::Event::FenceConfirmed;
        let (next, actions) = health::step(&host, &self.health_config, &event);
        self.hosts.insert(node.to_string(), next);
        for action in &actions {
            Self::log_health(node, action);
        }
    }

    /// Whether the HA VMs of lost `node` may fail over now ([`failover_allowed`]); logs the
    /// fallback the first time it opens the gate.
    pub(super) fn failover_gate(&mut self, node: &str) -> bool {
        let state = self.hosts.get(node).map_or(HostState::Up, |h| h.state);
        let margin = self.ctx.fencing.self_fence_margin;
        let Some(episode) = self.fences.episodes.get_mut(node) else {
            return state == HostState::Fenced;
        };
        let lost_for = episode.lost_at.elapsed();
        let open = failover_allowed(state, episode.fence, lost_for, margin);
        let fallback = matches!(episode.fence, Fence::NoBmc | Fence::Failed);
        if open && fallback && !episode.fallback_logged {
            episode.fallback_logged = true;
            tracing::warn!(
                node,
                fence = ?episode.fence,
                lost_ms = millis(lost_for),
                margin_ms = millis(margin),
                "fence fallback: no BMC confirmed the power-off; the host's lease expired and its self-fence margin passed, so its HA VMs may fail over"
            );
        }
        open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARGIN: Duration = Duration::from_millis(300);

    #[test]
    fn failover_allowed_fenced_host_is_true() {
        let allowed = failover_allowed(HostState::Fenced, Fence::Confirmed, Duration::ZERO, MARGIN);

        assert!(allowed);
    }

    #[test]
    fn failover_allowed_fence_running_is_false_however_long_lost() {
        let allowed = failover_allowed(
            HostState::Lost,
            Fence::Running,
            Duration::from_secs(60),
            MARGIN,
        );

        assert!(!allowed);
    }

    #[test]
    fn failover_allowed_fence_failed_within_margin_is_false() {
        let allowed = failover_allowed(
            HostState::Lost,
            Fence::Failed,
            Duration::from_millis(299),
            MARGIN,
        );

        assert!(!allowed);
    }

    #[test]
    fn failover_allowed_fence_failed_past_margin_is_true() {
        let allowed = failover_allowed(HostState::Lost, Fence::Failed, MARGIN, MARGIN);

        assert!(allowed);
    }

    #[test]
    fn failover_allowed_no_bmc_past_margin_is_true() {
        let allowed = failover_allowed(
            HostState::Lost,
            Fence::NoBmc,
            Duration::from_secs(1),
            MARGIN,
        );

        assert!(allowed);
    }

    #[test]
    fn failover_allowed_suspect_host_is_false() {
        let allowed = failover_allowed(
            HostState::Suspect,
            Fence::Confirmed,
            Duration::from_secs(1),
            MARGIN,
        );

        assert!(!allowed);
    }

    #[test]
    fn held_failover_with_gate_closed_is_host_lost() {
        let event = VmEvent::FailOver {
            from: "n0".into(),
            to: "n1".into(),
            why: "host n0 lost".into(),
        };

        let held = held(event, false);

        assert_eq!(held, VmEvent::HostLost { node: "n0".into() });
    }

    #[test]
    fn held_failover_with_gate_open_is_unchanged() {
        let event = VmEvent::FailOver {
            from: "n0".into(),
            to: "n1".into(),
            why: "host n0 lost".into(),
        };

        let held = held(event.clone(), true);

        assert_eq!(held, event);
    }
}
