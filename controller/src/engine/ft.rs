//! The engine's FT glue: each FT VM's primary report turned into its figures (epoch rate,
//! last pause, last error), and each change of its phase logged (the old phase's end, the new
//! one's begin). What the phase is and what a change means is decided by [`crate::ft`]; the
//! event log tells the same changes from the committed records ([`crate::events`]).

use std::collections::BTreeMap;

use proto::agent as pb;

use super::actor::Engine;
use super::observe::DomainsPoll;
use super::view::FtRuntime;
use crate::ft::{self, FtSeen};
use crate::model::{Mode, VmRecord};

impl Engine {
    /// Takes each FT VM's primary report from `poll` into its figures. A report that may
    /// predate the engine's last command to the VM is skipped, as for its other reports.
    pub(super) fn observe_ft(&mut self, poll: &DomainsPoll) {
        let now_ms = u64::try_from(
            poll.started
                .saturating_duration_since(self.started)
                .as_millis(),
        )
        .unwrap_or(u64::MAX);
        self.ft.retain(|uuid, _| {
            self.vms
                .get(uuid)
                .is_some_and(|e| e.record.mode == Mode::Ft)
        });
        for (uuid, entry) in &self.vms {
            let record = &entry.record;
            if record.mode != Mode::Ft || entry.last_command > poll.started {
                continue;
            }
            let report = poll
                .domain(&record.node, uuid)
                .filter(|d| {
                    matches!(
                        d.state(),
                        pb::DomainState::Running | pb::DomainState::Paused
                    )
                })
                .and_then(primary_report);
            let runtime = self.ft.entry(uuid.clone()).or_default();
            *runtime = next_runtime(runtime, &record.node, report, now_ms);
        }
    }

    /// Logs every FT VM whose phase changed since the last call (`log`: false only to take
    /// the phases as they are at load).
    pub(super) fn track_ft(&mut self, log: bool) {
        let mut phases = BTreeMap::new();
        for (uuid, entry) in &self.vms {
            let record = &entry.record;
            if record.mode != Mode::Ft {
                continue;
            }
            let seen = self.ft.get(uuid).and_then(|r| r.seen_on(&record.node));
            let phase = ft::phase_of(record, seen);
            let was = self.ft_phases.get(uuid).copied().unwrap_or(phase);
            if log && let Some(change) = ft::transition(was, phase) {
                log_change(record, &change);
            }
            phases.insert(uuid.clone(), phase);
        }
        self.ft_phases = phases;
    }
}

/// A VM's FT runtime after a poll: `report` from `node` at `now_ms`, or none.
fn next_runtime(runtime: &FtRuntime, node: &str, report: Option<FtSeen>, now_ms: u64) -> FtRuntime {
    match report {
        Some(seen) => FtRuntime {
            metrics: Some(ft::metrics(runtime.metrics.as_ref(), node, &seen, now_ms)),
            seen: Some(seen),
        },
        None => FtRuntime {
            seen: None,
            metrics: runtime.metrics.as_ref().map(ft::unreported),
        },
    }
}

/// The FT report of a domain if its host runs it as the primary.
fn primary_report(domain: &pb::DomainStatus) -> Option<FtSeen> {
    let report = domain.ft.as_ref()?;
    (report.role() == pb::FtRole::Primary).then(|| FtSeen {
        committed_epoch: report.committed_epoch,
        last_pause_us: report.last_pause_us,
        error: report.error.clone(),
        waiting_for_mirror: report.waiting_for_mirror,
        pauses: histogram(report.pauses.as_ref()),
        epochs: histogram(report.epochs.as_ref()),
    })
}

/// An agent's duration histogram as the controller keeps it (empty when none came).
fn histogram(report: Option<&pb::DurationHistogram>) -> ft::DurationHistogram {
    report
        .map(|h| ft::DurationHistogram {
            buckets: h.buckets.iter().map(|b| (b.le_us, b.count)).collect(),
            count: h.count,
            sum_us: h.sum_us,
        })
        .unwrap_or_default()
}

/// Logs a change of `record`'s FT phase: the end of the phase it left, then the begin of the
/// one it entered, with the event it means.
fn log_change(record: &VmRecord, change: &ft::Change) {
    let (vm, node) = (record.name.as_str(), record.node.as_str());
    let event = change.event.name();
    let to = ft::name_of(change.to);
    if let Some(from) = change.from {
        tracing::info!(
            vm,
            node,
            op = "ft",
            phase = from.name(),
            outcome = to,
            event,
            "FT {from} end: {to}"
        );
    }
    let detail = ft::message(change, &record.protection, &record.state_reason);
    match change.to {
        Some(phase) if phase.alarming() => {
            tracing::warn!(vm, node, op = "ft", phase = phase.name(), event, %detail, "FT {phase} begin");
        }
        Some(phase) => {
            tracing::info!(vm, node, op = "ft", phase = phase.name(), event, %detail, "FT {phase} begin");
        }
        None => {
            tracing::info!(vm, node, op = "ft", phase = "off", event, %detail, "FT off begin");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(role: pb::FtRole, committed_epoch: u64) -> pb::DomainStatus {
        pb::DomainStatus {
            state: pb::DomainState::Running.into(),
            ft: Some(pb::FtStatus {
                role: role.into(),
                committed_epoch,
                last_pause_us: 1_500,
                error: String::new(),
                waiting_for_mirror: false,
                pauses: Some(pb::DurationHistogram {
                    buckets: vec![pb::DurationBucket {
                        le_us: 2_000,
                        count: 4,
                    }],
                    count: 5,
                    sum_us: 9_000,
                }),
                epochs: Some(pb::DurationHistogram {
                    buckets: vec![pb::DurationBucket {
                        le_us: 100_000,
                        count: 3,
                    }],
                    count: 4,
                    sum_us: 330_000,
                }),
            }),
            ..pb::DomainStatus::default()
        }
    }

    #[test]
    fn primary_report_of_standby_is_none() {
        assert_eq!(primary_report(&domain(pb::FtRole::Standby, 3)), None);
    }

    #[test]
    fn primary_report_of_primary_carries_epoch_and_pause() {
        let report = primary_report(&domain(pb::FtRole::Primary, 3)).unwrap();

        assert_eq!((report.committed_epoch, report.last_pause_us), (3, 1_500));
        let pauses = ft::DurationHistogram {
            buckets: vec![(2_000, 4)],
            count: 5,
            sum_us: 9_000,
        };
        assert_eq!(report.pauses, pauses);
        let epochs = ft::DurationHistogram {
            buckets: vec![(100_000, 3)],
            count: 4,
            sum_us: 330_000,
        };
        assert_eq!(report.epochs, epochs);
    }

    #[test]
    fn next_runtime_two_reports_give_a_rate() {
        let seen = |epoch| FtSeen {
            committed_epoch: epoch,
            ..FtSeen::default()
        };
        let first = next_runtime(&FtRuntime::default(), "n0", Some(seen(10)), 1_000);

        let second = next_runtime(&first, "n0", Some(seen(30)), 3_000);

        assert_eq!(second.metrics.unwrap().epochs_per_second, Some(10.0));
    }

    #[test]
    fn next_runtime_no_report_forgets_it_and_the_rate() {
        let seen = FtSeen {
            committed_epoch: 10,
            ..FtSeen::default()
        };
        let first = next_runtime(&FtRuntime::default(), "n0", Some(seen), 1_000);

        let gone = next_runtime(&first, "n0", None, 2_000);

        assert_eq!(gone.seen, None);
        assert_eq!(gone.metrics.map(|m| m.committed_epoch), Some(10));
    }
}
