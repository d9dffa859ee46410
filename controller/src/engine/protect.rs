//! The engine's HA glue: the peer of a host, failover instead of waiting for a lost host, and
//! the mirror reports of the agents turned into each VM's protection. What to do is decided
//! by [`crate::ha`]; this module feeds it and commits (fenced) before acting.

use proto::agent as pb;

use super::actor::Engine;
use super::observe::DomainsPoll;
use crate::error::ApiError;
use crate::ha::{self, Mirror, Observed, Placement, Protection};
use crate::health::HostState;
use crate::model::{Intent, Mode, VmRecord, VmState};
use crate::store::MarkGuard;
use crate::vm::{Action, PROTECT, PROTECT_FT, Transition, VmEvent, failover_reason};

/// Whether a failover of `record` resumes its standby rather than restarting it from its
/// disks: FT, with a standby that holds a checkpoint of the run ([`ha::standby_target`]).
fn resumes_standby(record: &VmRecord) -> bool {
    record.mode == Mode::Ft && matches!(record.protection.sync, ha::Sync::Protected { .. })
}

impl Engine {
    /// The other host of the pair, if `node` has one.
    pub(super) fn peer_of(&self, node: &str) -> Option<String> {
        self.members.keys().find(|name| *name != node).cloned()
    }

    /// Whether `node` can take a VM now: registered, healthy, its agent answering.
    pub(super) fn node_usable(&self, node: &str) -> bool {
        let healthy = self
            .hosts
            .get(node)
            .is_none_or(|h| h.state == HostState::Up);
        let answering = self
            .last_health
            .as_ref()
            .is_none_or(|poll| poll.answered(node));
        healthy && answering && self.registered.contains_key(node)
    }

    /// What the loss of `node` means for `record`: a failover when the VM is protected and
    /// its copy on the peer is current, else lost until the host returns.
    pub(super) fn lost_event(&self, record: &VmRecord, node: &str) -> VmEvent {
        let lost = VmEvent::HostLost {
            node: node.to_string(),
        };
        if record.mode == Mode::Unprotected {
            return lost;
        }
        let peer = self.peer_of(node);
        let peer_up = peer.as_deref().is_some_and(|p| self.node_usable(p));
        let mark = peer.as_deref().and_then(|p| self.mark_on(&record.uuid, p));
        match ha::failover_target(&record.protection, node, peer.as_deref(), peer_up, mark) {
            Some(to) => VmEvent::FailOver {
                from: node.to_string(),
                to: to.to_string(),
                why: failover_reason(resumes_standby(record), &format!("host {node} lost"), to),
            },
            None => lost,
        }
    }

    /// Resumes, on the peer, the standby of each protected FT VM running on `node` (or lost
    /// with it) while `node` is unreachable (`health::Host::unreachable`), before anything
    /// else is decided for the host. Waiting for its lease, or for its fence, is not needed: its old run releases output only for epochs its standby
    /// acknowledged (all of them in the state the standby resumes from) or after its stale
    /// mark lands, and the mark is conditional on the owner generation that this failover
    /// raises, while the failover commits only while no mark stands (pair simulator:
    /// `ft_partition_with_witness_lets_exactly_one_run_release_output`).
    pub(super) async fn ft_takeover(&mut self, node: &str) {
        if !self.hosts.get(node).is_some_and(|h| h.unreachable) {
            return;
        }
        let peer = self.peer_of(node);
        let peer_up = peer.as_deref().is_some_and(|p| self.node_usable(p));
        let takeovers: Vec<(String, String, VmEvent)> = self
            .vms
            .iter()
            .filter(|(_, e)| {
                e.record.node == node
                    && e.record.mode == Mode::Ft
                    && matches!(
                        e.record.state,
                        VmState::Running
                            | VmState::Paused
                            | VmState::Lost {
                                intent: Intent::Resume
                            }
                    )
            })
            .filter_map(|(uuid, e)| {
                let mark = peer.as_deref().and_then(|p| self.mark_on(uuid, p));
                let to =
                    ha::standby_target(&e.record.protection, node, peer.as_deref(), peer_up, mark)?;
                let event = VmEvent::FailOver {
                    from: node.to_string(),
                    to: to.to_string(),
                    why: failover_reason(
                        true,
                        &format!("host {node} unreachable (silent on every path)"),
                        to,
                    ),
                };
                Some((uuid.clone(), e.record.name.clone(), event))
            })
            .collect();
        for (uuid, vm, event) in takeovers {
            tracing::warn!(vm = %vm, node, "FT takeover begin: the host is silent on every path; resuming the standby on the peer without waiting for its lease");
            match self.drive(&uuid, event, None).await {
                Ok(()) => {
                    tracing::warn!(vm = %vm, node, "FT takeover end: ok; committed, resuming on the peer")
                }
                Err(e) => {
                    tracing::warn!(vm = %vm, node, error = %e, "FT takeover end: not committed (a stale mark, or the store); retried at the next poll")
                }
            }
        }
    }

    /// What a report of `record`'s domain means once HA recovery is considered: the QEMU of a
    /// running HA VM that died on its own (libvirt: crashed, failed) is restarted where it is
    /// while it has restarts left, then moved to the peer; an FT VM whose standby holds a
    /// checkpoint of the run moves to it at once; anything else is `event` itself.
    pub(super) fn recovery(&self, record: &VmRecord, event: VmEvent) -> VmEvent {
        let VmEvent::DomainStopped { reason } = &event else {
            return event;
        };
        let died = matches!(reason.as_str(), "crashed" | "failed");
        let running = matches!(record.state, VmState::Running | VmState::Paused);
        if record.mode == Mode::Unprotected || !died || !running {
            return event;
        }
        let node = record.node.as_str();
        let peer = self.peer_of(node);
        let peer_up = peer.as_deref().is_some_and(|p| self.node_usable(p));
        let mark = peer.as_deref().and_then(|p| self.mark_on(&record.uuid, p));
        let here_behind = self.marked_behind(record, node);
        let restarts = record.protection.restarts;
        let max = self.ctx.max_restarts;
        let vm = record.name.as_str();
        let standby = (record.mode == Mode::Ft)
            .then(|| ha::standby_target(&record.protection, node, peer.as_deref(), peer_up, mark))
            .flatten();
        if let Some(to) = standby {
            tracing::warn!(
                vm,
                node,
                to,
                "recovery: its QEMU died ({reason}); resuming its FT standby on {to}"
            );
            return VmEvent::FailOver {
                from: node.to_string(),
                to: to.to_string(),
                why: failover_reason(true, &format!("its QEMU died on {node} ({reason})"), to),
            };
        }
        let decided = ha::after_crash(
            &record.protection,
            node,
            here_behind,
            peer.as_deref(),
            peer_up,
            mark,
            max,
        );
        match decided {
            Some(None) => {
                tracing::warn!(
                    vm,
                    node,
                    restarts,
                    max_restarts = max,
                    "recovery: its QEMU died ({reason}); restarting it on {node}"
                );
                VmEvent::Restart {
                    why: format!(
                        "its QEMU died ({reason}), restart {} of {max}",
                        restarts + 1
                    ),
                }
            }
            Some(Some(to)) => {
                tracing::warn!(
                    vm,
                    node,
                    to,
                    restarts,
                    "recovery: its QEMU died again ({reason}); moving it to {to}"
                );
                VmEvent::FailOver {
                    from: node.to_string(),
                    to: to.to_string(),
                    why: failover_reason(
                        false,
                        &format!("its QEMU died on {node} after {restarts} restart(s)"),
                        to,
                    ),
                }
            }
            None => {
                tracing::error!(
                    vm,
                    node,
                    restarts,
                    "recovery: its QEMU died ({reason}), no restarts left and the peer cannot take it; it stays stopped"
                );
                event
            }
        }
    }

    /// Steps the protection of every running HA VM with the mirrors `poll` reports; commits
    /// what changed, then rebuilds the mirrors that need it.
    pub(super) async fn observe_protection(&mut self, poll: &DomainsPoll) {
        let now_unix_ms = crate::now_unix_ms();
        let mut decisions = Vec::new();
        for (uuid, entry) in &self.vms {
            let record = &entry.record;
            if !record.mode.mirrored() || record.state != VmState::Running {
                continue;
            }
            if entry.last_command > poll.started {
                continue;
            }
            if self.hosts.get(&record.node).is_some_and(|h| h.agent_down) {
                let protection = ha::agent_down(&record.protection, &record.node, now_unix_ms);
                let decision = ha::Decision {
                    protection,
                    protect: false,
                    clear_mark: false,
                };
                decisions.push((uuid.clone(), decision));
                continue;
            }
            let Some(domain) = poll.domain(&record.node, uuid) else {
                continue;
            };
            // A domain whose mirrors could not be read (its QEMU dying, its monitor busy)
            // tells nothing about them.
            if domain.state() != pb::DomainState::Running || domain.mirrors_unknown {
                continue;
            }
            let peer = self.peer_of(&record.node);
            let seen = Observed {
                primary: &record.node,
                peer: peer.as_deref(),
                peer_up: peer.as_deref().is_some_and(|p| self.node_usable(p)),
                mirror: protection_of(record.mode, domain),
                mirror_path: domain.mirror_path,
                mark: peer.as_deref().and_then(|p| self.mark_on(uuid, p)),
                protecting: entry.busy || !entry.queued.is_empty(),
                now_unix_ms,
            };
            decisions.push((uuid.clone(), ha::observe(&record.protection, &seen)));
        }
        for (uuid, decision) in decisions {
            if let Some(protection) = decision.protection
                && !self
                    .commit_protection(&uuid, protection, decision.clear_mark)
                    .await
            {
                continue;
            }
            if decision.protect {
                self.protect(&uuid);
            }
            self.protection_alert(&uuid).await;
        }
    }

    /// Queues the rebuild of VM `uuid`'s mirror: the peer exports its replica, then the
    /// VM's host mirrors to it (a full copy).
    fn protect(&mut self, uuid: &str) {
        let Some(record) = self.vms.get(uuid).map(|e| &e.record) else {
            return;
        };
        let peer = self.peer_of(&record.node).unwrap_or_default();
        tracing::info!(vm = %record.name, node = %record.node, peer = %peer, "resync begin: exporting the replica, then mirroring every disk");
        let actions = match record.mode {
            Mode::Ft => PROTECT_FT.to_vec(),
            _ => PROTECT.to_vec(),
        };
        self.queue(uuid, actions);
    }

    /// Whether a stale mark says `record`'s copy on `node` is behind.
    pub(super) fn marked_behind(&self, record: &VmRecord, node: &str) -> bool {
        ha::marked_behind(&record.protection, self.mark_on(&record.uuid, node))
    }

    /// The path serial named by VM `uuid`'s stale mark, if one names `peer`'s copy.
    fn mark_on(&self, uuid: &str, peer: &str) -> Option<i64> {
        self.marks
            .get(uuid)
            .filter(|(mark, _)| mark.peer == peer)
            .map(|(mark, _)| mark.path)
    }

    /// The guard of a write that depends on VM `uuid`'s stale mark as last read (and removes
    /// it when `remove`).
    pub(super) fn mark_guard(&self, uuid: &str, remove: bool) -> MarkGuard {
        MarkGuard {
            mod_revision: self.marks.get(uuid).map_or(0, |(_, revision)| *revision),
            remove,
        }
    }

    /// Commits VM `uuid`'s new protection (fenced), removing its obsolete stale mark when
    /// `clear_mark`; false if it did not commit.
    async fn commit_protection(
        &mut self,
        uuid: &str,
        protection: Protection,
        clear_mark: bool,
    ) -> bool {
        let Some(entry) = self.vms.get(uuid) else {
            return false;
        };
        let mut record = entry.record.clone();
        let was = record.protection.sync.name();
        record.protection = protection;
        record.updated_unix_ms = crate::now_unix_ms();
        let guard = self.mark_guard(uuid, clear_mark);
        match self
            .ctx
            .writer
            .update_vm_marked(&record, entry.revision, None, Some(&guard))
            .await
        {
            Ok(revision) => {
                if clear_mark {
                    self.marks.remove(uuid);
                }
                let now = record.protection.sync.name();
                if was != now {
                    log_sync_change(&record, was);
                }
                if let Some(entry) = self.vms.get_mut(uuid) {
                    entry.record = record;
                    entry.revision = revision;
                }
                true
            }
            Err(e) => {
                let e = self.after_store_error(uuid, e).await;
                tracing::warn!(vm = %record.name, error = %e, "committing the VM's protection failed; retried at the next poll");
                false
            }
        }
    }

    /// Raises the VM's simplex alert while it runs on one copy; clears it otherwise.
    pub(super) async fn protection_alert(&mut self, uuid: &str) {
        let Some(record) = self.vms.get(uuid).map(|e| e.record.clone()) else {
            return;
        };
        let id = format!("ha/{uuid}");
        match &record.protection.sync {
            ha::Sync::Simplex { reason, .. }
                if record.mode.mirrored() && record.state == VmState::Running =>
            {
                let message = format!("VM {} is not protected: {reason}", record.name);
                self.raise(&id, &record.node, uuid, message).await;
            }
            _ => self.clear(&id).await,
        }
    }
}

/// What a VM that stopped leaves to clean up: an FT VM's standby on the peer, which would only
/// hold the guest's memory there. Whatever stopped it (a power-off, the guest shutting itself
/// down, a crash with no recovery left, a lost host's power-off carried out), a stopped VM
/// starts again from its disks, never from a standby: only a failover resumes one, and a
/// failover never passes through `Stopped`.
pub(super) fn after_stop(mode: Mode, from: VmState, to: VmState) -> Option<Action> {
    let had_standby = matches!(
        from,
        VmState::Starting
            | VmState::Running
            | VmState::Paused
            | VmState::Stopping { .. }
            | VmState::Lost { .. }
    );
    (mode == Mode::Ft && had_standby && to == VmState::Stopped).then_some(Action::DiscardStandby)
}

/// The protection committed with `transition`'s (re)placement of `record` (see
/// [`ha::placed`]); refused when the host's copy is behind (`behind`: a stale mark says so).
pub(super) fn placed(
    record: &VmRecord,
    transition: &Transition,
    behind: bool,
    now_unix_ms: i64,
) -> Result<Protection, ApiError> {
    let protected = record.mode != Mode::Unprotected;
    let placement = Placement {
        relocate: transition.relocate.as_deref(),
        why: transition.reason.as_deref().unwrap_or("moved"),
        crash: transition.crash,
        behind,
    };
    ha::placed(&record.protection, protected, &record.node, &placement, now_unix_ms).ok_or_else(
        || {
            let current: Vec<&str> = record.protection.current.iter().map(String::as_str).collect();
            ApiError::FailedPrecondition(format!(
                "VM {}'s disks on {} are behind the copy on {}: it may start only there, or every write it acknowledged since would be lost",
                record.name,
                record.node,
                current.join(", ")
            ))
        },
    )
}

/// What protects a running VM, as its host reports it: the mirror; for an FT VM, an in-sync
/// mirror counts as still syncing until the first checkpoint has committed on the standby,
/// and epochs that ended break it (the agent stops the mirror and marks the peer's copy
/// behind right after: the guest runs on alone from the failed epoch on).
pub(super) fn protection_of(mode: Mode, domain: &pb::DomainStatus) -> Mirror {
    let mirror = mirror_of(domain);
    let primary = domain
        .ft
        .as_ref()
        .filter(|ft| ft.role() == pb::FtRole::Primary);
    let checkpointed = primary.is_some_and(|ft| ft.committed_epoch > 0 && ft.error.is_empty());
    let ended = primary
        .map(|ft| ft.error.as_str())
        .filter(|e| !e.is_empty());
    match (mirror, ended) {
        (Mirror::Ready | Mirror::Syncing { .. } | Mirror::Absent, Some(error))
            if mode == Mode::Ft =>
        {
            Mirror::Failed {
                error: format!("the FT checkpoints ended: {error}"),
            }
        }
        (Mirror::Ready, _) if mode == Mode::Ft && !checkpointed => {
            let total = domain.mirrors.iter().map(|m| m.length).sum();
            Mirror::Syncing {
                done: total,
                total,
                verifying: false,
            }
        }
        (other, _) => other,
    }
}

/// The mirror of a running domain, from its agent's report. A disk on the peer's copy comes
/// first: the primary's copy is then behind, whatever the other disks show.
pub(super) fn mirror_of(domain: &pb::DomainStatus) -> Mirror {
    if domain.mirrors.is_empty() {
        return Mirror::Absent;
    }
    if domain
        .mirrors
        .iter()
        .any(|m| m.state() == pb::MirrorState::OnPeer)
    {
        return Mirror::OnPeer;
    }
    if let Some(failed) = domain
        .mirrors
        .iter()
        .find(|m| m.state() == pb::MirrorState::Failed)
    {
        return Mirror::Failed {
            error: format!("{}: {}", failed.device, failed.error),
        };
    }
    if domain
        .mirrors
        .iter()
        .all(|m| m.state() == pb::MirrorState::Ready)
    {
        return Mirror::Ready;
    }
    let syncing = || {
        domain
            .mirrors
            .iter()
            .filter(|m| m.state() == pb::MirrorState::Syncing)
    };
    Mirror::Syncing {
        done: domain.mirrors.iter().map(|m| m.offset).sum(),
        total: domain.mirrors.iter().map(|m| m.length).sum(),
        verifying: syncing().all(|m| m.verifying) && syncing().next().is_some(),
    }
}

/// Logs a change of a VM's protection; a resync's end is the step to protected.
fn log_sync_change(record: &VmRecord, was: &str) {
    let (vm, node) = (record.name.as_str(), record.node.as_str());
    match &record.protection.sync {
        ha::Sync::Protected { .. } => {
            tracing::info!(
                vm,
                node,
                was,
                "resync end: ok; protected, every write is on both hosts"
            );
        }
        ha::Sync::Syncing { done, total, .. } => {
            tracing::info!(vm, node, was, done, total, "protection: syncing");
        }
        ha::Sync::Simplex { reason, .. } => {
            tracing::warn!(vm, node, was, %reason, "protection: simplex");
        }
        ha::Sync::Off => tracing::info!(vm, node, was, "protection: off"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Intent;

    fn mirror(state: pb::MirrorState, offset: u64, length: u64) -> pb::DiskMirror {
        pb::DiskMirror {
            device: "vda".into(),
            export_name: "v".into(),
            state: state.into(),
            offset,
            length,
            error: if state == pb::MirrorState::Failed {
                "Input/output error".into()
            } else {
                String::new()
            },
            verifying: false,
        }
    }

    fn domain(mirrors: Vec<pb::DiskMirror>) -> pb::DomainStatus {
        pb::DomainStatus {
            state: pb::DomainState::Running.into(),
            mirrors,
            ..pb::DomainStatus::default()
        }
    }

    #[test]
    fn mirror_of_is_verifying_only_when_every_syncing_disk_verifies() {
        let verifying = pb::DiskMirror {
            verifying: true,
            ..mirror(pb::MirrorState::Syncing, 1, 4)
        };
        let both = domain(vec![
            verifying.clone(),
            mirror(pb::MirrorState::Ready, 4, 4),
        ]);
        let mixed = domain(vec![verifying, mirror(pb::MirrorState::Syncing, 1, 4)]);

        assert!(matches!(
            mirror_of(&both),
            Mirror::Syncing {
                verifying: true,
                ..
            }
        ));
        assert!(matches!(
            mirror_of(&mixed),
            Mirror::Syncing {
                verifying: false,
                ..
            }
        ));
    }

    #[test]
    fn mirror_of_no_jobs_is_absent() {
        assert_eq!(mirror_of(&domain(vec![])), Mirror::Absent);
    }

    #[test]
    fn mirror_of_all_ready_is_ready() {
        let d = domain(vec![
            mirror(pb::MirrorState::Ready, 4, 4),
            mirror(pb::MirrorState::Ready, 8, 8),
        ]);

        assert_eq!(mirror_of(&d), Mirror::Ready);
    }

    #[test]
    fn mirror_of_one_syncing_sums_progress() {
        let d = domain(vec![
            mirror(pb::MirrorState::Ready, 4, 4),
            mirror(pb::MirrorState::Syncing, 2, 8),
        ]);

        assert_eq!(
            mirror_of(&d),
            Mirror::Syncing {
                done: 6,
                total: 12,
                verifying: false
            }
        );
    }

    #[test]
    fn mirror_of_one_failed_is_failed_with_device() {
        let d = domain(vec![
            mirror(pb::MirrorState::Ready, 4, 4),
            mirror(pb::MirrorState::Failed, 2, 8),
        ]);

        assert_eq!(
            mirror_of(&d),
            Mirror::Failed {
                error: "vda: Input/output error".into()
            }
        );
    }

    #[test]
    fn after_stop_discards_the_standby_of_an_ft_vm_that_stopped() {
        let stopping = VmState::Stopping {
            deadline_unix_ms: 0,
            forced: false,
        };
        let lost = VmState::Lost {
            intent: Intent::PowerOff,
        };
        let discard = Some(Action::DiscardStandby);

        assert_eq!(after_stop(Mode::Ft, stopping, VmState::Stopped), discard);
        // The guest shut itself down, or its QEMU died with no recovery left.
        assert_eq!(
            after_stop(Mode::Ft, VmState::Running, VmState::Stopped),
            discard
        );
        // A lost host's power-off, carried out when it returned.
        assert_eq!(after_stop(Mode::Ft, lost, VmState::Stopped), discard);
        assert_eq!(after_stop(Mode::Ha, stopping, VmState::Stopped), None);
        assert_eq!(
            after_stop(Mode::Ft, VmState::Creating, VmState::Stopped),
            None
        );
        assert_eq!(
            after_stop(Mode::Ft, VmState::Running, VmState::Starting),
            None
        );
        assert_eq!(after_stop(Mode::Ft, stopping, stopping), None);
    }

    fn ft_primary(
        mirrors: Vec<pb::DiskMirror>,
        committed_epoch: u64,
        error: &str,
    ) -> pb::DomainStatus {
        pb::DomainStatus {
            ft: Some(pb::FtStatus {
                role: pb::FtRole::Primary.into(),
                committed_epoch,
                error: error.into(),
                ..pb::FtStatus::default()
            }),
            ..domain(mirrors)
        }
    }

    #[test]
    fn protection_of_ft_ended_epochs_break_a_ready_mirror() {
        let d = ft_primary(
            vec![mirror(pb::MirrorState::Ready, 4, 4)],
            40,
            "the standby refused epoch 41",
        );

        assert_eq!(
            protection_of(Mode::Ft, &d),
            Mirror::Failed {
                error: "the FT checkpoints ended: the standby refused epoch 41".into()
            }
        );
    }

    #[test]
    fn protection_of_ft_checkpointed_ready_mirror_is_ready() {
        let d = ft_primary(vec![mirror(pb::MirrorState::Ready, 4, 4)], 1, "");

        assert_eq!(protection_of(Mode::Ft, &d), Mirror::Ready);
    }

    #[test]
    fn protection_of_ft_ready_mirror_before_first_checkpoint_is_syncing() {
        let d = ft_primary(vec![mirror(pb::MirrorState::Ready, 4, 4)], 0, "");

        assert_eq!(
            protection_of(Mode::Ft, &d),
            Mirror::Syncing {
                done: 4,
                total: 4,
                verifying: false
            }
        );
    }
}
