//! The agent's memory of each VM's resync: its background task ([`super::resync::run`]: the
//! backup rounds, the final pass, the verify) and each disk's last resync report. QEMU holds
//! the state that matters (jobs, bitmaps, verify marks); this holds only what QEMU cannot say
//! (how a resync began, bytes copied, verify progress and findings) and is lost with the
//! agent, whose next status starts the task again if QEMU shows work left.

use std::collections::BTreeMap;
use std::sync::{LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::{DiskMirror, MirrorState, resync};
use crate::libvirt::Libvirt;

/// How long after an unfinished verify (or a failed driver) the status may start it again.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// How a disk's mirror was rebuilt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResyncMode {
    /// Every byte copied (`blockdev-mirror sync=full`).
    Full,
    /// Only what the dirty bitmap marked (`blockdev-backup sync=bitmap`, then a mirror).
    Incremental,
}

impl ResyncMode {
    /// "full" or "incremental".
    pub fn name(self) -> &'static str {
        match self {
            ResyncMode::Full => "full",
            ResyncMode::Incremental => "incremental",
        }
    }
}

/// The verify pass of a disk's last resync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verify {
    /// None runs after a full copy: QEMU's copy is the proof.
    Skipped,
    /// Waits for the resync to finish.
    Pending,
    /// Compares: `done` of `total` bytes found equal.
    Running {
        /// Bytes compared.
        done: u64,
        /// Bytes to compare.
        total: u64,
    },
    /// Both copies are identical.
    Equal {
        /// Extents compared.
        extents: u64,
    },
    /// The copies differ from this byte on; the mirror was stopped for a full rebuild.
    Differs {
        /// Offset of the first differing byte.
        offset: u64,
    },
    /// The pass could not finish; it is tried again.
    Aborted {
        /// Why.
        error: String,
    },
}

/// A disk's last resync, as this agent process saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resync {
    /// Full or incremental.
    pub mode: ResyncMode,
    /// Bytes copied to the peer: the backup rounds' lengths, or the full mirror's.
    pub copied: u64,
    /// Its verify pass.
    pub verify: Verify,
}

/// One VM's entry.
#[derive(Debug, Default)]
struct VmResync {
    task: Option<JoinHandle<()>>,
    /// The status starts no task before this.
    not_before: Option<Instant>,
    /// Per guest device: the report, and whether its end was logged.
    disks: BTreeMap<String, (Resync, bool)>,
}

static VMS: LazyLock<Mutex<BTreeMap<String, VmResync>>> = LazyLock::new(Mutex::default);

fn vms() -> MutexGuard<'static, BTreeMap<String, VmResync>> {
    VMS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Records that `device` of `vm` begins a resync in `mode`.
pub(super) fn begin(vm: &str, device: &str, mode: ResyncMode) {
    let verify = match mode {
        ResyncMode::Full => Verify::Skipped,
        ResyncMode::Incremental => Verify::Pending,
    };
    let report = Resync {
        mode,
        copied: 0,
        verify,
    };
    let mut vms = vms();
    let entry = vms.entry(vm.to_string()).or_default();
    entry.disks.insert(device.to_string(), (report, false));
}

/// Adds `bytes` to what `device` of `vm` copied.
pub(super) fn add_copied(vm: &str, device: &str, bytes: u64) {
    update(vm, device, |r| r.copied += bytes);
}

/// Records that `device` of `vm` switched from incremental to a full mirror.
pub(super) fn switch_to_full(vm: &str, device: &str) {
    update(vm, device, |r| {
        r.mode = ResyncMode::Full;
        r.verify = Verify::Skipped;
    });
}

/// Records that `device`'s mirror of length `len` is in sync (a full copy copied `len`).
pub(super) fn mirror_ready(vm: &str, device: &str, len: u64) {
    update(vm, device, |r| {
        if r.mode == ResyncMode::Full {
            r.copied = len;
        }
    });
}

/// Records `device`'s verify state.
pub(super) fn set_verify(vm: &str, device: &str, verify: Verify) {
    update(vm, device, |r| r.verify = verify);
}

/// `device`'s report if its end was not logged yet; marks it logged.
pub(super) fn end(vm: &str, device: &str) -> Option<Resync> {
    let mut vms = vms();
    let (report, logged) = vms.get_mut(vm)?.disks.get_mut(device)?;
    (!std::mem::replace(logged, true)).then(|| report.clone())
}

fn update(vm: &str, device: &str, f: impl FnOnce(&mut Resync)) {
    if let Some((report, _)) = vms().get_mut(vm).and_then(|e| e.disks.get_mut(device)) {
        f(report);
    }
}

/// Starts `vm`'s resync task, ending the one that runs (a start changed what to do).
pub(super) fn restart(libvirt: &Libvirt, node: &str, vm: &str) {
    let mut vms = vms();
    let entry = vms.entry(vm.to_string()).or_default();
    if let Some(task) = entry.task.take() {
        task.abort();
    }
    entry.not_before = None;
    entry.task = Some(spawn(libvirt, node, vm));
}

/// Starts `vm`'s resync task unless one runs or an unfinished one is to be retried later.
pub(super) fn resume(libvirt: &Libvirt, node: &str, vm: &str) {
    let mut vms = vms();
    let entry = vms.entry(vm.to_string()).or_default();
    let running = entry.task.as_ref().is_some_and(|t| !t.is_finished());
    let waiting = entry.not_before.is_some_and(|t| Instant::now() < t);
    if running || waiting {
        return;
    }
    tracing::info!(
        vm,
        node,
        "resync task (re)started: QEMU shows resync work and no task drives it"
    );
    entry.not_before = Some(Instant::now() + RETRY_AFTER);
    entry.task = Some(spawn(libvirt, node, vm));
}

/// Lets the status start `vm`'s task again only after [`RETRY_AFTER`].
pub(super) fn retry_later(vm: &str) {
    if let Some(entry) = vms().get_mut(vm) {
        entry.not_before = Some(Instant::now() + RETRY_AFTER);
    }
}

/// Ends `vm`'s task and forgets its reports (its mirrors stop).
pub(super) fn forget(vm: &str) {
    if let Some(task) = vms().remove(vm).and_then(|e| e.task) {
        task.abort();
    }
}

fn spawn(libvirt: &Libvirt, node: &str, vm: &str) -> JoinHandle<()> {
    tokio::spawn(resync::run(
        libvirt.clone(),
        node.to_string(),
        vm.to_string(),
    ))
}

/// Adds what this process knows to `vm`'s `mirrors`: each disk's last resync, the verify's
/// progress as the progress of a mirror held back until verified, and a divergence as the
/// error of the mirror it stopped.
pub(super) fn overlay(vm: &str, mirrors: &mut [DiskMirror]) {
    let vms = vms();
    let Some(entry) = vms.get(vm) else {
        return;
    };
    for mirror in mirrors {
        if let Some((report, _)) = entry.disks.get(&mirror.device) {
            apply(mirror, report);
        }
    }
}

/// Adds `report` to `mirror`; a full copy's bytes are its running mirror job's progress.
fn apply(mirror: &mut DiskMirror, report: &Resync) {
    let mut report = report.clone();
    let job_runs = matches!(mirror.state, MirrorState::Syncing | MirrorState::Ready);
    if report.mode == ResyncMode::Full && job_runs {
        report.copied = mirror.offset.min(mirror.length);
    }
    match (&report.verify, &mirror.state) {
        (Verify::Running { done, total }, MirrorState::Syncing) => {
            (mirror.offset, mirror.length) = (*done, *total);
        }
        (Verify::Differs { offset }, MirrorState::Failed { .. }) => {
            mirror.state = MirrorState::Failed {
                error: format!("verify: replica differs at offset {offset}"),
            };
        }
        _ => {}
    }
    mirror.resync = Some(report);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(state: MirrorState) -> DiskMirror {
        DiskMirror {
            device: "vda".into(),
            export: "a.raw".into(),
            state,
            offset: 0,
            length: 0,
            resync: None,
        }
    }

    fn report(verify: Verify) -> Resync {
        Resync {
            mode: ResyncMode::Incremental,
            copied: 720_896,
            verify,
        }
    }

    #[test]
    fn apply_running_verify_is_the_progress_of_a_held_mirror() {
        let mut held = mirror(MirrorState::Syncing);

        apply(
            &mut held,
            &report(Verify::Running {
                done: 1 << 20,
                total: 16 << 20,
            }),
        );

        assert_eq!((held.offset, held.length), (1 << 20, 16 << 20));
    }

    #[test]
    fn apply_divergence_is_the_error_of_the_stopped_mirror() {
        let mut stopped = mirror(MirrorState::Failed {
            error: "the mirror job ended (cancelled) and copies no more writes".into(),
        });

        apply(&mut stopped, &report(Verify::Differs { offset: 8 << 20 }));

        assert_eq!(
            stopped.state,
            MirrorState::Failed {
                error: "verify: replica differs at offset 8388608".into()
            }
        );
    }

    #[test]
    fn apply_full_copy_reports_the_mirror_jobs_progress() {
        let mut syncing = DiskMirror {
            offset: 4 << 20,
            length: 16 << 20,
            ..mirror(MirrorState::Syncing)
        };
        let full = Resync {
            mode: ResyncMode::Full,
            copied: 0,
            verify: Verify::Skipped,
        };

        apply(&mut syncing, &full);

        assert_eq!(syncing.resync.map(|r| r.copied), Some(4 << 20));
    }

    #[test]
    fn apply_equal_leaves_a_ready_mirror_ready_with_its_report() {
        let mut ready = mirror(MirrorState::Ready);

        apply(&mut ready, &report(Verify::Equal { extents: 16 }));

        assert_eq!(
            (ready.state, ready.resync),
            (
                MirrorState::Ready,
                Some(report(Verify::Equal { extents: 16 }))
            )
        );
    }
}
