//! Incremental resync of a disk whose mirror broke while this QEMU kept running
//! (notes/disk-paths.md, Q4): only the extents its resync bitmap marks cross the link.
//!
//! ```text
//!  agent                                   QEMU                              peer replica
//!   │ blockdev-backup sync=bitmap (live) ──► copies the dirty extents as of now ──► NBD
//!   │   ... repeated while more than RESIDUAL_MAX stays dirty (at most MAX_ROUNDS)
//!   │ stop ─────────────────────────────────► guest paused, disks drained
//!   │ blockdev-backup (residual) ───────────► copies what was written since ──────► NBD
//!   │ blockdev-mirror sync=none write-blocking ► every write from now on to both ─► NBD
//!   │ cont ─────────────────────────────────► guest runs (pause: a few ms)
//!   │ verify (see verify.rs) ───────────────► reads both copies, extent by extent
//! ```
//!
//! A backup is point-in-time (copy-before-write): it copies the extents as they were when it
//! started, so only the residual pass, with the guest stopped, may hand over to the mirror.
//! Every step is read back from QEMU (the jobs, the bitmap), so a task that died with the
//! agent is simply started again by the next status. A disk whose dirty bytes do not shrink
//! below [`RESIDUAL_MAX`] within [`MAX_ROUNDS`] (the guest writes faster than the link copies)
//! switches to a full write-blocking mirror, which always converges, rather than pausing long.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::json;

use super::bitmap::{self, marker_name, resync_name};
use super::qmp::{self, Bitmap, BlockJob, NamedNode, find_bitmap};
use super::{
    BACKUP_PREFIX, Error, JOB_PREFIX, PEER_PREFIX, Wait, Who, registry, verify, wait_ended,
};
use crate::domain::DiskFormat;
use crate::libvirt::{Libvirt, Monitor};

/// Dirty bytes small enough to copy with the guest stopped (a few ms over the A-Links).
const RESIDUAL_MAX: u64 = 4 << 20;
/// Live backup rounds before a disk that does not converge switches to a full mirror.
const MAX_ROUNDS: u32 = 8;
/// How long the residual backup may take while the guest is stopped (past it the guest runs
/// again and the resync reports the job as it stands), looked at often: each look is pause.
const RESIDUAL_WAIT: Wait = Wait {
    timeout: Duration::from_secs(10),
    poll: Duration::from_millis(2),
};
/// Pause between two looks at the resync's jobs.
const STEP_POLL: Duration = Duration::from_millis(100);

/// How a disk's mirror is (re)built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Choice {
    /// Copy only what the resync bitmap marks (`dirty` bytes now), then verify.
    Incremental {
        /// Dirty bytes when the resync begins.
        dirty: u64,
    },
    /// Copy everything.
    Full {
        /// Why not incremental.
        why: &'static str,
    },
}

/// Decides how to rebuild a disk of `format` whose resync bitmap is `bitmap` (on the disk's
/// node, in this QEMU). Incremental needs a usable bitmap, and a raw replica: the verify pass
/// compares raw bytes, and an incremental resync is trusted only once verified.
pub(super) fn choose(format: DiskFormat, bitmap: Option<&Bitmap>) -> Choice {
    match (format, bitmap) {
        (DiskFormat::Qcow2, _) => Choice::Full {
            why: "qcow2 replica: its layout differs per host, so no verify pass can prove it",
        },
        (DiskFormat::Raw, None) => Choice::Full {
            why: "no resync bitmap (first sync, a start without a current peer copy, broke before ready, or found to differ)",
        },
        (DiskFormat::Raw, Some(b)) if b.inconsistent || !b.recording || b.busy => Choice::Full {
            why: "the resync bitmap cannot be trusted (inconsistent, not recording or busy)",
        },
        (DiskFormat::Raw, Some(b)) => Choice::Incremental { dirty: b.count },
    }
}

/// Begins the incremental resync of `device` from block node `source` into `target`: marks it
/// unverified and starts the first backup round.
pub(super) fn begin(
    m: &Monitor<'_>,
    device: &str,
    source: &str,
    target: &str,
) -> Result<(), Error> {
    let nodes = qmp::query_nodes(m)?;
    if find_bitmap(&nodes, &marker_name(device)).is_none() {
        bitmap::add_marker(m, source, device)?;
    }
    start_backup(m, device, source, target)
}

/// What a disk whose backup job is done needs next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// The job still copies.
    Wait,
    /// The job failed: it stays for the status to report until a new start.
    Failed,
    /// Another live round.
    Round,
    /// Ready for the residual pass with the guest stopped.
    Final,
    /// The bitmap is gone or does not shrink: switch to a full mirror.
    Full,
}

/// What the disk whose backup `job` stands as it does needs, with `dirty` bytes left in its
/// bitmap (`None`: the bitmap is gone) after `rounds` rounds.
pub(super) fn next(job: &BlockJob, dirty: Option<u64>, rounds: u32) -> Next {
    if !job.status.ended() {
        return Next::Wait;
    }
    if !job.succeeded() {
        return Next::Failed;
    }
    match dirty {
        None => Next::Full,
        Some(d) if d <= RESIDUAL_MAX => Next::Final,
        Some(_) if rounds + 1 < MAX_ROUNDS => Next::Round,
        Some(_) => Next::Full,
    }
}

/// How a disk's resync ended: the length of its mirror job, or the error.
#[derive(Debug)]
pub(super) struct Outcome {
    device: String,
    result: Result<u64, String>,
}

/// Where the driver stands after one step.
#[derive(Debug)]
enum Step {
    /// Jobs still copy.
    Busy,
    /// No backup copies and no mirror is still in its initial copy.
    Done(Vec<Outcome>),
}

/// The driver's memory: live rounds per disk (lost with the agent; then it counts anew).
#[derive(Debug, Default)]
struct Driver {
    rounds: BTreeMap<String, u32>,
}

/// The resync task of VM `who.vm`: drives its backup rounds and final pass, logs each disk's
/// resync end, then verifies the disks resynced incrementally. Ends (with a log line) if the
/// domain stops running or QEMU refuses a step; the next status starts it again if work is
/// left.
pub(super) async fn run(libvirt: Libvirt, node: String, vm: String) {
    let who = Who {
        vm: &vm,
        node: &node,
    };
    match drive(&libvirt, &node, &vm).await {
        Ok(outcomes) => log_ends(who, &outcomes),
        Err(e) => {
            tracing::warn!(vm, node, error = %daemon::error_chain(&e), "resync driver stopped; the next status or start takes over");
            return;
        }
    }
    verify::run(&libvirt, who).await;
}

/// Steps the resync until no backup job copies and every mirror left its initial copy.
async fn drive(libvirt: &Libvirt, node: &str, vm: &str) -> Result<Vec<Outcome>, Error> {
    let mut driver = Driver::default();
    loop {
        let (vm_owned, node_owned) = (vm.to_string(), node.to_string());
        let (back, step) = libvirt
            .with_monitor(vm, move |m| {
                let who = Who {
                    vm: &vm_owned,
                    node: &node_owned,
                };
                let step = step(m, who, &mut driver)?;
                Ok::<_, Error>((driver, step))
            })
            .await?;
        driver = back;
        match step {
            Step::Busy => tokio::time::sleep(STEP_POLL).await,
            Step::Done(outcomes) => return Ok(outcomes),
        }
    }
}

/// One look at the jobs: starts the next rounds, switches stragglers to full, and runs the
/// final pass once every backup job is done.
fn step(m: &Monitor<'_>, who: Who<'_>, driver: &mut Driver) -> Result<Step, Error> {
    let jobs = qmp::query_jobs(m)?;
    let nodes = qmp::query_nodes(m)?;
    let mut busy = false;
    let mut finals = Vec::new();
    for job in &jobs {
        let Some(device) = job.device.strip_prefix(BACKUP_PREFIX) else {
            continue;
        };
        let found = find_bitmap(&nodes, &resync_name(device));
        let rounds = driver.rounds.get(device).copied().unwrap_or(0);
        match (next(job, found.map(|(_, b)| b.count), rounds), found) {
            (Next::Wait, _) => busy = true,
            (Next::Failed, _) => {}
            (Next::Round, Some((source, bitmap))) => {
                round(m, who, job, source, bitmap.count)?;
                driver.rounds.insert(device.to_string(), rounds + 1);
                busy = true;
            }
            (Next::Final, Some((source, _))) => finals.push((job, source)),
            (Next::Full | Next::Round | Next::Final, found) => {
                to_full(m, who, job, found.map(|(source, _)| source), &nodes)?;
                busy = true;
            }
        }
    }
    if !busy && !finals.is_empty() {
        final_pass(m, who, &finals)?;
        return Ok(Step::Busy);
    }
    let copying = jobs
        .iter()
        .any(|j| j.device.starts_with(JOB_PREFIX) && !j.status.ended() && !j.ready);
    if busy || copying {
        return Ok(Step::Busy);
    }
    Ok(Step::Done(outcomes(&jobs)))
}

/// Each disk's resync outcome, from its mirror job or its failed backup job.
fn outcomes(jobs: &[BlockJob]) -> Vec<Outcome> {
    jobs.iter()
        .filter_map(|j| {
            let (device, result) = if let Some(device) = j.device.strip_prefix(JOB_PREFIX) {
                let result = match &j.error {
                    None if j.in_sync() => Ok(j.len),
                    None => Err("the mirror job ended (cancelled)".to_string()),
                    Some(error) => Err(error.clone()),
                };
                (device, result)
            } else {
                let device = j.device.strip_prefix(BACKUP_PREFIX)?;
                (device, Err(j.error.clone().unwrap_or_default()))
            };
            Some(Outcome {
                device: device.to_string(),
                result,
            })
        })
        .collect()
}

/// Starts the next live round for `job`'s disk, whose bitmap on `source` holds `dirty` bytes.
fn round(
    m: &Monitor<'_>,
    who: Who<'_>,
    job: &BlockJob,
    source: &str,
    dirty: u64,
) -> Result<(), Error> {
    let device = device_of(job);
    registry::add_copied(who.vm, device, job.len);
    dismiss(m, &job.device)?;
    start_backup(m, device, source, &target_of(device))?;
    tracing::info!(
        vm = who.vm,
        node = who.node,
        device,
        copied = job.len,
        dirty,
        "resync round done; another round copies what the guest wrote meanwhile"
    );
    Ok(())
}

/// Switches `job`'s disk to a full mirror from `source` (the disk's node, if its bitmap is
/// still there): its bitmap no longer shrinks, or is gone.
fn to_full(
    m: &Monitor<'_>,
    who: Who<'_>,
    job: &BlockJob,
    source: Option<&str>,
    nodes: &[NamedNode],
) -> Result<(), Error> {
    let device = device_of(job);
    registry::add_copied(who.vm, device, job.len);
    dismiss(m, &job.device)?;
    let source = match source {
        Some(source) => source.to_string(),
        None => super::find_source(m, who.vm, device)?,
    };
    bitmap::remove_all(m, nodes, &[resync_name(device), marker_name(device)])?;
    super::start_full(m, device, &source, &target_of(device))?;
    registry::switch_to_full(who.vm, device);
    tracing::warn!(
        vm = who.vm,
        node = who.node,
        device,
        "resync: the dirty extents do not shrink (the guest writes faster than the link copies) or the bitmap is gone; switching to a full mirror"
    );
    Ok(())
}

/// The residual pass of `finals` (each disk's done backup job and the node holding its
/// bitmap) with the guest stopped: the last backup, then a write-blocking mirror from the same
/// instant. The guest runs again whatever happens.
fn final_pass(m: &Monitor<'_>, who: Who<'_>, finals: &[(&BlockJob, &str)]) -> Result<(), Error> {
    let pause = Pause::begin(m, who)?;
    for (job, source) in finals {
        let device = device_of(job);
        registry::add_copied(who.vm, device, job.len);
        dismiss(m, &job.device)?;
        start_backup(m, device, source, &target_of(device))?;
    }
    for (job, _) in finals {
        let residual = wait_ended(m, &job.device, RESIDUAL_WAIT)?;
        match residual {
            Some(done) if done.succeeded() => {
                registry::add_copied(who.vm, device_of(job), done.len)
            }
            other => {
                return Err(Error::ResidualFailed {
                    job: job.device.clone(),
                    error: other.and_then(|j| j.error).unwrap_or_else(|| "gone".into()),
                });
            }
        }
        dismiss(m, &job.device)?;
    }
    for (job, source) in finals {
        let device = device_of(job);
        let mirror = json!({"job-id": format!("{JOB_PREFIX}{device}"), "device": source,
            "target": target_of(device), "sync": "none", "copy-mode": "write-blocking",
            "auto-dismiss": false});
        qmp::execute::<IgnoredAny>(m, "blockdev-mirror", &mirror)?;
    }
    let paused = pause.end()?;
    let devices: Vec<&str> = finals.iter().map(|(job, _)| device_of(job)).collect();
    tracing::info!(
        vm = who.vm,
        node = who.node,
        ?devices,
        paused_ms = paused.as_secs_f64() * 1e3,
        "resync final pass done: residual copied with the guest stopped, write-blocking mirror running"
    );
    Ok(())
}

/// Logs the end of each disk's resync (those this agent process started).
fn log_ends(who: Who<'_>, outcomes: &[Outcome]) {
    for outcome in outcomes {
        let device = outcome.device.as_str();
        if let Ok(len) = outcome.result {
            registry::mirror_ready(who.vm, device, len);
        }
        let Some(report) = registry::end(who.vm, device) else {
            continue;
        };
        let (mode, copied) = (report.mode.name(), report.copied);
        match &outcome.result {
            Ok(_) => {
                tracing::info!(
                    vm = who.vm,
                    node = who.node,
                    device,
                    mode,
                    copied,
                    "resync end: ok, {mode}, {copied} bytes"
                );
            }
            Err(error) => {
                tracing::warn!(
                    vm = who.vm,
                    node = who.node,
                    device,
                    mode,
                    copied,
                    error,
                    "resync end: failed, {mode}: {error}"
                );
            }
        }
    }
}

/// Starts a backup round of `device`'s bitmap from `source` into `target`.
fn start_backup(m: &Monitor<'_>, device: &str, source: &str, target: &str) -> Result<(), Error> {
    let job_id = format!("{BACKUP_PREFIX}{device}");
    let arguments = bitmap::backup_arguments(&job_id, device, source, target);
    qmp::execute::<IgnoredAny>(m, "blockdev-backup", &arguments)
        .map(drop)
        .map_err(Error::from)
}

fn dismiss(m: &Monitor<'_>, job_id: &str) -> Result<(), Error> {
    qmp::execute::<IgnoredAny>(m, "job-dismiss", &json!({ "id": job_id }))
        .map(drop)
        .map_err(Error::from)
}

/// The guest device of a backup job.
fn device_of(job: &BlockJob) -> &str {
    job.device
        .strip_prefix(BACKUP_PREFIX)
        .unwrap_or(&job.device)
}

/// The NBD target node of `device` (incremental resyncs are raw: no qcow2 node over it).
fn target_of(device: &str) -> String {
    format!("{PEER_PREFIX}{device}")
}

/// `query-status`: whether the guest runs.
#[derive(Debug, Deserialize)]
struct RunState {
    running: bool,
}

/// The guest stopped for the final pass: [`Pause::end`] lets it run again, and so does
/// dropping it on any error path, so the guest never stays stopped.
struct Pause<'m, 'a> {
    m: &'m Monitor<'a>,
    who: Who<'m>,
    /// Whether this pause stopped the guest (a guest already paused is left paused).
    stopped: bool,
    since: Instant,
}

impl<'m, 'a> Pause<'m, 'a> {
    /// Stops the guest if it runs.
    fn begin(m: &'m Monitor<'a>, who: Who<'m>) -> Result<Self, Error> {
        let state: RunState = qmp::execute(m, "query-status", &json!({}))?;
        if state.running {
            qmp::execute::<IgnoredAny>(m, "stop", &json!({}))?;
        }
        Ok(Pause {
            m,
            who,
            stopped: state.running,
            since: Instant::now(),
        })
    }

    /// Lets the guest run again; returns how long it was stopped.
    fn end(mut self) -> Result<Duration, Error> {
        if self.stopped {
            qmp::execute::<IgnoredAny>(self.m, "cont", &json!({}))?;
            self.stopped = false;
        }
        Ok(self.since.elapsed())
    }
}

impl Drop for Pause<'_, '_> {
    fn drop(&mut self) {
        if !self.stopped {
            return;
        }
        let (vm, node) = (self.who.vm, self.who.node);
        match qmp::execute::<IgnoredAny>(self.m, "cont", &json!({})) {
            Ok(_) => tracing::warn!(vm, node, "resync final pass failed; the guest runs again"),
            Err(e) => {
                tracing::error!(vm, node, error = %daemon::error_chain(&e), "resync final pass failed and the guest could not be resumed: it stays stopped; resume it with virsh resume");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap(count: u64) -> Bitmap {
        Bitmap {
            name: "pv-resync-vda".into(),
            count,
            recording: true,
            busy: false,
            inconsistent: false,
        }
    }

    fn job(status: &str, error: Option<&str>) -> BlockJob {
        let error = error.map_or(String::new(), |e| format!(r#","error":"{e}""#));
        let text = format!(
            r#"{{"return":[{{"device":"pv-backup-vda","len":65536,"offset":65536,"status":"{status}","type":"backup"{error}}}]}}"#
        );
        let mut jobs: Vec<BlockJob> = qmp::parse_reply("query-block-jobs", &text).unwrap();
        jobs.remove(0)
    }

    #[test]
    fn choose_raw_with_bitmap_is_incremental() {
        let choice = choose(DiskFormat::Raw, Some(&bitmap(720_896)));

        assert_eq!(choice, Choice::Incremental { dirty: 720_896 });
    }

    #[test]
    fn choose_raw_without_bitmap_is_full() {
        let choice = choose(DiskFormat::Raw, None);

        assert!(matches!(choice, Choice::Full { .. }), "{choice:?}");
    }

    #[test]
    fn choose_qcow2_with_bitmap_is_full() {
        let choice = choose(DiskFormat::Qcow2, Some(&bitmap(1)));

        assert!(
            matches!(choice, Choice::Full { why } if why.starts_with("qcow2")),
            "{choice:?}"
        );
    }

    #[test]
    fn choose_bitmap_not_recording_is_full() {
        let stopped = Bitmap {
            recording: false,
            ..bitmap(1)
        };

        let choice = choose(DiskFormat::Raw, Some(&stopped));

        assert!(matches!(choice, Choice::Full { .. }), "{choice:?}");
    }

    #[test]
    fn next_of_a_running_backup_waits() {
        let step = next(&job("running", None), Some(0), 0);

        assert_eq!(step, Next::Wait);
    }

    #[test]
    fn next_of_a_failed_backup_is_failed() {
        let step = next(&job("concluded", Some("Input/output error")), Some(0), 0);

        assert_eq!(step, Next::Failed);
    }

    #[test]
    fn next_with_a_small_residual_is_final() {
        let step = next(&job("concluded", None), Some(RESIDUAL_MAX), 0);

        assert_eq!(step, Next::Final);
    }

    #[test]
    fn next_with_much_left_is_another_round() {
        let step = next(&job("concluded", None), Some(RESIDUAL_MAX + 1), 0);

        assert_eq!(step, Next::Round);
    }

    #[test]
    fn next_with_much_left_after_the_last_round_is_full() {
        let step = next(
            &job("concluded", None),
            Some(RESIDUAL_MAX + 1),
            MAX_ROUNDS - 1,
        );

        assert_eq!(step, Next::Full);
    }

    #[test]
    fn next_without_bitmap_is_full() {
        let step = next(&job("concluded", None), None, 0);

        assert_eq!(step, Next::Full);
    }

    #[test]
    fn outcomes_report_in_sync_mirror_and_failed_backup() {
        let text = r#"{"return":[{"device":"pv-mirror-vda","len":16777216,"offset":16777216,"status":"ready","ready":true,"actively-synced":true,"type":"mirror"},{"device":"pv-backup-vdb","len":8,"offset":0,"status":"concluded","error":"Input/output error","type":"backup"}]}"#;
        let jobs: Vec<BlockJob> = qmp::parse_reply("query-block-jobs", text).unwrap();

        let found: Vec<(String, Result<u64, String>)> = outcomes(&jobs)
            .into_iter()
            .map(|o| (o.device, o.result))
            .collect();

        assert_eq!(
            found,
            vec![
                ("vda".to_string(), Ok(16_777_216)),
                ("vdb".to_string(), Err("Input/output error".to_string())),
            ]
        );
    }
}
