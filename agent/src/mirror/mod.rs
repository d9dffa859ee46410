//! This host's disks mirrored to the peer (HA): QEMU's `blockdev-mirror` with `copy-mode:
//! write-blocking`, driven over QMP through libvirt (notes/sync-disk-mirror.md, Recipe A), and
//! rebuilt incrementally after a break (notes/disk-paths.md, Q4).
//!
//! For each disk the peer's replica is added as block nodes behind the socket that leads to
//! the peer's NBD server, and a mirror job copies the disk's top node into them. Once the job
//! is ready *and* actively synced, every guest write completes only after it reached both
//! hosts. The job is completed only when the local disk fails: that pivots the guest onto the
//! peer's copy (`pivot.rs`); a stop cancels it, which in the ready state is a clean stop.
//!
//! ```text
//!  guest ─► virtio ua-vda ─► mirror filter ─► libvirt-N-format ─► local volume
//!                                 │   job pv-mirror-vda (sync full, then write-blocking)
//!                                 └─► [pv-peer-vda-qcow2 ─►] pv-peer-vda (nbd) ─► peer socket
//! ```
//!
//! Every name derives from the guest device, so the mirror's state lives in QEMU alone: an
//! agent restart loses nothing, and [`status`] reads it back. The disk's own top node is found
//! through its device (the user alias `ua-vda`, see [`crate::domain::disk_alias`]) in `query-block`,
//! never guessed from libvirt's node numbering (vda may well be `libvirt-2-format`).
//!
//! **Failure stays visible.** Jobs run with `auto-dismiss: false`: a mirror that broke (the
//! peer or the A-Links failed) stays as a `concluded` job carrying QEMU's error until a start
//! or stop cleans it up. With QEMU's default it would vanish, and the broken mirror would look
//! like no mirror. A target node left without its job (the agent stopped between adding the
//! target and starting the job, or someone dismissed the job) is reported failed as well.
//!
//! The replica's format picks the target: raw → the NBD node itself; qcow2 → a `qcow2` node
//! over it. An NBD export cannot grow, so a qcow2 replica must be preallocated
//! (`preallocation=metadata`); otherwise the first allocating write fails the job with
//! "Invalid argument".
//!
//! **Full or incremental.** While a raw disk's mirror is in sync, a dirty bitmap
//! (`pv-resync-<dev>`, see `bitmap.rs`) is kept on the disk's node. A start of a disk whose
//! mirror broke uses it if it is there (same QEMU: the replica is what this QEMU mirrored,
//! behind only by the bitmap's extents): backup rounds of the dirty extents, a final pass with
//! the guest stopped for a few ms, a write-blocking mirror from then on (`resync.rs`), then a
//! live verify of both copies (`verify.rs`); the mirror is reported ready only once the verify
//! found them equal. A QEMU started while the peer's copy was current (after a failover, a
//! crash restart or a clean stop) gets the bitmap before its first instruction
//! ([`track_from_start`]), so its first mirror is incremental too; a replica that had more
//! (a write the dead host made but never acknowledged) fails the verify and is rebuilt in
//! full. Without a bitmap (a first sync, a qcow2 replica, a replica found to differ), the
//! start copies everything. A background task per VM (`registry.rs`) drives the steps after
//! the start returns; [`stop`] ends it.

mod bitmap;
mod nbd_client;
mod pivot;
mod registry;
mod resync;
mod verify;
mod writes;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::IgnoredAny;
use serde_json::{Value, json};

pub use self::pivot::Plan as PivotPlan;
use self::qmp::{
    BlockJob, JobStatus, NamedNode, device_of_block, execute, find_bitmap, query_jobs, query_nodes,
    source_node,
};
pub use self::registry::{Resync, ResyncMode, Verify};
pub use self::writes::DiskWrites;
use crate::domain::DiskFormat;
use crate::libvirt::{self, Libvirt, Monitor};
use crate::qmp_block as qmp;

/// Prefix of the mirror jobs' IDs; the guest device follows.
const JOB_PREFIX: &str = "pv-mirror-";
/// Prefix of the incremental resync's backup jobs' IDs; the guest device follows.
const BACKUP_PREFIX: &str = "pv-backup-";
/// Prefix of the NBD target nodes' names; the guest device follows.
const PEER_PREFIX: &str = "pv-peer-";
/// Suffix of a qcow2 target node's name (over the NBD node of the same device).
const QCOW2_SUFFIX: &str = "-qcow2";
/// How long a cancelled job may take to end, and how often to look. A ready mirror ends once
/// its in-flight writes reached the peer (milliseconds); a slow peer or a loaded host gets the
/// rest.
const END_WAIT: Wait = Wait {
    timeout: Duration::from_secs(30),
    poll: Duration::from_millis(50),
};

/// How long to wait for a job to end, and how often to look.
#[derive(Clone, Copy, Debug)]
struct Wait {
    timeout: Duration,
    poll: Duration,
}

/// Errors of the mirror; each names what to look at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// QEMU's reply could not be read.
    #[error("reading QEMU's reply to {command}: {reply}")]
    BadReply {
        /// The QMP command.
        command: &'static str,
        /// The reply text.
        reply: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The domain has no disk with this guest device name.
    #[error(
        "domain {uuid} has no disk {device} (it has: {known}); the request names more volumes than the domain has disks"
    )]
    DiskUnknown {
        /// Domain UUID.
        uuid: String,
        /// Guest device, e.g. "vdb".
        device: String,
        /// The disks QEMU shows, by device ID.
        known: String,
    },
    /// A job did not end in time.
    #[error(
        "job {job} did not end within {} s; QEMU may be stuck writing to the peer",
        timeout.as_secs()
    )]
    JobStuck {
        /// Job ID.
        job: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// libvirt could not reach the domain's QEMU monitor.
    #[error(transparent)]
    Libvirt(#[from] libvirt::Error),
    /// The disk is already mirrored to another export.
    #[error(
        "disk {device} is already mirrored to export {running}, not {asked}; stop the mirror first"
    )]
    MirroredElsewhere {
        /// Guest device.
        device: String,
        /// The export the running job writes to.
        running: String,
        /// The export asked for.
        asked: String,
    },
    /// QEMU could not open the peer's replica.
    #[error(
        "opening the peer's replica {export} through {}: {desc}; is the peer exporting it and are the A-Links up?",
        socket.display()
    )]
    PeerUnreachable {
        /// Export name (the volume name).
        export: String,
        /// The socket leading to the peer's NBD server.
        socket: PathBuf,
        /// QEMU's error text.
        desc: String,
    },
    /// QEMU refused a command.
    #[error("QEMU refused {command}: {desc} ({class})")]
    Refused {
        /// The QMP command.
        command: &'static str,
        /// QEMU's error class, e.g. "GenericError".
        class: String,
        /// QEMU's error text.
        desc: String,
    },
    /// Moving a disk onto the peer's copy failed; the guest stays paused.
    #[error("moving disk {device} onto the peer's copy failed: {error}; the guest stays paused")]
    PivotFailed {
        /// Guest device.
        device: String,
        /// QEMU's or the agent's words.
        error: String,
    },
    /// The resync's last pass, with the guest stopped, failed (the guest runs again).
    #[error(
        "resync residual pass {job} failed: {error}; the guest runs again and the next start retries"
    )]
    ResidualFailed {
        /// The backup job.
        job: String,
        /// QEMU's error text.
        error: String,
    },
}

impl From<qmp::Error> for Error {
    fn from(e: qmp::Error) -> Error {
        match e {
            qmp::Error::Libvirt(e) => Error::Libvirt(e),
            qmp::Error::Refused {
                command,
                class,
                desc,
            } => Error::Refused {
                command,
                class,
                desc,
            },
            qmp::Error::BadReply {
                command,
                reply,
                source,
            } => Error::BadReply {
                command,
                reply,
                source,
            },
        }
    }
}

/// Whose mirrors an operation acts on, for logs.
#[derive(Clone, Copy, Debug)]
struct Who<'a> {
    vm: &'a str,
    node: &'a str,
}

/// A disk to mirror: the guest device and the peer's replica of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorDisk {
    /// Guest device, e.g. "vda".
    pub device: String,
    /// The replica's NBD export name on the peer (its volume name).
    pub export: String,
    /// The replica's format.
    pub format: DiskFormat,
}

/// How one disk's mirror stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MirrorState {
    /// The initial copy (or resync, or its verify) runs.
    Syncing,
    /// In sync: every write is on both hosts before the guest sees it complete.
    Ready,
    /// The mirror broke or ended; the peer's copy falls behind.
    Failed {
        /// Why, in QEMU's words where it gave any.
        error: String,
    },
    /// This host's disk failed and the guest runs on the peer's copy (see `pivot.rs`): the
    /// peer's copy is current, this host's is behind.
    OnPeer,
}

/// One disk's mirror to the peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskMirror {
    /// Guest device, e.g. "vda".
    pub device: String,
    /// The replica's export name ("" when QEMU no longer shows the target).
    pub export: String,
    /// The state.
    pub state: MirrorState,
    /// Bytes copied (or verified) so far (a mirror's grows past `length` with the writes).
    pub offset: u64,
    /// Bytes to copy (or verify).
    pub length: u64,
    /// Its last resync, if this agent process started one.
    pub resync: Option<Resync>,
}

/// Mirrors each of `disks` of the running domain `uuid` to the peer's replica behind
/// `peer_socket`; `node` is this host (for logs). A disk whose mirror (or resync) runs is left
/// alone; a broken or ended one is cleaned up and rebuilt, incrementally when it can be.
/// Returns the mirrors' states right after.
pub async fn start(
    libvirt: &Libvirt,
    node: &str,
    uuid: &str,
    disks: &[MirrorDisk],
    peer_socket: &Path,
) -> Result<Vec<DiskMirror>, Error> {
    let (vm, host) = (uuid.to_string(), node.to_string());
    let (disks, socket) = (disks.to_vec(), peer_socket.to_path_buf());
    let (started, mut mirrors) = libvirt
        .with_monitor(uuid, move |m| {
            let who = Who {
                vm: &vm,
                node: &host,
            };
            let mut started = Vec::new();
            for disk in &disks {
                if let Some(mode) = start_disk(m, who, disk, &socket)? {
                    started.push((disk.device.clone(), mode));
                }
            }
            Ok::<_, Error>((started, read_status(m, who)?.mirrors))
        })
        .await?;
    for (device, mode) in &started {
        registry::begin(uuid, device, *mode);
    }
    if !started.is_empty() {
        registry::restart(libvirt, node, uuid);
    }
    registry::overlay(uuid, &mut mirrors);
    Ok(mirrors)
}

/// The mirrors of the running domain `uuid`, in disk order; empty when none runs. Keeps the
/// resync bitmaps of in-sync mirrors, and starts the resync task again if QEMU shows resync
/// work that no task drives (after an agent restart).
pub async fn status(libvirt: &Libvirt, node: &str, uuid: &str) -> Result<Vec<DiskMirror>, Error> {
    Ok(read(libvirt, node, uuid, false).await?.0)
}

/// As [`status`], with the writes to each disk when mirrors run, read in the same monitor
/// session (a listing asks for both on every poll).
pub async fn status_with_writes(
    libvirt: &Libvirt,
    node: &str,
    uuid: &str,
) -> Result<(Vec<DiskMirror>, Vec<DiskWrites>), Error> {
    read(libvirt, node, uuid, true).await
}

async fn read(
    libvirt: &Libvirt,
    node: &str,
    uuid: &str,
    with_writes: bool,
) -> Result<(Vec<DiskMirror>, Vec<DiskWrites>), Error> {
    let (vm, host) = (uuid.to_string(), node.to_string());
    let status = libvirt
        .with_monitor(uuid, move |m| {
            let status = read_status(
                m,
                Who {
                    vm: &vm,
                    node: &host,
                },
            )?;
            let writes = if with_writes && !status.mirrors.is_empty() {
                writes::read(m)?
            } else {
                Vec::new()
            };
            Ok::<_, Error>((status, writes))
        })
        .await?;
    let (status, writes) = status;
    if status.pending {
        registry::resume(libvirt, node, uuid);
    }
    let mut mirrors = status.mirrors;
    registry::overlay(uuid, &mut mirrors);
    Ok((mirrors, writes))
}

/// Stops every mirror (and resync) of the domain `uuid` and removes its target nodes and
/// verify marks; the peer's copy falls behind from here on. The resync bitmaps stay: they
/// still hold every write since the peer was last in sync. A domain without mirrors, or not
/// running (its QEMU and mirrors are gone), is left as it is.
pub async fn stop(libvirt: &Libvirt, node: &str, uuid: &str) -> Result<(), Error> {
    registry::forget(uuid);
    let (vm, host) = (uuid.to_string(), node.to_string());
    let stopped = libvirt
        .with_monitor(uuid, move |m| {
            let (vm, node) = (vm.as_str(), host.as_str());
            for job in query_jobs(m)?
                .iter()
                .filter(|j| device_of_any_job(&j.device).is_some())
            {
                let outcome = end_job(m, job)?;
                tracing::info!(vm, node, job = %job.device, %outcome, "mirror job stopped");
            }
            remove_targets(m, vm, None)?;
            let nodes = query_nodes(m)?;
            let marks: Vec<String> = bitmap::marked(&nodes)
                .iter()
                .map(|d| bitmap::marker_name(d))
                .collect();
            bitmap::remove_all(m, &nodes, &marks)
        })
        .await;
    match stopped {
        Err(Error::Libvirt(libvirt::Error::DomainNotRunning { .. })) => Ok(()),
        other => other,
    }
}

/// Tracks the writes of every disk of the domain `uuid`, started paused, from here on (its
/// resync bitmaps), then resumes it: the first mirror then rebuilds the peer's copy, which
/// equals the disks now, incrementally (and verifies it). The guest is resumed even if the
/// bitmaps could not be added (the first mirror is then a full copy). Returns the devices.
pub async fn track_from_start(
    libvirt: &Libvirt,
    node: &str,
    uuid: &str,
) -> Result<Vec<String>, Error> {
    let (vm, host) = (uuid.to_string(), node.to_string());
    libvirt
        .with_monitor(uuid, move |m| {
            let disks: Vec<(String, String)> = qmp::query_blocks(m)?
                .iter()
                .filter_map(|b| Some((device_of_block(b)?, b.inserted.as_ref()?.node_name.clone())))
                .collect();
            let added = bitmap::add_tracking(m, &disks);
            m.resume()?;
            added?;
            let devices: Vec<String> = disks.into_iter().map(|(d, _)| d).collect();
            tracing::info!(vm, node = %host, ?devices, "resync bitmaps added at start: the guest's writes are tracked from its first instruction");
            Ok(devices)
        })
        .await
}

/// Whether the disks of the domain `uuid`, stopped on an I/O error, can move onto the peer's
/// copy (see `pivot.rs`).
pub async fn pivot_plan(libvirt: &Libvirt, uuid: &str) -> Result<PivotPlan, Error> {
    libvirt.with_monitor(uuid, pivot::plan).await
}

/// Moves `devices` of the domain `uuid` onto the peer's copy and resumes the guest; `node` is
/// this host (for logs). Call only once this host's copy is recorded as behind.
pub async fn pivot(
    libvirt: &Libvirt,
    node: &str,
    uuid: &str,
    devices: &[String],
) -> Result<(), Error> {
    let owned = devices.to_vec();
    let started = Instant::now();
    let result = libvirt
        .with_monitor(uuid, move |m| pivot::move_and_resume(m, &owned))
        .await;
    let ms = started.elapsed().as_millis();
    match &result {
        Ok(t) => {
            tracing::warn!(
                vm = uuid,
                node,
                op = "disk-pivot",
                ?devices,
                ms,
                switch_ms = t.switch_ms,
                resume_ms = t.resume_ms,
                "disk pivot end: ok; the guest runs on the peer's copy"
            )
        }
        Err(e) => {
            tracing::error!(vm = uuid, node, op = "disk-pivot", ?devices, ms, error = %e, "disk pivot end: failed; the guest stays paused")
        }
    }
    result.map(drop)
}

/// Starts the mirror of one disk unless it (or its resync) runs; returns how it was rebuilt.
fn start_disk(
    m: &Monitor<'_>,
    who: Who<'_>,
    disk: &MirrorDisk,
    socket: &Path,
) -> Result<Option<ResyncMode>, Error> {
    let device = disk.device.as_str();
    if pivot::on_peer(&qmp::query_blocks(m)?)
        .iter()
        .any(|d| d == device)
    {
        tracing::info!(
            vm = who.vm,
            node = who.node,
            device,
            "the disk runs on the peer's copy (its local volume failed); left alone"
        );
        return Ok(None);
    }
    let jobs: Vec<BlockJob> = query_jobs(m)?
        .into_iter()
        .filter(|j| device_of_any_job(&j.device) == Some(device))
        .collect();
    if let Some(job) = jobs.iter().find(|j| runs(j)) {
        let nodes = query_nodes(m)?;
        if let Some(running) = export_of(&nodes, device).filter(|e| *e != disk.export) {
            return Err(Error::MirroredElsewhere {
                device: device.to_string(),
                running,
                asked: disk.export.clone(),
            });
        }
        tracing::info!(vm = who.vm, node = who.node, job = %job.device, status = ?job.status, "mirror job runs; left alone");
        return Ok(None);
    }
    for job in &jobs {
        let outcome = end_job(m, job)?;
        tracing::info!(vm = who.vm, node = who.node, job = %job.device, %outcome, "ended job cleaned up before a new start");
    }
    remove_targets(m, who.vm, Some(device))?;
    let source = find_source(m, who.vm, device)?;
    let target = add_target(m, disk, socket)?;
    match rebuild(m, who, disk, &source, &target) {
        Ok(mode) => Ok(Some(mode)),
        Err(e) => {
            // Best effort: the refusal is what the caller needs to see.
            let _ = remove_targets(m, who.vm, Some(device));
            Err(e)
        }
    }
}

/// Rebuilds `disk`'s replica from block node `source` into `target`: incrementally if its
/// resync bitmap allows (see [`resync::choose`]), else by a full mirror.
fn rebuild(
    m: &Monitor<'_>,
    who: Who<'_>,
    disk: &MirrorDisk,
    source: &str,
    target: &str,
) -> Result<ResyncMode, Error> {
    let device = disk.device.as_str();
    let nodes = query_nodes(m)?;
    let bitmap = find_bitmap(&nodes, &bitmap::resync_name(device))
        .filter(|(node, _)| *node == source)
        .map(|(_, b)| b);
    let (vm, node) = (who.vm, who.node);
    match resync::choose(disk.format, bitmap) {
        resync::Choice::Incremental { dirty } => {
            resync::begin(m, device, source, target)?;
            tracing::info!(vm, node, device, mode = "incremental", dirty, export = %disk.export, "resync begin: incremental, {dirty} dirty bytes to copy");
            Ok(ResyncMode::Incremental)
        }
        resync::Choice::Full { why } => {
            let stale = [bitmap::resync_name(device), bitmap::marker_name(device)];
            bitmap::remove_all(m, &nodes, &stale)?;
            start_full(m, device, source, target)?;
            tracing::info!(vm, node, device, mode = "full", why, block_node = %source, target = %target, export = %disk.export, "resync begin: full copy ({why})");
            Ok(ResyncMode::Full)
        }
    }
}

/// Starts the full mirror of `device` from block node `source` into `target`.
fn start_full(m: &Monitor<'_>, device: &str, source: &str, target: &str) -> Result<(), Error> {
    let mirror = json!({"job-id": format!("{JOB_PREFIX}{device}"), "device": source,
        "target": target, "sync": "full", "copy-mode": "write-blocking", "auto-dismiss": false});
    execute::<IgnoredAny>(m, "blockdev-mirror", &mirror)
        .map(drop)
        .map_err(Error::from)
}

/// Whether `job` still works towards (or keeps) the disk's mirror: a mirror job that has not
/// ended, or a resync backup that has not failed (it may wait for the final pass).
fn runs(job: &BlockJob) -> bool {
    if job.device.starts_with(BACKUP_PREFIX) {
        return job.error.is_none() && job.status != JobStatus::Null;
    }
    !job.status.ended()
}

/// The node on top of the disk of guest device `device`, from `query-block`.
fn find_source(m: &Monitor<'_>, vm: &str, device: &str) -> Result<String, Error> {
    let blocks = qmp::query_blocks(m)?;
    source_node(&blocks, device).ok_or_else(|| Error::DiskUnknown {
        uuid: vm.to_string(),
        device: device.to_string(),
        known: blocks
            .iter()
            .map(|b| b.qdev.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Adds the peer's replica of `disk` as block nodes; returns the node to mirror into.
fn add_target(m: &Monitor<'_>, disk: &MirrorDisk, socket: &Path) -> Result<String, Error> {
    let nbd = format!("{PEER_PREFIX}{}", disk.device);
    let add = json!({"driver": "nbd", "node-name": nbd, "export": disk.export,
        "server": {"type": "unix", "path": socket.to_string_lossy()}});
    execute::<IgnoredAny>(m, "blockdev-add", &add).map_err(|e| match e {
        qmp::Error::Refused { desc, .. } => Error::PeerUnreachable {
            export: disk.export.clone(),
            socket: socket.to_path_buf(),
            desc,
        },
        other => Error::from(other),
    })?;
    if disk.format == DiskFormat::Raw {
        return Ok(nbd);
    }
    let qcow2 = format!("{nbd}{QCOW2_SUFFIX}");
    let add = json!({"driver": "qcow2", "node-name": qcow2, "file": nbd});
    if let Err(e) = execute::<IgnoredAny>(m, "blockdev-add", &add) {
        // Best effort: the refusal is what the caller needs to see.
        let _ = execute::<IgnoredAny>(m, "blockdev-del", &json!({"node-name": nbd}));
        return Err(e.into());
    }
    Ok(qcow2)
}

/// Removes the target nodes of `device` (of every device if `None`), qcow2 nodes first.
/// A disk running on the peer's copy keeps its nodes.
fn remove_targets(m: &Monitor<'_>, vm: &str, device: Option<&str>) -> Result<(), Error> {
    let on_peer = pivot::on_peer(&qmp::query_blocks(m)?);
    let mut names: Vec<String> = query_nodes(m)?
        .into_iter()
        .map(|n| n.node_name)
        .filter(|name| {
            name.strip_prefix(PEER_PREFIX).is_some_and(|rest| {
                let dev = rest.strip_suffix(QCOW2_SUFFIX).unwrap_or(rest);
                device.is_none_or(|d| d == dev) && !on_peer.iter().any(|d| d == dev)
            })
        })
        .collect();
    names.sort_by_key(|name| !name.ends_with(QCOW2_SUFFIX));
    for name in names {
        execute::<IgnoredAny>(m, "blockdev-del", &json!({"node-name": name}))?;
        tracing::info!(vm, target = %name, "mirror target node removed");
    }
    Ok(())
}

/// Cancels `job` if it still runs, waits for it to end and dismisses it. Returns how it ended.
fn end_job(m: &Monitor<'_>, job: &BlockJob) -> Result<String, Error> {
    if !job.status.ended() {
        execute::<IgnoredAny>(m, "block-job-cancel", &json!({"device": job.device}))?;
    }
    let ended = wait_ended(m, &job.device, END_WAIT)?;
    let outcome = ended
        .as_ref()
        .and_then(|j| j.error.clone())
        .unwrap_or_else(|| "cancelled".to_string());
    if ended.is_some() {
        execute::<IgnoredAny>(m, "job-dismiss", &json!({"id": job.device}))?;
    }
    Ok(outcome)
}

/// Waits until job `id` has concluded (returned) or is gone (`None`), as `wait` says.
fn wait_ended(m: &Monitor<'_>, id: &str, wait: Wait) -> Result<Option<BlockJob>, Error> {
    let deadline = Instant::now() + wait.timeout;
    loop {
        let job = query_jobs(m)?.into_iter().find(|j| j.device == id);
        match job {
            None => return Ok(None),
            Some(j) if j.status == JobStatus::Concluded => return Ok(Some(j)),
            Some(_) if Instant::now() >= deadline => {
                return Err(Error::JobStuck {
                    job: id.to_string(),
                    timeout: wait.timeout,
                });
            }
            Some(_) => std::thread::sleep(wait.poll),
        }
    }
}

/// What one look at QEMU says about a domain's mirrors.
#[derive(Debug)]
struct Status {
    mirrors: Vec<DiskMirror>,
    /// Whether resync work waits for the resync task (see [`resync_pending`]).
    pending: bool,
}

/// Reads the mirrors and keeps the in-sync mirrors' resync bitmaps.
fn read_status(m: &Monitor<'_>, who: Who<'_>) -> Result<Status, Error> {
    let jobs = query_jobs(m)?;
    let nodes = query_nodes(m)?;
    let on_peer = pivot::on_peer(&qmp::query_blocks(m)?);
    bitmap::upkeep_all(m, who, &jobs, &nodes);
    Ok(Status {
        mirrors: mirrors_of(&jobs, &nodes, &on_peer),
        pending: resync_pending(&jobs, &nodes),
    })
}

/// Whether a resync waits for its task: a backup job that has not failed, or a disk marked
/// unverified whose mirror is in sync.
fn resync_pending(jobs: &[BlockJob], nodes: &[NamedNode]) -> bool {
    let backing_up = jobs
        .iter()
        .any(|j| j.device.starts_with(BACKUP_PREFIX) && j.error.is_none());
    let unverified = bitmap::marked(nodes).iter().any(|device| {
        let job_id = format!("{JOB_PREFIX}{device}");
        jobs.iter().any(|j| j.device == job_id && j.in_sync())
    });
    backing_up || unverified
}

/// The guest device a mirror job's ID stands for (`None` for other jobs).
fn device_of_job(id: &str) -> Option<&str> {
    id.strip_prefix(JOB_PREFIX)
}

/// The guest device a mirror or resync backup job's ID stands for (`None` for other jobs).
fn device_of_any_job(id: &str) -> Option<&str> {
    device_of_job(id).or_else(|| id.strip_prefix(BACKUP_PREFIX))
}

/// Whether `device`'s target is a qcow2 node (over its NBD node).
fn target_is_qcow2(nodes: &[NamedNode], device: &str) -> bool {
    let name = format!("{PEER_PREFIX}{device}{QCOW2_SUFFIX}");
    nodes.iter().any(|n| n.node_name == name)
}

/// The export the NBD target node of `device` opens, from the node's filename.
fn export_of(nodes: &[NamedNode], device: &str) -> Option<String> {
    let name = format!("{PEER_PREFIX}{device}");
    let node = nodes.iter().find(|n| n.node_name == name)?;
    export_in_filename(&node.file)
}

/// The export in an NBD node's filename: `nbd+unix:///EXPORT?socket=PATH`, or the JSON form
/// QEMU falls back to (`json:{..., "export": ...}`).
fn export_in_filename(file: &str) -> Option<String> {
    if let Some(options) = json_filename(file) {
        return options.get("export")?.as_str().map(str::to_string);
    }
    let rest = file.strip_prefix("nbd+unix:///")?;
    let export = rest.split_once("?socket=").map_or(rest, |(e, _)| e);
    Some(export.to_string())
}

/// The socket in an NBD node's filename (either form, as [`export_in_filename`]).
fn socket_in_filename(file: &str) -> Option<PathBuf> {
    if let Some(options) = json_filename(file) {
        return options
            .get("server")?
            .get("path")?
            .as_str()
            .map(PathBuf::from);
    }
    let rest = file.strip_prefix("nbd+unix:///")?;
    rest.split_once("?socket=").map(|(_, s)| PathBuf::from(s))
}

fn json_filename(file: &str) -> Option<Value> {
    serde_json::from_str(file.strip_prefix("json:")?).ok()
}

/// The mirrors `jobs` and `nodes` show, in disk order (vda … vdz, vdaa …). A resync's backup
/// job stands for its disk's mirror, a mirror in sync whose disk is marked unverified is
/// still syncing, and a disk `on_peer` runs on the peer's copy.
fn mirrors_of(jobs: &[BlockJob], nodes: &[NamedNode], on_peer: &[String]) -> Vec<DiskMirror> {
    let unverified = bitmap::marked(nodes);
    let mut mirrors: Vec<DiskMirror> = jobs
        .iter()
        .filter_map(|job| {
            let (device, state) = if let Some(device) = device_of_job(&job.device) {
                (
                    device,
                    state_of(job, unverified.iter().any(|d| d == device)),
                )
            } else {
                let device = job.device.strip_prefix(BACKUP_PREFIX)?;
                (device, backup_state_of(job))
            };
            Some(DiskMirror {
                device: device.to_string(),
                export: export_of(nodes, device).unwrap_or_default(),
                state,
                offset: job.offset,
                length: job.len,
                resync: None,
            })
        })
        .collect();
    let orphans: Vec<DiskMirror> = nodes
        .iter()
        .filter_map(|n| n.node_name.strip_prefix(PEER_PREFIX))
        .filter(|device| !device.contains('-'))
        .filter(|device| !mirrors.iter().any(|m| m.device == *device))
        .map(|device| DiskMirror {
            device: device.to_string(),
            export: export_of(nodes, device).unwrap_or_default(),
            state: if on_peer.iter().any(|d| d == device) {
                MirrorState::OnPeer
            } else {
                MirrorState::Failed {
                    error: "the mirror job is gone while its target remains".to_string(),
                }
            },
            offset: 0,
            length: 0,
            resync: None,
        })
        .collect();
    mirrors.extend(orphans);
    mirrors.sort_by(|a, b| (a.device.len(), &a.device).cmp(&(b.device.len(), &b.device)));
    mirrors
}

/// A mirror job's state: ready only when QEMU says both `ready` and `actively-synced`, and
/// the disk is not `unverified`.
fn state_of(job: &BlockJob, unverified: bool) -> MirrorState {
    match (&job.error, job.status.ended()) {
        (Some(error), _) => MirrorState::Failed {
            error: error.clone(),
        },
        (None, true) => MirrorState::Failed {
            error: "the mirror job ended (cancelled) and copies no more writes".to_string(),
        },
        (None, false) if job.in_sync() && !unverified => MirrorState::Ready,
        (None, false) => MirrorState::Syncing,
    }
}

/// A resync backup job's state: syncing until it fails.
fn backup_state_of(job: &BlockJob) -> MirrorState {
    match &job.error {
        Some(error) => MirrorState::Failed {
            error: format!("resync: {error}"),
        },
        None => MirrorState::Syncing,
    }
}

#[cfg(test)]
mod tests;
